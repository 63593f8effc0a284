"""`/metrics`' reads: scrapes that come while one reads share it; its histograms of how long jobs
ran and waited, each process reading only the jobs that ended since its earlier scrapes."""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, event, insert, update
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col

from orchestrator import device_time, metrics
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.metrics import SETTLED_MARGIN, SettledTimes, SharedRead, render
from orchestrator.models import Job, Project
from orchestrator.schemas import JobStatus, Stage
from orchestrator.services import Services
from tests.conftest import SettingsFactory

SCRAPES = 8


class HeldRead:
    """A read that counts its calls and waits for `release` before it answers."""

    def __init__(self, answer: Any = "text") -> None:
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.answer = answer

    def __call__(self, *_: Any, **__: Any) -> str:
        self.calls += 1
        self.started.set()
        assert self.release.wait(10)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return f"{self.answer} {self.calls}"


def scrapes_during_one_read(scrape: Any, read: HeldRead) -> list[Any]:
    """`SCRAPES` scrapes, all sent while the first one's read is held; what each got (or raised)."""
    def one() -> Any:
        try:
            return scrape()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(SCRAPES) as pool:
        first = pool.submit(one)
        assert read.started.wait(10)
        rest = [pool.submit(one) for _ in range(SCRAPES - 1)]
        time.sleep(0.3)  # for the scrapes to come: one late on a busy machine reads again, with any later still
        read.release.set()
        return [first.result(10), *(future.result(10) for future in rest)]


def test_scrapes_that_come_while_one_reads_share_its_read_and_a_later_one_reads_afresh() -> None:
    read = HeldRead()
    shared = SharedRead(read)
    answers = scrapes_during_one_read(shared, read)
    # Before, each read alone: as many reads as scrapes.
    assert read.calls < SCRAPES // 2 and answers[0] == "text 1" and answers.count("text 1") > SCRAPES // 2, answers
    calls = read.calls
    assert shared() == f"text {calls + 1}"  # none running: read afresh


def test_a_failed_read_is_told_to_every_scrape_that_shared_it_and_the_next_reads_again() -> None:
    read = HeldRead(RuntimeError("database away"))
    shared = SharedRead(read)
    answers = scrapes_during_one_read(shared, read)
    assert all(isinstance(answer, RuntimeError) for answer in answers), answers
    read.answer = "back"
    assert shared() == f"back {read.calls}"


@pytest.fixture
def services(make_settings: SettingsFactory) -> Iterator[Services]:
    built = Services.build(make_settings())
    yield built
    asyncio.run(built.aclose())


def test_a_burst_of_scrapes_reads_the_database_once(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each scrape grouped the whole jobs and ledger tables: a burst ran as many reads side by side.
    read = HeldRead()
    monkeypatch.setattr("orchestrator.services.metrics_text", read)
    answers = scrapes_during_one_read(services.metrics, read)
    assert read.calls < SCRAPES // 2 and answers.count("text 1") > SCRAPES // 2, answers


# The histograms' bounds, as README gives them.
BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A sample line: name, labels (values escaped as Prometheus writes them) and value.
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')
Labels = frozenset[tuple[str, str]]


def parse(text: str) -> tuple[dict[str, str], dict[str, dict[Labels, float]]]:
    """Prometheus text: each family's TYPE, and each series' value by name and labels (unescaped).
    Fails on a line the format does not allow, a family typed twice or a series given twice."""
    types: dict[str, str] = {}
    samples: dict[str, dict[Labels, float]] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and kind in ("gauge", "counter", "histogram"), line
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, shown, value = match.groups()
        pairs = frozenset((key, re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], raw))
                          for key, raw in LABEL.findall(shown or ""))
        series = samples.setdefault(name, {})
        assert pairs not in series, line
        series[pairs] = float(value)
    return types, samples


def histograms(text: str, name: str) -> dict[Labels, tuple[list[float], float, float]]:
    """A histogram's series, each checked as Prometheus reads one: its buckets at `BUCKETS` and
    `+Inf`, cumulative (never fewer at a higher bound), `+Inf` its count. By labels (no `le`):
    (bucket counts in order, sum, count)."""
    types, samples = parse(text)
    assert types[name] == "histogram"
    found: dict[Labels, dict[float, float]] = {}
    for with_le, value in samples[f"{name}_bucket"].items():
        le = dict(with_le)["le"]
        found.setdefault(frozenset(kv for kv in with_le if kv[0] != "le"), {})[float(le)] = value
    assert set(found) == set(samples[f"{name}_sum"]) == set(samples[f"{name}_count"])
    result = {}
    for series, buckets in found.items():
        assert sorted(buckets) == [*map(float, BUCKETS), math.inf], series
        counts = [buckets[le] for le in sorted(buckets)]
        assert counts == sorted(counts), (series, counts)
        assert counts[-1] == samples[f"{name}_count"][series], series
        result[series] = (counts, samples[f"{name}_sum"][series], samples[f"{name}_count"][series])
    return result


def expected(seconds: list[float]) -> tuple[list[float], float, float]:
    """What a histogram holds of these observations."""
    return [sum(1 for x in seconds if x <= le) for le in [*BUCKETS, math.inf]], round(sum(seconds), 3), len(seconds)


def labels(**values: str) -> Labels:
    return frozenset(values.items())


T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
# (stage, engine, status, seconds from its creation to its start, from its start to its end); None: not
# started, or not ended. On the millisecond, a bound's own (0.25, 10) included in its bucket.
HISTORY: list[tuple[Stage, str, JobStatus, float | None, float | None]] = [
    ("ideation", "lite", "succeeded", 0.05, 0.25),
    ("ideation", "lite", "succeeded", 2.0, 0.731),
    ("ideation", "lite", "succeeded", -1.5, 0.08),  # started before it was made, by another host's clock: 0
    ("ideation", "lite", "failed", 0.0, 3.0),
    ("polish", "paid", "succeeded", 40.0, 95.5),
    ("polish", "paid", "succeeded", 10.0, 5000.0),  # above every bound: +Inf alone
    ("polish", "paid", "canceled", 700.0, 12.0),  # canceled while it ran
    ("polish", "paid", "canceled", None, None),  # canceled while queued: never started
    ("polish", "paid", "failed", None, None),  # failed before any engine started it
    ("polish", "paid", "queued", None, None),
    ("polish", "paid", "running", 1.0, None),  # not ended: its start may be written again
]


def check_job_histograms(db: Database) -> None:
    """Jobs with known times land in their buckets, with their sum and count; a job not started or
    not ended is in neither histogram; an engine without jobs has every series at 0."""
    with db.transaction() as s:
        s.add(Project(id="prj_times", name="times", policy="balanced"))
        s.flush()
        for n, (stage, engine, status, wait, run) in enumerate(HISTORY):
            created = T0 + timedelta(minutes=n)
            started = None if wait is None else created + timedelta(seconds=wait)
            finished = created if status in ("canceled", "failed") and started is None else (
                None if run is None or started is None else started + timedelta(seconds=run))
            s.add(Job(id=f"job_times{n}", project_id="prj_times", stage=stage, engine=engine, status=status,
                      created_at=created, started_at=started, finished_at=finished))
    engines = {"lite": ["ideation"], "paid": ["polish", "bridge"], 'odd "one"\\': ["polish"]}
    text = render(db, engines)

    ran = histograms(text, "orchestrator_job_duration_seconds")
    ended = ("succeeded", "failed", "canceled")
    pairs = [("ideation", "lite"), ("polish", "paid"), ("bridge", "paid"), ("polish", 'odd "one"\\')]
    assert set(ran) == {labels(stage=st, engine=en, status=stat) for st, en in pairs for stat in ended}
    assert ran[labels(stage="ideation", engine="lite", status="succeeded")] == expected([0.25, 0.731, 0.08])
    assert ran[labels(stage="ideation", engine="lite", status="failed")] == expected([3.0])
    assert ran[labels(stage="polish", engine="paid", status="succeeded")] == expected([95.5, 5000.0])
    assert ran[labels(stage="polish", engine="paid", status="canceled")] == expected([12.0])
    assert ran[labels(stage="polish", engine="paid", status="failed")] == expected([])
    for ending in ended:
        assert ran[labels(stage="polish", engine='odd "one"\\', status=ending)] == ([0] * (len(BUCKETS) + 1), 0, 0)
    counts, _, _ = ran[labels(stage="ideation", engine="lite", status="succeeded")]
    assert counts[:3] == [1, 2, 2]  # 0.08 by 0.1; 0.25 by its own bound, 0.25; 0.731 by 1

    waited = histograms(text, "orchestrator_job_queue_seconds")
    assert set(waited) == {labels(stage=st, engine=en) for st, en in pairs}
    assert waited[labels(stage="ideation", engine="lite")] == expected([0.05, 2.0, 0.0, 0.0])
    assert waited[labels(stage="polish", engine="paid")] == expected([40.0, 10.0, 700.0])
    assert waited[labels(stage="bridge", engine="paid")] == expected([])
    assert 'engine="odd \\"one\\"\\\\"' in text  # escaped as a label value is


def test_job_histograms_hold_each_ended_jobs_run_and_wait(sqlite_db: Database) -> None:
    check_job_histograms(sqlite_db)


NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def check_later_scrapes_read_the_recent_jobs_and_agree_with_a_full_read(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes' scrapes, each keeping what it read of the ended jobs, give a full read's figures
    at every scrape: a job whose end commits after a scrape that its stamp precedes (inside the
    margin) is counted once, as is one stamped on a watermark; the jobs that settled are not read again."""
    clock = [NOW]
    monkeypatch.setattr("orchestrator.metrics.utcnow", lambda: clock[0])
    engines = {"lite": ["ideation"], "paid": ["polish"]}
    made: list[str] = []

    def end(finished: datetime, run: float, wait: float, stage: Stage = "ideation", engine: str = "lite",
            status: JobStatus = "succeeded") -> None:
        started = finished - timedelta(seconds=run)
        with db.transaction() as s:
            job_id = f"job_late{len(made)}"
            s.add(Job(id=job_id, project_id="prj_late", stage=stage, engine=engine, status=status,
                      created_at=started - timedelta(seconds=wait), started_at=started, finished_at=finished))
            made.append(job_id)

    def scrape(settled: SettledTimes, at: datetime) -> str:
        clock[0] = at
        text = render(db, engines, settled)
        assert text == render(db, engines), f"at {at}"  # a full read's, to the millisecond
        return text

    with db.transaction() as s:
        s.add(Project(id="prj_late", name="late", policy="balanced"))
    end(NOW - timedelta(hours=2), 0.4, 0.05)
    end(NOW - timedelta(minutes=20), 95.5, 40.0, "polish", "paid")
    end(NOW - timedelta(minutes=1), 3.0, 0.0, status="failed")
    one, two = SettledTimes(), SettledTimes()  # two processes
    scrape(one, NOW)
    end(NOW + timedelta(minutes=10) - SETTLED_MARGIN, 0.731, 2.0)  # on the watermark of the next scrape
    scrape(one, NOW + timedelta(minutes=10))
    scrape(two, NOW + timedelta(minutes=12))
    # Stamped 6 minutes before `one`'s last scrape, committed after it (its end waited out the database).
    end(NOW + timedelta(minutes=4), 12.0, 700.0, "polish", "paid", "canceled")
    scrape(one, NOW + timedelta(minutes=15))
    scrape(one, NOW + timedelta(minutes=40))  # it settles
    end(NOW + timedelta(minutes=59), 5000.0, 1.0)
    text = scrape(one, NOW + timedelta(hours=1))
    assert scrape(two, NOW + timedelta(hours=1, minutes=1)) == text
    ran = histograms(text, "orchestrator_job_duration_seconds")
    assert sum(count for _, _, count in ran.values()) == len(made)
    assert ran[labels(stage="polish", engine="paid", status="canceled")] == expected([12.0])
    assert ran[labels(stage="ideation", engine="lite", status="succeeded")] == expected([0.4, 0.731, 5000.0])

    # Read from what each kept, not again: a settled job taken out (the jobs gauge drops) is still counted by both.
    with db.transaction() as s:
        s.execute(delete(Job).where(col(Job.id) == made[0]))
    for name in ("orchestrator_job_duration_seconds", "orchestrator_job_queue_seconds"):
        assert histograms(render(db, engines, one), name) == histograms(text, name) == histograms(
            render(db, engines, two), name) != histograms(render(db, engines), name)


def test_later_scrapes_read_the_recent_jobs_and_agree_with_a_full_read(
        sqlite_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_later_scrapes_read_the_recent_jobs_and_agree_with_a_full_read(sqlite_db, monkeypatch)


def test_a_clock_stepped_back_misses_no_job_and_counts_none_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock an hour ahead, then set right: the jobs that end after the correction are stamped
    under the watermark the fast clock left, and were left out until the process restarted."""
    db = Database(f"sqlite:///{tmp_path}/o.db")
    db.migrate()
    clock = [NOW + timedelta(hours=1)]
    monkeypatch.setattr("orchestrator.metrics.utcnow", lambda: clock[0])
    engines = {"lite": ["ideation"]}
    try:
        with db.transaction() as s:
            s.add(Project(id="prj_step", name="step", policy="balanced"))
            s.flush()
            s.add(Job(id="job_step0", project_id="prj_step", stage="ideation", engine="lite", status="succeeded",
                      created_at=NOW - timedelta(hours=2), started_at=NOW - timedelta(hours=2),
                      finished_at=NOW - timedelta(hours=2) + timedelta(seconds=0.4)))
        settled = SettledTimes()
        render(db, engines, settled)  # the fast clock's watermark: NOW + 45 min
        clock[0] = NOW  # set right
        with db.transaction() as s:
            s.add(Job(id="job_step1", project_id="prj_step", stage="ideation", engine="lite", status="succeeded",
                      created_at=NOW - timedelta(seconds=3), started_at=NOW - timedelta(seconds=2), finished_at=NOW))
        clock[0] = NOW + timedelta(minutes=1)
        text = render(db, engines, settled)
        assert text == render(db, engines)
        ran = histograms(text, "orchestrator_job_duration_seconds")
        assert ran[labels(stage="ideation", engine="lite", status="succeeded")] == expected([0.4, 2.0])
    finally:
        db.dispose()


def check_device_seconds_by_project(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each project's device-seconds on local engines, as its quota counts them, added as its jobs
    end: a full read's to the millisecond at every scrape of a process that keeps what settled
    (one settled and taken out is still counted, so it was not read again); a job not ended yet
    (its seconds kept on a row that goes on) counts nothing; every project has a series, and
    those with a quota in force their quota's."""
    clock = [NOW]
    monkeypatch.setattr("orchestrator.metrics.utcnow", lambda: clock[0])
    engines = {"lite": ["ideation"]}

    def job(project_id: str, job_id: str, finished: datetime | None, seconds: float | None) -> None:
        with db.transaction() as s:
            s.add(Job(id=job_id, project_id=project_id, stage="ideation", engine="lite",
                      status="running" if finished is None else "succeeded", created_at=NOW - timedelta(days=1),
                      started_at=NOW - timedelta(days=1), finished_at=finished, device_seconds=seconds))

    with db.transaction() as s:
        s.add(Project(id="prj_dev_own", name="own", policy="balanced", local_seconds_per_day=3600))
        s.add(Project(id="prj_dev_none", name="none", policy="balanced"))
    job("prj_dev_own", "job_dev0", NOW - timedelta(hours=2), 1.2344)
    job("prj_dev_own", "job_dev1", NOW - timedelta(minutes=1), 0.5)
    job("prj_dev_own", "job_dev2", None, 7.0)  # moved off a local engine, running on
    job("prj_dev_none", "job_dev3", NOW - timedelta(minutes=1), None)  # a cloud job

    def scrape(settled: SettledTimes, at: datetime) -> dict[Labels, float]:
        clock[0] = at
        text = render(db, engines, settled, default_local_seconds=100)
        assert text == render(db, engines, default_local_seconds=100), f"at {at}"
        types, samples = parse(text)
        assert types["orchestrator_project_local_device_seconds_total"] == "counter"
        assert samples["orchestrator_project_local_seconds_quota"] == {
            labels(project="prj_dev_own"): 3600, labels(project="prj_dev_none"): 100}
        return samples["orchestrator_project_local_device_seconds_total"]

    settled = SettledTimes()
    assert scrape(settled, NOW) == {labels(project="prj_dev_own"): 1.734, labels(project="prj_dev_none"): 0}
    job("prj_dev_none", "job_dev4", NOW + timedelta(minutes=5), 2.25)
    with db.transaction() as s:  # the moved job ends: its seconds count from now
        s.execute(update(Job).where(col(Job.id) == "job_dev2").values(status="failed",
                                                                       finished_at=NOW + timedelta(minutes=6)))
    assert scrape(settled, NOW + timedelta(minutes=10)) == {labels(project="prj_dev_own"): 8.734,
                                                            labels(project="prj_dev_none"): 2.25}
    with db.transaction() as s:  # settled by then: kept, not read again
        s.execute(delete(Job).where(col(Job.id) == "job_dev0"))
    clock[0] = NOW + timedelta(minutes=11)
    _, samples = parse(render(db, engines, settled))
    assert samples["orchestrator_project_local_device_seconds_total"][labels(project="prj_dev_own")] == 8.734
    _, samples = parse(render(db, engines))
    assert samples["orchestrator_project_local_device_seconds_total"][labels(project="prj_dev_own")] == 7.5
    # Without a server default, the project with a quota of its own alone has a series.
    assert samples["orchestrator_project_local_seconds_quota"] == {labels(project="prj_dev_own"): 3600}


def test_each_project_s_device_seconds_are_counted_as_its_jobs_end(
        sqlite_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_device_seconds_by_project(sqlite_db, monkeypatch)


def check_local_seconds_used_by_project(db: Database) -> None:
    """The 24-hour sum each project's quota is judged against had no series (a dashboard could not
    alert before the quota refused): now `orchestrator_project_local_seconds_used`, read as
    admission reads it (given its reader): the jobs that ended in the window (not one of 25 hours
    ago), an unfinished job's kept seconds and a running local attempt's so far (claimed 45 s
    before by the leases' clock, its lease live: counted to now). A project without a quota had
    none (a cost dashboard read only the counter's increase, by scrape times): now every project
    has one, as the API shows it."""
    now = utcnow()
    leased = db.now()
    lease = timedelta(seconds=60)
    with db.transaction() as s:
        s.add(Project(id="prj_use_own", name="own", policy="balanced", local_seconds_per_day=100))
        s.add(Project(id="prj_use_none", name="none", policy="balanced"))
        s.flush()
        for job_id, project_id, ago, seconds in (("job_use0", "prj_use_own", timedelta(hours=1), 10.5),
                                                 ("job_use1", "prj_use_own", timedelta(hours=25), 500.0),
                                                 ("job_use2", "prj_use_none", timedelta(hours=1), 7.0)):
            s.add(Job(id=job_id, project_id=project_id, stage="ideation", engine="lite", status="succeeded",
                      started_at=now - ago, finished_at=now - ago, device_seconds=seconds))
        s.add(Job(id="job_use3", project_id="prj_use_own", stage="ideation", engine="lite", status="queued",
                  attempt=1, device_seconds=3.0))
        s.add(Job(id="job_use4", project_id="prj_use_own", stage="ideation", engine="lite", status="running",
                  attempt=1, started_at=now - timedelta(seconds=45), lease_taken_at=leased - timedelta(seconds=45),
                  lease_taken_attempt=1, lease_expires_at=leased - timedelta(seconds=5) + lease))
    engines = {"lite": ["ideation"]}

    def as_admission(s: Session, project_ids: list[str]) -> dict[str, float]:
        return device_time.used_by(s, project_ids, local={"lite"}, lease=lease)

    types, samples = parse(render(db, engines, device_used=as_admission))
    assert types["orchestrator_project_local_seconds_used"] == "gauge"
    # The running attempt from its claim to now (its lease live), not to its last renewal (40 s).
    used = samples["orchestrator_project_local_seconds_used"]
    assert used.keys() == {labels(project="prj_use_own"), labels(project="prj_use_none")}
    assert used[labels(project="prj_use_own")] == pytest.approx(10.5 + 3.0 + 45.0, abs=3.0)
    assert used[labels(project="prj_use_none")] == 7.0
    # Knowing no local engine, the running attempt counts nothing; a server default changes no figure.
    _, samples = parse(render(db, engines, default_local_seconds=50))
    assert samples["orchestrator_project_local_seconds_used"] == {labels(project="prj_use_own"): 13.5,
                                                                  labels(project="prj_use_none"): 7.0}


def test_each_project_s_local_seconds_used_is_the_sum_its_quota_is_judged_against(sqlite_db: Database) -> None:
    check_local_seconds_used_by_project(sqlite_db)


def test_a_later_scrape_reads_only_the_recent_ends_for_the_device_seconds(sqlite_db: Database) -> None:
    """A scrape after the first reads the jobs that ended since its watermark by their end, not every
    local job's entry (merged into its grouping by project, SQLite walked every job in project order)."""
    read: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if "device_seconds" in statement and not statement.startswith("EXPLAIN"):
            read.append((statement, parameters))

    settled = SettledTimes()
    render(sqlite_db, {"lite": ["ideation"]}, settled)
    event.listen(sqlite_db.engine, "before_cursor_execute", capture)
    try:
        render(sqlite_db, {"lite": ["ideation"]}, settled)
    finally:
        event.remove(sqlite_db.engine, "before_cursor_execute", capture)
    [(statement, parameters)] = read
    with sqlite_db.session() as s:
        plan = "\n".join(row[3] for row in s.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}",
                                                                          parameters))
    assert "SEARCH jobs USING INDEX ix_jobs_finished_at" in plan and "SCAN jobs" not in plan, plan


def test_a_scrape_whose_read_fails_part_way_counts_no_device_second_twice(
        sqlite_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape that fails after its device-seconds were read (the histograms' read: a database that
    went away between two queries) keeps nothing of that read: the next scrape reads the same ends
    again, and a window folded by the failed one was counted twice, the counter above a full read's."""
    clock = [NOW]
    monkeypatch.setattr("orchestrator.metrics.utcnow", lambda: clock[0])
    engines = {"lite": ["ideation"]}
    with sqlite_db.transaction() as s:
        s.add(Project(id="prj_dev_fail", name="fail", policy="balanced"))
    with sqlite_db.transaction() as s:
        s.add(Job(id="job_dev_fail", project_id="prj_dev_fail", stage="ideation", engine="lite", status="succeeded",
                  created_at=NOW, started_at=NOW, finished_at=NOW + timedelta(minutes=1), device_seconds=2.5))
    settled = SettledTimes()
    render(sqlite_db, engines, settled)  # the job ended after its watermark: read again by the next
    clock[0] = NOW + timedelta(hours=1)  # now under the watermark: the next read folds it
    timings = metrics._timings

    def failing(*args: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("the database went away"))

    monkeypatch.setattr("orchestrator.metrics._timings", failing)
    with pytest.raises(OperationalError):
        render(sqlite_db, engines, settled)
    monkeypatch.setattr("orchestrator.metrics._timings", timings)
    for minutes in (0, 1):
        clock[0] = NOW + timedelta(hours=1, minutes=minutes)
        _, samples = parse(render(sqlite_db, engines, settled))
        _, full = parse(render(sqlite_db, engines))
        name = "orchestrator_project_local_device_seconds_total"
        assert samples[name][labels(project="prj_dev_fail")] == full[name][labels(project="prj_dev_fail")] == 2.5


def check_local_seconds_used_of_more_projects_than_a_statement_binds(db: Database, projects: int) -> None:
    """Every project under the server-wide quota was read in one `IN (...)` of bound parameters a
    query: past the driver's limit (PostgreSQL's 65,535) every scrape failed. Now a slice of the
    projects at a time; each still gets its series, its ended and unfinished jobs' seconds."""
    now = utcnow()
    ids = [f"prj_many{i:06d}" for i in range(projects)]
    with db.transaction() as s:
        s.execute(insert(Project), [{"id": project_id, "name": project_id, "policy": "balanced",
                                     "budget_period": "none", "created_at": now, "storage_bytes": 0}
                                    for project_id in ids])
        s.add(Job(id="job_many_ended", project_id=ids[-1], stage="ideation", engine="lite", status="succeeded",
                  started_at=now - timedelta(hours=1), finished_at=now - timedelta(hours=1), device_seconds=7.0))
        s.add(Job(id="job_many_queued", project_id=ids[-1], stage="ideation", engine="lite", status="queued",
                  attempt=1, device_seconds=3.0))
    _, samples = parse(render(db, {"lite": ["ideation"]}, default_local_seconds=50))
    used = samples["orchestrator_project_local_seconds_used"]
    assert len(used) == projects
    assert (used[labels(project=ids[-1])], used[labels(project=ids[0])]) == (10.0, 0.0)
