"""A project moved to `local-only` sends nothing more off the machine: not even the jobs queued
under its earlier policy, which kept the routing they were given."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from orchestrator.policy_versions import PolicyVersions
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from policies import PolicyStore, Seen
from policies.loader import content_hash
from tests import fakes
from tests.credits import DRAFT, ledger, poll, project_with_draft, promote_ok, wait_for_job
from tests.credits.conftest import POLICY, POLICY_TOML


def test_moving_to_local_only_cancels_queued_cloud_jobs_and_keeps_the_others_local(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serve_in_thread(paid_settings_for(data)) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
    prompt = "a lighthouse, queued before the project went local-only"
    # Another process's API (no jobs run here): the jobs stay queued.
    with serve_in_thread(paid_settings_for(data, run_jobs=False)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        cloud = promote_ok(client, asset_id, prompt=prompt)
        assert cloud["engine"] == "fake-paid" and cloud["status"] == "queued"
        local = client.post(f"/v1/projects/{project_id}/drafts", json=DRAFT).json()
        assert local["engine"] == "lite" and local["status"] == "queued"
        moved = client.patch(f"/v1/projects/{project_id}", json={"policy": "local-only"})
        assert moved.status_code == 200 and moved.json()["policy"] == "local-only"
        canceled = client.get(f"/v1/jobs/{cloud['id']}").json()
        assert canceled["status"] == "canceled"
        assert "policy 'local-only' keeps its work on this machine" in canceled["error"]["message"]
        assert [e["kind"] for e in ledger(client, project_id) if e["job_id"] == cloud["id"]] == ["hold", "release"]
        kept = client.get(f"/v1/jobs/{local['id']}").json()
        assert kept["status"] == "queued" and kept["params"]["tags"]["privacy"] == "local"
    with serve_in_thread(paid_settings_for(data)) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert wait_for_job(client, local["id"])["status"] == "succeeded"
    assert prompt not in " ".join(fakes.SENT)


def test_a_job_made_private_in_the_queue_never_falls_back_off_the_machine(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued on local-hifi with the cloud as its fallback, then its project went local-only: its
    local engine failing, the fallback took it to the cloud all the same."""
    from orchestrator.errors import EngineError
    from tiers.local_hifi import LocalHifiEngine

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "credits-test.toml").write_text(POLICY_TOML)
    (policies / "hifi-first.toml").write_text(
        'name = "hifi-first"\n[[rules]]\nname = "drafts"\nmatch = { stage = "ideation" }\nengines = ["lite"]\n'
        '[[rules]]\nname = "bridge"\nmatch = { stage = ["bridge", "polish"] }\n'
        'engines = ["local-hifi", "fake-paid"]\n')
    data = tmp_path / "data"
    with serve_in_thread(paid_settings_for(data, policy_dir=policies)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        assert client.patch(f"/v1/projects/{project_id}", json={"policy": "hifi-first"}).status_code == 200
    prompt = "a lighthouse, its local engine failing after the project went local-only"
    with serve_in_thread(paid_settings_for(data, policy_dir=policies, run_jobs=False)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        job = promote_ok(client, asset_id, prompt=prompt, engine=None)
        assert job["engine"] == "local-hifi", job["routing"]
        assert "fake-paid" in [c["engine"] for c in job["routing"]["candidates"]]
        assert client.patch(f"/v1/projects/{project_id}", json={"policy": "local-only"}).status_code == 200

    async def failing(self: LocalHifiEngine, *args: object, **kwargs: object) -> None:
        raise EngineError("local-hifi: out of memory, try again", retryable=True, charged="no")

    monkeypatch.setattr(LocalHifiEngine, "run", failing)
    with serve_in_thread(paid_settings_for(data, policy_dir=policies)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"])
    assert (done["status"], done["engine"]) == ("failed", "local-hifi"), done
    assert prompt not in " ".join(fakes.SENT)


HIFI_FIRST = ('name = "hifi-first"\n[[rules]]\nname = "drafts"\nmatch = { stage = "ideation" }\nengines = ["lite"]\n'
              '[[rules]]\nname = "bridge"\nmatch = { stage = ["bridge", "polish"] }\n'
              'engines = ["local-hifi", "fake-paid"]\n')


TWO_CLOUDS = ('name = "two-clouds"\n[[rules]]\nname = "drafts"\nmatch = { stage = "ideation" }\nengines = ["lite"]\n'
              '[[rules]]\nname = "bridge"\nmatch = { stage = ["bridge", "polish"] }\n'
              'engines = ["fake-paid", "fake-zero"]\n')


@pytest.mark.parametrize(("policy", "toml", "engine", "charged"), [
    # Only queued jobs were made private, and the fallback read the row it was claimed with.
    ("hifi-first", HIFI_FIRST, "local-hifi", []),
    # Only jobs on engines that stay on the machine were made private: a running cloud job whose
    # call made nothing moved on to the next cloud engine, which got the prompt after the switch.
    ("two-clouds", TWO_CLOUDS, "fake-paid", ["hold", "release"]),
], ids=["local", "cloud"])
def test_a_job_running_as_its_project_goes_local_only_never_falls_back_off_the_machine(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str,
        toml: str, engine: str, charged: list[str]) -> None:
    from orchestrator.errors import EngineError
    from tiers.local_hifi import LocalHifiEngine

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "credits-test.toml").write_text(POLICY_TOML)
    (policies / f"{policy}.toml").write_text(toml)
    started, moved = threading.Event(), threading.Event()
    engine_class: Any = LocalHifiEngine if engine == "local-hifi" else fakes.FakePaidEngine
    real = engine_class.run

    async def failing_once_moved(self: Any, *args: Any) -> Any:
        if self.name != engine:  # the fallbacks
            return await real(self, *args)
        started.set()
        await asyncio.to_thread(moved.wait, 30)
        raise EngineError(f"{engine}: connection refused, nothing made", retryable=True, charged="no")

    monkeypatch.setattr(engine_class, "run", failing_once_moved)
    prompt = f"a lighthouse, running on {engine} as its project went local-only"
    with serve_in_thread(paid_settings_for(tmp_path / "data", policy_dir=policies)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        assert client.patch(f"/v1/projects/{project_id}", json={"policy": policy}).status_code == 200
        job = promote_ok(client, asset_id, prompt=prompt, engine=None)
        assert job["engine"] == engine and started.wait(30)
        assert any(c["engine"].startswith("fake") for c in job["routing"]["candidates"][1:])  # a cloud fallback
        assert client.patch(f"/v1/projects/{project_id}", json={"policy": "local-only"}).status_code == 200
        moved.set()
        done = wait_for_job(client, job["id"])
        entries = [e["kind"] for e in ledger(client, project_id) if e["job_id"] == job["id"]]
    assert (done["status"], done["engine"], done["params"]["tags"]) == ("failed", engine, {"privacy": "local"}), done
    assert entries == charged
    assert prompt not in " ".join(fakes.SENT)


def test_a_job_that_ended_meanwhile_does_not_stop_the_move(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One queued job canceled by its user between the look and the cancel: the PATCH answered 409
    with the policy changed, and the other queued cloud jobs were left to go out."""
    from orchestrator.errors import JobFinished
    from orchestrator.jobs import JobService

    data = tmp_path / "data"
    with serve_in_thread(paid_settings_for(data)) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
    with serve_in_thread(paid_settings_for(data, run_jobs=False)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        first, second = (promote_ok(client, asset_id, seed=seed)["id"] for seed in (1, 2))
        real = JobService.cancel_queued

        def canceled_by_its_user_first(self: JobService, job_id: str, **kwargs: str) -> bool:
            if job_id == first:
                real(self, job_id)
                raise JobFinished(f"job '{job_id}' already canceled")
            return real(self, job_id, **kwargs)

        monkeypatch.setattr(JobService, "cancel_queued", canceled_by_its_user_first)
        moved = client.patch(f"/v1/projects/{project_id}", json={"policy": "local-only"})
        assert moved.status_code == 200, moved.text
        assert client.get(f"/v1/jobs/{second}").json()["status"] == "canceled"


def test_a_request_routed_as_the_project_goes_local_only_is_routed_again(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Routed under the old policy, committed after the PATCH (which no lock orders it with): the job
    was queued for the cloud, after keep_local had looked."""
    from sqlalchemy import update
    from sqlmodel import col

    from orchestrator.jobs import JobService
    from orchestrator.models import Project

    with serve_in_thread(paid_settings_for(tmp_path / "data")) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        real = JobService._reserve

        def moved_meanwhile(self: JobService, *args: object, **kwargs: object) -> object:
            decision = real(self, *args, **kwargs)  # type: ignore[arg-type]
            with self.db.transaction() as s:  # the PATCH, between the routing and the commit
                s.execute(update(Project).where(col(Project.id) == project_id).values(policy="local-only"))
            return decision

        monkeypatch.setattr(JobService, "_reserve", moved_meanwhile)
        job = promote_ok(client, asset_id, engine=None)
    assert job["engine"] == "local-hifi" and job["routing"]["policy"] == "local-only", job["routing"]


def test_a_cloud_job_that_had_sent_nothing_as_its_project_goes_local_only_is_canceled_before_it_sends(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """Claimed, still preparing its request (its first send not yet asked) as the PATCH commits:
    it sent the prompt all the same."""
    until = tmp_path / "go"
    prompt = "a lighthouse, prepared as its project went local-only"
    with serve_in_thread(paid_settings_for(tmp_path / "data")) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, prompt=prompt, tags={"fake": "wait-before-send", "until": str(until)})
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), lambda j: j["status"] == "running")
        moved = client.patch(f"/v1/projects/{project_id}", json={"policy": "local-only"})
        assert moved.status_code == 200, moved.text
        until.write_text("go")
        done = wait_for_job(client, job["id"])
        entries = [e["kind"] for e in ledger(client, project_id) if e["job_id"] == job["id"]]
    assert done["status"] == "canceled", done
    assert "keeps its work on this machine" in done["error"]["message"]
    assert entries == ["hold", "release"]
    assert prompt not in " ".join(fakes.SENT)


def test_a_cloud_job_queued_again_after_a_stop_is_canceled_when_its_project_went_local_only(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """Running but unsent when the project moved and the service stopped: queued again on its cloud
    engine (keep_local had looked for queued jobs before), the next start sent it."""
    data, until = tmp_path / "data", tmp_path / "go"
    prompt = "a lighthouse, queued again after the project went local-only"
    with serve_in_thread(paid_settings_for(data)) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, prompt=prompt, tags={"fake": "wait-before-send", "until": str(until)})
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), lambda j: j["status"] == "running")
        assert client.patch(f"/v1/projects/{project_id}", json={"policy": "local-only"}).status_code == 200
    until.write_text("go")
    with serve_in_thread(paid_settings_for(data)) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"])
        entries = [e["kind"] for e in ledger(client, project_id) if e["job_id"] == job["id"]]
    # Canceled by the start's look at the local-only projects (before any claim), or by its claim.
    assert [(a["engine"], a["status"]) for a in done["attempts"]] in ([("fake-paid", "interrupted")], [
        ("fake-paid", "interrupted"), ("fake-paid", "canceled")])
    assert done["status"] == "canceled" and "keeps its work on this machine" in done["error"]["message"], done
    assert entries == ["hold", "release"]
    assert prompt not in " ".join(fakes.SENT)



def test_a_database_error_reading_a_job_s_privacy_before_it_is_sent_fails_it_with_nothing_charged(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the engine's crash ('failed unexpectedly', charged 'unknown' for an engine that does not
    announce its sends, as a self-hosted server's), and nothing was sent."""
    from sqlalchemy.exc import OperationalError

    from orchestrator.runner import JobRunner

    def unreadable(*args: object) -> None:
        raise OperationalError("SELECT jobs.params", {}, Exception("database is locked"))

    monkeypatch.setattr(JobRunner, "_refuse_if_kept_local", unreadable)
    monkeypatch.setattr(fakes.FakeServerEngine, "announces_sends", False)  # as ComfyUI's and A1111's
    prompt = "a lighthouse, its privacy unreadable"
    with serve_in_thread(paid_settings_for(tmp_path / "data")) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        _, asset_id = project_with_draft(client)
        done = wait_for_job(client, promote_ok(client, asset_id, prompt=prompt, engine="fake-free")["id"])
    assert done["status"] == "failed" and "could not be read before its request was sent" in done["error"]["message"]
    assert done["error"]["details"].get("charged", "no") == "no", done["error"]
    assert prompt not in " ".join(fakes.SENT)


def test_a_job_resumed_on_a_self_hosted_server_after_its_project_went_local_only_is_canceled(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crashed on a server that keeps finished work (ComfyUI), its project moved meanwhile: the
    resume sent the source image and the images still to make to the server again."""
    from orchestrator.clock import utcnow
    from orchestrator.db import Database
    from orchestrator.ids import new_id
    from orchestrator.models import Job, Project

    settings = paid_settings_for(tmp_path / "data", engines="fake-free=tests.fakes:resuming_factory")
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.resolved_database_url)
    db.migrate()
    project_id, job_id = new_id("prj"), new_id("job")
    prompt = "a lighthouse, resumed after its project went local-only"
    params = {"stage": "bridge", "prompt": prompt, "negative_prompt": "", "n": 1, "seed": 5, "width": 64,
              "height": 64, "tags": {"privacy": "local"}}  # as keep_local left it
    with db.transaction() as s:
        s.add(Project(id=project_id, name="self-hosted", policy="local-only"))
        s.flush()
        s.add(Job(id=job_id, project_id=project_id, stage="bridge", engine="fake-free", model="fake-1", params=params,
                  estimated=0, provider_request_id="fake-1",
                  provider_work={"engine": "fake-free", "handles": [{"id": "fake-1"}]},
                  status="running", attempt=1, lease_owner="dead-host:1:0", started_at=utcnow()))
    db.dispose()
    fakes.RESUMED.clear()
    monkeypatch.setattr(fakes.FakeServerEngine, "announces_sends", False)  # as ComfyUI's
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job_id)
    assert done["status"] == "canceled" and "keeps its work on this machine" in done["error"]["message"], done
    assert fakes.RESUMED == [] and prompt not in " ".join(fakes.SENT)


# The test policy with every rule private: it keeps everything on this machine.
PRIVATE_POLICY_TOML = POLICY_TOML.replace("engines = [", "private = true\nengines = [")


def own_policy_and_draft(paid_settings_for: Callable[..., Settings], tmp_path: Path) -> tuple[Path, Path, str, str]:
    """A policy folder of the test's own (the test policy, to be edited), a data dir, and a project
    with a draft made there: (folder, data dir, project id, asset id)."""
    folder, data = tmp_path / "policies", tmp_path / "data"
    folder.mkdir()
    (folder / f"{POLICY}.toml").write_text(POLICY_TOML)
    with serve_in_thread(paid_settings_for(data, policy_dir=folder)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
    return folder, data, project_id, asset_id


def test_a_reload_that_makes_the_project_s_policy_keep_everything_local_cancels_its_queued_cloud_jobs(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """The README's promise for a policy change that keeps everything on the machine held for a
    project moved to such a policy, but not for an edit of the policy it was on: reloaded, its
    queued cloud job was sent all the same."""
    folder, data, project_id, asset_id = own_policy_and_draft(paid_settings_for, tmp_path)
    prompt = "a lighthouse, queued before its policy went private"
    with serve_in_thread(paid_settings_for(data, policy_dir=folder, run_jobs=False)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        cloud = promote_ok(client, asset_id, prompt=prompt)
        assert cloud["engine"] == "fake-paid" and cloud["status"] == "queued"
        (folder / f"{POLICY}.toml").write_text(PRIVATE_POLICY_TOML)
        reloaded = client.post("/v1/policies/reload").json()
        assert reloaded["errors"] == [] and client.get(f"/v1/policies/{POLICY}").json()["rules"][-1]["private"]
        canceled = client.get(f"/v1/jobs/{cloud['id']}").json()
        assert canceled["status"] == "canceled", canceled
        assert f"policy '{POLICY}' keeps its work on this machine" in canceled["error"]["message"]
        assert [e["kind"] for e in ledger(client, project_id) if e["job_id"] == cloud["id"]] == ["hold", "release"]
    assert prompt not in " ".join(fakes.SENT)


def test_a_submit_routed_before_such_a_reload_and_committed_after_it_is_routed_again(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Routed by the old rules, then the reload (its keep_local found nothing queued yet), then the
    commit: the job was queued for the cloud, never marked private, and sent its prompt out."""
    from orchestrator.jobs import JobService

    folder, data, _project_id, asset_id = own_policy_and_draft(paid_settings_for, tmp_path)
    reserve = JobService._reserve
    reloaded: list[list[str]] = []

    def reload_between(self: JobService, *args: Any, **kwargs: Any) -> Any:
        decision = reserve(self, *args, **kwargs)
        if decision.chosen == "fake-paid" and not reloaded:
            (folder / f"{POLICY}.toml").write_text(PRIVATE_POLICY_TOML)
            with httpx.Client(base_url=base, timeout=30) as other:
                reloaded.append(other.post("/v1/policies/reload").json()["errors"])
        return decision

    monkeypatch.setattr(JobService, "_reserve", reload_between)
    with serve_in_thread(paid_settings_for(data, policy_dir=folder, run_jobs=False)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        answer = client.post(f"/v1/assets/{asset_id}/promote", json={"prompt": "routed before the reload"})
        assert reloaded == [[]]
        queued = [job for job in client.get("/v1/jobs", params={"stage": "bridge"}).json()["items"]
                  if job["status"] == "queued"]
        # Routed again by the private rules: none of whose engines keeps it here, so refused.
        assert answer.status_code >= 400 and queued == [], (answer.text, queued)


def test_a_policy_made_local_while_no_service_ran_is_applied_at_the_next_start(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """Edited during a stop (or a restart before the watcher's look), the policy was loaded as it
    is at start, so nothing had "turned" local: the queued cloud job ran and sent its prompt out."""
    folder, data, project_id, asset_id = own_policy_and_draft(paid_settings_for, tmp_path)
    prompt = "a lighthouse, queued before a restart that made its policy private"
    with serve_in_thread(paid_settings_for(data, policy_dir=folder, run_jobs=False)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        cloud = promote_ok(client, asset_id, prompt=prompt)
        assert cloud["engine"] == "fake-paid" and cloud["status"] == "queued"
    (folder / f"{POLICY}.toml").write_text(PRIVATE_POLICY_TOML)
    with serve_in_thread(paid_settings_for(data, policy_dir=folder)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, cloud["id"])
        assert done["status"] == "canceled", done
        assert f"policy '{POLICY}' keeps its work on this machine" in done["error"]["message"]
        assert [e["kind"] for e in ledger(client, project_id) if e["job_id"] == cloud["id"]] == ["hold", "release"]
    assert prompt not in " ".join(fakes.SENT)


@pytest.mark.parametrize("how", ["moved", "reloaded"])
def test_a_cloud_job_whose_project_went_local_is_not_sent_when_its_jobs_were_never_marked(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The move (or the reload) commits first, and its jobs are marked private in a transaction of
    their own: an API process that died in between, or a busy database there, left the queued
    cloud job unmarked, and the next worker sent it."""
    from orchestrator.jobs import JobService

    folder, data, project_id, asset_id = own_policy_and_draft(paid_settings_for, tmp_path)
    prompt = f"a lighthouse, queued as its project's policy went local ({how})"
    unmarked = monkeypatch.context()
    with unmarked as patch:
        patch.setattr(JobService, "keep_local", lambda self, project_id, policy: [])
        with serve_in_thread(paid_settings_for(data, policy_dir=folder, run_jobs=False)) as base, \
                httpx.Client(base_url=base, timeout=30) as client:
            cloud = promote_ok(client, asset_id, prompt=prompt)
            if how == "moved":
                moved = client.patch(f"/v1/projects/{project_id}", json={"policy": "local-only"})
                assert moved.status_code == 200, moved.text
            else:
                (folder / f"{POLICY}.toml").write_text(PRIVATE_POLICY_TOML)
                assert client.post("/v1/policies/reload").json()["errors"] == []
            still = client.get(f"/v1/jobs/{cloud['id']}").json()
            assert still["status"] == "queued" and "privacy" not in still["params"]["tags"]
    # A start applies the local policies to their projects' jobs: this one's look finds nothing,
    # as the API's did, and the job's claim must read the project's policy itself.
    monkeypatch.setattr(JobService, "keep_local", lambda self, project_id, policy: [])
    with serve_in_thread(paid_settings_for(data, policy_dir=folder)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, cloud["id"])
        entries = [e["kind"] for e in ledger(client, project_id) if e["job_id"] == cloud["id"]]
    assert done["status"] == "canceled" and "keeps its work on this machine" in done["error"]["message"], done
    assert entries == ["hold", "release"]
    assert prompt not in " ".join(fakes.SENT)


STUDIO_CLOUD = """
name = "studio"
description = "Drafts here, the rest on the paid engine."

[[rules]]
name = "drafts"
match = { stage = "ideation" }
engines = ["lite"]

[[rules]]
name = "paid"
match = { stage = ["bridge", "polish"] }
engines = ["fake-paid"]
"""

STUDIO_LOCAL = """
name = "studio"
description = "Everything here, for a while."

[[rules]]
name = "drafts"
match = { stage = "ideation" }
engines = ["lite"]
private = true

[[rules]]
name = "local"
match = { stage = ["bridge", "polish"] }
engines = ["local-hifi"]
private = true
"""


def test_a_job_routed_after_a_policy_was_loosened_is_not_refused_by_a_worker_still_on_the_local_version(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    # The API server reloaded the loosened file; the process running jobs had not looked yet (it
    # does within two poll intervals), and canceled the cloud job as its policy kept work local.
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "studio.toml").write_text(STUDIO_CLOUD)
    data = tmp_path / "data"
    runs = paid_settings_for(data, policy="studio", policy_dir=policies, poll_interval=60)
    routes = paid_settings_for(data, policy="studio", policy_dir=policies, run_jobs=False)
    with serve_in_thread(runs) as run_base, httpx.Client(base_url=run_base, timeout=30) as runner, \
            serve_in_thread(routes) as api_base, httpx.Client(base_url=api_base, timeout=30) as api:
        project_id, asset_id = project_with_draft(runner)
        (policies / "studio.toml").write_text(STUDIO_LOCAL)
        for process in (api, runner):
            assert process.post("/v1/policies/reload").json()["errors"] == []
        (policies / "studio.toml").write_text(STUDIO_CLOUD)
        assert api.post("/v1/policies/reload").json()["errors"] == []  # this process only
        response = api.post(f"/v1/assets/{asset_id}/promote", json={"cache": False})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["engine"] == "fake-paid", job
        done = wait_for_job(runner, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert [e["kind"] for e in ledger(runner, project_id) if e["job_id"] == job["id"]] == ["hold", "capture"]


def test_a_job_routed_by_another_version_is_judged_by_the_file_as_it_reads_now(tmp_path: Path) -> None:
    from orchestrator.services import _keeps_all_local
    from policies.loader import PolicyStore

    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    store = PolicyStore(tmp_path, include_builtins=False)
    loaded = content_hash(STUDIO_LOCAL.encode())
    cloud = content_hash(STUDIO_CLOUD.encode())
    assert _keeps_all_local(store, "studio", loaded) and _keeps_all_local(store, "studio", None)
    # Routed before the policy was made local (the file still says local): refused.
    assert _keeps_all_local(store, "studio", cloud)
    file.write_text(STUDIO_CLOUD)  # loosened since this process loaded it, routed by the new version
    assert not _keeps_all_local(store, "studio", cloud)
    file.write_text(STUDIO_CLOUD.replace("[[rules]]", "[[rules", 1))  # a typo: nothing to judge by
    assert _keeps_all_local(store, "studio", cloud)
    assert _keeps_all_local(store, "nowhere", cloud) is False


def test_a_worker_that_missed_an_edit_making_a_policy_private_sends_nothing_off_the_machine(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    # The API server read the private edit; the worker had not looked yet (poll_interval 60) when
    # the file was saved again with a typo. The worker kept the cloud version and routed to it.
    policies = tmp_path / "policies"
    policies.mkdir()
    file = policies / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    data = tmp_path / "data"
    runs = paid_settings_for(data, policy="studio", policy_dir=policies, poll_interval=60)
    routes = paid_settings_for(data, policy="studio", policy_dir=policies, run_jobs=False, poll_interval=60)
    with serve_in_thread(runs) as run_base, httpx.Client(base_url=run_base, timeout=30) as runner, \
            serve_in_thread(routes) as api_base, httpx.Client(base_url=api_base, timeout=30) as api:
        _, asset_id = project_with_draft(runner)
        time.sleep(0.05)  # past the file clock's tick: the edits are told apart by their change time
        file.write_text(STUDIO_LOCAL)
        assert api.post("/v1/policies/reload").json()["errors"] == []  # this process only
        time.sleep(0.05)
        file.write_text(STUDIO_CLOUD.replace("[[rules]]", "[[rules", 1))  # saved with a typo
        assert runner.post("/v1/policies/reload").json()["errors"] != []
        assert runner.get("/v1/policies/studio").json()["content_hash"] == content_hash(STUDIO_LOCAL.encode())
        response = runner.post(f"/v1/assets/{asset_id}/promote", json={"cache": False})
        assert response.status_code == 202, response.text
        job = wait_for_job(runner, response.json()["id"])
        assert job["engine"] == "local-hifi" and job["status"] == "succeeded", job


def test_a_worker_that_found_a_policy_file_refused_while_the_database_was_away_serves_the_edit_once_it_is_back(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Neither process could tell the database what it read: each served its own version, the
    # worker the cloud one, and nothing looked again until the next edit of the file.
    policies = tmp_path / "policies"
    policies.mkdir()
    file = policies / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    data = tmp_path / "data"
    away = threading.Event()
    remember = PolicyVersions.remember

    def blinking(self: PolicyVersions, seen: Sequence[Seen]) -> None:
        if away.is_set():
            raise OperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))
        remember(self, seen)

    monkeypatch.setattr(PolicyVersions, "remember", blinking)
    # The worker must never read the good edit itself: its watcher, looking every 0.1 s, could
    # load it while the API process reloads (a slow machine), and serve it before the database is back.
    stores: list[PolicyStore] = []
    made, fingerprint = PolicyStore.__init__, PolicyStore.fingerprint
    blind = threading.Event()

    def making(self: PolicyStore, *args: Any, **kwargs: Any) -> None:
        stores.append(self)
        made(self, *args, **kwargs)

    def looking(self: PolicyStore) -> object:
        return self.loaded_fingerprint if blind.is_set() and self is stores[0] else fingerprint(self)

    monkeypatch.setattr(PolicyStore, "__init__", making)
    monkeypatch.setattr(PolicyStore, "fingerprint", looking)
    runs = paid_settings_for(data, policy="studio", policy_dir=policies, poll_interval=0.1)
    routes = paid_settings_for(data, policy="studio", policy_dir=policies, run_jobs=False, poll_interval=0.1)
    with serve_in_thread(runs) as run_base, httpx.Client(base_url=run_base, timeout=30) as runner, \
            serve_in_thread(routes) as api_base, httpx.Client(base_url=api_base, timeout=30) as api:
        assert len(stores) == 2  # the worker's first
        _, asset_id = project_with_draft(runner)
        away.set()
        blind.set()
        file.write_text(STUDIO_LOCAL)
        assert api.post("/v1/policies/reload").json()["errors"] == []
        file.write_text(STUDIO_CLOUD.replace("[[rules]]", "[[rules", 1))
        blind.clear()
        assert runner.post("/v1/policies/reload").json()["errors"] != []
        assert runner.get("/v1/policies/studio").json()["content_hash"] == content_hash(STUDIO_CLOUD.encode())
        with caplog.at_level(logging.WARNING, logger="orchestrator.services"):
            away.clear()
            poll(lambda: runner.get("/v1/policies/studio").json()["content_hash"],
                 lambda served: served == content_hash(STUDIO_LOCAL.encode()), timeout=10, what="the policy served")
        assert "read by another process, now serves" in caplog.text
        response = runner.post(f"/v1/assets/{asset_id}/promote", json={"cache": False})
        assert response.status_code == 202, response.text
        job = wait_for_job(runner, response.json()["id"])
        assert job["engine"] == "local-hifi" and job["status"] == "succeeded", job
