"""Project-scoped API keys: made, listed, revoked, and found by their secret.

`ORCH_ADMIN_KEY` reaches everything; a project key reaches one project's resources (its jobs,
assets, budget, ledger and spend) and can submit work there, but cannot create projects, change
one, grant credits or manage keys: budgets stay the studio's to set. Only a key's SHA-256 is
stored, and its secret is shown once, when it is made. A plain hash is enough because the secrets
are 256 random bits, not passwords that could be guessed.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlmodel import col, select

from orchestrator import idempotency
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.errors import SECRET_PREFIX, Conflict, NotFound, mask_secrets, not_found
from orchestrator.ids import new_id
from orchestrator.models import ApiKey

# What every secret `create` makes looks like: a token of another shape is refused without the
# database read a lookup costs (a flood of made-up ones would queue behind the real ones).
SECRET_RE = re.compile(re.escape(SECRET_PREFIX) + r"[A-Za-z0-9_-]{43}")
SHOWN_PREFIX = len(SECRET_PREFIX) + 6


def _no_key(key_id: str) -> NotFound:
    if key_id.startswith(SECRET_PREFIX):
        # The secret sent for the id (`.../keys/{key_id}`): said what the path takes.
        return NotFound("no key has that id: the path takes the key's id (`key_...`, from its creation "
                        "or the project's key list), not its secret, which is not repeated here",
                        details={"key_id": mask_secrets(key_id)})
    return not_found("key", "key_id", key_id)


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(db: Database, project_id: str, name: str,
           idempotent: tuple[str, str, str] | None = None) -> tuple[ApiKey, str]:
    """A new key of the project and its secret (the only time the secret exists in clear).
    `idempotent` is the request's (Idempotency-Key, scope, body hash): sent again, the request
    makes no second key, and its answer cannot hold the secret either: a 409 names the key made."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id="", project_id=project_id, name=name, prefix=secret[:SHOWN_PREFIX], secret_sha256=sha256(secret))
    with db.transaction() as s:  # the write lock first: of two racing first requests, one makes the key
        earlier = idempotency.recall(s, *idempotent) if idempotent else None
        if earlier is not None:
            made = earlier.api_key_id
            raise Conflict(
                f"this Idempotency-Key already made key '{made}', whose secret was shown only in that answer: "
                "if it was lost, revoke that key and make another with a new Idempotency-Key",
                details={"key_id": made, "idempotency_key": earlier.key})
        key.id = new_id("key")  # made under the write lock: ids are the list's cursors
        s.add(key)
        if idempotent:
            s.flush()  # the key's row before the row that names it
            idempotency.remember(s, *idempotent, api_key_id=key.id)
    return key, secret


def listed(db: Database, project_id: str, *, after: str | None, limit: int, newest_first: bool = False) -> list[ApiKey]:
    """A page of the project's keys in the order they were made (ids grow with time), or the
    reverse, from past the cursor `after` in that order."""
    column = col(ApiKey.id)
    stmt = select(ApiKey).where(col(ApiKey.project_id) == project_id).limit(limit)
    if newest_first:
        stmt = stmt.order_by(column.desc()).where(column < after) if after else stmt.order_by(column.desc())
    else:
        stmt = stmt.order_by(column).where(column > after) if after else stmt.order_by(column)
    with db.session() as s:
        return list(s.exec(stmt).all())


def get(db: Database, project_id: str, key_id: str) -> ApiKey:
    with db.session() as s:
        key = s.get(ApiKey, key_id)
    if key is None or key.project_id != project_id:
        raise _no_key(key_id)
    return key


def revoke(db: Database, project_id: str, key_id: str) -> ApiKey:
    """Revoke a key (at once: every request looks its key up). Revoking it again changes nothing."""
    with db.transaction() as s:
        key = s.get(ApiKey, key_id)
        if key is None or key.project_id != project_id:
            raise _no_key(key_id)
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            s.add(key)
        return key


def find(db: Database, secret: str) -> ApiKey | None:
    """The live key with this secret, if any."""
    with db.session() as s:
        key = s.exec(select(ApiKey).where(col(ApiKey.secret_sha256) == sha256(secret))).first()
    return key if key is not None and key.revoked_at is None else None


def live(db: Database, key_id: str) -> bool:
    """Whether the key exists and is not revoked."""
    with db.session() as s:
        key = s.get(ApiKey, key_id)
    return key is not None and key.revoked_at is None
