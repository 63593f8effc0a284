"""The command line: a mistake in the configuration or an unreachable service is one plain line on
stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import sqlalchemy.exc
from alembic.script import ScriptDirectory
from PIL import Image

from orchestrator import __version__
from orchestrator import check as check_module
from orchestrator import demo as demo_module
from orchestrator.cli import START_STOPPED, _bound, _log_to_data_dir, main
from orchestrator.db import upgrade
from orchestrator.server import free_port
from orchestrator.services import Services, Stopped, startup_problems
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore
from tests.api import create_project, run_draft
from tests.conftest import SettingsFactory, settings_for


def demo_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Why a demo could not go on: its one line (exit 1), as every command's errors, its prefix left off."""
    assert main(argv) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("orchestrator: ")]
    assert len(said) == 1, said
    return said[0].removeprefix("orchestrator: ")


def test_invalid_setting_names_the_variable(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_LITE_MAX_BATCH", "99")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: invalid configuration:")
    assert "ORCH_LITE_MAX_BATCH: Input should be less than or equal to 16 (got '99')" in err
    assert "Traceback" not in err


def test_a_bad_file_value_is_named_as_the_file_s_beside_an_empty_variable(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The empty variable is unset (the file's value was read), yet it was blamed.
    make_settings()
    config = tmp_path / "studio.toml"
    config.write_text("lite_max_batch = 0\n")
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    monkeypatch.setenv("ORCH_LITE_MAX_BATCH", "")
    assert main(["migrate"]) == 2
    assert f"  {config}: lite_max_batch: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_another_application_s_database_is_not_filled_with_our_tables(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    make_settings()
    other = tmp_path / "crm.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///{other}")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert "ORCH_DATABASE_URL: the database at sqlite:///" in err and "another application (users)" in err
    assert "point ORCH_DATABASE_URL at a database of its own" in err
    with sqlite3.connect(other) as conn:
        assert [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["users"]
    # `check` does not advise a migrate that would refuse.
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "tables of another application (users)" in err and "run `orchestrator migrate`" not in err


def data_dir_database_with(settings: Settings, monkeypatch: pytest.MonkeyPatch, statement: str) -> None:
    """The data dir's default database made by hand with `statement` (the CLI's ORCH_DATA_DIR)."""
    import sqlite3

    settings.data_dir.mkdir(parents=True)
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as conn:
        conn.execute(statement)
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))


def test_check_of_a_database_migrated_down_to_nothing_advises_migrate(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # An empty alembic_version (`alembic downgrade base`) is this service's history, as migrate reads it.
    data_dir_database_with(make_settings(), monkeypatch,
                           "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "run `orchestrator migrate`" in err and "another application" not in err, err


def test_another_application_s_file_in_the_data_dir_names_the_data_dir(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # It blamed ORCH_DATABASE_URL, which was not set: the default database is a file in the data dir.
    data_dir_database_with(make_settings(), monkeypatch, "CREATE TABLE users (id INTEGER PRIMARY KEY)")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: ORCH_DATA_DIR (its orchestrator.db): the database at") and \
        "point ORCH_DATA_DIR at a folder of its own" in err, err


def test_a_policy_file_refused_at_start_stops_the_service(make_settings: SettingsFactory, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Served anyway, the built-in `balanced` would route what this stricter override kept local.
    make_settings()
    (tmp_path / "balanced.toml").write_text('name = "balanced"\n[[rules]]\nmatch = {}\nengines = ["local-hifi"]\n'
                                            "privte = true\n")
    monkeypatch.setenv("ORCH_POLICY_DIR", str(tmp_path))
    monkeypatch.setenv("ORCH_POLICY", "balnced")
    # Its migrate below otherwise migrated ./.orchestrator, the default data dir, wherever the tests ran.
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    for command in (["serve", "--port", "9"], ["worker"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("orchestrator: invalid configuration:\n")
        assert f"  ORCH_POLICY_DIR: {tmp_path / 'balanced.toml'}: rule 1: privte: unknown key\n" in err
        assert "  ORCH_POLICY: 'balnced' is not a loaded policy (known: balanced, budget-saver," in err
    assert main(["migrate"]) == 0  # which reads no policy


def test_a_demo_with_an_unknown_policy_is_refused_before_anything_starts(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --policy nosuch` migrated a database, started the service and loaded the model, and
    only then exited 1 on the service's 422 to the project it asked for."""
    make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(demo_module, "run_demo", lambda **_kwargs: pytest.fail("the demo was run"))
    assert main(["demo", "--policy", "nosuch", "--out", str(tmp_path / "renders")]) == 2
    assert capsys.readouterr().err == ("orchestrator: invalid configuration:\n  --policy: 'nosuch' is not a loaded "
                                       "policy (known: balanced, budget-saver, cloud-first, local-only)\n")
    assert not (tmp_path / "data").exists() and not (tmp_path / "renders").exists()  # nothing made


def test_demo_against_a_service_refuses_a_config_file_named_but_absent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # It sends ORCH_ADMIN_KEY, which that file may set: a typo in its name went unsaid.
    monkeypatch.setenv("ORCH_CONFIG_FILE", str(tmp_path / "studio.tml"))
    assert main(["demo", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "renders")]) == 2
    assert capsys.readouterr().err == (f"orchestrator: invalid configuration:\n  ORCH_CONFIG_FILE: no such file: "
                                       f"{tmp_path / 'studio.tml'}\n")
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_demo_against_an_unreachable_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "renders" / "today")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot reach http://127.0.0.1:9/")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # the folders made for its output, nothing in them, are gone
    # A folder that was there stays, and so does one holding something of the user's.
    (tmp_path / "renders" / "notes.txt").parent.mkdir()
    (tmp_path / "renders" / "notes.txt").write_text("mine")
    assert main(["demo", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "renders" / "today")]) == 1
    assert [p.name for p in tmp_path.rglob("*")] == ["renders", "notes.txt"]


def test_a_demo_against_a_service_that_never_answers_gives_up_in_a_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The connection taken, no answer (a stopped server, a firewall): 10 minutes with nothing on screen.
    monkeypatch.setattr(demo_module, "REQUEST_TIMEOUT", httpx.Timeout(0.3))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert main(["demo", "--url", url, "--out", str(tmp_path)]) == 1
    assert time.monotonic() - started < 30
    assert capsys.readouterr().err.startswith(f"orchestrator: cannot reach {url}/")


def test_the_demo_does_not_print_a_proxy_s_password_in_its_url(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", "http://studio:s3cret-pw@127.0.0.1:9/", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("orchestrator: cannot reach http://studio:***@127.0.0.1:9/"), err
    assert "orchestrator at http://studio:***@127.0.0.1:9/" in out and "s3cret-pw" not in out + err


def test_the_demo_runs_the_three_stages_and_saves_their_images(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A key with a non-ASCII letter, which the service reads as UTF-8: the demo's own client
    # crashed sending it (httpx sends a str header as ASCII only).
    client = start_server(make_settings(hifi_model="builtin:tiny-sd", admin_key="clé-démo"))
    monkeypatch.setenv("ORCH_ADMIN_KEY", "clé-démo")
    out = tmp_path / "out"
    labels: list[list[str]] = []
    drawn = demo_module.contact_sheet

    def sheet(images: list[Image.Image], labelled: list[str]) -> Image.Image:
        labels.append(labelled)
        return drawn(images, labelled)

    monkeypatch.setattr(demo_module, "contact_sheet", sheet)
    assert main(["demo", "--url", str(client.base_url), "--out", str(out), "--size", "64"]) == 0
    saved = {path.name: Image.open(path).size for path in out.iterdir() if path.suffix == ".png"}
    sheet_size = saved.pop("contact-sheet.png")
    assert saved == {**{f"draft-{i}.png": (64, 64) for i in range(4)}, "bridge.png": (64, 64), "final.png": (128, 128)}
    assert sheet_size[0] == 152 and sheet_size[1] > 152  # each draft's label under it
    [drafts] = labels
    assert [label.split("  seed ")[0] for label in drafts] == ["0", "1", "2", "3"]
    assert all(label.split("  seed ")[1].isdigit() for label in drafts), drafts
    lineage = json.loads((out / "lineage.json").read_text())  # as `--help` promises
    assert [a["stage"] for a in [*lineage["ancestors"], lineage["asset"]]] == ["ideation", "bridge", "polish"]
    assert sorted(path.name for path in out.iterdir() if path.suffix != ".png") == ["lineage.json"]
    told = capsys.readouterr().out
    # Not a terminal: each job's outcome on a line of its own, no bar redrawn with carriage returns.
    assert "\r" not in told
    # Nothing sent off the machine unasked: under the service's default policy (balanced), a vendor's
    # key in the shell sent the bridge and the polish to a paid engine.
    assert "(policy local-only)" in told and told.count("  routed to local-hifi (estimate 0.0 credits)") == 2, told
    # Once each, not again at the end: Lite's, and local-hifi's tiny model set by ORCH_HIFI_MODEL.
    assert told.count("images are noise (set ORCH_LITE_MODEL") == 1, told
    assert told.count("images are noise (set ORCH_HIFI_MODEL") == 1, told
    assert [line.split()[0] for line in told.splitlines() if line.rstrip().endswith("succeeded")] == [
        "drafts", "bridge", "polish"]
    chain = told.split("lineage:\n", 1)[1].splitlines()[:3]
    assert [line.split()[0] for line in chain] == ["ideation", "bridge", "polish"]


def test_the_demo_prints_what_a_metering_service_charged_for_its_drafts(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # It printed the bridge's and the polish's charges, not the drafts', often the largest.
    client = start_server(make_settings(hifi_model="builtin:tiny-sd", local_gpu_second_credits=1000.0))
    assert main(["demo", "--url", str(client.base_url), "--out", str(tmp_path / "out"), "--size", "64"]) == 0
    told = capsys.readouterr().out.splitlines()
    drafts = next(i for i, line in enumerate(told) if line.split()[:1] == ["drafts"] and "succeeded" in line)
    assert told[drafts + 1].startswith("  charged ") and told[drafts + 1].endswith(" credits"), told
    assert float(told[drafts + 1].split()[1]) > 0


def the_one_job_ended(client: httpx.Client) -> dict[str, Any]:
    """The service's one job, once it has ended (or as it is after 30 s)."""
    [job] = client.get("/v1/jobs").json()["items"]
    deadline = time.monotonic() + 30
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    ended: dict[str, Any] = job
    return ended


def test_a_demo_interrupted_cancels_the_job_it_was_following(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C left the drafts queued: the next demo on the data dir rendered them first, for nobody."""
    import orchestrator.demo as demo

    client = start_server(make_settings())

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_follow", interrupted)
    # 512 px drafts: seconds of work on the tiny model, so the cancel comes while they render.
    assert main(["demo", "--url", str(client.base_url), "--out", str(tmp_path / "out"), "--size", "512"]) == 130
    job = the_one_job_ended(client)
    assert job["status"] == "canceled", job
    # It said only "interrupted": whether its job went on rendering was the user's guess.
    assert capsys.readouterr().err == f"orchestrator: interrupted; its drafts job {job['id']} was canceled\n"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_demo_stopped_by_a_signal_cancels_its_job_as_ctrl_c_does(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stop: signal.Signals) -> None:
    """`timeout`, a CI's cancel or a closed terminal killed the demo at once, its job left running,
    rendered later for nobody."""
    import orchestrator.demo as demo

    client = start_server(make_settings())
    kept = signal.getsignal(stop)
    monkeypatch.setattr(demo, "_follow", lambda *_args: os.kill(os.getpid(), stop))
    assert main(["demo", "--url", str(client.base_url), "--out", str(tmp_path / "out"), "--size", "512"]) == 128 + stop
    assert signal.getsignal(stop) == kept  # the process's own handling, back
    job = the_one_job_ended(client)
    assert job["status"] == "canceled", job
    assert capsys.readouterr().err == f"orchestrator: interrupted; its drafts job {job['id']} was canceled\n"


def test_the_demo_follows_a_job_s_stream_again_after_the_last_event_it_told(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A stream that ended before its job (a service restarting) was read as the job's end: the
    demo said 'drafts job ... running: no reason given' and exited, its job left to run for nobody.
    While it asks again, it says so once (four minutes of a terminal that looked frozen before)."""
    asked: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/job_1":
            return httpx.Response(200, json={"id": "job_1", "status": "succeeded", "assets": ["ast_1"]})
        asked.append(request.headers.get("last-event-id"))
        if len(asked) == 1:
            return httpx.Response(200, text='id: 1\nevent: queued\ndata: {"status": "queued"}\n\n')
        if len(asked) == 2:
            return httpx.Response(503, json={"error": {"code": "server_stopping", "message": "", "details": {}}})
        if len(asked) == 3:  # the reverse proxy in front of it, while it restarts
            return httpx.Response(502, text="Bad Gateway")
        if len(asked) == 4:
            return httpx.Response(200, text='id: 2\nevent: started\ndata: {}\n\n')
        return httpx.Response(200, text='id: 3\nevent: succeeded\ndata: {"status": "succeeded"}\n\n')

    monkeypatch.setattr(demo_module, "STREAM_RETRY_WAITS", (0.0,))
    with httpx.Client(base_url="http://studio.test", transport=httpx.MockTransport(answer)) as client:
        assert demo_module.watch(client, "job_1", "drafts")["status"] == "succeeded"
    assert asked == [None, "1", "1", "1", "2"]
    told = capsys.readouterr().out.splitlines()
    assert [line for line in told if "out of reach" in line] == [
        "  drafts   the service is out of reach (answered 503); asking again for up to 4 min (Ctrl-C cancels the job)"]


def test_the_demo_gives_up_on_a_stream_that_tells_nothing_for_long(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str | None] = []
    monkeypatch.setattr(demo_module, "STREAM_RETRY_WAITS", (0.0, 0.1))
    monkeypatch.setattr(demo_module, "STREAM_GIVE_UP_SECONDS", 0.25)

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        return httpx.Response(503)

    timer = threading.Timer(3600, lambda: None)
    with httpx.Client(base_url="http://studio.test", transport=httpx.MockTransport(answer)) as client:
        assert demo_module._follow(client, "job_1", "drafts", False, timer) is False
    assert 3 <= len(asked) <= 6, asked  # asked 0, 0.1, 0.2 and 0.3 s on: then 0.25 s told nothing


def test_a_demo_whose_service_is_stopping_when_its_stream_ended_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_module, "_follow", lambda *_args: False)
    stopping = httpx.MockTransport(lambda request: httpx.Response(503))  # the job's read too
    with httpx.Client(base_url="http://studio.test", transport=stopping) as client, \
            pytest.raises(demo_module.StreamEnded):
        demo_module.watch(client, "job_1", "drafts")
    refused = httpx.MockTransport(lambda request: httpx.Response(401))  # not the service going: told as it is
    with httpx.Client(base_url="http://studio.test", transport=refused) as client, \
            pytest.raises(httpx.HTTPStatusError):
        demo_module.watch(client, "job_1", "drafts")


def test_a_demo_whose_job_s_stream_ends_for_good_says_so_and_cancels_it(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    client = start_server(make_settings())
    monkeypatch.setattr(demo_module, "_follow", lambda *_args: False)  # as a service that stopped
    said = demo_refused(["demo", "--url", str(client.base_url), "--out", str(tmp_path / "out"), "--size", "512"],
                        capsys)
    [job] = client.get("/v1/jobs").json()["items"]
    assert said == (f"the service's event stream of its drafts job {job['id']} ended before the job did "
                               f"(is the service stopping?); its drafts job {job['id']} was canceled")


def test_the_demo_s_own_service_runs_its_jobs_whatever_orch_run_jobs_says(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    # An operator's API servers run none (ORCH_RUN_JOBS=false): the demo then waited for ever on its first draft.
    settings = make_settings(hifi_model="builtin:tiny-sd")
    for name, value in {"ORCH_DATA_DIR": settings.data_dir, "ORCH_LITE_MODEL": "builtin:tiny-sd",
                        "ORCH_CACHE_DIR": settings.cache_dir, "ORCH_RUN_JOBS": "false"}.items():
        monkeypatch.setenv(name, str(value))
    caplog.set_level(logging.INFO)
    assert main(["demo", "--out", str(tmp_path / "out"), "--size", "64"]) == 0
    assert (tmp_path / "out" / "final.png").exists()
    assert "saved drafts" in capsys.readouterr().out
    # Its new database was migrated without a line per revision ahead of the demo's own output.
    assert (settings.data_dir / "orchestrator.db").exists()
    assert [r.message for r in caplog.records if r.name.startswith("alembic")] == []


def test_the_demo_sends_the_admin_key_the_config_file_sets(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README lets orchestrator.toml set any setting: an admin_key there made the demo's own
    service refuse the demo (401)."""
    settings = make_settings(hifi_model="builtin:tiny-sd")
    config = tmp_path / "orchestrator.toml"
    config.write_text(f'admin_key = "{"k" * 32}"\ndata_dir = "{settings.data_dir}"\nlite_model = "builtin:tiny-sd"\n'
                      f'cache_dir = "{settings.cache_dir}"\n')
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    assert main(["demo", "--out", str(tmp_path / "out"), "--size", "64"]) == 0
    assert (tmp_path / "out" / "final.png").exists()


def test_the_demo_on_another_service_refuses_a_config_file_it_cannot_read(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The file may hold the admin key the demo sends: with a key misspelled, `demo --url` read
    around the file (its key too: a 401 from the service) where every other command says so."""
    make_settings()
    config = tmp_path / "orchestrator.toml"
    config.write_text('admin_kye = "secret"\n')
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    assert main(["demo", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "out"), "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration:" in err and "admin_kye" in err and "admin_key" in err
    # A setting only the service reads, invalid here, is the other service's to judge: not refused.
    config.unlink()
    monkeypatch.setenv("ORCH_LITE_MAX_BATCH", "99")
    assert main(["demo", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "out"), "--size", "64"]) == 1
    assert "cannot reach http://127.0.0.1:9/" in capsys.readouterr().err


def test_the_demo_on_another_service_sends_the_file_s_key_whatever_else_is_refused_here(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting only the service reads, invalid here, made the demo read the key from the
    environment alone: the file's key was dropped, and the service answered 401."""
    from orchestrator.demo import _admin_key

    make_settings()
    config = tmp_path / "orchestrator.toml"
    config.write_text(f'admin_key = "{"k" * 32}"\nlease_seconds = -1\n')
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    monkeypatch.setenv("ORCH_LITE_MAX_BATCH", "99")
    assert _admin_key() == "k" * 32
    monkeypatch.setenv("ORCH_ADMIN_KEY", "e" * 32)  # the environment's first, as the service reads it
    assert _admin_key() == "e" * 32


def test_a_service_url_that_is_no_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--url", "http://[::1"])
    assert exited.value.code == 2 and "is not an http:// or https:// address" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--url", "http://127.0.0.1:8000/?project=p1"])
    assert exited.value.code == 2
    assert "'http://127.0.0.1:8000/?project=p1' has a query (?...)" in capsys.readouterr().err


def test_a_demo_draft_left_queued_is_told_once(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # API servers that run no jobs and no worker up: the demo waited in silence, for ever.
    client = start_server(make_settings(run_jobs=False))
    monkeypatch.setattr(demo_module, "QUEUED_HINT_SECONDS", 0.2)
    outcome: list[int] = []

    def run() -> None:
        outcome.append(main(["demo", "--url", str(client.base_url), "--out", str(tmp_path / "out"), "--size", "64"]))

    thread = threading.Thread(target=run)
    thread.start()
    told = ""
    deadline = time.monotonic() + 30
    while "still queued" not in told and time.monotonic() < deadline:
        time.sleep(0.05)
        told += capsys.readouterr().out
    time.sleep(0.4)  # a second interval: still one line
    [job] = client.get("/v1/jobs").json()["items"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    thread.join(30)
    said = capsys.readouterr()
    told += said.out
    assert told.count("still queued after 0.2 s") == 1
    assert "no process runs jobs: the service's API server runs none (ORCH_RUN_JOBS=false) and no " \
           "`orchestrator worker` is running" in told
    assert outcome == [1]
    assert said.err == f"orchestrator: drafts job {job['id']} canceled: canceled before it started (canceled)\n"


@pytest.mark.parametrize(("answer", "told"), [
    (httpx.Response(200, json={"items": [], "runs_jobs_here": False, "queued": 1}), "no process runs jobs"),
    (httpx.Response(200, json={"items": [], "runs_jobs_here": True, "queued": 9}), "the jobs ahead of it"),
    (httpx.Response(200, json={"items": [{"worker_id": "w"}], "runs_jobs_here": False, "queued": 9}),
     "the jobs ahead of it"),
    # A project key may not ask: both causes, the likelier first.
    (httpx.Response(403, json={"error": {"code": "forbidden", "message": "admin key", "details": {}}}),
     "ahead of it on its engine are done (where its API servers run no jobs, an `orchestrator worker` must"),
])
def test_a_demo_s_queued_hint_says_why_as_far_as_the_service_says(answer: httpx.Response, told: str) -> None:
    # "is `orchestrator worker` running?" was told of a service running its own jobs, busy with others.
    with httpx.Client(base_url="http://studio.test", transport=httpx.MockTransport(lambda _: answer)) as client:
        said = demo_module.why_queued(client)
    assert told in said
    assert ("worker" in said) == (answer.json().get("runs_jobs_here") is not True
                                  and not answer.json().get("items"))


def test_the_demo_does_not_start_on_a_lite_engine_that_cannot_run(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    client = start_server(make_settings(lite_model=str(tmp_path / "models" / "sd-turbo")))
    said = demo_refused(["demo", "--url", str(client.base_url), "--out", str(tmp_path / "out")], capsys)
    assert re.match(r"the lite engine is unavailable: model '.*sd-turbo' is a path to nothing", said), said
    assert client.get("/v1/projects").json()["items"] == []  # nothing made for a run that cannot be


def test_the_demo_does_not_start_drafts_larger_than_the_server_makes(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Its drafts were answered 422, and an empty "demo" project was left behind.
    client = start_server(make_settings(local_max_size=128))
    said = demo_refused(["demo", "--url", str(client.base_url), "--size", "256", "--out", str(tmp_path / "out")],
                        capsys)
    assert re.match(r"--size 256 is larger than the lite engine at .* makes \(128 px, its "
                    r"ORCH_LOCAL_MAX_SIZE\): pass --size 128 or less", said), said
    assert client.get("/v1/projects").json()["items"] == []
    # Drafts it makes, but polished to twice their size, which no engine here makes: the polish
    # failed after the drafts and the bridge were made.
    said = demo_refused(["demo", "--url", str(client.base_url), "--size", "128", "--out", str(tmp_path / "out")],
                        capsys)
    assert re.match(POLISHED_TOO_LARGE + "pass --size 64 or less", said), said
    assert client.get("/v1/projects").json()["items"] == []


POLISHED_TOO_LARGE = r"--size 128 is polished to 256 px, larger than any engine at .* polishes to \(128 px at most\): "


def test_the_demo_sizes_its_polish_by_the_engines_its_policy_polishes_on(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A vendor's key in the shell made Gemini available (4096 px) though `local-only` never sends to
    # it: the demo made its drafts and bridge, then local-hifi refused the polish.
    client = start_server(make_settings(local_max_size=128, gemini_api_key="never-sent",
                                        gemini_base_url="http://127.0.0.1:9"))
    said = demo_refused(["demo", "--url", str(client.base_url), "--size", "128", "--out", str(tmp_path / "out")],
                        capsys)
    assert re.match(POLISHED_TOO_LARGE + "pass --size 64 or less", said), said
    assert client.get("/v1/projects").json()["items"] == []


def drafted(make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
            monkeypatch: pytest.MonkeyPatch, n: int) -> tuple[Settings, httpx.Client, list[str]]:
    """A running service with one draft job of `n` images, and the CLI's environment on its data dir."""
    settings = make_settings()
    client = start_server(settings)
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    assets: list[str] = run_draft(client, create_project(client)["id"], n=n)["assets"]
    return settings, client, assets


def test_check_names_the_assets_whose_files_are_missing_or_damaged(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=3)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"3 assets, 3 files read and hashed in {settings.assets_dir}\n") and out.endswith("ok\n")

    store = ArtifactStore(settings.assets_dir)
    missing, damaged, _sound = (client.get(f"/v1/assets/{a}").json()["sha256"] for a in assets)
    store.path_for(missing).unlink()
    store.path_for(damaged).write_bytes(b"flipped bits")
    store.put(b"a canceled job's image")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("3 assets, 2 files read and hashed")  # the missing one was looked for, not read
    # One of a kind in the singular ("1 assets missing" once).
    assert f"1 asset missing: {assets[0]}\n" in out
    assert f"1 asset damaged (the bytes do not match its sha256): {assets[1]}\n" in out
    assert "1 file no asset names" in out and "PROBLEMS" in out
    # Without reading the files, only the missing one shows.
    assert main(["check", "--no-hash"]) == 1
    out = capsys.readouterr().out
    assert f"1 asset missing: {assets[0]}\n" in out and "damaged" not in out
    # A sha256 mended by hand names no file: its own is then one no asset names, which the sweep
    # removes, so it is not told as a canceled job's image to be left to it.
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        db.execute("UPDATE assets SET sha256 = upper(sha256) WHERE id = ?", (assets[2],))
    assert main(["check", "--no-hash"]) == 1
    out = capsys.readouterr().out
    assert f"1 asset with a malformed sha256 in its row: {assets[2]}\n" in out
    assert out.startswith("3 assets, 1 file looked for")  # the missing one, and none for the malformed row
    assert "2 files no asset names, some maybe the files of the malformed rows above: mend those rows first" in out


def test_check_names_the_assets_whose_recorded_size_is_not_their_file_s(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=2)
    edited, replaced = assets
    database = settings.data_dir / "orchestrator.db"
    # A row's size raised by hand, its project's usage with it (which adds up, then): the project's
    # quota counts 7 bytes its file does not hold.
    with sqlite3.connect(database) as db:
        db.execute("UPDATE assets SET bytes = bytes + 7 WHERE id = ?", (edited,))
        db.execute("UPDATE projects SET storage_bytes = storage_bytes + 7 "
                   "WHERE id = (SELECT project_id FROM assets WHERE id = ?)", (edited,))
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert f"1 asset whose recorded size (bytes in the row) is not its file's: {edited}\n" in out
    assert "PROBLEMS: the assets above count a size in their projects' storage usage" in out
    assert "damaged" not in out and "bytes recorded" not in out, out
    with sqlite3.connect(database) as db:
        db.execute("UPDATE assets SET bytes = bytes - 7 WHERE id = ?", (edited,))
        db.execute("UPDATE projects SET storage_bytes = storage_bytes - 7 "
                   "WHERE id = (SELECT project_id FROM assets WHERE id = ?)", (edited,))
    assert main(["check"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    # A file replaced by hand: damaged when hashed; by its size alone with --no-hash.
    ArtifactStore(settings.assets_dir).path_for(client.get(f"/v1/assets/{replaced}").json()["sha256"]) \
        .write_bytes(b"another image")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert f"1 asset damaged (the bytes do not match its sha256): {replaced}\n" in out and "recorded size" not in out
    assert main(["check", "--no-hash"]) == 1
    out = capsys.readouterr().out
    assert f"1 asset whose recorded size (bytes in the row) is not its file's: {replaced}\n" in out, out


def test_check_beside_a_service_does_not_call_an_asset_deleted_meanwhile_lost(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Its page of rows was read live; then the asset was deleted and the sweep took its file before
    # `check` looked: "1 asset missing", exit 1, for a store as it should be.
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=2)
    store = ArtifactStore(settings.assets_dir)
    shas = [client.get(f"/v1/assets/{a}").json()["sha256"] for a in assets]
    looked = check_module._verdict

    def deleted_meanwhile(store_: ArtifactStore, sha: str, hashes: bool) -> str | None:
        if sha == shas[0]:
            assert client.delete(f"/v1/assets/{assets[0]}").status_code == 204
            store.path_for(sha).unlink()  # the sweep's
        return looked(store_, sha, hashes)

    monkeypatch.setattr(check_module, "_verdict", deleted_meanwhile)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "missing" not in out and out.endswith("ok\n"), out
    assert out.startswith("1 asset, 1 file read and hashed"), out


def test_check_into_a_reader_that_stopped_reading_ends_without_a_traceback(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `orchestrator check | head -1`: head has gone by the time the report is flushed.
    settings = make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    assert main(["migrate"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(ORCH_DATA_DIR=str(settings.data_dir))
    read, write = os.pipe()
    os.close(read)  # before the command has imported anything, so its first write meets no reader
    try:
        done = subprocess.run([sys.executable, "-m", "orchestrator", "check"], env=env, cwd=tmp_path,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_a_broken_pipe_of_another_kind_is_not_taken_for_a_reader_gone(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # A socket's (the demo's service going away) is a failure to see, not output nobody reads.
    make_settings()

    def broken(args: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("orchestrator.cli._run", broken)
    with pytest.raises(BrokenPipeError):
        main(["check"])


def test_check_reads_a_data_dir_whose_name_holds_uri_characters(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client], tmp_path: Path,
        tiny_cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Through a SQLAlchemy URL the escapes were decoded before SQLite read the `file:` URI: `#` and
    # `?` cut the path short, and check opened (and made) the file `a`, read-write.
    make_settings()  # the environment kept out
    parent = tmp_path / "odd"
    settings = settings_for(parent / "a#b?c%41 d", tiny_cache_dir)
    client = start_server(settings)
    run_draft(client, create_project(client)["id"], n=1)
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    capsys.readouterr()
    assert main(["check"]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.endswith("ok\n")
    assert [p.name for p in parent.iterdir()] == ["a#b?c%41 d"]


def test_check_tells_a_file_set_aside_by_an_interrupted_sweep_from_a_missing_one(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep that stopped between renaming a named file aside and putting it back: check said
    "missing, restore from a backup" of a file that is there, which the next start restores."""
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=1)
    sha = client.get(f"/v1/assets/{assets[0]}").json()["sha256"]
    home = ArtifactStore(settings.assets_dir).path_for(sha)
    home.rename(home.with_name(f".gc-{sha}-0badc0de.png"))
    capsys.readouterr()
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "1 asset's file was set aside by a sweep that stopped mid-way" in out and assets[0] in out
    assert "puts it back" in out
    assert "missing" not in out and out.endswith("ok\n")
    # Only a copy whose bytes are the image's: a damaged one was "set aside, ok" where the API
    # answered 500 damaged, and the next sweep put it back as it was.
    home.with_name(f".gc-{sha}-0badc0de.png").write_bytes(b"rotted")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "damaged" in out and assets[0] in out and "set aside" not in out


def test_check_counts_what_a_crash_left_beside_the_store_s_files(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A crash between an image's write and its rename leaves a temp file; one between a canceled
    job's file set aside (`discard`) and its removal, a `.gc-` file no asset names; a folder found
    in a file's place is moved aside for the operator. Check said none of them (the sweep, which
    counts the `.gc-` orphan for its alarm, saw one file more than check did)."""
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=1)
    store = ArtifactStore(settings.assets_dir)
    home = store.path_for(client.get(f"/v1/assets/{assets[0]}").json()["sha256"])
    (home.parent / ".tmp-k2j4l1x0.png").write_bytes(b"\x89PNG half an image")
    orphan = hashlib.sha256(b"a canceled job's image").hexdigest()
    aside = settings.assets_dir / orphan[:2] / f".gc-{orphan}-0badc0de.png"
    aside.parent.mkdir(exist_ok=True)
    aside.write_bytes(b"a canceled job's image")
    old = time.time() - 2 * 3600
    os.utime(aside, (old, old))
    broken = home.with_name(f".broken-{home.name}-5eed1e55")
    broken.mkdir()
    capsys.readouterr()
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "1 temp file (18 bytes) left by image writes a crash cut short before their rename" in out, out
    assert "1 file no asset names (jobs' images left by a crash; the service removes them after an hour)" in out
    assert f"1 folder found in an image file's place and moved aside (the image was written again): look at and " \
           f"remove them, as no sweep does:\n  {broken}\n" in out
    assert out.endswith("ok\n")
    # The sweep's count and check's agree: the orphan set aside is one of the store's files.
    report = check_module.check_store(check_module.read_only_engine(settings.resolved_database_url), store)
    assert (report.files, report.unnamed, report.temp_files, report.broken) == (2, 1, 1, [str(broken)])


def test_check_counts_only_the_files_the_sweep_counts_not_folders_or_links_named_as_images(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Folders and links named as the store's files (`<sha>.png`, `.gc-<sha>-*.png`) are passed over
    by the asset sweep (no image it writes, none it removes): check counted them as files no asset
    names, "the service removes them after an hour", and past the sweep's alarm took the database
    for another data dir's (exit 1) where the sweep went on."""
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=1)
    store = ArtifactStore(settings.assets_dir)
    named = client.get(f"/v1/assets/{assets[0]}").json()["sha256"]
    old = time.time() - 2 * 3600
    strays = []
    for i in range(22):
        sha = hashlib.sha256(f"not an image {i}".encode()).hexdigest()
        stray = settings.assets_dir / sha[:2] / (f".gc-{sha}-0badc0de.png" if i % 2 else f"{sha}.png")
        stray.parent.mkdir(exist_ok=True)
        if i == 0:
            stray.symlink_to(store.path_for(named))
        else:
            stray.mkdir()
        os.utime(stray, (old, old), follow_symlinks=False)
        strays.append(stray)
    capsys.readouterr()
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "no asset names" not in out and "PROBLEMS" not in out and out.endswith("ok\n"), out
    report = check_module.check_store(check_module.read_only_engine(settings.resolved_database_url), store)
    assert (report.files, report.unnamed) == (1, 0)
    # As the sweep counts them: it neither refuses nor removes anything.
    assert store.sweep_orphans(lambda batch: [sha for sha in batch if sha == named]) == 0
    assert all(stray.is_symlink() or stray.is_dir() for stray in strays)


def test_check_refuses_a_database_that_names_none_of_the_store_s_files(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A running service's SQLite file copied without its -wal: none of the recent rows, and "ok".
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=2)
    store = ArtifactStore(settings.assets_dir)
    files = sorted(str(store.path_for(client.get(f"/v1/assets/{asset_id}").json()["sha256"])) for asset_id in assets)
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        db.execute("DELETE FROM assets")
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "2 of the 2 files in the store are named by no asset in this database:\n" in out
    # Listed, for an operator who knows them for a crash's leftovers (the sweep stops for them too).
    assert sorted(line.strip() for line in out.splitlines() if line.startswith("  /")) == files
    assert "is it the database this data dir belongs to?" in out and "restore those assets" not in out
    assert "once sure, move them out of the store" in out
    # Its sentences apart: "... as the README says If it is, ..." ran the advice for SQLite into the next.
    assert "take backups as the README says. If it is, the files listed are images" in out, out


def test_a_crash_s_file_after_every_asset_was_deleted_is_an_orphan_not_a_foreign_database(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Every asset deleted and its file swept, then a job's image left by a crash: the sweep refused
    # every hour ("is it the database this data dir belongs to?"), and check said the same.
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=2)
    for asset_id in assets:
        assert client.delete(f"/v1/assets/{asset_id}").status_code == 204
    services = Services.build(settings)
    try:
        assert services.sweep_asset_files(older_than=0) == 2
        store = ArtifactStore(settings.assets_dir)
        orphan = store.path_for(store.put(b"a crashed job's image"))
        old = time.time() - 2 * 3600
        os.utime(orphan, (old, old))
        capsys.readouterr()
        assert main(["check"]) == 0
        out = capsys.readouterr().out
        assert "1 file no asset names (jobs' images left by a crash" in out and out.endswith("ok\n")
        assert services.sweep_asset_files() == 1
        assert not orphan.exists()
    finally:
        asyncio.run(services.aclose())


def test_check_reports_a_file_it_cannot_read_and_goes_on(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=2)
    bad = client.get(f"/v1/assets/{assets[1]}").json()["sha256"]
    real = check_module._sha256

    def disk_error(path: Path) -> str:
        if path.name.startswith(bad):
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(check_module, "_sha256", disk_error)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert f"1 asset unreadable (the disk or a permission): {assets[1]}\n" in out
    assert "missing" not in out and "damaged" not in out
    assert out.startswith("2 assets, 1 file read and hashed")  # the unreadable one is not counted read


def test_check_reports_a_folder_in_place_of_a_file_as_unreadable(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """It is there, and not the image: it was reported "missing", and an operator looked for a lost file."""
    settings, client, assets = drafted(make_settings, start_server, monkeypatch, n=2)
    sha = client.get(f"/v1/assets/{assets[0]}").json()["sha256"]
    [path] = settings.assets_dir.glob(f"*/{sha}.png")
    path.unlink()
    path.mkdir()
    assert main(["check", "--no-hash"]) == 1
    out = capsys.readouterr().out
    assert f"1 asset unreadable (the disk or a permission): {assets[0]}\n" in out and "missing" not in out


def test_check_without_a_database_or_a_store_changes_nothing(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "typo"))
    assert main(["check"]) == 2
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()

    # Migrated, never served: nothing stored yet, and nothing wrong (it said "is ORCH_DATA_DIR right?").
    data = tmp_path / "restored"
    monkeypatch.setenv("ORCH_DATA_DIR", str(data))
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["check"]) == 0
    assert "0 assets: nothing stored yet" in capsys.readouterr().out
    # A database restored without its assets folder: not "every asset missing".
    with sqlite3.connect(data / "orchestrator.db") as db:
        db.execute("PRAGMA journal_mode=DELETE")  # as a backup tool may leave it
        db.execute("INSERT INTO store_identity (id, store_id, created_at) VALUES (1, 'abc', '2026-11-30 00:00:00')")
    assert main(["check"]) == 2
    assert f"no asset store at {data / 'assets'}" in capsys.readouterr().err
    assert not (data / "assets").exists()
    (data / "assets").mkdir()
    (data / "assets" / ".store-id").write_text("abc\n")
    assert main(["check"]) == 0
    with sqlite3.connect(data / "orchestrator.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # opened read-only: not made WAL


def test_check_refuses_a_config_file_named_but_absent(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """It checked the folder's own data dir instead, and said ok."""
    make_settings()
    monkeypatch.setenv("ORCH_CONFIG_FILE", str(tmp_path / "typo.toml"))
    assert main(["check"]) == 2
    assert f"ORCH_CONFIG_FILE: no such file: {tmp_path / 'typo.toml'}" in capsys.readouterr().err
    monkeypatch.setenv("ORCH_CONFIG_FILE", str(tmp_path))
    for command in ("check", "migrate"):
        assert main([command]) == 2
        assert f"ORCH_CONFIG_FILE: is a directory, not a TOML file: {tmp_path}" in capsys.readouterr().err


def test_a_bad_value_in_the_config_file_names_the_file_and_its_key(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A key may be written as its variable is: the error named the variable, which was not set."""
    make_settings()
    config = tmp_path / "orchestrator.toml"
    config.write_text("ORCH_LITE_MAX_BATCH = 0\n")
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    assert main(["migrate"]) == 2
    assert f"{config}: ORCH_LITE_MAX_BATCH:" in capsys.readouterr().err


def test_check_on_a_database_never_migrated_is_one_line(make_settings: SettingsFactory,
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()
    data = tmp_path / "data"
    (data / "assets").mkdir(parents=True)
    sqlite3.connect(data / "orchestrator.db").close()
    monkeypatch.setenv("ORCH_DATA_DIR", str(data))
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err == ("orchestrator: the database has no tables of this service (run `orchestrator migrate`, or is "
                   "ORCH_DATABASE_URL right?)\n")


def test_check_on_an_older_or_a_newer_schema_says_which(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An older one failed on a bare SQL error; a newer one was said to be "ok".
    make_settings()
    data = tmp_path / "data"
    (data / "assets").mkdir(parents=True)
    url = f"sqlite:///{data / 'orchestrator.db'}"
    head = ScriptDirectory(str(files("migrations"))).get_revision("head")
    assert head is not None and isinstance(head.down_revision, str)
    upgrade(url, head.down_revision)
    monkeypatch.setenv("ORCH_DATA_DIR", str(data))
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert (f"the database is at revision {head.down_revision}, this version expects {head.revision}: run "
            "`orchestrator migrate` first") in err
    upgrade(url)
    with sqlite3.connect(data / "orchestrator.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "revision 0099, which this version does not know" in err
    assert "or it is another application's" in err  # not only "a newer orchestrator's"


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
    head = ScriptDirectory(str(files("migrations"))).get_current_head()
    # It said "up to date" of a database it had just made.
    assert capsys.readouterr().out.endswith(f"orchestrator.db migrated from nothing to revision {head}\n")
    assert main(["migrate"]) == 0
    assert capsys.readouterr().out.endswith(f"orchestrator.db is up to date (revision {head})\n")


def test_migrate_tells_what_its_own_upgrade_found(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Three started together each said "migrated from nothing": the revision was read before the
    # migrations' lock, and two of them had found the database migrated by the first.
    make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    real = upgrade

    def another_first(url: str, revision: str = "head") -> str | None:
        real(url)  # another process's, done while this one waited for the lock
        return real(url, revision)

    monkeypatch.setattr("orchestrator.db.upgrade", another_first)
    assert main(["migrate"]) == 0
    head = ScriptDirectory(str(files("migrations"))).get_current_head()
    assert capsys.readouterr().out.endswith(f"orchestrator.db is up to date (revision {head})\n")


@pytest.mark.parametrize(("command", "variable", "value", "told"), [
    ("serve", "ORCH_DATABASE_URL", "bogus://x", "bogus://x is neither SQLite nor PostgreSQL"),
    ("migrate", "ORCH_DATABASE_URL", "mysql://studio:secret@db/orch", "mysql://studio:***@db/orch is neither"),
    ("worker", "ORCH_DATABASE_URL", "not a url", "ORCH_DATABASE_URL: not a database URL"),
    ("migrate", "ORCH_DATABASE_URL", "postgres://u:secret@db/orch", "write postgresql+psycopg:// for PostgreSQL"),
    ("migrate", "ORCH_DATABASE_URL", "postgresql+psycopg://u:secret@db:5432x/orch",
     "ORCH_DATABASE_URL: not a database URL"),  # a port that is not a number: once a traceback
    # A password's @ not written %40: the rest of it was read as the host, and shown in the error.
    ("migrate", "ORCH_DATABASE_URL", "postgresql+psycopg://u:Pa@secret@db/orch", "must be written %40"),
    # No database: libpq took the user's own (`postgres`), and the tables went into the server's.
    ("migrate", "ORCH_DATABASE_URL", "postgresql+psycopg://u@127.0.0.1/", "names no database"),
    # A port past 65535: once exit 1 at the first connection ('invalid port number'), after the data dir was made.
    ("migrate", "ORCH_DATABASE_URL", "postgresql+psycopg://u:secret@127.0.0.1:99999/orch",
     "postgresql+psycopg://u:***@127.0.0.1:99999/orch: its port 99999 is not one of 1 to 65535"),
    ("serve", "ORCH_DATABASE_URL", "postgresql+psycopg://u@db:0/orch", "its port 0 is not one of 1 to 65535"),
    ("serve", "ORCH_PRICES_FILE", "{tmp}/missing.toml", "ORCH_PRICES_FILE: prices file {tmp}/missing.toml: no such "
     "file\n"),
    ("serve", "ORCH_PRICES_FILE", "{tmp}", "ORCH_PRICES_FILE: prices file {tmp}: is a directory, not a TOML file\n"),
    ("worker", "ORCH_DATA_DIR", "{tmp}/a-file", "ORCH_DATA_DIR: {tmp}/a-file is not a directory"),
    ("serve", "ORCH_CONFIG_FILE", "{tmp}/studio.toml", "ORCH_CONFIG_FILE: no such file: {tmp}/studio.toml"),
    ("migrate", "ORCH_CONFIG_FILE", " ", "ORCH_CONFIG_FILE: is blank (' '): name a TOML file, or unset it for"),
    # Once a traceback from inside the server's start-up (an entry without '=').
    ("serve", "ORCH_ENGINES", "flux=studio.flux:create,garbage", "ORCH_ENGINES: 'garbage' is not name="),
    # A name twice or a built-in's: one was ignored with a warning.
    ("serve", "ORCH_ENGINES", "flux=tests.fakes:factory,flux=tests.fakes:factory",
     "ORCH_ENGINES: 'flux' is given twice"),
    ("serve", "ORCH_ENGINES", "gemini=tests.fakes:factory", "ORCH_ENGINES: 'gemini' is a built-in engine's name"),
    # The spend export's totals row is keyed `total`: an engine of that name was a second such row.
    ("serve", "ORCH_ENGINES", "Total=tests.fakes:factory", "ORCH_ENGINES: 'Total' is the key of the spend "
     "export's totals row"),
    # Each connection would open its own empty database: once 'no such table' after the migrations.
    ("migrate", "ORCH_DATABASE_URL", "sqlite:///:memory:", "an in-memory SQLite database cannot be shared"),
    # The same, as a URI: `migrate` said "up to date" of a database gone once it exited.
    ("migrate", "ORCH_DATABASE_URL", "sqlite:///file::memory:?uri=true", "an in-memory SQLite database cannot"),
    ("migrate", "ORCH_DATABASE_URL", "sqlite:///file:x?mode=memory&uri=true", "an in-memory SQLite database cannot"),
    ("migrate", "ORCH_DATABASE_URL", "sqlite:///file::memory:?uri=1", "an in-memory SQLite database cannot"),
    ("migrate", "ORCH_DATABASE_URL", "sqlite:///file:x?vfs=memdb&uri=True", "an in-memory SQLite database cannot"),
    # SQLite's own options outside a file: URI with uri=true: SQLAlchemy dropped them with a warning
    # (a database opened read-write for `?mode=ro`), or SQLite made a file named `x.db?cache=shared`.
    ("migrate", "ORCH_DATABASE_URL", "sqlite:///{tmp}/db/x.db?cache=shared&timeout=5",
     "ORCH_DATABASE_URL: sqlite:///{tmp}/db/x.db?cache=shared&timeout=5: cache is an option of SQLite's own, which "
     "it takes only from a file: URI with uri=true (sqlite:///file:{tmp}/db/x.db?cache=shared&timeout=5&uri=true); "
     "as written, it would be ignored\n"),
    ("serve", "ORCH_DATABASE_URL", "sqlite:///{tmp}/db/x.db?nolock=1&cache=shared&uri=true",
     "cache and nolock are options of SQLite's own, which it takes only from a file: URI with uri=true "
     "(sqlite:///file:{tmp}/db/x.db?nolock=1&cache=shared&uri=true); as written, SQLite would take them for part of "
     "the file's name (a new, empty database)\n"),
    # Read-only, which the service (and migrate) cannot use, as a file: URI or not: refused at the
    # first write, once the data dir was made; or told only to add uri=true, which then was.
    ("migrate", "ORCH_DATABASE_URL", "sqlite:///{tmp}/db/x.db?mode=ro",
     "ORCH_DATABASE_URL: sqlite:///{tmp}/db/x.db?mode=ro: mode=ro asks for the database read-only, and the service "
     "writes to it: remove it (`orchestrator check` reads it read-only by itself)\n"),
    ("serve", "ORCH_DATABASE_URL", "sqlite:///file:{tmp}/db/x.db?mode=ro&uri=true", "mode=ro asks for the database"),
    ("worker", "ORCH_DATABASE_URL", "sqlite:///file:{tmp}/db/x.db?immutable=1&uri=true", "immutable=1 asks for"),
    # Two slashes where four were meant: a traceback (exit 1, "restart") from migrate, serve and worker.
    ("migrate", "ORCH_DATABASE_URL", "sqlite://srv/x.db", "sqlite://srv/x.db names a host, which a SQLite URL"),
    ("serve", "ORCH_DATABASE_URL", "sqlite://u:secret@/x.db", "sqlite://u:***@/x.db names a host"),
    ("worker", "ORCH_DATABASE_URL", "sqlite://srv/x.db", "four slashes"),
    # An option SQLite's driver converts as the engine is made: a traceback and exit 1, its folder made.
    ("migrate", "ORCH_DATABASE_URL", "sqlite:///{tmp}/db/x.db?timeout=soon",
     "ORCH_DATABASE_URL: sqlite:///{tmp}/db/x.db?timeout=soon: an option in its query cannot be read (could not "
     "convert string to float: 'soon')"),
    ("serve", "ORCH_DATABASE_URL", "sqlite:///{tmp}/db/x.db?uri=maybe", "an option in its query cannot be read"),
    ("worker", "ORCH_DATABASE_URL", "sqlite:///{tmp}/db/x.db?check_same_thread=maybe",
     "an option in its query cannot be read"),
    # Once told by the migration, "(File exists)", after the data dir was made.
    ("serve", "ORCH_DATABASE_URL", "sqlite:///{tmp}/a-file/x.db",
     "ORCH_DATABASE_URL: cannot make {tmp}/a-file/x.db: {tmp}/a-file is not a directory"),
    ("worker", "ORCH_DATABASE_URL", "sqlite:///{tmp}/a-file/db/x.db", "{tmp}/a-file is not a directory"),
    # The demo starts the service itself: the same checks, before it starts (once a uvicorn traceback).
    ("demo", "ORCH_PRICES_FILE", "{tmp}/prices.toml", "ORCH_PRICES_FILE: prices file {tmp}/prices.toml"),
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
    assert not (tmp_path / "db").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "auto"])
def test_a_cache_dir_the_tiny_model_cannot_be_built_in_is_named_before_the_service_starts(
        make_settings: SettingsFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, model: str) -> None:
    """The service started, and each draft failed with a FileExistsError. With `auto`, which builds
    it only when no real model is at hand, the start goes on with a warning."""
    from orchestrator.services import startup_problems

    (tmp_path / "a-file").write_text("not a folder")
    settings = make_settings(lite_model=model, cache_dir=tmp_path / "a-file")
    problems = startup_problems(settings)
    assert settings.data_dir.exists() == (model == "auto")  # not made for a start refused
    told = f"ORCH_CACHE_DIR: {tmp_path}/a-file is not a directory"  # also in auto's warning, not "File exists"
    if model == "auto":
        assert problems == [] and f"{told}: with ORCH_LITE_MODEL=auto and no real model at hand, the offline tiny " \
            "model it falls back to cannot be built there" in caplog.text
    else:
        assert len(problems) == 1 and problems[0].startswith(told)


def test_a_full_data_dir_is_named_before_the_service_starts_and_is_no_setup_to_fix(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A full disk still makes an empty file: the probe writes, or the migrations met it with a traceback.
    settings = make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))

    class FullDisk(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("orchestrator.services.tempfile.TemporaryFile", lambda **_: FullDisk())
    told = f"ORCH_DATA_DIR: cannot write in {settings.data_dir} (No space left on device)"
    assert startup_problems(settings) == [told]
    # Exit 1, not the 2 of a setup to fix: a supervisor that gives up on 2 gave up on a disk that
    # filled before a restart, and restarted one that filled later (the database's SQLITE_FULL: 1).
    capsys.readouterr()
    assert main(["migrate"]) == 1
    assert capsys.readouterr().err == f"orchestrator: cannot start for now:\n  {told}\n"


def test_a_full_disk_under_the_migration_lock_is_no_setup_to_fix(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ORCH_DATA_DIR", str(make_settings().data_dir))

    def full(*_: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("orchestrator.db.open_regular_file", full)
    capsys.readouterr()
    assert main(["migrate"]) == 1
    assert "cannot write beside the database at sqlite:///" in capsys.readouterr().err


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


@pytest.mark.parametrize(("prices", "told"), [
    ('[gemini."gemini-3.1-flash-image"]\n"1K" = -5\n', "gemini.gemini-3.1-flash-image.1K must be between 0 and"),
    ('[openai."gpt-image-1"]\n"high-1024x1024" = nan\n', "must be between 0 and 1000000000 credits (got nan)"),
    ('[openai."gpt-image-1"]\n"high-1024x1024" = inf\n', "(got inf)"),
    ('[fal."fal-ai/nano-banana-2"]\n"1K" = 1e20\n', "(got 1e+20)"),
    ('[fal."fal-ai/nano-banana-2"]\n"1K" = 0.0004\n', "must be a whole number of thousandths of a credit (got 0.0004)"),
    ('[fal."fal-ai/nano-banana-2"]\n"1K" = "8"\n', "must be a number of credits (got '8')"),
    ('[fal]\nprice = 8\n', "fal.price must be a table of prices"),
    ('fal = 8\n', "'fal' must be a table of models"),
    # A misspelt engine left its default prices in force, without a word.
    ('[gemnii."gemini-3.1-flash-image"]\n"1K" = 1\n', "'gemnii' is not an engine (did you mean 'gemini'?)"),
    ('[zzz."m"]\n"1K" = 1\n', "'zzz' is not an engine (known: a1111, comfyui, "),
    # Read by nobody: a studio metering its own GPUs this way saw them free.
    ('[comfyui."flow.json"]\n"image" = 2\n', "'comfyui' takes no prices from this file (a self-hosted server"),
    ('[lite."sd-turbo"]\n"image" = 2\n', "'lite' takes no prices from this file (local work is priced by "
                                          "ORCH_LOCAL_GPU_SECOND_CREDITS)"),
])
def test_a_price_that_would_make_a_paid_engine_free_or_broken_is_refused_at_start(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], prices: str, told: str) -> None:
    make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "prices.toml").write_text(prices)
    monkeypatch.setenv("ORCH_PRICES_FILE", str(tmp_path / "prices.toml"))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert f"ORCH_PRICES_FILE: {tmp_path / 'prices.toml'}: " in err and told in err, err

@pytest.mark.parametrize("content", [b'data_dir = "/tmp/x"\n[bad\n', b"lite_model = '\xff\xfe'\n"])
def test_a_config_file_that_is_not_toml_names_the_file(make_settings: SettingsFactory, tmp_path: Path, content: bytes,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()
    config = tmp_path / "studio.toml"
    config.write_bytes(content)
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration:\n  {config}: not valid TOML: " in err and "Traceback" not in err


def test_a_config_file_that_cannot_be_read_names_the_file(make_settings: SettingsFactory, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Another user's 0600 file: a 35-line traceback (root, who runs the tests, reads any file).
    make_settings()
    config = tmp_path / "studio.toml"
    config.write_text("lite_max_batch = 3\n")
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    real_open = Path.open

    def refused(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refused)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration:\n  {config}: cannot be read: Permission denied" in err and "Traceback" not in err


def test_a_config_file_in_a_folder_that_cannot_be_opened_names_the_file(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Its is_file() raised (a folder on the path this user may not search): a traceback.
    from orchestrator import settings as settings_module

    make_settings()
    config = tmp_path / "locked" / "studio.toml"
    monkeypatch.setitem(Settings.model_config, "toml_file", config)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(config))

    monkeypatch.setattr(settings_module._StrictTomlSource, "__init__", refused)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration:\n  {config}: cannot be read: Permission denied" in err and "Traceback" not in err


def test_a_config_file_under_a_home_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    # pydantic-settings expands `~nobody/...` itself, which raises: a traceback at every command.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(ORCH_CONFIG_FILE="~nosuchuser-orch/studio.toml", ORCH_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-m", "orchestrator", "migrate"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "~nosuchuser-orch/studio.toml: cannot be read" in done.stderr and "Traceback" not in done.stderr


def test_a_log_file_that_cannot_be_written_leaves_the_log_on_stderr(make_settings: SettingsFactory,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "logs").write_text("a file where the folder goes")  # another uid's, read-only, ...
    root = logging.getLogger()
    before = list(root.handlers)
    with caplog.at_level(logging.WARNING, logger="orchestrator.cli"):
        _log_to_data_dir(settings)  # once a traceback that stopped the start
    assert root.handlers == before
    assert "cannot write the log file" in caplog.text


def test_a_log_file_that_is_a_symbolic_link_is_not_followed(make_settings: SettingsFactory, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # Another user of a shared data dir could point it at any file this process may write.
    settings = make_settings()
    (settings.data_dir / "logs").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT\n")
    (settings.data_dir / "logs" / "orchestrator.log").symlink_to(victim)
    root = logging.getLogger()
    before = list(root.handlers)
    with caplog.at_level(logging.WARNING, logger="orchestrator.cli"):
        _log_to_data_dir(settings)
    assert root.handlers == before and "is a symbolic link, not followed" in caplog.text
    assert victim.read_text() == "IMPORTANT\n"


def test_the_log_file_gets_one_handler_however_often_main_runs(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        _log_to_data_dir(settings)
        _log_to_data_dir(settings)  # every line was written twice
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()


def test_a_mistyped_variable_is_told_in_the_log_file_too(make_settings: SettingsFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Told on stderr while the settings were read, before the file was open: ORCH_ADMIN_KYE (an API
    # left open) never reached the log an operator reads later.
    settings = make_settings()
    monkeypatch.setenv("ORCH_ADMIN_KYE", "a-key-meant-for-the-api")
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        _log_to_data_dir(settings)
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
    logged = (settings.data_dir / "logs" / "orchestrator.log").read_text()
    assert "WARNING orchestrator.settings: ORCH_ADMIN_KYE is not a setting of this service and is ignored " \
           "(did you mean ORCH_ADMIN_KEY?)" in logged
    assert "a-key-meant-for-the-api" not in logged


def test_a_message_quoting_a_line_break_stays_one_line_in_the_log_file(make_settings: SettingsFactory) -> None:
    """A provider's error body quoted in a job's failure wrote a forged line of its own into the
    log (`... ERROR orchestrator.api: admin key rotated`)."""
    settings = make_settings()
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        _log_to_data_dir(settings)
        failing = logging.getLogger("orchestrator.runner")
        # U+202E: what follows reads backwards, `exe.log` where `gol.exe` is written.
        failing.warning("job %s failed: %s", "job_1", "bad request\n2026-12-02 09:00:00,000 1 ERROR orchestrator.api: "
                        "FORGED\r\x1b[2J\u2028tail\tend \u00e9 \u202egol.exe")
        try:
            raise ValueError("two\nlines")
        except ValueError:
            failing.exception("crashed")
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
    lines = (settings.data_dir / "logs" / "orchestrator.log").read_text().splitlines()
    [told] = [line for line in lines if "job_1" in line]
    assert told.endswith("WARNING orchestrator.runner: job job_1 failed: bad request\\n2026-12-02 09:00:00,000 1 "
                         "ERROR orchestrator.api: FORGED\\r\\x1b[2J\\u2028tail\tend \u00e9 \\u202egol.exe")
    assert not any(line.startswith("2026-12-02 09:00:00,000") for line in lines)
    assert "Traceback (most recent call last):" in lines  # a traceback is still Python's own lines
    assert "ValueError: two" in lines


@pytest.mark.parametrize(("argv", "told"), [
    (["serve", "--port", "74320"], "74320 is not a TCP port"),  # once: listened on 8784 without a word
    (["serve", "--port", "abc"], "'abc' is not a TCP port"),  # once: "invalid _port value"
    (["demo", "--size", "1032"], "1032: drafts are 64-1024 px"),  # once: failed at polish, after the drafts
    (["demo", "--size", "100"], "100: drafts are 64-1024 px, a multiple of 8"),
    (["demo", "--size", "abc"], "'abc' is not a whole number of pixels"),
    (["demo", "--url", "localhost:8781"], "'localhost:8781' is not an http:// or https:// address"),
    (["demo", "--prompt", " "], "a prompt says what to draw: it cannot be empty"),  # once: after its project
    # The socket layer takes a port modulo 65536: 99999 asked whatever listened on 34463.
    (["demo", "--url", "http://127.0.0.1:99999"], "'http://127.0.0.1:99999' has port 99999, which is not a TCP port"),
    (["demo", "--url", "http://127.0.0.1:0/"], "has port 0, which is not a TCP port (1-65535)"),
    (["demo", "--url", "http://u:secret@[bad"], "the address given is not an http:// or https:// address"),
])
def test_a_bad_argument_is_refused_before_anything_runs(argv: list[str], told: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert told in capsys.readouterr().err


def test_a_demo_folder_that_cannot_be_made_is_one_line(make_settings: SettingsFactory, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "taken").write_text("a file")
    assert main(["demo", "--out", str(tmp_path / "taken")]) == 2
    # Not "File exists": it is the file that is in the way.
    assert capsys.readouterr().err == f"orchestrator: cannot use {tmp_path / 'taken'} for the images: not a directory\n"
    assert main(["demo", "--out", str(tmp_path / "taken" / "out")]) == 2
    assert capsys.readouterr().err == (f"orchestrator: cannot use {tmp_path / 'taken' / 'out'} for the images: "
                                       f"{tmp_path / 'taken'} is not a directory\n")
    assert not (tmp_path / "data").exists()  # said before anything was made


def test_a_demo_folder_that_takes_no_files_is_one_line_before_the_drafts(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A folder the demo cannot write (another owner's, a read-only mount; /proc here, which even
    root cannot add a file to): its drafts ran, and then saving them was a traceback."""
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    assert main(["demo", "--out", "/proc", "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot use /proc for the images: ") and err.count("\n") == 1, err
    from sqlmodel import select

    from orchestrator.db import Database
    from orchestrator.models import Job

    db = Database(Settings().resolved_database_url)
    try:
        with db.session() as s:
            assert s.exec(select(Job)).all() == []  # no draft was asked for
    finally:
        db.dispose()


def test_a_data_dir_that_is_a_file_is_said_to_be_one(make_settings: SettingsFactory, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # It said "cannot write in X (File exists)".
    make_settings()  # keeps the developer's environment out
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    monkeypatch.setenv("ORCH_DATA_DIR", str(file))
    for command in (["serve", "--port", str(free_port())], ["worker"], ["migrate"]):
        assert main(command) == 2
        assert capsys.readouterr().err == (f"orchestrator: invalid configuration:\n"
                                           f"  ORCH_DATA_DIR: {file} is not a directory\n")
    assert main(["check"]) == 2
    assert capsys.readouterr().err == f"orchestrator: ORCH_DATA_DIR: {file} is not a directory\n"
    monkeypatch.setenv("ORCH_DATA_DIR", str(file / "data"))
    assert main(["migrate"]) == 2
    told = capsys.readouterr().err
    assert told.endswith(f"  ORCH_DATA_DIR: cannot make {file / 'data'}: {file} is not a directory\n")
    # Its images' folder, where a file is.
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "assets").write_text("not a folder")
    assert main(["worker"]) == 2
    assert capsys.readouterr().err.endswith(f"  ORCH_DATA_DIR: {tmp_path / 'data' / 'assets'} is not a directory\n")
    # The tiny model's cache, likewise.
    (tmp_path / "data" / "assets").unlink()
    monkeypatch.setenv("ORCH_CACHE_DIR", str(file))
    monkeypatch.setenv("ORCH_LITE_MODEL", "builtin:tiny-sd")
    assert main(["worker"]) == 2
    assert capsys.readouterr().err.endswith(f"  ORCH_CACHE_DIR: {file} is not a directory\n")


def test_a_database_that_does_not_answer_is_one_line(make_settings: SettingsFactory, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://studio:s3cret@127.0.0.1:9/orchestrator")
    assert main(["migrate"]) == 1  # once ~40 frames of SQLAlchemy traceback
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot use the database (ORCH_DATABASE_URL: "
                          "postgresql+psycopg://studio:***@127.0.0.1:9/orchestrator): ") and err.count("\n") == 1
    assert "s3cret" not in err
    # It named neither the setting nor the database, and exited 2: nothing to check there, for good.
    assert main(["check"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: could not check: the database did not answer for now (ORCH_DATABASE_URL: "
                          "postgresql+psycopg://studio:***@127.0.0.1:9/orchestrator): ") and err.count("\n") == 1
    assert err.rstrip().endswith("nothing was checked, try again")


def test_migrate_shows_no_password(make_settings: SettingsFactory, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://studio:s3cret@db.example:5432/orchestrator")
    applied: list[str] = []

    def applies(url: str) -> str:
        applied.append(url)
        return "0007"

    monkeypatch.setattr("orchestrator.db.upgrade", applies)
    monkeypatch.setattr("orchestrator.db.stored_revision", lambda url: "0007")

    class Writable:  # the write `migrate` checks the database takes, without a server at db.example
        def __init__(self, url: str) -> None: ...

        def transaction(self) -> Any:
            return contextlib.nullcontext(SimpleNamespace(execute=lambda statement: None))

        def dispose(self) -> None: ...

    monkeypatch.setattr("orchestrator.db.Database", Writable)
    assert main(["migrate"]) == 0
    out = capsys.readouterr().out
    assert applied and "is up to date (revision 0007)" in out and "s3cret" not in out and "studio:***@db.example" in out


def test_a_database_newer_than_the_code_is_one_line(make_settings: SettingsFactory, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate"]) == 0
    with sqlite3.connect(tmp_path / "data" / "orchestrator.db") as conn:  # as a newer version leaves it
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    capsys.readouterr()
    assert main(["migrate"]) == 2  # a setup to fix (once a 74-line Alembic traceback)
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot migrate the database: ") and "9999" in err and err.count("\n") == 1


def test_a_migration_refused_by_the_data_is_one_line(make_settings: SettingsFactory, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # 0015 on a database where a job was charged twice without a hold: a 17-frame traceback, exit 1.
    make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'data' / 'orchestrator.db'}"
    (tmp_path / "data").mkdir()
    upgrade(url, "0014")
    from sqlalchemy import create_engine

    from tests.test_migrations import _capture, _project_and_job

    engine = create_engine(url)
    _project_and_job(engine)
    with engine.begin() as conn:
        _capture(conn)
        _capture(conn)
    engine.dispose()
    capsys.readouterr()
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot migrate the database: jobs charged more than once without a hold: "
                          "job_1 (keep entry 2)") and err.count("\n") == 1, err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "studio-box.local", ""])  # "": every interface
def test_serve_beyond_this_machine_needs_an_admin_key(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], host: str) -> None:
    real = socket.getaddrinfo

    def resolved(name: str | None, *args: Any, **kwargs: Any) -> Any:  # a name of the studio's network
        return real("192.0.2.7" if name == "studio-box.local" else name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolved)
    settings = make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    monkeypatch.delenv("ORCH_ADMIN_KEY", raising=False)
    assert main(["serve", "--host", host]) == 2  # returned before anything listens
    err = capsys.readouterr().err
    where = host or "every interface (--host '')"
    assert f"refusing to listen on {where} without ORCH_ADMIN_KEY" in err and "--allow-open" in err
    assert not settings.data_dir.exists()  # nor is anything made: no data dir, no database


def test_a_host_that_names_no_address_is_told_before_the_missing_admin_key(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # It said "refusing to listen on nonexistent.invalid without ORCH_ADMIN_KEY": no key makes that name resolve.
    settings = make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    monkeypatch.delenv("ORCH_ADMIN_KEY", raising=False)
    assert main(["serve", "--host", "nonexistent.invalid"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: --host nonexistent.invalid: ") and err.count("\n") == 1, err
    assert "ORCH_ADMIN_KEY" not in err and not settings.data_dir.exists()


@pytest.mark.parametrize("command", ["serve", "worker", "demo"])
def test_an_unknown_option_shows_its_subcommand_s_usage(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The top-level usage named no option of the subcommand.
    with pytest.raises(SystemExit) as exited:
        main([command, "--bogus"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith(f"usage: orchestrator {command} ") and err.endswith(
        f"orchestrator {command}: error: unrecognized arguments: --bogus\n"), err
    with pytest.raises(SystemExit):  # before the subcommand, it is the top level's
        main(["--bogus", command])
    assert capsys.readouterr().err.startswith("usage: orchestrator [-h]")


def test_help_shows_the_defaults_of_options_not_of_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    told = " ".join(capsys.readouterr().out.split())
    assert "port to listen on (default: 8000)" in told
    assert "(ORCH_RUN_JOBS=false) --allow-open" in told and "(default: False)" not in told


@pytest.mark.parametrize("argv", [["--bogus"], ["--port", "8080"]])
def test_an_unknown_option_without_a_command_is_named(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # It was "the following arguments are required: command", as if the option had not been typed.
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert f"orchestrator: error: unrecognized arguments: {argv[0]}" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "told"), [(["--vers"], __version__), (["--he"], "usage: orchestrator")])
def test_an_abbreviated_top_option_is_taken_as_argparse_takes_it(
        argv: list[str], told: str, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse takes a long option's unambiguous prefix (`--vers` for --version); the check of
    # options before a command refused it as unrecognized.
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert told in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_status_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # uvicorn raises KeyboardInterrupt again once it has shut down cleanly: it was a traceback.
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("orchestrator.cli._run", interrupted)
    assert main(["migrate"]) == 130
    assert capsys.readouterr().err == "orchestrator: interrupted\n"


def test_a_secret_setting_s_bad_value_is_not_echoed(make_settings: SettingsFactory, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # The message goes to the terminal and the service manager's journal.
    make_settings()  # keeps the developer's environment out
    config = tmp_path / "studio.toml"
    config.write_text('admin_key = ["not-so-secret-4821"]\nlite_max_batch = 99\n')
    monkeypatch.setitem(Settings.model_config, "toml_file", config)
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: admin_key: Input should be a valid string\n" in err and "4821" not in err
    assert "lite_max_batch: Input should be less than or equal to 16 (got 99)" in err  # others still shown


@pytest.mark.parametrize(("url", "told"), [
    ("mysql://u:pw@db/orch", "ORCH_DATABASE_URL: mysql://u:***@db/orch is neither SQLite nor PostgreSQL"),
    ("postgresql+psycopg://u:pw@db:x/orch", "ORCH_DATABASE_URL: not a database URL"),
    # The advice was to install the extra, whose psycopg 3 is installed: the URL names the other.
    ("postgresql+psycopg2://u:pw@db/orch", "the driver of postgresql+psycopg2://u:***@db/orch is not installed "
                                            "(No module named 'psycopg2'); psycopg 3 is: write the URL as "
                                            "postgresql+psycopg://..."),
    # A driver SQLAlchemy has no dialect for: told, not NoSuchModuleError's traceback.
    ("postgresql+foo://u:pw@db/orch", "the driver of postgresql+foo://u:***@db/orch is not installed (Can't load "
                                      "plugin: sqlalchemy.dialects:postgresql.foo)"),
])
def test_check_on_a_database_url_it_cannot_open_is_one_line(make_settings: SettingsFactory, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str], url: str,
                                                            told: str) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ORCH_DATABASE_URL", url)
    assert main(["check"]) == 2  # once a traceback, status 1
    err = capsys.readouterr().err
    assert told in err and "Traceback" not in err and ":pw@" not in err


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.5.0.1", True), ("localhost", True),
                                                ("::1", True), ("[::1]", True), ("0.0.0.0", False),
                                                ("10.0.0.5", False), ("example.org", False)])
def test_only_loopback_addresses_count_as_this_machine(host: str, loopback: bool) -> None:
    from orchestrator.api.cross_site import is_loopback

    assert is_loopback(host) is loopback


def test_serve_that_ran_and_returned_gives_the_caller_its_sigterm_handler_back(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # `serve` put SIGTERM's default in place for uvicorn, and a serve that returned (a Ctrl-C, 130)
    # left it so: a program running it in its process lost its own handler, as one refused at start did not.
    settings = make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("ORCH_LITE_MODEL", "builtin:tiny-sd")
    monkeypatch.setattr("orchestrator.server.serve", lambda s, **_: Stopped(signal.SIGINT, device_busy=False))

    def own(signum: int, frame: object) -> None:
        raise AssertionError("not sent")

    kept = signal.signal(signal.SIGTERM, own)
    try:
        assert main(["serve", "--port", str(free_port())]) == 130
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, kept)
    assert capsys.readouterr().err.endswith("orchestrator: interrupted\n")


@pytest.mark.parametrize(("argv", "key", "runs_jobs", "warned"), [
    (["serve"], "a-long-enough-admin-key-0123", True, False),
    (["serve", "--no-jobs"], "short", False, True),
])
def test_serve_hands_the_server_its_settings_and_warns_of_a_short_admin_key(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, argv: list[str], key: str, runs_jobs: bool, warned: bool) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.cli")
    settings = make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("ORCH_LITE_MODEL", "builtin:tiny-sd")
    monkeypatch.setenv("ORCH_ADMIN_KEY", key)
    served: list[tuple[Settings, str, int]] = []

    def serve(s: Settings, *, host: str, port: int, log_level: str) -> Stopped:
        served.append((s, host, port))
        return Stopped(None, device_busy=False)

    monkeypatch.setattr("orchestrator.server.serve", serve)
    port = free_port()
    assert main([*argv, "--port", str(port)]) == 0
    [(given, host, bound)] = served
    assert (given.run_jobs, host, bound) == (runs_jobs, "127.0.0.1", port)
    assert ("ORCH_ADMIN_KEY has fewer than 16 characters" in capsys.readouterr().err) is warned
    # In the data dir's log too, which an operator reads later (it was on stderr only).
    log_file = (settings.data_dir / "logs" / "orchestrator.log").read_text()
    assert ("WARNING orchestrator.cli: ORCH_ADMIN_KEY has fewer than 16 characters" in log_file) is warned
    # What it runs with, said once (the log named neither its data dir nor its database).
    [said] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data dir ")]
    assert f"data dir {settings.data_dir.resolve()}, database sqlite:///" in said and "admin key on" in said
    assert said.endswith("runs jobs" if runs_jobs else "runs no jobs (workers do)")


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_an_address_that_cannot_be_listened_on_is_one_line_before_anything_starts(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], host: str) -> None:
    """uvicorn bound the port only after the whole start-up (migrations, engines), then exited 3
    with a message naming neither flag."""
    make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--host", host, "--port", str(port), "--allow-open"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"orchestrator: --host {host}") and err.count("\n") == 1, err
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_python_dash_m_orchestrator_is_the_command() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "serve" in done.stdout and "migrate" in done.stdout, done.stderr


def test_a_database_that_takes_no_writes_is_one_line_before_the_service_starts(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only SQLite file migrates "up to date" (it writes nothing): `serve` then printed a
    120-line traceback from its first write, and exited 3."""
    make_settings()  # keeps the developer's environment out
    path = tmp_path / "orchestrator.db"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///{path}")
    assert main(["migrate"]) == 0
    assert _bound(Settings()) is None  # bound to its data dir, as a first start does: nothing left to write
    # Opened read-only, as a file the service's user may not write would be (root writes any file).
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///file:{path}?mode=ro&uri=true")
    capsys.readouterr()
    # The URL's own mode=ro is refused as such before the start, as a setting to fix ...
    assert main(["serve", "--port", str(free_port())]) == 2
    assert "mode=ro asks for the database read-only, and the service writes to it" in capsys.readouterr().err
    # ... and a file read-only otherwise (a read-only mount) is refused by the first write, as this is.
    monkeypatch.setattr("orchestrator.services._read_only_database", lambda settings: [])
    # The setup's to fix (2, as `check` says it), not a database away a restart may find back (1).
    assert main(["serve", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot use the database (ORCH_DATABASE_URL: sqlite:///file"), err
    assert "readonly" in err, err
    assert err.count("\n") == 1
    assert list((tmp_path / "cwd").iterdir()) == []  # the URI's `file:` is no folder to make here
    # Nor is it "up to date" to `migrate` (exit 0, and the service refused it).
    assert main(["migrate"]) == 2
    assert "readonly" in capsys.readouterr().err
    # `check` reads it too (it looked for a file named `file:/...` and found no database).
    assert main(["check"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_database_file_this_user_cannot_write_is_named_before_anything_is_made(
        suffix: str, make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Another user's database (or journal) is opened read-only by SQLite: the refusal came at the
    first write, after `-wal`, `-shm`, `assets/` and `locks/` were made as this user, which the
    owner's own service could then not write."""
    make_settings()  # keeps the developer's environment out
    data = tmp_path / "data"
    monkeypatch.setenv("ORCH_DATA_DIR", str(data))
    monkeypatch.setenv("ORCH_LITE_MODEL", "builtin:tiny-sd")
    assert main(["migrate"]) == 0
    theirs = data / f"orchestrator.db{suffix}"
    theirs.touch()  # a journal another user's process left
    before = sorted(p.name for p in data.iterdir())
    real_open = os.open

    def as_another_user(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # Root writes any file: the refusal another user's file gets, faked.
        if Path(path) == theirs and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", as_another_user)
    capsys.readouterr()
    for command in (["migrate"], ["serve", "--port", str(free_port())]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"ORCH_DATA_DIR (its orchestrator.db): cannot write {theirs} (Permission denied): run as the user " \
               "that owns it" in err, err
        assert err.count("\n") == 2, err  # "invalid configuration:" and the line
        assert sorted(p.name for p in data.iterdir()) == before


def test_a_database_lost_while_the_service_starts_is_one_line_and_exit_1(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The command's own look at the database passed, and the connection was cut as the app
    started (its migration, its first reads): uvicorn printed the traceback and exited 3, where a
    database that does not answer for now is a line and 1 (a supervisor's restart may find it)."""
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ORCH_LITE_MODEL", "builtin:tiny-sd")

    def cut(settings: Settings) -> Services:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(Services, "build", cut)
    assert main(["serve", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.endswith("): server closed the connection unexpectedly\n"), err
    assert "orchestrator: cannot use the database (" in err.splitlines()[-1]
    logged = (tmp_path / "data" / "logs" / "orchestrator.log").read_text()
    assert "Traceback" not in err and "Traceback" not in logged, err


def test_migrate_on_a_database_of_its_own_leaves_the_data_dir_alone(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_settings()
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "a-file" / "data"))  # cannot be made
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///{tmp_path / 'db' / 'orchestrator.db'}")
    assert main(["migrate"]) == 0


def test_an_assets_folder_that_cannot_be_written_is_named_before_the_service_starts(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only assets folder (a mount, a restore under another owner): the service started, and
    every job's images were made, paid for, and lost ("made but could not be stored")."""
    import os

    settings = make_settings()
    real = os.replace

    def read_only_assets(src: Any, dst: Any) -> None:
        if Path(dst).parent == settings.assets_dir:
            raise OSError(errno.EROFS, "Read-only file system")
        real(src, dst)

    monkeypatch.setattr("orchestrator.services.os.replace", read_only_assets)
    assert startup_problems(settings) == [
        f"ORCH_DATA_DIR: cannot write in {settings.assets_dir} (Read-only file system)"]
    assert [p.name for p in settings.assets_dir.iterdir()] == []  # the probe is not left behind
    monkeypatch.setattr("orchestrator.services.os.replace", real)
    assert startup_problems(settings) == []


def test_a_locks_folder_that_cannot_be_written_is_named_before_the_service_starts(
        make_settings: SettingsFactory) -> None:
    """The service started without its locks (a traceback on the terminal): its jobs ran without
    the device's lock, and `GET /v1/workers` listed no process."""
    settings = make_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "locks").write_text("a file where the folder goes")
    assert startup_problems(settings) == [
        f"ORCH_DATA_DIR: {settings.data_dir / 'locks'} is not a directory"]
    (settings.data_dir / "locks").unlink()
    assert startup_problems(settings) == []
    assert (settings.data_dir / "locks").is_dir()


def test_a_prices_file_nested_too_deeply_is_a_problem_told_at_start(make_settings: SettingsFactory,
                                                                      tmp_path: Path) -> None:
    # tomllib recurses: a RecursionError went past the check, and `serve` ended in a traceback.
    from orchestrator.services import startup_problems

    (tmp_path / "prices.toml").write_text("x = " + "[" * 3000 + "]" * 3000 + "\n")
    problems = startup_problems(make_settings(prices_file=tmp_path / "prices.toml"))
    assert any("prices.toml: nested too deeply to read" in problem for problem in problems), problems


def test_prices_no_engine_reads_are_told_at_start(make_settings: SettingsFactory, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A misspelt model or size under a real engine was taken without a word, and the default
    price stayed in force."""
    from orchestrator.prices import load_price_overrides, unread_prices
    from orchestrator.services import Services

    (tmp_path / "prices.toml").write_text(
        '[gemini."gemini-3.1-flash-img"]\n"1K" = 9\n'
        '[gemini."gemini-3.1-flash-image"]\n"1k" = 9\n"2K" = 11\n"thinking_tokens_per_million" = 9000\n'
        '[openai."gpt-image-1-mini"]\n"low-1536x1024" = 0.7\n')
    settings = make_settings(prices_file=tmp_path / "prices.toml")
    told = unread_prices(settings, load_price_overrides(settings))
    assert told == [
        'gemini."gemini-3.1-flash-img" is neither a model gemini has prices for nor the one ORCH_GEMINI_MODEL '
        "names (gemini-3.1-flash-image) (did you mean 'gemini-3.1-flash-image'?): its prices are read by nobody "
        "for now",
        "gemini.\"gemini-3.1-flash-image\".\"1k\" is not a price gemini reads (did you mean '1K'?) (it reads: 1K, 2K, "
        "4K, input_tokens_per_million, output_tokens_per_million, thinking_tokens_per_million)"]
    caplog.set_level(logging.WARNING, logger="orchestrator.services")
    services = Services.build(settings)
    try:
        assert sum("ORCH_PRICES_FILE" in r.getMessage() for r in caplog.records) == 2
        # Read by nobody, a key is no price: `/v1/engines` listed "1k" beside "1K" as if it were one.
        gemini = services.registry.get("gemini").prices()
        assert gemini["credits_per_image"]["gemini-3.1-flash-image"] == {"1K": 6.7, "2K": 11.0, "4K": 15.1}
        assert gemini["credits_per_million_tokens"]["gemini-3.1-flash-image"]["thinking"] == 9000
        openai = services.registry.get("openai").prices()["credits_per_image"]["gpt-image-1-mini"]
        assert openai["low-1536x1024"] == 0.7
    finally:
        asyncio.run(services.aclose())


def test_a_hup_while_a_worker_waits_to_migrate_does_not_end_it(make_settings: SettingsFactory, tmp_path: Path) -> None:
    """A HUP sent to every unit to reload the policies (as README says) ended a worker still
    waiting for another process's migration (the signal's default), where `serve` ignored it."""
    import fcntl
    import signal

    settings = make_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(f"{settings.data_dir / 'orchestrator.db'}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process migrating
        worker = subprocess.Popen([sys.executable, "-m", "orchestrator", "worker"], cwd=tmp_path, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            # Waiting for the lock: the kernel lists the wait ("->") under the worker's pid.
            while not any(line.split()[1:2] == ["->"] and f" {worker.pid} " in line
                          for line in Path("/proc/locks").read_text().splitlines()):
                assert worker.poll() is None and time.monotonic() < deadline, "the worker never waited for the lock"
                time.sleep(0.05)
            worker.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert worker.poll() is None, "a HUP ended the worker"
            worker.terminate()  # a supervisor's stop, though, ends the wait: cleanly
            assert worker.wait(timeout=60) == 0
        finally:
            worker.kill()
            worker.wait(timeout=60)


@pytest.mark.parametrize("patched", ["argparse.ArgumentParser.parse_known_args", "cli._bound", "cli._stopped"])
def test_a_worker_told_to_stop_as_it_starts_or_ends_exits_cleanly(make_settings: SettingsFactory, tmp_path: Path,
                                                                   patched: str) -> None:
    """A SIGTERM before the worker's loop took its signals (its arguments, settings, the migration)
    or after the loop had closed (its last moments) ended it with 143: a supervisor saw a failed stop."""
    settings = make_settings()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # The signal is sent from inside the step, as a supervisor's would arrive during it; for the
    # last moments, a first SIGTERM stops the worker once it runs, the second comes as it exits.
    code = ("import argparse, os, signal, orchestrator.cli as cli, orchestrator.services as services\n"
            f"real = {patched}\n"
            "def step(*args, **kwargs):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*args, **kwargs)\n"
            f"{patched} = step\n")
    if patched == "cli._stopped":
        code += ("start = services.Services.start\nasync def started(self):\n    await start(self)\n"
                 "    os.kill(os.getpid(), signal.SIGTERM)\nservices.Services.start = started\n")
    code += "raise SystemExit(cli.main(['worker', '--log-level', 'info']))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    # Its stop came before (or after) its jobs: it either never ran them, or stopped as it does.
    log = settings.data_dir / "logs" / "orchestrator.log"
    assert (log.exists() and "stopping" in log.read_text()) == (patched == "cli._stopped")


@pytest.mark.parametrize(("argv", "ignored"), [(["worker", "--no-such-option"], True),
                                               (["serve", "--port", "x"], True),
                                               (["demo", "--size", "x"], False)])
def test_a_start_ignores_sighup_before_reading_anything(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                        ignored: bool) -> None:
    # A HUP sent to every unit (a log rotation's) in the first second of a start ended it: it was
    # ignored only once the settings were read. A demo, a terminal's job, still ends with its terminal.
    import signal

    calls: list[tuple[int, Any]] = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: calls.append((signum, handler)))
    with pytest.raises(SystemExit):  # refused by the argument parser: nothing read yet
        main(argv)
    assert ((signal.SIGHUP, signal.SIG_IGN) in calls) == ignored


def test_debug_logs_leave_out_the_http_libraries_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At --log-level debug httpcore wrote every response header to the log: a provider's request
    # id echoing the key went around the engines' own cleaning of it.
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "nothing-here"))
    main(["check"])
    for name in ("httpx", "httpcore", "websockets"):
        assert logging.getLogger(name).level >= logging.WARNING, name  # whatever the root's level


@pytest.mark.parametrize("url", ["postgresql+psycopg://u@db/?dbname=orch", "postgresql+psycopg:///?service=orch"])
def test_a_postgres_url_naming_its_database_in_its_query_is_taken(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.services import database_url_problems

    monkeypatch.delenv("PGDATABASE", raising=False)
    monkeypatch.delenv("PGSERVICE", raising=False)
    assert database_url_problems(url) == []
    assert "names no database" in database_url_problems("postgresql+psycopg://u@db/")[0]
    monkeypatch.setenv("PGDATABASE", "orch")  # libpq's own variable names it
    assert database_url_problems("postgresql+psycopg://u@db/") == []


def test_a_database_file_that_is_not_one_is_the_setup_s_to_fix(make_settings: SettingsFactory, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Exit 1 under systemd is a restart loop for something only a person can fix; `check` said 2.
    make_settings()  # keeps the developer's environment out
    (tmp_path / "notes.db").write_bytes(b"these are notes, not a database" * 100)
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///{tmp_path / 'notes.db'}")
    for command in (["migrate"], ["check"]):
        assert main(command) == 2, command
        assert "file is not a database" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "worker", "migrate"])
def test_a_database_file_that_is_not_one_is_refused_before_anything_is_made(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], command: str) -> None:
    # SQLite said so at the migration, once the data dir, its assets/ and locks/, and a .migrate-lock
    # beside the file had been made.
    make_settings()  # keeps the developer's environment out
    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes, not a database\n")
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///{notes}")
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert err == ("orchestrator: invalid configuration:\n  ORCH_DATABASE_URL: cannot use the database at "
                   f"sqlite:///{notes}: file is not a database (it does not begin with SQLite's header)\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]  # no data dir, no -wal, no lock
    assert notes.read_text() == "these are notes, not a database\n"


def test_a_data_dir_s_own_database_file_that_is_not_one_is_refused_before_its_folders_are_made(
        make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()
    data = tmp_path / "data"
    data.mkdir()
    (data / "orchestrator.db").write_text("not a database\n")
    monkeypatch.setenv("ORCH_DATA_DIR", str(data))
    assert main(["serve"]) == 2
    assert ("ORCH_DATA_DIR (its orchestrator.db): cannot use the database at sqlite:///"
            f"{data / 'orchestrator.db'}: file is not a database") in capsys.readouterr().err
    assert [path.name for path in data.iterdir()] == ["orchestrator.db"]  # no assets/, locks/, lock or -wal


def test_an_empty_or_a_real_database_file_passes_the_header_s_look(make_settings: SettingsFactory,
                                                                   tmp_path: Path) -> None:
    # SQLite writes the header at the first write: an empty file is a new database.
    empty = tmp_path / "empty.db"
    empty.touch()
    assert startup_problems(make_settings(database_url=f"sqlite:///{empty}"), service=False) == []
    real = tmp_path / "real.db"
    sqlite3.connect(real).execute("CREATE TABLE t (x)").connection.close()
    assert startup_problems(make_settings(database_url=f"sqlite:///{real}"), service=False) == []
    short = tmp_path / "short.db"
    short.write_bytes(b"SQLite")  # the header's start, cut short: SQLite refuses it too
    assert any("file is not a database" in problem
               for problem in startup_problems(make_settings(database_url=f"sqlite:///{short}"), service=False))


@pytest.mark.parametrize(("said", "sqlstate", "setup"), [
    # libpq's own, with no "FATAL:" from a server: a restart loop under systemd fixed none of them.
    ("connection failed: fe_sendauth: no password supplied", None, True),
    ('invalid URI query parameter: "bogus"', None, True),
    ('connection is bad: invalid sslmode value: "bogus"', None, True),
    ("bad value for connect_timeout: 'abc'", None, True),
    ('connection to server at "db", port 5432 failed: server does not support SSL, but SSL was required', None, True),
    # A standby being promoted in a failover, a restore recreating its schema: a restart may find them mended.
    ("cannot execute UPDATE in a read-only transaction", "25006", False),
    ("no schema has been selected to create in", "3F000", False),
    ('connection failed: FATAL:  password authentication failed for user "studio"', None, True),
    # A server away, or one out of connections for now: a restart may find it back.
    ('connection to server at "db", port 5432 failed: Connection refused', None, False),
    ("FATAL:  sorry, too many clients already", "53300", False),
    ("server closed the connection unexpectedly", None, False),
])
def test_a_postgres_setup_mistake_exits_2_and_an_outage_1(said: str, sqlstate: str | None, setup: bool) -> None:
    from sqlalchemy.exc import OperationalError

    from orchestrator.cli import _set_up_wrong

    orig = Exception(said)
    orig.sqlstate = sqlstate  # type: ignore[attr-defined]  # as psycopg's errors carry it
    assert _set_up_wrong(OperationalError("connect", {}, orig)) is setup


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_start_on_a_database_server_that_refuses_the_connection_makes_nothing(
        command: str, make_settings: SettingsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The migration told it, after the data dir, its assets/ and locks/ were made for a start that was none.
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ORCH_LITE_MODEL", "builtin:tiny-sd")  # whose cache dir is made at start too
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/orchestrator")  # nothing there
    argv = [command, "--port", str(free_port())] if command == "serve" else [command]
    assert main(argv) == 1  # away for now: a restart may find it
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: cannot use the database (ORCH_DATABASE_URL: postgresql+psycopg://postgres@"
                          "127.0.0.1:1/orchestrator): ") and err.count("\n") == 1, err
    assert not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()


def test_an_unknown_option_in_a_postgres_url_is_the_setup_s_to_fix(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings()  # keeps the developer's environment out
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/test?bogus=1")
    assert main(["migrate"]) == 2  # refused before any connection: no server is needed
    assert 'invalid connection option "bogus"' in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "sent", "code"), [(["serve", "--port", "x"], "SIGHUP", 2),
                                                   (["worker", "--no-such-option"], "SIGHUP", 2),
                                                   (["worker"], "SIGTERM", 0),
                                                   (["serve", "--port", "x"], "SIGINT", 130),
                                                   (["check"], "SIGINT", 130)])
def test_the_command_takes_a_supervisor_s_signals_before_its_imports(tmp_path: Path, argv: list[str], sent: str,
                                                                    code: int) -> None:
    """The command's imports take half a second: a reload (SIGHUP) in it ended a starting `serve`
    or `worker` (129), a stop (SIGTERM) a starting worker (143), and a Ctrl-C any command with an
    import's traceback, killed by SIGINT, where README promises one line and 130."""
    done = _signaled_as_the_command_imports(tmp_path, argv, sent)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    if sent == "SIGINT":
        assert done.stderr == "orchestrator: interrupted\n"


def _signaled_as_the_command_imports(tmp_path: Path, argv: list[str], sent: str,
                                     left: str = "") -> subprocess.CompletedProcess[str]:
    """The console script's entry run with `argv`, `sent` to it as it imports `orchestrator.cli`
    (httpx, pydantic, SQLAlchemy: half a second), from inside the import, as a supervisor's would come;
    `left`: "ignored" or "blocked", the signal as the process that runs the command left it to the
    command, which inherits it."""
    script = ("import builtins, os, signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground command\n"
              "real = builtins.__import__\n"
              "def importing(name, *args, **kwargs):\n"
              "    if name == 'orchestrator.cli':\n"
              f"        os.kill(os.getpid(), signal.{sent})\n"
              "    return real(name, *args, **kwargs)\n"
              "builtins.__import__ = importing\n"
              f"sys.argv = ['orchestrator', *{argv!r}]\n"
              "from orchestrator.entry import main\n"
              "raise SystemExit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "ORCH_DATA_DIR": str(tmp_path / "data")}
    sig = getattr(signal, sent)

    def leave() -> None:
        if left == "ignored":
            signal.signal(sig, signal.SIG_IGN)
        else:
            signal.pthread_sigmask(signal.SIG_BLOCK, {sig})

    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60, preexec_fn=leave if left else None)


@pytest.mark.parametrize(("argv", "told"), [(["serve", "--port", "x"], "terminated; " + START_STOPPED),
                                            (["migrate"], "terminated"),
                                            (["check"], "terminated"),
                                            (["demo", "--size", "x"], "terminated")])
def test_a_stop_as_the_command_imports_is_told_in_a_line(tmp_path: Path, argv: list[str], told: str) -> None:
    """A supervisor's SIGTERM (a `timeout`'s, a CI's cancel) while the command imports its modules,
    before anything of its own runs: a silent 143, where a stop a moment later said in a line that
    the start was stopped. It still ends as killed by SIGTERM (143), as the command would have."""
    done = _signaled_as_the_command_imports(tmp_path, argv, "SIGTERM")
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stderr == f"orchestrator: {told}\n"
    assert not (tmp_path / "data").exists()  # nothing of the command ran


@pytest.mark.parametrize("left", ["ignored", "blocked"])
def test_a_stop_its_caller_ignores_leaves_the_command_to_run_as_it_imports(tmp_path: Path, left: str) -> None:
    """A SIGTERM as the command imports its modules, from a caller that ignores it (`trap '' TERM`
    around a deploy's `orchestrator migrate`) or blocks it, which the command inherits: the
    import's hold took it for one its default would have ended the command with, and ended it
    (`terminated`, 143) before it had migrated anything; it ran on before the hold, as it does
    once its imports are done."""
    done = _signaled_as_the_command_imports(tmp_path, ["migrate"], "SIGTERM", left=left)
    assert done.returncode == 0, done.stderr
    assert "terminated" not in done.stderr and "migrated from nothing" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "data" / "orchestrator.db").exists()


@pytest.mark.parametrize("first", ["as it imports", "as it runs"])
def test_a_second_ctrl_c_as_the_first_is_told_still_ends_in_one_line(tmp_path: Path, first: str) -> None:
    """A second Ctrl-C as the command's `except KeyboardInterrupt` began to tell the first, before
    it ignored SIGINT: it escaped that block, with a traceback of both, and the process ended
    killed by SIGINT, where README promises one line and 130."""
    # The first Ctrl-C as the console script imports `orchestrator.cli`, or as `check` runs; the
    # second from inside the first call that asks to ignore SIGINT (the command telling the first),
    # before it takes effect.
    script = ("import builtins, os, signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground command\n"
              "real_import, real_signal = builtins.__import__, signal.signal\n"
              "sent = []\n"
              "def ctrl_c():\n"
              "    sent.append(1)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "def importing(name, *args, **kwargs):\n"
              f"    if name == 'orchestrator.cli' and {first == 'as it imports'} and not sent:\n"
              "        ctrl_c()\n"
              "    module = real_import(name, *args, **kwargs)\n"
              f"    if name == 'orchestrator.cli' and {first == 'as it runs'} and not sent:\n"
              "        def check(**kwargs):\n"
              "            ctrl_c()\n"
              "        sys.modules['orchestrator.cli']._check = check\n"
              "    return module\n"
              "def handing(signum, handler):\n"
              "    if signum == signal.SIGINT and handler == signal.SIG_IGN and len(sent) == 1:\n"
              "        ctrl_c()\n"
              "    return real_signal(signum, handler)\n"
              "builtins.__import__ = importing\n"
              "signal.signal = handing\n"
              "sys.argv = ['orchestrator', 'check']\n"
              "from orchestrator.entry import main\n"
              "raise SystemExit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "ORCH_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "orchestrator: interrupted\n"


@pytest.mark.parametrize(("status", "body", "content_type", "told"), [
    (200, b"<html>\n<body>It works!</body>\n</html>", "text/html", "lists no lite engine (JSONDecodeError)"),
    (200, b'{"ok": true}', "application/json", "lists no lite engine (TypeError)"),
    (200, b'[{"name": "x"}]', "application/json", "lists no lite engine (KeyError)"),
    # The likeliest wrong port: "answered 404: <!DOCTYPE HTML>".
    (404, b"<!DOCTYPE HTML>\n<html><title>Error response</title></html>", "text/html", "answered 404"),
    (401, b'{"detail": "Not authenticated"}', "application/json", "answered 401"),
])
def test_a_demo_pointed_at_another_web_server_says_so_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int, body: bytes, content_type: str,
        told: str) -> None:
    # Each gave a JSONDecodeError's or a TypeError's traceback.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Anything(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Anything)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        said = demo_refused(["demo", "--url", url, "--out", str(tmp_path / "out")], capsys)
    finally:
        server.shutdown()
        server.server_close()
    assert said == f"{url} does not answer as an orchestrator: GET /v1/engines {told}"


def test_an_answer_naming_the_known_names_says_them() -> None:
    from orchestrator.cli import _error_message

    # `demo --policy nosuch` started a service, then said only "unknown policy 'nosuch'".
    unknown = httpx.Response(422, json={"error": {"code": "invalid_request", "message": "unknown policy 'nosuch'",
                                                  "details": {"known": ["balanced", "local-only"]}}})
    assert _error_message(unknown) == "unknown policy 'nosuch' (known: balanced, local-only)"
    said = httpx.Response(422, json={"error": {"code": "no_route", "message": "unknown engine 'x' (known: a, b)",
                                               "details": {"known": ["a", "b"]}}})
    assert _error_message(said) == "unknown engine 'x' (known: a, b)"
    assert _error_message(httpx.Response(502, text="bad gateway")) == "bad gateway"
    # A web server's page: its first line, not the page.
    assert _error_message(httpx.Response(404, text="<html>\n  <title>404 Not Found</title>\n</html>")) == "<html>"


def test_check_beside_a_job_storing_its_first_images_does_not_call_the_database_another_s(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A running job's images are in the store, fsynced, a moment before the transaction naming
    them commits. On an install's first job, check said the database named none of the store's files
    ("is it the database this data dir belongs to?", exit 1) and listed them to move out of the
    store: moved, the job's rows then named files that were gone."""
    from orchestrator.runner import JobRunner

    stored, release = threading.Event(), threading.Event()
    finish = JobRunner._finish_success

    def held(self: JobRunner, *args: Any, **kwargs: Any) -> list[str]:
        stored.set()
        release.wait(60)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(JobRunner, "_finish_success", held)
    settings = make_settings()
    client = start_server(settings)
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    job = client.post(f"/v1/projects/{create_project(client)['id']}/drafts",
                      json={"prompt": "a lighthouse", "n": 2, "width": 64, "height": 64, "seed": 5}).json()
    try:
        assert stored.wait(60)
        capsys.readouterr()
        assert main(["check"]) == 0
        out = capsys.readouterr().out
        assert "is it the database" not in out and "move them out" not in out and "  /" not in out, out
        assert "2 files no asset names, written in the last hour while jobs run" in out, out
    finally:
        release.set()
    done = client.get(f"/v1/jobs/{job['id']}").json()
    for _ in range(600):
        if done["status"] != "running" and done["status"] != "queued":
            break
        time.sleep(0.05)
        done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    assert main(["check"]) == 0


@pytest.mark.parametrize("patched", ["orchestrator.queue.Scheduler.recover",
                                     "orchestrator.services.Services.expire_drafts"])
def test_serve_told_to_stop_during_its_start_s_sweeps_stops_cleanly(make_settings: SettingsFactory, tmp_path: Path,
                                                                    patched: str) -> None:
    """A supervisor's SIGTERM while the start recovers jobs or runs draft retention: uvicorn holds
    it until the start is done, then the service stops as after any SIGTERM (143, its shutdown
    run), and leaves nothing for `check` to find."""
    settings = make_settings()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1", "ORCH_DRAFT_RETENTION_DAYS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    owner, _, name = patched.rpartition(".")
    module, _, cls = owner.rpartition(".")
    reached = tmp_path / "reached"
    code = (f"import asyncio, importlib, os, signal, time, orchestrator.cli as cli\n"
            f"owner = getattr(importlib.import_module({module!r}), {cls!r})\n"
            f"real = getattr(owner, {name!r})\n"
            "def told(): open(" + repr(str(reached)) + ", 'w').close(); os.kill(os.getpid(), signal.SIGTERM)\n"
            "if asyncio.iscoroutinefunction(real):\n"
            "    async def step(*a, **k):\n        told(); await asyncio.sleep(0.2); return await real(*a, **k)\n"
            "else:\n"
            "    def step(*a, **k):\n        told(); time.sleep(0.2); return real(*a, **k)\n"
            f"setattr(owner, {name!r}, step)\n"
            f"raise SystemExit(cli.main(['serve', '--port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert reached.exists(), done.stderr  # the signal came inside the sweep
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "Application shutdown complete" in done.stderr and "Traceback" not in done.stderr
    checked = subprocess.run([sys.executable, "-m", "orchestrator", "check"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and checked.stdout.endswith("ok\n"), checked.stdout + checked.stderr


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("patched", ["create_app", "_log_uvicorn_to_files"])
def test_serve_told_to_stop_as_it_builds_the_app_says_so(make_settings: SettingsFactory, tmp_path: Path,
                                                         patched: str, stop: signal.Signals) -> None:
    """A supervisor's SIGTERM after the migration, while `serve` builds the app and its uvicorn
    server (before uvicorn takes the signal), ended it with 143 without a word, and a Ctrl-C there
    said only `interrupted`; a stop during the migration just before says in a line that the start
    was stopped."""
    settings = make_settings()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reached = tmp_path / "reached"
    # Sent from inside the step, as a supervisor's stop would arrive during it.
    code = ("import os, signal, orchestrator.cli as cli, orchestrator.server as server\n"
            f"real = server.{patched}\n"
            "def step(*a, **k):\n"
            "    open(" + repr(str(reached)) + ", 'w').close()\n"
            f"    os.kill(os.getpid(), signal.{stop.name})\n"
            "    return real(*a, **k)\n"
            f"server.{patched} = step\n"
            f"raise SystemExit(cli.main(['serve', '--port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert reached.exists(), done.stderr  # the signal came in that step
    # As the command ends on that signal once the service runs: killed by SIGTERM, 130 after a Ctrl-C.
    assert done.returncode == (130 if stop == signal.SIGINT else -stop), done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("orchestrator: ")]
    assert len(said) == 1 and "Traceback" not in done.stderr, done.stderr
    told = "interrupted" if stop == signal.SIGINT else "terminated"
    assert said[0].startswith(f"orchestrator: {told}; ") and "start was stopped" in said[0], said
    assert "Application startup" not in done.stderr  # the service never ran


def test_serve_told_to_stop_as_uvicorn_takes_the_signals_is_not_ended_silently(make_settings: SettingsFactory,
                                                                               tmp_path: Path) -> None:
    """A SIGTERM as the start's handler is handed to uvicorn's: SIGTERM's default was put in place
    between the two, with SIGTERM blocked in the main thread only. A thread that does not block
    it (a library's own, as OpenBLAS starts on numpy's import) took it there, and the default
    ended the process at once: a silent 143, without the start's line or uvicorn's stop."""
    settings = make_settings()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reached = tmp_path / "reached"
    # Sent just after the first handler changes hands as the server takes the signals.
    code = ("import os, signal, sys, threading, time, orchestrator.cli as cli\n"
            "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()  # blocks no signal\n"
            "real = signal.signal\n"
            "def handing(signum, handler):\n"
            "    old = real(signum, handler)\n"
            "    if sys._getframe(1).f_globals['__name__'] in ('orchestrator.server', 'uvicorn.server') \\\n"
            "            and not os.path.exists(" + repr(str(reached)) + "):\n"
            "        open(" + repr(str(reached)) + ", 'w').close()\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return old\n"
            "signal.signal = handing\n"
            f"raise SystemExit(cli.main(['serve', '--port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert reached.exists(), done.stderr  # the signal came as the handlers changed hands
    assert done.returncode == -signal.SIGTERM, done.stderr
    # Either the start's stop, told, or uvicorn's, run: the stop of a SIGTERM a moment sooner or later.
    said = [line for line in done.stderr.splitlines() if line.startswith("orchestrator: ")]
    assert (said and "start was stopped" in said[-1]) or "Application shutdown complete" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("moment", ["first step", "handed"])
def test_a_ctrl_c_as_uvicorn_starts_its_loop_ends_serve_cleanly(make_settings: SettingsFactory, tmp_path: Path,
                                                                 moment: str) -> None:
    """A Ctrl-C just as uvicorn starts its event loop: asyncio.run had put its own SIGINT handler in
    place (uvicorn took SIGINT only in the served coroutine), which cancels the main task. Sent as
    SIGINT changed hands there, the start ended with a `CancelledError` traceback and exit 1; at the
    served coroutine's first step, with the app start-up's `CancelledError` logged as a traceback."""
    settings = make_settings()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reached = tmp_path / "reached"
    code = ("import os, signal, sys, uvicorn.server, orchestrator.cli as cli\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground command\n"
            "def ctrl_c():\n"
            "    if not os.path.exists(" + repr(str(reached)) + "):\n"
            "        open(" + repr(str(reached)) + ", 'w').close()\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n")
    if moment == "first step":
        code += ("served = uvicorn.server.Server.serve\n"
                 "async def serve(self, sockets=None):\n"
                 "    ctrl_c()\n"
                 "    await served(self, sockets)\n"
                 "uvicorn.server.Server.serve = serve\n")
    else:  # the first time SIGINT's handler is put in place as uvicorn runs (asyncio's own, or ours)
        code += ("real = signal.signal\n"
                 "def handing(signum, handler):\n"
                 "    old = real(signum, handler)\n"
                 "    if signum == signal.SIGINT and sys._getframe(1).f_globals['__name__'] in (\n"
                 "            'asyncio.runners', 'orchestrator.server', 'uvicorn.server'):\n"
                 "        ctrl_c()\n"
                 "    return old\n"
                 "signal.signal = handing\n")
    code += f"raise SystemExit(cli.main(['serve', '--port', '{free_port()}']))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert reached.exists(), done.stderr  # the Ctrl-C came at that moment
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "CancelledError" not in done.stderr, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("orchestrator: ")]
    assert said == ["orchestrator: interrupted"], done.stderr


def test_a_sigterm_ends_serve_once_its_service_stopped_without_waiting_for_the_loop_s_threads(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    """A SIGTERM ends `serve` (143) as soon as its service has stopped: the event loop's threads
    still busy then (a file read on a slow disk, a database call the graceful wait gave up on) are
    not waited for. SIGTERM raised again only once the loop was closed waited for each, the stop
    held up (for as long as they took, or until a supervisor's SIGKILL)."""
    settings = make_settings()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reached, outlived = tmp_path / "reached", tmp_path / "outlived"
    # The start's asset sweep, on the loop's default executor, stuck in a read that ignores the stop.
    code = ("import os, signal, threading, orchestrator.cli as cli, orchestrator.services as services\n"
            "def measure(self):\n"
            "    open(" + repr(str(reached)) + ", 'w').close()\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    threading.Event().wait(60)\n"
            "    open(" + repr(str(outlived)) + ", 'w').close()\n"
            "    return 0\n"
            "services.Services.measure_assets = measure\n"
            f"raise SystemExit(cli.main(['serve', '--port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert reached.exists(), done.stderr  # the stop came as the sweep's thread ran
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "Application shutdown complete" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not outlived.exists(), done.stderr  # the process ended without waiting for the thread


def test_a_ctrl_c_as_the_service_that_ran_ends_is_not_told_as_the_start_s_stop(make_settings: SettingsFactory,
                                                                                 tmp_path: Path) -> None:
    """A second Ctrl-C as `serve` ends, its service stopped by the first: it was told as "the start
    was stopped before the service ran", which it had."""
    settings = make_settings()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reached = tmp_path / "reached"
    # The first once the service runs; the second as `serve` asks, the service stopped, how it ended.
    code = ("import os, signal, uvicorn.server, orchestrator.cli as cli, orchestrator.server as server\n"
            "started = uvicorn.server.Server.startup\n"
            "async def startup(self, sockets=None):\n"
            "    await started(self, sockets)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "uvicorn.server.Server.startup = startup\n"
            "busy = server.Server.device_busy\n"
            "def asked(self):\n"
            "    if not os.path.exists(" + repr(str(reached)) + "):\n"
            "        open(" + repr(str(reached)) + ", 'w').close()\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return busy.fget(self)\n"
            "server.Server.device_busy = property(asked)\n"
            f"raise SystemExit(cli.main(['serve', '--port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert reached.exists(), done.stderr  # the second came once the service had stopped
    assert "Application shutdown complete" in done.stderr, done.stderr  # the service ran
    assert done.returncode == 130, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("orchestrator: ")]
    assert said == ["orchestrator: interrupted"] and "Traceback" not in done.stderr, done.stderr


def test_a_second_sigterm_as_serve_tells_the_start_s_stop_ends_it_the_same(make_settings: SettingsFactory,
                                                                             tmp_path: Path) -> None:
    """A second SIGTERM (a supervisor's, a process group's) once the first stopped the start, as
    it is told: the start's handler raised again in the middle of telling it, a traceback and
    exit 1 where the first would have ended the process with 143 and one line."""
    settings = make_settings()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_CACHE_DIR": str(settings.cache_dir),
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reached = tmp_path / "reached"
    code = ("import os, signal, sys, orchestrator.cli as cli, orchestrator.server as server\n"
            "real = server.create_app\n"
            "def step(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*a, **k)\n"
            "server.create_app = step\n"
            "class Err:\n"
            "    def __init__(self, stream): self.stream = stream\n"
            "    def __getattr__(self, name): return getattr(self.stream, name)\n"
            "    def write(self, text):\n"
            "        if text.startswith('orchestrator: terminated') and not os.path.exists("
            + repr(str(reached)) + "):\n"
            "            open(" + repr(str(reached)) + ", 'w').close()\n"
            "            os.kill(os.getpid(), signal.SIGTERM)  # the second, as the first is told\n"
            "        return self.stream.write(text)\n"
            "sys.stderr = Err(sys.stderr)\n"
            f"raise SystemExit(cli.main(['serve', '--port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert reached.exists(), done.stderr
    assert done.returncode == -signal.SIGTERM, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("orchestrator: ")]
    assert len(said) == 1 and "start was stopped" in said[0] and "Traceback" not in done.stderr, done.stderr


def test_ctrl_c_ends_a_start_waiting_for_a_silent_postgres_server_at_once(tmp_path: Path) -> None:
    """libpq's wait for a server that takes the connection and says nothing is interrupted by
    Ctrl-C: one line and 130, not the rest of the connect timeout."""
    env = {**os.environ, "ORCH_DATA_DIR": str(tmp_path / "data"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PGCONNECT_TIMEOUT", None)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env["ORCH_DATABASE_URL"] = (f"postgresql+psycopg://studio:hunter2@127.0.0.1:{silent.getsockname()[1]}"
                                    "/orchestrator?connect_timeout=60")
        started = subprocess.Popen([sys.executable, "-m", "orchestrator", "migrate"], cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert started.stderr is not None
            before: list[str] = []  # another warning (an ORCH_* variable the environment passes on) may come first
            while "waiting for the database at" not in (line := started.stderr.readline()) and line:
                before.append(line)  # the wait is said once it has lasted SLOW_CONNECT_SECONDS
            assert "up to 60 s" in line and "hunter2" not in line, (before, line)
            asked = time.monotonic()
            started.send_signal(signal.SIGINT)
            rest = started.stderr.read()
            assert started.wait(timeout=30) == 130, rest
        finally:
            started.kill()
            started.wait()
    assert time.monotonic() - asked < 15  # not the 60 s the connection could still wait
    assert rest == "orchestrator: interrupted\n"


def _schema(url: str) -> dict[str, list[tuple[str, str, bool]]]:
    """Every table's columns (name, type, nullable) and indexes, as the database has them."""
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    try:
        seen = inspect(engine)
        return {table: sorted((c["name"], str(c["type"]), bool(c["nullable"])) for c in seen.get_columns(table))
                + sorted(("index", str(i["name"]), bool(i["unique"])) for i in seen.get_indexes(table))
                for table in seen.get_table_names()}
    finally:
        engine.dispose()


def check_a_start_stopped_mid_migration(url: str, data_dir: Path, cache_dir: Path, cwd: Path, stop: signal.Signals,
                                        ) -> None:
    """`serve` told to stop (a supervisor's SIGTERM, a Ctrl-C) while its start migrates the database,
    three revisions into seven: one line saying the start stopped with nothing half-written, the
    exit of that signal, and the database left whole at the revision it had, schema and all (the
    PostgreSQL side runs in tests/credits/test_postgres.py)."""
    from orchestrator.db import stored_revision

    upgrade(url, "0030")
    before = _schema(url)
    env = {**os.environ, "ORCH_DATA_DIR": str(data_dir), "ORCH_CACHE_DIR": str(cache_dir), "ORCH_DATABASE_URL": url,
           "ORCH_LITE_MODEL": "builtin:tiny-sd", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # Sent from inside the upgrade once 0033 is applied, as a supervisor's stop would come during it.
    code = ("import os, signal, alembic.runtime.migration as migration, orchestrator.cli as cli\n"
            "real = migration.HeadMaintainer.update_to_step\n"
            "done = []\n"
            "def step(self, to):\n"
            "    real(self, to)\n"
            "    done.append(to)\n"
            "    if len(done) == 3:\n"
            f"        os.kill(os.getpid(), signal.{stop.name})\n"
            "migration.HeadMaintainer.update_to_step = step\n"
            f"raise SystemExit(cli.main(['serve', '--port', '{free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    # As the command ends on that signal once the service runs: killed by SIGTERM, 130 after a Ctrl-C.
    assert done.returncode == (130 if stop == signal.SIGINT else -stop), done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("orchestrator: ")]
    assert len(said) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "start was stopped" in said[0] and "nothing was half-written" in said[0], said
    assert "Application startup" not in done.stderr  # the service never ran
    assert stored_revision(url) == "0030"
    assert _schema(url) == before


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_stopped_during_its_migration_says_so_and_leaves_a_whole_revision(
        make_settings: SettingsFactory, tmp_path: Path, stop: signal.Signals) -> None:
    settings = make_settings()
    check_a_start_stopped_mid_migration(settings.resolved_database_url, settings.data_dir, settings.cache_dir,
                                        tmp_path, stop)
