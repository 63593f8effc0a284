"""Bells: a process tells the others sharing its database that something changed, so they look now.

API servers and `orchestrator worker` processes learn what the others did from the database: a job
queued, a cancel asked, a job's progress or end. Without a bell they see it at their next look, up
to `ORCH_POLL_INTERVAL` later, which is most of a small draft's time on a GPU. So each committed
write transaction rings, and a process that hears a ring looks at once (its scheduler at the
queue, its cancel watch at the jobs it holds, its follower at the streams it serves).

A ring carries nothing: the rows stay the only truth. A lost ring costs the wait for the next look,
a spurious one a query; the looks on a timer stay as the fallback.

- SQLite (processes of one machine): a Unix datagram socket per process,
  `ORCH_DATA_DIR/locks/bells/<tag>.sock`; a ring is an empty datagram to every other socket there.
  A socket left by a dead process refuses it and is removed. Processes of several users (a shared
  group) ring each other when the data dir or its `locks/` folder is group-writable: the bells'
  folder and sockets are then made group-writable too, whatever the umask.
- PostgreSQL (processes on several hosts): `NOTIFY` inside the committing transaction, so it is
  delivered on commit only and never on a rollback, and one `LISTEN` connection per process.
  A listener that stops reading (its process SIGSTOPped, a paused VM) holds every notification
  since in the server's queue; full, it would fail every commit. So the bells go quiet while the
  queue is over half full, and the looks on a timer carry on until it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestrator.events import on_loop

log = logging.getLogger(__name__)
CHANNEL = "orchestrator_bell"
# Rings heard closer together than this wake the listeners once: a burst of commits elsewhere
# (a batch of submits, other workers' claims and progress) costs each process at most 100 looks
# a second, not one per commit. A ring after a quiet spell is heard at once. Longer gaps cost
# latency: with 50 ms a one-step draft through an API server and a worker took 101 ms, not 46.
MIN_GAP_SECONDS = 0.01
# How long the PostgreSQL listener waits for a notification before checking that it should stop.
LISTEN_TIMEOUT_SECONDS = 1.0
RECONNECT_SECONDS = 5.0
# The share of PostgreSQL's notification queue (8 GB by default) over which no process rings: a
# commit whose NOTIFY finds it full fails. How often the listener looks at it, in seconds.
QUEUE_QUIET_ABOVE = 0.5
QUEUE_LOOK_SECONDS = 10.0
# sun_path holds 108 bytes on Linux, its terminating NUL included.
MAX_SOCKET_PATH = 107


class Bell:
    """Rings after commits and hears the rings of other processes. This one does neither: a
    database no other process shares (in memory, or a test's)."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(6)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_ring: Callable[[], None] | None = None
        self._pending = False
        self._last = 0.0

    def before_commit(self, session: Any) -> None:
        """Called inside each write transaction, last (`session`: SQLAlchemy's)."""

    def after_commit(self) -> None:
        """Called after each write transaction committed. Never raises."""

    def listen(self, on_ring: Callable[[], None]) -> None:
        """Call `on_ring` on the running loop when another process rings."""
        self._loop = asyncio.get_running_loop()
        self._on_ring = on_ring

    def look(self) -> None:
        """Called on the loop at each timed look: mend what a ring needs, if it can."""

    def close(self) -> None:
        self._on_ring = None

    def _heard(self) -> None:
        """A ring arrived; safe from any thread."""
        loop = self._loop
        if loop is not None and self._on_ring is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        assert self._loop is not None
        if self._pending:
            return
        self._pending = True
        self._loop.call_at(max(self._loop.time(), self._last + MIN_GAP_SECONDS), self._deliver)

    def _deliver(self) -> None:
        assert self._loop is not None
        self._pending = False
        self._last = self._loop.time()
        if self._on_ring is not None:
            self._on_ring()


class SocketBell(Bell):
    """The bell of processes on one machine (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.path = folder / f"{self.tag}.sock"
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._receiver: socket.socket | None = None
        self._bound: tuple[int, int] | None = None
        # Sockets that refused a ring for want of permission, told once each (see `after_commit`).
        self._refused: set[str] = set()

    def after_commit(self) -> None:
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            if entry.name.endswith(".new"):
                self._sweep_binding(entry.path)
                continue
            if not entry.name.endswith(".sock") or entry.name == self.path.name:
                continue
            try:
                self._sender.sendto(b"", entry.path)
            except ConnectionRefusedError:  # nobody bound: a socket its process left behind
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            except PermissionError as exc:  # another user's, not writable by this one: never heard, so said
                if entry.name not in self._refused:
                    self._refused.add(entry.name)
                    log.warning("the bell socket %s refuses this process's ring (%s): its process runs as another "
                                "user and sees this one's changes only every ORCH_POLL_INTERVAL. Run both users in "
                                "one group, with ORCH_DATA_DIR and its locks/ folder group-writable and setgid "
                                "(chmod 2775), then restart that process", entry.path, exc)
            except OSError:  # gone meanwhile, or its queue is full (it has a ring to hear already)
                pass

    def _sweep_binding(self, path: str) -> None:
        """Remove a half-made socket (see `_bind`) whose process was killed before moving it into
        place: nothing else ever would. A live one takes the empty datagram as one more ring."""
        try:
            self._sender.sendto(b"", path)
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):
                os.unlink(path)
        except OSError:  # another user's, mid-bind, or gone: its own process moves or removes it
            pass

    def listen(self, on_ring: Callable[[], None]) -> None:
        super().listen(on_ring)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            log.info("ORCH_DATA_DIR is too long a path for a bell socket; other processes' changes are "
                     "seen every ORCH_POLL_INTERVAL")
            return
        self._bind()

    def _bind(self) -> None:
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Bound under a name no ring is sent to, made writable, then moved into place: a ring sent
        # between the bind and the chmod would be refused, and told as a setup to fix. (No longer
        # than the socket's own name: `listen` measured that one.)
        binding = self.folder / f"{self.tag}.new"
        try:
            self._make_folder()
            receiver.bind(str(binding))
            shared = _group_write(self.folder, *self.folder.parents[:2])
            os.chmod(binding, stat.S_IMODE(os.stat(binding).st_mode) | shared)
            os.rename(binding, self.path)
            self._bound = _identity(self.path)
        except OSError as exc:
            receiver.close()
            with contextlib.suppress(OSError):
                binding.unlink()
            log.warning("no bell socket at %s (%s); other processes' changes are seen every ORCH_POLL_INTERVAL",
                        self.path, exc)
            return
        receiver.setblocking(False)
        self._receiver = receiver
        assert self._loop is not None
        self._loop.add_reader(receiver.fileno(), self._drain)

    def _make_folder(self) -> None:
        """The sockets' folder, made as writable by the group as the data dir or its locks/ folder
        (the umask's mode left it the first user's alone: no other user's process could bind a
        socket there, nor remove one a dead process left)."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.folder.mkdir()
        except FileExistsError:
            return
        shared = _group_write(*self.folder.parents[:2])
        if shared:
            os.chmod(self.folder, stat.S_IMODE(os.stat(self.folder).st_mode) | shared)

    def look(self) -> None:
        """Bind again when the socket's file is gone (its folder cleared by an operator, a restore):
        the process stayed deaf, back on ORCH_POLL_INTERVAL until a restart, and said nothing."""
        if self._receiver is None or _identity(self.path) == self._bound:
            return
        log.warning("the bell socket %s was removed; bound again (other processes' changes meanwhile are looked "
                    "at now)", self.path)
        self._close_receiver()
        self._bind()
        self._schedule()  # what was rung while nobody heard

    def _drain(self) -> None:
        receiver = self._receiver
        if receiver is None:  # closed after the loop picked this call
            return
        heard = False
        while True:
            try:
                receiver.recv(1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            heard = True
        if heard:
            self._schedule()

    def close(self) -> None:
        super().close()
        loop = self._loop
        if loop is not None and loop.is_running() and not on_loop(loop):
            # The reader belongs to the loop: only its thread may remove it (uvloop's handles).
            done = threading.Event()

            def close_there() -> None:
                try:
                    self._close_receiver()
                finally:
                    done.set()

            try:
                loop.call_soon_threadsafe(close_there)
            except RuntimeError:  # closed meanwhile
                self._close_receiver()
            else:
                done.wait(timeout=5)
        else:
            self._close_receiver()
        self._sender.close()

    def _close_receiver(self) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(receiver.fileno())
        receiver.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class PostgresBell(Bell):
    """The bell of processes sharing a PostgreSQL database (see the module docstring)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.conninfo = conninfo(url)
        from orchestrator.db import postgres_connect_args  # orchestrator.db imports this module

        self.connect_args = postgres_connect_args(url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.quiet = False  # the server's notification queue is too full to ring (see the module docstring)

    def before_commit(self, session: Any) -> None:
        if not self.quiet:
            session.execute(text("SELECT pg_notify(:channel, :tag)"), {"channel": CHANNEL, "tag": self.tag})

    def _look_at_the_queue(self, conn: Any) -> None:
        usage = float(conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0])
        if usage > QUEUE_QUIET_ABOVE and not self.quiet:
            log.warning("PostgreSQL's notification queue is %.0f%% full: a process listening on this database "
                        "has stopped reading (SIGSTOPped, paused; the server's log names its pid). Bells are "
                        "quiet until it drains, and changes are seen every ORCH_POLL_INTERVAL", usage * 100)
        elif usage <= QUEUE_QUIET_ABOVE and self.quiet:
            log.info("PostgreSQL's notification queue has drained; bells ring again")
        self.quiet = usage > QUEUE_QUIET_ABOVE

    def listen(self, on_ring: Callable[[], None]) -> None:
        super().listen(on_ring)
        self._thread = threading.Thread(target=self._listen, name="bell", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        from orchestrator.outage import Outage  # here: it reads orchestrator.db, which imports this module

        try:
            import psycopg
        except ImportError:  # a psycopg2-only install: the timed looks still find everything
            log.warning("no bell without psycopg 3 (pip install 'tiered-orchestrator[postgres]'); other "
                        "processes' changes are seen every ORCH_POLL_INTERVAL")
            return
        outage = Outage(log, "the bell's database connection",
                        f"listening again every {RECONNECT_SECONDS:g} s (meanwhile other processes' changes are "
                        "seen every ORCH_POLL_INTERVAL)", level=logging.WARNING,
                        away=lambda exc: isinstance(exc, psycopg.OperationalError))
        while not self._stop.is_set():
            try:
                # The options every other connection has: keepalives notice a database that vanished
                # without closing the socket (a failover), which `notifies` alone waited on forever,
                # every process back on ORCH_POLL_INTERVAL; a connect_timeout of the URL's is kept.
                with psycopg.connect(self.conninfo, autocommit=True, **self.connect_args) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    outage.recovered()
                    # Changes made while no connection listened are caught up by one look.
                    self._heard()
                    looked = -math.inf
                    while not self._stop.is_set():
                        if time.monotonic() - looked >= QUEUE_LOOK_SECONDS:
                            self._look_at_the_queue(conn)
                            looked = time.monotonic()
                        for notice in conn.notifies(timeout=LISTEN_TIMEOUT_SECONDS):
                            if notice.payload != self.tag:
                                self._heard()
            except Exception as exc:
                outage.failed(exc)
                self._stop.wait(RECONNECT_SECONDS)

    def close(self) -> None:
        super().close()
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=LISTEN_TIMEOUT_SECONDS + 1)


def _group_write(*folders: Path) -> int:
    """`stat.S_IWGRP` when any of `folders` is group-writable (shared with a group's other users),
    else 0. Only the group's bit: a ring from every account of the machine is no setup's intent."""
    for folder in folders:
        with contextlib.suppress(OSError):
            if os.stat(folder).st_mode & stat.S_IWGRP:
                return stat.S_IWGRP
    return 0


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def conninfo(url: str) -> str:
    """libpq's `key='value' ...` for a SQLAlchemy URL, each value quoted. The URL rendered back
    (`postgresql://...`) left a space in a password raw, which libpq refused quoting the password
    (logged, once a minute, and no bell), and read a space in a query value as `+`."""
    parsed = make_url(url)
    params: dict[str, Any] = parsed.translate_connect_args(username="user", database="dbname")
    params.update({key: value[-1] if isinstance(value, tuple) else value for key, value in parsed.query.items()})
    return " ".join(f"{key}='{_escaped(str(value))}'" for key, value in params.items() if value is not None)


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def bell_for(url: str, locks: Path) -> Bell:
    """The bell for a database URL: PostgreSQL's own, sockets beside an SQLite file, none for a
    database in memory (no other process shares it)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return PostgresBell(url)
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in database or parsed.query.get("mode") == "memory"
    if parsed.get_backend_name() == "sqlite" and not in_memory:
        return SocketBell(locks / "bells")
    return Bell()
