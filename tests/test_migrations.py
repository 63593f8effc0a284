from __future__ import annotations

import fcntl
import logging
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlmodel import SQLModel

import orchestrator.models  # noqa: F401
from orchestrator.db import MigrationRefused, upgrade


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    assert diff == []
    tables = set(inspect(engine).get_table_names())
    assert {"projects", "jobs", "assets", "idempotency_keys", "alembic_version"} <= tables


def test_each_revision_is_told_in_one_line_of_the_log() -> None:
    """Alembic logs a revision's first paragraph as it runs it ("Running upgrade 0008 -> 0009, ..."):
    one wrapped over two lines came out in the log file as `in\\nturns`."""
    wrapped = [script.revision for script in ScriptDirectory(str(files("migrations"))).walk_revisions()
               if "\n" in (script.doc or "") or not script.doc]
    assert wrapped == []


def upgrade_concurrently(url: str, processes: int = 3) -> None:
    """Several processes migrating one empty database at once, as services starting together do:
    every one must succeed (once, one failed with 'table projects already exists')."""
    code = "import sys; from orchestrator.db import upgrade; upgrade(sys.argv[1])"
    running = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE) for _ in range(processes)]
    errors = [p.communicate(timeout=120)[1].decode()[-500:] for p in running]
    assert [p.returncode for p in running] == [0] * processes, errors
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            head = ScriptDirectory(str(files("migrations"))).get_current_head()
            assert MigrationContext.configure(connection).get_current_revision() == head
    finally:
        engine.dispose()


def test_concurrent_migrations_on_sqlite(tmp_path: Path) -> None:
    upgrade_concurrently(f"sqlite:///{tmp_path / 'orchestrator.db'}")


FAILING_REVISION = '''
import os
import signal

import sqlalchemy as sa
from alembic import op

revision = "fails"
down_revision = {head!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
    # On SQLite a rebuild (copy, drop, rename) of a table that others reference.
    with op.batch_alter_table("jobs", recreate="always") as batch_op:
        batch_op.add_column(sa.Column("half_done", sa.Integer(), nullable=True))
    {failure}


def downgrade() -> None:
    pass
'''

# `orchestrator.db.upgrade`, the service's own path (file lock included), on another script directory.
UPGRADE_WITH_SCRIPTS = """
import sys
from orchestrator import db
make_config = db.alembic_config
def alembic_config(url):
    config = make_config(url)
    config.set_main_option("script_location", sys.argv[2])
    return config
db.alembic_config = alembic_config
db.upgrade(sys.argv[1])
"""


@pytest.mark.parametrize("failure", ["raise RuntimeError('half way')", "os.kill(os.getpid(), signal.SIGKILL)"],
                         ids=["raises", "killed"])
@pytest.mark.parametrize("from_empty", [True, False], ids=["from-empty", "from-head"])
def test_a_failed_sqlite_upgrade_leaves_the_database_as_it_was(tmp_path: Path, failure: str, from_empty: bool) -> None:
    """A revision on top of the real head fails after making a table, adding a column and
    rebuilding a table: the database keeps the revision it had, with nothing of the failed one."""
    scripts = tmp_path / "migrations"
    shutil.copytree(str(files("migrations")), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    head = ScriptDirectory(str(scripts)).get_current_head()
    (scripts / "versions" / "9999_fails.py").write_text(FAILING_REVISION.format(head=head, failure=failure))
    url = f"sqlite:///{tmp_path / 'm.db'}"
    if not from_empty:
        upgrade(url)

    run = subprocess.run([sys.executable, "-c", UPGRADE_WITH_SCRIPTS, url, str(scripts)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0, run.stderr[-500:]
    if "raise" in failure:
        assert "RuntimeError: half way" in run.stderr

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            revision = MigrationContext.configure(conn).get_current_revision()
            tables = set(inspect(conn).get_table_names())
            job_columns = {c["name"] for c in inspect(conn).get_columns("jobs")} if "jobs" in tables else set()
    finally:
        engine.dispose()
    if from_empty:  # all pending revisions are one transaction, so the earlier ones went too
        assert (revision, tables) == (None, set())
    else:
        assert revision == head
        assert "half_done" not in tables | job_columns
        assert not any(t.startswith("_alembic_tmp") for t in tables)
    upgrade(url)  # nothing is left half made in the way of the next upgrade


DANGLING = """INSERT INTO projects (id, name, policy, budget_period, created_at)
    VALUES ('prj_1', 'p', 'balanced', 'none', '2026-11-28 00:00:00');
INSERT INTO jobs (id, project_id, stage, engine, status, params, progress_step, progress_total, estimated,
    cache_hit, attempt, created_at)
    VALUES ('job_1', 'prj_1', 'ideation', 'lite', 'succeeded', '{}', 0, 0, 0, 0, 0, '2026-11-28 00:00:00');
INSERT INTO ledger_entries (project_id, job_id, kind, amount, hold_id, unreconciled, over_hold, settled, created_at)
    VALUES ('prj_1', 'job_1', 'capture', 5, 999, 0, 0, 0, '2026-11-28 00:00:00');"""


def dangling_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return len(db.execute("PRAGMA foreign_key_check").fetchall())


def test_a_dangling_reference_the_database_held_before_does_not_block_an_upgrade(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Made with the sqlite3 shell, whose foreign keys are off (a hand fix the refusals invite):
    # every later upgrade failed, blaming itself, with a traceback and exit 1.
    path = tmp_path / "m.db"
    url = f"sqlite:///{path}"
    upgrade(url, "0022")
    with sqlite3.connect(path) as db:
        db.executescript(DANGLING)
    with caplog.at_level(logging.WARNING, logger="orchestrator.migrations"):
        assert upgrade(url) == "0022"
    assert "ledger_entries -> ledger_entries: 1), from before this migration" in caplog.text
    assert dangling_rows(path) == 1
    assert upgrade(url) == ScriptDirectory(str(files("migrations"))).get_current_head()


def test_a_migration_that_would_leave_a_dangling_reference_is_refused_whole(tmp_path: Path) -> None:
    scripts = tmp_path / "migrations"
    shutil.copytree(str(files("migrations")), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    head = ScriptDirectory(str(scripts)).get_current_head()
    dangles = f"""
    for statement in {DANGLING!r}.split(";"):
        op.execute(statement)"""
    (scripts / "versions" / "9999_fails.py").write_text(FAILING_REVISION.format(head=head, failure=dangles))
    path = tmp_path / "m.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    run = subprocess.run([sys.executable, "-c", UPGRADE_WITH_SCRIPTS, url, str(scripts)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert ("MigrationRefused: the migration would leave rows whose references name no row "
            "(ledger_entries -> ledger_entries: 1); nothing was changed") in run.stderr, run.stderr[-800:]
    assert dangling_rows(path) == 0
    assert upgrade(url) == head


def test_an_upgrade_says_what_it_found_and_waits_for_another_in_a_word(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A holder that stopped (Ctrl-Z on `orchestrator migrate`) left every start waiting silently; and
    # `migrate` said "migrated from" the revision it read before another process's upgrade.
    from alembic import command

    from orchestrator.db import alembic_config

    path = tmp_path / "m.db"
    url = f"sqlite:///{path}"
    head = ScriptDirectory(str(files("migrations"))).get_current_head()
    pool = ThreadPoolExecutor(1)
    with open(f"{path}.migrate-lock", "a") as held:  # another process's migration
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            with caplog.at_level(logging.WARNING, logger="orchestrator.db"):
                waiting = pool.submit(upgrade, url)
                deadline = time.monotonic() + 30
                while "waiting for another process's migration" not in caplog.text and time.monotonic() < deadline:
                    time.sleep(0.02)
            assert "m.db.migrate-lock" in caplog.text and not waiting.done()
            command.upgrade(alembic_config(url), "0001")  # what the other process did while it held the lock
        finally:  # never left waiting, whatever failed
            fcntl.flock(held, fcntl.LOCK_UN)
            pool.shutdown(wait=True)
    assert waiting.result() == "0001"  # as found once the lock was its own
    assert upgrade(url) == head


def test_0003_keeps_the_keys_of_jobs_and_its_downgrade_drops_only_the_others(tmp_path: Path) -> None:
    """Idempotency keys of jobs made before 0003 survive its table rebuild; going back to 0002
    drops the keys of projects and grants (they have no job) and keeps those of jobs."""
    from alembic import command
    from sqlalchemy import text

    from orchestrator.db import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0002")
    engine = create_engine(url)
    now = "2026-11-28 12:00:00.000000"
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, policy, budget_period, created_at) "
                              "VALUES ('prj_1', 'p', 'balanced', 'none', :now)"), {"now": now})
            conn.execute(text("INSERT INTO jobs (id, project_id, stage, engine, model, status, params, attempt, "
                              "attempts, progress_step, progress_total, estimated, routing, cache_hit, "
                              "created_at) VALUES ('job_1', 'prj_1', 'ideation', 'lite', 'm', 'queued', '{}', 0, "
                              "'[]', 0, 0, 0, '{}', 0, :now)"), {"now": now})
            conn.execute(text("INSERT INTO idempotency_keys (key, scope, request_hash, job_id, created_at) "
                              "VALUES ('k', '/v1/projects/prj_1/drafts', 'h', 'job_1', :now)"), {"now": now})
        upgrade(url)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT key, job_id, project_id FROM idempotency_keys")).all() == [
                ("k", "job_1", None)]
            conn.execute(text("INSERT INTO idempotency_keys (key, scope, request_hash, project_id, created_at) "
                              "VALUES ('k', '/v1/projects', 'h', 'prj_1', :now)"), {"now": now})
        command.downgrade(alembic_config(url), "0002")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT key, scope, job_id FROM idempotency_keys")).all() == [
                ("k", "/v1/projects/prj_1/drafts", "job_1")]
            assert "project_id" not in {c["name"] for c in inspect(conn).get_columns("idempotency_keys")}
    finally:
        engine.dispose()


def test_0014_downgrade_is_refused_while_deleted_assets_exist(tmp_path: Path) -> None:
    """Before 0014 a deleted asset would read as a live one whose file is gone."""
    from alembic import command
    from sqlalchemy import text
    from sqlmodel import Session

    from orchestrator.db import alembic_config
    from orchestrator.models import Asset, Job, Project

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        with Session(engine) as s:
            s.add(Project(id="prj_1", name="p", policy="balanced"))
            s.flush()
            s.add(Job(id="job_1", project_id="prj_1", stage="ideation", engine="lite", status="succeeded"))
            s.flush()
            s.add(Asset(id="ast_1", project_id="prj_1", job_id="job_1", index=0, stage="ideation", engine="lite",
                        model="m", prompt="x", width=64, height=64, sha256="0" * 64, deleted_at=datetime.now(UTC)))
            s.commit()
        with pytest.raises(MigrationRefused, match=r"1 asset.*deleted.*refused"):
            command.downgrade(alembic_config(url), "0013")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT deleted_at IS NOT NULL FROM assets")).scalar() == 1
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM assets"))
        command.downgrade(alembic_config(url), "0013")
        with engine.connect() as conn:
            assert "deleted_at" not in {c["name"] for c in inspect(conn).get_columns("assets")}
    finally:
        engine.dispose()


def test_0021_downgrade_is_refused_while_archived_projects_exist(tmp_path: Path) -> None:
    """Before 0021 an archived project would take new jobs, and spend, again."""
    from alembic import command
    from sqlalchemy import text
    from sqlmodel import Session

    from orchestrator.db import alembic_config
    from orchestrator.models import Project

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        with Session(engine) as s:
            s.add(Project(id="prj_1", name="p", policy="balanced", archived_at=datetime.now(UTC)))
            s.commit()
        with pytest.raises(MigrationRefused, match=r"1 project.*archived.*refused"):
            command.downgrade(alembic_config(url), "0020")
        with engine.begin() as conn:
            conn.execute(text("UPDATE projects SET archived_at = NULL"))
        command.downgrade(alembic_config(url), "0020")
        with engine.connect() as conn:
            assert "archived_at" not in {c["name"] for c in inspect(conn).get_columns("projects")}
            assert conn.execute(text("SELECT count(*) FROM projects")).scalar() == 1
    finally:
        engine.dispose()


def test_0014_downgrade_writes_its_sql_offline() -> None:
    """`alembic downgrade --sql` has no database to count deleted assets in (it once failed there)."""
    import io

    from alembic import command

    from orchestrator.db import alembic_config

    config = alembic_config("postgresql+psycopg://nobody@127.0.0.1:1/none")  # never connected to
    config.output_buffer = io.StringIO()
    command.downgrade(config, "0014:0013", sql=True)
    assert "DROP COLUMN deleted_at" in config.output_buffer.getvalue()


def check_holds_marked_settled_by_0010(url: str) -> None:
    """0010 marks every hold a capture or release names as settled, and no other: open holds are
    found by that flag from then on, so the upgrade must not leave one held forever or free one."""
    from sqlalchemy import text
    from sqlmodel import Session

    from orchestrator.ledger import Ledger
    from orchestrator.models import Project

    upgrade(url, "0009")
    engine = create_engine(url)
    now = "2026-11-28 12:00:00.000000"
    entries = [  # (id, kind, amount, hold_id): a captured hold, a released one, an open one
        (1, "hold", 5000, None), (2, "capture", 4000, 1), (3, "release", 1000, 1), (4, "adjustment", 500, 1),
        (5, "hold", 7000, None), (6, "release", 7000, 5),
        (7, "hold", 9000, None), (8, "grant", 100000, None),
    ]
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, policy, budget_limit, budget_period, created_at) "
                              "VALUES ('prj_1', 'p', 'balanced', 1000000, 'none', :now)"), {"now": now})
            for entry_id, kind, amount, hold_id in entries:
                conn.execute(text("INSERT INTO ledger_entries (id, project_id, kind, amount, hold_id, unreconciled, "
                                  "over_hold, created_at) VALUES (:id, 'prj_1', :kind, :amount, :hold_id, false, "
                                  "false, :now)"),
                             {"id": entry_id, "kind": kind, "amount": amount, "hold_id": hold_id, "now": now})
        upgrade(url)
        with engine.connect() as conn:
            settled: dict[int, Any] = dict(
                conn.execute(text("SELECT id, settled FROM ledger_entries WHERE kind = 'hold'")).all())
        assert {k: bool(v) for k, v in settled.items()} == {1: True, 5: True, 7: False}
        with Session(engine) as s:
            project = s.get(Project, "prj_1")
            assert project is not None
            assert Ledger().balance(s, project).held == 9000
    finally:
        engine.dispose()


def test_0010_marks_settled_holds_on_sqlite(tmp_path: Path) -> None:
    check_holds_marked_settled_by_0010(f"sqlite:///{tmp_path / 'm.db'}")


def test_0013_mends_the_indexes_of_the_first_0009_and_0010(tmp_path: Path) -> None:
    # Those two revisions were edited after they landed: a database migrated by their first
    # versions kept `ix_assets_stage` and lacked the later indexes (and its downgrade failed).
    url = f"sqlite:///{tmp_path / 'first.db'}"
    upgrade(url, "0012")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_jobs_status_project_created")
        conn.exec_driver_sql("DROP INDEX ix_assets_stage_size")
        conn.exec_driver_sql("CREATE INDEX ix_assets_stage ON assets (stage)")
    upgrade(url)
    names = {i["name"] for table in ("jobs", "assets") for i in inspect(engine).get_indexes(table)}
    assert {"ix_jobs_status_project_created", "ix_assets_stage_size"} <= names and "ix_assets_stage" not in names
    upgrade(url)  # and on a database that had them all along, nothing
    engine.dispose()


def _project_and_job(engine: Any) -> None:
    """A project and a job in a schema of before the head (rows of their own: the model's columns
    of later revisions are not there yet)."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO projects (id, name, policy, budget_period, created_at) "
                          "VALUES ('prj_1', 'p', 'balanced', 'none', '2026-11-28 00:00:00')"))
        conn.execute(text("INSERT INTO jobs (id, project_id, stage, engine, status, params, progress_step, "
                          "progress_total, estimated, cache_hit, attempt, created_at) VALUES ('job_1', 'prj_1', "
                          "'ideation', 'lite', 'succeeded', '{}', 0, 0, 0, false, 0, '2026-11-28 00:00:00')"))


def _capture(conn: Any, hold_id: int | None = None) -> None:
    from sqlalchemy import text

    conn.execute(text("INSERT INTO ledger_entries (project_id, job_id, kind, amount, hold_id, unreconciled, settled, "
                      "over_hold, created_at) VALUES ('prj_1', 'job_1', 'capture', 5, :hold, false, false, false, "
                      "'2026-11-30 12:00:00')"), {"hold": hold_id})


def test_a_job_has_one_capture_without_a_hold(tmp_path: Path) -> None:
    """NULL hold ids never collide in `(hold_id, kind)`: metered local work charged twice was
    stopped by nothing in the database."""
    from sqlalchemy.exc import IntegrityError

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        _project_and_job(engine)
        with engine.begin() as conn:
            _capture(conn)
        with pytest.raises(IntegrityError), engine.begin() as conn:
            _capture(conn)
        with engine.begin() as conn:  # a hold-less charge and captures of holds stay apart
            conn.execute(text("INSERT INTO ledger_entries (project_id, job_id, kind, amount, unreconciled, settled, "
                              "over_hold, created_at) VALUES ('prj_1', 'job_1', 'hold', 5, false, true, false, "
                              "'2026-11-30 12:00:00')"))
            _capture(conn, hold_id=conn.execute(text("SELECT max(id) FROM ledger_entries")).scalar())
            assert conn.execute(text("SELECT count(*) FROM ledger_entries WHERE kind = 'capture'")).scalar() == 2
    finally:
        engine.dispose()


def test_0015_names_jobs_already_charged_twice_and_changes_nothing(tmp_path: Path) -> None:
    from alembic import command

    from orchestrator.db import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    command.upgrade(alembic_config(url), "0014")
    engine = create_engine(url)
    try:
        _project_and_job(engine)
        with engine.begin() as conn:
            _capture(conn)
            _capture(conn)
        # The newest is kept: deleting it, SQLite gave its id to the next entry (see 0017).
        with pytest.raises(MigrationRefused, match=r"charged more than once without a hold: job_1 \(keep entry 2\)"):
            command.upgrade(alembic_config(url), "head")
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == "0014"
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM ledger_entries WHERE id = 1"))
        command.upgrade(alembic_config(url), "head")
        with engine.connect() as conn:
            assert "uq_ledger_holdless_capture" in {i["name"] for i in inspect(conn).get_indexes("ledger_entries")}
    finally:
        engine.dispose()


def test_a_ledger_entry_id_is_never_given_again(tmp_path: Path) -> None:
    """SQLite gave the next entry the largest id plus one: with the newest deleted by hand, its id
    went to the next entry, which a client paging the ledger from that id never saw. 0017 rebuilds
    a ledger that has entries already, keeping them."""
    from alembic import command

    from orchestrator.db import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    command.upgrade(alembic_config(url), "0016")
    engine = create_engine(url)
    try:
        _project_and_job(engine)
        with engine.begin() as conn:
            _capture(conn)
        upgrade(url)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT id, kind, amount FROM ledger_entries")).all() == [(1, "capture", 5)]
            conn.execute(text("INSERT INTO ledger_entries (project_id, kind, amount, unreconciled, settled, "
                              "over_hold, created_at) VALUES ('prj_1', 'grant', 5, false, false, false, "
                              "'2026-11-30 12:00:00')"))
            conn.execute(text("DELETE FROM ledger_entries WHERE id = 2"))
            conn.execute(text("INSERT INTO ledger_entries (project_id, kind, amount, unreconciled, settled, "
                              "over_hold, created_at) VALUES ('prj_1', 'grant', 7, false, false, false, "
                              "'2026-11-30 12:00:01')"))
            assert conn.execute(text("SELECT id FROM ledger_entries WHERE amount = 7")).scalar() == 3
    finally:
        engine.dispose()


def test_downgrades_that_would_drop_what_is_in_use_are_refused_one_by_one(tmp_path: Path) -> None:
    check_downgrades_refused_one_by_one(f"sqlite:///{tmp_path / 'm.db'}")


def check_downgrades_refused_one_by_one(url: str) -> None:
    """0013's would leave keys stored as sent where the releases before look them up misread (and
    the upgrade back rewrites them), 0012's and 0003's drop keys a retry could still replay, 0006's
    a cancel asked of a running job, 0005's forget work a provider still has (its hold released,
    the work billed), 0004's drop keys in use, 0002's the ledger, 0001's every project; each says
    what to do first, and changes nothing."""
    from alembic import command
    from sqlmodel import Session

    from orchestrator.clock import utcnow
    from orchestrator.db import alembic_config
    from orchestrator.models import IdempotencyKey, Job

    upgrade(url)
    engine = create_engine(url)
    try:
        _project_and_job(engine)
        with Session(engine) as s:  # queued, with no work at a provider: in no downgrade's way
            s.add(Job(id="job_2", project_id="prj_1", stage="ideation", engine="lite", status="queued"))
            s.commit()
        with engine.begin() as conn:
            stored = conn.execute(text("SELECT CAST(provider_work AS TEXT) FROM jobs WHERE id = 'job_2'")).scalar()
            assert stored == "null"  # a JSON null, which IS NOT NULL counts
            conn.execute(text("UPDATE jobs SET status = 'running', provider_work = :work WHERE id = 'job_1'"),
                         {"work": '{"handles": [{"id": "p1"}]}'})
            conn.execute(text("INSERT INTO api_keys (id, project_id, name, prefix, secret_sha256, created_at) "
                              "VALUES ('key_1', 'prj_1', 'ci', 'ok_1', :sha, '2026-11-30 12:00:00')"),
                         {"sha": "0" * 64})
            _capture(conn)
            conn.execute(text("UPDATE jobs SET status = 'queued', cancel_requested_at = created_at WHERE id = 'job_2'"))
        with Session(engine) as s:  # retried within 48 h, each replays what the first made
            made: list[tuple[str, dict[str, Any]]] = [("cl\u00e9", {"job_id": "job_1"}),
                                                      ("key", {"api_key_id": "key_1"}),
                                                      ("grant", {"project_id": "prj_1"})]
            for key, what in made:
                s.add(IdempotencyKey(key=key, scope="/v1/x", request_hash="h", created_at=utcnow(), **what))
            s.add(IdempotencyKey(key="\u00e9-old", scope="/v1/x", request_hash="h", project_id="prj_1",
                                 created_at=utcnow() - timedelta(hours=49)))  # replays nothing any more
            # Older, but its job is still queued: the service replays it as long (a backlog's retry).
            s.add(IdempotencyKey(key="\u00e9-queued", scope="/v1/x", request_hash="h", job_id="job_2",
                                 created_at=utcnow() - timedelta(hours=49)))
            s.commit()
        head = _revision(engine)
        for refusal, mend in [
            (r"2 Idempotency-Key\(s\) with non-ASCII.*wait until",
             "DELETE FROM idempotency_keys WHERE key IN ('cl\u00e9', '\u00e9-queued')"),
            (r"1 request\(s\) made with a project key within the last 48 h",
             "DELETE FROM idempotency_keys WHERE key = 'key'"),
            (r"1 unfinished job\(s\) have a cancel asked", "UPDATE jobs SET status = 'canceled' WHERE id = 'job_2'"),
            (r"1 unfinished job\(s\) have work at a provider", "UPDATE jobs SET status = 'failed' WHERE id = 'job_1'"),
            (r"1 project key\(s\) are in use.*revoke them first", "UPDATE api_keys SET revoked_at = created_at"),
            (r"1 project creation\(s\) or grant\(s\) within the last 48 h",
             "DELETE FROM idempotency_keys WHERE key = 'grant'"),
            (r"1 ledger entry\(ies\).*export them", "DELETE FROM ledger_entries"),
            (r"1 project\(s\), with their jobs and assets",
             "DELETE FROM idempotency_keys; DELETE FROM api_keys; DELETE FROM jobs; DELETE FROM projects"),
        ]:
            with pytest.raises(MigrationRefused, match=refusal):
                command.downgrade(alembic_config(url), "base")
            assert _revision(engine) == head  # the whole downgrade rolled back
            with engine.begin() as conn:
                for statement in mend.split("; "):
                    conn.execute(text(statement))
        command.downgrade(alembic_config(url), "base")
        assert _revision(engine) is None
    finally:
        engine.dispose()


def _revision(engine: Any) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_0019_stores_keys_misread_as_latin_1_as_they_were_sent(tmp_path: Path) -> None:
    """Releases before 0019 kept `clé` as `clÃ©`, and looked keys up in that form too, for good:
    `é` then found the request of a client that had sent `Ã©`."""
    check_0019(f"sqlite:///{tmp_path / 'm.db'}")


def check_0019(url: str) -> None:
    """0019 on the empty database at `url` (tests/credits/test_postgres.py runs it on PostgreSQL)."""
    from sqlmodel import Session

    from orchestrator.models import IdempotencyKey

    upgrade(url, "0018")
    engine = create_engine(url)
    stored = {"cl\u00c3\u00a9": "misread", "\u00c3\u00a9": "sent so since", "\u00e9": "the other",
              "\u00c3": "no UTF-8 in it", "\u4e2d": "past latin-1", "plain": "ASCII"}
    before = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)  # by a release that misread keys
    try:
        _project_and_job(engine)
        with Session(engine) as s:
            for key in stored:
                s.add(IdempotencyKey(key=key, scope="/v1/projects", request_hash=stored[key], project_id="prj_1",
                                     created_at=before))
            s.add(IdempotencyKey(key="cl\u00c3\u00a9", scope="/v1/other", request_hash="misread too",
                                 project_id="prj_1", created_at=before))
            # Stored by a release that kept keys as sent: `Ã©` is what its client sent.
            s.add(IdempotencyKey(key="\u00c3\u00a9-since", scope="/v1/projects", request_hash="as sent",
                                 project_id="prj_1", created_at=datetime(2026, 11, 30, 6, 0, tzinfo=UTC)))
            s.commit()
        upgrade(url)
        with engine.connect() as conn:
            rows = {(key, scope): h for key, scope, h in
                    conn.execute(text("SELECT key, scope, request_hash FROM idempotency_keys")).all()}
    finally:
        engine.dispose()
    assert rows == {("cl\u00e9", "/v1/projects"): "misread", ("cl\u00e9", "/v1/other"): "misread too",
                    # Where both forms are stored, the sent one is a client's own since: both stay.
                    ("\u00c3\u00a9", "/v1/projects"): "sent so since", ("\u00e9", "/v1/projects"): "the other",
                    ("\u00c3", "/v1/projects"): "no UTF-8 in it", ("\u4e2d", "/v1/projects"): "past latin-1",
                    ("plain", "/v1/projects"): "ASCII", ("\u00c3\u00a9-since", "/v1/projects"): "as sent"}


def test_0019_from_a_database_only_misreading_releases_served_rewrites_keys_of_any_date(tmp_path: Path) -> None:
    """Keys were told misread by their date: a studio that kept a release of 0012 running past the
    fix's date had its later keys left misread, and a retry sent as `cl\u00e9` made a second job."""
    check_0019_from_0012(f"sqlite:///{tmp_path / 'm.db'}")


def check_0019_from_0012(url: str) -> None:
    """0019 on a database at 0012 (tests/credits/test_postgres.py runs it on PostgreSQL)."""
    import sqlalchemy as sa

    from orchestrator.models import UTCDateTime

    upgrade(url, "0012")
    keys = sa.table("idempotency_keys", sa.column("key", sa.String), sa.column("scope", sa.String),
                    sa.column("request_hash", sa.String), sa.column("created_at", UTCDateTime))
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for key, when in [("cl\u00c3\u00a9", datetime(2026, 11, 29, tzinfo=UTC)),
                              ("cl\u00c3\u00a9-later", datetime(2026, 12, 1, tzinfo=UTC)),  # by that release still
                              ("\u00c3\u00a9", datetime(2026, 12, 1, tzinfo=UTC)),
                              ("\u00e9", datetime(2026, 12, 1, tzinfo=UTC))]:
                conn.execute(keys.insert().values(key=key, scope="/v1/projects", request_hash=key, created_at=when))
        upgrade(url)
        with engine.connect() as conn:
            rows: dict[str, str] = dict(conn.execute(text("SELECT key, request_hash FROM idempotency_keys")).all())
    finally:
        engine.dispose()
    assert rows == {"cl\u00e9": "cl\u00c3\u00a9", "cl\u00e9-later": "cl\u00c3\u00a9-later",
                    # Both forms stored: the rewrite would make one key of two requests; both stay.
                    "\u00c3\u00a9": "\u00c3\u00a9", "\u00e9": "\u00e9"}


def test_the_migration_lock_is_never_opened_through_a_link(tmp_path: Path) -> None:
    """The data dir may be shared with other users of its group: a link named as the lock had
    the migration create (as root, anywhere) the file it named."""
    victim = tmp_path / "elsewhere" / "made-by-the-migration"
    victim.parent.mkdir()
    url = f"sqlite:///{tmp_path / 'm.db'}"
    (tmp_path / "m.db.migrate-lock").symlink_to(victim)
    with pytest.raises(OSError):
        upgrade(url)
    assert not victim.exists()


def test_0040_downgrade_is_refused_while_a_running_job_lists_images_to_adopt(tmp_path: Path) -> None:
    """Dropped, the column took with it the images a dead paid job's row said it stored: the release
    before failed the job `interrupted`, captured its estimate as possibly billed, and swept its
    files, made and paid for. A value that lists none (the runner's cleared JSON null, a garbled one)
    is in no downgrade's way."""
    from alembic import command

    from orchestrator.db import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        _project_and_job(engine)
        stored = '{"attempt": 1, "images": [{"sha256": "' + "0" * 64 + '"}]}'
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET status = 'running', stored_images = :stored"), {"stored": stored})
        head = _revision(engine)
        with pytest.raises(MigrationRefused, match=r"1 running job\(s\) list images"):
            command.downgrade(alembic_config(url), "0039")
        assert _revision(engine) == head
        for cleared in ("null", '[1, 2]', '{"images": 5}'):
            with engine.begin() as conn:
                conn.execute(text("UPDATE jobs SET stored_images = :stored"), {"stored": cleared})
            command.downgrade(alembic_config(url), "0039")
            assert _revision(engine) == "0039"
            command.upgrade(alembic_config(url), "head")
    finally:
        engine.dispose()
