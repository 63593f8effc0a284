"""Who sends a /v1 request, known before any of its body is read.

FastAPI reads a route's whole body before any dependency runs, auth included: without this, a
client with no key had the server read and hold up to `ORCH_MAX_BODY_BYTES` (or wait for them,
as long as the client took to send them) before its 401. A pure ASGI layer outside the routes
(and outside the body limits and the cross-site guard) asks first: a request without a valid key
is answered 401 at once, its body unread; the HTTP server throws away whatever of it still
arrives, keeping the connection, so a client that sends its whole body before it reads reads the
401, not a reset. That is for a body within `ORCH_MAX_BODY_BYTES`: one declared larger, or chunked
(of a length not told), has the connection closed after the 401, as a caller's with a key is after
its 413; kept open, the server took in all a client without a key cared to send. The caller it
finds is kept on the request (`deps.caller_of`): the routes' auth does not look the key up again.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.api.errors import denied
from orchestrator.api.request_limits import waits_to_send


class KeyBeforeBody:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refused := await denied(Request(scope))) is not None:
            headers = Headers(scope=scope)
            declared = headers.get("content-length", "")
            # Closed after the 401: a body over the limit or of a length not told (see above), or
            # one whose client waits for `100 Continue`, sends none of it and may send its next
            # request instead, which the server would read as this one's body.
            if "transfer-encoding" in headers or waits_to_send(headers) or (
                    declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes):
                refused.headers["Connection"] = "close"
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)
