"""Per-project storage quotas (`storage_quota_mb`, set by the admin key on a project).

A project's usage is the bytes of its live assets' files: each asset counts the size of its PNG
(`Asset.bytes`), even where identical images share one file in the store (a seed made again, a
cache hit's copy), as each is the project's to keep or delete. It is kept on the project's row
(`Project.storage_bytes`) by the transactions that add assets (a job's end, a cache hit's copies)
and delete them (`DELETE /v1/assets/{id}`, draft retention): a submit reads one row where a sum
over a large project's assets read every one of them. Every write transaction holds the
database's write lock (`Database.transaction`), so two of them never change it from the same reading.

A submit is refused (`JobService.submit`: 507 `storage_quota_exceeded`), before anything is held
or written, as one below `ORCH_MIN_FREE_DISK_MB` is, when the project's stored bytes, the most its
unfinished jobs can still store and the most this job can store together pass the quota: a
project cannot pass it by what its queued jobs make. The most a job can store (`job_bound`) is
kept on its row at submit (`Job.reserved_bytes`), so what the unfinished ones hold back is one
sum over the few entries of `ix_jobs_project_status`, which holds the column (`unfinished`). An
upper bound, not an estimate: what an image's PNG takes depends on its pixels, unknown until it is
made. Assets stored before sizes were kept (migration 0029) count nothing until `measure` has
read their files' sizes, which the service's asset sweep does at start and then hourly; jobs taken
before migration 0030 hold nothing back.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import defaultdict
from typing import Any

from sqlalchemy import bindparam, func, update
from sqlmodel import Session, SQLModel, col, select

from orchestrator.db import Database
from orchestrator.errors import StorageQuotaExceeded
from orchestrator.models import Asset, Job, Project
from orchestrator.store import MAX_ICC_BYTES, SHA_RE, ArtifactStore
from tiers.base import Engine, RenderRequest

log = logging.getLogger(__name__)

MIB = 2**20
SETTING = "ORCH_PROJECT_STORAGE_QUOTA_MB"
# Assets measured per write transaction: each holds the write lock for a few milliseconds.
MEASURE_BATCH = 500
MISSING_NAMED = 5  # asset ids a warning of missing files names; `orchestrator check` lists them all

# What one stored PNG can take (`image_bound`), from what `store.encode_png` writes through Pillow:
# the signature, IHDR and IEND; the pixels 4 bytes each (an engine's alpha is kept: RGBA; 3, RGB,
# for an engine whose images are opaque) behind
# one filter byte a row; zlib's stream over them; one IDAT chunk per `PIL_BUFSIZE` of it; the
# two text chunks, `parameters` (tEXt, or iTXt where it is not latin-1) and the JSON record (iTXt);
# and the colour profile an engine's image may carry (iCCP: its name, 2 bytes, the profile deflated).
PNG_FIXED = 8 + 25 + 12
CHUNK_OVERHEAD = 12  # length, type, CRC
PIL_BUFSIZE = 2**16  # `PIL.ImageFile.MAXBLOCK`: each encoder call's output is written as one IDAT
# Pillow's encoder buffer is at least 4 bytes a pixel of a row, whatever the mode (`ImageFile._save`).
PIL_ROW_BYTES = 4
BYTES_PER_PIXEL = 4
# An opaque engine's images (`opaque_images`): RGB (a grey one is stored RGB), and no colour profile.
OPAQUE_BYTES_PER_PIXEL = 3
# Each text chunk's header, its keyword and the iTXt fields after it (flags, language, translated keyword).
TEXT_CHUNK_HEADER = CHUNK_OVERHEAD + len("orchestrator") + 5
# The record's fields other than the prompts, in both chunks: the engine, model, sampler and
# upscaler names (100, 300, 100, 100 characters at most, up to 12 bytes each as JSON escapes them),
# the numbers and keys, and the service's notes (a sentence each). An engine's own notes or sampler
# settings have no cap: a plugin writing more than this passes the bound by the difference.
RECORD_ALLOWANCE = 32 * 2**10


def quota_mb(project: Project, default_mb: int) -> int | None:
    """The quota in force, in MiB: the project's own, else the server's `ORCH_PROJECT_STORAGE_QUOTA_MB`
    (`default_mb`, 0: none); None: no quota."""
    if project.storage_quota_mb is not None:
        return project.storage_quota_mb
    return default_mb or None


def quota_bytes(project: Project, default_mb: int) -> int | None:
    mb = quota_mb(project, default_mb)
    return None if mb is None else mb * MIB


def deflate_bound(size: int) -> int:
    """The most zlib's stream of `size` bytes takes: zlib's own `deflateBound` for the parameters
    Pillow sets (memLevel 9, not the default 8, so the conservative bound: fixed Huffman codes of
    9-bit literals, 1/8 over, which is also above zlib-ng's, Pillow's zlib since 11.0) and its
    2-byte header and 4-byte checksum. Python's zlib does not export it."""
    return size + (size >> 3) + (size >> 8) + (size >> 9) + 4 + 6


ICC_CHUNK = CHUNK_OVERHEAD + len("ICC Profile") + 2 + deflate_bound(MAX_ICC_BYTES)


def image_bound(width: int, height: int, text_bytes: int, *, opaque: bool = False) -> int:
    """The most a stored PNG of `width` x `height` pixels takes, with `text_bytes` of metadata text.
    `opaque`: an image with no alpha channel and no colour profile (an `opaque_images` engine's),
    3 bytes a pixel and no iCCP chunk, where any other engine's may carry both."""
    per_pixel = OPAQUE_BYTES_PER_PIXEL if opaque else BYTES_PER_PIXEL
    stream = deflate_bound(height * (1 + per_pixel * width))
    # An encoder call may return less than its buffer: one more chunk than the whole ones.
    idats = math.ceil(stream / max(PIL_BUFSIZE, PIL_ROW_BYTES * width)) + 1
    profile = 0 if opaque else ICC_CHUNK
    return PNG_FIXED + stream + idats * CHUNK_OVERHEAD + 2 * TEXT_CHUNK_HEADER + text_bytes + profile


def text_bound(params: dict[str, Any]) -> int:
    """The most both text chunks of an image of a job with these params take: the prompts twice,
    each as JSON escapes it (at least what its UTF-8 takes in the infotext), and `RECORD_ALLOWANCE`."""
    prompts = sum(len(json.dumps(str(params.get(key) or ""))) for key in ("prompt", "negative_prompt"))
    return 2 * prompts + RECORD_ALLOWANCE


def output_size(engine: Engine | None, request: RenderRequest) -> tuple[int, int]:
    """The largest image the engine returns for the request: what its `largest_size` says, where it
    has one (an engine whose provider picks the size), else the size asked (the service's own
    engines make that; an engine that knows no bound of its provider's is taken at its word)."""
    largest = getattr(engine, "largest_size", None)
    if callable(largest):
        width, height = largest(request)
        return int(width), int(height)
    return request.width, request.height


def opaque(engine: Engine | None) -> bool:
    """Whether the engine's images never carry an alpha channel or a colour profile: a built-in's
    `opaque_images` (the local engines', whose images are diffusers' RGB output). A plugin's is
    not taken at its word (`tiers.guard.ThirdParty` answers False), nor an unknown engine's."""
    return getattr(engine, "opaque_images", False) is True


def job_bound(engine: Engine | None, request: RenderRequest, params: dict[str, Any]) -> int:
    """The most a job's images can take in the store: its `n` images (1 for a bridge or a polish,
    whose size is the one it asked, its scale applied) at the largest size its engine returns."""
    width, height = output_size(engine, request)
    return request.n * image_bound(width, height, text_bound(params), opaque=opaque(engine))


def held(s: Session, project: Project, default_mb: int) -> int:
    """The bytes the project's unfinished jobs may still store (see `held_by`)."""
    return held_by(s, [project], default_mb).get(project.id, 0)


def held_by(s: Session, projects: list[Project], default_mb: int) -> dict[str, int]:
    """The bytes each project's unfinished jobs may still store, where a quota is in force (none
    where none is: nothing to judge, so nothing read)."""
    judged = [p.id for p in projects if quota_bytes(p, default_mb) is not None]
    return {project_id: amount for project_id, (_, amount) in unfinished(s, judged).items()} if judged else {}


def unfinished(s: Session, project_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Each project's unfinished (queued, running) jobs: how many, and the bytes they may still
    store; none for a project without any. Read from `ix_jobs_project_status` alone (a project has
    `ORCH_MAX_PENDING_JOBS` of them at most), once for both a submit's pending limit and its quota:
    each statement cost it about 0.35 ms on SQLite."""
    rows = s.exec(select(col(Job.project_id), func.count(), func.coalesce(func.sum(col(Job.reserved_bytes)), 0))
                  .where(col(Job.project_id).in_(project_ids), col(Job.status).in_(("queued", "running")))
                  .group_by(col(Job.project_id)))
    return {project_id: (int(count), int(amount or 0)) for project_id, count, amount in rows}


def refuse_if_over(project: Project, default_mb: int, reserved: int = 0, bound: int = 0) -> None:
    """`StorageQuotaExceeded` when the project's live assets hold its quota or more, or when they,
    what its unfinished jobs may still store (`reserved`, see `held`) and a new job's `bound` pass
    it. Read from the row as locked by the submit's transaction, so concurrent submits see each
    other's assets and jobs."""
    quota = quota_bytes(project, default_mb)
    used = project.storage_bytes
    if quota is None or (used < quota and used + reserved + bound <= quota):
        return
    whose = "its storage quota" if project.storage_quota_mb is not None else f"the storage quota {SETTING} sets"
    said = f"stores {_mib(used)} MiB of assets, at or over {whose} of {quota // MIB} MiB" if used >= quota else (
        f"stores {_mib(used)} MiB of assets and its unfinished jobs may store {_mib(reserved)} MiB more: with "
        f"the {_mib(bound)} MiB this job's images may take, that is over {whose} of {quota // MIB} MiB")
    raise StorageQuotaExceeded(
        f"project '{project.id}' {said}: nothing was made or held; delete some of its assets, wait for or "
        "cancel its unfinished jobs, or ask the admin for a larger quota (`storage_quota_mb`)",
        details={"project_id": project.id, "used_bytes": used, "quota_bytes": quota, "reserved_bytes": reserved,
                 "job_bound_bytes": bound})


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


def file_size(store: ArtifactStore, sha256: str) -> int | None:
    """The size of the file the asset names, or of its copy a sweep that stopped mid-way set aside
    (served from there, and put back by the next sweep: it was counted 0 for good); None when there
    is none (missing, unreadable); 0 for a malformed sha256, which names no file."""
    if not SHA_RE.fullmatch(sha256):  # a row mended by hand: it names no file
        return 0
    return store.size_of(sha256)


def measure(db: Database, store: ArtifactStore, *, batch: int = MEASURE_BATCH,
            stop: threading.Event | None = None, told: set[str] | None = None) -> int:
    """Read the size of the files of the assets stored before sizes were kept (null `bytes`), and
    add the live ones to their projects' usage; how many it measured. The files are read outside
    the write lock; each batch's rows are then written only where still null (another process's
    sweep may have measured them meanwhile), in one transaction with the usage they add. A row
    deleted between the two is given its size, and adds nothing: its delete took out its null as 0.

    A live asset whose file is missing is left unmeasured (counted as 0, as a null is), and measured
    by a later sweep once its file is restored: given 0, its project's usage stayed short of the
    restored file, and `orchestrator check` asked for both to be corrected by hand. A deleted one's
    is given 0 (its file swept, most likely): it counts nothing either way.

    `told`: the assets whose missing file this process has warned of already (the service's
    sweeps share one), each warned of once: every hourly sweep warned again of files lost for good,
    burying new warnings. Bounded by the assets stored before 0029: none is added since."""
    stop = stop or threading.Event()
    measured = 0
    missing: list[str] = []
    after = ""
    while not stop.is_set():
        with db.session() as s:
            found = list(s.exec(select(col(Asset.id), col(Asset.sha256)).where(
                col(Asset.bytes).is_(None), col(Asset.id) > after).order_by(col(Asset.id)).limit(batch)))
        if not found:
            break
        sizes = {asset_id: file_size(store, sha256) for asset_id, sha256 in found}
        with db.transaction() as s:
            by_project: dict[str, int] = defaultdict(int)
            rows = []
            for asset_id, project_id, deleted_at in s.exec(
                    select(col(Asset.id), col(Asset.project_id), col(Asset.deleted_at)).where(
                        col(Asset.id).in_(list(sizes)), col(Asset.bytes).is_(None))):
                if sizes[asset_id] is None and deleted_at is None:
                    missing.append(asset_id)
                else:
                    rows.append((asset_id, project_id, deleted_at))
            if rows:
                # One statement run for each row (executemany): an ORM update a row cost 0.8 ms,
                # 15 s for 20,000 assets.
                table = SQLModel.metadata.tables["assets"]
                s.connection().execute(
                    update(table).where(table.c.id == bindparam("asset_id")).values(bytes=bindparam("size")),
                    [{"asset_id": asset_id, "size": sizes[asset_id] or 0} for asset_id, _, _ in rows])
            for asset_id, project_id, deleted_at in rows:
                if deleted_at is None:
                    by_project[project_id] += sizes[asset_id] or 0
            change_usage(s, by_project, 1)
            measured += len(rows)
        after = found[-1][0]
        if len(found) < batch:
            break
    if measured:
        log.info("measured the files of %d assets stored before their sizes were kept: their projects' storage "
                 "usage counts them now", measured)
    _tell_missing(missing, set() if told is None else told)
    return measured


def _tell_missing(missing: list[str], told: set[str]) -> None:
    """Warn of the assets in `missing` not in `told` (then added to it), naming a few; the rest at debug level."""
    new = [asset_id for asset_id in missing if asset_id not in told]
    told.update(new)
    if not new:
        if missing:
            log.debug("%d live asset(s) stored before their sizes were kept still have no file in the store",
                      len(missing))
        return
    more = len(new) - MISSING_NAMED
    named = ", ".join(new[:MISSING_NAMED]) + (f" and {more} more" if more > 0 else "")
    earlier = f"; {len(missing) - len(new)} of them warned of before" if len(missing) > len(new) else ""
    log.warning("%d live asset(s) stored before their sizes were kept have no file in the store (newly found: %s%s): "
                "they count nothing in their projects' storage usage until their files are restored (`orchestrator "
                "check` lists them), then the asset sweep measures them; each is warned of once a process",
                len(missing), named, earlier)
