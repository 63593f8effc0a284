"""Webhook sends at once: bounded by ORCH_WEBHOOK_CONCURRENCY, at most 2 to one destination, so a
receiver that does not answer holds back its own deliveries, not every project's; and a destination
whose attempts keep failing set aside, its rows unclaimed, until a probe is delivered (those past
their retry schedule given up unsent)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import event as sa_event
from sqlmodel import select

from orchestrator import webhooks
from orchestrator.clock import shared_now
from orchestrator.db import Database
from orchestrator.errors import Forbidden
from orchestrator.models import Job, Project, WebhookDelivery
from orchestrator.schemas import ProjectCreate
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.webhook_deliveries import listed, redeliver

WAIT_SECONDS = 15.0  # for what must happen; the tests never wait this long when it does


class Meter:
    """Requests being answered at once, across receivers: now and the most seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


class Held:
    """A receiver on 127.0.0.1 that records each POST's `webhook-id` as it arrives and answers
    `status` (200) only once `release()`d (at once with `held=False`)."""

    def __init__(self, meter: Meter, *, held: bool = True) -> None:
        self.arrived: list[str] = []
        self.status = 200  # the answer, once released
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.own = Meter()
        if not held:
            self.gate.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                for counting in (meter, receiver.own):
                    counting.enter()
                with receiver.lock:
                    receiver.arrived.append(self.headers["webhook-id"])
                try:
                    receiver.gate.wait()
                    self.send_response(receiver.status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                finally:
                    for counting in (meter, receiver.own):
                        counting.leave()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a sender that gave up on a held request: its socket is gone when the answer comes

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks?token=t"

    def count(self) -> int:
        with self.lock:
            return len(self.arrived)

    def release(self) -> None:
        self.gate.set()

    def hold(self) -> None:
        self.gate.clear()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Held]]:
    made: list[Held] = []
    meter = Meter()

    def make(*, held: bool = True) -> Held:
        made.append(Held(meter, held=held))
        return made[-1]

    make.meter = meter  # type: ignore[attr-defined]
    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture(autouse=True)
def long_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    # A held request stays held for the whole test: no timeout frees its slot meanwhile.
    monkeypatch.setattr(webhooks, "SEND_TIMEOUT_SECONDS", 50.0)


def _deliveries(db: Database, urls: list[tuple[str, int]]) -> list[str]:
    """`count` due rows for each `(url, count)`, due in that order (the first URL's soonest); their ids."""
    with db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced"))
        s.flush()
        s.add(Job(id="job_1", project_id="prj_1", stage="ideation", engine="lite", status="failed"))
    ids: list[str] = []
    first = shared_now() - timedelta(hours=1)
    with db.transaction() as s:
        for url, count in urls:
            for _ in range(count):
                ids.append(f"whd_{len(ids):03d}")
                s.add(WebhookDelivery(id=ids[-1], job_id="job_1", url=url, event="job.failed",
                                      next_attempt_at=first + timedelta(seconds=len(ids))))
    return ids


def _rows(db: Database) -> dict[str, WebhookDelivery]:
    with db.session() as s:
        return {row.id: row for row in s.exec(select(WebhookDelivery)).all()}


async def _until(what: str, check: Callable[[], bool]) -> None:
    """Wait for `check()`, true within WAIT_SECONDS wherever the sender is right."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"never came: {what}"
        await asyncio.sleep(0.01)


def _delivered(db: Database, ids: list[str]) -> Callable[[], bool]:
    return lambda: all(row.delivered_at is not None for i, row in _rows(db).items() if i in ids)


def _counting_looks(deliverer: webhooks.Deliverer) -> list[int]:
    """Counts the deliverer's looks (each a chance to start a send)."""
    looks = [0]
    start_due = deliverer._start_due

    async def counted(client: Any) -> tuple[int, int, bool]:
        looks[0] += 1
        return await start_due(client)

    deliverer._start_due = counted  # type: ignore[method-assign]
    return looks


async def _more_looks(looks: list[int], more: int) -> None:
    """Let the deliverer look `more` times: what it did not start by then, it does not start."""
    seen = looks[0]
    await _until(f"{more} more looks", lambda: looks[0] >= seen + more)


async def _running(deliverer: webhooks.Deliverer, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(deliverer.run())
    try:
        await body()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_receiver_that_does_not_answer_holds_back_only_its_own_deliveries(
        db: Database, receivers: Callable[..., Held]) -> None:
    # One sender at a time, 25 rows to a host that never answers held every other project's
    # delivery back 10 s each: 250 s for the healthy receiver's first.
    dead, healthy = receivers(), receivers(held=False)
    ids = _deliveries(db, [(dead.url, 25), (healthy.url, 3)])
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.05, concurrency=4)

    async def body() -> None:
        await _until("the healthy receiver's 3 deliveries", _delivered(db, ids[25:]))
        # Meanwhile the dead host had its 2 slots and no more, its other rows read past, unclaimed.
        assert dead.count() == 2
        rows = _rows(db)
        waiting = [rows[i] for i in ids[:25] if i not in dead.arrived]
        assert len(waiting) == 23 and all(row.attempts == 0 and row.delivered_at is None for row in waiting)
        assert all(row.next_attempt_at is not None and row.next_attempt_at <= shared_now() for row in waiting)
        dead.release()
        await _until("the 25 others", _delivered(db, ids[:25]))

    asyncio.run(_running(deliverer, body))
    assert sorted(dead.arrived) == ids[:25] and sorted(healthy.arrived) == ids[25:]
    assert {row.attempts for row in _rows(db).values()} == {1}
    assert dead.own.most == 2


def test_a_destination_s_backlog_goes_out_as_its_sends_end_not_a_look_interval_apart(
        db: Database, receivers: Callable[..., Held]) -> None:
    # 2 at a time to one host, and the next 2 when one ends: with the next look an interval later
    # instead, 40 rows took 20 intervals (here 20 minutes).
    healthy = receivers(held=False)
    ids = _deliveries(db, [(healthy.url, 40)])
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=60.0, concurrency=8)

    async def body() -> None:
        await _until("every delivery", _delivered(db, ids))

    asyncio.run(_running(deliverer, body))
    assert sorted(healthy.arrived) == ids and healthy.own.most <= 2


def test_the_sends_at_once_are_bounded_by_the_setting(db: Database, receivers: Callable[..., Held]) -> None:
    held = [receivers() for _ in range(3)]
    ids = _deliveries(db, [(receiver.url, 2) for receiver in held])
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02, concurrency=3)
    looks = _counting_looks(deliverer)
    meter: Meter = receivers.meter  # type: ignore[attr-defined]

    async def body() -> None:
        await _until("3 sends at once", lambda: meter.now == 3)
        await _more_looks(looks, 5)
        assert sum(receiver.count() for receiver in held) == 3
        for receiver in held:
            receiver.release()
        await _until("every delivery", _delivered(db, ids))

    asyncio.run(_running(deliverer, body))
    assert meter.most == 3
    assert sorted(i for receiver in held for i in receiver.arrived) == ids


def test_each_destination_gets_at_most_two_of_the_slots(db: Database, receivers: Callable[..., Held]) -> None:
    held = [receivers() for _ in range(3)]
    ids = _deliveries(db, [(receiver.url, 10) for receiver in held])
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02, concurrency=8)
    looks = _counting_looks(deliverer)

    async def body() -> None:
        await _until("2 sends to each receiver", lambda: [r.count() for r in held] == [2, 2, 2])
        await _more_looks(looks, 5)
        # 2 of the 8 slots free, and no destination gets a third.
        assert [receiver.count() for receiver in held] == [2, 2, 2]
        rows = _rows(db)
        claimed = {i for i, row in rows.items() if row.next_attempt_at is not None
                   and row.next_attempt_at > shared_now()}
        assert claimed == {i for receiver in held for i in receiver.arrived}
        for receiver in held:
            receiver.release()
        await _until("every delivery", _delivered(db, ids))

    asyncio.run(_running(deliverer, body))
    assert [receiver.own.most for receiver in held] == [2, 2, 2]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_stop_gives_the_rows_in_flight_back_for_the_next_start(
        db: Database, receivers: Callable[..., Held], concurrency: int) -> None:
    first, second = receivers(), receivers()
    ids = _deliveries(db, [(first.url, 2), (second.url, 1)])
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02, concurrency=concurrency)
    meter: Meter = receivers.meter  # type: ignore[attr-defined]

    async def stopped_mid_send() -> None:
        task = asyncio.create_task(deliverer.run())
        await _until(f"{concurrency} sends in flight", lambda: meter.now == concurrency)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The sends were awaited, not left pending to be destroyed with the loop.
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(stopped_mid_send())
    in_flight = first.arrived + second.arrived
    assert len(in_flight) == concurrency
    rows = _rows(db)
    # Due at once, as they were: not claimed for the rest of a lease, no attempt counted.
    assert all(row.attempts == 0 and row.delivered_at is None and row.last_error is None for row in rows.values())
    assert all(row.next_attempt_at is not None and row.next_attempt_at <= shared_now() for row in rows.values())
    first.release()
    second.release()
    after = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02, concurrency=concurrency)

    async def body() -> None:
        await _until("every delivery, at the next start", _delivered(db, ids))

    asyncio.run(_running(after, body))
    assert {row.attempts for row in _rows(db).values()} == {1}
    # At least once: the receivers had those in flight before the stop, and again after it.
    assert sorted(first.arrived + second.arrived) == sorted(ids + in_flight)


def test_a_stop_before_a_claimed_send_s_first_step_gives_its_row_back(db: Database) -> None:
    # A task canceled before it first runs runs none of its code: no `except` of the send's own
    # could give its row back, left claimed for its lease's 60 s.
    _deliveries(db, [("http://127.0.0.1:9/h", 2)])
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.1, concurrency=3)

    async def claimed_then_stopped() -> None:
        async with httpx.AsyncClient() as client:
            assert (await deliverer._start_due(client))[1] == 2
            await deliverer._stop_sending()  # no step between: neither send began

    asyncio.run(claimed_then_stopped())
    rows = _rows(db).values()
    assert all(row.attempts == 0 and row.next_attempt_at is not None and row.next_attempt_at <= shared_now()
               for row in rows)


@pytest.mark.parametrize("concurrency", [0, -1, 257])
def test_a_concurrency_out_of_range_is_refused(make_settings: Callable[..., Settings], concurrency: int) -> None:
    with pytest.raises(ValidationError) as refused:
        make_settings(webhook_concurrency=concurrency)
    assert refused.value.errors()[0]["loc"] == ("webhook_concurrency",)


def test_a_destination_is_the_scheme_host_and_port_lowercase_with_the_default_port_written() -> None:
    assert webhooks.destination("https://hooks.example:8443/a/b?c#d") == "https://hooks.example:8443"
    assert webhooks.destination("http://hooks.example?token=t") == "http://hooks.example:80"
    assert webhooks.destination("http://hooks.example#x") == "http://hooks.example:80"
    assert webhooks.destination("http://hooks.example") == "http://hooks.example:80"
    # One receiver however its URLs spell it: they share its 2 slots (and its breaker).
    assert webhooks.destination("HTTPS://A.example:443/x") == webhooks.destination("https://a.example/y") == (
        "https://a.example:443")
    assert webhooks.destination("http://[::1]/h") == "http://[::1]:80"
    assert webhooks.destination("http://a.example:0/h") == "http://a.example:0"


@pytest.mark.parametrize(("spellings", "canonical"), [
    (["https://hooks.example/a", "https://HOOKS.Example/b", "https://hooks.example:443/c",
      "HTTPS://hooks.example:0443/", "https://hooks\u3002example/"], "https://hooks.example:443"),
    (["https://HOOKS.Example./b", "https://hooks.example.:443/c", "https://hooks.example\u3002/"],
     "https://hooks.example.:443"),
    (["https://bücher.example/", "https://BÜCHER.example:443/a", "https://xn--bcher-kva.example/b",
      "https://XN--BCHER-KVA.example/"], "https://bücher.example:443"),
    (["http://[2001:db8::1]/", "http://[2001:DB8:0:0:0:0:0:1]:80/x", "http://[2001:db8:0::1]/?t=1"],
     "http://[2001:db8::1]:80"),
    (["http://[::ffff:127.0.0.1]:8080/", "http://[::FFFF:7f00:1]:8080/", "http://127.0.0.1:8080/"],
     "http://127.0.0.1:8080"),
])
def test_every_spelling_of_one_receiver_is_one_destination(spellings: list[str], canonical: str) -> None:
    # Each spelling was a destination of its own: its own 2 slots, its own breaker (a dead host spelt
    # two ways took 3 failed attempts per spelling to be set aside, and twice the slots).
    assert {webhooks.destination(url) for url in spellings} == {canonical}


def test_an_idn_spelt_in_unicode_or_as_xn_is_one_destination() -> None:
    # httpx sends both to `xn--bcher-kva.example` (and `hooks。example` to `hooks.example`): they were
    # two destinations, two breakers and twice the slots for one receiver.
    assert httpx.URL("https://bücher.example/").raw_host == httpx.URL("https://xn--bcher-kva.example/").raw_host
    assert webhooks.destination("https://bücher.example/") == webhooks.destination("https://xn--bcher-kva.example/")
    assert webhooks.destination("https://hooks\u3002example/") == webhooks.destination("https://hooks.example/")


@pytest.mark.parametrize("url", ["https://%68ooks.example/", "https://hooks.example%2E/", "https://hooks%2Eexample/"])
def test_a_percent_encoded_host_is_not_the_host_it_decodes_to(url: str) -> None:
    # httpx sends the host as written (no resolver knows `%68ooks.example`: every attempt fails), so it
    # is not that receiver: merged, its failed attempts set the real host's breaker aside for every
    # project sending there, and a project key's job URL so spelt passed for its project's receiver.
    assert httpx.URL(url).raw_host.decode() != "hooks.example"
    assert webhooks.destination(url) != webhooks.destination("https://hooks.example/")


@pytest.mark.parametrize("url", ["https://hooks.example../", "https://HOOKS.example...:443/x"])
def test_a_host_with_more_than_one_trailing_dot_is_not_the_host_without(url: str) -> None:
    # One trailing dot is the fully qualified name; two leave an empty label no resolver takes (the
    # idna codec refuses it: every attempt fails). All were stripped, so such a URL's failed attempts
    # set the real host's breaker aside for every project sending there, and a project key's job URL
    # so spelt passed for its project's receiver.
    with pytest.raises(UnicodeError):
        socket.getaddrinfo(httpx.URL(url).host, 443)
    assert webhooks.destination(url) != webhooks.destination("https://hooks.example/")
    assert webhooks.destination(url).split("://")[1].split(":")[0].endswith(".")
    with pytest.raises(Forbidden):
        webhooks.refuse_foreign_receiver(url, "https://hooks.example/", "p-1")


def test_an_ipv6_zone_spelt_percent_encoded_is_not_the_zone_it_decodes_to() -> None:
    # httpx sends `[fe80::1%25lo]` as written: the resolver reads zone `25lo`, no interface, and every
    # attempt fails, where `[fe80::1%lo]` resolves. Decoded, the two were one destination: the dead
    # spelling's failures set the live one's breaker aside.
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(httpx.URL("http://[fe80::1%25lo]/").host, 80, proto=socket.IPPROTO_TCP)
    assert socket.getaddrinfo(httpx.URL("http://[fe80::1%lo]/").host, 80, proto=socket.IPPROTO_TCP)
    assert webhooks.destination("http://[fe80::1%25lo]/") != webhooks.destination("http://[fe80::1%lo]/")
    assert webhooks.destination("http://[FE80:0::1%lo]/") == "http://[fe80::1%lo]:80"


def test_an_ipv4_address_with_a_trailing_dot_is_not_the_address() -> None:
    # `127.0.0.1.` is no address to the resolver but a name it looks up (Name or service not known),
    # where `127.0.0.1` is the address: merged, the dotted URL's failures set the address's breaker
    # aside for every project, and a project key's job URL so spelt passed as its project's receiver.
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(httpx.URL("http://127.0.0.1.:8080/").host, 8080, proto=socket.IPPROTO_TCP)
    assert webhooks.destination("http://127.0.0.1.:8080/") == "http://127.0.0.1.:8080"
    assert webhooks.destination("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    with pytest.raises(Forbidden):
        webhooks.refuse_foreign_receiver("http://127.0.0.1.:8080/h", "http://127.0.0.1:8080/", "p-1")
    assert webhooks.destination("http://hooks.example.:8080/") == "http://hooks.example.:8080"


def test_two_spellings_of_a_dead_host_share_its_breaker(db: Database) -> None:
    # Nothing listens there: each attempt is refused at once, a failure against the destination.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spellings = [f"http://[::1]:{port}/h", f"http://[0:0:0:0:0:0:0:1]:{port}/h"]
    ids = _deliveries(db, [(spellings[n % 2], 1) for n in range(12)])
    # Sends at once: 2, 1 to a destination (so one's failures come one after the other, exactly 3).
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02, concurrency=2)
    deliverer.breakers.clock = lambda: 1000.0  # no cool-down ends
    looks = _counting_looks(deliverer)

    async def body() -> None:
        await _until("3 failed attempts", lambda: sum(_attempts(db, ids)) >= 3)
        await _more_looks(looks, 10)

    asyncio.run(_running(deliverer, body))
    # One breaker set aside after 3 failures in a row, whichever spelling each was sent to: the rows
    # of both then wait (apart, each spelling had 3 of its own, 6 in all, and a slot of its own).
    assert deliverer.breakers.set_aside() == [f"http://[::1]:{port}"] and len(deliverer.breakers) == 1
    assert sum(_attempts(db, ids)) == 3


def test_the_sql_filter_of_a_destination_spells_its_host_with_its_trailing_dot_only_if_it_has_one(
        db: Database) -> None:
    # What a set-aside destination's rows past their schedule are given up by, one update: `host.` is
    # another destination than `host` (`_host`), whose rows a set-aside `host` must not give up.
    urls = ["http://Dead.Example./h", "http://dead.example.:80?t=1", "http://dead.example", "http://dead.example.org/h",
            "http://dead.example.:81/h", "http://DEAD.example:80/h"]
    ids = _deliveries(db, [(url, 1) for url in urls])
    assert _matched(db, "http://dead.example/") == [ids[2], ids[5]]
    assert _matched(db, "http://dead.example./") == ids[:2]


def test_the_sql_filter_of_an_idn_destination_spells_its_host_in_unicode_and_as_xn(db: Database) -> None:
    # One destination since d7ef51a, whichever spelling made it: rows spelt `xn--` were missed by the
    # update that gives up a set-aside destination's rows (they waited for probes, one each).
    check_the_sql_filter_of_an_idn_destination(db)


def check_the_sql_filter_of_an_idn_destination(db: Database) -> None:
    urls = ["https://bücher.example/h", "https://xn--bcher-kva.example/h", "https://xn--bcher-kva.example:443?t=1",
            "https://bücher.example.org/h", "https://xn--bcher-kva.example:8443/h"]
    ids = _deliveries(db, [(url, 1) for url in urls])
    for spelled in ("https://xn--bcher-kva.example/", "https://bücher.example/"):
        with db.session() as s:
            found = s.exec(select(WebhookDelivery.id).where(webhooks._to(webhooks.destination(spelled))))
            assert sorted(found) == ids[:3], spelled


def _matched(db: Database, url: str) -> list[str]:
    """The ids of the rows `_to` finds for `url`'s destination: what a set-aside one gives up."""
    with db.session() as s:
        return sorted(s.exec(select(WebhookDelivery.id).where(webhooks._to(webhooks.destination(url)))))


def test_an_ipv4_mapped_ipv6_address_is_the_ipv4_address_it_maps(receivers: Callable[..., Held], db: Database) -> None:
    # httpx connects `[::ffff:127.0.0.1]` to 127.0.0.1 (the kernel maps it; a receiver listening on
    # 127.0.0.1 alone gets both), so they are one receiver: apart, each spelling had 2 slots and a
    # breaker of its own, and a project key was refused a job URL on its project's own receiver.
    receiver = receivers(held=False)
    port = receiver.server.server_address[1]
    spellings = [f"http://127.0.0.1:{port}/h", f"http://[::ffff:127.0.0.1]:{port}/h", f"http://[::FFFF:7f00:1]:{port}/h",
                 f"http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/h"]
    with httpx.Client() as client:
        for n, url in enumerate(spellings):
            assert client.post(url, content=b"{}", headers={"webhook-id": f"whd_{n}"}).status_code == 200
    assert receiver.arrived == ["whd_0", "whd_1", "whd_2", "whd_3"]
    assert {webhooks.destination(url) for url in spellings} == {f"http://127.0.0.1:{port}"}
    for url in spellings:
        webhooks.refuse_foreign_receiver(url, spellings[0], "p-1")
        webhooks.refuse_foreign_receiver(spellings[0], url, "p-1")
    # Not the IPv4-compatible form (`::127.0.0.1`, an IPv6 address httpx cannot reach here), nor a
    # mapped address with a zone (the resolver takes a zone only on a link-local address).
    for other in (f"http://[::127.0.0.1]:{port}/h", f"http://[::ffff:127.0.0.1%lo]:{port}/h"):
        assert webhooks.destination(other) != webhooks.destination(spellings[0])
    with pytest.raises(httpx.ConnectError), httpx.Client() as client:
        client.post(f"http://[::127.0.0.1]:{port}/h")
    # The SQL filter a set-aside destination's rows are given up by spells it the three ways written compressed.
    ids = _deliveries(db, [(url, 1) for url in [*spellings[:3], f"http://[::ffff:127.0.0.2]:{port}/h",
                                                f"http://[::ffff:7f00:1]:{port + 1}/h"]])
    assert _matched(db, spellings[0]) == _matched(db, spellings[1]) == ids[:3]


def test_an_ipv6_host_is_sent_as_its_destination_writes_it_past_a_proxy(
        receivers: Callable[..., Held], db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # One destination with 127.0.0.1, so a project key whose receiver is http://127.0.0.1:PORT may
    # name it; but httpx routes a URL by its host as written: with HTTP_PROXY and NO_PROXY=127.0.0.1
    # (read from the environment), `[::ffff:127.0.0.1]` went to the proxy, which connects to its own
    # 127.0.0.1, another host than the project's receiver. Sent as the IPv4 address, it goes where
    # 127.0.0.1 goes.
    receiver, proxy = receivers(held=False), receivers(held=False)
    port = receiver.server.server_address[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server.server_address[1]}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    now = shared_now()

    async def post(n: int, url: str) -> tuple[str | None, webhooks.Verdict]:
        async with deliverer._client() as client:
            return await deliverer._post(client, webhooks.Due(f"whd_{n}", "job_1", url, "job.failed", 0, now))

    for n, url in enumerate([f"http://127.0.0.1:{port}/h", f"http://[::ffff:127.0.0.1]:{port}/h?t=1",
                             f"http://[::FFFF:7f00:1]:{port}/h"]):
        webhooks.refuse_foreign_receiver(url, f"http://127.0.0.1:{port}/", "p-1")
        assert asyncio.run(post(n, url)) == (None, "delivered")
    assert (receiver.arrived, proxy.arrived) == (["whd_0", "whd_1", "whd_2"], [])
    # A host that is another destination is sent as written: through the proxy.
    assert asyncio.run(post(3, f"http://localhost:{port}/h")) == (None, "delivered")
    assert proxy.arrived == ["whd_3"]
    # So with an IPv6 address not compressed: `[0:0:0:0:0:0:0:1]` is `[::1]`, and goes where it goes.
    monkeypatch.setenv("NO_PROXY", "::1")
    arrived: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            arrived.append(self.headers["webhook-id"])
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    with Server(("::1", 0), Handler) as six:
        threading.Thread(target=six.serve_forever, daemon=True).start()
        try:
            for n, host in enumerate(["[::1]", "[0:0:0:0:0:0:0:1]", "[0::1]"], start=4):
                webhooks.refuse_foreign_receiver(f"http://{host}:{six.server_address[1]}/h",
                                                 f"http://[::1]:{six.server_address[1]}/", "p-1")
                assert asyncio.run(post(n, f"http://{host}:{six.server_address[1]}/h")) == (None, "delivered")
        finally:
            six.shutdown()
    assert (arrived, proxy.arrived) == (["whd_4", "whd_5", "whd_6"], ["whd_3"])


def test_a_single_label_host_with_a_trailing_dot_is_not_the_host_without(db: Database) -> None:
    # One trailing dot makes a name fully qualified, and a single label so is looked up as a
    # top-level name: no `/etc/hosts` entry matches it (`localhost` is there, `localhost.` is not)
    # and no resolv.conf search domain is tried (`hooks` may be `hooks.corp.example`, `hooks.` never
    # is). On the machine this was found on, getaddrinfo and httpx reached `localhost` and not
    # `localhost.` (Name or service not known): merged, the dead spelling's failures set the live
    # one's breaker aside, and a project key's job URL so spelt passed for its project's receiver.
    port = 8080
    assert webhooks.destination(f"http://LOCALHOST.:{port}/h") == f"http://localhost.:{port}"
    assert webhooks.destination(f"http://Localhost:{port}/h") == f"http://localhost:{port}"
    with pytest.raises(Forbidden):
        webhooks.refuse_foreign_receiver(f"http://localhost.:{port}/h", f"http://localhost:{port}/", "p-1")
    with pytest.raises(Forbidden):
        webhooks.refuse_foreign_receiver("http://hooks/h", "http://hooks./", "p-1")
    assert webhooks.destination("https://bücher./") == "https://bücher.:443" != webhooks.destination("https://bücher/")
    # So a name of more labels (`multi_label` below); two dots stay apart (an empty label).
    assert webhooks.destination("http://hooks../") not in {"http://hooks.:80", "http://hooks:80"}
    # And the SQL filter of each spells it alone.
    ids = _deliveries(db, [(url, 1) for url in ("http://hooks/h", "http://HOOKS:80?t=1", "http://hooks./h",
                                                "http://hooks.:80/h", "http://hooks../h")])
    assert _matched(db, "http://hooks/") == ids[:2]
    assert _matched(db, "http://hooks./") == ids[2:4]


def test_an_ipv6_zone_is_matched_by_the_sql_filter_as_written(db: Database) -> None:
    # Interface names are case-sensitive: the resolver takes `fe80::1%lo` and refuses `fe80::1%LO`,
    # two destinations. The SQL filter folded the zone too: `%lo` set aside gave up `%LO`'s rows
    # (another receiver's), and `%LO`'s own rows were never matched (lowercase URL to a mixed-case prefix).
    assert socket.getaddrinfo("fe80::1%lo", 80, proto=socket.IPPROTO_TCP)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("fe80::1%LO", 80, proto=socket.IPPROTO_TCP)
    assert webhooks.destination("http://[FE80::1%LO]/") == "http://[fe80::1%LO]:80" != webhooks.destination(
        "http://[fe80::1%lo]/")
    ids = _deliveries(db, [(url, 1) for url in ("http://[fe80::1%lo]/h", "HTTP://[FE80::1%lo]:80?t=1",
                                                "http://[fe80::1%LO]/h", "http://[fe80::1%Lo]/h")])
    assert _matched(db, "http://[fe80::1%lo]/") == ids[:2]
    assert _matched(db, "http://[fe80::1%LO]/") == [ids[2]]


def test_the_sql_filter_of_an_idn_destination_folds_its_non_ascii_capitals(db: Database) -> None:
    check_the_sql_filter_of_an_idn_destination_folds_its_non_ascii_capitals(db)


def check_the_sql_filter_of_an_idn_destination_folds_its_non_ascii_capitals(db: Database) -> None:
    # `BÜCHER.example` is `bücher.example` (httpx sends both as `xn--bcher-kva.example`), but SQLite's
    # `lower()` folds ASCII alone: a set-aside destination's rows so spelt were never given up, and
    # waited for probes, one each, pending for weeks.
    urls = ["https://BÜCHER.example/h", "https://Bücher.EXAMPLE:443?t=1", "https://bÜcher.example/h",
            "https://BÜCHER.example.org/h", "https://BÜCHER.example:8443/h", "https://xn--bcher-kva.example/h"]
    ids = _deliveries(db, [(url, 1) for url in urls])
    assert _matched(db, "https://bücher.example/") == [*ids[:3], ids[5]]
    assert _matched(db, "https://BÜCHER.example:8443/") == [ids[4]]
    # As the sender gives them up.
    old = shared_now() - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = old
    webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)._give_up(
        {webhooks.destination("https://bücher.example/"): "answered 503"})
    assert [i for i, row in sorted(_rows(db).items()) if row.next_attempt_at is None] == [*ids[:3], ids[5]]


def test_the_sql_filter_folds_no_capital_into_another_host_s_letter(db: Database) -> None:
    check_the_sql_filter_folds_no_capital_into_another_host_s_letter(db)


def check_the_sql_filter_folds_no_capital_into_another_host_s_letter(db: Database) -> None:
    # A capital sigma lowers to a final sigma (`ς`) at a word's end and to a sigma (U+03C3) elsewhere,
    # as urlsplit and httpx lower it: `ΛΔΣ-ΦΨ.example` is `λδς-φψ.example` (xn----4lbu3avm), another
    # host than the one with a sigma (xn----4lbu7aqm). Folded to a sigma in SQL (a `replace` on
    # SQLite, `lower` on PostgreSQL), the give-up of the set-aside sigma host gave up the other's rows.
    sigma = "\u03c3"
    assert webhooks.destination("http://ΛΔΣ-ΦΨ.example/h") == "http://λδς-φψ.example:80"
    ids = _deliveries(db, [(url, 1) for url in (f"http://λδ{sigma}-φψ.example/h", "http://ΛΔΣ-ΦΨ.example/h",
                                                "http://λδς-φψ.example/h", "http://ΛΔΣ/h", f"http://λδ{sigma}/h",
                                                "http://İooks.example/h", "http://iooks.example/h")])
    assert webhooks.destination("http://ΛΔΣ/h") == "http://λδς:80"
    assert _matched(db, f"http://λδ{sigma}-φψ.example/") == [ids[0]]
    assert _matched(db, f"http://λδ{sigma}/") == [ids[4]]
    # `İ` lowers to `i` and U+0307, two characters (httpx sends `İooks.example` as
    # xn--iooks-7fd.example), but PostgreSQL's `lower` makes it `i`: `iooks.example` set aside took it in.
    assert webhooks.destination("http://İooks.example/h") == "http://i\u0307ooks.example:80"
    assert _matched(db, "http://iooks.example/") == [ids[6]]
    old = shared_now() - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = old
    webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)._give_up(
        {webhooks.destination(url): "answered 503" for url in (f"http://λδ{sigma}-φψ.example/", f"http://λδ{sigma}/",
                                                               "http://iooks.example/")})
    assert [i for i, row in sorted(_rows(db).items()) if row.next_attempt_at is None] == [ids[0], ids[4], ids[6]]


def test_the_sql_filter_of_a_host_of_many_non_ascii_letters_runs(db: Database) -> None:
    check_the_sql_filter_of_a_host_of_many_non_ascii_letters_runs(db)


def check_the_sql_filter_of_a_host_of_many_non_ascii_letters_runs(db: Database) -> None:
    # A `replace` per non-ASCII letter nested one in the next: SQLite's parser overflowed its stack
    # past 24 of them, SQLAlchemy's compiler its recursion past about 85, so the SQL filter of a
    # host that httpx sends (three labels, 100 letters) raised. A full or set-aside destination is in
    # every read of due rows: no delivery to any host was sent while it was one.
    labels = ["".join(map(chr, range(0x430, 0x450))), "".join(chr(c) for c in range(0xE0, 0xFF) if c != 0xF7),
              "".join(map(chr, range(0x561, 0x587)))]
    url = f"https://{'.'.join(labels)}.example/h"
    assert ProjectCreate(name="p", webhook_url=url).webhook_url == url  # taken as a project's URL
    where = webhooks.destination(url)
    ids = _deliveries(db, [(url, 1), (f"HTTPS://{'.'.join(labels)}.EXAMPLE:443/h", 1), ("https://hooks.example/h", 1)])
    assert _matched(db, url) == ids[:2]
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    assert [row.id for row in deliverer._due(full=[where])] == [ids[2]]
    old = shared_now() - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = old
    deliverer._give_up({where: "answered 503"})
    assert [i for i, row in sorted(_rows(db).items()) if row.next_attempt_at is None] == ids[:2]


def test_a_full_destination_is_read_past_not_one_that_merely_shares_its_start(db: Database) -> None:
    check_a_full_destination_is_read_past(db)


def check_a_full_destination_is_read_past(db: Database) -> None:
    # `http://a.example` full: `http://a.example.org/...` is another host, read as ever; its other
    # spellings (capitals, the default port written) are the same one, read past.
    _deliveries(db, [("http://a.example/h", 1), ("http://a.example?t=1", 1), ("http://a.example", 1),
                     ("http://a.example.org/h", 1), ("http://a.example:81/h", 1), ("HTTP://A.Example:80/H", 1),
                     ("http://a.EXAMPLE:80", 1), ("Http://a.example:8/h", 1), ("https://a.example/h", 1)])
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    full = webhooks.destination("http://a.example/")
    assert [row.url for row in deliverer._due((), [full])] == [
        "http://a.example.org/h", "http://a.example:81/h", "Http://a.example:8/h", "https://a.example/h"]
    # And the other way: a destination written with its port is the one its URLs leave it out of.
    assert [row.url for row in deliverer._due((), [webhooks.destination("HTTPS://A.EXAMPLE:443/")])][-2:] == [
        "http://a.EXAMPLE:80", "Http://a.example:8/h"]
    assert [row.id for row in deliverer._due(["whd_000", "whd_003"])][:3] == ["whd_001", "whd_002", "whd_004"]


def test_spellings_the_sql_filter_misses_do_not_fill_every_read(db: Database) -> None:
    check_spellings_the_sql_filter_misses_do_not_fill_every_read(db)


def check_spellings_the_sql_filter_misses_do_not_fill_every_read(db: Database) -> None:
    # URLs the settings take whose destination the SQL's prefixes do not spell (an empty port, a port
    # with a leading zero, a non-ASCII capital SQLite's `lower` keeps): a full or set-aside receiver's
    # oldest rows so written filled each read of 20, and no other destination's row was ever read.
    for url in ("https://hooks.example:/h", "https://hooks.example:0443/h", "https://HOOKS.ÉXAMPLE/h"):
        assert ProjectCreate(name="p", webhook_url=url).webhook_url == url  # taken as written
    ids = _deliveries(db, [("https://hooks.example:/h", 10), ("https://hooks.example:0443/h", 10),
                           ("https://HOOKS.ÉXAMPLE/h", 10), ("https://hooks.éxample/h", 10),
                           ("https://other.example/h", 1)])
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    full = [webhooks.destination("https://hooks.example/"), webhooks.destination("https://hooks.éxample/")]
    assert [row.id for row in deliverer._due((), full)] == [ids[-1]]


def test_a_claim_given_back_is_due_at_once_unless_claimed_since(db: Database) -> None:
    check_a_claim_given_back_is_due_at_once(db)


def check_a_claim_given_back_is_due_at_once(db: Database) -> None:
    _deliveries(db, [("http://a.example/h", 2)])
    first = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    second = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    due = first._due()
    read = {row.id: row.next_attempt_at for row in due}
    assert [row.id for row in first._claim_all(due)] == ["whd_000", "whd_001"]
    assert first._due() == []
    # whd_001's lease ended and another process claimed it: that claim is not undone.
    with db.transaction() as s:
        s.get_one(WebhookDelivery, "whd_001").next_attempt_at = shared_now() - timedelta(seconds=1)
    [expired] = second._due()
    assert second._claim_all([expired]) == [expired]
    first._release(due)
    rows = _rows(db)
    # Due from the give-back on, not at the time it was read (`check_a_claim_given_back_behind_the_cursor_is_reached`).
    given_back = rows["whd_000"].next_attempt_at
    assert given_back is not None and given_back > read["whd_000"] and rows["whd_000"].attempts == 0
    assert rows["whd_001"].next_attempt_at == expired.leased_until
    assert [row.id for row in first._due()] == ["whd_000"]


def _attempts(db: Database, ids: list[str]) -> list[int]:
    rows = _rows(db)
    return [rows[i].attempts for i in ids]


def _set_aside_by(receivers: Callable[..., Held], db: Database, monkeypatch: pytest.MonkeyPatch) -> tuple[
        Held, Held, list[str], webhooks.Deliverer, list[float], list[int]]:
    """A receiver that answers 503 with 10 rows due, then one that answers 200 with 3; a deliverer
    (1 send at a time to each) whose breakers' clock is the list's one figure, and its looks."""
    # The breakers' clock is the list's; a failed row's retry is due by the real one: the first
    # backoff outlasts a loaded machine's run (at 10 s, a test past 10 s saw a row sent twice).
    monkeypatch.setattr(webhooks, "BACKOFF_SECONDS", (3600, *webhooks.BACKOFF_SECONDS[1:]))
    dead, healthy = receivers(held=False), receivers(held=False)
    dead.status = 503
    ids = _deliveries(db, [(dead.url, 10), (healthy.url, 3)])
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02, concurrency=2)
    clock = [1000.0]
    deliverer.breakers.clock = lambda: clock[0]
    return dead, healthy, ids, deliverer, clock, _counting_looks(deliverer)


def test_a_dead_destination_is_set_aside_its_rows_unspent_until_a_probe_is_delivered(
        db: Database, receivers: Callable[..., Held], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.webhooks")
    dead, healthy, ids, deliverer, clock, looks = _set_aside_by(receivers, db, monkeypatch)
    where = webhooks.destination(dead.url)
    due = {i: row.next_attempt_at for i, row in _rows(db).items()}

    async def body() -> None:
        # Its first 3 failed; the other 7 are neither sent nor claimed nor spent, as the healthy
        # receiver's go out (before, each look sent one more of them, tried again 10 s later).
        await _until("the healthy receiver's 3 deliveries", _delivered(db, ids[10:]))
        await _more_looks(looks, 10)
        assert dead.count() == 3 and deliverer.breakers.set_aside() == [where] and deliverer.breakers.count() == 1
        assert _attempts(db, ids[:10]) == [1, 1, 1] + [0] * 7
        rows = _rows(db)
        assert all(rows[i].next_attempt_at == due[i] for i in ids[3:10])  # their schedule untouched
        clock[0] += webhooks.COOL_DOWN_SECONDS - 1
        await _more_looks(looks, 5)
        assert dead.count() == 3
        # The cool-down over: one row is the probe, the others wait for its answer.
        dead.status = 200
        dead.hold()
        clock[0] += 1
        await _until("the probe", lambda: dead.count() == 4)
        await _more_looks(looks, 5)
        assert dead.count() == 4 and deliverer.breakers.set_aside() == [where]
        dead.release()
        await _until("the others, once the probe is delivered", _delivered(db, ids[3:10]))

    asyncio.run(_running(deliverer, body))
    assert deliverer.breakers.count() == 0 and deliverer.breakers.set_aside() == []
    assert _attempts(db, ids[3:10]) == [1] * 7 and sorted(healthy.arrived) == ids[10:]
    told = [r.getMessage() for r in caplog.records if where in r.getMessage()]
    assert len([m for m in told if "set aside" in m]) == 1 and len([m for m in told if "is back" in m]) == 1, told


def test_a_failed_probe_sets_the_destination_aside_twice_as_long(
        db: Database, receivers: Callable[..., Held], monkeypatch: pytest.MonkeyPatch) -> None:
    dead, _, ids, deliverer, clock, looks = _set_aside_by(receivers, db, monkeypatch)

    async def body() -> None:
        await _until("the healthy receiver's 3 deliveries", _delivered(db, ids[10:]))
        await _until("3 attempts", lambda: dead.count() == 3)
        clock[0] += webhooks.COOL_DOWN_SECONDS
        await _until("the first probe, failed", lambda: _attempts(db, ids[:4]) == [1] * 4)
        clock[0] += webhooks.COOL_DOWN_SECONDS
        await _more_looks(looks, 5)
        assert dead.count() == 4  # 60 s now, not 30
        clock[0] += webhooks.COOL_DOWN_SECONDS
        await _until("the second probe", lambda: _attempts(db, ids[:5]) == [1] * 5)
        dead.status = 200
        clock[0] += 4 * webhooks.COOL_DOWN_SECONDS
        await _until("the rest, once a probe is delivered", _delivered(db, ids[5:10]))

    asyncio.run(_running(deliverer, body))
    assert _attempts(db, ids[:10]) == [1] * 10


def test_what_counts_against_a_destination(caplog: pytest.LogCaptureFixture) -> None:
    breakers = webhooks.Breakers()
    clock = [0.0]
    breakers.clock = lambda: clock[0]
    # Any answer but a 5xx or 429 (a success, a refusal: the receiver is up) starts the count again.
    for verdict in ("down", "down", "refused", "down", "down", "delivered", "down", "down"):
        breakers.ended("http://a:80", "whd_1", verdict)
    assert breakers.count() == 0
    breakers.ended("http://a:80", "whd_1", "down")
    assert breakers.set_aside() == ["http://a:80"] and breakers.slots("http://a:80", 2) == 0
    # Its cool-downs double up to 10 minutes; a probe stopped leaves the turn to the next row.
    for cool_down in (30, 60, 120, 240, 480, 600, 600):
        clock[0] += cool_down - 0.5
        assert breakers.slots("http://a:80", 2) == 0
        clock[0] += 0.5
        assert breakers.slots("http://a:80", 2) == 1 and breakers.set_aside() == []
        breakers.sending("http://a:80", "whd_2")
        assert breakers.set_aside() == ["http://a:80"]  # the others wait for the probe's answer
        breakers.ended("http://a:80", "whd_2", None)
        breakers.sending("http://a:80", "whd_4")
        breakers.ended("http://a:80", "whd_1", "down")  # a send from before: not the probe's answer
        assert breakers.set_aside() == ["http://a:80"]
        breakers.ended("http://a:80", "whd_4", "down")
    breakers.ended("http://a:80", "whd_1", "delivered")  # any success: it is back
    assert breakers.count() == 0 and breakers.slots("http://a:80", 2) == 2
    # A probe refused is an answer too: a receiver refusing each delivery (a key changed) is up,
    # sent to as any other, not one probe at a time for good.
    for _ in range(webhooks.FAILURES_TO_SET_ASIDE):
        breakers.ended("http://a:80", "whd_1", "down")
    clock[0] += 30
    breakers.sending("http://a:80", "whd_5")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orchestrator.webhooks"):
        breakers.ended("http://a:80", "whd_5", "refused", "answered 401")
    assert breakers.count() == 0 and breakers.slots("http://a:80", 2) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "webhook destination http://a:80 is back (it answered: answered 401): its deliveries are sent again"]


def test_idle_breakers_are_forgotten_and_their_number_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that failed to reach many distinct hosts does not keep a breaker for each for good:
    one with nothing tried for BREAKER_IDLE_SECONDS is forgotten, and at most MAX_BREAKERS are kept,
    the least recently used going first and those holding their rows back last."""
    breakers = webhooks.Breakers()
    clock = [0.0]
    breakers.clock = lambda: clock[0]
    # 1,000 hosts, each failed once (a streak of 1, not set aside), then never tried again.
    for n in range(1000):
        breakers.ended(f"http://gone{n}:80", "whd_1", "down", f"gone {n}")
    assert len(breakers) == 1000
    clock[0] = 100.0
    for _ in range(webhooks.FAILURES_TO_SET_ASIDE):  # set aside until 130
        breakers.ended("http://dead:80", "whd_2", "down", "dead")
    clock[0] = webhooks.BREAKER_IDLE_SECONDS - 10
    breakers.ended("http://flaky:80", "whd_3", "down", "flaky")
    breakers.ended("http://flaky:80", "whd_3", "down", "flaky")
    assert len(breakers) == 1002  # not idle yet: 10 s to go
    clock[0] += webhooks.PRUNE_EVERY_SECONDS
    breakers.ended("http://new:80", "whd_4", "down", "new")  # a new one: the idle ones are looked for
    assert len(breakers) == 3 and breakers.last_error("http://gone0:80") == ""
    assert breakers.slots("http://dead:80", 2) == 1  # still known: its probe's turn
    breakers.ended("http://flaky:80", "whd_3", "down", "flaky")
    assert breakers.set_aside() == ["http://flaky:80"]  # its streak was kept: the third set it aside
    # Nothing tried to `dead` for an hour past its cool-down's end: forgotten, sent to as a new host.
    clock[0] += 90
    breakers.ended("http://other:80", "whd_5", "down", "other")
    assert breakers.slots("http://dead:80", 2) == 2 and breakers.last_error("http://dead:80") == ""
    assert breakers.slots("http://flaky:80", 2) == 1
    # A probe in flight is never idle, however long it lasts.
    breakers.sending("http://flaky:80", "whd_6")
    clock[0] += 2 * webhooks.BREAKER_IDLE_SECONDS
    breakers.ended("http://another:80", "whd_7", "down", "another")
    assert breakers.set_aside() == ["http://flaky:80"] and len(breakers) == 2

    # The bound: the least recently used go first, one holding its rows back last.
    monkeypatch.setattr(webhooks, "MAX_BREAKERS", 5)
    for n in range(20):
        clock[0] += 1
        breakers.ended(f"http://host{n}:80", "whd_8", "down", f"host {n}")
        assert len(breakers) <= 5
    assert breakers.set_aside() == ["http://flaky:80"]
    assert [breakers.last_error(f"http://host{n}:80") for n in (15, 16, 19)] == ["", "host 16", "host 19"]
    for n in (16, 17, 18, 19):  # their streaks were kept: two more set them aside
        breakers.ended(f"http://host{n}:80", "whd_8", "down", f"host {n}")
        breakers.ended(f"http://host{n}:80", "whd_8", "down", f"host {n}")
    assert breakers.set_aside() == ["http://flaky:80"] + [f"http://host{n}:80" for n in (16, 17, 18, 19)]


def test_an_idle_breaker_is_forgotten_by_its_own_next_attempt_too() -> None:
    """Idle breakers are swept only as a new one is made; until then the next attempt to an idle
    destination finds it forgotten all the same: a streak of two failures an hour and more old does
    not set it aside at its next failure, nor does a cool-down long over keep it to one probe."""
    breakers = webhooks.Breakers()
    clock = [0.0]
    breakers.clock = lambda: clock[0]
    breakers.ended("http://stale:80", "whd_1", "down", "stale")
    breakers.ended("http://stale:80", "whd_1", "down", "stale")
    for _ in range(webhooks.FAILURES_TO_SET_ASIDE):  # set aside until 30
        breakers.ended("http://dead:80", "whd_2", "down", "dead")
    assert breakers.set_aside() == ["http://dead:80"]
    clock[0] = 30 + webhooks.BREAKER_IDLE_SECONDS
    assert breakers.slots("http://dead:80", 2) == 2  # a new destination's slots, not one probe
    breakers.ended("http://stale:80", "whd_3", "down", "stale")  # the first of a new streak
    assert breakers.set_aside() == [] and breakers.last_error("http://dead:80") == ""
    breakers.ended("http://stale:80", "whd_3", "down", "stale")
    breakers.ended("http://stale:80", "whd_3", "down", "stale")
    assert breakers.set_aside() == ["http://stale:80"]


def test_metrics_count_the_destinations_set_aside(make_settings: Callable[..., Settings]) -> None:
    services = Services.build(make_settings())
    try:
        assert "orchestrator_webhook_destinations_set_aside 0\n" in services.metrics()
        services.webhook_deliverer = webhooks.Deliverer(services.db, lambda job_id: {}, None, interval=0.1)
        for _ in range(webhooks.FAILURES_TO_SET_ASIDE):
            services.webhook_deliverer.breakers.ended("http://a:80", "whd_1", "down")
        assert "orchestrator_webhook_destinations_set_aside 1\n" in services.metrics()
    finally:
        asyncio.run(services.aclose())


@pytest.mark.parametrize(("answer", "verdict"), [(200, "delivered"), (404, "refused"), (301, "refused"),
                                                (429, "down"), (503, "down"), (None, "down"), (0, "down")])
def test_what_an_attempt_tells_of_its_destination(db: Database, receivers: Callable[..., Held],
                                                  monkeypatch: pytest.MonkeyPatch, answer: int | None,
                                                  verdict: str) -> None:
    receiver = receivers(held=answer == 0)  # 0: no answer in time
    monkeypatch.setattr(webhooks, "SEND_TIMEOUT_SECONDS", 0.2)
    receiver.status = answer or 200
    url = receiver.url if answer is not None else "http://127.0.0.1:9/h"  # None: nothing listens, no connection
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    row = webhooks.Due("whd_1", "job_1", url, "job.failed", 0, shared_now())

    async def post() -> tuple[str | None, webhooks.Verdict]:
        async with httpx.AsyncClient() as client:
            return await deliverer._post(client, row)

    assert asyncio.run(post())[1] == verdict


@pytest.mark.parametrize("how", ["stopped", "job not read"])
def test_a_probe_that_ends_without_telling_leaves_the_turn_to_the_next_row(db: Database, how: str) -> None:
    # Else its destination stayed set aside for good: no probe's answer was ever to come.
    _deliveries(db, [("http://127.0.0.1:9/h", 2)])

    def describe(job_id: str) -> dict[str, Any]:
        raise RuntimeError("the database is away")

    deliverer = webhooks.Deliverer(db, describe, None, interval=0.1, concurrency=3)
    where = webhooks.destination("http://127.0.0.1:9/h")
    for _ in range(webhooks.FAILURES_TO_SET_ASIDE):
        deliverer.breakers.ended(where, "whd_x", "down")
    deliverer.breakers.clock = lambda: time.monotonic() + webhooks.COOL_DOWN_SECONDS

    async def probed() -> None:
        async with httpx.AsyncClient() as client:
            assert (await deliverer._start_due(client))[1] == 1  # the probe, alone
            assert deliverer.breakers.set_aside() == [where]
            if how == "stopped":
                await deliverer._stop_sending()
            else:
                await asyncio.wait(list(deliverer._sending))

    asyncio.run(probed())
    assert deliverer.breakers.set_aside() == [] and deliverer.breakers.slots(where, 2) == 1


def check_a_set_aside_destination_s_rows_past_their_schedule_are_given_up_unsent(db: Database) -> None:
    # Only a set-aside destination's probes spend attempts: its N rows waited about 1.5 x N hours,
    # pending, for one probe each, however far past their 20.6-hour schedule.
    dead, alive = "http://dead.example/hooks", "http://alive.example/hooks"
    ids = _deliveries(db, [(dead, 4), (alive, 1)])
    now = shared_now()
    old = now - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    with db.transaction() as s:
        s.get_one(Project, "prj_1").webhook_url = dead
        rows = {row.id: row for row in s.exec(select(WebhookDelivery)).all()}
        for i in ids:
            rows[i].project_id = "prj_1"
            rows[i].created_at = old
        rows[ids[1]].created_at = now - timedelta(seconds=webhooks.SCHEDULE_SECONDS - 60)  # within its schedule
        rows[ids[2]].next_attempt_at = now + timedelta(seconds=webhooks.LEASE_SECONDS)  # another sender's claim
        rows[ids[3]].redelivered_at = now - timedelta(seconds=60)  # a fresh schedule
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["webhook-id"])
        return httpx.Response(200)

    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02, concurrency=2)
    clock = [1000.0]
    deliverer.breakers.clock = lambda: clock[0]
    where = webhooks.destination(dead)
    for attempt in range(webhooks.FAILURES_TO_SET_ASIDE):
        deliverer.breakers.ended(where, f"whd_x{attempt}", "down", "answered 503")

    async def look() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await deliverer.deliver_due(client)

    asyncio.run(look())
    rows = _rows(db)
    assert sent == [ids[4]]  # the other destination's, however old; none of the set-aside one's
    given_up = rows[ids[0]]
    assert given_up.next_attempt_at is None and given_up.delivered_at is None and given_up.attempts == 0
    assert given_up.last_error is not None and where in given_up.last_error and "answered 503" in given_up.last_error
    assert [rows[i].next_attempt_at is None for i in ids[1:4]] == [False] * 3 and rows[ids[2]].last_error is None
    with db.session() as s:
        assert webhooks.counts(s) == (3, 1)
        assert [row.id for row in listed(s, "prj_1", status="failed", job_id=None, after=None, order="desc",
                                         limit=10)] == [ids[0]]
    # Within a minute of that look, rows past their schedule since wait for the next; then given up.
    with db.transaction() as s:
        s.get_one(WebhookDelivery, ids[1]).created_at = old
    clock[0] += webhooks.COOL_DOWN_SECONDS - 1
    asyncio.run(look())
    assert _rows(db)[ids[1]].next_attempt_at is not None

    def failed_probe(cool_down: float) -> None:
        """The cool-down of `cool_down` s ends, its probe fails: set aside twice as long."""
        clock[0] = ended[0] = ended[0] + cool_down
        deliverer.breakers.sending(where, "whd_probe")
        deliverer.breakers.ended(where, "whd_probe", "down", "answered 502")

    ended = [1000.0]
    failed_probe(webhooks.COOL_DOWN_SECONDS)
    clock[0] = 1000.0 + webhooks.GIVE_UP_EVERY_SECONDS
    asyncio.run(look())
    assert _rows(db)[ids[1]].next_attempt_at is None and sent == [ids[4]]
    assert "answered 502" in (_rows(db)[ids[1]].last_error or "")
    # A redelivery is due again, with a fresh schedule: not given up at once, as one past it is.
    assert redeliver(db, ids[0]).status == "pending"
    with db.transaction() as s:
        s.get_one(WebhookDelivery, ids[3]).redelivered_at = old
    failed_probe(2 * webhooks.COOL_DOWN_SECONDS)
    clock[0] += webhooks.GIVE_UP_EVERY_SECONDS - webhooks.COOL_DOWN_SECONDS
    asyncio.run(look())
    rows = _rows(db)
    assert rows[ids[0]].next_attempt_at is not None and rows[ids[3]].next_attempt_at is None and sent == [ids[4]]


def test_a_set_aside_destination_s_rows_past_their_schedule_are_given_up_unsent(db: Database) -> None:
    check_a_set_aside_destination_s_rows_past_their_schedule_are_given_up_unsent(db)


@pytest.mark.parametrize("stored", ["http://[::ffff:127.1]:8080/h", "http://[::1/h", "http://a\uff03b.example/h"])
def test_a_stored_url_urlsplit_refuses_holds_back_no_other_delivery(db: Database, stored: str) -> None:
    # Rows written before the URL checks tightened may hold a URL `urlsplit` raises on (a bracketed
    # host that is no IPv6 address, an unclosed bracket, a host NFKC maps onto a delimiter): reading
    # its destination raised in every look, so no delivery of any project was sent again.
    with pytest.raises(ValueError):
        urlsplit(stored).hostname  # noqa: B018 -- read for its check
    with pytest.raises(ValidationError):
        ProjectCreate(name="p", webhook_url=stored)
    ids = _deliveries(db, [(stored, 1), ("http://alive.example/h", 1)])
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["webhook-id"])
        return httpx.Response(200)

    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02, concurrency=2)
    # Its destination is its own: set aside (a breaker keyed by it), its row is read past, not the other.
    where = webhooks.destination(stored)
    assert where != webhooks.destination("http://127.0.0.1:8080/") and where.startswith("http://")
    assert [row.id for row in deliverer._due((), [where])] == [ids[1]]

    async def look() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await deliverer.deliver_due(client)

    asyncio.run(look())
    rows = _rows(db)
    assert sent == [ids[1]] and rows[ids[1]].delivered_at is not None
    # No outage told: its failure's log line read the URL with `urlsplit` too, and raised.
    assert not deliverer.outage.ongoing
    # Its own attempt fails (httpx refuses the URL too), counted: retried, then given up, as any.
    assert rows[ids[0]].attempts == 1 and rows[ids[0]].delivered_at is None
    assert rows[ids[0]].next_attempt_at is not None and "InvalidURL" in (rows[ids[0]].last_error or "")
    # A project whose stored URL is such: a project key's job URL is refused (403), not a 500.
    with pytest.raises(Forbidden):
        webhooks.refuse_foreign_receiver("http://127.0.0.1:8080/h", stored, "p-1")


def test_the_ipv6_spellings_of_an_ipv4_address_do_not_hang_on_how_python_writes_them(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # Python 3.13 writes an IPv4-mapped IPv6 address `::ffff:127.0.0.1` (`str`, `compressed`), where
    # 3.11 writes `::ffff:7f00:1`: the SQL filter took its hex spelling from `compressed`, so on 3.13
    # a set-aside 127.0.0.1's rows spelt `[::ffff:7f00:1]` were not given up, and a mapped address
    # with a zone was another destination there than here.
    written_311 = ipaddress.IPv6Address.__str__

    def written_313(address: ipaddress.IPv6Address) -> str:
        mapped = address.ipv4_mapped
        if mapped is None:
            return written_311(address)
        return f"::ffff:{mapped}" + ("" if address.scope_id is None else f"%{address.scope_id}")

    ids = _deliveries(db, [(url, 1) for url in ("http://[::ffff:127.0.0.1]:8080/h", "http://[::ffff:7f00:1]:8080/h",
                                                "http://127.0.0.1:8080/h", "http://[::ffff:7f00:2]:8080/h")])
    for written in (written_311, written_313):
        monkeypatch.setattr(ipaddress.IPv6Address, "__str__", written)
        assert _matched(db, "http://127.0.0.1:8080/") == ids[:3]
        assert webhooks.destination("http://[::FFFF:127.0.0.1%lo]/") == "http://[::ffff:7f00:1%lo]:80"
    assert ipaddress.IPv6Address("::ffff:7f00:1").compressed == "::ffff:127.0.0.1"  # 3.13's, as patched


def test_a_numeric_ipv4_spelling_is_the_dotted_quad_it_resolves_to(
        receivers: Callable[..., Held], db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # The URL checks take `127.1`, `2130706433`, `0x7f.1` and `017700000001` (httpx reads them as
    # names, not four decimal parts), and the resolver (inet_aton) connects each to 127.0.0.1: one
    # receiver, which was a destination per spelling, each with its own 2 slots and its own breaker.
    receiver = receivers(held=False)
    port = receiver.server.server_address[1]
    spellings = [f"http://{host}:{port}/h" for host in ("127.1", "2130706433", "0x7f.1", "0X7F.0.0.1", "017700000001",
                                                        "127.0.1", "0x7f000001", "0177.1", "127.0.0.0x1",
                                                        "127\u30021")]
    for url in spellings:
        assert ProjectCreate(name="p", webhook_url=url).webhook_url == url
        assert socket.getaddrinfo(httpx.URL(url).host, port, proto=socket.IPPROTO_TCP)[0][4][0] == "127.0.0.1"
        assert webhooks.destination(url) == f"http://127.0.0.1:{port}", url
        webhooks.refuse_foreign_receiver(url, f"http://127.0.0.1:{port}/", "p-1")
    # Not what the resolver takes for a name: a trailing dot, a digit no octal has, a part past its
    # bits, five parts; nor what httpx refuses as four decimal parts (`0177.0.0.1`, never sent).
    for other in ("127.1.", "08.1", "256.1", "127.16777216", "1.2.3.4.5", "0x", "4294967296"):
        assert webhooks.destination(f"http://{other}:{port}/") == f"http://{other}:{port}", other
        with contextlib.suppress(UnicodeError, socket.gaierror):
            assert socket.getaddrinfo(other, port, proto=socket.IPPROTO_TCP)[0][4][0] != "127.0.0.1"
    assert webhooks.destination(f"http://0177.0.0.1:{port}/") != f"http://127.0.0.1:{port}"
    # Sent as the dotted quad: httpx picks a proxy by the host as written, and with NO_PROXY=127.0.0.1
    # `127.1` went to the proxy (which connects to its own 127.0.0.1), another host than the project's.
    proxy = receivers(held=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server.server_address[1]}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    now = shared_now()

    async def post(n: int, url: str) -> tuple[str | None, webhooks.Verdict]:
        async with deliverer._client() as client:
            return await deliverer._post(client, webhooks.Due(f"whd_{n}", "job_1", url, "job.failed", 0, now))

    for n, url in enumerate(spellings):
        assert asyncio.run(post(n, url)) == (None, "delivered")
    assert (len(receiver.arrived), proxy.arrived) == (len(spellings), [])


def test_a_set_aside_destination_s_rows_spelt_past_the_sql_filter_are_given_up_too(db: Database) -> None:
    check_a_set_aside_destination_s_rows_spelt_past_the_sql_filter_are_given_up_too(db)


def check_a_set_aside_destination_s_rows_spelt_past_the_sql_filter_are_given_up_too(db: Database) -> None:
    # The update that gives up a set-aside destination's rows past their schedule matches their URLs
    # by the SQL prefixes of its spellings (`_to`); those it misses (a dot written `。`, an empty port,
    # a port `080`, `127.1`, an uncompressed IPv6 address) stayed pending, one probe each, for weeks.
    urls = ["http://hooks.example/h", "http://hooks\u3002example/h", "http://hooks.example:/h", "http://HOOKS.example:080/h",
            "http://127.1:8080/h", "http://[0:0:0:0:0:0:0:1]:8080/h", "http://hooks\u3002example/new",
            "http://other\u3002example/h", "http://hooks\u3002example.org/h"]
    ids = _deliveries(db, [(url, 1) for url in urls])
    now = shared_now()
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = now - timedelta(seconds=webhooks.SCHEDULE_SECONDS + (-60 if row.id == ids[6] else 60))
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02)
    set_aside = {webhooks.destination("http://hooks.example/"): "answered 503",
                 webhooks.destination("http://127.0.0.1:8080/"): "ConnectError",
                 webhooks.destination("http://[::1]:8080/"): "ConnectError"}
    assert len(set_aside) == 3 and webhooks.destination(urls[4]) in set_aside
    deliverer._give_up(set_aside)
    rows = _rows(db)
    assert [rows[i].next_attempt_at is None for i in ids] == [True] * 6 + [False] * 3
    assert "answered 503" in (rows[ids[1]].last_error or "") and "ConnectError" in (rows[ids[4]].last_error or "")
    assert [rows[i].last_error for i in ids[6:]] == [None] * 3


def test_a_multi_label_host_with_a_trailing_dot_is_not_the_host_without() -> None:
    # `hooks.dev.` is looked up as written; `hooks.dev` is matched in /etc/hosts (with `10.9.8.7
    # hooks.dev` there, glibc 2.36's getaddrinfo found `hooks.dev` and not `hooks.dev.`: reproduced
    # in a mount namespace with its own /etc/hosts) and tried with resolv.conf's search domains (in
    # Kubernetes, ndots 5, first: Service `hooks` of namespace `dev`). Merged, the dead spelling's
    # failures set the live one's breaker aside, and a project key's job URL so spelt passed for its
    # project's receiver.
    assert webhooks.destination("http://Hooks.Dev./h") == "http://hooks.dev.:80"
    assert webhooks.destination("http://hooks.dev/h") == "http://hooks.dev:80"
    assert webhooks.destination("https://xn--bcher-kva.example./") == "https://bücher.example.:443"
    for url, project_url in (("http://hooks.dev./h", "http://hooks.dev/"), ("http://hooks.dev/h", "http://hooks.dev./")):
        with pytest.raises(Forbidden):
            webhooks.refuse_foreign_receiver(url, project_url, "p-1")
    breakers = webhooks.Breakers()
    for attempt in range(webhooks.FAILURES_TO_SET_ASIDE):
        breakers.ended(webhooks.destination("http://hooks.dev./h"), f"whd_{attempt}", "down", "ConnectError")
    assert breakers.set_aside() == ["http://hooks.dev.:80"]
    assert breakers.slots(webhooks.destination("http://hooks.dev/h"), 2) == 2


@pytest.mark.parametrize("host", ["9" * 5000, "1." + "9" * 5000])
def test_a_host_of_thousands_of_digits_has_a_destination(host: str) -> None:
    # A row stored before the 2,000-character bound: reading its host's digits as a number raised
    # (Python reads at most 4,300 decimal digits), in every look of the sender.
    assert webhooks.destination(f"http://{host}/h") == f"http://{host}:80"
    assert webhooks._sent_to(f"http://{host}/h") == f"http://{host}/h"
    assert webhooks.destination(f"http://0{'0' * 5000}1/h") == "http://0.0.0.1:80"  # octal: leading zeros are read


def test_the_give_up_reads_a_bounded_number_of_missed_urls_soonest_due_first(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_the_give_up_reads_a_bounded_number_of_missed_urls(db, monkeypatch)


def check_the_give_up_reads_a_bounded_number_of_missed_urls(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # The URLs past their schedule are read and placed in Python under the write lock: a bounded
    # number a pass, the soonest due first (a live destination's are sent and leave the read).
    monkeypatch.setattr(webhooks, "MISSED_URLS", 1)
    ids = _deliveries(db, [("http://other\u3002example/h", 1), ("http://hooks\u3002example/h", 1),
                           ("http://hooks\u3002example/later", 1)])
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = shared_now() - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    set_aside = {webhooks.destination("http://hooks.example/"): "answered 503"}

    def given_up() -> list[str]:
        return [i for i, row in sorted(_rows(db).items()) if row.next_attempt_at is None]

    deliverer._give_up(set_aside)
    assert given_up() == []  # the one URL read was the other host's, due first
    with db.transaction() as s:
        s.get_one(WebhookDelivery, ids[0]).delivered_at = shared_now()  # sent meanwhile
    deliverer._give_up(set_aside)
    assert given_up() == [ids[1]]
    deliverer._give_up(set_aside)
    assert given_up() == ids[1:]


def test_the_give_up_reaches_missed_urls_behind_more_than_a_pass_of_a_live_destination_s(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_the_give_up_reaches_missed_urls_behind_a_live_backlog(db, monkeypatch)


def check_the_give_up_reaches_missed_urls_behind_a_live_backlog(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each pass read the first MISSED_URLS URLs past their schedule, soonest due first: a live
    # destination's backlog of more (distinct URLs, a job's token each, sent slower than they come
    # due) filled every pass, and a set-aside host's rows its SQL misses were never reached.
    monkeypatch.setattr(webhooks, "MISSED_URLS", 2)
    backlog = [(f"http://alive.example/h?job={n}", 1) for n in range(5)]
    ids = _deliveries(db, [*backlog, ("http://hooks\u3002example/h", 1), ("http://alive.example/h?job=5", 1)])
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = shared_now() - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    set_aside = {webhooks.destination("http://hooks.example/"): "answered 503"}
    for _ in range(3):  # 7 URLs, 2 a pass: the missed one read by the third
        deliverer._give_up(set_aside)
    rows = _rows(db)
    assert [i for i in ids if rows[i].next_attempt_at is None] == [ids[5]]
    # Past the last URL, the next pass reads from the soonest again: one given up since the cursor
    # passed it (its destination set aside after) is reached in the next round.
    set_aside[webhooks.destination("http://alive.example/")] = "ConnectError"
    with db.transaction() as s:
        s.add(WebhookDelivery(id="whd_late", job_id="job_1", url="http://alive.example:/h", event="job.failed",
                              next_attempt_at=shared_now() - timedelta(hours=2),
                              created_at=shared_now() - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)))
    for _ in range(2):
        deliverer._give_up(set_aside)
    assert all(row.next_attempt_at is None for row in _rows(db).values())


def test_a_missed_url_that_passes_its_schedule_behind_the_cursor_is_reached_within_the_round(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_a_missed_url_that_passes_its_schedule_behind_the_cursor_is_reached(db, monkeypatch)


def check_a_missed_url_that_passes_its_schedule_behind_the_cursor_is_reached(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # A row passes its schedule by its age, its next_attempt_at left where it was made (a set-aside
    # host's rows wait unattempted): keyed by the soonest next_attempt_at, it fell behind a cursor
    # that a live backlog's retried rows had moved on, and waited for good while that backlog (more
    # than a pass, each pass's due after the last) kept the round from ending.
    monkeypatch.setattr(webhooks, "MISSED_URLS", 2)
    now = shared_now()
    made_long_ago = now - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    ids = _deliveries(db, [(f"http://alive.example/h?job={n}", 1) for n in range(4)])
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = made_long_ago
        missed_made = now - timedelta(seconds=webhooks.SCHEDULE_SECONDS - 30)  # within its schedule yet
        s.add(WebhookDelivery(id="whd_missed", job_id="job_1", url="http://hooks\u3002example/h", event="job.failed",
                              next_attempt_at=missed_made, created_at=missed_made))
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    set_aside = {webhooks.destination("http://hooks.example/"): "answered 503"}
    deliverer._give_up(set_aside)
    with db.transaction() as s:  # a minute on: past its schedule now
        s.get_one(WebhookDelivery, "whd_missed").created_at = missed_made - timedelta(seconds=60)
    for n in range(4):
        with db.transaction() as s:  # the live backlog goes on: two more URLs due each pass
            for k in range(2):
                s.add(WebhookDelivery(id=f"whd_more_{n}_{k}", job_id="job_1", url=f"http://alive.example/h?more={n}{k}",
                                      event="job.failed", created_at=made_long_ago,
                                      next_attempt_at=now - timedelta(seconds=20 - 2 * n - k)))
        deliverer._give_up(set_aside)
    rows = _rows(db)
    assert rows["whd_missed"].next_attempt_at is None
    assert all(rows[i].next_attempt_at is not None for i in ids)


def test_a_claim_given_back_behind_the_cursor_is_reached_within_the_round(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_a_claim_given_back_behind_the_cursor_is_reached(db, monkeypatch)


def check_a_claim_given_back_behind_the_cursor_is_reached(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # A row claimed (its next_attempt_at moved past now) is out of the give-up's read while the
    # cursor moves on; given back at a stop with the next_attempt_at it had, it came past before the
    # cursor, and waited for good while a live backlog (more than a pass, each pass's due after the
    # last) kept the round from ending.
    monkeypatch.setattr(webhooks, "MISSED_URLS", 2)
    now = shared_now()
    made_long_ago = now - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    ids = _deliveries(db, [("http://hooks\u3002example/h", 1), *[(f"http://alive.example/h?job={n}", 1)
                                                                 for n in range(4)]])
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = made_long_ago
    stopping = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    [claimed] = stopping._claim_all(stopping._due(limit=1))
    assert claimed.id == ids[0]  # the soonest due, claimed by a process that then stops
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    set_aside = {webhooks.destination("http://hooks.example/"): "answered 503"}
    deliverer._give_up(set_aside)  # the backlog's first two URLs: the cursor past the claimed row
    stopping._release([claimed])
    for n in range(3):
        with db.transaction() as s:  # the live backlog goes on: two more URLs come due each pass
            for k in range(2):
                s.add(WebhookDelivery(id=f"whd_more_{n}_{k}", job_id="job_1", url=f"http://alive.example/h?more={n}{k}",
                                      event="job.failed", created_at=made_long_ago, next_attempt_at=shared_now()))
        deliverer._give_up(set_aside)
    rows = _rows(db)
    assert rows[ids[0]].next_attempt_at is None and rows[ids[0]].attempts == 0
    assert all(row.next_attempt_at is not None for i, row in rows.items() if i != ids[0])


@pytest.mark.parametrize("stored", ["http://[bad]:\u00b2/h", "http://\u00fc[@alive.example/h", "http://[@\u00fc%x@/h"])
def test_an_unparsed_destination_s_sql_filter_holds_back_and_gives_up_only_its_own_rows(
        db: Database, stored: str) -> None:
    check_an_unparsed_destination_s_sql_filter_is_its_own(db, stored)


def check_an_unparsed_destination_s_sql_filter_is_its_own(db: Database, stored: str) -> None:
    # A URL `urlsplit` refuses is a destination of its own, written as stored (`_unparsed`), and
    # full or set aside, its SQL filter (`_to`) is in every read of due rows and in the give-up. Read
    # as a parsed destination's, its spellings raised (a port `²` is `isdigit` but no `int`; a zone
    # its ASCII spelling lost), so no delivery of any project was read again; or its ASCII spelling
    # (httpx reads `ü[` as a user) was another receiver's, whose rows were held back and given up.
    with pytest.raises(ValueError):
        urlsplit(stored).hostname  # noqa: B018 -- read for its check
    alive = "http://alive.example/h"
    ids = _deliveries(db, [(stored, 1), (alive, 1)])
    where = webhooks.destination(stored)
    assert where != webhooks.destination(alive)
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02)
    assert [row.id for row in deliverer._due((), [where])] == [ids[1]]
    with db.transaction() as s:
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = shared_now() - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
    deliverer._give_up({where: "ConnectError"})
    rows = _rows(db)
    assert rows[ids[0]].next_attempt_at is None and "ConnectError" in (rows[ids[0]].last_error or "")
    assert rows[ids[1]].next_attempt_at is not None and rows[ids[1]].last_error is None


def test_many_distinct_urls_the_sql_filter_misses_are_read_past_in_few_reads(db: Database) -> None:
    check_many_distinct_urls_the_sql_filter_misses_are_read_past_in_few_reads(db)


def check_many_distinct_urls_the_sql_filter_misses_are_read_past_in_few_reads(db: Database) -> None:
    # `http://127.1:9000` is 127.0.0.1's destination, but no SQL prefix of it: a full or set-aside
    # 127.0.0.1's rows so spelt, each URL its own (a job's `?job=` token), were read past 20 a read,
    # each read again excluding every URL read so far: 2,000 rows 101 reads binding 100,000 values,
    # 8,000 rows 21 s a look and 40,000 rows 7 minutes, while no delivery of any project was sent.
    count = 2000
    ids = _deliveries(db, [*((f"http://127.1:9000/h?job={n}", 1) for n in range(count)), ("http://alive.example/h", 1)])
    with db.transaction() as s:  # due in that order, all of them now
        for n, row in enumerate(sorted(s.exec(select(WebhookDelivery)).all(), key=lambda row: row.id)):
            row.next_attempt_at = shared_now() - timedelta(hours=1) + timedelta(milliseconds=n)
    deliverer = webhooks.Deliverer(db, lambda job_id: {}, None, interval=0.1)
    reads: list[int] = []

    def counted(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            reads.append(len(parameters))

    sa_event.listen(db.engine, "before_cursor_execute", counted)
    try:
        due = deliverer._due((), [webhooks.destination("http://127.0.0.1:9000/")])
    finally:
        sa_event.remove(db.engine, "before_cursor_execute", counted)
    assert [row.id for row in due] == [ids[-1]]
    assert len(reads) <= 10 and sum(reads) < count, reads


def test_a_password_in_a_stored_url_urlsplit_refuses_is_masked_in_its_log_lines(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    # A URL `urlsplit` refuses is a destination of its own, written as stored (`_unparsed`): its
    # user and password with it, which every line naming it logged (set aside, back, given up) as
    # did each failed attempt's (its URL without the query). Stored before the checks refused both.
    caplog.set_level(logging.INFO, logger="orchestrator.webhooks")
    stored = "http://hooks:s3cret-pw@[::ffff:127.1]:8080/h?token=t"
    masked = "http://hooks:***@[::ffff:127.1]:8080"
    ids = _deliveries(db, [(stored, webhooks.FAILURES_TO_SET_ASIDE)])
    deliverer = webhooks.Deliverer(db, lambda job_id: {"id": job_id}, None, interval=0.02)
    where = webhooks.destination(stored)

    async def look() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200))) as client:
            await deliverer.deliver_due(client)

    while 0 in _attempts(db, ids):  # 2 at a time to one destination
        asyncio.run(look())
    assert deliverer.breakers.set_aside() == [where]
    with db.transaction() as s:  # past their schedule, due again: given up at the next look
        for row in s.exec(select(WebhookDelivery)).all():
            row.created_at = shared_now() - timedelta(seconds=webhooks.SCHEDULE_SECONDS + 60)
            row.next_attempt_at = shared_now() - timedelta(seconds=1)
    asyncio.run(look())
    assert all(row.next_attempt_at is None for row in _rows(db).values())
    deliverer.breakers.ended(where, "whd_x", "refused", "answered 401")
    told = [r.getMessage() for r in caplog.records]
    assert not [m for m in told if "s3cret-pw" in m], told
    named = [m for m in told if masked in m]
    said = ("attempt 1 failed", "set aside after", "given up", "is back")
    assert [len([m for m in named if line in m]) for line in said] == [len(ids), 1, 1, 1], told
    assert not [row.last_error for row in _rows(db).values() if "s3cret-pw" in (row.last_error or "")]
    # Its user part ends at the last `@` before the path, as `urlsplit` reads it; a URL without a
    # password is shown as written.
    assert webhooks.shown("http://u:p@ss@[::1/h?a@b") == "http://u:***@[::1/h?a@b"
    for plain in ("http://\u00fc[@alive.example", "http://alive.example:80/a:b@c", "http://[bad]:\u00b2"):
        assert webhooks.shown(plain) == plain
