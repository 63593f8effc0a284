"""Policies over REST: listing, reading, reloading, per-project policies and `POST /v1/route/explain`."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.api import serve_process, wait_for_log, worker_process
from tests.routing import (
    FAKE_B_PRICE,
    assert_error,
    create_project,
    ledger,
    promote,
    run_draft,
    submit,
    wait_for_job,
)
from tests.routing.conftest import FAKE_ENGINES, SettingsFactory, routing_policy, running, write_policies

BUILTINS = {"balanced", "budget-saver", "cloud-first", "local-only"}
PAID_FIRST = routing_policy(
    "paid-first", ["fake-paid", "local-hifi"], reason="the paid fake first",
    description="Bridge and polish on fake-paid, local-hifi after it.")
ALT = """
name = "alt"
description = "Everything after drafts on local-hifi."

[[rules]]
name = "drafts"
match = { stage = "ideation" }
engines = ["lite"]

[[rules]]
name = "alt-local"
match = { stage = ["bridge", "polish"] }
engines = ["local-hifi"]
reason = "the alternative policy"
"""


@pytest.fixture(scope="module")
def api(new_settings: SettingsFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    folder = write_policies(tmp_path_factory.mktemp("policies"), {"paid-first": PAID_FIRST, "alt": ALT})
    with running(new_settings(engines=FAKE_ENGINES, policy="paid-first", policy_dir=folder)) as client:
        yield client


@pytest.fixture(scope="module")
def draft(api: httpx.Client) -> dict[str, Any]:
    """A project (budget 100 credits, policy paid-first) and its one draft asset."""
    project = create_project(api, "explain", budget={"limit": 100, "period": "month"})
    asset_id = run_draft(api, project["id"])["assets"][0]
    return {"project_id": project["id"], "asset_id": asset_id}


def jobs_of(client: httpx.Client, project_id: str) -> list[dict[str, Any]]:
    response = client.get("/v1/jobs", params={"project_id": project_id, "limit": 500})
    assert response.status_code == 200
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# -- reading --------------------------------------------------------------------------------------


def test_policies_page_like_every_list(api: httpx.Client) -> None:
    everything = [p["name"] for p in api.get("/v1/policies").json()["items"]]
    assert everything == sorted(everything) and len(everything) > 2
    seen: list[str] = []
    cursor = None
    while True:
        page = api.get("/v1/policies", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [p["name"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == everything
    # Z to A with ?order=desc, as other lists take it (it was let through, and listed A to Z).
    backwards: list[str] = []
    cursor = None
    while True:
        page = api.get("/v1/policies", params={"limit": 2, "order": "desc",
                                               **({"cursor": cursor} if cursor else {})}).json()
        backwards += [p["name"] for p in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert backwards == everything[::-1]
    assert_error(api.get("/v1/policies", params={"order": "newest"}), 422, "invalid_request")
    assert_error(api.get("/v1/policies", params={"limit": 0}), 422, "invalid_request")
    # As every list: a cursor that is no policy name is refused, not a page starting somewhere.
    for cursor in ("Balanced", "garbage!", "../balanced", "a" * 65):
        error = assert_error(api.get("/v1/policies", params={"cursor": cursor}), 422, "invalid_request")
        assert error["details"]["cursor"] == cursor


def test_list_policies(api: httpx.Client) -> None:
    response = api.get("/v1/policies")
    assert response.status_code == 200
    body = response.json()
    assert body["errors"] == [] and body["warnings"] == []
    assert body["next_cursor"] is None  # API.md's list shape: all of them fit the default page
    items = {p["name"]: p for p in body["items"]}
    assert set(items) == BUILTINS | {"paid-first", "alt"}
    for name in BUILTINS:
        assert items[name]["source"] == "builtin"
        assert items[name]["description"]
    assert items["paid-first"]["source"].endswith("paid-first.toml")
    for item in items.values():
        assert re.fullmatch(r"[0-9a-f]{16}", item["content_hash"])
    assert [p["name"] for p in body["items"]] == sorted(items)


def test_get_builtin_policy(api: httpx.Client) -> None:
    response = api.get("/v1/policies/balanced")
    assert response.status_code == 200
    policy = response.json()
    assert policy["name"] == "balanced" and policy["source"] == "builtin"
    listed = {p["name"]: p for p in api.get("/v1/policies").json()["items"]}
    assert policy["content_hash"] == listed["balanced"]["content_hash"]
    rules = {r["name"]: r for r in policy["rules"]}
    assert list(rules) == ["drafts", "private", "soft-budget", "cheapest", "fallback"]
    assert rules["drafts"]["engines"] == ["lite"] and rules["drafts"]["match"]["stage"] == ["ideation"]
    assert rules["private"]["private"] is True
    assert rules["soft-budget"]["match"]["budget_used_over"] == 0.8
    assert rules["cheapest"]["strategy"] == "cheapest" and "local-hifi" in rules["cheapest"]["engines"]
    assert "deny" in rules["fallback"] and "engines" not in rules["fallback"]


def test_get_unknown_policy_is_404(api: httpx.Client) -> None:
    error = assert_error(api.get("/v1/policies/nope"), 404, "not_found")
    assert "nope" in error["message"]


# -- projects and their policy --------------------------------------------------------------------


def test_unknown_policy_on_a_project_is_422(api: httpx.Client) -> None:
    error = assert_error(api.post("/v1/projects", json={"name": "x", "policy": "no-such-policy"}),
                         422, "invalid_request")
    assert "no-such-policy" in error["message"]
    assert "balanced" in error["details"]["known"]
    project = create_project(api, "patch me")
    assert project["policy"] == "paid-first"  # the service's default (ORCH_POLICY)
    assert_error(api.patch(f"/v1/projects/{project['id']}", json={"policy": "no-such-policy"}), 422, "invalid_request")
    assert api.get(f"/v1/projects/{project['id']}").json()["policy"] == "paid-first"
    # An unknown project is told first, whatever the body holds.
    assert_error(api.patch("/v1/projects/prj_nope", json={"policy": "no-such-policy"}), 404, "not_found")


def test_changing_the_policy_affects_new_jobs_only(api: httpx.Client) -> None:
    project = create_project(api, "switch", policy="paid-first")
    asset_id = run_draft(api, project["id"])["assets"][0]
    # Job A holds fake-paid until it is cancelled, so it is still running when the policy changes.
    before = promote(api, asset_id, tags={"fake": "hang"})
    assert before["engine"] == "fake-paid" and before["routing"]["policy"] == "paid-first"
    wait_for_job(api, before["id"], ("running",))

    response = api.patch(f"/v1/projects/{project['id']}", json={"policy": "alt"})
    assert response.status_code == 200 and response.json()["policy"] == "alt"

    after = promote(api, asset_id)
    assert after["engine"] == "local-hifi"
    assert (after["routing"]["policy"], after["routing"]["rule"]) == ("alt", "alt-local")
    assert wait_for_job(api, after["id"])["status"] == "succeeded"

    still = api.get(f"/v1/jobs/{before['id']}").json()
    assert still["status"] == "running" and still["engine"] == "fake-paid"
    assert still["routing"] == before["routing"]
    assert api.post(f"/v1/jobs/{before['id']}/cancel").status_code == 202
    assert wait_for_job(api, before["id"])["status"] == "canceled"


# -- explain --------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    {"strength": 0.5},
    {"strength": 0.6, "tags": {"privacy": "local"}},
    {"strength": 0.7, "engine": "local-hifi"},
    {"strength": 0.8, "width": 128, "height": 64, "quality": "low"},
], ids=["policy-decides", "private", "requested", "sized"])
def test_explain_bridge_matches_the_job(api: httpx.Client, draft: dict[str, Any], body: dict[str, Any]) -> None:
    project_id, asset_id = draft["project_id"], draft["asset_id"]
    jobs_before, ledger_before = jobs_of(api, project_id), ledger(api, project_id)
    response = api.post("/v1/route/explain", json={"project_id": project_id, "stage": "bridge",
                                                   "source_asset_id": asset_id, "steps": 2, **body})
    assert response.status_code == 200, response.text
    explained = response.json()
    assert jobs_of(api, project_id) == jobs_before
    assert ledger(api, project_id) == ledger_before
    assert explained["project_id"] == project_id and explained["stage"] == "bridge"
    assert "source_sha256" not in explained["params"]

    job = promote(api, asset_id, **body)
    assert job["routing"] == explained["routing"]
    assert job["engine"] == explained["engine"] == explained["routing"]["chosen"]
    assert job["cost"]["estimated"] == explained["estimate"]
    assert wait_for_job(api, job["id"])["status"] == "succeeded"


def test_explain_draft_and_polish_match_the_jobs(api: httpx.Client, draft: dict[str, Any]) -> None:
    project_id, asset_id = draft["project_id"], draft["asset_id"]
    draft_body = {"prompt": "a harbour", "n": 2, "width": 64, "height": 64, "steps": 1}
    explained = api.post("/v1/route/explain", json={"project_id": project_id, "stage": "ideation", **draft_body})
    assert explained.status_code == 200, explained.text
    job = submit(api, f"/v1/projects/{project_id}/drafts", draft_body)
    assert job["routing"] == explained.json()["routing"]
    assert explained.json()["engine"] == "lite" and explained.json()["estimate"] == 0

    polish_body = {"scale": 2, "creativity": 0.4, "cache": False}
    explained = api.post("/v1/route/explain", json={"stage": "polish", "source_asset_id": asset_id, **polish_body})
    assert explained.status_code == 200, explained.text
    assert explained.json()["params"]["width"] == 128
    refine = api.post("/v1/route/explain", json={"stage": "polish", "source_asset_id": asset_id, "scale": None})
    assert refine.status_code == 200, refine.text
    assert (refine.json()["params"]["width"], refine.json()["params"]["height"]) == (64, 64)  # the source's size
    job = submit(api, f"/v1/assets/{asset_id}/polish", polish_body)
    assert job["routing"] == explained.json()["routing"]
    assert job["engine"] == "fake-paid" and explained.json()["estimate"] == 10.0
    for job in jobs_of(api, project_id):
        wait_for_job(api, job["id"])


PAID_DRAFTS = """
name = "paid-drafts"
description = "Drafts on a priced engine."

[[rules]]
name = "everything"
match = {}
engines = ["paid-drafts"]
"""


def paid_drafts_settings(new_settings: SettingsFactory, tmp_path: Path, policy: str) -> Settings:
    """A service whose default policy, `policy`, drafts on the paid `paid-drafts` engine."""
    folder = write_policies(tmp_path / "policies", {"paid-drafts": policy})
    return new_settings(engines="paid-drafts=tests.routing:paid_drafts_factory", policy="paid-drafts",
                        policy_dir=folder)


def test_explain_draft_honours_the_project_s_cache_as_the_job_does(new_settings: SettingsFactory,
                                                                   tmp_path: Path) -> None:
    with running(paid_drafts_settings(new_settings, tmp_path, PAID_DRAFTS)) as client:
        project_id = create_project(client, "paid drafts", budget={"limit": 100, "period": "month"})["id"]
        body = {"prompt": "a lighthouse", "n": 1, "width": 64, "height": 64, "steps": 1, "seed": 11}
        first = submit(client, f"/v1/projects/{project_id}/drafts", body)
        assert wait_for_job(client, first["id"])["status"] == "succeeded"

        def explain(**extra: Any) -> dict[str, Any]:
            response = client.post("/v1/route/explain",
                                   json={"project_id": project_id, "stage": "ideation", **body, **extra})
            assert response.status_code == 200, response.text
            explained: dict[str, Any] = response.json()
            return explained

        hit, fresh = explain(), explain(cache=False)
        assert (hit["engine"], hit["cache_hit"], hit["estimate"]) == ("paid-drafts", True, 0.0)
        # Once explained as a free copy whatever the body said, while the job itself was charged.
        assert (fresh["cache_hit"], fresh["estimate"]) == (False, FAKE_B_PRICE)
        again = submit(client, f"/v1/projects/{project_id}/drafts", {**body, "cache": False})
        assert again["cost"]["cache_hit"] is False and again["cost"]["estimated"] == fresh["estimate"]
        assert wait_for_job(client, again["id"])["status"] == "succeeded"

        # Another project (another client) asking the same is not handed the first one's image.
        project_id = create_project(client, "another client", budget={"limit": 100, "period": "month"})["id"]
        assert explain()["cache_hit"] is False
        other = submit(client, f"/v1/projects/{project_id}/drafts", body)
        assert other["cost"]["cache_hit"] is False and other["cost"]["estimated"] == FAKE_B_PRICE
        done = wait_for_job(client, other["id"])
        assert done["status"] == "succeeded"
        assert client.get(f"/v1/assets/{done['assets'][0]}").json()["project_id"] == project_id


def test_savings_count_the_drafts_a_local_engine_rendered_only(new_settings: SettingsFactory,
                                                                 tmp_path: Path) -> None:
    """A paid engine's drafts (which cost what they cost) and free copies of them were counted as
    local drafts saved: a dashboard showed 40 credits saved on drafts that cost 40."""
    policy = PAID_DRAFTS.replace('engines = ["paid-drafts"]', 'engines = ["lite", "paid-drafts"]')
    with running(paid_drafts_settings(new_settings, tmp_path, policy)) as client:
        project_id = create_project(client, "savings", budget={"limit": 100, "period": "month"})["id"]
        body = {"prompt": "a lighthouse", "n": 2, "width": 64, "height": 64, "steps": 1, "seed": 11}
        local = submit(client, f"/v1/projects/{project_id}/drafts", {**body, "n": 1})
        assert wait_for_job(client, local["id"])["engine"] == "lite"

        def savings() -> dict[str, Any]:
            found: dict[str, Any] = client.get("/v1/spend", params={"project_id": project_id}).json()["savings"]
            return found

        before = savings()
        assert (before["drafts"], before["compared_with"]) == (1, "paid-drafts")
        paid = submit(client, f"/v1/projects/{project_id}/drafts", {**body, "engine": "paid-drafts", "cache": True})
        assert wait_for_job(client, paid["id"])["status"] == "succeeded"
        copy = submit(client, f"/v1/projects/{project_id}/drafts", {**body, "engine": "paid-drafts", "cache": True})
        assert copy["cost"]["cache_hit"] is True
        assert savings() == before


@pytest.mark.parametrize(("body", "status", "code"), [
    ({}, 422, "invalid_request"),
    ({"stage": "sideways", "project_id": "{project}"}, 422, "invalid_request"),
    ({"stage": "ideation", "prompt": "x"}, 422, "invalid_request"),  # no project
    ({"stage": "ideation", "project_id": "", "prompt": "x"}, 422, "invalid_request"),
    ({"stage": "ideation", "project_id": "{project}"}, 422, "invalid_request"),  # no prompt
    ({"stage": "ideation", "project_id": "{project}", "prompt": "x", "width": 65}, 422, "invalid_request"),
    ({"stage": "ideation", "project_id": "{project}", "prompt": "x", "bogus": 1}, 422, "invalid_request"),
    ({"stage": "bridge", "project_id": "{project}"}, 422, "invalid_request"),  # no source asset
    ({"stage": "bridge", "source_asset_id": "{asset}", "strength": 2}, 422, "invalid_request"),
    ({"stage": "polish", "source_asset_id": "{asset}", "scale": 0}, 422, "invalid_request"),
    ({"stage": "ideation", "project_id": "{project}", "source_asset_id": "{asset}", "prompt": "x"}, 422,
     "invalid_request"),  # once silently ignored
    ({"stage": "ideation", "project_id": "prj_missing", "prompt": "x"}, 404, "not_found"),
    ({"stage": "bridge", "source_asset_id": "ast_missing"}, 404, "not_found"),
    ({"stage": "bridge", "source_asset_id": "{asset}", "engine": "lite"}, 422, "no_route"),
    ({"stage": "bridge", "source_asset_id": "{asset}", "max_credits": 1}, 402, "budget_exceeded"),
])
def test_explain_refusals(api: httpx.Client, draft: dict[str, Any], body: dict[str, Any], status: int,
                          code: str) -> None:
    values = {k: v.format(project=draft["project_id"], asset=draft["asset_id"]) if isinstance(v, str) else v
              for k, v in body.items()}
    ledger_before = ledger(api, draft["project_id"])
    error = assert_error(api.post("/v1/route/explain", json=values), status, code)
    assert ledger(api, draft["project_id"]) == ledger_before
    if code == "invalid_request":  # each names the field, as the schema's own refusals do
        assert all(e["loc"][:1] == ["body"] and len(e["loc"]) > 1 for e in error["details"]["errors"]), error


def test_explain_names_the_project_an_asset_of_another_belongs_to(api: httpx.Client, draft: dict[str, Any]) -> None:
    # Both ids exist: once a 404 "not found", which read as a mistyped id.
    other = api.post("/v1/projects", json={"name": "explain other"}).json()["id"]
    error = assert_error(api.post("/v1/route/explain", json={
        "stage": "polish", "source_asset_id": draft["asset_id"], "project_id": other}), 422, "invalid_request")
    assert f"belongs to project '{draft['project_id']}', not '{other}'" in error["message"]
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", "project_id"]]
    # A project that does not exist is a 404, as for the ideation stage.
    missing = "prj_0000000000zzzzzzzzzzzzzz"
    for stage in ("polish", "ideation"):
        body = {"stage": stage, "project_id": missing, **(
            {"source_asset_id": draft["asset_id"]} if stage == "polish" else {"prompt": "x"})}
        assert_error(api.post("/v1/route/explain", json=body), 404, "not_found")


def test_explain_tells_errors_and_seeds_as_the_stage_s_post_does(api: httpx.Client, draft: dict[str, Any]) -> None:
    project_id = draft["project_id"]
    body = {"prompt": "x", "n": 99, "width": 64, "height": 64}
    explained = api.post("/v1/route/explain", json={"project_id": project_id, "stage": "ideation", **body})
    posted = api.post(f"/v1/projects/{project_id}/drafts", json=body)
    assert assert_error(explained, 422, "invalid_request") == assert_error(posted, 422, "invalid_request")
    # Without a seed the job draws its own: explain names none rather than one the job will not use.
    fine = api.post("/v1/route/explain", json={"project_id": project_id, "stage": "ideation", **body, "n": 1})
    assert fine.status_code == 200 and fine.json()["params"]["seed"] is None, fine.text
    seeded = api.post("/v1/route/explain", json={"project_id": project_id, "stage": "ideation", **body, "n": 1,
                                                 "seed": 7})
    assert seeded.json()["params"]["seed"] == 7


def test_explain_not_json_is_400(api: httpx.Client) -> None:
    response = api.post("/v1/route/explain", content=b"{", headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request")


# -- reloading ------------------------------------------------------------------------------------

CUSTOM_V1 = """
name = "custom"

[[rules]]
name = "drafts"
match = { stage = "ideation" }
engines = ["lite"]
reason = "version one"

[[rules]]
name = "polish"
match = { stage = ["bridge", "polish"] }
engines = ["local-hifi"]
"""
CUSTOM_BAD = CUSTOM_V1.replace('engines = ["local-hifi"]', 'engines = ["local-hifi"]\nstrategy = "quickest"')
CUSTOM_V2 = CUSTOM_V1.replace("version one", "version two")
TYPO = 'name = "typo"\n\n[[rules]]\nname = "wide"\nmatch = { width_over = "512" }\nengines = ["lite"]\n'


@pytest.fixture
def reload_api(new_settings: SettingsFactory, tmp_path: Path) -> Iterator[tuple[httpx.Client, Path]]:
    folder = write_policies(tmp_path / "policies", {"custom": CUSTOM_V1})
    with running(new_settings(policy_dir=folder)) as client:
        yield client, folder


def explain_draft(client: httpx.Client, project_id: str) -> dict[str, Any]:
    response = client.post("/v1/route/explain", json={"project_id": project_id, "stage": "ideation",
                                                      "prompt": "x", "n": 1, "width": 64, "height": 64})
    assert response.status_code == 200, response.text
    routing: dict[str, Any] = response.json()["routing"]
    return routing


def test_bad_file_is_refused_and_the_last_good_version_stays(reload_api: tuple[httpx.Client, Path]) -> None:
    client, folder = reload_api
    good = client.get("/v1/policies/custom").json()
    assert good["rules"][0]["reason"] == "version one"
    project = create_project(client, "custom", policy="custom")
    assert explain_draft(client, project["id"])["policy_hash"] == good["content_hash"]

    (folder / "custom.toml").write_text(CUSTOM_BAD)
    response = client.post("/v1/policies/reload")
    assert response.status_code == 200
    body = response.json()
    assert "custom" in body["loaded"]
    assert len(body["errors"]) == 1
    message = body["errors"][0]
    assert "custom.toml" in message and "rule 2 ('polish')" in message and "strategy" in message
    assert "quickest" in message
    assert client.get("/v1/policies").json()["errors"] == body["errors"]
    # The last good version stays in service, for reading and for routing.
    assert client.get("/v1/policies/custom").json() == good
    routing = explain_draft(client, project["id"])
    assert routing["policy_hash"] == good["content_hash"] and routing["reason"] == "version one"

    # A file that never loaded is refused and stays absent.
    (folder / "typo.toml").write_text(TYPO)
    body = client.post("/v1/policies/reload").json()
    assert "typo" not in body["loaded"]
    typo = [m for m in body["errors"] if "typo.toml" in m]
    assert len(typo) == 1 and "rule 1 ('wide')" in typo[0] and "width_over" in typo[0]
    assert_error(client.post("/v1/projects", json={"name": "t", "policy": "typo"}), 422, "invalid_request")

    # Fixed files load on the next reload, and the next decision uses the new version.
    (folder / "custom.toml").write_text(CUSTOM_V2)
    (folder / "typo.toml").unlink()
    body = client.post("/v1/policies/reload").json()
    assert body["errors"] == []
    fixed = client.get("/v1/policies/custom").json()
    assert fixed["content_hash"] != good["content_hash"]
    routing = explain_draft(client, project["id"])
    assert routing["policy_hash"] == fixed["content_hash"] and routing["reason"] == "version two"


def test_every_process_of_a_service_takes_a_changed_policy_file(new_settings: SettingsFactory,
                                                                  tmp_path: Path) -> None:
    """A reload asked of one API server reached only it: another routed the same project on the
    old rules (and refused a new policy's projects). Each process reloads on the files' change."""
    folder = write_policies(tmp_path / "policies", {"custom": CUSTOM_V1})
    settings = new_settings(policy_dir=folder, poll_interval=0.1)
    with running(settings) as first, running(settings) as second:
        project = create_project(first, "custom", policy="custom")
        (folder / "custom.toml").write_text(CUSTOM_V2)
        write_policies(folder, {"alt": ALT})
        deadline = time.monotonic() + 30
        for client in (first, second):  # no reload asked of either
            while (explain_draft(client, project["id"])["reason"] != "version two"
                   or "alt" not in {p["name"] for p in client.get("/v1/policies").json()["items"]}):
                assert time.monotonic() < deadline, "a process never took the changed files"
                time.sleep(0.05)  # poll interval while the watcher looks
        assert create_project(second, "alt", policy="alt")["policy"] == "alt"


def test_a_service_without_a_policy_dir_takes_a_changed_shipped_file(
        new_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Edited in a checkout (an editable install), the shipped files were watched by no process
    # without ORCH_POLICY_DIR: each kept the old rules until asked to reload.
    shipped = write_policies(tmp_path / "shipped", {"custom": CUSTOM_V1})
    monkeypatch.setattr("policies.loader.resources.files", lambda package: shipped)
    with running(new_settings(policy="custom", poll_interval=0.1)) as client:
        project = create_project(client, "shipped")
        assert explain_draft(client, project["id"])["reason"] == "version one"
        (shipped / "custom.toml").write_text(CUSTOM_V2)
        deadline = time.monotonic() + 30
        while explain_draft(client, project["id"])["reason"] != "version two":  # no reload asked
            assert time.monotonic() < deadline, "the service never took the changed shipped file"
            time.sleep(0.05)


def test_a_cap_no_amount_can_reach_is_refused_on_reload(reload_api: tuple[httpx.Client, Path]) -> None:
    # `max_credits = inf` once loaded (GET showed `"max_credits": null`) and then answered every bridge
    # and polish request of its projects with 500.
    client, folder = reload_api
    good = client.get("/v1/policies/custom").json()
    (folder / "custom.toml").write_text(CUSTOM_V1.replace('engines = ["local-hifi"]',
                                                          'engines = ["local-hifi"]\nmax_credits = inf'))
    body = client.post("/v1/policies/reload").json()
    assert len(body["errors"]) == 1
    assert "custom.toml" in body["errors"][0] and "rule 2 ('polish')" in body["errors"][0]
    assert "max_credits" in body["errors"][0]
    assert client.get("/v1/policies/custom").json() == good


def test_unknown_engines_are_reported_as_warnings(reload_api: tuple[httpx.Client, Path]) -> None:
    # A policy naming "Gemini" or "local_hifi" once loaded with `errors: []`, and then every request
    # it routed failed with 503 "unknown engine".
    client, folder = reload_api
    assert client.get("/v1/policies").json()["warnings"] == []
    (folder / "custom.toml").write_text(CUSTOM_V1.replace('engines = ["local-hifi"]', 'engines = ["local_hifi"]'))
    body = client.post("/v1/policies/reload").json()
    assert body["errors"] == [] and "custom" in body["loaded"]
    assert len(body["warnings"]) == 1
    warning = body["warnings"][0]
    assert "custom.toml" in warning and "rule 2 ('polish')" in warning
    assert "unknown engine 'local_hifi' (did you mean 'local-hifi'?)" in warning
    assert client.get("/v1/policies").json()["warnings"] == body["warnings"]

    (folder / "custom.toml").write_text(CUSTOM_V1)
    assert client.post("/v1/policies/reload").json()["warnings"] == []


def test_a_rule_whose_engines_serve_none_of_its_stages_is_reported(reload_api: tuple[httpx.Client, Path]) -> None:
    # The service tells the loader which stages each engine serves: lite makes no bridge or polish.
    client, folder = reload_api
    (folder / "custom.toml").write_text(CUSTOM_V1.replace('engines = ["local-hifi"]', 'engines = ["lite"]'))
    body = client.post("/v1/policies/reload").json()
    assert body["errors"] == [] and len(body["warnings"]) == 1, body
    assert "rule 2 ('polish')" in body["warnings"][0] and "none of its engines (lite) serves" in body["warnings"][0]
    (folder / "custom.toml").write_text(CUSTOM_V1)
    assert client.post("/v1/policies/reload").json()["warnings"] == []


def test_unknown_engines_are_logged_at_start_up(new_settings: SettingsFactory, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    folder = write_policies(tmp_path / "policy-files", {
        "custom": CUSTOM_V1.replace('engines = ["local-hifi"]', 'engines = ["local_hifi"]')})
    with caplog.at_level(logging.WARNING, logger="orchestrator.services"):
        services = Services.build(new_settings(policy_dir=folder))
    asyncio.run(services.aclose())
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("policy: ")]
    assert len(logged) == 1 and "unknown engine 'local_hifi'" in logged[0]


def test_a_reload_logs_what_it_changed_as_a_start_does(new_settings: SettingsFactory, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A reload logged the names it loaded: a typo in an engine's name, a policy gone with its file,
    a built-in back in place of an override went unsaid; and a refused new file "kept its last
    good version", which it never had."""
    folder = write_policies(tmp_path / "policy-files", {"custom": CUSTOM_V1, "alt": ALT,
                                                        "balanced": CUSTOM_V1.replace('"custom"', '"balanced"')})
    services = Services.build(new_settings(policy_dir=folder))
    try:
        (folder / "custom.toml").write_text(CUSTOM_V1.replace('engines = ["local-hifi"]', 'engines = ["local_hifi"]'))
        (folder / "alt.toml").unlink()
        (folder / "balanced.toml").unlink()
        (folder / "typo.toml").write_text(TYPO)
        with caplog.at_level(logging.INFO, logger="orchestrator.services"):
            services.reload_policies("a test")
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len([m for m in said if "unknown engine 'local_hifi'" in m]) == 1, said
        assert any(m.startswith("policy 'alt' is no longer loaded") for m in said), said
        assert any(m.startswith("policy 'balanced'") and "the built-in policy of that name routes" in m
                   for m in said), said
        assert any("refused on reload (not loaded)" in m and "typo.toml" in m for m in said), said

        caplog.clear()
        (folder / "custom.toml").write_text(CUSTOM_BAD)
        (folder / "balanced.toml").write_text(CUSTOM_BAD.replace('"custom"', '"balanced"'))
        with caplog.at_level(logging.INFO, logger="orchestrator.services"):
            services.reload_policies("a test")
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("(the last good version stays)" in m and "custom.toml" in m for m in said), said
        assert any("(the built-in policy of that name stays)" in m and "balanced.toml" in m for m in said), said
        assert not any("unknown engine" in m for m in said), said  # told once, not at each reload
    finally:
        asyncio.run(services.aclose())


def test_sighup_reloads_the_policy_files(new_settings: SettingsFactory, tmp_path: Path) -> None:
    # Not named `policies`: the server runs with `python -m` in tmp_path, where such a folder would
    # shadow the package of that name.
    folder = write_policies(tmp_path / "policy-files", {"custom": CUSTOM_V1})
    # Its watch of the files looks only once a minute: the signal is what reloads them here.
    env = {"ORCH_POLICY_DIR": str(folder), "ORCH_POLL_INTERVAL": "60"}
    with (serve_process(new_settings(), tmp_path, "sighup.log", env=env) as (proc, base),
          httpx.Client(base_url=base, timeout=30.0) as client):
        before = client.get("/v1/policies/custom").json()
        assert before["rules"][0]["reason"] == "version one"
        (folder / "custom.toml").write_text(CUSTOM_V2)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (after := client.get("/v1/policies/custom").json())["rules"][0]["reason"] != "version two":
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy files"
            time.sleep(0.05)  # poll interval while the signal is handled
        assert after["content_hash"] != before["content_hash"]
        assert proc.poll() is None  # reloaded, not stopped


def test_sighup_reloads_a_worker_s_policy_files_and_does_not_end_it(new_settings: SettingsFactory,
                                                                     tmp_path: Path) -> None:
    # A HUP sent to every unit ended each worker without a word (the signal's default).
    folder = write_policies(tmp_path / "policy-files", {"custom": CUSTOM_V1})
    env = {"ORCH_POLICY_DIR": str(folder), "ORCH_POLL_INTERVAL": "60"}
    with worker_process(new_settings(), tmp_path, "worker.log", env=env) as worker:
        worker.send_signal(signal.SIGHUP)
        wait_for_log(tmp_path / "worker.log", "policies reloaded (SIGHUP)", worker)
        assert worker.poll() is None


def test_a_policy_that_is_not_loaded_is_a_setup_error_not_a_missing_project(
        new_settings: SettingsFactory, tmp_path: Path) -> None:
    # A mistyped ORCH_POLICY once let projects be created and then answered every draft with
    # 404 not_found, which clients read as "the project is gone".
    folder = write_policies(tmp_path / "policies", {"custom": CUSTOM_V1})
    with running(new_settings(policy="balnced", policy_dir=folder)) as client:
        error = assert_error(client.post("/v1/projects", json={"name": "typo"}), 503, "no_route")
        assert "ORCH_POLICY" in error["message"] and "balanced" in error["details"]["known"]
        project = create_project(client, "named", policy="custom")
        (folder / "custom.toml").unlink()  # the project's policy disappears on the next reload
        client.post("/v1/policies/reload")
        body = {"prompt": "x", "n": 1, "width": 64, "height": 64}
        refused = client.post(f"/v1/projects/{project['id']}/drafts", json=body)
        error = assert_error(refused, 503, "no_route")
        assert "policy 'custom' is not loaded" in error["message"]
        assert "restore the policy file" in error["message"]
        # The policies loaded are not listed: a project key is answered so too.
        assert error["details"] == {"policy": "custom", "file_refused": False}
        assert "retry-after" not in refused.headers  # the operator's to fix: waiting changes nothing
        # The project written back as it was read (its policy unchanged) is taken: renamed, kept on it.
        read = client.get(f"/v1/projects/{project['id']}").json()
        renamed = client.patch(f"/v1/projects/{project['id']}", json={"name": "renamed", "policy": read["policy"]})
        assert renamed.status_code == 200, renamed.text
        assert (renamed.json()["name"], renamed.json()["policy"]) == ("renamed", "custom")
        # Another policy that is not loaded is still refused.
        assert_error(client.patch(f"/v1/projects/{project['id']}", json={"policy": "gone-too"}), 422, "invalid_request")
        # Put back with a mistake: not "restore the policy file", which is there.
        (folder / "custom.toml").write_text("rules = [\n")
        client.post("/v1/policies/reload")
        error = assert_error(client.post(f"/v1/projects/{project['id']}/drafts", json=body), 503, "no_route")
        assert error["message"] == ("the project's policy 'custom' is not loaded; its file was refused "
                                    "(GET /v1/policies says why): mend it, or set the project's policy (PATCH)")
        assert error["details"]["file_refused"] is True and str(folder) not in str(error)


def test_explain_judges_a_copy_s_bytes_against_the_quota_as_its_submit_does(new_settings: SettingsFactory,
                                                                            tmp_path: Path) -> None:
    """A copy of an earlier result adds its images' bytes: explained on the stored bytes alone, it
    was said taken (200, a cache hit) where its submit was refused 507 for them."""
    from sqlalchemy import update
    from sqlmodel import col

    from orchestrator.db import Database
    from orchestrator.models import Project

    settings = paid_drafts_settings(new_settings, tmp_path, PAID_DRAFTS)
    with running(settings) as client:
        project_id = create_project(client, "paid drafts", budget={"limit": 100, "period": "month"},
                                    storage_quota_mb=1)["id"]
        body = {"prompt": "a lighthouse", "n": 1, "width": 64, "height": 64, "steps": 1, "seed": 11}
        first = wait_for_job(client, submit(client, f"/v1/projects/{project_id}/drafts", body)["id"])
        copy_bytes = client.get(f"/v1/projects/{project_id}").json()["storage_bytes"]
        assert first["status"] == "succeeded" and copy_bytes > 0
        db = Database(settings.resolved_database_url)
        try:
            with db.transaction() as s:  # room for less than the copy: under the quota still
                s.execute(update(Project).where(col(Project.id) == project_id).values(
                    storage_bytes=2**20 - copy_bytes + 1))
        finally:
            db.dispose()
        explained = client.post("/v1/route/explain", json={"project_id": project_id, "stage": "ideation", **body})
        submitted = client.post(f"/v1/projects/{project_id}/drafts", json=body)
        for response in (explained, submitted):
            assert response.status_code == 507, response.text
            assert response.json()["error"]["details"]["job_bound_bytes"] == copy_bytes
