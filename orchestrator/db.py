"""The database: one SQLAlchemy engine, SQLite pragmas, sessions, and migrations.

SQLite runs in WAL mode with foreign keys and a busy timeout. pysqlite's own transaction handling
is switched off so that `transaction()` can issue `BEGIN IMMEDIATE`: the write lock is taken at
the start of the transaction, so two writers never both read a balance and both decide it fits.
On PostgreSQL `transaction()` takes one transaction-scoped advisory lock first, which serialises
write transactions the same way: ids made in one (and the ledger's sequence numbers) commit in
the order they were made, so a list cursor (`id > cursor`) never passes over a late commit.
Writes are short (no transaction waits on an engine), so one writer at a time costs little.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlmodel import Session

from orchestrator.bells import Bell

log = logging.getLogger(__name__)
_IMMEDIATE = "orchestrator_immediate"
# Any fixed number (not migrations/env.py's): the advisory lock every PostgreSQL write takes first.
WRITE_LOCK = 7_202_611_281


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_IMMEDIATE) else "BEGIN")


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            path = make_url(url).database or ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _sqlite_setup(self.engine)
        self._writer = self.engine.execution_options(**{_IMMEDIATE: True})
        # Tells other processes sharing the database about each commit (see orchestrator.bells);
        # the service sets its own, a bare Database rings nobody.
        self.bell = Bell()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for reads (and writes that need no lock ordering)."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One write transaction, committed on success, rolled back on any error. The database's
        write lock (SQLite's, or the advisory one on PostgreSQL) is held from the start: ids made
        in it (list cursors) then commit in the order they were made."""
        with Session(self._writer, expire_on_commit=False) as session:
            with session.begin():
                connection = session.connection()  # BEGIN now; SQLAlchemy would wait for the first statement
                if not self.is_sqlite:
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK})
                yield session
                self.bell.before_commit(session)
            self.bell.after_commit()

    def ring(self) -> None:
        """Make the other processes look now, with no change of our own to tell (an empty write
        transaction rings as any commit does)."""
        with self.transaction():
            pass

    def migrate(self) -> None:
        upgrade(self.url)

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(files("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations, one process at a time: two services starting together must not both
    create the tables (PostgreSQL takes an advisory lock in migrations/env.py). All pending
    revisions are one transaction on both databases, so an upgrade that fails or is killed
    leaves the revision it started from (see migrations/env.py)."""
    path = (make_url(url).database or "") if url.startswith("sqlite") else ""
    if not path or path == ":memory:":
        command.upgrade(alembic_config(url), revision)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # `orchestrator migrate` on a new data dir
    with open(f"{path}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        command.upgrade(alembic_config(url), revision)
