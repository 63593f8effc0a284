from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import httpx
import pytest
import respx
from PIL import Image
from sqlmodel import col, select

from orchestrator.db import Database
from orchestrator.errors import (
    BadEngineInput,
    Canceled,
    ContentFiltered,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    NoPrice,
)
from orchestrator.ledger import Ledger
from orchestrator.models import Job, LedgerEntry, Project
from tests.tiers.conftest import (
    LARGE_ERROR_PADDING,
    HeldRequest,
    NoAnswer,
    RecordingProgress,
    cancel_at_poll,
    canceled_while_out,
    deadline_at_poll,
    png_bytes,
    until,
)
from tests.tiers.conftest import bridge as base_bridge
from tiers.base import CancelToken, NullProgress, PriceTable, RenderRequest, before_billable_sends
from tiers.fal import FalEngine

BASE = "https://fal.test"
SUBMIT = f"{BASE}/fal-ai/nano-banana-2/edit"
# fal answers with URLs on its own layout (no /edit): the engine must use them as given.
QUEUE = "https://queue.fal.test/fal-ai/nano-banana-2/requests/r-1"
STATUS = f"{QUEUE}/status"
RESPONSE = QUEUE
CANCEL = f"{QUEUE}/cancel"
OUTPUT = "https://v3.fal.media/files/out.png"


def queued() -> dict[str, Any]:
    return {"request_id": "r-1", "response_url": RESPONSE, "status_url": STATUS, "cancel_url": CANCEL,
            "queue_position": 0}


def status(state: str, **extra: Any) -> httpx.Response:
    return httpx.Response(200 if state == "COMPLETED" else 202,
                          json={"status": state, "request_id": "r-1", "response_url": RESPONSE, **extra})


def done(urls: list[str] | None = None) -> httpx.Response:
    images = [{"url": u, "content_type": "image/png"} for u in (urls or [OUTPUT])]
    return httpx.Response(200, json={"images": images, "description": ""})


@pytest.fixture
def engine(make_ctx: Any, sleep: Any) -> FalEngine:
    eng = FalEngine(make_ctx(fal_api_key="f-secret", fal_base_url=BASE))
    eng.http.sleep = sleep
    eng.poll_interval = 0
    return eng


@pytest.fixture
def output() -> respx.Route:
    return respx.get(OUTPUT).mock(return_value=httpx.Response(200, content=png_bytes()))


def bridge(**kw: Any) -> RenderRequest:
    return base_bridge(**{"width": 1536, "height": 1024, **kw})


def happy_queue() -> tuple[respx.Route, respx.Route, respx.Route]:
    submit = respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=queued()))
    poll = respx.get(STATUS).mock(return_value=status("COMPLETED"))
    result = respx.get(RESPONSE).mock(return_value=done())
    return submit, poll, result


@respx.mock
@pytest.mark.parametrize("unreadable", [2, 3])
async def test_a_status_answered_with_what_cannot_be_read_is_asked_again_twice(
        engine: FalEngine, output: respx.Route, unreadable: int) -> None:
    # One gateway page with a 200 ended a request about to complete, and withdrew it.
    _, poll, result = happy_queue()
    poll.mock(side_effect=[httpx.Response(200, text="<html>gateway</html>")] * unreadable + [status("COMPLETED")])
    # Still running when given up on (one that had completed is fetched: see the ALREADY_COMPLETED tests).
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}))
    if unreadable < 3:
        made = await engine.run(bridge(), NullProgress(), CancelToken())
        assert len(made.images) == 1 and cancel.call_count == 0
    else:
        with pytest.raises(EngineError, match="not JSON"):
            await engine.run(bridge(), NullProgress(), CancelToken())
        assert cancel.call_count == 1 and result.call_count == 0
    assert poll.call_count == unreadable + (unreadable < 3)


@respx.mock
async def test_a_result_answered_with_what_cannot_be_read_is_fetched_again(engine: FalEngine,
                                                                          output: respx.Route) -> None:
    # Completed, so paid: one unreadable 200 lost the images a second GET would have had.
    _, _, result = happy_queue()
    result.mock(side_effect=[httpx.Response(200, text="<html>gateway</html>"), done()])
    made = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(made.images) == 1 and result.call_count == 2


@respx.mock
async def test_a_submit_answered_with_any_2xx_is_followed(engine: FalEngine, output: respx.Route) -> None:
    # Read as a refusal, the request queued (and billed once run) was left to run for nobody.
    submit, _, _ = happy_queue()
    submit.mock(return_value=httpx.Response(203, json=queued()))
    made = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(made.images) == 1


@respx.mock
async def test_a_redirect_naming_a_validation_error_is_no_refusal(engine: FalEngine) -> None:
    respx.post(SUBMIT).mock(return_value=httpx.Response(307, json={"detail": [{"msg": "bad", "type": "x"}]}))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_a_result_answered_with_any_2xx_is_read(engine: FalEngine, output: respx.Route) -> None:
    # Read as a refusal, the images made (and billed) were lost.
    _, _, result = happy_queue()
    result.mock(return_value=httpx.Response(203, json=done().json()))
    made = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(made.images) == 1 and result.call_count == 1


@respx.mock
async def test_success_sends_draft_as_data_uri(engine: FalEngine, output: respx.Route) -> None:
    submit, poll, result_route = happy_queue()
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())

    request = submit.calls.last.request
    assert request.headers["authorization"] == "Key f-secret"
    sent = json.loads(request.content)
    assert sent["prompt"].endswith("a lighthouse")
    assert sent["num_images"] == 1 and sent["output_format"] == "png" and sent["resolution"] == "2K"
    prefix, _, data = sent["image_urls"][0].partition(",")
    assert prefix == "data:image/png;base64"
    sent_image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    # The edit answers in its input's shape: the square draft goes as the 3:2 asked for.
    assert abs(sent_image.width / sent_image.height - 1.5) < 0.03
    assert sent_image.getpixel((sent_image.width // 2, sent_image.height // 2)) == (10, 120, 200)
    assert poll.calls.last.request.url.params["logs"] == "1"
    assert poll.calls.last.request.headers["authorization"] == "Key f-secret"
    assert result_route.calls.last.request.headers["authorization"] == "Key f-secret"
    # The key must not travel to the CDN that serves outputs.
    assert "authorization" not in output.calls.last.request.headers
    assert progress.request_ids == ["r-1"]
    assert len(result.images) == 1 and result.images[0].image.size == (64, 64)
    assert result.cost_millicredits is None and result.provider_request_id == "r-1"


@respx.mock
async def test_several_images_and_data_uri_output(engine: FalEngine, output: respx.Route) -> None:
    respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=queued()))
    respx.get(STATUS).mock(return_value=status("COMPLETED"))
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    respx.get(RESPONSE).mock(return_value=done([OUTPUT, uri]))
    result = await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert len(result.images) == 2


@respx.mock
async def test_429_with_retry_after_then_success(engine: FalEngine, sleep: Any, output: respx.Route) -> None:
    submit, _, _ = happy_queue()
    submit.mock(side_effect=[httpx.Response(429, headers={"Retry-After": "12"}),
                             httpx.Response(200, json=queued())])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert submit.call_count == 2 and sleep.waits == [12.0]
    assert len(result.images) == 1


@respx.mock
async def test_5xx_then_success(engine: FalEngine, output: respx.Route) -> None:
    submit, _, _ = happy_queue()
    submit.mock(side_effect=[httpx.Response(503), httpx.Response(200, json=queued())])
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert submit.call_count == 2


@respx.mock
async def test_read_timeout_on_submit_is_not_resent(engine: FalEngine) -> None:
    route = respx.post(SUBMIT).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.charged == "unknown"


@respx.mock
async def test_read_timeout_on_poll_is_retried(engine: FalEngine, sleep: Any, output: respx.Route) -> None:
    _, poll, _ = happy_queue()
    poll.mock(side_effect=[httpx.ReadTimeout("slow"), status("COMPLETED")])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert poll.call_count == 2 and len(sleep.waits) == 1
    assert len(result.images) == 1


@respx.mock
async def test_polls_through_several_states(engine: FalEngine, output: respx.Route) -> None:
    _, poll, _ = happy_queue()
    poll.mock(side_effect=[status("IN_QUEUE", queue_position=2), status("IN_QUEUE", queue_position=0),
                           status("IN_PROGRESS", logs=[]), status("COMPLETED")])
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())
    assert poll.call_count == 4 and len(result.images) == 1
    assert progress.states == ["submitted", "queued", "queued", "running"]


class DetailedProgress(RecordingProgress):
    """Also records each state's details, as the job's `state` events carry them to its clients."""

    def __init__(self) -> None:
        super().__init__()
        self.details: list[dict[str, Any]] = []

    def state(self, state: str, **details: Any) -> None:
        super().state(state, **details)
        self.details.append(details)


@respx.mock
@pytest.mark.parametrize("position", ["x" * 1_000_000, {"a": [1, 2, 3]}, -1, 1.5, True, 10**30])
async def test_a_queue_position_that_is_no_count_is_not_told(engine: FalEngine, output: respx.Route,
                                                             position: Any) -> None:
    # The status poll's `queue_position` goes into a `state` event every client of the job's stream
    # is sent (and the bus keeps): a faulty answer's megabyte string went out at each poll.
    _, poll, _ = happy_queue()
    poll.mock(side_effect=[status("IN_QUEUE", queue_position=position), status("IN_QUEUE", queue_position=3),
                           status("COMPLETED")])
    progress = DetailedProgress()
    await engine.run(bridge(), progress, CancelToken())
    assert progress.states == ["submitted", "queued", "queued"]
    assert progress.details[1:] == [{"position": None}, {"position": 3}]


@respx.mock
@pytest.mark.parametrize("body", [{"request_id": "r-1"}, ["nope"]])
async def test_malformed_submit_answer(engine: FalEngine, body: Any) -> None:
    respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=body))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_malformed_result(engine: FalEngine) -> None:
    _, _, result = happy_queue()
    result.mock(return_value=httpx.Response(200, text="<html>"))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_completed_without_images(engine: FalEngine) -> None:
    _, _, result = happy_queue()
    result.mock(return_value=httpx.Response(200, json={"images": []}))
    with pytest.raises(EngineError, match="without an image") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    # Priced per output image: none made may have cost nothing, so a person reconciles it (it was
    # captured as a settled charge of the whole estimate).
    assert info.value.charged == "unknown"
    # The model's answer to this prompt: five retries of it opened fal's circuit for every project.
    assert not info.value.engine_fault


@respx.mock
async def test_an_image_the_safety_checker_flagged_is_filtered_not_delivered(engine: FalEngine,
                                                                           output: respx.Route) -> None:
    # A flagged image comes back blacked out: it was stored and billed as the result.
    _, _, result = happy_queue()
    result.mock(return_value=httpx.Response(200, json={"images": [{"url": OUTPUT}], "has_nsfw_concepts": [True]}))
    with pytest.raises(ContentFiltered, match="has_nsfw_concepts") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and output.call_count == 0


OUTPUTS = [f"https://v3.fal.media/files/out{i}.png" for i in range(3)]


@respx.mock
async def test_one_flagged_image_of_several_leaves_the_others_to_the_job(engine: FalEngine) -> None:
    """fal makes every image of a request, and bills each: a flag on one threw away the good ones."""
    _, _, result = happy_queue()
    result.mock(return_value=httpx.Response(200, json={"images": [{"url": u} for u in OUTPUTS],
                                                       "has_nsfw_concepts": [False, True, False]}))
    fetched = [respx.get(u).mock(return_value=httpx.Response(200, content=png_bytes())) for u in OUTPUTS]
    with pytest.raises(ContentFiltered, match="flagged 1 of the 3 image") as info:
        await engine.run(bridge(n=3), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and info.value.details["flagged"] == 1
    made = info.value.made
    assert made is not None and len(made.images) == 2 and made.provider_request_id == "r-1"
    assert [route.call_count for route in fetched] == [1, 0, 1]  # the blacked-out one is not fetched


@respx.mock
async def test_a_failed_download_leaves_the_images_already_fetched_to_the_job(engine: FalEngine) -> None:
    _, _, result = happy_queue()
    result.mock(return_value=done(OUTPUTS[:2]))
    respx.get(OUTPUTS[0]).mock(return_value=httpx.Response(200, content=png_bytes()))
    respx.get(OUTPUTS[1]).mock(return_value=httpx.Response(404))
    with pytest.raises(EngineError, match="HTTP 404") as info:
        await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert info.value.charged == "yes"
    made = info.value.made
    assert made is not None and len(made.images) == 1


@respx.mock
async def test_a_failed_download_leaves_the_images_listed_after_it_to_the_job(engine: FalEngine) -> None:
    """fal made and billed every image it lists: a first download that failed threw away the rest, unfetched."""
    _, _, result = happy_queue()
    result.mock(return_value=done(OUTPUTS))
    fetched = [respx.get(OUTPUTS[0]).mock(return_value=httpx.Response(404)),
               respx.get(OUTPUTS[1]).mock(return_value=httpx.Response(200, content=b"not an image")),
               respx.get(OUTPUTS[2]).mock(return_value=httpx.Response(200, content=png_bytes((1, 2, 3))))]
    with pytest.raises(EngineError, match="HTTP 404") as info:
        await engine.run(bridge(n=3), NullProgress(), CancelToken())
    assert info.value.charged == "yes" and [route.call_count for route in fetched] == [1, 1, 1]
    made = info.value.made
    assert made is not None and [image.image.getpixel((0, 0)) for image in made.images] == [(1, 2, 3)]


@respx.mock
async def test_a_failed_download_of_an_answer_listing_more_images_than_asked_charges_each_listed(
        engine: FalEngine) -> None:
    """fal bills each image it made: the surplus a success is charged for was left out when a
    download failed, and the estimate of the 2 asked captured as the bill for 3."""
    _, _, result = happy_queue()
    result.mock(return_value=done(OUTPUTS))
    respx.get(OUTPUTS[0]).mock(return_value=httpx.Response(404))
    respx.get(OUTPUTS[1]).mock(return_value=httpx.Response(200, content=png_bytes((1, 2, 3))))
    unasked = respx.get(OUTPUTS[2]).mock(return_value=httpx.Response(200, content=png_bytes()))
    with pytest.raises(EngineError, match="HTTP 404") as info:
        await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert info.value.charged == "yes" and unasked.call_count == 0
    assert info.value.cost_millicredits == 3 * engine.estimate(bridge(n=1))
    made = info.value.made
    assert made is not None and [image.image.getpixel((0, 0)) for image in made.images] == [(1, 2, 3)]


@respx.mock
async def test_a_cancel_while_downloading_past_a_failed_one_ends_the_job_as_canceled(engine: FalEngine) -> None:
    engine.output_kept_seconds = 0.05  # the download out never ends
    _, _, result = happy_queue()
    result.mock(return_value=done(OUTPUTS[:2]))
    respx.get(OUTPUTS[0]).mock(return_value=httpx.Response(404))
    held = NoAnswer()
    respx.get(OUTPUTS[1]).mock(side_effect=held)
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(n=2), NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    with pytest.raises(Canceled):
        await running


@respx.mock
async def test_a_cancel_while_downloading_from_an_answer_listing_more_images_than_asked_charges_each_listed(
        engine: FalEngine) -> None:
    engine.output_kept_seconds = 0.05  # the download out never ends
    _, _, result = happy_queue()
    result.mock(return_value=done(OUTPUTS[:2]))
    held = NoAnswer()
    respx.get(OUTPUTS[0]).mock(side_effect=held)
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(n=1), NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await running
    assert info.value.charged == "yes" and info.value.cost_millicredits == 2 * engine.estimate(bridge(n=1))


@respx.mock
async def test_an_infrastructure_failure_whose_text_says_safety_is_not_content_filtered(engine: FalEngine) -> None:
    # Its type says fal bills none of it; its words made it the artist's content, filtered and captured.
    _, poll, _ = happy_queue()
    poll.mock(return_value=status("COMPLETED", error="Safety checker failed to load", error_type="runner_server_error"))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not isinstance(info.value, ContentFiltered)
    assert (info.value.charged, info.value.retryable) == ("no", True)


@respx.mock
async def test_completed_with_content_policy_error(engine: FalEngine) -> None:
    _, poll, result = happy_queue()
    poll.mock(return_value=status("COMPLETED", error="Output was flagged",
                                  error_type="content_policy_violation"))
    with pytest.raises(ContentFiltered):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert result.call_count == 0


@respx.mock
async def test_a_failure_text_echoing_the_key_does_not_carry_it(engine: FalEngine) -> None:
    _, poll, _ = happy_queue()
    poll.mock(return_value=status("COMPLETED", error="boom, sent with Authorization: Key f-secret",
                                  error_type="runner_error"))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "f-secret" not in info.value.message and "Authorization: ***" in info.value.message


@respx.mock
async def test_completed_with_other_error(engine: FalEngine) -> None:
    _, poll, _ = happy_queue()
    # A model's own failure (not one of fal's request errors, which are 5xx and never billed).
    poll.mock(return_value=status("COMPLETED", error="worker crashed", error_type="model_error"))
    with pytest.raises(EngineError, match="worker crashed") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not isinstance(info.value, ContentFiltered) and info.value.charged == "unknown"


@respx.mock
@pytest.mark.parametrize("error_type", ["request_timeout", "startup_timeout", "runner_scheduling_failure",
                                        "runner_disconnected", "internal_error"])
async def test_an_infrastructure_failure_fal_bills_nothing_for_leaves_the_job_to_another_engine(
        engine: FalEngine, error_type: str) -> None:
    # fal bills no 5xx, and its request errors are 5xx: captured as possibly billed, the job
    # never fell back and its estimate waited for a person to reconcile it.
    _, poll, _ = happy_queue()
    poll.mock(return_value=status("COMPLETED", error="Request timed out", error_type=error_type))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert (info.value.charged, info.value.retryable, info.value.work_unbilled) == ("no", True, True)


@respx.mock
async def test_a_failure_stored_on_the_result_is_not_fetched_again_until_the_deadline(
        engine: FalEngine, sleep: Any) -> None:
    # Retried as a passing outage, a stored 504 held the job to a fresh deadline (20 GETs, 282 s).
    _, _, result = happy_queue()
    result.mock(return_value=httpx.Response(504, json={"detail": "Request timed out", "error_type": "request_timeout"},
                                            headers={"X-Fal-Error-Type": "request_timeout"}))
    with pytest.raises(EngineError, match="request_timeout") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert result.call_count == 1 and sleep.waits == []
    assert (info.value.charged, info.value.retryable, info.value.work_unbilled) == ("no", True, True)


@respx.mock
async def test_a_passing_outage_of_the_submit_or_a_poll_is_retried_whatever_it_names(
        engine: FalEngine, sleep: Any, output: respx.Route) -> None:
    # The stored-failure test once held for every call: a submit answered 503 runner_scheduling_failure
    # failed the job as bad input, and a poll's failed a running request, canceled and charged.
    outage = httpx.Response(503, json={"detail": "no runner", "error_type": "runner_scheduling_failure"},
                            headers={"X-Fal-Error-Type": "runner_scheduling_failure"})
    submit, poll, _ = happy_queue()
    submit.side_effect = [outage, httpx.Response(200, json=queued())]
    poll.side_effect = [outage, status("COMPLETED")]
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1 and submit.call_count == 2 and poll.call_count == 2


@respx.mock
async def test_content_policy_on_result(engine: FalEngine) -> None:
    _, _, result = happy_queue()
    result.mock(return_value=httpx.Response(422, json={"detail": [
        {"loc": ["body", "prompt"], "msg": "The content could not be processed",
         "type": "content_policy_violation"}]}))
    with pytest.raises(ContentFiltered):
        await engine.run(bridge(), NullProgress(), CancelToken())


@respx.mock
async def test_401_fails_at_once_naming_the_setting(engine: FalEngine, caplog: Any) -> None:
    route = respx.post(SUBMIT).mock(return_value=httpx.Response(401, json={"detail": "Invalid key"}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    assert "FAL_KEY" in info.value.message and "f-secret" not in info.value.message
    assert "f-secret" not in caplog.text


@respx.mock
@pytest.mark.parametrize("status_code", [400, 422])
async def test_validation_error_is_not_retried(engine: FalEngine, status_code: int) -> None:
    route = respx.post(SUBMIT).mock(return_value=httpx.Response(status_code, json={"detail": [
        {"loc": ["body", "resolution"], "msg": "unexpected value; permitted: '1K', '2K', '4K'",
         "type": "value_error.const"}]}))
    with pytest.raises(BadEngineInput, match="permitted") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.charged == "no"


@respx.mock
@pytest.mark.parametrize("abandon", [False, True], ids=["user-cancel", "shutdown"])
async def test_cancel_during_polling_cancels_the_request(engine: FalEngine, abandon: bool) -> None:
    # A shutdown (or a takeover) leaves the request running for the process that reattaches.
    token = CancelToken()
    _, poll, result = happy_queue()

    def in_progress(request: httpx.Request) -> httpx.Response:
        token.cancel(abandon=abandon)
        return status("IN_PROGRESS")

    poll.mock(side_effect=in_progress)
    cancel = respx.put(CANCEL).mock(
        return_value=httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}))
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    assert info.value.charged == "unknown"
    assert cancel.call_count == (0 if abandon else 1)
    if not abandon:
        assert cancel.calls.last.request.headers["authorization"] == "Key f-secret"
    assert result.call_count == 0


@respx.mock
@pytest.mark.parametrize(("last_seen", "answer", "charged"), [
    ("IN_QUEUE", httpx.Response(200, json={"status": "OK"}), "no"),
    ("IN_QUEUE", httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}), "unknown"),  # started since
    ("IN_PROGRESS", httpx.Response(200, json={"status": "OK"}), "unknown"),
    ("IN_QUEUE", httpx.Response(400, json={"status": "NOT_FOUND"}), "unknown"),
], ids=["taken-off-the-queue", "started-since", "running", "not-found"])
async def test_a_cancel_while_the_request_waits_in_the_queue_costs_nothing(
        engine: FalEngine, last_seen: str, answer: httpx.Response, charged: str) -> None:
    # fal bills no time in its queue, and only outputs made: a request it took off the queue
    # was captured as possibly billed.
    token = CancelToken()
    _, poll, result = happy_queue()

    poll.mock(side_effect=cancel_at_poll(token, lambda: status(last_seen)))
    cancel = respx.put(CANCEL).mock(return_value=answer)
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    assert cancel.call_count == 1 and result.call_count == 0
    assert info.value.charged == charged
    assert info.value.charged_told  # said by the engine: the runner does not doubt it
    assert info.value.work_unbilled == (charged == "no")  # nor after a restart, following it


@respx.mock
async def test_a_cancel_before_any_poll_is_answered_releases_the_hold_when_fal_takes_the_request_off_its_queue(
        engine: FalEngine, db: Database) -> None:
    # The submit's answer is all that was seen of the request: fal's `OK` to the cancel was read
    # as "outcome unknown", and the estimate captured for a person to reconcile, where the same
    # answer to a withdrawal (`withdraw`) settled it at 0.
    token, progress = CancelToken(), RecordingProgress()
    _, poll, result = happy_queue()
    held = HeldRequest(status("IN_QUEUE"))
    poll.mock(side_effect=held)
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(200, json={"status": "OK"}))
    run = asyncio.create_task(engine.run(bridge(), progress, token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(run, 5)
    assert not held.answered and cancel.call_count == 1 and result.call_count == 0

    # Settled as the runner ends the job: its accepted request saved, so only fal's word frees it.
    ledger = Ledger()
    project = Project(id="prj_fal", name="fal", policy="balanced", budget_limit=None, budget_period="none")
    job = Job(id="job_fal", project_id=project.id, stage="bridge", engine="fal", params={},
              provider_work={"engine": "fal", "handles": progress.handles})
    with db.transaction() as s:
        s.add(project)
    with db.transaction() as s:
        s.add(job)
        ledger.hold(s, ledger.lock_project(s, project.id), job, engine.estimate(bridge()))
    with db.transaction() as s:
        ledger.settle_failure(s, job, info.value)
    with db.session() as s:
        entries = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job.id)).all()
    assert sorted((e.kind, e.unreconciled) for e in entries) == [("hold", False), ("release", False)]


@respx.mock
async def test_a_deadline_in_the_queue_leaves_the_job_to_another_engine(engine: FalEngine) -> None:
    _, poll, _ = happy_queue()
    poll.mock(side_effect=deadline_at_poll(engine, lambda: status("IN_QUEUE")))
    respx.put(CANCEL).mock(return_value=httpx.Response(200, json={"status": "OK"}))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "no" and info.value.retryable and info.value.work_unbilled


@respx.mock
async def test_a_failed_cancel_is_logged(engine: FalEngine, caplog: pytest.LogCaptureFixture) -> None:
    token = CancelToken()
    _, poll, _ = happy_queue()

    poll.mock(side_effect=cancel_at_poll(token, lambda: status("IN_PROGRESS")))
    respx.put(CANCEL).mock(return_value=httpx.Response(401, json={"detail": "No user found for Key ID"}))
    with caplog.at_level("WARNING", logger="tiers.fal"), pytest.raises(Canceled):
        await engine.run(bridge(), NullProgress(), token)
    assert any("canceling" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@respx.mock
@pytest.mark.parametrize("held", [True, False], ids=["held", "taken-over"])
async def test_deadline_during_polling_cancels_the_request_unless_another_process_follows_it(
        engine: FalEngine, held: bool) -> None:
    # Taken over: this process was stopped past its lease, and another follows the request on;
    # cancelling it then failed (and charged) a job that would have succeeded.
    now = [0.0]
    engine.http.clock = lambda: now[0]
    _, poll, _ = happy_queue()

    def in_queue(request: httpx.Request) -> httpx.Response:
        now[0] += 100.0
        return status("IN_QUEUE")

    async def send() -> None:
        pass

    async def still_held() -> bool:
        return held

    poll.mock(side_effect=in_queue)
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(202))
    with before_billable_sends(send, held=still_held), pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert cancel.call_count == (1 if held else 0) and info.value.charged == "unknown"



@respx.mock
async def test_a_request_completed_near_the_deadline_still_has_its_result_fetched(
        engine: FalEngine, sleep: Any, output: respx.Route) -> None:
    # Paid for once COMPLETED: its result had what was left of the submit's deadline (here 10 ms,
    # less than one retry's back-off), and a busy moment lost the image.
    now = [0.0]
    engine.http.clock = lambda: now[0] + sum(sleep.waits)
    _, poll, result = happy_queue()

    def completed_late(request: httpx.Request) -> httpx.Response:
        now[0] = engine.http.deadline_seconds - 0.01
        return status("COMPLETED")

    poll.mock(side_effect=completed_late)
    result.mock(side_effect=[httpx.Response(503), done()])
    answer = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(answer.images) == 1 and result.call_count == 2


def test_estimate_by_resolution_and_unknown_model(make_ctx: Any) -> None:
    eng = FalEngine(make_ctx(fal_api_key="k"))
    assert eng.estimate(bridge(width=1024, height=1024)) == 8000
    assert eng.estimate(bridge(width=2048, height=1536)) == 12000
    assert eng.estimate(bridge(width=4096, height=2048, n=2)) == 32000
    assert eng.prices()["credits_per_image"]["fal-ai/nano-banana-2/edit"]["0.5K"] == 6.0
    unknown = FalEngine(make_ctx(fal_api_key="k", fal_model="fal-ai/other"))
    with pytest.raises(NoPrice):
        unknown.estimate(bridge())


def test_a_text_to_image_app_is_unavailable_saying_which_app_edits(make_ctx: Any) -> None:
    """Priced as its edit app is, it took the bridge, ignored the draft it was sent, and was paid
    for a picture that never saw it."""
    text_only = FalEngine(make_ctx(fal_api_key="k", fal_model="fal-ai/nano-banana-2/"))
    assert text_only.availability() == (False, "ORCH_FAL_MODEL=fal-ai/nano-banana-2 is text-to-image only: it "
                                               "would not see the draft (use fal-ai/nano-banana-2/edit)")
    assert FalEngine(make_ctx(fal_api_key="k")).availability() == (True, None)


@respx.mock
async def test_sides_up_to_512_ask_and_pay_for_the_half_k_tier(engine: FalEngine, output: respx.Route,
                                                               make_ctx: Any) -> None:
    # Once sent (and charged) as 1K: providers.md prices 0.5K at three quarters of it.
    assert engine.estimate(bridge(width=512, height=384)) == 6000
    # By its pixels, as the other tiers: Google's 0.5K at 16:9 is 688x384 (by the long side alone,
    # asked and paid at 1K).
    for width, height in ((688, 384), (640, 360), (576, 432), (384, 688)):
        assert engine.estimate(bridge(width=width, height=height)) == 6000, (width, height)
    for width, height in ((544, 544), (800, 384)):  # more pixels than 0.5K holds; thinner than 21:9
        assert engine.estimate(bridge(width=width, height=height)) == 8000, (width, height)
    submit, _poll, _result = happy_queue()
    result = await engine.run(bridge(width=512, height=512), NullProgress(), CancelToken())
    assert json.loads(submit.calls.last.request.content)["resolution"] == "0.5K"
    assert result.metadata["resolution"] == "0.5K"
    # A model whose prices name no 0.5K tier is asked for 1K, as before.
    ctx = make_ctx(fal_api_key="k", fal_model="fal-ai/other")
    ctx.price_overrides["fal"] = {"fal-ai/other": {"1K": 5, "2K": 7}}
    assert FalEngine(ctx).estimate(bridge(width=512, height=512)) == 5000


def test_unavailable_without_key(make_ctx: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.delenv("ORCH_FAL_API_KEY", raising=False)
    available, reason = FalEngine(make_ctx()).availability()
    assert not available and reason and "FAL_KEY" in reason


@respx.mock
@pytest.mark.parametrize("answer", [httpx.Response(503), httpx.Response(429), httpx.ConnectError("down")])
async def test_a_failed_result_fetch_after_completion_is_charged(engine: FalEngine, sleep: Any,
                                                                answer: httpx.Response | Exception) -> None:
    # COMPLETED: fal has run and billed the request, whatever then stops us reading it.
    engine.http.clock = sleep.clock
    respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=queued()))
    respx.get(STATUS).mock(return_value=status("COMPLETED"))
    route = respx.get(RESPONSE)
    route.mock(side_effect=answer) if isinstance(answer, Exception) else route.mock(return_value=answer)
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_reattach_follows_the_saved_request_without_submitting(engine: FalEngine, output: respx.Route) -> None:
    # What `run` saved before the process died is all a later process needs.
    submit = respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=queued()))
    progress = RecordingProgress()
    respx.get(STATUS).mock(side_effect=[status("IN_PROGRESS"), status("COMPLETED")])
    respx.get(RESPONSE).mock(return_value=done())
    await engine.run(bridge(), progress, CancelToken())
    assert progress.handles == [{"id": "r-1", "status_url": STATUS, "response_url": RESPONSE, "cancel_url": CANCEL}]

    submit.reset()
    respx.get(STATUS).mock(side_effect=[status("IN_QUEUE"), status("COMPLETED")])
    result = await engine.reattach(bridge(), progress.handles, RecordingProgress(), CancelToken())
    assert submit.call_count == 0
    assert len(result.images) == 1 and result.provider_request_id == "r-1"


@pytest.mark.parametrize("handles", [[], [{"id": "r-1"}], [{"id": "r-1", "status_url": STATUS,
                                                            "response_url": RESPONSE, "cancel_url": "x"}]])
async def test_reattach_without_usable_urls_is_charged_unknown(engine: FalEngine,
                                                               handles: list[dict[str, Any]]) -> None:
    with pytest.raises(EngineError) as caught:
        await engine.reattach(bridge(), handles, NullProgress(), CancelToken())
    assert caught.value.charged == "unknown"


@respx.mock
async def test_reattach_to_a_failed_request_is_charged_unknown(engine: FalEngine) -> None:
    respx.get(STATUS).mock(return_value=status("COMPLETED", error="boom", error_type="runner_error"))
    handles = [{"id": "r-1", "status_url": STATUS, "response_url": RESPONSE, "cancel_url": CANCEL}]
    with pytest.raises(EngineError) as caught:
        await engine.reattach(bridge(), handles, NullProgress(), CancelToken())
    assert caught.value.charged == "unknown"


@respx.mock
@pytest.mark.parametrize("code", [404, 410])
async def test_reattach_to_a_result_fal_no_longer_keeps_is_no_fault_of_the_request(engine: FalEngine,
                                                                                    code: int) -> None:
    # Completed while the service was down, its result expired since: told as the user's bad
    # request (`invalid_request`), which it never was.
    respx.get(STATUS).mock(return_value=status("COMPLETED"))
    respx.get(RESPONSE).mock(return_value=httpx.Response(code, json={"detail": "Request not found"}))
    handles = [{"id": "r-1", "status_url": STATUS, "response_url": RESPONSE, "cancel_url": CANCEL}]
    with pytest.raises(EngineError) as caught:
        await engine.reattach(bridge(), handles, NullProgress(), CancelToken())
    assert (caught.value.code, caught.value.charged, caught.value.retryable) == ("engine_error", "unknown", False)
    assert "no longer kept" in caught.value.message


@respx.mock
async def test_a_model_it_does_not_serve_lets_another_engine_try(engine: FalEngine) -> None:
    route = respx.post(SUBMIT).mock(return_value=httpx.Response(404, json={"detail": "Application not found"}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    error = info.value
    assert error.retryable and error.charged == "no" and route.call_count == 1
    assert error.details["setting"] == "ORCH_FAL_MODEL" and "set ORCH_FAL_MODEL" in error.message


@respx.mock
@pytest.mark.parametrize("status_url", ["https://attacker.example/s", "http://queue.fal.test/s",
                                        "https://fal.test.attacker.example/s", "/relative/status"])
async def test_queue_urls_off_fal_s_https_site_never_get_the_key(engine: FalEngine, status_url: str) -> None:
    respx.post(SUBMIT).mock(return_value=httpx.Response(200, json={**queued(), "status_url": status_url}))
    elsewhere = respx.route(url__regex=r"^(?!https://fal\.test/).*").mock(return_value=httpx.Response(200))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert elsewhere.call_count == 0  # nothing, the key least of all, went to the named host
    assert info.value.charged == "unknown" and "own https site (fal.test)" in info.value.message
    assert not engine.can_reattach([{"id": "r-1", **queued(), "status_url": status_url}], bridge())
    assert engine.can_reattach([{"id": "r-1", **queued()}], bridge())  # queue.fal.test: fal's own site


@pytest.mark.parametrize(("base", "url", "keyed"), [
    ("https://queue.fal.run", "https://queue.fal.run/fal-ai/x/requests/1/status", True),
    ("https://queue.fal.run", "https://rest.fal.run/x", True),
    ("https://queue.fal.run", "http://queue.fal.run/x", False),  # never the key in clear
    ("https://fal-proxy.studio.co.uk", "https://queue.fal.run/x", True),  # a proxy passing fal's URLs on
    ("https://fal-proxy.studio.co.uk", "https://queue.fal-proxy.studio.co.uk/x", True),  # its own subdomains
    ("https://fal-proxy.studio.co.uk", "https://evil.co.uk/x", False),
    # Not its siblings: another tenant of a shared host.
    ("https://studio-fal.herokuapp.com", "https://other-tenant.herokuapp.com/x", False),
    ("https://queue.fal.run", "https://fal.run.evil.example/x", False),
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000/requests/1", True),  # a local stand-in
    ("http://127.0.0.1:9000", "http://127.0.0.2:9000/requests/1", False),
    ("http://127.0.0.1:9000", "http://5.0.0.1:9000/requests/1", False),
    # Another port of the base's host is another service (another user's, on a shared machine).
    ("http://127.0.0.1:9000", "http://127.0.0.1:9001/requests/1", False),
    ("https://fal-proxy.studio.co.uk", "https://fal-proxy.studio.co.uk:8443/x", False),
    ("https://fal-proxy.studio.co.uk", "https://fal-proxy.studio.co.uk:443/x", True),  # its port, spelt out
    ("https://fal-proxy.studio.co.uk:8443", "https://queue.fal-proxy.studio.co.uk:8443/x", True),
])
def test_which_queue_urls_may_carry_the_key(make_ctx: Any, base: str, url: str, keyed: bool) -> None:
    engine = FalEngine(make_ctx(fal_api_key="k", fal_base_url=base))
    assert engine._keyed(url) is keyed


@respx.mock
async def test_a_single_image_app_s_answer_is_read(engine: FalEngine, output: respx.Route) -> None:
    """An upscaler answers `{"image": {...}}`: its paid result failed as "completed without an image"."""
    respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=queued()))
    respx.get(STATUS).mock(return_value=status("COMPLETED"))
    respx.get(RESPONSE).mock(return_value=httpx.Response(200, json={"image": {"url": OUTPUT, "width": 64}}))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1 and output.call_count == 1


@respx.mock
async def test_an_answer_with_more_images_than_asked_is_fetched_up_to_n(engine: FalEngine, output: respx.Route) -> None:
    """A bad or hostile answer listing hundreds of 16 MP images is not downloaded and decoded whole."""
    others = respx.get(url__startswith="https://v3.fal.media/files/other").mock(
        return_value=httpx.Response(200, content=png_bytes()))
    respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=queued()))
    respx.get(STATUS).mock(return_value=status("COMPLETED"))
    respx.get(RESPONSE).mock(return_value=done([OUTPUT, *(f"https://v3.fal.media/files/other-{i}.png"
                                                          for i in range(30))]))
    result = await engine.run(bridge(n=1), NullProgress(), CancelToken())
    assert len(result.images) == 1
    assert output.call_count == 1 and others.call_count == 0
    # fal bills each image it made: charged for all 31 (the ledger flags a charge past the hold),
    # where the estimate of one was captured as settled.
    assert result.cost_millicredits == 31 * engine.estimate(bridge(n=1))


@respx.mock
async def test_more_images_than_asked_with_no_price_here_keep_the_render(
        engine: FalEngine, output: respx.Route, monkeypatch: pytest.MonkeyPatch) -> None:
    # This process's prices name the model no longer (another routed the job): pricing the
    # surplus raised NoPrice, which failed a job whose images fal had made and billed as free.
    respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=queued()))
    respx.get(STATUS).mock(return_value=status("COMPLETED"))
    respx.get(RESPONSE).mock(return_value=done([OUTPUT, "https://v3.fal.media/files/other-1.png"]))
    monkeypatch.setattr(engine, "_prices", PriceTable("fal", {}, "2026-11"))
    result = await engine.run(bridge(n=1), NullProgress(), CancelToken())
    assert len(result.images) == 1 and result.cost_millicredits is None  # the hold is captured


@respx.mock
@pytest.mark.parametrize("answer", [
    {"status": {"code": "IN_QUEUE"}},
    {"status": "COMPLETED", "error": "boom", "error_type": {"type": "runner_server_error"}},
], ids=["status", "error_type"])
async def test_a_status_of_another_shape_is_an_engine_error_and_the_request_withdrawn(
        engine: FalEngine, answer: dict[str, Any]) -> None:
    # An object there raised TypeError (unhashable) past the engine's own handling: the job failed
    # as a crash, and the queued request was left running, and billing, at fal.
    respx.post(SUBMIT).mock(return_value=httpx.Response(200, json=queued()))
    respx.get(STATUS).mock(return_value=httpx.Response(200, json=answer))
    withdraw = respx.put(CANCEL).mock(return_value=httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"
    assert withdraw.call_count == (1 if answer["status"] != "COMPLETED" else 0)  # a completed one has nothing to stop


@respx.mock
async def test_an_answer_of_as_many_images_as_asked_is_charged_its_estimate(engine: FalEngine,
                                                                           output: respx.Route) -> None:
    happy_queue()
    assert (await engine.run(bridge(), NullProgress(), CancelToken())).cost_millicredits is None


@respx.mock
async def test_withdraw_cancels_saved_requests_only_where_the_key_may_go(engine: FalEngine) -> None:
    # A job canceled while queued to be reattached: its request would run, and bill, for nobody.
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}))
    elsewhere = respx.put("https://collector.example/cancel").mock(return_value=httpx.Response(200))
    unbilled = await engine.withdraw([{"id": "r-1", "cancel_url": CANCEL},
                                      {"id": "r-2", "cancel_url": "https://collector.example/cancel"}])
    assert cancel.call_count == 1 and elsewhere.call_count == 0
    assert cancel.calls.last.request.headers["authorization"].startswith("Key ")
    assert unbilled is False  # a request running at fal, and one whose fate this process cannot ask


SECOND_CANCEL = CANCEL.replace("r-1", "r-2")


@respx.mock
@pytest.mark.parametrize(("answers", "unbilled"), [
    ([httpx.Response(200, json={"status": "OK"})] * 2, True),
    ([httpx.Response(200, json={"status": "OK"}), httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"})],
     False),
    ([httpx.Response(200, json={"status": "OK"}), httpx.Response(400, json={"status": "ALREADY_COMPLETED"})], False),
    ([httpx.Response(200, json={"status": "OK"}), httpx.Response(200, json={"status": "ok"})], False),
], ids=["both-off-the-queue", "one-running", "one-completed", "odd-answer"])
async def test_withdraw_says_unbilled_only_when_fal_took_every_request_off_its_queue(
        engine: FalEngine, answers: list[httpx.Response], unbilled: bool) -> None:
    # Its job's estimate stayed charged for reconciliation although fal never ran the request.
    first = respx.put(CANCEL).mock(return_value=answers[0])
    second = respx.put(SECOND_CANCEL).mock(return_value=answers[1])
    assert await engine.withdraw([{"id": "r-1", "cancel_url": CANCEL}, {"id": "r-2", "cancel_url": SECOND_CANCEL}]) \
        is unbilled
    assert first.call_count == 1 and second.call_count == 1  # the second is withdrawn whatever the first said
    assert await engine.withdraw([]) is False


@respx.mock
async def test_a_cancel_while_the_submit_is_out_cancels_the_request_it_queued(
        engine: FalEngine, caplog: pytest.LogCaptureFixture) -> None:
    # Racing the submit away lost its cancel_url: the queued request ran, and billed, for nobody.
    caplog.set_level("INFO", logger="tiers.fal")
    held = HeldRequest(httpx.Response(200, json=queued()))
    submit = respx.post(SUBMIT).mock(side_effect=held)
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}))
    error = await canceled_while_out(engine, bridge(), held)
    assert error.charged == "unknown" and cancel.call_count == 0
    held.answer.set()
    await until(lambda: cancel.call_count > 0, then=0.05)
    assert held.answered and not held.dropped
    assert submit.call_count == 1 and cancel.call_count == 1
    assert cancel.calls.last.request.headers["authorization"] == "Key f-secret"
    assert "request r-1, queued after its job was canceled, is canceled" in caplog.text
    await engine.aclose()


@respx.mock
async def test_a_submit_left_out_by_a_cancel_sends_the_key_only_to_fal_s_own_cancel_url(engine: FalEngine) -> None:
    held = HeldRequest(httpx.Response(200, json={**queued(), "cancel_url": "https://collector.example/cancel"}))
    respx.post(SUBMIT).mock(side_effect=held)
    elsewhere = respx.put("https://collector.example/cancel").mock(return_value=httpx.Response(200))
    await canceled_while_out(engine, bridge(), held)
    held.answer.set()
    await until(lambda: held.answered, then=0.05)
    assert held.answered and elsewhere.call_count == 0
    await engine.aclose()


@respx.mock
async def test_a_shutdown_while_the_submit_is_out_leaves_the_request_to_whoever_follows_the_job(
        engine: FalEngine) -> None:
    # Abandoned (a stop, or another process took the job over): as before, nothing is canceled.
    held = HeldRequest(httpx.Response(200, json=queued()))
    respx.post(SUBMIT).mock(side_effect=held)
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}))
    error = await canceled_while_out(engine, bridge(), held, abandon=True)
    assert error.charged == "unknown" and held.dropped
    held.answer.set()
    await asyncio.sleep(0.05)
    assert cancel.call_count == 0
    await engine.aclose()


@respx.mock
async def test_closing_the_engine_ends_a_submit_left_out_by_a_cancel(engine: FalEngine) -> None:
    held = HeldRequest(httpx.Response(200, json=queued()))
    respx.post(SUBMIT).mock(side_effect=held)
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}))
    await canceled_while_out(engine, bridge(), held)
    await asyncio.sleep(0.05)
    assert not held.dropped  # still out, followed
    await engine.aclose()
    assert held.dropped and cancel.call_count == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()] == []


@respx.mock
async def test_a_refusal_of_the_key_says_what_the_provider_said(engine: FalEngine) -> None:
    # A locked account (its balance spent) read as "check ORCH_FAL_API_KEY" alone.
    respx.post(SUBMIT).mock(return_value=httpx.Response(
        403, json={"detail": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard"}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "Exhausted balance" in info.value.message and "ORCH_FAL_API_KEY" in info.value.message
    assert info.value.retryable and info.value.charged == "no"


def test_the_key_is_taken_out_of_what_a_provider_says_before_any_request_carried_it(make_ctx: Any) -> None:
    # A process following work an earlier one started polls the queue URLs it saved, never the base
    # URL, whose requests taught the scrub the key: a status echoing it was kept in the job as sent.
    engine = FalEngine(make_ctx(fal_api_key="falkeyid-1234:falsecret-abcdef", fal_base_url="https://fal-proxy.test"))
    assert engine.said("proxy_error: Key falkeyid-1234:falsecret-abcdef") == "proxy_error: Key ***"


@respx.mock
async def test_downloads_from_a_cdn_that_is_down_share_one_deadline(engine: FalEngine, sleep: Any) -> None:
    # Each of n downloads retried to a deadline of its own, one after another: 3 x 60 s of a job
    # whose images fal had made, before it failed.
    engine.http.clock = sleep.clock
    _, _, result = happy_queue()
    result.mock(return_value=done(OUTPUTS))
    cdn = respx.get(url__startswith="https://v3.fal.media/").mock(side_effect=httpx.ConnectError("down"))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(n=3), NullProgress(), CancelToken())
    assert info.value.charged == "yes" and cdn.call_count >= 3
    assert sum(sleep.waits) <= 60 + 1  # the tests' ORCH_REMOTE_DEADLINE, not three of them


@respx.mock
async def test_a_cancel_ends_every_download_out(engine: FalEngine) -> None:
    # All are out at once and none answers: the cancel ends the job once the downloads' bound is past.
    engine.output_kept_seconds = 0.05
    _, _, result = happy_queue()
    result.mock(return_value=done(OUTPUTS))
    holds = [NoAnswer() for _ in OUTPUTS]
    for url, held in zip(OUTPUTS, holds, strict=True):
        respx.get(url).mock(side_effect=held)
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(n=3), NullProgress(), token))
    for held in holds:
        await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    assert info.value.charged == "yes"


@respx.mock
@pytest.mark.parametrize("where", ["submit", "result", "cancel"])
async def test_an_error_answer_of_megabytes_is_not_parsed_on_the_event_loop(
        engine: FalEngine, loop_parses: list[int], where: str) -> None:
    # A refusal's body (`_refused`: fal's validation list, for its types) and a cancel's answer
    # (`_cancel_remote`: ALREADY_COMPLETED?) were read whole as JSON on the event loop.
    body = b'{"detail": "no", "pad": ' + LARGE_ERROR_PADDING + b"}"
    large = httpx.Response(422 if where != "cancel" else 400, content=body,
                           headers={"content-type": "application/json"})
    submit, poll, result = happy_queue()
    token = CancelToken()
    if where == "submit":
        submit.mock(return_value=large)
    elif where == "result":
        result.mock(return_value=large)
    else:
        poll.mock(side_effect=cancel_at_poll(token, lambda: status("IN_PROGRESS")))
        respx.put(CANCEL).mock(return_value=large)
    with pytest.raises(Canceled if where == "cancel" else BadEngineInput):
        await engine.run(bridge(), NullProgress(), token)
    assert all(size < len(body) for size in loop_parses), loop_parses  # never the whole body


@respx.mock
async def test_a_content_policy_refusal_echoing_a_large_draft_is_still_content_filtered(engine: FalEngine) -> None:
    # fal's refusal echoes the flagged value (`input`): for the draft, its data URI, megabytes. A
    # bound on the body read for its types (as for other errors, 1 MiB) took it for bad input.
    _, _, result = happy_queue()
    draft = "data:image/png;base64," + "A" * 3 * 2**20
    result.mock(return_value=httpx.Response(422, json={"detail": [
        {"loc": ["body", "image_urls", 0], "msg": "The content was flagged by a content checker.",
         "type": "content_policy_violation", "input": draft}]}))
    with pytest.raises(ContentFiltered) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "flagged" in info.value.message and draft[:100] not in info.value.message


@respx.mock
async def test_a_cancel_while_outputs_download_keeps_their_images(engine: FalEngine) -> None:
    # fal made and billed every listed image (charged "yes"); the user's cancel came while two of
    # them were downloaded, which were dropped: the images paid for were lost, the first one only kept.
    _, _, result = happy_queue()
    result.mock(return_value=done(OUTPUTS))
    respx.get(OUTPUTS[0]).mock(return_value=httpx.Response(200, content=png_bytes((1, 1, 1))))
    holds = [HeldRequest(httpx.Response(200, content=png_bytes((i, i, i)))) for i in (2, 3)]
    for url, held in zip(OUTPUTS[1:], holds, strict=True):
        respx.get(url).mock(side_effect=held)
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(n=3), NullProgress(), token))
    for held in holds:
        await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    await asyncio.sleep(0.01)
    for held in holds:
        held.answer.set()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    assert all(held.answered and not held.dropped for held in holds)
    made = info.value.made
    assert made is not None and [image.image.getpixel((0, 0)) for image in made.images] == [(1, 1, 1), (2, 2, 2),
                                                                                          (3, 3, 3)]
    assert info.value.charged == "yes"


@respx.mock
@pytest.mark.parametrize("answered", ["images", "stored-failure", "never", "abandoned"])
async def test_a_cancel_while_a_completed_request_s_result_is_fetched_keeps_its_images(
        engine: FalEngine, answered: str) -> None:
    # The status said COMPLETED: fal made and billed the images the result lists. A user's cancel
    # while that result was fetched dropped the fetch, the images lost and the job charged unknown,
    # where a cancel a moment later, meeting their downloads, kept them.
    engine.output_kept_seconds = 0.05 if answered == "never" else 5.0
    _, _, result = happy_queue()
    answer = (httpx.Response(500, json={"detail": "boom"}, headers={"x-fal-error-type": "runner_server_error"})
              if answered == "stored-failure" else done(OUTPUTS[:2]))
    held = HeldRequest(answer)
    result.mock(side_effect=held)
    for i, url in enumerate(OUTPUTS[:2], start=1):
        respx.get(url).mock(return_value=httpx.Response(200, content=png_bytes((i, i, i))))
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(n=2), NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel(abandon=answered == "abandoned")
    await asyncio.sleep(0.01)
    if answered in ("images", "stored-failure"):
        held.answer.set()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    made = info.value.made
    if answered == "images":
        assert held.answered and not held.dropped
        assert made is not None and [image.image.getpixel((0, 0)) for image in made.images] == [(1, 1, 1), (2, 2, 2)]
        assert info.value.charged == "yes" and info.value.cost_millicredits is None
    elif answered == "stored-failure":  # fal bills no request that failed so
        assert made is None and info.value.charged == "no" and info.value.work_unbilled
    else:
        assert held.dropped and made is None and info.value.charged == "unknown"


@respx.mock
@pytest.mark.parametrize("last_seen", ["IN_QUEUE", "IN_PROGRESS"])
async def test_a_cancel_fal_answers_already_completed_keeps_the_request_s_images(
        engine: FalEngine, last_seen: str) -> None:
    # The request finished between the last poll and the user's cancel: fal answers the cancel
    # ALREADY_COMPLETED, its images made and billed. They were neither fetched nor kept, and the
    # job charged unknown, where Replicate's prediction a cancel finds succeeded is fetched and kept.
    token = CancelToken()
    _, poll, result = happy_queue()
    poll.mock(side_effect=cancel_at_poll(token, lambda: status(last_seen)))
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(400, json={"status": "ALREADY_COMPLETED"}))
    result.mock(return_value=done(OUTPUTS[:2]))
    for i, url in enumerate(OUTPUTS[:2], start=1):
        respx.get(url).mock(return_value=httpx.Response(200, content=png_bytes((i, i, i))))
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(engine.run(bridge(n=2), NullProgress(), token), 10)
    assert cancel.call_count == 1 and result.call_count == 1
    made = info.value.made
    assert made is not None and [image.image.getpixel((0, 0)) for image in made.images] == [(1, 1, 1), (2, 2, 2)]
    assert info.value.charged == "yes" and info.value.cost_millicredits is None


@respx.mock
async def test_a_cancel_fal_answers_already_completed_of_a_failed_request_releases_the_hold(
        engine: FalEngine) -> None:
    # What the request's result says settles it: a failure fal stored (a 5xx naming its type) is unbilled.
    token = CancelToken()
    _, poll, result = happy_queue()
    poll.mock(side_effect=cancel_at_poll(token, lambda: status("IN_PROGRESS")))
    respx.put(CANCEL).mock(return_value=httpx.Response(400, json={"status": "ALREADY_COMPLETED"}))
    result.mock(return_value=httpx.Response(500, json={"detail": "boom"},
                                            headers={"x-fal-error-type": "runner_server_error"}))
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(engine.run(bridge(), NullProgress(), token), 10)
    assert info.value.made is None and info.value.charged == "no" and info.value.work_unbilled


@respx.mock
async def test_a_request_given_up_on_whose_cancel_fal_answers_already_completed_has_its_images_kept(
        engine: FalEngine, output: respx.Route) -> None:
    # Polled to the deadline, the request is canceled at fal, which answers ALREADY_COMPLETED: it
    # finished after its last poll, its images made and billed. The job failed `timeout`, charged
    # unknown, its images neither fetched nor kept (Replicate fetches and keeps a prediction given
    # up on whose cancel answers that it succeeded).
    _, poll, result = happy_queue()
    poll.mock(side_effect=deadline_at_poll(engine, lambda: status("IN_PROGRESS")))
    cancel = respx.put(CANCEL).mock(return_value=httpx.Response(400, json={"status": "ALREADY_COMPLETED"}))
    got = await engine.run(bridge(), NullProgress(), CancelToken())
    assert cancel.call_count == 1 and result.call_count == 1 and output.call_count == 1
    assert len(got.images) == 1 and got.provider_request_id == "r-1"
