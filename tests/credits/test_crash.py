"""A paid call in flight when the server process dies: start-up recovery settles it exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from orchestrator.db import Database
from orchestrator.ids import new_id
from orchestrator.ledger import Ledger
from orchestrator.models import Job, JobStatus, LedgerEntry, Project
from orchestrator.server import AnswerWhenStopped, serve_in_thread
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.credits import (
    PRICE,
    assert_settled_once,
    budget,
    iter_sse,
    kinds,
    ledger,
    poll,
    project_with_draft,
    promote_ok,
    wait_for_job,
    wait_for_state,
)
from tests.credits.conftest import POLICY, Service
from tests.fakes import SENT, WITHDRAWN


def test_kill_with_a_paid_call_in_flight(service_env: dict[str, str], tmp_path: Path,
                                         paid_settings_for: Callable[..., Settings],
                                         services: list[Service]) -> None:
    # The draft is made in this process, where torch is already imported: a child process would
    # spend most of this test importing it. Same data dir, so the child finds the asset.
    settings = paid_settings_for(Path(service_env["ORCH_DATA_DIR"]))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "month"})

    services.append(Service(service_env, tmp_path, tmp_path / "first.log"))
    with httpx.Client(base_url=services[0].url, timeout=30.0) as client:
        job_id = promote_ok(client, asset_id, tags={"fake": "hang"})["id"]
        wait_for_state(client, job_id)
        running = client.get(f"/v1/jobs/{job_id}").json()
        assert running["status"] == "running"
        assert running["cost"]["held"] == PRICE
    services[0].kill()

    # Restarted in this process: what is tested is the start's recovery, which calls no engine (a
    # second child took 10-15 s of this test on a loaded 2-core machine, most of it imports).
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "interrupted"
        assert job["error"]["details"]["engine"] == "fake-paid"
        assert job["cost"]["held"] == 0 and job["cost"]["charged"] == PRICE

        entries = ledger(client, project_id)
        assert kinds(entries) == {"hold": 1, "capture": 1}
        capture = next(e for e in entries if e["kind"] == "capture")
        assert capture["unreconciled"] and capture["amount"] == PRICE
        assert_settled_once(entries)
        balance = budget(client, project_id)
        assert (balance["held"], balance["charged"], balance["available"]) == (0, PRICE, 100 - PRICE)


def test_kill_with_accepted_provider_work_reattaches_to_it(service_env: dict[str, str], tmp_path: Path,
                                                           paid_settings_for: Callable[..., Settings],
                                                           services: list[Service]) -> None:
    """The provider had accepted the job (its request id and handle saved) when the process died:
    the next start follows that work instead of writing it off, and charges what it cost."""
    settings = paid_settings_for(Path(service_env["ORCH_DATA_DIR"]))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "month"})

    services.append(Service(service_env, tmp_path, tmp_path / "first.log"))
    with httpx.Client(base_url=services[0].url, timeout=30.0) as client:
        job_id = promote_ok(client, asset_id, engine="fake-queue", tags={"fake": "hang"})["id"]
        wait_for_state(client, job_id)
    services[0].kill()

    # Restarted in this process, as for the paid call above: the fake provider keeps no state that
    # the killed child held (its reattach answers from the saved handle alone).
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        job = wait_for_job(client, job_id)
        assert job["status"] == "succeeded", job
        assert job["cost"] == {"estimated": PRICE, "held": 0, "charged": 7, "cache_hit": False, "engines": [
            {"engine": "fake-queue", "estimated": PRICE, "held": 0, "charged": 7, "released": PRICE - 7}]}
        assert [a["status"] for a in job["attempts"]] == ["interrupted", "succeeded"]
        assert len(job["assets"]) == 1
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            states = [e.data.get("state") for e in iter_sse(stream) if e.event == "state"]
        assert "reattached" in states
        entries = ledger(client, project_id)
        assert kinds(entries) == {"hold": 1, "capture": 1, "release": 1}
        assert not any(e["unreconciled"] for e in entries)
        assert_settled_once(entries)


def test_reattaching_to_work_the_provider_lost_is_charged_unreconciled(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    # A graceful stop leaves a job whose provider call is in flight to recovery, like a crash.
    settings = paid_settings_for(tmp_path / "data")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, engine="fake-queue", tags={"fake": "hang", "reattach": "gone"})
        wait_for_state(client, job["id"])
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "engine_error", done
        assert done["engine"] == "fake-queue"  # never sent to another engine
        assert done["cost"]["charged"] == PRICE and done["cost"]["held"] == 0
        entries = [e for e in ledger(client, project_id) if e["job_id"] == job["id"]]
        assert [(e["kind"], e["unreconciled"]) for e in entries] == [("hold", False), ("capture", True)]


@pytest.mark.parametrize(("outcome", "captured"), [("aborted", False), ("polls-timed-out", True)])
def test_work_followed_after_a_restart_is_released_only_when_the_provider_says_it_billed_nothing(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, outcome: str, captured: bool) -> None:
    """Followed by the next start, a prediction Replicate aborted before it ran (a request fal took
    off its queue, a cancel before it started) was captured "outcome unknown", where the same
    answer without the restart released it. A poll's own "nothing billed" says nothing of the work."""
    settings = paid_settings_for(tmp_path / "data")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, engine="fake-queue", tags={"fake": "hang", "reattach": outcome})
        wait_for_state(client, job["id"])
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"])
        assert done["status"] == "failed", done
        entries = [e for e in ledger(client, project_id) if e["job_id"] == job["id"]]
        assert [e["kind"] for e in entries] == ["hold", "capture" if captured else "release"], entries
        assert done["cost"]["charged"] == (PRICE if captured else 0) and done["cost"]["held"] == 0


def test_a_stop_before_anything_was_sent_queues_the_paid_job_again(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    # The fake engine is waiting before it sends (as a rate-limit backoff does). Start-up recovery
    # would fail a remote job as possibly billed; the runner knows nothing left, so it re-queues.
    settings = paid_settings_for(tmp_path / "data")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, engine="fake-paid", tags={"fake": "wait-before-send", "seconds": "60"})
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), lambda j: j["status"] == "running")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        again = poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), lambda j: j["status"] == "running")
        assert again["error"] is None
        # The stopped attempt is listed, as a stop's, not a crash's.
        assert [(a["status"], a["error"]["details"]) for a in again["attempts"]] == [
            ("interrupted", {"engine": "fake-paid", "graceful": True, "started": True})]
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        done = wait_for_job(client, job["id"])
        assert done["status"] == "canceled"
        assert [(e["kind"], e["unreconciled"]) for e in ledger(client, project_id) if e["job_id"] == job["id"]] \
            == [("hold", False), ("release", False)]


def promoted_and_sent(client: httpx.Client) -> tuple[str, dict[str, Any]]:
    """(project id, job) of a paid promote whose request is out and whose engine then waits on its
    cancel token (a plugin polling with `cancel.sleep`: the token's own Canceled says "no", but the
    runner saw the request go out)."""
    project_id, asset_id = project_with_draft(client)
    sent = len(SENT)
    job = promote_ok(client, asset_id, engine="fake-paid", tags={"fake": "slow", "seconds": "60"})
    poll(lambda: len(SENT), lambda count: count > sent)
    return project_id, job


def test_a_stop_while_the_provider_works_is_not_sent_again(paid_settings_for: Callable[..., Settings],
                                                           tmp_path: Path) -> None:
    settings = paid_settings_for(tmp_path / "data")  # no grace for its answer: see test_stop.py
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        _project, job = promoted_and_sent(client)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "interrupted"
        assert done["cost"]["charged"] == 10.0  # captured for reconciliation, not released


def test_a_cancel_while_the_provider_works_is_charged_unknown(paid_settings_for: Callable[..., Settings],
                                                             tmp_path: Path) -> None:
    settings = paid_settings_for(tmp_path / "data")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, job = promoted_and_sent(client)
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        done = wait_for_job(client, job["id"])
        assert done["status"] == "canceled" and done["cost"]["charged"] == 10.0
        assert [(e["kind"], e["unreconciled"]) for e in ledger(client, project_id) if e["job_id"] == job["id"]] \
            == [("hold", False), ("capture", True)]


def test_a_cancel_just_before_a_stop_stays_a_cancel(paid_settings_for: Callable[..., Settings],
                                                    tmp_path: Path) -> None:
    settings = paid_settings_for(tmp_path / "data")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        _project, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, engine="fake-paid", tags={"fake": "slow", "seconds": "60"})
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), lambda j: j["status"] == "running")
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert wait_for_job(client, job["id"])["status"] == "canceled"


def test_canceling_a_job_waiting_to_reattach_charges_its_accepted_work(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """Queued again by recovery to follow work the provider accepted, the job is canceled before it
    runs: that work runs and bills on, so the hold is captured for reconciliation, not released."""
    services = Services.build(paid_settings_for(tmp_path / "data"))
    try:
        with services.db.transaction() as s:
            project = Project(id=new_id("prj"), name="reattach", policy=POLICY)
            s.add(project)
            s.flush()
            jobs = [Job(id=new_id("job"), project_id=project.id, stage="bridge", engine="fake-queue", model="fake-1",
                        params={"stage": "bridge", "prompt": "x", "n": 1}, estimated=10_000, status="queued",
                        provider_work=work) for work in ({"engine": "fake-queue", "handles": [{"id": "q-1"}]}, None)]
            s.add_all(jobs)
            s.flush()
            for job in jobs:
                services.ledger.hold(s, project, job, 10_000)
        for job in jobs:
            assert services.jobs.cancel_queued(job.id)
        with services.db.session() as s:
            settled = {e.job_id: (e.kind, e.unreconciled) for e in s.exec(select(LedgerEntry)).all()
                       if e.kind != "hold"}
        assert settled == {jobs[0].id: ("capture", True), jobs[1].id: ("release", False)}
    finally:
        asyncio.run(services.aclose())


def test_a_job_canceled_while_queued_to_be_reattached_has_its_work_withdrawn_at_the_provider(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """Charged for reconciliation (above), but left running: a fal request still in its queue ran,
    and billed, after the user's cancel."""
    settings = paid_settings_for(tmp_path / "data", run_jobs=False)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id = client.post("/v1/projects", json={"name": "withdraw", "policy": POLICY}).json()["id"]
        db = Database(settings.resolved_database_url)
        job_id = new_id("job")
        try:
            with db.transaction() as s:
                s.add(Job(id=job_id, project_id=project_id, stage="bridge", engine="fake-queue", model="fake-1",
                          params={"stage": "bridge", "prompt": "x", "n": 1}, estimated=10_000, status="queued",
                          provider_work={"engine": "fake-queue", "handles": [{"id": "q-7"}]}))
        finally:
            db.dispose()
        WITHDRAWN.clear()
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        assert poll(lambda: list(WITHDRAWN), bool, what="the withdrawal") == [[{"id": "q-7"}]]


@pytest.mark.parametrize("taken_off_the_queue", [True, False])
def test_withdrawn_work_the_provider_never_ran_is_reconciled_at_nothing(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, taken_off_the_queue: bool) -> None:
    """Its worker gone, the job is canceled and its estimate charged for reconciliation; the
    withdrawal then learns the provider took the request off its queue (fal's `OK`): that charge
    stayed, for work nobody billed, until a person reconciled it from the invoice."""
    check_withdrawn_work_reconciled(paid_settings_for(tmp_path / "data", run_jobs=False), taken_off_the_queue)


def check_withdrawn_work_reconciled(settings: Settings, taken_off_the_queue: bool) -> None:
    """A job queued to follow fake-queue's accepted work is canceled (see the test above); on a
    service that runs no jobs, so that nothing follows the work first."""
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id = client.post("/v1/projects", json={"name": "withdraw", "policy": POLICY,
                                                       "budget": {"limit": 100, "period": "month"}}).json()["id"]
        db = Database(settings.resolved_database_url)
        job_id = new_id("job")
        try:
            with db.transaction() as s:
                project = s.get(Project, project_id)
                assert project is not None
                job = Job(id=job_id, project_id=project_id, stage="bridge", engine="fake-queue", model="fake-1",
                          params={"stage": "bridge", "prompt": "x", "n": 1}, estimated=10_000, status="queued",
                          provider_work={"engine": "fake-queue",
                                         "handles": [{"id": "q-9", "queued": taken_off_the_queue}]})
                s.add(job)
                s.flush()
                Ledger().hold(s, project, job, 10_000)
        finally:
            db.dispose()
        WITHDRAWN.clear()
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        poll(lambda: list(WITHDRAWN), bool, what="the withdrawal")

        def entries() -> list[dict[str, Any]]:
            return [e for e in client.get(f"/v1/projects/{project_id}/ledger").json()["items"]
                    if e["kind"] != "hold"]

        if taken_off_the_queue:
            settled = poll(entries, lambda found: any(e["kind"] == "adjustment" for e in found),
                           what="the charge reconciled")
            capture = next(e for e in settled if e["kind"] == "capture")
            adjustment = next(e for e in settled if e["kind"] == "adjustment")
            assert capture["amount"] == 10 and capture["unreconciled"] is False
            assert adjustment["amount"] == -10 and "withdrawn before it ran" in adjustment["note"]
            assert client.get(f"/v1/jobs/{job_id}").json()["cost"]["charged"] == 0
            assert client.get(f"/v1/projects/{project_id}/budget").json()["charged"] == 0
        else:
            time.sleep(0.5)  # what the withdrawal would do, it does right after the provider's answer
            assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries()] == [("capture", 10, True)]
            assert client.get(f"/v1/jobs/{job_id}").json()["cost"]["charged"] == 10


def test_only_the_withdrawn_engine_s_charge_of_an_ended_job_is_reconciled_at_nothing(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """A job that fell back from fake-paid (which may have billed: captured for reconciliation) to
    fake-queue, whose request was then taken off the queue: only fake-queue's charge is nothing.
    A job that is not over (run again meanwhile), or that a later attempt ended, keeps its charges
    as they are: they are not the withdrawn attempt's."""
    services = Services.build(paid_settings_for(tmp_path / "data"))
    ends: list[tuple[JobStatus, int]] = [("canceled", 1), ("running", 1), ("canceled", 2)]
    try:
        with services.db.transaction() as s:
            project = Project(id=new_id("prj"), name="moved", policy=POLICY)
            s.add(project)
            s.flush()
            jobs = [Job(id=new_id("job"), project_id=project.id, stage="bridge", engine="fake-paid", model="fake-1",
                        params={"stage": "bridge", "prompt": "x", "n": 1}, estimated=10_000, status=status,
                        attempt=attempt) for status, attempt in ends]
            s.add_all(jobs)
            s.flush()
            for job in jobs:
                for engine in ("fake-paid", "fake-queue"):
                    job.engine = engine
                    services.ledger.hold(s, project, job, 10_000)
                    s.flush()
                    services.ledger.capture(s, job, None, unreconciled=True, note=f"{engine}: outcome unknown")
                    s.flush()
        jobs[2].attempt = 1  # the attempt whose work was withdrawn; the row is attempt 2's end
        for job in jobs:
            services.runner.void_withdrawn(job)
        with services.db.session() as s:
            entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.kind).in_(("capture", "adjustment")))).all()
            settled = {(e.job_id, e.engine, e.kind, e.amount, e.unreconciled) for e in entries}
        ended, running, ended_again = (job.id for job in jobs)
        assert settled == {(ended, "fake-paid", "capture", 10_000, True),
                           (ended, "fake-queue", "capture", 10_000, False),
                           (ended, "fake-queue", "adjustment", -10_000, False),
                           *{(job_id, engine, "capture", 10_000, True) for job_id in (running, ended_again)
                             for engine in ("fake-paid", "fake-queue")}}
    finally:
        asyncio.run(services.aclose())


async def test_a_withdrawal_begun_by_a_cancel_cut_off_at_a_stop_still_reconciles_its_charge(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """A cancel of a job queued to follow fake-queue's accepted work is cut off by a stop (answered
    503 `server_stopping`, its gate closed) after the cancel committed; its thread goes on to
    withdraw the work. The withdrawal, a task of the event loop, copied the request's context and so
    its closed gate: the provider's answer that nothing ran was rolled back, and the estimate stayed
    charged for a job canceled before it ran."""
    services = Services.build(paid_settings_for(tmp_path / "data", run_jobs=False))
    services.bus.bind(asyncio.get_running_loop())  # as the service does: the withdrawal runs on it
    try:
        with services.db.transaction() as s:
            project = Project(id=new_id("prj"), name="cut off", policy=POLICY)
            s.add(project)
            s.flush()
            job = Job(id=new_id("job"), project_id=project.id, stage="bridge", engine="fake-queue", model="fake-1",
                      params={"stage": "bridge", "prompt": "x", "n": 1}, estimated=10_000, status="queued",
                      provider_work={"engine": "fake-queue", "handles": [{"id": "q-cut", "queued": True}]})
            s.add(job)
            s.flush()
            services.ledger.hold(s, project, job, 10_000)
        sent: list[Message] = []
        waiting, go, done = threading.Event(), threading.Event(), threading.Event()

        def cancel() -> None:  # what `POST /v1/jobs/{id}/cancel` runs, cut off between its two steps
            try:
                assert services.jobs.cancel_queued(job.id)
                waiting.set()
                go.wait(10)
                services.scheduler.forget_abandoned(services.jobs.get(job.id))
            finally:
                done.set()

        async def route(scope: Scope, receive: Receive, send: Send) -> None:
            await run_in_threadpool(cancel)

        async def record(message: Message) -> None:
            sent.append(message)

        async def nothing() -> Message:
            return {"type": "http.disconnect"}

        request = asyncio.create_task(AnswerWhenStopped(route)(
            {"type": "http", "method": "POST", "path": f"/v1/jobs/{job.id}/cancel", "headers": []}, nothing, record))
        assert await asyncio.to_thread(waiting.wait, 10)
        request.cancel()
        await request
        assert sent[0]["status"] == 503
        WITHDRAWN.clear()
        go.set()
        assert await asyncio.to_thread(done.wait, 10)
        # The spawn was handed to the loop before `done`; on a busy machine the withdrawal may
        # even have ended by now, so wait for its effects rather than for its task.
        for _ in range(200):
            await asyncio.gather(*services.scheduler._forgetting)
            if WITHDRAWN and not services.scheduler._forgetting:
                break
            await asyncio.sleep(0.05)
        assert WITHDRAWN == [[{"id": "q-cut", "queued": True}]]
        with services.db.session() as s:
            entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job.id,
                                                       col(LedgerEntry.kind) != "hold")).all()
            settled = sorted((e.kind, e.amount, e.unreconciled) for e in entries)
        assert settled == [("adjustment", -10_000, False), ("capture", 10_000, False)]
    finally:
        await services.aclose()


def test_a_job_recovery_fails_with_work_out_has_that_work_withdrawn_and_an_odd_row_does_not_stop_the_start(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """Its worker died with work it could not follow (2 requests for a job the engine follows only
    whole): failed and charged for reconciliation, and its requests ran on for nobody. A row of an
    older release whose request cannot be rebuilt stopped the service from starting."""
    from orchestrator.clock import utcnow

    settings = paid_settings_for(tmp_path / "data")
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.resolved_database_url)
    db.migrate()
    project_id, unfollowable, odd = new_id("prj"), new_id("job"), new_id("job")
    try:
        with db.transaction() as s:
            s.add(Project(id=project_id, name="withdraw", policy=POLICY))
            s.flush()
            for job_id, params in ((unfollowable, {"stage": "bridge", "prompt": "x", "n": 1}),
                                   (odd, {"stage": "bridge"})):
                work = {"engine": "fake-queue", "handles": [{"id": f"{job_id}-a"}, {"id": f"{job_id}-b"}]}
                s.add(Job(id=job_id, project_id=project_id, stage="bridge", engine="fake-queue", model="fake-1",
                          params=params, estimated=10_000, status="running", attempt=1, lease_owner="dead-host:1:0",
                          started_at=utcnow(), provider_work=work))
    finally:
        db.dispose()
    WITHDRAWN.clear()
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        for job_id in (unfollowable, odd):
            assert wait_for_job(client, job_id)["status"] == "failed"
        withdrawn = poll(lambda: sorted(h["id"] for handles in WITHDRAWN for h in handles), lambda ids: len(ids) == 4,
                         what="the withdrawals")
    assert withdrawn == sorted(f"{job_id}-{part}" for job_id in (unfollowable, odd) for part in "ab")
