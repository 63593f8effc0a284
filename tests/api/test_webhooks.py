"""Job webhooks: a project's `webhook_url` gets each job's end, signed, at least once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import update
from sqlmodel import col, select

from orchestrator import webhooks
from orchestrator.clock import shared_now, utcnow
from orchestrator.db import Database
from orchestrator.errors import EngineError
from orchestrator.models import Job, Project, WebhookDelivery
from orchestrator.server import serve_in_thread
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.api import SLOW, assert_error, create_project, run_draft, submit_draft, wait_for_job
from tests.api.test_workers import add_job, row

SECRET = "a-webhook-secret-of-the-studio"
ADMIN_KEY = "admin-key-for-webhook-tests"


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers with the next of `answers`
    (200 once they run out)."""

    def __init__(self, answers: list[int] | None = None, *, delay: float = 0.0) -> None:
        self.answers = list(answers or [])
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                time.sleep(delay)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks?token=t"

    def wait_for(self, count: int, timeout: float = 30.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.posts) >= count:
                    return list(self.posts)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.posts)} POSTs came, not {count}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.close()


def _verified(headers: dict[str, str], body: bytes) -> None:
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(SECRET.encode(), signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60


def _job(db: Database) -> None:
    """A project's job `job_1`, for a delivery row to name."""
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced"))
        s.flush()
        s.add(Job(id="job_1", project_id="prj_1", stage="ideation", engine="lite", status="failed"))


def _rows(settings: Settings) -> list[WebhookDelivery]:
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            return list(s.exec(select(WebhookDelivery)).all())
    finally:
        db.dispose()


def test_a_succeeded_draft_is_posted_once_signed_as_get_shows_it(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    check_a_succeeded_draft_is_posted_once_signed(start_server(make_settings(webhook_secret=SECRET)))


def check_a_succeeded_draft_is_posted_once_signed(client: httpx.Client) -> None:
    """On a service whose ORCH_WEBHOOK_SECRET is `SECRET`."""
    receiver = Receiver()
    try:
        project = create_project(client, webhook_url=receiver.url)
        assert project["webhook_url"] == receiver.url
        job = run_draft(client, project["id"])
        [(headers, body)] = receiver.wait_for(1)
        _verified(headers, body)
        assert headers["content-type"] == "application/json" and headers["webhook-id"].startswith("whd_")
        sent = json.loads(body)
        assert sent["type"] == "job.succeeded"
        assert sent["job"] == client.get(f"/v1/jobs/{job['id']}").json()
        deadline = time.monotonic() + 10
        while "orchestrator_webhooks_pending 0" not in (metrics := client.get("/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert "orchestrator_webhooks_failed 0" in metrics
        time.sleep(1.5)  # three of the deliverer's looks: nothing is sent again
        assert len(receiver.posts) == 1
    finally:
        receiver.close()


def test_canceled_and_failed_jobs_are_posted_with_their_types(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    client = start_server(make_settings())
    project = create_project(client, webhook_url=receiver.url)["id"]
    running = submit_draft(client, project, **SLOW)
    queued = submit_draft(client, project, **SLOW)
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 202
    assert client.post(f"/v1/jobs/{running['id']}/cancel").status_code == 202
    wait_for_job(client, running["id"], ("canceled",))

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise EngineError("the model broke", retryable=False)

    monkeypatch.setattr("tiers.lite.LiteEngine.run", broken)
    failed = wait_for_job(client, submit_draft(client, project)["id"], ("failed",))
    posts = receiver.wait_for(3)
    sent = {json.loads(body)["job"]["id"]: json.loads(body) for _, body in posts}
    assert {job_id: s["type"] for job_id, s in sent.items()} == {
        queued["id"]: "job.canceled", running["id"]: "job.canceled", failed["id"]: "job.failed"}
    assert "webhook-signature" not in posts[0][0]  # no ORCH_WEBHOOK_SECRET: unsigned
    assert sent[failed["id"]]["job"]["error"]["code"] == "engine_error"


def test_a_failed_delivery_is_tried_again_with_the_same_id(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(webhooks, "BACKOFF_SECONDS", (0.2,))
    receiver = Receiver([500, 200])
    try:
        client = start_server(make_settings(webhook_secret=SECRET))
        project = create_project(client, webhook_url=receiver.url)["id"]
        run_draft(client, project)
        (first, body), (second, again) = receiver.wait_for(2)
    finally:
        receiver.close()
    assert first["webhook-id"] == second["webhook-id"] and body == again
    _verified(second, again)
    failures = [r.getMessage() for r in caplog.records if "attempt 1 failed" in r.getMessage()]
    assert failures and "answered 500" in failures[0] and "token" not in failures[0], failures
    assert SECRET not in caplog.text


def test_a_delivery_given_up_is_counted_failed(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "BACKOFF_SECONDS", ())
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    row = webhooks.Due("whd_1", "job_1", "http://127.0.0.1:9/", "job.failed", 0, shared_now())
    _job(db)
    with db.transaction() as s:
        s.add(WebhookDelivery(id=row.id, job_id=row.job_id, url=row.url, event=row.event,
                              next_attempt_at=row.next_attempt_at))
    deliverer._failed(row, "answered 503")
    with db.session() as s:
        assert webhooks.counts(s) == (0, 1)


def test_a_project_without_a_url_writes_no_delivery(make_settings: Callable[..., Settings],
                                                   start_server: Callable[[Settings], httpx.Client]) -> None:
    settings = make_settings()
    client = start_server(settings)
    project = create_project(client)
    assert project["webhook_url"] is None
    run_draft(client, project["id"])
    assert _rows(settings) == []


def test_a_url_set_while_a_job_runs_gets_that_job_s_end(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        receiver: Receiver) -> None:
    # The claim read that the project had no URL, and the end looked for none: this end was lost.
    client = start_server(make_settings())
    project = create_project(client)["id"]
    job = wait_for_job(client, submit_draft(client, project, **SLOW)["id"], ("running",))
    assert client.patch(f"/v1/projects/{project}", json={"webhook_url": receiver.url}).status_code == 200
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    [(_, body)] = receiver.wait_for(1)
    assert json.loads(body)["type"] == "job.canceled" and json.loads(body)["job"]["id"] == job["id"]


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "example.com/hook", "/hooks", "https://user:pw@example.com/",
                                 "https://example.com/" + "a" * 2000, "https://example.com/\nx", "https:///path",
                                 "https://example.com:99999/", "https://exa\u202emple.com/", 5,
                                 # Read as https by `urlsplit`, which strips the space, but not by httpx,
                                 # which sends it: every attempt failed `UnsupportedProtocol`.
                                 " https://example.com/hooks",
                                 # No IDNA label: httpx cannot send to it.
                                 "https://xn--a.example/hooks"])
def test_a_bad_url_is_refused(server: httpx.Client, url: Any) -> None:
    error = assert_error(server.post("/v1/projects", json={"name": "p", "webhook_url": url}), 422, "invalid_request")
    assert "webhook_url" in json.dumps(error)
    project = create_project(server)["id"]
    error = assert_error(server.patch(f"/v1/projects/{project}", json={"webhook_url": url}), 422, "invalid_request")
    assert "webhook_url" in json.dumps(error)


def test_a_patch_sets_and_clears_the_url_and_a_project_key_cannot(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    base = start_server(make_settings(admin_key=ADMIN_KEY)).base_url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        project = create_project(admin)["id"]
        key = admin.post(f"/v1/projects/{project}/keys", json={"name": "pipeline"}).json()["key"]
        url = "https://hooks.example.com/orchestrator"
        assert admin.patch(f"/v1/projects/{project}", json={"webhook_url": url}).json()["webhook_url"] == url
        assert admin.patch(f"/v1/projects/{project}", json={"name": "renamed"}).json()["webhook_url"] == url
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as mine:
            assert_error(mine.patch(f"/v1/projects/{project}", json={"webhook_url": "https://evil.example/"}),
                         403, "forbidden")
            assert mine.get(f"/v1/projects/{project}").json()["webhook_url"] == url
        assert admin.patch(f"/v1/projects/{project}", json={"webhook_url": None}).json()["webhook_url"] is None


def test_the_delivery_is_committed_with_the_end_and_sent_after_a_restart(
        make_settings: Callable[..., Settings], receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(webhook_secret=SECRET)

    async def stopped(self: webhooks.Deliverer) -> None:  # a process that stops before its deliverer looks
        await asyncio.Event().wait()

    with monkeypatch.context() as mp:
        mp.setattr(webhooks.Deliverer, "run", stopped)
        with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
            project = create_project(client, webhook_url=receiver.url)["id"]
            job = run_draft(client, project)
    [row] = _rows(settings)
    assert (row.job_id, row.event, row.url, row.delivered_at, row.attempts) == (
        job["id"], "job.succeeded", receiver.url, None, 0)
    assert receiver.posts == []
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        [(headers, body)] = receiver.wait_for(1)
        _verified(headers, body)
        assert headers["webhook-id"] == row.id
        assert json.loads(body)["job"] == client.get(f"/v1/jobs/{job['id']}").json()
    [row] = _rows(settings)
    assert row.delivered_at is not None and row.attempts == 1


def test_two_deliverers_send_a_row_once(db: Database) -> None:
    check_two_deliverers_send_a_row_once(db)


def check_two_deliverers_send_a_row_once(db: Database) -> None:
    """Of two processes that read a due row, one claims it (the other's update finds it changed)."""
    _job(db)
    now = shared_now()
    with db.transaction() as s:
        s.add(WebhookDelivery(id="whd_1", job_id="job_1", url="http://127.0.0.1:9/", event="job.failed",
                              next_attempt_at=now))
    first = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    second = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    [due] = first._due()
    [seen] = second._due()
    assert first._claim_all([due]) == [due]
    assert second._claim_all([seen]) == []


@pytest.mark.parametrize("secret", ["short", " fifteen-chars! ", "whsec_not*base64*at*all"])
def test_a_weak_or_malformed_secret_is_refused(make_settings: Callable[..., Settings], secret: str) -> None:
    with pytest.raises(ValidationError) as refused:
        make_settings(webhook_secret=secret)
    [error] = refused.value.errors()
    # The message the command prints (`orchestrator.cli` shows no secret's value beside it).
    assert error["loc"] == ("webhook_secret",) and secret.strip() not in error["msg"]


def test_a_whsec_secret_signs_with_its_decoded_bytes() -> None:
    key = base64.b64encode(b"sixteen-byte-key").decode()
    assert webhooks.signing_key(f"whsec_{key}") == b"sixteen-byte-key"
    assert webhooks.signing_key(SECRET) == SECRET.encode()


def test_a_receiver_that_does_not_answer_in_time_is_tried_again(db: Database, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(webhooks, "SEND_TIMEOUT_SECONDS", 0.3)
    receiver = Receiver(delay=2.0)
    _job(db)
    with db.transaction() as s:
        s.add(WebhookDelivery(id="whd_1", job_id="job_1", url=receiver.url, event="job.failed",
                              next_attempt_at=shared_now()))
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.1)

    async def look() -> int:
        async with httpx.AsyncClient() as client:
            return await deliverer.deliver_due(client)

    try:
        assert asyncio.run(look()) == 1
    finally:
        receiver.close()
    with db.session() as s:
        row = s.get(WebhookDelivery, "whd_1")
        assert row is not None and row.delivered_at is None and row.attempts == 1
        assert row.last_error == "TimeoutError" and row.next_attempt_at is not None
    assert "attempt 1 failed: TimeoutError; next attempt in 10 s" in caplog.text


def test_ends_outside_the_runner_write_their_deliveries(make_settings: Callable[..., Settings]) -> None:
    services = Services.build(make_settings())
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        orphan = add_job(services, status="running", attempt=1, lease_owner=f"{socket.gethostname()}:{dead.pid}:0",
                         lease_expires_at=utcnow() + timedelta(minutes=5))
        recovered = add_job(services, status="running", attempt=1, lease_owner="dead-host:1:0",
                            lease_expires_at=utcnow() - timedelta(seconds=1), cancel_requested_at=utcnow())
        queued, unserved, unhooked = add_job(services), add_job(services, engine="gone"), add_job(services)
        with services.db.transaction() as s:
            hooked = [row(services, job_id).project_id for job_id in (orphan, recovered, queued, unserved)]
            s.execute(update(Project).where(col(Project.id).in_(hooked)).values(webhook_url="https://example.com/h"))
        assert services.jobs.cancel_orphan(orphan)
        assert services.jobs.cancel_queued(queued) and services.jobs.cancel_queued(unhooked)
        services.scheduler._fail_unknown_engine(unserved, "gone")
        assert asyncio.run(services.scheduler.recover(all_foreign=False)) == [recovered]
        with services.db.session() as s:
            written = {(d.job_id, d.event, d.url) for d in s.exec(select(WebhookDelivery)).all()}
    finally:
        asyncio.run(services.aclose())
    assert written == {(orphan, "job.canceled", "https://example.com/h"),
                       (recovered, "job.canceled", "https://example.com/h"),
                       (queued, "job.canceled", "https://example.com/h"),
                       (unserved, "job.failed", "https://example.com/h")}


def test_a_url_the_sender_cannot_parse_is_a_failed_attempt_not_a_row_stuck_for_good(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    # `xn--a` is no IDNA label: httpx raises idna's `IDNAError` (a `UnicodeError`, not an `httpx.HTTPError`)
    # before it connects. Escaping the send, it left the row claimed and counted no attempt: sent
    # again at each lease's end, logged as a failed look every minute, never given up.
    _job(db)
    with db.transaction() as s:
        s.add(WebhookDelivery(id="whd_1", job_id="job_1", url="http://xn--a.example/hooks", event="job.failed",
                              next_attempt_at=shared_now()))
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.1)

    async def look() -> int:
        async with httpx.AsyncClient() as client:
            return await deliverer.deliver_due(client)

    assert asyncio.run(look()) == 1
    with db.session() as s:
        row = s.get(WebhookDelivery, "whd_1")
        assert row is not None and row.delivered_at is None and row.attempts == 1
        assert row.last_error is not None and "U+0080" in row.last_error, row.last_error
    assert "attempt 1 failed" in caplog.text


def test_a_database_outage_is_told_once_not_a_traceback_at_each_look(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    # Every ORCH_POLL_INTERVAL (0.5 s by default), in every process that runs jobs, as
    # `orchestrator.outage` says the loops once filled the log.
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.01)
    looks = [0]

    def away(sending: Collection[str] = (), full: Collection[str] = (), limit: int = 0) -> list[webhooks.Due]:
        looks[0] += 1
        raise RuntimeError("the database is away")

    deliverer._due = away  # type: ignore[method-assign]

    async def for_a_while() -> None:
        task = asyncio.create_task(deliverer.run())
        await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(for_a_while())
    told = [r for r in caplog.records if r.name == "orchestrator.webhooks" and r.levelno >= logging.WARNING]
    assert looks[0] >= 5 and len(told) == 1, (looks[0], len(told))
    assert told[0].exc_info is not None  # the first, whole
