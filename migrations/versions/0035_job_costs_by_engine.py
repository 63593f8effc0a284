"""ix_ledger_entries_job_id gains the engine: each job's credits by engine, from the index alone

A job that fell back is held (and maybe charged) by each engine it was moved to; its `cost` shows
each engine's share beside the totals (`Ledger.job_costs`), summed per job, kind, settled flag and
engine in one read. Without the engine in the index that read went to every row of a page's jobs.

The index keeps its name and gains a column. On PostgreSQL, `CREATE INDEX` blocks writes to its
table while it is built (seconds for a few hundred thousand rows), as every migration is run before
the service starts.

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-07 11:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0035'
down_revision: str | None = '0034'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ['job_id', 'kind', 'settled', 'amount']
AFTER = ['job_id', 'kind', 'settled', 'engine', 'amount']


def upgrade() -> None:
    op.drop_index('ix_ledger_entries_job_id', table_name='ledger_entries')
    op.create_index('ix_ledger_entries_job_id', 'ledger_entries', AFTER)


def downgrade() -> None:
    op.drop_index('ix_ledger_entries_job_id', table_name='ledger_entries')
    op.create_index('ix_ledger_entries_job_id', 'ledger_entries', BEFORE)
