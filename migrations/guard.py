"""What a revision checks before it changes a database that holds data it would lose or misread."""

from __future__ import annotations

import json
from collections.abc import Callable

import sqlalchemy as sa
from alembic import context, op

from orchestrator.db import MigrationRefused


def refuse_while(sql: str, why: str, counted: Callable[[list[object]], int] | None = None) -> None:
    """Refuse the revision while `sql` finds anything: a count (`SELECT count(*) ...`), or the rows
    `counted` counts. `why` (with `{n}`, the count) says what would be lost and what to do.
    Offline (`--sql`) there is no database to ask: the script is read by whoever runs it."""
    if context.is_offline_mode():
        return
    result = op.get_bind().execute(sa.text(sql))
    found = result.scalar() if counted is None else counted(list(result.scalars()))
    if found:
        raise MigrationRefused(why.format(n=found))


def with_handles(works: list[object]) -> int:
    """How many of `provider_work`'s values (JSON text) name handles: a JSON column stores Python's
    None as the JSON `null`, which `IS NOT NULL` does not tell from work."""
    return sum(1 for work in works if isinstance(work, str) and (json.loads(work) or {}).get("handles"))
