"""The command line: a mistake in the configuration or an unreachable service is one plain line on
stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from orchestrator.cli import main
from orchestrator.settings import Settings
from tests.conftest import SettingsFactory


def test_invalid_setting_names_the_variable(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_LITE_MAX_BATCH", "99")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: invalid configuration:")
    assert "ORCH_LITE_MAX_BATCH: Input should be less than or equal to 16 (got '99')" in err
    assert "Traceback" not in err


def test_demo_against_an_unreachable_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", "http://127.0.0.1:9", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot reach http://127.0.0.1:9/")
    assert "Traceback" not in err


def test_demo_refused_by_the_service_says_why(make_settings: SettingsFactory,
                                              start_server: Callable[[Settings], httpx.Client],
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client = start_server(make_settings(admin_key="secret"))  # the demo sends no key
    assert main(["demo", "--url", str(client.base_url), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"GET {client.base_url}/v1/engines answered 401: a valid 'Authorization: Bearer <key>'" in err


def test_migrate_makes_a_new_data_dir(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    data_dir = tmp_path / "new" / "data"
    monkeypatch.setenv("ORCH_DATA_DIR", str(data_dir))
    assert main(["migrate"]) == 0  # once a traceback: 'unable to open database file'
    assert (data_dir / "orchestrator.db").exists()
    assert "is up to date" in capsys.readouterr().out
