"""The one place that turns exceptions into the documented error body and status code."""

from __future__ import annotations

import difflib
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, cast, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.deps import caller_of
from orchestrator.api.json_body import UnreadableJSON
from orchestrator.db import commit_in_doubt, disk_full, refuses_writes, replaced, tables_missing, transient
from orchestrator.errors import (
    BadRequest,
    Conflict,
    DatabaseUnavailable,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    NotJSON,
    OrchestratorError,
    PayloadTooLarge,
    RangeNotSatisfiable,
    StorageFull,
    TooManyJobs,
    Unauthorized,
    first_line,
    mask_secrets,
    shown,
)
from orchestrator.outage import REMIND_SECONDS, Outage
from orchestrator.schemas import FieldError

log = logging.getLogger(__name__)

# Starlette's own refusals (no route for the path, a method the path does not serve, a body it
# could not decode), as the service's errors.
_STARLETTE: dict[int, type[OrchestratorError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed, 409: Conflict,
    413: PayloadTooLarge, 415: NotJSON, 422: InvalidRequest, 429: TooManyJobs}


class _ErrorJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            # Text that is not Unicode (a lone surrogate the JSON parser took, echoed in a message)
            # cannot be UTF-8: without this, a 4xx about bad input would become a 500.
            return super().render(_encodable(content))


def _encodable(value: Any) -> Any:
    """`value` with each unencodable character of its text written as its escape, `\\ud800`."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(key): _encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    return value


def answer(exc: OrchestratorError, *, details: dict[str, Any] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """The answer to `exc`: its status, the error body (with `details` in place of its own) and
    the headers its kind calls for, `headers` added."""
    sent = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if isinstance(exc, RangeNotSatisfiable):
        sent["Content-Range"] = f"bytes */{exc.size}"
    if exc.retry_after is not None:
        sent["Retry-After"] = str(max(1, exc.retry_after))
    given = {name.lower() for name in headers or {}}
    sent = {**{name: value for name, value in sent.items() if name.lower() not in given}, **(headers or {})}
    body = {"code": exc.code, "message": exc.message, "details": exc.details if details is None else details}
    return _ErrorJSON({"error": body}, status_code=exc.status, headers=sent or None)


# Validation errors listed in one answer: one per field of a body with tens of thousands of
# unknown fields would be megabytes and a second of the server's time for a small request.
MAX_LISTED_ERRORS = 50


# Errors of our own validators, which may refuse a null for a reason of their own: told as written.
_OWN_ERRORS = frozenset({"value_error", "assertion_error"})


def _clean(errors: Sequence[Any], model: type[BaseModel] | None = None) -> list[dict[str, Any]]:
    """`errors` made JSON-safe and told in the API's words; `model`, the body's, says which fields
    are required."""
    # Pydantic errors may carry the offending input and a context object; keep them JSON-safe.
    out = []
    for err in errors[:MAX_LISTED_ERRORS]:
        msg = str(err.get("msg", "")).removeprefix("Value error, ")  # our own validators' messages, as written
        loc: tuple[str | int, ...] = tuple(err.get("loc", ()))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError) and cause.loc:  # found by the body's check, before or after its fields'
            loc, msg = loc + cause.loc, cause.why  # the message names the place as any field error does
        elif "input" in err and err["input"] is None and len(loc) > 1 and err.get("type") not in _OWN_ERRORS:
            # A null where the field takes none: pydantic's "Input should be a valid string" read as a
            # wrong type, when the client left a value unset (`"prompt": null`).
            msg = "is required and may not be null" if _required_at(model, loc[1:]) else "may not be null"
        elif err.get("type") == "json_invalid" and len(loc) == 2 and isinstance(offset := loc[1], int):
            # FastAPI places a JSON syntax error at its character offset, which is no field; told
            # counted from 1, as an editor's column on a one-line body.
            loc, msg = loc[:1], f"{cause or 'not valid JSON'} at character {offset + 1}"
        elif err.get("type") == "model_attributes_type" and loc == ("body",):
            msg = "the request body must be a JSON object"
        # A place is a field's name the client may have made up (an unknown one): cut as an id is.
        out.append({"loc": [shown(str(p)) for p in loc], "msg": msg, "type": str(err.get("type", ""))})
    return out


def _listed(errors: Sequence[Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """`details` of a validation error: the first `MAX_LISTED_ERRORS` errors, and how many more."""
    details: dict[str, Any] = {"errors": _clean(errors, model)}
    if len(errors) > MAX_LISTED_ERRORS:
        details["errors_not_listed"] = len(errors) - MAX_LISTED_ERRORS
    return details


def _where(loc: Sequence[str]) -> str:
    """A field path for a message: `tags.client`, and for a bad key of a mapping `tags key ''`
    (pydantic places such an error at the key, then a `[key]` marker)."""
    if len(loc) >= 2 and loc[-1] == "[key]":
        return f"{'.'.join(loc[:-2])} key {loc[-2]!r}".lstrip()
    return ".".join(loc)


class BodyValidationError(RequestValidationError):
    """A body a route validates by hand against `model`, not its declared one (explain's stage
    bodies): misspelt fields are matched against that model's names."""

    def __init__(self, errors: Sequence[Any], *, model: type[BaseModel], body: Any) -> None:
        super().__init__(errors, body=body)
        self.model = model


def _body_model(request: Request, exc: RequestValidationError) -> type[BaseModel] | None:
    if isinstance(exc, BodyValidationError):
        return exc.model
    body_field = getattr(request.scope.get("route"), "body_field", None)
    return _model_in(getattr(getattr(body_field, "field_info", None), "annotation", None))


def _meant(error: dict[str, Any], model: type[BaseModel] | None, body: Any) -> str | None:
    """The field an unknown one of the body was meant to be: the closest name the model takes
    there that the body does not give already."""
    path = error["loc"][1:-1]
    given = body
    for part in path:
        given = given.get(part) if isinstance(given, dict) else (
            given[int(part)] if isinstance(given, list) and str(part).isdigit() and int(part) < len(given) else None)
    taken = set(given) if isinstance(given, dict) else set()
    return _closest(str(error["loc"][-1]), [name for name in _fields_at(model, path) if name not in taken])


def _fields_at(model: type[BaseModel] | None, path: Sequence[Any]) -> list[str]:
    """The names `model` takes at `path` (field names, list indexes), or none when that is not
    known."""
    for part in path:
        if model is None:
            return []
        by_name = {field.alias or name: field for name, field in model.model_fields.items()}
        if str(part) in by_name:
            model = _model_in(by_name[str(part)].annotation)
        elif not str(part).isdigit():  # an item of a list is the model it holds, already taken out
            return []
    return [] if model is None else [field.alias or name for name, field in model.model_fields.items()]


def _required_at(model: type[BaseModel] | None, path: Sequence[Any]) -> bool:
    """Whether the field at `path` (field names, list indexes) of `model` must be given; False when
    that is not known."""
    if model is None or not path or str(path[-1]).isdigit():
        return False
    *parents, name = path
    for part in parents:
        by_name = {field.alias or key: field for key, field in model.model_fields.items()}
        if str(part) in by_name:
            found = _model_in(by_name[str(part)].annotation)
            if found is None:
                return False
            model = found
        elif not str(part).isdigit():
            return False
    field = next((f for key, f in model.model_fields.items() if (f.alias or key) == str(name)), None)
    return field is not None and field.is_required()


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`Budget | None`, `list[Rule]`), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for inner in get_args(annotation):
        if (found := _model_in(inner)) is not None:
            return found
    return None


def _closest(given: str, names: list[str]) -> str | None:
    found = difflib.get_close_matches(given.lower(), names, n=1, cutoff=0.7)
    return found[0] if found else None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _allowed_methods(request: Request, told: str) -> str:
    # Starlette's 405 names only the methods of the first route on the path (`told`); a path served
    # by several routes (GET and PATCH /v1/projects/{id}) must list them all. The OpenAPI document
    # is the public, cached map of paths to methods; pages outside it (/docs) keep Starlette's.
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    if not methods:
        methods = {method.strip() for method in told.split(",") if method.strip()}
    if "GET" in methods:
        methods.add("HEAD")  # served as the GET by orchestrator.api.head, and kept out of the document
    return ", ".join(sorted(methods))


async def denied(request: Request) -> JSONResponse | None:
    """The 401 for a /v1 request without a valid key, answered before anything else about it is
    judged or read (`orchestrator.api.auth`): without the key, /v1 tells nothing else, not even
    which paths exist."""
    services = getattr(request.app.state, "services", None)
    if services is None or not request.url.path.startswith("/v1/"):
        return None
    try:
        await caller_of(request)  # kept on the request for the routes' own auth
    except OrchestratorError as refusal:
        return answer(refusal)
    except (DBAPIError, PoolTimeout) as exc:
        # A project key looked up while the database is away, from inside another handler or a
        # middleware, where the database's own handler is never reached: its 503, not a bug's 500.
        handler = request.app.exception_handlers[DBAPIError if isinstance(exc, DBAPIError) else PoolTimeout]
        return cast(JSONResponse, await handler(request, exc))
    return None


def _unreadable_body(cause: BaseException | None) -> str:
    """What made a body FastAPI could not parse unreadable: its own answer says only that it failed."""
    if isinstance(cause, RecursionError):
        return "the request body is JSON nested too deeply to read"
    if isinstance(cause, UnreadableJSON):
        return str(cause)
    if isinstance(cause, ValueError) and not isinstance(cause, UnicodeDecodeError) and "digits" in str(cause):
        return "the request body holds a number with too many digits to read"
    return "the request body is not valid JSON (JSON is sent as UTF-8)"


async def _body_fields(request: Request) -> set[str]:
    """The top-level fields of the request's JSON body (read once already: starlette keeps it)."""
    try:
        body = await request.json()
    except Exception:  # no body, not JSON, or not readable again
        return set()
    return set(body) if isinstance(body, dict) else set()


class RequestsOutage:
    """Requests failed by the database (away, or without this service's tables), told as a duty's
    failures are (`Outage`): once for each kind, then a line a minute while they go on. A line each
    was a hundred of the same warning for a hundred requests (a scrape every 15 s, clients polling).
    No request tells of a recovery: a minute without a failure ends the outage."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._outage = Outage(log, "requests", "each is answered 503 while it lasts", clock=clock)
        self._clock = clock
        self._last: float | None = None

    def failed(self, exc: BaseException) -> None:
        now = self._clock()
        if self._last is not None and now - self._last >= REMIND_SECONDS:
            self._outage.reset()
        self._last = now
        self._outage.failed(exc)


def install(app: FastAPI) -> None:
    outage = RequestsOutage()

    @app.exception_handler(OrchestratorError)
    async def _orchestrator(request: Request, exc: OrchestratorError) -> JSONResponse:
        details = exc.details
        if exc.code == "invalid_request" and "errors" not in details:
            # A refusal found past the body's validation (an engine's size limit) lists itself as
            # validation errors do, so that a client reading `details.errors` finds every 422's.
            field = details.get("field")
            # Placed on the body's field only when the client sent it: a size the service worked
            # out (a polish's scale) or an engine's default steps are no field of the request.
            sent = isinstance(field, str) and field in await _body_fields(request)
            details = {**details, "errors": [{"loc": ["body", field] if sent else [],
                                              "msg": exc.message, "type": "value_error"}]}
        return answer(exc, details=details)

    @app.exception_handler(ValidationError)
    async def _inner_validation(_: Request, exc: ValidationError) -> JSONResponse:
        details = _listed(exc.errors())
        errors = details["errors"]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = _where(first["loc"])
        return answer(InvalidRequest(f"{where[:200]}: {first['msg']}" if where else str(first["msg"]), details=details))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        model = _body_model(request, exc)
        details = _listed(exc.errors(), model)
        errors = details["errors"]
        if any(e["type"] == "json_invalid" for e in errors):
            syntax = next(e["msg"] for e in errors if e["type"] == "json_invalid")
            return answer(BadRequest(f"the request body is not valid JSON: {syntax}", details={"errors": errors}))
        whole_body = next((e for e in errors if e["loc"] == ["body"]), None)
        if whole_body is not None:
            # `curl -d` sends form encoding unless told otherwise: FastAPI then sees bytes, not an object.
            content_type = request.headers.get("content-type", "")
            if whole_body["type"] == "missing":
                return answer(InvalidRequest("this request needs a JSON body", details={"errors": errors}))
            if not _is_json(content_type):
                return answer(NotJSON("send the body as JSON, with 'Content-Type: application/json'",
                                      details={"content_type": content_type}))
        # A misspelt field explains the field it leaves missing: it leads, with the name meant.
        unknown = [e for e in errors if e["type"] == "extra_forbidden" and e["loc"][:1] == ["body"]]
        for error in unknown:
            if (meant := _meant(error, model, exc.body)) is not None:
                where = _where(error["loc"][1:])
                return answer(InvalidRequest(f"unknown field '{where[:200]}'; did you mean '{meant}'?",
                                             details=details))
        if unknown:
            # Pydantic's "Extra inputs are not permitted" names no field the request could use.
            error = unknown[0]
            taken = _fields_at(model, error["loc"][1:-1])
            told = f" (fields here: {', '.join(taken)})" if taken else ""
            return answer(InvalidRequest(f"unknown field '{_where(error['loc'][1:])[:200]}'{told}", details=details))
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = _where([p for p in first["loc"] if p not in ("body", "query", "path", "header")])
        return answer(InvalidRequest(f"{where[:200]}: {first['msg']}" if where else str(first["msg"]), details=details))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        headers = getattr(exc, "headers", None)
        details = getattr(exc, "details", None)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's answer to a body it could not decode (not UTF-8).
            detail = _unreadable_body(exc.__cause__)
            details = {"errors": [{"loc": ["body"], "msg": detail, "type": "json_invalid"}]}
        if exc.status_code == 404 and detail == "Not Found":  # the router's: no route has this path
            path = request.url.path
            detail = f"no such path: {mask_secrets(path[:200])}" + (" (the API's paths have no trailing slash)"
                                                 if len(path) > 1 and path.endswith("/") else
                                                 " (the API's paths are listed at /docs)"
                                                 if path in ("/", "/v1") else "")
        if exc.status_code == 405:
            # Pages outside the document (/openapi.json, /docs) keep Starlette's list: theirs was empty.
            allowed = _allowed_methods(request, (headers or {}).get("Allow", ""))
            headers = {**(headers or {}), "Allow": allowed}
            detail = (f"{request.method[:20]} is not allowed on {mask_secrets(request.url.path[:200])}; "
                      f"it answers {allowed}")
            details = {"allowed": allowed.split(", ")}
        error = _STARLETTE.get(exc.status_code, OrchestratorError)(detail, details=details)
        if type(error) is OrchestratorError:  # a status Starlette has no other use for here: told as it is
            error.status, error.code = exc.status_code, "error"
        return answer(error, headers=headers)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _database(_: Request, exc: Exception) -> JSONResponse:
        # A database that is restarting, unreachable, or held by a stalled writer past the lock
        # timeout: nothing was written (the transaction rolled back), and the request may be sent
        # again. A statement it refused (a query's mistake) is the server's fault.
        # (Any driver error: a lost connection may come as psycopg's ProgrammingError, see `transient`.)
        if tables_missing(exc):
            outage.failed(exc)
            return answer(DatabaseUnavailable(
                "the database lacks some or all of this service's tables (made anew, or a restore under way): nothing "
                "was written; its operator must finish the restore or run `orchestrator migrate`"))
        if isinstance(exc, DBAPIError) and not transient(exc):
            log.error("database error", exc_info=exc)
            return _internal_error()
        if disk_full(exc):
            log.error("the database's disk is full: %s", first_line(exc)[:300])
            return answer(StorageFull("the server's disk is full; nothing was written, send the request again once "
                                      "its operator has made room (with the same Idempotency-Key for a POST)"))
        if replaced(exc):
            outage.failed(exc)
            return answer(DatabaseUnavailable(
                "the database file was replaced or removed under the running service (a restore?): nothing was "
                "written, and nothing is until its operator restarts the service (restore with it stopped)"))
        if refuses_writes(exc):
            outage.failed(exc)
            return answer(DatabaseUnavailable(
                "the database takes no writes for now (a read-only standby or session, as during a failover or "
                "a maintenance window, or a database file or mount made read-only): nothing was written, send "
                "the request again (with the same Idempotency-Key for a POST)"))
        if commit_in_doubt(exc):
            log.warning("database connection lost as a write committed; it may have been written: %s",
                        first_line(exc, type(exc).__name__)[:300])
            return answer(DatabaseUnavailable(
                "the connection to the database was lost as the write was committed: it may have been written. "
                "Send the request again with the same Idempotency-Key, which answers with what was written; "
                "without one, look first (list the project's jobs, its grants): sent again, it may be done twice",
                details={"written": "unknown"}))
        outage.failed(exc)
        # Said of what it is: refused, cut or busy alike (a refusal within 0.1 s did not "time out").
        return answer(DatabaseUnavailable("the database is unavailable for now (busy, restarting or unreachable); "
                                          "nothing was written, send the request again (with the same "
                                          "Idempotency-Key for a POST)"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # No logging here: Starlette re-raises after this answer and the server logs the traceback.
        return _bug_answer()


def _internal_error() -> JSONResponse:
    return answer(OrchestratorError("internal server error"))


def _bug_answer() -> JSONResponse:
    """The 500 of a bug. The exception goes on up after it, and the server then closes the
    connection: said, so a client's pool does not send its next request on it (ECONNRESET)."""
    response = _internal_error()
    response.headers["Connection"] = "close"
    return response


class StartTracker:
    """An ASGI `send` that notes whether the answer has begun: a layer answering for a request
    that failed may only do so before."""

    def __init__(self, send: Send) -> None:
        self.started = False
        self._send = send

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


class UnexpectedErrors:
    """Answers a bug's 500 inside the CORS layer. Starlette answers it in its outermost layer,
    outside every middleware, so a dashboard's page got a 500 without CORS headers: a bare network
    error it could not read. The exception goes on up, as before, for the server to log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = StartTracker(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if not tracked.started:
                await _bug_answer()(scope, receive, send)
            raise
