"""Query strings as every route reads them: an empty value is the same as leaving the parameter
out, and a parameter of the route given twice is refused.

Clients fill URL templates with blanks (`/v1/jobs?project_id=&stage=&status=`), and a blank is
not a value of any parameter here: without this, an empty `stage=` was a 422 while an empty
`cursor=` meant the first page. A pure ASGI middleware, so every route reads the same thing.

Every parameter here takes one value; given twice (`?status=succeeded&status=canceled`, a client
expecting either, or one that appends to a URL), the last one silently won and the list was
quietly not the one asked for. Checked by a dependency of the `/v1` routers, after auth: only the
route's own parameters (a cache-buster nobody reads may repeat), and an unknown path stays a 404.
Parameters a route does not read are let through (cache-busters, tracking), except one that
reads as a misspelling of the route's own (`?state=queued`, `?Status=`, `?projectid=`, `?project=`),
or as the name another list of the API gives the same bound (`/v1/spend?since=`), or that is a
filter another list of the API takes (`/v1/spend?engine=`, `?Engine=`): its list would be the unfiltered one,
without a word.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from fastapi import Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BeforeValidator
from starlette.types import ASGIApp, Receive, Scope, Send
from typing_extensions import TypeAliasType

from orchestrator.errors import InvalidRequest
from orchestrator.schemas import Stage


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


def single_valued_query(request: Request) -> None:
    """Refuses a parameter of the route given more than once, and one that is a near miss of the
    route's own (see the module's docstring)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    names = _query_names(route.dependant)
    for name in names:
        if len(request.query_params.getlist(name)) > 1:
            raise InvalidRequest(f"query parameter '{name}' is given more than once; each takes one value",
                                 details={"parameter": name}, loc=("query", name))
    for given in request.query_params:
        if given not in names and (meant := _near_misses(given, names)):
            # What it may have meant, told more widely than what makes it a misspelling: `state` is
            # one typo from `stage` and as likely `status`.
            folded = {name.lower(): name for name in names}
            meant += [folded[name] for name in difflib.get_close_matches(given.lower(), sorted(folded), n=2, cutoff=0.7)
                      if folded[name] not in meant]
            raise InvalidRequest(f"unknown query parameter '{given[:100]}'; did you mean "
                                 f"{' or '.join(repr(name) for name in meant)}?",
                                 details={"parameter": given[:100], "known": sorted(names)}, loc=("query", given[:100]))
        # Only on the routes that read a query (the lists, a preview, a stream), whose 422 says so.
        # Folded as a misspelling of the route's own is (`?Engine=`, `?job-id=`, `?jobId=`).
        if names and given not in names and (meant_filter := _filters_of_the_api(request).get(_folded(given))):
            told = f"'{given[:100]}'" + ("" if given == meant_filter else f" (read as '{meant_filter}')")
            raise InvalidRequest(f"query parameter {told} is a filter of other lists of the API; "
                                 f"{request.url.path[:200]} does not filter by it "
                                 f"(its parameters: {', '.join(sorted(names)) or 'none'})",
                                 details={"parameter": given[:100], "known": sorted(names)}, loc=("query", given[:100]))


# The API bounds a list's time by two pairs of names: `/v1/spend` by `from`/`to`, the webhook
# deliveries' lists by `since`/`until`. A client that takes one route's words to the other got its
# bound ignored: `/v1/spend?since=...` answered the all-time total.
_SAME_MEANING = {"since": "from", "until": "to", "from": "since", "to": "until"}


# Words of the API's query strings whose loss leaves an answer that reads as the one asked for:
# not the paging, a format or a stream's resume, which change what comes back visibly.
_NOT_FILTERS = frozenset({"limit", "cursor", "order", "format", "lastEventId", "step"})


def _folded(name: str) -> str:
    """A parameter's name as its misspellings by case, dashes or underscores all read."""
    return name.lower().replace("-", "").replace("_", "")


def _filters_of_the_api(request: Request) -> dict[str, str]:
    """Every filter some `/v1` route reads (`engine`, `stage`, `job_id`, `since`, ...), by its
    folded name. Sent to a route that reads none of it, it was dropped without a word:
    `/v1/spend?engine=lite` answered every engine's total, a project's assets `?engine=lite` every asset."""
    state = request.app.state
    found: dict[str, str] | None = getattr(state, "query_filters", None)
    if found is None:
        # Read from the OpenAPI document (built once): included routers are not listed as routes.
        names = {param["name"] for path, operations in request.app.openapi()["paths"].items()
                 if path.startswith("/v1/") for operation in operations.values()
                 for param in operation.get("parameters", ()) if param.get("in") == "query"}
        found = state.query_filters = {_folded(name): name for name in sorted(names - _NOT_FILTERS)}
    return found


def _near_misses(given: str, names: set[str]) -> list[str]:
    """The route's parameters `given` misspells: the same but for case, dashes or underscores
    (`Status`, `projectid`), one typo away (`state`, `lmit`, `ordre`) from a name of 4 letters
    or more, the name short of its last word (`project` for `project_id`, `group` for `group_by`),
    or the API's name for the same bound on its other lists (`since` for `from`). Further than that
    is another word (`tag`, `parent_id`, `start`), let through. Both sides are folded: a camel-case
    name (`lastEventId`) has case variants and typos too."""
    folded = given.lower().replace("-", "_")
    same = [name for name in names if _folded(given) == _folded(name)]
    if same:
        return same
    shortened = [name for name in names if "_" in name and folded == name.lower().rsplit("_", 1)[0]]
    if shortened:
        return shortened
    if (other := _SAME_MEANING.get(folded)) in names:
        return [other]
    return sorted(name for name in names if len(name) >= 4 and _one_typo(folded, name.lower()))


def _one_typo(a: str, b: str) -> bool:
    """Whether `a` is `b` with one letter changed, added, dropped, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diffs) == 1 or (len(diffs) == 2 and diffs[1] == diffs[0] + 1
                                   and a[diffs[0]] == b[diffs[1]] and a[diffs[1]] == b[diffs[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((i for i, (x, y) in enumerate(zip(short, long, strict=False)) if x != y), len(short))
    return short[i:] == long[i + 1:]


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route reads, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _query_names(dependency)
    return names


def _digits(value: Any) -> Any:
    """A count in a query string as digits alone: pydantic read `10.0`, `1_0`, ` 10 ` and `+10` as
    10, so a client's formatting slip (a float, a padded template) went unseen. A minus before the
    digits (a negative count) is let through to the parameter's range, which says what it takes;
    not before zero: `-0` is a signed 0 as `+0` is, which a range from 0 took as 0."""
    digits = value[1:] if isinstance(value, str) and value.startswith("-") and value.strip("-0") else value
    if isinstance(value, str) and not (digits.isascii() and digits.isdigit()):
        raise ValueError("must be a whole number written in digits, e.g. 50")
    return value


WholeNumber = BeforeValidator(_digits)
Limit = Annotated[int, Query(ge=1, le=500, description="Items per page, 1 to 500 (default 50)."), WholeNumber]
Cursor = Annotated[str | None, Query(description=(
    "Where the page starts: the previous page's `next_cursor` (empty or left out: the first page). Any other "
    "value is a 422."))]
SortOrder = TypeAliasType("SortOrder", Literal["asc", "desc"])
Order = Annotated[SortOrder, Query(
    description="`asc`: oldest first (the default); `desc`: newest first. A page's `next_cursor` goes on in the "
                "same order.")]
StageFilter = Annotated[Stage | None, Query(description=(
    "Only those of this stage: `ideation` (drafts), `bridge` or `polish`; left out: every stage."))]
Archived = Annotated[bool, Query(description=(
    "`true`: archived projects are listed too; `false` (the default): only those not archived."))]


def paged(stmt: Any, column: Any, after: Any, order: str) -> Any:
    """`stmt` ordered by `column` (ids grow with time: they are made under the write lock), from
    past the cursor `after` in that order."""
    if order == "desc":
        stmt = stmt.order_by(column.desc())
        return stmt if after is None else stmt.where(column < after)
    stmt = stmt.order_by(column)
    return stmt if after is None else stmt.where(column > after)
