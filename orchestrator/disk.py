"""The data dir's free-space reserve (`ORCH_MIN_FREE_DISK_MB`).

A cloud engine's images made while the disk holding the assets folder is full cannot be stored,
and their job fails `storage_full`, charged as made: the studio paid for images it never got. So
a job is refused at its submit while the disk is below the reserve (`JobService.submit`), a
remote job claimed since (a paid one, or a self-hosted server's) is failed before its first
request, unsent and uncharged (`JobRunner._refuse_if_no_room`), and a local one before it renders,
which would hold the device for minutes on images that could not be stored
(`JobRunner._refuse_local_if_no_room`).

The free space is read at each of those (a `statvfs`, a few microseconds), never cached: a disk
freed by its operator takes jobs again at once. One that cannot be read refuses nothing (see
`DiskReserve.shortfall`), and is warned of once, then once a minute while it lasts: every submit
under load warned anew.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.outage import REMIND_SECONDS

log = logging.getLogger(__name__)

MIB = 2**20
SETTING = "ORCH_MIN_FREE_DISK_MB"


def free_bytes(folder: Path) -> int:
    """What the service's user may still write on the filesystem holding `folder`: `f_bavail`, not
    `f_bfree`, whose blocks reserved for root (5% of an ext4 disk) the service cannot use."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


@dataclass(eq=False)
class DiskReserve:
    folder: Path
    min_free_mb: int
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    # When a failed reading was last warned of (None: none yet), kept after a success: a reading
    # that fails every other time warned, and told its recovery, at each pair of submits.
    _warned_at: float | None = field(default=None, init=False, repr=False)
    _unwarned: int = field(default=0, init=False, repr=False)  # failed readings since that warning
    _failing: bool = field(default=False, init=False, repr=False)  # whether the last reading failed
    _recovery_told: bool = field(default=True, init=False, repr=False)  # since that warning
    # Submits read it from the request threads at once: one warning, not one each.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def off(self) -> bool:
        """`ORCH_MIN_FREE_DISK_MB=0`: nothing is read, and a job's path takes no thread's hop for it."""
        return self.min_free_mb <= 0

    def shortfall(self) -> int | None:
        """The free bytes when they are below the reserve; None when there is room, the reserve is
        off (0), or the free space cannot be read: the job is then taken as though there were room,
        and the store's own write says what is wrong, where refusing every job would hide it behind
        a figure nobody read. A reading that fails is warned of once, then once a minute while
        none succeeds (each failed submit warned, hundreds a second under load), and a success
        after it is told once; one that fails at times only is told of once a minute too."""
        if self.off:
            return None
        try:
            free = free_bytes(self.folder)
        except OSError as exc:
            self._unreadable(exc)
            return None
        if self._failing:  # one attribute's read on the path with room
            self._readable()
        return free if free < self.min_free_mb * MIB else None

    def _unreadable(self, exc: OSError) -> None:
        with self._lock:
            now = self.clock()
            failing, self._failing = self._failing, True
            if self._warned_at is not None and now - self._warned_at < REMIND_SECONDS:
                self._unwarned += 1
                return
            unwarned = self._unwarned
            self._warned_at, self._unwarned, self._recovery_told = now, 0, False
        if failing:
            log.warning("the free space of %s still cannot be read (%s; %d more failed readings since the last "
                        "warning): jobs are taken without the %s check", self.folder, exc.strerror or exc, unwarned,
                        SETTING)
        elif unwarned:  # some readings between failed, some not
            log.warning("the free space of %s cannot be read at times (%s; %d more failed readings since the last "
                        "warning): jobs are taken without the %s check then", self.folder, exc.strerror or exc,
                        unwarned, SETTING)
        else:
            log.warning("the free space of %s cannot be read (%s): jobs are taken without the %s check",
                        self.folder, exc.strerror or exc, SETTING)

    def _readable(self) -> None:
        with self._lock:
            if not self._failing:
                return
            told, self._failing, self._recovery_told = self._recovery_told, False, True
        if not told:  # once a warning: a reading failing at times is told of once a minute, as its warnings
            log.info("the free space of %s can be read again: jobs are checked against %s again", self.folder,
                     SETTING)

    def said(self, free: int) -> str:
        """The shortfall in words, naming the setting (the folder's path is the server's, not said)."""
        return (f"the data dir's disk has {free // MIB} MiB free, less than the {self.min_free_mb} MiB "
                f"{SETTING} keeps free for the images of the jobs it takes")

    def details(self, free: int) -> dict[str, int]:
        return {"free_mb": free // MIB, "min_free_mb": self.min_free_mb}
