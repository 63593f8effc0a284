"""The durable job queue and its scheduler.

Jobs wait in the `jobs` table; the scheduler claims them in turns by project, oldest first within
each (one project's backlog cannot starve another's), with a concurrency limit
per lane: one lane per local device (limit 1: a GPU runs one pipeline at a time) and one per
remote engine. A claim bumps `attempt` and takes a lease that a heartbeat renews. A job submitted
in this process wakes the scheduler at once; jobs other processes queued (an API server that runs
none, see `orchestrator.workers`) are found when their commit rings this process's bell
(`orchestrator.bells`), or else at the look every `ORCH_POLL_INTERVAL`, and so are cancels other
processes ask of the jobs this one holds.

Recovery (at start-up, and by the periodic sweeper for leases that expired): a job left `running`
by a dead process whose cancel had been asked ends `canceled`. Otherwise it is re-queued when its
engine is local (nothing was spent and the work is reproducible), when its remote engine costs
nothing (a self-hosted server: it runs again), when its attempt had sent no billable request yet
(its hold kept), or when a queueing provider had accepted it and the engine can reattach to that
work (the runner then follows it instead of sending anything); any other remote job is failed
with `interrupted` (the provider may have made and billed the image; it is not sent twice). No job
stays `running` forever: one its processes died under `MAX_RECOVERIES` times is failed. A job of an
engine this process lacks is left to the workers that have it, and for `unserved_grace` seconds
after the last of them is gone (it may be restarting); a holder of this machine whose owner lock is
held keeps its job past its lease, unless that lease stays unrenewed for `HUNG_HOLDER_LEASES` leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from orchestrator import device_time, webhooks
from orchestrator.adopt import Adoption
from orchestrator.clock import shared_now, utcnow
from orchestrator.db import Database, changed, commit_in_doubt, transient
from orchestrator.errors import Canceled, Interrupted, OrchestratorError, first_line
from orchestrator.events import EventBus, on_loop, woken
from orchestrator.follow import catch_up, tell_end
from orchestrator.jobs import render_request
from orchestrator.ledger import Ledger
from orchestrator.models import NO_LEASE, Job
from orchestrator.outage import Outage
from orchestrator.routing import fallbacks
from orchestrator.runner import FINAL_WRITE_SECONDS, Claim, JobRunner, followable, reattachable, restartable
from orchestrator.workers import DeviceLock, Presence, owner_id
from tiers.base import REMOTE_CONCURRENCY, CancelToken, Engine, Restartable, Withdrawable
from tiers.registry import EngineRegistry, left_off

log = logging.getLogger(__name__)
DISPATCH_RETRY_SECONDS = 1.0
QUEUED_BATCH = 500  # queued jobs of a lane ranked per dispatch
# Of those, the first ones read whole for claiming: a dispatch fills a few free slots, past a
# job whose circuit makes it wait or another worker's claim.
CANDIDATES = 64
# The pseudo-lane of the jobs moved off an engine no process has (see `_move_unserved`).
MOVES_LANE = "moves"
SERVED_REMEMBERED = 10_000  # projects whose last start a scheduler remembers for the turns
# Seconds to the next try after a lease renewal failed (a database busy for a while).
RENEW_RETRY_SECONDS = 2.0
MAX_RECOVERIES = 3  # a job its processes died under this often is failed, not run again
# Leases a holder of this machine whose owner lock is held may leave its expired lease unrenewed
# before it is taken for hung and its job recovered (see `_orphans`).
HUNG_HOLDER_LEASES = 5
# How long a stop waits for interrupted jobs to wind down (a job storing what its engine made is
# waited for longer: see `stop`).
STOP_WAIT_SECONDS = 10.0
# How often a stop waiting for paid requests looks whether one was accepted meanwhile (then it is
# followed after the restart, not waited for).
AWAITED_RECHECK_SECONDS = 0.5


class Scheduler:
    def __init__(self, db: Database, registry: EngineRegistry, runner: JobRunner, bus: EventBus, ledger: Ledger,
                 presence: Presence, *,
                 lease_seconds: float, sweep_interval: float, poll_interval: float = 0.5,
                 device: DeviceLock | None = None, stop_grace: float = 0.0,
                 on_recovered: Callable[[Job, str], Awaitable[None]] | None = None) -> None:
        self.db = db
        self.ledger = ledger
        self.registry = registry
        self.runner = runner
        runner.notify = self.notify
        runner.served_elsewhere = presence.serves
        self.bus = bus
        self.lease = timedelta(seconds=lease_seconds)
        self.sweep_interval = sweep_interval
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        # Local lanes run only while this process holds the device (None: no local engine).
        self.device = device
        self.owner = owner_id()
        if device is not None:
            device.holder = self.owner
        self.presence = presence
        self.on_recovered = on_recovered
        # Lets the device go once this process's local work has stopped (set by the service): a
        # stop waiting out paid requests need not hold up the drafts it queued again.
        self.hand_over_device: Callable[[], Awaitable[None]] | None = None
        self._wake = asyncio.Event()
        self._cancel_wake = asyncio.Event()
        self._device_elsewhere_until = 0.0  # monotonic time; see `_queued`
        # When this process last started a job of each project on each lane (monotonic): within a
        # turn, the project served longest ago there goes first (see `_oldest_queued`).
        self._served: dict[tuple[str, str], float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: dict[str, tuple[asyncio.Task[None], Claim]] = {}
        # Claims committed by a worker thread and not yet started on the loop: a cancel in that
        # gap must reach them, or it would be taken for a cancel of a worker that is gone.
        self._claimed: dict[str, Claim] = {}
        self._limits: dict[str, int] = {}  # each remote engine's concurrency, read once
        self._lane_use: dict[str, int] = {}
        # Held while a worker thread claims: `stop` waits on it, so no claim commits after it.
        self._claim_lock = threading.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        # Engines with queued jobs that no live process has, since when (see `_fail_unserved`);
        # and engines of running jobs this process lacks that no live process has (see `_orphans`).
        self._unserved_since: dict[str, float] = {}
        self._orphans_unserved_since: dict[str, float] = {}
        self.unserved_grace = lease_seconds
        # Queued jobs of such engines claimed by the sweep's thread to be moved to another candidate
        # of their routing (see `_move_unserved`), for the dispatcher to start on the loop.
        self._moves: list[Claim] = []
        self._moves_lock = threading.Lock()  # not the claim lock: the loop takes it
        # Expired leases of live holders of this machine: job id -> (the lease, since when it has
        # been seen unchanged, monotonic), to tell a hung holder (see `_orphans`).
        self._expired_leases: dict[str, tuple[tuple[int, str | None, datetime | None], float]] = {}
        self._forgetting: set[asyncio.Task[None]] = set()  # see `forget_abandoned`
        # Jobs a move off an open circuit found no candidate for, with their engine and when its
        # circuit opened: they wait for its verdict (see `_circuit`) rather than be claimed to be
        # moved again at every dispatch, until it closes or opens anew.
        self._waiting: dict[str, tuple[str, float | None]] = {}
        self._waiting_lock = threading.Lock()  # read by the dispatch thread, written by job ends on the loop
        self._stopping = False
        self._runs_jobs = True  # see `sweep_only`
        self._hurried = asyncio.Event()
        self._cancel_watch: asyncio.Task[None] | None = None
        # More housekeeping for the sweeper (e.g. forgetting old idempotency keys).
        self.sweepers: list[tuple[str, Callable[[], object]]] = []  # more duties of the sweep: (what, duty)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.presence.enter, self.owner, self.engines())
        await self.recover(all_foreign=True)
        await asyncio.to_thread(self._fail_unserved)
        await asyncio.to_thread(self._sweep_ledger)
        await asyncio.to_thread(self._sweep_previews)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        self._cancel_watch = asyncio.create_task(self._cancel_watch_loop(), name="cancel watch")
        self._tasks = [asyncio.create_task(self._dispatch_loop(), name="scheduler"),
                       asyncio.create_task(self._sweep_loop(), name="sweeper"), self._heartbeat, self._cancel_watch]
        self.notify()

    def sweep_only(self) -> None:
        """For a process that runs no jobs (`serve --no-jobs`): the sweep, without failing queued
        jobs of engines this process lacks (the workers' to judge). Behind such a server alone, a
        killed worker's job read `running` until a worker started again. Call it on the loop."""
        self._loop = asyncio.get_running_loop()
        self._runs_jobs = False
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="sweeper"))

    async def stop(self) -> None:
        """Stop claiming and interrupt running work without finishing it: the jobs stay `running`
        so the next start recovers them (local work re-queued, remote work failed as interrupted).
        A paid request already out to a provider that nothing could follow after a restart is
        first given `stop_grace` seconds to answer: its images are kept and charged as usual."""
        self._stopping = True
        if self.device is not None:
            self.device.close(release=False)  # released by the service once the device is idle
        # The heartbeat goes on while jobs wind down: a job storing what it made keeps its lease,
        # or another process would recover it as an orphan meanwhile; so does the watch for
        # cancels asked elsewhere, while jobs are given time to answer.
        for task in self._tasks:
            if task is not self._heartbeat and task is not self._cancel_watch:
                task.cancel()
        awaited = {task for task, claim in self._running.values()
                   if not claim.cancel.cancelled and self._answer_awaited(claim)}
        for task, claim in self._running.values():
            claim.stopping = task in awaited
        # Everything else stops now, before it can send a paid request that the wait below would
        # then abandon (a job still preparing its request is run again after the restart).
        self._abandon(lambda task: task not in awaited)
        if awaited and self.stop_grace > 0:
            await asyncio.to_thread(self._give_back_unstarted)  # their leases are not renewed meanwhile
            log.info("waiting up to %.0f s for %d paid requests already sent to answer before stopping "
                     "(stop again to leave them now)", self.stop_grace, len(awaited))
            # Beside the wait, not before it: a second stop signal is heard while the model unloads.
            handing_over = asyncio.ensure_future(self._hand_over_device(awaited))
            try:
                await self._wait_unless_hurried(awaited, self.stop_grace)
            finally:
                handing_over.cancel()  # not done yet: the service lets the device go once it is idle
                await asyncio.wait({handing_over})  # a cancel of this stop itself still propagates
                if not handing_over.cancelled() and (failed := handing_over.exception()) is not None:
                    log.warning("letting the device go before waiting for paid requests failed: %s", failed)
        if self._cancel_watch is not None:
            self._cancel_watch.cancel()
        self._abandon(lambda task: True)
        running = [task for task, _ in self._running.values()]
        if running:
            await asyncio.wait(running, timeout=STOP_WAIT_SECONDS)
            await self._wait_kept_answers()
            # A job whose engine returned is storing what it made, and may have paid for (a stop
            # does not interrupt that, and its write waits out a busy database): leaving before it
            # ends would let another process recover it as an orphan and discard its images.
            storing = [task for task, claim in self._running.values() if claim.job.id in self.runner.storing]
            if storing:
                log.info("waiting for %d jobs to store their images before stopping", len(storing))
                await asyncio.wait(storing, timeout=FINAL_WRITE_SECONDS + STOP_WAIT_SECONDS)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        # Bounded: a loop that did not hear its cancel must not hold the stop (and the device and
        # owner locks, which go only after it) for ever.
        if tasks := [task for task in self._tasks if task.get_loop() is asyncio.get_running_loop()]:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_WAIT_SECONDS)
            for task in stuck:
                log.warning("the %s task did not stop when asked; stopping without it", task.get_name())
                task.cancel()
        await asyncio.to_thread(self._give_back_unstarted)
        # From here the jobs left running are known to be an orphan's: the next start (or another
        # process's sweep) recovers them without waiting for their leases.
        self.presence.leave(self.owner)

    def stop_claiming(self) -> None:
        """The stop is asked: claim nothing more, at once. The server's stop runs `stop` only once
        its connections have drained (up to 10 s), and a job claimed meanwhile (a submit answered
        then, a lane freed) could send a paid request that `stop` then abandoned, charged unknown
        for an image nobody kept; queued, it runs after the restart. Safe from any thread."""
        self._stopping = True  # read by each claim (`_claim_under_lock`): no claim after this line
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if on_loop(loop):
            self._wake.set()  # the dispatch loop ends now, not at its next poll
        else:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing left to wake
                loop.call_soon_threadsafe(self._wake.set)

    def hurry(self) -> None:
        """A second stop signal: leave the paid requests the stop is waiting for to recovery now.
        Safe from any thread."""
        loop = self._loop
        if loop is None or on_loop(loop):
            self._hurried.set()
        else:
            loop.call_soon_threadsafe(self._hurried.set)

    async def _hand_over_device(self, awaited: set[asyncio.Task[None]]) -> None:
        """Before a stop waits out paid requests: once the work it stopped has ended, another
        process may take the device, and run the local jobs this one queued again, now rather
        than after `stop_grace`."""
        if self.device is None or not self.device.held or self.hand_over_device is None:
            return
        stopped = [task for task, _ in self._running.values() if task not in awaited]
        if stopped:
            await asyncio.wait(stopped, timeout=STOP_WAIT_SECONDS)
        await self.hand_over_device()

    async def _wait_unless_hurried(self, tasks: set[asyncio.Task[None]], timeout: float) -> None:
        hurried = asyncio.ensure_future(self._hurried.wait())
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            pending: set[asyncio.Future[Any]] = set(tasks)
            while pending and not hurried.done():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                _done, pending = await asyncio.wait({*pending, hurried}, timeout=min(left, AWAITED_RECHECK_SECONDS),
                                                    return_when=asyncio.FIRST_COMPLETED)
                pending.discard(hurried)
                # A submit the provider answered meanwhile (fal's, Replicate's): its work is followed
                # after the restart, not waited for to the end of its render (a rolling restart took
                # the render's whole time per worker).
                # And one whose request was answered that nothing was made (a 429 waited out): its
                # retry would go out for the end of the wait to abandon, made and billed for nobody.
                followed = {task for task, claim in self._running.values()
                            if task in pending and not claim.cancel.cancelled
                            and (self._followed(claim) or not self._answer_awaited(claim))
                            and claim.job.id not in self.runner.storing}
                if followed:
                    self._abandon(followed.__contains__)
                    pending -= followed
        finally:
            hurried.cancel()

    async def _wait_kept_answers(self) -> None:
        """Before a stop leaves its jobs: one a user canceled whose engine is letting an answer it
        met end (made and billed, its images kept: `CancelToken.keep`) is waited for to that
        window's end. Left at `STOP_WAIT_SECONDS` (a Stability answer read after its call's
        window), it was recovered, its paid image lost and the hold captured unknown. Bounded:
        each window is, and a read's follows its call's at most once. A second stop signal
        (`hurry`) leaves them to recovery at once, as it does the paid requests still out."""
        loop = asyncio.get_running_loop()
        hurried = asyncio.ensure_future(self._hurried.wait())
        told = False
        try:
            while not hurried.done():
                now = loop.time()
                keeping = {task: until for task, claim in self._running.values()
                           if not task.done() and not claim.cancel.abandoned
                           and (until := claim.cancel.kept_until) is not None and until > now}
                if not keeping:
                    return
                if not told:
                    told = True
                    log.info("waiting for %d canceled jobs to keep the answers they paid for before stopping "
                             "(stop again to leave them now)", len(keeping))
                # Looked at again as each ends: a read's window may follow its call's.
                await asyncio.wait({*keeping, hurried}, timeout=max(keeping.values()) - now,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()

    def _abandon(self, which: Callable[[asyncio.Task[None]], bool]) -> None:
        for task, claim in list(self._running.values()):
            if claim.cancel.cancelled or not which(task):
                continue  # a user's cancel, already on its way, ends as canceled, not interrupted
            claim.shutdown = True
            claim.cancel.cancel(abandon=True)  # provider work is followed again after the restart

    def _answer_awaited(self, claim: Claim) -> bool:
        """Whether a stop should wait for this job: a paid request may be out (nothing says it
        was not) to a provider whose work a restart cannot follow. Local work is run again, a
        self-hosted server's too, and work a provider accepted by id is reattached (or at least
        saved for that): those are left to recovery at once."""
        engine = self.registry.get(claim.job.engine) if claim.job.engine in self.registry else None
        return (engine is not None and engine.kind == "remote" and not isinstance(engine, Restartable)
                and not self._followed(claim) and claim.may_have_paid_out()
                and claim.job.id not in self.runner.storing)  # answered: waited for as it stores, below

    def _followed(self, claim: Claim) -> bool:
        """Whether the work a provider accepted for this job covers it whole, and nothing is being
        stored: a restart follows it. (A Replicate job of n=2 with one prediction accepted was left
        to a recovery that could not follow it: failed, charged.)"""
        engine = self.registry.get(claim.job.engine) if claim.job.engine in self.registry else None
        return (claim.accepted is not None and claim.job.id not in self.runner.storing
                and followable(engine, claim.job, claim.accepted["handles"]))

    def engines(self) -> list[str]:
        """The engines whose jobs this process runs: not a remote one the operator left off here
        (no key, no server), whose jobs, work to follow again included, are left to a process
        that has it, as those of an engine not installed here are (README, *Separate workers*):
        run here, they failed at once, and work a provider had accepted was written off."""
        return [engine.name for engine in self.registry if not left_off(engine)]

    def has_engine(self, name: str) -> bool:
        return name in self.registry and not left_off(self.registry.get(name))

    def notify(self) -> None:
        """Wake the dispatcher; safe from any thread (API handlers run in a thread pool)."""
        loop = self._loop
        if loop is None or on_loop(loop):
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def heard(self) -> None:
        """Another process committed something (`orchestrator.bells`): look at the queue and at
        the cancels of held jobs now instead of at the next poll. Call it on the loop."""
        self._wake.set()
        self._cancel_wake.set()

    # -- claiming ----------------------------------------------------------------------------

    def lane(self, engine_name: str) -> tuple[str, int]:
        engine = self.registry.get(engine_name)
        if engine.kind == "local":
            return "local", 1
        limit = self._limits.get(engine_name)
        if limit is None:
            limit = self._limits[engine_name] = _concurrency(engine)
        return f"remote:{engine_name}", limit

    def holds(self, job_id: str) -> bool:
        """Whether this process has claimed the job and not yet published how it ended."""
        return job_id in self._claimed or job_id in self._running

    async def _dispatch_loop(self) -> None:
        outage = Outage(log, "dispatch", f"retrying every {DISPATCH_RETRY_SECONDS:g} s")
        while not self._stopping:
            # Woken by this process's submits and job ends, and by other processes' bells; the
            # timeout finds what a lost ring did not tell.
            await woken(self._wake, self.poll_interval)
            self._wake.clear()
            try:
                await self.dispatch()
            except Exception as exc:  # a database hiccup must not leave queued jobs waiting for a wake
                outage.failed(exc)
                await asyncio.sleep(DISPATCH_RETRY_SECONDS)
                self._wake.set()
            else:
                outage.recovered()

    async def dispatch(self) -> None:
        # One worker-thread hop per wake-up: look for queued jobs and claim those that fit. Lanes
        # freed meanwhile are not lost: every job's end wakes the dispatcher again.
        claims = await asyncio.to_thread(self._claim_ready, dict(self._lane_use))
        with self._moves_lock:
            moves, self._moves = self._moves, []
        # A move sends nothing: it takes no lane of the engines (its job is queued on its next one's).
        claims += [(claim, MOVES_LANE) for claim in moves]
        for claim, lane in claims:
            self._lane_use[lane] = self._lane_use.get(lane, 0) + 1
            task = asyncio.create_task(self._run(claim, lane), name=f"job {claim.job.id}")
            self._running[claim.job.id] = (task, claim)
            self._claimed.pop(claim.job.id, None)  # after the line above: `cancel` always finds it

    def _claim_ready(self, lane_use: dict[str, int]) -> list[tuple[Claim, str]]:
        """Claim the oldest queued jobs that fit a free lane (`lane_use` is a copy to count on)."""
        with self._claim_lock:
            return self._claim_under_lock(lane_use)

    def _claim_under_lock(self, lane_use: dict[str, int]) -> list[tuple[Claim, str]]:
        claims: list[tuple[Claim, str]] = []
        # Whether another live worker runs an engine, asked once per engine and dispatch: asked for
        # each job of a backlog on an open circuit, it read every lock file 500 times.
        elsewhere: dict[str, bool] = {}
        try:
            for job in self._queued(lane_use):
                if self._stopping:
                    break
                if job.id in self._running:
                    # Queued again while an older attempt still winds down here (taken over after
                    # its lease ran out, or falling back): the job's one entry must stay that
                    # attempt's until it ends, which wakes the dispatcher for the new one.
                    continue
                try:
                    lane, limit = self.lane(job.engine)
                except OrchestratorError:
                    continue  # not an engine of this process (see `_fail_unserved`)
                if lane_use.get(lane, 0) >= limit:
                    continue
                circuit = self._circuit(job, elsewhere)
                if circuit == "wait":
                    continue
                try:
                    claim = self._claim(job, move=circuit == "move")
                finally:
                    if job.id not in self._claimed:  # not claimed: a probe admitted for it goes back
                        self.runner.health.finished(job.engine, job.id)
                if claim is None:
                    continue
                lane_use[lane] = lane_use.get(lane, 0) + 1
                claims.append((claim, lane))
        except Exception as exc:
            if not claims:
                raise
            # Committed claims must run: dropped here, they would wait `running` for their lease.
            # A database blip (a killed connection, a lock wait) is no bug: no traceback for it.
            log.log(logging.WARNING if transient(exc) else logging.ERROR,
                    "dispatch stopped early (%s); starting the %d jobs already claimed", first_line(exc),
                    len(claims), exc_info=not transient(exc))
        return claims

    def _queued(self, lane_use: dict[str, int]) -> list[Job]:
        """The oldest queued jobs, leaving out engines whose lane is full: 500 drafts waiting for
        the local device must not hide a paid job whose lane is free. Local jobs are left out too
        while another process holds the device (see `orchestrator.workers`)."""
        free = []
        local = []
        for engine in self.registry:
            if left_off(engine):
                continue
            lane, limit = self.lane(engine.name)
            if engine.kind == "local":
                local.append(engine.name)
            if lane_use.get(lane, 0) < limit:
                free.append(engine.name)
        device = self.device
        if device is not None and not device.held and time.monotonic() < self._device_elsewhere_until:
            # Another process held the device a moment ago: until the next timed look, the bells
            # (every commit of that busy worker rings) wake this one for other work only.
            free = [name for name in free if name not in local]
        jobs = self._by_lane(free)
        # The device is taken only when there is local work for it, so that a process that never
        # runs a local job leaves it to the workers that do.
        if (device is not None and not device.held and any(j.engine in local for j in jobs)
                and not device.try_acquire()):
            self._device_elsewhere_until = time.monotonic() + self.poll_interval
            jobs = [job for job in jobs if job.engine not in local]
        return jobs

    def _by_lane(self, engines: list[str]) -> list[Job]:
        """`_oldest_of` each lane's engines, lane after lane: ranked in one list, a project's paid
        job newer than 500 of its drafts was not looked at while the local lane took a draft at
        every dispatch, and the paid lane sat idle; and its drafts counted as its turns there."""
        if not engines:
            return []
        with self.db.session() as s:  # from the index alone: lanes with nothing queued cost no look
            waiting = set(s.exec(select(Job.engine).where(col(Job.status) == "queued", col(Job.engine).in_(engines))
                                 .group_by(col(Job.engine))).all())
        lanes: dict[str, list[str]] = {}
        for name in engines:
            if name in waiting:
                lanes.setdefault(self.lane(name)[0], []).append(name)
        return [job for names in lanes.values() for job in self._oldest_of(names)]

    def _oldest_of(self, engines: list[str]) -> list[Job]:
        """`_oldest_queued`, the jobs of engines whose circuit is open after the others': most of
        them wait (see `_circuit`), and a backlog of them must not crowd the rest out of the batch."""
        health = self.runner.health
        with self._waiting_lock:  # those whose engine's circuit has closed wait no more
            if self._waiting:
                self._waiting = {job_id: (engine, opened) for job_id, (engine, opened) in self._waiting.items()
                                 if health.opened_at(engine) is not None}
        cooling = [name for name in engines if not health.allow(name)]
        jobs = self._oldest_queued([name for name in engines if name not in cooling])
        # All of those ranked: most wait, and one that may move (its routing has another engine)
        # was never looked at behind the first CANDIDATES waiting ones.
        return jobs + self._oldest_queued(cooling, candidates=QUEUED_BATCH) if cooling else jobs

    def _circuit(self, job: Job, elsewhere: dict[str, bool]) -> Literal["go", "move", "wait"]:
        """What a queued job does as its engine's circuit breaker says: `go` when the engine may be
        sent it (closed, or admitted as its half-open probe); else `move` to the next candidate of
        its routing that may take it (the runner moves it, as a fallback that sent nothing), or
        `wait` in the queue for the verdict. Sent to an engine failing every job, each would fail
        too, and one that hangs bills each. Work a provider already has is followed regardless."""
        work = job.provider_work or {}
        if work.get("handles") and work.get("engine") == job.engine:
            return "go"
        health = self.runner.health
        if health.admit(job.engine, job.id):
            with self._waiting_lock:
                self._waiting.pop(job.id, None)
            return "go"
        opened = health.opened_at(job.engine)
        with self._waiting_lock:
            waits = self._waiting.get(job.id) == (job.engine, opened)
        if waits:
            return "wait"  # no candidate took it since the circuit opened
        return "move" if self._movable(job, elsewhere) else "wait"

    def _available(self, name: str) -> bool:
        """Whether this process has engine `name`, set up (its circuit breaker not asked)."""
        try:
            return name in self.registry and self.registry.get(name).availability()[0]
        except Exception:  # a plugin's look that breaks must not stop every dispatch: not this one
            log.warning("engine %s: whether it is available is unknown; not moved to", name, exc_info=True)
            return False

    def _movable(self, job: Job, elsewhere: dict[str, bool]) -> bool:
        """Whether a candidate of the job's routing not tried yet may take it now: one this process
        runs whose circuit lets it through, or, as `JobRunner._fallback_target` takes them, one only
        another live worker runs (its circuit is that worker's to ask). Judged by this process's
        engines alone, a job whose next candidate was another worker's waited for the failing
        engine's cooldown and was then sent there as its probe. `elsewhere`: the dispatch's answers
        of `served_elsewhere` so far, by engine."""
        tried = {a["engine"] for a in job.attempts or []} | {job.engine}
        for name in fallbacks(job.routing, tried):
            if self.has_engine(name):
                if self._available(name) and self.runner.health.allow(name):
                    return True
                continue
            if name not in elsewhere:
                elsewhere[name] = self.runner.served_elsewhere(name)
            if elsewhere[name]:
                return True
        return False

    def _oldest_queued(self, engines: list[str], *, candidates: int = CANDIDATES) -> list[Job]:
        """One lane's queued jobs (`engines`: that lane's), the first `candidates` of them, in
        turns by project: each project's oldest, then each one's next, and so on; within a turn,
        the project this process served longest ago on the lane (or never) first, then the
        oldest job. A project that queued a hundred drafts delays another's next job by one job
        per project, not by its hundred: counted among the queued jobs alone, every dispatch found
        the busy project's next job in the first turn again, older than the other's, and served
        it first until its backlog was gone.

        Two reads of three columns, not a numbering of the whole queue's turns: the oldest
        `QUEUED_BATCH` jobs and, when there are more, each project's oldest. Turns are counted
        among those, which orders every project's next job exactly; past a dispatch's few free
        slots the order is looked at again anyway."""
        if not engines:
            return []
        # Only this process's engines with a free lane: a job for an engine it does not have is
        # another worker's (or, when nobody has it, failed by `_fail_unserved`).
        where = [col(Job.status) == "queued", col(Job.engine).in_(engines)]
        # Each project's oldest by numbering, not a join on each project's earliest time: with
        # stale statistics PostgreSQL joined that as a nested loop over every queued job, twice.
        numbered = (select(col(Job.id).label("id"), col(Job.project_id).label("project_id"),
                           col(Job.created_at).label("created_at"),
                           func.row_number().over(partition_by=col(Job.project_id),
                                                  order_by=(col(Job.created_at), col(Job.id))).label("turn"))
                    .where(*where).subquery())
        # Ranked on three columns; only the candidates are read whole (a job's params, routing and
        # attempts, for thousands of queued jobs, made each look at the queue cost 100 ms).
        keys = (col(Job.id), col(Job.project_id), col(Job.created_at))
        with self.db.session() as s:
            oldest = s.exec(select(*keys).where(*where).order_by(col(Job.created_at), col(Job.id))
                            .limit(QUEUED_BATCH)).all()
            # A batch that is not full is the whole queue, every project's oldest included.
            heads = s.exec(select(numbered.c.id, numbered.c.project_id, numbered.c.created_at)
                           .where(numbered.c.turn == 1)).all() if len(oldest) == QUEUED_BATCH else []
            jobs = sorted({row[0]: row for row in [*oldest, *heads]}.values(), key=lambda r: (r[2], r[0]))
            turns: dict[str, int] = {}
            ranked = []
            for job_id, project_id, created_at in jobs:
                turns[project_id] = turns.get(project_id, 0) + 1
                ranked.append((turns[project_id], job_id, project_id, created_at))
            lane = self.lane(engines[0])[0]  # one lane's engines (see `_by_lane`)
            served = self._served
            ranked.sort(key=lambda r: (r[0], served.get((r[2], lane), -math.inf), r[3], r[1]))
            chosen = [r[1] for r in ranked[:min(QUEUED_BATCH, candidates)]]
            rows = {job.id: job for job in s.exec(select(Job).where(col(Job.id).in_(chosen), *where)).all()}
        return [rows[job_id] for job_id in chosen if job_id in rows]

    def _claim(self, job: Job, *, move: bool = False, unserved: bool = False) -> Claim | None:
        """Claim the queued job; `move`: only to move it off its engine's open circuit (see
        `JobRunner._move_off_open_circuit`), a claim it may undo; `unserved`: off an engine no
        process has (with `move`), unless a provider has its work (that work is the engine's)."""
        # For an engine that announces its paid requests, the new attempt starts as having sent
        # nothing (the runner clears it before the first one): see `_recover_one`. A move sends
        # nothing on any engine: one that died moving a plugin's job was failed as possibly billed.
        announces = move or (job.engine in self.registry
                             and getattr(self.registry.get(job.engine), "announces_sends", False))
        before: datetime | None = None
        try:
            with self.db.transaction() as s:
                taken, taken_wall = time.monotonic(), time.time()  # before the lease is written: it runs out later
                # Read under the write lock: the row as it is, not as the dispatch's list saw it. A
                # claim undone (a move's, or one given back unstarted at a stop) puts it back.
                before = s.scalar(select(Job.started_at).where(col(Job.id) == job.id))
                if unserved:
                    work = s.scalar(select(Job.provider_work).where(col(Job.id) == job.id)) or {}
                    if work.get("handles") and work.get("engine") == job.engine:
                        return None
                # Once the write lock is ours: waiting for it must not shorten the lease.
                # On the engine it was read on: moved meanwhile by another process, it is no longer
                # this lane's (an engine this process may not have, or whose circuit is closed).
                leased = shared_now()
                claimed = s.scalars(update(Job).where(col(Job.id) == job.id, col(Job.status) == "queued",
                                                      col(Job.engine) == job.engine).values(
                    status="running", attempt=Job.attempt + 1, lease_owner=self.owner,
                    lease_expires_at=leased + self.lease, lease_taken_at=None if move else leased,
                    lease_taken_attempt=None if move else Job.attempt + 1, lease_renewed_at=leased,
                    device_began_at=None, error=None,
                    # A move starts no engine: told as a start from the row (the new one, or one an
                    # earlier attempt left), a job never sent to the engine it left read on other
                    # processes as having run there. Its end gives the row's back (`_guarded_update`).
                    started_at=None if move else utcnow(),
                    unsent_attempt=Job.attempt + 1 if announces else None).returning(Job)).one_or_none()
                if claimed is None:  # another worker, or a cancel, got there first
                    return None
                claim = Claim(claimed, claimed.attempt, CancelToken(), lease=self.lease.total_seconds(), renewed=taken,
                              renewed_wall=taken_wall, circuit_open=move, started_before=before, unserved=unserved)
                # Known before the commit makes the job 'running' for everyone else.
                self._claimed[job.id] = claim
        except SQLAlchemyError as exc:
            self._claimed.pop(job.id, None)
            # A COMMIT whose answer was lost may have made the job ours: left so, it waited `running`
            # for its lease to run out, and recovery then failed a plugin's paid job as possibly billed.
            landed = self._claim_landed(job.id, taken, taken_wall, move, before) if commit_in_doubt(exc) else None
            if landed is None:
                raise
            claim = landed
            claim.unserved = unserved
            log.info("job %s: its claim's COMMIT answer was lost, and the database holds it", job.id)
            self._claimed[job.id] = claim
        except BaseException:
            self._claimed.pop(job.id, None)
            raise
        if job.engine in self.registry and not move:  # a job moved is served on its next engine's lane
            self._served[(job.project_id, self.lane(job.engine)[0])] = time.monotonic()
        if len(self._served) > SERVED_REMEMBERED:  # the projects served longest ago are forgotten first
            for key in sorted(self._served, key=self._served.__getitem__)[:len(self._served) // 2]:
                del self._served[key]
        return claim

    def _claim_landed(self, job_id: str, taken: float, taken_wall: float, move: bool,
                      before: datetime | None) -> Claim | None:
        """The claim a COMMIT in doubt made, read back: the row running under this process's lease
        (no other claim of this process holds it: a job running here is never claimed again)."""
        with self.db.session() as s:
            row = s.get(Job, job_id)
        if row is None or row.status != "running" or row.lease_owner != self.owner:
            return None
        return Claim(row, row.attempt, CancelToken(), lease=self.lease.total_seconds(), renewed=taken,
                     renewed_wall=taken_wall, circuit_open=move, started_before=before)

    def _give_back_unstarted(self) -> None:
        """Claims committed while the service was stopping that no task started: nothing of them
        reached a provider, so they go back to the queue (or end canceled, when asked to) rather
        than wait for recovery, which would fail a paid one as possibly billed."""
        with self._claim_lock:  # no claim is being made from here on
            unstarted = [claim for job_id, claim in self._claimed.items() if job_id not in self._running]
        failed = False
        for claim in unstarted:
            if not failed:
                try:
                    self.runner.give_back(claim)
                except Exception as exc:  # the database is gone: recovery finds the claim later
                    log.exception("job %s: giving back its unstarted claim failed", claim.job.id)
                    failed = transient(exc)  # the rest would wait it out in turn, past the stop's time
            self._claimed.pop(claim.job.id, None)

    def _fail_unserved(self) -> None:
        """Move the queued jobs of engines no process has (one removed from the configuration, its
        key removed, a plugin uninstalled, a factory that failed) to another candidate of their
        routing, or fail them: they would wait forever. An engine another live worker runs is left
        to it, and one nobody has is given `unserved_grace` seconds first: its only worker may be
        restarting, or starting beside this one."""
        usable = self.engines()
        with self.db.session() as s:
            missing = set(s.exec(select(Job.engine).where(col(Job.status) == "queued",
                                                           col(Job.engine).not_in(usable)).distinct()).all())
        for engine in self._unserved(missing, self._unserved_since):
            with self.db.session() as s:
                jobs = list(s.exec(select(Job.id).where(col(Job.status) == "queued", col(Job.engine) == engine)
                                   .order_by(col(Job.created_at), col(Job.id))).all())
            for job_id in jobs:
                # Asked again as the backlog is failed (each job a write that may wait for the lock):
                # the engine's worker may be back, and takes the rest.
                if self.presence.serves(engine):
                    break
                if not self._move_unserved(job_id, engine):
                    self._fail_unknown_engine(job_id, engine)
        if self._moves:
            self.notify()

    def _move_unserved(self, job_id: str, engine: str) -> bool:
        """Claim the queued job to move it to another candidate of its routing that this process
        or another live worker has (`JobRunner._move_off_open_circuit` moves it, as a fallback
        that sent nothing), or leave it queued while one may take it later; False when none may,
        or it is not to be moved (`_claim`)."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
        if job is not None and job.engine != engine:
            return True  # moved meanwhile (by another process): no longer this engine's
        if job is None or job.status != "queued":
            return False
        if not self._movable(job, {}):
            # A candidate kept off only by its circuit breaker takes it once that lets it. Failed,
            # the job was lost to a minute's outage.
            tried = {a["engine"] for a in job.attempts or []} | {job.engine}
            return any(self._available(name) or self.presence.serves(name) for name in fallbacks(job.routing, tried))
        with self._claim_lock:
            if self._stopping:
                return True  # left queued: the next start looks again
            claim = self._claim(job, move=True, unserved=True)
            if claim is not None:
                with self._moves_lock:
                    self._moves.append(claim)
        return claim is not None

    def _unserved(self, engines: set[str], since: dict[str, float]) -> set[str]:
        """Of `engines` (none of this process's), those no live process has had for
        `unserved_grace` seconds; `since` keeps since when, and forgets the engines not asked about."""
        now = time.monotonic()
        for engine in set(since) - engines:
            del since[engine]
        unserved = set()
        for engine in engines:
            if self.presence.serves(engine):
                since.pop(engine, None)
            elif now - since.setdefault(engine, now) >= self.unserved_grace:
                unserved.add(engine)
        return unserved

    def _fail_unknown_engine(self, job_id: str, engine: str) -> None:
        with self.db.transaction() as s:
            # Read under the write lock, as it is settled: a job the engine's worker took meanwhile
            # and a stop queued again with work a provider accepted must capture its hold, not release it.
            job = s.get(Job, job_id)
            if job is None or job.status != "queued" or job.engine != engine:
                return
            error = {"code": "engine_unavailable",
                     "message": f"engine '{job.engine}' is not installed, or not set up (its key, its server), in "
                                "any process that runs jobs",
                     "details": {"engine": job.engine}}
            result = s.execute(update(Job).where(col(Job.id) == job.id, col(Job.status) == "queued",
                                                 col(Job.engine) == engine).values(
                status="failed", finished_at=utcnow(), error=error))
            if changed(result) != 1:
                return
            self.ledger.settle_unstarted(s, job, note="engine not installed")
            webhooks.job_ended(s, job.id, job.project_id, "failed")
        log.warning("job %s failed: engine '%s' is not installed, or not set up, in any process that runs jobs",
                    job.id, job.engine)
        self.bus.publish(job.id, "failed", {"job_id": job.id, "status": "failed", "error": error}, known_only=True)

    async def _run(self, claim: Claim, lane: str) -> None:
        try:
            await self.runner.run(claim)
        except Exception:  # its end could not be written (the database stayed away): recovery ends it
            log.exception("job %s: its end could not be recorded; it is left to recovery", claim.job.id)
        finally:
            if self._running.get(claim.job.id, (None, None))[1] is claim:
                del self._running[claim.job.id]
            if claim.waiting:
                opened = self.runner.health.opened_at(claim.job.engine)
                with self._waiting_lock:
                    self._waiting[claim.job.id] = (claim.job.engine, opened)
            self._lane_use[lane] -= 1
            self.notify()

    def cancel(self, job_id: str) -> bool:
        """Cancel a job this process has claimed; False when it is not running here."""
        # `_claimed` first: `dispatch` adds a claim to `_running` before it leaves `_claimed`.
        claim = self._claimed.get(job_id)
        if claim is None:
            entry = self._running.get(job_id)
            if entry is None:
                return False
            claim = entry[1]
        claim.cancel.cancel()
        return True

    async def _cancel_watch_loop(self) -> None:
        """Cancels asked through another process (`cancel_requested_at`) of jobs held here; a
        stop ends it once the paid requests it waits for have answered."""
        outage = Outage(log, "looking for cancels asked elsewhere", f"trying again every {self.poll_interval:g} s")
        while True:
            await woken(self._cancel_wake, self.poll_interval)
            self._cancel_wake.clear()
            held = {job_id: claim for job_id, (_, claim) in self._running.items() if not claim.cancel.cancelled}
            if not held:
                outage.reset()  # nothing asked: a failure after an idle hour is a new one
                continue
            try:
                asked = await asyncio.to_thread(self._cancels_asked, list(held))
            except Exception as exc:
                outage.failed(exc)
                continue
            outage.recovered()
            for job_id in asked:
                log.info("job %s: canceled through another process", job_id)
                held[job_id].cancel.cancel()

    def _cancels_asked(self, job_ids: list[str]) -> list[str]:
        with self.db.session() as s:
            return list(s.exec(select(Job.id).where(col(Job.id).in_(job_ids),
                                                    col(Job.cancel_requested_at).is_not(None))).all())

    # -- leases and recovery -----------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        outage = Outage(log, "lease renewal", f"trying again within {RENEW_RETRY_SECONDS:g} s")
        while not self._stopping or self._running:  # a stop waits for running jobs: see `stop`
            # After a failed renewal, soon again: one try can wait out the lock's timeout (30 s),
            # and another beat later (a third of the lease) the lease could be gone.
            beat = self.lease.total_seconds() / 3
            await asyncio.sleep(min(beat, RENEW_RETRY_SECONDS) if outage.ongoing else beat)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.presence.touch, self.owner)
            # Claims not yet started too: a dispatch starts its claims once all are made, and each
            # of them may have waited for the write lock meanwhile.
            claims = list({**self._claimed, **{job_id: claim for job_id, (_, claim) in self._running.items()}}.values())
            if not claims:
                outage.reset()  # nothing to renew: a failure after an idle hour is a new one
            else:
                try:
                    await asyncio.to_thread(self._renew, claims)
                except Exception as exc:  # one busy database must not end renewal: every lease would run out
                    outage.failed(exc)
                else:
                    outage.recovered()

    def _renew(self, claims: list[Claim]) -> None:
        lost: list[tuple[Claim, Job | None]] = []
        renewed: list[Claim] = []
        with self.db.transaction() as s:
            began, began_wall = time.monotonic(), time.time()
            # Counted from when the write lock is ours: two long waits for it (each under its 30 s
            # timeout) must not let a live job's lease run out between beats.
            leased = shared_now()
            expires = leased + self.lease
            for claim in claims:
                # Its start on the device too, where the runner's own write of it failed.
                result = s.execute(update(Job).where(col(Job.id) == claim.job.id, col(Job.attempt) == claim.attempt,
                                                     col(Job.status) == "running").values(
                    lease_expires_at=expires, lease_renewed_at=leased,
                    **self.runner.device_start_values(claim, began, leased)))
                if changed(result) != 1:
                    lost.append((claim, s.get(Job, claim.job.id)))
                else:
                    renewed.append(claim)
        for claim in renewed:  # once committed
            claim.renewed, claim.renewed_wall = began, began_wall
        # The row no longer waits for this attempt (canceled through another process, failed or
        # queued again by another's recovery after the lease ran out): whatever it finishes changes
        # nothing, so stop spending the device.
        for claim, row in lost:
            self.runner.let_go(claim, row, "recovered (its lease had run out)")

    async def _sweep_loop(self) -> None:
        outages: dict[str, Outage] = {}
        while not self._stopping:
            await asyncio.sleep(self.sweep_interval)
            # Each on its own: one that keeps failing (a row it cannot take) leaves the others to run.
            for what, duty in self._sweep_duties():
                outage = outages.setdefault(what, Outage(log, what, f"trying again every {self.sweep_interval:g} s"))
                try:
                    await duty()
                except Exception as exc:
                    outage.failed(exc)
                else:
                    outage.recovered()

    def _sweep_duties(self) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
        async def recover() -> None:
            await self.recover(all_foreign=False)

        threaded = [*([("failing jobs no worker serves", self._fail_unserved)] if self._runs_jobs else []),
                    ("settling holds", self._sweep_ledger), ("forgetting gone workers", self._forget_owners),
                    ("removing stale previews", self._sweep_previews), *self.sweepers]
        return [("recovering orphaned jobs", recover),
                *((what, functools.partial(asyncio.to_thread, duty)) for what, duty in threaded)]

    def _sweep_ledger(self) -> None:
        with self.db.transaction() as s:
            settled = self.ledger.sweep(s)
        if settled:
            log.warning("sweeper settled %d holds of finished jobs", settled)

    async def recover(self, *, all_foreign: bool) -> list[str]:
        """Finish or re-queue jobs whose worker is gone. At start-up, every `running` job whose
        holder is not a live process (see `orchestrator.workers.Presence`), even if its lease
        runs on; later, jobs whose lease expired and jobs of owners known dead or stopped."""
        orphans = await asyncio.to_thread(self._orphans, all_foreign)
        recovered = []
        for job in orphans:
            try:
                ended = await asyncio.to_thread(self._recover_one, job)
            except Exception as exc:
                if transient(exc):  # the database's, not the job's: every other job would wait it out in turn
                    raise
                # One job's own failure must not leave every orphan after it running.
                log.exception("job %s: recovering it failed; the next sweep tries again", job.id)
                continue
            if ended is None:
                continue
            outcome, error = ended
            recovered.append(job.id)
            if outcome in ("given up", "canceled", "failed"):  # ended: nobody follows its work any more
                self.forget_abandoned(job)
            if self.on_recovered is not None:
                await self.on_recovered(job, outcome)
            if error is not None:
                # What the runner's own end publishes: a stream this process already knows is
                # not rebuilt from the row, so the event must carry the error. One it does not
                # know is told whole (queued, started, the end) from the row when a client asks.
                tell_end(self.bus, job, "canceled" if outcome == "canceled" else "failed", error)
        if recovered:
            self.notify()
        return recovered

    def forget_abandoned(self, job: Job) -> None:
        """A job ended while no process followed its work (canceled after its worker died or while
        queued to be reattached; a free one given up after repeated crashes): what a dead attempt
        left on a self-hosted server is taken off it, and work a provider accepted is withdrawn
        there, in the background and best effort. Safe from any thread."""
        engine = self.registry.get(job.engine) if job.engine in self.registry else None
        work = job.provider_work or {}
        loop = self._loop or self.bus.loop  # an API server that runs no jobs cancels orphans too
        if engine is None or loop is None or not work.get("handles") or work.get("engine") != job.engine:
            return
        if left_off(engine):  # asked without a key, the provider would refuse (or the request not be sent)
            log.warning("job %s: its work at %s is not withdrawn: this process has no key or server for it",
                        job.id, job.engine)
            return
        stop: Callable[[list[dict[str, Any]]], Awaitable[bool | None]]
        if restartable(engine, job):
            stop = engine.forget
        elif isinstance(engine, Withdrawable):  # a paid provider's: it would run, and bill, for nobody
            stop = engine.withdraw
        else:
            return
        handles = list(work["handles"])

        async def run() -> None:
            try:
                unbilled = await stop(handles)
                if unbilled is True and isinstance(engine, Withdrawable):
                    await asyncio.to_thread(self.runner.void_withdrawn, job)
            except Exception:  # best effort: the job's end is recorded already
                log.warning("job %s: taking its work off %s failed", job.id, job.engine, exc_info=True)

        def spawn() -> None:
            # In a context of its own: the caller's (copied by `call_soon_threadsafe`) may be a
            # request's, whose gate a stop closes once it answers 503 `server_stopping`; the
            # withdrawal outlives the request, and its charge voided would be rolled back with it.
            task = loop.create_task(run(), name=f"forget {job.id}", context=contextvars.Context())
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)

        loop.call_soon_threadsafe(spawn)

    def _sweep_previews(self) -> None:
        """Preview files of jobs that no longer run: their process died (a killed worker's jobs,
        recovered above) before it could remove them."""
        def running(job_ids: list[str]) -> set[str]:
            with self.db.session() as s:
                return set(s.exec(select(Job.id).where(col(Job.id).in_(job_ids), col(Job.status) == "running")))

        removed = self.runner.preview_files.sweep(running)
        if removed:
            log.info("removed %d step preview files left by stopped processes", removed)

    def _forget_owners(self) -> None:
        with self.db.session() as s:
            holding = s.exec(select(Job.lease_owner).where(col(Job.status) == "running")).all()
        self.presence.forget(owner for owner in holding if owner)

    def _orphans(self, all_foreign: bool) -> list[Job]:
        now = self.db.now()  # the clock leases are stamped by (`shared_now`): the database's, on PostgreSQL
        with self.db.session() as s:
            jobs = list(s.exec(select(Job).where(col(Job.status) == "running")).all())
        # A job of an engine this process lacks is left to the workers that have it: one of them
        # can follow its work or run it again, where this one could only fail it as possibly billed.
        # Its only worker may also have just died (killed out of memory, restarted by its
        # supervisor) and, back, would queue it again: so it is left alone until nobody has had
        # the engine for `unserved_grace` seconds, as its queued jobs are (`_fail_unserved`).
        unserved = self._unserved({job.engine for job in jobs if not self.has_engine(job.engine)},
                                  self._orphans_unserved_since)
        moment = time.monotonic()
        expired: dict[str, tuple[tuple[int, str | None, datetime | None], float]] = {}

        def hung(job: Job) -> bool:
            lease = (job.attempt, job.lease_owner, job.lease_expires_at)
            seen = self._expired_leases.get(job.id)
            since = seen[1] if seen is not None and seen[0] == lease else moment
            expired[job.id] = (lease, since)
            return moment - since >= HUNG_HOLDER_LEASES * self.lease.total_seconds()

        def orphaned(job: Job) -> bool:
            if job.id in self._running or job.id in self._claimed:
                return False
            if not self.has_engine(job.engine) and (job.engine not in unserved or not self._runs_jobs):
                # A server that runs no jobs has no say over them: a plugin it lacks may be one
                # whose only worker restarts (and would follow its billed work again).
                return False
            if job.lease_expires_at is None or job.lease_expires_at <= now:
                # A holder of this machine whose owner lock is held is alive, whatever its lease
                # says: on SQLite leases are stamped by the wall clock, which a step forward runs
                # out for every holder at once, and renewals may wait behind the write lock. Taken
                # from it, a paid job was failed as possibly billed while the holder went on, made
                # the image and threw it away. Only a lease left unchanged for several leases, by
                # this process's own clock, tells a hung holder (its loop stuck) whose job must not
                # stay running forever; an owner the locks cannot tell about has its lease alone.
                if job.lease_owner == self.owner or not self.presence.locked(job.lease_owner):
                    return True
                if not hung(job):
                    return False
                # Alive by its lock, and holding whatever else it locked (its device: local jobs
                # wait for it) until an operator stops it: said, since nothing else shows it.
                log.warning("job %s: its holder %s has not renewed its lease for %d leases, though it lives (its "
                            "lock is held): taken for hung, and its job recovered; stop that process (a local "
                            "device it holds stays locked until then)", job.id, job.lease_owner, HUNG_HOLDER_LEASES)
                return True
            if all_foreign:
                # At start-up a live lease of another running process is not an orphan: that
                # process is still working on it (and may be paying for it).
                return not self.presence.alive(job.lease_owner)
            # A worker that died (killed, out of memory) or stopped is known gone at once: its
            # jobs need not wait out the lease.
            return self.presence.gone(job.lease_owner)

        orphans = [job for job in jobs if orphaned(job)]
        self._expired_leases = expired  # forgets the leases renewed since, and the jobs that ended
        return orphans

    def _recover_one(self, job: Job) -> tuple[str, dict[str, Any] | None] | None:
        """How the job was recovered (and the error it ended with), or None when it was not."""
        # Its images made, billed and stored before its process died: adopted, whatever else recovery
        # would have done (a paid job failed as possibly billed, a free one run again for nothing).
        adoption = Adoption.of(job, self.runner.store.intact) if job.stored_images else None
        if adoption is not None:
            return self._adopt(job, adoption)
        engine = self.registry.get(job.engine) if self.has_engine(job.engine) else None
        local = engine is not None and engine.kind == "local"
        # Work a queueing provider accepted is followed again rather than written off (the runner
        # reattaches instead of sending): the hold stays until that work's outcome is known.
        reattach = not local and reattachable(engine, job)
        # A self-hosted server that costs nothing (ComfyUI, AUTOMATIC1111): running the job again
        # spends only the server's time, so it is done rather than failed. A cloud engine priced
        # at 0 in the prices file is not one: its provider may still bill, and twice if re-sent.
        free = (not local and not reattach and isinstance(engine, Restartable)
                and _costs_nothing(engine, job))
        # A paid job whose attempt died before its first request that can bill (its draft still
        # being read and encoded): nothing reached the provider, so it runs again, hold kept.
        unsent = not local and not reattach and job.sent_nothing()
        # Run again with nothing billed so far: local work, work to follow, free or unsent requests.
        rerun = local or reattach or free or unsent
        # Each recovery is recorded in the job's attempts: a job the process keeps dying under (out
        # of memory at 2048 px and n=16, say) is not started into a crash loop.
        stops = 1 + sum(1 for a in job.attempts or [] if a.get("status") == "interrupted" and not _graceful(a))
        values: dict[str, Any]
        error: OrchestratorError
        if job.cancel_requested_at is not None:
            # Asked to cancel while its worker was alive, which died before it could: the cancel
            # (answered 202) wins over running the job again.
            error = Canceled("canceled; its worker stopped before it could end the job",
                             details={"engine": job.engine})
            values = {"status": "canceled", "finished_at": utcnow(), "error": error.to_dict(),
                      **NO_LEASE,
                      "attempts": job.with_attempt("canceled", error.to_dict())}
            outcome = "canceled"
        elif rerun and stops < MAX_RECOVERIES:
            died = Interrupted(f"{ENDLESS}; {'its work is followed again' if reattach else 'it was queued again'}",
                               details={"engine": job.engine})
            values = {"status": "queued", **NO_LEASE,
                      "progress_step": 0, "progress_total": 0,
                      "attempts": job.with_attempt("interrupted", died.to_dict())}
            outcome = "reattaching" if reattach else "requeued"
            if not reattach and not free:
                values["provider_work"] = None  # run afresh (a free engine's earlier work is not followed)
        elif rerun and not reattach:
            # Only local work is this machine's to make smaller: a remote engine renders on its server.
            error = Interrupted(
                f"the process running this job on '{job.engine}' stopped without ending it {stops} times; it is not "
                f"started again{' (try fewer or smaller images)' if local else ''}",
                details={"engine": job.engine, "interruptions": stops},
            )
            values = {"status": "failed", "finished_at": utcnow(), "error": error.to_dict(),
                      **NO_LEASE,
                      "attempts": job.with_attempt("interrupted", error.to_dict())}
            outcome = "given up"
        else:
            # No engine here: nobody has had it for `unserved_grace` seconds (see `_orphans`), and
            # whether it sent anything is unknown.
            stopped = (f"{ENDLESS} while engine '{job.engine}' worked on it" if engine is not None else
                       f"the worker running this job on engine '{job.engine}' stopped and no live worker has "
                       "that engine to run it again or follow its work")
            error = Interrupted(
                f"{stopped}; it is not sent again, as the engine may already have made the image (and a paid "
                "provider billed it)",
                details={"engine": job.engine, "provider_request_id": job.provider_request_id},
            )
            values = {"status": "failed", "finished_at": utcnow(), "error": error.to_dict(),
                      **NO_LEASE,
                      "attempts": job.with_attempt("failed", error.to_dict())}
            outcome = "failed"
        # What the dead attempt surely held of a local device counts toward its project's quota
        # (`orchestrator.device_time`), whatever the job's outcome: from its start to its lease's
        # last renewal. Never charged: metering charges a success alone.
        held = device_time.held_until_lease(job, self.lease, self.db.now()) if local else None
        if held is not None:
            values["device_seconds"] = device_time.added(held)
        values["stored_images"] = None  # none of them found whole (`Adoption.of`): nothing to adopt later
        with self.db.transaction() as s:
            stmt = _orphaned_on(job)
            if outcome != "canceled":
                # A cancel asked since the read wins: the next sweep ends the job canceled.
                stmt = stmt.where(col(Job.cancel_requested_at).is_(None))
            if unsent and not (local or free):
                # A worker whose lease ran out may be alive and sending now: once it has recorded
                # its first request, this is no longer a job that sent nothing (next sweep).
                stmt = stmt.where(col(Job.unsent_attempt) == job.attempt)
            if changed(s.execute(stmt.values(**values))) != 1:
                return None
            webhooks.job_ended(s, job.id, job.project_id, values["status"])  # nothing for a job queued again
            if outcome == "failed":
                # Sent to a provider that may have made and billed it: charge the estimate, flagged.
                self.ledger.capture(s, job, None, unreconciled=True, note="interrupted: outcome unknown")
            elif outcome == "given up":
                self.ledger.release(s, job, note="given up after repeated interruptions")
            elif outcome == "canceled":
                if local or free or unsent:
                    self.ledger.release(s, job, note="canceled")
                else:
                    # Sent to a provider that may have made and billed it, as for `failed` above.
                    self.ledger.capture(s, job, None, unreconciled=True, note="canceled: outcome unknown")
        log.warning("recovered job %s (%s): %s", job.id, job.engine, outcome)
        # The dead attempt's step preview is none of the next attempt's, which another worker may
        # start within the slack a preview file's time is given (`PREVIEW_CLOCK_SLACK`).
        with contextlib.suppress(OSError):
            self.runner.preview_files.remove(job.id)
        return outcome, values.get("error")

    def _adopt(self, job: Job, adoption: Adoption) -> tuple[str, dict[str, Any] | None] | None:
        """End the job with the images its dead attempt stored (`orchestrator.adopt`): its rows, its
        end and its charge in one transaction, which its guarded update lets happen once."""
        values = adoption.values()
        with self.db.transaction() as s:
            stmt = _orphaned_on(job)
            if job.cancel_requested_at is None:
                # A cancel asked since the read: the next sweep adopts them for a canceled job.
                stmt = stmt.where(col(Job.cancel_requested_at).is_(None))
            if changed(s.execute(stmt.values(**values))) != 1:
                return None
            asset_ids = adoption.write(s, self.ledger)
        log.warning("recovered job %s (%s): adopted the %d image(s) its dead process stored; %s", job.id,
                    job.engine, len(asset_ids), adoption.status)
        with contextlib.suppress(OSError):
            self.runner.preview_files.remove(job.id)
        loop = self._loop or self.bus.loop
        if loop is not None:
            with self.db.session() as s:
                ended = s.get(Job, job.id)
            if ended is not None:
                loop.call_soon_threadsafe(self._tell_adopted, ended, asset_ids)
        return "adopted", None

    def _tell_adopted(self, job: Job, asset_ids: list[str]) -> None:
        """A stream this process has of the job is told its assets and end, as a follower tells them."""
        if self.bus.view(job.id) is not None:
            catch_up(self.bus, job, asset_ids)


def _orphaned_on(job: Job) -> Any:
    """The update of the job while it is still as recovery read it: the same attempt, running, and
    the lease it was judged orphaned on (read before the write lock was ours, its holder, alive,
    may have renewed it since: taken from a live worker, a paid job was failed "interrupted" and
    its image thrown away)."""
    return update(Job).where(col(Job.id) == job.id, col(Job.attempt) == job.attempt, col(Job.status) == "running",
                             _same(col(Job.lease_owner), job.lease_owner),
                             _same(col(Job.lease_expires_at), job.lease_expires_at))


# What recovery knows of a job left running: its lease ran out without an end, whether its process
# died or lived on without a database to record the end in (its final write waits two minutes).
ENDLESS = ("the process running this job stopped without ending it (killed, out of memory, hung, its host lost, "
           "or its database away when the job ended)")


def _costs_nothing(engine: Engine, job: Job) -> bool:
    """Whether the job was priced at 0 and its engine still prices it so (a self-hosted server)."""
    if job.estimated != 0:
        return False
    try:
        return engine.estimate(render_request(job.params)) == 0
    except Exception:  # an engine that cannot price the job now is not known to be free
        return False


def _same(column: Any, value: Any) -> Any:
    """`column` holds `value` (NULL as NULL)."""
    return column.is_(None) if value is None else column == value


def _graceful(attempt: dict[str, Any]) -> bool:
    """An attempt a stop (SIGTERM, Ctrl-C) queued again, as opposed to one its process died under."""
    details = (attempt.get("error") or {}).get("details") or {}
    return details.get("graceful") is True


def _concurrency(engine: Engine) -> int:
    """How many of a remote engine's jobs this process runs at once (`Engine.concurrency`). A
    third-party engine's mistake (not a whole number above 0, or a property that raises) gets the
    default: neither a lane that never runs nor a dispatch that fails for every engine."""
    try:
        limit = getattr(engine, "concurrency", REMOTE_CONCURRENCY)
    except Exception as exc:
        log.warning("engine %s: its concurrency cannot be read (%s: %s); %d jobs at once", engine.name,
                    type(exc).__name__, first_line(exc)[:200], REMOTE_CONCURRENCY)
        return REMOTE_CONCURRENCY
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        log.warning("engine %s: concurrency %s is not a whole number above 0; %d jobs at once", engine.name,
                    repr(limit)[:40], REMOTE_CONCURRENCY)
        return REMOTE_CONCURRENCY
    return limit
