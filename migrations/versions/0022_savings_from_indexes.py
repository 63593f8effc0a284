"""/v1/spend's savings from indexes alone

The drafts' engine and job in `ix_assets_stage_size`, and a partial index of the jobs that copied an
earlier result.

Each spend report counted the period's drafts by size reading every draft's row (for its engine
and job) and every job's (to leave out copies): about 100 ms at 100k drafts, growing with the history.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-04 11:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0022'
down_revision: str | None = '0021'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIZES = ['stage', 'width', 'height', 'project_id', 'created_at']


def upgrade() -> None:
    op.drop_index('ix_assets_stage_size', table_name='assets')
    op.create_index('ix_assets_stage_size', 'assets', [*SIZES, 'engine', 'job_id'])
    op.create_index('ix_jobs_cache_hits', 'jobs', ['id'], sqlite_where=sa.text('cache_hit = 1'),
                    postgresql_where=sa.text('cache_hit'))


def downgrade() -> None:
    op.drop_index('ix_jobs_cache_hits', table_name='jobs')
    op.drop_index('ix_assets_stage_size', table_name='assets')
    op.create_index('ix_assets_stage_size', 'assets', SIZES)
