"""`Idempotency-Key` on drafts and on project creation: same key and body -> what the first request
made; another body -> 409."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlmodel import select

from orchestrator.errors import IdempotencyConflict, NoRoute
from orchestrator.ids import new_id
from orchestrator.jobs import JobService, Prepared
from orchestrator.models import Job, Project
from orchestrator.routing import Decision
from orchestrator.schemas import DraftCreate, PolishCreate, PromoteCreate
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore
from tests.api import SMALL, assert_error, create_project, job_count, run_draft, wait_for_job
from tests.conftest import SettingsFactory

BODY: dict[str, Any] = {"prompt": "a lighthouse", "n": 1, "seed": 3, **SMALL}


def post(client: httpx.Client, project: str, body: dict[str, Any], key: str | None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(f"/v1/projects/{project}/drafts", json=body, headers=headers)


def raw_post(client: httpx.Client, path: str, body: dict[str, Any], key: str) -> Any:
    """A POST whose Idempotency-Key is sent byte for byte, surrounding whitespace included."""
    url = client.base_url
    conn = http.client.HTTPConnection(url.host, url.port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                   "Idempotency-Key": key})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_same_key_same_body_replays(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    first = post(server, project, BODY, "key-1")
    assert first.status_code == 202
    job_id = first.json()["id"]
    assert "idempotent-replayed" not in first.headers

    again = post(server, project, BODY, "key-1")
    assert again.status_code == 202
    assert again.json()["id"] == job_id
    assert again.headers["location"] == f"/v1/jobs/{job_id}"
    assert again.headers["idempotent-replayed"] == "true"
    # The same body spelled differently (key order, defaults written out) is the same request.
    spelled = {"height": 64, "width": 64, "steps": 2, "seed": 3, "n": 1, "prompt": "a lighthouse",
               "negative_prompt": "", "tags": {}, "engine": None}
    assert post(server, project, spelled, "key-1").json()["id"] == job_id
    # Whitespace around a header value is not part of it: a proxy that trims it changes nothing.
    # (httpx will not send it; curl does.)
    assert raw_post(server, f"/v1/projects/{project}/drafts", BODY, "key-1\t ")["id"] == job_id
    assert job_count(server) == 1

    # After the job finished, the replay is still the original response (API.md), byte for byte
    # as JSON: the job as it was accepted, queued; the job itself is read with a GET.
    wait_for_job(server, job_id, ("succeeded",))
    replay = post(server, project, BODY, "key-1")
    assert replay.status_code == 202
    assert replay.json() == first.json()
    assert replay.json()["status"] == "queued" and replay.json()["assets"] == []
    assert server.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert job_count(server) == 1


def test_a_replay_answers_whatever_became_of_the_source_since(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    # The request is prepared after the key's look-up: with the source's file gone, the retry of a
    # polish that was accepted got a 500 instead of its job.
    settings = make_settings(hifi_model="builtin:tiny-sd")
    client = start_server(settings)
    project = create_project(client)["id"]
    draft = client.get(f"/v1/assets/{run_draft(client, project, n=1, seed=5, **SMALL)['assets'][0]}").json()
    polish = {"scale": 1, "engine": "local-hifi"}
    first = client.post(f"/v1/assets/{draft['id']}/polish", json=polish, headers={"Idempotency-Key": "polish-1"})
    assert first.status_code == 202, first.text
    wait_for_job(client, first.json()["id"], ("succeeded",))
    ArtifactStore(settings.assets_dir).path_for(draft["sha256"]).unlink()
    again = client.post(f"/v1/assets/{draft['id']}/polish", json=polish, headers={"Idempotency-Key": "polish-1"})
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    fresh = client.post(f"/v1/assets/{draft['id']}/polish", json=polish, headers={"Idempotency-Key": "polish-2"})
    assert_error(fresh, 500, "content_unavailable")  # a new request is still refused


def test_same_key_other_body_conflicts(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    job_id = post(server, project, BODY, "key-2").json()["id"]
    for other in ({**BODY, "seed": 4}, {**BODY, "prompt": "a lighthouse "[:-1] + "!"}, {**BODY, "n": 2}):
        error = assert_error(post(server, project, other, "key-2"), 409, "idempotency_conflict")
        assert error["details"]["idempotency_key"] == "key-2"
    assert job_count(server) == 1
    # A new key, or no key, is a new job.
    assert post(server, project, BODY, "key-3").json()["id"] != job_id
    assert post(server, project, BODY, None).json()["id"] != job_id
    assert job_count(server) == 3


def test_invalid_keys(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    assert_error(post(server, project, BODY, ""), 422, "invalid_request")
    assert raw_post(server, f"/v1/projects/{project}/drafts", BODY, "  ")["error"]["code"] == "invalid_request"
    assert_error(post(server, project, BODY, "k" * 256), 422, "invalid_request")
    # Two keys on one request: a retry carrying either one must not run it again, so neither is kept.
    twice = [("Idempotency-Key", "a1"), ("Idempotency-Key", "a2")]
    error = assert_error(server.post(f"/v1/projects/{project}/drafts", json=BODY, headers=twice), 422,
                         "invalid_request")
    assert error["details"]["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    projects = len(server.get("/v1/projects").json()["items"])
    assert_error(server.post("/v1/projects", json={"name": "twice"}, headers=twice), 422, "invalid_request")
    assert len(server.get("/v1/projects").json()["items"]) == projects
    assert job_count(server) == 0


def test_keys_are_utf_8_text(server: httpx.Client) -> None:
    """Header values arrive as latin-1: a key `clé-été` was kept (and named in a 409) as
    `clÃ©-Ã©tÃ©`, and its length counted in bytes."""
    project = create_project(server)["id"]
    key = "clé-été"
    job_id = post_key(server, project, BODY, key.encode()).json()["id"]
    assert post_key(server, project, BODY, key.encode()).json()["id"] == job_id
    error = assert_error(post_key(server, project, {**BODY, "seed": 4}, key.encode()), 409, "idempotency_conflict")
    assert error["details"]["idempotency_key"] == key
    assert post_key(server, project, BODY, ("é" * 255).encode()).status_code == 202  # 255 characters, 510 bytes
    error = assert_error(post_key(server, project, BODY, ("é" * 256).encode()), 422, "invalid_request")
    assert "255 characters" in error["message"]
    error = assert_error(post_key(server, project, BODY, b"k\xff"), 422, "invalid_request")
    assert error["message"] == "the Idempotency-Key header must be UTF-8 text"
    assert job_count(server) == 2


def post_key(client: httpx.Client, project: str, body: dict[str, Any], key: bytes) -> httpx.Response:
    return client.post(f"/v1/projects/{project}/drafts", json=body, headers={b"Idempotency-Key": key})


def test_a_field_added_with_a_default_keeps_the_hash_of_earlier_bodies() -> None:
    """Bodies were hashed with every default: a release adding a field made every retry across
    it (keys live 48 h) a 409. Keys stored by those releases still match their retries."""
    from orchestrator import idempotency

    class DraftCreateNext(DraftCreate):
        style: str | None = None

    body = {"prompt": "a lighthouse", "n": 1, "seed": 3, **SMALL}
    before, after = idempotency.request_hash(DraftCreate(**body)), idempotency.request_hash(DraftCreateNext(**body))
    assert before == after
    assert idempotency.request_hash(DraftCreate(**body, negative_prompt="")) == before  # a default written out
    assert before.legacy != before


# What releases before bodies were hashed without their defaults stored for these bodies (computed
# by 94ccff5's parent): a promote or polish retried across the upgrade that added guidance_scale
# and polish's steps (f5d02f1) was a 409, the fields being in the whole body hashed now.
EARLIER_RELEASES_HASHES = [
    (PromoteCreate(prompt="a lighthouse at dusk", seed=3),
     "47f3e05d6c2a25d432339312c360660af4e38463b9f817ab0a6dd26e78553182"),
    (PolishCreate(scale=1.5), "842ef69de1f184dc880b1f5bc705f4e737ac300c0b467b7385aae8198e458990"),
]


@pytest.mark.parametrize(("body", "stored"), EARLIER_RELEASES_HASHES, ids=["promote", "polish"])
def test_a_key_hashed_before_a_later_field_still_matches(body: PromoteCreate | PolishCreate, stored: str) -> None:
    from orchestrator import idempotency
    from orchestrator.models import IdempotencyKey

    class Stored:  # a session holding the key as that release wrote it
        @staticmethod
        def get(_model: type, key: tuple[str, str]) -> IdempotencyKey:
            return IdempotencyKey(key=key[0], scope=key[1], request_hash=stored, job_id="j")

    for same in (body, type(body)(**body.model_dump(exclude_unset=True), guidance_scale=None)):
        row = idempotency.recall(Stored(), "k", "/v1/assets/a/promote", idempotency.request_hash(same))  # type: ignore[arg-type]
        assert row is not None and row.request_hash == stored
    # The field written out at its default (above) is still that body; set otherwise, another request.
    changed = body.model_copy(update={"guidance_scale": 4.0})
    with pytest.raises(IdempotencyConflict):
        idempotency.recall(Stored(), "k", "/v1/assets/a/promote", idempotency.request_hash(changed))  # type: ignore[arg-type]


def test_negative_zero_is_zero() -> None:
    # -0.0 passed `ge=0` and was kept: hashed apart from 0.0 (a retry's 409) and recorded as "-0.0".
    from orchestrator import idempotency

    body = {"prompt": "a lighthouse", "n": 1, "seed": 3, **SMALL}
    negative = DraftCreate(**body, guidance_scale=-0.0)
    assert str(negative.guidance_scale) == "0.0"
    assert idempotency.request_hash(negative) == idempotency.request_hash(DraftCreate(**body, guidance_scale=0))
    assert str(PromoteCreate(max_credits=-0.0).max_credits) == "0.0"


def test_a_key_stored_by_an_earlier_release_still_replays(server: httpx.Client,
                                                          make_settings: SettingsFactory) -> None:
    from sqlalchemy import update
    from sqlmodel import col

    from orchestrator import idempotency
    from orchestrator.db import Database
    from orchestrator.models import IdempotencyKey

    project = create_project(server)["id"]
    job_id = post(server, project, BODY, "old-key").json()["id"]
    db = Database(make_settings().resolved_database_url)
    try:
        with db.transaction() as s:  # as a release hashing every default, and keeping no answer, kept it
            s.execute(update(IdempotencyKey).where(col(IdempotencyKey.key) == "old-key")
                      .values(request_hash=idempotency.request_hash(DraftCreate(**BODY)).legacy, response=None))
    finally:
        db.dispose()
    wait_for_job(server, job_id, ("succeeded",))
    again = post(server, project, BODY, "old-key")
    assert again.json()["id"] == job_id and again.headers["idempotent-replayed"] == "true"
    assert again.json()["status"] == "succeeded"  # no first answer kept: the job as it is now
    assert_error(post(server, project, {**BODY, "seed": 9}, "old-key"), 409, "idempotency_conflict")


def test_the_privacy_tag_spelled_otherwise_is_the_same_request(server: httpx.Client) -> None:
    """`Local` and `local` make the same job (its tags say `local`): one key's retry spelled
    otherwise was a 409, though `Privacy` for `privacy` was the same request."""
    project = create_project(server)["id"]
    first = post(server, project, {**BODY, "tags": {"privacy": " Local"}}, "private-key")
    assert first.status_code == 202 and first.json()["params"]["tags"] == {"privacy": "local"}
    for tags in ({"privacy": "local"}, {"Privacy": "LOCAL"}):
        again = post(server, project, {**BODY, "tags": tags}, "private-key")
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"], (tags, again.text)
    assert_error(post(server, project, {**BODY, "tags": {"privacy": "cloud"}}, "private-key"),
                 409, "idempotency_conflict")
    assert job_count(server) == 1


def test_a_privacy_tag_key_stored_as_spelled_by_an_earlier_release_still_replays(
        server: httpx.Client, make_settings: SettingsFactory) -> None:
    """Releases before the value was read as one hashed it as sent: a byte-identical retry across
    the upgrade must not be a 409."""
    from sqlalchemy import update
    from sqlmodel import col

    from orchestrator import idempotency
    from orchestrator.db import Database
    from orchestrator.models import IdempotencyKey

    project = create_project(server)["id"]
    body = {**BODY, "tags": {"privacy": "Local"}}
    first = post(server, project, body, "private-old").json()["id"]
    as_sent = idempotency._sha256(DraftCreate(**body).model_dump(mode="json", exclude_defaults=True))
    db = Database(make_settings().resolved_database_url)
    try:
        with db.transaction() as s:
            s.execute(update(IdempotencyKey).where(col(IdempotencyKey.key) == "private-old")
                      .values(request_hash=as_sent))
    finally:
        db.dispose()
    again = post(server, project, body, "private-old")
    assert again.status_code == 202 and again.json()["id"] == first, again.text


def test_a_key_that_reads_as_another_keys_misread_form_is_its_own(server: httpx.Client) -> None:
    """`Ã©` is `é`'s UTF-8 read as latin-1, as releases before migration 0019 stored keys: the
    look-up in that form found a request `é` never made (one job for two clients' keys)."""
    project = create_project(server)["id"]
    first = post_key(server, project, BODY, "\u00c3\u00a9-key".encode())
    second = post_key(server, project, BODY, "\u00e9-key".encode())
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] != first.json()["id"] and "idempotent-replayed" not in second.headers
    assert second.json()["status"] == "queued"  # its own first answer, not the other job as it is now
    assert job_count(server) == 2


def test_concurrent_requests_with_one_key_make_one_job(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    start = threading.Barrier(8)

    def racing(_: int) -> httpx.Response:
        start.wait(timeout=60)  # all eight go at once, not one after another
        return post(server, project, BODY, "key-race")

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(racing, range(8)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert job_count(server) == 1


def post_project(client: httpx.Client, body: dict[str, Any], key: str | None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/projects", json=body, headers=headers)


def project_ids(client: httpx.Client) -> list[str]:
    return [p["id"] for p in client.get("/v1/projects", params={"limit": 500}).json()["items"]]


def test_a_retried_project_creation_makes_one_project(server: httpx.Client) -> None:
    body = {"name": "retried", "budget": {"limit": 50, "period": "month"}}
    before = project_ids(server)
    first = post_project(server, body, "prj-key-1")
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    project_id = first.json()["id"]

    # Renamed since: the replay is still the original response, as a job's replay is.
    assert server.patch(f"/v1/projects/{project_id}", json={"name": "renamed"}).status_code == 200
    again = post_project(server, body, "prj-key-1")
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == f"/v1/projects/{project_id}"
    assert again.json() == first.json() and again.json()["name"] == "retried"
    assert project_ids(server) == [*before, project_id]

    error = assert_error(post_project(server, {**body, "name": "other"}, "prj-key-1"), 409, "idempotency_conflict")
    assert error["details"]["idempotency_key"] == "prj-key-1"
    # The key is scoped by path: the same key on drafts is a separate request.
    assert post(server, project_id, BODY, "prj-key-1").status_code == 202
    assert project_ids(server) == [*before, project_id]


def test_a_project_s_default_policy_written_out_is_the_same_request(server: httpx.Client) -> None:
    first = post_project(server, {"name": "defaults"}, "prj-key-defaults")
    assert first.status_code == 201, first.text
    again = post_project(server, {"name": "defaults", "policy": first.json()["policy"]}, "prj-key-defaults")
    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == first.json()["id"]
    assert_error(post_project(server, {"name": "defaults", "policy": "local-only"}, "prj-key-defaults"),
                 409, "idempotency_conflict")
    # A budget of no limit written out, as a form that always sends the field does (it was a 409).
    for budget in ({}, {"limit": None, "period": "none"}, None):
        again = post_project(server, {"name": "defaults", "budget": budget}, "prj-key-defaults")
        assert again.status_code == 201 and again.json()["id"] == first.json()["id"], (budget, again.text)
    assert_error(post_project(server, {"name": "defaults", "budget": {"limit": 5, "period": "none"}},
                              "prj-key-defaults"), 409, "idempotency_conflict")


def test_a_project_s_default_policy_is_the_one_it_was_made_with(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    """The default a key's request got is the policy its project was made with, not ORCH_POLICY
    as it is when the retry comes: a byte-identical retry after the setting changed was a 409,
    and a retry naming the new default was answered with a project of the old one."""
    before = start_server(make_settings())  # ORCH_POLICY=balanced
    named = post_project(before, {"name": "named", "policy": "balanced"}, "prj-named")
    left_out = post_project(before, {"name": "left out"}, "prj-left-out")
    assert named.json()["policy"] == left_out.json()["policy"] == "balanced"
    after = start_server(make_settings(policy="budget-saver"))  # the same data dir
    for body, key, first in (({"name": "named", "policy": "balanced"}, "prj-named", named),
                             ({"name": "named"}, "prj-named", named),  # the default then, written out
                             ({"name": "left out"}, "prj-left-out", left_out),
                             ({"name": "left out", "policy": "balanced"}, "prj-left-out", left_out)):
        again = post_project(after, body, key)
        assert again.status_code == 201 and again.json() == first.json(), (body, again.text)
        assert again.headers["idempotent-replayed"] == "true"
    # Today's default is not what the request left out then: another request.
    assert_error(post_project(after, {"name": "left out", "policy": "budget-saver"}, "prj-left-out"),
                 409, "idempotency_conflict")
    assert post_project(after, {"name": "new"}, "prj-new").json()["policy"] == "budget-saver"


def test_a_project_key_stored_with_the_default_policy_written_still_replays(
        server: httpx.Client, make_settings: SettingsFactory) -> None:
    """A release before the default was read out of the hash stored the body as written."""
    from sqlalchemy import update
    from sqlmodel import col

    from orchestrator import idempotency
    from orchestrator.db import Database
    from orchestrator.models import IdempotencyKey
    from orchestrator.schemas import ProjectCreate

    def stored_as_an_earlier_release_did(body: dict[str, Any], key: str) -> str:
        """The project `body` makes, its key's hash as a release that hashed the body as sent kept it."""
        made: str = post_project(server, body, key).json()["id"]
        db = Database(make_settings().resolved_database_url)
        try:
            with db.transaction() as s:
                s.execute(update(IdempotencyKey).where(col(IdempotencyKey.key) == key)
                          .values(request_hash=idempotency.request_hash(ProjectCreate(**body))))
        finally:
            db.dispose()
        return made

    body: dict[str, Any] = {"name": "written", "policy": "balanced"}
    first = stored_as_an_earlier_release_did(body, "prj-key-written")
    again = post_project(server, body, "prj-key-written")
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["id"] == first
    assert post_project(server, {"name": "written"}, "prj-key-written").json()["id"] == first
    # A budget of no limit written out, stored as sent before such budgets were read as none.
    budgeted: dict[str, Any] = {"name": "written out", "budget": {}}
    first = stored_as_an_earlier_release_did(budgeted, "prj-key-budget")
    again = post_project(server, budgeted, "prj-key-budget")
    assert again.status_code == 201 and again.json()["id"] == first, again.text


def test_concurrent_project_creations_with_one_key_make_one_project(server: httpx.Client) -> None:
    before = set(project_ids(server))
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: post_project(server, {"name": "race"}, "prj-race"), range(8)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum("idempotent-replayed" in r.headers for r in responses) == 7
    assert set(project_ids(server)) - before == {responses[0].json()["id"]}


def test_a_twin_that_committed_first_is_replayed_even_when_routing_now_refuses(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Request B misses the first look-up; A (same key and body) commits; then B's routing refuses
    (A's hold tipped a budget-share rule, an engine's breaker opened). Same key and body: B is
    answered with A's job, not an error. Another key still gets the error."""
    services = Services.build(make_settings())
    try:
        project_id = new_id("prj")
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="twins", policy="balanced"))
        body = DraftCreate(prompt="a lighthouse", n=1, seed=3, **SMALL)
        scope = f"/v1/projects/{project_id}/drafts"

        def submit(key: str) -> tuple[Job, bool]:
            return services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                        max_credits=None, idempotency_key=key, scope=scope)

        twin: list[Job] = []  # A, once committed
        racing = [True]
        real_replay, real_decide = JobService._replay, JobService.decide

        def replay(self: JobService, key: str, scope: str, digest: str) -> Job | None:
            found = real_replay(self, key, scope, digest)
            if racing:  # B's first look-up has found nothing: A commits now
                racing.clear()
                twin.append(submit("key-twin")[0])
            return found

        def decide(self: JobService, prepared: Prepared, engine: str | None, max_credits: float | None,
                   **options: Any) -> Decision:
            if twin:
                raise NoRoute("no engine is allowed here now")
            return real_decide(self, prepared, engine, max_credits, **options)

        monkeypatch.setattr(JobService, "_replay", replay)
        monkeypatch.setattr(JobService, "decide", decide)
        job, created = submit("key-twin")
        assert (job.id, created) == (twin[0].id, False)
        with pytest.raises(NoRoute):
            submit("key-other")
        with services.db.session() as s:
            assert [j.id for j in s.exec(select(Job)).all()] == [twin[0].id]
    finally:
        asyncio.run(services.aclose())
