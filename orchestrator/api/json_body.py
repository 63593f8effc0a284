"""Request bodies read as strictly as RFC 8259 allows, not as leniently as `json.loads` reads them.

`json.loads` takes UTF-16 and UTF-32 bodies (networked JSON is UTF-8), and reads `NaN`,
`Infinity` and numbers past a float's range as numbers that no JSON answer can carry back. It also
lets a repeated key overwrite the first: the RFC says names SHOULD be unique, and which of two
wins differs between parsers (`{"n": 1, "n": 2000}` was checked as 2000, while a log, a proxy or
another client library may read 1), so this API refuses them. Each is a 400, saying why.

Every `/v1` router is made with `route_class=StrictJSONRoute`; a test holds every route to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class UnreadableJSON(ValueError):
    """A body `json.loads` reads and this API does not; the message is the client's answer."""


# No body of this API comes near these: a body past them costs the event loop seconds to read and
# check (90,000 unknown keys froze every request and stream for 5 s), or nests deeper than the
# checks after parsing can walk (a RecursionError there was a 500).
MAX_MEMBERS = 256
MAX_DEPTH = 32
MAX_VALUES = 10_000


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_MEMBERS:
        raise UnreadableJSON(f"the request body holds an object of {len(pairs)} members; no field of this API "
                             f"takes more than {MAX_MEMBERS}")
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise UnreadableJSON(f"the request body gives the key {key[:100]!r} twice in one object; "
                                 "give each key once")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise UnreadableJSON(f"the request body is not valid JSON: {name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnreadableJSON(f"the request body is not valid JSON: the number {text[:40]} is beyond what a "
                             "64-bit float holds")
    if value == 0 and any(digit in "123456789" for digit in text.lower().partition("e")[0]):
        # 1e-400 read as 0: a budget's limit of "1e-400" became 0 where 0.0001 was refused (credits
        # have at most 3 decimals), and a grant of it was told "must be greater than 0".
        raise UnreadableJSON(f"the request body is not valid JSON: the number {text[:40]} is too close to 0 for "
                             "a 64-bit float, which reads it as 0")
    return value


def loads(body: bytes) -> Any:
    """The JSON value of a body. A UTF-8 byte order mark is ignored, as RFC 8259 allows; any other
    encoding fails to decode (`UnicodeDecodeError`) or to parse."""
    value = json.loads(body.decode("utf-8-sig"), object_pairs_hook=_object, parse_constant=_constant,
                       parse_float=_float)
    _within_bounds(value)
    return value


def _within_bounds(value: Any) -> None:
    """Refuse a value nested past MAX_DEPTH or holding more than MAX_VALUES values (walked without
    recursion, stopping at the first excess)."""
    # Levels are the containers', the body's own being 1: a 33rd that was an empty array or object
    # holds no value that would be refused as too deep.
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise UnreadableJSON(f"the request body holds more than {MAX_VALUES} values; no request of this API "
                                 "needs as many")
        if depth > MAX_DEPTH and isinstance(item, (dict, list)):
            raise UnreadableJSON("the request body is JSON nested too deeply to read "
                                 f"(more than {MAX_DEPTH} levels)")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


class StrictJSONRequest(Request):
    """The route's request, its body parsed by `loads`. The body itself is read through the
    request FastAPI was given, which keeps it for the exception handlers (they read it again,
    `errors._body_fields`), and inside FastAPI's own reading, which answers a client that hangs up
    mid-body as it always did."""

    def __init__(self, original: Request) -> None:
        super().__init__(original.scope, original.receive)
        self._original = original

    async def body(self) -> bytes:
        return await self._original.body()

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
            return await handler(StrictJSONRequest(request))

        return strict
