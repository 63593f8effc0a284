"""Running the service: `orchestrator serve`, and inside another program (the demo, tests,
benchmarks) on a free port."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn
import uvicorn.server
from fastapi import FastAPI
from sqlalchemy.exc import DatabaseError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.cross_site import is_loopback
from orchestrator.api.errors import StartTracker, answer
from orchestrator.app import create_app
from orchestrator.db import REQUEST_GATE, RequestGate
from orchestrator.errors import ServerStopping, mask_secrets
from orchestrator.http_protocol import BoundedHttpToolsProtocol
from orchestrator.services import Stopped
from orchestrator.settings import Settings
from orchestrator.signals import leave_signals_to_the_main_thread

# Seconds uvicorn waits for open requests once told to stop, before it closes them: the event
# streams end at once (below); this bounds anything else, such as a client reading slowly.
GRACEFUL_SHUTDOWN_SECONDS = 10
# Longer than the idle time of clients' pools (httpx: 5 s) and of load balancers in front (often
# 60 s): with uvicorn's 5 s, a client reusing a connection as the server closed it lost its request
# ("server disconnected without sending a response") in a load audit.
KEEP_ALIVE_SECONDS = 75
# How long a stop may take beyond ORCH_STOP_GRACE: jobs storing their images, their writes waiting
# out a database that is away, the inference thread (the README's advice for systemd's TimeoutStopSec).
STOP_BEYOND_GRACE_SECONDS = 200


class AnswerWhenStopped:
    """A request still open when the graceful wait runs out is cancelled by uvicorn, which then
    answers a bare-text 500 and logs a traceback: a client could not tell it from a bug, nor know
    whether to send it again. It gets the documented error shape instead: 503 `server_stopping`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._quiet_startup_failure(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = StartTracker(send)
        # The route's thread goes on after a cancel: its writes must not commit once we answered.
        gate = RequestGate()
        token = REQUEST_GATE.set(gate)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if tracked.started:  # half an answer: only closing the connection is left
                gate.close()
                raise
            if gate.close():
                stopped = ServerStopping(
                    "the server stopped before this request was finished, after it had begun to write: it may "
                    "have been written. Send it again with the same Idempotency-Key, which answers with what was "
                    "written; without one, look first (the project's jobs, its grants): sent again, it may be "
                    "done twice", details={"written": "unknown"})
            else:
                stopped = ServerStopping("the server stopped before this request was finished, and nothing was "
                                         "written; send it again (with the same Idempotency-Key for a POST)")
            await answer(stopped, headers={"Connection": "close"})(scope, receive, send)
        finally:
            REQUEST_GATE.reset(token)
            # The answer is out and the task ends here: re-raising would only log a traceback.

    def _quiet_startup_failure(self, send: Send) -> Send:
        """A start-up failure `serve` tells in a line (`startup_failure`, a database gone) is not
        also logged as Starlette's traceback, which uvicorn prints from the message."""

        async def sending(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and startup_failure(self.app) is not None:
                message = {**message, "message": ""}
            await send(message)

        return sending


def startup_failure(app: ASGIApp) -> DatabaseError | None:
    failure = getattr(getattr(app, "state", None), "startup_failure", None)
    return failure if isinstance(failure, DatabaseError) else None


class Server(uvicorn.Server):
    """uvicorn's server, which ends the event streams as soon as it is told to stop. uvicorn runs
    the app's shutdown (stopping the scheduler) only once every connection has closed, and a
    client following a job would otherwise keep the process running, and claiming jobs, for as
    long as it stays connected."""

    def __init__(self, app: FastAPI, **options: object) -> None:
        options = {"timeout_keep_alive": KEEP_ALIVE_SECONDS, "http": BoundedHttpToolsProtocol, **options}
        super().__init__(uvicorn.Config(AnswerWhenStopped(app), lifespan="on",
                                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, **options))  # type: ignore[arg-type]
        self.app = app
        self.interrupted = False  # a Ctrl-C (SIGINT) stopped it
        self._taken: dict[int, Any] | None = None  # the signals' handlers before `_take_signals`
        access = logging.getLogger("uvicorn.access")  # configured by the `Config` made above
        if not any(isinstance(f, _MaskSecrets) for f in access.filters):
            access.addFilter(_MaskSecrets())

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, with SIGINT and SIGTERM taken before its event loop is made. Left to the
        loop's start (`capture_signals`, inside the served coroutine), a Ctrl-C just before found
        asyncio's own SIGINT handler, which cancels the main task: the start ended with a
        `CancelledError` traceback (exit 1, or 130 after a traceback from the app's start-up)."""
        if threading.current_thread() is not threading.main_thread():
            super().run(sockets=sockets)
            return
        self._taken = self._take_signals()
        try:
            super().run(sockets=sockets)
        finally:
            self._give_signals_back()  # where the served coroutine did not (it never ran)
        # As uvicorn: the signals that stopped it are raised again, the last first, the loop closed.
        for captured in reversed(self._captured_signals):
            signal.raise_signal(captured)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, for the served coroutine: the signals `run` took are given back once it is
        done, so that a Ctrl-C while the loop closes (a thread it waits for) ends that wait, as
        it did. Awaited on its own (`serve()`, not `run`), it takes them itself meanwhile."""
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        if self._taken is not None:  # by `run`
            try:
                yield
            finally:
                self._give_signals_back()
            # A SIGTERM that stopped it (the last signal: raised first) ends the process here, the
            # service stopped, as uvicorn's own does: raised by `run`, once the loop had closed, it
            # first waited for the loop's threads still busy (a read on a slow disk, a database call
            # the graceful wait gave up on), the stop held up for as long as they took.
            if self._captured_signals and self._captured_signals[-1] == signal.SIGTERM:
                signal.raise_signal(signal.SIGTERM)
            return
        self._taken = self._take_signals()
        try:
            yield
        finally:
            self._give_signals_back()
        for captured in reversed(self._captured_signals):
            signal.raise_signal(captured)

    def _take_signals(self) -> dict[int, Any]:
        """Our `handle_exit` for uvicorn's signals; what each had. The command's own SIGTERM
        handler (it tells a stop during the start, the app being built) is handed straight to it
        (a SIGTERM as they change hands is the one's or the other's): with the default put in
        place between them, a thread that does not block SIGTERM (a library's, OpenBLAS's) took
        one sent then, and the default ended the process without a word."""
        return {sig: signal.signal(sig, self.handle_exit) for sig in uvicorn.server.HANDLED_SIGNALS}

    def _give_signals_back(self) -> None:
        """What each signal had, but SIGTERM's default, so that the SIGTERM raised again once
        stopped ends the process (143); once only."""
        taken, self._taken = self._taken, None
        for sig, handler in (taken or {}).items():
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        again = self.should_exit
        self.interrupted = self.interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)
        self.end_streams()
        services = getattr(self.app.state, "services", None)
        if again and services is not None:
            services.scheduler.hurry()  # a second Ctrl-C: stop waiting for paid requests to answer

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit and not self.lifespan.shutdown_event.is_set():
            # uvicorn skips the app's shutdown after a second Ctrl-C (its "force quit", offered while
            # a connection stays open). Ours stops the scheduler, hurried by `handle_exit`: skipped,
            # its running jobs were left for recovery as a crash's, and counted towards giving up.
            await self.lifespan.shutdown()

    @property
    def device_busy(self) -> bool:
        """Whether the app's inference thread was still busy when it stopped (see `Stopped`)."""
        services = getattr(self.app.state, "services", None)
        return services is not None and services.device_busy

    def end_streams(self) -> None:
        """The stop is asked: event streams end, and no job starts (see `Scheduler.stop_claiming`)."""
        services = getattr(self.app.state, "services", None)  # set once the app has started
        if services is not None:
            services.bus.close()
            services.scheduler.stop_claiming()


class StartInterrupted(KeyboardInterrupt):
    """A Ctrl-C while `serve` built the app and its server, before uvicorn took the signals: the
    start's stop, told apart from one once the service has run (a second Ctrl-C as it ends)."""


class CannotListen(Exception):
    """The address `serve` was given cannot be listened on (taken, not this machine's)."""


def bare_host(host: str) -> str:
    """`[::1]` as an address is written in a URL, `::1` as a socket takes it."""
    return host.removeprefix("[").removesuffix("]")


def listening_addresses(host: str, port: int) -> list[tuple[Any, ...]]:
    """The addresses `--host` names to listen on (`""`: every interface), as uvicorn resolves
    them; `CannotListen` for a name no resolver knows."""
    host = bare_host(host)
    try:
        return socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise CannotListen(f"--host {host}: {exc.strerror or exc}") from None


def check_listenable(host: str, port: int) -> None:
    """Raise `CannotListen` unless every address `host` names can be bound on `port` now, before
    the service is built: uvicorn binds them only after the whole start-up (migrations, engines),
    then exits 3 with a message naming neither flag. (Bound and let go: uvicorn binds them again,
    each address, IPv6 ones IPv6-only, as it always has.)"""
    for family, kind, proto, _, address in listening_addresses(host, port):
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no obstacle
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except OSError as exc:
            raise CannotListen(f"--host {bare_host(host)} --port {port}: {exc.strerror or exc}") from None


def serve(settings: Settings, *, host: str, port: int, log_level: str) -> Stopped:
    """Serve until SIGINT or SIGTERM (`orchestrator serve`). uvicorn raises SIGTERM again once it
    has stopped, which ends the process there; a Ctrl-C is returned (`Stopped.signal`). One
    while the app is built is raised as `StartInterrupted`: the start's stop."""
    # Open to this machine only: its browsers' pages may not reach it under another name.
    loopback_only = settings.admin_key is None and is_loopback(host)
    try:
        server = Server(create_app(settings, loopback_only=loopback_only), host=bare_host(host), port=port,
                        log_level=log_level)
        _log_uvicorn_to_files()  # after uvicorn has configured its loggers, which replaces their handlers
    except KeyboardInterrupt:
        raise StartInterrupted from None
    interrupted = False
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn's Ctrl-C raised again once it has stopped
        interrupted = True
    except SystemExit:  # uvicorn's exit 3 after a failed start
        if (failure := startup_failure(server.app)) is not None:
            raise failure from None  # told in a line by the command, with its exit status
        raise
    # Not only the KeyboardInterrupt: `handle_exit` knows of the Ctrl-C too (when asyncio.run's own
    # SIGINT handler took the raised signal, once, on a loaded machine, the process exited 0 after one).
    return Stopped(signal.SIGINT if interrupted or server.interrupted else None, server.device_busy)


class _MaskSecrets(logging.Filter):
    """A key's secret in a request's URL (sent for a key's id, `DELETE .../keys/{key_id}`) is
    cut to its prefix in the access log, a line that goes to journals and log collectors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(mask_secrets(a) if isinstance(a, str) else a for a in record.args)
        return True


def _log_uvicorn_to_files() -> None:
    """uvicorn's loggers do not pass their records on to the root logger, whose file handler
    (`ORCH_DATA_DIR/logs/orchestrator.log`) then missed the server's start, stop and the
    tracebacks of unexpected errors. Its access log stays on stderr: a line per request."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    target = logging.getLogger("uvicorn")
    for handler in files:
        if handler not in target.handlers:
            target.addHandler(handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve_in_thread(settings: Settings, *, port: int | None = None, timeout: float = 60.0,
                    stop_timeout: float = 30.0, on_stop: Callable[[Stopped], None] | None = None) -> Iterator[str]:
    """Start the app with uvicorn in a background thread; yields its base URL. Without a `port`,
    the server is handed a socket bound to a free one: no other process can take it meanwhile.
    It listens on this machine only, as `serve` on a loopback address: without an admin key, a
    page under another name (DNS rebinding) is refused while it runs (the demo's own service).
    `on_stop` is told how it stopped, once it has or `stop_timeout` seconds have passed (a
    stop may take ORCH_STOP_GRACE + STOP_BEYOND_GRACE_SECONDS: given up on sooner, the
    interpreter's exit goes on under a stop still running, with a traceback)."""
    app = create_app(settings, loopback_only=settings.admin_key is None)
    sock = None
    if port is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = Server(app, host="127.0.0.1", port=port, log_level="warning")

    def run() -> None:
        leave_signals_to_the_main_thread()  # its program's, with the threads the service starts
        server.run(sockets=[sock] if sock else None)

    thread = threading.Thread(target=run, name="orchestrator-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the orchestrator service did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.end_streams()
        ended = False
        try:
            thread.join(timeout=stop_timeout)
            ended = not thread.is_alive()  # not asked after a join a Ctrl-C broke: it would say so
        finally:  # a second Ctrl-C during the wait is told too: the stop may be waiting for the device
            if sock is not None:
                sock.close()
            if on_stop is not None:
                on_stop(Stopped(None, server.device_busy or not ended))
