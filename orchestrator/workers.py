"""Who runs jobs: lease owners, whether they still live, and which process owns a local device.

Several processes may share one database: API servers that run no jobs (`serve --no-jobs`) and
`orchestrator worker` processes, typically one per GPU. A job's lease names its holder as
`host:pid:scheduler`; from that, another process tells a live holder (ask it to cancel) from a dead
one (recover the job).

A local device runs one pipeline at a time, and two processes that each load the model on one GPU
run out of memory or crawl. So a process runs local jobs only while it holds that device's lock: an
exclusive `flock` on `ORCH_DATA_DIR/locks/<host>-<device>.lock`, taken when it first has a local
job to run and kept for its life (its model stays warm). The kernel drops the lock when the process
dies, however it dies, and another process picks the device up at its next look at the queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def owner_id(scheduler: object) -> str:
    """A lease owner: this host, this process, and the scheduler object within it."""
    return f"{socket.gethostname()}:{os.getpid()}:{id(scheduler):x}"


def owner_alive(owner: str | None, *, other_hosts: bool) -> bool:
    """Whether a lease owner may still be running: another process on this host that exists, or,
    when the database is shared across hosts (PostgreSQL), a process on another host (only its
    lease can tell). This process's own earlier schedulers are gone."""
    host, _, rest = (owner or "").partition(":")
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


def owner_gone(owner: str | None) -> bool:
    """Whether a lease owner is surely dead: another process of this host that no longer exists.
    (Another host's process, or an earlier scheduler of this process, cannot be told from here.)"""
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not owner_alive(owner, other_hosts=False)


def device_key(device: str, environ: dict[str, str] | None = None) -> str:
    """The lock name of a device on this host. Two workers pinned to different GPUs with
    `CUDA_VISIBLE_DEVICES` both see `cuda`: the variable is part of the name."""
    env = os.environ if environ is None else environ
    name = f"{socket.gethostname()}-{device}"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if device.startswith("cuda") and visible:
        name += f"-gpus-{visible}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class DeviceLock:
    """This process's claim on a local device (see the module docstring). Not thread-safe: the
    scheduler's dispatch, which alone takes it, runs one at a time."""

    def __init__(self, folder: Path, device: Callable[[], str]) -> None:
        self.folder = folder
        self._device = device
        self._file: IO[str] | None = None
        self._told_busy = False

    @property
    def held(self) -> bool:
        return self._file is not None

    @property
    def path(self) -> Path:
        """The lock file of this process's device (resolving the device may import torch)."""
        return self.folder / f"{device_key(self._device())}.lock"

    def try_acquire(self) -> bool:
        """Take the device if no other process holds it; True when this process holds it."""
        if self._file is not None:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path
        file = path.open("a+")
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
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file, self._told_busy = file, False
        log.info("this process now runs the local jobs of device lock %s", path)
        return True

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # closing the descriptor drops the flock
            self._file = None
