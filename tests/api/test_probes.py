"""`/healthz` (liveness) and `/readyz` (readiness): what a load balancer or an orchestrator probes."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from orchestrator.db import Database, sqlite_file
from orchestrator.settings import Settings
from tests.api import assert_error
from tests.conftest import SettingsFactory


def test_ready_while_the_database_answers_and_503_once_it_does_not(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = start_server(make_settings())
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.text

    def stalled(self: Database) -> None:  # a server gone quiet, a pool with no connection free
        time.sleep(6)  # past both probes below (2 s each), which share this one question

    monkeypatch.setattr(Database, "ping", stalled)
    error = assert_error(client.get("/readyz"), 503, "database_unavailable")
    assert "did not answer within 2 s" in error["message"]
    assert client.get("/readyz").headers["retry-after"] == "5"
    assert client.get("/healthz").status_code == 200  # alive all the same: not a process to restart


def test_not_ready_while_another_process_holds_the_write_lock(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    """A stalled writer (another process stopped inside `BEGIN IMMEDIATE`) left /readyz at 200 while
    every write waited out the lock timeout and answered 503."""
    settings = make_settings()
    client = start_server(settings)
    assert client.get("/readyz").status_code == 200
    path = sqlite_file(settings.resolved_database_url)
    assert path is not None
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        error = assert_error(client.get("/readyz"), 503, "database_unavailable")
        assert "write lock has been held for over 1 s" in error["message"], error
        other.execute("ROLLBACK")
        assert client.get("/readyz").status_code == 200
    finally:
        other.close()


def test_probes_while_the_database_is_away_share_one_question(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe each on the shared thread pool, each held as long as the database took: twenty of
    them starved the service's own work (a project key's look-up waited 18 s)."""
    client = start_server(make_settings())
    asked: list[str] = []
    answer = threading.Event()

    def stalled(self: Database) -> None:
        asked.append(threading.current_thread().name)
        answer.wait(30)

    monkeypatch.setattr(Database, "ping", stalled)
    try:
        with ThreadPoolExecutor(10) as pool:
            probes = list(pool.map(lambda _: client.get("/readyz", timeout=30).status_code, range(10)))
        assert probes == [503] * 10
        assert asked == ["readyz ping"]  # one question, on a thread of its own
    finally:
        answer.set()
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/readyz").status_code == 200  # the answer came: a later probe asks again
    assert len(asked) >= 2 and set(asked) == {"readyz ping"}


def test_liveness_is_answered_while_the_thread_pool_serves_nothing(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Forty requests each waiting out a stalled database fill the pool that runs sync routes: a
    liveness probe queued behind them failed, and a healthy process was restarted."""
    import fastapi.routing

    client = start_server(make_settings())
    freed = threading.Event()
    real = fastapi.routing.run_in_threadpool  # type: ignore[attr-defined]

    async def full_pool(*args: Any, **kwargs: Any) -> Any:
        while not freed.is_set():  # no thread of the pool is free until the test ends
            await asyncio.sleep(0.05)
        return await real(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "run_in_threadpool", full_pool)
    try:
        with pytest.raises(httpx.ReadTimeout):  # a sync route waits for a thread
            client.get("/v1/projects", timeout=1.0)
        health = client.get("/healthz", timeout=10.0)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert client.get("/readyz", timeout=10.0).status_code == 200
    finally:
        freed.set()
