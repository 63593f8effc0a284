"""Engine health shared by the processes of one database (`EngineHealth.sync`): each instance
here stands for one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from orchestrator.db import Database
from orchestrator.health import EngineHealth
from orchestrator.models import EngineHealthRow
from orchestrator.services import Services
from orchestrator.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1_790_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def process(clock: Clock) -> EngineHealth:
    return EngineHealth(threshold=3, cooldown=30.0, clock=clock)


def test_a_circuit_a_worker_opened_is_open_for_the_api_server(db: Database, clock: Clock) -> None:
    worker, api = process(clock), process(clock)
    for _ in range(3):
        worker.failed("gemini")
    assert worker.state("gemini") == "open"
    api.sync(db)
    assert api.state("gemini") == "ok"  # nothing written yet
    worker.sync(db)
    api.sync(db)
    assert api.state("gemini") == "open" and not api.allow("gemini")
    clock.now += 31  # cooled down: the API server may route a probe again
    assert api.state("gemini") == "degraded" and api.allow("gemini")


def test_failures_seen_by_two_processes_add_up(db: Database, clock: Clock) -> None:
    one, two = process(clock), process(clock)
    one.failed("fal")
    one.failed("fal")
    two.failed("fal")
    assert one.state("fal") == two.state("fal") == "degraded"  # 2 and 1: neither reached 3 alone
    one.sync(db)
    two.sync(db)
    assert two.state("fal") == "open"
    one.sync(db)
    assert one.state("fal") == "open"


def test_a_success_elsewhere_closes_the_circuit_and_latencies_are_shared(db: Database, clock: Clock) -> None:
    one, two = process(clock), process(clock)
    for _ in range(3):
        one.failed("stability")
    one.sync(db)
    for seconds in (2.0, 4.0, 9.0):
        two.succeeded("stability", "polish", seconds)
    two.sync(db)
    one.sync(db)
    assert one.state("stability") == "ok" and one.allow("stability")
    assert one.median_latency("stability", "polish") == 4.0
    assert one.median_latency("stability", "bridge") is None
    with db.session() as s:
        row = s.exec(select(EngineHealthRow)).one()
    assert (row.engine, row.failures, row.opened_at, row.latencies) == ("stability", 0, None,
                                                                        {"polish": [2.0, 4.0, 9.0]})


def test_a_failed_probe_reopens_the_shared_circuit(db: Database, clock: Clock) -> None:
    one, two = process(clock), process(clock)
    for _ in range(3):
        one.failed("openai")
    one.sync(db)
    clock.now += 31
    one.assign("openai", "job-probe")  # the half-open probe
    one.failed("openai")
    one.finished("openai", "job-probe")
    one.sync(db)
    two.sync(db)
    assert two.state("openai") == "open"


def test_observations_a_sync_could_not_write_are_kept_for_the_next(db: Database, clock: Clock,
                                                                   tmp_path: Path) -> None:
    worker = process(clock)
    for _ in range(3):
        worker.failed("replicate")
    broken = Database(f"sqlite:///{tmp_path / 'missing' / 'o.db'}")  # no tables: the write fails
    with pytest.raises(OperationalError):
        worker.sync(broken)
    broken.dispose()
    assert worker.state("replicate") == "open"  # still its own view
    worker.sync(db)
    api = process(clock)
    api.sync(db)
    assert api.state("replicate") == "open"


def test_services_share_engine_health_while_they_run(make_settings: Callable[..., Settings]) -> None:
    """A process reads the shared view when it is built, writes its own every poll interval while
    it runs, and once more as it stops."""
    settings = make_settings(engines="fake-paid=tests.fakes:factory", run_jobs=False, poll_interval=0.05)

    async def scenario() -> None:
        worker, api = Services.build(settings), Services.build(settings)
        try:
            worker.listen()
            api.listen()
            for _ in range(api.engine_health.threshold):
                worker.engine_health.failed("fake-paid")
            async with asyncio.timeout(30):  # two syncs in threads: seconds on a busy machine
                while api.health("fake-paid") != "open":
                    await asyncio.sleep(0.02)
            worker.engine_health.succeeded("fake-paid", "bridge", 1.5)
        finally:
            await worker.aclose()  # its last sync carries the success
            await api.aclose()
        later = Services.build(settings)
        try:
            assert later.health("fake-paid") == "ok"
            assert later.engine_health.median_latency("fake-paid", "bridge") == 1.5
        finally:
            await later.aclose()

    asyncio.run(scenario())


def test_what_waits_for_the_database_is_bounded(db: Database, clock: Clock, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orchestrator.health.MAX_UNSYNCED", 5)
    worker = EngineHealth(threshold=100, cooldown=30.0, clock=clock)
    for _ in range(8):
        worker.failed("replicate")
    broken = Database(f"sqlite:///{tmp_path / 'missing' / 'o.db'}")
    with pytest.raises(OperationalError):
        worker.sync(broken)
    broken.dispose()
    worker.sync(db)
    with db.session() as s:
        assert s.exec(select(EngineHealthRow)).one().failures == 5  # the newest five were kept


def test_a_database_away_is_told_once_not_every_poll_interval(make_settings: Callable[..., Settings],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    services = Services.build(make_settings(run_jobs=False, poll_interval=0.01))
    failures = 0

    def unreachable(db: Database) -> None:
        nonlocal failures
        failures += 1
        if failures <= 5:
            raise OperationalError("SELECT", {}, Exception("database is locked"))

    services.engine_health.sync = unreachable  # type: ignore[method-assign]

    async def scenario() -> None:
        services.listen()
        deadline = time.monotonic() + 30
        while failures < 7 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert failures >= 7, failures
        await services.aclose()

    with caplog.at_level(logging.INFO, logger="orchestrator.services"):
        asyncio.run(scenario())
    told = [r for r in caplog.records if "engine health" in r.getMessage() and r.levelno >= logging.INFO]
    assert [(r.levelno, r.getMessage().split(";")[0]) for r in told] == [
        (logging.WARNING, "sharing engine health failed"),
        (logging.INFO, "sharing engine health works again (after 5 failed tries)")]


def test_a_failure_seen_while_a_sync_reads_counts_once(db: Database, clock: Clock,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic sync runs in a thread: a job's failure can land between its look at the
    table and its update of this process's view. Counted twice, an engine's first failure opened
    a circuit with a threshold of 2 (a flaky breaker test under coverage)."""
    api = EngineHealth(threshold=2, cooldown=30.0, clock=clock)
    api.succeeded("fake-b", "bridge", 1.0)
    api.sync(db)  # a row for another engine: the table is not empty
    real_session = db.session

    @contextlib.contextmanager
    def session_with_a_failure_meanwhile() -> Iterator[Session]:
        with real_session() as s:
            yield s
        api.failed("fake-paid")  # the runner, on the event loop, while the sync thread reads

    monkeypatch.setattr(db, "session", session_with_a_failure_meanwhile)
    api.sync(db)
    assert api.state("fake-paid") == "degraded"
    monkeypatch.setattr(db, "session", real_session)
    api.sync(db)  # writes it: still one failure, here and in the table
    assert api.state("fake-paid") == "degraded"
    other = process(clock)
    other.sync(db)
    with db.session() as s:
        assert s.get(EngineHealthRow, "fake-paid").failures == 1  # type: ignore[union-attr]


def test_one_probe_at_a_time_from_its_routing_to_its_verdict(clock: Clock) -> None:
    """A half-open circuit lets one job through. Once it was taken only when the job started, so
    every job routed meanwhile went too; and any job's end, not just the probe's, let more through."""
    health = process(clock)
    for _ in range(3):
        health.failed("gemini")
    clock.now += 31
    assert health.allow("gemini") and not health.probe_out("gemini")
    health.assign("gemini", "job-p")  # routed: queued, not started yet
    assert not health.allow("gemini") and health.probe_out("gemini")
    health.assign("gemini", "job-q")  # queued before the circuit opened, starting now: not the probe
    health.finished("gemini", "job-q")  # canceled, say: no verdict, and not the probe
    assert not health.allow("gemini")
    health.finished("gemini", "job-p")  # the probe ended without a verdict: the next may go
    assert health.allow("gemini")
    health.assign("gemini", "job-r")
    assert not health.allow("gemini")
    health.succeeded("gemini", "bridge", 2.0)
    assert health.allow("gemini") and health.state("gemini") == "ok"


def test_a_queued_job_is_admitted_only_as_the_probe(clock: Clock) -> None:
    health = process(clock)
    assert health.admit("gemini", "job-a") and health.admit("gemini", "job-b")  # closed: all go
    for _ in range(3):
        health.failed("gemini")
    assert not health.admit("gemini", "job-a")  # cooling: it waits, and takes no probe
    clock.now += 31
    assert health.admit("gemini", "job-a") and not health.admit("gemini", "job-b")
    assert health.admit("gemini", "job-a")  # looked at again, it is still the probe
    assert not health.reserve("gemini", "submit-c")  # nor may a new request take it
    health.finished("gemini", "job-a")  # not claimed after all (another worker was first)
    assert health.admit("gemini", "job-b")


def test_a_probe_is_reserved_in_one_step_and_lapses_unless_adopted(clock: Clock) -> None:
    health = process(clock)
    for _ in range(3):
        health.failed("gemini")
    assert not health.reserve("gemini", "submit-a")  # cooling: no job may go
    clock.now += 31
    assert health.reserve("gemini", "submit-a") and not health.reserve("gemini", "submit-b")
    health.finished("gemini", "submit-a")  # its request made no job (refused, a replay, a copy)
    assert health.reserve("gemini", "submit-b")
    health.adopt("gemini", "submit-b", "job-b")
    health.finished("gemini", "submit-b")  # the reservation's own release: the job holds it now
    assert not health.allow("gemini")
    health.finished("gemini", "job-b")
    assert health.allow("gemini") and health.reserve("openai", "submit-c")  # a closed circuit: nothing held


def test_retries_of_one_request_share_its_probe_until_the_last_lets_go(clock: Clock) -> None:
    # One Idempotency-Key, one token: a retry that failed before its replay (the database away)
    # gave back the probe the first request still held, and another request took a second one.
    health = process(clock)
    for _ in range(3):
        health.failed("gemini")
    clock.now += 31
    assert health.reserve("gemini", "submit-key") and health.reserve("gemini", "submit-key")
    assert not health.reserve("gemini", "submit-other")
    health.finished("gemini", "submit-key")  # the retry ends: the first request still holds it
    assert not health.reserve("gemini", "submit-other")
    health.adopt("gemini", "submit-key", "job-k")  # the first request's job is the probe
    health.finished("gemini", "submit-key")  # and its reservation's own release changes nothing
    assert not health.reserve("gemini", "submit-other")
    health.finished("gemini", "job-k")
    assert health.reserve("gemini", "submit-other")


def test_a_probe_that_never_reports_lapses_after_the_cooldown(clock: Clock) -> None:
    health = process(clock)
    for _ in range(3):
        health.failed("fal")
    clock.now += 31
    health.assign("fal", "job-lost")  # its process died before it ran
    clock.now += 29
    assert not health.allow("fal")
    clock.now += 2
    assert health.allow("fal")


def test_a_circuit_that_is_closed_has_no_probe(clock: Clock) -> None:
    health = process(clock)
    health.failed("openai")  # degraded, not open
    health.assign("openai", "job-1")
    assert health.allow("openai") and not health.probe_out("openai")


def test_failures_told_late_do_not_outweigh_a_success_seen_after_them(db: Database, clock: Clock) -> None:
    """Consecutive failures are counted in the order they happened, across processes: a process
    whose sync waited (the database away, or a poll interval) tells failures made before another
    process's success, and they were counted after it, opening the circuit of an engine that had
    worked since."""
    one, two = process(clock), process(clock)
    for _ in range(3):
        one.failed("gemini")
    clock.now += 1
    two.succeeded("gemini", "bridge", 2.0)
    two.sync(db)
    clock.now += 1
    one.sync(db)
    two.sync(db)
    assert one.state("gemini") == two.state("gemini") == "ok"
    # A failure after the success still counts: one more, and the shared count is 1.
    one.failed("gemini")
    one.sync(db)
    with db.session() as s:
        assert s.get(EngineHealthRow, "gemini").failures == 1  # type: ignore[union-attr]


def test_a_success_told_late_does_not_close_a_circuit_opened_after_it(db: Database, clock: Clock) -> None:
    """The other way round: a success a process could not tell at once (its sync waited) closed
    the circuit that failures seen after it had opened, and routing sent the next jobs to an engine
    failing them."""
    one, two = process(clock), process(clock)
    two.succeeded("fal", "polish", 3.0)
    clock.now += 1
    for _ in range(3):
        one.failed("fal")
    one.sync(db)
    clock.now += 1
    two.sync(db)
    one.sync(db)
    assert one.state("fal") == two.state("fal") == "open"
    assert two.median_latency("fal", "polish") == 3.0  # its latency counts all the same


def test_a_clock_stepped_back_after_a_success_does_not_keep_the_circuit_closed(clock: Clock) -> None:
    """One process, its clock stepped back an hour (NTP) after a success: the failures it sees
    next happened after that success whatever the clock says, and open the circuit as before; were
    they compared with the success's wall time, none counted for the hour."""
    health = process(clock)
    health.succeeded("gemini", "bridge", 2.0)
    clock.now -= 3600
    for _ in range(3):
        health.failed("gemini")
    assert health.state("gemini") == "open"
    clock.now += 31  # the cooldown runs on the clock as it is now, not an hour and a half
    assert health.state("gemini") == "degraded" and health.allow("gemini")


def test_a_clock_stepped_back_while_open_does_not_ignore_the_next_success(clock: Clock) -> None:
    health = process(clock)
    for _ in range(3):
        health.failed("fal")
    clock.now -= 3600
    health.succeeded("fal", "polish", 3.0)  # a job that followed work the provider already had
    assert health.state("fal") == "ok" and health.opened_at("fal") is None


def test_a_success_from_a_host_whose_clock_runs_ahead_does_not_stop_failures_seen_after_it(
        db: Database, clock: Clock) -> None:
    """A host a day ahead tells a success; a process that read it then sees failures: they
    happened after it, and open the circuit for every process, not a day later."""
    ahead = EngineHealth(threshold=3, cooldown=30.0, clock=lambda: clock.now + 86400)
    worker, api = process(clock), process(clock)
    ahead.succeeded("gemini", "bridge", 2.0)
    ahead.sync(db)
    worker.sync(db)
    clock.now += 1
    for _ in range(3):
        worker.failed("gemini")
    assert worker.state("gemini") == "open"
    worker.sync(db)
    api.sync(db)
    ahead.sync(db)
    assert worker.state("gemini") == api.state("gemini") == "open"
    # The host ahead shares the opening (its own clock says the cooldown is over: a skew of its own).
    assert ahead.opened_at("gemini") == worker.opened_at("gemini") is not None


def test_a_success_told_late_does_not_undo_failures_seen_after_a_later_success(
        db: Database, clock: Clock) -> None:
    """Three processes: one's success, then two failures of another's; a success the third made
    before all of them, told last, is not the latest success and leaves those two failures counted
    (it reset them to 0, so the next failure left the engine degraded, not open)."""
    one, two, late = process(clock), process(clock), process(clock)
    late.succeeded("fal", "polish", 3.0)
    clock.now += 1
    one.succeeded("fal", "polish", 3.0)
    one.sync(db)
    clock.now += 1
    two.sync(db)
    two.failed("fal")
    two.failed("fal")
    two.sync(db)
    clock.now += 1
    late.sync(db)
    two.failed("fal")
    two.sync(db)
    late.sync(db)
    assert two.state("fal") == late.state("fal") == "open"
    assert late.median_latency("fal", "polish") == 3.0


def test_failures_told_late_do_not_shorten_the_cooldown_of_a_circuit_opened_after_them(
        db: Database, clock: Clock) -> None:
    """A failure a process could not tell at once (its sync waited), made before a failed probe
    opened the circuit again, moved the opening back to its own time: the next probe went out at
    once instead of a cooldown after the failed one."""
    one, two = process(clock), process(clock)
    for _ in range(3):
        one.failed("gemini")
    one.sync(db)
    clock.now += 20
    two.failed("gemini")  # not told until later
    clock.now += 11  # cooled down: one's probe fails, the circuit opens again
    assert one.allow("gemini")
    one.assign("gemini", "probe-1")
    one.failed("gemini")
    one.sync(db)
    reopened = one.opened_at("gemini")
    clock.now += 5
    two.sync(db)
    one.sync(db)
    assert one.opened_at("gemini") == two.opened_at("gemini") == reopened
    assert one.state("gemini") == two.state("gemini") == "open" and not two.allow("gemini")
    clock.now += 15  # 31 s after the failure told late, 20 s after the failed probe
    assert two.state("gemini") == "open" and not two.allow("gemini")


def test_an_opening_reads_back_from_the_table_as_the_same_time(db: Database, clock: Clock) -> None:
    """The table keeps times to the microsecond: an opening seen at a time finer than that read
    back as another number on its first sync, and the queue, which keys a job waiting for the
    verdict on the engine's `opened_at`, took the circuit for one opened again since."""
    one, two = process(clock), process(clock)
    clock.now = 1_790_000_000.1234567
    for _ in range(3):
        one.failed("gemini")
    opened = one.opened_at("gemini")
    one.sync(db)
    two.sync(db)
    assert one.opened_at("gemini") == two.opened_at("gemini") == opened is not None
    one.failed("gemini")  # a late one: the opening stands
    one.sync(db)
    assert one.opened_at("gemini") == opened


class Monotonic:
    """A process's monotonic clock: it moves on when the test moves it, never back."""

    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


def test_a_clock_stepped_back_while_open_does_not_keep_the_circuit_open_for_the_step(clock: Clock) -> None:
    """The cooldown ran on the wall clock alone: stepped back an hour (NTP) just after the circuit
    opened, it kept it open, no probe let through, for an hour and the cooldown."""
    mono = Monotonic()
    health = EngineHealth(threshold=3, cooldown=30.0, clock=clock, monotonic=mono)
    for _ in range(3):
        health.failed("gemini")
    clock.now -= 3600
    clock.now += 20
    mono.now += 20
    assert health.state("gemini") == "open" and not health.allow("gemini")
    assert health.opens_in("gemini") == pytest.approx(10.0)
    clock.now += 11
    mono.now += 11
    assert health.allow("gemini") and health.opens_in("gemini") == 0.0
    assert health.admit("gemini", "job-probe") and not health.admit("gemini", "job-next")
    clock.now -= 3600  # the probe lapses after its cooldown whatever the wall clock does
    mono.now += 31
    assert health.admit("gemini", "job-next")


def test_a_circuit_a_host_ahead_opened_cools_down_a_cooldown_after_it_is_learned(
        db: Database, clock: Clock) -> None:
    """A host a day ahead opens the circuit: every other process kept it open for a day, its
    opening a day ahead of their clocks. It has been open at least since they learned of it."""
    ahead = EngineHealth(threshold=3, cooldown=30.0, clock=lambda: clock.now + 86400)
    mono = Monotonic()
    api = EngineHealth(threshold=3, cooldown=30.0, clock=clock, monotonic=mono)
    for _ in range(3):
        ahead.failed("fal")
    ahead.sync(db)
    api.sync(db)
    clock.now += 20
    mono.now += 20
    assert api.state("fal") == "open" and api.opens_in("fal") == pytest.approx(10.0)
    clock.now += 11
    mono.now += 11
    assert api.allow("fal") and api.state("fal") == "degraded"
    api.sync(db)  # the same opening read again does not restart its cooldown
    assert api.allow("fal")


def test_a_failed_probe_on_a_clock_stepped_back_opens_the_circuit_again(clock: Clock) -> None:
    """Past the cooldown by the monotonic clock (the wall clock stepped back an hour), the probe
    failed at a wall time before the opening: the opening stood, so the circuit stayed half-open
    and the next job went out as the probe at once, and every one after it."""
    mono = Monotonic()
    health = EngineHealth(threshold=3, cooldown=30.0, clock=clock, monotonic=mono)
    for _ in range(3):
        health.failed("gemini")
    opened = health.opened_at("gemini")
    assert opened is not None
    clock.now -= 3600
    clock.now += 31
    mono.now += 31
    assert health.admit("gemini", "job-probe")
    health.failed("gemini")
    health.finished("gemini", "job-probe")
    assert health.state("gemini") == "open" and not health.admit("gemini", "job-next")
    assert health.opens_in("gemini") == pytest.approx(30.0)
    reopened = health.opened_at("gemini")
    assert reopened is not None and reopened > opened
    clock.now += 20
    mono.now += 20
    assert not health.allow("gemini")
    clock.now += 11
    mono.now += 11
    assert health.admit("gemini", "job-next")


def test_a_probe_failed_behind_a_host_ahead_opens_the_circuit_again_everywhere(
        db: Database, clock: Clock) -> None:
    """A host a day ahead opened the circuit; a process behind it let its probe through a
    cooldown after it learned of it, and the probe failed at its own time, a day before the
    opening: no process saw the circuit open again, and that one sent every next job as a probe."""
    ahead = EngineHealth(threshold=3, cooldown=30.0, clock=lambda: clock.now + 86400)
    mono, mono2 = Monotonic(), Monotonic()
    api = EngineHealth(threshold=3, cooldown=30.0, clock=clock, monotonic=mono)
    worker = EngineHealth(threshold=3, cooldown=30.0, clock=clock, monotonic=mono2)
    for _ in range(3):
        ahead.failed("fal")
    ahead.sync(db)
    api.sync(db)
    worker.sync(db)
    clock.now += 31
    mono.now += 31
    mono2.now += 31
    assert api.reserve("fal", "probe-token")
    api.failed("fal")
    api.finished("fal", "probe-token")
    assert api.state("fal") == "open" and not api.allow("fal")
    api.sync(db)
    worker.sync(db)
    ahead.sync(db)
    assert api.opened_at("fal") == worker.opened_at("fal") == ahead.opened_at("fal")
    assert worker.state("fal") == "open" and worker.opens_in("fal") == pytest.approx(30.0)
    clock.now += 20
    mono.now += 20
    mono2.now += 20
    assert not api.allow("fal") and not worker.allow("fal")
    clock.now += 11
    mono.now += 11
    mono2.now += 11
    assert api.allow("fal") and worker.allow("fal")


def _age(h: EngineHealth, engine: str, seconds: float) -> None:
    """As if `seconds` passed on both real clocks, without a sleep (a loaded machine's syncs took
    most of a short cooldown): the circuit's wall and monotonic times alike moved back."""
    c = h._circuits[engine]
    assert c.opened_at is not None
    c.opened_at -= seconds
    c.opened_seen -= seconds
    c.probe_until -= seconds


def test_the_real_clocks_are_not_mixed(db: Database) -> None:
    """Openings are wall clock (time.time), probes and how long a process has known of an opening
    its monotonic clock (time.monotonic): different epochs, so a comparison of one with the other
    is off by decades and shows as a circuit never open, or open for good. Fake clocks stand one
    for both and cannot tell."""
    one, two = EngineHealth(threshold=2, cooldown=60.0), EngineHealth(threshold=2, cooldown=60.0)
    assert one.monotonic is time.monotonic and one.clock is time.time
    for _ in range(2):
        one.failed("fal")
    opened = one.opened_at("fal")
    assert opened is not None and abs(opened - time.time()) < 5
    one.sync(db)
    two.sync(db)
    for h in (one, two):
        assert h.opened_at("fal") == opened
        assert h.state("fal") == "open" and not h.allow("fal") and not h.admit("fal", "early")
        assert not h.reserve("fal", "early") and not h.probe_out("fal")
        assert 0 < h.opens_in("fal") <= 60
        _age(h, "fal", 61)
        assert h.allow("fal") and h.opens_in("fal") == 0.0 and h.state("fal") == "degraded"
    assert one.reserve("fal", "token") and two.admit("fal", "job-2")
    for h, mine, other in ((one, "token", "job-x"), (two, "job-2", "job-y")):
        assert h.probe_out("fal") and h.state("fal") == "open" and 0 < h.opens_in("fal") <= 60
        assert not h.allow("fal") and h.allow("fal", mine) and not h.admit("fal", other)
        _age(h, "fal", 61)  # neither reported: the probes lapse
        assert not h.probe_out("fal") and h.allow("fal") and h.state("fal") == "degraded"
    two.assign("fal", "job-3")
    assert two.probe_out("fal") and 0 < two.opens_in("fal") <= 60
    two.failed("fal")  # the probe failed: open again for a cooldown
    two.finished("fal", "job-3")
    reopened = two.opened_at("fal")
    assert reopened is not None and reopened > opened
    assert two.state("fal") == "open" and 0 < two.opens_in("fal") <= 60
    two.sync(db)
    one.sync(db)
    assert one.opened_at("fal") == reopened and one.state("fal") == "open" and not one.allow("fal")
    assert 0 < one.opens_in("fal") <= 60
    one.succeeded("fal", "draft", 1.0)
    assert one.state("fal") == "ok" and one.allow("fal") and one.opens_in("fal") == 0.0


def test_the_real_monotonic_clock_bounds_a_cooldown_the_wall_clock_stepped_back(db: Database) -> None:
    """The same with the real monotonic clock under a wall clock that steps back an hour: how long
    a process has known of an opening is kept on the monotonic clock, or it bounds nothing."""
    step = [0.0]
    one, two = (EngineHealth(threshold=2, cooldown=60.0, clock=lambda: time.time() - step[0],
                             monotonic=time.monotonic) for _ in range(2))
    for _ in range(2):
        one.failed("fal")
    one.sync(db)
    two.sync(db)
    step[0] = 3600.0
    for h in (one, two):
        assert h.state("fal") == "open" and 0 < h.opens_in("fal") <= 60
        h._circuits["fal"].opened_seen -= 61  # 61 s known on the monotonic clock; the wall's went back
        assert h.allow("fal") and h.opens_in("fal") == 0.0
    assert one.admit("fal", "probe")
    one.failed("fal")
    one.finished("fal", "probe")
    assert one.state("fal") == "open" and 0 < one.opens_in("fal") <= 60
    one.sync(db)
    two.sync(db)
    assert two.state("fal") == "open" and 0 < two.opens_in("fal") <= 60 and not two.allow("fal")


def check_a_circuit_a_host_behind_opened_cools_down_on_every_host(db: Database) -> None:
    """Hosts sharing a PostgreSQL database, one a day behind the others: the circuit it opened was
    stamped with its own clock, a day before the others' now, so it was past its cooldown on them
    as soon as they learned of it and each let its half-open probe through at once. Stamped by the
    database's clock, it cools down a cooldown on every host. (Each process reads the database's
    clock at its first sync, as `Services.build` makes one before the first route.)"""
    behind_mono, api_mono = Monotonic(), Monotonic()
    behind = EngineHealth(threshold=3, cooldown=30.0, clock=lambda: time.time() - 86400, monotonic=behind_mono)
    api = EngineHealth(threshold=3, cooldown=30.0, clock=time.time, monotonic=api_mono)
    behind.sync(db)
    api.sync(db)
    for _ in range(3):
        behind.failed("fal")
    behind.sync(db)
    api.sync(db)
    # Real time runs between the two processes' reads of the database's clock: a loaded machine's
    # seconds at most, not a cooldown.
    assert api.state("fal") == "open" and not api.allow("fal") and not api.admit("fal", "early")
    assert 20 < api.opens_in("fal") <= 30 and 20 < behind.opens_in("fal") <= 30
    behind_mono.now += 31
    api_mono.now += 31
    assert api.admit("fal", "probe") and behind.allow("fal")
    # The probe fails: open again for a cooldown on both, whichever host's clock is behind.
    api.failed("fal")
    api.finished("fal", "probe")
    api.sync(db)
    behind.sync(db)
    assert api.opened_at("fal") == behind.opened_at("fal")
    for h in (api, behind):
        assert h.state("fal") == "open" and not h.allow("fal") and 20 < h.opens_in("fal") <= 30
    behind.succeeded("fal", "draft", 1.0)  # a host behind closes it: its success came after the opening
    behind.sync(db)
    api.sync(db)
    assert api.state("fal") == behind.state("fal") == "ok"


def check_what_a_process_saw_before_it_first_synced_is_stamped_by_the_database_s_clock(db: Database) -> None:
    """Until its first sync a process tells the time by its host's clock: the circuit a host a day
    behind opened then, its first sync failing (the database away), was written stamped a day
    before the database's clock, and was past its cooldown on every process as soon as it was
    shared (on its own too, whose time moved a day on with the sync). Its observations are stamped
    again by the database's clock, in the order they were made, when the first sync reads it."""
    behind_mono, api_mono = Monotonic(), Monotonic()
    behind = EngineHealth(threshold=3, cooldown=30.0, clock=lambda: time.time() - 86400, monotonic=behind_mono)
    api = EngineHealth(threshold=3, cooldown=30.0, clock=time.time, monotonic=api_mono)
    api.sync(db)
    behind.succeeded("fal", "draft", 1.0)
    behind_mono.now += 1
    for _ in range(3):
        behind.failed("fal")
    assert behind.state("fal") == "open"
    url = make_url(db.url)
    away = Database(url.set(database=f"{url.database}_away").render_as_string(hide_password=False))  # none such
    with pytest.raises(OperationalError):
        behind.sync(away)
    away.dispose()
    behind.failed("gemini")  # seen between the failed sync and the next
    behind.sync(db)
    api.sync(db)
    for h in (api, behind):
        assert h.state("fal") == "open" and not h.allow("fal") and 20 < h.opens_in("fal") <= 30
        assert h.state("gemini") == "degraded"
    assert behind.opened_at("fal") == api.opened_at("fal")
    behind_mono.now += 31
    api_mono.now += 31
    assert api.admit("fal", "probe") and behind.allow("fal")


def check_a_clock_stepped_back_before_the_first_sync_leaves_no_success_ahead(db: Database) -> None:
    """A host's clock stepped back an hour (NTP) between two successes seen before the process's
    first sync: the second counted at the first's time, an hour on, and stamped again by the
    database's clock kept that hour, so the success it wrote stood an hour ahead of the database's
    clock, and for that hour a success another process told late closed a circuit failures after
    it had opened. Stamped again, they are where the monotonic clock saw them, in the same order."""
    host_mono, api_mono = Monotonic(), Monotonic()
    host_wall = [time.time()]
    host = EngineHealth(threshold=3, cooldown=30.0, clock=lambda: host_wall[0], monotonic=host_mono)
    api = EngineHealth(threshold=3, cooldown=30.0, clock=time.time, monotonic=api_mono)
    api.sync(db)
    host.succeeded("fal", "draft", 1.0)
    host_wall[0] -= 3600
    host_mono.now += 1
    host.succeeded("fal", "draft", 1.0)
    host.sync(db)
    api.sync(db)
    api_mono.now += 1
    api.succeeded("fal", "draft", 1.0)  # its sync waits
    host_mono.now += 2
    for _ in range(3):
        host.failed("fal")
    host.sync(db)
    api.sync(db)  # the success told late, made before the failures that opened the circuit
    host.sync(db)
    assert api.state("fal") == host.state("fal") == "open"


def check_a_circuit_opened_while_the_first_sync_runs_is_judged_by_the_database_s_clock(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A circuit a process opened by its host's clock, a day behind, while its first sync ran (the
    runner, on the event loop, meanwhile): kept as stamped once the sync had read the database's
    clock, it was past its cooldown here at once, until the next sync wrote it."""
    mono = Monotonic()
    behind = EngineHealth(threshold=3, cooldown=30.0, clock=lambda: time.time() - 86400, monotonic=mono)
    behind.failed("fal")  # something to write: the first sync takes the write lock
    real_transaction = db.transaction

    @contextlib.contextmanager
    def transaction_with_failures_meanwhile() -> Iterator[Session]:
        with real_transaction() as s:
            yield s
        for _ in range(3):
            behind.failed("gemini")

    monkeypatch.setattr(db, "transaction", transaction_with_failures_meanwhile)
    behind.sync(db)
    monkeypatch.setattr(db, "transaction", real_transaction)
    assert behind.state("gemini") == "open" and 20 < behind.opens_in("gemini") <= 30
    assert behind.state("fal") == "degraded"
    behind.sync(db)
    assert behind.state("gemini") == "open" and 20 < behind.opens_in("gemini") <= 30
