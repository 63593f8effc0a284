"""A paid job whose process dies after its images are stored, before the rows naming them commit:
its images were made and billed, so recovery adopts them (rows, the job's end, its charge settled
once) instead of failing it `interrupted` and sweeping its files as orphans."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlmodel import col, select

from orchestrator.db import Database
from orchestrator.models import Asset, Job, LedgerEntry
from orchestrator.server import serve_in_thread
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.api import launch_server
from tests.credits import (
    assert_settled_once,
    budget,
    kinds,
    ledger,
    project_with_draft,
    promote_ok,
    wait_for_job,
)
from tests.credits.conftest import Service

# Run first by the child service: it dies (SIGKILL, no clean-up of any kind) as the runner is about
# to commit a success, every image of the job written, fsynced and renamed into the store.
DIE_BEFORE_THE_ROWS = """
import os, signal
from orchestrator.runner import JobRunner

def die(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

JobRunner._finish_success = die
"""


# Or as the store thread has written (fsynced, renamed) the job's image, before anything else.
DIE_AFTER_THE_PUT = """
import os, signal
from orchestrator.runner import JobRunner

put = JobRunner._store_png

def die(self, data):
    put(self, data)
    os.kill(os.getpid(), signal.SIGKILL)

JobRunner._store_png = die
"""


class DyingService(Service):
    """`Service`, with `dying` (`DIE_BEFORE_THE_ROWS`, `DIE_AFTER_THE_PUT`) run first."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path, dying: str) -> None:
        self.log = open(log, "wb")  # noqa: SIM115 (closed by stop/kill)
        try:
            self.process, self.url = launch_server(env, cwd, self.log, dying)
        except BaseException:
            self.log.close()
            raise


def store_files(data_dir: Path) -> set[str]:
    return {path.stem for path in (data_dir / "assets").glob("*/*.png")}


@pytest.mark.parametrize(("dying", "swept_first"), [(DIE_BEFORE_THE_ROWS, False), (DIE_BEFORE_THE_ROWS, True),
                                                    (DIE_AFTER_THE_PUT, False)],
                         ids=["recovered", "swept-then-recovered", "killed-as-the-file-was-written"])
def test_a_paid_job_killed_between_its_files_and_its_rows_keeps_its_images(
        service_env: dict[str, str], tmp_path: Path, paid_settings_for: Callable[..., Settings],
        services: list[Service], dying: str, swept_first: bool) -> None:
    data_dir = Path(service_env["ORCH_DATA_DIR"])
    check_adopted(service_env, tmp_path, paid_settings_for(data_dir), services, dying, swept_first)


def check_adopted(service_env: dict[str, str], tmp_path: Path, settings: Settings, services: list[Service],
                  dying: str, swept_first: bool) -> None:
    data_dir = settings.data_dir
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "month"})
    before = store_files(data_dir)

    services.append(DyingService(service_env, tmp_path, tmp_path / "first.log", dying))
    with httpx.Client(base_url=services[0].url, timeout=30.0) as client:
        # The provider reports what it charged (7 credits of the 10 held).
        job_id = promote_ok(client, asset_id, tags={"cost": "7"})["id"]
    assert services[0].process.wait(timeout=60) == -signal.SIGKILL
    services[0].kill()
    made = store_files(data_dir) - before
    assert len(made) == 1  # its image stored, and no row names it
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            left = s.get(Job, job_id)  # as the dead process left it, for a second recovery below
            assert left is not None and left.status == "running"
    finally:
        db.dispose()

    if swept_first:
        # An hourly sweep of the store running before the recovery (another process's, or this start's
        # own, which runs beside it) must not take the files the recovery is about to adopt.
        svc = Services.build(settings)
        try:
            svc.sweep_asset_files(older_than=0)
        finally:
            asyncio.run(svc.aclose())
        assert made <= store_files(data_dir)

    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        assert job["error"] is None
        assert len(job["assets"]) == 1
        adopted = client.get(f"/v1/assets/{job['assets'][0]}").json()
        assert adopted["parent_id"] == asset_id and adopted["job_id"] == job_id
        content = client.get(adopted["content_url"])
        assert content.status_code == 200
        assert {hashlib.sha256(content.content).hexdigest()} == made
        # The rows are the runner's own: the same request, run through now, makes the same asset.
        again = wait_for_job(client, promote_ok(client, asset_id, tags={"cost": "7"})["id"])
        assert again["status"] == "succeeded", again
        fresh = client.get(f"/v1/assets/{again['assets'][0]}").json()
        ours = ("id", "job_id", "created_at", "content_url")
        assert {k: v for k, v in adopted.items() if k not in ours} == {k: v for k, v in fresh.items() if k not in ours}
        assert job["model"] == again["model"] and job["provider_request_id"] is not None
        lineage = client.get(f"/v1/assets/{job['assets'][0]}/lineage").json()
        assert [a["id"] for a in lineage["ancestors"]] == [asset_id], lineage

        # Charged once, what the provider reported, nothing left to reconcile.
        assert job["cost"]["held"] == 0 and job["cost"]["charged"] == 7
        entries = [e for e in ledger(client, project_id) if e["job_id"] == job_id]
        assert kinds(entries) == {"hold": 1, "capture": 1, "release": 1}
        assert not any(e["unreconciled"] for e in entries)
        assert_settled_once(entries)
        assert budget(client, project_id)["charged"] == 7 + 7  # this job's and the one run through

    # The adopted files are named now: a sweep leaves them, and a second recovery of the row the
    # crash left (another process's, which read it before the first committed) writes nothing.
    svc = Services.build(settings)
    try:
        svc.sweep_asset_files(older_than=0)
        assert svc.scheduler._recover_one(left) is None
        with svc.db.session() as s:
            assert len(s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)).all()) == 3
        with svc.db.session() as s:
            assert s.exec(select(Job.status).where(col(Job.id) == job_id)).one() == "succeeded"
            assert len(s.exec(select(Asset).where(col(Asset.job_id) == job_id)).all()) == 1
    finally:
        asyncio.run(svc.aclose())
    assert made <= store_files(data_dir)



@pytest.mark.parametrize("lost", [False, True], ids=["kept", "file-lost"])
def test_a_cancel_of_a_paid_job_whose_process_died_after_storing_its_images_keeps_them(
        service_env: dict[str, str], tmp_path: Path, paid_settings_for: Callable[..., Settings],
        services: list[Service], lost: bool) -> None:
    """A client cancels the job its dead worker left running before any recovery has run (the API's
    cancel of a job whose worker is gone). Before, the cancel ignored what the row said was stored: the
    job ended canceled with no asset, its estimate captured `unreconciled` as possibly billed, the
    row kept `stored_images`, and the next store sweep removed the files made and paid for. With the
    file lost from the store since, the job ends as before, its row's record cleared all the same."""
    settings = paid_settings_for(Path(service_env["ORCH_DATA_DIR"]))
    data_dir = settings.data_dir
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "month"})
    before = store_files(data_dir)
    services.append(DyingService(service_env, tmp_path, tmp_path / "first.log", DIE_BEFORE_THE_ROWS))
    with httpx.Client(base_url=services[0].url, timeout=30.0) as client:
        job_id = promote_ok(client, asset_id, tags={"cost": "7"})["id"]
    assert services[0].process.wait(timeout=60) == -signal.SIGKILL
    services[0].kill()
    made = store_files(data_dir) - before
    assert len(made) == 1
    if lost:
        for path in (data_dir / "assets").glob(f"*/{next(iter(made))}.png"):
            path.unlink()

    svc = Services.build(settings)
    try:
        assert svc.jobs.cancel_orphan(job_id) is True
        with svc.db.session() as s:
            row = s.get(Job, job_id)
            assert row is not None and row.status == "canceled" and row.stored_images is None
        svc.sweep_asset_files(older_than=0)
    finally:
        asyncio.run(svc.aclose())
    if lost:
        with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "canceled" and job["assets"] == [], job
            entries = [e for e in ledger(client, project_id) if e["job_id"] == job_id]
            assert kinds(entries) == {"hold": 1, "capture": 1} and any(e["unreconciled"] for e in entries)
        return
    assert made <= store_files(data_dir)

    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "canceled" and len(job["assets"]) == 1, job
        adopted = client.get(f"/v1/assets/{job['assets'][0]}").json()
        assert adopted["parent_id"] == asset_id and adopted["job_id"] == job_id
        assert {hashlib.sha256(client.get(adopted["content_url"]).content).hexdigest()} == made
        # Charged what the provider reported, once, as a recovery's adoption charges it.
        assert job["cost"]["held"] == 0 and job["cost"]["charged"] == 7
        entries = [e for e in ledger(client, project_id) if e["job_id"] == job_id]
        assert kinds(entries) == {"hold": 1, "capture": 1, "release": 1}
        assert not any(e["unreconciled"] for e in entries)
        assert_settled_once(entries)


def test_an_adopted_job_whose_engine_reported_a_cost_that_is_no_number_is_flagged_as_its_success_is(
        service_env: dict[str, str], tmp_path: Path, paid_settings_for: Callable[..., Settings],
        services: list[Service]) -> None:
    """A plugin's cost of no whole millicredits that JSON cannot hold (an infinite one, NaN): the
    runner's success captures the estimate flagged `unreconciled`. The row's record kept it as null
    (the database's JSON writes no infinity), which reads as no cost reported: the adoption captured
    the estimate as if nothing were left to reconcile."""
    settings = paid_settings_for(Path(service_env["ORCH_DATA_DIR"]))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "month"})
        live = wait_for_job(client, promote_ok(client, asset_id, tags={"cost": "inf"})["id"])
        assert live["status"] == "succeeded"
        flagged = [e["unreconciled"] for e in ledger(client, project_id)
                   if e["job_id"] == live["id"] and e["kind"] == "capture"]
        assert flagged == [True]  # as the runner's success settles it
    services.append(DyingService(service_env, tmp_path, tmp_path / "first.log", DIE_BEFORE_THE_ROWS))
    with httpx.Client(base_url=services[0].url, timeout=30.0) as client:
        job_id = promote_ok(client, asset_id, tags={"cost": "inf"})["id"]
    assert services[0].process.wait(timeout=60) == -signal.SIGKILL
    services[0].kill()
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and len(job["assets"]) == 1, job
        entries = [e for e in ledger(client, project_id) if e["job_id"] == job_id]
        assert [e["unreconciled"] for e in entries if e["kind"] == "capture"] == [True], entries
        assert_settled_once(entries)
