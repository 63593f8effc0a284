"""Cancelling a running job (stops within a step) and a queued one (never runs)."""

from __future__ import annotations

import httpx

from tests.api import (
    SLOW,
    SSE,
    TERMINAL,
    assert_error,
    create_project,
    iter_sse,
    read_events,
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


def test_cancel_queued_job_never_runs(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    running = submit_draft(server, project, **SLOW)
    wait_for_job(server, running["id"], ("running",))
    # The local lane runs one job at a time: this one waits behind the slow one.
    queued = submit_draft(server, project, n=2)
    assert server.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"

    response = server.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 202
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
