"""A periodic duty's repeated failure is told once, reminded of a minute later, and its end told."""

from __future__ import annotations

import logging

import pytest

from orchestrator.outage import REMIND_SECONDS, Outage


def test_a_failure_that_repeats_is_told_once_then_a_line_a_minute_then_its_end(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = Outage(logging.getLogger("tests.outage"), "dispatch", "retrying every 1 s", clock=lambda: now[0])
    error = RuntimeError("database is locked\nSQL: UPDATE jobs ...")
    with caplog.at_level(logging.DEBUG, logger="tests.outage"):
        for second in range(int(REMIND_SECONDS) + 5):  # a try a second for a minute and more
            now[0] = float(second)
            outage.failed(error)
        outage.recovered()
        outage.recovered()  # nothing more to tell
    told = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records if r.levelno > logging.DEBUG]
    assert told == [
        (logging.ERROR, "dispatch failed; retrying every 1 s", True),  # the traceback, once
        (logging.ERROR, "dispatch still failing (61 tries in 60 s): database is locked", False),
        (logging.INFO, "dispatch works again (after 65 failed tries)", False)]
    # A new outage is told whole again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        outage.failed(error)
    assert [r.exc_info is not None for r in caplog.records] == [True]


def test_a_failure_of_another_kind_is_told_whole_and_an_idle_spell_ends_an_outage(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = Outage(logging.getLogger("tests.outage"), "dispatch", "retrying", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        outage.failed(RuntimeError("database is locked"))
        now[0] = 1.0
        outage.failed(KeyError("size"))  # a bug behind the locked database: its traceback too
        now[0] = 2.0
        outage.failed(KeyError("size"))
        outage.reset()  # nothing to try for an hour
        now[0] = 3600.0
        outage.failed(RuntimeError("database is locked"))
    assert [(r.getMessage(), type(r.exc_info[1]).__name__ if r.exc_info else None) for r in caplog.records] == [
        ("dispatch failed; retrying", "RuntimeError"), ("dispatch failed; retrying", "KeyError"),
        ("dispatch failed; retrying", "RuntimeError")]  # a new outage, not "still failing for an hour"


def test_failures_that_alternate_in_kind_are_each_told_whole_once(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(logging.getLogger("tests.outage"), "dispatch", "retrying", clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        for _ in range(50):  # a timeout, then a locked database, and again
            outage.failed(TimeoutError("no answer"))
            outage.failed(RuntimeError("database is locked"))
    assert [type(r.exc_info[1]).__name__ for r in caplog.records if r.exc_info] == ["TimeoutError", "RuntimeError"]


def test_a_database_that_is_away_is_a_warning_s_line_until_it_has_been_away_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    # Cutting a PostgreSQL's connections once wrote a 40-line ERROR traceback from every loop of
    # every process (48 tracebacks for a 30 s outage), for a blip each loop rode out.
    from sqlalchemy.exc import OperationalError

    now = [0.0]
    outage = Outage(logging.getLogger("tests.outage"), "dispatch", "retrying every 1 s", clock=lambda: now[0])
    away = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly\n\tThis probably"),
                            connection_invalidated=True)
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        for second in range(int(REMIND_SECONDS) + 1):
            now[0] = float(second)
            outage.failed(away)
        outage.recovered()
    told = [(r.levelno, r.getMessage().split(";")[0].split(" (")[0], r.exc_info is not None) for r in caplog.records]
    assert told == [(logging.WARNING, "dispatch failed", False),  # one line, no traceback
                    (logging.ERROR, "dispatch still failing", False),  # a minute on: the duty's level
                    (logging.INFO, "dispatch works again", False)]
    assert "server closed the connection unexpectedly" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()


def test_a_real_error_after_a_locked_database_of_the_same_type_is_told_whole(
        caplog: pytest.LogCaptureFixture) -> None:
    # Kinds were told apart by type alone: a missing table after a "database is locked" (both an
    # OperationalError) was a debug line for a minute, then a reminder's first line, never its traceback.
    from sqlalchemy.exc import OperationalError

    outage = Outage(logging.getLogger("tests.outage"), "dispatch", "retrying", clock=lambda: 0.0)
    locked = OperationalError("UPDATE jobs", {}, Exception("database is locked"))
    missing = OperationalError("SELECT jobz", {}, Exception("no such table: jobz"))
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        outage.failed(locked)
        outage.failed(missing)
        outage.failed(missing)
    told = [(r.levelno, r.exc_info is not None) for r in caplog.records]
    assert told == [(logging.WARNING, False), (logging.ERROR, True)]
    assert "no such table" in str(caplog.records[1].exc_info[1])  # type: ignore[index]


def test_a_database_without_its_tables_is_one_line_that_says_what_to_run(caplog: pytest.LogCaptureFixture) -> None:
    # Emptied for a restore under a running service: every loop of every process logged a traceback.
    import sqlite3

    from sqlalchemy.exc import OperationalError

    with sqlite3.connect(":memory:") as db:
        try:
            db.execute("SELECT * FROM jobs")
        except sqlite3.OperationalError as exc:
            missing = OperationalError("SELECT * FROM jobs", {}, exc)
    outage = Outage(logging.getLogger("tests.outage"), "dispatch", "retrying", clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        outage.failed(missing)
    [told] = caplog.records
    assert told.levelno == logging.ERROR and told.exc_info is None
    assert "orchestrator migrate" in told.getMessage() and "no such table: jobs" in told.getMessage()
    # PostgreSQL's, by its SQLSTATE (undefined_table); not a statement's other refusals.
    import psycopg
    from sqlalchemy.exc import ProgrammingError

    from orchestrator.db import tables_missing

    undefined = psycopg.errors.UndefinedTable('relation "jobs" does not exist')
    assert tables_missing(ProgrammingError("SELECT", {}, undefined))
    assert not tables_missing(ProgrammingError("SELECT", {}, psycopg.errors.UndefinedColumn('no column "x"')))
    bug = psycopg.errors.UndefinedTable('missing FROM-clause entry for table "j"')  # 42P01 too: a query's own
    assert not tables_missing(ProgrammingError("SELECT", {}, bug))
