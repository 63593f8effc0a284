"""jobs.device_began_at: when a running local attempt's work started on the device, by the leases' clock

A running local attempt counted toward its project's device-time quota from its claim, its model's
load included, while its end leaves the load out (an engine that tells its work's start on the
device, `tells_device_start`, counts from there): a draft read seconds of load while it ran that its
end took out again, and one canceled during a long load read all of it until it ended, then 0. The
runner now stamps the time it is told (and each lease renewal stamps it where that write failed), so
a reader counts such an attempt from there, and nothing while its model loads. Dropped, as the lease
is, whenever the job goes back to the queue or ends.

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-07 21:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0039'
down_revision: str | None = '0038'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('device_began_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('device_began_at')
