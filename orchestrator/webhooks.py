"""Job webhooks: the end of each job of a project with a `webhook_url`, POSTed there.

An outbox: `job_ended` writes a `WebhookDelivery` row in the transaction that ends the job, so a
crash between the end and its POST loses nothing, and `Deliverer` (in every process that runs jobs)
sends the due rows. A row is claimed by moving its `next_attempt_at` past the send's timeout with
an update conditional on the value read: of two processes, one update changes the row, on SQLite
and PostgreSQL alike. Delivery is at least once (a sender that dies after the receiver answered
sends it again): receivers dedupe by the `webhook-id` header.

Signed as Standard Webhooks (https://www.standardwebhooks.com) say: `webhook-signature` is
`v1,` and the base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}`, keyed by
ORCH_WEBHOOK_SECRET (a `whsec_` secret's base64 decoded, as those libraries read it; else its
UTF-8 bytes). Without the setting they go unsigned.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
from sqlalchemy import func, update
from sqlmodel import Session, col, select

from orchestrator.clock import shared_now
from orchestrator.db import Database, changed
from orchestrator.ids import new_id
from orchestrator.models import Project, UTCDateTime, WebhookDelivery
from orchestrator.outage import Outage

log = logging.getLogger(__name__)

EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "canceled": "job.canceled"}
SEND_TIMEOUT_SECONDS = 10.0
# A claim outlasts the send it is for: a row is due again only once its sender cannot still be sending.
LEASE_SECONDS = 60.0
# The waits after each failed attempt; after the last, the delivery is given up (9 attempts, the
# last about 20.6 hours after the first).
BACKOFF_SECONDS = (10, 60, 300, 1800, 7200, 21600, 21600, 21600)
BATCH = 20  # due rows read at a time


def signing_key(secret: str) -> bytes:
    """The HMAC key of ORCH_WEBHOOK_SECRET (whose `whsec_` form the settings checked is base64)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def signature(key: bytes, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def job_ended(s: Session, job_id: str, project_id: str, status: str) -> None:
    """Queue the job's end for its project's webhook, in `s` (the transaction that ends it), with
    the URL the project has now; nothing when it has none. One statement, no read back."""
    if status not in EVENTS:
        return
    now = shared_now()
    chosen = sa.select(sa.literal(new_id("whd")), sa.literal(job_id), col(Project.webhook_url),
                       sa.literal(EVENTS[status]), sa.literal(0), sa.literal(now, UTCDateTime()),
                       sa.literal(now, UTCDateTime())).where(col(Project.id) == project_id,
                                                             col(Project.webhook_url).is_not(None))
    s.execute(sa.insert(WebhookDelivery).from_select(
        ["id", "job_id", "url", "event", "attempts", "next_attempt_at", "created_at"], chosen))


def job_ended_at(s: Session, job_id: str, status: str, url: str | None) -> None:
    """`job_ended` for a caller that read the project's URL in `s` already (`None`: nothing)."""
    if url is None or status not in EVENTS:
        return
    now = shared_now()
    s.add(WebhookDelivery(id=new_id("whd"), job_id=job_id, url=url, event=EVENTS[status], next_attempt_at=now,
                          created_at=now))


def counts(s: Session) -> tuple[int, int]:
    """(pending, given up): deliveries still to make, and those no longer tried."""
    undelivered = col(WebhookDelivery.delivered_at).is_(None)
    pending = s.scalar(select(func.count()).select_from(WebhookDelivery).where(
        undelivered, col(WebhookDelivery.next_attempt_at).is_not(None))) or 0
    failed = s.scalar(select(func.count()).select_from(WebhookDelivery).where(
        undelivered, col(WebhookDelivery.next_attempt_at).is_(None))) or 0
    return int(pending), int(failed)


@dataclass
class Due:
    """A due delivery as read, before its claim: the claim updates it only if it is still so."""

    id: str
    job_id: str
    url: str
    event: str
    attempts: int
    next_attempt_at: datetime


class Deliverer:
    """Sends the due deliveries, every `interval` seconds, until `run`'s task is canceled (a stop
    leaves the undelivered ones to the next start). `describe` gives a job as GET /v1/jobs/{id}
    shows it."""

    def __init__(self, db: Database, describe: Callable[[str], dict[str, Any] | None], secret: str | None, *,
                 interval: float) -> None:
        self.db = db
        self.describe = describe
        self.key = None if secret is None else signing_key(secret)
        self.interval = interval

    async def run(self) -> None:
        # A line a minute while the database is away, not a traceback at each look (every `interval`).
        outage = Outage(log, "webhook deliveries", f"trying again every {self.interval:g} s")
        async with httpx.AsyncClient(timeout=SEND_TIMEOUT_SECONDS, follow_redirects=False) as client:
            while True:
                try:
                    sent = await self.deliver_due(client)
                except Exception as exc:  # a database outage: the rows wait for the next look
                    outage.failed(exc)
                    sent = 0
                else:
                    outage.recovered()
                if sent < BATCH:
                    await asyncio.sleep(self.interval)

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        """Send the due deliveries this process claims; returns how many it read."""
        due = await asyncio.to_thread(self._due)
        for row in due:
            if await asyncio.to_thread(self._claim, row):
                await self._send(client, row)
        return len(due)

    def _due(self) -> list[Due]:
        with self.db.session() as s:
            rows = s.exec(select(WebhookDelivery).where(
                col(WebhookDelivery.delivered_at).is_(None), col(WebhookDelivery.next_attempt_at) <= shared_now())
                .order_by(col(WebhookDelivery.next_attempt_at)).limit(BATCH)).all()
            return [Due(r.id, r.job_id, r.url, r.event, r.attempts, r.next_attempt_at) for r in rows
                    if r.next_attempt_at is not None]

    def _claim(self, row: Due) -> bool:
        with self.db.transaction() as s:
            result = s.execute(update(WebhookDelivery).where(
                col(WebhookDelivery.id) == row.id, col(WebhookDelivery.next_attempt_at) == row.next_attempt_at,
                col(WebhookDelivery.delivered_at).is_(None))
                .values(next_attempt_at=shared_now() + timedelta(seconds=LEASE_SECONDS)))
            return changed(result) == 1

    async def _send(self, client: httpx.AsyncClient, row: Due) -> None:
        job = await asyncio.to_thread(self.describe, row.job_id)
        body = json.dumps({"type": row.event, "job": job}, separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": row.id, "webhook-timestamp": str(timestamp)}
        if self.key is not None:
            headers["webhook-signature"] = signature(self.key, row.id, timestamp, body)
        try:
            # The whole exchange, not each read: a receiver answering a byte at a time would
            # otherwise outlast the claim's lease, and another process send the row beside it.
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                answer = await client.post(row.url, content=body, headers=headers)
        except Exception as exc:
            # Any, not only httpx's: a host that is no IDNA label (`xn--a`) raises idna's
            # `UnicodeError` before any connection, and escaping it left the row claimed and its
            # attempt uncounted, sent again at every lease's end and never given up.
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if answer.is_success:
                await asyncio.to_thread(self._delivered, row)
                return
            error = f"answered {answer.status_code}"
        await asyncio.to_thread(self._failed, row, error)

    def _delivered(self, row: Due) -> None:
        with self.db.transaction() as s:
            s.execute(update(WebhookDelivery).where(col(WebhookDelivery.id) == row.id)
                      .values(delivered_at=shared_now(), attempts=row.attempts + 1, next_attempt_at=None))

    def _failed(self, row: Due, error: str) -> None:
        attempts = row.attempts + 1
        wait = BACKOFF_SECONDS[attempts - 1] if attempts <= len(BACKOFF_SECONDS) else None
        with self.db.transaction() as s:
            s.execute(update(WebhookDelivery).where(col(WebhookDelivery.id) == row.id).values(
                attempts=attempts, last_error=error[:500],
                next_attempt_at=None if wait is None else shared_now() + timedelta(seconds=wait)))
        # The URL without its query, which may carry the receiver's token.
        parts = urlsplit(row.url)
        where = f"{parts.scheme}://{parts.netloc}{parts.path}"
        then = "given up" if wait is None else f"next attempt in {wait} s"
        log.warning("webhook %s (%s of job %s) to %s: attempt %d failed: %s; %s", row.id, row.event, row.job_id,
                    where, attempts, error, then)
