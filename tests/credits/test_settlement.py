"""How a paid job's hold is settled: provider-reported cost, failures, timeouts, cancellation."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.runner import Claim, JobRunner
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore, Put
from orchestrator.workers import Presence
from tests import fakes
from tests.credits import (
    PRICE,
    TERMINAL,
    assert_settled_once,
    budget,
    create_project,
    get_json,
    held_saves,
    iter_sse,
    kinds,
    ledger,
    make_draft,
    poll,
    project_with_draft,
    promote_ok,
    wait_for_job,
)
from tiers.base import RenderResult


def test_provider_cost_below_the_hold_releases_the_rest(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, tags={"cost": "7.5"})["id"])
    assert job["status"] == "succeeded", job
    assert job["cost"] == {"estimated": PRICE, "held": 0, "charged": 7.5, "cache_hit": False, "engines": [
        {"engine": "fake-paid", "estimated": PRICE, "held": 0, "charged": 7.5, "released": PRICE - 7.5}]}

    entries = ledger(api, project_id)
    assert kinds(entries) == {"hold": 1, "capture": 1, "release": 1}
    by_kind = {e["kind"]: e for e in entries}
    assert by_kind["hold"]["amount"] == PRICE
    assert by_kind["capture"]["amount"] == 7.5 and not by_kind["capture"]["over_hold"]
    assert by_kind["release"]["amount"] == 2.5
    assert not by_kind["capture"]["unreconciled"]
    assert_settled_once(entries)
    assert budget(api, project_id) | {"window_start": None, "window_end": None} == {
        "limit": 100, "period": "month", "window_start": None, "window_end": None,
        "charged": 7.5, "held": 0, "granted": 0, "available": 92.5}


def test_a_cost_the_provider_reported_unreadably_is_the_estimate_flagged(api: httpx.Client) -> None:
    # Gemini's or OpenAI's usage with a negative or infinite count: the estimate was captured as if
    # the provider had said nothing, and nobody was asked to check it against the invoice.
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, tags={"fake": "unreadable-usage"})["id"])
    assert job["status"] == "succeeded", job
    capture = next(e for e in ledger(api, project_id) if e["kind"] == "capture")
    assert capture["amount"] == PRICE and capture["unreconciled"] and capture["note"] == "usage unreadable"
    flagged = api.get(f"/v1/projects/{project_id}/ledger", params={"unreconciled": "true"}).json()["items"]
    assert [e["id"] for e in flagged] == [capture["id"]]


def test_provider_cost_above_the_hold_is_captured_and_flagged(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, tags={"cost": "12"})["id"])
    assert job["status"] == "succeeded", job
    assert job["cost"]["charged"] == 12

    entries = ledger(api, project_id)
    assert kinds(entries) == {"hold": 1, "capture": 1}
    capture = next(e for e in entries if e["kind"] == "capture")
    assert capture["amount"] == 12 and capture["over_hold"]
    assert_settled_once(entries)
    balance = budget(api, project_id)
    assert (balance["charged"], balance["held"], balance["available"]) == (12, 0, 88)
    assert not capture["unreconciled"]  # within twice the estimate: taken as reported


@pytest.mark.parametrize(("reported", "charged", "note"), [
    ("25", 25, "over 2 times the estimate"),  # taken, and put in front of someone
    ("-5", PRICE, "reported cost -5.0 credits is not a charge"),  # never a negative charge or an outsized release
    # A plugin's fraction was stored as a float the sums truncated; an infinity broke them for good.
    ("1.0005", PRICE, "reported cost 1000.5 millicredits is not a charge"),
    ("inf", PRICE, "reported cost inf millicredits is not a charge"),
    # 2**62 millicredits fit the column, but two of them overflowed every spend total (SQLite).
    ("4611686018427387.904", PRICE, "reported cost 4611686018427388.0 credits is not a charge"),
])
def test_a_reported_cost_that_needs_a_look_is_flagged_for_reconciliation(
        api: httpx.Client, reported: str, charged: float, note: str) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, tags={"cost": reported})["id"])
    assert job["status"] == "succeeded" and job["cost"]["charged"] == charged
    entries = ledger(api, project_id)
    capture = next(e for e in entries if e["kind"] == "capture")
    assert capture["amount"] == charged and capture["unreconciled"] and note in capture["note"]
    assert_settled_once(entries)
    assert all(e["amount"] >= 0 for e in entries)
    listed = get_json(api, f"/v1/projects/{project_id}/ledger", unreconciled="true")["items"]
    assert [e["id"] for e in listed] == [capture["id"]]


@pytest.mark.parametrize(("behaviour", "code"), [("fail", "engine_error"), ("filtered", "content_filtered")])
def test_failure_releases_the_hold(api: httpx.Client, behaviour: str, code: str) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, tags={"fake": behaviour})["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == code
    assert job["assets"] == []
    assert job["cost"] == {"estimated": PRICE, "held": 0, "charged": 0, "cache_hit": False, "engines": [
        {"engine": "fake-paid", "estimated": PRICE, "held": 0, "charged": 0, "released": PRICE}]}

    entries = ledger(api, project_id)
    assert kinds(entries) == {"hold": 1, "release": 1}
    assert next(e for e in entries if e["kind"] == "release")["amount"] == PRICE
    assert_settled_once(entries)
    balance = budget(api, project_id)
    assert (balance["charged"], balance["held"], balance["available"]) == (0, 0, 100)


def test_a_cost_reported_for_a_job_estimated_free_is_spend(api: httpx.Client) -> None:
    """A price of 0 (a prices-file override, a self-hosted engine) holds nothing; a provider that
    bills all the same is charged, not dropped."""
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, engine="fake-free", tags={"cost": "5"})["id"])
    assert job["status"] == "succeeded", job
    assert job["cost"]["estimated"] == 0 and job["cost"]["charged"] == 5
    entries = ledger(api, project_id)
    assert kinds(entries) == {"capture": 1} and entries[0]["amount"] == 5
    assert budget(api, project_id)["charged"] == 5
    free = wait_for_job(api, promote_ok(api, asset_id, engine="fake-free", seed=3)["id"])
    assert free["status"] == "succeeded" and free["cost"]["charged"] == 0
    assert len(ledger(api, project_id)) == 1


def test_a_source_image_that_cannot_be_read_releases_the_hold(api: httpx.Client, paid_settings: Settings,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Damaged on disk after the promote read it, while the job waited: the job fails before
    anything is sent, so the provider charged nothing (it was once captured as an unknown charge)."""
    project_id = create_project(api, {"limit": 100, "period": "month"})
    asset_id = make_draft(api, project_id, seed=424242)  # bytes no other test's draft shares
    sha = get_json(api, f"/v1/assets/{asset_id}")["sha256"]
    path = ArtifactStore(paid_settings.assets_dir).path_for(sha)
    read = ArtifactStore.get

    def read_then_damage(store: ArtifactStore, wanted: str) -> bytes:
        data = read(store, wanted)
        if wanted == sha:  # the promote's check has its bytes; the job will not
            path.chmod(0o644)
            path.write_bytes(b"not a png")
        return data

    monkeypatch.setattr(ArtifactStore, "get", read_then_damage)
    job = wait_for_job(api, promote_ok(api, asset_id)["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "content_unavailable", job
    assert "the source image" in job["error"]["message"] and "could not be read" in job["error"]["message"]
    assert job["cost"] == {"estimated": PRICE, "held": 0, "charged": 0, "cache_hit": False, "engines": [
        {"engine": "fake-paid", "estimated": PRICE, "held": 0, "charged": 0, "released": PRICE}]}
    entries = ledger(api, project_id)
    assert kinds(entries) == {"hold": 1, "release": 1}
    assert_settled_once(entries)


def test_timeout_captures_the_estimate_unreconciled(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, tags={"fake": "timeout"})["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "timeout"
    assert job["cost"]["held"] == 0 and job["cost"]["charged"] == PRICE

    entries = ledger(api, project_id)
    assert kinds(entries) == {"hold": 1, "capture": 1}
    capture = next(e for e in entries if e["kind"] == "capture")
    assert capture["amount"] == PRICE and capture["unreconciled"] and not capture["over_hold"]
    assert_settled_once(entries)
    balance = budget(api, project_id)
    assert (balance["charged"], balance["held"], balance["available"]) == (PRICE, 0, 100 - PRICE)

    report = get_json(api, "/v1/spend", group_by="engine", project_id=project_id)
    assert report["groups"] == [{"key": "fake-paid", "charged": PRICE, "unreconciled": PRICE,
                                 "unreconciled_entries": 1, "jobs": 1, "images": 0}]
    assert report["total"] == PRICE


def test_an_outcome_unknown_with_a_ceiling_captures_at_most_that(api: httpx.Client) -> None:
    # A multi-call job that failed before asking for all its images: the rest were never billed.
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = wait_for_job(api, promote_ok(api, asset_id, tags={"fake": "timeout-at-most"})["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert job["cost"]["held"] == 0 and job["cost"]["charged"] == 4

    entries = ledger(api, project_id)
    assert kinds(entries) == {"hold": 1, "capture": 1, "release": 1}
    capture = next(e for e in entries if e["kind"] == "capture")
    assert capture["amount"] == 4 and capture["unreconciled"]  # still for a person to check
    assert next(e for e in entries if e["kind"] == "release")["amount"] == PRICE - 4
    assert_settled_once(entries)
    assert budget(api, project_id)["available"] == 100 - 4


def test_cancel_a_running_paid_job_settles_its_hold(api: httpx.Client) -> None:
    """Canceling while the provider works (`CancelToken.race`, charged "unknown"): the estimate is
    captured and flagged unreconciled (`Ledger.settle_failure`); nothing stays held."""
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job_id = promote_ok(api, asset_id, tags={"fake": "hang"})["id"]

    seen: list[str] = []
    with api.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30.0) as stream:
        assert stream.status_code == 200
        for event in iter_sse(stream):
            seen.append(event.event)
            if event.event == "state" and event.data.get("state") == "submitted":
                # While the provider works the hold is open, and counts as held.
                assert [e["settled"] for e in ledger(api, project_id)] == [False]
                assert budget(api, project_id)["held"] == PRICE
                response = api.post(f"/v1/jobs/{job_id}/cancel")  # the provider call is in flight
                assert response.status_code == 202, response.text
            if event.event in TERMINAL:
                break
    assert seen[-1] == "canceled", seen

    job = wait_for_job(api, job_id)
    assert job["status"] == "canceled"
    assert job["error"]["code"] == "canceled"
    assert job["cost"]["held"] == 0 and job["cost"]["charged"] == PRICE

    entries = ledger(api, project_id)
    assert kinds(entries) == {"hold": 1, "capture": 1}
    capture = next(e for e in entries if e["kind"] == "capture")
    assert capture["unreconciled"] and capture["amount"] == PRICE
    assert_settled_once(entries)
    assert budget(api, project_id)["held"] == 0
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["error"]["code"] == "job_finished"


@pytest.mark.parametrize(("errno", "said"), [
    (28, "OSError: No space left on device (the data dir has no room for them: its operator must make some)"),
    # Once told as a full disk too.
    (30, "OSError: Read-only file system (the data dir is read-only: its operator must make it writable)"),
    # A restore or a copy that left another owner or mode on the assets folder, or on one of its
    # shards (the start looks at the top folder only): told as the engine's `engine_error`.
    (13, "PermissionError: Permission denied (the data dir cannot be written by the service, its owner or "
         "mode: its operator must fix it)"),
    (1, "PermissionError: Operation not permitted (the data dir cannot be written by the service, its owner or "
        "mode: its operator must fix it)"),
])
def test_images_made_but_not_stored_are_charged(api: httpx.Client, monkeypatch: pytest.MonkeyPatch,
                                                errno: int, said: str) -> None:
    """The provider made (and billed) the image; a full disk must not turn that into a free job."""
    project_id, asset_id = project_with_draft(api)

    def disk_full(self: object, data: bytes) -> Put:
        raise OSError(errno, said.split(": ", 1)[1].split(" (")[0], "/srv/orchestrator/assets/ab/tmp-1")

    monkeypatch.setattr("orchestrator.store.ArtifactStore.put_file", disk_full)
    job = promote_ok(api, asset_id, engine="fake-paid")
    done = wait_for_job(api, job["id"])
    assert done["status"] == "failed"
    # The server's paths stay in its log.
    assert done["error"]["message"] == f"the images were made but could not be stored: {said}"
    assert done["error"]["code"] == "storage_full"  # the operator's, not the engine's ("engine_error")
    entries = [e for e in ledger(api, project_id) if e["job_id"] == job["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == [
        ("hold", 10.0, False), ("capture", 10.0, False)]
    assert budget(api, project_id)["held"] == 0


Entries = list[tuple[str, float, bool]]


@pytest.mark.parametrize(("tags", "status", "settled"), [
    ({}, "succeeded", [("hold", 0, False), ("capture", 0, False)]),
    ({"cost": "7"}, "succeeded", [("hold", 0, False), ("capture", 7, False)]),  # billed all the same
    ({"fake": "filtered"}, "failed", [("hold", 0, False), ("release", 0, False)]),  # surely nothing billed
    ({"fake": "timeout"}, "failed", [("hold", 0, False), ("capture", 0, True)]),  # sent, no answer
    ({"fake": "short"}, "failed", [("hold", 0, False), ("capture", 0, True)]),  # an image missing
])
def test_a_cloud_engine_priced_at_0_is_settled_as_a_paid_one(
        api: httpx.Client, tags: dict[str, str], status: str, settled: Entries) -> None:
    """Its provider may bill whatever the prices file says: a hold of 0 lets an outcome nobody knows
    be captured and flagged, for the invoice to settle, where nothing at all was written before."""
    project_id, asset_id = project_with_draft(api)
    job = wait_for_job(api, promote_ok(api, asset_id, engine="fake-zero", tags=tags)["id"])
    assert job["status"] == status, job
    entries = [e for e in ledger(api, project_id) if e["job_id"] == job["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == settled
    assert_settled_once(entries)
    if not settled[-1][2]:
        return
    waiting = get_json(api, f"/v1/projects/{project_id}/ledger", unreconciled="true")["items"]
    assert [e["job_id"] for e in waiting] == [job["id"]]
    # A dashboard sees it waiting, though its credits read 0.
    [group] = get_json(api, "/v1/spend", group_by="engine", project_id=project_id)["groups"]
    assert (group["unreconciled"], group["unreconciled_entries"]) == (0, 1)
    reconciled = api.post(f"/v1/projects/{project_id}/ledger/{waiting[0]['id']}/reconcile", json={"charged": 4})
    assert reconciled.status_code == 201, reconciled.text
    assert budget(api, project_id)["charged"] == 4
    [group] = get_json(api, "/v1/spend", group_by="engine", project_id=project_id)["groups"]
    assert (group["charged"], group["unreconciled_entries"]) == (4, 0)


def test_a_free_self_hosted_engine_holds_nothing(api: httpx.Client) -> None:
    """A self-hosted server bills nobody: its jobs write no ledger entry, whatever their outcome."""
    project_id, asset_id = project_with_draft(api)
    for tags in ({}, {"fake": "timeout"}):
        wait_for_job(api, promote_ok(api, asset_id, engine="fake-free", tags=tags)["id"])
    assert ledger(api, project_id) == []


# Priced, the provider's figure is captured from the hold; estimated free (nothing held), it is
# charged all the same, as on a success.
REPORTED_7_5 = pytest.mark.parametrize(("engine", "settled"), [
    ("fake-paid", [("hold", PRICE, False), ("capture", 7.5, False), ("release", 2.5, False)]),
    ("fake-free", [("capture", 7.5, False)]),
])


@REPORTED_7_5
def test_images_not_stored_are_charged_what_the_provider_reported(
        api: httpx.Client, monkeypatch: pytest.MonkeyPatch, engine: str, settled: Entries) -> None:
    """The provider said what it charged before the disk filled up: that, not the estimate, is the bill."""
    project_id, asset_id = project_with_draft(api)

    def disk_full(self: object, data: bytes) -> Put:
        raise OSError(28, "No space left on device", "/srv/orchestrator/assets/ab/tmp-1")

    monkeypatch.setattr("orchestrator.store.ArtifactStore.put_file", disk_full)
    job = promote_ok(api, asset_id, engine=engine, tags={"cost": "7.5"})
    done = wait_for_job(api, job["id"])
    assert done["status"] == "failed"
    entries = [e for e in ledger(api, project_id) if e["job_id"] == job["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == settled
    if engine == "fake-paid":
        assert_settled_once(entries)  # the hold's capture and release name it, and it is marked settled
    assert done["cost"]["charged"] == 7.5


@REPORTED_7_5
def test_an_answer_short_of_an_image_is_charged_what_the_provider_reported(
        api: httpx.Client, engine: str, settled: Entries) -> None:
    """The provider answered without the image asked for and said what it charged: that is the
    bill, known (the estimate was captured "outcome unknown", left to reconcile)."""
    project_id, asset_id = project_with_draft(api)
    done = wait_for_job(api, promote_ok(api, asset_id, engine=engine, tags={"fake": "short", "cost": "7.5"})["id"])
    assert done["status"] == "failed" and "returned 0 of 1 images" in done["error"]["message"]
    entries = [e for e in ledger(api, project_id) if e["job_id"] == done["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == settled
    if engine == "fake-paid":
        assert_settled_once(entries)
    assert done["cost"]["charged"] == 7.5


@REPORTED_7_5
def test_a_cancel_after_the_engine_finished_charges_what_the_provider_reported(
        api: httpx.Client, monkeypatch: pytest.MonkeyPatch, engine: str, settled: Entries) -> None:
    """A cancel that lands while the images are being stored wins (answered 202), but the provider
    already made and billed them: its reported cost is captured."""
    project_id, asset_id = project_with_draft(api)
    real_put = ArtifactStore.put_file
    asked: list[int] = []

    def cancel_then_put(self: ArtifactStore, data: bytes) -> Put:
        if not asked:
            asked.append(1)
            running = get_json(api, "/v1/jobs", project_id=project_id, status="running")["items"]
            assert api.post(f"/v1/jobs/{running[0]['id']}/cancel").status_code == 202
        return real_put(self, data)

    monkeypatch.setattr(ArtifactStore, "put_file", cancel_then_put)
    job = promote_ok(api, asset_id, engine=engine, tags={"cost": "7.5"})
    done = wait_for_job(api, job["id"])
    assert done["status"] == "canceled" and asked
    entries = [e for e in ledger(api, project_id) if e["job_id"] == job["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == settled


def end_while_storing(api: httpx.Client, monkeypatch: pytest.MonkeyPatch, project_id: str, end: str) -> None:
    """Make the project's running job meet `end` as its images are stored: a full disk, or a cancel."""
    real_put = ArtifactStore.put_file

    def put(self: ArtifactStore, data: bytes) -> Put:
        if end == "disk full":
            raise OSError(28, "No space left on device", "/srv/orchestrator/assets/ab/tmp-1")
        running = get_json(api, "/v1/jobs", project_id=project_id, status="running")["items"]
        if running:
            assert api.post(f"/v1/jobs/{running[0]['id']}/cancel").status_code == 202
        return real_put(self, data)

    monkeypatch.setattr(ArtifactStore, "put_file", put)


@pytest.mark.parametrize(("end", "status", "code"), [("disk full", "failed", "storage_full"),
                                                 ("cancel", "canceled", "canceled")])
def test_a_cost_reported_unreadably_is_flagged_however_the_made_job_ends(
        api: httpx.Client, monkeypatch: pytest.MonkeyPatch, end: str, status: str, code: str) -> None:
    """Made and billed, with a usage block that could not be read: the estimate captured waits for
    the invoice, as on a success. Ended by a full disk or by a cancel while its images were stored,
    it was captured as a known bill, and nobody was asked to check it."""
    project_id, asset_id = project_with_draft(api)
    end_while_storing(api, monkeypatch, project_id, end)
    done = wait_for_job(api, promote_ok(api, asset_id, engine="fake-paid", tags={"fake": "unreadable-usage"})["id"])
    assert (done["status"], done["error"]["code"]) == (status, code)
    entries = [e for e in ledger(api, project_id) if e["job_id"] == done["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == [
        ("hold", PRICE, False), ("capture", PRICE, True)]
    assert entries[1]["note"] == f"{code}: usage unreadable"
    flagged = get_json(api, f"/v1/projects/{project_id}/ledger", unreconciled="true")["items"]
    assert [e["id"] for e in flagged] == [entries[1]["id"]]


def stop_while_storing(monkeypatch: pytest.MonkeyPatch, then: Callable[[Claim], None] = lambda _claim: None) -> None:
    """Make the runner's `_succeed` meet a graceful stop as `Scheduler.stop` makes it (the engine
    has returned; the images are not stored yet), for jobs tagged `stop`; `then` runs after it."""
    real = JobRunner._succeed

    def stopped(self: JobRunner, claim: Claim, result: RenderResult, seconds: float) -> list[str]:
        if claim.job.params["tags"].get("stop"):
            claim.shutdown = True
            claim.cancel.cancel(abandon=True)
            then(claim)
        return real(self, claim, result, seconds)

    monkeypatch.setattr(JobRunner, "_succeed", stopped)


def test_a_stop_after_the_engine_finished_keeps_the_paid_result(api: httpx.Client,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The images are made and paid for: a stop stores them instead of leaving the job to recovery,
    which could only fail it `interrupted` and charge the estimate."""
    project_id, asset_id = project_with_draft(api)
    stop_while_storing(monkeypatch)
    job = promote_ok(api, asset_id, tags={"cost": "7.5", "stop": "1"})
    done = wait_for_job(api, job["id"], timeout=10)
    assert done["status"] == "succeeded" and len(done["assets"]) == 1
    entries = [e for e in ledger(api, project_id) if e["job_id"] == job["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == [
        ("hold", PRICE, False), ("capture", 7.5, False), ("release", 2.5, False)]


def test_a_users_cancel_during_a_stop_still_wins(api: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop lets `_succeed` go on, but a user's cancel (in the row's `cancel_requested_at`) still
    ends the job canceled, at once and charged what the provider reported, with the image it paid
    for kept."""
    project_id, asset_id = project_with_draft(api)

    def user_cancels(claim: Claim) -> None:
        assert api.post(f"/v1/jobs/{claim.job.id}/cancel").status_code == 202

    stop_while_storing(monkeypatch, user_cancels)
    job = promote_ok(api, asset_id, tags={"cost": "7.5", "stop": "1"})
    done = wait_for_job(api, job["id"], timeout=10)
    assert done["status"] == "canceled" and len(done["assets"]) == 1
    assert api.get(f"/v1/assets/{done['assets'][0]}/content").status_code == 200
    entries = [e for e in ledger(api, project_id) if e["job_id"] == job["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == [
        ("hold", PRICE, False), ("capture", 7.5, False), ("release", 2.5, False)]


def test_a_result_that_comes_after_the_service_closed_is_left_to_recovery(api: httpx.Client,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop waits for its jobs a while, then closes the runner (its PNG encoders): an engine that
    returns later is not stored here, and the job is left `running` for the next start to recover
    (where a failed 'could not be stored' would have charged it as a finished job)."""
    project_id, asset_id = project_with_draft(api)
    real = JobRunner._succeed
    done = threading.Event()

    def too_late(self: JobRunner, claim: Claim, result: RenderResult, seconds: float) -> list[str]:
        if not claim.job.params["tags"].get("stop"):
            return real(self, claim, result, seconds)
        claim.shutdown = True
        claim.cancel.cancel(abandon=True)
        self._closed = True  # the stop stopped waiting
        return real(self, claim, result, seconds)

    real_run = JobRunner.run

    async def run_then_reopen(self: JobRunner, claim: Claim) -> None:
        try:
            await real_run(self, claim)
        finally:
            if claim.job.params["tags"].get("stop"):
                self._closed = False  # the fixture's service runs on
                done.set()

    monkeypatch.setattr(JobRunner, "_succeed", too_late)
    monkeypatch.setattr(JobRunner, "run", run_then_reopen)
    job = promote_ok(api, asset_id, tags={"cost": "7.5", "stop": "1"})
    assert done.wait(10)
    left = wait_for_job(api, job["id"], ("running",), timeout=10)
    assert left["assets"] == [] and left["error"] is None
    entries = [e for e in ledger(api, project_id) if e["job_id"] == job["id"]]
    assert [e["kind"] for e in entries] == ["hold"]  # settled by the recovery, not here


def test_a_job_s_end_waits_out_a_lost_database_connection(api: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL restart as a paid job finishes must not turn a billed render into a failure."""
    from sqlalchemy.exc import OperationalError

    project_id, asset_id = project_with_draft(api)
    real = JobRunner._succeed_in
    lost: list[str] = []

    def once_disconnected(self: JobRunner, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)  # the job's row updated, its assets added and flushed, the charge written...
        if not lost:  # ...and then the connection goes: all of it rolls back, and is written again
            lost.append("lost")
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"),
                                   connection_invalidated=True)

    monkeypatch.setattr(JobRunner, "_succeed_in", once_disconnected)
    job = promote_ok(api, asset_id, engine="fake-paid")
    done = wait_for_job(api, job["id"])
    assert lost == ["lost"] and done["status"] == "succeeded" and len(done["assets"]) == 1
    entries = [e for e in ledger(api, project_id) if e["job_id"] == job["id"]]
    assert [(e["kind"], e["amount"]) for e in entries] == [("hold", 10.0), ("capture", 10.0)]


def saved_work(settings: Settings, job_id: str) -> tuple[str | None, Any]:
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        request_id, work = db.execute("SELECT provider_request_id, provider_work FROM jobs WHERE id = ?",
                                      (job_id,)).fetchone()
    return request_id, None if work is None else json.loads(work)


def test_saving_the_provider_s_work_never_stalls_the_event_loop(api: httpx.Client, paid_settings: Settings,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The save waits for the database's write lock (another process writing, a slow disk): the
    # process's other jobs and streams must go on meanwhile, and the save still lands.
    _, asset_id = project_with_draft(api)
    waiting, release = held_saves(monkeypatch)
    job = promote_ok(api, asset_id, tags={"fake": "slow", "seconds": "0.2"})
    try:
        assert waiting.wait(10)
        assert api.get("/healthz", timeout=5).status_code == 200  # the loop answers while the save waits
    finally:
        release.set()
    assert wait_for_job(api, job["id"])["status"] == "succeeded"
    request_id, work = saved_work(paid_settings, job["id"])
    assert request_id is not None and request_id.startswith("fake-") and work["handles"][0]["id"] == request_id


def test_a_job_that_succeeds_before_its_provider_work_is_saved_keeps_that_work(
        api: httpx.Client, paid_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # The save, behind the event loop, lands after the success: it updates only a running job, so
    # the success itself writes what the provider accepted (its record for reconciliation).
    _, asset_id = project_with_draft(api)
    waiting, release = held_saves(monkeypatch)
    job = promote_ok(api, asset_id, tags={"fake": "slow", "seconds": "0.05"})
    try:
        assert waiting.wait(10)
        assert wait_for_job(api, job["id"])["status"] == "succeeded"
    finally:
        release.set()
    request_id, work = saved_work(paid_settings, job["id"])
    assert request_id is not None and request_id.startswith("fake-")
    assert work is not None and work["handles"][0]["id"] == request_id


def test_a_request_that_can_bill_waits_for_the_work_accepted_before_it_to_be_saved(
        api: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # A self-hosted server's task id is saved before its render is sent, so that a restart can take
    # the render off the server: the save is off the event loop, and the send waits for it.
    _, asset_id = project_with_draft(api)
    waiting, release = held_saves(monkeypatch)
    prompt = "a lighthouse, saved before its second call"
    job = promote_ok(api, asset_id, prompt=prompt, tags={"fake": "second-call"})
    try:
        assert waiting.wait(10)
        assert api.get("/healthz", timeout=5).status_code == 200  # the loop is free meanwhile
        assert f"{prompt} (second call)" not in fakes.SENT
    finally:
        release.set()
    assert wait_for_job(api, job["id"])["status"] == "succeeded"
    assert f"{prompt} (second call)" in fakes.SENT


def test_a_cancel_ends_the_wait_for_a_save_and_sends_nothing_more(
        api: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call is out (and billed): the job's hold is captured for reconciliation. The
    waiting second call's own "nothing was sent" released it, and the first call was paid by no one."""
    project_id, asset_id = project_with_draft(api)
    waiting, release = held_saves(monkeypatch)  # a database that stays away
    prompt = "a lighthouse, canceled while its first call's id is being saved"
    job = promote_ok(api, asset_id, prompt=prompt, tags={"fake": "second-call"})
    try:
        assert waiting.wait(10)
        assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        done = wait_for_job(api, job["id"], timeout=10)  # not the save's wait
        assert done["status"] == "canceled", done
        assert prompt in fakes.SENT and f"{prompt} (second call)" not in fakes.SENT
    finally:
        release.set()
    settled = [(e["kind"], e["unreconciled"]) for e in ledger(api, project_id)
               if e["job_id"] == job["id"] and e["kind"] != "hold"]
    assert settled == [("capture", True)], settled


def test_a_cancel_before_a_plugin_s_second_paid_call_captures_the_first(
        api: httpx.Client, tmp_path: Path) -> None:
    """Two paid calls reporting no provider id, canceled before the second: the engine's own check
    said "nothing was sent" of the second, and the hold the first ran up was released."""
    project_id, asset_id = project_with_draft(api)
    until = tmp_path / "second-call-ready"
    prompt = "a lighthouse, canceled between two paid calls"
    job = promote_ok(api, asset_id, prompt=prompt, tags={"fake": "second-call-no-id", "until": str(until)})
    poll(lambda: list(fakes.SENT), lambda sent: prompt in sent, what="the first call sent")
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    until.write_text("")
    assert wait_for_job(api, job["id"])["status"] == "canceled"
    assert f"{prompt} (second call)" not in fakes.SENT
    settled = [(e["kind"], e["unreconciled"]) for e in ledger(api, project_id)
               if e["job_id"] == job["id"] and e["kind"] != "hold"]
    assert settled == [("capture", True)], settled


def test_a_failed_save_of_the_provider_s_work_is_written_with_the_job_s_end(
        api: httpx.Client, paid_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    project_id, asset_id = project_with_draft(api)

    def locked(self: JobRunner, claim: Claim, work: dict[str, Any]) -> None:
        raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))

    monkeypatch.setattr(JobRunner, "save_provider_request", locked)
    job = promote_ok(api, asset_id, tags={"fake": "timeout"})  # accepted, then no answer
    done = wait_for_job(api, job["id"])
    # The render went on (no SQL in its error): it failed as the provider's timeout, billed unknown.
    assert done["status"] == "failed" and done["error"]["code"] == "timeout", done["error"]
    request_id, work = saved_work(paid_settings, job["id"])
    assert request_id is not None and work["handles"] == [{"queue": "https://fake.test/requests", "id": request_id}]
    capture = next(e for e in ledger(api, project_id) if e["job_id"] == job["id"] and e["kind"] == "capture")
    assert capture["unreconciled"]


def lease_of(settings: Settings, job_id: str) -> str:
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        lease: str = db.execute("SELECT lease_expires_at FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    return lease


def test_a_stop_waits_for_a_job_storing_what_it_made(paid_settings_for: Callable[..., Settings], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # The provider made (and billed) the image; the stop came while it was being stored. Leaving
    # then would let another process recover the job as an orphan and discard what was paid for.
    monkeypatch.setattr("orchestrator.queue.STOP_WAIT_SECONDS", 0.1)
    real = JobRunner._store_png
    storing, release = threading.Event(), threading.Event()

    def slow(self: JobRunner, *args: Any, **kwargs: Any) -> Any:
        storing.set()
        release.wait(30)  # a slow disk, a large image
        return real(self, *args, **kwargs)

    settings = paid_settings_for(tmp_path / "data", lease_seconds=0.6)
    service = serve_in_thread(settings)
    with httpx.Client(base_url=service.__enter__(), timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        monkeypatch.setattr(JobRunner, "_store_png", slow)
        job_id = promote_ok(client, asset_id, engine="fake-paid")["id"]
        assert storing.wait(30)
    stopper = threading.Thread(target=service.__exit__, args=(None, None, None))
    caplog.set_level(logging.INFO, logger="orchestrator.queue")
    stopper.start()
    try:
        poll(lambda: caplog.text, lambda text: "waiting for 1 jobs to store their images" in text,
             what="the stop to wait for the storing job")
        assert len(Presence(settings.data_dir / "locks", shared_database=False).live()) == 1  # still its
        # ...and the job's lease is still renewed: otherwise another process recovers it meanwhile.
        first = lease_of(settings, job_id)
        poll(lambda: lease_of(settings, job_id), lambda lease: lease > first, what="the lease to be renewed")
    finally:
        release.set()
        stopper.join(60)
    monkeypatch.setattr(JobRunner, "_store_png", real)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = client.get(f"/v1/jobs/{job_id}").json()
        assert done["status"] == "succeeded" and len(done["assets"]) == 1, done
        assert [e["kind"] for e in ledger(client, project_id) if e["job_id"] == job_id] == ["hold", "capture"]


def test_a_local_job_whose_end_could_not_be_written_runs_again(paid_settings_for: Callable[..., Settings],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The database stayed away through the whole final write: a local draft is made again, not
    # failed as "made but could not be stored" for good.
    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr("orchestrator.runner.FINAL_WRITE_SECONDS", 0.2)
    real = JobRunner._succeed_in
    failed: list[str] = []

    def away_once(self: JobRunner, s: Any, claim: Claim, *args: Any, **kwargs: Any) -> None:
        if claim.attempt == 1:  # every try of the first attempt's final write
            failed.append("away")
            raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
        real(self, s, claim, *args, **kwargs)

    monkeypatch.setattr(JobRunner, "_succeed_in", away_once)
    with serve_in_thread(paid_settings_for(tmp_path / "data", lease_seconds=0.5, sweep_interval=0.1)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        project_id = create_project(client)
        job = client.post(f"/v1/projects/{project_id}/drafts", json={"prompt": "a lighthouse", "n": 1, "width": 64,
                                                                       "height": 64, "steps": 1})
        done = wait_for_job(client, job.json()["id"])
    assert failed and set(failed) == {"away"}
    assert done["status"] == "succeeded", done
    assert [a["status"] for a in done["attempts"]] == ["interrupted", "succeeded"]


@pytest.mark.parametrize("end", ["disk full", "cancel"])
def test_a_reported_cost_beside_an_unread_note_is_a_known_bill_however_the_made_job_ends(
        api: httpx.Client, monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    """A plugin's result may name a cost and say some usage was unread: a success captures that
    cost as a known bill, and so must a job ended by a full disk or a cancel while its images
    were stored (they flagged it for reconciliation, as if no cost had been reported)."""
    project_id, asset_id = project_with_draft(api)
    end_while_storing(api, monkeypatch, project_id, end)
    done = wait_for_job(api, promote_ok(api, asset_id, engine="fake-paid",
                                        tags={"fake": "unreadable-usage", "cost": "7.5"})["id"])
    assert done["status"] == ("failed" if end == "disk full" else "canceled")
    entries = [e for e in ledger(api, project_id) if e["job_id"] == done["id"]]
    assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries] == [
        ("hold", PRICE, False), ("capture", 7.5, False), ("release", PRICE - 7.5, False)]
