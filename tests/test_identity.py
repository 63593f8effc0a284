"""A database and a data dir are bound on first use: a process whose data dir is not the store
the database's assets live in does not start."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from orchestrator.cli import main
from orchestrator.db import Database
from orchestrator.identity import MARKER, WrongStore, bind
from orchestrator.models import Asset, Job, Project
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore

SettingsFactory = Callable[..., Settings]


def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'shared.db'}")
    db.migrate()
    return db


def add_asset(db: Database, sha: str) -> None:
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced"))
        s.flush()
        s.add(Job(id="job_1", project_id="prj_1", stage="ideation", engine="lite", status="succeeded"))
        s.flush()
        s.add(Asset(id="ast_1", project_id="prj_1", job_id="job_1", index=0, stage="ideation", engine="lite",
                    model="m", prompt="p", seed=1, width=64, height=64, sha256=sha))


def test_the_first_process_binds_and_the_others_must_agree(tmp_path: Path) -> None:
    db = database(tmp_path)
    store = ArtifactStore(tmp_path / "host-a" / "assets")
    store_id = bind(db, store)
    assert (store.root / MARKER).read_text().strip() == store_id
    assert bind(db, ArtifactStore(tmp_path / "host-a" / "assets")) == store_id  # the same folder, again
    # Another host whose shared folder is not mounted: an empty data dir.
    elsewhere = ArtifactStore(tmp_path / "host-b" / "assets")
    with pytest.raises(WrongStore) as info:
        bind(db, elsewhere)
    assert "it has no .store-id" in str(info.value) and store_id in str(info.value)
    assert not (elsewhere.root / MARKER).exists()
    # Another install's store.
    other_db = database(tmp_path / "other")
    bind(other_db, elsewhere)
    with pytest.raises(WrongStore) as info:
        bind(db, elsewhere)
    assert "another database's store" in str(info.value)
    db.dispose()
    other_db.dispose()


def test_a_new_database_on_a_data_dir_full_of_another_s_images_is_refused(tmp_path: Path) -> None:
    first = database(tmp_path / "first")
    store = ArtifactStore(tmp_path / "data" / "assets")
    bind(first, store)
    add_asset(first, store.put(b"an image"))
    fresh = database(tmp_path / "fresh")  # a typo in ORCH_DATABASE_URL, a database made anew
    with pytest.raises(WrongStore) as info:
        bind(fresh, store)
    assert "holds another database's images" in str(info.value) and "this database has none" in str(info.value)
    # The same from before stores had ids (no marker): taken, the sweep removed its images.
    (store.root / MARKER).unlink()
    with pytest.raises(WrongStore) as info:
        bind(fresh, store)
    assert "holds another database's images (no .store-id" in str(info.value)
    assert not (store.root / MARKER).exists()
    # A store without images yet (a first start that failed before its commit) is simply taken.
    empty = ArtifactStore(tmp_path / "empty" / "assets")
    (empty.root / MARKER).write_text("0123abcd\n")
    assert bind(fresh, empty) == "0123abcd"
    first.dispose()
    fresh.dispose()


def test_a_database_from_before_store_ids_takes_the_data_dir_that_holds_its_images(tmp_path: Path) -> None:
    db = database(tmp_path)
    store = ArtifactStore(tmp_path / "api" / "assets")
    add_asset(db, store.put(b"an image"))  # made by a version that bound nothing
    # After the upgrade, a worker whose shared folder is not mounted happens to start first.
    unmounted = ArtifactStore(tmp_path / "worker" / "assets")
    with pytest.raises(WrongStore) as info:
        bind(db, unmounted)
    assert "holds none of this database's latest images" in str(info.value)
    assert not (unmounted.root / MARKER).exists()
    store_id = bind(db, store)
    assert (store.root / MARKER).read_text().strip() == store_id
    (store.root / MARKER).write_text("\n")  # emptied by hand
    with pytest.raises(WrongStore, match="is empty"):
        bind(db, store)
    db.dispose()


def test_serve_and_worker_refuse_a_data_dir_that_is_not_the_database_s(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = make_settings(database_url=url)
    asyncio.run(Services.build(first).aclose())  # the API server's start binds its data dir
    monkeypatch.setenv("ORCH_DATABASE_URL", url)
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "worker"))
    for command in ("worker", "serve", "demo"):
        assert main([command]) == 2
        err = capsys.readouterr().err
        assert err.startswith("orchestrator: ORCH_DATA_DIR: ") and "it has no .store-id" in err
        assert "Traceback" not in err
    with pytest.raises(WrongStore):
        Services.build(first.model_copy(update={"data_dir": tmp_path / "worker"}))


def test_check_tells_a_data_dir_that_is_not_the_database_s(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    settings = make_settings(database_url=url)
    asyncio.run(Services.build(settings).aclose())
    monkeypatch.setenv("ORCH_DATABASE_URL", url)
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    assert main(["check"]) == 0
    assert capsys.readouterr().out.endswith("ok\n")
    (settings.assets_dir / MARKER).write_text("another-store\n")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS: ORCH_DATA_DIR: " in out and "another database's store (another-store)" in out


def test_a_database_newer_than_this_version_is_one_line_not_a_traceback(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings()
    asyncio.run(Services.build(settings).aclose())
    db = Database(settings.resolved_database_url)
    with db.transaction() as s:
        s.execute(text("UPDATE alembic_version SET version_num = '9999'"))  # migrated by a newer version
    db.dispose()
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    for command in ("worker", "migrate", "check"):  # a setup to fix: exit status 2 from each alike
        assert main([command]) == 2, command
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot migrate the database: ") and "newer orchestrator" in err


def test_a_process_binding_meanwhile_is_not_taken_for_another_store(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes starting together on a new install: B looked for the marker (none yet), A
    bound (marker, then row), B then saw the row and refused its own store as having no marker."""
    from orchestrator import identity

    db_a, db_b = database(tmp_path), Database(f"sqlite:///{tmp_path / 'shared.db'}")
    store = ArtifactStore(tmp_path / "assets")
    real = identity.read_marker
    bound: list[str] = []

    def a_binds_meanwhile(marker: Path) -> str | None:
        found = real(marker)
        if not bound:
            monkeypatch.setattr(identity, "read_marker", real)
            bound.append(bind(db_a, ArtifactStore(tmp_path / "assets")))
        return found

    monkeypatch.setattr(identity, "read_marker", a_binds_meanwhile)
    assert bind(db_b, store) == bound[0]
    db_a.dispose()
    db_b.dispose()


def test_a_malformed_sha_does_not_stop_the_first_binding(tmp_path: Path) -> None:
    """A hand-edited row's sha raised NotFound out of `serve` and `check` (a traceback)."""
    db = database(tmp_path)
    add_asset(db, "not-a-sha256")
    store = ArtifactStore(tmp_path / "assets")
    assert (store.root / MARKER).exists() is False
    store_id = bind(db, store)
    assert (store.root / MARKER).read_text().strip() == store_id
    db.dispose()
