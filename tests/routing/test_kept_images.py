"""A paid job of n images that ends early keeps the images its earlier calls made: they were paid
for. Drafts on Gemini through a plugin built on the built-in engine (the built-in takes bridge and
polish alone, one image each), against a fake Gemini on loopback that answers some calls and
refuses or holds the next."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from orchestrator.errors import Canceled, EngineError
from orchestrator.settings import Settings
from tests.api import read_events, worker_process
from tests.routing import FAKE_B_PRICE, PaidDraftEngine, create_project, ledger, poll, submit, wait_for_job
from tests.routing.conftest import SettingsFactory, running, write_policies
from tests.routing.fake_gemini import FakeGemini
from tiers.base import CancelToken, EngineContext, Progress, RenderRequest, RenderResult, Stage
from tiers.gemini import GeminiEngine

USAGE = {"promptTokenCount": 100, "candidatesTokenCount": 1000, "totalTokenCount": 1100,
         "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1000}]}
POLICY = """
name = "gemini-drafts"
description = "Drafts on Gemini."

[[rules]]
name = "everything"
match = {}
engines = ["gemini-drafts"]
"""


class GeminiDrafts(GeminiEngine):
    """A studio's plugin: the built-in Gemini engine, drafting too."""

    name = "gemini-drafts"
    stages: frozenset[Stage] = frozenset({"ideation", "bridge", "polish"})


def factory(ctx: EngineContext) -> GeminiDrafts:
    return GeminiDrafts(ctx)


class MadeThenFailed(PaidDraftEngine):
    """A plugin whose first call made an image, with a seed no job can ask for, before a later one
    failed: it says so on the error, as `tiers._cloud.paid_calls` does."""

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        result = await super().run(replace(req, n=1), progress, cancel)
        result.images[0].seed = 2**64
        failed = EngineError("the second call was refused", retryable=False, charged="yes")
        failed.made = result
        raise failed


class StoppedWithCostUnread(PaidDraftEngine):
    """A plugin whose first call made an image, billed with a usage report it could not read, and
    whose stop that did not wait came while its second call was out: its `Canceled` says so."""

    UNREAD = "the provider's usage holds token counts that are not counts ('x'); the estimate is captured"
    second_call_out = threading.Event()

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        result = await super().run(replace(req, n=1), progress, cancel)
        result.cost_millicredits, result.cost_unread = None, self.UNREAD
        self.second_call_out.set()
        try:
            await cancel.sleep(120)
        except Canceled:
            stopped = Canceled("stopped while the second call was out", charged="yes")
            stopped.made, stopped.cost_unread = result, self.UNREAD
            raise stopped from None
        raise EngineError("the second call never answered", retryable=False, charged="unknown")


def stopped_with_cost_unread_factory(ctx: EngineContext) -> StoppedWithCostUnread:
    return StoppedWithCostUnread(ctx, "stopped-unread", FAKE_B_PRICE)


def plugins_factory(ctx: EngineContext) -> PaidDraftEngine:
    return PaidDraftEngine(ctx, "paid-drafts", FAKE_B_PRICE)


def made_then_failed_factory(ctx: EngineContext) -> MadeThenFailed:
    return MadeThenFailed(ctx, "made-then-failed", FAKE_B_PRICE)


PLUGINS = """
name = "plugins"
description = "Drafts on the paid fakes."

[[rules]]
name = "everything"
match = {}
engines = ["paid-drafts", "made-then-failed"]
"""


def provider_png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (shade, 40, 200)).save(buf, format="PNG")
    return buf.getvalue()


def provider_png_of_call(call: int) -> bytes:
    """A shade of its own for each call's image: the kept images are told apart."""
    return provider_png(40 * call)


ENGINES = "gemini-drafts=tests.routing.test_kept_images:factory"


def drafting_settings(new_settings: SettingsFactory, tmp_path: Path, gemini: FakeGemini, **extra: Any) -> Settings:
    folder = write_policies(tmp_path / "policies", {"gemini-drafts": POLICY})
    return new_settings(engines=ENGINES, policy="gemini-drafts", policy_dir=folder, gemini_api_key="test-key",
                        gemini_base_url=gemini.url, **extra)


@pytest.fixture
def drafting(new_settings: SettingsFactory, tmp_path: Path) -> Iterator[tuple[httpx.Client, FakeGemini]]:
    with FakeGemini(provider_png_of_call, USAGE, answered=2) as gemini, \
            running(drafting_settings(new_settings, tmp_path, gemini)) as client:
        yield client, gemini


def draft(client: httpx.Client, n: int) -> tuple[str, dict[str, Any]]:
    project = create_project(client, "kept", budget={"limit": 100, "period": "month"})
    job = submit(client, f"/v1/projects/{project['id']}/drafts",
                 {"prompt": "a lighthouse", "n": n, "width": 64, "height": 64, "cache": False})
    assert job["engine"] == "gemini-drafts"
    return project["id"], job


def kept_pngs(client: httpx.Client, asset_ids: list[str]) -> list[tuple[dict[str, Any], dict[str, Any], bytes]]:
    out = []
    for asset_id in asset_ids:
        asset = client.get(f"/v1/assets/{asset_id}").json()
        content = client.get(f"/v1/assets/{asset_id}/content")
        assert content.status_code == 200
        with Image.open(io.BytesIO(content.content)) as img:
            record = json.loads(img.info["orchestrator"])
            pixels = img.convert("RGB").tobytes()
        out.append((asset, record, pixels))
    return out


def test_a_job_refused_part_way_keeps_the_images_made_and_charges_them_exactly(
        drafting: tuple[httpx.Client, FakeGemini]) -> None:
    client, gemini = drafting
    project_id, job = draft(client, n=4)
    events = read_events(client, job["id"])
    job = wait_for_job(client, job["id"])
    assert job["status"] == "failed" and gemini.calls == 3  # the fourth image was never asked for
    assert len(job["assets"]) == 2
    # Told as a stream tells them: each image, then the one end.
    told = [(e.event, e.data.get("index")) for e in events if e.event in ("asset", "failed")]
    assert told == [("asset", 0), ("asset", 1), ("failed", None)]
    assert [e.data["asset_id"] for e in events if e.event == "asset"] == job["assets"]

    kept = kept_pngs(client, job["assets"])
    assert [p for _, _, p in kept] == [Image.open(io.BytesIO(provider_png(s))).convert("RGB").tobytes()
                                       for s in (40, 80)]
    for asset, record, _ in kept:
        assert (asset["job_id"], asset["engine"], asset["stage"]) == (job["id"], "gemini-drafts", "ideation")
        assert record["notes"] == ["made before the job ended invalid_request: 2 of the 4 images asked were made"]
    listed = client.get(f"/v1/projects/{project_id}/assets").json()["items"]
    assert {a["id"] for a in listed} == set(job["assets"])

    # Two calls said their cost; the refused one billed nothing: that is the bill, nothing to reconcile.
    entries = ledger(client, project_id, job["id"])
    captures = [e for e in entries if e["kind"] == "capture"]
    assert len(captures) == 1 and not captures[0]["unreconciled"]
    assert captures[0]["amount"] == job["cost"]["charged"] > 0 and job["cost"]["held"] == 0


@pytest.mark.parametrize("answer", ["refused", "made"])
def test_a_cancel_while_a_later_call_is_out_keeps_the_images_made(
        drafting: tuple[httpx.Client, FakeGemini], answer: str) -> None:
    # The call out is let answer after the user's cancel (within 10 s): refused, it billed nothing, and
    # the two images made are charged exactly; made, its image is kept and charged too. It was
    # dropped, its image lost and the job's charge `unknown`, for a person to reconcile.
    client, gemini = drafting
    gemini.hold, gemini.held_made = True, answer == "made"
    project_id, job = draft(client, n=3)
    poll(lambda: gemini.calls == 3, what="the third call out")
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    time.sleep(0.5)  # the cancel reaches the engine before the answer comes
    gemini.release.set()
    job = wait_for_job(client, job["id"])
    made = 3 if answer == "made" else 2
    assert job["status"] == "canceled" and len(job["assets"]) == made
    captures = [e for e in ledger(client, project_id, job["id"]) if e["kind"] == "capture"]
    assert len(captures) == 1 and not captures[0]["unreconciled"]
    assert captures[0]["amount"] == job["cost"]["charged"] > 0 and job["cost"]["held"] == 0
    assert [a["job_id"] for a, _, _ in kept_pngs(client, job["assets"])] == [job["id"]] * made
    # A stream opened after the end tells the kept images too, from the row.
    told = [e.event for e in read_events(client, job["id"]) if e.event in ("asset", "canceled")]
    assert told == ["asset"] * made + ["canceled"]


def test_a_stream_told_from_the_row_tells_the_images_a_worker_kept(new_settings: SettingsFactory,
                                                                  tmp_path: Path) -> None:
    # The API server runs no jobs: it tells the stream from the row the worker writes.
    with FakeGemini(provider_png_of_call, USAGE, answered=1) as gemini:
        settings = drafting_settings(new_settings, tmp_path, gemini, run_jobs=False, poll_interval=0.1)
        env = {"ORCH_ENGINES": ENGINES, "ORCH_POLICY": "gemini-drafts", "ORCH_POLICY_DIR": str(settings.policy_dir),
               "ORCH_GEMINI_API_KEY": "test-key", "ORCH_GEMINI_BASE_URL": gemini.url}
        with running(settings) as client, worker_process(settings, tmp_path, "worker.log", env=env):
            _, job = draft(client, n=2)
            events = read_events(client, job["id"], timeout=120)
            job = wait_for_job(client, job["id"])
    assert job["status"] == "failed" and len(job["assets"]) == 1
    told = [(e.event, e.data.get("asset_id")) for e in events if e.event in ("asset", "failed")]
    assert told == [("asset", job["assets"][0]), ("failed", None)]


@pytest.fixture
def plugins(new_settings: SettingsFactory, tmp_path: Path) -> Iterator[httpx.Client]:
    folder = write_policies(tmp_path / "policies", {"plugins": PLUGINS})
    engines = ("paid-drafts=tests.routing.test_kept_images:plugins_factory,"
               "made-then-failed=tests.routing.test_kept_images:made_then_failed_factory")
    with running(new_settings(engines=engines, policy="plugins", policy_dir=folder)) as client:
        yield client


def plugin_draft(client: httpx.Client, engine: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
    project = create_project(client, "plugins", budget={"limit": 1000, "period": "month"})
    job = submit(client, f"/v1/projects/{project['id']}/drafts",
                 {"prompt": "a lighthouse", "n": 3, "width": 64, "height": 64, "cache": False, "engine": engine,
                  "tags": tags or {}})
    return wait_for_job(client, job["id"])


def test_an_answer_short_of_images_keeps_those_it_has(plugins: httpx.Client) -> None:
    # Charged as made (the provider answered), and none of them was kept. (The fake reads the tag
    # named after itself.)
    job = plugin_draft(plugins, "paid-drafts", {"paid-drafts": "short"})
    assert job["status"] == "failed" and "returned 2 of 3 images" in job["error"]["message"]
    assert len(job["assets"]) == 2 and job["cost"]["charged"] > 0


def test_images_a_plugin_made_with_a_seed_no_job_can_ask_for_are_kept_without_it(plugins: httpx.Client) -> None:
    # Its 2**64 failed the kept rows' insert, and with it the job's end: left running for recovery.
    job = plugin_draft(plugins, "made-then-failed")
    assert job["status"] == "failed" and len(job["assets"]) == 1
    assert plugins.get(f"/v1/assets/{job['assets'][0]}").json()["seed"] is None


def test_a_stop_that_does_not_wait_ends_the_job_keeping_the_images_made(new_settings: SettingsFactory,
                                                                         tmp_path: Path) -> None:
    # Left to the next start, it was failed `interrupted` with the image of its first call lost and
    # the whole estimate captured.
    with FakeGemini(provider_png_of_call, USAGE, answered=1) as gemini:
        gemini.hold = True  # the second call is out when the service stops
        settings = drafting_settings(new_settings, tmp_path, gemini, stop_grace=0)
        with running(settings) as client:
            project_id, job = draft(client, n=3)
            poll(lambda: gemini.calls == 2, what="the second call out")
        with running(settings) as client:
            job = wait_for_job(client, job["id"])
            entries = ledger(client, project_id, job["id"])
    assert (job["status"], job["error"]["code"]) == ("failed", "interrupted"), job["error"]
    assert len(job["assets"]) == 1 and "1 image(s) its earlier requests made are kept" in job["error"]["message"]
    # Two of the three images were asked for: their share of the estimate, for a person to reconcile.
    [capture] = [e for e in entries if e["kind"] == "capture"]
    assert capture["unreconciled"] and capture["amount"] < job["cost"]["estimated"]


def test_a_plugin_s_stop_part_way_with_its_cost_unread_is_charged_for_reconciliation(
        new_settings: SettingsFactory, tmp_path: Path) -> None:
    # As a success whose cost report could not be read: the estimate, flagged for the invoice with
    # the reason. The stop's own error dropped the reason, and the estimate read as a known bill.
    policy = POLICY.replace("gemini-drafts", "stopped-unread")
    folder = write_policies(tmp_path / "policies", {"stopped-unread": policy})
    settings = new_settings(engines="stopped-unread=tests.routing.test_kept_images:stopped_with_cost_unread_factory",
                            policy="stopped-unread", policy_dir=folder, stop_grace=0)
    StoppedWithCostUnread.second_call_out.clear()
    with running(settings) as client:
        project = create_project(client, "kept", budget={"limit": 100, "period": "month"})
        job = submit(client, f"/v1/projects/{project['id']}/drafts",
                     {"prompt": "a lighthouse", "n": 2, "width": 64, "height": 64, "cache": False})
        poll(StoppedWithCostUnread.second_call_out.is_set, what="the second call out")
    with running(settings) as client:
        job = wait_for_job(client, job["id"])
        entries = ledger(client, project["id"], job["id"])
        waiting = client.get(f"/v1/projects/{project['id']}/ledger", params={"unreconciled": True}).json()["items"]
        spend = client.get("/v1/spend", params={"group_by": "engine"}).json()
    assert (job["status"], job["error"]["code"], len(job["assets"])) == ("failed", "interrupted", 1), job["error"]
    [capture] = [e for e in entries if e["kind"] == "capture"]
    assert capture["unreconciled"] and StoppedWithCostUnread.UNREAD in capture["note"]
    assert capture["amount"] == job["cost"]["charged"] == job["cost"]["estimated"] > 0
    assert [e["id"] for e in waiting] == [capture["id"]]
    [group] = spend["groups"]
    assert (group["key"], group["unreconciled"], group["unreconciled_entries"]) == (
        "stopped-unread", job["cost"]["charged"], 1)
