"""The service's last good version of each policy file, in the database (`policies.SharedVersions`).

Every process reads the policy files by itself (`Services._watch_policies`), and each used to keep
the last good version it had read. Processes look at different moments, so an edit followed by a
refused one could leave them on different versions until the file was mended. What the latest
read of each file found is kept here (a read told late never replaces one made after it), and each
process serves it while the file is refused.
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
        # Read first: a look that tells no newer read takes no write lock.
        with self.db.session() as s:
            if not self._newer(s, by_name):
                return
        with self.db.transaction() as s:  # the write lock: a slower process's older read is not kept over a newer one
            for one in self._newer(s, by_name):
                row = s.get(PolicyVersion, one.name) or PolicyVersion(name=one.name, read_ns=one.read_ns,
                                                                      source=one.source)
                row.source, row.content, row.read_ns = one.source, one.content, one.read_ns
                row.content_hash = None if one.content is None else content_hash(one.content)
                row.recorded_at = utcnow()
                s.add(row)

    def recall(self, names: Sequence[str]) -> dict[str, Seen]:
        if not names:
            return {}
        with self.db.session() as s:
            rows = s.exec(select(PolicyVersion).where(col(PolicyVersion.name).in_(names))).all()
        return {row.name: Seen(row.name, row.source, row.content, row.read_ns) for row in rows}

    @staticmethod
    def _newer(s: Session, by_name: dict[str, Seen]) -> list[Seen]:
        """Those of `by_name` read after the read kept. (A process tells what it read again at each
        load and look: an older read told again, or late, is never kept over a newer one.)"""
        kept = {row.name: row for row in s.exec(select(PolicyVersion).where(col(PolicyVersion.name).in_(by_name)))}
        newer: list[Seen] = []
        for name, one in by_name.items():
            row = kept.get(name)
            if row is None or row.read_ns < one.read_ns:
                newer.append(one)
        return newer
