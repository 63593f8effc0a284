"""A hold is settled once: a transaction that read it open after another settled it is refused.

Every settlement runs under the database's write lock, so the two cannot interleave in the
service; the stale read is made here by hand, as READ COMMITTED would give it to a transaction
that read the hold before taking that lock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from orchestrator.db import Database
from orchestrator.errors import HoldSettledMeanwhile, StaleAttempt
from orchestrator.ledger import Ledger
from orchestrator.models import Job, LedgerEntry, Project


def held_job(db: Database) -> int:
    with db.transaction() as s:
        project = Project(id="prj_once", name="once", policy="balanced")
        s.add(project)
        s.flush()
        job = Job(id="job_once", project_id=project.id, stage="bridge", engine="fake-paid", params={},
                  estimated=10_000, status="running")
        s.add(job)
        s.flush()
        hold = Ledger().hold(s, project, job, 10_000)
        assert hold is not None
        s.flush()
        assert hold.id is not None
        return hold.id


def entries(db: Database) -> list[tuple[str, int, bool]]:
    with db.session() as s:
        return [(e.kind, e.amount, e.settled) for e in
                s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == "job_once")
                       .order_by(col(LedgerEntry.created_at), col(LedgerEntry.kind))).all()]


SETTLE: dict[str, Callable[[Ledger, Session, Job], object]] = {
    "capture": lambda ledger, s, job: ledger.capture(s, job, None),
    "release": lambda ledger, s, job: ledger.release(s, job, note="failed"),
}


@pytest.mark.parametrize("late", sorted(SETTLE))
def test_a_hold_read_open_after_another_settled_it_is_not_settled_again(db: Database, late: str) -> None:
    hold_id = held_job(db)
    ledger = Ledger()
    with db.transaction() as s:  # the first settlement: a release, as a cancel or a move writes one
        job = s.get(Job, "job_once")
        assert job is not None
        assert ledger.release(s, job, note="canceled") == 10_000
    settled = entries(db)

    def stale_read(s: Session, job_id: str) -> LedgerEntry:
        hold = s.get(LedgerEntry, hold_id)
        assert hold is not None and hold.settled
        set_committed_value(hold, "settled", False)  # as read before the other's commit
        return hold

    ledger.open_hold = stale_read  # type: ignore[method-assign]
    with pytest.raises(HoldSettledMeanwhile, match="settled by another transaction"), db.transaction() as s:
        job = s.get(Job, "job_once")
        assert job is not None
        SETTLE[late](ledger, s, job)
    # Rolled back whole: the hold is released once and neither captured nor released again.
    assert entries(db) == settled == [("hold", 10_000, True), ("release", 10_000, False)]


def test_a_hold_settled_meanwhile_is_a_stale_attempt_to_the_runner() -> None:
    # The runner's end-writes roll back and drop a StaleAttempt (another process ended the job);
    # any other exception there is taken for the database failing and the write tried again.
    assert issubclass(HoldSettledMeanwhile, StaleAttempt)
