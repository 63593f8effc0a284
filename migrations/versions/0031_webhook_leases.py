"""webhook_deliveries.leased_until, and the pending and failed deliveries' indexes for the list across projects

`POST /v1/webhook-deliveries/{id}/redeliver` makes a pending delivery waiting out its backoff due
at once; both that row and one a sender has claimed have a `next_attempt_at` ahead (the claim's
lease end), and only the first may be moved (the second would be sent twice at a time). A claim
now writes its lease end here too, and the send's result, a stop's giving back and a give-up clear
it. A row claimed by a process from before the upgrade has none: a redeliver within that claim's
minute reads it as waiting and makes it due, and it may be sent twice (at least once, as ever).

`GET /v1/webhooks/deliveries` lists every project's deliveries newest first, by id; with
`?status=pending` (or `failed`) it read the table's key past every delivered row, nearly all of
them (41 ms for a page in 100,000 on SQLite). A partial index of each status's rows by id reads only
those: one of every undelivered row had a page of pending ones read past each given-up one, and
SQLite read the given-up ones from `ix_webhook_deliveries_due` and sorted them all (a page beside
300,000 given up: 220 to 685 ms; from these, about 1 ms). The failed one's condition is the one
`orchestrator.webhook_deliveries.with_status` writes, one `ix_webhook_deliveries_due` cannot answer.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-07 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0031'
down_revision: str | None = '0030'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text('delivered_at IS NULL AND next_attempt_at IS NOT NULL')
FAILED = sa.text('coalesce(next_attempt_at, delivered_at) IS NULL')


def upgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('leased_until', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_webhook_deliveries_pending', 'webhook_deliveries', ['id'], sqlite_where=PENDING,
                    postgresql_where=PENDING)
    op.create_index('ix_webhook_deliveries_failed', 'webhook_deliveries', ['id'], sqlite_where=FAILED,
                    postgresql_where=FAILED)


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_failed', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_pending', table_name='webhook_deliveries')
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_column('leased_until')
