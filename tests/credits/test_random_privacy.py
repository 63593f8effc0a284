"""Privacy under a race: seeded random runs in which a project moves to `local-only` while its cloud
jobs are being submitted, are queued, are preparing their requests or have sent them.

The targeted tests (tests/credits/test_keep_local.py) move the project at one chosen point. Here
the move lands wherever the run's timing puts it, and what README promises must hold whatever the
order: once the move has answered, nothing more of the project leaves the machine. A request that
went out was announced (`billable_send`) before the move answered; a submit for the cloud sent
after it is refused whole; a job the move canceled sent nothing and is charged nothing; and every
hold is settled once, each job's `cost` agreeing with the ledger.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests import fakes
from tests.conftest import random_runs
from tests.credits import (
    PRICE,
    assert_settled_once,
    charges,
    jobs_of,
    ledger,
    poll,
    project_with_draft,
    wait_for_job,
)

JOBS_PER_RUN = 16
ENGINES = ("fake-paid", "fake-queue")
RUNS = 2  # unless TEST_RANDOM_RUNS says
SEEDS = tuple(range(1, random_runs(RUNS) + 1))
MOVED = "keeps its work on this machine"  # in the error of a job the move canceled


@dataclass
class Planned:
    prompt: str
    stage: str
    engine: str
    prepare: float  # seconds the engine spends before its request goes out (`wait-before-send`)
    delay: float  # before the submit
    submitted_at: float = 0.0  # monotonic, as the submit was sent
    answered_at: float = 0.0  # monotonic, as its answer came
    answer: httpx.Response | None = None


@dataclass
class Move:
    after_accepted: int  # the project moves once this many submits were accepted,
    wait: float  # and this many seconds more


RUNS_MADE = itertools.count(1)  # plans made in this process


def plan(seed: int) -> tuple[list[Planned], Move]:
    """The run's jobs, and when the project moves (counted from accepted submits: a slow machine's
    first answers may take longer than any fixed delay, and the run would then test nothing)."""
    rng = random.Random(seed)
    # Prompts no other run of the process shares: fakes.SENT keeps every prompt sent in the process,
    # and one seed is run on SQLite and on PostgreSQL (or by the kill test too) in one process,
    # whose run found a prompt of the other's in it (a job canceled before its send was taken
    # for one sent). The count is drawn apart from `rng`: the plan is the seed's all the same.
    run = f"{seed}-{rng.getrandbits(32):08x}-{next(RUNS_MADE)}"
    planned = [Planned(prompt=f"random privacy {run} job {k}", stage=rng.choice(("promote", "polish")),
                       engine=rng.choice(ENGINES), prepare=rng.choice((0.0, rng.uniform(0.05, 0.3))),
                       delay=rng.uniform(0, 0.4)) for k in range(JOBS_PER_RUN)]
    return planned, Move(after_accepted=rng.randint(1, JOBS_PER_RUN // 2), wait=rng.uniform(0, 0.2))


def carry_out(base_url: str, asset_id: str, job: Planned) -> None:
    tags = {"fake": "wait-before-send", "seconds": f"{job.prepare:.3f}"} if job.prepare else {}
    body: dict[str, Any] = {"engine": job.engine, "prompt": job.prompt, "tags": tags, "cache": False}
    if job.stage == "polish":
        body["scale"] = 2
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        time.sleep(job.delay)
        job.submitted_at = time.monotonic()
        job.answer = client.post(f"/v1/assets/{asset_id}/{job.stage}", json=body)
        job.answered_at = time.monotonic()


class SendTimes:
    """When each request the fake engines let out was announced: `billable_send()` is wrapped to
    note the time before the service's check, and `fakes.SENT.append` to file it by prompt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.announced: dict[str, float] = {}
        asked_at: ContextVar[float] = ContextVar("asked_at")
        real_send, announced = fakes.billable_send, self.announced

        async def timed_send() -> None:
            asked_at.set(time.monotonic())  # the engine's task: its append below reads it
            await real_send()

        class Filed(list[str]):
            def append(self, prompt: str) -> None:
                announced[prompt] = asked_at.get()
                super().append(prompt)

        monkeypatch.setattr(fakes, "billable_send", timed_send)
        monkeypatch.setattr(fakes, "SENT", Filed(fakes.SENT))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_project_moved_to_local_only_mid_mix_sends_nothing_after_the_move(
        seed: int, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sends = SendTimes(monkeypatch)
    planned, move = plan(seed)
    with serve_in_thread(paid_settings_for(tmp_path / "data")) as base, \
            httpx.Client(base_url=base, timeout=30.0) as api:
        project_id, asset_id = project_with_draft(api)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(carry_out, base, asset_id, job) for job in planned]
            poll(lambda: sum(job.answer is not None and job.answer.status_code == 202 for job in planned),
                 lambda accepted: accepted >= move.after_accepted, what="the submits before the move")
            time.sleep(move.wait)
            moving_at = time.monotonic()
            moved = api.patch(f"/v1/projects/{project_id}", json={"policy": "local-only"})
            moved_at = time.monotonic()
            for future in futures:
                future.result()
        assert moved.status_code == 200, moved.text

        accepted: dict[str, Planned] = {}
        for job in planned:
            assert job.answer is not None
            if job.answer.status_code == 202:
                accepted[job.answer.json()["id"]] = job
                assert job.submitted_at < moved_at, (job, "accepted for the cloud after the move answered")
            else:  # sent as the move was made, or after: the cloud engines are not the new policy's
                assert job.answered_at > moving_at, (job, "refused before the move was asked")
                assert (job.answer.status_code, job.answer.json()["error"]["code"]) == (422, "no_route"), \
                    job.answer.text
        ended = {job_id: wait_for_job(api, job_id) for job_id in accepted}
        listed = jobs_of(api, project_id, "bridge") + jobs_of(api, project_id, "polish")
        entries = ledger(api, project_id)

    assert {j["id"] for j in listed} == set(accepted), "a refused submit left a job, or an accepted one is missing"
    late = {prompt: at - moved_at for prompt, at in sends.announced.items() if at > moved_at}
    assert not late, f"sent after the move answered (seconds after): {late}"
    assert_settled_once(entries)
    charged = charges(entries)
    outcomes = []
    for job_id, row in ended.items():
        prompt = accepted[job_id].prompt
        context = (accepted[job_id], row["status"], row["error"], [e for e in entries if e["job_id"] == job_id])
        assert row["cost"]["held"] == 0 and row["cost"]["charged"] == charged.get(job_id, 0), context
        if prompt in sends.announced:  # out before the move: rendered and paid for
            assert (row["status"], charged.get(job_id)) == ("succeeded", PRICE), context
            outcomes.append("sent")
        else:  # the move caught it queued or preparing: canceled, free
            assert row["status"] == "canceled" and MOVED in row["error"]["message"], context
            assert charged.get(job_id, 0) == 0, context
            outcomes.append("kept")
    assert len(outcomes) >= move.after_accepted


def test_the_privacy_mix_plans_jobs_that_send_at_once_and_after_a_while() -> None:
    planned = [job for seed in range(1, RUNS + 1) for job in plan(seed)[0]]
    assert {job.engine for job in planned} == set(ENGINES)
    assert {job.stage for job in planned} == {"promote", "polish"}
    assert sum(job.prepare == 0 for job in planned) >= 4 and sum(job.prepare > 0 for job in planned) >= 4
