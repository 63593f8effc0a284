"""Tests of the REST API against a live service. Helpers shared by the modules live here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import httpx
from starlette.types import Message

from orchestrator.db import Database, sqlite_file
from orchestrator.server import free_port
from orchestrator.settings import Settings
from tiers import tiny

if TYPE_CHECKING:
    # Starlette's TestClient is an httpx2 client: the helpers below take its answers too.
    import httpx2
    from starlette.testclient import TestClient

TERMINAL = ("succeeded", "failed", "canceled")
SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}
# Large enough to be still denoising when the test acts on it (about 40 ms a step on 2 CPU cores);
# every test that starts one cancels it or kills its server, so its full length is never paid.
SLOW: dict[str, Any] = {"n": 1, "width": 512, "height": 512, "steps": 150}


@dataclass(frozen=True)
class SSE:
    id: str | None
    event: str
    data: dict[str, Any]


def iter_sse(response: httpx.Response) -> Iterator[SSE]:
    """Parse a text/event-stream body into events (`id:`, `event:`, `data:` fields). A block
    without `data:` (the stream's opening `retry:`) is no event, as an EventSource reads it."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in fields:
                yield SSE(fields.get("id"), fields.get("event", "message"), json.loads(fields.get("data", "null")))
            fields = {}
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value
    if "data" in fields:
        yield SSE(fields.get("id"), fields.get("event", "message"), json.loads(fields.get("data", "null")))


def read_events(client: httpx.Client, job_id: str, timeout: float = 60.0) -> list[SSE]:
    """The whole event stream of a job, until the server closes it."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(iter_sse(response))


def wait_for_job(client: httpx.Client, job_id: str, statuses: tuple[str, ...] = TERMINAL,
                 timeout: float = 60.0) -> dict[str, Any]:
    """Poll `GET /v1/jobs/{id}` until the job reaches one of `statuses` (deadline, not sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in statuses:
            return job
        if job["status"] in TERMINAL:
            raise AssertionError(f"job {job_id} ended {job['status']} ({job['error']}), wanted {statuses}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s, wanted {statuses}")
        time.sleep(0.02)  # poll interval, not a wait for a state


def create_project(client: httpx.Client | httpx2.Client, name: str = "test project", **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/projects", json={"name": name, **extra})
    assert response.status_code == 201, response.text
    project: dict[str, Any] = response.json()
    return project


def submit_draft(client: httpx.Client, project_id: str, **body: Any) -> dict[str, Any]:
    payload = {"prompt": "a lighthouse at dusk", "n": 1, "seed": 42, **SMALL, **body}
    response = client.post(f"/v1/projects/{project_id}/drafts", json=payload)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def run_draft(client: httpx.Client, project_id: str, **body: Any) -> dict[str, Any]:
    """Submit a draft and wait for it to succeed."""
    job = submit_draft(client, project_id, **body)
    return wait_for_job(client, job["id"], ("succeeded",))


def job_count(client: httpx.Client) -> int:
    response = client.get("/v1/jobs", params={"limit": 500})
    assert response.status_code == 200
    return len(response.json()["items"])


def assert_error(response: httpx.Response | httpx2.Response, status: int, code: str) -> dict[str, Any]:
    """The documented error body: `{"error": {"code", "message", "details"}}` with a matching status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    return error


def asgi_scope(method: str, path: str, *, spec_version: str = "2.4") -> dict[str, Any]:
    """The ASGI scope of a request without a query, as a server gives it to the app: for a test that
    calls the app itself, to see what it sends message by message (an HTTP client sees the bytes)."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80)}


def asgi_messages(client: TestClient, method: str, path: str, *, timeout: float,
                  headers: list[tuple[bytes, bytes]] | None = None) -> list[Message]:
    """What the app sends for a request without a body, message by message, called as a server that
    never reports a disconnect (ASGI 2.4: a gone client shows only as a failing send): the client
    stays connected, and the app must return within `timeout` seconds. `headers`: sent besides Host."""
    sent: list[Message] = []
    requests = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> Message:
        for request in requests:
            return request
        await anyio.sleep_forever()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    async def call() -> None:
        with anyio.fail_after(timeout):
            scope = asgi_scope(method, path)
            await client.app({**scope, "headers": [*scope["headers"], *(headers or [])]}, receive, send)

    assert client.portal is not None
    client.portal.call(call)
    return sent


def launch_server(env: dict[str, str], cwd: Path, log: IO[bytes],
                  before: str = "") -> tuple[subprocess.Popen[bytes], str]:
    """`orchestrator serve` as a child process configured by `env`, once it answers /healthz;
    `before` is Python it runs first. The port is picked free, then let go for the child to bind:
    another process may take it in between, so a start that finds it taken is tried again on another."""
    for _ in range(3):
        started = _launch_once(env, cwd, log, before)
        if started is not None:
            return started
    raise AssertionError("three free ports were taken before the server could bind them")


def _launch_once(env: dict[str, str], cwd: Path, log: IO[bytes],
                 before: str) -> tuple[subprocess.Popen[bytes], str] | None:
    port = free_port()
    start = log.tell()
    args = ["serve", "--port", str(port), "--log-level", "warning"]
    command = (["-c", f"{before}\nfrom orchestrator.cli import main\nraise SystemExit(main({args!r}))"] if before
               else ["-m", "orchestrator.cli", *args])
    proc = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    # A deadline, not a timing: a start takes seconds alone, and over 60 s (torch's import, the
    # model's load) with the load of eight test runs on 2 cores.
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            log.flush()
            said = Path(log.name).read_bytes()[start:].decode(errors="replace") if isinstance(log.name, str) else ""
            if "address already in use" in said:
                return None
            raise AssertionError(f"the server exited with {proc.returncode}: {said[-2000:]}")
        try:
            # A child that already died on a taken port is not the one answering.
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200 and proc.poll() is None:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not answer /healthz within 180 s")
        time.sleep(0.05)  # poll interval while the process starts


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a process manager sends it; SIGKILL when it does not end within 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def migrated_before_the_start(settings: Settings, env: dict[str, str] | None) -> None:
    """The child's database made beforehand where it is a new SQLite file in the data dir: the test
    process copies the one it migrated once (tests/conftest.py), where the child ran 30 revisions
    and imported alembic to do it (1-3 s of each start on a loaded 2-core machine). The child's
    own upgrade then finds it at head, as on any later start; tests of a start's migration run
    the command themselves (tests/test_cli.py)."""
    if env is not None and ("ORCH_DATABASE_URL" in env or "ORCH_DATA_DIR" in env):
        return  # the child is configured elsewhere than `settings` says
    url = settings.resolved_database_url
    path = sqlite_file(url)
    if path is None or path.exists():
        return
    db = Database(url)
    try:
        db.migrate()
    finally:
        db.dispose()


@contextmanager
def serve_process(settings: Settings, workdir: Path, log_name: str, env: dict[str, str] | None = None,
                  before: str = "") -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`orchestrator serve` as its own process, configured through the environment only (the
    settings' data and cache dirs, the tiny model, and `env`). `before` is Python it runs first
    (`tests.fakes.HOLD_AFTER_FIRST_STEP`), with `tests` importable from this checkout."""
    # make_settings already removed the developer's ORCH_* and vendor variables from os.environ.
    process_env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_LITE_MODEL": tiny.NAME,
                   "ORCH_CACHE_DIR": str(settings.cache_dir), "HF_HUB_OFFLINE": "1",
                   "ORCH_STOP_GRACE": str(settings.stop_grace), **(env or {})}
    if before:
        root = str(Path(__file__).resolve().parents[2])
        process_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    migrated_before_the_start(settings, env)
    with (workdir / log_name).open("wb") as log:
        proc, base = launch_server(process_env, workdir, log, before)
        try:
            yield proc, base
        finally:
            stop_process(proc)


def wait_for_log(log_path: Path, text: str, proc: subprocess.Popen[bytes] | None = None,
                 timeout: float = 60) -> None:
    """Until a process's log file says `text` (or the process ended, or `timeout` passed)."""
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text(errors="replace"):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise AssertionError(f"the log never said {text!r}: {log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)  # poll interval while the process works


@contextmanager
def worker_process(settings: Settings, workdir: Path, log_name: str, env: dict[str, str] | None = None,
                   before: str = "") -> Iterator[subprocess.Popen[bytes]]:
    """`orchestrator worker` as its own process (configured as `serve_process` is), once it has
    started its scheduler. At exit it gets SIGTERM and must stop cleanly. It runs in `workdir`
    but imports `tests.fakes` engines from this checkout; `before` is Python it runs first."""
    root = str(Path(__file__).resolve().parents[2])
    process_env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_LITE_MODEL": tiny.NAME,
                   "ORCH_CACHE_DIR": str(settings.cache_dir), "HF_HUB_OFFLINE": "1", "ORCH_POLL_INTERVAL": "0.1",
                   "ORCH_STOP_GRACE": str(settings.stop_grace),
                   "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p), **(env or {})}
    log_path = workdir / log_name
    migrated_before_the_start(settings, env)
    with log_path.open("wb") as log:
        code = f"{before}\nfrom orchestrator.cli import main\nraise SystemExit(main(['worker']))"
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=workdir, env=process_env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_log(log_path, "runs jobs from", proc)
            yield proc
        finally:
            stop_process(proc)


# PostgreSQL refuses NUL in text (it once failed a finished job at the asset insert, and answered
# 500 for a project name); tests/credits/test_postgres.py sends these to a PostgreSQL service.
NUL_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/projects", {"name": "a\x00b"}, "name"),
    ("/v1/projects/{project}/drafts", {"prompt": "a\x00b"}, "prompt"),
    ("/v1/projects/{project}/drafts", {"prompt": "x", "negative_prompt": "\x00"}, "negative_prompt"),
    ("/v1/projects/{project}/drafts", {"prompt": "x", "tags": {"k\x00": "v"}}, "tags"),
    ("/v1/projects/{project}/drafts", {"prompt": "x", "tags": {"k": "v\x00"}}, "tags.k"),
    ("/v1/projects/{project}/grants", {"amount": 1, "note": "\x00"}, "note"),
    ("/v1/route/explain", {"stage": "ideation", "project_id": "{project}", "prompt": "\x00"}, "prompt"),
]
NUL_URLS = ["/v1/projects/prj_a%00b", "/v1/jobs?project_id=prj_a%00b", "/v1/projects/{project}/assets?cursor=%00",
            "/v1/assets/ast_%00/content"]


def check_nul_refused(client: httpx.Client, project: str) -> None:
    before = (job_count(client), client.get(f"/v1/projects/{project}/ledger").json(),
              len(client.get("/v1/projects", params={"limit": 500}).json()["items"]))
    for path, body, field in NUL_BODIES:
        body = {k: (v.format(project=project) if k == "project_id" else v) for k, v in body.items()}
        error = assert_error(client.post(path.format(project=project), json=body), 422, "invalid_request")
        assert error["message"] == f"{field}: contains a NUL character (\\u0000)", error
        # Placed at its field, as any other error of a field: a client marks that form field.
        assert [e["loc"] for e in error["details"]["errors"]] == [["body", *field.split(".")]], error
    for url in NUL_URLS:
        assert_error(client.get(url.format(project=project)), 400, "invalid_request")
    assert before == (job_count(client), client.get(f"/v1/projects/{project}/ledger").json(),
                      len(client.get("/v1/projects", params={"limit": 500}).json()["items"]))
