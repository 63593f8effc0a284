"""The job event stream (SSE): order, ids, one terminal event, late clients."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator import follow
from orchestrator.app import create_app
from orchestrator.events import HISTORY_TTL, EventBus, job_mark, split_id, woken
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.api import (
    SLOW,
    SSE,
    TERMINAL,
    assert_error,
    create_project,
    iter_sse,
    read_events,
    run_draft,
    submit_draft,
    wait_for_job,
)


def count(event_id: str | None) -> int:
    """An event id's place in its process's count (`<process tag>-<n>`)."""
    ref = split_id(event_id)
    assert ref.tag and ref.number.isdigit(), event_id
    return int(ref.number)


def assert_ids_increase(events: list[SSE]) -> None:
    assert all(e.id is not None for e in events), "every event carries an id"
    assert len({(e.id or "").partition("-")[0] for e in events}) == 1, "one process tags them all"
    ids = [count(e.id) for e in events]
    assert ids == sorted(set(ids)), f"ids must strictly increase: {ids}"


def test_live_stream_order(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    # A slow job holds the local lane (limit 1), so the watched job is still queued when the
    # stream opens and every one of its events is seen live.
    blocker = submit_draft(server, project, **SLOW)
    wait_for_job(server, blocker["id"], ("running",))
    job = submit_draft(server, project, n=3, steps=3, seed=7)
    assert server.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"

    events: list[SSE] = []
    with server.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = iter_sse(response)
        events.append(next(stream))
        assert events[0].event == "queued"
        assert server.post(f"/v1/jobs/{blocker['id']}/cancel").status_code == 202
        events.extend(stream)  # ends only when the server closes the stream

    assert_ids_increase(events)
    kinds = [e.event for e in events]
    assert kinds[:2] == ["queued", "started"]
    assert events[1].data["engine"] == "lite"
    progress = [e.data for e in events if e.event == "progress"]
    first_asset = kinds.index("asset")
    assert kinds[2:first_asset] == ["progress"] * len(progress)
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert all(p["total"] == 3 for p in progress)
    assert [p["fraction"] for p in progress] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    for p in progress:
        assert p["preview_url"].startswith(f"/v1/jobs/{job['id']}/preview")
    assert kinds[first_asset:] == ["asset", "asset", "asset", "succeeded"]
    assets = [e.data for e in events if e.event == "asset"]
    assert [a["index"] for a in assets] == [0, 1, 2]

    done = wait_for_job(server, job["id"], ("succeeded",))
    assert [a["asset_id"] for a in assets] == done["assets"]
    assert events[-1].data["status"] == "succeeded"
    assert events[-1].data["assets"] == done["assets"]


def test_late_client_gets_the_state_and_the_stream_closes(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    job = run_draft(server, project, n=2, steps=2)
    # The row says succeeded a moment before the runner has told its stream so (it tells it once
    # the commit is back on the loop): a client in between gets the last step and then the end
    # live. Once one stream has read to the end, the end is told, and a client after it is late.
    assert read_events(server, job["id"], timeout=10)[-1].event == "succeeded"

    events = read_events(server, job["id"], timeout=10)
    assert_ids_increase(events)
    assert [e.event for e in events] == ["queued", "started", "asset", "asset", "succeeded"]
    assert [e.data["asset_id"] for e in events if e.event == "asset"] == job["assets"]
    assert [e.data["index"] for e in events if e.event == "asset"] == [0, 1]

    # A second late client gets the same story with the same ids.
    again = read_events(server, job["id"], timeout=10)
    assert [(e.id, e.event) for e in again] == [(e.id, e.event) for e in events]


def test_a_stream_opens_with_the_reconnect_delay(server: httpx.Client) -> None:
    # Browsers' EventSource reconnects after its own default delay unless the stream names one.
    job = run_draft(server, create_project(server)["id"])
    with server.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=10) as response:
        lines = list(response.iter_lines())
    assert lines[:2] == ["retry: 2000", ""]
    assert lines[2].startswith("id: ")
    assert lines.count("retry: 2000") == 1


def test_events_of_unknown_job(server: httpx.Client) -> None:
    response = server.get("/v1/jobs/job_00000000000000000000000000/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_publish_from_another_thread_reaches_a_waiting_subscriber() -> None:
    """The sync API handlers (submit, cancel) publish from the thread pool. asyncio objects are not
    thread-safe: a publish that touched the subscriber's queue directly would never wake the loop
    (in debug mode asyncio refuses such a call outright). The loop runs in its own thread, so a
    lost wake-up fails this test instead of hanging it."""
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    bus = EventBus()
    received: list[str] = []
    waiting, finished = threading.Event(), threading.Event()

    async def consume() -> None:
        bus.bind(asyncio.get_running_loop())
        bus.publish("job_x", "queued", {})
        async for event in bus.subscribe("job_x"):
            received.append(event.type)
            waiting.set()
        finished.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(consume(),), daemon=True)
    thread.start()
    assert waiting.wait(10)
    bus.publish("job_x", "canceled", {"status": "canceled"})  # from this thread, not the loop's
    assert finished.wait(10), f"the subscriber never received the event (got {received})"
    assert received == ["queued", "canceled"]
    thread.join(10)
    loop.close()


def test_quiet_stream_gets_keepalive_comments_and_still_ends(server: httpx.Client,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orchestrator.api.jobs.KEEPALIVE_SECONDS", 0.02)
    project = create_project(server)["id"]
    blocker = submit_draft(server, project, **SLOW)
    wait_for_job(server, blocker["id"], ("running",))
    job = submit_draft(server, project, n=1, steps=2, seed=3)
    lines: list[str] = []
    with server.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as response:
        for line in response.iter_lines():
            lines.append(line)
            if line == ": keep-alive" and server.get(f"/v1/jobs/{blocker['id']}").json()["status"] == "running":
                server.post(f"/v1/jobs/{blocker['id']}/cancel")
    assert ": keep-alive" in lines  # the job waited quietly behind the blocker
    assert "event: succeeded" in lines  # keep-alives do not break the stream


def test_reconnect_resumes_after_last_event_id(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    blocker = submit_draft(server, project, **SLOW)
    wait_for_job(server, blocker["id"], ("running",))
    job = submit_draft(server, project, n=1, steps=2)
    url = f"/v1/jobs/{job['id']}/events"
    with server.stream("GET", url, timeout=60) as response:
        first = next(iter_sse(response))  # then the connection drops
    assert first.event == "queued" and first.id is not None

    with server.stream("GET", url, headers={"Last-Event-ID": first.id}, timeout=60) as response:
        stream = iter_sse(response)
        assert server.post(f"/v1/jobs/{blocker['id']}/cancel").status_code == 202
        rest = list(stream)
    kinds = [e.event for e in rest]
    assert kinds[0] == "started" and kinds[-2:] == ["asset", "succeeded"]  # nothing seen twice
    assert all(count(e.id) > count(first.id) for e in rest)

    # A browser's EventSource reconnects when the stream closes: 204 tells it the story is over.
    after_end = server.get(url, headers={"Last-Event-ID": rest[-1].id or ""})
    assert after_end.status_code == 204 and after_end.content == b""
    # Resuming a finished job from its 'started' event: the rest of its kept story (a finished
    # job keeps no progress events).
    resumed = read_events_after(server, job["id"], rest[0].id)
    assert [(e.id, e.event) for e in resumed] == [(e.id, e.event) for e in rest[1:] if e.event != "progress"]
    # EventSource polyfills that cannot send the header send it as `lastEventId`: told the whole
    # story again at each reconnect, they never stopped.
    assert server.get(url, params={"lastEventId": rest[-1].id or ""}).status_code == 204
    with server.stream("GET", url, params={"lastEventId": rest[0].id or ""}, timeout=60) as response:
        assert [(e.id, e.event) for e in iter_sse(response)] == [(e.id, e.event) for e in resumed]
    # The header, when both are given (a browser's own reconnect keeps the URL it was given).
    assert server.get(url, params={"lastEventId": rest[0].id or ""},
                      headers={"Last-Event-ID": rest[-1].id or ""}).status_code == 204


def read_events_after(client: httpx.Client, job_id: str, last_event_id: str | None) -> list[SSE]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_event_id or ""},
                       timeout=10) as response:
        assert response.status_code == 200
        return list(iter_sse(response))


@pytest.mark.parametrize("last_event_id", ["3", "not-a-number", "-1", "12.5", "9" * 5000, "0badc0de-1"])
def test_foreign_last_event_id_replays_the_whole_state(server: httpx.Client, last_event_id: str) -> None:
    # Ids from another process (before a restart) or garbage must never hide an event.
    project = create_project(server)["id"]
    job = run_draft(server, project, n=1, steps=1)
    # The row says `succeeded` just before the stream is told the end: a read in between is told
    # the job's latest progress too, which a finished job's kept story drops (a CI run under load
    # compared the two). Read to its end once, the kept story is what both reads below get.
    read_events(server, job["id"], timeout=10)
    full = read_events(server, job["id"], timeout=10)
    assert [(e.id, e.event) for e in read_events_after(server, job["id"], last_event_id)] == \
        [(e.id, e.event) for e in full]


def test_a_client_with_another_server_s_terminal_event_gets_204(server: httpx.Client) -> None:
    # Behind a round-robin load balancer a browser's reconnect lands on another server: it must
    # not be told the end of the story twice, nor have an unfinished story cut short.
    project = create_project(server)["id"]
    job = run_draft(server, project, n=1, steps=1)
    url = f"/v1/jobs/{job['id']}/events"
    [end] = [e for e in read_events(server, job["id"], timeout=10) if e.event in TERMINAL]
    assert end.id is not None and end.id.endswith(f"-end.{job_mark(job['id'])}")
    assert server.get(url, headers={"Last-Event-ID": f"0badc0de-7-end.{job_mark(job['id'])}"}).status_code == 204
    # Not the end of this job: another's (a client reusing its header), a mark dropped, made up:
    # everything again, never a 204 that leaves the client without this job's end.
    for other in ("0badc0de-7", f"0badc0de-7-end.{job_mark('job_other')}", "0badc0de-7-end", "bogus-end"):
        replayed = read_events_after(server, job["id"], other)
        assert (replayed[0].event, replayed[-1].event) == ("queued", "succeeded"), other
    assert server.get(url, headers={"Last-Event-ID": end.id}).status_code == 204


def test_another_server_s_terminal_event_gets_204_before_this_one_has_heard(
        make_settings: Callable[..., Settings]) -> None:
    # A worker ended the job and told its client; the client reconnects to an API server whose
    # stream of the job has not heard yet (a lost bell: up to ORCH_POLL_INTERVAL): it was told the
    # whole story again, a second terminal event.
    settings = make_settings(run_jobs=False, poll_interval=60)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        job = submit_draft(client, create_project(client)["id"])  # queued: this server knows it
        with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:  # ...and the worker ends it
            db.execute("UPDATE jobs SET status = 'succeeded', finished_at = CURRENT_TIMESTAMP WHERE id = ?",
                       (job["id"],))
        url = f"/v1/jobs/{job['id']}/events"
        assert client.get(url, headers={"Last-Event-ID": f"0badc0de-9-end.{job_mark(job['id'])}"}).status_code == 204
        # Another job's end, from that process: this job's story is still to be told.
        other = client.head(url, headers={"Last-Event-ID": f"0badc0de-9-end.{job_mark('job_other')}"})
        assert other.status_code == 200


def test_a_job_another_server_queued_and_this_one_canceled_is_told_whole_here(
        make_settings: Callable[..., Settings]) -> None:
    """The cancel published its end on a bus that had never seen the job: that one event became the
    job's stream here, and a client asking this server later got `canceled` alone, not `queued`."""
    settings = make_settings(run_jobs=False, poll_interval=60)
    with serve_in_thread(settings) as first, httpx.Client(base_url=first, timeout=30) as queuing:
        job = submit_draft(queuing, create_project(queuing)["id"])
        with serve_in_thread(settings) as other, httpx.Client(base_url=other, timeout=30) as client:
            assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
            events = read_events(client, job["id"])
    assert [e.event for e in events] == ["queued", "canceled"]


def test_another_job_s_terminal_event_id_does_not_end_this_stream(server: httpx.Client) -> None:
    # A client reusing its Last-Event-ID header for another job of this server must still be told
    # that job's end, not a 204 that leaves it without one.
    project = create_project(server)["id"]
    first, second = (run_draft(server, project, n=1, steps=1, seed=seed) for seed in (1, 2))
    [first_end] = [e for e in read_events(server, first["id"], timeout=10) if e.event in TERMINAL]
    assert first_end.id is not None
    replayed = read_events_after(server, second["id"], first_end.id)
    assert replayed[-1].event == "succeeded" and replayed[-1].data["job_id"] == second["id"]
    # The other way round: a later job's id counts past everything the earlier job said, and
    # once gave an empty stream that a browser reconnects to forever.
    [second_end] = [e for e in read_events(server, second["id"], timeout=10) if e.event in TERMINAL]
    assert second_end.id is not None
    for foreign in (second_end.id, second_end.id.partition("-end")[0]):
        replayed = read_events_after(server, first["id"], foreign)
        assert (replayed[0].event, replayed[-1].event) == ("queued", "succeeded"), foreign
        assert replayed[-1].data["job_id"] == first["id"]
    # This job's own terminal id with its mark dropped still says the client has the end.
    [own_end] = [e for e in read_events(server, first["id"], timeout=10) if e.event in TERMINAL]
    assert own_end.id is not None
    response = server.get(f"/v1/jobs/{first['id']}/events", headers={"Last-Event-ID": own_end.id.partition("-end")[0]})
    assert response.status_code == 204


def test_only_the_process_that_sent_an_id_resumes_after_it() -> None:
    # Two API servers behind one load balancer (or a restart): their counts overlap, so a client
    # moving to the other one must be told the whole state, never resume after a number that
    # means another event there.
    first, second = EventBus(), EventBus()
    for bus in (first, second):
        bus.publish("job_x", "queued", {})
        bus.publish("job_x", "started", {})
    sent = first._jobs["job_x"].history[-1].sse().split("\n")[0].removeprefix("id: ")
    assert first.resume_after(sent) == 2
    assert second.resume_after(sent) == 0
    assert first.resume_after(f"{first.tag}-3") == 0  # not sent yet: not a place to resume from


def sent_id(bus: EventBus, job_id: str, index: int) -> str:
    return bus._jobs[job_id].history[index].sse().split("\n")[0].removeprefix("id: ")


def test_another_job_s_id_of_this_process_resumes_nothing() -> None:
    # Two jobs interleave on one count: job_a's `started` (3) is past job_b's `queued` (2), and
    # resuming job_b after it dropped that event.
    bus = EventBus()
    for job_id, type_ in (("job_a", "queued"), ("job_b", "queued"), ("job_a", "started"), ("job_b", "started")):
        bus.publish(job_id, type_, {})
    assert bus.resume_after(sent_id(bus, "job_a", 1), "job_b") == 0
    assert bus.resume_after(sent_id(bus, "job_b", 0), "job_b") == 2  # its own: resumed after it
    assert bus.resume_after(sent_id(bus, "job_b", 0).partition(".")[0], "job_b") == 2  # a mark dropped


def test_a_job_s_end_is_told_once_after_its_stream_is_rebuilt() -> None:
    # Dropped after HISTORY_TTL and rebuilt from the row with new numbers: the client holding the
    # old terminal id got the whole story again, a second `succeeded`, instead of a 204.
    bus = EventBus()
    bus.publish("job_x", "queued", {})
    bus.publish("job_x", "succeeded", {})
    end = sent_id(bus, "job_x", -1)
    del bus._jobs["job_x"]
    bus.publish("job_y", "queued", {})
    bus.publish("job_x", "queued", {})  # what catch_up tells from the row
    bus.publish("job_x", "succeeded", {})
    assert bus.ended_before("job_x", end)
    assert not bus.ended_before("job_y", end) and not bus.ended_before("job_x", sent_id(bus, "job_x", 0))


def test_subscribing_to_an_expired_history_ends_at_once() -> None:
    # A history dropped between the handler's check and the subscription once left the client
    # with keep-alives forever, and the empty stream it created was never dropped.
    bus = EventBus()
    bus.publish("job_x", "succeeded", {"status": "succeeded"})
    del bus._jobs["job_x"]  # what eviction does after HISTORY_TTL

    async def collect() -> list[str]:
        return [event.type async for event in bus.subscribe("job_x")]

    assert asyncio.run(asyncio.wait_for(collect(), timeout=5)) == []
    assert not bus.knows("job_x")


def test_a_history_a_stream_relies_on_is_kept_until_it_subscribes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A finished job's history, nearly expired: the handler finds it known, so it does not rebuild
    # it from the row; another job's event before the subscription must not drop it.
    clock = [1000.0]
    monkeypatch.setattr("orchestrator.events.time.monotonic", lambda: clock[0])
    bus = EventBus()
    bus.publish("job_x", "succeeded", {"status": "succeeded"})
    clock[0] += HISTORY_TTL - 1
    assert bus.keep("job_x")
    clock[0] += 2  # past its first TTL, and time for another eviction
    bus.publish("job_y", "queued", {})

    async def collect() -> list[str]:
        return [event.type async for event in bus.subscribe("job_x")]

    assert asyncio.run(asyncio.wait_for(collect(), timeout=5)) == ["succeeded"]
    assert not bus.keep("job_nope")


def test_a_client_leaving_a_live_stream_logs_no_error(server: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    # Each disconnect once logged 'aclose(): asynchronous generator is already running'.
    project = create_project(server)["id"]
    job = submit_draft(server, project, **SLOW)
    wait_for_job(server, job["id"], ("running",))
    for _ in range(3):
        with server.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as response:
            for event in iter_sse(response):
                if event.event == "progress":
                    break  # leave mid-stream: the connection closes
    assert server.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    wait_for_job(server, job["id"])
    time.sleep(0.5)  # the server notices the closed connections when it next writes to them
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_a_slow_reader_gets_the_latest_step_not_a_backlog_of_every_step() -> None:
    # A stalled client's events waited in full: every step of every job it watched, growing for as
    # long as the job ran. Progress not yet sent is replaced by the next; nothing else is dropped.
    async def main() -> list[tuple[str, dict[str, object]]]:
        bus = EventBus()
        bus.bind(asyncio.get_running_loop())
        bus.publish("job_s", "queued", {})
        events = aiter(bus.subscribe("job_s"))
        assert (await anext(events)).type == "queued"  # subscribed; then the reader stalls
        bus.publish("job_s", "started", {})
        for position in range(500, 0, -1):  # a provider's queue, told at each poll
            bus.publish("job_s", "state", {"state": "queued", "position": position})
        for step in range(1, 1001):
            bus.publish("job_s", "progress", {"step": step, "total": 1000})
            if step == 500:
                bus.publish("job_s", "asset", {"asset_id": "ast_a", "index": 0})
        bus.publish("job_s", "succeeded", {})
        [inbox] = bus._jobs["job_s"].subscribers
        assert len(inbox) == 6
        return [(event.type, event.data) async for event in events]

    assert asyncio.run(main()) == [("started", {}), ("state", {"state": "queued", "position": 1}),
                                   ("progress", {"step": 500, "total": 1000}),
                                   ("asset", {"asset_id": "ast_a", "index": 0}),
                                   ("progress", {"step": 1000, "total": 1000}), ("succeeded", {})]


def test_the_terminal_event_s_number_without_its_end_mark_is_the_end() -> None:
    # A proxy or client rewriting the id without "-end" got an empty 200, and an EventSource
    # reconnected for ever.
    bus = EventBus()
    bus.publish("job_x", "queued", {})
    bus.publish("job_x", "succeeded", {})
    body, _, mark = sent_id(bus, "job_x", -1).partition(".")
    assert bus.ended_before("job_x", f"{body.removesuffix('-end')}.{mark}")
    assert not bus.ended_before("job_x", f"{body.removesuffix('-end')}.{job_mark('job_y')}")
    assert not bus.ended_before("job_x", sent_id(bus, "job_x", 0))


def test_a_late_client_of_a_job_run_elsewhere_gets_its_state_now_not_when_last_watched(
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """Once its last watcher left, this server stopped following the job but kept its stream: a
    client connecting after the worker finished it was sent the progress of back then (its
    preview gone) before the follower caught up."""
    # Short, not none: a stream is followed (`follow`) a moment before its client is counted watching.
    monkeypatch.setattr(follow, "SUBSCRIBE_GRACE_SECONDS", 0.5)
    followers: list[follow.JobFollower] = []
    init = follow.JobFollower.__init__

    def kept(self: follow.JobFollower, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        followers.append(self)

    monkeypatch.setattr(follow.JobFollower, "__init__", kept)
    settings = make_settings(run_jobs=False, poll_interval=0.1)
    database = settings.data_dir / "orchestrator.db"
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        job = submit_draft(client, create_project(client)["id"])
        url = f"/v1/jobs/{job['id']}/events"
        with client.stream("GET", url) as stream:  # a watcher sees it at step 2 of 4
            events = iter_sse(stream)
            assert next(events).event == "queued"
            with sqlite3.connect(database) as db:  # as a worker running it writes
                db.execute("UPDATE jobs SET status = 'running', attempt = 1, started_at = CURRENT_TIMESTAMP, "
                           "progress_step = 2, progress_total = 4 WHERE id = ?", (job["id"],))
            assert [next(events).event, next(events).event] == ["started", "progress"]
        deadline = time.monotonic() + 30
        while not followers[-1].lapsed(job["id"]):  # unwatched: no longer followed
            assert time.monotonic() < deadline, "the follower kept following an unwatched job"
            time.sleep(0.02)
        with sqlite3.connect(database) as db:  # ...and the worker ends it
            db.execute("UPDATE jobs SET status = 'failed', finished_at = CURRENT_TIMESTAMP, "
                       "error = '{\"code\": \"engine_error\", \"message\": \"x\", \"details\": {}}' WHERE id = ?",
                       (job["id"],))
        late = read_events(client, job["id"])
        # Caught up to its end: not read again from its row by each later stream.
        assert not followers[-1].lapsed(job["id"])
    assert [e.event for e in late] == ["queued", "started", "failed"], late


def test_a_job_run_elsewhere_that_goes_back_to_the_queue_is_told_queued_again(
        make_settings: Callable[..., Settings]) -> None:
    """Its worker killed (or stopped), the job went back to the queue and its stream here went on
    showing its last step, a late client's too, while `GET /v1/jobs/{id}` said queued."""
    settings = make_settings(run_jobs=False, poll_interval=0.1)
    database = settings.data_dir / "orchestrator.db"

    def row(values: str, job_id: str) -> None:  # as the worker, and then the recovery, write it
        with sqlite3.connect(database) as db:
            db.execute(f"UPDATE jobs SET {values} WHERE id = ?", (job_id,))

    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        job = submit_draft(client, create_project(client)["id"])
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            events = iter_sse(stream)
            assert next(events).event == "queued"
            row("status = 'running', attempt = 1, started_at = CURRENT_TIMESTAMP, progress_step = 2, "
                "progress_total = 4", job["id"])
            assert [next(events).event, next(events).event] == ["started", "progress"]
            row("status = 'queued', lease_owner = NULL, progress_step = 0, progress_total = 0", job["id"])
            again = next(events)
            assert (again.event, again.data) == ("queued", {"job_id": job["id"], "status": "queued", "attempt": 1,
                                                            "requeued": True})
            late = read_events_until(client, job["id"], "queued", count=2)
            assert [e.event for e in late] == ["queued", "started", "progress", "queued"]
            row("status = 'running', attempt = 2, progress_step = 1, progress_total = 4", job["id"])
            started = next(events)
            assert (started.event, started.data["attempt"]) == ("started", 2)
            row("status = 'failed', finished_at = CURRENT_TIMESTAMP, error = '{\"code\": \"engine_error\", "
                "\"message\": \"x\", \"details\": {}}'", job["id"])
            assert [e.event for e in events] == ["progress", "failed"]


def read_events_until(client: httpx.Client, job_id: str, event: str, count: int) -> list[SSE]:
    """A job's stream read until its `count`th `event` (the stream of an unfinished job goes on)."""
    seen: list[SSE] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as response:
        for sse in iter_sse(response):
            seen.append(sse)
            if sum(e.event == event for e in seen) == count:
                return seen
    raise AssertionError(f"the stream ended before its {count}th {event}: {seen}")


def test_two_moves_in_a_row_are_both_told_a_poll_s_state_told_again_only_once() -> None:
    # A job moved off one engine, then (claimed only to move it) off the next one's open circuit:
    # the first fallback was taken for the same state told again and dropped from the story.
    bus = EventBus()
    bus.publish("job_x", "queued", {})
    bus.publish("job_x", "started", {"attempt": 1})
    bus.publish("job_x", "state", {"state": "fallback", "from": "fake-paid", "to": "fake-b"})
    bus.publish("job_x", "state", {"state": "fallback", "from": "fake-b", "to": "local-hifi"})
    bus.publish("job_x", "state", {"state": "queued", "position": 3})  # a provider's queue, at each poll
    bus.publish("job_x", "state", {"state": "queued", "position": 2})

    async def late_client() -> list[tuple[str, Any]]:
        told = []
        async for event in bus.subscribe("job_x"):
            told.append((event.type, event.data.get("to", event.data.get("position"))))
            if len(told) == 5:
                break
        return told

    assert asyncio.run(asyncio.wait_for(late_client(), timeout=5)) == [
        ("queued", None), ("started", None), ("state", "fake-b"), ("state", "local-hifi"), ("state", 2)]


def test_the_same_state_of_another_provider_request_is_told_not_taken_for_a_repeat() -> None:
    # Stability polls each creative upscale of an n=2 job in turn: the second image's "polling"
    # replaced the first's in the job's story.
    bus = EventBus()
    bus.publish("job_y", "queued", {})
    bus.publish("job_y", "started", {"attempt": 1})
    bus.publish("job_y", "state", {"state": "polling", "provider_id": "gen-1"})
    bus.publish("job_y", "state", {"state": "polling", "provider_id": "gen-2"})
    bus.publish("job_y", "state", {"state": "queued", "prompt_id": "p-1", "position": 2})
    bus.publish("job_y", "state", {"state": "queued", "prompt_id": "p-1", "position": 1})

    async def late_client() -> list[Any]:
        told = []
        async for event in bus.subscribe("job_y"):
            told.append(event.data.get("provider_id", event.data.get("position")))
            if len(told) == 5:
                break
        return told

    assert asyncio.run(asyncio.wait_for(late_client(), timeout=5)) == [None, None, "gen-1", "gen-2", 1]


def test_a_stream_asked_of_a_stopping_server_is_a_503_not_an_empty_end(make_settings: Callable[..., Settings]) -> None:
    # Its streams ended, the bus closed: a stream asked for then was an empty 200, which a client
    # reads as the job's end without a terminal event.
    app = create_app(make_settings(run_jobs=False))
    with TestClient(app) as client:
        project = client.post("/v1/projects", json={"name": "stopping"}).json()["id"]
        job = client.post(f"/v1/projects/{project}/drafts", json={"prompt": "a lighthouse", "width": 64,
                                                                   "height": 64}).json()
        app.state.services.bus.closed = True
        try:
            error = assert_error(client.get(f"/v1/jobs/{job['id']}/events"), 503, "server_stopping")
        finally:
            app.state.services.bus.closed = False  # the app's own stop closes it again
        assert error["details"] == {"job_id": job["id"]}


async def test_a_cancel_that_comes_as_the_wake_is_set_is_not_lost() -> None:
    """On Python 3.11 `asyncio.wait_for` returned instead: a worker's cancel watch, woken by a bell
    as its stop cancelled it, looped on, and the stop waited for it for ever."""
    wake = asyncio.Event()
    waiting = asyncio.create_task(woken(wake, 60))
    await asyncio.sleep(0)
    wake.set()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    wake.clear()
    started = asyncio.get_running_loop().time()
    await woken(wake, 0.05)  # the time passing wakes it too, without an error
    assert asyncio.get_running_loop().time() - started >= 0.05
