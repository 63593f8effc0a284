"""webhook_deliveries.project_id and redelivered_at: a project's deliveries listed, and sent again

`GET /v1/projects/{id}/webhook-deliveries` reads a project's deliveries newest first from
`ix_webhook_deliveries_project` (project_id, id): through the jobs, a page read and sorted every
delivery of the project. The rows made before get their job's project. `POST
/v1/webhook-deliveries/{id}/redeliver` makes a delivered or given-up delivery due again; retention
(ORCH_WEBHOOK_RETENTION_DAYS) counts a given-up one's age from its last redelivery, when it has one.
Retention's reads need no index of their own: delivered and given-up rows have no next attempt,
and `ix_webhook_deliveries_due` (next_attempt_at, delivered_at) finds the old delivered ones (NULL,
then a range of delivered_at) and the given-up ones (NULL, NULL).

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07 00:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0028'
down_revision: str | None = '0027'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('project_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('redelivered_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE webhook_deliveries SET project_id = "
               "(SELECT jobs.project_id FROM jobs WHERE jobs.id = webhook_deliveries.job_id)")
    op.create_index('ix_webhook_deliveries_project', 'webhook_deliveries', ['project_id', 'id'])


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_project', table_name='webhook_deliveries')
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_column('redelivered_at')
        batch_op.drop_column('project_id')
