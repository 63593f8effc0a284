"""Operators see one log line when a job ends: INFO for a success or a cancel, WARNING for a failure."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.credits import iter_sse, poll, project_with_draft, promote_ok, wait_for_job


def lines_of(caplog: pytest.LogCaptureFixture, job_id: str) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "orchestrator.runner" and job_id in r.getMessage()]


def one_line(caplog: pytest.LogCaptureFixture, job_id: str) -> tuple[str, str]:
    # The row is final a moment before the line is written: wait for it, then make sure it is alone.
    lines = poll(lambda: lines_of(caplog, job_id), bool, timeout=10, what=f"the log line of {job_id}")
    assert len(lines) == 1, lines
    return lines[0]


def test_each_job_end_is_logged_once(api: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.runner")
    _project_id, asset_id = project_with_draft(api)

    done = promote_ok(api, asset_id)
    assert wait_for_job(api, done["id"])["status"] == "succeeded"
    level, message = one_line(caplog, done["id"])
    assert level == "INFO" and message.startswith(f"job {done['id']} succeeded on fake-paid: 1 image(s) in ")
    assert message.endswith(" s")

    failed = promote_ok(api, asset_id, tags={"fake": "fail"})
    assert wait_for_job(api, failed["id"])["status"] == "failed"
    assert one_line(caplog, failed["id"]) == (
        "WARNING", f"job {failed['id']} failed on fake-paid: engine_error: fake engine failed")

    hanging = promote_ok(api, asset_id, tags={"fake": "hang"})
    with api.stream("GET", f"/v1/jobs/{hanging['id']}/events", timeout=30.0) as stream:
        for event in iter_sse(stream):
            if event.event == "state" and event.data.get("state") == "submitted":
                assert api.post(f"/v1/jobs/{hanging['id']}/cancel").status_code == 202
                break
    assert wait_for_job(api, hanging["id"])["status"] == "canceled"
    assert one_line(caplog, hanging["id"]) == ("INFO", f"job {hanging['id']} canceled on fake-paid")
