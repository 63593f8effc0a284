"""A project's webhook deliveries of paid work: a copy of an earlier result is listed as any job's end."""

from __future__ import annotations

import httpx

from tests.api import wait_for_job
from tests.api.test_webhooks import Receiver
from tests.credits import create_project, make_draft, promote_ok


def test_a_cached_copy_s_delivery_is_listed_under_its_project(api: httpx.Client) -> None:
    receiver = Receiver()
    try:
        project_id = create_project(api)
        api.patch(f"/v1/projects/{project_id}", json={"webhook_url": receiver.url}).raise_for_status()
        draft = make_draft(api, project_id)
        first = wait_for_job(api, promote_ok(api, draft, cache=True)["id"])
        copy = promote_ok(api, draft, cache=True)
        assert copy["cost"]["cache_hit"], copy
        listed = api.get(f"/v1/projects/{project_id}/webhook-deliveries", params={"job_id": copy["id"]})
        assert listed.status_code == 200, listed.text
        [delivery] = listed.json()["items"]
        assert (delivery["job_id"], delivery["project_id"], delivery["url"]) == (copy["id"], project_id, receiver.url)
        jobs = {d["job_id"] for d in api.get(f"/v1/projects/{project_id}/webhook-deliveries").json()["items"]}
        assert {first["id"], copy["id"]} <= jobs
    finally:
        receiver.close()
