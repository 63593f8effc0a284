"""Names that set nothing: an unknown key in the TOML file is refused, an unknown `ORCH_*` variable
is warned about, each with the closest known name."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.cli import main
from orchestrator.settings import Settings
from tests.conftest import isolate
from tiers._http import basic_auth_in


@pytest.fixture
def toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The settings' TOML file (not written yet), with the developer's environment kept out."""
    isolate(monkeypatch, tmp_path)
    path = tmp_path / "orchestrator.toml"
    monkeypatch.setitem(Settings.model_config, "toml_file", path)
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    return path


def test_a_settings_file_and_a_prices_file_may_start_with_a_byte_order_mark(toml_file: Path) -> None:
    # As a Windows editor saves them: "not valid TOML: Invalid statement (at line 1, column 1)",
    # where a policy file with one loaded.
    from orchestrator.prices import load_price_overrides

    prices = toml_file.parent / "prices.toml"
    prices.write_bytes(b'\xef\xbb\xbf[gemini."gemini-3.1-flash-image"]\n"1K" = 9\n')
    toml_file.write_bytes(f'\ufeffpolicy = "local-only"\nprices_file = "{prices}"\n'.encode())
    settings = Settings()
    assert settings.policy == "local-only"
    assert load_price_overrides(settings) == {"gemini": {"gemini-3.1-flash-image": {"1K": 9}}}


def test_a_start_up_problem_names_the_file_s_key_when_the_file_set_it(toml_file: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # "ORCH_DATA_DIR: ... is not a directory" sent the operator to a variable nobody had set.
    from orchestrator.services import startup_problems

    monkeypatch.delenv("ORCH_DATA_DIR")
    in_the_way = toml_file.parent / "a-file"
    in_the_way.write_text("")
    toml_file.write_text(f'data_dir = "{in_the_way}"\npolicy = "nope"\n')
    problems = startup_problems(Settings())
    assert f"{toml_file}: data_dir: {in_the_way} is not a directory" in problems
    assert any(problem.startswith(f"{toml_file}: policy: 'nope' is not a loaded policy") for problem in problems)
    monkeypatch.setenv("ORCH_POLICY", "nope-either")  # a variable wins, and is named
    assert any(problem.startswith("ORCH_POLICY: 'nope-either'") for problem in startup_problems(Settings()))


@pytest.mark.parametrize("line", ["max_pending_jobs = false", "max_streams_per_key = false", "lite_max_batch = true",
                                  "max_body_bytes = true", "poll_interval = true"])
def test_true_or_false_for_a_number_in_the_file_is_refused(toml_file: Path, line: str) -> None:
    # Read as 1 or 0: `false` lifted two documented limits (0 is "no limit"), where the same value
    # in an environment variable was refused.
    toml_file.write_text(line + "\n")
    with pytest.raises(ValidationError, match="expected a number, not true/false"):
        Settings()
    toml_file.write_text("run_jobs = false\nlite_preload = true\n")  # a switch takes them
    assert (Settings().run_jobs, Settings().lite_preload) == (False, True)


@pytest.mark.parametrize(("name", "floor"), [("poll_interval", 0.01), ("sweep_interval", 0.05)])
def test_an_interval_too_short_to_wait_is_refused(toml_file: Path, name: str, floor: float) -> None:
    # 1e-9 kept an idle service's core busy with looks that find nothing.
    toml_file.write_text(f"{name} = 1e-9\n")
    with pytest.raises(ValidationError, match=f"greater than or equal to {floor}"):
        Settings()
    toml_file.write_text(f"{name} = {floor}\n")
    assert getattr(Settings(), name) == floor


def test_unknown_toml_key_is_an_error_naming_key_file_and_match(toml_file: Path) -> None:
    toml_file.write_text("max_body_byts = 2048\nlite_max_batch = 2\nzzz = 1\n")
    with pytest.raises(ValidationError) as info:
        Settings()
    messages = [error["msg"] for error in info.value.errors()]
    assert messages == [f"{toml_file}: unknown key 'max_body_byts' (did you mean 'max_body_bytes'?)",
                        f"{toml_file}: unknown key 'zzz'"]

    # Known keys still load, matched as pydantic-settings matches them: any case, aliases too.
    toml_file.write_text('max_body_bytes = 2048\nLITE_MAX_BATCH = 2\nGEMINI_API_KEY = "k"\npolicy = "local-only"\n')
    settings = Settings()
    assert settings.max_body_bytes == 2048
    assert settings.lite_max_batch == 2
    assert settings.gemini_api_key is not None and settings.gemini_api_key.get_secret_value() == "k"
    assert settings.policy == "local-only"


def test_a_toml_key_may_be_written_as_its_variable_is_named(toml_file: Path) -> None:
    """API.md lists the settings as variables, and says the file may set the same keys."""
    toml_file.write_text('ORCH_LITE_MAX_BATCH = 3\norch_policy = "local-only"\nORCH_GEMINI_API_KEY = "k"\n')
    settings = Settings()
    assert (settings.lite_max_batch, settings.policy) == (3, "local-only")
    assert settings.gemini_api_key is not None and settings.gemini_api_key.get_secret_value() == "k"

    toml_file.write_text("lite_max_batch = 2\nORCH_LITE_MAX_BATCH = 3\nORCH_LITE_MAX_BACH = 4\n")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert sorted(error["msg"] for error in info.value.errors()) == [
        f"{toml_file}: 'ORCH_LITE_MAX_BATCH' and 'lite_max_batch' set the same setting (lite_max_batch): keep one",
        f"{toml_file}: unknown key 'ORCH_LITE_MAX_BACH' (did you mean 'lite_max_batch'?)"]
    # A vendor's name for a key, beside ours: one of them was taken without a word.
    for text in ('GEMINI_API_KEY = "a"\nORCH_GEMINI_API_KEY = "b"\n',
                 'gemini_api_key = "c"\nFAL_KEY = "f"\nfal_api_key = "g"\n'):
        toml_file.write_text(text)
        with pytest.raises(ValidationError, match="set the same setting"):
            Settings()


def test_an_aliased_setting_s_error_names_it_once_and_shows_no_secret(
        toml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml_file.write_text("gemini_api_key = 5\n")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err  # was "ORCH_ORCH_GEMINI_API_KEY: ...", and the value shown
    assert err == (f"orchestrator: invalid configuration:\n"
                   f"  {toml_file}: gemini_api_key: Input should be a valid string\n")
    toml_file.write_text("FAL_KEY = 5\n")  # a vendor's name for it: the file's key, not ORCH_FAL_API_KEY
    assert main(["migrate"]) == 2
    assert capsys.readouterr().err.endswith(f"  {toml_file}: FAL_KEY: Input should be a valid string\n")


def test_cli_reports_an_unknown_toml_key_in_one_line(toml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml_file.write_text("max_body_byts = 2048\n")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err == ("orchestrator: invalid configuration:\n"
                   f"  {toml_file}: unknown key 'max_body_byts' (did you mean 'max_body_bytes'?)\n")


def test_unknown_orch_variables_are_warned_about_and_known_ones_not(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ORCH_ADMIN_KYE", "secret")  # the service would run without a key
    monkeypatch.setenv("ORCH_QWERTY", "1")
    for name in ("ORCH_ADMIN_KEY", "ORCH_GEMINI_API_KEY", "ORCH_LITE_MAX_BATCH", "ORCH_REMOTE_READ_TIMEOUT"):
        monkeypatch.setenv(name, "2")
    monkeypatch.setenv("ORCH_CONFIG_FILE", str(toml_file))  # read directly, to find the file
    monkeypatch.setenv("orch_policy", "local-only")  # matched without regard to case, like the rest
    with caplog.at_level(logging.WARNING, logger="orchestrator.settings"):
        settings = Settings()
    assert settings.lite_max_batch == 2 and settings.policy == "local-only"
    assert [r.getMessage() for r in caplog.records] == [
        "ORCH_ADMIN_KYE is not a setting of this service and is ignored (did you mean ORCH_ADMIN_KEY?)",
        "ORCH_QWERTY is not a setting of this service and is ignored",
    ]


def test_a_variable_named_like_a_command_s_option_says_where_that_is_given(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # No setting's name is near ORCH_PORT: it was "ignored", with no word of `serve --port`.
    monkeypatch.setenv("ORCH_PORT", "abc")
    monkeypatch.setenv("ORCH_HOST", "0.0.0.0")
    monkeypatch.setenv("ORCH_LOG_LEVEL", "debug")
    with caplog.at_level(logging.WARNING, logger="orchestrator.settings"):
        Settings()
    address = "the address is given by `orchestrator serve --host/--port`"
    assert [r.getMessage() for r in caplog.records] == [
        f"ORCH_HOST is not a setting of this service and is ignored ({address})",
        "ORCH_LOG_LEVEL is not a setting of this service and is ignored (the log level is given by "
        "`orchestrator serve --log-level` or `orchestrator worker --log-level`)",
        f"ORCH_PORT is not a setting of this service and is ignored ({address})",
    ]


@pytest.mark.parametrize(("variable", "value", "told"), [
    ("ORCH_ADMIN_KEY", "", "ORCH_ADMIN_KEY: must not be empty or blank: set a key, or leave the variable unset"),
    ("ORCH_A1111_URL", "localhost:7860", "ORCH_A1111_URL: must be an http:// or https:// address with a host, "
     "e.g. http://127.0.0.1:7860\n"),
    # The origin named once: "... or * (got 'https://x.example/')" repeated it.
    ("ORCH_CORS_ORIGINS", "https://x.example/", "ORCH_CORS_ORIGINS: 'https://x.example/' is not an origin: give "
     "scheme://host[:port] with no path or trailing slash (e.g. https://dash.studio.example), or *\n"),
])
def test_a_setting_s_own_check_is_told_in_its_words_alone(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str,
        value: str, told: str) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"orchestrator: invalid configuration:\n  {told}") and err.count("\n") == 2, err
    assert "Value error" not in err and "(got " not in err


def test_a_local_max_size_beyond_what_any_request_may_ask_is_refused(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # 10000 was taken: GET /v1/engines told a max_width of 10000, and a draft 9000 wide got a 422 (8192 at most).
    monkeypatch.setenv("ORCH_LOCAL_MAX_SIZE", "10000")
    assert main(["migrate"]) == 2
    assert "ORCH_LOCAL_MAX_SIZE: Input should be less than or equal to 8192 (got '10000')" in capsys.readouterr().err
    monkeypatch.setenv("ORCH_LOCAL_MAX_SIZE", "8192")
    assert Settings().local_max_size == 8192


@pytest.mark.parametrize("variable", ["ORCH_LITE_MODEL", "ORCH_HIFI_MODEL", "ORCH_FAL_MODEL", "ORCH_A1111_CHECKPOINT"])
def test_a_model_longer_than_jobs_can_store_is_refused_at_start(variable: str, toml_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL enforces the column's 300 characters: every job's write failed there, not the start."""
    monkeypatch.setenv(variable, "/srv/" + "m" * 300)
    with pytest.raises(ValidationError, match="is 305 characters long; at most 300"):
        Settings()
    monkeypatch.setenv(variable, "/srv/" + "m" * 295)
    assert len(getattr(Settings(), variable.removeprefix("ORCH_").lower())) == 300


@pytest.mark.parametrize("key", ["two words-and-more", "tab\there", "bell\x07key", "del\x7fkey", "line\u2028key",
                                 "rlo\u202ekey"])
def test_an_admin_key_no_client_can_send_is_refused(key: str, toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It started a service closed to every client: a bearer token carries no space or control character.
    monkeypatch.setenv("ORCH_ADMIN_KEY", key)
    with pytest.raises(ValidationError, match="must not hold spaces or control characters"):
        Settings()
    monkeypatch.setenv("ORCH_ADMIN_KEY", "clé-ünïcode-key")  # sent as UTF-8, as the service reads it
    assert Settings().admin_key is not None


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_a_blank_admin_key_is_refused(blank: str, toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty key would match an empty "Authorization: Bearer": admin for anyone.
    monkeypatch.setenv("ORCH_ADMIN_KEY", blank)
    with pytest.raises(ValidationError, match="must not be empty or blank"):
        Settings()


@pytest.mark.parametrize("written", ["s3cret-admin-key-long ", "s3cret-admin-key-long\r", " s3cret-admin-key-long"])
def test_an_admin_key_is_read_without_whitespace_at_its_ends(written: str, toml_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A client's token is read without it: a trailing space (or a CRLF env file's \r) started a
    # service that refused every request, the right key included.
    monkeypatch.setenv("ORCH_ADMIN_KEY", written)
    key = Settings().admin_key
    assert key is not None and key.get_secret_value() == "s3cret-admin-key-long"


def test_a_path_may_start_with_the_home_folder(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    # No shell expands it in a systemd unit, an env file or the TOML file: a folder named `~`
    # was made in the working directory.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCH_DATA_DIR", "~/orchdata")
    monkeypatch.setenv("ORCH_LITE_MODEL", "~/models/sd-turbo")
    toml_file.write_text('policy_dir = "~/policies"\n')
    settings = Settings()
    assert settings.data_dir == tmp_path / "home" / "orchdata"
    assert settings.policy_dir == tmp_path / "home" / "policies"
    assert settings.lite_model == str(tmp_path / "home" / "models" / "sd-turbo")
    monkeypatch.setenv("ORCH_LITE_MODEL", "stabilityai/sd-turbo")
    assert Settings().lite_model == "stabilityai/sd-turbo"
    # No such user, or no home at all (an arbitrary uid without HOME): as given, not a traceback.
    monkeypatch.setenv("ORCH_DATA_DIR", "~nosuchuser-orch/data")
    monkeypatch.setenv("ORCH_LITE_MODEL", "~nosuchuser-orch/model")
    settings = Settings()
    assert (settings.data_dir, settings.lite_model) == (Path("~nosuchuser-orch/data"), "~nosuchuser-orch/model")


def test_an_empty_variable_does_not_hide_the_vendor_s_own(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `ORCH_GEMINI_API_KEY=` (an env template's empty line) made gemini say "no API key" with
    # GEMINI_API_KEY set.
    monkeypatch.setenv("ORCH_GEMINI_API_KEY", "")
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-from-the-vendor-variable")
    key = Settings().gemini_api_key
    assert key is not None and key.get_secret_value() == "AIza-from-the-vendor-variable"


def test_the_config_file_s_key_outranks_a_vendor_s_variable(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The vendor's variable is a fallback: read as the environment, an operator's own
    # OPENAI_API_KEY exported in the shell replaced the studio's key in the file, and paid.
    toml_file.write_text('ORCH_OPENAI_API_KEY = "sk-studio"\nfal_api_key = "fal-studio"\n')
    monkeypatch.setenv("OPENAI_API_KEY", "sk-personal")
    monkeypatch.setenv("FAL_KEY", "fal-personal")
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-vendor")  # the file says nothing of it: still read
    settings = Settings()
    assert settings.openai_api_key is not None and settings.openai_api_key.get_secret_value() == "sk-studio"
    assert settings.fal_api_key is not None and settings.fal_api_key.get_secret_value() == "fal-studio"
    assert settings.gemini_api_key is not None and settings.gemini_api_key.get_secret_value() == "AIza-vendor"
    monkeypatch.setenv("ORCH_OPENAI_API_KEY", "sk-deploy")  # ours outranks the file, as every ORCH_ one
    key = Settings().openai_api_key
    assert key is not None and key.get_secret_value() == "sk-deploy"
    monkeypatch.delenv("ORCH_OPENAI_API_KEY")
    toml_file.write_text('openai_api_key = ""\n')  # an empty key in the file is as if left out
    key = Settings().openai_api_key
    assert key is not None and key.get_secret_value() == "sk-personal"


def test_paths_urls_and_model_names_are_read_without_spaces_at_their_ends(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An env file's `ORCH_DATA_DIR=/srv/orch ` started on a new, empty data dir named with the space.
    monkeypatch.setenv("ORCH_DATA_DIR", f"{tmp_path}/data ")
    monkeypatch.setenv("ORCH_DATABASE_URL", f" sqlite:///{tmp_path}/o.db\r")
    monkeypatch.setenv("ORCH_OPENAI_MODEL", "gpt-image-1.5 ")
    monkeypatch.setenv("ORCH_LITE_MODEL", "builtin:tiny-sd ")
    monkeypatch.setenv("ORCH_HIFI_MODEL", "\tstabilityai/sd-turbo")
    monkeypatch.setenv("ORCH_LITE_PREVIEW_VAE", "madebyollin/taesd ")
    monkeypatch.setenv("ORCH_A1111_CHECKPOINT", "sdxl.safetensors ")
    settings = Settings()
    assert settings.data_dir == tmp_path / "data"
    assert settings.database_url == f"sqlite:///{tmp_path}/o.db" and settings.openai_model == "gpt-image-1.5"
    assert (settings.lite_model, settings.hifi_model) == ("builtin:tiny-sd", "stabilityai/sd-turbo")
    assert (settings.lite_preview_vae, settings.a1111_checkpoint) == ("madebyollin/taesd", "sdxl.safetensors")


@pytest.mark.parametrize(("variable", "value", "told"), [
    ("ORCH_DATA_DIR", "da\nta", "U+000A, a line break"), ("ORCH_A1111_CHECKPOINT", "sdxl\n.safetensors",
                                                              "U+000A, a line break"),
    ("ORCH_DATABASE_URL", "sqlite:///o\t.db", "U+0009, a tab"), ("ORCH_LITE_MODEL", "/models/sd\x1b[0m", "U+001B"),
    ("ORCH_POLICY", "bal\x7fanced", "U+007F"), ("ORCH_A1111_AUTH", "user:pass\rword", "U+000D, a carriage return"),
    ("ORCH_COMFYUI_URL", "http://gpu-box:8188/\x08", "U+0008"), ("ORCH_CORS_ORIGINS", "https://a.example\x07",
                                                                "U+0007"),
    ("ORCH_DATA_DIR", "da\x85ta", "U+0085, a next line"), ("ORCH_LITE_MODEL", "/models/sd\x9b0m", "U+009B"),
    # Unicode's line breaks, and the direction controls that show a value otherwise than it is:
    # `ORCH_DATA_DIR=data\u202egpj.exe` made a data dir that `ls` shows as `dataexe.jpg`.
    ("ORCH_DATA_DIR", "da\u2028ta", "U+2028, a line separator"),
    ("ORCH_A1111_CHECKPOINT", "sdxl\u2029.safetensors", "U+2029, a paragraph separator"),
    ("ORCH_DATA_DIR", "data\u202egpj.exe", "U+202E, a right-to-left override"),
    ("ORCH_LITE_MODEL", "/models/\u061csd", "U+061C, an arabic letter mark"),
    ("ORCH_A1111_AUTH", "user:pass\u200eword", "U+200E, a left-to-right mark"),
    ("ORCH_POLICY", "bal\u200fanced", "U+200F, a right-to-left mark"),
    ("ORCH_COMFYUI_URL", "http://gpu-box:8188/\u202a", "U+202A, a left-to-right embedding"),
    ("ORCH_CORS_ORIGINS", "https://a.example\u202c", "U+202C, a pop directional formatting"),
    ("ORCH_DATABASE_URL", "sqlite:///\u2066o.db", "U+2066, a left-to-right isolate"),
    ("ORCH_DATA_DIR", "da\u2069ta", "U+2069, a pop directional isolate"),
])
def test_a_control_character_inside_a_setting_is_refused_before_anything_is_made(
        toml_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        variable: str, value: str, told: str) -> None:
    # `ORCH_DATA_DIR` with a newline inside made a data dir `da\nta` and migrated a new database
    # there; a checkpoint with one was sent to the webui, which lists none such.
    monkeypatch.chdir(tmp_path)  # the paths given are relative: made here, had they been
    monkeypatch.setenv(variable, value)
    before = sorted(tmp_path.rglob("*"))
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err == (f"orchestrator: invalid configuration:\n  {variable}: holds a control character ({told}) inside "
                   "it: remove it\n")
    assert "pass" not in err  # a secret's value is not shown
    assert sorted(tmp_path.rglob("*")) == before  # no data dir, database or folder made


def test_a_control_character_in_the_config_file_is_refused_but_not_a_list_s_line_breaks(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for escaped, told in [("\\u0000", "U+0000"), ("\\u2028", "U+2028, a line separator"),
                          ("\\u2067", "U+2067, a right-to-left isolate")]:
        toml_file.write_text(f'a1111_checkpoint = "sdxl{escaped}.safetensors"\n')
        assert main(["migrate"]) == 2
        assert capsys.readouterr().err == (f"orchestrator: invalid configuration:\n  {toml_file}: a1111_checkpoint: "
                                           f"holds a control character ({told}) inside it: remove it\n")
    # One engine or origin a line is whitespace between items, as a space after a comma is.
    toml_file.write_text('engines = """\none=studio.one:create,\ntwo=studio.two:create\n"""\n'
                         'cors_origins = "https://a.example,\\r\\nhttps://b.example"\n')
    settings = Settings()
    assert list(settings.extra_engines) == ["one", "two"]
    assert settings.cors_origin_list == ["https://a.example", "https://b.example"]
    # A provider's key leaves its engine unavailable instead (`tiers._cloud`): its vendor's variable
    # may be a shell's, which is no reason to stop every command.
    for key in ("sk-\nsplit", "sk-\u2028split", "sk-\u202esplit"):
        monkeypatch.setenv("OPENAI_API_KEY", key)
        assert Settings().openai_api_key is not None


def test_a_tab_around_an_engine_s_equals_sign_is_whitespace_but_not_one_inside_its_parts(
        toml_file: Path) -> None:
    # `extra_engines` reads each entry's name and target stripped: entries aligned with tabs
    # (`flux\t= studio.flux:create`) were taken before the control-character check refused them.
    toml_file.write_text('engines = """\nflux\t= studio.flux:create,\nsd =\tstudio.sd:create\n"""\n')
    assert Settings().extra_engines == {"flux": "studio.flux:create", "sd": "studio.sd:create"}
    for inside in ("fl\tux=studio.flux:create", "flux=studio.flux:cre\tate", "flux=studio.flux\n:create"):
        with pytest.raises(ValidationError, match="control character"):
            Settings(engines=inside)


CONFIG_FILE_REFUSED = "ORCH_CONFIG_FILE: holds a control character (U+000A, a line break) inside it: remove it"


@pytest.mark.parametrize("command", ["serve", "worker", "migrate", "check"])
def test_a_control_character_in_orch_config_file_is_refused_in_one_line(
        toml_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: str) -> None:
    # Read from the environment, not as a setting: printed as given, in "no such file: x", its line
    # break split the refusal over two lines.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORCH_CONFIG_FILE", "studio\n.toml")
    before = sorted(tmp_path.rglob("*"))
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert err == (f"orchestrator: {CONFIG_FILE_REFUSED}\n" if command == "check" else
                   f"orchestrator: invalid configuration:\n  {CONFIG_FILE_REFUSED}\n")
    assert sorted(tmp_path.rglob("*")) == before  # no data dir, database or folder made


@pytest.mark.parametrize("command", ["check", "migrate"])
def test_a_direction_control_in_orch_config_file_is_refused_as_a_line_break_is(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str) -> None:
    # Shown, `studio\u202elmot.exe` reads `studioexe.toml`: the file named is not the one seen.
    monkeypatch.setenv("ORCH_CONFIG_FILE", "studio\u202elmot.exe")
    refused = "ORCH_CONFIG_FILE: holds a control character (U+202E, a right-to-left override) inside it: remove it"
    assert main([command]) == 2
    assert capsys.readouterr().err == (f"orchestrator: {refused}\n" if command == "check" else
                                       f"orchestrator: invalid configuration:\n  {refused}\n")


def test_a_config_file_there_under_a_name_with_a_control_character_is_refused_as_well(
        toml_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Read, its name went into each refusal of its keys (`{file}: policy: ...`), line break and all.
    named = tmp_path / "studio\n.toml"
    named.write_text('policy = "nope"\nunknown_key = 1\n')
    monkeypatch.setitem(Settings.model_config, "toml_file", named)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert [error["msg"] for error in refused.value.errors()] == [CONFIG_FILE_REFUSED]
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == f"orchestrator: invalid configuration:\n  {CONFIG_FILE_REFUSED}\n"
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(("variable", "value"), [
    ("ORCH_DATA_DIR", '"/srv/orch"'), ("ORCH_DATA_DIR", "'/srv/orch'"), ("ORCH_POLICY_DIR", '"/srv/policies" '),
    ("ORCH_OPENAI_MODEL", "'gpt-image-2.6-sunburst'"), ("ORCH_ADMIN_KEY", '"a-key-of-twenty-chars"'),
    ("ORCH_LITE_MODEL", '"stabilityai/sd-turbo"'), ("ORCH_A1111_AUTH", "'u:pw'")])
def test_a_value_in_quotes_an_env_file_kept_is_refused(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                      variable: str, value: str) -> None:
    # `docker run --env-file` keeps them: the data dir was a new, empty install in a folder named `"`
    # of the working directory, and a quoted admin key refused every client.
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=r"is wrapped in . quotes"):
        Settings()
    monkeypatch.setenv(variable, value.strip().strip("'\""))
    Settings()


@pytest.mark.parametrize(("variable", "value"), [
    ("ORCH_OPENAI_BASE_URL", "https://api.openai.com/v1"), ("ORCH_REPLICATE_BASE_URL", "https://api.replicate.com/v1/"),
    ("ORCH_GEMINI_BASE_URL", "https://generativelanguage.googleapis.com/v1beta"),
    ("ORCH_STABILITY_BASE_URL", "https://api.stability.ai/v2beta")])
def test_a_base_url_naming_the_api_s_version_is_refused(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                       variable: str, value: str) -> None:
    # Written as an SDK's base URL, every request went to /v1/v1/... and every paid job failed.
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match="give the address without it"):
        Settings()
    monkeypatch.setenv(variable, "http://gateway.internal:4000/openai")  # a proxy's own path is taken
    Settings()
    monkeypatch.setenv(variable, "http://gateway.internal:4000/api/v3")  # a version not the engine's
    Settings()


def test_a_torch_thread_count_past_any_machine_is_refused(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 100000 crashed the process at the first draft; past 2**31 the inference thread never started.
    monkeypatch.setenv("ORCH_TORCH_THREADS", "100000")
    with pytest.raises(ValidationError, match="less than or equal to 1024"):
        Settings()


@pytest.mark.parametrize(("value", "told"), [("-1", "greater than or equal to 0"),
                                             ("1048577", "less than or equal to 1048576")])
def test_a_free_disk_reserve_below_0_or_past_a_tebibyte_is_refused(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   value: str, told: str) -> None:
    monkeypatch.setenv("ORCH_MIN_FREE_DISK_MB", value)
    with pytest.raises(ValidationError, match=f"min_free_disk_mb\n  Input should be {told}"):
        Settings()
    monkeypatch.setenv("ORCH_MIN_FREE_DISK_MB", "0")  # the check off
    assert Settings().min_free_disk_mb == 0


@pytest.mark.parametrize(("variable", "value", "told"), [
    ("ORCH_LEASE_SECONDS", "inf", "finite number"),      # an OverflowError traceback at start
    ("ORCH_STOP_GRACE", "inf", "finite number"),         # a stop that waited forever
    ("ORCH_REMOTE_DEADLINE", "1e300", "less than or equal to 86400"),
    ("ORCH_POLL_INTERVAL", "nan", "finite number"),
    # Renewed every third of it: an idle service's core busy, every other process read as dead.
    ("ORCH_LEASE_SECONDS", "0.001", "greater than or equal to 0.5"),
    ("ORCH_LEASE_SECONDS", "1e-300", "greater than or equal to 0.5"),
])
def test_a_duration_past_a_day_or_not_finite_is_refused(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                         variable: str, value: str, told: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=told):
        Settings()


EMPTY_MEANS_UNSET = ["policy_dir", "prices_file", "comfyui_workflow", "data_dir", "cache_dir", "database_url",
                     "lite_preview_vae", "hifi_model", "comfyui_url", "a1111_url",
                     # not only paths: `ORCH_LITE_MODEL=` once made a Lite engine of model '' that said
                     # it was available, and `ORCH_RUN_JOBS=` refused to start
                     "lite_model", "lite_device", "policy", "run_jobs", "lease_seconds", "gemini_base_url",
                     "gemini_api_key"]


@pytest.mark.parametrize("name", EMPTY_MEANS_UNSET)
def test_an_empty_variable_means_unset(name: str, toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `ORCH_POLICY_DIR=` once made the working directory the policy directory (Path("") is "."),
    # so any *.toml there was read as a policy.
    monkeypatch.delenv(f"ORCH_{name.upper()}", raising=False)
    expected = getattr(Settings(), name)
    monkeypatch.setenv(f"ORCH_{name.upper()}", "")
    assert getattr(Settings(), name) == expected


def test_an_empty_variable_leaves_the_config_file_s_value(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Unset, not "the default": an env template with empty lines once switched an install whose
    # file names PostgreSQL to a local SQLite file.
    url = "postgresql+psycopg://studio@db.internal/orchestrator"
    toml_file.write_text(f'database_url = "{url}"\npolicy = "local-only"\nlite_max_batch = 3\n')
    for name in ("ORCH_DATABASE_URL", "ORCH_POLICY", "ORCH_LITE_MAX_BATCH", "ORCH_DATA_DIR"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert (settings.database_url, settings.policy, settings.lite_max_batch) == (url, "local-only", 3)
    assert settings.resolved_database_url == url


@pytest.mark.parametrize("blank", [" ", "\r", "\t \r"])
def test_a_blank_variable_leaves_the_config_file_s_value(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                         blank: str) -> None:
    # A CRLF env file's empty line: read as set to nothing, the file's PostgreSQL URL gave way to a
    # local SQLite file.
    url = "postgresql+psycopg://studio@db.internal/orchestrator"
    toml_file.write_text(f'database_url = "{url}"\n')
    monkeypatch.setenv("ORCH_DATABASE_URL", blank)
    assert Settings().database_url == url


def test_an_empty_config_file_variable_reads_the_default_file(tmp_path: Path) -> None:
    # Read when the module is imported: a fresh interpreter in a folder holding orchestrator.toml.
    (tmp_path / "orchestrator.toml").write_text("lite_max_batch = 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")} | {"ORCH_CONFIG_FILE": ""}
    code = "from orchestrator.settings import Settings; print(Settings().lite_max_batch)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "3"


def test_an_empty_path_in_the_toml_file_means_unset(toml_file: Path) -> None:
    toml_file.write_text('policy_dir = ""\nprices_file = ""\ncomfyui_workflow = ""\n')
    settings = Settings()
    assert (settings.policy_dir, settings.prices_file, settings.comfyui_workflow) == (None, None, None)


def test_urls_that_may_hold_a_password_stay_out_of_the_settings_repr(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://studio:pw-1@db/orch",
                        comfyui_url="http://render:pw-2@comfy:8188", a1111_url="http://u:pw-3@a1111:7860")
    shown = repr(settings) + str(settings)
    assert not any(secret in shown for secret in ("pw-1", "pw-2", "pw-3")), shown
    assert settings.database_url == "postgresql+psycopg://studio:pw-1@db/orch"  # still there to use


@pytest.mark.parametrize(("variable", "value"), [
    ("ORCH_A1111_URL", "localhost:7860"), ("ORCH_COMFYUI_URL", "ftp://studio:8188"),
    ("ORCH_OPENAI_BASE_URL", "user:s3cret@api.example"), ("ORCH_FAL_BASE_URL", "https://"),
    ("ORCH_A1111_URL", "http://:7860"), ("ORCH_COMFYUI_URL", "http://[studio:8188"),
])
def test_a_server_address_without_a_scheme_and_host_is_refused(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        variable: str, value: str) -> None:
    """`localhost:7860` was taken: the engine was listed available and each job failed with a
    hint about its password."""
    monkeypatch.setenv(variable, value)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"{variable}: must be an http:// or https:// address with a host" in err
    assert "(got" not in err and "s3cret" not in err  # an address may hold a password: not repeated


@pytest.mark.parametrize(("variable", "value", "port"), [
    ("ORCH_A1111_URL", "http://127.0.0.1:99999", 99999), ("ORCH_COMFYUI_URL", "http://127.0.0.1:0", 0),
    ("ORCH_OPENAI_BASE_URL", "https://api.openai.com:70000", 70000),
])
def test_a_server_address_with_no_tcp_port_is_refused(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        variable: str, value: str, port: int) -> None:
    """The socket layer takes a port modulo 65536: 99999 sent the render to whatever listens on 34463."""
    monkeypatch.setenv(variable, value)
    assert main(["migrate"]) == 2
    assert f"{variable}: has port {port}, which is not a TCP port (1-65535)" in capsys.readouterr().err


@pytest.mark.parametrize(("variable", "value"), [
    ("ORCH_A1111_URL", "http://127.0.0.1:7860/?token=s3cret"), ("ORCH_COMFYUI_URL", "http://127.0.0.1:8188?"),
    ("ORCH_OPENAI_BASE_URL", "https://gateway.studio.example/openai?api-version=2025-04-01"),
])
def test_a_server_address_with_a_query_is_refused(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        variable: str, value: str) -> None:
    """The engines' paths go after the address, query and all: every request asked the server's
    root (`/?token=s3cret/sdapi/v1/txt2img`), the engine listed available all the same."""
    monkeypatch.setenv(variable, value)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"{variable}: has a query (?...), which would end up before every request's path" in err
    assert "s3cret" not in err


def test_server_addresses_with_credentials_or_a_path_are_taken(toml_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_A1111_URL", "http://artist:pw@10.0.0.7:7860/")
    monkeypatch.setenv("ORCH_OPENAI_BASE_URL", "https://gateway.studio.example/openai")
    monkeypatch.setenv("ORCH_COMFYUI_URL", " HTTP://[::1]:8188 ")  # as httpx takes it, spaces trimmed
    settings = Settings()
    assert settings.a1111_url == "http://artist:pw@10.0.0.7:7860/"
    assert settings.openai_base_url == "https://gateway.studio.example/openai"
    assert settings.comfyui_url == "HTTP://[::1]:8188"


def test_a_data_dir_set_in_the_file_is_named_as_the_file_s_key(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # "is ORCH_DATA_DIR right?" sent an operator whose setting is in the file after a variable never set.
    monkeypatch.delenv("ORCH_DATA_DIR")
    (toml_file.parent / "a-file").write_text("not a folder")
    toml_file.write_text(f'data_dir = "{toml_file.parent / "a-file"}"\n')
    assert main(["check"]) == 2
    assert f"orchestrator: {toml_file}: data_dir: " in capsys.readouterr().err
    toml_file.write_text(f'data_dir = "{toml_file.parent / "nothing-here"}"\n')
    assert main(["check"]) == 2
    assert f"(is {toml_file}: data_dir or ORCH_DATABASE_URL right?)" in capsys.readouterr().err
    sqlite3.connect(toml_file.parent / "empty.db").close()
    toml_file.write_text(f'database_url = "sqlite:///{toml_file.parent / "empty.db"}"\n')
    assert main(["check"]) == 2
    assert f"or is {toml_file}: database_url right?)" in capsys.readouterr().err


@pytest.mark.parametrize("refused", [{"ORCH_POLICY": "nope"}, {"ORCH_CORS_ORIGINS": "*"},
                                     {"ORCH_PRICES_FILE": "/nonexistent/prices.toml"},
                                     {"ORCH_DATABASE_URL": "sqlite:///:memory:"}])
def test_a_refused_start_makes_no_data_dir(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], refused: dict[str, str]) -> None:
    # A mistyped ORCH_DATA_DIR left a data dir, its assets/ and locks/ for each start refused.
    data = toml_file.parent / "mistyped-data"
    monkeypatch.setenv("ORCH_DATA_DIR", str(data))
    for name, value in refused.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--port", "1"]) == 2
    assert capsys.readouterr().err.startswith("orchestrator: ")
    assert not data.exists()


def test_config_file_path_that_cannot_be_looked_at_is_one_line(toml_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # `check` raised the OSError of a name too long (or a folder this user may not open) as a traceback.
    monkeypatch.setenv("ORCH_CONFIG_FILE", "x" * 300 + ".toml")
    for command in ("check", "migrate"):
        assert main([command]) == 2
        assert "ORCH_CONFIG_FILE: cannot be read (File name too long)" in capsys.readouterr().err


def test_a_blank_variable_is_not_named_for_the_file_s_value(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CRLF env file's `ORCH_POLICY=\r` is not set (the file's value is read): it was named for it.
    from orchestrator.services import startup_problems

    toml_file.write_text('policy = "nope"\n')
    monkeypatch.setenv("ORCH_POLICY", "\r")
    settings = Settings()
    assert settings.policy == "nope"
    assert f"{toml_file}: policy: 'nope' is not a loaded policy" in "\n".join(startup_problems(settings))


@pytest.mark.parametrize(("service", "variable"), [(False, "ORCH_DATA_DIR"), (True, "ORCH_DATA_DIR"),
                                                 (True, "ORCH_CACHE_DIR")])
def test_a_folder_under_a_home_there_is_not_is_refused_not_made_in_a_folder_named_tilde(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], service: bool,
        variable: str) -> None:
    # `~stuido/orch` (a typo of the user): a new, empty data dir `./~stuido/orch`, the studio's own looking lost.
    from orchestrator.services import startup_problems

    monkeypatch.chdir(toml_file.parent)
    monkeypatch.setenv("ORCH_LITE_MODEL", "builtin:tiny-sd")  # the cache is where it is built
    monkeypatch.setenv("ORCH_CACHE_DIR", str(toml_file.parent / "cache"))
    monkeypatch.setenv(variable, "~nosuchuser-orch/orch")
    told = (f"{variable}: ~nosuchuser-orch/orch: ~nosuchuser-orch names no home folder here (no such user, or no "
            "HOME): write the folder out")
    if service:  # what serve, worker and the demo refuse to start with (run, serve would serve)
        assert told in "\n".join(startup_problems(Settings()))
    else:
        assert main(["migrate"]) == 2 and told in capsys.readouterr().err
    assert not (toml_file.parent / "~nosuchuser-orch").exists()


def test_a_sqlite_url_under_home_is_refused_not_made_in_a_folder_named_tilde(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(toml_file.parent)
    monkeypatch.setenv("ORCH_DATABASE_URL", "sqlite:///~/orch.db")
    assert main(["migrate"]) == 2
    assert "a SQLite URL's path is not expanded" in capsys.readouterr().err
    assert not (toml_file.parent / "~").exists()


def test_cors_origins_are_kept_as_browsers_send_them_and_a_password_is_not_printed(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A browser sends `https://xn--bcher-kva.example`: the dashboard was refused with nothing in the log.
    monkeypatch.setenv("ORCH_CORS_ORIGINS", "https://Bücher.example,https://plain.example")
    assert Settings().cors_origin_list == ["https://xn--bcher-kva.example", "https://plain.example"]
    # Written with a path or a bad port too, it was quoted whole by those refusals, password and all.
    for origins in ("https://dash:s3cret@dash.example", "https://dash:s3cret@dash.example/",
                    "https://plain.example,https://dash:s3cret@dash.example:99999", "https://dash:s3cret@*.example"):
        monkeypatch.setenv("ORCH_CORS_ORIGINS", origins)
        assert main(["migrate"]) == 2
        said = capsys.readouterr().err
        assert "an origin has no user or password" in said and "s3cret" not in said, said


@pytest.mark.parametrize(("variable", "address", "secret"), [
    ("ORCH_A1111_URL", "http://webui:hun/ter2@127.0.0.1:7860", "ter2"),
    # Digits before the /: taken as host `webui`, port 12, and every render sent there.
    ("ORCH_A1111_URL", "http://webui:12/ter2@127.0.0.1:7860", "ter2"),
    ("ORCH_COMFYUI_URL", "http://comfy:hun#ter2@127.0.0.1:8188", "ter2"),
    ("ORCH_COMFYUI_URL", "http://comfy:hun?ter2@127.0.0.1:8188", "ter2"),
    ("ORCH_OPENAI_BASE_URL", "https://gw:hun/ter2@gateway.example", "ter2"),
])
def test_an_unencoded_slash_question_mark_or_hash_in_a_url_s_password_is_told_as_such(
        toml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str,
        address: str, secret: str) -> None:
    # The host ends at the first /, ? or #: a password holding one was told as "must be an http://
    # or https:// address with a host", which it had, or taken with the wrong host and port.
    monkeypatch.setenv(variable, address)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"{variable}: has an @ after a /, ? or #: a user:password in it must be percent-encoded" in err, err
    assert secret not in err
    # Written percent-encoded, it is taken, and the engine sends the password decoded.
    encoded = address.replace("hun/", "hun%2F").replace("12/", "12%2F").replace("hun#", "hun%23").replace(
        "hun?", "hun%3F")
    monkeypatch.setenv(variable, encoded)
    url = getattr(Settings(), variable.removeprefix("ORCH_").lower())
    assert basic_auth_in(url)[1] == tuple(address.split("//", 1)[1].split("@", 1)[0].split(":", 1))
