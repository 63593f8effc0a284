"""The OpenAPI document tells clients the truth about errors: every error status a route answers is
listed for that route, in the one error shape (never FastAPI's default `{"detail": [...]}`)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api import assert_error, create_project

ERROR_REF = "#/components/schemas/ErrorResponse"
MISSING_JOB, MISSING_ASSET = "job_0000000000zzzzzzzzzzzzzz", "ast_0000000000zzzzzzzzzzzzzz"
JSON = {"Content-Type": "application/json"}
CODES = {400: "invalid_request", 404: "not_found", 413: "payload_too_large", 415: "invalid_request",
         422: "invalid_request"}


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
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, (method, path)
                    checked += 1
            if path.startswith("/v1/"):
                assert "401" in operation["responses"], (method, path)
    assert checked > 40


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
     {"content": b'{"amount": NaN}', "headers": JSON}, 422),
    ("get", "/v1/spend", "/v1/spend", {"params": {"to": "0.5"}}, 422),
    ("get", "/v1/policies/{name}", "/v1/policies/no-such-policy", {}, 404),
    ("post", "/v1/route/explain", "/v1/route/explain", {"json": {"stage": "bridge"}}, 422),
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
