"""ix_jobs_finished_at: the jobs that ended since a time, for /metrics' histograms

Each scrape reads only the jobs that ended since its process's watermark (orchestrator.metrics):
without the index, that read went through the whole jobs table, as the full read did.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-06 23:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0026'
down_revision: str | None = '0025'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None



def upgrade() -> None:
    op.create_index('ix_jobs_finished_at', 'jobs', ['finished_at'])


def downgrade() -> None:
    op.drop_index('ix_jobs_finished_at', table_name='jobs')
