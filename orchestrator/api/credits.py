"""Budgets, the ledger, grants and spend reports."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from sqlmodel import col, select

from orchestrator import idempotency
from orchestrator.api.deps import CallerDep, IdempotencyKey, ServicesDep, admin_only, existing_project
from orchestrator.api.docs import (
    GRANT_EXAMPLES,
    QUERY_422,
    RECONCILE_EXAMPLES,
    body_examples,
    created,
    documented,
    with_body,
    with_query,
)
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.api.paths import EntryId, ProjectId
from orchestrator.api.query import Cursor, Limit, Order, paged
from orchestrator.api.times import Rfc3339, utc_bound
from orchestrator.clock import iso
from orchestrator.errors import InvalidRequest, not_found
from orchestrator.ids import MAX_INT_ID, int_cursor
from orchestrator.models import LedgerEntry, Project
from orchestrator.schemas import MAX_CREDITS, Credits, GroupBy, NoBool, Page, SpendReport, Strict, Thousandths
from orchestrator.spend import savings, spend, to_csv
from tiers.base import to_credits, to_millicredits

router = APIRouter(tags=["credits"], route_class=StrictJSONRoute)
_NO_PROJECT = "No such project (`not_found`)."


class BudgetPublic(BaseModel):
    """A project's budget in its current window, in credits."""

    limit: float | None = Field(description="Credits the project's jobs may cost in a window; null: no limit.")
    period: str = Field(description="`day`, `week`, `month` (UTC calendar windows) or `none` (one window for all "
                                    "time).")
    window_start: datetime | None = Field(description="The current window's start (UTC); null for `none`.")
    window_end: datetime | None = Field(description="Its end, exclusive; null for `none`.")
    charged: float = Field(description="Charged in the window: captures and adjustments.")
    held: float = Field(description="Reserved by open holds: the estimates of paid jobs not yet ended.")
    granted: float = Field(description="Granted in the window (`POST .../grants`), on top of the limit.")
    available: float | None = Field(description="`limit + granted - charged - held`: what new paid jobs may hold; "
                                                "negative when the window is over its limit (a limit lowered under "
                                                "what was charged, metered local work, a charge over its "
                                                "estimate); null: no limit.")


class LedgerEntryPublic(BaseModel):
    """An entry of a project's ledger: append-only, one movement of credits."""

    # Strings, as every id of the API (and the ledger's own next_cursor) is; integers inside.
    id: str = Field(description="The entry's id, digits: the ledger's `cursor`.")
    project_id: str = Field(description="The project whose budget it moves.")
    job_id: str | None = Field(description="The job it is for; null for a grant.")
    kind: Literal["grant", "hold", "capture", "release", "adjustment"] = Field(description=(
        "`grant`: credits added; `hold`: a paid job's estimate, reserved when it was made; `capture`: what the job "
        "cost, charged; `release`: a hold given back; `adjustment`: a reconciliation's difference."))
    amount: float = Field(description="Credits, to the thousandth: positive, but for an adjustment (signed).")
    engine: str | None = Field(description="The engine of its job; null for a grant.")
    stage: str | None = Field(description="The stage of its job; null for a grant.")
    hold_id: str | None = Field(description="The hold a capture or release settles (an adjustment: its capture's).")
    unreconciled: bool = Field(description="A capture charged without the provider's word on the cost: it waits for "
                                           "`POST .../ledger/{id}/reconcile`.")
    over_hold: bool = Field(description="A capture above its hold: the provider charged more than the estimate.")
    settled: bool | None = Field(description="on a hold: whether its capture or release is written (false while "
                                             "its job runs); null on other kinds")
    created_at: datetime = Field(description="When it was written (RFC 3339, UTC).")
    note: str | None = Field(description="The note a grant or reconciliation came with, or the service's (why a "
                                          "hold was released or captured: `rest of the hold`, an error's code).")


class GrantCreate(Strict):
    """Credits added to a project's budget in its current window."""

    amount: Annotated[float, NoBool, Field(gt=0, le=MAX_CREDITS, allow_inf_nan=False,
                                           description="Credits, to the thousandth: at most 3 decimals."), Thousandths]
    note: Annotated[str, Field(max_length=500)] | None = Field(None, description="Why, for the ledger's readers.")


def _entry(e: LedgerEntry) -> LedgerEntryPublic:
    assert e.id is not None
    return LedgerEntryPublic(id=str(e.id), project_id=e.project_id, job_id=e.job_id, kind=e.kind,
                             amount=to_credits(e.amount), engine=e.engine, stage=e.stage,
                             hold_id=None if e.hold_id is None else str(e.hold_id),
                             unreconciled=e.unreconciled, over_hold=e.over_hold,
                             settled=e.settled if e.kind == "hold" else None, created_at=e.created_at,
                             note=e.note)


@router.get("/projects/{project_id}/budget", response_model=BudgetPublic, summary="Get a project's budget",
            responses=documented(404, said={404: _NO_PROJECT}))
def get_budget(project_id: ProjectId, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """The project's budget in its current window (UTC calendar day, ISO week or month): what was
    charged and granted in it, what open holds reserve, and what is available for new paid jobs."""
    caller.project(project_id)
    project = existing_project(services, project_id)
    with services.db.snapshot() as s:
        return services.ledger.balance(s, project).public()


@router.get("/projects/{project_id}/ledger", response_model=Page[LedgerEntryPublic],
            summary="List a project's ledger entries", responses=with_query(404, said={404: _NO_PROJECT}))
def get_ledger(project_id: ProjectId, services: ServicesDep, caller: CallerDep,
               limit: Limit = 50, cursor: Cursor = None,
               unreconciled: Annotated[bool | None, Query(description=(
                   "`true`: only captures that wait for reconciliation with the provider's invoice (charged at "
                   "their estimate when the outcome was unknown, or as reported when that was over twice the "
                   "estimate); `false`: all but those."))] = None,
               order: Order = "asc") -> Page[LedgerEntryPublic]:
    """The project's entries, oldest first (`order=desc`: newest first); `unreconciled=true` lists
    the captures still waiting for a person to check them against the provider's invoice."""
    caller.project(project_id)
    existing_project(services, project_id)
    after = int_cursor(cursor)
    with services.db.session() as s:
        stmt = select(LedgerEntry).where(col(LedgerEntry.project_id) == project_id).limit(limit + 1)
        if unreconciled is not None:
            stmt = stmt.where(col(LedgerEntry.unreconciled).is_(unreconciled))
        stmt = paged(stmt, col(LedgerEntry.id), after, order)
        rows = list(s.exec(stmt).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=[_entry(e) for e in rows], next_cursor=str(rows[-1].id) if more else None)


@router.post("/projects/{project_id}/grants", status_code=201, response_model=LedgerEntryPublic,
             dependencies=[admin_only("granting credits")],
             summary="Grant credits to a project", operation_id="grant_credits",
             openapi_extra=body_examples(GRANT_EXAMPLES),
             responses={**created(None, replayable=True), **with_body(403, 404, 409, idempotency_key=True, said={
                 403: "Only the admin key may grant credits; the request came with a project key (`forbidden`).",
                 404: _NO_PROJECT,
                 409: "The Idempotency-Key was used with another body (`idempotency_conflict`)."})})
def grant(project_id: ProjectId, body: GrantCreate, services: ServicesDep, request: Request,
          response: Response, idempotency_key: IdempotencyKey = None) -> LedgerEntryPublic:
    """Top up the project's budget for the current window (an append-only `grant` entry; admin key
    only). With an `Idempotency-Key`, a retried grant answers with the first one's entry and grants
    nothing."""
    scope, digest = request.url.path, idempotency.request_hash(body)
    with services.db.transaction() as s:
        # Under the project's lock: of two requests with one key, the second finds the first's row.
        services.ledger.lock_project(s, project_id)
        earlier = idempotency.recall(s, idempotency_key, scope, digest) if idempotency_key else None
        if earlier is not None:
            assert earlier.ledger_entry_id is not None  # the scope is this path: only grants
            entry = s.get(LedgerEntry, earlier.ledger_entry_id)
            assert entry is not None
            response.headers["Idempotent-Replayed"] = "true"
            return _entry(entry)
        entry = services.ledger.grant(s, project_id, to_millicredits(body.amount), body.note)
        s.flush()
        if idempotency_key:
            assert entry.id is not None
            idempotency.remember(s, idempotency_key, scope, digest, ledger_entry_id=entry.id)
        return _entry(entry)


class Reconcile(Strict):
    """What the provider's invoice says an unreconciled capture cost."""

    charged: Credits = Field(description="What the provider's invoice says the job cost, in credits (0: it charged "
                                         "nothing), to the thousandth: at most 3 decimals.")
    note: Annotated[str, Field(max_length=500)] | None = Field(None, description="The invoice, for the ledger's "
                                                                                 "readers.")


@router.post("/projects/{project_id}/ledger/{entry_id}/reconcile", status_code=201, response_model=LedgerEntryPublic,
             dependencies=[admin_only("reconciling the ledger")],
             summary="Reconcile a capture with the provider's invoice", openapi_extra=body_examples(RECONCILE_EXAMPLES),
             responses={**created(None, replayable=True), **with_body(403, 404, 409, idempotency_key=True, said={
                 403: "Only the admin key may reconcile the ledger; the request came with a project key "
                      "(`forbidden`).",
                 404: "No such project, or no such entry in its ledger (`not_found`).",
                 409: "The entry is not an unreconciled capture, or it was reconciled already (`conflict`); or the "
                      "Idempotency-Key was used with another body (`idempotency_conflict`)."})})
def reconcile(project_id: ProjectId, entry_id: EntryId, body: Reconcile, services: ServicesDep,
              request: Request, response: Response, idempotency_key: IdempotencyKey = None) -> LedgerEntryPublic:
    """Settle an `unreconciled` capture (a call whose outcome was unknown, charged at its estimate)
    with the invoiced cost: answers the `adjustment` entry of the difference (admin key only). A
    capture is reconciled once; again is 409, unless sent with the first one's `Idempotency-Key`
    (and body), which answers with its entry: a client whose answer was lost learns it succeeded."""
    if not _ENTRY_ID.fullmatch(entry_id) or int(entry_id) > MAX_INT_ID:
        raise not_found("ledger entry", "entry_id", entry_id)
    scope, digest = request.url.path, idempotency.request_hash(body)
    with services.db.transaction() as s:
        services.ledger.lock_project(s, project_id)
        earlier = idempotency.recall(s, idempotency_key, scope, digest) if idempotency_key else None
        if earlier is not None:
            assert earlier.ledger_entry_id is not None  # the scope is this path: this entry's reconcile
            replayed = s.get(LedgerEntry, earlier.ledger_entry_id)
            assert replayed is not None
            response.headers["Idempotent-Replayed"] = "true"
            return _entry(replayed)
        adjustment = services.ledger.reconcile(s, project_id, int(entry_id), to_millicredits(body.charged), body.note)
        s.flush()
        if idempotency_key:
            assert adjustment.id is not None
            idempotency.remember(s, idempotency_key, scope, digest, ledger_entry_id=adjustment.id)
        return _entry(adjustment)


_ENTRY_ID = re.compile(r"[1-9][0-9]{0,9}")  # digits without leading zeros, at most MAX_INT_ID


def _csv_name(report: dict[str, Any], project_id: str | None) -> str:
    """`spend-by-day-from-20261101T000000Z-to-20261201T000000Z.csv`, with the project's id after
    `spend-` for one project's: files saved from several windows or projects do not overwrite one
    another, and each says what it holds (fractions of a second included: they move a bound)."""
    parts = ["spend", *([project_id] if project_id else []), f"by-{report['group_by']}"]
    for bound in ("from", "to"):
        if report[bound] is not None:
            when = report[bound]  # the year by hand: `%Y` does not pad years before 1000 (glibc)
            fraction = f".{when.microsecond:06d}".rstrip("0") if when.microsecond else ""
            parts.append(f"{bound}-{when.year:04d}{when.strftime('%m%dT%H%M%S')}{fraction}Z")
    return "-".join(parts) + ".csv"


@router.get("/spend", summary="Report spend", responses={
    200: {"model": SpendReport, "content": {"text/csv": {"schema": {"type": "string"}}},
          "description": "The report: JSON, or CSV with `format=csv`.", "headers": {
              "Content-Disposition": {"description": "With `format=csv`: `attachment; filename=\"spend-by-day-from-"
                                                     "20261101T000000Z-to-20261201T000000Z.csv\"` (the bounds given; "
                                                     "one project's has its id after `spend-`)",
                                      "schema": {"type": "string"}}}},
    **with_query(404, said={404: "`project_id` names no project (`not_found`).",
                            422: QUERY_422 + " Or `from` or `to` is no RFC 3339 time with a zone, or `from` is after "
                                             "`to`."})})
def get_spend(services: ServicesDep, caller: CallerDep,
              group_by: Annotated[GroupBy, Query(description="How the charges are grouped: by UTC day, engine, "
                                                             "stage or project.")] = "day",
              from_: Annotated[Rfc3339 | None, Query(alias="from", description=(
                  "Charges at or after this time: RFC 3339 with a zone, e.g. 2026-11-01T00:00:00Z (URL-encode a "
                  "+01:00)."))] = None,
              to: Annotated[Rfc3339 | None, Query(description="Charges before this time (RFC 3339, a zone).")] = None,
              project_id: Annotated[str | None, Query(description="One project's spend (a project key's is its "
                                                                  "own).")] = None,
              format: Annotated[Literal["json", "csv"], Query(description="`csv`: a CSV file of the groups and "
                                                                          "their total.")] = "json") -> Response:
    """Spend of every project, or of one; a project key's report is its own project's."""
    if caller.project_id is not None:
        caller.project(project_id or caller.project_id)
        project_id = caller.project_id
    from_, to = utc_bound("from", from_), utc_bound("to", to)
    if from_ and to and from_ > to:  # equal bounds are an empty window, as a dashboard may compute one
        raise InvalidRequest("'from' must not be after 'to'", loc=("query", "from"))
    with services.db.snapshot() as s:
        if project_id and s.get(Project, project_id) is None:  # a mistyped id is not a project that spent nothing
            raise not_found("project", "project_id", project_id)
        report = spend(s, group_by, from_, to, project_id)
        if format != "csv":  # the CSV has no column for it: every draft of the period counted for nothing
            report["savings"] = savings(s, services.registry, from_, to, project_id)
    if format == "csv":
        named = _csv_name(report, project_id)
        return PlainTextResponse(to_csv(report), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{named}"'})
    # Times as everywhere else in the API: UTC with a Z.
    for name in ("from", "to"):
        if report[name] is not None:
            report[name] = iso(report[name])
    return JSONResponse(jsonable_encoder(report))
