"""jobs.device_seconds, projects.local_seconds_per_day: a per-project quota of local device time

A project's local jobs' device-seconds over the last 24 hours are summed, at a submit that only a
local engine could take, from `ix_jobs_device_seconds` alone: a partial index of the jobs that kept
a count (the few that ran on a local engine), by project and end. Jobs that ended before this
revision keep none (null): their seconds were never stored apart from a metered ledger entry's
note, so a project starts the upgrade having used nothing.

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-07 08:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0034'
down_revision: str | None = '0033'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ON_DEVICE = sa.text('device_seconds IS NOT NULL')


def upgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('local_seconds_per_day', sa.Integer(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('device_seconds', sa.Float(), nullable=True))
    op.create_index('ix_jobs_device_seconds', 'jobs', ['project_id', 'finished_at', 'device_seconds'],
                    sqlite_where=ON_DEVICE, postgresql_where=ON_DEVICE)


def downgrade() -> None:
    op.drop_index('ix_jobs_device_seconds', table_name='jobs')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('device_seconds')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('local_seconds_per_day')
