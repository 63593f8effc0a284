"""A project's webhook deliveries: listed (`GET /v1/projects/{id}/webhook-deliveries`), one sent
again (`POST /v1/webhook-deliveries/{id}/redeliver`), and the old ones pruned
(ORCH_WEBHOOK_RETENTION_DAYS)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, event, inspect, text, update
from sqlmodel import col, select
from starlette.testclient import TestClient

from orchestrator import clock, webhook_deliveries, webhooks
from orchestrator import ids as made_ids
from orchestrator.app import create_app
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.errors import DeliveryPending
from orchestrator.ids import lowest_id, new_id
from orchestrator.models import Job, Project, WebhookDelivery
from orchestrator.settings import Settings
from tests.api import assert_error, create_project, run_draft
from tests.api.test_webhooks import SECRET, Receiver, _verified
from tests.test_migrations import _project_and_job

SettingsFactory = Callable[..., Settings]
ADMIN_KEY = "admin-key-for-delivery-tests"
URL = "https://ci.studio.example/hooks"


@contextmanager
def database(settings: Settings) -> Iterator[Database]:
    db = Database(settings.resolved_database_url)
    try:
        yield db
    finally:
        db.dispose()


def add_job(db: Database, project_id: str) -> str:
    job_id = new_id("job")
    with db.transaction() as s:
        s.add(Job(id=job_id, project_id=project_id, stage="ideation", engine="lite", status="succeeded"))
    return job_id


def add_delivery(db: Database, job_id: str, status: str, *, age_days: float = 0.0, url: str = URL,
                 redelivered_days: float | None = None) -> str:
    """A delivery in `status`: `pending` (due), `waiting` (pending, 3 attempts failed, its next in
    30 min), `claimed` (pending, a sender's lease on it), `delivered` or `failed`, made `age_days`
    ago (and delivered then)."""
    made = utcnow() - timedelta(days=age_days)
    with db.session() as s:
        job = s.get(Job, job_id)
    assert job is not None
    row = WebhookDelivery(id=new_id("whd"), job_id=job_id, project_id=job.project_id, url=url, event="job.succeeded",
                          created_at=made)
    if status == "pending":
        row.next_attempt_at = made
    elif status == "waiting":
        row.attempts, row.last_error = 3, "answered 502"
        row.next_attempt_at = utcnow() + timedelta(minutes=30)
    elif status == "claimed":
        row.attempts, row.last_error = 1, "answered 500"
        row.next_attempt_at = row.leased_until = utcnow() + timedelta(seconds=60)
    elif status == "delivered":
        row.attempts, row.delivered_at = 2, made + timedelta(seconds=5)
        row.last_error = "ConnectError: [Errno 111] Connection refused"
    else:
        row.attempts, row.last_error = 9, "answered 503"
    if redelivered_days is not None:
        row.redelivered_at = utcnow() - timedelta(days=redelivered_days)
    with db.transaction() as s:
        s.add(row)
    return row.id


def row_of(db: Database, delivery_id: str) -> WebhookDelivery | None:
    with db.session() as s:
        return s.get(WebhookDelivery, delivery_id)


def dumped(db: Database, delivery_id: str) -> dict[str, Any]:
    row = row_of(db, delivery_id)
    assert row is not None
    return row.model_dump()


def z(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


@pytest.fixture
def admin_settings(make_settings: SettingsFactory) -> Settings:
    """An API server that runs no jobs: no deliverer sends the rows a test writes."""
    return make_settings(admin_key=ADMIN_KEY, run_jobs=False)


@pytest.fixture
def admin(admin_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(admin_settings), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


def key_of(admin: TestClient, project_id: str) -> dict[str, str]:
    """The headers of a request with a new key of the project."""
    key = admin.post(f"/v1/projects/{project_id}/keys", json={"name": "pipeline"}).json()["key"]
    return {"Authorization": f"Bearer {key}"}


NO_KEY = {"Authorization": ""}


def ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


# -- the list ------------------------------------------------------------------------------------

def test_a_project_s_deliveries_are_listed_newest_first_paged_and_filtered(
        admin: TestClient, admin_settings: Settings) -> None:
    mine, other = create_project(admin, "mine")["id"], create_project(admin, "other")["id"]
    with database(admin_settings) as db:
        first_job, second_job, others_job = add_job(db, mine), add_job(db, mine), add_job(db, other)
        delivered = add_delivery(db, first_job, "delivered")
        failed = add_delivery(db, first_job, "failed")
        pending = add_delivery(db, second_job, "pending")
        add_delivery(db, others_job, "delivered")
        claimed = add_delivery(db, second_job, "claimed")
        row = row_of(db, delivered)
    assert row is not None and row.delivered_at is not None
    path = f"/v1/projects/{mine}/webhook-deliveries"

    newest_first = [claimed, pending, failed, delivered]
    assert ids(admin.get(path)) == newest_first
    assert ids(admin.get(path, params={"order": "asc"})) == newest_first[::-1]
    # Pages of 3 then 1, with the cursor passed back, in either order.
    for order, expected in (("desc", newest_first), ("asc", newest_first[::-1])):
        page = admin.get(path, params={"limit": 3, "order": order}).json()
        assert [i["id"] for i in page["items"]] == expected[:3] and page["next_cursor"] == expected[2]
        rest = admin.get(path, params={"limit": 3, "order": order, "cursor": page["next_cursor"]}).json()
        assert [i["id"] for i in rest["items"]] == expected[3:] and rest["next_cursor"] is None

    assert ids(admin.get(path, params={"status": "pending"})) == [claimed, pending]
    assert ids(admin.get(path, params={"status": "delivered"})) == [delivered]
    assert ids(admin.get(path, params={"status": "failed"})) == [failed]
    assert ids(admin.get(path, params={"job_id": first_job})) == [failed, delivered]
    assert ids(admin.get(path, params={"job_id": second_job, "status": "pending", "limit": 1})) == [claimed]
    assert ids(admin.get(path, params={"job_id": second_job, "status": "delivered"})) == []

    item = next(i for i in admin.get(path).json()["items"] if i["id"] == delivered)
    assert item == {"id": delivered, "project_id": mine, "job_id": first_job, "type": "job.succeeded", "url": URL,
                    "status": "delivered", "attempts": 2,
                    "last_error": "ConnectError: [Errno 111] Connection refused", "next_attempt_at": None,
                    "created_at": z(row.created_at), "delivered_at": z(row.delivered_at), "redelivered_at": None}
    waiting = next(i for i in admin.get(path).json()["items"] if i["id"] == claimed)
    assert (waiting["status"], waiting["attempts"], waiting["last_error"]) == ("pending", 1, "answered 500")
    assert waiting["next_attempt_at"] is not None


def test_the_list_refuses_what_it_cannot_read_in_the_error_shape(admin: TestClient, admin_settings: Settings) -> None:
    mine, other = create_project(admin, "mine")["id"], create_project(admin, "other")["id"]
    with database(admin_settings) as db:
        others_job = add_job(db, other)
    path = f"/v1/projects/{mine}/webhook-deliveries"
    missing = "prj_0000000000zzzzzzzzzzzzzz"
    error = assert_error(admin.get(f"/v1/projects/{missing}/webhook-deliveries"), 404, "not_found")
    assert error["details"] == {"project_id": missing}
    # A job of another project, or none: not a job without deliveries.
    assert assert_error(admin.get(path, params={"job_id": others_job}), 404, "not_found")["details"] == {
        "job_id": others_job}
    assert_error(admin.get(path, params={"job_id": "job_0000000000zzzzzzzzzzzzzz"}), 404, "not_found")
    for params in ({"status": "given_up"}, {"limit": 0}, {"limit": 501}, {"limit": "5.0"}, {"cursor": "x"},
                   {"cursor": others_job}, {"order": "newest"}, {"stauts": "failed"}):
        assert_error(admin.get(path, params=params), 422, "invalid_request")
    assert_error(admin.get(path + "?status=failed&status=pending"), 422, "invalid_request")


def test_a_project_key_reads_its_own_project_s_deliveries_only(admin: TestClient, admin_settings: Settings) -> None:
    mine, other = create_project(admin, "mine")["id"], create_project(admin, "other")["id"]
    with database(admin_settings) as db:
        delivery = add_delivery(db, add_job(db, mine), "failed")
        add_delivery(db, add_job(db, other), "failed")
    key = key_of(admin, mine)
    assert ids(admin.get(f"/v1/projects/{mine}/webhook-deliveries", headers=key)) == [delivery]
    # Another project's list is answered as a project that does not exist.
    foreign = assert_error(admin.get(f"/v1/projects/{other}/webhook-deliveries", headers=key), 404, "not_found")
    assert foreign["details"] == {"project_id": other}
    assert foreign["message"] == f"project '{other}' not found"
    assert_error(admin.get(f"/v1/projects/{mine}/webhook-deliveries", headers=NO_KEY), 401, "unauthorized")


def test_every_project_s_deliveries_are_listed_newest_first_for_the_admin(
        admin: TestClient, admin_settings: Settings) -> None:
    mine, other = create_project(admin, "mine")["id"], create_project(admin, "other")["id"]
    with database(admin_settings) as db:
        mine_job, other_job = add_job(db, mine), add_job(db, other)
        made = [(add_delivery(db, job, status), project, status)
                for job, project, status in ((mine_job, mine, "delivered"), (other_job, other, "failed"),
                                             (mine_job, mine, "waiting"), (other_job, other, "delivered"),
                                             (other_job, other, "claimed"), (mine_job, mine, "failed"))]
        path = "/v1/webhooks/deliveries"
        newest_first = [delivery for delivery, _, _ in reversed(made)]
        listed = admin.get(path).json()
        assert [i["id"] for i in listed["items"]] == newest_first and listed["next_cursor"] is None
        assert {i["id"]: i["project_id"] for i in listed["items"]} == {d: p for d, p, _ in made}
        # Each as the project's own list shows it.
        assert next(i for i in listed["items"] if i["id"] == made[0][0]) == next(
            i for i in admin.get(f"/v1/projects/{mine}/webhook-deliveries").json()["items"] if i["id"] == made[0][0])
        assert ids(admin.get(path, params={"order": "asc"})) == newest_first[::-1]

        # Pages of 4 then 2; a delivery made meanwhile is newer than the cursor: the next page goes on
        # where the first ended, nothing listed twice or skipped.
        page = admin.get(path, params={"limit": 4}).json()
        assert [i["id"] for i in page["items"]] == newest_first[:4] and page["next_cursor"] == newest_first[3]
        newer = add_delivery(db, mine_job, "pending")
        rest = admin.get(path, params={"limit": 4, "cursor": page["next_cursor"]}).json()
        assert [i["id"] for i in rest["items"]] == newest_first[4:] and rest["next_cursor"] is None
        assert ids(admin.get(path, params={"limit": 1})) == [newer]

        def of(status: str) -> list[str]:
            return [d for d, _, st in reversed(made) if st == status]

        assert ids(admin.get(path, params={"status": "failed"})) == of("failed")
        assert ids(admin.get(path, params={"status": "delivered"})) == of("delivered")
        assert ids(admin.get(path, params={"status": "pending"})) == [newer, *of("claimed"), *of("waiting")]
        assert ids(admin.get(path, params={"status": "pending", "limit": 1, "cursor": newer})) == of("claimed")
        assert ids(admin.get(path, params={"project_id": other})) == [d for d, p, _ in reversed(made) if p == other]
        assert ids(admin.get(path, params={"project_id": mine, "status": "failed"})) == [made[5][0]]


def test_the_list_across_projects_is_the_admin_s_only(admin: TestClient, admin_settings: Settings) -> None:
    mine, other = create_project(admin, "mine")["id"], create_project(admin, "other")["id"]
    with database(admin_settings) as db:
        add_delivery(db, add_job(db, mine), "failed")
        others = add_delivery(db, add_job(db, other), "failed")
    path = "/v1/webhooks/deliveries"
    key = key_of(admin, mine)
    for params in ({}, {"project_id": mine}, {"project_id": other}, {"status": "failed"}):
        refused = assert_error(admin.get(path, params=params, headers=key), 403, "forbidden")
        assert others not in json.dumps(refused)
    assert_error(admin.get(path, headers=NO_KEY), 401, "unauthorized")
    missing = "prj_0000000000zzzzzzzzzzzzzz"
    assert assert_error(admin.get(path, params={"project_id": missing}), 404, "not_found")["details"] == {
        "project_id": missing}
    for params in ({"status": "given_up"}, {"limit": 0}, {"limit": 501}, {"cursor": "x"}, {"cursor": mine},
                   {"order": "newest"}, {"projectid": mine}):
        assert_error(admin.get(path, params=params), 422, "invalid_request")
    assert_error(admin.get(path + "?status=failed&status=pending"), 422, "invalid_request")


def test_the_list_across_projects_reads_a_page_of_pending_or_failed_ones_from_their_own_index(db: Database) -> None:
    """A page of pending (or failed) deliveries of every project reads that status's rows alone, in
    id order, on a database never analyzed (the service runs no ANALYZE): not the table (nearly all
    delivered), nor every undelivered row (a pending page read past each given-up one: 220 ms beside
    300,000), nor every given-up row from `ix_webhook_deliveries_due`, sorted (260 to 685 ms)."""
    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().startswith("SELECT") and "webhook_deliveries" in statement:
            statements.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        with db.session() as s:
            for status in ("pending", "failed"):
                for order in ("desc", "asc"):
                    for after in (None, "whd_01m97h378edcs1j7cypy77dzq3"):
                        statements.clear()
                        webhook_deliveries.listed(s, None, status=status, job_id=None, after=after, order=order,
                                                  limit=51)
                        [(statement, parameters)] = statements
                        plan = s.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
                        told = " | ".join(str(step[-1]) for step in plan)
                        assert f"USING INDEX ix_webhook_deliveries_{status}" in told, (status, order, told)
                        assert "TEMP B-TREE" not in told, (status, order, told)
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)


def test_every_project_s_deliveries_are_read_a_page_at_a_time(db: Database) -> None:
    check_every_project_s_deliveries_read(db)


def check_every_project_s_deliveries_read(db: Database) -> None:
    with db.transaction() as s:
        s.add_all([Project(id="prj_1", name="a", policy="balanced"), Project(id="prj_2", name="b", policy="balanced")])
    jobs = [add_job(db, "prj_1"), add_job(db, "prj_2")]
    made = [(add_delivery(db, jobs[n % 2], status), status)
            for n, status in enumerate(["delivered", "failed", "waiting", "claimed", "delivered", "failed", "pending"])]
    newest_first = [d for d, _ in reversed(made)]

    def read(status: Any = None, after: str | None = None, order: str = "desc", limit: int = 3) -> list[str]:
        with db.session() as s:
            return [r.id for r in webhook_deliveries.listed(s, None, status=status, job_id=None, after=after,
                                                            order=order, limit=limit)]

    pages, after = [], None
    while page := read(after=after):
        pages += page
        after = page[-1]
    assert pages == newest_first
    assert read(order="asc", limit=10) == newest_first[::-1]
    for status, statuses in (("pending", {"waiting", "claimed", "pending"}), ("failed", {"failed"}),
                             ("delivered", {"delivered"})):
        expected = [d for d, st in reversed(made) if st in statuses]
        assert read(status, limit=10) == expected
        assert read(status, after=expected[0], limit=10) == expected[1:]


def test_the_deliveries_made_before_are_given_their_job_s_project(tmp_path: Path) -> None:
    check_deliveries_made_before_given_their_project(f"sqlite:///{tmp_path / 'm.db'}")


def check_deliveries_made_before_given_their_project(url: str) -> None:
    """Migration 0028 fills in the column the list reads, which the rows made before lack."""
    from alembic import command

    from orchestrator.db import alembic_config

    command.upgrade(alembic_config(url), "0027")
    engine = create_engine(url)
    try:
        _project_and_job(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO webhook_deliveries (id, job_id, url, event, attempts, delivered_at, "
                              "created_at) VALUES ('whd_1', 'job_1', 'https://x.example/', 'job.succeeded', 1, "
                              "'2026-12-01 12:00:01', '2026-12-01 12:00:00')"))
        command.upgrade(alembic_config(url), "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT project_id, redelivered_at FROM webhook_deliveries")).all() == [
                ("prj_1", None)]
    finally:
        engine.dispose()


def test_0031_indexes_the_rows_there_and_downgrades(tmp_path: Path) -> None:
    check_0031_indexes_the_rows_there_and_downgrades(f"sqlite:///{tmp_path / 'm.db'}")


def check_0031_indexes_the_rows_there_and_downgrades(url: str) -> None:
    """The rows there before 0031 (one claimed by a sender of before it: no lease written) are in
    the index of their status and listed from it; the downgrade drops the indexes and the column
    alone (SQLite rebuilds the table), every row kept."""
    from alembic import command

    from orchestrator.db import alembic_config

    command.upgrade(alembic_config(url), "0030")
    engine = create_engine(url)
    try:
        _project_and_job(engine)
        rows = {"whd_1": ("'2026-12-01 12:00:00'", "NULL"), "whd_2": ("NULL", "'2026-12-01 12:00:01'"),
                "whd_3": ("NULL", "NULL"), "whd_4": ("'2099-01-01 00:00:00'", "NULL")}
        with engine.begin() as conn:
            for delivery, (next_attempt, delivered) in rows.items():
                conn.execute(text("INSERT INTO webhook_deliveries (id, job_id, project_id, url, event, attempts, "
                                  f"next_attempt_at, delivered_at, created_at) VALUES ('{delivery}', 'job_1', 'prj_1', "
                                  f"'https://x.example/', 'job.succeeded', 1, {next_attempt}, {delivered}, "
                                  "'2026-12-01 12:00:00')"))
        command.upgrade(alembic_config(url), "head")
        db = Database(url)
        try:
            with db.session() as s:
                def listed(status: Any) -> list[str]:
                    return [r.id for r in webhook_deliveries.listed(s, None, status=status, job_id=None, after=None,
                                                                     order="asc", limit=10)]

                assert (listed("pending"), listed("failed"), listed("delivered")) == (
                    ["whd_1", "whd_4"], ["whd_3"], ["whd_2"])
                assert [r.leased_until for r in s.exec(select(WebhookDelivery))] == [None] * 4
        finally:
            db.dispose()
        command.downgrade(alembic_config(url), "0030")
        with engine.connect() as conn:
            assert "leased_until" not in {c["name"] for c in inspect(conn).get_columns("webhook_deliveries")}
            assert {i["name"] for i in inspect(conn).get_indexes("webhook_deliveries")} == {
                "ix_webhook_deliveries_due", "ix_webhook_deliveries_project", "ix_webhook_deliveries_job_id"}
            assert conn.execute(text("SELECT id, attempts FROM webhook_deliveries ORDER BY id")).all() == [
                (delivery, 1) for delivery in rows]
        command.upgrade(alembic_config(url), "head")
    finally:
        engine.dispose()


def test_a_job_s_end_writes_its_delivery_s_project(make_settings: SettingsFactory,
                                                   start_server: Callable[[Settings], httpx.Client]) -> None:
    """Ended by the runner (`job_ended`); a cache hit's (`job_ended_at`) is tests/credits'."""
    settings = make_settings()
    client = start_server(settings)
    receiver = Receiver()
    try:
        project = create_project(client, webhook_url=receiver.url)["id"]
        job = run_draft(client, project)
    finally:
        receiver.close()
    with database(settings) as db, db.session() as s:
        [row] = s.exec(select(WebhookDelivery)).all()
    assert (row.job_id, row.project_id) == (job["id"], project)
    assert ids(client.get(f"/v1/projects/{project}/webhook-deliveries")) == [row.id]


# -- redelivery ------------------------------------------------------------------------------------

def test_a_redelivery_is_sent_again_with_the_same_webhook_id_to_the_current_url(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    first, moved = Receiver(), Receiver()
    try:
        base = start_server(make_settings(admin_key=ADMIN_KEY, webhook_secret=SECRET)).base_url
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as client:
            project = create_project(client, webhook_url=first.url)["id"]
            job = run_draft(client, project)
            [(headers, body)] = first.wait_for(1)
            path = f"/v1/projects/{project}/webhook-deliveries"
            deadline = time.monotonic() + 10
            while (listed := client.get(path).json()["items"])[0]["status"] != "delivered":
                assert time.monotonic() < deadline, listed
                time.sleep(0.05)
            [delivered] = listed
            assert (delivered["id"], delivered["job_id"], delivered["url"], delivered["attempts"]) == (
                headers["webhook-id"], job["id"], first.url, 1)
            client.patch(f"/v1/projects/{project}", json={"webhook_url": moved.url}).raise_for_status()
            key = client.post(f"/v1/projects/{project}/keys", json={"name": "pipeline"}).json()["key"]

            # The project's own key may ask it.
            answer = client.post(f"/v1/webhook-deliveries/{delivered['id']}/redeliver",
                                 headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 202, answer.text
            again = answer.json()
            assert (again["id"], again["status"], again["attempts"], again["url"], again["delivered_at"]) == (
                delivered["id"], "pending", 0, moved.url, None)
            assert again["redelivered_at"] is not None and again["created_at"] == delivered["created_at"]

            [(moved_headers, moved_body)] = moved.wait_for(1)
            assert moved_headers["webhook-id"] == headers["webhook-id"]
            _verified(moved_headers, moved_body)  # signed anew, with its own timestamp
            assert json.loads(moved_body) == json.loads(body)
            deadline = time.monotonic() + 10
            while (now := client.get(path).json()["items"][0])["status"] != "delivered":
                assert time.monotonic() < deadline, now
                time.sleep(0.05)
            assert (now["attempts"], now["url"], now["redelivered_at"]) == (1, moved.url, again["redelivered_at"])
        assert len(first.posts) == 1
    finally:
        first.close()
        moved.close()


def test_a_given_up_delivery_is_redelivered_with_a_fresh_budget(admin: TestClient, admin_settings: Settings) -> None:
    project = create_project(admin, webhook_url=URL)["id"]
    with database(admin_settings) as db:
        failed = add_delivery(db, add_job(db, project), "failed", url="https://old.example/hooks")
        answer = admin.post(f"/v1/webhook-deliveries/{failed}/redeliver")
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert (body["status"], body["attempts"], body["last_error"], body["url"]) == ("pending", 0, None, URL)
        assert body == next(i for i in admin.get(f"/v1/projects/{project}/webhook-deliveries").json()["items"])
        # Due now: a sender's next look takes it.
        [due] = webhooks.Deliverer(db, lambda job_id: {}, None, interval=1)._due()
        assert (due.id, due.url, due.attempts) == (failed, URL, 0)


def test_a_pending_delivery_waiting_out_its_backoff_is_sent_now_its_attempts_kept(
        admin: TestClient, admin_settings: Settings) -> None:
    project = create_project(admin, webhook_url=URL)["id"]
    with database(admin_settings) as db:
        job = add_job(db, project)
        waiting = add_delivery(db, job, "waiting", url="https://old.example/hooks")
        before = dumped(db, waiting)
        sender = webhooks.Deliverer(db, lambda job_id: {}, None, interval=1)
        assert sender._due() == []
        answer = admin.post(f"/v1/webhook-deliveries/{waiting}/redeliver")
        assert answer.status_code == 202, answer.text
        body = answer.json()
        # Due now; nothing else changed: its attempts, last error and URL as they were (a retry
        # brought forward, not a redelivery), its schedule going on from its 4th attempt.
        assert (body["status"], body["attempts"], body["last_error"], body["url"], body["redelivered_at"]) == (
            "pending", 3, "answered 502", "https://old.example/hooks", None)
        after = dumped(db, waiting)
        assert after["next_attempt_at"] <= utcnow() < before["next_attempt_at"]
        assert {k: v for k, v in after.items() if k != "next_attempt_at"} == {
            k: v for k, v in before.items() if k != "next_attempt_at"}
        [due] = sender._due()
        assert (due.id, due.attempts) == (waiting, 3)
        # Asked again before it is sent: due already, left as it is.
        assert admin.post(f"/v1/webhook-deliveries/{waiting}/redeliver").status_code == 202
        assert dumped(db, waiting) == after
        # Its attempt fails: counted as its 4th, waiting 30 min as ever.
        [claimed] = sender._claim_all([due])
        sender._failed(claimed, "answered 503")
        row = row_of(db, waiting)
        assert row is not None and (row.attempts, row.last_error) == (4, "answered 503")
        assert row.next_attempt_at is not None and row.next_attempt_at > utcnow() + timedelta(minutes=29)


def test_a_delivery_waiting_after_a_failed_attempt_is_sent_at_once_when_asked(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    receiver = Receiver([503])
    try:
        base = start_server(make_settings(admin_key=ADMIN_KEY)).base_url
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as client:
            project = create_project(client, webhook_url=receiver.url)["id"]
            run_draft(client, project)
            [(headers, _)] = receiver.wait_for(1)
            path = f"/v1/projects/{project}/webhook-deliveries"
            deadline = time.monotonic() + 10
            while (waiting := client.get(path).json()["items"][0])["attempts"] != 1:
                assert time.monotonic() < deadline, waiting
                time.sleep(0.05)
            assert (waiting["status"], waiting["last_error"]) == ("pending", "answered 503")
            asked = time.monotonic()
            answer = client.post(f"/v1/webhook-deliveries/{waiting['id']}/redeliver")
            assert answer.status_code == 202, answer.text
            # Its backoff was 10 s: sent at the next look instead, as its second attempt.
            [_, (again, _)] = receiver.wait_for(2, timeout=5)
            assert again["webhook-id"] == headers["webhook-id"] and time.monotonic() - asked < 5
            deadline = time.monotonic() + 10
            while (now := client.get(path).json()["items"][0])["status"] != "delivered":
                assert time.monotonic() < deadline, now
                time.sleep(0.05)
            assert (now["attempts"], now["redelivered_at"]) == (2, None)
        assert len(receiver.posts) == 2
    finally:
        receiver.close()


def test_a_pending_delivery_a_sender_has_is_left_to_that_send(admin: TestClient, admin_settings: Settings) -> None:
    """Asked while a process sends it, a pending delivery is not made due under that send (another
    process would send it beside it): it is answered as it is; the send's result stands."""
    project = create_project(admin, webhook_url=URL)["id"]
    with database(admin_settings) as db:
        job = add_job(db, project)
        waiting = add_delivery(db, job, "waiting")
        with db.transaction() as s:
            s.get_one(WebhookDelivery, waiting).next_attempt_at = utcnow() - timedelta(seconds=1)
        sender, other = (webhooks.Deliverer(db, lambda job_id: {}, None, interval=1) for _ in range(2))
        [row] = sender._due()
        [claimed] = sender._claim_all([row])
        before = dumped(db, waiting)
        answer = admin.post(f"/v1/webhook-deliveries/{waiting}/redeliver")
        assert answer.status_code == 202, answer.text
        assert (answer.json()["status"], answer.json()["attempts"]) == ("pending", 3)
        assert dumped(db, waiting) == before
        assert other._due() == []  # no second send beside the first
        sender._delivered(claimed)
        done = row_of(db, waiting)
        assert done is not None and done.delivered_at is not None and done.attempts == 4
        # A claim whose lease ended (its sender died): due again already, taken by the next look.
        lapsed = add_delivery(db, job, "claimed")
        with db.transaction() as s:
            s.get_one(WebhookDelivery, lapsed).next_attempt_at = s.get_one(
                WebhookDelivery, lapsed).leased_until = utcnow() - timedelta(seconds=1)
        before = dumped(db, lapsed)
        assert admin.post(f"/v1/webhook-deliveries/{lapsed}/redeliver").status_code == 202
        assert dumped(db, lapsed) == before
        assert [r.id for r in other._due()] == [lapsed]


def test_a_pending_delivery_claimed_after_it_was_read_is_left_to_its_sender(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_a_claim_after_the_read_is_left_to_its_sender(db, monkeypatch)


def check_a_claim_after_the_read_is_left_to_its_sender(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The update that brings a waiting delivery forward is conditional on the row as read: a
    sender that claimed it since (its backoff ended) keeps it, sent once."""
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced", webhook_url=URL))
    waiting = add_delivery(db, add_job(db, "prj_1"), "waiting")
    read = webhook_deliveries._found
    as_read = read_row(db, waiting)
    with db.transaction() as s:  # its backoff ends; a sender claims it
        s.get_one(WebhookDelivery, waiting).next_attempt_at = utcnow() - timedelta(seconds=1)
    sender = webhooks.Deliverer(db, lambda job_id: {}, None, interval=1)
    [row] = sender._due()
    [claimed] = sender._claim_all([row])
    before = dumped(db, waiting)

    def stale(s: Any, delivery_id: str) -> Any:
        found = read(s, delivery_id)
        assert found is not None
        return as_read, found[1], found[2]

    monkeypatch.setattr(webhook_deliveries, "_found", stale)
    assert webhook_deliveries.redeliver(db, waiting).status == "pending"
    assert dumped(db, waiting) == before
    assert webhooks.Deliverer(db, lambda job_id: {}, None, interval=1)._due() == []
    sender._failed(claimed, "answered 500")  # its result is written: the claim was its own still
    after = row_of(db, waiting)
    assert after is not None and (after.attempts, after.last_error, after.leased_until) == (4, "answered 500", None)


def read_row(db: Database, delivery_id: str) -> WebhookDelivery:
    row = row_of(db, delivery_id)
    assert row is not None
    return WebhookDelivery(**row.model_dump())


def test_a_redelivery_needs_the_project_s_url_now(admin: TestClient, admin_settings: Settings) -> None:
    project = create_project(admin)["id"]
    with database(admin_settings) as db:
        delivered = add_delivery(db, add_job(db, project), "delivered")
        before = dumped(db, delivered)
        error = assert_error(admin.post(f"/v1/webhook-deliveries/{delivered}/redeliver"), 409, "no_webhook_url")
        assert error["details"] == {"delivery_id": delivered, "project_id": project}
        assert dumped(db, delivered) == before


def test_another_project_s_key_cannot_redeliver(admin: TestClient, admin_settings: Settings) -> None:
    mine, other = create_project(admin, "mine", webhook_url=URL)["id"], create_project(admin, "other")["id"]
    missing = "whd_0000000000zzzzzzzzzzzzzz"
    with database(admin_settings) as db:
        delivery = add_delivery(db, add_job(db, mine), "failed")
        before = dumped(db, delivery)
        foreign = key_of(admin, other)
        refused = assert_error(admin.post(f"/v1/webhook-deliveries/{delivery}/redeliver", headers=foreign),
                               404, "not_found")
        unknown = assert_error(admin.post(f"/v1/webhook-deliveries/{missing}/redeliver", headers=foreign),
                               404, "not_found")
        assert refused["details"] == {"delivery_id": delivery}
        assert refused["message"] == unknown["message"].replace(missing, delivery)
        assert dumped(db, delivery) == before
        assert_error(admin.post(f"/v1/webhook-deliveries/{missing}/redeliver"), 404, "not_found")
        assert_error(admin.post(f"/v1/webhook-deliveries/{delivery}/redeliver", headers=NO_KEY), 401, "unauthorized")
        own = key_of(admin, mine)
        assert admin.post(f"/v1/webhook-deliveries/{delivery}/redeliver", headers=own).status_code == 202


def test_a_delivery_a_sender_claimed_after_it_was_read_is_left_to_that_sender(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_a_claimed_delivery_is_left_to_its_sender(db, monkeypatch)


def check_a_claimed_delivery_is_left_to_its_sender(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The update is conditional on what the read saw: a row read as given up, that a sender has
    claimed since (another process redelivered it in between), is left to that sender."""
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced", webhook_url=URL))
    claimed = add_delivery(db, add_job(db, "prj_1"), "claimed")
    before = dumped(db, claimed)
    read = webhook_deliveries._found

    def as_it_was(s: Any, delivery_id: str) -> Any:
        found = read(s, delivery_id)
        assert found is not None
        row, project_id, url = found
        return WebhookDelivery(**{**row.model_dump(), "next_attempt_at": None}), project_id, url

    monkeypatch.setattr(webhook_deliveries, "_found", as_it_was)
    with pytest.raises(DeliveryPending):
        webhook_deliveries.redeliver(db, claimed)
    assert dumped(db, claimed) == before



def test_a_sender_whose_claim_ended_does_not_write_over_a_redelivery(db: Database) -> None:
    check_a_late_sender_leaves_a_redelivery_alone(db)


def check_a_late_sender_leaves_a_redelivery_alone(db: Database) -> None:
    """A sender that outlived its claim (a process paused past the lease) ends its send after the
    row was sent by another and redelivered: its result is not written over the redelivery, which
    was never sent (marked delivered, it would be lost; given up, not sent)."""
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced", webhook_url=URL))
    job_id = add_job(db, "prj_1")
    for outcome in ("delivered", "failed"):
        delivery = add_delivery(db, job_id, "pending")
        late, other = (webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1) for _ in range(2))
        [row] = [r for r in late._due() if r.id == delivery]
        assert late._claim_all([row]) == [row]
        # Its lease ends; another process claims the row and delivers it; the studio redelivers it.
        with db.transaction() as s:
            s.get_one(WebhookDelivery, delivery).next_attempt_at = utcnow() - timedelta(seconds=1)
        [again] = [r for r in other._due() if r.id == delivery]
        assert other._claim_all([again]) == [again]
        other._delivered(again)
        webhook_deliveries.redeliver(db, delivery)
        redelivered = dumped(db, delivery)
        # The late sender's end lands now.
        if outcome == "delivered":
            late._delivered(row)
        else:
            late._failed(row, "answered 500")
        assert dumped(db, delivery) == redelivered, outcome
        assert webhook_deliveries.status_of(row_of(db, delivery)) == "pending"  # type: ignore[arg-type]


# -- retention -----------------------------------------------------------------------------------

def test_old_delivered_and_given_up_deliveries_are_pruned_in_batches_pending_ones_never(db: Database) -> None:
    check_old_deliveries_pruned(db)


def check_old_deliveries_pruned(db: Database) -> None:
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced"))
    job = add_job(db, "prj_1")
    pruned = [add_delivery(db, job, "delivered", age_days=31) for _ in range(3)]
    pruned += [add_delivery(db, job, "failed", age_days=31) for _ in range(3)]
    # Redelivered long ago, and given up again since.
    pruned.append(add_delivery(db, job, "failed", age_days=90, redelivered_days=40))
    kept = [add_delivery(db, job, "delivered", age_days=29), add_delivery(db, job, "failed", age_days=29),
            add_delivery(db, job, "pending", age_days=400), add_delivery(db, job, "claimed", age_days=400),
            # Made long ago, redelivered lately and given up again: its age is the redelivery's.
            add_delivery(db, job, "failed", age_days=90, redelivered_days=1)]
    assert webhook_deliveries.expire_deliveries(db, 30, batch=2, pause=0) == len(pruned)
    with db.session() as s:
        left = set(s.exec(select(WebhookDelivery.id)).all())
    assert left == set(kept)
    assert webhook_deliveries.expire_deliveries(db, 30, batch=2, pause=0) == 0


def test_the_prune_reads_the_due_index(db: Database) -> None:
    """Both of its reads find their rows through `ix_webhook_deliveries_due`, not the whole table."""
    cutoff = utcnow()
    with db.session() as s:
        for expired in webhook_deliveries._expired(cutoff):
            query = select(WebhookDelivery.id).where(expired).limit(500)
            compiled = query.compile(db.engine)
            plan = s.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled),
                                                  tuple(None for _ in compiled.positiontup or ())).all()
            told = " ".join(str(step[-1]) for step in plan)
            assert "ix_webhook_deliveries_due" in told, told


def test_the_retention_setting(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_settings().webhook_retention_days == 30
    monkeypatch.setenv("ORCH_WEBHOOK_RETENTION_DAYS", "7")
    assert make_settings().webhook_retention_days == 7
    assert make_settings(webhook_retention_days=0).webhook_retention_days == 0
    for bad in (-1, 36_501, 1.5):
        with pytest.raises(ValidationError):
            make_settings(webhook_retention_days=bad)


def test_the_asset_sweep_prunes_them_at_start_and_0_keeps_them(make_settings: SettingsFactory) -> None:
    kept_settings = make_settings(webhook_retention_days=0)
    with database(kept_settings) as db:
        db.migrate()
        with db.transaction() as s:
            s.add(Project(id="prj_1", name="p", policy="balanced"))
        job = add_job(db, "prj_1")
        old = add_delivery(db, job, "delivered", age_days=3650)
        recent = add_delivery(db, job, "delivered", age_days=1)

    def left(settings: Settings) -> set[str]:
        with database(settings) as db, db.session() as s:
            return set(s.exec(select(WebhookDelivery.id)).all())

    with TestClient(create_app(kept_settings)) as client:
        assert client.app.state.services.expire_webhook_deliveries() == 0  # type: ignore[attr-defined]
        assert left(kept_settings) == {old, recent}
    settings = make_settings(webhook_retention_days=30)
    with TestClient(create_app(settings)):
        deadline = time.monotonic() + 30
        while left(settings) != {recent}:  # the sweep a start runs, in the background
            assert time.monotonic() < deadline, left(settings)
            time.sleep(0.05)


# -- a time range --------------------------------------------------------------------------------

WINDOW_START = datetime(2026, 11, 1, tzinfo=UTC)


def add_delivery_at(db: Database, job_id: str, status: str, hours: int) -> str:
    """A delivery in `status` (as `add_delivery`) made `hours` after WINDOW_START, with an id made
    then as the service makes it (`ids.new_id` at its `created_at`), whatever ids were made before."""
    made = WINDOW_START + timedelta(hours=hours, microseconds=250)
    delivery = add_delivery(db, job_id, status)
    at_made = lowest_id("whd", made)[:-16] + delivery[-16:]
    with db.transaction() as s:
        s.execute(update(WebhookDelivery).where(col(WebhookDelivery.id) == delivery).values(id=at_made,
                                                                                           created_at=made))
    return at_made


def test_the_lists_take_a_time_range_with_their_cursors_and_filters(
        admin: TestClient, admin_settings: Settings) -> None:
    mine, other = create_project(admin, "mine")["id"], create_project(admin, "other")["id"]
    with database(admin_settings) as db:
        jobs = {mine: add_job(db, mine), other: add_job(db, other)}
        made = [(add_delivery_at(db, jobs[project], status, hours), project, status, hours)
                for hours, (project, status) in enumerate([(mine, "delivered"), (other, "failed"), (mine, "failed"),
                                                           (other, "delivered"), (mine, "waiting"), (mine, "failed")])]

    def within(since: int | None, until: int | None, **only: str) -> list[str]:
        return [d for d, project, status, hours in reversed(made)
                if (since is None or hours >= since) and (until is None or hours < until)
                and only.get("project", project) == project and only.get("status", status) == status]

    def at(hours: int, zone: str = "Z") -> str:
        when = WINDOW_START + timedelta(hours=hours, microseconds=250)
        return z(when) if zone == "Z" else (when + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%f") + zone

    everyone, own = "/v1/webhooks/deliveries", f"/v1/projects/{mine}/webhook-deliveries"
    # At or after `since` (a delivery made at that very microsecond included), before `until`.
    assert ids(admin.get(everyone, params={"since": at(2)})) == within(2, None)
    assert ids(admin.get(everyone, params={"until": at(4)})) == within(None, 4)
    assert ids(admin.get(everyone, params={"since": at(1), "until": at(4)})) == within(1, 4)
    assert ids(admin.get(everyone, params={"since": at(1), "until": at(1)})) == []
    # The first and last times there are: every delivery (narrowing the ids by a minute past them was a 500).
    assert ids(admin.get(own, params={"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999999Z"})) == (
        within(None, None, project=mine))
    assert ids(admin.get(everyone, params={"since": at(1, "+01:00"), "until": at(4, "+01:00")})) == within(1, 4)
    assert ids(admin.get(everyone, params={"since": at(1), "order": "asc"})) == within(1, None)[::-1]
    assert ids(admin.get(everyone, params={"since": at(1), "status": "failed"})) == within(1, None, status="failed")
    assert ids(admin.get(everyone, params={"until": at(5), "status": "pending"})) == within(None, 5, status="waiting")
    assert ids(admin.get(everyone, params={"since": at(1), "project_id": mine})) == within(1, None, project=mine)
    assert ids(admin.get(own, params={"since": at(1), "until": at(5)})) == within(1, 5, project=mine)
    assert ids(admin.get(own, params={"since": at(3), "status": "failed"})) == within(3, None, project=mine,
                                                                                  status="failed")
    # A page at a time: the cursor goes on inside the range, both ways.
    for order in ("desc", "asc"):
        pages, cursor = [], None
        while True:
            page = admin.get(everyone, params={"since": at(1), "until": at(5), "limit": 1, "order": order,
                                               **({"cursor": cursor} if cursor else {})}).json()
            pages += [i["id"] for i in page["items"]]
            if (cursor := page["next_cursor"]) is None:
                break
        assert pages == (within(1, 5) if order == "desc" else within(1, 5)[::-1])


@pytest.mark.parametrize("params", [
    {"since": "yesterday"}, {"since": "1700000000"}, {"until": "2026-11-01"}, {"since": "2026-11-01T00:00:00"},
    {"until": "2026-13-01T00:00:00Z"}, {"since": "2026-11-01T01:00:00 01:00"},
    {"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}])
def test_a_time_range_the_lists_cannot_read_is_refused_in_the_error_shape(
        admin: TestClient, params: dict[str, str]) -> None:
    mine = create_project(admin, "mine")["id"]
    for path in ("/v1/webhooks/deliveries", f"/v1/projects/{mine}/webhook-deliveries"):
        error = assert_error(admin.get(path, params=params), 422, "invalid_request")
        assert ("since" in json.dumps(error)) or ("until" in json.dumps(error)), error


def test_a_time_range_reads_a_range_of_the_index_a_page_is_read_from(db: Database) -> None:
    """With `since` and `until`, a page is still read from the index of its list (and of its
    status) alone, as a range of ids: not from every row after (or before) the window."""
    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().startswith("SELECT") and "webhook_deliveries" in statement:
            statements.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        with db.session() as s:
            for project, status, index in ((None, "pending", "ix_webhook_deliveries_pending"),
                                           (None, "failed", "ix_webhook_deliveries_failed"),
                                           ("prj_1", None, "ix_webhook_deliveries_project")):
                for order in ("desc", "asc"):
                    statements.clear()
                    webhook_deliveries.listed(s, project, status=status, job_id=None, after=None,  # type: ignore[arg-type]
                                              order=order, limit=51, since=WINDOW_START,
                                              until=WINDOW_START + timedelta(days=1))
                    [(statement, parameters)] = statements
                    plan = s.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
                    told = " | ".join(str(step[-1]) for step in plan)
                    assert f"USING INDEX {index} (" in told and "id>? AND id<?" in told, (status, order, told)
                    assert "TEMP B-TREE" not in told, (status, order, told)
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)


@pytest.mark.parametrize("writer", ["job_ended", "job_ended_at"])
def test_a_delivery_made_after_the_clock_stepped_back_is_in_the_until_range_its_created_at_is(
        db: Database, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    # Ids stay monotonic when the clock steps back (`ids.new_id`): a delivery made then had an id
    # minutes ahead of its `created_at`, and a `?until=` between the two (past ID_SLACK) left it out,
    # though it was made before that `until`.
    monkeypatch.setattr(made_ids, "_last", {})
    real = time.time_ns() // 1000
    monkeypatch.setattr(clock, "_host_us", lambda: real + 10 * 60_000_000)  # ten minutes ahead
    new_id("whd")  # an id made then: those after it stay after it
    monkeypatch.setattr(clock, "_host_us", lambda: real)  # NTP stepped the clock back
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="a", policy="balanced", webhook_url=URL))
    job = add_job(db, "prj_1")
    with db.transaction() as s:
        if writer == "job_ended":
            webhooks.job_ended(s, job, "prj_1", "succeeded")
        else:
            webhooks.job_ended_at(s, job, "prj_1", "succeeded", URL)
    with db.session() as s:
        [made] = s.exec(select(WebhookDelivery)).all()
    for minutes in (-1, 5, 9, 11, 20):
        until = clock.at(real) + timedelta(minutes=minutes)
        with db.session() as s:
            read = webhook_deliveries.listed(s, "prj_1", status=None, job_id=None, after=None, order="desc",
                                             limit=10, until=until)
        assert [r.id for r in read] == ([made.id] if made.created_at < until else []), minutes
    assert made.created_at >= made_ids.made_at(made.id)  # never made before its id says


def test_a_time_range_is_read_by_created_at(db: Database) -> None:
    check_a_time_range_read(db)


def check_a_time_range_read(db: Database) -> None:
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="a", policy="balanced"))
    job = add_job(db, "prj_1")
    made = [add_delivery_at(db, job, status, hours) for hours, status in enumerate(["delivered", "failed", "failed"])]

    def read(status: Any, since: int, until: int, order: str = "desc") -> list[str]:
        with db.session() as s:
            return [r.id for r in webhook_deliveries.listed(
                s, None, status=status, job_id=None, after=None, order=order, limit=10,
                since=WINDOW_START + timedelta(hours=since, microseconds=250),
                until=WINDOW_START + timedelta(hours=until, microseconds=250))]

    assert read(None, 0, 2) == made[1::-1]
    assert read(None, 1, 3, "asc") == made[1:]
    assert read("failed", 2, 3) == made[2:]
    assert read("delivered", 1, 3) == []
