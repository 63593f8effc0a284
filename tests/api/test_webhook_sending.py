"""Webhook sends at once: bounded by ORCH_WEBHOOK_CONCURRENCY, at most 2 to one destination, so a
receiver that does not answer holds back its own deliveries, not every project's."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlmodel import select

from orchestrator import webhooks
from orchestrator.clock import shared_now
from orchestrator.db import Database
from orchestrator.models import Job, Project, WebhookDelivery
from orchestrator.settings import Settings

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
    """A receiver on 127.0.0.1 that records each POST's `webhook-id` as it arrives and answers 200
    only once `release()`d (at once with `held=False`)."""

    def __init__(self, meter: Meter, *, held: bool = True) -> None:
        self.arrived: list[str] = []
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
                    self.send_response(200)
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


def test_a_claim_given_back_is_due_as_it_was_unless_claimed_since(db: Database) -> None:
    check_a_claim_given_back_is_due_as_it_was(db)


def check_a_claim_given_back_is_due_as_it_was(db: Database) -> None:
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
    assert rows["whd_000"].next_attempt_at == read["whd_000"] and rows["whd_000"].attempts == 0
    assert rows["whd_001"].next_attempt_at == expired.leased_until
    assert [row.id for row in first._due()] == ["whd_000"]
