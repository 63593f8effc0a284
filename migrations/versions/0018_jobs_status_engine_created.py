"""jobs: an index on (status, engine, created_at, id), for the dispatch's look at each lane

The dispatch ranks each lane's queued jobs on its own (orchestrator.queue): with only
(status, created_at), a lane's oldest jobs were found by walking every queued job of every
engine, and a lane with nothing queued cost as much as the busiest.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0018'
down_revision: str | None = '0017'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_jobs_status_engine_created', 'jobs', ['status', 'engine', 'created_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_jobs_status_engine_created', table_name='jobs')
