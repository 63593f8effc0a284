"""Bad input: every refusal is a 4xx in the documented error shape, and writes nothing."""

from __future__ import annotations

import gzip
import importlib
import logging
import pkgutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import Field

from orchestrator import api
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.app import create_app
from orchestrator.errors import NotFound
from orchestrator.schemas import Strict
from orchestrator.settings import Settings
from tests.api import assert_error, check_nul_refused, create_project, job_count, run_draft, wait_for_job
from tests.conftest import SettingsFactory

if TYPE_CHECKING:
    import httpx2

MISSING = {"prj": "prj_0000000000zzzzzzzzzzzzzz", "job": "job_0000000000zzzzzzzzzzzzzz",
           "ast": "ast_0000000000zzzzzzzzzzzzzz"}
VALID = {"prompt": "a lighthouse", "n": 1, "width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def project(shared_server: httpx.Client) -> str:
    project_id: str = create_project(shared_server, "errors")["id"]
    return project_id


@pytest.fixture(scope="module")
def finished_job(shared_server: httpx.Client, project: str) -> dict[str, Any]:
    return run_draft(shared_server, project)


def post_drafts(client: httpx.Client | TestClient, project: str, body: Any) -> httpx.Response | httpx2.Response:
    return client.post(f"/v1/projects/{project}/drafts", json=body)


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n\t "}, "prompt"),
    ({"prompt": "\u200b"}, "prompt"),  # zero-width space: nothing to see, as empty as spaces
    ({"prompt": "\ufeff\u2060\u200d"}, "prompt"),
    ({"prompt": "\u3000\u00a0\u0001"}, "prompt"),
    ({"negative_prompt": "no prompt at all"}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "n": "four"}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "width": 100}, "width"),
    ({"prompt": "x", "height": 0}, "height"),
    ({"prompt": "x", "width": "wide"}, "width"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**32}, "seed"),
    # Image i uses seed + i: these would need seeds no request may ask for again.
    ({"prompt": "x", "seed": 2**32 - 1, "n": 2}, "seed"),
    ({"prompt": "x", "seed": 2**32 - 2}, "seed"),  # n defaults to 4
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": False}, "guidance_scale"),  # not read as 0.0
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "tags": {"k": 1}}, "tags"),
    ({"prompt": "x", "tags": {f"k{i}": "v" for i in range(65)}}, "tags"),  # 64 at most
    ({"prompt": "x", "colour": "red"}, "colour"),
    # JSON types are kept: a number in a string, or "yes" for a boolean, is a wrong type.
    ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "seed": "42"}, "seed"),
    ({"prompt": "x", "guidance_scale": "1.5"}, "guidance_scale"),
    ({"prompt": "x", "cache": "yes"}, "cache"),
    ({"prompt": "x", "cache": 1}, "cache"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_draft_body(shared_server: httpx.Client, project: str, body: dict[str, Any], field: str) -> None:
    before = job_count(shared_server)
    error = assert_error(post_drafts(shared_server, project, body), 422, "invalid_request")
    locations = [e["loc"] for e in error["details"]["errors"]]
    assert any(field in loc for loc in locations), locations
    assert field in error["message"]
    assert job_count(shared_server) == before


def test_a_bad_tag_key_is_named_as_a_key(shared_server: httpx.Client, project: str) -> None:
    error = assert_error(post_drafts(shared_server, project, {"prompt": "x", "tags": {"": "v"}}), 422,
                         "invalid_request")
    assert error["message"] == "tags key '': String should have at least 1 character"
    # Zero-width only: a key no dashboard could show or a policy rule match as typed.
    error = assert_error(post_drafts(shared_server, project, {"prompt": "x", "tags": {"\u200b": "v"}}), 422,
                         "invalid_request")
    assert error["message"] == "tags key '\\u200b': has no visible text"


def test_a_draft_whose_last_seed_is_the_largest_is_taken(shared_server: httpx.Client, project: str) -> None:
    body = {"stage": "ideation", "project_id": project, "prompt": "x", "n": 2, "seed": 2**32 - 2}
    response = shared_server.post("/v1/route/explain", json=body)
    assert response.status_code == 200, response.text
    error = assert_error(shared_server.post("/v1/route/explain", json={**body, "seed": 2**32 - 1}),
                         422, "invalid_request")
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", "seed"]]
    assert error["message"].startswith("seed: with n=2, the images use seeds 4294967295 to 4294967296")
    assert "at most 4294967294" in error["message"]


def test_a_drawn_seed_leaves_room_for_every_image(shared_server: httpx.Client, project: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a seed one is drawn: even the largest draw keeps the last image's seed a seed."""
    monkeypatch.setattr("orchestrator.jobs.secrets.randbelow", lambda bound: bound - 1)
    response = post_drafts(shared_server, project, {"prompt": "x", "n": 16, "width": 64, "height": 64, "steps": 1})
    assert response.status_code == 202, response.text
    assert response.json()["params"]["seed"] + 15 == 2**32 - 1
    # Left running, it made the module's later listings change between two reads.
    assert wait_for_job(shared_server, response.json()["id"])["status"] == "succeeded"


@pytest.mark.parametrize(("body", "told"), [
    ([{"prompt": "x"}], "the request body must be a JSON object"),  # not pydantic's "... to extract fields from"
    ("prompt", "the request body must be a JSON object"),
    (3, "the request body must be a JSON object"),
    (None, "this request needs a JSON body"),  # httpx sends no body for json=None
])
def test_body_not_an_object(shared_server: httpx.Client, project: str, body: Any, told: str) -> None:
    before = job_count(shared_server)
    error = assert_error(post_drafts(shared_server, project, body), 422, "invalid_request")
    assert error["message"] == told
    null = shared_server.post(f"/v1/projects/{project}/drafts", content=b"null",
                              headers={"Content-Type": "application/json"})
    assert assert_error(null, 422, "invalid_request")["message"] == "the request body must be a JSON object"
    assert job_count(shared_server) == before


@pytest.mark.parametrize("raw", [b'{"prompt": ', b'{"prompt": "x",}', b"{'prompt': 'x'}", b"\xff\xfe",
                                 b'{"prompt": "\xff"}'])
def test_malformed_json(shared_server: httpx.Client, project: str, raw: bytes) -> None:
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=raw,
                                  headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "invalid_request")
    assert error["message"].startswith("the request body is not valid JSON")
    # Placed at the body, as every body error is (FastAPI placed a syntax error at "body", "<offset>").
    assert [e["loc"] for e in error["details"]["errors"]] == [["body"]], error
    assert job_count(shared_server) == before


def test_a_json_syntax_error_says_what_and_where(shared_server: httpx.Client, project: str) -> None:
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=b'{"prompt": "x",}',
                                  headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "invalid_request")
    assert error["message"] == ("the request body is not valid JSON: Expecting property name enclosed in double "
                                "quotes at character 16")  # the "}", counted from 1


@pytest.mark.parametrize(("raw", "told"), [
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", "a number with too many digits"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    # Parsed, then too deep for the text check after it: a 500 (the band moves with the stack).
    *[(b'{"prompt": "x", "zz": ' + b"[" * depth + b"1" + b"]" * depth + b"}", "nested too deeply")
      for depth in range(940, 970, 3)],
    # 33 levels, the object and 32 arrays: the innermost empty one passed, as only the values
    # inside a container were checked.
    (b'{"prompt": "x", "zz": ' + b"[" * 32 + b"]" * 32 + b"}", "nested too deeply"),
    (b"[" * 33 + b"]" * 33, "nested too deeply"),
    # Read and checked on the event loop: 60,000 unknown keys held every request for seconds.
    (b'{"prompt": "x", ' + b", ".join(b'"k%d": 1' % i for i in range(60_000)) + b"}",
     "an object of 60001 members"),
    (b'{"prompt": "x", "zz": [' + b",".join([b"1"] * 20_000) + b"]}", "more than 10000 values"),
])
def test_json_too_large_to_read_says_why(shared_server: httpx.Client, project: str, raw: bytes, told: str) -> None:
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=raw,
                                  headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_request")
    assert told in response.json()["error"]["message"]
    assert job_count(shared_server) == before


@pytest.mark.parametrize("zz", [b"[" * 31 + b"]" * 31, b"[" * 31 + b"1" + b"]" * 31, b"[" * 30 + b"{}" + b"]" * 30])
def test_json_nested_32_levels_is_read(shared_server: httpx.Client, project: str, zz: bytes) -> None:
    # 32 levels, the body's object included: read, then refused for the unknown field, not its depth.
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=b'{"prompt": "x", "zz": ' + zz + b"}",
                                  headers={"Content-Type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert error["message"].startswith("unknown field 'zz'"), error


@pytest.mark.parametrize(("raw", "told"), [
    # A repeated key: the first or the last may be the one a proxy, a log or another parser reads.
    (b'{"prompt": "x", "n": 1, "n": 2000}', "the request body gives the key 'n' twice"),
    (b'{"prompt": "x", "tags": {"a": "1", "a": "2"}}', "the request body gives the key 'a' twice"),
    (b'{"prompt": "x", "guidance_scale": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "x", "guidance_scale": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"prompt": "x", "guidance_scale": 1e400}', "beyond what a 64-bit float holds"),
    # Read as 0 (a budget's limit of 1e-400 became 0, where 0.0001 was refused).
    (b'{"prompt": "x", "guidance_scale": 1e-400}', "too close to 0 for a 64-bit float"),
    (b'{"prompt": "x", "guidance_scale": 0.5E-999}', "too close to 0 for a 64-bit float"),
    # UTF-16, which `json.loads` detects and reads: JSON is UTF-8.
    ('{"prompt": "x"}'.encode("utf-16"), "JSON is sent as UTF-8"),
    ('{"prompt": "x"}'.encode("utf-32-le"), "not valid JSON"),
])
def test_json_is_read_strictly(shared_server: httpx.Client, project: str, raw: bytes, told: str) -> None:
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=raw,
                                  headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "invalid_request")
    message = error["message"]
    assert message.startswith("the request body ") and told in message, message
    [listed] = error["details"]["errors"]
    assert (listed["loc"], listed["type"]) == (["body"], "json_invalid") and listed["msg"] in message
    assert job_count(shared_server) == before


DRAFT_FIELDS = ("(fields here: prompt, negative_prompt, n, seed, width, height, steps, guidance_scale, engine, "
                "tags, cache, webhook_url)")


@pytest.mark.parametrize(("path", "body", "told"), [
    # The typo leads, not the field it left missing, and says what was meant.
    ("/v1/projects/{project}/drafts", {"promt": "a lighthouse"}, "unknown field 'promt'; did you mean 'prompt'?"),
    ("/v1/projects", {"name": "studio", "budjet": {"limit": 5}}, "unknown field 'budjet'; did you mean 'budget'?"),
    ("/v1/projects", {"name": "studio", "budget": {"limt": 5}},
     "unknown field 'budget.limt'; did you mean 'limit'?"),
    # Nothing close: the names it takes there (pydantic's "Extra inputs are not permitted" named none).
    ("/v1/projects/{project}/drafts", {"prompt": "x", "count": 4}, "unknown field 'count' " + DRAFT_FIELDS),
    ("/v1/projects", {"name": "studio", "budget": {"dollars": 5}},
     "unknown field 'budget.dollars' (fields here: limit, period)"),
    # The unknown field with a name meant leads, and a name already given is not the one meant.
    ("/v1/projects/{project}/drafts", {"zzz": 1, "promt": "x"}, "unknown field 'promt'; did you mean 'prompt'?"),
    ("/v1/projects/{project}/drafts", {"prompt": "x", "promt": "y"}, "unknown field 'promt' " + DRAFT_FIELDS),
    # Explain checks the stage's own body: its names are the ones meant.
    ("/v1/route/explain", {"stage": "ideation", "project_id": "{project}", "promt": "x"},
     "unknown field 'promt'; did you mean 'prompt'?"),
])
def test_a_misspelt_field_is_told_with_the_name_meant(shared_server: httpx.Client, project: str, path: str,
                                                      body: dict[str, Any], told: str) -> None:
    before = job_count(shared_server)
    body = {key: value.format(project=project) if isinstance(value, str) else value for key, value in body.items()}
    error = assert_error(shared_server.post(path.format(project=project), json=body), 422, "invalid_request")
    assert error["message"] == told
    assert any(e["type"] == "extra_forbidden" for e in error["details"]["errors"])
    assert job_count(shared_server) == before


def test_a_huge_unknown_field_is_named_cut(shared_server: httpx.Client, project: str) -> None:
    error = assert_error(post_drafts(shared_server, project, {"prompt": "x", "q" * 200_000: 1}), 422,
                         "invalid_request")
    assert error["message"].startswith("unknown field '" + "q" * 100 + "…' (fields here: prompt,")


def test_many_validation_errors_are_listed_up_to_a_bound(shared_server: httpx.Client, project: str) -> None:
    before = job_count(shared_server)
    body = {"prompt": "x", **{f"f{i}": 0 for i in range(250)}}  # within the 256 members an object may have
    response = post_drafts(shared_server, project, body)
    error = assert_error(response, 422, "invalid_request")
    assert error["message"].startswith("unknown field 'f0' (fields here: prompt,")
    assert len(error["details"]["errors"]) == 50
    assert error["details"]["errors_not_listed"] == 200
    assert len(response.content) < 10_000
    # Under the bound, all are listed and nothing says more.
    few = assert_error(post_drafts(shared_server, project, {"prompt": "", "n": 0, "width": 7}), 422, "invalid_request")
    assert len(few["details"]["errors"]) == 3 and "errors_not_listed" not in few["details"]
    assert job_count(shared_server) == before


def test_utf8_byte_order_mark_is_ignored(shared_server: httpx.Client, project: str) -> None:
    response = shared_server.post(f"/v1/projects/{project}/drafts", headers={"Content-Type": "application/json"},
                                  content=b"\xef\xbb\xbf" + b'{"prompt": "x", "n": 1, "width": 64, "height": 64, '
                                                           b'"steps": 1, "seed": 5}')
    assert response.status_code == 202, response.text
    assert response.json()["params"]["seed"] == 5
    assert wait_for_job(shared_server, response.json()["id"])["status"] == "succeeded"


def test_every_route_reads_its_body_strictly() -> None:
    modules = [importlib.import_module(f"orchestrator.api.{m.name}") for m in pkgutil.iter_modules(api.__path__)]
    routers = [module.router for module in modules if isinstance(getattr(module, "router", None), APIRouter)]
    assert len(routers) >= 9
    routes = [route for router in routers for route in router.routes]
    with_body = [route for route in routes if isinstance(route, APIRoute) and route.body_field is not None]
    assert len(with_body) >= 8
    assert [route.path for route in with_body if not isinstance(route, StrictJSONRoute)] == []


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_body_not_sent_as_json(shared_server: httpx.Client, project: str, content_type: str | None) -> None:
    # `curl -d '{...}'` without -H sends form encoding: say what to send instead of a schema error.
    before = job_count(shared_server)
    headers = {"Content-Type": content_type} if content_type else {}
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=b'{"prompt": "x"}', headers=headers)
    assert response.request.headers.get("Content-Type") == content_type
    error = assert_error(response, 415, "invalid_request")
    assert "Content-Type: application/json" in error["message"]
    assert job_count(shared_server) == before


def test_missing_body(shared_server: httpx.Client, project: str) -> None:
    response = shared_server.post(f"/v1/projects/{project}/drafts", headers={"Content-Type": "application/json"})
    assert assert_error(response, 422, "invalid_request")["message"] == "this request needs a JSON body"


def test_json_subtype_is_json(shared_server: httpx.Client, project: str) -> None:
    response = shared_server.post("/v1/projects", content=b'{"name": "typed"}',
                                  headers={"Content-Type": "application/vnd.studio+json; charset=utf-8"})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "typed"


def test_size_beyond_the_lite_engine(shared_server: httpx.Client, project: str) -> None:
    """Within the schema (<= 8192) but beyond ORCH_LOCAL_MAX_SIZE (2048)."""
    before = job_count(shared_server)
    for body, field in (({**VALID, "width": 4096}, "width"), ({**VALID, "height": 2056, "engine": "lite"}, "height")):
        error = assert_error(post_drafts(shared_server, project, body), 422, "invalid_request")
        assert "2048" in error["message"]
        # Listed as the body's validation errors are, though found past the schema.
        assert error["details"]["errors"] == [{"loc": ["body", field], "msg": error["message"], "type": "value_error"}]
    assert job_count(shared_server) == before


@pytest.mark.parametrize("engine", ["no-such-engine", "local-hifi", "gemini"])
def test_engine_that_cannot_serve_drafts(shared_server: httpx.Client, project: str, engine: str) -> None:
    """Unknown, wrong stage (local-hifi does bridge/polish) and unconfigured (no API key)."""
    before = job_count(shared_server)
    error = assert_error(post_drafts(shared_server, project, {**VALID, "engine": engine}), 422, "no_route")
    assert engine in error["message"]
    # A typo is told as one, not as an engine the policy does not allow.
    assert ("unknown engine" in error["message"]) == (engine == "no-such-engine"), error
    if engine == "no-such-engine":
        assert "lite" in error["details"]["known"]
    assert job_count(shared_server) == before


def test_unknown_project(shared_server: httpx.Client) -> None:
    before = job_count(shared_server)
    error = assert_error(post_drafts(shared_server, MISSING["prj"], VALID), 404, "not_found")
    assert error["details"] == {"project_id": MISSING["prj"]}
    assert_error(shared_server.get(f"/v1/projects/{MISSING['prj']}"), 404, "not_found")
    assert_error(shared_server.patch(f"/v1/projects/{MISSING['prj']}", json={"name": "x"}), 404, "not_found")
    assert_error(shared_server.get(f"/v1/projects/{MISSING['prj']}/assets"), 404, "not_found")
    assert job_count(shared_server) == before


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/jobs/{job}"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("GET", "/v1/jobs/{job}/events"),
    ("GET", "/v1/jobs/{job}/preview"),
    ("GET", "/v1/assets/{ast}"),
    ("GET", "/v1/assets/{ast}/content"),
    ("GET", "/v1/assets/{ast}/lineage"),
    ("GET", "/v1/assets/..%2e%2e/content"),
    ("GET", "/v1/no-such-resource"),
])
def test_unknown_ids(shared_server: httpx.Client, method: str, path: str) -> None:
    assert_error(shared_server.request(method, path.format(**MISSING)), 404, "not_found")


@pytest.mark.parametrize("path", ["/v1/projects/{id}", "/v1/jobs/{id}", "/v1/assets/{id}", "/v1/jobs?project_id={id}"])
def test_an_unknown_id_far_longer_than_ours_is_not_echoed_whole(shared_server: httpx.Client, path: str) -> None:
    long_id = "prj_" + "x" * 5000
    error = assert_error(shared_server.get(path.format(id=long_id)), 404, "not_found")
    assert len(error["message"]) < 200 and long_id[:100] + "…" in error["message"], error["message"]
    assert [len(str(value)) for value in error["details"].values()] == [101]


@pytest.mark.parametrize(("method", "path", "told"), [
    ("GET", "/v1/jobs/", "no such path: /v1/jobs/ (the API's paths have no trailing slash)"),
    ("POST", "/v1/projects/", "no such path: /v1/projects/ (the API's paths have no trailing slash)"),
    ("GET", "/v1/nothing", "no such path: /v1/nothing"),
    ("GET", "/", "no such path: / (the API's paths are listed at /docs)"),  # a browser's first look
    ("GET", "/v1", "no such path: /v1 (the API's paths are listed at /docs)"),
])
def test_a_path_no_route_has_is_named(shared_server: httpx.Client, method: str, path: str, told: str) -> None:
    """A bare 'Not Found' left a client to guess what was missing: a mistyped id, or the path."""
    assert assert_error(shared_server.request(method, path, json={}), 404, "not_found")["message"] == told


@pytest.mark.parametrize("path", ["/v1/assets/{ast}/promote", "/v1/assets/{ast}/polish"])
def test_unknown_source_asset(shared_server: httpx.Client, path: str) -> None:
    before = job_count(shared_server)
    assert_error(shared_server.post(path.format(**MISSING), json={}), 404, "not_found")
    assert job_count(shared_server) == before


@pytest.mark.parametrize("params", [
    {"cursor": "bad cursor!"}, {"cursor": "../../etc"}, {"cursor": "x" * 65}, {"cursor": "prj_\u00e9t\u00e9"},
    {"cursor": "garbage"}, {"cursor": "zzz_01m8hgspa67kvff4rbtb7pkd34"},  # once silently the first page
    {"limit": 0}, {"limit": 501}, {"limit": -1}, {"limit": "ten"},
    # Read as 10: a float or a padded template went unseen.
    {"limit": "10.0"}, {"limit": " 10"}, {"limit": "1_0"}, {"limit": "+10"}, {"limit": "\u0661\u0660"},
])
@pytest.mark.parametrize("path", ["/v1/projects", "/v1/jobs", "/v1/projects/{project}/assets",
                                  "/v1/projects/{project}/ledger"])
def test_bad_list_parameters(shared_server: httpx.Client, project: str, path: str, params: dict[str, Any]) -> None:
    error = assert_error(shared_server.get(path.format(project=project), params=params), 422, "invalid_request")
    # Where it went wrong, for a client that maps errors to fields: the query parameter, never the body.
    [name] = params
    assert [e["loc"] for e in error["details"]["errors"]] == [["query", name]], error


@pytest.mark.parametrize(("path", "params", "told"), [
    ("/v1/jobs", {"limit": "-1"}, "limit: Input should be greater than or equal to 1"),
    ("/v1/jobs", {"limit": "-600"}, "limit: Input should be greater than or equal to 1"),
    # Not a negative count but a signed 0, as "+0" is (a preview's step, from 0, took it as 0).
    ("/v1/projects", {"limit": "-0"}, "limit: must be a whole number written in digits, e.g. 50"),
])
def test_a_negative_count_is_told_its_range(shared_server: httpx.Client, path: str, params: dict[str, str],
                                            told: str) -> None:
    # It was "must be a whole number written in digits, e.g. 50": -1 is one, and 50 not the point.
    error = assert_error(shared_server.get(path, params=params), 422, "invalid_request")
    assert error["message"] == told, error


@pytest.mark.parametrize(("params", "name"), [
    ({"from": "2026-01-01T00:00:00"}, "from"),                               # no timezone
    ({"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),  # after 'to'
    ({"to": "0001-01-01T00:00:00+01:00"}, "to"),                              # before year 1 in UTC
    # Digits of other scripts past the microsecond were read (an Arabic zero moved the bound up).
    ({"from": "2026-04-01T00:00:00.000000\u0660Z"}, "from"),
    ({"to": "2026-04-01T00:00:00.1234567\u0661Z"}, "to"),
])
def test_bad_spend_bounds_name_their_parameter(shared_server: httpx.Client, params: dict[str, str], name: str) -> None:
    error = assert_error(shared_server.get("/v1/spend", params=params), 422, "invalid_request")
    assert [e["loc"] for e in error["details"]["errors"]] == [["query", name]], error


def test_spend_bounds_read_as_a_dashboard_sends_them(shared_server: httpx.Client) -> None:
    # A zone's '+' not URL-encoded arrives as a space: once "unexpected extra characters".
    error = assert_error(shared_server.get("/v1/spend?from=2026-11-30T01:00:00+01:00"), 422, "invalid_request")
    assert "%2B" in error["message"] and [e["loc"] for e in error["details"]["errors"]] == [["query", "from"]]
    assert shared_server.get("/v1/spend?from=2026-11-30T01:00:00%2B01:00").status_code == 200
    # Equal bounds are an empty window (a dashboard's computed one), not a refusal.
    empty = shared_server.get("/v1/spend", params={"from": "2026-11-01T00:00:00Z", "to": "2026-11-01T00:00:00Z"})
    assert empty.status_code == 200, empty.text
    assert empty.json()["groups"] == [] and empty.json()["total"] == 0


# Ledger cursors are integers: unicode digits ("²".isdigit() is True, int("²") raises) and numbers
# beyond SQL's BIGINT once answered 500.
@pytest.mark.parametrize("cursor", ["\u00b2", "\u0661", "9" * 19, "-1", "1.5", "abc"])
def test_bad_ledger_cursor(shared_server: httpx.Client, project: str, cursor: str) -> None:
    response = shared_server.get(f"/v1/projects/{project}/ledger", params={"cursor": cursor})
    assert_error(response, 422, "invalid_request")


@pytest.mark.parametrize("path", ["/v1/projects", "/v1/jobs", "/v1/projects/{project}/assets",
                                  "/v1/projects/{project}/ledger"])
def test_empty_cursor_is_the_first_page(shared_server: httpx.Client, project: str, path: str) -> None:
    url = path.format(project=project)
    assert stable(shared_server.get(url, params={"cursor": ""}).json()) == stable(shared_server.get(url).json())


@pytest.mark.parametrize(("path", "query"), [
    ("/v1/jobs", "project_id=&stage=&status=&limit=&cursor="),
    ("/v1/spend", "group_by=day&from=&to=&project_id=&format="),
    ("/v1/projects/{project}/ledger", "unreconciled=&cursor"),
])
def test_an_empty_query_value_is_a_parameter_left_out(shared_server: httpx.Client, project: str, path: str,
                                                       query: str) -> None:
    # As a client filling a URL template with blanks sends them.
    url = path.format(project=project)
    filled = shared_server.get(f"{url}?{query}")
    assert filled.status_code == 200, filled.text
    plain = [part for part in query.split("&") if part.partition("=")[2]]
    assert stable(filled.json()) == stable(shared_server.get(f"{url}?{'&'.join(plain)}").json())


@pytest.mark.parametrize("query", ["status=succeeded&status=canceled", "limit=1&limit=3",
                                   "stage=bridge&%73tage=polish", "status=&status=queued&status=queued"])
def test_a_parameter_given_twice_is_refused(shared_server: httpx.Client, query: str) -> None:
    # The last value silently won: ?status=succeeded&status=canceled listed the canceled jobs only.
    error = assert_error(shared_server.get(f"/v1/jobs?{query}"), 422, "invalid_request")
    assert error["details"]["parameter"] in ("status", "limit", "stage")
    assert shared_server.get("/v1/jobs?status=&status=queued").status_code == 200  # a blank is no value
    # Only the route's own parameters, on a route that exists: a cache-buster nobody reads may repeat.
    assert shared_server.get("/v1/jobs?_=1&_=2").status_code == 200
    assert shared_server.get("/healthz?x=1&x=2").status_code == 200
    assert_error(shared_server.get("/v1/nope?a=1&a=2"), 404, "not_found")


@pytest.mark.parametrize(("query", "meant"), [
    ("state=queued", "'stage' or 'status'"), ("Status=queued", "'status'"), ("projectid=x", "'project_id'"),
    ("project-id=x", "'project_id'"), ("LIMIT=1", "'limit'"), ("stages=bridge", "'stage'"), ("lmit=1", "'limit'"),
    ("ordre=desc", "'order'")])
def test_a_misspelled_parameter_is_refused(shared_server: httpx.Client, query: str, meant: str) -> None:
    # ?state=queued listed every job, as if no filter had been asked for.
    error = assert_error(shared_server.get(f"/v1/jobs?{query}"), 422, "invalid_request")
    assert error["message"].endswith(f"did you mean {meant}?"), error["message"]
    assert error["details"]["errors"][0]["loc"] == ["query", query.partition("=")[0]]
    # What reads as no parameter of the route's is let through: cache-busters, tracking, paging of another API.
    # Nor other words, even near ones: another API's filter is no misspelling of this one's.
    for other in ("_=1", "t=5", "v=2", "page=2", "utm_source=mail", "callback=x", "nocache=1", "tag=a",
                  "parent_id=x", "start=1", "engine=fal", "sorter=x"):
        assert shared_server.get(f"/v1/jobs?{other}").status_code == 200, other


@pytest.mark.parametrize(("path", "query", "meant"), [
    ("/v1/jobs", "project=x", "'project_id'"),
    ("/v1/spend", "group=engine", "'group_by'"),
    ("/v1/spend", "since=2026-12-01T00:00:00Z", "'from'"),
    ("/v1/spend", "until=2026-12-01T00:00:00Z", "'to'"),
    ("/v1/webhooks/deliveries", "project=x", "'project_id'"),
    ("/v1/projects/{project}/webhook-deliveries", "from=2026-12-01T00:00:00Z", "'since'"),
    ("/v1/projects/{project}/webhook-deliveries", "to=2026-12-01T00:00:00Z", "'until'"),
    ("/v1/projects/{project}/webhook-deliveries", "job=x", "'job_id'")])
def test_a_parameter_named_as_the_api_names_it_elsewhere_is_refused(
        shared_server: httpx.Client, project: str, path: str, query: str, meant: str) -> None:
    # `GET /v1/spend?since=...` answered the all-time total, as if no bound had been asked for: the
    # webhook deliveries' lists bound their time with `since`/`until`, spend with `from`/`to`. And
    # `?project=` (the route's `project_id` short of its `_id`) listed every project's jobs.
    error = assert_error(shared_server.get(f"{path.format(project=project)}?{query}"), 422, "invalid_request")
    assert error["message"].endswith(f"did you mean {meant}?"), error["message"]
    assert error["details"]["errors"][0]["loc"] == ["query", query.partition("=")[0]]
    # The right names still answer.
    right = {"'project_id'": f"project_id={project}", "'group_by'": "group_by=engine", "'job_id'": ""}
    fixed = right.get(meant, f"{meant.strip(chr(39))}={query.partition('=')[2]}")
    assert shared_server.get(f"{path.format(project=project)}?{fixed}").status_code == 200


@pytest.mark.parametrize(("path", "query"), [
    ("/v1/spend", "engine=lite"), ("/v1/spend", "stage=bridge"), ("/v1/spend", "status=succeeded"),
    ("/v1/projects/{project}/assets", "engine=lite"), ("/v1/projects/{project}/assets", "job_id=x"),
    ("/v1/projects/{project}/ledger", "job_id=x"), ("/v1/projects/{project}/ledger", "engine=lite"),
    ("/v1/projects/{project}/ledger", "since=2026-12-01T00:00:00Z"), ("/v1/projects", "status=queued"),
    ("/v1/policies", "engine=lite")])
def test_a_filter_of_another_list_is_refused(shared_server: httpx.Client, project: str, path: str,
                                             query: str) -> None:
    # `GET /v1/spend?engine=lite` answered every engine's total, and a project's assets
    # `?engine=lite` every asset: a filter the API takes on another list (`/v1/jobs?engine=`),
    # not on this one, was dropped without a word, and the answer read as the filtered one.
    name = query.partition("=")[0]
    error = assert_error(shared_server.get(f"{path.format(project=project)}?{query}"), 422, "invalid_request")
    assert f"'{name}'" in error["message"] and "does not filter" in error["message"], error["message"]
    assert error["details"]["parameter"] == name
    assert error["details"]["errors"][0]["loc"] == ["query", name]
    # A route's own filter, and what no route of the API reads (a cache-buster), still answer.
    own = {"job_id": "/v1/projects/{project}/webhook-deliveries", "since": "/v1/webhooks/deliveries"}
    assert shared_server.get(f"{own.get(name, '/v1/jobs').format(project=project)}?{query}").status_code in (200, 404)
    assert shared_server.get(f"{path.format(project=project)}?_=1&kind=grant").status_code == 200


@pytest.mark.parametrize(("path", "query", "filter_name"), [
    ("/v1/spend", "Engine=lite", "engine"), ("/v1/spend", "STAGE=bridge", "stage"),
    ("/v1/projects/{project}/assets", "job-id=x", "job_id"), ("/v1/projects/{project}/assets", "jobId=x", "job_id"),
    ("/v1/projects/{project}/ledger", "Since=2026-12-01T00:00:00Z", "since"),
    ("/v1/projects", "Status=queued", "status")])
def test_a_filter_of_another_list_is_refused_whatever_its_case(shared_server: httpx.Client, project: str, path: str,
                                                               query: str, filter_name: str) -> None:
    # `?engine=lite` on /v1/spend was a 422 and `?Engine=lite` every engine's total (200): the
    # filters of other lists were compared as written, while a misspelling of the route's own by case,
    # a dash or an underscore (`?Status=`, `?projectid=`) is refused.
    given = query.partition("=")[0]
    error = assert_error(shared_server.get(f"{path.format(project=project)}?{query}"), 422, "invalid_request")
    assert f"'{given}'" in error["message"] and f"'{filter_name}'" in error["message"], error["message"]
    assert "does not filter" in error["message"], error["message"]
    assert error["details"]["parameter"] == given
    assert error["details"]["errors"][0]["loc"] == ["query", given]


@pytest.mark.parametrize("query", ["lastEventID=x", "lasteventid=x", "LastEventId=x", "last_event_id=x",
                                   "lastEventI=x"])
def test_a_misspelled_camel_case_parameter_is_refused(shared_server: httpx.Client, query: str) -> None:
    # The route's name was compared as written, the client's folded to lower case: no spelling of
    # the stream's `lastEventId` but itself was ever a near miss, and a reconnect sending
    # `?lastEventID=` got the whole stream again, its terminal event too, instead of the 204.
    error = assert_error(shared_server.get(f"/v1/jobs/{MISSING['job']}/events?{query}"), 422, "invalid_request")
    assert error["message"].endswith("did you mean 'lastEventId'?"), error["message"]
    assert shared_server.get(f"/v1/jobs/{MISSING['job']}/events?lastEventId=x").status_code == 404


def stable(body: dict[str, Any]) -> Any:
    """A listing without what a job other tests left running changes between two reads."""
    if "items" in body and "next_cursor" in body:
        return [item["id"] for item in body["items"]], body["next_cursor"]
    return body


@pytest.mark.parametrize("params", [{"status": "done"}, {"stage": "sketch"}])
def test_bad_job_filters(shared_server: httpx.Client, params: dict[str, str]) -> None:
    assert_error(shared_server.get("/v1/jobs", params=params), 422, "invalid_request")


def test_list_limits_at_the_edges(shared_server: httpx.Client, project: str) -> None:
    for limit in (1, 500):
        response = shared_server.get("/v1/projects", params={"limit": limit})
        assert response.status_code == 200
        assert len(response.json()["items"]) <= limit


@pytest.mark.parametrize("body", [
    {}, {"name": ""}, {"name": "   "}, {"name": "\u200b"}, {"name": "\ufeff\u2060"},
    {"name": "x", "budget": {"limit": -1}},
    {"name": "x", "budget": {"limit": 5, "period": "year"}}, {"name": "x", "policy": "no-such-policy"},
    {"name": "x", "owner": "me"}, {"name": "x", "budget": {"limit": 1e300}}, {"name": "x", "budget": {"limit": False}},
])
def test_invalid_project(shared_server: httpx.Client, body: dict[str, Any]) -> None:
    before = len(shared_server.get("/v1/projects", params={"limit": 500}).json()["items"])
    assert_error(shared_server.post("/v1/projects", json=body), 422, "invalid_request")
    assert len(shared_server.get("/v1/projects", params={"limit": 500}).json()["items"]) == before


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "\u200b\u200b"}, {"policy": "no-such-policy"},
                                  {"budget": {"period": "year"}}, {"id": "prj_other"}])
def test_invalid_project_update(shared_server: httpx.Client, project: str, body: dict[str, Any]) -> None:
    before = shared_server.get(f"/v1/projects/{project}").json()
    assert_error(shared_server.patch(f"/v1/projects/{project}", json=body), 422, "invalid_request")
    assert shared_server.get(f"/v1/projects/{project}").json() == before


def _big_body(size: int) -> bytes:
    return ('{"prompt": "' + "x" * size + '"}').encode()


def test_body_over_the_limit(shared_server: httpx.Client, project: str) -> None:
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=_big_body(2 << 20),
                                  headers={"Content-Type": "application/json"})
    error = assert_error(response, 413, "payload_too_large")
    assert error["details"]["max_bytes"] == 1 << 20
    assert job_count(shared_server) == before


def test_chunked_body_over_the_limit(shared_server: httpx.Client, project: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the service must count what it reads
        body = _big_body(2 << 20)
        for start in range(0, len(body), 64 << 10):
            yield body[start:start + (64 << 10)]

    before = job_count(shared_server)
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=chunks(),
                                  headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    error = assert_error(response, 413, "payload_too_large")
    assert error["details"] == {"max_bytes": 1 << 20}  # as when the length is declared
    assert job_count(shared_server) == before


@pytest.mark.parametrize("chunked", [False, True])
def test_a_client_still_sending_a_body_over_the_limit_reads_the_413(shared_server: httpx.Client, project: str,
                                                                    chunked: bool) -> None:
    """The service answered at once and closed with the body unread: the kernel reset the
    connection, and a client still sending (an async client, more than half the time) saw a reset
    instead of the 413. Here the client sends all of it before it reads anything."""
    url = shared_server.base_url
    body = _big_body(4 << 20)
    framing = (b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(body)}\r\n".encode())
    if chunked:
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                        for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    request = (f"POST /v1/projects/{project}/drafts HTTP/1.1\r\nHost: {url.host}\r\n"
               "Content-Type: application/json\r\n").encode() + framing + b"\r\n" + body
    for _ in range(3):
        with socket.create_connection((url.host, url.port), timeout=30) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b'"payload_too_large"' in answer


def test_a_client_that_waits_for_100_continue_is_answered_without_sending(shared_server: httpx.Client,
                                                                         project: str) -> None:
    url = shared_server.base_url
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/projects/{project}/drafts HTTP/1.1\r\nHost: {url.host}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {4 << 20}\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]  # no "100 Continue": nothing is read


@pytest.mark.parametrize("method", ["POST /v1/projects", "GET /v1/projects"])
def test_a_client_that_hangs_up_mid_body_is_no_server_error(shared_server: httpx.Client, method: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # A client timed out or canceled mid-upload: once an ERROR traceback and a 500 for each, and a
    # GET announcing a body waited for it before answering.
    url = shared_server.base_url
    projects = len(shared_server.get("/v1/projects", params={"limit": 500}).json()["items"])
    caplog.set_level(logging.INFO)
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall((f"{method} HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
                      'Content-Length: 100\r\n\r\n{"name": ').encode())
        if method.startswith("GET"):  # nothing of it is read: answered at once
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    deadline = time.monotonic() + 2  # the hang-up is met at once: its traceback came within milliseconds
    while time.monotonic() < deadline:
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        time.sleep(0.1)
    assert len(shared_server.get("/v1/projects", params={"limit": 500}).json()["items"]) == projects


def test_body_under_the_limit_is_read(shared_server: httpx.Client, project: str) -> None:
    # 512 KiB passes the size cap and meets the prompt's own length rule instead.
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=_big_body(512 << 10),
                                  headers={"Content-Type": "application/json"})
    assert "prompt" in assert_error(response, 422, "invalid_request")["message"]


def test_nul_characters_are_refused(shared_server: httpx.Client, project: str) -> None:
    check_nul_refused(shared_server, project)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_body_is_refused_as_compressed(shared_server: httpx.Client, project: str,
                                                    encoding: str) -> None:
    # No body is decoded: a gzipped one was refused as "not valid JSON (JSON is sent as UTF-8)".
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=gzip.compress(b'{"prompt": "x"}'),
                                  headers={"Content-Type": "application/json", "Content-Encoding": encoding})
    error = assert_error(response, 415, "invalid_request")
    assert f"Content-Encoding: {encoding}" in error["message"] and "uncompressed" in error["message"]
    assert job_count(shared_server) == before


def test_an_uncompressed_body_may_say_identity(shared_server: httpx.Client) -> None:
    response = shared_server.post("/v1/projects", content=b'{"name": "plain"}',
                                  headers={"Content-Type": "application/json", "Content-Encoding": "identity"})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("path", ["/v1/projects/{project}%2Fassets", "/v1/projects/{project}%2fassets",
                                  "/v1/assets/{asset}%2Fcontent", "/v1/assets/..%2F..%2Fetc%2Fpasswd/content"])
def test_an_encoded_slash_is_not_a_path_separator(shared_server: httpx.Client, project: str,
                                                  finished_job: dict[str, Any], path: str) -> None:
    # Routed as a slash, `{id}%2Fcancel` reached the cancel route past a proxy rule for `/v1/jobs/*`.
    url = path.format(project=project, asset=finished_job["assets"][0])
    error = assert_error(shared_server.get(url), 400, "invalid_request")
    assert "encoded slash" in error["message"]


def test_an_encoded_slash_does_not_reach_the_cancel_route(shared_server: httpx.Client, project: str) -> None:
    # A small draft: a default one (4 at 512 px) ran past the wait on a CI machine under load.
    job = shared_server.post(f"/v1/projects/{project}/drafts",
                             json={"prompt": "x", "width": 64, "height": 64, "n": 1}).json()
    assert_error(shared_server.post(f"/v1/jobs/{job['id']}%2Fcancel"), 400, "invalid_request")
    assert wait_for_job(shared_server, job["id"])["status"] == "succeeded"


def test_a_nul_in_a_key_of_the_body_is_told_with_its_subject(shared_server: httpx.Client, project: str) -> None:
    error = assert_error(shared_server.post(f"/v1/projects/{project}/drafts", json={"pro\x00mpt": "x"}),
                         422, "invalid_request")
    assert error["message"] == "text contains a NUL character (\\u0000)"  # not "contains ..." alone
    assert [e["loc"] for e in error["details"]["errors"]] == [["body"]]


@pytest.mark.parametrize(("method", "path", "text"), [
    ("post", "/v1/projects", "a\u202eb"), ("post", "/v1/projects", "ring\u0007"),
    ("patch", "/v1/projects/{project}", "x\u001b[31m"), ("post", "/v1/projects/{project}/keys", "k\u2066ey"),
    ("post", "/v1/projects", "two\u2028lines"), ("post", "/v1/projects", "a\u200fb"),
])
def test_a_name_with_control_characters_is_refused(shared_server: httpx.Client, project: str, method: str,
                                                   path: str, text: str) -> None:
    # Names are shown in lists, dashboards and CSV: no terminal escapes, no text that reads reversed.
    response = shared_server.request(method, path.format(project=project), json={"name": text})
    error = assert_error(response, 422, "invalid_request")
    assert error["message"].startswith("name: contains U+") and "a name cannot hold" in error["message"], error
    assert shared_server.get(f"/v1/projects/{project}").json()["name"] == "errors"  # nothing written
    assert shared_server.post("/v1/projects", json={"name": "Sørensen 北京 ✓"}).status_code == 201  # text is fine


# Python's JSON parser takes a lone surrogate ("\ud800"), which is not text: echoed in an error message
# (an unknown policy, an unknown engine) it once made the answer itself fail to encode, a 500.
@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/projects", '{"name": "x", "policy": "\\ud800"}', "policy"),
    ("/v1/projects", '{"name": "a\\udfffb"}', "name"),
    ("/v1/route/explain", '{"stage": "ideation", "project_id": "{project}", "prompt": "x", "engine": "\\ud800"}',
     "engine"),
    ("/v1/route/explain", '{"stage": "bridge", "source_asset_id": "\\udc00"}', "source_asset_id"),
    ("/v1/projects/{project}/drafts", '{"prompt": "x", "tags": {"\\ud800": "v"}}', "tags"),
    ("/v1/projects/{project}/drafts", '{"prompt": "x", "tags": {"k": ["\\ud800"]}}', "tags.k.0"),
    ("/v1/projects/{project}/drafts", '{"prompt": "a\\ud83d b"}', "prompt"),
    ("/v1/projects/{project}/grants", '{"amount": 1, "note": "\\ud800"}', "note"),
])
def test_lone_surrogates_are_refused(shared_server: httpx.Client, project: str, path: str, body: str,
                                     field: str) -> None:
    before = (job_count(shared_server), shared_server.get(f"/v1/projects/{project}/ledger").json(),
              len(shared_server.get("/v1/projects", params={"limit": 500}).json()["items"]))
    response = shared_server.post(path.format(project=project), content=body.replace("{project}", project).encode(),
                                  headers={"Content-Type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert error["message"] == f"{field}: contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", *field.split(".")]]  # at the field
    assert before == (job_count(shared_server), shared_server.get(f"/v1/projects/{project}/ledger").json(),
                      len(shared_server.get("/v1/projects", params={"limit": 500}).json()["items"]))


def test_a_surrogate_pair_is_text(shared_server: httpx.Client, project: str) -> None:
    body = f'{{"stage": "ideation", "project_id": "{project}", "prompt": "a \\ud83d\\ude00", "n": 1}}'
    response = shared_server.post("/v1/route/explain", content=body.encode(),
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    draft = '{"prompt": "a \\ud83d\\ude00", "n": 1, "width": 64, "height": 64}'
    job = shared_server.post(f"/v1/projects/{project}/drafts", content=draft.encode(),
                             headers={"Content-Type": "application/json"})
    assert job.status_code == 202, job.text
    assert job.json()["params"]["prompt"] == "a \U0001f600"  # one code point, stored and answered as such


def test_an_error_echoing_unencodable_text_is_still_answered(make_settings: SettingsFactory) -> None:
    # The backstop for text that reaches a message some other way than a validated body.
    app = create_app(make_settings())

    @app.get("/v1/odd")
    def odd() -> None:
        raise NotFound("unknown thing '\ud800'", details={"thing": "\ud800", "known": ["a\udfff"]})

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/odd")
        error = assert_error(response, 404, "not_found")
    assert error["message"] == "unknown thing '\\ud800'"  # the escape, as text
    assert error["details"] == {"thing": "\\ud800", "known": ["a\\udfff"]}
    response.content.decode("utf-8")


# Python's JSON parser takes NaN and Infinity; no amount of credits may be either (nor are they JSON).
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_credits(shared_server: httpx.Client, project: str, number: str) -> None:
    headers = {"Content-Type": "application/json"}
    before = shared_server.get(f"/v1/projects/{project}/ledger").json()
    grant = shared_server.post(f"/v1/projects/{project}/grants", content=f'{{"amount": {number}}}', headers=headers)
    assert_error(grant, 400, "invalid_request")
    assert shared_server.get(f"/v1/projects/{project}/ledger").json() == before
    projects = len(shared_server.get("/v1/projects", params={"limit": 500}).json()["items"])
    body = f'{{"name": "x", "budget": {{"limit": {number}, "period": "month"}}}}'
    assert_error(shared_server.post("/v1/projects", content=body, headers=headers), 400, "invalid_request")
    assert len(shared_server.get("/v1/projects", params={"limit": 500}).json()["items"]) == projects


@pytest.mark.parametrize("amount", [0.0004, 1.23456, 0.0015])
def test_credits_beyond_thousandths(shared_server: httpx.Client, project: str, amount: float) -> None:
    # Once a 0.0004 grant wrote a 0.0 ledger entry, and 1.23456 became 1.235 without a word.
    before = shared_server.get(f"/v1/projects/{project}/ledger").json()
    error = assert_error(shared_server.post(f"/v1/projects/{project}/grants", json={"amount": amount}),
                         422, "invalid_request")
    assert "at most 3 decimals" in error["message"]
    assert shared_server.get(f"/v1/projects/{project}/ledger").json() == before
    body = {"name": "x", "budget": {"limit": amount, "period": "month"}}
    assert_error(shared_server.post("/v1/projects", json=body), 422, "invalid_request")


def test_credits_in_thousandths_are_kept_exactly(shared_server: httpx.Client) -> None:
    created = create_project(shared_server, "exact", budget={"limit": 1234.567, "period": "month"})
    assert created["budget"]["limit"] == 1234.567
    grant = shared_server.post(f"/v1/projects/{created['id']}/grants", json={"amount": 0.001})
    assert grant.status_code == 201 and grant.json()["amount"] == 0.001
    assert shared_server.get(f"/v1/projects/{created['id']}/budget").json()["granted"] == 0.001


def test_cancel_finished_job(shared_server: httpx.Client, finished_job: dict[str, Any]) -> None:
    error = assert_error(shared_server.post(f"/v1/jobs/{finished_job['id']}/cancel"), 409, "job_finished")
    assert error["details"]["status"] == "succeeded"
    assert shared_server.get(f"/v1/jobs/{finished_job['id']}").json()["status"] == "succeeded"


def test_method_not_allowed(shared_server: httpx.Client, project: str) -> None:
    response = shared_server.delete(f"/v1/projects/{project}")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD, PATCH"  # two routes share the path: both are named
    response = shared_server.put("/v1/projects")
    error = assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD, POST"
    # A sentence, and the methods as a list for a program.
    assert error["message"] == "PUT is not allowed on /v1/projects; it answers GET, HEAD, POST"
    assert error["details"] == {"allowed": ["GET", "HEAD", "POST"]}
    for page in ("/openapi.json", "/docs"):  # outside the document: Allow was sent empty
        response = shared_server.post(page)
        assert_error(response, 405, "method_not_allowed")
        assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD"}


def test_unexpected_error_answers_500_in_the_error_shape(make_settings: SettingsFactory) -> None:
    app = create_app(make_settings())

    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("a bug, with a secret path /srv/keys in its message")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/boom")
        error = assert_error(response, 500, "internal_error")
    assert "secret" not in error["message"]  # internals stay in the server log
    # The server closes the connection after it: a client reusing it got ECONNRESET on its next request.
    assert response.headers["Connection"] == "close"


def test_too_many_unfinished_jobs_is_a_429_that_says_when_to_ask_again(make_settings: SettingsFactory) -> None:
    with TestClient(create_app(make_settings(max_pending_jobs=1, run_jobs=False))) as client:
        project = create_project(client, "busy")["id"]
        assert post_drafts(client, project, VALID).status_code == 202
        refused = post_drafts(client, project, VALID)
        assert_error(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "5"
        # route/explain says what the submit would do (it answered 200 here).
        explained = client.post("/v1/route/explain", json={"stage": "ideation", "project_id": project, **VALID})
        assert_error(explained, 429, "rate_limited")


@pytest.mark.parametrize(("stage", "body"), [
    ("promote", {"strength": 0.0005}), ("promote", {"strength": 0}), ("polish", {"creativity": 0.005}),
])
def test_strength_too_small_to_denoise(shared_server: httpx.Client, finished_job: dict[str, Any], stage: str,
                                       body: dict[str, Any]) -> None:
    # 0.0005 once asked local-hifi for 1000 steps, of which int(1000 * 0.0005) = 0 ran: a crash.
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/assets/{finished_job['assets'][0]}/{stage}", json=body)
    assert_error(response, 422, "invalid_request")
    assert job_count(shared_server) == before


@pytest.mark.parametrize("stage", ["promote", "polish"])
@pytest.mark.parametrize(("body", "field"), [
    ({"steps": 0}, "steps"), ({"steps": 151}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": "4"}, "steps"),
    ({"guidance_scale": -0.5}, "guidance_scale"), ({"guidance_scale": 30.5}, "guidance_scale"),
    ({"guidance_scale": True}, "guidance_scale"), ({"guidance_scale": "7"}, "guidance_scale"),
])
def test_bad_steps_or_guidance_of_a_bridge_or_polish(shared_server: httpx.Client, finished_job: dict[str, Any],
                                                    stage: str, body: dict[str, Any], field: str) -> None:
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/assets/{finished_job['assets'][0]}/{stage}", json=body)
    error = assert_error(response, 422, "invalid_request")
    assert error["details"]["errors"][0]["loc"] == ["body", field] and error["message"].startswith(field)
    assert job_count(shared_server) == before


@pytest.mark.parametrize("body", [{"scale": 3, "width": 128}, {"scale": 1.5, "height": 64}])
def test_polish_with_both_a_scale_and_a_size_is_refused(shared_server: httpx.Client, finished_job: dict[str, Any],
                                                         body: dict[str, Any]) -> None:
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/assets/{finished_job['assets'][0]}/polish", json=body)
    assert assert_error(response, 422, "invalid_request")["message"] == "give either scale or width/height, not both"
    assert job_count(shared_server) == before
    # A size alone is fine: the default scale gives way to it.
    sized = shared_server.post(f"/v1/assets/{finished_job['assets'][0]}/polish", json={"width": 128})
    assert sized.status_code == 202 and sized.json()["params"]["width"] == 128, sized.text


@pytest.mark.parametrize("scale", [0.001, 5e-324, 0.1])
def test_a_polish_scale_too_small_is_refused_as_the_scale(shared_server: httpx.Client, finished_job: dict[str, Any],
                                                          scale: float) -> None:
    before = job_count(shared_server)
    response = shared_server.post(f"/v1/assets/{finished_job['assets'][0]}/polish", json={"scale": scale})
    error = assert_error(response, 422, "invalid_request")
    # Once "width must be a multiple of 8 between 64 and 2048 ... (got 8)", for a width never sent.
    assert error["message"].startswith(f"scale {scale:g} makes the 64x64 source "), error["message"]
    assert error["message"].endswith("a side is 8 to 8192 pixels")
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", "scale"]]
    # One the API's bounds allow, but no engine here takes, is refused as the scale too, with the
    # engine's limit (it was "width must be a multiple of 8 between 64 and 2048 ... (got 32)", on no field).
    half = assert_error(shared_server.post(f"/v1/assets/{finished_job['assets'][0]}/polish", json={"scale": 0.5}),
                        422, "invalid_request")
    assert half["message"].startswith("scale 0.5 makes the 64x64 source 32x32; local-hifi takes 64 to "), half
    assert "(got 32)" not in half["message"] and [e["loc"] for e in half["details"]["errors"]] == [["body", "scale"]]
    assert job_count(shared_server) == before


@pytest.fixture(scope="module")
def square_asset(shared_server: httpx.Client, project: str) -> str:
    asset: str = run_draft(shared_server, project, n=1, width=512, height=512, steps=1)["assets"][0]
    return asset


@pytest.fixture(scope="module")
def tall_asset(shared_server: httpx.Client, project: str) -> str:
    asset: str = run_draft(shared_server, project, n=1, width=64, height=2048, steps=1)["assets"][0]
    return asset


@pytest.mark.parametrize(("body", "says"), [
    # Under the local engines' least side (64), though within the API's (8).
    ({"scale": 0.1}, "scale 0.1 makes the 512x512 source 48x48; local-hifi takes 64 to "),
    ({"scale": 0.1, "engine": "local-hifi"}, "scale 0.1 makes the 512x512 source 48x48; local-hifi takes 64 to "),
    ({"scale": 8, "engine": "local-hifi"}, "scale 8 makes the 512x512 source 4096x4096; local-hifi takes 64 to "),
])
def test_a_polish_scale_no_engine_takes_is_refused_as_the_scale(shared_server: httpx.Client, square_asset: str,
                                                                body: dict[str, Any], says: str) -> None:
    """It was local-hifi's "width must be a multiple of 8 between 64 and 2048 ... (got 48)": a
    width the client never sent."""
    before = job_count(shared_server)
    error = assert_error(shared_server.post(f"/v1/assets/{square_asset}/polish", json=body), 422, "invalid_request")
    assert error["message"].startswith(says) and "(got " not in error["message"], error
    assert "a scale of 0.125 to 4 fits it" in error["message"]  # with local-hifi's 2048 at most
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", "scale"]]
    assert (error["details"]["scale"], error["details"]["source_size"]) == (body["scale"], [512, 512])
    assert job_count(shared_server) == before
    # The scales it names are taken.
    for scale in (0.125, 4):
        taken = shared_server.post("/v1/route/explain", json={"stage": "polish", "source_asset_id": square_asset,
                                                              "scale": scale})
        assert taken.status_code == 200, taken.text


def test_a_size_beyond_the_local_engines_most_names_the_setting_that_sets_it(
        shared_server: httpx.Client, project: str, square_asset: str) -> None:
    """The local engines' largest side is ORCH_LOCAL_MAX_SIZE (2048 by default, 8192 allowed): a
    draft or a polish beyond it was refused "2048x2048 at most" without naming the setting."""
    before = job_count(shared_server)
    draft = assert_error(post_drafts(shared_server, project, {**VALID, "width": 4096}), 422, "invalid_request")
    assert "2048x2048 at most" in draft["message"] and "ORCH_LOCAL_MAX_SIZE" in draft["message"], draft
    assert draft["details"]["setting"] == "ORCH_LOCAL_MAX_SIZE"
    polish = assert_error(shared_server.post(f"/v1/assets/{square_asset}/polish", json={"scale": 8}),
                          422, "invalid_request")
    assert polish["message"].startswith("scale 8 makes the 512x512 source 4096x4096; local-hifi takes 64 to 2048 "
                                        "pixels a side"), polish
    assert "ORCH_LOCAL_MAX_SIZE" in polish["message"] and "a scale of 0.125 to 4 fits it" in polish["message"]
    assert job_count(shared_server) == before


def test_a_polish_scale_is_refused_as_the_scale_when_only_an_engine_the_policy_skips_takes_it(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    """Gemini (4096 px) is set up but `local-only` never routes to it: the size passed the check of
    every engine, and local-hifi then refused "4096x4096", on a width the client never sent."""
    client = start_server(make_settings(gemini_api_key="never-sent", gemini_base_url="http://127.0.0.1:9"))
    project = create_project(client, policy="local-only")["id"]
    asset = run_draft(client, project, n=1, width=512, height=512, steps=1)["assets"][0]
    error = assert_error(client.post(f"/v1/assets/{asset}/polish", json={"scale": 8}), 422, "invalid_request")
    assert error["message"].startswith("scale 8 makes the 512x512 source 4096x4096; local-hifi takes 64 to "), error
    assert "a scale of 0.125 to 4 fits it" in error["message"]
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", "scale"]]


@pytest.mark.parametrize(("stage", "body", "says"), [
    # The height worked out from the width (262144) is beyond the API's bounds: not named. What
    # fits is told within local-hifi's sides too (64 to 2048), the one engine here to take it: the
    # API's range alone (8 to 256) was refused again by it.
    ("polish", {"width": 8192}, "width 8192 makes the 64x2048 source over 8192 pixels high (only a width of 64 "
                                "fits it); a side is 8 to 8192 pixels"),
    ("promote", {"width": 8192}, "width 8192 makes the 64x2048 source over 8192 pixels high (only a width of 64 "
                                 "fits it); a side is 8 to 8192 pixels"),
    ("polish", {"height": 16}, "height 16 makes the 64x2048 source under 8 pixels wide (only a height of 2048 "
                               "fits it); a side is 8 to 8192 pixels"),
    # Within them, but beyond local-hifi's 2048 (once "local-hifi: 128x4096 is larger than this engine makes").
    ("polish", {"width": 128}, "width 128 makes the 64x2048 source 128x4096; local-hifi takes 64 to "),
    ("promote", {"width": 128}, "width 128 makes the 64x2048 source 128x4096; local-hifi takes 64 to "),
])
def test_one_side_whose_other_side_no_engine_takes_is_refused_as_that_side(
        shared_server: httpx.Client, tall_asset: str, stage: str, body: dict[str, Any], says: str) -> None:
    """One side alone keeps the source's aspect: the other side was never checked, and the engine
    refused it as "8192x262144 is larger than this engine makes", a size the client never sent."""
    before = job_count(shared_server)
    error = assert_error(shared_server.post(f"/v1/assets/{tall_asset}/{stage}", json=body), 422, "invalid_request")
    assert error["message"].startswith(says), error
    assert "262144" not in error["message"] and "larger than this engine" not in error["message"]
    [field] = body
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", field]]
    assert error["details"][field] == body[field] and error["details"]["source_size"] == [64, 2048]
    assert job_count(shared_server) == before
    # What it names as fitting is taken.
    for value in error["details"]["fits"]:
        taken = shared_server.post("/v1/route/explain", json={
            "stage": {"promote": "bridge"}.get(stage, stage), "source_asset_id": tall_asset, field: value})
        assert taken.status_code == 200, taken.text


def test_a_polish_s_default_scale_no_engine_takes_is_refused_as_the_scale_written_out_is(
        shared_server: httpx.Client, tall_asset: str) -> None:
    # Left out, the default scale (2) was the engine's "128x4096 is larger than this engine makes",
    # naming a width the client never sent, and no scale that fits.
    written_out = assert_error(shared_server.post(f"/v1/assets/{tall_asset}/polish", json={"scale": 2}),
                               422, "invalid_request")
    left_out = assert_error(shared_server.post(f"/v1/assets/{tall_asset}/polish", json={}), 422, "invalid_request")
    assert left_out == written_out
    assert left_out["message"].startswith("scale 2 makes the 64x2048 source 128x4096; local-hifi takes 64 to ")


def test_one_side_that_fits_keeps_the_source_aspect(shared_server: httpx.Client, tall_asset: str) -> None:
    explained = shared_server.post("/v1/route/explain", json={"stage": "polish", "source_asset_id": tall_asset,
                                                              "width": 64})
    assert explained.status_code == 200, explained.text
    assert (explained.json()["params"]["width"], explained.json()["params"]["height"]) == (64, 2048)


def test_null_for_a_field_whose_null_means_nothing_else_is_its_default(
        shared_server: httpx.Client, project: str, finished_job: dict[str, Any]) -> None:
    """Clients send optional fields they never set as null: some were a 422, others of the same
    body were taken."""
    nulls = {"negative_prompt": None, "n": None, "tags": None, "cache": None}
    draft = shared_server.post(f"/v1/projects/{project}/drafts", json={**VALID, **nulls})
    assert draft.status_code == 202, draft.text
    params = draft.json()["params"]
    assert (params["negative_prompt"], params["n"], params["tags"]) == ("", 4, {})
    source = finished_job["assets"][0]
    for stage, body, field, default in (
            ("promote", {"tags": None, "strength": None, "quality": None}, "strength", 0.55),
            ("polish", {"tags": None, "creativity": None}, "creativity", 0.3)):
        response = shared_server.post(f"/v1/assets/{source}/{stage}", json=body)
        assert response.status_code == 202, response.text
        assert response.json()["params"][field] == default and response.json()["params"]["tags"] == {}
    # Where null means something, it still does: a polish keeping the source's size.
    kept = shared_server.post(f"/v1/assets/{source}/polish", json={"scale": None}).json()["params"]
    assert kept["scale"] is None
    # A budget's period (its default `none`), on creation and in a PATCH.
    made = shared_server.post("/v1/projects", json={"name": "nulls", "budget": {"limit": 5, "period": None}})
    assert made.status_code == 201, made.text
    assert made.json()["budget"] == {"limit": 5.0, "period": "none"}
    monthly = shared_server.patch(f"/v1/projects/{made.json()['id']}", json={"budget": {"limit": 5, "period": "month"}})
    assert monthly.json()["budget"]["period"] == "month"
    # In a PATCH null is left out, so the budget keeps its own period (it is not reset to all-time).
    patched = shared_server.patch(f"/v1/projects/{made.json()['id']}", json={"budget": {"limit": 7, "period": None}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["budget"] == {"limit": 7.0, "period": "month"}


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/projects/{project}/drafts", {**VALID, "prompt": None}, "prompt"),
    ("/v1/projects", {"name": None}, "name"),
])
def test_null_for_a_required_field_is_told_as_required(shared_server: httpx.Client, project: str, path: str,
                                                       body: dict[str, Any], field: str) -> None:
    """A required field sent as null was "Input should be a valid string": true, but it read as a
    wrong type when the client's mistake is a value left unset."""
    before = job_count(shared_server)
    error = assert_error(shared_server.post(path.format(project=project), json=body), 422, "invalid_request")
    assert error["message"] == f"{field}: is required and may not be null"
    assert error["details"]["errors"][0]["loc"] == ["body", *field.split(".")]
    assert error["details"]["errors"][0]["msg"] == "is required and may not be null"
    assert job_count(shared_server) == before


@pytest.mark.parametrize("text", ["   ", "\t\n"])
def test_a_prompt_of_only_whitespace_is_told_so(shared_server: httpx.Client, project: str, text: str) -> None:
    before = job_count(shared_server)
    error = assert_error(shared_server.post(f"/v1/projects/{project}/drafts", json={**VALID, "prompt": text}),
                         422, "invalid_request")
    assert error["message"] == "prompt: is only whitespace"  # not "should have at least 1 character"
    assert job_count(shared_server) == before


@pytest.mark.parametrize(("stage", "field", "default"), [("promote", "strength", 0.55), ("polish", "scale", 2)])
def test_promote_and_polish_take_no_body_as_all_defaults(shared_server: httpx.Client, finished_job: dict[str, Any],
                                                         stage: str, field: str, default: float) -> None:
    response = shared_server.post(f"/v1/assets/{finished_job['assets'][0]}/{stage}")
    assert response.status_code == 202, response.text  # once 422 'this request needs a JSON body'
    assert response.json()["params"][field] == default


def test_a_cursor_of_another_list_is_refused(shared_server: httpx.Client, project: str) -> None:
    # An asset id given to the jobs list would start it somewhere arbitrary, without a word.
    assert_error(shared_server.get("/v1/jobs", params={"cursor": project}), 422, "invalid_request")
    assert shared_server.get("/v1/projects", params={"cursor": project}).status_code == 200
    # Echoed as ids are, cut: an 8000-character one came back whole.
    error = assert_error(shared_server.get("/v1/jobs", params={"cursor": "x" * 8000}), 422, "invalid_request")
    assert error["details"]["cursor"] == "x" * 100 + "…"


def test_listing_the_jobs_of_a_project_that_does_not_exist_is_a_404(shared_server: httpx.Client) -> None:
    # As its assets list answers: a mistyped id must not read as a project without jobs.
    assert_error(shared_server.get("/v1/jobs", params={"project_id": "prj_nope"}), 404, "not_found")
    empty = create_project(shared_server, "no jobs yet")["id"]
    page = shared_server.get("/v1/jobs", params={"project_id": empty})
    assert page.status_code == 200 and page.json() == {"items": [], "next_cursor": None}


def test_a_project_key_looked_up_while_the_database_is_away_is_a_503_on_every_answer(
        make_settings: SettingsFactory, start_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Answers made before any route ran (no route, a refused body, an encoded slash) look the key up
    # from an exception handler or a middleware, out of reach of the database's handler: each was a
    # 500 `internal_error` with a traceback, while the routes themselves answered 503.
    from sqlalchemy.exc import OperationalError

    client = start_server(make_settings(admin_key="secret"))

    def away(*_: Any) -> None:
        raise OperationalError("SELECT api_keys", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr("orchestrator.keys.find", away)
    key = {"Authorization": "Bearer orch_pk_" + "a" * 43}
    answers = {
        "route": client.get("/v1/projects", headers=key),
        "no route": client.get("/v1/nosuch", headers=key),
        "method": client.delete("/v1/projects", headers=key),
        "encoded slash": client.get("/v1/jobs/a%2Fb", headers=key),
        "too large": client.post("/v1/projects", headers=key, content=b"{" + b" " * (2 << 20) + b"}"),
    }
    for why, response in answers.items():
        assert response.status_code == 503, (why, response.text)
        assert response.json()["error"]["code"] == "database_unavailable", why
        assert response.headers["retry-after"] == "5", why


def test_a_database_held_by_another_writer_is_a_503_to_retry_not_a_500(
        make_settings: SettingsFactory, start_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orchestrator.db.LOCK_TIMEOUT_SECONDS", 1)  # read as each connection opens
    settings = make_settings()
    client = start_server(settings)
    stalled = sqlite3.connect(settings.data_dir / "orchestrator.db", isolation_level=None)
    try:
        stalled.execute("BEGIN IMMEDIATE")  # a writer that never commits
        response = client.post("/v1/projects", json={"name": "while stalled"}, headers={"Idempotency-Key": "k1"})
        assert_error(response, 503, "database_unavailable")
        assert response.headers["retry-after"] == "5"
    finally:
        stalled.rollback()
        stalled.close()
    again = client.post("/v1/projects", json={"name": "while stalled"}, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers  # nothing was kept
    assert [p["name"] for p in client.get("/v1/projects").json()["items"]] == ["while stalled"]


def test_a_database_file_replaced_under_the_service_is_a_503_until_a_restart(
        make_settings: SettingsFactory, start_server: Any) -> None:
    settings = make_settings()
    client = start_server(settings)
    assert client.post("/v1/projects", json={"name": "before"}).status_code == 201
    path = settings.data_dir / "orchestrator.db"
    backup = settings.data_dir / "backup.db"
    with sqlite3.connect(path) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    copy.close()
    live.close()
    backup.replace(path)  # a restore, the service still running
    for _ in range(2):
        error = assert_error(client.post("/v1/projects", json={"name": "after"}), 503, "database_unavailable")
        assert "replaced or removed under the running service" in error["message"], error
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "restart the service" in ready.text, ready.text


def answer_to(exc: Exception) -> Any:
    """The service's answer to a request whose route raised `exc`."""
    from fastapi import FastAPI

    from orchestrator.api.errors import install

    app = FastAPI()
    install(app)

    @app.post("/write")
    def write() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False).post("/write")


def test_a_database_that_takes_no_writes_is_a_503_to_retry_not_a_500(tmp_path: Any) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from orchestrator.db import refuses_writes, transient

    # SQLite's own SQLITE_READONLY, as a file or mount made read-only under the service gives it.
    path = tmp_path / "read-only.db"
    with create_engine(f"sqlite:///{path}").begin() as c:
        c.exec_driver_sql("CREATE TABLE t (n INTEGER)")
    engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    with pytest.raises(OperationalError) as raised, engine.begin() as c:
        c.exec_driver_sql("INSERT INTO t VALUES (1)")
    engine.dispose()
    refused = raised.value
    # Waited out (a job's end must not be lost to it), and told as what it is.
    assert refuses_writes(refused) and transient(refused)
    response = answer_to(refused)
    error = assert_error(response, 503, "database_unavailable")
    assert "takes no writes" in error["message"] and "nothing was written" in error["message"], error
    assert response.headers["retry-after"] == "5"


def test_a_full_disk_is_a_503_that_says_so(tmp_path: Any) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from orchestrator.db import disk_full, transient

    # SQLite's own SQLITE_FULL: a database held to the pages it has, then asked for more.
    engine = create_engine(f"sqlite:///{tmp_path / 'full.db'}")
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (b BLOB)")
    with pytest.raises(OperationalError) as raised, engine.begin() as c:
        c.exec_driver_sql(f"PRAGMA max_page_count = {c.exec_driver_sql('PRAGMA page_count').scalar()}")
        c.exec_driver_sql("INSERT INTO t VALUES (zeroblob(100000))")
    engine.dispose()
    full = raised.value
    # Waited out like a database that does not answer (a job's end must not be lost to it)...
    assert disk_full(full) and transient(full)
    # ... but told as what it is, not as a database that did not answer in time.
    response = answer_to(full)
    assert_error(response, 503, "storage_full")
    assert "disk is full" in response.json()["error"]["message"] and response.headers["retry-after"] == "60"


def test_a_connection_lost_under_the_pool_s_pre_ping_is_a_503_to_send_again() -> None:
    """psycopg cannot reset a pooled connection whose socket closed under SQLAlchemy's pre-ping,
    and says so as a ProgrammingError: seen with connections killed on PostgreSQL, the request got
    a 500 'internal_error' (a bug), and a job's end would not have waited it out."""
    import psycopg
    from fastapi import FastAPI
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    from orchestrator.api.errors import install
    from orchestrator.db import transient

    lost = ProgrammingError("SELECT 1", {}, psycopg.ProgrammingError(
        "can't change 'autocommit' now: connection in transaction status ACTIVE"))
    refused = ProgrammingError("SELECT x FROM nowhere", {},
                               psycopg.ProgrammingError('relation "nowhere" does not exist'))
    assert transient(lost) and not transient(refused)
    assert not transient(IntegrityError("INSERT", {}, psycopg.IntegrityError("duplicate key")))
    app = FastAPI()
    install(app)

    @app.get("/lost")
    def lost_route() -> None:
        raise lost

    @app.get("/refused")
    def refused_route() -> None:
        raise refused

    client = TestClient(app, raise_server_exceptions=False)
    assert_error(client.get("/lost"), 503, "database_unavailable")
    assert_error(client.get("/refused"), 500, "internal_error")


# "-0" (a 0 written with a minus, as "+0" is one with a plus) was read as step 0 once a minus was let
# through to the range, which takes 0.
@pytest.mark.parametrize("step", ["abc", "-1", "1.5", "-0", "+0"])
def test_a_preview_s_step_is_a_step_number(shared_server: httpx.Client, finished_job: dict[str, Any],
                                           step: str) -> None:
    error = assert_error(shared_server.get(f"/v1/jobs/{finished_job['id']}/preview", params={"step": step}),
                         422, "invalid_request")
    assert error["details"]["errors"][0]["loc"] == ["query", "step"]
    # A step number is only a cache key: a finished job has no preview, whichever step is named.
    assert_error(shared_server.get(f"/v1/jobs/{finished_job['id']}/preview", params={"step": 3}), 404, "not_found")


def test_a_whole_number_written_as_a_float_is_that_number(shared_server: httpx.Client, project: str) -> None:
    """JSON Schema (and the API document) count 64.0 as an integer: a client computing sizes as
    floats sends it. A fraction stays refused (`n: 1.5` above)."""
    explained = shared_server.post("/v1/route/explain", json={
        "stage": "ideation", "project_id": project, "prompt": "x", "n": 2.0, "width": 64.0, "height": 72.0,
        "steps": 1.0, "seed": 7.0})
    assert explained.status_code == 200, explained.text
    params = explained.json()["params"]
    assert [(params[k], type(params[k])) for k in ("n", "width", "height", "steps", "seed")] == [
        (2, int), (64, int), (72, int), (1, int), (7, int)]
    assert_error(post_drafts(shared_server, project, {"prompt": "x", "seed": 1e30}), 422, "invalid_request")


def test_a_refused_size_the_client_did_not_send_is_placed_on_the_field_it_sent(shared_server: httpx.Client,
                                                                             project: str) -> None:
    """A polish's size comes from its scale: `details.errors` must not point at a `width` the
    body never had, but at the scale (it was on no field)."""
    [draft] = run_draft(shared_server, project, n=1, width=512, height=512, steps=1)["assets"]
    error = assert_error(shared_server.post(f"/v1/assets/{draft}/polish", json={"scale": 8, "engine": "local-hifi"}),
                         422, "invalid_request")
    assert "4096" in error["message"]
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", "scale"]]



class _Rule(Strict):
    limit: int = 0


class _RulesBody(Strict):
    """A body of a plug-in or a later version: models in a list, and under an alias."""
    rules: list[_Rule] = []
    first_rule: _Rule | None = Field(None, alias="firstRule")


def test_a_misspelt_field_in_a_list_item_or_under_an_alias_is_told_with_the_name_meant() -> None:
    # pydantic's locations reach the handler as strings: a list index or an alias stopped the search.
    from fastapi import FastAPI

    from orchestrator.api import errors

    app = FastAPI()
    errors.install(app)

    @app.post("/rules")
    def rules(body: _RulesBody) -> dict[str, str]:
        return {}

    cases = (({"rules": [{"limit": 1}, {"limt": 2}]}, "unknown field 'rules.1.limt'; did you mean 'limit'?"),
             ({"firstRule": {"limt": 2}}, "unknown field 'firstRule.limt'; did you mean 'limit'?"))
    with TestClient(app) as client:
        for body, told in cases:
            assert assert_error(client.post("/rules", json=body), 422, "invalid_request")["message"] == told


def test_the_scales_a_refusal_names_as_fitting_all_fit_a_limit_off_the_multiple_of_8() -> None:
    # ORCH_LOCAL_MAX_SIZE=1022: 7.984 was named as fitting a 128 px source, which made it 1022 px
    # exactly, rounded to 1024, and refused.
    from types import SimpleNamespace

    from orchestrator.jobs import _fitting, _round_to

    source = SimpleNamespace(width=128, height=128)
    fits = _fitting(source, "scale", 64, 1022, 1022)  # type: ignore[arg-type]
    assert fits is not None
    assert _round_to(128 * fits[1], 8) <= 1022 and fits[1] == 7.937
    # A width or height given: ORCH_LOCAL_MAX_SIZE=300 named a width of 200 as fitting a 64x96
    # source, whose height that makes 300 exactly, rounded to 304 and refused in turn.
    tall = SimpleNamespace(width=64, height=96)
    for field, ratio in (("width", 1.5), ("height", 1 / 1.5)):
        fits = _fitting(tall, field, 64, 300, 300)  # type: ignore[arg-type]
        assert fits is not None
        assert fits[1] <= 296 and _round_to(fits[1] * ratio, 8) <= 300, (field, fits)


def test_a_database_emptied_under_the_service_says_so_not_internal_error(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        caplog: pytest.LogCaptureFixture) -> None:
    """The first step of a restore (drop, create, load) under a running service: each request was
    a 500 'internal_error' (a bug) with a traceback in the log."""
    settings = make_settings()
    client = start_server(settings)
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        db.execute("DROP TABLE idempotency_keys")
    with caplog.at_level(logging.ERROR, logger="orchestrator.api.errors"):
        response = client.post("/v1/projects", json={"name": "after the drop"}, headers={"Idempotency-Key": "k1"})
    error = assert_error(response, 503, "database_unavailable")
    assert "lacks some or all of this service's tables" in error["message"]
    assert "orchestrator migrate" in error["message"]
    with caplog.at_level(logging.ERROR, logger="orchestrator.api.errors"):
        for n in range(5):  # clients sending again: told once, not a line each
            assert_error(client.post("/v1/projects", json={"name": "again"}, headers={"Idempotency-Key": f"k{n}"}),
                         503, "database_unavailable")
    told = [r for r in caplog.records if "lacks some or all of this service's tables" in r.getMessage()]
    assert len(told) == 1 and told[0].exc_info is None, [r.getMessage() for r in told]
    # Nor is it ready: it serves nothing (a `SELECT 1` said it was).
    not_ready = assert_error(client.get("/readyz"), 503, "database_unavailable")
    assert not_ready["message"] == ("the database lacks some or all of this service's tables (made anew, "
                                    "or a restore under way)")


def test_requests_failed_by_the_database_are_told_once_then_a_line_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy.exc import OperationalError

    from orchestrator.api.errors import RequestsOutage

    now = [1000.0]
    outage = RequestsOutage(clock=lambda: now[0])
    away = OperationalError("SELECT 1", {}, Exception("database is locked"))
    with caplog.at_level(logging.DEBUG, logger="orchestrator.api.errors"):
        for _ in range(100):
            outage.failed(away)
            now[0] += 0.5  # 50 s of requests failing
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and "the database is away: " in warned[0].getMessage()
        now[0] += 10
        outage.failed(away)  # a minute on: a reminder that counts them
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 2 and "still failing (101 tries in 60 s)" in warned[1].getMessage(), warned[1]
        now[0] += 61  # a quiet minute: the outage was over, the next failure is a new one's first
        outage.failed(away)
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 3 and "the database is away" in warned[2].getMessage()


def test_an_error_echoes_a_made_up_name_cut_short(shared_server: httpx.Client, project: str) -> None:
    # An unknown policy, engine or field was sent back whole, up to three times: a 900 KB name
    # made a 2.7 MB answer.
    long, jobs = "p" * 50_000, job_count(shared_server)
    for response, echoed in [
        (shared_server.post("/v1/projects", json={"name": "x", "policy": long}), "policy"),
        (post_drafts(shared_server, project, {"prompt": "a lighthouse", "engine": long}), "engine"),
        (post_drafts(shared_server, project, {"prompt": "a lighthouse", long: 1}), None),
    ]:
        assert response.status_code == 422 and len(response.content) < 3_000, response.content[:300]
        error = response.json()["error"]
        assert "p" * 100 + "…" in error["message"] + str(error["details"].get("errors"))
        if echoed is not None:
            assert error["details"][echoed] == "p" * 100 + "…"
    # And one named in the path (a request's head holds 32 KiB): `GET /v1/policies/{name}` sent it back whole, twice.
    response = shared_server.get(f"/v1/policies/{long[:8000]}")
    assert response.status_code == 404 and len(response.content) < 3_000, response.content[:300]
    assert response.json()["error"]["details"]["policy"] == "p" * 100 + "…"
    assert job_count(shared_server) == jobs


@pytest.mark.parametrize("types", [("application/json", "text/plain"), ("text/plain", "application/json"),
                                   ("application/json", "application/json")])
def test_a_request_with_two_content_types_is_refused(
        shared_server: httpx.Client, project: str, types: tuple[str, str]) -> None:
    # The first was read: a proxy or log reading the last one saw text/plain where a job ran.
    jobs = job_count(shared_server)
    response = shared_server.post(f"/v1/projects/{project}/drafts", content=b'{"prompt": "a lighthouse"}',
                                  headers=[("Content-Type", types[0]), ("Content-Type", types[1])])
    assert "one Content-Type header" in assert_error(response, 400, "invalid_request")["message"]
    assert job_count(shared_server) == jobs
