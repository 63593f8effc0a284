"""Tests of the credit ledger through the REST API: holds, captures, releases, budgets, spend.

Helpers shared by the modules live here; the package's fixtures are in `conftest.py`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import pytest

from orchestrator.runner import Claim, JobRunner

# Shared with tests/api, re-exported for the credit modules.
from tests.api import TERMINAL as TERMINAL
from tests.api import iter_sse as iter_sse
from tests.api import wait_for_job as wait_for_job

T = TypeVar("T")
PRICE = 10.0  # credits per image of the fake-paid engine (tests/fakes.py)
DRAFT: dict[str, Any] = {"prompt": "a lighthouse at dusk", "n": 1, "width": 64, "height": 64, "steps": 1, "seed": 7}


def poll(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0, what: str = "state") -> T:
    """Call `fetch` until `done(value)`, or fail at the deadline (polling, never a fixed wait)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {value!r}")
        time.sleep(0.02)


def get_json(client: httpx.Client, url: str, **params: Any) -> Any:
    response = client.get(url, params=params or None)
    assert response.status_code == 200, response.text
    return response.json()


def create_project(client: httpx.Client, budget: dict[str, Any] | None = None, name: str = "credits") -> str:
    body: dict[str, Any] = {"name": name}
    if budget is not None:
        body["budget"] = budget
    response = client.post("/v1/projects", json=body)
    assert response.status_code == 201, response.text
    project_id: str = response.json()["id"]
    return project_id


def make_draft(client: httpx.Client, project_id: str, **overrides: Any) -> str:
    """One 64x64 draft on the tiny local model; returns its asset id."""
    response = client.post(f"/v1/projects/{project_id}/drafts", json={**DRAFT, **overrides})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    asset_id: str = job["assets"][0]
    return asset_id


def project_with_draft(client: httpx.Client, budget: dict[str, Any] | None = None) -> tuple[str, str]:
    project_id = create_project(client, budget)
    return project_id, make_draft(client, project_id)


def promote(client: httpx.Client, asset_id: str, *, key: str | None = None, **body: Any) -> httpx.Response:
    """POST promote on the fake paid engine; the result cache is off unless `cache=True` is passed."""
    payload = {"engine": "fake-paid", "cache": False, **body}
    headers = {"Idempotency-Key": key} if key else None
    return client.post(f"/v1/assets/{asset_id}/promote", json=payload, headers=headers)


def promote_ok(client: httpx.Client, asset_id: str, **body: Any) -> dict[str, Any]:
    response = promote(client, asset_id, **body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def budget(client: httpx.Client, project_id: str) -> dict[str, Any]:
    result: dict[str, Any] = get_json(client, f"/v1/projects/{project_id}/budget")
    return result


def ledger(client: httpx.Client, project_id: str) -> list[dict[str, Any]]:
    """Every ledger entry of the project, following the cursor."""
    entries: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = get_json(client, f"/v1/projects/{project_id}/ledger", **params)
        entries += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return entries


def jobs_of(client: httpx.Client, project_id: str, stage: str | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"project_id": project_id, "limit": 500}
    if stage:
        params["stage"] = stage
    items: list[dict[str, Any]] = get_json(client, "/v1/jobs", **params)["items"]
    return items


def kinds(entries: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["kind"] for e in entries)


def assert_settled_once(entries: list[dict[str, Any]]) -> None:
    """Every hold is settled, at most one capture and one release each, and they add up to the hold
    (a capture above its hold is flagged `over_hold` and has no release)."""
    holds = {e["id"]: e for e in entries if e["kind"] == "hold"}
    settlements = [e for e in entries if e["kind"] in ("capture", "release")]
    assert all(e["hold_id"] in holds for e in settlements), settlements
    for hold_id, hold in holds.items():
        mine = [e for e in settlements if e["hold_id"] == hold_id]
        counts = Counter(e["kind"] for e in mine)
        assert mine, f"hold {hold_id} was never settled"
        assert hold["settled"] is True, hold  # the flag open holds are found by agrees
        assert max(counts.values()) == 1, f"hold {hold_id} settled twice: {mine}"
        assert all(e["job_id"] == hold["job_id"] for e in mine)
        capture = next((e for e in mine if e["kind"] == "capture"), None)
        if capture is not None and capture["over_hold"]:
            assert capture["amount"] > hold["amount"] and counts["release"] == 0
        else:
            assert round(sum(e["amount"] for e in mine), 3) == hold["amount"], mine


def charges(entries: list[dict[str, Any]]) -> dict[str, float]:
    """What the ledger charged each job: its captures and adjustments."""
    charged: dict[str, float] = {}
    for entry in entries:
        if entry["kind"] in ("capture", "adjustment"):
            charged[entry["job_id"]] = round(charged.get(entry["job_id"], 0) + entry["amount"], 3)
    return charged


def wait_for_state(client: httpx.Client, job_id: str, state: str = "accepted") -> None:
    """Until the job's engine reports `state`: `submitted` (the fake engine's call is in flight) or
    `accepted` (what the provider accepted is saved with the job, for a crash to find)."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for event in iter_sse(stream):
            if event.event == "state" and event.data.get("state") == state:
                return
    raise AssertionError(f"job {job_id} ended before its engine reported '{state}'")


def held_saves(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Saves of what providers accepted wait (as for the write lock) until `release` is set;
    `waiting` is set once one does."""
    real = JobRunner.save_provider_request
    waiting, release = threading.Event(), threading.Event()

    def held(self: JobRunner, claim: Claim, work: dict[str, Any]) -> None:
        waiting.set()
        release.wait(30)
        real(self, claim, work)

    monkeypatch.setattr(JobRunner, "save_provider_request", held)
    return waiting, release
