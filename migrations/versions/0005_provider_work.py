"""jobs.provider_work: what a provider accepted, for reattaching after a crash

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 13:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.guard import refuse_while, with_handles

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('provider_work', sa.JSON(), nullable=True))


def downgrade() -> None:
    # Without the record a recovery releases the hold of work a provider still has (and bills).
    refuse_while("SELECT CAST(provider_work AS TEXT) FROM jobs WHERE status IN ('queued', 'running')",
                 "{n} unfinished job(s) have work at a provider that only their provider_work column finds again; "
                 "let them finish (or cancel them) before this downgrade", counted=with_handles)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('provider_work')
