"""Idempotency keys: a creating POST sent again with the same key and body answers with what the
first one made, and makes nothing new.

A key is scoped by the request path, so one client key can serve several endpoints. The row keeps
a hash of the body (the same key with another body is a 409), what the request created: a job,
a project, a grant's ledger entry, or a project key (whose secret cannot be shown again: its
replay is a 409 that names it), and the body it was first answered with, which is what a replay
answers (API.md: "the original response"), however the job or project has changed since. The
caller looks the key up a second time inside its write transaction, after the lock that
serialises its kind of write; on PostgreSQL two first requests racing past that look-up meet at
the primary key instead (`IntegrityError`: read it again).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, or_
from sqlmodel import Session, col, select

from orchestrator.clock import utcnow
from orchestrator.db import Database, changed
from orchestrator.errors import IdempotencyConflict
from orchestrator.models import IdempotencyKey, Job
from policies.schema import PRIVACY_LOCAL, PRIVACY_TAG, is_private

# Kept at least this long; a key whose job has not finished is kept until it has.
TTL = timedelta(hours=48)


class Digest(str):
    """A request body's hash, of the fields it sets to other than their defaults: a release that
    adds a field with a default hashes the bodies of earlier retries as before (hashed with every
    default, each such release made every retry across it a 409)."""

    # The same body as hashed with every default, as keys stored by earlier releases were (kept
    # 48 h): a retry across the upgrade is still the same request.
    legacy: str
    # The hashes of the same request's other forms (`request_hash`'s `forms`), which keys stored
    # by earlier releases may hold.
    also: tuple[str, ...] = ()


def _sha256(fields: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_hash(body: BaseModel, *forms: BaseModel) -> Digest:
    """`body`'s digest; `forms` are the same request as written otherwise (a default that depends
    on a setting, written out), whose hashes match too."""
    fields = body.model_dump(mode="json", exclude_defaults=True)
    digest = Digest(_sha256(_private_as_one(fields)))
    # Without the fields added since at their default, as those releases' bodies were.
    later: frozenset[str] = getattr(body, "added_since_whole_hashes", frozenset())
    digest.legacy = _sha256({k: v for k, v in body.model_dump(mode="json").items() if k in fields or k not in later})
    # As sent, as keys stored before the privacy tag's value was read as one were hashed.
    sent = (_sha256(fields),) if _private_as_one(fields) != fields else ()
    digest.also = sent + tuple(h for other in map(request_hash, forms) for h in (other, other.legacy, *other.also))
    return digest


def _private_as_one(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with the privacy tag's value as the job records it: `Local` and ` local ` make
    the same job as `local`, so they are the same request (a retry spelled otherwise was a 409)."""
    tags = fields.get("tags")
    if not isinstance(tags, dict) or not isinstance(tags.get(PRIVACY_TAG), str) or not is_private(tags):
        return fields
    return {**fields, "tags": {**tags, PRIVACY_TAG: PRIVACY_LOCAL}}


def recall(s: Session, key: str, scope: str, digest: str) -> IdempotencyKey | None:
    """The earlier request with this key, or None; 409 when it came with another body."""
    same = (digest, getattr(digest, "legacy", digest), *getattr(digest, "also", ()))
    row = s.get(IdempotencyKey, (key, scope))
    if row is not None and row.request_hash not in same:
        raise IdempotencyConflict("this Idempotency-Key was used with a different request body",
                                  details={"idempotency_key": key})
    return row


def remember(s: Session, key: str, scope: str, digest: str, *, job_id: str | None = None,
             project_id: str | None = None, ledger_entry_id: int | None = None,
             api_key_id: str | None = None, response: BaseModel | None = None) -> None:
    """Record the key in the transaction that makes its thing; `response` is the body the
    request is answered with, kept for its replays."""
    if sum(x is not None for x in (job_id, project_id, ledger_entry_id, api_key_id)) != 1:
        raise ValueError("an idempotency key records exactly one created thing")
    s.add(IdempotencyKey(key=key, scope=scope, request_hash=digest, job_id=job_id, project_id=project_id,
                         ledger_entry_id=ledger_entry_id, api_key_id=api_key_id,
                         response=None if response is None else response.model_dump(mode="json")))


def first_answer(db: Database, key: str, scope: str) -> dict[str, Any] | None:
    """The body a replayed request was first answered with; None for a key stored without one."""
    with db.session() as s:
        row = s.get(IdempotencyKey, (key, scope))
        return None if row is None else row.response


def forget_expired(db: Database, now: datetime | None = None) -> int:
    """Delete keys older than `TTL`, except those of unfinished jobs: a retry during a long
    backlog must not make a second job (and a second hold)."""
    cutoff = (now or utcnow()) - TTL
    finished = select(Job.id).where(col(Job.status).in_(("succeeded", "failed", "canceled")))
    with db.transaction() as s:
        result = s.execute(delete(IdempotencyKey).where(
            col(IdempotencyKey.created_at) < cutoff,
            or_(col(IdempotencyKey.job_id).is_(None), col(IdempotencyKey.job_id).in_(finished))))
    return changed(result)
