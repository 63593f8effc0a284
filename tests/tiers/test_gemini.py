from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import httpx
import pytest
import respx
from PIL import Image

from orchestrator.errors import (
    BadEngineInput,
    ContentFiltered,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    NoImage,
    NoPrice,
    RateLimited,
)
from tests.tiers.conftest import LARGE_ERROR_PADDING, LoopSpy, bridge, png_bytes
from tiers.base import CancelToken, NullProgress
from tiers.gemini import GeminiEngine

BASE = "https://gemini.test"
URL = f"{BASE}/v1beta/models/gemini-3.1-flash-image:generateContent"


def ok_body(data: bytes | None = None, urlsafe: bool = False) -> dict[str, Any]:
    raw = data or png_bytes()
    encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
    return {
        "candidates": [{"content": {"role": "model", "parts": [
            {"inlineData": {"mimeType": "image/png", "data": "AAAA"}, "thought": True},
            {"inlineData": {"mimeType": "image/png", "data": encoded}}]},
            "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 1300, "candidatesTokenCount": 1290, "totalTokenCount": 2590},
        "modelVersion": "gemini-3.1-flash-image", "responseId": "resp-1",
    }


@pytest.fixture
def engine(make_ctx: Any, sleep: Any) -> GeminiEngine:
    eng = GeminiEngine(make_ctx(gemini_api_key="g-secret", gemini_base_url=BASE))
    eng.http.sleep = sleep
    return eng


@respx.mock
async def test_success_sends_draft_inline_and_costs_from_usage(engine: GeminiEngine) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body(urlsafe=True)))
    result = await engine.run(bridge(), NullProgress(), CancelToken())

    sent = json.loads(route.calls.last.request.content)
    assert route.calls.last.request.headers["x-goog-api-key"] == "g-secret"
    parts = sent["contents"][0]["parts"]
    pixels = Image.open(io.BytesIO(base64.b64decode(parts[1]["inline_data"]["data"])))
    assert pixels.getpixel((0, 0)) == (255, 0, 0)
    assert sent["generationConfig"]["imageConfig"] == {"aspectRatio": "1:1", "imageSize": "1K"}
    assert len(result.images) == 1 and result.images[0].image.size == (64, 64)
    # 1290 x 6 mc + 1300 x 0.05 mc = 7740 + 65
    assert result.cost_millicredits == 7805
    assert result.provider_request_id == "resp-1"


@respx.mock
async def test_each_image_s_finish_reason_is_in_the_result(engine: GeminiEngine) -> None:
    # The candidate's `finishReason` was read only for an answer without an image, so no image's
    # record could say how its generation ended (`tiers.base.FINISH_REASONS`).
    said = ok_body()
    del said["candidates"][0]["finishReason"]  # an answer that says none
    respx.post(URL).mock(side_effect=[httpx.Response(200, json=ok_body()), httpx.Response(200, json=said)])
    result = await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert len(result.images) == 2 and result.metadata["finish_reasons"] == ["STOP", None]


@respx.mock
async def test_429_with_retry_info_then_success(engine: GeminiEngine, sleep: Any) -> None:
    throttled = httpx.Response(429, json={"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "27s"}]}})
    route = respx.post(URL).mock(side_effect=[throttled, httpx.Response(200, json=ok_body())])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2 and sleep.waits == [27.0]
    assert len(result.images) == 1


@respx.mock
async def test_5xx_then_success(engine: GeminiEngine) -> None:
    route = respx.post(URL).mock(side_effect=[httpx.Response(503), httpx.Response(200, json=ok_body())])
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2


DEADLINE_EXCEEDED = {"error": {"code": 504, "message": "Deadline expired before operation could complete.",
                              "status": "DEADLINE_EXCEEDED"}}


@respx.mock
async def test_google_deadline_exceeded_until_the_deadline_is_a_timeout(engine: GeminiEngine, sleep: Any) -> None:
    # Google's own 504 says its model gave up: retried (nothing was made or billed), and once the
    # retries run out the job failed `engine_error`, where a 408 fails it `timeout`.
    engine.http.clock = sleep.clock
    route = respx.post(URL).mock(return_value=httpx.Response(504, json=DEADLINE_EXCEEDED))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count > 1 and info.value.code == "timeout"
    assert info.value.charged == "no" and info.value.retryable  # another engine may take it
    assert "Deadline expired" in info.value.message and info.value.details["status"] == 504


@respx.mock
async def test_a_504_not_in_googles_shape_stays_an_engine_error(engine: GeminiEngine, sleep: Any) -> None:
    engine.http.clock = sleep.clock
    respx.post(URL).mock(return_value=httpx.Response(504, text="<html>Gateway Timeout</html>"))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.code == "engine_error" and info.value.charged == "no"


@respx.mock
async def test_deadline_exceeded_then_success(engine: GeminiEngine) -> None:
    route = respx.post(URL).mock(side_effect=[httpx.Response(504, json=DEADLINE_EXCEEDED),
                                              httpx.Response(200, json=ok_body())])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2 and len(result.images) == 1


@respx.mock
async def test_read_timeout_is_not_resent(engine: GeminiEngine) -> None:
    route = respx.post(URL).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.charged == "unknown"


@respx.mock
@pytest.mark.parametrize("response", [
    httpx.Response(200, text="<html>"),
    httpx.Response(200, json={"candidates": []}),
    httpx.Response(200, json={**ok_body(data=b"not a png"), "usageMetadata": {}}),
    httpx.Response(200, json="an image"),
])
async def test_a_broken_answer_is_charged(engine: GeminiEngine, response: httpx.Response) -> None:
    # Gemini answered 200, so it may have billed: the hold is captured and nothing is re-sent.
    route = respx.post(URL).mock(return_value=response)
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and route.call_count == 1
    assert info.value.details["engine"] == "gemini"  # which engine's answer a person reconciles


@respx.mock
@pytest.mark.parametrize("status", [201, 203])
async def test_any_2xx_is_read_as_the_answer(engine: GeminiEngine, status: int) -> None:
    # Taken for a refusal, an image made (and billed) was dropped and its hold released.
    respx.post(URL).mock(return_value=httpx.Response(status, json=ok_body()))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1 and result.cost_millicredits == 7805


@respx.mock
@pytest.mark.parametrize("response", [httpx.Response(202), httpx.Response(304, json=ok_body())])
async def test_an_answer_neither_read_nor_refused_is_charged(engine: GeminiEngine, response: httpx.Response) -> None:
    route = respx.post(URL).mock(return_value=response)
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and route.call_count == 1
    assert info.value.details == {"engine": "gemini", "status": response.status_code}
    assert base64.b64encode(png_bytes()).decode()[:40] not in str(info.value)  # no image quoted as the reason


@respx.mock
@pytest.mark.parametrize("body", [{"candidates": []}, {"usageMetadata": {"promptTokenCount": 1300}}])
async def test_an_answer_without_candidates_is_no_image(engine: GeminiEngine, body: dict[str, Any]) -> None:
    # "HTTP 200 without an image is a failure (content_filtered or no_image)" (providers.md): as
    # engine_error it counted against the engine's circuit, as an engine unwell.
    respx.post(URL).mock(return_value=httpx.Response(200, json=body))
    with pytest.raises(NoImage) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.code == "no_image" and not info.value.engine_fault and info.value.charged != "no"


@respx.mock
async def test_a_broken_image_is_charged_its_reported_tokens(engine: GeminiEngine) -> None:
    respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body(data=b"not a png")))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "yes"
    assert info.value.cost_millicredits == engine._actual_cost(ok_body()["usageMetadata"])


@respx.mock
@pytest.mark.parametrize("body", [
    {"candidates": "no"},
    {"candidates": {"0": {}}},
    {"candidates": ["no"]},
    {"candidates": [{"content": [{"inlineData": {"data": "AAAA"}}]}]},
    {"candidates": [{"content": {"parts": {"inlineData": {"data": "AAAA"}}}}]},
    {"candidates": [{"content": {"parts": [{"inlineData": "AAAA"}]}}]},
    {"candidates": [{"content": {"parts": []}, "finishReason": ["IMAGE_SAFETY"]}]},
    {"promptFeedback": "SAFETY"},
])
async def test_an_answer_of_another_shape_is_charged(engine: GeminiEngine, body: dict[str, Any]) -> None:
    """Once an AttributeError (a job failed "unexpectedly", with a traceback): the engine's error for
    a 200 it cannot read, charged since Gemini may have billed it."""
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=body))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not isinstance(info.value, ContentFiltered)
    assert info.value.charged == "unknown" and route.call_count == 1


@respx.mock
@pytest.mark.parametrize("parts", [
    [{"text": "Here is a description of the image instead."}],
    [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}, "thought": True}],  # only its thought
])
async def test_an_answer_without_an_image_costs_its_tokens(engine: GeminiEngine, parts: list[Any]) -> None:
    """Google bills an answer's tokens whether or not it holds an image: the usage block prices the
    failed call (it was the image's whole estimate, 27 times this one's reported cost)."""
    usage = {"promptTokenCount": 1300, "candidatesTokenCount": 40}
    no_image = {"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}], "usageMetadata": usage}
    respx.post(URL).mock(side_effect=[httpx.Response(200, json=ok_body()), httpx.Response(200, json=no_image)])
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(n=2), NullProgress(), CancelToken())
    first = engine._actual_cost(ok_body()["usageMetadata"])
    second = engine._actual_cost(usage)
    assert first and second and second < engine.estimate(bridge()) // 10
    assert info.value.charged == "yes" and info.value.cost_millicredits == first + second
    # The model's answer to this prompt, not the engine unwell: not counted by its circuit.
    assert not info.value.engine_fault


@respx.mock
async def test_an_image_the_safety_filter_withheld_costs_the_tokens_it_reports(engine: GeminiEngine) -> None:
    # Generated, then withheld: its usage reports the image's tokens, which Google bills; the
    # hold was released as if nothing had been made.
    usage = {"promptTokenCount": 1300, "candidatesTokenCount": 1290}
    withheld = {"candidates": [{"content": {"parts": []}, "finishReason": "IMAGE_SAFETY"}], "usageMetadata": usage}
    respx.post(URL).mock(return_value=httpx.Response(200, json=withheld))
    with pytest.raises(ContentFiltered) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "yes" and info.value.cost_millicredits == engine._actual_cost(usage)


@respx.mock
async def test_a_withheld_image_whose_cost_cannot_be_summed_is_possibly_billed(engine: GeminiEngine) -> None:
    # Thinking tokens with no price for them: no sum, and the withheld image was released as free.
    usage = {"promptTokenCount": 1300, "candidatesTokenCount": 1290, "thoughtsTokenCount": 200}
    withheld = {"candidates": [{"content": {"parts": []}, "finishReason": "IMAGE_SAFETY"}], "usageMetadata": usage}
    respx.post(URL).mock(return_value=httpx.Response(200, json=withheld))
    with pytest.raises(ContentFiltered) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_a_prompt_blocked_before_anything_was_generated_costs_nothing(engine: GeminiEngine) -> None:
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 1300}}
    respx.post(URL).mock(return_value=httpx.Response(200, json=blocked))
    with pytest.raises(ContentFiltered) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "no" and info.value.cost_millicredits is None


@respx.mock
async def test_an_answer_without_an_image_after_one_of_unknown_cost_is_not_settled(engine: GeminiEngine) -> None:
    # The first image's cost unreported: its usage alone would have settled the job for far less.
    no_usage = {k: v for k, v in ok_body().items() if k != "usageMetadata"}
    no_image = {"candidates": [{"content": {"parts": [{"text": "no"}]}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 1300, "candidatesTokenCount": 40}}
    respx.post(URL).mock(side_effect=[httpx.Response(200, json=no_usage), httpx.Response(200, json=no_image)])
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"  # for a person to reconcile: the whole estimate at most
    assert info.value.cost_millicredits in (None, engine.estimate(bridge(n=2)))


@respx.mock
# Each count the engine reads; the values a count may not be are `token_counts`' (test_cloud.py).
@pytest.mark.parametrize(("key", "count"), [
    ("candidatesTokenCount", "1e400"),  # an infinity to json.loads: int() raised OverflowError
    ("promptTokenCount", "true"),
    ("thoughtsTokenCount", "-5"),
])
async def test_token_counts_that_are_not_counts_charge_the_estimate(engine: GeminiEngine, key: str,
                                                                    count: str) -> None:
    usage = {"promptTokenCount": 1300, "candidatesTokenCount": 1290, key: "COUNT"}
    text = json.dumps({**ok_body(), "usageMetadata": usage}).replace('"COUNT"', count)
    respx.post(URL).mock(return_value=httpx.Response(200, text=text, headers={"content-type": "application/json"}))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    # The image is kept, and the ledger captures the hold, flagged for the invoice to settle.
    assert len(result.images) == 1 and result.cost_millicredits is None
    assert result.cost_unread is not None and "not counts" in result.cost_unread


@respx.mock
async def test_a_failure_after_a_paid_image_is_charged(engine: GeminiEngine) -> None:
    refused = httpx.Response(400, json={"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "no"}})
    respx.post(URL).mock(side_effect=[httpx.Response(200, json=ok_body()), refused])
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(n=2), NullProgress(), CancelToken())
    # The first image was made and billed, its usage says for how much; the refused second was
    # not billed: that is the bill, no share of the estimate captured for a person to reconcile.
    assert info.value.charged == "yes"
    assert info.value.cost_millicredits == engine._actual_cost(ok_body()["usageMetadata"])


@respx.mock
async def test_a_failure_after_a_paid_image_of_unknown_cost_captures_a_share(engine: GeminiEngine) -> None:
    no_usage = {k: v for k, v in ok_body().items() if k != "usageMetadata"}
    refused = httpx.Response(400, json={"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "no"}})
    respx.post(URL).mock(side_effect=[httpx.Response(200, json=no_usage), refused])
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"  # the first image was made and billed, for how much unsaid
    # ... and the refused second was not: at most half the estimate is captured.
    assert info.value.cost_millicredits == engine.estimate(bridge(n=2)) // 2


@respx.mock
@pytest.mark.parametrize("body", [
    {"candidates": [{"content": {"parts": [{"text": "no"}]}, "finishReason": "IMAGE_SAFETY"}]},
    {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}},
])
async def test_content_filtered(engine: GeminiEngine, body: dict[str, Any]) -> None:
    respx.post(URL).mock(return_value=httpx.Response(200, json=body))
    with pytest.raises(ContentFiltered) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "no"  # Gemini bills no image it did not make


@respx.mock
async def test_401_fails_at_once_naming_the_setting(engine: GeminiEngine, caplog: Any) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(403, json={"error": {"message": "denied"}}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    assert "GEMINI_API_KEY" in info.value.message and "g-secret" not in info.value.message
    assert "g-secret" not in caplog.text


@respx.mock
async def test_bad_request_is_not_retried(engine: GeminiEngine) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(400, json={"error": {"message": "bad size"}}))
    with pytest.raises(BadEngineInput, match="bad size"):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1



@respx.mock
async def test_a_retired_model_lets_another_engine_try(engine: GeminiEngine) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(404, json={"error": {
        "code": 404, "message": "models/gemini-3.1-flash-image is not found for API version v1beta",
        "status": "NOT_FOUND"}}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    error = info.value
    assert error.retryable and error.charged == "no" and route.call_count == 1
    assert "is not found" in error.message and error.details["setting"] == "ORCH_GEMINI_MODEL"


def test_estimate_by_size_and_unknown_model(make_ctx: Any) -> None:
    eng = GeminiEngine(make_ctx(gemini_api_key="k"))
    assert eng.estimate(bridge(width=1024, height=1024)) < eng.estimate(bridge(width=2048, height=1536))
    unknown = GeminiEngine(make_ctx(gemini_api_key="k", gemini_model="gemini-9-image"))
    with pytest.raises(NoPrice):
        unknown.estimate(bridge())


@respx.mock
@pytest.mark.parametrize(("width", "height", "size"), [
    (1344, 768, "1K"), (1584, 672, "1K"), (848, 1264, "1K"), (1200, 896, "1K"),  # Google's 1K sizes
    (1088, 1088, "2K"),  # more than 1K holds: 1K's 1024 would be stretched
    (2048, 512, "2K"),  # thinner than 21:9: 1K's 1584 wide would be stretched to 2048
    (2752, 1536, "2K"), (2048, 2048, "2K"), (4096, 2304, "4K"),
])
async def test_a_wide_image_is_asked_for_and_held_at_the_class_of_its_pixels(
        engine: GeminiEngine, width: int, height: int, size: str) -> None:
    # By its long side, a 16:9 image of 1K's own size was asked for, held and billed at 2K.
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body()))
    await engine.run(bridge(width=width, height=height), NullProgress(), CancelToken())
    assert json.loads(route.calls.last.request.content)["generationConfig"]["imageConfig"]["imageSize"] == size
    square = {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (4096, 4096)}[size]
    assert engine.estimate(bridge(width=width, height=height)) == engine.estimate(bridge(width=square[0],
                                                                                         height=square[1]))


def test_the_2_5_model_is_not_asked_for_more_than_the_1k_it_makes(make_ctx: Any) -> None:
    # It takes no imageSize: a 2048 polish came back at about 1024, its source's size, and paid for.
    legacy = GeminiEngine(make_ctx(gemini_api_key="k", gemini_model="gemini-2.5-flash-image"))
    with pytest.raises(BadEngineInput, match="smaller than the 2048x2048 asked") as info:
        legacy.estimate(bridge(width=2048, height=2048))
    assert info.value.retryable  # another engine may make it
    assert legacy.estimate(bridge(width=1024, height=576)) > 0
    assert GeminiEngine(make_ctx(gemini_api_key="k")).estimate(bridge(width=2048, height=2048)) > 0
    older = GeminiEngine(make_ctx(gemini_api_key="k", gemini_model="gemini-2.0-flash-preview-image-generation"))
    assert not older._sized()  # only the Gemini 3 image models take a size (the rule once left 2.0 out)


@respx.mock
@pytest.mark.parametrize(("model", "width", "tokens"), [
    # providers.md: image tokens 1120/1680/2520 (3.1-flash 1K/2K/4K), 1120 (3-pro 1K/2K), 1290 (2.5-flash);
    # its 1K example answer bills 170 more than that.
    ("gemini-3.1-flash-image", 1024, 1120 + 170), ("gemini-3.1-flash-image", 4096, 2520 + 170),
    ("gemini-3-pro-image", 2048, 1120 + 170), ("gemini-2.5-flash-image", 1024, 1290 + 170)])
async def test_the_hold_covers_what_the_provider_reports(make_ctx: Any, model: str, width: int, tokens: int) -> None:
    # The table's per-image prices are rounded from token counts; the capture is the token cost.
    engine = GeminiEngine(make_ctx(gemini_api_key="k", gemini_base_url=BASE, gemini_model=model))
    body = {**ok_body(), "usageMetadata": {"promptTokenCount": 1300, "candidatesTokenCount": tokens}}
    respx.post(f"{BASE}/v1beta/models/{model}:generateContent").mock(return_value=httpx.Response(200, json=body))
    req = bridge(width=width, height=width)
    result = await engine.run(req, NullProgress(), CancelToken())
    assert result.cost_millicredits is not None
    assert result.cost_millicredits <= engine.estimate(req)
    await engine.aclose()


def test_unavailable_without_key(make_ctx: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    available, reason = GeminiEngine(make_ctx()).availability()
    assert not available and reason and "GEMINI_API_KEY" in reason


@respx.mock
async def test_a_daily_quota_is_final_at_once(engine: GeminiEngine, sleep: Any) -> None:
    # providers.md: a per-day quota is final until reset. Retrying it burned the whole deadline
    # before routing could try another engine.
    engine.http.clock = sleep.clock
    body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota exceeded", "details": [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
            {"quotaMetric": "generativelanguage.googleapis.com/generate_requests_per_model_per_day",
             "quotaId": "GenerateRequestsPerDayPerProjectPerModel"}]}]}}
    route = respx.post(URL).mock(return_value=httpx.Response(429, json=body))
    with pytest.raises(RateLimited) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and sleep.waits == []
    assert info.value.charged == "no" and info.value.retryable  # routing may use another engine


@respx.mock
async def test_prepaid_credits_used_up_are_final_and_leave_the_job_to_another_engine(
        engine: GeminiEngine, sleep: Any) -> None:
    # Retried as a rate limit until half the deadline (11 sends, 133 s) before each job fell back.
    engine.http.clock = sleep.clock
    body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": (
        "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to manage "
        "your project and billing.")}}
    route = respx.post(URL).mock(return_value=httpx.Response(429, json=body))
    with pytest.raises(EngineUnavailable, match="prepaid credits are used up") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and sleep.waits == []
    assert info.value.charged == "no" and info.value.retryable


@respx.mock
async def test_a_key_with_a_trailing_newline_or_a_byte_order_mark_still_works(make_ctx: Any) -> None:
    engine = GeminiEngine(make_ctx(gemini_api_key="\ufeffg-secret\n", gemini_base_url=BASE))
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body()))
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.calls.last.request.headers["x-goog-api-key"] == "g-secret"


@respx.mock
@pytest.mark.parametrize("body", [{"error": "Too many requests"}, "slow down", {"error": {"details": [
    {"violations": ["per day", None]}, "QuotaFailure"]}}])
async def test_a_429_in_another_shape_is_retried_like_any_other(engine: GeminiEngine, body: Any) -> None:
    # A gateway's or proxy's 429 said nothing was made; read as Google's, it crashed the engine
    # (charged unknown, no fallback).
    route = respx.post(URL).mock(side_effect=[httpx.Response(429, json=body), httpx.Response(200, json=ok_body())])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2 and len(result.images) == 1


@respx.mock
async def test_thinking_tokens_are_charged_at_their_price_or_the_estimate_is(make_ctx: Any) -> None:
    usage = {"promptTokenCount": 1300, "candidatesTokenCount": 1290, "thoughtsTokenCount": 900}
    respx.post(URL).mock(return_value=httpx.Response(200, json={**ok_body(), "usageMetadata": usage}))
    ctx = make_ctx(gemini_api_key="k", gemini_base_url=BASE)
    engine = GeminiEngine(ctx)
    req = bridge()
    # No price for them: the estimate, never a sum that leaves them out.
    assert (await engine.run(req, NullProgress(), CancelToken())).cost_millicredits is None
    ctx.price_overrides["gemini"] = {"gemini-3.1-flash-image": {"thinking_tokens_per_million": 300}}
    engine = GeminiEngine(ctx)
    cost = (await engine.run(req, NullProgress(), CancelToken())).cost_millicredits
    # Credits per million tokens, in millicredits.
    assert cost == math.ceil((1290 * 6000 + 1300 * 50 + 900 * 300) * 1000 / 1e6)


def test_a_model_priced_per_image_only_is_routable(make_ctx: Any) -> None:
    ctx = make_ctx(gemini_api_key="k", gemini_model="gemini-4-image")
    ctx.price_overrides["gemini"] = {"gemini-4-image": {"1K": 7, "2K": 9, "4K": 14}}
    assert GeminiEngine(ctx).estimate(bridge(width=1024, height=1024)) == 7000


@respx.mock
@pytest.mark.parametrize("wrapped", [False, True])
async def test_an_account_that_cannot_use_the_api_lets_another_engine_try(engine: GeminiEngine,
                                                                          wrapped: bool) -> None:
    """Billing or the region not enabled (FAILED_PRECONDITION) is the account's, not the request's:
    it was invalid_request, final, with no fallback."""
    error = {"error": {"code": 400, "message": "User location is not supported for the API use.",
                       "status": "FAILED_PRECONDITION"}}
    respx.post(URL).mock(return_value=httpx.Response(400, json=[error] if wrapped else error))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.retryable and info.value.charged == "no"
    assert "User location is not supported" in info.value.message


@respx.mock
async def test_images_are_encoded_and_decoded_off_the_event_loop(engine: GeminiEngine,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A 2048 draft's PNG took seconds on the loop: the API, the event streams and the lease
    # renewals stood still meanwhile (an audit measured a 6.8 s stall for one polish).
    import tiers.gemini

    # The answer too: its image in base64 is megabytes of JSON to parse.
    spy = LoopSpy(monkeypatch, tiers.gemini, "encode_image", "decode_image", "answer_json")
    respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body()))
    result = await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert len(result.images) == 2 and spy.on_loop == []
    assert spy.called == {"encode_image", "decode_image", "answer_json"}  # the spies saw the work


@respx.mock
@pytest.mark.parametrize(("usages", "cost", "unread"), [
    # The first block that could not be read says why, not a later one.
    ([{"candidatesTokenCount": "x"}, None, {"candidatesTokenCount": -1}], None, "('x')"),
    # A call that said no usage leaves the cost unknown with no reason of a block to give.
    ([None, "good", "good"], None, None),
    (["good", "good", "good"], 3 * 7805, None),
])
async def test_a_job_of_several_calls_adds_their_costs_and_names_the_calls(
        engine: GeminiEngine, usages: list[Any], cost: int | None, unread: str | None) -> None:
    """Pinned as the inline tally had it before `_cloud.TokenBill` took it over: a sum of the
    calls' costs, None once one is unknown, the first unread reason, the ids of the calls that
    named one (the second does not)."""
    bodies = []
    for i, usage in enumerate(usages):
        body = ok_body()
        body["responseId"] = "" if i == 1 else f"resp-{i}"
        if usage is None:
            del body["usageMetadata"]
        elif usage != "good":
            body["usageMetadata"] = usage
        bodies.append(httpx.Response(200, json=body))
    respx.post(URL).mock(side_effect=bodies)
    result = await engine.run(bridge(n=3), NullProgress(), CancelToken())
    assert len(result.images) == 3 and result.cost_millicredits == cost
    assert result.provider_request_id == "resp-0,resp-2"
    if unread is None:
        assert result.cost_unread is None
    else:
        assert result.cost_unread is not None and unread in result.cost_unread


@respx.mock
@pytest.mark.parametrize("status", [400, 429])
async def test_an_error_answer_of_megabytes_is_not_parsed_on_the_event_loop(
        engine: GeminiEngine, loop_parses: list[int], status: int) -> None:
    # Google's error shape was read whole as JSON on the event loop for its status, quota or
    # message: for a 400 (FAILED_PRECONDITION?) and each 429 (a daily quota? credits depleted?).
    # The 429 is answered once, then the image.
    body = (b'{"error": {"code": %d, "message": "m", "status": "INVALID_ARGUMENT"}, "pad": ' % status
            + LARGE_ERROR_PADDING + b"}")
    error = httpx.Response(status, content=body, headers={"content-type": "application/json"})
    respx.post(URL).mock(side_effect=[error, httpx.Response(200, json=ok_body())])
    if status == 400:
        with pytest.raises(BadEngineInput):
            await engine.run(bridge(), NullProgress(), CancelToken())
    else:
        assert len((await engine.run(bridge(), NullProgress(), CancelToken())).images) == 1
    assert all(size < len(body) for size in loop_parses), loop_parses  # never the whole body


@respx.mock
async def test_a_refusal_in_a_charset_that_is_no_text_encoding_is_still_read(engine: GeminiEngine) -> None:
    # A charset naming a codec that decodes no text (`base64`): the body's `text`, read for "API
    # key", raised AssertionError out of the engine, the refusal failing its job as a crash.
    respx.post(URL).mock(return_value=httpx.Response(
        400, content=b"API key not valid. Please pass a valid API key.",
        headers={"content-type": "text/plain; charset=base64"}))
    with pytest.raises(EngineUnavailable, match="ORCH_GEMINI_API_KEY"):
        await engine.run(bridge(), NullProgress(), CancelToken())
