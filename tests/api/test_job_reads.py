"""A job as the API shows it is read as of one moment: its status, its assets and its money."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlmodel import col, select

from orchestrator.api.serialize import ASSET_TEXT, JOB_TEXT, PAGE_TEXT_BYTES
from orchestrator.app import create_app
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.ids import new_id
from orchestrator.ledger import Ledger
from orchestrator.models import Asset, Job, JobStatus, Project
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


def test_a_page_of_jobs_or_assets_stops_short_of_megabytes_of_prompts_and_tags(
        make_settings: Callable[..., Settings]) -> None:
    check_pages_stop_short_of_megabytes(make_settings(run_jobs=False))


def check_pages_stop_short_of_megabytes(settings: Settings) -> None:
    """Prompts of 10,000 characters and 64 tags of 600 made each job about 60 KB as listed, and a
    500-job page 30 MB, its rows loaded and its body built whole for each request: 40 connections
    asking for it and reading nothing took the service from 127 MB to 3.2 GB. A page ends sooner,
    its `next_cursor` set, once its items hold 4 MiB of text; following the cursors still lists
    every item once, in order."""
    tags = {f"k{i:02d}" + "x" * 97: "v" * 500 for i in range(64)}
    text = {"prompt": "p" * 10_000, "negative_prompt": "n" * 10_000}
    with TestClient(create_app(settings)) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        project_id = new_id("prj")
        job_ids: list[str] = []
        asset_ids: list[str] = []
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="fat pages", policy="local-only", budget_period="none"))
            # Another project's job, listed first were the project filter lost.
            elsewhere = new_id("prj")
            s.add(Project(id=elsewhere, name="elsewhere", policy="local-only", budget_period="none"))
            s.flush()
            s.add(Job(id=new_id("job"), project_id=elsewhere, stage="ideation", engine="lite", status="canceled"))
            for i in range(100):
                job = Job(id=new_id("job"), project_id=project_id, stage="ideation", engine="lite", status="canceled",
                          params={**text, "n": 1, "seed": i, "width": 64, "height": 64, "tags": tags})
                s.add(job)
                s.flush()
                asset = Asset(id=new_id("ast"), project_id=project_id, job_id=job.id, stage="ideation", engine="lite",
                              model="m", seed=i, width=64, height=64, sha256=f"{i:064x}",
                              record={**text, "tags": tags}, prompt=text["prompt"],
                              negative_prompt=text["negative_prompt"])
                s.add(asset)
                job_ids.append(job.id)
                asset_ids.append(asset.id)
        # The query in `params` alone: httpx puts them in place of one in the path.
        for path, query, expected in (("/v1/jobs", {"project_id": project_id}, job_ids),
                                      (f"/v1/projects/{project_id}/assets", {}, asset_ids)):
            listed: list[str] = []
            cursor: str | None = None
            pages = 0
            while True:
                page = client.get(path, params={**query, "limit": 500, **({"cursor": cursor} if cursor else {})})
                assert page.status_code == 200, page.text
                assert len(page.content) < 5 * 2**20, path  # 4 MiB of text, and the rest of each item
                body = page.json()
                listed += [item["id"] for item in body["items"]]
                pages += 1
                cursor = body["next_cursor"]
                if cursor is None:
                    break
            assert listed == expected and pages > 1, path
        # A page of ordinary items is as long as asked.
        small = client.get("/v1/jobs", params={"project_id": project_id, "limit": 3}).json()
        assert len(small["items"]) == 3 and small["next_cursor"] == job_ids[2]


def test_a_lineage_stops_short_of_megabytes_of_descendants_prompts(make_settings: Callable[..., Settings]) -> None:
    check_a_lineage_stops_short_of_megabytes(make_settings(run_jobs=False))


def check_a_lineage_stops_short_of_megabytes(settings: Settings) -> None:
    """1000 descendants with 10,000-character prompts and 64 tags of 600 made a lineage answer of
    79 MB, its rows loaded whole for each request: 20 connections asking for it and reading nothing
    took the service from 282 MB to 4 GB. The descendants stop once their text passes 4 MiB, and
    `truncated` says the list is not the whole lineage; those listed are its first, breadth first."""
    tags = {f"k{i:02d}" + "x" * 97: "v" * 500 for i in range(64)}
    text = {"prompt": "p" * 10_000, "negative_prompt": "n" * 10_000}
    with TestClient(create_app(settings)) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        project_id = new_id("prj")
        asset_ids: list[str] = []
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="fat lineage", policy="local-only", budget_period="none"))
            s.flush()
            for i in range(150):  # a draft, promoted 149 times
                job = Job(id=new_id("job"), project_id=project_id, stage="bridge" if i else "ideation", engine="lite",
                          status="succeeded", params={**text, "tags": tags})
                s.add(job)
                s.flush()
                asset = Asset(id=new_id("ast"), project_id=project_id, job_id=job.id, stage=job.stage, engine="lite",
                              model="m", seed=i, width=64, height=64, sha256=f"{i:064x}",
                              record={**text, "tags": tags}, parent_id=asset_ids[0] if asset_ids else None,
                              prompt=text["prompt"], negative_prompt=text["negative_prompt"])
                s.add(asset)
                s.flush()
                asset_ids.append(asset.id)
        answer = client.get(f"/v1/assets/{asset_ids[0]}/lineage")
        assert answer.status_code == 200, answer.text
        assert len(answer.content) < 5 * 2**20
        lineage = answer.json()
        listed = [a["id"] for a in lineage["descendants"]]
        assert lineage["truncated"] is True and 0 < len(listed) < 149 and listed == asset_ids[1:len(listed) + 1]
        # A lineage within the bounds is whole, and says so.
        whole = client.get(f"/v1/assets/{asset_ids[5]}/lineage").json()
        assert whole["truncated"] is False and [a["id"] for a in whole["ancestors"]] == asset_ids[:1]


def text_bytes(value: object) -> int:
    """The UTF-8 bytes of the strings in `value`, through dicts (keys too) and lists: what the
    stored bound of a page's items (`JOB_TEXT`, `ASSET_TEXT`) must never be below."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(text_bytes(key) + text_bytes(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return sum(text_bytes(item) for item in value)
    return 0


def test_the_stored_bound_of_an_item_is_never_below_its_text(make_settings: Callable[..., Settings]) -> None:
    check_the_stored_bound_is_never_below_the_text(make_settings(run_jobs=False))


def check_the_stored_bound_is_never_below_the_text(settings: Settings) -> None:
    """A page ends once its items' text passes 4 MiB, the database working out each item's bound
    from its stored columns (walked in Python, the rows' JSON took 7 to 9 ms a page of 500). The
    bound is never below the text, whatever it holds: letters of several bytes, characters JSON
    escapes, empty and absent fields; with one item over 4 MiB among ordinary ones, it gets a page
    of its own, and following the cursors lists every item once, in order, each way and filtered."""
    odd = ["", "é", "中文", "🎨" * 3, 'quote " and \\ back', "line\nfeed\ttab\x01\x1f", "plain"]
    with TestClient(create_app(settings)) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        project_id = new_id("prj")
        jobs: list[tuple[str, str]] = []  # (id, status)
        assets: list[str] = []
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="bounds", policy="local-only", budget_period="none"))
            s.flush()
            for i in range(40):
                text = odd[i % len(odd)] * (1 + i % 5)
                huge = i == 17  # alone over 4 MiB
                prompt = "x" * (PAGE_TEXT_BYTES + 1) if huge else text
                status: JobStatus = "succeeded" if i % 3 else "failed"
                job = Job(id=new_id("job"), project_id=project_id, stage="ideation", engine="lite", status=status,
                          params={"prompt": prompt, "negative_prompt": text[::-1], "n": i, "guidance_scale": i / 7,
                                  "tags": {text or "k": text, "é": [text, None, True, 1.5]}},
                          error={"code": "engine_error", "message": text} if status == "failed" else None,
                          routing=None if i % 4 else {"reason": text, "candidates": [{"engine": "lite"}]},
                          attempts=None if i % 2 else [{"engine": "lite", "status": status, "error": None}])
                s.add(job)
                s.flush()
                asset = Asset(id=new_id("ast"), project_id=project_id, job_id=job.id, stage="ideation", engine="lite",
                              model="m", seed=i, width=64, height=64, sha256=f"{i:064x}", prompt=prompt,
                              # Half with nothing else: no other column's text hides a short count of it.
                              negative_prompt=text if i % 2 else "",
                              record={"prompt": text, "notes": [text] * (i % 3)} if i % 2 else {})
                s.add(asset)
                jobs.append((job.id, status))
                assets.append(asset.id)
        with services.db.session() as s:
            for job, bound in s.exec(select(Job, JOB_TEXT).where(col(Job.project_id) == project_id)):
                walked = text_bytes(job.params) + text_bytes(job.error) + text_bytes(job.routing)
                assert bound >= walked + text_bytes(job.attempts) > 0, job.params["n"]
            for asset, bound in s.exec(select(Asset, ASSET_TEXT).where(col(Asset.project_id) == project_id)):
                assert bound >= text_bytes(asset.prompt) + text_bytes(asset.negative_prompt) + text_bytes(asset.record)
        failed = [job_id for job_id, status in jobs if status == "failed"]
        job_ids = [job_id for job_id, _ in jobs]
        # The query in `params` alone: httpx puts them in place of one in the path.
        for path, query, expected in (("/v1/jobs", {"project_id": project_id}, job_ids),
                                      ("/v1/jobs", {"project_id": project_id, "status": "failed"}, failed),
                                      (f"/v1/projects/{project_id}/assets", {}, assets)):
            for order in ("asc", "desc"):
                pages: list[list[str]] = []
                cursor: str | None = None
                while True:
                    page = client.get(path, params={**query, "limit": 500, "order": order,
                                                    **({"cursor": cursor} if cursor else {})})
                    assert page.status_code == 200, page.text
                    body = page.json()
                    assert body["items"], (path, query, order)
                    pages.append([item["id"] for item in body["items"]])
                    cursor = body["next_cursor"]
                    if cursor is None:
                        break
                    assert cursor == pages[-1][-1]
                listed = [item for items in pages for item in items]
                assert listed == (expected if order == "asc" else expected[::-1]), (path, query, order)
                if expected is not failed:  # the huge item's own page, between two of ordinary ones
                    assert [expected[17]] in pages and len(pages) == 3, (path, order, [len(p) for p in pages])
