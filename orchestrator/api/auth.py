"""Who sends a /v1 request, known before any of its body is read.

FastAPI reads a route's whole body before any dependency runs, auth included: without this, a
client with no key had the server read and hold up to `ORCH_MAX_BODY_BYTES` (or wait for them,
as long as the client took to send them) before its 401. A pure ASGI layer outside the routes
(and outside the body limits and the cross-site guard) asks first: a request without a valid key
is answered 401 at once, its body unread; the HTTP server throws away whatever of it still
arrives, keeping the connection, so a client that sends its whole body before it reads reads the
401, not a reset. The caller it finds is kept on the request (`deps.caller_of`): the routes'
auth does not look the key up again.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.api.errors import denied


class KeyBeforeBody:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refused := await denied(Request(scope))) is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)
