"""Bells: a commit in one process makes the others look at once instead of at their next poll."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col

from orchestrator.bells import Bell, SocketBell, bell_for
from orchestrator.clock import utcnow
from orchestrator.db import Database
from orchestrator.follow import catch_up
from orchestrator.ids import new_id
from orchestrator.models import Job, Project
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.api import (
    SLOW,
    TERMINAL,
    create_project,
    read_events,
    submit_draft,
    wait_for_job,
    wait_for_log,
    worker_process,
)
from tests.api.test_workers import add_job

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

SettingsFactory = Callable[..., Settings]
# Longer than any wait below: what these tests see within their deadlines, a bell told.
NO_POLL = 60.0


def pending(bell: SocketBell) -> bool:
    """Whether a ring waits in the bell's socket (read without the loop, which would drain it)."""
    assert bell._receiver is not None
    try:
        bell._receiver.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True


def add_project(db: Database) -> None:
    with db.transaction() as s:
        s.add(Project(id=new_id("prj"), name="bells", policy="balanced"))


def test_a_commit_rings_every_other_process_once_and_a_rollback_rings_none(tmp_path: Path) -> None:
    folder = tmp_path / "locks" / "bells"

    async def scenario() -> None:
        ringer, other, third = SocketBell(folder), SocketBell(folder), SocketBell(folder)
        heard: dict[str, int] = {"ringer": 0, "other": 0, "third": 0}
        for name, bell in (("ringer", ringer), ("other", other), ("third", third)):
            bell.listen(lambda name=name: heard.__setitem__(name, heard[name] + 1))  # type: ignore[misc]
        db = Database(f"sqlite:///{tmp_path / 'o.db'}")
        db.migrate()
        db.bell = ringer
        try:
            with pytest.raises(RuntimeError), db.transaction() as s:
                s.add(Project(id=new_id("prj"), name="rolled back", policy="balanced"))
                raise RuntimeError("rolled back")
            assert not pending(other) and not pending(third)

            # Sent before the commit returns, so they are there before the loop runs again.
            add_project(db)
            assert pending(other) and pending(third) and not pending(ringer)
            async with asyncio.timeout(5):
                while heard["other"] == 0 or heard["third"] == 0:
                    await asyncio.sleep(0.005)  # poll interval for the loop's delivery
            # A burst of commits (the loop does not run between them) is heard as one look.
            for _ in range(5):
                add_project(db)
            async with asyncio.timeout(5):
                while heard["other"] < 2:
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # past the gap that merges rings
            assert heard == {"ringer": 0, "other": 2, "third": 2}
        finally:
            for bell in (ringer, other, third):
                bell.close()
            db.dispose()
        assert list(folder.iterdir()) == []  # each closed bell took its socket away

    asyncio.run(scenario())


def test_a_bell_closed_from_a_worker_thread_leaves_the_loop_clean(tmp_path: Path) -> None:
    """A stopping service closes its bell in a worker thread while the loop runs. The reader is
    the loop's: removing it from that thread is not allowed (uvloop's handles), and a ring the loop
    had already picked up then met a closed receiver ("Exception in callback ... AssertionError")."""
    folder = tmp_path / "bells"
    errors: list[dict[str, object]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        mine, other = SocketBell(folder), SocketBell(folder)
        draining, closed = threading.Event(), threading.Event()
        drain = mine._drain
        removed_on: list[bool] = []
        remove_reader = loop.remove_reader

        def drain_after_close() -> None:  # the loop picked up a ring; the close runs first
            draining.set()
            closed.wait(0.5)  # with the close done on the loop, this loop cannot see it yet
            drain()

        def watched_remove_reader(fd: FileDescriptorLike) -> bool:
            removed_on.append(threading.current_thread() is threading.main_thread())
            return remove_reader(fd)

        mine._drain = drain_after_close  # type: ignore[method-assign]
        loop.remove_reader = watched_remove_reader  # type: ignore[method-assign]
        mine.listen(lambda: None)

        def close_in_thread() -> None:
            draining.wait(5)
            mine.close()
            closed.set()

        closer = asyncio.ensure_future(asyncio.to_thread(close_in_thread))
        await asyncio.sleep(0.05)
        other.after_commit()  # a ring waits on mine's socket
        await closer
        await asyncio.sleep(0.05)
        other.close()
        assert removed_on == [True]  # on the loop's own thread

    asyncio.run(scenario())
    assert errors == []
    assert list(folder.iterdir()) == []


def test_a_socket_left_by_a_dead_process_is_removed_at_the_next_ring(tmp_path: Path) -> None:
    folder = tmp_path / "bells"
    folder.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(folder / "dead.sock"))
    dead.close()  # what a killed process leaves behind
    half_made = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    half_made.bind(str(folder / "killed.new"))
    half_made.close()  # a process killed between its bind and its rename
    binding = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    binding.bind(str(folder / "alive.new"))  # another process between its bind and its rename
    (folder / "notes.txt").write_text("not a bell")
    ringer = SocketBell(folder)
    try:
        ringer.after_commit()
    finally:
        ringer.close()
        binding.close()
    assert sorted(p.name for p in folder.iterdir()) == ["alive.new", "notes.txt"]


def test_a_bell_whose_socket_was_removed_binds_again_at_the_next_look(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # An operator clearing locks/ (a restore, a tmp cleaner): every process stayed deaf, back on
    # ORCH_POLL_INTERVAL until a restart, and nothing said so.
    folder = tmp_path / "locks" / "bells"

    async def scenario() -> int:
        heard: list[int] = []
        listener, ringer = SocketBell(folder), SocketBell(folder)
        listener.listen(lambda: heard.append(1))
        try:
            for sock in folder.iterdir():
                sock.unlink()
            folder.rmdir()
            listener.look()  # the timed look, on the loop
            await asyncio.sleep(0.2)
            heard.clear()  # the catch-up look after binding again
            ringer.after_commit()
            for _ in range(50):
                if heard:
                    break
                await asyncio.sleep(0.05)
            listener.look()  # bound: nothing more to do, nor to say
            return len(heard)
        finally:
            listener.close()
            ringer.close()

    with caplog.at_level("WARNING", logger="orchestrator.bells"):
        assert asyncio.run(scenario()) == 1
    assert caplog.text.count("was removed; bound again") == 1


@pytest.mark.parametrize("shared", ["data_dir", "locks", None])
def test_bells_are_writable_by_the_group_the_data_dir_is_shared_with(tmp_path: Path, shared: str | None) -> None:
    """Under the usual umask (022) a socket was its user's alone: a worker running as another user of
    the data dir's group could not ring the service. chmod'ed after the bind, as no umask gives it."""
    data_dir, locks = tmp_path / "data", tmp_path / "data" / "locks"
    mask = os.umask(0o022)
    try:
        locks.mkdir(parents=True)
        if shared is not None:
            (data_dir if shared == "data_dir" else locks).chmod(0o2775)

        async def scenario() -> tuple[int, int]:
            bell = SocketBell(locks / "bells")
            bell.listen(lambda: None)
            try:
                return stat.S_IMODE(bell.folder.stat().st_mode), stat.S_IMODE(bell.path.stat().st_mode)
            finally:
                bell.close()

        folder_mode, socket_mode = asyncio.run(scenario())
    finally:
        os.umask(mask)
    if shared is None:  # the umask's, as before: nobody else was meant to ring
        assert (folder_mode, socket_mode) == (0o755, 0o755)
    else:  # the setgid bit the folder inherits (on Linux) keeps the sockets in the group
        assert folder_mode & 0o775 == 0o775 and socket_mode == 0o775, (oct(folder_mode), oct(socket_mode))
    assert [p.name for p in (locks / "bells").iterdir()] == []  # nothing left under the name bound first


class RefusingSender:
    """A sender whose rings to one socket are refused as another user's socket of mode 0755 refuses
    them (the tests may run as root, whom no mode refuses)."""

    def __init__(self, real: socket.socket, refused: Path) -> None:
        self.real, self.refused = real, str(refused)

    def sendto(self, data: bytes, address: str) -> int:
        if address == self.refused:
            raise PermissionError(13, "Permission denied")
        return self.real.sendto(data, address)

    def close(self) -> None:
        self.real.close()


def test_a_ring_another_user_s_socket_refuses_is_told_once_with_what_to_do(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "locks" / "bells"

    async def scenario() -> None:
        theirs, ours, ringer = SocketBell(folder), SocketBell(folder), SocketBell(folder)
        for bell in (theirs, ours):
            bell.listen(lambda: None)
        ringer._sender = RefusingSender(ringer._sender, theirs.path)  # type: ignore[assignment]
        try:
            for _ in range(3):
                ringer.after_commit()
            assert pending(ours)  # the others are rung all the same
            assert theirs.path.exists()  # a live process's socket: not taken for a dead one's
        finally:
            for bell in (theirs, ours, ringer):
                bell.close()

    with caplog.at_level("WARNING", logger="orchestrator.bells"):
        asyncio.run(scenario())
    told = [r.getMessage() for r in caplog.records if "refuses this process's ring" in r.getMessage()]
    assert len(told) == 1, told
    assert str(folder) in told[0] and "group-writable" in told[0] and "ORCH_POLL_INTERVAL" in told[0]


def test_a_data_dir_too_long_for_a_socket_runs_without_a_bell(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / ("x" * 120) / "bells"

    async def scenario() -> None:
        bell = SocketBell(folder)
        bell.listen(lambda: None)
        bell.after_commit()  # nothing to ring, and no error
        assert bell._receiver is None
        bell.close()

    with caplog.at_level("INFO", logger="orchestrator.bells"):
        asyncio.run(scenario())
    assert "ORCH_POLL_INTERVAL" in caplog.text


def test_each_database_gets_the_bell_that_reaches_its_other_processes(tmp_path: Path) -> None:
    assert isinstance(bell_for(f"sqlite:///{tmp_path / 'o.db'}", tmp_path), SocketBell)
    assert type(bell_for("sqlite:///:memory:", tmp_path)) is Bell
    pg = bell_for("postgresql+psycopg://user:secret@db.example:5433/orch?sslmode=require", tmp_path)
    assert pg.conninfo == ("host='db.example' dbname='orch' user='user' password='secret' port='5433' "  # type: ignore[attr-defined]
                           "sslmode='require'")


def test_a_password_with_a_space_reaches_the_listener_as_it_is() -> None:
    # Rendered back as a URL, libpq refused it, quoting the password in the log every minute, and
    # the process had no bell; a query value's space became "+".
    from psycopg.conninfo import conninfo_to_dict

    from orchestrator.bells import PostgresBell

    bell = PostgresBell("postgresql+psycopg://orch:correct%20horse%27s%5C@db.example/my%20db?application_name=my%20app")
    assert conninfo_to_dict(bell.conninfo) == {"host": "db.example", "dbname": "my db", "user": "orch",
                                               "password": "correct horse's\\", "application_name": "my app"}


def test_a_worker_hears_a_draft_queued_and_a_cancel_asked_through_the_api_server(
        make_settings: SettingsFactory, tmp_path: Path, start_server: Callable[[Settings], httpx.Client]) -> None:
    """With looks at the queue a minute apart, only the bells can move these jobs in time."""
    settings = make_settings(run_jobs=False, poll_interval=NO_POLL)
    client = start_server(settings)
    project = create_project(client)["id"]
    env = {"ORCH_POLL_INTERVAL": str(NO_POLL), "ORCH_LITE_PRELOAD": "true"}
    with worker_process(settings, tmp_path, "worker.log", env=env) as worker:
        # The model is loaded first: the bound below then times the bells, not a loaded machine.
        wait_for_log(tmp_path / "worker.log", "loaded and warm")
        asked = time.monotonic()
        job = submit_draft(client, project, n=2)
        events = read_events(client, job["id"], timeout=30)
        assert time.monotonic() - asked < NO_POLL / 2  # the worker's queue and the server's stream: bells
        kinds = [e.event for e in events]
        assert kinds[:2] == ["queued", "started"] and kinds[-1] == "succeeded", kinds
        assert [e.data["index"] for e in events if e.event == "asset"] == [0, 1]

        slow = submit_draft(client, project, **SLOW)
        wait_for_job(client, slow["id"], ("running",), timeout=30)
        assert client.post(f"/v1/jobs/{slow['id']}/cancel").status_code == 202
        done = wait_for_job(client, slow["id"], TERMINAL, timeout=30)
        assert done["status"] == "canceled" and done["attempts"][-1]["status"] == "canceled", done
        assert done["progress"]["step"] < SLOW["steps"]
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()


def test_a_stopping_service_rings_the_others_when_it_gives_claims_back(make_settings: SettingsFactory) -> None:
    """A claim a stop hands back to the queue is for another worker to run now, not at its next look."""
    services = Services.build(make_settings())
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    folder = services.settings.data_dir / "locks" / "bells"
    folder.mkdir(parents=True, exist_ok=True)
    peer.bind(str(folder / "peer.sock"))
    peer.setblocking(False)
    try:
        job_id = add_job(services)
        [_claim] = services.scheduler._claim_ready({})  # committed; the service stops before it starts
        while True:  # what the submit and the claim rang
            try:
                peer.recv(1)
            except BlockingIOError:
                break
        asyncio.run(services.aclose())
        with services.db.session() as s:
            job = s.get(Job, job_id)
        assert job is not None and job.status == "queued"
        peer.recv(1)  # the give-back rang: raises BlockingIOError if it did not
    finally:
        peer.close()


def test_a_change_between_a_stream_s_first_read_and_its_follow_is_told_at_once(
        make_settings: SettingsFactory) -> None:
    """The stream reads the job's state, then follows it: a worker's commit in between rings a
    follower that watches nothing yet, and must not wait for the next look."""
    services = Services.build(make_settings(poll_interval=NO_POLL))
    job_id = add_job(services)

    async def scenario() -> list[str]:
        bus, follower = services.bus, services.follower
        bus.bind(asyncio.get_running_loop())
        with services.db.session() as s:
            first = s.get(Job, job_id)
        assert first is not None
        catch_up(bus, first, [])  # what the stream read
        with services.db.transaction() as s:  # another process claims it now; its ring finds no stream
            s.execute(update(Job).where(col(Job.id) == job_id).values(status="running", attempt=1,
                                                                      started_at=utcnow()))
        follower.heard()
        follower.follow(job_id)
        seen: list[str] = []
        async with asyncio.timeout(NO_POLL / 2):
            async for event in bus.subscribe(job_id):
                seen.append(event.type)
                if event.type == "started":
                    break
        return seen

    try:
        assert asyncio.run(scenario()) == ["queued", "started"]
    finally:
        asyncio.run(services.aclose())


def test_an_in_memory_database_rings_nobody(tmp_path: Path) -> None:
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:x?mode=memory&uri=true"):
        assert type(bell_for(url, tmp_path)) is Bell, url


@pytest.mark.parametrize("held", [True, False])
def test_a_stopping_service_that_lets_the_device_go_rings_the_others(make_settings: SettingsFactory,
                                                                      held: bool) -> None:
    """Local jobs wait for the device's holder: the others may take it up the moment it is free."""
    services = Services.build(make_settings())
    folder = services.settings.data_dir / "locks" / "bells"
    folder.mkdir(parents=True, exist_ok=True)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(str(folder / "peer.sock"))
    peer.setblocking(False)
    try:
        device = services.scheduler.device
        assert device is not None
        if held:
            assert device.try_acquire()
        asyncio.run(services.aclose())
        try:
            peer.recv(1)
            rang = True
        except BlockingIOError:
            rang = False
        assert rang is held
    finally:
        peer.close()


def test_the_postgresql_listener_connects_as_every_other_connection_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without keepalives, a listener whose database vanished without closing the socket (a
    failover) waited on it forever, its process back on ORCH_POLL_INTERVAL until a restart; and a
    fixed connect_timeout overrode the URL's."""
    import psycopg

    from orchestrator.bells import PostgresBell

    bell = PostgresBell("postgresql+psycopg://orch@db.example:5432/orch?connect_timeout=3")
    asked: list[tuple[str, dict[str, object]]] = []

    def connect(conninfo: str, **kwargs: object) -> None:
        asked.append((conninfo, kwargs))
        bell._stop.set()  # one try is enough
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(psycopg, "connect", connect)
    bell._listen()
    [(conninfo, kwargs)] = asked
    assert conninfo == "host='db.example' dbname='orch' user='orch' port='5432' connect_timeout='3'"
    assert "connect_timeout" not in kwargs  # the URL's, kept in the conninfo
    assert kwargs["autocommit"] is True and kwargs["keepalives"] == 1 and kwargs["keepalives_idle"] == 30
    assert "tcp_keepalives_idle=30" in str(kwargs["options"])  # the server's side notices a vanished listener


def test_a_listener_that_loses_its_database_says_so_in_a_line_and_when_it_listens_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Cut connections (a restart, pg_terminate_backend) were told every 5 s, each in psycopg's
    three-line text, for as long as they lasted, and nothing said when the bell listened again."""
    import psycopg

    from orchestrator import bells
    from orchestrator.bells import PostgresBell

    monkeypatch.setattr(bells, "RECONNECT_SECONDS", 0.0)
    bell = PostgresBell("postgresql+psycopg://orch@db.example:5432/orch")
    tries: list[int] = []

    class Listening:
        def __enter__(self) -> Listening:
            return self

        def __exit__(self, *_: object) -> None:
            return None

        def execute(self, _: str) -> Any:
            return Rows([(0.0,)])

        def notifies(self, timeout: float) -> list[object]:
            bell._stop.set()  # listening again: enough
            return []

    def connect(conninfo: str, **kwargs: object) -> Listening:
        tries.append(1)
        if len(tries) <= 3:
            raise psycopg.OperationalError("server closed the connection unexpectedly\n\tThis probably means")
        return Listening()

    monkeypatch.setattr(psycopg, "connect", connect)
    with caplog.at_level(logging.INFO, logger="orchestrator.bells"):
        bell._listen()
    told = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(tries) == 4 and len(told) == 2, told
    assert told[0][0] == "WARNING" and "server closed the connection unexpectedly" in told[0][1]
    assert "\n" not in told[0][1] and caplog.records[0].exc_info is None
    assert told[1] == ("INFO", "the bell's database connection works again (after 3 failed tries)")


class Rows:
    def __init__(self, rows: list[tuple[object, ...]]) -> None:
        self.rows = rows

    def fetchone(self) -> tuple[object, ...]:
        return self.rows[0]


def test_bells_go_quiet_while_postgresql_s_notification_queue_is_over_half_full(
        caplog: pytest.LogCaptureFixture) -> None:
    """A listener that stopped reading (a SIGSTOPped worker) holds every notification since; the
    queue full, every commit's NOTIFY would fail it, and the service with it."""
    from orchestrator.bells import PostgresBell

    bell = PostgresBell("postgresql+psycopg://orch@db.example:5432/orch")
    usage = [0.7, 0.8, 0.2]

    class Connection:
        def execute(self, sql: str) -> Rows:
            assert sql == "SELECT pg_notification_queue_usage()"
            return Rows([(usage.pop(0),)])

    class Session:
        def __init__(self) -> None:
            self.sent: list[dict[str, object]] = []

        def execute(self, _: object, values: dict[str, object]) -> None:
            self.sent.append(values)

    session = Session()
    with caplog.at_level(logging.INFO, logger="orchestrator.bells"):
        bell.before_commit(session)
        bell._look_at_the_queue(Connection())
        bell.before_commit(session)  # quiet: nothing added to the queue
        bell._look_at_the_queue(Connection())  # still full: told once
        bell.before_commit(session)
        bell._look_at_the_queue(Connection())
        bell.before_commit(session)  # drained: rings again
    assert len(session.sent) == 2
    told = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in told] == ["WARNING", "INFO"], told
    assert "70% full" in told[0][1] and "ORCH_POLL_INTERVAL" in told[0][1]
