"""A page of a list reads its rows from an index in the page's order, and the credits shown with
each listed job from the ledger's index on the job: never a sort of a project's whole history, nor a
walk of every capture (SQLite's plans; tens of milliseconds per page at 200,000 jobs, see
bench/history.py)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import event, insert
from sqlalchemy.engine import Engine

from orchestrator.db import Database
from orchestrator.ids import new_id
from orchestrator.models import Asset, Job
from tests.api import create_project
from tests.conftest import SettingsFactory

PAGE = 50


@contextlib.contextmanager
def statements() -> Iterator[list[tuple[str, Any]]]:
    """The SELECTs this thread's requests make the database run, with their parameters."""
    seen: list[tuple[str, Any]] = []
    # The service answers a sync route on a worker thread; the test's own thread only waits on it.
    here = threading.get_ident()

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if threading.get_ident() != here and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", before)


def plan(path: str, statement: str, parameters: Any) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return "\n".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))


def fill(path: str, project_id: str, jobs: int) -> None:
    """Finished drafts, one asset each, as many as a page and more (the plan for the credits of a
    whole page differs from that for a few jobs)."""
    db = Database(f"sqlite:///{path}")
    now = datetime.now(UTC)
    ids = [new_id("job") for _ in range(jobs)]
    try:
        with db.transaction() as s:
            s.execute(insert(Job), [{"id": job_id, "project_id": project_id, "stage": "ideation", "engine": "lite",
                                     "model": "m", "status": "succeeded", "params": {}, "created_at": now}
                                    for job_id in ids])
            s.execute(insert(Asset), [{"id": new_id("ast"), "project_id": project_id, "job_id": job_id,
                                       "stage": "ideation", "engine": "lite", "model": "m", "prompt": "p",
                                       "width": 64, "height": 64, "sha256": f"{i:064x}", "record": {},
                                       "created_at": now} for i, job_id in enumerate(ids)])
    finally:
        db.dispose()


def test_list_pages_and_their_credits_are_read_through_indexes(make_settings: SettingsFactory,
                                                                 start_server: Any) -> None:
    settings = make_settings()
    server: httpx.Client = start_server(settings)
    path = str(settings.data_dir / "orchestrator.db")
    project = create_project(server)["id"]
    fill(path, project, PAGE + 10)

    pages = [f"/v1/jobs?project_id={project}", f"/v1/jobs?project_id={project}&order=desc",
             f"/v1/jobs?project_id={project}&status=succeeded&order=desc",
             f"/v1/projects/{project}/assets", f"/v1/projects/{project}/assets?order=desc"]
    for url in pages:
        with statements() as seen:
            response = server.get(url)
        assert response.status_code == 200, response.text
        assert len(response.json()["items"]) == PAGE
        listed = [(sql, params) for sql, params in seen if " ORDER BY jobs.id" in sql or " ORDER BY assets.id" in sql]
        assert listed, (url, seen)
        for sql, params in listed:
            assert "TEMP B-TREE FOR ORDER BY" not in plan(path, sql, params), (url, sql)
        if url.startswith("/v1/jobs"):
            sums = [(sql, params) for sql, params in seen if "GROUP BY ledger_entries.job_id" in sql]
            assert len(sums) == 1, (url, seen)  # held and charged, by engine
            for sql, params in sums:
                assert "COVERING INDEX ix_ledger_entries_job_id (job_id=?)" in plan(path, sql, params), sql
