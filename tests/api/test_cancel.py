"""Cancelling a running job (stops within a step) and a queued one (never runs)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx
import pytest

from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore, Put
from tests.api import (
    SLOW,
    SMALL,
    SSE,
    TERMINAL,
    assert_error,
    create_project,
    iter_sse,
    read_events,
    run_draft,
    submit_draft,
    wait_for_job,
)


def test_cancel_running_job(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    job = submit_draft(server, project, **SLOW)

    events: list[SSE] = []
    with server.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as response:
        stream = iter_sse(response)
        for event in stream:
            events.append(event)
            if event.event == "progress":
                break
        assert events[-1].event == "progress", [e.event for e in events]
        # While it denoises, the step preview is served.
        preview = server.get(events[-1].data["preview_url"])
        assert preview.status_code == 200
        assert preview.headers["content-type"] == "image/png"

        response_cancel = server.post(f"/v1/jobs/{job['id']}/cancel")
        assert response_cancel.status_code == 202
        assert response_cancel.json()["id"] == job["id"]
        assert response_cancel.json()["status"] in ("running", "canceled")
        events.extend(stream)

    kinds = [e.event for e in events]
    assert kinds[:2] == ["queued", "started"]
    assert [k for k in kinds if k in TERMINAL] == ["canceled"]
    assert kinds[-1] == "canceled"
    assert "asset" not in kinds
    steps = [e.data["step"] for e in events if e.event == "progress"]
    assert steps[-1] < SLOW["steps"], "the job ran to the end instead of stopping"

    done = wait_for_job(server, job["id"], ("canceled",), timeout=30)
    assert done["assets"] == []
    # Where it stopped, not a reset bar.
    assert 0 < steps[-1] <= done["progress"]["step"] < done["progress"]["total"]
    assert done["error"]["code"] == "canceled"
    assert events[-1].data["error"] == done["error"]  # the stream says why, as the job does
    assert done["finished_at"] is not None
    assert server.get(f"/v1/projects/{project}/assets").json()["items"] == []
    assert server.get(f"/v1/jobs/{job['id']}/preview").status_code == 404

    again = server.post(f"/v1/jobs/{job['id']}/cancel")
    error = assert_error(again, 409, "job_finished")
    assert error["details"]["status"] == "canceled"


def test_cancel_queued_job_never_runs(server: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    project = create_project(server)["id"]
    running = submit_draft(server, project, **SLOW)
    wait_for_job(server, running["id"], ("running",))
    # The local lane runs one job at a time: this one waits behind the slow one.
    queued = submit_draft(server, project, n=2)
    assert server.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"

    with caplog.at_level(logging.INFO, logger="orchestrator.jobs"):
        response = server.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 202
    # In the service's log, as a running job's end is (only the access log had it).
    assert f"job {queued['id']} canceled while queued for lite: canceled before it started" in caplog.text
    assert response.json()["status"] == "canceled"
    told = read_events(server, queued["id"], timeout=10)
    assert [e.event for e in told] == ["queued", "canceled"]
    assert told[-1].data["error"]["code"] == "canceled"

    assert server.post(f"/v1/jobs/{running['id']}/cancel").status_code == 202
    wait_for_job(server, running["id"], ("canceled",), timeout=30)

    # The lane is free again; the canceled job must not have been picked up. A job queued after
    # it runs and finishes, which proves the scheduler looked at the queue since.
    later = submit_draft(server, project)
    wait_for_job(server, later["id"], ("succeeded",))
    job = server.get(f"/v1/jobs/{queued['id']}").json()
    assert job["status"] == "canceled"
    assert job["error"]["code"] == "canceled"
    assert job["started_at"] is None
    assert job["assets"] == []
    assert job["attempts"] == []
    assert_error(server.post(f"/v1/jobs/{queued['id']}/cancel"), 409, "job_finished")


def test_a_cancel_while_the_images_are_stored_leaves_no_file(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancel won (202) after the job's files were written: they stayed, named by no asset, and
    a few such jobs made the sweep take the database for another store's and remove nothing."""
    settings = make_settings(lite_max_batch=1)  # image i the same bytes in any job of seed `seed`
    client = start_server(settings)
    project = create_project(client)["id"]
    kept = run_draft(client, project, n=1, seed=11, **SMALL)["assets"][0]  # an image a row names
    store = ArtifactStore(settings.assets_dir)
    before = {p.name for p in store.root.glob("*/*.png")}
    real_put = ArtifactStore.put_file
    canceled: list[str] = []
    shas: list[str] = []

    once = threading.Lock()

    def put_then_cancel(self: ArtifactStore, data: bytes) -> Put:
        put = real_put(self, data)
        shas.append(put.sha256)
        if once.acquire(blocking=False):  # once its first file is written: the others are written meanwhile
            running = client.get("/v1/jobs", params={"project_id": project, "status": "running"}).json()["items"]
            canceled.append(running[0]["id"])
            assert client.post(f"/v1/jobs/{running[0]['id']}/cancel").status_code == 202
        return put

    monkeypatch.setattr(ArtifactStore, "put_file", put_then_cancel)
    # Seed 11 again: its first image is the kept asset's, whose file this job's put finds, not makes.
    job = submit_draft(client, project, n=3, seed=11, **SMALL)
    assert wait_for_job(client, job["id"])["status"] == "canceled" and canceled == [job["id"]]
    assert len(set(shas)) == 3 and before & {f"{sha}.png" for sha in shas}  # seed 11: the kept asset's bytes
    assert {p.name for p in store.root.glob("*/*.png")} == before  # the kept one too
    assert not list(store.root.glob("*/.gc-*"))
    assert client.get(client.get(f"/v1/assets/{kept}").json()["content_url"]).status_code == 200
