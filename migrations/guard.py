"""What a revision checks before it changes a database that holds data it would lose or misread."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import context, op

from orchestrator.db import MigrationRefused

# How long the service replays an idempotency key's request (`orchestrator.idempotency.TTL`, kept
# here as it was when these revisions were written): an older row replays nothing, and is dropped.
KEY_LIFETIME = timedelta(hours=48)
# The first release that kept a non-ASCII key as sent (commit 94ccff5, at 0013): the releases
# before kept it, and look it up, as its UTF-8 bytes read as latin-1 (`clé` as `clÃ©`).
READ_AS_SENT_FROM = datetime(2026, 11, 30, 5, 39, 15, tzinfo=UTC)
KEYS = sa.table("idempotency_keys", sa.column("key", sa.String), sa.column("job_id", sa.String),
                sa.column("api_key_id", sa.String), sa.column("created_at", sa.DateTime(timezone=True)))
# Said of the keys `live_keys` finds, and what to wait for.
LIVE = (f"within the last {KEY_LIFETIME.total_seconds() / 3600:g} h, or for a job still queued or running,")
UNTIL_DEAD = f"wait until they are {KEY_LIFETIME.total_seconds() / 3600:g} h old and their jobs have ended"
JOBS = sa.table("jobs", sa.column("id", sa.String), sa.column("status", sa.String))


def live_keys(*where: Any, what: Any = None) -> sa.Select[Any]:
    """The idempotency keys (`what`: a count of them unless told) a retry could still replay: those
    of the last 48 h, and any of a job still queued or running, which the service keeps as long
    (a retry during a long backlog must not make a second job)."""
    unfinished = sa.select(JOBS.c.id).where(JOBS.c.status.in_(("queued", "running")))
    recent = KEYS.c.created_at >= datetime.now(UTC) - KEY_LIFETIME
    return (sa.select(sa.func.count() if what is None else what).select_from(KEYS)
            .where(sa.or_(recent, KEYS.c.job_id.in_(unfinished)), *where))


def refuse_while(sql: str | sa.Executable, why: str, counted: Callable[[list[object]], int] | None = None) -> None:
    """Refuse the revision while `sql` finds anything: a count (`SELECT count(*) ...`), or the rows
    `counted` counts. `why` (with `{n}`, the count) says what would be lost and what to do.
    Offline (`--sql`) there is no database to ask: the script is read by whoever runs it."""
    if context.is_offline_mode():
        return
    result = op.get_bind().execute(sa.text(sql) if isinstance(sql, str) else sql)
    found = result.scalar() if counted is None else counted(list(result.scalars()))
    if found:
        raise MigrationRefused(why.format(n=found))


def with_handles(works: list[object]) -> int:
    """How many of `provider_work`'s values (JSON text) name handles: a JSON column stores Python's
    None as the JSON `null`, which `IS NOT NULL` does not tell from work."""
    return sum(1 for work in works if isinstance(work, str) and (json.loads(work) or {}).get("handles"))
