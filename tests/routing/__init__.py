"""Routing, fallback, policies, the engine registry and the tiered workflow end to end.

Helpers shared by the modules live here, and so do the engine factories the services under test
import by name (`ORCH_ENGINES="fake-b=tests.routing:fake_b_factory"`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import httpx

# Shared with tests/api, re-exported for the routing modules.
from tests.api import TERMINAL as TERMINAL
from tests.api import assert_error as assert_error
from tests.api import create_project as create_project
from tests.api import wait_for_job as wait_for_job
from tests.fakes import FakePaidEngine
from tiers.base import CancelToken, EngineContext, PriceTable, Progress, RenderRequest, RenderResult

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 1}
FAKE_B_PRICE = 20.0  # credits per image


class NamedFakeEngine(FakePaidEngine):
    """A second priced fake. `tests.fakes.FakePaidEngine` reads its behaviour from the `fake` tag,
    so every instance would fail together; this one reads the tag named after itself (`fake-b`),
    which lets one request fail on `fake-paid` and succeed on the next candidate."""

    def __init__(self, ctx: EngineContext, name: str, price: float) -> None:
        super().__init__(ctx, name=name)
        self._prices = PriceTable(name, {"fake-1": {"image": price}}, "2026-11", ctx.price_overrides.get(name))

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        tags = {k: v for k, v in req.tags.items() if k != "fake"}
        if self.name in req.tags:
            tags["fake"] = req.tags[self.name]
        return await super().run(replace(req, tags=tags), progress, cancel)


def fake_b_factory(ctx: EngineContext) -> NamedFakeEngine:
    return NamedFakeEngine(ctx, "fake-b", FAKE_B_PRICE)


class PaidDraftEngine(NamedFakeEngine):
    """A priced engine that also drafts (flat grey images from a prompt): ideation on paid credits."""

    stages = frozenset({"ideation", "bridge", "polish"})


def paid_drafts_factory(ctx: EngineContext) -> PaidDraftEngine:
    return PaidDraftEngine(ctx, "paid-drafts", FAKE_B_PRICE)


def poll(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Call `check()` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        time.sleep(0.02)


def submit(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def run_draft(client: httpx.Client, project_id: str, **body: Any) -> dict[str, Any]:
    """A one-image 64x64 draft on the tiny model, waited for."""
    job = submit(client, f"/v1/projects/{project_id}/drafts",
                 {"prompt": "a lighthouse at dusk", "n": 1, "seed": 7, **SMALL, **body})
    return wait_for_job(client, job["id"], ("succeeded",))


def promote(client: httpx.Client, asset_id: str, **body: Any) -> dict[str, Any]:
    """Submit a bridge job. The result cache is off unless asked for: identical drafts (same seed)
    in tests sharing a service would otherwise turn later promotes into cache hits."""
    return submit(client, f"/v1/assets/{asset_id}/promote", {"steps": 2, "cache": False, **body})


def ledger(client: httpx.Client, project_id: str, job_id: str | None = None) -> list[dict[str, Any]]:
    response = client.get(f"/v1/projects/{project_id}/ledger", params={"limit": 500})
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["items"]
    return [e for e in entries if job_id is None or e["job_id"] == job_id]


def engines(client: httpx.Client) -> dict[str, dict[str, Any]]:
    response = client.get("/v1/engines")
    assert response.status_code == 200, response.text
    return {e["name"]: e for e in response.json()}


def zero_b_factory(ctx: EngineContext) -> NamedFakeEngine:
    """A cloud engine priced 0 that fails on its own tag (`fake-zero-b`), beside the others in one chain."""
    return NamedFakeEngine(ctx, "fake-zero-b", 0.0)
