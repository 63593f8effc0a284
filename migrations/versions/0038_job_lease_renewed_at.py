"""jobs.lease_renewed_at: when a running attempt's lease was last taken or renewed, by the leases' clock

A running local attempt counts toward its project's device-time quota from its claim to its lease's
last renewal, and a dead one is counted so by recovery. The renewal was read as the lease's expiry
less the reader's own ORCH_LEASE_SECONDS: a process of another lease length than the holder's
counted it that much off (300 s against a holder's 60: 240 s short, down to 0; 30 s against it:
30 s over, kept on the job once recovery wrote it). The claim and each renewal now stamp the time
itself. Rows without it (claimed before this revision, or by a release without the column during a
rolling upgrade) are counted from the expiry less the reader's lease, as before.

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-07 18:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0038'
down_revision: str | None = '0037'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_renewed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_renewed_at')
