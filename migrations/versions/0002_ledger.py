"""credit ledger and result cache key

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 07:44:01.355198
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.guard import refuse_while

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('ledger_entries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('kind', sa.String(length=12), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('hold_id', sa.Integer(), nullable=True),
    sa.Column('engine', sa.String(length=100), nullable=True),
    sa.Column('stage', sa.String(length=20), nullable=True),
    sa.Column('unreconciled', sa.Boolean(), nullable=False),
    sa.Column('over_hold', sa.Boolean(), nullable=False),
    sa.Column('note', sa.String(length=500), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['hold_id'], ['ledger_entries.id'], ),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('hold_id', 'kind', name='uq_ledger_settlement')
    )
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ledger_entries_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_entries_hold_id'), ['hold_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_entries_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_entries_project_id'), ['project_id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cache_key', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_cache_key'), ['cache_key'], unique=False)



def downgrade() -> None:
    refuse_while("SELECT count(*) FROM ledger_entries",
                 "{n} ledger entry(ies) (holds, charges, grants) would be dropped with their table by this downgrade; "
                 "export them (GET /v1/projects/{{id}}/ledger) and delete them first, after the idempotency keys "
                 "that name them (DELETE FROM idempotency_keys WHERE ledger_entry_id IS NOT NULL)")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_cache_key'))
        batch_op.drop_column('cache_key')

    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_entries_project_id'))
        batch_op.drop_index(batch_op.f('ix_ledger_entries_job_id'))
        batch_op.drop_index(batch_op.f('ix_ledger_entries_hold_id'))
        batch_op.drop_index(batch_op.f('ix_ledger_entries_created_at'))

    op.drop_table('ledger_entries')
