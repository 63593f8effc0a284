"""Benchmark: what the service's reads of its history cost as the history grows.

This is a benchmark, not a test: it prints ONE JSON object to stdout.

Every paid submit checks the project's budget inside the write transaction (`Ledger.balance`:
charged and granted in the budget window, held by open holds), so its cost is paid by every paid
request and, under the write lock, by everyone waiting behind it. `/metrics` totals jobs, assets
and the whole ledger by engine on every scrape, and a cost dashboard asks `/v1/spend` for its
report (with its `savings`, the period's drafts counted by size), and a client pages through a
project's jobs and assets (each job shown with what it held and charged). All are timed here on a
database (a fresh SQLite file by default, or `--database-url`, migrated to head) holding one
project with `--entries`
ledger entries (settled holds, each with its capture, one every `--spacing-minutes` back from
now, so most lie before the current monthly window), `--open` open holds, `--jobs` finished
draft jobs with one asset each (`--recent` of them ended now, the rest an hour ago, as the copies;
each held the device 0.4 s, under the project's device-time quota), and `--copies` jobs that
copied an earlier result; a second, empty project shows the floor.

Run: `.venv/bin/python bench/history.py [--entries 200000] [--jobs 100000] [--copies 50000] [--open 10] [--repeats 20]`
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import insert


def timed(call: Callable[[], object], repeats: int) -> dict[str, float]:
    call()  # warm: the first read pays for the pages coming into the cache
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return {"median_ms": round(1000 * statistics.median(samples), 3), "max_ms": round(1000 * max(samples), 3)}


def fill(db: Any, entries: int, open_holds: int, spacing: timedelta) -> None:
    from orchestrator.models import Job, LedgerEntry, Project

    now = datetime.now(UTC)
    with db.transaction() as s:
        # A device-time quota: /metrics gives such a project its 24-hour sum of device-seconds.
        s.add(Project(id="prj_big", name="big", policy="balanced", budget_limit=10**12, budget_period="month",
                      local_seconds_per_day=86_400))
        s.add(Project(id="prj_new", name="new", policy="balanced", budget_limit=10**12, budget_period="month"))
    rows: list[dict[str, Any]] = []
    settled = "settled" in LedgerEntry.model_fields  # absent before the open-holds index
    for k in range(entries // 2):
        at = now - k * spacing
        hold: dict[str, Any] = {"id": 2 * k + 1, "project_id": "prj_big", "kind": "hold", "amount": 10_000,
                                "engine": "openai", "stage": "polish", "created_at": at}
        if settled:
            hold["settled"] = True
        rows.append(hold)
        rows.append({"id": 2 * k + 2, "project_id": "prj_big", "kind": "capture", "amount": 9_000,
                     "hold_id": 2 * k + 1, "engine": "openai", "stage": "polish", "created_at": at})
    with db.transaction() as s:
        for first in range(0, len(rows), 10_000):
            s.execute(insert(LedgerEntry), rows[first:first + 10_000])
        for i in range(open_holds):
            job = Job(id=f"job_open{i}", project_id="prj_big", stage="polish", engine="openai", model="m",
                      status="queued", params={}, estimated=10_000)
            s.add(job)
            s.flush()
            # Ids given, as above: PostgreSQL's sequence does not know of the ones given there.
            s.add(LedgerEntry(id=2 * (entries // 2) + i + 1, project_id="prj_big", job_id=job.id, kind="hold",
                              amount=10_000, engine="openai", stage="polish", created_at=now))


def fill_fallbacks(db: Any, first_id: int, jobs: int = 50) -> None:
    """`jobs` finished polish jobs that fell back, each with four entries: held and released on
    one engine, held and captured on the next (the draft jobs' pages have no entries at all, so
    their read timed the index's look-up of nothing)."""
    from orchestrator.models import Job, LedgerEntry

    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for i in range(jobs):
        job_id, first = f"job_f{i}", first_id + 4 * i
        common = {"project_id": "prj_big", "job_id": job_id, "stage": "polish", "created_at": now}
        rows += [{**common, "id": first, "kind": "hold", "amount": 10_000, "engine": "gemini", "settled": True},
                 {**common, "id": first + 1, "kind": "release", "amount": 10_000, "engine": "gemini",
                  "hold_id": first},
                 {**common, "id": first + 2, "kind": "hold", "amount": 20_000, "engine": "openai", "settled": True},
                 {**common, "id": first + 3, "kind": "capture", "amount": 20_000, "engine": "openai",
                  "hold_id": first + 2}]
    with db.transaction() as s:
        s.execute(insert(Job), [{"id": f"job_f{i}", "project_id": "prj_big", "stage": "polish", "engine": "openai",
                                 "model": "m", "status": "succeeded", "params": {}, "attempts": [],
                                 "created_at": now} for i in range(jobs)])
        s.execute(insert(LedgerEntry), rows)


def fill_drafts(db: Any, jobs: int, recent: int) -> None:
    """Finished draft jobs with one asset each, their JSON about the size the service writes; the
    last `recent` ended now, the others an hour ago."""
    from orchestrator.models import Asset, Job

    now = datetime.now(UTC)
    params = {"stage": "ideation", "prompt": "a lighthouse at dusk, volumetric fog, 35mm", "negative_prompt": "",
              "n": 1, "seed": 42, "width": 512, "height": 512, "steps": 4, "guidance_scale": 0.0, "tags": {}}
    routing = {"policy": "balanced", "rule": "drafts", "strategy": "ordered", "chosen": "lite",
               "candidates": [{"engine": "lite", "estimate": 0.0, "skipped": None}]}
    record = {**params, "engine": "lite", "model": "stabilityai/sd-turbo", "sampler": "EulerAncestral",
              "seconds": 0.4, "job_id": "", "asset_index": 0}
    # Started and finished as the runner writes them: `/metrics` times every job that ended, and a
    # scrape after its first reads again those that ended within its margin (15 minutes) only.
    def made(i: int) -> datetime:
        return now if i >= jobs - recent else now - timedelta(hours=1)

    for first in range(0, jobs, 5_000):
        batch = range(first, min(first + 5_000, jobs))
        with db.transaction() as s:
            s.execute(insert(Job), [{"id": f"job_d{i}", "project_id": "prj_big", "stage": "ideation",
                                     "engine": "lite", "model": "stabilityai/sd-turbo", "status": "succeeded",
                                     "params": params, "routing": routing, "attempts": [], "created_at": made(i),
                                     "started_at": made(i) + timedelta(milliseconds=50),
                                     "finished_at": made(i) + timedelta(milliseconds=450),
                                     "device_seconds": 0.4}
                                    for i in batch])
            s.execute(insert(Asset), [{"id": f"ast_d{i}", "project_id": "prj_big", "job_id": f"job_d{i}",
                                       "stage": "ideation", "engine": "lite", "model": "stabilityai/sd-turbo",
                                       "prompt": params["prompt"], "width": 512, "height": 512,
                                       "sha256": f"{i:064x}", "record": record, "created_at": now}
                                      for i in batch])


def fill_copies(db: Any, copies: int) -> None:
    """Finished bridge jobs that copied an earlier result (`cache_hit`): the savings leave every
    copy out, whatever its stage, so their number is what that look-up grows with."""
    from orchestrator.models import Job

    ended = datetime.now(UTC) - timedelta(hours=1)
    for first in range(0, copies, 10_000):
        with db.transaction() as s:
            s.execute(insert(Job), [{"id": f"job_c{i}", "project_id": "prj_big", "stage": "bridge", "engine": "openai",
                                     "model": "gpt-image-1", "status": "succeeded", "params": {}, "cache_hit": True,
                                     "created_at": ended, "started_at": ended, "finished_at": ended}
                                    for i in range(first, min(first + 10_000, copies))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000, help="ledger entries of the big project")
    parser.add_argument("--open", type=int, default=10, help="open holds (queued paid jobs) among them")
    parser.add_argument("--jobs", type=int, default=100_000, help="finished draft jobs, one asset each")
    parser.add_argument("--copies", type=int, default=50_000,
                        help="finished jobs that copied an earlier result (left out of the savings)")
    parser.add_argument("--recent", type=int, default=1_000,
                        help="of the draft jobs, those that ended now (the others an hour ago)")
    parser.add_argument("--spacing-minutes", type=float, default=2.0, help="time between settled holds")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--database-url", help="an empty database (default: a fresh SQLite file)")
    args = parser.parse_args()

    from orchestrator import metrics
    from orchestrator.db import Database, shown_url
    from orchestrator.ledger import Ledger, window
    from orchestrator.models import Project
    from orchestrator.settings import Settings
    from orchestrator.spend import savings, spend

    data_dir = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    settings = Settings(data_dir=data_dir, database_url=args.database_url)
    db = Database(settings.resolved_database_url)
    db.migrate()
    with db.session() as s:
        if s.get(Project, "prj_big") is not None:  # a second run on the same database
            parser.error(f"{shown_url(settings.resolved_database_url)} holds an earlier run's rows: give an empty "
                         "database")
    start = time.perf_counter()
    fill(db, args.entries, args.open, timedelta(minutes=args.spacing_minutes))
    fill_drafts(db, args.jobs, min(args.recent, args.jobs))
    fill_copies(db, args.copies)
    fill_fallbacks(db, 2 * (args.entries // 2) + args.open + 1)
    filled = time.perf_counter() - start
    if db.engine.dialect.name == "postgresql":
        # What autovacuum does to a table that grew: statistics, and the visibility map that lets
        # an index-only scan skip the rows. Fresh from a bulk load, the planner knows neither.
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")

    ledger = Ledger()
    results: dict[str, Any] = {}
    with db.session() as s:
        for project_id in ("prj_big", "prj_new"):
            project = s.get(Project, project_id)
            assert project is not None
            balance = ledger.balance(s, project)
            results[f"balance {project_id}"] = {**timed(functools.partial(ledger.balance, s, project), args.repeats),
                                                "held": balance.held, "charged": balance.charged}
    assert results["balance prj_big"]["held"] == 10_000 * args.open, results

    from sqlmodel import col, select

    from orchestrator.api.query import paged
    from orchestrator.models import Asset, Job

    with db.session() as s:
        listed = [f"job_d{i}" for i in range(50)]
        results["credits of a page of 50 jobs"] = timed(functools.partial(ledger.job_costs, s, listed),
                                                         args.repeats)
        # Jobs that have entries: held and released on one engine, held and charged on the next.
        fell_back = [f"job_f{i}" for i in range(50)]
        results["credits of a page of 50 jobs that fell back"] = timed(
            functools.partial(ledger.job_costs, s, fell_back), args.repeats)
        assert ledger.job_totals(s, fell_back)["job_f0"] == (0, 20_000), results
        # As /v1/jobs and /v1/projects/{id}/assets read a page.
        jobs = paged(select(Job).where(col(Job.project_id) == "prj_big").limit(51), col(Job.id), None, "desc")
        assets = paged(select(Asset).where(col(Asset.project_id) == "prj_big", col(Asset.deleted_at).is_(None))
                       .limit(51), col(Asset.id), None, "desc")
        for name, page in (("jobs", jobs), ("assets", assets)):
            results[f"a page of the big project's {name}, newest first"] = timed(
                functools.partial(lambda stmt: s.exec(stmt).all(), page), args.repeats)

    configured = {"openai": ["polish"], "lite": ["ideation"]}
    # A process's first scrape reads every ended job; its later ones, those that ended within the margin.
    results["metrics: a process's first scrape"] = timed(lambda: metrics.render(db, configured), args.repeats)
    settled = metrics.SettledTimes()
    results["metrics: a later scrape"] = timed(lambda: metrics.render(db, configured, settled), args.repeats)
    month = window("month", datetime.now(UTC))
    with db.session() as s:
        results["spend: the big project's month by engine"] = timed(
            functools.partial(spend, s, "engine", *month, "prj_big"), args.repeats)
        # A dashboard's month of every project (no project filter): read by the charges' window index.
        results["spend: every project's month by engine"] = timed(
            functools.partial(spend, s, "engine", *month, None), args.repeats)
        results["spend: everything by day"] = timed(functools.partial(spend, s, "day", None, None, None), args.repeats)
        # The draft counts are what is timed, not the pricing: one local engine, none to compare with.
        lite_only: Any = [SimpleNamespace(name="lite", kind="local")]
        results["savings: the big project's month"] = timed(
            functools.partial(savings, s, lite_only, *month, "prj_big"), args.repeats)
        results["savings: everything"] = timed(
            functools.partial(savings, s, lite_only, None, None, None), args.repeats)

    import sqlalchemy

    print(json.dumps({
        "config": {"entries": args.entries, "open_holds": args.open, "draft_jobs": args.jobs,
                   "recent": args.recent, "copies": args.copies, "spacing_minutes": args.spacing_minutes,
                   "repeats": args.repeats,
                   "database": db.engine.dialect.name, "python": platform.python_version(),
                   "sqlalchemy": sqlalchemy.__version__, "fill_s": round(filled, 1)},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
