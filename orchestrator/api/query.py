"""Query strings as every route reads them: an empty value is the same as leaving the parameter
out, and a parameter given twice is refused.

Clients fill URL templates with blanks (`/v1/jobs?project_id=&stage=&status=`), and a blank is
not a value of any parameter here: without this, an empty `stage=` was a 422 while an empty
`cursor=` meant the first page. Every parameter here takes one value; given twice
(`?status=succeeded&status=canceled`, a client expecting either, or one that appends to a URL),
the last one silently won and the list was quietly not the one asked for. A pure ASGI
middleware, so every route reads the same thing.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.api.errors import error_response


def _has_value(part: bytes) -> bool:
    _, equals, value = part.partition(b"=")
    return bool(equals and value)


def _repeated(parts: list[bytes]) -> str | None:
    seen: set[str] = set()
    for part in parts:
        name = unquote_plus(part.partition(b"=")[0].decode("latin-1"))
        if name in seen:
            return name
        seen.add(name)
    return None


class DropEmptyQueryValues:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query: bytes = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if query:
            parts = query.split(b"&")
            kept = [part for part in parts if _has_value(part)]
            repeated = _repeated(kept)
            if repeated is not None:
                response = error_response(422, "invalid_request",
                                          f"query parameter '{repeated[:100]}' is given more than once; each takes "
                                          "one value", {"parameter": repeated[:100]})
                await response(scope, receive, send)
                return
            if len(kept) != len(parts):
                scope = {**scope, "query_string": b"&".join(kept)}
        await self.app(scope, receive, send)
