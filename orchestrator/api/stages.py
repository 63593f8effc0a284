"""The three stages: drafts (ideation), promote (bridge) and polish. Each answers 202 with the job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request, Response

from orchestrator.api.deps import CallerDep, IdempotencyKey, ServicesDep, check_asset
from orchestrator.api.errors import documented
from orchestrator.api.jobs import public
from orchestrator.api.serialize import job_public
from orchestrator.models import Job
from orchestrator.schemas import DraftCreate, JobPublic, PolishCreate, PromoteCreate

router = APIRouter(tags=["stages"])
PAID_ERRORS = documented(402, 404, 409, 413, 415, 429, 503)
# Every field of promote and polish has a default, so their body may be left out (the same as `{}`).
PromoteBody = Annotated[PromoteCreate, Body(default_factory=PromoteCreate)]
PolishBody = Annotated[PolishCreate, Body(default_factory=PolishCreate)]


@router.post("/projects/{project_id}/drafts", status_code=202, response_model=JobPublic,
             responses=documented(404, 409, 413, 415, 429, 503))
def create_drafts(project_id: str, body: DraftCreate, services: ServicesDep, caller: CallerDep, request: Request,
                  response: Response, idempotency_key: IdempotencyKey = None) -> JobPublic:
    caller.project(project_id)
    prepared = services.jobs.prepare_draft(project_id, body)
    job, created = services.jobs.submit(prepared, body, engine=body.engine, max_credits=None,
                                        idempotency_key=idempotency_key, scope=request.url.path)
    return _answer(services, job, created, response)


@router.post("/assets/{asset_id}/promote", status_code=202, response_model=JobPublic, responses=PAID_ERRORS)
def promote(asset_id: str, body: PromoteBody, services: ServicesDep, caller: CallerDep, request: Request,
            response: Response, idempotency_key: IdempotencyKey = None) -> JobPublic:
    check_asset(services, caller, asset_id)
    prepared = services.jobs.prepare_promote(asset_id, body)
    job, created = services.jobs.submit(prepared, body, engine=body.engine, max_credits=body.max_credits,
                                        idempotency_key=idempotency_key, scope=request.url.path)
    return _answer(services, job, created, response)


@router.post("/assets/{asset_id}/polish", status_code=202, response_model=JobPublic, responses=PAID_ERRORS)
def polish(asset_id: str, body: PolishBody, services: ServicesDep, caller: CallerDep, request: Request,
           response: Response, idempotency_key: IdempotencyKey = None) -> JobPublic:
    check_asset(services, caller, asset_id)
    prepared = services.jobs.prepare_polish(asset_id, body)
    job, created = services.jobs.submit(prepared, body, engine=body.engine, max_credits=body.max_credits,
                                        idempotency_key=idempotency_key, scope=request.url.path)
    return _answer(services, job, created, response)


def _answer(services: ServicesDep, job: Job, created: bool, response: Response) -> JobPublic:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if created and not job.cache_hit:
        # Just written, nothing has happened to it yet: answer from the row in hand, no re-reads.
        return job_public(job, [], held=job.estimated, charged=0)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return public(services, services.jobs.get(job.id))
