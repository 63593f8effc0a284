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

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.guard import refuse_while

revision: str = '0040'
down_revision: str | None = '0039'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stored_images', sa.JSON(), nullable=True))


def _listing_images(values: list[object]) -> int:
    """How many of the column's values (JSON text) list images: a JSON column stores Python's None
    as the JSON `null`, which `IS NOT NULL` does not tell from a record."""
    found = 0
    for value in values:
        try:
            stored = json.loads(value) if isinstance(value, str) else None
        except ValueError:
            continue
        found += bool(isinstance(stored, dict) and isinstance(stored.get("images"), list) and stored["images"])
    return found


def downgrade() -> None:
    # Without the column the release before fails such a job `interrupted` (its estimate captured as
    # possibly billed) and sweeps the files its images were stored in, made and paid for.
    refuse_while("SELECT CAST(stored_images AS TEXT) FROM jobs WHERE status = 'running'",
                 "{n} running job(s) list images their dead process stored, which only this column lets a "
                 "recovery adopt; start this release until they have ended before this downgrade",
                 counted=_listing_images)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('stored_images')
