"""`orchestrator check`: whether every asset's PNG is in the store, byte for byte, and whether the
ledger's entries add up.

For an operator after a restore from backup, a disk error, a move of the data dir or a hand-made
fix in the database: an asset whose file is missing, unreadable, or whose bytes no longer hash to
the sha256 its row records cannot be served; the files no asset names are counted (the service's
own sweep removes them), those set aside for removal too, and what a crash left beside them: temp
files of writes cut short before their rename, and folders moved aside from an image file's place.
In the ledger, every hold is open or settled by its capture and/or release (their amounts making
up the hold, unless the provider charged more), its `settled` flag says which, a job has at most
one open hold, and an adjustment follows a reconciled capture of the same hold: an entry breaking
one of these is money counted twice or not at all. (A hold settled by a process of a version
before its `settled` flag is only counted: the service's sweep marks it.) Each project's storage
usage (`Project.storage_bytes`, which its quota is judged on) is the sum of its live assets'
sizes, and an asset's size (`Asset.bytes`) is its file's: usage off is a quota refusing too early
or too late.

Read-only, on a read-only mount too: the database is opened read-only (SQLite with `mode=ro`, as
immutable while no process has it open; PostgreSQL in read-only transactions) and nothing is
created in the data dir.
"""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, event, func, or_
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import aliased
from sqlalchemy.pool import QueuePool
from sqlmodel import Session, col, select

from orchestrator import adopt
from orchestrator.db import foreign_tables, postgres_connect_args, sqlite_file
from orchestrator.errors import NotFound
from orchestrator.events import TERMINAL
from orchestrator.models import Asset, Job, LedgerEntry, Project, StoreIdentity
from orchestrator.retention import made_by_jobs
from orchestrator.settings import source_of
from orchestrator.store import (
    ORPHAN_ALARM_FILES,
    ORPHAN_ALARM_SHARE,
    ORPHAN_BATCH,
    ORPHAN_GRACE_SECONDS,
    ArtifactStore,
    stored_sha,
    unexplained_orphans,
)

PAGE = 1000
CHUNK = 1 << 20
# Verdicts kept for files several assets share (identical images): bounded, as assets are paged.
REMEMBERED = 10 * PAGE
UNNAMED_LISTED = 50  # files no asset names, listed by path when the database is taken for another's


class CannotCheck(Exception):
    """Nothing could be checked: no database or no store where the settings point."""


@dataclass
class StoreReport:
    assets: int = 0
    reads: int = 0  # files found and read (a file identical images share is read once, mostly)
    missing: list[str] = field(default_factory=list)  # asset ids, as for the lists below
    damaged: list[str] = field(default_factory=list)  # bytes that do not hash to the row's sha256
    unreadable: list[str] = field(default_factory=list)  # the file is there, reading it failed
    malformed: list[str] = field(default_factory=list)  # the row's sha256 is not one
    # Renamed aside by a sweep that stopped mid-way (`.gc-<sha>-*.png`): the next sweep, at a
    # service's start or while it runs, puts the file back. Not lost, and no backup needed.
    set_aside: list[str] = field(default_factory=list)
    # Sound files (or, with --no-hash, files there) whose size is not the `bytes` their row records:
    # the row or the file changed by hand, and the project's storage usage counts the row's.
    resized: list[str] = field(default_factory=list)
    unnamed: int = 0  # files in the store no asset names (but those `in_flight`)
    # Files no asset names written within the sweep's grace while jobs run: a running job's images,
    # stored a moment before the transaction that names them commits. Neither orphans nor a sign
    # of another database, and not listed to move out of the store.
    in_flight: int = 0
    # Where the first of them lie (UNNAMED_LISTED at most): an operator's to look at when the sweep
    # refuses, and to move out of the store once sure they are a crash's leftovers.
    unnamed_paths: list[str] = field(default_factory=list)
    # Of `unnamed`, those no crash explains, as the sweep's guard counts them
    # (`orchestrator.store.unexplained_orphans`: counted only until they pass its alarm).
    unexplained: int = 0
    files: int = 0  # files in the store
    # What a crash left beside the files, which the service's sweeps remove: temp files of writes cut
    # short before their rename (`.tmp-*`, once an hour old), counted with their bytes, as they take
    # disk no project's usage counts.
    temp_files: int = 0
    temp_bytes: int = 0
    # Folders found in an image file's place, moved aside (`.broken-*`) by the write that replaced
    # them: the operator's to look at, as no sweep removes them.
    broken: list[str] = field(default_factory=list)
    deleted: int = 0  # deleted assets (their files the sweep's)
    hashed: bool = True

    @property
    def foreign(self) -> bool:
        """The database names none (or few) of the store's files: the sweep's rule for "is it this
        data dir's database?" (a running service's SQLite file copied without its `-wal` has none
        of the recent rows, and was once said to be ok). Not a database whose assets were all
        deleted: it names no file, and the few a crash left are no sign of another database."""
        emptied = not self.assets and bool(self.deleted)
        files = self.files - self.in_flight
        # Orphans a crash explains (set aside, or this database's jobs' images) are not counted:
        # 21 of them in a store of 400 made it "foreign" until they were moved out by hand.
        return bool(self.unexplained) and ((self.unnamed == files and not emptied) or (
            self.unexplained > ORPHAN_ALARM_FILES and self.unexplained > files * ORPHAN_ALARM_SHARE))

    @property
    def lost(self) -> bool:
        """Some asset's file is missing, damaged, unreadable, or its row's sha256 malformed."""
        return bool(self.missing or self.damaged or self.unreadable or self.malformed)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.foreign or self.resized)


@dataclass
class LedgerReport:
    entries: int = 0
    holds: int = 0
    # What is wrong -> the ledger entry ids (as text) it is wrong about.
    problems: dict[str, list[str]] = field(default_factory=dict)
    open_finished: list[str] = field(default_factory=list)  # holds of finished jobs (the sweep settles them)
    unflagged: list[str] = field(default_factory=list)  # settled holds still marked open (the sweep marks them)
    unreconciled: int = 0  # captures waiting for the invoice

    @property
    def ok(self) -> bool:
        return not self.problems

    def flag(self, problem: str, entry_id: int | None) -> None:
        self.problems.setdefault(problem, []).append(str(entry_id))


@dataclass(frozen=True)
class UsageOff:
    project_id: str
    recorded: int  # `Project.storage_bytes`
    summed: int  # its live assets' `bytes`, unmeasured ones as 0

    @property
    def difference(self) -> int:
        return self.recorded - self.summed


@dataclass
class StorageReport:
    projects: int = 0
    off: list[UsageOff] = field(default_factory=list)  # by project id
    # Live assets stored before sizes were kept (null `bytes`, counted as 0): the service's asset
    # sweep measures them at its next start, adding them to their projects' usage (one whose file
    # is missing, listed as missing, once its file is restored). No finding of its own.
    unmeasured: int = 0

    @property
    def ok(self) -> bool:
        return not self.off


# The problems `check_ledger` finds, as the report words them.
SETTLED_WITHOUT_ENTRY = "holds marked settled with no capture or release (neither held nor charged)"
AMOUNTS = "holds whose capture and release do not add up to the hold"
SECOND_OPEN_HOLD = "open holds of a job that has another open hold"
STRAY = "captures, releases or adjustments naming an entry that is not their job's hold"
LOOSE_RELEASE = "releases naming no hold"
EARLY_ADJUSTMENT = "adjustments of a capture still unreconciled, or of none"
SECOND_CHARGE = "captures naming no hold of a job also charged on its hold"
JOBLESS_HOLD = "open holds of no job (nothing will settle them)"
# Each of them, said of one entry ("1 hold whose ...").
ONE = {
    SETTLED_WITHOUT_ENTRY: "hold marked settled with no capture or release (neither held nor charged)",
    AMOUNTS: "hold whose capture and release do not add up to the hold",
    SECOND_OPEN_HOLD: "open hold of a job that has another open hold",
    STRAY: "capture, release or adjustment naming an entry that is not its job's hold",
    LOOSE_RELEASE: "release naming no hold",
    EARLY_ADJUSTMENT: "adjustment of a capture still unreconciled, or of none",
    SECOND_CHARGE: "capture naming no hold of a job also charged on its hold",
    JOBLESS_HOLD: "open hold of no job (nothing will settle it)",
}


def at_rest(url: str) -> tuple[int, int, int] | None:
    """A SQLite file no process is writing (no -wal file beside it, which lives as long as a WAL
    connection does, nor a -journal, a rollback's): its inode, size and modification time, to
    tell whether it changed while it was read as immutable. None for any other database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    path = sqlite_file(url) or Path(parsed.database or "")
    if any(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-journal")):
        return None
    try:
        stat = path.stat()
    except OSError:  # told by `read_only_engine`
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def read_only_engine(url: str, *, immutable: bool = False) -> Engine:
    """An engine that cannot write, on a database that must exist already. Each session's reads
    share one snapshot: the ledger's holds and their settlements are read as of one moment, even
    beside a running service (whose captures would otherwise land between two reads).
    `immutable`: a SQLite file no process is writing (`at_rest`) is read as one that cannot
    change. Read otherwise, SQLite makes the -wal and -shm files a WAL database is read with,
    which a read-only connection cannot remove: left in the data dir, owned by whoever ran the
    check (the service could not write the database until they were removed), and impossible to
    make on a read-only mount. A write meanwhile is for the caller to see (`at_rest` again)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_file(url) or Path(parsed.database or "")  # a `file:` URI names its file after the scheme
        if not path.is_file():  # connecting would make an empty one
            raise CannotCheck(f"no database at {path} "
                              f"(is {source_of('data_dir')} or {source_of('database_url')} right?)")
        options = "mode=ro"
        if immutable:
            options += "&immutable=1"
        # Not the service's set-up (WAL, a busy timeout for writers): that would change a restored file.
        # The URI straight to sqlite3: through a SQLAlchemy URL its escapes were decoded first, so a
        # data dir named `a#b` or `q?x` opened (and made) the file `a` or `q`, read-write.
        uri = f"file:{quote(str(path.resolve()))}?{options}"
        # The pool of a file database, as the URL would have chosen (a bare `sqlite://` is one in memory).
        engine = create_engine("sqlite://", poolclass=QueuePool, creator=lambda: sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False))

        @event.listens_for(engine, "begin")
        def _snapshot(conn: Any) -> None:  # pysqlite begins no transaction for reads by itself
            conn.exec_driver_sql("BEGIN")

        return engine
    args = postgres_connect_args(url)
    args["options"] += " -c default_transaction_read_only=on"
    return create_engine(url, connect_args=args, isolation_level="REPEATABLE READ")


def open_store(assets_dir: Path, engine: Engine) -> ArtifactStore | None:
    """The store to check; None for an install that has stored nothing yet (migrated, never
    served: the folder is made at the first start)."""
    if not assets_dir.is_dir():  # ArtifactStore would make it, and every asset would be "missing"
        if _stores_nothing(engine):
            return None
        raise CannotCheck(f"no asset store at {assets_dir} (is {source_of('data_dir')} right?)")
    return ArtifactStore(assets_dir)


def _stores_nothing(engine: Engine) -> bool:
    with Session(engine) as s:
        if s.exec(select(Asset.id).limit(1)).first() is not None:
            return False
        try:
            return s.get(StoreIdentity, 1) is None
        except DatabaseError:  # not migrated to 0011 yet: no binding to tell of
            return True


def check_revision(engine: Engine) -> None:
    """Raises `CannotCheck` unless the database's schema is this version's: an older one needs
    `orchestrator migrate` (its tables would fail the checks with a bare SQL error), and a newer
    one's rows may mean what this version cannot judge (it once said "ok" of one)."""
    from importlib.resources import files

    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(files("migrations")))
    head = scripts.get_current_head()
    with engine.connect() as connection:
        found = MigrationContext.configure(connection).get_current_revision()
    if found == head:
        return
    if found is None:
        # What `migrate` would refuse (another application's tables) is not advised to be migrated.
        if others := foreign_tables(engine):
            raise CannotCheck(f"the database holds tables of another application ({others}) and none of this "
                              f"service's: is {source_of('data_dir')} or {source_of('database_url')} right?")
        raise CannotCheck("the database has no tables of this service (run `orchestrator migrate`, or is "
                          f"{source_of('database_url')} right?)")
    if found in {script.revision for script in scripts.walk_revisions()}:
        raise CannotCheck(f"the database is at revision {found}, this version expects {head}: run "
                          "`orchestrator migrate` first")
    raise CannotCheck(f"the database is at revision {found}, which this version does not know (it expects "
                      f"{head}): it was migrated by a newer orchestrator (check it with that version), or it is "
                      f"another application's (is {source_of('database_url')} right?)")


def check_identity(engine: Engine, store: ArtifactStore) -> str | None:
    """Why the data dir is not the store the database's assets live in (`orchestrator.identity`),
    or None. A database from before stores had ids has nothing to compare: None."""
    from orchestrator.identity import MARKER, WrongStore, mismatch, read_marker

    try:
        with Session(engine) as s:
            return mismatch(s, store, read_marker(store.root / MARKER))
    except WrongStore as exc:
        return str(exc)
    except DatabaseError:  # not migrated to 0011 yet: the next start binds them
        return None


def check_store(engine: Engine, store: ArtifactStore, *, hashes: bool = True) -> StoreReport:
    report = StoreReport(hashed=hashes)
    verdicts: dict[str, str | None] = {}  # sha -> None (sound) or the report's list it goes in
    sizes: dict[str, int | None] = {}  # sha -> a sound file's size (None: it could not be read)
    for page in _asset_pages(engine):
        for asset_id, sha, size in page:
            report.assets += 1
            if sha not in verdicts:
                if len(verdicts) >= REMEMBERED:
                    verdicts.clear()
                    sizes.clear()
                verdicts[sha] = _verdict(store, sha, hashes)
                if verdicts[sha] is None:
                    sizes[sha] = _size(store, sha)
                # Files found and read: a missing one was looked for, not read ("41 files read",
                # then "41 assets missing", on a data dir that is not the database's); an
                # unreadable one, or a malformed row's that names no file, was not read either.
                report.reads += verdicts[sha] in (None, "damaged")
            verdict = verdicts[sha]
            if verdict is not None:
                getattr(report, verdict).append(asset_id)
            elif size is not None and sizes.get(sha) not in (None, size):  # a null size: not measured yet
                report.resized.append(asset_id)
    _leave_out_deleted_since(engine, report)
    report.unnamed, report.files, report.unnamed_paths, report.in_flight, orphans = _unnamed(engine, store)

    def crashed(found: list[tuple[str, dict[str, Any] | None, float]]) -> set[str]:
        with Session(engine) as s:
            return made_by_jobs(s, found)

    report.unexplained = unexplained_orphans(orphans, report.files - report.in_flight, crashed)
    report.temp_files, report.temp_bytes, report.broken = _leftovers(store)
    with Session(engine) as s:
        report.deleted = s.exec(select(func.count()).select_from(Asset)
                                .where(col(Asset.deleted_at).is_not(None))).one()
    return report


def check_storage(engine: Engine) -> StorageReport:
    """Each project's recorded storage usage against the sum of its live assets' sizes: one GROUP
    BY over the assets (0.6 s for 200,000 of them in SQLite, on 2 cores), not a sum per project."""
    report = StorageReport()
    live = col(Asset.deleted_at).is_(None)
    sums = (select(col(Asset.project_id).label("project_id"), func.sum(col(Asset.bytes)).label("summed"))
            .where(live).group_by(col(Asset.project_id)).subquery())
    with Session(engine) as s, s.begin():  # one snapshot: a measuring sweep's rows and usage together
        for project_id, recorded, summed in s.exec(
                select(col(Project.id), col(Project.storage_bytes), sums.c.summed)
                .outerjoin(sums, sums.c.project_id == col(Project.id)).order_by(col(Project.id))):
            report.projects += 1
            # int(): PostgreSQL's sum of a bigint is a numeric; SUM of only nulls is null (0, as the service counts it).
            if int(recorded) != int(summed or 0):
                report.off.append(UsageOff(project_id, int(recorded), int(summed or 0)))
        report.unmeasured = int(s.exec(select(func.count()).select_from(Asset)
                                       .where(live, col(Asset.bytes).is_(None))).one())
    return report


def check_ledger(engine: Engine) -> LedgerReport:
    report = LedgerReport()
    with Session(engine) as s, s.begin():  # one snapshot (see `read_only_engine`)
        _check_ledger(s, report)
    return report


def _check_ledger(s: Session, report: LedgerReport) -> None:
    report.entries = int(s.exec(select(func.count()).select_from(LedgerEntry)).one())
    report.unreconciled = int(s.exec(select(func.count()).select_from(LedgerEntry).where(
        col(LedgerEntry.kind) == "capture", col(LedgerEntry.unreconciled).is_(True))).one())
    open_jobs: set[str] = set()
    for holds, settlements, statuses in _hold_pages(s):
        for hold in holds:
            report.holds += 1
            mine = settlements.get(hold.id or 0, {})
            capture, release = mine.get("capture"), mine.get("release")
            if hold.settled and not mine:
                report.flag(SETTLED_WITHOUT_ENTRY, hold.id)
            elif not hold.settled and mine:
                report.unflagged.append(str(hold.id))  # an older version's settlement
            if mine and not _adds_up(hold.amount, capture, release):
                report.flag(AMOUNTS, hold.id)
            if not hold.settled and not mine:
                # The sweep settles the holds of finished jobs: one whose job is gone (deleted by
                # hand, restored from another backup), or names none, holds its credits for good.
                if hold.job_id not in statuses:
                    report.flag(JOBLESS_HOLD, hold.id)
                elif hold.job_id in open_jobs:
                    report.flag(SECOND_OPEN_HOLD, hold.id)
                open_jobs.add(hold.job_id or "")
                if statuses.get(hold.job_id or "") in TERMINAL:
                    report.open_finished.append(str(hold.id))
    for problem, ids in ((STRAY, _stray(s)), (LOOSE_RELEASE, _loose_releases(s)),
                         (EARLY_ADJUSTMENT, _early_adjustments(s)), (SECOND_CHARGE, _second_charges(s))):
        for entry_id in ids:
            report.flag(problem, entry_id)


def _adds_up(held: int, capture: LedgerEntry | None, release: LedgerEntry | None) -> bool:
    captured = capture.amount if capture is not None else 0
    released = release.amount if release is not None else 0
    if capture is not None and captured > held:  # the provider charged more: nothing is released
        return release is None
    return captured + released == held


def _hold_pages(s: Session) -> Iterator[tuple[list[LedgerEntry], dict[int, dict[str, LedgerEntry]],
                                               dict[str, str]]]:
    """Holds by id, a page at a time, with their captures and releases and their jobs' statuses."""
    after = 0
    while True:
        holds = list(s.exec(select(LedgerEntry).where(col(LedgerEntry.kind) == "hold", col(LedgerEntry.id) > after)
                            .order_by(col(LedgerEntry.id)).limit(PAGE)).all())
        if not holds:
            return
        ids = [hold.id for hold in holds]
        settlements: dict[int, dict[str, LedgerEntry]] = {}
        for entry in s.exec(select(LedgerEntry).where(col(LedgerEntry.hold_id).in_(ids),
                                                      col(LedgerEntry.kind).in_(("capture", "release")))):
            settlements.setdefault(entry.hold_id or 0, {})[entry.kind] = entry
        job_ids = {hold.job_id for hold in holds if hold.job_id}
        statuses = dict(s.exec(select(Job.id, Job.status).where(col(Job.id).in_(job_ids))).all())
        yield holds, settlements, statuses
        s.expunge_all()  # a page at a time in memory, however long the ledger
        after = holds[-1].id or 0


def _stray(s: Session) -> list[int | None]:
    hold = aliased(LedgerEntry)
    entry = aliased(LedgerEntry)
    # Outer: a settlement whose hold is gone (deleted by hand, with SQLite's foreign keys off) is one.
    return list(s.exec(select(entry.id).outerjoin(hold, col(hold.id) == col(entry.hold_id))
                       .where(col(entry.kind).in_(("capture", "release", "adjustment")),
                              col(entry.hold_id).is_not(None),
                              or_(col(hold.id).is_(None), col(hold.kind) != "hold",
                                  col(hold.project_id) != col(entry.project_id),
                                  ~col(hold.job_id).is_not_distinct_from(col(entry.job_id))))
                       .order_by(col(entry.id))).all())


def _second_charges(s: Session) -> list[int | None]:
    """Captures without a hold (metered local work, estimated free) of jobs a capture of a hold on
    the same engine charged too: for one engine the service writes one or the other, so both is the
    job charged twice. A job moved off a paid engine no process has any more, whose earlier attempt
    a provider had accepted, is charged there on its hold, and by a free engine it moved to without
    one: each engine's bill. A capture naming no engine (the service always names one: typed in by
    hand) is no other engine's bill, so it counts as the same engine's."""
    held = aliased(LedgerEntry)
    same_engine = or_(col(held.engine).is_(None), col(LedgerEntry.engine).is_(None),
                      col(held.engine) == col(LedgerEntry.engine))
    charged_on_hold = select(held.id).where(col(held.kind) == "capture", col(held.hold_id).is_not(None),
                                            col(held.job_id) == col(LedgerEntry.job_id), same_engine).exists()
    return list(s.exec(select(LedgerEntry.id).where(col(LedgerEntry.kind) == "capture",
                                                    col(LedgerEntry.hold_id).is_(None), charged_on_hold)
                       .order_by(col(LedgerEntry.id))).all())


def _loose_releases(s: Session) -> list[int | None]:
    return list(s.exec(select(LedgerEntry.id).where(col(LedgerEntry.kind) == "release",
                                                    col(LedgerEntry.hold_id).is_(None))
                       .order_by(col(LedgerEntry.id))).all())


def _early_adjustments(s: Session) -> list[int | None]:
    capture = aliased(LedgerEntry)
    adjustment = aliased(LedgerEntry)
    reconciled = select(capture.id).where(col(capture.hold_id) == col(adjustment.hold_id),
                                          col(capture.kind) == "capture",
                                          col(capture.unreconciled).is_(False)).exists()
    return list(s.exec(select(adjustment.id).where(col(adjustment.kind) == "adjustment", ~reconciled)
                       .order_by(col(adjustment.id))).all())


def _leave_out_deleted_since(engine: Engine, report: StoreReport) -> None:
    """Assets found wanting that were deleted after their page was read: beside a running service,
    the sweep had taken the file of one deleted meanwhile, and `check` called it lost (exit 1)."""
    wanting = [*report.missing, *report.damaged, *report.unreadable, *report.set_aside, *report.resized]
    deleted: set[str] = set()
    for first in range(0, len(wanting), PAGE):
        with Session(engine) as s:
            deleted.update(s.exec(select(Asset.id).where(col(Asset.id).in_(wanting[first:first + PAGE]),
                                                         col(Asset.deleted_at).is_not(None))).all())
    if deleted:
        report.assets -= len(deleted)
        for name in ("missing", "damaged", "unreadable", "set_aside", "resized"):
            setattr(report, name, [asset_id for asset_id in getattr(report, name) if asset_id not in deleted])


def _asset_pages(engine: Engine) -> Iterator[list[tuple[str, str, int | None]]]:
    """Live assets' (id, sha256, bytes), a page at a time."""
    after = ""
    while True:
        with Session(engine) as s:
            # A deleted asset's file is the sweep's to remove: its absence is no finding.
            rows = list(s.exec(select(Asset.id, Asset.sha256, Asset.bytes)
                               .where(col(Asset.id) > after, col(Asset.deleted_at).is_(None))
                               .order_by(col(Asset.id)).limit(PAGE)).all())
        if not rows:
            return
        yield [(asset_id, sha, size) for asset_id, sha, size in rows]
        after = rows[-1][0]


def _verdict(store: ArtifactStore, sha: str, hashes: bool) -> str | None:
    try:
        path = store.path_for(sha)
    except NotFound:
        return "malformed"
    try:
        if not path.is_file():
            if path.exists():  # a folder or a device in its place: there, and not readable as the image
                return "unreadable"
            asides = list(path.parent.glob(f".gc-{sha}-*.png"))
            return _aside_verdict(asides, sha) if hashes and asides else "set_aside" if asides else "missing"
        if hashes and _sha256(path) != sha:
            return "damaged"
    except OSError:  # a disk error, a permission: this file, not the whole check
        return "unreadable"
    return None


def _size(store: ArtifactStore, sha: str) -> int | None:
    """A sound file's size; None if it went meanwhile (a sweep's), or the disk failed now."""
    try:
        return store.path_for(sha).stat().st_size
    except OSError:
        return None


def _aside_verdict(asides: list[Path], sha: str) -> str:
    """A set-aside file is the asset's image only if its bytes are (the API serves it, and the
    next sweep puts it back): "set_aside" when one of them hashes to its name, else as a file at
    home would read."""
    read = False
    for aside in asides:
        try:
            if _sha256(aside) == sha:
                return "set_aside"
            read = True
        except OSError:
            continue
    return "damaged" if read else "unreadable"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _unnamed(engine: Engine, store: ArtifactStore) -> tuple[int, int, list[str], int, list[Path]]:
    """(files no asset names, files, the paths of the first UNNAMED_LISTED of the former, files no
    asset names that may be running jobs', the former's paths) in the store. While a job runs, an unnamed file younger
    than the sweep's grace may be its image before its end commits: counted apart. With no job
    running, none can be, and a young one counts as any other (a copy of a running service's
    SQLite file without its -wal names none of the recent files).

    A file set aside (`.gc-<sha>-*.png`) counts as the sweep counts it: one no asset names is an
    orphan whose removal a crash cut short (a canceled job's `discard`, a sweep), left out where the
    sweep, which weighs it for its alarm and removes it, counted it.

    Whether a job runs is read with each batch's names, in their snapshot, taken after the batch
    was listed: read once before the listing, a job claimed meanwhile had its images (stored before
    the rows naming them) counted as orphans, and listed to move out of the store."""
    cutoff = time.time() - ORPHAN_GRACE_SECONDS
    unnamed = files = in_flight = 0
    paths: list[str] = []
    every: list[Path] = []
    for batch in _batches((sha, path) for path in store.root.glob("*/*.png")
                          if (not path.name.startswith(".") or path.name.startswith(".gc-"))
                          and (sha := stored_sha(path)) is not None and _regular(path)):
        with Session(engine) as s:
            shas = {sha for sha, _ in batch}
            # With those a running job stored for its recovery to adopt (`orchestrator.adopt`): paid for.
            named = set(s.exec(select(Asset.sha256).where(col(Asset.sha256).in_(shas)))) | adopt.pending(s, shas)
            running = s.exec(select(Job.id).where(col(Job.status) == "running").limit(1)).first() is not None
        unnamed_here = [path for sha, path in batch if sha not in named]
        if running:
            old = [path for path in unnamed_here if not _written_since(path, cutoff)]
            in_flight += len(unnamed_here) - len(old)
            unnamed_here = old
        unnamed += len(unnamed_here)
        paths += [str(path) for path in unnamed_here[:UNNAMED_LISTED - len(paths)]]
        every += unnamed_here
        files += len(batch)
    return unnamed, files, paths, in_flight, every


def _regular(path: Path) -> bool:
    """Whether `path` is a file, not a folder or a link: as `ArtifactStore.sweep_orphans` counts
    the store's files. Counted, a folder named as an image (which no sweep removes) was told as a
    crash's orphan the service removes, and enough of them took the database for another's."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:  # gone since the listing
        return False


def _written_since(path: Path, cutoff: float) -> bool:
    """Whether the file was written (or `put` again) after `cutoff`; one gone meanwhile (named and
    swept, or set aside) is no running job's."""
    try:
        return path.stat().st_mtime >= cutoff
    except OSError:
        return False


def _leftovers(store: ArtifactStore) -> tuple[int, int, list[str]]:
    """(temp files, their bytes, the folders moved aside) in the store's shard folders: what a crash
    between a write and its rename left (`ArtifactStore.sweep_temp` removes them once an hour old),
    and what a write found in an image file's place (`ArtifactStore._replace_or_keep`)."""
    temp = size = 0
    broken: list[str] = []
    for path in store.root.glob("*/.tmp-*"):
        try:
            found = path.lstat()
        except OSError:  # renamed into place, or swept, since the listing
            continue
        if stat.S_ISREG(found.st_mode):
            temp += 1
            size += found.st_size
    for path in sorted(store.root.glob("*/.broken-*")):
        if path.is_dir() and not path.is_symlink():
            broken.append(str(path))
    return temp, size, broken


def _batches(items: Iterable[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == ORPHAN_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
