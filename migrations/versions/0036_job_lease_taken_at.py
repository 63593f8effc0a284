"""jobs.lease_taken_at: when a running attempt's claim took its lease, by the leases' clock

Recovery counts a dead local attempt's device-seconds from its start to its lease's last renewal.
The start was `started_at`, the claiming host's clock, and the renewal the database's on
PostgreSQL: a host an hour off counted an hour more or less. The claim now also stamps the time it
took the lease by the clock it stamps the lease with. Rows claimed before this revision have none
and are counted from `started_at`, as before.

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-07 13:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0036'
down_revision: str | None = '0035'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_taken_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_taken_at')
