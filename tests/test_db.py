"""The database wrapper: write transactions on SQLite; PostgreSQL connections bounded in time."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import select

from orchestrator.db import LOCK_TIMEOUT_SECONDS, WAL_SIZE_LIMIT, Database, WriteLockHeld, postgres_connect_args
from orchestrator.models import Job
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


def test_the_wal_a_long_reader_let_grow_shrinks_back_at_the_next_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    reader = sqlite3.connect(path, timeout=5, isolation_level=None)
    writer = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode=WAL")  # as the service's own connections run
        writer.execute("CREATE TABLE filler (b BLOB)")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchall()  # a snapshot no checkpoint may pass
        for _ in range(40):
            writer.execute("INSERT INTO filler VALUES (randomblob(1048576))")
        wal = Path(f"{path}-wal")
        assert wal.stat().st_size > 2 * WAL_SIZE_LIMIT
        reader.execute("COMMIT")
        with db.engine.connect() as conn:  # the service's own connection, with its pragmas
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            conn.exec_driver_sql("INSERT INTO filler VALUES (x'00')")
            conn.commit()
        assert wal.stat().st_size <= WAL_SIZE_LIMIT
    finally:
        reader.close()
        writer.close()
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
    # Every connection of the pool busy (a burst of requests): no statement ran either.
    (PoolTimeout("QueuePool limit of size 10 overflow 30 reached"), 3),
    # A statement the database refused fails the same way again: at once.
    (OperationalError("SELECT nope", {}, Exception("no such table: nope")), 1),
])
def test_writes_that_must_not_be_lost_are_tried_again_only_when_it_can_help(
        tmp_path: Path, error: Exception, tries: int) -> None:
    db = Database(f"sqlite:///{tmp_path / 'o.db'}")
    made: list[int] = []
    try:
        for attempt in db.retrying(30):
            with attempt:
                made.append(1)
                if len(made) < 3 or tries == 1:
                    raise error
    except (OperationalError, PoolTimeout):
        assert tries == 1
    assert len(made) == tries
    db.dispose()


def test_reads_do_not_queue_behind_writers_waiting_for_the_lock(tmp_path: Path) -> None:
    # 20 request threads waiting for the write lock (another process holds it) each hold a pooled
    # connection; with SQLAlchemy's default pool of 15, a read that WAL serves at once waited for
    # one of them until its lock wait ended.
    path = tmp_path / "o.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.ring()  # the service's first connection made the file WAL
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's long write
    waiting = []

    def write() -> None:
        with db.transaction():
            pass

    try:
        with ThreadPoolExecutor(20) as pool:
            waiting = [pool.submit(write) for _ in range(20)]
            with ThreadPoolExecutor(1) as reader:
                read = reader.submit(lambda: db.session().__enter__().exec(select(func.count()).select_from(Job)).one())
                assert read.result(timeout=10) == 0
            other.execute("COMMIT")
            for done in waiting:
                done.result(timeout=60)
    finally:
        other.close()
        db.dispose()


def test_ping_finds_a_write_lock_a_stalled_writer_holds_and_takes_none_itself(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.ring()  # the service's first connection made the file WAL
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process stopped inside its write
        with pytest.raises(WriteLockHeld, match="held for over 1 s"):
            db.ping()
        other.execute("ROLLBACK")
        db.ping()
        # The probe gave the lock back, and its connection waits as long as any write's again.
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == LOCK_TIMEOUT_SECONDS * 1000
    finally:
        other.close()
        db.dispose()


def test_ping_waits_out_a_write_that_holds_the_lock_briefly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy service's writes hold the lock for milliseconds: the probe waits for it, not fails."""
    path = tmp_path / "o.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.ring()
    # A wait far past the write's, so that a loaded machine cannot make the test fail.
    monkeypatch.setattr("orchestrator.db.WRITE_PROBE_SECONDS", 30.0)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.2, lambda: other.execute("ROLLBACK"))
    try:
        started = time.monotonic()
        release.start()
        db.ping()
        assert time.monotonic() - started >= 0.15  # it waited for the write, and did not fail
    finally:
        release.join()
        other.close()
        db.dispose()


def test_a_postgres_server_that_never_answers_fails_the_connection_in_bounded_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that takes the connection and says nothing (a wedged server, a wrong service) held
    `migrate`, `serve` and `check` without a word: libpq waits without limit unless told."""
    import socket
    import time

    from sqlalchemy import text

    from orchestrator import db as db_module

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    monkeypatch.setattr(db_module, "CONNECT_TIMEOUT_SECONDS", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql+psycopg://nobody@127.0.0.1:{silent.getsockname()[1]}/nothing"
        database = Database(url)
        began = time.monotonic()
        with pytest.raises(OperationalError, match="timeout"), database.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        database.dispose()
    assert time.monotonic() - began < 10


def test_connect_timeouts_the_operator_gives_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    url = "postgresql+psycopg://u@db.internal/orchestrator"
    assert postgres_connect_args(url)["connect_timeout"] == 10
    assert "connect_timeout" not in postgres_connect_args(url + "?connect_timeout=3")
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "30")
    assert "connect_timeout" not in postgres_connect_args(url)


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:////srv/orch/orchestrator.db", "/srv/orch/orchestrator.db"),
    ("sqlite:///file:/srv/orch/orchestrator.db?mode=ro&uri=true", "/srv/orch/orchestrator.db"),
    ("sqlite:///file:/srv/my%20orch/o.db?uri=true", "/srv/my orch/o.db"),
    ("sqlite:///file:/srv/orch/u.db?uri=on&nolock=1", "/srv/orch/u.db"),  # SQLAlchemy reads on and yes as true
    ("sqlite:///file:/srv/orch/u.db?uri=Yes", "/srv/orch/u.db"),
    ("sqlite:///file:mem?mode=memory&uri=true", None),
    ("sqlite:///:memory:", None),
    ("postgresql+psycopg://u@db/orch", None),
])
def test_the_file_an_sqlite_url_names(url: str, path: str | None) -> None:
    from orchestrator.db import sqlite_file

    assert sqlite_file(url) == (None if path is None else Path(path))


def test_a_url_is_shown_without_its_password_wherever_it_is() -> None:
    from orchestrator.db import shown_url

    assert shown_url("postgresql+psycopg://orch:s3cret@db/orch") == "postgresql+psycopg://orch:***@db/orch"
    # A SQLite file: URI as written (it was `sqlite:///file%3A/srv/o.db`), a cipher's passphrase not.
    assert shown_url("sqlite:///file:/srv/o.db?cache=shared&uri=true") == "sqlite:///file:/srv/o.db?cache=shared&uri=true"
    assert "s3cret" not in shown_url("sqlite+pysqlcipher://:s3cret@/o.db")
    shown = shown_url("postgresql+psycopg://orch@db/orch?password=s3cret&sslmode=require")
    assert "s3cret" not in shown and "sslmode=require" in shown


def check_json_columns_take_what_engines_report(db: Database) -> None:
    """A plugin's NaN guidance, an infinite ratio in an error's details, a numpy count: on
    PostgreSQL the job's final write failed on NaN (its images lost, its estimate charged)."""
    import numpy as np

    from orchestrator.models import Job, Project

    db.migrate()
    with db.transaction() as s:
        s.add(Project(id="prj_json", name="p", policy="balanced"))
        s.flush()
        s.add(Job(id="job_json", project_id="prj_json", stage="ideation", engine="lite", status="failed",
                  params={"guidance_scale": float("nan"), "n": np.int64(4), "ratio": np.float32("inf"),
                          "tiled": np.bool_(False), "size": np.array([64, 64]), "where": {"a", "b"} - {"b"}},
                  error={"code": "x", "message": "m", "details": {"ratio": [1.5, float("inf"), -float("inf")]}}))
    with db.session() as s:
        job = s.get(Job, "job_json")
        assert job is not None
        assert job.params == {"guidance_scale": None, "n": 4, "ratio": None, "tiled": False, "size": [64, 64],
                              "where": "{'a'}"}
        assert job.error == {"code": "x", "message": "m", "details": {"ratio": [1.5, None, None]}}


def test_json_columns_take_what_engines_report(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'o.db'}")
    try:
        check_json_columns_take_what_engines_report(db)
    finally:
        db.dispose()


def test_a_write_waiting_out_an_outage_says_what_it_is_now_and_then_not_at_every_try(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A 40 s outage was 80 lines from one worker, each "the database did not answer; trying again".
    db = Database(f"sqlite:///{tmp_path / 'o.db'}")
    lost = OperationalError("UPDATE jobs", {}, Exception("server closed the connection"), connection_invalidated=True)
    tries = 0
    with caplog.at_level(logging.WARNING, logger="orchestrator.db"):
        for attempt in db.retrying(30, "job job_x's end").copy(sleep=lambda _seconds: None):
            with attempt:
                tries += 1
                if tries < 25:
                    raise lost
    db.dispose()
    told = [r.getMessage() for r in caplog.records if r.name == "orchestrator.db"]
    assert tries == 25 and len(told) == 3, told
    assert all("writing job job_x's end" in line for line in told)
    assert "trying again for up to 30 s" in told[0] and "still trying (10 tries in" in told[1]


def test_session_settings_the_operator_gives_win_over_the_service_s(monkeypatch: pytest.MonkeyPatch) -> None:
    # libpq takes the last of an option given twice: the service's came last, so a longer
    # lock_timeout set in the URL was quietly 30 s.
    monkeypatch.delenv("PGOPTIONS", raising=False)
    url = "postgresql+psycopg://u@db.internal/orchestrator"
    ours = str(postgres_connect_args(url)["options"])
    assert "-c lock_timeout=30000" in ours and "-c idle_in_transaction_session_timeout=300000" in ours
    given = str(postgres_connect_args(url + "?options=-c%20lock_timeout%3D90000")["options"])
    assert given.startswith(ours) and given.endswith("-c lock_timeout=90000")


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_a_file_replaced_or_removed_under_the_service_is_refused_not_written_unseen(tmp_path: Path, how: str) -> None:
    # In WAL mode the service wrote on into the unlinked old file: every write after a restore moved
    # a backup into place was lost, and a connection opened since read the new file through the old WAL.
    from sqlalchemy import text

    from orchestrator.db import replaced, transient

    path = tmp_path / "orchestrator.db"
    db = Database(f"sqlite:///{path}")
    try:
        with db.transaction() as s:
            s.execute(text("CREATE TABLE notes (n INTEGER)"))
        backup = tmp_path / "backup.db"
        with sqlite3.connect(backup) as made:
            made.execute("CREATE TABLE notes (n INTEGER)")
        made.close()
        if how == "replaced":
            backup.replace(path)
        else:
            path.unlink()
        there = path.read_bytes() if path.exists() else None
        for _ in range(2):  # every connection, the pooled one and any opened since
            with pytest.raises(OperationalError) as refused, db.transaction() as s:
                s.execute(text("INSERT INTO notes VALUES (1)"))
            assert replaced(refused.value) and transient(refused.value)
            with pytest.raises(OperationalError), db.session() as s:
                s.execute(text("SELECT count(*) FROM notes")).scalar()
        assert (path.read_bytes() if path.exists() else None) == there  # the restored file is left alone
    finally:
        db.dispose()


@pytest.mark.parametrize("argv", [["migrate"], ["serve", "--port", "18604"], ["worker"]])
def test_a_start_waiting_for_a_silent_postgres_server_says_so_and_how_long_without_the_password(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """libpq waits up to its timeout for each address (20 s for `localhost`'s two): `migrate`,
    `serve` and `worker` stayed silent all that time before their one line."""
    import socket

    from orchestrator import db as db_module
    from orchestrator.cli import main

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(db_module, "SLOW_CONNECT_SECONDS", 0.2, raising=False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql+psycopg://studio:hunter2@127.0.0.1:{silent.getsockname()[1]}/orchestrator?connect_timeout=2"
        monkeypatch.setenv("ORCH_DATABASE_URL", url)
        with caplog.at_level(logging.WARNING, logger="orchestrator.db"):
            assert main(argv) == 1
    told = [r.getMessage() for r in caplog.records if r.name == "orchestrator.db"]
    assert told == [f"waiting for the database at {url.replace('hunter2', '***')} to answer (up to 2 s for each "
                    "address its host names before giving up; Ctrl-C stops the wait)"]
    assert "connection timeout expired" in capsys.readouterr().err
    # A server that answers at once is not waited for, and nothing is said.
    caplog.clear()
    with db_module.told_if_slow(url):
        pass
    time.sleep(0.3)
    assert not caplog.records


@pytest.mark.parametrize(("query", "environ", "said"), [("", None, "up to 10 s"), ("?connect_timeout=0", None,
                                                        "without a time limit"),
                                                       ("?connect_timeout=1", None, "up to 2 s"),
                                                       ("", "45", "up to 45 s")])
def test_the_connection_wait_is_told_as_libpq_takes_it(monkeypatch: pytest.MonkeyPatch, query: str,
                                                       environ: str | None, said: str) -> None:
    from orchestrator.db import connect_timeout

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    if environ is not None:
        monkeypatch.setenv("PGCONNECT_TIMEOUT", environ)
    assert connect_timeout(f"postgresql+psycopg://u@db.internal/orchestrator{query}") == said
