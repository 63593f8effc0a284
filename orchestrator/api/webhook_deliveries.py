"""Webhook deliveries: a project's listed, every project's listed (admin key), and one sent again
(`orchestrator.webhook_deliveries`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from orchestrator import webhook_deliveries
from orchestrator.api.deps import CallerDep, ServicesDep, admin_only
from orchestrator.api.docs import QUERY_422, documented, with_query
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.api.paths import DeliveryId, ProjectId
from orchestrator.api.query import Cursor, Limit, Order
from orchestrator.api.times import Rfc3339, utc_bound
from orchestrator.errors import InvalidRequest, not_found
from orchestrator.ids import id_cursor
from orchestrator.models import Job, Project
from orchestrator.schemas import DeliveryStatus, Page, WebhookDeliveryPublic

router = APIRouter(tags=["webhooks"], route_class=StrictJSONRoute)
Since = Annotated[Rfc3339 | None, Query(description=(
    "Only deliveries made (`created_at`) at or after this time: RFC 3339 with a zone, e.g. 2026-11-01T00:00:00Z "
    "(URL-encode a +01:00 as %2B01:00)."))]
Until = Annotated[Rfc3339 | None, Query(description=(
    "Only deliveries made (`created_at`) before this time (RFC 3339, a zone)."))]
_WINDOW_422 = QUERY_422 + " Or `since` or `until` is no RFC 3339 time with a zone, or `since` is after `until`."


def _window(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """The `?since=` and `?until=` bounds in UTC; 422 for a window that ends before it starts."""
    since, until = utc_bound("since", since), utc_bound("until", until)
    if since and until and since > until:  # equal bounds are an empty window, as a dashboard may compute one
        raise InvalidRequest("'since' must not be after 'until'", loc=("query", "since"))
    return since, until


@router.get("/projects/{project_id}/webhook-deliveries", response_model=Page[WebhookDeliveryPublic],
            summary="List a project's webhook deliveries",
            responses=with_query(404, said={404: "No such project, or `job_id` names no job of it (`not_found`).",
                                             422: _WINDOW_422}))
def list_webhook_deliveries(
    project_id: ProjectId, services: ServicesDep, caller: CallerDep,
    status: Annotated[DeliveryStatus | None, Query(description=(
        "Only deliveries in this status: `pending`, `delivered` or `failed` (given up); left out: any."))] = None,
    job_id: Annotated[str | None, Query(description=(
        "Only this job's delivery; a job that is not the project's is a 404."))] = None,
    limit: Limit = 50, cursor: Cursor = None,
    order: Annotated[Order, Query(description=(
        "`desc`: newest first (the default here); `asc`: oldest first. A page's `next_cursor` goes on in the same "
        "order."))] = "desc",
    since: Since = None, until: Until = None,
) -> Page[WebhookDeliveryPublic]:
    """The project's webhook deliveries (each job's end POSTed to its `webhook_url`), newest first:
    where each went, its status, attempts and last error, a page at a time. A project key reads its
    own project's."""
    caller.project(project_id)
    after = id_cursor(cursor, "whd")
    since, until = _window(since, until)
    with services.db.snapshot() as s:
        if s.get(Project, project_id) is None:
            raise not_found("project", "project_id", project_id)
        if job_id is not None:
            job = s.get(Job, job_id)
            if job is None or job.project_id != project_id:  # a mistyped id is not a job without deliveries
                raise not_found("job", "job_id", job_id)
        rows = webhook_deliveries.listed(s, project_id, status=status, job_id=job_id, after=after, order=order,
                                         limit=limit + 1, since=since, until=until)
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=[webhook_deliveries.delivery_public(row, project_id) for row in rows],
                next_cursor=rows[-1].id if more else None)


@router.get("/webhooks/deliveries", response_model=Page[WebhookDeliveryPublic],
            summary="List every project's webhook deliveries (admin key)",
            dependencies=[admin_only("listing every project's webhook deliveries")],
            responses=with_query(403, 404, said={
                403: "A project key (`forbidden`): it lists its own project's at "
                     "`GET /v1/projects/{project_id}/webhook-deliveries`.",
                404: "`project_id` names no project (`not_found`).", 422: _WINDOW_422}))
def list_all_webhook_deliveries(
    services: ServicesDep,
    status: Annotated[DeliveryStatus | None, Query(description=(
        "Only deliveries in this status: `pending`, `delivered` or `failed` (given up); left out: any."))] = None,
    project_id: Annotated[str | None, Query(description="Only this project's deliveries; left out: every project's.")]
    = None,
    limit: Limit = 50, cursor: Cursor = None,
    order: Annotated[Order, Query(description=(
        "`desc`: newest first (the default here); `asc`: oldest first. A page's `next_cursor` goes on in the same "
        "order."))] = "desc",
    since: Since = None, until: Until = None,
) -> Page[WebhookDeliveryPublic]:
    """Every project's webhook deliveries, newest first, a page at a time: the studio's view of
    what its receivers got, are still to get (`?status=pending`) or never got (`?status=failed`),
    each naming its `project_id`. The admin key only."""
    after = id_cursor(cursor, "whd")
    since, until = _window(since, until)
    with services.db.snapshot() as s:
        if project_id is not None and s.get(Project, project_id) is None:
            raise not_found("project", "project_id", project_id)
        rows = webhook_deliveries.listed(s, project_id, status=status, job_id=None, after=after, order=order,
                                         limit=limit + 1, since=since, until=until)
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=[webhook_deliveries.delivery_public(row, row.project_id or "") for row in rows],
                next_cursor=rows[-1].id if more else None)


@router.post("/webhook-deliveries/{delivery_id}/redeliver", status_code=202, response_model=WebhookDeliveryPublic,
             summary="Send a webhook delivery again, or a pending one now",
             responses={202: {"description": (
                 "Delivered or failed: due now (`pending`, 0 attempts). Pending: due now, its attempts kept (or, "
                 "being sent at that moment, left to that send). The delivery as it is.")},
                        **documented(404, 409, said={
                            404: "No such delivery (`not_found`).",
                            409: "Neither its job nor its project has a `webhook_url` now (`no_webhook_url`), to "
                                 "redeliver a delivered "
                                 "or failed one; or it became pending as it was redelivered (`delivery_pending`)."})})
def redeliver_webhook(delivery_id: DeliveryId, services: ServicesDep, caller: CallerDep) -> WebhookDeliveryPublic:
    """Send a delivered or given-up (`failed`) delivery again: it is due at once, with a fresh
    budget of attempts, under the same id (the `webhook-id` its receiver dedupes by), to the job's
    own `webhook_url`, else the project's **current** one, the job as it is now in its body. A
    `pending` one waiting for its next retry is made due at once instead, nothing else changed (its
    attempts, last error and URL kept); one a process is sending at that moment is left to that
    send (sent once). Sent by any process that runs jobs, within ORCH_POLL_INTERVAL. The admin key,
    or the project's own key: it sends nothing but the job's end, to the URL the job was made with
    or the one only the admin sets."""
    return webhook_deliveries.redeliver(services.db, delivery_id, caller.project_id)
