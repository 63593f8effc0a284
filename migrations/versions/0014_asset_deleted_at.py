"""assets.deleted_at: an asset its studio deleted (its row kept for lineage and the ledger)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.guard import refuse_while

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Without the column a deleted asset reads as a live one whose file is gone: refuse rather
    # than show a studio's deleted images again.
    refuse_while("SELECT count(*) FROM assets WHERE deleted_at IS NOT NULL",
                 "{n} asset(s) were deleted (DELETE /v1/assets/{{id}}); the schema before 0014 cannot tell them "
                 "from live ones, so this downgrade is refused")
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
