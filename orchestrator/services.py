"""The objects one running service holds, built once in the app's lifespan (no global state)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib.util
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SAWarning, SQLAlchemyError
from sqlalchemy.util import asbool
from sqlmodel import col, select

from orchestrator import adopt, idempotency, identity, quota
from orchestrator.api.serialize import job_public
from orchestrator.bells import bell_for
from orchestrator.db import Database, reach, shown_url, sqlite_file
from orchestrator.disk import DiskReserve
from orchestrator.errors import InvalidRequest, NotFound, OrchestratorError
from orchestrator.events import EventBus
from orchestrator.follow import JobFollower
from orchestrator.health import EngineHealth
from orchestrator.jobs import JobService, asset_ids_in
from orchestrator.ledger import Ledger
from orchestrator.metrics import SettledTimes, SharedRead
from orchestrator.metrics import render as metrics_text
from orchestrator.models import Asset, Job, Project
from orchestrator.outage import Outage
from orchestrator.policy_versions import PolicyVersions
from orchestrator.prices import load_price_overrides, unread_prices
from orchestrator.queue import Scheduler
from orchestrator.retention import expire_drafts, made_by_jobs
from orchestrator.routing import Router, policy_warnings
from orchestrator.runner import JobRunner
from orchestrator.settings import CONFIG_FILE_VARIABLE, Settings, control_character_problem, source_of
from orchestrator.store import ORPHAN_GRACE_SECONDS, ArtifactStore, PreviewFiles, SweepRefused
from orchestrator.stream_slots import StreamSlots
from orchestrator.webhook_deliveries import expire_deliveries
from orchestrator.webhooks import Deliverer
from orchestrator.workers import DeviceLock, Presence
from policies import BUILTIN, Policy, PolicyError, PolicyStore
from tiers._local import LocalRuntime
from tiers.base import EngineContext
from tiers.lite import LiteEngine
from tiers.registry import EngineRegistry, extra_engine_problems
from tiers.tiny import NAME as TINY_MODEL

log = logging.getLogger(__name__)
# Seconds a stopping service waits for the inference thread before it lets the device go.
DEVICE_IDLE_TIMEOUT = 30.0
# How long a stop waits for a ring still out (one short write) before the database goes.
RING_WAIT_SECONDS = 5.0
# The asset sweep lists the whole store: not at every scheduler sweep.
ORPHAN_SWEEP_SECONDS = 3600.0
# The first bytes of every SQLite database file (https://sqlite.org/fileformat.html).
SQLITE_HEADER = b"SQLite format 3\x00"


def config_file_problem() -> str | None:
    """What is wrong with the configuration file `ORCH_CONFIG_FILE` names, if anything: the default
    name may be absent, a named file must not."""
    named = os.environ.get(CONFIG_FILE_VARIABLE)
    if named and not named.strip():  # told as "no such file: " and a name that could not be seen
        return f"{CONFIG_FILE_VARIABLE}: is blank ({named!r}): name a TOML file, or unset it for ./orchestrator.toml"
    if named and (problem := control_character_problem(named)) is not None:
        # Printed as given, a line break split the one-line refusal in two; refused as every
        # setting refuses one (`Settings`), whether or not a file of that name is there.
        return f"{CONFIG_FILE_VARIABLE}: {problem}"
    path = Path(os.path.expanduser(named)) if named else None
    try:
        if path is None or path.is_file():
            return None
        kind = "is a directory, not a TOML file" if path.is_dir() else "no such file"
    except OSError as exc:  # a folder this user may not open, a name too long: `check` raised it
        return f"{CONFIG_FILE_VARIABLE}: cannot be read ({exc.strerror or exc}): {str(named)[:200]}"
    return f"{CONFIG_FILE_VARIABLE}: {kind}: {named}"


def startup_problems(settings: Settings, *, service: bool = True, demo_policy: str | None = None) -> list[str]:
    """What would stop the service from starting, each naming the setting to fix: the CLI prints
    these instead of a traceback from inside the server's start-up. `service=False` (migrate)
    leaves out what only a running service reads: prices and policies. The folders are made and
    probed last, once nothing else is refused: a refused start (a policy's typo) left a data dir,
    its `assets/` and `locks/`, wherever a mistyped ORCH_DATA_DIR pointed. A server's database
    (PostgreSQL) is connected to before they are made: `DatabaseError` when it cannot be.
    `demo_policy`: the policy `demo --policy` names for its project, judged with the service's."""
    problems = [problem] if (problem := config_file_problem()) else []
    problems.extend(_read_only_database(settings) or database_url_problems(settings.resolved_database_url)
                    or _database_file_problems(settings))
    if "*" in settings.cors_origin_list and settings.admin_key is None:
        problems.append(f"{source_of('cors_origins')}: * without ORCH_ADMIN_KEY would let every web page its users "
                        "open drive the service (and spend the budgets): set ORCH_ADMIN_KEY, or list the "
                        "dashboards' origins")
    if service:
        problems.extend(f"{source_of('engines')}: {problem}" for problem in extra_engine_problems(settings.engines))
        try:
            load_price_overrides(settings)
        except InvalidRequest as exc:
            problems.append(f"{source_of('prices_file')}: {exc.message}")
        # A file refused at start would leave its policy absent, or worse, the built-in it meant to
        # override (a typo in a stricter `balanced.toml` routing to the cloud): refused here instead.
        # A reload of a running service keeps the last good version (see policies.loader).
        policies = PolicyStore(settings.policy_dir)
        problems.extend(f"{source_of('policy_dir')}: {error.message}" for error in policies.errors)
        if settings.policy not in policies:
            problems.append(f"{source_of('policy')}: '{settings.policy}' is not a loaded policy "
                            f"(known: {', '.join(policies.names())})")
        if demo_policy is not None and demo_policy not in policies and not policies.errors:
            # Told by the service's 422 once it had started (migrated, loaded its model) otherwise.
            # Not while a file is refused: that may be the policy's own, and its error says why.
            problems.append(f"--policy: '{demo_policy}' is not a loaded policy (known: {', '.join(policies.names())})")
    # `migrate` on a database of its own (PostgreSQL, a SQLite file elsewhere) writes nothing there.
    data_dir = service or not settings.database_url
    if data_dir and (unexpanded := _no_home(settings.data_dir)) is not None:
        problems.append(f"{source_of('data_dir')}: {unexpanded}")
    if problems:
        # Said with the others all the same, where it takes no folder made to tell.
        if data_dir and (file := file_in_the_way(settings.data_dir)) is not None:
            problems.append(f"{source_of('data_dir')}: {not_a_directory(settings.data_dir, file)}")
        return problems
    if data_dir and sqlite_file(settings.resolved_database_url) is None:
        # A server's database is reached before anything is made: one that refused the connection
        # (away, a wrong port or password) was told by the migration, after the data dir, its
        # assets/ and locks/ were made for a start that was none. (A SQLite file is made in its
        # folder by the start itself; the data dir is made first as it holds the default one.)
        reach(settings.resolved_database_url)
    # The cache before the data dir: a cache refused at start left a data dir made for nothing.
    if service and TINY_MODEL in {settings.lite_model, settings.effective_hifi_model}:
        problems.extend(_cache_dir_problems(settings))
    elif service and "auto" in {settings.lite_model, settings.effective_hifi_model}:
        # `auto` builds it only when no real model is at hand: the start goes on, told.
        for problem in _cache_dir_problems(settings):
            log.warning("%s: with ORCH_LITE_MODEL=auto and no real model at hand, the offline tiny model it falls "
                        "back to cannot be built there", problem)
    if data_dir and not problems:
        problems.extend(_data_dir_problems(settings, assets=service))
    return problems


def _read_only_database(settings: Settings) -> list[str]:
    """A SQLite URL asking for the database read-only (`mode=ro`, `immutable`), which the service
    and `migrate` write to. Told so whether or not SQLite would read the option as written: told
    only to add uri=true, as `database_url_problems` tells, a user would meet this refusal next."""
    try:
        url = make_url(settings.resolved_database_url)
    except (ArgumentError, ValueError):  # told by `database_url_problems`
        return []
    if url.get_backend_name() != "sqlite":
        return []
    if url.query.get("mode") == "ro":
        option = "mode=ro"
    elif str(url.query.get("immutable")).lower() in ("1", "true", "yes", "on"):  # SQLite's words for true
        option = f"immutable={url.query['immutable']}"
    else:
        return []
    # With uri=true it was refused by the first write, after the data dir and its folders were made.
    return [f"{source_of('database_url')}: {shown_url(settings.resolved_database_url)}: {option} asks for the "
            "database read-only, and the service writes to it: remove it (`orchestrator check` reads it "
            "read-only by itself)"]


def _database_file_problems(settings: Settings) -> list[str]:
    """A SQLite database, its journal or its migration lock that is there and that this process
    may not write (another user's, a read-only mount). SQLite opens such a file read-only, and the
    refusal came at the first write, after `-wal`, `-shm`, `assets/` and `locks/` were made as
    this user: the owner's own service could then not write them."""
    path = sqlite_file(settings.resolved_database_url)
    if path is None:
        return []
    where = source_of("database_url") if settings.database_url else f"{source_of('data_dir')} (its {path.name})"
    # The default database is in the data dir: a file in its way is told as the data dir's (`startup_problems`).
    if settings.database_url and (file := file_in_the_way(path.parent)) is not None:
        # Told at the migration, after serve and worker had made the data dir: "(File exists)".
        return [f"{where}: cannot make {path}: {file} is not a directory"]
    for file in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", ".migrate-lock"))):
        try:
            if not file.is_file():  # absent, or what the start's other checks tell
                continue
            # Opened for writing and closed, nothing written: the refusal's own reason.
            os.close(os.open(file, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:
            fix = ": run as the user that owns it, or give it to this one" if exc.errno == errno.EACCES else ""
            return [f"{where}: cannot write {file} ({exc.strerror or exc}){fix}"]
    # SQLite tells it only at the first read, after `assets/`, `locks/` and a `.migrate-lock`
    # beside the file were made. Read here as bytes: opened by SQLite, a probe could leave -wal and
    # -shm files. An empty file is a new database (SQLite writes its header at the first write).
    try:
        if not path.is_file():
            return []
        with path.open("rb") as database:
            header = database.read(len(SQLITE_HEADER))
    except OSError as exc:
        return [f"{where}: cannot read {path} ({exc.strerror or exc})"]
    if header and header != SQLITE_HEADER:
        return [f"{where}: cannot use the database at {shown_url(settings.resolved_database_url)}: file is not a "
                "database (it does not begin with SQLite's header)"]
    return []


def file_in_the_way(folder: Path) -> Path | None:
    """What keeps `folder` from being a directory: itself or a folder above it that is something
    else (a file); None when it is one or may be made (a permission is the write probe's to tell)."""
    try:
        for path in (folder, *folder.parents):
            if path.exists():
                return None if path.is_dir() else path
    except OSError:  # a folder above that this user may not open
        return None
    return None


def not_a_directory(folder: Path, file: Path) -> str:
    return f"{folder} is not a directory" if file == folder else f"cannot make {folder}: {file} is not a directory"


def cannot_write(folder: Path, exc: OSError) -> str:
    """Why `folder` cannot be written in; a file where it should be is said as such (the OSError
    of making it says only "File exists")."""
    file = file_in_the_way(folder)
    return not_a_directory(folder, file) if file is not None else f"cannot write in {folder} ({exc.strerror or exc})"


# A disk (or a quota) with no room left.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class ForNow(str):
    """A start-up problem that passes without a change to the setup (a full disk: freed, the same
    start succeeds). The command exits 1 for it, not 2, so that a supervisor told to give up on
    2 (`RestartPreventExitStatus=2`) keeps restarting it, as it does on a disk that fills later."""


def _unwritable(setting: str, folder: Path, exc: OSError) -> str:
    problem = f"{source_of(setting)}: {cannot_write(folder, exc)}"
    return ForNow(problem) if exc.errno in NO_SPACE else problem


def _data_dir_problems(settings: Settings, *, assets: bool) -> list[str]:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=settings.data_dir) as probe:
            # Some bytes, not an empty file (which a full disk still makes): the migrations would
            # otherwise meet the full disk with a traceback.
            probe.write(bytes(64 * 1024))
            probe.flush()
    except OSError as exc:
        return [_unwritable("data_dir", settings.data_dir, exc)]
    if not assets:  # migrate stores no images
        return []
    # The images' folder too, the way they are stored (a file renamed into place): one restored
    # under another owner, or a read-only mount, let the service start, and every job make its
    # images, paid for, and then fail to keep them.
    folder = settings.assets_dir
    left: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".probe-")
        left = Path(name)
        with os.fdopen(fd, "wb") as file:
            file.write(b"probe")
        os.replace(left, left.with_name(left.name + "-renamed"))
        left = left.with_name(left.name + "-renamed")
    except OSError as exc:
        return [_unwritable("data_dir", folder, exc)]
    finally:
        if left is not None:
            with contextlib.suppress(OSError):
                left.unlink()
    # Its locks: without them the service started all the same, a traceback on the terminal, its
    # jobs run without the device's lock, and `GET /v1/workers` listed no process.
    locks = settings.data_dir / "locks"
    try:
        locks.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=locks):
            pass
    except OSError as exc:
        return [_unwritable("data_dir", locks, exc)]
    return []


def _no_home(folder: Path) -> str | None:
    """Why `folder` cannot be made where it was meant: its `~user` (or `~` without a home) named no
    home folder, and was kept as given; None when it starts with none."""
    first = folder.parts[0] if folder.parts else ""
    if not first.startswith("~"):
        return None
    # Made under the working directory, a folder named `~stuido` held a new, empty database.
    return (f"{folder}: {first} names no home folder here (no such user, or no HOME): write the folder out "
            "(/home/studio/orchestrator)")


def _cache_dir_problems(settings: Settings) -> list[str]:
    """The offline tiny model is built there (with `auto`, when no real model is at hand)."""
    if (unexpanded := _no_home(settings.cache_dir)) is not None:
        return [f"{source_of('cache_dir')}: {unexpanded}"]
    try:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=settings.cache_dir):
            pass
    except OSError as exc:
        return [_unwritable("cache_dir", settings.cache_dir, exc)]
    return []


def _in_memory(url: URL) -> bool:
    """Whether a SQLite URL names a database in memory: `:memory:`, or as a URI (`uri` read as
    SQLAlchemy reads it) `file::memory:`, `mode=memory` or the `memdb` VFS."""
    if url.database in (None, "", ":memory:"):
        return True
    if not asbool(url.query.get("uri", False)):
        return False
    return (str(url.database).startswith("file::memory:") or url.query.get("mode") == "memory"
            or url.query.get("vfs") == "memdb")


# The options SQLAlchemy's SQLite driver takes from a URL's query; any other is SQLite's own
# (`mode`, `cache`, `immutable`, ...), which SQLite reads only from a `file:` URI.
SQLITE_DRIVER_OPTIONS = frozenset({"uri", "timeout", "isolation_level", "detect_types", "check_same_thread",
                                   "cached_statements"})


def _unread_sqlite_options(url: URL) -> str | None:
    """Why SQLite would not read a SQLite URL's own options (`?mode=ro`) as such; None when it
    would, or there are none."""
    options = sorted(set(url.query) - SQLITE_DRIVER_OPTIONS)
    as_uri = asbool(url.query.get("uri", False))
    if not options or (as_uri and str(url.database).startswith("file:")):
        return None
    # Without uri=true SQLAlchemy drops them with a warning nobody reads: `?mode=ro` opened the
    # file read-write. With it, after a plain path, SQLite took `x.db?mode=ro` for the file's name
    # and made a new, empty database so named.
    one = len(options) == 1
    fate = (f"SQLite would take {'it' if one else 'them'} for part of the file's name (a new, empty database)"
            if as_uri else f"{'it' if one else 'they'} would be ignored")
    given = "&".join(f"{key}={value}" for key, values in url.query.items() if key != "uri"
                     for value in (values if isinstance(values, tuple) else (values,)))
    path = str(url.database).removeprefix("file:")
    return (f"{' and '.join(options)} {'is an option' if one else 'are options'} of SQLite's own, which it takes only "
            f"from a file: URI with uri=true (sqlite:///file:{path}?{given}&uri=true); as written, {fate}")


def _names_a_database(url: URL) -> bool:
    """Whether a PostgreSQL URL names its database: in its path, its query (`dbname`, a
    `service` of pg_service.conf), or libpq's environment (PGDATABASE, PGSERVICE)."""
    return bool(url.database or url.query.get("dbname") or url.query.get("service")
                or os.environ.get("PGDATABASE") or os.environ.get("PGSERVICE"))


def database_url_problems(text: str) -> list[str]:
    """What is wrong with `ORCH_DATABASE_URL` before any connection is tried (never showing its password)."""
    told = source_of("database_url")
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):  # a port that is not a number; the text may hold a password
        return [f"{told}: not a database URL (e.g. postgresql+psycopg://user@host/db)"]
    if "@" in (url.host or ""):
        # A password with an @ not written as %40: the URL is split at the first one, the rest of
        # the password read as the host, and shown (the driver's error named it) where none may be.
        return [f"{told}: an @ in its user or password must be written %40 (percent-encoded); the URL is not "
                "shown, as part of the password would be"]
    shown = shown_url(text)
    if url.get_backend_name() == "postgresql" and not _names_a_database(url):
        # libpq then takes the database named after the user (`postgres` for postgres): the
        # tables went into the server's own.
        return [f"{told}: {shown} names no database: add it after the host (postgresql+psycopg://user@host/orchestrator)"]
    if url.get_backend_name() == "postgres":  # the scheme Heroku and libpq write; SQLAlchemy knows no such name
        return [f"{told}: {shown}: write postgresql+psycopg:// for PostgreSQL"]
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        return [f"{told}: {shown} is neither SQLite nor PostgreSQL, the databases supported"]
    if url.get_backend_name() == "sqlite" and (url.host or url.port or url.username or url.password):
        # `sqlite://srv/x.db` for `sqlite:////srv/x.db`: SQLAlchemy refuses it with a traceback, and
        # `check` read it as the relative path `x.db` under another folder.
        return [f"{told}: {shown} names a host, which a SQLite URL does not: a file is "
                "sqlite:////absolute/path.db (four slashes) or sqlite:///relative/path.db (three)"]
    if url.port is not None and not 1 <= url.port <= 65535:
        # libpq refuses it at the first connection only ('invalid port number'): exit 1, after
        # `migrate` or `serve` had made the data dir.
        return [f"{told}: {shown}: its port {url.port} is not one of 1 to 65535"]
    try:
        with warnings.catch_warnings():  # of the options SQLite's driver drops: told below
            warnings.simplefilter("ignore", SAWarning)
            url.get_dialect()().create_connect_args(url)
    except (ImportError, NoSuchModuleError):
        pass  # a driver that is not there: told below
    except (ValueError, TypeError) as exc:
        # SQLite's options (`?timeout=soon`, `?uri=maybe`) are converted as the engine is made:
        # a traceback and exit 1 from migrate, serve and worker, after the database's folder was.
        return [f"{told}: {shown}: an option in its query cannot be read ({exc})"]
    if url.get_backend_name() == "sqlite" and (url.database or "").startswith("~"):
        # SQLite takes it as a folder named `~` under the working directory: processes started
        # from two folders used two databases, and `migrate` made the one nobody meant.
        return [f"{told}: {shown}: a SQLite URL's path is not expanded; write the home folder out "
                "(sqlite:////home/studio/orchestrator.db), or leave it unset for ORCH_DATA_DIR's"]
    if url.get_backend_name() == "sqlite" and _in_memory(url):
        # Each connection would open its own empty database: the tables made at start vanish.
        return [f"{told}: an in-memory SQLite database cannot be shared between the service's "
                "connections; give a file (sqlite:////srv/orchestrator/orchestrator.db), or leave it unset"]
    if url.get_backend_name() == "sqlite" and (unread := _unread_sqlite_options(url)) is not None:
        return [f"{told}: {shown}: {unread}"]
    try:
        url.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as exc:
        if url.get_backend_name() == "postgresql" and importlib.util.find_spec("psycopg") is not None:
            # A URL naming another driver (+psycopg2): the extra installs psycopg 3, here already.
            return [f"{told}: the driver of {shown} is not installed ({exc}); psycopg 3 is: "
                    "write the URL as postgresql+psycopg://..."]
        return [f"{told}: the driver of {shown} is not installed ({exc}); for "
                "PostgreSQL: pip install 'tiered-orchestrator[postgres]'"]
    return []


@dataclass
class Services:
    settings: Settings
    db: Database
    store: ArtifactStore
    bus: EventBus
    registry: EngineRegistry
    policies: PolicyStore
    engine_health: EngineHealth
    router: Router
    ledger: Ledger
    runner: JobRunner
    scheduler: Scheduler
    jobs: JobService
    follower: JobFollower
    streams: StreamSlots
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # Runs as long as the service: kept apart from `background`, whose tasks finish.
    health_sharing: asyncio.Task[None] | None = None
    asset_sweeping: asyncio.Task[None] | None = None
    policy_watching: asyncio.Task[None] | None = None
    webhook_delivering: asyncio.Task[None] | None = None
    # Its sender, whose destinations set aside `/metrics` counts (None: not started, none).
    webhook_deliverer: Deliverer | None = None
    # Set by `aclose`: the asset sweep's thread, which a cancel does not reach, stops between two
    # batches of drafts (a first sweep of 100,000 took 30 s, which a stop waited out), and between
    # two files of the store (`ArtifactStore.sweep_orphans`).
    sweeps_stop: threading.Event = field(default_factory=threading.Event)
    # Assets whose file the sweeps found missing and warned of (`quota.measure`): once a process.
    missing_told: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url)
        db.migrate()
        db.bell = bell_for(settings.resolved_database_url, settings.data_dir / "locks")
        store = ArtifactStore(settings.assets_dir)
        identity.bind(db, store)  # before anything is stored or swept: WrongStore when the pair is not one install
        store.sweep_temp()
        store.make_shards()
        bus = EventBus()
        overrides = load_price_overrides(settings)
        for told in unread_prices(settings, overrides):
            log.warning("ORCH_PRICES_FILE %s: %s", settings.prices_file, told)
        ctx = EngineContext(settings=settings, price_overrides=overrides)
        registry = EngineRegistry.load(ctx)
        policies = PolicyStore(settings.policy_dir, shared=PolicyVersions(db))
        for error in policies.errors:
            log.error("policy refused: %s", error.message)
        for warning in policy_warnings(policies, registry):
            log.warning("policy: %s", warning)
        if settings.policy not in policies:
            log.error("ORCH_POLICY names '%s', which is not loaded (known: %s): new projects must name a policy",
                      settings.policy, ", ".join(policies.names()))
        health = EngineHealth()
        health.sync(db)  # what the other processes of this database found, before the first route
        router = Router(registry, policies, health)
        # The database's clock, in and out of write transactions: a budget window read by a host
        # whose clock is behind was the month before the one its entries were stamped in.
        ledger = Ledger(clock=db.now)
        previews = PreviewFiles(settings.data_dir / "previews")
        # The assets folder's filesystem, where the images go: the data dir's, or a disk mounted there.
        reserve = DiskReserve(store.root, settings.min_free_disk_mb)
        runner = JobRunner(db, registry, store, bus, ledger, health, settings.local_gpu_second_credits,
                           preview_files=previews, reserve=reserve,
                           default_quota_mb=settings.project_storage_quota_mb,
                           default_local_seconds=settings.project_local_seconds_per_day,
                           lease_seconds=settings.lease_seconds)
        runner.keeps_all_local = functools.partial(_keeps_all_local, policies)
        runner.router = router
        runtime = _local_runtime(registry)
        device = None if runtime is None else DeviceLock(settings.data_dir / "locks",
                                                         functools.partial(_device, runtime))
        presence = Presence(settings.data_dir / "locks", shared_database=not db.is_sqlite,
                            stale_after=3 * settings.lease_seconds)
        scheduler = Scheduler(db, registry, runner, bus, ledger, presence, lease_seconds=settings.lease_seconds,
                              sweep_interval=settings.sweep_interval, poll_interval=settings.poll_interval,
                              device=device, stop_grace=settings.stop_grace)
        jobs = JobService(db, router, ledger, bus, scheduler.notify, settings.policy, presence, store,
                          max_pending=settings.max_pending_jobs, reserve=reserve,
                          default_quota_mb=settings.project_storage_quota_mb,
                          default_local_seconds=settings.project_local_seconds_per_day,
                          lease_seconds=settings.lease_seconds)
        scheduler.sweepers.append(("forgetting expired idempotency keys",
                                   functools.partial(idempotency.forget_expired, db)))
        follower = JobFollower(db, bus, scheduler.holds, settings.poll_interval, previews)
        bus.pinned = scheduler.holds
        return cls(settings, db, store, bus, registry, policies, health, router, ledger, runner, scheduler, jobs,
                   follower, StreamSlots(settings.max_streams_per_key))

    def listen(self) -> None:
        """Look at once when another process sharing the database commits (`orchestrator.bells`):
        for jobs to run and cancels to obey (the scheduler), and for the streams of jobs run
        elsewhere (the follower); and share engine health every `ORCH_POLL_INTERVAL`. Call it on
        the loop."""
        def heard() -> None:
            self.scheduler.heard()
            self.follower.heard()

        self.db.bell.listen(heard)
        self.health_sharing = asyncio.create_task(self._share_health(), name="engine health")
        # The shipped files too (edited in a checkout), with or without ORCH_POLICY_DIR.
        self.policy_watching = asyncio.create_task(self._watch_policies(), name="policy files")

    def reload_policies(self, why: str) -> list[PolicyError]:
        """Read the policy files again (SIGHUP, their change seen, `POST /v1/policies/reload`);
        what a reload refuses keeps its last good version (returned, and logged). A policy the
        new files make keep everything on this machine is applied to its projects' queued work
        as a move to it would be (`JobService.keep_local`): the routing they were queued with
        would send prompts and images off the machine. Blocking: not on the event loop."""
        local_before = self._local_policies()
        sources = {policy.name: policy.source for policy in self.policies.list()}
        warned = set(policy_warnings(self.policies, self.registry))
        errors = self.policies.reload()
        # One look at the loaded set: a look of the watcher's thread (`resync_policies`) may drop a name.
        loaded = {policy.name: policy for policy in self.policies.list()}
        for error in errors:
            log.error("policy refused on reload (%s): %s", self._what_stays(error, loaded), error.message)
        log.info("policies reloaded (%s): %s", why, ", ".join(self.policies.names()))
        # Said as at start-up: a typo ("Gemini") told only to the API's reader failed every request
        # its rule routed; and what a removed file changes, which the list of names did not say.
        for warning in policy_warnings(self.policies, self.registry):
            if warning not in warned:
                log.warning("policy: %s", warning)
        told = {Path(error.file).stem for error in errors if Path(error.file).suffix.lower() == ".toml"}
        for name, source in sorted(sources.items()):
            now = loaded[name].source if name in loaded else None
            if self.policies.from_service(name) is False:
                if name not in told:  # the directory could not be listed: its own error named no file
                    log.warning("policy '%s': %s", name, _removal_seen(now))
                continue  # its file is there, refused: told above, with what its removal left
            if now is None:
                log.warning("policy '%s' is no longer loaded (%s is gone): its projects' new jobs are refused "
                            "(no_route) until a policy of that name is back or they move to another", name, source)
            elif now == BUILTIN and source != BUILTIN:
                log.warning("policy '%s': %s is gone, and the built-in policy of that name routes its projects "
                            "again", name, source)
        self._apply_local_policies("on reload", self._local_policies() - local_before)
        return errors

    def _what_stays(self, refused: PolicyError, loaded: dict[str, Policy]) -> str:
        """What serves in place of a refused file: its last good version, a built-in, or nothing."""
        file = Path(refused.file)
        if file.suffix.lower() != ".toml":  # the folder itself, unreadable: nothing read from it is dropped
            return ("the policies read from it before stay, as the service's other processes last read them"
                    if self.policies.shared is not None else "the policies read from it before stay")
        kept = loaded[file.stem].source if file.stem in loaded else None
        shared = self.policies.from_service(file.stem)
        if shared is False:
            return _removal_seen(kept)
        if kept is None:
            return "not loaded"
        if kept == BUILTIN:
            return "the built-in policy of that name stays"
        return ("the service's last good version, read by another process, serves" if shared
                else "the last good version stays")

    def _apply_local_policies(self, when: str, policies: set[str] | None = None) -> None:
        """`keep_local` for the projects with unfinished work under `policies` (default: every loaded
        policy that keeps everything on this machine); a database away is logged, not raised."""
        policies = self._local_policies() if policies is None else policies
        if not policies:
            return
        try:
            self._keep_projects_local(policies)
        except SQLAlchemyError as exc:
            log.error("policies %s keep everything on this machine, but their projects' unfinished jobs could not be "
                      "read %s (%s): a process that runs jobs cancels those queued for engines off the machine "
                      "when it claims them, once its own policies say the same (a worker reloads its policy files "
                      "when they change)", ", ".join(sorted(policies)), when, exc)

    def keep_local(self, project_id: str, policy: str) -> list[str]:
        """`JobService.keep_local`, and the work of the jobs it cancels withdrawn (one queued to be
        reattached had a provider's accepted work)."""
        canceled = self.jobs.keep_local(project_id, policy)
        for job_id in canceled:
            self.scheduler.forget_abandoned(self.jobs.get(job_id))
        return canceled

    def resync_policies(self) -> None:
        """`PolicyStore.resync`: while a file is refused, the version the service keeps of it may
        change after this process's reload (another process told its read late); served here too,
        and a policy it makes keep everything on this machine applied as a reload's is."""
        local_before = self._local_policies()
        changed = self.policies.resync()
        loaded = {policy.name: policy for policy in self.policies.list()}  # one look: a reload may drop a name
        for name in changed:
            served = loaded[name].content_hash if name in loaded else None
            log.warning("policy '%s': its file is still refused (or its directory cannot be listed); %s", name,
                        f"the service's last good version (hash {served}), read by another process, now serves"
                        if self.policies.from_service(name) else
                        _removal_seen(loaded[name].source if name in loaded else None))
        self._apply_local_policies("as the service's last good version", self._local_policies() - local_before)

    def reload_policies_soon(self, why: str) -> None:
        """For a signal handler, on the event loop: the reload reads files (and may write the
        database) in a thread."""
        async def reload() -> None:
            try:
                await asyncio.to_thread(self.reload_policies, why)
            except Exception:
                log.exception("reloading the policy files (%s) failed", why)

        self.background.append(asyncio.get_running_loop().create_task(reload(), name="policy reload"))
        self.background = [task for task in self.background if not task.done()]

    def _local_policies(self) -> set[str]:
        # One look at the loaded set: another thread's reload may drop a name between two.
        return {policy.name for policy in self.policies.list() if policy.keeps_all_local}

    def _keep_projects_local(self, policies: set[str]) -> None:
        with self.db.session() as s:  # only projects with unfinished work: keep_local has nothing else to do
            projects = s.exec(select(Project.id, Project.policy).join(Job, col(Job.project_id) == col(Project.id))
                              .where(col(Project.policy).in_(policies), col(Job.status).in_(("queued", "running")))
                              .distinct()).all()
        for project_id, policy in projects:
            if canceled := self.keep_local(project_id, policy):
                log.warning("policy '%s' now keeps everything on this machine: %d queued job(s) of project %s "
                            "for engines off it canceled", policy, len(canceled), project_id)

    async def _watch_policies(self) -> None:
        """A reload asked of one process (`POST /v1/policies/reload`, SIGHUP) reached only it: the
        other API servers routed on the old rules. Every process now reloads when the files
        change, once they have held still for a look (a deploy or an editor's save may remove a
        file for an instant: its policy would be dropped in between)."""
        moving: object = None
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                now = await asyncio.to_thread(self.policies.fingerprint)
                if now == self.policies.loaded_fingerprint:
                    moving = None
                    if self.policies.needs_resync:
                        await asyncio.to_thread(self.resync_policies)
                elif now != moving:
                    moving = now  # changed since the last look: reloaded if it holds still until the next
                else:
                    moving = None
                    await asyncio.to_thread(self.reload_policies, "the policy files changed")
            except Exception:
                log.exception("reloading the policy files failed; trying again at the next look")

    async def _share_health(self) -> None:
        outage = Outage(log, "sharing engine health", f"trying again every {self.settings.poll_interval:g} s",
                        level=logging.WARNING)
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            self.db.bell.look()  # a bell socket removed under the process is bound again
            try:
                await asyncio.to_thread(self.engine_health.sync, self.db)
            except Exception as exc:  # a busy or lost database: kept, and tried again at the next look
                outage.failed(exc)
            else:
                outage.recovered()

    def sweep_asset_files(self, older_than: float = ORPHAN_GRACE_SECONDS) -> int:
        """Remove the asset files no live asset names, deleted assets' among them; how many."""
        def named(shas: list[str], deleted: bool) -> set[str]:
            with self.db.session() as s:
                gone = col(Asset.deleted_at).is_not(None) if deleted else col(Asset.deleted_at).is_(None)
                found = set(s.exec(select(Asset.sha256).where(col(Asset.sha256).in_(shas), gone).distinct()))
                # The files a running job stored before its process died, which its recovery adopts
                # (`orchestrator.adopt`): no row names them yet, and none may take them first.
                return found if deleted else found | adopt.pending(s, shas)

        with self.db.session() as s:
            # Every asset deleted (and its file swept): no file is named, a crash's orphan included.
            emptied = s.exec(select(Asset.id).limit(1)).first() is not None and \
                s.exec(select(Asset.id).where(col(Asset.deleted_at).is_(None)).limit(1)).first() is None
        def crashed(found: list[tuple[str, dict[str, Any] | None, float]]) -> set[str]:
            with self.db.session() as s:
                return made_by_jobs(s, found)

        return self.store.sweep_orphans(lambda shas: named(shas, False), older_than,
                                        deleted=lambda shas: named(shas, True), emptied=emptied,
                                        stop=self.sweeps_stop, crashed=crashed)

    def expire_drafts(self) -> int:
        """With ORCH_DRAFT_RETENTION_DAYS, delete the drafts older than that which nothing descends
        from (`orchestrator.retention`); how many."""
        days = self.settings.draft_retention_days
        if days is None:
            return 0
        # Out of `store.recent` as a DELETE's is: a draft read in the last 30 s was served from
        # there for the rest of them while its metadata answered 410.
        deleted = expire_drafts(self.db, days, stop=self.sweeps_stop, committed=self.store.recent.forget)
        if deleted:
            log.info("deleted %d drafts older than %d days that nothing descends from (ORCH_DRAFT_RETENTION_DAYS)",
                     deleted, days)
        return deleted

    def expire_webhook_deliveries(self) -> int:
        """With ORCH_WEBHOOK_RETENTION_DAYS (not 0), delete the delivered and given-up webhook
        deliveries older than that (`orchestrator.webhook_deliveries`); how many."""
        days = self.settings.webhook_retention_days
        if not days:
            return 0
        deleted = expire_deliveries(self.db, days, stop=self.sweeps_stop)
        if deleted:
            log.info("deleted %d delivered or given-up webhook deliveries older than %d days "
                     "(ORCH_WEBHOOK_RETENTION_DAYS)", deleted, days)
        return deleted

    def measure_assets(self) -> int:
        """The sizes of the files of assets stored before sizes were kept, added to their projects'
        storage usage (`orchestrator.quota.measure`); how many."""
        return quota.measure(self.db, self.store, stop=self.sweeps_stop, told=self.missing_told)

    async def _sweep_assets(self) -> None:
        """Assets stored before sizes were kept measured (`quota.measure`: none once done, but those
        whose file is missing), drafts past ORCH_DRAFT_RETENTION_DAYS and webhook deliveries past
        ORCH_WEBHOOK_RETENTION_DAYS, then asset files no row names (`ArtifactStore.sweep_orphans`: the
        drafts' among them) and old temp files: at start, then every `ORPHAN_SWEEP_SECONDS`."""
        while True:
            try:
                await asyncio.to_thread(self.measure_assets)
            except Exception:  # retention and the files' sweep go on
                log.exception("measuring the files of assets stored before sizes were kept failed; trying again "
                              "at the next asset sweep")
            try:
                await asyncio.to_thread(self.expire_drafts)
            except Exception:  # the files are swept all the same
                log.exception("draft retention failed; trying again at the next asset sweep")
            try:
                await asyncio.to_thread(self.expire_webhook_deliveries)
            except Exception:
                log.exception("webhook delivery retention failed; trying again at the next asset sweep")
            try:
                # A temp file left by a crash, once it is old enough to be no one's write in progress:
                # a service restarted right after the crash would otherwise keep it until its next start.
                await asyncio.to_thread(self.store.sweep_temp)
                removed = await asyncio.to_thread(self.sweep_asset_files)
            except SweepRefused as exc:
                log.error("asset sweep refused: %s", exc)
            except Exception:
                log.exception("asset sweep failed")
            else:
                if removed:
                    log.info("removed %d asset files no live asset names (deleted assets', jobs canceled "
                             "while storing them)", removed)
            await asyncio.sleep(ORPHAN_SWEEP_SECONDS)

    async def start(self) -> None:
        """Start running jobs (the scheduler) and, with ORCH_LITE_PRELOAD, load the Lite model in
        the background."""
        self.listen()
        # Before any job is claimed: a policy made local while no process ran (edited during a
        # stop, or a restart before the watcher's look) was never applied to the work queued under it.
        await asyncio.to_thread(self._apply_local_policies, "at start")
        await self.scheduler.start()
        # Apart from the scheduler's sweep: listing a large store must not hold up job recovery.
        self.asset_sweeping = asyncio.create_task(self._sweep_assets(), name="asset sweep")
        secret = self.settings.webhook_secret
        self.webhook_deliverer = deliverer = Deliverer(
            self.db, self.job_as_shown, None if secret is None else secret.get_secret_value(),
            interval=self.settings.poll_interval, concurrency=self.settings.webhook_concurrency)
        self.webhook_delivering = asyncio.create_task(deliverer.run(), name="webhook deliveries")
        if self.settings.lite_preload:
            self.background.append(asyncio.create_task(self._preload_lite(), name="lite preload"))

    async def _preload_lite(self) -> None:
        lite = self.registry.get("lite") if "lite" in self.registry else None
        device = self.scheduler.device
        if not isinstance(lite, LiteEngine) or not lite.availability()[0] or device is None:
            return
        if not await asyncio.to_thread(device.try_acquire):
            log.info("ORCH_LITE_PRELOAD: another process runs this device's jobs; the model is not loaded here")
            return
        try:
            await lite.preload()
        except OrchestratorError as exc:  # a setting to change (a device, a model): said in one line
            log.error("ORCH_LITE_PRELOAD: loading %s failed: %s", lite.model, exc)
        except Exception:  # the first draft then fails with the reason, as without a preload
            log.exception("ORCH_LITE_PRELOAD: loading %s failed", lite.model)
        else:
            log.info("ORCH_LITE_PRELOAD: %s loaded and warm", lite.model)

    def job_as_shown(self, job_id: str) -> dict[str, Any] | None:
        """The job as GET /v1/jobs/{id} shows it (JSON), read in one snapshot as that does; None when
        there is none."""
        with self.db.snapshot() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            money = self.ledger.job_costs(s, [job_id]).get(job_id)
            return job_public(job, asset_ids_in(s, [job_id])[job_id], money).model_dump(mode="json")

    def log_engine_notes(self) -> None:
        """What an operator must know at start-up (the smoke model's images are noise, ...)."""
        notes: dict[str, list[str]] = {}
        for engine in self.registry:
            note = getattr(engine, "note", None)
            if note:
                notes.setdefault(note, []).append(engine.name)
        for note, names in notes.items():  # the Lite and local-hifi engines share one model: said once
            log.warning("%s: %s", ", ".join(names), note)
        for engine in self.registry:
            # A remote engine without a key or server is off by choice; one set up that cannot run
            # (a workflow file not found, a malformed password), like a local one, is a mistake.
            usable, reason = engine.availability()
            if not usable and (engine.kind == "local" or _set_up(engine)):
                log.warning("%s: unavailable: %s", engine.name, reason)

    def health(self, engine: str) -> str:
        """`ok`, `degraded` or `open` (the circuit breaker's view of the engine)."""
        return self.engine_health.state(engine)

    def metrics(self) -> str:
        """`/metrics`' text; scrapes that come while one reads share its read (`SharedRead`), and
        read only the jobs that ended since the earlier ones (`SettledTimes`)."""
        return self._scrape()

    # Set by `aclose`: the inference thread had not ended within DEVICE_IDLE_TIMEOUT.
    device_busy = False
    # The ring that told other processes the device is free (see `_hand_over_device`).
    _ringing: asyncio.Future[None] | None = field(default=None, init=False, repr=False)

    _scrape: SharedRead = field(init=False, repr=False)
    _settled_times: SettledTimes = field(default_factory=SettledTimes, init=False, repr=False)

    def __post_init__(self) -> None:
        self.scheduler.hand_over_device = self._hand_over_device
        self._scrape = SharedRead(
            lambda: metrics_text(self.db, {engine.name: engine.stages for engine in self.registry},
                                 self._settled_times, default_quota_mb=self.settings.project_storage_quota_mb,
                                 default_local_seconds=self.settings.project_local_seconds_per_day,
                                 webhook_destinations_set_aside=self._webhook_destinations_set_aside(),
                                 device_used=self.jobs.device_used))

    def _webhook_destinations_set_aside(self) -> int:
        return 0 if self.webhook_deliverer is None else self.webhook_deliverer.breakers.count()

    async def _hand_over_device(self) -> None:
        """Let the device go once this process's model is off it (the inference thread ended): the
        stop goes on waiting for paid requests, and another process runs the local jobs meanwhile."""
        runtime = _local_runtime(self.registry)
        idle = runtime is None or await asyncio.to_thread(runtime.shutdown, DEVICE_IDLE_TIMEOUT)
        device = self.scheduler.device
        if idle and device is not None and device.held:
            device.close(release=True)
            log.info("the device is idle: another process may run the local jobs while this one waits for "
                     "paid requests")
            # Shielded: a stop hurried meanwhile cancels the hand-over, not the ring's thread, which
            # `aclose` lets end before the database goes.
            self._ringing = asyncio.ensure_future(asyncio.to_thread(self._ring_quietly))
            await asyncio.shield(self._ringing)

    def _ring_quietly(self) -> None:
        with contextlib.suppress(Exception):  # a database gone at shutdown: the others' looks remain
            self.db.ring()

    async def aclose(self) -> None:
        self.scheduler.stop_claiming()  # before the waits below: nothing starts that `stop` abandons
        self.sweeps_stop.set()
        # The webhook deliveries' too: what is not delivered yet waits in the database for the next start.
        tasks = [*self.background, *(task for task in (self.health_sharing, self.asset_sweeping, self.policy_watching,
                                                       self.webhook_delivering) if task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.follower.aclose()
        await self.scheduler.stop()
        await asyncio.to_thread(self.runner.close)  # waits for images being encoded
        with contextlib.suppress(Exception):  # the last jobs' verdicts, for the processes that stay
            await asyncio.to_thread(self.engine_health.sync, self.db)
        await self.registry.aclose()
        runtime = _local_runtime(self.registry)
        idle = runtime is None or await asyncio.to_thread(runtime.shutdown, DEVICE_IDLE_TIMEOUT)
        # Still inside a model load or a pipeline call, which nothing can interrupt: the process
        # should end without waiting for it (see `orchestrator.cli`; serve's SIGTERM ends it anyway).
        self.device_busy = not idle
        if self.device_busy:
            log.warning("the model is still loading or rendering on the inference thread; the process ends "
                        "without waiting for it")
        device = self.scheduler.device
        if device is not None:
            held = device.held
            # Let another process have the device only once this one's model is off it; a thread
            # still inside the pipeline keeps it until the process ends.
            device.close(release=idle)
            if held and idle:  # local jobs in the queue waited for it: the others may look now
                with contextlib.suppress(Exception):  # a database gone at shutdown: their looks remain
                    await asyncio.to_thread(self.db.ring)
        if self._ringing is not None:
            await asyncio.wait({self._ringing}, timeout=RING_WAIT_SECONDS)
        # Last: the stop's own commits (claims given back to the queue) ring the other workers.
        await asyncio.to_thread(self.db.bell.close)
        self.db.dispose()


@dataclass
class Stopped:
    """How a service stopped (`orchestrator worker`, `serve`, the demo's own)."""

    signal: int | None  # the signal that stopped it first (None: its command or a test did)
    device_busy: bool  # its inference thread was still in a model load or a pipeline call


def _set_up(engine: Any) -> bool:
    """Whether a remote engine says the operator set it up (`configured`, the built-ins'): one
    without a key or server is off by choice, and a plug-in that does not say is not judged."""
    try:
        return getattr(engine, "configured", None) is True
    except Exception:  # a plug-in's property that raises: not told about
        return False


def _local_runtime(registry: EngineRegistry) -> LocalRuntime | None:
    """The device runtime the local engines share, if any engine has one."""
    for engine in registry:
        runtime = getattr(engine, "runtime", None)
        if isinstance(runtime, LocalRuntime):
            return runtime
    return None


def _device(runtime: LocalRuntime) -> str:
    try:
        return runtime.device_identity()
    except OrchestratorError:  # ORCH_LITE_DEVICE=cuda without CUDA: the job fails with that when it runs
        return runtime.settings.lite_device


def _removal_seen(served: str | None) -> str:
    """What serves a policy whose file another process found removed (`PolicyStore.from_service`),
    given the source of what serves now."""
    left = "not loaded" if served is None else "the built-in policy of that name serves"
    return f"{left}: another process found the file removed after the version this one read"


def _keeps_all_local(policies: PolicyStore, name: str, routed: str | None = None) -> bool:
    """Whether policy `name` keeps everything on this machine (one not loaded: no), for a job routed
    by the version whose hash is `routed` (None: not known). When this process's version keeps it
    local and the job was routed by another, another process has loaded an edit this one has not
    looked at yet (it does within two poll intervals): the file is judged as it reads now. A job
    routed after the policy was loosened was canceled by a worker still on the local version; one
    routed before it was made local is still refused, as is any while the file is refused."""
    try:
        loaded = policies.get(name)
    except NotFound:
        return False
    if not loaded.keeps_all_local or routed is None or routed == loaded.content_hash:
        return loaded.keeps_all_local
    now = policies.as_it_reads_now(name)
    return now is None or now.keeps_all_local
