from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from orchestrator import idempotency, quota
from orchestrator.api.deps import CallerDep, IdempotencyKey, ServicesDep, admin_only, existing_project
from orchestrator.api.docs import (
    BODY_422,
    IDEMPOTENCY_KEY_422,
    PROJECT_EXAMPLES,
    PROJECT_UPDATE_EXAMPLES,
    body_examples,
    created,
    documented,
    with_body,
    with_query,
)
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.api.paths import ProjectId
from orchestrator.api.query import Archived, Cursor, Limit, Order, StageFilter, paged
from orchestrator.api.serialize import ASSET_TEXT, PAGE_BATCH, asset_public, page_rows, project_public
from orchestrator.clock import shared_now
from orchestrator.errors import InvalidRequest, NotFound, NoUsableEngine, not_found, shown
from orchestrator.ids import id_cursor, new_id
from orchestrator.models import Asset, Project
from orchestrator.models import IdempotencyKey as IdempotencyKeyRow
from orchestrator.schemas import AssetPublic, Budget, Page, ProjectCreate, ProjectPublic, ProjectUpdate
from policies import Policy
from tiers.base import to_millicredits

router = APIRouter(tags=["projects"], route_class=StrictJSONRoute)


@router.post("/projects", status_code=201, response_model=ProjectPublic, summary="Create a project",
             dependencies=[admin_only("creating a project")],
             openapi_extra=body_examples(PROJECT_EXAMPLES),
             responses={**created("The project: `/v1/projects/{id}`.", replayable=True), **with_body(
                 403, 409, 503, idempotency_key=True,
                 said={403: "Only the admin key may create projects; the request came with a project key "
                            "(`forbidden`).",
                       409: "The Idempotency-Key was used with another body (`idempotency_conflict`).",
                       422: BODY_422 + " Or `policy` names no loaded policy (`details.known` lists them)."
                            + IDEMPOTENCY_KEY_422,
                       503: "The request names no policy and the default one (ORCH_POLICY) is not loaded "
                            "(`no_route`: the operator's to fix); or the database is unavailable for now "
                            "(`database_unavailable`) or its disk is full (`storage_full`), or the server stopped "
                            "before it finished the request (`server_stopping`): send it again (with the same "
                            "Idempotency-Key) after `Retry-After`."})})
def create_project(body: ProjectCreate, services: ServicesDep, request: Request,
                   response: Response, idempotency_key: IdempotencyKey = None) -> ProjectPublic:
    """Create a project. With an `Idempotency-Key`, a retry answers with the first request's
    response (the project as it was created) and creates nothing."""
    scope, key = request.url.path, idempotency_key
    # Before the checks: a retry answers as the first request did, even if the policy is gone since.
    if key and (earlier := _created_earlier(services, key, scope, body)):
        return _replayed(earlier, response)
    _check_policy(services, body.policy)
    if body.policy is None and services.settings.policy not in services.policies:
        raise NoUsableEngine(f"the default policy '{services.settings.policy}' (ORCH_POLICY) is not loaded; "
                             "name a policy in the request or fix the setting",
                             details={"policy": services.settings.policy, "known": services.policies.names()})
    budget = body.budget
    project = Project(
        id="", name=body.name, policy=body.policy or services.settings.policy,
        budget_limit=None if budget is None or budget.limit is None else to_millicredits(budget.limit),
        budget_period=budget.period if budget else "none", webhook_url=body.webhook_url,
        storage_quota_mb=body.storage_quota_mb, local_seconds_per_day=body.local_seconds_per_day,
    )
    try:
        with services.db.transaction() as s:
            # SQLite: under the write lock, a second request with the key finds the first's row here.
            if key and (earlier := _recalled(s, services, key, scope, body)):
                return _replayed(earlier, response)
            project.id = new_id("prj")  # made under the write lock: ids are the list's cursors
            s.add(project)
            if key:
                s.flush()  # the key's row points at the project's
                idempotency.remember(s, key, scope, _digest(services, body, None), project_id=project.id,
                                     response=_new(services, project))
    except IntegrityError:
        # PostgreSQL: a request with the same key committed first (the key is the primary key).
        if key and (earlier := _created_earlier(services, key, scope, body)):
            return _replayed(earlier, response)
        raise
    response.headers["Location"] = f"/v1/projects/{project.id}"
    return _new(services, project)


def _new(services: ServicesDep, project: Project) -> ProjectPublic:
    """A project just made: nothing held or used yet."""
    return project_public(project, services.settings.project_storage_quota_mb,
                          default_local_seconds=services.settings.project_local_seconds_per_day)


def _public(s: Session, services: ServicesDep, project: Project) -> ProjectPublic:
    """The project as answered, with what its unfinished jobs hold and its device time of the last 24 hours."""
    default_quota_mb = services.settings.project_storage_quota_mb
    return project_public(project, default_quota_mb, quota.held(s, project, default_quota_mb),
                          default_local_seconds=services.settings.project_local_seconds_per_day,
                          local_used=services.jobs.device_used(s, [project.id]).get(project.id, 0.0))


def _replayed(first: ProjectPublic, response: Response) -> ProjectPublic:
    response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/projects/{first.id}"
    return first


def _digest(services: ServicesDep, body: ProjectCreate, earlier: IdempotencyKeyRow | None) -> idempotency.Digest:
    """The body's digest, with the forms of the same request that a key `earlier` stored may hold.

    Defaults written out are the same request as one that leaves them out: a budget of no limit
    (`{}`, `{"limit": null, "period": "none"}`), and the default policy, stored as left out. Which
    policy that was is what the first request made, not today's ORCH_POLICY: naming it in a retry
    after the setting changed is the same request, and naming today's default where the first
    request got another is not."""
    hashed = body.model_copy(update={"budget": None}) if body.budget == Budget() else body
    # As sent, too: a key stored before budgets were read so was hashed with it written out.
    forms = (hashed, *([body] if hashed is not body else []))

    def named(policy: str | None) -> list[ProjectCreate]:
        return [form.model_copy(update={"policy": policy}) for form in forms]

    made = services.settings.policy  # what a request leaving it out makes (or made: see below)
    if earlier is not None and earlier.response is not None:
        made = str(earlier.response.get("policy", made))
    if body.policy is None:
        # With the default written out as well: a release that hashed it as written stored that.
        first, *others = [*named(None), *named(services.settings.policy)]
    elif body.policy == made:
        first, *others = [*named(None), *named(body.policy)]
    else:
        first, *others = named(body.policy)
    return idempotency.request_hash(first, *others)


def _recalled(s: Session, services: ServicesDep, key: str, scope: str, body: ProjectCreate) -> ProjectPublic | None:
    earlier = s.get(IdempotencyKeyRow, (key, scope))
    return _answered(s, idempotency.recall(s, key, scope, _digest(services, body, earlier)), services)


def _created_earlier(services: ServicesDep, key: str, scope: str, body: ProjectCreate) -> ProjectPublic | None:
    with services.db.session() as s:
        return _recalled(s, services, key, scope, body)


def _answered(s: Session, row: IdempotencyKeyRow | None, services: ServicesDep) -> ProjectPublic | None:
    """The first answer to the key's request (the original response, however the project has
    changed since); for a key stored by an earlier release, which kept none, the project now."""
    if row is None:
        return None
    if row.response is not None:
        return ProjectPublic.model_validate(row.response)
    assert row.project_id is not None  # the scope is this path: only projects
    project = s.get(Project, row.project_id)
    return None if project is None else _public(s, services, project)


@router.get("/projects", response_model=Page[ProjectPublic], summary="List projects", responses=with_query())
def list_projects(services: ServicesDep, caller: CallerDep, limit: Limit = 50,
                  cursor: Cursor = None, order: Order = "asc", archived: Archived = False) -> Page[ProjectPublic]:
    """Every project not archived (`archived=true`: the archived ones too); for a project key, its own."""
    with services.db.session() as s:
        stmt = paged(select(Project), col(Project.id), id_cursor(cursor, "prj"), order).limit(limit + 1)
        if not archived:
            stmt = stmt.where(col(Project.archived_at).is_(None))
        if caller.project_id is not None:
            stmt = stmt.where(col(Project.id) == caller.project_id)
        rows = list(s.exec(stmt).all())
        more = len(rows) > limit
        rows = rows[:limit]
        default_quota_mb = services.settings.project_storage_quota_mb
        held = quota.held_by(s, rows, default_quota_mb)
        used = services.jobs.device_used(s, [p.id for p in rows])
    return Page(items=[project_public(p, default_quota_mb, held.get(p.id, 0),
                                      default_local_seconds=services.settings.project_local_seconds_per_day,
                                      local_used=used.get(p.id, 0.0)) for p in rows],
                next_cursor=rows[-1].id if more else None)


def _check_policy(services: ServicesDep, policy: str | None) -> Policy | None:
    """The loaded policy `policy` names (None for none): looked up once, as a reload meanwhile may
    remove or change it."""
    if policy is None:
        return None
    try:
        return services.policies.get(policy)
    except NotFound:
        raise InvalidRequest(f"unknown policy '{shown(policy)}'", details={"policy": shown(policy),
                                                                    "known": services.policies.names()},
                             loc=("body", "policy")) from None


@router.get("/projects/{project_id}", response_model=ProjectPublic, summary="Get a project",
            responses=documented(404, said={404: "No such project (`not_found`)."}))
def get_project(project_id: ProjectId, services: ServicesDep, caller: CallerDep) -> ProjectPublic:
    """A project: its name, routing policy, budget (limit and period), storage quota and the bytes its
    live assets hold."""
    caller.project(project_id)
    with services.db.session() as s:
        project = s.get(Project, project_id)
        if project is None:
            raise not_found("project", "project_id", project_id)
        return _public(s, services, project)


@router.patch("/projects/{project_id}", response_model=ProjectPublic, summary="Update a project",
              dependencies=[admin_only("changing a project")],
              openapi_extra=body_examples(PROJECT_UPDATE_EXAMPLES),
              responses=with_body(404, 403, said={
                  403: "Only the admin key may change a project (a project key must not lift its own budget or "
                       "storage quota): `forbidden`.",
                  404: "No such project (`not_found`).",
                  422: BODY_422 + " Or `policy` names no loaded policy (other than the project's own, which is "
                                  "taken back unchanged), or `name`, `policy` or `archived` is null "
                                  "(they cannot be removed), or `storage_quota_mb` is not a whole number from 1 to "
                                  "1073741824, or `local_seconds_per_day` one from 0 to 88473600."}))
def update_project(project_id: ProjectId, body: ProjectUpdate, services: ServicesDep) -> ProjectPublic:
    """Change the name, policy, budget, webhook or storage quota, or archive the project (`"archived":
    true`: it takes no new job; `false` takes it back). Admin key only: a project key must not lift
    its own budget or quota."""
    with services.db.transaction() as s:
        project = services.ledger.lock_project(s, project_id)  # 404 when there is none
        # The policy it has, sent back as it was read, changes nothing: with that policy's file gone,
        # a client writing the whole project back could not rename it until it changed the policy.
        kept = body.policy == project.policy and body.policy not in services.policies
        chosen = None if kept else _check_policy(services, body.policy)
        if body.name is not None:
            project.name = body.name
        if body.policy is not None:
            project.policy = body.policy
        if body.archived is not None and body.archived != (project.archived_at is not None):
            # Under the write lock (SQLite) or the project's row lock, which a submit takes before it
            # looks: no job is queued for a project once its archive has committed.
            project.archived_at = shared_now() if body.archived else None
        if "webhook_url" in body.model_fields_set:
            project.webhook_url = body.webhook_url  # null: removed (the jobs ended before it keep theirs)
        if "storage_quota_mb" in body.model_fields_set:
            # Under the lock a submit takes to read it: no job is taken past a lowered quota once it commits.
            project.storage_quota_mb = body.storage_quota_mb  # null: removed
        if "local_seconds_per_day" in body.model_fields_set:
            project.local_seconds_per_day = body.local_seconds_per_day  # null: the server's default
        if "budget" in body.model_fields_set:
            given = body.budget.model_fields_set if body.budget is not None else {"limit", "period"}
            budget = body.budget or Budget()  # null: no budget at all
            if "limit" in given:
                project.budget_limit = None if budget.limit is None else to_millicredits(budget.limit)
            if "period" in given:
                project.budget_period = budget.period
        s.add(project)
        answer = _public(s, services, project)
    if chosen is not None and chosen.keeps_all_local:
        # Nothing is sent off the machine from now on: the jobs queued under the earlier policy neither.
        services.keep_local(project_id, chosen.name)
    return answer


@router.get("/projects/{project_id}/assets", response_model=Page[AssetPublic], summary="List a project's assets",
            responses=with_query(404, said={404: "No such project (`not_found`)."}))
def list_project_assets(project_id: ProjectId, services: ServicesDep, caller: CallerDep, stage: StageFilter = None,
                        limit: Limit = 50, cursor: Cursor = None, order: Order = "asc") -> Page[AssetPublic]:
    """The project's assets, oldest first (`order=desc`: newest first; `stage` filters), a page at
    a time: pass `next_cursor` back as `cursor` until it is null."""
    caller.project(project_id)
    existing_project(services, project_id)
    with services.db.session() as s:
        stmt = (select(Asset, ASSET_TEXT).where(col(Asset.project_id) == project_id, col(Asset.deleted_at).is_(None))
                .limit(limit + 1))
        if stage:
            stmt = stmt.where(col(Asset.stage) == stage)
        stmt = paged(stmt, col(Asset.id), id_cursor(cursor, "ast") or None, order)
        with s.exec(stmt.execution_options(yield_per=PAGE_BATCH)) as result:
            rows, more = page_rows(result, limit)
    return Page(items=[asset_public(a) for a in rows], next_cursor=rows[-1].id if more else None)
