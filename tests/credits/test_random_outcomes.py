"""Money under a mix of outcomes: seeded random runs of paid jobs that succeed, fail before or after
their request goes out, time out, are filtered, crash, hang or are canceled at any moment, many at
once against a budget that cannot take them all.

Each targeted test elsewhere pins one way a job ends; this one checks that the ledger, the jobs'
`cost`, the budget and the spend report still agree, and that no job is charged for a request that
never went out, when those ways meet and race each other. A failing seed reproduces its run's plan
(the timings of a busy machine differ, which is the point of running several).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.cli import main
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests import fakes
from tests.conftest import random_runs
from tests.credits import (
    PRICE,
    TERMINAL,
    assert_settled_once,
    budget,
    charges,
    get_json,
    jobs_of,
    ledger,
    poll,
    project_with_draft,
    wait_for_job,
    wait_for_state,
)
from tests.credits.conftest import Service

# fake-paid behaviours (tests/fakes.py) with the tags each needs; "hang" only ends by a cancel.
BEHAVIOURS: list[tuple[str, dict[str, str]]] = [
    ("", {}), ("", {}), ("", {}), ("seedless", {}), ("short", {}), ("extra", {}), ("smaller", {}),
    ("fail", {}), ("crash-before-send", {}), ("no-price-before-send", {}), ("too-large", {}),
    ("crash", {}), ("timeout", {}), ("timeout-at-most", {}), ("filtered", {}), ("no-price-after-send", {}),
    ("second-call", {}), ("rate-limited", {"retry_after": "0.05"}),
    ("slow", {"seconds": "0.2"}), ("wait-before-send", {"seconds": "0.1"}), ("hang", {}),
]
JOBS_PER_RUN = 24
FITS = 12  # the budget takes this many holds at once: later submits meet a 402 until some settle
ENGINES = ("fake-paid", "fake-queue")  # fake-queue's work is found again after a kill (tests/fakes.py)


@dataclass
class Planned:
    prompt: str
    stage: str
    engine: str
    behaviour: str
    tags: dict[str, str]
    delay: float  # before the submit
    cancel_after: float | None  # after the submit
    answer: httpx.Response | None = None
    canceled: list[int] = field(default_factory=list)  # the cancel's status code, when one was sent


RUNS_MADE = itertools.count(1)  # plans made in this process


def plan(seed: int) -> list[Planned]:
    rng = random.Random(seed)
    # Prompts no other run of the process shares: fakes.SENT keeps every prompt sent in the process,
    # and one seed is run on SQLite and on PostgreSQL (or by the kill test too) in one process,
    # whose run found a prompt of the other's in it (a job canceled before its send was taken
    # for one sent). The count is drawn apart from `rng`: the plan is the seed's all the same.
    run = f"{seed}-{rng.getrandbits(32):08x}-{next(RUNS_MADE)}"
    planned = []
    for k in range(JOBS_PER_RUN):
        behaviour, tags = rng.choice(BEHAVIOURS)
        cancel = rng.random() < 0.3 or behaviour == "hang"
        planned.append(Planned(prompt=f"random outcomes {run} job {k}", stage=rng.choice(("promote", "polish")),
                               engine=rng.choice(ENGINES), behaviour=behaviour,
                               tags={"fake": behaviour, **tags} if behaviour else {}, delay=rng.uniform(0, 0.1),
                               cancel_after=rng.uniform(0, 0.3) if cancel else None))
    return planned


def kill_seeds(count: int) -> tuple[int, ...]:
    """The first `count` seeds whose plan hangs a job on each engine: a kill that found no work at
    a provider would test little of recovery."""
    seeds: list[int] = []
    seed = 1
    while len(seeds) < count:
        if {job.engine for job in plan(seed) if job.behaviour == "hang"} == set(ENGINES):
            seeds.append(seed)
        seed += 1
    return tuple(seeds)


RUNS, KILL_RUNS = 2, 1  # unless TEST_RANDOM_RUNS says
SEEDS = tuple(range(1, random_runs(RUNS) + 1))
KILL_SEEDS = kill_seeds(random_runs(KILL_RUNS))


def carry_out(base_url: str, asset_id: str, job: Planned, *, killed: bool = False) -> None:
    """Submit the job and cancel it as planned. `killed`: the service may die meanwhile, so a request
    may get no answer (its job then may or may not exist)."""
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        time.sleep(job.delay)
        body: dict[str, Any] = {"engine": job.engine, "prompt": job.prompt, "tags": job.tags, "cache": False}
        if job.stage == "polish":
            body["scale"] = 2
        try:
            job.answer = client.post(f"/v1/assets/{asset_id}/{job.stage}", json=body)
            if job.answer.status_code != 202 or job.cancel_after is None:
                return
            time.sleep(job.cancel_after)
            job.canceled.append(client.post(f"/v1/jobs/{job.answer.json()['id']}/cancel").status_code)
        except httpx.TransportError:
            if not killed:
                raise


def check_answers(planned: list[Planned]) -> dict[str, Planned]:
    """The jobs accepted, by id; every other answer was a whole refusal (or none, the service dead)."""
    accepted = {}
    for job in planned:
        if job.answer is None:
            continue  # no answer: the service died
        if job.answer.status_code == 202:
            accepted[job.answer.json()["id"]] = job
        else:  # refused whole: the budget is full for now, or failures opened the engine's circuit
            refusal = (job.answer.status_code, job.answer.json()["error"]["code"])
            assert refusal in ((402, "budget_exceeded"), (503, "no_route")), job.answer.text
            if job.answer.status_code == 503:  # an open circuit says when its engine may be tried again
                wait = job.answer.headers.get("Retry-After", "")
                assert wait.isdigit() and int(wait) >= 1, (job.answer.headers, job.answer.text)
        assert all(status in (202, 409) for status in job.canceled), (job, job.canceled)
    assert accepted, "every submit was refused: the run tests nothing"
    return accepted


def check_accounts(client: httpx.Client, project_id: str, ended: dict[str, dict[str, Any]],
                   entries: list[dict[str, Any]]) -> dict[str, float]:
    """The ledger, each job's `cost`, the budget and the spend report agree, and no hold is open."""
    assert_settled_once(entries)
    charged = charges(entries)
    assert set(charged) <= set(ended), "a charge names a job the project does not list"
    for job_id, job in ended.items():
        assert job["status"] in TERMINAL
        context = (job["params"].get("prompt"), job["status"], job["error"],
                   [e for e in entries if e["job_id"] == job_id])
        assert job["cost"]["held"] == 0, context
        assert job["cost"]["charged"] == charged.get(job_id, 0), context
        if job["assets"]:  # made by a paid engine, kept (a cancel once it had answered keeps them too): paid for
            assert charged.get(job_id, 0) > 0, context
    balance = budget(client, project_id)
    assert balance["held"] == 0
    assert balance["charged"] == round(sum(charged.values()), 3)
    # No reported costs in the mix but fake-queue's reattached 7: nothing is captured beyond its
    # hold, so the budget holds.
    assert balance["charged"] <= PRICE * FITS
    assert balance["available"] == round(PRICE * FITS - balance["charged"], 3)
    spend = get_json(client, "/v1/spend", project_id=project_id, group_by="engine")
    assert spend["total"] == balance["charged"], spend
    assert sum(g["jobs"] for g in spend["groups"]) == sum(1 for c in charged.values() if c), spend
    return charged


def listed_jobs(client: httpx.Client, project_id: str) -> list[dict[str, Any]]:
    return jobs_of(client, project_id, "bridge") + jobs_of(client, project_id, "polish")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_mix_of_outcomes_leaves_every_account_agreeing(seed: int, tmp_path: Path,
                                                                paid_settings_for: Callable[..., Settings]) -> None:
    # A service of its own: the mix's failures open the engines' circuits for a minute.
    with serve_in_thread(paid_settings_for(tmp_path / "data")) as base, \
            httpx.Client(base_url=base, timeout=30.0) as api:
        run_the_mix(api, seed)


def run_the_mix(api: httpx.Client, seed: int) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": PRICE * FITS, "period": "month"})
    planned = plan(seed)

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(carry_out, str(api.base_url), asset_id, job) for job in planned]:
            future.result()
    assert all(job.answer is not None for job in planned)
    accepted = check_answers(planned)

    ended = {job_id: wait_for_job(api, job_id) for job_id in accepted}
    assert {j["id"] for j in listed_jobs(api, project_id)} == set(accepted), \
        "a refused submit left a job, or an accepted one is missing"
    entries = ledger(api, project_id)
    charged = check_accounts(api, project_id, ended, entries)

    sent = set(fakes.SENT)  # exact: "job 1" is a prefix of "job 10"
    for job_id, job in ended.items():
        planned_job = accepted[job_id]
        context = (planned_job, job["status"], job["error"], [e for e in entries if e["job_id"] == job_id])
        asked = [f"{planned_job.prompt}{suffix}" in sent for suffix in ("", " (refused)", " (second call)")]
        if not any(asked):  # no request of it went out: never charged
            assert charged.get(job_id, 0) == 0, context
        elif asked[0] and planned_job.behaviour != "filtered":  # a provider took it: the ledger never says free
            assert charged.get(job_id, 0) > 0, context
        if job["status"] == "succeeded" and planned_job.behaviour in ("", "seedless"):
            assert charged[job_id] == PRICE, context


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_a_kill_in_the_middle_of_a_random_mix_leaves_every_hold_settled_once(
        seed: int, service_env: dict[str, str], tmp_path: Path, paid_settings_for: Callable[..., Settings],
        services: list[Service], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The mix again, with the service SIGKILLed while it runs: the next start's recovery (failed
    `interrupted`, reattached, run again) leaves the accounts agreeing, and `orchestrator check`
    finds nothing to say."""
    kill_in_the_mix(seed, service_env, tmp_path, paid_settings_for, services, monkeypatch, capsys)


def kill_in_the_mix(seed: int, service_env: dict[str, str], tmp_path: Path, paid_settings_for: Callable[..., Settings],
                    services: list[Service], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                    database_url: str | None = None) -> None:
    if database_url is not None:
        service_env["ORCH_DATABASE_URL"] = database_url
        monkeypatch.setenv("ORCH_DATABASE_URL", database_url)  # for the check at the end
    # The draft in this process, where torch is imported already; the children share its data dir.
    data_dir = Path(service_env["ORCH_DATA_DIR"])
    settings = paid_settings_for(data_dir, database_url=database_url)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client, {"limit": PRICE * FITS, "period": "month"})
    planned = plan(seed)
    by_prompt = {job.prompt: job for job in planned}
    hanging = {job.prompt for job in planned if job.behaviour == "hang"}
    for job in planned:
        if job.prompt in hanging:
            job.cancel_after = None  # left for the kill to find at its provider; canceled after the restart

    services.append(Service(service_env, tmp_path, tmp_path / "first.log"))
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(carry_out, services[0].url, asset_id, job, killed=True) for job in planned]
        # It dies with work accepted at a provider, the rest of the mix coming and going.
        poll(lambda: [job.answer for job in planned if job.prompt in hanging], all, what="the hanging jobs' answers")
        at_provider = [job.answer.json()["id"] for job in planned
                       if job.prompt in hanging and job.answer is not None and job.answer.status_code == 202]
        with httpx.Client(base_url=services[0].url, timeout=30.0) as watcher:
            for job_id in at_provider:
                wait_for_state(watcher, job_id, "accepted")
        time.sleep(random.Random(seed).uniform(0, 0.1))
        services[0].kill()
        for future in futures:
            future.result()
    accepted = check_answers(planned)

    # Restarted in this process, as the draft was made: a second child spent most of its time
    # importing. The start's recovery, the reattaches and the runs again are the service's wherever it runs.
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        listed = listed_jobs(client, project_id)
        assert set(accepted) <= {j["id"] for j in listed}, "an accepted job was lost"
        assert all(j["params"]["prompt"] in by_prompt for j in listed)
        for row in listed:  # one not yet sent at the kill hangs on its new run until canceled
            if row["params"]["prompt"] in hanging and row["id"] not in at_provider and row["status"] not in TERMINAL:
                assert client.post(f"/v1/jobs/{row['id']}/cancel").status_code in (202, 409)
        # Past a circuit's cooldown (60 s), should the mix have opened one the new process reads.
        ended = {row["id"]: wait_for_job(client, row["id"], timeout=120) for row in listed}
        entries = ledger(client, project_id)
        for job_id in at_provider:  # what the kill found at its provider
            row = ended[job_id]
            context = (row, [e for e in entries if e["job_id"] == job_id])
            assert row["attempts"][0]["error"]["code"] == "interrupted", context
            if row["engine"] == "fake-paid":  # no id to follow it by: written off, charged for review
                assert (row["status"], row["error"]["code"]) == ("failed", "interrupted"), context
                assert [(e["kind"], e["amount"], e["unreconciled"]) for e in context[1] if e["kind"] != "hold"] == \
                    [("capture", PRICE, True)], context
            else:  # followed again at its provider, which reports 7 credits
                assert row["status"] == "succeeded" and row["cost"]["charged"] == 7, context
        check_accounts(client, project_id, ended, entries)

    monkeypatch.setenv("ORCH_DATA_DIR", str(data_dir))
    status = main(["check"])
    out = capsys.readouterr().out
    assert status == 0 and out.endswith("ok\n"), out


def test_the_mix_covers_the_ways_a_paid_job_ends() -> None:
    # The suite's runs above only mean something if their plans reach these; a change to BEHAVIOURS
    # or the seeds that loses one shows here, not as a quietly weaker test.
    planned = [job for seed in (*range(1, RUNS + 1), *kill_seeds(KILL_RUNS)) for job in plan(seed)]
    behaviours = {job.behaviour for job in planned}
    for needed in ("", "fail", "crash-before-send", "timeout", "crash", "hang", "slow", "wait-before-send"):
        assert needed in behaviours, needed
    assert sum(job.cancel_after is not None and job.behaviour != "hang" for job in planned) >= 10
    assert {job.stage for job in planned} == {"promote", "polish"}
    assert {job.engine for job in planned} == set(ENGINES)
