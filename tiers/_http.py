"""The one retry layer for remote engines.

Each remote engine owns a `RemoteClient`: an `httpx.AsyncClient` with timeouts plus one tenacity
policy. The policy retries only when the provider made nothing: a connect error (the request
never left), or an answer of 408, 429 or 5xx. It honours `Retry-After` (seconds or HTTP date),
`retry-after-ms` and Google's `RetryInfo.retryDelay`, and stops at a deadline.

A request that was sent and got no answer (read timeout, dropped connection) is not re-sent
unless the caller marks it `idempotent` (a GET poll): the provider may already have made, and
billed, the image. That surfaces as `EngineTimeout` with `charged="unknown"`, and so does a CDN's
520, 524 or 598 (`ORIGIN_UNANSWERED`: the provider took the request and did not answer in time),
unless the engine takes such answers itself (`final_answer`: AUTOMATIC1111 and ComfyUI).
An answer that arrived but cannot be read (a corrupt compressed body, a redirect loop) is an
`EngineError` with `charged="unknown"`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import functools
import ipaddress
import json
import math
import random
import re
import socket
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpcore
import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.stop import stop_base

from orchestrator.errors import (
    BadEngineInput,
    Canceled,
    Charged,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    OrchestratorError,
    RateLimited,
)
from tiers.base import CancelToken, RenderRequest, Stage, billable_send, billable_send_refused, billable_sends_out

if TYPE_CHECKING:
    from orchestrator.settings import Settings

T = TypeVar("T")

# A request extension: the call's own test of a final answer (`RemoteClient.request`'s `final_if`).
FINAL_IF = "orchestrator.final_if"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))
# A reverse proxy's "bad gateway" and "gateway timeout" (Cloudflare's 520 and 524, which a tunnel
# answers at its 100 s limit, and others' 598 read timeout): a self-hosted server behind one whose
# read timeout is shorter than the server's answer may have taken the request all the same.
# (Cloudflare's 521-523 and a 599 connect timeout say the server was never reached: sent again.)
GATEWAY_STATUSES = frozenset({502, 504, 520, 524, 598})
# What a reverse proxy answers for a server behind it that is down (nginx, Caddy, Traefik).
PROXY_DOWN_STATUSES = frozenset({502, 503, 504})
# Of those, the ones no provider answers itself: a CDN in front of it saying the origin took the
# request and gave no usable answer in time. To a billable request (a cloud provider's, whose own
# 5xx say nothing was made) one is a send without an answer, never sent again (providers.md).
ORIGIN_UNANSWERED = frozenset({520, 524, 598})
CUT_SHORT = "orchestrator.cut_short"  # the extension that marks an answer whose body was cut off
# Refusals whose status line alone says nothing was made, so that a body cut off after it (a
# gateway dropping the connection, or stalling) loses only its explanation. Not a 500: a webui
# answers it after running the render (`tiers.a1111.not_sent_again`).
CUT_SHORT_STATUSES = frozenset({408, 429, 502, 503, 504})
# Credentials httpx does not know to drop when a redirect (or an output download) leaves the
# provider's origin: it strips only `Authorization` (and a client's `auth=` goes with the first
# request only: see `_exchange`).
KEY_HEADERS = frozenset({"x-goog-api-key", "x-api-key", "api-key", "x-key"})
# Credentials this long are taken out of a provider's text wherever they appear; shorter ones (a
# self-hosted server's basic-auth password) only as a word of their own, down to MIN_WORD_SECRET.
MIN_SECRET = 8
MIN_WORD_SECRET = 4
# How far past an error text's length it is read before the credentials are taken out: more than
# any key's length, so none that starts within the text is cut.
CUT_MARGIN = 4096
# The least time an attempt admitted before the deadline is given to be answered.
MIN_ATTEMPT_SECONDS = 1.0
# Attempts in a row that could not connect before a request that makes an image gives up (see
# `_StopWhenUnreachable`): a restart of the provider's edge is ridden out, a server down is not.
UNREACHABLE_ATTEMPTS = 4
# A self-hosted server's: about a minute of backing off, a restart's time, not half the deadline.
SELF_HOSTED_UNREACHABLE_ATTEMPTS = 8
# The most an answer may hold once decompressed. The largest real answer is an image: a 4096x4096
# PNG, base64 in JSON, is some 70 MB. Without a cap, half a megabyte of gzip that inflates to
# gigabytes is read whole into memory.
MAX_ANSWER_BYTES = 256 * 2**20
# The most JSON objects and arrays an answer may open. Parsed, each costs some 80 bytes: 250 KB of
# gzip inflating to 250 MB of `[{},{},...]` held 6.6 GB. Images come as long strings, and the
# largest lists an engine reads (a ComfyUI queue of workflows) hold well under this.
MAX_JSON_CONTAINERS = 1_000_000
JSON_START = re.compile(rb"\s*[\[{]")
# The content-codings asked for, and the only ones read (see `_Inflater`); answers in the others
# are refused (other tokens, `utf-8` or `binary` as some servers send, are no compression).
ACCEPT_ENCODING = "gzip, deflate"
DECODED = frozenset({"identity", "gzip", "x-gzip", "deflate"})
REFUSED_CODINGS = frozenset({"br", "zstd", "compress", "x-compress", "pack200-gzip", "exi", "aes128gcm"})
GZIP_HEADER_BYTES = 10
# Bytes of a "deflate" answer kept to be read again raw (see `_Inflater`).
RAW_DEFLATE_PROBE = 64 * 1024
# How long a host named by an answer (an output URL) may take to resolve before it is checked.
RESOLVE_SECONDS = 5.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

Sleep = Callable[[float], Awaitable[None]]


class _RetryableAnswer(Exception):
    """The provider answered that nothing was made (408/429/5xx): safe to send again."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


async def resolve_host(host: str, port: int) -> list[Address]:
    """The addresses `host` resolves to; none when it does not resolve (then the connection fails
    on its own). Tests replace it: they must not depend on the machine's DNS."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_SECONDS):
            # As bytes, as anyio passes the name it connects to: a str goes through CPython's IDNA
            # 2003 codec first, which raises UnicodeError for an empty or 64-character label.
            infos = await loop.getaddrinfo(host.encode("ascii"), port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]


# IPv6 prefixes whose last 32 bits are an IPv4 address: NAT64's well-known prefix, the old
# IPv4-compatible and IPv4-translated forms.
_CARRYING_IPV4 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))
# NAT64 for a local network's own use (RFC 8215): whatever it reaches is on that network.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def _public(address: Address) -> bool:
    """A public unicast address, and so is any IPv4 address an IPv6 one carries (mapped,
    compatible, NAT64, 6to4, Teredo): `[::127.0.0.1]` or `[2002:a9fe:a9fe::]` reach 127.0.0.1 and
    the metadata address as surely as their IPv4 forms."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        carried = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if any(address in prefix for prefix in _CARRYING_IPV4):
            carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(v4 is not None and not _public(v4) for v4 in carried):
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:  # fec0::/10: global to Python 3.11
        return False
    return address.is_global and not address.is_multicast


# Hosts whose checked addresses a client keeps for the connections it opens next: a request's
# check and its connect are moments apart, and output hosts are few (a provider's CDN or two).
PINNED_HOSTS = 256
# Seconds between attempts at a pinned host's addresses: anyio's own for a name it resolves.
HAPPY_EYEBALLS_DELAY = 0.25


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting a host an answer named to the addresses
    `RemoteClient._leaving_home` checked for it, not to what the name resolves to when connecting:
    a name answering a public address to the check and 127.0.0.1 to the connect (DNS rebinding)
    reached this machine. TLS still verifies the certificate against the name (httpcore gives it
    to `start_tls` as the server name, apart from the address connected to)."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend, home: str | None) -> None:
        self._inner = inner
        self._home = home  # the base URL's host: not checked, so connected to as it resolves
        self._pinned: dict[str, tuple[Address, ...]] = {}

    def pin(self, host: str, addresses: Collection[Address]) -> None:
        """Connect `host` to `addresses` (checked public) from now on, until checked again."""
        self._pinned.pop(host, None)
        self._pinned[host] = tuple(dict.fromkeys(addresses))
        while len(self._pinned) > PINNED_HOSTS:
            del self._pinned[next(iter(self._pinned))]

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        if host == self._home or _literal_address(host):
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        addresses = self._pinned.get(host)
        if not addresses:
            # Every request to another host is checked first, so this is one whose entry was pushed
            # out meanwhile: a failed connection, retried (and checked) again.
            raise httpcore.ConnectError(f"{host} was not checked before connecting")
        return await self._first_connected(addresses, port, timeout, local_address, socket_options)

    async def _first_connected(self, addresses: tuple[Address, ...], port: int, timeout: float | None,
                               local_address: str | None,
                               socket_options: Iterable[httpcore.SOCKET_OPTION] | None,
                               ) -> httpcore.AsyncNetworkStream:
        """As anyio connects a name (happy eyeballs, RFC 8305): the addresses in the resolver's
        order, each started `HAPPY_EYEBALLS_DELAY` after the one before (at once when it fails), all
        within the one connect timeout, the first connected kept. Equal shares of the timeout, one
        after the other, failed a host whose every address takes longer than its share to accept
        (a SYN lost once is sent again after 1 s), which connected before pinning."""
        options = None if socket_options is None else list(socket_options)  # each attempt reads them
        stop = None if timeout is None else time.monotonic() + timeout
        waiting = list(addresses)
        trying: set[asyncio.Task[httpcore.AsyncNetworkStream]] = set()
        connected: list[httpcore.AsyncNetworkStream] = []
        failure: BaseException | None = None
        try:
            while (waiting or trying) and not connected:
                if waiting:
                    left = None if stop is None else max(stop - time.monotonic(), 0.0)
                    trying.add(asyncio.ensure_future(self._inner.connect_tcp(
                        str(waiting.pop(0)), port, left, local_address, options)))
                done, trying = await asyncio.wait(trying, timeout=HAPPY_EYEBALLS_DELAY if waiting else None,
                                                  return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        connected.append(task.result())
                    else:
                        failure = task.exception()
        except BaseException:  # canceled: nothing connected is kept
            connected += await _abandoned(trying)
            for stream in connected:
                with contextlib.suppress(Exception):
                    await stream.aclose()
            raise
        connected += await _abandoned(trying)
        for extra in connected[1:]:
            await extra.aclose()
        if connected:
            return connected[0]
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def _abandoned(trying: Collection[asyncio.Task[httpcore.AsyncNetworkStream]],
                     ) -> list[httpcore.AsyncNetworkStream]:
    """`trying` canceled: the streams of those that connected all the same, to be closed."""
    for task in trying:
        task.cancel()
    streams = []
    for task in trying:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            streams.append(await task)
    return streams


def _literal_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def pin_connections(client: httpx.AsyncClient, home: str | None) -> _PinnedBackend:
    """Puts a `_PinnedBackend` under the connections `client` opens itself, not through a proxy
    (a proxy's resolves the name, which this machine may not). httpx offers no way to give its
    default transport a network backend: the one place that reaches into httpx's and httpcore's
    private attributes, failing loudly (at the client's creation) if an upgrade moves them."""
    transport = client._transport
    pool = getattr(transport, "_pool", None)
    if not isinstance(transport, httpx.AsyncHTTPTransport) or not isinstance(pool, httpcore.AsyncConnectionPool) \
            or not isinstance(getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend):
        raise RuntimeError("httpx/httpcore moved the connection pool's network backend: output hosts "
                           "cannot be connected to the addresses checked for them (tiers/_http.py)")
    backend = _PinnedBackend(pool._network_backend, home)
    pool._network_backend = backend
    return backend


class _NotSent(Exception):
    """Nothing was made, or the request is idempotent (a poll): safe to send again."""

    def __init__(self, cause: httpx.HTTPError) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause


def _parse_duration(text: str) -> float | None:
    text = text.strip()
    if text.endswith("s"):
        text = text[:-1]
    try:
        value = float(text)
    except ValueError:
        return None
    # `inf` or `nan` is no wait anyone can honour, and not a number JSON can carry in an error.
    return max(0.0, value) if math.isfinite(value) else None


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the provider asked us to wait, from any of the hints providers use."""
    ms = response.headers.get("retry-after-ms")
    if ms is not None:
        value = _parse_duration(ms)
        if value is not None:
            return value / 1000
    header = response.headers.get("retry-after")
    if header:
        value = _parse_duration(header)
        if value is not None:
            return value
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError, OverflowError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - time.time())
    try:
        body = error_json(response)
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(body, list) and body:
        body = body[0]
    err = body.get("error") if isinstance(body, dict) else None
    details = err.get("details", []) if isinstance(err, dict) else []
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            value = _parse_duration(str(detail.get("retryDelay", "")))
            if value is not None:
                return value
    return None


class _StopAtDeadline(stop_base):
    """Stop when the next attempt would start past the deadline, or less than `reserve` seconds
    before it: an attempt that can bill must have time to be answered, or a run of "nothing made"
    answers ends as a billed-but-unknown timeout instead of a clean refusal."""

    def __init__(self, deadline: float, clock: Callable[[], float], reserve: float = 0.0) -> None:
        self.deadline = deadline
        self.clock = clock
        self.reserve = reserve

    def __call__(self, retry_state: RetryCallState) -> bool:
        # tenacity computes the wait before asking whether to stop.
        return self.clock() + retry_state.upcoming_sleep + self.reserve > self.deadline


class _StopWhenUnreachable(stop_base):
    """Stop after `limit` attempts in a row that could not connect. For a request that makes an
    image only: nothing was sent, and another engine may serve the job now, where a provider that
    refuses connections held each job over two minutes of retries before it fell back. (A poll of
    work the provider accepted keeps trying until the deadline: the work is paid for.)"""

    def __init__(self, limit: int, *, proxied: bool = False) -> None:
        self.limit = limit
        self.in_a_row = 0
        # A proxy's 502/503/504 counts as a refusal too: said for the first request of a job to a
        # self-hosted server (nothing was made), it is how such a server behind one is down.
        self.proxied = proxied

    def __call__(self, retry_state: RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        unreachable = ((isinstance(exc, _NotSent) and isinstance(exc.cause, (httpx.ConnectError, httpx.ConnectTimeout)))
                       or (self.proxied and isinstance(exc, _RetryableAnswer)
                           and exc.response.status_code in PROXY_DOWN_STATUSES))
        self.in_a_row = self.in_a_row + 1 if unreachable else 0
        return self.in_a_row >= self.limit


def _next_wait(retry_state: RetryCallState, rate_limit_pause: float | None = None) -> float:
    backoff = min(0.5 * 2 ** (retry_state.attempt_number - 1), 30.0)
    backoff = float(backoff * (0.5 + random.random() / 2))
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    if isinstance(exc, _RetryableAnswer):
        hinted = retry_after(exc.response)
        if hinted is None and exc.response.status_code == 429:
            hinted = rate_limit_pause
        if hinted is not None:
            # Honoured whole: a wait the deadline cannot hold stops the retries at once (see
            # `_StopAtDeadline`), so routing may fall back now rather than after a wait that
            # ends too soon to matter. Never below the backoff: `Retry-After: 0`, or a date
            # already past, would otherwise send as fast as the answers come back.
            return max(hinted, backoff)
    return backoff


class _Inflater:
    """Decompresses an answer's body as it arrives, never to more than `limit` bytes. httpx's own
    decoders inflate each network read whole (64 KiB of gzip can be 64 MiB, and stacked codings,
    `gzip, gzip`, multiply that), so the cap on what was read came too late."""

    def __init__(self, request: httpx.Request, coding: str, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.size = 0
        self._gzip = coding in ("gzip", "x-gzip")
        self._obj: Any = None if coding == "identity" else self._decoder()
        # HTTP's "deflate" is zlib-wrapped, but some servers send it raw: the input is kept until
        # the first byte comes out, to be read again raw if the zlib header proves wrong.
        self._held: bytearray | None = bytearray() if coding == "deflate" else None
        self._member_out = False  # the current gzip member (or deflate stream) has given bytes
        self._members_done = 0  # gzip members read to their end before the current one
        self._member_in = 0  # bytes the current member's decoder has taken
        self._garbage = False  # what follows the last whole member is no member: ignored
        self._fed = False

    def _decoder(self, *, raw: bool = False) -> Any:
        return zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)

    @classmethod
    def for_answer(cls, response: httpx.Response, limit: int) -> _Inflater:
        codings = [c.strip().lower() for value in response.headers.get_list("content-encoding")
                   for c in value.split(",")]
        # Tokens that name no compression (`identity`, and the `utf-8` or `binary` some servers
        # send) are read as they are, as httpx did; a compression not decoded here is refused.
        codings = [c for c in codings if c != "identity" and (c in DECODED or c in REFUSED_CODINGS)]
        if len(codings) > 1:
            raise _Unreadable(f"it is in stacked content-codings ({', '.join(codings)})")
        if codings and codings[0] in REFUSED_CODINGS:
            raise _Unreadable(f"it is in content-coding {codings[0]!r}, which was not asked for")
        return cls(response.request, codings[0] if codings else "identity", limit)

    def feed(self, data: bytes) -> bytes:
        if self._obj is None:
            self._count(len(data))
            return data
        self._fed = self._fed or bool(data)
        if self._held is not None:
            self._held += data
            if len(self._held) > RAW_DEFLATE_PROBE:  # no byte out of so much: no header to be wrong about
                self._held = None
        out = bytearray()
        pending = data
        while pending and not self._garbage:
            if self._obj.eof:
                if not self._gzip:
                    break  # bytes after a deflate stream's end: ignored
                # Another gzip member: concatenated members are one body (`gzip` writes them so).
                self._obj, self._member_out, self._member_in = self._decoder(), False, 0
                self._members_done += 1
            try:
                piece: bytes = self._obj.decompress(pending, self.limit - self.size + 1)
            except zlib.error as exc:
                if self._held is not None:  # not zlib-wrapped after all: the same bytes, raw
                    pending, self._held = bytes(self._held), None
                    self._obj = self._decoder(raw=True)
                    continue
                if self._members_done and not self._member_out:
                    self._garbage = True  # after a whole member: trailing bytes, as gzip(1) allows
                    break
                raise httpx.DecodingError(f"the answer's compressed body is corrupt ({exc})",
                                          request=self.request) from None
            if piece:
                self._held, self._member_out = None, True
            self._count(len(piece))
            out += piece
            rest = self._obj.unused_data if self._obj.eof else self._obj.unconsumed_tail
            self._member_in += len(pending) - len(rest)
            pending = rest
        return bytes(out)

    def end(self) -> bytes:
        if self._obj is None:
            return b""
        try:
            rest: bytes = self._obj.flush()
        except zlib.error as exc:
            raise httpx.DecodingError(f"the answer's compressed body is corrupt ({exc})",
                                      request=self.request) from None
        self._count(len(rest))
        # Bytes after the last whole member, too few to be one (a member's header alone is 10).
        trailing = self._members_done and not self._member_out and self._member_in < GZIP_HEADER_BYTES
        if self._fed and not self._obj.eof and not self._garbage and not trailing:
            raise httpx.DecodingError("the answer's compressed body is cut short", request=self.request)
        return rest

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > self.limit:
            raise _TooLarge


class _TooLarge(Exception):
    """The answer holds more than the client reads."""


class _Unreadable(Exception):
    """The answer is in a form the client does not read, however often it is asked."""


@functools.cache
def verifying_context() -> ssl.SSLContext:
    """One TLS context (httpx's default: certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR as the
    process first read them) for every engine's client and the webhook sender: each client making
    its own read the CA bundle again, 20-50 ms each at every start (the sender's on the event loop).
    httpcore sets the context's ALPN at each connect, to HTTP/1.1 for every client here: one client
    given HTTP/2 would change it for all."""
    return httpx.create_ssl_context()


def basic_auth_in(url: str) -> tuple[str, tuple[str, str] | None]:
    """`url` without its `user:password@`, and those as HTTP Basic credentials (None without any).
    httpx would send them from the base URL too, but its request log line (INFO) prints each URL
    whole: the password went with it, and an error naming a request's URL would carry it."""
    parsed = httpx.URL(url)
    if not parsed.userinfo:
        return url, None
    return str(parsed.copy_with(username=None, password=None)), (parsed.username, parsed.password)


class RemoteClient:
    """An engine's HTTP client. `key_setting` names the setting to fix when the provider refuses
    the credentials; it appears in error messages, never the key itself."""

    def __init__(
        self,
        engine: str,
        *,
        base_url: str,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
        key_setting: str,
        deadline: float = 300.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.engine = engine
        self.key_setting = key_setting
        # An engine may mark some 408/429/5xx answers as final (Gemini's per-day quota): they are
        # returned at once instead of being retried until the deadline.
        self.final_answer: Callable[[httpx.Response], bool] = lambda _response: False
        # An engine may mark some 5xx answers as its provider's own timeout (Google's 504
        # DEADLINE_EXCEEDED): still retried, but the job's error, once they outlast the deadline,
        # is `timeout`, as a 408's is, not an engine error.
        self.timed_out: Callable[[httpx.Response], bool] = lambda _response: False
        # Attempts in a row that cannot connect after which a request that makes an image gives
        # up (see `_StopWhenUnreachable`): a cloud provider that refuses connections is down; a
        # self-hosted server (ComfyUI, AUTOMATIC1111) may be restarting, and is given longer.
        self.unreachable_attempts = UNREACHABLE_ATTEMPTS
        # Whether the provider bills its requests. A self-hosted server (ComfyUI, AUTOMATIC1111)
        # does not: its errors then say a request may have made an image, never billed one.
        self.bills = True
        # Seconds a provider locks a client out after a 429 that says nothing of when to come back
        # (Stability: 60); None backs off as after any other failure.
        self.rate_limit_pause: float | None = None
        self.deadline_seconds = deadline
        self.read_timeout = read_timeout
        self.sleep = sleep
        self.clock = clock
        self.client = httpx.AsyncClient(
            base_url=base_url,
            # Only what `_Inflater` reads; httpx would also offer br and zstd where their packages are.
            headers={"Accept-Encoding": ACCEPT_ENCODING, **(headers or {})},
            auth=auth,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            transport=transport,
            verify=verifying_context(),
            follow_redirects=True,
            event_hooks={"request": [self._remember_credentials, self._leaving_home]},
        )
        self._home = httpx.URL(base_url) if base_url else None
        # A transport given (a test's mock) opens no connections of its own to pin.
        self._pinned = None if transport is not None else pin_connections(
            self.client, self._home.raw_host.decode("ascii") if self._home is not None else None)
        self.max_answer_bytes = MAX_ANSWER_BYTES
        self._credentials: frozenset[str] = frozenset()  # every credential its requests home carried

    async def _remember_credentials(self, request: httpx.Request) -> None:
        # Seen here, once the client's auth has made its header: what `scrub` takes out. Only our
        # own requests': an output URL's `user:pass@` (a provider's words) is no secret of ours.
        home, url = self._home, request.url
        if home is not None and (url.scheme, url.raw_host, url.port) != (home.scheme, home.raw_host, home.port):
            return
        found = _credentials_in(request.headers)
        if not found <= self._credentials:
            self._credentials |= found

    def remember_secret(self, secret: str) -> None:
        """A credential `scrub` takes out before this client has sent it: a process that follows
        work an earlier one started polls URLs the provider named, not the base URL, whose requests
        teach it nothing (fal's queue on a host of its own)."""
        if len(secret) >= MIN_WORD_SECRET:
            self._credentials |= {secret}

    def scrub(self, text: str) -> str:
        """`text` without any credential this client has sent: a provider's failure text read from
        a poll or a history (not an error answer, which `error_text` cleans by its own request)
        may echo a request's headers."""
        return _without(text, self._credentials)

    def scrub_error(self, error: OrchestratorError) -> None:
        """`error`'s message and every text in its details without this client's credentials,
        in place: an engine quotes a provider's answer in both (fal's `error_type`, a proxy
        echoing the request's headers), and the job's record shows them to its project's keys."""
        error.message = self.scrub(error.message)
        error.args = (error.message, *error.args[1:])
        error.details = self._scrubbed(error.details)

    def _scrubbed(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {key: self._scrubbed(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrubbed(item) for item in value]
        return value

    async def _leaving_home(self, request: httpx.Request) -> None:
        """Every request, redirects' included, to a host other than the base URL's: one the
        provider's answer named (an output URL, a redirect). A key sent there is a leaked key; and
        unless it is the base URL's own host (a local stand-in serving files on another port), it
        must be a public host over https: an answer naming `http://127.0.0.1:8080/admin`, or a
        cloud's metadata address, would otherwise have the service fetch it and store the answer
        as an image the project can read."""
        home, url = self._home, request.url
        if home is not None and (url.scheme, url.raw_host, url.port) == (home.scheme, home.raw_host, home.port):
            return
        for name in KEY_HEADERS:
            request.headers.pop(name, None)
        if home is not None and url.raw_host == home.raw_host:
            return
        # The name connected to (IDNA 2008, punycode), not `url.host`'s Unicode form: the resolver
        # encodes that one by IDNA 2003, another name (straße -> strasse), which may resolve to a
        # public address while the one connected to is this machine.
        host = url.raw_host.decode("ascii")
        why = None
        name = host.rstrip(".").lower()
        if url.scheme != "https":
            why = "it is not https"
        elif name == "localhost" or name.endswith(".localhost"):
            why = "it is this machine"
        else:
            try:
                addresses: list[Address] = [ipaddress.ip_address(host)]
            except ValueError:
                addresses = await resolve_host(host, url.port or 443)
                proxied = self._through_proxy(url)
                if not addresses and not proxied:
                    # Let through, httpx resolved it again, and could get the private address this
                    # lookup failed to see. As a connection that failed: retried, checked again.
                    raise httpx.ConnectError(f"{host} does not resolve", request=request) from None
                if addresses and not proxied and self._pinned is not None and all(map(_public, addresses)):
                    # Connected to these, not to what the name resolves to when connecting: it may
                    # answer a public address here and this machine's there (DNS rebinding).
                    self._pinned.pin(host, addresses)
            private = next((a for a in addresses if not _public(a)), None)
            if private is not None:
                why = f"{url.host} is a private or local address ({private})"
        if why is not None:
            raise EngineError(
                f"{self.engine}: the provider's answer named {url.scheme}://{url.host} to fetch, which is not "
                f"fetched: {why} (only public https hosts, or the base URL's own host)",
                details={"engine": self.engine, "host": url.host}, retryable=False,
            )

    def _through_proxy(self, url: httpx.URL) -> bool:
        """Whether the client sends a request for `url` through a proxy (of the environment:
        `HTTPS_PROXY`, `ALL_PROXY`, less `NO_PROXY`'s, as httpx reads them): the proxy resolves its
        name, which this machine may not. Asked of httpx itself: urllib's reading of `NO_PROXY`
        differs (`*` among other names)."""
        return self.client._transport_for_url(url) is not self.client._transport

    @classmethod
    def for_settings(cls, engine: str, settings: Settings, *, base_url: str, key_setting: str,
                     headers: dict[str, str] | None = None,
                     auth: httpx.Auth | tuple[str, str] | None = None) -> RemoteClient:
        """A client with the deadline and timeouts of `ORCH_REMOTE_*`."""
        return cls(engine, base_url=base_url, headers=headers, auth=auth, key_setting=key_setting,
                   deadline=settings.remote_deadline, connect_timeout=settings.remote_connect_timeout,
                   read_timeout=settings.remote_read_timeout)

    async def aclose(self) -> None:
        await self.client.aclose()

    @property
    def _made(self) -> str:
        """What a request sent without a usable answer may have done with the image: "made and
        billed" it, or only "made" it where the provider bills nothing (`bills`)."""
        return "made and billed" if self.bills else "made"

    @property
    def _billed(self) -> str:
        """The same, said of the request: "billed" it, or only "run" it."""
        return "billed" if self.bills else "run"

    def new_deadline(self) -> float:
        return self.clock() + self.deadline_seconds

    async def request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool = False,
        deadline: float | None = None,
        cancel: CancelToken | None = None,
        answered: Collection[int] = (),
        final_if: Callable[[httpx.Response], bool] | None = None,
        starts_work: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with retries; return the first answer that is not 408/429/5xx. A CDN's 520/524/598
        to a request that is not `idempotent` raises `EngineTimeout` (`charged="unknown"`) at once,
        unless `final_answer` or `final_if` marks it final (then it is returned).

        401/403 raise `EngineUnavailable` at once, unless listed in `answered` (a provider whose
        403 may be about the request, not the key). Other 4xx are returned: the engine knows its
        provider's error body (moderation, validation) and calls `fail()` or maps it itself.
        `final_if` marks more of this call's 408/429/5xx answers as final (see `final_answer`).

        A request that is not `idempotent` stops after `unreachable_attempts` in a row that could
        not connect (another engine may take the job). `starts_work` holds an `idempotent` one to
        that too, counting a proxy's 502/503/504 as such: the first request of a job, which made
        nothing (ComfyUI's upload of the draft), to a server that is down.

        With `cancel`, a cancel ends the call with `Canceled`, which says what it may have cost:
        `charged="unknown"` while a request that can bill (not `idempotent`) is out without an
        answer, `"no"` before the first send and in the waits between attempts, when every answer
        so far said nothing was made. Racing the whole call from outside cannot tell the two apart.
        """
        if final_if is not None:  # carried by the request to `_retryable`, which sees only the answer
            kwargs["extensions"] = {**kwargs.get("extensions", {}), FINAL_IF: final_if}
        stop_at = deadline if deadline is not None else self.new_deadline()
        # A billable retry is sent only with half the deadline left, time for a slow render to be
        # answered (it waits until the deadline, not the read timeout: see `_send_once`).
        reserve = 0.0 if idempotent else self.deadline_seconds / 2
        stop: stop_base = _StopAtDeadline(stop_at, self.clock, reserve)
        if not idempotent or starts_work:
            stop = stop | _StopWhenUnreachable(self.unreachable_attempts, proxied=idempotent)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((_RetryableAnswer, _NotSent)),
            wait=functools.partial(_next_wait, rate_limit_pause=self.rate_limit_pause),
            stop=stop,
            sleep=self.sleep if cancel is None else self._sleep_unless(cancel),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response = await self._send_once(method, url, idempotent=idempotent, cancel=cancel,
                                                     stop_at=stop_at, **kwargs)
        except _RetryableAnswer as exc:
            raise self._give_up(exc.response) from None
        except _NotSent as exc:
            if isinstance(exc.cause, (httpx.DecodingError, httpx.TooManyRedirects)):
                raise EngineError(
                    f"{self.engine}: the provider answered but its answer could not be read ({exc})",
                    details={"engine": self.engine},
                ) from None
            if not isinstance(exc.cause, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
                # An idempotent request (a poll, a download) the provider took and never answered
                # in full: it was reached, and the work the request follows may be billed.
                raise EngineTimeout(
                    f"{self.engine}: the request was sent but no answer came ({exc}), however often it was "
                    "asked before the deadline (ORCH_REMOTE_DEADLINE)",
                    details={"engine": self.engine}, charged="no",
                ) from None
            raise EngineError(
                f"{self.engine}: could not reach the provider ({exc}); nothing was sent",
                details={"engine": self.engine},
            ) from None
        if response.status_code in (401, 403) and response.status_code not in answered:
            # A 403's text, which may be about the account rather than the key ("User is locked.
            # Reason: Exhausted balance"); not a gateway's HTML page, nor a 401's (it may show the
            # key masked, `sk-...abcd`, which the job's error would show every project key holder).
            said = ("" if response.status_code == 401 or "html" in response.headers.get("content-type", "")
                    else error_text(response, 200))
            raise EngineUnavailable(
                f"{self.engine} refused the credentials (HTTP {response.status_code}{': ' + said if said else ''}): "
                f"check {self.key_setting}",
                details={"engine": self.engine, "status": response.status_code, "setting": self.key_setting},
            )
        return response

    def _sleep_unless(self, cancel: CancelToken) -> Sleep:
        async def sleep(seconds: float) -> None:
            try:  # between attempts nothing of this request is out
                await cancel.race(self.sleep(seconds), charged="no")
            except Canceled as exc:
                if billable_sends_out():  # another of the job's may be, asked when the cancel came
                    exc.at_least_charged("unknown")
                raise
        return sleep

    async def _send_once(self, method: str, url: str, *, idempotent: bool, cancel: CancelToken | None,
                         stop_at: float, **kwargs: Any) -> httpx.Response:
        if cancel is not None:
            # Nothing of this request is out; an earlier one of the job's may be (a second paid call).
            cancel.raise_if_cancelled(charged="unknown" if billable_sends_out() else "no")
        if not idempotent and "timeout" not in kwargs:
            # A synchronous provider (Gemini, OpenAI, Stability) sends nothing until the image is
            # made: a read timeout shorter than the deadline would end a slow render, made and
            # billed, as a timeout. ORCH_REMOTE_READ_TIMEOUT is for polls and downloads.
            kwargs["timeout"] = httpx.Timeout(max(stop_at - self.clock(), MIN_ATTEMPT_SECONDS),
                                              connect=self.client.timeout.connect)
        try:
            request = self.client.build_request(method, url, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError, ValueError) as exc:
            # Nothing left this process (a header that cannot be encoded, a malformed URL), and the
            # exception's text may hold a header value, so only its type is told.
            raise EngineUnavailable(
                f"{self.engine}: the request could not be built ({type(exc).__name__}): "
                f"check {self.key_setting} and the base URL", details={"engine": self.engine},
                retryable=False,
            ) from None
        if not idempotent:
            await billable_send()
            if cancel is not None and cancel.cancelled:  # asked while the send was being recorded
                billable_send_refused()  # this one is not sent; another of the job's may be out
                cancel.raise_if_cancelled(charged="unknown" if billable_sends_out() else "no")
            try:
                return await self._exchange_within(request, idempotent, cancel, stop_at)
            except (_NotSent, _RetryableAnswer):
                billable_send_refused()  # nothing made: a cancel while it is retried is free again
                raise
        return await self._exchange_within(request, idempotent, cancel, stop_at)

    async def _exchange_within(self, request: httpx.Request, idempotent: bool, cancel: CancelToken | None,
                               stop_at: float) -> httpx.Response:
        # The read timeout bounds each wait for bytes, not the whole answer: a server trickling its
        # body would hold the job forever. The deadline bounds the attempt (the floor leaves a
        # last attempt, admitted just before the deadline, time to be answered).
        limit = max(stop_at - self.clock(), MIN_ATTEMPT_SECONDS)
        heads: list[tuple[httpx.Response, list[httpx.Response]]] = []
        try:
            async with asyncio.timeout(limit):
                if cancel is None:
                    response = await self._exchange(request, idempotent, heads)
                else:
                    response = await cancel.race(self._exchange(request, idempotent, heads),
                                                 charged="no" if idempotent else "unknown")
        except TimeoutError:
            if heads and self._refused_but_cut_short(head := _read(*heads[-1], body=b"", cut_short=True), idempotent):
                raise _RetryableAnswer(head) from None  # only its body stalled
            raise EngineTimeout(
                f"{self.engine}: no complete answer before the deadline (ORCH_REMOTE_DEADLINE)"
                + ("" if idempotent else f"; the provider may have {self._made} the image"),
                details={"engine": self.engine}, charged="no" if idempotent else "unknown",
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _NotSent(exc) from exc
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            if idempotent:
                raise _NotSent(exc) from exc
            raise EngineTimeout(
                f"{self.engine}: the request was sent but no answer came ({type(exc).__name__}); "
                f"it is not re-sent because the provider may have {self._made} the image",
                details={"engine": self.engine},
            ) from exc
        except (httpx.DecodingError, httpx.TooManyRedirects) as exc:
            # The provider answered, so for a POST it may have made and billed the image.
            if idempotent:
                raise _NotSent(exc) from exc
            raise EngineError(
                f"{self.engine}: the provider answered but its answer could not be read ({type(exc).__name__}); "
                f"it is not re-sent because the provider may have {self._made} the image",
                details={"engine": self.engine}, charged="unknown",
            ) from exc
        except httpx.HTTPError as exc:
            # Any other transport failure (an unsupported protocol, a proxy error) stopped the
            # request before the provider saw it; the text may hold a header value.
            raise EngineUnavailable(
                f"{self.engine}: the request could not be sent ({type(exc).__name__}): "
                f"check {self.key_setting} and the base URL", details={"engine": self.engine},
                retryable=False,
            ) from None
        if response.history and not idempotent and not response.is_success:
            # The provider answered the billable request (with a redirect); what its target says
            # is not the provider saying nothing was made, so it is neither retried nor mapped.
            raise EngineError(
                f"{self.engine}: the provider answered with a redirect, and its target answered HTTP "
                f"{response.status_code}; the request is not sent again, since the provider may have {self._billed} it",
                details={"engine": self.engine, "status": response.status_code}, retryable=False,
                charged="unknown",
            )
        if self._retryable(response):
            if not idempotent and response.status_code in ORIGIN_UNANSWERED:
                raise EngineTimeout(
                    f"{self.engine}: a gateway in front of the provider answered HTTP {response.status_code} "
                    "(the provider took the request and did not answer in time); it is not re-sent because "
                    f"the provider may have {self._made} the image",
                    details={"engine": self.engine, "status": response.status_code}, charged="unknown",
                )
            raise _RetryableAnswer(response)
        return response

    def _retryable(self, response: httpx.Response) -> bool:
        if response.status_code not in RETRY_STATUSES or self.final_answer(response):
            return False
        final_if = response.request.extensions.get(FINAL_IF)
        return not (final_if is not None and final_if(response))

    def _refused_but_cut_short(self, head: httpx.Response, idempotent: bool) -> bool:
        """Whether an answer whose body was cut off said by its status line alone that nothing was
        made: not after a redirect of a billable request (see `_exchange_within`)."""
        return (head.status_code in CUT_SHORT_STATUSES and self._retryable(head)
                and not (head.history and not idempotent))

    async def _exchange(self, request: httpx.Request, idempotent: bool,
                        heads: list[tuple[httpx.Response, list[httpx.Response]]]) -> httpx.Response:
        """Send `request` and read its answer, decompressed, up to `max_answer_bytes`. Redirects
        are followed here, their bodies never read (httpx reads each whole), and each hop goes
        through the request hook (`_leaving_home`). The answer's head is put in `heads` as it
        comes, for a caller whose deadline ends the body."""
        history: list[httpx.Response] = []
        while True:
            try:
                # The client's own credentials (`auth=`) go with the first request only: a
                # redirect keeps the Authorization httpx leaves it (none across origins).
                response = await self.client.send(request, stream=True, follow_redirects=False,
                                                  auth=None if history else httpx.USE_CLIENT_DEFAULT)
            except EngineError as exc:
                if history and not idempotent:
                    # Refused on a redirect: the provider answered the billable request first.
                    exc.at_least_charged("unknown")
                raise
            except httpx.HTTPError as exc:
                if history and not idempotent:
                    # The provider answered the billable request (with a redirect): it may have
                    # billed, so it is not sent again, whatever became of the redirect.
                    raise EngineError(
                        f"{self.engine}: the provider answered with a redirect, and following it failed "
                        f"({type(exc).__name__}); the request is not sent again, since the provider may "
                        f"have {self._billed} it", details={"engine": self.engine}, retryable=False, charged="unknown",
                    ) from None
                raise
            if response.next_request is None:
                break
            await response.aclose()
            history.append(response)
            if len(history) > self.client.max_redirects:
                raise httpx.TooManyRedirects("Exceeded maximum allowed redirects.", request=request)
            request = response.next_request
        heads.append((response, history))
        body = bytearray()
        cut_short = False
        try:
            try:
                if response.is_stream_consumed:
                    # An in-memory transport's answer (a mock) comes read and decoded already.
                    body = bytearray(response.content)
                    if len(body) > self.max_answer_bytes:
                        raise _TooLarge
                else:
                    inflater = _Inflater.for_answer(response, self.max_answer_bytes)
                    async for chunk in response.aiter_raw():
                        body += inflater.feed(chunk)
                    body += inflater.end()
            except (_Unreadable, _TooLarge, httpx.TransportError):
                if not self._refused_but_cut_short(_read(response, history, body=b""), idempotent):
                    raise
                cut_short = True
        except _Unreadable as exc:
            raise EngineError(
                f"{self.engine}: the provider's answer is not read: {exc}"
                + ("" if idempotent else f"; the provider may have {self._billed} the request"),
                details={"engine": self.engine}, retryable=False, charged=None if idempotent else "unknown",
            ) from None
        except _TooLarge:
            raise EngineError(
                f"{self.engine}: the provider's answer is larger than {self.max_answer_bytes >> 20} MiB "
                "once decompressed; it is not read" + ("" if idempotent else
                                                         f", and the provider may have {self._billed} the request"),
                details={"engine": self.engine, "max_bytes": self.max_answer_bytes},
                retryable=False, charged=None if idempotent else "unknown",
            ) from None
        finally:
            await response.aclose()
        if len(body) > MAX_JSON_CONTAINERS and JSON_START.match(body) is not None and (
                body.count(b"{") + body.count(b"[") > MAX_JSON_CONTAINERS):
            raise EngineError(
                f"{self.engine}: the provider's answer opens more than {MAX_JSON_CONTAINERS} JSON objects and "
                "arrays; it is not read"
                + ("" if idempotent else f", and the provider may have {self._billed} the request"),
                details={"engine": self.engine}, retryable=False, charged=None if idempotent else "unknown")
        return _read(response, history, body=body, cut_short=cut_short)

    def _give_up(self, response: httpx.Response) -> EngineError:
        details = {"engine": self.engine, "status": response.status_code}
        if response.status_code == 429:
            hinted = retry_after(response)
            if hinted is not None:
                details["retry_after"] = round(hinted, 3)
            return RateLimited(f"{self.engine}: rate limited by the provider"
                               + (" until the deadline" if hinted is None else
                                  f" (it asks to wait {hinted:.0f} s; ORCH_REMOTE_DEADLINE leaves too little)"),
                               details=details)
        if response.status_code == 408:
            return EngineTimeout(f"{self.engine}: the provider timed out (HTTP 408)", details=details, charged="no")
        if self.timed_out(response):
            # The provider answered that it gave up on the request: nothing was made, as its other 5xx say.
            return EngineTimeout(f"{self.engine}: the provider timed out (HTTP {response.status_code}): "
                                 f"{error_text(response)}", details=details, charged="no")
        told = "(its body was cut off)" if response.extensions.get(CUT_SHORT) else error_text(response)
        return EngineError(f"{self.engine}: provider error HTTP {response.status_code}: {told}", details=details)

    def fail(self, response: httpx.Response, message: str | None = None) -> EngineError:
        """The error for a final 4xx answer: the provider refused our input; never retried. A 413
        refused the size of the body this engine built (the draft it inlined), not what the user
        asked: another engine may take the job, and the engine is not unwell. An answer that is no
        refusal (a redirect not followed, say) tells nothing of the request's fate: it may be billed."""
        if response.status_code < 400:
            # Its body is not quoted: it is no explanation, and may be an image's base64.
            return EngineError(f"{self.engine}: the provider answered HTTP {response.status_code}, neither an "
                               f"answer nor a refusal; it may have {self._billed} the request",
                               details={"engine": self.engine, "status": response.status_code}, retryable=False,
                               charged="unknown")
        error = BadEngineInput(
            f"{self.engine}: the provider refused the request (HTTP {response.status_code}): "
            f"{without_credentials(message, response) if message else error_text(response)}",
            details={"engine": self.engine, "status": response.status_code},
            retryable=response.status_code == 413,
        )
        error.engine_fault = False
        return error


class SendsCredentials:
    """An engine whose requests carry a key or a password (`http`): `without_credentials` takes
    them out of an exception it raised, as the runner asks of every one before the job keeps it."""

    http: RemoteClient

    def without_credentials(self, error: BaseException) -> None:
        """In place: an `OrchestratorError`'s message and details, and any exception's text (its
        arguments), the exceptions it was raised from included, as a traceback shows them."""
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            if isinstance(current, OrchestratorError):
                self.http.scrub_error(current)
            else:
                current.args = tuple(self.http.scrub(a) if isinstance(a, str) else a for a in current.args)
            current = current.__cause__ or current.__context__


class SelfHostedEngine(SendsCredentials):
    """An engine on a server the studio runs itself (A1111, ComfyUI): bridge and polish at no price
    (nothing is held or charged), reached at its URL setting, a restart of the server waited out.
    What the two self-hosted engines share, in one place so that they stay alike."""

    name: str  # each engine's own
    kind: Literal["remote"] = "remote"
    stages: frozenset[Stage] = frozenset({"bridge", "polish"})
    _url: str | None

    def self_hosted_client(self, settings: Settings, client: RemoteClient | None, base_url: str | None = None,
                           **kwargs: Any) -> RemoteClient:
        """`client` (tests pass one), else one for `base_url` (the server's URL without its
        credentials; default: the URL as set) with the `ORCH_REMOTE_*` timeouts (`kwargs`:
        `RemoteClient.for_settings`'s own, the auth and the setting a 401/403 names)."""
        http = client or RemoteClient.for_settings(
            self.name, settings, base_url=base_url or self._url or f"http://{self.name}.invalid", **kwargs)
        http.unreachable_attempts = SELF_HOSTED_UNREACHABLE_ATTEMPTS  # a restart is waited out
        http.bills = False  # its errors say what a request may have made, never what it billed
        return http

    @property
    def reachable(self) -> bool:
        """Whether this process has the server's URL (see `tiers.registry.left_off`)."""
        return bool(self._url)

    def prices(self) -> dict[str, Any]:
        return {"credits_per_image": 0}

    def estimate(self, req: RenderRequest) -> int:
        return 0

    async def aclose(self) -> None:
        await self.http.aclose()


def _read(response: httpx.Response, history: list[httpx.Response], *, body: bytes | bytearray,
          cut_short: bool = False) -> httpx.Response:
    """`response` with `body` as read: decompressed, so the answer no longer says how it was encoded.
    `cut_short`: the body ended early, and is not shown as the provider's explanation."""
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    extensions = {**response.extensions, CUT_SHORT: True} if cut_short else response.extensions
    read = httpx.Response(response.status_code, headers=headers, content=bytes(body), request=response.request,
                          extensions=extensions, history=history)
    with contextlib.suppress(RuntimeError):  # a transport's answer made whole has no time of its own
        read.elapsed = response.elapsed
    return read


# An id a provider names for later requests (a prediction's, a queued prompt's, a job's): it goes
# into the path of requests that carry the key, so only ids of this shape are followed.
_PATH_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def path_id(value: object) -> str | None:
    """`value` as an id requests may be built from (`/predictions/{id}`), or None: an answer's
    `../../v1/account` had each poll send the key to that endpoint, and read its answer as ours."""
    return value if isinstance(value, str) and _PATH_ID.fullmatch(value) else None


def answer_json(response: httpx.Response) -> Any:
    """`response.json()`, where an answer nested past Python's recursion limit (200 KB of `[[[`)
    raises ValueError as any body that is not JSON does: its RecursionError, which no engine
    expected, failed the job as an engine bug, its images made, and left a ComfyUI prompt rendering."""
    return text_json(response.content)


# The largest error body read as JSON for what it says (a message, a retry delay, an error's name):
# a provider's is a few hundred bytes; a hostile or broken server's, up to MAX_ANSWER_BYTES, took
# seconds to parse, on the event loop, once for each of those looks (32 MiB of `[0,0,...]`: 1.6 s).
MAX_ERROR_JSON_BYTES = 2**20


def error_json(response: httpx.Response) -> Any:
    """`answer_json` for an error's answer: ValueError, as for a body that is not JSON, when it is
    larger than `MAX_ERROR_JSON_BYTES`, which no provider's error is."""
    if len(response.content) > MAX_ERROR_JSON_BYTES:
        raise ValueError("an error body too large to be read as JSON")
    return answer_json(response)


def text_json(text: str | bytes) -> Any:
    """`json.loads(text)`, as `answer_json` reads an answer."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def json_object(response: httpx.Response, engine: str, what: str = "the provider", *,
                charged: Charged = "no") -> dict[str, Any]:
    """The JSON object `what` answered, or the engine's error saying it answered something else
    (`charged`: whether the request that got this answer may have been billed)."""
    try:
        body = answer_json(response)
    except ValueError:
        raise EngineError(f"{engine}: {what} answered {response.status_code} with a body that is not JSON",
                          details={"engine": engine}, charged=charged) from None
    if not isinstance(body, dict):
        raise EngineError(f"{engine}: {what} answered {response.status_code} with an unexpected shape",
                          details={"engine": engine}, charged=charged)
    return body


def error_text(response: httpx.Response, limit: int = 300) -> str:
    """A short, human description of a provider's error body, whatever its shape, without the
    credentials the request carried (a provider or a proxy may echo the request's headers).
    Cut after the credentials are taken out: cut first, a key across the cut kept its first part."""
    return without_credentials(_described(response, limit + CUT_MARGIN), response)[:limit]


def _described(response: httpx.Response, limit: int) -> str:
    try:
        body: Any = error_json(response)
    except (ValueError, UnicodeDecodeError):
        # Its start only, past the JSON bound: not the whole decoded.
        content = response.content if len(response.content) <= MAX_ERROR_JSON_BYTES else response.content[:4 * limit]
        return content.decode(text_encoding(response), errors="replace")[:limit]
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:limit]
        for key in ("detail", "message", "title", "errors", "error"):
            if body.get(key):
                value = body[key]
                return (value if isinstance(value, str) else json.dumps(value))[:limit]
    return json.dumps(body)[:limit]


def text_encoding(response: httpx.Response) -> str:
    """The encoding an answer's text is decoded with: its charset, unless that names a codec
    Python knows that decodes no text (`base64`, `rot13`, `zlib`), then UTF-8. httpx takes any
    codec it can look up, and its `text` then raised AssertionError, TypeError or LookupError out
    of an engine quoting a provider's error, a 503 that sent nothing failing its job as a crash."""
    encoding = response.encoding or "utf-8"
    try:
        b"-".decode(encoding, errors="replace")  # an empty one is not looked up
    except LookupError:
        return "utf-8"
    return encoding


def header_request_id(response: httpx.Response, header: str = "x-request-id") -> str | None:
    """The provider's id of the request, from its answer's header: stored in the job and shown to
    its project, so without a key echoed in it (a proxy, a wrong base URL) and of a sane length."""
    value = response.headers.get(header)
    return without_credentials(value.strip(), response)[:200] or None if value else None


def without_credentials(text: str, response: httpx.Response) -> str:
    try:
        headers = response.request.headers
    except RuntimeError:  # an answer made without a request carries none
        return text
    return _without(text, _credentials_in(headers))


def _credentials_in(headers: httpx.Headers) -> frozenset[str]:
    found: set[str] = set()
    for name in ("authorization", "proxy-authorization", *KEY_HEADERS):
        value = headers.get(name, "").strip()
        if value:
            found.add(value)
            scheme, _, token = value.partition(" ")
            token = token.strip()
            if token and scheme.lower() in ("bearer", "key", "basic", "token"):
                found.add(token)
            if token and scheme.lower() == "basic":  # a server may echo the `user:password` it decoded
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    user, _, password = base64.b64decode(token, validate=True).decode().partition(":")
                    found |= {f"{user}:{password}", password}
    return frozenset(s for s in found if len(s) >= MIN_WORD_SECRET)


def _without(text: str, credentials: Collection[str]) -> str:
    # The longest first: a token inside "Bearer <token>" is replaced with the whole value.
    for secret in sorted(credentials, key=len, reverse=True):
        if len(secret) >= MIN_SECRET:
            text = text.replace(secret, "***")
        else:  # a short password: only as a word of its own, not inside every word that holds it
            text = re.sub(rf"(?<!\w){re.escape(secret)}(?!\w)", "***", text)
    return text


class KeptOut(CancelToken):
    """The token a request whose answer names the work it started is sent with in place of the
    job's (`tiers._cloud.CloudEngine.send_withdrawable`, ComfyUI's `/prompt`), cancelled once the
    job's is. `RemoteClient` stops on it as on the job's before the request is sent and in the
    waits between attempts (where it says what the cancel cost), but a request that is out is
    never cut: its answer is awaited, within the deadline, since it names the work the server
    made, the only way to cancel that work."""

    def __init__(self) -> None:
        super().__init__()
        self.out = False  # a request is out, not yet answered

    async def race(self, awaitable: Awaitable[T], *, charged: Charged = "unknown") -> T:
        if charged == "no":  # a wait between attempts: nothing of the request is out
            return await super().race(awaitable, charged=charged)
        # The client's race of a request that can bill against the token: the request is awaited.
        self.out = True
        try:
            return await awaitable
        finally:
            self.out = False
