"""`GET /metrics`: Prometheus text read from the database, so every process sharing it (and a
restarted one) reports the same figures."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, get_args

from sqlalchemy import func
from sqlmodel import col, select

from orchestrator.db import Database
from orchestrator.ledger import charges, open_holds
from orchestrator.models import Asset, Job, LedgerEntry
from orchestrator.schemas import JobStatus
from tiers.base import STAGES, to_credits


class SharedRead:
    """One database read for every scrape that comes while it runs. `/metrics` needs no key and each
    read groups the whole jobs and ledger tables (tens of ms on a long history): a burst of scrapes
    (a misconfigured scraper, anyone who can reach the port) ran as many reads side by side, and
    held the database and the request threads. A scrape that comes while none runs reads afresh."""

    def __init__(self, read: Callable[[], str]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._running: Future[str] | None = None

    def __call__(self) -> str:
        with self._lock:
            running = self._running
            if running is None:
                running = self._running = Future()
                owner = True
            else:
                owner = False
        if owner:
            try:
                running.set_result(self._read())
            except BaseException as exc:  # each scrape waiting on it is told, as its own read would be
                running.set_exception(exc)
            finally:
                with self._lock:
                    self._running = None
        return running.result()


def render(db: Database, engines: Mapping[str, Iterable[str]]) -> str:
    """Jobs by stage, engine and status; assets by stage; credits charged (by engine and stage),
    held and waiting for reconciliation (by engine). `engines` (name -> its stages) each get a 0
    where they have nothing: a series that goes away when its last job moves on reads as "no
    data" to Prometheus, not 0 (an alert on `status="running"} == 0` never fired)."""
    amount = func.coalesce(func.sum(LedgerEntry.amount), 0)
    with db.snapshot() as s:
        jobs = s.exec(select(Job.stage, Job.engine, Job.status, func.count()).group_by(
            Job.stage, Job.engine, Job.status)).all()
        assets = s.exec(select(Asset.stage, func.count()).group_by(Asset.stage)).all()
        # Grouped by kind too, in the totals index's order (no sort), and the kinds added up here.
        charged: Counter[tuple[str | None, str | None]] = Counter()
        for _kind, engine, stage, money in s.exec(
                select(LedgerEntry.kind, LedgerEntry.engine, LedgerEntry.stage, amount)
                .where(charges())
                .group_by(col(LedgerEntry.kind), col(LedgerEntry.engine), col(LedgerEntry.stage))):
            charged[engine, stage] += money
        # Summed here: grouped in SQL, SQLite walks the totals index (no sort) instead of the few open holds.
        held: Counter[str | None] = Counter()
        for engine, money in s.exec(select(LedgerEntry.engine, LedgerEntry.amount).where(open_holds())):
            held[engine] += money
        unreconciled = s.exec(select(LedgerEntry.engine, amount, func.count())
                              .where(col(LedgerEntry.kind) == "capture", col(LedgerEntry.unreconciled))
                              .group_by(LedgerEntry.engine)).all()
    names = list(engines)
    pairs = {(stage, name) for name, stages in engines.items() for stage in stages}
    pairs.update((stage, engine) for stage, engine, _, _ in jobs)  # an engine no longer configured
    job_counts = {(stage, engine, status): 0 for stage, engine in pairs for status in get_args(JobStatus.__value__)}
    job_counts.update(((stage, engine, status), int(n)) for stage, engine, status, n in jobs)
    lines = ["# HELP orchestrator_jobs Jobs by stage, engine and status.", "# TYPE orchestrator_jobs gauge"]
    lines += [f'orchestrator_jobs{{stage="{_label(st)}",engine="{_label(en)}",status="{_label(stat)}"}} {n}'
              for (st, en, stat), n in sorted(job_counts.items())]
    asset_counts: dict[str, int] = dict.fromkeys(STAGES, 0)
    asset_counts.update((stage, int(n)) for stage, n in assets)
    lines += ["# HELP orchestrator_assets Assets made, by stage (deleted ones included).",
              "# TYPE orchestrator_assets gauge"]
    lines += [f'orchestrator_assets{{stage="{_label(st)}"}} {n}' for st, n in asset_counts.items()]
    for engine, stage in ((engine, stage) for stage, engine in pairs):
        charged.setdefault((engine, stage), 0)
    # Gauges, not counters: a reconciliation may lower what was charged.
    lines += ["# HELP orchestrator_credits_charged Credits charged to date (captures and reconciliation "
              "adjustments), by engine and stage.", "# TYPE orchestrator_credits_charged gauge"]
    lines += [f'orchestrator_credits_charged{{engine="{_label(en or "-")}",stage="{_label(st or "-")}"}} '
              f"{to_credits(int(n))}" for (en, st), n in sorted(charged.items(), key=_by_labels)]
    lines += ["# HELP orchestrator_credits_held Credits held for paid jobs not settled yet, by engine.",
              "# TYPE orchestrator_credits_held gauge"]
    lines += [f'orchestrator_credits_held{{engine="{_label(en)}"}} {to_credits(n)}'
              for en, n in _every_engine(names, held.items())]
    lines += ["# HELP orchestrator_credits_unreconciled Credits charged that wait for reconciliation with the "
              "provider's invoice (an unknown outcome's estimate, a report over twice it), by engine.",
              "# TYPE orchestrator_credits_unreconciled gauge"]
    lines += [f'orchestrator_credits_unreconciled{{engine="{_label(en)}"}} {to_credits(n)}'
              for en, n in _every_engine(names, ((en, n) for en, n, _ in unreconciled))]
    lines += ["# HELP orchestrator_ledger_unreconciled_entries Captures waiting for reconciliation with the "
              "provider's invoice, by engine (an engine priced 0 has some while its credits read 0).",
              "# TYPE orchestrator_ledger_unreconciled_entries gauge"]
    lines += [f'orchestrator_ledger_unreconciled_entries{{engine="{_label(en)}"}} {n}'
              for en, n in _every_engine(names, ((en, count) for en, _, count in unreconciled))]
    return "\n".join(lines) + "\n"


def _every_engine(names: Iterable[str], rows: Iterable[Any]) -> list[tuple[str, int]]:
    """`(engine, total)` rows with a 0 for each engine they lack: a dashboard tells "nothing
    held" from a series that is not there."""
    totals = dict.fromkeys(names, 0)
    totals.update((engine or "-", int(n)) for engine, n in rows)
    return sorted(totals.items())


def _by_labels(item: tuple[tuple[str | None, str | None], int]) -> tuple[str, str]:
    (engine, stage), _ = item
    return engine or "", stage or ""


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped (engine names come from
    configuration)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
