"""HEAD for every GET route (RFC 9110 9.3.2): the status and headers the GET would answer, no body.

FastAPI routes answer only the methods they declare. Declaring HEAD on each one would put a twin
of every GET operation into the OpenAPI document, so this pure ASGI middleware serves a HEAD as
the GET it mirrors instead: same auth, same errors, same Content-Length and ETag, body dropped.
Its `Range` header, if any, is dropped: HEAD has no range handling (RFC 9110 14.2).

The job event stream (GET /v1/jobs/{id}/events) may never end, so a HEAD cannot wait for the
app to finish its body: the headers go out with an empty final body at once, then the app is
told that the client has gone (its `receive` answers `http.disconnect`), which is how a
streaming response learns to stop; whatever it still sends is dropped.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        # Range is defined for GET alone, and any other method's is ignored (RFC 9110 14.2): a
        # HEAD is answered the whole GET's headers (200, the whole Content-Length), not a 206's.
        get_scope = {**scope, "method": "GET",
                     "headers": [(name, value) for name, value in scope.get("headers", []) if name.lower() != b"range"]}
        asgi = scope.get("asgi", {})
        if tuple(int(part) for part in asgi.get("spec_version", "2.0").split(".")) >= (2, 4):
            # From ASGI 2.4 a disconnect shows as a failing `send`, which Starlette's streaming
            # response then waits for instead of watching `receive`; the disconnect this
            # middleware reports is the older kind, so the app must see the older spec.
            get_scope["asgi"] = {**asgi, "spec_version": "2.3"}
        answered = anyio.Event()
        request_read = False

        async def receive_until_answered() -> Message:
            nonlocal request_read
            if not request_read:
                message = await receive()
                request_read = message["type"] != "http.request" or not message.get("more_body", False)
                return message
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send_headers_only(message: Message) -> None:
            if answered.is_set():
                return
            await send(message)
            if message["type"] == "http.response.start":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                answered.set()

        await self.app(get_scope, receive_until_answered, send_headers_only)
