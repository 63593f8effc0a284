"""ledger_entries: holds marked settled; indexes for the budget check, /metrics and the spend report

So that they do not read the whole history.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('ledger_entries') as batch_op:
        batch_op.add_column(sa.Column('settled', sa.Boolean(), nullable=False, server_default=sa.false()))
    # Every hold already settled says so, in the same transaction as the column appears.
    entries = sa.table('ledger_entries', sa.column('id', sa.Integer), sa.column('kind', sa.String),
                       sa.column('hold_id', sa.Integer), sa.column('settled', sa.Boolean))
    settlement = entries.alias('settlement')
    op.execute(entries.update()
               .where(entries.c.kind == 'hold',
                      sa.exists().where(settlement.c.hold_id == entries.c.id,
                                        settlement.c.kind.in_(('capture', 'release'))))
               .values(settled=True))
    op.create_index('ix_ledger_open_holds', 'ledger_entries', ['kind', 'settled', 'project_id'])
    op.create_index('ix_ledger_project_window', 'ledger_entries', ['project_id', 'kind', 'created_at', 'amount'])
    op.create_index('ix_ledger_totals', 'ledger_entries', ['kind', 'engine', 'stage', 'unreconciled', 'amount'])
    op.create_index('ix_jobs_totals', 'jobs', ['stage', 'engine', 'status'])
    op.create_index('ix_assets_stage_size', 'assets', ['stage', 'width', 'height', 'project_id', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_assets_stage_size', table_name='assets')
    op.drop_index('ix_jobs_totals', table_name='jobs')
    op.drop_index('ix_ledger_totals', table_name='ledger_entries')
    op.drop_index('ix_ledger_project_window', table_name='ledger_entries')
    op.drop_index('ix_ledger_open_holds', table_name='ledger_entries')
    with op.batch_alter_table('ledger_entries') as batch_op:
        batch_op.drop_column('settled')
