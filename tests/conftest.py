"""Shared fixtures: the offline tiny model (built once per session), isolated settings, a live server."""

from __future__ import annotations

import contextlib
import datetime
import gc
import ipaddress
import logging
import os
import shutil
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Tests never reach the Hugging Face Hub, whatever a test's settings say (`auto` would look for
# it): set before anything imports huggingface_hub, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"
# torch's OpenMP threads spin between operations by default. The suite's drafts are a few ms each
# on a 64 px tiny model, with two test processes (or other work) sharing the cores: the spinning
# made a draft's CPU time ten to twenty times its work (0.4-2 s instead of 0.04 s), and doubled
# `tests/api/test_flow.py`. Passive threads sleep instead; images are the same, the threads do the
# same split of the work. Read once, when torch loads its OpenMP runtime: set before any import of
# torch, and inherited by the servers tests start as subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A run started with SIGINT ignored (a shell's background job, `trap '' INT`) passes that on to
# every child, and Python keeps an inherited SIG_IGN: the tests' Ctrl-Cs to a child service never
# arrived. A handler of our own is reset to the default in each child at exec, as a terminal's
# foreground command has it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import httpx
import pytest
from sqlalchemy.engine import make_url

from orchestrator.db import Database, sqlite_file, upgrade
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tiers import _http, openai_images, tiny

# The vendors' own variables also configure the remote engines (see settings.py).
VENDOR_KEYS = ("GEMINI_API_KEY", "OPENAI_API_KEY", "STABILITY_API_KEY", "REPLICATE_API_TOKEN", "FAL_KEY")

SettingsFactory = Callable[..., Settings]


def random_runs(default: int) -> int:
    """How many seeds a seeded random test runs: `default`, or `TEST_RANDOM_RUNS` to sweep more
    (`TEST_RANDOM_RUNS=50 make test`); a failing run names its seed, which replays its plan."""
    return int(os.environ.get("TEST_RANDOM_RUNS") or default)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What the imports and the collection made (torch, diffusers, 2,500 tests: half a million
    objects) lives as long as the run: frozen, the cycle collector no longer walks it at each full
    collection, which took 0.3 s and more, each. The libraries a model load imports (on the
    inference thread, by the first job that needs it) are imported here, to be frozen with the
    rest. Collected first: garbage frozen would stay for good."""
    import diffusers
    import torch  # noqa: F401
    import transformers

    for name in ("AutoPipelineForText2Image", "AutoPipelineForImage2Image", "StableDiffusionPipeline",
                 "StableDiffusionImg2ImgPipeline", "AutoencoderKL", "AutoencoderTiny", "UNet2DConditionModel",
                 "EulerDiscreteScheduler"):
        getattr(diffusers, name)  # each imports its module (diffusers imports lazily)
    for name in ("CLIPTextModel", "CLIPTokenizer", "CLIPTextConfig"):
        getattr(transformers, name)
    gc.collect()
    gc.freeze()


class _MigratedTemplate:
    """`Database.migrate` for a SQLite file not made yet: a copy of one this process migrated once.
    Running the revisions took 0.2-0.4 s per new database on the build machine, for about a thousand
    of the suite's; tests/test_migrations.py runs them on empty and older databases, and the other
    tests start from their result. The service's `upgrade` then finds the copy at head; it is not
    asked (another 0.05-0.1 s)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.template: Path | None = None

    def migrate(self, db: Database) -> None:
        path = sqlite_file(db.url)
        if path is None or make_url(db.url).query or path.exists() or Path(f"{path}-wal").exists():
            upgrade(db.url)  # not a new plain file (PostgreSQL, URI options, a database with data)
            return
        if self.template is None:
            upgrade(f"sqlite:///{self.folder / 'made.db'}")
            # Through SQLite's own backup: one file, whatever the WAL still held.
            with contextlib.closing(sqlite3.connect(self.folder / "made.db")) as made, \
                    contextlib.closing(sqlite3.connect(self.folder / "template.db")) as template:
                made.backup(template)
            self.template = self.folder / "template.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.template, path)


@pytest.fixture(autouse=True, scope="session")
def migrated_from_a_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    template = _MigratedTemplate(tmp_path_factory.mktemp("schema"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Database, "migrate", lambda db: template.migrate(db))  # a function: bound to each `db`
        yield


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database of its own, closed after the test."""
    db = Database(f"sqlite:///{tmp_path / 'o.db'}")
    db.migrate()
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts a provider's answer names (output URLs) resolve to a public address, as a CDN's do:
    tests must not depend on the machine's DNS. Tests of the address check set their own."""
    async def public(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address("93.184.216.34")]
    monkeypatch.setattr(_http, "resolve_host", public)


# The day the built-in price tables were dated: OpenAI's priced models shut down from 2026-12-01
# (`tiers.openai_images.SHUT_DOWN`), and a test of that engine must not depend on the day it runs.
PRICES_DAY = datetime.date(2026, 11, 28)


@pytest.fixture(autouse=True)
def openai_models_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's built-in models are live, as on the day their prices were dated (tests of the
    shutdown set their own day)."""
    monkeypatch.setattr(openai_images, "today", lambda: PRICES_DAY)


@pytest.fixture(autouse=True)
def root_log_handlers_restored() -> Iterator[None]:
    """`orchestrator.cli.main` run in-process (the demo, serve) adds a file handler into the test's
    data dir and sets levels on the root logger: left there, every later test logged into it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.fixture(autouse=True)
def ctrl_c_restored() -> Iterator[None]:
    """`orchestrator.cli.main` run in-process ignores Ctrl-C once it has told one: left so, the
    test run could not be interrupted any more. `serve` and `worker` ignore SIGHUP and SIGTERM as
    they start or stop: left so, every process a later test starts inherited it."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        if handler is not None:  # None: set outside Python, nothing to put back
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding `builtin:tiny-sd`, built once for the whole session."""
    cache = tmp_path_factory.mktemp("orchestrator-cache")
    tiny.save_tiny_pipeline(cache / "tiny-sd")
    return cache


def isolate(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """Keep the developer's environment (ORCH_* variables, vendor keys, an orchestrator.toml) out."""
    for name in list(os.environ):
        if name.startswith("ORCH_") or name in VENDOR_KEYS:
            mp.delenv(name)
    mp.setitem(Settings.model_config, "toml_file", folder / "absent.toml")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database of the test's own."""
    database = Database(f"sqlite:///{tmp_path / 'orchestrator.db'}")
    database.migrate()
    yield database
    database.dispose()


def settings_for(data_dir: Path, tiny_cache: Path, **overrides: Any) -> Settings:
    # A stop leaves paid requests to recovery at once (tests/credits/test_stop.py waits). The CPU
    # on any machine: tests that cancel mid-render count on its pace (`tests.api.SLOW`).
    values: dict[str, Any] = {"data_dir": data_dir, "lite_model": tiny.NAME, "hifi_model": None,
                              "cache_dir": tiny_cache, "stop_grace": 0.0, "lite_device": "cpu"}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_settings(tmp_path: Path, tiny_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> SettingsFactory:
    """`make_settings(**overrides)`: settings on a fresh data dir that the developer's environment
    cannot reach; the Lite (and local-hifi) model is the offline tiny one."""
    isolate(monkeypatch, tmp_path)

    def make(**overrides: Any) -> Settings:
        return settings_for(tmp_path / "data", tiny_cache_dir, **overrides)

    return make


@pytest.fixture
def start_server() -> Iterator[Callable[[Settings], httpx.Client]]:
    """`start_server(settings)` -> an httpx.Client on a running service; everything stops at teardown."""
    with contextlib.ExitStack() as stack:

        def start(settings: Settings) -> httpx.Client:
            base = stack.enter_context(serve_in_thread(settings))
            return stack.enter_context(httpx.Client(base_url=base, timeout=30.0))

        yield start


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, tiny_cache_dir: Path) -> Iterator[httpx.Client]:
    """One service for a whole module, for tests that only need it to answer (not a clean slate)."""
    folder = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, folder)
        settings = settings_for(folder / "data", tiny_cache_dir)
        with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
            yield client


@pytest.fixture
def server(make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> httpx.Client:
    """A client on a service with default test settings."""
    return start_server(make_settings())
