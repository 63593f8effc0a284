"""ledger_entries: one capture without a hold per job (metered local work)

NULL hold ids are never equal in `uq_ledger_settlement`, so nothing in the database stopped a
second hold-less capture of one job; only the runner's guarded update did.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30 15:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from orchestrator.db import MigrationRefused

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = sa.text("kind = 'capture' AND hold_id IS NULL")


def upgrade() -> None:
    # A database that already holds a job charged twice is the operator's to mend (one of the two
    # entries is money taken twice): say which jobs rather than fail on the index.
    # The newest entry of each is the one kept: with the newest of the ledger deleted, SQLite (before
    # 0017) gave its id to the next entry, which a client paging from that id never saw.
    twice = [] if context.is_offline_mode() else op.get_bind().execute(sa.text(
        "SELECT job_id, max(id) FROM ledger_entries WHERE kind = 'capture' AND hold_id IS NULL "
        "AND job_id IS NOT NULL GROUP BY job_id HAVING count(*) > 1 ORDER BY job_id")).all()
    if twice:
        named = ", ".join(f"{job_id} (keep entry {kept})" for job_id, kept in twice[:20])
        more = f" and {len(twice) - 20} more jobs" if len(twice) > 20 else ""
        raise MigrationRefused(f"jobs charged more than once without a hold: {named}{more}; delete each one's "
                               "other hold-less capture entries (that gives the money back; no grant is needed) "
                               "before this upgrade")
    op.create_index('uq_ledger_holdless_capture', 'ledger_entries', ['job_id'], unique=True,
                    sqlite_where=WHERE, postgresql_where=WHERE)


def downgrade() -> None:
    op.drop_index('uq_ledger_holdless_capture', table_name='ledger_entries')
