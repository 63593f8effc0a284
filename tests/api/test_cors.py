"""`ORCH_CORS_ORIGINS`: the browser pages of a cost dashboard may call the API, and only those."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from orchestrator.app import create_app
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


@pytest.mark.parametrize(("headers", "refused"), [
    ({**PREFLIGHT, "Origin": "https://evil.example"}, ["origin"]),
    ({**PREFLIGHT, "Access-Control-Request-Method": "PUT"}, ["method"]),
    ({**PREFLIGHT, "Access-Control-Request-Headers": "x-foo"}, ["headers"]),
])
def test_a_refused_preflight_answers_in_the_error_shape(served: httpx.Client, headers: dict[str, str],
                                                        refused: list[str]) -> None:
    # Starlette answered "Disallowed CORS origin" as plain text: every error is {"error": {...}}.
    answer = served.options("/v1/projects", headers=headers)
    assert_error(answer, 400, "invalid_request")
    assert answer.json()["error"]["details"] == {"refused": refused}
    assert "ORCH_CORS_ORIGINS" in answer.json()["error"]["message"]


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
                                    "dash.studio.example", "ftp://dash.studio.example", "https://a@dash.example",
                                    "https://dash.example:99999", "https://*.studio.example"])
def test_what_is_not_an_origin_is_refused_at_start(make_settings: Callable[..., Settings], origin: str) -> None:
    """A trailing slash or a path never matches a browser's Origin: the page would fail for no
    reason the server's log tells."""
    refused = r"is not an origin|wildcards are not supported|an origin has no user or password"
    with pytest.raises(ValidationError, match=refused):
        make_settings(cors_origins=f"http://localhost:3000,{origin}")


def test_origins_are_read_as_browsers_send_them(make_settings: Callable[..., Settings],
                                                start_server: Callable[[Settings], httpx.Client]) -> None:
    """`https://Dash.Example` and `https://b.example:443` were taken, and never matched the
    lower-case, default-port Origin a browser sends: the dashboard's every preflight refused."""
    settings = make_settings(cors_origins="HTTPS://Dash.Studio.Example, https://b.example:443, http://[::1]:8080")
    assert settings.cors_origin_list == ["https://dash.studio.example", "https://b.example", "http://[::1]:8080"]
    client = start_server(settings)
    for origin in ("https://dash.studio.example", "https://b.example"):
        preflight = client.options("/v1/projects", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200, preflight.text


def test_a_page_of_another_origin_cannot_change_anything(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    """Without a key, a page in the operator's browser could POST to the service without a
    preflight (a promote, a cancel: no JSON body needed) and spend the budgets."""
    client = start_server(make_settings(cors_origins=DASHBOARD))
    project = create_project(client)["id"]
    evil = client.post("/v1/projects", json={"name": "x"}, headers={"Origin": "https://evil.example"})
    assert_error(evil, 403, "forbidden")
    assert "ORCH_CORS_ORIGINS" in evil.json()["error"]["message"]
    long_origin = client.post("/v1/projects", json={"name": "x"}, headers={"Origin": "https://" + "e" * 20_000})
    assert len(assert_error(long_origin, 403, "forbidden")["message"]) < 300  # cut, not repeated whole
    opaque = client.post("/v1/jobs/job_0000000000zzzzzzzzzzzzzz/cancel", headers={"Origin": "null"})
    # A sandboxed frame, a file: told to list `null` in ORCH_CORS_ORIGINS, which refuses it at start.
    message = assert_error(opaque, 403, "forbidden")["message"]
    assert "cannot list" in message and "list it in" not in message
    with pytest.raises(ValidationError, match="'null' is not an origin"):
        make_settings(cors_origins="null")
    # Reading is not refused (the browser keeps the answer from the page), nor are listed pages,
    # the service's own (/docs), or programs, which send no Origin.
    assert client.get(f"/v1/projects/{project}", headers={"Origin": "https://evil.example"}).status_code == 200
    own = str(client.base_url).rstrip("/")
    for headers in ({"Origin": DASHBOARD}, {"Origin": own}, {}):
        assert client.post("/v1/projects", json={"name": "y"}, headers=headers).status_code == 201, headers
    # A bearer key is never sent by a browser on its own: a dashboard's backend passing a page's
    # Origin on is its holder.
    keyed = client.post("/v1/projects", json={"name": "z"},
                        headers={"Origin": "https://evil.example", "Authorization": "Bearer anything"})
    assert keyed.status_code == 201  # no ORCH_ADMIN_KEY here: any key is taken
    # Basic credentials are: a browser adds those it has cached for the host (a proxy in front asks
    # for them), so a foreign page's body-less cancel carried them and was taken.
    for scheme in ("Basic dXNlcjpwYXNz", "Digest username=x", "Bearer"):
        cached = client.post("/v1/jobs/job_0000000000zzzzzzzzzzzzzz/cancel",
                             headers={"Origin": "https://evil.example", "Authorization": scheme})
        assert cached.status_code == 403, scheme


def test_a_service_open_to_this_machine_answers_to_its_own_names_only(
        make_settings: Callable[..., Settings]) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own domain name: its Host gives it away."""
    from fastapi.testclient import TestClient

    from orchestrator.app import create_app

    with TestClient(create_app(make_settings(), loopback_only=True), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/healthz").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1", "LOCALHOST:8000", ""):  # "": an HTTP/1.0 probe
            assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
        # RFC 6761's names, which browsers keep on loopback: a fully qualified name, a dev subdomain.
        for host in ("localhost.:8000", "localhost.", "studio.localhost:8000", "a.b.localhost."):
            assert client.get("/v1/projects", headers={"Host": host}).status_code == 200, host
        for host in ("localhost.attacker.example", "notlocalhost", "localhost..", "evil-localhost"):
            assert_error(client.get("/v1/projects", headers={"Host": host}), 400, "invalid_request")
        rebound = client.post("/v1/projects", json={"name": "x"}, headers={"Host": "rebind.attacker.example"})
        assert_error(rebound, 400, "invalid_request")
        assert "ORCH_ADMIN_KEY" in rebound.json()["error"]["message"]
        assert client.get("/v1/projects").json()["items"] == []
        long_host = assert_error(client.get("/healthz", headers={"Host": "a" * 20_000}), 400, "invalid_request")
        assert "a" * 100 in long_host["message"] and len(long_host["message"]) < 300  # cut, not repeated whole
        # A header that is not one host was read by its last colon: this one as 127.0.0.1.
        for odd in ("127.0.0.1:8000, rebind.attacker.example", "127.0.0.1:8000:80", "127.0.0.1 evil",
                    "127.0.0.1:80x", "user@127.0.0.1"):
            assert_error(client.get("/v1/projects", headers={"Host": odd}), 400, "invalid_request")
        for path in ("/healthz", "/metrics"):  # unauthenticated, but guarded alike: and documented so
            assert_error(client.get(path, headers={"Host": "rebind.attacker.example"}), 400, "invalid_request")
            assert "400" in client.get("/openapi.json").json()["paths"][path]["get"]["responses"]


def test_a_service_run_in_a_thread_is_guarded_as_serve_on_this_machine(make_settings: Callable[..., Settings]) -> None:
    # The demo's own service (serve_in_thread) was open to a rebound page while it ran.
    from orchestrator.server import serve_in_thread

    with serve_in_thread(make_settings()) as base, httpx.Client(base_url=base) as client:
        assert client.get("/v1/projects").status_code == 200
        rebound = client.post("/v1/projects", json={"name": "x"}, headers={"Host": "rebind.attacker.example"})
        assert_error(rebound, 400, "invalid_request")
        assert client.get("/v1/projects").json()["items"] == []
    with serve_in_thread(make_settings(admin_key=KEY)) as base, httpx.Client(base_url=base) as client:
        keyed = client.get("/v1/projects", headers={"Host": "studio-box.local", "Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200  # with a key, other names are the operator's to serve


def test_every_page_may_not_drive_a_service_without_a_key(make_settings: Callable[..., Settings]) -> None:
    from orchestrator.services import startup_problems

    assert any(p.startswith("ORCH_CORS_ORIGINS: * without ORCH_ADMIN_KEY")
               for p in startup_problems(make_settings(cors_origins="*")))
    assert not any("ORCH_CORS_ORIGINS" in p for p in startup_problems(make_settings(cors_origins="*",
                                                                                    admin_key=KEY)))


def test_a_bug_s_500_reaches_the_dashboard_in_the_error_shape(make_settings: Callable[..., Settings]) -> None:
    # Starlette answers an unexpected error outside every middleware: the page saw a network error.
    app = create_app(make_settings(cors_origins=DASHBOARD))

    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/v1/boom", headers={"Origin": DASHBOARD})
    assert_error(answer, 500, "internal_error")
    assert answer.headers["access-control-allow-origin"] == DASHBOARD
    assert answer.headers["connection"] == "close"  # the server closes it after a bug's answer
    with TestClient(app) as client, pytest.raises(RuntimeError, match="a bug"):
        client.get("/v1/boom", headers={"Origin": DASHBOARD})  # and on to the server's log, as before


def test_a_dashboard_may_ask_for_a_range_of_an_image_and_read_which_it_got(served: httpx.Client) -> None:
    """Range is safelisted only for `bytes=N-` and `bytes=N-M`, If-Range never: a page asking for
    an image's last bytes, or resuming under its ETag, is preflighted, and a 206's Content-Range is
    no header a page may read unless the answer exposes it."""
    preflight = served.options("/v1/assets/ast_00000000000000000000000000/content", headers={
        "Origin": DASHBOARD, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, range, if-range"})
    assert preflight.status_code == 200, preflight.text
    answer = served.get("/v1/projects", headers={"Origin": DASHBOARD, "Authorization": f"Bearer {KEY}"})
    exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert {"content-range", "accept-ranges"} <= exposed
