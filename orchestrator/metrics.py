"""`GET /metrics`: Prometheus text read from the database, so every process sharing it (and a
restarted one) reports the same figures."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any, get_args

from sqlalchemy import BigInteger, ColumnElement, Integer, case, cast, func
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import Select

from orchestrator import device_time, webhooks
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.events import TERMINAL
from orchestrator.ledger import charges, open_holds
from orchestrator.models import Asset, Job, LedgerEntry, Project
from orchestrator.quota import MIB
from orchestrator.schemas import JobStatus
from tiers.base import STAGES, to_credits

# The histograms' upper bounds in seconds: a draft on a GPU takes well under a second, a paid
# polish minutes, and a job may wait in the queue for an hour behind others.
BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_BUCKETS_MS = tuple(round(1000 * le) for le in BUCKETS)
ENDED = tuple(sorted(TERMINAL))
# How long after its `finished_at` a job's end may still commit: a scrape reads again every job
# that ended since its watermark, which trails its clock by this much, so that it never folds away
# a window a late end has yet to commit into. The stamp is taken before the write. A success's end
# is tried again for up to FINAL_WRITE_SECONDS (120 s) through a database that takes no writes, its
# last try waiting out a lock for up to 30 s (LOCK_TIMEOUT_SECONDS), and a PostgreSQL transaction
# idle between its statements is ended only after 300 s (IDLE_IN_TRANSACTION_SECONDS): some 7.5
# minutes at worst. 15 leave as much again for the ending host's clock (the stamp) to run behind
# the scraping one's (the watermark). An end committed later still (a host frozen mid-write, a
# clock further off) is missed by a process whose watermark had passed its stamp: short by one
# there, until the process restarts, while a full read counts it.
SETTLED_MARGIN = timedelta(minutes=15)


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


# A histogram group: (stage, engine, status, run bucket, wait bucket).
_Group = tuple[str, str, str, int, int]


class SettledTimes:
    """The histograms' figures of the jobs that ended before a watermark, kept by a process for
    its database: an ended job never changes and is never deleted, so a scrape reads only the jobs
    that ended from the watermark on (by `ix_jobs_finished_at`) and adds these. Read in full at
    every scrape, 200,000 ended jobs took a scrape from 0.1 s to 0.4 to 0.85 s, growing for good. The
    watermark trails the clock by SETTLED_MARGIN, so that a job whose end commits after its stamp
    is still read. Sums are whole milliseconds: the figures are a full read's, to the last one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # one scrape reads and folds at a time: a window folded twice counted twice
        self.before: datetime | None = None  # None: nothing read yet, the first scrape reads every ended job
        self.groups: dict[_Group, list[int]] = {}  # group -> [run ms, wait ms, jobs]
        self.device_ms: dict[str, int] = {}  # project -> the device milliseconds its ended jobs held

    def watermark(self, now: datetime) -> datetime:
        """The watermark this scrape leaves (`now` less SETTLED_MARGIN). Where the clock stepped
        back under the last one, the watermark is not moved back (a window folded already would
        be read, and counted, again), nor kept (the jobs stamped by the clock set right fall under
        it, and were left out until a restart): what was kept is dropped and read again."""
        before = now - SETTLED_MARGIN
        if self.before is not None and before < self.before:
            self.before, self.groups, self.device_ms = None, {}, {}
        return before

    def fold(self, rows: Iterable[Any]) -> None:
        for *group, run_ms, wait_ms, n in rows:
            kept = self.groups.setdefault(tuple(group), [0, 0, 0])
            kept[0] += int(run_ms)
            kept[1] += int(wait_ms)
            kept[2] += int(n)


def render(db: Database, engines: Mapping[str, Iterable[str]], settled: SettledTimes | None = None, *,
           default_quota_mb: int = 0, default_local_seconds: int | None = None,
           webhook_destinations_set_aside: int = 0,
           device_used: Callable[[Session, list[str]], Mapping[str, float]] | None = None) -> str:
    """Jobs by stage, engine and status; assets by stage; credits charged (by engine and stage),
    held and waiting for reconciliation (by engine); histograms of how long ended jobs ran (by
    stage, engine and status) and waited (by stage and engine). `engines` (name -> its stages) each get a 0
    where they have nothing: a series that goes away when its last job moves on reads as "no
    data" to Prometheus, not 0 (an alert on `status="running"} == 0` never fired). `settled`: what
    this process's earlier scrapes read of the ended jobs (none: every ended job is read).
    `default_quota_mb`: ORCH_PROJECT_STORAGE_QUOTA_MB, the storage quota of projects without their own.
    `default_local_seconds`: ORCH_PROJECT_LOCAL_SECONDS_PER_DAY, the device-time quota of those without one.
    `webhook_destinations_set_aside`: this process's webhook sender's (`webhooks.Breakers`).
    `device_used`: what admission reads of the projects' device-seconds (`JobService.device_used`);
    none: `device_time.used_by` knowing no local engine, so running attempts count nothing."""
    settled = SettledTimes() if settled is None else settled
    # Before the snapshot's first query: every job stamped SETTLED_MARGIN before it has committed by then.
    now = utcnow()
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
        hooks_pending, hooks_failed = webhooks.counts(s)
        # The projects' own counters (`orchestrator.quota`): one row each, no asset read.
        stored = s.exec(select(Project.id, Project.storage_bytes, Project.storage_quota_mb,
                               Project.local_seconds_per_day).order_by(col(Project.id))).all()
        local_quotas = [(pid, own if own is not None else default_local_seconds) for pid, _, _, own in stored]
        # Of every project, as the API shows each one's `local_seconds_used` (a cost dashboard's
        # figure with no quota): each is one range of `ix_jobs_device_seconds` (its last 24 hours)
        # and its few unfinished jobs, never every local job's entry; what a server-wide quota
        # read already.
        every = [pid for pid, _, _, _ in stored]
        used_now = (device_used or _ended_and_unfinished)(s, every) if every else {}
        with settled.lock:
            before = settled.watermark(now)
            # Folded once every read has answered: a read that fails after another folded its
            # window left the watermark where it was, and the next scrape folded that window again.
            settling, device_ms = _device_ms(s, settled, before)
            timings = _timings(s, settled, before)
            for project_id, ms in settling.items():
                settled.device_ms[project_id] = settled.device_ms.get(project_id, 0) + ms
            settled.before = before
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
    lines += ["# HELP orchestrator_webhooks_pending Job webhook deliveries not made yet (due, or waiting to be "
              "tried again).", "# TYPE orchestrator_webhooks_pending gauge",
              f"orchestrator_webhooks_pending {hooks_pending}",
              "# HELP orchestrator_webhooks_failed Job webhook deliveries given up after their last attempt.",
              "# TYPE orchestrator_webhooks_failed gauge", f"orchestrator_webhooks_failed {hooks_failed}",
              "# HELP orchestrator_webhook_destinations_set_aside Webhook destinations this process sets aside "
              "after failed attempts in a row: their deliveries wait, unclaimed, for a probe (per process).",
              "# TYPE orchestrator_webhook_destinations_set_aside gauge",
              f"orchestrator_webhook_destinations_set_aside {webhook_destinations_set_aside}"]
    lines += ["# HELP orchestrator_project_storage_bytes Bytes of each project's live assets' files (each asset "
              "counted whole), as its storage quota counts them.", "# TYPE orchestrator_project_storage_bytes gauge"]
    lines += [f'orchestrator_project_storage_bytes{{project="{_label(pid)}"}} {used}' for pid, used, _, _ in stored]
    lines += ["# HELP orchestrator_project_storage_quota_bytes Each project's storage quota in force in bytes (its "
              "own, else ORCH_PROJECT_STORAGE_QUOTA_MB; projects without one have no series).",
              "# TYPE orchestrator_project_storage_quota_bytes gauge"]
    quotas = ((pid, mb if mb is not None else default_quota_mb or None) for pid, _, mb, _ in stored)
    lines += [f'orchestrator_project_storage_quota_bytes{{project="{_label(pid)}"}} {mb * MIB}'
              for pid, mb in quotas if mb is not None]
    # Every project's series, with zeros: a counter that appears at its first job has no earlier
    # figure for `increase()` to start from.
    lines += ["# HELP orchestrator_project_local_device_seconds_total Device-seconds each project's jobs held "
              "local engines (lite, local-hifi) for, every attempt as its device-time quota counts them, "
              "added as each job ends: increase() over 24h is about its local_seconds_used.",
              "# TYPE orchestrator_project_local_device_seconds_total counter"]
    lines += [f'orchestrator_project_local_device_seconds_total{{project="{_label(pid)}"}} '
              f"{(settled.device_ms.get(pid, 0) + device_ms.get(pid, 0)) / 1000}" for pid, _, _, _ in stored]
    lines += ["# HELP orchestrator_project_local_seconds_quota Each project's device-time quota in force in "
              "device-seconds per 24 hours (its own local_seconds_per_day, else "
              "ORCH_PROJECT_LOCAL_SECONDS_PER_DAY; projects without one have no series).",
              "# TYPE orchestrator_project_local_seconds_quota gauge"]
    lines += [f'orchestrator_project_local_seconds_quota{{project="{_label(pid)}"}} {quota}'
              for pid, quota in local_quotas if quota is not None]
    lines += ["# HELP orchestrator_project_local_seconds_used Device-seconds each project's jobs held local "
              "engines over the last 24 hours, its unfinished jobs' so far included, as admission judges its "
              "quota (its local_seconds_used, to the millisecond; every project's, with a quota or not): "
              "local engines are unavailable to it at or over orchestrator_project_local_seconds_quota.",
              "# TYPE orchestrator_project_local_seconds_used gauge"]
    lines += [f'orchestrator_project_local_seconds_used{{project="{_label(pid)}"}} '
              f"{device_time.shown(used_now.get(pid, 0.0))}" for pid in every]
    # Every pair's series, with zeros: from a job's first end, a series that was not there has no
    # earlier figure for `rate()` to start from.
    ran = {(stage, engine, status): _Histogram() for stage, engine in pairs for status in ENDED}
    waited = {pair: _Histogram() for pair in pairs}
    for stage, engine, status, run_bucket, wait_bucket, run_ms, wait_ms, n in timings:
        ran[stage, engine, status].add(run_bucket, run_ms, n)
        waited[stage, engine].add(wait_bucket, wait_ms, n)
    lines += _histogram_lines(
        "orchestrator_job_duration_seconds", ("stage", "engine", "status"), ran,
        "Seconds from its start to its end, of each job that an engine started and that has ended (a "
        "job canceled while queued is not in it), by stage, engine and status; a job that ran more than "
        "once (a fallback, a recovery) from its last attempt's start; a copy of an earlier result takes 0.")
    lines += _histogram_lines(
        "orchestrator_job_queue_seconds", ("stage", "engine"), waited,
        "Seconds from its submission to its start, of each job that an engine started and that has "
        "ended, by stage and engine; a job that ran more than once to its last attempt's start "
        "(the earlier attempts included).")
    return "\n".join(lines) + "\n"


def _ended_and_unfinished(s: Session, project_ids: list[str]) -> dict[str, float]:
    return device_time.used_by(s, project_ids, local=(), lease=timedelta(0))


class _Histogram:
    """One histogram series' observations: how many in each bucket (the last is above every bound),
    their sum in milliseconds, and their count."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum_ms = 0
        self.count = 0

    def add(self, bucket: int, total_ms: int, n: int) -> None:
        self.counts[int(bucket)] += int(n)
        self.sum_ms += int(total_ms)
        self.count += int(n)


def _device_ms(s: Session, settled: SettledTimes, before: datetime) -> tuple[dict[str, int], dict[str, int]]:
    """The device milliseconds (each job's `device_seconds`, to the millisecond: the sums are a
    full read's whatever the order they were added in) of each project's jobs that ended from
    `settled.before` on: those that ended before `before` (for the caller to fold into `settled`
    once its other reads have answered too), and the others. A
    first read goes through `ix_jobs_device_seconds` whole, once; later ones through
    `ix_jobs_finished_at`, the recent ends only, never every local job's entry (a sum of the
    projects' 24 hours at each scrape would have been)."""
    where = ([col(Job.finished_at).is_not(None), col(Job.device_seconds).is_not(None)] if settled.before is None
             else [col(Job.finished_at) >= settled.before])
    # Run as it is (`OFFSET 0`): merged into the outer query, its grouping by project had SQLite
    # walk every job in project order (`ix_jobs_project_status`) instead of the recent ends.
    held = (Select(col(Job.project_id).label("project_id"),
                   cast(func.round(col(Job.device_seconds) * 1000), BigInteger).label("ms"),
                   case((col(Job.finished_at) < before, 1), else_=0).label("settles"))
            .where(*where).offset(0).subquery())
    settling: dict[str, int] = {}
    recent: dict[str, int] = {}
    rows: list[Any] = list(s.exec(Select(held.c.project_id, func.sum(held.c.ms), held.c.settles)
                                  .group_by(held.c.project_id, held.c.settles)).all())
    for project_id, ms, settles in rows:
        if ms is None:  # ended jobs that held no local device
            continue
        kept = settling if settles else recent
        kept[project_id] = kept.get(project_id, 0) + int(ms)
    return settling, recent


def _timings(s: Session, settled: SettledTimes, before: datetime) -> list[Any]:
    """The ended jobs that an engine started, grouped by stage, engine, status and the buckets their
    run and their wait fall in: `(stage, engine, status, run bucket, wait bucket, run ms, wait ms,
    jobs)`, a bucket being the index of the first bound it is within (`len(BUCKETS)`: none).
    Those that ended before `settled.before` are `settled`'s; the rest are read, and those of them
    that ended before `before` (the new watermark, which the caller then sets) folded into `settled`.

    Ended jobs only: a running one's start is written again if it runs again, and a histogram's
    figures must only grow. The times are read to the millisecond, a negative one (two hosts'
    clocks) as 0, once per job in a subquery run as it is (`OFFSET 0`): merged into the outer query,
    each bound's comparison worked them out again (0.63 s of CPU against 0.37 s on SQLite, for
    200,000 jobs)."""
    if s.get_bind().dialect.name == "postgresql":
        def millis(end: Any, start: Any) -> ColumnElement[int]:
            seconds = func.date_part("epoch", end - start)
            return func.greatest(cast(func.round(seconds * 1000), BigInteger), 0)
    else:  # SQLite keeps the times as text, which `julianday` reads to the millisecond
        def millis(end: Any, start: Any) -> ColumnElement[int]:
            days = func.julianday(end) - func.julianday(start)
            return func.max(cast(func.round(days * 86_400_000), Integer), 0)

    status: Any = col(Job.status)
    ended: list[ColumnElement[bool]] = [col(Job.started_at).is_not(None), col(Job.finished_at).is_not(None)]
    if settled.before is not None:
        ended.append(col(Job.finished_at) >= settled.before)
        # The status as an expression no index holds: SQLite took the status index for it (an
        # equality, to its planner more selective than a range) and read every ended job to keep
        # the few that ended since.
        status = status + ""
    ended.append(status.in_(ENDED))
    # `Select`: sqlmodel's `select` is typed for four columns at most.
    times = (Select(col(Job.stage).label("stage"), col(Job.engine).label("engine"), col(Job.status).label("status"),
                    millis(col(Job.finished_at), col(Job.started_at)).label("run"),
                    millis(col(Job.started_at), col(Job.created_at)).label("wait"),
                    case((col(Job.finished_at) < before, 1), else_=0).label("settles"))
             .where(*ended).offset(0).subquery())

    def bucket(ms: Any) -> Any:
        return case(*((ms <= bound, i) for i, bound in enumerate(_BUCKETS_MS)), else_=len(_BUCKETS_MS))

    # The same `CASE`s selected and grouped by, bound to the same parameters: PostgreSQL sees one expression.
    keys = (times.c.stage, times.c.engine, times.c.status, bucket(times.c.run), bucket(times.c.wait))
    read: list[Any] = list(s.exec(Select(*keys, func.sum(times.c.run), func.sum(times.c.wait), func.count(),
                                         times.c.settles).group_by(*keys, times.c.settles)).all())
    recent = [row[:-1] for row in read if not row[-1]]
    settled.fold(row[:-1] for row in read if row[-1])
    return [(*group, *figures) for group, figures in settled.groups.items()] + recent


def _histogram_lines(name: str, label_names: tuple[str, ...], series: Mapping[Any, _Histogram],
                     help_text: str) -> list[str]:
    """A histogram's exposition: each series' cumulative buckets, then its sum and count."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for labels, histogram in sorted(series.items()):
        shown = ",".join(f'{key}="{_label(value)}"' for key, value in zip(label_names, labels, strict=True))
        seen = 0
        for le, n in zip((*map(float, BUCKETS), "+Inf"), histogram.counts, strict=True):
            seen += n
            lines.append(f'{name}_bucket{{{shown},le="{le}"}} {seen}')
        lines.append(f"{name}_sum{{{shown}}} {histogram.sum_ms / 1000}")
        lines.append(f"{name}_count{{{shown}}} {histogram.count}")
    return lines


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
