"""The database wrapper: write transactions on SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from orchestrator.db import Database
from orchestrator.settings import Settings


def test_a_write_transaction_holds_the_write_lock_before_its_first_statement(tmp_path: Path) -> None:
    """Ids made at the top of a transaction (list cursors) must commit in the order they were made:
    a second writer waits from the moment the first transaction starts, not from its first write."""
    path = tmp_path / "o.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with db.transaction(), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free once it committed
        other.execute("ROLLBACK")
    finally:
        other.close()
        db.dispose()


@pytest.mark.parametrize("folder", ["dq?x", "dp%41b", "with space"])
def test_a_data_dir_of_any_name_holds_its_database(tmp_path: Path, folder: str) -> None:
    # `dq?x` made the database `dq` (outside the data dir); `dp%41b` could not be opened.
    settings = Settings(data_dir=tmp_path / folder, database_url=None)
    db = Database(settings.resolved_database_url)
    try:
        db.migrate()
    finally:
        db.dispose()
    assert (tmp_path / folder / "orchestrator.db").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder]


@pytest.mark.parametrize(("error", "tries"), [
    # Lost, or never had, a connection; a lock wait that timed out: asked again.
    (OperationalError("UPDATE jobs", {}, Exception("server closed the connection"), connection_invalidated=True), 3),
    (OperationalError(None, None, Exception("connection refused")), 3),
    (OperationalError("UPDATE jobs", {}, Exception("database is locked")), 3),
    # A statement the database refused fails the same way again: at once.
    (OperationalError("SELECT nope", {}, Exception("no such table: nope")), 1),
])
def test_writes_that_must_not_be_lost_are_tried_again_only_when_it_can_help(
        tmp_path: Path, error: OperationalError, tries: int) -> None:
    db = Database(f"sqlite:///{tmp_path / 'o.db'}")
    made: list[int] = []
    try:
        for attempt in db.retrying(30):
            with attempt:
                made.append(1)
                if len(made) < 3 or tries == 1:
                    raise error
    except OperationalError:
        assert tries == 1
    assert len(made) == tries
    db.dispose()
