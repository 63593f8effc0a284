"""projects.webhook_url and webhook_deliveries: each job's end POSTed to its project's URL (an outbox)

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06 23:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0027'
down_revision: str | None = '0026'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('webhook_url', sa.String(length=2000), nullable=True))
    op.create_table('webhook_deliveries',
                    sa.Column('id', sa.String(length=40), nullable=False),
                    sa.Column('job_id', sa.String(length=40), nullable=False),
                    sa.Column('url', sa.String(length=2000), nullable=False),
                    sa.Column('event', sa.String(length=20), nullable=False),
                    sa.Column('attempts', sa.Integer(), nullable=False),
                    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
                    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
                    sa.Column('last_error', sa.String(length=500), nullable=True),
                    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
                    sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
                    sa.PrimaryKeyConstraint('id'))
    op.create_index('ix_webhook_deliveries_job_id', 'webhook_deliveries', ['job_id'])
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['next_attempt_at', 'delivered_at'])


def downgrade() -> None:
    op.drop_table('webhook_deliveries')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('webhook_url')
