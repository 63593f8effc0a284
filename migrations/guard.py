"""What a revision checks before it changes a database that holds data it would lose or misread."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from orchestrator.db import MigrationRefused


def refuse_while(count_sql: str, why: str) -> None:
    """Refuse the revision while `count_sql` counts any row: `why` (with `{n}`, the count) says
    what would be lost and what to do. Offline (`--sql`) there is no database to ask: the script is
    read by whoever runs it."""
    if context.is_offline_mode():
        return
    found = op.get_bind().execute(sa.text(count_sql)).scalar()
    if found:
        raise MigrationRefused(why.format(n=found))
