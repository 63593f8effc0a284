"""Dependencies named once: the service objects and bearer auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from orchestrator.errors import Unauthorized
from orchestrator.services import Services
from orchestrator.settings import Settings


# Both dependencies are `async def` because they never block: a plain `def` dependency would cost
# a thread-pool hop on every request.
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# A security scheme, not a plain header parameter: /docs then offers "Authorize" (OpenAPI ignores
# header parameters named Authorization).
bearer = HTTPBearer(auto_error=False, description="`ORCH_ADMIN_KEY`, when the service sets one.")


def check_bearer(settings: Settings, authorization: str | None) -> None:
    """When `ORCH_ADMIN_KEY` is set, every /v1 request carries `Authorization: Bearer <key>`.
    Project-scoped keys will plug in here, returning the caller's scope."""
    key = settings.admin_key
    if key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    # HTTP headers arrive as latin-1 text: back to the bytes the client sent, which for a non-ASCII
    # key are its UTF-8 encoding.
    sent = token.strip().encode("latin-1", errors="replace")
    if scheme.lower() != "bearer" or not secrets.compare_digest(sent, key.get_secret_value().encode()):
        raise Unauthorized("a valid 'Authorization: Bearer <key>' header is required")


async def require_auth(services: ServicesDep, request: Request,
                       _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    check_bearer(services.settings, request.headers.get("authorization"))


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255, min_length=1)]
