"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import DatabaseError
from starlette.requests import Request
from starlette.routing import Route

from orchestrator import __version__
from orchestrator.api import (
    assets,
    credits,
    engines,
    jobs,
    keys,
    policies,
    projects,
    stages,
    webhook_deliveries,
    workers,
)
from orchestrator.api.auth import KeyBeforeBody
from orchestrator.api.cross_site import UNSAFE, Cors, CrossSiteGuard
from orchestrator.api.deps import ServicesDep, require_auth
from orchestrator.api.docs import (
    ANY_OTHER_ERROR,
    FOREIGN_PAGE_403,
    clean_schema_names,
    documented,
    restore_examples,
)
from orchestrator.api.errors import UnexpectedErrors
from orchestrator.api.errors import install as install_errors
from orchestrator.api.head import HeadAsGet
from orchestrator.api.query import DropEmptyQueryValues, single_valued_query
from orchestrator.api.request_limits import RequestLimits
from orchestrator.db import (
    Database,
    WriteLockHeld,
    WritesRefused,
    refuses_writes,
    replaced,
    tables_missing,
    transient,
)
from orchestrator.errors import DatabaseUnavailable
from orchestrator.outage import Outage
from orchestrator.schemas import Health
from orchestrator.services import Services
from orchestrator.settings import Settings

log = logging.getLogger(__name__)
READY_SECONDS = 2.0  # how long /readyz waits for the database's answer
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"  # the text exposition format, versioned


class Readiness:
    """/readyz's question to the database (`Database.ping`): one at a time, on a daemon thread of its
    own. A probe per request on the shared thread pool held a thread (and a connection) for as
    long as a stalled database took, and twenty of them starved the service's own work (a project
    key's look-up waited 18 s); probes that come while one is out wait for its answer instead."""

    def __init__(self) -> None:
        self._pending: asyncio.Future[None] | None = None
        # A held write lock is told as a line, as a database away is: not a bug's traceback.
        self._outage = Outage(log, "the readiness check", "/readyz answers 503", level=logging.WARNING,
                              away=lambda exc: transient(exc) or isinstance(exc, WriteLockHeld | WritesRefused))

    async def check(self, db: Database) -> None:
        if self._pending is None or self._pending.done():
            self._pending = self._ask(db)
        try:
            await asyncio.wait_for(asyncio.shield(self._pending), READY_SECONDS)
        except Exception as exc:  # a timeout, a refused connection, a full pool: not ready, whatever it is
            self._outage.failed(exc)
            if isinstance(exc, TimeoutError):
                said = f"did not answer within {READY_SECONDS:g} s"
            elif isinstance(exc, WriteLockHeld):
                said = (f"lets no write start: its write lock has been held for over {exc.waited:g} s (a process "
                        "stopped mid-transaction, or another program's long write), and every write waits for it")
            elif replaced(exc):
                said = "file was replaced or removed under the running service (a restore?): restart the service"
            elif isinstance(exc, WritesRefused) or refuses_writes(exc):
                said = ("takes no writes: a read-only standby or session (a failover under way, a maintenance "
                        "window, or the URL names a replica)")
            elif tables_missing(exc):
                said = "lacks some or all of this service's tables (made anew, or a restore under way)"
            else:
                said = f"refused the check ({type(exc).__name__})"
            raise DatabaseUnavailable(f"the database {said}") from None
        self._outage.recovered()

    @staticmethod
    def _ask(db: Database) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if answer.done():
                return
            if error is None:
                answer.set_result(None)
            else:
                answer.set_exception(error)

        def ping() -> None:
            error: BaseException | None = None
            try:
                db.ping()
            except Exception as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed while the database was away
                loop.call_soon_threadsafe(settle, error)

        # Its failure is read by the probes that wait for it, or by nobody once they timed out.
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())
        threading.Thread(target=ping, name="readyz ping", daemon=True).start()
        return answer


def create_app(settings: Settings | None = None, *, loopback_only: bool = False) -> FastAPI:
    """The service. `loopback_only`: it listens on this machine only, without a key (`serve` says
    so): a request naming another host, as a DNS-rebinding page's does, is refused."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            services = await asyncio.to_thread(Services.build, settings)
            services.bus.bind(asyncio.get_running_loop())
            app.state.services = services
            if settings.run_jobs:
                await services.start()
            else:
                services.listen()
                services.scheduler.sweep_only()  # the jobs of a worker that died are recovered here too
                log.info("ORCH_RUN_JOBS is off: this server queues jobs for `orchestrator worker` processes "
                         "and runs none itself")
        except DatabaseError as exc:
            # The command's look at the database passed, and it went away as the app started:
            # `serve` says so in a line, as it does when it finds it away first (see `server.serve`).
            app.state.startup_failure = exc
            raise
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # SIGHUP reloads the policy files (only possible when serving from the main thread).
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, services.reload_policies_soon, "SIGHUP")
        services.log_engine_notes()
        try:
            yield
        finally:
            await services.aclose()

    # /docs and /redoc serve Swagger UI and ReDoc from the installed package, not a CDN: the
    # service runs on studio machines with no way out, where a CDN's page stays blank.
    app = FastAPIOffline(
        static_url="/docs/static",
        # Swagger UI's default validator is validator.swagger.io: a page opened by a host name other
        # than localhost sent it the document's URL (the service's internal address) as an image.
        swagger_ui_parameters={"validatorUrl": None},
        # Starlette's trailing-slash redirect answers before any auth: '/v1/projects/' would tell
        # a caller without a key that '/v1/projects' exists.
        redirect_slashes=False,
        title="Tiered image-rendering orchestrator",
        version=__version__,
        description="Ideation on a local Lite model, bridge and polish on high-fidelity engines, "
        "every paid call held against a budget and charged exactly once.",
        lifespan=lifespan,
        # Generated clients name their methods after these (`create_drafts`, not FastAPI's
        # `create_drafts_v1_projects__project_id__drafts_post`, which changes whenever a path does).
        generate_unique_id_function=lambda route: route.name,
    )
    install_errors(app)
    app.add_middleware(RequestLimits, max_bytes=settings.max_body_bytes)
    app.add_middleware(DropEmptyQueryValues)
    app.add_middleware(HeadAsGet)  # added after those, so it wraps them: they and the routes see a GET
    app.add_middleware(CrossSiteGuard, allowed_origins=settings.cors_origin_list, loopback_only=loopback_only)
    # Outside the layers above, which may read a body (to refuse it): the key is asked for first.
    app.add_middleware(KeyBeforeBody, max_bytes=settings.max_body_bytes)
    if settings.cors_origin_list:
        app.add_middleware(UnexpectedErrors)
        # Outermost: a browser's preflight carries no key, so it is answered before auth; and the
        # answers of every layer (a 401, a 413) carry the headers a dashboard needs to read them.
        # No credentials mode: the key travels in the Authorization header, not in cookies.
        app.add_middleware(Cors, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID",
                                          "If-None-Match", "Range", "If-Range"],
                           expose_headers=["Location", "ETag", "Idempotent-Replayed", "Retry-After",
                                           "Content-Disposition", "Content-Range", "Accept-Ranges"],
                           max_age=600)
    v1 = [Depends(require_auth), Depends(single_valued_query)]
    # What every /v1 route can answer, whatever it reads: a URL with a NUL (or a rebound Host), no
    # valid key, a database that does not answer (a project key is looked up in it). A route lists
    # the rest itself, and its own sentence for one of these replaces this one (a body's 400).
    routers = [module.router for module in (projects, stages, jobs, assets, engines, credits, policies, keys, workers,
                                              webhook_deliveries)]
    for router in routers:
        app.include_router(router, prefix="/v1", dependencies=v1,
                           responses={**documented(400, 401, 503), **ANY_OTHER_ERROR})
    built_openapi = app.openapi
    finished: list[dict[str, Any]] = []  # the document FastAPI built, once this has finished it

    def openapi() -> dict[str, Any]:
        document = built_openapi()  # built once, and again only if the routes change
        if not finished or finished[0] is not document:
            # CrossSiteGuard answers a foreign page's 403 on every route that changes something,
            # outside them: added to the route's own 403 (the admin key's) where it has one.
            for operations in document["paths"].values():
                for method, operation in operations.items():
                    if method.upper() not in UNSAFE:
                        continue
                    own = operation["responses"].get("403")
                    if own is None:
                        operation["responses"]["403"] = {"description": FOREIGN_PAGE_403, "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
                    elif FOREIGN_PAGE_403[1:] not in own["description"]:
                        own["description"] += f" Or {FOREIGN_PAGE_403[:1].lower()}{FOREIGN_PAGE_403[1:]}"
            clean_schema_names(document)
            for router in routers:
                restore_examples(document, router.routes, prefix="/v1")
            finished[:] = [document]
        return document

    app.openapi = openapi  # type: ignore[method-assign]

    # /openapi.json needs no key, even on a service with one, and FastAPI's route turned the whole
    # document (about 190 KB) into JSON on the event loop at each request: a few keyless clients
    # asking for it in a loop held every other request. Its text is made once per document and
    # root path (FastAPI's route adds the root path to `servers`), then served as it is.
    served: dict[str, bytes] = {}
    served_from: list[dict[str, Any]] = []

    async def openapi_json(request: Request) -> Response:
        document = app.openapi()
        if not served_from or served_from[0] is not document:
            served.clear()
            served_from[:] = [document]
        root_path = request.scope.get("root_path", "").rstrip("/")
        body = served.get(root_path)
        if body is None:
            schema = document
            if root_path and app.root_path_in_servers:
                server_urls = {server.get("url") for server in schema.get("servers", [])}
                if root_path not in server_urls:
                    schema = {**schema, "servers": [{"url": root_path}, *schema.get("servers", [])]}
            if len(served) >= 8:  # the server's setting, not the client's: a few at most
                served.clear()
            body = served[root_path] = bytes(JSONResponse(schema).body)
        return Response(body, media_type="application/json")

    for index, route in enumerate(app.router.routes):
        if isinstance(route, Route) and route.path == app.openapi_url:
            app.router.routes[index] = Route(route.path, openapi_json, methods=route.methods, name=route.name,
                                            include_in_schema=False)

    # `security: []`: no key, even on a service with one (the document says so of every operation).
    @app.get("/healthz", response_model=Health, tags=["operations"], summary="Check liveness",
             responses={**documented(400), **ANY_OTHER_ERROR}, openapi_extra={"security": []})
    async def healthz() -> Health:
        """Liveness, without auth: 200 while this process serves requests. Answered on the event
        loop: requests filling the thread pool (each waiting out a stalled database) must not
        make a liveness probe fail and a healthy process be restarted."""
        return Health(status="ok", version=__version__)

    readiness = Readiness()

    @app.get("/readyz", response_model=Health, tags=["operations"], summary="Check readiness",
             openapi_extra={"security": []},
             responses={**documented(400, 503, said={503: "The database did not answer within 2 s, lacks the "
                                                          "service's tables, or its write lock has been held for over "
                                                          "1 s (`database_unavailable`): send requests elsewhere."}),
                        **ANY_OTHER_ERROR})
    async def readyz(services: ServicesDep) -> Health:
        """Readiness, without auth: 200 when the database answers within 2 s, holds the service's
        tables and lets a write start within 1 s (no stalled process holds its write lock); otherwise
        503 `database_unavailable`, and a load balancer sends requests elsewhere."""
        await readiness.check(services.db)
        return Health(status="ok", version=__version__)

    @app.get("/metrics", response_class=Response, tags=["operations"], summary="Get Prometheus metrics",
             openapi_extra={"security": []}, responses={
                 200: {"content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}},
                       "description": "Prometheus text."},
                 **documented(400, 503, said={503: "The database is unavailable for now (`database_unavailable`), "
                                                   "or the server stopped before it answered (`server_stopping`): "
                                                   "scrape again after `Retry-After`."}),
                 **ANY_OTHER_ERROR})
    def metrics(services: ServicesDep) -> Response:
        """Prometheus text: jobs by stage, engine and status, assets by stage, and credits charged,
        held and waiting for reconciliation, by engine."""
        # The exposition format's version: a scraper that checks the type (Prometheus 3 can be
        # made to) otherwise guesses the format.
        return PlainTextResponse(services.metrics(), media_type=PROMETHEUS_TEXT)

    return app
