"""idempotency keys for project creation and grants

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 12:43:37.120558
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.guard import KEY_LIFETIME, KEYS, live_keys, refuse_while

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FK_PROJECT = 'fk_idempotency_keys_project_id_projects'
_FK_LEDGER = 'fk_idempotency_keys_ledger_entry_id_ledger_entries'


def upgrade() -> None:
    # A key now records a job, a project or a grant's ledger entry.
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('project_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('ledger_entry_id', sa.Integer(), nullable=True))
        batch_op.alter_column('job_id', existing_type=sa.VARCHAR(length=40), nullable=True)
        batch_op.create_foreign_key(_FK_PROJECT, 'projects', ['project_id'], ['id'])
        batch_op.create_foreign_key(_FK_LEDGER, 'ledger_entries', ['ledger_entry_id'], ['id'])


def downgrade() -> None:
    refuse_while(live_keys(KEYS.c.job_id.is_(None)),
                 f"{{n}} project creation(s) or grant(s) within the last {KEY_LIFETIME.total_seconds() / 3600:g} h "
                 "can still be retried with their Idempotency-Key, and this downgrade would drop them (a retry would "
                 "create or grant again); wait until they are that old")
    # Keys of projects and grants have no job to point at: they go.
    op.execute("DELETE FROM idempotency_keys WHERE job_id IS NULL")
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_constraint(_FK_LEDGER, type_='foreignkey')
        batch_op.drop_constraint(_FK_PROJECT, type_='foreignkey')
        batch_op.alter_column('job_id', existing_type=sa.VARCHAR(length=40), nullable=False)
        batch_op.drop_column('ledger_entry_id')
        batch_op.drop_column('project_id')
