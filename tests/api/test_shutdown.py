"""A stopping server ends its event streams at once: uvicorn stops the app (and its scheduler) only
after every connection has closed, and a client following a queued job once kept a SIGTERM'd
server alive, and claiming jobs, for as long as it stayed connected."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from orchestrator.db import Database
from orchestrator.server import AnswerWhenStopped, _log_uvicorn_to_files, free_port, serve_in_thread
from orchestrator.settings import Settings
from tests.api import create_project, iter_sse, serve_process, stop_process, submit_draft, wait_for_log


def follow(base: str, job_id: str, seen: list[str], opened: threading.Event) -> None:
    """Read the job's stream until the server ends it; `opened` is set once its first event is
    in (the stream is subscribed then)."""
    with httpx.Client(base_url=base, timeout=60.0) as client, \
            client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for event in iter_sse(stream):
            seen.append(event.event)
            opened.set()
    seen.append("<end>")


def test_a_stream_does_not_hold_up_a_stop(make_settings: Callable[..., Settings],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # uvicorn would wait this long for the stream to close by itself; the service ends it at once.
    monkeypatch.setattr("orchestrator.server.GRACEFUL_SHUTDOWN_SECONDS", 120)
    seen: list[str] = []
    opened = threading.Event()
    with serve_in_thread(make_settings(run_jobs=False)) as base:
        with httpx.Client(base_url=base, timeout=30.0) as client:
            job = submit_draft(client, create_project(client)["id"])  # stays queued: nothing runs jobs
        reader = threading.Thread(target=follow, args=(base, job["id"], seen, opened))
        reader.start()
        assert opened.wait(30)
        started = time.monotonic()
    assert time.monotonic() - started < 60
    reader.join(30)
    assert seen == ["queued", "<end>"]


def test_sigterm_ends_the_streams_and_the_process(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    seen: list[str] = []
    opened = threading.Event()
    with serve_process(make_settings(), tmp_path, "serve.log", env={"ORCH_RUN_JOBS": "false"}) as (proc, base):
        with httpx.Client(base_url=base, timeout=30.0) as client:
            job = submit_draft(client, create_project(client)["id"])
        reader = threading.Thread(target=follow, args=(base, job["id"], seen, opened))
        reader.start()
        assert opened.wait(30)
        proc.send_signal(signal.SIGTERM)
        # uvicorn stops cleanly, then lets the signal end the process as it would have (-15).
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log
    reader.join(30)
    assert seen == ["queued", "<end>"]


def test_ctrl_c_stops_the_service_in_one_line(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    # uvicorn raises KeyboardInterrupt again once it has shut down cleanly: it was a traceback.
    with serve_process(make_settings(), tmp_path, "serve.log") as (proc, _base):
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log
    assert log.rstrip().endswith("orchestrator: interrupted")


def test_a_second_ctrl_c_still_stops_the_scheduler(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    # While a connection stays open uvicorn says "CTRL+C to force quit", and its force quit skipped
    # the app's shutdown: the scheduler never stopped, and its running jobs were left as a crash's.
    with serve_process(make_settings(), tmp_path, "serve.log") as (proc, base):
        url = httpx.URL(base)
        with socket.create_connection((url.host, url.port or 80), timeout=30) as held:
            held.sendall(b"POST /v1/projects HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")  # half a request, left open
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)  # uvicorn waits for the connection to close
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
    text = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in text, text


async def test_a_second_ctrl_c_during_the_app_s_shutdown_does_not_run_it_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented way to hurry a stop: Ctrl-C again while it waits for paid requests. uvicorn had
    # already run the app's shutdown then; running it again after the forced exit logged it twice.
    import contextlib

    import uvicorn.lifespan.on as lifespan_on
    from fastapi import FastAPI

    from orchestrator.server import Server

    ran: list[str] = []
    real = lifespan_on.LifespanOn.shutdown

    async def counted(self: lifespan_on.LifespanOn) -> None:
        ran.append("lifespan shutdown")
        await real(self)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        asyncio.get_running_loop().call_later(0.2, server.handle_exit, signal.SIGINT, None)
        yield
        server.handle_exit(signal.SIGINT, None)  # the second Ctrl-C, while the app stops
        await asyncio.sleep(0.1)

    monkeypatch.setattr(lifespan_on.LifespanOn, "shutdown", counted)
    @contextlib.contextmanager
    def no_signal_capture(self: Server) -> Iterator[None]:  # uvicorn re-raises captured signals at exit
        yield

    monkeypatch.setattr(Server, "capture_signals", no_signal_capture)
    server = Server(FastAPI(lifespan=lifespan), host="127.0.0.1", port=0, log_level="warning")
    await asyncio.wait_for(server.serve(), 30)
    assert server.force_exit and ran == ["lifespan shutdown"]


async def test_a_request_cut_off_by_the_stop_gets_a_503_in_the_error_shape() -> None:
    # What uvicorn does once its graceful wait is over: cancel the request's task.
    sent: list[Message] = []
    waiting = asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        waiting.set()
        await asyncio.Event().wait()

    async def record(message: Message) -> None:
        sent.append(message)

    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    task = asyncio.create_task(AnswerWhenStopped(slow)({"type": "http", "method": "POST", "path": "/v1/projects",
                                                        "headers": []}, nothing, record))
    await waiting.wait()
    task.cancel()
    await task  # ends without re-raising: the answer is out, and a traceback would say "bug"
    assert sent[0]["status"] == 503 and (b"connection", b"close") in sent[0]["headers"]
    error = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    assert error["code"] == "server_stopping" and "Idempotency-Key" in error["message"]


async def test_a_request_cut_off_halfway_through_its_answer_is_left_to_close() -> None:
    async def half(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.Event().wait()

    async def record(message: Message) -> None:
        return None

    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    task = asyncio.create_task(AnswerWhenStopped(half)({"type": "http", "headers": []}, nothing, record))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_uvicorn_s_own_log_reaches_the_data_dir_log_file(tmp_path: Path) -> None:
    handler = logging.FileHandler(tmp_path / "orchestrator.log")
    root, server_log = logging.getLogger(), logging.getLogger("uvicorn")
    root.addHandler(handler)
    try:
        _log_uvicorn_to_files()
        _log_uvicorn_to_files()  # once per file, however often it is called
        assert server_log.handlers.count(handler) == 1
        logging.getLogger("uvicorn.error").error("Exception in ASGI application")
        handler.flush()
        assert "Exception in ASGI application" in (tmp_path / "orchestrator.log").read_text()
    finally:
        root.removeHandler(handler)
        server_log.removeHandler(handler)
        handler.close()


# A command whose model load never ends, for a Ctrl-C to meet: the load and the stop's wait for an
# idle device are patched as their modules are imported (imported here first, they would start
# numpy's threads before the command holds its signals back), and the load tells each thread's
# blocked signals as it starts. SIGUSR1 writes every thread's stack: a stop that hangs says where.
# It takes a Ctrl-C as a terminal's foreground command does, whatever the test process ignores.
LOADING_FOREVER = string.Template("""
import faulthandler, importlib.machinery, json, os, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)
# As a terminal's foreground command has it: a Ctrl-C ignored by the test process (which its children
# inherit, and Python keeps) was seen in CI, the command then waiting for the test's SIGTERM.
print("inherited SIGINT:", signal.getsignal(signal.SIGINT), flush=True)
signal.signal(signal.SIGINT, signal.default_int_handler)

def blocked():
    found = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as status:
            found[tid] = next(int(line.split()[1], 16) for line in status if line.startswith("SigBlk"))
    print("blocked " + json.dumps([str(os.getpid()), found]), flush=True)

def load(*args, **kwargs):
    blocked()
    print("load started", flush=True)
    time.sleep(120)

PATCHES = {"tiers._local": lambda module: setattr(module.LocalRuntime, "_load_pipeline", load),
           "orchestrator.services": lambda module: setattr(module, "DEVICE_IDLE_TIMEOUT", $idle)}

class Patching:
    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            PATCHES[name](module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Patching())
from orchestrator.cli import main
raise SystemExit(main($argv))
""")


@pytest.mark.parametrize(("command", "twice"), [(["serve", "--log-level", "warning"], False),
                                                (["demo", "--size", "64"], False), (["demo", "--size", "64"], True)])
def test_a_ctrl_c_during_a_model_load_does_not_wait_for_it(command: list[str], twice: bool,
                                                          make_settings: Callable[..., Settings],
                                                          tmp_path: Path) -> None:
    """Nothing interrupts a model load (minutes, for a first download): `serve` settled its jobs,
    then waited for the load at the interpreter's exit, keeping the device from other workers all
    along; the demo's own service was given up on while it still stopped, and a traceback ended it.
    `twice`: a second Ctrl-C while the stop waits for the inference thread ends the demo at once."""
    settings = make_settings()
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_LITE_MODEL": "builtin:tiny-sd",
           "ORCH_CACHE_DIR": str(settings.cache_dir), "HF_HUB_OFFLINE": "1", "ORCH_LITE_PRELOAD": "true",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    port = ["--port", str(free_port())] if command[0] == "serve" else ["--out", str(tmp_path / "drafts")]
    script = tmp_path / "loading_forever.py"
    script.write_text(LOADING_FOREVER.substitute(idle=120 if twice else 0.5, argv=repr([*command, *port])))
    log_path = tmp_path / "command.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_for_log(log_path, "load started", proc)
            began = time.monotonic()
            proc.send_signal(signal.SIGINT)
            if twice:
                time.sleep(2)  # the stop is waiting for the inference thread
                proc.send_signal(signal.SIGINT)
            try:
                ended = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)
                with contextlib.suppress(AssertionError):  # the main thread's stack ends the dump's
                    wait_for_log(log_path, "in <module>", proc, timeout=10)
                said = log_path.read_text()[-8000:]
                raise AssertionError(f"it did not end within 60 s of the Ctrl-C: {said}") from None
            assert ended == 130
            assert time.monotonic() - began < 30
        finally:
            stop_process(proc)
    said = log_path.read_text()
    if command[0] == "demo":
        # A Ctrl-C goes to the main thread: any other that may take it (the service's, the model's,
        # torch's) leaves the demo's main thread waiting in a socket read for the next keep-alive.
        pid, masks = next(json.loads(line.removeprefix("blocked ")) for line in said.splitlines()
                          if line.startswith("blocked "))
        stops = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))
        assert masks[pid] & stops == 0, masks
        assert [tid for tid, mask in masks.items() if tid != pid and mask & stops != stops] == [], masks
    assert said.rstrip().splitlines()[-1].startswith("orchestrator: interrupted"), said  # the last line, as ever
    assert ("without waiting for it" in said) is not twice  # said by a stop that gave up on the thread
    assert "Traceback" not in said, said


async def _cut_off(db: Database, *, committed_first: bool = False) -> tuple[dict[str, Any], threading.Event]:
    """A write request, run in a worker thread as FastAPI runs a sync route, that uvicorn cuts off
    (cancels) once its graceful wait is over: the error it was answered, and an event that lets its
    thread go on to its write. `committed_first`: it committed another write before it waited."""
    sent: list[Message] = []
    waiting, go = threading.Event(), threading.Event()

    def write() -> None:
        if committed_first:
            with db.transaction() as s:
                s.execute(text("INSERT INTO cut_off (n) VALUES (0)"))
        waiting.set()
        go.wait(10)  # as for the write lock, which another process holds
        with db.transaction() as s:
            s.execute(text("INSERT INTO cut_off (n) VALUES (1)"))

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        await run_in_threadpool(write)

    async def record(message: Message) -> None:
        sent.append(message)

    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    task = asyncio.create_task(AnswerWhenStopped(route)({"type": "http", "method": "POST", "path": "/v1/projects",
                                                         "headers": []}, nothing, record))
    await asyncio.to_thread(waiting.wait, 10)
    task.cancel()
    await task
    assert sent[0]["status"] == 503
    return json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"], go


def _cut_off_table(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'cut.db'}")
    with db.transaction() as s:
        s.execute(text("CREATE TABLE cut_off (n INTEGER)"))
    return db


def _written(db: Database) -> list[int]:
    with db.session() as s:
        return list(s.execute(text("SELECT n FROM cut_off ORDER BY n")).scalars())


async def test_a_request_answered_503_when_cut_off_writes_nothing_afterwards(tmp_path: Path) -> None:
    # Its thread went on after the 503: a promote or a grant waiting for the write lock as the stop's
    # wait ran out committed its job and hold (or its grant) once the lock came, though the answer
    # said that nothing was made or held and to send it again: a client without an Idempotency-Key
    # that did was charged (or granted) twice.
    db = _cut_off_table(tmp_path)
    error, go = await _cut_off(db)
    assert error["code"] == "server_stopping" and error["details"] == {}
    go.set()
    await asyncio.sleep(0.5)  # the thread's commit, were it to happen
    assert _written(db) == []
    db.dispose()


async def test_a_request_cut_off_after_a_commit_is_told_it_may_have_been_written(tmp_path: Path) -> None:
    db = _cut_off_table(tmp_path)
    error, go = await _cut_off(db, committed_first=True)
    assert error["code"] == "server_stopping" and error["details"] == {"written": "unknown"}
    assert "Idempotency-Key" in error["message"]
    go.set()
    await asyncio.sleep(0.5)
    assert _written(db) == [0]
    db.dispose()
