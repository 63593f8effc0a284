"""The service's last good version of each policy file, in the database (`policies.SharedVersions`).

Every process reads the policy files by itself (`Services._watch_policies`), and each used to keep
the last good version it had read. Processes look at different moments, so an edit followed by a
refused one could leave them on different versions until the file was mended. What the latest
read of each file found is kept here (a read told late never replaces one made after it), and each
process serves it while the file is refused. A process's load (a file changed, SIGHUP, `POST
/v1/policies/reload`) writes what it read, in one transaction; its looks while a file is refused
write nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.models import PolicyVersion
from policies import Seen
from policies.loader import content_hash

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# How far ahead of the service's clock a read kept may be before it is taken for a clock set back
# since (the hosts' PostgreSQL clocks agree within milliseconds: `Database.now`).
CLOCK_SLACK_NS = 5 * 10**9


class PolicyVersions:
    def __init__(self, db: Database) -> None:
        self.db = db

    def now_ns(self) -> int:
        # PostgreSQL's clock where the processes share it: hosts' clocks differ.
        return (self.db.now() - EPOCH) // timedelta(microseconds=1) * 1000

    def remember(self, seen: Sequence[Seen]) -> None:
        by_name = {one.name: one for one in seen}
        if not by_name:
            return
        # Read first: a look, which tells nothing new, takes no write lock.
        with self.db.session() as s:
            if not self._newer(s, by_name, self.now_ns()):
                return
        with self.db.transaction() as s:  # the write lock: a slower process's older read is not kept over a newer one
            # The clock read again once the lock is ours (up to 30 s later): a row written while
            # this waited is no row from the future.
            for one in self._newer(s, by_name, self.now_ns()):
                row = s.get(PolicyVersion, one.name) or PolicyVersion(name=one.name, read_ns=one.read_ns,
                                                                      source=one.source)
                row.source, row.content, row.read_ns = one.source, one.content, one.read_ns
                row.content_hash = None if one.content is None else content_hash(one.content)
                row.recorded_at = utcnow()
                s.add(row)

    def recall(self, names: Sequence[str] | None) -> dict[str, Seen]:
        if names is not None and not names:
            return {}
        with self.db.session() as s:
            query = select(PolicyVersion)
            rows = s.exec(query if names is None else query.where(col(PolicyVersion.name).in_(names))).all()
        return {row.name: Seen(row.name, row.source, row.content, row.read_ns) for row in rows}

    @staticmethod
    def _newer(s: Session, by_name: dict[str, Seen], now: int) -> list[Seen]:
        """Those of `by_name` to keep: news (`Seen.new`, what a load read, not told before) made
        after the read kept, or where nothing is kept; so an older read told late is never kept
        over a newer one. A read kept that the service's clock has not reached yet was stamped by a
        clock since set back (a host's that ran ahead, a PostgreSQL failover): news replaces it;
        and news stamped so is kept only where nothing is (told late, after its clock was set
        back, it would outrank the reads made since)."""
        kept = {row.name: row for row in s.exec(select(PolicyVersion).where(col(PolicyVersion.name).in_(by_name)))}
        newer: list[Seen] = []
        ahead = now + CLOCK_SLACK_NS
        for name, one in by_name.items():
            row = kept.get(name)
            if one.new and (row is None or (
                    one.read_ns <= ahead and (row.read_ns < one.read_ns or row.read_ns > ahead))):
                newer.append(one)
        return newer
