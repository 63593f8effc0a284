"""engine_health.succeeded_at: when an engine's latest success counted happened

Observations reach the table in the order processes tell them, not the order they happened in:
failures a process told after another's success, made before it, were counted after it and opened
the circuit of an engine that worked since; a success told late closed a circuit failures made
after it had opened. Rows kept from before have none (null): the next success sets it.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-07 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0032'
down_revision: str | None = '0031'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('engine_health', schema=None) as batch_op:
        batch_op.add_column(sa.Column('succeeded_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('engine_health', schema=None) as batch_op:
        batch_op.drop_column('succeeded_at')
