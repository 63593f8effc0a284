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
from typing import Any

import httpx

from orchestrator.server import free_port
from orchestrator.settings import Settings
from tiers import tiny

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
    """Parse a text/event-stream body into events (`id:`, `event:`, `data:` fields)."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if fields:
                yield SSE(fields.get("id"), fields.get("event", "message"), json.loads(fields.get("data", "null")))
            fields = {}
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value
    if fields:
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


def create_project(client: httpx.Client, name: str = "test project", **extra: Any) -> dict[str, Any]:
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


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
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


@contextmanager
def serve_process(settings: Settings, workdir: Path, log_name: str,
                  env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`orchestrator serve` as its own process, configured through the environment only (the
    settings' data and cache dirs, the tiny model, and `env`)."""
    port = free_port()
    # make_settings already removed the developer's ORCH_* and vendor variables from os.environ.
    process_env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_LITE_MODEL": tiny.NAME,
                   "ORCH_CACHE_DIR": str(settings.cache_dir), "HF_HUB_OFFLINE": "1", **(env or {})}
    log = (workdir / log_name).open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], cwd=workdir, env=process_env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}; see {log.name}"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)  # poll interval while the process starts
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
