"""Per-project storage quotas (`storage_quota_mb`): a project's usage is the bytes of its live
assets' files, kept on its row as assets are written and deleted; a submit at or over its quota is
refused 507 `storage_quota_exceeded` with nothing written; only the admin key sets the quota."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text, update
from sqlmodel import col, select
from starlette.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.clock import utcnow
from orchestrator.db import Database, alembic_config, upgrade
from orchestrator.models import Asset, IdempotencyKey, Job, LedgerEntry, Project
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore
from tests.api import SMALL, assert_error, create_project, run_draft, submit_draft, wait_for_job
from tests.api.test_retention import built
from tiers.base import Capabilities, RenderRequest
from tiers.guard import ThirdParty

SettingsFactory = Callable[..., Settings]
MIB = 2**20
ADMIN_KEY = "admin-secret-for-quota-tests"


@contextmanager
def client_for(settings: Settings) -> Iterator[httpx.Client]:
    with TestClient(create_app(settings)) as client:
        yield cast(httpx.Client, client)


def services_of(client: httpx.Client) -> Services:
    return cast(Services, client.app.state.services)  # type: ignore[attr-defined]


def used(client: httpx.Client, project_id: str) -> int:
    response = client.get(f"/v1/projects/{project_id}")
    assert response.status_code == 200, response.text
    return int(response.json()["storage_bytes"])


def size_of(client: httpx.Client, asset_id: str) -> int:
    content = client.get(f"/v1/assets/{asset_id}/content")
    assert content.status_code == 200
    return len(content.content)


def set_usage(services: Services, project_id: str, amount: int) -> None:
    """The project's row as though its assets held `amount` bytes (a quota's worth, without making them)."""
    with services.db.transaction() as s:
        s.execute(update(Project).where(col(Project.id) == project_id).values(storage_bytes=amount))


def test_usage_counts_each_asset_written_and_lowers_on_delete(make_settings: SettingsFactory) -> None:
    check_usage_counts_each_asset_written_and_lowers_on_delete(make_settings)


def check_usage_counts_each_asset_written_and_lowers_on_delete(make_settings: SettingsFactory,
                                                               **database: Any) -> None:
    with client_for(make_settings(**database)) as client:
        project = create_project(client)
        assert (project["storage_bytes"], project["storage_quota_mb"]) == (0, None)
        first, second = run_draft(client, project["id"], n=2, seed=7)["assets"]
        sizes = {asset_id: size_of(client, asset_id) for asset_id in (first, second)}
        assert used(client, project["id"]) == sum(sizes.values()) > 0
        # A promotion's image is the project's too.
        promoted = client.post(f"/v1/assets/{first}/promote", json={"engine": "local-hifi"})
        assert promoted.status_code == 202, promoted.text
        [bridge] = wait_for_job(client, promoted.json()["id"], ("succeeded",))["assets"]
        sizes[bridge] = size_of(client, bridge)
        assert used(client, project["id"]) == sum(sizes.values())
        # The same image made again counts again: each asset is the project's to keep or delete.
        [again] = run_draft(client, project["id"], n=1, seed=8)["assets"]
        [same] = run_draft(client, project["id"], n=1, seed=8)["assets"]
        assert size_of(client, again) == size_of(client, same)
        sizes[again], sizes[same] = size_of(client, again), size_of(client, same)
        assert used(client, project["id"]) == sum(sizes.values())

        assert client.delete(f"/v1/assets/{second}").status_code == 204
        assert used(client, project["id"]) == sum(sizes.values()) - sizes[second]
        assert client.delete(f"/v1/assets/{second}").status_code == 204  # deleted already: nothing taken twice
        assert used(client, project["id"]) == sum(sizes.values()) - sizes[second]
        with services_of(client).db.session() as s:
            stored = dict(s.exec(select(Asset.id, Asset.bytes)).all())
        assert stored == sizes
        other = create_project(client, "other")
        assert used(client, other["id"]) == 0  # one project's assets are not another's
        metrics = client.get("/metrics").text.splitlines()
        left = sum(sizes.values()) - sizes[second]
        assert f'orchestrator_project_storage_bytes{{project="{project["id"]}"}} {left}' in metrics


def test_draft_retention_lowers_the_usage(make_settings: SettingsFactory) -> None:
    with client_for(make_settings()) as client:
        project = create_project(client)["id"]
        old, kept = (run_draft(client, project, seed=seed)["assets"][0] for seed in (11, 12))
        sizes = {asset_id: size_of(client, asset_id) for asset_id in (old, kept)}
        services = services_of(client)
        with services.db.transaction() as s:
            s.execute(update(Asset).where(col(Asset.id) == old).values(created_at=utcnow() - timedelta(days=31)))
    with built(make_settings(draft_retention_days=30)) as services:
        assert services.expire_drafts() == 1
        with services.db.session() as s:
            row = s.get(Project, project)
            assert row is not None and row.storage_bytes == sizes[kept]


def test_a_submit_at_the_quota_is_refused_with_nothing_written(make_settings: SettingsFactory) -> None:
    check_a_submit_at_the_quota_is_refused_with_nothing_written(make_settings)


def check_a_submit_at_the_quota_is_refused_with_nothing_written(make_settings: SettingsFactory,
                                                                **database: Any) -> None:
    with client_for(make_settings(**database)) as client:
        project = create_project(client, storage_quota_mb=1)
        assert (project["storage_quota_mb"], project["storage_quota_bytes"]) == (1, MIB)
        project_id = project["id"]
        [draft] = run_draft(client, project_id, seed=21)["assets"]
        services = services_of(client)
        set_usage(services, project_id, MIB)  # at the quota, not over it

        def rows() -> tuple[int, int, int]:
            with services.db.session() as s:
                return (len(s.exec(select(Job.id)).all()), len(s.exec(select(LedgerEntry.id)).all()),
                        len(s.exec(select(IdempotencyKey.key)).all()))

        before = rows()
        for path, body in ((f"/v1/projects/{project_id}/drafts", {"prompt": "more", "width": 64, "height": 64}),
                           (f"/v1/assets/{draft}/promote", {"engine": "local-hifi"}),
                           (f"/v1/assets/{draft}/polish", {"engine": "local-hifi"})):
            response = client.post(path, json=body, headers={"Idempotency-Key": f"full {path}"})
            error = assert_error(response, 507, "storage_quota_exceeded")
            # Refused before it is routed: no engine, so no bound of its images, is asked.
            assert error["details"] == {"project_id": project_id, "used_bytes": MIB, "quota_bytes": MIB,
                                        "reserved_bytes": 0, "job_bound_bytes": 0}, path
            assert "storage quota of 1 MiB" in error["message"] and "Retry-After" not in response.headers
        # Explaining the route says the same: a 200 said such a job would be taken.
        explained = client.post("/v1/route/explain", json={"stage": "ideation", "project_id": project_id,
                                                           "prompt": "x"})
        assert assert_error(explained, 507, "storage_quota_exceeded")["details"]["used_bytes"] == MIB
        assert rows() == before  # no job, no hold, no key kept

        # One byte under, but the job's images may take more than that byte: refused, saying how much.
        set_usage(services, project_id, MIB - 1)
        two = {"prompt": "a lighthouse at dusk", "n": 2, **SMALL}
        error = assert_error(client.post(f"/v1/projects/{project_id}/drafts", json={**two, "seed": 22}), 507,
                             "storage_quota_exceeded")
        bound = error["details"]["job_bound_bytes"]
        assert bound > 2 * 64 * 64 * 4 and error["details"]["reserved_bytes"] == 0, error
        assert rows() == before
        # Room for its bound: taken, and its images take no more than it held back.
        set_usage(services, project_id, MIB - bound)
        finished = run_draft(client, project_id, **two, seed=22)
        assert MIB - bound < used(client, project_id) <= MIB
        assert_error(client.post(f"/v1/projects/{project_id}/drafts", json={**two, "seed": 23}), 507,
                     "storage_quota_exceeded")
        # Deleting assets makes room again at once.
        for asset_id in finished["assets"]:
            assert client.delete(f"/v1/assets/{asset_id}").status_code == 204
        assert used(client, project_id) == MIB - bound
        run_draft(client, project_id, **two, seed=23)
        # And the admin lifting the quota, whatever the project holds.
        set_usage(services, project_id, 50 * MIB)
        assert client.patch(f"/v1/projects/{project_id}", json={"storage_quota_mb": None}).json()[
            "storage_quota_mb"] is None
        run_draft(client, project_id, seed=24)


def test_a_project_without_a_quota_is_never_refused_for_its_storage(make_settings: SettingsFactory) -> None:
    with client_for(make_settings()) as client:
        project = create_project(client)
        assert (project["storage_quota_mb"], project["storage_quota_bytes"]) == (None, None)
        set_usage(services_of(client), project["id"], 10**15)  # a petabyte
        run_draft(client, project["id"])


def test_the_server_s_default_quota_holds_the_projects_without_their_own(make_settings: SettingsFactory) -> None:
    with client_for(make_settings(project_storage_quota_mb=1)) as client:
        default, own = create_project(client, "default"), create_project(client, "own", storage_quota_mb=2)
        assert (default["storage_quota_mb"], default["storage_quota_bytes"]) == (None, MIB)
        assert (own["storage_quota_mb"], own["storage_quota_bytes"]) == (2, 2 * MIB)
        services = services_of(client)
        for project in (default, own):
            set_usage(services, project["id"], MIB)
        error = assert_error(client.post(f"/v1/projects/{default['id']}/drafts", json={"prompt": "x"}), 507,
                             "storage_quota_exceeded")
        assert "ORCH_PROJECT_STORAGE_QUOTA_MB" in error["message"] and error["details"]["quota_bytes"] == MIB
        run_draft(client, own["id"])  # its own quota, larger than the default, leaves it room
        listed = {p["id"]: p for p in client.get("/v1/projects").json()["items"]}
        assert listed[default["id"]]["storage_quota_bytes"] == MIB and listed[default["id"]]["storage_bytes"] == MIB
        metrics = client.get("/metrics").text.splitlines()
        assert f'orchestrator_project_storage_quota_bytes{{project="{default["id"]}"}} {MIB}' in metrics
        assert f'orchestrator_project_storage_quota_bytes{{project="{own["id"]}"}} {2 * MIB}' in metrics


@pytest.mark.parametrize("value", [0, -1, 1.5, "10", True, 2**30 + 1])
def test_a_quota_that_is_not_a_whole_number_of_mib_from_one_is_refused(make_settings: SettingsFactory,
                                                                       value: Any) -> None:
    with client_for(make_settings()) as client:
        project_id = create_project(client, storage_quota_mb=5)["id"]
        error = assert_error(client.patch(f"/v1/projects/{project_id}", json={"storage_quota_mb": value}),
                             422, "invalid_request")
        assert error["details"]["errors"][0]["loc"] == ["body", "storage_quota_mb"], error
        assert client.get(f"/v1/projects/{project_id}").json()["storage_quota_mb"] == 5
        assert_error(client.post("/v1/projects", json={"name": "q", "storage_quota_mb": value}), 422,
                     "invalid_request")
        # Left out, nothing changes; the largest is taken; null removes it.
        assert client.patch(f"/v1/projects/{project_id}", json={"name": "renamed"}).json()["storage_quota_mb"] == 5
        assert client.patch(f"/v1/projects/{project_id}", json={"storage_quota_mb": 2**30}).json()[
            "storage_quota_mb"] == 2**30
        assert client.patch(f"/v1/projects/{project_id}", json={"storage_quota_mb": None}).json()[
            "storage_quota_mb"] is None


def test_a_project_key_cannot_set_its_own_quota(make_settings: SettingsFactory) -> None:
    with client_for(make_settings(admin_key=ADMIN_KEY)) as client:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        project_id = create_project_as(client, admin, storage_quota_mb=10)
        created = client.post(f"/v1/projects/{project_id}/keys", json={"name": "pipeline"}, headers=admin)
        assert created.status_code == 201, created.text
        mine = {"Authorization": f"Bearer {created.json()['key']}"}
        for value in (None, 10_000):
            assert_error(client.patch(f"/v1/projects/{project_id}", json={"storage_quota_mb": value}, headers=mine),
                         403, "forbidden")
        assert_error(client.post("/v1/projects", json={"name": "mine", "storage_quota_mb": 10_000}, headers=mine),
                     403, "forbidden")
        seen = client.get(f"/v1/projects/{project_id}", headers=mine).json()  # it may read its quota and usage
        assert (seen["storage_quota_mb"], seen["storage_bytes"]) == (10, 0)


def create_project_as(client: httpx.Client, headers: dict[str, str], **extra: Any) -> str:
    response = client.post("/v1/projects", json={"name": "keyed", **extra}, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_0029_leaves_earlier_assets_to_be_measured_and_downgrades(tmp_path: Path) -> None:
    """An upgrade reads no file (the database may live apart from the data dir); the sweep's
    `quota.measure` then counts each live asset whose file is there, and a deleted one not at all."""
    from orchestrator import quota  # here: the other tests are told apart without the module

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0028")
    store = ArtifactStore(tmp_path / "assets")
    here, deleted = store.put(b"an image's bytes"), store.put(b"a deleted image's bytes, longer")
    missing = "f" * 64  # its file lost: it takes no room, and is measured once restored
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            now = datetime.now(UTC).replace(tzinfo=None)
            conn.execute(text("INSERT INTO projects (id, name, policy, budget_period, created_at) "
                              "VALUES ('prj_1', 'p', 'balanced', 'none', :now)"), {"now": now})
            conn.execute(text("INSERT INTO jobs (id, project_id, stage, engine, status, params, progress_step, "
                              "progress_total, estimated, cache_hit, attempt, created_at) VALUES ('job_1', 'prj_1', "
                              "'ideation', 'lite', 'succeeded', '{}', 0, 0, 0, 0, 0, :now)"), {"now": now})
            for asset_id, sha, gone in (("ast_1", here, None), ("ast_2", deleted, now), ("ast_3", missing, None)):
                conn.execute(text("INSERT INTO assets (id, project_id, job_id, \"index\", stage, engine, model, "
                                  "prompt, negative_prompt, width, height, sha256, record, created_at, deleted_at) "
                                  "VALUES (:id, 'prj_1', 'job_1', 0, 'ideation', 'lite', 'm', 'p', '', 64, 64, :sha, "
                                  "'{}', :now, :gone)"), {"id": asset_id, "sha": sha, "now": now, "gone": gone})
        upgrade(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT storage_bytes, storage_quota_mb FROM projects")).one() == (0, None)
            assert conn.execute(text("SELECT count(*) FROM assets WHERE bytes IS NULL")).scalar() == 3
        db = Database(url)
        try:
            assert quota.measure(db, store, batch=2) == 2
            assert quota.measure(db, store) == 0  # measured once, the missing file's left for its restore
        finally:
            db.dispose()
        with engine.connect() as conn:
            assert dict(conn.execute(text("SELECT id, bytes FROM assets")).all()) == {
                "ast_1": len(b"an image's bytes"), "ast_2": len(b"a deleted image's bytes, longer"), "ast_3": None}
            assert conn.execute(text("SELECT storage_bytes FROM projects")).scalar() == len(b"an image's bytes")
        command.downgrade(alembic_config(url), "0028")
        with engine.connect() as conn:
            assert "bytes" not in {c["name"] for c in inspect(conn).get_columns("assets")}
            columns = {c["name"] for c in inspect(conn).get_columns("projects")}
            assert not {"storage_bytes", "storage_quota_mb"} & columns
            assert conn.execute(text("SELECT count(*) FROM assets")).scalar() == 3
        upgrade(url)
    finally:
        engine.dispose()


def test_assets_stored_without_a_size_are_measured_once_the_live_ones_counted(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        db.migrate()
        check_assets_measured(db, ArtifactStore(tmp_path / "assets"))
    finally:
        db.dispose()


def check_assets_measured(db: Database, store: ArtifactStore) -> None:
    """As 0029 leaves the assets stored before it: null sizes, counted nothing until `quota.measure`
    reads their files, in batches, each live one added to its project and a deleted one to none."""
    from orchestrator import quota

    files = [store.put(f"image {i}".encode() * (i + 1)) for i in range(5)]
    with db.transaction() as s:
        s.add(Project(id="prj_m", name="m", policy="balanced", storage_bytes=7))  # 7: counted before, kept
        s.flush()
        s.add(Job(id="job_m", project_id="prj_m", stage="ideation", engine="lite", status="succeeded"))
        s.flush()
        for i, sha in enumerate([*files, "e" * 64]):  # the last one's file is lost: it takes no room for now
            s.add(Asset(id=f"ast_m{i}", project_id="prj_m", job_id="job_m", stage="ideation", engine="lite",
                        model="m", prompt="p", width=64, height=64, sha256=sha,
                        deleted_at=utcnow() if i == 1 else None))
    assert quota.measure(db, store, batch=2) == 5
    assert quota.measure(db, store) == 0  # measured once
    live = sum(len(f"image {i}".encode() * (i + 1)) for i in (0, 2, 3, 4))
    with db.session() as s:
        project = s.get(Project, "prj_m")
        assert project is not None and project.storage_bytes == 7 + live
        sizes = dict(s.exec(select(Asset.id, Asset.bytes).where(col(Asset.project_id) == "prj_m")).all())
    assert sizes == {f"ast_m{i}": len(f"image {i}".encode() * (i + 1)) for i in range(5)} | {"ast_m5": None}


def test_an_asset_whose_file_a_stopped_sweep_set_aside_is_measured_at_its_size(tmp_path: Path) -> None:
    """A sweep stopped mid-way leaves a file renamed aside (`.gc-<sha>-*.png`), served from there
    and put back by the next sweep: an asset stored before sizes were kept was measured 0 for good
    (its project's usage short by its file, `orchestrator check` then calling its size wrong)."""
    from orchestrator import quota

    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        db.migrate()
        store = ArtifactStore(tmp_path / "assets")
        data = b"an image stored before 0029, " * 20
        sha = store.put(data)
        home = store.path_for(sha)
        home.rename(home.with_name(f".gc-{sha}-0a1b2c3d.png"))
        with db.transaction() as s:
            s.add(Project(id="prj_a", name="a", policy="balanced"))
            s.flush()
            s.add(Job(id="job_a", project_id="prj_a", stage="ideation", engine="lite", status="succeeded"))
            s.flush()
            s.add(Asset(id="ast_a", project_id="prj_a", job_id="job_a", stage="ideation", engine="lite", model="m",
                        prompt="p", width=64, height=64, sha256=sha))
        assert store.get(sha) == data  # served meanwhile
        assert quota.measure(db, store) == 1
        with db.session() as s:
            asset, project = s.get(Asset, "ast_a"), s.get(Project, "prj_a")
            assert asset is not None and project is not None
            assert asset.bytes == project.storage_bytes == len(data)
    finally:
        db.dispose()


def test_an_asset_whose_file_is_missing_is_measured_once_its_file_is_restored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An asset stored before sizes were kept whose file was lost was measured 0 for good, the log
    saying its project's usage counted it: restored from a backup, its project's usage stayed short
    of it and `orchestrator check` asked for its row and its project's usage to be corrected by hand.
    Left unmeasured (counted as 0, said so), it is measured by the sweep after the restore."""
    from orchestrator import quota
    from orchestrator.cli import main

    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    db = Database(f"sqlite:///{tmp_path / 'orchestrator.db'}")
    try:
        db.migrate()
        store = ArtifactStore(tmp_path / "assets")
        lost, kept = b"a lost image's bytes, " * 10, b"a kept image's bytes"
        shas = [store.put(data) for data in (lost, kept)]
        backup = tmp_path / "backup.png"
        store.path_for(shas[0]).rename(backup)
        with db.transaction() as s:
            s.add(Project(id="prj_l", name="l", policy="balanced"))
            s.flush()
            s.add(Job(id="job_l", project_id="prj_l", stage="ideation", engine="lite", status="succeeded"))
            s.flush()
            for i, sha in enumerate(shas):
                s.add(Asset(id=f"ast_l{i}", project_id="prj_l", job_id="job_l", stage="ideation", engine="lite",
                            model="m", prompt="p", width=64, height=64, sha256=sha))

        def sizes() -> tuple[dict[str, int | None], int]:
            with db.session() as s:
                project = s.get(Project, "prj_l")
                assert project is not None
                return dict(s.exec(select(Asset.id, Asset.bytes)).all()), project.storage_bytes

        with caplog.at_level("WARNING", logger="orchestrator.quota"):
            assert quota.measure(db, store) == 1
        assert sizes() == ({"ast_l0": None, "ast_l1": len(kept)}, len(kept))
        assert "1 live asset(s) stored before their sizes were kept have no file in the store" in caplog.text
        capsys.readouterr()
        assert main(["check"]) == 1
        out = capsys.readouterr().out
        assert "1 asset missing: ast_l0" in out and "once its file is restored" in out, out
        assert quota.measure(db, store) == 0  # still missing: nothing written
        backup.rename(store.path_for(shas[0]))  # restored from a backup
        assert quota.measure(db, store) == 1
        assert sizes() == ({"ast_l0": len(lost), "ast_l1": len(kept)}, len(lost) + len(kept))
        assert main(["check"]) == 0, capsys.readouterr().out  # nothing to correct by hand
    finally:
        db.dispose()


@pytest.mark.parametrize("standing_in", ["folder", "fifo"])
def test_an_asset_whose_file_is_no_regular_file_is_measured_once_it_is_mended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], standing_in: str) -> None:
    """A folder or a FIFO where an asset's file belongs (a restore gone wrong) is no image: `get`
    calls it unreadable. An asset stored before sizes were kept was measured at its size (a
    folder's, a FIFO's 0) for good; once a job made its image again (which moves a folder aside and
    replaces a FIFO), its project's usage stayed short of the file and `orchestrator check` asked
    for its row and its project's usage to be corrected by hand."""
    from orchestrator import quota
    from orchestrator.cli import main

    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    db = Database(f"sqlite:///{tmp_path / 'orchestrator.db'}")
    try:
        db.migrate()
        store = ArtifactStore(tmp_path / "assets")
        data = b"an image stored before 0029, " * 20
        sha = store.put(data)
        home = store.path_for(sha)
        home.unlink()
        home.mkdir() if standing_in == "folder" else os.mkfifo(home)
        with db.transaction() as s:
            s.add(Project(id="prj_f", name="f", policy="balanced"))
            s.flush()
            s.add(Job(id="job_f", project_id="prj_f", stage="ideation", engine="lite", status="succeeded"))
            s.flush()
            s.add(Asset(id="ast_f", project_id="prj_f", job_id="job_f", stage="ideation", engine="lite", model="m",
                        prompt="p", width=64, height=64, sha256=sha))

        def sizes() -> tuple[int | None, int]:
            with db.session() as s:
                asset, project = s.get(Asset, "ast_f"), s.get(Project, "prj_f")
                assert asset is not None and project is not None
                return asset.bytes, project.storage_bytes

        assert quota.measure(db, store) == 0
        assert sizes() == (None, 0)
        assert store.put(data) == sha and home.is_file()  # mended: a job made the image again
        assert quota.measure(db, store) == 1
        assert sizes() == (len(data), len(data))
        capsys.readouterr()
        assert main(["check"]) == 0, capsys.readouterr().out  # nothing to correct by hand
    finally:
        db.dispose()


def reserved_of(client: httpx.Client, project_id: str) -> int:
    response = client.get(f"/v1/projects/{project_id}")
    assert response.status_code == 200, response.text
    return int(response.json()["storage_reserved_bytes"])


def test_unfinished_jobs_hold_their_images_bound_back_from_the_quota(make_settings: SettingsFactory) -> None:
    check_unfinished_jobs_hold_their_images_bound_back_from_the_quota(make_settings)


def check_unfinished_jobs_hold_their_images_bound_back_from_the_quota(make_settings: SettingsFactory,
                                                                     **database: Any) -> None:
    """A project cannot pass its quota by what its queued jobs will make: each holds back the most its
    images can take until it ends; then what they stored counts instead, and a canceled or failed
    one frees what it held."""
    body = {"prompt": "a lighthouse at dusk", "n": 4, **SMALL}
    with client_for(make_settings(run_jobs=False, **database)) as client:
        project_id = create_project(client, storage_quota_mb=1)["id"]
        services = services_of(client)
        first = submit_draft(client, project_id, **body, seed=1)
        bound = reserved_of(client, project_id)
        assert bound > 4 * 64 * 64 * 4  # the 4 images' pixels at least, as RGBA
        with services.db.session() as s:
            assert s.get(Job, first["id"]).reserved_bytes == bound  # type: ignore[union-attr]
        fits = MIB // bound
        queued = [first["id"], *(submit_draft(client, project_id, **body, seed=seed)["id"]
                                 for seed in range(2, fits + 1))]
        assert reserved_of(client, project_id) == fits * bound

        def rows() -> tuple[int, int, int]:
            with services.db.session() as s:
                return (len(s.exec(select(Job.id)).all()), len(s.exec(select(LedgerEntry.id)).all()),
                        len(s.exec(select(IdempotencyKey.key)).all()))

        before = rows()
        refused = client.post(f"/v1/projects/{project_id}/drafts", json={**body, "seed": 99},
                              headers={"Idempotency-Key": "one too many"})
        error = assert_error(refused, 507, "storage_quota_exceeded")
        assert error["details"] == {"project_id": project_id, "used_bytes": 0, "quota_bytes": MIB,
                                    "reserved_bytes": fits * bound, "job_bound_bytes": bound}
        assert "unfinished jobs may store" in error["message"], error
        explained = client.post("/v1/route/explain", json={"stage": "ideation", "project_id": project_id, **body})
        assert assert_error(explained, 507, "storage_quota_exceeded")["details"]["job_bound_bytes"] == bound
        assert rows() == before  # no job, no hold, no key kept

        # A canceled job holds nothing back: room for one more.
        assert client.post(f"/v1/jobs/{queued.pop()}/cancel").status_code in (200, 202)
        assert reserved_of(client, project_id) == (fits - 1) * bound
        queued.append(submit_draft(client, project_id, **body, seed=99)["id"])
        # Nor does a failed one.
        with services.db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == queued.pop()).values(status="failed"))
        assert reserved_of(client, project_id) == (fits - 1) * bound
        # Another project's jobs are not its own, and a project without a quota holds nothing back.
        free = create_project(client, "free")["id"]
        submit_draft(client, free, **body)
        listed = {p["id"]: p["storage_reserved_bytes"] for p in client.get("/v1/projects").json()["items"]}
        assert (listed[project_id], listed[free]) == ((fits - 1) * bound, 0)
    with client_for(make_settings(**database)) as client:
        ended = [wait_for_job(client, job_id, ("succeeded",)) for job_id in queued]
        sizes = [size_of(client, asset_id) for job in ended for asset_id in job["assets"]]
        assert reserved_of(client, project_id) == 0
        assert used(client, project_id) == sum(sizes) <= (fits - 1) * bound
        # The room they held and did not use is the project's again.
        submit_draft(client, project_id, **body, seed=100)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize(("width", "height"), [(1, 1), (8, 8), (64, 48), (300, 7), (512, 512)])
def test_an_image_s_bound_is_above_its_png_as_the_store_writes_it(mode: str, width: int, height: int) -> None:
    """Noise (which zlib cannot shrink) and the longest prompts, in characters JSON escapes six bytes
    each: the bound holds what `store.encode_png` writes."""
    import random

    from PIL import Image

    from orchestrator import quota
    from orchestrator.store import encode_png

    noise = random.Random(width * height).randbytes(width * height * len(mode))
    params = {"prompt": "\u00e9\u4e00" * 5000, "negative_prompt": "\n\"" * 5000}
    record = {"stage": "ideation", "engine": "lite", "model": "m" * 300, "seed": 2**32 - 1, "width": width,
              "height": height, "sampler": "EulerDiscreteScheduler", "steps": 150, "guidance_scale": 30.0, **params}
    made = len(encode_png(Image.frombytes(mode, (width, height), noise), record))
    bound = quota.image_bound(width, height, quota.text_bound(params))
    assert made <= bound


def test_a_local_engine_s_draft_is_held_at_three_bytes_a_pixel_and_no_profile(make_settings: SettingsFactory) -> None:
    """The local engines' images are RGB with no colour profile: a 512x512 draft was held at 1.18 MiB
    (4 bytes a pixel, room for a 16 KiB profile), so a 1 MiB quota refused the first one whatever
    its PNG would take (about 0.3 MiB for a natural image); now at 0.88 MiB, taken."""
    from orchestrator import quota

    body = {"prompt": "a lighthouse at dusk", "n": 1, "width": 512, "height": 512, "steps": 2}
    with client_for(make_settings(run_jobs=False)) as client:
        project_id = create_project(client, storage_quota_mb=1)["id"]
        job = submit_draft(client, project_id, **body)
        assert job["engine"] == "lite"
        held = reserved_of(client, project_id)
        assert held == quota.image_bound(512, 512, quota.text_bound(body), opaque=True) < MIB
        assert held < quota.image_bound(512, 512, quota.text_bound(body))  # a plugin's, or a provider's
        # local-hifi's the same; a plugin saying its images are opaque is not taken at its word.
        request = RenderRequest(stage="ideation", prompt="a lighthouse at dusk", n=1, width=512, height=512)
        assert quota.job_bound(services_of(client).registry.get("local-hifi"), request, body) == held

        class Says:
            name, kind, stages, capabilities = "says-opaque", "remote", frozenset({"ideation"}), Capabilities()
            opaque_images = True

        assert quota.job_bound(ThirdParty(Says()), request, body) == quota.image_bound(  # type: ignore[arg-type]
            512, 512, quota.text_bound(body))


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
@pytest.mark.parametrize(("width", "height"), [(1, 1), (8, 8), (64, 48), (300, 7), (512, 512)])
def test_an_opaque_image_s_bound_is_above_its_png_as_the_store_writes_it(mode: str, width: int, height: int) -> None:
    """An image with no alpha (grey ones are stored RGB) and no profile, of noise: within the bound an
    engine whose images are opaque is held at."""
    import random

    from PIL import Image

    from orchestrator import quota
    from orchestrator.store import encode_png

    noise = random.Random(width * height).randbytes(width * height * {"RGB": 3, "L": 1, "I;16": 2}[mode])
    params = {"prompt": "\u00e9\u4e00" * 5000, "negative_prompt": "\n\"" * 5000}
    record = {"stage": "ideation", "engine": "lite", "model": "m" * 300, "seed": 2**32 - 1, "width": width,
              "height": height, "sampler": "EulerDiscreteScheduler", "steps": 150, "guidance_scale": 30.0, **params}
    made = len(encode_png(Image.frombytes(mode, (width, height), noise), record))
    assert made <= quota.image_bound(width, height, quota.text_bound(params), opaque=True)


@pytest.mark.parametrize("profile", ["display", "padded", "garbage"])
def test_an_image_s_colour_profile_is_kept_within_its_bound(profile: str) -> None:
    """Pillow writes the profile a provider's image carries into its PNG: a 60 KB one passed the
    bound of a 64x64 image. One within the cap is kept whole; a larger one is applied and dropped."""
    import io
    import os
    import struct

    from PIL import Image, ImageCms

    from orchestrator import quota
    from orchestrator.store import MAX_ICC_BYTES, encode_png

    display = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    # A valid profile past the cap: the sRGB one with room after its tags, its header's size told.
    padded = display + bytes(4 * MAX_ICC_BYTES)
    icc = {"display": display, "padded": struct.pack(">I", len(padded)) + padded[4:],
           "garbage": os.urandom(4 * MAX_ICC_BYTES)}[profile]
    image = Image.frombytes("RGBA", (64, 64), os.urandom(64 * 64 * 4))
    image.info["icc_profile"] = icc
    params = {"prompt": "p", "negative_prompt": ""}
    made = encode_png(image, {"stage": "ideation", "engine": "lite", "width": 64, "height": 64, **params})
    assert len(made) <= quota.image_bound(64, 64, quota.text_bound(params))
    stored = Image.open(io.BytesIO(made))
    assert stored.info.get("icc_profile") == (icc if profile == "display" else None)
    assert stored.convert("RGBA").tobytes() == image.tobytes()  # sRGB to sRGB: the same pixels


def test_an_engine_that_picks_its_size_is_held_at_the_largest_it_returns() -> None:
    from orchestrator import quota
    from tiers._images import CLASS_EDGES, class_bound
    from tiers.base import RenderRequest

    class Picks:
        def largest_size(self, req: RenderRequest) -> tuple[int, int]:
            return 1536, 1024

    asked = RenderRequest(stage="ideation", prompt="p", n=2, width=1200, height=800)
    params = {"prompt": "p"}
    assert quota.output_size(Picks(), asked) == (1536, 1024)  # type: ignore[arg-type]
    assert quota.output_size(None, asked) == (1200, 800)  # unknown: the size asked
    assert quota.job_bound(Picks(), asked, params) == 2 * quota.image_bound(1536, 1024, quota.text_bound(params))  # type: ignore[arg-type]
    # Gemini's sizes of each class, of any aspect ratio, within the class's bound: 1K at 1:1, 4:3
    # (the most pixels) and 21:9 (the longest side), standing and lying; 0.5K as 1K halved, 2K and 4K doubled.
    for name in CLASS_EDGES:
        times = CLASS_EDGES[name] / 1024
        width, height = class_bound(name)
        for made in ((1024, 1024), (1200, 896), (896, 1200), (1584, 672), (672, 1584)):
            w, h = round(made[0] * times), round(made[1] * times)
            assert h * (1 + 4 * w) <= height * (1 + 4 * width), (name, made)


def test_0030_leaves_jobs_taken_before_it_holding_nothing_and_downgrades(tmp_path: Path) -> None:
    check_0030_leaves_jobs_taken_before_it_holding_nothing_and_downgrades(f"sqlite:///{tmp_path / 'm.db'}")


def check_0030_leaves_jobs_taken_before_it_holding_nothing_and_downgrades(url: str) -> None:
    """A job queued across the upgrade has no bound (its engine's sizes were not asked at its submit):
    it holds nothing back, and the downgrade drops the column alone."""
    from orchestrator import quota

    upgrade(url, "0029")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            now = datetime.now(UTC).replace(tzinfo=None)
            conn.execute(text("INSERT INTO projects (id, name, policy, budget_period, created_at, storage_quota_mb) "
                              "VALUES ('prj_1', 'p', 'balanced', 'none', :now, 1)"), {"now": now})
            conn.execute(text("INSERT INTO jobs (id, project_id, stage, engine, status, params, progress_step, "
                              "progress_total, estimated, cache_hit, attempt, created_at) VALUES ('job_1', 'prj_1', "
                              "'ideation', 'lite', 'queued', '{}', 0, 0, 0, false, 0, :now)"), {"now": now})
        upgrade(url)
        db = Database(url)
        try:
            with db.session() as s:
                job, project = s.get(Job, "job_1"), s.get(Project, "prj_1")
                assert job is not None and job.reserved_bytes is None and project is not None
                assert quota.held(s, project, 0) == 0
        finally:
            db.dispose()
        with engine.connect() as conn:  # summed from the index alone
            [index] = [i for i in inspect(conn).get_indexes("jobs") if i["name"] == "ix_jobs_project_status"]
            assert index["column_names"] == ["project_id", "status", "id", "reserved_bytes"]
        command.downgrade(alembic_config(url), "0029")
        with engine.connect() as conn:
            assert "reserved_bytes" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
            [index] = [i for i in inspect(conn).get_indexes("jobs") if i["name"] == "ix_jobs_project_status"]
            assert index["column_names"] == ["project_id", "status", "id"]
            assert conn.execute(text("SELECT status FROM jobs")).scalar() == "queued"
        upgrade(url)
    finally:
        engine.dispose()


def test_an_asset_whose_file_stays_missing_is_warned_of_once_by_the_sweeps_of_a_process(
        make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Each asset sweep (at start, then hourly) warned again of the same assets stored before sizes
    were kept whose files are lost for good: a line an hour that buried new warnings. The sweeps of
    one process warn of each once, naming it; `orchestrator check` still lists them all."""
    services = Services.build(make_settings())
    try:
        def lost(asset_id: str) -> None:
            with services.db.transaction() as s:
                if s.get(Project, "prj_w") is None:
                    s.add(Project(id="prj_w", name="w", policy="balanced"))
                    s.flush()
                    s.add(Job(id="job_w", project_id="prj_w", stage="ideation", engine="lite", status="succeeded"))
                    s.flush()
                s.add(Asset(id=asset_id, project_id="prj_w", job_id="job_w", stage="ideation", engine="lite",
                            model="m", prompt="p", width=64, height=64, sha256=asset_id[-1] * 64))

        def warnings() -> list[str]:
            said = [r.getMessage() for r in caplog.records
                    if r.name == "orchestrator.quota" and r.levelname == "WARNING"]
            caplog.clear()
            return said

        lost("ast_w1")
        with caplog.at_level("WARNING", logger="orchestrator.quota"):
            services.measure_assets()
            services.measure_assets()  # the next sweep: nothing new
            first = warnings()
            assert len(first) == 1, first
            assert "1 live asset(s)" in first[0] and "ast_w1" in first[0], first
            lost("ast_w2")
            services.measure_assets()
            second = warnings()
            assert len(second) == 1 and "ast_w2" in second[0] and "ast_w1" not in second[0], second
            assert "2 live asset(s)" in second[0], second  # the count still says how many are lost
        with services.db.session() as s:
            assert s.exec(select(Asset.id).where(col(Asset.bytes).is_(None))).all() == ["ast_w1", "ast_w2"]
    finally:
        asyncio.run(services.aclose())
