"""idempotency_keys: keys stored as their UTF-8 bytes read as latin-1 are stored as sent

Releases before 2026-11-30 05:39 UTC kept a non-ASCII `Idempotency-Key` as the header's bytes
read as latin-1 (`clé` as `clÃ©`). The service looked such keys up in that form too, for good,
so a key sent since that happens to be another's misread form (`Ã©` and `é`) replayed that other
request. Rewritten once here, at the upgrade, the fallback goes. From a database at 0012 or before,
every such key (only releases that misread keys ran on it, whatever the date); from 0013 to 0018,
only keys stored before the releases that read keys as sent existed: one stored since is as its
client sent it (`Ã©` itself). (0013 was served by releases of both kinds, so its date decides: a
release that misread keys kept running past that date at 0013 left keys this does not mend.)

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-02 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from migrations.guard import READ_AS_SENT_FROM

revision: str = '0019'
down_revision: str | None = '0018'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = sa.table('idempotency_keys', sa.column('key', sa.String), sa.column('scope', sa.String),
                sa.column('created_at', sa.DateTime(timezone=True)))
# No key stored since READ_AS_SENT_FROM (`migrations.guard`) was misread.
# That release's schema: a database still before it was served only by releases that misread keys
# (a studio that kept one running past that date stored misread keys after it too).
FIRST_REVISION_READ_AS_SENT = 13


def as_sent(stored: str) -> str | None:
    """The key a client sent, for a key stored in its misread form; None for any other key."""
    if stored.isascii():
        return None
    try:
        sent = stored.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):  # `é` itself, or a character past latin-1
        return None
    return sent if sent != stored else None


def upgrade() -> None:
    if context.is_offline_mode():  # no rows to read: `alembic upgrade --sql` writes only the schema
        return
    bind = op.get_bind()
    stored = {(key, scope) for key, scope in bind.execute(sa.select(KEYS.c.key, KEYS.c.scope)).all()}
    before = context.config.attributes.get("upgraded_from") or ()  # set by migrations/env.py
    only_misreading = bool(before) and all(head.isdigit() and int(head) < FIRST_REVISION_READ_AS_SENT
                                           for head in before)
    query = sa.select(KEYS.c.key, KEYS.c.scope)
    misread = bind.execute(query if only_misreading else query.where(KEYS.c.created_at < READ_AS_SENT_FROM)).all()
    for key, scope in sorted(misread):
        sent = as_sent(key)
        # Where the sent form is stored too, both stay: that one was sent so by a client since.
        if sent is not None and (sent, scope) not in stored:
            bind.execute(KEYS.update().where(KEYS.c.key == key, KEYS.c.scope == scope).values(key=sent))


def downgrade() -> None:
    # The releases before read both forms: keys stored as sent are found as they are.
    pass
