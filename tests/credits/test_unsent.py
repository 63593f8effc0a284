"""A paid attempt that stopped before its first request that can bill sent nothing: recovery runs
it again with its hold, instead of failing it `interrupted` and charging it for reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import update
from sqlmodel import col, select

from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.errors import Canceled, StaleAttempt
from orchestrator.ids import new_id
from orchestrator.models import Job, LedgerEntry, Project
from orchestrator.runner import Claim, JobProgress
from orchestrator.server import serve_in_thread
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests import fakes
from tests.credits import PRICE, ledger, poll, project_with_draft, promote_ok, wait_for_state
from tests.credits.conftest import POLICY, Service
from tiers.base import CancelToken, RenderedImage, RenderResult, billable_send

HOLD = int(PRICE * 1000)  # millicredits


@pytest.fixture
def built(paid_settings_for: Callable[..., Settings], tmp_path: Path) -> Iterator[Services]:
    services = Services.build(paid_settings_for(tmp_path / "data"))
    try:
        yield services
    finally:
        asyncio.run(services.aclose())


def left_running(services: Services, **rows: dict[str, Any]) -> dict[str, str]:
    """Jobs on `fake-paid` as a dead process left them (lease expired), each with its hold; `rows`
    maps a label to the columns that differ. Returns label -> job id."""
    ids = {label: new_id("job") for label in rows}
    with services.db.transaction() as s:
        project = Project(id=new_id("prj"), name="left running", policy=POLICY)
        s.add(project)
        s.flush()
        for label, values in rows.items():
            job = Job(id=ids[label], project_id=project.id, stage="bridge", engine="fake-paid", model="fake-1",
                      params={"stage": "bridge", "prompt": label, "n": 1}, estimated=HOLD,
                      **{"status": "running", "attempt": 1, "lease_owner": "dead-host:1:0",
                         "lease_expires_at": utcnow() - timedelta(seconds=1), "started_at": utcnow(), **values})
            s.add(job)
            s.flush()
            services.ledger.hold(s, project, job, HOLD)
    return ids


def settled(services: Services, job_id: str) -> list[tuple[str, bool]]:
    with services.db.session() as s:
        entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)
                         .order_by(col(LedgerEntry.id))).all()
        return [(e.kind, e.unreconciled) for e in entries]


def test_recovery_runs_again_only_an_attempt_known_to_have_sent_nothing(built: Services) -> None:
    ids = left_running(
        built,
        unsent={"unsent_attempt": 1},
        sent={"unsent_attempt": None},
        # Marked by an earlier attempt; the latest claim (a process of an earlier version) did not say.
        stale_mark={"attempt": 2, "unsent_attempt": 1},
        # An earlier attempt got the provider to accept work that cannot be followed.
        accepted={"unsent_attempt": 1, "provider_work": {"engine": "fake-paid", "handles": [{"id": "x"}]}},
        unsent_canceled={"unsent_attempt": 1, "cancel_requested_at": utcnow()},
    )
    recovered = asyncio.run(built.scheduler.recover(all_foreign=False))
    assert sorted(recovered) == sorted(ids.values())
    with built.db.session() as s:
        jobs = {label: s.get(Job, job_id) for label, job_id in ids.items()}

    again = jobs["unsent"]
    assert again is not None and again.status == "queued" and again.error is None
    assert [a["status"] for a in again.attempts or []] == ["interrupted"]
    assert settled(built, ids["unsent"]) == [("hold", False)]  # the hold waits for the next run

    for label in ("sent", "stale_mark", "accepted"):
        job = jobs[label]
        assert job is not None and job.status == "failed" and (job.error or {})["code"] == "interrupted", label
        assert settled(built, ids[label]) == [("hold", False), ("capture", True)], label

    canceled = jobs["unsent_canceled"]
    assert canceled is not None and canceled.status == "canceled"
    assert settled(built, ids["unsent_canceled"]) == [("hold", False), ("release", False)]


def test_a_claim_to_move_a_job_off_an_open_circuit_sends_nothing_on_any_engine(
        built: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin that does not announce its sends: a process that died moving its job (a claim that
    never reaches the engine) left it failed `interrupted` and its estimate captured."""
    monkeypatch.setattr(fakes.FakePaidEngine, "announces_sends", False)
    ids = left_running(built, moving={"status": "queued", "attempt": 0, "lease_owner": None,
                                      "lease_expires_at": None, "started_at": None})
    with built.db.session() as s:
        queued = s.get(Job, ids["moving"])
        assert queued is not None
    claim = built.scheduler._claim(queued, move=True)
    assert claim is not None and claim.surely_unsent()
    built.scheduler._claimed.clear()  # the process dies before the move is written
    with built.db.transaction() as s:
        s.execute(update(Job).where(col(Job.id) == ids["moving"]).values(
            lease_owner="dead-host:1:0", lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert asyncio.run(built.scheduler.recover(all_foreign=False)) == [ids["moving"]]
    with built.db.session() as s:
        after = s.get(Job, ids["moving"])
        assert after is not None and (after.status, after.error) == ("queued", None)
    assert settled(built, ids["moving"]) == [("hold", False)]


def test_one_job_recovery_fails_on_leaves_the_others_recovered(built: Services,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    ids = left_running(built, broken={"unsent_attempt": 1}, fine={"unsent_attempt": 1})
    real = built.scheduler._recover_one
    raised: list[Exception] = [TypeError("a plugin's answer of another shape")]

    def recover_one(job: Job) -> Any:
        if job.id == ids["broken"]:
            raise raised[0]
        return real(job)

    monkeypatch.setattr(built.scheduler, "_recover_one", recover_one)
    assert asyncio.run(built.scheduler.recover(all_foreign=False)) == [ids["fine"]]
    # The database's own trouble is every job's: the sweep ends, as its loop reports (not a line per job).
    raised[0] = OperationalError("UPDATE jobs", {}, Exception("database is locked"))
    with pytest.raises(OperationalError):
        asyncio.run(built.scheduler.recover(all_foreign=False))
    monkeypatch.setattr(built.scheduler, "_recover_one", real)  # the next sweep
    assert asyncio.run(built.scheduler.recover(all_foreign=False)) == [ids["broken"]]


def test_a_worker_that_records_its_send_after_recovery_looked_keeps_its_job(built: Services) -> None:
    """A worker past its lease but alive: recovery reads the job as unsent, then the worker records
    its first paid request and sends it. Recovery must not queue it again (a second send)."""
    ids = left_running(built, late={"unsent_attempt": 1})
    [orphan] = asyncio.run(asyncio.to_thread(built.scheduler._orphans, False))
    with built.db.session() as s:
        job = s.get(Job, ids["late"])
        assert job is not None
    built.runner._record_sending(Claim(job, 1, CancelToken()))  # the worker, between the read and the write
    assert built.scheduler._recover_one(orphan) is None
    with built.db.session() as s:
        after = s.get(Job, ids["late"])
        assert after is not None and (after.status, after.attempt, after.unsent_attempt) == ("running", 1, None)
    assert settled(built, ids["late"]) == [("hold", False)]
    # Its worker still gone at the next sweep: now a job that may have been billed.
    assert asyncio.run(built.scheduler.recover(all_foreign=False)) == [ids["late"]]
    assert settled(built, ids["late"]) == [("hold", False), ("capture", True)]


def test_a_connection_lost_while_recording_the_first_send_is_tried_again(
        built: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # One connection killed by the server failed the paid job for good, with nothing sent.
    from sqlalchemy.exc import OperationalError

    ids = left_running(built, job={"unsent_attempt": 1})
    with built.db.session() as s:
        job = s.get(Job, ids["job"])
        assert job is not None
    real, lost = built.db.transaction, [1]

    @contextlib.contextmanager
    def once_lost() -> Iterator[Any]:
        if lost:
            lost.pop()
            raise OperationalError(None, None, Exception("server closed the connection unexpectedly"))
        with real() as s:
            yield s

    monkeypatch.setattr(built.db, "transaction", once_lost)
    monkeypatch.setattr("orchestrator.db.wait_exponential", lambda **_: lambda _state: 0)
    built.runner._record_sending(Claim(job, 1, CancelToken()))
    with built.db.session() as s:
        after = s.get(Job, ids["job"])
        assert after is not None and after.unsent_attempt is None and not lost


def test_canceling_a_job_whose_gone_worker_sent_nothing_releases_its_hold(built: Services) -> None:
    ids = left_running(built, unsent={"unsent_attempt": 1}, sent={"unsent_attempt": None})
    for label in ids:
        assert built.jobs.cancel_orphan(ids[label])
    assert settled(built, ids["unsent"]) == [("hold", False), ("release", False)]
    assert settled(built, ids["sent"]) == [("hold", False), ("capture", True)]


def test_the_first_send_is_recorded_only_for_the_claim_holding_the_job(built: Services) -> None:
    ids = left_running(built, held={"unsent_attempt": 1},
                       canceled={"unsent_attempt": 1, "cancel_requested_at": utcnow()},
                       taken={"attempt": 2, "unsent_attempt": 2})

    def claim(label: str, attempt: int = 1) -> Claim:
        with built.db.session() as s:
            job = s.get(Job, ids[label])
            assert job is not None
            return Claim(job, attempt, CancelToken())

    held = claim("held")
    built.runner._record_sending(held)
    with built.db.session() as s:
        assert s.get(Job, ids["held"]).unsent_attempt is None  # type: ignore[union-attr]
    assert held.job.unsent_attempt is None

    with pytest.raises(Canceled) as info:
        built.runner._record_sending(claim("canceled"))
    assert info.value.charged == "no"
    with pytest.raises(StaleAttempt):
        built.runner._record_sending(claim("taken", attempt=1))
    with built.db.session() as s:  # neither refused attempt changed its row
        assert [s.get(Job, ids[label]).unsent_attempt for label in ("canceled", "taken")] == [1, 2]  # type: ignore[union-attr]


def test_the_mark_that_nothing_was_sent_after_the_job_ended_is_not_told_as_a_problem(
        built: Services, caplog: pytest.LogCaptureFixture) -> None:
    # Written in a thread after a refused request, it often comes after the job's end: its INFO
    # line then followed the job's last one, read as something wrong.
    ids = left_running(built, job={"status": "failed", "attempt": 1})
    with built.db.session() as s:
        job = s.get(Job, ids["job"])
        assert job is not None
    claim = Claim(job, 1, CancelToken())
    with caplog.at_level(logging.DEBUG, logger="orchestrator.runner"):
        built.runner._record_unsent(claim)
    told = [r for r in caplog.records if "as having sent nothing again" in r.getMessage()]
    assert [r.levelno for r in told] == [logging.DEBUG], told
    assert claim.unmarked == 0


def test_a_request_after_a_refused_one_waits_for_the_mark_that_nothing_was_sent(
        built: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mark "sent nothing", written as the only request out is answered 429, must land before
    the next request is recorded as sending: landing after, it would tell recovery that an attempt
    with a request out had sent nothing, and a crash would send the job twice."""
    ids = left_running(built, job={"unsent_attempt": 1})
    with built.db.session() as s:
        job = s.get(Job, ids["job"])
        assert job is not None
    claim = Claim(job, 1, CancelToken())
    go = threading.Event()
    unmark = built.runner._record_unsent

    def slow_unmark(claim: Claim) -> None:
        assert go.wait(10)
        unmark(claim)

    monkeypatch.setattr(built.runner, "_record_unsent", slow_unmark)

    def unsent() -> int | None:
        with built.db.session() as s:
            return s.get(Job, ids["job"]).unsent_attempt  # type: ignore[union-attr]

    async def scenario() -> None:
        record = built.runner._first_send_recorder(claim, JobProgress(built.runner, claim))
        refused = built.runner._send_refused(claim)
        await record()
        assert (claim.out, unsent()) == (1, None)
        refused()  # answered 429: nothing out, the mark is being written back
        second = asyncio.ensure_future(record())
        await asyncio.sleep(0.2)
        assert not second.done() and claim.out == 0
        go.set()
        await asyncio.wait_for(second, 10)
        assert claim.out == 1

    asyncio.run(scenario())
    assert unsent() is None  # the second request's send is what the row says last


def test_an_attempt_another_process_took_over_sends_nothing(paid_settings_for: Callable[..., Settings],
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = paid_settings_for(tmp_path / "data")
    caplog.set_level(logging.INFO, logger="orchestrator.runner")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        go = tmp_path / "send-now"
        job = promote_ok(client, asset_id, prompt="taken over", tags={"fake": "wait-before-send", "until": str(go)})
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), lambda j: j["status"] == "running")
        # As another process's recovery and claim would leave the row, while this one still waits.
        db = Database(settings.resolved_database_url)
        with db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == job["id"])
                      .values(attempt=Job.attempt + 1, unsent_attempt=Job.attempt + 1, lease_owner="other:1:0"))
        db.dispose()
        go.touch()  # the engine goes on to send
        poll(lambda: any("superseded" in r.getMessage() and job["id"] in r.getMessage() for r in caplog.records),
             bool, what="the attempt to give up")
        assert "taken over" not in fakes.SENT
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"  # left to its new holder
        assert [(e["kind"], e["unreconciled"]) for e in ledger(client, project_id) if e["job_id"] == job["id"]] \
            == [("hold", False)]


def test_a_cancel_from_another_process_met_by_the_first_send_releases_the_hold(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    # The send's own record finds the row canceled and refuses it: nothing went out, so nothing
    # is charged (the engine asked to send, but the runner must not read that as sent).
    settings = paid_settings_for(tmp_path / "data")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        go = tmp_path / "send-now"
        job = promote_ok(client, asset_id, prompt="canceled elsewhere",
                         tags={"fake": "wait-before-send", "until": str(go)})
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), lambda j: j["status"] == "running")
        db = Database(settings.resolved_database_url)
        with db.transaction() as s:  # as another API server's cancel, before this one hears of it
            s.execute(update(Job).where(col(Job.id) == job["id"]).values(cancel_requested_at=utcnow()))
        db.dispose()
        go.touch()
        done = poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), lambda j: j["status"] == "canceled")
        assert "canceled elsewhere" not in fakes.SENT and done["cost"]["charged"] == 0
        assert [(e["kind"], e["unreconciled"]) for e in ledger(client, project_id) if e["job_id"] == job["id"]] \
            == [("hold", False), ("release", False)]


def wait_for_a_refused_send(settings: Settings, job_id: str, attempt: int) -> None:
    """Until the attempt's request was recorded as sent (out for `answer_after`), then answered 429
    and the attempt marked as having sent nothing again, while its Retry-After is waited out."""
    db = Database(settings.resolved_database_url)

    def row() -> tuple[str, int, int | None]:
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job.status, job.attempt, job.unsent_attempt

    try:
        poll(row, lambda r: r == ("running", attempt, None), what=f"attempt {attempt}'s request recorded as sent")
        poll(row, lambda r: r == ("running", attempt, attempt),
             what=f"attempt {attempt} marked as having sent nothing again")
    finally:
        db.dispose()


@pytest.mark.parametrize("behaviour", ["wait-before-send", "hang-unsaved", "rate-limited"])
def test_a_killed_paid_job_runs_again_only_if_its_request_had_not_gone(
        behaviour: str, service_env: dict[str, str], tmp_path: Path, paid_settings_for: Callable[..., Settings],
        services: list[Service]) -> None:
    """Killed before it sent (its draft still being prepared), or while the provider's 429 is
    waited out (its one request answered that nothing was made): run again with its hold. Killed
    with a synchronous call out (no provider id saved, so nothing to follow): failed, charged for
    reconciliation, never sent twice."""
    settings = paid_settings_for(Path(service_env["ORCH_DATA_DIR"]))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "month"})

    services.append(Service(service_env, tmp_path, tmp_path / "first.log"))
    with httpx.Client(base_url=services[0].url, timeout=30.0) as client:
        # A request out for 3 s: the polls below must see it out, and a loaded machine let a 1 s window pass.
        tags = {"fake": behaviour, "seconds": "3600", "answer_after": "3", "retry_after": "3600"}
        job_id = promote_ok(client, asset_id, tags=tags)["id"]
        if behaviour == "hang-unsaved":
            wait_for_state(client, job_id, "submitted")
        elif behaviour == "rate-limited":
            wait_for_a_refused_send(settings, job_id, attempt=1)
        else:
            poll(lambda: client.get(f"/v1/jobs/{job_id}").json(), lambda j: j["status"] == "running")
    services[0].kill()

    # Restarted in this process, as the draft was made: a second child spent most of its time
    # importing. Its start's recovery and the run again are this service's, wherever it runs.
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        def entries() -> list[tuple[str, bool]]:
            return [(e["kind"], e["unreconciled"]) for e in ledger(client, project_id) if e["job_id"] == job_id]

        if behaviour == "hang-unsaved":
            failed = client.get(f"/v1/jobs/{job_id}").json()
            assert failed["status"] == "failed" and failed["error"]["code"] == "interrupted", failed
            assert failed["cost"]["held"] == 0 and failed["cost"]["charged"] == PRICE
            assert entries() == [("hold", False), ("capture", True)]
            return
        # Running (waiting to send) again: not failed, and nothing charged.
        again = poll(lambda: client.get(f"/v1/jobs/{job_id}").json(),
                     lambda j: j["status"] == "running" and j["attempts"] != [])
        assert again["error"] is None and [a["status"] for a in again["attempts"]] == ["interrupted"]
        assert again["cost"]["held"] == PRICE and again["cost"]["charged"] == 0
        if behaviour == "rate-limited":  # canceled while none of its requests is out: free
            wait_for_a_refused_send(settings, job_id, attempt=2)
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        done = poll(lambda: client.get(f"/v1/jobs/{job_id}").json(), lambda j: j["status"] == "canceled")
        assert done["cost"]["held"] == 0 and done["cost"]["charged"] == 0
        assert entries() == [("hold", False), ("release", False)]


@pytest.mark.parametrize("closed_at", ["before-encoding", "before-the-puts"])
def test_a_paid_answer_whose_images_a_stop_cut_off_is_not_queued_again_as_unsent(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        closed_at: str) -> None:
    """A synchronous paid engine (as Gemini's: no provider id before its answer, which holds the
    images) answered; the stop closed the runner while those images were being stored, its pools
    then refusing work: `_store_pngs` raises a `Canceled` saying "no". Read as nothing having
    reached the provider, the job would be queued again as unsent and its request sent, and
    billed, a second time on the next start. `JobRunner._store` raises any `Canceled` after the
    engine's return to "yes" for a remote engine, so `_canceled` leaves the job to recovery, which
    ends it charged, and nothing is sent again."""
    settings = paid_settings_for(tmp_path / "data")
    first = Services.build(settings)
    try:
        prompt = f"answered, closed {closed_at}"  # `left_running`'s label: SENT holds every test's
        ids = left_running(first, **{prompt: {"status": "queued", "attempt": 0, "lease_owner": None,
                                              "lease_expires_at": None, "started_at": None}})
        job_id = ids[prompt]
        with first.db.session() as s:
            queued = s.get(Job, job_id)
            assert queued is not None
        claim = first.scheduler._claim(queued)
        assert claim is not None and claim.surely_unsent()
        first.scheduler._claimed.pop(job_id, None)
        runner = first.runner

        async def answered(self: fakes.FakePaidEngine, req: Any, progress: Any, cancel: CancelToken) -> RenderResult:
            await billable_send()
            fakes.SENT.append(req.prompt)
            # The answer is in; the stop (`Scheduler._interrupt`) marks every running claim.
            claim.shutdown = True
            claim.cancel.cancel(abandon=True)
            return RenderResult(images=[RenderedImage(Image.new("RGB", (64, 64)), 7)], model="fake-1",
                                cost_millicredits=HOLD, provider_request_id="resp-1")

        monkeypatch.setattr(fakes.FakePaidEngine, "run", answered)
        if closed_at == "before-encoding":
            record = runner._record

            def close_then_record(*args: Any, **kwargs: Any) -> dict[str, Any]:
                runner.close()  # the stop stopped waiting: its pools refuse the encoding
                return record(*args, **kwargs)

            monkeypatch.setattr(runner, "_record", close_then_record)
        else:
            keep = runner._keep_for_recovery

            def keep_then_close(*args: Any, **kwargs: Any) -> None:
                keep(*args, **kwargs)
                runner.close()  # encoded and recorded for a recovery; the store's pool refuses the puts

            monkeypatch.setattr(runner, "_keep_for_recovery", keep_then_close)
        asyncio.run(runner.run(claim))
        with first.db.session() as s:
            left = s.get(Job, job_id)
            assert left is not None
            # Not queued again as having sent nothing: left running, to this process's lease.
            assert (left.status, left.unsent_attempt) == ("running", None)
        assert settled(first, job_id) == [("hold", False)]
        with first.db.transaction() as s:  # the process is gone: its lease runs out
            s.execute(update(Job).where(col(Job.id) == job_id).values(
                lease_owner="dead-host:1:0", lease_expires_at=utcnow() - timedelta(seconds=1)))
    finally:
        asyncio.run(first.aclose())
    assert fakes.SENT.count(prompt) == 1
    again = Services.build(settings)
    try:
        assert asyncio.run(again.scheduler.recover(all_foreign=False)) == [job_id]
        with again.db.session() as s:
            ended = s.get(Job, job_id)
            assert ended is not None
        # Ended, never run again: possibly billed, its estimate captured for reconciliation (the
        # images the stop cut off were never stored, so there is nothing to adopt).
        assert (ended.status, (ended.error or {}).get("code")) == ("failed", "interrupted")
        assert settled(again, job_id) == [("hold", False), ("capture", True)]
    finally:
        asyncio.run(again.aclose())
    assert fakes.SENT.count(prompt) == 1
