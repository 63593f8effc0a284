"""What each engine says it used (`RenderResult.metadata`, the image's record): the value it sent,
as it sent it (clamped, or under another name), and None for a parameter it sends no field for,
which the record then leaves out. An image must not claim a negative prompt, steps or a strength
that never reached the model."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from tests.tiers.conftest import EngineFactory, RecordingProgress, bridge, draft_image, multipart, png_bytes
from tests.tiers.test_comfyui import WORKFLOW, mock_server, write_workflow
from tests.tiers.test_gemini import ok_body as gemini_body
from tests.tiers.test_openai_images import ok as openai_ok
from tiers.a1111 import A1111Engine
from tiers.base import RECORDED_PARAMETERS, CancelToken, NullProgress, RenderRequest, Stage
from tiers.comfyui import ComfyUIEngine
from tiers.fal import FalEngine
from tiers.gemini import GeminiEngine
from tiers.openai_images import OpenAIImagesEngine
from tiers.replicate import ReplicateEngine
from tiers.stability import StabilityEngine

# Every parameter a request may carry, set, so that an engine that records the job's value shows.
ASKED: dict[str, Any] = {"negative_prompt": "blurry", "steps": 30, "guidance_scale": 5.0, "strength": 0.4,
                         "quality": "medium", "creativity": 0.05}
NONE_TAKEN = dict.fromkeys(("steps", "guidance_scale", "sampler", "strength", "quality", "creativity"))


def said(metadata: dict[str, Any]) -> dict[str, Any]:
    """What the metadata says of the recorded parameters; `scale` stays the job's everywhere, an
    upscaler is named only by the engine that used one (`test_a1111`), and sampler settings by the
    local engines (`test_the_local_engines_record_what_their_pipelines_were_given`)."""
    assert "scale" not in metadata
    return {key: metadata[key] for key in RECORDED_PARAMETERS if key not in ("scale", "upscaler", "sampler_settings")}


def polish(**kw: Any) -> RenderRequest:
    return bridge(**{**ASKED, "stage": "polish", "scale": 2.0, **kw})


# --- the cloud models that take a prompt and an image only --------------------------------------


@respx.mock
@pytest.mark.parametrize("stage", ["bridge", "polish"])
async def test_gemini_records_none_of_the_parameters_it_has_no_field_for(make_ctx: Any, stage: str) -> None:
    engine = GeminiEngine(make_ctx(gemini_api_key="g", gemini_base_url="https://gemini.test"))
    route = respx.post("https://gemini.test/v1beta/models/gemini-3.1-flash-image:generateContent").mock(
        return_value=httpx.Response(200, json=gemini_body()))
    result = await engine.run(bridge(**ASKED, stage=stage), NullProgress(), CancelToken())
    sent = route.calls.last.request.content.decode()
    assert "blurry" not in sent and "0.4" not in sent
    assert said(result.metadata) == {"negative_prompt": None, **NONE_TAKEN}


@respx.mock
async def test_openai_records_the_quality_it_sent_and_nothing_else(make_ctx: Any) -> None:
    engine = OpenAIImagesEngine(make_ctx(openai_api_key="o", openai_base_url="https://openai.test"))
    route = respx.post("https://openai.test/v1/images/edits").mock(return_value=openai_ok())
    result = await engine.run(bridge(**{**ASKED, "quality": "medium"}), NullProgress(), CancelToken())
    fields, _ = multipart(route.calls.last.request)
    assert fields["quality"] == "medium" and "negative_prompt" not in fields and "blurry" not in fields["prompt"]
    assert said(result.metadata) == {"negative_prompt": None, **NONE_TAKEN, "quality": "medium"}
    # A quality it does not know is sent as "high": recorded as sent.
    await engine.run(bridge(**{**ASKED, "quality": "ultra"}), NullProgress(), CancelToken())
    assert multipart(route.calls.last.request)[0]["quality"] == "high"


@respx.mock
@pytest.mark.parametrize("model", ["google/nano-banana-2", "black-forest-labs/flux-1.1-pro"])
async def test_replicate_records_none_of_the_parameters_its_models_take_no_input_for(make_ctx: Any,
                                                                                       model: str) -> None:
    base = "https://replicate.test"
    engine = ReplicateEngine(make_ctx(replicate_api_key="r", replicate_base_url=base, replicate_model=model))
    engine.poll_interval = 0
    output = "https://cdn.replicate.test/p-1/out.png"
    create = respx.post(f"{base}/v1/models/{model}/predictions").mock(return_value=httpx.Response(201, json={
        "id": "p-1", "status": "succeeded", "output": output, "metrics": {"predict_time": 1.0}}))
    respx.get(f"{base}/v1/predictions/p-1").mock(return_value=httpx.Response(200, json={
        "id": "p-1", "status": "succeeded", "output": output}))
    respx.get(output).mock(return_value=httpx.Response(200, content=png_bytes()))
    result = await engine.run(bridge(**ASKED), NullProgress(), CancelToken())
    sent = json.loads(create.calls.last.request.content)["input"]
    assert not {"negative_prompt", "steps", "num_inference_steps", "guidance", "guidance_scale", "strength",
                "prompt_strength", "quality", "creativity"} & set(sent)
    assert said(result.metadata) == {"negative_prompt": None, **NONE_TAKEN}
    # After a restart, the predictions it follows again were sent the same input.
    again = await engine.reattach(bridge(**ASKED), [{"id": "p-1"}], NullProgress(), CancelToken())
    assert said(again.metadata) == said(result.metadata)


@respx.mock
async def test_fal_records_none_of_the_parameters_it_has_no_field_for(make_ctx: Any) -> None:
    engine = FalEngine(make_ctx(fal_api_key="f", fal_base_url="https://fal.test"))
    engine.poll_interval = 0
    queue = "https://queue.fal.test/fal-ai/nano-banana-2/requests/r-1"
    output = "https://v3.fal.media/files/out.png"
    submit = respx.post("https://fal.test/fal-ai/nano-banana-2/edit").mock(return_value=httpx.Response(200, json={
        "request_id": "r-1", "response_url": queue, "status_url": f"{queue}/status", "cancel_url": f"{queue}/cancel"}))
    respx.get(f"{queue}/status").mock(return_value=httpx.Response(200, json={"status": "COMPLETED"}))
    respx.get(queue).mock(return_value=httpx.Response(200, json={"images": [{"url": output}]}))
    respx.get(output).mock(return_value=httpx.Response(200, content=png_bytes()))
    result = await engine.run(bridge(**ASKED), NullProgress(), CancelToken())
    assert set(json.loads(submit.calls.last.request.content)) == {"prompt", "num_images", "output_format",
                                                                  "resolution", "image_urls"}
    assert said(result.metadata) == {"negative_prompt": None, **NONE_TAKEN}


# --- Stability: what each endpoint was sent ------------------------------------------------------

STABILITY = "https://stability.test/v2beta/stable-image"


def stability_ok() -> httpx.Response:
    return httpx.Response(200, json={"image": base64.b64encode(png_bytes()).decode(), "finish_reason": "SUCCESS",
                                     "seed": 1})


@pytest.fixture
def stability(make_ctx: Any) -> Any:
    def make(**settings: Any) -> StabilityEngine:
        engine = StabilityEngine(make_ctx(stability_api_key="s", stability_base_url="https://stability.test",
                                          **settings))
        engine.poll_interval = 0
        return engine

    return make


@respx.mock
@pytest.mark.parametrize(("model", "path", "cfg"), [("sd3.5-large", "generate/sd3", 5.0),
                                                    ("ultra", "generate/ultra", None)])
async def test_stability_bridge_records_what_its_endpoint_was_sent(stability: Any, model: str, path: str,
                                                                  cfg: float | None) -> None:
    route = respx.post(f"{STABILITY}/{path}").mock(return_value=stability_ok())
    result = await stability(stability_model=model).run(bridge(**ASKED), NullProgress(), CancelToken())
    fields, _ = multipart(route.calls.last.request)
    assert fields["negative_prompt"] == "blurry" and fields["strength"] == "0.4"
    assert fields.get("cfg_scale") == (None if cfg is None else "5")  # ultra takes no guidance
    assert said(result.metadata) == {**NONE_TAKEN, "negative_prompt": "blurry", "strength": 0.4,
                                     "guidance_scale": cfg}


@respx.mock
@pytest.mark.parametrize(("asked", "sent"), [(0.05, 0.2), (0.3, 0.3)])
async def test_stability_conservative_upscale_records_its_creativity_as_clamped(stability: Any, asked: float,
                                                                               sent: float) -> None:
    route = respx.post(f"{STABILITY}/upscale/conservative").mock(return_value=stability_ok())
    result = await stability().run(polish(creativity=asked), NullProgress(), CancelToken())
    assert multipart(route.calls.last.request)[0]["creativity"] == f"{sent:g}"
    assert said(result.metadata) == {**NONE_TAKEN, "negative_prompt": "blurry", "creativity": sent}


@respx.mock
async def test_stability_creative_upscale_records_its_creativity_as_clamped(stability: Any) -> None:
    create = respx.post(f"{STABILITY}/upscale/creative").mock(return_value=httpx.Response(200, json={"id": "j-1"}))
    respx.get("https://stability.test/v2beta/results/j-1").mock(return_value=httpx.Response(200, json={
        "result": base64.b64encode(png_bytes()).decode(), "finish_reason": "SUCCESS", "seed": 1}))
    engine = stability()
    progress = RecordingProgress()
    result = await engine.run(polish(creativity=0.9), progress, CancelToken())
    assert multipart(create.calls.last.request)[0]["creativity"] == "0.5"
    assert said(result.metadata) == {**NONE_TAKEN, "negative_prompt": "blurry", "creativity": 0.5}
    again = await engine.reattach(polish(creativity=0.9), progress.handles, NullProgress(), CancelToken())
    assert said(again.metadata) == said(result.metadata)


@respx.mock
async def test_stability_refine_records_its_creativity_sent_as_the_strength(stability: Any) -> None:
    route = respx.post(f"{STABILITY}/generate/sd3").mock(return_value=stability_ok())
    refine = polish(scale=None, width=64, height=64, creativity=0.3, guidance_scale=None)
    result = await stability().run(refine, NullProgress(), CancelToken())
    assert multipart(route.calls.last.request)[0]["strength"] == "0.3"
    assert said(result.metadata) == {**NONE_TAKEN, "negative_prompt": "blurry", "creativity": 0.3}


# --- the self-hosted servers ---------------------------------------------------------------------


def comfyui(make_ctx: Any, tmp_path: Path, graph: dict[str, Any]) -> ComfyUIEngine:
    engine = ComfyUIEngine(make_ctx(comfyui_url="http://comfy.test:8188",
                                    comfyui_workflow=write_workflow(tmp_path, graph)))
    engine.poll_interval, engine.follow_progress = 0, False
    return engine


@respx.mock
@pytest.mark.parametrize("stage", ["bridge", "polish"])
async def test_comfyui_records_what_its_template_takes(make_ctx: Any, tmp_path: Path, stage: str) -> None:
    mock_server()
    result = await comfyui(make_ctx, tmp_path, WORKFLOW).run(bridge(**ASKED, stage=stage), NullProgress(),
                                                             CancelToken())
    denoise = {"strength": 0.4} if stage == "bridge" else {"creativity": 0.05}  # {{strength}} is a polish's creativity
    assert said(result.metadata) == {**NONE_TAKEN, "negative_prompt": "blurry", "steps": 30, **denoise}


@respx.mock
async def test_comfyui_records_none_of_what_its_template_has_no_placeholder_for(make_ctx: Any,
                                                                               tmp_path: Path) -> None:
    graph = json.loads(json.dumps(WORKFLOW))
    graph["3"]["inputs"].update(steps=25, denoise=0.7)
    graph["7"]["inputs"]["text"] = "watermark"
    routes = mock_server()
    result = await comfyui(make_ctx, tmp_path, graph).run(bridge(**ASKED), NullProgress(), CancelToken())
    assert "blurry" not in routes["prompt"].calls.last.request.content.decode()
    assert said(result.metadata) == {"negative_prompt": "", **NONE_TAKEN}


A1111 = "http://a1111.test:7860"


@respx.mock
@pytest.mark.parametrize("stage", ["bridge", "polish"])
async def test_a1111_records_what_it_sent(make_ctx: Any, stage: str) -> None:
    respx.post(f"{A1111}/internal/progress").mock(return_value=httpx.Response(200, json={"active": False}))
    info = {"all_seeds": [1], "steps": 30, "cfg_scale": 5.0, "sampler_name": "Euler a"}
    route = respx.post(f"{A1111}/sdapi/v1/img2img").mock(return_value=httpx.Response(200, json={
        "images": [base64.b64encode(png_bytes()).decode()], "info": json.dumps(info)}))
    engine = A1111Engine(make_ctx(a1111_url=A1111))
    engine.poll_interval = 0
    result = await engine.run(bridge(**ASKED, stage=stage), NullProgress(), CancelToken())
    sent = json.loads(route.calls.last.request.content)
    denoise = {"strength": 0.4} if stage == "bridge" else {"creativity": 0.05}
    assert sent["denoising_strength"] == next(iter(denoise.values()))
    assert said(result.metadata) == {**NONE_TAKEN, "negative_prompt": "blurry", "steps": 30, "guidance_scale": 5.0,
                                     "sampler": "Euler a", **denoise}


# --- the local engines ----------------------------------------------------------------------------


async def test_the_local_engines_record_what_their_pipelines_were_given(engines: EngineFactory) -> None:
    lite, hifi = engines()
    asked: dict[str, Any] = {"negative_prompt": "blurry", "steps": 2, "guidance_scale": 2.0, "seed": 1, "width": 64,
                             "height": 64}
    drafted = await lite.run(RenderRequest(stage="ideation", prompt="a lighthouse", **asked), NullProgress(),
                             CancelToken())
    sampler = drafted.metadata["sampler"]
    assert said(drafted.metadata) == {**NONE_TAKEN, "negative_prompt": "blurry", "steps": 2, "guidance_scale": 2.0,
                                      "sampler": sampler}
    # The tiny model's Euler with its "trailing" spacing, as its scheduler config has it.
    assert drafted.metadata["sampler_settings"] == {"timestep_spacing": "trailing", "use_karras_sigmas": False,
                                                    "use_exponential_sigmas": False, "use_beta_sigmas": False}
    stages: list[tuple[Stage, dict[str, float]]] = [("bridge", {"strength": 0.5}), ("polish", {"creativity": 0.5})]
    for stage, denoise in stages:
        req = RenderRequest(stage=stage, prompt="a lighthouse", **asked, init_image=draft_image(), strength=0.5,
                            creativity=0.5, quality="low", scale=1.0)
        result = await hifi.run(req, NullProgress(), CancelToken())
        assert said(result.metadata) == {**NONE_TAKEN, "negative_prompt": "blurry", "steps": 2,
                                         "guidance_scale": 2.0, "sampler": result.metadata["sampler"], **denoise}
