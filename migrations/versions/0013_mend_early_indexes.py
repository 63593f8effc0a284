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

from migrations.guard import KEYS, LIVE, READ_AS_SENT_FROM, UNTIL_DEAD, live_keys, refuse_while

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
    # The indexes are 0012's intended state: nothing to undo. But the releases before this one look
    # a non-ASCII key up as misread, and the upgrade back (0019) rewrites every key it finds so: a
    # key stored as sent since would no longer replay its request (a retry ran again).
    refuse_while(live_keys(KEYS.c.created_at >= READ_AS_SENT_FROM, what=KEYS.c.key),
                 f"{{n}} Idempotency-Key(s) with non-ASCII characters, stored {LIVE} are kept as sent, which the "
                 f"releases before 0013 do not find (a retry would run again); {UNTIL_DEAD}",
                 counted=lambda keys: sum(1 for key in keys if isinstance(key, str) and not key.isascii()))
