"""What a web page in a browser on the operator's machine may make the service do.

Without `ORCH_ADMIN_KEY` a service listening on loopback is open to every program of the machine,
and a browser is one: any page it shows can send the service a request that needs no preflight
(a form's POST, a `fetch` without a JSON body: a promote, a cancel) or reach it under the page's
own domain name (DNS rebinding), and spend the budgets. Two checks close that to pages without
touching programs, which send no `Origin` and name the service as they reach it:

- a request that changes something (POST, PUT, PATCH, DELETE) sent by a page of another origin
  than the service's own (the `/docs` page) or one of `ORCH_CORS_ORIGINS` is refused 403;
- on loopback without a key, a `Host` that names no loopback address or `localhost` name (a rebound
  domain) is refused 400.

A pure ASGI middleware: every request pays one header lookup, a program's nothing more.
"""

from __future__ import annotations

import ipaddress
import re

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.api.errors import answer
from orchestrator.errors import BadRequest, Forbidden, shown

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (`localhost`, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve to any interface
        return False


def names_this_machine(host: str) -> bool:
    """Whether a request's `Host` names this machine: a loopback address, or a name of RFC 6761's
    `localhost.` zone (`localhost.`, `app.localhost`), which browsers answer with loopback without
    asking DNS, so no page can be served under it from elsewhere. Not for the address to listen
    on: a resolver that forwards `app.localhost` to DNS may give any address."""
    name = host.lower().removesuffix(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback(host)


# A host (a name, an IPv4 address or a bracketed IPv6 one) and an optional port, and nothing else.
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[^\s:\[\],/@]+)(:[0-9]{1,5})?")


def _host_name(host: str) -> str:
    """`Host` without its port: `127.0.0.1:8000` -> `127.0.0.1`, `[::1]:8000` -> `[::1]`; "" for
    a header that is not one host (`127.0.0.1:8000, evil.test` was read as loopback)."""
    found = HOST_HEADER.fullmatch(host)
    return found.group(1) if found is not None else ""


class CrossSiteGuard:
    def __init__(self, app: ASGIApp, *, allowed_origins: list[str], loopback_only: bool) -> None:
        self.app = app
        self.allowed = frozenset(allowed_origins)
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").lower()
        # No Host at all is a program's (an HTTP/1.0 probe): browsers always send one.
        if self.loopback_only and host and not names_this_machine(_host_name(host)):
            # Shown cut, as any name a client sent: a 30 KB Host was repeated whole.
            refused = answer(BadRequest(f"this service answers on this machine only, not as "
                                        f"{shown(host)!r} (set ORCH_ADMIN_KEY to serve other names)"))
            await refused(scope, receive, send)
            return
        origin = headers.get(b"origin")
        # A bearer key is never sent by a browser on its own: a request carrying one is its
        # holder's, whatever page it came through (a dashboard's own backend). Basic credentials
        # are: a browser adds those it has cached for the host (a proxy asking for them in front).
        bearer = headers.get(b"authorization", b"").lstrip().lower().startswith(b"bearer ")
        if origin is not None and scope["method"] in UNSAFE and not bearer:
            page = origin.decode("latin-1")
            # Its own pages (/docs) by host alone: behind a proxy that ends TLS, the page is
            # https:// and the request reaches the service as http://.
            own = page.partition("://")[2].lower() == host
            if not own and page not in self.allowed and "*" not in self.allowed:
                # With ORCH_ADMIN_KEY set, such a request to /v1 has no key, and was answered 401
                # before it came here (`orchestrator.api.auth`).
                # `null` is what a browser sends for a page it will not name (a local file, a
                # sandboxed frame): "list it" sent the operator to a setting that refuses it at start.
                fix = ("a page without an origin of its own, which ORCH_CORS_ORIGINS cannot list: serve the "
                       "page from an origin listed there" if page == "null" else
                       "list it in ORCH_CORS_ORIGINS to allow it")
                refused = answer(Forbidden(
                    f"requests that change something are refused from web pages of {shown(page)}: {fix}"))
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Cors(CORSMiddleware):
    """Starlette's CORS, its refused preflight told in the service's error shape (it answered
    `Disallowed CORS origin` as plain text)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        what = bytes(response.body).decode(errors="replace").removeprefix("Disallowed CORS ")
        kept = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return answer(BadRequest(f"preflight refused: its {what} may not be used across origins (the pages that "
                                 "may call the service are ORCH_CORS_ORIGINS)", details={"refused": what.split(", ")}),
                      headers=kept)
