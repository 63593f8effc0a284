from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from sqlmodel import Session, col, select
from starlette.types import Receive, Scope, Send

from orchestrator import keys
from orchestrator.api.deps import Caller, CallerDep, ServicesDep, check_job
from orchestrator.api.docs import documented, with_query
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.api.paths import JobId
from orchestrator.api.query import Cursor, Limit, Order, StageFilter, WholeNumber, paged
from orchestrator.api.serialize import JOB_TEXT, PAGE_BATCH, job_public, page_rows
from orchestrator.db import transient
from orchestrator.errors import Conflict, InvalidRequest, NotFound, ServerStopping, first_line, not_found, shown
from orchestrator.events import TERMINAL, Event
from orchestrator.follow import catch_up
from orchestrator.ids import id_cursor
from orchestrator.jobs import asset_ids_in
from orchestrator.models import Job, Project
from orchestrator.schemas import JobPublic, JobStatus, Page
from orchestrator.services import Services

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"], route_class=StrictJSONRoute)
KEEPALIVE_SECONDS = 15.0
KEY_RECHECK_SECONDS = 5.0  # how long a revoked project key may still follow an open stream
# The first thing on every event stream (`retry:`): how long a browser's EventSource waits before it
# reconnects, with Last-Event-ID, once the stream drops. Without it each browser waits its own
# default (they differ); 2 s resumes a stream cut by a restart or a proxy soon after the server is
# back, without every open tab reconnecting in a tight loop while it is away.
RETRY_MS = 2000
CANCEL_TRIES = 3


def public(services: Services, job_id: str, caller: Caller | None = None) -> JobPublic:
    """The job as of one moment. Its row, its assets and its money were three reads: a job that
    ended between them showed `running`, charged, with nothing held (a dashboard adding `held`
    and `charged` lost the hold for that moment). `caller`: 404 for a job it cannot see."""
    with services.db.snapshot() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise not_found("job", "job_id", job_id)
        if caller is not None:
            caller.job(job)
        return publics_in(services, s, [job])[0]


def publics_in(services: Services, s: Session, jobs: list[Job]) -> list[JobPublic]:
    """`jobs` as shown, their assets and money read in `s` (the snapshot the rows were read in)."""
    ids = [j.id for j in jobs]
    assets = asset_ids_in(s, ids)
    money = services.ledger.job_costs(s, ids)
    return [job_public(j, assets[j.id], money.get(j.id)) for j in jobs]


@router.get("/jobs/{job_id}", response_model=JobPublic, summary="Get a job",
            responses=documented(404, said={404: "No such job (`not_found`)."}))
def get_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> JobPublic:
    """A job: its status and progress, its assets, its cost (estimated, held, charged), the
    routing decision that placed it and every attempt (fallbacks included)."""
    return public(services, job_id, caller)


@router.get("/jobs", response_model=Page[JobPublic], summary="List jobs",
            responses=with_query(404, said={404: "`project_id` names no project (`not_found`)."}))
def list_jobs(services: ServicesDep, caller: CallerDep,
              project_id: Annotated[str | None, Query(description=(
                  "Only this project's jobs; a project that does not exist (or, for a project key, another "
                  "project) is a 404; left out: the jobs of every project the caller can see."))] = None,
              stage: StageFilter = None,
              status: Annotated[JobStatus | None, Query(description=(
                  "Only jobs in this status: `queued`, `running`, `succeeded`, `failed` or `canceled`; left out: "
                  "any."))] = None,
              engine: Annotated[str | None, Query(description=(
                  "The engine the job is on (after a fallback, the one it moved to): one this service has, or "
                  "one a job was on (an engine since removed from the configuration); else 422."))] = None,
              limit: Limit = 50, cursor: Cursor = None, order: Order = "asc") -> Page[JobPublic]:
    """Every project's jobs, or one project's (404 for a project that does not exist, as its
    assets list answers); a project key sees its own project's only."""
    with services.db.snapshot() as s:
        stmt = select(Job, JOB_TEXT).limit(limit + 1)
        if caller.project_id is not None:
            stmt = stmt.where(col(Job.project_id) == caller.project_id)
        if project_id:
            caller.project(project_id)
            if s.get(Project, project_id) is None:  # a mistyped id is not a project without jobs
                raise not_found("project", "project_id", project_id)
            stmt = stmt.where(col(Job.project_id) == project_id)
        if stage:
            stmt = stmt.where(col(Job.stage) == stage)
        if status:
            stmt = stmt.where(col(Job.status) == status)
        if engine:
            stmt = stmt.where(col(Job.engine) == engine)
            if engine not in services.registry.names():
                ever = select(Job.id).where(col(Job.engine) == engine).limit(1)
                if caller.project_id is not None:
                    ever = ever.where(col(Job.project_id) == caller.project_id)
                if s.exec(ever).first() is None:
                    # A typo read as "no jobs" (a misspelt status or stage is refused).
                    known = sorted(services.registry.names())
                    told = shown(engine)  # a key's secret sent for it is not repeated into the client's logs
                    raise InvalidRequest(f"unknown engine '{told}' (known: {', '.join(known)})",
                                         details={"engine": told, "known": known}, loc=("query", "engine"))
        stmt = paged(stmt, col(Job.id), id_cursor(cursor, "job") or None, order)
        with s.exec(stmt.execution_options(yield_per=PAGE_BATCH)) as result:
            rows, more = page_rows(result, limit)
        return Page(items=publics_in(services, s, rows), next_cursor=rows[-1].id if more else None)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobPublic, summary="Cancel a job",
             responses={
                 202: {"description": "The cancel is recorded: the job as it is now (`canceled` at once when it was "
                                      "queued; a running one ends `canceled` on its event stream)."},
                 **documented(404, 409, said={
                     404: "No such job (`not_found`).",
                     409: "The job has already finished (`job_finished`, `details.status` says how), or it changed "
                          "hands while it was being canceled (`conflict`: send the cancel again)."})})
def cancel_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> JobPublic:
    """Cancel a queued or running job; it reaches `canceled` (a running local job within one
    denoising step). Its hold is released, unless a provider may already have billed the work
    (then the estimate is captured, flagged for reconciliation). 409 `job_finished` once it ended."""
    check_job(services, caller, job_id)
    # Queued, held here, held by another live process, or held by one that is gone (a late write
    # of that worker carries an older state and changes nothing). A job can change hands between
    # two of these looks (claimed, recovered, moved by a fallback): look again.
    for _ in range(CANCEL_TRIES):
        if services.jobs.cancel_queued(job_id):
            # Queued to be reattached: its provider's work is forgotten too.
            services.scheduler.forget_abandoned(services.jobs.get(job_id))
            return public(services, job_id)
        if services.scheduler.holds(job_id):
            # Recorded while it runs, the cancel wins: the job's end yields to it, should the job end
            # before its token is reached. Not running any more (a fallback or a stop put it back
            # in the queue): look again.
            if services.jobs.record_cancel(job_id):
                services.scheduler.cancel(job_id)
                return public(services, job_id)
            continue
        if services.jobs.ask_holder_to_cancel(job_id):
            return public(services, job_id)
        if services.jobs.cancel_orphan(job_id):
            # Its dead worker may have left work on a server.
            services.scheduler.forget_abandoned(services.jobs.get(job_id))
            return public(services, job_id)
    raise Conflict("the job changed hands while it was being canceled; ask again", details={"job_id": job_id})


@router.get("/jobs/{job_id}/preview", response_class=Response, summary="Get a running job's preview",
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The latest step's preview, whole: a `Range` is ignored (each step's "
                                            "image is another, with no validator to tie a range to).",
                             "headers": {"Accept-Ranges": {"description": "`none`", "schema": {"type": "string"}}}},
                       **with_query(404, said={404: "No such job, or no preview of it now: it is not denoising "
                                                    "(`not_found`)."})})
def job_preview(
    job_id: JobId, services: ServicesDep, caller: CallerDep,
    step: Annotated[int | None, Query(ge=0, description=(
        "The step a `progress` event's `preview_url` names. It only makes each step's URL its "
        "own for caches: the latest preview is served, which may be a later step's.")), WholeNumber] = None,
) -> Response:
    """Served by any process: the process that runs the job also keeps its latest preview (at
    most a second old) in the data dir."""
    job = caller.job(services.jobs.get(job_id))
    preview = services.runner.previews.get(job_id)
    data = preview.png() if preview is not None else None
    if data is None and job.status == "running":
        # Only while the row says running: a file a crashed process left is no preview of anything.
        data = services.runner.preview_files.read(job_id, since=job.started_at)
    if data is None:
        raise NotFound("no preview: the job is not denoising right now", details={"job_id": job_id})
    # A preview changes every step, with no validator to tie a range to one of them: a `Range` is
    # ignored (RFC 9110 14.2 allows it), and `Accept-Ranges: none` tells clients not to send one.
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store", "Accept-Ranges": "none"})


def _finished(services: Services, job_id: str) -> bool:
    with services.db.session() as s:
        return s.exec(select(Job.status).where(col(Job.id) == job_id)).first() in TERMINAL


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse, summary="Follow a job's events",
            responses={200: {"content": {"text/event-stream": {}}, "description": (
                "Server-sent events, each with an `id:` and a JSON `data:`: `queued` (again, with `requeued: "
                "true`, when a job that started goes back to the queue), `started` (with its `attempt`), `progress` "
                "(`step`, `total`, `fraction`, and `preview_url` when the step has a preview), `state` (`state`: "
                "submitted, polling, accepted, fallback, prompt_truncated, ...), `asset` (`asset_id`, `index`), "
                "then exactly one of `succeeded` (`assets`), `failed` (`error`) or `canceled` (`error`: why), and "
                "the stream closes. A late client gets the "
                "current state first; comment lines keep an idle stream open. The stream opens with "
                f"`retry: {RETRY_MS}` (no event): a browser's EventSource reconnects {RETRY_MS} ms after a drop.")},
                       204: {"description": "Last-Event-ID is the terminal event: nothing more will come."},
                       **with_query(404, 429, said={
                           422: "The query parameter `lastEventId` is given more than once, one reads as its "
                                "misspelling (`?lastEventID=`), or one is a filter of another list that the stream "
                                "does not take (`?status=`): refused rather than ignored (`invalid_request`); "
                                "`details.errors` gives its `loc` (`[\"query\", \"lastEventId\"]`).",
                           404: "No such job (`not_found`).",
                           429: "This project key already has ORCH_MAX_STREAMS_PER_KEY event streams open on this "
                                "server (`rate_limited`); `Retry-After` says when to try again."})})
async def job_events(job_id: JobId, services: ServicesDep, caller: CallerDep,
                     last_event_id: Annotated[str | None, Header(
                         alias="Last-Event-ID", description="The `id:` of the last event the client has: the "
                         "stream resumes after it (a browser's EventSource sends it when it reconnects).")] = None,
                     last_event_id_query: Annotated[str | None, Query(
                         alias="lastEventId", description="`Last-Event-ID` from a client that cannot send headers "
                         "(EventSource polyfills send it here); the header wins when both are given.")] = None,
                     ) -> Response:
    """Reconnecting with `Last-Event-ID` resumes after that event; once the client has the terminal
    event the answer is 204, which tells a browser's EventSource to stop reconnecting."""
    if last_event_id is None:
        last_event_id = last_event_id_query
    if services.bus.closed:
        # The service is stopping and has ended its streams: an empty 200 read as the job's end.
        # (A stop between here and the subscription still ends the stream empty: the client's
        # reconnect then meets this.)
        raise ServerStopping("the server is stopping: follow the job again in a moment (another server, or "
                             "this one once restarted)", details={"job_id": job_id})
    if caller.key_id is not None and last_event_id is None:
        # Before the job is read: a key at its limit reconnecting in a loop costs no job read (the
        # answer is the same for any job id, so it tells nothing of the job). A reconnect with
        # Last-Event-ID goes on: once it has the terminal event its answer is 204, limit or not.
        services.streams.check(caller.key_id)
    if caller.project_id is not None:
        await asyncio.to_thread(check_job, services, caller, job_id)
    known = services.bus.keep(job_id)  # a job this process has published is known to exist
    if not known or services.follower.lapsed(job_id):
        # Unknown here, or known from a while ago and no longer kept up to date (another process
        # runs it, and its last watcher left): a late client must first get the current state,
        # not the progress of when it was last watched. (A job known and live here costs no read:
        # a draft's stream opens right after its submit.)
        job, asset_ids, preview = await asyncio.to_thread(_stored_state, services, job_id)
        if services.scheduler.holds(job_id):  # claimed here (checked after the read): its runner tells the rest
            if not services.bus.knows(job_id):
                services.bus.publish(job_id, "queued", {"job_id": job_id, "status": "queued"})
        else:  # what the stream has not told (another client may have seeded it meanwhile)
            catch_up(services.bus, job, asset_ids, preview=preview)
    services.follower.follow(job_id)  # for as long as another process runs it
    if services.bus.ended_before(job_id, last_event_id) or (
            services.bus.foreign_end(job_id, last_event_id) and await asyncio.to_thread(_finished, services, job_id)):
        # The client has the terminal event; one from another process (a worker, another server)
        # is trusted once the row says the job ended, which this process may not have heard yet.
        return Response(status_code=204)
    seen = services.bus.resume_after(last_event_id, job_id)
    # Last, once nothing left can refuse the request (the check above was before awaits other
    # streams may have used): the answer gives the slot back as it ends. No await may come between
    # here and the return, nor a dependency's teardown that can raise: the slot would stay taken.
    release = services.streams.take(caller.key_id) if caller.key_id is not None else _nothing

    async def stream() -> AsyncIterator[str]:
        events = aiter(services.bus.subscribe(job_id, after=seen))
        pending: asyncio.Future[Event] | None = None
        checked = time.monotonic()
        try:
            yield f"retry: {RETRY_MS}\n\n"  # no data: not an event, a client dispatches nothing for it
            while True:
                if caller.key_id is not None and time.monotonic() - checked > KEY_RECHECK_SECONDS:
                    # A stream outlives its request: a key revoked meanwhile ends it.
                    try:
                        live = await asyncio.to_thread(keys.live, services.db, caller.key_id)
                    except Exception as exc:
                        if not transient(exc):
                            raise
                        # A busy or restarting database: the key stays as it was last seen, and
                        # is looked at again at the next check (cut here, the client's reconnect
                        # would meet the same database, and a browser gives up on its 503).
                        log.warning("job %s: the key of a stream could not be checked: %s", job_id,
                                    first_line(exc, type(exc).__name__)[:200])
                        live = True
                    if not live:
                        return
                    checked = time.monotonic()
                if pending is None:
                    pending = asyncio.ensure_future(anext(events))
                    # Its end may come as the client leaves (the finally below then skips it): read,
                    # or asyncio logs "Task exception was never retrieved" at ERROR for a hang-up.
                    pending.add_done_callback(_retrieved)
                wait = KEEPALIVE_SECONDS
                if caller.key_id is not None:  # wake for the next key check, not only for an event
                    wait = min(wait, max(0.0, KEY_RECHECK_SECONDS - (time.monotonic() - checked)) + 0.01)
                done, _ = await asyncio.wait({pending}, timeout=wait)
                if not done:
                    # A comment line keeps proxies from closing a quiet stream (a remote engine polling).
                    yield ": keep-alive\n\n"
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield event.sse()
        finally:
            try:
                if pending is not None and not pending.done():
                    pending.cancel()
                    # Let the subscription unwind inside that task first: closing a generator that
                    # is still running raises, and every client disconnect logged a traceback.
                    await asyncio.wait({pending})
            finally:  # even when that wait is itself canceled: the subscriber must go
                await events.aclose()  # type: ignore[attr-defined]

    return HeldStream(stream(), release=release, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class HeldStream(StreamingResponse):
    """A stream that gives its slot back once its answer ends, however it ends: the client leaving,
    the job's end, a stop, or a client gone before its first byte (whose body never starts, so a
    `finally` in the body would never run)."""

    def __init__(self, content: AsyncIterator[str], *, release: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _nothing() -> None:
    return None


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _stored_state(services: Services, job_id: str) -> tuple[Job, list[str], bool]:
    """The job's row and its assets as of one moment, and whether its running process has a
    preview file of it."""
    with services.db.snapshot() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise not_found("job", "job_id", job_id)
        asset_ids = asset_ids_in(s, [job_id])[job_id]
    preview = job.status == "running" and services.runner.preview_files.exists(job.id, since=job.started_at)
    return job, asset_ids, preview
