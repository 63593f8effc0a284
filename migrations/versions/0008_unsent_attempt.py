"""jobs.unsent_attempt: the attempt that has not yet sent a request that can bill

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 23:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Null on every existing row: a job running during the upgrade is treated as possibly billed.
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.add_column(sa.Column('unsent_attempt', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_column('unsent_attempt')
