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
    """uvicorn's httptools protocol; reading a head, it counts the bytes received, and reading a
    body, those that are not body (chunk sizes, trailers: httptools keeps trailers as headers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a message's start (or the last one's end) and its headers' end
        self._head_bytes = 0  # received while reading this head: never more than it, less when a
        # chunk ended the last message and began this one
        self._framing_bytes = 0  # received in a body since its last body bytes
        self._body_seen = False
        self._refused = False
        self._deferred: bytes | None = None  # a refusal that waits for the answers owed before it

    def data_received(self, data: bytes) -> None:
        # uvicorn's, but for its refusals.
        if self._refused:  # refused: what is still in flight is not parsed
            return
        self._unset_keepalive_if_required()
        was_head, self._body_seen = self._in_head, False
        if was_head:
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
        if self._in_head:
            # Still reading a head: every byte counted is its own (a chunk may end one and carry a body).
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(self._too_large())
        elif was_head or self._body_seen:
            self._framing_bytes = 0
        else:
            # Neither head nor body: a chunk's size line, or trailers, which httptools keeps whole.
            self._framing_bytes += len(data)
            if self._framing_bytes > MAX_HEAD_BYTES:
                self._refuse(self._too_large())

    def on_headers_complete(self) -> None:
        # The head's own size: the chunk that ended it may have carried a body too.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            raise _HeadOver
        self._in_head, self._head_bytes, self._framing_bytes = False, 0, 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred is not None and not self._owed():
            self._send_and_close(self._deferred)

    def _too_large(self) -> HeadTooLarge:
        return HeadTooLarge(f"the request line and headers (or a chunked body's trailers) are over "
                            f"{MAX_HEAD_BYTES} bytes", details={"limit_bytes": MAX_HEAD_BYTES})

    def _owed(self) -> bool:
        """Whether an earlier request of this connection still waits for its answer (pipelined)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _refuse(self, exc: OrchestratorError) -> None:
        self._refused = True
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning("refused a request from %s: %s", client, exc.message)
        response = answer(exc, headers={"Connection": "close"})
        head = [f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}\r\n".encode("ascii")]
        for name, value in [*self.server_state.default_headers, *response.raw_headers]:
            head.extend([name, b": ", value, b"\r\n"])
        refusal = b"".join([*head, b"\r\n", bytes(response.body)])
        if not self._in_head and self.cycle is not None:
            # The request refused is the one being read (its trailers): this is its answer, and
            # its app's own, if any, is not sent (none can have started: it waits for its body).
            own = self.cycle
            own.disconnected = True
            own.message_event.set()
            if own.response_started:
                self.transport.close()
                return
        elif self._owed():
            # Answered in order: after those of the requests before it on the connection, which
            # ran (a refusal sent in their place was taken for theirs).
            self.flow.pause_reading()
            self._deferred = refusal
            return
        self._send_and_close(refusal)

    def _send_and_close(self, data: bytes) -> None:
        self._deferred = None
        self.transport.write(data)
        self.transport.close()


class _HeadOver(Exception):
    """A head found over the limit once parsed (`on_headers_complete`)."""
