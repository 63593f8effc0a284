"""An empty query value is the same as leaving the parameter out.

Clients fill URL templates with blanks (`/v1/jobs?project_id=&stage=&status=`), and a blank is
not a value of any parameter here: without this, an empty `stage=` was a 422 while an empty
`cursor=` meant the first page. A pure ASGI middleware, so every route reads the same thing.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


def _has_value(part: bytes) -> bool:
    _, equals, value = part.partition(b"=")
    return bool(equals and value)


class DropEmptyQueryValues:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query: bytes = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if query:
            parts = query.split(b"&")
            kept = [part for part in parts if _has_value(part)]
            if len(kept) != len(parts):
                scope = {**scope, "query_string": b"&".join(kept)}
        await self.app(scope, receive, send)
