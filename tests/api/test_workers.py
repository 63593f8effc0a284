"""Separate workers: API servers that run no jobs, `orchestrator worker` processes, one process per
local device, and cancels and event streams across processes."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from sqlalchemy import update
from sqlmodel import col, select

from orchestrator import workers
from orchestrator.clock import utcnow
from orchestrator.events import EVICT_EVERY, HISTORY_TTL, EventBus
from orchestrator.follow import catch_up
from orchestrator.ids import new_id
from orchestrator.models import Asset, Job, LedgerEntry, Project
from orchestrator.runner import Claim
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.workers import DeviceLock, Presence, device_holders, device_key
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
    wait_for_log,
    worker_process,
)
from tests.tiers.conftest import HeldRequest, png_bytes, until
from tiers import tiny
from tiers._cloud import CloudEngine
from tiers.base import CancelToken
from tiers.lite import LiteEngine

SettingsFactory = Callable[..., Settings]
PARAMS: dict[str, Any] = {"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
                          "width": 64, "height": 64, "steps": 1, "tags": {}}


@pytest.fixture
def services(make_settings: SettingsFactory) -> Iterator[Services]:
    engines = "fake-paid=tests.fakes:factory,fake-queue=tests.fakes:queue_factory"
    built = Services.build(make_settings(engines=engines))
    try:
        yield built
    finally:
        asyncio.run(built.aclose())


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of this host, to stand for another worker in lease owners."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def lock_held_elsewhere(path: Path) -> Iterator[None]:
    """Another process holds the flock on `path` (a device lock) until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
         str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        yield
    finally:
        holder.kill()
        holder.wait()


def add_job(services: Services, engine: str = "lite", **values: Any) -> str:
    project_id, job_id = new_id("prj"), new_id("job")
    with services.db.transaction() as s:
        s.add(Project(id=project_id, name="workers", policy="balanced"))
        s.flush()
        s.add(Job(id=job_id, project_id=project_id, stage="ideation", engine=engine, model=tiny.NAME,
                  **{"params": PARAMS, "attempts": [], **values}))
    return job_id


def row(services: Services, job_id: str) -> Job:
    with services.db.session() as s:
        job = s.get(Job, job_id)
    assert job is not None
    return job


def stopped_attempt(*, started: bool) -> dict[str, Any]:
    """An attempt a stop ended, as the runner records it (`_requeue_unsent`)."""
    return {"engine": "lite", "status": "interrupted", "error": {"code": "interrupted", "message": "stopped",
                                                                 "details": {"graceful": True, "started": started}}}


@pytest.mark.parametrize(("attempts", "said"), [
    ([], "canceled before it started"),
    ([stopped_attempt(started=False)], "canceled before it started"),  # a claim a stop gave back unstarted
    ([stopped_attempt(started=False), stopped_attempt(started=True)], "canceled while queued to run again"),
    ([{"engine": "lite", "status": "interrupted", "error": None}], "canceled while queued to run again"),  # a crash
])
def test_a_queued_job_s_cancel_says_whether_it_had_run(services: Services, attempts: list[dict[str, Any]],
                                                       said: str) -> None:
    """A draft queued again after its worker stopped three times was "canceled before it started"."""
    job_id = add_job(services, status="queued", attempt=len(attempts), attempts=attempts)
    assert services.jobs.cancel_queued(job_id)
    job = row(services, job_id)
    assert job.status == "canceled" and job.error is not None and job.error["message"] == said


def test_a_worker_stopped_during_a_model_load_does_not_wait_for_it(
        make_settings: SettingsFactory, tmp_path: Path, start_server: Callable[[Settings], httpx.Client]) -> None:
    """Nothing interrupts a model load (minutes, for a first download): the worker settled its
    job, then waited for the load at the interpreter's exit, past a supervisor's stop timeout."""
    settings = make_settings(run_jobs=False, poll_interval=0.1)
    client = start_server(settings)
    project = create_project(client)["id"]
    slow_load = ("import time, orchestrator.services, tiers._local\n"
                 "orchestrator.services.DEVICE_IDLE_TIMEOUT = 0.5\n"
                 "def load(*args, **kwargs):\n    print('load started', flush=True)\n    time.sleep(120)\n"
                 "tiers._local.LocalRuntime._load_pipeline = load\n")
    with worker_process(settings, tmp_path, "worker.log", before=slow_load) as worker:
        job = submit_draft(client, project)
        wait_for_log(tmp_path / "worker.log", "load started", worker)
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        assert time.monotonic() - began < 30
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # for the next worker


def test_an_api_server_without_jobs_hands_drafts_to_a_worker(make_settings: SettingsFactory, tmp_path: Path,
                                                             start_server: Callable[[Settings], httpx.Client]) -> None:
    settings = make_settings(run_jobs=False, poll_interval=0.1)
    client = start_server(settings)
    project = create_project(client)["id"]
    job = submit_draft(client, project, n=2)
    # Nothing runs jobs yet, and the operator can see it.
    assert client.get("/v1/workers").json() == {"items": [], "next_cursor": None, "runs_jobs_here": False,
                                                  "queued": 1}
    with worker_process(settings, tmp_path, "worker.log") as worker:
        # The stream is told from the job's row by the API server: the worker runs the job.
        events = read_events(client, job["id"], timeout=120)
        kinds = [e.event for e in events]
        assert kinds[:2] == ["queued", "started"], kinds
        assert [k for k in kinds if k in TERMINAL] == ["succeeded"] and kinds[-1] == "succeeded"
        announced = [e.data["asset_id"] for e in events if e.event == "asset"]
        assert [e.data["index"] for e in events if e.event == "asset"] == [0, 1]
        done = client.get(f"/v1/jobs/{job['id']}").json()
        assert done["status"] == "succeeded" and done["assets"] == announced
        assert events[-1].data["assets"] == announced
        content = client.get(f"/v1/assets/{announced[0]}/content")
        assert content.status_code == 200 and content.content.startswith(b"\x89PNG")

        # A job queued while the worker waits is found by its look at the queue.
        second = submit_draft(client, project, seed=7)
        assert wait_for_job(client, second["id"], timeout=60)["status"] == "succeeded"
        [seen] = client.get("/v1/workers").json()["items"]
        assert (seen["pid"], seen["this_process"], seen["running_jobs"]) == (worker.pid, False, [])
        assert [d.startswith("cpu@") for d in seen["devices"]] == [True]  # it holds the device it ran on
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log, log
    # Its log is also kept in the data dir, each line with its pid.
    kept = (settings.data_dir / "logs" / "orchestrator.log").read_text()
    assert f" {worker.pid} INFO orchestrator.worker: " in kept, kept


def test_ctrl_c_stops_a_worker_with_one_line_and_status_130(make_settings: SettingsFactory, tmp_path: Path) -> None:
    # As every command ends on Ctrl-C (it exited 0 without a word: a script could not tell).
    with worker_process(make_settings(run_jobs=False), tmp_path, "worker.log") as worker:
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 130
    log = (tmp_path / "worker.log").read_text()
    assert "stopping" in log and log.rstrip().endswith("orchestrator: interrupted") and "Traceback" not in log, log


def test_a_cancel_through_the_api_server_stops_the_worker_s_job(
        make_settings: SettingsFactory, tmp_path: Path, start_server: Callable[[Settings], httpx.Client]) -> None:
    settings = make_settings(run_jobs=False, poll_interval=0.1)
    client = start_server(settings)
    project = create_project(client)["id"]
    with worker_process(settings, tmp_path, "worker.log"):
        job = submit_draft(client, project, **SLOW)
        events: list[SSE] = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=120) as response:
            stream = iter_sse(response)
            for event in stream:
                events.append(event)
                if event.event == "progress":  # the worker wrote its progress to the row
                    break
            assert events[-1].event == "progress", [e.event for e in events]
            cancel = client.post(f"/v1/jobs/{job['id']}/cancel")
            assert cancel.status_code == 202, cancel.text
            # Asked of the worker, which ends it: woken by the bell, it may have done so before this
            # answer read the row back (the asserts below tell its own end from a write-off).
            assert cancel.json()["status"] in ("running", "canceled"), cancel.json()
            events.extend(stream)
        kinds = [e.event for e in events]
        assert [k for k in kinds if k in TERMINAL] == ["canceled"] and "asset" not in kinds
        done = wait_for_job(client, job["id"], ("canceled",), timeout=30)
        # Ended by the worker's own runner (its attempt recorded), not written off as an orphan.
        assert done["error"]["code"] == "canceled"
        assert done["attempts"][-1]["status"] == "canceled"
        assert "gone" not in done["error"]["message"]
        assert done["progress"]["step"] < SLOW["steps"]
        assert_error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")


def test_an_api_server_that_runs_no_jobs_recovers_a_killed_worker_s_job(
        make_settings: SettingsFactory, tmp_path: Path, start_server: Callable[[Settings], httpx.Client]) -> None:
    """Behind `serve --no-jobs` alone, a killed worker's draft read `running` until a worker
    started again, and `GET /v1/workers` showed no worker and nothing queued: nothing told an
    operator it waited. The server's own sweep puts it back in the queue."""
    settings = make_settings(run_jobs=False, poll_interval=0.1, sweep_interval=0.2)
    client = start_server(settings)
    project = create_project(client)["id"]
    with worker_process(settings, tmp_path, "worker.log") as worker:
        job = submit_draft(client, project, **SLOW)
        wait_for_job(client, job["id"], ("running",), timeout=60)
        worker.kill()
        worker.wait(timeout=30)
        queued = wait_for_job(client, job["id"], ("queued",), timeout=30)
    assert queued["attempts"][-1]["status"] != "succeeded"
    listed = client.get("/v1/workers").json()
    assert (listed["items"], listed["queued"]) == ([], 1)


def test_a_cancel_asked_of_a_live_holder_wins_over_its_success(
        services: Services, other_process: subprocess.Popen[bytes]) -> None:
    job_id = add_job(services)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    # Seen from another process, the job's holder is a live process on this host.
    with services.db.transaction() as s:
        s.execute(update(Job).where(col(Job.id) == job_id)
                  .values(lease_owner=f"{socket.gethostname()}:{other_process.pid}:0"))
    assert services.jobs.ask_holder_to_cancel(job_id)
    assert row(services, job_id).status == "running"  # its holder ends it

    # The holder finishes rendering before it looks for cancels: the success is not kept.
    asyncio.run(services.runner.run(claim))
    job = row(services, job_id)
    assert job.status == "canceled"
    assert job.error is not None and job.error["code"] == "canceled"
    with services.db.session() as s:
        assert s.exec(select(Asset).where(col(Asset.job_id) == job_id)).all() == []


def test_a_cancel_asked_of_a_live_holder_wins_over_its_failure(
        services: Services, other_process: subprocess.Popen[bytes]) -> None:
    """The cancel was answered 202: the job ends canceled, and the ledger settles what the failure
    says was charged (nothing here: the hold is released)."""
    job_id = add_job(services, engine="fake-paid", estimated=10_000,
                     params={**PARAMS, "stage": "bridge", "tags": {"fake": "fail"}})
    with services.db.transaction() as s:
        project_id = s.get(Job, job_id).project_id  # type: ignore[union-attr]
        s.add(LedgerEntry(project_id=project_id, job_id=job_id, kind="hold", amount=10_000, engine="fake-paid"))
    [(claim, _lane)] = services.scheduler._claim_ready({})
    with services.db.transaction() as s:
        s.execute(update(Job).where(col(Job.id) == job_id)
                  .values(lease_owner=f"{socket.gethostname()}:{other_process.pid}:0"))
    assert services.jobs.ask_holder_to_cancel(job_id)

    asyncio.run(services.runner.run(claim))  # the engine fails before the cancel reaches the token
    job = row(services, job_id)
    assert job.status == "canceled" and job.error is not None and job.error["code"] == "canceled"
    assert "fake engine failed" in job.error["message"]
    with services.db.session() as s:
        kinds = sorted(e.kind for e in s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)).all())
    assert kinds == ["hold", "release"]


def test_a_cancel_of_a_job_whose_holder_is_dead_is_not_left_waiting(services: Services) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job_id = add_job(services, status="running", attempt=1, lease_owner=f"{socket.gethostname()}:{dead.pid}:0",
                     lease_expires_at=utcnow() + timedelta(minutes=5))
    assert not services.jobs.ask_holder_to_cancel(job_id)  # nobody would see the request
    assert services.jobs.cancel_orphan(job_id)
    job = row(services, job_id)
    assert job.status == "canceled"
    # Told as recovery tells it: the error's shape, and the ended attempt in the job's history.
    assert job.error == {"code": "canceled", "message": "canceled; its worker was gone", "details": {}}
    assert job.attempts and job.attempts[-1] == {"engine": job.engine, "status": "canceled", "error": job.error}


def test_a_cancel_of_a_dead_worker_s_job_tells_its_start_before_its_end(services: Services) -> None:
    """An API server that runs no jobs knows a draft only as submitted (its worker ran it, unwatched):
    the cancel that finds the worker dead told `queued`, `canceled`, where a stream built from the row
    (another server's), and the same end reached by recovery, tell its `started` first."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job_id = add_job(services, status="running", attempt=1, lease_owner=f"{socket.gethostname()}:{dead.pid}:0",
                     lease_expires_at=utcnow() + timedelta(minutes=5), started_at=utcnow())
    services.bus.publish(job_id, "queued", {"job_id": job_id, "status": "queued"})  # as its submit did
    assert services.jobs.cancel_orphan(job_id)
    told = [(e.type, e.data.get("attempt")) for e in services.bus._jobs[job_id].snapshot()]
    assert told == [("queued", None), ("started", 1), ("canceled", None)]


def test_a_cancel_of_a_job_queued_again_tells_its_earlier_start(services: Services) -> None:
    """Its worker died and recovery queued it again: canceled there, an API server that knew it only
    as submitted told `queued`, `canceled`, where a stream built from the row tells its start too.
    A job that never started is told no start."""
    ran = add_job(services, status="queued", attempt=1, started_at=utcnow(),
                  attempts=[{"engine": "lite", "status": "interrupted", "error": None}])
    never = add_job(services, status="queued")
    for job_id in (ran, never):
        services.bus.publish(job_id, "queued", {"job_id": job_id, "status": "queued"})  # as its submit did
        assert services.jobs.cancel_queued(job_id)
    told = [(e.type, e.data.get("attempt")) for e in services.bus._jobs[ran].snapshot()]
    assert told == [("queued", None), ("started", 1), ("canceled", None)]
    assert [e.type for e in services.bus._jobs[never].snapshot()] == ["queued", "canceled"]


@pytest.mark.parametrize("status", ["running", "queued"])
def test_a_cancel_of_a_moved_job_tells_its_fallback_before_its_start(services: Services, status: str) -> None:
    """A job moved to another engine (its worker there dead, or queued again there), canceled: an API
    server that knew it only as submitted told its start on the engine moved to without the move,
    where a stream built from the row, and the worker's own, tell the `fallback` first."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    moved = {"engine": "fake-paid", "status": "failed", "error": {"code": "engine_error", "message": "down",
                                                                  "details": {}}}
    held: dict[str, Any] = ({"lease_owner": f"{socket.gethostname()}:{dead.pid}:0",
                             "lease_expires_at": utcnow() + timedelta(minutes=5)} if status == "running" else {})
    job_id = add_job(services, status=status, attempt=2, started_at=utcnow(), attempts=[moved], **held)
    services.bus.publish(job_id, "queued", {"job_id": job_id, "status": "queued"})  # as its submit did
    assert (services.jobs.cancel_orphan if status == "running" else services.jobs.cancel_queued)(job_id)
    told = [(e.type, e.data.get("state"), e.data.get("from")) for e in services.bus._jobs[job_id].snapshot()]
    assert told == [("queued", None, None), ("state", "fallback", "fake-paid"), ("started", None, None),
                    ("canceled", None, None)]
    from_row = EventBus()
    catch_up(from_row, row(services, job_id), [])
    assert [e.type for e in from_row._jobs[job_id].snapshot()] == [t for t, _, _ in told]


def test_a_cancel_of_a_job_run_again_elsewhere_tells_its_new_start(services: Services) -> None:
    """A stream here told the job's first start, then went unwatched while another worker ran it again
    (attempt 2) and died: the cancel told the end after the first start alone, where a stream that
    followed the row tells it queued again and started again (`catch_up`) before its end."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job_id = add_job(services, status="running", attempt=2, lease_owner=f"{socket.gethostname()}:{dead.pid}:0",
                     lease_expires_at=utcnow() + timedelta(minutes=5), started_at=utcnow(),
                     attempts=[{"engine": "lite", "status": "interrupted", "error": None}])
    services.bus.publish(job_id, "queued", {"job_id": job_id, "status": "queued"})
    services.bus.publish(job_id, "started", {"job_id": job_id, "status": "running", "engine": "lite", "attempt": 1})
    assert services.jobs.cancel_orphan(job_id)
    told = [(e.type, e.data.get("attempt"), e.data.get("requeued")) for e in services.bus._jobs[job_id].snapshot()]
    assert told == [("queued", None, None), ("started", 1, None), ("queued", 1, True), ("started", 2, None),
                    ("canceled", None, None)]


def test_recovery_ends_a_job_whose_worker_died_before_it_saw_the_cancel(services: Services) -> None:
    job_id = add_job(services, status="running", attempt=1, lease_owner="dead-host:1:0",
                     lease_expires_at=utcnow() - timedelta(seconds=1), cancel_requested_at=utcnow())
    assert asyncio.run(services.scheduler.recover(all_foreign=False)) == [job_id]
    job = row(services, job_id)
    # Not queued again (a local job would otherwise run after the client was told 202).
    assert job.status == "canceled"
    assert job.error is not None and job.error["code"] == "canceled"
    assert job.attempts and job.attempts[-1]["status"] == "canceled"


def test_the_sweeper_recovers_a_dead_worker_s_job_before_its_lease_ends(
        services: Services, other_process: subprocess.Popen[bytes]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease: dict[str, Any] = {"status": "running", "attempt": 1, "lease_expires_at": utcnow() + timedelta(minutes=5)}
    dead_id = add_job(services, lease_owner=f"{socket.gethostname()}:{dead.pid}:0", **lease)
    live_id = add_job(services, lease_owner=f"{socket.gethostname()}:{other_process.pid}:0", **lease)
    elsewhere_id = add_job(services, lease_owner="another-host:1:0", **lease)
    # A worker killed on this host: its local job runs again without waiting 5 minutes.
    assert asyncio.run(services.scheduler.recover(all_foreign=False)) == [dead_id]
    assert row(services, dead_id).status == "queued"
    assert row(services, live_id).status == row(services, elsewhere_id).status == "running"


def test_local_jobs_wait_for_the_process_that_holds_the_device(services: Services) -> None:
    lock = services.scheduler.device
    assert lock is not None and not lock.held
    local_id = add_job(services)
    remote_id = add_job(services, engine="fake-paid")
    with lock_held_elsewhere(lock.path):
        # Another process runs this device's jobs; a remote job is not held up behind them.
        claims = services.scheduler._claim_ready({})
        assert [c.job.id for c, _lane in claims] == [remote_id]
        assert row(services, local_id).status == "queued" and not lock.held
    # The holder died (the kernel dropped its lock). Looks that bells wake (each commit of the busy
    # holder rings) leave the device alone until the next timed look, which takes it over.
    assert services.scheduler._claim_ready({"remote:fake-paid": 1}) == []
    services.scheduler._device_elsewhere_until = 0.0  # ORCH_POLL_INTERVAL later
    [(claim, lane)] = services.scheduler._claim_ready({"remote:fake-paid": 1})
    assert (claim.job.id, lane) == (local_id, "local") and lock.held


def test_a_process_takes_the_device_only_when_it_has_a_local_job(services: Services) -> None:
    lock = services.scheduler.device
    assert lock is not None
    add_job(services, engine="fake-paid")
    services.scheduler._claim_ready({})
    assert not lock.held  # a worker running remote jobs only leaves the GPU to those that need it


def test_lock_files_are_never_opened_through_a_symbolic_link(tmp_path: Path) -> None:
    """Another user of a shared data dir could link a lock's predictable name to any file: taking
    the lock truncated and wrote it (as root, any file)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT\n")
    folder = tmp_path / "locks"
    folder.mkdir()
    lock = DeviceLock(folder, lambda: "cuda")
    lock.path.symlink_to(victim)
    assert lock.try_acquire()  # runs as one process would, without the lock, rather than write there
    lock.close()
    presence = Presence(folder, shared_database=True)
    (folder / "owners").mkdir()
    presence._path("me").symlink_to(victim)
    presence.enter("me")
    presence.leave("me")
    assert victim.read_text() == "IMPORTANT\n"


def test_a_fifo_in_the_lock_folder_holds_nothing_up(tmp_path: Path) -> None:
    """Put there by another user of a shared data dir, a FIFO named as a lock held each probe's
    open (the sweep, the dispatch, `GET /v1/workers`) until someone wrote to it."""
    folder = tmp_path / "locks"
    (folder / "owners").mkdir(parents=True)
    os.mkfifo(folder / "cuda.lock")
    presence = Presence(folder, shared_database=False)
    os.mkfifo(presence._path("ghost"))
    done = threading.Event()

    def look() -> None:
        assert device_holders(folder) == {}
        assert not presence.alive("ghost") and presence.live() == [] and not presence.serves("lite")
        presence.forget(keep=())
        done.set()

    threading.Thread(target=look, daemon=True).start()
    assert done.wait(10), "a FIFO held the lock folder's readers"


def test_device_lock_is_exclusive_between_processes_and_named_per_gpu(tmp_path: Path) -> None:
    first, second = DeviceLock(tmp_path, lambda: "cuda"), DeviceLock(tmp_path, lambda: "cuda")
    code = ("import sys\nfrom pathlib import Path\nfrom orchestrator.workers import DeviceLock\n"
            "print(DeviceLock(Path(sys.argv[1]), lambda: 'cuda').try_acquire())")
    assert first.try_acquire()
    taken = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert taken.stdout.strip() == "False"
    first.close(release=False)  # stopping, the model still on the device: kept, and never taken again
    assert not second.try_acquire()
    first.close()
    assert not first.try_acquire()
    assert second.try_acquire() and second.held
    second.close()
    # Workers pinned to different GPUs both see "cuda": their locks must differ; one GPU named
    # with or without the variable is one lock; a GPU named by its UUID needs no variable.
    gpu0, gpu1 = (device_key("cuda", {"CUDA_VISIBLE_DEVICES": v}) for v in ("0", "1"))
    assert gpu0 != gpu1 and gpu0 == device_key("cuda", {})
    uuid = "cuda-GPU-8f0e4c2a"
    assert device_key(uuid, {"CUDA_VISIBLE_DEVICES": "3"}) == device_key(uuid, {})
    assert device_key("cpu", {"CUDA_VISIBLE_DEVICES": "0"}) == device_key("cpu", {})
    assert "/" not in device_key("cuda", {"CUDA_VISIBLE_DEVICES": "../x"})


def refused(path: Path) -> Any:
    """What opening a lock file for writing answers when another user's worker made it (0644)."""
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def test_a_device_lock_file_another_user_made_is_locked_read_only(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker that could not open the file for writing ran its local jobs without the lock, for
    # good, on the GPU another user's worker was running a pipeline on.
    folder = tmp_path / "locks"
    first = DeviceLock(folder, lambda: "cpu")
    first.holder = "worker of user a"
    assert first.try_acquire()
    monkeypatch.setattr(workers, "open_lock_file", refused)
    second = DeviceLock(folder, lambda: "cpu")
    assert not second.try_acquire() and not second.held  # busy: left to its holder
    first.close()
    assert second.try_acquire() and second.held  # locked through a read-only descriptor
    third = DeviceLock(folder, lambda: "cpu")
    assert not third.try_acquire()  # ...which others see held
    assert list(device_holders(folder).values()) == ["worker of user a"]  # a name it could not write
    second.close()


def test_a_device_lock_that_cannot_be_opened_is_tried_again_at_each_dispatch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # One failure ran local jobs without the lock until the process ended, even once another
    # worker could be seen holding it.
    lock = DeviceLock(tmp_path / "locks", lambda: "cpu")
    monkeypatch.setattr(workers, "open_lock_file", refused)  # no file, and none may be made
    with caplog.at_level(logging.ERROR, logger="orchestrator.workers"):
        assert lock.try_acquire() and not lock.held  # this dispatch runs local jobs without it
        assert lock.try_acquire() and not lock.held
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1  # told once
    monkeypatch.undo()
    with lock_held_elsewhere(lock.path):
        assert not lock.try_acquire()  # usable again: the holder is seen
    assert lock.try_acquire() and lock.held
    lock.close()


PRESENCE_HOLDER = """
import sys, time
from pathlib import Path
from orchestrator.workers import Presence
presence = Presence(Path(sys.argv[1]), shared_database=False)
presence.enter(sys.argv[2])
print("in", flush=True)
time.sleep(120)
"""


def test_another_machine_s_worker_serves_its_engines_while_it_touches_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its lock tells nothing here (another kernel); a host that is gone for good (decommissioned,
    # an old pod) left its file, which made its engines look served forever: their queued jobs
    # waited and their orphans were never recovered.
    # Told by whether the file changes, by this process's own clock: the hosts' clocks may differ.
    clock = [1000.0]
    monkeypatch.setattr("orchestrator.workers.time.monotonic", lambda: clock[0])
    presence = Presence(tmp_path, shared_database=True, stale_after=60)
    (tmp_path / "owners").mkdir()
    elsewhere = tmp_path / "owners" / "gpu-host_9_ab.lock"
    elsewhere.write_text("gpu-host:9:ab\nanother-boot-id\nlite,comfyui\n")
    os.utime(elsewhere, (5, 5))  # its host's clock is years behind
    assert presence.serves("comfyui") and not presence.serves("gemini")  # first seen: may have just touched it
    clock[0] += 59
    assert presence.serves("comfyui")
    assert [(w.owner, w.engines, w.this_machine) for w in presence.workers()] == [
        ("gpu-host:9:ab", ["lite", "comfyui"], False)]
    clock[0] += 2
    assert not presence.serves("comfyui")  # not touched for a minute: its host is gone
    assert presence.workers() == []
    (tmp_path / "owners" / "a-fifo.lock").mkdir()  # a file that cannot be read is passed over
    assert presence.workers() == []
    (tmp_path / "owners" / "a-fifo.lock").rmdir()
    os.utime(elsewhere, (6, 6))  # ...or back, touching it again
    assert presence.serves("comfyui")
    old = time.time() - 120
    # A live owner keeps its file fresh.
    mine = Presence(tmp_path, shared_database=True, stale_after=60)
    mine.enter("this-host:1:cd", ["lite", "fal"])
    try:
        os.utime(mine._path("this-host:1:cd"), (old, old))
        mine.touch("this-host:1:cd")
        assert time.time() - mine._path("this-host:1:cd").stat().st_mtime < 60
        assert presence.serves("fal")  # this machine's: told by its lock
    finally:
        mine.leave("this-host:1:cd")
    assert not presence.serves("fal")


def test_owners_are_told_alive_or_gone_by_their_lock_not_their_pid(tmp_path: Path) -> None:
    # Another container on this machine: another host name, a pid this process cannot see.
    owner = "another-container:7:1f"
    holder = subprocess.Popen([sys.executable, "-c", PRESENCE_HOLDER, str(tmp_path), owner], stdout=subprocess.PIPE)
    presence = Presence(tmp_path, shared_database=False)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"in\n"
        assert presence.alive(owner) and not presence.gone(owner)
        assert presence.forget([]) == 0  # a live owner's file stays
    finally:
        holder.kill()
        holder.wait()
    assert not presence.alive(owner) and presence.gone(owner)  # the kernel dropped its lock
    # Without a file (an owner from before these files): judged by host name and pid, as before.
    assert not presence.alive("another-container:8:1f") and not presence.gone("another-container:8:1f")
    assert Presence(tmp_path, shared_database=True).alive("another-host:8:1f")
    # A stopped owner's file goes once no running job names it.
    assert presence.forget([owner]) == 0
    assert presence.forget([]) == 1 and not presence.gone(owner)


def test_a_stopped_scheduler_s_jobs_are_recovered_without_waiting_for_the_lease(services: Services) -> None:
    other = Services.build(services.settings)
    asyncio.run(other.scheduler.start())
    job_id = add_job(services, status="running", attempt=1, lease_owner=other.scheduler.owner,
                     lease_expires_at=utcnow() + timedelta(minutes=5))
    assert services.scheduler.presence.alive(other.scheduler.owner)
    assert asyncio.run(services.scheduler.recover(all_foreign=False)) == []
    asyncio.run(other.aclose())  # a graceful stop leaves its running jobs for recovery
    assert asyncio.run(services.scheduler.recover(all_foreign=False)) == [job_id]
    assert row(services, job_id).status == "queued"


def test_a_job_a_stop_queues_again_lists_that_attempt_and_is_no_crash_loop(services: Services) -> None:
    """A job on its fourth attempt listed none of the three a stop (SIGTERM, a deploy) had queued
    again; and being stopped under is not crashing: stops never get a job given up."""
    from orchestrator.queue import MAX_RECOVERIES

    job_id = add_job(services)
    for stop in range(1, MAX_RECOVERIES + 1):
        [(claim, _lane)] = services.scheduler._claim_ready({})
        claim.shutdown = True  # what the scheduler's stop does to every running claim
        claim.cancel.cancel(abandon=True)
        asyncio.run(services.runner.run(claim))
        services.scheduler._claimed.pop(job_id)  # as the dispatch that ran it does
        job = row(services, job_id)
        assert job.status == "queued" and job.attempt == stop
        assert [a["status"] for a in job.attempts or []] == ["interrupted"] * stop
        assert (job.attempts or [])[-1]["error"]["details"] == {"engine": "lite", "graceful": True, "started": True}
    with services.db.transaction() as s:  # ...and the process dies under the next attempt
        s.execute(update(Job).where(col(Job.id) == job_id).values(
            status="running", attempt=MAX_RECOVERIES + 1, lease_owner="dead-host:1:0",
            lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert asyncio.run(services.scheduler.recover(all_foreign=False)) == [job_id]
    job = row(services, job_id)
    assert job.status == "queued" and len(job.attempts or []) == MAX_RECOVERIES + 1  # a first crash
    crash = (job.attempts or [])[-1]["error"]
    assert crash["code"] == "interrupted" and crash["details"] == {"engine": "lite"}  # said, as a stop is
    assert "queued again" in crash["message"]


def test_a_shutdown_that_meets_a_cancel_from_another_process_releases_the_hold(services: Services) -> None:
    job_id = add_job(services, engine="fake-paid", estimated=10_000)
    with services.db.transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        services.ledger.hold(s, services.ledger.lock_project(s, job.project_id), job, 10_000)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    with services.db.transaction() as s:
        s.execute(update(Job).where(col(Job.id) == job_id).values(cancel_requested_at=utcnow()))
    # The service stops before its cancel watch has seen the request; nothing was sent.
    claim.shutdown = True
    claim.cancel.cancel(abandon=True)
    asyncio.run(services.runner.run(claim))
    assert row(services, job_id).status == "canceled"
    with services.db.session() as s:
        kinds = [e.kind for e in s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)
                                        .order_by(col(LedgerEntry.id))).all()]
    assert kinds == ["hold", "release"]


def test_recovery_does_not_queue_again_a_job_canceled_since_it_looked(services: Services) -> None:
    job_id = add_job(services, status="running", attempt=1, lease_owner="dead-host:1:0",
                     lease_expires_at=utcnow() - timedelta(seconds=1))
    seen = row(services, job_id)  # the sweeper's read, before the cancel
    with services.db.transaction() as s:
        s.execute(update(Job).where(col(Job.id) == job_id).values(cancel_requested_at=utcnow()))
    assert services.scheduler._recover_one(seen) is None
    assert row(services, job_id).status == "running"
    # The next sweep reads the request and ends the job canceled.
    assert asyncio.run(services.scheduler.recover(all_foreign=False)) == [job_id]
    assert row(services, job_id).status == "canceled"


def test_idle_streams_of_jobs_run_elsewhere_are_dropped_and_held_ones_kept() -> None:
    bus = EventBus()
    bus.pinned = lambda job_id: job_id == "job_held"
    for job_id in ("job_elsewhere", "job_held"):
        bus.publish(job_id, "queued", {"job_id": job_id, "status": "queued"})
    for stream in bus._jobs.values():
        stream.touched -= HISTORY_TTL + 1
    bus._evicted_at -= EVICT_EVERY
    bus.publish("job_new", "queued", {"job_id": "job_new", "status": "queued"})
    assert not bus.knows("job_elsewhere") and bus.knows("job_held") and bus.knows("job_new")
    # A stream rebuilt after that numbers its events above everything this process sent.
    before = max(e.id for s in bus._jobs.values() for e in s.history)
    bus.publish("job_elsewhere", "queued", {"job_id": "job_elsewhere", "status": "queued"})
    assert bus._jobs["job_elsewhere"].history[0].id > before


def test_catching_up_tells_no_start_for_a_job_that_never_ran_and_a_new_one_for_a_rerun(services: Services) -> None:
    never = Job(id="job_never", project_id="prj", stage="ideation", engine="lite", status="canceled", attempt=0)
    rerun = Job(id="job_rerun", project_id="prj", stage="ideation", engine="lite", status="running", attempt=2,
                started_at=utcnow(), progress_step=3, progress_total=30)
    bus = EventBus()
    catch_up(bus, never, [])
    assert [e.type for e in bus._jobs["job_never"].history] == ["queued", "canceled"]
    bus.publish("job_rerun", "queued", {})
    bus.publish("job_rerun", "started", {"attempt": 1})
    bus.publish("job_rerun", "progress", {"step": 10, "total": 30})
    catch_up(bus, rerun, [])  # its first worker died at step 10; another took it before the next read
    events = bus._jobs["job_rerun"].snapshot()
    assert [(e.type, e.data.get("attempt"), e.data.get("step"), e.data.get("requeued")) for e in events][-3:] == [
        ("queued", 1, None, True), ("started", 2, None, None), ("progress", None, 3, None)]


def test_a_copy_s_stream_told_from_its_row_says_it_is_a_copy() -> None:
    # Another API process, or this one after a restart: the copy read as a paid render.
    now = utcnow()
    copy = Job(id="job_copy", project_id="prj", stage="bridge", engine="fake-paid", status="succeeded", attempt=0,
               cache_hit=True, started_at=now, finished_at=now, progress_step=1, progress_total=1)
    bus = EventBus()
    catch_up(bus, copy, ["ast_copy"])
    told = {e.type: e.data for e in bus._jobs["job_copy"].snapshot()}
    assert told["started"]["cache_hit"] is True and told["succeeded"]["cache_hit"] is True
    assert told["succeeded"]["assets"] == ["ast_copy"]
    render = Job(id="job_render", project_id="prj", stage="bridge", engine="fake-paid", status="succeeded",
                 attempt=1, started_at=now, finished_at=now, progress_step=1, progress_total=1)
    catch_up(bus, render, ["ast_render"])
    assert not any("cache_hit" in e.data for e in bus._jobs["job_render"].snapshot())


def test_a_fallback_ending_as_a_copy_is_told_from_its_row_as_a_start_on_the_engine_it_copied() -> None:
    # Told by its engine and cache_hit alone, the copy read on another process as the first
    # engine's image, after a render step that made nothing.
    now = utcnow()
    bus = EventBus()
    bus.publish("job_fb", "queued", {})
    catch_up(bus, Job(id="job_fb", project_id="prj", stage="bridge", engine="fake-paid", status="running", attempt=1,
                      started_at=now), [])
    copied = Job(id="job_fb", project_id="prj", stage="bridge", engine="fake-b", status="succeeded", attempt=2,
                 cache_hit=True, started_at=now, finished_at=now, progress_step=1, progress_total=1)
    catch_up(bus, copied, ["ast_copy"])
    told = [(e.type, e.data.get("engine"), e.data.get("attempt"), e.data.get("cache_hit"))
            for e in bus._jobs["job_fb"].snapshot()]
    assert told == [("queued", None, None, None), ("started", "fake-paid", 1, None), ("queued", None, 1, None),
                    ("started", "fake-b", 2, True), ("asset", None, None, None), ("succeeded", None, None, True)], told
    assert bus._jobs["job_fb"].latest_progress is None  # a live client was told a step of a render never made


def test_a_stream_told_from_its_row_tells_each_move_to_another_engine_once_and_before_its_start() -> None:
    failed = {"code": "engine_error", "message": "it broke", "retryable": True}
    moved = [{"engine": "fake-paid", "status": "failed", "error": failed}]
    bus = EventBus()
    bus.publish("job_m", "queued", {})
    bus.publish("job_m", "started", {"engine": "fake-paid", "attempt": 1})
    queued = Job(id="job_m", project_id="prj", stage="bridge", engine="fake-b", status="queued", attempt=1,
                 estimated=2500, attempts=moved)
    catch_up(bus, queued, [])
    catch_up(bus, queued, [])
    # Moved on again before the next read, and running on its third engine.
    third = [*moved, {"engine": "fake-b", "status": "failed", "error": failed}]
    running = Job(id="job_m", project_id="prj", stage="bridge", engine="fake-c", status="running", attempt=3,
                  estimated=1000, attempts=third, started_at=utcnow())
    catch_up(bus, running, [])
    told = [(e.type, e.data.get("from"), e.data.get("to"), e.data.get("estimate"), e.data.get("attempt"))
            for e in bus._jobs["job_m"].snapshot()]
    assert told == [("queued", None, None, None, None), ("started", None, None, None, 1),
                    ("state", "fake-paid", "fake-b", 2.5, None), ("queued", None, None, None, 1),
                    ("state", "fake-b", "fake-c", 1.0, None), ("started", None, None, None, 3)], told

    # A crash run again on its engine, and a failure that ended the job, moved nothing.
    again = Job(id="job_i", project_id="prj", stage="ideation", engine="lite", status="failed", attempt=2,
                started_at=utcnow(), attempts=[{"engine": "lite", "status": "interrupted", "error": None},
                                               {"engine": "lite", "status": "failed", "error": failed}],
                error=failed)
    catch_up(bus, again, [])
    assert not any(e.type == "state" for e in bus._jobs["job_i"].snapshot())


def test_a_stream_told_moves_out_of_order_tells_the_missing_one_not_a_repeat() -> None:
    # A stream a worker started at its claim, then told its own move live: moves are known by the
    # engine they left, not counted from the row's first.
    failed = {"code": "engine_error", "message": "it broke", "retryable": True}
    bus = EventBus()
    bus.publish("job_x", "queued", {})
    bus.publish("job_x", "started", {"engine": "fake-b", "attempt": 2})
    bus.publish("job_x", "state", {"state": "fallback", "from": "fake-b", "to": "fake-c", "error": failed})
    row = Job(id="job_x", project_id="prj", stage="bridge", engine="fake-c", status="queued", attempt=2,
              estimated=1000, started_at=utcnow(),
              attempts=[{"engine": "fake-paid", "status": "failed", "error": failed},
                        {"engine": "fake-b", "status": "failed", "error": failed}])
    catch_up(bus, row, [])
    catch_up(bus, row, [])
    moves = [(e.data["from"], e.data["to"]) for e in bus._jobs["job_x"].snapshot() if e.type == "state"]
    assert moves == [("fake-b", "fake-c"), ("fake-paid", "fake-b")], moves


def test_a_row_read_before_a_rerun_tells_nothing_after_the_rerun_started() -> None:
    # Two reads in flight (a client connecting while the follower reads): the older one, told
    # last, showed attempt 1's step 30 and hid attempt 2's steps below it.
    bus = EventBus()
    bus.publish("job_x", "queued", {})
    bus.publish("job_x", "started", {"attempt": 2})
    old = Job(id="job_x", project_id="prj", stage="ideation", engine="lite", status="running", attempt=1,
              started_at=utcnow(), progress_step=30, progress_total=40)
    catch_up(bus, old, [])
    catch_up(bus, Job(id="job_x", project_id="prj", stage="ideation", engine="lite", status="running", attempt=2,
                      started_at=utcnow(), progress_step=5, progress_total=40), [])
    told = bus._jobs["job_x"].snapshot()
    assert [(e.type, e.data.get("step")) for e in told] == [("queued", None), ("started", None), ("progress", 5)]


def test_a_row_read_before_a_requeue_tells_no_step_after_the_queued_again() -> None:
    """The route's read of a running row, told after the follower's newer read had told the job
    queued again: its step said the job ran again while it waited in the queue."""
    bus = EventBus()
    running = Job(id="job_r", project_id="prj", stage="ideation", engine="lite", status="running", attempt=1,
                  started_at=utcnow(), progress_step=2, progress_total=4)
    catch_up(bus, running, [])
    stale = Job(id="job_r", project_id="prj", stage="ideation", engine="lite", status="running", attempt=1,
                started_at=utcnow(), progress_step=3, progress_total=4)
    catch_up(bus, Job(id="job_r", project_id="prj", stage="ideation", engine="lite", status="queued", attempt=1,
                      started_at=utcnow()), [])
    catch_up(bus, stale, [])
    told = [(e.type, e.data.get("step"), e.data.get("requeued")) for e in bus._jobs["job_r"].snapshot()]
    assert told == [("queued", None, None), ("started", None, None), ("progress", 2, None), ("queued", None, True)]
    # Claimed again, the next attempt is told from its start.
    catch_up(bus, Job(id="job_r", project_id="prj", stage="ideation", engine="lite", status="running", attempt=2,
                      started_at=utcnow(), progress_step=1, progress_total=4), [])
    told = [(e.type, e.data.get("attempt"), e.data.get("step")) for e in bus._jobs["job_r"].snapshot()]
    assert told[-2:] == [("started", 2, None), ("progress", None, 1)]


def test_a_job_handed_back_unstarted_and_canceled_still_ends_its_stream() -> None:
    # A claim handed back to the queue (its engine's circuit open) takes its attempt back: a row
    # canceled after it says attempt 1 where the stream told attempt 2, and its end was never told.
    bus = EventBus()
    catch_up(bus, Job(id="job_w", project_id="prj", stage="bridge", engine="gemini", status="running", attempt=2,
                      started_at=utcnow()), [])
    catch_up(bus, Job(id="job_w", project_id="prj", stage="bridge", engine="gemini", status="canceled", attempt=1,
                      started_at=utcnow(), progress_step=3, progress_total=4,
                      error={"code": "canceled", "message": "canceled", "details": {}}), [])
    view = bus.view("job_w")
    assert view is not None and view.finished
    assert [e.type for e in bus._jobs["job_w"].snapshot()] == ["queued", "started", "canceled"]


def test_a_cancel_told_from_the_row_says_why() -> None:
    bus = EventBus()
    why = {"code": "canceled", "message": "the project's policy 'local-only' keeps it on this machine", "details": {}}
    catch_up(bus, Job(id="job_c", project_id="prj", stage="bridge", engine="gemini", status="canceled", attempt=0,
                      error=why), [])
    assert bus._jobs["job_c"].snapshot()[-1].data == {"job_id": "job_c", "status": "canceled", "error": why}


def test_the_follower_tells_a_stream_what_another_process_did(services: Services) -> None:
    job_id = add_job(services)

    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        bus, follower = services.bus, services.follower
        bus.bind(asyncio.get_running_loop())
        catch_up(bus, row(services, job_id), [])
        follower.follow(job_id)
        seen: list[tuple[str, dict[str, Any]]] = []

        async def listen() -> None:
            async for event in bus.subscribe(job_id):
                seen.append((event.type, event.data))

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0)  # the listener subscribes
        # Another process claims the job and writes its progress twice, then finishes it.
        with services.db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == job_id).values(status="running", attempt=1, started_at=utcnow(),
                                                                      progress_step=2, progress_total=4))
        await follower.tick()
        await follower.tick()  # nothing new: nothing told twice
        asset_id = new_id("ast")
        with services.db.transaction() as s:
            job = s.get(Job, job_id)
            assert job is not None
            s.execute(update(Job).where(col(Job.id) == job_id).values(status="succeeded", progress_step=4))
            s.add(Asset(id=asset_id, project_id=job.project_id, job_id=job_id, stage="ideation", engine="lite",
                        model=tiny.NAME, prompt="a lighthouse", width=64, height=64, sha256="0" * 64))
        await follower.tick()
        await asyncio.wait_for(listener, timeout=10)
        return seen

    seen = asyncio.run(scenario())
    # The row's last step comes before the assets: it is written once a second at most, so a
    # short job's stream here showed no step, a longer one's stopped short of its last.
    assert [kind for kind, _ in seen] == ["queued", "started", "progress", "progress", "asset", "succeeded"]
    assert seen[2][1] == {"step": 2, "total": 4, "fraction": 0.5}
    assert seen[3][1] == {"step": 4, "total": 4, "fraction": 1.0}
    assert seen[4][1]["index"] == 0 and seen[5][1]["assets"] == [seen[4][1]["asset_id"]]


def test_the_follower_leaves_jobs_this_process_holds_to_their_runner(services: Services) -> None:
    job_id = add_job(services)
    [(claim, _lane)] = services.scheduler._claim_ready({})

    async def scenario() -> None:
        services.bus.bind(asyncio.get_running_loop())
        catch_up(services.bus, row(services, job_id), [])
        services.follower.follow(job_id)
        with services.db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == job_id).values(progress_step=1, progress_total=4))
        await services.follower.tick()

    asyncio.run(scenario())
    view = services.bus.view(job_id)
    # Only the runner publishes this job's progress (with its previews); the row is not re-told.
    assert view is not None and view.step == 0
    assert claim.job.id == job_id


def test_workers_lists_this_server_to_the_admin_only(make_settings: SettingsFactory,
                                                   start_server: Callable[[Settings], httpx.Client]) -> None:
    client = start_server(make_settings(admin_key="admin-secret"))
    admin = {"Authorization": "Bearer admin-secret"}
    project = client.post("/v1/projects", json={"name": "ops"}, headers=admin).json()["id"]
    listed = client.get("/v1/workers", headers=admin).json()
    [me] = listed["items"]
    assert me["this_process"] and me["devices"] == [] and listed["runs_jobs_here"]  # no local job yet
    assert me["this_machine"] and "lite" in me["engines"]
    # Another machine's worker on the shared data dir, while it touches its lock file (it was
    # listed nowhere: an operator of several hosts could not tell which of them ran what).
    other = make_settings(admin_key="admin-secret").data_dir / "locks" / "owners" / "gpu-host_9_ab.lock"
    other.write_text("gpu-host:9:ab\nanother-boot-id\nlite,comfyui\n")
    listed = client.get("/v1/workers", headers=admin).json()
    assert [(w["owner"], w["this_machine"], w["engines"]) for w in listed["items"] if not w["this_process"]] == [
        ("gpu-host:9:ab", False, ["lite", "comfyui"])]
    key = client.post(f"/v1/projects/{project}/keys", json={"name": "pipeline"}, headers=admin).json()["key"]
    assert_error(client.get("/v1/workers", headers={"Authorization": f"Bearer {key}"}), 403, "forbidden")
    assert_error(client.get("/v1/workers"), 401, "unauthorized")


def test_an_owner_lock_speaks_only_for_its_own_machine(tmp_path: Path) -> None:
    # A network filesystem may not pass flocks between hosts: another machine's free-looking lock
    # must not make its live worker look dead.
    folder = tmp_path / "owners"
    folder.mkdir()
    owner = "gpu-box-2:4242:0badc0de"
    (folder / f"{owner.replace(':', '_')}.lock").write_text(f"{owner}\nanother-boot-id\n")
    on_postgres = Presence(tmp_path, shared_database=True)
    assert on_postgres.alive(owner) and not on_postgres.gone(owner)  # its lease decides
    assert on_postgres.forget([]) == 0 and on_postgres.live() == []


def test_another_machine_s_owner_is_not_judged_by_a_pid_here_though_it_shares_our_host_name(
        tmp_path: Path) -> None:
    # Containers on two hosts given one `hostname:`, cloned VMs: the other machine's pid was looked
    # up on this one, found missing, and its live worker's jobs were recovered (paid ones charged as
    # interrupted, local ones run again) under it.
    folder = tmp_path / "owners"
    folder.mkdir()
    owner = f"{socket.gethostname()}:999999:0badc0de"  # no such pid here
    (folder / f"{owner.replace(':', '_')}.lock").write_text(f"{owner}\nanother-boot-id\n")
    on_postgres = Presence(tmp_path, shared_database=True)
    assert on_postgres.alive(owner) and not on_postgres.gone(owner)  # its lease decides
    assert not Presence(tmp_path, shared_database=False).gone(owner)
    # Without a file, a pid of this host is still looked up here.
    assert Presence(tmp_path, shared_database=True).gone(f"{socket.gethostname()}:999999:feedf00d")


def test_a_data_dir_without_usable_locks_still_runs_jobs(tmp_path: Path) -> None:
    (tmp_path / "owners").write_text("not a folder")  # stands for a filesystem without flock
    presence = Presence(tmp_path, shared_database=False)
    presence.enter("here:1:ab")  # logged, not raised: the service starts and leases decide
    assert presence.live() == []
    assert presence.alive("here:1:ab") and not presence.gone("here:1:ab")  # it knows itself alive


def test_claims_made_while_stopping_go_back_to_the_queue(services: Services) -> None:
    paid_id = add_job(services, engine="fake-paid", estimated=10_000)
    asked_id = add_job(services, engine="fake-paid", estimated=10_000)
    with services.db.transaction() as s:
        for job_id in (paid_id, asked_id):
            job = s.get(Job, job_id)
            assert job is not None
            services.ledger.hold(s, services.ledger.lock_project(s, job.project_id), job, 10_000)
    # The dispatch thread committed two claims; the service stopped before it started them.
    claims = services.scheduler._claim_ready({})
    assert sorted(c.job.id for c, _lane in claims) == sorted([paid_id, asked_id])
    services.jobs.record_cancel(asked_id)
    services.scheduler._give_back_unstarted()
    assert row(services, paid_id).status == "queued" and row(services, asked_id).status == "canceled"
    with services.db.session() as s:
        kinds = {job_id: [e.kind for e in s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)
                                                    .order_by(col(LedgerEntry.id)))]
                 for job_id in (paid_id, asked_id)}
    assert kinds == {paid_id: ["hold"], asked_id: ["hold", "release"]}  # nothing was sent for either
    assert not services.scheduler.holds(paid_id)
    # Once stopping, the dispatch thread claims nothing more.
    services.scheduler._stopping = True
    assert services.scheduler._claim_ready({}) == []


def test_a_claim_given_back_unstarted_says_no_engine_started_it(services: Services) -> None:
    # Its claim wrote `started_at`; given back before a task started it, the job read as queued
    # with a start no engine made (`started_at`: "null until then").
    fresh_id = add_job(services, engine="fake-paid")
    earlier = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    again_id = add_job(services, engine="fake-paid", started_at=earlier, attempts=[stopped_attempt(started=True)])
    claims = services.scheduler._claim_ready({})
    assert sorted(c.job.id for c, _lane in claims) == sorted([fresh_id, again_id])
    assert row(services, fresh_id).started_at is not None  # the claim's, until it is given back
    services.scheduler._give_back_unstarted()
    fresh, again = row(services, fresh_id), row(services, again_id)
    assert (fresh.status, fresh.started_at) == ("queued", None)
    assert (again.status, again.started_at) == ("queued", earlier)  # the attempt that did start
    assert [a["error"]["details"]["started"] for a in fresh.attempts or []] == [False]
    # Canceled meanwhile, it ends canceled, still never started.
    services.scheduler._claim_ready({})
    services.jobs.record_cancel(fresh_id)
    services.scheduler._give_back_unstarted()
    assert (row(services, fresh_id).status, row(services, fresh_id).started_at) == ("canceled", None)


def test_a_claim_given_back_keeps_the_work_a_provider_accepted_before(services: Services) -> None:
    # Queued to reattach after a crash, claimed, then the service stopped before it started: the
    # saved work must survive, or the next run sends (and pays for) the job a second time.
    work = {"engine": "fake-queue", "handles": [{"id": "fake-1", "queue": "https://fake.test/requests"}]}
    job_id = add_job(services, engine="fake-queue", estimated=10_000, provider_work=work,
                     attempts=[{"engine": "fake-queue", "status": "interrupted", "error": None}])
    [(claim, _lane)] = services.scheduler._claim_ready({})
    services.scheduler._give_back_unstarted()
    job = row(services, job_id)
    assert job.status == "queued" and job.provider_work == work
    assert not services.scheduler.holds(job_id) and claim.job.id == job_id


def test_canceling_an_unstarted_reattach_claim_charges_the_accepted_work(services: Services) -> None:
    # The provider accepted the job before a crash and runs (and bills) on: a cancel while the
    # claim to follow it is given back captures the hold for reconciliation, as recovery does.
    work = {"engine": "fake-queue", "handles": [{"id": "fake-1", "queue": "https://fake.test/requests"}]}
    job_id = add_job(services, engine="fake-queue", estimated=10_000, provider_work=work)
    with services.db.transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        services.ledger.hold(s, services.ledger.lock_project(s, job.project_id), job, 10_000)
    services.scheduler._claim_ready({})
    assert services.jobs.record_cancel(job_id)
    services.scheduler._give_back_unstarted()
    assert row(services, job_id).status == "canceled"
    with services.db.session() as s:
        entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)
                         .order_by(col(LedgerEntry.id))).all()
    assert [(e.kind, e.unreconciled) for e in entries] == [("hold", False), ("capture", True)]
    assert not services.jobs.record_cancel(job_id)  # finished: nothing to record


def test_preload_loads_the_lite_model_at_start_only_where_the_device_is_free(make_settings: SettingsFactory) -> None:
    def started(settings: Settings) -> tuple[bool, set[tuple[str, str]]]:
        """Start a service with ORCH_LITE_PRELOAD: (holds the device, models loaded)."""
        services = Services.build(settings)
        lite = services.registry.get("lite")
        assert isinstance(lite, LiteEngine) and services.scheduler.device is not None

        async def run() -> tuple[bool, set[tuple[str, str]]]:
            services.bus.bind(asyncio.get_running_loop())
            try:
                await services.start()
                await asyncio.wait_for(asyncio.gather(*services.background), timeout=120)
                assert services.scheduler.device is not None
                return services.scheduler.device.held, set(lite.runtime._pipes)
            finally:
                await services.aclose()

        return asyncio.run(run())

    settings = make_settings(lite_preload=True)
    probe = Services.build(settings)
    assert probe.scheduler.device is not None
    path = probe.scheduler.device.path
    asyncio.run(probe.aclose())
    with lock_held_elsewhere(path):
        assert started(settings) == (False, set())  # another worker has this device
    assert started(settings) == (True, {(tiny.NAME, "text2img")})  # loaded before any draft


def test_a_preload_that_cannot_load_says_why_in_one_line(make_settings: SettingsFactory,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # A setting to change (a device torch does not see, a model path to nothing) was told at the
    # end of a 25-line traceback.
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: ORCH_LITE_DEVICE=cuda would load")
    services = Services.build(make_settings(lite_preload=True, lite_device="cuda"))

    async def run() -> None:
        services.bus.bind(asyncio.get_running_loop())
        try:
            await services.start()
            await asyncio.wait_for(asyncio.gather(*services.background), timeout=120)
        finally:
            await services.aclose()

    with caplog.at_level(logging.ERROR, logger="orchestrator.services"):
        asyncio.run(run())
    [record] = [r for r in caplog.records if "ORCH_LITE_PRELOAD" in r.getMessage()]
    assert "torch sees no CUDA device" in record.getMessage() and record.exc_info is None


def test_work_a_provider_had_accepted_is_followed_though_the_job_s_source_is_gone(services: Services) -> None:
    # Following accepted work sends nothing: a source image gone from the store failed the job
    # before it got there, and that work ran and billed on, neither followed nor withdrawn, the
    # estimate captured for reconciliation.
    work = {"engine": "fake-queue", "handles": [{"id": "fake-1", "queue": "https://fake.test/requests"}]}
    job_id = add_job(services, engine="fake-queue", estimated=10_000, provider_work=work,
                     params={**PARAMS, "stage": "bridge", "source_sha256": "0" * 64})
    with services.db.transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        services.ledger.hold(s, services.ledger.lock_project(s, job.project_id), job, 10_000)
    [(claim, _lane)] = services.scheduler._claim_ready({})
    asyncio.run(services.runner.run(claim))
    job = row(services, job_id)
    assert (job.status, job.error) == ("succeeded", None)
    assert services.registry.get("fake-queue").reattached == [work["handles"]]  # type: ignore[attr-defined]
    with services.db.session() as s:
        entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)
                         .order_by(col(LedgerEntry.id))).all()
    assert [e.kind for e in entries][:2] == ["hold", "capture"] and not any(e.unreconciled for e in entries)


def test_a_preload_and_a_dispatch_taking_the_device_together_both_get_it(tmp_path: Path) -> None:
    # Two descriptors of one process conflict as two processes do: without taking turns, one of
    # them found "another process" holding the device and skipped it.
    for attempt in range(20):
        lock = DeviceLock(tmp_path / str(attempt), lambda: "cpu")
        start = threading.Barrier(2)
        results: list[bool] = []

        def take(lock: DeviceLock = lock, start: threading.Barrier = start, results: list[bool] = results) -> None:
            start.wait()
            results.append(lock.try_acquire())

        threads = [threading.Thread(target=take) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert results == [True, True]
        lock.close()
    # Stopped while a taker was on its way: the device is not taken after the stop.
    late = DeviceLock(tmp_path / "late", lambda: "cpu")
    late.close()
    assert not late._take() and not late.held


def test_a_job_taken_over_while_its_old_attempt_winds_down_here_runs_once_at_a_time(
        make_settings: SettingsFactory) -> None:
    # Another process's recovery queues the job again (this one's lease ran out) while this process
    # still runs the old attempt: the new attempt waits for the old one to stop, and is tracked.
    built = Services.build(make_settings(engines="fake-free=tests.fakes:free_factory", lease_seconds=1.5,
                                         poll_interval=0.1, sweep_interval=60))
    params = {**PARAMS, "stage": "bridge", "tags": {"fake": "slow", "seconds": "30"}}
    job_id = add_job(built, engine="fake-free", estimated=0, params=params)
    scheduler = built.scheduler

    async def until(done: Callable[[], bool], timeout: float = 20.0) -> None:
        for _ in range(int(timeout / 0.02)):
            if done():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("timed out")

    async def scenario() -> tuple[list[int], Job]:
        built.bus.bind(asyncio.get_running_loop())
        await built.start()
        try:
            await until(lambda: job_id in scheduler._running)
            old_task = scheduler._running[job_id][0]
            with built.db.transaction() as s:  # what `_recover_one` writes for a free remote engine
                s.execute(update(Job).where(col(Job.id) == job_id).values(
                    status="queued", lease_owner=None, lease_expires_at=None, provider_work=None,
                    params={**params, "tags": {"fake": "slow", "seconds": "0.1"}},
                    attempts=[{"engine": "fake-free", "status": "interrupted", "error": None}]))
            scheduler.notify()
            attempts_while_old_ran = []
            while not old_task.done():  # stopped by the heartbeat, which finds the row not its own
                attempts_while_old_ran.append(row(built, job_id).attempt)
                await asyncio.sleep(0.05)
            await until(lambda: row(built, job_id).status == "succeeded")
            await until(lambda: not scheduler.holds(job_id))
            return attempts_while_old_ran, row(built, job_id)
        finally:
            await built.aclose()

    attempts_while_old_ran, job = asyncio.run(scenario())
    assert attempts_while_old_ran and set(attempts_while_old_ran) == {1}
    assert job.attempt == 2 and job.error is None


def test_a_job_recovery_fails_tells_its_error_to_a_stream_already_open(services: Services) -> None:
    job_id = add_job(services, engine="fake-paid", status="running", attempt=1, lease_owner="dead-host:1:0",
                     lease_expires_at=utcnow() - timedelta(seconds=1))

    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        services.bus.bind(asyncio.get_running_loop())
        services.bus.publish(job_id, "started", {"job_id": job_id, "status": "running", "attempt": 1})
        assert await services.scheduler.recover(all_foreign=False) == [job_id]
        return [(e.type, e.data) async for e in services.bus.subscribe(job_id)]

    events = asyncio.run(scenario())
    assert events[-1][0] == "failed" and events[-1][1]["error"]["code"] == "interrupted"
    assert events[-1][1]["error"] == row(services, job_id).error


def test_a_job_submitted_here_and_recovered_here_is_told_started_before_its_end(services: Services) -> None:
    # Submitted on this API server (told queued), run by a worker elsewhere that died: the
    # server's recovery told its end only, and its stream said it never started, while every
    # other server's, built from the row, told queued, started, failed (the SQLite chaos audit).
    job_id = add_job(services, engine="fake-paid", status="running", attempt=1, lease_owner="dead-host:1:0",
                     started_at=utcnow() - timedelta(seconds=30), lease_expires_at=utcnow() - timedelta(seconds=1))

    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        services.bus.bind(asyncio.get_running_loop())
        services.bus.publish(job_id, "queued", {"job_id": job_id, "status": "queued"})
        assert await services.scheduler.recover(all_foreign=False) == [job_id]
        return [(e.type, e.data) async for e in services.bus.subscribe(job_id)]

    events = asyncio.run(scenario())
    assert [kind for kind, _data in events] == ["queued", "started", "failed"]
    assert events[1][1]["attempt"] == 1 and events[1][1]["engine"] == "fake-paid"


def test_a_late_queued_event_and_repeated_states_are_not_replayed() -> None:
    bus = EventBus()
    bus.publish("job_1", "queued", {"status": "queued"})
    bus.publish("job_1", "started", {"status": "running", "attempt": 1})
    bus.publish("job_1", "queued", {"status": "queued"})  # the submit's, after the runner's claim
    bus.publish("job_1", "state", {"state": "submitted"})
    for position in range(300, 0, -1):  # a queueing provider, polled every second
        bus.publish("job_1", "state", {"state": "queued", "position": position})
    bus.publish("job_1", "state", {"state": "fallback", "from": "fal", "to": "replicate"})  # changes are all kept
    bus.publish("job_1", "state", {"state": "queued", "position": 2})
    bus.publish("job_1", "state", {"state": "queued", "position": 1})
    snapshot = bus._jobs["job_1"].snapshot()
    assert [(e.type, e.data.get("state"), e.data.get("position")) for e in snapshot] == [
        ("queued", None, None), ("started", None, None), ("state", "submitted", None), ("state", "queued", 1),
        ("state", "fallback", None), ("state", "queued", 1)]


def test_an_old_attempt_writes_no_progress_into_a_row_queued_again(services: Services) -> None:
    job_id = add_job(services, status="running", attempt=1, lease_owner="dead-host:1:0",
                     lease_expires_at=utcnow() - timedelta(seconds=1))
    old = Claim(row(services, job_id), 1, CancelToken())
    services.runner.write_progress(old, 3, 10)
    assert asyncio.run(services.scheduler.recover(all_foreign=False)) == [job_id]
    services.runner.write_progress(old, 9, 10)  # the old worker was alive after all
    job = row(services, job_id)
    assert job.status == "queued" and (job.progress_step, job.progress_total) == (0, 0)



def test_an_attempt_stopped_past_its_lease_sends_nothing_more_once_taken_over(services: Services) -> None:
    """A worker stopped (SIGSTOP) between two paid requests of a job resumes before its heartbeat
    has looked: another process had taken the job over, and the old attempt's next request went
    out, paid for by the studio and kept by nobody."""
    from orchestrator.errors import StaleAttempt

    job_id = add_job(services, status="running", attempt=1, lease_owner="stopped-host:1:0",
                     lease_expires_at=utcnow() - timedelta(seconds=1))
    old = Claim(row(services, job_id), 1, CancelToken(), lease=3.0, renewed=time.monotonic() - 10)
    old.job.unsent_attempt = None  # its first request is out, and recorded
    old.out = 1
    class Saved:  # what the job's progress has saved: nothing is out to save
        async def saved(self) -> None:
            pass

    recorder = services.runner._first_send_recorder(old, Saved())  # type: ignore[arg-type]

    async def record() -> None:
        await recorder()

    fresh = Claim(row(services, job_id), 1, CancelToken(), lease=3.0)
    assert asyncio.run(services.runner.still_held(fresh)) is True  # within its lease: no read needed
    asyncio.run(record())  # still its own: the request may go
    assert old.out == 2 and not old.cancel.cancelled
    assert asyncio.run(services.scheduler.recover(all_foreign=False)) == [job_id]
    with services.db.transaction() as s:  # another worker's attempt 2 now holds it
        s.execute(update(Job).where(col(Job.id) == job_id).values(status="running", attempt=2))
    with pytest.raises(StaleAttempt):
        asyncio.run(record())
    assert old.out == 2 and old.cancel.cancelled and old.cancel.abandoned  # the new holder follows the work on
    # A paused VM's monotonic clock stood still: the wall clock says the lease ran out, so it reads.
    paused = Claim(row(services, job_id), 1, CancelToken(), lease=3.0, renewed_wall=time.time() - 10)
    assert asyncio.run(services.runner.still_held(paused)) is False and paused.cancel.abandoned
    # Before a withdrawal: the work is left to the new holder, but a job canceled through another
    # process is this attempt's to withdraw.
    assert asyncio.run(services.runner._work_still_ours(Claim(row(services, job_id), 1, CancelToken()))) is False
    with services.db.transaction() as s:
        s.execute(update(Job).where(col(Job.id) == job_id).values(status="canceled"))
    canceled = Claim(row(services, job_id), 2, CancelToken(), lease=3.0)
    assert asyncio.run(services.runner._work_still_ours(canceled)) is True
    assert canceled.cancel.cancelled and not canceled.cancel.abandoned


@pytest.mark.parametrize(("engine", "first"), [(engine, first) for engine in ("replicate", "fal")
                                                for first in ("heartbeat", "answer")])
def test_an_attempt_stopped_past_its_lease_withdraws_the_prediction_of_a_job_recovery_ended(
        make_settings: SettingsFactory, engine: str, first: str) -> None:
    """A worker stopped (SIGSTOP) past its lease while Replicate's create (fal's submit) was held
    open: another process's recovery failed the job `interrupted`, no prediction id saved, and
    captured its estimate for reconciliation. Resumed, the attempt let go of the job as if a new
    holder followed its work; the row had ended and nobody did, and the prediction rendered, and
    billed, for nobody. Whichever comes first: the heartbeat finding the row not its own, or the
    create's answer, whose id the save could no longer write. Withdrawn unrun, its charge is
    settled at 0, whether the cancel came before its answer or while it was followed."""
    # Answer first: no beat comes before the create is answered (the first is a third of the lease
    # away), so only the save of its id can tell.
    built = Services.build(make_settings(replicate_api_key="r8-key", replicate_base_url="https://replicate.test",
                                         fal_api_key="fal-key", fal_base_url="https://fal.test", poll_interval=0.1,
                                         sweep_interval=60, lease_seconds=1.5 if first == "heartbeat" else 60))
    provider = built.scheduler.registry.get(engine)
    assert isinstance(provider, CloudEngine)
    params = {**PARAMS, "stage": "bridge", "width": 1024, "height": 1024}
    project_id, job_id = new_id("prj"), new_id("job")
    with built.db.transaction() as s:
        project = Project(id=project_id, name="workers", policy="balanced")
        s.add(project)
        s.flush()
        job = Job(id=job_id, project_id=project_id, stage="bridge", engine=engine,
                  model=provider.model, params=params, attempts=[], estimated=8_000)
        s.add(job)
        s.flush()
        built.ledger.hold(s, project, job, job.estimated)
    if engine == "replicate":
        held = HeldRequest(httpx.Response(201, json={"id": "p-1", "status": "starting"}))
        create, poll, cancel_url, method = (r"^https://replicate\.test/v1/models/.+/predictions$",
                                            "https://replicate.test/v1/predictions/p-1",
                                            "https://replicate.test/v1/predictions/p-1/cancel", "POST")
        polled = httpx.Response(200, json={"id": "p-1", "status": "starting"})
        unrun = httpx.Response(200, json={"id": "p-1", "status": "canceled", "started_at": None})
    else:
        queue = "https://queue.fal.test/fal-ai/nano-banana-2/requests/r-1"
        held = HeldRequest(httpx.Response(200, json={"request_id": "r-1", "status_url": f"{queue}/status",
                                                     "response_url": queue, "cancel_url": f"{queue}/cancel"}))
        create, poll, cancel_url, method = r"^https://fal\.test/.+$", f"{queue}/status", f"{queue}/cancel", "PUT"
        polled = httpx.Response(202, json={"status": "IN_QUEUE"})
        unrun = httpx.Response(200, json={"status": "OK"})
    scheduler = built.scheduler

    async def scenario() -> int:
        built.bus.bind(asyncio.get_running_loop())
        with respx.mock(assert_all_called=False) as mock:
            mock.post(url__regex=create).mock(side_effect=held)
            mock.get(poll).mock(return_value=polled)
            withdrawn = mock.request(method, cancel_url).mock(return_value=unrun)
            await built.start()
            try:
                await until(held.sent.is_set)
                while await asyncio.to_thread(scheduler._recover_one, row(built, job_id)) is None:
                    pass  # renewed between the read and the write: as the next sweep, read again
                if first == "heartbeat":
                    _, claim = scheduler._running[job_id]
                    await until(lambda: claim.cancel.cancelled)
                held.answer.set()
                await until(lambda: withdrawn.called and job_id not in scheduler._running
                            and not provider._withdrawing, within=10, then=0.2)
                return withdrawn.call_count
            finally:
                await built.aclose()

    assert asyncio.run(scenario()) == 1
    assert row(built, job_id).status == "failed"
    with built.db.session() as s:
        settled = [(e.kind, e.amount, e.unreconciled) for e in s.exec(select(LedgerEntry).where(
            col(LedgerEntry.job_id) == job_id, col(LedgerEntry.kind).in_(("capture", "adjustment")))
            .order_by(col(LedgerEntry.id))).all()]
    assert settled == [("capture", 8_000, False), ("adjustment", -8_000, False)]


@pytest.mark.parametrize(("engine", "outcome"), [
    *((engine, outcome) for engine in ("replicate", "fal")
      for outcome in ("never ran, told after the end", "never ran, told before the end", "started", "refused")),
    ("replicate", "never ran, after an image was made"), ("replicate", "ended unstarted"), ("replicate", "throttled")])
def test_a_cancel_while_the_create_is_out_settles_at_nothing_when_the_provider_says_its_work_never_ran(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, engine: str, outcome: str) -> None:
    """A job canceled while Replicate's create (fal's submit) is out ends at once, its estimate
    captured for reconciliation; the create's answer then names the work, which is withdrawn. The
    provider said it never ran (canceled, never started; taken off fal's queue), and the charge
    stayed for a person to clear, where a withdrawal after a dead worker's cancel settles it at 0.
    Whether that word comes after the job's end is written or before; work that started keeps it,
    as does a job whose earlier prediction made (and billed) an image. A create refused (4xx), or
    answered with a prediction that had already ended unstarted, or throttled (429, not sent again
    once canceled), made nothing to withdraw, and nothing billed either."""
    never_ran, made = outcome != "started", "image" in outcome
    asks_to_cancel = outcome not in ("refused", "ended unstarted", "throttled")
    built = Services.build(make_settings(replicate_api_key="r8-key", replicate_base_url="https://replicate.test",
                                         fal_api_key="fal-key", fal_base_url="https://fal.test", poll_interval=0.1,
                                         sweep_interval=60))
    provider = built.scheduler.registry.get(engine)
    assert isinstance(provider, CloudEngine)
    params = {**PARAMS, "stage": "bridge", "width": 1024, "height": 1024, "n": 2 if made else 1}
    project_id, job_id = new_id("prj"), new_id("job")
    with built.db.transaction() as s:
        project = Project(id=project_id, name="workers", policy="balanced")
        s.add(project)
        s.flush()
        job = Job(id=job_id, project_id=project_id, stage="bridge", engine=engine, model=provider.model,
                  params=params, attempts=[], estimated=params["n"] * 8_000)
        s.add(job)
        s.flush()
        built.ledger.hold(s, project, job, job.estimated)
    if engine == "replicate":
        held = HeldRequest(
            httpx.Response(422, json={"detail": "invalid input"}) if outcome == "refused" else
            httpx.Response(429, headers={"Retry-After": "1"}) if outcome == "throttled" else
            httpx.Response(201, json={"id": "p-1", "status": "aborted", "started_at": None})
            if outcome == "ended unstarted" else httpx.Response(201, json={"id": "p-1", "status": "starting"}))
        create, cancel_url, method = r"^https://replicate\.test/v1/models/.+/predictions$", \
            "https://replicate.test/v1/predictions/p-1/cancel", "POST"
        answer = httpx.Response(200, json={"id": "p-1", "status": "canceled", "started_at": None} if never_ran else
                                {"id": "p-1", "status": "canceled", "started_at": "2026-11-02T10:00:00Z",
                                 "metrics": {"predict_time": 1.5}})
    else:
        queue = "https://queue.fal.test/fal-ai/nano-banana-2/requests/r-1"
        held = HeldRequest(
            httpx.Response(400, json={"detail": "invalid input"}) if outcome == "refused" else
            httpx.Response(200, json={"request_id": "r-1", "status_url": f"{queue}/status",
                                      "response_url": queue, "cancel_url": f"{queue}/cancel"}))
        create, cancel_url, method = r"^https://fal\.test/.+$", f"{queue}/cancel", "PUT"
        answer = (httpx.Response(200, json={"status": "OK"}) if never_ran else
                  httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}))
    cdn = "https://cdn.replicate.test"
    ending = threading.Event()  # the runner is ending the job: the engine has let the create go
    if outcome == "never ran, told before the end":
        finish = built.runner._finish

        def finish_once_withdrawn(*args: Any, **kwargs: Any) -> Any:
            # In its thread: the job's end is written only once the withdrawal has had its answer.
            ending.set()
            deadline = time.monotonic() + 10
            while provider._withdrawing and time.monotonic() < deadline:
                time.sleep(0.01)
            return finish(*args, **kwargs)

        monkeypatch.setattr(built.runner, "_finish", finish_once_withdrawn)

    def charges() -> list[tuple[str, int, bool]]:
        with built.db.session() as s:
            return [(e.kind, e.amount, e.unreconciled) for e in s.exec(select(LedgerEntry).where(
                col(LedgerEntry.job_id) == job_id, col(LedgerEntry.kind).in_(("capture", "adjustment")))
                .order_by(col(LedgerEntry.id))).all()]

    async def scenario() -> None:
        built.bus.bind(asyncio.get_running_loop())
        with respx.mock(assert_all_called=False) as mock:

            async def created(request: httpx.Request) -> httpx.Response:
                if made and not mock.calls:  # the first image's prediction is made (and billed) at once
                    return httpx.Response(201, json={"id": "p-0", "status": "succeeded", "output": f"{cdn}/p-0.png"})
                return await held(request)

            mock.post(url__regex=create).mock(side_effect=created)
            mock.get(f"{cdn}/p-0.png").mock(return_value=httpx.Response(200, content=png_bytes(size=(1024, 1024))))
            withdrawn = mock.request(method, cancel_url).mock(return_value=answer)
            await built.start()
            try:
                await until(held.sent.is_set)
                assert built.jobs.record_cancel(job_id) and built.scheduler.cancel(job_id)
                if outcome == "never ran, told before the end":
                    await until(ending.is_set)
                else:
                    await until(lambda: row(built, job_id).status == "canceled")
                held.answer.set()
                await until(lambda: (withdrawn.called or not asks_to_cancel) and not provider._withdrawing
                            and job_id not in built.scheduler._running)
                assert withdrawn.call_count == asks_to_cancel
                await until(lambda: len(charges()) > 1, within=2 if never_ran else 0.3)
            finally:
                await built.aclose()

    asyncio.run(scenario())
    assert row(built, job_id).status == "canceled"
    if never_ran and not made:
        assert charges() == [("capture", 8_000, False), ("adjustment", -8_000, False)]
    else:
        assert charges() == [("capture", params["n"] * 8_000, True)]


def test_a_free_server_job_given_up_after_crashes_leaves_nothing_on_the_server(
        make_settings: SettingsFactory) -> None:
    from orchestrator.queue import MAX_RECOVERIES
    from tests import fakes

    built = Services.build(make_settings(engines="fake-free=tests.fakes:free_factory"))
    crashed = [{"engine": "fake-free", "status": "interrupted", "error": None}] * (MAX_RECOVERIES - 1)
    job_id = add_job(built, engine="fake-free", estimated=0, status="running", attempt=MAX_RECOVERIES,
                     lease_owner="dead-host:1:0", lease_expires_at=utcnow() - timedelta(seconds=1),
                     provider_work={"engine": "fake-free", "handles": [{"id": "prompt-given-up"}]},
                     attempts=crashed, params={**PARAMS, "stage": "bridge"})
    fakes.FORGOTTEN.clear()

    async def scenario() -> None:
        built.bus.bind(asyncio.get_running_loop())
        assert await built.scheduler.recover(all_foreign=False) == [job_id]
        deadline = time.monotonic() + 10  # the forget runs in the background
        while not fakes.FORGOTTEN and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(built.aclose())
    given_up = row(built, job_id)
    assert given_up.status == "failed" and given_up.error is not None
    assert fakes.FORGOTTEN == [{"id": "prompt-given-up"}]
    # Rendered on its server, not this machine: no advice to ask for fewer or smaller images.
    assert given_up.error["message"] == (f"the process running this job on 'fake-free' stopped without ending it "
                                         f"{MAX_RECOVERIES} times; it is not started again")


def test_a_free_server_job_canceled_after_its_worker_died_leaves_nothing_on_the_server(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    from tests import fakes

    settings = make_settings(engines="fake-free=tests.fakes:free_factory", run_jobs=False)  # an API server
    client = start_server(settings)
    built = Services.build(settings)  # a worker's row, written beside the server
    orphan = add_job(built, engine="fake-free", estimated=0, status="running", attempt=1,
                     lease_owner="dead-host:1:0", lease_expires_at=utcnow() + timedelta(minutes=5),
                     provider_work={"engine": "fake-free", "handles": [{"id": "prompt-orphaned"}]},
                     params={**PARAMS, "stage": "bridge"})
    asyncio.run(built.aclose())
    fakes.FORGOTTEN.clear()
    assert client.post(f"/v1/jobs/{orphan}/cancel").json()["status"] == "canceled"
    deadline = time.monotonic() + 30  # on the server's loop, in the background
    while not fakes.FORGOTTEN and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert fakes.FORGOTTEN == [{"id": "prompt-orphaned"}]


def test_a_claim_undone_to_wait_on_an_open_circuit_leaves_the_job_as_it_was(services: Services) -> None:
    # A job claimed only to be moved off an open circuit, with nowhere to go, waits in the queue: it
    # kept the claim's start, so GET showed a queued job that had started (an earlier attempt's
    # start erased too). The claim's number stays taken: a stream on another process may have told
    # the claim as a start, and must tell the job's next claim as a new one.
    earlier = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    job_id = add_job(services, engine="fake-paid")
    queued = row(services, job_id)  # as the dispatch's list read it: never started
    with services.db.transaction() as s:  # meanwhile another worker ran it, and it failed over
        s.exec(update(Job).where(col(Job.id) == job_id).values(attempt=1, started_at=earlier))
    claim = services.scheduler._claim(queued, move=True)
    assert claim is not None and row(services, job_id).attempt == 2
    services.runner._requeue_waiting(claim)
    after = row(services, job_id)
    assert (after.status, after.attempt, after.lease_owner) == ("queued", 2, None)
    assert after.started_at is not None and after.started_at.replace(tzinfo=UTC) == earlier


def test_a_ring_a_hurried_stop_cut_short_ends_before_the_database_goes(make_settings: SettingsFactory,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The hand-over's ring runs in a thread: cancelling the hand-over (a second stop signal) left
    # it to run after `aclose` had disposed of the database, opening it again at exit.
    built = Services.build(make_settings(engines="fake-paid=tests.fakes:factory"))
    order: list[str] = []
    ring, dispose = built.db.ring, built.db.dispose

    ringing = threading.Event()

    def slow_ring() -> None:
        ringing.set()
        time.sleep(0.5)
        ring()
        order.append("rung")

    def disposed() -> None:
        order.append("disposed")
        dispose()

    monkeypatch.setattr(built.db, "ring", slow_ring)
    monkeypatch.setattr(built.db, "dispose", disposed)
    assert built.scheduler.device is not None and built.scheduler.device.try_acquire()

    async def hurried_stop() -> None:
        handing_over = asyncio.ensure_future(built._hand_over_device())
        while not ringing.is_set():  # the ring is out
            await asyncio.sleep(0.01)
        handing_over.cancel()
        await asyncio.wait({handing_over})
        await built.aclose()

    asyncio.run(hurried_stop())
    assert order == ["rung", "disposed"]
