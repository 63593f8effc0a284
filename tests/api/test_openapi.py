"""The OpenAPI document tells clients the truth: every error status a route answers is listed for
that route, in the one error shape (never FastAPI's default `{"detail": [...]}`); limits are JSON
Schema's keywords with the values validation enforces; each answer lists the media types it has."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

from orchestrator.api.docs import EXAMPLE_ASSET_ID, EXAMPLE_PROJECT_ID
from orchestrator.app import create_app
from orchestrator.events import job_mark
from orchestrator.schemas import DraftCreate, PolishCreate, PromoteCreate
from orchestrator.settings import Settings
from tests.api import assert_error, create_project, run_draft

SettingsFactory = Callable[..., Settings]
ERROR_REF = "#/components/schemas/ErrorResponse"
MISSING_JOB, MISSING_ASSET = "job_0000000000zzzzzzzzzzzzzz", "ast_0000000000zzzzzzzzzzzzzz"
JSON = {"Content-Type": "application/json"}
CODES = {400: "invalid_request", 403: "forbidden", 404: "not_found", 409: "conflict", 413: "payload_too_large",
         415: "invalid_request", 422: "invalid_request"}


@pytest.fixture(scope="module")
def spec(shared_server: httpx.Client) -> dict[str, Any]:
    document: dict[str, Any] = shared_server.get("/openapi.json").json()
    return document


@pytest.fixture(scope="module")
def project(shared_server: httpx.Client) -> str:
    project_id: str = create_project(shared_server, "openapi")["id"]
    return project_id


def test_every_error_response_uses_the_error_shape(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    checked = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status == "default" or int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, (method, path)
                    checked += 1
            if path.startswith("/v1/"):
                # And what a route does not list (a 500, a 405) is read in that shape too.
                assert "401" in operation["responses"] and "default" in operation["responses"], (method, path)
    assert checked > 40


@pytest.mark.parametrize(("path", "url"), [("/v1/jobs/{job_id}/cancel", f"/v1/jobs/{MISSING_JOB}/cancel"),
                                          ("/v1/policies/reload", "/v1/policies/reload")])
def test_a_route_that_reads_no_body_documents_its_refusal_of_an_encoded_one(
        shared_server: httpx.Client, spec: dict[str, Any], path: str, url: str) -> None:
    answer = shared_server.post(url, content=b"\x1f\x8b", headers={"content-encoding": "gzip"})
    assert answer.status_code == 415 and answer.json()["error"]["code"] == "invalid_request", answer.text
    responses = spec["paths"][path]["post"]["responses"]
    assert "415" in responses or "415: a body sent with a `Content-Encoding`" in responses["default"]["description"]


# (method, route as in the document, concrete URL, request options, the status it answers)
CASES: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("get", "/v1/jobs/{job_id}", f"/v1/jobs/{MISSING_JOB}", {}, 404),
    ("post", "/v1/jobs/{job_id}/cancel", f"/v1/jobs/{MISSING_JOB}/cancel", {}, 404),
    ("get", "/v1/jobs/{job_id}/events", f"/v1/jobs/{MISSING_JOB}/events", {}, 404),
    ("get", "/v1/jobs", "/v1/jobs", {"params": {"status": "done"}}, 422),
    ("get", "/v1/jobs", "/v1/jobs", {"params": {"project_id": "a\x00"}}, 400),
    ("post", "/v1/projects", "/v1/projects", {"json": {}}, 422),
    ("post", "/v1/projects", "/v1/projects", {"content": b"{", "headers": JSON}, 400),
    ("post", "/v1/projects", "/v1/projects", {"content": b'{"name": "x"}', "headers": {"Content-Type": "text/plain"}},
     415),
    ("patch", "/v1/projects/{project_id}", "/v1/projects/{project}", {"json": {"name": ""}}, 422),
    ("post", "/v1/projects/{project_id}/drafts", "/v1/projects/{project}/drafts",
     {"content": b'{"prompt": "' + b"x" * (2 << 20) + b'"}', "headers": JSON}, 413),
    ("post", "/v1/assets/{asset_id}/promote", f"/v1/assets/{MISSING_ASSET}/promote", {"json": {"prompt": "x"}}, 404),
    ("post", "/v1/assets/{asset_id}/polish", f"/v1/assets/{MISSING_ASSET}/polish", {"json": {}}, 404),
    ("get", "/v1/assets/{asset_id}/content", f"/v1/assets/{MISSING_ASSET}/content", {}, 404),
    ("get", "/v1/projects/{project_id}/ledger", "/v1/projects/{project}/ledger", {"params": {"cursor": "x"}}, 422),
    ("post", "/v1/projects/{project_id}/grants", "/v1/projects/{project}/grants",
     {"json": {"amount": -1}}, 422),
    ("get", "/v1/spend", "/v1/spend", {"params": {"to": "0.5"}}, 422),
    ("get", "/v1/policies/{name}", "/v1/policies/no-such-policy", {}, 404),
    ("post", "/v1/route/explain", "/v1/route/explain", {"json": {"stage": "bridge"}}, 422),
    # A page of a foreign origin (CrossSiteGuard) on every route that changes something.
    ("post", "/v1/projects/{project_id}/drafts", "/v1/projects/{project}/drafts",
     {"json": {"prompt": "x"}, "headers": {"Origin": "https://evil.example"}}, 403),
    ("post", "/v1/jobs/{job_id}/cancel", f"/v1/jobs/{MISSING_JOB}/cancel",
     {"headers": {"Origin": "https://evil.example"}}, 403),
    ("post", "/v1/route/explain", "/v1/route/explain", {"json": {}, "headers": {"Origin": "https://evil.example"}},
     403),
    ("post", "/v1/policies/reload", "/v1/policies/reload", {"headers": {"Origin": "https://evil.example"}}, 403),
    # A GET's 422 is its query parameters'.
    ("get", "/v1/projects", "/v1/projects", {"params": {"limit": 0}}, 422),
    ("get", "/v1/jobs/{job_id}/preview", f"/v1/jobs/{MISSING_JOB}/preview", {"params": {"step": -1}}, 422),
    ("get", "/v1/policies", "/v1/policies", {"params": {"cursor": "../x"}}, 422),
    ("get", "/v1/projects/{project_id}/keys", "/v1/projects/{project}/keys", {"params": {"lmit": 5}}, 422),
    # The event stream reads `lastEventId` too: given twice, it is refused as any route's parameter is.
    ("get", "/v1/jobs/{job_id}/events", f"/v1/jobs/{MISSING_JOB}/events?lastEventId=a&lastEventId=b", {}, 422),
    # Project keys need an admin key, which this service lacks.
    ("post", "/v1/projects/{project_id}/keys", "/v1/projects/{project}/keys", {"json": {"name": "k"}}, 409),
]


@pytest.mark.parametrize(("method", "route", "url", "options", "status"), CASES,
                         ids=[f"{c[0]} {c[1]} {c[4]}" for c in CASES])
def test_answered_errors_are_documented(shared_server: httpx.Client, spec: dict[str, Any], project: str,
                                        method: str, route: str, url: str, options: dict[str, Any],
                                        status: int) -> None:
    response = shared_server.request(method.upper(), url.format(project=project), **options)
    assert_error(response, status, CODES[status])
    documented = spec["paths"][route][method]["responses"]
    assert str(status) in documented, sorted(documented)


# -- schemas say what validation enforces, in JSON Schema's own words ----------------------------

PYDANTIC_LIMITS = {"ge", "le", "gt", "lt", "multiple_of"}  # pydantic's names; JSON Schema reads none of them


def schema_objects(schema: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in `schema` (a property map's keys are names, not keywords)."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            yield from schema_objects(item, f"{where}[{i}]")
    elif isinstance(schema, dict):
        yield where, schema
        for key, value in schema.items():
            if key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
                for name, item in value.items():
                    yield from schema_objects(item, f"{where}.{key}.{name}")
            elif key not in ("default", "examples", "example", "const", "enum"):
                yield from schema_objects(value, f"{where}.{key}")


def prop(spec: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    """A property's schema; for an optional one, the schema of its non-null form."""
    schema: dict[str, Any] = spec["components"]["schemas"][model]["properties"][name]
    return next((s for s in schema.get("anyOf", []) if s.get("type") != "null"), schema)


def test_numeric_limits_are_json_schema_keywords(spec: dict[str, Any]) -> None:
    found = [(where, sorted(PYDANTIC_LIMITS & set(s))) for where, s in schema_objects(spec, "")
             if PYDANTIC_LIMITS & set(s)]
    assert found == []
    expected: list[tuple[str, str, dict[str, float]]] = [
        ("DraftCreate", "n", {"minimum": 1, "maximum": 16}),
        ("DraftCreate", "seed", {"minimum": 0, "maximum": 2**32 - 1}),
        ("DraftCreate", "steps", {"minimum": 1, "maximum": 150}),
        ("DraftCreate", "guidance_scale", {"minimum": 0, "maximum": 30}),
        ("PromoteCreate", "strength", {"minimum": 0.01, "maximum": 1}),
        ("PromoteCreate", "max_credits", {"minimum": 0, "maximum": 10**9}),
        ("PolishCreate", "scale", {"exclusiveMinimum": 0, "maximum": 8}),
        ("PolishCreate", "creativity", {"minimum": 0.01, "maximum": 1}),
        ("Budget", "limit", {"minimum": 0, "maximum": 10**9}),
        ("GrantCreate", "amount", {"exclusiveMinimum": 0, "maximum": 10**9}),
        ("Reconcile", "charged", {"minimum": 0, "maximum": 10**9}),
    ]
    expected += [(model, side, {"minimum": 8, "maximum": 8192, "multipleOf": 8})
                 for model in ("DraftCreate", "PromoteCreate", "PolishCreate") for side in ("width", "height")]
    for model, name, limits in expected:
        schema = prop(spec, model, name)
        assert {k: schema.get(k) for k in limits} == limits, (model, name, schema)


BODIES: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "DraftCreate": (DraftCreate, {"prompt": "x"}), "PromoteCreate": (PromoteCreate, {}),
    "PolishCreate": (PolishCreate, {}),
}


@pytest.mark.parametrize("model", sorted(BODIES))
@pytest.mark.parametrize("side", ["width", "height"])
def test_size_bounds_are_the_ones_validation_enforces(spec: dict[str, Any], model: str, side: str) -> None:
    schema = prop(spec, model, side)
    low, high, step = schema["minimum"], schema["maximum"], schema["multipleOf"]
    cls, body = BODIES[model]
    for accepted in (low, low + step, high - step, high):
        assert getattr(cls.model_validate({**body, side: int(accepted)}), side) == accepted
    for refused in (low - step, low - 1, low + 1, high - 1, high + 1, high + step):
        with pytest.raises(ValidationError) as info:
            cls.model_validate({**body, side: int(refused)})
        assert [e["loc"] for e in info.value.errors()] == [(side,)], refused
    # The engine that runs the job may take less, and the description says so.
    assert "engine" in schema["description"] and "/v1/engines" in schema["description"]


def test_the_server_refuses_sizes_outside_the_documented_bounds(shared_server: httpx.Client, spec: dict[str, Any],
                                                                project: str) -> None:
    """Against the service itself (route/explain: nothing runs): just outside the bounds is a
    validation error on the field; at the bounds any refusal is an engine's, not validation's."""
    schema = prop(spec, "DraftCreate", "width")
    low, high, step = int(schema["minimum"]), int(schema["maximum"]), int(schema["multipleOf"])

    def explain(width: int) -> httpx.Response:
        return shared_server.post("/v1/route/explain", json={"stage": "ideation", "project_id": project,
                                                              "prompt": "x", "width": width, "height": 64})

    for outside in (low - step, high + step):
        error = assert_error(explain(outside), 422, "invalid_request")
        assert [e["loc"] for e in error["details"]["errors"]] == [["body", "width"]], error
    for bound in (low, high):
        response = explain(bound)
        details = response.json().get("error", {}).get("details", {}) if response.status_code != 200 else {}
        # Not the schema's refusal: at most an engine's, found by routing (which names its candidates).
        assert response.status_code == 200 or "candidates" in details, response.text


# -- media types: what each route really answers ------------------------------------------------

# route -> its 200's media types, each with whether it carries a schema (the PNGs' says binary,
# without which generated clients drop the image: openapi-python-client omits the response)
MEDIA: list[tuple[str, dict[str, bool]]] = [
    ("/v1/assets/{asset_id}/content", {"image/png": True}),
    ("/v1/jobs/{job_id}/preview", {"image/png": True}),
    ("/v1/spend", {"application/json": True, "text/csv": True}),
]


@pytest.mark.parametrize(("route", "media"), MEDIA, ids=[m[0] for m in MEDIA])
def test_success_lists_only_the_media_types_answered(spec: dict[str, Any], route: str,
                                                     media: dict[str, bool]) -> None:
    content = spec["paths"][route]["get"]["responses"]["200"]["content"]
    assert {name: bool(entry.get("schema")) for name, entry in content.items()} == media
    if "image/png" in content:
        assert content["image/png"]["schema"] == {"type": "string", "format": "binary"}


def test_what_clients_generate_from_is_what_the_server_holds_to(spec: dict[str, Any]) -> None:
    # The Idempotency-Key's bound was the header's latin-1 bytes (1020): a 256-character key passed a
    # generated client's check and met a 422.
    drafts = spec["paths"]["/v1/projects/{project_id}/drafts"]["post"]
    [key] = [p for p in drafts["parameters"] if p["name"] == "Idempotency-Key"]
    assert key["schema"]["maxLength"] == 255 and "maxLength" not in key["schema"]["anyOf"][0]
    # A project's budget as answered (both fields always there), not the request's model with its defaults.
    budget = spec["components"]["schemas"][
        spec["components"]["schemas"]["ProjectPublic"]["properties"]["budget"]["$ref"].rsplit("/", 1)[1]]
    assert sorted(budget["required"]) == ["limit", "period"] and "default" not in budget["properties"]["period"]
    for path in ("/healthz", "/metrics"):
        assert spec["paths"][path]["get"]["security"] == []  # no key, even on a service with one


def test_no_success_answer_is_documented_as_json_of_any_shape(spec: dict[str, Any]) -> None:
    """`application/json` with an empty schema is FastAPI's default for a route that returns a
    `Response` itself: it says nothing, and for a PNG or CSV route it is wrong."""
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status != "default" and int(status) < 400 and "application/json" in response.get("content", {}):
                    assert response["content"]["application/json"].get("schema"), (method, path, status)


def conforms(value: Any, schema: dict[str, Any], spec: dict[str, Any], where: str = "") -> None:
    """`value` has the shape `schema` documents (the keywords FastAPI's response schemas use)."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "anyOf" in schema:
        failures = []
        for option in schema["anyOf"]:
            try:
                conforms(value, option, spec, where)
                return
            except AssertionError as exc:
                failures.append(str(exc))
        raise AssertionError(f"{where}: {value!r} matches no option: {failures}")
    kind = schema.get("type")
    types: dict[str, type | tuple[type, ...]] = {
        "object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
        "null": type(None)}
    if kind is not None:
        assert isinstance(value, types[kind]) and not (kind in ("integer", "number") and isinstance(value, bool)), \
            (where, value, kind)
    if "enum" in schema:
        assert value in schema["enum"], (where, value)
    if kind == "object" and "properties" in schema:
        assert set(value) == set(schema["properties"]), (where, sorted(value), sorted(schema["properties"]))
        for name, item in value.items():
            conforms(item, schema["properties"][name], spec, f"{where}.{name}")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            conforms(item, schema["items"], spec, f"{where}[{i}]")


@pytest.mark.parametrize("group_by", ["day", "engine", "stage", "project"])
def test_spend_answers_match_their_documented_schemas(shared_server: httpx.Client, spec: dict[str, Any],
                                                      project: str, group_by: str) -> None:
    content = spec["paths"]["/v1/spend"]["get"]["responses"]["200"]["content"]
    assert content["application/json"]["schema"].get("$ref"), content  # the report's own schema
    params = {"group_by": group_by, "from": "2020-01-01T00:00:00Z", "to": "2999-01-01T00:00:00Z"}
    answer = shared_server.get("/v1/spend", params=params)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    conforms(answer.json(), content["application/json"]["schema"], spec)
    csv = shared_server.get("/v1/spend", params={**params, "format": "csv"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    conforms(csv.text, content["text/csv"]["schema"], spec)


def test_every_json_answer_of_the_api_has_a_schema(spec: dict[str, Any]) -> None:
    # An untyped object tells a client generator nothing: each 2xx JSON answer names its fields.
    untyped = []
    for path, item in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                typed = "$ref" in (schema or {}) or "$ref" in (schema or {}).get("items", {})
                if status.startswith("2") and schema is not None and not typed:
                    untyped.append(f"{method.upper()} {path} {status}")
    assert untyped == []


@pytest.mark.parametrize("field", ["name", "policy"])
def test_a_field_a_patch_cannot_null_is_not_documented_as_nullable(shared_server: httpx.Client, spec: dict[str, Any],
                                                                   project: str, field: str) -> None:
    schema = spec["components"]["schemas"]["ProjectUpdate"]["properties"][field]
    assert schema["type"] == "string" and "anyOf" not in schema and "default" not in schema, schema
    response = shared_server.patch(f"/v1/projects/{project}", json={field: None})
    assert response.status_code == 422 and "cannot be removed" in response.json()["error"]["message"]
    budget = spec["components"]["schemas"]["ProjectUpdate"]["properties"]["budget"]
    assert {"type": "null"} in budget["anyOf"]  # null removes the budget: that one is documented


def test_a_patch_s_budget_offers_no_default_a_generated_client_would_write_out(
        shared_server: httpx.Client, spec: dict[str, Any]) -> None:
    # `period` documented with its default `none`: a generated client changing the limit sent
    # `"period": "none"` too, and a monthly budget became an all-time one.
    ref = next(o["$ref"] for o in spec["components"]["schemas"]["ProjectUpdate"]["properties"]["budget"]["anyOf"]
               if "$ref" in o)
    budget = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert "default" not in budget["limit"] and "default" not in budget["period"], budget
    made = shared_server.post("/v1/projects", json={"name": "monthly", "budget": {"limit": 50, "period": "month"}})
    patched = shared_server.patch(f"/v1/projects/{made.json()['id']}", json={"budget": {"limit": 20}})
    assert patched.json()["budget"] == {"limit": 20.0, "period": "month"}
    # Creating one still offers its defaults (no limit, one window for all time).
    created = spec["components"]["schemas"]["Budget"]["properties"]
    assert created["period"]["default"] == "none"


def test_a_polish_body_with_its_default_scale_written_out_takes_a_size(
        shared_server: httpx.Client, spec: dict[str, Any], project: str) -> None:
    # The schema's (and API.md's) default `"scale": 2` written beside width/height was refused
    # as both given: every sized polish of a generated client was a 422.
    assert spec["components"]["schemas"]["PolishCreate"]["properties"]["scale"]["default"] == 2.0
    source = run_draft(shared_server, project)["assets"][0]
    sized = shared_server.post(f"/v1/assets/{source}/polish", json={"scale": 2, "width": 128, "height": 128})
    assert sized.status_code == 202, sized.text
    assert (sized.json()["params"]["width"], sized.json()["params"]["height"]) == (128, 128)
    assert sized.json()["params"]["scale"] is None
    explained = shared_server.post("/v1/route/explain", json={
        "project_id": project, "stage": "polish", "source_asset_id": source,
        "scale": 2.0, "width": 128})
    assert explained.status_code == 200, explained.text


def test_explain_documents_each_stage_s_own_body(shared_server: httpx.Client, spec: dict[str, Any],
                                                 project: str) -> None:
    # Once documented as three fields and "anything else": Swagger's example for it was refused.
    schemas = spec["components"]["schemas"]
    explain = schemas["ExplainRequest"]
    assert explain["discriminator"]["propertyName"] == "stage"
    forms = {stage: schemas[ref.rsplit("/", 1)[1]] for stage, ref in explain["discriminator"]["mapping"].items()}
    for stage, route_body in (("ideation", "DraftCreate"), ("bridge", "PromoteCreate"), ("polish", "PolishCreate")):
        form = forms[stage]
        assert set(schemas[route_body]["properties"]) < set(form["properties"]), stage
        assert form["additionalProperties"] is False and "stage" in form["required"]
    assert "source_asset_id" in forms["bridge"]["required"] and "source_asset_id" in forms["polish"]["required"]
    body = {name: "x" for name in forms["ideation"]["required"] if name != "stage"}
    response = shared_server.post("/v1/route/explain", json={**body, "stage": "ideation", "project_id": project,
                                                             "width": 64, "height": 64})
    assert response.status_code == 200, response.text


def test_every_operation_says_what_it_does(spec: dict[str, Any]) -> None:
    """/docs is where a new client reads the API: an operation with only its generated summary
    ("Get Content") tells nothing of caching, money or events."""
    bare = [f"{method.upper()} {path}" for path, operations in spec["paths"].items()
            for method, operation in operations.items() if not operation.get("description")]
    assert bare == []


def test_the_headers_clients_act_on_are_documented(shared_server: httpx.Client, spec: dict[str, Any],
                                                   project: str) -> None:
    drafts = spec["paths"]["/v1/projects/{project_id}/drafts"]["post"]["responses"]["202"]["headers"]
    content = spec["paths"]["/v1/assets/{asset_id}/content"]["get"]["responses"]["200"]["headers"]
    assert {"Location", "Idempotent-Replayed"} <= drafts.keys() and {"ETag", "Content-Disposition"} <= content.keys()
    answered = shared_server.post(f"/v1/projects/{project}/drafts",
                                  json={"prompt": "x", "n": 1, "width": 64, "height": 64, "steps": 1})
    assert answered.headers["location"] == f"/v1/jobs/{answered.json()['id']}"


def test_operation_ids_are_the_routes_names(spec: dict[str, Any]) -> None:
    """What a generated client names its methods: short, unique, and not a copy of the path."""
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) >= 30
    assert {"create_drafts", "promote", "get_job", "job_events", "get_content"} <= set(ids), sorted(ids)
    assert all("__" not in i and not i.endswith(("_get", "_post")) for i in ids), sorted(ids)


# Headers a client acts on: where a new resource is, whether an answer is a replay, when to retry,
# how to authenticate, how to cache.
TOLD = ("location", "idempotent-replayed", "retry-after", "www-authenticate", "etag")


def test_headers_a_client_acts_on_are_declared_where_they_are_sent(
        shared_server: httpx.Client, spec: dict[str, Any], project: str) -> None:
    sent = [
        ("post", "/v1/projects", shared_server.post("/v1/projects", json={"name": "h"},
                                                    headers={"Idempotency-Key": "h-1"})),
        ("post", "/v1/projects", shared_server.post("/v1/projects", json={"name": "h"},
                                                    headers={"Idempotency-Key": "h-1"})),
        ("post", "/v1/projects/{project_id}/grants",
         shared_server.post(f"/v1/projects/{project}/grants", json={"amount": 1}, headers={"Idempotency-Key": "g"})),
        ("post", "/v1/projects/{project_id}/drafts",
         shared_server.post(f"/v1/projects/{project}/drafts", json={"prompt": "x", "n": 1, "width": 64,
                                                                    "height": 64, "steps": 1})),
    ]
    for method, path, response in sent:
        declared = spec["paths"][path][method]["responses"][str(response.status_code)].get("headers", {})
        for name in TOLD:
            if name in response.headers:
                assert name in {h.lower() for h in declared}, (method, path, response.status_code, name)
    assert any("idempotent-replayed" in r.headers for _, _, r in sent)  # the replay was among them


def test_every_401_429_and_503_says_what_it_carries(spec: dict[str, Any]) -> None:
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, header in (("401", "WWW-Authenticate"), ("429", "Retry-After"), ("503", "Retry-After")):
                if status in operation["responses"]:
                    assert header in operation["responses"][status].get("headers", {}), (method, path, status)
    content = spec["paths"]["/v1/assets/{asset_id}/content"]["get"]
    assert {"if-none-match", "range", "if-range"} <= {p["name"].lower() for p in content["parameters"]}
    assert "ETag" in content["responses"]["304"]["headers"]
    # A range's answer says which bytes it holds, and a refused one how many the image has.
    assert {"Content-Range", "ETag", "Accept-Ranges"} <= content["responses"]["206"]["headers"].keys()
    assert content["responses"]["206"]["content"]["image/png"]["schema"]["format"] == "binary"
    assert "Content-Range" in content["responses"]["416"]["headers"]
    assert content["responses"]["416"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "Accept-Ranges" in content["responses"]["200"]["headers"]


def test_a_job_s_routing_and_attempts_have_shapes(spec: dict[str, Any]) -> None:
    """Typed, so a generated client reads `job.routing.candidates[0].skipped`, not a map of anything."""
    schemas = spec["components"]["schemas"]
    job = schemas["JobPublic"]["properties"]
    assert {"$ref": "#/components/schemas/Routing"} in job["routing"]["anyOf"]
    assert job["attempts"]["items"] == {"$ref": "#/components/schemas/Attempt"}
    assert schemas["Routing"]["properties"]["candidates"]["items"] == {"$ref": "#/components/schemas/RouteCandidate"}
    assert {"engine", "estimate", "skipped"} <= set(schemas["RouteCandidate"]["properties"])
    explained = schemas["RouteExplanation"]["properties"]["routing"]
    assert explained.get("$ref") == "#/components/schemas/Routing" or \
        {"$ref": "#/components/schemas/Routing"} in explained.get("allOf", [])


def test_an_enum_used_in_more_than_one_place_is_one_named_schema(spec: dict[str, Any]) -> None:
    """A generator makes one type per inline enum: `Stage` used in six places made six types."""
    inline: dict[tuple[str, ...], list[str]] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "enum" in node and where.count("/") > 3:  # not a component schema of its own
                inline.setdefault(tuple(node["enum"]), []).append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(spec, "#")
    assert {values: places for values, places in inline.items() if len(places) > 1} == {}
    schemas = spec["components"]["schemas"]
    assert schemas["Stage"]["enum"] == ["ideation", "bridge", "polish"]
    assert schemas["JobPublic"]["properties"]["status"]["$ref"] == "#/components/schemas/JobStatus"


def test_drafts_document_the_402_a_paid_draft_engine_can_answer(spec: dict[str, Any]) -> None:
    """Drafts share the hold with promote and polish: a policy sending them to a paid plugin engine
    answers 402, which the document left to `default`."""
    answers = spec["paths"]["/v1/projects/{project_id}/drafts"]["post"]["responses"]
    assert answers["402"]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}
    assert "paid engine" in answers["402"]["description"]


# -- each route lists the errors it can answer, each told as it is on that route -------------------

# What every /v1 route can answer: a URL with a NUL (or a rebound Host), no valid key, a database
# that does not answer (or a stopping server).
ANY = {400, 401, 503}
BODY = ANY | {413, 415, 422}  # and what a route that reads a JSON body can
# operation -> the error statuses it answers (besides `default`): no more, no fewer. A route
# changed to answer another must say so here and in its decorator.
ERRORS: dict[tuple[str, str], set[int]] = {
    ("get", "/healthz"): {400},
    ("get", "/readyz"): {400, 503},
    ("get", "/metrics"): {400, 503},
    ("get", "/v1/projects"): ANY | {422},
    ("post", "/v1/projects"): BODY | {403, 409},
    ("get", "/v1/projects/{project_id}"): ANY | {404},
    ("patch", "/v1/projects/{project_id}"): BODY | {403, 404},
    ("get", "/v1/projects/{project_id}/assets"): ANY | {404, 422},
    ("post", "/v1/projects/{project_id}/drafts"): BODY | {402, 403, 404, 409, 429, 507},
    ("post", "/v1/assets/{asset_id}/promote"): BODY | {402, 403, 404, 409, 410, 429, 500, 507},
    ("post", "/v1/assets/{asset_id}/polish"): BODY | {402, 403, 404, 409, 410, 429, 500, 507},
    ("get", "/v1/jobs"): ANY | {404, 422},
    ("get", "/v1/jobs/{job_id}"): ANY | {404},
    ("post", "/v1/jobs/{job_id}/cancel"): ANY | {403, 404, 409},
    ("get", "/v1/jobs/{job_id}/preview"): ANY | {404, 422},
    ("get", "/v1/jobs/{job_id}/events"): ANY | {404, 422, 429},
    ("get", "/v1/assets/{asset_id}"): ANY | {404, 410},
    ("delete", "/v1/assets/{asset_id}"): ANY | {403, 404, 409},
    ("get", "/v1/assets/{asset_id}/content"): ANY | {404, 410, 416, 500},
    ("get", "/v1/assets/{asset_id}/lineage"): ANY | {404, 410},
    ("get", "/v1/engines"): ANY,
    ("get", "/v1/projects/{project_id}/budget"): ANY | {404},
    ("get", "/v1/projects/{project_id}/ledger"): ANY | {404, 422},
    ("post", "/v1/projects/{project_id}/grants"): BODY | {403, 404, 409},
    ("post", "/v1/projects/{project_id}/ledger/{entry_id}/reconcile"): BODY | {403, 404, 409},
    ("get", "/v1/spend"): ANY | {404, 422},
    ("get", "/v1/policies"): ANY | {422},
    ("get", "/v1/policies/{name}"): ANY | {404},
    ("post", "/v1/policies/reload"): ANY | {403},
    ("post", "/v1/route/explain"): BODY | {402, 403, 404, 409, 410, 429, 500, 507},
    ("post", "/v1/projects/{project_id}/keys"): BODY | {403, 404, 409},
    ("get", "/v1/projects/{project_id}/keys"): ANY | {403, 404, 422},
    ("get", "/v1/projects/{project_id}/keys/{key_id}"): ANY | {403, 404},
    ("delete", "/v1/projects/{project_id}/keys/{key_id}"): ANY | {403, 404},
    ("get", "/v1/workers"): ANY | {403},
    ("get", "/v1/projects/{project_id}/webhook-deliveries"): ANY | {404, 422},
    ("post", "/v1/webhook-deliveries/{delivery_id}/redeliver"): ANY | {403, 404, 409},
    ("get", "/v1/webhooks/deliveries"): ANY | {403, 404, 422},
}
# The routes that route a request to an engine: the only ones whose 422 or 503 may be `no_route`
# (creating a project: when the default policy is not loaded).
ROUTED = {("post", "/v1/projects/{project_id}/drafts"), ("post", "/v1/assets/{asset_id}/promote"),
          ("post", "/v1/assets/{asset_id}/polish"), ("post", "/v1/route/explain")}
# The codes each status may be sent with.
STATUS_CODES = {400: {"invalid_request"}, 401: {"unauthorized"}, 402: {"budget_exceeded"}, 403: {"forbidden"},
                404: {"not_found"}, 409: {"conflict", "idempotency_conflict", "job_finished", "project_archived",
                                         "delivery_pending", "no_webhook_url"},
                410: {"gone"}, 416: {"invalid_request"},
                413: {"payload_too_large"}, 415: {"invalid_request"}, 422: {"invalid_request", "no_route"},
                429: {"rate_limited", "device_time_exhausted"}, 500: {"content_unavailable", "internal_error"},
                503: {"no_route", "database_unavailable", "storage_full", "server_stopping"},
                507: {"storage_quota_exceeded"}}
ALL_CODES = set().union(*STATUS_CODES.values()) | {"method_not_allowed", "engine_unavailable", "engine_error",
                                                   "content_filtered", "no_image", "timeout", "canceled", "interrupted",
                                                   "error"}


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def told_codes(description: str) -> set[str]:
    """The error codes a sentence names (in backticks)."""
    return set(re.findall(r"`([a-z_]+)`", description)) & ALL_CODES


def test_each_route_lists_exactly_the_errors_it_can_answer(spec: dict[str, Any]) -> None:
    listed = {(method, path): {int(status) for status in operation["responses"] if status[0] in "45"}
              for method, path, operation in operations(spec)}
    assert listed == ERRORS
    assert all("default" in operation["responses"] for _, _, operation in operations(spec))


def test_each_error_is_told_as_it_is_on_its_route(spec: dict[str, Any]) -> None:
    """A body-less GET was told "the body is not valid JSON", "no engine may take the request",
    "no engine is available": every route was given every route's sentences."""
    for method, path, operation in operations(spec):
        where = (method, path)
        answers = {int(status): response["description"] for status, response in operation["responses"].items()
                   if status[0] in "45"}
        for status, description in answers.items():
            assert told_codes(description) <= STATUS_CODES[status], (where, status, description)
        if "requestBody" not in operation:
            assert "JSON" not in answers[400] and "body" not in answers[400], where
            assert "body" not in answers.get(422, ""), where
        else:
            assert "not valid JSON" in answers[400] and "body" in answers[422], where
        if where not in ROUTED:
            assert "no_route" not in answers.get(422, "") and "engine" not in answers.get(422, ""), where
        else:
            assert "no_route" in answers[422] and "no_route" in answers[503], where
        if method == "get" and path.startswith("/v1/"):
            assert told_codes(answers[503]) == {"database_unavailable", "storage_full", "server_stopping"}, where
            if 422 in answers:  # a GET's 422 is its query's
                assert "query parameter" in answers[422], where
        if path.startswith("/v1/") and method in ("post", "patch", "delete"):
            assert "ORCH_CORS_ORIGINS" in answers[403], where  # CrossSiteGuard's, on every route changing something
        if method == "get":
            assert "ORCH_CORS_ORIGINS" not in answers.get(403, ""), where


# -- names: schemas, operations, headers --------------------------------------------------------

def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_schema_names_are_clean_and_stable(spec: dict[str, Any]) -> None:
    """A generator names a type after each schema: `Page_AssetPublic_` was pydantic's name for
    `Page[AssetPublic]`, and it changed with the model's name."""
    schemas = spec["components"]["schemas"]
    assert [name for name in schemas if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", name)] == []
    assert {"AssetPage", "JobPage", "KeyPage", "LedgerEntryPage", "ProjectPage"} <= set(schemas)
    for name in ("AssetPage", "JobPage", "ProjectPage"):
        assert schemas[name]["title"] == name and schemas[name]["required"] == ["items", "next_cursor"]
    ok = spec["paths"]["/v1/projects/{project_id}/assets"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AssetPage"}
    assert schemas["AssetPage"]["properties"]["items"]["items"] == {"$ref": "#/components/schemas/AssetPublic"}
    dangling = {ref for ref in refs(spec) if ref.rsplit("/", 1)[1] not in schemas}
    assert dangling == set()


def test_every_operation_has_a_summary_of_its_own(spec: dict[str, Any]) -> None:
    """Not FastAPI's from the function's name ("Lineage", "Grant", "Explain", "Healthz"): a
    sentence-case phrase of more than one word, one per operation."""
    summaries = [operation.get("summary", "") for _, _, operation in operations(spec)]
    generated = [s for s in summaries if len(s.split()) < 2 or s == s.title()]
    assert generated == [] and len(set(summaries)) == len(summaries)
    ids = {operation["operationId"] for _, _, operation in operations(spec)}
    assert {"get_lineage", "grant_credits", "explain_route"} <= ids


CANONICAL_HEADERS = {"Idempotency-Key", "Last-Event-ID", "If-None-Match", "Range", "If-Range"}


def test_header_parameters_are_named_as_http_writes_them(spec: dict[str, Any]) -> None:
    names = {p["name"] for _, _, operation in operations(spec) for p in operation.get("parameters", [])
             if p["in"] == "header"}
    assert names == CANONICAL_HEADERS
    events = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["parameters"]
    assert "Last-Event-ID" in [p["name"] for p in events]


# -- schemas say what their fields mean ---------------------------------------------------------

DESCRIBED = ["DraftCreate", "PromoteCreate", "PolishCreate", "ProjectCreate", "ProjectUpdate", "Budget",
             "ProjectBudget", "ProjectPublic", "JobPublic", "AssetPublic", "Cost", "Progress", "ErrorBody",
             "ErrorResponse", "AssetPage", "JobPage", "Lineage", "BudgetPublic", "LedgerEntryPublic", "GrantCreate",
             "Reconcile", "SpendReport", "SpendGroup", "SpendSavings", "KeyCreate", "KeyPublic", "EnginePublic"]


@pytest.mark.parametrize("model", DESCRIBED)
def test_main_models_describe_their_fields(spec: dict[str, Any], model: str) -> None:
    schema = spec["components"]["schemas"][model]
    assert schema.get("description"), model
    bare = [name for name, field in schema["properties"].items()
            if not field.get("description") and not any(o.get("description") for o in field.get("anyOf", []))]
    assert bare == []


# FastAPI's own schemas of its default 422, which it adds when a route has no 422 of its own (the
# service documents its errors as ErrorResponse and removes them): their fields are FastAPI's words.
FASTAPI_SCHEMAS = {"HTTPValidationError", "ValidationError"}


def test_every_parameter_and_property_is_described(spec: dict[str, Any]) -> None:
    """/docs shows a parameter or a field without a description as its bare name: `stage`, `pid`,
    `rule_index` told a new client nothing of what they filter, hold or count. The description
    must be the property's own, not only its non-null form's (an optional field's `anyOf`)."""
    bare_parameters = [f"{method.upper()} {path} {p['in']} {p['name']}" for method, path, operation in operations(spec)
                       for p in operation.get("parameters", []) if not str(p.get("description", "")).strip()]
    bare_properties = [f"{model}.{name}" for model, schema in spec["components"]["schemas"].items()
                       if model not in FASTAPI_SCHEMAS
                       for name, field in schema.get("properties", {}).items()
                       if not str(field.get("description", "")).strip()]
    assert bare_parameters == [] and bare_properties == [], (bare_parameters, bare_properties)
    # It looked at them all: every kind of parameter, and the schemas the audit found bare.
    kinds = {p["in"] for _, _, operation in operations(spec) for p in operation.get("parameters", [])}
    assert kinds == {"path", "query", "header"}
    assert {"PolicyReload", "WorkerPublic", "Routing", "Health"} <= spec["components"]["schemas"].keys()


def test_error_codes_are_listed_not_enumerated(spec: dict[str, Any]) -> None:
    """`code` is open: new codes come with new releases (and a job's error has its own), so the
    schema lists them in words, and a generated client does not refuse a code it does not know."""
    code = spec["components"]["schemas"]["ErrorBody"]["properties"]["code"]
    assert "enum" not in code and code["type"] == "string"
    assert [c for c in sorted(ALL_CODES - {"error"}) if f"`{c}`" not in code["description"]] == []


# -- request bodies' examples are requests the routes take ---------------------------------------

def test_request_bodies_have_examples_the_routes_take(make_settings: Callable[..., Settings],
                                                      start_server: Callable[[Settings], httpx.Client]) -> None:
    """/docs's "Try it out" starts from the first example: each one, with real ids in place of the
    made-up ones, is answered 2xx (a reconcile of a missing entry is a 404: the body was taken)."""
    client = start_server(make_settings(admin_key="k"))
    client.headers["Authorization"] = "Bearer k"
    spec: dict[str, Any] = client.get("/openapi.json").json()
    project = create_project(client, "examples")["id"]
    draft = run_draft(client, project, n=1, steps=1)
    asset = draft["assets"][0]
    ids = {"project_id": project, "asset_id": asset, "entry_id": "999999", "job_id": draft["id"]}
    jobs: list[str] = []
    tried = 0
    for method, path, operation in operations(spec):
        if "requestBody" not in operation:
            continue
        examples = operation["requestBody"]["content"]["application/json"].get("examples")
        assert examples, (method, path)
        for name, example in examples.items():
            assert example["summary"] and example["value"] is not None, (method, path, name)
            body = json.loads(json.dumps(example["value"]).replace(EXAMPLE_PROJECT_ID, project)
                              .replace(EXAMPLE_ASSET_ID, asset))
            answer = client.request(method.upper(), path.format(**ids), json=body)
            if path.endswith("/reconcile"):
                assert_error(answer, 404, "not_found")  # of the entry: the body passed validation
            else:
                assert 200 <= answer.status_code < 300, (method, path, name, answer.text)
            if str(answer.json().get("id", "") if answer.content else "").startswith("job_"):
                jobs.append(answer.json()["id"])
            if body == {"archived": True}:  # taken back, for the examples that make jobs
                assert answer.json()["archived_at"] is not None
                client.patch(f"/v1/projects/{project}", json={"archived": False})
            tried += 1
    assert tried >= 15 and len(jobs) >= 4
    for job in jobs:  # the drafts' 512x512 images are not needed
        client.post(f"/v1/jobs/{job}/cancel")

    # The headers named as the document names them are read, and in any case (HTTP's are not cased).
    etag = client.get(f"/v1/assets/{asset}/content").headers["etag"]
    terminal = f"0badc0de-7-end.{job_mark(draft['id'])}"  # another server's terminal event of the job
    for header in ("If-None-Match", "if-none-match"):
        assert client.get(f"/v1/assets/{asset}/content", headers={header: etag}).status_code == 304
    for header in ("Range", "range"):
        assert client.get(f"/v1/assets/{asset}/content", headers={header: "bytes=0-9"}).status_code == 206
    for header in ("If-Range", "if-range"):
        told = client.get(f"/v1/assets/{asset}/content", headers={"Range": "bytes=0-9", header: '"x"'})
        assert told.status_code == 200  # not the image's ETag: the whole image
    for header in ("Last-Event-ID", "last-event-id"):
        assert client.get(f"/v1/jobs/{draft['id']}/events", headers={header: terminal}).status_code == 204


def test_the_docs_pages_need_nothing_from_outside_the_service(shared_server: httpx.Client) -> None:
    """A studio machine with no way out still shows /docs and /redoc: each script, style sheet and
    icon the pages name is one the service answers itself."""
    for page in ("/docs", "/redoc"):
        response = shared_server.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        links = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", response.text)
        assets = [link for link in links if link.endswith((".js", ".css", ".png"))]
        assert assets, f"{page} names no script"
        for link in links:
            assert not link.startswith(("http:", "https:", "//")), f"{page} loads {link} from outside"
        for link in assets:
            answer = shared_server.get(link)
            assert answer.status_code == 200, link
            assert len(answer.content) > 1000, link
        assert "/openapi.json" in links
    # Swagger UI's own default sends the document's URL to validator.swagger.io, as an image, from
    # any page not opened as localhost: the service's internal address, to the world.
    assert re.search(r'"validatorUrl":\s*null', shared_server.get("/docs").text)


def test_the_document_is_serialized_once_not_at_each_request(make_settings: SettingsFactory,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """/openapi.json needs no key, even with ORCH_ADMIN_KEY set, and FastAPI's route turned the whole
    document (about 190 KB of JSON) into text on the event loop at every request: 16 keyless clients
    asking for it in a loop held every other request of the service (0.03 s each on an idle service)
    for 0.4 s. It is served from the text made the first time, byte for byte what was served before."""
    documents: list[int] = []
    render = JSONResponse.render

    def counted(self: JSONResponse, content: Any) -> bytes:
        if isinstance(content, dict) and "paths" in content:
            documents.append(id(content))
        return render(self, content)

    monkeypatch.setattr(JSONResponse, "render", counted)
    with TestClient(create_app(make_settings(run_jobs=False, admin_key="k" * 24))) as client:
        first = client.get("/openapi.json")
        assert first.status_code == 200 and first.headers["content-type"] == "application/json"
        assert first.content == JSONResponse(client.app.openapi()).body  # type: ignore[attr-defined]
        documents.clear()
        for _ in range(5):
            again = client.get("/openapi.json")
            assert again.status_code == 200 and again.content == first.content
        head = client.head("/openapi.json")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(first.content))
    assert documents == []


def test_every_route_reading_a_query_documents_its_refusal_of_another_list_s_filter(spec: dict[str, Any]) -> None:
    # `GET /v1/jobs/{id}/events?status=succeeded` is a 422 (`status` is a filter of /v1/jobs, not of
    # the stream), and its 422 said only that `lastEventId` given twice or misspelt is refused.
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if not any(param["in"] == "query" for param in operation.get("parameters", ())):
                continue
            told = operation["responses"]["422"]["description"]
            assert "a filter of another list" in told, (method, path, told)
