"""`Ledger.job_costs`: each job's entries summed by engine, against the entries themselves.

A guard on how the sums are made (plain lists, one `EngineCost` per engine: a frozen copy per row
made a page of jobs that fell back read 4 to 5 times slower, see bench/history.py): random
ledgers of holds (open and settled), captures with and without a hold, signed adjustments and
releases, on several engines, some unnamed, and jobs with no entries at all."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from orchestrator.db import Database
from orchestrator.ledger import EngineCost, JobCost, Ledger
from orchestrator.models import Job, LedgerEntry, Project

ENGINES = ["openai", "gemini", "local-hifi", None]


def _expected(entries: list[LedgerEntry]) -> dict[str, dict[str | None, EngineCost]]:
    sums: dict[str, dict[str | None, list[int]]] = defaultdict(dict)
    for e in entries:
        assert e.job_id is not None
        figures = sums[e.job_id].setdefault(e.engine, [0, 0, 0, 0])
        if e.kind == "hold":
            figures[0] += e.amount
            figures[1] += 0 if e.settled else e.amount
        elif e.kind in ("capture", "adjustment"):
            figures[2] += e.amount
        elif e.kind == "release":
            figures[3] += e.amount
    return {job: {engine: EngineCost(engine, *f) for engine, f in mine.items()} for job, mine in sums.items()}


def test_each_job_s_engines_are_its_entries_summed(sqlite_db: Database) -> None:
    rng = random.Random(35)
    now = datetime.now(UTC)
    jobs = [f"job_{i:03d}" for i in range(120)]
    entries: list[LedgerEntry] = []
    with sqlite_db.transaction() as s:
        s.add(Project(id="prj_c", name="c", policy="balanced", budget_period="none"))
        s.flush()
        for job_id in jobs:
            s.add(Job(id=job_id, project_id="prj_c", stage="bridge", engine="openai", model="m", status="succeeded",
                      params={}))
        s.flush()
        def add(job_id: str, kind: Any, amount: int, engine: str | None, **more: Any) -> LedgerEntry:
            entry = LedgerEntry(project_id="prj_c", job_id=job_id, kind=kind, amount=amount, engine=engine,
                                stage="bridge", created_at=now, **more)
            s.add(entry)
            s.flush()
            entries.append(entry)
            return entry

        for job_id in jobs[:100]:  # the last 20 have no entries
            for _ in range(rng.randint(0, 3)):  # each engine it was held on (one may be held twice)
                engine = rng.choice(ENGINES)
                hold = add(job_id, "hold", rng.randint(0, 30_000), engine, settled=rng.random() < 0.7)
                if not hold.settled:
                    continue
                charged = rng.choice([None, 0, rng.randint(1, 60_000)])
                if charged is None or charged < hold.amount:
                    add(job_id, "release", hold.amount - (charged or 0), engine, hold_id=hold.id)
                if charged is not None:
                    add(job_id, "capture", charged, engine, hold_id=hold.id, unreconciled=True)
                    if rng.random() < 0.5:  # reconciled, up or down
                        add(job_id, "adjustment", rng.randint(-charged, 5_000), engine, hold_id=hold.id)
            if rng.random() < 0.3:  # metered local work: a capture of nothing held
                add(job_id, "capture", rng.randint(1, 9_999), rng.choice(ENGINES))
        s.add(LedgerEntry(project_id="prj_c", kind="grant", amount=100_000, created_at=now))  # no job's
    expected = _expected(entries)
    with sqlite_db.session() as s:
        for first in range(0, len(jobs), 50):  # as pages of the job list read them
            page = jobs[first:first + 50]
            costs = Ledger().job_costs(s, page)
            assert set(costs) == {job for job in page if job in expected}
            for job_id, cost in costs.items():
                assert isinstance(cost, JobCost)
                assert {c.engine: c for c in cost.engines} == expected[job_id], job_id
                assert len(cost.engines) == len(expected[job_id])
                assert (cost.held, cost.charged) == (sum(c.held for c in cost.engines),
                                                     sum(c.charged for c in cost.engines))
            assert Ledger().job_totals(s, page) == {job: (c.held, c.charged) for job, c in costs.items()}
