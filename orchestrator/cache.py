"""The result cache: an identical paid request (same project, source, engine, model and
parameters) gets copies of an earlier job's images instead of paying for them again. Looked up as
a request is routed (`orchestrator.jobs`) and as a failed job falls back to another engine
(`orchestrator.runner`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlmodel import Session, col, select

from orchestrator.clock import shared_now
from orchestrator.ids import new_id
from orchestrator.models import Asset, Job
from orchestrator.store import ArtifactStore
from tiers.base import UNKNOWN_MODEL

# Earlier identical jobs a paid request may copy, oldest first, then the newest: one whose file was
# lost is passed over for the next (a render made after it would otherwise never be copied).
CACHE_CANDIDATES = 5


def cache_key(engine: str, model: str, params: dict[str, Any]) -> str | None:
    """Identifies an identical paid request: engine, model, parameters (source hash and a seed
    asked for included). Left out, as they do not change what is asked: tags, and a seed the
    request left to the service (`seed_drawn`): with it in, every polish of a Gemini, OpenAI or fal
    image (which carry no seed) drew a fresh one, and never found the earlier result. (A seed an
    engine is said to ignore stays in: `Capabilities.seeds` is no promise, Replicate's FLUX takes one.)
    None for a model its engine could not name (`UNKNOWN_MODEL`): another job's images kept under
    that name may be another checkpoint's."""
    if model == UNKNOWN_MODEL:
        return None
    left_out = {"tags", "seed_drawn"} | ({"seed"} if params.get("seed_drawn") else set())
    identity = {"engine": engine, "model": model, "params": {k: v for k, v in params.items() if k not in left_out}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cached_copies(assets: list[Asset], job: Job) -> list[Asset]:
    """New asset rows for a cache hit: same content (same file), new ids, owned by the new job;
    stamped as a render's are, by the clock the ids take (see `runner._add_assets`), for clients
    that sync on `created_at`."""
    stamp = shared_now()
    return [Asset(**{**a.model_dump(), "id": new_id("ast"), "job_id": job.id, "project_id": job.project_id,
                     "parent_id": job.source_asset_id, "created_at": stamp}) for a in assets]


def find(s: Session, store: ArtifactStore, key: str, project_id: str, source_asset_id: str | None) -> list[Asset]:
    """The assets of an earlier identical paid job (its `cache_key` is `key`) of the same project
    from the same source asset that succeeded (a render, or a copy of one), if any. The same project: a
    draft has no source, and one studio's client must not get another's image. The same source: a
    copy's PNG (shared, content-addressed) names its parent, and another asset with the same
    bytes may belong to another project."""
    # Not a job one of whose images was deleted: its file is the sweep's, and a copy's row does
    # not refresh it. The render made instead is the next request's copy (taking the first job
    # whatever became of its images made every later identical request pay again).
    # An earlier copy is a candidate too: its live rows keep the file, and the original deleted
    # while a copy lived made the next identical request pay again for bytes it still held.
    deleted = select(Asset.id).where(col(Asset.job_id) == Job.id, col(Asset.deleted_at).is_not(None)).exists()
    same = select(Job).where(col(Job.cache_key) == key, col(Job.status) == "succeeded",
                             col(Job.project_id) == project_id, col(Job.source_asset_id) == source_asset_id, ~deleted)
    oldest = s.exec(same.order_by(col(Job.id)).limit(CACHE_CANDIDATES)).all()
    # And the newest: the render made after them all, should every one of them be lost.
    newest = s.exec(same.order_by(col(Job.id).desc()).limit(1)).all()
    # Copies name the same files: each is read once.
    intact: dict[str, bool] = {}
    for candidate in {j.id: j for j in [*oldest, *newest]}.values():
        assets = list(s.exec(select(Asset).where(col(Asset.job_id) == candidate.id)
                             .order_by(col(Asset.index))).all())
        # A copy of a file that is gone (removed by hand, a lost disk) or damaged would be
        # charged nothing and serve nothing: the next such job's, or a render (whose bytes
        # then mend the file, or are the next request's copy).
        for asset in assets:
            if asset.sha256 not in intact:
                intact[asset.sha256] = store.intact(asset.sha256)
        if all(intact[asset.sha256] for asset in assets):
            return assets
    return []


