"""DELETE /v1/assets/{id}: a deleted asset is gone from the API (410), its row stays for its job,
the ledger and its descendants' lineage, and its file leaves the disk at the asset sweep."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore
from tests.api import assert_error
from tests.credits import (
    DRAFT,
    create_project,
    get_json,
    make_draft,
    promote_ok,
    wait_for_job,
)


def delete(api: httpx.Client, asset_id: str) -> httpx.Response:
    return api.delete(f"/v1/assets/{asset_id}")


def test_a_deleted_asset_is_gone_from_the_api_but_not_from_its_job(api: httpx.Client) -> None:
    project_id = create_project(api)
    response = api.post(f"/v1/projects/{project_id}/drafts", json={**DRAFT, "n": 2})
    job = wait_for_job(api, response.json()["id"])
    kept, deleted = job["assets"]
    assert delete(api, deleted).status_code == 204

    error = assert_error(api.get(f"/v1/assets/{deleted}"), 410, "gone")
    assert error["details"]["asset_id"] == deleted and error["details"]["deleted_at"].endswith("Z")
    # Served from memory until now (just made): not any more.
    assert_error(api.get(f"/v1/assets/{deleted}/content"), 410, "gone")
    assert_error(api.get(f"/v1/assets/{deleted}/lineage"), 410, "gone")
    assert_error(promote_response(api, deleted), 410, "gone")
    assert_error(api.post("/v1/route/explain", json={"project_id": project_id, "stage": "bridge",
                                                      "source_asset_id": deleted, "engine": "fake-paid"}), 410, "gone")
    listed = get_json(api, f"/v1/projects/{project_id}/assets")["items"]
    assert [a["id"] for a in listed] == [kept]
    # The job made it: its list does not change under a client that pages through it.
    assert get_json(api, f"/v1/jobs/{job['id']}")["assets"] == [kept, deleted]
    assert api.get(f"/v1/assets/{kept}/content").status_code == 200
    assert delete(api, deleted).status_code == 204  # again: nothing more to do
    assert_error(delete(api, "ast_nonexistent"), 404, "not_found")


def promote_response(api: httpx.Client, asset_id: str) -> httpx.Response:
    return api.post(f"/v1/assets/{asset_id}/promote", json={"engine": "fake-paid", "cache": False})


def test_the_lineage_of_a_descendant_lists_its_deleted_parent(api: httpx.Client) -> None:
    project_id = create_project(api)
    draft = make_draft(api, project_id)
    child = wait_for_job(api, promote_ok(api, draft)["id"])["assets"][0]
    assert delete(api, draft).status_code == 204
    lineage = get_json(api, f"/v1/assets/{child}/lineage")
    [parent] = lineage["ancestors"]
    assert parent["id"] == draft and parent["deleted_at"] is not None
    assert lineage["asset"]["deleted_at"] is None


def test_an_asset_an_unfinished_job_starts_from_cannot_be_deleted(api: httpx.Client, tmp_path: Path) -> None:
    project_id = create_project(api)
    draft = make_draft(api, project_id)
    until = tmp_path / "send"
    waiting = promote_ok(api, draft, tags={"fake": "wait-before-send", "until": str(until)})
    error = assert_error(delete(api, draft), 409, "conflict")
    assert error["details"]["jobs"] == [waiting["id"]]
    assert api.get(f"/v1/assets/{draft}").status_code == 200
    until.touch()
    assert wait_for_job(api, waiting["id"])["status"] == "succeeded"
    assert delete(api, draft).status_code == 204


def render_and_copy_then_delete_the_render(api: httpx.Client) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(project, draft, the render's job, its copy's job), the render's image deleted."""
    project_id = create_project(api)
    draft = make_draft(api, project_id)
    first = wait_for_job(api, promote_ok(api, draft, cache=True)["id"])
    copy = wait_for_job(api, promote_ok(api, draft, cache=True)["id"])
    assert copy["cost"]["cache_hit"]
    assert delete(api, first["assets"][0]).status_code == 204
    return project_id, draft, first, copy


def test_a_cached_copy_of_a_deleted_image_is_rendered_again(api: httpx.Client) -> None:
    _project_id, draft, _first, copy = render_and_copy_then_delete_the_render(api)
    assert delete(api, copy["assets"][0]).status_code == 204
    again = wait_for_job(api, promote_ok(api, draft, cache=True)["id"])
    assert again["status"] == "succeeded" and not again["cost"]["cache_hit"]
    assert api.get(f"/v1/assets/{again['assets'][0]}/content").status_code == 200
    # And that render is the next request's copy: the deleted job is passed over, not the cache
    # turned off for good (every identical request paid again).
    third = wait_for_job(api, promote_ok(api, draft, cache=True)["id"])
    assert third["cost"]["cache_hit"] and third["cost"]["charged"] == 0
    assert get_json(api, f"/v1/assets/{third['assets'][0]}")["sha256"] == \
        get_json(api, f"/v1/assets/{again['assets'][0]}")["sha256"]


def test_a_live_copy_is_copied_again_when_the_image_it_copied_was_deleted(api: httpx.Client) -> None:
    project_id, draft, first, copy = render_and_copy_then_delete_the_render(api)
    # The copy's row keeps the file: the next identical request copies it, for nothing.
    third = wait_for_job(api, promote_ok(api, draft, cache=True)["id"])
    assert third["cost"]["cache_hit"] and third["cost"]["charged"] == 0
    made = get_json(api, f"/v1/assets/{third['assets'][0]}")
    assert made["sha256"] == get_json(api, f"/v1/assets/{copy['assets'][0]}")["sha256"]
    assert made["parent_id"] == draft
    assert api.get(f"/v1/assets/{third['assets'][0]}/content").status_code == 200
    assert get_json(api, f"/v1/projects/{project_id}/budget")["charged"] == first["cost"]["charged"] > 0


def test_the_sweep_removes_a_deleted_asset_s_file_unless_a_live_asset_has_its_bytes(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    from orchestrator.server import serve_in_thread

    settings = paid_settings_for(tmp_path / "data")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as api:
        project_id = create_project(api)
        body = {**DRAFT, "n": 1, "seed": 77}
        twins = [wait_for_job(api, api.post(f"/v1/projects/{project_id}/drafts", json=body).json()["id"])["assets"][0]
                 for _ in range(2)]  # the same image twice: one file
        alone = make_draft(api, project_id, seed=78)
        shas = {asset_id: get_json(api, f"/v1/assets/{asset_id}")["sha256"] for asset_id in [*twins, alone]}
        assert shas[twins[0]] == shas[twins[1]]
        for asset_id in (twins[0], alone):
            assert delete(api, asset_id).status_code == 204
    store = ArtifactStore(settings.assets_dir)
    services = Services.build(settings)
    try:
        assert services.sweep_asset_files(older_than=0) == 1
        assert not store.path_for(shas[alone]).exists()
        assert store.path_for(shas[twins[1]]).exists()  # the live twin names it
    finally:
        import asyncio

        asyncio.run(services.aclose())


def test_deleting_most_assets_is_no_sign_of_a_foreign_database(tmp_path: Path) -> None:
    """The sweep refuses to remove files when most of them are named by no row (the database is
    another install's): files deleted assets named are not such files."""
    store = ArtifactStore(tmp_path / "assets")
    shas = [store.put(os.urandom(64) + bytes([i])) for i in range(30)]
    old = time.time() - 10_000
    for sha in shas:
        os.utime(store.path_for(sha), (old, old))
    live, deleted = set(shas[:2]), set(shas[2:])

    def named(batch: list[str], among: set[str]) -> set[str]:
        return {sha for sha in batch if sha in among}

    from orchestrator.store import SweepRefused

    with pytest.raises(SweepRefused):  # as before, without the deleted rows' say
        store.sweep_orphans(lambda batch: named(batch, live))
    assert store.sweep_orphans(lambda batch: named(batch, live), deleted=lambda batch: named(batch, deleted)) == 28
    assert sorted(p.name[:64] for p in store.root.glob("*/*.png")) == sorted(live)
