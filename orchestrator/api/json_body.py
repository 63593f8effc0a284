"""Request bodies read as JSON is written (RFC 8259), not as leniently as `json.loads` reads it.

`json.loads` takes UTF-16 and UTF-32 bodies, lets a repeated key overwrite the first
(`{"n": 1, "n": 2000}` was checked as 2000, while a log, a proxy or another client library reads 1),
and reads `NaN`, `Infinity` and numbers past a float's range as numbers that no JSON answer can
carry back. Each is refused here as a body that is not valid JSON (400), saying why.

Every `/v1` router is made with `route_class=StrictJSONRoute`; a test holds every route to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import Message


class UnreadableJSON(ValueError):
    """The body parses as Python's JSON but not as RFC 8259's; the message says what is wrong."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise UnreadableJSON(f"the key {key[:100]!r} appears twice in one object")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise UnreadableJSON(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnreadableJSON(f"the number {text[:40]} is beyond what a 64-bit float holds")
    return value


def loads(body: bytes) -> Any:
    """The JSON value of a body. A UTF-8 byte order mark is ignored, as RFC 8259 allows; any other
    encoding fails to decode (`UnicodeDecodeError`) or to parse."""
    return json.loads(body.decode("utf-8-sig"), object_pairs_hook=_object, parse_constant=_constant,
                      parse_float=_float)


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose body FastAPI parses with `loads`: a refusal reaches `orchestrator.api.errors`
    as FastAPI's 400 for a body it could not parse, with this module's exception as its cause."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            # Read through the request the exception handlers are given, which keeps it: they read
            # the body again (`errors._body_fields`), and a stream already drained would wait forever.
            body = await request.body()
            replayed = False

            async def receive() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await request.receive()  # a disconnect, for a streaming answer

            return await handler(StrictJSONRequest(request.scope, receive))

        return strict
