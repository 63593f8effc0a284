"""Job webhooks: the end of each job with a `webhook_url` of its own, or of a project with one,
POSTed there (the job's before the project's).

An outbox: `job_ended` writes a `WebhookDelivery` row in the transaction that ends the job, so a
crash between the end and its POST loses nothing, and `Deliverer` (in every process that runs jobs)
sends the due rows. A row is claimed by moving its `next_attempt_at` past the send's timeout with
an update conditional on the value read: of two processes, one update changes the row, on SQLite
and PostgreSQL alike. Delivery is at least once (a sender that dies after the receiver answered
sends it again): receivers dedupe by the `webhook-id` header. Each process sends up to
ORCH_WEBHOOK_CONCURRENCY at once, at most 2 of them to one destination, so that a receiver that does
not answer (10 s each) holds its own deliveries back, not every project's; and after 3 failed
attempts in a row to one, it sets that destination aside for a while (`Breakers`), its rows unclaimed;
those older than their whole retry schedule it gives up without sending (`Deliverer._give_up`).

Signed as Standard Webhooks (https://www.standardwebhooks.com) say: `webhook-signature` is
`v1,` and the base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}`, keyed by
ORCH_WEBHOOK_SECRET (a `whsec_` secret's base64 decoded, as those libraries read it; else its
UTF-8 bytes). Without the setting they go unsigned.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
from sqlalchemy import func, update
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from orchestrator.clock import shared_now
from orchestrator.db import Database, changed
from orchestrator.errors import Forbidden, first_line
from orchestrator.ids import made_at, new_id
from orchestrator.models import Job, Project, UTCDateTime, WebhookDelivery
from orchestrator.outage import Outage
from tiers._http import verifying_context

log = logging.getLogger(__name__)

EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "canceled": "job.canceled"}
SEND_TIMEOUT_SECONDS = 10.0
# A claim outlasts the send it is for: a row is due again only once its sender cannot still be sending.
LEASE_SECONDS = 60.0
# The waits after each failed attempt; after the last, the delivery is given up (9 attempts, the
# last about 20.6 hours after the first).
BACKOFF_SECONDS = (10, 60, 300, 1800, 7200, 21600, 21600, 21600)
# The schedule's whole span: a row made (or redelivered) longer ago than this would have been given up
# by now had each of its attempts been made, whatever a breaker kept from being sent.
SCHEDULE_SECONDS = sum(BACKOFF_SECONDS)
BATCH = 20  # due rows read at a time (at least; as many as the sends at once when more)
# Sends at once to one destination: one that does not answer holds these, not every slot.
PER_DESTINATION = 2


# A destination is set aside after this many failed attempts in a row, for a cool-down that doubles
# from the first to the last at each failed probe.
FAILURES_TO_SET_ASIDE = 3
COOL_DOWN_SECONDS = 30.0
MAX_COOL_DOWN_SECONDS = 600.0
# URLs given up per update by their exact text (`Deliverer._give_up`): well within SQLite's bound variables.
GIVE_UP_URLS = 500
# The most URLs past their schedule one give-up reads to find the spellings its SQL prefixes missed.
MISSED_URLS = 1000
# The most due rows one read of `Deliverer._due` asks for, as it reads past a full destination's.
MAX_READ = 1000
# How often a process gives up the rows of its set-aside destinations that outlived their schedule: a
# write (the database's write lock), so not at every look; a minute late of 20.6 hours is nothing.
GIVE_UP_EVERY_SECONDS = 60.0
# A breaker is kept per destination that failed; one with no attempt for this long (and no cool-down
# under way, no probe in flight) tells nothing worth keeping, and is forgotten: a process that has
# failed to reach many distinct hosts (URLs changed, receivers retired) does not keep each for good.
BREAKER_IDLE_SECONDS = 3600.0
# The most breakers kept; beyond it the least recently used go first, those cooling down or probed last.
MAX_BREAKERS = 10_000
# How often a new breaker's making looks for idle ones (a pass over every one): not at each failure.
PRUNE_EVERY_SECONDS = 60.0

# What an attempt tells of its destination: it took the delivery; it is down (no answer in time, no
# connection, a 5xx or 429 answer); it answered otherwise (a 4xx, a redirect: it is up, and refused it).
Verdict = Literal["delivered", "down", "refused"]


def signing_key(secret: str) -> bytes:
    """The HMAC key of ORCH_WEBHOOK_SECRET (whose `whsec_` form the settings checked is base64)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def signature(key: bytes, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# `job_ended`'s statement, built once: built at each end, with literals, it took about 420 µs of
# SQLAlchemy's Python on SQLite for a project without a URL (every draft's end); run with parameters on
# the session's connection, about 105 µs.
# The job's own URL (its request's `webhook_url`) before its project's: read from the job's row in
# the statement, so that whichever process ends it (after a fallback, a restart) sends it there.
_URL = func.coalesce(col(Job.webhook_url), col(Project.webhook_url))
_ENDED = sa.insert(WebhookDelivery).from_select(
    ["id", "job_id", "project_id", "url", "event", "attempts", "next_attempt_at", "created_at"],
    sa.select(sa.bindparam("id", type_=sa.String()), col(Job.id), col(Project.id),
              _URL, sa.bindparam("event", type_=sa.String()), sa.literal(0),
              sa.bindparam("now", type_=UTCDateTime()), sa.bindparam("made", type_=UTCDateTime()))
    .select_from(Job).join(Project, col(Project.id) == col(Job.project_id))
    .where(col(Job.id) == sa.bindparam("job_id", type_=sa.String()),
           col(Project.id) == sa.bindparam("project_id", type_=sa.String()), _URL.is_not(None)))


def job_ended(s: Session, job_id: str, project_id: str, status: str) -> None:
    """Queue the job's end for its webhook, in `s` (the transaction that ends it): the job's own URL,
    else the one its project has now, however long ago the job was claimed (a URL set while it ran
    gets its end); nothing when neither has one. One statement, no read back."""
    if status not in EVENTS:
        return
    delivery_id, now = new_id("whd"), shared_now()
    s.connection().execute(_ENDED, {"id": delivery_id, "job_id": job_id, "project_id": project_id,
                                    "event": EVENTS[status], "now": now, "made": _made(delivery_id, now)})


def job_ended_at(s: Session, job_id: str, project_id: str, status: str, url: str | None) -> None:
    """`job_ended` for a caller that read the URL in `s` already, the job's or else its project's
    (`None`: nothing)."""
    if url is None or status not in EVENTS:
        return
    delivery_id, now = new_id("whd"), shared_now()
    s.add(WebhookDelivery(id=delivery_id, job_id=job_id, project_id=project_id, url=url, event=EVENTS[status],
                          next_attempt_at=now, created_at=_made(delivery_id, now)))


def _made(delivery_id: str, now: datetime) -> datetime:
    """A new delivery's `created_at`: `now`, but never before its id's time. After the clock they
    are read from steps back, ids stay after the last one made (`ids.new_id`), ahead of the clock:
    with `now`, a delivery's id was minutes after its `created_at`, and a `?until=` range between the
    two, read as a range of ids (`webhook_deliveries.listed`), left out a delivery made within it.
    Due `now` all the same (`next_attempt_at`)."""
    return max(now, made_at(delivery_id))


def counts(s: Session) -> tuple[int, int]:
    """(pending, given up): deliveries still to make, and those no longer tried."""
    undelivered = col(WebhookDelivery.delivered_at).is_(None)
    pending = s.scalar(select(func.count()).select_from(WebhookDelivery).where(
        undelivered, col(WebhookDelivery.next_attempt_at).is_not(None))) or 0
    failed = s.scalar(select(func.count()).select_from(WebhookDelivery).where(
        undelivered, col(WebhookDelivery.next_attempt_at).is_(None))) or 0
    return int(pending), int(failed)


DEFAULT_PORTS = {"http": 80, "https": 443}


def destination(url: str) -> str:
    """The receiver of `url` whose slots and breaker its deliveries share: its scheme, host and
    port, canonical, so that every spelling of one receiver is one (`HTTPS://Hooks.example/a`,
    `https://hooks.example:443/b`, `https://xn--bcher-kva.example/` and `https://BÜCHER.example/`):
    the scheme lowercase, the default port written, and the host as `_host` writes it. A URL
    `urlsplit` refuses (`_unparsed`) is a destination of its own."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        return _unparsed(url)
    scheme, host = parts.scheme.lower(), _host(hostname or "")
    try:
        port = parts.port
    except ValueError:  # refused when the URL is set; a row that still had one must not stop the sender
        port = None
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
    if ":" in host:  # an IPv6 address, bracketed as in a URL
        host = f"[{host}]"
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def _unparsed(url: str) -> str:
    """The destination of a URL `urlsplit` raises on (a bracketed host that is no IPv6 address, as
    `[::ffff:127.1]`; an unclosed bracket; a host NFKC maps onto a delimiter): refused when the URL
    is set, but a row stored before that check still holds one, and reading its destination raised
    in every look of the sender, so that no project's delivery was sent. httpx refuses such a URL
    too (each attempt fails, counted, until it is given up), so it is no other URL's receiver: its
    scheme and host with port as written, lowercase."""
    scheme, _, rest = url.partition("://")
    for end in "/?#":
        rest = rest.partition(end)[0]
    return f"{scheme.strip().lower()}://{rest.lower()}"


def shown(url: str) -> str:
    """`url` (or a destination) for a log line or a stored error: a password in its user part as
    `***`, as `db.shown_url` shows a database URL's, and the rest as written. Not by `shown_url` nor
    `cli.without_password`: they parse it (SQLAlchemy's `make_url`, httpx), and a URL `urlsplit`
    refuses, whose destination (`_unparsed`) keeps its user and password, raised in them
    (`[::1`: `int(':1')`) or came back rewritten (`[x]` unbracketed, `ü[` percent-encoded), another
    destination than the one its rows are matched by. Its user part ends at the netloc's last `@`,
    as `urlsplit` reads it."""
    scheme, sep, rest = url.partition("://")
    end = min((at for at in map(rest.find, "/?#") if at >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not (sep and at and colon):
        return url
    return f"{scheme}://{user}:***@{host}{rest[end:]}"


def _came_past(s: Session, made: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
    """When a row came due past its retry schedule (`Deliverer._give_up`), in seconds: the later of
    its `next_attempt_at` and its making plus SCHEDULE_SECONDS. Not `next_attempt_at` alone: a row
    unattempted since made (a set-aside host's) comes past by its age with a `next_attempt_at` hours
    old, behind a cursor a live backlog's retried rows had moved on, and waited for good while that
    backlog kept the round going. As a number, not a time: SQLite's computed times are text of
    another precision than the stored ones, and a tie at the cursor was never equal."""
    due = col(WebhookDelivery.next_attempt_at)
    if s.get_bind().dialect.name == "postgresql":
        return func.greatest(func.date_part("epoch", due), func.date_part("epoch", made) + SCHEDULE_SECONDS,
                             type_=sa.Float)
    return func.max(func.julianday(due) * 86_400, func.julianday(made) * 86_400 + SCHEDULE_SECONDS, type_=sa.Float)


def refuse_foreign_receiver(url: str, project_url: str | None, project_id: str) -> None:
    """403 `forbidden` unless `url` (a job's own `webhook_url`, asked by a project key) is to the
    receiver of its project's `webhook_url` (`destination`: scheme, host and port): the admin alone
    chooses where a project's ends go, and a project key could otherwise have the service POST to
    any host it reaches, its own network's included."""
    where = destination(url)
    if project_url is None:
        raise Forbidden(
            f"project '{project_id}' has no webhook_url: with a project key a job's webhook_url must be on the "
            "scheme, host and port of its project's; the admin key can set the project's (PATCH /v1/projects/"
            f"{project_id}) or make the job with any webhook_url",
            details={"project_id": project_id, "webhook_url": url, "receiver": where, "allowed_receiver": None})
    allowed = destination(project_url)
    if where != allowed:
        raise Forbidden(
            f"with a project key a job's webhook_url must be on its project's receiver {allowed} (scheme, host and "
            f"port of the project's webhook_url), not {where}; the admin key can change the project's "
            f"(PATCH /v1/projects/{project_id}) or make the job with any webhook_url",
            details={"project_id": project_id, "webhook_url": url, "receiver": where, "allowed_receiver": allowed})


def _host(host: str) -> str:
    """A URL's host (as `urlsplit` gives it: lowercase but for an IPv6 zone, unbracketed) as the
    sender's httpx connects to it, one form for its spellings: an IPv4-mapped IPv6 address as its
    IPv4 address (`127.0.0.1` for `::ffff:127.0.0.1`), another IPv6 address compressed
    (`2001:db8::1` for `2001:DB8:0:0::1`), its zone as written (`lo` is not `LO`), else an IDN in
    Unicode (`bücher.example` for `xn--bcher-kva.example`; a dot `。` is `.`), a numeric IPv4
    spelling the resolver reads as an address as its dotted quad (`127.1`: `_numeric_ipv4`), any
    trailing dot kept (`hooks.example.` is not `hooks.example`, nor `hooks.` `hooks`). Not percent-decoded: httpx
    sends `%68ooks.example` as written, a name no resolver knows, so it is no spelling of
    `hooks.example` (merged, its failed attempts set the real host's breaker aside)."""
    if ":" in host:
        with contextlib.suppress(ValueError):  # not an address (refused when the URL is set): as written
            address = ipaddress.IPv6Address(host)
            # httpx's IPv6 socket connects a mapped address to the IPv4 one (a receiver listening on
            # 127.0.0.1 alone answers `[::ffff:127.0.0.1]`): one receiver, and sent so (`_sent_to`).
            if (mapped := _mapped(address)) is not None:
                return str(mapped)
            # Its zone as written: interface names are case-sensitive (the resolver refuses
            # `fe80::1%LO`), and httpx sends `%25lo` so, a zone `25lo` no interface has (every
            # attempt fails), so neither is a spelling of `%lo`.
            return _compressed(address)
        return host
    if not host.isascii() or "xn--" in host:
        host = _idn(host)
    if (numeric := _numeric_ipv4(host)) is not None:
        return str(numeric)
    # A trailing dot is kept: a name with one is fully qualified, looked up as written, where the
    # name without is matched in /etc/hosts (`hooks.dev` there, `hooks.dev.` not: reproduced with
    # glibc 2.36's getaddrinfo) and tried with resolv.conf's search domains (first, when it has
    # fewer dots than `ndots`, 5 in Kubernetes, where `hooks.dev` is Service `hooks` of namespace
    # `dev`, `hooks.dev.svc.cluster.local`, and `hooks.dev.` a name in public DNS).
    # Two receivers, maybe: merged, a dead one's failed attempts set the other's breaker aside, and a
    # project key named one for its project's other. `127.0.0.1.` is a name too, not the address.
    return host


def _compressed(address: ipaddress.IPv6Address) -> str:
    """`address` compressed, an IPv4-mapped one with its last 32 bits in hex (`::ffff:7f00:1`)
    whatever the Python: 3.13's `ipaddress` writes it `::ffff:127.0.0.1` where 3.11's writes hex,
    and a destination (and the SQL's spellings of one, `_written_as`) must not change with it."""
    mapped = address.ipv4_mapped
    if mapped is None:
        return address.compressed
    whole = int(mapped)
    zone = "" if address.scope_id is None else f"%{address.scope_id}"
    return f"::ffff:{whole >> 16:x}:{whole & 0xFFFF:x}{zone}"


def _mapped(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped IPv6 one maps; not with a zone, which the resolver takes on
    a link-local address only (every attempt fails)."""
    return address.ipv4_mapped if address.scope_id is None else None


def _sent_to(url: str) -> str | httpx.URL:
    """`url` as the sender POSTs it: an IPv6 host (without a zone) as its destination writes it
    (`_host`: an IPv4-mapped one as its IPv4 address, another compressed). httpx picks a proxy by
    the host as written: with HTTP_PROXY and NO_PROXY=127.0.0.1, `[::ffff:127.0.0.1]` went to the
    proxy, which connects to its own 127.0.0.1, and with NO_PROXY=::1 `[0:0:0:0:0:0:0:1]` did
    (reproduced), so a project key allowed either as its project's receiver reached another host.
    So a host the resolver reads as an IPv4 address (`_numeric_ipv4`), as its dotted quad."""
    with contextlib.suppress(ValueError):  # not so (httpx's own error comes with the POST)
        host = urlsplit(url).hostname or ""
        if ":" in host and (address := ipaddress.IPv6Address(host)).scope_id is None:
            mapped = _mapped(address)
            return httpx.URL(url).copy_with(host=address.compressed if mapped is None else str(mapped))
        if ":" not in host and _ipv4(written := _host(host)) and written != host:
            # `127.1` (or `127。1`) as `127.0.0.1`, for the same reason: with NO_PROXY=127.0.0.1
            # httpx sent `127.1` to the proxy.
            return httpx.URL(url).copy_with(host=written)
    return url


def _ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


# httpx reads a host of four decimal parts as an IPv4 address (refusing `0177.0.0.1`, never sent),
# any other as a name, which the resolver may still read as an address (`_numeric_ipv4`).
_FOUR_DECIMAL_PARTS = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
# Each part of an address as inet_aton reads it: hex after `0x`, octal after `0`, else decimal.
_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
# The most the last part may hold, by the number of parts: `a` 32 bits, `a.b` 24, `a.b.c` 16, `a.b.c.d` 8.
_LAST_PART_MOST = (0xFFFFFFFF, 0xFFFFFF, 0xFFFF, 0xFF)


def _numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address the resolver connects a host httpx sends as a name to, when it reads it
    as one (glibc's getaddrinfo, by inet_aton, and musl's alike): one to four parts, each decimal,
    octal after `0` or hex after `0x`, the last filling the bits the others leave (`127.1`,
    `2130706433`, `0x7f.1` are 127.0.0.1); None for any other host, `127.1.` (a name the resolver
    looks up) and four decimal parts (httpx reads those as an address itself) included."""
    if _FOUR_DECIMAL_PARTS.fullmatch(host):
        return None
    parts = host.split(".")
    if len(parts) > 4 or not all(_PART.fullmatch(part) for part in parts):
        return None
    # A decimal part of more than 10 digits is past 32 bits; read, past 4,300 it raised (Python's
    # bound on a decimal `int`), and a stored row's destination must not raise (`_unparsed`).
    if any(len(part) > 10 and part[0] != "0" for part in parts):
        return None
    values = [int(part, 0) if part[:2].lower() == "0x" else int(part, 8 if part[0] == "0" else 10) for part in parts]
    if any(value > 0xFF for value in values[:-1]) or values[-1] > _LAST_PART_MOST[len(values) - 1]:
        return None
    whole = values[-1]
    for n, value in enumerate(values[:-1]):
        whole |= value << (24 - 8 * n)
    return ipaddress.IPv4Address(whole)


@functools.lru_cache(maxsize=1024)
def _idn(host: str) -> str:
    """An internationalised host as httpx reads it, in Unicode, lowercase; as written where httpx
    refuses it (refused when the URL is set; a row that still has one must not stop the sender).
    Cached: httpx's parse took about 50 µs a URL against 4 µs for `destination`'s own, and every
    due row read is placed by its destination."""
    try:
        return httpx.URL(f"http://{host}/").host.lower()
    except (httpx.InvalidURL, UnicodeError):
        return host


def _written_as(where: str) -> list[str]:
    """The ways a URL may start with destination `where`, lowercase (but for an IPv6 zone: `_to`):
    with its port, and without it when it is its scheme's default; an IDN in Unicode and as
    `xn--`, an IPv4 address also as the IPv6 address mapping it, written so and compressed (an
    IPv6 host not otherwise than as `destination` writes it, nor an IDN's labels half in one and
    half in the other, nor a numeric IPv4 spelling as `127.1`: `Deliverer._due`, `_give_up`). An
    unparsed destination (`_unparsed`) only as it is written."""
    try:
        urlsplit(where)
    except ValueError:
        # Its host is no host, its port maybe no number: spelt as a parsed one's, a port `²`
        # (`isdigit`, but no `int`) raised in every read of due rows while it was full or set aside,
        # and `ü[@alive.example`'s ASCII spelling (httpx reads `ü[` as a user) was another receiver's.
        return [where]
    scheme, _, rest = where.partition("://")
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit():  # no port written (a scheme without a default), or an IPv6 host's colon
        host, port = rest, ""
    names = [host] if host.isascii() else [host, _ascii(host)]
    if host.endswith("]"):
        hosts = [host]
    elif _ipv4(host):
        hosts = [host, f"[::ffff:{host}]", f"[{_compressed(ipaddress.IPv6Address(f'::ffff:{host}'))}]"]
    else:
        hosts = names
    starts = []
    for spelled in hosts:
        starts.append(f"{scheme}://{spelled}:{port}" if port else f"{scheme}://{spelled}")
        if port and int(port) == DEFAULT_PORTS.get(scheme):
            starts.append(f"{scheme}://{spelled}")
    return starts


def _ascii(host: str) -> str:
    """An IDN host as httpx sends it (`xn--bcher-kva.example`); as it is where httpx refuses it."""
    try:
        return httpx.URL(f"http://{host}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError):
        return host


def _to(where: str) -> sa.ColumnElement[bool]:
    """SQL: the row's URL is to destination `where`, as most URLs write it (those it misses:
    `Deliverer._due`)."""
    url: sa.ColumnElement[str] = func.lower(col(WebhookDelivery.url))
    # SQLite's `lower` folds ASCII alone (as PostgreSQL's does under the C collation): an IDN host's
    # other capitals (`BÜCHER.example`) are folded here, a `replace` for each, only for a
    # destination that has such letters (the others' SQL as it was), and at most MAX_FOLDED: each
    # `replace` is nested in the next, and past 24 SQLite's parser overflowed its stack (past about
    # 85, SQLAlchemy's compiler its recursion): a host of more, which httpx sends (100 in three
    # labels), raised in every read of due rows while it was full or set aside, and no delivery was
    # sent. Such a host's capitals are not folded: its rows so written are left to `Deliverer._due`.
    capitals = _capitals(where)
    for capital, small in capitals if len(capitals) <= MAX_FOLDED else ():
        url = func.replace(url, capital, small)
    _, _, rest = where.partition("://")
    zone = rest.partition("]")[0].partition("%")[2] if rest.startswith("[") else ""
    # Capitals a database's `lower` may fold into a small letter of this host that is not how the
    # sender lowers them: the rows that write one in their host are left to `Deliverer._due`.
    unsure = [capital for capital, smalls in _UNSURE_CAPITALS.items() if any(small in rest for small in smalls)]
    matches = []
    for start in _written_as(where):
        prefix = start.lower()
        written = sa.or_(url == prefix, func.substr(url, 1, len(prefix) + 1).in_([prefix + end for end in "/?#"]))
        if zone:
            # An interface's name is case-sensitive (`lo` is not `LO`): compared as written.
            written = sa.and_(written, func.substr(col(WebhookDelivery.url), start.index("%") + 2, len(zone)) == zone)
        for capital in unsure:
            # LIKE of a non-ASCII letter is case-sensitive on SQLite and PostgreSQL alike.
            written = sa.and_(written, sa.not_(
                func.substr(col(WebhookDelivery.url), 1, len(prefix)).like(f"%{capital}%")))
        matches.append(written)
    return sa.or_(*matches)


# Capitals whose small letter depends on more than the letter: a capital sigma (U+03A3) is a final
# sigma (U+03C2) at a word's end and a sigma (U+03C3) elsewhere as Python lowers it (urlsplit and
# httpx alike: `BAS-XA.example` in Greek capitals is its final-sigma host, another than its sigma
# one), and a capital I with a dot (U+0130) is `i` and U+0307, two characters; PostgreSQL's `lower`
# makes them a sigma and `i` (SQLite's keeps them). Folded so, a set-aside host's give-up took in another's rows.
_UNSURE_CAPITALS = {"\u03a3": "\u03c3\u03c2", "\u0130": "i"}


# The most capitals `_to` folds (SQLite ran 24 nested, in the update that gives rows up).
MAX_FOLDED = 16


@functools.lru_cache(maxsize=1024)
def _capitals(where: str) -> tuple[tuple[str, str], ...]:
    """The non-ASCII capitals (each one character) whose small letter is in `where`'s host, with it."""
    host = where.partition("://")[2]
    pairs = {(capital, small) for small in host if not small.isascii()
             for capital in {small.upper(), small.title()}
             if len(capital) == 1 and capital != small and capital.lower() == small
             and capital not in _UNSURE_CAPITALS}
    return tuple(sorted(pairs))


@dataclass
class _Breaker:
    failures: int = 0  # failed attempts in a row, while it is not set aside
    cool_down: float = 0.0  # the set-aside's length in seconds (0: not set aside)
    until: float = 0.0  # when it ends (`Breakers.clock`)
    probe: str | None = None  # the row sent as its probe, while that send lasts
    error: str = ""  # why its last failed attempt failed: what its rows given up say
    used: float = 0.0  # when an attempt to it last started or ended (`Breakers.clock`)

    def holding(self, now: float) -> bool:
        """Whether it keeps its destination's rows back now: cooling down, or its probe in flight."""
        return bool(self.cool_down) and (now < self.until or self.probe is not None)

    def idle(self, now: float) -> bool:
        """Nothing under way and nothing tried for BREAKER_IDLE_SECONDS: safe to forget (a later
        failure starts a new count)."""
        return self.probe is None and now >= self.until and now - max(self.used, self.until) >= BREAKER_IDLE_SECONDS


class Breakers:
    """A circuit breaker per destination, in this process's memory: after FAILURES_TO_SET_ASIDE
    failed attempts in a row to one (any other answer, a success or a refusal, starts the count again),
    it is set aside for COOL_DOWN_SECONDS, and once those end one of its rows is sent as a probe, the
    others waiting for its result: delivered, the destination is back; down, set aside for twice as
    long (up to MAX_COOL_DOWN_SECONDS); refused, back too (it answered); stopped, the next row is the probe.

    Its rows are only left unclaimed meanwhile, their schedules untouched: no attempt spent, no write
    per row of a dead host's thousands each cool-down, and another process (whose own breaker may
    find the receiver up: another network) sends them as ever; those past their whole schedule are
    given up (`Deliverer._give_up`).

    Only destinations that failed have one (an answer drops it); one idle for BREAKER_IDLE_SECONDS
    is forgotten (by its destination's next attempt, `_get`, or by `_prune` as another is made), and
    at most MAX_BREAKERS are kept (`_prune`)."""

    def __init__(self) -> None:
        self.clock: Callable[[], float] = time.monotonic
        self._breakers: dict[str, _Breaker] = {}
        self._pruned_at: float | None = None

    def __len__(self) -> int:
        return len(self._breakers)

    def _prune(self, now: float, room: int = 0) -> None:
        """Forget the idle breakers, then the least recently used beyond MAX_BREAKERS less `room`
        (those holding their rows back last): a destination forgotten is sent to as a new one."""
        self._pruned_at = now
        for where in [where for where, b in self._breakers.items() if b.idle(now)]:
            del self._breakers[where]
        excess = len(self._breakers) + room - MAX_BREAKERS
        if excess > 0:
            oldest = sorted(self._breakers.items(), key=lambda item: (item[1].holding(now), item[1].used))
            for where, _ in oldest[:excess]:
                del self._breakers[where]
            log.info("%d webhook destinations' breakers forgotten, least recently used first: at most %d are "
                     "kept", excess, MAX_BREAKERS)

    def _get(self, where: str, now: float) -> _Breaker | None:
        """`where`'s breaker, unless it is idle: forgotten then, whether or not a pass of `_prune`
        came since (it runs only as a new breaker is made), so that an idle one's stale streak or
        cool-down is not what its next attempt finds."""
        b = self._breakers.get(where)
        if b is not None and b.idle(now):
            del self._breakers[where]
            return None
        return b

    def set_aside(self) -> list[str]:
        """The destinations none of whose rows is to be claimed now: cooling down, or probed. (One
        whose probe's turn came with no row to send is not: no row of it waits.)"""
        now = self.clock()
        # Off a copy: /metrics' thread reads it too (`count`), while the loop may change it.
        return sorted(where for where, b in list(self._breakers.items()) if b.holding(now))

    def count(self) -> int:
        return len(self.set_aside())

    def last_error(self, where: str) -> str:
        """Why the last failed attempt to `where` failed ("" when none is known)."""
        b = self._breakers.get(where)
        return "" if b is None else b.error

    def slots(self, where: str, most: int) -> int:
        """How many sends at once `where` may have of `most`: none while set aside, 1 for its probe."""
        now = self.clock()
        b = self._get(where, now)
        if b is None or not b.cool_down:
            return most
        return 1 if now >= b.until and b.probe is None else 0

    def sending(self, where: str, row_id: str) -> None:
        """A row to `where` was claimed: its probe, when that is what its one slot was for."""
        now = self.clock()
        b = self._get(where, now)
        if b is None:
            return
        b.used = now
        if b.cool_down and b.probe is None and now >= b.until:
            b.probe = row_id

    def ended(self, where: str, row_id: str, verdict: Verdict | None, error: str = "") -> None:
        """An attempt of `row_id` to `where` ended so (None: stopped before it told)."""
        now = self.clock()
        b = self._get(where, now)
        probe = b is not None and b.probe == row_id
        if probe and b is not None:
            b.probe = None
        if verdict in ("delivered", "refused"):
            # An answer, whatever it says of the delivery: the receiver is up. A receiver that refuses
            # each delivery (a 401 after a key change) was otherwise sent to one probe at a time for good.
            if b is not None and b.cool_down:
                log.warning("webhook destination %s is back (it %s): its deliveries are sent again", shown(where),
                            "took a delivery" if verdict == "delivered" else f"answered: {error}")
            self._breakers.pop(where, None)
            return
        if b is not None:
            b.used = now
        if verdict is None:
            return
        if b is None:
            if (len(self._breakers) >= MAX_BREAKERS or self._pruned_at is None
                    or now - self._pruned_at >= PRUNE_EVERY_SECONDS):
                self._prune(now, room=1)
            b = self._breakers[where] = _Breaker(used=now)
        elif b.cool_down and not probe:
            return  # a send from before it was set aside: the same outage, counted already
        b.failures += 1
        b.error = error
        if probe:
            b.cool_down = min(b.cool_down * 2, MAX_COOL_DOWN_SECONDS)
        elif b.failures >= FAILURES_TO_SET_ASIDE:
            b.cool_down = COOL_DOWN_SECONDS
            log.warning("webhook destination %s set aside after %d failed attempts in a row (the last: %s): its "
                        "deliveries wait, unclaimed, no attempt spent, for a probe in %g s (then at doubling "
                        "intervals, up to %g s, until it answers)", shown(where), b.failures, error,
                        COOL_DOWN_SECONDS, MAX_COOL_DOWN_SECONDS)
        else:
            return
        b.until = now + b.cool_down


@dataclass
class Due:
    """A due delivery as read, before its claim: the claim updates it only if it is still so."""

    id: str
    job_id: str
    url: str
    event: str
    attempts: int
    next_attempt_at: datetime
    # The claim's lease, once claimed: giving the row back is conditional on it still being so.
    leased_until: datetime | None = None


class Deliverer:
    """Sends the due deliveries, every `interval` seconds, until `run`'s task is canceled (a stop
    gives the rows it was sending back, due, to the next start or another process). `describe`
    gives a job as GET /v1/jobs/{id} shows it.

    At most `concurrency` sends at once, and at most `per_destination` of them (2, or 1 when
    `concurrency` is 2) to one destination (`destination`): a receiver that does not answer holds
    its own slots, never every one, and its other rows are read past, unclaimed, until one frees;
    after repeated failures it is set aside (`breakers`), its rows read past until a probe's turn."""

    def __init__(self, db: Database, describe: Callable[[str], dict[str, Any] | None], secret: str | None, *,
                 interval: float, concurrency: int = 8) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.db = db
        self.describe = describe
        self.key = None if secret is None else signing_key(secret)
        self.interval = interval
        self.concurrency = concurrency
        self.per_destination = max(1, min(PER_DESTINATION, concurrency - 1))
        # A line a minute while the database is away, not a traceback at each look (every `interval`).
        self.outage = Outage(log, "webhook deliveries", f"trying again every {interval:g} s")
        self.breakers = Breakers()
        self._gave_up_at: float | None = None  # the last `_give_up`, by the breakers' clock
        # Where the last `_give_up` stopped reading URLs past their schedule: (`_came_past`'s soonest,
        # soonest due, URL).
        self._missed_after: tuple[float, datetime, str] | None = None
        self._sending: dict[asyncio.Task[None], Due] = {}
        self._freed: asyncio.Event | None = None

    async def run(self) -> None:
        self._freed = asyncio.Event()
        async with self._client() as client:
            try:
                while True:
                    started, behind = await self._look(client)
                    if behind and started and len(self._sending) < self.concurrency:
                        # Rows left for a destination this look filled: the next look reads past them.
                        await asyncio.sleep(0)
                        continue
                    if behind:  # rows wait for a slot: the next look when one frees
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.interval):
                                await self._freed.wait()
                    else:
                        await asyncio.sleep(self.interval)
            finally:
                await self._stop_sending()

    def _client(self) -> httpx.AsyncClient:
        # A connection per slot: a send never waits in httpx's pool, inside its own timeout.
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=min(self.concurrency, 20))
        return httpx.AsyncClient(timeout=SEND_TIMEOUT_SECONDS, follow_redirects=False, limits=limits,
                                 verify=verifying_context())

    async def _look(self, client: httpx.AsyncClient) -> tuple[bool, bool]:
        """Start the sends of the due rows there are slots for; (whether it started any, whether
        rows were left for a limit or the read was full: worth a look once a slot frees)."""
        if self._freed is not None:
            self._freed.clear()  # before the read: a send ending meanwhile wakes the next wait
        try:
            _, started, behind = await self._start_due(client)
        except Exception as exc:  # a database outage: the rows wait for the next look
            self.outage.failed(exc)
            return False, False
        self.outage.recovered()
        return started > 0, behind

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        """One look: send the due deliveries this process claims, within its limits, and wait for
        the end of those sends; returns how many it read."""
        try:
            read, _, _ = await self._start_due(client)
            if self._sending:
                await asyncio.wait(list(self._sending))
        finally:
            await self._stop_sending()
        return read

    async def _start_due(self, client: httpx.AsyncClient) -> tuple[int, int, bool]:
        """Claim the due rows there are slots for and start their sends; (rows read, sends
        started, whether any row was left for a limit or the read was full)."""
        free = self.concurrency - len(self._sending)
        if free <= 0:
            return 0, 0, True
        per_destination = Counter(destination(row.url) for row in self._sending.values())
        full = sorted(where for where, sending in per_destination.items()
                      if sending >= self.breakers.slots(where, self.per_destination))
        limit = max(BATCH, self.concurrency)
        set_aside = self.breakers.set_aside()
        now = self.breakers.clock()
        if set_aside and (self._gave_up_at is None or now - self._gave_up_at >= GIVE_UP_EVERY_SECONDS):
            self._gave_up_at = now
            await self._written(self._give_up, {where: self.breakers.last_error(where) for where in set_aside})
        due = await asyncio.to_thread(self._due, [row.id for row in self._sending.values()],
                                      sorted({*full, *set_aside}), limit)
        # Rows of a full destination may wait, unread: the next look once a send ends, not an
        # interval later (a receiver's backlog went 2 rows a look, 0.5 s apart).
        behind = len(due) >= limit or bool(full)
        chosen: list[Due] = []
        for row in due:
            where = destination(row.url)
            if len(chosen) >= free or per_destination[where] >= self.breakers.slots(where, self.per_destination):
                behind = True  # left unclaimed: due as it was, for a later look or another process
                continue
            per_destination[where] += 1
            chosen.append(row)
        if not chosen:
            return len(due), 0, behind
        claiming = asyncio.ensure_future(asyncio.to_thread(self._claim_all, chosen))
        try:
            claimed = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # A stop while the claims commit: the ones made are given back, not left claimed to
            # their lease's end.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._release, await claiming)
            raise
        for row in claimed:
            self.breakers.sending(destination(row.url), row.id)
            task = asyncio.create_task(self._send(client, row), name=f"webhook {row.id}")
            self._sending[task] = row
            task.add_done_callback(self._sent)
        return len(due), len(claimed), behind

    def _sent(self, task: asyncio.Task[None]) -> None:
        row = self._sending.pop(task, None)
        if row is not None:
            # A send that ended without telling (stopped, perhaps before its first step; its job not
            # read) does not hold the probe's turn for good; after a verdict, nothing is left to free.
            self.breakers.ended(destination(row.url), row.id, None)
        if self._freed is not None:
            self._freed.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Its result not written (the database away): the row is due again at its lease's end.
            self.outage.failed(exc)

    async def _stop_sending(self) -> None:
        """Cancel the sends in flight, wait for them, and give their rows back in one transaction."""
        sending = dict(self._sending)
        if not sending:
            return
        for task in sending:
            task.cancel()
        await asyncio.wait(sending)
        # Due again at once for the next start (or another process), not claimed for the rest of
        # their lease (`_release`); here, not in each send: a send canceled before its first step
        # runs none of its code. (A row whose result was written is no longer as claimed: untouched.)
        stopped = [row for task, row in sending.items() if task.cancelled()]
        if not stopped:
            return
        try:
            await self._written(self._release, stopped)
        except Exception as exc:
            log.warning("%d webhook deliveries stopped mid-send could not be given back (%s); they are due again "
                        "at their claim's end, within %g s", len(stopped), first_line(exc, type(exc).__name__),
                        LEASE_SECONDS)
        else:
            log.info("stopped %d webhook sends in flight; their deliveries are due again for the next start",
                     len(stopped))

    def _due(self, sending: Collection[str] = (), full: Collection[str] = (), limit: int = BATCH) -> list[Due]:
        """The due rows, soonest first, but for `sending` (ids) and those to a `full` destination."""
        with self.db.session() as s:
            # By the clock `next_attempt_at` is stamped by (the database's on PostgreSQL), not this
            # host's: it is a claim's lease too, and a host ahead took another's claim mid-send.
            query = select(WebhookDelivery).where(
                col(WebhookDelivery.delivered_at).is_(None), col(WebhookDelivery.next_attempt_at) <= self.db.now())
            if sending:
                query = query.where(col(WebhookDelivery.id).not_in(sending))
            # In SQL, not after the read: a receiver's thousand rows would fill every read.
            query = query.where(*(sa.not_(_to(where)) for where in full))
            rows = s.exec(query.order_by(col(WebhookDelivery.next_attempt_at)).limit(limit)).all()
            full = set(full)
            if any(destination(r.url) in full for r in rows):
                rows = self._read_past(s, query, full, limit)
            return [Due(r.id, r.job_id, r.url, r.event, r.attempts, r.next_attempt_at) for r in rows
                    if r.next_attempt_at is not None]

    @staticmethod
    def _read_past(s: Session, query: SelectOfScalar[WebhookDelivery], full: set[str],
                   limit: int) -> list[WebhookDelivery]:
        """The first `limit` rows of `query` not to a `full` destination, read past those that are:
        spellings its SQL prefixes do not write (`host:/`, a port `0443`, `127.1`, an uncompressed
        IPv6 address), which otherwise filled each read, and no other destination's row was read.
        In (next_attempt_at, id) order, each read after the last row read, twice as many at a time:
        excluding each URL read past and reading again was a read per 20 rows, each binding every
        URL before it (for 8,000 rows of distinct URLs, a job's `?job=` token, 21 s a look). (Not
        the first read's order: a tie of many rows, as a bulk redelivery leaves, is sorted by id.)"""
        kept: list[WebhookDelivery] = []
        ordered = query.order_by(col(WebhookDelivery.next_attempt_at), col(WebhookDelivery.id))
        read, size = ordered, limit
        while True:
            rows = s.exec(read.limit(size)).all()
            kept += [r for r in rows if destination(r.url) not in full]
            if len(rows) < size or len(kept) >= limit:
                return kept[:limit]
            last = rows[-1]
            read = ordered.where(sa.or_(
                col(WebhookDelivery.next_attempt_at) > last.next_attempt_at,
                sa.and_(col(WebhookDelivery.next_attempt_at) == last.next_attempt_at,
                        col(WebhookDelivery.id) > last.id)))
            size = min(size * 2, MAX_READ)

    def _give_up(self, set_aside: dict[str, str]) -> None:
        """Give up, unsent, the due rows of each set-aside destination (to its last error) made or
        redelivered longer ago than SCHEDULE_SECONDS: only its probes spend attempts, so its rows
        would otherwise wait for one probe each (6 an hour), pending, for weeks. One update per
        destination, of the rows still due (not claimed by another process: its lease is ahead),
        unsent, as a failed last attempt leaves them; their attempts stay as counted. Then those its
        SQL prefixes miss (`_to`: `hooks。example`, `127.1`, an empty port), by their exact URLs."""
        with self.db.transaction() as s:
            now = shared_now()
            made = func.coalesce(col(WebhookDelivery.redelivered_at), col(WebhookDelivery.created_at))
            past = [col(WebhookDelivery.delivered_at).is_(None), col(WebhookDelivery.next_attempt_at) <= now,
                    made < now - timedelta(seconds=SCHEDULE_SECONDS)]
            given_up = Counter[str]()
            for where, error in set_aside.items():
                # `_to` last, after the cheap comparisons that pass over rows still within their
                # schedule (most, as a host has just died): on SQLite, finding none of 10,000 took
                # 9 to 34 ms so, 22 to 232 ms with it first (an IDN's, with its `replace`s, slowest).
                given_up[where] += self._given_up(s, where, error, [*past, _to(where)])
            # What is left past its schedule and due is few (a row is sent within it, unless its
            # destination is set aside): its URLs read, each placed by its destination in Python, at
            # most MISSED_URLS a pass (under the write lock), the first to come past first, each pass after
            # the last URL the one before read: a live destination's backlog of more, sent slower than
            # it comes due, filled every pass from the start, and the set-aside rows behind it waited
            # for good. Past the last, the next pass starts again from the soonest.
            came = func.min(_came_past(s, made))
            soonest = func.min(col(WebhookDelivery.next_attempt_at))  # of those that came past together
            url = col(WebhookDelivery.url)
            read = select(url, came, soonest).where(*past).group_by(url)
            if self._missed_after is not None:
                after, due, last = self._missed_after
                # A row comes past after the pass that read the cursor (its `next_attempt_at` moved on
                # past now, by a retry or a claim given back at a stop, `_release`, or its making past
                # its schedule since), so none comes back before the cursor: every URL left is reached
                # within a round.
                read = read.having(sa.or_(came > after, sa.and_(came == after, sa.or_(
                    soonest > due, sa.and_(soonest == due, url > last)))))
            past_urls = s.execute(read.order_by(came, soonest, url).limit(MISSED_URLS)).all()
            missed: dict[str, list[str]] = {}
            for stored, _, _ in past_urls:
                if (where := destination(stored)) in set_aside:
                    missed.setdefault(where, []).append(stored)
            for where, urls in missed.items():
                for n in range(0, len(urls), GIVE_UP_URLS):
                    given_up[where] += self._given_up(
                        s, where, set_aside[where], [*past, col(WebhookDelivery.url).in_(urls[n:n + GIVE_UP_URLS])])
        # Once committed: a pass rolled back reads its URLs again.
        self._missed_after = ((past_urls[-1][1], past_urls[-1][2], past_urls[-1][0]) if len(past_urls) >= MISSED_URLS
                              else None)
        for where, count in given_up.items():
            if count:
                log.warning("webhook destination %s is still set aside: %d of its deliveries older than their "
                            "retry schedule (%g s) given up unsent", shown(where), count, SCHEDULE_SECONDS)

    @staticmethod
    def _given_up(s: Session, where: str, error: str, rows: list[sa.ColumnElement[bool]]) -> int:
        """Give up the `rows` of set-aside `where` in `s`, unsent; how many."""
        return changed(s.execute(
            update(WebhookDelivery).where(*rows)
            .values(next_attempt_at=None, leased_until=None,
                    last_error=f"not sent: {shown(where)} set aside, unreachable, past this delivery's "
                               f"{SCHEDULE_SECONDS / 3600:.1f} h retry schedule (its last failed attempt: "
                               f"{error or 'unknown'})"[:500])
            .execution_options(synchronize_session=False)))

    def _claim_all(self, rows: list[Due]) -> list[Due]:
        """The rows this process claims of `rows`, in one transaction (SQLite's write lock once)."""
        claimed = []
        with self.db.transaction() as s:
            until = shared_now() + timedelta(seconds=LEASE_SECONDS)  # the database's clock, on PostgreSQL
            for row in rows:
                result = s.execute(update(WebhookDelivery).where(
                    col(WebhookDelivery.id) == row.id, col(WebhookDelivery.next_attempt_at) == row.next_attempt_at,
                    col(WebhookDelivery.delivered_at).is_(None)).values(next_attempt_at=until, leased_until=until))
                if changed(result) == 1:
                    claimed.append(row)
        for row in claimed:
            row.leased_until = until
        return claimed

    def _release(self, rows: list[Due]) -> None:
        """Give claimed rows back due now (no attempt counted), unless their lease ended and
        another process claimed them since. Due now, not at the `next_attempt_at` they were read
        with: that time may lie behind where a `_give_up` pass (this process's or another's) went
        on reading while they were claimed, out of its read, and a row given back there was
        reached only once a round of passes ended, which a live backlog may never let happen.
        (Due either way: a claimed row was due when read.)"""
        with self.db.transaction() as s:
            now = shared_now()
            for row in rows:
                s.execute(update(WebhookDelivery).where(
                    col(WebhookDelivery.id) == row.id, col(WebhookDelivery.next_attempt_at) == row.leased_until,
                    col(WebhookDelivery.delivered_at).is_(None)).values(next_attempt_at=now, leased_until=None))

    async def _written(self, write: Callable[..., None], *args: Any) -> None:
        """`write` in a thread, to its end even when a stop comes meanwhile (which is raised after
        it): the stop waits for a short transaction rather than leaving it behind."""
        writing = asyncio.ensure_future(asyncio.to_thread(write, *args))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            await writing
            raise

    async def _send(self, client: httpx.AsyncClient, row: Due) -> None:
        error, verdict = await self._post(client, row)
        self.breakers.ended(destination(row.url), row.id, verdict, error or "")
        if error is None:
            await self._written(self._delivered, row)
        else:
            await self._written(self._failed, row, error)

    async def _post(self, client: httpx.AsyncClient, row: Due) -> tuple[str | None, Verdict]:
        """POST the row's delivery: (None when the receiver took it, else why not; what that tells
        of its destination)."""
        job = await asyncio.to_thread(self.describe, row.job_id)
        body = json.dumps({"type": row.event, "job": job}, separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": row.id, "webhook-timestamp": str(timestamp)}
        if self.key is not None:
            headers["webhook-signature"] = signature(self.key, row.id, timestamp, body)
        try:
            # The whole exchange, not each read: a receiver answering a byte at a time would
            # otherwise outlast the claim's lease, and another process send the row beside it.
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                answer = await client.post(_sent_to(row.url), content=body, headers=headers)
        except Exception as exc:
            # Any, not only httpx's: a host that is no IDNA label (`xn--a`) raises idna's
            # `UnicodeError` before any connection, and escaping it left the row claimed and its
            # attempt uncounted, sent again at every lease's end and never given up.
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, "down"
        if answer.is_success:
            return None, "delivered"
        down = answer.status_code >= 500 or answer.status_code == 429  # else it answered: it is up
        return f"answered {answer.status_code}", "down" if down else "refused"

    @staticmethod
    def _still_claimed(row: Due) -> list[sa.ColumnElement[bool]]:
        """The row, while it is as this process's claim left it. A sender that outlived its lease (a
        process paused past it) found it claimed by another since, or sent and redelivered: its
        result written over that marked a redelivery never sent delivered, or counted its attempt."""
        same = [col(WebhookDelivery.id) == row.id]
        if row.leased_until is not None:
            same.append(col(WebhookDelivery.next_attempt_at) == row.leased_until)
        return same

    def _delivered(self, row: Due) -> None:
        with self.db.transaction() as s:
            s.execute(update(WebhookDelivery).where(*self._still_claimed(row))
                      .values(delivered_at=shared_now(), attempts=row.attempts + 1, next_attempt_at=None,
                              leased_until=None))

    def _failed(self, row: Due, error: str) -> None:
        attempts = row.attempts + 1
        wait = BACKOFF_SECONDS[attempts - 1] if attempts <= len(BACKOFF_SECONDS) else None
        with self.db.transaction() as s:
            written = changed(s.execute(update(WebhookDelivery).where(*self._still_claimed(row)).values(
                attempts=attempts, last_error=error[:500], leased_until=None,
                next_attempt_at=None if wait is None else shared_now() + timedelta(seconds=wait))))
        if not written:  # its claim ended and the row moved on: another send or a redelivery has it
            log.info("webhook %s: attempt %d failed (%s) after its claim ended; left as another process or a "
                     "redelivery put it", row.id, attempts, error)
            return
        # The URL without its query, which may carry the receiver's token, nor a password.
        where = shown(row.url.partition("?")[0].partition("#")[0])
        then = "given up" if wait is None else f"next attempt in {wait} s"
        log.warning("webhook %s (%s of job %s) to %s: attempt %d failed: %s; %s", row.id, row.event, row.job_id,
                    where, attempts, error, then)
