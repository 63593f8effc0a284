"""One service for the package: the tiny local model plus the priced fake engines of tests/fakes.py.

Every test makes its own project (budgets and ledgers are per project), so they can share it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.api import launch_server
from tests.conftest import VENDOR_KEYS, isolate, settings_for
from tiers import tiny

ENGINES = ("fake-paid=tests.fakes:factory,fake-unpriced=tests.fakes:unpriced_factory,"
           "fake-queue=tests.fakes:queue_factory,fake-free=tests.fakes:free_factory,"
           "fake-zero=tests.fakes:zero_priced_factory")
POLICY = "credits-test"
ROOT = Path(__file__).resolve().parents[2]
# The shipped policies only know the real cloud engines; this one lets the fake paid engines serve
# bridge and polish (each test names its engine, so there is no fallback to hide a failure).
POLICY_TOML = f"""
name = "{POLICY}"
description = "Drafts on Lite; bridge and polish on the fake paid engines of tests/fakes.py."

[[rules]]
name = "drafts"
match = {{ stage = "ideation" }}
engines = ["lite"]

[[rules]]
name = "queue"
match = {{ stage = ["bridge", "polish"], engine = "fake-queue" }}
engines = ["fake-queue"]

[[rules]]
name = "paid"
match = {{ stage = ["bridge", "polish"] }}
engines = ["fake-paid", "fake-unpriced", "fake-free", "fake-zero"]
"""


@pytest.fixture(scope="package")
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No ORCH_* variable, vendor key or orchestrator.toml of the developer reaches the settings."""
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, tmp_path_factory.mktemp("no-config"))
        yield


@pytest.fixture(scope="package")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("policies")
    (folder / f"{POLICY}.toml").write_text(POLICY_TOML)
    return folder


@pytest.fixture(scope="package")
def paid_settings_for(isolated_env: None, tiny_cache_dir: Path, policy_dir: Path) -> Callable[..., Settings]:
    """`paid_settings_for(data_dir, **overrides)`: fresh settings with the fake engines and the test
    policy. (Not `model_copy(update=...)`: it would keep a cached `resolved_database_url`.)"""

    def make(data_dir: Path, **overrides: Any) -> Settings:
        return settings_for(data_dir, tiny_cache_dir, **{"engines": ENGINES, "policy": POLICY,
                                                         "policy_dir": policy_dir, **overrides})

    return make


@pytest.fixture(scope="package")
def paid_settings(paid_settings_for: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return paid_settings_for(tmp_path_factory.mktemp("credits-data"))


@pytest.fixture(scope="package")
def api(paid_settings: Settings) -> Iterator[httpx.Client]:
    """A client on a running service that knows `fake-paid` and `fake-unpriced`."""
    with serve_in_thread(paid_settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        yield client


class Service:
    """`orchestrator serve` in a child process on one data dir."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log: IO[bytes] = open(log, "wb")  # noqa: SIM115 (closed by stop/kill)
        try:
            self.process, self.url = launch_server(env, cwd, self.log)
        except BaseException:
            self.log.close()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        self.kill()


@pytest.fixture
def service_env(tmp_path: Path, tiny_cache_dir: Path, policy_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") and k not in VENDOR_KEYS}
    (tmp_path / "empty.toml").write_text("")  # keeps a developer's orchestrator.toml out
    env.update({
        "ORCH_DATA_DIR": str(tmp_path / "data"), "ORCH_CACHE_DIR": str(tiny_cache_dir),
        "ORCH_LITE_MODEL": tiny.NAME, "ORCH_ENGINES": ENGINES, "ORCH_POLICY": POLICY,
        "ORCH_POLICY_DIR": str(policy_dir), "ORCH_CONFIG_FILE": str(tmp_path / "empty.toml"),
        "ORCH_STOP_GRACE": "0",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    })
    return env


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services a test starts; each is stopped at teardown."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in started:
            service.stop()
