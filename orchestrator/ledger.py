"""The credit ledger: the one place that moves money.

Entries are append-only, in integer millicredits: `grant` (top-up), `hold` (an estimate reserved
before a paid job runs), `capture` (what was charged), `release` (what was not), `adjustment`
(a correction, signed: what reconciling an `unreconciled` capture against the invoice adds). A
capture, release or adjustment names its hold; a unique constraint makes a second one of a kind
for one hold impossible. A capture of nothing held (`charge_usage`: metered local work, a cost
reported for a job estimated free) is written with the job's end, and a partial unique index
allows one per job. The only changes ever made to a written entry are clearing a capture's
`unreconciled` flag, in the transaction that writes its adjustment, and marking a hold `settled`,
in the transaction that writes its capture or release (so open holds are found by an index, not
by looking for each hold's settlement in the whole ledger), by an update that changes it only
while it is open: a transaction that finds it settled meanwhile is refused and rolled back, so no
hold is both released and captured.

Balances are derived from entries, never kept in a counter: a budget window is computed from
calendar boundaries in UTC, and spend in the window is the sum of its captures and adjustments.
Nothing resets.

    available = limit + grants(window) - charged(window) - held(open holds)

Every function here runs inside the caller's write transaction, so a hold commits with its job
and a capture commits with the job's final state. Concurrency: the transaction holds the
database's write lock from its start (SQLite's `BEGIN IMMEDIATE`, PostgreSQL's advisory lock, see
orchestrator.db); on PostgreSQL the project's row is also locked `FOR UPDATE`, so a hold stays
safe in a transaction made some other way.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, literal, update
from sqlalchemy import select as sa_select
from sqlalchemy.orm import aliased
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from orchestrator.clock import iso, shared_now
from orchestrator.db import changed
from orchestrator.errors import BudgetExceeded, Conflict, HoldSettledMeanwhile, OrchestratorError, not_found
from orchestrator.models import Job, LedgerEntry, Project
from tiers.base import MAX_AMOUNT, is_amount, to_credits

log = logging.getLogger(__name__)

# A reported cost over this many times the hold is captured as reported but flagged unreconciled.
OVERRUN_REVIEW = 2


def window(period: str, now: datetime) -> tuple[datetime | None, datetime | None]:
    """The budget window containing `now`: [start, end) on UTC calendar boundaries."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())  # ISO weeks start on Monday
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    return None, None


@dataclass(frozen=True)
class Balance:
    limit: int | None
    period: str
    window_start: datetime | None
    window_end: datetime | None
    charged: int
    held: int
    granted: int

    @property
    def available(self) -> int | None:
        if self.limit is None:
            return None
        return self.limit + self.granted - self.charged - self.held

    @property
    def used_fraction(self) -> float | None:
        """Share of the window's budget spent or held (for routing rules like `budget_used_over`)."""
        if self.limit is None:
            return None
        total = self.limit + self.granted
        used = self.charged + self.held
        if total <= 0:
            # A zero budget is all spent (every `budget_used_over` below 1 matches it), and one
            # charged anyway (metered local work) is overspent: past 1.0 as well.
            return 1.0 if used <= 0 else math.inf
        return used / total

    def fits(self, amount: int) -> bool:
        """Whether a hold of `amount` fits. Nothing always does, even in an overspent window (a
        provider charged more than its estimate): free local work never stops for a budget."""
        available = self.available
        return amount <= 0 or available is None or amount <= available

    def refusal(self, amount: int) -> BudgetExceeded:
        available = self.available or 0
        window = "in all" if self.period == "none" else "today" if self.period == "day" else f"this {self.period}"
        # Below zero (a limit lowered under what is held, a provider's charge over its estimate),
        # said as the details say it: "0 available" read as the whole story.
        room = (f"{to_credits(available)} credits available {window}" if available >= 0 else
                f"none available {window}: {to_credits(-available)} credits over the limit")
        if self.held > 0:  # the project's own jobs in flight: a failure or a cancel among them frees room
            room = f"{room}; {to_credits(self.held)} credits held by unfinished jobs"
        return BudgetExceeded(
            f"the estimate ({to_credits(amount)} credits) does not fit the budget ({room})",
            details={"estimate": to_credits(amount), "available": to_credits(available),
                     "held": to_credits(self.held),
                     "window": {"period": self.period, "start": _iso(self.window_start),
                                "end": _iso(self.window_end)}},
        )

    def public(self) -> dict[str, Any]:
        return {
            "limit": None if self.limit is None else to_credits(self.limit),
            "period": self.period,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "charged": to_credits(self.charged),
            "held": to_credits(self.held),
            "granted": to_credits(self.granted),
            "available": None if self.available is None else to_credits(self.available),
        }


@dataclass(frozen=True)
class EngineCost:
    """One engine's entries of a job, in millicredits: what was held for it (`estimated`, its
    holds' amounts), what of that is still held, what it was charged (captures and adjustments,
    a capture without a hold included) and what was released."""

    engine: str | None
    estimated: int = 0
    held: int = 0
    charged: int = 0
    released: int = 0


@dataclass(frozen=True)
class JobCost:
    """A job's entries: still held and charged in all, and by engine (see `Ledger.job_costs`)."""

    held: int = 0
    charged: int = 0
    engines: list[EngineCost] = field(default_factory=list)


def holds(amount: int, *, billable: bool) -> bool:
    """Whether `Ledger.hold` writes a hold of `amount`: for paid work, and for work priced 0 on an
    engine its provider bills whatever it is priced (`billable`). A new job's first answer lists
    its hold by the same rule, so that it says what every later read of the ledger says."""
    return amount > 0 or (amount == 0 and billable)


def open_holds() -> Any:
    return and_(col(LedgerEntry.kind) == "hold", col(LedgerEntry.settled).is_(False))


def charges() -> Any:
    """Entries that count as spend: captures and adjustments. The kinds are written into the SQL,
    not bound: PostgreSQL's generic plan for a bound `kind IN ($1, $2)` (psycopg prepares a query
    it has run 5 times) scanned the whole budget window by date, 25 ms on a long ledger, where
    the window index answers in microseconds."""
    return col(LedgerEntry.kind).in_([literal(kind, literal_execute=True) for kind in ("capture", "adjustment")])


class Ledger:
    def __init__(self, clock: Callable[[], datetime] = shared_now) -> None:
        # The clock hosts sharing the database agree on: by each writer's own, a worker a minute
        # slow stamped a capture just past midnight into the month before (its hold's own time
        # after it), where the new month's budget never counted it.
        self.clock = clock

    # -- reading -----------------------------------------------------------------------------

    def balance(self, s: Session, project: Project) -> Balance:
        start, end = window(project.budget_period, self.clock())

        def total(*where: Any) -> int:
            stmt = select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                col(LedgerEntry.project_id) == project.id, *where)
            return int(s.exec(stmt).one())

        in_window = [] if start is None else [col(LedgerEntry.created_at) >= start, col(LedgerEntry.created_at) < end]
        return Balance(
            limit=project.budget_limit, period=project.budget_period, window_start=start, window_end=end,
            charged=total(charges(), *in_window),
            held=total(open_holds()),
            granted=total(col(LedgerEntry.kind) == "grant", *in_window),
        )

    def job_totals(self, s: Session, job_ids: list[str]) -> dict[str, tuple[int, int]]:
        """(held, charged) per job."""
        return {job_id: (cost.held, cost.charged) for job_id, cost in self.job_costs(s, job_ids).items()}

    def job_costs(self, s: Session, job_ids: list[str]) -> dict[str, JobCost]:
        """What each job's entries hold and charge, in all and by engine (a job that fell back
        has entries of each engine it was held for). One read of `ix_ledger_entries_job_id` alone,
        so the totals and the engines' figures are the same rows' sums: they cannot disagree."""
        if not job_ids:
            return {}
        # SQLAlchemy's select: SQLModel's types a select of four columns at most. Run on the
        # session's connection (its snapshot), as Core: the ORM's handling of a page's rows cost
        # more than the read itself.
        rows = s.connection().execute(
            sa_select(col(LedgerEntry.job_id), col(LedgerEntry.engine), col(LedgerEntry.kind),
                      col(LedgerEntry.settled), func.sum(col(LedgerEntry.amount)))
            .where(col(LedgerEntry.job_id).in_(job_ids))
            .group_by(col(LedgerEntry.job_id), col(LedgerEntry.kind), col(LedgerEntry.settled),
                      col(LedgerEntry.engine))).all()
        # Summed in plain lists (estimated, held, charged, released), each engine's figures made
        # once: a frozen copy per row (`dataclasses.replace`) made a page of 50 jobs that fell back
        # (4 rows each) read 4 to 5 times slower than the two sums it replaced (bench/history.py).
        sums: dict[str, dict[str | None, list[int]]] = {}
        for job_id, engine, kind, settled, amount in rows:
            if not job_id:
                continue
            mine = sums.setdefault(job_id, {})
            figures = mine.get(engine)
            if figures is None:
                figures = mine[engine] = [0, 0, 0, 0]
            amount = int(amount)
            if kind == "hold":
                figures[0] += amount
                if not settled:
                    figures[1] += amount
            elif kind in ("capture", "adjustment"):
                figures[2] += amount
            elif kind == "release":
                figures[3] += amount
        out: dict[str, JobCost] = {}
        for job_id, mine in sums.items():
            engines = [EngineCost(engine, *figures) for engine, figures in mine.items()]
            out[job_id] = JobCost(held=sum(c.held for c in engines), charged=sum(c.charged for c in engines),
                                  engines=engines)
        return out

    # -- moving money ------------------------------------------------------------------------

    def lock_project(self, s: Session, project_id: str) -> Project:
        """The project row, locked for the rest of the transaction on Postgres (SQLite's
        `BEGIN IMMEDIATE` already serialises writers)."""
        stmt = select(Project).where(col(Project.id) == project_id)
        bind = s.get_bind()
        if bind.dialect.name != "sqlite":
            stmt = stmt.with_for_update()
        project = s.exec(stmt).first()
        if project is None:
            raise not_found("project", "project_id", project_id)
        return project

    def hold(self, s: Session, project: Project, job: Job, amount: int, *,
             billable: bool = False) -> LedgerEntry | None:
        """Reserve `amount` for `job`, or raise `BudgetExceeded` (the transaction then writes nothing).
        Nothing is held for free work, except on an engine whose provider bills whatever it is
        priced (`billable`, see `tiers.base.billed_by_provider`): a hold of 0 there has every way a
        job ends settle it as a paid job's, an unknown outcome included (captured, unreconciled)."""
        if not holds(amount, billable=billable):
            return None
        balance = self.balance(s, project)
        if not balance.fits(amount):
            raise balance.refusal(amount)
        entry = LedgerEntry(project_id=project.id, job_id=job.id, kind="hold", amount=amount, engine=job.engine,
                            stage=job.stage, created_at=self.clock())
        s.add(entry)
        return entry

    def open_hold(self, s: Session, job_id: str) -> LedgerEntry | None:
        return s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job_id, open_holds())).first()

    def _settle(self, s: Session, hold: LedgerEntry) -> None:
        """Mark `hold` settled, where it is still open. The unique constraint refuses a second
        release (or capture) of one hold, but not a capture after a release: a transaction that
        read the hold open before another settled it (READ COMMITTED, without the write lock)
        would add its capture beside that release. Its update then changes no row (PostgreSQL
        waits for the other's commit and reads the row again), and it is refused, rolled back."""
        result = s.execute(update(LedgerEntry).where(col(LedgerEntry.id) == hold.id, open_holds())
                           .values(settled=True).execution_options(synchronize_session=False))
        if changed(result) != 1:
            raise HoldSettledMeanwhile(f"hold {hold.id} of job {hold.job_id} was settled by another transaction")
        set_committed_value(hold, "settled", True)

    def capture(self, s: Session, job: Job, actual: int | None, *, unreconciled: bool = False,
                note: str | None = None) -> int:
        """Charge the job: `actual` when the provider reported it, else the hold's estimate; the
        rest of the hold is released. Returns the amount captured (0 when nothing was held)."""
        hold = self.open_hold(s, job.id)
        if hold is None:
            return 0
        if actual is not None and not is_amount(actual):
            # Not a charge (a malformed usage block, a third-party engine's bug: negative, a
            # fraction, an infinity): the estimate is captured instead, for the invoice to settle,
            # and no release outgrows the hold.
            told = (f"{to_credits(int(actual))} credits" if isinstance(actual, numbers.Integral)
                    else f"{actual!r}"[:40] + " millicredits")
            note = f"reported cost {told} is not a charge; the estimate is captured"
            actual, unreconciled = None, True
        elif actual is not None and hold.amount == 0:
            # Priced 0 (a hold of 0, see `hold`) and billed all the same: spend as reported, as for
            # a job that held nothing, not a case for review.
            if actual and note is None:
                note = "reported by the provider for a job estimated free"
        elif actual is not None and actual > OVERRUN_REVIEW * hold.amount:
            # Taken as reported, but far past what was held: someone should look at the invoice.
            note = note or f"reported cost is over {OVERRUN_REVIEW} times the estimate"
            unreconciled = True
        amount = hold.amount if actual is None else int(actual)
        now = self.clock()
        self._settle(s, hold)
        s.add(LedgerEntry(project_id=hold.project_id, job_id=job.id, kind="capture", amount=amount,
                          hold_id=hold.id, engine=job.engine, stage=job.stage, unreconciled=unreconciled,
                          over_hold=amount > hold.amount, note=note, created_at=now))
        if amount < hold.amount:
            s.add(LedgerEntry(project_id=hold.project_id, job_id=job.id, kind="release",
                              amount=hold.amount - amount, hold_id=hold.id, engine=job.engine, stage=job.stage,
                              note="rest of the hold", created_at=now))
        return amount

    def charge_made(self, s: Session, job: Job, actual: int | None, note: str | None = None,
                    unread: str | None = None) -> None:
        """A job whose provider made (and billed) its work, kept or not: its hold captured
        (`actual` when the provider reported it, else the estimate). Estimated free, so nothing
        was held, a reported cost is spend all the same; a paid job whose hold is settled already
        is not charged again. `unread`: why the provider's report of its cost could not be read
        (the estimate captured then is flagged for reconciliation, as a cost that is no charge is)."""
        if self.open_hold(s, job.id) is not None:
            self.capture(s, job, actual, note=unread or note, unreconciled=unread is not None)
        elif job.estimated <= 0 and actual and not is_amount(actual):
            log.warning("job %s: its engine reported a cost of %s millicredits, which is not a charge; nothing "
                        "was held, so nothing is charged", job.id, str(actual)[:40])
        elif job.estimated <= 0 and actual:
            self.charge_usage(s, job, int(actual), note=f"{note + ': ' if note else ''}reported by the provider "
                                                        "for a job estimated free")

    def charge_usage(self, s: Session, job: Job, amount: int, note: str | None = None) -> None:
        """A capture without a hold: metered local work. It is never refused for budget (local
        engines keep working when a budget is exhausted) but it counts as spend."""
        # At most what an entry may hold: hours at the highest rate would pass it (and the budget's
        # sums the database's integers), however long the device was held.
        amount = min(amount, MAX_AMOUNT)
        if amount > 0:
            s.add(LedgerEntry(project_id=job.project_id, job_id=job.id, kind="capture", amount=amount,
                              engine=job.engine, stage=job.stage, note=note, created_at=self.clock()))

    def release(self, s: Session, job: Job, note: str | None = None) -> int:
        hold = self.open_hold(s, job.id)
        if hold is None:
            return 0
        self._settle(s, hold)
        s.add(LedgerEntry(project_id=hold.project_id, job_id=job.id, kind="release", amount=hold.amount,
                          hold_id=hold.id, engine=job.engine, stage=job.stage, note=note, created_at=self.clock()))
        return hold.amount

    def settle_unstarted(self, s: Session, job: Job, note: str) -> None:
        """A queued job ends before it runs: release its hold, unless a provider already accepted
        work for it (a job waiting to be reattached after a crash), which runs and bills on; then
        the estimate is captured for reconciliation."""
        if job.has_provider_work():
            self.capture(s, job, None, unreconciled=True, note=f"{note}; the provider had accepted its work")
        else:
            self.release(s, job, note=note)

    def settle_failure(self, s: Session, job: Job, error: OrchestratorError) -> None:
        """Release when the provider surely charged nothing; otherwise capture what it reported
        charging (`EngineError.cost_millicredits`) or else the estimate, marked unreconciled when
        nobody knows whether it charged (then at most the error's ceiling, for a job that failed
        before asking for all its images). A job an earlier attempt got a provider to accept
        (`provider_work`, saved before a crash) may be billed for that work whatever ended this
        attempt (a cancel, a missing source file): it is never released, unless the provider said
        that work billed nothing (`EngineError.unbilled`)."""
        charged = getattr(error, "charged", "no")
        if charged == "no" and job.has_provider_work() and not getattr(error, "work_unbilled", False):
            charged = "unknown"
        if charged == "no":
            self.release(s, job, note=f"{error.code}")
        elif charged == "yes":
            # The provider finished and said what it charged: that is the bill, as on a success,
            # and a report it could not read is the estimate flagged for the invoice, as there.
            # Flagged too when a cost goes with it: the estimate's share of the images made, put in
            # by `tiers._cloud.paid_calls` for a job ended part-way (a user's cancel kept the
            # answer of its first call of two), which is no report of the provider's either.
            cost = getattr(error, "cost_millicredits", None)
            unread = getattr(error, "cost_unread", None)
            self.charge_made(s, job, cost, note=error.code, unread=f"{error.code}: {unread}" if unread else None)
        else:
            ceiling = getattr(error, "cost_millicredits", None)
            hold = self.open_hold(s, job.id)
            if ceiling is not None and (hold is None or not is_amount(ceiling) or ceiling >= hold.amount):
                ceiling = None  # the whole hold, as without one: a ceiling never adds to it
            self.capture(s, job, ceiling, unreconciled=True, note=f"{error.code}: outcome unknown")

    def reconcile(self, s: Session, project_id: str, entry_id: int, charged: int, note: str | None) -> LedgerEntry:
        """Settle an `unreconciled` capture with what the provider's invoice says it charged: an
        `adjustment` of the difference (signed; 0 when the estimate was right) naming the same hold,
        so the unique `(hold_id, kind)` allows one per capture, and the capture's flag cleared.
        The adjustment counts in the window it is made in, as a credit note does."""
        capture = s.get(LedgerEntry, entry_id)
        if capture is None or capture.project_id != project_id:
            raise not_found("ledger entry", "entry_id", str(entry_id))
        if capture.kind != "capture" or not capture.unreconciled:
            article = "an" if capture.kind[:1] in "aeiou" else "a"  # an adjustment
            raise Conflict("only an unreconciled capture can be reconciled; this entry is "
                           + (f"{article} {capture.kind}" if capture.kind != "capture"
                              else "a settled capture (its cost was known, or it is reconciled already)"),
                           details={"entry_id": str(entry_id), "kind": capture.kind})
        capture.unreconciled = False
        s.add(capture)
        adjustment = LedgerEntry(project_id=project_id, job_id=capture.job_id, kind="adjustment",
                                 amount=charged - capture.amount, hold_id=capture.hold_id, engine=capture.engine,
                                 stage=capture.stage, note=note or f"reconciled: charged {to_credits(charged)}",
                                 created_at=self.clock())
        s.add(adjustment)
        return adjustment

    def void_withdrawn(self, s: Session, job: Job, note: str) -> list[LedgerEntry]:
        """The provider said the work of an ended job, withdrawn there, never ran
        (`tiers.base.Withdrawable`): the estimate its engine's attempt was charged for
        reconciliation is reconciled at 0, as a person would from the invoice. A capture
        reconciled meanwhile is left alone (locked on PostgreSQL, so a concurrent reconcile waits)."""
        stmt = select(LedgerEntry).where(col(LedgerEntry.job_id) == job.id, col(LedgerEntry.kind) == "capture",
                                         col(LedgerEntry.engine) == job.engine,
                                         col(LedgerEntry.unreconciled).is_(True))
        if s.get_bind().dialect.name != "sqlite":
            stmt = stmt.with_for_update()
        return [self.reconcile(s, capture.project_id, int(capture.id or 0), 0, note)
                for capture in s.exec(stmt).all()]

    def grant(self, s: Session, project_id: str, amount: int, note: str | None = None) -> LedgerEntry:
        entry = LedgerEntry(project_id=project_id, kind="grant", amount=amount, note=note, created_at=self.clock())
        s.add(entry)
        return entry

    def sweep(self, s: Session) -> int:
        """Settle holds whose job has finished (a safety net: finishing normally settles in the
        same transaction). Returns how many holds were settled.

        First, holds still marked open that a capture or release names are marked settled: a
        process of a version before the flag (still running through an upgrade) settles without
        it, and such a hold would otherwise count as held for good, and be settled twice here."""
        settlement = aliased(LedgerEntry)
        s.execute(update(LedgerEntry).where(
            open_holds(), select(settlement.id).where(col(settlement.hold_id) == col(LedgerEntry.id),
                                                      col(settlement.kind).in_(("capture", "release"))).exists()
        ).values(settled=True))
        rows = s.exec(select(LedgerEntry, Job).join(Job, col(Job.id) == col(LedgerEntry.job_id))
                      .where(open_holds(), col(Job.status).in_(("succeeded", "failed", "canceled")))).all()
        for _hold, job in rows:
            # Made, or accepted by a provider (which bills it whatever ended the job, as in
            # `settle_failure`): the estimate, for reconciliation. Otherwise nothing was billed.
            if job.status == "succeeded" or job.has_provider_work():
                self.capture(s, job, None, unreconciled=True, note="sweeper: job finished with an open hold")
            else:
                self.release(s, job, note="sweeper: job finished with an open hold")
        return len(rows)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else iso(value)
