"""A stop (SIGTERM, a rolling restart) and a paid request already out to a provider whose work a
restart cannot follow: the answer is waited for, up to ORCH_STOP_GRACE, so the image is kept and
charged, not failed `interrupted` with its estimate captured for reconciliation. Whatever else
runs stops at once: a job still preparing its request must not send it during that wait."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from orchestrator.workers import device_holders
from tests import fakes
from tests.credits import PRICE, held_saves, ledger, poll, project_with_draft, promote_ok, wait_for_job


def test_a_stop_waits_for_a_sent_paid_request_and_stops_the_rest(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = paid_settings_for(tmp_path / "data", stop_grace=60)
    until = tmp_path / "draft-encoded"
    service = serve_in_thread(settings)
    with httpx.Client(base_url=service.__enter__(), timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        sent = promote_ok(client, asset_id, tags={"fake": "slow", "seconds": "8"})
        preparing = promote_ok(client, asset_id, seed=8, tags={"fake": "wait-before-send", "until": str(until),
                                                               "then": "slow", "seconds": "6"})
        poll(lambda: _row(settings, sent["id"]), lambda row: row[0] == "running" and row[2] is not None,
             what="the request out")  # its id saved: sent, and answering in 8 s
        poll(lambda: _row(settings, preparing["id"])[0], lambda status: status == "running")
    caplog.set_level(logging.INFO, logger="orchestrator.queue")
    stopper = threading.Thread(target=service.__exit__, args=(None, None, None))
    stopper.start()
    poll(lambda: caplog.text, lambda text: "waiting up to 60 s for 1 paid requests already sent" in text,
         what="the stop to wait for the sent request")
    until.write_text("")  # the other job's request is ready now: it must not go out during the wait
    stopper.join(90)
    assert not stopper.is_alive()
    assert _row(settings, sent["id"])[0] == "succeeded"  # answered during the stop: stored and charged
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        jobs = {job["id"]: wait_for_job(client, job["id"]) for job in (sent, preparing)}
        entries = ledger(client, project_id)
    for job_id, job in jobs.items():
        assert job["status"] == "succeeded", job  # the second ran again after the restart, sent once
        assert [(e["kind"], e["amount"], e["unreconciled"]) for e in entries if e["job_id"] == job_id] == [
            ("hold", PRICE, False), ("capture", PRICE, False)]


@pytest.mark.parametrize(("answer_after", "retry_after"), [(0.0, 30.0), (1.5, 0.0)],
                         ids=["refused-before-the-stop", "refused-during-its-wait"])
def test_a_stop_does_not_wait_for_a_request_answered_that_nothing_was_made(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        answer_after: float, retry_after: float) -> None:
    """A 429 being waited out (nothing made) when the stop came, or coming during its wait: the
    stop waited for the job all the same, its retry went out during the wait, and the end of the
    wait abandoned it unanswered: failed `interrupted`, its estimate captured, a render made for
    nobody. Nothing of it is out: it is queued again at once, as a job that sent nothing is."""
    settings = paid_settings_for(tmp_path / "data", stop_grace=6)
    prompt = f"a lighthouse, refused after {answer_after} s, retried after {retry_after} s"
    service = serve_in_thread(settings)
    with httpx.Client(base_url=service.__enter__(), timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        refused = promote_ok(client, asset_id, prompt=prompt,
                             tags={"fake": "rate-limited", "answer_after": str(answer_after),
                                   "retry_after": str(retry_after), "then": "slow", "seconds": "30"})
        poll(lambda: list(fakes.SENT), lambda sent: f"{prompt} (refused)" in sent, what="the first request")
    caplog.set_level(logging.INFO, logger="orchestrator.queue")
    started = time.monotonic()
    service.__exit__(None, None, None)
    assert time.monotonic() - started < 6  # not the grace: nothing of it is out once refused
    # Waited for only while its first request was out.
    assert ("waiting up to 6 s for 1 paid requests" in caplog.text) == (answer_after > 0)
    assert prompt not in fakes.SENT  # its retry did not go out during the stop
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        status, attempts = db.execute("SELECT status, attempts FROM jobs WHERE id = ?", (refused["id"],)).fetchone()
    assert status == "queued", json.loads(attempts)
    assert [(a["status"], a["error"]["details"]["graceful"]) for a in json.loads(attempts)] == [("interrupted", True)]
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        entries = [(e["kind"], e["amount"]) for e in ledger(client, project_id) if e["job_id"] == refused["id"]]
        client.post(f"/v1/jobs/{refused['id']}/cancel")
    assert entries[:1] == [("hold", PRICE)] and ("capture", PRICE) not in entries


def test_a_stop_waiting_for_a_paid_request_lets_another_process_have_the_device(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The device lock was kept through the whole grace: in a rolling restart, the drafts the
    # stopping worker queued again waited up to ORCH_STOP_GRACE for nobody's paid request.
    settings = paid_settings_for(tmp_path / "data", stop_grace=60)
    locks = settings.data_dir / "locks"
    service = serve_in_thread(settings)
    with httpx.Client(base_url=service.__enter__(), timeout=30) as client:
        _project_id, asset_id = project_with_draft(client)  # a local job: this process holds the device
        assert list(device_holders(locks)) != []
        sent = promote_ok(client, asset_id, tags={"fake": "slow", "seconds": "8"})
        poll(lambda: _row(settings, sent["id"]), lambda row: row[0] == "running" and row[2] is not None,
             what="the request out")
    caplog.set_level(logging.INFO, logger="orchestrator.queue")
    stopper = threading.Thread(target=service.__exit__, args=(None, None, None))
    stopper.start()
    # Let go while the stop waits, the model off the device, long before the request answers.
    poll(lambda: device_holders(locks), lambda held: held == {}, what="the device to be let go")
    assert "waiting up to 60 s for 1 paid requests already sent" in caplog.text
    assert _row(settings, sent["id"])[0] == "running"
    stopper.join(90)
    assert not stopper.is_alive()
    assert _row(settings, sent["id"])[0] == "succeeded"


def test_a_second_stop_signal_is_heard_while_the_model_unloads(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hand-over (the inference thread's end awaited, up to 30 s inside a model load) ran before
    # the wait for paid requests and heard no second Ctrl-C: "stop again to leave them now" did not.
    from orchestrator.services import Services

    async def busy_inference_thread(self: Services) -> None:
        self.scheduler.hurry()  # the second signal, while the model is still on the device
        await asyncio.sleep(60)

    monkeypatch.setattr(Services, "_hand_over_device", busy_inference_thread)
    settings = paid_settings_for(tmp_path / "data", stop_grace=60)
    service = serve_in_thread(settings)
    with httpx.Client(base_url=service.__enter__(), timeout=30) as client:
        _project_id, asset_id = project_with_draft(client)
        sent = promote_ok(client, asset_id, tags={"fake": "slow", "seconds": "40"})
        poll(lambda: _row(settings, sent["id"]), lambda row: row[0] == "running" and row[2] is not None,
             what="the request out")
    started = time.monotonic()
    service.__exit__(None, None, None)
    assert time.monotonic() - started < 30  # neither the unload's 60 s nor the request's 40
    assert _row(settings, sent["id"])[0] == "running"  # left to recovery, as a hurried stop does


def test_without_grace_a_stop_leaves_a_sent_request_to_recovery(paid_settings_for: Callable[..., Settings],
                                                                 tmp_path: Path) -> None:
    settings = paid_settings_for(tmp_path / "data", stop_grace=0)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, tags={"fake": "slow", "seconds": "60"})
        poll(lambda: _row(settings, job["id"]), lambda row: row[0] == "running" and row[2] is not None,
             what="the request out")
    assert _row(settings, job["id"])[0] == "running"  # left to recovery: the next start fails it
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"])
        entries = [(e["kind"], e["amount"], e["unreconciled"]) for e in ledger(client, project_id)
                   if e["job_id"] == job["id"]]
    assert (done["status"], done["error"]["code"]) == ("failed", "interrupted")
    assert entries == [("hold", PRICE, False), ("capture", PRICE, True)]


def test_a_stop_while_a_call_s_id_is_being_saved_does_not_send_that_call_again(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A job of two paid calls, stopped while its first call's id waits for the write lock: the
    second call's "nothing sent" queued the job again as unsent, and the restart sent the first
    call twice. It is recovery's now, which never sends accepted work again."""
    settings = paid_settings_for(tmp_path / "data", stop_grace=0)
    prompt = "a lighthouse, stopped while its first call's id is being saved"
    caplog.set_level(logging.INFO, logger="orchestrator.runner")
    service = serve_in_thread(settings)
    with httpx.Client(base_url=service.__enter__(), timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        waiting, release = held_saves(monkeypatch)
        job = promote_ok(client, asset_id, prompt=prompt, tags={"fake": "second-call"})
        assert waiting.wait(10)
    stopper = threading.Thread(target=service.__exit__, args=(None, None, None))
    stopper.start()
    try:  # the save is let go once the stop has settled the job
        poll(lambda: caplog.text, lambda text: f"job {job['id']} interrupted by shutdown" in text, what="the stop")
    finally:
        release.set()
    stopper.join(60)
    monkeypatch.undo()
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        done = wait_for_job(client, job["id"])
        entries = [(e["kind"], e["unreconciled"]) for e in ledger(client, project_id) if e["job_id"] == job["id"]]
    assert fakes.SENT.count(prompt) == 1, fakes.SENT
    assert (done["status"], done["error"]["code"]) == ("failed", "interrupted"), done
    assert entries == [("hold", False), ("capture", True)]


def test_a_stop_queues_a_free_server_s_job_again_with_its_task(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """A self-hosted server's task id is saved before its render is sent: left to recovery on a
    stop, its job counted each restart as a crash and failed after three ("stopped 3 times")."""
    settings = paid_settings_for(tmp_path / "data", stop_grace=0)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        _, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, engine="fake-free", tags={"fake": "hang-free"})
        poll(lambda: _row(settings, job["id"]), lambda row: row[0] == "running" and row[2] is not None,
             what="the task id saved")
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        status, work, attempts = db.execute("SELECT status, provider_work, attempts FROM jobs WHERE id = ?",
                                            (job["id"],)).fetchone()
    assert status == "queued"  # a stop, not a crash: the next start runs it
    assert json.loads(work)["handles"][0]["id"].startswith("fake-")  # for the next run to take off the server
    assert json.loads(attempts)[-1]["error"]["details"]["graceful"] is True


def test_rolling_restarts_during_accepted_paid_work_are_stops_not_crashes(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """A queueing provider's long render, and a deploy restarting the service three times while
    it runs: each stop was left to recovery and counted as a crash, and the third failed the job,
    captured its estimate and withdrew the work at the provider. Each is a stop now: the job is
    queued again to follow its work, and no count sees it."""
    settings = paid_settings_for(tmp_path / "data", stop_grace=0)
    fakes.WITHDRAWN.clear()
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, engine="fake-queue", tags={"fake": "hang", "reattach": "hang"})
        poll(lambda: _row(settings, job["id"]), lambda row: row[0] == "running" and row[2] is not None,
             what="the provider's id saved")
    for restart in range(3):
        with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
            status, work, attempts = db.execute("SELECT status, provider_work, attempts FROM jobs WHERE id = ?",
                                                (job["id"],)).fetchone()
        assert status == "queued", (restart, status)
        assert json.loads(work)["handles"][0]["id"].startswith("fake-")
        stops = [a for a in json.loads(attempts) if a["status"] == "interrupted"]
        assert len(stops) == restart + 1 and all(a["error"]["details"]["graceful"] for a in stops)
        followed = functools.partial(_following, attempts=restart + 1)
        with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
            poll(lambda: client.get(f"/v1/jobs/{job['id']}").json(), followed, what="the work followed again")
            entries = [e["kind"] for e in ledger(client, project_id) if e["job_id"] == job["id"]]
        assert entries == ["hold"]  # nothing captured, nothing released: the work goes on
    assert fakes.WITHDRAWN == []


def test_a_stop_waiting_for_a_submit_s_answer_follows_the_work_once_it_is_accepted(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM while a queueing provider's submit was out: waited for as a synchronous request
    is, the stop went on waiting once the provider answered with the work's id, to the end of its
    render (up to ORCH_STOP_GRACE). Accepted, the work is followed after the restart instead."""
    settings = paid_settings_for(tmp_path / "data", stop_grace=60)
    service = serve_in_thread(settings)
    with httpx.Client(base_url=service.__enter__(), timeout=30) as client:
        _project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, engine="fake-queue", tags={"fake": "answer-late", "seconds": "1.5",
                                                                      "reattach": "hang"})
        poll(lambda: _row(settings, job["id"])[0], lambda status: status == "running")
    caplog.set_level(logging.INFO, logger="orchestrator.queue")
    started = time.monotonic()
    service.__exit__(None, None, None)
    assert "waiting up to 60 s for 1 paid requests already sent" in caplog.text  # the submit was out
    assert time.monotonic() - started < 20  # not the grace's 60 s, nor the render's hour
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        status, work, attempts = db.execute("SELECT status, provider_work, attempts FROM jobs WHERE id = ?",
                                            (job["id"],)).fetchone()
    assert status == "queued" and json.loads(work)["handles"][0]["id"].startswith("fake-")
    assert [(a["status"], a["error"]["details"]["graceful"]) for a in json.loads(attempts)] == [("interrupted", True)]


def _following(job: dict[str, Any], *, attempts: int) -> bool:
    """Whether a new attempt runs the job, after `attempts` listed ones."""
    return job["status"] == "running" and len(job["attempts"]) == attempts


def _row(settings: Settings, job_id: str) -> tuple[str, str | None, str | None]:
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        row: tuple[str, str | None, str | None] = db.execute(
            "SELECT status, error, provider_request_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row


def test_a_job_submitted_as_the_stop_began_stays_queued_for_the_restart(
        paid_settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    # The server stops the scheduler only once its connections have drained: a submit answered
    # meanwhile was claimed and its paid request sent, which the stop (no grace) then abandoned,
    # charged unreconciled for an image nobody kept.
    import socket

    settings = paid_settings_for(tmp_path / "data", stop_grace=0)
    service = serve_in_thread(settings)
    base = service.__enter__()
    with httpx.Client(base_url=base, timeout=30) as client:
        project_id, asset_id = project_with_draft(client)
    prompt = "a lighthouse, submitted as the server stops"
    body = json.dumps({"engine": "fake-paid", "cache": False, "prompt": prompt}).encode()
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        # A request in flight when the stop comes: a slow client's body still arriving.
        sock.sendall(f"POST /v1/assets/{asset_id}/promote HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.3)
        stopper = threading.Thread(target=service.__exit__, args=(None, None, None))  # as a SIGTERM
        stopper.start()
        time.sleep(0.5)
        sock.sendall(body[10:])
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 202"), answer  # answered, as a request in flight is
    job_id = json.loads(answer[answer.index(b"{"):])["id"]
    stopper.join(60)
    assert not stopper.is_alive()
    assert prompt not in fakes.SENT
    with serve_in_thread(settings) as restarted, httpx.Client(base_url=restarted, timeout=30) as client:
        job = wait_for_job(client, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert [(e["kind"], e["unreconciled"]) for e in ledger(client, project_id) if e["job_id"] == job_id] == [
            ("hold", False), ("capture", False)]
    assert fakes.SENT.count(prompt) == 1
