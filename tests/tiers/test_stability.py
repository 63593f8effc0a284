from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import sys
import threading
import zlib
from types import FrameType
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
    RateLimited,
)
from tests.tiers.conftest import HeldRequest, LoopSpy, NoAnswer, RecordingProgress, draft_image, multipart, png_bytes
from tests.tiers.conftest import bridge as base_bridge
from tiers.base import CancelToken, NullProgress, RenderRequest
from tiers.stability import StabilityEngine, _jpeg_ended, _whole_image, operation

BASE = "https://stability.test"
SD3 = f"{BASE}/v2beta/stable-image/generate/sd3"
ULTRA = f"{BASE}/v2beta/stable-image/generate/ultra"
CONSERVATIVE = f"{BASE}/v2beta/stable-image/upscale/conservative"
CREATIVE = f"{BASE}/v2beta/stable-image/upscale/creative"
RESULT = f"{BASE}/v2beta/results/job-42"


def ok(seed: int = 343940597, reason: str = "SUCCESS",
       headers: dict[str, str] | None = None, key: str = "image") -> httpx.Response:
    body = {key: base64.b64encode(png_bytes()).decode(), "finish_reason": reason, "seed": seed}
    return httpx.Response(200, json=body, headers={"x-request-id": "stab-req-1", **(headers or {})})


def done(seed: int = 343940597, reason: str = "SUCCESS") -> httpx.Response:
    """What `GET /v2beta/results/{id}` answers for a finished job: the image is under `result`."""
    return ok(seed, reason, key="result")


@pytest.fixture
def make_engine(make_ctx: Any, sleep: Any) -> Any:
    def make(**settings: Any) -> StabilityEngine:
        ctx = make_ctx(stability_api_key="sk-stab-secret", stability_base_url=BASE, **settings)
        eng = StabilityEngine(ctx)
        eng.http.sleep = sleep
        eng.poll_interval = 0
        return eng

    return make


@pytest.fixture
def engine(make_engine: Any) -> StabilityEngine:
    engine: StabilityEngine = make_engine()
    return engine


def bridge(**kw: Any) -> RenderRequest:
    return base_bridge(**{"strength": 0.6, **kw})


def polish(**kw: Any) -> RenderRequest:
    values: dict[str, Any] = {"stage": "polish", "scale": 2.0, "creativity": 0.3}
    values.update(kw)
    return bridge(**values)


def held_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold each answer's read in its worker thread (`StabilityEngine._result`): the first event is
    set as a read begins, and the reads go on once the second is set."""
    real = StabilityEngine._result
    reading, release = threading.Event(), threading.Event()

    def slow(self: StabilityEngine, response: httpx.Response, req: RenderRequest) -> Any:
        reading.set()
        release.wait(timeout=30)
        return real(self, response, req)

    monkeypatch.setattr(StabilityEngine, "_result", slow)
    return reading, release


async def cancel_while_read(reading: threading.Event, release: threading.Event, token: CancelToken, *,
                            abandon: bool = False) -> None:
    """Cancel (a stop's: `abandon`) once a read `held_reads` holds has begun, then let the reads go on."""
    try:
        await asyncio.wait_for(asyncio.to_thread(reading.wait, 5), 10)
        token.cancel(abandon=abandon)
        await asyncio.sleep(0.01)
    finally:
        release.set()


def assert_carries_draft(request: httpx.Request) -> dict[str, str]:
    assert request.headers["authorization"] == "Bearer sk-stab-secret"
    assert request.headers["accept"] == "application/json"
    fields, files = multipart(request)
    pixels = Image.open(io.BytesIO(files["image"]))
    assert pixels.format == "PNG" and pixels.size == (64, 64)
    assert pixels.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert pixels.convert("RGB").getpixel((1, 1)) == (10, 120, 200)
    return fields


@respx.mock
async def test_any_2xx_is_read_as_the_answer(engine: StabilityEngine) -> None:
    # Taken for a refusal, an image made (and billed) was dropped and its hold released.
    body = ok().json()
    respx.post(SD3).mock(return_value=httpx.Response(201, json=body, headers={"x-request-id": "stab-201"}))
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())
    assert len(result.images) == 1 and progress.request_ids == ["stab-201"]


@respx.mock
@pytest.mark.parametrize("response", [httpx.Response(204), httpx.Response(307, json=ok().json()),
                                      httpx.Response(307, json={"name": "content_moderation"})])
async def test_an_answer_neither_read_nor_refused_is_charged(engine: StabilityEngine,
                                                            response: httpx.Response) -> None:
    route = respx.post(SD3).mock(return_value=response)
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and route.call_count == 1
    assert base64.b64encode(png_bytes()).decode()[:40] not in str(info.value)  # no image quoted as the reason


# --- bridge -------------------------------------------------------------------------------------


@respx.mock
async def test_bridge_sends_draft_to_sd3(engine: StabilityEngine) -> None:
    route = respx.post(SD3).mock(return_value=ok())
    progress = RecordingProgress()
    req = bridge(negative_prompt="fog", seed=7, guidance_scale=4.5)
    result = await engine.run(req, progress, CancelToken())

    fields = assert_carries_draft(route.calls.last.request)
    assert fields == {"prompt": "a lighthouse", "output_format": "png", "negative_prompt": "fog", "seed": "7",
                      "strength": "0.6", "mode": "image-to-image", "model": "sd3.5-large", "cfg_scale": "4.5"}
    # SD3 takes no size and answers in its own (here the fake's 64x64): resized to the one asked for.
    assert len(result.images) == 1 and result.images[0].image.size == (1024, 1024)
    assert result.images[0].seed == 343940597
    assert result.model == "sd3.5-large" and result.cost_millicredits is None
    assert result.provider_request_id == "stab-req-1" and progress.request_ids == ["stab-req-1"]


@pytest.mark.parametrize(("guidance", "sent"), [(0.0, "1"), (15.0, "10"), (10.0, "10")])
@respx.mock
async def test_a_guidance_beyond_sd3_s_range_is_sent_within_it_and_recorded_as_sent(
        engine: StabilityEngine, guidance: float, sent: str) -> None:
    """A bridge's guidance goes 0 to 30 (a local model's range); SD3's `cfg_scale` takes 1 to 10, and
    refused the rest with a 400 that failed the job."""
    route = respx.post(SD3).mock(return_value=ok())
    result = await engine.run(bridge(guidance_scale=guidance), NullProgress(), CancelToken())
    fields, _ = multipart(route.calls.last.request)
    assert fields["cfg_scale"] == sent and result.metadata["guidance_scale"] == float(sent)


@respx.mock
async def test_a_bridge_of_another_shape_sends_the_draft_in_the_shape_asked(engine: StabilityEngine) -> None:
    """The output takes the input's shape: a square draft promoted to 1344x768 came back square."""
    route = respx.post(SD3).mock(return_value=ok())
    result = await engine.run(bridge(width=1344, height=768), NullProgress(), CancelToken())
    _, files = multipart(route.calls.last.request)
    sent = Image.open(io.BytesIO(files["image"])).size
    # The draft's pixels, unless a side would fall under the 64 Stability takes.
    assert abs(sent[0] / sent[1] - 1344 / 768) < 0.03 and min(sent) == 64
    assert result.images[0].image.size == (1344, 768)


@pytest.mark.parametrize("stage", ["bridge", "polish"])
async def test_a_render_above_a_megapixel_is_refused_before_sending(engine: StabilityEngine, stage: str) -> None:
    # SD3.5 and Ultra answer about 1 megapixel: 2048x2048 would be one resized up, paid as a render.
    req = bridge(stage=stage, width=2048, height=2048, init_image=draft_image((2048, 2048)),
                 **({"scale": None, "creativity": 0.2} if stage == "polish" else {}))
    with pytest.raises(BadEngineInput, match="about 1 megapixel") as info:
        engine.estimate(req)
    assert info.value.retryable
    with pytest.raises(BadEngineInput):
        await engine.run(req, NullProgress(), CancelToken())
    assert engine.estimate(bridge(width=1344, height=768)) > 0


@respx.mock
async def test_ultra_uses_its_endpoint_with_strength(make_engine: Any) -> None:
    route = respx.post(ULTRA).mock(return_value=ok())
    eng: StabilityEngine = make_engine(stability_model="ultra")
    result = await eng.run(bridge(n=2, seed=10), NullProgress(), CancelToken())
    assert route.call_count == 2
    first = assert_carries_draft(route.calls[0].request)
    second, _ = multipart(route.calls[1].request)
    assert first == {"prompt": "a lighthouse", "output_format": "png", "seed": "10", "strength": "0.6"}
    assert second["seed"] == "11"
    assert len(result.images) == 2 and result.model == "ultra"


@respx.mock
@pytest.mark.parametrize(("seed", "sent"), [(0, ["4294967294", "1"]), (4294967294, ["4294967294", "1"]),
                                            (4294967293, ["4294967293", "4294967294"]), (7, ["7", "8"])])
async def test_a_pinned_seed_is_never_sent_as_stability_s_random_zero(make_engine: Any, seed: int,
                                                                      sent: list[str]) -> None:
    # Stability reads seed 0 as "random": a job pinned to 0 (or wrapping to it) differed at each run;
    # the variations of a job stay distinct, and a seed in range goes as itself.
    route = respx.post(ULTRA).mock(return_value=ok())
    eng: StabilityEngine = make_engine(stability_model="ultra")
    await eng.run(bridge(n=2, seed=seed), NullProgress(), CancelToken())
    assert [multipart(call.request)[0]["seed"] for call in route.calls] == sent


@respx.mock
async def test_polish_at_the_drafts_size_is_a_same_size_refine(engine: StabilityEngine) -> None:
    route = respx.post(SD3).mock(return_value=ok())
    result = await engine.run(polish(scale=None, width=64, height=64, creativity=0.1), NullProgress(), CancelToken())
    assert route.call_count == 1 and result.images[0].image.size == (64, 64)
    fields, _ = multipart(route.calls.last.request)
    assert fields["strength"] == "0.1"  # the user's creativity: it was the default strength, 0.55


@respx.mock
async def test_polish_to_a_larger_size_is_an_upscale_resized_to_that_size(engine: StabilityEngine) -> None:
    # The service sends `width`/`height` without a scale when the request gives a size: it is
    # still an upscale (here 64x64 -> 192x128), and the upscaler's own output size is not the one asked for.
    route = respx.post(CONSERVATIVE).mock(return_value=ok())
    result = await engine.run(polish(scale=None, width=192, height=128), NullProgress(), CancelToken())
    assert route.call_count == 1 and result.model == "upscale-conservative"
    assert result.images[0].image.size == (192, 128)


@pytest.mark.parametrize(("draft", "size"), [((64, 64), (512, 512)), ((1024, 1024), (2560, 2560))])
async def test_an_upscale_beyond_the_upscalers_is_refused_before_sending(
        engine: StabilityEngine, draft: tuple[int, int], size: tuple[int, int]) -> None:
    # 8x, then 2.5x but 6.5 megapixels: another engine may take either.
    req = polish(scale=None, init_image=draft_image(draft), width=size[0], height=size[1])
    with pytest.raises(BadEngineInput) as info:
        await engine.run(req, NullProgress(), CancelToken())
    assert info.value.retryable and info.value.details["width"] == size[0]
    # Refused when priced too: routing skips it, instead of holding credits for a job that fails.
    with pytest.raises(BadEngineInput):
        engine.estimate(req)
    assert engine.estimate(polish(scale=None, init_image=draft_image(draft), width=draft[0] * 2,
                                  height=draft[1] * 2)) > 0


@pytest.mark.parametrize(("stage", "draft", "size"), [
    ("bridge", (64, 64), (1024, 128)),   # the draft is sent stretched to 8:1
    ("polish", (64, 192), (128, 384)),   # the draft itself is 1:3, sent as it is to the upscaler
])
@respx.mock
async def test_a_shape_stability_refuses_is_refused_before_sending(
        engine: StabilityEngine, stage: str, draft: tuple[int, int], size: tuple[int, int]) -> None:
    # Stability takes images between 1:2.5 and 2.5:1; beyond, its 400 read as the request's fault
    # would fail the job instead of leaving it to another engine.
    route = respx.post(url__startswith=BASE).mock(return_value=ok())
    req = (bridge(init_image=draft_image(draft), width=size[0], height=size[1]) if stage == "bridge"
           else polish(scale=None, init_image=draft_image(draft), width=size[0], height=size[1]))
    with pytest.raises(BadEngineInput, match=r"1:2\.5 and 2\.5:1") as info:
        engine.estimate(req)
    assert info.value.retryable
    with pytest.raises(BadEngineInput):
        await engine.run(req, NullProgress(), CancelToken())
    assert route.call_count == 0
    # At the edge it is taken: 640x256 is 2.5:1.
    assert engine.estimate(bridge(init_image=draft_image((64, 64)), width=640, height=256)) > 0


@respx.mock
async def test_a_draft_just_past_the_edge_is_sent_in_the_shape_asked(engine: StabilityEngine) -> None:
    # 1288x512 (2.516:1) is within 1% of the 1280x512 asked, so it went as it was: past 2.5:1.
    route = respx.post(SD3).mock(return_value=ok())
    await engine.run(bridge(init_image=draft_image((1288, 512)), width=1280, height=512), NullProgress(),
                     CancelToken())
    _, files = multipart(route.calls.last.request)
    width, height = Image.open(io.BytesIO(files["image"])).size
    assert width <= 2.5 * height


@respx.mock
async def test_429_with_retry_after_then_success(engine: StabilityEngine, sleep: Any) -> None:
    throttled = httpx.Response(429, json={"id": "x", "name": "rate_limit_exceeded", "errors": ["slow down"]},
                               headers={"retry-after": "12"})
    route = respx.post(SD3).mock(side_effect=[throttled, ok()])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2 and sleep.waits == [12.0]
    assert_carries_draft(route.calls.last.request)
    assert len(result.images) == 1


@respx.mock
async def test_a_429_without_retry_after_waits_out_the_60_s_lockout(make_engine: Any, sleep: Any) -> None:
    # Backing off from half a second would knock on a locked door, and each knock is a 429.
    throttled = httpx.Response(429, json={"id": "x", "name": "rate_limit_exceeded", "errors": ["slow down"]})
    route = respx.post(SD3).mock(side_effect=[throttled, ok()])
    await make_engine(remote_deadline=300.0).run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2 and sleep.waits == [60.0]
    # Within a deadline shorter than the lockout there is no point waiting: rate_limited at once.
    route.side_effect = [throttled, ok()]
    with pytest.raises(RateLimited):
        await make_engine(remote_deadline=30.0).run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 3 and sleep.waits == [60.0]


@respx.mock
async def test_5xx_then_success(engine: StabilityEngine) -> None:
    route = respx.post(SD3).mock(side_effect=[httpx.Response(500, json={"name": "internal_error"}), ok()])
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2


@respx.mock
async def test_read_timeout_is_not_resent(engine: StabilityEngine) -> None:
    route = respx.post(SD3).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.charged == "unknown"


@respx.mock
@pytest.mark.parametrize("response", [
    httpx.Response(200, text="<html>"),
    httpx.Response(200, json={"finish_reason": "SUCCESS"}),
    httpx.Response(200, json=["image"]),
    httpx.Response(200, json={"image": base64.b64encode(b"not a png").decode(), "finish_reason": "SUCCESS"}),
])
async def test_malformed_body(engine: StabilityEngine, response: httpx.Response) -> None:
    route = respx.post(SD3).mock(return_value=response)
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "unknown" and route.call_count == 1  # answered 200: it may have billed
    assert info.value.engine_fault  # its filter says so when it takes an image: an empty 200 is the endpoint's
    if response.content == b'{"finish_reason":"SUCCESS"}':
        assert info.value.code == "no_image"


@respx.mock
@pytest.mark.parametrize(("body_seed", "header_seed"), [
    (2**63, None),
    (2**32, None),
    (10**30, None),
    (1e30, None),
    (True, None),
    (-1, None),
    (None, str(2**64)),
    (None, "1e30"),
])
async def test_a_seed_no_job_could_ask_for_is_not_kept(engine: StabilityEngine, body_seed: Any,
                                                       header_seed: str | None) -> None:
    """Kept, it failed the asset's write (a 64-bit column) after the images were made and billed."""
    body: dict[str, Any] = {"image": base64.b64encode(png_bytes()).decode(), "finish_reason": "SUCCESS"}
    if body_seed is not None:
        body["seed"] = body_seed
    respx.post(SD3).mock(return_value=httpx.Response(200, json=body,
                                                     headers={"seed": header_seed} if header_seed else {}))
    result = await engine.run(bridge(seed=7), NullProgress(), CancelToken())
    assert len(result.images) == 1 and result.images[0].seed is None


@respx.mock
async def test_the_seed_header_is_read_when_the_body_has_none(engine: StabilityEngine) -> None:
    body = {"image": base64.b64encode(png_bytes()).decode(), "finish_reason": "SUCCESS"}
    respx.post(SD3).mock(return_value=httpx.Response(200, json=body, headers={"seed": "4294967295"}))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert result.images[0].seed == 4294967295


@respx.mock
@pytest.mark.parametrize("response", [
    ok(reason="CONTENT_FILTERED"),
    ok(headers={"finish-reason": "CONTENT_FILTERED"}),
    httpx.Response(400, json={"id": "x", "name": "content_moderation", "errors": ["flagged"]}),
    httpx.Response(403, json={"id": "x", "name": "content_moderation", "errors": ["flagged"]}),
])
async def test_content_filtered(engine: StabilityEngine, response: httpx.Response) -> None:
    route = respx.post(SD3).mock(return_value=response)
    with pytest.raises(ContentFiltered):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1


@respx.mock
async def test_401_fails_at_once_naming_the_setting(engine: StabilityEngine, caplog: Any) -> None:
    route = respx.post(SD3).mock(return_value=httpx.Response(
        401, json={"id": "x", "name": "unauthorized", "errors": ["bad key sk-stab-secret"]}))
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    assert "STABILITY_API_KEY" in info.value.message and "sk-stab-secret" not in info.value.message
    assert "sk-stab-secret" not in caplog.text


@respx.mock
@pytest.mark.parametrize(("response", "said"), [
    (httpx.Response(402, json={"id": "x", "name": "payment_required", "errors": ["You lack sufficient credits"]}),
     "credits"),
    (httpx.Response(403, json={"id": "x", "name": "forbidden", "errors": ["organization not permitted"]}),
     "STABILITY_API_KEY"),
    (httpx.Response(403, text="<html>Access denied | Cloudflare</html>", headers={"content-type": "text/html"}),
     "STABILITY_API_KEY"),
    (httpx.Response(404, json={"id": "x", "name": "not_found", "errors": ["no such route"]}), "BASE_URL"),
])
async def test_a_refusal_of_the_account_leaves_the_job_to_another_engine(
        engine: StabilityEngine, response: httpx.Response, said: str) -> None:
    # An account out of credits (or a 403 that is not moderation, or a retired endpoint) failed
    # every job routed here as the request's fault, `invalid_request` or `content_filtered`, with
    # no fallback to the next engine.
    route = respx.post(SD3).mock(return_value=response)
    with pytest.raises(EngineUnavailable, match=said) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    assert info.value.retryable and info.value.charged == "no"
    assert info.value.details["status"] == response.status_code


@respx.mock
async def test_bad_request_is_not_retried(engine: StabilityEngine) -> None:
    route = respx.post(SD3).mock(return_value=httpx.Response(
        400, json={"id": "x", "name": "bad_request", "errors": ["strength: must be between 0 and 1"]}))
    with pytest.raises(BadEngineInput, match="strength"):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1


@respx.mock
async def test_a_refused_call_is_not_saved_as_accepted_work(engine: StabilityEngine) -> None:
    # Saved, the refusal's id made the failed job one with provider work: never taken as unbilled.
    respx.post(SD3).mock(return_value=httpx.Response(
        400, json={"id": "x", "name": "bad_request", "errors": ["no"]}, headers={"x-request-id": "req_refused"}))
    progress = RecordingProgress()
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(), progress, CancelToken())
    assert progress.request_ids == [] and info.value.charged == "no"
    assert info.value.details["request_id"] == "req_refused"


# --- polish: upscales ---------------------------------------------------------------------------


def test_operation_rule() -> None:
    assert operation(bridge(creativity=0.9, scale=2)) == "generate"
    assert operation(polish(scale=None, width=64, height=64)) == "generate"
    assert operation(polish(scale=None, width=128, height=64)) == "upscale-conservative"
    assert operation(polish(creativity=0.35)) == "upscale-conservative"
    assert operation(polish(creativity=0.36)) == "upscale-creative"


@respx.mock
@pytest.mark.parametrize(("creativity", "sent"), [(0.05, "0.2"), (0.3, "0.3")])
async def test_conservative_upscale_clamps_creativity(engine: StabilityEngine, creativity: float,
                                                      sent: str) -> None:
    route = respx.post(CONSERVATIVE).mock(return_value=ok())
    result = await engine.run(polish(creativity=creativity), NullProgress(), CancelToken())
    fields = assert_carries_draft(route.calls.last.request)
    assert fields == {"prompt": "a lighthouse", "output_format": "png", "creativity": sent}
    assert result.model == "upscale-conservative"


async def test_scale_above_four_is_refused_before_sending(engine: StabilityEngine) -> None:
    with pytest.raises(BadEngineInput) as info:
        await engine.run(polish(scale=8), NullProgress(), CancelToken())
    assert info.value.retryable
    with pytest.raises(BadEngineInput):
        engine.estimate(polish(scale=8))


@respx.mock
async def test_creative_upscale_polls_until_done(engine: StabilityEngine) -> None:
    create = respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(side_effect=[
        httpx.Response(202, json={"id": "job-42", "status": "in-progress"}),
        httpx.ReadTimeout("slow"),  # a GET makes nothing: it is sent again
        httpx.Response(202, json={"id": "job-42", "status": "in-progress"}),
        done(seed=5),
    ])
    progress = RecordingProgress()
    result = await engine.run(polish(creativity=0.45), progress, CancelToken())

    fields = assert_carries_draft(create.calls.last.request)
    assert fields == {"prompt": "a lighthouse", "output_format": "png", "creativity": "0.45"}
    assert create.call_count == 1 and poll.call_count == 4
    assert poll.calls.last.request.headers["accept"] == "application/json"
    assert progress.request_ids == ["job-42"] and "polling" in progress.states
    assert result.provider_request_id == "job-42" and result.images[0].seed == 5
    assert result.model == "upscale-creative"


@respx.mock
async def test_a_creative_upscale_answered_with_any_2xx_is_read(engine: StabilityEngine) -> None:
    # Taken for a refusal, an upscale the provider took (and billed) was dropped and its hold released.
    respx.post(CREATIVE).mock(return_value=httpx.Response(201, json={"id": "job-42"}))
    respx.get(RESULT).mock(return_value=httpx.Response(203, json=done(seed=5).json()))
    result = await engine.run(polish(creativity=0.45), RecordingProgress(), CancelToken())
    assert result.provider_request_id == "job-42" and result.images[0].seed == 5


@respx.mock
@pytest.mark.parametrize(("unreadable", "status"), [(2, 200), (3, 200), (2, 203)])
async def test_a_creative_result_that_cannot_be_read_is_asked_again_twice(engine: StabilityEngine,
                                                                          unreadable: int, status: int) -> None:
    # The result is kept 24 h: one gateway page with a 200 (any 2xx) lost an upscale made, and paid for.
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(side_effect=[httpx.Response(status, text="<html>gateway</html>")] * unreadable
                                  + [done(seed=5)])
    if unreadable < 3:
        result = await engine.run(polish(creativity=0.45), RecordingProgress(), CancelToken())
        assert result.images[0].seed == 5
    else:
        with pytest.raises(EngineError, match="not JSON") as info:
            await engine.run(polish(creativity=0.45), RecordingProgress(), CancelToken())
        assert info.value.charged == "unknown"
    assert poll.call_count == unreadable + (unreadable < 3)


@respx.mock
@pytest.mark.parametrize("job_id", ["../../../v1/user/balance", "job-42?x=1", "a" * 1_000_000, "job 42"])
async def test_a_creative_upscale_id_that_is_no_id_is_not_followed(engine: StabilityEngine, job_id: str) -> None:
    # The id goes into the path the key is sent to and into the job's row and events: a faulty
    # answer's `../..` sent the key to another endpoint, and a megabyte one was saved with the job.
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": job_id}))
    anything = respx.get(url__startswith=BASE).mock(return_value=done())
    progress = RecordingProgress()
    with pytest.raises(EngineError, match="not an id") as info:
        await engine.run(polish(creativity=0.45), progress, CancelToken())
    assert info.value.charged == "unknown" and anything.call_count == 0
    assert progress.request_ids == [] and len(str(info.value)) < 1000


@respx.mock
async def test_a_finish_reason_is_recorded_short_and_without_the_key(engine: StabilityEngine) -> None:
    # The result keeps the finish reasons (`finish_reasons`), short and without the key.
    respx.post(SD3).mock(return_value=ok(reason="SUCCESS echo Bearer sk-stab-secret " + "x" * 100_000))
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    (reason,) = result.metadata["finish_reasons"]
    assert "sk-stab-secret" not in reason and len(reason) <= 100


@respx.mock
async def test_creative_create_timeout_is_not_resent(engine: StabilityEngine) -> None:
    create = respx.post(CREATIVE).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert create.call_count == 1 and info.value.charged == "unknown"


@respx.mock
@pytest.mark.parametrize("answer", [httpx.Response(503), httpx.Response(429), httpx.ConnectError("down")])
async def test_creative_polling_that_gives_up_is_charged(engine: StabilityEngine, sleep: Any,
                                                        answer: httpx.Response | Exception) -> None:
    # The provider took the job: whatever stops our polling, it runs on and bills.
    engine.http.clock = sleep.clock
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    respx.get(RESULT).mock(side_effect=answer) if isinstance(answer, Exception) else \
        respx.get(RESULT).mock(return_value=answer)
    with pytest.raises(EngineError) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


class ClockedToken(CancelToken):
    """A token whose poll waits take no time but move `now` on: the engine's clock, read by the poll
    loop. Its own wait for a cancel (`race`, an hour at a time) still waits."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        if seconds >= 3600:
            await super().sleep(seconds)
            return
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@respx.mock
async def test_creative_polling_s_last_wait_ends_at_the_deadline(make_engine: Any) -> None:
    # A 5 s poll interval slept whole before the last poll: a job with 1 s left polled 4 s past
    # its deadline (and its poll's own floor of 1 s after that), where Replicate and fal stop there.
    engine = make_engine(remote_deadline=58.0)
    engine.poll_interval = 5.0
    token = ClockedToken()
    engine.http.clock = lambda: token.now
    polled_at: list[float] = []
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))

    def working(request: httpx.Request) -> httpx.Response:
        polled_at.append(token.now)
        return httpx.Response(202, json={"id": "job-42", "status": "in-progress"})

    respx.get(RESULT).mock(side_effect=working)
    with pytest.raises(EngineTimeout) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), token)
    assert info.value.charged == "unknown" and info.value.details["provider_id"] == "job-42"
    assert token.slept[:-1] == [5.0] * 11 and token.slept[-1] == pytest.approx(3.0)
    assert polled_at[-1] == pytest.approx(1058.0) and max(polled_at) <= 1058.0 + 1e-9


@respx.mock
async def test_creative_create_answer_not_json_is_charged(engine: StabilityEngine) -> None:
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, text="<html>"))
    with pytest.raises(EngineError) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_creative_result_expired(engine: StabilityEngine) -> None:
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    respx.get(RESULT).mock(return_value=httpx.Response(404, json={"name": "not_found", "errors": ["gone"]}))
    with pytest.raises(EngineError, match="unknown or expired") as info:
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert info.value.charged == "unknown"


@respx.mock
async def test_creative_result_filtered(engine: StabilityEngine) -> None:
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    respx.get(RESULT).mock(return_value=done(reason="CONTENT_FILTERED"))
    with pytest.raises(ContentFiltered):
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())


@respx.mock
async def test_cancel_during_polling_stops_polling(engine: StabilityEngine) -> None:
    token = CancelToken()
    polls: list[httpx.Request] = []
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))

    def in_progress(request: httpx.Request) -> httpx.Response:
        polls.append(request)
        if len(polls) == 2:
            token.cancel()
        return httpx.Response(202, json={"id": "job-42", "status": "in-progress"})

    poll = respx.get(RESULT).mock(side_effect=in_progress)
    with pytest.raises(Canceled) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), token)
    assert poll.call_count == 2
    assert info.value.charged == "unknown" and info.value.details["provider_id"] == "job-42"


@respx.mock
async def test_cancel_wakes_the_poll_sleep(engine: StabilityEngine) -> None:
    engine.poll_interval = 30
    token = CancelToken()
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(return_value=httpx.Response(202))

    class CancelWhenPolling(RecordingProgress):
        def state(self, state: str, **details: Any) -> None:
            if state == "polling":
                asyncio.get_running_loop().call_later(0.01, token.cancel)

    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(engine.run(polish(creativity=0.45), CancelWhenPolling(), token), timeout=30)
    assert poll.call_count == 0 and info.value.charged == "unknown"


# --- prices and availability --------------------------------------------------------------------


def test_estimate_by_operation_and_unknown_model(make_engine: Any) -> None:
    eng: StabilityEngine = make_engine()
    assert eng.estimate(bridge()) == 6500
    assert eng.estimate(bridge(n=2)) == 13000
    assert eng.estimate(polish()) == 40000
    assert eng.estimate(polish(creativity=0.5)) == 60000
    # A polish given a size is estimated before its draft is read: the draft's recorded size says
    # whether it is an upscale (priced as one) or a same-size refine.
    assert eng.estimate(polish(scale=None, width=1024, height=1024, init_image=None, source_size=(512, 512))) == 40000
    assert eng.estimate(polish(scale=None, width=512, height=512, init_image=None, source_size=(512, 512))) == 6500
    assert make_engine(stability_model="ultra").estimate(bridge()) == 8000
    assert make_engine(stability_model="sd3.5-large-turbo").estimate(bridge()) == 4000
    unknown: StabilityEngine = make_engine(stability_model="sd4-huge")
    with pytest.raises(NoPrice):
        unknown.estimate(bridge())
    # The upscalers are priced on their own, whatever the generation model.
    assert unknown.estimate(polish()) == 40000


def test_unavailable_without_key(make_ctx: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("STABILITY_API_KEY", raising=False)
    monkeypatch.delenv("ORCH_STABILITY_API_KEY", raising=False)
    available, reason = StabilityEngine(make_ctx()).availability()
    assert not available and reason and "STABILITY_API_KEY" in reason


def test_core_has_no_image_to_image_endpoint_so_it_is_unavailable(make_engine: Any) -> None:
    # Posting model=core to generate/sd3 would be refused on every bridge and polish.
    available, reason = make_engine(stability_model="core").availability()
    assert not available and reason and "ORCH_STABILITY_MODEL=core has no image-to-image endpoint" in reason
    assert make_engine().availability() == (True, None)


@respx.mock
async def test_reattach_follows_accepted_creative_upscales(engine: StabilityEngine) -> None:
    create = respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    respx.get(RESULT).mock(return_value=httpx.Response(202, json={"id": "job-42", "status": "in-progress"}))
    progress = RecordingProgress()
    with pytest.raises(EngineTimeout):  # the first process gives up (or dies) while it polls
        engine.http.deadline_seconds = 0
        await engine.run(polish(creativity=0.45), progress, CancelToken())
    assert progress.handles == [{"id": "job-42", "creative": True}]

    engine.http.deadline_seconds = 60
    create.reset()
    respx.get(RESULT).mock(side_effect=[httpx.Response(202, json={"id": "job-42", "status": "in-progress"}),
                                        done(seed=9)])
    result = await engine.reattach(polish(creativity=0.45), progress.handles, RecordingProgress(), CancelToken())
    assert create.call_count == 0
    assert result.images[0].seed == 9 and result.provider_request_id == "job-42"
    assert result.model == "upscale-creative"


@pytest.mark.parametrize("handles", [[{"id": "stab-req-1"}], [], [{"id": "a", "creative": True}] * 2])
async def test_reattach_needs_every_image_as_an_accepted_creative_upscale(
        engine: StabilityEngine, handles: list[dict[str, Any]]) -> None:
    # A synchronous call's request id names an answer that is gone with the process.
    with pytest.raises(EngineError) as caught:
        await engine.reattach(polish(creativity=0.45), handles, NullProgress(), CancelToken())
    assert caught.value.charged == "unknown"


def test_recovery_follows_only_saved_creative_upscales(engine: StabilityEngine) -> None:
    from orchestrator.models import Job
    from orchestrator.runner import reattachable

    params = {"stage": "polish", "prompt": "x", "n": 1, "scale": 2.0, "creativity": 0.45}

    def job(handles: list[dict[str, Any]], engine_name: str = "stability") -> Job:
        return Job(id="job_x", project_id="prj_x", stage="polish", engine="stability", params=params,
                   provider_work={"engine": engine_name, "handles": handles})

    assert reattachable(engine, job([{"id": "job-42", "creative": True}]))
    assert not reattachable(engine, job([{"id": "stab-req-1"}]))  # a synchronous call's answer is gone
    assert not reattachable(engine, job([{"id": "job-42", "creative": True}], engine_name="replicate"))
    assert not reattachable(engine, job([]))


@respx.mock
async def test_images_are_encoded_resized_and_decoded_off_the_event_loop(
        engine: StabilityEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    import tiers.stability

    spy = LoopSpy(monkeypatch, tiers.stability, "encode_image", "decode_image", "shaped_as", "_sized_as_asked")
    respx.post(SD3).mock(return_value=ok())
    result = await engine.run(bridge(width=96, height=64), NullProgress(), CancelToken())
    assert len(result.images) == 1 and spy.on_loop == []
    assert spy.called == {"encode_image", "decode_image", "shaped_as", "_sized_as_asked"}  # the spies saw the work


@respx.mock
async def test_a_reattach_follows_every_creative_upscale_when_one_fails(engine: StabilityEngine) -> None:
    # n=3 after a restart: job-1 expired at Stability (404) ended the follow at once, and job-2
    # and job-3, made and billed, were neither fetched nor kept.
    respx.get(f"{BASE}/v2beta/results/job-1").mock(return_value=httpx.Response(404, json={"errors": ["gone"]}))
    second = respx.get(f"{BASE}/v2beta/results/job-2").mock(return_value=done(seed=2))
    third = respx.get(f"{BASE}/v2beta/results/job-3").mock(return_value=done(seed=3))
    req = polish(creativity=0.45, n=3)
    handles = [{"id": f"job-{i}", "creative": True} for i in (1, 2, 3)]
    with pytest.raises(EngineError) as info:
        await engine.reattach(req, handles, NullProgress(), CancelToken())
    error = info.value
    assert second.call_count == 1 and third.call_count == 1
    assert error.made is not None and [image.seed for image in error.made.images] == [2, 3]
    assert error.charged == "unknown" and "1 of 3 creative upscales failed, 2 made" in error.message
    assert error.cost_millicredits is None  # all three may have billed: the whole estimate


@respx.mock
@pytest.mark.parametrize(("status", "body", "charged"), [
    (400, {"id": "e", "name": "bad_request", "errors": ["image too small"]}, "no"),
    (403, {"id": "e", "name": "content_moderation", "errors": ["flagged"]}, "no"),
    (400, "<html>a proxy's page</html>", "unknown"),  # not Stability's word
    (403, {"id": "e", "name": "forbidden", "errors": ["no access"]}, "unknown"),  # of the key, not the upscale
    # A proxy's (or a firewall's) refusal of the result's GET: providers.md's 403 is Stability's
    # moderation, with its error body; this one says nothing of the upscale Stability accepted,
    # which may have been made, and billed, all the same.
    (403, "<html>Access denied | Cloudflare</html>", "unknown"),
], ids=["failed", "moderated", "proxy", "key", "proxy-403"])
async def test_a_creative_upscale_stability_says_failed_is_not_charged(
        engine: StabilityEngine, status: int, body: Any, charged: str) -> None:
    # Stability bills no failed generation (providers.md): its own answer that the upscale failed
    # was captured for reconciliation all the same, 60 credits a time.
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    answer = {"json": body} if isinstance(body, dict) else {"text": body}
    respx.get(RESULT).mock(return_value=httpx.Response(status, **answer))
    with pytest.raises(EngineError) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert info.value.charged == charged and info.value.work_unbilled == (charged == "no")
    with pytest.raises(EngineError) as followed:
        await engine.reattach(polish(creativity=0.45), [{"id": "job-42", "creative": True}], NullProgress(),
                              CancelToken())
    assert followed.value.charged == charged and followed.value.work_unbilled == (charged == "no")


@respx.mock
async def test_a_reattach_follows_its_creative_upscales_under_one_deadline(engine: StabilityEngine) -> None:
    # They run side by side at Stability: each followed to a deadline of its own, one after another,
    # kept a job whose upscales never finish for n times ORCH_REMOTE_DEADLINE (60 s here).
    now = [0.0]
    engine.http.clock = lambda: now[0]

    def working(request: httpx.Request) -> httpx.Response:
        now[0] += 25.0
        return httpx.Response(202, json={"status": "in-progress"})

    polls = respx.get(url__regex=rf"{BASE}/v2beta/results/job-\d$").mock(side_effect=working)
    with pytest.raises(EngineTimeout) as info:
        await engine.reattach(polish(creativity=0.45, n=3), [{"id": f"job-{i}", "creative": True} for i in (1, 2, 3)],
                              NullProgress(), CancelToken())
    # job-1 polled past the deadline (t=75), then job-2 and job-3 read once each.
    assert polls.call_count == 5 and now[0] == 125.0
    assert info.value.charged == "unknown" and info.value.details["failed"] == 3


@respx.mock
async def test_a_creative_result_answered_as_the_image_s_bytes_is_read(engine: StabilityEngine) -> None:
    # providers.md: the result poll answers "200 bytes/JSON done". Bytes were taken for an
    # unreadable answer, asked twice more, then failed the job charged 'unknown', the upscale lost.
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(return_value=httpx.Response(
        200, content=png_bytes(), headers={"content-type": "image/png", "finish-reason": "SUCCESS", "seed": "7"}))
    req = polish(creativity=0.45)
    result = await engine.run(req, NullProgress(), CancelToken())
    assert poll.call_count == 1 and result.images[0].seed == 7
    assert result.images[0].image.size == (req.width, req.height)
    filtered = httpx.Response(200, content=png_bytes(), headers={"content-type": "image/png",
                                                                 "finish-reason": "CONTENT_FILTERED"})
    poll.mock(return_value=filtered)
    with pytest.raises(ContentFiltered):
        await engine.run(req, NullProgress(), CancelToken())


@respx.mock
async def test_a_reattach_canceled_charges_no_creative_upscale_stability_said_failed(
        engine: StabilityEngine) -> None:
    # n=2: job-1's result is Stability's own error body (not billed), job-2 is canceled while polled
    # (it runs on: billed). The cancel captured the whole estimate, job-1's 60 credits included.
    respx.get(f"{BASE}/v2beta/results/job-1").mock(return_value=httpx.Response(
        400, json={"id": "e", "name": "bad_request", "errors": ["image too small"]}))
    hang = NoAnswer()
    respx.get(f"{BASE}/v2beta/results/job-2").mock(side_effect=hang)
    token = CancelToken()
    req = polish(creativity=0.45, n=2)
    task = asyncio.ensure_future(engine.reattach(req, [{"id": f"job-{i}", "creative": True} for i in (1, 2)],
                                                 NullProgress(), token))
    await hang.sent.wait()
    token.cancel()
    with pytest.raises(Canceled) as info:
        await task
    assert info.value.charged == "unknown" and info.value.cost_millicredits == engine.estimate(req) // 2


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


@respx.mock
@pytest.mark.parametrize("content_type", [None, "application/octet-stream; charset=binary"])
@pytest.mark.parametrize("image", ["png", "jpeg"])
async def test_a_creative_result_of_image_bytes_untyped_is_read(engine: StabilityEngine, content_type: str | None,
                                                                image: str) -> None:
    # The image's bytes under no content type, or a generic one (a proxy's or a CDN's default):
    # taken for an unreadable answer, asked twice more, and the job failed charged 'unknown'.
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    headers = {"seed": "7"} if content_type is None else {"content-type": content_type, "seed": "7"}
    poll = respx.get(RESULT).mock(return_value=httpx.Response(
        200, content=png_bytes() if image == "png" else jpeg_bytes(), headers=headers))
    result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 1 and result.images[0].seed == 7
    poll.mock(return_value=httpx.Response(200, content=b"<html>bad gateway</html>",
                                          headers={"content-type": "application/octet-stream"}))
    with pytest.raises(EngineError) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 1 + 3 and info.value.charged == "unknown"  # not an image: asked again, as ever


@respx.mock
async def test_a_reattach_s_upscale_read_past_the_deadline_is_asked_again_after_a_503(
        engine: StabilityEngine) -> None:
    # job-1 polled until t=75, past the shared deadline (60 s); job-2, done long since, was then read
    # with a single attempt: one 503 lost its upscale, made and paid for.
    now = [0.0]
    engine.http.clock = lambda: now[0]

    def working(request: httpx.Request) -> httpx.Response:
        now[0] += 25.0
        return httpx.Response(202, json={"status": "in-progress"})

    respx.get(f"{BASE}/v2beta/results/job-1").mock(side_effect=working)
    second = respx.get(f"{BASE}/v2beta/results/job-2").mock(side_effect=[httpx.Response(503), done(seed=2)])
    req = polish(creativity=0.45, n=2)
    with pytest.raises(EngineTimeout) as info:
        await engine.reattach(req, [{"id": f"job-{i}", "creative": True} for i in (1, 2)], NullProgress(),
                              CancelToken())
    assert now[0] == 75.0 and second.call_count == 2
    assert info.value.made is not None and [image.seed for image in info.value.made.images] == [2]
    assert "1 of 2 creative upscales failed, 1 made" in info.value.message


@respx.mock
async def test_a_reattach_s_reads_past_the_deadline_share_one_more(engine: StabilityEngine, sleep: Any) -> None:
    # Stability down (every result a 503): job-1 is asked until the deadline, job-2 until one more,
    # job-3 once; not a deadline each (the 133 s of one at a time).
    engine.http.clock = sleep.clock
    polls = respx.get(url__startswith=f"{BASE}/v2beta/results/").mock(return_value=httpx.Response(503))
    with pytest.raises(EngineError):
        await engine.reattach(polish(creativity=0.45, n=3), [{"id": f"job-{i}", "creative": True} for i in (1, 2, 3)],
                              NullProgress(), CancelToken())
    assert 60 < sum(sleep.waits) <= 2 * 60 and polls.call_count > 3


def webp_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 10, 200)).save(buffer, format="WEBP")
    return buffer.getvalue()


@respx.mock
@pytest.mark.parametrize("content_type", [None, "image/png"])
@pytest.mark.parametrize("image", ["png", "jpeg", "webp"])
async def test_a_creative_result_of_image_bytes_cut_short_is_asked_again(
        engine: StabilityEngine, content_type: str | None, image: str) -> None:
    # The image's bytes cut short (a proxy ending the body early): since 57dabc8 they were taken for
    # the image, failed to decode, and the upscale, paid for, was lost with no second look.
    whole = {"png": png_bytes, "jpeg": jpeg_bytes, "webp": webp_bytes}[image]()
    headers = {"seed": "7"} if content_type is None else {"content-type": content_type, "seed": "7"}
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    tiny = whole[:3 if image != "webp" else 10]  # cut inside its signature
    poll = respx.get(RESULT).mock(side_effect=[httpx.Response(200, content=whole[:len(whole) // 2], headers=headers),
                                               httpx.Response(200, content=tiny, headers=headers),
                                               httpx.Response(200, content=whole, headers=headers)])
    result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 3 and result.images[0].seed == 7


@respx.mock
async def test_a_creative_result_of_json_typed_as_an_image_is_read_as_json(engine: StabilityEngine) -> None:
    # JSON under an image/* type (a proxy's rewrite): read as the image's bytes since 57dabc8, it
    # failed to decode and the upscale, paid for, was lost.
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    body = {"result": base64.b64encode(png_bytes()).decode(), "finish_reason": "SUCCESS", "seed": 7}
    poll = respx.get(RESULT).mock(return_value=httpx.Response(200, content=json.dumps(body).encode(),
                                                              headers={"content-type": "image/png"}))
    result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 1 and result.images[0].seed == 7


@respx.mock
@pytest.mark.parametrize("content_type", [None, "image/png"])
async def test_a_creative_result_of_a_png_with_bytes_after_its_end_is_the_image(
        engine: StabilityEngine, content_type: str | None) -> None:
    # Decoders read a PNG to its IEND chunk and ignore what follows (a padded or appended body); since
    # 3d3cb41 a body not ending at IEND was taken for one cut short, asked for until the poll gave up,
    # and the upscale, paid for and whole, lost.
    padded = png_bytes() + b"\x00" * 16 + b"trailer"
    Image.open(io.BytesIO(padded)).load()
    headers = {"seed": "7"} if content_type is None else {"content-type": content_type, "seed": "7"}
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(return_value=httpx.Response(200, content=padded, headers=headers))
    result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 1 and result.images[0].seed == 7


@respx.mock
@pytest.mark.parametrize("image", [True, False], ids=["with-image", "without"])
async def test_an_answer_whose_finish_reason_is_error_fails_unbilled(engine: StabilityEngine, image: bool) -> None:
    # providers.md: Stability charges nothing for a failed generation. An answer saying ERROR with
    # an image was taken for the image (stored, its hold captured); without one it failed `no_image`
    # charged 'unknown', its hold captured for reconciliation.
    answer = ok(reason="ERROR")
    if not image:
        answer = httpx.Response(200, json={"finish_reason": "ERROR", "seed": 1})
    route = respx.post(SD3).mock(return_value=answer)
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    error = info.value
    assert type(error) is EngineError and error.code == "engine_error" and "finish_reason ERROR" in error.message
    assert error.charged == "no" and error.work_unbilled and error.made is None
    assert error.details["reason"] == "ERROR" and route.call_count == 1


@respx.mock
async def test_a_creative_result_whose_finish_reason_is_error_fails_unbilled(engine: StabilityEngine) -> None:
    # The result of a finished creative upscale, as JSON or as the image's bytes (its reason in a header).
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(return_value=done(reason="ERROR"))
    with pytest.raises(EngineError) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert info.value.charged == "no" and info.value.work_unbilled
    poll.mock(return_value=httpx.Response(200, content=png_bytes(), headers={"content-type": "image/png",
                                                                             "finish-reason": "ERROR"}))
    with pytest.raises(EngineError) as info:
        await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert info.value.charged == "no" and info.value.work_unbilled


@respx.mock
async def test_an_error_finish_after_an_image_made_charges_that_image_only(engine: StabilityEngine) -> None:
    respx.post(SD3).mock(side_effect=[ok(seed=1), ok(seed=2, reason="ERROR")])
    req = bridge(n=2)
    with pytest.raises(EngineError) as info:
        await engine.run(req, NullProgress(), CancelToken())
    made = info.value.made
    assert made is not None and [image.seed for image in made.images] == [1]
    assert info.value.charged == "unknown" and info.value.cost_millicredits == engine.estimate(req) // 2


@respx.mock
async def test_a_reattach_s_creative_result_whose_finish_reason_is_error_is_not_charged(
        engine: StabilityEngine) -> None:
    respx.get(f"{BASE}/v2beta/results/job-1").mock(return_value=done(seed=1, reason="ERROR"))
    respx.get(f"{BASE}/v2beta/results/job-2").mock(return_value=done(seed=2))
    req = polish(creativity=0.45, n=2)
    with pytest.raises(EngineError) as info:
        await engine.reattach(req, [{"id": f"job-{i}", "creative": True} for i in (1, 2)], NullProgress(),
                              CancelToken())
    assert info.value.made is not None and [image.seed for image in info.value.made.images] == [2]
    assert info.value.charged == "unknown" and info.value.cost_millicredits == engine.estimate(req) // 2


def jpeg_with_a_comment(comment: bytes) -> bytes:
    """`jpeg_bytes()` with a COM segment after its SOI: marker segments hold any bytes, an end
    marker's (FFD9) among them (an EXIF thumbnail is a JPEG of its own, with its own)."""
    whole = jpeg_bytes()
    return whole[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + whole[2:]


@respx.mock
@pytest.mark.parametrize("content_type", [None, "image/jpeg"])
async def test_a_creative_result_of_a_jpeg_with_bytes_after_its_end_is_the_image(
        engine: StabilityEngine, content_type: str | None) -> None:
    # As a PNG's after IEND (832eb65): decoders stop at a JPEG's end marker (FFD9) and ignore what
    # follows, but a body not ending with it was taken for one cut short, asked for until the poll
    # gave up, and the upscale, paid for and whole, lost.
    padded = jpeg_with_a_comment(b"thumb\xff\xd9") + b"\x00" * 16 + b"trailer"
    Image.open(io.BytesIO(padded)).load()
    headers = {"seed": "7"} if content_type is None else {"content-type": content_type, "seed": "7"}
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(return_value=httpx.Response(200, content=padded, headers=headers))
    result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 1 and result.images[0].seed == 7


@respx.mock
@pytest.mark.parametrize("content_type", [None, "image/jpeg"])
async def test_a_creative_result_of_a_jpeg_cut_short_then_padded_is_asked_again(
        engine: StabilityEngine, content_type: str | None) -> None:
    # Cut before its end marker, whatever follows (padding, an FFD9 of a segment read before the cut):
    # still one cut short, asked again until the whole image comes.
    whole = jpeg_with_a_comment(b"thumb\xff\xd9")
    headers = {"seed": "7"} if content_type is None else {"content-type": content_type, "seed": "7"}
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(side_effect=[
        httpx.Response(200, content=whole[:len(whole) // 2] + b"\x00" * 16 + b"trailer", headers=headers),
        httpx.Response(200, content=whole[:len(whole) // 2], headers=headers),
        httpx.Response(200, content=whole, headers=headers)])
    result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 3 and result.images[0].seed == 7


def python_lines(function: Any, *args: Any, limit: int = 100_000) -> int:
    """How many lines of `function`'s own body Python runs for `args` (what the regex engine or a
    bytes method does in C is not counted), counted up to `limit`: a bound on its work that does
    not hang on the machine's load, as a timing would."""
    lines = 0
    code = function.__code__

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
            if lines >= limit:
                frame.f_trace_lines = False  # enough: the rest runs untraced
        return local

    before = sys.gettrace()
    sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
    try:
        function(*args)
    finally:
        sys.settrace(before)
    return lines


SOS = b"\xff\xda\x00\x02"  # a scan's header, as short as one can be: its coded data follows


@pytest.mark.parametrize(("body", "whole"), [
    (b"\xff\xd8" + b"\xff" * 2**18 + b"\xd9", True),  # fill bytes before a marker
    (b"\xff\xd8" + SOS + b"\xff" * 2**18, False),  # fill bytes in a scan, and no end
    (b"\xff\xd8" + SOS + b"\xff\xd0" * 2**17 + b"\xff\xd9", True),  # restart markers
    (b"\xff\xd8" + SOS + b"\xff\x00" * 2**17, False),  # stuffed bytes, cut short
    (b"\xff\xd8" + b"\xff\x01" * 2**17, False),  # TEM markers, standing alone
    (b"\xff\xd8" + b"\xff\xfe\x00\x02" * 2**16 + b"\xff\xd9", True),  # empty comments
], ids=["fill", "scan-fill", "restarts", "stuffed", "tem", "comments"])
def test_a_jpeg_s_end_is_found_in_a_bounded_number_of_python_steps(body: bytes, whole: bool) -> None:
    # Each byte of these took a turn of a Python loop (some 0.4 us): 256 MiB, as large as an answer
    # is read (`tiers._http.MAX_ANSWER_BYTES`; gzip makes that some 250 KiB sent), held the event
    # loop (`_readable` runs on it) for 100 s and more where `rstrip` had taken milliseconds.
    assert python_lines(_jpeg_ended, body) < 20_000
    assert _whole_image(body) is whole


def jpeg_with_junk_and_a_thumbnail() -> tuple[bytes, int]:
    """`jpeg_bytes()` with two bytes that are no marker after its APP0, then an APP1 holding a JPEG
    thumbnail (which ends with its own FFD9); and where that thumbnail ends."""
    whole = jpeg_bytes()
    assert whole[2:4] == b"\xff\xe0"
    after_app0 = 4 + int.from_bytes(whole[4:6], "big")
    thumbnail = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(thumbnail, format="JPEG")
    payload = b"Exif\x00\x00" + thumbnail.getvalue()
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    body = whole[:after_app0] + b"\x00\x00" + app1 + whole[after_app0:]
    return body, after_app0 + 2 + len(app1)


@respx.mock
@pytest.mark.parametrize("content_type", [None, "image/jpeg"])
async def test_a_creative_result_of_a_jpeg_with_bytes_between_its_segments_is_read_as_decoders_read_it(
        engine: StabilityEngine, content_type: str | None) -> None:
    # Bytes between two segments that are no marker: libjpeg and Pillow skip them (it loads), but
    # the walk gave up there and the old rule judged: cut just after its thumbnail's own FFD9, the
    # body was taken for whole, failed to decode and the upscale, paid for, was lost with no second
    # look; whole and padded, it was asked for until the poll gave up.
    whole, thumbnail_end = jpeg_with_junk_and_a_thumbnail()
    Image.open(io.BytesIO(whole)).load()
    assert whole[thumbnail_end - 2:thumbnail_end] == b"\xff\xd9"
    headers = {"seed": "7"} if content_type is None else {"content-type": content_type, "seed": "7"}
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(side_effect=[
        httpx.Response(200, content=whole[:thumbnail_end], headers=headers),
        httpx.Response(200, content=whole + b"\x00" * 16 + b"trailer", headers=headers)])
    result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 2 and result.images[0].seed == 7


def png_with_a_thumbnail() -> tuple[bytes, int]:
    """`png_bytes()` with an ancillary chunk of its own holding a PNG thumbnail (as a C2PA manifest's
    `caBX` chunk may), whose IEND chunk it holds too; and where that thumbnail ends."""
    whole = png_bytes()
    thumbnail = png_bytes((10, 10, 200), (8, 8))
    chunk = len(thumbnail).to_bytes(4, "big") + b"thMb" + thumbnail
    chunk += zlib.crc32(b"thMb" + thumbnail).to_bytes(4, "big")
    after_ihdr = 8 + 12 + 13
    return whole[:after_ihdr] + chunk + whole[after_ihdr:], after_ihdr + 8 + len(thumbnail)


@respx.mock
@pytest.mark.parametrize("content_type", [None, "image/png"])
async def test_a_creative_result_of_a_png_cut_after_an_iend_its_chunks_hold_is_asked_again(
        engine: StabilityEngine, content_type: str | None) -> None:
    # A PNG's IEND bytes anywhere were its end (832eb65): one holding a PNG of its own in a chunk (a
    # thumbnail), cut just after that one's IEND, was taken for whole, failed to decode, and the
    # upscale, paid for, was lost without a second look. Its end is found chunk by chunk now, as a
    # JPEG's is segment by segment (af3a9b0).
    whole, thumbnail_end = png_with_a_thumbnail()
    Image.open(io.BytesIO(whole)).load()
    assert whole[thumbnail_end - 8:thumbnail_end - 4] == b"IEND"
    headers = {"seed": "7"} if content_type is None else {"content-type": content_type, "seed": "7"}
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(side_effect=[
        httpx.Response(200, content=whole[:thumbnail_end], headers=headers),
        httpx.Response(200, content=whole + b"\x00" * 16 + b"trailer", headers=headers)])
    result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
    assert poll.call_count == 2 and result.images[0].seed == 7


@respx.mock
@pytest.mark.parametrize("follow", ["run", "reattach"])
async def test_a_creative_result_s_end_is_looked_for_while_the_event_loop_runs_on(
        engine: StabilityEngine, monkeypatch: pytest.MonkeyPatch, follow: str) -> None:
    # Each poll's answer was judged whole or cut short (`_readable`) on the event loop: a hostile
    # 256 MiB JPEG (stuffed bytes in a scan, gzip sends it in some 250 KiB) held it some 1.5-6 s,
    # every other job's polls, event streams and lease renewals with it. Each look at an answer
    # waits here for a ticker on the loop to run: on the loop itself, it never could.
    import tiers.stability

    real = tiers.stability._whole_image
    ticked = threading.Event()
    ran_meanwhile: list[bool] = []

    def looking(content: bytes) -> bool | None:
        ticked.clear()
        ran_meanwhile.append(ticked.wait(timeout=5))
        return real(content)

    async def ticker() -> None:
        while True:
            ticked.set()
            await asyncio.sleep(0.001)

    monkeypatch.setattr(tiers.stability, "_whole_image", looking)
    hostile = b"\xff\xd8" + SOS + b"\xff\x00" * 2**16  # a scan that never ends: cut short, asked again
    headers = {"content-type": "image/jpeg", "seed": "7"}
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    poll = respx.get(RESULT).mock(side_effect=[httpx.Response(200, content=hostile, headers=headers),
                                               httpx.Response(200, content=jpeg_bytes(), headers=headers)])
    ticking = asyncio.create_task(ticker())
    try:
        if follow == "run":
            result = await engine.run(polish(creativity=0.45), NullProgress(), CancelToken())
        else:
            result = await engine.reattach(polish(creativity=0.45), [{"id": "job-42", "creative": True}],
                                           NullProgress(), CancelToken())
    finally:
        ticking.cancel()
    assert poll.call_count == 2 and result.images[0].seed == 7
    assert len(ran_meanwhile) >= 2 and all(ran_meanwhile), ran_meanwhile  # both answers looked at


@respx.mock
@pytest.mark.parametrize("status", [400, 403, 503])
async def test_an_error_answer_of_megabytes_is_not_parsed_on_the_event_loop(
        engine: StabilityEngine, loop_parses: list[int], status: int) -> None:
    # An error's body was read whole as JSON on the event loop for what it says (Stability's error
    # name, a message, a retry delay): 32 MiB of `[0,0,...]` took 1.6 s here, 256 MiB (as large as
    # an answer is read, some 250 KiB gzipped) would take some 12 s, every other job held meanwhile.
    body = b'{"id": "x", "name": "bad_request", "errors": [' + b"0," * 2**22 + b"0]}"
    respx.post(SD3).mock(return_value=httpx.Response(status, content=body,
                                                     headers={"content-type": "application/json"}))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "no"  # nothing was made
    assert all(size < len(body) for size in loop_parses), loop_parses  # never the whole body


@respx.mock
@pytest.mark.parametrize("follow", ["run", "reattach"])
@pytest.mark.parametrize("check_ends", [True, False])
async def test_a_cancel_during_a_long_creative_result_check_answers_keeping_the_image_it_can(
        engine: StabilityEngine, monkeypatch: pytest.MonkeyPatch, follow: str, check_ends: bool) -> None:
    # The check of a creative result's answer (`_readable`, in a worker thread: seconds for a hostile
    # 256 MiB one) was not raced against a cancel: the cancel waited for it, however long. The
    # answer is the upscale made and billed: a check that ends within the bound keeps its image.
    import tiers.stability

    engine.output_kept_seconds = 0.05 if not check_ends else 5.0
    real = tiers.stability._readable
    checking, release = threading.Event(), threading.Event()

    def slow(response: httpx.Response) -> bool:
        checking.set()
        release.wait(timeout=30)
        return real(response)

    monkeypatch.setattr(tiers.stability, "_readable", slow)
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    respx.get(RESULT).mock(return_value=done(seed=7))
    token = CancelToken()
    req = polish(creativity=0.45)
    running = asyncio.create_task(
        engine.run(req, NullProgress(), token) if follow == "run"
        else engine.reattach(req, [{"id": "job-42", "creative": True}], NullProgress(), token))
    try:
        await asyncio.wait_for(asyncio.to_thread(checking.wait, 5), 10)
        token.cancel()
        if check_ends:
            await asyncio.sleep(0.01)
            release.set()
        with pytest.raises(Canceled) as info:
            await asyncio.wait_for(running, 5)
    finally:
        release.set()
    if check_ends:
        made = info.value.made
        assert made is not None and len(made.images) == 1 and made.images[0].seed == 7
        assert info.value.charged == "yes" and info.value.cost_millicredits is None
    else:
        assert info.value.made is None and info.value.charged == "unknown"


@respx.mock
@pytest.mark.parametrize(("follow", "op"), [("run", "generate"), ("run", "creative"), ("reattach", "creative")])
async def test_a_cancel_during_the_read_of_a_failed_generation_releases_the_hold(
        engine: StabilityEngine, monkeypatch: pytest.MonkeyPatch, follow: str, op: str) -> None:
    # The answer says the generation failed (finish reason ERROR), which Stability bills not; the
    # user's cancel came while it was read in its worker thread. Read before the cancel was raced
    # against it, the hold was released; raced, the read's failure was dropped and the job's hold
    # captured as "unknown", for a person to reconcile a generation nobody billed.
    reading, release = held_reads(monkeypatch)
    if op == "generate":
        respx.post(SD3).mock(return_value=ok(reason="ERROR"))
        req = bridge()
    else:
        respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
        respx.get(RESULT).mock(return_value=done(reason="ERROR"))
        req = polish(creativity=0.45)
    token = CancelToken()
    running = asyncio.create_task(
        engine.run(req, NullProgress(), token) if follow == "run"
        else engine.reattach(req, [{"id": "job-42", "creative": True}], NullProgress(), token))
    await cancel_while_read(reading, release, token)
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    assert info.value.made is None and info.value.charged == "no" and info.value.work_unbilled


@respx.mock
async def test_a_stop_during_the_read_of_a_generation_s_answer_keeps_its_image(
        engine: StabilityEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stop (the process shutting down) that abandons the job while the image a generate call
    # answered is read: nobody can follow that call after the restart (Stability keeps no job of
    # it), so the answer in hand is the image. Read before the cancel was raced against it, it was
    # kept; raced, a stop ended the job at once, the image made and paid for lost, charged unknown.
    reading, release = held_reads(monkeypatch)
    respx.post(SD3).mock(return_value=ok(seed=7))
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(), NullProgress(), token))
    await cancel_while_read(reading, release, token, abandon=True)
    result = await asyncio.wait_for(running, 5)
    assert [image.seed for image in result.images] == [7]


@respx.mock
@pytest.mark.parametrize(("follow", "op"), [("run", "generate"), ("run", "creative"), ("reattach", "creative")])
async def test_an_image_kept_at_a_cancel_carries_its_finish_reason(
        engine: StabilityEngine, monkeypatch: pytest.MonkeyPatch, follow: str, op: str) -> None:
    # A user's cancel met the read of an answer, which ended within the bound: its image was kept
    # (charged as made), but its finish reason was dropped, so the result's `finish_reasons` held
    # one fewer than its images, unlike a read that ended before the cancel.
    reading, release = held_reads(monkeypatch)
    engine.output_kept_seconds = 5.0
    if op == "generate":
        respx.post(SD3).mock(return_value=ok(seed=7, reason="SUCCESS"))
        req = bridge()
    else:
        respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
        respx.get(RESULT).mock(return_value=done(seed=7, reason="SUCCESS"))
        req = polish(creativity=0.45)
    token = CancelToken()
    running = asyncio.create_task(
        engine.run(req, NullProgress(), token) if follow == "run"
        else engine.reattach(req, [{"id": "job-42", "creative": True}], NullProgress(), token))
    await cancel_while_read(reading, release, token)
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    made = info.value.made
    assert made is not None and [image.seed for image in made.images] == [7] and info.value.charged == "yes"
    assert made.metadata["finish_reasons"] == ["SUCCESS"]


@respx.mock
@pytest.mark.parametrize("follow", ["run", "reattach"])
@pytest.mark.parametrize("answer", ["image", "working", "never", "abandoned"])
async def test_a_cancel_while_a_creative_result_is_fetched_keeps_the_image_it_brings(
        engine: StabilityEngine, follow: str, answer: str) -> None:
    # The poll out when the user's cancel came may be the one bringing the upscale, made and billed
    # (an image of megabytes takes a while to come): dropped, the image was lost and the job charged
    # unknown, where an answer in hand, being checked or read, is kept (`_kept_at_cancel`).
    engine.output_kept_seconds = 0.05 if answer == "never" else 5.0
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    held = HeldRequest(done(seed=7) if answer != "working" else httpx.Response(202, json={"id": "job-42"}))
    respx.get(RESULT).mock(side_effect=held)
    token = CancelToken()
    req = polish(creativity=0.45)
    running = asyncio.create_task(
        engine.run(req, NullProgress(), token) if follow == "run"
        else engine.reattach(req, [{"id": "job-42", "creative": True}], NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel(abandon=answer == "abandoned")
    await asyncio.sleep(0.01)
    if answer in ("image", "working"):
        held.answer.set()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    made = info.value.made
    if answer == "image":
        assert held.answered and not held.dropped
        assert made is not None and [image.seed for image in made.images] == [7]
        assert made.metadata["finish_reasons"] == ["SUCCESS"] and info.value.charged == "yes"
    else:  # still working (Stability has no cancel: it may bill), never answered, or another process follows it
        assert made is None and info.value.charged == "unknown"
        assert held.dropped == (answer != "working")


@respx.mock
@pytest.mark.parametrize("follow", ["run", "reattach"])
@pytest.mark.parametrize(("status", "body", "charged"), [
    (400, {"id": "e", "name": "bad_request", "errors": ["image too small"]}, "no"),  # Stability's word: failed
    (403, "<html>Access denied | Cloudflare</html>", "unknown"),  # a proxy's: says nothing of the upscale
], ids=["failed", "proxy"])
async def test_a_cancel_while_a_creative_result_is_fetched_that_answers_it_failed_releases_the_hold(
        engine: StabilityEngine, follow: str, status: int, body: Any, charged: str) -> None:
    # The poll a user's cancel finds out is let answer: an answer that Stability's own error body
    # says the upscale failed (which it bills not) released the hold when read before the cancel,
    # but was captured `unknown` when read in the cancel's window.
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    answer = {"json": body} if isinstance(body, dict) else {"text": body}
    held = HeldRequest(httpx.Response(status, **answer))
    respx.get(RESULT).mock(side_effect=held)
    token = CancelToken()
    req = polish(creativity=0.45)
    running = asyncio.create_task(
        engine.run(req, NullProgress(), token) if follow == "run"
        else engine.reattach(req, [{"id": "job-42", "creative": True}], NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    await asyncio.sleep(0.01)
    held.answer.set()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    assert held.answered and info.value.made is None
    assert info.value.charged == charged and info.value.work_unbilled == (charged == "no")


@respx.mock
async def test_a_stop_during_the_read_of_a_creative_result_leaves_no_error_unretrieved(
        engine: StabilityEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A stop (abandoning the job: another process reads the upscale again) that meets a creative
    # result's read in its worker thread ends the job at once; the read, left to its thread, then
    # failed (an answer that is no image): its error was never retrieved, which asyncio logs as an
    # ERROR ("Task exception was never retrieved") for a job that ended as it should.
    import gc

    reading, release = held_reads(monkeypatch)
    respx.get(RESULT).mock(return_value=httpx.Response(200, json={"result": "", "finish_reason": "SUCCESS"}))
    token = CancelToken()
    running = asyncio.create_task(engine.reattach(polish(creativity=0.45), [{"id": "job-42", "creative": True}],
                                                  NullProgress(), token))
    try:
        await asyncio.wait_for(asyncio.to_thread(reading.wait, 5), 10)
        token.cancel(abandon=True)
        with pytest.raises(Canceled) as info:
            await asyncio.wait_for(running, 5)
    finally:
        release.set()
    assert info.value.charged == "unknown"
    del info, running
    for _ in range(20):  # the thread's end, and the loop's hand-off of its outcome
        await asyncio.sleep(0.05)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


@respx.mock
async def test_a_cancel_while_a_creative_result_is_fetched_keeps_one_answered_with_any_2xx(
        engine: StabilityEngine) -> None:
    # Read before the cancel, a result answered 203 (a proxy's) is the upscale, as a 200 is (`test_a_
    # creative_upscale_answered_with_any_2xx_is_read`); in the cancel's window only a 200 was, and
    # the upscale, made and billed, was lost and the job charged `unknown`.
    engine.output_kept_seconds = 5.0
    respx.post(CREATIVE).mock(return_value=httpx.Response(200, json={"id": "job-42"}))
    held = HeldRequest(httpx.Response(203, json=done(seed=7).json()))
    respx.get(RESULT).mock(side_effect=held)
    token = CancelToken()
    running = asyncio.create_task(engine.run(polish(creativity=0.45), NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    await asyncio.sleep(0.01)
    held.answer.set()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(running, 5)
    made = info.value.made
    assert made is not None and [image.seed for image in made.images] == [7] and info.value.charged == "yes"
