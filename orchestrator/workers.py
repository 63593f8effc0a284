"""Who runs jobs: lease owners, whether they still live, and which process owns a local device.

Several processes may share one database and one `ORCH_DATA_DIR`: API servers that run no jobs
(`serve --no-jobs`) and `orchestrator worker` processes, typically one per GPU. A job's lease names
its holder as `host:pid:tag`. Whether that holder lives decides what another process does
with its jobs: ask it to cancel, or recover the job.

A host name and a pid cannot tell that across containers (other host names on one machine) or PID
namespaces (the same pid, another process). So each scheduler holds an exclusive `flock` on its
own file, `ORCH_DATA_DIR/locks/owners/<owner>.lock`, for its life: a held lock is a live owner, a
free one a dead or stopped owner, and the kernel drops it however the process ends. A lock only
speaks for owners of the same machine (same kernel boot id): a network filesystem may not pass
flocks between hosts. Other owners (another machine's, or one without a file) are judged by host
name and pid, and on PostgreSQL another host's owner counts as alive: its lease decides.

A local device runs one pipeline at a time, and two processes that each load the model on one GPU
run out of memory or crawl. So a process runs local jobs only while it holds that device's lock,
`ORCH_DATA_DIR/locks/<device>@<machine>.lock` (a GPU named by its UUID when torch knows it; the
machine by its kernel boot id, which containers on it share while their host names differ), taken
when it first has a local job to run and kept until it stops (its model stays warm). Another
process picks the device up at its next look at the queue.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

log = logging.getLogger(__name__)


def owner_id() -> str:
    """A new lease owner: this host, this process, and a random tag (a restarted container may
    get the same host name and pid as the process before it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", name)


def _machine() -> str:
    """This kernel's boot id: processes on one machine (containers included) share it, and only
    their flocks are known to reach each other (a network filesystem may not pass them on)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"host {socket.gethostname()}"


MACHINE = _machine()


def _same_file(file: IO[str], path: Path) -> bool:
    """Whether the open file is still the one at `path` (not unlinked or replaced meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except OSError:
        return False


def open_lock_file(path: Path) -> IO[str]:
    """A lock file, opened for reading and writing (made if absent), never through a symbolic
    link: the lock folder may be shared with other users of the data dir, and a link put there
    would have this process truncate and write the file it names (as root, any file)."""
    return open_regular_file(path, os.O_RDWR | os.O_CREAT, "r+")


def open_lock_file_to_read(path: Path) -> IO[str]:
    """An existing lock file, opened for reading only: one another user's process made (0644 under
    a umask of 022) locks all the same, since flock asks nothing of how its descriptor was opened."""
    return open_regular_file(path, os.O_RDONLY, "r")


def open_regular_file(path: Path, flags: int, mode: str, *, follow: bool = False) -> IO[Any]:
    """`path` opened with `flags` if it is a regular file (`OSError` otherwise), not through a
    symbolic link unless `follow`: the data dir may be shared with other users of its group, and
    a link or a FIFO put there would have this process write or serve the file it names, or wait
    on the FIFO (the sweep, the dispatch, a request) until someone wrote to it."""
    fd = os.open(path, flags | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW), 0o666)  # the umask decides
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class LiveOwner:
    """A scheduler that lives, as its owner file tells it (see `Presence.workers`)."""

    owner: str
    engines: list[str]
    this_machine: bool


class Presence:
    """The owner locks of the schedulers of one data dir (see the module docstring)."""

    def __init__(self, folder: Path, *, shared_database: bool, stale_after: float = 180.0) -> None:
        self.folder = folder / "owners"
        # Judging an owner the locks cannot tell about: on PostgreSQL another host's owner may live.
        self.shared_database = shared_database
        # Seconds after which an owner file its lock cannot speak for (another machine's), and its
        # owner has not touched (`touch`), no longer says that owner runs its engines. Told by
        # whether its modification time changes, never by comparing it with this host's clock.
        self.stale_after = stale_after
        self._seen: dict[str, tuple[float, float]] = {}  # file -> (its mtime, monotonic time first seen)
        self._held: dict[str, IO[str]] = {}
        self._mine: set[str] = set()  # this process's owners, locked or not

    def _path(self, owner: str) -> Path:
        return self.folder / f"{_safe(owner)}.lock"

    def enter(self, owner: str, engines: Iterable[str] = ()) -> None:
        """Mark `owner` (a scheduler of this process) alive until `leave` or the process ends, as
        one that runs jobs of `engines` (see `serves`). Without a usable lock (a filesystem without
        flock) others judge it as owners without a file: by host name and pid, and its lease."""
        self._mine.add(owner)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for _ in range(5):
                file = open_lock_file(self._path(owner))
                try:
                    # Blocking: only a probe (an instant) can hold it, since the name is ours alone.
                    fcntl.flock(file, fcntl.LOCK_EX)
                    if _same_file(file, self._path(owner)):  # not removed by a sweep meanwhile
                        file.seek(0)
                        file.truncate()
                        file.write(f"{owner}\n{MACHINE}\n{','.join(engines)}\n")
                        file.flush()
                        self._held[owner] = file
                        return
                except BaseException:
                    file.close()
                    raise
                file.close()
        except OSError:
            log.exception("cannot hold an owner lock in %s: other processes judge this one by its leases", self.folder)

    def leave(self, owner: str) -> None:
        """The scheduler stopped: its lock is dropped and its file left, so that its jobs (left
        running for recovery) are known to be an orphan's at once."""
        self._mine.discard(owner)
        file = self._held.pop(owner, None)
        if file is not None:
            file.close()

    def _probe(self, owner: str) -> Literal["held", "free", "elsewhere", "unknown"]:
        """What the owner's lock file says: its lock held or free (an owner of this machine), an
        owner of another machine ("elsewhere": its file names another boot id), or nothing (no
        file, or a lock that cannot be probed)."""
        if owner in self._held:
            return "held"
        try:
            with open_lock_file_to_read(self._path(owner)) as file:
                lines = file.read().splitlines()
                if len(lines) < 2:
                    return "unknown"
                if lines[1] != MACHINE:
                    return "elsewhere"
                try:
                    fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return "held"
                return "free"  # closing the file drops the probe's lock
        except OSError:
            return "unknown"

    def _locked(self, owner: str) -> bool | None:
        """True when the owner's lock is held, False when it is free, None when the locks cannot
        tell: no file, an owner of another machine, or a lock that cannot be probed."""
        return {"held": True, "free": False}.get(self._probe(owner))

    def alive(self, owner: str | None) -> bool:
        """Whether the owner may still be running (and may be paying for its job)."""
        if not owner:
            return False
        if owner in self._mine:
            return True
        probe = self._probe(owner)
        if probe == "elsewhere":
            # Another machine's, whatever its host name says: two hosts may share one (containers
            # given the same hostname, cloned VMs), and its pid means nothing here.
            return self.shared_database
        return probe == "held" if probe != "unknown" else _pid_alive(owner, other_hosts=self.shared_database)

    def locked(self, owner: str | None) -> bool:
        """Whether the owner is of this machine and its lock is held: it lives, whatever its lease
        says (a lease is only a clock's word)."""
        if not owner:
            return False
        return self._locked(owner) is True

    def gone(self, owner: str | None) -> bool:
        """Whether the owner is surely dead or stopped, so its jobs need not wait out the lease."""
        if not owner or owner in self._mine:
            return False
        probe = self._probe(owner)
        if probe == "elsewhere":
            return False  # only its lease can tell
        return probe == "free" if probe != "unknown" else _pid_gone(owner)

    def touch(self, owner: str) -> None:
        """Say that `owner` still lives to processes its lock cannot speak to (another machine's)."""
        if owner in self._held:
            with contextlib.suppress(OSError):
                os.utime(self._path(owner))

    def serves(self, engine: str) -> bool:
        """Whether another owner that lives runs jobs of `engine`: workers need not all have the
        same engines (a plugin installed on the GPU hosts only), and a job is failed for an engine
        nobody has, not for one this process lacks. An owner of this machine lives while its lock
        is held; another machine's while it touches its file (a host that is gone leaves it)."""
        return any(live.owner not in self._mine and engine in live.engines for live in self.workers())

    def _fresh(self, path: Path) -> bool:
        """Whether the file was touched within `stale_after` seconds, by this process's clock: a
        file first seen counts as fresh that long (its owner may have just touched it)."""
        mtime, now = path.stat().st_mtime, time.monotonic()
        seen = self._seen.get(path.name)
        if seen is None or seen[0] != mtime:
            self._seen[path.name] = (mtime, now)
            return True
        return now - seen[1] < self.stale_after

    def live(self) -> list[str]:
        """The owners of this machine whose lock is held now, as their files name them."""
        owners = []
        for path in sorted(self.folder.glob("*.lock")) if self.folder.is_dir() else []:
            with contextlib.suppress(OSError), open_lock_file_to_read(path) as file:
                owner = file.read().partition("\n")[0].strip()
                if owner and self._locked(owner):
                    owners.append(owner)
        return owners

    def workers(self) -> list[LiveOwner]:
        """Every owner that lives, as `serves` judges them: this machine's while their lock is held,
        another machine's (a shared data dir) while they touch their file, with the engines they run."""
        found = []
        for path in sorted(self.folder.glob("*.lock")) if self.folder.is_dir() else []:
            lines: list[str] = []  # a file removed meanwhile (a stopped owner's) is none
            with contextlib.suppress(OSError), open_lock_file_to_read(path) as file:
                lines = file.read().splitlines()
            if not lines or not (owner := lines[0].strip()):
                continue
            with contextlib.suppress(OSError):
                locked = self._locked(owner)
                if locked if locked is not None else self._fresh(path):
                    engines = [e for e in lines[2].split(",") if e] if len(lines) > 2 else []
                    found.append(LiveOwner(owner, engines, this_machine=len(lines) < 2 or lines[1] == MACHINE))
        return found

    def forget(self, keep: Iterable[str]) -> int:
        """Remove this machine's files of stopped owners that hold no job any more (`keep`: owners
        of running jobs); returns how many."""
        kept = {f"{_safe(owner)}.lock" for owner in keep} | {self._path(owner).name for owner in self._held}
        removed = 0
        for path in self.folder.glob("*.lock") if self.folder.is_dir() else []:
            if path.name in kept:
                continue
            with contextlib.suppress(OSError), open_lock_file_to_read(path) as file:
                if file.read().splitlines()[1:2] != [MACHINE]:
                    continue  # another machine's lock tells this one nothing
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live owner that has not claimed a job yet
                if _same_file(file, path):
                    path.unlink()
                    removed += 1
        return removed


def _pid_alive(owner: str, *, other_hosts: bool) -> bool:
    """For an owner without a lock file: another process of this host that exists, or a process
    of another host when the database is shared (only its lease can tell then). This process's
    own earlier schedulers are gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if not host or not pid.isdigit():
        return False
    if host != socket.gethostname():
        return other_hosts
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_gone(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not _pid_alive(owner, other_hosts=False)


def device_key(device: str, environ: dict[str, str] | None = None) -> str:
    """The lock name of a device of this machine. `device` names a GPU by its UUID when torch knows
    it (see `tiers._local.LocalRuntime.device_identity`); a bare `cuda` is whatever GPU
    `CUDA_VISIBLE_DEVICES` shows first, so that variable is part of the name."""
    env = os.environ if environ is None else environ
    name = device
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if device == "cuda":
        name += f"-gpus-{visible.split(',')[0].strip()}" if visible else "-gpus-0"
    return _safe(f"{name}@{hashlib.sha256(MACHINE.encode()).hexdigest()[:12]}")


class DeviceLock:
    """This process's claim on a local device (see the module docstring). Taken by the scheduler's
    dispatch thread and by a preload (ORCH_LITE_PRELOAD), one at a time."""

    def __init__(self, folder: Path, device: Callable[[], str]) -> None:
        self.folder = folder
        self._device = device
        self._file: IO[str] | None = None
        self._told_busy = False
        self._told_unusable = False
        self._closed = False
        # Two descriptors of one process conflict like two processes: takers go one at a time.
        self._taking = threading.Lock()
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"  # the scheduler names itself here

    @property
    def held(self) -> bool:
        return self._file is not None

    @property
    def path(self) -> Path:
        """The lock file of this process's device (resolving the device may import torch)."""
        return self.folder / f"{device_key(self._device())}.lock"

    def try_acquire(self) -> bool:
        """Take the device if no other process holds it; True when this process holds it."""
        with self._taking:
            if self.held:
                return True
            if self._closed:
                return False  # stopping: a dispatch still in flight must not take the device again
            return self._take_or_go_without()

    def _take_or_go_without(self) -> bool:
        try:
            return self._take()
        except Exception:
            # No lock file can be opened at all (a data dir nobody may write to, a device that
            # cannot be named): run this dispatch's local jobs as a single process would rather
            # than never run them, and try again at the next one (the cause may pass, and until
            # the lock is ours, another worker that has it must be seen).
            if not self._told_unusable:
                log.exception("the device lock cannot be used; this process runs local jobs without it "
                              "and tries again at each look at the queue")
                self._told_unusable = True
            return True

    def _take(self) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path
        try:
            file = open_lock_file(path)
            writable = True
        except OSError as exc:
            if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
                raise
            # Made by another user's worker, or on a read-only mount: locked read-only all the same
            # (going without, this process ran its local jobs beside the holder, on the same GPU).
            file = open_lock_file_to_read(path)
            writable = False
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self._told_busy:
                file.seek(0)
                holder = file.read().strip() or "another process"
                log.info("device lock %s is held by %s: local jobs are left to it", path, holder)
                self._told_busy = True
            file.close()
            return False
        except BaseException:
            file.close()
            raise
        if self._closed:  # the service stopped while this was being taken (a preload thread)
            file.close()
            return False
        if writable:  # read-only, the file keeps naming an earlier holder (`device_holders`)
            file.seek(0)
            file.truncate()
            file.write(f"{self.holder}\n")
            file.flush()
        self._file, self._told_busy, self._told_unusable = file, False, False
        log.info("this process now runs the local jobs of device lock %s", path)
        return True

    def close(self, *, release: bool = True) -> None:
        """Take the device no more; with `release`, let it go now. Release only once the device is
        idle (the inference thread has stopped and the model is dropped), or another process loads
        its model beside this one's; without, the lock goes when the process ends."""
        self._closed = True
        if release and self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # closing the descriptor drops the flock
            self._file = None


def device_holders(folder: Path) -> dict[str, str]:
    """Device lock name -> the owner that holds it, for the devices held now."""
    held = {}
    for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        with contextlib.suppress(OSError), open_lock_file_to_read(path) as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held[path.stem] = file.read().strip()
    return held
