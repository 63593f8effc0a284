"""Routing policies and `POST /v1/route/explain`."""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query
from pydantic import ConfigDict, Field, GetJsonSchemaHandler, TypeAdapter, ValidationError
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from orchestrator.api.deps import CallerDep, ServicesDep, check_asset, check_receiver
from orchestrator.api.docs import EXPLAIN_EXAMPLES, JOB_503, body_examples, documented, with_body, with_query
from orchestrator.api.errors import BodyValidationError
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.api.paths import PolicyName
from orchestrator.api.query import Limit, SortOrder
from orchestrator.errors import InvalidRequest, not_found, shown
from orchestrator.models import Project
from orchestrator.routing import policy_warnings
from orchestrator.schemas import (
    DraftCreate,
    PolicyDetail,
    PolicyList,
    PolicyReload,
    PolishCreate,
    PromoteCreate,
    RouteExplanation,
    Strict,
)
from orchestrator.services import Services
from policies.schema import POLICY_NAME
from tiers.base import to_credits

StageBody = TypeVar("StageBody", bound=Strict)

router = APIRouter(tags=["routing"], route_class=StrictJSONRoute)


@router.get("/policies", response_model=PolicyList, summary="List routing policies", responses=with_query())
def list_policies(services: ServicesDep, caller: CallerDep, limit: Limit = 50,
                  cursor: Annotated[str | None, Query(max_length=200, description=(
                      "Where the page starts: the previous page's `next_cursor`, the last policy name on it (empty "
                      "or left out: the first page). A value that cannot be a policy name is a 422; a name no loaded "
                      "policy has still places the page (a policy removed by a reload between two pages)."))] = None,
                  order: Annotated[SortOrder, Query(description=(
                      "`asc`: by name, A to Z (the default); `desc`: Z to A. A page's `next_cursor` goes on in the "
                      "same order."))] = "asc",
                  ) -> dict[str, Any]:
    """The loaded policies by name, paged like every list (`cursor` is the last name of the page
    before). `errors` are the files the last load refused, `warnings` what loaded but cannot route
    as written (an unknown engine): both for the admin key, as are the files' paths. A project key
    sees its project's policy only, by its file's name."""
    admin = caller.project_id is None
    if cursor and not POLICY_NAME.fullmatch(cursor):  # as other lists: it would start the list somewhere
        raise InvalidRequest("malformed cursor: pass back the 'next_cursor' of the previous page",
                             details={"cursor": shown(cursor)}, loc=("query", "cursor"))
    own = None if caller.project_id is None else _own_policy(services, caller.project_id)
    listed = services.policies.list()
    if order == "desc":  # as the other lists take it (a client asking for it got A to Z, unsaid)
        listed = listed[::-1]
    rows = [p for p in listed
            if (not cursor or (p.name > cursor if order == "asc" else p.name < cursor))
            and (admin or p.name == own)][:limit + 1]
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": [{"name": p.name, "description": p.description,
                       "source": p.source if admin else PurePath(p.source).name,
                       "content_hash": p.content_hash} for p in rows],
            "next_cursor": rows[-1].name if more else None,
            "errors": [e.message for e in services.policies.errors] if admin else [],
            "warnings": _warnings(services) if admin else []}


@router.get("/policies/{name}", response_model=PolicyDetail, summary="Get a routing policy",
            responses=documented(404, said={404: "No policy of that name is loaded, or (for a project key) it is "
                                                 "not its project's (`not_found`)."}))
def get_policy(name: PolicyName, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """The policy's rules as loaded; its file's path for the admin key. A project key reads its
    project's policy only, with its file's name (as in the list: a project key learns nothing of
    the server's file system)."""
    if caller.project_id is None:
        return services.policies.get(name).as_dict()
    if name != _own_policy(services, caller.project_id) or name not in services.policies:
        # Another client's rules name their tags (`client = "acme"`): a 404 as for no such policy,
        # without the list of those loaded.
        raise not_found("policy", "policy", name)
    policy = services.policies.get(name).as_dict()
    policy["source"] = PurePath(policy["source"]).name
    return policy


def _own_policy(services: Services, project_id: str) -> str | None:
    with services.db.session() as s:
        project = s.get(Project, project_id)
    return None if project is None else project.policy


@router.post("/policies/reload", response_model=PolicyReload, summary="Reload the policy files",
             responses=documented(403, said={403: "Only the admin key may reload policies; the request came with "
                                                  "a project key (`forbidden`)."}))
def reload_policies(services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """Re-read the policy files now, in the process that answers (admin key only; the service's
    other processes reload on their own once they see the files change). A bad file is refused with
    its message; the last good version of that policy stays in service. Projects pick up the new
    rules on their next job; a policy that now keeps everything on the machine cancels its projects'
    queued jobs for engines off it, as moving a project to it does."""
    caller.admin("reloading policies")
    errors = services.reload_policies("asked through the API")
    return {"loaded": services.policies.names(), "errors": [e.message for e in errors],
            "warnings": _warnings(services)}


def _warnings(services: Services) -> list[str]:
    # Only the service knows which engines exist; a typo ("Gemini") loads and then fails requests.
    return policy_warnings(services.policies, services.registry)


_PROJECT_ID = Field(None, min_length=1, description="the project; a project key's own when left out")


class ExplainDraft(DraftCreate):
    """Explaining a draft: the body of `POST /v1/projects/{id}/drafts`, with its stage and project."""

    stage: Literal["ideation"] = Field(description="`ideation`: a draft request (`POST /v1/projects/{id}/drafts`).")
    project_id: str | None = _PROJECT_ID


class ExplainPromote(PromoteCreate):
    """Explaining a bridge: the body of `POST /v1/assets/{id}/promote`, with its stage and asset."""

    stage: Literal["bridge"] = Field(description="`bridge`: a promotion (`POST /v1/assets/{id}/promote`).")
    source_asset_id: str = Field(description="The asset to promote: the `{id}` of `POST /v1/assets/{id}/promote`.")
    project_id: str | None = _PROJECT_ID


class ExplainPolish(PolishCreate):
    """Explaining a polish: the body of `POST /v1/assets/{id}/polish`, with its stage and asset."""

    stage: Literal["polish"] = Field(description="`polish`: a final render (`POST /v1/assets/{id}/polish`).")
    source_asset_id: str = Field(description="The asset to polish: the `{id}` of `POST /v1/assets/{id}/polish`.")
    project_id: str | None = _PROJECT_ID


_EXPLAINED = TypeAdapter(Annotated[ExplainDraft | ExplainPromote | ExplainPolish, Field(discriminator="stage")])


class ExplainRequest(Strict):
    """What to explain: the stage, the project (ideation) or the source asset (bridge, polish), and
    the other fields of that stage's own body (the body of `POST .../drafts`, `.../promote` or
    `.../polish`), checked as that route checks them (by `ExplainDraft`, `ExplainPromote` or
    `ExplainPolish`, which the API document shows as the body's three forms)."""

    model_config = ConfigDict(extra="allow")  # the rest is the stage's own request body
    project_id: Annotated[str, Field(min_length=1)] | None = None
    stage: Literal["ideation", "bridge", "polish"]
    source_asset_id: str | None = None

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(_EXPLAINED.core_schema)


@router.post("/route/explain", response_model=RouteExplanation, summary="Explain a request's routing and cost",
             operation_id="explain_route", openapi_extra=body_examples(EXPLAIN_EXAMPLES),
             responses=with_body(402, 403, 404, 409, 410, 429, 500, 507, routed=True, said={
                 403: "A job would be refused: a project key named a `webhook_url` that is not on its project's "
                      "receiver, or the project has none (`forbidden`).",
                 402: "A job would be refused for the budget: the project's budget cannot hold the estimate, or "
                      "it is over `max_credits` or the policy rule's cap (`budget_exceeded`).",
                 404: "No such project or source asset (`not_found`).",
                 409: "A job would be refused: the project is archived (`project_archived`).",
                 410: "The source asset was deleted (`gone`).",
                 429: "A job would be refused now: the project already has ORCH_MAX_PENDING_JOBS unfinished jobs "
                      "(`rate_limited`), or its jobs on local engines held the device for its "
                      "`local_seconds_per_day` or more over the last 24 hours and no other engine may take the "
                      "request (`device_time_exhausted`); `Retry-After` says when to try again (none for a "
                      "quota of 0 with no circuit to wait for).",
                 500: "The source asset's image file is missing or damaged in the store (`content_unavailable`).",
                 503: JOB_503,
                 507: "A job would be refused: the project's live assets hold its storage quota, or would pass "
                      "it with what its unfinished jobs and this one may store (`storage_quota_exceeded`, with "
                      "`details.used_bytes`, `details.reserved_bytes`, `details.job_bound_bytes` and "
                      "`details.quota_bytes`)."}))
def explain(body: ExplainRequest, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """The routing decision and estimate for a request, without running or charging anything.
    With a project key, `project_id` may be left out: the key names the project."""
    if body.project_id is None and caller.project_id is not None:
        body.project_id = caller.project_id
    if body.project_id is not None:
        caller.project(body.project_id)
    if body.source_asset_id is not None:
        check_asset(services, caller, body.source_asset_id)
    extra = dict(body.model_extra or {})
    jobs = services.jobs
    if body.stage == "ideation":
        if not body.project_id:
            raise InvalidRequest("project_id is required for the ideation stage", loc=("body", "project_id"))
        if body.source_asset_id is not None:
            raise InvalidRequest("the ideation stage takes no source_asset_id (drafts start from a prompt)",
                                 loc=("body", "source_asset_id"))
        draft = _stage_body(ExplainDraft, {**extra, "stage": body.stage, "project_id": body.project_id})
        prepared, engine, max_credits = jobs.prepare_draft(body.project_id, draft), draft.engine, None
        cache = draft.cache
        if draft.seed is None:  # a real job draws its own: the one drawn here would mislead
            prepared.params["seed"] = None
    else:
        if not body.source_asset_id:
            raise InvalidRequest(f"source_asset_id is required for the {body.stage} stage",
                                 loc=("body", "source_asset_id"))
        if body.stage == "bridge":
            promote = _stage_body(ExplainPromote, {**extra, "stage": body.stage,
                                                   "source_asset_id": body.source_asset_id})
            prepared = jobs.prepare_promote(body.source_asset_id, promote)
            engine, max_credits, cache = promote.engine, promote.max_credits, promote.cache
        else:
            polish = _stage_body(ExplainPolish, {**extra, "stage": body.stage, "source_asset_id": body.source_asset_id})
            prepared = jobs.prepare_polish(body.source_asset_id, polish)
            engine, max_credits, cache = polish.engine, polish.max_credits, polish.cache
        if body.project_id and body.project_id != prepared.project_id:
            with services.db.session() as s:
                services.jobs.project(s, body.project_id)  # a 404 for one that does not exist
            # Both exist (a project key was refused either one above): the request contradicts itself.
            raise InvalidRequest(f"asset '{body.source_asset_id}' belongs to project '{prepared.project_id}', not "
                                 f"'{body.project_id}'; leave project_id out or name the asset's own",
                                 details={"project_id": body.project_id}, loc=("body", "project_id"))
    check_receiver(services, caller, prepared.project_id, prepared.webhook_url)  # as its submit would be
    decision = jobs.decide(prepared, engine, max_credits, cache=cache)
    copies = jobs.cached(prepared, decision) if cache else []
    cache_hit = bool(copies)
    # In the submit's order: the disk's reserve, then the project's unfinished jobs and its quota.
    jobs.refuse_if_no_room()  # as its submit would be: a 200 said the job would be taken
    jobs.check_room(prepared, decision, copies)
    return {"project_id": prepared.project_id, "stage": body.stage, "engine": decision.chosen,
            "estimate": 0.0 if cache_hit else to_credits(decision.estimate), "cache_hit": cache_hit,
            "routing": decision.as_dict(),
            "params": _told(jobs.job_params(prepared, decision))}


def _told(params: dict[str, Any]) -> dict[str, Any]:
    """The job's params as explain tells them: a seed the service drew is none (a real job draws
    its own: the one drawn here would mislead)."""
    told = {k: v for k, v in params.items() if k not in ("source_sha256", "seed_drawn")}
    if params.get("seed_drawn"):
        told["seed"] = None
    return told


def _stage_body(model: type[StageBody], fields: dict[str, Any]) -> StageBody:
    """The stage's own body, its errors placed as the stage's POST places them (`["body", "n"]`)."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise BodyValidationError(errors, model=model, body=fields) from None
