"""Rows -> public API objects."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from orchestrator.models import Asset, Job, Project
from orchestrator.schemas import AssetPublic, Cost, ErrorBody, JobPublic, ProjectBudget, ProjectPublic
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


def project_public(p: Project) -> ProjectPublic:
    limit = None if p.budget_limit is None else to_credits(p.budget_limit)
    return ProjectPublic(id=p.id, name=p.name, policy=p.policy,
                         budget=ProjectBudget.model_validate({"limit": limit, "period": p.budget_period}),
                         created_at=p.created_at, archived_at=p.archived_at)


def job_public(job: Job, asset_ids: list[str], held: int = 0, charged: int = 0) -> JobPublic:
    total = job.progress_total
    step = job.progress_step
    return JobPublic(
        id=job.id, project_id=job.project_id, stage=job.stage, engine=job.engine,
        model=model_name(job.model, job.engine), status=job.status,
        params={k: job.params[k] for k in _PUBLIC_PARAMS if k in job.params},
        progress=ProgressBody(step=step, total=total, fraction=round(step / total, 4) if total else 0.0),
        assets=asset_ids, source_asset_id=job.source_asset_id,
        error=ErrorBody(**job.error) if job.error else None,
        cost=Cost(estimated=to_credits(job.estimated), held=to_credits(held), charged=to_credits(charged),
                  cache_hit=job.cache_hit),
        routing=job.routing, attempts=job.attempts or [], provider_request_id=job.provider_request_id,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
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


def text_bytes(value: object) -> int:
    """The UTF-8 bytes of the strings in `value`, through dicts (keys too) and lists: the part of a
    row its clients write, and so the part of its size that they can make large."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(text_bytes(key) + text_bytes(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return sum(text_bytes(item) for item in value)
    return 0


def job_text_bytes(job: Job) -> int:
    return text_bytes(job.params) + text_bytes(job.error) + text_bytes(job.routing) + text_bytes(job.attempts)


def asset_text_bytes(asset: Asset) -> int:
    return text_bytes(asset.prompt) + text_bytes(asset.negative_prompt) + text_bytes(asset.record)


def page_rows(rows: Iterable[R], limit: int, size: Callable[[R], int]) -> tuple[list[R], bool]:
    """A page's rows, taken from `rows` as they come (a query's result read `PAGE_BATCH` at a time:
    rows past the page's end are never loaded): the first `limit`, or fewer once their `size`s add
    up to more than `PAGE_TEXT_BYTES` (never none); and whether rows follow them."""
    kept: list[R] = []
    total = 0
    for row in rows:
        if len(kept) == limit:
            return kept, True
        total += size(row)
        if kept and total > PAGE_TEXT_BYTES:
            return kept, True
        kept.append(row)
    return kept, False
