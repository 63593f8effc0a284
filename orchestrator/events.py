"""Job events for the SSE stream.

The bus lives on the event loop. Each job keeps an in-memory history: its lifecycle events
(`queued` once, `started`, `asset`, the terminal one), its `state` changes (a provider's queue
status told again at the next poll replaces the last) and only its latest `progress`, so a client
that connects late gets the current state first and then live events, without the stream
replaying every step. A job this process does not run (it ran before a restart, or another
process runs it) is described from its row instead (see `orchestrator.follow`).

Event ids are `<process tag>-<n>.<job mark>`: n counts up across all of this process's streams,
the tag is drawn at random when the process starts, and the mark binds the id to its job. A
reconnecting client's `Last-Event-ID` resumes the stream only when it came from this very process
for this very job; an id of another API server behind the same load balancer, of an earlier
process, of another job (a client reusing its header: resuming after it skipped this job's events
numbered below it), or garbage gets the whole state again rather than missing an event (numbers
alone cannot tell processes apart: their counters overlap). A terminal event's id is
`<tag>-<n>-end.<job mark>`: any process can tell that such a client has the end of this job's
story (a job ends once) and answer 204, so a browser moving between API servers does not get the
terminal event twice. (Ids of versions before the mark get the whole state again once.)

A stream nobody watches is dropped after `HISTORY_TTL` without an event (unless `pinned`: a job
this process runs), looked for as events are published (a service gone idle keeps its last
`HISTORY_TTL` of streams, a few MB at most, until its next event), and rebuilt from the job's
row when asked for, with new numbers: a client resuming it then gets its state again (queued,
started, assets), but never its end twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# A terminal event's id: `<tag>-<n>-end.<job mark>` (any other's `<tag>-<n>.<job mark>`). The job
# mark binds it to its job, for the processes that did not send it and cannot tell by the count
# (see `EventBus.foreign_end`), and for this one, whose count is shared by all its jobs.
END_MARK = "-end"
# Finished jobs keep their history this long, for clients that connect just after the end; so do
# unfinished ones without a client or an event (queued behind others, or run by another process).
HISTORY_TTL = 600.0
EVICT_EVERY = 1.0  # seconds between looks for streams to drop


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the caller runs on `loop`'s own thread (as a callback or a task of it)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def woken(event: asyncio.Event, seconds: float) -> None:
    """Return once `event` is set or `seconds` have passed. Not `asyncio.wait_for`: on Python 3.11
    it swallows a cancel that comes just as the event is set, and a loop woken so ran on (a
    worker's stop waited for its cancel watch for ever, the device lock held, a second SIGTERM
    unheard)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def job_mark(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()[:8]


def progress(job_id: str, step: int, total: int, *, preview: bool) -> dict[str, Any]:
    """A `progress` event's data, from the process that runs the job or one following its row:
    with `preview`, where the step's preview image is served."""
    data: dict[str, Any] = {"step": step, "total": total, "fraction": round(step / total, 4) if total else 0}
    if preview:
        data["preview_url"] = f"/v1/jobs/{job_id}/preview?step={step}"
    return data


class EventRef(NamedTuple):
    """The parts of an event id a client sends back: its process tag, number, job mark (empty
    when missing) and whether it is a terminal event's."""

    tag: str
    number: str
    mark: str
    end: bool


def split_id(event_id: str | None) -> EventRef:
    body, _, mark = (event_id or "").partition(".")
    end = body.endswith(END_MARK)
    tag, _, number = body.removesuffix(END_MARK).partition("-")
    return EventRef(tag, number, mark, end)


@dataclass(frozen=True)
class Event:
    id: int  # this process's count; the client sees it with the process tag
    type: str
    data: dict[str, Any]
    tag: str = ""
    job_id: str = ""

    def sse(self) -> str:
        data = json.dumps(self.data, separators=(",", ":"))
        end = END_MARK if self.type in TERMINAL else ""
        return f"id: {self.tag}-{self.id}{end}.{job_mark(self.job_id)}\nevent: {self.type}\ndata: {data}\n\n"


@dataclass(frozen=True)
class StreamView:
    """What a job's stream has told its clients so far."""

    started: bool
    attempt: int  # of the latest `started` (0: none, or not known)
    queued: bool  # told queued now: no `started` since the latest `queued` (see `catch_up`)
    assets: int
    step: int  # of the latest `progress` since that `started`
    finished: bool
    watched: bool
    moved_from: frozenset[str] = frozenset()  # the engines its `fallback` events told it left


class _Inbox:
    """A subscriber's events not yet sent. A step's progress replaces the one still waiting before
    it, and so does a state told again (a provider's queue position at each poll): a slow reader
    (a stalled client, a thin link) gets the latest, not a backlog that grows for as long as the
    job runs. Every other event is kept. Used on the loop."""

    def __init__(self) -> None:
        self._events: collections.deque[Event | None] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, event: Event | None) -> None:
        last = self._events[-1] if self._events else None
        if event is not None and last is not None and _supersedes(event, last):
            self._events[-1] = event
        else:
            self._events.append(event)
        self._ready.set()

    async def get(self) -> Event | None:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()

    def __len__(self) -> int:
        return len(self._events)


# States that each tell something that happened once (a move to another engine, work followed
# again), never a poll's news told again: two in a row are two events.
EVENTFUL_STATES = frozenset({"fallback", "reattached", "resumed", "restarted"})
# What a state is about: the same state of another of the provider's requests (Stability's
# second image polled) is news, not the first one's told again.
STATE_SUBJECTS = ("provider_id", "prompt_id", "task_id")


def _told_queued(history: list[Event]) -> bool:
    """Whether the stream tells the job queued now: no `started` since its latest `queued`."""
    told = [e.type for e in history if e.type in ("queued", "started")]
    return bool(told) and told[-1] == "queued"


def _repeats(event: Event, before: Event) -> bool:
    """Whether `event` is `before`'s state told again (a provider's queue position at each poll),
    so that only the latest need be kept."""
    return (event.type == "state" and before.type == "state" and event.data.get("state") == before.data.get("state")
            and event.data.get("state") not in EVENTFUL_STATES
            and all(event.data.get(key) == before.data.get(key) for key in STATE_SUBJECTS))


def _supersedes(event: Event, before: Event) -> bool:
    """Whether a client that has not read `before` yet needs only `event` (see `_Inbox`)."""
    if event.type == "progress":
        return before.type == "progress"
    return _repeats(event, before)


@dataclass
class _JobStream:
    touched: float = field(default_factory=time.monotonic)
    history: list[Event] = field(default_factory=list)
    latest_progress: Event | None = None
    subscribers: set[_Inbox] = field(default_factory=set)
    finished_at: float | None = None

    def snapshot(self) -> list[Event]:
        events = list(self.history)
        if self.latest_progress is not None and self.finished_at is None:
            events.append(self.latest_progress)
        return sorted(events, key=lambda e: e.id)


class EventBus:
    def __init__(self) -> None:
        self._jobs: dict[str, _JobStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.tag = secrets.token_hex(4)
        self._last_id = 0
        self._evicted_at = time.monotonic()
        # Streams never dropped for being idle (set by the service: the jobs this process holds).
        self.pinned: Callable[[str], bool] = lambda _job_id: False
        self.closed = False

    def _stream(self, job_id: str) -> _JobStream:
        return self._jobs.setdefault(job_id, _JobStream())

    def resume_after(self, last_event_id: str | None, job_id: str | None = None) -> int:
        """The count of the event a reconnecting client has seen, or 0 when the id is not one
        this process sent for this job (another process's, another job's, a malformed header):
        that client gets the whole state again."""
        ref = split_id(last_event_id)
        if ref.tag != self.tag or not (ref.number.isascii() and ref.number.isdigit()) or len(ref.number) > 18:
            return 0
        if job_id is not None and ref.mark and ref.mark != job_mark(job_id):
            return 0  # another job's: its count says nothing of which of this job's events were sent
        seen = int(ref.number)
        stream = self._jobs.get(job_id) if job_id is not None else None
        if stream is not None:
            # Past this job's latest event, the id is another job's (one without a mark): resuming
            # from it would skip everything this job has said, down to an empty stream for a finished one.
            latest = max((e.id for e in stream.snapshot()), default=0)
            if stream.latest_progress is not None:
                latest = max(latest, stream.latest_progress.id)
            return seen if seen <= latest else 0
        return seen if seen <= self._last_id else 0

    def ended_before(self, job_id: str, last_event_id: str | None) -> bool:
        """Whether the client has already received this job's terminal event, from this process
        or another one."""
        stream = self._jobs.get(job_id)
        if not last_event_id or stream is None or stream.finished_at is None:
            return False
        # A terminal event's id with this job's mark, from any process: a job ends once (this
        # process's own count does not do, once the stream was dropped and rebuilt with new numbers).
        # Without the mark (a client that dropped it), only this process's id of its terminal event.
        # Another job's end (a client reusing its header) or a made-up id gets the state, terminal
        # event included.
        ref = split_id(last_event_id)
        if ref.mark and ref.mark != job_mark(job_id):
            return False
        if ref.mark and ref.end:
            return True
        # This process's number of the terminal event, its `-end` dropped (a rewritten header): the
        # stream after it is empty, and a 200 would have a browser reconnect forever.
        return ref.tag == self.tag and bool(stream.history) and ref.number == str(stream.history[-1].id)

    def foreign_end(self, job_id: str, last_event_id: str | None) -> bool:
        """Whether the id is another process's terminal event of this job: the job may have ended
        there before this process has heard of it (see `ended_before`), so its row decides."""
        ref = split_id(last_event_id)
        return bool(last_event_id) and ref.tag != self.tag and ref.end and ref.mark == job_mark(job_id)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The service's event loop, once bound (an API server that runs no jobs has one too)."""
        return self._loop

    def close(self) -> None:
        """End every stream now, and any opened later at once: the server is stopping, and it
        waits for its connections to close before it stops anything else. A client reconnects
        with `Last-Event-ID` (to another process, or this one restarted). Safe from any thread."""
        loop = self._loop
        if loop is not None and not on_loop(loop):
            loop.call_soon_threadsafe(self.close)
            return
        self.closed = True
        for stream in self._jobs.values():
            for inbox in stream.subscribers:
                inbox.put(None)

    def publish(self, job_id: str, type_: str, data: dict[str, Any], *, known_only: bool = False) -> None:
        """Publish an event; safe from any thread (sync API handlers run in a thread pool). With
        `known_only`, only to a job this bus has a stream for: the end of a job another process
        queued or ran (a cancel of a queued job sent here) made a stream of that one event, and a
        client asking later got the end alone, not the story a stream rebuilt from the row tells."""
        loop = self._loop
        if loop is not None and not on_loop(loop):
            loop.call_soon_threadsafe(self._publish, job_id, type_, data, known_only)
            return
        self._publish(job_id, type_, data, known_only)

    def _publish(self, job_id: str, type_: str, data: dict[str, Any], known_only: bool = False) -> None:
        if known_only and job_id not in self._jobs:
            return  # nobody follows it here; a stream asked for later is caught up from the row
        stream = self._stream(job_id)
        if stream.finished_at is not None:
            return  # exactly one terminal event, nothing after it
        if type_ == "queued" and (_told_queued(stream.history) if data.get("requeued")
                                  else any(e.type == "queued" for e in stream.history)):
            # The submit's own event, late: the runner claimed the job first and told it already.
            # (Queued again after it started, its worker gone, is news once: `follow.catch_up`.)
            return
        self._last_id += 1
        event = Event(self._last_id, type_, data, self.tag, job_id)
        stream.touched = time.monotonic()
        if type_ == "progress":
            stream.latest_progress = event
        else:
            if stream.history and _repeats(event, stream.history[-1]):
                stream.history[-1] = event  # the same state told again at a poll: only the latest is kept
            else:
                stream.history.append(event)
        if type_ in TERMINAL:
            stream.finished_at = time.monotonic()
        for inbox in stream.subscribers:
            inbox.put(event)
        self._evict()

    def knows(self, job_id: str) -> bool:
        return job_id in self._jobs

    def keep(self, job_id: str) -> bool:
        """`knows`, and if so the job's history is kept a whole `HISTORY_TTL` from now: a stream
        about to subscribe must find it. Call it on the loop. (Dropped by another job's event between
        the look and the subscription, a finished job's stream came back empty.)"""
        stream = self._jobs.get(job_id)
        if stream is None:
            return False
        stream.touched = time.monotonic()
        return True

    def view(self, job_id: str) -> StreamView | None:
        """The stream's state, for catching it up from the job's row; call it on the loop."""
        stream = self._jobs.get(job_id)
        if stream is None:
            return None
        started = [e for e in stream.history if e.type == "started"]
        last_start = started[-1] if started else None
        progress = stream.latest_progress
        since_start = progress is not None and (last_start is None or progress.id > last_start.id)
        step = int(progress.data.get("step", 0)) if progress is not None and since_start else 0
        return StreamView(started=last_start is not None,
                          attempt=int(last_start.data.get("attempt", 0)) if last_start else 0,
                          queued=_told_queued(stream.history),
                          assets=sum(1 for e in stream.history if e.type == "asset"), step=step,
                          finished=stream.finished_at is not None, watched=bool(stream.subscribers),
                          moved_from=frozenset(str(e.data.get("from")) for e in stream.history
                                               if e.type == "state" and e.data.get("state") == "fallback"))

    async def subscribe(self, job_id: str, after: int = 0) -> AsyncIterator[Event]:
        """The job's current state, then live events, ending after the terminal event; events up
        to `after` (see `resume_after`) are left out. A job the bus does not know (its history
        expired after the caller checked) ends at once: the client reconnects and is told its state
        afresh, instead of waiting on an empty stream forever."""
        stream = self._jobs.get(job_id)
        if stream is None or self.closed:
            return
        inbox = _Inbox()
        # No await between the snapshot and the subscription: nothing can slip between them.
        backlog = stream.snapshot()
        stream.subscribers.add(inbox)
        try:
            last = after
            for event in backlog:
                if event.id <= last:
                    if event.type in TERMINAL:
                        return  # the client has it already
                    continue
                last = event.id
                yield event
                if event.type in TERMINAL:
                    return
            while True:
                live = await inbox.get()
                if live is None:  # the bus closed
                    return
                if live.id <= last:
                    continue
                last = live.id
                yield live
                if live.type in TERMINAL:
                    return
        finally:
            stream.subscribers.discard(inbox)

    def _evict(self) -> None:
        now = time.monotonic()
        if now - self._evicted_at < EVICT_EVERY:
            return
        self._evicted_at = now
        stale = [job_id for job_id, s in self._jobs.items()
                 if not s.subscribers and now - s.touched > HISTORY_TTL
                 and (s.finished_at is not None or not self.pinned(job_id))]
        for job_id in stale:
            del self._jobs[job_id]
