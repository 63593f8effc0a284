"""jobs.stored_images: the images a running attempt of a remote engine stores, before their rows

A paid job whose process died after its image files were written (and fsynced) but before the
transaction naming them committed was failed `interrupted` at recovery, its estimate captured
unreconciled and its files swept as orphans: the studio paid for images it never got. The runner
now commits what it is about to store (each file's sha256 and record, the engine's reported cost)
on the row before the first file; recovery adopts those files (rows, the job's end, its charge
settled once) and the orphan sweep leaves the files a running job's row names. Null: nothing
stored yet, or nothing to adopt.

Revision ID: 0040
Revises: 0039
Create Date: 2026-12-07 21:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0040'
down_revision: str | None = '0039'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stored_images', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('stored_images')
