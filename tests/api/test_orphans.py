"""Which running jobs a sweep takes for orphans: not one whose engine only another worker has, for a
while after that worker died (it may be restarting), nor one whose holder of this machine lives
(its owner lock held) though its lease ran out; and the heartbeat keeps every lease it holds."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlmodel import col, select

from orchestrator import queue
from orchestrator.clock import utcnow
from orchestrator.ids import new_id
from orchestrator.models import Job, LedgerEntry, Project
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.workers import Presence
from tests.api.test_workers import row

SettingsFactory = Callable[..., Settings]
PAID = "fake-paid=tests.fakes:factory"
QUEUE = "fake-queue=tests.fakes:queue_factory"
WORK = {"engine": "fake-queue", "handles": [{"id": "fake-1", "queue": "https://fake.test/requests"}]}


@pytest.fixture
def built(make_settings: SettingsFactory) -> Iterator[Callable[..., Services]]:
    """`built(**settings)`: services on one data dir, closed at teardown."""
    made: list[Services] = []

    def build(**overrides: Any) -> Services:
        made.append(Services.build(make_settings(**overrides)))
        return made[-1]

    yield build
    for services in made:
        asyncio.run(services.aclose())


def dead_owner() -> str:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return f"{socket.gethostname()}:{finished.pid}:0"


def left_running(services: Services, *, engine: str, owner: str, lease_left: float, **values: Any) -> str:
    """A paid job (with its hold) running on `engine` for `owner`, its lease ending in `lease_left` s."""
    project_id, job_id = new_id("prj"), new_id("job")
    with services.db.transaction() as s:
        s.add(Project(id=project_id, name="orphans", policy="balanced"))
        s.flush()
        s.add(Job(id=job_id, project_id=project_id, stage="bridge", engine=engine, model="fake-1", estimated=10_000,
                  params={"stage": "bridge", "prompt": "x", "negative_prompt": "", "n": 1, "seed": 5, "width": 64,
                          "height": 64, "tags": {}},
                  **{"attempts": [], "status": "running", "attempt": 1, "lease_owner": owner,
                     "lease_expires_at": utcnow() + timedelta(seconds=lease_left), **values}))
        s.flush()
        s.add(LedgerEntry(project_id=project_id, job_id=job_id, kind="hold", amount=10_000, engine=engine))
    return job_id


def entries(services: Services, job_id: str) -> list[tuple[str, bool]]:
    with services.db.session() as s:
        return [(e.kind, e.unreconciled) for e in s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id)
                                                         .order_by(col(LedgerEntry.id))).all()]


def test_a_job_whose_only_worker_died_is_left_for_that_worker_to_restart(built: Callable[..., Services]) -> None:
    # The only worker with fake-queue was killed (out of memory); one without it swept first and
    # failed the job "interrupted", charged, the provider's work it could have followed lost.
    without = built(engines=PAID)
    job_id = left_running(without, engine="fake-queue", owner=dead_owner(), lease_left=60, provider_work=WORK)
    assert asyncio.run(without.scheduler.recover(all_foreign=False)) == []
    assert asyncio.run(without.scheduler.recover(all_foreign=True)) == []
    assert row(without, job_id).status == "running"
    restarted = built(engines=f"{PAID},{QUEUE}")
    assert asyncio.run(restarted.scheduler.recover(all_foreign=True)) == [job_id]
    job = row(restarted, job_id)
    assert job.status == "queued" and job.provider_work == WORK  # its work is followed again
    assert entries(restarted, job_id) == [("hold", False)]


def test_a_server_that_runs_no_jobs_leaves_a_job_of_an_engine_it_lacks_to_the_workers(
        built: Callable[..., Services]) -> None:
    """`serve --no-jobs` sweeps (a killed worker's draft is queued again), but a job of an engine it
    lacks is not its to fail as possibly billed: that engine's only worker may be restarting."""
    api = built(engines=PAID, run_jobs=False)
    api.scheduler._runs_jobs = False  # as `sweep_only` leaves it
    api.scheduler.unserved_grace = 0  # nobody has had the engine for a lease
    job_id = left_running(api, engine="fake-queue", owner=dead_owner(), lease_left=-1, provider_work=WORK)
    assert asyncio.run(api.scheduler.recover(all_foreign=False)) == []
    assert row(api, job_id).status == "running" and entries(api, job_id) == [("hold", False)]


def test_a_process_without_an_engine_s_key_leaves_its_jobs_to_a_process_with_it(
        built: Callable[..., Services]) -> None:
    """A worker started without REPLICATE's key claimed its queued jobs and failed them at once,
    and followed the work of one whose worker died with an empty key: failed, written off, and
    its cancel at Replicate refused, the prediction rendering on for nobody."""
    work = {"engine": "replicate", "handles": [{"id": "p-1"}]}
    keyless = built(engines=PAID)
    assert "replicate" not in keyless.scheduler.engines() and "fake-paid" in keyless.scheduler.engines()
    left = left_running(keyless, engine="replicate", owner=dead_owner(), lease_left=-1, provider_work=work)
    queued = left_running(keyless, engine="replicate", owner=dead_owner(), lease_left=-1)
    with keyless.db.transaction() as s:
        s.get(Job, queued).status = "queued"  # type: ignore[union-attr]
    assert asyncio.run(keyless.scheduler.recover(all_foreign=True)) == []
    assert row(keyless, left).status == "running" and entries(keyless, left) == [("hold", False)]
    assert queued not in {job.id for job in keyless.scheduler._queued({})}
    keyed = built(engines=PAID, replicate_api_key="r8-key")
    assert "replicate" in keyed.scheduler.engines()
    assert asyncio.run(keyed.scheduler.recover(all_foreign=True)) == [left]
    assert row(keyed, left).status == "queued" and row(keyed, left).provider_work == work  # to be followed
    assert queued in {job.id for job in keyed.scheduler._queued({})}


def test_an_engine_is_this_process_s_only_where_it_can_send_to_it(built: Callable[..., Services]) -> None:
    """`configured` said "set up": a checkpoint named for AUTOMATIC1111 without its URL, a key kept in
    its quotes. Such a process claimed the engine's jobs and failed them at once, or followed work
    with no usable key."""
    elsewhere = built(engines=PAID, a1111_checkpoint="sd_xl_base_1.0.safetensors",
                      fal_api_key='"fal-key-in-its-quotes"', openai_api_key="sk-usable")
    mine = elsewhere.scheduler.engines()
    assert "a1111" not in mine and "fal" not in mine and "comfyui" not in mine
    assert "openai" in mine and "fake-paid" in mine and "lite" in mine
    assert built(engines=PAID, a1111_url="http://127.0.0.1:7860").scheduler.has_engine("a1111")


def test_a_job_of_an_engine_nobody_has_had_for_a_lease_is_queued_again_when_it_sent_nothing(
        built: Callable[..., Services]) -> None:
    without = built(engines=PAID)
    owner = dead_owner()
    unsent = left_running(without, engine="fake-queue", owner=owner, lease_left=60, unsent_attempt=1)
    sent = left_running(without, engine="fake-queue", owner=owner, lease_left=60)
    assert asyncio.run(without.scheduler.recover(all_foreign=False)) == []
    without.scheduler.unserved_grace = 0  # ...which has run out
    assert sorted(asyncio.run(without.scheduler.recover(all_foreign=False))) == sorted([unsent, sent])
    # Nothing reached the provider: the engine's next worker runs it (or `_fail_unserved` ends it).
    assert row(without, unsent).status == "queued"
    assert entries(without, unsent) == [("hold", False)]
    failed = row(without, sent)
    assert failed.status == "failed" and failed.error is not None and failed.error["code"] == "interrupted"
    assert "engine 'fake-queue'" in failed.error["message"]
    assert "no live worker has that engine" in failed.error["message"]
    assert failed.error["message"].endswith("it is not sent again, as the engine may already have made the image "
                                            "(and a paid provider billed it)")
    assert entries(without, sent) == [("hold", False), ("capture", True)]


def test_a_live_holder_of_this_machine_keeps_its_job_though_its_lease_ran_out(
        built: Callable[..., Services], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A clock step forward (leases are stamped by the wall clock on SQLite), or renewals behind the
    # write lock: the sweep failed the paid job and charged it, and the live holder threw its image away.
    services = built(engines=PAID)
    clock = [1000.0]
    monkeypatch.setattr(queue, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    holder = Presence(services.settings.data_dir / "locks", shared_database=False)
    owner = f"another-container:{dead_owner().split(':')[1]}:live"  # its pid tells nothing: its lock does
    holder.enter(owner, ["fake-paid"])
    try:
        job_id = left_running(services, engine="fake-paid", owner=owner, lease_left=-1)
        assert asyncio.run(services.scheduler.recover(all_foreign=False)) == []
        assert row(services, job_id).status == "running" and entries(services, job_id) == [("hold", False)]
        lease = services.scheduler.lease.total_seconds()
        clock[0] += (queue.HUNG_HOLDER_LEASES - 1) * lease
        assert services.scheduler._orphans(False) == []
        with services.db.transaction() as s:  # renewed, though still behind: a holder that beats
            job = s.get(Job, job_id)
            assert job is not None and job.lease_expires_at is not None
            job.lease_expires_at += timedelta(seconds=1)
        clock[0] += 2 * lease
        assert services.scheduler._orphans(False) == []  # counted afresh from here
        clock[0] += (queue.HUNG_HOLDER_LEASES - 1) * lease
        assert services.scheduler._orphans(False) == []
        # Not renewed for several leases: a hung holder, whose job must not stay running forever.
        clock[0] += lease
        with caplog.at_level(logging.WARNING, logger="orchestrator.queue"):
            assert [job.id for job in services.scheduler._orphans(False)] == [job_id]
        # Said, naming it: it still holds what it locked (a device's local jobs wait for it).
        [told] = [r.getMessage() for r in caplog.records if "taken for hung" in r.getMessage()]
        assert owner in told and "stop that process" in told
    finally:
        holder.leave(owner)
    clock[0] += 1
    assert [job.id for job in services.scheduler._orphans(False)] == [job_id]  # its lock dropped: gone


def test_a_cancel_asks_a_live_holder_of_this_machine_though_its_lease_ran_out(
        built: Callable[..., Services]) -> None:
    # Taken for an orphan's, the cancel ended the job and captured its hold as possibly billed
    # while the holder went on (and paid); its holder is asked instead, as any live one is.
    services = built(engines=PAID)
    holder = Presence(services.settings.data_dir / "locks", shared_database=False)
    owner = f"another-container:{dead_owner().split(':')[1]}:live"
    holder.enter(owner, ["fake-paid"])
    try:
        job_id = left_running(services, engine="fake-paid", owner=owner, lease_left=-1)
        assert services.jobs.cancel_orphan(job_id) is False
        assert services.jobs.ask_holder_to_cancel(job_id) is True
        job = row(services, job_id)
        assert job.status == "running" and job.cancel_requested_at is not None
        assert entries(services, job_id) == [("hold", False)]
    finally:
        holder.leave(owner)
    # Its lock dropped, with its lease run out: gone, so the cancel ends the job itself.
    assert services.jobs.ask_holder_to_cancel(job_id) is False
    assert services.jobs.cancel_orphan(job_id) is True
    assert row(services, job_id).status == "canceled"


def test_a_cancel_of_a_local_orphan_counts_what_it_held_until_its_last_renewal(
        built: Callable[..., Services]) -> None:
    # Canceled with its worker gone, a Lite job's last attempt counted nothing toward its project's
    # device-time quota: started 100 s ago, its 60 s lease last renewed 61 s ago, it held 39 s.
    services = built(lease_seconds=60)
    job_id = left_running(services, engine="lite", owner=dead_owner(), lease_left=-1,
                          started_at=utcnow() - timedelta(seconds=100))
    assert services.jobs.cancel_orphan(job_id) is True
    job = row(services, job_id)
    assert job.status == "canceled" and job.device_seconds == pytest.approx(39.0, abs=0.5)


def test_the_heartbeat_renews_claims_not_yet_started(built: Callable[..., Services],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A dispatch that claims several jobs (each claim may wait for the write lock) starts them
    # together: the first claims' leases ran out meanwhile, unrenewed, and another worker took them.
    services = built(engines=PAID, lease_seconds=60.0)
    project_id, job_id = new_id("prj"), new_id("job")
    with services.db.transaction() as s:
        s.add(Project(id=project_id, name="orphans", policy="balanced"))
        s.flush()
        s.add(Job(id=job_id, project_id=project_id, stage="bridge", engine="fake-paid", model="fake-1",
                  params={"stage": "bridge", "prompt": "x", "n": 1}, attempts=[]))
    [(claim, _lane)] = services.scheduler._claim_ready({})
    assert services.scheduler._claimed == {job_id: claim}
    claimed_until = row(services, job_id).lease_expires_at
    assert claimed_until is not None
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        await real_sleep(min(seconds, 0.01))

    monkeypatch.setattr(queue.asyncio, "sleep", sleep)  # type: ignore[attr-defined]
    renewed: list[list[str]] = []
    renew = services.scheduler._renew

    def recorded(claims: list[Any]) -> None:
        renewed.append([c.job.id for c in claims])
        renew(claims)

    monkeypatch.setattr(services.scheduler, "_renew", recorded)

    async def beat() -> None:
        loop = asyncio.ensure_future(services.scheduler._heartbeat_loop())
        while not renewed:
            await real_sleep(0.01)
        loop.cancel()

    asyncio.run(asyncio.wait_for(beat(), timeout=10))
    assert renewed[0] == [job_id]
    renewed_until = row(services, job_id).lease_expires_at
    assert renewed_until is not None and renewed_until > claimed_until
