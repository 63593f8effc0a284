"""assets.bytes, projects.storage_bytes and storage_quota_mb: a per-project storage quota

Existing assets get no size here: the database may live apart from the data dir (PostgreSQL, or
`orchestrator migrate` run elsewhere), and reading 200,000 files' sizes would hold the upgrade's
lock for as long. They stay null, counted as 0, until the service's asset sweep measures them
(`orchestrator.quota.measure`, at start and then hourly), which adds each live one to its project.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07 00:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0029'
down_revision: str | None = '0028'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNMEASURED = sa.text('bytes IS NULL')


def upgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('storage_quota_mb', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('storage_bytes', sa.BigInteger(), nullable=False, server_default='0'))
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bytes', sa.BigInteger(), nullable=True))
    op.create_index('ix_assets_unmeasured', 'assets', ['id'], sqlite_where=UNMEASURED, postgresql_where=UNMEASURED)


def downgrade() -> None:
    op.drop_index('ix_assets_unmeasured', table_name='assets')
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.drop_column('bytes')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('storage_bytes')
        batch_op.drop_column('storage_quota_mb')
