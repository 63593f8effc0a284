"""The OpenAPI document's account of errors and created resources: which statuses a route answers,
what each means there, and the headers that come with them. The answers themselves are
`api/errors.py`'s."""

from __future__ import annotations

from typing import Any

from orchestrator.schemas import ErrorResponse

_DOCUMENTED = {
    400: "The body is not valid JSON, or the URL holds a NUL character (%00); or, on a service without "
         "ORCH_ADMIN_KEY on a loopback address, the Host header names another machine (DNS rebinding).",
    401: "The bearer key is missing, wrong or revoked (only when ORCH_ADMIN_KEY is set).",
    402: "The project's budget cannot hold the estimated cost (`budget_exceeded`).",
    403: "Only the admin key may do this; the request came with a project key (`forbidden`). Or a "
         "browser page of an origin not in ORCH_CORS_ORIGINS sent it without a bearer key.",
    404: "No such id (`not_found`).",
    409: "The Idempotency-Key was used with another body (`idempotency_conflict`), the job has already "
         "finished (`job_finished`), or the request conflicts with the service's state (`conflict`).",
    410: "The asset was deleted (`gone`): its metadata, image and lineage are not served, nor is it a "
         "source any more.",
    413: "The body is larger than ORCH_MAX_BODY_BYTES (`payload_too_large`).",
    415: "The body was not sent as `Content-Type: application/json`.",
    422: "Invalid input (`invalid_request`), or no engine may take the request (`no_route`).",
    429: "The project already has ORCH_MAX_PENDING_JOBS unfinished jobs (`rate_limited`); `Retry-After` "
         "says when to try again.",
    503: "No engine is available for the request now (`no_route`, `engine_unavailable`), or the database "
         "did not answer in time (`database_unavailable`) or its disk is full (`storage_full`): nothing "
         "was written, send it again (after `Retry-After`, when given).",
    500: "An asset's image file is missing or damaged in the store (`content_unavailable`: sending the "
         "request again changes nothing until the operator restores it), or a bug (`internal_error`).",
}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before sending the request again.",
                                 "schema": {"type": "string"}}}
# The headers an error answer carries, for clients generated from the document.
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}


def documented(*statuses: int, said: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the errors a route answers, all in the one error shape (this also
    replaces FastAPI's default 422 entry, whose `{"detail": [...]}` body this API never sends).
    `said`: what a status means on this route, where the general sentence would mislead."""
    return {status: {"model": ErrorResponse, "description": (said or {}).get(status, _DOCUMENTED[status]),
                     **({"headers": _HEADERS[status]} if status in _HEADERS else {})} for status in statuses}


# Every route's answer to what it does not list (a 500 `internal_error`, a 405): still the error
# shape, so that a generated client reads its body instead of failing on an undocumented status.
ANY_OTHER_ERROR: dict[int | str, dict[str, Any]] = {"default": {
    "model": ErrorResponse, "description": "Any other error, in the same shape: `internal_error` (500, a bug: "
    "the log has its traceback), `method_not_allowed` (405), and the codes listed for other statuses."}}


def created(location: str | None, *, replayable: bool) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a 201 and its headers: where the new resource is, and whether the
    answer is an Idempotency-Key's replay."""
    headers: dict[str, Any] = {}
    if location is not None:
        headers["Location"] = {"description": location, "schema": {"type": "string"}}
    if replayable:
        headers["Idempotent-Replayed"] = {
            "description": "`true` when the Idempotency-Key was seen with this body before: this answers with "
                           "what that first request made; nothing new was made.", "schema": {"type": "string"}}
    return {201: {"description": "Created.", "headers": headers}}
