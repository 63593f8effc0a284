"""Crash recovery: after a hard kill, local work is re-queued and finishes; remote work is failed
with `interrupted` (never sent twice); no job stays `running`."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.ids import new_id
from orchestrator.models import Job, Project
from orchestrator.queue import MAX_RECOVERIES
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests import fakes
from tests.api import TERMINAL, create_project, iter_sse, read_events, serve_process, submit_draft, wait_for_job
from tiers import tiny

SettingsFactory = Callable[..., Settings]


def db_status(settings: Settings, job_id: str) -> str:
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as conn:
        row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return str(row[0])


def test_killed_server_requeues_local_job_and_finishes_it(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    # The first process holds the render at its first step: killed there, however loaded the machine.
    with serve_process(settings, tmp_path, "first.log", before=fakes.HOLD_AFTER_FIRST_STEP) as (proc, base), \
            httpx.Client(base_url=base, timeout=30) as client:
        project = create_project(client)["id"]
        job = submit_draft(client, project, n=2, width=128, height=128, steps=4, seed=99)
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as response:
            for event in iter_sse(response):
                assert event.event not in TERMINAL, "the job ended before the server could be killed"
                if event.event == "progress":
                    proc.kill()  # SIGKILL: no shutdown, no clean-up of any kind
                    break
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert db_status(settings, job["id"]) == "running"  # the crash left it mid-flight

    # The restart is in this process: what it must do (recover the dead process's job, run it again) is
    # the service's start, not the command's, and the test process has torch and diffusers imported
    # already (a child imported them again: 20-30 s of this test's 70 on a loaded 2-core machine).
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"], ("succeeded",), timeout=120)
        assert len(done["assets"]) == 2
        assert done["error"] is None
        for asset_id in done["assets"]:
            asset = client.get(f"/v1/assets/{asset_id}").json()
            assert (asset["width"], asset["height"]) == (128, 128)
            assert client.get(asset["content_url"]).status_code == 200
        assert client.get("/v1/jobs", params={"status": "running"}).json()["items"] == []
        assert client.get("/v1/jobs", params={"status": "queued"}).json()["items"] == []
        events = read_events(client, job["id"], timeout=10)
        assert [e.event for e in events if e.event in TERMINAL] == ["succeeded"]
        assert [e.data["index"] for e in events if e.event == "asset"] == [0, 1]


def test_startup_recovery_fails_remote_and_requeues_local(make_settings: SettingsFactory,
                                                          start_server: Callable[[Settings], httpx.Client]) -> None:
    """Rows as a dead process left them: one job running on a remote engine, one on Lite (its lease
    not even expired: at start-up every running job belongs to a dead process). Gemini has its key,
    as it had for the dead process: a process without it leaves its jobs to one with it."""
    settings = make_settings(gemini_api_key="g-key")
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.resolved_database_url)
    db.migrate()
    now = utcnow()
    project_id, remote_id, local_id = new_id("prj"), new_id("job"), new_id("job")
    lease: dict[str, Any] = {"status": "running", "attempt": 1, "lease_owner": "dead-host:1:0", "started_at": now,
             "lease_expires_at": now + timedelta(minutes=10)}
    with db.transaction() as s:
        s.add(Project(id=project_id, name="before the crash", policy="balanced"))
        s.flush()
        s.add(Job(id=remote_id, project_id=project_id, stage="ideation", engine="gemini", model="gemini-test",
                  params={"stage": "ideation", "prompt": "a lighthouse", "n": 1, "seed": 1, "width": 64,
                          "height": 64}, provider_request_id="req-123", **lease))
        s.add(Job(id=local_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                  params={"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 2, "seed": 5,
                          "width": 64, "height": 64, "steps": 2, "tags": {}}, progress_step=1, progress_total=2,
                  **lease))
    db.dispose()

    client = start_server(settings)
    remote = client.get(f"/v1/jobs/{remote_id}").json()
    assert remote["status"] == "failed"
    assert remote["error"]["code"] == "interrupted"
    assert remote["error"]["details"]["engine"] == "gemini"
    assert remote["error"]["details"]["provider_request_id"] == "req-123"
    assert remote["finished_at"] is not None
    assert remote["assets"] == []
    events = read_events(client, remote_id, timeout=10)
    assert [e.event for e in events if e.event in TERMINAL] == ["failed"]

    local = wait_for_job(client, local_id, ("succeeded",))
    assert len(local["assets"]) == 2
    assert client.get("/v1/jobs", params={"status": "running"}).json()["items"] == []


def test_a_local_job_the_server_keeps_dying_under_is_given_up(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    """A job left running by a dead process for the third time (out of memory, say) is failed, not
    re-queued into a crash loop; one left running once or twice is re-queued."""
    settings = make_settings()
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.resolved_database_url)
    db.migrate()
    # Keyed by the stops before this one; claims alone (fallbacks, graceful stops) do not count.
    project_id, ids = new_id("prj"), {stops: new_id("job") for stops in (1, MAX_RECOVERIES - 1)}
    with db.transaction() as s:
        s.add(Project(id=project_id, name="crash loop", policy="balanced"))
        s.flush()
        for stops, job_id in ids.items():
            s.add(Job(id=job_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                      params={"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 1,
                              "seed": 5, "width": 64, "height": 64, "steps": 1, "tags": {}},
                      attempts=[{"engine": "lite", "status": "interrupted", "error": None}] * stops,
                      status="running", attempt=5, lease_owner="dead-host:1:0", started_at=utcnow()))
    db.dispose()

    client = start_server(settings)
    given_up = client.get(f"/v1/jobs/{ids[MAX_RECOVERIES - 1]}").json()
    assert given_up["status"] == "failed" and given_up["error"]["code"] == "interrupted"
    assert given_up["error"]["message"] == (f"the process running this job on 'lite' stopped without ending it "
                                            f"{MAX_RECOVERIES} times; it is not started again (try fewer or smaller "
                                            "images)")
    # Every stop is in its attempts, the last one with the error that ended it.
    assert [a["status"] for a in given_up["attempts"]] == ["interrupted"] * MAX_RECOVERIES
    assert given_up["attempts"][-1]["error"]["code"] == "interrupted"
    assert [e.event for e in read_events(client, given_up["id"], timeout=10)][-1] == "failed"
    again = wait_for_job(client, ids[1])
    assert again["status"] == "succeeded"
    assert [a["status"] for a in again["attempts"]] == ["interrupted", "interrupted", "succeeded"]


@pytest.mark.parametrize("factory", ["free_factory", "resuming_factory"])
def test_a_job_on_a_free_remote_engine_runs_again_after_a_crash(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], factory: str) -> None:
    """A self-hosted server bills nothing, so a job it was running when the process died is run
    again instead of being failed; the same row on a priced engine is failed (see above), and so
    is one on a cloud engine priced at 0 (its provider may bill, and would bill twice)."""
    settings = make_settings(engines=f"fake-free=tests.fakes:{factory},fake-paid=tests.fakes:factory,"
                                     "fake-zero=tests.fakes:zero_priced_factory")
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.resolved_database_url)
    db.migrate()
    project_id, free_id, paid_id, zero_id = new_id("prj"), new_id("job"), new_id("job"), new_id("job")
    params = {"stage": "bridge", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
              "width": 64, "height": 64, "tags": {}}
    with db.transaction() as s:
        s.add(Project(id=project_id, name="self-hosted", policy="balanced"))
        s.flush()
        for job_id, engine, estimated in ((free_id, "fake-free", 0), (paid_id, "fake-paid", 10_000),
                                          (zero_id, "fake-zero", 0)):
            s.add(Job(id=job_id, project_id=project_id, stage="bridge", engine=engine, model="fake-1",
                      params=params, estimated=estimated, provider_request_id="fake-1",
                      provider_work={"engine": engine, "handles": [{"id": "fake-1"}]},
                      status="running", attempt=1, lease_owner="dead-host:1:0", started_at=utcnow()))
    db.dispose()

    fakes.FORGOTTEN.clear()
    fakes.RESUMED.clear()
    sent_before = len(fakes.SENT)
    client = start_server(settings)
    again = wait_for_job(client, free_id)
    assert again["status"] == "succeeded", again
    assert [a["status"] for a in again["attempts"]] == ["interrupted", "succeeded"]
    assert len(again["assets"]) == 1
    if factory == "free_factory":
        # What the dead attempt had queued on the server was taken off it before the job ran again.
        assert (fakes.FORGOTTEN, fakes.RESUMED) == ([{"id": "fake-1"}], [])
    else:  # or kept, by an engine whose server keeps finished work
        assert (fakes.FORGOTTEN, fakes.RESUMED) == ([], [{"id": "fake-1"}])
    events = client.get(f"/v1/jobs/{free_id}/events").text
    assert ('"state":"restarted"' in events) == (factory == "free_factory")
    assert ('"state":"resumed"' in events) == (factory == "resuming_factory")
    for job_id in (paid_id, zero_id):
        ended = client.get(f"/v1/jobs/{job_id}").json()
        assert (ended["status"], ended["error"]["code"]) == ("failed", "interrupted"), ended
    assert len(fakes.SENT) - sent_before == 1  # the free job was sent again, and nothing else


def test_graceful_stop_leaves_the_job_for_recovery_not_canceled(make_settings: SettingsFactory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping the service interrupts a running draft; it is not a user's cancel, so the next
    start re-queues it and it finishes."""
    from tiers._local import LocalRuntime

    settings = make_settings()
    real_step_callback = LocalRuntime.step_callback
    # Held at its first step until the stop interrupts it: still denoising at the stop, however
    # loaded the machine, and the rerun (not held) is a short one.
    monkeypatch.setattr(LocalRuntime, "step_callback", fakes.holding_step_callback(real_step_callback))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project = create_project(client)["id"]
        job = submit_draft(client, project, width=128, height=128, steps=4)
        wait_for_job(client, job["id"], ("running",))
    assert db_status(settings, job["id"]) == "queued"  # the stop interrupted it, and gave it back
    monkeypatch.setattr(LocalRuntime, "step_callback", real_step_callback)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        # A deadline, not a timing.
        done = wait_for_job(client, job["id"], TERMINAL, timeout=600)
        assert done["status"] == "succeeded", done["error"]
        assert len(done["assets"]) == 1


def test_startup_leaves_a_live_process_its_jobs(make_settings: SettingsFactory,
                                                start_server: Callable[[Settings], httpx.Client]) -> None:
    """A second process started on the same database once failed the first one's running jobs as
    interrupted (and charged them). A live lease of a live process on this host is left alone; a
    dead process's job is recovered."""
    settings = make_settings()
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.resolved_database_url)
    db.migrate()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        project_id, live_id, dead_id = new_id("prj"), new_id("job"), new_id("job")
        params = {"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
                  "width": 64, "height": 64, "steps": 1, "tags": {}}
        lease: dict[str, Any] = {"status": "running", "attempt": 1, "started_at": utcnow(),
                                 "lease_expires_at": utcnow() + timedelta(minutes=10)}
        with db.transaction() as s:
            s.add(Project(id=project_id, name="two processes", policy="balanced"))
            s.flush()
            s.add(Job(id=live_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                      params=params, lease_owner=f"{socket.gethostname()}:{other.pid}:0", **lease))
            s.add(Job(id=dead_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                      params=params, lease_owner=f"{socket.gethostname()}:{dead_pid()}:0", **lease))
        db.dispose()
        client = start_server(settings)
        assert wait_for_job(client, dead_id)["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{live_id}").json()["status"] == "running"
    finally:
        other.kill()
        other.wait()


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def running_paid_job(services: Any, holder: subprocess.Popen[bytes], *, lease_left: float) -> str:
    """A paid job held by the live process `holder`, its lease ending `lease_left` seconds from
    now, with its hold: as a worker on this host leaves it mid-render."""
    from orchestrator.models import LedgerEntry

    project_id, job_id = new_id("prj"), new_id("job")
    with services.db.transaction() as s:
        s.add(Project(id=project_id, name="p", policy="balanced"))
        s.flush()
        s.add(Job(id=job_id, project_id=project_id, stage="bridge", engine="fake-paid", model="fake-1",
                  estimated=10_000, params={"stage": "bridge", "prompt": "x", "negative_prompt": "", "n": 1,
                                            "seed": 5, "width": 64, "height": 64, "tags": {}},
                  attempts=[], status="running", attempt=1, lease_owner=f"{socket.gethostname()}:{holder.pid}:0",
                  lease_expires_at=utcnow() + timedelta(seconds=lease_left)))
        s.flush()
        s.add(LedgerEntry(project_id=project_id, job_id=job_id, kind="hold", amount=10_000, engine="fake-paid"))
    return job_id


def test_a_lease_renewed_after_the_sweep_read_it_is_not_taken(make_settings: SettingsFactory) -> None:
    """The sweep judged a lease run out on a read made before the write lock was its own; the live
    holder renewed it in between, and the recovery still failed the paid job ("interrupted") and
    captured its estimate, the image thrown away."""
    import asyncio

    from sqlalchemy import update
    from sqlmodel import col, select

    from orchestrator.models import LedgerEntry
    from orchestrator.services import Services

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # alive
    services = Services.build(make_settings(engines="fake-paid=tests.fakes:factory"))
    try:
        job_id = running_paid_job(services, holder, lease_left=-1)
        [orphan] = [job for job in services.scheduler._orphans(False) if job.id == job_id]
        with services.db.transaction() as s:  # the holder's beat takes the lock first
            renewed = utcnow() + timedelta(seconds=60)
            s.execute(update(Job).where(col(Job.id) == job_id).values(lease_expires_at=renewed))
        assert services.scheduler._recover_one(orphan) is None
        with services.db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.status == "running" and job.error is None
            kinds = s.exec(select(LedgerEntry.kind).where(col(LedgerEntry.job_id) == job_id)).all()
        assert list(kinds) == ["hold"]
    finally:
        holder.kill()
        asyncio.run(services.aclose())


def test_a_failed_lease_renewal_is_tried_again_within_seconds(make_settings: SettingsFactory,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failure the next try waited a whole beat (a third of the lease) on top of the
    failed one's wait for the lock (up to 30 s): a database busy for under a minute let another
    worker take a live paid job."""
    import asyncio
    import time

    from orchestrator import queue
    from orchestrator.services import Services

    services = Services.build(make_settings(lease_seconds=60.0))  # a beat of 20 s
    tries: list[float] = []
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:  # the heartbeat's waits, told and cut short
        waits.append(seconds)
        await real_sleep(min(seconds, 0.01))

    monkeypatch.setattr(queue.asyncio, "sleep", sleep)  # type: ignore[attr-defined]

    def renew(claims: list[Any]) -> None:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise RuntimeError("database is locked")

    monkeypatch.setattr(services.scheduler, "_renew", renew)

    async def beat() -> None:
        services.scheduler._running["job_x"] = (asyncio.current_task(), object())  # type: ignore[assignment]
        loop = asyncio.ensure_future(services.scheduler._heartbeat_loop())
        while len(tries) < 2:
            await real_sleep(0.01)
        loop.cancel()
        services.scheduler._running.clear()

    try:
        asyncio.run(asyncio.wait_for(beat(), timeout=30))
    finally:
        asyncio.run(services.aclose())
    assert len(tries) == 2 and waits[:2] == [20.0, queue.RENEW_RETRY_SECONDS]  # not another beat


def test_a_cancel_does_not_take_a_job_from_a_holder_that_renewed_meanwhile(make_settings: SettingsFactory) -> None:
    """The cancel judged the holder gone in one transaction and ended the job in another: a live
    holder's renewal in between did not stop it from capturing the estimate of a job still running."""
    import asyncio

    from orchestrator.services import Services

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    services = Services.build(make_settings(engines="fake-paid=tests.fakes:factory"))
    try:
        job_id = running_paid_job(services, holder, lease_left=60)
        assert services.jobs.cancel_orphan(job_id) is False
        assert services.jobs.get(job_id).status == "running"
    finally:
        holder.kill()
        asyncio.run(services.aclose())


def test_a_sweep_duty_that_keeps_failing_leaves_the_others_to_run(make_settings: SettingsFactory,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The duties ran in one try: a job recovery that kept failing (a row it cannot take) stopped
    every hold of a finished job from being settled, and the idempotency keys from expiring."""
    import asyncio
    import logging

    from orchestrator.services import Services

    services = Services.build(make_settings(sweep_interval=0.05, run_jobs=True))
    ran: list[str] = []

    async def broken_recovery(*, all_foreign: bool) -> list[str]:
        raise RuntimeError("a row recovery cannot take")

    monkeypatch.setattr(services.scheduler, "recover", broken_recovery)
    monkeypatch.setattr(services.scheduler, "_sweep_ledger", lambda: ran.append("ledger"))
    services.scheduler.sweepers.append(("counting", lambda: ran.append("counting")))

    async def scenario() -> None:
        task = asyncio.ensure_future(services.scheduler._sweep_loop())
        while ran.count("counting") < 3:
            await asyncio.sleep(0.02)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="orchestrator.queue"):
        try:
            asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        finally:
            asyncio.run(services.aclose())
    assert ran.count("ledger") >= 3
    failed = [r for r in caplog.records if "recovering orphaned jobs" in r.getMessage()]
    assert [r.getMessage() for r in failed] == ["recovering orphaned jobs failed; trying again every 0.05 s"]
