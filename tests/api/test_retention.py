"""Draft retention (ORCH_DRAFT_RETENTION_DAYS): the asset sweep deletes drafts older than that
which nothing descends from, of finished jobs, as `DELETE /v1/assets/{id}` deletes one, a short
write transaction per batch; unset, every draft is kept."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pytest
from pydantic import ValidationError
from sqlalchemy import update
from sqlmodel import Session, col, select
from starlette.testclient import TestClient

from orchestrator import retention
from orchestrator.app import create_app
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.ids import new_id
from orchestrator.models import Asset, Job, Project
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore, RecentContent
from tests.api import create_project, run_draft, wait_for_job

SettingsFactory = Callable[..., Settings]
DAYS = 30


@contextmanager
def built(settings: Settings) -> Iterator[Services]:
    """Another process's services on the same database and data dir, not started."""
    services = Services.build(settings)
    try:
        yield services
    finally:
        asyncio.run(services.aclose())


def age(db: Database, asset_ids: Collection[str], days: float) -> None:
    with db.transaction() as s:
        s.execute(update(Asset).where(col(Asset.id).in_(asset_ids)).values(created_at=utcnow() - timedelta(days=days)))


def set_status(db: Database, job_id: str, status: str, source_asset_id: str | None = None) -> None:
    with db.transaction() as s:
        values: dict[str, Any] = {"status": status}
        if source_asset_id is not None:
            values["source_asset_id"] = source_asset_id
        s.execute(update(Job).where(col(Job.id) == job_id).values(**values))


def status_of(client: TestClient, asset_id: str) -> int:
    return client.get(f"/v1/assets/{asset_id}").status_code


def check_draft_retention(make_settings: SettingsFactory, **database: Any) -> None:
    off = make_settings(**database)
    on = make_settings(draft_retention_days=DAYS, **database)
    assert off.draft_retention_days is None
    seeds = iter(range(100, 1000, 10))  # a draft of n=2 is seeds s and s + 1: never the same image twice

    with TestClient(create_app(off)) as client:
        project = create_project(client)["id"]

        def draft(n: int = 1) -> dict[str, Any]:
            return run_draft(client, project, n=n, seed=next(seeds))  # type: ignore[arg-type]

        def promote(asset_id: str) -> dict[str, Any]:
            job = client.post(f"/v1/assets/{asset_id}/promote", json={"engine": "local-hifi"}).json()
            return wait_for_job(client, job["id"], ("succeeded",))  # type: ignore[arg-type]

        old = draft(n=2)  # deleted: old, nothing descends from it
        promoted = draft()["assets"][0]
        bridge = promote(promoted)
        deleted_child_of = draft()["assets"][0]  # its promotion deleted: still a descendant
        child = promote(deleted_child_of)
        assert client.delete(f"/v1/assets/{child['assets'][0]}").status_code == 204
        recent = draft()["assets"][0]
        running = draft()  # its job made unfinished below
        source = draft()["assets"][0]  # an unfinished job starts from it (below)
        starts_from_it = draft()  # that job (its own drafts are then an unfinished job's)
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        shas = {asset_id: client.get(f"/v1/assets/{asset_id}").json()["sha256"]
                for asset_id in [*old["assets"], promoted, recent]}
    store = ArtifactStore(off.assets_dir)
    db = Database(off.resolved_database_url)
    try:
        kept_old = [promoted, deleted_child_of, running["assets"][0], source, starts_from_it["assets"][0]]
        age(db, [*old["assets"], *kept_old], DAYS + 1)
        age(db, [recent, bridge["assets"][0]], DAYS - 1)
        set_status(db, running["id"], "running")
        set_status(db, starts_from_it["id"], "queued", source_asset_id=source)

        with built(off) as services:
            assert services.expire_drafts() == 0  # unset: every draft kept
        with built(on) as services:
            assert services.expire_drafts() == 2
            assert services.expire_drafts() == 0  # deleted once
            with db.session() as s:
                left = dict(s.exec(select(Asset.id, Asset.deleted_at)).all())
            assert {asset_id for asset_id, when in left.items() if when is not None} == \
                {*old["assets"], child["assets"][0]}
            assert services.sweep_asset_files(older_than=0) == 3  # the two drafts and the deleted promotion
            assert not any(store.path_for(shas[asset_id]).exists() for asset_id in old["assets"])
            assert store.path_for(shas[promoted]).exists() and store.path_for(shas[recent]).exists()

        # Once their jobs have finished, the sweep at a service's start deletes them too.
        set_status(db, running["id"], "succeeded")
        set_status(db, starts_from_it["id"], "succeeded")
        with TestClient(create_app(on)) as client:
            for asset_id in old["assets"]:
                assert status_of(client, asset_id) == 410
                assert client.get(f"/v1/assets/{asset_id}/content").status_code == 410
            for asset_id in (promoted, deleted_child_of, recent, bridge["assets"][0]):
                assert status_of(client, asset_id) == 200, asset_id
            assert client.get(f"/v1/assets/{promoted}/content").status_code == 200
            unfinished_before = [running["assets"][0], source, starts_from_it["assets"][0]]
            deadline = utcnow() + timedelta(seconds=30)
            while any(status_of(client, asset_id) != 410 for asset_id in unfinished_before):
                assert utcnow() < deadline, "the start-up sweep did not delete the drafts of finished jobs"
                time.sleep(0.05)
    finally:
        db.dispose()


def test_old_drafts_nothing_descends_from_are_deleted_and_the_rest_kept(make_settings: SettingsFactory) -> None:
    check_draft_retention(make_settings)


def fill(db: Database, drafts: int, *, days: float = DAYS + 1) -> tuple[str, list[str]]:
    """`drafts` old drafts of a finished job of a new project, oldest first: the project and their ids."""
    project_id, job_id = new_id("prj"), new_id("job")
    created = utcnow() - timedelta(days=days)
    ids = [new_id("ast") for _ in range(drafts)]
    with db.transaction() as s:
        s.add(Project(id=project_id, name="drafts", policy="balanced"))
        s.flush()
        s.add(Job(id=job_id, project_id=project_id, stage="ideation", engine="lite", status="succeeded"))
        s.flush()
        for n, asset_id in enumerate(ids):
            s.add(Asset(id=asset_id, project_id=project_id, job_id=job_id, index=n, stage="ideation", engine="lite",
                        model="m", prompt="x", width=64, height=64, sha256=f"{n:064x}",
                        created_at=created + timedelta(seconds=n)))
    return project_id, ids


def live(db: Database, project_id: str) -> list[str]:
    with db.session() as s:
        return list(s.exec(select(Asset.id).where(col(Asset.project_id) == project_id,
                                                  col(Asset.deleted_at).is_(None))).all())


def check_batches(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    project_id, ids = fill(db, 7)
    # The oldest is kept (an unfinished job starts from it): the batches go on past it.
    with db.transaction() as s:
        s.add(Job(id=new_id("job"), project_id=project_id, stage="bridge", engine="lite", status="queued",
                  source_asset_id=ids[0]))
    batches: list[int] = []
    delete = retention.delete_assets

    def counted(s: Session, asset_ids: Collection[str]) -> list[str]:
        batches.append(len(asset_ids))
        return delete(s, asset_ids)

    monkeypatch.setattr(retention, "delete_assets", counted)
    assert retention.expire_drafts(db, DAYS, batch=2) == 6
    assert batches == [2, 2, 2, 1]
    assert live(db, project_id) == [ids[0]]


def test_drafts_are_deleted_a_batch_per_transaction(sqlite_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_batches(sqlite_db, monkeypatch)


def test_a_stopping_service_s_sweep_ends_after_the_batch_under_way(tmp_path: Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.migrate()
    try:
        project_id, ids = fill(db, 5)
        stop = threading.Event()
        stop.set()
        assert retention.expire_drafts(db, DAYS, batch=2, pause=30, stop=stop) == 2
        assert live(db, project_id) == ids[2:]
    finally:
        db.dispose()


def test_a_service_s_stop_ends_its_retention_between_two_batches(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of 2 with 30 s between them: a stop that did not reach the sweep's thread waited them out.
    monkeypatch.setattr("orchestrator.services.expire_drafts",
                        functools.partial(retention.expire_drafts, batch=2, pause=30))
    with built(make_settings(draft_retention_days=DAYS)) as services:
        services.db.migrate()
        project_id, ids = fill(services.db, 5)
        sweep = threading.Thread(target=services.expire_drafts)
        sweep.start()
        deadline = time.monotonic() + 30
        while len(live(services.db, project_id)) == len(ids):  # the first batch committed
            assert time.monotonic() < deadline, "the first batch was not deleted"
            time.sleep(0.01)
    # Stopped (`aclose`) while the sweep waits between its batches.
    sweep.join(timeout=10)
    assert not sweep.is_alive(), "the stop did not end the sweep before its next batch"
    assert live(services.db, project_id) == ids[2:]


def check_two_sweeps_at_once(db: Database) -> None:
    project_id, ids = fill(db, 50)
    counts: list[int] = []
    start = threading.Barrier(2)

    def sweep() -> None:
        start.wait()
        counts.append(retention.expire_drafts(db, DAYS, batch=3))

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(counts) == 2 and sum(counts) == len(ids)
    assert live(db, project_id) == []


def test_two_sweeps_at_once_delete_each_draft_once(sqlite_db: Database) -> None:
    check_two_sweeps_at_once(sqlite_db)


@pytest.mark.parametrize("days", ["0", "-1", "36501", "1.5", "forever"])
def test_the_retention_is_a_whole_number_of_days_from_one_to_a_century(
        make_settings: SettingsFactory, days: str) -> None:
    with pytest.raises(ValidationError, match="draft_retention_days"):
        make_settings(draft_retention_days=days)


def test_a_stopping_service_s_file_sweep_ends_with_each_file_settled(make_settings: SettingsFactory,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The file sweep after the drafts': `aclose` sets the same event, and the sweep's thread ends
    after the file under way, where it went on through the whole store (a stop waited for it)."""
    settings = make_settings()
    db = Database(settings.resolved_database_url)
    db.migrate()
    try:
        _, ids = fill(db, 6)
        with db.transaction() as s:  # the first kept: the others' files are the sweep's
            s.execute(update(Asset).where(col(Asset.id).in_(ids[1:])).values(deleted_at=utcnow()))
    finally:
        db.dispose()
    store = ArtifactStore(settings.assets_dir)
    paths = [store.path_for(f"{n:064x}") for n in range(6)]  # as `fill` names them
    old = time.time() - 7200
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    reached, services = threading.Event(), Services.build(settings)
    real = ArtifactStore._set_aside

    def then_the_stop(self: ArtifactStore, path: Path, *, keep: bool, cutoff: float) -> int:
        settled = real(self, path, keep=keep, cutoff=cutoff)
        reached.set()
        services.sweeps_stop.wait(10)
        return settled

    monkeypatch.setattr(ArtifactStore, "_set_aside", then_the_stop)
    removed: list[int] = []
    sweeping = threading.Thread(target=lambda: removed.append(services.sweep_asset_files()))
    sweeping.start()
    try:
        assert reached.wait(10), "the sweep removed nothing"
    finally:
        asyncio.run(services.aclose())
        sweeping.join(10)
    assert removed == [1]
    assert paths[0].exists() and sum(path.exists() for path in paths[1:]) == 4
    assert not list(store.root.rglob(".gc-*"))
    monkeypatch.setattr(ArtifactStore, "_set_aside", real)
    with built(settings) as services:
        assert services.sweep_asset_files() == 4  # the rest: the next sweep's
    assert [path.exists() for path in paths] == [True, *[False] * 5]


def test_a_batch_reads_the_old_live_drafts_from_their_index(tmp_path: Any) -> None:
    """Each batch walks the live drafts oldest first from `ix_assets_stage_live`: sorted at each
    batch, or read past those deleted already, 100,000 old drafts cost seconds a batch."""
    from sqlalchemy import event

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.migrate()
    seen: list[tuple[str, Any]] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    try:
        fill(db, 50)
        with db.transaction() as s:
            s.connection().exec_driver_sql("ANALYZE")  # statistics, as an operator's sqlite3 shell may leave
        event.listen(db.engine, "before_cursor_execute", before)
        assert retention.expire_drafts(db, DAYS, batch=10) == 50
        event.remove(db.engine, "before_cursor_execute", before)
        statement, parameters = next((q, p) for q, p in seen if "ORDER BY" in q and "FROM assets" in q)
        with db.engine.connect() as conn:
            plan = "\n".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters))
    finally:
        db.dispose()
    assert "USING INDEX ix_assets_stage_live" in plan and "TEMP B-TREE" not in plan, plan


def test_a_draft_deleted_by_retention_is_not_served_from_memory_afterwards(make_settings: SettingsFactory) -> None:
    """A draft read (or made) in the last 30 s sits in the process's memory (`RecentContent`): the
    sweep of that same process deleting it must take it out as a DELETE does, or its content is
    served for the rest of those 30 s while its metadata answers 410."""
    with TestClient(create_app(make_settings(draft_retention_days=DAYS))) as client:
        project = create_project(client)["id"]
        draft = run_draft(client, project, seed=7)["assets"][0]  # type: ignore[arg-type]
        assert client.get(f"/v1/assets/{draft}/content").status_code == 200
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        assert services.store.recent.get(draft) is not None
        age(services.db, [draft], DAYS + 1)
        assert services.expire_drafts() == 1
        assert status_of(client, draft) == 410
        assert client.get(f"/v1/assets/{draft}/content").status_code == 410


def test_a_draft_retention_deletes_while_its_content_is_read_is_not_served_from_memory_afterwards(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention marks only the drafts this process holds in memory: one whose row a content read
    had found live, deleted before that read's file was read, was put in memory as the read ended,
    and its content served for 30 s while its metadata answered 410."""
    with TestClient(create_app(make_settings(draft_retention_days=DAYS))) as client:
        project = create_project(client)["id"]
        draft = run_draft(client, project, seed=7)["assets"][0]  # type: ignore[arg-type]
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        services.store.recent = RecentContent()  # as 30 s later: read from the store
        age(services.db, [draft], DAYS + 1)
        read = ArtifactStore.get_or_open
        expired: list[int] = []

        def expired_meanwhile(self: ArtifactStore, sha256: str, *, up_to: int | None) -> bytes | BinaryIO:
            expired.append(services.expire_drafts())
            return read(self, sha256, up_to=up_to)

        with monkeypatch.context() as patch:
            patch.setattr(ArtifactStore, "get_or_open", expired_meanwhile)
            assert client.get(f"/v1/assets/{draft}/content").status_code == 200  # its row was read live
        assert expired == [1] and status_of(client, draft) == 410
        assert services.store.recent.get(draft) is None
        assert client.get(f"/v1/assets/{draft}/content").status_code == 410


def test_a_draft_retention_deletes_leaves_the_file_its_identical_twin_names(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Identical images share one file: retention deleting the older of two byte-identical drafts
    takes its bytes out of its project's usage, once, and leaves the file to the live twin, whose
    content is served and which `orchestrator check` finds whole; the file goes once both are deleted."""
    from orchestrator.cli import main

    settings = make_settings(draft_retention_days=DAYS)
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    with TestClient(create_app(settings)) as client:
        project = create_project(client)["id"]
        old, twin = (run_draft(client, project, seed=7)["assets"][0] for _ in range(2))  # type: ignore[arg-type]
        shas = {client.get(f"/v1/assets/{a}").json()["sha256"] for a in (old, twin)}
        assert len(shas) == 1
        path = ArtifactStore(settings.assets_dir).path_for(shas.pop())
        size = path.stat().st_size
        assert client.get(f"/v1/projects/{project}").json()["storage_bytes"] == 2 * size
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        age(services.db, [old], DAYS + 1)
        assert services.expire_drafts() == 1
        assert services.expire_drafts() == 0  # deleted once: not taken out of the usage twice
        assert services.sweep_asset_files(older_than=0) == 0
        assert path.is_file() and status_of(client, old) == 410
        assert client.get(f"/v1/projects/{project}").json()["storage_bytes"] == size
        assert client.get(f"/v1/assets/{twin}/content").content == path.read_bytes()
        capsys.readouterr()
        assert main(["check"]) == 0, capsys.readouterr().out
        assert client.delete(f"/v1/assets/{twin}").status_code == 204
        assert client.get(f"/v1/projects/{project}").json()["storage_bytes"] == 0
        assert services.sweep_asset_files(older_than=0) == 1
        assert not path.exists()
        capsys.readouterr()
        assert main(["check"]) == 0, capsys.readouterr().out


def test_the_crash_match_fetches_only_the_jobs_whose_prompt_a_file_has(sqlite_db: Database) -> None:
    """The foreign-database guard's batch of orphans (oldest first, ORPHAN_BATCH at a time) may span
    a year: two files a year apart asked for every job of their engine created in between, whole
    rows (50,000 such jobs: 245 MiB traced and 25 s on the shared 2-core machine, for two files;
    `orchestrator check` asks it of every store's orphans). Fetched now: the jobs whose prompt is
    one of the files'."""
    now = utcnow()
    made_at = now - timedelta(days=200)
    with sqlite_db.transaction() as s:
        project_id = new_id("prj")
        s.add(Project(id=project_id, name="crash", policy="balanced"))
        s.flush()

        def job(prompt: str, created: Any, status: Literal["succeeded", "failed"]) -> None:
            s.add(Job(id=new_id("job"), project_id=project_id, stage="ideation", engine="lite", model="m",
                      status=status, params={"prompt": prompt}, attempts=[], created_at=created,
                      finished_at=created + timedelta(minutes=1)))

        for i in range(300):  # the year's other jobs
            job(f"another {i}", now - timedelta(days=360) + timedelta(days=i), "succeeded")
        job("a lighthouse", made_at, "failed")  # killed as it stored its image
    record: dict[str, Any] = {"engine": "lite", "stage": "ideation", "parent_id": None}
    found: list[tuple[str, dict[str, Any] | None, float]] = [
        ("a" * 64, {**record, "prompt": "a lighthouse"}, (made_at + timedelta(seconds=20)).timestamp()),
        ("b" * 64, {**record, "prompt": "a harbour"}, (now - timedelta(days=1)).timestamp()),
        ("c" * 64, {**record, "prompt": "a lighthouse"}, (now - timedelta(days=365)).timestamp())]
    fetched: list[int] = []
    with sqlite_db.session() as s:
        real_exec, real_connection = s.exec, s.connection

        def counted(result: Any) -> list[Any]:
            rows = list(result)
            fetched.append(len(rows))
            return rows

        class Connection:  # the rows each query of the jobs hands back, counted
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.connection = real_connection(*args, **kwargs)

            def execute(self, statement: Any, *args: Any, **kwargs: Any) -> list[Any]:
                return counted(self.connection.execute(statement, *args, **kwargs))

        def exec_(statement: Any, *args: Any, **kwargs: Any) -> Any:
            result = real_exec(statement, *args, **kwargs)
            return counted(result) if statement.column_descriptions[0].get("entity") is Job else result

        s.exec = exec_  # type: ignore[method-assign]
        s.connection = Connection  # type: ignore[method-assign,assignment]
        assert retention.made_by_jobs(s, found) == {"a" * 64}
    assert fetched == [1]
