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

from orchestrator.errors import (
    BadEngineInput,
    Canceled,
    ContentFiltered,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    NoPrice,
)
from tests.tiers.conftest import (
    LARGE_ERROR_PADDING,
    FakeTime,
    HeldRequest,
    NoAnswer,
    RecordingProgress,
    bridge,
    cancel_at_poll,
    canceled_while_out,
    deadline_at_poll,
    png_bytes,
    until,
)
from tiers.base import CancelToken, NullProgress, before_billable_sends
from tiers.replicate import ReplicateEngine

BASE = "https://replicate.test"
CREATE = f"{BASE}/v1/models/google/nano-banana-2/predictions"
POLL = f"{BASE}/v1/predictions/p-1"
CANCEL = f"{BASE}/v1/predictions/p-1/cancel"
OUTPUT = "https://cdn.replicate.test/p-1/out.png"


def prediction(status: str = "succeeded", output: Any = OUTPUT, error: str | None = None) -> dict[str, Any]:
    return {"id": "p-1", "status": status, "output": output if status == "succeeded" else None,
            "error": error, "urls": {"get": POLL, "cancel": CANCEL}, "metrics": {"predict_time": 2.5}}


@pytest.fixture
def engine(make_ctx: Any, sleep: Any) -> ReplicateEngine:
    eng = ReplicateEngine(make_ctx(replicate_api_key="r-secret", replicate_base_url=BASE))
    eng.http.sleep = sleep
    eng.poll_interval = 0
    return eng


@pytest.fixture
def output() -> respx.Route:
    return respx.get(OUTPUT).mock(return_value=httpx.Response(200, content=png_bytes()))


@respx.mock
async def test_success_sends_draft_as_data_uri(engine: ReplicateEngine, output: respx.Route) -> None:
    route = respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction()))
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())

    request = route.calls.last.request
    assert request.headers["authorization"] == "Bearer r-secret"
    assert request.headers["prefer"] == "wait=30"  # half the tests' 60 s deadline
    # Replicate cancels it by itself after the deadline: a crash or a shutdown during the held create leaves no id.
    assert request.headers["cancel-after"] == "120s"
    sent = json.loads(request.content)["input"]
    assert sent["prompt"].endswith("a lighthouse")
    assert sent["aspect_ratio"] == "match_input_image" and sent["output_format"] == "png"
    assert sent["resolution"] == "1K"  # bridge() asks for 1024x1024
    prefix, _, data = sent["image_input"][0].partition(",")
    assert prefix == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).getpixel((0, 0)) == (255, 0, 0)
    # The key must not travel to the CDN that serves outputs.
    assert "authorization" not in output.calls.last.request.headers
    assert progress.request_ids == ["p-1"]
    assert len(result.images) == 1 and result.images[0].image.size == (64, 64)
    assert result.cost_millicredits is None and result.provider_request_id == "p-1"
    assert result.metadata["predict_time"] == 2.5


@respx.mock
async def test_a_draft_of_another_shape_goes_in_the_shape_asked(engine: ReplicateEngine, output: respx.Route) -> None:
    """`match_input_image` answers in the draft's shape: a square draft promoted to 3:2 came back square."""
    route = respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction()))
    await engine.run(bridge(width=1536, height=1024), NullProgress(), CancelToken())
    _, _, data = json.loads(route.calls.last.request.content)["input"]["image_input"][0].partition(",")
    sent = Image.open(io.BytesIO(base64.b64decode(data)))
    assert abs(sent.width / sent.height - 1.5) < 0.03


@respx.mock
async def test_output_list_and_data_uri(engine: ReplicateEngine) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction(output=[uri])))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1


@respx.mock
async def test_429_with_retry_after_then_success(
    engine: ReplicateEngine, sleep: Any, output: respx.Route
) -> None:
    throttled = httpx.Response(429, headers={"Retry-After": "25"},
                               json={"detail": "Request was throttled. Your rate limit resets in ~30s."})
    route = respx.post(CREATE).mock(side_effect=[throttled, httpx.Response(201, json=prediction())])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2 and sleep.waits == [25.0]
    assert len(result.images) == 1


@respx.mock
async def test_5xx_then_success(engine: ReplicateEngine, output: respx.Route) -> None:
    route = respx.post(CREATE).mock(side_effect=[httpx.Response(503), httpx.Response(201, json=prediction())])
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2


@respx.mock
@pytest.mark.parametrize("status", [500, 502, 504])
async def test_a_server_error_on_the_create_is_not_resent(engine: ReplicateEngine, status: int) -> None:
    # The create is held open (`Prefer: wait`): a gateway giving up on it, or a 500 while it
    # waited, says nothing of whether Replicate made the prediction (a 500 was sent again).
    # A 503, a request not handled, is (test_5xx_then_success).
    route = respx.post(CREATE).mock(side_effect=[httpx.Response(status), httpx.Response(201, json=prediction())])
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.charged == "unknown" and info.value.code == "engine_error"
    assert info.value.details["status"] == status and "not created again" in info.value.message


@respx.mock
async def test_a_gateway_error_on_a_poll_is_asked_again(engine: ReplicateEngine, output: respx.Route) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction(status="processing")))
    poll = respx.get(POLL).mock(side_effect=[httpx.Response(502), httpx.Response(200, json=prediction())])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert poll.call_count == 2 and len(result.images) == 1


@respx.mock
@pytest.mark.parametrize("unreadable", [1, 3])
async def test_a_poll_answered_with_what_cannot_be_read_is_asked_again_twice(
        engine: ReplicateEngine, output: respx.Route, unreadable: int) -> None:
    # One gateway page with a 200 ended a prediction about to succeed, and cancelled it, paid.
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction(status="processing")))
    poll = respx.get(POLL).mock(side_effect=[httpx.Response(200, text="<html>gateway</html>")] * unreadable
                                + [httpx.Response(200, json=prediction())])
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("canceled")))
    if unreadable < 3:
        result = await engine.run(bridge(), NullProgress(), CancelToken())
        assert len(result.images) == 1 and cancel.call_count == 0
    else:
        with pytest.raises(EngineError, match="not JSON"):
            await engine.run(bridge(), NullProgress(), CancelToken())
        assert cancel.call_count == 1  # given up: withdrawn
    assert poll.call_count == unreadable + (unreadable < 3)


@respx.mock
async def test_read_timeout_on_create_is_not_resent(engine: ReplicateEngine) -> None:
    route = respx.post(CREATE).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.charged == "unknown"


@respx.mock
async def test_read_timeout_on_poll_is_retried(
    engine: ReplicateEngine, sleep: Any, output: respx.Route
) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("starting")))
    poll = respx.get(POLL).mock(side_effect=[httpx.ReadTimeout("slow"),
                                             httpx.Response(200, json=prediction())])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert poll.call_count == 2 and len(sleep.waits) == 1
    assert len(result.images) == 1


@respx.mock
@pytest.mark.parametrize("prediction_id", ["../../../v1/account", "p-1?x=1", "p 1", "p" * 1_000_000, 42])
async def test_a_prediction_id_that_is_no_id_is_not_polled(engine: ReplicateEngine, prediction_id: Any) -> None:
    # The id goes into the path each poll sends the key to, and into the job's row: a faulty answer's
    # `../..` sent the key to another endpoint of the API, whose answer was read as the prediction.
    respx.post(CREATE).mock(return_value=httpx.Response(201, json={**prediction("starting"), "id": prediction_id}))
    anything = respx.get(url__startswith=BASE).mock(return_value=httpx.Response(200, json=prediction()))
    progress = RecordingProgress()
    with pytest.raises(EngineError, match="not a prediction") as info:
        await engine.run(bridge(), progress, CancelToken())
    assert info.value.charged == "unknown" and anything.call_count == 0 and progress.request_ids == []


@respx.mock
async def test_polls_through_several_states(engine: ReplicateEngine, output: respx.Route) -> None:
    # Any 2xx is the prediction: read as a refusal, it ran, and billed, for nobody.
    respx.post(CREATE).mock(return_value=httpx.Response(203, json=prediction("starting")))
    poll = respx.get(POLL).mock(side_effect=[
        httpx.Response(200, json=prediction("starting")),
        httpx.Response(200, json=prediction("processing")),
        httpx.Response(200, json=prediction("processing")),
        httpx.Response(203, json=prediction()),  # any 2xx is the prediction: read as an error, its image was lost
    ])
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())
    assert poll.call_count == 4 and len(result.images) == 1
    assert poll.calls.last.request.headers["authorization"] == "Bearer r-secret"
    assert progress.request_ids == ["p-1"]
    assert "processing" in progress.states


@respx.mock
@pytest.mark.parametrize("body", [
    {"id": "p-1"},
    ["not", "a", "prediction"],
])
async def test_malformed_body(engine: ReplicateEngine, body: Any) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=body))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_not_json(engine: ReplicateEngine) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, text="<html>"))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"  # created (201): the prediction may run and bill


@respx.mock
async def test_succeeded_without_output(engine: ReplicateEngine) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction(output=None)))
    with pytest.raises(EngineError, match="without an image") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "yes"
    assert not info.value.engine_fault  # the model's answer: not a reason to stop routing to Replicate


@respx.mock
async def test_an_output_lost_after_the_first_prediction_costs_that_prediction(engine: ReplicateEngine) -> None:
    create = respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction()))
    respx.get(OUTPUT).mock(return_value=httpx.Response(404))  # its CDN link had expired
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(n=2), NullProgress(), CancelToken())
    # Made and billed, the second never asked for: one prediction's price, not the two held.
    assert create.call_count == 1
    assert info.value.charged == "yes" and info.value.cost_millicredits == engine.estimate(bridge(n=1))


@respx.mock
async def test_content_filtered(engine: ReplicateEngine) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("processing")))
    respx.get(POLL).mock(return_value=httpx.Response(200, json=prediction(
        "failed", error="The input or output was flagged as sensitive. Please try again. (E005)")))
    with pytest.raises(ContentFiltered):
        await engine.run(bridge(), NullProgress(), CancelToken())


@respx.mock
async def test_a_failure_text_echoing_the_token_does_not_carry_it(engine: ReplicateEngine) -> None:
    # A model (or a proxy) that echoes the request's headers in the prediction's `error`: the job
    # error, its events and the log showed the token to every project key.
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("processing")))
    respx.get(POLL).mock(return_value=httpx.Response(200, json=prediction(
        "failed", error="crashed; request was authorization=Bearer r-secret")))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "r-secret" not in info.value.message and "authorization=***" in info.value.message


@respx.mock
async def test_an_odd_status_echoing_the_token_is_quoted_cut_and_without_it(engine: ReplicateEngine) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("processing")))
    respx.get(POLL).mock(return_value=httpx.Response(200, json={
        **prediction("processing"), "status": "proxy says: Bearer r-secret " + "x" * 5000}))
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("canceled")))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "r-secret" not in info.value.message and "r-secret" not in str(info.value.details)
    assert len(info.value.message) < 300
    assert cancel.call_count == 1  # a status not known to be settled: the prediction may run on


@respx.mock
async def test_failed_prediction(engine: ReplicateEngine) -> None:
    failed = prediction("failed", error="CUDA out of memory")
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=failed))
    with pytest.raises(EngineError, match="CUDA out of memory") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not isinstance(info.value, ContentFiltered)
    assert info.value.charged == "unknown"


@respx.mock
async def test_a_prediction_that_failed_before_it_started_costs_nothing(engine: ReplicateEngine) -> None:
    # Replicate bills a prediction's run: one that failed in setup, never started, made nothing to
    # bill by; captured as possibly billed, its job could not fall back.
    failed = {**prediction("failed", error="failed during setup"), "started_at": None, "metrics": {}}
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=failed))
    with pytest.raises(EngineError, match="failed during setup") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert (info.value.charged, info.value.retryable) == ("no", True)


@respx.mock
async def test_a_create_too_large_for_replicate_lets_another_engine_take_the_job(engine: ReplicateEngine) -> None:
    # The draft this engine inlined, not the user's input: failed as invalid_request, no fallback.
    respx.post(CREATE).mock(return_value=httpx.Response(413, json={"detail": "Request Entity Too Large"}))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert (info.value.charged, info.value.retryable, info.value.engine_fault) == ("no", True, False)


@respx.mock
@pytest.mark.parametrize(("answer", "charged", "retryable"), [
    (prediction("aborted"), "no", True),
    (prediction("canceled"), "unknown", False),
    # Its `Cancel-After` ran out while it waited for a machine: Replicate bills no time it never ran.
    ({**prediction("canceled"), "started_at": None, "metrics": {}}, "no", False),
], ids=["aborted", "canceled", "canceled-before-it-started"])
async def test_a_prediction_ended_by_the_provider_is_a_failure_not_a_cancel(
        engine: ReplicateEngine, answer: dict[str, Any], charged: str, retryable: bool) -> None:
    # Nobody canceled the job: it must not end `canceled`. Aborted (never ran, not charged) may
    # fall back to another engine; canceled on Replicate may have run and billed.
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=answer))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not isinstance(info.value, Canceled) and info.value.code == "engine_error"
    assert (info.value.charged, info.value.retryable) == (charged, retryable)
    # Replicate's word, believed of a prediction an earlier process made too (see the runner).
    assert info.value.work_unbilled == (charged == "no")


@respx.mock
async def test_401_fails_at_once_naming_the_setting(engine: ReplicateEngine, caplog: Any) -> None:
    route = respx.post(CREATE).mock(return_value=httpx.Response(
        401, json={"title": "Unauthenticated", "detail": "You did not pass a valid authentication token",
                   "status": 401}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    assert "REPLICATE_API_TOKEN" in info.value.message and "r-secret" not in info.value.message
    assert "r-secret" not in caplog.text


@respx.mock
@pytest.mark.parametrize("status", [400, 422])
async def test_bad_request_is_not_retried(engine: ReplicateEngine, status: int) -> None:
    route = respx.post(CREATE).mock(return_value=httpx.Response(
        status, json={"title": "Input validation failed", "detail": "- input.prompt: Invalid type",
                      "status": status}))
    with pytest.raises(BadEngineInput, match="Invalid type"):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1


@respx.mock
@pytest.mark.parametrize("abandon", [False, True], ids=["user-cancel", "shutdown"])
async def test_cancel_during_polling_cancels_the_prediction(engine: ReplicateEngine, abandon: bool) -> None:
    # A user's cancel stops the prediction; a shutdown (or a takeover) leaves it running for the
    # process that reattaches to it.
    token = CancelToken()
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("starting")))

    def poll(request: httpx.Request) -> httpx.Response:
        token.cancel(abandon=abandon)
        return httpx.Response(200, json=prediction("processing"))

    respx.get(POLL).mock(side_effect=poll)
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("canceled")))
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    assert info.value.charged == "unknown"
    assert cancel.call_count == (0 if abandon else 1)
    if not abandon:
        assert cancel.calls.last.request.headers["authorization"] == "Bearer r-secret"


def never_started(status: str = "canceled") -> dict[str, Any]:
    """What Replicate's cancel answers for a prediction that had not started running."""
    return {**prediction(status), "started_at": None, "metrics": {}}


@respx.mock
@pytest.mark.parametrize(("answer", "charged"), [
    (never_started(), "no"),
    (never_started("aborted"), "no"),
    ({**never_started(), "started_at": "2026-12-01T09:00:01Z", "metrics": {"predict_time": 0.4}}, "unknown"),
    (prediction("canceled"), "unknown"),       # says nothing of when it started
    (never_started("processing"), "unknown"),  # not stopped yet
], ids=["canceled-before-start", "aborted", "ran", "silent", "still-running"])
async def test_a_cancel_before_the_prediction_started_costs_nothing(
        engine: ReplicateEngine, output: respx.Route, answer: dict[str, Any], charged: str) -> None:
    # Replicate bills the time a prediction runs; one canceled while still starting never ran,
    # and was captured as possibly billed. With n=2, the first image was made and paid for.
    token = CancelToken()
    made = {**prediction(), "id": "p-0", "urls": {"get": f"{BASE}/v1/predictions/p-0"}}
    respx.post(CREATE).mock(side_effect=[httpx.Response(201, json=made),
                                         httpx.Response(201, json=prediction("starting"))])

    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("starting"))))
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=answer))
    req = bridge(n=2)
    with pytest.raises(Canceled) as info:
        await engine.run(req, NullProgress(), token)
    assert cancel.call_count == 1
    # The first image is billed either way; the second's share only when it may have run (None:
    # the whole hold is captured).
    assert info.value.charged == "unknown"
    assert info.value.cost_millicredits == (engine.estimate(req) // 2 if charged == "no" else None)


@respx.mock
async def test_a_cancel_of_a_lone_prediction_before_it_started_is_free(engine: ReplicateEngine) -> None:
    token = CancelToken()
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("starting")))

    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("starting"))))
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json=never_started()))
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    assert info.value.charged == "no" and info.value.work_unbilled  # the runner releases the hold, after a restart too


@respx.mock
async def test_a_deadline_before_the_prediction_started_leaves_the_job_to_another_engine(
        engine: ReplicateEngine) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("starting")))
    respx.get(POLL).mock(side_effect=deadline_at_poll(engine, lambda: httpx.Response(200, json=prediction("starting"))))
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json=never_started()))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "no" and info.value.retryable and info.value.work_unbilled


@respx.mock
@pytest.mark.parametrize("refusal", [httpx.Response(401, json={"detail": "bad token"}),
                                     httpx.Response(422, json={"detail": "cannot cancel"})])
async def test_a_failed_cancel_is_logged(engine: ReplicateEngine, caplog: pytest.LogCaptureFixture,
                                         refusal: httpx.Response) -> None:
    # Swallowed without a word, the prediction ran on and billed with nothing in the log.
    token = CancelToken()
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("starting")))

    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("processing"))))
    respx.post(CANCEL).mock(return_value=refusal)
    with caplog.at_level("WARNING", logger="tiers.replicate"), pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    assert info.value.charged == "unknown"
    assert any("canceling prediction p-1" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@respx.mock
@pytest.mark.parametrize("held", [True, False], ids=["held", "taken-over"])
async def test_deadline_during_polling_cancels_the_prediction_unless_another_process_follows_it(
        engine: ReplicateEngine, held: bool) -> None:
    # Taken over: this process was stopped past its lease, and the process following the
    # prediction now would see it canceled under it.
    now = [0.0]
    engine.http.clock = lambda: now[0]
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("starting")))

    def poll(request: httpx.Request) -> httpx.Response:
        now[0] += 100.0
        return httpx.Response(200, json=prediction("processing"))

    async def send() -> None:
        pass

    async def still_held() -> bool:
        return held

    respx.get(POLL).mock(side_effect=poll)
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("canceled")))
    with before_billable_sends(send, held=still_held), pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert cancel.call_count == (1 if held else 0) and info.value.charged == "unknown"



@respx.mock
async def test_a_seeded_model_gets_seed_plus_i_per_variation(make_ctx: Any, output: respx.Route) -> None:
    # Once every prediction of an n=3 job was sent seed 42: three identical paid images.
    flux = ReplicateEngine(make_ctx(replicate_api_key="k", replicate_base_url=BASE,
                                    replicate_model="black-forest-labs/flux-1.1-pro"))
    route = respx.post(f"{BASE}/v1/models/black-forest-labs/flux-1.1-pro/predictions").mock(
        return_value=httpx.Response(201, json=prediction()))
    result = await flux.run(bridge(n=3, seed=42), NullProgress(), CancelToken())
    assert [json.loads(c.request.content)["input"]["seed"] for c in route.calls] == [42, 43, 44]
    assert [image.seed for image in result.images] == [42, 43, 44]


@respx.mock
async def test_a_failure_after_a_paid_prediction_is_charged(engine: ReplicateEngine, output: respx.Route) -> None:
    # The first prediction was made and billed: the hold is captured (flagged), not released.
    respx.post(CREATE).mock(side_effect=[httpx.Response(201, json=prediction()),
                                         httpx.Response(422, json={"detail": "bad input"})])
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_an_output_url_refused_is_not_a_refused_key(engine: ReplicateEngine) -> None:
    """An expired signed URL (403 from the CDN, which sees no key) sent the operator to fix a key."""
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction()))
    respx.get(OUTPUT).mock(return_value=httpx.Response(403))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert type(info.value) is EngineError and info.value.charged == "yes"
    assert "downloading the output was refused (HTTP 403)" in info.value.message
    assert "ORCH_REPLICATE_API_KEY" not in info.value.message


def test_estimate_per_image_and_unknown_model(make_ctx: Any) -> None:
    eng = ReplicateEngine(make_ctx(replicate_api_key="k"))
    assert eng.estimate(bridge()) == 8000 and eng.estimate(bridge(n=2)) == 16000
    # A polish to 2K or 4K asks the model for that resolution and is priced at it.
    assert eng.estimate(bridge(stage="polish", width=2048, height=1536)) == 12000
    assert eng.estimate(bridge(stage="polish", width=4096, height=4096)) == 16000
    flux = ReplicateEngine(make_ctx(replicate_api_key="k", replicate_model="black-forest-labs/flux-1.1-pro"))
    assert flux.estimate(bridge()) == 4000
    # FLUX takes an aspect ratio only and answers about 1K: a 2K polish came back at that, paid.
    with pytest.raises(BadEngineInput, match="smaller than the 2048x1536 asked") as info:
        flux.estimate(bridge(stage="polish", width=2048, height=1536))
    assert info.value.retryable
    unknown = ReplicateEngine(make_ctx(replicate_api_key="k", replicate_model="someone/else"))
    with pytest.raises(NoPrice):
        unknown.estimate(bridge())


@respx.mock
async def test_a_polish_asks_for_the_resolution_of_the_size_requested(engine: ReplicateEngine,
                                                                     output: respx.Route) -> None:
    route = respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction()))
    await engine.run(bridge(stage="polish", width=2048, height=2048), NullProgress(), CancelToken())
    assert json.loads(route.calls.last.request.content)["input"]["resolution"] == "2K"


def test_unavailable_without_key(make_ctx: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    monkeypatch.delenv("ORCH_REPLICATE_API_KEY", raising=False)
    available, reason = ReplicateEngine(make_ctx()).availability()
    assert not available and reason and "REPLICATE_API_TOKEN" in reason


def numbered(i: int, status: str = "succeeded") -> dict[str, Any]:
    return {**prediction(status, output=f"https://cdn.replicate.test/p-{i}/out.png"), "id": f"p-{i}"}


@respx.mock
async def test_reattach_finishes_every_accepted_prediction_without_creating_any(engine: ReplicateEngine) -> None:
    create = respx.post(CREATE)
    respx.get(f"{BASE}/v1/predictions/p-1").mock(return_value=httpx.Response(200, json=numbered(1)))
    respx.get(f"{BASE}/v1/predictions/p-2").mock(side_effect=[httpx.Response(200, json=numbered(2, "processing")),
                                                              httpx.Response(200, json=numbered(2))])
    for i in (1, 2):
        respx.get(f"https://cdn.replicate.test/p-{i}/out.png").mock(
            return_value=httpx.Response(200, content=png_bytes()))
    progress = RecordingProgress()
    result = await engine.reattach(bridge(n=2), [{"id": "p-1"}, {"id": "p-2"}], progress, CancelToken())
    assert create.call_count == 0
    assert len(result.images) == 2 and result.provider_request_id == "p-1,p-2"
    assert progress.steps[-1] == (2, 2)


@respx.mock
async def test_reattach_with_fewer_predictions_than_images_sends_nothing(engine: ReplicateEngine) -> None:
    # The process died between two predictions: whether the second was sent is unknown.
    create = respx.post(CREATE)
    with pytest.raises(EngineError) as caught:
        await engine.reattach(bridge(n=2), [{"id": "p-1"}], NullProgress(), CancelToken())
    assert caught.value.charged == "unknown"
    assert create.call_count == 0


@respx.mock
@pytest.mark.parametrize("first_read", ["canceled", "failed"])  # failed: Replicate no longer has it
async def test_a_reattach_whose_first_read_ends_it_stops_the_prediction(engine: ReplicateEngine,
                                                                        first_read: str) -> None:
    """The first read was outside what stops a prediction we stop following: a cancel while it was
    out, or its failure, ended the job and left the prediction running (and billing)."""
    hang = NoAnswer()
    if first_read == "canceled":
        respx.get(POLL).mock(side_effect=hang)
    else:
        respx.get(POLL).mock(return_value=httpx.Response(404, json={"detail": "Not found."}))
    stop = respx.post(CANCEL).mock(return_value=httpx.Response(200, json={}))
    token = CancelToken()
    task = asyncio.ensure_future(engine.reattach(bridge(), [{"id": "p-1"}], NullProgress(), token))
    if first_read == "canceled":
        await hang.sent.wait()
        token.cancel()
    with pytest.raises(EngineError) as caught:
        await task
    assert isinstance(caught.value, Canceled) == (first_read == "canceled")
    assert caught.value.charged == "unknown" and stop.call_count == 1


@respx.mock
async def test_a_model_it_does_not_serve_lets_another_engine_try(engine: ReplicateEngine) -> None:
    route = respx.post(CREATE).mock(return_value=httpx.Response(
        404, json={"title": "Model not found", "detail": "The requested model does not exist"}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    error = info.value
    assert error.retryable and error.charged == "no" and route.call_count == 1
    assert error.details["setting"] == "ORCH_REPLICATE_MODEL" and "set ORCH_REPLICATE_MODEL" in error.message


@respx.mock
@pytest.mark.parametrize(("deadline", "wait"), [(300.0, 60), (40.0, 20), (1.0, 1)])
async def test_the_create_is_held_well_within_the_deadline(make_ctx: Any, sleep: Any, output: respx.Route,
                                                           deadline: float, wait: int) -> None:
    engine = ReplicateEngine(make_ctx(replicate_api_key="r-secret", replicate_base_url=BASE,
                                      remote_deadline=deadline))
    engine.http.sleep = sleep
    route = respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction()))
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.calls[0].request.headers["Prefer"] == f"wait={wait}"


@respx.mock
async def test_an_output_url_on_this_machine_is_not_fetched_and_the_prediction_is_paid(engine: ReplicateEngine) -> None:
    """The prediction ran (and was billed); its answer naming an internal address for the image
    gets no request from the service, whose answer the project could have read as an asset."""
    internal = "http://127.0.0.1:8080/admin?token=x"
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction(output=[internal])))
    admin = respx.get(internal).mock(return_value=httpx.Response(200, content=png_bytes()))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert admin.call_count == 0 and info.value.charged == "yes"
    assert "http://127.0.0.1 to fetch" in info.value.message and "token" not in info.value.message


@respx.mock
async def test_a_prediction_answering_several_images_gives_its_first_and_downloads_no_more(
        engine: ReplicateEngine, output: respx.Route) -> None:
    """One prediction per image, each with its seed: the rest of a list is neither fetched nor decoded."""
    others = respx.get(url__startswith="https://cdn.replicate.test/p-1/other").mock(
        return_value=httpx.Response(200, content=png_bytes()))
    listed = [OUTPUT, *(f"https://cdn.replicate.test/p-1/other-{i}.png" for i in range(20))]
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction(output=listed)))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1
    assert output.call_count == 1 and others.call_count == 0


@pytest.mark.parametrize(("accepted", "awaited"), [(1, True), (2, False), ("odd", True)])
def test_a_stop_waits_for_a_job_whose_predictions_were_not_all_accepted(
        engine: ReplicateEngine, accepted: int | str, awaited: bool) -> None:
    """With 1 of 2 predictions accepted, the stop left the job to a recovery that cannot follow it
    (the rest may or may not have been sent): failed, its estimate charged, its images lost."""
    from types import SimpleNamespace

    from orchestrator.models import Job
    from orchestrator.queue import Scheduler
    from orchestrator.runner import Claim
    from tiers.registry import EngineRegistry

    # "odd": a row the request cannot be rebuilt from (an older release's): waited for, not a failed stop.
    work = {"engine": "replicate", "handles": [{"id": f"p-{i}"} for i in range(accepted if isinstance(accepted, int)
                                                                             else 1)]}
    job = Job(id="job_1", project_id="prj_1", stage="bridge", engine="replicate", model="m", estimated=16_000,
              params={"stage": "bridge", "prompt": "x", "n": 2, "width": 1024, "height": 1024}, attempt=1)
    if accepted == "odd":
        job.params = {"stage": "bridge"}
    claim = Claim(job=job, attempt=1, cancel=CancelToken(), accepted=work)
    scheduler: Any = SimpleNamespace(registry=EngineRegistry({"replicate": engine}),
                                     runner=SimpleNamespace(storing=set()))
    scheduler._followed = lambda claim: Scheduler._followed(scheduler, claim)
    assert Scheduler._answer_awaited(scheduler, claim) is awaited


@respx.mock
async def test_withdraw_cancels_every_saved_prediction(engine: ReplicateEngine) -> None:
    # A job canceled while queued to be reattached: its predictions ran on until their Cancel-After.
    first = respx.post(CANCEL).mock(return_value=httpx.Response(200, json={}))
    second = respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(return_value=httpx.Response(500))
    # A failure is not raised:
    unbilled = await engine.withdraw([{"id": "p-1"}, {"id": "p-2"}, {"id": "../account"}, {}])
    assert first.call_count == 1 and second.call_count >= 1
    assert len(respx.calls) == first.call_count + second.call_count  # nothing sent for odd ids
    assert unbilled is False


@respx.mock
@pytest.mark.parametrize(("second", "unbilled"), [
    ({"status": "canceled", "started_at": None}, True),
    ({"status": "canceled", "started_at": "2026-12-04T10:00:00Z"}, False),
    ({"status": "canceled"}, False),  # says nothing of a start
    ({"status": "succeeded", "started_at": None}, False),
], ids=["never-started", "started", "unsaid", "succeeded"])
async def test_withdraw_says_unbilled_only_when_every_prediction_never_started(
        engine: ReplicateEngine, second: dict[str, Any], unbilled: bool) -> None:
    # Its job's estimate stayed charged for reconciliation although Replicate never ran the prediction.
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json={"id": "p-1", "status": "canceled",
                                                                   "started_at": None}))
    respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(return_value=httpx.Response(200, json={"id": "p-2", **second}))
    assert await engine.withdraw([{"id": "p-1"}, {"id": "p-2"}]) is unbilled
    assert await engine.withdraw([{"id": "p-1"}, {"id": "../account"}]) is False  # one not withdrawn


def never_ran(i: int) -> dict[str, Any]:
    return {**prediction("failed", error="no capacity"), "id": f"p-{i}", "started_at": None, "metrics": {}}


@respx.mock
async def test_a_reattach_follows_every_prediction_when_one_fails(engine: ReplicateEngine) -> None:
    # n=3 after a restart: p-1 gone at Replicate (404) ended the follow, p-2 and p-3 (made and
    # billed) were canceled instead of fetched, and the job kept none of their images.
    respx.get(POLL).mock(return_value=httpx.Response(404, json={"detail": "Not found."}))
    stop_first = respx.post(CANCEL).mock(return_value=httpx.Response(200, json={}))
    stop_others = respx.post(url__regex=rf"{BASE}/v1/predictions/p-[23]/cancel").mock(
        return_value=httpx.Response(200, json={}))
    respx.get(f"{BASE}/v1/predictions/p-2").mock(return_value=httpx.Response(200, json=numbered(2)))
    respx.get(f"{BASE}/v1/predictions/p-3").mock(return_value=httpx.Response(200, json=never_ran(3)))
    fetched = respx.get("https://cdn.replicate.test/p-2/out.png").mock(
        return_value=httpx.Response(200, content=png_bytes()))
    req = bridge(n=3)
    with pytest.raises(EngineError) as info:
        await engine.reattach(req, [{"id": f"p-{i}"} for i in (1, 2, 3)], NullProgress(), CancelToken())
    error = info.value
    assert stop_first.call_count == 1 and stop_others.call_count == 0 and fetched.call_count == 1
    assert error.made is not None and len(error.made.images) == 1
    # Billed at most for p-1 (unknown) and p-2 (made); p-3 never ran.
    assert error.charged == "unknown" and error.cost_millicredits == -(-engine.estimate(req) * 2 // 3)
    assert error.details["failed"] == 2 and "2 of 3 predictions failed, 1 made" in error.message


@respx.mock
async def test_a_reattach_whose_first_prediction_never_ran_keeps_the_later_images(
        engine: ReplicateEngine) -> None:
    respx.get(POLL).mock(return_value=httpx.Response(200, json=never_ran(1)))
    respx.get(f"{BASE}/v1/predictions/p-2").mock(return_value=httpx.Response(200, json=numbered(2)))
    respx.get("https://cdn.replicate.test/p-2/out.png").mock(return_value=httpx.Response(200, content=png_bytes()))
    stops = respx.post(url__regex=rf"{BASE}/v1/predictions/p-\d/cancel").mock(
        return_value=httpx.Response(200, json={}))
    req = bridge(n=2)
    with pytest.raises(EngineError) as info:
        await engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), CancelToken())
    assert info.value.made is not None and len(info.value.made.images) == 1
    assert info.value.charged == "unknown" and info.value.cost_millicredits == engine.estimate(req) // 2
    assert stops.call_count == 0


@respx.mock
@pytest.mark.parametrize("abandon", [False, True])
async def test_a_reattach_canceled_on_its_first_prediction_withdraws_the_rest_unless_another_follows_them(
        engine: ReplicateEngine, abandon: bool) -> None:
    # Abandoned (a stop, or another process took the job over), the predictions are that one's to follow.
    hang = NoAnswer()
    respx.get(POLL).mock(side_effect=hang)
    stop_first = respx.post(CANCEL).mock(return_value=httpx.Response(200, json={}))
    stop_second = respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(return_value=httpx.Response(200, json={}))
    token = CancelToken()
    task = asyncio.ensure_future(engine.reattach(bridge(n=2), [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), token))
    await hang.sent.wait()
    token.cancel(abandon=abandon)
    with pytest.raises(Canceled):
        await task
    assert (stop_first.call_count, stop_second.call_count) == ((0, 0) if abandon else (1, 1))


@respx.mock
async def test_a_cancel_while_the_create_is_held_cancels_the_prediction_it_answers_with(
        engine: ReplicateEngine, caplog: pytest.LogCaptureFixture) -> None:
    # Most cancels land while the create is held open: racing it away lost the prediction's id,
    # and the prediction ran (and billed) until its Cancel-After.
    caplog.set_level("INFO", logger="tiers.replicate")
    held = HeldRequest(httpx.Response(201, json=prediction("processing")))
    create = respx.post(CREATE).mock(side_effect=held)
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("canceled")))
    error = await canceled_while_out(engine, bridge(), held)
    assert error.charged == "unknown" and cancel.call_count == 0
    held.answer.set()
    await until(lambda: cancel.call_count > 0, then=0.05)
    assert held.answered and not held.dropped
    assert create.call_count == 1 and cancel.call_count == 1
    assert cancel.calls.last.request.headers["authorization"] == "Bearer r-secret"
    assert "prediction p-1, created after its job was canceled, is canceled" in caplog.text
    await engine.aclose()


@respx.mock
async def test_a_shutdown_while_the_create_is_held_leaves_the_prediction_to_whoever_follows_the_job(
        engine: ReplicateEngine) -> None:
    # Abandoned (a stop, or another process took the job over): as before, nothing is canceled.
    held = HeldRequest(httpx.Response(201, json=prediction("processing")))
    respx.post(CREATE).mock(side_effect=held)
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("canceled")))
    error = await canceled_while_out(engine, bridge(), held, abandon=True)
    assert error.charged == "unknown" and held.dropped
    held.answer.set()
    await asyncio.sleep(0.05)
    assert cancel.call_count == 0
    await engine.aclose()


@respx.mock
async def test_a_create_left_out_by_a_cancel_is_not_sent_again_after_a_503(engine: ReplicateEngine) -> None:
    # The create it was left to finish answers that nothing was made: nothing to cancel, and no retry.
    held = HeldRequest(httpx.Response(503, json={"detail": "busy"}))
    create = respx.post(CREATE).mock(side_effect=held)
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("canceled")))
    await canceled_while_out(engine, bridge(), held)
    held.answer.set()
    await until(lambda: held.answered, then=0.05)
    assert held.answered and create.call_count == 1 and cancel.call_count == 0
    await engine.aclose()


@respx.mock
async def test_closing_the_engine_ends_a_create_left_out_by_a_cancel(engine: ReplicateEngine) -> None:
    held = HeldRequest(httpx.Response(201, json=prediction("processing")))
    respx.post(CREATE).mock(side_effect=held)
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("canceled")))
    await canceled_while_out(engine, bridge(), held)
    await asyncio.sleep(0.05)
    assert not held.dropped  # still out, followed
    await engine.aclose()
    assert held.dropped and cancel.call_count == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()] == []


@respx.mock
async def test_a_reattach_whose_later_prediction_never_ran_charges_the_images_made(
        engine: ReplicateEngine, output: respx.Route) -> None:
    # n=2 followed after a restart: p-1 made its image, p-2 failed before it started (unbilled).
    # The whole estimate was captured, as `run` would never have for the same answers.
    respx.get(POLL).mock(return_value=httpx.Response(200, json=prediction()))
    respx.get(f"{BASE}/v1/predictions/p-2").mock(return_value=httpx.Response(200, json={
        **prediction("failed", error="no capacity"), "id": "p-2", "started_at": None, "metrics": {}}))
    req = bridge(n=2)
    with pytest.raises(EngineError) as info:
        await engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), CancelToken())
    assert info.value.charged == "unknown"
    assert info.value.cost_millicredits == engine.estimate(req) // 2
    assert info.value.made is not None and len(info.value.made.images) == 1


@respx.mock
async def test_a_reattach_whose_prediction_reads_an_unknown_status_stops_it(engine: ReplicateEngine) -> None:
    # A status Replicate added (neither pending nor settled as this code knows them): the job fails,
    # and nobody follows the prediction after it, which ran on and billed until its Cancel-After.
    respx.get(POLL).mock(return_value=httpx.Response(200, json={**prediction("booting"), "started_at": None}))
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json={**prediction("canceled"),
                                                                            "started_at": "2026-12-06T01:00:00Z"}))
    with pytest.raises(EngineError) as info:
        await engine.reattach(bridge(), [{"id": "p-1"}], NullProgress(), CancelToken())
    assert "unexpected prediction status 'booting'" in info.value.message
    assert info.value.charged == "unknown" and cancel.call_count == 1


@respx.mock
async def test_a_reattach_follows_its_predictions_under_one_deadline(engine: ReplicateEngine) -> None:
    # They run side by side at Replicate: each followed to a deadline of its own, one after another,
    # kept a job whose predictions never finish for n times ORCH_REMOTE_DEADLINE (60 s here).
    now = [0.0]
    engine.http.clock = lambda: now[0]

    def processing(request: httpx.Request) -> httpx.Response:
        now[0] += 25.0
        return httpx.Response(200, json=numbered(int(request.url.path.rsplit("-", 1)[1]), "processing"))

    polls = respx.get(url__regex=rf"{BASE}/v1/predictions/p-\d$").mock(side_effect=processing)
    stops = respx.post(url__regex=rf"{BASE}/v1/predictions/p-\d/cancel").mock(
        return_value=httpx.Response(200, json={}))
    with pytest.raises(EngineTimeout):
        await engine.reattach(bridge(n=3), [{"id": f"p-{i}"} for i in (1, 2, 3)], NullProgress(), CancelToken())
    assert stops.call_count == 3
    # p-1 read past the deadline (t=75), then p-2 and p-3 once each: how they stand is all there is time for.
    assert polls.call_count == 5 and now[0] == 125.0


@respx.mock
async def test_a_reattach_canceled_on_a_prediction_that_never_ran_is_charged_when_a_later_one_ran(
        engine: ReplicateEngine) -> None:
    # p-1 canceled before it started (free), p-2 canceled after it ran (billed): the job's cancel
    # said it cost nothing, and the ledger released the hold.
    hang = NoAnswer()
    respx.get(POLL).mock(side_effect=hang)
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json={**prediction("canceled"), "started_at": None,
                                                                   "metrics": {}}))
    respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(return_value=httpx.Response(200, json={
        **numbered(2, "canceled"), "started_at": "2026-12-07T08:00:00Z"}))
    token = CancelToken()
    task = asyncio.ensure_future(engine.reattach(bridge(n=2), [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), token))
    await hang.sent.wait()
    token.cancel()
    with pytest.raises(Canceled) as info:
        await task
    assert info.value.charged == "unknown" and not info.value.work_unbilled


@respx.mock
async def test_a_reattach_s_downloads_from_a_cdn_that_is_down_share_one_deadline(engine: ReplicateEngine,
                                                                                  sleep: Any) -> None:
    # Each prediction followed on its own: each download then waited out a deadline of its own, in turn.
    engine.http.clock = sleep.clock
    for i in (1, 2, 3):
        respx.get(f"{BASE}/v1/predictions/p-{i}").mock(return_value=httpx.Response(200, json=numbered(i)))
    cdn = respx.get(url__startswith="https://cdn.replicate.test/").mock(side_effect=httpx.ConnectError("down"))
    with pytest.raises(EngineError) as info:
        await engine.reattach(bridge(n=3), [{"id": f"p-{i}"} for i in (1, 2, 3)], NullProgress(), CancelToken())
    assert info.value.charged == "yes" and cdn.call_count >= 3
    assert sum(sleep.waits) <= 60 + 1  # the tests' ORCH_REMOTE_DEADLINE, not three of them


@respx.mock
@pytest.mark.parametrize("first", ["canceled", "never ran"])
async def test_a_reattach_canceled_charges_none_of_the_predictions_replicate_said_never_ran(
        engine: ReplicateEngine, first: str) -> None:
    # n=2: one prediction ran, the other Replicate said never ran (its cancel's answer, or its
    # failure before it started). The cancel captured the whole estimate all the same.
    unrun: dict[str, Any] = {"started_at": None, "metrics": {}}
    ran = {"started_at": "2026-12-07T08:00:00Z"}
    hang = NoAnswer()
    if first == "canceled":  # p-1 ran and is canceled while polled; p-2's cancel says it never started
        respx.get(POLL).mock(side_effect=hang)
        respx.post(CANCEL).mock(return_value=httpx.Response(200, json={**prediction("canceled"), **ran}))
        later = respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(
            return_value=httpx.Response(200, json={**numbered(2, "canceled"), **unrun}))
    else:  # p-1 failed before it started; p-2 ran and is canceled while polled
        respx.get(POLL).mock(return_value=httpx.Response(200, json=never_ran(1)))
        respx.get(f"{BASE}/v1/predictions/p-2").mock(side_effect=hang)
        later = respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(
            return_value=httpx.Response(200, json={**numbered(2, "canceled"), **ran}))
    token = CancelToken()
    req = bridge(n=2)
    task = asyncio.ensure_future(engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), token))
    await hang.sent.wait()
    token.cancel()
    with pytest.raises(Canceled) as info:
        await task
    assert later.call_count == 1
    assert info.value.charged == "unknown" and info.value.cost_millicredits == engine.estimate(req) // 2


@respx.mock
async def test_a_reattach_s_prediction_finishing_late_has_its_download_retried(engine: ReplicateEngine) -> None:
    # p-1 made, fetched at t=0; p-2 polled until t=75. The downloads' shared deadline (t=60) had run
    # out meanwhile: p-2's download got one attempt, and one 503 from the CDN lost its image, paid for.
    now = [0.0]
    engine.http.clock = lambda: now[0]
    respx.get(POLL).mock(return_value=httpx.Response(200, json=numbered(1)))
    answers = iter([numbered(2, "processing"), numbered(2, "processing"), numbered(2)])

    def p2(request: httpx.Request) -> httpx.Response:
        now[0] += 25.0
        return httpx.Response(200, json=next(answers))

    respx.get(f"{BASE}/v1/predictions/p-2").mock(side_effect=p2)
    respx.get("https://cdn.replicate.test/p-1/out.png").mock(return_value=httpx.Response(200, content=png_bytes()))
    cdn = respx.get("https://cdn.replicate.test/p-2/out.png").mock(
        side_effect=[httpx.Response(503), httpx.Response(200, content=png_bytes())])
    result = await engine.reattach(bridge(n=2), [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), CancelToken())
    assert now[0] == 75.0 and cdn.call_count == 2 and len(result.images) == 2


@respx.mock
async def test_a_poll_answering_another_prediction_is_not_taken_for_the_one_asked(engine: ReplicateEngine) -> None:
    # p-1's poll answered p-2's prediction (a cache, a proxy): its image was fetched and kept as
    # p-1's, the job ending with p-2's image twice and p-1 neither fetched nor stopped.
    polls = respx.get(POLL).mock(return_value=httpx.Response(200, json=numbered(2)))
    respx.get(f"{BASE}/v1/predictions/p-2").mock(return_value=httpx.Response(200, json=numbered(2)))
    cdn = respx.get(url__startswith="https://cdn.replicate.test/").mock(
        return_value=httpx.Response(200, content=png_bytes()))
    stop = respx.post(CANCEL).mock(return_value=httpx.Response(200, json={}))
    req = bridge(n=2)
    with pytest.raises(EngineError) as info:
        await engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), CancelToken())
    assert "polling p-1 answered another prediction ('p-2')" in info.value.message
    assert polls.call_count == 3 and stop.call_count == 1  # asked again, as an unreadable answer is; then stopped
    assert [str(call.request.url) for call in cdn.calls] == ["https://cdn.replicate.test/p-2/out.png"]
    assert info.value.made is not None and len(info.value.made.images) == 1
    assert info.value.charged == "unknown" and info.value.cost_millicredits is None  # p-1 may have run: both


@respx.mock
async def test_a_run_s_poll_answering_another_prediction_fails_it(engine: ReplicateEngine) -> None:
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("processing")))
    respx.get(POLL).mock(return_value=httpx.Response(200, json=numbered(2)))
    cdn = respx.get(url__startswith="https://cdn.replicate.test/")
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json={}))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and cdn.call_count == 0


@respx.mock
async def test_a_reattach_s_prediction_read_past_the_deadline_is_asked_again_after_a_503(
        engine: ReplicateEngine, output: respx.Route) -> None:
    # p-1 polled until t=75, past the shared deadline (60 s); p-2, succeeded long since, was then read
    # with a single attempt: one 503 stopped it and lost its image, made and paid for.
    now = [0.0]
    engine.http.clock = lambda: now[0]

    def processing(request: httpx.Request) -> httpx.Response:
        now[0] += 25.0
        return httpx.Response(200, json=prediction("processing"))

    respx.get(POLL).mock(side_effect=processing)
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json={}))
    second = respx.get(f"{BASE}/v1/predictions/p-2").mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json={**numbered(2), "output": OUTPUT})])
    with pytest.raises(EngineTimeout) as info:
        await engine.reattach(bridge(n=2), [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), CancelToken())
    assert now[0] == 75.0 and second.call_count == 2
    assert info.value.made is not None and len(info.value.made.images) == 1


@respx.mock
async def test_a_cancel_answering_another_prediction_says_nothing_of_the_one_canceled(
        engine: ReplicateEngine) -> None:
    # p-1's cancel answered p-2's prediction, canceled before it started (a cache, a proxy on the
    # wrong path): p-1, which may have run, was taken for free, and the job's hold released.
    token = CancelToken()
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("processing")))
    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("processing"))))
    other = {**never_started(), "id": "p-2"}
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json=other))
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    assert info.value.charged == "unknown" and not info.value.work_unbilled
    assert await engine.withdraw([{"id": "p-1"}]) is False  # a queued job's cancel judges it the same way


@respx.mock
async def test_a_reattach_canceled_stops_the_predictions_not_read_yet_side_by_side(engine: ReplicateEngine) -> None:
    # n=16 canceled on its first prediction: the other 15 were stopped one after another, each
    # cancel given up to 10 s, so with Replicate down the job's cancel took 104 s (fake clock).
    hang = NoAnswer()
    respx.get(POLL).mock(side_effect=hang)
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json={}))
    out, most = [0], [0]

    async def stop(request: httpx.Request) -> httpx.Response:
        out[0] += 1
        most[0] = max(most[0], out[0])
        for _ in range(20):  # answered once the others have had their turn to be sent
            await asyncio.sleep(0)
        out[0] -= 1
        return httpx.Response(200, json={**numbered(int(request.url.path.split("/")[-2][2:]), "canceled"),
                                         "started_at": None, "metrics": {}})

    stops = respx.post(url__regex=rf"{BASE}/v1/predictions/p-\d+/cancel").mock(side_effect=stop)
    token = CancelToken()
    req = bridge(n=16)
    task = asyncio.ensure_future(engine.reattach(req, [{"id": f"p-{i}"} for i in range(1, 17)], NullProgress(), token))
    await hang.sent.wait()
    token.cancel()
    with pytest.raises(Canceled) as info:
        await task
    assert stops.call_count == 15 and most[0] == 15
    # p-1 may have run; the 15 said they never started: one sixteenth of the hold.
    assert info.value.charged == "unknown" and info.value.cost_millicredits == -(-engine.estimate(req) // 16)
    assert await engine.withdraw([{"id": f"p-{i}"} for i in range(2, 17)]) is True and most[0] == 15


@respx.mock
@pytest.mark.parametrize("down", [httpx.Response(503), httpx.ConnectError("down")], ids=["503", "unreachable"])
async def test_a_reattach_stops_the_predictions_it_gives_up_on_side_by_side(
        engine: ReplicateEngine, down: httpx.Response | Exception) -> None:
    # n=16 after a restart with Replicate down: each prediction given up on was stopped before the
    # next one was read, each stop given up to 10 s, so the recovery took some 200 s (fake clock)
    # where the reads' budget is two ORCH_REMOTE_DEADLINEs (60 s here: the deadline, then the
    # late reads' share) and the stops' one more 10 s.
    fake = FakeTime()
    engine.http.clock, engine.http.sleep = fake.clock, fake.sleep
    answer = {"side_effect": down} if isinstance(down, Exception) else {"return_value": down}
    reads = respx.get(url__regex=rf"{BASE}/v1/predictions/p-\d+$").mock(**answer)
    stops = respx.post(url__regex=rf"{BASE}/v1/predictions/p-\d+/cancel").mock(**answer)
    req = bridge(n=16)
    with pytest.raises(EngineError) as info:
        await fake.run(engine.reattach(req, [{"id": f"p-{i}"} for i in range(1, 17)], NullProgress(), CancelToken()))
    assert fake.now <= 2 * 60 + 10 + 1
    # Each one read, and each stopped: none of them is left to run on unasked.
    assert {call.request.url.path for call in reads.calls} == {f"/v1/predictions/p-{i}" for i in range(1, 17)}
    assert {call.request.url.path for call in stops.calls} == {f"/v1/predictions/p-{i}/cancel" for i in range(1, 17)}
    assert info.value.charged == "unknown" and info.value.cost_millicredits is None  # all may have run
    assert info.value.details["failed"] == 16


@respx.mock
async def test_a_reattach_s_stop_sent_side_by_side_still_settles_a_prediction_that_never_ran(
        engine: ReplicateEngine) -> None:
    # p-1 gone at Replicate, its stop answered once p-2 was read: its "never started" still counts.
    respx.get(POLL).mock(return_value=httpx.Response(404, json={"detail": "Not found."}))
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json={**prediction("canceled"), "started_at": None,
                                                                   "metrics": {}}))
    respx.get(f"{BASE}/v1/predictions/p-2").mock(return_value=httpx.Response(200, json=numbered(2)))
    respx.get("https://cdn.replicate.test/p-2/out.png").mock(return_value=httpx.Response(200, content=png_bytes()))
    progress = RecordingWithdrawals()
    req = bridge(n=2)
    with pytest.raises(EngineError) as info:
        await engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], progress, CancelToken())
    assert progress.withdrawn_ids == ["p-1"]
    assert info.value.made is not None and len(info.value.made.images) == 1
    assert info.value.charged == "unknown" and info.value.cost_millicredits == engine.estimate(req) // 2


class RecordingWithdrawals(RecordingProgress):
    def __init__(self) -> None:
        super().__init__()
        self.withdrawn_ids: list[str] = []

    async def withdrawn(self, handles: list[dict[str, Any]]) -> None:
        self.withdrawn_ids.extend(str(handle["id"]) for handle in handles)


@respx.mock
@pytest.mark.parametrize("stopped", ["canceled", "succeeded"])
async def test_a_reattach_s_prediction_still_running_at_the_deadline_is_read_once_then_stopped(
        engine: ReplicateEngine, stopped: str) -> None:
    # n=3: p-1 polled past the shared deadline (t=75) and stopped before it started; p-2 read once
    # then, still processing, and stopped; p-3, finished long since but not read yet, is read and
    # kept. p-2's stop may answer that it finished in between ("succeeded", its output there):
    # its image, made and paid for, was lost with the job failing as if p-2 had.
    now = [0.0]
    engine.http.clock = lambda: now[0]

    def processing(request: httpx.Request) -> httpx.Response:
        now[0] += 25.0
        return httpx.Response(200, json=prediction("processing"))

    respx.get(POLL).mock(side_effect=processing)
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json={**prediction("canceled"), "started_at": None,
                                                                   "metrics": {}}))
    second = respx.get(f"{BASE}/v1/predictions/p-2").mock(
        return_value=httpx.Response(200, json=numbered(2, "processing")))
    ran = {"started_at": "2026-12-07T08:00:00Z"}
    second_stop = respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(
        return_value=httpx.Response(200, json={**numbered(2, stopped), **ran}))
    third = respx.get(f"{BASE}/v1/predictions/p-3").mock(return_value=httpx.Response(200, json=numbered(3)))
    third_stop = respx.post(f"{BASE}/v1/predictions/p-3/cancel")
    cdn = respx.get(url__regex=r"https://cdn\.replicate\.test/p-[23]/out\.png").mock(
        side_effect=lambda request: httpx.Response(200, content=png_bytes(
            (10, 200, 10) if "p-2" in request.url.path else (10, 10, 200))))
    req = bridge(n=3)
    with pytest.raises(EngineError) as info:
        await engine.reattach(req, [{"id": f"p-{i}"} for i in (1, 2, 3)], NullProgress(), CancelToken())
    assert now[0] == 75.0 and second.call_count == 1 and second_stop.call_count == 1
    assert third.call_count == 1 and third_stop.call_count == 0
    made = info.value.made
    assert made is not None
    # In the order of the predictions: p-2's image (when its stop found it made) before p-3's.
    assert [image.image.getpixel((0, 0)) for image in made.images] == (
        [(10, 200, 10), (10, 10, 200)] if stopped == "succeeded" else [(10, 10, 200)])
    assert cdn.call_count == len(made.images)
    # p-1 never started (free); p-2 ran (made, or may have billed), p-3 made: two of the three.
    assert info.value.charged == "unknown" and info.value.cost_millicredits == -(-engine.estimate(req) * 2 // 3)
    assert info.value.details["failed"] == (1 if stopped == "succeeded" else 2)


@respx.mock
async def test_a_prediction_that_succeeds_as_it_is_stopped_at_the_deadline_keeps_its_image(
        engine: ReplicateEngine, output: respx.Route) -> None:
    # Polled "processing" to the deadline, then stopped: the cancel answered that it had succeeded
    # meanwhile (its output there), and the job failed `timeout`, its image made and paid for lost.
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("starting")))
    processing = deadline_at_poll(engine, lambda: httpx.Response(200, json=prediction("processing")))
    respx.get(POLL).mock(side_effect=processing)
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("succeeded")))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert cancel.call_count == 1 and output.call_count == 1
    assert len(result.images) == 1 and result.provider_request_id == "p-1"


@respx.mock
async def test_a_reattach_cancelled_while_its_stops_are_answered_leaves_them_out(engine: ReplicateEngine) -> None:
    # 1a29997: "stops left out by a cancelled reattach are held until done". Those still out when
    # the reattach waited for their answers (its last step) were cut instead, the wait's gather
    # cancelling them with it: p-1, given up on, ran on, and billed, until its Cancel-After.
    respx.get(POLL).mock(return_value=httpx.Response(404, json={"detail": "Not found."}))
    held = HeldRequest(httpx.Response(200, json=prediction("canceled")))
    respx.post(CANCEL).mock(side_effect=held)
    respx.get(f"{BASE}/v1/predictions/p-2").mock(return_value=httpx.Response(200, json=numbered(2)))
    fetch = respx.get("https://cdn.replicate.test/p-2/out.png").mock(
        return_value=httpx.Response(200, content=png_bytes()))
    progress = RecordingProgress()
    reattach = asyncio.create_task(engine.reattach(bridge(n=2), [{"id": "p-1"}, {"id": "p-2"}], progress,
                                                   CancelToken()))
    await asyncio.wait_for(held.sent.wait(), 5)
    # p-2 read, fetched and kept: the reattach waits on p-1's stop.
    await until(lambda: fetch.called and bool(progress.steps))
    reattach.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reattach
    await asyncio.sleep(0)
    assert not held.dropped
    held.answer.set()
    await until(lambda: held.answered or held.dropped)
    assert held.answered and not held.dropped


@respx.mock
async def test_a_reattach_canceled_stops_the_prediction_it_reads_side_by_side_with_the_rest(
        engine: ReplicateEngine) -> None:
    # n=2 canceled while p-1 is polled, each cancel answered in 9 s (a slow Replicate): p-1's stop
    # was waited for before p-2's went out, so the job's cancel took 18 s (fake clock) to end it,
    # 20 s with Replicate down (each cancel given up to 10 s), n=16 no more than n=2.
    fake = FakeTime()
    engine.http.clock, engine.http.sleep = fake.clock, fake.sleep
    token = CancelToken()
    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("processing"))))
    out, most = [0], [0]

    async def stop(request: httpx.Request) -> httpx.Response:
        out[0] += 1
        most[0] = max(most[0], out[0])
        await fake.sleep(9)
        out[0] -= 1
        return httpx.Response(200, json={**numbered(int(request.url.path.split("/")[-2][2:]), "canceled"),
                                         "started_at": "2026-12-07T08:00:00Z"})

    stops = respx.post(url__regex=rf"{BASE}/v1/predictions/p-\d+/cancel").mock(side_effect=stop)
    with pytest.raises(Canceled) as info:
        await fake.run(engine.reattach(bridge(n=2), [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), token))
    assert {call.request.url.path for call in stops.calls} == {f"/v1/predictions/p-{i}/cancel" for i in (1, 2)}
    assert most[0] == 2 and fake.now == 9.0  # one cancel's time, not two in turn
    assert info.value.charged == "unknown" and info.value.cost_millicredits is None  # both ran


@respx.mock
@pytest.mark.parametrize("n", [1, 2])
async def test_a_cancel_answered_that_the_prediction_succeeded_keeps_its_image(
        engine: ReplicateEngine, output: respx.Route, n: int) -> None:
    # The cancel of a prediction that has ended answers it as it stands: "succeeded", its output
    # there. The job ended canceled, charged "unknown" for reconciliation, its image (made and
    # paid for) neither fetched nor kept. With n=2 the first image was made before.
    token = CancelToken()
    made = {**prediction(), "id": "p-0", "urls": {"get": f"{BASE}/v1/predictions/p-0"}}
    respx.post(CREATE).mock(side_effect=[httpx.Response(201, json=made)] * (n - 1)
                            + [httpx.Response(201, json=prediction("processing"))])
    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("processing"))))
    cancel = respx.post(CANCEL).mock(return_value=httpx.Response(200, json={**prediction("succeeded"),
                                                                            "started_at": "2026-12-07T08:00:00Z"}))
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(n=n), NullProgress(), token)
    assert cancel.call_count == 1 and output.call_count == n
    kept = info.value.made
    assert kept is not None and len(kept.images) == n and kept.provider_request_id == ",".join(
        ["p-0"] * (n - 1) + ["p-1"])
    # Every prediction asked for was made: billed as a success is, the whole estimate, nothing to reconcile.
    assert info.value.charged == "yes" and info.value.cost_millicredits is None


@respx.mock
async def test_a_cancel_answered_succeeded_whose_output_cannot_be_fetched_is_charged_as_made(
        engine: ReplicateEngine, caplog: pytest.LogCaptureFixture) -> None:
    token = CancelToken()
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("processing")))
    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("processing"))))
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json=prediction("succeeded")))
    cdn = respx.get(OUTPUT).mock(return_value=httpx.Response(404))
    with caplog.at_level("WARNING", logger="tiers.replicate"), pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    assert cdn.call_count >= 1 and info.value.made is None
    assert info.value.charged == "yes"  # billed: made, though lost
    assert any("could not be fetched" in record.getMessage() for record in caplog.records)


@respx.mock
@pytest.mark.parametrize("which", ["read", "not-read-yet"])
async def test_a_reattach_canceled_keeps_the_image_of_a_prediction_its_stop_found_made(
        engine: ReplicateEngine, which: str) -> None:
    # n=2 canceled while p-1 is read: the stop of p-1 (or of p-2, not read yet) answers that it had
    # succeeded; the other's that it never started. The made one's image was lost, charged "unknown".
    token = CancelToken()
    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("processing"))))
    unrun: dict[str, Any] = {"started_at": None, "metrics": {}}
    succeeded, unstarted = (1, 2) if which == "read" else (2, 1)
    respx.post(f"{BASE}/v1/predictions/p-{succeeded}/cancel").mock(
        return_value=httpx.Response(200, json={**numbered(succeeded), "started_at": "2026-12-07T08:00:00Z"}))
    respx.post(f"{BASE}/v1/predictions/p-{unstarted}/cancel").mock(
        return_value=httpx.Response(200, json={**numbered(unstarted, "canceled"), **unrun}))
    cdn = respx.get(f"https://cdn.replicate.test/p-{succeeded}/out.png").mock(
        return_value=httpx.Response(200, content=png_bytes()))
    req = bridge(n=2)
    with pytest.raises(Canceled) as info:
        await engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), token)
    assert cdn.call_count == 1
    assert info.value.made is not None and len(info.value.made.images) == 1
    # One made, the other never ran: half the estimate, known.
    assert info.value.charged == "yes" and info.value.cost_millicredits == engine.estimate(req) // 2


@respx.mock
async def test_a_reattach_canceled_keeps_the_image_of_a_prediction_given_up_on_that_its_stop_found_made(
        engine: ReplicateEngine, output: respx.Route) -> None:
    # p-1 gone from its read (404) and stopped, its stop answering that it had succeeded; the job
    # canceled while p-2 is read, p-2 never started. The cancel waited for p-1's stop and left
    # its image (made and paid for) unfetched, the job charged "unknown".
    token = CancelToken()
    respx.get(POLL).mock(return_value=httpx.Response(404, json={"detail": "Not found."}))
    ran = {"started_at": "2026-12-07T08:00:00Z"}
    respx.post(CANCEL).mock(return_value=httpx.Response(200, json={**prediction(), **ran}))
    respx.get(f"{BASE}/v1/predictions/p-2").mock(
        side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=numbered(2, "processing"))))
    respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(
        return_value=httpx.Response(200, json={**numbered(2, "canceled"), "started_at": None, "metrics": {}}))
    req = bridge(n=2)
    with pytest.raises(Canceled) as info:
        await engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), token)
    assert output.call_count == 1 and info.value.made is not None and len(info.value.made.images) == 1
    assert info.value.charged == "yes" and info.value.cost_millicredits == engine.estimate(req) // 2


@respx.mock
async def test_a_reattach_canceled_while_it_fetches_one_found_made_keeps_the_others_found_made(
        engine: ReplicateEngine) -> None:
    # p-1 and p-2 gone from their reads (404) and stopped, both stops answering that they had
    # succeeded; p-3 made. The job is canceled while p-1's output is downloaded: p-2, found made by
    # its stop as well, was left a failure, its image (made and paid for) not fetched, the job
    # charged "unknown" though every prediction was made.
    token = CancelToken()
    ran = {"started_at": "2026-12-07T08:00:00Z"}
    for i in (1, 2):
        respx.get(f"{BASE}/v1/predictions/p-{i}").mock(return_value=httpx.Response(404, json={"detail": "Not found."}))
        respx.post(f"{BASE}/v1/predictions/p-{i}/cancel").mock(
            return_value=httpx.Response(200, json={**numbered(i), **ran}))
    respx.get(f"{BASE}/v1/predictions/p-3").mock(return_value=httpx.Response(200, json=numbered(3)))

    async def canceled_while_fetched(request: httpx.Request) -> httpx.Response:
        token.cancel()
        await asyncio.sleep(0.01)  # the cancel reaches the job while the download is out
        return httpx.Response(200, content=png_bytes())

    respx.get("https://cdn.replicate.test/p-1/out.png").mock(side_effect=canceled_while_fetched)
    others = {i: respx.get(f"https://cdn.replicate.test/p-{i}/out.png").mock(
        return_value=httpx.Response(200, content=png_bytes())) for i in (2, 3)}
    req = bridge(n=3)
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(engine.reattach(req, [{"id": f"p-{i}"} for i in (1, 2, 3)], NullProgress(), token), 10)
    assert others[3].call_count == 1
    # p-1's download, out when the cancel came, is finished and kept as well (made and paid for).
    assert others[2].call_count == 1 and info.value.made is not None and len(info.value.made.images) == 3
    # Every prediction was made and billed: the whole hold, known.
    assert info.value.charged == "yes" and info.value.cost_millicredits is None


@respx.mock
@pytest.mark.parametrize("stop_answer", ["ran", "none"])
async def test_a_reattach_canceled_while_it_fetches_an_output_with_work_still_out_is_charged_unknown(
        engine: ReplicateEngine, stop_answer: str) -> None:
    # p-1 made; the job is canceled while its output is downloaded, p-2 not read yet. p-2's stop
    # answers that it was canceled having run (billed for its time, how much unknown), or is not
    # answered. The download's cancel says "yes" (p-1 was made), and "unknown" never lowered it:
    # the job was charged as known, its capture not flagged for reconciliation, p-2's share in it.
    token = CancelToken()
    respx.get(f"{BASE}/v1/predictions/p-1").mock(return_value=httpx.Response(200, json=numbered(1)))

    async def canceled_while_fetched(request: httpx.Request) -> httpx.Response:
        token.cancel()
        await asyncio.sleep(0.01)  # the cancel reaches the job while the download is out
        return httpx.Response(200, content=png_bytes())

    respx.get("https://cdn.replicate.test/p-1/out.png").mock(side_effect=canceled_while_fetched)
    stop = respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(
        return_value=httpx.Response(200, json={**numbered(2, "canceled"), "started_at": "2026-12-07T08:00:00Z"})
        if stop_answer == "ran" else httpx.Response(500))
    req = bridge(n=2)
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), token), 10)
    assert stop.call_count >= 1
    # p-1's download, out when the cancel came, is finished and its image kept (made and paid for).
    assert info.value.made is not None and len(info.value.made.images) == 1
    assert info.value.charged == "unknown"  # p-2 may have billed: for a person to reconcile
    assert info.value.cost_millicredits is None  # both images' share, as a ceiling


@respx.mock
@pytest.mark.parametrize("n", [1, 2])
async def test_a_cancel_while_a_made_prediction_s_output_downloads_keeps_its_image(engine: ReplicateEngine,
                                                                                  n: int) -> None:
    # The prediction succeeded (made and billed, charged "yes"); the user's cancel came while its
    # output was downloaded, which was dropped: the image paid for was lost. With n=2 the first
    # image was made before.
    made = {**prediction(), "id": "p-0", "output": "https://cdn.replicate.test/p-0/out.png"}
    respx.post(CREATE).mock(side_effect=[httpx.Response(201, json=made)] * (n - 1)
                            + [httpx.Response(201, json=prediction())])
    respx.get("https://cdn.replicate.test/p-0/out.png").mock(return_value=httpx.Response(200, content=png_bytes()))
    held = HeldRequest(httpx.Response(200, content=png_bytes((1, 2, 3))))
    respx.get(OUTPUT).mock(side_effect=held)
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(n=n), NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    await asyncio.sleep(0.01)
    held.answer.set()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    assert held.answered and not held.dropped
    kept = info.value.made
    assert kept is not None and len(kept.images) == n and kept.images[-1].image.getpixel((0, 0)) == (1, 2, 3)
    # Every prediction asked for was made: the whole estimate, nothing to reconcile.
    assert info.value.charged == "yes" and info.value.cost_millicredits is None


@respx.mock
async def test_a_cancel_while_an_output_downloads_waits_for_it_a_bounded_time(engine: ReplicateEngine) -> None:
    # A download that never answers: the cancel ends the job once the bound has passed, the image lost.
    engine.output_kept_seconds = 0.05
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction()))
    held = NoAnswer()
    respx.get(OUTPUT).mock(side_effect=held)
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(), NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    assert info.value.made is None and info.value.charged == "yes"


@respx.mock
async def test_a_cancel_s_answer_of_megabytes_is_not_parsed_on_the_event_loop(engine: ReplicateEngine,
                                                                              loop_parses: list[int]) -> None:
    # The cancel of a prediction that has ended answers it as it stands, its output inline (a data
    # URI, megabytes): `_cancel_remote` read it whole as JSON on the event loop.
    token = CancelToken()
    uri = "data:image/png;base64," + base64.b64encode(png_bytes((1, 2, 3))).decode()
    respx.post(CREATE).mock(return_value=httpx.Response(201, json=prediction("processing")))
    respx.get(POLL).mock(side_effect=cancel_at_poll(token, lambda: httpx.Response(200, json=prediction("processing"))))
    answer = json.dumps({**prediction(output=[uri]), "started_at": "2026-12-07T08:00:00Z"}).encode()
    body = answer[:-1] + b', "pad": ' + LARGE_ERROR_PADDING + b"}"
    respx.post(CANCEL).mock(return_value=httpx.Response(200, content=body,
                                                        headers={"content-type": "application/json"}))
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    kept = info.value.made
    assert kept is not None and kept.images[0].image.getpixel((0, 0)) == (1, 2, 3)  # the answer was read
    assert all(size < len(body) for size in loop_parses), loop_parses  # never the whole body


@respx.mock
@pytest.mark.parametrize("where", ["create", "poll"])
async def test_a_prediction_answer_of_megabytes_is_not_parsed_on_the_event_loop(
        engine: ReplicateEngine, loop_parses: list[int], where: str) -> None:
    # A succeeded prediction is answered whole, its output possibly inline (a data URI of megabytes),
    # by the create held open and by each poll: both were parsed on the event loop.
    uri = "data:image/png;base64," + base64.b64encode(png_bytes((1, 2, 3))).decode()
    body = json.dumps(prediction(output=[uri])).encode()[:-1] + b', "pad": ' + LARGE_ERROR_PADDING + b"}"
    large = httpx.Response(200 if where == "poll" else 201, content=body, headers={"content-type": "application/json"})
    respx.post(CREATE).mock(return_value=large if where == "create" else
                            httpx.Response(201, json=prediction("processing")))
    respx.get(POLL).mock(return_value=large)
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert result.images[0].image.getpixel((0, 0)) == (1, 2, 3)
    assert all(size < len(body) for size in loop_parses), loop_parses  # never the whole body


@respx.mock
async def test_a_reattach_canceled_while_an_output_downloads_stops_the_rest_meanwhile(
        engine: ReplicateEngine) -> None:
    # p-1 made, its output downloading when the user's cancel came; p-2 still running. The cancel
    # let p-1's download finish (up to 10 s) before p-2's stop went out: p-2 ran on (and billed)
    # those seconds, and the cancel took the download's 10 s on top of its stops' (30 s in all).
    token = CancelToken()
    respx.get(f"{BASE}/v1/predictions/p-1").mock(return_value=httpx.Response(200, json=numbered(1)))
    held = HeldRequest(httpx.Response(200, content=png_bytes((1, 2, 3))))
    respx.get("https://cdn.replicate.test/p-1/out.png").mock(side_effect=held)
    stopped = asyncio.Event()

    def stop_p2(_request: httpx.Request) -> httpx.Response:
        stopped.set()
        return httpx.Response(200, json={**numbered(2, "canceled"), "started_at": None, "metrics": {}})

    respx.post(f"{BASE}/v1/predictions/p-2/cancel").mock(side_effect=stop_p2)
    req = bridge(n=2)
    running = asyncio.create_task(engine.reattach(req, [{"id": "p-1"}, {"id": "p-2"}], NullProgress(), token))
    try:
        await asyncio.wait_for(held.sent.wait(), 5)
        token.cancel()
        await asyncio.wait_for(stopped.wait(), 5)  # p-2 is stopped while p-1's download is still out
        assert not held.answered
    finally:
        held.answer.set()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    made = info.value.made
    assert made is not None and [image.image.getpixel((0, 0)) for image in made.images] == [(1, 2, 3)]
    # p-1 made, p-2 never ran (not billed): p-1's share of the estimate, known.
    assert info.value.charged == "yes" and info.value.cost_millicredits == engine.estimate(req) // 2
