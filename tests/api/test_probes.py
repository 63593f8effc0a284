"""`/healthz` (liveness) and `/readyz` (readiness): what a load balancer or an orchestrator probes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from orchestrator.db import Database
from orchestrator.settings import Settings
from tests.api import assert_error
from tests.conftest import SettingsFactory


def test_ready_while_the_database_answers_and_503_once_it_does_not(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = start_server(make_settings())
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.text

    def stalled(self: Database) -> None:  # a writer holding the lock, a server gone quiet
        time.sleep(2.5)

    monkeypatch.setattr(Database, "ping", stalled)
    error = assert_error(client.get("/readyz"), 503, "database_unavailable")
    assert "did not answer within 2 s" in error["message"]
    assert client.get("/readyz").headers["retry-after"] == "5"
    assert client.get("/healthz").status_code == 200  # alive all the same: not a process to restart


def test_liveness_is_answered_while_the_thread_pool_serves_nothing(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Forty requests each waiting out a stalled database fill the pool that runs sync routes: a
    liveness probe queued behind them failed, and a healthy process was restarted."""
    import fastapi.routing

    client = start_server(make_settings())
    freed = threading.Event()
    real = fastapi.routing.run_in_threadpool

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
