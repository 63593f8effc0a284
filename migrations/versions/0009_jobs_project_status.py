"""jobs: indexes for counting a project's unfinished jobs at submit, and for taking its queued jobs in turns

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 02:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_jobs_project_status', 'jobs', ['project_id', 'status'])
    op.create_index('ix_jobs_status_project_created', 'jobs', ['status', 'project_id', 'created_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_jobs_status_project_created', table_name='jobs')
    op.drop_index('ix_jobs_project_status', table_name='jobs')
