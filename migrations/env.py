"""Alembic environment: the URL comes from the orchestrator's settings (or the caller's config)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from alembic import context
from sqlalchemy import Connection, Engine, create_engine, event, pool, text
from sqlmodel import SQLModel

import orchestrator.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from orchestrator.db import LOCK_TIMEOUT_SECONDS, MigrationRefused, postgres_connect_args

log = logging.getLogger("orchestrator.migrations")
config = context.config
target_metadata = SQLModel.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from orchestrator.settings import Settings

    return Settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


# Any fixed number: the key of the advisory lock that serialises migrations on PostgreSQL.
_MIGRATION_LOCK = 7_202_611_280


def _sqlite_transactions(engine: Engine) -> None:
    """Make an upgrade one SQLite transaction, as it is on PostgreSQL: pysqlite only opens one
    before INSERT/UPDATE/DELETE, so DDL (a batch table rebuild's drop and rename included)
    committed as it ran, and an upgrade that failed or was killed halfway stayed halfway."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        # A batch rebuild drops the old table: with foreign keys on, that fails (or cascades)
        # once other rows reference it. The pragma is a no-op inside a transaction, hence here;
        # `_check_foreign_keys` does the checking at the end instead (SQLite's own procedure
        # for table rebuilds, https://www.sqlite.org/lang_altertable.html#otheralter).
        dbapi_conn.execute("PRAGMA foreign_keys=OFF")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # The write lock up front: a service writing meanwhile makes us wait (busy timeout), where
        # a read-then-write transaction could fail outright once another write landed in between.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _dangling(connection: Connection) -> Counter[tuple[str, str]]:
    """Rows whose foreign key names no row, counted by (table, the table it names). Counted, not
    listed: a table rebuild may give a row another rowid."""
    return Counter((row[0], row[2]) for row in connection.exec_driver_sql("PRAGMA foreign_key_check"))


def _check_foreign_keys(connection: Connection, before: Counter[tuple[str, str]]) -> None:
    """Refuse a change of revision that leaves more dangling references than the database held
    before it (raised inside the transaction: the whole upgrade rolls back). Those it held already
    (a hand fix in the sqlite3 shell, which leaves foreign keys off; a restore mixing backups) are
    the operator's to mend, not the upgrade's fault: said, and migrated over."""
    after = _dangling(connection)
    made = after - before
    if made:
        raise MigrationRefused(
            "the migration would leave rows whose references name no row ("
            + ", ".join(f"{table} -> {parent}: {count}" for (table, parent), count in sorted(made.items()))
            + "); nothing was changed. This is a bug of the migration: please report it")
    if after:
        log.warning("the database holds rows whose references name no row (%s), from before this migration: "
                    "`PRAGMA foreign_key_check` in the sqlite3 shell lists them",
                    ", ".join(f"{table} -> {parent}: {count}" for (table, parent), count in sorted(after.items())))


def _nothing_to_do(heads: tuple[str, ...]) -> bool:
    """Whether the database is at the head it is upgraded to (every service's start)."""
    return (context.get_revision_argument() in ("head", "heads")
            and set(heads) == set(context.script.get_heads()))


def run_migrations_online() -> None:
    url = _url()
    sqlite = url.startswith("sqlite")
    # Lock waits are bounded as the service's own: SQLite's not pysqlite's 5 s, PostgreSQL's not
    # forever (an ALTER queued behind an open transaction also blocks every reader behind it).
    connect_args = {"timeout": LOCK_TIMEOUT_SECONDS} if sqlite else postgres_connect_args(url)
    # READ COMMITTED whatever the server's default, as the service's own sessions (orchestrator.db).
    isolation = {} if sqlite else {"isolation_level": "READ COMMITTED"}
    connectable = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args, **isolation)
    if sqlite:
        _sqlite_transactions(connectable)
    with connectable.connect() as connection:
        # transactional_ddl: all pending revisions in one transaction on both databases, so a failed
        # upgrade leaves the revision it started from (Alembic assumes SQLite cannot, see above).
        context.configure(connection=connection, target_metadata=target_metadata, transactional_ddl=True,
                          render_as_batch=sqlite, compare_type=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Two services starting together: the second waits, as long as the first's upgrade
                # takes, then finds the schema current. Only this wait is unbounded.
                connection.execute(text("SET LOCAL lock_timeout = 0"))
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
                connection.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_SECONDS * 1000}"))
            heads = context.get_context().get_current_heads()
            # What the database was before: a revision may tell which releases wrote its rows (0019).
            context.config.attributes["upgraded_from"] = heads
            # Only around a change: the check reads every referencing row, too slow for every start.
            changing = sqlite and not _nothing_to_do(heads)
            before = _dangling(connection) if changing else Counter()
            context.run_migrations()
            if changing and context.get_context().get_current_heads() != heads:
                _check_foreign_keys(connection, before)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
