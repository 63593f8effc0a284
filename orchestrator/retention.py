"""Deleting assets: `DELETE /v1/assets/{id}` one at a time, and draft retention
(`ORCH_DRAFT_RETENTION_DAYS`) in batches, through the same soft delete (`delete_assets`).

A deleted asset keeps its row (its job, the ledger and its descendants' lineage name it) with
`deleted_at` set: it answers 410 `gone` from then on, and its file leaves the disk at the next
asset sweep once no live asset has the same bytes.

Retention deletes drafts older than the setting that nothing descends from (no asset, deleted or
not, names them as its parent: a promoted draft and its lineage stay), of finished jobs only.
Each batch is one short write transaction that picks its drafts under the write lock and deletes
them: two processes sweeping at once take turns, and the second finds what the first deleted
already deleted, so neither fails or counts it again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, tuple_, update
from sqlalchemy import select as sa_select
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import Select, SelectOfScalar

from orchestrator import quota
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.events import TERMINAL
from orchestrator.models import Asset, Job

DRAFT_STAGE = "ideation"
UNFINISHED = ("queued", "running")
# Drafts deleted per write transaction: each holds the write lock for a few milliseconds, so a
# history of 100,000 old drafts does not keep the other writers (job claims, submits) waiting.
RETENTION_BATCH = 500
# Seconds between two batches, the write lock free: SQLite's busy handler has a waiting writer
# sleep up to 100 ms between tries, and batches back to back took the lock again before it woke
# (a writer waited out the whole sweep).
BATCH_PAUSE = 0.1


def unfinished_jobs_from(asset_id: str) -> SelectOfScalar[str]:
    """The unfinished jobs that start from the asset (a promote or polish of it): it may not be
    deleted under them, or they would render from an image that answers 410."""
    return select(col(Job.id)).where(col(Job.source_asset_id) == asset_id, col(Job.status).in_(UNFINISHED))


def delete_assets(s: Session, asset_ids: Collection[str]) -> list[str]:
    """Delete those of the assets not deleted yet that no unfinished job starts from; the ids it
    deleted. In a write transaction (`Database.transaction`): a promote committing its job takes
    the write lock too and checks its source again (`JobService.submit`), so no job can start
    from a deleted asset. The caller removes them from its `RecentContent` once committed."""
    if not asset_ids:
        return []
    # The unfinished jobs' sources read once (few: ORCH_MAX_PENDING_JOBS bounds them), not looked
    # up for each asset: once SQLite had statistics (ANALYZE), it judged the index of the sources,
    # nearly all NULL, worthless and read every job for each asset, 170 ms a batch at 5,000 jobs.
    sources = select(col(Job.source_asset_id)).where(col(Job.status).in_(UNFINISHED),
                                                     col(Job.source_asset_id).is_not(None))
    deleting = list(s.exec(select(col(Asset.id)).where(
        col(Asset.id).in_(asset_ids), col(Asset.deleted_at).is_(None), col(Asset.id).not_in(sources))))
    if deleting:
        s.execute(update(Asset).where(col(Asset.id).in_(deleting)).values(deleted_at=utcnow()))
        quota.deleted(s, deleting)  # their projects' usage, in the same transaction
    return deleting


def _expired_drafts(cutoff: datetime, after: tuple[datetime, str] | None, limit: int) -> Select[datetime, str]:
    """The next `limit` drafts retention deletes, oldest first, past `after` (created_at, id)."""
    child = aliased(Asset)
    finished = select(col(Job.id)).where(col(Job.id) == col(Asset.job_id), col(Job.status).in_(TERMINAL)).exists()
    query = select(col(Asset.created_at), col(Asset.id)).where(
        col(Asset.stage) == DRAFT_STAGE, col(Asset.deleted_at).is_(None), col(Asset.created_at) < cutoff,
        ~select(child.id).where(child.parent_id == col(Asset.id)).exists(), finished)
    if after is not None:
        # Past the drafts this sweep kept (those an unfinished job starts from): read once, not at every batch.
        query = query.where(tuple_(col(Asset.created_at), col(Asset.id)) > tuple_(*after))
    # In the index's order, the stage and deleted_at (the same in every row) first: told by
    # created_at alone, PostgreSQL did not see that the index gives that order, and sorted every
    # old draft at each batch (100 ms a batch at 100,000, its statistics from before the sweep).
    return query.order_by(col(Asset.stage), col(Asset.deleted_at), col(Asset.created_at), col(Asset.id)).limit(limit)


def expire_drafts(db: Database, days: int, *, batch: int = RETENTION_BATCH, pause: float = BATCH_PAUSE,
                  stop: threading.Event | None = None,
                  committed: Callable[[list[str]], None] | None = None) -> int:
    """Delete the drafts older than `days` that nothing descends from, of finished jobs, `batch` at
    a time (one write transaction each); how many it deleted. `committed` gets each batch's deleted
    ids once it has committed (the process's `RecentContent.forget`). Once `stop` is set, it ends
    after the batch under way: the rest are the next sweep's."""
    stop = stop or threading.Event()
    deleted = 0
    after: tuple[datetime, str] | None = None
    while True:
        with db.transaction() as s:
            # This host's clock, as the drafts were stamped (by their hosts': days dwarf their drift).
            found = list(s.exec(_expired_drafts(utcnow() - timedelta(days=days), after, batch)))
            gone = delete_assets(s, [asset_id for _, asset_id in found]) if found else []
        deleted += len(gone)
        if gone and committed is not None:
            committed(gone)
        if len(found) < batch:
            return deleted
        after = found[-1][0], found[-1][1]
        if stop.wait(pause):
            return deleted


# How far a file's time may be from its job's row's times and still be taken as made while the job
# ran: the file's time is the storing host's, the row's the database's (or the claiming host's).
CRASH_CLOCK_SLACK = timedelta(seconds=60)


def made_by_jobs(s: Session, found: list[tuple[str, dict[str, Any] | None, float]]) -> set[str]:
    """The sha256s of `found` files (sha256, generation record, modification time) that no row
    names and a job of this database was making when they were written: its engine, stage, source
    and prompt are the record's, it had been created and had not finished then, and it is not a
    success without any asset row (whose rows are what is lost: a database that lost them is not
    this store's whole record). Those are a crash's (a process killed as it stored them, its job
    ended or run again since), which the foreign-database guard does not count
    (`orchestrator.store.unexplained_orphans`). The record names no job (it holds what made the
    image, so that the same request makes the same bytes): the job is found by what it asked.
    One query for the jobs that lived while the files were written (the caller gives files
    written close together), the rest matched here."""
    records = [(sha, record, written) for sha, record, written in found if record
               and all(isinstance(record.get(key), str) for key in ("engine", "stage", "prompt"))]
    if not records:
        return set()
    first = datetime.fromtimestamp(min(written for _, _, written in records), UTC) - CRASH_CLOCK_SLACK
    last = datetime.fromtimestamp(max(written for _, _, written in records), UTC) + CRASH_CLOCK_SLACK
    engines = {str(record["engine"]) for _, record, _ in records}
    prompts = {str(record["prompt"]) for _, record, _ in records}
    lived: dict[tuple[str, str, str | None, str], list[tuple[str, str, datetime, datetime | None]]] = {}
    # The prompts asked in the query, and only the columns matched: a batch whose files lie a year
    # apart fetched every job of that year, whole (50,000 of them: 245 MiB and 25 s for two files).
    # SQLAlchemy's select, run as Core on the session's connection: SQLModel's types a select of
    # four columns at most.
    for job_id, engine, stage, source, params, status, created, finished in s.connection().execute(
            sa_select(col(Job.id), col(Job.engine), col(Job.stage), col(Job.source_asset_id), col(Job.params),
                      col(Job.status), col(Job.created_at), col(Job.finished_at)).where(
                col(Job.engine).in_(engines), col(Job.params)["prompt"].as_string().in_(prompts),
                col(Job.created_at) <= last, or_(col(Job.finished_at).is_(None), col(Job.finished_at) >= first))):
        prompt = params.get("prompt") if isinstance(params, dict) else None
        if isinstance(prompt, str):
            lived.setdefault((engine, stage, source, prompt), []).append((job_id, status, created, finished))
    has_rows: dict[str, bool] = {}

    def kept_rows(job_id: str) -> bool:
        if job_id not in has_rows:
            has_rows[job_id] = s.exec(select(Asset.id).where(col(Asset.job_id) == job_id).limit(1)).first() is not None
        return has_rows[job_id]

    made: set[str] = set()
    for sha, record, written in records:
        parent = record.get("parent_id")
        at = datetime.fromtimestamp(written, UTC)
        key = (record["engine"], record["stage"], parent if isinstance(parent, str) else None, record["prompt"])
        for job_id, status, created, finished in lived.get(key, []):
            during = created <= at + CRASH_CLOCK_SLACK and (finished is None or finished >= at - CRASH_CLOCK_SLACK)
            if during and (status != "succeeded" or kept_rows(job_id)):
                made.add(sha)
                break
    return made
