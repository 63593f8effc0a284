"""The dispatcher claims queued jobs in one worker-thread hop; a claim it committed always runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select

from orchestrator import idempotency
from orchestrator.api.deps import Caller
from orchestrator.api.jobs import cancel_job
from orchestrator.clock import utcnow
from orchestrator.errors import EngineError, TooManyJobs
from orchestrator.ids import new_id
from orchestrator.models import Job, Project
from orchestrator.runner import Claim
from orchestrator.schemas import DraftCreate
from orchestrator.services import Services
from orchestrator.settings import Settings
from tiers.base import REMOTE_CONCURRENCY, RenderedImage, RenderResult

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def services(make_settings: SettingsFactory) -> Iterator[Services]:
    # Gemini's key, or its jobs would be another process's (nothing is sent: dispatches only claim).
    built = Services.build(make_settings(gemini_api_key="g-key"))
    try:
        yield built
    finally:
        asyncio.run(built.aclose())


def queued_drafts(services: Services, count: int) -> list[str]:
    return queued_drafts_for(services, new_id("prj"), count)


def queued_drafts_for(services: Services, project_id: str, count: int) -> list[str]:
    with services.db.transaction() as s:
        if s.get(Project, project_id) is None:
            s.add(Project(id=project_id, name="dispatch", policy="balanced"))
    body = DraftCreate(prompt="a lighthouse", n=1, width=64, height=64, steps=1)
    return [services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                 max_credits=None, idempotency_key=None, scope="test")[0].id for _ in range(count)]


def statuses(services: Services, job_ids: list[str]) -> list[str]:
    with services.db.session() as s:
        return [s.get(Job, job_id).status for job_id in job_ids]  # type: ignore[union-attr]


def test_claims_oldest_first_within_lane_limits(services: Services) -> None:
    jobs = queued_drafts(services, 3)
    claims = services.scheduler._claim_ready({})
    # One local device: one job at a time, the oldest.
    assert [(c.job.id, c.attempt, lane) for c, lane in claims] == [(jobs[0], 1, "local")]
    assert claims[0][0].job.status == "running"
    assert statuses(services, jobs) == ["running", "queued", "queued"]
    assert services.scheduler._claim_ready({"local": 1}) == []  # the lane is busy


def test_projects_take_turns_in_the_queue(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # A project that queued first and most does not make another wait behind all of its jobs.
    busy = queued_drafts(services, 3)
    other = queued_drafts(services, 2)
    assert [job.id for job in services.scheduler._oldest_queued(["lite"])] == [busy[0], other[0], busy[1],
                                                                              other[1], busy[2]]
    # Even when the oldest jobs of a look are all the busy project's, the other's next is among them.
    monkeypatch.setattr("orchestrator.queue.QUEUED_BATCH", 2)
    assert [job.id for job in services.scheduler._oldest_queued(["lite"])] == [busy[0], other[0]]


def test_a_project_just_served_waits_for_the_others_in_its_turn(services: Services) -> None:
    busy = queued_drafts(services, 3)
    other = queued_drafts(services, 1)
    assert [c.job.id for c, _ in services.scheduler._claim_ready({})] == [busy[0]]
    # The busy project's next job is older than the other's, and both are their project's next:
    # the one served a moment ago goes second (else it went first until its backlog was gone).
    assert [job.id for job in services.scheduler._oldest_queued(["lite"])] == [other[0], busy[1], busy[2]]
    assert [c.job.id for c, _ in services.scheduler._claim_ready({})] == [other[0]]
    assert [job.id for job in services.scheduler._oldest_queued(["lite"])] == [busy[1], busy[2]]


def test_a_project_cannot_queue_more_than_its_share(make_settings: SettingsFactory) -> None:
    built = Services.build(make_settings(max_pending_jobs=2))
    try:
        first, _ = queued_drafts_for(built, "prj_full", 2)
        with pytest.raises(TooManyJobs) as info:
            queued_drafts_for(built, "prj_full", 1)
        assert info.value.status == 429 and info.value.code == "rate_limited"
        assert "ORCH_MAX_PENDING_JOBS" in info.value.message and info.value.details == {"pending": 2, "limit": 2}
        with built.db.session() as s:
            assert len(s.exec(select(Job).where(col(Job.project_id) == "prj_full")).all()) == 2  # nothing written
        queued_drafts_for(built, "prj_other", 1)  # another project is not held back
        with built.db.transaction() as s:  # one finishes: room for one more
            s.execute(update(Job).where(col(Job.id) == first).values(status="succeeded"))
        queued_drafts_for(built, "prj_full", 1)
    finally:
        asyncio.run(built.aclose())


def test_a_failing_claim_still_starts_the_jobs_already_claimed(services: Services,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = services.scheduler
    jobs = queued_drafts(services, 3)
    monkeypatch.setattr(scheduler, "lane", lambda engine: ("wide", 10))
    real_claim = scheduler._claim
    calls: list[str] = []

    def flaky_claim(job: Job, *, move: bool = False) -> Claim | None:
        calls.append(job.id)
        if len(calls) == 2:
            raise RuntimeError("database is locked")
        return real_claim(job, move=move)

    monkeypatch.setattr(scheduler, "_claim", flaky_claim)
    claims = scheduler._claim_ready({})
    assert [c.job.id for c, _ in claims] == [jobs[0]]
    assert statuses(services, jobs) == ["running", "queued", "queued"]

    # When nothing was claimed, the error reaches the dispatch loop (which logs it and retries).
    calls.clear()
    calls.append("-")  # the next call is the failing second one
    with pytest.raises(RuntimeError):
        scheduler._claim_ready({})
    assert statuses(services, jobs) == ["running", "queued", "queued"]


def test_a_cancel_between_claim_and_start_reaches_the_claim(services: Services) -> None:
    # The worker thread has committed the claim; the loop has not started its task yet. The cancel
    # must find that claim (not take the job for one whose worker is gone) and nothing may run.
    [job_id] = queued_drafts(services, 1)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    assert services.jobs.cancel_queued(job_id) is False  # it is running now
    assert services.scheduler.cancel(job_id) is True
    rendered: list[str] = []
    lite = services.registry.get("lite")
    original = lite.run

    async def watched(*args: object, **kwargs: object) -> RenderResult:
        rendered.append(job_id)
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    lite.run = watched  # type: ignore[method-assign]
    asyncio.run(services.runner.run(claim))
    assert rendered == []
    job = services.jobs.get(job_id)
    assert job.status == "canceled" and job.error is not None and job.error["code"] == "canceled"
    assert services.jobs.asset_ids([job_id])[job_id] == []


def test_a_cancel_after_the_render_still_cancels(services: Services) -> None:
    # The cancel arrives while the images are decoded and stored: it was answered 202, so the job
    # must end canceled, with no assets.
    [job_id] = queued_drafts(services, 1)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    lite = services.registry.get("lite")
    original = lite.run

    async def cancel_when_done(*args: object, **kwargs: object) -> RenderResult:
        result = await original(*args, **kwargs)  # type: ignore[arg-type]
        assert services.scheduler.cancel(job_id)
        return result

    lite.run = cancel_when_done  # type: ignore[method-assign]
    asyncio.run(services.runner.run(claim))
    job = services.jobs.get(job_id)
    assert job.status == "canceled"
    assert services.jobs.asset_ids([job_id])[job_id] == []


def test_a_cancel_whose_job_ends_meanwhile_is_answered_202(services: Services,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The handler thread records the cancel; before it reaches the job's token, the runner (on the
    # loop) ends the job, sees the recorded cancel and ends it canceled. Once the handler then
    # looked again and answered 409 "already canceled" to the very cancel that ended it.
    [job_id] = queued_drafts(services, 1)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    services.scheduler._claimed.pop(job_id)
    services.scheduler._running[job_id] = (None, claim)  # type: ignore[assignment]  # started on the loop
    record = services.jobs.record_cancel

    def record_then_the_job_ends(recorded_id: str) -> bool:
        recorded = record(recorded_id)
        status, _, _ = services.runner._finish(claim, "failed", EngineError("boom", retryable=False, charged="no"))
        assert status == "canceled"  # the runner's end yields to the recorded cancel
        del services.scheduler._running[job_id]
        return recorded

    monkeypatch.setattr(services.jobs, "record_cancel", record_then_the_job_ends)
    answer = cancel_job(job_id, services, Caller())
    assert answer.status == "canceled"


def test_a_service_closing_while_a_job_is_stored_leaves_it_for_the_next_start(services: Services) -> None:
    # The stop cancelled the claim but the engine returned anyway; the images were being stored when
    # the service, done waiting, closed the runner. The job once failed for good ("cannot schedule
    # new futures after shutdown") where a close a moment earlier left it queued for the next start.
    [job_id] = queued_drafts(services, 1)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    services.scheduler._claimed.pop(job_id)
    runner = services.runner
    lite = services.registry.get("lite")

    async def returned_anyway(*args: object, **kwargs: object) -> RenderResult:
        claim.shutdown = True  # what the scheduler's stop does to every running claim
        claim.cancel.cancel(abandon=True)
        return RenderResult(images=[RenderedImage(Image.new("RGB", (64, 64)), 1)], model=lite.model)

    record = runner._record

    def close_meanwhile(*args: Any, **kwargs: Any) -> dict[str, Any]:
        runner.close()  # between the cancel check and the encoding
        return record(*args, **kwargs)

    lite.run = returned_anyway  # type: ignore[method-assign]
    runner._record = close_meanwhile  # type: ignore[method-assign]
    asyncio.run(runner.run(claim))
    job = services.jobs.get(job_id)
    assert (job.status, job.error) == ("queued", None)


def test_a_failed_dispatch_is_retried_without_another_wake(services: Services,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Once, one 'database is locked' left a queued job waiting until some unrelated submit.
    monkeypatch.setattr("orchestrator.queue.DISPATCH_RETRY_SECONDS", 0.05)
    [job_id] = queued_drafts(services, 1)
    scheduler = services.scheduler
    real = scheduler._claim_ready
    calls: list[int] = []

    def locked_once(lane_use: dict[str, int]) -> list[tuple[Claim, str]]:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        return real(lane_use)

    monkeypatch.setattr(scheduler, "_claim_ready", locked_once)

    async def run_until_done() -> str:
        services.bus.bind(asyncio.get_running_loop())
        await scheduler.start()
        try:
            for _ in range(400):
                status = statuses(services, [job_id])[0]
                if status in ("succeeded", "failed", "canceled"):
                    return status
                await asyncio.sleep(0.05)
            return status
        finally:
            await scheduler.stop()

    assert asyncio.run(run_until_done()) == "succeeded"
    assert len(calls) >= 2


@pytest.mark.parametrize(("error", "level", "traceback"), [
    (OperationalError("UPDATE jobs", {}, Exception("terminating connection due to administrator command"),
                      connection_invalidated=True), logging.WARNING, False),
    (RuntimeError("a bug"), logging.ERROR, True)])
def test_a_dispatch_cut_short_starts_its_claims_and_logs_a_database_blip_without_a_traceback(
        services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        error: Exception, level: int, traceback: bool) -> None:
    # A PostgreSQL backend killed mid-dispatch (pg_terminate_backend, a failover) was logged as an
    # ERROR with a traceback, as a bug would be.
    project_id = new_id("prj")
    [draft] = queued_drafts_for(services, project_id, 1)
    queued_paid(services, project_id, 1)
    scheduler = services.scheduler
    real = scheduler._claim

    def second_fails(job: Job, **kwargs: Any) -> Claim | None:
        if job.engine == "gemini":
            raise error
        return real(job, **kwargs)

    monkeypatch.setattr(scheduler, "_claim", second_fails)
    with caplog.at_level(logging.WARNING, logger="orchestrator.queue"):
        claims = scheduler._claim_ready({})
    assert [c.job.id for c, _lane in claims] == [draft]
    [record] = [r for r in caplog.records if "dispatch stopped early" in r.getMessage()]
    assert (record.levelno, bool(record.exc_info)) == (level, traceback)
    assert "1 jobs already claimed" in record.getMessage()


def test_a_full_local_lane_does_not_hide_a_remote_job(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # More drafts than one dispatch looks at wait for the busy local device; a later job for a
    # remote engine, whose lane is free, must still be claimed.
    monkeypatch.setattr("orchestrator.queue.QUEUED_BATCH", 2)
    drafts = queued_drafts(services, 3)
    with services.db.transaction() as s:
        project_id = s.get(Job, drafts[0]).project_id  # type: ignore[union-attr]
        s.add(Job(id=new_id("job"), project_id=project_id, stage="bridge", engine="gemini", status="queued"))
    claims = services.scheduler._claim_ready({"local": 1})
    assert [(c.job.engine, lane) for c, lane in claims] == [("gemini", "remote:gemini")]
    assert statuses(services, drafts) == ["queued"] * 3


def queued_paid(services: Services, project_id: str, count: int, routing: dict[str, Any] | None = None,
                engine: str = "gemini") -> list[str]:
    """Paid jobs for `engine` (its lane is all the dispatch looks at: nothing is sent)."""
    ids = [new_id("job") for _ in range(count)]
    for job_id in ids:  # one commit each: created one after another
        with services.db.transaction() as s:
            if s.get(Project, project_id) is None:
                s.add(Project(id=project_id, name="dispatch", policy="balanced"))
                s.flush()
            s.add(Job(id=job_id, project_id=project_id, stage="bridge", engine=engine, status="queued",
                      routing=routing))
    return ids


def test_a_project_s_paid_job_behind_many_of_its_drafts_takes_its_free_lane(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ranked with the drafts, the paid job was not among the jobs a dispatch looked at while the
    # local lane was free and took a draft each time: the paid lane sat idle behind them.
    monkeypatch.setattr("orchestrator.queue.QUEUED_BATCH", 2)
    project_id = new_id("prj")
    drafts = queued_drafts_for(services, project_id, 3)
    [paid] = queued_paid(services, project_id, 1)
    claims = services.scheduler._claim_ready({})
    assert sorted((c.job.id, lane) for c, lane in claims) == sorted([(drafts[0], "local"), (paid, "remote:gemini")])


@pytest.mark.parametrize(("setting", "sent"), [(None, 1), (3, 3)])
def test_a_self_hosted_server_gets_one_job_at_a_time_unless_told(
        make_settings: SettingsFactory, setting: int | None, sent: int) -> None:
    # Four at once, as to a cloud engine: the webui renders one at a time, so three waited in its
    # own queue, their deadlines running and (A1111) out of a cancel's reach.
    told = {} if setting is None else {"self_hosted_concurrency": setting}
    services = Services.build(make_settings(a1111_url="http://127.0.0.1:9", comfyui_url="http://127.0.0.1:9",
                                            **told))
    try:
        project_id = new_id("prj")
        for engine in ("a1111", "comfyui"):
            queued = queued_paid(services, project_id, 5, engine=engine)
            claims = services.scheduler._claim_ready({"local": 1})
            assert [c.job.id for c, lane in claims if lane == f"remote:{engine}"] == queued[:sent]
        assert services.scheduler.lane("gemini") == ("remote:gemini", REMOTE_CONCURRENCY)
    finally:
        asyncio.run(services.aclose())


def test_a_plugin_s_bad_concurrency_gets_the_default_and_stops_no_dispatch(
        services: Services, caplog: pytest.LogCaptureFixture) -> None:
    # A property that raised went up through every dispatch: no job ran, drafts included.
    class Raising:
        name, kind = "raising", "remote"

        @property
        def concurrency(self) -> int:
            raise RuntimeError("plugin bug")

    class Zero:
        name, kind, concurrency = "zero", "remote", 0

    for engine in (Raising(), Zero()):
        services.registry._engines[engine.name] = engine  # type: ignore[assignment]
        with caplog.at_level(logging.WARNING, logger="orchestrator.queue"):
            assert services.scheduler.lane(engine.name) == (f"remote:{engine.name}", REMOTE_CONCURRENCY)
            assert services.scheduler.lane(engine.name) == (f"remote:{engine.name}", REMOTE_CONCURRENCY)
        assert len([r for r in caplog.records if r.getMessage().startswith(f"engine {engine.name}:")]) == 1


def test_a_project_served_on_one_lane_keeps_its_turn_on_another(services: Services) -> None:
    # Its drafts counted as its turns on the paid lane too: a project drafting all along waited
    # behind every paid job of another.
    a, b = new_id("prj"), new_id("prj")
    first_paid = queued_paid(services, a, 2)
    drafts = queued_drafts_for(services, b, 2)
    [b_paid] = queued_paid(services, b, 1)
    lane, limit = services.scheduler.lane("gemini")
    claims = services.scheduler._claim_ready({lane: limit - 1})  # one paid slot, the device free
    assert sorted(c.job.id for c, _ in claims) == sorted([first_paid[0], drafts[0]])
    # One paid slot again, the device busy: B has had no paid job yet, A has.
    claims = services.scheduler._claim_ready({"local": 1, lane: limit - 1})
    assert [c.job.id for c, _ in claims] == [b_paid]


def test_a_job_that_may_leave_an_open_circuit_is_looked_at_behind_many_that_wait(services: Services) -> None:
    # Only the first 64 candidates of a lane were read: while gemini's circuit was open, 70 jobs
    # with nowhere else to go (each waiting for the verdict) hid the one whose routing offers lite.
    health = services.runner.health
    for _ in range(health.threshold):
        health.failed("gemini")
    for _ in range(70):
        queued_paid(services, new_id("prj"), 1)
    [movable] = queued_paid(services, new_id("prj"), 1,
                            routing={"candidates": [{"engine": "gemini"}, {"engine": "lite"}]})
    claims = services.scheduler._claim_ready({"local": 1})
    assert [(c.job.id, c.circuit_open) for c, _ in claims] == [(movable, True)]


def test_a_job_committed_later_never_sorts_before_a_cursor(services: Services,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A paging client reads `id > cursor`. A submit that made its id, then waited for the write
    # lock while another committed, once landed before that other's id: every page missed it.
    project_id = new_id("prj")
    with services.db.transaction() as s:
        s.add(Project(id=project_id, name="cursor", policy="balanced"))
    body = DraftCreate(prompt="a lighthouse", n=1, width=64, height=64, steps=1)
    made, go = threading.Event(), threading.Event()
    real_new_job = services.jobs._new_job

    def slow_new_job(*args: Any, **kwargs: Any) -> Job:
        job = real_new_job(*args, **kwargs)
        if threading.current_thread().name == "slow":
            made.set()
            go.wait(10)
        return job

    monkeypatch.setattr(services.jobs, "_new_job", slow_new_job)

    def submit() -> Job:
        job, _ = services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="test")
        return job

    results: list[Job] = []
    slow = threading.Thread(target=lambda: results.append(submit()), name="slow")
    slow.start()
    assert made.wait(10)
    fast = submit()  # commits while the slow one holds an id made before it
    go.set()
    slow.join(10)
    [late] = results
    with services.db.session() as s:
        after = [j.id for j in s.exec(select(Job).where(col(Job.id) > fast.id)).all()]
    assert late.id in after


def test_idempotency_keys_outlive_their_ttl_while_the_job_is_unfinished(services: Services) -> None:
    # A retry after 48 h of backlog must still find the job, not make a second one.
    project_id = new_id("prj")
    with services.db.transaction() as s:
        s.add(Project(id=project_id, name="keys", policy="balanced"))
    body = DraftCreate(prompt="a lighthouse", n=1, width=64, height=64, steps=1)
    job, _ = services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                  max_credits=None, idempotency_key="k-1", scope="test")
    later = utcnow() + idempotency.TTL + timedelta(hours=1)
    assert idempotency.forget_expired(services.db, now=later) == 0
    again, created = services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                          max_credits=None, idempotency_key="k-1", scope="test")
    assert (again.id, created) == (job.id, False)
    assert services.jobs.cancel_queued(job.id)
    assert idempotency.forget_expired(services.db, now=later) == 1  # finished and old: forgotten


def test_the_heartbeat_stops_an_attempt_canceled_through_another_process(
        services: Services, caplog: pytest.LogCaptureFixture) -> None:
    # Another process's cancel finds no task of its own and cancels the row: the worker that holds
    # the job learns it at its next lease renewal and stops, instead of rendering for nobody.
    jobs = queued_drafts(services, 2)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    services.jobs.cancel_orphan(jobs[0])  # what the other process's API does
    services.scheduler._renew([claim])
    assert claim.cancel.cancelled and not claim.cancel.abandoned  # a user's cancel: stop the provider too
    assert f"job {jobs[0]} was canceled while this worker held it" in caplog.text

    # An attempt that finished by itself, or is being canceled here, is left alone and not reported.
    caplog.clear()
    [(done, _lane)] = services.scheduler._claim_ready({})
    asyncio.run(services.runner.run(done))
    assert services.jobs.get(jobs[1]).status == "succeeded"
    services.scheduler._renew([done])
    assert not done.cancel.cancelled
    assert "elsewhere" not in caplog.text


@pytest.mark.parametrize("recovered", ["failed", "queued"])
def test_the_heartbeat_lets_go_of_an_attempt_another_process_recovered(services: Services, recovered: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    # The lease ran out while this process was still working (a stalled event loop); another
    # process's recovery failed the job 'interrupted' without a new attempt, or queued it again.
    # This attempt must stop, and leave its provider work running only for an attempt that follows
    # it: a failed job's is followed by nobody, and rendered and billed for nobody.
    [job_id] = queued_drafts(services, 1)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    error = {"code": "interrupted", "message": "the server stopped", "details": {}}
    with services.db.transaction() as s:
        s.execute(update(Job).where(col(Job.id) == job_id).values(
            status=recovered, error=error if recovered == "failed" else None))
    services.scheduler._renew([claim])
    assert claim.cancel.cancelled and claim.cancel.abandoned == (recovered == "queued")
    told = ("ended (failed) by another process" if recovered == "failed"
            else "recovered (its lease had run out)")  # a failed job is taken over by nobody
    assert f"job {job_id} was {told} while this worker held it" in caplog.text


def test_a_progress_write_that_fails_does_not_fail_the_render(services: Services, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    # Called from a diffusers step callback on the inference thread: raising there failed the job.
    [job_id] = queued_drafts(services, 1)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    assert claim.job.id == job_id

    class Locked:
        def __enter__(self) -> None:
            raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))

        def __exit__(self, *exc: object) -> None:
            return None

    # For the steps only: the services' stop hands the claim back through the real database (with the
    # database away, it waited out its 30 s of retries at every run of this test).
    with monkeypatch.context() as away, caplog.at_level(logging.DEBUG, logger="orchestrator.runner"):
        away.setattr(services.runner.db, "transaction", lambda: Locked())
        for step in range(1, 5):  # every step's write fails while the database is away
            services.runner.write_progress(claim, step, 4)  # no exception
    told = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Told once in a line, not a warning a step for as long as it lasts.
    assert len(told) == 1 and "writing jobs' progress failed" in told[0].getMessage(), told
    assert "database is locked" in told[0].getMessage() and told[0].exc_info is None


def test_a_wait_for_the_write_lock_does_not_shorten_a_lease(services: Services,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Leases were counted from before the write lock was taken: two long waits for it (each under
    # its timeout) let a live job's lease run out, and another process recovered the job.
    [job_id] = queued_drafts(services, 1)
    clock = [utcnow()]
    monkeypatch.setattr("orchestrator.queue.shared_now", lambda: clock[0])
    real = services.db.transaction

    @contextlib.contextmanager
    def slow_lock() -> Iterator[Any]:
        clock[0] += timedelta(seconds=20)  # another process held the write lock this long
        with real() as s:
            yield s

    def lease_left() -> timedelta:
        with services.db.session() as s:
            row = s.get(Job, job_id)
        assert row is not None and row.lease_expires_at is not None
        return row.lease_expires_at - clock[0]

    monkeypatch.setattr(services.db, "transaction", slow_lock)
    claim = services.scheduler._claim(services.jobs.get(job_id))
    assert claim is not None and lease_left() == services.scheduler.lease
    services.scheduler._renew([claim])
    assert lease_left() == services.scheduler.lease


@pytest.mark.parametrize("how", ["given back", "to be followed"])
def test_a_job_a_stop_queues_again_waits_out_a_lost_database_connection(
        services: Services, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    # A stop during a database failover: the one write that queues the job again failed, the job
    # was left to recovery and counted as a crash (three such restarts fail it `interrupted`).
    [job_id] = queued_drafts(services, 1)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    services.scheduler._claimed.pop(job_id)
    runner = services.runner
    update_job = runner._guarded_update
    lost = [OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"),
                             connection_invalidated=True)]

    def first_write_lost(*args: Any, **kwargs: Any) -> Any:
        if lost:
            raise lost.pop()
        return update_job(*args, **kwargs)

    monkeypatch.setattr(runner, "_guarded_update", first_write_lost)
    work = {"engine": claim.job.engine, "handles": [{"id": "req-1"}]}
    if how == "given back":
        runner.give_back(claim)
    else:
        runner._requeue_to_follow(claim, work)
    job = services.jobs.get(job_id)
    assert lost == [] and job.status == "queued" and job.lease_owner is None
    assert [(a["status"], a["error"]["details"]["graceful"]) for a in job.attempts or []] == [("interrupted", True)]
    assert (job.provider_work == work) is (how == "to be followed")
