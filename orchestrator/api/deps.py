"""Dependencies named once: the service objects and bearer auth."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from orchestrator import keys, webhooks
from orchestrator.errors import Forbidden, InvalidRequest, Unauthorized, not_found
from orchestrator.models import Asset, Job, Project
from orchestrator.services import Services


# Both dependencies are `async def` because they never block: a plain `def` dependency would cost
# a thread-pool hop on every request.
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# A security scheme, not a plain header parameter: /docs then offers "Authorize" (OpenAPI ignores
# header parameters named Authorization).
bearer = HTTPBearer(auto_error=False, description="`ORCH_ADMIN_KEY`, or a project's key, when the service "
                    "sets an admin key.")


@dataclass(frozen=True)
class Caller:
    """Who a /v1 request comes from: the admin key (or anyone, on a service without one) or a
    project key, which reaches its own project only. Another project's resources are answered
    exactly as missing ones are, so a key learns nothing of what else exists."""

    project_id: str | None = None  # None: every project
    key_id: str | None = None

    def sees(self, project_id: str) -> bool:
        return self.project_id is None or self.project_id == project_id

    def project(self, project_id: str) -> None:
        if not self.sees(project_id):
            raise not_found("project", "project_id", project_id)

    def job(self, job: Job) -> Job:
        if not self.sees(job.project_id):
            raise not_found("job", "job_id", job.id)
        return job

    def asset(self, asset: Asset) -> Asset:
        if not self.sees(asset.project_id):
            raise not_found("asset", "asset_id", asset.id)
        return asset

    def admin(self, action: str) -> None:
        if self.project_id is not None:
            raise Forbidden(f"{action} needs the admin key; a project key cannot do it",
                            details={"project_id": self.project_id})


ADMIN = Caller()


def existing_project(services: Services, project_id: str) -> Project:
    """The project `project_id` names, or 404 `not_found`. One look-up for the routes of one
    project (its budget, ledger, assets, keys), so that each says a missing project the same way."""
    with services.db.session() as s:
        project = s.get(Project, project_id)
    if project is None:
        raise not_found("project", "project_id", project_id)
    return project


def check_asset(services: Services, caller: Caller, asset_id: str) -> None:
    """Refuse another project's asset before anything about the request is judged (a validation
    error would tell a key the asset exists). The admin key skips the read."""
    if caller.project_id is None:
        return
    with services.db.session() as s:
        asset = s.get(Asset, asset_id)
    if asset is None:
        raise not_found("asset", "asset_id", asset_id)
    caller.asset(asset)


def check_receiver(services: Services, caller: Caller, project_id: str, webhook_url: str | None) -> None:
    """For a project key's request naming a job `webhook_url`: 403 unless that is on its project's
    receiver (`webhooks.refuse_foreign_receiver`), whose URL only the admin key sets. The admin key
    may name any URL the validator takes."""
    if caller.project_id is None or webhook_url is None:
        return
    with services.db.session() as s:
        project = s.get(Project, project_id)
        project_url = project.webhook_url if project is not None else None
    webhooks.refuse_foreign_receiver(webhook_url, project_url, project_id)


def check_job(services: Services, caller: Caller, job_id: str) -> None:
    """As `check_asset`, for a job."""
    if caller.project_id is not None:
        caller.job(services.jobs.get(job_id))


async def authenticate(services: Services, authorization: Sequence[str]) -> Caller:
    """When `ORCH_ADMIN_KEY` is set, every /v1 request carries one `Authorization: Bearer <key>`
    header (`authorization`: every one it carries): the admin key, or a live project key."""
    admin_key = services.settings.admin_key
    if admin_key is None:
        return ADMIN
    if len(authorization) > 1:
        # Which one counts differs from one server, proxy or framework to the next: none does.
        raise Unauthorized("send one 'Authorization: Bearer <key>' header, not several")
    scheme, _, token = (authorization[0] if authorization else "").partition(" ")
    # HTTP headers arrive as latin-1 text: back to the bytes the client sent, which for a non-ASCII
    # key are its UTF-8 encoding.
    sent = token.strip(" \t").encode("latin-1", errors="replace")  # HTTP's whitespace, not Unicode's
    if scheme.lower() == "bearer":
        # Digests of the two, of one length: compare_digest may tell how long a key of another length is.
        if secrets.compare_digest(hashlib.sha256(sent).digest(),
                                  hashlib.sha256(admin_key.get_secret_value().encode()).digest()):
            return ADMIN
        if keys.SECRET_RE.fullmatch(sent.decode("latin-1")):  # anything else needs no database read
            found = await asyncio.to_thread(keys.find, services.db, sent.decode("latin-1"))
            if found is not None:
                return Caller(project_id=found.project_id, key_id=found.id)
    raise Unauthorized("a valid 'Authorization: Bearer <key>' header is required")


async def caller_of(request: Request) -> Caller:
    """The request's caller, authenticated once however many ask (`orchestrator.api.auth`, before
    the body is read, then `require_auth`)."""
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:
        caller = request.state.caller = await authenticate(request.app.state.services,
                                                           request.headers.getlist("authorization"))
    return caller


async def require_auth(request: Request,
                       _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    return await caller_of(request)


# The routers depend on `require_auth` too; FastAPI runs it once per request and hands both the result.
CallerDep = Annotated[Caller, Depends(require_auth)]


def admin_only(action: str) -> Any:
    """A route's dependency: only the admin key may do `action`. It runs before the body and the
    route's parameters are validated, so a project key is answered 403, not told what is wrong with
    a body it may not send (it was a 422); another project's id is 404, as its other resources are.
    (A body that is not JSON at all, and a query parameter given twice, are refused before it.)"""

    async def check(request: Request, caller: CallerDep) -> None:
        project_id = request.path_params.get("project_id")
        if isinstance(project_id, str):
            caller.project(project_id)
        caller.admin(action)

    return Depends(check)


MAX_KEY = 255  # characters, as the column keeps them


async def idempotency_key(
    request: Request,
    # Its length is checked below, in characters once decoded: the header's latin-1 reading of a
    # non-ASCII key is up to 4 times as long, so a bound here would be the wrong one for clients.
    key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, json_schema_extra={"maxLength": MAX_KEY},
                                      description=f"UTF-8 text of at most {MAX_KEY} characters")] = None,
) -> str | None:
    # Two keys on one request: whichever one we kept, a retry sending the other would run twice.
    if len(request.headers.getlist("idempotency-key")) > 1:
        raise InvalidRequest("send one Idempotency-Key header, not several",
                             details={"errors": [{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                                                  "msg": "more than one Idempotency-Key header"}]})
    if key is None:
        return None
    # Whitespace around a header value is not part of it (RFC 9110): a proxy or client that trims
    # it must not turn a retry into a second job.
    key = key.strip(" \t")
    try:
        # Header values reach us as latin-1: the bytes of a UTF-8 key (`clé`) read as `clÃ©`.
        key = key.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_key("the Idempotency-Key header must be UTF-8 text", "not UTF-8") from None
    if len(key) > MAX_KEY:
        raise _bad_key(f"the Idempotency-Key header is longer than {MAX_KEY} characters",
                       f"more than {MAX_KEY} characters")
    if not key:
        raise InvalidRequest("the Idempotency-Key header is empty",
                             details={"errors": [{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                                                  "msg": "an empty key"}]})
    return key


def _bad_key(message: str, why: str) -> InvalidRequest:
    return InvalidRequest(message, details={"errors": [{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                                                        "msg": why}]})


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]
