"""the indexes of 0009 and 0010 as they were finally written, on installs that ran a first version

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29 22:45:00.000000

0009 gained `ix_jobs_status_project_created` and 0010 replaced `ix_assets_stage` with
`ix_assets_stage_size` after they first landed: a database migrated by those first versions kept
the old indexes (dispatch and the savings report slower) and could not be downgraded through them.
On any other database this changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS ix_jobs_status_project_created "
               "ON jobs (status, project_id, created_at, id)")
    op.execute("CREATE INDEX IF NOT EXISTS ix_assets_stage_size "
               "ON assets (stage, width, height, project_id, created_at)")
    op.execute("DROP INDEX IF EXISTS ix_assets_stage")


def downgrade() -> None:
    pass  # 0012's intended state: nothing to undo
