"""Every view a cost dashboard reads agrees with the ledger, to the thousandth of a credit: the
spend report by each grouping (JSON and CSV), `/metrics`' charged credits, each project's budget in
its window, and each job's `cost`, through a history that crosses midnight at the end of a month
(day, week and month windows and a lifetime budget), with grants, metered local work, unknown
outcomes and their reconciliation.

The targeted tests elsewhere check one view against one case; this one reads them all side by
side, as a dashboard does, so that one view drifting from the others (a kind counted in one and not
another, a window edge read two ways) shows."""

from __future__ import annotations

import csv
import io
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.credits import create_project, get_json, jobs_of, ledger, make_draft, promote_ok, wait_for_job

# 2026-12-31T23:00:00Z, a Thursday: the last hour of a day and of a month, in the middle of an ISO
# week; then 2027-01-01T00:00:05Z.
NEW_YEAR_S_EVE = 1_798_758_000_000_000
NEW_YEAR = 1_798_761_605_000_000
CHARGES = ("capture", "adjustment")


def _ms(credits: float) -> int:
    return round(credits * 1000)


def _spend_agrees(api: httpx.Client, entries: list[dict[str, Any]]) -> None:
    charges = [e for e in entries if e["kind"] in CHARGES]
    keys: dict[str, Callable[[dict[str, Any]], str]] = {
        "engine": lambda e: e["engine"] or "-", "stage": lambda e: e["stage"] or "-",
        "project": lambda e: e["project_id"], "day": lambda e: e["created_at"][:10]}
    for group_by, key in keys.items():
        charged: dict[str, int] = defaultdict(int)
        unreconciled: dict[str, int] = defaultdict(int)
        waiting: Counter[str] = Counter()
        jobs: dict[str, set[str]] = defaultdict(set)
        for e in charges:
            charged[key(e)] += _ms(e["amount"])
            if e["unreconciled"]:
                unreconciled[key(e)] += _ms(e["amount"])
                waiting[key(e)] += 1
            if e["kind"] == "capture" and e["job_id"]:
                jobs[key(e)].add(e["job_id"])
        report = get_json(api, "/v1/spend", group_by=group_by)
        groups = {g["key"]: g for g in report["groups"]}
        assert {k: _ms(g["charged"]) for k, g in groups.items()} == charged, group_by
        assert {k: (_ms(g["unreconciled"]), g["unreconciled_entries"], g["jobs"]) for k, g in groups.items()} == {
            k: (unreconciled[k], waiting[k], len(jobs[k])) for k in charged}, group_by
        assert _ms(report["total"]) == sum(charged.values()), group_by
        rows = list(csv.reader(io.StringIO(api.get("/v1/spend", params={"group_by": group_by, "format": "csv"}).text)))
        assert [r[0] for r in rows[1:-1]] == [g["key"] for g in report["groups"]], group_by
        assert [(_ms(float(r[1])), _ms(float(r[2])), int(r[3]), int(r[4])) for r in rows[1:-1]] == [
            (_ms(g["charged"]), _ms(g["unreconciled"]), g["jobs"], g["images"]) for g in report["groups"]], group_by
        assert rows[-1][:2] == ["total", f"{report['total']:.3f}"], group_by


def _metrics_agree(api: httpx.Client, entries: list[dict[str, Any]]) -> None:
    charged: dict[tuple[str, str], int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    for e in entries:
        if e["kind"] in CHARGES:
            charged[e["engine"] or "-", e["stage"] or "-"] += _ms(e["amount"])
        if e["kind"] == "hold" and not e["settled"]:
            held[e["engine"]] += _ms(e["amount"])
    series = dict(line.rsplit(" ", 1) for line in api.get("/metrics").text.splitlines()
                  if line.startswith(("orchestrator_credits_charged{", "orchestrator_credits_held{")))
    for (engine, stage), amount in charged.items():
        assert _ms(float(series[f'orchestrator_credits_charged{{engine="{engine}",stage="{stage}"}}'])) == amount
    for engine in {e["engine"] for e in entries if e["engine"]}:
        assert _ms(float(series[f'orchestrator_credits_held{{engine="{engine}"}}'])) == held[engine], engine


def _budgets_and_jobs_agree(api: httpx.Client, project_id: str, entries: list[dict[str, Any]]) -> None:
    mine = [e for e in entries if e["project_id"] == project_id]
    budget = get_json(api, f"/v1/projects/{project_id}/budget")
    start, end = budget["window_start"], budget["window_end"]
    window = [e for e in mine if start is None or start <= e["created_at"] < end]  # RFC 3339 UTC sorts as text
    assert _ms(budget["charged"]) == sum(_ms(e["amount"]) for e in window if e["kind"] in CHARGES), budget
    assert _ms(budget["granted"]) == sum(_ms(e["amount"]) for e in window if e["kind"] == "grant"), budget
    assert _ms(budget["held"]) == sum(_ms(e["amount"]) for e in mine if e["kind"] == "hold" and not e["settled"])
    assert _ms(budget["available"]) == (_ms(budget["limit"]) + _ms(budget["granted"]) - _ms(budget["charged"])
                                        - _ms(budget["held"])), budget
    for job in jobs_of(api, project_id):
        its = [e for e in mine if e["job_id"] == job["id"]]
        assert (_ms(job["cost"]["held"]), _ms(job["cost"]["charged"])) == (
            sum(_ms(e["amount"]) for e in its if e["kind"] == "hold" and not e["settled"]),
            sum(_ms(e["amount"]) for e in its if e["kind"] in CHARGES)), (job, its)
        _engines_agree(job, its)


def _engines_agree(job: dict[str, Any], its: list[dict[str, Any]]) -> None:
    """A job's `cost.engines`: each engine's entries of the job, in the order it was tried on them,
    adding up to the job's totals (a job that fell back was held, and maybe charged, by several)."""
    by_engine: dict[str | None, dict[str, int]] = {}
    for e in its:
        figures = by_engine.setdefault(e["engine"], {"estimated": 0, "held": 0, "charged": 0, "released": 0})
        if e["kind"] == "hold":
            figures["estimated"] += _ms(e["amount"])
            figures["held"] += 0 if e["settled"] else _ms(e["amount"])
        elif e["kind"] in CHARGES:
            figures["charged"] += _ms(e["amount"])
        elif e["kind"] == "release":
            figures["released"] += _ms(e["amount"])
    shown = job["cost"]["engines"]
    assert {c["engine"]: {k: _ms(c[k]) for k in ("estimated", "held", "charged", "released")}
            for c in shown} == by_engine, (job, its)
    assert len(shown) == len(by_engine), shown
    tried = list(dict.fromkeys([a["engine"] for a in job["attempts"]] + [job["engine"]]))
    assert [c["engine"] for c in shown] == [e for e in tried if e in by_engine], (job, shown)
    assert sum(_ms(c["held"]) for c in shown) == _ms(job["cost"]["held"]), job
    assert sum(_ms(c["charged"]) for c in shown) == _ms(job["cost"]["charged"]), job


def _views_agree_with_the_jobs(api: httpx.Client, project_ids: list[str]) -> None:
    """What the spend report and /metrics count by engine is what the jobs' views say each engine
    held and charged them (every charge is a job's), to the thousandth."""
    charged: dict[str, int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    for project_id in project_ids:
        for job in jobs_of(api, project_id):
            for cost in job["cost"]["engines"]:
                charged[cost["engine"] or "-"] += _ms(cost["charged"])
                held[cost["engine"] or "-"] += _ms(cost["held"])
    report = {g["key"]: _ms(g["charged"]) for g in get_json(api, "/v1/spend", group_by="engine")["groups"]}
    assert report == {k: v for k, v in charged.items() if k in report or v}, report
    series = dict(line.rsplit(" ", 1) for line in api.get("/metrics").text.splitlines()
                  if line.startswith(("orchestrator_credits_charged{", "orchestrator_credits_held{")))
    by_metrics: dict[str, int] = defaultdict(int)
    for name, value in series.items():
        if name.startswith("orchestrator_credits_charged{"):
            by_metrics[name.split('engine="', 1)[1].split('"', 1)[0]] += _ms(float(value))
    assert {k: v for k, v in by_metrics.items() if v} == {k: v for k, v in charged.items() if v}, by_metrics
    for engine, amount in held.items():
        assert _ms(float(series.get(f'orchestrator_credits_held{{engine="{engine}"}}', 0))) == amount, engine


def all_agree(api: httpx.Client, project_ids: list[str]) -> list[dict[str, Any]]:
    """`project_ids`: every project of the service (the spend report and /metrics count them all)."""
    entries = [e for project_id in project_ids for e in ledger(api, project_id)]
    _spend_agrees(api, entries)
    _metrics_agree(api, entries)
    for project_id in project_ids:
        _budgets_and_jobs_agree(api, project_id, entries)
    _views_agree_with_the_jobs(api, project_ids)
    return entries


def test_every_view_agrees_with_the_ledger_across_new_year(paid_settings_for: Callable[..., Settings],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shift = [NEW_YEAR_S_EVE - time.time_ns() // 1000]
    monkeypatch.setattr("orchestrator.clock._host_us", lambda: time.time_ns() // 1000 + shift[0])
    settings = paid_settings_for(tmp_path / "data", local_gpu_second_credits=1.5)
    go = tmp_path / "go"
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=60.0) as api:
        projects = [create_project(api, {"limit": 100, "period": period}, name=period)
                    for period in ("day", "week", "month", "none")]
        drafts = [make_draft(api, project_id) for project_id in projects]  # metered, before midnight
        unknown = [promote_ok(api, draft, tags={"fake": "timeout"})["id"] for draft in drafts[:2]]
        assert {wait_for_job(api, job_id)["status"] for job_id in unknown} == {"failed"}
        # Held before midnight, charged after it (at a reported 12.345, over the 10 held).
        waiting = {"fake": "wait-before-send", "until": str(go), "cost": "12.345"}
        straddling = [promote_ok(api, draft, tags=waiting)["id"] for draft in drafts]
        before = all_agree(api, projects)
        assert sum(1 for e in before if e["kind"] == "hold" and not e["settled"]) == 4  # the straddling jobs'

        shift[0] = NEW_YEAR - time.time_ns() // 1000
        go.touch()
        assert {wait_for_job(api, job_id)["status"] for job_id in straddling} == {"succeeded"}
        for project_id in projects:
            assert api.post(f"/v1/projects/{project_id}/grants", json={"amount": 1.25}).status_code == 201
        after = all_agree(api, projects)
        days = {e["created_at"][:10] for e in after if e["kind"] in CHARGES}
        assert days == {"2026-12-31", "2027-01-01"}, days

        # Last year's unknown outcomes reconciled this year: the adjustments count where they are made.
        for project_id in projects[:2]:
            for entry in get_json(api, f"/v1/projects/{project_id}/ledger", unreconciled="true")["items"]:
                reconciled = api.post(f"/v1/projects/{project_id}/ledger/{entry['id']}/reconcile",
                                      json={"charged": 2.5})
                assert reconciled.status_code == 201, reconciled.text
        all_agree(api, projects)
        month = get_json(api, f"/v1/projects/{projects[2]}/budget")
        assert (month["charged"], month["granted"]) == (12.345, 1.25)  # the straddling job alone, and the grant
        day = get_json(api, f"/v1/projects/{projects[0]}/budget")
        assert _ms(day["charged"]) == 12_345 + 2_500 - 10_000  # and last year's timeout, reconciled at 2.5 today
