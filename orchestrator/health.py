"""Engine health: a circuit breaker per engine and observed latencies per engine and stage.

After `threshold` consecutive failures an engine's circuit opens: routing skips it for
`cooldown` seconds, and jobs queued for it wait (or move to another candidate of their routing);
then one job is let through as a probe (half-open): the first one routed (or fallen back) to it,
reserved with its routing (`reserve`) and held from its commit (`adopt`) until its verdict, or the
first queued one admitted to start (`admit`). A success closes
the circuit; a failed probe opens it again; a probe that ends without a verdict (canceled, refused
as bad input) lets the next one through, and one that never reports (its job deleted by a crash)
after `cooldown` seconds.

Every process sharing the database sees the same breakers and latencies: what a process observes
counts at once in its own routing, and `sync` (every `ORCH_POLL_INTERVAL`, from the service)
writes it to the `engine_health` table and takes what the others wrote, so an API server in front
of separate workers routes around an engine its workers found failing, and `fastest` knows their
latencies. The half-open probe is per process: each process may let one through.

Openings and successes are stamped and judged by one clock all processes share (`_wall`): on
PostgreSQL the database server's, as hosts' own clocks differ; on SQLite (one host) this host's.
And no process waits more than a cooldown after it learned of an opening (by its monotonic clock),
whatever the wall clocks say (this host's may step back, NTP).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from sqlmodel import select

from orchestrator.clock import utcnow
from orchestrator.models import EngineHealthRow

if TYPE_CHECKING:
    from orchestrator.db import Database

Health = Literal["ok", "degraded", "open"]
LATENCY_WINDOW = 50
# Observations kept for the next sync while the database cannot take them: the newest ones.
MAX_UNSYNCED = 1000


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    # Where the latest success counted stands in the engine's history (its `_Observation.order`):
    # what happened before it, told after it by a process whose sync waited, does not undo it.
    succeeded_at: float | None = None
    # When this process learned of `opened_at` (its monotonic clock): the circuit has been open at
    # least that long, whatever the wall clocks say.
    opened_seen: float = 0.0
    # The job this process let through as the half-open probe, and when that lapses (monotonic
    # clock); never shared.
    probe: str | None = None
    probe_until: float = 0.0
    # Requests holding a reservation `probe` names (retries of one request share it: see `reserve`).
    holders: int = 0
    latencies: dict[str, deque[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Observation:
    engine: str
    at: float
    # Where it stands among the engine's observations: its wall time, but never before what this
    # process already knew of (the latest success counted, the circuit's opening), as it happened
    # after that whatever the clocks say. A host whose clock runs behind another's, or stepped back
    # (NTP), otherwise saw its failures ignored until its clock passed a success it had been told of.
    order: float
    stage: str | None = None
    seconds: float | None = None  # set for a success
    # Stamped by this host's clock, before this process first read the database's (see `_wall`):
    # when, by its monotonic clock, so that its first sync on PostgreSQL stamps it by the database's.
    host_seen: float | None = None

    def restamped(self, offset: float) -> _Observation:
        """Stamped by the database's clock, `offset` from the monotonic one, if it was by this
        host's: a circuit opened before the first sync by a host a day behind, shared as stamped, was
        past its cooldown on every process (this one too, its time a day on after the sync). Its
        order is that time too: what this process knew of then was only what it saw itself, all of
        it stamped again by the monotonic clock, in the order it was seen. (Kept as far above its
        time as it was, a success seen after this host's clock stepped back an hour, counted at an
        earlier one's time, stood an hour ahead of the database's clock.)"""
        if self.host_seen is None:
            return self
        at = round(self.host_seen + offset, 6)
        return replace(self, at=at, order=at, host_seen=None)


class EngineHealth:
    def __init__(self, threshold: int = 5, cooldown: float = 60.0,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        # Times only this process keeps (how long it has known of an opening, its probe's lapse).
        # A fake wall clock given (a test's) stands for both unless one is given too.
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        # On PostgreSQL, the database's clock less `monotonic`, as the latest sync read it (see
        # `_wall`); None on SQLite, and until the first sync.
        self._database_offset: float | None = None
        self._circuits: dict[str, _Circuit] = {}
        self._lock = threading.Lock()
        self._unsynced: list[_Observation] = []
        # One sync at a time: a stopping service's last one may meet the periodic one still running.
        self._syncing = threading.Lock()

    def _get(self, engine: str) -> _Circuit:
        return self._circuits.setdefault(engine, _Circuit())

    def state(self, engine: str) -> Health:
        """`open` while this process's routing sends the engine no job but a probe: its cooldown,
        and its half-open probe's time until the verdict (told `degraded`, a dashboard showed the
        engine taking jobs while every request but one went elsewhere)."""
        with self._lock:
            c = self._get(engine)
            if c.opened_at is not None and (self._cooling(c) > 0 or self._probe_out(c, self.monotonic())):
                return "open"
            return "degraded" if c.failures or c.opened_at is not None else "ok"

    def allow(self, engine: str, holder: str | None = None) -> bool:
        """May a job go to `engine` now? In half-open state, only while no probe is out, or the
        probe is `holder`'s own reservation (a submit routing again under its project's lock)."""
        with self._lock:
            c = self._get(engine)
            if c.opened_at is None:
                return True
            now = self.monotonic()
            if holder is not None and c.probe == holder and self._probe_out(c, now):
                return True
            return self._cooling(c) <= 0 and not self._probe_out(c, now)

    def probe_out(self, engine: str) -> bool:
        """Whether the circuit is half-open with its probe out (for routing's reason)."""
        with self._lock:
            c = self._get(engine)
            return c.opened_at is not None and self._probe_out(c, self.monotonic())

    def opened_at(self, engine: str) -> float | None:
        """When `engine`'s circuit last opened (by `_wall`); None while it is closed."""
        with self._lock:
            return self._get(engine).opened_at

    def opens_in(self, engine: str) -> float:
        """Seconds until `engine` may be sent a job again, as far as its circuit says: the rest
        of the cooldown, or of its probe's time (it may report sooner); 0 when it may now."""
        with self._lock:
            c = self._get(engine)
            if c.opened_at is None:
                return 0.0
            now = self.monotonic()
            wait = self._cooling(c)
            if self._probe_out(c, now):
                wait = max(wait, c.probe_until - now)
            return max(wait, 0.0)

    def _wall(self) -> float:
        """The time openings and successes are stamped and judged by, which processes share through
        the table. Hosts sharing a PostgreSQL database each have their own clock: an opening stamped
        by a host a day behind the others was past its cooldown on them as soon as they learned of
        it, and each let its probe through at once. There it is the database server's clock, as
        this process's latest write transaction read it (`Database.now`, looked at every sync),
        carried on by this process's monotonic clock, which never steps. On SQLite the processes
        share one host, and its clock (`clock`) is theirs. Until a process's first sync
        (`Services.build` makes one before the first route) it is this host's clock too, and what
        it stamps then is stamped again by the database's at that sync (`_Observation.restamped`)."""
        if self._database_offset is None:
            return self.clock()
        return self.monotonic() + self._database_offset

    def _cooling(self, c: _Circuit) -> float:
        """Seconds of the open circuit's cooldown left (<= 0: over). By the shared clock (`_wall`),
        as openings are shared; but never more than a cooldown after this process learned of the
        opening: one whose time is ahead of that clock (on SQLite, opened by this clock before it
        stepped back; on PostgreSQL, by the database's before it stepped back) kept the circuit
        open, no probe let through, for the step as well."""
        assert c.opened_at is not None
        return self.cooldown - max(self._wall() - c.opened_at, self.monotonic() - c.opened_seen)

    @staticmethod
    def _probe_out(c: _Circuit, now: float) -> bool:
        return c.probe is not None and now < c.probe_until

    def reserve(self, engine: str, token: str) -> bool:
        """For a job about to be committed to `engine`: False when it may not be sent one now (the
        circuit cools, or another request holds its probe); else True, and past the cooldown the
        probe is now `token`'s (see `adopt`, and `finished` for a job that is never made). The look
        and the taking are one step: requests routed together once all became the probe."""
        with self._lock:
            c = self._get(engine)
            if c.opened_at is None:
                return True
            now = self.monotonic()
            if c.probe == token and self._probe_out(c, now):
                c.holders += 1  # a retry of the request holding it (one Idempotency-Key, one token)
                return True
            if self._cooling(c) > 0 or self._probe_out(c, now):
                return False
            c.probe, c.probe_until, c.holders = token, now + self.cooldown, 1
            return True

    def adopt(self, engine: str, token: str, job_id: str) -> None:
        """The job reserved as `token` is committed: the probe, if it held it, is that job's now."""
        with self._lock:
            c = self._get(engine)
            if c.probe == token:
                c.probe, c.holders = job_id, 1

    def admit(self, engine: str, job_id: str) -> bool:
        """May the queued job `job_id` start on `engine` now? Not while the circuit cools, nor
        while another job's probe is out; past the cooldown with no probe out it becomes the probe
        (in one step, as `reserve`). A job queued before the circuit opened waits for the verdict
        rather than meet the failures that opened it (a provider that hangs bills each one)."""
        with self._lock:
            c = self._get(engine)
            if c.opened_at is None:
                return True
            now = self.monotonic()
            if self._probe_out(c, now):
                return c.probe == job_id
            if self._cooling(c) > 0:
                return False
            c.probe, c.probe_until, c.holders = job_id, now + self.cooldown, 1
            return True

    def assign(self, engine: str, job_id: str) -> None:
        """A job starts on `engine`. Past the cooldown with no probe out, it is the probe: nobody
        else is let through until it reports. (Queued jobs are admitted first, see `admit`; one
        that follows work a provider already has starts whatever the circuit says.)"""
        with self._lock:
            c = self._get(engine)
            now = self.monotonic()
            if c.opened_at is not None and not self._probe_out(c, now):
                c.probe, c.probe_until, c.holders = job_id, now + self.cooldown, 1

    def finished(self, engine: str, job_id: str) -> None:
        """A job's call ended, whatever its verdict: if it was the probe, the next may go."""
        with self._lock:
            c = self._get(engine)
            if c.probe == job_id:
                # A reservation retries share is given back by the last of them to end.
                c.holders -= 1
                if c.holders <= 0:
                    c.probe = None

    def succeeded(self, engine: str, stage: str, seconds: float) -> None:
        with self._lock:
            now = self._now()
            self._record(_Observation(engine, now, self._order(engine, now), stage=stage, seconds=seconds,
                                      host_seen=self._host_seen()))

    def failed(self, engine: str) -> None:
        with self._lock:
            now = self._now()
            self._record(_Observation(engine, now, self._order(engine, now), host_seen=self._host_seen()))

    def _host_seen(self) -> float | None:
        return self.monotonic() if self._database_offset is None else None

    def _now(self) -> float:
        # To the microsecond, as the table keeps times: an opening read back from it is the same
        # number (`opened_at`, which the queue keys a waiting job on, changed on its first sync in
        # most cases), and an order is never below one it was made equal to.
        return round(self._wall(), 6)

    def _order(self, engine: str, now: float) -> float:
        c = self._get(engine)
        return max(now, _since(c))

    def _record(self, seen: _Observation) -> None:
        c = self._get(seen.engine)
        self._apply(c, seen)
        c.probe = None  # a verdict: the circuit closed, or opened again
        self._unsynced.append(seen)

    def _apply(self, c: _Circuit, seen: _Observation) -> None:
        # Observations come in the order they are told, which is not the order they happened in
        # across processes: one whose sync waited (a poll interval, the database away) tells what
        # it saw after others told what they saw since. Failures made before a success counted are
        # not "in a row" after it (counted, they opened the circuit of an engine that worked since),
        # and a success made before the circuit opened does not close it (routing sent the next
        # jobs to an engine failing them).
        if seen.seconds is not None:
            assert seen.stage is not None
            c.latencies.setdefault(seen.stage, deque(maxlen=LATENCY_WINDOW)).append(seen.seconds)
            # Before a later success counted, it closes nothing either: failures counted since
            # that one came after it too.
            if seen.order < _since(c):
                return
            c.failures, c.opened_at, c.succeeded_at = 0, None, seen.order
        elif c.succeeded_at is None or seen.order >= c.succeeded_at:
            # Only a success resets the count, so a failed probe (past the cooldown) is over the
            # threshold too and opens the circuit again at once.
            c.failures += 1
            if c.failures >= self.threshold:
                # The cooldown runs on `_wall`: the ordering stamp may be ahead of that clock. A
                # failure told late, made before the circuit (re)opened, does not move the opening
                # back and cut short the cooldown of a failed probe.
                if c.opened_at is None or seen.at > c.opened_at:
                    c.opened_at, c.opened_seen = seen.at, self.monotonic()
                elif seen.at < c.opened_at <= seen.order:
                    # Made after the opening, as this process knew of it, on a clock behind it (a
                    # host ahead opened it, or this clock stepped back): a failed probe opens the
                    # circuit again all the same. Kept as it was, the next job went out as the
                    # probe at once, and every one after it. A microsecond on, as the table keeps
                    # times, tells every process it opened again.
                    c.opened_at, c.opened_seen = round(c.opened_at + 1e-6, 6), self.monotonic()

    def median_latency(self, engine: str, stage: str) -> float | None:
        with self._lock:
            samples = self._get(engine).latencies.get(stage)
            return statistics.median(samples) if samples else None

    def sync(self, db: Database) -> None:
        """Write what this process observed since the last sync; then take every process's view.
        Observations that could not be written are kept for the next sync."""
        with self._syncing:
            self._sync(db)

    def _sync(self, db: Database) -> None:
        with self._lock:
            unsynced, self._unsynced = self._unsynced, []
        offset: float | None = None
        try:
            if not db.is_sqlite:
                # The server's clock as this process's last write transaction read it (no round
                # trip when one was made), carried on by the host's monotonic clock: see `_wall`.
                # Read before the write: should it fail, nothing was written, and the observations
                # kept for the next sync are not counted twice.
                offset = db.now().timestamp() - self.monotonic()
            if unsynced:
                told = unsynced if offset is None else [seen.restamped(offset) for seen in unsynced]
                with db.transaction() as s:  # the write lock: two processes' observations add up
                    rows = {row.engine: row for row in s.exec(select(EngineHealthRow)).all()}
                    for engine in {seen.engine for seen in unsynced}:
                        row = rows.setdefault(engine, EngineHealthRow(engine=engine))
                        circuit = _from_row(row)
                        for seen in told:
                            if seen.engine == engine:
                                self._apply(circuit, seen)
                        _to_row(circuit, row)
                        s.add(row)
                    shared = [(row.engine, _from_row(row)) for row in rows.values()]
            else:
                with db.session() as s:
                    shared = [(row.engine, _from_row(row)) for row in s.exec(select(EngineHealthRow)).all()]
        except BaseException:
            with self._lock:
                self._unsynced = (unsynced + self._unsynced)[-MAX_UNSYNCED:]
            raise
        with self._lock:
            if offset is not None:
                if self._database_offset is None:
                    # Its own circuits were stamped by this host's clock: the table's view, now
                    # stamped by the database's, replaces them, with what was seen meanwhile.
                    self._unsynced = [seen.restamped(offset) for seen in self._unsynced]
                    known = {engine for engine, _ in shared}
                    shared += [(engine, _Circuit()) for engine in self._circuits if engine not in known]
                self._database_offset = offset
            for engine, circuit in shared:
                c = self._get(engine)
                if circuit.opened_at != c.opened_at:
                    c.opened_seen = self.monotonic()
                c.failures, c.opened_at, c.latencies = circuit.failures, circuit.opened_at, circuit.latencies
                c.succeeded_at = circuit.succeeded_at
                # Observed while the database was read: not in the table's view yet. An engine the
                # table does not know kept its own circuit, which already counts them.
                for seen in self._unsynced:
                    if seen.engine == engine:
                        self._apply(c, seen)


def _since(c: _Circuit) -> float:
    """The latest point in `c`'s history a success or opening counted at (-inf: none)."""
    return max(c.succeeded_at if c.succeeded_at is not None else float("-inf"),
               c.opened_at if c.opened_at is not None else float("-inf"))


def _from_row(row: EngineHealthRow) -> _Circuit:
    return _Circuit(failures=row.failures, opened_at=row.opened_at.timestamp() if row.opened_at else None,
                    succeeded_at=row.succeeded_at.timestamp() if row.succeeded_at else None,
                    latencies={stage: deque(_floats(samples), maxlen=LATENCY_WINDOW)
                               for stage, samples in (row.latencies or {}).items()})


def _to_row(c: _Circuit, row: EngineHealthRow) -> None:
    row.failures = c.failures
    row.opened_at = None if c.opened_at is None else datetime.fromtimestamp(c.opened_at, UTC)
    row.succeeded_at = None if c.succeeded_at is None else datetime.fromtimestamp(c.succeeded_at, UTC)
    # A new dict: the JSON column does not see changes made in place.
    row.latencies = {stage: list(samples) for stage, samples in c.latencies.items()}
    row.updated_at = utcnow()


def _floats(samples: Iterable[object]) -> list[float]:
    return [float(x) for x in samples if isinstance(x, (int, float))]
