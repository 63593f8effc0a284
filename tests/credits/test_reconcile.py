"""Reconciling an `unreconciled` capture against the provider's invoice: one signed adjustment,
counted in budgets, job costs and spend; once per capture; admin only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.api import assert_error
from tests.credits import (
    PRICE,
    assert_settled_once,
    budget,
    get_json,
    ledger,
    project_with_draft,
    promote_ok,
    wait_for_job,
)


@pytest.fixture(scope="module")
def api(paid_settings_for: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A service of this module's own: its timeouts would open the shared service's circuit
    breaker for fake-paid and turn away the next module's promotions."""
    settings = paid_settings_for(tmp_path_factory.mktemp("reconcile-data"))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        yield client


def timed_out(api: httpx.Client) -> tuple[str, str, dict[str, Any]]:
    """A project with a job whose provider call timed out: its estimate captured, unreconciled."""
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, tags={"fake": "timeout"})["id"])
    assert job["error"]["code"] == "timeout"
    [capture] = [e for e in ledger(api, project_id) if e["kind"] == "capture"]
    assert capture["unreconciled"]
    return project_id, job["id"], capture


def reconcile(api: httpx.Client, project_id: str, entry_id: str, **body: Any) -> httpx.Response:
    return api.post(f"/v1/projects/{project_id}/ledger/{entry_id}/reconcile", json=body)


def test_an_invoice_below_the_estimate_gives_the_difference_back(api: httpx.Client) -> None:
    project_id, job_id, capture = timed_out(api)
    listed = get_json(api, f"/v1/projects/{project_id}/ledger", unreconciled="true")["items"]
    assert [e["id"] for e in listed] == [capture["id"]]

    path = f"/v1/projects/{project_id}/ledger/{capture['id']}/reconcile"
    body = {"charged": 4, "note": "invoice 2026-11 #77"}
    response = api.post(path, json=body, headers={"Idempotency-Key": "invoice-77"})
    assert response.status_code == 201, response.text
    adjustment = response.json()
    assert (adjustment["kind"], adjustment["amount"], adjustment["job_id"]) == ("adjustment", 4 - PRICE, job_id)
    assert (adjustment["hold_id"], adjustment["note"]) == (capture["hold_id"], "invoice 2026-11 #77")

    # The job, the budget and the spend report now say what the provider charged.
    assert get_json(api, f"/v1/jobs/{job_id}")["cost"]["charged"] == 4
    balance = budget(api, project_id)
    assert (balance["charged"], balance["available"]) == (4, 96)
    report = get_json(api, "/v1/spend", group_by="engine", project_id=project_id)
    # One job (the adjustment is not another), which made no image (it timed out).
    assert report["groups"] == [{"key": "fake-paid", "charged": 4, "unreconciled": 0, "unreconciled_entries": 0,
                                 "jobs": 1, "images": 0}]
    entries = ledger(api, project_id)
    assert not next(e for e in entries if e["id"] == capture["id"])["unreconciled"]
    assert get_json(api, f"/v1/projects/{project_id}/ledger", unreconciled="true")["items"] == []
    assert_settled_once(entries)

    # Once per capture.
    error = assert_error(reconcile(api, project_id, capture["id"], charged=4), 409, "conflict")
    assert "reconciled already" in error["message"]
    # Unless sent again with its key (the header was ignored: a client whose answer was lost got
    # that 409, and could not tell its own success from someone else's reconcile).
    again = api.post(path, json=body, headers={"Idempotency-Key": "invoice-77"})
    assert (again.status_code, again.json()) == (201, adjustment)
    assert again.headers["idempotent-replayed"] == "true"
    assert_error(api.post(path, json={**body, "charged": 5}, headers={"Idempotency-Key": "invoice-77"}), 409,
                 "idempotency_conflict")
    assert len(ledger(api, project_id)) == len(entries)


def test_an_invoice_above_or_equal_to_the_estimate(api: httpx.Client) -> None:
    for charged, expected in ((PRICE + 2.5, 2.5), (PRICE, 0)):
        project_id, job_id, capture = timed_out(api)
        adjustment = reconcile(api, project_id, capture["id"], charged=charged).json()
        assert adjustment["amount"] == expected
        assert adjustment["note"] == f"reconciled: charged {charged}"
        assert get_json(api, f"/v1/jobs/{job_id}")["cost"]["charged"] == charged
        assert budget(api, project_id)["charged"] == charged


def test_concurrent_reconciles_adjust_once(api: httpx.Client) -> None:
    project_id, _, capture = timed_out(api)
    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(lambda _: reconcile(api, project_id, capture["id"], charged=1).status_code,
                                   range(6)))
    assert statuses == [201] + [409] * 5
    assert budget(api, project_id)["charged"] == 1


def test_only_unreconciled_captures_of_the_project(api: httpx.Client) -> None:
    project_id, _, capture = timed_out(api)
    hold = next(e for e in ledger(api, project_id) if e["kind"] == "hold")
    error = assert_error(reconcile(api, project_id, hold["id"], charged=1), 409, "conflict")
    assert "this entry is a hold" in error["message"]
    other_id, _ = project_with_draft(api)
    for project, entry in ((other_id, capture["id"]), (project_id, "999999999"), (project_id, "0x1"),
                           (project_id, "01"), (project_id, "9" * 30)):
        assert_error(reconcile(api, project, entry, charged=1), 404, "not_found")
    for body in ({}, {"charged": -1}, {"charged": 0.0001}, {"charged": True}, {"charged": 1, "extra": 1}):
        assert_error(api.post(f"/v1/projects/{project_id}/ledger/{capture['id']}/reconcile", json=body),
                     422, "invalid_request")
    assert budget(api, project_id)["charged"] == PRICE  # nothing of that moved money
    # The adjustment a reconcile writes: "this entry is a adjustment" before.
    assert reconcile(api, project_id, capture["id"], charged=2).status_code == 201
    adjustment = next(e for e in ledger(api, project_id) if e["kind"] == "adjustment")
    error = assert_error(reconcile(api, project_id, adjustment["id"], charged=1), 409, "conflict")
    assert "this entry is an adjustment" in error["message"]
