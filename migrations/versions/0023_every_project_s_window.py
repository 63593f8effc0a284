"""A spend report of every project's window read by its time: an index on the charges' kind and time

`/v1/spend?from=...&to=...` without a project filtered the charges by kind and time. SQLite,
which is never told the tables' statistics, took the kind's equality on `ix_ledger_open_holds`
and walked every capture ever written: 790 ms for a month at 100k captures over three years,
growing with the history. This index holds what the report reads (kind, time, then its groups
and sums), so the window is read from it alone: 19 ms.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-04 22:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0023'
down_revision: str | None = '0022'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_ledger_charges_window', 'ledger_entries',
                    ['kind', 'created_at', 'project_id', 'engine', 'stage', 'job_id', 'unreconciled', 'amount'])


def downgrade() -> None:
    op.drop_index('ix_ledger_charges_window', table_name='ledger_entries')
