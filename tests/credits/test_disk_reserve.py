"""The data dir's free-space reserve (`ORCH_MIN_FREE_DISK_MB`): below it, no job is taken and no
paid request is sent, so that no credits are spent on images that could not be stored. The free
space is patched (`orchestrator.disk.free_bytes`), never a real disk filled."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, select

from orchestrator import disk
from orchestrator.app import create_app
from orchestrator.errors import EngineError
from orchestrator.ids import new_id
from orchestrator.models import Job, LedgerEntry, Project
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests import fakes
from tests.api import assert_error
from tests.credits import DRAFT, create_project, ledger, make_draft, project_with_draft, wait_for_job
from tests.credits.conftest import ENGINES
from tiers import tiny
from tiers.base import RenderRequest, RenderResult

MIB = 2**20
RESERVE_MB = 256  # the default


def free_space(monkeypatch: pytest.MonkeyPatch, mib: int) -> None:
    """The assets folder's disk as having `mib` MiB free for the service's user, wherever it is read."""

    def reading(folder: Path) -> int:
        assert folder.is_dir()  # the assets folder itself, as the store writes there
        return mib * MIB

    monkeypatch.setattr(disk, "free_bytes", reading)


@pytest.fixture
def client(paid_settings_for: Callable[..., Settings], tmp_path: Path) -> Iterator[httpx.Client]:
    """An in-process service with the default reserve (no port: TestClient calls the app)."""
    settings = paid_settings_for(tmp_path / "data")
    assert settings.min_free_disk_mb == RESERVE_MB
    with TestClient(create_app(settings)) as test_client:
        yield cast(httpx.Client, test_client)  # an httpx2.Client, whose calls are httpx's


def jobs_and_entries(client: httpx.Client, project_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    response = client.get("/v1/jobs", params={"project_id": project_id, "limit": 500})
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["items"]], ledger(client, project_id)


def test_every_submit_below_the_reserve_is_refused_with_nothing_written(
        client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    project_id, asset_id = project_with_draft(client)
    taken = client.post(f"/v1/projects/{project_id}/drafts", json=DRAFT, headers={"Idempotency-Key": "taken"})
    assert taken.status_code == 202, taken.text
    wait_for_job(client, taken.json()["id"])
    before = jobs_and_entries(client, project_id)
    free_space(monkeypatch, RESERVE_MB - 1)
    # A retry of a request taken before writes nothing: it is answered as it was.
    again = client.post(f"/v1/projects/{project_id}/drafts", json=DRAFT, headers={"Idempotency-Key": "taken"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true", again.text
    assert again.json()["id"] == taken.json()["id"]
    for path, body in ((f"/v1/projects/{project_id}/drafts", DRAFT),
                       (f"/v1/assets/{asset_id}/promote", {"engine": "fake-paid", "cache": False}),
                       (f"/v1/assets/{asset_id}/polish", {"engine": "fake-paid", "cache": False})):
        response = client.post(path, json=body, headers={"Idempotency-Key": f"full {path}"})
        error = assert_error(response, 503, "storage_full")
        assert response.headers["Retry-After"] == "60", path  # as the database's full disk says
        assert "ORCH_MIN_FREE_DISK_MB" in error["message"] and f"{RESERVE_MB - 1} MiB free" in error["message"]
        assert error["details"] == {"free_mb": RESERVE_MB - 1, "min_free_mb": RESERVE_MB}
    assert jobs_and_entries(client, project_id) == before  # no job, no hold, no key kept
    # Explaining the route tells the same: a 200 said such a job would be taken.
    for stage, source in (("ideation", None), ("bridge", asset_id)):
        explained = client.post("/v1/route/explain", json={"stage": stage, "project_id": project_id,
                                                           "source_asset_id": source, "prompt": "x"})
        assert assert_error(explained, 503, "storage_full")["details"]["free_mb"] == RESERVE_MB - 1, stage

    free_space(monkeypatch, RESERVE_MB)  # room made: taken again at once, with the same key
    response = client.post(f"/v1/assets/{asset_id}/promote", json={"engine": "fake-paid", "cache": False},
                           headers={"Idempotency-Key": f"full /v1/assets/{asset_id}/promote"})
    assert response.status_code == 202, response.text
    assert wait_for_job(client, response.json()["id"])["status"] == "succeeded"


def test_a_request_no_room_would_make_taken_is_answered_as_it_is_without_the_reserve(
        client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 503 says "send it again": said of a request refused for good, clients retried it forever.
    project_id, asset_id = project_with_draft(client)
    archived = create_project(client)
    assert client.patch(f"/v1/projects/{archived}", json={"archived": True}).status_code == 200
    deleted = make_draft(client, project_id)
    assert client.delete(f"/v1/assets/{deleted}").status_code == 204
    refused = {f"/v1/projects/prj_{'0' * 24}/drafts": (DRAFT, 404, "not_found"),
               f"/v1/projects/{archived}/drafts": (DRAFT, 409, "project_archived"),
               f"/v1/assets/{deleted}/promote": ({"engine": "fake-paid", "cache": False}, 410, "gone"),
               f"/v1/projects/{project_id}/drafts": ({**DRAFT, "engine": "no-such-engine"}, 422, "no_route")}
    free_space(monkeypatch, RESERVE_MB - 1)
    for path, (body, status, code) in refused.items():
        assert_error(client.post(path, json=body), status, code)
    # And one that would be taken is still refused for the room.
    assert_error(client.post(f"/v1/assets/{asset_id}/promote", json={"engine": "fake-paid", "cache": False}),
                 503, "storage_full")


def promoted_as_the_disk_fills(client: httpx.Client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                               asset_id: str, engine: str, prompt: str) -> dict[str, Any]:
    """A promotion taken with room to spare, whose disk fills to 10 MB while it prepares its
    request (the fake engine waits for a file before it sends); the job as it ends."""
    until = tmp_path / "go"
    response = client.post(f"/v1/assets/{asset_id}/promote", json={
        "engine": engine, "cache": False, "prompt": prompt,
        "tags": {"fake": "wait-before-send", "until": str(until)}})
    assert response.status_code == 202, response.text
    free_space(monkeypatch, 10)
    until.touch()
    return wait_for_job(client, response.json()["id"])


def test_a_paid_job_claimed_below_the_reserve_is_failed_unsent_and_uncharged(
        client: httpx.Client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "none"})
    prompt = f"not sent below the reserve {tmp_path.name}"
    job = promoted_as_the_disk_fills(client, monkeypatch, tmp_path, asset_id, "fake-paid", prompt)

    assert job["status"] == "failed" and job["error"]["code"] == "storage_full", job
    assert "nothing was charged" in job["error"]["message"] and "ORCH_MIN_FREE_DISK_MB" in job["error"]["message"]
    assert prompt not in fakes.SENT  # the provider got no request
    entries = [e for e in ledger(client, project_id) if e["job_id"] == job["id"]]
    assert sorted(e["kind"] for e in entries) == ["hold", "release"], entries
    assert job["cost"]["charged"] == 0 and job["cost"]["held"] == 0, job["cost"]
    budget = client.get(f"/v1/projects/{project_id}/budget").json()
    assert budget["held"] == 0 and budget["charged"] == 0 and budget["available"] == 100, budget


def test_a_self_hosted_server_s_job_claimed_below_the_reserve_is_not_sent(
        client: httpx.Client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # It bills nobody, so it was sent: the studio's own GPU server rendered images that could not
    # be stored, and the job failed `storage_full` after them.
    _project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "none"})
    prompt = f"not sent to the studio's server below the reserve {tmp_path.name}"
    job = promoted_as_the_disk_fills(client, monkeypatch, tmp_path, asset_id, "fake-free", prompt)

    assert (job["status"], job["engine"], job["error"]["code"]) == ("failed", "fake-free", "storage_full"), job
    assert job["error"]["message"].startswith("not sent: ") and job["error"]["details"]["free_mb"] == 10
    assert prompt not in fakes.SENT and job["assets"] == []
    assert job["cost"]["charged"] == 0 and job["cost"]["held"] == 0, job["cost"]


def test_a_job_failed_below_the_reserve_after_a_move_says_its_earlier_charge_stays(
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """Moved to fake-paid off an engine whose provider had accepted its work (captured as a move
    settles it, outcome unknown): "nothing was charged" was said of a job charged 10 credits."""
    services = Services.build(make_settings(engines=ENGINES))
    try:
        job_id = new_id("job")
        params = {"stage": "bridge", "prompt": "moved", "negative_prompt": "", "n": 1, "seed": 5,
                  "width": 64, "height": 64, "tags": {}}
        hold = int(fakes.FAKE_PRICE * 1000)
        with services.db.transaction() as s:
            project = Project(id=new_id("prj"), name="moved", policy="balanced")
            s.add(project)
            s.flush()
            job = Job(id=job_id, project_id=project.id, stage="bridge", engine="fake-queue", model="fake-1",
                      params=params, estimated=hold, status="queued",
                      provider_work={"engine": "fake-queue", "handles": [{"id": "accepted"}]})
            s.add(job)
            s.flush()
            services.ledger.hold(s, project, job, hold, billable=True)
            failure = EngineError("fake queue: the provider is unreachable", retryable=True)
            services.ledger.settle_failure(s, job, failure)  # as `JobRunner._requeue_on` does
            job.attempts = job.with_attempt("failed", failure.to_dict())
            job.engine, job.provider_work = "fake-paid", None
            services.ledger.hold(s, project, job, hold, billable=True)
        free_space(monkeypatch, 10)
        [(claim, _lane)] = services.scheduler._claim_ready({})
        asyncio.run(services.runner.run(claim))
        with services.db.session() as s:
            ended = s.get(Job, job_id)
            assert ended is not None and ended.error is not None
            entries = [(e.kind, e.engine, e.amount) for e in s.exec(
                select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id).order_by(col(LedgerEntry.id)))]
        assert (ended.status, ended.error["code"]) == ("failed", "storage_full"), ended.error
        said = ended.error["message"]
        assert said.startswith("not sent: ") and "nothing was charged" not in said, said
        assert f"the {fakes.FAKE_PRICE} credits its earlier attempts were charged stay charged" in said, said
        assert entries == [("hold", "fake-queue", hold), ("capture", "fake-queue", hold),
                           ("hold", "fake-paid", hold), ("release", "fake-paid", hold)]
    finally:
        asyncio.run(services.aclose())


def test_explain_answers_the_reserve_before_the_pending_limit_as_the_submit_does(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At ORCH_MAX_PENDING_JOBS and below the reserve at once, the submit answers 503 (it asks the
    reserve before it counts the project's jobs) and its explanation answered 429."""
    with TestClient(create_app(paid_settings_for(tmp_path / "data", max_pending_jobs=1))) as test_client:
        client = cast(httpx.Client, test_client)
        _, asset_id = project_with_draft(client)
        until = tmp_path / "go"
        held = client.post(f"/v1/assets/{asset_id}/promote", json={
            "engine": "fake-paid", "cache": False, "tags": {"fake": "wait-before-send", "until": str(until)}})
        assert held.status_code == 202, held.text  # the project's one unfinished job
        body = {"engine": "fake-paid", "cache": False}
        assert_error(client.post(f"/v1/assets/{asset_id}/promote", json=body), 429, "rate_limited")
        free_space(monkeypatch, RESERVE_MB - 1)
        submitted = client.post(f"/v1/assets/{asset_id}/promote", json=body)
        explained = client.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id, **body})
        assert_error(submitted, 503, "storage_full")
        assert_error(explained, 503, "storage_full")
        free_space(monkeypatch, RESERVE_MB)
        until.touch()
        wait_for_job(client, held.json()["id"])


def test_a_reserve_of_0_takes_and_sends_jobs_on_a_full_disk(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = paid_settings_for(tmp_path / "data", min_free_disk_mb=0)
    assert settings.min_free_disk_mb == 0
    with TestClient(create_app(settings)) as test_client:
        client = cast(httpx.Client, test_client)
        project_id, asset_id = project_with_draft(client)
        free_space(monkeypatch, 0)
        asked: list[str] = []
        shortfall = disk.DiskReserve.shortfall

        def asking(reserve: disk.DiskReserve) -> int | None:
            asked.append(threading.current_thread().name)
            return shortfall(reserve)

        # Off, it is asked nowhere: a paid job's first send took a thread's hop to hear "no".
        monkeypatch.setattr(disk.DiskReserve, "shortfall", asking)
        prompt = f"sent with the reserve off {tmp_path.name}"
        response = client.post(f"/v1/assets/{asset_id}/promote",
                               json={"engine": "fake-paid", "cache": False, "prompt": prompt})
        assert response.status_code == 202, response.text
        assert wait_for_job(client, response.json()["id"])["status"] == "succeeded"
        assert prompt in fakes.SENT
        draft = client.post(f"/v1/projects/{project_id}/drafts", json=DRAFT)
        assert draft.status_code == 202, draft.text
        assert wait_for_job(client, draft.json()["id"])["status"] == "succeeded"
        assert asked == []


def test_a_paid_engine_that_does_not_announce_its_sends_is_not_started_below_the_reserve(
        client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # No `billable_send()` to ask at (a plugin's engine): asked before its run instead.
    monkeypatch.setattr(fakes.FakePaidEngine, "announces_sends", False)
    project_id, asset_id = project_with_draft(client, {"limit": 100, "period": "none"})
    engine = cast(fakes.FakePaidEngine, client.app.state.services.registry.get("fake-paid"))  # type: ignore[attr-defined]
    runs = engine.calls
    readings: list[Path] = []

    def room_at_the_submit_only(folder: Path) -> int:
        readings.append(folder)
        return (RESERVE_MB if len(readings) == 1 else 10) * MIB  # the disk fills as the job is claimed

    monkeypatch.setattr(disk, "free_bytes", room_at_the_submit_only)
    response = client.post(f"/v1/assets/{asset_id}/promote", json={"engine": "fake-paid", "cache": False})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "storage_full", job
    assert engine.calls == runs  # never started, so it sent nothing
    assert job["cost"]["charged"] == 0 and job["cost"]["held"] == 0, job["cost"]
    assert sorted(e["kind"] for e in ledger(client, project_id) if e["job_id"] == job["id"]) == ["hold", "release"]


@pytest.mark.parametrize("engine", ["lite", "local-hifi"])
def test_a_local_job_claimed_below_the_reserve_fails_before_it_renders(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        engine: str) -> None:
    # It rendered (minutes of the device for a large local-hifi job), then failed as its images
    # could not be stored.
    with TestClient(create_app(paid_settings_for(tmp_path / "data", hifi_model=tiny.NAME))) as test_client:
        client = cast(httpx.Client, test_client)
        response = client.post("/v1/projects", json={"name": "local", "policy": "local-only"})
        assert response.status_code == 201, response.text
        project_id = response.json()["id"]
        asset_id = make_draft(client, project_id)
        local = client.app.state.services.registry.get(engine)  # type: ignore[attr-defined]
        assert local.kind == "local"
        renders: list[str] = []
        run = local.run

        async def rendering(req: RenderRequest, *args: Any) -> RenderResult:
            renders.append(req.prompt)
            return cast(RenderResult, await run(req, *args))

        monkeypatch.setattr(local, "run", rendering)
        readings: list[Path] = []

        def room_at_the_submit_only(folder: Path) -> int:
            readings.append(folder)
            return (RESERVE_MB if len(readings) == 1 else 10) * MIB  # the disk fills as the job is claimed

        monkeypatch.setattr(disk, "free_bytes", room_at_the_submit_only)
        if engine == "lite":
            response = client.post(f"/v1/projects/{project_id}/drafts", json=DRAFT)
        else:
            response = client.post(f"/v1/assets/{asset_id}/promote", json={"engine": engine, "cache": False})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"])

        assert (job["status"], job["engine"], job["error"]["code"]) == ("failed", engine, "storage_full"), job
        said = job["error"]["message"]
        assert said.startswith("not rendered: ") and "ORCH_MIN_FREE_DISK_MB" in said and "nothing was charged" in said
        assert job["error"]["details"] == {"free_mb": 10, "min_free_mb": RESERVE_MB}
        assert renders == [] and job["assets"] == [] and len(readings) == 2
        assert job["cost"]["charged"] == 0 and job["cost"]["held"] == 0, job["cost"]


def test_the_api_document_says_when_a_submit_is_refused_for_the_reserve(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/projects/{project_id}/drafts", "/v1/assets/{asset_id}/promote", "/v1/assets/{asset_id}/polish"):
        said = paths[path]["post"]["responses"]["503"]["description"]
        assert "ORCH_MIN_FREE_DISK_MB" in said and "`storage_full`" in said, path
    # Explaining a route says what its submit would answer, the reserve's refusal included.
    assert "ORCH_MIN_FREE_DISK_MB" in paths["/v1/route/explain"]["post"]["responses"]["503"]["description"]


def test_a_free_space_that_cannot_be_read_refuses_nothing_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The store's own write then tells what is wrong, where every job refused would hide it.
    gone = tmp_path / "gone"
    with caplog.at_level("WARNING", logger="orchestrator.disk"):
        assert disk.DiskReserve(gone, RESERVE_MB).shortfall() is None
    assert f"the free space of {gone} cannot be read" in caplog.text and "ORCH_MIN_FREE_DISK_MB" in caplog.text
    with pytest.raises(FileNotFoundError):
        disk.free_bytes(gone)  # as said: the reading failed, and was not taken as room


def test_a_free_space_that_stays_unreadable_is_warned_of_once_a_minute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Every submit warned: hundreds of lines a second under load, on a disk that may be full.
    now = [0.0]
    readable = [False]

    def reading(folder: Path) -> int:
        if not readable[0]:
            raise OSError(errno.EIO, "Input/output error")
        return RESERVE_MB * MIB

    monkeypatch.setattr(disk, "free_bytes", reading)
    reserve = disk.DiskReserve(tmp_path, RESERVE_MB, clock=lambda: now[0])

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with caplog.at_level("INFO", logger="orchestrator.disk"):
        for _ in range(3):
            assert reserve.shortfall() is None  # taken as room, as before
        assert len(warnings()) == 1 and "cannot be read (Input/output error)" in warnings()[0]
        now[0] = 59.0
        assert reserve.shortfall() is None
        assert len(warnings()) == 1
        now[0] = 60.0
        assert reserve.shortfall() is None
        assert len(warnings()) == 2
        assert "still cannot be read (Input/output error; 3 more failed readings since" in warnings()[1]
        readable[0] = True
        assert reserve.shortfall() is None and reserve.shortfall() is None
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
            f"the free space of {tmp_path} can be read again: jobs are checked against ORCH_MIN_FREE_DISK_MB again"]
        readable[0] = False  # a new failure within the minute is counted, and told at the next
        assert reserve.shortfall() is None
        assert len(warnings()) == 2
        now[0] = 120.0
        assert reserve.shortfall() is None
        assert len(warnings()) == 3 and "still cannot be read (Input/output error; 1 more failed" in warnings()[2]


def test_a_free_space_read_at_times_only_is_told_at_most_twice_a_minute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A reading that fails every other time (a soft NFS mount timing out) logged a warning and a
    # "can be read again" for each pair of submits: hundreds of lines a second under load.
    now = [0.0]
    readings = [0]

    def every_other(folder: Path) -> int:
        readings[0] += 1
        if readings[0] % 2:
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        return RESERVE_MB * MIB

    monkeypatch.setattr(disk, "free_bytes", every_other)
    reserve = disk.DiskReserve(tmp_path, RESERVE_MB, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="orchestrator.disk"):
        for _ in range(100):
            assert reserve.shortfall() is None
            now[0] += 0.5  # 50 s in all
        told = [r.getMessage() for r in caplog.records]
        assert len(told) == 2, told
        assert "cannot be read (Connection timed out)" in told[0] and "can be read again" in told[1]
        now[0] = 60.0
        caplog.clear()
        assert reserve.shortfall() is None and reserve.shortfall() is None
        told = [r.getMessage() for r in caplog.records]
        # The failures meanwhile are counted, and the next minute's told once more.
        assert len(told) == 2 and "cannot be read at times (Connection timed out; 49 more failed readings" in told[0]
        assert "can be read again" in told[1]


def test_a_local_job_s_reading_of_a_slow_disk_does_not_stop_the_service(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its claim's `statvfs` was made on the event loop: on a data dir on NFS whose server is slow
    # or away (a hard mount waits for it), the API, every job's events and leases waited with it.
    with TestClient(create_app(paid_settings_for(tmp_path / "data"))) as test_client:
        client = cast(httpx.Client, test_client)
        response = client.post("/v1/projects", json={"name": "local", "policy": "local-only"})
        assert response.status_code == 201, response.text
        project_id = response.json()["id"]
        reading, readings = threading.Event(), [0]

        def slow_at_the_claim(folder: Path) -> int:
            readings[0] += 1
            if readings[0] == 2:  # the claim's, after the submit's
                reading.set()
                time.sleep(2.0)
            return RESERVE_MB * 2 * MIB

        monkeypatch.setattr(disk, "free_bytes", slow_at_the_claim)
        response = client.post(f"/v1/projects/{project_id}/drafts", json=DRAFT)
        assert response.status_code == 202, response.text
        assert reading.wait(30)
        began = time.monotonic()
        assert client.get("/healthz").status_code == 200
        answered_in = time.monotonic() - began
        assert wait_for_job(client, response.json()["id"])["status"] == "succeeded"
    assert readings[0] == 2 and answered_in < 1.0, answered_in
