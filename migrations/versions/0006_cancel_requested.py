"""jobs.cancel_requested_at: a cancel asked of a job another process holds

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 14:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.guard import refuse_while

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cancel_requested_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Without the column the job runs on (and may be billed) though its client was told it would stop.
    refuse_while("SELECT count(*) FROM jobs WHERE cancel_requested_at IS NOT NULL AND status IN ('queued', 'running')",
                 "{n} unfinished job(s) have a cancel asked that the schema before 0006 cannot record; let them "
                 "end before this downgrade")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('cancel_requested_at')
