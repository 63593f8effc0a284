"""Falling back to the next candidate when an engine fails, through the REST API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
from PIL import Image
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import ORMExecuteState
from sqlmodel import Session as SqlSession
from sqlmodel import col, select

from orchestrator.clock import utcnow
from orchestrator.errors import ContentUnavailable
from orchestrator.health import EngineHealth
from orchestrator.jobs import JobService
from orchestrator.ledger import Ledger
from orchestrator.models import Asset, Job, LedgerEntry, Project
from orchestrator.runner import JobRunner
from orchestrator.schemas import PolishCreate, PromoteCreate
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests import fakes
from tests.api import read_events
from tests.credits import assert_settled_once
from tests.credits.test_views_agree import all_agree
from tests.routing import assert_error, ledger, poll, promote, run_draft, wait_for_job
from tests.routing.conftest import (
    FAKE_ENGINES,
    FALLBACK_POLICY,
    SettingsFactory,
    routing_policy,
    running,
    write_policies,
)

SOFT_BUDGET_POLICY = routing_policy(
    "soft-budget-test", ["fake-paid", "local-hifi"], soft=("soft", 0.8, ["local-hifi"]),
    description="As fallback-test, but local once 80% of the budget is used.")

CLIENT_PRIVATE_POLICY = """
name = "client-private-test"
description = "One client's work stays on this machine, by a rule rather than a tag."

[[rules]]
name = "drafts"
match = { stage = "ideation" }
engines = ["lite"]

[[rules]]
name = "acme"
match = { stage = ["bridge", "polish"], tags = { client = "acme" } }
engines = ["fake-paid", "local-hifi"]
private = true

[[rules]]
name = "paid"
match = { stage = ["bridge", "polish"] }
engines = ["fake-paid", "local-hifi"]
"""

MIB_BYTES = 1024 * 1024

PAID_ONLY_POLICY = FALLBACK_POLICY.replace('"fallback-test"', '"paid-only-test"').replace(
    '"fake-b", "local-hifi"]', '"fake-b"]')


@pytest.fixture(scope="module")
def paid_server(new_settings: SettingsFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A service that knows fake-paid (10 credits) and fake-b (20 credits); new projects use the
    `fallback-test` policy. Its tests share it, so its circuit breaker never opens (threshold
    1000): one test's failures must not change another's routing."""
    folder = write_policies(tmp_path_factory.mktemp("policies"), {"fallback-test": FALLBACK_POLICY,
                                                                   "soft-budget-test": SOFT_BUDGET_POLICY,
                                                                   "client-private-test": CLIENT_PRIVATE_POLICY,
                                                                   "paid-only-test": PAID_ONLY_POLICY,
                                                                   "budget-first-test": BUDGET_FIRST_POLICY})
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("orchestrator.services.EngineHealth", functools.partial(EngineHealth, threshold=1000))
        with running(settings) as client:
            yield client


def hold_after_the_routing_look(project_id: str, amount: int) -> tuple[Any, list[str]]:
    """`JobRunner._routing_now` followed, at its first call, by a hold of `amount` millicredits on
    the project (another client's work, held after the fallback's look); and the list its call fills."""
    looked = JobRunner._routing_now
    held: list[str] = []

    def look_then_another_request_holds(self: JobRunner, *args: Any) -> Any:
        routing = looked(self, *args)
        if not held:
            held.append(project_id)
            with self.db.transaction() as s:
                s.add(LedgerEntry(project_id=project_id, kind="hold", amount=amount, created_at=utcnow()))
        return routing

    return look_then_another_request_holds, held


def draft_asset(client: httpx.Client, **project: Any) -> tuple[str, str]:
    """(project id, asset id) of a fresh project's one draft."""
    response = client.post("/v1/projects", json={"name": "fallback", **project})
    assert response.status_code == 201, response.text
    project_id = response.json()["id"]
    return project_id, run_draft(client, project_id)["assets"][0]


def kinds(entries: list[dict[str, Any]]) -> list[tuple[str, float, str | None]]:
    return [(e["kind"], e["amount"], e["engine"]) for e in entries]


def test_a_fallback_copies_an_identical_earlier_job_s_images_on_the_next_engine(paid_server: httpx.Client) -> None:
    # The cache was looked up only as the request was routed: falling back to fake-b, the job paid
    # fake-b again for the images an identical request had bought there.
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 100, "period": "month"})
    bought = wait_for_job(paid_server, promote(paid_server, asset_id, engine="fake-b", cache=True, seed=3)["id"])
    assert (bought["status"], bought["engine"], bought["cost"]["cache_hit"]) == ("succeeded", "fake-b", False)
    job = promote(paid_server, asset_id, cache=True, seed=3, tags={"fake": "fail"})
    assert job["engine"] == "fake-paid"
    done = wait_for_job(paid_server, job["id"])
    assert (done["status"], done["engine"], done["cost"]["cache_hit"]) == ("succeeded", "fake-b", True), done
    assert [a["engine"] for a in done["attempts"]] == ["fake-paid", "fake-b"]
    assert done["cost"]["charged"] == 0 and done["cost"]["held"] == 0
    assert kinds(ledger(paid_server, project_id, job["id"])) == [("hold", 10.0, "fake-paid"),
                                                                  ("release", 10.0, "fake-paid")]
    assert len(done["assets"]) == 1 and done["assets"] != bought["assets"]
    copy, original = (paid_server.get(f"/v1/assets/{a}").json() for a in (done["assets"][0], bought["assets"][0]))
    assert copy["sha256"] == original["sha256"] and copy["parent_id"] == asset_id
    told = [(e.event, e.data.get("state"), e.data.get("cache_hit")) for e in read_events(paid_server, job["id"])
            if e.event != "progress"]
    assert told[-5:] == [("state", "fallback", True), ("queued", None, None), ("started", None, True),
                         ("asset", None, None), ("succeeded", None, True)], told
    # Asked not to be copied, it renders there.
    fresh = wait_for_job(paid_server, promote(paid_server, asset_id, seed=3, tags={"fake": "fail"})["id"])
    assert (fresh["engine"], fresh["cost"]["cache_hit"], fresh["cost"]["charged"]) == ("fake-b", False, 20.0)


def test_a_job_made_private_as_it_fails_takes_no_copy_of_a_cloud_engine_s_images(
        paid_server: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its project moved to local-only while it ran: the copy wrote the claim's params back over the
    # privacy mark, and the job ended as fake-b's, its images free to go to the cloud next.
    _, asset_id = draft_asset(paid_server, budget={"limit": 100, "period": "month"})
    bought = wait_for_job(paid_server, promote(paid_server, asset_id, engine="fake-b", cache=True, seed=4)["id"])
    assert bought["status"] == "succeeded", bought
    copy_on = JobRunner._copy_on

    def made_private_first(self: JobRunner, claim: Any, *args: Any) -> Any:
        with self.db.transaction() as s:  # as `JobService.keep_local` marks it
            row = s.get(Job, claim.job.id)
            assert row is not None
            row.params = {**row.params, "tags": {**row.params["tags"], "privacy": "local"}}
            s.add(row)
        return copy_on(self, claim, *args)

    monkeypatch.setattr(JobRunner, "_copy_on", made_private_first)
    done = wait_for_job(paid_server, promote(paid_server, asset_id, cache=True, seed=4, tags={"fake": "fail"})["id"])
    assert (done["status"], done["engine"], done["cost"]["cache_hit"]) == ("succeeded", "local-hifi", False), done
    assert done["params"]["tags"]["privacy"] == "local"


def test_retryable_failure_falls_back_to_the_next_candidate(paid_server: httpx.Client,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 100, "period": "month"})
    job = promote(paid_server, asset_id, tags={"fake": "fail"})
    assert job["engine"] == "fake-paid"
    assert [c["engine"] for c in job["routing"]["candidates"]] == ["fake-paid", "fake-b", "local-hifi"]

    with caplog.at_level(logging.WARNING, logger="orchestrator.runner"):
        done = wait_for_job(paid_server, job["id"])
    # The operator's log says why (it named only the engine that made the image).
    assert any(r.getMessage().startswith(f"job {job['id']}: fake-paid failed (engine_error: ")
               and r.getMessage().endswith("it moves to fake-b") for r in caplog.records), caplog.text
    assert done["status"] == "succeeded", done["error"]
    assert done["engine"] == "fake-b"
    assert done["error"] is None
    assert len(done["attempts"]) == 2
    failed, succeeded = done["attempts"]
    assert failed["engine"] == "fake-paid" and failed["status"] == "failed"
    assert failed["error"]["code"] == "engine_error" and "fake engine failed" in failed["error"]["message"]
    assert succeeded == {"engine": "fake-b", "status": "succeeded", "error": None}
    assert done["cost"]["estimated"] == 20.0
    assert done["cost"]["charged"] == 20.0 and done["cost"]["held"] == 0
    # The routing decision recorded at submission stays as it was.
    assert done["routing"] == job["routing"]

    asset = paid_server.get(f"/v1/assets/{done['assets'][0]}").json()
    assert asset["engine"] == "fake-b" and asset["parent_id"] == asset_id

    entries = ledger(paid_server, project_id, job["id"])
    assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"),
                              ("hold", 20.0, "fake-b"), ("capture", 20.0, "fake-b")]
    first_hold, release, second_hold, capture = entries
    assert all(isinstance(e["id"], str) for e in entries)  # ids are opaque strings (API.md)
    assert release["hold_id"] == first_hold["id"]
    assert capture["hold_id"] == second_hold["id"]
    assert not capture["unreconciled"]
    budget = paid_server.get(f"/v1/projects/{project_id}/budget").json()
    assert (budget["charged"], budget["held"], budget["available"]) == (20.0, 0, 80.0)
    # The stream tells it queued again between the two starts (it told it started until the next).
    told = [(e.event, e.data.get("state"), e.data.get("attempt"), e.data.get("requeued"))
            for e in read_events(paid_server, job["id"]) if e.event in ("queued", "started", "state")]
    assert [t for t in told if t[1] in (None, "fallback")] == [
        ("queued", None, None, None), ("started", None, 1, None), ("state", "fallback", None, None),
        ("queued", None, 1, True), ("started", None, 2, None)], told


def test_a_fallback_looks_at_the_next_engine_off_the_event_loop(paid_server: httpx.Client) -> None:
    # A plugin's availability() that asked its server for 8 s held every request of the service
    # (healthz waited 7.98 s) when a job fell back onto it; on the submit path it runs in a thread.
    _, asset_id = draft_asset(paid_server)
    fakes.ON_THE_LOOP.clear()
    job = promote(paid_server, asset_id, tags={"fake": "fail"})
    done = wait_for_job(paid_server, job["id"])
    assert done["status"] == "succeeded" and done["engine"] == "fake-b", done["error"]
    assert fakes.ON_THE_LOOP == []


def test_a_job_whose_engine_became_unavailable_while_it_waited_moves_on_unsent(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Routed while fake-paid was available, claimed after it was not (its key refused since, its
    # model past its shut-down date, a plugin's server gone): it was sent there all the same.
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)
    with running(settings) as client:
        project_id, asset_id = draft_asset(client, budget={"limit": 100, "period": "month"})
    with running(settings.model_copy(update={"run_jobs": False})) as client:
        routed = promote(client, asset_id)
        named = promote(client, asset_id, engine="fake-paid")  # asked for by name: no candidate after it
    assert routed["engine"] == named["engine"] == "fake-paid"
    sent: list[str] = []
    run = fakes.FakePaidEngine.run

    async def recorded(self: fakes.FakePaidEngine, *args: Any) -> Any:
        sent.append(self.name)
        return await run(self, *args)

    monkeypatch.setattr(fakes.FakePaidEngine, "run", recorded)
    monkeypatch.setattr(fakes.FakePaidEngine, "availability",
                        lambda self: (False, "its key was refused") if self.name == "fake-paid" else (True, None))
    with running(settings) as client:
        moved, failed = (wait_for_job(client, job["id"]) for job in (routed, named))
        assert (moved["status"], moved["engine"]) == ("succeeded", "fake-b"), moved
        assert moved["attempts"][0]["engine"] == "fake-paid"
        assert moved["attempts"][0]["error"]["code"] == "engine_unavailable"
        assert "its key was refused" in moved["attempts"][0]["error"]["message"]
        assert (failed["status"], failed["error"]["code"]) == ("failed", "engine_unavailable"), failed
        assert failed["error"]["details"]["started"] is False
        assert failed["cost"]["charged"] == 0 and failed["cost"]["held"] == 0
        assert kinds(ledger(client, project_id, routed["id"])) == [
            ("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"), ("hold", 20.0, "fake-b"),
            ("capture", 20.0, "fake-b")]
        assert kinds(ledger(client, project_id, named["id"])) == [("hold", 10.0, "fake-paid"),
                                                                  ("release", 10.0, "fake-paid")]
        # Not failures of the engine's: its circuit breaker counts neither.
        assert next(e for e in client.get("/v1/engines").json() if e["name"] == "fake-paid")["health"] == "ok"
    assert sent == ["fake-b"]


def test_fallback_runs_down_the_whole_list(paid_server: httpx.Client) -> None:
    project_id, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, tags={"fake": "fail", "fake-b": "fail"})
    done = wait_for_job(paid_server, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["engine"] == "local-hifi"
    assert [(a["engine"], a["status"]) for a in done["attempts"]] == [
        ("fake-paid", "failed"), ("fake-b", "failed"), ("local-hifi", "succeeded")]
    assert done["cost"]["charged"] == 0
    entries = ledger(paid_server, project_id, job["id"])
    assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"),
                              ("hold", 20.0, "fake-b"), ("release", 20.0, "fake-b")]


def test_content_filtered_does_not_fall_back(paid_server: httpx.Client) -> None:
    project_id, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, tags={"fake": "filtered"})
    done = wait_for_job(paid_server, job["id"])
    assert done["status"] == "failed"
    assert done["engine"] == "fake-paid"
    assert done["error"]["code"] == "content_filtered"
    assert [(a["engine"], a["status"]) for a in done["attempts"]] == [("fake-paid", "failed")]
    assert done["attempts"][0]["error"]["code"] == "content_filtered"
    assert done["assets"] == []
    assert kinds(ledger(paid_server, project_id, job["id"])) == [("hold", 10.0, "fake-paid"),
                                                                  ("release", 10.0, "fake-paid")]


def test_an_answered_call_short_of_images_is_charged_not_repeated(paid_server: httpx.Client) -> None:
    # The provider answered (and may have billed): falling back would pay a second engine, and
    # releasing the hold would hide the first charge.
    project_id, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, tags={"fake": "short"})
    done = wait_for_job(paid_server, job["id"])
    assert done["status"] == "failed"
    assert "returned 0 of 1 images" in done["error"]["message"]
    assert [(a["engine"], a["status"]) for a in done["attempts"]] == [("fake-paid", "failed")]
    entries = ledger(paid_server, project_id, job["id"])
    assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("capture", 10.0, "fake-paid")]
    assert entries[1]["unreconciled"]


def test_images_beyond_the_n_asked_for_are_not_stored(paid_server: httpx.Client) -> None:
    _project_id, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, tags={"fake": "extra"})  # a promote makes one image
    done = wait_for_job(paid_server, job["id"])
    assert done["status"] == "succeeded" and len(done["assets"]) == 1


@pytest.mark.parametrize(("behaviour", "stored"), [("long-model", "m" * 300), ("no-model", "unknown"),
                                                  ("unstorable-text", "fake\ufffdone\ufffd")])
def test_a_model_name_the_column_cannot_hold_is_mended_not_a_lost_job(paid_server: httpx.Client, behaviour: str,
                                                                      stored: str) -> None:
    _project_id, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, tags={"fake": behaviour})
    done = wait_for_job(paid_server, job["id"])
    assert done["status"] == "succeeded", done
    assert done["model"] == stored
    asset = paid_server.get(f"/v1/assets/{done['assets'][0]}").json()
    assert asset["model"] == stored
    assert "\x00" not in (done["provider_request_id"] or "")
    if behaviour == "unstorable-text":  # and what it says it used: a lone surrogate failed the write anywhere
        assert asset["negative_prompt"] == "blurry\ufffdugly\ufffd"
        assert (asset["record"]["sampler"], asset["record"]["notes"]) == ("euler\ufffd", ["a\ufffdnote"])


def test_each_image_s_finish_reason_is_in_its_record(paid_server: httpx.Client) -> None:
    # Stability's `finish_reason` (Gemini's `finishReason`) stayed in the engine's result: neither
    # the PNG's record nor the asset's said that an image was, say, filtered (blurred).
    _project_id, asset_id = draft_asset(paid_server)
    done = wait_for_job(paid_server, promote(paid_server, asset_id, tags={"fake": "finish-reasons"})["id"])
    assert done["status"] == "succeeded", done
    asset = paid_server.get(f"/v1/assets/{done['assets'][0]}").json()
    assert asset["record"]["finish_reason"] == "x" * 100  # cut as the record keeps it
    with Image.open(io.BytesIO(paid_server.get(f"/v1/assets/{asset['id']}/content").content)) as img:
        assert json.loads(img.info["orchestrator"])["finish_reason"] == "x" * 100
    # An engine that says none: the record is as before, without the key.
    plain = wait_for_job(paid_server, promote(paid_server, asset_id)["id"])
    assert "finish_reason" not in paid_server.get(f"/v1/assets/{plain['assets'][0]}").json()["record"]


def test_an_image_smaller_than_asked_is_kept_as_made_and_says_so(paid_server: httpx.Client) -> None:
    """fal and Replicate answer images of their own size, and were stored smaller than the size paid
    for without a word but the asset's `width`."""
    _project_id, asset_id = draft_asset(paid_server)
    source = paid_server.get(f"/v1/assets/{asset_id}").json()
    done = wait_for_job(paid_server, promote(paid_server, asset_id, tags={"fake": "smaller"})["id"])
    assert done["status"] == "succeeded", done
    asset = paid_server.get(f"/v1/assets/{done['assets'][0]}").json()
    made = (source["width"] // 2, source["height"])
    assert (asset["width"], asset["height"]) == made and done["cost"]["charged"] == 10.0
    assert asset["record"]["notes"] == [f"the engine made {made[0]}x{made[1]}, narrower than the "
                                        f"{source['width']}x{source['height']} asked"]
    exact = wait_for_job(paid_server, promote(paid_server, asset_id)["id"])
    assert "notes" not in paid_server.get(f"/v1/assets/{exact['assets'][0]}").json()["record"]


def test_a_seed_no_job_could_ask_for_is_not_stored_and_the_images_are_kept(paid_server: httpx.Client) -> None:
    # A plugin's 2**64 failed the asset's 64-bit column after the images were made and paid for.
    _project_id, asset_id = draft_asset(paid_server)
    done = wait_for_job(paid_server, promote(paid_server, asset_id, tags={"fake": "huge-seed"})["id"])
    assert done["status"] == "succeeded", done
    asset = paid_server.get(f"/v1/assets/{done['assets'][0]}").json()
    assert asset["seed"] is None


def test_max_credits_bounds_the_fallbacks_too(paid_server: httpx.Client) -> None:
    # fake-paid (10) fails; fake-b (20) is above the client's cap of 15, so local-hifi runs instead.
    project_id, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, tags={"fake": "fail"}, max_credits=15)
    skipped = {c["engine"]: c["skipped"] for c in job["routing"]["candidates"]}
    assert skipped == {"fake-paid": None, "fake-b": "estimate above max_credits (15.0)", "local-hifi": None}
    done = wait_for_job(paid_server, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert [(a["engine"], a["status"]) for a in done["attempts"]] == [
        ("fake-paid", "failed"), ("local-hifi", "succeeded")]
    assert kinds(ledger(paid_server, project_id, job["id"])) == [("hold", 10.0, "fake-paid"),
                                                                  ("release", 10.0, "fake-paid")]


def test_a_fallback_priced_above_the_cap_since_routing_is_skipped(paid_server: httpx.Client,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The caps were checked on the estimates routing recorded; a process pricing an engine higher
    (another prices file on a worker) must not hold, and charge, past them."""
    from orchestrator import runner as runner_module

    real = runner_module.priced  # type: ignore[attr-defined]
    monkeypatch.setattr(runner_module, "priced",
                        lambda engine, req: 30_000 if engine.name == "fake-b" else real(engine, req))
    project_id, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, tags={"fake": "fail"}, max_credits=25)
    assert {c["engine"]: c["estimate"] for c in job["routing"]["candidates"]}["fake-b"] == 20.0
    done = wait_for_job(paid_server, job["id"])
    assert [(a["engine"], a["status"]) for a in done["attempts"]] == [
        ("fake-paid", "failed"), ("local-hifi", "succeeded")]
    assert kinds(ledger(paid_server, project_id, job["id"])) == [("hold", 10.0, "fake-paid"),
                                                                  ("release", 10.0, "fake-paid")]


@pytest.mark.parametrize(("max_credits", "cap"), [(None, None), (25, 25.0)])
def test_a_fallback_whose_price_rose_within_the_caps_is_tried_at_its_new_price(
        paid_server: httpx.Client, monkeypatch: pytest.MonkeyPatch, max_credits: int | None,
        cap: float | None) -> None:
    """A recorded estimate is not a quote: with no cap (or one it still fits), a fallback whose
    price rose since routing (20 -> 22) is held at today's price. It was skipped, and the job failed
    where a fallback was configured to save it."""
    from orchestrator import runner as runner_module

    real = runner_module.priced  # type: ignore[attr-defined]
    monkeypatch.setattr(runner_module, "priced",
                        lambda engine, req: 22_000 if engine.name == "fake-b" else real(engine, req))
    project_id, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, tags={"fake": "fail"},
                  **({} if max_credits is None else {"max_credits": max_credits}))
    assert job["routing"]["max_credits"] == cap
    done = wait_for_job(paid_server, job["id"])
    assert [(a["engine"], a["status"]) for a in done["attempts"]] == [
        ("fake-paid", "failed"), ("fake-b", "succeeded")]
    assert done["cost"]["estimated"] == done["cost"]["charged"] == 22
    assert kinds(ledger(paid_server, project_id, job["id"])) == [
        ("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"), ("hold", 22.0, "fake-b"),
        ("capture", 22.0, "fake-b")]


def test_a_budget_too_small_for_the_first_candidate_routes_to_one_it_can_hold(paid_server: httpx.Client) -> None:
    # 5 credits left: fake-paid (10) and fake-b (20) cannot be held, local-hifi (free) can. Once
    # this answered 402, while route/explain named fake-paid.
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 5, "period": "month"})
    explained = paid_server.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id})
    assert explained.status_code == 200 and explained.json()["engine"] == "local-hifi"
    job = promote(paid_server, asset_id)
    assert job["engine"] == "local-hifi" and job["cost"]["estimated"] == 0
    skipped = {c["engine"]: c["skipped"] for c in job["routing"]["candidates"]}
    assert skipped["fake-paid"] == skipped["fake-b"] == "does not fit the budget (5.0 credits available)"
    # The record says why, and lists what a fallback may use first.
    assert [c["engine"] for c in job["routing"]["candidates"]] == ["local-hifi", "fake-paid", "fake-b"]
    assert job["routing"]["reason"] == "the first candidate the project's budget can hold (5.0 credits available)"
    assert wait_for_job(paid_server, job["id"])["status"] == "succeeded"
    assert ledger(paid_server, project_id, job["id"]) == []


BUDGET_ORDER_POLICY = routing_policy("budget-order-test", ["fake-b", "fake-paid", "paid-drafts", "local-hifi"])


def test_a_candidate_after_the_budget_s_choice_is_left_to_the_fallback_s_own_look_at_the_budget(
        new_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 15 credits left, fake-b (20) is passed over for fake-paid (10) and said not to fit;
    paid-drafts (20), after the choice, stays unskipped: a fallback, priced and held to the budget
    when the job moves. The budget unchanged, the move skips both for money and says so (fake-b,
    the policy's first, looked at again first); with room made meanwhile (a grant), the job moves
    to fake-b, the policy's first choice, which the budget can hold now."""
    folder = write_policies(tmp_path / "policies", {"budget-order-test": BUDGET_ORDER_POLICY})
    with running(new_settings(engines=f"{FAKE_ENGINES},paid-drafts=tests.routing:paid_drafts_factory",
                              policy="budget-order-test", policy_dir=folder)) as client:
        project_id, asset_id = draft_asset(client, budget={"limit": 15, "period": "month"})
        explained = client.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id})
        job = promote(client, asset_id, tags={"fake": "fail"})
        for routing in (explained.json()["routing"], job["routing"]):
            assert (routing["chosen"], routing["estimate"]) == ("fake-paid", 10.0)
            assert [(c["engine"], c["estimate"], c["skipped"]) for c in routing["candidates"]] == [
                ("fake-paid", 10.0, None), ("paid-drafts", 20.0, None), ("local-hifi", 0.0, None),
                ("fake-b", 20.0, "does not fit the budget (15.0 credits available)")]
        moved = [e.data for e in read_events(client, job["id"]) if e.data.get("state") == "fallback"]
        done = wait_for_job(client, job["id"])
        assert [(a["engine"], a["status"]) for a in done["attempts"]] == [
            ("fake-paid", "failed"), ("local-hifi", "succeeded")]
        assert [(m["to"], m["skipped"]) for m in moved] == [
            ("local-hifi", [{"engine": "fake-b", "reason": "budget", "estimate": 20.0},
                            {"engine": "paid-drafts", "reason": "budget", "estimate": 20.0}])]
        assert kinds(ledger(client, project_id, job["id"])) == [("hold", 10.0, "fake-paid"),
                                                                ("release", 10.0, "fake-paid")]

        fall_back = JobRunner._fall_back

        async def grant_first(self: JobRunner, claim: Any, error: Any) -> bool:
            with self.db.transaction() as s:
                s.add(LedgerEntry(project_id=claim.job.project_id, kind="grant", amount=10_000, created_at=utcnow()))
            return await fall_back(self, claim, error)

        monkeypatch.setattr(JobRunner, "_fall_back", grant_first)
        job = promote(client, asset_id, tags={"fake": "fail"})
        assert [c["engine"] for c in job["routing"]["candidates"] if c["skipped"] is None] == [
            "fake-paid", "paid-drafts", "local-hifi"]
        done = wait_for_job(client, job["id"])
        assert [(a["engine"], a["status"]) for a in done["attempts"]] == [
            ("fake-paid", "failed"), ("fake-b", "succeeded")]
        assert done["cost"]["charged"] == 20.0
        assert kinds(ledger(client, project_id, job["id"])) == [
            ("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"), ("hold", 20.0, "fake-b"),
            ("capture", 20.0, "fake-b")]


BUDGET_FIRST_POLICY = routing_policy("budget-first-test", ["fake-b", "fake-paid", "local-hifi"])


def test_a_candidate_skipped_for_the_budget_is_tried_at_fallback_once_it_fits(paid_server: httpx.Client,
                                                                              tmp_path: Path) -> None:
    """fake-b (20), the policy's first, does not fit a budget of 15: the job goes to fake-paid (10).
    The studio raises the limit to 40 while it waits; fake-paid then fails unsent. The fallback
    took local-hifi: a candidate skipped for the budget was never looked at again. Now fake-b is,
    with a hold of its own: fake-paid's hold released once, fake-b's held and captured once."""
    project_id, asset_id = draft_asset(paid_server, policy="budget-first-test", budget={"limit": 15, "period": "month"})
    go = tmp_path / "go"
    job = promote(paid_server, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
    assert (job["engine"], job["cost"]["estimated"]) == ("fake-paid", 10.0)
    assert [(c["engine"], c["skipped"]) for c in job["routing"]["candidates"]] == [
        ("fake-paid", None), ("local-hifi", None), ("fake-b", "does not fit the budget (15.0 credits available)")]
    assert paid_server.patch(f"/v1/projects/{project_id}", json={"budget": {"limit": 40}}).status_code == 200
    go.touch()
    done = wait_for_job(paid_server, job["id"])
    assert (done["status"], done["engine"]) == ("succeeded", "fake-b"), done
    assert [(a["engine"], a["status"]) for a in done["attempts"]] == [("fake-paid", "failed"), ("fake-b", "succeeded")]
    assert (done["cost"]["estimated"], done["cost"]["held"], done["cost"]["charged"]) == (20.0, 0, 20.0)
    entries = ledger(paid_server, project_id, job["id"])
    assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"),
                              ("hold", 20.0, "fake-b"), ("capture", 20.0, "fake-b")]
    assert_settled_once(entries)
    budget = paid_server.get(f"/v1/projects/{project_id}/budget").json()
    assert (budget["charged"], budget["held"], budget["available"]) == (20.0, 0, 20.0)
    moved = [e.data for e in read_events(paid_server, job["id"]) if e.data.get("state") == "fallback"]
    assert [(m["from"], m["to"], m["estimate"], m.get("skipped")) for m in moved] == [
        ("fake-paid", "fake-b", 20.0, None)]


def test_a_candidate_skipped_for_the_budget_that_still_does_not_fit_is_skipped_again(
        paid_server: httpx.Client) -> None:
    """fake-paid's hold released, 15 credits are available: fake-b (20) is looked at again and
    still does not fit. Nothing is written for it (its hold refused with the move, in one
    transaction), the skip is said, and the job goes on to local-hifi; fake-paid's hold is
    released exactly once."""
    project_id, asset_id = draft_asset(paid_server, policy="budget-first-test", budget={"limit": 15, "period": "month"})
    job = promote(paid_server, asset_id, tags={"fake": "fail"})
    assert job["engine"] == "fake-paid"
    moved = [e.data for e in read_events(paid_server, job["id"]) if e.data.get("state") == "fallback"]
    done = wait_for_job(paid_server, job["id"])
    assert (done["status"], done["engine"]) == ("succeeded", "local-hifi"), done
    assert [(m["to"], m.get("skipped")) for m in moved] == [
        ("local-hifi", [{"engine": "fake-b", "reason": "budget", "estimate": 20.0}])]
    entries = ledger(paid_server, project_id, job["id"])
    assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid")]
    assert_settled_once(entries)
    assert (done["cost"]["held"], done["cost"]["charged"]) == (0, 0)
    budget = paid_server.get(f"/v1/projects/{project_id}/budget").json()
    assert (budget["charged"], budget["held"], budget["available"]) == (0, 0, 15.0)


def _by_engine(job: dict[str, Any]) -> list[tuple[str, float, float, float, float]]:
    return [(c["engine"], c["estimated"], c["held"], c["charged"], c["released"]) for c in job["cost"]["engines"]]


def check_every_view_agrees_with_the_jobs_after_fallbacks(client: httpx.Client, folder: Path) -> None:
    """Jobs that fell back, each held (and maybe charged) by more than one engine: their `cost`
    showed the last engine's estimate and nothing of the others' holds, releases or charges. Each
    job's `cost.engines` says them, in the order it was tried, and they add up to its `held` and
    `charged`; the spend report, /metrics and the budgets agree with them to the thousandth, while
    a fallback's hold is open and after every job ended and an unknown outcome was reconciled.
    `client`: a fresh service (the views count every project) with FAKE_ENGINES, the fallback-test
    and budget-first-test policies, and metered local work."""
    tight, tight_asset = draft_asset(client, policy="budget-first-test")
    roomy, asset = draft_asset(client, policy="fallback-test", budget={"limit": 200, "period": "none"})
    # 15 credits left after its metered draft (a second of a loaded machine's device time is 1.5).
    drafted = client.get(f"/v1/projects/{tight}/budget").json()["charged"]
    budget = {"limit": round(drafted + 15, 3), "period": "month"}
    assert client.patch(f"/v1/projects/{tight}", json={"budget": budget}).status_code == 200
    # fake-b skipped for the budget, then taken by the fallback once the limit was raised.
    first = promote(client, tight_asset, tags={"fake": "wait-before-send", "until": str(folder / "first"),
                                               "then": "fail"})
    assert first["engine"] == "fake-paid"
    budget = {"limit": round(drafted + 40, 3)}
    assert client.patch(f"/v1/projects/{tight}", json={"budget": budget}).status_code == 200
    (folder / "first").touch()
    # Moved to fake-b, which reports 21.5 (over its 20 held).
    reported = promote(client, asset, tags={"fake": "fail", "cost": "21.5"})
    # Moved to fake-b, whose outcome is unknown: its estimate is captured, to be reconciled.
    unknown = promote(client, asset, tags={"fake": "fail", "fake-b": "timeout"})
    # Moved twice, to local-hifi, whose device time is metered.
    twice = promote(client, asset, tags={"fake": "fail", "fake-b": "fail"})
    # Moved to fake-b, held there while the views are read.
    waiting = promote(client, asset, tags={"fake": "fail", "fake-b": "wait-before-send",
                                           "until": str(folder / "last")})
    done = {job["id"]: wait_for_job(client, job["id"]) for job in (first, reported, unknown, twice)}
    moved = poll(lambda: (j := client.get(f"/v1/jobs/{waiting['id']}").json())["engine"] == "fake-b" and j,
                 what="the move to fake-b")
    released = ("fake-paid", 10.0, 0, 0, 10.0)
    assert _by_engine(done[first["id"]]) == [released, ("fake-b", 20.0, 0, 20.0, 0)]
    assert _by_engine(done[reported["id"]]) == [released, ("fake-b", 20.0, 0, 21.5, 0)]
    assert (done[reported["id"]]["cost"]["estimated"], done[reported["id"]]["cost"]["charged"]) == (20.0, 21.5)
    assert done[unknown["id"]]["status"] == "failed"
    assert _by_engine(done[unknown["id"]]) == [released, ("fake-b", 20.0, 0, 20.0, 0)]
    assert done[twice["id"]]["engine"] == "local-hifi"
    (paid, failed, metered) = _by_engine(done[twice["id"]])
    assert (paid, failed, metered[:3], metered[4]) == (released, ("fake-b", 20.0, 0, 0, 20.0),
                                                       ("local-hifi", 0, 0), 0)
    assert metered[3] > 0 and done[twice["id"]]["cost"]["charged"] == metered[3]
    assert _by_engine(moved) == [released, ("fake-b", 20.0, 20.0, 0, 0)] and moved["cost"]["held"] == 20.0
    all_agree(client, [tight, roomy])

    capture = next(e for e in ledger(client, roomy, unknown["id"]) if e["kind"] == "capture")
    assert client.post(f"/v1/projects/{roomy}/ledger/{capture['id']}/reconcile",
                       json={"charged": 12.5}).status_code == 201
    (folder / "last").touch()
    last = wait_for_job(client, waiting["id"])
    assert _by_engine(last) == [released, ("fake-b", 20.0, 0, 20.0, 0)]
    assert _by_engine(client.get(f"/v1/jobs/{unknown['id']}").json()) == [released, ("fake-b", 20.0, 0, 12.5, 0)]
    for job in (first, reported, unknown, twice, waiting):  # metered local work is charged without a hold
        assert_settled_once([e for e in ledger(client, tight if job is first else roomy, job["id"])
                             if e["kind"] != "capture" or e["hold_id"] is not None])
    all_agree(client, [tight, roomy])


def test_every_view_agrees_with_the_jobs_after_fallbacks(new_settings: SettingsFactory, tmp_path: Path) -> None:
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "budget-first-test": BUDGET_FIRST_POLICY})
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder,
                              local_gpu_second_credits=1.5)) as client:
        check_every_view_agrees_with_the_jobs_after_fallbacks(client, tmp_path)


def test_a_window_over_its_limit_is_said_so_where_the_choice_moved_for_the_budget(paid_server: httpx.Client) -> None:
    # It read "(0.0 credits available)", while the 402 for the same window said how far over it was.
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 15, "period": "month"})
    assert wait_for_job(paid_server, promote(paid_server, asset_id, engine="fake-paid")["id"])["status"] == "succeeded"
    assert paid_server.patch(f"/v1/projects/{project_id}", json={"budget": {"limit": 5}}).status_code == 200
    explained = paid_server.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id})
    assert explained.status_code == 200 and explained.json()["engine"] == "local-hifi"
    assert explained.json()["routing"]["reason"] == (
        "the first candidate the project's budget can hold (none available: 5.0 credits over the limit)")


def test_a_private_draft_keeps_its_promotion_local(paid_server: httpx.Client) -> None:
    # The draft was made with privacy=local: its promotion, though not tagged, must not become a
    # cloud engine's img2img seed.
    response = paid_server.post("/v1/projects", json={"name": "private"})
    project_id = response.json()["id"]
    draft = run_draft(paid_server, project_id, tags={"privacy": "local"})
    job = promote(paid_server, draft["assets"][0])
    assert job["engine"] == "local-hifi" and job["params"]["tags"]["privacy"] == "local"
    polished = wait_for_job(paid_server, job["id"])
    polish = paid_server.post(f"/v1/assets/{polished['assets'][0]}/polish", json={"scale": 1})
    assert polish.status_code == 202 and polish.json()["engine"] == "local-hifi"


def test_what_a_private_rule_made_stays_private(paid_server: httpx.Client) -> None:
    # The rule kept the promotion local; its image must not become a cloud engine's seed one step
    # later, when the polish (not tagged) matches another rule, or the project moves to a policy
    # that sends work out.
    project_id, asset_id = draft_asset(paid_server, policy="client-private-test")
    job = promote(paid_server, asset_id, tags={"client": "acme"})
    assert (job["engine"], job["routing"]["rule"], job["routing"]["private"]) == ("local-hifi", "acme", True)
    assert job["params"]["tags"] == {"client": "acme", "privacy": "local"}
    made = wait_for_job(paid_server, job["id"])["assets"][0]
    for policy in ("client-private-test", "fallback-test"):
        assert paid_server.patch(f"/v1/projects/{project_id}", json={"policy": policy}).status_code == 200
        polish = paid_server.post(f"/v1/assets/{made}/polish", json={"scale": 1})
        assert polish.status_code == 202, polish.text
        assert polish.json()["engine"] == "local-hifi", policy
        assert polish.json()["params"]["tags"]["privacy"] == "local"
    # Another client's work, and this draft (made by a rule that is not private), go to the cloud.
    other = promote(paid_server, asset_id, tags={"client": "other"})
    assert (other["engine"], other["routing"]["private"]) == ("fake-paid", False)
    assert "privacy" not in other["params"]["tags"]


def test_a_promotion_carries_its_draft_s_tags_to_the_rules(paid_server: httpx.Client) -> None:
    # The draft was tagged for acme, but made by a rule that is not private: its promotion, sent
    # without tags, is acme's work all the same, and acme's rule keeps it here.
    response = paid_server.post("/v1/projects", json={"name": "acme", "policy": "client-private-test"})
    asset_id = run_draft(paid_server, response.json()["id"], tags={"client": "acme", "shot": "12"})["assets"][0]
    job = promote(paid_server, asset_id)
    assert (job["engine"], job["routing"]["rule"], job["routing"]["private"]) == ("local-hifi", "acme", True)
    assert job["params"]["tags"] == {"client": "acme", "shot": "12", "privacy": "local"}
    # Explained as it is made, the privacy its rule adds included.
    explained = paid_server.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id,
                                                           "steps": 2, "cache": False})
    assert explained.status_code == 200 and explained.json()["params"]["tags"] == job["params"]["tags"]
    # The request's own tags win over what the draft passes on.
    other = promote(paid_server, asset_id, tags={"client": "other"})
    assert (other["engine"], other["routing"]["private"]) == ("fake-paid", False)
    assert other["params"]["tags"] == {"client": "other", "shot": "12"}
    # No more than a job may have, counted with what the draft passes on.
    many = {f"t{i}": "x" for i in range(63)}
    assert_error(paid_server.post(f"/v1/assets/{asset_id}/promote", json={"cache": False, "tags": many}),
                 422, "invalid_request")


def test_a_draft_of_64_tags_kept_local_can_still_be_promoted_and_polished(paid_server: httpx.Client) -> None:
    # The privacy tag the service adds made its job's tags 65, and every promotion of its images
    # was refused (at most 64), whatever the request said.
    project_id = paid_server.post("/v1/projects", json={"name": "many tags", "policy": "local-only"}).json()["id"]
    tags = {f"t{i}": "x" for i in range(64)}
    draft = run_draft(paid_server, project_id, tags=tags)
    asset_id = draft["assets"][0]
    assert paid_server.get(f"/v1/jobs/{draft['id']}").json()["params"]["tags"] == {**tags, "privacy": "local"}
    job = promote(paid_server, asset_id)
    assert job["params"]["tags"] == {**tags, "privacy": "local"}
    polish = paid_server.post(f"/v1/assets/{asset_id}/polish", json={"cache": False})
    assert polish.status_code == 202, polish.text
    # A 65th tag of its own is one too many still.
    assert_error(paid_server.post(f"/v1/assets/{asset_id}/promote", json={"cache": False, "tags": {"t64": "x"}}),
                 422, "invalid_request")


def test_drafts_made_under_local_only_stay_local_after_a_policy_change(paid_server: httpx.Client) -> None:
    project_id, asset_id = draft_asset(paid_server, policy="local-only")
    assert paid_server.patch(f"/v1/projects/{project_id}", json={"policy": "fallback-test"}).status_code == 200
    job = promote(paid_server, asset_id)
    assert job["engine"] == "local-hifi" and job["params"]["tags"] == {"privacy": "local"}
    assert job["routing"]["private"]


def test_requested_engine_has_no_fallback(paid_server: httpx.Client) -> None:
    _, asset_id = draft_asset(paid_server)
    job = promote(paid_server, asset_id, engine="fake-paid", tags={"fake": "fail"})
    assert [c["engine"] for c in job["routing"]["candidates"]] == ["fake-paid"]
    done = wait_for_job(paid_server, job["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "engine_error"
    assert [a["engine"] for a in done["attempts"]] == ["fake-paid"]


@pytest.fixture
def breaker_server(new_settings: SettingsFactory, fallback_policies: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    """The same service with a circuit that opens after two consecutive failures."""
    monkeypatch.setattr("orchestrator.services.EngineHealth", functools.partial(EngineHealth, threshold=2))
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        yield client


def health(client: httpx.Client) -> dict[str, str]:
    response = client.get("/v1/engines")
    assert response.status_code == 200
    return {e["name"]: e["health"] for e in response.json()}


def test_requests_too_large_for_an_engine_do_not_open_its_circuit(breaker_server: httpx.Client) -> None:
    # Out of memory says the request was too large, not that the engine is unwell: a few such
    # requests must not shut every project out of it for the cooldown.
    _, asset_id = draft_asset(breaker_server)
    for _ in range(3):  # the breaker opens after two failures here
        done = wait_for_job(breaker_server, promote(breaker_server, asset_id, tags={"fake": "too-large"})["id"])
        assert done["attempts"][0]["engine"] == "fake-paid"
    assert health(breaker_server)["fake-paid"] == "ok"


def test_circuit_breaker_shows_in_engines_and_routing(breaker_server: httpx.Client) -> None:
    client = breaker_server
    _, asset_id = draft_asset(client)
    assert health(client)["fake-paid"] == "ok"

    first = wait_for_job(client, promote(client, asset_id, tags={"fake": "fail"})["id"])
    assert first["status"] == "succeeded" and first["engine"] == "fake-b"
    assert health(client)["fake-paid"] == "degraded"
    assert health(client)["fake-b"] == "ok"

    second = wait_for_job(client, promote(client, asset_id, tags={"fake": "fail"})["id"])
    assert second["status"] == "succeeded" and second["engine"] == "fake-b"
    assert health(client)["fake-paid"] == "open"

    # While the circuit is open, routing skips the engine and says why.
    third = promote(client, asset_id)
    assert third["engine"] == "fake-b"
    reasons = {c["engine"]: c["skipped"] for c in third["routing"]["candidates"]}
    assert reasons == {"fake-b": None, "local-hifi": None, "fake-paid": "circuit open after repeated failures"}
    done = wait_for_job(client, third["id"])
    assert done["status"] == "succeeded"
    assert [a["engine"] for a in done["attempts"]] == ["fake-b"]
    # Content filtering is the request's fault, not the engine's: it does not count as a failure.
    filtered = wait_for_job(client, promote(client, asset_id, engine="fake-b", tags={"fake-b": "filtered"})["id"])
    assert filtered["status"] == "failed"
    assert health(client)["fake-b"] == "ok"


def test_an_engine_that_crashes_on_every_job_has_its_circuit_opened(breaker_server: httpx.Client) -> None:
    # A plugin failing every job with a bug (a ValueError, a None returned) stayed `ok`, and routing
    # sent it each next job: only an EngineError said retryable counted.
    client = breaker_server
    _, asset_id = draft_asset(client)
    for told in ("degraded", "open"):
        crashed = wait_for_job(client, promote(client, asset_id, tags={"fake": "crash-before-send"})["id"])
        assert crashed["status"] == "failed" and crashed["error"]["code"] == "engine_error", crashed
        assert "failed unexpectedly" in crashed["error"]["message"]
        assert health(client)["fake-paid"] == told
    moved = promote(client, asset_id)
    assert moved["engine"] == "fake-b"
    assert wait_for_job(client, moved["id"])["status"] == "succeeded"


class Clock:
    def __init__(self) -> None:
        self.now = 1_790_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_half_open_circuit_lets_one_job_through_until_its_verdict(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the cooldown, the first job routed to the engine is its probe; jobs submitted while
    it waits or runs go to the next candidate. Once, all of them went until the probe started."""
    clock = Clock()
    monkeypatch.setattr("orchestrator.services.EngineHealth",
                        functools.partial(EngineHealth, threshold=2, cooldown=60.0, clock=clock))
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        _, asset_id = draft_asset(client)
        for _ in range(2):
            assert wait_for_job(client, promote(client, asset_id, tags={"fake": "fail"})["id"])["engine"] == "fake-b"
        assert health(client)["fake-paid"] == "open"
        clock.now += 61
        probe = promote(client, asset_id, tags={"fake": "hang"})
        assert probe["engine"] == "fake-paid"
        meanwhile = promote(client, asset_id)
        assert meanwhile["engine"] == "fake-b"
        reasons = {c["engine"]: c["skipped"] for c in meanwhile["routing"]["candidates"]}
        assert reasons["fake-paid"] == "circuit half-open: its probe request is out"
        # Told as routing treats it: no job but the probe goes there until its verdict.
        assert health(client)["fake-paid"] == "open"
        assert wait_for_job(client, meanwhile["id"])["status"] == "succeeded"
        assert client.post(f"/v1/jobs/{probe['id']}/cancel").status_code == 202
        assert wait_for_job(client, probe["id"])["status"] == "canceled"
        assert health(client)["fake-paid"] == "degraded"  # no verdict: the next job may be the probe
        # Canceled: no verdict, so the next job is the probe, and its success closes the circuit.
        after = promote(client, asset_id)
        assert after["engine"] == "fake-paid"
        assert wait_for_job(client, after["id"])["status"] == "succeeded"
        assert health(client)["fake-paid"] == "ok"


def open_then_half_open(client: httpx.Client, asset_id: str, clock: Clock) -> None:
    for _ in range(2):
        assert wait_for_job(client, promote(client, asset_id, tags={"fake": "fail"})["id"])["engine"] == "fake-b"
    assert health(client)["fake-paid"] == "open"
    clock.now += 61


def test_a_project_with_a_budget_sends_the_probe_too(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing again under the project's lock (a budget's balance) found the probe the request had
    just reserved as "out", and sent the job to the next, dearer candidate: with budgets on every
    project, the cheaper engine's circuit never closed."""
    clock = Clock()
    monkeypatch.setattr("orchestrator.services.EngineHealth",
                        functools.partial(EngineHealth, threshold=2, cooldown=60.0, clock=clock))
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        _, asset_id = draft_asset(client, budget={"limit": 1000, "period": "month"})
        open_then_half_open(client, asset_id, clock)
        probe = promote(client, asset_id)
        assert probe["engine"] == "fake-paid" and probe["cost"]["estimated"] == 10.0
        assert wait_for_job(client, probe["id"])["status"] == "succeeded"
        assert health(client)["fake-paid"] == "ok"


def test_requests_routed_together_after_the_cooldown_send_one_probe(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The look (allow) and the taking (assign, after the commit) were two steps: every request
    # routed between them became the probe, and went to the failing engine.
    clock = Clock()
    monkeypatch.setattr("orchestrator.services.EngineHealth",
                        functools.partial(EngineHealth, threshold=2, cooldown=60.0, clock=clock))
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        _, asset_id = draft_asset(client)
        open_then_half_open(client, asset_id, clock)
        # All four have routed (and found the circuit free) before any goes on to commit.
        gate, local, decide = threading.Barrier(4, timeout=30), threading.local(), JobService.decide

        def decide_together(self: JobService, *args: Any, **kwargs: Any) -> Any:
            decision = decide(self, *args, **kwargs)
            if not getattr(local, "waited", False):
                local.waited = True
                gate.wait()
            return decision

        monkeypatch.setattr(JobService, "decide", decide_together)

        def one(_: int) -> str:
            with httpx.Client(base_url=client.base_url, timeout=30) as other:
                return str(promote(other, asset_id, tags={"fake": "hang", "fake-b": "hang"})["engine"])

        with ThreadPoolExecutor(4) as pool:
            engines = list(pool.map(one, range(4)))
        for job in client.get("/v1/jobs", params={"stage": "bridge"}).json()["items"]:
            if job["status"] in ("queued", "running"):
                client.post(f"/v1/jobs/{job['id']}/cancel")
        assert sorted(engines) == ["fake-b", "fake-b", "fake-b", "fake-paid"], engines


def breakers(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> list[EngineHealth]:
    """The circuit breakers the services build from now on (threshold 2, cooldown 60 s on `clock`)."""
    made: list[EngineHealth] = []

    def breaker(*args: Any, **kwargs: Any) -> EngineHealth:
        made.append(EngineHealth(threshold=2, cooldown=60.0, clock=clock))
        return made[-1]

    monkeypatch.setattr("orchestrator.services.EngineHealth", breaker)
    return made


def fill_fake_paid(client: httpx.Client, asset_id: str) -> list[dict[str, Any]]:
    """fake-paid's 4 lanes taken by jobs that hang until canceled: the next jobs wait in the queue."""
    busy = [promote(client, asset_id, engine="fake-paid", tags={"fake": "hang"}) for _ in range(4)]
    for job in busy:
        wait_for_job(client, job["id"], ("running",))
    return busy


def test_a_probe_canceled_while_queued_lets_the_next_one_through(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Canceled before it ran, the probe was never released: the engine was skipped for the whole cooldown.
    clock = Clock()
    made = breakers(monkeypatch, clock)
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        _, asset_id = draft_asset(client)
        busy = fill_fake_paid(client, asset_id)  # the probe will wait in the queue
        for _ in range(2):
            made[0].failed("fake-paid")  # open (other jobs failed meanwhile) ...
        clock.now += 61  # ... and half-open
        probe = promote(client, asset_id)
        assert probe["engine"] == "fake-paid" and probe["status"] == "queued"
        assert client.post(f"/v1/jobs/{probe['id']}/cancel").status_code == 202
        assert wait_for_job(client, probe["id"])["status"] == "canceled"
        after = promote(client, asset_id, tags={"fake": "hang"})
        for job in [*busy, after]:
            client.post(f"/v1/jobs/{job['id']}/cancel")
        assert after["engine"] == "fake-paid", after["routing"]["candidates"]


def test_jobs_queued_before_the_circuit_opened_are_not_sent_while_it_is_open(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The breaker was asked only by routing: every job queued for the engine before it opened was
    still sent to it, through the cooldown and beside the probe (a provider that hangs billed each).
    Now a queued job moves to the next candidate of its routing, unsent, or, with none (an engine
    asked for by name), waits in the queue until the cooldown has passed and goes as the probe."""
    clock = Clock()
    made = breakers(monkeypatch, clock)
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        _, asset_id = draft_asset(client)
        busy = fill_fake_paid(client, asset_id)
        routed = promote(client, asset_id)
        named = promote(client, asset_id, engine="fake-paid")
        assert routed["engine"] == named["engine"] == "fake-paid"
        for _ in range(2):
            made[0].failed("fake-paid")  # the circuit opens (other jobs failed meanwhile)
        for job in busy:  # lanes free
            assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202

        moved = wait_for_job(client, routed["id"])
        assert (moved["status"], moved["engine"]) == ("succeeded", "fake-b"), moved
        first = moved["attempts"][0]
        assert (first["engine"], first["error"]["code"]) == ("fake-paid", "engine_unavailable")
        # Never started there: a cancel while queued on fake-b says "canceled before it started".
        assert (first["error"]["details"]["circuit"], first["error"]["details"]["started"]) == ("open", False)
        assert moved["cost"]["charged"] == 20.0  # fake-b's price alone: fake-paid was never sent it
        time.sleep(1.5)  # dispatch looks again every poll interval
        assert client.get(f"/v1/jobs/{named['id']}").json()["status"] == "queued"

        clock.now += 61  # half-open: the waiting job is admitted as the probe, and closes the circuit
        done = wait_for_job(client, named["id"])
        assert (done["status"], done["engine"]) == ("succeeded", "fake-paid"), done
        assert [a["engine"] for a in done["attempts"]] == ["fake-paid"]
        assert health(client)["fake-paid"] == "ok"


# fake-paid, then fake-b: no free engine to fall back to.
TWO_PAID_POLICY = FALLBACK_POLICY.replace('"fallback-test"', '"two-paid"').replace(', "local-hifi"]', "]")


@contextlib.contextmanager
def two_paid_and_full(new_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      ) -> Iterator[tuple[httpx.Client, Clock, list[EngineHealth], list[dict[str, Any]]]]:
    """A service on the two-paid policy, its breakers on a clock, fake-paid's lanes taken."""
    clock = Clock()
    made = breakers(monkeypatch, clock)
    folder = write_policies(tmp_path / "policies", {"two-paid": TWO_PAID_POLICY})
    with running(new_settings(engines=FAKE_ENGINES, policy="two-paid", policy_dir=folder)) as client:
        _, busy_asset = draft_asset(client)
        yield client, clock, made, fill_fake_paid(client, busy_asset)


def test_a_job_moved_off_an_open_circuit_takes_a_candidate_skipped_for_the_budget_once_it_fits(
        new_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued on fake-paid (fake-b, the policy's first, did not fit 15 credits), moved unsent when
    fake-paid's circuit opened, after the studio raised the limit: it went to local-hifi, fake-b
    never looked at again. Now fake-b takes it, held and charged there once."""
    clock = Clock()
    made = breakers(monkeypatch, clock)
    folder = write_policies(tmp_path / "policies", {"budget-first-test": BUDGET_FIRST_POLICY})
    with running(new_settings(engines=FAKE_ENGINES, policy="budget-first-test", policy_dir=folder)) as client:
        project_id, asset_id = draft_asset(client, budget={"limit": 55, "period": "none"})
        busy = fill_fake_paid(client, asset_id)  # 40 held: 15 left
        routed = promote(client, asset_id)
        assert routed["engine"] == "fake-paid"
        assert [(c["engine"], c["skipped"]) for c in routed["routing"]["candidates"]][-1] == (
            "fake-b", "does not fit the budget (15.0 credits available)")
        assert client.patch(f"/v1/projects/{project_id}", json={"budget": {"limit": 100}}).status_code == 200
        for _ in range(2):
            made[0].failed("fake-paid")  # the circuit opens (other jobs failed meanwhile)
        for job in busy:  # lanes free
            assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        moved = wait_for_job(client, routed["id"])
        assert (moved["status"], moved["engine"]) == ("succeeded", "fake-b"), moved
        assert moved["attempts"][0]["error"]["details"]["circuit"] == "open"
        entries = ledger(client, project_id, routed["id"])
        assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"),
                                  ("hold", 20.0, "fake-b"), ("capture", 20.0, "fake-b")]
        assert_settled_once(entries)


def test_a_job_no_candidate_takes_off_an_open_circuit_waits_rather_than_fails(
        new_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claimed to be moved, a job whose other candidate then refused it (its price over what the
    budget had left, or another job's probe) was failed for good, never sent anywhere. It goes back
    to the queue as it was, and runs on its engine once the circuit lets it."""
    with two_paid_and_full(new_settings, tmp_path, monkeypatch) as (client, clock, made, busy):
        project_id, asset_id = draft_asset(client, budget={"limit": 25, "period": "none"})
        queued = [promote(client, asset_id) for _ in range(2)]  # 10 held each; fake-b's 20 will not fit
        assert [job["engine"] for job in queued] == ["fake-paid", "fake-paid"]
        for _ in range(2):
            made[0].failed("fake-paid")
        for job in busy:
            client.post(f"/v1/jobs/{job['id']}/cancel")
        time.sleep(1.5)
        for job in queued:
            now = client.get(f"/v1/jobs/{job['id']}").json()
            assert (now["status"], now["engine"], now["attempts"]) == ("queued", "fake-paid", []), now
            assert now["started_at"] is None  # claimed only to be moved: it never started
        assert [(e["kind"], e["amount"]) for e in ledger(client, project_id)] == [("hold", 10.0), ("hold", 10.0)]

        clock.now += 61  # half-open: the first is the probe; its success closes the circuit for the other
        for job in queued:
            done = wait_for_job(client, job["id"])
            assert (done["status"], done["engine"]) == ("succeeded", "fake-paid"), done
            assert [a["engine"] for a in done["attempts"]] == ["fake-paid"]
            assert done["cost"]["charged"] == 10.0


def test_a_job_put_back_to_wait_outlasts_a_database_that_is_briefly_away(
        new_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One 'database is locked' as the job went back to the queue left it `running` to recovery,
    which counted it as a crash (and fails and charges a job on an engine that does not announce
    its sends) though nothing was sent."""
    guarded_update = JobRunner._guarded_update
    refused: list[str] = []

    def locked_once(s: Any, claim: Any, **values: Any) -> None:
        if "started_at" in values and not refused:  # the put-back only restores when it started
            refused.append(claim.job.id)
            raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        guarded_update(s, claim, **values)

    monkeypatch.setattr(JobRunner, "_guarded_update", staticmethod(locked_once))
    with two_paid_and_full(new_settings, tmp_path, monkeypatch) as (client, _clock, made, busy):
        _, asset_id = draft_asset(client, budget={"limit": 15, "period": "none"})
        job = promote(client, asset_id)  # its 10 fits; fake-b's 20 would not
        for _ in range(2):
            made[0].failed("fake-paid")
        for other in busy:
            client.post(f"/v1/jobs/{other['id']}/cancel")
        poll(lambda: refused == [job["id"]], what="the put-back to meet the locked database")
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued", what="the job to wait")
        now = client.get(f"/v1/jobs/{job['id']}").json()
        assert (now["engine"], now["attempts"], now["started_at"]) == ("fake-paid", [], None), now


def test_jobs_waiting_for_a_verdict_are_not_claimed_again_while_the_probe_is_out(
        new_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Their wait was forgotten whenever the circuit let a probe through (or the lane was full):
    # each was claimed to be moved again at every cooldown, its attempt counted up, for nothing.
    requeued: list[str] = []
    requeue_waiting = JobRunner._requeue_waiting

    def counted(self: JobRunner, claim: Any) -> None:
        requeued.append(claim.job.id)
        requeue_waiting(self, claim)

    monkeypatch.setattr(JobRunner, "_requeue_waiting", counted)
    with two_paid_and_full(new_settings, tmp_path, monkeypatch) as (client, clock, made, busy):
        _, asset_id = draft_asset(client, budget={"limit": 35, "period": "none"})
        queued = [promote(client, asset_id, tags={"fake": "hang"}) for _ in range(3)]  # fake-b's 20 fits none
        for _ in range(2):
            made[0].failed("fake-paid")
        for job in busy:
            client.post(f"/v1/jobs/{job['id']}/cancel")
        poll(lambda: len(requeued) == 3, what="the three to be queued again to wait")
        clock.now += 61  # half-open: one is admitted as the probe, and hangs
        poll(lambda: [client.get(f"/v1/jobs/{j['id']}").json()["status"] for j in queued].count("running") == 1,
             what="the probe to start")
        time.sleep(1.5)  # dispatch looks again every poll interval
        assert sorted(requeued) == sorted(j["id"] for j in queued)  # none claimed to be moved again
        statuses = [client.get(f"/v1/jobs/{j['id']}").json()["status"] for j in queued]
        assert sorted(statuses) == ["queued", "queued", "running"]
        for job in queued:
            client.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_job_canceled_as_its_fallback_commits_leaves_the_next_engine_s_probe_free(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Adopted as fake-b's probe only after the move committed: a cancel in between found the probe
    # still the fallback's token, gave nothing back, and fake-b was refused for the whole cooldown.
    clock = Clock()
    made = breakers(monkeypatch, clock)
    requeue_on = JobRunner._requeue_on
    canceled: list[int] = []

    def requeue_then_cancel(self: JobRunner, claim: Any, *args: Any) -> None:
        requeue_on(self, claim, *args)
        with httpx.Client(base_url=str(client.base_url), timeout=30) as other:
            canceled.append(other.post(f"/v1/jobs/{claim.job.id}/cancel").status_code)

    monkeypatch.setattr(JobRunner, "_requeue_on", requeue_then_cancel)
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        _, asset_id = draft_asset(client)
        for _ in range(2):
            made[0].failed("fake-b")
        clock.now += 61  # fake-b half-open: the fallback takes its probe
        job = wait_for_job(client, promote(client, asset_id, tags={"fake": "fail", "fake-b": "hang"})["id"])
        # The job may read as canceled before the cancel's own answer is back on the runner's thread.
        deadline = time.monotonic() + 10
        while not canceled and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (job["status"], job["engine"], canceled) == ("canceled", "fake-b", [202])
        assert made[0].reserve("fake-b", "the next request")


def test_fallback_result_is_not_a_cache_entry_for_the_first_engine(paid_server: httpx.Client) -> None:
    """The result cache is keyed by engine and model. A job that fell back from fake-paid to fake-b
    made its image on fake-b, so an identical request routed to fake-paid must not get it."""
    _, asset_id = draft_asset(paid_server)
    body = {"tags": {"fake": "fail"}, "cache": True, "strength": 0.42}
    first = wait_for_job(paid_server, promote(paid_server, asset_id, **body)["id"])
    assert first["status"] == "succeeded" and first["engine"] == "fake-b"
    second = wait_for_job(paid_server, promote(paid_server, asset_id, **body)["id"])
    assert second["status"] == "succeeded" and second["assets"], second
    assets = [paid_server.get(f"/v1/assets/{a}").json() for a in second["assets"]]
    assert all(a["engine"] == second["engine"] for a in assets), (second["engine"], second["cost"])


def test_a_timeout_captures_the_unknown_charge_and_the_job_does_not_fall_back(paid_server: httpx.Client) -> None:
    """A request sent without an answer may have been billed: its hold is captured, unreconciled,
    and the job ends there."""
    project_id, asset_id = draft_asset(paid_server)
    done = wait_for_job(paid_server, promote(paid_server, asset_id, tags={"fake": "timeout"})["id"])
    assert done["attempts"][0]["engine"] == "fake-paid"
    assert done["attempts"][0]["error"]["code"] == "timeout"
    # Not moved on: another engine's render would be paid for a second time.
    assert (done["status"], done["engine"], len(done["attempts"])) == ("failed", "fake-paid", 1), done
    first_hold, settled = ledger(paid_server, project_id, done["id"])[:2]
    assert (first_hold["kind"], first_hold["engine"]) == ("hold", "fake-paid")
    assert (settled["kind"], settled["amount"], settled["unreconciled"]) == ("capture", 10.0, True)
    assert settled["hold_id"] == first_hold["id"]


def test_fallback_over_budget_settles_the_failed_attempt_by_its_own_error(paid_server: httpx.Client) -> None:
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 15, "period": "month"})
    done = wait_for_job(paid_server, promote(paid_server, asset_id, tags={"fake": "timeout"})["id"])
    assert done["attempts"][0]["error"]["code"] == "timeout"
    settled = ledger(paid_server, project_id, done["id"])[1]
    assert (settled["kind"], settled["engine"], settled["unreconciled"]) == ("capture", "fake-paid", True)


def test_fallback_skips_a_candidate_the_budget_cannot_hold(paid_server: httpx.Client,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    # Skipped without a word: the fallback event named only where the job went.
    caplog.set_level(logging.WARNING, logger="orchestrator.runner")
    _, asset_id = draft_asset(paid_server, budget={"limit": 15, "period": "month"})
    job = promote(paid_server, asset_id, tags={"fake": "fail"})
    moved = [e.data for e in read_events(paid_server, job["id"]) if e.data.get("state") == "fallback"]
    done = wait_for_job(paid_server, job["id"])
    assert done["attempts"][0]["error"]["code"] == "engine_error"
    assert (done["status"], done["engine"]) == ("succeeded", "local-hifi")
    assert [(m["from"], m["to"], m["skipped"]) for m in moved] == [
        ("fake-paid", "local-hifi", [{"engine": "fake-b", "reason": "budget", "estimate": 20.0}])]
    assert f"job {job['id']}: fallback fake-b skipped:" in caplog.text


def test_a_job_no_fallback_fits_says_which_were_skipped(paid_server: httpx.Client) -> None:
    """Failed with its engine's error alone, the job did not say the budget kept it from the next."""
    _, asset_id = draft_asset(paid_server, policy="paid-only-test", budget={"limit": 15, "period": "month"})
    done = wait_for_job(paid_server, promote(paid_server, asset_id, tags={"fake": "fail"})["id"])
    assert (done["status"], done["error"]["code"]) == ("failed", "engine_error")
    assert done["error"]["details"]["fallbacks_skipped"] == [{"engine": "fake-b", "reason": "budget", "estimate": 20.0}]


def test_probe_that_ends_without_a_verdict_frees_the_circuit(new_settings: SettingsFactory, fallback_policies: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # No cooldown: the circuit is half-open as soon as it opens, so the next request is the probe.
    monkeypatch.setattr("orchestrator.services.EngineHealth",
                        functools.partial(EngineHealth, threshold=2, cooldown=0.0))
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        _, asset_id = draft_asset(client)
        for _ in range(2):
            assert wait_for_job(client, promote(client, asset_id, tags={"fake": "fail"})["id"])["engine"] == "fake-b"
        probe = promote(client, asset_id, engine="fake-paid", tags={"fake": "filtered"})
        assert wait_for_job(client, probe["id"])["error"]["code"] == "content_filtered"
        # The provider answered: the probe is over. The engine must be routable again.
        after = promote(client, asset_id)
        assert after["engine"] == "fake-paid", after["routing"]["candidates"]


def test_a_private_draft_s_promotion_cannot_lift_its_privacy(paid_server: httpx.Client) -> None:
    response = paid_server.post("/v1/projects", json={"name": "private"})
    draft = run_draft(paid_server, response.json()["id"], tags={"privacy": "local"})
    asset_id = draft["assets"][0]
    for value in ("", "none", "cloud"):
        body = {"tags": {"privacy": value}}
        refused = paid_server.post(f"/v1/assets/{asset_id}/promote", json=body)
        assert_error(refused, 422, "invalid_request")
        assert refused.json()["error"]["details"]["errors"][0]["loc"] == ["body", "tags", "privacy"]
        explained = paid_server.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id, **body})
        assert_error(explained, 422, "invalid_request")
    # Saying it again is fine, and so is leaving it out.
    assert promote(paid_server, asset_id, tags={"privacy": "local"})["engine"] == "local-hifi"


def test_a_private_draft_stored_with_its_key_spelled_privacy_stays_private(
        new_settings: SettingsFactory, fallback_policies: Path) -> None:
    # Before the key was read loosely the service stored `Privacy` as sent: its promotion went to the cloud.
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)
    with running(settings) as client:
        draft = run_draft(client, client.post("/v1/projects", json={"name": "legacy"}).json()["id"])
        with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
            params = json.loads(db.execute("SELECT params FROM jobs WHERE id = ?", (draft["id"],)).fetchone()[0])
            params["tags"] = {"Privacy": "local", "client": "acme"}
            db.execute("UPDATE jobs SET params = ? WHERE id = ?", (json.dumps(params), draft["id"]))
        promoted = promote(client, draft["assets"][0])
        assert promoted["engine"] == "local-hifi" and promoted["routing"]["private"], promoted["routing"]
        assert promoted["params"]["tags"] == {"privacy": "local", "client": "acme"}


def test_an_overspent_budget_still_routes_to_a_free_engine(paid_server: httpx.Client) -> None:
    """A provider's charge above its estimate, or a lowered limit, leaves less than nothing: free
    local work must go on (only a paid engine's hold needs room)."""
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 100, "period": "month"})
    assert wait_for_job(paid_server, promote(paid_server, asset_id)["id"])["status"] == "succeeded"  # 10 charged
    patched = paid_server.patch(f"/v1/projects/{project_id}", json={"budget": {"limit": 4}})
    assert patched.status_code == 200, patched.text
    assert paid_server.get(f"/v1/projects/{project_id}/budget").json()["available"] == -6
    explained = paid_server.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id})
    assert explained.status_code == 200 and explained.json()["engine"] == "local-hifi"
    assert promote(paid_server, asset_id, seed=2)["engine"] == "local-hifi"


def test_route_explain_refuses_what_no_candidate_can_hold_as_a_submit_does(paid_server: httpx.Client) -> None:
    _, asset_id = draft_asset(paid_server, budget={"limit": 5, "period": "month"})
    body = {"engine": "fake-paid"}  # the only candidate: 10 credits against 5
    explained = paid_server.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id, **body})
    assert_error(explained, 402, "budget_exceeded")
    submitted = paid_server.post(f"/v1/assets/{asset_id}/promote", json=body)
    assert_error(submitted, 402, "budget_exceeded")
    assert explained.json()["error"]["details"] == submitted.json()["error"]["details"]


def test_a_hold_taken_after_routing_read_the_budget_moves_the_choice(paid_server: httpx.Client,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing reads the balance before the submit's transaction: a concurrent request's hold in
    between must move this one to a candidate that still fits, not refuse it (402)."""
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 15, "period": "month"})
    decide = JobService.decide

    def decide_then_another_request_holds(self: JobService, prepared: Any, engine: str | None,
                                          max_credits: float | None, **options: Any) -> Any:
        decision = decide(self, prepared, engine, max_credits, **options)
        with self.db.transaction() as s:
            s.add(LedgerEntry(project_id=prepared.project_id, kind="hold", amount=10_000, created_at=utcnow()))
        return decision

    monkeypatch.setattr(JobService, "decide", decide_then_another_request_holds)
    job = promote(paid_server, asset_id)
    assert job["engine"] == "local-hifi" and job["cost"]["estimated"] == 0
    skipped = {c["engine"]: c["skipped"] for c in job["routing"]["candidates"]}
    assert skipped["fake-paid"] == "does not fit the budget (5.0 credits available)"
    assert ledger(paid_server, project_id, job["id"]) == []


def test_a_hold_that_pushes_the_project_past_a_rule_s_share_moves_the_choice(
        paid_server: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule `budget_used_over = 0.8` applies to the balance under the project's lock, not the
    one routing read before it: concurrent promotes took the project to 95% on a cloud engine."""
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 100, "period": "month"})
    assert paid_server.patch(f"/v1/projects/{project_id}", json={"policy": "soft-budget-test"}).status_code == 200
    decide = JobService.decide

    def decide_then_another_request_holds(self: JobService, prepared: Any, engine: str | None,
                                          max_credits: float | None, **options: Any) -> Any:
        decision = decide(self, prepared, engine, max_credits, **options)
        assert decision.chosen == "fake-paid" and decision.rule == "paid"  # 0% used when it looked
        with self.db.transaction() as s:
            s.add(LedgerEntry(project_id=prepared.project_id, kind="hold", amount=85_000, created_at=utcnow()))
        return decision

    monkeypatch.setattr(JobService, "decide", decide_then_another_request_holds)
    job = promote(paid_server, asset_id)
    assert (job["engine"], job["routing"]["rule"]) == ("local-hifi", "soft")  # 85% used: 10 credits would fit
    assert ledger(paid_server, project_id, job["id"]) == []


def test_an_engine_a_budget_rule_leaves_out_is_refused_saying_why(paid_server: httpx.Client) -> None:
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 10, "period": "month"})
    assert paid_server.patch(f"/v1/projects/{project_id}", json={"policy": "soft-budget-test"}).status_code == 200
    assert wait_for_job(paid_server, promote(paid_server, asset_id)["id"])["status"] == "succeeded"  # 100% used
    response = paid_server.post(f"/v1/assets/{asset_id}/promote", json={"engine": "fake-paid", "cache": False})
    error = assert_error(response, 422, "no_route")
    assert error["message"] == ("engine 'fake-paid' is not allowed here: policy 'soft-budget-test', rule 'soft' "
                                "allows local-hifi (the project has used over 80% of its budget)")


def test_a_source_whose_file_is_gone_is_refused_at_submit(new_settings: SettingsFactory) -> None:
    """Not accepted and failed later (a job that can never run, holding credits meanwhile)."""
    services = Services.build(new_settings(engines=FAKE_ENGINES))
    try:
        sha = services.store.put(b"\x89PNG not really")
        with services.db.transaction() as s:
            s.add(Project(id="prj_gone", name="gone", policy="balanced"))
            s.flush()  # the rows have no relationships to order their inserts by
            s.add(Job(id="job_gone", project_id="prj_gone", stage="ideation", engine="lite", status="succeeded"))
            s.flush()
            s.add(Asset(id="ast_gone", project_id="prj_gone", job_id="job_gone", index=0, stage="ideation",
                        engine="lite", model="m", prompt="p", seed=1, width=64, height=64, sha256=sha))
        assert services.jobs.prepare_promote("ast_gone", PromoteCreate()).source is not None
        services.store.path_for(sha).unlink()
        for prepare in (services.jobs.prepare_promote, services.jobs.prepare_polish):
            with pytest.raises(ContentUnavailable) as info:
                prepare("ast_gone", PromoteCreate() if prepare == services.jobs.prepare_promote else PolishCreate())  # type: ignore[arg-type]
            # The asset is there (not a 404): its file is for the operator to restore.
            assert info.value.status == 500 and "file is missing" in info.value.message
    finally:
        asyncio.run(services.aclose())


def test_a_copy_of_an_earlier_result_needs_no_room_in_the_budget(paid_server: httpx.Client) -> None:
    """An identical request is served from the cache at no charge: a budget the first one spent
    neither refuses it (402) nor moves it to another engine, which would make a new image."""
    project_id, asset_id = draft_asset(paid_server, budget={"limit": 10, "period": "month"})
    body: dict[str, Any] = {"engine": "fake-paid", "seed": 9, "steps": 2, "cache": True}
    first = wait_for_job(paid_server, promote(paid_server, asset_id, **body)["id"])
    assert first["status"] == "succeeded" and first["cost"]["charged"] == 10
    assert paid_server.get(f"/v1/projects/{project_id}/budget").json()["available"] == 0
    explained = paid_server.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id, **body})
    assert explained.status_code == 200 and explained.json()["engine"] == "fake-paid"
    again = promote(paid_server, asset_id, **body)
    assert again["cost"]["cache_hit"] is True and again["engine"] == "fake-paid" and again["status"] == "succeeded"
    # Routed by the policy (fake-paid first, local-hifi free): still the copy, not a new local image.
    routed = promote(paid_server, asset_id, seed=9, cache=True)
    assert routed["cost"]["cache_hit"] is True and routed["engine"] == "fake-paid"
    # Without the cache the budget decides again.
    fresh = paid_server.post(f"/v1/assets/{asset_id}/promote", json={**body, "cache": False})
    assert_error(fresh, 402, "budget_exceeded")
    assert [e["kind"] for e in ledger(paid_server, project_id)] == ["hold", "capture"]


@pytest.mark.parametrize("loss", ["gone", "rotted", "unreadable"])
def test_a_copy_of_a_result_whose_file_is_gone_or_damaged_is_rendered_again(
        new_settings: SettingsFactory, tmp_path: Path, loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY})
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder)
    with running(settings) as client:
        _, asset_id = draft_asset(client, budget={"limit": 100, "period": "month"})
        body: dict[str, Any] = {"engine": "fake-paid", "seed": 9, "steps": 2, "cache": True}
        first = wait_for_job(client, promote(client, asset_id, **body)["id"])
        sha = client.get(f"/v1/assets/{first['assets'][0]}").json()["sha256"]
        path = settings.assets_dir / sha[:2] / f"{sha}.png"
        if loss == "gone":
            path.unlink()  # removed by hand, a lost disk
        elif loss == "rotted":  # one byte changed, the size kept: a free copy whose image could never be served
            path.chmod(0o644)
            path.write_bytes(path.read_bytes()[:-1] + b"?")
        else:
            # Restored from a backup with the wrong owner (its reads refused; the tests run as root,
            # whom a file's mode does not stop): every identical request was a 500 internal_error,
            # the copy it found stopping it before it could render again.
            from orchestrator import store

            restored, read_bytes, open_regular = path.stat().st_ino, Path.read_bytes, store.open_regular

            def refused(self: Path) -> bytes:
                if self == path and self.stat().st_ino == restored:
                    raise PermissionError(13, "Permission denied", str(self))
                return read_bytes(self)

            def refused_open(opened: Path, *, follow: bool = True) -> BinaryIO:
                if opened == path and opened.stat().st_ino == restored:
                    raise PermissionError(13, "Permission denied", str(opened))
                return open_regular(opened, follow=follow)

            monkeypatch.setattr(Path, "read_bytes", refused)
            monkeypatch.setattr(store, "open_regular", refused_open)
        again = promote(client, asset_id, **body)
        assert again["cost"]["cache_hit"] is False and again["cost"]["estimated"] == 10
        done = wait_for_job(client, again["id"])
        assert done["status"] == "succeeded" and done["cost"]["charged"] == 10
        assert client.get(f"/v1/assets/{done['assets'][0]}/content").status_code == 200


def test_the_privacy_tag_is_known_however_its_key_is_spelled(paid_server: httpx.Client) -> None:
    # `Privacy` was another tag: the private draft's promotion went to a cloud engine.
    response = paid_server.post("/v1/projects", json={"name": "private"})
    draft = run_draft(paid_server, response.json()["id"], tags={" Privacy": " Local"})
    assert draft["params"]["tags"] == {"privacy": "local"}  # as a dashboard filtering on it looks for it
    job = promote(paid_server, draft["assets"][0])
    assert job["engine"] == "local-hifi" and job["params"]["tags"]["privacy"] == "local"
    twice = paid_server.post(f"/v1/assets/{draft['assets'][0]}/promote",
                             json={"tags": {"privacy": "local", "PRIVACY": "cloud"}})
    assert_error(twice, 422, "invalid_request")


def test_a_result_is_copied_while_its_engine_s_circuit_is_open(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy sends nothing: during a provider's outage, the request for a result the studio has
    was rendered again on the next engine and paid for (or, naming the engine, refused 503)."""
    clock = Clock()
    made = breakers(monkeypatch, clock)
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        project_id, asset_id = draft_asset(client)
        first = wait_for_job(client, promote(client, asset_id, cache=True)["id"])
        assert (first["status"], first["engine"], first["cost"]["charged"]) == ("succeeded", "fake-paid", 10.0)
        for _ in range(2):
            made[0].failed("fake-paid")  # its circuit opens (other jobs failed)
        body = {"project_id": project_id, "stage": "bridge", "source_asset_id": asset_id, "steps": 2}
        explained = client.post("/v1/route/explain", json=body)
        assert explained.status_code == 200, explained.text
        assert (explained.json()["engine"], explained.json()["cache_hit"]) == ("fake-paid", True)
        for engine in (None, "fake-paid"):
            copy = promote(client, asset_id, cache=True, **({"engine": engine} if engine else {}))
            assert (copy["status"], copy["engine"], copy["cost"]["cache_hit"]) == ("succeeded", "fake-paid", True)
            assert copy["cost"]["charged"] == 0
        # A render is still kept off the open circuit.
        render = promote(client, asset_id)
        assert render["engine"] == "fake-b"
        client.post(f"/v1/jobs/{render['id']}/cancel")
        named = client.post(f"/v1/assets/{asset_id}/promote", json={"steps": 2, "cache": False, "engine": "fake-paid"})
        assert_error(named, 503, "no_route")
        # Nor did a copy take the half-open circuit's probe.
        clock.now += 61
        assert promote(client, asset_id, cache=True)["cost"]["cache_hit"]
        probe = promote(client, asset_id, tags={"fake": "hang"})
        assert probe["engine"] == "fake-paid", probe["routing"]["candidates"]
        client.post(f"/v1/jobs/{probe['id']}/cancel")


def test_a_copy_past_an_open_circuit_records_the_request_s_cap(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decision records the request's `max_credits` (`routing.requested_max_credits`, and in
    `routing.max_credits` the lower of it and the rule's): one that copies an earlier result past
    its engine's open circuit, explained or made into a job, recorded neither (the key left out,
    `max_credits` null although the client asked for at most 15)."""
    clock = Clock()
    made = breakers(monkeypatch, clock)
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        project_id, asset_id = draft_asset(client)
        first = wait_for_job(client, promote(client, asset_id, cache=True)["id"])
        assert (first["status"], first["engine"]) == ("succeeded", "fake-paid")
        assert (first["routing"]["requested_max_credits"], first["routing"]["max_credits"]) == (None, None)
        for _ in range(2):
            made[0].failed("fake-paid")  # its circuit opens (other jobs failed)
        body = {"project_id": project_id, "stage": "bridge", "source_asset_id": asset_id, "steps": 2,
                "cache": True, "max_credits": 15}
        explained = client.post("/v1/route/explain", json=body)
        assert explained.status_code == 200, explained.text
        assert (explained.json()["engine"], explained.json()["cache_hit"]) == ("fake-paid", True)
        routing = explained.json()["routing"]
        assert (routing.get("requested_max_credits"), routing["max_credits"]) == (15.0, 15.0), routing
        copy = promote(client, asset_id, cache=True, max_credits=15)
        assert (copy["status"], copy["engine"], copy["cost"]["cache_hit"]) == ("succeeded", "fake-paid", True)
        routing = client.get(f"/v1/jobs/{copy['id']}").json()["routing"]
        assert (routing.get("requested_max_credits"), routing["max_credits"]) == (15.0, 15.0), routing


def test_a_request_only_engines_not_set_up_could_take_is_not_told_to_wait(
        new_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # "no engine can take this request now" on a 503 read as an outage to wait out; no key comes by waiting.
    clock = Clock()
    made = breakers(monkeypatch, clock)
    with running(new_settings(policy="balanced")) as client:
        _, asset_id = draft_asset(client)
        error = assert_error(client.post(f"/v1/assets/{asset_id}/promote", json={"engine": "stability"}),
                             503, "no_route")
        assert error["message"].startswith("no engine can take this request (policy"), error["message"]
        for _ in range(2):
            made[0].failed("local-hifi")
        waited = client.post(f"/v1/assets/{asset_id}/promote", json={"engine": "local-hifi"})
        error = assert_error(waited, 503, "no_route")
        assert error["message"].startswith("no engine can take this request now"), error["message"]
        assert "retry-after" in waited.headers


def test_a_job_that_falls_back_holds_what_its_new_engine_s_images_may_take(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's storage bound is its engine's: moved to one whose provider returns larger images, it
    holds their bound back from its project's quota from then on (`orchestrator.quota`)."""
    from orchestrator import quota
    from orchestrator.db import Database
    from tests.routing import NamedFakeEngine

    monkeypatch.setattr(NamedFakeEngine, "largest_size", lambda self, req: (2048, 2048) if self.name == "fake-b"
                        else (req.width, req.height), raising=False)
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)
    with running(settings) as client:
        _, asset_id = draft_asset(client, budget={"limit": 100, "period": "month"})
        job = promote(client, asset_id, tags={"fake": "fail"})
        done = wait_for_job(client, job["id"])
        assert (done["status"], done["engine"]) == ("succeeded", "fake-b"), done
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            row = s.get(Job, job["id"])
            assert row is not None
            taken = quota.image_bound(row.params["width"], row.params["height"], quota.text_bound(row.params))
            assert row.reserved_bytes == quota.image_bound(2048, 2048, quota.text_bound(row.params)) > taken
    finally:
        db.dispose()


def test_a_fallback_whose_images_would_pass_the_storage_quota_is_skipped(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="orchestrator.runner")
    write_policies(fallback_policies, {"paid-only-test": PAID_ONLY_POLICY})
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)) as client:
        job_id = check_a_fallback_whose_images_would_pass_the_storage_quota_is_skipped(client, monkeypatch)
    assert f"job {job_id}: fallback fake-b skipped:" in caplog.text


def check_a_fallback_whose_images_would_pass_the_storage_quota_is_skipped(
        client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> str:
    """fake-b answers 2048x2048 whatever is asked: its bound (about 18 MiB) does not fit a project
    with a quota of 1 MiB. Moved there, the job held it past the quota, unjudged; it is skipped
    for the quota as a candidate the budget cannot hold is, and the job moves on to local-hifi.
    `client`: a service with FAKE_ENGINES and the fallback-test and paid-only-test policies. The
    job's id."""
    from tests.routing import NamedFakeEngine

    monkeypatch.setattr(NamedFakeEngine, "largest_size", lambda self, req: (2048, 2048) if self.name == "fake-b"
                        else (req.width, req.height), raising=False)
    project_id, asset_id = draft_asset(client, storage_quota_mb=1)
    job = promote(client, asset_id, tags={"fake": "fail"})
    moved = [e.data for e in read_events(client, job["id"]) if e.data.get("state") == "fallback"]
    done = wait_for_job(client, job["id"])
    assert (done["status"], [(a["engine"], a["status"]) for a in done["attempts"]]) == (
        "succeeded", [("fake-paid", "failed"), ("local-hifi", "succeeded")]), done
    [skip] = moved[0]["skipped"]
    assert (moved[0]["to"], skip["engine"], skip["reason"]) == ("local-hifi", "fake-b", "storage_quota")
    assert skip["job_bound_bytes"] > MIB_BYTES >= skip["used_bytes"] + skip["reserved_bytes"], skip
    project = client.get(f"/v1/projects/{project_id}").json()
    assert project["storage_bytes"] <= MIB_BYTES and project["storage_reserved_bytes"] == 0
    # With no candidate left that fits, the job fails saying why its fallback was not taken.
    _, only_paid = draft_asset(client, storage_quota_mb=1, policy="paid-only-test")
    failed = wait_for_job(client, promote(client, only_paid, tags={"fake": "fail"})["id"])
    assert (failed["status"], failed["error"]["code"]) == ("failed", "engine_error"), failed
    assert [(s["engine"], s["reason"]) for s in failed["error"]["details"]["fallbacks_skipped"]] == [
        ("fake-b", "storage_quota")]
    return str(job["id"])


def test_a_fallback_whose_images_take_no_more_is_not_judged_against_a_quota_lowered_since(
        new_settings: SettingsFactory, fallback_policies: Path) -> None:
    """Only what a move adds is judged: a job whose quota was lowered below its project's usage
    after its submit still moves to an engine whose images are no larger (as it still finishes)."""
    from orchestrator.db import Database

    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies)
    with running(settings) as client:
        project_id, asset_id = draft_asset(client, storage_quota_mb=1)
        go = settings.data_dir / "go-lowered"
        job = promote(client, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the job sent")
        db = Database(settings.resolved_database_url)
        try:
            with db.transaction() as s:  # its assets now fill its quota, as though a lower one were set
                project = s.get(Project, project_id)
                assert project is not None
                project.storage_bytes = MIB_BYTES
                s.add(project)
        finally:
            db.dispose()
        go.touch()
        done = wait_for_job(client, job["id"])
        assert (done["status"], done["engine"]) == ("succeeded", "fake-b"), done


SOFT_FALLBACK_POLICY = routing_policy(
    "soft-fallback-test", ["fake-paid", "fake-b", "local-hifi"], soft=("soft", 0.8, ["local-hifi"]),
    description="Bridge and polish on fake-paid, then fake-b, then local-hifi; local once 80% of the budget is used.")


def test_a_fallback_follows_the_rule_the_budget_s_share_picks_now(new_settings: SettingsFactory,
                                                                  tmp_path: Path) -> None:
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "soft-fallback-test": SOFT_FALLBACK_POLICY})
    check_a_fallback_follows_the_rule_the_budget_s_share_picks_now(
        new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder), tmp_path)


def test_a_fallback_a_rule_now_denies_fails_the_job_saying_so(new_settings: SettingsFactory, tmp_path: Path) -> None:
    """Past 80% used, the policy refuses bridges: a job routed before that, whose engine fails
    after it, is not moved to the recorded candidates (fake-b, local-hifi) the rule no longer gives."""
    from orchestrator.db import Database

    denying = SOFT_FALLBACK_POLICY.replace('"soft-fallback-test"', '"deny-fallback-test"').replace(
        'engines = ["local-hifi"]', 'deny = "over budget"')
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY, "deny-fallback-test": denying})
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder)
    with running(settings) as client:
        project_id, asset_id = draft_asset(client, policy="deny-fallback-test",
                                           budget={"limit": 200, "period": "month"})
        go = tmp_path / "go"
        job = promote(client, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the job sent")
        db = Database(settings.resolved_database_url)
        try:
            with db.transaction() as s:
                s.add(LedgerEntry(project_id=project_id, kind="hold", amount=165_000, created_at=utcnow()))
        finally:
            db.dispose()
        go.touch()
        done = wait_for_job(client, job["id"])
    assert (done["status"], done["engine"], done["error"]["code"]) == ("failed", "fake-paid", "engine_error"), done
    [skip] = done["error"]["details"]["fallbacks_skipped"]
    assert (skip["engine"], skip["reason"], skip["rule_before"], skip["rule"]) == (None, "budget_rule", "paid", "soft")
    assert "over budget" in skip["message"]


def check_a_fallback_follows_the_rule_the_budget_s_share_picks_now(settings: Settings, tmp_path: Path) -> None:
    """Routed at 0% used by the `paid` rule, the job waits on fake-paid while the project's other
    work takes it past 80% (165 of 200 credits). When fake-paid fails, the policy, judged on the
    budget as it is then, keeps the project local (`soft`): the job moves to local-hifi, not to
    fake-b (20 credits, which the budget could still hold), and its routing records the rule.
    `settings`: FAKE_ENGINES and the soft-fallback-test policy."""
    from orchestrator.db import Database

    with running(settings) as client:
        project_id, asset_id = draft_asset(client, policy="soft-fallback-test",
                                           budget={"limit": 200, "period": "month"})
        go = tmp_path / "go"
        job = promote(client, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
        assert (job["engine"], job["routing"]["rule"]) == ("fake-paid", "paid")
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the job sent")
        db = Database(settings.resolved_database_url)
        try:
            with db.transaction() as s:  # another client's work, held meanwhile
                s.add(LedgerEntry(project_id=project_id, kind="hold", amount=165_000, created_at=utcnow()))
        finally:
            db.dispose()
        go.touch()
        done = wait_for_job(client, job["id"])
        assert (done["status"], [(a["engine"], a["status"]) for a in done["attempts"]]) == (
            "succeeded", [("fake-paid", "failed"), ("local-hifi", "succeeded")]), done
        routing = done["routing"]
        assert (routing["rule"], routing["rule_before"], routing["chosen"]) == ("soft", "paid", "local-hifi")
        assert routing["budget_used"] == 0.825
        assert kinds(ledger(client, project_id, job["id"])) == [("hold", 10.0, "fake-paid"),
                                                                ("release", 10.0, "fake-paid")]

        # The share crossed between the fallback's look and its move: judged again under the
        # project's lock, as a submit is, the move to fake-b is not made, and the rule now followed.
        project_id, asset_id = draft_asset(client, policy="soft-fallback-test",
                                           budget={"limit": 200, "period": "month"})
        look_then_another_request_holds, _ = hold_after_the_routing_look(project_id, 165_000)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(JobRunner, "_routing_now", look_then_another_request_holds)
            raced = wait_for_job(client, promote(client, asset_id, tags={"fake": "fail"})["id"])
        assert [(a["engine"], a["status"]) for a in raced["attempts"]] == [
            ("fake-paid", "failed"), ("local-hifi", "succeeded")], raced
        assert (raced["routing"]["rule"], raced["routing"]["rule_before"]) == ("soft", "paid")


NARROW_FALLBACK_POLICY = routing_policy(
    "narrow-fallback-test", ["fake-paid", "fake-b", "local-hifi"], soft=("narrow", 0.8, ["fake-b"]),
    description="On fake-paid, then fake-b, then local-hifi; fake-b alone once 80% of the budget is used.")


def test_a_fallback_s_candidate_the_rule_changed_under_is_tried_under_the_new_rule(
        new_settings: SettingsFactory, tmp_path: Path) -> None:
    """The share crosses 80% between the fallback's look and its move to fake-b: the move finds the
    `narrow` rule applies, which gives fake-b too. fake-b was only looked at, never judged (the
    move refused for the rule alone): it is the new rule's candidate, and the job moves there. It
    was left out as already looked at, and the job failed with its engine's error, no reason told."""
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "narrow-fallback-test": NARROW_FALLBACK_POLICY})
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder)
    with running(settings) as client:
        project_id, asset_id = draft_asset(client, policy="narrow-fallback-test",
                                           budget={"limit": 200, "period": "month"})
        look_then_another_request_holds, held = hold_after_the_routing_look(project_id, 165_000)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(JobRunner, "_routing_now", look_then_another_request_holds)
            done = wait_for_job(client, promote(client, asset_id, tags={"fake": "fail"})["id"])
        assert held
        assert (done["status"], [(a["engine"], a["status"]) for a in done["attempts"]]) == (
            "succeeded", [("fake-paid", "failed"), ("fake-b", "succeeded")]), done
        assert (done["routing"]["rule"], done["routing"]["rule_before"]) == ("narrow", "paid")
        assert kinds(ledger(client, project_id, done["id"])) == [
            ("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"), ("hold", 20.0, "fake-b"),
            ("capture", 20.0, "fake-b")]


def check_two_fallbacks_into_room_for_one(client: httpx.Client, folder: Path) -> None:
    """Two jobs on fake-paid (10 each), fake-b (20) skipped for the budget by both, fail at once
    with the limit raised to 35: each move releases its own 10, and fake-b fits the first (10 + 20
    = 30) but not the second (30 + 20 = 40). Exactly one moves to fake-b, the other to local-hifi:
    the project is never held or charged past its limit, and every hold is settled once.
    `client`: a fresh service (`all_agree` counts every project) with FAKE_ENGINES and the
    budget-first-test policy."""
    project_id, asset_id = draft_asset(client, policy="budget-first-test", budget={"limit": 15, "period": "month"})
    go = folder / "go"
    tags = {"fake": "wait-before-send", "until": str(go), "then": "fail"}
    first = promote(client, asset_id, tags=tags)
    assert client.patch(f"/v1/projects/{project_id}", json={"budget": {"limit": 25}}).status_code == 200
    second = promote(client, asset_id, tags=tags)
    for job in (first, second):
        assert job["engine"] == "fake-paid"
        assert [c["engine"] for c in job["routing"]["candidates"] if (c["skipped"] or "").startswith(
            "does not fit the budget")] == ["fake-b"]
    assert client.patch(f"/v1/projects/{project_id}", json={"budget": {"limit": 35}}).status_code == 200
    poll(lambda: all(client.get(f"/v1/jobs/{j['id']}").json()["status"] == "running" for j in (first, second)),
         what="both jobs sent to fake-paid")
    go.touch()
    done = [wait_for_job(client, job["id"]) for job in (first, second)]
    assert sorted(d["engine"] for d in done) == ["fake-b", "local-hifi"], done
    assert all(d["status"] == "succeeded" for d in done), done
    entries = ledger(client, project_id)
    assert_settled_once(entries)
    assert sorted(kinds(entries)) == sorted([
        ("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"), ("hold", 10.0, "fake-paid"),
        ("release", 10.0, "fake-paid"), ("hold", 20.0, "fake-b"), ("capture", 20.0, "fake-b")])
    budget = client.get(f"/v1/projects/{project_id}/budget").json()
    assert (budget["charged"], budget["held"], budget["available"]) == (20.0, 0, 15.0)
    all_agree(client, [project_id])


def test_two_fallbacks_into_room_for_one_take_it_once(new_settings: SettingsFactory, tmp_path: Path) -> None:
    # A service of its own: `all_agree` compares the spend report and /metrics of every project.
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "budget-first-test": BUDGET_FIRST_POLICY})
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder)) as client:
        check_two_fallbacks_into_room_for_one(client, tmp_path)


def test_a_candidate_skipped_for_the_budget_is_not_taken_off_the_machine_once_the_project_keeps_local(
        paid_server: httpx.Client, tmp_path: Path) -> None:
    """fake-b (20) skipped for the budget; while fake-paid's job waits, the project moves to
    `local-only` and its limit is raised so fake-b would fit. fake-paid fails unsent: the fallback
    must not send the now-private job to fake-b (a cloud engine), whatever the budget allows; it
    goes to local-hifi, fake-paid's hold released once and nothing held for fake-b."""
    project_id, asset_id = draft_asset(paid_server, policy="budget-first-test", budget={"limit": 15, "period": "month"})
    go = tmp_path / "go"
    job = promote(paid_server, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
    assert job["engine"] == "fake-paid"
    poll(lambda: paid_server.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the send")
    assert paid_server.patch(f"/v1/projects/{project_id}",
                             json={"budget": {"limit": 100}, "policy": "local-only"}).status_code == 200
    go.touch()
    done = wait_for_job(paid_server, job["id"])
    assert [a["engine"] for a in done["attempts"]] == ["fake-paid", "local-hifi"], done
    entries = ledger(paid_server, project_id, job["id"])
    assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid")]
    assert_settled_once(entries)


def test_a_candidate_skipped_for_the_budget_is_held_to_the_job_s_max_credits_at_fallback(
        paid_server: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_credits 20: fake-b (20) fits the cap and is skipped for the budget of 15. Priced at 25
    by the time fake-paid fails (a new prices file), with the limit raised to 100, it is over the
    cap and skipped for it: the job goes to local-hifi with nothing held for fake-b."""
    from tests.routing import NamedFakeEngine

    project_id, asset_id = draft_asset(paid_server, policy="budget-first-test", budget={"limit": 15, "period": "month"})
    go = tmp_path / "go"
    job = promote(paid_server, asset_id, max_credits=20,
                  tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
    assert job["engine"] == "fake-paid"
    assert {c["engine"]: c["skipped"] for c in job["routing"]["candidates"]}["fake-b"].startswith(
        "does not fit the budget")
    poll(lambda: paid_server.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the send")
    assert paid_server.patch(f"/v1/projects/{project_id}", json={"budget": {"limit": 100}}).status_code == 200
    monkeypatch.setattr(NamedFakeEngine, "estimate", lambda self, req: 25_000)
    go.touch()
    done = wait_for_job(paid_server, job["id"])
    assert [a["engine"] for a in done["attempts"]] == ["fake-paid", "local-hifi"], done
    moved = [e.data for e in read_events(paid_server, job["id"]) if e.data.get("state") == "fallback"]
    assert [m.get("skipped") for m in moved] == [[{"engine": "fake-b", "reason": "max_credits", "estimate": 25.0}]]
    entries = ledger(paid_server, project_id, job["id"])
    assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid")]
    assert_settled_once(entries)


def test_a_candidate_skipped_for_the_budget_whose_circuit_opened_since_is_not_taken_at_fallback(
        new_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fake-b (20) skipped for a budget of 15; while fake-paid's job waits, the limit is raised to
    100 and fake-b fails two jobs asked of it by name (its circuit opens). fake-paid fails unsent:
    fake-b fits the budget now, but its circuit keeps the fallback off it (said as `circuit_open`);
    the job goes to local-hifi, nothing held for fake-b."""
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "budget-first-test": BUDGET_FIRST_POLICY})
    monkeypatch.setattr("orchestrator.services.EngineHealth", functools.partial(EngineHealth, threshold=2))
    with running(new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder)) as client:
        project_id, asset_id = draft_asset(client, policy="budget-first-test", budget={"limit": 15, "period": "month"})
        go = tmp_path / "go"
        job = promote(client, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
        assert job["engine"] == "fake-paid"
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the send")
        assert client.patch(f"/v1/projects/{project_id}", json={"budget": {"limit": 100}}).status_code == 200
        _, other = draft_asset(client)
        for _ in range(2):
            failed = wait_for_job(client, promote(client, other, engine="fake-b", tags={"fake-b": "fail"})["id"])
            assert failed["status"] == "failed", failed
        assert health(client)["fake-b"] == "open"
        go.touch()
        done = wait_for_job(client, job["id"])
        assert [a["engine"] for a in done["attempts"]] == ["fake-paid", "local-hifi"], done
        moved = [e.data for e in read_events(client, job["id"]) if e.data.get("state") == "fallback"]
        assert [m.get("skipped") for m in moved] == [[{"engine": "fake-b", "reason": "circuit_open"}]]
        entries = ledger(client, project_id, job["id"])
        assert kinds(entries) == [("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid")]
        assert_settled_once(entries)


def check_a_cancel_racing_a_fallback_s_move_settles_each_hold_once(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, first: str,
        waits_for_the_write_lock: Callable[[int], bool] | None = None) -> None:
    """A user's cancel and a fallback's move (the failed engine's hold released and the next
    candidate's taken, in one transaction), each forced to find the other's transaction open:
    `first` = "move" pauses the move inside its transaction, its new hold written, while the cancel
    starts; "cancel" pauses the cancel's write (the request recorded on the running job) while the
    move starts. The ledger updates a hold by its id alone, so the money rests on the write lock every
    write transaction takes first (`Database.transaction`): the second one reads only once the first
    has committed, and then the job's own compare-and-set (queued/running, the claim's attempt, no
    cancel asked) stops a settlement of a hold the first one settled. `waits_for_the_write_lock(pid)`,
    on PostgreSQL: whether that backend waits for it (the advisory lock)."""
    mine = threading.local()  # which of the two racing paths this thread runs
    move_ready, go_move, cancel_in_txn, go_cancel = (threading.Event() for _ in range(4))
    in_move, began = threading.Event(), {"move": threading.Event(), "cancel": threading.Event()}
    pids: dict[str, int] = {}
    job_ids: list[str] = []

    def wait(flag: threading.Event, what: str) -> None:
        assert flag.wait(30), f"{what} did not happen"

    def begin(conn: Any) -> None:  # before the BEGIN (SQLite's IMMEDIATE) and the advisory lock
        path = getattr(mine, "path", None)
        if path in began and not began[path].is_set():
            pid = getattr(getattr(conn.connection.dbapi_connection, "info", None), "backend_pid", None)
            if pid is not None:
                pids[path] = pid
            began[path].set()

    hold = Ledger.hold

    def hold_then_pause(self: Ledger, s: Any, project: Any, job: Job, amount: int, **kw: Any) -> Any:
        entry = hold(self, s, project, job, amount, **kw)
        if first == "move" and job.id in job_ids and job.engine == "fake-b":
            in_move.set()  # the first hold released, the job queued on fake-b, its hold written: uncommitted
            wait(go_move, "the test's go for the move")
        return entry

    requeue_on = JobRunner._requeue_on

    def requeue_when_told(self: JobRunner, claim: Any, *args: Any) -> None:
        if first == "cancel":
            move_ready.set()
            wait(go_move, "the test's go for the move")
            mine.path = "move"
        try:
            requeue_on(self, claim, *args)
        finally:
            mine.path = None

    def marked(name: str) -> Any:
        original = getattr(JobService, name)

        @functools.wraps(original)
        def run(self: JobService, job_id: str, *args: Any, **kw: Any) -> Any:
            mine.path = "cancel"
            try:
                return original(self, job_id, *args, **kw)
            finally:
                mine.path = None
        return run

    def pause_the_cancel(state: ORMExecuteState) -> None:
        # The cancel's first write, its transaction (and the write lock) open.
        if (first == "cancel" and getattr(mine, "path", None) == "cancel" and state.is_update
                and not cancel_in_txn.is_set()):
            cancel_in_txn.set()
            wait(go_cancel, "the test's go for the cancel")

    monkeypatch.setattr(Ledger, "hold", hold_then_pause)
    monkeypatch.setattr(JobRunner, "_requeue_on", requeue_when_told)
    for name in ("cancel_queued", "record_cancel", "ask_holder_to_cancel", "cancel_orphan"):
        monkeypatch.setattr(JobService, name, marked(name))
    event.listen(Engine, "begin", begin)
    event.listen(SqlSession, "do_orm_execute", pause_the_cancel)
    answers: list[httpx.Response] = []
    try:
        with running(settings) as client:
            project_id, asset_id = draft_asset(client)
            job = promote(client, asset_id, tags={"fake": "fail", "fake-b": "hang"})
            job_ids.append(job["id"])

            def cancel() -> None:
                with httpx.Client(base_url=str(client.base_url), timeout=60) as other:
                    answers.append(other.post(f"/v1/jobs/{job['id']}/cancel"))

            canceling = threading.Thread(target=cancel)
            if first == "move":
                wait(in_move, "the move")
                canceling.start()
                wait(began["cancel"], "the cancel's write transaction")
                if waits_for_the_write_lock is not None:
                    poll(functools.partial(waits_for_the_write_lock, pids["cancel"]),
                         what="the cancel waiting for the write lock")
                go_move.set()
            else:
                wait(move_ready, "the fallback")
                canceling.start()
                wait(cancel_in_txn, "the cancel's write")
                go_move.set()
                wait(began["move"], "the move's write transaction")
                if waits_for_the_write_lock is not None:
                    poll(functools.partial(waits_for_the_write_lock, pids["move"]),
                         what="the move waiting for the write lock")
                go_cancel.set()
            canceling.join(60)
            assert [a.status_code for a in answers] == [202], [a.text for a in answers]
            done = wait_for_job(client, job["id"])
            entries = ledger(client, project_id, job["id"])
    finally:
        go_move.set()
        go_cancel.set()
        event.remove(SqlSession, "do_orm_execute", pause_the_cancel)
        event.remove(Engine, "begin", begin)
    assert done["status"] == "canceled", done
    assert_settled_once(entries)
    holds = [e for e in entries if e["kind"] == "hold"]
    settled = {(e["hold_id"], e["kind"]) for e in entries if e["kind"] in ("capture", "release")}
    first_hold = holds[0]
    assert first_hold["engine"] == "fake-paid"
    # fake-paid failed before it sent anything: its hold is released, once, and never captured.
    assert (first_hold["id"], "release") in settled and (first_hold["id"], "capture") not in settled, entries
    if first == "move":
        # Moved, then canceled on fake-b: queued (released) or, claimed there first, running (settled
        # as a cancel of a sent job is). Each hold settled once either way (above).
        assert [h["engine"] for h in holds] == ["fake-paid", "fake-b"], entries
        assert done["engine"] == "fake-b"
    else:
        # The move found the cancel asked: it rolled back whole, and nothing was held on fake-b.
        assert [h["engine"] for h in holds] == ["fake-paid"], entries
        assert done["engine"] == "fake-paid" and [e["kind"] for e in entries] == ["hold", "release"], entries


@pytest.mark.parametrize("first", ["move", "cancel"])
def test_a_cancel_racing_a_fallback_s_move_settles_each_hold_once(
        new_settings: SettingsFactory, fallback_policies: Path, monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    check_a_cancel_racing_a_fallback_s_move_settles_each_hold_once(
        new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=fallback_policies), monkeypatch, first)


def test_a_fallback_a_private_rule_now_takes_makes_private_images(new_settings: SettingsFactory,
                                                                  tmp_path: Path) -> None:
    """Past 80% used, the policy's `soft` rule keeps the project's work on this machine (`private`),
    and a request it routes is recorded private (tags.privacy=local: its images' promotions and
    polishes stay local). A job routed at 0% by `paid` and moved there by its fallback once the
    share crossed is made by that rule too: recorded private as a submit then would be."""
    from orchestrator.db import Database

    private_soft = SOFT_FALLBACK_POLICY.replace('"soft-fallback-test"', '"private-soft-test"').replace(
        'engines = ["local-hifi"]', 'engines = ["local-hifi"]\nprivate = true')
    folder = write_policies(tmp_path / "policies",
                            {"fallback-test": FALLBACK_POLICY, "private-soft-test": private_soft})
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder)
    with running(settings) as client:
        project_id, asset_id = draft_asset(client, policy="private-soft-test", budget={"limit": 200, "period": "month"})
        go = tmp_path / "go"
        job = promote(client, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
        assert (job["engine"], job["routing"]["rule"], job["routing"]["private"]) == ("fake-paid", "paid", False)
        poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the job sent")
        db = Database(settings.resolved_database_url)
        try:
            with db.transaction() as s:  # another client's work, held meanwhile
                s.add(LedgerEntry(project_id=project_id, kind="hold", amount=165_000, created_at=utcnow()))
            go.touch()
            done = wait_for_job(client, job["id"])
            assert (done["status"], done["engine"], done["routing"]["rule"], done["routing"]["private"]) == (
                "succeeded", "local-hifi", "soft", True), done
            with db.session() as s:
                row = s.get(Job, job["id"])
                assert row is not None
                assert row.params["tags"].get("privacy") == "local", row.params
        finally:
            db.dispose()


PRIVATE_OVER_HALF_POLICY = routing_policy(
    "private-over-half-test", ["fake-paid", "fake-b", "local-hifi"], soft=("tight", 0.5, ["local-hifi"]),
    description="On fake-paid, then fake-b, then local-hifi; kept on this machine once half the budget is used."
).replace('engines = ["local-hifi"]', 'engines = ["local-hifi"]\nprivate = true')

# The client's choice of fake-b routed by a rule of its own, before `acme`'s private one.
CHOSEN_ENGINE_POLICY = CLIENT_PRIVATE_POLICY.replace('"client-private-test"', '"chosen-engine-test"').replace(
    '[[rules]]\nname = "acme"',
    '[[rules]]\nname = "chosen"\nmatch = { stage = ["bridge", "polish"], engine = ["fake-b"] }\n'
    'engines = ["fake-b"]\n\n[[rules]]\nname = "acme"')

# `paid` caps a job at 15 credits (fake-b, at 20, is over it); past 80% of the budget, `roomy`,
# uncapped, sends the job to fake-b.
CAPPED_PAID_POLICY = routing_policy(
    "capped-paid-test", ["fake-paid", "local-hifi"], soft=("roomy", 0.8, ["fake-b"]),
    description="On fake-paid, then local-hifi, at most 15 credits; fake-b, uncapped, once 80% of the budget is used."
).replace('engines = ["fake-paid", "local-hifi"]', 'engines = ["fake-paid", "local-hifi"]\nmax_credits = 15')


@pytest.fixture(scope="module")
def money_server(new_settings: SettingsFactory,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Settings]]:
    """A service as `paid_server`, with the budget-rule and private policies, and its settings (for
    its database)."""
    folder = write_policies(tmp_path_factory.mktemp("policies"), {
        "fallback-test": FALLBACK_POLICY, "soft-fallback-test": SOFT_FALLBACK_POLICY,
        "narrow-fallback-test": NARROW_FALLBACK_POLICY, "client-private-test": CLIENT_PRIVATE_POLICY,
        "private-over-half-test": PRIVATE_OVER_HALF_POLICY, "chosen-engine-test": CHOSEN_ENGINE_POLICY,
        "capped-paid-test": CAPPED_PAID_POLICY})
    settings = new_settings(engines=FAKE_ENGINES, policy="fallback-test", policy_dir=folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("orchestrator.services.EngineHealth", functools.partial(EngineHealth, threshold=1000))
        with running(settings) as client:
            yield client, settings


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[Any]:
    from orchestrator.db import Database

    db = Database(settings.resolved_database_url)
    try:
        yield db
    finally:
        db.dispose()


def every_project(client: httpx.Client) -> list[str]:
    response = client.get("/v1/projects", params={"limit": 200})
    assert response.status_code == 200, response.text
    return [p["id"] for p in response.json()["items"]]


def bought_on_fake_b(client: httpx.Client, asset_id: str, seed: int) -> dict[str, Any]:
    """An earlier identical request's result on fake-b, for a fallback there to copy."""
    bought = wait_for_job(client, promote(client, asset_id, engine="fake-b", cache=True, seed=seed)["id"])
    assert (bought["status"], bought["engine"], bought["cost"]["cache_hit"]) == ("succeeded", "fake-b", False)
    return bought


def test_a_fallback_s_copy_that_would_pass_the_storage_quota_is_skipped(
        money_server: tuple[httpx.Client, Settings]) -> None:
    """A copy's rows count their PNG's bytes in the project's usage, though they share the file: a
    fallback's copy of images larger than the job held (fake-b answered a larger image than asked,
    as a provider that picks the size does) took the project past its quota, unjudged. It is
    skipped `storage_quota` as a move is, and the job moves on to local-hifi."""
    client, settings = money_server
    project_id, asset_id = draft_asset(client, storage_quota_mb=4, budget={"limit": 100, "period": "month"})
    bought = bought_on_fake_b(client, asset_id, seed=21)
    with database(settings) as db, db.transaction() as s:  # its image 3 MiB, as a 2048x2048 answer's PNG
        [asset] = s.exec(select(Asset).where(col(Asset.job_id) == bought["id"])).all()
        project = s.get(Project, project_id)
        assert project is not None and asset.bytes is not None
        project.storage_bytes += 3 * MIB_BYTES - asset.bytes
        asset.bytes = 3 * MIB_BYTES
        s.add_all([asset, project])
    job = promote(client, asset_id, cache=True, seed=21, tags={"fake": "fail"})
    assert job["engine"] == "fake-paid"
    done = wait_for_job(client, job["id"])
    assert (done["status"], done["engine"], done["cost"]["cache_hit"]) == ("succeeded", "local-hifi", False), done
    moved = [e.data for e in read_events(client, job["id"]) if e.data.get("state") == "fallback"]
    [skip] = moved[0]["skipped"]
    assert (skip["engine"], skip["reason"], skip["job_bound_bytes"]) == ("fake-b", "storage_quota", 3 * MIB_BYTES)
    project_now = client.get(f"/v1/projects/{project_id}").json()
    assert project_now["storage_bytes"] <= 4 * MIB_BYTES, project_now
    assert kinds(ledger(client, project_id, job["id"])) == [("hold", 10.0, "fake-paid"),
                                                            ("release", 10.0, "fake-paid")]
    all_agree(client, every_project(client))


def test_a_fallback_s_copy_follows_the_rule_the_budget_s_share_picks_now(
        money_server: tuple[httpx.Client, Settings], tmp_path: Path) -> None:
    """Past 80% used, `narrow` gives fake-b alone: a job routed by `paid` whose fallback copies
    fake-b's images under `narrow` records that rule, as its move would (it recorded `paid`)."""
    client, settings = money_server
    project_id, asset_id = draft_asset(client, policy="narrow-fallback-test", budget={"limit": 200, "period": "month"})
    bought_on_fake_b(client, asset_id, seed=22)
    go = tmp_path / "go"
    job = promote(client, asset_id, cache=True, seed=22,
                  tags={"fake": "wait-before-send", "until": str(go), "then": "fail"})
    assert (job["engine"], job["routing"]["rule"]) == ("fake-paid", "paid")
    poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the job sent")
    with database(settings) as db, db.transaction() as s:  # another client's work, held meanwhile
        s.add(LedgerEntry(project_id=project_id, kind="hold", amount=145_000, created_at=utcnow()))
    go.touch()
    done = wait_for_job(client, job["id"])
    assert (done["status"], done["engine"], done["cost"]["cache_hit"]) == ("succeeded", "fake-b", True), done
    assert (done["routing"]["rule"], done["routing"]["rule_before"]) == ("narrow", "paid"), done["routing"]


def test_a_fallback_s_copy_is_judged_on_the_rule_under_the_project_s_lock(
        money_server: tuple[httpx.Client, Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """The share crosses 80% between the fallback's look and its copy of fake-b's images: under
    `soft` (local-hifi alone) the copy is not made, as a move there would not be; the job follows
    `soft` to local-hifi (it was copied from fake-b, under the rule that no longer applied)."""
    client, _ = money_server
    project_id, asset_id = draft_asset(client, policy="soft-fallback-test", budget={"limit": 200, "period": "month"})
    bought_on_fake_b(client, asset_id, seed=23)
    look_then_another_request_holds, _ = hold_after_the_routing_look(project_id, 145_000)

    monkeypatch.setattr(JobRunner, "_routing_now", look_then_another_request_holds)
    done = wait_for_job(client, promote(client, asset_id, cache=True, seed=23, tags={"fake": "fail"})["id"])
    assert [(a["engine"], a["status"]) for a in done["attempts"]] == [
        ("fake-paid", "failed"), ("local-hifi", "succeeded")], done
    assert (done["cost"]["cache_hit"], done["routing"]["rule"], done["routing"]["rule_before"]) == (
        False, "soft", "paid")


def test_a_fallback_onto_a_local_engine_is_judged_on_the_project_s_device_time(
        money_server: tuple[httpx.Client, Settings], tmp_path: Path) -> None:
    """Routed while its project had device time left, the job's cloud engines fail after its quota
    was set to 0: the fallback to local-hifi is skipped `device_time` (it ran there, unjudged), and
    with no candidate left the job fails saying why."""
    client, _ = money_server
    project_id, asset_id = draft_asset(client, local_seconds_per_day=100_000,
                                       budget={"limit": 100, "period": "month"})
    go = tmp_path / "go"
    job = promote(client, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail",
                                          "fake-b": "fail"})
    assert [c["engine"] for c in job["routing"]["candidates"]] == ["fake-paid", "fake-b", "local-hifi"]
    poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the job sent")
    patched = client.patch(f"/v1/projects/{project_id}", json={"local_seconds_per_day": 0})
    assert patched.status_code == 200, patched.text
    go.touch()
    done = wait_for_job(client, job["id"])
    assert (done["status"], [(a["engine"], a["status"]) for a in done["attempts"]]) == (
        "failed", [("fake-paid", "failed"), ("fake-b", "failed")]), done
    [skip] = done["error"]["details"]["fallbacks_skipped"]
    assert (skip["engine"], skip["reason"], skip["quota_seconds"]) == ("local-hifi", "device_time", 0), skip
    assert skip["used_seconds"] >= 0
    assert kinds(ledger(client, project_id, job["id"])) == [
        ("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"), ("hold", 20.0, "fake-b"),
        ("release", 20.0, "fake-b")]
    all_agree(client, every_project(client))


def test_a_fallback_never_leaves_the_machine_where_the_project_s_policy_now_keeps_the_request_local(
        money_server: tuple[httpx.Client, Settings], tmp_path: Path) -> None:
    """Routed by `fallback-test`, the project is PATCHed to `client-private-test`, whose rule for
    its `client = acme` requests is private (the policy as a whole is not local-only, so no job is
    marked). fake-paid fails: the recorded candidates' fake-b is skipped `private`, not sent the
    job's draft, and the job moves to local-hifi."""
    client, _ = money_server
    project_id, asset_id = draft_asset(client, budget={"limit": 100, "period": "month"})
    go = tmp_path / "go"
    job = promote(client, asset_id, tags={"fake": "wait-before-send", "until": str(go), "then": "fail",
                                          "client": "acme"})
    assert (job["engine"], job["routing"]["policy"], job["routing"]["private"]) == (
        "fake-paid", "fallback-test", False)
    poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the job sent")
    patched = client.patch(f"/v1/projects/{project_id}", json={"policy": "client-private-test"})
    assert patched.status_code == 200, patched.text
    go.touch()
    done = wait_for_job(client, job["id"])
    assert (done["status"], [(a["engine"], a["status"]) for a in done["attempts"]]) == (
        "succeeded", [("fake-paid", "failed"), ("local-hifi", "succeeded")]), done
    moved = [e.data for e in read_events(client, job["id"]) if e.data.get("state") == "fallback"]
    assert [(s["engine"], s["reason"]) for s in moved[0]["skipped"]] == [("fake-b", "private")]


def test_a_job_whose_own_hold_crosses_a_private_rule_s_share_is_sent_as_routed(
        money_server: tuple[httpx.Client, Settings]) -> None:
    """Routed by `paid` at 45% used, the job's own hold of 10 takes the share to 55%, past `tight`
    (private, over 50%): the rule is judged without that hold, as its submit judged it, so the
    policy, unchanged, does not cancel the job before its first send."""
    client, settings = money_server
    project_id, asset_id = draft_asset(client, policy="private-over-half-test",
                                       budget={"limit": 100, "period": "month"})
    with database(settings) as db, db.transaction() as s:  # another client's work, held before the submit
        s.add(LedgerEntry(project_id=project_id, kind="hold", amount=45_000, created_at=utcnow()))
    job = promote(client, asset_id)
    assert (job["engine"], job["routing"]["rule"]) == ("fake-paid", "paid")
    done = wait_for_job(client, job["id"])
    assert (done["status"], done["engine"]) == ("succeeded", "fake-paid"), done
    assert kinds(ledger(client, project_id, job["id"])) == [("hold", 10.0, "fake-paid"), ("capture", 10.0, "fake-paid")]


def test_a_fallback_judges_a_private_rule_on_the_share_the_move_leaves(
        money_server: tuple[httpx.Client, Settings]) -> None:
    """As above, fake-paid fails: the move leaves 45% used (its hold released), under `tight`, so
    fake-b takes the job as `_routing_now` judged; read with the failed engine's hold, the job was
    skipped `private` to local-hifi."""
    client, settings = money_server
    project_id, asset_id = draft_asset(client, policy="private-over-half-test",
                                       budget={"limit": 100, "period": "month"})
    with database(settings) as db, db.transaction() as s:
        s.add(LedgerEntry(project_id=project_id, kind="hold", amount=45_000, created_at=utcnow()))
    job = promote(client, asset_id, tags={"fake": "fail"})
    assert (job["engine"], job["routing"]["rule"]) == ("fake-paid", "paid")
    done = wait_for_job(client, job["id"])
    assert (done["status"], [(a["engine"], a["status"]) for a in done["attempts"]]) == (
        "succeeded", [("fake-paid", "failed"), ("fake-b", "succeeded")]), done
    assert kinds(ledger(client, project_id, job["id"])) == [
        ("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"), ("hold", 20.0, "fake-b"),
        ("capture", 20.0, "fake-b")]


def test_a_request_for_an_engine_routed_by_its_own_rule_is_sent_there(
        money_server: tuple[httpx.Client, Settings]) -> None:
    """`chosen` (the client's choice of fake-b) comes before `acme` (private): acme's request for
    fake-b is routed there by it, the policy never changed. Judged again without the choice (a
    job does not record it), the request matched `acme` and the job was canceled before its send."""
    client, _ = money_server
    project_id, asset_id = draft_asset(client, policy="chosen-engine-test")
    job = promote(client, asset_id, engine="fake-b", tags={"client": "acme"})
    assert (job["engine"], job["routing"]["rule"], job["routing"]["private"]) == ("fake-b", "chosen", False)
    done = wait_for_job(client, job["id"])
    assert (done["status"], done["engine"]) == ("succeeded", "fake-b"), done
    assert kinds(ledger(client, project_id, job["id"])) == [("hold", 20.0, "fake-b"), ("capture", 20.0, "fake-b")]


@pytest.mark.parametrize("max_credits", [None, 15])
def test_a_fallback_under_another_rule_is_capped_by_that_rule_and_the_request(
        money_server: tuple[httpx.Client, Settings], max_credits: int | None) -> None:
    """Routed by `paid` (max_credits 15) to fake-paid, which fails once another client's hold has
    taken the project past 80%: the job follows `roomy`, which sets no cap, to fake-b (20). The
    cap `paid` recorded was kept and fake-b skipped `max_credits`, failing the job. The request's
    own max_credits (15) still bounds it under any rule."""
    client, _ = money_server
    project_id, asset_id = draft_asset(client, policy="capped-paid-test", budget={"limit": 200, "period": "month"})
    look_then_another_request_holds, held = hold_after_the_routing_look(project_id, 165_000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(JobRunner, "_routing_now", look_then_another_request_holds)
        job = promote(client, asset_id, tags={"fake": "fail"},
                      **({} if max_credits is None else {"max_credits": max_credits}))
        assert (job["engine"], job["routing"]["rule"], job["routing"]["max_credits"]) == ("fake-paid", "paid", 15.0)
        done = wait_for_job(client, job["id"])
    assert held
    routing = done["routing"]
    if max_credits is None:
        assert (routing["rule"], routing["rule_before"], routing["max_credits"]) == ("roomy", "paid", None), routing
        assert routing["requested_max_credits"] is None, routing
        assert (done["status"], [(a["engine"], a["status"]) for a in done["attempts"]]) == (
            "succeeded", [("fake-paid", "failed"), ("fake-b", "succeeded")]), done
        assert kinds(ledger(client, project_id, done["id"])) == [
            ("hold", 10.0, "fake-paid"), ("release", 10.0, "fake-paid"), ("hold", 20.0, "fake-b"),
            ("capture", 20.0, "fake-b")]
    else:  # failed with no move, its routing the one recorded at submit
        assert (routing["rule"], routing["max_credits"], routing["requested_max_credits"]) == ("paid", 15.0, 15.0)
        assert (done["status"], done["engine"]) == ("failed", "fake-paid"), done
        assert done["error"]["details"]["fallbacks_skipped"] == [
            {"engine": "fake-b", "reason": "max_credits", "estimate": 20.0}]
        assert kinds(ledger(client, project_id, done["id"])) == [("hold", 10.0, "fake-paid"),
                                                                ("release", 10.0, "fake-paid")]


def test_a_job_sent_after_other_holds_cross_a_private_rule_s_share_goes_as_routed(
        money_server: tuple[httpx.Client, Settings], tmp_path: Path) -> None:
    """Routed by `paid` at 0% used to fake-paid; before it sends, another client's hold of 60 takes
    the project past `tight` (private, over 50%). The version that routed it is unchanged: the job
    is sent as routed, not canceled before its send (the share measures spending, not the request's
    data, and a queued job's routing is not revisited); only a fallback would follow `tight`."""
    client, settings = money_server
    project_id, asset_id = draft_asset(client, policy="private-over-half-test",
                                       budget={"limit": 100, "period": "month"})
    go = tmp_path / "go"
    prompt = "a lighthouse, sent as routed past a private rule's share"
    job = promote(client, asset_id, prompt=prompt, tags={"fake": "wait-before-send", "until": str(go)})
    assert (job["engine"], job["routing"]["rule"]) == ("fake-paid", "paid")
    poll(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="the job claimed")
    with database(settings) as db, db.transaction() as s:  # another client's work, held after the submit
        s.add(LedgerEntry(project_id=project_id, kind="hold", amount=60_000, created_at=utcnow()))
    go.touch()
    done = wait_for_job(client, job["id"])
    assert (done["status"], done["engine"]) == ("succeeded", "fake-paid"), done
    assert kinds(ledger(client, project_id, job["id"])) == [("hold", 10.0, "fake-paid"), ("capture", 10.0, "fake-paid")]
    assert prompt in " ".join(fakes.SENT)
