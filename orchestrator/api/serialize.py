"""Rows -> public API objects."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from orchestrator.device_time import quota_seconds, shown
from orchestrator.ledger import JobCost
from orchestrator.models import Asset, Job, Project
from orchestrator.quota import quota_bytes
from orchestrator.schemas import AssetPublic, Cost, ErrorBody, JobPublic, ProjectBudget, ProjectPublic
from orchestrator.schemas import EngineCost as EngineCostPublic
from orchestrator.schemas import Progress as ProgressBody
from orchestrator.store import model_name
from tiers.base import to_credits

R = TypeVar("R")
# The text one page of jobs or assets may carry before it ends, its `next_cursor` naming the rest.
# A job's prompts (10,000 characters each) and tags (64 of up to 600) made it about 60 KB as listed,
# and a 500-item page 30 MB, built and held whole for each request (and for as long as its client
# took to read it). Ordinary items, a few KB each, fill 500 well within it.
PAGE_TEXT_BYTES = 4 * 2**20
PAGE_BATCH = 50  # rows of a page read from the database at a time (`yield_per`)

_PUBLIC_PARAMS = ("prompt", "negative_prompt", "n", "seed", "width", "height", "steps", "guidance_scale",
                  "strength", "quality", "scale", "creativity", "tags")


def project_public(p: Project, default_quota_mb: int, reserved: int = 0, *, default_local_seconds: int | None = None,
                   local_used: float = 0.0) -> ProjectPublic:
    """`default_quota_mb`: ORCH_PROJECT_STORAGE_QUOTA_MB, the quota in force where the project sets none;
    `reserved`: what its unfinished jobs may still store (`quota.held`); `default_local_seconds`:
    ORCH_PROJECT_LOCAL_SECONDS_PER_DAY; `local_used`: its device-seconds of the last 24 hours
    (`device_time.used_by`)."""
    limit = None if p.budget_limit is None else to_credits(p.budget_limit)
    return ProjectPublic(id=p.id, name=p.name, policy=p.policy,
                         budget=ProjectBudget.model_validate({"limit": limit, "period": p.budget_period}),
                         created_at=p.created_at, archived_at=p.archived_at, webhook_url=p.webhook_url,
                         storage_quota_mb=p.storage_quota_mb, storage_bytes=p.storage_bytes,
                         storage_quota_bytes=quota_bytes(p, default_quota_mb), storage_reserved_bytes=reserved,
                         local_seconds_per_day=p.local_seconds_per_day,
                         local_seconds_quota=quota_seconds(p, default_local_seconds),
                         local_seconds_used=shown(local_used))


def job_public(job: Job, asset_ids: list[str], money: JobCost | None = None) -> JobPublic:
    """`money`: the job's ledger entries summed (`Ledger.job_costs`; None: it has none)."""
    money = money or JobCost()
    # The engines in the order the job was tried on them (its attempts, then the one it is on).
    tried = [a.get("engine") for a in job.attempts or [] if isinstance(a, dict)] + [job.engine]
    rank = {engine: index for index, engine in reversed(list(enumerate(tried)))}
    engines = sorted(money.engines, key=lambda c: (rank.get(c.engine, len(rank)), c.engine or ""))
    total = job.progress_total
    step = job.progress_step
    return JobPublic(
        id=job.id, project_id=job.project_id, stage=job.stage, engine=job.engine,
        model=model_name(job.model, job.engine), status=job.status,
        params={k: job.params[k] for k in _PUBLIC_PARAMS if k in job.params},
        progress=ProgressBody(step=step, total=total, fraction=round(step / total, 4) if total else 0.0),
        assets=asset_ids, source_asset_id=job.source_asset_id,
        error=ErrorBody(**job.error) if job.error else None,
        cost=Cost(estimated=to_credits(job.estimated), held=to_credits(money.held), charged=to_credits(money.charged),
                  cache_hit=job.cache_hit,
                  engines=[EngineCostPublic(engine=c.engine, estimated=to_credits(c.estimated), held=to_credits(c.held),
                                            charged=to_credits(c.charged), released=to_credits(c.released))
                           for c in engines]),
        routing=job.routing, attempts=job.attempts or [], provider_request_id=job.provider_request_id,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        webhook_url=job.webhook_url,
    )


def asset_public(a: Asset) -> AssetPublic:
    return AssetPublic(
        id=a.id, project_id=a.project_id, job_id=a.job_id, stage=a.stage,
        parent_id=a.parent_id, engine=a.engine, model=model_name(a.model, a.engine) or "", prompt=a.prompt,
        negative_prompt=a.negative_prompt, seed=a.seed, width=a.width, height=a.height, sha256=a.sha256,
        created_at=a.created_at, content_url=f"/v1/assets/{a.id}/content",
        # As the PNG holds it: the model by name, not by the server's path to it.
        record={**a.record, "model": model_name(a.record.get("model"), a.engine)} if a.record else {},
        deleted_at=a.deleted_at,
    )


class _StoredBytes(FunctionElement[int]):
    """Columns' values as the database holds them (a JSON column's text), in UTF-8 bytes, added up;
    0 for NULL. Each string of a JSON value is in its text whole, quoted, and written as itself or
    escaped (longer): the text is never shorter than the strings it holds, keys included."""

    type = sa.Integer()
    inherit_cache = True


@compiles(_StoredBytes, "sqlite")
def _stored_bytes_sqlite(element: _StoredBytes, compiler: SQLCompiler, **kw: Any) -> str:
    # As a BLOB, the text's bytes: length() of TEXT counts characters, and stops at a NUL.
    return "(" + " + ".join(f"coalesce(length(CAST({compiler.process(column, **kw)} AS BLOB)), 0)"
                            for column in element.clauses) + ")"


@compiles(_StoredBytes)
def _stored_bytes(element: _StoredBytes, compiler: SQLCompiler, **kw: Any) -> str:
    return "(" + " + ".join(f"coalesce(octet_length(CAST({compiler.process(column, **kw)} AS TEXT)), 0)"
                            for column in element.clauses) + ")"


# An upper bound on the text of the part of a row that its clients write (a job's params, error,
# routing and attempts; an asset's prompts and record), worked out by the database as it reads the
# row: walking each row's JSON in Python added 7 to 9 ms of CPU to the 13 ms of reading a page of
# 500 ordinary jobs. Such a job's bound is about 900 bytes (600 of them text): 500 fill a page well
# within `PAGE_TEXT_BYTES`.
JOB_TEXT = _StoredBytes(Job.params, Job.error, Job.routing, Job.attempts)
ASSET_TEXT = _StoredBytes(Asset.prompt, Asset.negative_prompt, Asset.record)


def page_rows(rows: Iterable[tuple[R, int]], limit: int) -> tuple[list[R], bool]:
    """A page's rows, taken from `rows` (each with its text's size, `JOB_TEXT` or `ASSET_TEXT`) as
    they come (a query's result read `PAGE_BATCH` at a time: rows past the page's end are never
    loaded): the first `limit`, or fewer once their sizes add up to more than `PAGE_TEXT_BYTES`
    (never none); and whether rows follow them."""
    kept: list[R] = []
    total = 0
    for row, size in rows:
        if len(kept) == limit:
            return kept, True
        total += size
        if kept and total > PAGE_TEXT_BYTES:
            return kept, True
        kept.append(row)
    return kept, False
