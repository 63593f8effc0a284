"""What A1111 and ComfyUI share as engines on the studio's own servers (`_http.SelfHostedEngine`
since e9e4936), pinned as each engine set it up before: the registry and the runner read these."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from tests.tiers.conftest import bridge
from tests.tiers.test_comfyui import write_workflow
from tiers._http import SELF_HOSTED_UNREACHABLE_ATTEMPTS, RemoteClient
from tiers.a1111 import A1111Engine, not_sent_again
from tiers.base import Engine
from tiers.comfyui import ComfyUIEngine, _queued_behind_a_gateway
from tiers.registry import left_off

SelfHosted = A1111Engine | ComfyUIEngine


def made(cls: type[SelfHosted], make_ctx: Any, tmp_path: Path, url: str | None,
         client: RemoteClient | None = None) -> SelfHosted:
    if cls is A1111Engine:
        return A1111Engine(make_ctx(a1111_url=url, a1111_auth="user:pw"), client)
    return ComfyUIEngine(make_ctx(comfyui_url=url, comfyui_workflow=write_workflow(tmp_path)), client)


@pytest.mark.parametrize("cls", [A1111Engine, ComfyUIEngine])
@pytest.mark.parametrize("url", [None, "http://gpu-box.test:7860"])
async def test_a_self_hosted_engine_is_free_remote_and_waits_out_a_restart(
        make_ctx: Any, tmp_path: Path, cls: type[SelfHosted], url: str | None) -> None:
    engine = made(cls, make_ctx, tmp_path, url)
    assert engine.kind == "remote" and engine.stages == frozenset({"bridge", "polish"})
    assert engine.prices() == {"credits_per_image": 0} and engine.estimate(bridge(n=4)) == 0
    # Without its URL it is listed, unavailable, and left off by this process.
    # (cast: each engine's `kind` is narrower than the protocol's.)
    assert engine.reachable is (url is not None) and left_off(cast(Engine, engine)) is (url is None)
    assert str(engine.http.client.base_url) == (url or {"a1111": "http://a1111.invalid",
                                                         "comfyui": "http://comfyui.invalid"}[engine.name])
    assert engine.http.unreachable_attempts == SELF_HOSTED_UNREACHABLE_ATTEMPTS
    assert engine.http.bills is False  # its errors say "made", never "billed"
    assert engine.http.deadline_seconds == 60.0  # ORCH_REMOTE_DEADLINE as the tests' context sets it
    await engine.aclose()
    assert engine.http.client.is_closed


@pytest.mark.parametrize("cls", [A1111Engine, ComfyUIEngine])
async def test_a_client_given_is_used_as_a_self_hosted_one(make_ctx: Any, tmp_path: Path,
                                                           cls: type[SelfHosted]) -> None:
    client = RemoteClient("given", base_url="http://given.test", key_setting="K")
    engine = made(cls, make_ctx, tmp_path, "http://gpu-box.test:7860", client)
    assert engine.http is client and str(client.client.base_url) == "http://given.test"
    assert client.unreachable_attempts == SELF_HOSTED_UNREACHABLE_ATTEMPTS and client.bills is False
    # Each engine's own rule for an answer it does not retry, not the client's default (retry).
    assert client.final_answer is (not_sent_again if cls is A1111Engine else _queued_behind_a_gateway)
    await engine.aclose()
