"""Per-project quotas of local device time (`local_seconds_per_day`): a local job's success keeps the
device-seconds it is metered by; a project at or over its quota over the last 24 hours finds local
engines unavailable (a fallback routes on), and a job only they could take is refused 429
`device_time_exhausted` with a `Retry-After`, nothing written; only the admin key sets the quota."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import update
from sqlmodel import col, select

from orchestrator import device_time
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.errors import EngineError
from orchestrator.ids import new_id
from orchestrator.models import IdempotencyKey, Job, LedgerEntry, Project
from orchestrator.schemas import DraftCreate
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.api import SLOW, SMALL, assert_error, create_project, run_draft, submit_draft, wait_for_job
from tests.api.test_storage_quota import client_for, services_of
from tests.fakes import PLUGIN_LOCAL_WORK_SECONDS
from tiers import tiny
from tiers.base import DEVICE_SECONDS, CancelToken, NullProgress, Progress, RenderRequest

SettingsFactory = Callable[..., Settings]
ADMIN_KEY = "admin-secret-for-device-time-tests"
POLICY = "device-time-test"
# Drafts on Lite alone; bridges on local-hifi first, then a self-hosted (remote) fake engine.
POLICY_TOML = f"""
name = "{POLICY}"
description = "Drafts on Lite; bridges on local-hifi, falling back to the free fake server."

[[rules]]
name = "drafts"
match = {{ stage = "ideation" }}
engines = ["lite"]

[[rules]]
name = "bridges"
match = {{ stage = ["bridge", "polish"] }}
engines = ["local-hifi", "fake-free"]
"""


def with_fallback(make_settings: SettingsFactory, tmp_path: Path, **overrides: Any) -> Settings:
    folder = tmp_path / "policies"
    folder.mkdir(exist_ok=True)
    (folder / f"{POLICY}.toml").write_text(POLICY_TOML)
    return make_settings(engines="fake-free=tests.fakes:free_factory", policy=POLICY, policy_dir=folder, **overrides)


def add_used(services: Services, project_id: str, *ended: tuple[timedelta, float]) -> None:
    """Rows of local jobs of the project that ended each `ago` holding the device `seconds`."""
    now = utcnow()
    with services.db.transaction() as s:
        for ago, seconds in ended:
            s.add(Job(id=new_id("job"), project_id=project_id, stage="ideation", engine="lite",
                      status="succeeded", params={"prompt": "x"}, finished_at=now - ago, device_seconds=seconds))


def test_a_local_job_s_success_keeps_its_device_seconds_and_the_project_shows_them(
        make_settings: SettingsFactory) -> None:
    check_a_local_job_s_success_keeps_its_device_seconds(make_settings)


def check_a_local_job_s_success_keeps_its_device_seconds(make_settings: SettingsFactory, **database: Any) -> None:
    with client_for(make_settings(**database)) as client:
        project = create_project(client)
        assert (project["local_seconds_per_day"], project["local_seconds_quota"],
                project["local_seconds_used"]) == (None, None, 0.0)
        done = run_draft(client, project["id"], seed=3)
        with services_of(client).db.session() as s:
            job = s.get(Job, done["id"])
        assert job is not None and job.device_seconds is not None and job.started_at and job.finished_at
        # The engine's own count: within the attempt, and more than nothing for two denoising steps.
        assert 0 < job.device_seconds <= (job.finished_at - job.started_at).total_seconds()
        shown = client.get(f"/v1/projects/{project['id']}").json()
        assert shown["local_seconds_used"] == math.floor(job.device_seconds * 1000) / 1000
        listed = {p["id"]: p for p in client.get("/v1/projects").json()["items"]}
        assert listed[project["id"]]["local_seconds_used"] == shown["local_seconds_used"]
        # /metrics counts it too, to the millisecond (rounded, where the API cuts).
        metrics = client.get("/metrics").text
        assert (f'orchestrator_project_local_device_seconds_total{{project="{project["id"]}"}} '
                f"{round(job.device_seconds * 1000) / 1000}") in metrics.splitlines()
        assert "orchestrator_project_local_seconds_quota{" not in metrics  # no quota in force


@pytest.mark.parametrize("own", [True, False], ids=["own-quota", "server-default"])
def test_a_project_at_its_quota_is_refused_429_until_its_seconds_age_out(make_settings: SettingsFactory,
                                                                         own: bool) -> None:
    check_a_project_at_its_quota_is_refused_429_until_its_seconds_age_out(make_settings, own)


def check_a_project_at_its_quota_is_refused_429_until_its_seconds_age_out(make_settings: SettingsFactory, own: bool,
                                                                          **database: Any) -> None:
    settings = make_settings(run_jobs=False, **({} if own else {"project_local_seconds_per_day": 120}), **database)
    with client_for(settings) as client:
        own_quota: dict[str, Any] = {"local_seconds_per_day": 120} if own else {}
        project = create_project(client, **own_quota)
        project_id = project["id"]
        assert (project["local_seconds_per_day"], project["local_seconds_quota"]) == (120 if own else None, 120)
        services = services_of(client)
        taken = {"prompt": "taken before", **SMALL}
        first = client.post(f"/v1/projects/{project_id}/drafts", json=taken, headers={"Idempotency-Key": "taken"})
        assert first.status_code == 202, first.text
        # 150 s in the window (a day-old job's 500 s no longer count): the one of 23 hours ago
        # must age out to take it under 120, in an hour.
        add_used(services, project_id, (timedelta(hours=25), 500.0), (timedelta(hours=23), 100.0),
                 (timedelta(hours=1), 50.0))
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"] == 150.0

        def rows() -> tuple[int, int, int]:
            with services.db.session() as s:
                return (len(s.exec(select(Job.id)).all()), len(s.exec(select(LedgerEntry.id)).all()),
                        len(s.exec(select(IdempotencyKey.key)).all()))

        before = rows()
        refused = client.post(f"/v1/projects/{project_id}/drafts", json={"prompt": "more", **SMALL},
                              headers={"Idempotency-Key": "over the quota"})
        error = assert_error(refused, 429, "device_time_exhausted")
        assert 3590 <= int(refused.headers["Retry-After"]) <= 3600, refused.headers
        assert (error["details"]["used_seconds"], error["details"]["quota_seconds"]) == (150.0, 120)
        assert error["details"]["candidates"] == [{"engine": "lite", "estimate": 0.0, "skipped": (
            "device-time quota used: 150 of 120 device-seconds in the last 24 hours")}]
        assert ("its quota of 120" if own else "ORCH_PROJECT_LOCAL_SECONDS_PER_DAY") in error["message"]
        assert "wait, or ask the admin" in error["message"], error["message"]
        # Explaining the route says the same: a 200 said such a job would be taken.
        explained = client.post("/v1/route/explain", json={"stage": "ideation", "project_id": project_id,
                                                           "prompt": "more"})
        assert assert_error(explained, 429, "device_time_exhausted")["details"]["used_seconds"] == 150.0
        assert rows() == before  # no job, no hold, no key kept
        # A retry of a request taken before is answered as it was.
        again = client.post(f"/v1/projects/{project_id}/drafts", json=taken, headers={"Idempotency-Key": "taken"})
        assert (again.status_code, again.json()["id"], again.headers["Idempotent-Replayed"]) == (
            202, first.json()["id"], "true")

        # Under it once the oldest counted job is older than a day.
        with services.db.transaction() as s:
            aged = s.exec(select(Job).where(col(Job.device_seconds) == 100.0)).one()
            aged.finished_at = (aged.finished_at or utcnow()) - timedelta(hours=2)
            s.add(aged)
        submit_draft(client, project_id)
        # A larger quota of its own lets it in at once too.
        add_used(services, project_id, (timedelta(minutes=5), 100.0))
        assert_error(client.post(f"/v1/projects/{project_id}/drafts", json={"prompt": "x", **SMALL}), 429,
                     "device_time_exhausted")
        patched = client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": 151})
        assert patched.status_code == 200, patched.text
        assert (patched.json()["local_seconds_quota"], patched.json()["local_seconds_used"]) == (151, 150.0)
        submit_draft(client, project_id, seed=43)


def test_a_project_over_its_quota_routes_past_local_engines_and_a_quota_of_0_allows_no_local_work(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    with client_for(with_fallback(make_settings, tmp_path)) as client:
        project_id = create_project(client)["id"]
        [draft] = run_draft(client, project_id, seed=5)["assets"]
        explained = client.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": draft})
        assert explained.status_code == 200 and explained.json()["engine"] == "local-hifi", explained.text
        patched = client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": 0})
        assert patched.json()["local_seconds_per_day"] == 0
        skipped = "device-time quota used: "
        explained = client.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": draft})
        assert explained.status_code == 200, explained.text
        routing = explained.json()["routing"]
        assert explained.json()["engine"] == "fake-free"
        assert [(c["engine"], (c["skipped"] or "")[:len(skipped)]) for c in routing["candidates"]] == [
            ("fake-free", ""), ("local-hifi", skipped)]
        promoted = client.post(f"/v1/assets/{draft}/promote", json={})
        assert promoted.status_code == 202, promoted.text
        job = promoted.json()
        assert job["engine"] == "fake-free" and job["routing"]["candidates"] == routing["candidates"]
        wait_for_job(client, job["id"])
        # Lite alone serves drafts: refused, and waiting brings a quota of 0 nowhere (no Retry-After).
        refused = client.post(f"/v1/projects/{project_id}/drafts", json={"prompt": "x", **SMALL})
        error = assert_error(refused, 429, "device_time_exhausted")
        assert "Retry-After" not in refused.headers and error["details"]["quota_seconds"] == 0
        assert "ask the admin" in error["message"] and "wait," not in error["message"], error["message"]
        # A client asking for the local engine by name is refused too, not sent elsewhere.
        assert_error(client.post(f"/v1/assets/{draft}/promote", json={"engine": "local-hifi"}), 429,
                     "device_time_exhausted")
        # Null: the server's default again (none here).
        patched = client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": None})
        assert (patched.json()["local_seconds_per_day"], patched.json()["local_seconds_quota"]) == (None, None)
        submit_draft(client, project_id, seed=6)


@pytest.mark.parametrize("value", [-1, 1.5, "10", True, 86_400 * 1024 + 1])
def test_a_quota_that_is_no_whole_number_of_seconds_in_range_is_refused(make_settings: SettingsFactory,
                                                                        value: Any) -> None:
    with client_for(make_settings(run_jobs=False)) as client:
        project_id = create_project(client)["id"]
        error = assert_error(client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": value}), 422,
                             "invalid_request")
        assert error["details"]["errors"][0]["loc"] == ["body", "local_seconds_per_day"]
        assert_error(client.post("/v1/projects", json={"name": "x", "local_seconds_per_day": value}), 422,
                     "invalid_request")
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_per_day"] is None


def test_only_the_admin_key_sets_a_project_s_quota(make_settings: SettingsFactory) -> None:
    with client_for(make_settings(admin_key=ADMIN_KEY, run_jobs=False)) as client:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        made = client.post("/v1/projects", json={"name": "p", "local_seconds_per_day": 60}, headers=admin)
        assert made.status_code == 201 and made.json()["local_seconds_per_day"] == 60
        project_id = made.json()["id"]
        key = client.post(f"/v1/projects/{project_id}/keys", json={"name": "k"}, headers=admin).json()["key"]
        mine = {"Authorization": f"Bearer {key}"}
        assert_error(client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": None}, headers=mine),
                     403, "forbidden")
        shown = client.get(f"/v1/projects/{project_id}", headers=mine).json()
        assert (shown["local_seconds_per_day"], shown["local_seconds_quota"]) == (60, 60)


@pytest.mark.parametrize(("value", "told"), [("-1", "greater than or equal to 0"),
                                             ("88473601", "less than or equal to 88473600"),
                                             ("1.5", "valid integer")])
def test_a_server_default_quota_out_of_range_is_refused_at_start(make_settings: SettingsFactory,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  value: str, told: str) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_PROJECT_LOCAL_SECONDS_PER_DAY", value)
    with pytest.raises(ValidationError, match=f"project_local_seconds_per_day\n  Input should be (a )?{told}"):
        Settings()
    monkeypatch.setenv("ORCH_PROJECT_LOCAL_SECONDS_PER_DAY", "0")  # no local work for projects without their own
    assert Settings().project_local_seconds_per_day == 0
    monkeypatch.delenv("ORCH_PROJECT_LOCAL_SECONDS_PER_DAY")
    assert Settings().project_local_seconds_per_day is None


def test_the_seconds_shown_are_at_the_quota_only_when_the_project_is(make_settings: SettingsFactory) -> None:
    """`local_seconds_used` is cut to the millisecond, never rounded up: 4.9996 s shown as 5.0
    against a quota of 5 said local engines were unavailable while a draft was still taken."""
    with client_for(make_settings(run_jobs=False)) as client:
        project_id = create_project(client, local_seconds_per_day=5)["id"]
        add_used(services_of(client), project_id, (timedelta(hours=1), 4.9996))
        shown = client.get(f"/v1/projects/{project_id}").json()
        listed = {p["id"]: p for p in client.get("/v1/projects").json()["items"]}[project_id]
        assert shown["local_seconds_used"] == listed["local_seconds_used"] == 4.999
        assert shown["local_seconds_used"] < shown["local_seconds_quota"]
        submit_draft(client, project_id)  # under the quota, as shown
        # Over it, it is shown at or over it: 1 ms more.
        add_used(services_of(client), project_id, (timedelta(minutes=30), 0.001))
        shown = client.get(f"/v1/projects/{project_id}").json()
        assert shown["local_seconds_used"] >= shown["local_seconds_quota"] == 5
        refused = client.post(f"/v1/projects/{project_id}/drafts", json={"prompt": "x", **SMALL})
        assert assert_error(refused, 429, "device_time_exhausted")["details"]["used_seconds"] >= 5


def test_a_quota_lowered_while_a_request_is_routed_refuses_it(make_settings: SettingsFactory,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATCH that cuts a project off (0) and commits between a draft's routing and its commit
    refuses the draft, as a lowered storage quota does: judged on the quota before the PATCH, it
    was queued after the PATCH's 200 (the submit waits for the lock the PATCH holds)."""
    check_a_quota_lowered_while_a_request_is_routed_refuses_it(make_settings, monkeypatch)


def check_a_quota_lowered_while_a_request_is_routed_refuses_it(make_settings: SettingsFactory,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               **database: Any) -> None:
    with client_for(make_settings(run_jobs=False, **database)) as client:
        project_id = create_project(client)["id"]
        services = services_of(client)
        jobs = services.jobs
        decide = jobs.decide

        def routed_then_patched(*args: Any, **kwargs: Any) -> Any:
            decision = decide(*args, **kwargs)
            patched = client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": 0})
            assert patched.status_code == 200, patched.text
            return decision

        monkeypatch.setattr(jobs, "decide", routed_then_patched)
        refused = client.post(f"/v1/projects/{project_id}/drafts", json={"prompt": "x", **SMALL},
                              headers={"Idempotency-Key": "cut off"})
        monkeypatch.undo()
        assert assert_error(refused, 429, "device_time_exhausted")["details"]["quota_seconds"] == 0
        with services.db.session() as s:
            assert s.exec(select(Job.id)).all() == [] and s.exec(select(IdempotencyKey.key)).all() == []
        # Raised again: taken.
        assert client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": None}).status_code == 200
        submit_draft(client, project_id)


def test_the_api_schema_says_a_quota_of_0_gives_no_retry_after(make_settings: SettingsFactory) -> None:
    """A refusal for a quota of 0 has no `Retry-After` (waiting never brings the project under it):
    the schema said `Retry-After` says when to try again, for every `device_time_exhausted`."""
    with client_for(make_settings(run_jobs=False)) as client:
        paths = client.get("/openapi.json").json()["paths"]
        for path, method in [("/v1/projects/{project_id}/drafts", "post"), ("/v1/assets/{asset_id}/promote", "post"),
                             ("/v1/assets/{asset_id}/polish", "post"), ("/v1/route/explain", "post")]:
            told = paths[path][method]["responses"]["429"]["description"]
            assert "device_time_exhausted" in told and "none for a quota of 0" in told, (path, told)


def running_past(client: Any, job_id: str, step: int, timeout: float = 60.0) -> None:
    """Poll the job until its denoising has reached `step` (a deadline, not a timing)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        if (job["progress"] or {}).get("step", 0) >= step:
            return
        assert time.monotonic() < deadline, f"job {job_id} never reached step {step}: {job}"
        time.sleep(0.02)  # poll interval, not a wait for a state


def kept_seconds(services: Services, job_id: str) -> float | None:
    with services.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.device_seconds


def test_local_jobs_canceled_part_way_count_toward_the_quota(make_settings: SettingsFactory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A project that cancels its drafts after several steps was admitted again and again under a
    quota of 1 s: only a success kept its device-seconds, so each canceled job held the device for
    seconds nobody counted. Now each counts, and the project is refused once they reach its quota.
    Each draft's work first holds the device 0.4 s (a slow device's worth, whatever this machine's
    speed; its model loaded, as an attempt's count leaves the load out), so three of them take it there."""
    with client_for(make_settings()) as client:
        project_id = create_project(client, local_seconds_per_day=1)["id"]
        services = services_of(client)
        engine = services.registry.get("lite")
        run = engine.run

        async def slow_device(request: RenderRequest, progress: Progress, cancel: CancelToken) -> Any:
            return await run(request, SlowDevice(progress), cancel)

        monkeypatch.setattr(engine, "run", slow_device)
        counted, kept = 0.0, []
        for seed in range(6):
            response = client.post(f"/v1/projects/{project_id}/drafts",
                                   json={"prompt": "canceled late", "seed": seed, **SLOW, "width": 128,
                                         "height": 128})
            if response.status_code == 429:
                break
            # Admitted only while what the earlier cancels held is under the quota.
            assert response.status_code == 202 and counted < 1, (counted, response.text)
            job_id = response.json()["id"]
            running_past(client, job_id, 3)
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
            done = wait_for_job(client, job_id, ("canceled",))
            assert done["assets"] == [] and 3 <= done["progress"]["step"] < SLOW["steps"]
            kept.append(kept_seconds(services, job_id))
            counted += kept[-1] or 0.0
            shown = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
            assert shown == math.floor(counted * 1000) / 1000
        else:
            raise AssertionError(f"6 drafts canceled after 3 steps were all admitted under a quota of 1 s "
                                 f"(counted {counted:.3f} s: {kept})")
        assert all(seconds is not None and seconds >= 0.4 for seconds in kept), kept
        assert len(kept) <= 3, kept  # 1.2 s and more after three: the fourth is refused
        error = assert_error(response, 429, "device_time_exhausted")
        assert error["details"]["used_seconds"] == math.floor(counted * 1000) / 1000 >= 1
        # Canceling costs nothing, metered or not: no ledger entry charges the canceled jobs.
        with services.db.session() as s:
            assert [e.amount for e in s.exec(select(LedgerEntry)).all() if e.amount] == []


class SlowDevice(NullProgress):
    """The engine's progress, told on: its work holds the device 0.4 s once it starts."""

    def __init__(self, told: Progress) -> None:
        self.told = told

    def on_device(self) -> None:
        self.told.on_device()
        time.sleep(0.4)  # on the inference thread, as the device's work is

    def step(self, step: int, total: int, preview: Any = None) -> None:
        self.told.step(step, total, preview)

    def state(self, state: str, **details: Any) -> None:
        self.told.state(state, **details)


def wrapped_run(engine: Any, monkeypatch: pytest.MonkeyPatch, error: Exception, made: list[float]) -> None:
    """`engine`'s jobs do their work on the device, then fail with `error` (`made`: each one's own count)."""
    run = engine.run

    async def work_then_fail(*args: Any) -> Any:
        result = await run(*args)
        made.append(float(result.metadata[DEVICE_SECONDS]))
        raise error

    monkeypatch.setattr(engine, "run", work_then_fail)


def test_a_local_job_that_fails_after_its_work_counts_it(make_settings: SettingsFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft that failed on Lite once its steps had run kept no device-seconds: only a success did."""
    check_a_local_job_that_fails_after_its_work_counts_it(make_settings, monkeypatch)


def check_a_local_job_that_fails_after_its_work_counts_it(make_settings: SettingsFactory,
                                                          monkeypatch: pytest.MonkeyPatch, **database: Any) -> None:
    with client_for(make_settings(**database)) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        services = services_of(client)
        made: list[float] = []
        wrapped_run(services.registry.get("lite"), monkeypatch, EngineError(
            "the device broke after its work", retryable=False, charged="no"), made)
        job = submit_draft(client, project_id, steps=4)
        done = wait_for_job(client, job["id"], ("failed",))
        assert done["error"]["code"] == "engine_error" and len(made) == 1
        seconds = kept_seconds(services, job["id"])
        # Measured by the runner, around the engine's own count of the work it did.
        assert seconds is not None and seconds >= made[0] > 0
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"] == math.floor(
            seconds * 1000) / 1000
        with services.db.session() as s:  # a failure is not charged, metered or not
            assert [e.amount for e in s.exec(select(LedgerEntry)).all() if e.amount] == []


def slow_loads(services: Services, monkeypatch: pytest.MonkeyPatch, seconds: float) -> threading.Event:
    """Each text-to-image pipeline the local engines ask for takes `seconds` more to come, as a
    model's first load does (on the inference thread); the event is set as one starts."""
    runtime = services.registry.get("lite").runtime  # type: ignore[attr-defined]
    loaded = runtime.text2img
    loading = threading.Event()

    def slow_load(model: str) -> Any:
        loading.set()
        time.sleep(seconds)
        return loaded(model)

    monkeypatch.setattr(runtime, "text2img", slow_load)
    return loading


def test_a_local_job_that_fails_after_a_slow_load_counts_its_work_not_the_load(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed attempt was counted from the engine's start, its model's load included, where a
    success's own count leaves the load out: a draft that failed after a 1.5 s load counted it."""
    with client_for(make_settings()) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        services = services_of(client)
        slow_loads(services, monkeypatch, 1.5)
        made: list[float] = []
        wrapped_run(services.registry.get("lite"), monkeypatch, EngineError(
            "the device broke after its work", retryable=False, charged="no"), made)
        job = submit_draft(client, project_id, steps=2)
        assert wait_for_job(client, job["id"], ("failed",))["error"]["code"] == "engine_error"
        seconds = kept_seconds(services, job["id"])
        # The work's own count and the hop back to the runner, without the load's 1.5 s.
        assert len(made) == 1 and seconds is not None and made[0] <= seconds < made[0] + 0.5, (seconds, made)


def test_a_local_job_canceled_while_its_model_loads_counts_no_work(make_settings: SettingsFactory,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft canceled during its model's load counted the load up to the cancel, where a
    success's count never holds a load: now it counts nothing (no step of it ran)."""
    with client_for(make_settings()) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        services = services_of(client)
        loading = slow_loads(services, monkeypatch, 1.5)
        job = submit_draft(client, project_id, steps=2)
        assert loading.wait(30)
        time.sleep(0.5)  # the load under way for a while: what was counted before
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        done = wait_for_job(client, job["id"], ("canceled",))
        assert done["progress"]["step"] == 0
        assert kept_seconds(services, job["id"]) in (None, 0.0)
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"] == 0.0


def test_a_plugin_s_local_engine_that_never_tells_its_device_start_counts_its_attempt(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    """A plugin subclassing `LocalEngine` inherited `tells_device_start`: its work never called
    `Progress.on_device`, so each failed attempt counted 0 device-seconds, whatever it held. Now
    a subclass tells only where its own class says so, and one that does not counts its attempts
    from its engine's start."""
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "plugin-local.toml").write_text(
        'name = "plugin-local"\ndescription = "Drafts on a plugin\'s local engine."\n\n'
        '[[rules]]\nname = "drafts"\nmatch = { stage = "ideation" }\nengines = ["plugin-local"]\n')
    settings = make_settings(engines="plugin-local=tests.fakes:plugin_local_factory", policy="plugin-local",
                             policy_dir=folder)
    with client_for(settings) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        services = services_of(client)
        assert services.registry.get("plugin-local").kind == "local"
        job = submit_draft(client, project_id)
        assert job["engine"] == "plugin-local", job
        assert wait_for_job(client, job["id"], ("failed",))["error"]["code"] == "engine_error"
        seconds = kept_seconds(services, job["id"])
        assert seconds is not None and seconds >= PLUGIN_LOCAL_WORK_SECONDS, seconds
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"] == math.floor(
            seconds * 1000) / 1000


def test_a_job_that_falls_back_from_a_local_engine_to_a_remote_one_keeps_the_local_seconds(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bridge whose local-hifi attempt failed (retryable, nothing charged) after its work and
    moved to a remote engine kept none of that attempt's device-seconds: the remote success wrote
    its own null over the column."""
    with client_for(with_fallback(make_settings, tmp_path)) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        services = services_of(client)
        [draft] = run_draft(client, project_id, seed=5)["assets"]
        before = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        made: list[float] = []
        wrapped_run(services.registry.get("local-hifi"), monkeypatch, EngineError(
            "out of memory, say", retryable=True, charged="no"), made)
        promoted = client.post(f"/v1/assets/{draft}/promote", json={})
        assert promoted.status_code == 202 and promoted.json()["engine"] == "local-hifi", promoted.text
        done = wait_for_job(client, promoted.json()["id"], ("succeeded",))
        assert done["engine"] == "fake-free" and [a["engine"] for a in done["attempts"]] == [
            "local-hifi", "fake-free"] and len(made) == 1
        seconds = kept_seconds(services, done["id"])
        assert seconds is not None and seconds >= made[0] > 0
        after = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        assert after == pytest.approx(before + seconds, abs=0.002)


def test_a_local_job_a_dead_process_left_counts_what_it_held_until_its_last_renewal(
        make_settings: SettingsFactory) -> None:
    """Rows as a dead process left them on Lite: started 100 s before, its lease last renewed 30 s
    before. Recovery counts the 70 s between, whether it cancels the job (a cancel was asked) or
    queues it again (its rerun's own seconds are added at its success)."""
    check_a_local_job_a_dead_process_left_counts_what_it_held(make_settings)


def left_by_a_dead_process(settings: Settings, renewed_ago: float = 30.0) -> tuple[str, str, str]:
    """A project with two local drafts a dead process left running, 70 s of work up to its lease's
    last renewal `renewed_ago` seconds before (a 60 s lease): one with a cancel asked, one to queue
    again. Returns the project's id, the canceled job's and the other's."""
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.resolved_database_url)
    db.migrate()
    now = utcnow()
    project_id, canceled_id, requeued_id = new_id("prj"), new_id("job"), new_id("job")
    left: dict[str, Any] = {"status": "running", "attempt": 1, "lease_owner": "dead-host:1:0",
                            "started_at": now - timedelta(seconds=renewed_ago + 70),
                            "lease_expires_at": now - timedelta(seconds=renewed_ago) + timedelta(seconds=60)}
    params = {"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
              "width": 64, "height": 64, "steps": 2, "tags": {}}
    with db.transaction() as s:
        s.add(Project(id=project_id, name="before the crash", policy="balanced", local_seconds_per_day=3600))
        s.flush()
        s.add(Job(id=canceled_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                  params=params, cancel_requested_at=now, **left))
        s.add(Job(id=requeued_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                  params=params, **left))
    db.dispose()
    return project_id, canceled_id, requeued_id


def check_a_local_job_a_dead_process_left_counts_what_it_held(make_settings: SettingsFactory,
                                                              renewed_ago: float = 30.0, **database: Any) -> None:
    settings = make_settings(lease_seconds=60, **database)
    project_id, canceled_id, requeued_id = left_by_a_dead_process(settings, renewed_ago)

    with client_for(settings) as client:
        services = services_of(client)
        assert wait_for_job(client, canceled_id)["status"] == "canceled"
        assert kept_seconds(services, canceled_id) == pytest.approx(70.0, abs=0.001)
        done = wait_for_job(client, requeued_id)
        assert done["status"] == "succeeded"
        assert [a["status"] for a in done["attempts"]] == ["interrupted", "succeeded"]
        requeued = kept_seconds(services, requeued_id)
        assert requeued is not None and 70.0 < requeued < 70.0 + 60
        used = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        assert used == pytest.approx(70.0 + requeued, abs=0.002)


@pytest.mark.parametrize("requeue", ["stop", "old-release"])
def test_a_claim_that_stamps_no_lease_taken_at_is_not_counted_from_an_earlier_claim_s(
        make_settings: SettingsFactory, requeue: str) -> None:
    """A rolling upgrade: a claim stamped `lease_taken_at` (T0), the job went back to the queue
    still holding it (a stop of this release, or a requeue by a release without the column), and
    hours later a release without the column claimed it (`started_at` and the lease alone) and
    died: recovery counted from T0, three hours of device time no attempt held."""
    check_a_claim_that_stamps_no_lease_taken_at_is_not_counted_from_an_earlier_claim_s(make_settings, requeue)


def check_a_claim_that_stamps_no_lease_taken_at_is_not_counted_from_an_earlier_claim_s(
        make_settings: SettingsFactory, requeue: str, **database: Any) -> None:
    services = Services.build(make_settings(lease_seconds=60, **database))
    try:
        project_id = new_id("prj")
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="rolling upgrade", policy="balanced", local_seconds_per_day=3600))
        body = DraftCreate(prompt="a lighthouse", n=1, width=64, height=64, steps=1)
        job_id = services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="test")[0].id
        [(claim, _lane)] = services.scheduler._claim_ready({})
        assert claim.job.id == job_id and claim.job.engine == "lite"
        if requeue == "stop":  # this release's stop gives the unstarted claim back
            services.scheduler.runner.give_back(claim)
        else:  # a release without the column queues it again, as its recovery or stop does
            with services.db.transaction() as s:
                s.execute(update(Job).where(col(Job.id) == job_id).values(
                    status="queued", lease_owner=None, lease_expires_at=None))
        services.scheduler._claimed.clear()
        with services.db.transaction() as s:
            row = s.get(Job, job_id)
            assert row is not None and row.status == "queued"
            if requeue == "stop":  # queued again, the job holds nothing of the claim's lease
                assert (row.lease_taken_at, row.lease_taken_attempt) == (None, None)
            now = services.db.now()
            # Three hours on (whatever stamp the row still holds is as old), a release without the
            # column claims it: `started_at` and its lease, last renewed 70 s after its start.
            stamp = None if row.lease_taken_at is None else row.lease_taken_at - timedelta(hours=3)
            s.execute(update(Job).where(col(Job.id) == job_id).values(lease_taken_at=stamp))
            s.execute(update(Job).where(col(Job.id) == job_id).values(
                status="running", attempt=Job.attempt + 1, lease_owner="old-release:1:0",
                started_at=now - timedelta(seconds=100),
                lease_expires_at=now - timedelta(seconds=30) + timedelta(seconds=60)))
        with services.db.session() as s:
            left = s.get(Job, job_id)
            assert left is not None and left.status == "running"
        assert services.scheduler._recover_one(left) is not None
        with services.db.session() as s:
            recovered = s.get(Job, job_id)
            assert recovered is not None and recovered.status == "queued"
            assert recovered.device_seconds == pytest.approx(70.0, abs=0.5)
            assert (recovered.lease_taken_at, recovered.lease_taken_attempt) == (None, None)
    finally:
        asyncio.run(services.aclose())


def test_a_process_of_another_lease_length_counts_a_running_attempt_as_its_holder_renewed_it(
        make_settings: SettingsFactory) -> None:
    """A local attempt claimed 100 s before its lease's last renewal by a process whose lease is
    60 s was read by processes of other ORCH_LEASE_SECONDS by their own: its renewal as the
    expiry less their lease. One of 300 s counted 0 (240 s short), and its recovery, once the lease
    ran out, kept 0; one of 30 s counted 130 at recovery. Now the claim and each renewal stamp the
    renewal's time, and every process counts the same 100 s."""
    check_a_process_of_another_lease_length_counts_a_running_attempt_alike(make_settings)


def check_a_process_of_another_lease_length_counts_a_running_attempt_alike(make_settings: SettingsFactory,
                                                                           **database: Any) -> None:
    services = Services.build(make_settings(lease_seconds=60, **database))
    try:
        project_id = new_id("prj")
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="lease lengths", policy="balanced", local_seconds_per_day=3600))
        body = DraftCreate(prompt="a lighthouse", n=1, width=64, height=64, steps=1)
        job_id = services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="test")[0].id
        [(claim, _lane)] = services.scheduler._claim_ready({})
        assert claim.job.id == job_id and claim.job.engine == "lite"
        with services.db.transaction() as s:  # claimed 100 s before the renewal below
            taken = s.scalar(select(Job.lease_taken_at).where(col(Job.id) == job_id))
            assert taken is not None
            s.execute(update(Job).where(col(Job.id) == job_id).values(lease_taken_at=taken - timedelta(seconds=100)))
        services.scheduler._renew([claim])
        for seconds in (300, 60, 30):
            lease = timedelta(seconds=seconds)
            with services.db.session() as s:
                # Read live, as admission, a project's read and /metrics read it.
                used = device_time.used_by(s, [project_id], local={"lite"}, lease=lease,
                                           leased_now=services.db.now())
                row = s.get(Job, job_id)
            assert used.get(project_id, 0.0) == pytest.approx(100.0, abs=1.0), seconds
            # Read by recovery once the holder's lease ran out (it died after that renewal).
            assert row is not None and row.lease_expires_at is not None
            held = device_time.held_until_lease(row, lease, row.lease_expires_at + timedelta(seconds=1))
            assert held == pytest.approx(100.0, abs=1.0), seconds
    finally:
        asyncio.run(services.aclose())


def test_a_running_local_attempt_counts_toward_the_quota_as_it_runs(make_settings: SettingsFactory) -> None:
    """Admission counted the seconds of jobs that had ended alone: a project with a quota of 120
    whose draft had held the device 100 s so far (its process alive, renewing its lease) and whose
    other draft, queued again by a stop, kept 30 s of an earlier attempt, read 0 used and was let
    start more local jobs. Now both count at once, and the project is refused."""
    check_a_running_local_attempt_counts_toward_the_quota(make_settings)


def running_and_requeued(services: Services, project_id: str) -> tuple[str, str]:
    """A draft of the project running on Lite for 100 s by the leases' clock, on the device since its
    claim (its model loaded), its lease (60 s) last renewed 5 s ago by a live process, and one
    queued again holding 30 s of an earlier attempt."""
    running_id, queued_id = new_id("job"), new_id("job")
    params = {"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
              "width": 64, "height": 64, "steps": 2, "tags": {}}
    with services.db.transaction() as s:
        now = services.db.now()
        s.add(Job(id=running_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                  params=params, status="running", attempt=1, lease_owner="busy-host:1:0",
                  started_at=utcnow() - timedelta(seconds=100), lease_taken_at=now - timedelta(seconds=100),
                  lease_taken_attempt=1, lease_expires_at=now - timedelta(seconds=5) + timedelta(seconds=60),
                  device_began_at=now - timedelta(seconds=100)))
        s.add(Job(id=queued_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                  params=params, status="queued", attempt=1, device_seconds=30.0))
    return running_id, queued_id


def check_a_running_local_attempt_counts_toward_the_quota(make_settings: SettingsFactory, **database: Any) -> None:
    with client_for(make_settings(run_jobs=False, lease_seconds=60, **database)) as client:
        project_id = create_project(client, local_seconds_per_day=120)["id"]
        services = services_of(client)
        running_id, _ = running_and_requeued(services, project_id)
        # Its live lease (renewed 5 s ago) counts to now, not to that renewal.
        used = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        assert used == pytest.approx(100.0 + 30.0, abs=3.0)
        listed = {p["id"]: p for p in client.get("/v1/projects").json()["items"]}
        assert listed[project_id]["local_seconds_used"] == pytest.approx(used, abs=5.0)
        refused = client.post(f"/v1/projects/{project_id}/drafts", json={"prompt": "more", **SMALL})
        error = assert_error(refused, 429, "device_time_exhausted")
        assert error["details"]["used_seconds"] == pytest.approx(used, abs=5.0)
        # Unfinished, they age out only 24 hours after they end: not sooner than that.
        assert int(refused.headers["Retry-After"]) == 86400, refused.headers
        explained = client.post("/v1/route/explain", json={"stage": "ideation", "project_id": project_id,
                                                           "prompt": "more"})
        assert_error(explained, 429, "device_time_exhausted")
        # /metrics reads it as admission does.
        line = f'orchestrator_project_local_seconds_used{{project="{project_id}"}} '
        [shown] = [row for row in client.get("/metrics").text.splitlines() if row.startswith(line)]
        assert float(shown.removeprefix(line)) == pytest.approx(used, abs=5.0)
        # Ended, the attempt counts its own seconds from its end, once: the sum stays.
        with services.db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == running_id).values(
                status="failed", finished_at=utcnow(), device_seconds=95.0, lease_owner=None,
                lease_expires_at=None, lease_taken_at=None, lease_taken_attempt=None))
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"] == 125.0
        # Under a larger quota it is let in again.
        assert client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": 126}).status_code == 200
        submit_draft(client, project_id)


def claimed_and_never_renewed(services: Services, project_id: str, ago: float = 30.0) -> str:
    """A draft of the project a live process claimed on Lite `ago` seconds before by the leases'
    clock (60 s lease), its lease taken then and not renewed since, as a claim stamps it, its work
    on the device from then (its model loaded)."""
    job_id = new_id("job")
    params = {"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
              "width": 64, "height": 64, "steps": 2, "tags": {}}
    with services.db.transaction() as s:
        claimed = services.db.now() - timedelta(seconds=ago)
        s.add(Job(id=job_id, project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                  params=params, status="running", attempt=1, lease_owner="busy-host:1:0",
                  started_at=utcnow() - timedelta(seconds=ago), lease_taken_at=claimed, lease_taken_attempt=1,
                  lease_renewed_at=claimed, lease_expires_at=claimed + timedelta(seconds=60), device_began_at=claimed))
    return job_id


def test_a_running_local_attempt_of_a_live_process_counts_to_now_not_to_its_last_renewal(
        make_settings: SettingsFactory) -> None:
    """A running attempt counted only up to its lease's last renewal: a draft claimed 30 s before
    and not yet renewed (a lease of 60 s renews every 20 s; a claim stamps its renewal) read 0, in
    the project's `local_seconds_used`, /metrics and admission, so a project with a quota of 20
    was let start more local work while its draft had held the device 30 s. A live lease (its
    expiry ahead, by the leases' clock) now counts to now."""
    with client_for(make_settings(run_jobs=False, lease_seconds=60)) as client:
        project_id = create_project(client, local_seconds_per_day=20)["id"]
        claimed_and_never_renewed(services_of(client), project_id)
        used = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        assert used == pytest.approx(30.0, abs=5.0)
        line = f'orchestrator_project_local_seconds_used{{project="{project_id}"}} '
        [shown] = [row for row in client.get("/metrics").text.splitlines() if row.startswith(line)]
        assert float(shown.removeprefix(line)) == pytest.approx(30.0, abs=5.0)
        refused = client.post(f"/v1/projects/{project_id}/drafts", json={"prompt": "more", **SMALL})
        assert_error(refused, 429, "device_time_exhausted")


def test_a_running_local_attempt_whose_lease_ran_out_counts_only_to_its_last_renewal(
        make_settings: SettingsFactory) -> None:
    """Read while its job is unfinished, an attempt whose lease has run out (its process dead, not
    yet recovered) counts what recovery will keep of it, to its last renewal: claimed 100 s
    before, renewed 30 s after, its 60 s lease out 10 s ago, it holds 30 s whenever it is read."""
    services = Services.build(make_settings(lease_seconds=60))
    try:
        project_id = new_id("prj")
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="dead holder", policy="balanced", local_seconds_per_day=3600))
        job_id = claimed_and_never_renewed(services, project_id, ago=100.0)
        with services.db.transaction() as s:
            row = s.get(Job, job_id)
            assert row is not None and row.lease_taken_at is not None
            renewed = row.lease_taken_at + timedelta(seconds=30)
            s.execute(update(Job).where(col(Job.id) == job_id).values(
                lease_renewed_at=renewed, lease_expires_at=renewed + timedelta(seconds=60)))
        with services.db.session() as s:
            used = services.jobs.device_used(s, [project_id])
            row = s.get(Job, job_id)
        assert used[project_id] == pytest.approx(30.0, abs=0.001)
        assert row is not None
        assert device_time.held_until_lease(row, services.jobs.lease) == pytest.approx(30.0, abs=0.001)
    finally:
        asyncio.run(services.aclose())


class HeldOnDevice(SlowDevice):
    """The engine's progress, told on: its work holds the device until `hold` is set."""

    def __init__(self, told: Progress, hold: threading.Event) -> None:
        super().__init__(told)
        self.hold = hold

    def on_device(self) -> None:
        self.told.on_device()
        assert self.hold.wait(60)  # on the inference thread, as the device's work is


def test_a_running_local_attempt_counts_from_its_work_s_start_on_the_device_not_its_claim(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running attempt on Lite counted from its claim, its model's load included, where its end
    leaves the load out: a draft whose model took 1 s to load read that second in
    `local_seconds_used` while it loaded (and kept counting it while it ran), which its end then
    took out again. Now the runner stamps its work's start on the device, and a reader counts it
    from there: nothing while its model loads."""
    with client_for(make_settings(lease_seconds=60)) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        services = services_of(client)
        release = threading.Event()
        runtime = services.registry.get("lite").runtime  # type: ignore[attr-defined]
        loaded = runtime.text2img

        def held_load(model: str) -> Any:
            assert release.wait(60)
            return loaded(model)

        monkeypatch.setattr(runtime, "text2img", held_load)
        engine = services.registry.get("lite")
        run, hold = engine.run, threading.Event()

        async def held_on_device(request: RenderRequest, progress: Progress, cancel: CancelToken) -> Any:
            return await run(request, HeldOnDevice(progress, hold), cancel)

        monkeypatch.setattr(engine, "run", held_on_device)
        job = submit_draft(client, project_id, steps=2)
        deadline = time.monotonic() + 30
        while wait_row(services, job["id"]).status != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # its model loading meanwhile: what was counted
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"] == 0.0
        release.set()
        while (row := wait_row(services, job["id"])).device_began_at is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        used = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        with services.db.session():
            now = services.db.now()
        assert row.lease_taken_at is not None and row.lease_taken_at + timedelta(seconds=1) <= row.device_began_at
        # From its start on the device to now: the load's second left out.
        assert used <= (now - row.device_began_at).total_seconds() + 0.01
        assert used < (now - row.lease_taken_at).total_seconds() - 0.9
        hold.set()
        assert wait_for_job(client, job["id"])["status"] == "succeeded"


def wait_row(services: Services, job_id: str) -> Job:
    with services.db.session() as s:
        row = s.get(Job, job_id)
    assert row is not None
    return row


def test_a_running_attempt_s_start_on_the_device_is_read_only_with_its_claim_s_stamps() -> None:
    """What a reader counts of a running attempt of an engine that tells its start on the device:
    from there where its claim stamped it (`device_began_at`); nothing while it has not (its model
    loads, or the stamp is an earlier claim's); from its claim where the claim stamped nothing (a
    release without the columns); and, once its lease has run out, from there to its last renewal,
    as recovery counts it. An engine that does not tell counts from its claim."""
    now = utcnow()
    claimed = now - timedelta(seconds=100)
    live: dict[str, Any] = {"attempt": 2, "started_at": claimed, "lease_taken_at": claimed, "lease_taken_attempt": 2,
                            "lease_renewed_at": now - timedelta(seconds=5),
                            "lease_expires_at": now + timedelta(seconds=55)}
    on_device = {**live, "device_began_at": now - timedelta(seconds=40)}

    def held(tells: bool = True, **row: Any) -> float | None:
        job = Job(project_id="prj_x", stage="ideation", engine="lite", **row)
        return device_time.held_so_far(job, timedelta(seconds=60), now, tells=tells)

    assert held(**on_device) == pytest.approx(40.0)
    assert held(**live) == 0.0
    assert held(tells=False, **live) == pytest.approx(100.0)
    # An earlier claim's stamp (a release without the column left it) is none of this one's.
    assert held(**{**on_device, "device_began_at": claimed - timedelta(seconds=1)}) == 0.0
    # Claimed by a release without the claim's stamps: from its start, as before.
    assert held(**{**on_device, "lease_taken_attempt": 1}) == pytest.approx(100.0)
    dead = {**on_device, "lease_renewed_at": now - timedelta(seconds=70),
            "lease_expires_at": now - timedelta(seconds=10)}
    # Its last renewal 30 s after its claim, before its work started on the device (60 s after): 0.
    assert held(**dead) == 0.0
    assert held(**{**dead, "device_began_at": claimed + timedelta(seconds=10)}) == pytest.approx(20.0)
    assert held(**{**live, "lease_renewed_at": now - timedelta(seconds=70),
                   "lease_expires_at": now - timedelta(seconds=10)}) == pytest.approx(30.0)


def test_a_lease_s_renewal_stamps_the_start_on_the_device_the_runner_s_own_write_missed(
        make_settings: SettingsFactory) -> None:
    """The runner stamps an attempt's start on the device as the engine tells it, off the inference
    thread; where that write failed (a database away for a moment), the lease's next renewal
    stamps it, and leaves a stamp there as it is."""
    services = Services.build(make_settings(lease_seconds=60))
    try:
        project_id = new_id("prj")
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="renewals", policy="balanced", local_seconds_per_day=3600))
        body = DraftCreate(prompt="a lighthouse", n=1, width=64, height=64, steps=1)
        job_id = services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="test")[0].id
        [(claim, _lane)] = services.scheduler._claim_ready({})
        assert claim.job.id == job_id and claim.job.engine == "lite"
        # Claimed 10 s ago (its model loading since), on the row as in the claim's own copy.
        assert claim.job.lease_taken_at is not None
        claim.job.lease_taken_at -= timedelta(seconds=10)
        with services.db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == job_id).values(lease_taken_at=claim.job.lease_taken_at))
        services.scheduler._renew([claim])
        assert wait_row(services, job_id).device_began_at is None  # not told yet: its model loads
        claim.device_began = time.monotonic() - 5.0  # told 5 s ago; its own write never landed
        services.scheduler._renew([claim])
        row = wait_row(services, job_id)
        assert row.device_began_at is not None and row.lease_renewed_at is not None
        assert (row.lease_renewed_at - row.device_began_at).total_seconds() == pytest.approx(5.0, abs=0.5)
        stamped = row.device_began_at
        services.scheduler._renew([claim])
        assert wait_row(services, job_id).device_began_at == stamped
    finally:
        asyncio.run(services.aclose())


def test_a_start_on_the_device_stamped_by_a_clock_stepped_back_is_not_taken_for_an_earlier_claim_s(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner stamps an attempt's start on the device by the leases' clock as it writes, less
    the monotonic seconds since it was told; a clock stepped back between the claim and that write
    (here by 2 s, as its model loaded) stamped it before the claim's `lease_taken_at`, which
    a reader takes for an earlier claim's stamp: the live attempt then read 0 for as long as it
    ran, 10 s on the device included. A stamp is never before its own claim's."""
    services = Services.build(make_settings(lease_seconds=60))
    try:
        project_id = new_id("prj")
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="stepped", policy="balanced", local_seconds_per_day=3600))
        body = DraftCreate(prompt="a lighthouse", n=1, width=64, height=64, steps=1)
        job_id = services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="test")[0].id
        [(claim, _lane)] = services.scheduler._claim_ready({})
        assert claim.job.id == job_id and claim.job.engine == "lite"
        real = time.time_ns
        monkeypatch.setattr("orchestrator.clock._host_us", lambda: real() // 1000 - 2_000_000)
        claim.device_began = time.monotonic()  # told now, its model loaded
        services.runner.write_device_start(claim)
        row = wait_row(services, job_id)
        assert row.lease_taken_at is not None and row.device_began_at is not None
        assert row.device_began_at >= row.lease_taken_at
        read = device_time.held_so_far(row, timedelta(seconds=60), row.lease_taken_at + timedelta(seconds=11),
                                       tells=True)
        assert read is not None and read >= 10.0
    finally:
        asyncio.run(services.aclose())


def test_a_local_job_a_stop_queued_again_counts_its_attempt_once_it_ends(make_settings: SettingsFactory) -> None:
    """A draft a stop interrupted part-way is queued again: its attempt's seconds are kept on the
    row, counted while the job waits (they were not, until it ended) and once from its end, here
    canceled while queued."""
    from orchestrator.server import serve_in_thread

    settings = make_settings()
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        job = submit_draft(client, project_id, **{**SLOW, "width": 128, "height": 128})
        running_past(client, job["id"], 3)
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            row = s.get(Job, job["id"])
            assert row is not None and row.status == "queued" and row.finished_at is None
            held = row.device_seconds
        assert held is not None and held > 0, held
    finally:
        db.dispose()
    with client_for(make_settings(run_jobs=False)) as client:
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"] == math.floor(
            held * 1000) / 1000
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        assert wait_for_job(client, job["id"])["status"] == "canceled"
        assert kept_seconds(services_of(client), job["id"]) == held
        assert client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"] == math.floor(
            held * 1000) / 1000


def test_a_local_attempt_that_falls_back_counts_its_engine_s_time_not_the_fallback_s_looks(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local attempt's seconds were measured up to its end's write, not its engine's end: a bridge
    that failed on local-hifi at once, while its fallback's availability took a second to answer (a
    plugin asking its server), was counted that second though the device had been let go."""
    with client_for(with_fallback(make_settings, tmp_path)) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        services = services_of(client)
        [draft] = run_draft(client, project_id, seed=6)["assets"]
        failed = []
        hifi, remote = services.registry.get("local-hifi"), services.registry.get("fake-free")

        async def fail_at_once(*args: Any) -> Any:
            failed.append(time.monotonic())
            raise EngineError("out of memory, say", retryable=True, charged="no")

        available = remote.availability

        def slow_look() -> tuple[bool, str | None]:
            if failed:  # the fallback's look, not routing's: its server answers after a second
                time.sleep(1.0)
            return available()

        monkeypatch.setattr(hifi, "run", fail_at_once)
        monkeypatch.setattr(remote, "availability", slow_look)
        promoted = client.post(f"/v1/assets/{draft}/promote", json={})
        assert promoted.status_code == 202 and promoted.json()["engine"] == "local-hifi", promoted.text
        done = wait_for_job(client, promoted.json()["id"], ("succeeded",))
        assert [a["engine"] for a in done["attempts"]] == ["local-hifi", "fake-free"] and len(failed) == 1
        seconds = kept_seconds(services, done["id"])
        # The engine raised at once: the second its fallback's look took held no device.
        assert seconds is not None and 0 <= seconds < 0.5, seconds


def test_metered_local_work_charges_a_success_s_own_seconds_alone(make_settings: SettingsFactory,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With ORCH_LOCAL_GPU_SECOND_CREDITS set, the quota counts every attempt while the ledger is as
    before: a draft a dead process left (70 s to its last renewal), run again to its success, is
    charged its success's seconds alone, not the 70 s the quota counts too; one canceled at its
    recovery, and one that fails on Lite after its work, are charged nothing."""
    rate = 10.0
    settings = make_settings(lease_seconds=60, local_gpu_second_credits=rate)
    project_id, canceled_id, requeued_id = left_by_a_dead_process(settings)

    with client_for(settings) as client:
        services = services_of(client)
        assert wait_for_job(client, canceled_id)["status"] == "canceled"
        assert wait_for_job(client, requeued_id)["status"] == "succeeded"
        held = kept_seconds(services, requeued_id)
        assert held is not None and held > 70.0
        made: list[float] = []
        wrapped_run(services.registry.get("lite"), monkeypatch, EngineError(
            "the device broke after its work", retryable=False, charged="no"), made)
        failed = submit_draft(client, project_id, steps=2)
        assert wait_for_job(client, failed["id"], ("failed",))["error"]["code"] == "engine_error"
        assert (kept_seconds(services, failed["id"]) or 0.0) >= made[0] > 0
        with services.db.session() as s:
            entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.project_id) == project_id)).all()
        [capture] = [e for e in entries if e.amount]
        assert (capture.job_id, capture.kind, capture.hold_id) == (requeued_id, "capture", None)
        success = held - 70.0  # the rerun's own seconds: what metering charges
        # In millicredits: the sum on the row less 70 s is that float to within a rounding.
        assert abs(capture.amount - success * rate * 1000) <= 1, (capture.amount, capture.note, held)
        assert capture.note == f"{success:.2f} device-seconds" or float((capture.note or "").split()[0]) == (
            pytest.approx(success, abs=0.006)), capture.note
        # The spend report and the project's budget read the same capture, and nothing else.
        budget = client.get(f"/v1/projects/{project_id}/budget").json()
        assert budget["charged"] == round(capture.amount / 1000, 3)
        report = client.get("/v1/spend", params={"group_by": "project", "project_id": project_id}).json()
        assert [g["charged"] for g in report["groups"]] == [budget["charged"]], report


def test_a_job_recovered_again_and_again_and_rows_lacking_times_count_sanely(make_settings: SettingsFactory) -> None:
    """Recovery's count, adversarially: a draft that already holds 50 s of two earlier recoveries
    and is given up at its third adds only this attempt's 70 s (120 s in all, counted once from its
    end); one whose lease is null, or whose start is null, adds nothing; one whose start is after
    its lease's last renewal (its host's clock ahead) adds 0, never a negative count."""
    settings = make_settings(lease_seconds=60)
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.resolved_database_url)
    db.migrate()
    now = utcnow()
    project_id = new_id("prj")
    died: dict[str, Any] = {"engine": "lite", "status": "interrupted",
                            "error": {"code": "interrupted", "message": "its process died", "details": {}}}
    renewed_30s_ago = now - timedelta(seconds=30) + timedelta(seconds=60)
    rows: dict[str, dict[str, Any]] = {
        "given_up": {"started_at": now - timedelta(seconds=100), "lease_expires_at": renewed_30s_ago,
                     "device_seconds": 50.0, "attempts": [died, died], "attempt": 3},
        "no_lease": {"started_at": now - timedelta(seconds=100), "lease_expires_at": None},
        "no_start": {"started_at": None, "lease_expires_at": renewed_30s_ago},
        "ahead": {"started_at": now + timedelta(seconds=600), "lease_expires_at": renewed_30s_ago},
    }
    ids = {name: new_id("job") for name in rows}
    params = {"stage": "ideation", "prompt": "a lighthouse", "negative_prompt": "", "n": 1, "seed": 5,
              "width": 64, "height": 64, "steps": 2, "tags": {}}
    with db.transaction() as s:
        s.add(Project(id=project_id, name="crashing", policy="balanced", local_seconds_per_day=3600))
        s.flush()
        for name, row in rows.items():
            # Canceled at recovery (asked while the worker lived), so none runs again and adds its own.
            s.add(Job(id=ids[name], project_id=project_id, stage="ideation", engine="lite", model=tiny.NAME,
                      params=params, status="running", lease_owner="dead-host:1:0",
                      cancel_requested_at=None if name == "given_up" else now,
                      **{"attempt": 1, **row}))
    db.dispose()

    with client_for(settings) as client:
        services = services_of(client)
        done = {name: wait_for_job(client, job_id, ("failed", "canceled")) for name, job_id in ids.items()}
        assert done["given_up"]["status"] == "failed" and done["given_up"]["error"]["code"] == "interrupted"
        assert kept_seconds(services, ids["given_up"]) == pytest.approx(120.0, abs=0.001)
        assert kept_seconds(services, ids["no_lease"]) is None
        assert kept_seconds(services, ids["no_start"]) is None
        assert kept_seconds(services, ids["ahead"]) == 0.0
        used = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        assert used == pytest.approx(120.0, abs=0.001)


def test_cancels_racing_local_ends_count_each_attempt_once(make_settings: SettingsFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancels asked at every moment of a local draft's life (queued, as it starts, mid-steps, as it
    ends, after it ended), some of the drafts failing on Lite as they end: each job's seconds are at
    most its row's own start-to-end time (an attempt counted by two writers would be about twice
    that), and the project shows their sum."""
    with client_for(make_settings()) as client:
        project_id = create_project(client, local_seconds_per_day=3600)["id"]
        services = services_of(client)
        engine = services.registry.get("lite")
        run = engine.run
        ran = 0

        async def sometimes_failing(*args: Any) -> Any:
            nonlocal ran
            ran += 1
            result = await run(*args)
            if ran % 2:
                raise EngineError("the device broke as it ended", retryable=False, charged="no")
            return result

        monkeypatch.setattr(engine, "run", sometimes_failing)
        ids = []
        for wait in (0, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.2, 2.0):
            job_id = submit_draft(client, project_id, width=64, height=64, steps=4)["id"]
            time.sleep(wait)  # when the cancel is asked, not a wait for a state
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202, 409)
            ids.append(job_id)
        for job_id in ids:
            wait_for_job(client, job_id, ("canceled", "failed", "succeeded"))
        for _ in range(2):  # run to their ends (one fails, one succeeds), then asked to cancel
            job_id = submit_draft(client, project_id, width=64, height=64, steps=2)["id"]
            wait_for_job(client, job_id, ("failed", "succeeded"))
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
            ids.append(job_id)
        total = 0.0
        with services.db.session() as s:
            for job_id in ids:
                job = s.get(Job, job_id)
                assert job is not None and job.finished_at is not None
                if job.device_seconds is None:
                    continue
                assert job.started_at is not None, job
                wall = (job.finished_at - job.started_at).total_seconds()
                assert 0 <= job.device_seconds <= wall + 0.05, (job.status, job.device_seconds, wall)
                total += job.device_seconds
            assert [e.amount for e in s.exec(select(LedgerEntry)).all() if e.amount] == []
            assert {s.get(Job, job_id).status for job_id in ids[-2:]} == {"failed", "succeeded"}  # type: ignore[union-attr]
        shown = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        assert shown == pytest.approx(total, abs=0.002)
