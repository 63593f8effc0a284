"""Running the service: `orchestrator serve`, and inside another program (the demo, tests,
benchmarks) on a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI

from orchestrator.app import create_app
from orchestrator.settings import Settings

# Seconds uvicorn waits for open requests once told to stop, before it closes them: the event
# streams end at once (below); this bounds anything else, such as a client reading slowly.
GRACEFUL_SHUTDOWN_SECONDS = 10


class Server(uvicorn.Server):
    """uvicorn's server, which ends the event streams as soon as it is told to stop. uvicorn runs
    the app's shutdown (stopping the scheduler) only once every connection has closed, and a
    client following a job would otherwise keep the process running, and claiming jobs, for as
    long as it stays connected."""

    def __init__(self, app: FastAPI, **options: object) -> None:
        super().__init__(uvicorn.Config(app, lifespan="on",
                                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, **options))  # type: ignore[arg-type]
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.end_streams()

    def end_streams(self) -> None:
        services = getattr(self.app.state, "services", None)  # set once the app has started
        if services is not None:
            services.bus.close()


def serve(settings: Settings, *, host: str, port: int, log_level: str) -> None:
    """Serve until SIGINT or SIGTERM (`orchestrator serve`)."""
    Server(create_app(settings), host=host, port=port, log_level=log_level).run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve_in_thread(settings: Settings, *, port: int | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Start the app with uvicorn in a background thread; yields its base URL."""
    port = port or free_port()
    server = Server(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    thread = threading.Thread(target=server.run, name="orchestrator-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the orchestrator service did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.end_streams()
        thread.join(timeout=30)
