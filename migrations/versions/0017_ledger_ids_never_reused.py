"""ledger_entries on SQLite: AUTOINCREMENT, so an id is never given again

Without it SQLite gives the next entry the largest id plus one: with the newest entry deleted by
hand (as 0015's refusal asks of a job charged twice), the next one took its id, and a client
paging the ledger with `?cursor=` from that id never saw it. PostgreSQL's sequence never reuses one.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01 07:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0017'
down_revision: str | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HOLDLESS_CAPTURE = sa.text("kind = 'capture' AND hold_id IS NULL")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # Dropped and made again around the rebuild: a partial index's WHERE is not one a reflected
    # copy is sure to keep.
    op.drop_index('uq_ledger_holdless_capture', table_name='ledger_entries')
    with op.batch_alter_table('ledger_entries', recreate='always',
                              table_kwargs={'sqlite_autoincrement': autoincrement}):
        pass
    op.create_index('uq_ledger_holdless_capture', 'ledger_entries', ['job_id'], unique=True,
                    sqlite_where=HOLDLESS_CAPTURE, postgresql_where=HOLDLESS_CAPTURE)


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
