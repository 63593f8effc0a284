from __future__ import annotations

import base64
import datetime
import io
import json
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
    NoPrice,
)
from tests.tiers.conftest import LARGE_ERROR_PADDING, LoopSpy, RecordingProgress, bridge, multipart, png_bytes
from tiers import openai_images
from tiers.base import CancelToken, NullProgress
from tiers.openai_images import OpenAIImagesEngine, factory

BASE = "https://openai.test"
URL = f"{BASE}/v1/images/edits"


def ok_body(count: int = 1, usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "created": 1713833628,
        "data": [{"b64_json": base64.b64encode(png_bytes()).decode()} for _ in range(count)],
        "output_format": "png", "quality": "high", "size": "1024x1024",
    }
    if usage:
        body["usage"] = {"input_tokens": 50, "input_tokens_details": {"image_tokens": 40, "text_tokens": 10},
                         "output_tokens": 4160, "total_tokens": 4210}
    return body


def ok(count: int = 1, usage: bool = True) -> httpx.Response:
    return httpx.Response(200, json=ok_body(count, usage), headers={"x-request-id": "req_123"})


@pytest.fixture
def engine(make_ctx: Any, sleep: Any) -> OpenAIImagesEngine:
    eng = OpenAIImagesEngine(make_ctx(openai_api_key="sk-secret", openai_base_url=BASE))
    eng.http.sleep = sleep
    return eng


def assert_carries_draft(request: httpx.Request) -> dict[str, str]:
    fields, files = multipart(request)
    pixels = Image.open(io.BytesIO(files["image"]))
    assert pixels.format == "PNG" and pixels.size == (64, 64)
    assert pixels.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert pixels.convert("RGB").getpixel((1, 1)) == (10, 120, 200)
    return fields


@pytest.mark.parametrize(("model", "day", "live"), [
    ("gpt-image-1.5", datetime.date(2026, 11, 30), True),
    ("gpt-image-1.5", datetime.date(2026, 12, 1), False),   # its shutdown day, UTC
    ("gpt-image-1-mini", datetime.date(2027, 1, 1), False),
    ("gpt-image-2.6", datetime.date(2027, 1, 1), True),     # a successor: routed once it has prices
])
async def test_a_model_openai_shut_down_is_not_routed_from_that_day(
        make_ctx: Any, monkeypatch: pytest.MonkeyPatch, model: str, day: datetime.date, live: bool) -> None:
    # The default's shutdown day came with nothing said: every job tried it, failed, and fell over.
    monkeypatch.setattr(openai_images, "today", lambda: day)
    engine = OpenAIImagesEngine(make_ctx(openai_api_key="sk-secret", openai_model=model))
    available, why = engine.availability()
    assert available is live
    if not live:
        assert why is not None and f"OpenAI shut '{model}' down on 2026-" in why and "ORCH_OPENAI_MODEL" in why
    await engine.aclose()


@respx.mock
async def test_success_sends_draft_as_multipart_and_costs_from_usage(engine: OpenAIImagesEngine) -> None:
    route = respx.post(URL).mock(return_value=ok())
    progress = RecordingProgress()
    result = await engine.run(bridge(width=1600, height=1000, quality="medium"), progress, CancelToken())

    request = route.calls.last.request
    assert request.headers["authorization"] == "Bearer sk-secret"
    fields = assert_carries_draft(request)
    assert fields["model"] == "gpt-image-1.5"
    assert fields["size"] == "1536x1024"
    assert fields["quality"] == "medium"
    assert fields["n"] == "1"
    assert fields["output_format"] == "png" and fields["input_fidelity"] == "high"
    assert "a lighthouse" in fields["prompt"]
    assert len(result.images) == 1 and result.images[0].image.size == (64, 64)
    # 4160 x 4 mc + 40 x 1 mc + 10 x 0.5 mc
    assert result.cost_millicredits == 16685
    assert result.provider_request_id == "req_123" and progress.request_ids == ["req_123"]
    # What the record says it used: the quality sent, and none of what the edits call has no field for.
    assert result.metadata == {"size": "1536x1024", "quality": "medium", "negative_prompt": None, "steps": None,
                               "guidance_scale": None, "sampler": None, "strength": None, "creativity": None}


@respx.mock
async def test_an_answer_is_read_off_the_event_loop(engine: OpenAIImagesEngine,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # n images in base64 are tens of MB of JSON: parsed on the loop, the API, the event streams and
    # the lease renewals stood still meanwhile.
    import tiers.openai_images

    spy = LoopSpy(monkeypatch, tiers.openai_images, "json_object")
    respx.post(URL).mock(return_value=ok(count=2))
    result = await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert len(result.images) == 2 and spy.called == {"json_object"} and spy.on_loop == []


@respx.mock
async def test_several_images_in_one_call_and_unknown_quality_means_high(engine: OpenAIImagesEngine) -> None:
    route = respx.post(URL).mock(return_value=ok(count=3, usage=False))
    result = await engine.run(bridge(n=3, width=600, height=1000, quality="auto"), NullProgress(),
                              CancelToken())
    fields, _ = multipart(route.calls.last.request)
    assert route.call_count == 1
    assert fields["n"] == "3" and fields["quality"] == "high" and fields["size"] == "1024x1536"
    assert len(result.images) == 3
    assert result.cost_millicredits is None


@respx.mock
async def test_429_with_retry_after_then_success(engine: OpenAIImagesEngine, sleep: Any) -> None:
    throttled = httpx.Response(429, json={"error": {"message": "slow down", "code": "rate_limit_exceeded"}},
                               headers={"retry-after": "7"})
    route = respx.post(URL).mock(side_effect=[throttled, ok()])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2 and sleep.waits == [7.0]
    # The retry uploads the whole draft again.
    assert_carries_draft(route.calls.last.request)
    assert len(result.images) == 1


@respx.mock
async def test_5xx_then_success(engine: OpenAIImagesEngine) -> None:
    route = respx.post(URL).mock(side_effect=[httpx.Response(502), ok()])
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2


@respx.mock
async def test_read_timeout_is_not_resent(engine: OpenAIImagesEngine) -> None:
    route = respx.post(URL).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.charged == "unknown"


@respx.mock
@pytest.mark.parametrize("response", [
    httpx.Response(200, text="<html>"),
    httpx.Response(200, json={"data": []}),
    httpx.Response(200, json={"data": [{"url": "https://x"}]}),
    httpx.Response(200, json={"data": [{"b64_json": base64.b64encode(b"not a png").decode()}]}),
])
async def test_malformed_body(engine: OpenAIImagesEngine, response: httpx.Response) -> None:
    route = respx.post(URL).mock(return_value=response)
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and route.call_count == 1  # answered 200: it may have billed
    # OpenAI refuses a prompt with a 400: a 200 without an image is an endpoint unwell, counted.
    assert info.value.engine_fault
    if b"b64_json" not in response.content and response.headers.get("content-type") == "application/json":
        assert info.value.code == "no_image"


@respx.mock
# Each count the engine reads; the values a count may not be are `token_counts`' (test_cloud.py).
@pytest.mark.parametrize(("where", "count"), [
    ("output_tokens", "1e400"),  # an infinity to json.loads: int() raised OverflowError
    ("image_tokens", "4160.5"),
    ("text_tokens", "true"),
])
async def test_token_counts_that_are_not_counts_charge_the_estimate(engine: OpenAIImagesEngine, where: str,
                                                                    count: str) -> None:
    usage: dict[str, Any] = {"input_tokens": 50, "input_tokens_details": {"image_tokens": 40, "text_tokens": 10},
                             "output_tokens": 4160}
    if where == "output_tokens":
        usage[where] = "COUNT"
    else:
        usage["input_tokens_details"][where] = "COUNT"
    text = json.dumps({**ok_body(), "usage": usage}).replace('"COUNT"', count)
    respx.post(URL).mock(return_value=httpx.Response(200, text=text, headers={"content-type": "application/json"}))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    # The image is kept, and the ledger captures the hold, flagged for the invoice to settle.
    assert len(result.images) == 1 and result.cost_millicredits is None
    assert result.cost_unread is not None and "not counts" in result.cost_unread


@respx.mock
async def test_an_answer_that_cannot_be_decoded_is_not_resent(engine: OpenAIImagesEngine) -> None:
    """A 200 with a corrupt gzip body: the provider made and billed the image, so neither a release
    nor a message about the key."""
    route = respx.post(URL).mock(return_value=httpx.Response(
        200, stream=httpx.ByteStream(b"not gzip"), headers={"content-encoding": "gzip", "x-request-id": "req_1"}))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not isinstance(info.value, EngineUnavailable)
    assert info.value.charged == "unknown" and route.call_count == 1
    assert "could not be read" in info.value.message and "OPENAI_API_KEY" not in info.value.message


@respx.mock
async def test_an_image_of_a_batch_that_cannot_be_decoded_leaves_the_others_to_the_job(
        engine: OpenAIImagesEngine) -> None:
    body = ok_body(3)
    body["data"][1]["b64_json"] = base64.b64encode(b"not a png").decode()
    respx.post(URL).mock(return_value=httpx.Response(200, json=body, headers={"x-request-id": "req_1"}))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(n=3), NullProgress(), CancelToken())
    assert info.value.charged in ("unknown", "yes")
    made = info.value.made
    assert made is not None and len(made.images) == 2  # the ones before and after it

@respx.mock
@pytest.mark.parametrize("code", ["moderation_blocked", "content_policy_violation"])
async def test_moderation_blocked_is_content_filtered(engine: OpenAIImagesEngine, code: str) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(400, json={"error": {
        "message": "Your request was rejected by the safety system.", "type": "image_generation_user_error",
        "param": None, "code": code}}, headers={"x-request-id": "req_mod"}))
    with pytest.raises(ContentFiltered) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    assert info.value.details["request_id"] == "req_mod" and info.value.details["reason"] == code


@respx.mock
@pytest.mark.parametrize(("status", "code"), [(400, "moderation_blocked"), (429, "insufficient_quota"),
                                              (400, "invalid_value")])
async def test_a_refused_call_is_not_saved_as_accepted_work(engine: OpenAIImagesEngine, status: int,
                                                            code: str) -> None:
    # Saved, the refusal's id made the failed job one with provider work: never taken as unbilled.
    respx.post(URL).mock(return_value=httpx.Response(status, json={"error": {"message": "no", "code": code}},
                                                     headers={"x-request-id": "req_refused"}))
    progress = RecordingProgress()
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), progress, CancelToken())
    assert progress.request_ids == [] and info.value.charged == "no"
    assert info.value.details.get("request_id", "req_refused") == "req_refused"


@respx.mock
async def test_any_2xx_is_read_as_the_answer(engine: OpenAIImagesEngine) -> None:
    # Taken for a refusal, an image made (and billed) was dropped and its hold released.
    respx.post(URL).mock(return_value=httpx.Response(201, json=ok_body(), headers={"x-request-id": "req_201"}))
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())
    assert len(result.images) == 1 and progress.request_ids == ["req_201"]


@respx.mock
@pytest.mark.parametrize("response", [httpx.Response(204), httpx.Response(302, json=ok_body()),
                                      httpx.Response(302, json={"error": {"code": "insufficient_quota"}})])
async def test_an_answer_neither_read_nor_refused_is_charged(engine: OpenAIImagesEngine,
                                                            response: httpx.Response) -> None:
    route = respx.post(URL).mock(return_value=response)
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and route.call_count == 1
    assert base64.b64encode(png_bytes()).decode()[:40] not in str(info.value)  # no image quoted as the reason


@respx.mock
async def test_a_request_id_that_echoes_the_key_is_stored_without_it(engine: OpenAIImagesEngine) -> None:
    # A proxy (or a wrong base URL) echoing the key in its request id: stored and shown to the project.
    echoed = {"x-request-id": "req_Bearer sk-secret-and-more"}
    respx.post(URL).mock(side_effect=[httpx.Response(400, json={"error": {"message": "no", "code": "x"}},
                                                     headers=echoed),
                                      httpx.Response(200, json=ok_body(), headers=echoed)])
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "sk-secret" not in info.value.details["request_id"]
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())
    assert result.provider_request_id and "sk-secret" not in result.provider_request_id
    assert progress.request_ids and not any("sk-secret" in r for r in progress.request_ids)


@pytest.mark.parametrize("details", [{"text_tokens": 10}, {"image_tokens": 4500}])
def test_a_usage_split_naming_one_kind_bills_the_rest_as_the_other(engine: OpenAIImagesEngine,
                                                                   details: dict[str, int]) -> None:
    # A split without `image_tokens` billed the image, most of the input, at nothing.
    whole = {"input_tokens": 4510, "output_tokens": 4160}
    split = engine._actual_cost({**whole, "input_tokens_details": {"image_tokens": 4500, "text_tokens": 10}})
    assert split is not None and engine._actual_cost({**whole, "input_tokens_details": details}) == split


@respx.mock
async def test_401_fails_at_once_naming_the_setting(engine: OpenAIImagesEngine, caplog: Any) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(
        401, json={"error": {"message": "Incorrect API key provided: sk-secret", "code": "invalid_api_key"}}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    assert "OPENAI_API_KEY" in info.value.message and "sk-secret" not in info.value.message
    assert "sk-secret" not in caplog.text
    # Nor the key as the provider masks it, which the job's error shows every project key holder.
    route.mock(return_value=httpx.Response(401, json={"error": {
        "message": "Incorrect API key provided: sk-proj-****wxyz.", "code": "invalid_api_key"}}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "wxyz" not in info.value.message


@respx.mock
async def test_bad_request_is_not_retried(engine: OpenAIImagesEngine) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(
        400, json={"error": {"message": "Invalid size", "code": "invalid_value"}}))
    with pytest.raises(BadEngineInput, match="Invalid size"):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1



@respx.mock
@pytest.mark.parametrize("response", [
    httpx.Response(404, json={"error": {"message": "The model `gpt-image-1.5` does not exist", "code": None}}),
    httpx.Response(400, json={"error": {"message": "Unknown model", "code": "model_not_found"}}),
    # A 400 naming the `model` parameter: was invalid_request, the job failed with no fallback.
    httpx.Response(400, json={"error": {"message": "Invalid value: 'gpt-image-1.5'. Supported values are: ...",
                                        "type": "invalid_request_error", "param": "model", "code": "invalid_value"}}),
])
async def test_a_model_it_no_longer_serves_lets_another_engine_try(engine: OpenAIImagesEngine,
                                                                   response: httpx.Response) -> None:
    # gpt-image-1.5 shuts down on 2026-12-01: a job must fall back, not fail as bad input.
    route = respx.post(URL).mock(return_value=response)
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    error = info.value
    assert error.retryable and error.charged == "no" and route.call_count == 1
    assert error.details["setting"] == "ORCH_OPENAI_MODEL" and "set ORCH_OPENAI_MODEL" in error.message


@pytest.mark.parametrize(("status", "kind", "code"), [
    (429, "insufficient_quota", "insufficient_quota"),
    # Billing switched off: retried as a rate limit, each job waited 2.5 minutes before falling back.
    (429, "billing_not_active", "billing_not_active"),
    # An account at its spending limit: a 400 that read as the request's fault, so no fallback was tried.
    (400, "invalid_request_error", "billing_hard_limit_reached")])
@respx.mock
async def test_a_used_up_quota_is_not_waited_out(engine: OpenAIImagesEngine, sleep: Any, status: int, kind: str,
                                                 code: str) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(status, json={"error": {
        "message": "You exceeded your current quota", "type": kind, "code": code}}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.retryable and info.value.charged == "no"
    assert "quota is used up" in info.value.message and info.value.details["reason"] == code


@pytest.mark.parametrize(("model", "sent"), [
    ("gpt-image-1", True), ("gpt-image-1.5", True), ("gpt-image-1.5-2025-12-16", True),
    # The mini models refuse the field; OpenAI's reference says to omit it from gpt-image-2 on,
    # and a 400 for it would have failed every job of the successor as the user's bad input.
    ("gpt-image-1-mini", False), ("gpt-image-2", False), ("gpt-image-2.6-sunburst", False), ("gpt-image-10", False)])
@respx.mock
async def test_input_fidelity_goes_only_to_the_models_that_take_it(make_ctx: Any, sleep: Any, model: str,
                                                                    sent: bool) -> None:
    engine = OpenAIImagesEngine(make_ctx(openai_api_key="sk-test", openai_model=model, openai_base_url=BASE))
    route = respx.post(URL).mock(return_value=ok())
    await engine.run(bridge(), NullProgress(), CancelToken())
    fields, _ = multipart(route.calls.last.request)
    assert fields["model"] == model and ("input_fidelity" in fields) is sent


@respx.mock
async def test_a_field_the_engine_chose_refused_by_the_model_lets_another_engine_try(
        engine: OpenAIImagesEngine) -> None:
    # A successor refusing a field the engine sent it failed every job as the user's bad input.
    route = respx.post(URL).mock(return_value=httpx.Response(400, json={"error": {
        "message": "Unknown parameter: 'input_fidelity'.", "type": "invalid_request_error",
        "param": "input_fidelity", "code": "unknown_parameter"}}))
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    error = info.value
    # The engine is set up wrong for its model: its circuit counts it, not every job trying it first.
    assert route.call_count == 1 and error.retryable and error.charged == "no" and error.engine_fault
    assert "ORCH_OPENAI_MODEL" in error.message and "'input_fidelity'" in error.message
    # A `param` of another type (a list) is no field of ours: refused as before, not a crash.
    respx.post(URL).mock(return_value=httpx.Response(400, json={"error": {"message": "bad", "param": ["size"]}}))
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not info.value.retryable
    # The user's own prompt refused stays theirs: no other engine is tried.
    respx.post(URL).mock(return_value=httpx.Response(400, json={"error": {
        "message": "Prompt too long", "type": "invalid_request_error", "param": "prompt"}}))
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not info.value.retryable


def test_a_model_priced_per_image_only_is_not_priced(make_ctx: Any) -> None:
    # The draft each call sends is billed as input tokens, more than a low image itself: priced
    # by image alone, a successor's job held 1.1 credits against a bill of about 5.
    per_image = {"low-1024x1024": 1.1, "high-1024x1024": 16.7}
    ctx = make_ctx(openai_api_key="k", openai_model="gpt-image-2.6-sunburst")
    ctx.price_overrides = {"openai": {"gpt-image-2.6-sunburst": per_image}}
    with pytest.raises(NoPrice, match="input_image_tokens_per_million"):
        OpenAIImagesEngine(ctx).estimate(bridge(quality="low"))
    note = OpenAIImagesEngine(ctx).note
    assert note and "input_image_tokens_per_million or input_text_tokens_per_million" in note
    ctx.price_overrides = {"openai": {"gpt-image-2.6-sunburst": {
        **per_image, "input_image_tokens_per_million": 1000, "input_text_tokens_per_million": 500}}}
    assert OpenAIImagesEngine(ctx).estimate(bridge(quality="low")) == 1100 + 4534
    assert OpenAIImagesEngine(ctx).note is None


async def test_without_draft_is_refused(engine: OpenAIImagesEngine) -> None:
    with pytest.raises(BadEngineInput):
        await engine.run(bridge(init_image=None), NullProgress(), CancelToken())


def test_estimate_by_quality_and_size_and_unknown_model(make_ctx: Any) -> None:
    eng = OpenAIImagesEngine(make_ctx(openai_api_key="k"))
    # 16.7 credits per image + (4500 image tokens x 1 mc + (3 + 64) text tokens x 0.5 mc) per call
    assert eng.estimate(bridge()) == 16700 + 4534
    low, medium, high = (eng.estimate(bridge(quality=q)) for q in ("low", "medium", "high"))
    assert low < medium < high
    assert eng.estimate(bridge(width=1536, height=1024)) > eng.estimate(bridge())
    # Input is paid per call, and an answer short of images makes another: held for each image.
    assert eng.estimate(bridge(n=2)) == 2 * (16700 + 4534)
    mini = OpenAIImagesEngine(make_ctx(openai_api_key="k", openai_model="gpt-image-1-mini"))
    with pytest.raises(NoPrice, match="input_image_tokens_per_million"):  # the built-in table has none
        mini.estimate(bridge())
    with pytest.raises(NoPrice):
        mini.estimate(bridge(width=1536, height=1024))
    unknown = OpenAIImagesEngine(make_ctx(openai_api_key="k", openai_model="gpt-image-9"))
    with pytest.raises(NoPrice):
        unknown.estimate(bridge())


def test_a_size_larger_than_its_three_is_refused_before_any_hold(make_ctx: Any) -> None:
    # Routing kept it for a 1536x1536 polish (within max_width), and the answer was 1024x1024.
    eng = OpenAIImagesEngine(make_ctx(openai_api_key="k"))
    for width, height in ((1536, 1536), (1200, 1200), (1024, 1200)):
        with pytest.raises(BadEngineInput, match=f"smaller than the {width}x{height} asked") as info:
            eng.estimate(bridge(width=width, height=height))
        assert info.value.retryable  # another engine may make it
    assert eng.estimate(bridge(width=1536, height=864)) > 0  # made at 1536x1024: at least as large


@respx.mock
async def test_the_hold_covers_answers_that_come_back_short(engine: OpenAIImagesEngine) -> None:
    # Three images asked for, one per answer: three calls, each paying for the draft again.
    usage = {"input_tokens": 4567, "input_tokens_details": {"image_tokens": 4500, "text_tokens": 67},
             "output_tokens": 4160, "total_tokens": 8727}
    route = respx.post(URL).mock(return_value=httpx.Response(200, json={**ok_body(1), "usage": usage}))
    req = bridge(width=1024, height=1024, n=3)
    result = await engine.run(req, NullProgress(), CancelToken())
    assert route.call_count == 3 and len(result.images) == 3
    assert result.cost_millicredits is not None and result.cost_millicredits <= engine.estimate(req)


def test_price_overrides_apply(make_ctx: Any) -> None:
    ctx = make_ctx(openai_api_key="k", openai_model="gpt-image-9")
    ctx.price_overrides = {"openai": {"gpt-image-9": {"high-1024x1024": 10, "input_image_tokens_per_million": 0,
                                                      "input_text_tokens_per_million": 0}}}
    assert factory(ctx).estimate(bridge()) == 10000
    assert factory(ctx).prices()["credits_per_image"]["gpt-image-9"] == {"high-1024x1024": 10.0}


def test_unavailable_without_key(make_ctx: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ORCH_OPENAI_API_KEY", raising=False)
    available, reason = OpenAIImagesEngine(make_ctx()).availability()
    assert not available and reason and "OPENAI_API_KEY" in reason


@respx.mock
async def test_an_answer_with_more_images_than_asked_keeps_n(engine: OpenAIImagesEngine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the `n` asked for are decoded: each image of an answer may be 16 MP."""
    import tiers.openai_images as module

    decoded: list[bytes] = []
    real = module.decode_image  # type: ignore[attr-defined]

    def counting(data: bytes, engine: str) -> Image.Image:
        decoded.append(data)
        return real(data, engine)

    monkeypatch.setattr(module, "decode_image", counting)
    respx.post(URL).mock(return_value=ok(count=40))
    result = await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert len(result.images) == 2 and len(decoded) == 2


@respx.mock
@pytest.mark.parametrize(("usages", "cost", "unread"), [
    # The first block that could not be read says why, not a later one.
    ([{"output_tokens": "x"}, None, {"output_tokens": -1}], None, "('x')"),
    # A call that said no usage leaves the cost unknown with no reason of a block to give.
    ([None, "good", "good"], None, None),
    (["good", "good", "good"], 3 * 16685, None),
])
async def test_a_job_of_several_calls_adds_their_costs_and_names_the_calls(
        engine: OpenAIImagesEngine, usages: list[Any], cost: int | None, unread: str | None) -> None:
    """Pinned as the inline tally had it before `_cloud.TokenBill` took it over: a sum of the
    calls' costs, None once one is unknown, the first unread reason, the ids of the calls that
    named one (the second does not)."""
    answers = []
    for i, usage in enumerate(usages):
        body = ok_body()
        if usage is None:
            del body["usage"]
        elif usage != "good":
            body["usage"] = usage
        answers.append(httpx.Response(200, json=body, headers={} if i == 1 else {"x-request-id": f"req_{i}"}))
    # One image an answer: the engine asks again for the rest.
    route = respx.post(URL).mock(side_effect=answers)
    result = await engine.run(bridge(n=3), NullProgress(), CancelToken())
    assert route.call_count == 3 and len(result.images) == 3 and result.cost_millicredits == cost
    assert result.provider_request_id == "req_0,req_2"
    if unread is None:
        assert result.cost_unread is None
    else:
        assert result.cost_unread is not None and unread in result.cost_unread


@respx.mock
async def test_an_error_answer_of_megabytes_is_not_parsed_on_the_event_loop(
        engine: OpenAIImagesEngine, loop_parses: list[int]) -> None:
    # `_error` read the body whole as JSON on the event loop for its code and param, three times
    # over for one refusal (code, model param, chosen field).
    body = b'{"error": {"code": "invalid_value", "message": "bad", "param": null}, "pad": ' + LARGE_ERROR_PADDING + b"}"
    respx.post(URL).mock(return_value=httpx.Response(400, content=body, headers={"content-type": "application/json"}))
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "no"
    assert all(size < len(body) for size in loop_parses), loop_parses  # never the whole body
