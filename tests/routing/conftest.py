"""Services for the routing tests: the priced fakes beside the built-ins, and policy folders.

Starting a service and loading the tiny pipeline costs about a second, so modules share one
service where their tests cannot disturb each other (each test makes its own project), through
the package-scoped `new_settings` and the `running()` context manager.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.conftest import isolate, settings_for

FAKE_ENGINES = "fake-paid=tests.fakes:factory,fake-b=tests.routing:fake_b_factory"


def routing_policy(name: str, paid: list[str], *, description: str | None = None,
                   soft: tuple[str, float, list[str]] | None = None, reason: str | None = None) -> str:
    """The TOML of a policy as the routing tests write them: drafts on lite, bridge and polish on
    `paid` in that order (with its `reason`); `soft` = (rule, share, engines) comes before it: those
    engines once that share of the project's budget is used."""
    lines = [f"name = {json.dumps(name)}"]
    if description is not None:
        lines.append(f"description = {json.dumps(description)}")
    lines += ["", "[[rules]]", 'name = "drafts"', 'match = { stage = "ideation" }', 'engines = ["lite"]']
    if soft is not None:
        rule, share, engines = soft
        lines += ["", "[[rules]]", f"name = {json.dumps(rule)}",
                  f'match = {{ stage = ["bridge", "polish"], budget_used_over = {share} }}',
                  f"engines = {json.dumps(engines)}"]
    lines += ["", "[[rules]]", 'name = "paid"', 'match = { stage = ["bridge", "polish"] }',
              f"engines = {json.dumps(paid)}"]
    if reason is not None:
        lines.append(f"reason = {json.dumps(reason)}")
    return "\n".join(lines) + "\n"
FALLBACK_POLICY = routing_policy(
    "fallback-test", ["fake-paid", "fake-b", "local-hifi"],
    description="Bridge and polish on fake-paid, then fake-b, then local-hifi.", reason="paid fakes first")

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
        isolate(mp, tmp_path_factory.mktemp("no-config"))
        yield


@pytest.fixture(scope="package")
def new_settings(routing_env: None, tmp_path_factory: pytest.TempPathFactory,
                 tiny_cache_dir: Path) -> SettingsFactory:
    """`new_settings(**overrides)`: settings on a fresh data dir with the offline tiny model."""

    def make(**overrides: Any) -> Settings:
        return settings_for(tmp_path_factory.mktemp("data"), tiny_cache_dir, **overrides)

    return make


@contextmanager
def running(settings: Settings) -> Iterator[httpx.Client]:
    """A client on a live service; the service stops when the block ends."""
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        yield client


@pytest.fixture
def fallback_policies(tmp_path: Path) -> Path:
    return write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY})
