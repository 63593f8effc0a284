"""A job as the API shows it is read as of one moment: its status, its assets and its money."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event

from orchestrator.app import create_app
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.ids import new_id
from orchestrator.ledger import Ledger
from orchestrator.models import Job, Project
from orchestrator.settings import Settings

HELD = 10_000  # millicredits: 10 credits


def held_job(db: Database, ledger: Ledger, policy: str) -> tuple[str, str]:
    """A project with a budget and a running job holding 10 credits of it."""
    project_id, job_id = new_id("prj"), new_id("job")
    with db.transaction() as s:
        project = Project(id=project_id, name="dashboard", policy=policy, budget_limit=100_000, budget_period="none")
        s.add(project)
        s.flush()
        job = Job(id=job_id, project_id=project_id, stage="bridge", engine="fake-paid", model="m", status="running",
                  params={}, estimated=HELD)
        s.add(job)
        s.flush()
        ledger.hold(s, project, job, HELD)
    return project_id, job_id


def _finish(db: Database, ledger: Ledger, job_id: str) -> None:
    """What a worker's end of the job writes: its status and its charge, in one transaction."""
    with db.transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.finished_at = "succeeded", utcnow()
        s.add(job)
        ledger.capture(s, job, None)


def check_a_job_is_read_as_of_one_moment(settings: Settings) -> None:
    """The job ends, on another connection, right after the API has read its row: the answer is
    the job as it was (running, 10 held) or as it is (succeeded, 10 charged), never a mix. Read
    in three reads, it showed a running job that had already been charged, and with no hold: a
    dashboard adding up what is held and what is charged lost its 10 credits for that moment."""
    app = create_app(settings.model_copy(update={"run_jobs": False}))
    with TestClient(app) as client:
        services = app.state.services
        for path in ("/v1/jobs/{job}", "/v1/jobs?project_id={project}"):
            project_id, job_id = held_job(services.db, services.ledger, settings.policy)
            finished: list[bool] = []

            def finish_after_the_job_is_read(conn: Any, cursor: Any, statement: str, *args: Any,
                                             job_id: str = job_id, finished: list[bool] = finished) -> None:
                said = statement.lower()
                if finished or not said.lstrip().startswith("select") or "from jobs" not in said:
                    return
                finished.append(True)
                _finish(services.db, services.ledger, job_id)

            event.listen(services.db.engine, "after_cursor_execute", finish_after_the_job_is_read)
            try:
                answer = client.get(path.format(job=job_id, project=project_id))
            finally:
                event.remove(services.db.engine, "after_cursor_execute", finish_after_the_job_is_read)
            assert finished, path
            assert answer.status_code == 200, answer.text
            body = answer.json()
            view = body["items"][0] if "items" in body else body
            assert view["id"] == job_id
            seen = (view["status"], view["cost"]["held"], view["cost"]["charged"])
            assert seen in {("running", 10.0, 0.0), ("succeeded", 0.0, 10.0)}, (path, seen)
            # And once it is over, as it is now.
            now = client.get(f"/v1/jobs/{job_id}").json()
            assert (now["status"], now["cost"]["held"], now["cost"]["charged"]) == ("succeeded", 0.0, 10.0)


def test_a_job_is_read_as_of_one_moment(make_settings: Callable[..., Settings]) -> None:
    check_a_job_is_read_as_of_one_moment(make_settings())
