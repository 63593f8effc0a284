"""Dependencies named once: the service objects and bearer auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from orchestrator.errors import Unauthorized
from orchestrator.services import Services


# Both dependencies are `async def` because they never block: a plain `def` dependency would cost
# a thread-pool hop on every request.
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def require_auth(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """When `ORCH_ADMIN_KEY` is set, every /v1 request carries `Authorization: Bearer <key>`.
    Project-scoped keys will plug in here, returning the caller's scope."""
    key = services.settings.admin_key
    if key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                key.get_secret_value().encode()):
        raise Unauthorized("a valid 'Authorization: Bearer <key>' header is required")


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255, min_length=1)]
