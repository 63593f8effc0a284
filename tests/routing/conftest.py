"""Services for the routing tests: the priced fakes beside the built-ins, and policy folders.

Starting a service and loading the tiny pipeline costs about a second, so modules share one
service where their tests cannot disturb each other (each test makes its own project), through
the package-scoped `new_settings` and the `running()` context manager.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tiers import tiny

VENDOR_KEYS = ("GEMINI_API_KEY", "OPENAI_API_KEY", "STABILITY_API_KEY", "REPLICATE_API_TOKEN", "FAL_KEY")
FAKE_ENGINES = "fake-paid=tests.fakes:factory,fake-b=tests.routing:fake_b_factory"
FALLBACK_POLICY = """
name = "fallback-test"
description = "Bridge and polish on fake-paid, then fake-b, then local-hifi."

[[rules]]
name = "drafts"
match = { stage = "ideation" }
engines = ["lite"]

[[rules]]
name = "paid"
match = { stage = ["bridge", "polish"] }
engines = ["fake-paid", "fake-b", "local-hifi"]
reason = "paid fakes first"
"""

SettingsFactory = Callable[..., Settings]


def write_policies(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.toml").write_text(text)
    return folder


@pytest.fixture(scope="package")
def routing_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No ORCH_* variable, vendor key or orchestrator.toml of the developer reaches the settings."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("ORCH_") or name in VENDOR_KEYS:
                mp.delenv(name)
        mp.setitem(Settings.model_config, "toml_file", tmp_path_factory.mktemp("no-config") / "absent.toml")
        yield


@pytest.fixture(scope="package")
def new_settings(routing_env: None, tmp_path_factory: pytest.TempPathFactory,
                 tiny_cache_dir: Path) -> SettingsFactory:
    """`new_settings(**overrides)`: settings on a fresh data dir with the offline tiny model."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path_factory.mktemp("data"), "lite_model": tiny.NAME,
                                  "hifi_model": None, "cache_dir": tiny_cache_dir, "stop_grace": 0.0}
        values.update(overrides)
        return Settings(**values)

    return make


@contextmanager
def running(settings: Settings) -> Iterator[httpx.Client]:
    """A client on a live service; the service stops when the block ends."""
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        yield client


@pytest.fixture
def fallback_policies(tmp_path: Path) -> Path:
    return write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY})
