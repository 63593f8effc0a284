"""Benchmark: what draft retention (ORCH_DRAFT_RETENTION_DAYS) costs on a large history.

This is a benchmark, not a test: it prints ONE JSON object to stdout.

A database (a fresh SQLite file by default, or `--database-url`, migrated to head) holds
`--drafts` finished draft jobs with one asset each, all older than the retention, `--promoted` of
them promoted (a bridge asset names each as its parent: kept), and `--recent` drafts within it
(kept). One sweep (`orchestrator.retention.expire_drafts`) deletes the rest while a second thread
makes one short write transaction after another, as the service's other writers (claims, submits)
do: `writer_wait_ms` is how long those waited for the write lock while the sweep ran, against the
same writes before it (`writer_alone_ms`). `lock_held_ms` is each batch's transaction, as long as
it holds the write lock. A second sweep, with nothing left to delete, is the cost every later
sweep pays (`idle_sweep_ms`). `--without-index` drops `ix_assets_stage_live` first, to compare.

Run: `.venv/bin/python bench/retention.py [--drafts 100000] [--promoted 1000] [--recent 1000] [--batch 500]`
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

DAYS = 30


def fill(db: Any, drafts: int, promoted: int, recent: int) -> None:
    """Finished draft jobs with one asset each (the old ones first, then the recent ones), and a
    bridge asset of its own job under each of the first `promoted`."""
    from orchestrator.models import Asset, Job, Project

    now = datetime.now(UTC)
    with db.transaction() as s:
        s.add(Project(id="prj_big", name="big", policy="balanced"))
    record = {"prompt": "a lighthouse at dusk, volumetric fog, 35mm", "n": 1, "seed": 42, "width": 512,
              "height": 512, "steps": 4, "engine": "lite", "model": "stabilityai/sd-turbo"}

    def rows(i: int, stage: str, created: datetime, parent: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        job = {"id": f"job_{stage}{i}", "project_id": "prj_big", "stage": stage, "engine": "lite", "model": "m",
               "status": "succeeded", "params": record, "attempts": [], "created_at": created}
        asset = {"id": f"ast_{stage}{i}", "project_id": "prj_big", "job_id": job["id"], "stage": stage,
                 "engine": "lite", "model": "m", "prompt": record["prompt"], "width": 512, "height": 512,
                 "sha256": f"{stage[0]}{i:063x}", "record": record, "created_at": created, "parent_id": parent}
        return job, asset

    made = [rows(i, "ideation", now - timedelta(days=DAYS + 30, seconds=-i) if i < drafts else now, None)
            for i in range(drafts + recent)]
    made += [rows(i, "bridge", now, f"ast_ideation{i * (drafts // max(promoted, 1))}") for i in range(promoted)]
    for first in range(0, len(made), 5_000):
        with db.transaction() as s:
            s.execute(insert(Job), [job for job, _ in made[first:first + 5_000]])
            s.execute(insert(Asset), [asset for _, asset in made[first:first + 5_000]])


@contextmanager
def lock_times(db: Any, held: list[float]) -> Iterator[None]:
    """Each write transaction's length, from its start (the write lock taken) to its end."""
    transaction = db.transaction

    @contextmanager
    def timed() -> Iterator[Any]:
        start = time.perf_counter()
        try:
            with transaction() as s:
                yield s
        finally:
            held.append(time.perf_counter() - start)

    db.transaction = timed
    try:
        yield
    finally:
        db.transaction = transaction


def writer(db: Any, stop: threading.Event, waits: list[float]) -> None:
    """One short write after another (a project renamed), each timed."""
    from sqlalchemy import update
    from sqlmodel import col

    from orchestrator.models import Project

    while not stop.is_set():
        start = time.perf_counter()
        with db.transaction() as s:
            s.execute(update(Project).where(col(Project.id) == "prj_big").values(name=f"big {start}"))
        waits.append(time.perf_counter() - start)
        time.sleep(0.005)


def ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(1000 * statistics.median(ordered), 3),
            "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 3),
            "max_ms": round(1000 * ordered[-1], 3), "count": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafts", type=int, default=100_000, help="old drafts, all past the retention")
    parser.add_argument("--promoted", type=int, default=1_000, help="old drafts promoted (kept)")
    parser.add_argument("--recent", type=int, default=1_000, help="drafts within the retention (kept)")
    parser.add_argument("--batch", type=int, default=0, help="drafts per transaction (0: the service's)")
    parser.add_argument("--database-url", help="an empty database (default: a fresh SQLite file)")
    parser.add_argument("--without-index", action="store_true", help="drop ix_assets_stage_live first")
    args = parser.parse_args()

    from orchestrator.db import Database, shown_url
    from orchestrator.retention import RETENTION_BATCH, expire_drafts
    from orchestrator.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    settings = Settings(data_dir=data_dir, database_url=args.database_url)
    db = Database(settings.resolved_database_url)
    db.migrate()
    batch = args.batch or RETENTION_BATCH
    try:
        fill(db, args.drafts, args.promoted, args.recent)
        if args.without_index:
            with db.transaction() as s:
                s.execute(text("DROP INDEX ix_assets_stage_live"))
        with db.transaction() as s:
            s.execute(text("ANALYZE"))
        other = Database(settings.resolved_database_url)  # the other writers: another process's pool
        stop = threading.Event()
        alone: list[float] = []
        thread = threading.Thread(target=writer, args=(other, stop, alone))
        thread.start()
        time.sleep(2)
        stop.set()
        thread.join()

        held: list[float] = []
        waits: list[float] = []
        stop = threading.Event()
        thread = threading.Thread(target=writer, args=(other, stop, waits))
        thread.start()
        start = time.perf_counter()
        with lock_times(db, held):
            deleted = expire_drafts(db, DAYS, batch=batch)
        sweep = time.perf_counter() - start
        stop.set()
        thread.join()
        other.dispose()
        assert deleted == args.drafts - args.promoted, deleted
        idle: list[float] = []
        for _ in range(5):
            start = time.perf_counter()
            assert expire_drafts(db, DAYS, batch=batch) == 0
            idle.append(time.perf_counter() - start)
        print(json.dumps({
            "database": shown_url(settings.resolved_database_url).split(":")[0],
            "drafts": args.drafts, "promoted": args.promoted, "recent": args.recent, "batch": batch,
            "index": not args.without_index, "deleted": deleted,
            "sweep_s": round(sweep, 3), "per_1000_drafts_ms": round(1000 * sweep / max(deleted, 1) * 1000, 3),
            "lock_held_ms": ms(held), "writer_alone_ms": ms(alone), "writer_wait_ms": ms(waits),
            "idle_sweep_ms": ms(idle), "python": platform.python_version(), "machine": platform.machine()}))
    finally:
        db.dispose()


if __name__ == "__main__":
    main()
