"""idempotency_keys.response: the first answer's body, which a replay answers with

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('response', sa.JSON(), nullable=True))


def downgrade() -> None:
    # Without it a replay answers with what the request made as it is now: nothing is lost.
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_column('response')
