"""Project-scoped API keys (admin only): make one, list them, revoke one."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from orchestrator import idempotency, keys
from orchestrator.api.deps import IdempotencyKey, ServicesDep, admin_only, existing_project
from orchestrator.api.docs import KEY_EXAMPLES, body_examples, created, documented, with_body, with_query
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.api.paths import KeyId, ProjectId
from orchestrator.api.query import Cursor, Limit, Order
from orchestrator.errors import Conflict
from orchestrator.ids import id_cursor
from orchestrator.models import ApiKey
from orchestrator.schemas import Name, Page, Strict

# Every route here is the admin's; checked before the body and the parameters are validated (`admin_only`).
router = APIRouter(tags=["keys"], route_class=StrictJSONRoute, dependencies=[admin_only("managing API keys")])
_ADMIN_ONLY = "Only the admin key may manage API keys; the request came with a project key (`forbidden`)."
_NO_PROJECT = "No such project (`not_found`)."
_NO_KEY = "No such project, or no such key in it (`not_found`)."


class KeyCreate(Strict):
    """A new project key."""

    name: Name = Field(description="What the key is for: 1 to 200 characters, no control characters.")


class KeyPublic(BaseModel):
    """A project key, without its secret."""

    id: str = Field(description="The key's id (`key_...`).")
    project_id: str = Field(description="The one project it reaches.")
    name: str = Field(description="What it is for.")
    prefix: str = Field(description="The secret's first characters, to tell keys apart.")
    created_at: datetime = Field(description="When it was made (RFC 3339, UTC).")
    revoked_at: datetime | None = Field(description="When it was revoked (it gets 401 since); null: it works.")


class KeyCreated(KeyPublic):
    """The key just made, with its secret: shown in this answer only."""

    key: str = Field(description="The secret, for `Authorization: Bearer`. Shown only in this answer.")


def _public(key: ApiKey) -> KeyPublic:
    return KeyPublic(id=key.id, project_id=key.project_id, name=key.name, prefix=key.prefix,
                     created_at=key.created_at, revoked_at=key.revoked_at)


@router.post("/projects/{project_id}/keys", status_code=201, response_model=KeyCreated,
             summary="Make a project key", openapi_extra=body_examples(KEY_EXAMPLES),
             responses={**created("The key: `/v1/projects/{id}/keys/{key_id}`.", replayable=False),
                        **with_body(403, 404, 409, idempotency_key=True, said={
                            403: _ADMIN_ONLY, 404: _NO_PROJECT,
                            409: "The service has no ORCH_ADMIN_KEY, without which a project key would restrict "
                                 "nothing (`conflict`); or this Idempotency-Key made a key already, whose secret "
                                 "cannot be shown again (`conflict`, `details.key_id`: revoke it if the secret was "
                                 "lost), or was used with another body (`idempotency_conflict`)."})})
def create_key(project_id: ProjectId, body: KeyCreate, services: ServicesDep, request: Request,
               response: Response, idempotency_key: IdempotencyKey = None) -> KeyCreated:
    """Make a key that reaches this project only. Its secret is in this answer and nowhere else:
    store it now. Sent again with its `Idempotency-Key`, the request makes no second key; as the
    secret cannot be shown again, the answer is a 409 naming the key made (revoke it if the secret
    was lost)."""
    existing_project(services, project_id)
    if services.settings.admin_key is None:
        raise Conflict("project keys need ORCH_ADMIN_KEY: without it the API is open to everyone, and a "
                       "project key would restrict nothing")
    idempotent = (idempotency_key, request.url.path, idempotency.request_hash(body)) if idempotency_key else None
    key, secret = keys.create(services.db, project_id, body.name, idempotent)
    response.headers["Location"] = f"/v1/projects/{project_id}/keys/{key.id}"
    response.headers["Cache-Control"] = "no-store"  # the secret: no proxy or browser cache may keep it
    return KeyCreated(**_public(key).model_dump(), key=secret)


@router.get("/projects/{project_id}/keys", response_model=Page[KeyPublic], summary="List a project's keys",
            responses=with_query(403, 404, said={403: _ADMIN_ONLY, 404: _NO_PROJECT}))
def list_keys(project_id: ProjectId, services: ServicesDep,
              limit: Limit = 50, cursor: Cursor = None, order: Order = "asc") -> Page[KeyPublic]:
    """The project's keys, revoked ones included (without their secrets)."""
    existing_project(services, project_id)
    rows = keys.listed(services.db, project_id, after=id_cursor(cursor, "key"), limit=limit + 1,
                       newest_first=order == "desc")
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=[_public(k) for k in rows], next_cursor=rows[-1].id if more else None)


@router.get("/projects/{project_id}/keys/{key_id}", response_model=KeyPublic, summary="Get a project key",
            responses=documented(403, 404, said={403: _ADMIN_ONLY, 404: _NO_KEY}))
def get_key(project_id: ProjectId, key_id: KeyId, services: ServicesDep) -> KeyPublic:
    """One key (without its secret): whether it is revoked, and since when."""
    existing_project(services, project_id)
    return _public(keys.get(services.db, project_id, key_id))


@router.delete("/projects/{project_id}/keys/{key_id}", response_model=KeyPublic, summary="Revoke a project key",
               responses=documented(403, 404, said={403: _ADMIN_ONLY, 404: _NO_KEY}))
def revoke_key(project_id: ProjectId, key_id: KeyId, services: ServicesDep) -> KeyPublic:
    """Revoke a key: from now on it gets 401. Revoking a revoked key answers it unchanged."""
    existing_project(services, project_id)
    return _public(keys.revoke(services.db, project_id, key_id))
