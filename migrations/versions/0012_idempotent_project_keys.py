"""idempotency keys record the project key a POST made

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29 21:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.guard import KEYS, LIVE, UNTIL_DEAD, live_keys, refuse_while

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FK_API_KEY = 'fk_idempotency_keys_api_key_id_api_keys'


def upgrade() -> None:
    # A retried `POST /v1/projects/{id}/keys` made a second live key whose secret nobody saw.
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('api_key_id', sa.String(length=40), nullable=True))
        batch_op.create_foreign_key(_FK_API_KEY, 'api_keys', ['api_key_id'], ['id'])


def downgrade() -> None:
    # They go (the schema before cannot tell which project key made them): a retry of one would run
    # again, a second project key made whose secret nobody sees.
    refuse_while(live_keys(KEYS.c.api_key_id.is_not(None)),
                 f"{{n}} request(s) made with a project key {LIVE} can still be retried with their "
                 f"Idempotency-Key, and this downgrade would drop them (a retry would run again); {UNTIL_DEAD}")
    op.execute("DELETE FROM idempotency_keys WHERE api_key_id IS NOT NULL")
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_constraint(_FK_API_KEY, type_='foreignkey')
        batch_op.drop_column('api_key_id')
