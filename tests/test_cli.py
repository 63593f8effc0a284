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
    assert "the demo sends ORCH_ADMIN_KEY from its environment" in err


def test_migrate_makes_a_new_data_dir(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    data_dir = tmp_path / "new" / "data"
    monkeypatch.setenv("ORCH_DATA_DIR", str(data_dir))
    assert main(["migrate"]) == 0  # once a traceback: 'unable to open database file'
    assert (data_dir / "orchestrator.db").exists()
    assert "is up to date" in capsys.readouterr().out


@pytest.mark.parametrize(("command", "variable", "value", "told"), [
    ("serve", "ORCH_DATABASE_URL", "bogus://x", "bogus://x is neither SQLite nor PostgreSQL"),
    ("migrate", "ORCH_DATABASE_URL", "mysql://studio:secret@db/orch", "mysql://studio:***@db/orch is neither"),
    ("worker", "ORCH_DATABASE_URL", "not a url", "ORCH_DATABASE_URL: not a database URL"),
    ("serve", "ORCH_PRICES_FILE", "{tmp}/missing.toml", "ORCH_PRICES_FILE: prices file {tmp}/missing.toml: [Errno 2]"),
    ("worker", "ORCH_DATA_DIR", "{tmp}/a-file", "ORCH_DATA_DIR: cannot write in {tmp}/a-file"),
    ("serve", "ORCH_CONFIG_FILE", "{tmp}/studio.toml", "ORCH_CONFIG_FILE: no such file: {tmp}/studio.toml"),
])
def test_a_setting_the_service_cannot_start_with_is_named_before_it_starts(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], command: str, variable: str, value: str, told: str) -> None:
    make_settings()  # keeps the developer's environment out
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    assert main([command]) == 2  # once a traceback from inside the server's start-up
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: invalid configuration:")
    assert told.format(tmp=tmp_path) in err
    assert "Traceback" not in err and "secret" not in err


def test_a_bad_value_in_the_config_file_names_the_file_and_key(make_settings: SettingsFactory, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    config = tmp_path / "studio.toml"
    config.write_text('lite_device = "gpu"\n')
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    monkeypatch.setenv("ORCH_LITE_MAX_BATCH", "99")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: lite_device: Input should be 'auto', 'cpu', 'cuda' or 'mps' (got 'gpu')" in err
    assert "ORCH_LITE_MAX_BATCH: Input should be less than or equal to 16 (got '99')" in err  # the variable's
