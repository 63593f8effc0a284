"""Per-project storage quotas (`storage_quota_mb`, set by the admin key on a project).

A project's usage is the bytes of its live assets' files: each asset counts the size of its PNG
(`Asset.bytes`), even where identical images share one file in the store (a seed made again, a
cache hit's copy), as each is the project's to keep or delete. It is kept on the project's row
(`Project.storage_bytes`) by the transactions that add assets (a job's end, a cache hit's copies)
and delete them (`DELETE /v1/assets/{id}`, draft retention): a submit reads one row where a sum
over a large project's assets read every one of them. Every write transaction holds the
database's write lock (`Database.transaction`), so two of them never change it from the same reading.

A submit at or over the quota is refused (`JobService.submit`: 507 `storage_quota_exceeded`),
before anything is held or written, as one below `ORCH_MIN_FREE_DISK_MB` is. A job already taken
may finish over it: its images are made (and paid for) by then, and losing them would waste the
spend. Assets stored before sizes were kept (migration 0029) count nothing until `measure` has
read their files' sizes, which the service's asset sweep does at start and then hourly.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict

from sqlalchemy import bindparam, func, update
from sqlmodel import Session, SQLModel, col, select

from orchestrator.db import Database
from orchestrator.errors import StorageQuotaExceeded
from orchestrator.models import Asset, Project
from orchestrator.store import SHA_RE, ArtifactStore

log = logging.getLogger(__name__)

MIB = 2**20
SETTING = "ORCH_PROJECT_STORAGE_QUOTA_MB"
# Assets measured per write transaction: each holds the write lock for a few milliseconds.
MEASURE_BATCH = 500


def quota_mb(project: Project, default_mb: int) -> int | None:
    """The quota in force, in MiB: the project's own, else the server's `ORCH_PROJECT_STORAGE_QUOTA_MB`
    (`default_mb`, 0: none); None: no quota."""
    if project.storage_quota_mb is not None:
        return project.storage_quota_mb
    return default_mb or None


def quota_bytes(project: Project, default_mb: int) -> int | None:
    mb = quota_mb(project, default_mb)
    return None if mb is None else mb * MIB


def refuse_if_over(project: Project, default_mb: int) -> None:
    """`StorageQuotaExceeded` when the project's live assets hold its quota or more. Read from the
    row as locked by the submit's transaction, so concurrent submits see each other's assets."""
    quota = quota_bytes(project, default_mb)
    if quota is None or project.storage_bytes < quota:
        return
    whose = "its storage quota" if project.storage_quota_mb is not None else f"the storage quota {SETTING} sets"
    raise StorageQuotaExceeded(
        f"project '{project.id}' stores {_mib(project.storage_bytes)} MiB of assets, at or over {whose} of "
        f"{quota // MIB} MiB: nothing was made or held; delete some of its assets, or ask the admin for a larger "
        "quota (`storage_quota_mb`)",
        details={"project_id": project.id, "used_bytes": project.storage_bytes, "quota_bytes": quota})


def _mib(amount: int) -> str:
    return f"{amount / MIB:.1f}".removesuffix(".0")


def change_usage(s: Session, by_project: dict[str, int], sign: int) -> None:
    """Add (`sign` 1) or take away (-1) each project's bytes, in the caller's write transaction."""
    for project_id, amount in by_project.items():
        if amount:
            s.execute(update(Project).where(col(Project.id) == project_id)
                      .values(storage_bytes=col(Project.storage_bytes) + sign * amount))


def add_assets(s: Session, rows: list[Asset]) -> None:
    """Add new live asset rows to `s`, counted in their projects' usage in the same transaction:
    every path that stores assets (a job's end, a cache hit's copies) adds them here, so none
    stores one its project's usage misses."""
    s.add_all(rows)
    by_project: dict[str, int] = defaultdict(int)
    for row in rows:
        by_project[row.project_id] += row.bytes or 0
    change_usage(s, by_project, 1)


def deleted(s: Session, asset_ids: list[str]) -> None:
    """Assets just marked deleted in this transaction: taken out of their projects' usage."""
    if not asset_ids:
        return
    sums = s.exec(select(col(Asset.project_id), func.coalesce(func.sum(col(Asset.bytes)), 0))
                  .where(col(Asset.id).in_(asset_ids)).group_by(col(Asset.project_id)))
    change_usage(s, {project_id: int(amount or 0) for project_id, amount in sums}, -1)


def file_size(store: ArtifactStore, sha256: str) -> int:
    """The size of the file the asset names; 0 when there is none (missing, a malformed name):
    a file that is not there takes no room, and a restored one is counted when its asset is next made."""
    if not SHA_RE.fullmatch(sha256):  # a row mended by hand: it names no file
        return 0
    try:
        return os.stat(store.path_for(sha256)).st_size
    except (OSError, ValueError):  # ValueError: a NUL in a path mended by hand
        return 0


def measure(db: Database, store: ArtifactStore, *, batch: int = MEASURE_BATCH,
            stop: threading.Event | None = None) -> int:
    """Read the size of the files of the assets stored before sizes were kept (null `bytes`), and
    add the live ones to their projects' usage; how many it measured. The files are read outside
    the write lock; each batch's rows are then written only where still null (another process's
    sweep may have measured them meanwhile), in one transaction with the usage they add. A row
    deleted between the two is given its size, and adds nothing: its delete took out its null as 0."""
    stop = stop or threading.Event()
    measured = 0
    after = ""
    while not stop.is_set():
        with db.session() as s:
            found = list(s.exec(select(col(Asset.id), col(Asset.sha256)).where(
                col(Asset.bytes).is_(None), col(Asset.id) > after).order_by(col(Asset.id)).limit(batch)))
        if not found:
            return measured
        sizes = {asset_id: file_size(store, sha256) for asset_id, sha256 in found}
        with db.transaction() as s:
            by_project: dict[str, int] = defaultdict(int)
            rows = list(s.exec(select(col(Asset.id), col(Asset.project_id), col(Asset.deleted_at)).where(
                col(Asset.id).in_(list(sizes)), col(Asset.bytes).is_(None))))
            if rows:
                # One statement run for each row (executemany): an ORM update a row cost 0.8 ms,
                # 15 s for 20,000 assets.
                table = SQLModel.metadata.tables["assets"]
                s.connection().execute(
                    update(table).where(table.c.id == bindparam("asset_id")).values(bytes=bindparam("size")),
                    [{"asset_id": asset_id, "size": sizes[asset_id]} for asset_id, _, _ in rows])
            for asset_id, project_id, deleted_at in rows:
                if deleted_at is None:
                    by_project[project_id] += sizes[asset_id]
            change_usage(s, by_project, 1)
            measured += len(rows)
        after = found[-1][0]
        if len(found) < batch:
            break
    if measured:
        log.info("measured the files of %d assets stored before their sizes were kept: their projects' storage "
                 "usage counts them now", measured)
    return measured
