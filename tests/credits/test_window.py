"""Budget windows on UTC calendar boundaries, and balances under an injected clock."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, select

from orchestrator import clock
from orchestrator.db import Database
from orchestrator.errors import BudgetExceeded
from orchestrator.ledger import Balance, Ledger, window
from orchestrator.models import Job, JobStatus, LedgerEntry, Project
from orchestrator.spend import spend


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
        microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


@pytest.mark.parametrize(("period", "now", "start", "end"), [
    ("day", utc(2026, 3, 15, 13, 45, 7, 12), utc(2026, 3, 15), utc(2026, 3, 16)),
    ("day", utc(2026, 12, 31, 23, 59, 59, 999999), utc(2026, 12, 31), utc(2027, 1, 1)),
    ("day", utc(2028, 2, 28, 12), utc(2028, 2, 28), utc(2028, 2, 29)),  # leap year
    # 2026-11-29 is a Sunday: it still belongs to the ISO week that began on Monday the 23rd.
    ("week", utc(2026, 11, 29, 23, 59, 59, 999999), utc(2026, 11, 23), utc(2026, 11, 30)),
    ("week", utc(2026, 11, 30), utc(2026, 11, 30), utc(2026, 12, 7)),
    ("week", utc(2026, 12, 31, 8), utc(2026, 12, 28), utc(2027, 1, 4)),  # a week across the new year
    ("month", utc(2026, 12, 31, 23, 59, 59, 999999), utc(2026, 12, 1), utc(2027, 1, 1)),
    ("month", utc(2027, 1, 1), utc(2027, 1, 1), utc(2027, 2, 1)),
    ("month", utc(2026, 2, 14, 9), utc(2026, 2, 1), utc(2026, 3, 1)),
    ("none", utc(2026, 5, 5), None, None),
])
def test_window(period: str, now: datetime, start: datetime | None, end: datetime | None) -> None:
    assert window(period, now) == (start, end)
    if start is not None and end is not None:
        assert start <= now < end
        assert start.tzinfo is not None and end.tzinfo is not None


def test_consecutive_windows_meet() -> None:
    for period in ("day", "week", "month"):
        now = utc(2026, 1, 1)
        for _ in range(60):
            start, end = window(period, now)
            assert start is not None and end is not None
            assert window(period, end)[0] == end
            assert window(period, end - timedelta(microseconds=1)) == (start, end)
            now = end


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def add_project(db: Database, limit: int | None, period: str) -> Project:
    project = Project(id="prj_window", name="window", policy="balanced", budget_limit=limit, budget_period=period)
    with db.transaction() as s:
        s.add(project)
    return project


def add_job(db: Database, project: Project, job_id: str, clock: Clock) -> Job:
    job = Job(id=job_id, project_id=project.id, stage="bridge", engine="fake-paid", params={},
              created_at=clock.now)
    with db.transaction() as s:
        s.add(job)
    return job


def test_a_capture_counts_only_in_its_own_month(db: Database) -> None:
    clock = Clock(utc(2026, 12, 31, 23, 0))
    ledger = Ledger(clock=clock)
    project = add_project(db, 100_000, "month")  # 100 credits a month
    december = add_job(db, project, "job_december", clock)
    with db.transaction() as s:
        ledger.hold(s, ledger.lock_project(s, project.id), december, 60_000)
    with db.transaction() as s:
        assert ledger.capture(s, december, None) == 60_000
    with db.session() as s:
        balance = ledger.balance(s, project)
    assert (balance.charged, balance.held, balance.available) == (60_000, 0, 40_000)
    assert (balance.window_start, balance.window_end) == (utc(2026, 12, 1), utc(2027, 1, 1))

    late = add_job(db, project, "job_late_december", clock)
    with db.transaction() as s, pytest.raises(BudgetExceeded) as refused:
        ledger.hold(s, ledger.lock_project(s, project.id), late, 50_000)
    assert refused.value.details["available"] == 40
    # Written as every other time of the API is: UTC with `Z`.
    assert refused.value.details["window"] == {"period": "month", "start": "2026-12-01T00:00:00Z",
                                               "end": "2027-01-01T00:00:00Z"}

    clock.now = utc(2027, 1, 1)  # the new month starts with the whole budget
    with db.session() as s:
        balance = ledger.balance(s, project)
    assert (balance.charged, balance.held, balance.available) == (0, 0, 100_000)
    assert (balance.window_start, balance.window_end) == (utc(2027, 1, 1), utc(2027, 2, 1))
    january = add_job(db, project, "job_january", clock)
    with db.transaction() as s:
        assert ledger.hold(s, ledger.lock_project(s, project.id), january, 100_000) is not None
    with db.session() as s:
        assert ledger.balance(s, project).available == 0


def test_an_open_hold_counts_in_every_window(db: Database) -> None:
    """Holds are not windowed: a December hold still open in January is still reserved money, and
    its capture counts in the month it is made."""
    clock = Clock(utc(2026, 12, 31, 23, 59))
    ledger = Ledger(clock=clock)
    project = add_project(db, 100_000, "month")
    job = add_job(db, project, "job_straddles", clock)
    with db.transaction() as s:
        ledger.hold(s, ledger.lock_project(s, project.id), job, 30_000)
    clock.now = utc(2027, 1, 1, 0, 1)
    with db.session() as s:
        balance = ledger.balance(s, project)
    assert (balance.charged, balance.held, balance.available) == (0, 30_000, 70_000)
    with db.transaction() as s:
        ledger.capture(s, job, 25_000)
    with db.session() as s:
        balance = ledger.balance(s, project)
    assert (balance.charged, balance.held, balance.available) == (25_000, 0, 75_000)
    clock.now = utc(2026, 12, 31, 23, 59, 30)  # looking back at December: nothing captured there
    with db.session() as s:
        assert ledger.balance(s, project).charged == 0


def test_grants_count_in_their_own_week(db: Database) -> None:
    clock = Clock(utc(2026, 11, 29, 22))  # a Sunday
    ledger = Ledger(clock=clock)
    project = add_project(db, 10_000, "week")
    with db.transaction() as s:
        ledger.grant(s, project.id, 5_000, note="sunday top-up")
    with db.session() as s:
        assert ledger.balance(s, project).available == 15_000
    clock.now = utc(2026, 11, 30, 0, 0)  # Monday: a new week
    with db.session() as s:
        balance = ledger.balance(s, project)
    assert (balance.granted, balance.available) == (0, 10_000)


def test_settlement_is_once_per_hold(db: Database) -> None:
    clock = Clock(utc(2026, 6, 1, 12))
    ledger = Ledger(clock=clock)
    project = add_project(db, None, "none")
    job = add_job(db, project, "job_once", clock)
    with db.transaction() as s:
        ledger.hold(s, ledger.lock_project(s, project.id), job, 10_000)
    with db.transaction() as s:
        assert ledger.capture(s, job, 4_000) == 4_000
    with db.transaction() as s:  # a second settlement finds no open hold and writes nothing
        assert ledger.capture(s, job, None) == 0
        assert ledger.release(s, job) == 0
        assert ledger.sweep(s) == 0
    with db.session() as s:
        balance = ledger.balance(s, project)
    assert (balance.limit, balance.available, balance.charged, balance.held) == (None, None, 4_000, 0)


@pytest.mark.parametrize(("status", "work", "settled"), [
    ("succeeded", None, ("capture", True)),  # made, cost unknown: the estimate, for reconciliation
    ("failed", None, ("release", False)),
    ("canceled", None, ("release", False)),
    # A provider had accepted its work: billed whatever ended the job, as `settle_failure` has it.
    ("failed", {"engine": "fake-paid", "handles": [{"id": "req-1"}]}, ("capture", True)),
    ("canceled", {"engine": "fake-paid", "handles": [{"id": "req-1"}]}, ("capture", True)),
])
def test_the_sweeper_settles_a_finished_jobs_open_hold(db: Database, status: JobStatus, work: dict[str, object] | None,
                                                       settled: tuple[str, bool]) -> None:
    clock = Clock(utc(2026, 6, 1, 12))
    ledger = Ledger(clock=clock)
    project = add_project(db, None, "none")
    job = add_job(db, project, f"job_{status}", clock)
    with db.transaction() as s:
        ledger.hold(s, ledger.lock_project(s, project.id), job, 10_000)
        row = s.get(Job, job.id)
        assert row is not None
        row.status, row.provider_work = status, work
        s.add(row)
    with db.transaction() as s:
        assert ledger.sweep(s) == 1
    with db.transaction() as s:
        assert ledger.sweep(s) == 0  # once
    with db.session() as s:
        entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job.id)
                         .order_by(col(LedgerEntry.id))).all()
    assert [(e.kind, e.amount, e.unreconciled) for e in entries] == [("hold", 10_000, False),
                                                                      (settled[0], 10_000, settled[1])]


@pytest.mark.parametrize(("limit", "granted", "spent", "used"), [
    (None, 0, 0, None),  # no budget: no share to route on
    (10_000, 0, 2_500, 0.25),
    (0, 0, 0, 1.0),  # a zero budget is all spent (it once read as "no budget")
    (0, 5_000, 1_000, 0.2),  # a zero limit topped up by a grant
    # Charged anyway (metered local work): overspent, past a rule's `budget_used_over = 1.0`
    # as a limit of 1 with the same charge is (it read as exactly 1.0, matching none).
    (0, 0, 5_000, math.inf),
])
def test_used_fraction(limit: int | None, granted: int, spent: int, used: float | None) -> None:
    balance = Balance(limit=limit, period="month", window_start=None, window_end=None, charged=spent, held=0,
                      granted=granted)
    assert balance.used_fraction == used


@pytest.mark.parametrize(("period", "said"), [("none", "available in all"), ("month", "available this month"),
                                              ("day", "available today")])
def test_a_refusal_says_which_window_is_short(period: str, said: str) -> None:
    # A lifetime budget's refusal read "7.475 credits available this none".
    balance = Balance(limit=10_000, period=period, window_start=None, window_end=None, charged=2_525, held=0,
                      granted=0)
    assert balance.refusal(8_000).message.endswith(f"(7.475 credits {said})")


def test_a_refusal_over_the_limit_says_by_how_much_as_its_details_do() -> None:
    # A limit lowered to 20 under 50 held: the message said "0.0 credits available", the details -30.
    balance = Balance(limit=20_000, period="month", window_start=None, window_end=None, charged=0, held=50_000,
                      granted=0)
    refusal = balance.refusal(10_000)
    assert refusal.message.endswith("(none available this month: 30.0 credits over the limit; "
                                    "50.0 credits held by unfinished jobs)")
    assert (refusal.details["available"], refusal.details["held"]) == (-30.0, 50.0)


@pytest.mark.parametrize(("held", "said"), [(0, "(2.0 credits available this month)"),
                                            (6_500, "(2.0 credits available this month; 6.5 credits held by "
                                                    "unfinished jobs)")])
def test_a_refusal_says_what_unfinished_jobs_hold(held: int, said: str) -> None:
    """A client refused while its own jobs run learns that their ends may free room (a failure or
    a cancel releases its hold), which `available` alone did not say."""
    balance = Balance(limit=10_000, period="month", window_start=None, window_end=None, charged=8_000 - held,
                      held=held, granted=0)
    refusal = balance.refusal(5_000)
    assert refusal.message.endswith(said)
    assert (refusal.details["available"], refusal.details["held"]) == (2.0, held / 1000)


def test_a_reconciliation_on_a_later_day_counts_money_there_but_not_the_job_again(db: Database) -> None:
    clock = [utc(2026, 11, 2, 10)]
    ledger = Ledger(clock=lambda: clock[0])
    project = add_project(db, None, "none")
    job = Job(id="job_late", project_id=project.id, stage="bridge", engine="fake-paid", params={}, estimated=10_000)
    with db.transaction() as s:
        s.add(job)
        s.flush()
        ledger.hold(s, project, job, 10_000)
        ledger.capture(s, job, None, unreconciled=True)
    clock[0] = utc(2026, 11, 5, 9)
    with db.transaction() as s:
        capture = next(e for e in s.exec(select(LedgerEntry).where(col(LedgerEntry.kind) == "capture")).all())
        assert capture.id is not None
        ledger.reconcile(s, project.id, capture.id, 4_000, None)
    with db.session() as s:
        report = spend(s, "day", None, None, None)
    assert [(g["key"], g["charged"], g["unreconciled"], g["jobs"]) for g in report["groups"]] == [
        ("2026-11-02", 10, 0, 1), ("2026-11-05", -6, 0, 0)]
    assert report["total"] == 4


def test_entries_are_stamped_by_the_clock_hosts_share(db: Database) -> None:
    # Each writer's own clock decided an entry's window: a worker a minute slow put a capture just
    # past midnight into the month before. Inside a PostgreSQL write, the database's clock rules.
    project = add_project(db, 100_000, "month")
    database_now = utc(2027, 1, 1, 0, 0, 30)
    with clock.using(lambda: int(database_now.timestamp()) * 1_000_000):
        with db.transaction() as s:
            entry = Ledger().grant(s, project.id, 5_000, note="top-up")
        with db.session() as s:
            assert Ledger().balance(s, project).window_start == utc(2027, 1, 1)
    assert entry.created_at == database_now
