"""Running one claimed job: engine call, assets, and the final state.

Every write carries the claim's `attempt`: when a newer claim exists (the job was recovered and
re-queued), the old attempt's writes change nothing. A success or a move back to the queue also
yields to a cancel asked through another process (`cancel_requested_at`) that the cancel watch has
not yet delivered: the cancel was answered 202, so it wins. Asset files are stored before the
transaction that inserts their rows and finishes the job, so a row never points at a missing file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import math
import numbers
import operator
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeGuard

from PIL import Image, UnidentifiedImageError
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, func, select
from typing_extensions import TypeIs

from orchestrator import adopt, cache, device_time, events, quota, webhooks
from orchestrator.cache import cache_key, cached_copies
from orchestrator.clock import shared_now, utcnow
from orchestrator.db import Database, changed, commit_in_doubt, disk_full, transient
from orchestrator.disk import DiskReserve
from orchestrator.errors import (
    BudgetExceeded,
    Canceled,
    Charged,
    ContentUnavailable,
    DeviceTimeExhausted,
    EngineError,
    EngineUnavailable,
    ImagesNotStored,
    Interrupted,
    NoRoomForImages,
    NoRoute,
    OrchestratorError,
    SourceUnavailable,
    StaleAttempt,
    StoppedPartWay,
    StorageQuotaExceeded,
    first_line,
)
from orchestrator.events import TERMINAL, EventBus
from orchestrator.follow import tell_moves
from orchestrator.health import EngineHealth
from orchestrator.ids import new_id
from orchestrator.jobs import render_request
from orchestrator.ledger import Ledger
from orchestrator.models import NO_LEASE, Asset, Job, Project
from orchestrator.outage import Outage
from orchestrator.routing import Router, fallbacks, leaves_machine, priced
from orchestrator.schemas import storable
from orchestrator.store import ArtifactStore, Preview, PreviewFiles, Put, encode_png, hide_paths
from policies.schema import PRIVACY_LOCAL, PRIVACY_TAG, is_private
from tiers._http import SendsCredentials
from tiers.base import (
    DEVICE_SECONDS,
    FINISH_REASONS,
    MAX_MODEL_CHARS,
    NOTES,
    RECORDED_PARAMETERS,
    UNKNOWN_MODEL,
    CancelToken,
    Engine,
    Reattachable,
    RenderRequest,
    RenderResult,
    Restartable,
    Resumable,
    before_billable_sends,
    billed_by_provider,
    provider_seed,
    to_credits,
    to_millicredits,
)
from tiers.registry import EngineRegistry, left_off

log = logging.getLogger(__name__)
PROGRESS_WRITE_INTERVAL = 1.0
# How long a job's end (its images and charge, or its failure) waits out a database restart, a
# failover or a stalled writer (each lock wait ends after 30 s) before it is left to recovery.
# Repeating it is safe: every attempt rolls back whole, and its update applies only while the
# attempt still holds the job.
FINAL_WRITE_SECONDS = 120.0
# A store's disk that takes nothing more: full, over its user's quota, mounted read-only, or a
# folder the service may not write (another owner or mode left by a restore).
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# How long a job's first paid request waits for the database to record it before it goes.
RECORD_SENDING_SECONDS = 15.0
# How long a stop's own writes (a job queued again) wait out a database that is away: shorter than
# a job's end, as a stop must end within systemd's TimeoutStopSec (see the README); past it, the
# job is left to recovery.
STOP_WRITE_SECONDS = 30.0
# How long a request that can bill waits for the saves of what was accepted before it (see
# `_first_send_recorder`): a lock wait's worth.
SAVE_WAIT_SECONDS = 30.0
# Threads that write a job's encoded images to the store (`_store_pngs`): as many as a job has
# images (`n` is 16 at most). A write waits on the disk (two fsyncs: the file, then its folder's
# rename), not on a core, so each image's runs beside the others'. Done by the PNG threads (one a
# core), a job's n=4 on 2 cores paid four syncs in a row where two do.
STORE_THREADS = 16
# The most characters of an image's finish reason its record keeps (`tiers.base.FINISH_REASONS`).
FINISH_REASON_CHARS = 100


# How many times a fallback looks again at the rule its policy gives when a move finds another
# applies under its lock (`RuleChanged`).
RULE_LOOKS = 3


class RuleChanged(Exception):
    """Another rule of the job's policy applies under the move's lock than the one its candidates
    came from (the budget's share crossed a `budget_used_over`): the fallback looks again."""


class MadePrivate(Exception):
    """The job was made private after it was routed: a fallback off the machine is not taken."""


@dataclass
class Claim:
    job: Job
    attempt: int
    cancel: CancelToken
    # Set when the service is stopping: the interrupted job is left for start-up recovery,
    # not recorded as canceled by a user.
    shutdown: bool = False
    # What providers accepted in this attempt (`Progress.provider_request`), as saved with the job.
    # The save is made behind the event loop; the job's end writes it too, should it still be out.
    accepted: dict[str, Any] | None = None
    # Set as the engine asks to send something billable (`billable_send`), before anything else
    # happens there: from then on the attempt may have reached a provider.
    sending: bool = False
    # Set as the runner starts ending the attempt: no billable send may begin after it (an engine's
    # other concurrent requests, which its failure did not stop, would otherwise go out unbilled).
    ended: bool = False
    # Set when a stop waits for this attempt's paid request: a request may still go out beside one
    # that is out (a job's second call), but not once none is (a 429 waited out: the end of the
    # wait would abandon it unanswered, made and billed for nobody).
    stopping: bool = False
    # Set when this attempt follows work an earlier process sent (reattached or resumed).
    inherited: bool = False
    # Requests of this attempt that went out and were not answered that nothing was made.
    out: int = 0
    # Of those, the ones whose work the provider, asked to withdraw it, said never ran, or that made
    # none (`Progress.withdrawn`), and the ids of that work: all of them, every accepted one
    # included, and the job's charge was for nothing.
    withdrawn: int = 0
    withdrawn_ids: set[str] = field(default_factory=set)
    # The lease's length in seconds (0: not known) and when it was last taken or renewed
    # (`time.monotonic()` and `time.time()`, read before the write): until a lease from then has
    # run out, no other process can have taken the job over. A process stopped past it (SIGSTOP,
    # a paused VM) resumes before its heartbeat has looked, and must ask the database
    # (`JobRunner.still_held`).
    lease: float = 0.0
    renewed: float = field(default_factory=time.monotonic)
    renewed_wall: float = field(default_factory=time.time)
    # Claimed to be moved to another candidate without being sent: its engine's circuit is open.
    circuit_open: bool = False
    # The job's `started_at` before this claim wrote its own: a claim undone puts it back.
    started_before: datetime | None = None
    # Set when such a move found no candidate to take it after all: the job is queued again, to wait.
    waiting: bool = False
    # Claimed (with `circuit_open`) to be moved off an engine no process has (`Scheduler._fail_unserved`).
    unserved: bool = False
    # Set once the attempt's first request that can bill was recorded (`JobRunner._record_sending`).
    recorded_send: bool = False
    # `time.monotonic()` as the runner started the engine on it; None: no engine was (a claim to
    # move it, or given back unstarted). What an end without a result counts of the device's time.
    began: float | None = None
    # `time.monotonic()` as the engine returned or raised: the device is let go then, so what an
    # end without a result counts stops there (a fallback's looks at its candidates, a thread's
    # wait for the end's write, held no device). None: not yet, or no engine was started.
    engine_ended: float | None = None
    # `time.monotonic()` as a local engine that tells it (`tells_device_start`) started its work on
    # the device, its model loaded (`Progress.on_device`): what an end without a result counts
    # starts there. None: not told (yet).
    device_began: float | None = None
    # The write that marks the attempt unsent again once every request of it was answered that
    # nothing was made (see `JobRunner._send_refused`), and how many such writes landed: the next
    # request waits for it, then records its send anew.
    unmarking: asyncio.Future[None] | None = None
    unmarked: int = 0

    def since_renewed(self) -> float:
        """Seconds since the lease was last taken or renewed, by whichever clock says more: the
        monotonic clock stands still while a VM is paused or its host suspended, and the wall
        clock may be stepped back."""
        return max(time.monotonic() - self.renewed, time.time() - self.renewed_wall)

    def surely_unsent(self) -> bool:
        """Nothing of this attempt can have reached a provider: its engine announces its sends,
        and it has asked for none. Call it once `ended` is set, so that none can start after."""
        return (self.job.unsent_attempt == self.attempt and not self.sending and not self.accepted)

    def may_have_paid_out(self) -> bool:
        """Whether a paid request of this attempt may be out now, or made: not when its engine
        announces its requests and each one was answered that nothing was made (a 429 or a 5xx
        being waited out) or none was sent; always for an engine that does not announce them."""
        if self.surely_unsent():
            return False
        announces = self.sending or self.job.unsent_attempt == self.attempt
        return not announces or self.out > 0 or self.accepted is not None


# The most steps the job row holds (a 32-bit column on PostgreSQL): a larger count is scaled down.
MAX_STEPS = 2**31 - 1
# Preview modes a PNG holds as they are; others are converted before they are kept.
PREVIEW_MODES = frozenset({"RGB", "RGBA", "L", "LA"})


def unread_note(result: RenderResult) -> str | None:
    """What a result says was unread of its bill, where that leaves its cost unknown: a cost reported
    beside the note is a known bill (captured as such, as on a success), not one for reconciliation."""
    return result.cost_unread if result.cost_millicredits is None else None


def _whole(value: object) -> int | None:
    """A step count as an int: an integer of any kind, or a finite float cut to one."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        pass
    return int(value) if isinstance(value, float) and math.isfinite(value) else None


def _smaller_than_asked(params: dict[str, Any], size: tuple[int, int]) -> str | None:
    """A note for an image narrower or lower than the job asked for: stored as made (and paid for
    as asked), a client reading only `width`/`height` would not know that it is not what was asked."""
    width, height = params.get("width"), params.get("height")
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    short = [side for side, made, asked in (("narrower", size[0], width), ("lower", size[1], height)) if made < asked]
    if not short:
        return None
    return f"the engine made {size[0]}x{size[1]}, {' and '.join(short)} than the {width}x{height} asked"


def _storable_values(value: Any) -> Any:
    """`value` with each text in it, however deep in lists and mappings, as it can be stored (`storable`)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, (list, tuple)):
        return [_storable_values(item) for item in value]
    if isinstance(value, dict):
        return {_storable_values(k): _storable_values(v) for k, v in value.items()}
    return value


def plain(details: dict[str, Any]) -> dict[str, Any]:
    """`details` as JSON can carry them: an event's data is encoded for every stream that sends
    it, and a value that cannot be (a datetime, a numpy number) broke each of them for good."""
    try:
        loaded = json.loads(json.dumps(details, default=str, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return {key: str(value)[:500] for key, value in details.items()}
    return loaded if isinstance(loaded, dict) else {}


class JobProgress:
    """Engine progress -> events (every step), and the job row and preview file (throttled).
    Thread-safe. Neither a local engine's inference thread nor the event loop (where remote
    engines report) may wait for the database's write lock: another writer holding it for seconds
    would stop the denoising, or every job and stream of the process. So a thread makes the writes
    behind them (one at a time, the latest step next). What a provider accepted is saved the same
    way: at once, but never by the event loop."""

    def __init__(self, runner: JobRunner, claim: Claim) -> None:
        self.runner = runner
        self.claim = claim
        # The row's progress is for pollers: at most one write a second, never on the hot first step.
        self._last_write = time.monotonic()
        self._lock = threading.Lock()
        self._writing = False  # a write behind the event loop is out
        self._next: tuple[int, int] | None = None  # the step it makes after its own
        # What the provider accepted, oldest first (on a reattach, what an earlier process saved).
        work = claim.job.provider_work or {}
        same_engine = work.get("engine") == claim.job.engine
        self._handles: list[dict[str, Any]] = list(work.get("handles", [])) if same_engine else []
        self._saving = False  # a save of the provider work is out
        self._unsaved: dict[str, Any] | None = None  # the latest work, for the save out to make next
        self._saving_done: asyncio.Future[None] | None = None  # the save out behind the event loop

    def step(self, step: int, total: int, preview: Image.Image | None = None) -> None:
        if self._over():
            # The job is ending, or has ended while its inference thread finishes a step: a preview
            # kept or written now would outlive it.
            return
        job_id = self.claim.job.id
        # What reaches the row and every stream, from whatever engine (a plugin's 37.5 of 100, a
        # numpy integer, SQLite kept as a float or a blob the job could no longer be read with).
        counted = _whole(step), _whole(total)
        if counted[0] is None or counted[1] is None or counted[1] < 0:
            log.debug("job %s: progress %r of %r is not a step count; not told", job_id, step, total)
            return
        total = counted[1]
        step = min(max(counted[0], 0), total) if total else 0
        if total > MAX_STEPS:  # bytes of a download, say: told on the scale the row can hold
            step, total = step * MAX_STEPS // total, MAX_STEPS
        try:
            if isinstance(preview, Image.Image) and preview.mode.startswith("I;16"):
                # 16 bits a sample, scaled to 8: converted as they were, every sample above 255
                # was cut to it, and a mid-gray preview was shown white.
                preview = preview.convert("I").point(lambda value: value * (1 / 256)).convert("L")
            if preview is not None and (not isinstance(preview, Image.Image) or preview.mode not in PREVIEW_MODES):
                # A mode PNG cannot hold (CMYK) failed the preview's every read.
                preview = preview.convert("RGB") if isinstance(preview, Image.Image) else None
            if preview is not None:
                # Read now, not at its first encode: only a shrink read the pixels here, so a small
                # preview cut short was told with a `preview_url` whose every GET failed 500.
                preview.load()
            shown = Preview.of(preview) if preview is not None else None  # shrunk; None when empty
        except Exception as exc:  # the plugin's pixels (a file cut short, opened lazily): Pillow raises any kind
            # Read here, on the engine's thread: raised into the engine, it failed the render for
            # a preview, which is only ever shown. The step is told without one.
            log.debug("job %s: step %s's preview cannot be read (%s); told without it", job_id, step, exc)
            shown = None
        if shown is not None:
            self.runner.previews[job_id] = shown
            if self._over():  # since the look above: the job's end may have cleared it
                self.runner.previews.pop(job_id, None)
                return
        self.runner.bus.publish(job_id, "progress", events.progress(job_id, step, total, preview=shown is not None))
        self.claim.job.progress_step, self.claim.job.progress_total = step, total
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            now = time.monotonic()
            if now - self._last_write < PROGRESS_WRITE_INTERVAL or step >= total:
                return  # the final state is written with the job's result
            self._last_write = now
            if self._writing:
                self._next = (step, total)
                return
            self._writing = True
        if loop is None:  # a local engine's inference thread
            self.runner.write_behind(self._write_behind, step, total)
        else:
            loop.run_in_executor(None, self._write_behind, step, total)

    def _over(self) -> bool:
        """Whether the render is over: canceled, or its engine returned or raised. A plugin's own
        thread that told a step after its render returned (its job succeeded, nothing canceled)
        kept a preview nothing removed again: held by the process for good, and served as the
        finished job's."""
        return self.claim.cancel.cancelled or self.claim.engine_ended is not None

    def _write(self, step: int, total: int) -> None:
        latest = self.runner.previews.get(self.claim.job.id)
        if latest is not None and not self.claim.cancel.cancelled:
            # Before the row: a process that sees the new step (its follower, woken by the commit)
            # finds this step's preview already there.
            self.runner.write_preview(self.claim.job.id, latest)
        self.runner.write_progress(self.claim, step, total)

    def _write_behind(self, step: int, total: int) -> None:
        while True:
            try:
                self._write(step, total)
            except Exception:  # the writes log their own failures; this keeps the next ones coming
                log.exception("job %s: writing its progress failed", self.claim.job.id)
            with self._lock:
                if self._next is None:
                    self._writing = False
                    return
                (step, total), self._next = self._next, None

    def state(self, state: str, **details: Any) -> None:
        if not self.claim.cancel.cancelled:  # as `step`: an abandoned inference thread may still tell
            self.runner.bus.publish(self.claim.job.id, "state", plain({"state": str(state), **details}))

    def on_device(self) -> None:
        if self.claim.device_began is None:  # the first: an engine of several passes may tell each
            self.claim.device_began = time.monotonic()
            # On the row too, for what reads the attempt while it runs (`Job.device_began_at`);
            # never from the inference thread, which must not wait for the write lock.
            self.runner.write_behind(self.runner.write_device_start, self.claim)

    def provider_request(self, request_id: str, handle: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._handles.append(plain({**(handle or {}), "id": str(request_id)}))
            # Each save holds every handle so far: the latest one is all that needs writing.
            self.claim.accepted = self._unsaved = {"engine": self.claim.job.engine, "handles": list(self._handles)}
            if self._saving:
                return
            self._saving = True
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            try:
                self._saving_done = loop.run_in_executor(None, self._save)
                return
            except RuntimeError:  # the loop's executor is shut down (the service is stopping)
                pass
        self._save()

    async def withdrawn(self, handles: list[dict[str, Any]]) -> None:
        self.claim.withdrawn += 1
        self.claim.withdrawn_ids.update(str(handle.get("id")) for handle in handles)
        # Told before the job's end is written, the end settles it (`JobRunner._end`).
        await self.runner.void_if_all_withdrawn(self.claim)

    async def saved(self) -> None:
        """Until what providers accepted so far is saved (or its save has failed, logged)."""
        done = self._saving_done
        if done is not None and not done.done():
            await asyncio.shield(done)

    def _save(self) -> None:
        while True:
            with self._lock:
                work, self._unsaved = self._unsaved, None
                if work is None:
                    self._saving = False
                    return
            try:
                self.runner.save_provider_request(self.claim, work)
            except Exception:
                # The render goes on: its end writes the work with the job, and a crash before that
                # finds the job marked as having sent (`unsent_attempt`): failed as possibly billed.
                log.exception("job %s: saving what the provider accepted failed", self.claim.job.id)
            else:
                # From here a crash finds this work again (reattached, or charged for reconciliation).
                self.state("accepted", handles=len(work["handles"]))


def _accepted_values(work: dict[str, Any]) -> dict[str, Any]:
    """The job row's record of what providers accepted: the handles, and their ids for people."""
    ids = storable(",".join(str(h["id"]) for h in work["handles"]))
    return {"provider_request_id": ids[:500], "provider_work": work}


def restartable(engine: object, job: Job) -> TypeIs[Restartable]:
    """Whether `job` may simply run again on `engine` after a crash, once the engine has taken the
    dead attempt's work off its server: a free job on an engine that can do that."""
    return job.estimated == 0 and isinstance(engine, Restartable)


def reattachable(engine: object, job: Job) -> TypeGuard[Reattachable]:
    """Whether `engine` can finish `job` from the provider work an earlier attempt saved."""
    work = job.provider_work or {}
    handles = work.get("handles") or []
    # Checked on every render: the request is rebuilt only for the rare job with saved work.
    return bool(handles) and work.get("engine") == job.engine and followable(engine, job, handles)


def followable(engine: object, job: Job, handles: list[dict[str, Any]]) -> TypeGuard[Reattachable]:
    """Whether `engine` can finish `job` from the work `handles` name. An engine's question that
    raises (a row of an older release the request cannot be rebuilt from) is a no: asked by
    recovery, it stopped the service from starting, and by a stop, the stop."""
    if not isinstance(engine, Reattachable):
        return False
    try:
        return bool(engine.can_reattach(handles, render_request(job.params)))
    except Exception:
        log.exception("job %s: whether its provider's work can be followed is unknown; taken as no", job.id)
        return False


class JobRunner:
    def __init__(self, db: Database, registry: EngineRegistry, store: ArtifactStore, bus: EventBus,
                 ledger: Ledger, health: EngineHealth, local_rate: float = 0.0, *,
                 preview_files: PreviewFiles, reserve: DiskReserve | None = None, default_quota_mb: int = 0,
                 default_local_seconds: int | None = None, lease_seconds: float = 60.0) -> None:
        self.db = db
        # The device-time quota of a project that sets none of its own (ORCH_PROJECT_LOCAL_SECONDS_PER_DAY;
        # None: none): a fallback onto a local engine is judged against it.
        self.default_local_seconds = default_local_seconds
        # The leases' length: a running attempt whose lease has run out counts to its last renewal (read
        # as the expiry less this where unstamped; `device_time.held_so_far`).
        self.lease = timedelta(seconds=lease_seconds)
        # The storage quota of a project that sets none of its own (ORCH_PROJECT_STORAGE_QUOTA_MB;
        # 0: none): a fallback whose images may take more than the job held is judged against it.
        self.default_quota_mb = default_quota_mb
        # The data dir's free space a job needs before it renders or sends its first request (None: not checked).
        self.reserve = reserve
        # Credits per device-second for local engines; 0 keeps local work free.
        self.local_rate = local_rate
        self._encoder = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="png")
        self._store_io = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store")
        # Local engines' progress writes (see `JobProgress`): one device, one job at a time.
        self._progress_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        # A database away for a while failed every job's every progress write: told once, then a
        # line a minute, not a warning a second for as long as it lasts.
        self._progress_outage = Outage(log, "writing jobs' progress", "pollers miss steps meanwhile (events do not)",
                                       level=logging.WARNING)
        self.ledger = ledger
        self.health = health
        # Set by the scheduler: wakes it when a job goes back to the queue on another engine.
        self.notify: Callable[[], None] = lambda: None
        # Set by the scheduler: whether another live worker runs jobs of an engine (`Presence.serves`).
        self.served_elsewhere: Callable[[str], bool] = lambda engine: False
        # Set by the services: whether a policy of this process keeps everything on this machine.
        self.keeps_all_local: Callable[[str, str | None], bool] = lambda policy, routed: False
        # Set by the services: asked by a fallback which rule of the job's policy applies now.
        self.router: Router | None = None
        self.registry = registry
        self.store = store
        self.bus = bus
        self.previews: dict[str, Preview] = {}
        # The latest previews again, as files other processes serve (see `write_preview`).
        self.preview_files = preview_files
        self._preview_written: set[str] = set()  # jobs with a file to remove when they end
        # Jobs whose engine returned, being stored and finished: a stop waits for them.
        self.storing: set[str] = set()
        # Set once the service stopped waiting for its jobs: a result that comes later can no
        # longer be stored here and is left to recovery, as a stop before the engine returned.
        self._closed = False

    async def run(self, claim: Claim) -> None:
        job = claim.job
        if not self.bus.knows(job.id):  # queued before this process started (recovered after a restart)
            self.bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued"})
        tell_moves(self.bus, job)  # made by other processes, before this claim
        if claim.circuit_open:
            await self._move_off_open_circuit(claim)
            return
        told = self.bus.view(job.id)
        if told is not None and told.started and not told.queued and claim.attempt > told.attempt:
            # Its stream told an earlier attempt's start (followed here while another process ran
            # it), and not its end: queued again, as `follow.catch_up` tells it, then this start.
            self.bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued", "attempt": told.attempt,
                                                "requeued": True})
        self.bus.publish(job.id, "started", {"job_id": job.id, "status": "running", "engine": job.engine,
                                             "attempt": claim.attempt})
        started = claim.began = time.monotonic()
        engine_returned = False  # from then on what it made exists, and a remote one may have billed it
        ran_on = job.engine  # a fallback moves the job (and its probe) to another engine
        try:
            claim.cancel.raise_if_cancelled()  # canceled between its claim and this start
            result = await self._render_probed(claim)
            engine_returned = True
            asset_ids = await self._store(claim, result, started)
            if asset_ids is None:
                return
        except StaleAttempt:
            log.info("job %s attempt %s was superseded; its result is discarded", job.id, claim.attempt)
            return
        except Canceled as exc:
            await self._canceled(claim, exc, engine_returned)
        except EngineError as exc:
            # Only when the provider surely made (and billed) nothing: a request sent without an
            # answer is never repeated elsewhere, or the studio could pay twice.
            if not (exc.retryable and exc.charged == "no" and await self._fall_back(claim, exc)):
                await self._end(claim, "failed", exc)
        except OrchestratorError as exc:
            await self._end(claim, "failed", self._doubted(claim, exc))
        except Exception as exc:  # an engine bug must fail the job, not leave it running
            await self._crashed(claim, exc)
        else:
            log.info("job %s succeeded on %s: %d image(s) in %.1f s", job.id, job.engine, len(asset_ids),
                     time.monotonic() - started)
            for index, asset_id in enumerate(asset_ids):
                self.bus.publish(job.id, "asset", {"asset_id": asset_id, "index": index})
            self.bus.publish(job.id, "succeeded", {"job_id": job.id, "status": "succeeded", "assets": asset_ids})
        finally:
            # A probe canceled between its claim and its start never reached the inner release.
            self.health.finished(ran_on, job.id)
            self.storing.discard(job.id)
            self.previews.pop(job.id, None)
            if job.id in self._preview_written:  # only a job that ran past a progress write has one
                self._preview_written.discard(job.id)
                try:
                    await asyncio.to_thread(self.preview_files.remove, job.id)
                except OSError as exc:  # left for the sweeper: the job's end must not fail on it
                    log.warning("job %s: removing its step preview failed: %s", job.id, exc)

    async def _render_probed(self, claim: Claim) -> RenderResult:
        """The engine's result, with the engine's health told of how it went."""
        job = claim.job
        self.health.assign(job.engine, job.id)
        try:
            try:
                return await self._render(claim)
            except OrchestratorError as exc:
                # Before the job keeps it: its message and details are its project's keys' to read.
                self._without_credentials(job.engine, exc)
                raise
        except Canceled as exc:
            self._doubt_a_free_cancel(claim, exc)
            raise
        except EngineError as exc:
            if exc.retryable and exc.engine_fault:
                self.health.failed(job.engine)
            raise
        except (OrchestratorError, SQLAlchemyError):  # the request's or the service's, not the engine's
            raise
        except Exception:
            # An engine's bug: a plugin that fails every job so stayed `ok`, and routing sent it the next.
            self.health.failed(job.engine)
            raise
        finally:
            claim.engine_ended = time.monotonic()
            self.health.finished(job.engine, job.id)  # whatever the verdict, this probe is over

    async def _store(self, claim: Claim, result: RenderResult, started: float) -> list[str] | None:
        """The ids of the stored images, or None when the job is left to recovery."""
        job = claim.job
        self.storing.add(job.id)
        elapsed = time.monotonic() - started
        self.health.succeeded(job.engine, job.stage, elapsed)
        try:
            return await asyncio.to_thread(self._succeed, claim, result, elapsed)
        except Canceled as exc:
            # Canceled once the engine had finished: a remote engine's images are made and billed,
            # and the canceled job keeps them (`_kept_images`).
            if self.registry.get(job.engine).kind == "remote":
                exc.at_least_charged("yes")
                exc.cost_millicredits, exc.cost_unread = result.cost_millicredits, unread_note(result)
                exc.made = result
            raise
        except (StaleAttempt, OrchestratorError):
            raise
        except Exception as exc:  # disk full, permissions: the engine did its (billed) work
            if transient(exc) and self.registry.get(job.engine).kind == "local":
                # The database stayed away for the whole final write: a local job is left to
                # recovery (its lease runs out, and it runs again), not failed for good.
                log.error("job %s: the database %s while its images were stored; it is left to recovery",
                          job.id, "had no room left on its disk" if disk_full(exc) else "did not answer")
                return None
            log.exception("job %s: storing its images failed", job.id)
            # The first line says what failed; a database error's next lines hold its SQL and values,
            # and a file error's text the server's paths (the log has them).
            reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                      else first_line(exc))
            said = f"the images were made but could not be stored: {type(exc).__name__}: {reason}"
            if isinstance(exc, OSError) and exc.errno in NO_ROOM:
                # Told as what it is (it read as the engine's `engine_error`): the operator's to mend.
                mend = ("the data dir is read-only: its operator must make it writable" if exc.errno == errno.EROFS
                        else "the data dir cannot be written by the service, its owner or mode: its operator "
                             "must fix it" if isinstance(exc, PermissionError)
                        else "the data dir has no room for them: its operator must make some")
                unstored: EngineError = ImagesNotStored(f"{said} ({mend})"[:500], charged="yes",
                                                        cost_millicredits=result.cost_millicredits)
            else:
                unstored = EngineError(said[:500], retryable=False, charged="yes",
                                       cost_millicredits=result.cost_millicredits)
            unstored.cost_unread = unread_note(result)
            raise unstored from exc

    async def _canceled(self, claim: Claim, exc: Canceled, engine_returned: bool) -> None:
        """A user's cancel ends the job now, with what it cost; a stop leaves it to the next start."""
        job = claim.job
        # After the engine returned, a stop does not interrupt `_succeed` (until the runner has
        # closed): a Canceled from it is a user's cancel (recorded in the row), which ends the
        # job now, with what it cost.
        if claim.shutdown and (not engine_returned or self._closed):
            # Work a paid provider accepted in this attempt is recovery's to follow: queued again
            # as unsent, the next run would send it afresh. A free self-hosted server's job (which
            # bills nobody, whatever its cancel says) is queued again with its task, for the next
            # run to resume or take off the server.
            engine = self.registry.get(job.engine)
            work = claim.accepted or (job.provider_work if claim.inherited else None)
            if restartable(engine, job) or (exc.charged == "no" and not claim.accepted):
                # Nothing reached a paid provider: queued again, with its hold, for the next start
                # (recovery would fail a remote job as possibly billed).
                try:
                    await asyncio.to_thread(self._requeue_unsent, claim)
                except StaleAttempt:
                    pass
                except Canceled as asked:  # through another process meanwhile: nothing was sent
                    await self._end(claim, "canceled", asked)
                    return
            elif work and work.get("engine") == job.engine and followable(engine, job, list(work.get("handles") or [])):
                # Work a provider accepted: queued again to be followed, as recovery would, but as
                # a stop, which no crash count sees (three rolling restarts during one long render
                # failed the job, charged, and withdrew its work). A cancel asked meanwhile is
                # recovery's to settle, with what the work cost.
                with contextlib.suppress(StaleAttempt, Canceled):
                    await asyncio.to_thread(self._requeue_to_follow, claim, work)
            elif not engine_returned and exc.made is not None and exc.made.images:
                # Images its earlier calls made (and billed), and a later request out that nothing
                # can follow: recovery would fail it `interrupted` too, with those images lost and
                # the whole estimate captured. Ended so now, keeping them, charged what they may
                # cost. (A whole result that came after the runner closed is left to recovery.)
                made = len(exc.made.images)
                stopped = StoppedPartWay(f"the service stopped without waiting for the job's request out; the {made} "
                                         f"image(s) its earlier requests made are kept", details={"engine": job.engine},
                                         charged=exc.charged, cost_millicredits=exc.cost_millicredits)
                # A report of the cost that could not be read goes with the charge: without it, the
                # estimate captured for it read as a known bill, never reconciled with the invoice.
                stopped.made, stopped.cost_unread = exc.made, exc.cost_unread
                await self._end(claim, "failed", stopped)
                return
            log.info("job %s interrupted by shutdown; the next start recovers it", job.id)
            return
        await self._end(claim, "canceled", exc)

    def _without_credentials(self, engine_name: str, exc: BaseException) -> None:
        """`exc` without the credentials of the engine that raised it (see `SendsCredentials`),
        a third party's built on a built-in engine included."""
        engine = self.registry.get(engine_name) if engine_name in self.registry else None
        if isinstance(engine := getattr(engine, "wrapped", engine), SendsCredentials):
            engine.without_credentials(exc)

    async def _crashed(self, claim: Claim, exc: Exception) -> None:
        """An engine's bug fails the job, possibly billed when a remote engine may have sent it."""
        job = claim.job
        self._without_credentials(job.engine, exc)  # its text goes to the log and the job
        log.exception("job %s crashed in engine %s", job.id, job.engine, exc_info=exc)
        # The first line: a database error's next ones hold its SQL and values (the log has them).
        # The server's paths are cut to their last part: the project's key reads the job.
        first = hide_paths(first_line(exc), job.engine)
        # A remote engine may have sent the request before it broke: the charge is unknown then.
        error = EngineError(f"engine '{job.engine}' failed unexpectedly: {type(exc).__name__}: {first}"[:500],
                            retryable=False, charged="unknown" if self._may_have_sent(claim) else "no")
        await self._end(claim, "failed", error)

    def _doubted(self, claim: Claim, exc: OrchestratorError) -> OrchestratorError:
        """An error that is not an engine's says nothing of what a provider billed, and the ledger
        reads it as nothing: raised once a remote engine's request may have gone out (a plugin
        pricing its answer with a price its file lacks), it fails the job with the charge unknown."""
        if not self._may_have_sent(claim):
            if isinstance(exc, NoRoute):
                # Routing's code, not a job's (a plugin with no price for the model it was routed to):
                # told as the engine unable to take the job, which is what it is.
                return EngineUnavailable(f"engine '{claim.job.engine}' cannot take this job: {exc.message}"[:500],
                                         details={**exc.details, "cause": exc.code}, retryable=False, charged="no")
            return exc
        return EngineError(f"engine '{claim.job.engine}' failed once its request may have gone out: "
                           f"{exc.code}: {exc.message}"[:500],
                           details={**exc.details, "cause": exc.code}, retryable=False, charged="unknown")

    def _may_have_sent(self, claim: Claim) -> bool:
        """Whether a remote engine's request of this attempt may have reached its provider (unless
        the engine announces its sends and had asked for none). Ends the attempt's sends first:
        none starts after the answer."""
        claim.ended = True
        job = claim.job
        remote = job.engine in self.registry and self.registry.get(job.engine).kind == "remote"
        return remote and not claim.surely_unsent()

    def close(self) -> None:
        self._closed = True
        self._encoder.shutdown(wait=True)
        self._store_io.shutdown(wait=True)
        self._progress_writer.shutdown(wait=False, cancel_futures=True)  # for pollers only: not waited for

    def write_behind(self, write: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # closed: the service is stopping, and the step is only a poller's
            self._progress_writer.submit(write, *args)

    async def _end(self, claim: Claim, status: str, error: OrchestratorError) -> None:
        claim.ended = True
        try:
            status, error, kept = await asyncio.to_thread(self._finish, claim, status, error)
        except StaleAttempt:
            log.info("job %s attempt %s was superseded; its %s is discarded", claim.job.id, claim.attempt, status)
            await self.void_if_all_withdrawn(claim)  # ended elsewhere (recovery's charge of this attempt), or not
            return
        await self.void_if_all_withdrawn(claim)  # told before this end's charge was written
        for index, asset_id in enumerate(kept):
            self.bus.publish(claim.job.id, "asset", {"asset_id": asset_id, "index": index})
        # A cancel says why too: a user's, a stop's, a policy's move to local-only.
        data: dict[str, Any] = {"job_id": claim.job.id, "status": status, "error": error.to_dict()}
        if status == "failed":
            log.warning("job %s failed on %s: %s: %s", claim.job.id, claim.job.engine, error.code, error.message)
        else:
            log.info("job %s canceled on %s", claim.job.id, claim.job.engine)
        self.bus.publish(claim.job.id, status, data)

    async def void_if_all_withdrawn(self, claim: Claim) -> None:
        """The job's charge settled at 0 (`void_withdrawn`) once its provider said the work of
        every request of the attempt that may have billed never ran, each it accepted included:
        not while another may have (an earlier image's prediction, work an earlier attempt sent),
        nor before the job's end."""
        accepted = {str(handle.get("id")) for handle in (claim.accepted or {}).get("handles", [])}
        if not claim.withdrawn or claim.withdrawn < claim.out or claim.inherited or not accepted <= claim.withdrawn_ids:
            return
        try:
            await asyncio.to_thread(self.void_withdrawn, claim.job)
        except Exception:  # the charge stays for a person to reconcile, as it was
            log.warning("job %s: settling the charge of its withdrawn work failed", claim.job.id, exc_info=True)

    def void_withdrawn(self, job: Job) -> None:
        """The provider said the withdrawn work never ran: the job's charge for reconciliation is
        settled at 0 (`Ledger.void_withdrawn`), while the job is still the one that ended with it
        (the same attempt, ended, on the same engine): not one run again since."""
        note = f"{job.engine}: its work was withdrawn before it ran; nothing was billed"
        with self.db.transaction() as s:
            row = s.get(Job, job.id)
            if row is None or row.status not in TERMINAL or row.engine != job.engine or row.attempt != job.attempt:
                return
            voided = self.ledger.void_withdrawn(s, row, note)
        if voided:
            log.info("job %s: %s took its work back before it ran; its charge of %s credits is reconciled at 0",
                     job.id, job.engine, to_credits(-sum(entry.amount for entry in voided)))

    async def _fall_back(self, claim: Claim, error: EngineError) -> bool:
        """Move the job to the next usable candidate of its routing decision: settle the old hold,
        take a new one, record the attempt, and queue it again. False when no candidate is left."""
        job = claim.job
        tried = {a["engine"] for a in job.attempts or []} | {job.engine}
        request = render_request(job.params)
        token = f"fallback-{job.id}-{claim.attempt}"
        routing = recorded_routing = job.routing or {}
        # Candidates passed over for money or privacy, told with the job's end when none is left:
        # it failed with its engine's error alone, and the budget that kept it there showed nowhere.
        skipped: list[dict[str, Any]] = []
        pending = fallbacks(routing, tried)
        # The rule that chose the candidates may be one the budget's share picked (`budget_used_over`):
        # judged again on the budget as it is now, as routing judges it, and followed instead when
        # another rule applies now (its decision recorded on the job by the move).
        rerouted: dict[str, Any] | None = None
        if pending:
            try:
                rerouted = await asyncio.to_thread(self._routing_now, job, request, routing)
            except OrchestratorError as refused:  # the rule now denies it, or none of its engines may take it
                skipped.append(self._rule_skip(routing, refused))
                pending = []
            if rerouted is not None:
                routing = rerouted
                pending = fallbacks(routing, tried)
        looked: set[str] = set()
        changes = 0
        while pending:
            name = pending.pop(0)
            looked.add(name)
            cap = routing.get("max_credits")
            # Routed before caps were recorded: held to the estimates it was routed with instead.
            recorded = None if "max_credits" in routing else {
                c["engine"]: to_millicredits(c["estimate"]) for c in routing.get("candidates", [])
                if isinstance(c.get("estimate"), int | float)}
            target = await self._fallback_target(job, name, request, routing)
            if target is None:
                continue
            estimate, model, here = target
            # The decision a move or a copy follows, recorded where it is not the job's own.
            followed = {} if routing is recorded_routing else {"routing": routing}
            moved = reserved = False
            try:
                # An identical request's images made there earlier: copied, as a submit routed there
                # would have (a copy sends nothing, so no cap, budget or circuit keeps it off; what
                # its rows add to the project's storage and the rule it follows are judged as a
                # move's, by the handlers below).
                if job.cache_key and model is not None:
                    copied = await asyncio.to_thread(self._copy_on, claim, error, name, model, estimate, **followed)
                    if copied is not None:
                        self._tell_copied(claim, error, name, estimate, copied)
                        return True
                # Priced now, not as routed (a price may have changed since, or another process reads
                # another prices file): the caps, the request's max_credits and the rule's, still hold.
                if recorded is not None:
                    limit = recorded.get(name)
                else:
                    limit = to_millicredits(cap) if isinstance(cap, int | float) else None
                if limit is not None and estimate > limit:
                    log.warning("job %s: fallback %s skipped: its estimate (%s credits) is above the %s credits "
                                "the job may hold", job.id, name, to_credits(estimate), to_credits(limit))
                    skipped.append({"engine": name, "reason": "max_credits", "estimate": to_credits(estimate)})
                    continue
                # Its half-open probe taken before the move, in one step (see `EngineHealth.reserve`);
                # another worker's engine has its circuit there, asked when that worker claims the job.
                if here and not self.health.reserve(name, token):
                    # Said, as a skip for money or privacy is: the job's failure named no reason its
                    # fallback was not tried.
                    skipped.append({"engine": name, "reason": "circuit_open"})
                    continue
                reserved = here
                # The job is the probe (as a submitted one would be) before the move commits: a cancel
                # of it queued there gives the probe back by the job's id. Adopted after the commit, a
                # cancel in between found the probe still the token's, and the engine waited a cooldown.
                if here:
                    self.health.adopt(name, token, job.id)
                await asyncio.to_thread(self._requeue_on, claim, error, name, model, estimate, **followed)
                moved = True
            except StaleAttempt:
                return True
            except Canceled as exc:
                await self._end(claim, "canceled", exc)
                return True
            except BudgetExceeded as exc:  # nothing was written; a cheaper (or free) candidate may still fit
                log.warning("job %s: fallback %s skipped: %s", job.id, name, exc.message)
                skipped.append({"engine": name, "reason": "budget", "estimate": to_credits(estimate)})
                continue
            except StorageQuotaExceeded as exc:  # nothing was written; an engine of smaller images may still fit
                log.warning("job %s: fallback %s skipped: %s", job.id, name, exc.message)
                skipped.append({"engine": name, "reason": "storage_quota",
                                **{key: exc.details[key] for key in ("used_bytes", "reserved_bytes",
                                                                     "job_bound_bytes", "quota_bytes")}})
                continue
            except DeviceTimeExhausted as exc:  # nothing was written; a cloud candidate may still take it
                log.warning("job %s: fallback %s skipped: %s", job.id, name, exc.message)
                skipped.append({"engine": name, "reason": "device_time",
                                **{key: exc.details[key] for key in ("used_seconds", "quota_seconds")}})
                continue
            except RuleChanged as changed_to:  # nothing was written; the rule that applies now gives the candidates
                changes += 1
                if changes > RULE_LOOKS:  # the share moving back and forth under it: not chased for ever
                    skipped.append({"engine": name, "reason": "budget_rule", "rule_before": routing.get("rule"),
                                    "rule": str(changed_to), "message": "the budget's share kept moving"})
                    continue
                try:
                    rerouted = await asyncio.to_thread(self._routing_now, job, request, routing)
                except OrchestratorError as refused:
                    skipped.append(self._rule_skip(routing, refused))
                    break
                # Refused for the rule alone, this candidate was never judged: the new rule may give it too.
                looked.discard(name)
                if rerouted is None:  # the budget moved back meanwhile: this candidate again
                    pending.insert(0, name)
                    continue
                routing = rerouted
                pending = [n for n in fallbacks(routing, tried) if n not in looked]
                continue
            except MadePrivate:  # nothing was written; a local candidate may still take it
                log.info("job %s: fallback %s skipped: the job was made private", job.id, name)
                skipped.append({"engine": name, "reason": "private"})
                continue
            finally:
                if not moved and reserved:
                    self.health.finished(name, job.id)
            # Said in the log too: the job's success names only the engine that made it, and an
            # engine failing every job in turn (a provider out of reach) showed nowhere else.
            log.warning("job %s: %s failed (%s: %s); it moves to %s%s", job.id, job.engine, error.code,
                        error.message, name, "" if here else ", which another worker runs")
            self.bus.publish(job.id, "state", {"state": "fallback", "from": job.engine, "to": name,
                                               "estimate": to_credits(estimate), "error": error.to_dict(),
                                               **({} if here else {"worker": "another"}),
                                               **({"skipped": skipped} if skipped else {})})
            # Back in the queue, as a stream following the job from another process tells it
            # (`follow.catch_up`): a stream here went on telling it started until the next start.
            self.bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued", "attempt": claim.attempt,
                                                "requeued": True})
            self.notify()
            return True
        if skipped:
            error.details = {**error.details, "fallbacks_skipped": skipped}
        return False

    def _tell_copied(self, claim: Claim, error: EngineError, name: str, estimate: int, copied: list[str]) -> None:
        job = claim.job
        log.warning("job %s: %s failed (%s: %s); an identical job's images on %s are copied", job.id,
                    job.engine, error.code, error.message, name)
        self.bus.publish(job.id, "state", {"state": "fallback", "from": job.engine, "to": name,
                                           "estimate": to_credits(estimate), "error": error.to_dict(),
                                           "cache_hit": True})
        # As a fallback's next attempt is told, and a stream on another process tells it.
        self.bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued",
                                            "attempt": claim.attempt, "requeued": True})
        self.bus.publish(job.id, "started", {"job_id": job.id, "status": "running", "engine": name,
                                             "attempt": claim.attempt + 1, "cache_hit": True})
        for index, asset_id in enumerate(copied):
            self.bus.publish(job.id, "asset", {"asset_id": asset_id, "index": index})
        self.bus.publish(job.id, "succeeded", {"job_id": job.id, "status": "succeeded",
                                               "assets": copied, "cache_hit": True})

    def _routing_now(self, job: Job, request: RenderRequest, routing: dict[str, Any]) -> dict[str, Any] | None:
        """The routing a fallback follows when the rule of the job's policy that applies now, on
        the budget's share as the move will leave it (the failed engine's hold released), is not
        the one `routing` records: the policy's decision now, capped by the new rule and the
        request's own `max_credits` (a job routed before that was recorded: by its recorded cap
        too), and the rule it replaces; None when the recorded rule still applies (or the policy,
        unloaded, cannot say). Raises the router's refusal: a deny rule now, no engine usable."""
        policy, rule = routing.get("policy"), routing.get("rule")
        if self.router is None or not isinstance(policy, str) or not isinstance(rule, str):
            return None
        with self.db.snapshot() as s:
            project = s.get(Project, job.project_id)
            used = None if project is None else self._share_without_own_hold(s, project, job)
        now = self.router.rule_for(policy, request, used, routing.get("policy_hash"), rule)
        if now is None or now == rule:
            return None
        # Judged by this process's engines alone, an engine of the rule that only another worker
        # has read as unusable: the fallback, which moves jobs there, failed the job instead.
        routed = {c.get("engine"): c.get("estimate") for c in routing.get("candidates", []) if isinstance(c, dict)}

        def elsewhere(name: str) -> int | None:
            if not self.served_elsewhere(name):
                return None
            if name in self.registry:  # left off here (its key given to other hosts): priced here
                try:
                    return priced(self.registry.get(name), request)
                except OrchestratorError:
                    return None
            estimate = routed.get(name)  # priced as the job was routed, as `_fallback_target` prices it
            if not isinstance(estimate, int | float) or isinstance(estimate, bool) or estimate < 0:
                return None
            return to_millicredits(estimate)

        # Its engines' circuits left to the fallback's own look (`EngineHealth.reserve`), as for
        # recorded candidates: one kept off by its circuit alone is skipped `circuit_open`, which
        # a job moved off an engine nobody has waits on. Judged here, a rule whose engines' circuits
        # were all open read as one no engine may take, and that job was failed.
        decision = self.router.decide(policy, request, None, used, circuits=False, elsewhere=elsewhere)
        # Bounded by the rule that routes it now and by the request's own cap, not by the cap of the
        # rule it leaves (a rule for cheap engines no longer bounding the one the budget's share
        # picks). A job routed before the request's cap was recorded apart keeps its recorded cap,
        # which may be the request's.
        known = "requested_max_credits" in routing
        requested = routing.get("requested_max_credits") if known else routing.get("max_credits")
        caps = [cap for cap in (requested, decision.extra.get("max_credits"))
                if isinstance(cap, int | float) and not isinstance(cap, bool)]
        return {**decision.as_dict(), "max_credits": min(caps) if caps else None,
                **({"requested_max_credits": requested} if known else {}), "rule_before": rule,
                "budget_used": None if used is None else round(used, 4)}

    def _share_without_own_hold(self, s: Session, project: Project, job: Job) -> float | None:
        """The budget's share used, the job's own open hold left out: the share its submit judged
        its rule on (taken after the choice), and the one a move off its engine leaves."""
        if project.budget_limit is None:
            return None
        balance = self.ledger.balance(s, project)
        own = self.ledger.open_hold(s, job.id)
        return replace(balance, held=balance.held - (own.amount if own is not None else 0)).used_fraction

    @staticmethod
    def _rule_skip(routing: dict[str, Any], refused: OrchestratorError) -> dict[str, Any]:
        return {"engine": None, "reason": "budget_rule", "rule_before": routing.get("rule"),
                "rule": refused.details.get("rule"), "message": refused.message}

    async def _fallback_target(self, job: Job, name: str, request: RenderRequest,
                               routing: dict[str, Any] | None = None) -> tuple[int, str | None, bool] | None:
        """Whether the job may move to candidate `name`: its estimate, its model (None when unknown
        here) and whether this process runs it; None when it may not. An engine this process lacks
        (not installed here, its key or server's URL given to other hosts only) is taken when another
        live worker runs it, priced here when this process knows its prices, else as it was routed:
        left out, a retryable failure ended the job though another worker could have made it."""
        engine = self.registry.get(name) if name in self.registry else None
        here = engine is not None and not left_off(engine)
        # A plugin's availability and price may ask its server: in a thread, as on the submit path
        # (on the event loop, one that took 8 s held every request of the service as long).
        if engine is not None and here and not (await asyncio.to_thread(engine.availability))[0]:
            return None
        if not here and not await asyncio.to_thread(self.served_elsewhere, name):
            return None
        if engine is None:
            routed = next((c.get("estimate") for c in (routing or job.routing or {}).get("candidates", [])
                           if c.get("engine") == name), None)
            if not isinstance(routed, int | float) or isinstance(routed, bool) or routed < 0:
                return None
            return to_millicredits(routed), None, False
        return await asyncio.to_thread(_priced_here, engine, request, here)

    async def _move_off_open_circuit(self, claim: Claim) -> None:
        """A queued job claimed to leave an engine whose circuit is open (see `Scheduler._circuit`):
        moved, unsent, to the next candidate of its routing that takes it, as a fallback; or, when
        none does after all (its price over the job's cap, the budget, another job's probe), back in
        the queue as it was, to wait for the verdict (`claim.waiting`). Never failed for it.
        Off an engine no process has (`claim.unserved`), one that no candidate may take for money
        or privacy fails, as it would have without candidates."""
        job = claim.job
        if claim.unserved:
            error = EngineUnavailable(f"engine '{job.engine}' is not installed, or not set up (its key, its server), "
                                      "in any process that runs jobs; the job was not sent to it",
                                      details={"engine": job.engine, "started": False}, charged="no")
        else:
            error = EngineUnavailable(f"engine '{job.engine}' is failing its jobs (its circuit is open); "
                                      "the job was not sent to it",
                                      details={"engine": job.engine, "circuit": "open", "started": False},
                                      charged="no")
        try:
            if await self._fall_back(claim, error):
                return
            skips = error.details.get("fallbacks_skipped") or []
            if claim.unserved and skips and all(skip["reason"] != "circuit_open" for skip in skips):
                # Its candidates were passed over for money or privacy: it can run nowhere. (One
                # whose circuit is open may take it later.)
                await self._end(claim, "failed", error)
                return
            await asyncio.to_thread(self._requeue_waiting, claim)
            if claim.unserved:  # another job took a candidate's probe meanwhile: the next sweep looks again
                return
        except StaleAttempt:
            return
        except Canceled as asked:  # canceled meanwhile: nothing was sent
            await self._end(claim, "canceled", asked)
            return
        claim.waiting = True
        self.bus.publish(job.id, "state", {"state": "waiting", "engine": job.engine, "reason": "circuit open"})

    def _requeue_waiting(self, claim: Claim) -> None:
        # Nothing happened to it: no attempt is recorded, its hold stays, and the claim is undone,
        # but for its number: a stream another process follows from the row may have told the
        # claim as a start, and then tells the job queued again and its next claim as a new start
        # (given back its number, that claim read as the one already told, and the stream said
        # the job ran for the whole cooldown while it waited).
        # A database that is briefly away is waited out: left to recovery, a job nothing was sent
        # for counted as a crash, and one on an engine that does not announce its sends was failed
        # and charged its estimate.
        # A COMMIT whose answer was lost is read back: taken for superseded, the job was left
        # unmarked as waiting, and this process could claim it again before the circuit's verdict.
        def undo(s: Session) -> None:
            self._guarded_update(s, claim, status="queued", **NO_LEASE,
                                 started_at=claim.started_before, unless_canceled=True)

        self._end_write(claim, f"job {claim.job.id} queued again to wait", undo,
                        lambda row: row.status == "queued" and (row.attempts or []) == (claim.job.attempts or []))

    def give_back(self, claim: Claim) -> None:
        """A claim that never started (the service stopped first): back to the queue with its
        hold, or canceled with its hold released when a cancel was asked meanwhile."""
        try:
            self._requeue_unsent(claim, started=False)
        except StaleAttempt:
            return
        except Canceled as asked:
            try:
                self._finish(claim, "canceled", asked, unstarted=True)
            except StaleAttempt:
                return
            self.bus.publish(claim.job.id, "canceled", {"job_id": claim.job.id, "status": "canceled",
                                                        "error": asked.to_dict()})

    def _requeue_unsent(self, claim: Claim, *, started: bool = True) -> None:
        # This attempt's engine says it sent nothing billable: its own saved work (if any) is
        # dropped, so the next run sends afresh. What earlier attempts got a provider to accept
        # stays, or the next run would send the job again instead of following that billed work.
        # The attempt is recorded, as a crash's is (a job on attempt 2 listed one try), marked as a
        # stop: stops are no crash loop, and never make the job given up.
        job = claim.job
        stopped = Interrupted(f"the service stopped {'while this job ran' if started else 'before this job started'}; "
                              "it was queued again", details={"engine": job.engine, "graceful": True,
                                                              "started": started})
        # A free server's task this attempt started (see the stop above) goes with the job.
        kept = _accepted_values(claim.accepted) if claim.accepted else {"provider_work": job.provider_work}
        held = self._device_held(claim) if started else {}
        # A database restart or failover is waited out for a while: a stop left to recovery would
        # be counted as a crash.
        for attempt in self.db.retrying(STOP_WRITE_SECONDS, f"job {job.id} queued again"):
            with attempt, self.db.transaction() as s:
                # Unstarted, no engine started it: `started_at` says so again (an earlier attempt's stays).
                self._guarded_update(s, claim, status="queued", **NO_LEASE,
                                     progress_step=0, progress_total=0, **kept, **held,
                                     attempts=job.with_attempt("interrupted", stopped.to_dict()),
                                     **({} if started else {"started_at": claim.started_before}),
                                     unless_canceled=True)

    def _requeue_to_follow(self, claim: Claim, work: dict[str, Any]) -> None:
        job = claim.job
        stopped = Interrupted("the service stopped while the provider worked on this job; its work is followed "
                              "again", details={"engine": job.engine, "graceful": True})
        for attempt in self.db.retrying(STOP_WRITE_SECONDS, f"job {job.id} queued again to be followed"):
            with attempt, self.db.transaction() as s:
                self._guarded_update(s, claim, status="queued", **NO_LEASE,
                                     progress_step=0, progress_total=0, **_accepted_values(work),
                                     attempts=job.with_attempt("interrupted", stopped.to_dict()),
                                     unless_canceled=True)

    def _requeue_on(self, claim: Claim, error: EngineError, engine: str, model: str | None, estimate: int, *,
                    routing: dict[str, Any] | None = None) -> None:
        """`routing`: the decision the move follows where it is not the recorded one (`_routing_now`),
        recorded with it."""
        job = claim.job
        followed = routing or job.routing or {}

        # An engine only another worker has: the router that listed it for a private request judged
        # it local; otherwise it may leave the machine, for all this process knows.
        leaves = (leaves_machine(self.registry.get(engine)) if engine in self.registry
                  else not followed.get("private"))
        # What its images may take on the engine it moves to (a provider that picks a larger size):
        # held back from its project's storage quota from now on. A job taken before migration 0030
        # still holds nothing: its project's quota was never judged with it.
        bound = None if job.reserved_bytes is None else quota.job_bound(
            self.registry.get(engine) if engine in self.registry else None, render_request(job.params), job.params)
        local = engine in self.registry and self.registry.get(engine).kind == "local"
        held = self._device_held(claim)  # what a local attempt held, counted once the job ends wherever it runs

        def move(s: Session) -> None:
            # Read in the move's own transaction: made private while it ran, it goes nowhere off the machine.
            if leaves and self._made_private(s, job):
                raise MadePrivate(job.id)
            self.ledger.settle_failure(s, job, error)
            self._guarded_update(s, claim, unless_canceled=True, status="queued", engine=engine, model=model,
                                 estimated=estimate, reserved_bytes=bound,
                                 **({} if routing is None else
                                    {"routing": routing, **self._kept_local(s, job, routing)}),
                                 # Keyed again by the model that renders it when it succeeds (unknown here
                                 # for another worker's engine): only a success is looked up.
                                 cache_key=cache_key(engine, model or "", job.params) if job.cache_key else None,
                                 provider_work=None, **held,
                                 **NO_LEASE, progress_step=0, progress_total=0,
                                 attempts=job.with_attempt("failed", error.to_dict()))
            project = self.ledger.lock_project(s, job.project_id)
            self._refuse_if_rule_changed(s, project, job, followed)
            # This one's new bound is already in its row, which the unfinished jobs' sum reads.
            self._refuse_if_grown(s, project, job, bound, counted=True)
            # Judged at admission, and again where a fallback puts the job on the device: a job moved
            # to a local engine once its project's seconds are spent was run there all the same.
            if local:
                device = device_time.state(s, project, self.default_local_seconds,
                                           local=device_time.local_engines(self.registry), lease=self.lease,
                                           told=device_time.telling_engines(self.registry))
                if device is not None and device.exhausted:
                    raise device.error()
            moved = s.get(Job, job.id)
            assert moved is not None
            # An engine only another worker has may be a cloud one priced 0: its hold of 0 is what
            # flags an outcome nobody knows for the invoice (taken for a free engine too, it only
            # adds such a flag of 0 credits).
            billable = billed_by_provider(self.registry.get(engine)) if engine in self.registry else True
            self.ledger.hold(s, project, moved, estimate, billable=billable)

        # A move left to recovery is failed, its hold captured.
        self._end_write(claim, f"job {job.id} moved to {engine}", move,
                        lambda row: row.status == "queued" and row.engine == engine
                        and _last_attempt(row, claim, "failed", error))

    def _refuse_if_rule_changed(self, s: Session, project: Project, job: Job, followed: dict[str, Any]) -> None:
        """`RuleChanged` where the rule of `followed` no longer applies. Judged on the budget's share
        under the project's lock, as a submit judges it again: a hold taken since the fallback looked
        may have moved the project past a rule's share."""
        if self.router is None or not isinstance(followed.get("policy"), str):
            return
        used = None if project.budget_limit is None else self.ledger.balance(s, project).used_fraction
        routed = followed.get("rule")
        now = self.router.rule_for(followed["policy"], render_request(job.params), used,
                                   followed.get("policy_hash"), routed if isinstance(routed, str) else None)
        if now is not None and now != routed:
            raise RuleChanged(now)

    def _refuse_if_grown(self, s: Session, project: Project, job: Job, bound: int | None, *, counted: bool) -> None:
        """`StorageQuotaExceeded` where the job, moved or copied, may store more (`bound`) than it held
        and that passes its project's quota; under the project's lock, as a submit judges.
        `counted`: the job's row, unfinished, already holds `bound` in the unfinished jobs' sum.
        Only what it adds is judged, as a submit's bound is: one whose images take no more than the
        job held keeps its room (a quota lowered since its submit does not fail it, as it lets the
        job finish where it is). A job taken before migration 0030 holds nothing: never judged."""
        if bound is None or job.reserved_bytes is None or bound <= job.reserved_bytes:
            return
        others = quota.held(s, project, self.default_quota_mb) - (bound if counted else 0)
        quota.refuse_if_over(project, self.default_quota_mb, others, bound)

    @staticmethod
    def _kept_local(s: Session, job: Job, routing: dict[str, Any]) -> dict[str, Any]:
        """The params a move under another rule (`_routing_now`) that keeps the request local
        records, as a submit under it records them (`JobService.job_params`): marked private, so
        its images' promotions and polishes stay on this machine too. Read from the row: the
        claim's copy lacks a mark written since."""
        if not routing.get("private"):
            return {}
        params = s.scalar(select(Job.params).where(col(Job.id) == job.id))
        params = params if isinstance(params, dict) else job.params
        tags = params.get("tags") or {}
        if tags.get(PRIVACY_TAG) == PRIVACY_LOCAL:
            return {}
        return {"params": {**params, "tags": {**tags, PRIVACY_TAG: PRIVACY_LOCAL}}}

    def _copy_on(self, claim: Claim, error: EngineError, engine: str, model: str, estimate: int, *,
                 routing: dict[str, Any] | None = None) -> list[str] | None:
        """End the job as a copy of an earlier identical job's images on `engine` (see
        `orchestrator.cache`): its hold settled as its failure says, nothing held anew. The
        copies' asset ids, or None when there is nothing to copy (the job is left as it was).
        `routing`: as `_requeue_on`'s. Refused, nothing written, as a move there would be for the
        rule (`RuleChanged`) and for the project's storage quota: the copies' rows count in its
        usage (each asset its PNG's bytes, though identical ones share one file)."""
        job = claim.job
        followed = routing or job.routing or {}
        key = cache_key(engine, model, job.params)
        if key is None:
            return None
        copying = False
        leaves = leaves_machine(self.registry.get(engine))
        held = self._device_held(claim)

        def copy(s: Session) -> None:
            nonlocal copying
            copying = False
            found = cache.find(s, self.store, key, job.project_id, job.source_asset_id)
            # Made private since it was routed: it takes no image of an engine off the machine, as
            # it would not move there (the move refuses it next, and the job goes on to the next).
            if not found or (leaves and self._made_private(s, job)):
                return
            copying = True
            self.ledger.settle_failure(s, job, error)
            # Under another rule that keeps the request local, marked private as a move would be.
            params: dict[str, Any] = {} if routing is None else self._kept_local(s, job, routing)
            # A seed drawn for it made nothing: the copy's is the one that did, as at a submit. Into
            # the params as the row has them now: the claim's copy lacks a privacy mark written since.
            if job.params.get("seed_drawn"):
                now_params = params.get("params") or s.scalar(select(Job.params).where(col(Job.id) == job.id))
                params["params"] = {**(now_params if isinstance(now_params, dict) else job.params),
                                    "seed": found[0].seed}
            # An attempt of its own, as a move's next claim would be: a stream following the row from
            # another process tells it started again, on the engine whose images it has (told by the
            # engine alone, nothing it compares changed, and the image read as the first engine's).
            now = utcnow()
            self._guarded_update(s, claim, unless_canceled=True, status="succeeded", engine=engine, model=model,
                                 estimated=estimate, cache_key=key, cache_hit=True, **params,
                                 **({} if routing is None else {"routing": routing}),
                                 attempt=claim.attempt + 1, started_at=now, finished_at=now, **held,
                                 provider_work=None, **NO_LEASE,
                                 progress_step=1, progress_total=1, attempts=attempts)
            project = self.ledger.lock_project(s, job.project_id)
            self._refuse_if_rule_changed(s, project, job, followed)
            # Its row ended: it is out of the unfinished jobs' sum, and its copies' bytes are what it adds.
            self._refuse_if_grown(s, project, job, sum(asset.bytes or 0 for asset in found), counted=False)
            quota.add_assets(s, cached_copies(found, job))
            webhooks.job_ended(s, claim.job.id, claim.job.project_id, "succeeded")

        # The failed attempt, and the copy's, as a render's success adds its own.
        attempts = [*job.with_attempt("failed", error.to_dict()),
                    {"engine": engine, "status": "succeeded", "error": None}]
        self._end_write(claim, f"job {job.id} copied from an identical job on {engine}", copy,
                        lambda row: row.status == "succeeded" and row.engine == engine and row.attempts == attempts,
                        attempt=claim.attempt + 1)
        if not copying:
            return None
        with self.db.session() as s:  # the rows that landed (a retried write made its own ids)
            return list(s.exec(select(Asset.id).where(col(Asset.job_id) == job.id).order_by(col(Asset.index))).all())

    def _source_image(self, job: Job) -> Image.Image:
        """The draft a bridge or polish starts from. Nothing was sent yet: a file that cannot be
        read (damaged on disk, unreadable) fails the job with nothing charged, and no other
        engine would do better with it."""
        sha256 = job.params["source_sha256"]
        try:
            image = Image.open(io.BytesIO(self.store.get(sha256)))
            image.load()
        except (ContentUnavailable, OSError, ValueError, Image.DecompressionBombError) as exc:
            if isinstance(exc, ContentUnavailable):  # gone from the store while the job waited, or damaged
                why = {"missing": "its file is gone from the store",
                       "unreadable": "its file cannot be read from the store",
                       "malformed": "its row holds a malformed sha256, which names no file"}.get(
                    exc.details.get("reason", ""),
                    "its file is damaged in the store (its bytes do not match its sha256)")
            elif isinstance(exc, UnidentifiedImageError):  # its text names the BytesIO object, not the file
                why = "it is not an image Pillow knows"
            else:
                why = f"{type(exc).__name__}: {exc}"
            # Told as what it is: the store's, not the engine's `engine_error`.
            raise SourceUnavailable(f"the source image {sha256[:12]} could not be read: {why}"[:500],
                                    details={"source_sha256": sha256}, charged="no") from exc
        return image

    async def _render(self, claim: Claim) -> RenderResult:
        job = claim.job
        engine = self.registry.get(job.engine)
        if engine.kind == "local":
            # Before its source image is read and its model loaded: minutes of the device spent on
            # images that could not be stored, then failed `storage_full` all the same.
            await self._refuse_local_if_no_room(claim)
        # Asked once: a plug-in's answer could change between two asks (sending the job afresh).
        follow: Reattachable | None = engine if reattachable(engine, job) else None
        init_image = None
        if job.params.get("source_sha256"):
            try:
                init_image = await asyncio.to_thread(self._source_image, job)
            except EngineError:
                if follow is None:
                    raise
                # Following accepted work sends nothing: failed here, the provider's work went on
                # rendering (and billing), neither followed nor withdrawn, its estimate captured.
                log.warning("job %s: its source image cannot be read; following the work %s accepted without it",
                            job.id, job.engine)
        request = render_request(job.params, init_image)
        progress = JobProgress(self, claim)
        work = job.provider_work or {}
        # The engine's first request that can bill is recorded before it goes (see recovery).
        with before_billable_sends(self._first_send_recorder(claim, progress), self._send_refused(claim),
                                   lambda: bool(claim.out or claim.accepted),
                                   held=lambda: self._work_still_ours(claim)):
            if follow is not None:
                # An earlier process died after the provider accepted this job: follow that work.
                self.bus.publish(job.id, "state", {"state": "reattached", "handles": len(work["handles"])})
                claim.inherited = True
                try:
                    result = await follow.reattach(request, list(work["handles"]), progress, claim.cancel)
                except EngineError as exc:
                    # Accepted work: never released, never sent again, unless the provider said it
                    # billed nothing (a request's own "no", such as a poll that timed out, is not that).
                    if not exc.work_unbilled:
                        exc.at_least_charged("unknown")
                    raise
            elif work.get("handles") and work.get("engine") == job.engine and restartable(engine, job):
                # A free server's job run again after a crash: what the dead attempt made there is
                # kept (a server that keeps finished work), or else taken off the server first.
                if isinstance(engine, Resumable):
                    await self._kept_local_check(job)  # a resume may send the rest again
                    self.bus.publish(job.id, "state", {"state": "resumed", "earlier": len(work["handles"])})
                    claim.inherited = True
                    result = await engine.resume(request, list(work["handles"]), progress, claim.cancel)
                else:
                    self.bus.publish(job.id, "state", {"state": "restarted", "forgotten": len(work["handles"])})
                    try:
                        await engine.forget(list(work["handles"]))
                    except Exception:  # best effort: at worst the server renders the old one for nobody
                        log.warning("job %s: taking the dead attempt's work off %s failed", job.id, job.engine,
                                    exc_info=True)
                    await self._kept_local_check(job)
                    result = await engine.run(request, progress, claim.cancel)
            elif work.get("handles") and work.get("engine") == job.engine:
                # Recovery re-queues only work that can be followed; should any other reach here, the
                # provider has it already and it must not be sent a second time.
                # Not the engine's failure: its health (circuit breaker) is left alone.
                raise EngineError(f"engine '{job.engine}' had accepted this job before an interruption and its "
                                  "work cannot be followed; it is not sent again", retryable=False, charged="unknown")
            else:
                await self._kept_local_check(job)
                await self._still_available(job, engine)
                if not getattr(engine, "announces_sends", False):
                    await self._refuse_if_no_room(claim)  # else asked at its first send, as it records it
                result = await engine.run(request, progress, claim.cancel)
        if len(result.images) < request.n:
            # A remote engine answered, so what it made may be billed: no release, no fallback. What
            # it said it charged for them is the bill (it was the estimate for n, "outcome unknown").
            reported = result.cost_millicredits if engine.kind == "remote" else None
            short = EngineError(f"engine '{job.engine}' returned {len(result.images)} of {request.n} images",
                                charged="no" if engine.kind != "remote" else "unknown" if reported is None else "yes",
                                cost_millicredits=reported)
            if engine.kind == "remote":  # made, and maybe billed: kept (`_kept_images`)
                short.made = result
            raise short
        if len(result.images) > request.n:
            # The job asked for n (and a client counts on n assets); the built-ins return n.
            log.warning("job %s: engine %s returned %d images for n=%d; the first %d are kept",
                        job.id, job.engine, len(result.images), request.n, request.n)
            result.images = result.images[:request.n]
        return self._storable(job, result)

    @staticmethod
    def _storable(job: Job, result: RenderResult) -> RenderResult:
        """`result` as the job and its assets can store it (a plugin's seed, model or request id
        that failed the final write, after the images were made and maybe billed)."""
        for rendered in result.images:
            if rendered.seed is not None and provider_seed(rendered.seed) is None:
                # A plugin's 2**64 failed the asset's 64-bit column, after the images were made (and paid for).
                log.warning("job %s: engine %s reported seed %r, not one a job could ask for; none is stored",
                            job.id, job.engine, rendered.seed)
                rendered.seed = None
        if not isinstance(result.model, str):  # a plugin's bug: its images are kept all the same
            log.warning("job %s: engine %s named no model (%r); 'unknown' is stored", job.id, job.engine,
                        result.model)
            result.model = UNKNOWN_MODEL
        elif len(result.model) > MAX_MODEL_CHARS:
            # What the job and its assets can store: made and maybe billed, the images are kept.
            log.warning("job %s: engine %s named a model of %d characters; its first %d are stored",
                        job.id, job.engine, len(result.model), MAX_MODEL_CHARS)
            result.model = result.model[:MAX_MODEL_CHARS]
        # A NUL (PostgreSQL refuses it) or a lone surrogate (not UTF-8) failed the final write, made and billed.
        result.model = storable(result.model)
        if isinstance(result.provider_request_id, str):
            result.provider_request_id = storable(result.provider_request_id)
        return result

    def _first_send_recorder(self, claim: Claim, progress: JobProgress) -> Callable[[], Awaitable[None]]:
        """The hook an engine's requests that can bill await (`tiers.base.billable_send`): what a
        provider accepted so far is saved first (a self-hosted server's task id, saved before its
        render is sent, is how a restart takes it off the server); the first one records that this
        attempt is sending, if the claim marked it unsent, and checks that the attempt still holds
        the job and no cancel was asked; otherwise nothing may be sent. One recording per attempt:
        concurrent requests share it, and later ones only see its outcome."""
        recorded: asyncio.Future[None] | None = None
        recorded_at = 0  # `claim.unmarked` when `recorded` was made

        async def record() -> None:
            nonlocal recorded, recorded_at
            # Before the checks below, which the await would otherwise split from the send they allow.
            await self._refuse_if_no_room(claim)
            # Both on the event loop, before any await: the runner's end of the attempt and this
            # ask to send are ordered, and whichever comes first decides what the other sees.
            # An earlier request of this attempt is out, or a provider accepted one (and may bill
            # it): a cancel now is not free (a "no" for this request alone released a job whose
            # first call was out, or queued it again on a stop, and the provider got that call
            # twice). One answered that nothing was made (a 429 being waited out) leaves it free.
            def free() -> Charged:  # asked when the cancel comes: another request may go out meanwhile
                return "unknown" if claim.accepted or claim.out else "no"

            if claim.ended:
                raise Canceled("the job ended before this request was sent", charged=free())
            if claim.stopping and not (claim.out or claim.accepted):
                claim.shutdown = True  # left for the restart, queued again: nothing of it is out
                claim.cancel.cancel(abandon=True)
                claim.cancel.raise_if_cancelled(charged="no")
            claim.sending = True
            # Bounded, and a cancel ends it (nothing of this request is out yet): a database that
            # stays away must not hold the send, or a cancel, for the save's two minutes of retries.
            try:
                with contextlib.suppress(TimeoutError):
                    await claim.cancel.race(asyncio.wait_for(progress.saved(), SAVE_WAIT_SECONDS), charged="no")
            except Canceled as exc:
                exc.at_least_charged(free())
                raise
            claim.cancel.raise_if_cancelled(charged=free())  # the engine's own check after this would say "no"
            if claim.job.unsent_attempt != claim.attempt and not await self.still_held(claim):
                # A later request (the first one's record checks this itself): an attempt another
                # process took over must not pay a provider for what nobody keeps.
                raise StaleAttempt(claim.job.id)
            claim.cancel.raise_if_cancelled(charged=free())  # asked (a stop's abandon) during that read
            # The mark "sent nothing", written back as the last request out was refused, lands
            # before this one is recorded as sending: landing after, it would tell recovery that an
            # attempt with a request out had sent nothing, and the job would be sent again.
            while claim.unmarking is not None and not claim.unmarking.done():
                await asyncio.shield(claim.unmarking)
            claim.cancel.raise_if_cancelled(charged=free())
            claim.out += 1
            if claim.job.unsent_attempt != claim.attempt:
                return  # an engine that does not announce its requests: recovery assumes it sent
            if recorded is None or recorded_at != claim.unmarked:
                recorded_at = claim.unmarked
                recorded = asyncio.ensure_future(asyncio.to_thread(self._record_sending, claim))
            # Shielded: the request that asked first may be canceled while the others still wait.
            await asyncio.shield(recorded)

        return record

    async def _refuse_if_no_room(self, claim: Claim) -> None:
        """Before a remote job's first request: `NoRoomForImages` while the data dir's disk is below
        its reserve. Failed, not waited out, as a send that cannot be recorded is: nothing was sent,
        so its hold is released and nothing charged, and the worker is free for the jobs that can
        run, where a wait held it and the hold for as long as the operator takes. A self-hosted
        server's job (ComfyUI, AUTOMATIC1111) bills nobody but would hold the studio's GPU for
        images that could not be stored, as a local one would (asked before it renders,
        `_refuse_local_if_no_room`). Not asked once a request is out or accepted (failed then, the
        job would still be charged for what it sent)."""
        if (self.reserve is None or self.reserve.off or claim.out or claim.accepted or claim.inherited
                or self.registry.get(claim.job.engine).kind != "remote"):
            return
        free = await asyncio.to_thread(self.reserve.shortfall)
        if free is not None:
            raise await self._no_room(claim, self.reserve, free, "not sent")

    async def _refuse_local_if_no_room(self, claim: Claim) -> None:
        """Before a local job renders: `NoRoomForImages` while the data dir's disk is below its
        reserve, as a remote job's first request is refused. Read on a thread, as the others are: a
        `statvfs` of a data dir on NFS waits for its server (on a hard mount, for as long as it is
        away), and on the event loop the API and every job waited with it; with the reserve off,
        nothing is read."""
        reserve = self.reserve
        if reserve is None or reserve.off or (free := await asyncio.to_thread(reserve.shortfall)) is None:
            return
        raise await self._no_room(claim, reserve, free, "not rendered")

    async def _no_room(self, claim: Claim, reserve: DiskReserve, free: int, done: str) -> NoRoomForImages:
        """The job's `NoRoomForImages`: nothing of this attempt is charged, its hold released. What
        an earlier attempt was charged stays (a move off an engine whose provider had accepted
        the work captured its estimate, outcome unknown), and the message says so: "nothing was
        charged" read as the job's whole cost. Only a job with earlier attempts can have a charge,
        and only then is the ledger read (a disk below its reserve is the rare path)."""
        charged = "nothing was charged"
        if claim.job.attempts:
            try:
                earlier = await asyncio.to_thread(self._charged_so_far, claim.job.id)
            except SQLAlchemyError:
                log.warning("job %s: reading what it was charged before failed", claim.job.id, exc_info=True)
                charged = "nothing was charged for this attempt"
            else:
                if earlier:
                    charged = (f"nothing more was charged (the {to_credits(earlier)} credits its earlier attempts "
                               "were charged stay charged)")
        return NoRoomForImages(f"{done}: {reserve.said(free)}; {charged}, and its operator must make room before it "
                               "is submitted again", details=reserve.details(free), charged="no")

    def _charged_so_far(self, job_id: str) -> int:
        with self.db.session() as s:
            return self.ledger.job_totals(s, [job_id]).get(job_id, (0, 0))[1]

    async def still_held(self, claim: Claim, *, read: bool = False) -> bool:
        """Whether this attempt still holds its job. Known without a read (unless `read`) while
        the lease from its last renewal runs, with half of it to spare; else read. When another
        process has taken the job over, or it was ended through another, the attempt's token
        is cancelled as the heartbeat would, had it run (`let_go`)."""
        if not read and claim.lease and claim.since_renewed() < claim.lease / 2:
            return True
        try:
            row = await asyncio.to_thread(self._held_row, claim)
        except SQLAlchemyError:
            log.warning("job %s: could not read whether attempt %d still holds it; taken as held",
                        claim.job.id, claim.attempt, exc_info=True)
            return True  # as the heartbeat does: a database that hiccups takes no job away
        if row is not None and row.attempt == claim.attempt and row.status == "running":
            return True
        self.let_go(claim, row)
        return False

    @staticmethod
    def let_go(claim: Claim, row: Job | None, taken: str = "taken over") -> None:
        """Stops an attempt whose job is no longer its own, `row` as read since (None: deleted).
        Its provider work is abandoned (left running) only for a job queued again or held by
        another attempt, which follows that work on. A job that has ended (failed or canceled by
        another process's recovery while its worker was stopped past its lease) is followed by
        nobody: its work is withdrawn, or it renders, and bills, for nobody."""
        if claim.cancel.cancelled:
            return  # already stopping: a cancel through this process
        if row is not None and row.attempt == claim.attempt and _finished_by_its_worker(row):
            return  # ended by this very attempt since the caller looked
        if row is None:
            what = "deleted"
        elif row.status == "canceled":
            what = "canceled"
        elif row.status in TERMINAL:  # recovery failed it while this worker was stopped past its lease
            what = f"ended ({row.status}) by another process"
        else:
            what = taken
        log.warning("job %s was %s while this worker held it; stopping this worker's attempt %d",
                    claim.job.id, what, claim.attempt)
        claim.cancel.cancel(abandon=row is not None and row.status not in TERMINAL)

    async def _work_still_ours(self, claim: Claim) -> bool:
        """`still_holds_the_job()` for the engine: False when another attempt follows the job's
        provider work on (which a withdrawal would cancel under it), True when the work is this
        attempt's to end, a job ended through another process included. Always read: it is
        asked before a withdrawal, which is rare, and a paused VM's clocks may not tell."""
        await self.still_held(claim, read=True)
        return not claim.cancel.abandoned

    def _held_row(self, claim: Claim) -> Job | None:
        with self.db.session() as s:
            return s.get(Job, claim.job.id)

    def _send_refused(self, claim: Claim) -> Callable[[], None]:
        """The hook of `billable_send_refused()`. When no request of the attempt is out any more and
        no provider accepted any, the attempt is marked in the database as having sent nothing
        again: a crash while a 429 or a 503 is waited out (up to half the remote deadline) then
        runs the job again with its hold, instead of failing it and charging its estimate for a
        provider that made nothing."""

        def refused() -> None:
            claim.out = max(0, claim.out - 1)
            if (claim.out == 0 and claim.recorded_send and claim.accepted is None and not claim.ended
                    and not claim.cancel.cancelled and not claim.job.has_provider_work()):
                claim.recorded_send = False
                claim.unmarking = asyncio.ensure_future(asyncio.to_thread(self._record_unsent, claim))

        return refused

    def _record_unsent(self, claim: Claim) -> None:
        """Marks the attempt as having sent nothing again (see `_send_refused`). Best effort: a row
        left marked as sending is the careful side (recovery charges it for reconciliation)."""
        try:
            with self.db.transaction() as s:
                self._guarded_update(s, claim, unless_canceled=True, unsent_attempt=claim.attempt)
        except (SQLAlchemyError, Canceled, StaleAttempt) as exc:
            # A cancel, a new holder or the job's end (which may come first: the mark is written in a
            # thread) is told elsewhere; said at INFO, it read as a problem after the job's last line.
            log.log(logging.INFO if isinstance(exc, SQLAlchemyError) else logging.DEBUG,
                    "job %s: could not mark attempt %d as having sent nothing again (%s)",
                    claim.job.id, claim.attempt, type(exc).__name__)
            return
        claim.job.unsent_attempt = claim.attempt
        claim.unmarked += 1

    def _record_sending(self, claim: Claim) -> None:
        try:
            # A lost connection (a failover, one killed by the server) is tried again for a while:
            # once, it failed the job for good, with nothing sent. The write is safe to repeat.
            for attempt in self.db.retrying(RECORD_SENDING_SECONDS, f"job {claim.job.id}'s first paid request"):
                with attempt, self.db.transaction() as s:
                    # In the transaction that marks the attempt as sending: a switch of its project to
                    # `local-only` committed first stops it here; one committed after finds it sending.
                    self._refuse_if_kept_local(s, claim.job)
                    self._guarded_update(s, claim, unless_canceled=True, unsent_attempt=None)
            claim.job.unsent_attempt = None
            claim.recorded_send = True
        except SQLAlchemyError as exc:
            log.exception("job %s: recording its first paid request failed", claim.job.id)
            raise EngineError(f"the job's database could not record the request before it was sent "
                              f"({type(exc).__name__}); nothing was sent", retryable=False, charged="no") from exc

    async def _kept_local_check(self, job: Job) -> None:
        """Before an engine that leaves the machine starts a job: refused when the job was made
        private since it was routed, as one queued again after a stop or a crash, or claimed as
        its project moved to `local-only`, would be. An engine that announces its sends is asked
        at its first one instead (`_record_sending`), in the transaction that records it: a switch
        committed while it prepares its request stops it too."""
        engine = self.registry.get(job.engine)
        if not leaves_machine(engine) or getattr(engine, "announces_sends", False):
            return  # a draft's local run reads nothing more, nor takes a thread's hop
        await asyncio.to_thread(self._read_kept_local, job)

    async def _still_available(self, job: Job, engine: Engine) -> None:
        """Before a remote engine is sent a job: refused, unsent, when the engine became unavailable
        since the job was routed (its key refused since, its model past its shut-down date, a
        plugin's server gone). The job then moves to its next candidate as a fallback, or fails
        `engine_unavailable` with the reason `/v1/engines` gives; sent anyway, it failed there, or
        was answered by a model retired since. A local engine says so when it loads: a draft's
        path takes no thread's hop for it."""
        if engine.kind != "remote":
            return
        try:
            available, why = await asyncio.to_thread(engine.availability)
        except Exception:  # a plugin's look that breaks tells nothing of the engine: routed to it, it is sent
            log.warning("job %s: whether engine %s is available is unknown; it is sent", job.id, job.engine,
                        exc_info=True)
            return
        if available:
            return
        error = EngineUnavailable(f"engine '{job.engine}' became unavailable after the job was routed to it "
                                  f"({why or 'no reason given'}); the job was not sent to it"[:500],
                                  details={"engine": job.engine, "started": False}, retryable=True, charged="no")
        error.engine_fault = False  # the set-up's, told in /v1/engines: not failures its circuit counts
        raise error

    def _read_kept_local(self, job: Job) -> None:
        try:
            with self.db.session() as s:
                self._refuse_if_kept_local(s, job)
        except SQLAlchemyError as exc:  # as `_record_sending`: not the engine's crash, and nothing went
            log.exception("job %s: reading its privacy before its first request failed", job.id)
            raise EngineError(f"the job's database could not be read before its request was sent "
                              f"({type(exc).__name__}); nothing was sent", retryable=False, charged="no") from exc

    def _refuse_if_kept_local(self, s: Session, job: Job) -> None:
        if leaves_machine(self.registry.get(job.engine)) and self._made_private(s, job):
            raise Canceled(f"canceled before it was sent: its project's policy now keeps its work on this machine, "
                           f"and engine '{job.engine}' sends it off", details={"engine": job.engine}, charged="no")

    def _made_private(self, s: Session, job: Job) -> bool:
        """Whether the job is private now: its row marked so since it was routed (its project
        moved to `local-only`, `JobService.keep_local`), or its project's policy keeping everything
        on this machine. The policy is read as well as the mark: the mark is written after the
        move commits (in a transaction of its own, that a crash or a busy database may never
        make), and after a reload that made a policy local (one that may fail the same way)."""
        row = s.execute(select(Job.params, Project).join(Project, col(Project.id) == col(Job.project_id))
                        .where(col(Job.id) == job.id)).first()
        params, project = (row[0], row[1]) if row is not None else (job.params, None)
        params = params if isinstance(params, dict) else job.params
        if is_private(params.get("tags") or {}):
            return True
        if project is None:
            return False
        policy = project.policy
        routing = job.routing or {}
        # The version it was routed by, when routed by the project's policy (not one it left since).
        routed = routing.get("policy_hash") if routing.get("policy") == policy else None
        routed = routed if isinstance(routed, str) else None
        if self.keeps_all_local(policy, routed):
            return True
        # The rule of the project's policy as it is now that the request matches: a PATCH to
        # another policy, or an edit of its file, whose rule for it is private (`private = true`)
        # marks no job (`JobService.keep_local` marks them for a policy that keeps everything
        # local), and a job routed before it followed its recorded candidates off the machine.
        if self.router is None:
            return False
        # On the share without the job's own hold: counted, a hold that took the project past a
        # private rule's `budget_used_over` canceled the job its submit routed off the machine.
        used = self._share_without_own_hold(s, project, job)
        return self.router.keeps_local(policy, render_request(params), used, routed)

    def _record(self, job: Job, result: RenderResult, seed: int | None) -> dict[str, Any]:
        """What made the image, as the engine used it: a parameter its metadata names is recorded as
        it says, and one it says is None (never sent, as the cloud models' negative prompt) is left
        out, where the job's value would claim it shaped the image (`tiers.base.RECORDED_PARAMETERS`)."""
        p, used = job.params, result.metadata
        record: dict[str, Any] = {
            "stage": job.stage, "engine": job.engine, "model": result.model, "prompt": p.get("prompt"),
            "negative_prompt": "", "seed": seed, "width": None, "height": None, "parent_id": job.source_asset_id,
            "steps": p.get("steps"), "guidance_scale": p.get("guidance_scale"), "sampler": None,
        }
        # Asked for only when the stage takes them (a bridge's strength, a polish's creativity).
        record.update({key: p[key] for key in ("strength", "quality", "scale", "creativity") if p.get(key) is not None})
        # An engine silent about it that takes no negative prompt (a plugin's) did not use one.
        if job.engine not in self.registry or self.registry.get(job.engine).capabilities.negative_prompt:
            record["negative_prompt"] = p.get("negative_prompt") or ""
        for key in RECORDED_PARAMETERS:
            if key not in used:
                continue
            # A plugin's text as it can be stored: a NUL (PostgreSQL refuses it) or a lone surrogate
            # (not UTF-8) failed the final write of images made and paid for.
            value = _storable_values(used[key])
            if key == "negative_prompt":
                record[key] = value or ""  # as the asset's column has it: none is ""
            elif value is None:
                record.pop(key, None)
            else:
                record[key] = value
        # Not the provider's request id: it is the job's (GET /v1/jobs/{id}); in the file, which
        # leaves the studio, it would tie the image to the studio's account at the provider.
        if used.get(NOTES):
            record["notes"] = _storable_values(list(used[NOTES]))
        return record

    def _succeed(self, claim: Claim, result: RenderResult, seconds: float) -> list[str]:
        """Store the images and finish the job, unless a cancel (answered 202, so it must win)
        arrives first: it is checked before encoding and again inside the final transaction.
        A stop alone does not prevent it: the images are made and paid for, and recovery could
        only fail the job and charge its estimate."""
        job = claim.job
        self._raise_if_user_canceled(claim)
        records = self._records(job, result)
        # PNG encoding (zlib) releases the GIL: n images encode and fsync in parallel.
        # A remote engine's images are billed: what will be stored is on the job's row before any
        # file is, for a recovery to adopt whatever of it a crash leaves in the store.
        keep = (functools.partial(self._keep_for_recovery, claim, result, records)
                if self.registry.get(job.engine).kind == "remote" else None)
        pngs = self._store_pngs(job, [r.image for r in result.images], records, before_puts=keep)
        try:
            return self._finish_success(claim, result, records, pngs, seconds)
        except BaseException:
            # Canceled meanwhile (its 202 wins), taken over, or never recorded: no row names what
            # this attempt wrote. Left to the sweep, a few canceled n=16 jobs were enough for it to
            # take the database for another store's, and to remove nothing more.
            self._discard(pngs)
            raise

    def _keep_for_recovery(self, claim: Claim, result: RenderResult, records: list[dict[str, Any]],
                           encoded: list[bytes]) -> None:
        """Commit what this attempt is about to store on the job's row (`orchestrator.adopt`), before
        its files and the rows naming them: a remote engine's images are billed, and a process that
        dies before its final write leaves them to recovery to adopt, not to the orphan sweep. Best
        effort: with the database away, the final write waits for it anyway, and only a crash
        meanwhile loses them."""
        job = claim.job
        key = None
        if job.cache_key and not claim.inherited:
            key = cache_key(job.engine, self.registry.get(job.engine).model, job.params)  # as `_succeed_in`
        accepted = _accepted_values(claim.accepted)["provider_request_id"] if claim.accepted else None
        stored = adopt.stored_images(
            claim.attempt, model=result.model, cost=result.cost_millicredits, cost_unread=unread_note(result),
            provider_request_id=result.provider_request_id or accepted, cache_key=key,
            images=[{"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "seed": rendered.seed,
                     "width": rendered.image.width, "height": rendered.image.height, "record": record}
                    for rendered, record, data in zip(result.images, records, encoded, strict=True)])
        try:
            with self.db.transaction() as s:
                s.execute(update(Job).where(col(Job.id) == job.id, col(Job.attempt) == claim.attempt,
                                            col(Job.status) == "running").values(stored_images=stored))
        except SQLAlchemyError as exc:
            log.warning("job %s: what it is about to store could not be recorded for a recovery (%s); its end is "
                        "recorded next", job.id, first_line(exc))

    def _records(self, job: Job, result: RenderResult, *, note: str | None = None) -> list[dict[str, Any]]:
        """Each image's record (`_record`) with its size, and `note` when one is given."""
        records = []
        reasons = result.metadata.get(FINISH_REASONS)
        reasons = reasons if isinstance(reasons, list | tuple) else []
        for i, rendered in enumerate(result.images):
            record = self._record(job, result, rendered.seed)
            record["width"], record["height"] = rendered.image.size
            # A new key, only where the provider said one: records without it read as before. Cut,
            # as a plugin's word may be any text (the shipped engines' are short already).
            if i < len(reasons) and reasons[i] is not None:
                record["finish_reason"] = _storable_values(str(reasons[i])[:FINISH_REASON_CHARS])
            notes = [_smaller_than_asked(job.params, rendered.image.size), note]
            if any(notes):
                record["notes"] = [*record.get("notes", []), *(n for n in notes if n)]
            records.append(record)
        return records

    def _store_pngs(self, job: Job, images: list[Image.Image], records: list[dict[str, Any]], *,
                    before_puts: Callable[[list[bytes]], None] | None = None) -> list[tuple[Put, bytes]]:
        """Each image encoded and stored (what its put did, its bytes), in the images' order. Encoded
        on the PNG threads (zlib releases the GIL), each one is handed to a store thread of its own
        as soon as it is ready (see `STORE_THREADS`), so the job's fsyncs are waited for together.
        Every put has returned, its file and its rename fsynced, before this does: the rows naming
        them commit next. When one fails, what the others wrote is discarded. `before_puts` gets
        every image's bytes once all are encoded, before the first put (which then waits for it)."""
        encoded: list[concurrent.futures.Future[bytes]] = []
        puts: dict[int, concurrent.futures.Future[tuple[Put, bytes]]] = {}
        refused: RuntimeError | None = None
        try:
            for image, record in zip(images, records, strict=True):
                encoded.append(self._encoder.submit(encode_png, image, record))
            index = {future: i for i, future in enumerate(encoded)}
            if before_puts is not None:
                concurrent.futures.wait(encoded)
                if all(future.exception() is None for future in encoded):  # else the failure is raised below
                    before_puts([future.result() for future in encoded])
            # One put for the same bytes twice (a plugin's images alike, seed and all): the second
            # put found the first's file and touched it, and the job's discard then took it for
            # another job's (touched since) and left it, an orphan until the hourly sweep.
            handed: dict[bytes, concurrent.futures.Future[tuple[Put, bytes]]] = {}
            for future in concurrent.futures.as_completed(encoded):
                if future.exception() is None:
                    data = future.result()
                    if data not in handed:
                        handed[data] = self._hand_to_store(data)
                    puts[index[future]] = handed[data]
        except RuntimeError as exc:
            # Closed, or a thread the system would not start ("can't start new thread"): the
            # puts handed out already still run, and are waited for and discarded below. Raised
            # at once, they landed after the job had failed, files no row names.
            if not self._closed:
                refused = exc
        every: list[concurrent.futures.Future[Any]] = [*encoded, *puts.values()]
        concurrent.futures.wait(every)
        stored = [puts[i].result() for i in sorted(puts) if puts[i].exception() is None]
        # The first image's error, whichever failed first: each image's put, or its encoding where
        # it has none. In the order the encodings ended, two failed puts (a full shard, another
        # not writable) failed the job with either, as the encodings' timing had it.
        by_image: list[concurrent.futures.Future[Any]] = [puts.get(i, f) for i, f in enumerate(encoded)]
        failed = refused or next((f.exception() for f in by_image if f.exception() is not None), None)
        if failed is not None or len(puts) < len(images):
            self._discard(stored)
            if failed is not None:
                raise failed
            # The service closed since the check above (its stop stopped waiting): as a stop that
            # came before, the job is left for the next start, not failed for good.
            raise Canceled("the service stopped before the images were stored",
                           details={"engine": job.engine}, charged="no")
        return stored

    def _discard(self, written: list[tuple[Put, bytes]]) -> None:
        def named(sha256: str) -> bool:
            with self.db.session() as s:
                return s.exec(select(Asset.id).where(col(Asset.sha256) == sha256,
                                                     col(Asset.deleted_at).is_(None)).limit(1)).first() is not None

        for put in dict.fromkeys(put for put, _ in written):  # a put the job's images share, once
            self.store.discard(put, named)

    def _finish_success(self, claim: Claim, result: RenderResult, records: list[dict[str, Any]],
                        pngs: list[tuple[Put, bytes]], seconds: float) -> list[str]:
        job = claim.job
        rows = _asset_rows(job, result, records, pngs)
        now = utcnow()
        # Landed: its own rows too. Another process's recovery that adopted these images while this
        # write retried (`orchestrator.adopt`) ends the attempt alike, with rows of its own: read as
        # this write, the stream was told ids of assets never committed.
        self._end_write(claim, f"job {job.id}'s success",
                        lambda s: self._succeed_in(s, claim, result, rows, now, seconds),
                        lambda row: row.status == "succeeded" and _last_attempt(row, claim, "succeeded", None)
                        and (not rows or self._committed(rows[0].id)))
        return self._served(rows, pngs)

    def _committed(self, asset_id: str) -> bool:
        with self.db.session() as s:
            return s.get(Asset, asset_id) is not None

    def _served(self, rows: list[Asset], pngs: list[tuple[Put, bytes]]) -> list[str]:
        """The ids of the committed `rows`, whose bytes the store serves from memory for a while."""
        for row, (put, data) in zip(rows, pngs, strict=True):
            self.store.recent.add(row.id, put.sha256, data)
        return [r.id for r in rows]

    def _succeed_in(self, s: Session, claim: Claim, result: RenderResult, rows: list[Asset], now: datetime,
                    seconds: float) -> None:
        job = claim.job
        self._raise_if_user_canceled(claim)  # rolls back: nothing of this success is kept
        # What providers accepted, in case its own save is still out: a save that comes after this
        # update finds the job no longer running, and the record of the provider's work was lost.
        accepted = _accepted_values(claim.accepted) if claim.accepted else {}
        accepted_ids = accepted.pop("provider_request_id", None)
        request_id = result.provider_request_id or accepted_ids
        engine = self.registry.get(job.engine)
        if job.cache_key and not claim.inherited:
            # Keyed again by the model that rendered it: a job queued before a restart changed the
            # engine's model was keyed by the old one, and served the new one's image as its hit.
            # Work an earlier process sent (reattached, resumed) was made by the model it was keyed by.
            accepted["cache_key"] = cache_key(job.engine, engine.model, job.params)
        # What its project's device-time quota counts (`orchestrator.device_time`): the seconds
        # metered local work is charged for, kept whether or not ORCH_LOCAL_GPU_SECOND_CREDITS meters it.
        used = (device_seconds(result.metadata.get(DEVICE_SECONDS), seconds, engine=job.engine)
                if engine.kind == "local" else None)
        # Added to what earlier attempts held (a local one a fallback moved off, one a crash ended):
        # a remote engine's success leaves those seconds counted.
        held = {"device_seconds": device_time.added(used)} if used is not None else {}
        self._guarded_update(s, claim, unless_canceled=True, status="succeeded", finished_at=now, **NO_LEASE,
                             **held, progress_step=job.progress_total or 1,
                             progress_total=job.progress_total or 1, model=result.model, **accepted,
                             # The column's size: n ids of a many-call job may be longer.
                             provider_request_id=(request_id or "")[:500] or None, stored_images=None,
                             attempts=job.with_attempt("succeeded"))
        _add_assets(s, rows)
        webhooks.job_ended(s, claim.job.id, claim.job.project_id, "succeeded")
        # Free local work holds nothing: the ledger's lookup is skipped on the hot path.
        if job.estimated > 0 or result.cost_millicredits or billed_by_provider(engine):
            self.ledger.charge_made(s, job, result.cost_millicredits,
                                    unread=unread_note(result))
        elif self.local_rate and used is not None:
            self.ledger.charge_usage(s, job, round(used * self.local_rate * 1000),
                                     note=f"{used:.2f} device-seconds")

    def _device_held(self, claim: Claim) -> dict[str, Any]:
        """The values that add an attempt on a local engine that ended without a result (failed,
        canceled, moved by a fallback, queued again by a stop) to its job's `device_seconds`: a
        project's quota counts the device-seconds of every attempt, not only a success's (metering
        still charges a success alone). Measured here, as the engine's own count (which comes only
        with a result) is: from the start of its work on the device, its model loaded, where the
        engine tells it (`Progress.on_device`; an engine that tells and had not: nothing, its load
        held the device as a success's does uncounted), else from the engine's start; up to the
        engine's return (`Claim.engine_ended`), not this end's write: what comes between (a
        fallback asking its candidates' availability, storing images) holds no device. {} for
        another engine's attempt, or a claim no engine was started on."""
        job = claim.job
        if claim.began is None or job.engine not in self.registry:
            return {}
        engine = self.registry.get(job.engine)
        if engine.kind != "local":
            return {}
        until = claim.engine_ended if claim.engine_ended is not None else time.monotonic()
        # Told after the engine's return (an abandoned thread's late start, after a cancel): 0.
        began = claim.device_began if claim.device_began is not None else (
            until if getattr(engine, "tells_device_start", False) else claim.began)
        return {"device_seconds": device_time.added(max(0.0, until - began))}

    def _doubt_a_free_cancel(self, claim: Claim, exc: Canceled) -> None:
        """A remote engine's cancel that says nothing of its cost (a token's own `Canceled`, as a
        plugin waiting on `cancel.sleep` while its provider works raises) is free only when nothing
        of the attempt can have reached a provider: released as "no" otherwise, a request out and
        billed would be paid by no one, or sent again after a stop."""
        if exc.charged != "no" or exc.charged_told:
            return
        if self._may_have_sent(claim):
            exc.at_least_charged("unknown")

    def _raise_if_user_canceled(self, claim: Claim) -> None:
        # A stop cancels the token too; a user's cancel is also in the row's `cancel_requested_at`,
        # which the guarded update checks, so under a stop the token alone says nothing (until the
        # service has closed: then nothing more is stored).
        if not claim.shutdown or self._closed:
            claim.cancel.raise_if_cancelled()

    def _hand_to_store(self, data: bytes) -> concurrent.futures.Future[tuple[Put, bytes]]:
        """`data`'s put, on a store thread (see `_store_pngs`). A pool that cannot start a thread
        for it (the system's thread limit) raises RuntimeError from `submit` with the work queued
        all the same, for a thread it has to run later, when the job has ended: told it was not
        handed out, it writes nothing."""
        handed: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def put() -> tuple[Put, bytes]:
            if not handed.result():
                raise RuntimeError("not handed out: its job's images were discarded")
            return self._store_png(data)

        try:
            future = self._store_io.submit(put)
        except BaseException:
            handed.set_result(False)
            raise
        handed.set_result(True)
        return future

    def _store_png(self, data: bytes) -> tuple[Put, bytes]:
        """An encoded image written to the store (on a store thread: see `_store_pngs`)."""
        return self.store.put_file(data), data

    def _finish(self, claim: Claim, status: str, error: OrchestratorError, *,
                unstarted: bool = False) -> tuple[str, OrchestratorError, list[str]]:
        """End the job; returns the status and error it ended with, and the ids of the images it
        keeps. A failure that meets a cancel already asked (answered 202, through another process,
        so the token here may not be set yet) ends the job canceled, as a success that meets one
        does; what the failure says was charged is still what the ledger settles. `unstarted`: no
        task started the claim (given back at a stop), so no engine did: its `started_at` is put
        back. The images an engine made before it failed (`EngineError.made`) were paid for: they
        are stored, and the job ends with them as its assets."""
        job = claim.job
        bill = error
        held = {} if unstarted else self._device_held(claim)  # before its images are stored: that is no device time
        rows, pngs = self._kept_images(job, error)

        def end(s: Session) -> None:
            nonlocal status, error
            if status == "failed" and s.scalar(select(Job.cancel_requested_at).where(col(Job.id) == job.id)):
                status = "canceled"
                error = Canceled(f"the job was canceled (it was failing: {error.message})"[:500])
            # The progress it reached stays (a fast job's row was never written a step before).
            # What providers accepted, in case its own save is still out (or failed).
            accepted = _accepted_values(claim.accepted) if claim.accepted else {}
            unstarted_values: dict[str, Any] = {"started_at": claim.started_before} if unstarted else {}
            self._guarded_update(s, claim, status=status, finished_at=utcnow(), error=error.to_dict(),
                                 **NO_LEASE, progress_step=job.progress_step,
                                 progress_total=job.progress_total, **accepted, **held,
                                 **unstarted_values, stored_images=None,
                                 attempts=job.with_attempt(status, error.to_dict()))
            _add_assets(s, rows)
            self.ledger.settle_failure(s, job, bill)
            webhooks.job_ended(s, claim.job.id, claim.job.project_id, status)

        try:
            self._end_write(claim, f"job {job.id}'s end", end,
                            lambda row: row.status == status and _last_attempt(row, claim, status, error))
        except BaseException:
            self._discard(pngs)  # no row names them
            raise
        return status, error, self._served(rows, pngs)

    def _kept_images(self, job: Job, error: OrchestratorError) -> tuple[list[Asset], list[tuple[Put, bytes]]]:
        """The asset rows of the images the engine made before `error` ended the job, and their
        stored files. Storing them is not the job's end: when it fails, the job ends without them
        (their cost is charged all the same), and the log says why."""
        made = error.made if isinstance(error, EngineError) else None
        if made is None or not made.images:
            return [], []
        asked = job.params.get("n") or 1
        made = self._storable(job, replace(made, images=made.images[:asked]))
        note = f"made before the job ended {error.code}: {len(made.images)} of the {asked} images asked were made"
        pngs: list[tuple[Put, bytes]] = []
        try:
            records = self._records(job, made, note=note)
            pngs = self._store_pngs(job, [r.image for r in made.images], records)
            return _asset_rows(job, made, records, pngs), pngs
        except Exception as exc:  # disk full, a closed service, a plugin's odd image: the end must still be written
            log.error("job %s: the %d image(s) made before it ended could not be kept: %s: %s", job.id,
                      len(made.images), type(exc).__name__, first_line(exc))
            self._discard(pngs)
            return [], []

    def _end_write(self, claim: Claim, what: str, write: Callable[[Session], None],
                   landed: Callable[[Job], bool], *, attempt: int | None = None) -> None:
        """`write`, which ends this attempt (guarded by `_guarded_update`), in a transaction tried
        again through a database outage. A COMMIT whose answer was lost (`commit_in_doubt`) may
        have ended the job already: the next try then finds the row no longer this attempt's and
        raises `StaleAttempt`. When the row reads as `landed` says this write leaves it, the write
        is done: it was logged "superseded; its result is discarded" (the result stored and
        charged) and its stream told nothing until a follower read the row, up to
        ORCH_POLL_INTERVAL later. `attempt` is the attempt number the write leaves (the claim's
        unless told)."""
        doubted = False
        for tried in self.db.retrying(FINAL_WRITE_SECONDS, what):
            with tried:
                try:
                    with self.db.transaction() as s:
                        write(s)
                except StaleAttempt:
                    if doubted and self._reads_as(claim, landed, claim.attempt if attempt is None else attempt):
                        log.info("%s: its COMMIT's answer was lost, and the database holds it", what)
                        return
                    raise
                except SQLAlchemyError as exc:
                    doubted = doubted or commit_in_doubt(exc)
                    raise

    def _reads_as(self, claim: Claim, landed: Callable[[Job], bool], attempt: int) -> bool:
        with self.db.session() as s:
            row = s.get(Job, claim.job.id)
            return row is not None and row.attempt == attempt and row.lease_owner is None and landed(row)

    @staticmethod
    def _guarded_update(s: Session, claim: Claim, *, unless_canceled: bool = False, **values: Any) -> None:
        """Update the job if this attempt still holds it; with `unless_canceled`, only if no cancel
        was asked either (raises `Canceled` then: the caller ends the job as canceled)."""
        held = (col(Job.id) == claim.job.id, col(Job.attempt) == claim.attempt, col(Job.status) == "running")
        if claim.circuit_open and "status" in values and "started_at" not in values:
            # A claim to move wrote no start (`Scheduler._claim`): its end gives back the row's.
            values["started_at"] = claim.started_before
        stmt = update(Job).where(*held)
        if unless_canceled:
            stmt = stmt.where(col(Job.cancel_requested_at).is_(None))
        if changed(s.execute(stmt.values(**values))) == 1:
            return
        if unless_canceled and s.scalar(select(Job.id).where(*held)) is not None:
            raise Canceled("the job was canceled", charged="no")  # what it had cost is the caller's to say
        raise StaleAttempt(claim.job.id)

    def write_preview(self, job_id: str, preview: Preview) -> None:
        # Known before the file exists: the job's end removes whatever this write leaves.
        self._preview_written.add(job_id)
        try:
            self.preview_files.write(job_id, preview)
            if job_id not in self.previews:
                # The job ended while this write (behind its engine) was out, and may have looked
                # for a file before there was one: nothing else would remove it.
                self._preview_written.discard(job_id)
                self.preview_files.remove(job_id)
        except OSError as exc:  # a full disk loses other processes the preview, never the job
            log.warning("job %s: writing its step preview failed: %s", job_id, exc)

    def write_progress(self, claim: Claim, step: int, total: int) -> None:
        # For pollers only (events carry every step): a database that hiccups loses them a
        # step, never fails the render around it.
        try:
            with self.db.transaction() as s:
                # A row queued again (a takeover keeps the attempt number) is not this attempt's.
                s.execute(update(Job).where(col(Job.id) == claim.job.id, col(Job.attempt) == claim.attempt,
                                            col(Job.status) == "running")
                          .values(progress_step=step, progress_total=total))
        except SQLAlchemyError as exc:
            self._progress_outage.failed(exc)
        else:
            self._progress_outage.recovered()

    def tells_device_start(self, engine: str) -> bool:
        """Whether `engine` is a local engine here that tells its work's start on the device."""
        return engine in device_time.telling_engines(self.registry)

    def device_start_values(self, claim: Claim, monotonic_now: float, leased: datetime) -> dict[str, Any]:
        """The values that stamp the claim's start on the device (`Job.device_began_at`) by the
        leases' clock, `leased` being that clock at `monotonic_now`, where the row has none: {} while
        it has not started there, or for an engine that does not tell it (its end counts from its
        engine's start, and so does a reader)."""
        began = claim.device_began
        if began is None or not self.tells_device_start(claim.job.engine):
            return {}
        at = leased - timedelta(seconds=max(0.0, monotonic_now - began))
        # Never before its own claim's stamp: a reader takes such a stamp for an earlier claim's and
        # counts the attempt 0 while it runs; the leases' clock stepped back between the claim and
        # this write put it there.
        claimed = claim.job.lease_taken_at if claim.job.lease_taken_attempt == claim.attempt else None
        if claimed is not None:
            at = max(at, claimed)
        return {"device_began_at": func.coalesce(col(Job.device_began_at), at)}

    def write_device_start(self, claim: Claim) -> None:
        """Stamp the claim's start on the device on its row (`device_start_values`); a failure is
        logged, and the lease's next renewal stamps it (`Scheduler._renew`)."""
        try:
            with self.db.transaction() as s:
                values = self.device_start_values(claim, time.monotonic(), shared_now())
                if values:
                    s.execute(update(Job).where(col(Job.id) == claim.job.id, col(Job.attempt) == claim.attempt,
                                                col(Job.status) == "running").values(**values))
        except SQLAlchemyError as exc:
            log.warning("job %s: stamping its work's start on the device failed (its lease's renewal stamps it): %s",
                        claim.job.id, exc)

    def save_provider_request(self, claim: Claim, work: dict[str, Any]) -> None:
        """Save what a provider accepted, so that a crash can find it again; waits out a database
        that is away for a while (off the event loop: see `JobProgress`)."""
        for attempt in self.db.retrying(FINAL_WRITE_SECONDS, f"the provider work of job {claim.job.id}"):
            with attempt, self.db.transaction() as s:
                if changed(s.execute(update(Job).where(col(Job.id) == claim.job.id, col(Job.attempt) == claim.attempt,
                                                       col(Job.status) == "running")
                                     .values(**_accepted_values(work)))) == 1:
                    return
                row = s.get(Job, claim.job.id)
        # Taken from this attempt while the provider accepted it (its worker stopped past its
        # lease): known now, before the heartbeat's next look, the work is withdrawn before it runs.
        self.let_go(claim, row)


def _asset_rows(job: Job, result: RenderResult, records: list[dict[str, Any]],
                pngs: list[tuple[Put, bytes]]) -> list[Asset]:
    return [
        Asset(id=new_id("ast"), project_id=job.project_id, job_id=job.id, index=index, stage=job.stage,
              parent_id=job.source_asset_id, engine=job.engine, model=result.model,
              prompt=str(record["prompt"]), negative_prompt=str(record["negative_prompt"]),
              seed=rendered.seed, width=rendered.image.width, height=rendered.image.height, sha256=put.sha256,
              record=record, bytes=len(data))
        for index, (rendered, record, (put, data)) in enumerate(zip(result.images, records, pngs, strict=True))
    ]


def _add_assets(s: Session, rows: list[Asset]) -> None:
    """Add the job's asset rows, in the transaction that ends it (after its update took the write
    lock). Ids made under the lock commit in id order: they are list cursors, and a page must not
    step over an asset committed just after. Their times are stamped here too, by the clock ids
    take: stamped when the rows were built, before a wait for the lock, an asset listed after
    another could say it was made before."""
    stamp = shared_now()
    for row in rows:
        row.id, row.created_at = new_id("ast"), stamp
    quota.add_assets(s, rows)  # counted in its project's usage, in the same transaction


def _finished_by_its_worker(job: Job) -> bool:
    """Succeeded or failed by the runner, not failed by another process's recovery (which fails a
    job `interrupted` without a new attempt)."""
    return job.status == "succeeded" or (job.status == "failed" and (job.error or {}).get("code") != "interrupted")


def _last_attempt(row: Job, claim: Claim, status: str, error: OrchestratorError | None) -> bool:
    """Whether the row's attempts are the claim's with one more ended `status` with `error`'s code:
    what this attempt's end wrote, not recovery's `interrupted` nor a later attempt's."""
    tried = row.attempts or []
    if len(tried) != len(claim.job.attempts or []) + 1 or not isinstance(tried[-1], dict):
        return False
    told = tried[-1].get("error")
    return tried[-1].get("status") == status and (told.get("code") if isinstance(told, dict) else None) == (
        error.code if error is not None else None)


def device_seconds(reported: object, measured: float, *, engine: str) -> float:
    """The seconds metered local work is charged: the engine's own count (it leaves out loading the
    model), unless it is not a number of seconds within the attempt's (a plugin's NaN, -5 or 1e12
    was charged as given, free or past what the ledger can hold), then the attempt's own."""
    if reported is None:  # an engine that keeps no count of its own
        return measured
    if isinstance(reported, numbers.Real) and not isinstance(reported, bool):  # a numpy count too
        try:
            seconds = float(reported)
        except OverflowError:  # an integer past any float
            seconds = math.inf
        if math.isfinite(seconds) and 0 <= seconds <= measured:
            return seconds
    log.warning("engine %s reported %s device-seconds for an attempt of %.2f s: charged for %.2f s",
                engine, repr(reported)[:40], measured, measured)
    return measured


def _priced_here(engine: Engine, request: RenderRequest, here: bool) -> tuple[int, str | None, bool] | None:
    """`JobRunner._fallback_target`'s answer for an engine this process knows: None when it cannot price the job."""
    try:
        return priced(engine, request), engine.model, here
    except OrchestratorError:
        return None
