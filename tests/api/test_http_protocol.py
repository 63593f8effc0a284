"""The service's HTTP/1.1 protocol (`orchestrator.http_protocol`): a bound on a request's head, and
the refusals of requests httptools cannot parse, in the documented error shape. Raw sockets: an
HTTP client would refuse to send these."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.http_protocol import MAX_HEAD_BYTES
from orchestrator.server import serve_in_thread
from tests.conftest import SettingsFactory

KEY = "admin-key-for-the-protocol-tests"


@pytest.fixture
def address(make_settings: SettingsFactory) -> Iterator[tuple[str, int]]:
    # `serve_in_thread` runs the `Server` that `orchestrator serve` runs.
    with serve_in_thread(make_settings(run_jobs=False, admin_key=KEY)) as base:
        host, port = base.removeprefix("http://").split(":")
        yield host, int(port)


def exchange(address: tuple[str, int], chunks: list[bytes]) -> tuple[int, dict[str, str], dict[str, Any], int]:
    """Send `chunks`, read the answer until the server closes: (status, headers, JSON body, bytes
    of the chunks sent before the server stopped taking them)."""
    sent = 0
    with socket.create_connection(address, timeout=10) as sock:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        received = b""
        try:
            while part := sock.recv(65536):
                received += part
        except ConnectionResetError:
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body), sent


def test_a_head_past_the_limit_is_refused_431_before_it_is_all_read(address: tuple[str, int]) -> None:
    # No key: the head is refused before anything reads it, as a body past its limit is.
    start = [b"GET /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"]
    pad = [b"X-Pad: " + b"a" * 60_000 + b"\r\n" for _ in range(300)]  # 18 MB, never ended
    status, headers, body, sent = exchange(address, start + pad)
    assert status == 431 and headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert body["error"]["code"] == "invalid_request" and body["error"]["details"] == {"limit_bytes": MAX_HEAD_BYTES}
    assert sent < 10_000_000  # the server closed long before the 18 MB were sent


def test_a_head_within_the_limit_is_served(address: tuple[str, int]) -> None:
    head = (b"GET /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
    status, _headers, body, _sent = exchange(address, [head])
    assert status == 200 and body["items"] == []


def test_a_long_request_line_is_refused_431(address: tuple[str, int]) -> None:
    line = b"GET /v1/projects/" + b"x" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    status, _headers, body, _sent = exchange(address, [line])
    assert status == 431 and body["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("request_bytes", [
    b"FOO /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",                     # an unknown method
    b"POST /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad chunk
    b"GET /v1/pro jects HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",                    # a raw space in the path
])
def test_a_request_httptools_cannot_parse_gets_the_error_shape(
        address: tuple[str, int], request_bytes: bytes) -> None:
    status, headers, body, _sent = exchange(address, [request_bytes])
    assert status == 400 and headers["content-type"] == "application/json"
    assert body["error"]["code"] == "invalid_request" and "not valid HTTP/1.1" in body["error"]["message"]


def test_keep_alive_requests_each_get_their_own_head_count(address: tuple[str, int]) -> None:
    # Three requests of 20 KB heads on one connection: 60 KB in all, each within the limit.
    one = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
    last = one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(one)
        time.sleep(0.2)
        sock.sendall(one)
        time.sleep(0.2)
        sock.sendall(last)
        received = b""
        while part := sock.recv(65536):
            received += part
    assert received.count(b"HTTP/1.1 200 OK") == 3 and b"431" not in received


@pytest.mark.parametrize("key", [True, False])
def test_chunked_trailers_past_the_limit_are_refused_431(address: tuple[str, int], key: bool) -> None:
    # httptools keeps trailers as headers, read after the head was counted: a client grew the
    # process by the megabytes of trailers it sent, with no answer.
    auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n" if key else b""
    start = [b"POST /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + auth +
             b"Transfer-Encoding: chunked\r\n\r\n", b"2\r\n{}\r\n0\r\n"]
    trailers = [b"X-T: " + b"a" * 8000 + b"\r\n" for _ in range(2000)]  # 16 MB, never ended
    status, headers, body, sent = exchange(address, start + trailers)
    if key:
        assert status == 431 and headers["connection"] == "close" and body["error"]["code"] == "invalid_request"
    else:  # answered before its body, then cut off as the trailers pass the limit all the same
        assert status == 401 and body["error"]["code"] == "unauthorized"
    assert sent < 8_000_000


def test_a_chunked_body_of_many_small_chunks_is_read(address: tuple[str, int]) -> None:
    # Chunk size lines are no body: many of them, each with its bytes, are no trailers either.
    payload = b'{"name": "chunked"' + b" " * 30_000 + b"}"  # 10,000 chunks: 50 KB of size lines
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 3]), payload[i:i + 3]) for i in range(0, len(payload), 3))
    head = (b"POST /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, _headers, body, _sent = exchange(address, [head, chunks, b"0\r\n\r\n"])
    assert status == 201 and body["name"] == "chunked"


def test_a_refusal_after_a_pipelined_request_comes_after_its_answer(address: tuple[str, int]) -> None:
    # The refusal was written at once, in place of the first request's answer, which ran all the same.
    first = (b"POST /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 25\r\n\r\n"
             b'{"name": "pipelined-one"}')
    second = b"GET /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n"
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(first + second)
        received = b""
        while part := sock.recv(65536):
            received += part
    answers = re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", received)  # a status line follows the last body directly
    assert answers == [b"HTTP/1.1 201 Created", b"HTTP/1.1 431 Request Header Fields Too Large"]
