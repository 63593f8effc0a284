"""One last good version of each policy file for every process of a service: a process that
missed an edit, and then finds the file refused, serves the edit (`orchestrator.policy_versions`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from orchestrator.db import Database
from orchestrator.policy_versions import PolicyVersions
from policies import PolicyStore, Seen
from policies.loader import content_hash
from tests.credits.test_keep_local import STUDIO_CLOUD, STUDIO_LOCAL

BROKEN = STUDIO_CLOUD.replace("[[rules]]", "[[rules", 1)


def edit(file: Path, text: str) -> None:
    # Past the file system clock's tick (a few ms): the edits are told apart by their change time.
    time.sleep(0.05)
    file.write_text(text)


def stores(folder: Path, db: Database) -> tuple[PolicyStore, PolicyStore]:
    return (PolicyStore(folder, include_builtins=False, shared=PolicyVersions(db)),
            PolicyStore(folder, include_builtins=False, shared=PolicyVersions(db)))


def check_a_process_that_missed_an_edit_serves_it_while_the_file_is_refused(folder: Path, db: Database) -> None:
    file = folder / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    first, second = stores(folder, db)
    edit(file, STUDIO_LOCAL)
    assert first.reload() == []  # the second has not looked yet
    edit(file, BROKEN)
    for store in (second, first):
        assert [error.file for error in store.reload()] == [str(file)]
        served = store.get("studio")
        assert served.keeps_all_local and served.content_hash == content_hash(STUDIO_LOCAL.encode())
        assert served.source == str(file)
    # Mended: the file as it reads wins over every kept version.
    edit(file, STUDIO_CLOUD)
    for store in (first, second):
        assert store.reload() == [] and not store.get("studio").keeps_all_local


def test_a_process_that_missed_an_edit_serves_it_while_the_file_is_refused(tmp_path: Path, db: Database) -> None:
    check_a_process_that_missed_an_edit_serves_it_while_the_file_is_refused(tmp_path, db)


def test_an_older_read_told_later_does_not_replace_a_newer_one(tmp_path: Path, db: Database) -> None:
    versions = PolicyVersions(db)
    versions.remember([Seen("studio", "/p/studio.toml", b"new", 2_000)])
    versions.remember([Seen("studio", "/p/studio.toml", b"old", 1_000), Seen("other", "/p/other.toml", b"o", 5)])
    versions.remember([Seen("studio", "/p/studio.toml", b"same time", 2_000)])
    assert versions.recall(["studio", "other", "never"]) == {
        "studio": Seen("studio", "/p/studio.toml", b"new", 2_000), "other": Seen("other", "/p/other.toml", b"o", 5)}
    versions.remember([Seen("studio", "/p/studio.toml", None, 3_000)])  # removed
    assert versions.recall(["studio"])["studio"].content is None


def test_a_file_removed_and_then_refused_does_not_bring_back_the_version_before_its_removal(
        tmp_path: Path, db: Database) -> None:
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    first, second = stores(tmp_path, db)
    time.sleep(0.05)
    file.unlink()
    assert first.reload() == [] and "studio" not in first
    edit(file, BROKEN)
    assert len(second.reload()) == 1 and "studio" not in second  # as the first, which saw it go
    assert len(first.reload()) == 1 and "studio" not in first


def test_a_removed_override_of_a_built_in_leaves_the_built_in_while_its_new_file_is_refused(
        tmp_path: Path, db: Database) -> None:
    file = tmp_path / "balanced.toml"
    file.write_text(STUDIO_LOCAL.replace('name = "studio"', 'name = "balanced"'))
    first = PolicyStore(tmp_path, shared=PolicyVersions(db))
    second = PolicyStore(tmp_path, shared=PolicyVersions(db))
    assert second.get("balanced").source == str(file)
    time.sleep(0.05)
    file.unlink()
    assert first.reload() == [] and first.get("balanced").source == "builtin"
    edit(file, BROKEN.replace('name = "studio"', 'name = "balanced"'))
    assert len(second.reload()) == 1 and second.get("balanced").source == "builtin"


class Away:
    """The database, down."""

    def remember(self, seen: Sequence[Seen]) -> None:
        raise OperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))

    def recall(self, names: Sequence[str]) -> dict[str, Seen]:
        raise AssertionError("not asked once the database failed")


def test_with_the_database_away_a_process_serves_its_own_last_good_version(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    store = PolicyStore(tmp_path, include_builtins=False, shared=Away())
    edit(file, BROKEN)
    with caplog.at_level(logging.WARNING, logger="policies.loader"):
        assert len(store.reload()) == 1
    assert store.get("studio").content_hash == content_hash(STUDIO_LOCAL.encode())
    assert "could not be shared" in caplog.text and "connection refused" in caplog.text


def test_a_kept_version_this_release_cannot_load_leaves_the_process_its_own(
        tmp_path: Path, db: Database, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    store = PolicyStore(tmp_path, include_builtins=False, shared=PolicyVersions(db))
    # Read by another release, whose schema took a key this one refuses, after this process's read.
    PolicyVersions(db).remember([Seen("studio", str(file), STUDIO_LOCAL.encode() + b"\nfuture = 1\n",
                                      time.time_ns() + 10**9)])
    edit(file, BROKEN)
    with caplog.at_level(logging.WARNING, logger="policies.loader"):
        assert len(store.reload()) == 1
    assert store.get("studio").content_hash == content_hash(STUDIO_CLOUD.encode())
    assert "does not load here" in caplog.text
