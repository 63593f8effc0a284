"""What every request must satisfy before it is routed: a body within the size cap (every body
this API takes is a small JSON document, so anything larger is refused with 413 and never
buffered in memory), a body not compressed (none is decoded: a gzipped one was "not valid JSON"),
and a URL without NUL characters (no id or filter holds one, and PostgreSQL refuses them in
queries) or encoded slashes (no id holds one either: `jobs/{id}%2Fcancel` was routed as the cancel,
past a proxy rule that allows `POST /v1/jobs/*` alone), and one `Content-Type` (of two, the first was
read: a proxy reading the last one saw `text/plain` where the service ran a job)."""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.errors import answer
from orchestrator.errors import BadRequest, NotJSON, PayloadTooLarge

# What is read and thrown away of a body over the limit before the 413 is sent, and for how long.
# A connection closed with bytes left unread is reset by the kernel, and a client still sending its
# body then sees the reset, not the answer (more than half of async clients' 2 MB posts did). A
# larger body, or a slower one, is cut off all the same.
DRAIN_BYTES = 32 << 20
DRAIN_SECONDS = 10.0


async def drain(receive: Receive, budget: int = DRAIN_BYTES) -> None:
    """Read what is left of the request's body, up to `budget` bytes or `DRAIN_SECONDS`."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while budget > 0:
                message = await receive()
                if message["type"] != "http.request":
                    return
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


def waits_to_send(headers: Headers) -> bool:
    """`Expect: 100-continue`: the client sends its body only once told to, which reading it would do."""
    return "100-continue" in headers.get("expect", "").lower()


def _refused_url(scope: Scope) -> BadRequest | None:
    if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
        return BadRequest("the URL contains a NUL character (%00)")
    if b"%2f" in (scope.get("raw_path") or b"").lower():
        return BadRequest("the URL path contains an encoded slash (%2F); no id holds one")
    return None


def _refused_content_type(headers: Headers) -> BadRequest | None:
    if len(headers.getlist("content-type")) > 1:
        return BadRequest("send one Content-Type header, not several")
    return None


def _refused_encoding(headers: Headers, declared: str | None) -> NotJSON | None:
    encoding = headers.get("content-encoding", "").strip().lower()
    has_body = declared not in (None, "0") or "transfer-encoding" in headers
    if not has_body or encoding in ("", "identity"):
        return None
    return NotJSON(f"the body is sent with 'Content-Encoding: {encoding[:40]}', which is not supported: send the "
                   "JSON uncompressed", details={"content_encoding": encoding[:100]})


class BodyTooLarge(HTTPException):
    """An HTTPException (the one kind FastAPI lets out of reading a body) with the details a
    declared Content-Length over the limit is answered with."""

    def __init__(self, message: str, max_bytes: int) -> None:
        super().__init__(413, message, headers={"Connection": "close"})
        self.details = {"max_bytes": max_bytes}


class RequestLimits:
    """Pure ASGI (no per-request task or buffering): a declared `Content-Length` over the limit is
    answered before the app sees it; a chunked body is counted as it is read and stops at the
    limit. Either way what is left of the body is drained (`drain`), never kept."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (ORCH_MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        refusal = _refused_url(scope) or _refused_content_type(headers) or _refused_encoding(headers, declared)
        if refusal is not None:
            # What is sent of the body is read first (as a 413's is): a client still sending saw a reset.
            small = declared is None or (declared.isascii() and declared.isdigit() and int(declared) <= DRAIN_BYTES)
            if small and not waits_to_send(headers):
                await drain(receive)
            await answer(refusal)(scope, receive, send)
            return
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= DRAIN_BYTES and not waits_to_send(headers):
                await drain(receive)
            response = answer(PayloadTooLarge(self._message(), details={"max_bytes": self.max_bytes}))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await drain(receive)
                    # FastAPI re-raises an HTTPException met while reading the body, so the one
                    # error handler answers it in the documented shape.
                    raise BodyTooLarge(self._message(), self.max_bytes)
            return message

        await self.app(scope, counted, send)
