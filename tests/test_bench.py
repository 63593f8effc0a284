"""The draft benchmark's set-up (its figures are not tested: see bench/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.drafts import parse_args, without_the_users_settings
from orchestrator.settings import CONFIG_FILE_VARIABLE, Settings


def test_the_benchmark_runs_its_own_install_never_the_user_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inherited by its service process, the user's ORCH_DATABASE_URL had the benchmark migrate the
    # user's database and bind it to the benchmark's data dir; ORCH_RUN_JOBS=false (or the same in
    # an orchestrator.toml) left it waiting for ever.
    user = tmp_path / "user"
    user.mkdir()
    (user / "orchestrator.toml").write_text('database_url = "sqlite:////srv/studio/orchestrator.db"\n')
    monkeypatch.chdir(user)
    monkeypatch.setenv("ORCH_DATABASE_URL", "sqlite:////srv/studio/orchestrator.db")
    monkeypatch.setenv("ORCH_RUN_JOBS", "false")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-studio")
    monkeypatch.delenv(CONFIG_FILE_VARIABLE, raising=False)  # restored after the test, as the others
    monkeypatch.setitem(Settings.model_config, "toml_file", str(user / "orchestrator.toml"))
    assert Settings().run_jobs is False  # what the benchmark read before

    dropped = without_the_users_settings(tmp_path / "empty.toml")
    assert dropped == ["OPENAI_API_KEY", "ORCH_DATABASE_URL", "ORCH_RUN_JOBS", "./orchestrator.toml"]
    assert not [name for name in os.environ if name.startswith("ORCH_") and name != CONFIG_FILE_VARIABLE]
    assert "OPENAI_API_KEY" not in os.environ
    # A service process started now reads the empty file, as this one does.
    assert os.environ[CONFIG_FILE_VARIABLE] == str(tmp_path / "empty.toml")
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.run_jobs is True and settings.openai_api_key is None
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'data' / 'orchestrator.db'}"


def test_the_benchmark_refuses_a_profile_of_a_service_it_cannot_time(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        parse_args(["--profile", "--server-process"])
    assert refused.value.code == 2
    assert "--profile times a service in this process" in capsys.readouterr().err
    assert parse_args(["--profile"]).profile
