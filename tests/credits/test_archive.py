"""An archived project takes no new job (the studio's word that its spending is over), leaves the
project list unless asked for, and keeps its history: jobs, assets, ledger and spend."""

from __future__ import annotations

from typing import Any

import httpx

from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore
from tests.api import wait_for_job
from tests.credits import DRAFT, get_json, jobs_of, kinds, ledger, project_with_draft, promote, promote_ok


def listed(api: httpx.Client, **params: Any) -> set[str]:
    ids: set[str] = set()
    cursor: str | None = None
    while True:
        page = get_json(api, "/v1/projects", limit=500, **({"cursor": cursor} if cursor else {}), **params)
        ids |= {p["id"] for p in page["items"]}
        if (cursor := page["next_cursor"]) is None:
            return ids


def test_an_archived_project_takes_no_new_job_and_keeps_its_history(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    first = promote(api, asset_id, key="archive-test-retry")
    assert first.status_code == 202, first.text
    bought = wait_for_job(api, first.json()["id"])
    assert bought["status"] == "succeeded", bought
    before = ledger(api, project_id)

    response = api.patch(f"/v1/projects/{project_id}", json={"archived": True})
    assert response.status_code == 200, response.text
    archived_at = response.json()["archived_at"]
    assert archived_at is not None and archived_at.endswith("Z")
    # Archived again: nothing changes, its time included.
    assert api.patch(f"/v1/projects/{project_id}", json={"archived": True}).json()["archived_at"] == archived_at
    assert get_json(api, f"/v1/projects/{project_id}")["archived_at"] == archived_at

    jobs = len(jobs_of(api, project_id))
    refused = [promote(api, asset_id), api.post(f"/v1/projects/{project_id}/drafts", json=DRAFT),
               api.post(f"/v1/assets/{asset_id}/polish", json={"engine": "fake-paid"}),
               api.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id})]
    for answer in refused:
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert error["code"] == "project_archived" and error["details"]["project_id"] == project_id, error
    assert len(jobs_of(api, project_id)) == jobs and ledger(api, project_id) == before  # nothing written
    # A retry of a request made before the archive is answered as it was.
    retried = promote(api, asset_id, key="archive-test-retry")
    assert (retried.status_code, retried.json()["id"]) == (202, bought["id"]), retried.text

    # Its history stays readable: the job, its asset, its ledger and spend.
    assert get_json(api, f"/v1/jobs/{bought['id']}")["cost"]["charged"] == 10.0
    assert api.get(f"/v1/assets/{bought['assets'][0]}/content").status_code == 200
    assert kinds(before) == {"hold": 1, "capture": 1}
    assert project_id not in listed(api) and project_id in listed(api, archived="true")

    # Taken back, it takes jobs again.
    response = api.patch(f"/v1/projects/{project_id}", json={"archived": False})
    assert response.status_code == 200 and response.json()["archived_at"] is None, response.text
    assert project_id in listed(api)
    assert wait_for_job(api, promote_ok(api, asset_id)["id"])["status"] == "succeeded"


def test_archiving_lets_queued_jobs_finish(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    job = promote_ok(api, asset_id, tags={"fake": "slow", "seconds": "0.5"})
    assert api.patch(f"/v1/projects/{project_id}", json={"archived": True}).status_code == 200
    done = wait_for_job(api, job["id"])
    assert (done["status"], done["cost"]["charged"]) == ("succeeded", 10.0), done


def test_archived_null_is_refused(api: httpx.Client) -> None:
    project_id, _ = project_with_draft(api)
    response = api.patch(f"/v1/projects/{project_id}", json={"archived": None})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", response.text
    assert get_json(api, f"/v1/projects/{project_id}")["archived_at"] is None


def test_an_archived_project_refuses_a_request_whose_source_file_is_gone(api: httpx.Client,
                                                                         paid_settings: Settings) -> None:
    # A source whose file had gone answered 500 "restore it from a backup", and a deleted one 410,
    # where the request would be refused anyway: the archive is the answer.
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    ArtifactStore(paid_settings.assets_dir).path_for(get_json(api, f"/v1/assets/{asset_id}")["sha256"]).unlink()
    assert promote(api, asset_id).json()["error"]["code"] == "content_unavailable"  # still this while open
    assert api.patch(f"/v1/projects/{project_id}", json={"archived": True}).status_code == 200
    before = ledger(api, project_id)
    for answer in (promote(api, asset_id), api.post(f"/v1/assets/{asset_id}/polish", json={"engine": "fake-paid"}),
                   api.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id})):
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "project_archived", answer.text
    assert ledger(api, project_id) == before
