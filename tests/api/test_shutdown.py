"""A stopping server ends its event streams at once: uvicorn stops the app (and its scheduler) only
after every connection has closed, and a client following a queued job once kept a SIGTERM'd
server alive, and claiming jobs, for as long as it stayed connected."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.api import create_project, iter_sse, serve_process, submit_draft


def follow(base: str, job_id: str, seen: list[str], opened: threading.Event) -> None:
    """Read the job's stream until the server ends it."""
    with httpx.Client(base_url=base, timeout=60.0) as client, \
            client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        opened.set()
        seen.extend(event.event for event in iter_sse(stream))
    seen.append("<end>")


def test_a_stream_does_not_hold_up_a_stop(make_settings: Callable[..., Settings]) -> None:
    seen: list[str] = []
    opened = threading.Event()
    with serve_in_thread(make_settings(run_jobs=False)) as base:
        with httpx.Client(base_url=base, timeout=30.0) as client:
            job = submit_draft(client, create_project(client)["id"])  # stays queued: nothing runs jobs
        reader = threading.Thread(target=follow, args=(base, job["id"], seen, opened))
        reader.start()
        assert opened.wait(30)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    reader.join(5)
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
        time.sleep(0.2)  # the stream is subscribed once its first event is out
        proc.send_signal(signal.SIGTERM)
        # uvicorn stops cleanly, then lets the signal end the process as it would have (-15).
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log
    reader.join(5)
    assert seen[-1] == "<end>" and "queued" in seen
