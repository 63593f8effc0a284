"""The artifact store never names a path outside its root; writes are atomic and content-addressed."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
from PIL import Image

from orchestrator import runner
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.errors import ContentUnavailable, NotFound
from orchestrator.ids import new_id
from orchestrator.models import Asset
from orchestrator.server import serve_in_thread
from orchestrator.services import Services
from orchestrator.store import (
    FILE_MODE,
    RECENT_REMOVED,
    VERIFIED_SECONDS,
    ArtifactStore,
    Put,
    RecentContent,
    SweepRefused,
    encode_png,
    infotext,
    read_record,
)
from tests.api import create_project, run_draft, submit_draft, wait_for_job
from tests.conftest import SettingsFactory

GOOD = "ab" * 32


@pytest.mark.parametrize("name", [
    "../" + "a" * 61,
    "../../etc/passwd",
    "/etc/passwd",
    "ab/../../" + "0" * 55,
    "A" * 64,  # hex, but not the lower case the store writes
    "g" * 64,
    "a" * 63,
    "a" * 65,
    "a" * 64 + "\n",
    "a" * 64 + "/",
    "a" * 32 + "\x00" + "a" * 31,
    "",
    ".",
    "..",
])
def test_path_for_refuses_anything_but_a_sha256(tmp_path: Path, name: str) -> None:
    store = ArtifactStore(tmp_path / "assets")
    with pytest.raises(NotFound):
        store.path_for(name)
    with pytest.raises(ContentUnavailable) as info:  # a row's: its asset is there, naming no file
        store.get(name)
    assert info.value.details["reason"] == "malformed"


def test_path_for_stays_under_the_root(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "assets")
    path = store.path_for(GOOD)
    assert path == (tmp_path / "assets").resolve() / "ab" / f"{GOOD}.png"
    assert path.is_relative_to(store.root)


def test_a_shard_folder_linked_to_another_disk_is_part_of_the_store(tmp_path: Path) -> None:
    # Resolved through the link, its files were out of the root: refused as no such content.
    store = ArtifactStore(tmp_path / "assets")
    data = b"\x89PNG on another disk"
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "other-disk" / sha[:2]).mkdir(parents=True)
    (store.root / sha[:2]).symlink_to(tmp_path / "other-disk" / sha[:2], target_is_directory=True)
    assert store.put(data) == sha
    assert (tmp_path / "other-disk" / sha[:2] / f"{sha}.png").read_bytes() == data
    assert store.get(sha) == data


def test_put_get_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "assets")
    data = b"\x89PNG not really"
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.get(sha) == data
    assert store.put(data) == sha  # the same bytes twice: one file
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == [f"{sha}.png"]
    # Not mkstemp's 0600 (backups read it): as the process's umask makes any file.
    assert store.path_for(sha).stat().st_mode & 0o777 == FILE_MODE
    with pytest.raises(ContentUnavailable, match="missing from the store"):
        store.get("0" * 64)  # well-formed, but never stored
    store.path_for(sha).write_bytes(b"\x89PNG damaged")
    with pytest.raises(ContentUnavailable, match="damaged in the store") as damaged:
        store.get(sha)  # never handed out as the image it was
    assert damaged.value.details == {"sha256": sha, "reason": "damaged"}


def test_a_put_makes_the_rename_durable_before_it_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its row commits next: after a power loss the file must be under its name, not only its
    # bytes under the temporary one. A new shard's own name is made durable too.
    store = ArtifactStore(tmp_path / "assets")
    synced: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append("dir " + path.name if path.is_dir() else "file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        synced.append("rename")
        real_replace(src, dst)

    def link(src: Any, dst: Any) -> None:  # a new file is linked into place (`write_new`)
        synced.append("rename")
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    sha = store.put(b"first")
    assert synced == ["dir assets", "file", "rename", f"dir {sha[:2]}"]


def test_a_put_that_finds_its_name_just_linked_makes_that_name_durable_before_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two puts of the same bytes: the other links its file first, and has not fsynced the folder yet
    # when this one's link finds the name taken. This put returned on the file found, and its row
    # committed naming a name a power loss could still take away (a rename over it, before
    # `write_new`, fsynced the folder itself).
    store = ArtifactStore(tmp_path / "assets")
    data = b"stored twice at once"
    sha = hashlib.sha256(data).hexdigest()
    store.path_for(sha).parent.mkdir()
    done: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        done.append("dir " + path.name if path.is_dir() else "file")
        real_fsync(fd)

    def link(src: Any, dst: Any) -> None:
        if not Path(dst).exists():  # the other put, between its link and its folder's fsync
            other = Path(dst).with_name(".tmp-other.png")
            other.write_bytes(data)
            real_link(other, dst)
            other.unlink()
            done.append("the other's link")
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    assert store.put_file(data).made is None  # the other put's file
    assert f"dir {sha[:2]}" in done[done.index("the other's link"):]


def test_a_service_makes_its_store_s_shard_folders_ahead_so_a_first_image_pays_no_root_fsync(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # A new store's first image in each shard fsynced the root for the shard's name as well: most
    # of a young install's images paid three fsyncs rather than two.
    settings = make_settings()
    asyncio.run(Services.build(settings).aclose())
    shards = {f"{i:02x}" for i in range(256)}
    assert shards <= {p.name for p in settings.assets_dir.iterdir() if p.is_dir()}
    store = ArtifactStore(settings.assets_dir)
    assert store.make_shards() == 0  # a later start makes nothing, and fsyncs nothing
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append("dir " + path.name if path.is_dir() else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sha = store.put(b"first")
    assert synced == ["file", f"dir {sha[:2]}"]


def test_a_damaged_copy_of_the_same_bytes_is_written_again(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "assets")
    data = b"an image's bytes" * 64
    sha = store.put(data)
    path = store.path_for(sha)
    path.write_bytes(data[:100])  # cut short
    assert store.put(data) == sha  # the same draft made again: its row will name this file
    assert path.read_bytes() == data
    path.write_bytes(data[:-1] + b"?")  # rotted: the same size (was taken as the image)
    assert store.put(data) == sha
    assert store.get(sha) == data


def test_intact_hashes_a_file_again_only_once_its_stat_has_changed_or_its_word_is_old(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A submit of an identical paid request looks for its copy twice, once under the write lock:
    each look read and hashed every image of the earlier result while every writer waited."""
    store = ArtifactStore(tmp_path / "assets")
    data = b"an image's bytes" * 64
    sha = store.put(data)
    reads: list[str] = []
    get = store.get

    def counted(asked: str) -> bytes:
        reads.append(asked)
        return get(asked)

    monkeypatch.setattr(store, "get", counted)
    assert store.intact(sha) and store.intact(sha)
    assert len(reads) == 1  # unchanged since: the first look's word stands
    path = store.path_for(sha)
    before = path.stat()
    path.write_bytes(data[:-1] + b"?")  # rotted in place, the same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**6))  # whatever the clock's grain
    assert not store.intact(sha) and len(reads) == 2
    assert not store.intact(sha) and len(reads) == 3  # a damaged file's word is never kept
    assert store.put(data) == sha  # mended
    assert store.intact(sha) and len(reads) == 4
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + VERIFIED_SECONDS)
    assert store.intact(sha) and len(reads) == 5  # its word is too old
    path.unlink()
    assert not store.intact(sha) and len(reads) == 6


def test_an_unreadable_file_is_content_unavailable_and_the_same_bytes_mend_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any read error but "missing" escaped as a bug (500 internal_error) from content, promote and
    # polish; and the same image made again was pointed at the file it could not read.
    store = ArtifactStore(tmp_path / "assets")
    data = b"an image's bytes" * 64
    sha = store.put(data)
    path = store.path_for(sha)
    from orchestrator import store as store_module

    restored, read_bytes, open_regular = path.stat().st_ino, Path.read_bytes, store_module.open_regular

    def refused(self: Path) -> bytes:  # its owner's after a restore (the tests run as root)
        if self == path and self.stat().st_ino == restored:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    def refused_open(opened: Path, *, follow: bool = True) -> BinaryIO:
        if opened == path and opened.stat().st_ino == restored:
            raise PermissionError(13, "Permission denied", str(opened))
        return open_regular(opened, follow=follow)

    monkeypatch.setattr(Path, "read_bytes", refused)
    monkeypatch.setattr(store_module, "open_regular", refused_open)
    with pytest.raises(ContentUnavailable) as info:
        store.get(sha)
    assert info.value.details == {"sha256": sha, "reason": "unreadable"}
    assert "Permission denied" in info.value.message
    assert store.put(data) == sha
    assert store.get(sha) == data  # a new file in its place


def test_a_folder_where_the_file_should_be_is_content_unavailable(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "assets")
    sha = store.put(b"bytes")
    path = store.path_for(sha)
    path.unlink()
    path.mkdir()
    (path / "kept").write_bytes(b"an operator's")
    with pytest.raises(ContentUnavailable) as info:
        store.get(sha)
    assert info.value.details["reason"] == "unreadable"
    # The same image made again: stored in its place (every such job failed "could not be
    # stored"), the folder moved aside whole under a name no sweep takes for an image.
    assert store.put(b"bytes") == sha and store.get(sha) == b"bytes"
    [aside] = path.parent.glob(f".broken-{path.name}-*")
    assert (aside / "kept").read_bytes() == b"an operator's"


def test_a_fifo_where_the_file_should_be_is_content_unavailable_at_once(tmp_path: Path) -> None:
    # Put there by another user of the data dir's group, it held the request (and its thread) for ever.
    store = ArtifactStore(tmp_path / "assets")
    sha = store.put(b"bytes")
    path = store.path_for(sha)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ContentUnavailable) as info:
        store.get(sha)
    assert info.value.details["reason"] == "unreadable" and "not a regular file" in info.value.message
    # The same image made again (how the error says to mend it) replaces it, without waiting on it.
    assert store.put(b"bytes") == sha and store.get(sha) == b"bytes"


def test_a_temp_name_that_cannot_be_removed_stops_neither_the_temp_sweep_nor_the_service_s_start(
        make_settings: SettingsFactory) -> None:
    # A folder named as a temp file in a shard (or one the service may not remove) raised out of
    # `sweep_temp`: `Services.build` failed, and each hourly sweep stopped before the orphans.
    settings = make_settings()
    asyncio.run(Services.build(settings).aclose())  # the data dir's database and store, paired
    store = ArtifactStore(settings.assets_dir)
    sha = store.put(b"kept")
    old = time.time() - 7200
    names = [".tmp-a.png", ".tmp-b", ".tmp-c.png"]
    for name in names:
        path = store.root / sha[:2] / name
        path.mkdir() if name == ".tmp-b" else path.write_bytes(b"half")
        os.utime(path, (old, old))
    assert store.sweep_temp() == 2
    assert sorted(p.name for p in (store.root / sha[:2]).iterdir()) == [".tmp-b", f"{sha}.png"]
    crashed = store.root / sha[:2] / ".tmp-d.png"
    crashed.write_bytes(b"half")
    os.utime(crashed, (old, old))
    services = Services.build(settings)
    asyncio.run(services.aclose())
    assert not crashed.exists()


def test_sweep_temp_removes_leftovers_of_a_crash(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "assets")
    sha = store.put(b"kept")
    crashed = store.root / sha[:2] / ".tmp-abc.png"
    crashed.write_bytes(b"half")
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))
    # A fresh one may be another process's write in progress: it stays.
    writing = store.root / sha[:2] / ".tmp-def.png"
    writing.write_bytes(b"in progress")
    assert store.sweep_temp() == 1
    assert writing.exists()
    writing.unlink()
    assert store.get(sha) == b"kept"
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == [f"{sha}.png"]
    assert store.path_for(sha).stat().st_mode & 0o777 == FILE_MODE  # not mkstemp's 0600: backups read it


def age(path: Path, seconds: float = 7200.0) -> None:
    os.utime(path, (time.time() - seconds, time.time() - seconds))


class Rows:
    """What `referenced` answers: the shas some asset row names, and the batches it was asked."""

    def __init__(self, *named: str) -> None:
        self.named = set(named)
        self.asked: list[list[str]] = []

    def __call__(self, shas: list[str]) -> set[str]:
        self.asked.append(shas)
        return self.named & set(shas)


def test_sweep_orphans_removes_old_files_no_row_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orchestrator.store.ORPHAN_BATCH", 2)
    store = ArtifactStore(tmp_path / "assets")
    named, orphan, fresh = (store.put(data) for data in (b"named", b"orphan", b"fresh orphan"))
    for sha in (named, orphan):
        age(store.path_for(sha))
    # Not the store's: a temp file (sweep_temp's) and what an operator put in a shard folder.
    other = store.root / orphan[:2] / "notes.png"
    other.write_bytes(b"mine")
    temp = store.root / orphan[:2] / f".tmp-{orphan}.png"
    temp.write_bytes(b"half")
    for path in (other, temp):
        age(path)
    rows = Rows(named)
    assert store.sweep_orphans(rows) == 1
    assert not store.path_for(orphan).exists()
    assert store.get(named) == b"named" and store.get(fresh) == b"fresh orphan"
    assert other.exists() and temp.exists()
    assert sorted(sha for batch in rows.asked for sha in batch) == sorted([named, orphan])  # the fresh one: not asked
    assert all(len(batch) <= 2 for batch in rows.asked)
    assert not list(store.root.rglob(".gc-*"))


def test_an_orphan_made_again_is_fresh_and_kept(tmp_path: Path) -> None:
    """A canceled job's bytes, made again by the same request and seed: the new row will name the
    old file, so storing them again makes it young, as writing it would."""
    store = ArtifactStore(tmp_path / "assets")
    sha = store.put(b"again")
    age(store.path_for(sha))
    assert store.put(b"again") == sha
    assert store.sweep_orphans(Rows()) == 0
    assert store.get(sha) == b"again"


def with_a_named_file(store: ArtifactStore) -> Rows:
    """An old file some row names: without one, the sweep distrusts the database (below)."""
    named = store.put(b"named")
    age(store.path_for(named))
    return Rows(named)


def test_a_put_during_the_sweep_never_loses_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep asked the rows before a finishing job stored its bytes and committed its row:
    whichever side of the sweep's rename the put lands on, the file is there for the row."""
    store = ArtifactStore(tmp_path / "assets")
    rows = with_a_named_file(store)
    sha = store.put(b"contested")
    age(store.path_for(sha))

    def put_before_the_rename(shas: list[str]) -> set[str]:
        store.put(b"contested")  # the job stores them right after the sweep's question
        return rows(shas)

    assert store.sweep_orphans(put_before_the_rename) == 0
    assert store.get(sha) == b"contested"

    age(store.path_for(sha))
    real_rename = os.rename

    def put_after_the_rename(src: str | Path, dst: str | Path) -> None:
        real_rename(src, dst)
        store.put(b"contested")  # finds no file: writes its own

    monkeypatch.setattr("orchestrator.store.os.rename", put_after_the_rename)
    assert store.sweep_orphans(rows) == 1  # the old copy, renamed aside
    assert store.get(sha) == b"contested"
    assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == sorted(
        f"{name}.png" for name in (sha, *rows.named))


def test_two_sweeps_and_a_put_never_lose_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes sweep the same old orphan. The first sets it aside and finds it old; the job
    stores the same bytes again (a new file at home); the second, which listed the old file, sets
    the new one aside too, and only then looks at its age, after the first removed its own aside.
    Each sweep's aside name is its own: the first removes the old file, the second puts back the new."""
    first, second = ArtifactStore(tmp_path / "assets"), ArtifactStore(tmp_path / "assets")
    rows = with_a_named_file(first)
    sha = first.put(b"contested")
    home = first.path_for(sha)
    age(home)
    cutoff = time.time() - 3600
    second_renamed, first_removed = threading.Event(), threading.Event()
    real_rename, real_unlink = os.rename, Path.unlink
    results: list[int] = []

    def rename(src: str | Path, dst: str | Path) -> None:
        real_rename(src, dst)
        if threading.current_thread().name == "second":
            second_renamed.set()
            assert first_removed.wait(10)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.startswith(".gc-") and threading.current_thread().name != "second" and not results:
            results.append(-1)
            first.put(b"contested")  # the job: no file at home, so it writes one
            sweeper = threading.Thread(target=lambda: results.append(second._set_aside(home, keep=False,
                                                                                      cutoff=cutoff)),
                                       name="second")
            sweeper.start()
            assert second_renamed.wait(10)
            real_unlink(self, missing_ok=missing_ok)
            first_removed.set()
            sweeper.join(10)
            return
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr("orchestrator.store.os.rename", rename)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert first.sweep_orphans(rows) == 1
    assert results == [-1, 0]  # the second sweep removed nothing
    assert first.get(sha) == b"contested"
    assert not list(first.root.rglob(".gc-*"))


def test_a_sweep_that_cannot_settle_a_file_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path / "assets")
    rows = with_a_named_file(store)
    stuck, freed = store.put(b"stuck"), store.put(b"freed")
    for sha in (stuck, freed):
        age(store.path_for(sha))
    # A folder named like a file is not the store's.
    folder = store.root / stuck[:2] / f"{'0' * 62}{stuck[:2]}.png"
    folder.mkdir()
    real_rename = os.rename

    def refused(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == f"{stuck}.png":
            raise PermissionError(13, "Permission denied")
        real_rename(src, dst)

    monkeypatch.setattr("orchestrator.store.os.rename", refused)
    assert store.sweep_orphans(rows) == 1
    assert store.get(stuck) == b"stuck" and not store.path_for(freed).exists() and folder.is_dir()


def test_a_put_that_cannot_refresh_the_file_writes_it_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's file cannot have its time set: a fresh copy takes its place, so the sweep
    sees it young all the same; where nothing can be written either, the file is used as it is."""
    store = ArtifactStore(tmp_path / "assets")
    sha = store.put(b"theirs")
    age(store.path_for(sha))

    real_utime = os.utime

    def not_ours(path: Path, *args: Any) -> None:
        if not args:  # "now", as put asks: only the owner may
            raise PermissionError(1, "Operation not permitted")
        real_utime(path, *args)

    monkeypatch.setattr("orchestrator.store.os.utime", not_ours)
    assert store.put(b"theirs") == sha
    assert store.path_for(sha).stat().st_mtime > time.time() - 60
    age(store.path_for(sha))

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("orchestrator.store.tempfile.mkstemp", read_only)
    assert store.put(b"theirs") == sha
    with pytest.raises(OSError, match="Read-only"):
        store.put(b"not there yet")


@pytest.mark.parametrize(("named", "orphans"), [(0, 1), (1, 21)])
def test_a_database_that_names_too_few_files_removes_nothing(tmp_path: Path, named: int, orphans: int) -> None:
    """A database that is not this store's (a fresh one, another install's) names none of its
    files, or few: the sweep refuses rather than take them all."""
    store = ArtifactStore(tmp_path / "assets")
    shas = [store.put(f"image {i}".encode()) for i in range(named + orphans)]
    for sha in shas:
        age(store.path_for(sha))
    with pytest.raises(SweepRefused, match=f"{orphans} of the {named + orphans} files") as refused:
        store.sweep_orphans(Rows(*shas[:named]))
    assert all(store.path_for(sha).exists() for sha in shas)
    # A crash's leftovers stop it too: the log says how to go on.
    assert "`orchestrator check` lists them, to move out of the store once you are sure" in str(refused.value)


def test_a_young_install_s_old_orphan_is_swept(tmp_path: Path) -> None:
    # Its rows name only files younger than the grace: the guard refused (an ERROR, nothing removed).
    store = ArtifactStore(tmp_path / "assets")
    named, orphan = store.put(b"a fresh draft"), store.put(b"a canceled job's image")
    age(store.path_for(orphan))
    assert store.sweep_orphans(Rows(named)) == 1
    assert not store.path_for(orphan).exists() and store.get(named) == b"a fresh draft"
    other = store.put(b"another orphan")
    age(store.path_for(other))
    with pytest.raises(SweepRefused):  # a database naming none of the files, young or old, still stops it
        store.sweep_orphans(Rows())


def test_a_dead_sweeps_leftover_is_settled(tmp_path: Path) -> None:
    """A sweep that died between its rename and its verdict left `.gc-` files: the next one puts
    back those a row names and removes the others."""
    store = ArtifactStore(tmp_path / "assets")
    named, orphan = store.put(b"named"), store.put(b"orphan")
    for sha in (named, orphan):
        path = store.path_for(sha)
        aside = path.with_name(f".gc-{sha}-0a1b2c3d.png")
        os.rename(path, aside)
        age(aside)
    # Served meanwhile, from where it lies: it was "missing from the store: restore it from a backup".
    assert store.get(named) == b"named"
    with pytest.raises(ContentUnavailable, match="damaged"):
        store.path_for(named).with_name(f".gc-{named}-0a1b2c3d.png").write_bytes(b"not it")
        store.get(named)
    # A damaged copy beside a sound one (two sweeps that died) does not hide it, though read first.
    store.path_for(named).with_name(f".gc-{named}-00000000.png").write_bytes(b"not it")
    store.path_for(named).with_name(f".gc-{named}-ffffffff.png").write_bytes(b"named")
    listed = Path.glob
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "glob", lambda self, pattern: iter(sorted(listed(self, pattern))))
        assert store.get(named) == b"named"
        # Put back, the damaged one, settled after the sound one, no longer replaces it.
        patch.setattr(Path, "glob", lambda self, pattern: iter(sorted(listed(self, pattern), reverse=True)))
        assert store.sweep_orphans(Rows(named)) == 1
    assert store.get(named) == b"named"
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == [f"{named}.png"]


@pytest.mark.parametrize("up_to", [None, 4], ids=["whole", "opened"])
def test_a_file_put_back_home_while_its_reader_looked_aside_is_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      up_to: int | None) -> None:
    """A named file set aside (a dead sweep's leftover, or one a sweep or `discard` is judging) is
    put back home between its reader's failed open and its look aside: the reader found it in
    neither place and a live asset's content was a 500 "missing from the store: restore it from a
    backup", though the file was whole at home."""
    store = ArtifactStore(tmp_path / "assets")
    named = store.put(b"a live asset's image")
    home = store.path_for(named)
    os.rename(home, home.with_name(f".gc-{named}-0a1b2c3d.png"))
    look_aside = ArtifactStore._set_aside_copy
    swept: list[int] = []

    def settled_first(path: Path) -> bytes | None:
        swept.append(store.sweep_orphans(Rows(named), older_than=0))  # named: put back home
        return look_aside(path)

    monkeypatch.setattr(ArtifactStore, "_set_aside_copy", staticmethod(settled_first))
    found = store.get_or_open(named, up_to=up_to)
    if not isinstance(found, bytes):
        with found:
            found = found.read()
    assert found == b"a live asset's image" and swept == [0] and home.is_file()
    home.unlink()  # missing in both places: said as before
    with pytest.raises(ContentUnavailable, match="missing from the store") as missing:
        store.get_or_open(named, up_to=up_to)
    assert missing.value.details == {"sha256": named, "reason": "missing"}


def test_a_stopped_sweep_ends_early_and_leaves_nothing_set_aside(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop of the service sets `stop`: the sweep, in a thread no cancel reaches, ends before the
    next file or batch (a stop waited out a whole store's walk), and what it set aside is settled."""
    monkeypatch.setattr("orchestrator.store.ORPHAN_BATCH", 2)
    store = ArtifactStore(tmp_path / "assets")
    rows = with_a_named_file(store)
    # Named by deleted assets only: however many, no sign of another database.
    let_go = [store.put(f"deleted {n}".encode()) for n in range(6)]
    for sha in let_go:
        age(store.path_for(sha))
    # A dead sweep's leftover of a named file: served from aside until some sweep puts it back.
    leftover = store.put(b"named, set aside")
    rows.named.add(leftover)
    aside = store.path_for(leftover).with_name(f".gc-{leftover}-0a1b2c3d.png")
    os.rename(store.path_for(leftover), aside)
    age(aside)
    every = [*rows.named, *let_go]

    def deleted(shas: list[str]) -> set[str]:
        return set(let_go) & set(shas)

    def files() -> list[str]:
        return sorted(p.name for p in store.root.rglob("*") if p.is_file())

    stop = threading.Event()
    stop.set()
    assert store.sweep_orphans(rows, deleted=deleted, stop=stop) == 0
    assert rows.asked == []  # ended in the listing
    assert files() == sorted([aside.name, *(f"{sha}.png" for sha in every if sha != leftover)])

    stop.clear()

    def stop_after_one_batch(shas: list[str]) -> set[str]:
        stop.set()
        return rows(shas)

    assert store.sweep_orphans(stop_after_one_batch, deleted=deleted, stop=stop) == 0
    assert len(rows.asked) == 1
    assert aside.exists() and all(store.path_for(sha).exists() for sha in let_go)

    stop.clear()
    real_rename = os.rename
    renamed: list[str] = []

    def stop_during_one(src: str | Path, dst: str | Path) -> None:
        real_rename(src, dst)
        if Path(dst).name.startswith(".gc-"):  # one file set aside, then the stop
            renamed.append(Path(src).name)
            stop.set()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("orchestrator.store.os.rename", stop_during_one)
        assert store.sweep_orphans(rows, deleted=deleted, stop=stop) == 1
    # The file it had set aside is removed, as its rules say; the leftover is back; the rest stays.
    assert len(renamed) == 1 and renamed[0].removesuffix(".png") in let_go
    kept = [sha for sha in let_go if f"{sha}.png" not in renamed]
    assert files() == sorted(f"{sha}.png" for sha in [*rows.named, *kept])
    assert store.get(leftover) == b"named, set aside"
    # The next sweep, not stopped, takes the rest.
    assert store.sweep_orphans(rows, deleted=deleted) == len(kept)
    assert files() == sorted(f"{sha}.png" for sha in rows.named)


def test_a_service_sweeps_the_files_a_crash_left_of_a_job_canceled_while_storing(make_settings: SettingsFactory,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(sweep_interval=0.1)
    real_put = ArtifactStore.put_file
    canceled: list[str] = []

    once = threading.Lock()  # the images are stored side by side

    def cancel_then_put(self: ArtifactStore, data: bytes) -> Put:
        with once:
            if not canceled:
                running = api.get("/v1/jobs", params={"project_id": project, "status": "running"}).json()["items"]
                canceled.append(running[0]["id"])
                assert api.post(f"/v1/jobs/{running[0]['id']}/cancel").status_code == 202
        return real_put(self, data)

    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as api:
        project = create_project(api)["id"]
        kept = run_draft(api, project, seed=1)["assets"][0]
        kept_sha = api.get(f"/v1/assets/{kept}").json()["sha256"]
        monkeypatch.setattr(ArtifactStore, "put_file", cancel_then_put)
        # As a process that died before its job discarded the files it wrote (see the next test).
        real_discard = ArtifactStore.discard
        monkeypatch.setattr(ArtifactStore, "discard", lambda *_args: False)
        job = submit_draft(api, project, n=2, seed=7)
        assert wait_for_job(api, job["id"])["status"] == "canceled"
        monkeypatch.setattr(ArtifactStore, "put_file", real_put)
        monkeypatch.setattr(ArtifactStore, "discard", real_discard)

    files = list(settings.assets_dir.glob("*/*.png"))
    orphans = [path for path in files if path.stem != kept_sha]
    assert canceled == [job["id"]] and orphans, "the canceled job stored no file"
    for path in files:
        age(path)
    # At its first sweep after start, the next service removes them; the named file stays.
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as api:
        deadline = time.monotonic() + 30
        while any(path.exists() for path in orphans):
            assert time.monotonic() < deadline, "the orphan files are still there"
            time.sleep(0.05)
        content = api.get(f"/v1/assets/{kept}/content")
        assert content.status_code == 200
        assert hashlib.sha256(content.content).hexdigest() == kept_sha


def test_a_running_service_sweeps_old_temp_files(make_settings: SettingsFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Left by a crash of another process (a worker) while this one runs, or just before it started.
    monkeypatch.setattr("orchestrator.services.ORPHAN_SWEEP_SECONDS", 0.1)
    settings = make_settings()
    with serve_in_thread(settings):
        shard = settings.assets_dir / "ab"
        shard.mkdir(parents=True, exist_ok=True)
        crashed, writing = shard / ".tmp-crashed.png", shard / ".tmp-writing.png"
        crashed.write_bytes(b"half")
        writing.write_bytes(b"in progress")
        age(crashed)
        deadline = time.monotonic() + 30
        while crashed.exists():
            assert time.monotonic() < deadline, "the old temp file is still there"
            time.sleep(0.05)
        assert writing.exists()  # a write in progress, as far as anyone can tell


def test_png_carries_infotext_and_record() -> None:
    record = {"prompt": "a fox", "negative_prompt": "blur", "seed": 7, "steps": 4, "guidance_scale": 0.0,
              "sampler": "EulerDiscreteScheduler", "width": 8, "height": 8, "model": "m", "engine": "lite",
              "stage": "ideation", "parent_id": None}
    data = encode_png(Image.new("RGB", (8, 8), (1, 2, 3)), record)
    assert read_record(data) == record
    with Image.open(io.BytesIO(data)) as img:
        assert img.info["parameters"] == infotext(record)
        assert json.loads(img.info["orchestrator"]) == record
    assert infotext(record).splitlines() == [
        "a fox",
        "Negative prompt: blur",
        "Steps: 4, Sampler: Euler, CFG scale: 0.0, Seed: 7, Size: 8x8, Model: m, Engine: lite, "
        "Stage: ideation",
    ]  # the sampler as AUTOMATIC1111 names it (its class name was written), the record keeps the class
    # Deterministic: the same image and record encode to the same bytes.
    assert encode_png(Image.new("RGB", (8, 8), (1, 2, 3)), dict(record)) == data


def test_a_plugin_s_numpy_and_nan_values_are_stored_as_the_database_keeps_them() -> None:
    # A numpy float failed the job's store after its images were made (and billed); a NaN made a
    # chunk no strict JSON reader takes ("guidance_scale":NaN) and an infotext of "CFG scale: nan".
    import numpy as np

    record: dict[str, Any] = {"prompt": "a fox", "seed": np.int64(7), "guidance_scale": np.float32(2.5),
                              "strength": float("nan"), "width": 8, "height": 8, "model": "m", "engine": "plugin"}
    data = encode_png(Image.new("RGB", (8, 8)), record)
    with Image.open(io.BytesIO(data)) as img:
        chunk, parameters = img.info["orchestrator"], img.info["parameters"]
    assert json.loads(chunk, parse_constant=lambda c: pytest.fail(f"{c} in the record")) == {
        "prompt": "a fox", "seed": 7, "guidance_scale": 2.5, "strength": None, "width": 8, "height": 8,
        "model": "m", "engine": "plugin"}
    assert "CFG scale: 2.5" in parameters and "nan" not in parameters


@pytest.mark.parametrize(("mode", "value", "stored"), [
    ("I;16", 32896, (128, 128, 128)),  # mid grey of a 16-bit image: was stored white (clipped at 255)
    ("I", 65535, (255, 255, 255)),
])
def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped(mode: str, value: int,
                                                              stored: tuple[int, int, int]) -> None:
    data = encode_png(Image.new(mode, (4, 4), value), {"prompt": "p", "width": 4, "height": 4})
    with Image.open(io.BytesIO(data)) as img:
        assert (img.mode, img.getpixel((0, 0))) == ("RGB", stored)


def test_a_palette_s_transparency_is_kept_as_alpha() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    with Image.open(io.BytesIO(encode_png(palette, {"prompt": "p"}))) as img:
        assert img.mode == "RGBA"
        assert (img.getpixel((0, 0)), img.getpixel((1, 0))) == ((255, 0, 0, 255), (0, 0, 255, 0))


def test_a_prompt_cannot_write_lines_of_its_own_into_the_infotext() -> None:
    prompt = "cat\nNegative prompt: dog\r\nSteps: 1, Seed: 666"
    record = {"prompt": prompt, "negative_prompt": "blur\nmore", "seed": 7, "width": 8, "height": 8}
    lines = infotext(record).splitlines()
    assert lines == ["cat Negative prompt: dog Steps: 1, Seed: 666", "Negative prompt: blur more",
                     "Seed: 7, Size: 8x8"]
    assert read_record(encode_png(Image.new("RGB", (8, 8)), record))["prompt"] == prompt  # as sent


def read_as_a1111_does(parameters: str) -> tuple[str, str]:
    """The prompt and negative prompt, as AUTOMATIC1111's infotext reader takes them (each line
    stripped; a line starting `Negative prompt:` begins the negative; the last line holds the rest)."""
    prompt, negative, in_negative = "", "", False
    for line in parameters.strip().split("\n")[:-1]:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    return prompt, negative


@pytest.mark.parametrize("prompt", ["Negative prompt: ugly, blurry", "  Negative prompt: ugly", "a fox"])
def test_a_prompt_that_begins_as_a_negative_prompt_reads_back_as_the_prompt(prompt: str) -> None:
    record = {"prompt": prompt, "negative_prompt": "blur", "seed": 7, "width": 8, "height": 8}
    read, negative = read_as_a1111_does(infotext(record))
    assert (read.removeprefix("\u200b").strip(), negative) == (prompt.strip(), "blur")
    assert read_record(encode_png(Image.new("RGB", (8, 8)), record))["prompt"] == prompt  # as sent


@pytest.mark.parametrize(("settings", "told"), [
    ({"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}, "Sampler: DPM++ 2M, Seed"),
    ({"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "Sampler: DPM++ 2M SDE, Schedule type: Karras"),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_exponential_sigmas": True},
     "Sampler: DPM++ 3M SDE, Schedule type: Exponential"),
    ({"use_beta_sigmas": True}, "Sampler: DPM++ 2M, Schedule type: Beta"),
])
def test_a_scheduler_s_settings_name_the_sampler_and_schedule_as_a1111_does(settings: dict[str, Any],
                                                                             told: str) -> None:
    # A fine-tune's SDE scheduler with Karras sigmas was told as plain "DPM++ 2M": run again from the
    # infotext, it made another image.
    record = {"prompt": "a fox", "seed": 7, "width": 8, "height": 8, "model": "m", "engine": "lite",
              "sampler": "DPMSolverMultistepScheduler", "sampler_settings": settings}
    assert told in infotext(record).splitlines()[-1]
    assert read_record(encode_png(Image.new("RGB", (8, 8)), record))["sampler_settings"] == settings


def test_png_metadata_quotes_separators_and_names_no_server_path() -> None:
    # A1111's readers split on ", " and ": ": a model named `my,sd` lost its second half, and the
    # server's folder went out with every image.
    record = {"prompt": "a fox", "seed": 7, "width": 8, "height": 8, "model": "/srv/models/my,sd",
              "sampler": "DPM++ 2M: Karras", "engine": "lite", "stage": "ideation"}
    data = encode_png(Image.new("RGB", (8, 8)), record)
    assert read_record(data)["model"] == "my,sd"
    with Image.open(io.BytesIO(data)) as img:
        settings = img.info["parameters"].splitlines()[-1]
    assert settings == ('Sampler: "DPM++ 2M: Karras", Seed: 7, Size: 8x8, Model: "my,sd", Engine: lite, '
                        "Stage: ideation")
    assert "/srv" not in data.decode("latin-1")
    for kept in ("stabilityai/sd-turbo", "builtin:tiny-sd"):  # Hub ids and built-ins are names already
        assert read_record(encode_png(Image.new("RGB", (8, 8)), {**record, "model": kept}))["model"] == kept
    # A Hugging Face cache snapshot is named by its repository, not by its hash.
    cached = "/root/.cache/huggingface/hub/models--stabilityai--sd-turbo/snapshots/b261bac6fd2cf515557d5d0707"
    named = read_record(encode_png(Image.new("RGB", (8, 8)), {**record, "model": cached}))["model"]
    assert named == "stabilityai/sd-turbo"


def test_recent_content_is_bounded_and_drops_the_least_recently_used() -> None:
    recent = RecentContent(max_bytes=10)
    recent.add("ast_a", "a" * 64, b"aaaa")
    recent.add("ast_b", "b" * 64, b"bbbb")
    assert recent.get("ast_a") == ("a" * 64, b"aaaa")  # now the most recently used
    recent.add("ast_c", "c" * 64, b"cccc")  # 12 bytes: the least recently used (b) goes
    assert recent.get("ast_b") is None
    assert recent.get("ast_a") is not None and recent.get("ast_c") is not None
    assert recent.size == 8
    recent.add("ast_a", "a" * 64, b"aaaa")  # the same asset again is counted once
    assert recent.size == 8


def test_recent_content_ages_out_and_keeps_deleted_assets_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Served from memory without the database, a deleted asset was served for as long as it
    stayed: by another process (which never hears of the delete) or this one (a read that found
    its row before the delete put it back)."""
    import orchestrator.store as store_module

    now = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: now[0])  # type: ignore[attr-defined]
    recent = RecentContent(max_bytes=100)
    recent.add("ast_a", "a" * 64, b"aaaa")
    now[0] += store_module.RECENT_SECONDS + 1
    assert recent.get("ast_a") is None and recent.size == 0  # read again through the database
    recent.add("ast_b", "b" * 64, b"bbbb")
    recent.remove("ast_b")
    recent.add("ast_b", "b" * 64, b"bbbb")  # the late read's bytes
    assert recent.get("ast_b") is None and recent.size == 0


def test_recent_content_past_its_time_leaves_memory_as_new_content_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.store as store_module

    now = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: now[0])  # type: ignore[attr-defined]
    recent = RecentContent(max_bytes=100)
    recent.add("ast_a", "a" * 64, b"aaaa")
    recent.add("ast_b", "b" * 64, b"bbbb")
    now[0] += store_module.RECENT_SECONDS + 1  # never read again: out as the next image comes in
    recent.add("ast_c", "c" * 64, b"cc")
    assert recent.size == 2 and recent.get("ast_c") == ("c" * 64, b"cc")


def test_recent_content_skips_what_could_never_fit() -> None:
    recent = RecentContent(max_bytes=10)
    recent.add("ast_a", "a" * 64, b"aaaa")
    recent.add("ast_big", "b" * 64, b"x" * 11)
    assert recent.get("ast_big") is None
    assert recent.get("ast_a") == ("a" * 64, b"aaaa")  # not evicted for nothing


def test_recent_content_forgets_the_held_ones_of_a_bulk_delete_for_good() -> None:
    # Draft retention's batches: those held are out and never added back (a read that found their
    # rows before the delete); only those are marked, so 100,000 drafts keep a DELETE's mark.
    recent = RecentContent(max_bytes=100)
    recent.add("ast_a", "a" * 64, b"aaaa")
    recent.add("ast_b", "b" * 64, b"bb")
    recent.remove("ast_deleted")
    recent.forget(["ast_a", *(f"ast_n{i}" for i in range(RECENT_REMOVED + 1))])
    assert recent.get("ast_a") is None and recent.size == 2 and recent.get("ast_b") == ("b" * 64, b"bb")
    recent.add("ast_a", "a" * 64, b"aaaa")
    recent.add("ast_deleted", "d" * 64, b"d")
    assert recent.get("ast_a") is None and recent.get("ast_deleted") is None
    recent.add("ast_n1", "e" * 64, b"e")  # never held: not marked
    assert recent.get("ast_n1") == ("e" * 64, b"e")


@pytest.mark.parametrize(("model", "named"), [
    ("stabilityai/sd-turbo", "stabilityai/sd-turbo"),         # a Hub id is kept whole
    ("/srv/models/acme-nda/hifi", "hifi"),
    ("models/acme-nda-client/hifi", "hifi"),                   # relative, more than org/name
    ("./hifi", "hifi"),
    ("C:\\models\\acme-nda\\hifi.safetensors", "hifi.safetensors"),
    ("/cache/hub/models--stabilityai--sdxl-turbo/snapshots/0a1b", "stabilityai/sdxl-turbo"),
])
def test_models_are_named_without_the_server_s_path(model: str, named: str) -> None:
    from orchestrator.store import model_name

    assert model_name(model) == named


@pytest.mark.parametrize(("model", "engine", "named"), [
    # A hosted provider's id of three parts was taken for a relative path: fal's model read `edit`.
    ("fal-ai/nano-banana-2/edit", "fal", "fal-ai/nano-banana-2/edit"),
    ("fal-ai/nano-banana-2/edit", "local-hifi", "edit"),
    ("/srv/acme/wf.json", "fal", "wf.json"),
])
def test_a_hosted_provider_s_model_is_its_id_whatever_its_parts(model: str, engine: str, named: str) -> None:
    from orchestrator.store import hide_paths, model_name

    assert model_name(model, engine) == named
    assert hide_paths(f"model '{model}' is not served", engine) == f"model '{named}' is not served"


def test_a_two_part_relative_folder_that_is_there_is_named_as_a_folder(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.store import model_name

    (tmp_path / "acme" / "hifi-v3").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_name("acme/hifi-v3") == "hifi-v3"  # the loader takes the folder, not a Hub id


@pytest.mark.parametrize(("text", "told"), [
    ("the workflow file '/srv/studio acme-nda/wf/flow.json' has no {{image}} placeholder",
     "the workflow file 'flow.json' has no {{image}} placeholder"),
    ("model 'models/acme-nda/hifi' is neither an existing file or folder",
     "model 'hifi' is neither an existing file or folder"),
    ("the engine's model '/srv/acme x/hifi' isn't there", "the engine's model 'hifi' isn't there"),
    ("cannot read /srv/acme/flow.json: denied", "cannot read flow.json: denied"),
    ("export it with 'Export (API)'", "export it with 'Export (API)'"),
    # A quote inside the path once ended the quoted value there, and the folders went out.
    ("model '/srv/o'brien-client/hifi' is a path to nothing", "model 'hifi' is a path to nothing"),
    ("model '/srv/acme client's/hifi' and 'b' differ", "model 'hifi' and 'b' differ"),
])
def test_messages_clients_read_name_files_not_paths(text: str, told: str) -> None:
    from orchestrator.store import hide_paths

    assert hide_paths(text) == told


def test_assets_listed_oldest_first_say_so_by_their_times(make_settings: SettingsFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A client syncing on a `created_at` watermark skipped an asset: stamped when its rows were
    built, before the final write waited for the lock, it listed after one another worker
    committed meanwhile, yet said it was made first."""
    settings = make_settings()
    with serve_in_thread(settings) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        project = create_project(client)["id"]
        other = run_draft(client, project, n=1, seed=1, width=64, height=64, steps=1)["assets"][0]
        db = Database(settings.resolved_database_url)

        def another_worker_commits_first() -> Any:
            # Called by `_succeed` once the rows are built, before its transaction.
            with db.transaction() as s:
                source = s.get(Asset, other)
                assert source is not None
                s.add(Asset(**{**source.model_dump(), "id": new_id("ast"), "created_at": utcnow()}))
            return utcnow()

        monkeypatch.setattr(runner, "utcnow", another_worker_commits_first)
        run_draft(client, project, n=1, seed=2, width=64, height=64, steps=1)
        items = client.get(f"/v1/projects/{project}/assets").json()["items"]
        db.dispose()
    assert len(items) == 3
    times = [item["created_at"] for item in items]
    assert times == sorted(times), times


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_stored_files_take_the_mode_the_operator_s_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    # A fixed 0644 let every account of a shared machine read every project's images, whatever
    # umask the operator set for the service.
    import subprocess
    import sys

    code = (f"import os, pathlib; os.umask({umask}); from orchestrator.store import ArtifactStore; "
            f"s = ArtifactStore(pathlib.Path({str(tmp_path / 'assets')!r})); "
            "print(oct(s.path_for(s.put(b'x')).stat().st_mode & 0o777))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == oct(mode)


def test_discard_removes_only_the_file_its_put_made_and_no_row_names(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path / "assets")
    put = store.put_file(b"a canceled job's image")
    assert put.made is not None and store.discard(put, lambda _: False)
    assert not store.path_for(put.sha256).exists()
    # Named by a row (a file made again for an older asset): kept.
    put = store.put_file(b"an older asset's image")
    assert not store.discard(put, lambda named: named == put.sha256)
    assert store.get(put.sha256) == b"an older asset's image"
    # Another job's put of the same bytes found it (its row not committed yet): touched, later
    # whatever the clock's grain, it is kept; that put made nothing of its own to discard.
    again = store.put_file(b"an older asset's image")
    assert again.made is None and not store.discard(again, lambda _: False)
    assert not store.discard(put, lambda _: False) and store.path_for(put.sha256).exists()
    # The same within the clock's grain (a touch that left the time as the write set it).
    real_utime = os.utime
    monkeypatch.setattr("orchestrator.store.os.utime",
                        lambda path, *args, **kwargs: real_utime(path, *args, **kwargs) if args or kwargs else None)
    put = store.put_file(b"touched in the same tick")
    assert store.put_file(b"touched in the same tick").made is None
    assert not store.discard(put, lambda _: False) and store.path_for(put.sha256).exists()
    # A filesystem that keeps whole seconds takes no time a nanosecond later: written anew instead.
    monkeypatch.setattr("orchestrator.store.os.utime", lambda *args, **kwargs: None)
    put = store.put_file(b"on a filesystem of whole seconds")
    assert store.put_file(b"on a filesystem of whole seconds").made is None
    assert not store.discard(put, lambda _: False) and store.path_for(put.sha256).exists()
    monkeypatch.undo()
    # Replaced by another's write of the same bytes (both found none): not the file this put made.
    put = store.put_file(b"written twice")
    assert put.made is not None
    store.write_atomic(store.path_for(put.sha256), b"written twice")
    os.utime(store.path_for(put.sha256), ns=(put.made[1], put.made[1]))  # within one tick of the first
    assert not store.discard(put, lambda _: False) and store.path_for(put.sha256).exists()

    def away(_: str) -> bool:
        raise OSError("database away")

    put = store.put_file(b"not known")  # nothing is removed on a guess
    assert not store.discard(put, away) and store.path_for(put.sha256).exists()
    assert not list(store.root.glob("*/.gc-*"))


def test_a_failed_job_s_discard_keeps_the_file_another_job_stored_the_same_image_in_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs store the same image at once (an identical request, seed and all): both look and
    find no file, B writes its own, then A's write replaces it. B's row is about to name the file;
    A then fails (a put of another of its images: no room) and discards its put. A's file looked
    like one only A made and no row named yet: the discard removed it, and B's row committed
    naming a file that was gone."""
    from orchestrator import store as store_module

    store = ArtifactStore(tmp_path / "assets")
    data = encode_png(Image.new("RGB", (8, 8), (1, 2, 3)), {"stage": "ideation", "prompt": "twice", "seed": 1})
    looked = threading.Barrier(2)
    b_stored = threading.Event()
    first_look = threading.local()
    real_open = store_module.open_regular

    def open_regular(path: Path, **kwargs: Any) -> BinaryIO:
        try:
            return real_open(path, **kwargs)
        finally:
            if not getattr(first_look, "done", False):  # both look before either writes
                first_look.done = True
                looked.wait(10)
                if threading.current_thread().name == "A":
                    assert b_stored.wait(10)  # and B's write lands first

    monkeypatch.setattr(store_module, "open_regular", open_regular)
    puts: dict[str, Put] = {}

    def put(name: str) -> None:
        puts[name] = store.put_file(data)
        if name == "B":
            b_stored.set()

    threads = [threading.Thread(target=put, args=(name,), name=name) for name in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    monkeypatch.undo()
    assert set(puts) == {"A", "B"}
    store.discard(puts["A"], lambda _: False)  # B's row is not committed yet
    assert store.get(puts["B"].sha256) == data  # what B's row is about to name
    assert not list(store.root.glob("*/.tmp-*"))
    # A filesystem without hard links: the file is renamed into place, as before.

    def no_links(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    alone = store.put_file(b"on a filesystem without hard links")
    assert alone.made is not None and store.get(alone.sha256) == b"on a filesystem without hard links"
    assert not list(store.root.glob("*/.tmp-*"))


def test_a_cache_hit_s_copies_are_stamped_by_the_clock_ids_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """A render's assets are stamped by the clock every host agrees on (the database server's on
    PostgreSQL), its copies were stamped by this host's: a host behind the database made a copy,
    listed after a render, say it came first, and a client syncing on `created_at` skipped it."""
    from orchestrator import clock
    from orchestrator.cache import cached_copies
    from orchestrator.models import Job

    source = Asset(id=new_id("ast"), project_id="prj_x", job_id="job_x", index=0, stage="bridge", parent_id="ast_p",
                   engine="e", model="m", prompt="p", negative_prompt="", seed=1, width=64, height=64,
                   sha256="0" * 64, record={})
    job = Job(id="job_y", project_id="prj_x", stage="bridge", engine="e", model="m", params={}, status="succeeded",
              source_asset_id="ast_p")
    database = clock.now_us() + 3_600_000_000  # the database server's clock, an hour ahead of this host's
    # The ids made by its clock are this test's: kept, the process's later ids stayed an hour ahead.
    monkeypatch.setattr("orchestrator.ids._last", {})
    with clock.using(lambda: database):
        [copy] = cached_copies([source], job)
    assert copy.created_at == clock.at(database)
    assert (copy.job_id, copy.parent_id, copy.sha256) == ("job_y", "ast_p", source.sha256)


def test_a_job_s_images_are_stored_side_by_side_not_a_core_s_worth_at_a_time(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store waits on the disk (fsyncs), not on a core: the PNG threads (one a core) stored a
    job's n=4 images two at a time on 2 cores, four syncs in a row where two do. Each of the
    four puts here waits for the others to start; two at a time, the job failed."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # the build machine's: the PNG threads it gets
    real_put = ArtifactStore.put_file
    together = threading.Barrier(4, timeout=30)

    def put(self: ArtifactStore, data: bytes) -> Put:
        together.wait()
        return real_put(self, data)

    monkeypatch.setattr(ArtifactStore, "put_file", put)
    with serve_in_thread(make_settings()) as base, httpx.Client(base_url=base, timeout=30.0) as api:
        job = wait_for_job(api, submit_draft(api, create_project(api)["id"], n=4, seed=3)["id"])
        assert job["status"] == "succeeded", job.get("error")
        assert len(job["assets"]) == 4
        # In the images' order: each asset's file holds its seed's image.
        seeds = [read_record(api.get(f"/v1/assets/{asset}/content").content)["seed"] for asset in job["assets"]]
        assert seeds == [3, 4, 5, 6]


def test_a_job_s_rows_commit_after_each_of_its_files_and_their_renames_are_fsynced(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files a job's asset rows name are under their names, their bytes and their folders'
    entries fsynced, before the transaction that writes the rows begins: stored side by side,
    none is left to finish after it."""
    synced_files: set[int] = set()
    synced_dirs: set[Path] = set()
    lock = threading.Lock()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        found = os.fstat(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
        with lock:  # recorded once it has returned
            if path.is_dir():
                synced_dirs.add(path)
            else:
                synced_files.add(found.st_ino)

    seen: list[str] = []
    finish = runner.JobRunner._finish_success

    def finishing(self: runner.JobRunner, claim: Any, result: Any, records: Any, pngs: list[tuple[Put, bytes]],
                  seconds: float) -> list[str]:
        for put, data in pngs:
            path = self.store.path_for(put.sha256)
            assert path.read_bytes() == data
            with lock:
                assert path.stat().st_ino in synced_files, "its bytes are not fsynced"
                assert path.parent in synced_dirs, "its rename is not fsynced"
            seen.append(put.sha256)
        return finish(self, claim, result, records, pngs, seconds)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(runner.JobRunner, "_finish_success", finishing)
    with serve_in_thread(make_settings()) as base, httpx.Client(base_url=base, timeout=30.0) as api:
        job = wait_for_job(api, submit_draft(api, create_project(api)["id"], n=4, seed=11)["id"])
        assert job["status"] == "succeeded", job.get("error")
        shas = [api.get(f"/v1/assets/{asset}").json()["sha256"] for asset in job["assets"]]
    assert seen == shas



def test_a_store_thread_that_cannot_start_leaves_no_file_once_the_job_has_failed(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store thread refused by the system (its thread limit: "can't start new thread") while the
    job's first put runs: the job fails, and no file of it is left, neither the put handed out
    before nor the one the pool had queued when its thread failed to start (which the first
    thread then runs)."""
    real_start = threading.Thread.start
    refused = threading.Event()

    def start(self: threading.Thread) -> None:
        if self.name.startswith("store") and any(t.name.startswith("store") for t in threading.enumerate()):
            refused.set()
            raise RuntimeError("can't start new thread")
        real_start(self)

    real_put = ArtifactStore.put_file

    def put(self: ArtifactStore, data: bytes) -> Put:
        refused.wait(30)  # busy while the second image is handed out: a second thread is asked for
        return real_put(self, data)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(ArtifactStore, "put_file", put)
    settings = make_settings()
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as api:
        job = wait_for_job(api, submit_draft(api, create_project(api)["id"], n=2, seed=5)["id"])
        assert job["status"] == "failed", job
        assert "can't start new thread" in job["error"]["message"]
    # Stopped: the store pool's queue has run dry.
    assert refused.is_set()
    assert not list(settings.assets_dir.glob("*/*.png"))


def test_a_job_whose_puts_fail_is_failed_with_its_first_image_s_error_whichever_failed_first(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two images, two failed puts (the first image's shard full, the second's not writable): the
    job is failed with the first image's error, as before the store threads, not with the one whose
    image happened to be encoded first."""
    second_failed = threading.Event()

    def encode(image: Image.Image, record: dict[str, Any]) -> bytes:
        if record["seed"] == 3:
            second_failed.wait(30)  # the second image is encoded, and its put has failed, first
        return encode_png(image, record)

    def put(self: ArtifactStore, data: bytes) -> Put:
        if read_record(data)["seed"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        second_failed.set()
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(runner, "encode_png", encode)
    monkeypatch.setattr(ArtifactStore, "put_file", put)
    with serve_in_thread(make_settings()) as base, httpx.Client(base_url=base, timeout=30.0) as api:
        job = wait_for_job(api, submit_draft(api, create_project(api)["id"], n=2, seed=3)["id"])
    assert job["status"] == "failed"
    assert job["error"]["message"].startswith(
        "the images were made but could not be stored: OSError: No space left on device"), job["error"]


class TwiceEngine:
    """A plugin that makes the same image twice (its seed reported for both, so their files are
    byte-identical) and a third of another seed: n=3."""

    name = "fake-twice"
    kind = "local"
    stages = frozenset({"ideation"})

    def __init__(self) -> None:
        from tiers.base import Capabilities

        self.capabilities = Capabilities(seeds=True)

    @property
    def model(self) -> str:
        return "fake-twice-1"

    def availability(self) -> tuple[bool, str | None]:
        return True, None

    def prices(self) -> dict[str, Any]:
        return {}

    def estimate(self, req: Any) -> int:
        return 0

    async def run(self, req: Any, progress: Any, cancel: Any) -> Any:
        from tiers.base import RenderedImage, RenderResult

        same = Image.new("RGB", (req.width, req.height), (10, 20, 30))
        return RenderResult(images=[RenderedImage(same, 5), RenderedImage(same.copy(), 5),
                                    RenderedImage(Image.new("RGB", (req.width, req.height)), 6)], model=self.model)

    async def aclose(self) -> None:
        pass


def twice_factory(ctx: Any) -> TwiceEngine:
    return TwiceEngine()


def test_a_failed_job_that_made_the_same_image_twice_leaves_no_file(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its two puts of the same bytes: the first wrote the file, the second found it and touched it,
    so the job's discard took the file for another job's (touched since its put) and kept it, an
    orphan until the hourly sweep (and one more toward the sweep's alarm)."""
    from tests.api.test_workers import PARAMS, add_job, row

    real_put = ArtifactStore.put_file
    one_at_a_time = threading.Lock()  # the second put of the bytes finds the first's file

    def put(self: ArtifactStore, data: bytes) -> Put:
        with one_at_a_time:
            if read_record(data)["seed"] == 6:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_put(self, data)

    monkeypatch.setattr(ArtifactStore, "put_file", put)
    settings = make_settings(engines="fake-twice=tests.api.test_store:twice_factory")
    services = Services.build(settings)
    try:
        job_id = add_job(services, engine="fake-twice", params={**PARAMS, "n": 3})
        [(claim, _lane)] = services.scheduler._claim_ready({})
        asyncio.run(services.runner.run(claim))
        job = row(services, job_id)
        assert job.status == "failed" and job.error is not None
        assert "No space left on device" in job.error["message"]
    finally:
        asyncio.run(services.aclose())
    assert sorted(path.name for path in settings.assets_dir.glob("*/*")) == []


def test_a_crash_s_orphans_of_this_database_s_jobs_do_not_stop_the_sweep_nor_make_check_call_it_foreign(
        make_settings: SettingsFactory) -> None:
    """22 images of a job killed as it stored them, and 3 files a dead sweep set aside, in a store of
    26: more than ORPHAN_ALARM_FILES and ORPHAN_ALARM_SHARE of it, they stopped every sweep ("is it
    the database this data dir belongs to?") and `check` called the database foreign, until moved
    out by hand. Files that are no crash's (a succeeded job's whose rows are lost) still stop it."""
    from datetime import timedelta

    from orchestrator import check as check_module
    from tests.api.test_workers import PARAMS, add_job, row

    settings = make_settings()
    services = Services.build(settings)
    try:
        store = services.store
        lived: dict[str, Any] = {"created_at": utcnow() - timedelta(hours=3),
                                 "finished_at": utcnow() - timedelta(hours=1)}
        killed = add_job(services, status="failed", **lived)
        lost = add_job(services, status="succeeded", params={**PARAMS, "prompt": "rows lost"}, **lived)

        def image(seed: int, prompt: str) -> Path:
            record = {"stage": "ideation", "engine": "lite", "prompt": prompt, "seed": seed, "parent_id": None}
            path = store.path_for(store.put(encode_png(Image.new("RGB", (8, 8), (seed, 0, 0)), record)))
            age(path)  # written two hours ago, while both jobs ran
            return path

        named = image(100, "a lighthouse")
        job = row(services, killed)
        with services.db.transaction() as s:
            s.add(Asset(id=new_id("ast"), project_id=job.project_id, job_id=killed, index=0, stage="ideation",
                        engine="lite", model="m", prompt="a lighthouse", negative_prompt="", seed=100, width=8,
                        height=8, sha256=named.stem, record={}))
        crashed = [image(seed, "a lighthouse") for seed in range(22)]
        aside = []
        for seed in range(3):
            path = image(200 + seed, "set aside")
            aside.append(path.with_name(f".gc-{path.stem}-0a1b2c3d.png"))
            os.rename(path, aside[-1])
        foreign = [image(seed, "rows lost") for seed in range(22)]
        with pytest.raises(SweepRefused, match="22 of the 48 files"):
            services.sweep_asset_files()
        assert all(path.exists() for path in [named, *crashed, *aside, *foreign])
        engine = check_module.read_only_engine(settings.resolved_database_url)
        assert check_module.check_store(engine, store).foreign
        for path in foreign:  # the operator moves them out
            path.unlink()
        report = check_module.check_store(engine, store)
        assert (report.unnamed, report.unexplained, report.foreign) == (25, 0, False)
        assert services.sweep_asset_files() == 25
        assert [path.name for path in store.root.glob("*/*.png")] == [named.name]
        assert lost  # its job stays, its files' rows lost
    finally:
        asyncio.run(services.aclose())
