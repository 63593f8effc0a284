"""`Idempotency-Key` on drafts: same key and body -> the original job; another body -> 409."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.api import SMALL, assert_error, create_project, job_count, wait_for_job

BODY: dict[str, Any] = {"prompt": "a lighthouse", "n": 1, "seed": 3, **SMALL}


def post(client: httpx.Client, project: str, body: dict[str, Any], key: str | None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(f"/v1/projects/{project}/drafts", json=body, headers=headers)


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
    assert job_count(server) == 1

    # After the job finished, the replay still answers with that job (its current state).
    wait_for_job(server, job_id, ("succeeded",))
    replay = post(server, project, BODY, "key-1")
    assert replay.status_code == 202
    assert replay.json()["id"] == job_id
    assert replay.json()["status"] == "succeeded"
    assert job_count(server) == 1


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
    assert_error(post(server, project, BODY, "k" * 256), 422, "invalid_request")
    assert job_count(server) == 0


def test_concurrent_requests_with_one_key_make_one_job(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: post(server, project, BODY, "key-race"), range(8)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert job_count(server) == 1
