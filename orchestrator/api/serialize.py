"""Rows -> public API objects."""

from __future__ import annotations

from orchestrator.models import Asset, Job, Project
from orchestrator.schemas import AssetPublic, Cost, ErrorBody, JobPublic, ProjectBudget, ProjectPublic
from orchestrator.schemas import Progress as ProgressBody
from orchestrator.store import model_name
from tiers.base import to_credits

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
