"""ix_assets_stage_live: a stage's live assets oldest first, for draft retention (ORCH_DRAFT_RETENTION_DAYS)

Deleted drafts lie apart from the live ones in it, so retention's batches do not read again past
the drafts the batches before them deleted, nor sort the old drafts at each batch.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-06 21:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0025'
down_revision: str | None = '0024'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None



def upgrade() -> None:
    op.create_index('ix_assets_stage_live', 'assets', ['stage', 'deleted_at', 'created_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_assets_stage_live', table_name='assets')
