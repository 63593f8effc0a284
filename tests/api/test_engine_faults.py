"""Engines that break in ways an EngineError does not describe, engines that are gone, provider work
that cannot be followed, and the idempotency keys' expiry: each must end the job (or the key) with
the right state and the right ledger, never leave it running and never send a paid request twice."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col, select

from orchestrator import idempotency
from orchestrator.clock import utcnow
from orchestrator.errors import EngineError
from orchestrator.ids import new_id
from orchestrator.jobs import render_request
from orchestrator.models import Asset, IdempotencyKey, Job, JobStatus, LedgerEntry, Project
from orchestrator.runner import JobRunner
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests import fakes
from tiers import tiny
from tiers.base import CancelToken, Progress, RenderRequest, RenderResult

SettingsFactory = Callable[..., Settings]
Build = Callable[[str], Services]

HOLD = int(fakes.FAKE_PRICE * 1000)  # one image on fake-paid, in millicredits
BRIDGE: dict[str, Any] = {"stage": "bridge", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
                          "width": 64, "height": 64, "tags": {}}
DRAFT: dict[str, Any] = {"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
                         "width": 64, "height": 64, "steps": 1, "tags": {}}
LedgerRows = list[tuple[str, int, bool]]


@pytest.fixture
def build(make_settings: SettingsFactory) -> Iterator[Build]:
    """`build(engines)`: services on the test's data dir with those ORCH_ENGINES; closed at teardown."""
    built: list[Services] = []

    def make(engines: str) -> Services:
        services = Services.build(make_settings(engines=engines))
        built.append(services)
        return services

    yield make
    for services in built:
        asyncio.run(services.aclose())


def queue_job(services: Services, engine: str, *, estimated: int, params: dict[str, Any],
              model: str = "fake-1", **values: Any) -> str:
    """A queued job on `engine` with its hold (when `estimated` > 0), as a submit leaves it."""
    job_id = new_id("job")
    with services.db.transaction() as s:
        project = Project(id=new_id("prj"), name="engine faults", policy="balanced")
        s.add(project)
        s.flush()
        job = Job(id=job_id, project_id=project.id, stage=params["stage"], engine=engine, model=model,
                  params=params, estimated=estimated, status="queued", **values)
        s.add(job)
        s.flush()
        services.ledger.hold(s, project, job, estimated)
    return job_id


def live_workers(build: Build, *engines: str) -> list[Services]:
    """Services on one data dir, one per `engines` (their ORCH_ENGINES), each a live worker to the others."""
    workers = [build(names) for names in engines]
    for services in workers:
        services.scheduler.presence.enter(services.scheduler.owner, services.scheduler.engines())
    return workers


def claim_and_run(services: Services, job_id: str) -> Job:
    """Claim the queued job as the dispatcher does, run it to its end, and read its row back."""
    claims = services.scheduler._claim_ready({})
    assert [claim.job.id for claim, _lane in claims] == [job_id]
    asyncio.run(services.runner.run(claims[0][0]))
    return read_job(services, job_id)


def open_circuit(services: Services, engine: str) -> None:
    """The engine's circuit breaker opened by failures, as its jobs' would."""
    while services.runner.health.opened_at(engine) is None:
        services.runner.health.failed(engine)


def read_job(services: Services, job_id: str) -> Job:
    with services.db.session() as s:
        job = s.get(Job, job_id)
    assert job is not None
    return job


def ledger_of(services: Services, job_id: str) -> LedgerRows:
    with services.db.session() as s:
        entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)
                         .order_by(col(LedgerEntry.id))).all()
        return [(e.kind, e.amount, e.unreconciled) for e in entries]


def event_types(services: Services, job_id: str) -> list[str]:
    stream = services.bus._jobs.get(job_id)
    return [] if stream is None else [e.type for e in stream.snapshot()]


def states(services: Services, job_id: str) -> list[str]:
    stream = services.bus._jobs.get(job_id)
    return [] if stream is None else [str(e.data.get("state")) for e in stream.snapshot() if e.type == "state"]


# -- an engine that raises something other than an EngineError -------------------------------------


def test_a_priced_remote_engine_that_crashes_fails_the_job_charged_unknown(build: Build) -> None:
    # The request may have reached the provider before the engine broke: the hold is captured for
    # reconciliation, not released (which would let the studio spend it twice).
    services = build("fake-paid=tests.fakes:factory,fake-free=tests.fakes:free_factory")
    job_id = queue_job(services, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "crash"}})
    job = claim_and_run(services, job_id)
    assert job.status == "failed", job.error
    assert job.error is not None
    assert "failed unexpectedly" in job.error["message"] and "KeyError" in job.error["message"], job.error
    assert (job.lease_owner, job.finished_at is not None) == (None, True)
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("capture", HOLD, True)]
    assert event_types(services, job_id)[-1] == "failed"


def test_a_crash_whose_text_starts_with_a_newline_is_told_by_its_first_line(build: Build) -> None:
    services = build("fake-paid=tests.fakes:factory,fake-free=tests.fakes:free_factory")
    job_id = queue_job(services, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "crash-said-late"}})
    job = claim_and_run(services, job_id)
    assert job.error is not None
    assert job.error["message"].endswith("RuntimeError: CUDA error: an illegal memory access"), job.error


def test_a_remote_engine_that_crashes_before_asking_to_send_releases_its_hold(build: Build) -> None:
    # The engine announces its sends (`billable_send`) and had asked for none: nothing reached the
    # provider, so nothing is left for reconciliation.
    services = build("fake-paid=tests.fakes:factory")
    job_id = queue_job(services, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "crash-before-send"}})
    job = claim_and_run(services, job_id)
    assert job.status == "failed" and job.error is not None and "KeyError" in job.error["message"], job.error
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("release", HOLD, False)]


def test_an_orchestrator_error_a_remote_engine_raises_after_its_send_leaves_the_charge_unknown(build: Build) -> None:
    # A NoPrice (or any error that is not an engine's) says nothing of what the provider billed:
    # the ledger read it as nothing, and released the hold of a request that went out.
    services = build("fake-paid=tests.fakes:factory")
    job_id = queue_job(services, "fake-paid", estimated=HOLD,
                       params={**BRIDGE, "tags": {"fake": "no-price-after-send"}})
    job = claim_and_run(services, job_id)
    assert job.status == "failed" and job.error is not None, job.error
    assert job.error["code"] == "engine_error", job.error
    assert job.error["message"] == ("engine 'fake-paid' failed once its request may have gone out: no_route: "
                                    "fake engine: no price for what it answered"), job.error
    assert job.error["details"] == {"cause": "no_route"}
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("capture", HOLD, True)]
    assert event_types(services, job_id)[-1] == "failed"


def test_a_missing_price_a_remote_engine_raises_before_any_send_is_the_engine_unavailable(build: Build) -> None:
    # Its code was routing's `no_route`, which no job's error is documented to have.
    services = build("fake-paid=tests.fakes:factory")
    job_id = queue_job(services, "fake-paid", estimated=HOLD,
                       params={**BRIDGE, "tags": {"fake": "no-price-before-send"}})
    job = claim_and_run(services, job_id)
    assert job.status == "failed" and job.error is not None, job.error
    assert job.error == {"code": "engine_unavailable", "details": {"cause": "no_route"},
                         "message": "engine 'fake-paid' cannot take this job: fake engine: no price for this model"}
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("release", HOLD, False)]


def test_a_crash_s_message_names_no_server_path(build: Build) -> None:
    """The job's error is the project key's to read: a path is cut to its last part (the log keeps it)."""
    services = build("fake-paid=tests.fakes:factory")
    job_id = queue_job(services, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "crash-on-a-file"}})
    job = claim_and_run(services, job_id)
    assert job.error is not None and "FileNotFoundError" in job.error["message"], job.error
    assert "weights.safetensors" in job.error["message"] and "/srv" not in job.error["message"], job.error


def test_a_request_sent_beside_one_that_crashed_never_goes_out_once_the_hold_is_released(
        build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine's other request asked to send while the job was ending (its end waited for the
    # write lock): it went out, and the hold was released all the same. The end closes the gate.
    services = build("fake-paid=tests.fakes:factory")
    real_finish = JobRunner._finish

    def busy_finish(self: JobRunner, *args: Any) -> Any:
        fakes.ENDING.set()  # the engine's other request asks to send now, while the end waits
        assert fakes.ASKED.wait(30), "the other request never asked to send"
        return real_finish(self, *args)

    monkeypatch.setattr(JobRunner, "_finish", busy_finish)
    fakes.SENT.clear()
    fakes.ENDING.clear()
    fakes.ASKED.clear()
    job_id = queue_job(services, "fake-paid", estimated=HOLD,
                       params={**BRIDGE, "tags": {"fake": "crash-beside-a-send"}})
    job = claim_and_run(services, job_id)
    assert job.status == "failed" and job.error is not None and "KeyError" in job.error["message"], job.error
    assert fakes.SENT == []
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("release", HOLD, False)]


def test_a_source_image_gone_or_not_an_image_fails_saying_which_and_charges_nothing(build: Build) -> None:
    services = build("")
    gone = Job(id="job_gone", project_id="prj_x", stage="bridge", engine="local-hifi", model="m",
               params={"source_sha256": "ab" * 32})
    with pytest.raises(EngineError) as info:  # its file went from the store while the job waited
        services.runner._source_image(gone)
    assert info.value.charged == "no" and not info.value.retryable
    assert info.value.message == "the source image abababababab could not be read: its file is gone from the store"
    # The store's to mend, as a request for that file says it: not the engine's `engine_error`.
    assert (info.value.code, info.value.engine_fault) == ("content_unavailable", False)
    not_png = Job(id="job_text", project_id="prj_x", stage="bridge", engine="local-hifi", model="m",
                  params={"source_sha256": services.store.put(b"plain text, not an image")})
    with pytest.raises(EngineError) as info:
        services.runner._source_image(not_png)
    assert info.value.charged == "no" and "not an image Pillow knows" in info.value.message
    assert "BytesIO" not in info.value.message


def test_a_local_engine_that_crashes_releases_what_its_job_held(build: Build,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing leaves the machine, so nothing can have been billed: a hold (a local engine that
    # prices its work; the shipped ones estimate 0) is released in full.
    services = build("fake-paid=tests.fakes:factory")
    lite = services.registry.get("lite")
    assert lite.kind == "local"

    async def crash(req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        raise KeyError("unet")

    monkeypatch.setattr(lite, "run", crash)
    job_id = queue_job(services, "lite", estimated=5_000, params=DRAFT, model=tiny.NAME)
    job = claim_and_run(services, job_id)
    assert job.status == "failed", job.error
    assert job.error is not None and "failed unexpectedly" in job.error["message"], job.error
    assert ledger_of(services, job_id) == [("hold", 5_000, False), ("release", 5_000, False)]


# -- a queued job whose engine is no longer installed -----------------------------------------------


def test_a_queued_job_whose_engine_was_removed_fails_and_releases_its_hold(
        build: Build, make_settings: SettingsFactory) -> None:
    # Queued while fake-paid was configured; the service comes back without it.
    before = Services.build(make_settings(engines="fake-paid=tests.fakes:factory"))
    try:
        job_id = queue_job(before, "fake-paid", estimated=HOLD, params=BRIDGE)
    finally:
        asyncio.run(before.aclose())
    services = build("fake-free=tests.fakes:free_factory")

    assert services.scheduler._claim_ready({}) == []  # nothing this process can run
    services.scheduler._fail_unserved()  # its only worker may be restarting: given a lease's time
    assert read_job(services, job_id).status == "queued"
    services.scheduler.unserved_grace = 0  # ...which has run out
    services.scheduler._fail_unserved()  # the sweep: and no live process has the engine
    job = read_job(services, job_id)
    assert (job.status, job.attempt, job.finished_at is not None) == ("failed", 0, True)
    assert job.error is not None and job.error["code"] == "engine_unavailable", job.error
    assert job.error["details"] == {"engine": "fake-paid"}
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("release", HOLD, False)]
    assert event_types(services, job_id) == []  # followed by nobody here: a stream asked for is told it from the row
    # A later look finds nothing more to do with it.
    assert services.scheduler._claim_ready({}) == []
    services.scheduler._fail_unserved()
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("release", HOLD, False)]


def test_a_queued_job_whose_engine_was_removed_moves_to_the_next_candidate_of_its_routing(
        build: Build, make_settings: SettingsFactory) -> None:
    # Its key removed before a restart: the job was failed, though its routing named an engine
    # this process has. One a provider has work of stays its engine's (failed, and captured).
    before = Services.build(make_settings(engines="fake-paid=tests.fakes:factory,fake-free=tests.fakes:free_factory"))
    routing = {"candidates": [{"engine": "fake-paid"}, {"engine": "fake-free"}]}
    try:
        moved = queue_job(before, "fake-paid", estimated=HOLD, params=BRIDGE, routing=routing)
        accepted = queue_job(before, "fake-paid", estimated=HOLD, params=BRIDGE, routing=routing,
                             provider_work={"engine": "fake-paid", "handles": [{"id": "accepted"}]})
    finally:
        asyncio.run(before.aclose())
    services = build("fake-free=tests.fakes:free_factory")
    services.scheduler._fail_unserved()  # its only worker may be restarting: given a lease's time
    assert read_job(services, moved).status == "queued" and not services.scheduler._moves
    services.scheduler.unserved_grace = 0
    services.scheduler._fail_unserved()
    assert read_job(services, accepted).status == "failed"
    assert ledger_of(services, accepted) == [("hold", HOLD, False), ("capture", HOLD, True)]
    [claim] = services.scheduler._moves  # claimed, for the dispatcher to move
    assert claim.job.id == moved and read_job(services, moved).status == "running"
    asyncio.run(services.runner.run(claim))
    job = read_job(services, moved)
    assert (job.status, job.engine) == ("queued", "fake-free")
    assert job.attempts is not None and job.attempts[-1]["engine"] == "fake-paid"
    assert job.attempts[-1]["error"]["code"] == "engine_unavailable", job.attempts
    assert "not installed, or not set up" in job.attempts[-1]["error"]["message"]
    assert ledger_of(services, moved) == [("hold", HOLD, False), ("release", HOLD, False)]
    assert "fallback" in states(services, moved)
    job = claim_and_run(services, moved)
    assert (job.status, job.engine) == ("succeeded", "fake-free"), job.error


def test_a_job_of_an_unserved_engine_waits_while_a_candidate_may_take_it_later(
        build: Build, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Failed at once, though its candidate here had a circuit open for a minute, or another live
    # worker had its candidate (and the first process to look failed the job); and one another
    # process had moved since the backlog was listed was moved again, or failed.
    before = Services.build(make_settings(engines="fake-paid=tests.fakes:factory"))
    try:
        cooling, elsewhere, moved = (
            queue_job(before, "fake-paid", estimated=HOLD, params=BRIDGE,
                      routing={"candidates": [{"engine": "fake-paid"}, {"engine": candidate}]})
            for candidate in ("fake-free", "fake-b", "fake-free"))
    finally:
        asyncio.run(before.aclose())
    services = build("fake-free=tests.fakes:free_factory")
    health = services.runner.health
    open_circuit(services, "fake-free")
    monkeypatch.setattr(services.scheduler.presence, "serves", lambda engine: engine == "fake-b")
    with services.db.transaction() as s:  # another worker moved it after the backlog was listed
        s.execute(update(Job).where(col(Job.id) == moved).values(engine="fake-free"))
    assert services.scheduler._move_unserved(moved, "fake-paid")
    services.scheduler._fail_unknown_engine(moved, "fake-paid")
    services.scheduler.unserved_grace = 0
    services.scheduler._fail_unserved()
    assert [read_job(services, j).status for j in (cooling, elsewhere, moved)] == ["queued"] * 3
    assert not services.scheduler._moves
    assert read_job(services, moved).attempts in (None, [])
    health.succeeded("fake-free", "bridge", 1.0)  # its circuit closes: the job moves there
    services.scheduler._fail_unserved()
    assert [claim.job.id for claim in services.scheduler._moves] == [cooling]


def test_a_service_restarted_without_a_job_s_engine_runs_it_on_the_next_candidate(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    before = Services.build(make_settings(engines="fake-paid=tests.fakes:factory,fake-free=tests.fakes:free_factory"))
    try:
        job_id = queue_job(before, "fake-paid", estimated=HOLD, params=BRIDGE,
                           routing={"candidates": [{"engine": "fake-paid"}, {"engine": "fake-free"}]})
    finally:
        asyncio.run(before.aclose())
    api = start_server(make_settings(engines="fake-free=tests.fakes:free_factory", lease_seconds=0.5,
                                     sweep_interval=0.1))
    deadline = time.monotonic() + 30
    while (job := api.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert (job["status"], job["engine"], len(job["assets"])) == ("succeeded", "fake-free", 1), job


def test_a_queued_job_whose_engine_was_removed_fails_when_no_candidate_may_take_it(
        build: Build, make_settings: SettingsFactory) -> None:
    # Its one other candidate costs more than the job may hold.
    before = Services.build(make_settings(engines="fake-paid=tests.fakes:factory"))
    try:
        job_id = queue_job(before, "fake-free", estimated=0, params=BRIDGE, routing={
            "candidates": [{"engine": "fake-free"}, {"engine": "fake-paid"}], "max_credits": 0.001})
    finally:
        asyncio.run(before.aclose())
    services = build("fake-paid=tests.fakes:factory")
    services.scheduler.unserved_grace = 0
    services.scheduler._fail_unserved()
    [claim] = services.scheduler._moves
    asyncio.run(services.runner.run(claim))
    job = read_job(services, job_id)
    assert (job.status, job.engine) == ("failed", "fake-free")
    assert job.error is not None and job.error["code"] == "engine_unavailable", job.error
    assert job.error["details"]["fallbacks_skipped"] == [
        {"engine": "fake-paid", "reason": "max_credits", "estimate": fakes.FAKE_PRICE}]
    assert ledger_of(services, job_id) == []


def test_a_retryable_failure_moves_the_job_to_an_engine_only_another_live_worker_has(build: Build) -> None:
    # Workers differing in engines: the job failed on its engine's error, its hold released,
    # though a live worker had the next candidate of its routing. Priced as routed (this process
    # knows nothing of fake-b), its hold taken, and left to that worker.
    from tests.routing import FAKE_B_PRICE

    here = build("fake-paid=tests.fakes:factory")
    there = build("fake-b=tests.routing:fake_b_factory")
    routing: dict[str, Any] = {"candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE},
                                              {"engine": "fake-b", "estimate": FAKE_B_PRICE}]}
    failing = {**BRIDGE, "tags": {"fake": "fail"}}
    alone = queue_job(here, "fake-paid", estimated=HOLD, params=failing, routing=routing)
    job = claim_and_run(here, alone)  # no live worker has fake-b: it ends, as before
    assert (job.status, job.engine) == ("failed", "fake-paid") and job.error is not None
    assert ledger_of(here, alone) == [("hold", HOLD, False), ("release", HOLD, False)]

    there.scheduler.presence.enter(there.scheduler.owner, there.scheduler.engines())
    job_id = queue_job(here, "fake-paid", estimated=HOLD, params=failing, routing=routing)
    job = claim_and_run(here, job_id)
    assert (job.status, job.engine, job.model) == ("queued", "fake-b", None)
    assert job.attempts is not None and job.attempts[-1]["engine"] == "fake-paid"
    b_hold = int(FAKE_B_PRICE * 1000)
    assert ledger_of(here, job_id) == [("hold", HOLD, False), ("release", HOLD, False), ("hold", b_hold, False)]
    [fallback] = [e.data for e in here.bus._jobs[job_id].snapshot() if e.data.get("state") == "fallback"]
    assert (fallback["to"], fallback["estimate"], fallback["worker"]) == ("fake-b", FAKE_B_PRICE, "another")
    assert here.scheduler._claim_ready({}) == []  # not this process's to run
    job = claim_and_run(there, job_id)
    assert (job.status, job.engine, job.model) == ("succeeded", "fake-b", "fake-1"), job.error
    assert ledger_of(there, job_id)[-1] == ("capture", b_hold, False)

    # Made private since it was routed: an engine this process cannot judge may send it off the
    # machine. Routed private, the router that listed it judged it local.
    private = {**BRIDGE, "tags": {"fake": "fail", "privacy": "local"}}
    kept = queue_job(here, "fake-paid", estimated=HOLD, params=private, routing={**routing, "private": False})
    job = claim_and_run(here, kept)
    assert job.status == "failed" and job.error is not None
    assert job.error["details"]["fallbacks_skipped"] == [{"engine": "fake-b", "reason": "private"}]
    routed_private = queue_job(here, "fake-paid", estimated=HOLD, params=private, routing={**routing, "private": True})
    assert (claim_and_run(here, routed_private).status, read_job(here, routed_private).engine) == ("queued", "fake-b")

    # Priced 0 there (a prices file): a cloud engine for all this process knows, its provider may
    # bill all the same, so its hold of 0 is taken, to flag an outcome nobody knows.
    free = {"candidates": [routing["candidates"][0], {"engine": "fake-b", "estimate": 0.0}]}
    zero = queue_job(here, "fake-paid", estimated=HOLD, params=failing, routing=free)
    assert claim_and_run(here, zero).status == "queued"
    assert ledger_of(here, zero) == [("hold", HOLD, False), ("release", HOLD, False), ("hold", 0, False)]


def test_a_queued_job_moves_off_an_open_circuit_to_an_engine_only_another_live_worker_has(build: Build) -> None:
    # Judged by this process's engines alone, it waited out the failing engine's cooldown and was
    # then sent there as its half-open probe, though a live worker had the next candidate.
    from tests.routing import FAKE_B_PRICE

    here = build("fake-paid=tests.fakes:factory")
    there = build("fake-b=tests.routing:fake_b_factory")
    routing: dict[str, Any] = {"candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE},
                                              {"engine": "fake-b", "estimate": FAKE_B_PRICE}]}
    job_id = queue_job(here, "fake-paid", estimated=HOLD, params=BRIDGE, routing=routing)
    open_circuit(here, "fake-paid")
    assert here.scheduler._circuit(read_job(here, job_id), {}) == "wait"  # nobody else has fake-b
    there.scheduler.presence.enter(there.scheduler.owner, there.scheduler.engines())
    assert here.scheduler._circuit(read_job(here, job_id), {}) == "move"
    job = claim_and_run(here, job_id)
    assert (job.status, job.engine, job.started_at) == ("queued", "fake-b", None)  # never started anywhere
    assert [(a["engine"], a["status"]) for a in job.attempts or []] == [("fake-paid", "failed")]
    [fallback] = [e.data for e in here.bus._jobs[job_id].snapshot() if e.data.get("state") == "fallback"]
    assert (fallback["to"], fallback["worker"], fallback["error"]["code"]) == ("fake-b", "another",
                                                                              "engine_unavailable")
    assert ledger_of(here, job_id)[-1] == ("hold", int(FAKE_B_PRICE * 1000), False)
    assert claim_and_run(there, job_id).status == "succeeded"


def test_a_fallback_to_an_engine_left_off_here_is_priced_here_and_left_to_its_worker(build: Build) -> None:
    # fake-b's key given to the other host only: this process prices it (its prices file may have
    # changed since the routing), and neither runs it nor takes its half-open probe.
    from tests.routing import FAKE_B_PRICE

    here = build("fake-paid=tests.fakes:factory,fake-b=tests.routing:fake_b_factory")
    there = build("fake-b=tests.routing:fake_b_factory")
    engine: Any = here.registry.get("fake-b")
    engine = getattr(engine, "wrapped", engine)
    engine.reachable = False
    engine.availability = lambda: (False, "no key")
    assert "fake-b" not in here.scheduler.engines()
    open_circuit(here, "fake-b")  # it failed here before its key was taken away
    there.scheduler.presence.enter(there.scheduler.owner, there.scheduler.engines())
    routing = {"candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE},
                              {"engine": "fake-b", "estimate": 99.0}]}
    job_id = queue_job(here, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "fail"}}, routing=routing)
    job = claim_and_run(here, job_id)
    assert (job.status, job.engine, job.model, job.estimated) == ("queued", "fake-b", "fake-1", FAKE_B_PRICE * 1000)
    assert ledger_of(here, job_id)[-1] == ("hold", FAKE_B_PRICE * 1000, False)
    assert (claim_and_run(there, job_id).status, read_job(there, job_id).engine) == ("succeeded", "fake-b")


def test_a_claim_to_move_off_a_circuit_reads_on_another_process_as_no_start(build: Build) -> None:
    # Written as a start, the claim was told on another process as the job running on the engine
    # it was only being moved off. Undone, it keeps its number: the job's real start is a new one.
    from orchestrator.events import EventBus
    from orchestrator.follow import catch_up

    services = build("fake-paid=tests.fakes:factory")
    job_id = queue_job(services, "fake-paid", estimated=HOLD, params=BRIDGE)
    bus = EventBus()
    catch_up(bus, read_job(services, job_id), [])
    move = services.scheduler._claim(read_job(services, job_id), move=True)
    assert move is not None
    moving = read_job(services, job_id)
    assert (moving.status, moving.started_at) == ("running", None)
    catch_up(bus, moving, [])
    services.runner._requeue_waiting(move)
    waiting = read_job(services, job_id)
    assert (waiting.status, waiting.started_at, waiting.attempts or []) == ("queued", None, [])
    assert ledger_of(services, job_id) == [("hold", HOLD, False)]
    catch_up(bus, waiting, [])
    assert services.scheduler._claim(waiting) is not None  # the circuit let it through
    catch_up(bus, read_job(services, job_id), [])
    told = [(e.type, e.data.get("attempt"), e.data.get("requeued")) for e in bus._jobs[job_id].snapshot()]
    assert told == [("queued", None, None), ("started", 2, None)], told


def test_a_fallback_is_told_on_another_process_from_the_job_s_attempts(build: Build) -> None:
    # An API server in front of separate workers follows every job from its row: the move showed
    # there only as a start on another engine, with nothing to say why or what it now holds.
    from orchestrator.events import EventBus
    from orchestrator.follow import catch_up
    from tests.routing import FAKE_B_PRICE

    here = build("fake-paid=tests.fakes:factory,fake-b=tests.routing:fake_b_factory")
    routing = {"candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE},
                              {"engine": "fake-b", "estimate": FAKE_B_PRICE}]}
    job_id = queue_job(here, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "fail"}},
                       routing=routing)
    api = EventBus()
    catch_up(api, read_job(here, job_id), [])
    assert claim_and_run(here, job_id).status == "queued"
    moved = read_job(here, job_id)
    catch_up(api, moved, [])
    catch_up(api, moved, [])  # read again: told once
    # The process that moved it, following it from the row (another worker's to run), tells it once.
    catch_up(here.bus, moved, [])
    assert [e.data.get("state") for e in here.bus._jobs[job_id].snapshot()].count("fallback") == 1
    assert claim_and_run(here, job_id).status == "succeeded"
    done = read_job(here, job_id)
    assets = [a for a in (e.data.get("asset_id") for e in here.bus._jobs[job_id].snapshot()) if a]
    catch_up(api, done, assets)
    told = [(e.type, e.data.get("state"), e.data.get("engine")) for e in api._jobs[job_id].snapshot()]
    assert told == [("queued", None, None), ("state", "fallback", None), ("started", None, "fake-b"),
                    ("asset", None, None), ("succeeded", None, None)], told
    [fallback] = [e.data for e in api._jobs[job_id].snapshot() if e.type == "state"]
    [live] = [e.data for e in here.bus._jobs[job_id].snapshot() if e.data.get("state") == "fallback"]
    assert (fallback["from"], fallback["to"], fallback["estimate"]) == ("fake-paid", "fake-b", FAKE_B_PRICE)
    assert fallback["error"] == live["error"] and fallback["error"]["code"]


def test_a_claim_to_move_a_job_that_ran_before_reads_as_no_start_and_gives_its_start_back(build: Build) -> None:
    # Its row kept the earlier attempt's start: told from the row, the claim to move read as a
    # start on the engine it was leaving (found by review).
    from orchestrator.events import EventBus
    from orchestrator.follow import catch_up
    from tests.routing import FAKE_B_PRICE

    here = build("fake-paid=tests.fakes:factory,fake-b=tests.routing:fake_b_factory")
    routing = {"candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE},
                              {"engine": "fake-b", "estimate": FAKE_B_PRICE}]}
    job_id = queue_job(here, "fake-paid", estimated=HOLD, params=BRIDGE, routing=routing)
    api = EventBus()
    first = here.scheduler._claim(read_job(here, job_id))
    assert first is not None
    catch_up(api, read_job(here, job_id), [])
    here.runner._requeue_unsent(first)  # a stop before it sent anything
    here.scheduler._claimed.pop(job_id, None)
    started = read_job(here, job_id).started_at
    assert started is not None
    catch_up(api, read_job(here, job_id), [])
    move = here.scheduler._claim(read_job(here, job_id), move=True)
    assert move is not None
    catch_up(api, read_job(here, job_id), [])
    here.runner._requeue_waiting(move)
    assert read_job(here, job_id).started_at == started
    catch_up(api, read_job(here, job_id), [])
    told = [(e.type, e.data.get("attempt")) for e in api._jobs[job_id].snapshot()]
    assert told == [("queued", None), ("started", 1), ("queued", 1)], told

    # Moved for good: the job queued on the next engine keeps the start it had.
    open_circuit(here, "fake-paid")
    move = here.scheduler._claim(read_job(here, job_id), move=True)
    assert move is not None
    asyncio.run(here.runner.run(move))
    moved = read_job(here, job_id)
    assert (moved.status, moved.engine, moved.started_at) == ("queued", "fake-b", started)
    catch_up(api, moved, [])
    assert [e.type for e in api._jobs[job_id].snapshot()][3:] == ["state"]


def test_a_stream_a_worker_starts_tells_the_moves_other_workers_made_once_and_in_order(build: Build) -> None:
    # P1 moves the job to P2's engine; P2's runner started its stream at its claim without that
    # move, and its follower, counting the moves told, told P2's own move twice and P1's never.
    from orchestrator.follow import catch_up
    from tests.routing import FAKE_B_PRICE

    p1, p2 = live_workers(build, "fake-paid=tests.fakes:factory,fake-free=tests.fakes:free_factory",
                          "fake-b=tests.routing:fake_b_factory")
    routing = {"candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE},
                              {"engine": "fake-b", "estimate": FAKE_B_PRICE}, {"engine": "fake-free", "estimate": 0}]}
    job_id = queue_job(p1, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "fail", "fake-b": "fail"}},
                       routing=routing)
    assert claim_and_run(p1, job_id).engine == "fake-b"
    row = claim_and_run(p2, job_id)
    assert (row.status, row.engine) == ("queued", "fake-free")
    catch_up(p2.bus, row, [])  # P2's follower: the job is no longer P2's
    told = [(e.type, e.data.get("from"), e.data.get("engine")) for e in p2.bus._jobs[job_id].snapshot()
            if e.type in ("state", "started") and e.data.get("state", "fallback") == "fallback"]
    assert told == [("state", "fake-paid", None), ("started", None, "fake-b"), ("state", "fake-b", None)], told


def test_a_worker_whose_stream_told_another_s_attempt_started_tells_it_queued_again(build: Build) -> None:
    # P2 followed the job running on P1, then claimed it (moved to its engine) before its follower
    # read the move: its stream told a second start with no end of the first (found by review).
    from orchestrator.follow import catch_up
    from tests.routing import FAKE_B_PRICE

    p1, p2 = live_workers(build, "fake-paid=tests.fakes:factory", "fake-b=tests.routing:fake_b_factory")
    routing = {"candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE},
                              {"engine": "fake-b", "estimate": FAKE_B_PRICE}]}
    job_id = queue_job(p1, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "fail"}}, routing=routing)
    [(claim, _lane)] = p1.scheduler._claim_ready({})
    catch_up(p2.bus, read_job(p1, job_id), [])
    asyncio.run(p1.runner.run(claim))
    assert claim_and_run(p2, job_id).status == "succeeded"
    told = [(e.type, e.data.get("state"), e.data.get("attempt")) for e in p2.bus._jobs[job_id].snapshot()
            if e.type in ("queued", "started", "state")]
    assert told[:5] == [("queued", None, None), ("started", None, 1), ("state", "fallback", None),
                        ("queued", None, 1), ("started", None, 2)], told


def test_a_claim_from_a_read_made_before_another_process_moved_the_job_takes_nothing(build: Build) -> None:
    # Claimed on the engine it had moved to: one this process lacks failed it `not_found`, and a
    # claim to move took it off an engine whose circuit was closed (found by review).
    from sqlalchemy import update as sql_update

    here = build("fake-paid=tests.fakes:factory")
    job_id = queue_job(here, "fake-paid", estimated=HOLD, params=BRIDGE)
    stale = read_job(here, job_id)  # the dispatch's list
    with here.db.transaction() as s:
        s.execute(sql_update(Job).where(col(Job.id) == job_id).values(
            engine="fake-b", attempts=[{"engine": "fake-paid", "status": "failed", "error": None}]))
    assert here.scheduler._claim(stale) is None
    assert here.scheduler._claim(stale, move=True) is None
    assert (read_job(here, job_id).status, read_job(here, job_id).attempt) == ("queued", 0)


def test_a_dispatch_asks_once_per_engine_whether_another_worker_runs_it(build: Build) -> None:
    # Asked for each of a backlog's jobs on an open circuit, every dispatch read every worker's
    # lock file hundreds of times, under the claim lock.
    here = build("fake-paid=tests.fakes:factory")
    routing = {"candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE},
                              {"engine": "fake-b", "estimate": 20.0}]}
    for _ in range(20):
        queue_job(here, "fake-paid", estimated=HOLD, params=BRIDGE, routing=routing)
    open_circuit(here, "fake-paid")
    asked: list[str] = []

    def nobody_runs(name: str) -> bool:
        asked.append(name)
        return False

    here.runner.served_elsewhere = nobody_runs
    for dispatch in range(1, 4):
        assert here.scheduler._claim_ready({}) == []
        assert asked == ["fake-b"] * dispatch


def test_failing_an_unserved_backlog_reads_each_job_as_it_is_and_stops_when_its_worker_is_back(
        build: Build, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.queue import Scheduler

    before = Services.build(make_settings(engines="fake-paid=tests.fakes:factory"))
    try:
        accepted, first, later = (queue_job(before, "fake-paid", estimated=HOLD, params=BRIDGE) for _ in range(3))
    finally:
        asyncio.run(before.aclose())
    services = build("fake-free=tests.fakes:free_factory")
    services.scheduler.unserved_grace = 0
    real_fail = Scheduler._fail_unknown_engine
    back = False

    def fail(self: Scheduler, job: Any, engine: str) -> None:
        nonlocal back
        job_id = job if isinstance(job, str) else job.id
        if job_id == accepted:
            # Since the backlog was listed, the engine's worker ran it, the provider accepted its
            # work, and a stop queued it again to be followed.
            with services.db.transaction() as s:
                s.execute(update(Job).where(col(Job.id) == accepted).values(
                    provider_work={"engine": "fake-paid", "handles": [{"id": "accepted"}]}))
        real_fail(self, job, engine)
        back = job_id == first  # and the worker is back now, to take the rest

    monkeypatch.setattr(Scheduler, "_fail_unknown_engine", fail)
    monkeypatch.setattr(services.scheduler.presence, "serves", lambda engine: back)
    with services.db.transaction() as s:  # the backlog is listed in this order
        for minute, job_id in enumerate((accepted, first, later)):
            s.execute(update(Job).where(col(Job.id) == job_id).values(created_at=utcnow() + timedelta(minutes=minute)))
    services.scheduler._fail_unserved()
    assert ledger_of(services, accepted) == [("hold", HOLD, False), ("capture", HOLD, True)]
    assert read_job(services, first).status == "failed"
    assert ledger_of(services, first) == [("hold", HOLD, False), ("release", HOLD, False)]
    assert read_job(services, later).status == "queued"
    assert ledger_of(services, later) == [("hold", HOLD, False)]


def test_a_queued_job_of_an_engine_that_could_not_be_created_fails(build: Build) -> None:
    # A plugin whose factory raised at start: listed (with why), but nothing can run its jobs.
    services = build("fake-paid=tests.fakes:no_such_factory")
    assert "fake-paid" in services.registry.broken
    job_id = queue_job(services, "fake-paid", estimated=HOLD, params=BRIDGE)
    services.scheduler.unserved_grace = 0
    services.scheduler._fail_unserved()
    job = read_job(services, job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "engine_unavailable"
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("release", HOLD, False)]


def test_an_unknown_engines_job_with_accepted_work_is_charged_for_reconciliation(build: Build) -> None:
    # A job waiting to be reattached after a crash: the provider had accepted its work, which bills
    # on whether or not this service can still follow it.
    services = build("fake-free=tests.fakes:free_factory")
    job_id = queue_job(services, "gone-engine", estimated=HOLD, params=BRIDGE, attempt=1,
                       provider_work={"engine": "gone-engine", "handles": [{"id": "req-1"}]})
    other = queue_job(services, "fake-free", estimated=0, params=BRIDGE)

    claims = services.scheduler._claim_ready({})
    assert [claim.job.id for claim, _lane in claims] == [other]  # the known engine's job still runs
    services.scheduler.unserved_grace = 0
    services.scheduler._fail_unserved()
    job = read_job(services, job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "engine_unavailable"
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("capture", HOLD, True)]


# -- a free server whose `forget` raises --------------------------------------------------------------


def test_a_restarted_free_job_runs_even_when_forgetting_the_dead_attempts_work_fails(build: Build) -> None:
    services = build("fake-free=tests.fakes:forget_failing_factory")
    fakes.FORGET_TRIED.clear()
    job_id = queue_job(services, "fake-free", estimated=0, params={**BRIDGE, "prompt": "restarted free job"},
                       attempt=1, provider_work={"engine": "fake-free", "handles": [{"id": "x"}]})
    job = claim_and_run(services, job_id)
    assert job.status == "succeeded", job.error
    assert job.attempt == 2
    assert fakes.FORGET_TRIED == [{"id": "x"}]  # it was the restart path, and its forget did fail
    assert "restarted" in states(services, job_id)
    assert services.jobs.asset_ids([job_id])[job_id] != []
    assert ledger_of(services, job_id) == []  # free: nothing held, nothing charged


# -- provider work that cannot be followed ----------------------------------------------------------


@pytest.mark.parametrize(("engine", "handles"), [
    ("fake-paid", [{"id": "x"}]),  # an engine that cannot reattach at all
    ("fake-queue", [{"id": "a"}, {"id": "b"}]),  # one that can, but not from these handles
])
def test_a_paid_job_whose_accepted_work_cannot_be_followed_is_not_sent_again(
        build: Build, engine: str, handles: list[dict[str, Any]]) -> None:
    services = build("fake-paid=tests.fakes:factory,fake-queue=tests.fakes:queue_factory,"
                     "fake-free=tests.fakes:free_factory")
    # A free candidate is left in the routing: not even a fallback may send the job again.
    routing = {"candidates": [{"engine": engine}, {"engine": "fake-free"}]}
    job_id = queue_job(services, engine, estimated=HOLD, params={**BRIDGE, "prompt": f"accepted on {engine}"},
                       attempt=1, routing=routing, provider_work={"engine": engine, "handles": handles})
    sent = list(fakes.SENT)
    job = claim_and_run(services, job_id)
    assert sent == fakes.SENT  # nothing was sent, anywhere
    assert job.status == "failed", job.error
    assert job.engine == engine
    assert job.error is not None and "cannot be followed" in job.error["message"], job.error
    assert services.jobs.asset_ids([job_id])[job_id] == []
    assert ledger_of(services, job_id) == [("hold", HOLD, False), ("capture", HOLD, True)]
    assert "reattached" not in states(services, job_id)
    assert services.engine_health.state(engine) == "ok"  # the interruption was not the engine's failure


# -- idempotency keys' expiry -----------------------------------------------------------------------


def test_idempotency_keys_expire_by_age_whatever_they_made(build: Build) -> None:
    services = build("fake-free=tests.fakes:free_factory")
    now = utcnow()
    young, old = now - timedelta(hours=1), now - idempotency.TTL - timedelta(hours=1)
    project_id, finished, unfinished = new_id("prj"), new_id("job"), new_id("job")
    with services.db.transaction() as s:
        s.add(Project(id=project_id, name="keys", policy="balanced"))
        s.flush()
        jobs: tuple[tuple[str, JobStatus], ...] = ((finished, "succeeded"), (unfinished, "queued"))
        for job_id, status in jobs:
            s.add(Job(id=job_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                      params=DRAFT, status=status))
        grant = services.ledger.grant(s, project_id, 1_000)
        s.flush()
        rows: dict[str, tuple[dict[str, Any], Any]] = {
            "young-finished-job": ({"job_id": finished}, young),
            "old-finished-job": ({"job_id": finished}, old),
            "old-unfinished-job": ({"job_id": unfinished}, old),
            "young-project": ({"project_id": project_id}, young),
            "old-project": ({"project_id": project_id}, old),
            "old-grant": ({"ledger_entry_id": grant.id}, old),
        }
        for key, (made, created_at) in rows.items():
            s.add(IdempotencyKey(key=key, scope="test", request_hash="0" * 64, created_at=created_at, **made))

    def keys() -> list[str]:
        with services.db.session() as s:
            return sorted(s.exec(select(IdempotencyKey.key)).all())

    assert idempotency.forget_expired(services.db, now=now) == 3
    assert keys() == ["old-unfinished-job", "young-finished-job", "young-project"]
    assert idempotency.forget_expired(services.db, now=now) == 0  # the young ones are kept
    # Once they too are older than the TTL, they go; the unfinished job's key still waits for it.
    assert idempotency.forget_expired(services.db, now=now + idempotency.TTL) == 2
    assert keys() == ["old-unfinished-job"]


# -- progress of other types than the protocol's ------------------------------------------------


def test_progress_of_odd_types_is_told_as_json_and_plain_integers(build: Build,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin's step of 2.5 (or a numpy integer) went into the job row as a float (or a blob)
    that the job could no longer be read with (422, 500 for every listing holding it); a state
    detail JSON cannot carry (a datetime) broke every stream of the job, reconnects included; a
    CMYK preview failed its every read."""
    import json

    from orchestrator.runner import JobRunner

    written: list[tuple[int, int]] = []
    previews: list[str] = []

    class Kept(dict[str, Any]):  # the previews a job keeps for its stream and writes (behind it)
        def __setitem__(self, job_id: str, preview: Any) -> None:
            previews.append(preview.image.mode)
            super().__setitem__(job_id, preview)

    monkeypatch.setattr(JobRunner, "write_progress", lambda self, claim, step, total: written.append((step, total)))
    monkeypatch.setattr(JobRunner, "write_preview", lambda self, job_id, preview: None)
    monkeypatch.setattr("orchestrator.runner.PROGRESS_WRITE_INTERVAL", 0.0)
    services = build("fake-paid=tests.fakes:factory")
    services.runner.previews = Kept()
    job_id = queue_job(services, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "odd-progress"}})
    job = claim_and_run(services, job_id)
    assert job.status == "succeeded", job.error
    events = services.bus._jobs[job_id].snapshot()
    for event in events:
        json.loads(event.sse().split("data: ", 1)[1])  # every event can be sent
    steps = [(e.data["step"], e.data["total"]) for e in services.bus._jobs[job_id].history if e.type == "progress"]
    assert all(type(step) is int and type(total) is int for step, total in steps), steps
    assert written and all(type(step) is int and type(total) is int for step, total in written), written
    assert previews and set(previews) == {"RGB"}  # the CMYK preview, kept as RGB
    with services.db.session() as s:
        handles = s.get(Job, job_id).provider_work["handles"]  # type: ignore[union-attr,index]
    assert {"at": "2026-11-30", "id": "fake-1-odd"} in handles


def test_a_step_count_past_what_the_row_holds_is_scaled_to_it() -> None:
    """3e9 steps (bytes of a download) failed the job's every write on PostgreSQL (a 32-bit
    column): the job stayed running with its hold."""
    from orchestrator.runner import MAX_STEPS, JobProgress

    told: list[dict[str, Any]] = []

    class Bus:
        def publish(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
            told.append(data)

    runner = type("Runner", (), {"bus": Bus(), "previews": {}})()
    claim = type("Claim", (), {"cancel": CancelToken(), "engine_ended": None,
                               "job": Job(id="job_1", project_id="prj_1", stage="bridge", engine="fake-paid")})()
    progress = JobProgress(runner, claim)
    progress.step(int(1.5e9), int(3e9))
    assert (told[-1]["step"], told[-1]["total"]) == (MAX_STEPS // 2, MAX_STEPS)
    assert (claim.job.progress_step, claim.job.progress_total) == (MAX_STEPS // 2, MAX_STEPS)


def test_what_a_plugin_says_it_used_is_stored_as_it_can_be_however_deep() -> None:
    from orchestrator.runner import _storable_values

    said = {"lora": [{"name": "ink\x00wash", "weight": 0.8}], "sampler": ("euler\ud800", 2), "\x00key": None}
    assert _storable_values(said) == {"lora": [{"name": "ink\ufffdwash", "weight": 0.8}],
                                      "sampler": ["euler\ufffd", 2], "\ufffdkey": None}


def test_a_fallback_passed_over_for_its_open_circuit_is_named_in_the_failure(build: Build) -> None:
    # The job failed on its engine with no word of the candidate never tried: a client read that
    # no fallback was routed, and an operator looked for a routing mistake.
    services = build("fake-paid=tests.fakes:factory,fake-free=tests.fakes:free_factory")
    open_circuit(services, "fake-free")
    job_id = queue_job(services, "fake-paid", estimated=HOLD, params={**BRIDGE, "tags": {"fake": "fail"}},
                       routing={"candidates": [{"engine": "fake-paid"}, {"engine": "fake-free"}]})
    job = claim_and_run(services, job_id)
    assert (job.status, job.engine) == ("failed", "fake-paid") and job.error is not None
    assert job.error["details"]["fallbacks_skipped"] == [{"engine": "fake-free", "reason": "circuit_open"}]


def test_a_job_of_an_unserved_engine_waits_while_one_candidate_is_priced_out_and_another_cools(
        build: Build, make_settings: SettingsFactory) -> None:
    # One candidate over the job's cap failed it, though the other's circuit would close.
    before = Services.build(make_settings(engines="fake-b=tests.routing:fake_b_factory"))
    try:
        job_id = queue_job(before, "fake-b", estimated=0, params=BRIDGE, routing={
            "candidates": [{"engine": "fake-b"}, {"engine": "fake-paid"}, {"engine": "fake-free"}],
            "max_credits": 0.001})
    finally:
        asyncio.run(before.aclose())
    services = build("fake-paid=tests.fakes:factory,fake-free=tests.fakes:free_factory")
    health = services.runner.health
    open_circuit(services, "fake-free")
    services.scheduler.unserved_grace = 0
    services.scheduler._fail_unserved()
    [claim] = services.scheduler._moves
    services.scheduler._moves.clear()  # the dispatcher's to take
    asyncio.run(services.runner.run(claim))
    assert (read_job(services, job_id).status, read_job(services, job_id).engine) == ("queued", "fake-b")
    health.succeeded("fake-free", "bridge", 1.0)  # its circuit closes: the job moves there
    services.scheduler._fail_unserved()
    [claim] = services.scheduler._moves
    services.scheduler._moves.clear()  # the dispatcher's to take
    asyncio.run(services.runner.run(claim))
    job = claim_and_run(services, job_id)
    assert (job.status, job.engine) == ("succeeded", "fake-free"), job.error


def test_a_job_of_two_images_that_falls_back_to_comfyui_renders_both_and_holds_nothing_after(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    """A paid engine's retryable failure moves a job of n=2 to ComfyUI: one prompt per image, both
    stored, the paid hold released and nothing captured for a server that bills nobody."""
    import respx

    from tests.tiers.conftest import png_bytes
    from tests.tiers.test_comfyui import BASE as COMFY
    from tests.tiers.test_comfyui import mock_server, write_workflow

    services = Services.build(make_settings(engines="fake-paid=tests.fakes:factory", comfyui_url=COMFY,
                                            comfyui_workflow=str(write_workflow(tmp_path))))
    try:
        engine = services.registry.get("comfyui")
        engine.follow_progress = False  # type: ignore[attr-defined]  # respx's host has no websocket
        engine.poll_interval = 0  # type: ignore[attr-defined]
        source = services.store.put(png_bytes())
        job_id = queue_job(services, "fake-paid", estimated=2 * HOLD,
                           params={**BRIDGE, "n": 2, "source_sha256": source, "tags": {"fake": "fail"}},
                           routing={"candidates": [{"engine": "fake-paid"}, {"engine": "comfyui"}]})
        moved = claim_and_run(services, job_id)
        assert (moved.status, moved.engine) == ("queued", "comfyui"), moved.error
        with respx.mock:
            routes = mock_server()
            job = claim_and_run(services, job_id)
        assert job.status == "succeeded", job.error
        assert routes["prompt"].call_count == 2 and routes["view"].call_count == 2
        seeds = [json.loads(call.request.content)["prompt"]["3"]["inputs"]["seed"] for call in routes["prompt"].calls]
        assert len(set(seeds)) == 2  # two images, not one twice
        with services.db.session() as s:
            assets = s.exec(select(Asset).where(col(Asset.job_id) == job_id)).all()
        assert len(assets) == 2 and {a.engine for a in assets} == {"comfyui"}
        # Recorded as ComfyUI's: the job's model and each image's, with the seeds it sent (5, then 6).
        assert job.model == "comfyui:img2img" and (job.progress_step, job.progress_total) == (2, 2)
        assert sorted((a.index, a.seed, a.model) for a in assets) == [(0, 5, "comfyui:img2img"),
                                                                      (1, 6, "comfyui:img2img")]
        assert ledger_of(services, job_id) == [("hold", 2 * HOLD, False), ("release", 2 * HOLD, False)]
    finally:
        asyncio.run(services.aclose())


def test_a_replicate_job_followed_after_a_crash_keeps_and_charges_each_prediction_on_its_own(
        make_settings: SettingsFactory) -> None:
    """n=3 reattached: p-1 gone at Replicate, p-2 made its image, p-3 never ran. The job fails with
    p-2's image as its asset, charged for two images' share (p-1 unknown, p-2 made), unreconciled."""
    import respx

    from tests.tiers.conftest import png_bytes

    base = "https://replicate.test"
    services = Services.build(make_settings(replicate_api_key="r-secret", replicate_base_url=base))
    try:
        engine = services.registry.get("replicate")
        params = {**BRIDGE, "n": 3, "width": 1024, "height": 1024}
        estimate = engine.estimate(render_request(params))
        job_id = queue_job(services, "replicate", estimated=estimate, params=params,
                           model="google/nano-banana-2",
                           provider_work={"engine": "replicate", "handles": [{"id": f"p-{i}"} for i in (1, 2, 3)]})
        with respx.mock:
            respx.get(f"{base}/v1/predictions/p-1").mock(return_value=httpx.Response(404, json={"detail": "gone"}))
            respx.post(f"{base}/v1/predictions/p-1/cancel").mock(return_value=httpx.Response(404))
            respx.get(f"{base}/v1/predictions/p-2").mock(return_value=httpx.Response(200, json={
                "id": "p-2", "status": "succeeded", "output": "https://cdn.replicate.test/p-2.png", "metrics": {}}))
            respx.get("https://cdn.replicate.test/p-2.png").mock(return_value=httpx.Response(200, content=png_bytes()))
            respx.get(f"{base}/v1/predictions/p-3").mock(return_value=httpx.Response(200, json={
                "id": "p-3", "status": "failed", "error": "no capacity", "started_at": None, "metrics": {}}))
            job = claim_and_run(services, job_id)
        assert job.status == "failed" and job.error is not None, job.error
        assert "2 of 3 predictions failed, 1 made" in job.error["message"]
        with services.db.session() as s:
            assets = s.exec(select(Asset).where(col(Asset.job_id) == job_id)).all()
        assert len(assets) == 1
        share = -(-estimate * 2 // 3)
        assert ledger_of(services, job_id) == [("hold", estimate, False), ("capture", share, True),
                                               ("release", estimate - share, False)]
    finally:
        asyncio.run(services.aclose())


def test_a_replicate_job_canceled_while_followed_after_a_crash_is_not_charged_for_a_prediction_never_run(
        make_settings: SettingsFactory) -> None:
    """n=2 reattached and canceled while p-1 (which ran) is polled: p-2's withdrawing cancel answers
    that it never started. The job's whole estimate was captured; now p-1's share is, unreconciled."""
    import respx

    base = "https://replicate.test"
    services = Services.build(make_settings(replicate_api_key="r-secret", replicate_base_url=base))
    try:
        engine = services.registry.get("replicate")
        params = {**BRIDGE, "n": 2, "width": 1024, "height": 1024}
        estimate = engine.estimate(render_request(params))
        job_id = queue_job(services, "replicate", estimated=estimate, params=params,
                           model="google/nano-banana-2",
                           provider_work={"engine": "replicate", "handles": [{"id": f"p-{i}"} for i in (1, 2)]})
        claims = services.scheduler._claim_ready({})
        claim = claims[0][0]

        def processing(_request: httpx.Request) -> httpx.Response:
            claim.cancel.cancel()  # the user's cancel, as the poll is answered
            return httpx.Response(200, json={"id": "p-1", "status": "processing", "metrics": {}})

        with respx.mock:
            respx.get(f"{base}/v1/predictions/p-1").mock(side_effect=processing)
            respx.post(f"{base}/v1/predictions/p-1/cancel").mock(return_value=httpx.Response(200, json={
                "id": "p-1", "status": "canceled", "started_at": "2026-12-07T08:00:00Z", "metrics": {}}))
            later = respx.post(f"{base}/v1/predictions/p-2/cancel").mock(return_value=httpx.Response(200, json={
                "id": "p-2", "status": "canceled", "started_at": None, "metrics": {}}))
            asyncio.run(services.runner.run(claim))
        job = read_job(services, job_id)
        assert job.status == "canceled" and later.call_count == 1
        share = -(-estimate // 2)
        assert ledger_of(services, job_id) == [("hold", estimate, False), ("capture", share, True),
                                               ("release", estimate - share, False)]
    finally:
        asyncio.run(services.aclose())


def test_a_stability_answer_whose_finish_reason_is_error_fails_the_job_storing_and_charging_nothing(
        make_settings: SettingsFactory) -> None:
    """providers.md: Stability charges nothing for a failed generation. An answer saying
    `finish_reason: ERROR` with an image was stored as the job's image, its estimate captured."""
    import respx

    from tests.tiers.conftest import png_bytes

    base = "https://stability.test"
    services = Services.build(make_settings(stability_api_key="sk-stab", stability_base_url=base))
    try:
        engine = services.registry.get("stability")
        source = services.store.put(png_bytes())
        params = {**BRIDGE, "width": 1024, "height": 1024, "source_sha256": source}
        estimate = engine.estimate(render_request(params))
        job_id = queue_job(services, "stability", estimated=estimate, params=params, model="sd3.5-large")
        with respx.mock:
            sd3 = respx.post(f"{base}/v2beta/stable-image/generate/sd3").mock(return_value=httpx.Response(
                200, json={"image": base64.b64encode(png_bytes()).decode(), "finish_reason": "ERROR", "seed": 5}))
            job = claim_and_run(services, job_id)
        assert sd3.call_count == 1
        assert job.status == "failed" and job.error is not None and job.error["code"] == "engine_error", job.error
        assert "finish_reason ERROR" in job.error["message"]
        with services.db.session() as s:
            assert s.exec(select(Asset).where(col(Asset.job_id) == job_id)).all() == []
        assert ledger_of(services, job_id) == [("hold", estimate, False), ("release", estimate, False)]
    finally:
        asyncio.run(services.aclose())


@pytest.mark.parametrize("installed_here", [False, True])
def test_a_fallback_under_the_rule_the_budget_picks_now_moves_to_an_engine_only_another_worker_has(
        make_settings: SettingsFactory, tmp_path: Path, installed_here: bool) -> None:
    # The project crossed the policy's `budget_used_over` share after the job was routed: its
    # fallback follows the rule that applies now (fake-b alone), which this process has not but a
    # live worker has. Judged by this process's engines alone, the rule read as one no engine may
    # take: the job failed (`budget_rule`), where the rule it was routed by moved it to that worker.
    from tests.routing import FAKE_B_PRICE
    from tests.routing.conftest import write_policies
    from tests.routing.test_fallback import NARROW_FALLBACK_POLICY

    folder = write_policies(tmp_path / "policies", {"narrow-fallback-test": NARROW_FALLBACK_POLICY})
    b = "fake-b=tests.routing:fake_b_factory"
    here = Services.build(make_settings(engines="fake-paid=tests.fakes:factory" + (f",{b}" if installed_here else ""),
                                        policy_dir=folder))
    there = Services.build(make_settings(engines=b, policy_dir=folder))
    try:
        if installed_here:  # its key given to the other host only: left off here, priced here
            engine: Any = here.registry.get("fake-b")
            engine = getattr(engine, "wrapped", engine)
            engine.reachable = False
            engine.availability = lambda: (False, "no key")
        there.scheduler.presence.enter(there.scheduler.owner, there.scheduler.engines())
        policy = here.policies.get("narrow-fallback-test")
        routing: dict[str, Any] = {
            "policy": policy.name, "policy_hash": policy.content_hash, "rule": "paid", "chosen": "fake-paid",
            "candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE, "skipped": None},
                           {"engine": "fake-b", "estimate": FAKE_B_PRICE, "skipped": None}],
            "max_credits": None}
        job_id = new_id("job")
        with here.db.transaction() as s:
            project = Project(id=new_id("prj"), name="rule now", policy=policy.name, budget_limit=200_000,
                              budget_period="month")
            s.add(project)
            s.flush()
            job = Job(id=job_id, project_id=project.id, stage="bridge", engine="fake-paid", model="fake-1",
                      params={**BRIDGE, "tags": {"fake": "fail"}}, estimated=HOLD, status="queued",
                      routing=routing)
            s.add(job)
            s.flush()
            here.ledger.hold(s, project, job, HOLD)
            # Another client's work, held since the job was routed: 165 of 200 credits, past 80%.
            s.add(LedgerEntry(project_id=project.id, kind="hold", amount=165_000, created_at=utcnow()))
        job = claim_and_run(here, job_id)
        assert job.error is None, job.error
        assert (job.status, job.engine) == ("queued", "fake-b")
        assert job.routing is not None and (job.routing["rule"], job.routing["rule_before"]) == ("narrow", "paid")
        assert ledger_of(here, job_id) == [("hold", HOLD, False), ("release", HOLD, False),
                                           ("hold", int(FAKE_B_PRICE * 1000), False)]
        job = claim_and_run(there, job_id)
        assert (job.status, job.engine) == ("succeeded", "fake-b"), job.error

        # A private request never goes to an engine this process cannot judge to keep it local.
        private_id = new_id("job")
        with here.db.transaction() as s:
            row = s.get(Project, project.id)
            assert row is not None
            private = Job(id=private_id, project_id=project.id, stage="bridge", engine="fake-paid", model="fake-1",
                          params={**BRIDGE, "tags": {"fake": "fail", "privacy": "local"}}, estimated=HOLD,
                          status="queued", routing=routing)
            s.add(private)
            s.flush()
            here.ledger.hold(s, row, private, HOLD)
        private = claim_and_run(here, private_id)
        assert (private.status, private.engine) == ("failed", "fake-paid")
        assert private.error is not None
        assert [skip["reason"] for skip in private.error["details"]["fallbacks_skipped"]] == ["budget_rule"]
    finally:
        for services in (here, there):
            asyncio.run(services.aclose())


def test_a_job_off_an_unserved_engine_waits_for_the_open_circuit_of_the_rule_the_budget_picks_now(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    # No process has fake-paid any more (its job movable: local-hifi, a recorded candidate, is
    # here); the project crossed the policy's `budget_used_over` share since the job was routed,
    # and the rule that applies now names fake-b alone, whose circuit is open. Judged with the
    # circuits, that rule read as one no engine may take (`budget_rule`), and the job was failed,
    # where a candidate kept off by its circuit alone leaves it waiting for it.
    from tests.routing import FAKE_B_PRICE
    from tests.routing.conftest import write_policies
    from tests.routing.test_fallback import NARROW_FALLBACK_POLICY

    folder = write_policies(tmp_path / "policies", {"narrow-fallback-test": NARROW_FALLBACK_POLICY})
    services = Services.build(make_settings(engines="fake-b=tests.routing:fake_b_factory", policy_dir=folder))
    try:
        policy = services.policies.get("narrow-fallback-test")
        routing: dict[str, Any] = {
            "policy": policy.name, "policy_hash": policy.content_hash, "rule": "paid", "chosen": "fake-paid",
            "candidates": [{"engine": "fake-paid", "estimate": fakes.FAKE_PRICE, "skipped": None},
                           {"engine": "fake-b", "estimate": FAKE_B_PRICE, "skipped": None},
                           {"engine": "local-hifi", "estimate": 0.0, "skipped": None}],
            "max_credits": None}
        job_id = new_id("job")
        with services.db.transaction() as s:
            project = Project(id=new_id("prj"), name="rule now", policy=policy.name, budget_limit=200_000,
                              budget_period="month")
            s.add(project)
            s.flush()
            job = Job(id=job_id, project_id=project.id, stage="bridge", engine="fake-paid", model="fake-1",
                      params=BRIDGE, estimated=HOLD, status="queued", routing=routing)
            s.add(job)
            s.flush()
            services.ledger.hold(s, project, job, HOLD)
            s.add(LedgerEntry(project_id=project.id, kind="hold", amount=165_000, created_at=utcnow()))
        open_circuit(services, "fake-b")
        services.scheduler.unserved_grace = 0
        services.scheduler._fail_unserved()
        [claim] = services.scheduler._moves
        asyncio.run(services.runner.run(claim))
        job = read_job(services, job_id)
        assert (job.status, job.engine) == ("queued", "fake-paid"), job.error
        assert ledger_of(services, job_id) == [("hold", HOLD, False)]
    finally:
        asyncio.run(services.aclose())


TAG_FIRST_POLICY = """
name = "tag-first-test"
description = "Tagged private work on local-hifi; every other bridge kept on this machine by a rule."

[[rules]]
name = "tagged"
match = { tags = { privacy = "local" } }
engines = ["local-hifi"]
private = true

[[rules]]
name = "studio"
match = { stage = ["bridge", "polish"] }
engines = ["fake-paid", "local-hifi"]
private = true
"""


def test_a_fallback_without_a_budget_keeps_the_rule_a_private_rule_routed_it_by(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    """A request the `studio` rule keeps local is recorded with tags.privacy=local (`JobService.job_params`).
    Its fallback, in a project with no budget at all, matched the policy again on those tags and
    took the `tagged` rule for one the budget's share picked: the job's routing rewritten with a
    rule_before, where a project with no budget follows its recorded decision as it did before
    `budget_used_over` was judged again at fallback."""
    from tests.routing.conftest import write_policies

    folder = write_policies(tmp_path / "policies", {"tag-first-test": TAG_FIRST_POLICY})
    services = Services.build(make_settings(engines="fake-paid=tests.fakes:factory", policy_dir=folder))
    try:
        router = services.runner.router
        assert router is not None
        decision = router.decide("tag-first-test", render_request(BRIDGE), None, None, circuits=False)
        assert (decision.rule, decision.private) == ("studio", True)
        params = {**BRIDGE, "tags": {"privacy": "local"}}  # as the job records a private rule's request
        job_id = queue_job(services, "local-hifi", estimated=0, params=params, routing=decision.as_dict())
        with services.db.session() as s:
            job = s.get(Job, job_id)
        assert job is not None
        assert services.runner._routing_now(job, render_request(params), job.routing or {}) is None
        # Judged under the move's lock as well: the recorded rule given back, no RuleChanged.
        assert router.rule_for("tag-first-test", render_request(params), None, decision.policy_hash,
                               routed="studio") == "studio"
    finally:
        asyncio.run(services.aclose())


@pytest.mark.parametrize("hurried", [False, True], ids=["stop", "stop-twice"])
def test_a_stop_waits_for_a_canceled_stability_job_to_keep_the_answer_it_paid_for(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, hurried: bool) -> None:
    """A user's cancel lets a generate call out answer within `output_kept_seconds`, then lets that
    answer be read within as long again, to keep its image. A stop right after the cancel waited
    only STOP_WAIT_SECONDS (as long as one window): an answer read past it was left to recovery,
    its paid image lost and the hold captured `unknown`. The windows are shortened here, kept equal.
    A second stop signal leaves it to recovery at once, as it does the paid requests still out."""
    import respx

    from orchestrator import queue
    from tests.tiers.conftest import png_bytes
    from tiers.stability import StabilityEngine

    monkeypatch.setattr(queue, "STOP_WAIT_SECONDS", 2.0)
    real_result = StabilityEngine._result

    def slow_result(self: StabilityEngine, response: httpx.Response, req: RenderRequest) -> Any:
        time.sleep(1.5)  # a large answer decoded: past the stop's wait, within the read's window
        return real_result(self, response, req)

    monkeypatch.setattr(StabilityEngine, "_result", slow_result)
    base = "https://stability.test"
    services = Services.build(make_settings(stability_api_key="sk-stab", stability_base_url=base))
    try:
        engine: Any = services.registry.get("stability")
        engine = getattr(engine, "wrapped", engine)
        assert isinstance(engine, StabilityEngine)
        engine.output_kept_seconds = 2.0  # as long as the stop's wait
        source = services.store.put(png_bytes())
        params = {**BRIDGE, "width": 1024, "height": 1024, "source_sha256": source}
        estimate = engine.estimate(render_request(params))
        job_id = queue_job(services, "stability", estimated=estimate, params=params, model="sd3.5-large")
        out = asyncio.Event()

        async def answered_late(_request: httpx.Request) -> httpx.Response:
            out.set()
            await asyncio.sleep(1.0)  # within the call's window from the cancel
            return httpx.Response(200, json={"image": base64.b64encode(png_bytes()).decode(),
                                             "finish_reason": "SUCCESS", "seed": 5})

        async def scenario() -> None:
            await services.scheduler.dispatch()
            await asyncio.wait_for(out.wait(), 10)
            assert services.scheduler.cancel(job_id)  # the user's cancel, as the call is out
            if hurried:
                services.scheduler.hurry()
            await services.scheduler.stop()  # and a stop at once

        with respx.mock:
            respx.post(f"{base}/v2beta/stable-image/generate/sd3").mock(side_effect=answered_late)
            asyncio.run(scenario())
        job = read_job(services, job_id)
        with services.db.session() as s:
            assets = s.exec(select(Asset).where(col(Asset.job_id) == job_id)).all()
        if hurried:  # left running, its hold to be settled by the recovery
            assert (job.status, assets, ledger_of(services, job_id)) == ("running", [], [("hold", estimate, False)])
            return
        assert job.status == "canceled", (job.status, job.error)
        assert len(assets) == 1
        assert ledger_of(services, job_id) == [("hold", estimate, False), ("capture", estimate, False)]
    finally:
        asyncio.run(services.aclose())
