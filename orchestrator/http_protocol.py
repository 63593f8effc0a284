"""The HTTP/1.1 protocol the service runs under uvicorn: uvicorn's httptools one, with a bound on a
request's head and its refusals in the documented error shape.

httptools sets no limit on a request line or its headers, and uvicorn buffers the whole head
before the app (and its auth, body limits and error shape) sees anything: one client with no key
sending a gigabyte of headers made the process hold a gigabyte, and kept it. A head past
`MAX_HEAD_BYTES` is answered 431 and the connection closed as soon as it is seen. A request
httptools cannot parse (an unknown method, a bad `Content-Length`, a bad chunk size) was answered
a bare-text 400 by uvicorn; it gets `{"error": {...}}` as every other refusal does."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from orchestrator.api.errors import answer
from orchestrator.errors import BadRequest, HeadTooLarge, OrchestratorError, first_line

log = logging.getLogger(__name__)

# A request line and its headers together: nginx's default buffers take 32 KiB of headers (4 x 8
# KiB), h11's limit is 16 KiB. This API's longest legitimate head (a cursor, a project key, an
# Idempotency-Key, CORS headers) is well under 4 KiB.
MAX_HEAD_BYTES = 32 * 1024


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; reading a head, it counts the bytes received."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a message's start (or the last one's end) and its headers' end
        self._head_bytes = 0  # received while reading this head: never more than it, less when a
        # chunk ended the last message and began this one
        self._refused = False

    def data_received(self, data: bytes) -> None:
        # uvicorn's, but for its refusals.
        if self._refused:  # closing: what is still in flight is not parsed
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            # A callback's exception (ours, uvicorn's reading the URL) is wrapped by httptools.
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            if isinstance(cause, _HeadOver):
                self._refuse(self._too_large())
            else:
                said = first_line(cause or exc, "unreadable")
                self._refuse(BadRequest(f"the request is not valid HTTP/1.1 ({said})"))
            return
        # Still reading a head: every byte counted is its own (a chunk may end one and carry a body).
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(self._too_large())

    def on_headers_complete(self) -> None:
        # The head's own size: the chunk that ended it may have carried a body too.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            raise _HeadOver
        self._in_head, self._head_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()

    def _too_large(self) -> HeadTooLarge:
        return HeadTooLarge(f"the request line and headers are over {MAX_HEAD_BYTES} bytes",
                            details={"limit_bytes": MAX_HEAD_BYTES})

    def _refuse(self, exc: OrchestratorError) -> None:
        self._refused = True
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning("refused a request from %s: %s", client, exc.message)
        response = answer(exc, headers={"Connection": "close"})
        head = [f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}\r\n".encode("ascii")]
        for name, value in [*self.server_state.default_headers, *response.raw_headers]:
            head.extend([name, b": ", value, b"\r\n"])
        self.transport.write(b"".join([*head, b"\r\n", bytes(response.body)]))
        self.transport.close()


class _HeadOver(Exception):
    """A head found over the limit once parsed (`on_headers_complete`)."""
