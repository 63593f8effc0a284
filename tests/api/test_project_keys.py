"""Project-scoped API keys: a key reaches its own project's resources, answers another project's
exactly as missing ones, cannot do what only the admin may, and stops working when revoked."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from orchestrator import keys
from orchestrator.errors import SECRET_PREFIX
from orchestrator.settings import Settings
from tests.api import SLOW, SMALL, assert_error, create_project, iter_sse, read_events, run_draft

ADMIN_KEY = "admin-s3cret"


@dataclass
class World:
    admin: httpx.Client
    mine: httpx.Client  # with project A's key
    key: dict[str, Any]  # A's key as created (with its secret)
    a: str
    b: str
    job_a: str
    asset_a: str
    job_b: str
    asset_b: str


@pytest.fixture
def world(make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> Iterator[World]:
    base = start_server(make_settings(admin_key=ADMIN_KEY)).base_url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        a, b = create_project(admin, "A")["id"], create_project(admin, "B")["id"]
        created = admin.post(f"/v1/projects/{a}/keys", json={"name": "pipeline"})
        assert created.status_code == 201, created.text
        key = created.json()
        job_b = run_draft(admin, b)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key['key']}"}, timeout=30) as mine:
            job_a = run_draft(mine, a)
            yield World(admin, mine, key, a, b, job_a["id"], job_a["assets"][0], job_b["id"], job_b["assets"][0])


def test_a_key_is_shown_once_and_listed_without_its_secret(world: World) -> None:
    key = world.key
    assert key["key"].startswith("orch_pk_") and len(key["key"]) > 40
    assert key["key"].startswith(key["prefix"]) and key["prefix"] != key["key"]
    assert (key["project_id"], key["name"], key["revoked_at"]) == (world.a, "pipeline", None)
    listed = world.admin.get(f"/v1/projects/{world.a}/keys").json()
    assert listed["next_cursor"] is None
    assert [{**k, "key": key["key"]} for k in listed["items"]] == [key]
    assert "key" not in listed["items"][0]
    assert world.admin.get(f"/v1/projects/{world.b}/keys").json()["items"] == []
    # Newest first, paged, as every other list can (`order` was ignored here).
    other = world.admin.post("/v1/projects", json={"name": "key order"}).json()["id"]
    made = [world.admin.post(f"/v1/projects/{other}/keys", json={"name": name}).json()["id"] for name in "ab"]
    newest = world.admin.get(f"/v1/projects/{other}/keys", params={"order": "desc", "limit": 1}).json()
    assert [k["id"] for k in newest["items"]] == [made[1]] and newest["next_cursor"] == made[1]
    older = world.admin.get(f"/v1/projects/{other}/keys", params={"order": "desc", "cursor": made[1]}).json()
    assert [k["id"] for k in older["items"]] == [made[0]] and older["next_cursor"] is None
    assert world.admin.get(f"/v1/projects/{other}/keys", params={"order": "up"}).status_code == 422
    # The answer holding a secret is kept by no cache on its way.
    assert world.admin.post(f"/v1/projects/{other}/keys", json={"name": "c"}).headers["cache-control"] == "no-store"


def test_a_retried_key_request_makes_no_second_key(world: World) -> None:
    # A pipeline retrying after a timeout made a second live key whose secret it never saw.
    url, body = f"/v1/projects/{world.b}/keys", {"name": "ci"}
    first = world.admin.post(url, json=body, headers={"Idempotency-Key": "mk-1"})
    assert first.status_code == 201, first.text
    # Its Location leads to the key (without its secret).
    made = world.admin.get(first.headers["location"])
    assert made.status_code == 200 and made.json() == {k: v for k, v in first.json().items() if k != "key"}
    again = world.admin.post(url, json=body, headers={"Idempotency-Key": "mk-1"})
    error = assert_error(again, 409, "conflict")
    assert error["details"] == {"key_id": first.json()["id"], "idempotency_key": "mk-1"}
    assert "key" not in again.json()  # the secret is never shown twice
    assert_error(world.admin.post(url, json={"name": "other"}, headers={"Idempotency-Key": "mk-1"}),
                 409, "idempotency_conflict")
    assert [k["id"] for k in world.admin.get(url).json()["items"]] == [first.json()["id"]]
    assert world.admin.post(url, json=body, headers={"Idempotency-Key": "mk-2"}).status_code == 201


def test_a_key_works_on_its_own_project(world: World) -> None:
    mine, a = world.mine, world.a
    assert mine.get(f"/v1/projects/{a}").json()["name"] == "A"
    assert [p["id"] for p in mine.get("/v1/projects").json()["items"]] == [a]
    assert [j["id"] for j in mine.get("/v1/jobs").json()["items"]] == [world.job_a]
    assert [e.event for e in read_events(mine, world.job_a)][-1] == "succeeded"
    content = mine.get(f"/v1/assets/{world.asset_a}/content")
    assert content.status_code == 200 and content.content.startswith(b"\x89PNG")
    assert mine.head(f"/v1/assets/{world.asset_a}/content").status_code == 200
    assert mine.get(f"/v1/assets/{world.asset_a}/lineage").status_code == 200
    assert mine.get(f"/v1/projects/{a}/assets").json()["items"][0]["id"] == world.asset_a
    assert mine.get(f"/v1/projects/{a}/budget").status_code == 200
    assert mine.get(f"/v1/projects/{a}/ledger").status_code == 200
    spend = mine.get("/v1/spend", params={"group_by": "project"}).json()
    assert {g["key"] for g in spend["groups"]} <= {a}
    explained = mine.post("/v1/route/explain", json={"project_id": a, "stage": "ideation", "prompt": "x", **SMALL})
    assert explained.status_code == 200, explained.text
    implied = mine.post("/v1/route/explain", json={"stage": "ideation", "prompt": "x", **SMALL})  # the key's project
    assert implied.status_code == 200 and implied.json()["project_id"] == a, implied.text
    assert mine.get("/v1/engines").status_code == 200
    assert mine.get("/v1/policies").status_code == 200
    # Unknown routes answer as they do for the admin: the key is valid.
    assert_error(mine.get("/v1/nope"), 404, "not_found")


def _same_as_missing(response: httpx.Response, missing: httpx.Response, real_id: str, fake_id: str) -> None:
    """Another project's resource must read exactly like an id that does not exist."""
    assert response.status_code == missing.status_code == 404, (response.text, missing.text)
    assert response.text.replace(real_id, fake_id) == missing.text


def test_another_projects_resources_read_as_missing(world: World) -> None:
    mine, b = world.mine, world.b
    fake = {"prj": "prj_0000000000aaaaaaaaaaaaaaaa", "job": "job_0000000000aaaaaaaaaaaaaaaa",
            "ast": "ast_0000000000aaaaaaaaaaaaaaaa"}
    cases: list[tuple[str, str, str, dict[str, Any] | None]] = [
        ("GET", "/v1/projects/{prj}", b, None),
        ("GET", "/v1/projects/{prj}/assets", b, None),
        ("GET", "/v1/projects/{prj}/budget", b, None),
        ("GET", "/v1/projects/{prj}/ledger", b, None),
        ("POST", "/v1/projects/{prj}/drafts", b, {"prompt": "x", "n": 1, **SMALL}),
        ("PATCH", "/v1/projects/{prj}", b, {"name": "mine now"}),
        ("POST", "/v1/projects/{prj}/grants", b, {"amount": 5}),
        ("GET", "/v1/projects/{prj}/keys", b, None),
        ("POST", "/v1/projects/{prj}/keys", b, {"name": "mine"}),
        ("GET", "/v1/jobs/{job}", world.job_b, None),
        ("GET", "/v1/jobs/{job}/events", world.job_b, None),
        ("GET", "/v1/jobs/{job}/preview", world.job_b, None),
        ("POST", "/v1/jobs/{job}/cancel", world.job_b, None),
        ("GET", "/v1/assets/{ast}", world.asset_b, None),
        ("GET", "/v1/assets/{ast}/content", world.asset_b, None),
        ("GET", "/v1/assets/{ast}/lineage", world.asset_b, None),
        ("POST", "/v1/assets/{ast}/promote", world.asset_b, {}),
        ("POST", "/v1/assets/{ast}/polish", world.asset_b, {}),
    ]
    for method, template, real, body in cases:
        kind = real[:3]
        response = mine.request(method, template.format(**{kind: real}), json=body)
        missing = mine.request(method, template.format(**{kind: fake[kind]}), json=body)
        _same_as_missing(response, missing, real, fake[kind])
        # HEAD on a GET route tells nothing either.
        if method == "GET":
            assert mine.head(template.format(**{kind: real})).status_code == 404
    assert_error(mine.get("/v1/spend", params={"project_id": b}), 404, "not_found")
    assert_error(mine.get("/v1/jobs", params={"project_id": b}), 404, "not_found")  # as one that does not exist
    for body in ({"project_id": b, "stage": "ideation", "prompt": "x", **SMALL},
                 {"stage": "bridge", "source_asset_id": world.asset_b}):
        assert_error(mine.post("/v1/route/explain", json=body), 404, "not_found")
    # Nothing of B changed: its job is not canceled, nothing was made or granted, B kept its name.
    assert world.admin.get(f"/v1/jobs/{world.job_b}").json()["status"] == "succeeded"
    assert [j["id"] for j in world.admin.get("/v1/jobs", params={"project_id": b}).json()["items"]] == [world.job_b]
    assert world.admin.get(f"/v1/projects/{b}").json()["name"] == "B"
    assert world.admin.get(f"/v1/projects/{b}/budget").json()["granted"] == 0


def test_a_key_deletes_its_own_project_s_assets_only(world: World) -> None:
    assert_error(world.mine.delete(f"/v1/assets/{world.asset_b}"), 404, "not_found")
    assert world.admin.get(f"/v1/assets/{world.asset_b}").status_code == 200
    assert world.mine.delete(f"/v1/assets/{world.asset_a}").status_code == 204
    assert_error(world.mine.get(f"/v1/assets/{world.asset_a}/content"), 410, "gone")


def test_every_route_with_an_id_keeps_another_project_out(world: World) -> None:
    """A guard for routes added later: every operation of the document that takes a project, job
    or asset id answers another project's as it answers an id that does not exist, never 2xx."""
    # A webhook delivery of B's (to a port nothing listens on: pending, tried again).
    hooked = world.admin.patch(f"/v1/projects/{world.b}", json={"webhook_url": "http://127.0.0.1:9/hooks"})
    assert hooked.status_code == 200, hooked.text
    run_draft(world.admin, world.b)
    [delivery_b] = world.admin.get(f"/v1/projects/{world.b}/webhook-deliveries").json()["items"]
    real = {"project_id": world.b, "job_id": world.job_b, "asset_id": world.asset_b, "key_id": "key_x",
            "entry_id": "1", "delivery_id": delivery_b["id"]}
    fake = {"project_id": "prj_0000000000aaaaaaaaaaaaaaaa", "job_id": "job_0000000000aaaaaaaaaaaaaaaa",
            "asset_id": "ast_0000000000aaaaaaaaaaaaaaaa", "key_id": "key_x", "entry_id": "1",
            "delivery_id": "whd_0000000000aaaaaaaaaaaaaaaa"}
    spec = world.admin.get("/openapi.json").json()
    checked = 0
    for path, operations in spec["paths"].items():
        names = re.findall(r"{(\w+)}", path)
        if not names or names == ["name"]:  # no id, or a policy's name: shared by all projects
            continue
        for method in operations:
            body: dict[str, Any] | None = {} if method in ("post", "patch") else None
            response = world.mine.request(method.upper(), path.format(**{n: real[n] for n in names}), json=body)
            missing = world.mine.request(method.upper(), path.format(**{n: fake[n] for n in names}), json=body)
            assert response.status_code >= 400, (method, path, response.text)
            text = response.text
            for name in names:
                text = text.replace(real[name], fake[name])
            assert (response.status_code, text) == (missing.status_code, missing.text), (method, path)
            checked += 1
    assert checked >= 18


def test_only_the_admin_creates_changes_grants_reloads_and_manages_keys(world: World) -> None:
    mine, a = world.mine, world.a
    for method, url, body in [("POST", "/v1/projects", {"name": "another"}),
                              ("PATCH", f"/v1/projects/{a}", {"budget": {"limit": 1e6}}),
                              ("POST", f"/v1/projects/{a}/grants", {"amount": 1000}),
                              ("POST", f"/v1/projects/{a}/ledger/1/reconcile", {"charged": 0}),
                              ("POST", "/v1/policies/reload", None),
                              ("POST", f"/v1/projects/{a}/keys", {"name": "second"}),
                              ("GET", f"/v1/projects/{a}/keys", None),
                              ("GET", f"/v1/projects/{a}/keys/{world.key['id']}", None),
                              ("DELETE", f"/v1/projects/{a}/keys/{world.key['id']}", None)]:
        error = assert_error(mine.request(method, url, json=body), 403, "forbidden")
        assert "admin key" in error["message"]
    assert [p["name"] for p in world.admin.get("/v1/projects").json()["items"]] == ["A", "B"]
    assert world.admin.get(f"/v1/projects/{a}/budget").json()["granted"] == 0
    assert world.admin.get(f"/v1/projects/{a}").json()["budget"]["limit"] is None


def test_an_admin_only_request_is_refused_before_its_body_is_judged(world: World) -> None:
    # The check was in the handlers, which run after FastAPI validates the body and parameters: a
    # project key was told what was wrong with a body it may not send (422), not that it may not.
    mine, a, b = world.mine, world.a, world.b
    for method, url, body in [("POST", "/v1/projects", {}),
                              ("PATCH", f"/v1/projects/{a}", {"budget": {"limit": -1}}),
                              ("POST", f"/v1/projects/{a}/grants", {"amount": -5}),
                              ("POST", f"/v1/projects/{a}/ledger/1/reconcile", {"charged": "all"}),
                              ("POST", f"/v1/projects/{a}/keys", {}),
                              ("GET", f"/v1/projects/{a}/keys?limit=0", None)]:
        assert_error(mine.request(method, url, json=body), 403, "forbidden")
    # Another project's stay as missing as its other resources.
    assert_error(mine.post(f"/v1/projects/{b}/grants", json={"amount": -5}), 404, "not_found")
    assert_error(mine.post(f"/v1/projects/{b}/keys", json={}), 404, "not_found")
    # The admin is still told what is wrong with the body.
    assert_error(world.admin.post(f"/v1/projects/{a}/grants", json={"amount": -5}), 422, "invalid_request")


def test_a_token_no_key_could_be_costs_no_database_read(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any token starting orch_pk_ was looked up: a flood of made-up ones queued behind real keys.
    looked_up: list[str] = []
    find = keys.find

    def counting(db: Any, secret: str) -> Any:
        looked_up.append(secret)
        return find(db, secret)

    monkeypatch.setattr(keys, "find", counting)
    for token in ("orch_pk_", "orch_pk_short", "orch_pk_" + "a" * 42 + "!", "orch_pk_" + "a" * 44):
        assert_error(world.mine.get(f"/v1/projects/{world.a}", headers={"Authorization": f"Bearer {token}"}),
                     401, "unauthorized")
    assert looked_up == []
    assert world.mine.get(f"/v1/projects/{world.a}").status_code == 200  # a real key still is
    assert looked_up == [world.key["key"]]


def test_a_revoked_key_is_refused_at_once(world: World) -> None:
    url = f"/v1/projects/{world.a}/keys/{world.key['id']}"
    revoked = world.admin.delete(url)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    error = assert_error(world.mine.get(f"/v1/projects/{world.a}"), 401, "unauthorized")
    assert "Bearer" in error["message"]
    assert_error(world.mine.get("/v1/nope"), 401, "unauthorized")
    again = world.admin.delete(url)  # revoking twice changes nothing
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert world.admin.get(url).json() == revoked.json()
    assert_error(world.admin.get(f"/v1/projects/{world.b}/keys/{world.key['id']}"), 404, "not_found")
    assert world.admin.get(f"/v1/projects/{world.a}/keys").json()["items"][0]["revoked_at"] is not None
    # The key belongs to A: under B's path it does not exist.
    assert_error(world.admin.delete(f"/v1/projects/{world.b}/keys/{world.key['id']}"), 404, "not_found")
    assert_error(world.admin.delete(f"/v1/projects/{world.a}/keys/key_nope"), 404, "not_found")


def test_a_key_s_secret_sent_for_its_id_is_never_repeated(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # `DELETE .../keys/{key}` read as the key itself: the 404 repeated the whole secret, and
    # uvicorn's access line (stderr, the journal) held it too.
    import logging

    secret = world.key["key"]
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        for method in ("GET", "DELETE"):
            response = world.admin.request(method, f"/v1/projects/{world.a}/keys/{secret}")
            error = assert_error(response, 404, "not_found")
            assert secret not in response.text and secret[len(SECRET_PREFIX):] not in response.text
            assert "not its secret" in error["message"] and error["details"] == {"key_id": "orch_pk_…"}
        # Nor in the router's own answers: a path with a trailing slash, a method the route lacks.
        for method, path, status, code in (("DELETE", f"/v1/projects/{world.a}/keys/{secret}/", 404, "not_found"),
                                           ("DELETE", f"/v1/keys/{secret}", 404, "not_found"),
                                           ("PATCH", f"/v1/projects/{world.a}/keys/{secret}", 405,
                                            "method_not_allowed")):
            response = world.admin.request(method, path)
            assert_error(response, status, code)
            assert secret[len(SECRET_PREFIX):] not in response.text and "orch_pk_…" in response.text
        # Nor sent where any other id or a cursor goes (a pipeline given `PROJECT=$KEY`): every
        # such error quoted it, twice, into the client's logs.
        for client in (world.mine, world.admin):
            for response in (client.post(f"/v1/projects/{secret}/drafts", json={"prompt": "x"}),
                             client.get("/v1/jobs", params={"project_id": secret}),
                             client.get(f"/v1/jobs/{secret}"), client.get(f"/v1/assets/{secret}"),
                             client.get("/v1/projects", params={"cursor": secret}),
                             client.get("/v1/policies", params={"cursor": secret}),
                             client.get(f"/v1/policies/{secret}"),
                             client.get("/v1/jobs", params={"engine": secret}),
                             client.get(f"/v1/projects/{secret}/keys")):
                assert response.status_code in (403, 404, 422), response.text
                assert secret[len(SECRET_PREFIX):] not in response.text, response.text
        # Nor in the access log with its underscores percent-encoded.
        world.mine.get(f"/v1/jobs/x/events?token={secret.replace('_', '%5F')}")
    assert world.mine.get(f"/v1/projects/{world.a}").status_code == 200  # nothing was revoked
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any(f"/v1/projects/{world.a}/keys/orch_pk_…" in line for line in lines), lines
    assert not any(secret[len(SECRET_PREFIX):] in line for line in lines), lines
    # Another id is echoed as any missing id is.
    assert "key_nope" in assert_error(world.admin.get(f"/v1/projects/{world.a}/keys/key_nope"), 404,
                                      "not_found")["message"]


def test_a_revoked_key_loses_its_open_event_stream(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orchestrator.api.jobs.KEY_RECHECK_SECONDS", 0.0)
    monkeypatch.setattr("orchestrator.api.jobs.KEEPALIVE_SECONDS", 0.05)
    job = world.mine.post(f"/v1/projects/{world.a}/drafts", json={"prompt": "slow", **SLOW}).json()
    seen: list[str | None] = []
    with world.mine.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        for event in iter_sse(stream):
            seen.append(event.event)
            if event.event == "progress" and seen.count("progress") == 1:
                assert world.admin.delete(f"/v1/projects/{world.a}/keys/{world.key['id']}").status_code == 200
    # The stream ended after the revoke, long before the 150-step job could finish.
    assert "progress" in seen and not set(seen) & {"succeeded", "failed", "canceled"}
    assert world.admin.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


def test_a_quiet_stream_of_a_revoked_key_ends_at_the_next_key_check(world: World,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Between events the stream waited out a whole keep-alive before looking at the key again.
    monkeypatch.setattr("orchestrator.api.jobs.KEY_RECHECK_SECONDS", 0.2)
    monkeypatch.setattr("orchestrator.api.jobs.KEEPALIVE_SECONDS", 120.0)
    blocker = world.admin.post(f"/v1/projects/{world.a}/drafts", json={"prompt": "slow", **SLOW}).json()
    queued = world.mine.post(f"/v1/projects/{world.a}/drafts", json={"prompt": "waits", "n": 1}).json()
    with world.mine.stream("GET", f"/v1/jobs/{queued['id']}/events") as stream:
        events = iter_sse(stream)
        assert next(events).event == "queued"  # then nothing: the device is busy with the blocker
        assert world.admin.delete(f"/v1/projects/{world.a}/keys/{world.key['id']}").status_code == 200
        revoked = time.monotonic()
        rest = list(events)
    assert time.monotonic() - revoked < 60 and not {e.event for e in rest} & {"succeeded", "failed", "canceled"}
    for job in (queued, blocker):
        world.admin.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_stream_outlives_a_database_blip_at_its_key_check(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # One failed look-up of the key (a busy SQLite, a restarting PostgreSQL) cut the stream with no
    # terminal event, where an admin's rode it out; a browser's reconnect then met a 503 and gave up.
    monkeypatch.setattr("orchestrator.api.jobs.KEY_RECHECK_SECONDS", 0.2)
    monkeypatch.setattr("orchestrator.api.jobs.KEEPALIVE_SECONDS", 120.0)
    secret = world.admin.post(f"/v1/projects/{world.a}/keys", json={"name": "blip"}).json()["key"]
    real, looked = keys.live, []

    def once_busy(db: Any, key_id: str) -> bool:
        looked.append(key_id)
        if len(looked) == 1:
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return real(db, key_id)

    monkeypatch.setattr(keys, "live", once_busy)
    blocker = world.admin.post(f"/v1/projects/{world.a}/drafts", json={"prompt": "slow", **SLOW}).json()
    headers = {"Authorization": f"Bearer {secret}"}
    queued = world.admin.post(f"/v1/projects/{world.a}/drafts", json={"prompt": "waits", "n": 1}).json()
    with world.admin.stream("GET", f"/v1/jobs/{queued['id']}/events", headers=headers) as stream:
        events = iter_sse(stream)
        assert next(events).event == "queued"
        deadline = time.monotonic() + 30
        while len(looked) < 2 and time.monotonic() < deadline:  # the failed check, then a good one
            time.sleep(0.05)
        assert world.admin.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 202
        rest = [e.event for e in events]
    assert len(looked) >= 2 and rest[-1] == "canceled", rest
    world.admin.post(f"/v1/jobs/{blocker['id']}/cancel")


def test_keys_are_refused_on_an_open_service(server: httpx.Client) -> None:
    # Without ORCH_ADMIN_KEY anyone may call anything: a project key would restrict nothing.
    project = create_project(server)["id"]
    error = assert_error(server.post(f"/v1/projects/{project}/keys", json={"name": "k"}), 409, "conflict")
    assert "ORCH_ADMIN_KEY" in error["message"]
    assert server.get(f"/v1/projects/{project}/keys").json()["items"] == []
    assert_error(server.post("/v1/projects/prj_nope/keys", json={"name": "k"}), 404, "not_found")


def test_bad_key_requests(world: World) -> None:
    url = f"/v1/projects/{world.a}/keys"
    for body in ({}, {"name": ""}, {"name": "x" * 201}, {"name": "k", "scope": "all"}):
        assert_error(world.admin.post(url, json=body), 422, "invalid_request")
    assert len(world.admin.get(url).json()["items"]) == 1
    # A made-up key with the right prefix is just a wrong key.
    with httpx.Client(base_url=world.admin.base_url, headers={"Authorization": "Bearer orch_pk_made-up"}) as fake:
        assert_error(fake.get("/v1/projects"), 401, "unauthorized")


def test_a_project_key_sees_its_project_s_policy_only_without_the_server_s_paths_or_load_errors(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        tmp_path: Path) -> None:
    folder = tmp_path / "studio-policies"
    folder.mkdir()
    (folder / "studio.toml").write_text('name = "studio"\n[[rules]]\nname = "all"\nmatch = {}\nengines = ["lite"]\n')
    (folder / "broken.toml").write_text("this is not toml = [")
    base = start_server(make_settings(admin_key=ADMIN_KEY, policy_dir=folder)).base_url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        project = admin.post("/v1/projects", json={"name": "A", "policy": "studio"}).json()["id"]
        secret = admin.post(f"/v1/projects/{project}/keys", json={"name": "pipeline"}).json()["key"]
        seen_by_admin = admin.get("/v1/policies").json()
        seen_by_key = admin.get("/v1/policies", headers={"Authorization": f"Bearer {secret}"}).json()
        one_by_admin = admin.get("/v1/policies/studio").json()
        one_by_key = admin.get("/v1/policies/studio", headers={"Authorization": f"Bearer {secret}"}).json()
        # Another client's rules name their tags: not shown, nor the names of those loaded.
        other = admin.get("/v1/policies/balanced", headers={"Authorization": f"Bearer {secret}"})
        assert admin.get("/v1/policies/balanced").status_code == 200
    error = assert_error(other, 404, "not_found")
    assert "studio" not in str(error) and "known" not in error["details"]
    studio = {p["name"]: p for p in seen_by_admin["items"]}["studio"]
    assert studio["source"] == str(folder / "studio.toml") and seen_by_admin["errors"]
    assert len(seen_by_admin["items"]) > 1 and [p["name"] for p in seen_by_key["items"]] == ["studio"]
    assert seen_by_key["items"][0]["source"] == "studio.toml"
    assert seen_by_key["errors"] == [] and str(tmp_path) not in str(seen_by_key)
    assert one_by_admin["source"] == str(folder / "studio.toml")
    assert one_by_key["source"] == "studio.toml" and str(tmp_path) not in str(one_by_key)
    assert one_by_key["rules"] == one_by_admin["rules"]


def test_a_project_key_reads_engine_notes_without_the_server_s_paths(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        tmp_path: Path) -> None:
    secret = tmp_path / "studio-secrets" / "acme-finetune.ckpt"
    base = start_server(make_settings(admin_key=ADMIN_KEY, hifi_model=str(secret))).base_url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        project = create_project(admin, "A")["id"]
        key = admin.post(f"/v1/projects/{project}/keys", json={"name": "pipeline"}).json()["key"]
        told = {e["name"]: e["note"] for e in admin.get("/v1/engines").json()}
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as mine:
            seen = {e["name"]: e["note"] for e in mine.get("/v1/engines").json()}
    assert str(secret) in told["local-hifi"]  # the operator sees where to look
    assert seen["local-hifi"] == "model 'acme-finetune.ckpt' is a .ckpt file: convert it to .safetensors"
    assert str(tmp_path) not in str(seen)


def test_a_key_holds_at_most_orch_max_streams_per_key_event_streams(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    """A client reconnecting in a loop without closing, or following a whole batch at once, held a
    connection, a subscription and a key check every few seconds per stream, without bound."""
    # Without a scheduler the job stays queued: its streams stay open, saying nothing after `queued`.
    base = start_server(make_settings(admin_key=ADMIN_KEY, max_streams_per_key=2, run_jobs=False)).base_url
    with contextlib.ExitStack() as stack:
        def client(secret: str) -> httpx.Client:
            return stack.enter_context(httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"},
                                                    timeout=30))

        admin = client(ADMIN_KEY)
        project = create_project(admin, "streams")["id"]
        one, two = (client(admin.post(f"/v1/projects/{project}/keys", json={"name": name}).json()["key"])
                    for name in ("one", "two"))
        job = one.post(f"/v1/projects/{project}/drafts", json={"prompt": "waits", "n": 1, **SMALL}).json()["id"]

        followed: list[Iterator[Any]] = []  # a stream's events, kept: a parser let go of closes its stream

        def follow(by: httpx.Client) -> tuple[contextlib.AbstractContextManager[httpx.Response], httpx.Response]:
            opening = by.stream("GET", f"/v1/jobs/{job}/events")
            response = opening.__enter__()
            if response.status_code == 200:
                followed.append(iter_sse(response))
                assert next(followed[-1]).event == "queued"
            else:
                response.read()
                opening.__exit__(None, None, None)
            return opening, response

        first, second = follow(one), follow(one)
        assert first[1].status_code == second[1].status_code == 200
        refused = follow(one)[1]
        error = assert_error(refused, 429, "rate_limited")
        assert refused.headers["Retry-After"] == "5" and "ORCH_MAX_STREAMS_PER_KEY" in error["message"]
        assert error["details"] == {"open": 2, "limit": 2}
        # Refused before any read: a key at its limit reconnecting in a loop costs no look-up.
        assert_error(one.get("/v1/jobs/job_0000000000zzzzzzzzzzzzzz/events"), 429, "rate_limited")
        # Another key of the project counts its own; the admin's are not counted.
        for other in (two, admin, admin, admin):
            assert follow(other)[1].status_code == 200
        first[0].__exit__(None, None, None)  # the client leaves: its slot comes back
        deadline = time.monotonic() + 10
        while (again := follow(one))[1].status_code != 200:
            assert time.monotonic() < deadline, "the slot of a closed stream was not given back"
            time.sleep(0.05)
        assert follow(one)[1].status_code == 429
        # At its limit, a reconnect that has a job's terminal event still learns that it is over.
        ended = one.post(f"/v1/projects/{project}/drafts", json={"prompt": "no", "n": 1, **SMALL}).json()["id"]
        assert admin.post(f"/v1/jobs/{ended}/cancel").status_code == 202
        last = read_events(admin, ended)[-1]
        assert last.event == "canceled" and last.id is not None
        assert one.get(f"/v1/jobs/{ended}/events", headers={"Last-Event-ID": last.id}).status_code == 204
        for opening in (second[0], again[0]):
            opening.__exit__(None, None, None)
