"""Idempotency-Key on promote and on grants, and the result cache of identical paid requests."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.api import read_events
from tests.credits import (
    PRICE,
    budget,
    get_json,
    jobs_of,
    kinds,
    ledger,
    project_with_draft,
    promote,
    promote_ok,
    wait_for_job,
)
from tests.credits.conftest import POLICY


@pytest.mark.parametrize("stage", ["bridge", "polish"])
def test_same_key_same_body_replays_the_job(api: httpx.Client, stage: str) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    route = {"bridge": "promote", "polish": "polish"}[stage]

    def send() -> httpx.Response:
        return api.post(f"/v1/assets/{asset_id}/{route}", json={"engine": "fake-paid", "cache": False, "seed": 1},
                        headers={"Idempotency-Key": f"{route}-once"})

    first = send()
    assert first.status_code == 202, first.text
    second = send()
    assert second.status_code == 202, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    wait_for_job(api, first.json()["id"])
    third = send()  # after it finished, still the same job, answered as it was first: held, not charged
    assert third.json() == first.json()
    assert third.json()["cost"]["held"] == PRICE and third.json()["cost"]["charged"] == 0

    assert len(jobs_of(api, project_id, stage)) == 1
    assert kinds(ledger(api, project_id)) == {"hold": 1, "capture": 1}


def test_concurrent_requests_with_one_key_make_one_job(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    barrier = threading.Barrier(10)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=api.base_url, timeout=60.0) as own:
            barrier.wait(timeout=30)
            return promote(own, asset_id, key="one-key-ten-callers", seed=2)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(10)))
    assert [r.status_code for r in responses] == [202] * 10, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    wait_for_job(api, responses[0].json()["id"])
    assert len(jobs_of(api, project_id, "bridge")) == 1
    assert kinds(ledger(api, project_id)) == {"hold": 1, "capture": 1}


def test_same_key_different_body_conflicts(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    assert promote(api, asset_id, key="k-conflict", seed=3).status_code == 202
    response = promote(api, asset_id, key="k-conflict", seed=4)
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "idempotency_conflict"
    assert len(jobs_of(api, project_id, "bridge")) == 1
    assert kinds(ledger(api, project_id))["hold"] == 1


def test_a_job_that_ran_on_another_model_than_it_was_asked_is_a_hit_for_that_model_only(
        api: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued under one model, run after the engine's model changed (a restart between): it was
    keyed by the model asked for, and served the other model's image as that model's hit."""
    from tests.fakes import FakePaidEngine

    _, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    until = tmp_path / "model-changed"
    body = {"cache": True, "seed": 11}
    queued = promote_ok(api, asset_id, **body, tags={"fake": "wait-before-send", "until": str(until)})
    monkeypatch.setattr(FakePaidEngine, "model", property(lambda self: "fake-2"))
    monkeypatch.setattr(FakePaidEngine, "estimate", lambda self, req: req.n * round(PRICE * 1000))
    until.write_text("")
    assert wait_for_job(api, queued["id"])["status"] == "succeeded"
    again = promote_ok(api, asset_id, **body)  # on fake-2 still: the same image
    assert again["cost"]["cache_hit"], again
    monkeypatch.undo()  # back on fake-1
    other = promote_ok(api, asset_id, **body)
    assert not other["cost"]["cache_hit"], other
    assert wait_for_job(api, other["id"])["status"] == "succeeded"


def test_a_seedless_polish_of_a_seedless_image_is_served_from_the_cache(api: httpx.Client) -> None:
    """The fake engine, as Gemini, OpenAI and fal, takes no seed and makes images without one: each
    polish of its bridge drew a fresh seed into the cache key, and paid again for the same image."""
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    bridge = wait_for_job(api, promote_ok(api, asset_id, cache=True, tags={"fake": "seedless"})["id"])
    bridged = bridge["assets"][0]
    assert get_json(api, f"/v1/assets/{bridged}")["seed"] is None
    explain = {"stage": "polish", "source_asset_id": bridged, "cache": True, "scale": 2}
    before = api.post("/v1/route/explain", json=explain).json()
    assert (before["cache_hit"], before["params"]["seed"]) == (False, None)  # no drawn seed told
    first = wait_for_job(api, api.post(f"/v1/assets/{bridged}/polish", json={"cache": True, "scale": 2}).json()["id"])
    assert first["status"] == "succeeded" and not first["cost"]["cache_hit"]
    assert api.post("/v1/route/explain", json=explain).json()["cache_hit"]
    keyed = api.post(f"/v1/assets/{bridged}/polish", json={"cache": True, "scale": 2},
                     headers={"Idempotency-Key": "seedless-copy"})
    second = keyed.json()
    assert second["cost"]["cache_hit"] and second["cost"]["charged"] == 0, second
    # A copy's first answer is finished, its assets listed: a replay says the same.
    replay = api.post(f"/v1/assets/{bridged}/polish", json={"cache": True, "scale": 2},
                      headers={"Idempotency-Key": "seedless-copy"})
    assert replay.headers["idempotent-replayed"] == "true" and replay.json() == second
    assert second["status"] == "succeeded" and len(second["assets"]) == 1
    assert get_json(api, f"/v1/projects/{project_id}/budget")["charged"] == 2 * PRICE  # the bridge and one polish
    # Its params say the seed its image was made with (none), not one drawn for a render that never ran.
    assert second["params"]["seed"] is None and get_json(api, f"/v1/assets/{second['assets'][0]}")["seed"] is None


def test_identical_paid_request_is_served_from_the_cache(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    explain = {"stage": "bridge", "source_asset_id": asset_id, "cache": True, "seed": 5}
    before = api.post("/v1/route/explain", json=explain).json()
    assert (before["estimate"], before["cache_hit"]) == (PRICE, False)
    first = wait_for_job(api, promote_ok(api, asset_id, cache=True, seed=5)["id"])
    assert first["status"] == "succeeded" and first["cost"]["charged"] == PRICE
    # Told before it is asked: the same request now costs nothing (its `cost.estimated` below is
    # what a fresh render would have cost).
    after = api.post("/v1/route/explain", json=explain).json()
    assert (after["estimate"], after["cache_hit"]) == (0.0, True)

    stored = get_json(api, f"/v1/projects/{project_id}")["storage_bytes"]
    second = promote_ok(api, asset_id, cache=True, seed=5)
    assert second["id"] != first["id"]
    # An asset of the project as a render's is: its storage counts the copy too (`orchestrator.quota`).
    copied = len(api.get(f"/v1/assets/{first['assets'][0]}/content").content)
    assert get_json(api, f"/v1/projects/{project_id}")["storage_bytes"] == stored + copied
    assert second["status"] == "succeeded"  # at once, in the 202
    assert second["cost"] == {"estimated": PRICE, "held": 0, "charged": 0, "cache_hit": True, "engines": []}
    assert len(second["assets"]) == len(first["assets"]) == 1
    shas = {get_json(api, f"/v1/assets/{a}")["sha256"] for a in first["assets"] + second["assets"]}
    assert len(shas) == 1
    assert second["assets"] != first["assets"]  # new rows, same content
    assert kinds(ledger(api, project_id)) == {"hold": 1, "capture": 1}
    assert second["progress"]["fraction"] == 1.0  # finished, not a bar stuck at 0
    events = read_events(api, second["id"])
    assert [e.event for e in events] == ["queued", "started", "asset", "succeeded"]
    # The events a run sends, as a client reads them: the attempt, and the assets with the end.
    assert events[1].data["cache_hit"] and events[1].data["attempt"] == 0
    assert events[-1].data["assets"] == second["assets"]

    third = promote_ok(api, asset_id, cache=False, seed=5)
    assert not third["cost"]["cache_hit"]
    done = wait_for_job(api, third["id"])
    assert done["status"] == "succeeded" and done["cost"]["charged"] == PRICE
    assert kinds(ledger(api, project_id)) == {"hold": 2, "capture": 2}
    assert get_json(api, f"/v1/projects/{project_id}/budget")["charged"] == 2 * PRICE


def test_a_copy_under_a_budget_reads_the_earlier_result_s_file_once(api: httpx.Client,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Looked for before the submit's transaction and again under its write lock, the earlier
    result's images were each read and hashed twice, once while every writer waited."""
    from orchestrator.store import ArtifactStore

    _project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    first = wait_for_job(api, promote_ok(api, asset_id, cache=True, seed=5)["id"])
    [made] = first["assets"]
    sha = get_json(api, f"/v1/assets/{made}")["sha256"]
    reads: list[str] = []
    get = ArtifactStore.get

    def counted(store: ArtifactStore, asked: str) -> bytes:
        reads.append(asked)
        return get(store, asked)

    monkeypatch.setattr(ArtifactStore, "get", counted)
    second = promote_ok(api, asset_id, cache=True, seed=5)
    assert second["cost"]["cache_hit"] is True
    assert reads.count(sha) == 1


def test_a_copy_is_made_of_the_next_identical_job_when_the_first_s_file_is_lost(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """Only the first earlier job was looked at: its file lost (and an engine that does not make
    the same bytes twice), every identical request after it paid again."""
    import asyncio

    from sqlalchemy import delete
    from sqlmodel import col

    from orchestrator.models import Asset, Job, Project
    from orchestrator.services import Services

    services = Services.build(paid_settings_for(tmp_path / "data"))
    try:
        kept = services.store.put(b"the second render's bytes")
        with services.db.transaction() as s:
            s.add(Project(id="prj_lost", name="lost", policy=POLICY))
            s.flush()
            # The first's file is gone; then, as many more lost as are looked at, and the newest intact.
            lost = [(f"job_lost{i}", f"{i:02d}" * 32) for i in range(1, 8)]
            for job_id, sha in (("job_lost0", "ab" * 32), ("job_lost1b", kept), *lost, ("job_lost9", kept)):
                s.add(Job(id=job_id, project_id="prj_lost", stage="bridge", engine="fake-paid", status="succeeded",
                          cache_key="same-request"))
                s.flush()
                s.add(Asset(id=f"ast_{job_id}", project_id="prj_lost", job_id=job_id, stage="bridge",
                            engine="fake-paid", model="m", prompt="x", width=64, height=64, sha256=sha))
        with services.db.session() as s:
            asking = Job(id="job_asking", project_id="prj_lost", stage="bridge", engine="fake-paid",
                         cache_key="same-request")
            assert [a.id for a in services.jobs._cached(s, asking)] == ["ast_job_lost1b"]  # the next one
        with services.db.transaction() as s:
            s.execute(delete(Asset).where(col(Asset.job_id) == "job_lost1b"))
            s.execute(delete(Job).where(col(Job.id) == "job_lost1b"))
        with services.db.session() as s:
            assert [a.id for a in services.jobs._cached(s, asking)] == ["ast_job_lost9"]  # the newest
    finally:
        asyncio.run(services.aclose())


def test_a_free_copy_is_served_under_a_max_credits_below_the_estimate(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    first = wait_for_job(api, promote_ok(api, asset_id, cache=True, seed=6)["id"])
    assert first["status"] == "succeeded"
    # The copy costs nothing, as it needs no room in the budget; a new render is still capped.
    copy = promote_ok(api, asset_id, cache=True, seed=6, max_credits=5)
    assert copy["cost"]["cache_hit"] and copy["status"] == "succeeded"
    refused = promote(api, asset_id, cache=True, seed=6, strength=0.3, max_credits=5)
    assert refused.status_code == 402 and "above max_credits" in refused.json()["error"]["message"]
    assert kinds(ledger(api, project_id)) == {"hold": 1, "capture": 1}


def test_a_cached_result_gone_by_the_commit_is_held_to_max_credits(api: httpx.Client,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing took the free copy (caps skipped, as for a copy); its file was damaged before the
    commit, so a render is held instead: at the full estimate, past the client's max_credits,
    on a project without a budget (the only other re-check)."""
    from orchestrator.jobs import JobService

    project_id, asset_id = project_with_draft(api)  # no budget
    assert wait_for_job(api, promote_ok(api, asset_id, cache=True, seed=8)["id"])["status"] == "succeeded"
    found = JobService._cached
    looks: list[int] = []

    def gone_at_the_commit(self: JobService, s: Any, job: Any) -> Any:
        looks.append(1)
        return found(self, s, job) if len(looks) == 1 else []
    monkeypatch.setattr(JobService, "_cached", gone_at_the_commit)
    refused = promote(api, asset_id, cache=True, seed=8, max_credits=5)
    assert refused.status_code == 402 and "above max_credits" in refused.json()["error"]["message"], refused.text
    assert kinds(ledger(api, project_id)) == {"hold": 1, "capture": 1}  # the first render's only


def test_a_same_bytes_draft_of_another_asset_is_not_a_cache_hit(api: httpx.Client) -> None:
    # Identical draft requests make byte-identical drafts. A cache hit across them would hand out
    # PNGs whose embedded record names the other asset (maybe another project's) as the parent.
    _, first_asset = project_with_draft(api, {"limit": 100, "period": "month"})
    _, second_asset = project_with_draft(api, {"limit": 100, "period": "month"})
    shas = {get_json(api, f"/v1/assets/{a}")["sha256"] for a in (first_asset, second_asset)}
    assert len(shas) == 1
    wait_for_job(api, promote_ok(api, first_asset, cache=True, seed=5)["id"])
    other = promote_ok(api, second_asset, cache=True, seed=5)
    assert not other["cost"]["cache_hit"]
    done = wait_for_job(api, other["id"])
    asset = get_json(api, f"/v1/assets/{done['assets'][0]}")
    assert asset["parent_id"] == second_asset


def grant(client: httpx.Client, project_id: str, body: dict[str, object], key: str) -> httpx.Response:
    return client.post(f"/v1/projects/{project_id}/grants", json=body, headers={"Idempotency-Key": key})


def test_a_retried_grant_grants_once(api: httpx.Client) -> None:
    project_id, _ = project_with_draft(api, {"limit": 10, "period": "month"})
    first = grant(api, project_id, {"amount": 25, "note": "top-up"}, "grant-1")
    assert first.status_code == 201, first.text
    again = grant(api, project_id, {"amount": 25, "note": "top-up"}, "grant-1")
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()  # the same ledger entry, byte for byte
    assert get_json(api, f"/v1/projects/{project_id}/budget")["granted"] == 25

    conflict = grant(api, project_id, {"amount": 30, "note": "top-up"}, "grant-1")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    # Scoped by path: the same key on another project's grants is that project's own grant.
    other_id, _ = project_with_draft(api, {"limit": 10, "period": "month"})
    assert grant(api, other_id, {"amount": 25, "note": "top-up"}, "grant-1").status_code == 201
    assert "idempotent-replayed" not in grant(api, project_id, {"amount": 25}, "grant-2").headers
    assert kinds(ledger(api, project_id)).get("grant") == 2
    assert get_json(api, f"/v1/projects/{project_id}/budget")["granted"] == 50
    # One amount, whatever float error it was sent with (README: 0.1 + 0.2 is 0.3): a 409 before.
    first = grant(api, project_id, {"amount": 0.3}, "grant-3")
    again = grant(api, project_id, {"amount": 0.1 + 0.2}, "grant-3")
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true", again.text
    assert again.json() == first.json() and first.json()["amount"] == 0.3


def test_concurrent_grants_with_one_key_grant_once(api: httpx.Client) -> None:
    project_id, _ = project_with_draft(api, {"limit": 10, "period": "month"})
    barrier = threading.Barrier(8)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=api.base_url, timeout=60.0) as own:
            barrier.wait(timeout=30)
            return grant(own, project_id, {"amount": 7}, "grant-race")

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [r.status_code for r in responses] == [201] * 8, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert kinds(ledger(api, project_id)).get("grant") == 1
    assert get_json(api, f"/v1/projects/{project_id}/budget")["granted"] == 7


def test_polish_s_default_scale_and_an_explicit_scale_of_2_are_one_request(api: httpx.Client) -> None:
    # The default was the int 2 and an explicit 2 became 2.0: two cache keys, charged twice.
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    first = api.post(f"/v1/assets/{asset_id}/polish", json={"engine": "fake-paid"})
    assert wait_for_job(api, first.json()["id"])["status"] == "succeeded"
    for body in ({"scale": 2}, {"scale": 2.0}):
        again = wait_for_job(api, api.post(f"/v1/assets/{asset_id}/polish", json={"engine": "fake-paid", **body})
                             .json()["id"])
        assert again["cost"]["cache_hit"] is True, (body, again["cost"])
    assert budget(api, project_id)["charged"] == 10


def test_a_polish_at_scale_1_and_one_at_no_scale_are_one_request(api: httpx.Client) -> None:
    # Both keep the source's size and make the same call: `scale` 1.0 in one key, null in the other.
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    first = wait_for_job(api, api.post(f"/v1/assets/{asset_id}/polish", json={"engine": "fake-paid", "scale": 1})
                         .json()["id"])
    assert first["status"] == "succeeded" and first["params"]["scale"] is None
    again = wait_for_job(api, api.post(f"/v1/assets/{asset_id}/polish", json={"engine": "fake-paid", "scale": None})
                         .json()["id"])
    assert again["cost"]["cache_hit"] is True, again["cost"]
    assert budget(api, project_id)["charged"] == 10


def test_the_cache_key_holds_what_was_asked_for() -> None:
    from orchestrator.cache import cache_key

    base = {"stage": "polish", "prompt": "p", "negative_prompt": "", "seed": 1, "scale": 2.0, "tags": {}}

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return cache_key("e", "m", {**base, **a}) == cache_key("e", "m", {**base, **b})

    assert not same({"seed": 1}, {"seed": 2})  # asked for: even an engine said to take none may (FLUX)
    assert same({"seed": 1, "seed_drawn": True}, {"seed": 2, "seed_drawn": True})  # any seed was asked for
    assert not same({"seed": 1}, {"seed": 1, "seed_drawn": True})
    assert not same({"negative_prompt": "a"}, {"negative_prompt": "b"})
    assert same({"tags": {"a": "1"}}, {"tags": {"b": "2"}})
    assert not same({"scale": 2.0}, {"scale": 3.0})
    # Keys of rows written before seed_drawn existed, with a seed asked for, are unchanged.
    legacy = {"engine": "e", "model": "m", "params": {k: v for k, v in base.items() if k != "tags"}}
    assert cache_key("e", "m", base) == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()


def test_reattached_work_stays_keyed_by_the_model_that_made_it(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted by the provider before a stop, followed after a restart on another model: the
    image is the first model's, and is no hit for the second (it was re-keyed to the second)."""
    import sqlite3

    from tests.credits import poll
    from tests.fakes import FakeQueueEngine

    settings = paid_settings_for(tmp_path / "data", stop_grace=0)

    def row(job_id: str) -> tuple[str, str | None]:
        with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
            found: tuple[str, str | None] = db.execute(
                "SELECT status, provider_work FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return found

    body = {"engine": "fake-queue", "cache": True, "seed": 3}
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        _, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, **body, tags={"fake": "hang"})
        poll(lambda: row(job["id"]), lambda r: r[0] == "running" and r[1] is not None, what="the work accepted")
    monkeypatch.setattr(FakeQueueEngine, "model", property(lambda self: "fake-2"))
    monkeypatch.setattr(FakeQueueEngine, "estimate", lambda self, req: req.n * round(PRICE * 1000))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert wait_for_job(client, job["id"])["status"] == "succeeded"  # reattached
        again = promote_ok(client, asset_id, **body)
        assert not again["cost"]["cache_hit"], again


def test_retries_with_one_key_while_an_engine_is_half_open_get_the_one_job(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-open circuit lets one job through: of eight sends of one request (one key) the first
    took that probe, and the seven others were refused 503 `no_route` instead of answered with its
    job, as a retry of it is."""
    from orchestrator import health

    made = health.EngineHealth.__init__

    def quick(self: health.EngineHealth, threshold: int = 5, cooldown: float = 60.0, **rest: Any) -> None:
        made(self, 1, 1.0, **rest)  # one failure opens it; a second later it is half-open

    monkeypatch.setattr(health.EngineHealth, "__init__", quick)
    with serve_in_thread(paid_settings_for(tmp_path / "data")) as base, \
            httpx.Client(base_url=base, timeout=60.0) as client:
        _, asset_id = project_with_draft(client)
        failed = promote_ok(client, asset_id, tags={"fake": "fail"})
        assert wait_for_job(client, failed["id"])["status"] == "failed"
        time.sleep(1.2)  # past the cooldown: half-open, one probe allowed
        start = threading.Barrier(8)

        def send(_: int) -> httpx.Response:
            with httpx.Client(base_url=base, timeout=60.0) as own:
                start.wait(timeout=30)
                return promote(own, asset_id, key="one-request")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, range(8)))
    assert [a.status_code for a in answers] == [202] * 8, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 7


def test_a_replay_of_an_answer_stored_before_cost_engines_lists_its_hold(api: httpx.Client,
                                                                         paid_settings: Settings) -> None:
    """A key stored by the release before `cost.engines` kept an answer without it: replayed, that
    answer said `held` 10 and `engines` [] (the field's default), where its shares must add up to
    the job's. It lists the hold as a new job's answer does: its engine, held what was estimated."""
    from sqlmodel import select

    from orchestrator.db import Database
    from orchestrator.models import IdempotencyKey

    _, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    body = {"engine": "fake-paid", "cache": False, "seed": 3, "tags": {"fake": "wait-before-send",
                                                                       "until": "/nonexistent/never"}}
    first = api.post(f"/v1/assets/{asset_id}/promote", json=body, headers={"Idempotency-Key": "before-engines"})
    assert first.status_code == 202, first.text
    shown = first.json()["cost"]["engines"]
    assert shown == [{"engine": "fake-paid", "estimated": PRICE, "held": PRICE, "charged": 0, "released": 0}]
    db = Database(paid_settings.resolved_database_url)
    try:
        with db.transaction() as s:
            row = s.exec(select(IdempotencyKey).where(IdempotencyKey.key == "before-engines")).one()
            assert row.response is not None
            cost = {k: v for k, v in row.response["cost"].items() if k != "engines"}
            row.response = {**row.response, "cost": cost}  # as the earlier release stored it
            s.add(row)
    finally:
        db.dispose()
    replayed = api.post(f"/v1/assets/{asset_id}/promote", json=body, headers={"Idempotency-Key": "before-engines"})
    assert replayed.status_code == 202 and replayed.headers.get("idempotent-replayed") == "true"
    assert replayed.json()["cost"] == first.json()["cost"]
    assert api.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 202
    wait_for_job(api, first.json()["id"])


def test_a_replay_of_a_copy_stored_before_cost_engines_lists_nothing(api: httpx.Client,
                                                                     paid_settings: Settings) -> None:
    """A cache hit's answer stored without `engines` held nothing: replayed, it lists nothing."""
    from sqlmodel import select

    from orchestrator.db import Database
    from orchestrator.models import IdempotencyKey

    _, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    body = {"engine": "fake-paid", "seed": 4, "cache": True}
    wait_for_job(api, promote_ok(api, asset_id, **body)["id"])
    first = api.post(f"/v1/assets/{asset_id}/promote", json=body, headers={"Idempotency-Key": "copy-before"})
    assert first.status_code == 202 and first.json()["cost"]["cache_hit"], first.text
    db = Database(paid_settings.resolved_database_url)
    try:
        with db.transaction() as s:
            row = s.exec(select(IdempotencyKey).where(IdempotencyKey.key == "copy-before")).one()
            assert row.response is not None
            row.response = {**row.response, "cost": {k: v for k, v in row.response["cost"].items()
                                                     if k != "engines"}}
            s.add(row)
    finally:
        db.dispose()
    replayed = api.post(f"/v1/assets/{asset_id}/promote", json=body, headers={"Idempotency-Key": "copy-before"})
    assert replayed.json()["cost"] == first.json()["cost"] == {
        "estimated": PRICE, "held": 0, "charged": 0, "cache_hit": True, "engines": []}


def test_a_cloud_engine_priced_0_lists_its_hold_in_the_first_answer_as_every_read_does(
        api: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cloud engine priced 0 still holds 0 credits (`Ledger.hold`, `billable`), which GET and the
    job list show in `cost.engines`: the 202 (and its replay) listed nothing for it."""
    from orchestrator import routing

    real = routing.priced
    monkeypatch.setattr(routing, "priced", lambda engine, req: 0 if engine.name == "fake-paid" else real(engine, req))
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    body = {"engine": "fake-paid", "cache": False, "seed": 4, "tags": {"fake": "wait-before-send",
                                                                       "until": "/nonexistent/never"}}
    first = api.post(f"/v1/assets/{asset_id}/promote", json=body, headers={"Idempotency-Key": "priced-0"})
    assert first.status_code == 202, first.text
    job = first.json()
    held = [{"engine": "fake-paid", "estimated": 0, "held": 0, "charged": 0, "released": 0}]
    assert job["cost"]["estimated"] == 0 and job["cost"]["engines"] == held
    assert get_json(api, f"/v1/jobs/{job['id']}")["cost"] == job["cost"]
    listed = [j for j in jobs_of(api, project_id) if j["id"] == job["id"]]
    assert [j["cost"] for j in listed] == [job["cost"]]
    replayed = api.post(f"/v1/assets/{asset_id}/promote", json=body, headers={"Idempotency-Key": "priced-0"})
    assert replayed.headers.get("idempotent-replayed") == "true" and replayed.json()["cost"] == job["cost"]
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    wait_for_job(api, job["id"])
