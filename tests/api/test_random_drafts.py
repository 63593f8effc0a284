"""Drafts under a mix of sizes, batch sizes, steps and cancels at any moment: seeded random runs.

The targeted tests cancel a job at one chosen point (queued, denoising, storing). Here many drafts
of the tiny model are submitted at once and a third are canceled at random delays after their
submit, their start or their last step, which land wherever a busy machine's timing puts them:
before the claim, between steps, in the final decode, while the images are stored (slowed here as
a busy disk's fsync, `store_delay`), or too late. Whatever the order, what a client and the store
see must agree: each job ends once, as its event stream says; a finished job has all its images
and a canceled one none; every image is whole, carries the record of its variation, and is a file
of the store; and the store keeps no file no asset names, nor a temporary one, nor a preview of a
finished job.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator import identity
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore, Put, read_record
from tests.api import TERMINAL, create_project, iter_sse, read_events, wait_for_job
from tests.conftest import SettingsFactory, random_runs

JOBS_PER_RUN = 16
RUNS = 2  # unless TEST_RANDOM_RUNS says
SEEDS = tuple(range(1, random_runs(RUNS) + 1))


# What a planned cancel is timed from: the submit's answer (it lands while queued, mostly), the
# job's `started` event (while it denoises), or its last step's `progress` (while the last
# latents are decoded, or the images stored).
MOMENTS = ("submit", "started", "last step")


@dataclass
class Draft:
    body: dict[str, Any]
    delay: float  # before the submit
    cancel_at: str | None  # one of MOMENTS: from when `cancel_after` counts
    cancel_after: float
    job_id: str | None = None
    canceled: list[int] = field(default_factory=list)  # the cancel's status code, when one was sent


def store_delay(seed: int) -> float:
    """Seconds each image's store takes beyond its write, as a slow or busy disk's fsync: a cancel
    timed from the last step then often lands while the job's images are stored (at these sizes
    storing takes milliseconds), where a job canceled must remove the files it wrote."""
    return random.Random(f"store {seed}").uniform(0.02, 0.1)


def plan(seed: int) -> list[Draft]:
    rng = random.Random(seed)
    drafts = []
    for k in range(JOBS_PER_RUN):
        size = rng.choice((64, 64, 96))
        body = {"prompt": f"random drafts {seed} job {k}", "n": rng.randint(1, 4), "steps": rng.randint(1, 4),
                "width": size, "height": rng.choice((64, size)), "seed": rng.randrange(2**32)}
        moment = rng.choice(MOMENTS) if rng.random() < 0.35 else None
        drafts.append(Draft(body, delay=rng.uniform(0, 0.2), cancel_at=moment,
                            cancel_after=rng.uniform(0, 0.4 if moment == "submit" else 0.15)))
    return drafts


def wait_for_moment(client: httpx.Client, draft: Draft) -> None:
    """Until the draft's job reaches its cancel's moment (or has ended)."""
    assert draft.job_id is not None
    if draft.cancel_at == "submit":
        return
    with client.stream("GET", f"/v1/jobs/{draft.job_id}/events") as response:
        for event in iter_sse(response):
            if event.event in TERMINAL:
                return
            if draft.cancel_at == "started" and event.event == "started":
                return
            if (draft.cancel_at == "last step" and event.event == "progress"
                    and event.data["step"] == event.data["total"]):
                return


def carry_out(base_url: str, project_id: str, draft: Draft) -> None:
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        time.sleep(draft.delay)
        answer = client.post(f"/v1/projects/{project_id}/drafts", json=draft.body)
        assert answer.status_code == 202, answer.text
        draft.job_id = answer.json()["id"]
        if draft.cancel_at is not None:
            wait_for_moment(client, draft)
            time.sleep(draft.cancel_after)
            draft.canceled.append(client.post(f"/v1/jobs/{draft.job_id}/cancel").status_code)


def store_files(data_dir: Path) -> tuple[set[str], list[Path]]:
    """The sha256 of every image file in the store, and whatever else lies in its folders (but the
    file naming the store, `orchestrator.identity`)."""
    images, other = set(), []
    for path in (data_dir / "assets").rglob("*"):
        if path.is_file() and path != data_dir / "assets" / identity.MARKER:
            if path.suffix == ".png" and len(path.stem) == 64:
                images.add(path.stem)
            else:
                other.append(path)
    return images, other


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_mix_of_drafts_and_cancels_leaves_jobs_events_and_store_agreeing(
        seed: int, make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_put, delay = ArtifactStore.put_file, store_delay(seed)

    def slow_put(store: ArtifactStore, data: bytes) -> Put:
        put = real_put(store, data)
        time.sleep(delay)
        return put

    monkeypatch.setattr(ArtifactStore, "put_file", slow_put)
    settings: Settings = make_settings()
    client = start_server(settings)
    project_id = create_project(client)["id"]
    drafts = plan(seed)

    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(carry_out, str(client.base_url), project_id, d) for d in drafts]:
            future.result()

    named: set[str] = set()
    outcomes = []
    for draft in drafts:
        assert draft.job_id is not None
        assert all(code in (202, 409) for code in draft.canceled), draft
        job = wait_for_job(client, draft.job_id)
        context = (draft, job["status"], job["error"], job["assets"])
        outcomes.append(job["status"])
        if job["status"] == "succeeded":
            assert len(job["assets"]) == draft.body["n"], context
        else:  # a draft ends otherwise only by its cancel, and keeps no image
            assert job["status"] == "canceled" and draft.canceled, context
            assert job["assets"] == [], context

        events = read_events(client, draft.job_id)
        kinds = [e.event for e in events]
        assert [k for k in kinds if k in TERMINAL] == [job["status"]] and kinds[-1] == job["status"], (context, kinds)
        assert [e.data["asset_id"] for e in events if e.event == "asset"] == job["assets"], (context, kinds)

        for index, asset_id in enumerate(job["assets"]):
            asset = client.get(f"/v1/assets/{asset_id}").json()
            content = client.get(f"/v1/assets/{asset_id}/content")
            assert content.status_code == 200, content.text
            assert hashlib.sha256(content.content).hexdigest() == asset["sha256"], context
            record = read_record(content.content)
            assert record["seed"] == draft.body["seed"] + index, (context, record)
            assert (asset["width"], asset["height"]) == (draft.body["width"], draft.body["height"]), context
            named.add(asset["sha256"])

    assert "succeeded" in outcomes, "every draft was canceled: the run tests nothing"
    images, other = store_files(settings.data_dir)
    # A canceled job removes the files it wrote as it ends: none is left for the hourly sweep.
    assert images == named, f"files no asset names: {sorted(images - named)}; missing: {sorted(named - images)}"
    assert other == [], other
    previews = settings.data_dir / "previews"
    assert not previews.exists() or not any(p.is_file() for p in previews.rglob("*")), list(previews.rglob("*"))


def test_the_draft_mix_cancels_some_and_leaves_others() -> None:
    drafts = [d for seed in range(1, RUNS + 1) for d in plan(seed)]
    assert 6 <= sum(d.cancel_at is not None for d in drafts) <= len(drafts) - 6
    assert {d.cancel_at for d in drafts} == {None, *MOMENTS}
    assert {d.body["n"] for d in drafts} == {1, 2, 3, 4}
    assert len({(d.body["width"], d.body["height"]) for d in drafts}) >= 3
