"""jobs.webhook_url: where one job's end is POSTed instead of its project's webhook URL

A pipeline with one project for many callers (a CI per branch) had every job's end go to the one
project URL; a request may now name its own. Kept on the job, so that the end written by any
process (after a fallback, a restart) goes there. Rows kept from before have none (null): their
project's URL, as before.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-07 08:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0033'
down_revision: str | None = '0032'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('webhook_url', sa.String(length=2000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('webhook_url')
