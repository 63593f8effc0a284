"""The three stages: drafts (ideation), promote (bridge) and polish. Each answers 202 with the job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response

from orchestrator import idempotency
from orchestrator.api.deps import Caller, CallerDep, IdempotencyKey, ServicesDep, check_asset, check_receiver
from orchestrator.api.docs import (
    DRAFT_EXAMPLES,
    JOB_503,
    POLISH_EXAMPLES,
    PROMOTE_EXAMPLES,
    body_examples,
    with_body,
)
from orchestrator.api.jobs import public
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.api.paths import AssetId, ProjectId
from orchestrator.api.serialize import job_public
from orchestrator.jobs import Prepared
from orchestrator.ledger import EngineCost, JobCost, holds
from orchestrator.models import Asset, Job
from orchestrator.schemas import DraftCreate, JobPublic, PolishCreate, PromoteCreate

router = APIRouter(tags=["stages"], route_class=StrictJSONRoute)
# The 202's headers, for the API document: where the job is, and whether this is a replay.
_HEADERS = {
    "Location": {"description": "The job: `/v1/jobs/{id}`.", "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "`true` when the Idempotency-Key was seen with this body before: "
                            "this is that first request's response; nothing new was made or held.",
                            "schema": {"type": "string"}},
}
ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"description": "The job, committed (its estimate held) before this answer.", "headers": _HEADERS}}
_IDEMPOTENCY_CONFLICT = ("The Idempotency-Key was used with another body (`idempotency_conflict`), or the project is "
                         "archived (`project_archived`): nothing was made or held.")
# A project key's job `webhook_url` off its project's receiver: `webhooks.refuse_foreign_receiver`.
_RECEIVER_403 = ("A project key named a `webhook_url` that is not on its project's receiver (the scheme, host and "
                 "port of the project's `webhook_url`), or the project has none (`forbidden`): nothing was made or "
                 "held.")
PAID_ERRORS = {**ACCEPTED, **with_body(
    402, 403, 404, 409, 410, 429, 500, 507, idempotency_key=True, routed=True,
    said={403: _RECEIVER_403,
          402: "The project's budget cannot hold the estimate, or the estimate is over `max_credits` or the policy "
               "rule's cap (`budget_exceeded`): nothing was made or held.",
          404: "No such asset (`not_found`).",
          409: _IDEMPOTENCY_CONFLICT,
          410: "The source asset was deleted (`gone`).",
          500: "The source asset's image file is missing or damaged in the store (`content_unavailable`): sending "
               "the request again changes nothing until the operator restores it (`orchestrator check` lists such "
               "files).",
          503: JOB_503})}
# Every field of promote and polish has a default, so their body may be left out (the same as `{}`).
PromoteBody = Annotated[PromoteCreate, Body(default_factory=PromoteCreate)]
PolishBody = Annotated[PolishCreate, Body(default_factory=PolishCreate)]


@router.post("/projects/{project_id}/drafts", status_code=202, response_model=JobPublic, summary="Make drafts",
             openapi_extra=body_examples(DRAFT_EXAMPLES),
             responses={**ACCEPTED, **with_body(
                 402, 403, 404, 409, 429, 507, idempotency_key=True, routed=True,
                 said={403: _RECEIVER_403,
                       402: "A policy routes drafts to a paid engine (a plugin's) and the project's budget cannot "
                            "hold its estimate, or it is over the policy rule's cap (`budget_exceeded`); drafts on "
                            "the local Lite model hold nothing and are never refused for the budget.",
                       404: "No such project (`not_found`).",
                       409: _IDEMPOTENCY_CONFLICT,
                       503: JOB_503})})
def create_drafts(project_id: ProjectId, body: DraftCreate, services: ServicesDep, caller: CallerDep, request: Request,
                  response: Response, idempotency_key: IdempotencyKey = None) -> JobPublic:
    """Ask for `n` drafts of a prompt (stage `ideation`), made on the local Lite model unless the
    project's policy says otherwise: nothing leaves the machine. Variation i is seeded `seed + i`.
    Follow the job with `GET /v1/jobs/{id}/events`; send an `Idempotency-Key` to retry safely."""
    caller.project(project_id)
    return _submitted(services, caller, lambda: services.jobs.prepare_draft(project_id, body), body,
                      max_credits=None, idempotency_key=idempotency_key, request=request, response=response)


@router.post("/assets/{asset_id}/promote", status_code=202, response_model=JobPublic,
             summary="Promote an asset to a high-fidelity engine", openapi_extra=body_examples(PROMOTE_EXAMPLES),
             responses=PAID_ERRORS)
def promote(asset_id: AssetId, body: PromoteBody, services: ServicesDep, caller: CallerDep, request: Request,
            response: Response, idempotency_key: IdempotencyKey = None) -> JobPublic:
    """Promote an asset (a chosen draft) as the image-to-image seed of a high-fidelity engine
    (stage `bridge`). The estimate is held against the project's budget in the transaction that
    makes the job (402 `budget_exceeded` when it does not fit or is above `max_credits`) and the
    actual cost captured once; `prompt` null keeps the source's. The job carries the source's tags."""
    check_asset(services, caller, asset_id)
    return _submitted(services, caller, lambda: services.jobs.prepare_promote(asset_id, body), body,
                      max_credits=body.max_credits, idempotency_key=idempotency_key, request=request,
                      response=response)


@router.post("/assets/{asset_id}/polish", status_code=202, response_model=JobPublic,
             summary="Polish an asset (the final render)", openapi_extra=body_examples(POLISH_EXAMPLES),
             responses=PAID_ERRORS)
def polish(asset_id: AssetId, body: PolishBody, services: ServicesDep, caller: CallerDep, request: Request,
           response: Response, idempotency_key: IdempotencyKey = None) -> JobPublic:
    """The final render of an asset (stage `polish`): `scale`, or `width`/`height`, sets the size,
    `creativity` how far the engine may stray from the source. Held and charged as a promotion."""
    check_asset(services, caller, asset_id)
    return _submitted(services, caller, lambda: services.jobs.prepare_polish(asset_id, body), body,
                      max_credits=body.max_credits, idempotency_key=idempotency_key, request=request,
                      response=response)


def _receiver_checked(services: ServicesDep, caller: Caller,
                      prepare: Callable[[], Prepared]) -> Callable[[], Prepared]:
    """`prepare`, then `check_receiver`. Run by `submit` after the Idempotency-Key's look-up (a
    retry of a job made before the project's URL changed replays it) and before anything is written."""
    def checked() -> Prepared:
        prepared = prepare()
        check_receiver(services, caller, prepared.project_id, prepared.webhook_url)
        return prepared
    return checked


def _submitted(services: ServicesDep, caller: Caller, prepare: Callable[[], Prepared],
               body: DraftCreate | PromoteCreate | PolishCreate, *, max_credits: float | None,
               idempotency_key: str | None, request: Request, response: Response) -> JobPublic:
    """A stage's request made its job and answered 202: `prepare` (then `check_receiver`) runs in
    `submit`, after the Idempotency-Key's look-up, and a replay is answered as the first request
    was. One path for the three stages, so that they hold, replay and answer alike."""
    job, created = services.jobs.submit(_receiver_checked(services, caller, prepare), body, engine=body.engine,
                                        max_credits=max_credits, idempotency_key=idempotency_key,
                                        scope=request.url.path,
                                        answer=lambda job, copies: first_answer(
                                            job, copies, billable=services.jobs.billable(job.engine)))
    return _answer(services, job, created, response, idempotency_key, request.url.path)


def first_answer(job: Job, copies: list[Asset], *, billable: bool) -> JobPublic:
    """A new job as its request is answered: just written, nothing has happened to it yet (a
    cache hit is finished, its assets copies of an earlier result's), so the rows in hand say it all.
    `billable`: its engine's provider bills it whatever it is priced (`JobService.billable`)."""
    if job.cache_hit:
        return job_public(job, [a.id for a in copies])
    # Its hold, as the ledger has it now: none for free work, and one of 0 on a cloud engine priced
    # 0 (left out, GET and the job list named the engine where the 202 did not).
    held = ([EngineCost(job.engine, estimated=job.estimated, held=job.estimated)]
            if holds(job.estimated, billable=billable) else [])
    return job_public(job, [], JobCost(held=job.estimated, engines=held))


def _with_engines(first: dict[str, Any], billable: Callable[[str | None], bool]) -> dict[str, Any]:
    """A first answer stored before `cost.engines` (migration 0035's release) with them, as
    `first_answer` gives them: replayed without, `engines` was its default [] beside a `held` of
    the estimate, where the shares add up to the job's. A new job holds on its engine alone.
    `billable`: `JobService.billable`."""
    cost = first.get("cost")
    if not isinstance(cost, dict) or "engines" in cost:
        return first
    held = cost.get("held") or 0
    engine = first.get("engine")
    billed = not cost.get("cache_hit") and billable(engine if isinstance(engine, str) else None)
    engines = [{"engine": engine, "estimated": held, "held": held, "charged": 0, "released": 0}
               ] if held > 0 or (held == 0 and billed) else []
    return {**first, "cost": {**cost, "engines": engines}}


def _answer(services: ServicesDep, job: Job, created: bool, response: Response, key: str | None,
            scope: str) -> JobPublic:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if created and not job.cache_hit:
        return first_answer(job, [], billable=services.jobs.billable(job.engine))
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        # The original response (API.md), not the job as it is now; a key stored by an earlier
        # release kept no answer, and gets the job as it is now.
        if key and (first := idempotency.first_answer(services.db, key, scope)) is not None:
            return JobPublic.model_validate(_with_engines(first, services.jobs.billable))
    return public(services, job.id)
