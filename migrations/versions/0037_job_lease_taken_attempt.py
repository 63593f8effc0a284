"""jobs.lease_taken_attempt: the attempt whose claim stamped `lease_taken_at`

Recovery counted a dead local attempt's device-seconds from `lease_taken_at`. A release without
that column (during a rolling upgrade) claims a job again setting `started_at` and the lease alone,
so a stamp an earlier claim left (the job queued again by a stop, a fallback or a recovery) was
taken for its own: hours of device time no attempt held counted toward the project's quota. The
claim now also records its attempt, and the stamp counts only for that attempt. Rows stamped before
this revision have none and are counted from `started_at`, as before 0036.

Revision ID: 0037
Revises: 0036
Create Date: 2026-12-07 14:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0037'
down_revision: str | None = '0036'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_taken_attempt', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_taken_attempt')
