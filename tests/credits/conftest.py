"""One service for the package: the tiny local model plus the priced fake engines of tests/fakes.py.

Every test makes its own project (budgets and ledgers are per project), so they can share it.
"""

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

VENDOR_KEYS = ("GEMINI_API_KEY", "OPENAI_API_KEY", "STABILITY_API_KEY", "REPLICATE_API_TOKEN", "FAL_KEY")
ENGINES = ("fake-paid=tests.fakes:factory,fake-unpriced=tests.fakes:unpriced_factory,"
           "fake-queue=tests.fakes:queue_factory,fake-free=tests.fakes:free_factory")
POLICY = "credits-test"
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
engines = ["fake-paid", "fake-unpriced", "fake-free"]
"""


@pytest.fixture(scope="package")
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No ORCH_* variable, vendor key or orchestrator.toml of the developer reaches the settings."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("ORCH_") or name in VENDOR_KEYS:
                mp.delenv(name)
        mp.setitem(Settings.model_config, "toml_file", tmp_path_factory.mktemp("no-config") / "absent.toml")
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
        values: dict[str, Any] = {"data_dir": data_dir, "lite_model": tiny.NAME, "hifi_model": None,
                                  "cache_dir": tiny_cache_dir, "engines": ENGINES, "policy": POLICY,
                                  "policy_dir": policy_dir}
        return Settings(**{**values, **overrides})

    return make


@pytest.fixture(scope="package")
def paid_settings(paid_settings_for: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return paid_settings_for(tmp_path_factory.mktemp("credits-data"))


@pytest.fixture(scope="package")
def api(paid_settings: Settings) -> Iterator[httpx.Client]:
    """A client on a running service that knows `fake-paid` and `fake-unpriced`."""
    with serve_in_thread(paid_settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        yield client
