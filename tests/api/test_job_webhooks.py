"""A job's own `webhook_url`: its end goes there instead of its project's URL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlmodel import select

from orchestrator import webhooks
from orchestrator.db import Database
from orchestrator.models import IdempotencyKey, Job, LedgerEntry, Project, WebhookDelivery
from orchestrator.settings import Settings
from tests.api import SMALL, assert_error, create_project, job_count, run_draft, submit_draft, wait_for_job
from tests.api.test_webhooks import ADMIN_KEY, SECRET, Receiver, _verified

BAD_URLS = ["ftp://example.com/hook", "https://user:pw@example.com/", "https://example.com/" + "a" * 2000,
            "https://xn--a.example/hooks", " https://example.com/hooks", 5]


def _settled(client: httpx.Client) -> None:
    """Until every delivery is sent (none pending), by /metrics."""
    deadline = time.monotonic() + 30
    while "orchestrator_webhooks_pending 0" not in (metrics := client.get("/metrics").text):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)


def test_a_job_s_url_gets_its_end_instead_of_the_project_s(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    project_receiver, job_receiver = Receiver(), Receiver()
    try:
        client = start_server(make_settings(webhook_secret=SECRET))
        project = create_project(client, webhook_url=project_receiver.url)["id"]
        accepted = submit_draft(client, project, webhook_url=job_receiver.url)
        assert accepted["webhook_url"] == job_receiver.url
        job = wait_for_job(client, accepted["id"], ("succeeded",))
        assert job["webhook_url"] == job_receiver.url
        [(headers, body)] = job_receiver.wait_for(1)
        _verified(headers, body)  # signed as the project's deliveries are
        assert json.loads(body)["job"]["id"] == job["id"]
        _settled(client)
        assert project_receiver.posts == []
        [delivery] = client.get(f"/v1/projects/{project}/webhook-deliveries").json()["items"]
        assert delivery["url"] == job_receiver.url
        # A redelivery goes to the job's URL too, not to the project's current one.
        assert client.post(f"/v1/webhook-deliveries/{delivery['id']}/redeliver").json()["url"] == job_receiver.url
        job_receiver.wait_for(2)
        # A job without a URL of its own still goes to its project's.
        other = run_draft(client, project)
        assert other["webhook_url"] is None
        [(_, body)] = project_receiver.wait_for(1)
        assert json.loads(body)["job"]["id"] == other["id"]
    finally:
        project_receiver.close()
        job_receiver.close()


def test_a_job_s_url_is_used_by_a_project_without_one(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    receiver = Receiver()
    try:
        client = start_server(make_settings())
        project = create_project(client)["id"]
        job = run_draft(client, project, webhook_url=receiver.url)
        [(headers, body)] = receiver.wait_for(1)
        assert json.loads(body) == {"type": "job.succeeded", "job": client.get(f"/v1/jobs/{job['id']}").json()}
        assert "webhook-signature" not in headers  # no ORCH_WEBHOOK_SECRET: unsigned, as a project's
        # Its project still has none: a redelivery goes to the job's.
        [delivery] = client.get(f"/v1/projects/{project}/webhook-deliveries").json()["items"]
        assert client.post(f"/v1/webhook-deliveries/{delivery['id']}/redeliver").status_code == 202
        receiver.wait_for(2)
    finally:
        receiver.close()


def test_the_end_written_by_any_process_reads_the_job_s_url(db: Database) -> None:
    # Every end but a cache hit's is written by `job_ended` from the rows (the runner, a fallback's
    # end, a cancel, recovery after a restart): the job's URL is read from its row there.
    check_the_end_reads_the_job_s_url(db)


def check_the_end_reads_the_job_s_url(db: Database) -> None:
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced", webhook_url="https://project.example/hooks"))
        s.flush()
        s.add(Job(id="job_1", project_id="prj_1", stage="ideation", engine="lite", status="failed",
                  webhook_url="https://job.example/hooks"))
        s.add(Job(id="job_2", project_id="prj_1", stage="ideation", engine="lite", status="failed"))
    with db.transaction() as s:
        webhooks.job_ended(s, "job_1", "prj_1", "failed")
        webhooks.job_ended(s, "job_2", "prj_1", "failed")
    with db.session() as s:
        urls = {row.job_id: row.url for row in s.exec(select(WebhookDelivery))}
    assert urls == {"job_1": "https://job.example/hooks", "job_2": "https://project.example/hooks"}


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_job_url_is_refused_and_nothing_is_written(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client], url: Any) -> None:
    settings = make_settings(hifi_model="builtin:tiny-sd")
    client = start_server(settings)
    project = create_project(client)["id"]
    asset = run_draft(client, project, n=1, seed=5, **SMALL)["assets"][0]
    posts: list[tuple[str, dict[str, Any]]] = [
        (f"/v1/projects/{project}/drafts", {"prompt": "a lighthouse", "n": 1, **SMALL}),
        (f"/v1/assets/{asset}/promote", {"engine": "local-hifi"}),
        (f"/v1/assets/{asset}/polish", {"scale": 1, "engine": "local-hifi"})]
    for path, body in posts:
        error = assert_error(client.post(path, json={**body, "webhook_url": url}, headers={"Idempotency-Key": "k"}),
                             422, "invalid_request")
        assert "webhook_url" in json.dumps(error)
    assert job_count(client) == 1
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            assert s.exec(select(IdempotencyKey)).all() == []
    finally:
        db.dispose()


def test_an_idempotent_replay_tells_job_urls_apart(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    body = {"prompt": "a lighthouse", "n": 1, "seed": 3, **SMALL, "webhook_url": "https://a.example/hooks"}

    def post(sent: dict[str, Any]) -> httpx.Response:
        return server.post(f"/v1/projects/{project}/drafts", json=sent, headers={"Idempotency-Key": "job-url"})

    first = post(body)
    assert first.status_code == 202, first.text
    again = post(body)
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["webhook_url"] == "https://a.example/hooks"
    for other in ({**body, "webhook_url": "https://b.example/hooks"}, {**body, "webhook_url": None},
                  {k: v for k, v in body.items() if k != "webhook_url"}):
        assert_error(post(other), 409, "idempotency_conflict")
    assert job_count(server) == 1


def _written(settings: Settings) -> tuple[int, int, int]:
    """(jobs, idempotency keys, ledger entries) in the service's database."""
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            return (len(s.exec(select(Job)).all()), len(s.exec(select(IdempotencyKey)).all()),
                    len(s.exec(select(LedgerEntry)).all()))
    finally:
        db.dispose()


def test_a_project_key_names_a_job_url_only_on_its_project_s_receiver(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    # Before, any project key could have the service POST a job's end to any host it reaches (a
    # metadata address, a service on its own network), though only the admin sets a project's URL.
    check_a_project_key_names_a_job_url_only_on_its_project_s_receiver(
        make_settings(admin_key=ADMIN_KEY, hifi_model="builtin:tiny-sd"), start_server)


def check_a_project_key_names_a_job_url_only_on_its_project_s_receiver(
        settings: Settings, start_server: Callable[[Settings], httpx.Client]) -> None:
    """`settings`: with ADMIN_KEY and a local-hifi model."""
    receiver = Receiver()
    base = start_server(settings).base_url
    port = receiver.url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
            project = create_project(admin, webhook_url=receiver.url)["id"]
            key = admin.post(f"/v1/projects/{project}/keys", json={"name": "pipeline"}).json()["key"]
            asset = run_draft(admin, project, n=1, seed=5, **SMALL)["assets"][0]
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as mine:
                # Another path, query and spelling of the project's receiver (scheme, host, port) is its own.
                same = f"HTTP://127.0.0.1:{port}/hooks/branch-1?ci=1"
                made = submit_draft(mine, project, webhook_url=same)
                assert made["webhook_url"] == same
                wait_for_job(admin, made["id"], ("succeeded",))
                receiver.wait_for(2)  # the admin's draft's end, then this one's
                before = _written(settings)
                posts: list[tuple[str, dict[str, Any]]] = [
                    (f"/v1/projects/{project}/drafts", {"prompt": "a lighthouse", "n": 1, **SMALL}),
                    (f"/v1/assets/{asset}/promote", {"engine": "local-hifi"}),
                    (f"/v1/assets/{asset}/polish", {"scale": 1, "engine": "local-hifi"})]
                for other in (f"http://127.0.0.1:{int(port) + 1}/hooks", f"https://127.0.0.1:{port}/hooks",
                              f"http://localhost:{port}/hooks", "http://169.254.169.254/latest/meta-data",
                              f"http://[::ffff:127.0.0.2]:{port}/hooks", f"http://[::ffff:127.0.0.1%lo]:{port}/hooks"):
                    for path, body in posts:
                        error = assert_error(mine.post(path, json={**body, "webhook_url": other},
                                                       headers={"Idempotency-Key": "k"}), 403, "forbidden")
                        assert "admin key" in error["message"] and error["details"]["allowed_receiver"] == (
                            f"http://127.0.0.1:{port}")
                    # Explain answers as the submit would: its 200 said such a job would be taken.
                    for explained in ({"stage": "ideation", **posts[0][1]},
                                      {"stage": "bridge", "source_asset_id": asset, **posts[1][1]},
                                      {"stage": "polish", "source_asset_id": asset, **posts[2][1]}):
                        assert_error(mine.post("/v1/route/explain", json={**explained, "webhook_url": other}),
                                     403, "forbidden")
                assert _written(settings) == before
                # The IPv6 address mapping 127.0.0.1 is that receiver too: httpx connects it there.
                for spelled in (same, f"http://[::ffff:127.0.0.1]:{port}/hooks", f"http://[::FFFF:7f00:1]:{port}/"):
                    assert mine.post("/v1/route/explain", json={"stage": "ideation", **posts[0][1],
                                                                "webhook_url": spelled}).status_code == 200
                # The admin key may name any URL the checks accept.
                elsewhere = f"http://127.0.0.1:{int(port) + 1}/hooks"
                assert submit_draft(admin, project, webhook_url=elsewhere)["webhook_url"] == elsewhere
            bare = create_project(admin, name="no url")["id"]
            bare_key = admin.post(f"/v1/projects/{bare}/keys", json={"name": "pipeline"}).json()["key"]
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {bare_key}"}, timeout=60) as theirs:
                before = _written(settings)
                error = assert_error(theirs.post(f"/v1/projects/{bare}/drafts", json={
                    "prompt": "a lighthouse", "n": 1, **SMALL, "webhook_url": receiver.url},
                    headers={"Idempotency-Key": "k"}), 403, "forbidden")
                assert "has no webhook_url" in error["message"] and "admin key" in error["message"]
                assert _written(settings) == before
                # Without a URL of its own, as before: nothing to check.
                assert submit_draft(theirs, bare)["webhook_url"] is None
            assert submit_draft(admin, bare, webhook_url=receiver.url)["webhook_url"] == receiver.url
    finally:
        receiver.close()


def test_a_job_keeps_the_url_it_was_allowed_after_its_project_s_changes(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    # Checked as the job is made: the admin moving the project's URL later does not move that job's
    # end, and a retry of its request (the same Idempotency-Key) replays it rather than refusing it.
    first, second = Receiver(), Receiver()
    base = start_server(make_settings(admin_key=ADMIN_KEY)).base_url
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
            project = create_project(admin, webhook_url=first.url)["id"]
            key = admin.post(f"/v1/projects/{project}/keys", json={"name": "pipeline"}).json()["key"]
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as mine:
                body = {"prompt": "a lighthouse", "n": 1, "seed": 3, **SMALL, "webhook_url": first.url + "/job"}
                made = mine.post(f"/v1/projects/{project}/drafts", json=body, headers={"Idempotency-Key": "once"})
                assert made.status_code == 202, made.text
                assert admin.patch(f"/v1/projects/{project}", json={"webhook_url": second.url}).status_code == 200
                again = mine.post(f"/v1/projects/{project}/drafts", json=body, headers={"Idempotency-Key": "once"})
                assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true", again.text
                assert again.json()["id"] == made.json()["id"]
                assert_error(mine.post(f"/v1/projects/{project}/drafts", json=body), 403, "forbidden")
                wait_for_job(mine, made.json()["id"], ("succeeded",))
                first.wait_for(1)
                [delivery] = mine.get(f"/v1/projects/{project}/webhook-deliveries").json()["items"]
                redelivered = mine.post(f"/v1/webhook-deliveries/{delivery['id']}/redeliver").json()
                assert redelivered["url"] == first.url + "/job"
                first.wait_for(2)
                assert second.posts == []
    finally:
        first.close()
        second.close()
