"""`ORCH_ADMIN_KEY`: every /v1 request needs `Authorization: Bearer <key>`; operations do not."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from orchestrator.settings import Settings
from tests.api import assert_error

KEY = "s3cret-key"


@pytest.fixture
def anon(make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> httpx.Client:
    """A client without credentials on a service that requires the admin key."""
    return start_server(make_settings(admin_key=KEY))


def authed(client: httpx.Client) -> httpx.Client:
    return httpx.Client(base_url=client.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


WRONG = [None, "", "Bearer", "Bearer wrong", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}", KEY,
         f"Token {KEY}", f"Bearer {KEY.upper()}"]


def test_missing_or_wrong_key_is_401(anon: httpx.Client) -> None:
    for header in WRONG:
        headers = {} if header is None else {"Authorization": header}
        for path in ("/v1/projects", "/v1/engines", "/v1/jobs"):
            response = anon.get(path, headers=headers)
            error = assert_error(response, 401, "unauthorized")
            assert "Bearer" in error["message"]
            assert response.headers["www-authenticate"] == "Bearer", header


def test_right_key_is_accepted(anon: httpx.Client) -> None:
    with authed(anon) as client:
        assert client.get("/v1/projects").status_code == 200
        created = client.post("/v1/projects", json={"name": "with key"})
        assert created.status_code == 201
        assert client.get(f"/v1/projects/{created.json()['id']}").status_code == 200
    # The scheme is case-insensitive (RFC 7235).
    assert anon.get("/v1/projects", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("around", [b"\xa0", b"\x85"])
def test_only_http_whitespace_around_a_key_is_not_part_of_it(anon: httpx.Client, around: bytes) -> None:
    # str.strip() took a trailing no-break space (or NEL) for whitespace: another key was accepted.
    assert_error(anon.get("/v1/projects", headers={b"Authorization": f"Bearer {KEY}".encode() + around}),
                 401, "unauthorized")
    assert anon.get("/v1/projects", headers={b"Authorization": f"Bearer \t {KEY}".encode()}).status_code == 200


@pytest.mark.parametrize("order", [[KEY, "wrong"], ["wrong", KEY], [KEY, KEY]])
def test_two_authorization_headers_are_refused(anon: httpx.Client, order: list[str]) -> None:
    # One proxy or server reads the first, another the last: neither is taken as the key.
    headers = [("Authorization", f"Bearer {key}") for key in order]
    for path in ("/v1/projects", "/v1/nowhere"):
        response = anon.get(path, headers=headers)
        assert "one 'Authorization" in assert_error(response, 401, "unauthorized")["message"]
    created = anon.post("/v1/projects", headers=headers, json={"name": "two keys"})
    assert_error(created, 401, "unauthorized")
    with authed(anon) as client:
        assert [p for p in client.get("/v1/projects").json()["items"] if p["name"] == "two keys"] == []


def test_auth_comes_before_validation_and_writes_nothing(anon: httpx.Client) -> None:
    """Without the key nothing about the request is judged (no 422 that leaks the schema) or stored."""
    with authed(anon) as client:
        project = client.post("/v1/projects", json={"name": "p"}).json()["id"]
        assert_error(anon.post(f"/v1/projects/{project}/drafts", json={"prompt": ""}), 401, "unauthorized")
        assert_error(anon.post(f"/v1/projects/{project}/drafts", json={"prompt": "x", "n": 1, "width": 64,
                                                                       "height": 64}), 401, "unauthorized")
        assert_error(anon.post("/v1/projects", json={"name": "sneaky"}), 401, "unauthorized")
        # FastAPI reads the body before any dependency: a body that is not JSON is judged too late.
        not_json = anon.post("/v1/projects", content=b"{bad", headers={"content-type": "application/json"})
        assert_error(not_json, 401, "unauthorized")
        assert not_json.headers["www-authenticate"] == "Bearer"
        not_utf8 = anon.post("/v1/projects", content=b'{"name": "\xff"}', headers={"content-type": "application/json"})
        assert_error(not_utf8, 401, "unauthorized")
        bad_with_key = client.post("/v1/projects", content=b"{bad", headers={"content-type": "application/json"})
        assert_error(bad_with_key, 400, "invalid_request")
        assert_error(anon.get("/v1/jobs/job_0000000000zzzzzzzzzzzzzz/events"), 401, "unauthorized")
        assert_error(anon.get("/v1/projects?limit=1&limit=2"), 401, "unauthorized")  # a repeat is judged after
        assert_error(client.get("/v1/projects?limit=1&limit=2"), 422, "invalid_request")
        assert client.get("/v1/jobs").json()["items"] == []
        assert [p["name"] for p in client.get("/v1/projects").json()["items"]] == ["p"]


def test_a_body_is_not_parsed_before_its_sender_is_known(anon: httpx.Client,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # FastAPI reads and parses a body before any dependency runs: anyone without a key had up to
    # ORCH_MAX_BODY_BYTES of JSON parsed on the event loop (a few of them at once stalled /healthz).
    from orchestrator.api import json_body

    parsed: list[int] = []
    loads = json_body.loads

    def counted(body: bytes) -> Any:
        parsed.append(len(body))
        return loads(body)

    monkeypatch.setattr(json_body, "loads", counted)
    big = b"[" + b"1," * 400_000 + b"1]"
    assert_error(anon.post("/v1/projects", content=big, headers={"content-type": "application/json"}),
                 401, "unauthorized")
    assert parsed == []
    with authed(anon) as client:
        assert client.post("/v1/projects", json={"name": "parsed"}).status_code == 201
    assert parsed != []  # the spy sees a body once its sender is known


def _head(client: httpx.Client, path: str, authorization: str | None, length: int, *,
          expect: bool = False) -> socket.socket:
    """A socket that has sent the head of a JSON POST declaring `length` bytes of body (with
    `Expect: 100-continue` if `expect`), and none of it."""
    url = client.base_url
    sock = socket.create_connection((url.host, url.port), timeout=30)
    sent = "" if authorization is None else f"Authorization: {authorization}\r\n"
    sent += "Expect: 100-continue\r\n" if expect else ""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n{sent}\r\n".encode())
    return sock


def test_a_request_without_a_valid_key_is_answered_before_its_body(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    # FastAPI reads a route's whole body before its dependencies (auth) run: a client without a
    # key had the server wait for, read and hold up to ORCH_MAX_BODY_BYTES before its 401.
    size = 50_000_000
    anon = start_server(make_settings(admin_key=KEY, max_body_bytes=64 << 20))
    with authed(anon) as client:
        project = client.post("/v1/projects", json={"name": "a"}).json()["id"]
        other = client.post("/v1/projects", json={"name": "b"}).json()["id"]
        key = client.post(f"/v1/projects/{project}/keys", json={"name": "k"}).json()["key"]
    unknown_key = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")  # well-formed: looked up
    for authorization in (None, "", "Bearer", "Bearer wrong", f"Basic {KEY}", f"Bearer {unknown_key}"):
        for path in ("/v1/projects", f"/v1/projects/{project}/drafts", "/v1/nowhere"):
            with _head(anon, path, authorization, size) as sock:
                sock.settimeout(1)
                answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 401 "), (authorization, path, answer[:200])
            assert b"\r\nwww-authenticate: Bearer\r\n" in answer
            assert answer.endswith(b'{"error":{"code":"unauthorized","message":"a valid \'Authorization: Bearer '
                                   b'<key>\' header is required","details":{}}}')
    # With a valid key the body is waited for and read, as before.
    name = b'{"name": "big"}'
    with _head(anon, "/v1/projects", f"Bearer {KEY}", size) as sock:
        sock.settimeout(1)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        sock.settimeout(30)
        sock.sendall(name + b" " * (size - len(name)))
        assert sock.recv(65536).startswith(b"HTTP/1.1 201 ")
    with _head(anon, f"/v1/projects/{project}/drafts", f"Bearer {key}", size) as sock:
        sock.settimeout(1)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
    # Another project's key is refused as it was, once its body is read: that project is not found.
    foreign = anon.post(f"/v1/projects/{other}/drafts", json={"prompt": "x"},
                        headers={"Authorization": f"Bearer {key}"})
    assert_error(foreign, 404, "not_found")


@pytest.mark.parametrize("chunked", [False, True])
def test_a_keyless_body_over_the_limit_is_cut_off_after_its_401(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        chunked: bool) -> None:
    # The server throws away a body answered early however long it runs: kept open, a client
    # without a key pushed 300 MB (and could go on) through one connection past a 1 MB limit.
    anon = start_server(make_settings(admin_key=KEY))
    url = anon.base_url
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {10 << 30}"
    piece = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n" if chunked else b" " * (1 << 20)
    sent = 0
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/projects HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
                     f"{length}\r\n\r\n".encode())
        answer = sock.recv(65536)
        with contextlib.suppress(OSError):
            for _ in range(300):
                sock.sendall(piece)
                sent += len(piece)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"\r\nconnection: close\r\n" in answer
    assert sent < 100 << 20


def test_a_keyless_body_that_waits_for_100_continue_is_not_waited_for(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    # Told no 100 Continue, a client sends no body, and may send its next request instead: on a
    # connection kept open, the server read that request as the 401's body.
    anon = start_server(make_settings(admin_key=KEY))
    with _head(anon, "/v1/projects", None, 100, expect=True) as sock:
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"\r\nconnection: close\r\n" in answer


def test_what_is_refused_before_routing_needs_the_key_too(anon: httpx.Client) -> None:
    # A body over the limit, a URL with a NUL, a foreign page's POST: answered before any route,
    # they once told a caller without the key the body limit and the rest (413, 400, 403).
    big = b'{"name": "' + b"x" * (2 << 20) + b'"}'
    foreign = {"Origin": "https://evil.example"}
    with authed(anon) as client:
        # With the key, a page's POST is its holder's (a browser never adds one on its own).
        for caller, statuses in ((anon, (401, 401, 401, 401)), (client, (413, 413, 400, 201))):
            declared = caller.post("/v1/projects", content=big, headers={"Content-Type": "application/json"})

            def chunked() -> Iterator[bytes]:
                yield big

            streamed = caller.post("/v1/projects", content=chunked(), headers={"Content-Type": "application/json"})
            nul = caller.get("/v1/projects/%00")
            page = caller.post("/v1/projects", json={"name": "from a page"}, headers=foreign)
            assert [r.status_code for r in (declared, streamed, nul, page)] == list(statuses)
            for response in (declared, streamed, nul, page)[:4 if caller is anon else 3]:
                assert set(response.json()) == {"error"}
            # Past the limit (or of a length not told), what is left of the body is cut off, key or none.
            assert declared.headers["connection"] == streamed.headers["connection"] == "close"
            if caller is anon:
                assert all(r.headers["www-authenticate"] == "Bearer" for r in (declared, streamed, nul, page))
            else:
                assert declared.json()["error"]["details"] == {"max_bytes": 1 << 20}
        assert [p["name"] for p in client.get("/v1/projects").json()["items"]] == ["from a page"]


def test_operations_need_no_key(anon: httpx.Client) -> None:
    health = anon.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert anon.get("/readyz").status_code == 200
    assert anon.get("/metrics").status_code == 200
    assert anon.get("/openapi.json").status_code == 200


def test_no_admin_key_means_open(server: httpx.Client) -> None:
    assert server.get("/v1/projects").status_code == 200
    assert server.get("/v1/projects", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_unknown_routes_and_methods_under_v1_need_the_key_too(anon: httpx.Client) -> None:
    # No route matched, so no route's auth ran: without the key, /v1 must not say what exists.
    assert_error(anon.get("/v1/nope"), 401, "unauthorized")
    assert_error(anon.delete("/v1/projects"), 401, "unauthorized")
    with authed(anon) as client:
        assert_error(client.get("/v1/nope"), 404, "not_found")
        assert_error(client.delete("/v1/projects"), 405, "method_not_allowed")
    assert_error(anon.get("/nope"), 404, "not_found")  # outside /v1 nothing is guarded


def test_docs_know_the_bearer_scheme(anon: httpx.Client) -> None:
    spec = anon.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "`ORCH_ADMIN_KEY`, or a project's key, when the service sets an admin key."}
    operation = spec["paths"]["/v1/projects"]["get"]
    assert operation["security"] == [{"HTTPBearer": []}]
    assert all(p["name"].lower() != "authorization" for p in operation.get("parameters", []))


def test_a_non_ascii_key_works_as_utf8(make_settings: Callable[..., Settings],
                                       start_server: Callable[[Settings], httpx.Client]) -> None:
    client = start_server(make_settings(admin_key="clé-ünïcode"))
    header = "Bearer clé-ünïcode".encode()  # the UTF-8 bytes a client sends
    assert client.get("/v1/projects", headers={b"Authorization": header}).status_code == 200
    assert_error(client.get("/v1/projects", headers={"Authorization": "Bearer cle-unicode"}), 401, "unauthorized")


def test_a_trailing_slash_tells_nothing_without_the_key(anon: httpx.Client) -> None:
    # Starlette's slash redirect used to answer 307 -> /v1/projects before any auth ran.
    for path in ("/v1/projects/", "/v1/jobs/x/events/", "/v1/nope/"):
        assert_error(anon.get(path, follow_redirects=False), 401, "unauthorized")
    with authed(anon) as client:
        assert_error(client.get("/v1/projects/", follow_redirects=False), 404, "not_found")
