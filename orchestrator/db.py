"""The database: one SQLAlchemy engine, SQLite pragmas, sessions, and migrations.

SQLite runs in WAL mode with foreign keys and a busy timeout. pysqlite's own transaction handling
is switched off so that `transaction()` can issue `BEGIN IMMEDIATE`: the write lock is taken at
the start of the transaction, so two writers never both read a balance and both decide it fits.
On PostgreSQL `transaction()` takes one transaction-scoped advisory lock first, which serialises
write transactions the same way: ids made in one (and the ledger's sequence numbers) commit in
the order they were made, so a list cursor (`id > cursor`) never passes over a late commit. Such
a transaction also reads the server's clock, which stamps and judges leases: hosts whose own
clocks differ agree on when a lease runs out (`orchestrator.clock`).
Writes are short (no transaction waits on an engine), so one writer at a time costs little.

PostgreSQL sessions are pinned to READ COMMITTED whatever the server's default: a writer that
waited for the advisory lock must read what the writer before it committed (under REPEATABLE READ
its snapshot would predate that commit, and two holds could both fit one budget). A wait for a
lock ends after `LOCK_TIMEOUT_SECONDS` as SQLite's busy timeout does, and TCP keepalives on the
server's end notice a host that vanished mid-transaction within about a minute, so its lock does
not stall every writer for the two hours of the kernel's default.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import numbers
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, CursorResult, Engine, Result, TextClause, create_engine, event, inspect, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool
from sqlalchemy.util import asbool
from sqlmodel import Session
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from orchestrator import clock
from orchestrator.bells import Bell
from orchestrator.clock import DatabaseClock
from orchestrator.errors import ServerStopping, first_line
from orchestrator.workers import open_regular_file

log = logging.getLogger(__name__)
_IMMEDIATE = "orchestrator_immediate"
# Any fixed number (not migrations/env.py's): the advisory lock every PostgreSQL write takes first.
WRITE_LOCK = 7_202_611_281
LOCK_TIMEOUT_SECONDS = 30  # SQLite's busy timeout too
# A process alive but stopped inside a transaction (SIGSTOP, a paused container, a frozen VM) keeps
# its connection, which keepalives never end, and so the write lock every process's writes wait for.
# No transaction here waits on anything but the database: one idle this long is such a process.
IDLE_IN_TRANSACTION_SECONDS = 300
# A server that takes the connection and never answers (or a host that drops packets) would hold
# a start, a request or `check` for minutes: libpq waits without limit unless told.
CONNECT_TIMEOUT_SECONDS = 10
# How long a start's first connection may take before it says that it waits: up to libpq's timeout
# for each address the host names (20 s for `localhost`'s two), the terminal had stayed silent.
SLOW_CONNECT_SECONDS = 2.0
# lock_not_available (lock_timeout), query_canceled, and the two a retry resolves.
LOCK_WAIT_SQLSTATES = frozenset({"55P03", "57014", "40001", "40P01"})
DISK_FULL_SQLSTATE = "53100"
# read_only_sql_transaction: a standby (a failover's demoted primary, a name still pointing at a
# replica), or a session made read-only (`default_transaction_read_only`, a maintenance window).
READ_ONLY_SQLSTATE = "25006"
LOCK_NOT_AVAILABLE_SQLSTATE = "55P03"
# How long /readyz's probe waits for the write lock (`Database.ping`): far longer than any write
# here holds it (milliseconds), so a busy service stays ready; far shorter than a write's own wait
# (`LOCK_TIMEOUT_SECONDS`), so a stalled writer is seen before the writes fail; and under the
# probe's own deadline (`app.READY_SECONDS`), so its answer names the cause.
WRITE_PROBE_SECONDS = 1.0
# Connections of one process: a request thread each (anyio's pool of 40) and the job machinery.
POOL_SIZE, POOL_OVERFLOW = 10, 30


def postgres_connect_args(url: str) -> dict[str, Any]:
    """psycopg connection options (libpq's): lock waits bounded, and dead peers noticed on both
    ends (the client's keepalives find a vanished server; the server's, set for this session,
    find a vanished client and end its transaction, releasing its locks). Options the URL or
    PGOPTIONS already give (a search_path, a longer lock_timeout) are kept: connect_args would
    replace them."""
    given = make_url(url).query.get("options") or os.environ.get("PGOPTIONS", "")
    ours = (f"-c lock_timeout={LOCK_TIMEOUT_SECONDS * 1000} -c tcp_keepalives_idle=30 "
            "-c tcp_keepalives_interval=10 -c tcp_keepalives_count=3 "
            f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_SECONDS * 1000}")
    # The URL's last: the server applies `-c` switches in order, so of one given twice the last wins,
    # and a setting the URL makes is the studio's.
    options = " ".join(part for part in (ours, given if isinstance(given, str) else " ".join(given)) if part)
    args: dict[str, Any] = {"options": options, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                            "keepalives_count": 3}
    if "connect_timeout" not in make_url(url).query and not os.environ.get("PGCONNECT_TIMEOUT"):
        args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return args


# What a checkpoint truncates the WAL to once a long reader let it grow past it.
WAL_SIZE_LIMIT = 16 * 1024 * 1024


def _file_id(path: Path) -> tuple[int, int] | None:
    """The file at `path` (its device and inode); None when there is none. OSError when it cannot
    be looked at now (a permission, an I/O error: not to be taken for a replaced file)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


class FileReplaced(sqlite3.OperationalError):
    """The SQLite file is no longer the one the service opened at its path: replaced (a backup
    moved into place) or removed under the running service."""


def replaced(exc: BaseException) -> bool:
    """Whether `exc` says the SQLite file was replaced or removed under the service (`FileReplaced`)."""
    return isinstance(exc, DBAPIError) and isinstance(exc.orig, FileReplaced)


def _sqlite_setup(engine: Engine, path: Path | None) -> None:
    # The file the service opened first: in WAL mode SQLite goes on reading and writing the file a
    # connection opened, so each write after a backup was moved into place went to the unlinked old
    # file and was lost, while connections opened since read the new file through the old one's
    # WAL. Once the file at the path is another, every connection refuses until a restart.
    opened: list[tuple[int, int] | None] = []

    def refuse_if_replaced(statement: str) -> None:
        if path is None:
            return
        try:
            now = _file_id(path)
        except OSError:
            return  # SQLite's own open or read says what is wrong
        if not opened:
            opened.append(now)
        elif now != opened[0]:
            raise OperationalError(statement, None, FileReplaced(
                f"the database file {path} was replaced or removed under the running service"),
                connection_invalidated=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        refuse_if_replaced("connect")
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_SECONDS * 1000}")
        cur.execute("PRAGMA synchronous=NORMAL")
        # Without a limit the WAL is reused but never shrunk: a long reader (a backup, an open
        # sqlite3 shell) let it grow to hundreds of MB, kept on disk until a clean stop.
        cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        refuse_if_replaced("BEGIN")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_IMMEDIATE) else "BEGIN")


def _postgres_setup(engine: Engine) -> None:
    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        # A connection to a server that takes no writes is dropped, with the pool's others: kept,
        # every write on them failed after a failover (to a standby, or a DNS name now on the
        # replica) and after a read-only window ended, until the service was restarted. New
        # connections find the primary that `target_session_attrs` or the name lead to now.
        if getattr(context.original_exception, "sqlstate", None) == READ_ONLY_SQLSTATE:
            context.is_disconnect = True


def sqlite_file(url: str) -> Path | None:
    """The file an SQLite URL names; None for a database in memory (or not SQLite's). A `file:`
    URI (`sqlite:///file:/srv/orchestrator.db?mode=ro&uri=true`) names the file after its scheme:
    taken as a path, it made folders `file:/srv/...` under the working directory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    try:  # SQLAlchemy's words for true (`uri=on`, `uri=yes`): with only true and 1, `file:` was a folder
        as_uri = asbool(parsed.query.get("uri", False))
    except ValueError:  # not a boolean: refused by the options check (`database_url_problems`)
        as_uri = False
    if as_uri and database.startswith("file:"):
        if "mode=memory" in database or parsed.query.get("mode") == "memory":
            return None
        database = urllib.parse.unquote(database.removeprefix("file:").partition("?")[0])
    return None if database in ("", ":memory:") else Path(database)


class RequestGate:
    """Whether a request's writes may still commit. A request still open when a stop's graceful
    wait runs out is answered 503 `server_stopping` (`orchestrator.server.AnswerWhenStopped`), but
    the thread running its route cannot be stopped: waiting for the write lock, it went on to commit
    its job and hold (or its grant) after that answer had told the client nothing was made. Closed
    by the answer, the gate turns such a commit into a rollback; and the answer says whether one of
    the request's writes had begun to commit before (then it may have been written)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._committing = False

    def before_commit(self) -> None:
        with self._lock:
            if self._closed:
                raise ServerStopping("the request was answered 503 server_stopping before this write committed")
            self._committing = True

    def close(self) -> bool:
        """No write of the request commits from now on; whether one had begun to before."""
        with self._lock:
            self._closed = True
            return self._committing


# The gate of the request being served (copied into the thread that runs a sync route).
REQUEST_GATE: ContextVar[RequestGate | None] = ContextVar("request_gate", default=None)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": LOCK_TIMEOUT_SECONDS}
            path = sqlite_file(url)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                # As many connections as threads that may use one: SQLAlchemy's default of 15 made
                # reads, which WAL serves at once, queue behind writers waiting for the write lock.
                kwargs.update(pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
        else:
            kwargs.update(pool_pre_ping=True, isolation_level="READ COMMITTED", pool_size=POOL_SIZE,
                          max_overflow=POOL_OVERFLOW, connect_args=postgres_connect_args(url))
        self.engine = create_engine(url, json_serializer=stored_json, **kwargs)
        if self.is_sqlite:
            _sqlite_setup(self.engine, sqlite_file(url))
        else:
            _postgres_setup(self.engine)
        self._writer = self.engine.execution_options(**{_IMMEDIATE: True})
        # Reads that add up several queries (a balance, spend, /metrics) must see one moment;
        # SQLite's read transaction is one snapshot already, PostgreSQL's READ COMMITTED one per statement.
        self._reader = self.engine if self.is_sqlite else self.engine.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True)
        # Tells other processes sharing the database about each commit (see orchestrator.bells);
        # the service sets its own, a bare Database rings nobody.
        self.bell = Bell()
        # PostgreSQL's clock as the last write transaction read it (see `now`).
        self._clock: DatabaseClock | None = None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for reads (and writes that need no lock ordering)."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def now(self) -> datetime:
        """`clock.shared_now()` outside a write transaction: for judging a lease read from a row. On
        PostgreSQL the server's, as the last write transaction read it, carried on by this host's
        monotonic clock."""
        if self.is_sqlite:
            return clock.shared_now()
        if self._clock is None:
            with self.session() as s:
                now = s.connection().execute(text(
                    "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")).scalar_one()
            self._clock = DatabaseClock(int(now))
        return clock.at(self._clock())

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only session whose queries all see the database as of its first one: figures
        summed by several queries agree (a capture committed between two of them would otherwise
        leave a job's cost in neither `held` nor `charged`)."""
        with Session(self._reader, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One write transaction, committed on success, rolled back on any error. The database's
        write lock (SQLite's, or the advisory one on PostgreSQL) is held from the start: ids made
        in it (list cursors) then commit in the order they were made."""
        committing = False
        try:
            with Session(self._writer, expire_on_commit=False) as session:
                with session.begin():
                    connection = session.connection()  # BEGIN now; SQLAlchemy would wait for the first statement
                    if self.is_sqlite:  # one host: its clock orders the ids
                        yield session
                    else:
                        # The lock, then the server's clock once it is ours (a subquery with a volatile
                        # function is run first, never folded into the outer query): one round trip.
                        now = connection.execute(text(
                            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint "
                            "FROM (SELECT pg_advisory_xact_lock(:key)) AS locked"), {"key": WRITE_LOCK}).scalar_one()
                        self._clock = DatabaseClock(int(now))
                        with clock.using(self._clock):
                            yield session
                    if (gate := REQUEST_GATE.get()) is not None:
                        gate.before_commit()  # a request answered already: rolled back
                    self.bell.before_commit(session)
                    committing = True
                self.bell.after_commit()
        except DBAPIError as exc:
            # A connection lost as the COMMIT went out: the server may have committed (its answer
            # was what got lost). SQLite's commit is this process's own: it happened or it did not.
            if committing and not self.is_sqlite and transient(exc):
                setattr(exc, _COMMIT_IN_DOUBT, True)
            raise

    def retrying(self, within: float, what: str = "a write") -> Retrying:
        """Attempts of a write that must not be lost to a database restart or failover (a job's
        end): `for attempt in db.retrying(30, "job x's end"): with attempt, db.transaction() as s:
        ...`. Only what `transient` calls passing (a lost or refused connection, a lock wait that
        timed out) is tried again, for up to `within` seconds; each attempt rolls back whole, so the
        work must be safe to repeat. Told at the first retry, then every RETRY_TOLD_EVERY tries:
        one line per try was some 80 lines a worker in a 40 s outage, none saying what waited."""
        return Retrying(retry=retry_if_exception(transient), stop=stop_after_delay(within),
                        wait=wait_exponential(multiplier=0.25, max=4), reraise=True,
                        before_sleep=functools.partial(_tell_retry, what=what, within=within))

    def ping(self) -> None:
        """Whether the database answers and holds this service's tables (a connection from the pool,
        one statement that reads none of their rows), and whether a write could start (raises
        `WriteLockHeld`, or `WritesRefused` on a standby). A `SELECT 1` alone was answered by a
        database made anew or emptied for a restore, while every request of the service failed on
        it; and by one whose write lock a stalled process held, while every write waited out
        `LOCK_TIMEOUT_SECONDS` and failed."""
        with self.engine.connect() as connection:
            connection.execute(_tables_read())
            connection.rollback()
            self._probe_write_lock(connection)

    def _probe_write_lock(self, connection: Connection) -> None:
        """Take the write lock every write transaction takes first, waiting `WRITE_PROBE_SECONDS` at
        most, and give it back at once: nothing is written."""
        if self.is_sqlite:
            # On the driver's connection: SQLAlchemy's would BEGIN (deferred) before the pragma.
            raw = cast(sqlite3.Connection, connection.connection.driver_connection)
            raw.execute(f"PRAGMA busy_timeout={round(WRITE_PROBE_SECONDS * 1000)}")
            try:
                raw.execute("BEGIN IMMEDIATE")
                raw.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorname == "SQLITE_BUSY":
                    raise WriteLockHeld(WRITE_PROBE_SECONDS) from exc
                raise
            finally:
                raw.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_SECONDS * 1000}")
            return
        connection.execute(text("SELECT set_config('lock_timeout', :ms, true)"),
                           {"ms": str(round(WRITE_PROBE_SECONDS * 1000))})
        if connection.execute(text("SHOW transaction_read_only")).scalar() == "on":
            connection.rollback()
            # The advisory lock is taken on a standby too: the service read as ready while every write failed.
            raise WritesRefused
        try:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK})
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE_SQLSTATE:
                raise WriteLockHeld(WRITE_PROBE_SECONDS) from exc
            raise
        finally:
            connection.rollback()  # the lock, and the transaction's lock_timeout, given back

    def ring(self) -> None:
        """Make the other processes look now, with no change of our own to tell (an empty write
        transaction rings as any commit does)."""
        with self.transaction():
            pass

    def migrate(self) -> None:
        upgrade(self.url)

    def dispose(self) -> None:
        self.engine.dispose()


RETRY_TOLD_EVERY = 10


@functools.cache
def _tables_read() -> TextClause:
    """The service's tables, none of their rows: a missing one fails it as a request would (`tables_missing`)."""
    from sqlmodel import SQLModel

    import orchestrator.models  # noqa: F401  (its tables are SQLModel's once defined)

    return text(" UNION ALL ".join(f"SELECT 1 FROM {name} WHERE 1 = 0" for name in sorted(SQLModel.metadata.tables)))


def _tell_retry(state: RetryCallState, *, what: str, within: float) -> None:
    if state.attempt_number != 1 and state.attempt_number % RETRY_TOLD_EVERY:
        return
    exc = state.outcome.exception() if state.outcome else None
    first = first_line(exc or "")
    trying = (f"trying again for up to {within:.0f} s" if state.attempt_number == 1
              else f"still trying ({state.attempt_number} tries in {state.seconds_since_start:.0f} s)")
    if exc is not None and disk_full(exc):
        log.warning("the database's disk is full (%s) writing %s; %s", first, what, trying)
    elif exc is not None and refuses_writes(exc):
        log.warning("the database takes no writes for now (%s) writing %s; %s", first, what, trying)
    else:
        log.warning("the database did not answer (%s) writing %s; %s", first, what, trying)


def refuses_writes(exc: BaseException) -> bool:
    """The database takes no writes for now: PostgreSQL's standby or read-only session (a failover
    under way, a maintenance window), SQLite's file, folder or mount made read-only under the
    running service. Nothing was written, and asking again works once it takes writes again."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    return getattr(orig, "sqlstate", None) == READ_ONLY_SQLSTATE or \
        str(getattr(orig, "sqlite_errorname", "")).startswith("SQLITE_READONLY")


def disk_full(exc: BaseException) -> bool:
    """The database's disk is full (SQLite's SQLITE_FULL, PostgreSQL's disk_full): nothing was
    written, and asking again works once someone makes room."""
    orig = getattr(exc, "orig", None)
    return isinstance(exc, OperationalError) and (getattr(orig, "sqlite_errorname", None) == "SQLITE_FULL"
                                                  or getattr(orig, "sqlstate", None) == DISK_FULL_SQLSTATE)


def changed(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE changed: `Session.execute` is typed as returning a plain `Result`,
    which has no count (a DML statement's is a `CursorResult`)."""
    return cast(CursorResult[Any], result).rowcount


def stored_json(value: Any) -> str:
    """A JSON column's text. A float that is not finite (an engine's NaN guidance, an infinite
    ratio in an error's details) is written as null: PostgreSQL's json refuses `NaN`, which failed
    the job's final write after its images were made (and billed), and SQLite kept text that no
    strict JSON reader takes. A value of a type JSON lacks is what it holds (numpy's scalars and
    arrays as numbers, booleans and lists), anything else its text."""
    try:
        return json.dumps(value, allow_nan=False, default=_json_default)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False, default=_json_default)


def _json_default(value: object) -> object:
    tolist = getattr(value, "tolist", None)  # numpy's scalars (a bool_ too) and arrays, torch's tensors
    if callable(tolist):
        return _finite(tolist())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _finite(float(value))
    # Anything else (a set, a datetime) as its text: kept, where refusing it failed the job's write.
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


_COMMIT_IN_DOUBT = "orchestrator_commit_in_doubt"


def commit_in_doubt(exc: BaseException) -> bool:
    """Whether `exc` ended a write transaction as it committed, on a connection lost then (see
    `Database.transaction`): the write may be in the database. Such an error is still `transient`,
    and a write retried after it must hold if done twice (the job machinery's writes are guarded)."""
    return getattr(exc, _COMMIT_IN_DOUBT, False) is True


def transient(exc: BaseException) -> bool:
    """A database that may answer if asked again: a connection lost mid-transaction, none to be
    had from the server or the pool (no statement ran), a lock wait that timed out (a stalled
    writer), a full disk, or a database that takes no writes for now (`refuses_writes`: a failover
    to a standby, a mount made read-only). Not a statement the database refused (no such table),
    which would fail the same way again."""
    if isinstance(exc, PoolTimeout):
        return True  # every connection of the pool busy (a burst of requests): no statement ran
    if refuses_writes(exc):
        return True  # a job's end is waited out through it: its images, a paid render's, were made
    if isinstance(exc, DBAPIError) and (exc.connection_invalidated or _reset_of_a_lost_connection(exc)):
        return True
    if not isinstance(exc, OperationalError):
        return False
    if exc.connection_invalidated or exc.statement is None or disk_full(exc):
        return True
    code = getattr(exc.orig, "sqlstate", None)  # psycopg's SQLSTATE
    text = str(exc.orig).lower()
    return code in LOCK_WAIT_SQLSTATES or "database is locked" in text or "database is busy" in text


def tables_missing(exc: BaseException) -> bool:
    """Whether a statement found no such table: a database made anew or emptied under a running
    service (the first step of a restore: drop, create, then load), the setup's to fix with
    `orchestrator migrate` or the restore's end, not a bug."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    said = str(orig)
    # 42P01 also says a query's own mistake ("missing FROM-clause entry"): a bug, not a table missing.
    return (getattr(orig, "sqlstate", None) == "42P01" and "does not exist" in said) or (
        getattr(orig, "sqlite_errorname", None) == "SQLITE_ERROR" and "no such table" in said)


def _reset_of_a_lost_connection(exc: DBAPIError) -> bool:
    """psycopg's refusal to reset a pooled connection whose socket closed under the pool's
    pre-ping: the lost connection, raised as a ProgrammingError (a request got a 500 for it, where
    a lost connection is a 503 to send again, and a job's end would not have waited it out)."""
    return "can't change 'autocommit' now" in str(exc.orig)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(files("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def shown_url(url: str) -> str:
    """The URL for a log or a message: without its password, in its user part or its query. A
    SQLite URL that holds none, as it was written: rendered again, `sqlite:///file:/srv/o.db`
    read `sqlite:///file%3A/srv/o.db`, a URL nobody had written."""
    parsed = make_url(url)
    secret = {key: "***" for key in parsed.query if key.lower() in ("password", "passfile", "sslpassword")}
    if parsed.get_backend_name() == "sqlite" and parsed.password is None and not secret:
        return url
    return (parsed.update_query_dict(secret) if secret else parsed).render_as_string(hide_password=True)


class WriteLockHeld(Exception):
    """The database's write lock stayed held for the whole of a short wait (`Database.ping`): a
    process stalled in a write transaction (stopped, a debugger's breakpoint, another program's long
    write), and every write waits for it, then fails."""

    def __init__(self, waited: float) -> None:
        super().__init__(f"the database's write lock has been held for over {waited:g} s")
        self.waited = waited


class WritesRefused(Exception):
    """The database takes no writes (`Database.ping`): a PostgreSQL standby, or a session made
    read-only (`default_transaction_read_only`)."""

    def __init__(self) -> None:
        super().__init__("the database takes no writes (a read-only standby or session)")


class MigrationRefused(Exception):
    """A revision that will not run on the data the database holds (it would lose or misread it);
    the message says what to do. Nothing was changed: an upgrade is one transaction."""


class ForeignDatabase(Exception):
    """The database holds tables and none of this service's migrations: another application's."""


def connect_timeout(url: str) -> str:
    """libpq's wait for each address's connection as this process makes them, in words: the URL's
    `connect_timeout`, else PGCONNECT_TIMEOUT, else `CONNECT_TIMEOUT_SECONDS`."""
    given = make_url(url).query.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT")
    value = (given[-1] if isinstance(given, tuple) else given) or str(CONNECT_TIMEOUT_SECONDS)
    try:
        seconds = int(value)
    except ValueError:  # libpq refuses it with its own words once it connects
        return f"connect_timeout {value}"
    # libpq's: 0 or less waits without a limit, and 1 is taken as 2.
    return "without a time limit" if seconds <= 0 else f"up to {max(seconds, 2)} s"


@contextmanager
def told_if_slow(url: str) -> Iterator[None]:
    """A warning, once `SLOW_CONNECT_SECONDS` pass inside, that the PostgreSQL server has not
    answered yet: where, how long the wait may last, and that Ctrl-C ends it."""
    if make_url(url).get_backend_name() != "postgresql":
        yield
        return
    timer = threading.Timer(SLOW_CONNECT_SECONDS, lambda: log.warning(
        "waiting for the database at %s to answer (%s for each address its host names before giving up; Ctrl-C "
        "stops the wait)", shown_url(url), connect_timeout(url)))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _refuse_foreign(url: str) -> None:
    """Refuse to create the tables in a database that has others and no migration history of
    ours (`ORCH_DATABASE_URL` pointing at another application's): its schema was filled with
    ours, without a word. (Two services starting on a new database see it empty, or migrated
    whole: the migrations are one transaction.) `migrate`'s first connection: a wait is told."""
    postgres = make_url(url).get_backend_name() == "postgresql"
    engine = create_engine(url, **({"connect_args": postgres_connect_args(url)} if postgres else {}))
    try:
        with told_if_slow(url):
            others = foreign_tables(engine)
    finally:
        engine.dispose()
    if others:
        raise ForeignDatabase(f"the database at {shown_url(url)} holds tables "
                              f"of another application ({others}) and none of this service's")


def foreign_tables(engine: Engine) -> str:
    """Another application's tables in the database (some named, as a message shows them), or ""
    when it holds none or holds this service's migration history (`alembic_version`, even empty)."""
    found = inspect(engine)
    # Where the migrations create their tables: another schema on the search path (an
    # application's in `public`, PostGIS's) is not this one.
    names = sorted(found.get_table_names(schema=found.default_schema_name))
    if not names or "alembic_version" in names:
        return ""
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def reach(url: str) -> None:
    """Connect to a server's database once, and let go: raises `DatabaseError` when it does not
    answer or refuses the connection (credentials, no such database). Nothing is written."""
    engine = create_engine(url, poolclass=NullPool, connect_args=postgres_connect_args(url))
    try:
        with told_if_slow(url), engine.connect():  # a service's first connection
            pass
    finally:
        engine.dispose()


def stored_revision(url: str) -> str | None:
    """The migration the database is at: None for one never migrated, or an SQLite file not made yet
    (not made by this look)."""
    from alembic.migration import MigrationContext

    path = sqlite_file(url)
    if path is not None and not path.exists():
        return None
    postgres = make_url(url).get_backend_name() == "postgresql"
    engine = create_engine(url, **({"connect_args": postgres_connect_args(url)} if postgres else {}))
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> str | None:
    """Apply the migrations, one process at a time: two services starting together must not both
    create the tables (PostgreSQL takes an advisory lock in migrations/env.py). All pending
    revisions are one transaction on both databases, so an upgrade that fails or is killed
    leaves the revision it started from (see migrations/env.py). Raises `ForeignDatabase` for
    another application's database. Returns the revision the upgrade found, under that lock
    (None: a database never migrated): read before it, another process's upgrade was told as this one's."""
    config = alembic_config(url)
    path = sqlite_file(url)
    if path is None:
        _refuse_foreign(url)
        command.upgrade(config, revision)
        return _found(config)
    path.parent.mkdir(parents=True, exist_ok=True)  # `orchestrator migrate` on a new data dir
    # Never through a link, nor into a FIFO: the data dir may be shared with other users of its group,
    # and a link put there had the migration create (as root, anywhere) the file it named.
    with open_regular_file(Path(f"{path}.migrate-lock"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Waited for without a word, a holder that stopped (Ctrl-Z) left a start silent forever.
            log.warning("waiting for another process's migration of %s to end (it holds %s.migrate-lock)",
                        shown_url(url), path.name)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        _refuse_foreign(url)
        command.upgrade(config, revision)
        return _found(config)


def _found(config: Config) -> str | None:
    heads = config.attributes.get("upgraded_from") or ()
    return str(heads[0]) if heads else None
