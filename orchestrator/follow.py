"""Event streams of jobs this process does not run, told from their rows.

A client may follow a job on any API process: one that ran it before a restart, or an API server
in front of separate workers (`ORCH_RUN_JOBS=false`, `orchestrator worker`). The process that runs
a job publishes its events live; every other process learns what happened from the job's row
(status, progress, assets), which the follower reads when another process's commit rings the bell
(`orchestrator.bells`) and every `ORCH_POLL_INTERVAL`, one query for all the jobs its clients
watch, and turns into the same events: `started`, `progress`, `asset`, the `state` event
`fallback` of each move to another engine its attempts record, and the terminal one.
A `progress` event names the step's preview (`preview_url`) when the running process has written
its preview file (`orchestrator.store.PreviewFiles`, at most once a second, as the row's progress):
every process serves those files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlmodel import col, select

from orchestrator import events
from orchestrator.db import Database
from orchestrator.events import TERMINAL, EventBus, StreamView, woken
from orchestrator.models import Asset, Job
from orchestrator.outage import Outage
from orchestrator.store import PreviewFiles
from tiers.base import to_credits

log = logging.getLogger(__name__)
# A stream subscribes once its response starts; until then a followed job counts as watched.
SUBSCRIBE_GRACE_SECONDS = 10.0
LAPSED_REMEMBERED = 10_000  # streams whose following lapsed, remembered (each a job id)


def catch_up(bus: EventBus, job: Job, asset_ids: list[str], *, preview: bool = False) -> None:
    """Publish what the job's row shows and its stream has not told yet; `preview`: the running
    process has a preview file of the job. Call it on the loop."""
    view = bus.view(job.id)
    if view is None:
        bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued"})
        view = bus.view(job.id)
        assert view is not None
    if view.finished:
        return
    tell_moves(bus, job)
    if job.status == "queued":
        # Back in the queue after the stream told it started (its worker stopped or died, a
        # fallback moved it): a stream that went on showing its last step said it still ran. Not
        # a row read before the claim the stream told (an older attempt).
        if view.started and not view.queued and job.attempt >= view.attempt:
            bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued", "attempt": view.attempt,
                                           "requeued": True})
        return
    # A row of an attempt before the one told: read before the job was claimed again and told after
    # a newer read (its progress would hide the new attempt's until it passed that step), or ended
    # after a claim was handed back unstarted (`JobRunner._requeue_waiting`): only its end is told.
    # Told queued again, a row of the attempt that ended is older news too (the next claim is a new one).
    earlier = bool(view.attempt) and (job.attempt < view.attempt or (view.queued and job.attempt == view.attempt))
    # A job canceled or failed in the queue never started; one run again (recovered after its
    # worker died) starts again, and its progress counts from its new start.
    if tell_start(bus, job, view):
        view = bus.view(job.id)
        assert view is not None
    if job.status == "running":
        if not earlier and job.progress_total and job.progress_step > view.step:
            bus.publish(job.id, "progress", events.progress(job.id, job.progress_step, job.progress_total,
                                                            preview=preview))
        return
    if not earlier and not job.cache_hit and job.progress_total and job.progress_step > view.step:
        # The row's progress is written at most once a second: a job that ended within one told a
        # stream here no step at all, and a longer one stopped short of its last. (An engine that
        # counts no steps ends at 1 of 1, as `GET /v1/jobs/{id}` shows it; a copy renders nothing.)
        bus.publish(job.id, "progress", events.progress(job.id, job.progress_step, job.progress_total, preview=False))
    for index, asset_id in enumerate(asset_ids[view.assets:], start=view.assets):
        bus.publish(job.id, "asset", {"asset_id": asset_id, "index": index})
    if job.status in TERMINAL:
        data: dict[str, Any] = {"job_id": job.id, "status": job.status}
        if job.status == "succeeded":
            data["assets"] = asset_ids
            if job.cache_hit:
                data["cache_hit"] = True
        elif job.error:  # failed, or canceled: why
            data["error"] = job.error
        bus.publish(job.id, job.status, data)


def tell_start(bus: EventBus, job: Job, view: StreamView) -> bool:
    """Publish the start of the row's attempt where the stream has not told it (and its `queued`
    again first, to a stream that told an earlier start); whether it did. Call it on the loop."""
    if job.started_at is None or (view.started and job.attempt <= view.attempt):
        return False
    if view.started and not view.queued:
        # Queued again and claimed again between two reads (another worker took it within
        # the poll): told as a stream that read the queued row tells it, or servers differ.
        bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued", "attempt": view.attempt,
                                       "requeued": True})
    # A copy's events say so as its own process told them (`JobService._publish_cached`).
    copy: dict[str, Any] = {"cache_hit": True} if job.cache_hit else {}
    bus.publish(job.id, "started", {"job_id": job.id, "status": "running", "engine": job.engine,
                                    "attempt": job.attempt, **copy})
    return True


def tell_end(bus: EventBus, job: Job, status: str, error: dict[str, Any]) -> None:
    """Publish the end of a job that this process does not run (recovered, or canceled with its
    worker gone), to a stream only where this bus already has one: a stream it knows only as
    submitted (a worker elsewhere ran the job, unwatched) is told its moves to other engines and its
    start first, as a stream built from the row tells them, or servers differ. Safe from any thread."""
    loop = bus.loop
    if loop is not None and not events.on_loop(loop):
        loop.call_soon_threadsafe(tell_end, bus, job, status, error)
        return
    view = bus.view(job.id)
    if view is not None and not view.finished:
        # Its moves to other engines first, as a stream built from the row (`catch_up`) and the
        # worker tell them: a start on the engine moved to, told without them, said it began there.
        tell_moves(bus, job)
        tell_start(bus, job, view)
    bus.publish(job.id, status, {"job_id": job.id, "status": status, "error": error}, known_only=True)


def tell_moves(bus: EventBus, job: Job) -> None:
    """Publish the job's moves to other engines that its stream has not told, as the worker told
    them (`JobRunner._fall_back`), before the queued again and the start on the engine moved to:
    a stream told from the row, or one a process started when it claimed a job other processes
    had moved, said only that the engine changed. Each engine is left once (a fallback goes to
    an engine not tried yet), so a move is known by the engine it left, however its stream's
    moves were told (live by this process, from the row by its follower). The row keeps no
    `skipped` or `worker` of the live event, and the estimate of the latest move alone (the
    job's hold now). Call it on the loop, on a stream that exists."""
    moves = job.moves()
    if not moves:
        return
    view = bus.view(job.id)
    told = view.moved_from if view is not None else frozenset()
    for index, (source, target, error) in enumerate(moves):
        if source in told:
            continue
        data: dict[str, Any] = {"state": "fallback", "from": source, "to": target, "error": error}
        if index == len(moves) - 1:
            data["estimate"] = to_credits(job.estimated)
            if job.cache_hit:
                data["cache_hit"] = True
        bus.publish(job.id, "state", data)


class JobFollower:
    """Catches up the streams of watched jobs that this process does not hold."""

    def __init__(self, db: Database, bus: EventBus, holds: Callable[[str], bool], interval: float,
                 previews: PreviewFiles) -> None:
        self.db = db
        self.previews = previews
        self.bus = bus
        self.holds = holds
        self.interval = interval
        self._followed: dict[str, float] = {}  # job id -> when a client last asked
        self._lapsed: dict[str, None] = {}  # no longer followed, unfinished: oldest first (see `lapsed`)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def lapsed(self, job_id: str) -> bool:
        """Whether the job's stream was kept up to date from its row and no longer is (its last
        watcher left before it ended): what it holds may be old news."""
        return job_id in self._lapsed

    def follow(self, job_id: str) -> None:
        """Keep the job's stream up to date while clients watch it. Call it on the loop."""
        # Caught up (to its end, or to now): its stream is no longer old news, and its row is not
        # read again for each later client.
        self._lapsed.pop(job_id, None)
        view = self.bus.view(job_id)
        if view is not None and view.finished:
            return
        if job_id not in self._followed:
            # Its state was read before this call: a ring in between was heard by nobody.
            self._wake.set()
        self._followed[job_id] = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="job follower")

    def heard(self) -> None:
        """Another process committed something (`orchestrator.bells`): read the rows now."""
        if self._followed:
            self._wake.set()

    async def _loop(self) -> None:
        outage = Outage(log, "following jobs run elsewhere", f"trying again every {self.interval:g} s")
        while self._followed:
            await woken(self._wake, self.interval)
            self._wake.clear()
            try:
                await self.tick()
            except Exception as exc:  # a busy database: the next tick tries again
                outage.failed(exc)
            else:
                outage.recovered()

    async def tick(self) -> None:
        now = time.monotonic()
        for job_id, asked in list(self._followed.items()):
            view = self.bus.view(job_id)
            if view is None or view.finished or (not view.watched and now - asked > SUBSCRIBE_GRACE_SECONDS):
                del self._followed[job_id]
                if view is not None and not view.finished:
                    self._lapsed[job_id] = None
                    while len(self._lapsed) > LAPSED_REMEMBERED:  # the oldest first
                        del self._lapsed[next(iter(self._lapsed))]
        # Jobs this process holds publish their own events, live.
        elsewhere = [job_id for job_id in self._followed if not self.holds(job_id)]
        if not elsewhere:
            return
        jobs, assets, previews = await asyncio.to_thread(self._read, elsewhere)
        for job in jobs:
            # Checked again after the read: a claim here is registered before its first write, so
            # a row this process changed is never told twice.
            if job.id in self._followed and not self.holds(job.id):
                catch_up(self.bus, job, assets.get(job.id, []), preview=job.id in previews)

    def _read(self, job_ids: list[str]) -> tuple[list[Job], dict[str, list[str]], set[str]]:
        with self.db.session() as s:
            jobs = list(s.exec(select(Job).where(col(Job.id).in_(job_ids))).all())
            # A failed or canceled job keeps the images its engine made and billed before it ended.
            done = [j.id for j in jobs if j.status in TERMINAL]
            assets: dict[str, list[str]] = {}
            if done:
                rows = s.exec(select(Asset.job_id, Asset.id).where(col(Asset.job_id).in_(done))
                              .order_by(col(Asset.job_id), col(Asset.index))).all()
                for job_id, asset_id in rows:
                    assets.setdefault(job_id, []).append(asset_id)
        # Looked at after the row: the runner writes a step's file before its row.
        previews = {j.id for j in jobs if j.status == "running" and self.previews.exists(j.id, since=j.started_at)}
        return jobs, assets, previews

    async def aclose(self) -> None:
        self._followed.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
