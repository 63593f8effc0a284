"""The data dir's free-space reserve (`ORCH_MIN_FREE_DISK_MB`).

A cloud engine's images made while the disk holding the assets folder is full cannot be stored,
and their job fails `storage_full`, charged as made: the studio paid for images it never got. So
a job is refused at its submit while the disk is below the reserve (`JobService.submit`), a
paid job claimed since is failed before its first request to the provider, unsent and uncharged
(`JobRunner._refuse_if_no_room`), and a local one before it renders, which would hold the device
for minutes on images that could not be stored (`JobRunner._refuse_local_if_no_room`).

The free space is read at each of those (a `statvfs`, a few microseconds), never cached: a disk
freed by its operator takes jobs again at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 2**20
SETTING = "ORCH_MIN_FREE_DISK_MB"


def free_bytes(folder: Path) -> int:
    """What the service's user may still write on the filesystem holding `folder`: `f_bavail`, not
    `f_bfree`, whose blocks reserved for root (5% of an ext4 disk) the service cannot use."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class DiskReserve:
    folder: Path
    min_free_mb: int

    @property
    def off(self) -> bool:
        """`ORCH_MIN_FREE_DISK_MB=0`: nothing is read, and a job's path takes no thread's hop for it."""
        return self.min_free_mb <= 0

    def shortfall(self) -> int | None:
        """The free bytes when they are below the reserve; None when there is room, the reserve is
        off (0), or the free space cannot be read: the store's own write then says what is wrong,
        where refusing every job would hide it behind a figure nobody read."""
        if self.off:
            return None
        try:
            free = free_bytes(self.folder)
        except OSError as exc:
            log.warning("the free space of %s cannot be read (%s): jobs are taken without the %s check",
                        self.folder, exc.strerror or exc, SETTING)
            return None
        return free if free < self.min_free_mb * MIB else None

    def said(self, free: int) -> str:
        """The shortfall in words, naming the setting (the folder's path is the server's, not said)."""
        return (f"the data dir's disk has {free // MIB} MiB free, less than the {self.min_free_mb} MiB "
                f"{SETTING} keeps free for the images of the jobs it takes")

    def details(self, free: int) -> dict[str, int]:
        return {"free_mb": free // MIB, "min_free_mb": self.min_free_mb}
