"""Metered local work: a per-device-second rate is charged as spend but never refused for budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from sqlmodel import col, select

from orchestrator.db import Database
from orchestrator.ledger import Ledger
from orchestrator.models import Job, LedgerEntry, Project
from orchestrator.runner import device_seconds
from orchestrator.settings import Settings
from tests.api import create_project, run_draft
from tests.conftest import SettingsFactory
from tiers._local import LocalRuntime
from tiers.base import MAX_AMOUNT

LOAD_SECONDS = 1000.0


def test_local_rate_charges_spend_without_ever_refusing(make_settings: SettingsFactory,
                                                        start_server: Callable[[Settings], httpx.Client]) -> None:
    client = start_server(make_settings(local_gpu_second_credits=100.0))
    project = create_project(client, budget={"limit": 0.001, "period": "month"})["id"]
    first = run_draft(client, project, n=1, width=64, height=64, steps=1)
    # The budget is spent by the first draft; the second still runs: local engines keep working.
    second = run_draft(client, project, n=1, width=64, height=64, steps=1)
    assert first["status"] == second["status"] == "succeeded"
    entries = client.get(f"/v1/projects/{project}/ledger").json()["items"]
    captures = [e for e in entries if e["kind"] == "capture"]
    assert {e["job_id"] for e in captures} == {first["id"], second["id"]}
    assert all(e["amount"] > 0 and e["hold_id"] is None and "device-seconds" in e["note"] for e in captures)
    assert not [e for e in entries if e["kind"] == "hold"]
    budget = client.get(f"/v1/projects/{project}/budget").json()
    assert budget["charged"] == round(sum(e["amount"] for e in captures), 3)
    assert budget["held"] == 0
    assert client.get(f"/v1/jobs/{first['id']}").json()["cost"]["charged"] > 0
    # Metered work is spend, and the report counts its jobs and images.
    for group_by, key in (("stage", "ideation"), ("engine", "lite"), ("project", project)):
        report = client.get("/v1/spend", params={"group_by": group_by, "project_id": project}).json()
        named = {"name": "test project"} if group_by == "project" else {}
        assert report["groups"] == [{"key": key, "charged": budget["charged"], "unreconciled": 0,
                                     "unreconciled_entries": 0, "jobs": 2,
                                     "images": 2, **named}], (group_by, report)


def test_loading_the_model_is_not_metered(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                          start_server: Callable[[Settings], httpx.Client]) -> None:
    # The first job on a cold device waits for the model: that is the service's start, not the
    # job's work (it was billed 6 s against 1-2 s for the same draft afterwards).
    # The engine's clock, not the wall's: a loaded machine's pauses stretched the render itself
    # toward a slept load's length. Each look at it is a second on; the load is LOAD_SECONDS.
    load = LocalRuntime._load

    class Clock:
        now = 0.0

        def monotonic(self) -> float:
            self.now += 1.0
            return self.now

    clock = Clock()

    def slow_load(self: LocalRuntime, model: str) -> Any:
        clock.now += LOAD_SECONDS
        return load(self, model)

    monkeypatch.setattr("tiers.lite.time", clock)
    monkeypatch.setattr(LocalRuntime, "_load", slow_load)
    client = start_server(make_settings(local_gpu_second_credits=1.0))
    project = create_project(client)["id"]
    job = run_draft(client, project, n=1, width=64, height=64, steps=1)
    [capture] = [e for e in client.get(f"/v1/projects/{project}/ledger").json()["items"] if e["kind"] == "capture"]
    assert capture["job_id"] == job["id"]
    # Credits = device-seconds at rate 1: a bill with the load in it would be at least LOAD_SECONDS.
    assert 0 < capture["amount"] < LOAD_SECONDS, capture


def test_local_work_is_free_by_default(server: httpx.Client) -> None:
    project = create_project(server, budget={"limit": 1, "period": "day"})["id"]
    run_draft(server, project, n=1, width=64, height=64, steps=1)
    assert server.get(f"/v1/projects/{project}/ledger").json()["items"] == []


@pytest.mark.parametrize(("reported", "charged"), [
    (2.5, 2.5), (0, 0.0), (None, 10.0),  # an engine that keeps no count: the attempt's own seconds
    # A plugin's mistakes: free (-5), unstorable (NaN, inf) or past what an entry holds (1e12).
    (-5, 10.0), (float("nan"), 10.0), (float("inf"), 10.0), (1e12, 10.0), ("2", 10.0), (True, 10.0),
    (np.float32(2.5), 2.5), (np.int64(3), 3.0),  # a numpy count: the engine's own, loading left out
    (10**400, 10.0),  # an integer past any float
])
def test_device_seconds_an_engine_reports_are_charged_only_within_its_attempt(reported: object,
                                                                               charged: float) -> None:
    assert device_seconds(reported, 10.0, engine="plugin") == charged


def test_metered_use_past_what_an_entry_holds_is_charged_the_most_it_holds(db: Database) -> None:
    # Hours at the highest rate: an amount the budget's sums overflowed (500 on budget and spend).
    with db.transaction() as s:
        s.add(Project(id="prj_meter", name="meter", policy="balanced"))
        s.flush()
        job = Job(id="job_meter", project_id="prj_meter", stage="ideation", engine="lite", params={})
        s.add(job)
        s.flush()
        Ledger().charge_usage(s, job, MAX_AMOUNT * 9, note="a very long job")
    with db.session() as s:
        [entry] = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == "job_meter")).all()
    assert entry.amount == MAX_AMOUNT
