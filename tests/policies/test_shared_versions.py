"""One last good version of each policy file for every process of a service: a process that
missed an edit, and then finds the file refused, serves the edit (`orchestrator.policy_versions`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.exc import OperationalError

from orchestrator import clock
from orchestrator.db import Database
from orchestrator.models import PolicyVersion
from orchestrator.policy_versions import PolicyVersions
from orchestrator.services import Services
from orchestrator.settings import Settings
from policies import PolicyStore, Seen
from policies.loader import content_hash
from tests.credits.test_keep_local import STUDIO_CLOUD, STUDIO_LOCAL

BROKEN = STUDIO_CLOUD.replace("[[rules]]", "[[rules", 1)
PRIVATE_BALANCED = STUDIO_LOCAL.replace('name = "studio"', 'name = "balanced"')


def edit(file: Path, text: str) -> None:
    file.write_text(text)


def stores(folder: Path, db: Database) -> tuple[PolicyStore, PolicyStore]:
    return (PolicyStore(folder, include_builtins=False, shared=PolicyVersions(db)),
            PolicyStore(folder, include_builtins=False, shared=PolicyVersions(db)))


def count_writes(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """One item per write transaction `db` opens from now on."""
    writes: list[object] = []
    transaction = db.transaction

    def counted() -> Any:
        writes.append(None)
        return transaction()

    monkeypatch.setattr(db, "transaction", counted)
    return writes


def clock_ahead(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """The host's clock an hour ahead, until the function returned sets it right."""
    real = clock._host_us
    monkeypatch.setattr(clock, "_host_us", lambda: real() + 3600 * 10**6)
    return lambda: monkeypatch.setattr(clock, "_host_us", real)


def look_twice(*processes: PolicyStore) -> None:
    """Each process loads the refused file, then looks again, twice over."""
    for _ in range(2):
        for each in processes:
            assert len(each.reload()) == 1
            each.resync()


def all_keep_local(*processes: PolicyStore) -> None:
    """After `look_twice`, every process serves the private version."""
    look_twice(*processes)
    assert [each.get("studio").keeps_all_local for each in processes] == [True] * len(processes)


class ToldLate(PolicyVersions):
    """A process's versions whose next write first waits while `meanwhile` runs, once: another
    process's doings while its read waited on the lock (or the database blinked)."""

    meanwhile: Callable[[], None] | None = None

    def remember(self, seen: Sequence[Seen]) -> None:
        if (then := self.meanwhile) is not None:
            self.meanwhile = None
            then()
        super().remember(seen)


def undone_while_told_late(file: Path, late: ToldLate, editor: PolicyStore, undo: Callable[[], None]) -> None:
    """`editor` reads a cloud edit of the private `file`; before its read is told, `undo` runs
    (the edit undone, and read by another process); then a typo refuses the file."""
    file.write_text(STUDIO_CLOUD)
    late.meanwhile = undo
    assert editor.reload() == []
    file.write_text(BROKEN)


def private_studio(make_settings: Callable[..., Settings], tmp_path: Path) -> tuple[Path, Settings]:
    """A service's settings whose ORCH_POLICY_DIR holds the private `studio.toml` (returned too)."""
    folder = tmp_path / "policies"
    folder.mkdir()
    file = folder / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    return file, make_settings(run_jobs=False, policy_dir=folder)


def stores_one(folder: Path, shared: Any) -> PolicyStore:
    return PolicyStore(folder, include_builtins=False, shared=shared)


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
    versions.remember([Seen("studio", "/p/studio.toml", b"new", 2_000, new=True)])
    versions.remember([Seen("studio", "/p/studio.toml", b"old", 1_000, new=True),
                       Seen("other", "/p/other.toml", b"o", 5, new=True)])
    versions.remember([Seen("studio", "/p/studio.toml", b"same time", 2_000, new=True)])
    assert versions.recall(["studio", "other", "never"]) == {
        "studio": Seen("studio", "/p/studio.toml", b"new", 2_000), "other": Seen("other", "/p/other.toml", b"o", 5)}
    versions.remember([Seen("studio", "/p/studio.toml", None, 3_000, new=True)])  # removed
    assert versions.recall(["studio"])["studio"].content is None


def test_a_file_removed_and_then_refused_does_not_bring_back_the_version_before_its_removal(
        tmp_path: Path, db: Database) -> None:
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    first, second = stores(tmp_path, db)
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
    file.unlink()
    assert first.reload() == [] and first.get("balanced").source == "builtin"
    edit(file, BROKEN.replace('name = "studio"', 'name = "balanced"'))
    assert len(second.reload()) == 1 and second.get("balanced").source == "builtin"


class Away:
    """The database, down."""

    def now_ns(self) -> int:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    def remember(self, seen: Sequence[Seen]) -> None:
        raise OperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))

    def recall(self, names: Sequence[str] | None) -> dict[str, Seen]:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))


class Blinking(PolicyVersions):
    """The database, away while `away` is set."""

    away = False

    def remember(self, seen: Sequence[Seen]) -> None:
        if self.away:
            raise OperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))
        super().remember(seen)

    def recall(self, names: Sequence[str] | None) -> dict[str, Seen]:
        if self.away:
            raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))
        return super().recall(names)


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
                                      time.time_ns(), new=True)])
    edit(file, BROKEN)
    with caplog.at_level(logging.WARNING, logger="policies.loader"):
        assert len(store.reload()) == 1
    assert store.get("studio").content_hash == content_hash(STUDIO_CLOUD.encode())
    assert "does not load here" in caplog.text


@pytest.mark.parametrize("how", ["link", "directory"])
def test_a_rollback_to_an_older_file_is_the_newest_version(tmp_path: Path, db: Database, how: str) -> None:
    # Rolled back by swapping a link, or the whole directory, to what was there before: the file
    # read is older than the one it replaces, and a later typo brought the replaced cloud version back.
    private, cloud = tmp_path / "private", tmp_path / "cloud"
    for folder, text in ((private, STUDIO_LOCAL), (cloud, STUDIO_CLOUD)):
        folder.mkdir()
        (folder / "studio.toml").write_text(text)
    policies = tmp_path / "policies"
    if how == "link":
        policies.mkdir()
        (policies / "studio.toml").symlink_to(cloud / "studio.toml")
    else:
        cloud.rename(policies)
    time.sleep(0.05)  # the cloud file changed after the private one was written
    first, second = stores(policies, db)
    # The deploy rolled back to the private version, and restarted the processes.
    if how == "link":
        (policies / "studio.toml").unlink()
        (policies / "studio.toml").symlink_to(private / "studio.toml")
    else:
        policies.rename(tmp_path / "rolled-back")
        private.rename(policies)
    first, second = stores(policies, db)
    assert first.get("studio").keeps_all_local
    file = policies / "studio.toml"
    file.unlink()
    file.write_text(BROKEN)  # a typo saved over it
    for store in (first, second):
        assert len(store.reload()) == 1 and store.get("studio").keeps_all_local


def test_a_read_told_after_another_process_found_the_file_refused_reaches_it_at_its_next_look(
        tmp_path: Path, db: Database) -> None:
    # The first process read the private edit but could not tell it (its database write waited,
    # or failed); the second found the file refused and served its cloud version, for good.
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    shared = Blinking(db)
    first = PolicyStore(tmp_path, include_builtins=False, shared=shared)
    second = PolicyStore(tmp_path, include_builtins=False, shared=PolicyVersions(db))
    edit(file, STUDIO_LOCAL)
    shared.away = True
    assert first.reload() == [] and first.needs_resync
    edit(file, BROKEN)
    assert len(second.reload()) == 1 and not second.get("studio").keeps_all_local  # nothing better told yet
    assert second.needs_resync and second.resync() == []  # a look with nothing new
    shared.away = False
    assert first.resync() == [] and not first.needs_resync  # told: its own version is served already
    assert second.resync() == ["studio"]
    assert second.get("studio").keeps_all_local and second.from_service("studio") is True
    assert second.resync() == []  # looked at again while the file stays refused: nothing more to change
    edit(file, STUDIO_CLOUD)
    assert second.reload() == [] and not second.needs_resync and second.from_service("studio") is None


def test_a_refusal_found_while_the_database_was_away_is_served_as_the_service_keeps_it_once_it_is_back(
        tmp_path: Path, db: Database) -> None:
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    shared = Blinking(db)
    first, second = PolicyStore(tmp_path, include_builtins=False, shared=PolicyVersions(db)), \
        PolicyStore(tmp_path, include_builtins=False, shared=shared)
    edit(file, STUDIO_LOCAL)
    assert first.reload() == []
    edit(file, BROKEN)
    shared.away = True
    assert len(second.reload()) == 1 and not second.get("studio").keeps_all_local  # its own, for now
    shared.away = False
    assert second.resync() == ["studio"] and second.get("studio").keeps_all_local


def test_a_reload_says_what_the_service_s_version_left_in_place_of_a_refused_file(
        make_settings: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file, settings = private_studio(make_settings, tmp_path)

    async def scenario() -> None:
        first, second = Services.build(settings), Services.build(settings)
        try:
            file.unlink()
            first.reload_policies("a test")
            file.write_text(BROKEN)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="orchestrator.services"):
                second.reload_policies("a test")
            # Not "the last good version stays", nor "is gone": the file is there, refused.
            assert "policy refused on reload (not loaded: another process found the file removed after the " \
                "version this one read)" in caplog.text
            assert "is gone" not in caplog.text and "studio" not in second.policies
            file.write_text(STUDIO_CLOUD)
            first.reload_policies("a test")
            file.write_text(BROKEN)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="orchestrator.services"):
                second.reload_policies("a test")
            assert "(the service's last good version, read by another process, serves)" in caplog.text
            assert second.policies.get("studio").content_hash == content_hash(STUDIO_CLOUD.encode())
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="orchestrator.services"):
                second.reload_policies("a test")  # refused still: still told so
            assert "(the service's last good version, read by another process, serves)" in caplog.text
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(scenario())


def test_a_read_kept_from_a_clock_since_set_back_is_replaced_by_the_next_read(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # The clock ran an hour ahead (a host's at boot, a restored VM, a PostgreSQL failover) as the
    # cloud version was read: the private edit read after the correction was never kept, and a
    # typo had even the process that read it serve the cloud version.
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    set_right = clock_ahead(monkeypatch)
    store = PolicyStore(tmp_path, include_builtins=False, shared=PolicyVersions(db))
    set_right()
    file.write_text(STUDIO_LOCAL)
    assert store.reload() == []
    file.write_text(BROKEN)
    assert len(store.reload()) == 1 and store.get("studio").keeps_all_local


def test_each_file_s_read_is_stamped_just_before_it_is_read(tmp_path: Path, db: Database) -> None:
    # The second process's load took its time before reading the file (listing, other files):
    # meanwhile the first read the cloud version, and the private edit landed. Stamped at the start
    # of its load, the second's read of the edit lost to the first's older read.
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    first = PolicyStore(tmp_path, include_builtins=False, shared=PolicyVersions(db))

    class Slow(PolicyVersions):
        meanwhile = False

        def now_ns(self) -> int:
            stamp = super().now_ns()
            if self.meanwhile:  # its first look at the clock in the load
                self.meanwhile = False
                first.reload()
                file.write_text(STUDIO_LOCAL)
            return stamp

    slow = Slow(db)
    second = PolicyStore(tmp_path, include_builtins=False, shared=slow)
    slow.meanwhile = True
    assert second.reload() == [] and second.get("studio").keeps_all_local
    file.write_text(BROKEN)
    for store in (second, first):
        assert len(store.reload()) == 1 and store.get("studio").keeps_all_local


def test_a_process_that_cannot_list_the_directory_serves_the_service_s_versions(tmp_path: Path, db: Database) -> None:
    # Its mount lost: it kept the versions it had read, and never asked the service, whose other
    # processes read a private edit.
    policies = tmp_path / "policies"
    policies.mkdir()
    view = tmp_path / "mounted"
    view.symlink_to(policies)
    (policies / "studio.toml").write_text(STUDIO_CLOUD)
    first = PolicyStore(policies, include_builtins=False, shared=PolicyVersions(db))
    second = PolicyStore(view, include_builtins=False, shared=PolicyVersions(db))
    view.unlink()
    (policies / "studio.toml").write_text(STUDIO_LOCAL)
    assert first.reload() == []
    assert len(second.reload()) == 1 and second.get("studio").keeps_all_local and second.needs_resync


def test_a_load_writes_what_it_read_in_one_transaction_and_a_look_writes_nothing(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("one", "two", "gone"):
        (tmp_path / f"{name}.toml").write_text(STUDIO_CLOUD.replace('"studio"', f'"{name}"'))
    store = PolicyStore(tmp_path, include_builtins=False, shared=PolicyVersions(db))
    (tmp_path / "gone.toml").unlink()
    assert store.reload() == []
    writes = count_writes(db, monkeypatch)
    assert PolicyVersions(db).recall(["gone"])["gone"].content is None
    for _ in range(3):
        assert store.reload() == []
    assert len(writes) == 3  # every file, the removed one's absence included, in one each
    (tmp_path / "two.toml").write_text(BROKEN.replace('"studio"', '"two"'))
    assert len(store.reload()) == 1 and len(writes) == 4
    for _ in range(3):
        assert store.resync() == []
    assert len(writes) == 4


def test_an_undo_read_while_a_slower_process_tells_the_undone_edit_stays_the_service_s(
        tmp_path: Path, db: Database) -> None:
    # private -> cloud -> private (an undo). C read the cloud edit; its write waited on the lock
    # (or the database blinked) while B read the undo. B's read of the undo, later than C's, found
    # the content kept already and wrote nothing, so the row still carried the stamp of the first
    # private read, older than C's: C's late tell replaced it. A typo then served the
    # cloud version everywhere, though the latest read made was the private one.
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    a = stores_one(tmp_path, PolicyVersions(db))
    b = stores_one(tmp_path, PolicyVersions(db))

    def undo() -> None:
        file.write_text(STUDIO_LOCAL)
        assert b.reload() == [] and b.get("studio").keeps_all_local  # read after C's read

    late = ToldLate(db)
    c = stores_one(tmp_path, late)
    undone_while_told_late(file, late, c, undo)
    # B restarts (a rolling deploy): its read of the undo was never written.
    d = stores_one(tmp_path, PolicyVersions(db))  # B, started again
    all_keep_local(a, c, d)


def test_a_stale_read_told_again_does_not_replace_a_read_kept_from_a_clock_since_set_back(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # S read the cloud version; the host clock then ran an hour ahead while A read the private
    # edit; corrected. A typo: S re-tells its OLD cloud read, and a kept read the clock has not
    # reached yet was replaced by any read, and S and A overwrote each other at each look.
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    s = stores_one(tmp_path, PolicyVersions(db))
    set_right = clock_ahead(monkeypatch)
    file.write_text(STUDIO_LOCAL)
    a = stores_one(tmp_path, PolicyVersions(db))
    set_right()
    file.write_text(BROKEN)
    writes = count_writes(db, monkeypatch)
    for each in (s, a, s, a):
        assert len(each.reload()) == 1
    for _ in range(3):
        s.resync()
        a.resync()
    served = [each.get("studio").keeps_all_local for each in (s, a)]
    assert (served, len(writes)) == ([True, True], 0)


def test_a_process_that_cannot_list_the_directory_does_not_overwrite_the_service_s_version_with_its_stale_read(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # U lost its mount and tells its old cloud read again at every look; the readers (nothing
    # refused) never tell theirs again: the old read must not replace theirs.
    policies = tmp_path / "policies"
    policies.mkdir()
    view = tmp_path / "mounted"
    view.symlink_to(policies)
    (policies / "studio.toml").write_text(STUDIO_CLOUD)
    u = stores_one(view, PolicyVersions(db))
    set_right = clock_ahead(monkeypatch)
    (policies / "studio.toml").write_text(STUDIO_LOCAL)
    reader = stores_one(policies, PolicyVersions(db))
    set_right()
    view.unlink()
    assert len(u.reload()) == 1
    u.resync()
    assert u.get("studio").keeps_all_local
    assert PolicyVersions(db).recall(["studio"])["studio"].content == STUDIO_LOCAL.encode()
    assert reader.get("studio").keeps_all_local


def test_an_unlisted_directory_that_drops_a_policy_says_so(
        make_settings: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A process that cannot list the directory takes each removal another process saw: the policy
    # is dropped, but the reload says "the policies read from it before stay" and nothing else.
    folder = tmp_path / "policies"
    folder.mkdir()
    file = folder / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    view = tmp_path / "mounted"
    view.symlink_to(folder)
    first = make_settings(run_jobs=False, policy_dir=folder)
    second = make_settings(run_jobs=False, policy_dir=view)

    async def scenario() -> None:
        one, two = Services.build(first), Services.build(second)
        try:
            file.unlink()
            one.reload_policies("a test")
            view.unlink()
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="orchestrator.services"):
                two.reload_policies("a test")
            assert "studio" not in two.policies
            assert "policy 'studio': not loaded: another process found the file removed after the version this " \
                "one read" in caplog.text
            assert "(the policies read from it before stay, as the service's other processes last read them)" \
                in caplog.text
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(scenario())


def test_a_rollback_to_the_very_file_a_process_read_before_is_kept_when_it_reads_it_again(
        tmp_path: Path, db: Database) -> None:
    # A link to the private file, swapped to the cloud one (B reads it), then back (A reads it: the
    # very file A read before, same bytes and status), then a typo before B looks again. A's read
    # was the latest; taken for no change since A's last, it was never kept.
    private, cloud = tmp_path / "private", tmp_path / "cloud"
    for folder, text in ((private, STUDIO_LOCAL), (cloud, STUDIO_CLOUD)):
        folder.mkdir()
        (folder / "studio.toml").write_text(text)
    policies = tmp_path / "policies"
    policies.mkdir()
    link = policies / "studio.toml"
    link.symlink_to(private / "studio.toml")
    a = stores_one(policies, PolicyVersions(db))
    b = stores_one(policies, PolicyVersions(db))
    link.unlink()
    link.symlink_to(cloud / "studio.toml")
    assert b.reload() == [] and not b.get("studio").keeps_all_local
    link.unlink()
    link.symlink_to(private / "studio.toml")  # the rollback
    assert a.reload() == [] and a.get("studio").keeps_all_local  # the latest good read: private
    link.unlink()
    link.write_text(BROKEN)  # a typo saved over it
    look_twice(a, b)
    assert [each.get("studio").keeps_all_local for each in (a, b)] == [True, True]


def test_an_override_put_back_after_a_removal_another_process_saw_is_kept(tmp_path: Path, db: Database) -> None:
    # A private override of the built-in `balanced`, a link: B saw it removed; put back, A read it
    # (the very file it read before), then a typo: both served the built-in.
    kept = tmp_path / "kept"
    kept.mkdir()
    target = kept / "balanced.toml"
    target.write_text(STUDIO_LOCAL.replace('name = "studio"', 'name = "balanced"'))
    policies = tmp_path / "policies"
    policies.mkdir()
    link = policies / "balanced.toml"
    link.symlink_to(target)
    a = PolicyStore(policies, shared=PolicyVersions(db))
    b = PolicyStore(policies, shared=PolicyVersions(db))
    link.unlink()
    assert b.reload() == [] and b.get("balanced").source == "builtin"
    link.symlink_to(target)
    assert a.reload() == [] and a.get("balanced").keeps_all_local  # the latest good read
    link.unlink()
    link.write_text(BROKEN.replace('name = "studio"', 'name = "balanced"'))
    look_twice(a, b)
    assert [each.get("balanced").source for each in (a, b)] == [str(link), str(link)]


def test_a_late_tell_does_not_replace_a_later_read_of_what_was_kept_from_a_clock_set_back(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # P0 read the private version while the clock ran an hour ahead; corrected. C read a cloud
    # edit, its write waiting while the edit was undone and B read the undo: B's read, the same
    # bytes as the row from the future, did not replace it, and C's earlier read, told late, did.
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    b = stores_one(tmp_path, PolicyVersions(db))
    set_right = clock_ahead(monkeypatch)
    file.write_text(STUDIO_LOCAL)  # rewritten (a deploy): read as news by P0 with the clock ahead
    p0 = stores_one(tmp_path, PolicyVersions(db))
    set_right()

    def undo() -> None:
        time.sleep(0.01)
        file.write_text(STUDIO_LOCAL)
        assert b.reload() == [] and b.get("studio").keeps_all_local  # read after C's read

    late = ToldLate(db)
    c = stores_one(tmp_path, PolicyVersions(db))
    c.shared = late  # from its next load
    undone_while_told_late(file, late, c, undo)
    all_keep_local(p0, b, c)


def test_a_kept_version_that_does_not_load_here_is_warned_of_once(
        tmp_path: Path, db: Database, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    store = PolicyStore(tmp_path, include_builtins=False, shared=PolicyVersions(db))
    PolicyVersions(db).remember([Seen("studio", str(file), STUDIO_LOCAL.encode() + b"\nfuture = 1\n",
                                      time.time_ns(), new=True)])
    file.write_text(BROKEN)
    store.reload()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="policies.loader"):
        for _ in range(5):
            store.resync()
    assert caplog.text.count("does not load here") <= 1


@pytest.mark.parametrize("when", ["at start", "override added after the mount was lost"])
def test_a_process_that_cannot_list_the_directory_serves_the_service_s_private_override(
        tmp_path: Path, db: Database, when: str) -> None:
    # The service keeps a private override of the built-in `balanced`; a process that could not list
    # ORCH_POLICY_DIR, and never read that file, served the shipped (cloud) `balanced` for good.
    policies = tmp_path / "policies"
    policies.mkdir()
    view = tmp_path / "mounted"
    if when == "at start":
        (policies / "balanced.toml").write_text(PRIVATE_BALANCED)
        reader = PolicyStore(policies, shared=PolicyVersions(db))
        late = PolicyStore(view, shared=PolicyVersions(db))  # its mount is not there
    else:
        view.symlink_to(policies)
        reader = PolicyStore(policies, shared=PolicyVersions(db))
        late = PolicyStore(view, shared=PolicyVersions(db))
        view.unlink()  # mount lost
        assert len(late.reload()) == 1
        (policies / "balanced.toml").write_text(PRIVATE_BALANCED)
    for each in (reader, late, reader, late):  # every process loads and looks twice
        each.reload()
        each.resync()
    assert reader.get("balanced").keeps_all_local
    assert PolicyVersions(db).recall(["balanced"])["balanced"].content == PRIVATE_BALANCED.encode()
    assert late.get("balanced").keeps_all_local, late.get("balanced").source


def test_a_late_tell_of_a_read_stamped_by_a_clock_since_set_back_does_not_replace_a_later_read(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # B read a cloud edit while the host clock ran an hour ahead; its write waited on the lock.
    # Meanwhile the clock was corrected, the edit undone, and A read the undo (the latest read).
    # B's late tell carried the stamp from the future: later than A's, it was kept, and a typo
    # then served the cloud version everywhere, A included.
    real = clock._host_us
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    a = PolicyStore(tmp_path, include_builtins=False, shared=PolicyVersions(db))

    def undo() -> None:
        monkeypatch.setattr(clock, "_host_us", real)  # corrected while B's write waited
        file.write_text(STUDIO_LOCAL)
        assert a.reload() == [] and a.get("studio").keeps_all_local  # the latest good read

    late = ToldLate(db)
    b = PolicyStore(tmp_path, include_builtins=False, shared=late)
    clock_ahead(monkeypatch)
    undone_while_told_late(file, late, b, undo)
    all_keep_local(a, b)


def test_a_reload_racing_a_look_that_drops_a_policy_does_not_raise(
        make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # POST /v1/policies/reload (a thread) and the watcher's look (another thread): the look
    # dropped 'studio' (another process saw its file removed) between the reload's `name in
    # policies` and its `policies.get(name)`: NotFound out of reload_policies (a 404 to the
    # caller, and the policies it made local not applied to queued work).
    file, settings = private_studio(make_settings, tmp_path)

    async def scenario() -> None:
        first, second = Services.build(settings), Services.build(settings)
        try:
            file.write_text(BROKEN)
            contains = PolicyStore.__contains__
            armed = [False]

            def racing(self: PolicyStore, name: object) -> bool:
                found = contains(self, name)
                if armed[0] and self is second.policies and name == "studio":
                    armed[0] = False
                    file.unlink()
                    first.reload_policies("another process")  # tells the removal
                    file.write_text(BROKEN)
                    second.policies.resync()  # the watcher's thread, in between
                return found

            monkeypatch.setattr(PolicyStore, "__contains__", racing)
            armed[0] = True
            second.reload_policies("POST /v1/policies/reload")
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(scenario())


def test_a_version_read_before_and_told_again_never_fills_an_emptied_table(tmp_path: Path, db: Database) -> None:
    # The table emptied (a restore, a downgrade and upgrade): a process that could no longer list
    # the directory told its old cloud read again and filled it, and a typo then had the process
    # that read the private edit serve the cloud version.
    policies = tmp_path / "policies"
    policies.mkdir()
    view = tmp_path / "mounted"
    view.symlink_to(policies)
    file = policies / "studio.toml"
    file.write_text(STUDIO_CLOUD)
    unlisted = stores_one(view, PolicyVersions(db))
    file.write_text(STUDIO_LOCAL)
    reader = stores_one(policies, PolicyVersions(db))
    view.unlink()
    with db.transaction() as s:
        s.execute(delete(PolicyVersion))
    assert len(unlisted.reload()) == 1
    unlisted.resync()
    file.write_text(BROKEN)
    assert len(reader.reload()) == 1 and reader.get("studio").keeps_all_local


def test_a_late_tell_whose_write_waited_past_the_slack_does_not_replace_the_later_read(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # No clock is wrong. C read a cloud edit; its write then waited 6 s for the write lock.
    # Meanwhile the edit was undone, and B read the undo and wrote it. C's write judged the kept
    # row by the time it took before the wait: B's read, 6 s after it, looked like a read from a
    # clock since set back, and C's older cloud read replaced it.
    file = tmp_path / "studio.toml"
    file.write_text(STUDIO_LOCAL)
    b = stores_one(tmp_path, PolicyVersions(db))
    c = stores_one(tmp_path, PolicyVersions(db))
    real = clock._host_us
    transaction = db.transaction
    armed = [False]

    def waiting() -> Any:
        if armed[0]:
            armed[0] = False
            monkeypatch.setattr(clock, "_host_us", lambda: real() + 6 * 10**6)  # 6 s pass, for everyone
            file.write_text(STUDIO_LOCAL)  # the undo
            assert b.reload() == [] and b.get("studio").keeps_all_local  # the latest read, told first
        return transaction()

    monkeypatch.setattr(db, "transaction", waiting)
    file.write_text(STUDIO_CLOUD)
    armed[0] = True
    assert c.reload() == []
    file.write_text(BROKEN)
    look_twice(b, c)
    kept = PolicyVersions(db).recall(["studio"])["studio"].content
    assert (kept, [each.get("studio").keeps_all_local for each in (b, c)]) == (STUDIO_LOCAL.encode(), [True, True])


def test_what_a_load_read_without_the_service_s_clock_is_never_told(tmp_path: Path, db: Database) -> None:
    # Its time would be this host's, which is no time of the service's on PostgreSQL.
    class Clockless:
        def __init__(self, db: Database) -> None:
            self.versions = PolicyVersions(db)

        def now_ns(self) -> int:
            raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

        def remember(self, seen: Sequence[Seen]) -> None:
            self.versions.remember(seen)

        def recall(self, names: Sequence[str] | None) -> dict[str, Seen]:
            return self.versions.recall(names)

    (tmp_path / "studio.toml").write_text(STUDIO_LOCAL)
    store = stores_one(tmp_path, Clockless(db))
    assert store.get("studio").keeps_all_local and PolicyVersions(db).recall(["studio"]) == {}
    stores_one(tmp_path, PolicyVersions(db))  # a process that can read the clock tells it
    assert PolicyVersions(db).recall(["studio"])["studio"].content == STUDIO_LOCAL.encode()
