"""What a studio does with its projects' webhook deliveries (`orchestrator.webhooks` sends them):
list them, send one again, and prune the old ones (ORCH_WEBHOOK_RETENTION_DAYS).

A delivery is `pending` (a next attempt is set: due, waiting out a backoff, or claimed by a sender
whose lease that is), `delivered` (`delivered_at` set) or `failed` (neither: given up). Only the
last two have no next attempt, which is what a redelivery and the pruning both test, in the
statement that writes: a pending row, which a sender may claim at any moment, is never deleted
here, nor changed but for its next attempt, brought forward while no sender has it.

A redelivery keeps the row, and so its id (the `webhook-id` receivers dedupe by), and makes it due
now with a fresh attempt budget, to its job's own URL (the request's `webhook_url`), else the
project's current one; any process that runs jobs sends it
at its next look, body and signature made anew (the job as it is then). A pending one is only
hurried: made due now if it waits out a backoff, its attempts and URL kept; one a sender has
claimed (`leased_until` ahead) is left to that send.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, func, update
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from orchestrator.clock import shared_now, utcnow
from orchestrator.db import Database, changed
from orchestrator.errors import DeliveryPending, NoWebhookUrl, not_found
from orchestrator.ids import lowest_id
from orchestrator.models import Job, Project, WebhookDelivery
from orchestrator.schemas import DeliveryStatus, WebhookDeliveryPublic

# Rows deleted per write transaction, and the pause between two, as draft retention's
# (`orchestrator.retention`): a long history does not hold the write lock for the whole prune.
RETENTION_BATCH = 500
# How far a delivery's id's time may be from its `created_at` for `listed`'s range of ids: both are
# read from one clock, microseconds apart, and its `created_at` is never before its id's time, which
# runs ahead of that clock for a while after it stepped back (`webhooks._made`).
ID_SLACK = timedelta(minutes=1)
BATCH_PAUSE = 0.1

_NO_NEXT_ATTEMPT = col(WebhookDelivery.next_attempt_at).is_(None)


def with_status(status: DeliveryStatus) -> ColumnElement[bool]:
    """The rows of a status, as `status_of` tells it; the pending and failed ones as the partial
    indexes of each say them (`models.PENDING_DELIVERY`, `models.FAILED_DELIVERY`), so that a page
    of every project's is read from that index alone."""
    if status == "delivered":
        return col(WebhookDelivery.delivered_at).is_not(None)
    if status == "pending":
        return sa.and_(col(WebhookDelivery.delivered_at).is_(None), col(WebhookDelivery.next_attempt_at).is_not(None))
    # Neither column bare: `next_attempt_at IS NULL AND delivered_at IS NULL` had SQLite (which the
    # service never ANALYZEs) read every given-up row from `ix_webhook_deliveries_due` and sort them
    # for each page (260 to 685 ms for a page beside 300,000 given up).
    return func.coalesce(col(WebhookDelivery.next_attempt_at), col(WebhookDelivery.delivered_at)).is_(None)


def status_of(row: WebhookDelivery) -> DeliveryStatus:
    if row.delivered_at is not None:
        return "delivered"
    return "pending" if row.next_attempt_at is not None else "failed"


def delivery_public(row: WebhookDelivery, project_id: str) -> WebhookDeliveryPublic:
    return WebhookDeliveryPublic(
        id=row.id, project_id=project_id, job_id=row.job_id, type=row.event, url=row.url, status=status_of(row),
        attempts=row.attempts, last_error=row.last_error, next_attempt_at=row.next_attempt_at,
        created_at=row.created_at, delivered_at=row.delivered_at, redelivered_at=row.redelivered_at)


def listed(s: Session, project_id: str | None, *, status: DeliveryStatus | None, job_id: str | None,
           after: str | None, order: str, limit: int, since: datetime | None = None,
           until: datetime | None = None) -> list[WebhookDelivery]:
    """Up to `limit` of the project's deliveries (every project's: None) past the cursor `after`,
    by id in `order` (ids grow with time: a delivery's is made in the transaction that ends its
    job, under the write lock), read from `ix_webhook_deliveries_project`; every project's, from
    the table's key, or for the pending or failed ones `ix_webhook_deliveries_pending` or
    `ix_webhook_deliveries_failed`. `since` and `until`: made (`created_at`) at or after the one,
    before the other, read as a range of those ids (`_made_within`)."""
    stmt = select(WebhookDelivery).limit(limit)
    # A row written without its project (the column is nullable only so that it is not refused) is listed nowhere.
    stmt = stmt.where(col(WebhookDelivery.project_id) == project_id if project_id is not None
                      else col(WebhookDelivery.project_id).is_not(None))
    if status is not None:
        stmt = stmt.where(with_status(status))
    if job_id is not None:
        stmt = stmt.where(col(WebhookDelivery.job_id) == job_id)
    stmt = stmt.where(*_made_within(since, until))
    column = col(WebhookDelivery.id)
    if order == "desc":
        stmt = stmt.order_by(column.desc())
        if after is not None:
            stmt = stmt.where(column < after)
    else:
        stmt = stmt.order_by(column)
        if after is not None:
            stmt = stmt.where(column > after)
    return list(s.exec(stmt).all())


def _made_within(since: datetime | None, until: datetime | None) -> list[ColumnElement[bool]]:
    """Made at or after `since`, before `until`, by `created_at`; and, so that a page is read from
    a range of the index it is read by (by id) rather than from every row after or before the
    window, by ids made within ID_SLACK of those bounds: a delivery's id is made from the clock its
    `created_at` is read from, a moment before it, and its `created_at` is never before its id's
    time (`webhooks._made`). (One stored before that rule, made after a step back, may have an id
    ahead of its `created_at` by as far as the clock stepped back: left out of a range that ends
    between the two.)"""
    column, made = col(WebhookDelivery.id), col(WebhookDelivery.created_at)
    terms: list[ColumnElement[bool]] = []
    if since is not None:
        terms.append(made >= since)
        if since - datetime.min.replace(tzinfo=UTC) > ID_SLACK:  # else no id is before it: nothing to narrow
            terms.append(column >= lowest_id("whd", since - ID_SLACK))
    if until is not None:
        terms.append(made < until)
        if datetime.max.replace(tzinfo=UTC) - until > ID_SLACK:  # `until + ID_SLACK` past year 9999 raised: a 500
            terms.append(column < lowest_id("whd", until + ID_SLACK))
    return terms


def _found(s: Session, delivery_id: str) -> tuple[WebhookDelivery, str, str | None] | None:
    """The delivery, its project and where it goes now: its job's own webhook URL, else its
    project's now."""
    row = s.exec(select(WebhookDelivery, Job.project_id, func.coalesce(col(Job.webhook_url), col(Project.webhook_url)))
                 .join(Job, col(Job.id) == col(WebhookDelivery.job_id))
                 .join(Project, col(Project.id) == col(Job.project_id))
                 .where(col(WebhookDelivery.id) == delivery_id)).first()
    return None if row is None else (row[0], row[1], row[2])


def redeliver(db: Database, delivery_id: str, only_project: str | None = None) -> WebhookDeliveryPublic:
    """Send a delivery now: a delivered or given-up one due again, to its job's own URL, else its
    project's current one,
    with its attempts counted from 0 again; a pending one waiting out its backoff due now, its URL,
    attempts and last error as they are (one a sender has claimed is left to that send). The
    delivery as it is then. 404 for none (or, with `only_project`, one of another project: a
    project key's), `no_webhook_url` when a delivered or given-up one's project has none now."""
    with db.transaction() as s:
        found = _found(s, delivery_id)
        if found is None or only_project not in (None, found[1]):
            raise not_found("webhook delivery", "delivery_id", delivery_id)
        row, project_id, url = found
        if status_of(row) == "pending":
            _hurry(s, row)
            # Read again, not refreshed: what the read found may be no longer (a claim since).
            return delivery_public(s.get_one(WebhookDelivery, delivery_id, populate_existing=True), project_id)
        if url is None:
            raise NoWebhookUrl(f"project '{project_id}' has no webhook_url now: set one (PATCH /v1/projects/"
                               f"{project_id}, admin key) to redeliver to it",
                               details={"delivery_id": delivery_id, "project_id": project_id})
        now = shared_now()
        # Only a row that has no next attempt still: a pending one may be a sender's claim.
        result = s.execute(update(WebhookDelivery).where(col(WebhookDelivery.id) == delivery_id, _NO_NEXT_ATTEMPT)
                           .values(url=url, attempts=0, last_error=None, delivered_at=None, next_attempt_at=now,
                                   redelivered_at=now, leased_until=None))
        if changed(result) != 1:
            raise DeliveryPending(
                f"webhook delivery '{delivery_id}' became pending as it was redelivered: it is sent at its next "
                "attempt (`next_attempt_at`)", details={"delivery_id": delivery_id})
        s.refresh(row)
        return delivery_public(row, project_id)


def _hurry(s: Session, row: WebhookDelivery) -> None:
    """Make a pending row that waits out its backoff due now, in `s` (under the write lock, which
    every claim takes too), nothing else changed: not one due already, nor one a sender claimed
    (its lease ahead), which is being sent; its result decides what comes next. The update is
    conditional on the row as read: a claim made since leaves it to its sender."""
    now = shared_now()
    if row.next_attempt_at is None or row.next_attempt_at <= now:
        return
    if row.leased_until is not None and row.leased_until > now:
        return
    s.execute(update(WebhookDelivery).where(
        col(WebhookDelivery.id) == row.id, col(WebhookDelivery.delivered_at).is_(None),
        col(WebhookDelivery.next_attempt_at) == row.next_attempt_at,
        sa.or_(col(WebhookDelivery.leased_until).is_(None), col(WebhookDelivery.leased_until) <= now))
        .values(next_attempt_at=now, leased_until=None))


def _expired(cutoff: datetime) -> list[ColumnElement[bool]]:
    """Delivered before `cutoff`, and given up after a last start (made, or redelivered) before it:
    each read from `ix_webhook_deliveries_due` (no next attempt, then `delivered_at`)."""
    return [sa.and_(_NO_NEXT_ATTEMPT, col(WebhookDelivery.delivered_at) < cutoff),
            sa.and_(_NO_NEXT_ATTEMPT, col(WebhookDelivery.delivered_at).is_(None),
                    func.coalesce(col(WebhookDelivery.redelivered_at), col(WebhookDelivery.created_at)) < cutoff)]


def expire_deliveries(db: Database, days: int, *, batch: int = RETENTION_BATCH, pause: float = BATCH_PAUSE,
                      stop: threading.Event | None = None) -> int:
    """Delete the deliveries delivered more than `days` ago, and those given up whose last start
    was (given up at most about 20.6 hours after it), `batch` at a time, one write transaction each;
    how many. Never a pending one. Once `stop` is set, it ends after the batch under way."""
    stop = stop or threading.Event()
    deleted = 0
    # This host's clock, as draft retention's: days dwarf the hosts' drift.
    cutoff = utcnow() - timedelta(days=days)
    for expired in _expired(cutoff):
        while True:
            with db.transaction() as s:
                ids = list(s.exec(select(WebhookDelivery.id).where(expired).limit(batch)))
                if ids:
                    # The condition again, in the statement that deletes: what is deleted is what it says.
                    result: Any = s.execute(delete(WebhookDelivery).where(col(WebhookDelivery.id).in_(ids), expired))
                    deleted += changed(result)
            if len(ids) < batch or stop.wait(pause):
                break
        if stop.is_set():
            break
    return deleted
