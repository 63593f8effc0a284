"""Workers with different engines: a job waits for the worker that has its engine, and is failed
(its hold released) only when no live process has it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from orchestrator.queue import Scheduler
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from orchestrator.workers import Presence
from tests.credits import PRICE, ledger, poll, project_with_draft, promote_ok
from tests.credits.conftest import ENGINES

WITHOUT_QUEUE = ",".join(entry for entry in ENGINES.split(",") if not entry.startswith("fake-queue="))


def test_a_job_waits_for_the_worker_with_its_engine(paid_settings_for: Callable[..., Settings],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    with serve_in_thread(paid_settings_for(data, run_jobs=False)) as base, \
            httpx.Client(base_url=base, timeout=30) as api:
        # Made by a service that runs jobs; the promotion is only queued (this API server runs none).
        with serve_in_thread(paid_settings_for(data)) as drafts, httpx.Client(base_url=drafts, timeout=30) as c:
            project_id, asset_id = project_with_draft(c, {"limit": 100, "period": "month"})
        job_id = promote_ok(api, asset_id, engine="fake-queue")["id"]

        # A live worker that has fake-queue (its owner lock names it), and one that does not.
        gpu = Presence(data / "locks", shared_database=False)
        gpu.enter("gpu-host:4242:cafe", ["lite", "fake-queue"])
        looked: list[None] = []
        real = Scheduler._fail_unserved

        def counted(self: Scheduler) -> None:
            real(self)
            looked.append(None)

        monkeypatch.setattr(Scheduler, "_fail_unserved", counted)
        try:
            # The lease is also the grace an engine gets before its jobs are failed for want of it.
            with serve_in_thread(paid_settings_for(data, engines=WITHOUT_QUEUE, sweep_interval=0.05,
                                                   lease_seconds=1)):
                poll(lambda: len(looked), lambda n: n >= 3, what="three sweeps of the worker without fake-queue")
                assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
                gpu.leave("gpu-host:4242:cafe")  # that worker stops: nobody has the engine now
                job = poll(lambda: api.get(f"/v1/jobs/{job_id}").json(), lambda j: j["status"] != "queued",
                           what="the job to fail")
        finally:
            gpu.leave("gpu-host:4242:cafe")
        assert job["status"] == "failed" and job["error"]["code"] == "engine_unavailable", job
        assert "not installed, or not set up (its key, its server), in any process that runs jobs" in \
            job["error"]["message"]
        entries = [(e["kind"], e["amount"]) for e in ledger(api, project_id) if e["job_id"] == job_id]
        assert entries == [("hold", PRICE), ("release", PRICE)]
