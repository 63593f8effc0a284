"""Metered local work: a per-device-second rate is charged as spend but never refused for budget."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from orchestrator.settings import Settings
from tests.api import create_project, run_draft
from tests.conftest import SettingsFactory


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


def test_local_work_is_free_by_default(server: httpx.Client) -> None:
    project = create_project(server, budget={"limit": 1, "period": "day"})["id"]
    run_draft(server, project, n=1, width=64, height=64, steps=1)
    assert server.get(f"/v1/projects/{project}/ledger").json()["items"] == []
