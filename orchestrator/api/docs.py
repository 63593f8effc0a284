"""The OpenAPI document's account of errors and created resources: which statuses a route answers,
what each means there, and the headers that come with them. The answers themselves are
`api/errors.py`'s.

Each route lists the errors it can answer, each with a sentence true of that route: a GET that
reads no body is never told "the body is not valid JSON", nor a route that routes nothing "no
engine may take the request". What every /v1 route can answer (the URL's 400, the 401, the
database's 503) is given to the routers in `app.py`; a route's own entry for a status replaces it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

from orchestrator.schemas import ErrorResponse

# What a status means on any route that lists it; a route says more with `said`, or with the
# sentences below.
_DOCUMENTED = {
    400: "The URL holds a NUL character (`%00`), or, on a service without ORCH_ADMIN_KEY listening on a "
         "loopback address, the Host header names another machine (DNS rebinding): `invalid_request`.",
    401: "The bearer key is missing, wrong or revoked (`unauthorized`; only when ORCH_ADMIN_KEY is set).",
    402: "The project's budget cannot hold the estimated cost (`budget_exceeded`).",
    403: "Only the admin key may do this; the request came with a project key (`forbidden`).",
    404: "No such id (`not_found`). To a project key, another project's ids are as missing.",
    409: "The request conflicts with the service's state (`conflict`).",
    410: "The asset was deleted (`gone`): its metadata, image and lineage are not served, nor is it a "
         "source any more.",
    413: "The body is larger than ORCH_MAX_BODY_BYTES (`payload_too_large`).",
    415: "The body was not sent as `Content-Type: application/json` (`invalid_request`).",
    416: "No byte of the image is in the `Range` asked for: it starts at or past the image's length, or is "
         "`bytes=-0` (`invalid_request`, `details.size` the image's length, `details.errors` at "
         "`[\"header\", \"Range\"]`); `Content-Range: bytes */<length>`.",
    422: "Invalid input (`invalid_request`): `details.errors` lists each problem with its `loc`.",
    429: "The project already has ORCH_MAX_PENDING_JOBS unfinished jobs (`rate_limited`); `Retry-After` "
         "says when to try again.",
    500: "The asset's image file is missing or damaged in the store (`content_unavailable`): sending the "
         "request again changes nothing until the operator restores it (`orchestrator check` lists such files).",
    503: "The database is unavailable for now (`database_unavailable`) or its disk is full (`storage_full`), "
         "or the server stopped before it finished the request (`server_stopping`): send it again after "
         "`Retry-After`.",
    507: "The project's live assets hold its storage quota, or would pass it with the most its unfinished jobs and "
         "this one may store (`storage_quota_exceeded`, with `details.used_bytes`, `details.reserved_bytes`, "
         "`details.job_bound_bytes` and `details.quota_bytes`): nothing was made or held. Sending it again changes "
         "nothing until some of its assets are deleted, its jobs end, or the admin raises `storage_quota_mb`.",
}

# The sentences of a route that reads a JSON body.
BODY_400 = ("The body is not JSON this API reads (`invalid_request`, the message says why): not valid JSON or not "
            "UTF-8, `NaN` or a number beyond a 64-bit float, a key given twice in one object, or nesting too deep. "
            "Or the URL holds a NUL character (`%00`), or, on a service without ORCH_ADMIN_KEY listening on a "
            "loopback address, the Host header names another machine (DNS rebinding).")
BODY_422 = ("The body is not valid (`invalid_request`): a field missing, unknown, of another JSON type or out of "
            "its range, or no body where one is needed; `details.errors` lists each problem with its `loc` "
            "(`[\"body\", \"width\"]`).")
IDEMPOTENCY_KEY_422 = (" Or the Idempotency-Key header is empty, not UTF-8, longer than 255 characters or given "
                       "more than once (`loc` `[\"header\", \"Idempotency-Key\"]`).")
ROUTING_422 = (" Or no engine may ever take the request (`no_route`: an unknown `engine`, a policy rule that denies "
               "it or has no engine for it, a private request and only cloud engines), or every engine refuses it "
               "(`invalid_request`: a size larger than each makes); `details.candidates` says why each engine "
               "was left out.")
ROUTING_503 = ("No engine can take the request now (`no_route`: its engines' circuits are open or they are not set "
               "up, `details.candidates` says why each was left out), or the database is unavailable for now "
               "(`database_unavailable`) or its disk is full (`storage_full`), or the server stopped before it "
               "finished the request (`server_stopping`): nothing was made or held; send it again (with the same "
               "Idempotency-Key) after `Retry-After`, when given.")
ROUTING_429 = ("The project already has ORCH_MAX_PENDING_JOBS unfinished jobs (`rate_limited`), or its jobs on local "
               "engines held the device for its `local_seconds_per_day` or more over the last 24 hours and no other "
               "engine may take this request (`device_time_exhausted`, with `details.used_seconds` and "
               "`details.quota_seconds`): nothing was made or held; `Retry-After` says when to try again (for "
               "`device_time_exhausted`, when enough of those seconds are 24 hours old, or an engine's circuit closes; "
               "none for a quota of 0 with no circuit to wait for).")
# The 503 of a route that makes a job: ROUTING_503, and the data dir's free-space reserve.
JOB_503 = ROUTING_503.replace(
    "or its disk is full (`storage_full`)",
    "or its disk is full, or the data dir's disk has less free space than ORCH_MIN_FREE_DISK_MB keeps for the "
    "images of new jobs (`storage_full`, with `details.free_mb` and `details.min_free_mb`)")
# The sentence of a route that reads query parameters.
QUERY_422 = ("A query parameter is not valid (`invalid_request`): not one of its values or out of its range, a "
             "`cursor` that is no page's `next_cursor`, a parameter given twice, one misspelt (`?state=`, "
             "`?Status=`, `?project=`), named as another list names it (`/v1/spend?since=` for `from`), or a filter "
             "of another list that this one does not take (`/v1/spend?stage=`): refused rather than ignored; "
             "`details.errors` gives its `loc` (`[\"query\", \"limit\"]`).")
# Added by `app.py` to the 403 of every route that changes something (`CrossSiteGuard`).
FOREIGN_PAGE_403 = ("A web page of an origin not in ORCH_CORS_ORIGINS sent this request from a browser, without a "
                    "bearer key (`forbidden`).")


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before sending the request again.",
                                 "schema": {"type": "string"}}}
# The headers an error answer carries, for clients generated from the document.
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    416: {"Content-Range": {"description": "`bytes */<image's length>`", "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}


def documented(*statuses: int, said: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the errors a route answers, all in the one error shape (this also
    replaces FastAPI's default 422 entry, whose `{"detail": [...]}` body this API never sends).
    `said`: what a status means on this route, where the general sentence would mislead."""
    return {status: {"model": ErrorResponse, "description": (said or {}).get(status, _DOCUMENTED[status]),
                     **({"headers": _HEADERS[status]} if status in _HEADERS else {})} for status in statuses}


def with_body(*statuses: int, said: dict[int, str] | None = None, idempotency_key: bool = False,
              routed: bool = False) -> dict[int | str, dict[str, Any]]:
    """The errors of a route that reads a JSON body: its 400, 413, 415 and 422, then `statuses`.
    `idempotency_key`: it reads that header (a bad one is a 422); `routed`: it routes the request
    to an engine (a 422 or 503 `no_route`)."""
    told = {400: BODY_400,
            422: BODY_422 + (IDEMPOTENCY_KEY_422 if idempotency_key else "") + (ROUTING_422 if routed else "")}
    if routed:
        told[503] = ROUTING_503
        told[429] = ROUTING_429
    return documented(400, 413, 415, 422, *statuses, *([503] if routed else []), said={**told, **(said or {})})


def with_query(*statuses: int, said: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The errors of a route that reads query parameters: its 422, then `statuses`."""
    return documented(422, *statuses, said={422: QUERY_422, **(said or {})})


# Every route's answer to what it does not list: still the error shape, so that a generated client
# reads its body instead of failing on an undocumented status.
ANY_OTHER_ERROR: dict[int | str, dict[str, Any]] = {"default": {
    "model": ErrorResponse, "description": "Any other error, in the same shape: `internal_error` (500, a bug: "
    "the log has its traceback), `method_not_allowed` (405, with `Allow`), `payload_too_large` (413: a body over "
    "ORCH_MAX_BODY_BYTES, even to a route that reads none), `invalid_request` (415: a body sent with a "
    "`Content-Encoding`, which no route reads, even one that reads no body), and the codes listed for other "
    "statuses."}}


def created(location: str | None, *, replayable: bool) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a 201 and its headers: where the new resource is, and whether the
    answer is an Idempotency-Key's replay."""
    headers: dict[str, Any] = {}
    if location is not None:
        headers["Location"] = {"description": location, "schema": {"type": "string"}}
    if replayable:
        headers["Idempotent-Replayed"] = {
            "description": "`true` when the Idempotency-Key was seen with this body before: this is that first "
                           "request's response; nothing new was made.", "schema": {"type": "string"}}
    return {201: {"description": "Created.", "headers": headers}}


# Request bodies' examples, as /docs's "Try it out" starts from them: each is a request the route
# takes as it is (a test sends every one), but for the ids it names, which are made up.
Examples = dict[str, dict[str, Any]]
EXAMPLE_PROJECT_ID = "prj_01jz8k3m5n7p9q2r4s6t8v0w1x"
EXAMPLE_ASSET_ID = "ast_01jz8k3m5n7p9q2r4s6t8v0w1y"
PROJECT_EXAMPLES: Examples = {
    "budgeted": {"summary": "A project with a monthly budget",
                 "value": {"name": "Lighthouse campaign", "policy": "balanced",
                           "budget": {"limit": 5000, "period": "month"}}},
    "unlimited": {"summary": "The default policy, no budget", "value": {"name": "Sketches"}},
    "quota": {"summary": "A storage quota of 5 GiB of assets", "value": {"name": "Client previews",
                                                                        "storage_quota_mb": 5120}},
}
PROJECT_UPDATE_EXAMPLES: Examples = {
    "limit": {"summary": "Raise the budget's limit (its period stays)", "value": {"budget": {"limit": 8000}}},
    "rename": {"summary": "Rename the project", "value": {"name": "Lighthouse campaign, final"}},
    "no_budget": {"summary": "Remove the budget", "value": {"budget": None}},
    "archive": {"summary": "Archive the project: it takes no new job", "value": {"archived": True}},
    "webhook": {"summary": "POST each job's end to a URL (see the README's Webhooks)",
                "value": {"webhook_url": "https://ci.studio.example/hooks/orchestrator"}},
    "quota": {"summary": "Refuse new jobs once its live assets hold 20 GiB", "value": {"storage_quota_mb": 20480}},
}
DRAFT_EXAMPLES: Examples = {
    "drafts": {"summary": "Four 512x512 drafts of a prompt, seeds 42 to 45",
               "value": {"prompt": "a lighthouse at dusk", "negative_prompt": "", "n": 4, "seed": 42, "width": 512,
                         "height": 512, "steps": None, "guidance_scale": None, "engine": None, "tags": {}}},
}
PROMOTE_EXAMPLES: Examples = {
    "promote": {"summary": "The source's prompt and size, on the engine the policy picks",
                "value": {"prompt": None, "negative_prompt": None, "strength": 0.55, "width": None, "height": None,
                          "quality": "high", "seed": None, "engine": None, "max_credits": None, "tags": {}}},
    "capped": {"summary": "A new prompt, at most 50 credits",
               "value": {"prompt": "a lighthouse at dusk, oil painting", "strength": 0.6, "max_credits": 50}},
}
POLISH_EXAMPLES: Examples = {
    "upscale": {"summary": "Twice the source's size",
                "value": {"scale": 2, "width": None, "height": None, "prompt": None, "creativity": 0.3,
                          "engine": None, "max_credits": None, "tags": {}}},
    "refine": {"summary": "A refine at the source's size on local-hifi, with its own steps and guidance",
               "value": {"scale": None, "creativity": 0.25, "steps": 30, "guidance_scale": 6.0,
                         "engine": "local-hifi"}},
}
EXPLAIN_EXAMPLES: Examples = {
    "ideation": {"summary": "Drafts (stage `ideation`): the project's id and the drafts' body",
                 "value": {"stage": "ideation", "project_id": EXAMPLE_PROJECT_ID, "prompt": "a lighthouse at dusk",
                           "n": 4, "width": 512, "height": 512}},
    "bridge": {"summary": "A promotion (stage `bridge`): the source asset's id and the promote body",
               "value": {"stage": "bridge", "source_asset_id": EXAMPLE_ASSET_ID, "strength": 0.55,
                         "quality": "high"}},
    "polish": {"summary": "A polish: the source asset's id and the polish body",
               "value": {"stage": "polish", "source_asset_id": EXAMPLE_ASSET_ID, "scale": 2, "creativity": 0.3}},
}
GRANT_EXAMPLES: Examples = {
    "grant": {"summary": "500 credits more this window", "value": {"amount": 500, "note": "November top-up"}},
}
RECONCILE_EXAMPLES: Examples = {
    "invoice": {"summary": "The invoiced cost", "value": {"charged": 4.2, "note": "invoice INV-2026-11-0042"}},
}
KEY_EXAMPLES: Examples = {"key": {"summary": "A key for one client", "value": {"name": "render farm"}}}


def body_examples(examples: Examples) -> dict[str, Any]:
    """A route's `openapi_extra` with the examples of its JSON body (the first one is /docs's)."""
    return {"requestBody": {"content": {"application/json": {"examples": examples}}}}


def restore_examples(document: dict[str, Any], routes: Iterable[Any], prefix: str = "") -> None:
    """Put back each route's body examples as written: FastAPI writes the document without null
    values, which dropped them from the examples too (`{"budget": null}`, which removes a budget,
    read `{}`, and the promote body lost its `"prompt": null`). `routes`: a router's, included
    under `prefix`."""
    for route in routes:
        extra = getattr(route, "openapi_extra", None) or {}
        examples = extra.get("requestBody", {}).get("content", {}).get("application/json", {}).get("examples")
        if examples is None:
            continue
        for method in getattr(route, "methods", ()):
            operation = document["paths"].get(prefix + route.path_format, {}).get(method.lower())
            if operation is not None:
                operation["requestBody"]["content"]["application/json"]["examples"] = copy.deepcopy(examples)


_GENERIC_NAME = re.compile(r"[A-Za-z0-9]+_[A-Za-z0-9_]+_")  # pydantic's `Page_AssetPublic_` for `Page[AssetPublic]`


def clean_schema_names(document: dict[str, Any]) -> None:
    """Name each generic model's schema by its title (`AssetPage`, from `Page`'s
    `model_title_generator`), not pydantic's `Page_AssetPublic_`, and point every `$ref` at it."""
    schemas: dict[str, Any] = document.get("components", {}).get("schemas", {})
    renamed = {name: schema["title"] for name, schema in schemas.items()
               if _GENERIC_NAME.fullmatch(name) and str(schema.get("title", "")).isidentifier()
               and schema["title"] not in schemas}
    if not renamed:
        return
    document["components"]["schemas"] = {renamed.get(name, name): schema for name, schema in schemas.items()}
    refs = {f"#/components/schemas/{old}": f"#/components/schemas/{new}" for old, new in renamed.items()}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and value in refs:
                    node[key] = refs[value]
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
