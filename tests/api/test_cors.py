"""`ORCH_CORS_ORIGINS`: the browser pages of a cost dashboard may call the API, and only those."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from pydantic import ValidationError

from orchestrator.settings import Settings
from tests.api import assert_error, create_project

KEY = "s3cret-key"
DASHBOARD = "https://dash.studio.example"
PREFLIGHT = {"Origin": DASHBOARD, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"}


@pytest.fixture
def served(make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> httpx.Client:
    return start_server(make_settings(admin_key=KEY, cors_origins=f"{DASHBOARD}, http://localhost:3000"))


def test_a_listed_origin_s_preflight_is_answered_before_auth(served: httpx.Client) -> None:
    # The browser sends no key with a preflight: a 401 here would block every call of the page.
    answer = served.options("/v1/projects", headers=PREFLIGHT)
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == DASHBOARD
    allowed = {h.strip().lower() for h in answer.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
    assert "POST" in answer.headers["access-control-allow-methods"]


def test_a_listed_origin_reads_answers_and_the_headers_it_needs(served: httpx.Client) -> None:
    headers = {"Origin": DASHBOARD, "Authorization": f"Bearer {KEY}"}
    created = served.post("/v1/projects", json={"name": "dashboard"}, headers=headers)
    assert created.status_code == 201
    assert created.headers["access-control-allow-origin"] == DASHBOARD
    exposed = {h.strip().lower() for h in created.headers["access-control-expose-headers"].split(",")}
    assert {"location", "etag", "idempotent-replayed", "retry-after"} <= exposed
    # An error is readable too: the page can tell its user the key is wrong.
    denied = served.get("/v1/projects", headers={"Origin": DASHBOARD})
    assert_error(denied, 401, "unauthorized")
    assert denied.headers["access-control-allow-origin"] == DASHBOARD


def test_other_origins_get_nothing(served: httpx.Client) -> None:
    other = {**PREFLIGHT, "Origin": "https://evil.example"}
    assert served.options("/v1/projects", headers=other).status_code == 400
    answer = served.get("/v1/projects", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_without_the_setting_no_page_may_call(make_settings: Callable[..., Settings],
                                              start_server: Callable[[Settings], httpx.Client]) -> None:
    client = start_server(make_settings())
    create_project(client)
    answer = client.get("/v1/projects", headers={"Origin": DASHBOARD})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
    assert "access-control-allow-origin" not in client.options("/v1/projects", headers=PREFLIGHT).headers


@pytest.mark.parametrize("origin", ["https://dash.studio.example/", "https://dash.studio.example/app",
                                    "dash.studio.example", "ftp://dash.studio.example"])
def test_what_is_not_an_origin_is_refused_at_start(make_settings: Callable[..., Settings], origin: str) -> None:
    """A trailing slash or a path never matches a browser's Origin: the page would fail for no
    reason the server's log tells."""
    with pytest.raises(ValidationError, match="is not an origin"):
        make_settings(cors_origins=f"http://localhost:3000,{origin}")
