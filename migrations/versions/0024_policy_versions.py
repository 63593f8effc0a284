"""policy_versions: one last good version of each policy file for every process of a service

Each process kept the last good version of a policy file it had read itself. An edit followed by
a refused one, before every process had read the first, left them on different versions until
the file was mended: a process that missed an edit making a policy private went on routing that
policy's projects to the cloud. The processes now keep the newest good version here, and serve it
while the file is refused.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-06 05:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0024'
down_revision: str | None = '0023'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'policy_versions',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('source', sa.Text(), nullable=False),
        sa.Column('content', sa.LargeBinary(), nullable=True),
        sa.Column('content_hash', sa.String(length=16), nullable=True),
        sa.Column('read_ns', sa.BigInteger(), nullable=False),
        sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('policy_versions')
