"""projects.archived_at: a project its studio archived (it takes no new jobs; its history stays)

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.guard import refuse_while

revision: str = '0021'
down_revision: str | None = '0020'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('archived_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Without the column an archived project takes new jobs, and spends, again: refused instead.
    refuse_while("SELECT count(*) FROM projects WHERE archived_at IS NOT NULL",
                 "{n} project(s) are archived (PATCH /v1/projects/{{id}} with \"archived\": true); the schema before "
                 "0021 would take new jobs for them, so this downgrade is refused (unarchive them first)")
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('archived_at')
