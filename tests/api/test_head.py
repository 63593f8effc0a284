"""HEAD on every GET route: the GET's status and headers, no body, and an event stream that does
not outlive the answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.api import SLOW, asgi_messages, assert_error, create_project, run_draft, submit_draft, wait_for_job
from tests.conftest import SettingsFactory

KEY = "head-key"
MISSING_ASSET = "/v1/assets/ast_00000000000000000000000000/content"


@pytest.fixture(scope="module")
def project(shared_server: httpx.Client) -> str:
    project_id: str = create_project(shared_server, "head")["id"]
    return project_id


@pytest.fixture(scope="module")
def finished_job(shared_server: httpx.Client, project: str) -> dict[str, Any]:
    return run_draft(shared_server, project)


def same_headers(head: httpx.Response, get: httpx.Response) -> None:
    assert head.status_code == get.status_code
    assert head.content == b""
    # Date may tick over between the two requests; everything else is the same answer.
    assert {k: v for k, v in head.headers.items() if k != "date"} == \
        {k: v for k, v in get.headers.items() if k != "date"}


@pytest.mark.parametrize("path", ["/healthz", "/v1/projects/{project}", "/v1/projects?limit=1"])
def test_head_answers_the_get_headers_without_the_body(shared_server: httpx.Client, project: str,
                                                       path: str) -> None:
    url = path.format(project=project)
    get = shared_server.get(url)
    assert get.status_code == 200 and get.content
    head = shared_server.head(url)
    same_headers(head, get)
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == "application/json"


def test_head_on_content_gives_the_png_length(shared_server: httpx.Client, finished_job: dict[str, Any]) -> None:
    url = f"/v1/assets/{finished_job['assets'][0]}/content"
    get = shared_server.get(url)
    assert get.status_code == 200 and get.content.startswith(b"\x89PNG")
    head = shared_server.head(url)
    same_headers(head, get)
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == "image/png"
    # The conditional read works the same way.
    not_modified = shared_server.head(url, headers={"If-None-Match": head.headers["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""


def test_head_on_a_missing_asset_is_404_without_a_body(shared_server: httpx.Client) -> None:
    get = shared_server.get(MISSING_ASSET)
    assert_error(get, 404, "not_found")
    head = shared_server.head(MISSING_ASSET)
    same_headers(head, get)


def test_head_needs_the_key_like_get(make_settings: SettingsFactory,
                                     start_server: Callable[[Settings], httpx.Client]) -> None:
    client = start_server(make_settings(admin_key=KEY))
    for path in ("/v1/projects", MISSING_ASSET, "/v1/nope"):
        denied = client.head(path)
        assert denied.status_code == 401 and denied.content == b""
        assert denied.headers["www-authenticate"] == "Bearer"
    assert client.head("/v1/projects", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.head("/healthz").status_code == 200  # operations need no key, as for GET


def test_head_on_the_events_of_finished_and_running_jobs_answers_at_once(
        shared_server: httpx.Client, project: str, finished_job: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orchestrator.api.jobs.KEEPALIVE_SECONDS", 120.0)
    blocker = submit_draft(shared_server, project, **SLOW)
    try:
        wait_for_job(shared_server, blocker["id"], ("running",))
        for job_id in (finished_job["id"], blocker["id"]):
            # Far shorter than the keep-alive period: nothing from the stream is awaited.
            head = shared_server.head(f"/v1/jobs/{job_id}/events", timeout=30)
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-type"].startswith("text/event-stream")
            assert head.headers["cache-control"] == "no-cache"
    finally:
        shared_server.post(f"/v1/jobs/{blocker['id']}/cancel")
        wait_for_job(shared_server, blocker["id"], ("canceled",))


def test_head_on_an_endless_stream_ends_the_stream(make_settings: SettingsFactory) -> None:
    """Called as a server that never reports a disconnect (ASGI 2.4: a gone client shows only as a
    failing send): the app must still return, and the job's subscription must be gone."""
    # A job that never ends: queued on a server that runs no jobs.
    with TestClient(create_app(make_settings(run_jobs=False))) as client:
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        project = client.post("/v1/projects", json={"name": "head"}).json()["id"]
        job_id = client.post(f"/v1/projects/{project}/drafts", json={"prompt": "x", "n": 1}).json()["id"]
        sent = asgi_messages(client, "HEAD", f"/v1/jobs/{job_id}/events", timeout=5)
        assert services.bus._jobs[job_id].subscribers == set()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and sent[1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_head_is_served_but_not_documented(shared_server: httpx.Client) -> None:
    assert shared_server.head("/v1/engines").status_code == 200
    paths = shared_server.get("/openapi.json").json()["paths"]
    assert all("head" not in operations for operations in paths.values())  # /docs shows each GET once


def test_405_allow_lists_head_wherever_get(shared_server: httpx.Client, project: str) -> None:
    for method, path, allow in [
        ("HEAD", f"/v1/projects/{project}/drafts", "POST"),  # HEAD is only where GET is
        ("HEAD", "/v1/route/explain", "POST"),
        ("DELETE", "/v1/assets/ast_x/content", "GET, HEAD"),
        ("PUT", "/v1/policies/reload", "GET, HEAD, POST"),  # GET /v1/policies/{name} shares the path
    ]:
        response = shared_server.request(method, path)
        assert (response.status_code, response.headers["allow"]) == (405, allow), (method, path)
        if method == "HEAD":
            assert response.content == b""
        else:
            assert_error(response, 405, "method_not_allowed")
