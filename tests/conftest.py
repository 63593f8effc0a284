"""Shared fixtures: the offline tiny model (built once per session), isolated settings, a live server."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tiers import tiny

# The vendors' own variables also configure the remote engines (see settings.py).
VENDOR_KEYS = ("GEMINI_API_KEY", "OPENAI_API_KEY", "STABILITY_API_KEY", "REPLICATE_API_TOKEN", "FAL_KEY")

SettingsFactory = Callable[..., Settings]


def clean_environ(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without anything that configures the orchestrator."""
    source = dict(os.environ if env is None else env)
    return {k: v for k, v in source.items() if not k.startswith("ORCH_") and k not in VENDOR_KEYS}


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding `builtin:tiny-sd`, built once for the whole session."""
    cache = tmp_path_factory.mktemp("orchestrator-cache")
    tiny.save_tiny_pipeline(cache / "tiny-sd")
    return cache


@pytest.fixture
def make_settings(tmp_path: Path, tiny_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> SettingsFactory:
    """`make_settings(**overrides)`: settings on a fresh data dir that the developer's environment
    (ORCH_* variables, vendor keys, an orchestrator.toml) cannot reach."""
    for name in list(os.environ):
        if name.startswith("ORCH_") or name in VENDOR_KEYS:
            monkeypatch.delenv(name)
    monkeypatch.setitem(Settings.model_config, "toml_file", tmp_path / "absent.toml")

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "lite_model": tiny.NAME, "hifi_model": None,
                                  "cache_dir": tiny_cache_dir}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def start_server() -> Iterator[Callable[[Settings], httpx.Client]]:
    """`start_server(settings)` -> an httpx.Client on a running service; everything stops at teardown."""
    stack: list[tuple[Any, httpx.Client]] = []

    def start(settings: Settings) -> httpx.Client:
        server = serve_in_thread(settings)
        base = server.__enter__()
        client = httpx.Client(base_url=base, timeout=httpx.Timeout(30.0))
        stack.append((server, client))
        return client

    yield start
    while stack:
        server, client = stack.pop()
        client.close()
        server.__exit__(None, None, None)


@pytest.fixture
def server(make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> httpx.Client:
    """A client on a service with default test settings."""
    return start_server(make_settings())
