"""A stop (SIGTERM, a rolling restart) and a paid request already out to a provider whose work a
restart cannot follow: the answer is waited for, up to ORCH_STOP_GRACE, so the image is kept and
charged, not failed `interrupted` with its estimate captured for reconciliation."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.credits import PRICE, ledger, poll, project_with_draft, promote_ok, wait_for_job


@pytest.mark.parametrize("grace", [30.0, 0.0])
def test_a_stop_waits_for_a_sent_paid_request_to_answer(paid_settings_for: Callable[..., Settings], tmp_path: Path,
                                                        grace: float) -> None:
    settings = paid_settings_for(tmp_path / "data", stop_grace=grace)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, tags={"fake": "slow", "seconds": "1.5"})
        poll(lambda: _row(settings, job["id"]), lambda row: row[0] == "running" and row[2] is not None,
             what="the request out")  # its id saved: sent, and answering in 1.5 s
    status, error, _ = _row(settings, job["id"])
    if grace:
        assert status == "succeeded", error  # answered during the stop: stored and charged
    else:
        assert status == "running"  # left to recovery, as before: the next start fails it
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"])
        entries = [(e["kind"], e["amount"], e["unreconciled"]) for e in ledger(client, project_id)
                   if e["job_id"] == job["id"]]
    if grace:
        assert done["status"] == "succeeded" and entries == [("hold", PRICE, False), ("capture", PRICE, False)]
    else:
        assert (done["status"], done["error"]["code"]) == ("failed", "interrupted")
        assert entries == [("hold", PRICE, False), ("capture", PRICE, True)]


def _row(settings: Settings, job_id: str) -> tuple[str, str | None, str | None]:
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        row: tuple[str, str | None, str | None] = db.execute(
            "SELECT status, error, provider_request_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row
