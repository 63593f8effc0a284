"""Job webhooks of paid work: a copy of an earlier result, which ends as it is submitted."""

from __future__ import annotations

import json
import time

import httpx

from tests.api import wait_for_job
from tests.api.test_webhooks import Receiver
from tests.credits import create_project, make_draft, promote_ok


def test_a_cached_copy_is_posted_as_it_is_submitted(api: httpx.Client) -> None:
    receiver = Receiver()
    try:
        project_id = create_project(api)
        patched = api.patch(f"/v1/projects/{project_id}", json={"webhook_url": receiver.url})
        assert patched.status_code == 200, patched.text
        draft = make_draft(api, project_id)
        first = wait_for_job(api, promote_ok(api, draft, cache=True)["id"])
        copy = promote_ok(api, draft, cache=True)
        assert copy["status"] == "succeeded" and copy["cost"]["cache_hit"], copy
        sent = [json.loads(body) for _, body in receiver.wait_for(3)]
    finally:
        receiver.close()
    assert sorted((s["job"]["id"], s["type"]) for s in sent if s["job"]["stage"] == "bridge") == sorted(
        [(first["id"], "job.succeeded"), (copy["id"], "job.succeeded")])
    assert next(s for s in sent if s["job"]["id"] == copy["id"])["job"] == api.get(f"/v1/jobs/{copy['id']}").json()


def test_a_cached_copy_with_its_own_url_is_posted_there(api: httpx.Client) -> None:
    # A copy ends in the transaction that makes it, which wrote its delivery to the project's URL read
    # there: the job's own URL must win in that path too.
    project_receiver, job_receiver = Receiver(), Receiver()
    try:
        project_id = create_project(api)
        assert api.patch(f"/v1/projects/{project_id}", json={"webhook_url": project_receiver.url}).status_code == 200
        draft = make_draft(api, project_id)
        wait_for_job(api, promote_ok(api, draft, cache=True)["id"])
        copy = promote_ok(api, draft, cache=True, webhook_url=job_receiver.url)
        assert copy["status"] == "succeeded" and copy["cost"]["cache_hit"] and copy["webhook_url"] == job_receiver.url
        [(_, body)] = job_receiver.wait_for(1)
        assert json.loads(body)["job"]["id"] == copy["id"]
        _project_settled(api, project_id)
        assert copy["id"] not in {json.loads(body)["job"]["id"] for _, body in project_receiver.wait_for(2)}
    finally:
        project_receiver.close()
        job_receiver.close()


def _project_settled(client: httpx.Client, project_id: str) -> None:
    """Until none of the project's deliveries is pending. The package's server is shared: another
    test's delivery to a receiver it closed stays pending for its retries, so /metrics' count of
    every pending delivery may not come to 0 in the time this waits."""
    deadline = time.monotonic() + 30
    while items := client.get(f"/v1/projects/{project_id}/webhook-deliveries",
                              params={"status": "pending"}).json()["items"]:
        assert time.monotonic() < deadline, items
        time.sleep(0.05)
