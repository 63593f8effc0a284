from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import respx
from PIL import Image
from pydantic import ValidationError

from orchestrator.errors import BadEngineInput, Canceled, EngineError, EngineTimeout, EngineUnavailable, NoImage
from orchestrator.runner import JobRunner
from orchestrator.store import infotext
from tests.tiers.conftest import HeldRequest, NoAnswer, RecordingProgress, png_bytes
from tests.tiers.conftest import bridge as base_bridge
from tiers.a1111 import A1111Engine
from tiers.base import CancelToken, NullProgress, RenderRequest, Restartable, before_billable_sends

BASE = "http://a1111.test:7860"
URL = f"{BASE}/sdapi/v1/img2img"
PROGRESS = f"{BASE}/sdapi/v1/progress"
INTERRUPT = f"{BASE}/sdapi/v1/interrupt"
TASK = f"{BASE}/internal/progress"


OURS = f"orch-{uuid.UUID(int=7).hex}"  # the task id the engine sends (uuid4 fixed by the fixture)


NULL = "<null>"  # `current_task: null`, as a fork may send when it cannot say


def server_runs(task: str | None) -> respx.Route:
    """`GET /sdapi/v1/progress` of a fork that names the task it runs (`current_task`): ours, or
    another (None: A1111's and Forge's answer, whose response model drops the field, so that only
    `/internal/progress` can tell)."""
    body: dict[str, Any] = {"state": {"sampling_step": 4, "sampling_steps": 10, "job_no": 1, "job_count": 2}}
    if task is not None:
        body["current_task"] = None if task == NULL else task
    return respx.get(PROGRESS).mock(return_value=httpx.Response(200, json=body))


def task_is(state: str) -> respx.Route:
    """What `/internal/progress` says of our task: "active", "queued" or "unknown" (done, or a
    server without task ids)."""
    body = {"active": state == "active", "queued": state == "queued", "completed": False}
    return respx.post(TASK).mock(return_value=httpx.Response(200, json=body))


def ok_body(count: int = 1, seeds: list[int] | None = None) -> dict[str, Any]:
    images = [base64.b64encode(png_bytes((i, 2, 3))).decode() for i in range(count)]
    info = {"seed": (seeds or [1234])[0], "all_seeds": seeds or [1234], "sd_model_name": "sdxl_base",
            "sampler_name": "Euler a"}
    return {"images": images, "parameters": {}, "info": json.dumps(info)}


@pytest.fixture
def engine(make_ctx: Any, sleep: Any, monkeypatch: pytest.MonkeyPatch) -> A1111Engine:
    monkeypatch.setattr("tiers.a1111.uuid", SimpleNamespace(uuid4=lambda: uuid.UUID(int=7)))
    eng = A1111Engine(make_ctx(a1111_url=BASE))
    eng.http.sleep = sleep
    eng.poll_interval = 0
    return eng


def bridge(**kw: Any) -> RenderRequest:
    return base_bridge(**{"negative_prompt": "blurry", "width": 768, "height": 512, **kw})


@respx.mock
async def test_a_server_restarting_is_waited_out_not_left_for_another_engine(engine: A1111Engine) -> None:
    # A cloud engine that refuses connections gives up after a few tries (its job falls back); a
    # self-hosted server refusing them is restarting, and waiting bills nothing.
    task_is("unknown")
    route = respx.post(URL).mock(side_effect=[httpx.ConnectError("refused")] * 6
                                 + [httpx.Response(200, json=ok_body())])
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 7 and len(result.images) == 1
    # A server that stays off is not waited for until half the deadline (150 s): about a minute.
    route.mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(EngineError, match="could not reach") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 7 + 8 and info.value.retryable and info.value.charged == "no"


@respx.mock
async def test_success_sends_draft_and_takes_first_n_images(engine: A1111Engine) -> None:
    task_is("unknown")
    # Three images for n=1: the extras stand for ControlNet maps appended by the extension.
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body(count=3)))
    result = await engine.run(bridge(), NullProgress(), CancelToken())

    sent = json.loads(route.calls.last.request.content)
    pixels = Image.open(io.BytesIO(base64.b64decode(sent["init_images"][0])))
    assert pixels.getpixel((0, 0)) == (255, 0, 0)
    assert sent["force_task_id"].startswith("orch-")
    assert {k: v for k, v in sent.items() if k not in ("init_images", "force_task_id")} == {
        "prompt": "a lighthouse", "negative_prompt": "blurry", "denoising_strength": 0.55, "steps": 30,
        "cfg_scale": 7.0, "width": 768, "height": 512, "seed": -1, "sampler_name": "Euler a",
        "n_iter": 1, "batch_size": 1, "save_images": False}
    assert "authorization" not in route.calls.last.request.headers
    assert len(result.images) == 1 and result.images[0].image.getpixel((0, 0)) == (0, 2, 3)
    assert result.images[0].seed == 1234
    assert result.cost_millicredits == 0 and result.metadata["checkpoint"] == "sdxl_base"
    # What it ran with, for the image's record (once null: no `Steps:` in its PNG).
    assert (result.metadata["steps"], result.metadata["guidance_scale"]) == (30, 7.0)


@respx.mock
@pytest.mark.parametrize("image", ["data:image/png;base64", "data:image/png;base64,"])
async def test_a_data_uri_without_its_data_is_an_engine_error(engine: A1111Engine, image: str) -> None:
    # One without a comma raised IndexError: the job "failed unexpectedly".
    task_is("unknown")
    respx.post(URL).mock(return_value=httpx.Response(200, json={"images": [image], "info": "{}"}))
    with pytest.raises(EngineError):
        await engine.run(bridge(), NullProgress(), CancelToken())


@respx.mock
async def test_image_data_that_is_not_base64_names_the_engine(engine: A1111Engine) -> None:
    # The job's error said only "the provider returned image data that is not valid base64".
    task_is("unknown")
    respx.post(URL).mock(return_value=httpx.Response(200, json={"images": ["not*base64!"], "info": "{}"}))
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.message == "a1111: the provider returned image data that is not valid base64"
    assert info.value.details == {"engine": "a1111"}


@respx.mock
async def test_polish_uses_creativity_and_request_values(engine: A1111Engine) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body(count=2, seeds=[5, 6])))
    result = await engine.run(bridge(stage="polish", creativity=0.2, seed=5, steps=12, guidance_scale=4.5, n=2),
                              NullProgress(), CancelToken())
    sent = json.loads(route.calls.last.request.content)
    assert sent["denoising_strength"] == 0.2 and sent["seed"] == 5 and sent["steps"] == 12
    assert sent["cfg_scale"] == 4.5 and sent["n_iter"] == 2
    assert [img.seed for img in result.images] == [5, 6]


@respx.mock
async def test_a_seed_no_job_could_ask_for_is_not_kept(engine: A1111Engine) -> None:
    """Kept, it failed the asset's write (a 64-bit column) after the images were made."""
    seeds = [2**63, 2**32, 1e30, True, -1, 5]
    body = {**ok_body(count=len(seeds)), "info": json.dumps({"all_seeds": seeds})}
    respx.post(URL).mock(return_value=httpx.Response(200, json=body))
    result = await engine.run(bridge(n=len(seeds)), NullProgress(), CancelToken())
    assert [img.seed for img in result.images] == [None, None, None, None, None, 5]


@respx.mock
@pytest.mark.parametrize("info", [
    {"steps": "x" * 50, "cfg_scale": {"a": 1}, "sampler_name": ["Euler"]},
    {"steps": True, "cfg_scale": float("nan"), "sampler_name": "x" * 101},
    {"steps": 0, "cfg_scale": float("inf"), "sampler_name": ""},
    {"steps": 20.5, "cfg_scale": True, "sampler_name": None},
    {"steps": -3, "cfg_scale": "7", "sampler_name": 1},
    {"steps": 10**400, "cfg_scale": 10**400},  # no float holds it
])
async def test_what_the_server_says_it_ran_is_taken_only_when_it_is_a_value(engine: A1111Engine,
                                                                            info: dict[str, Any]) -> None:
    """The image's record and its PNG's `parameters` name them: a server's text, object or NaN
    there is replaced by what was asked. (The huge `steps` is a positive int, so it is kept.)"""
    body = {**ok_body(), "info": json.dumps(info)}
    respx.post(URL).mock(return_value=httpx.Response(200, json=body))
    result = await engine.run(bridge(steps=12, guidance_scale=4.5), NullProgress(), CancelToken())
    metadata = result.metadata
    assert metadata["guidance_scale"] == 4.5 and metadata["sampler"] == "Euler a"
    assert metadata["steps"] == (info["steps"] if info["steps"] == 10**400 else 12)


@respx.mock
async def test_what_the_server_says_it_ran_is_recorded(engine: A1111Engine) -> None:
    info = {"steps": 20, "cfg_scale": 5, "sampler_name": "DPM++ 2M"}
    respx.post(URL).mock(return_value=httpx.Response(200, json={**ok_body(), "info": json.dumps(info)}))
    result = await engine.run(bridge(steps=12, guidance_scale=4.5), NullProgress(), CancelToken())
    assert (result.metadata["steps"], result.metadata["guidance_scale"], result.metadata["sampler"]) == (
        20, 5.0, "DPM++ 2M")


def pinned(make_ctx: Any, sleep: Any, checkpoint: str | None, **settings: Any) -> A1111Engine:
    eng = A1111Engine(make_ctx(a1111_url=BASE, a1111_checkpoint=checkpoint, **settings))
    eng.http.sleep = sleep
    eng.poll_interval = 0
    return eng


def served(checkpoint: Any) -> respx.Route:
    """img2img answering that `checkpoint` rendered (`sd_model_name`); absent when it is ...."""
    info: dict[str, Any] = {"all_seeds": [5]}
    if checkpoint is not ...:
        info["sd_model_name"] = checkpoint
    return respx.post(URL).mock(return_value=httpx.Response(200, json={**ok_body(), "info": json.dumps(info)}))


@respx.mock
async def test_a_configured_checkpoint_is_asked_for_and_the_server_s_own_put_back(make_ctx: Any, sleep: Any) -> None:
    """Another client of the shared server may have loaded any checkpoint: ours is asked for in
    each render, and the server restores its own after it."""
    eng = pinned(make_ctx, sleep, "dreamshaper_8.safetensors [879db523c3]")
    route = served("dreamshaper_8")
    result = await eng.run(bridge(), NullProgress(), CancelToken())
    sent = json.loads(route.calls.last.request.content)
    assert sent["override_settings"] == {"sd_model_checkpoint": "dreamshaper_8.safetensors [879db523c3]"}
    assert sent["override_settings_restore_afterwards"] is True
    # The image names what the server reports it rendered with; the engine what it is set to.
    assert result.model == "dreamshaper_8" and result.metadata["checkpoint"] == "dreamshaper_8"
    assert eng.model == "dreamshaper_8.safetensors [879db523c3]"


@respx.mock
async def test_without_a_checkpoint_setting_the_server_s_loaded_one_is_used_and_named(engine: A1111Engine) -> None:
    route = served("sdxl_base")
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    sent = json.loads(route.calls.last.request.content)
    assert "override_settings" not in sent and "override_settings_restore_afterwards" not in sent
    assert result.model == "sdxl_base"
    # Jobs are keyed and listed by the engine's model before any render: never by whatever
    # checkpoint another client happened to leave loaded.
    assert engine.model == "a1111"


@respx.mock
async def test_the_checkpoint_that_rendered_is_in_the_asset_s_record_and_png(make_ctx: Any, sleep: Any) -> None:
    """An unknown checkpoint is dropped by the webui, which renders with its loaded one: the
    record must name that one (it once said `a1111` whatever rendered)."""
    eng = pinned(make_ctx, sleep, "not_on_this_server")
    served("sdxl_base")
    result = await eng.run(bridge(seed=5), NullProgress(), CancelToken())
    job = SimpleNamespace(params={"prompt": "a lighthouse", "negative_prompt": ""}, stage="bridge",
                          engine="a1111", source_asset_id="ast_x")
    runner = SimpleNamespace(registry={"a1111": eng})  # what `_record` reads of it: the engine
    record = JobRunner._record(runner, job, result, result.images[0].seed)  # type: ignore[arg-type]
    assert record["model"] == "sdxl_base"
    assert "Model: sdxl_base," in infotext(record)


@respx.mock
@pytest.mark.parametrize("told", [..., None, "", "   ", 7, ["sdxl_base"], {"name": "x"}, "m" * 301,
                                  "two\nlines", "nul\x00byte"])
@pytest.mark.parametrize(("checkpoint", "expected"), [(None, "a1111"), ("dreamshaper_8", "dreamshaper_8")])
async def test_a_checkpoint_name_the_server_gives_is_taken_only_when_it_is_one(
        make_ctx: Any, sleep: Any, told: Any, checkpoint: str | None, expected: str) -> None:
    """The asset's model is a 300-character column and a `Model:` line of the PNG: anything else
    the server reports there gives way to the setting, else the engine's name."""
    eng = pinned(make_ctx, sleep, checkpoint)
    served(told)
    result = await eng.run(bridge(), NullProgress(), CancelToken())
    assert result.model == expected and result.metadata["checkpoint"] is None


@respx.mock
async def test_a_checkpoint_name_keeps_no_credentials(make_ctx: Any, sleep: Any) -> None:
    eng = pinned(make_ctx, sleep, None, a1111_auth="artist:hunter2-long-pass")
    served("model " + base64.b64encode(b"artist:hunter2-long-pass").decode())
    result = await eng.run(bridge(), NullProgress(), CancelToken())
    assert result.model == "model ***"


def test_the_checkpoint_setting_is_taken_without_stray_spaces(make_ctx: Any) -> None:
    assert A1111Engine(make_ctx(a1111_url=BASE, a1111_checkpoint=" sdxl_base \r")).model == "sdxl_base"
    assert A1111Engine(make_ctx(a1111_url=BASE, a1111_checkpoint="  ")).model == "a1111"


@respx.mock
@pytest.mark.parametrize("checkpoint", [None, "dreamshaper_8"])
async def test_a_configured_upscaler_enlarges_a_polish_and_is_recorded(make_ctx: Any, sleep: Any,
                                                                      checkpoint: str | None) -> None:
    """The webui's "Upscaler for img2img" enlarges the draft to the size asked before it is
    denoised (else a Lanczos resize): asked for in each render, beside a pinned checkpoint, the
    server's own setting put back after, and named in the image's record and PNG."""
    eng = pinned(make_ctx, sleep, checkpoint, a1111_upscaler="R-ESRGAN 4x+")
    route = served("sdxl_base")
    upscalers = listed("None", "Lanczos", "R-ESRGAN 4x+")
    polish = bridge(stage="polish", creativity=0.3, scale=2.0, width=128, height=128, seed=5)
    result = await eng.run(polish, NullProgress(), CancelToken())
    sent = json.loads(route.calls.last.request.content)
    asked = {"upscaler_for_img2img": "R-ESRGAN 4x+"}
    assert sent["override_settings"] == (asked if checkpoint is None else {**asked, "sd_model_checkpoint": checkpoint})
    assert sent["override_settings_restore_afterwards"] is True
    assert (sent["width"], sent["height"]) == (128, 128) and result.metadata["upscaler"] == "R-ESRGAN 4x+"
    job = SimpleNamespace(params={"prompt": "a lighthouse", "negative_prompt": "", "scale": 2.0, "creativity": 0.3},
                          stage="polish", engine="a1111", source_asset_id="ast_x")
    runner = SimpleNamespace(registry={"a1111": eng})
    record = JobRunner._record(runner, job, result, result.images[0].seed)  # type: ignore[arg-type]
    assert record["upscaler"] == "R-ESRGAN 4x+"
    await eng.run(polish, NullProgress(), CancelToken())
    assert upscalers.call_count == 1  # the server's list is asked once in a while, not at each render


def listed(*names: Any) -> respx.Route:
    """`GET /sdapi/v1/upscalers` answering these names (as the webui lists them, with their models)."""
    body = [{"name": name, "model_name": None, "model_path": None, "scale": 4} for name in names]
    return respx.get(f"{BASE}/sdapi/v1/upscalers").mock(return_value=httpx.Response(200, json=body))


@respx.mock
async def test_an_upscaler_the_server_does_not_list_makes_the_engine_unavailable_for_the_job(
        make_ctx: Any, sleep: Any) -> None:
    """The webui enlarges with its first upscaler (a plain resize) when it has no such one, saying
    so only on its console: the record would name an upscaler never used. Refused before the
    render (another engine may take the polish); a server that does not list them is believed."""
    eng = pinned(make_ctx, sleep, None, a1111_upscaler="4x-UltraSharp")
    route = served("sdxl_base")
    listed("None", "Lanczos", "R-ESRGAN 4x+")
    polish = bridge(stage="polish", creativity=0.3, scale=2.0, width=128, height=128)
    with pytest.raises(EngineUnavailable, match=r"ORCH_A1111_UPSCALER '4x-UltraSharp' is not an upscaler this "
                                                r"server has \(it lists: Lanczos, None, R-ESRGAN 4x\+\)") as refused:
        await eng.run(polish, NullProgress(), CancelToken())
    assert refused.value.details["setting"] == "ORCH_A1111_UPSCALER" and route.call_count == 0
    # The setting's, not the server's: counted against its circuit, five polishes closed it to
    # every bridge, which needs no upscaler.
    assert refused.value.engine_fault is False
    # Not enlarged, the upscaler is not used: nothing to refuse.
    await eng.run(bridge(width=64, height=64), NullProgress(), CancelToken())
    eng._upscalers = None
    respx.get(f"{BASE}/sdapi/v1/upscalers").mock(return_value=httpx.Response(404, json={"detail": "Not Found"}))
    result = await eng.run(polish, NullProgress(), CancelToken())
    assert result.metadata["upscaler"] == "4x-UltraSharp"


@respx.mock
async def test_a_page_in_front_of_the_server_is_not_a_server_without_upscalers(make_ctx: Any, sleep: Any) -> None:
    eng = pinned(make_ctx, sleep, None, a1111_upscaler="4x-UltraSharp")
    route = served("sdxl_base")
    respx.get(f"{BASE}/sdapi/v1/upscalers").mock(return_value=httpx.Response(
        200, text="<html>Sign in</html>", headers={"content-type": "text/html"}))
    polish = bridge(stage="polish", creativity=0.3, scale=2.0, width=128, height=128)
    with pytest.raises(EngineUnavailable, match=r"did not list its upscalers \(GET /sdapi/v1/upscalers: HTTP 200, "
                                                r"not a list\)"):
        await eng.run(polish, NullProgress(), CancelToken())
    assert route.call_count == 0 and eng._upscalers is None  # asked again by the next job


@respx.mock
@pytest.mark.parametrize("proxied", [False, True])
async def test_a_server_that_cannot_list_its_upscalers_now_sends_nothing_and_is_asked_again(
        make_ctx: Any, sleep: Any, proxied: bool) -> None:
    """A webui restarting (its port closed, or its proxy's 502) was taken for one that lists no
    upscalers, believed for 5 minutes: renders named in their record an upscaler it lacked. It is
    waited for as a render's request would; still without its list, the job sends nothing."""
    eng = pinned(make_ctx, sleep, None, a1111_upscaler="4x-UltraSharp")
    eng.http.clock = sleep.clock  # the waits between tries pass the side call's 5 s
    route = served("sdxl_base")
    down = [True]

    def upscalers(request: httpx.Request) -> httpx.Response:
        if down[0] and not proxied:
            raise httpx.ConnectError("connection refused", request=request)
        if down[0]:
            return httpx.Response(502, text="Bad Gateway")
        return httpx.Response(200, json=[{"name": name} for name in ("None", "Lanczos")])

    asked = respx.get(f"{BASE}/sdapi/v1/upscalers").mock(side_effect=upscalers)
    polish = bridge(stage="polish", creativity=0.3, scale=2.0, width=128, height=128)
    with pytest.raises(EngineError, match="did not list its upscalers" if proxied else "could not reach") as unchecked:
        await eng.run(polish, NullProgress(), CancelToken())
    assert unchecked.value.charged == "no" and route.call_count == 0
    down[0] = False
    for _ in range(2):
        with pytest.raises(EngineUnavailable, match="'4x-UltraSharp' is not an upscaler this server has"):
            await eng.run(polish, NullProgress(), CancelToken())
    assert route.call_count == 0 and asked.calls.last.response.status_code == 200
    listed = [c for c in asked.calls if c.optional_response is not None and c.optional_response.status_code == 200]
    assert len(listed) == 1


@respx.mock
@pytest.mark.parametrize("size", [(64, 64), (48, 64), (64, 32)])
async def test_an_upscaler_is_not_claimed_where_the_draft_was_not_enlarged(make_ctx: Any, sleep: Any,
                                                                          size: tuple[int, int]) -> None:
    """The webui runs it only to enlarge (the 64x64 draft here); a size no larger is resized."""
    eng = pinned(make_ctx, sleep, None, a1111_upscaler="R-ESRGAN 4x+")
    route = served("sdxl_base")
    result = await eng.run(bridge(width=size[0], height=size[1]), NullProgress(), CancelToken())
    assert json.loads(route.calls.last.request.content)["override_settings"] == {
        "upscaler_for_img2img": "R-ESRGAN 4x+"}
    assert result.metadata["upscaler"] is None
    job = SimpleNamespace(params={"prompt": "a lighthouse", "negative_prompt": ""}, stage="bridge",
                          engine="a1111", source_asset_id="ast_x")
    record = JobRunner._record(SimpleNamespace(registry={"a1111": eng}), job, result, 5)  # type: ignore[arg-type]
    assert "upscaler" not in record


@respx.mock
async def test_without_an_upscaler_setting_the_server_s_own_is_used_and_none_named(engine: A1111Engine) -> None:
    route = served("sdxl_base")
    result = await engine.run(bridge(stage="polish", creativity=0.3), NullProgress(), CancelToken())
    assert "override_settings" not in json.loads(route.calls.last.request.content)
    assert result.metadata["upscaler"] is None


@pytest.mark.parametrize(("given", "taken"), [(" R-ESRGAN 4x+ \r", "R-ESRGAN 4x+"), ("  ", None), (None, None)])
def test_the_upscaler_setting_is_taken_without_stray_spaces(make_ctx: Any, given: str | None,
                                                            taken: str | None) -> None:
    assert make_ctx(a1111_url=BASE, a1111_upscaler=given).settings.a1111_upscaler == taken


@pytest.mark.parametrize("given", ["x" * 101, "R-ESRGAN\n4x+", "nul\x00", "R-ESRGAN\u20284x+", "R-ESRGAN\u202e4x+"])
def test_an_upscaler_setting_that_names_none_is_refused_at_start(make_ctx: Any, given: str) -> None:
    with pytest.raises(ValueError, match="upscaler's name as the webui lists it"):
        make_ctx(a1111_url=BASE, a1111_upscaler=given)


@respx.mock
async def test_a_guidance_scale_of_zero_is_sent_as_zero(engine: A1111Engine) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body()))
    await engine.run(bridge(guidance_scale=0.0), NullProgress(), CancelToken())
    assert json.loads(route.calls.last.request.content)["cfg_scale"] == 0.0


@respx.mock
async def test_5xx_then_success(engine: A1111Engine) -> None:
    route = respx.post(URL).mock(side_effect=[httpx.Response(503), httpx.Response(200, json=ok_body())])
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2


@respx.mock
async def test_a_render_that_raised_on_the_server_is_not_sent_again(engine: A1111Engine) -> None:
    # The webui's own 500 (out of memory, NaN in the VAE): re-sending re-runs it on a shared GPU.
    task_is("unknown")
    oom = httpx.Response(500, json={"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA"})
    route = respx.post(URL).mock(side_effect=[oom, httpx.Response(200, json=ok_body())])
    with pytest.raises(EngineError, match=r"failed on the server.*OutOfMemoryError: CUDA") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    # Another engine may still do it: the job may fall back, and nothing was charged.
    assert info.value.retryable and info.value.charged == "no" and info.value.code == "engine_error"
    # The request's size, not the server's health: one project's large renders must not open the
    # shared server's circuit for every project (their jobs then went to paid engines).
    assert not info.value.engine_fault


@respx.mock
async def test_forge_s_bare_500_is_not_sent_again(engine: A1111Engine) -> None:
    # Forge's API installs no exception handler: a render that raised answers Starlette's plain
    # text. The server ran it all the same, and would run the same failure again.
    task_is("unknown")
    route = respx.post(URL).mock(side_effect=[httpx.Response(500, text="Internal Server Error"),
                                              httpx.Response(200, json=ok_body())])
    with pytest.raises(EngineError, match=r"failed on the server \(HTTP 500\): Internal Server Error") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1
    assert info.value.retryable and info.value.charged == "no" and info.value.engine_fault


@respx.mock
async def test_a_render_that_raised_for_another_reason_counts_against_the_server(engine: A1111Engine) -> None:
    task_is("unknown")
    nan = httpx.Response(500, json={"error": "NansException", "detail": "", "body": "",
                                    "errors": "A tensor with all NaNs was produced in VAE."})
    respx.post(URL).mock(return_value=nan)
    with pytest.raises(EngineError, match="NansException") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.engine_fault


@respx.mock
@pytest.mark.parametrize("status", [502, 504, 520, 524])
async def test_a_gateway_s_timeout_does_not_send_the_render_again(engine: A1111Engine, status: int) -> None:
    # nginx gives up on a long render after 60 s; the webui renders on, and every copy sent
    # again would be rendered too.
    server_runs(OURS)
    route = respx.post(URL).mock(side_effect=[httpx.Response(status, text="<html>Gateway</html>"),
                                              httpx.Response(200, json=ok_body())])
    interrupt = respx.post(INTERRUPT).mock(return_value=httpx.Response(200, json={}))
    with pytest.raises(EngineError, match=f"a proxy in front of the server answered HTTP {status}") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and interrupt.call_count == 1
    assert info.value.retryable and info.value.charged == "no"


@respx.mock
async def test_429_with_retry_after_then_success(engine: A1111Engine, sleep: Any) -> None:
    route = respx.post(URL).mock(side_effect=[httpx.Response(429, headers={"Retry-After": "3"}),
                                              httpx.Response(200, json=ok_body())])
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 2 and sleep.waits == [3.0]


@respx.mock
async def test_the_render_may_take_until_the_deadline_and_a_timeout_interrupts_it(engine: A1111Engine) -> None:
    # The answer comes only when every image is made: the read waits for the deadline (60 s
    # here), not the 120 s default read timeout, nor a shorter one.
    server_runs(OURS)
    route = respx.post(URL).mock(side_effect=httpx.ReadTimeout("slow"))
    interrupt = respx.post(INTERRUPT).mock(return_value=httpx.Response(200, json={}))
    with pytest.raises(EngineTimeout, match="ORCH_REMOTE_DEADLINE") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert route.call_count == 1 and info.value.charged == "no"
    assert 50 < route.calls.last.request.extensions["timeout"]["read"] <= 60
    assert interrupt.call_count == 1  # our task was running: nobody is left to collect it


@respx.mock
@pytest.mark.parametrize("response", [
    httpx.Response(200, text="<html>"),
    httpx.Response(200, json={"images": [], "info": "{}"}),
    httpx.Response(200, json={"images": ["not base64!"], "info": "{}"}),
    httpx.Response(200, json={"images": [base64.b64encode(b"not a png").decode()], "info": "not json"}),
])
async def test_malformed_body(engine: A1111Engine, response: httpx.Response) -> None:
    respx.post(URL).mock(return_value=response)
    with pytest.raises(EngineError):
        await engine.run(bridge(), NullProgress(), CancelToken())


@respx.mock
async def test_an_answer_with_no_image_is_no_image(engine: A1111Engine) -> None:
    # "HTTP 200 without an image is a failure (content_filtered or no_image)" (providers.md).
    respx.post(URL).mock(return_value=httpx.Response(200, json={"images": [], "info": "{}"}))
    with pytest.raises(NoImage) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.code == "no_image"


@respx.mock
@pytest.mark.parametrize(("status", "body", "expected"), [
    (422, {"error": "RequestValidationError", "detail": "", "body": "SECRET-ECHO",
           "errors": "steps: value is not a valid integer"}, "steps: value is not a valid integer"),
    (400, {"error": "HTTPException", "detail": "Invalid encoded image", "body": "", "errors": ""},
     "HTTPException: Invalid encoded image"),
    (422, {"detail": [{"loc": ["body", "steps"], "msg": "bad", "type": "type_error"}]}, '"msg": "bad"'),
])
async def test_4xx_is_bad_input_with_detail(engine: A1111Engine, status: int, body: dict[str, Any],
                                            expected: str) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(status, json=body))
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert expected in info.value.message and "SECRET-ECHO" not in info.value.message
    assert route.call_count == 1


@respx.mock
async def test_401_with_basic_auth_names_the_setting(make_ctx: Any) -> None:
    eng = A1111Engine(make_ctx(a1111_url=BASE, a1111_auth="artist:hunter2"))
    route = respx.post(URL).mock(return_value=httpx.Response(401, json={"detail": "Incorrect username or password"}))
    with pytest.raises(EngineUnavailable) as info:
        await eng.run(bridge(), NullProgress(), CancelToken())
    expected = "Basic " + base64.b64encode(b"artist:hunter2").decode()
    assert route.calls.last.request.headers["authorization"] == expected
    assert route.call_count == 1
    assert "ORCH_A1111_AUTH" in info.value.message and "hunter2" not in info.value.message


@respx.mock
async def test_a_user_and_password_in_the_url_are_the_api_auth_and_never_shown(
        make_ctx: Any, caplog: pytest.LogCaptureFixture) -> None:
    """`http://user:pass@host:7860` was sent as Basic auth by httpx on its own: its request log
    line printed the password in the URL, and a 401 told to check ORCH_A1111_AUTH, which was unset."""
    eng = A1111Engine(make_ctx(a1111_url="http://artist:hunter2-long@a1111.test:7860"))
    available, reason = eng.availability()
    assert available, reason
    route = respx.post(URL).mock(return_value=httpx.Response(401, json={"detail": "Incorrect username or password"}))
    # httpx's own logger too: the CLI's tests, run before this one in the same process, leave it at WARNING.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="httpx"), \
            pytest.raises(EngineUnavailable) as info:
        await eng.run(bridge(), NullProgress(), CancelToken())
    sent = route.calls.last.request
    assert sent.headers["authorization"] == "Basic " + base64.b64encode(b"artist:hunter2-long").decode()
    assert sent.url.userinfo == b""  # the address a log line or an error may name carries no password
    assert "ORCH_A1111_URL" in info.value.message and "ORCH_A1111_AUTH" not in info.value.message
    assert "hunter2" not in info.value.message and "hunter2" not in str(info.value.details)
    assert any(record.name == "httpx" for record in caplog.records)  # its request lines were looked at
    assert not any("hunter2" in record.getMessage() for record in caplog.records)


def test_a_password_in_the_url_and_in_orch_a1111_auth_is_refused(make_ctx: Any) -> None:
    # httpx sent ORCH_A1111_AUTH's and dropped the URL's: changing the URL's changed nothing.
    with pytest.raises(ValidationError, match="ORCH_A1111_URL holds a user:password too"):
        make_ctx(a1111_url="http://artist:hunter2@a1111.test:7860", a1111_auth="artist:other")


@respx.mock
@pytest.mark.parametrize("response", [httpx.Response(404, json={"detail": "Not Found"}),
                                      httpx.Response(404, text="<html>404 Not Found</html>")])
async def test_404_means_api_not_enabled(engine: A1111Engine, response: httpx.Response) -> None:
    respx.post(URL).mock(return_value=response)
    with pytest.raises(EngineUnavailable, match="--api"):
        await engine.run(bridge(), NullProgress(), CancelToken())


@respx.mock
async def test_a_404_in_the_webui_s_error_shape_is_the_request_s(engine: A1111Engine) -> None:
    """The API answered (`HTTPException(404, "Sampler not found")`): the request named something
    the server lacks. It was told as the API being off, and counted against the server's circuit."""
    route = respx.post(URL).mock(return_value=httpx.Response(404, json={
        "error": "HTTPException", "detail": "Sampler not found", "body": "SECRET-ECHO", "errors": ""}))
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "Sampler not found" in info.value.message and "--api" not in info.value.message
    assert "SECRET-ECHO" not in info.value.message
    assert not info.value.retryable and info.value.details["status"] == 404 and route.call_count == 1


@respx.mock
async def test_progress_is_polled_while_the_post_runs(engine: A1111Engine) -> None:
    done = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await done.wait()
        return httpx.Response(200, json=ok_body(count=2, seeds=[1, 2]))

    def state(request: httpx.Request) -> httpx.Response:
        done.set()
        return httpx.Response(200, json={"progress": 0.6, "state": {
            "sampling_step": 4, "sampling_steps": 10, "job_no": 1, "job_count": 2}})

    img2img = respx.post(URL).mock(side_effect=slow)
    ours = task_is("active")
    poll = respx.get(PROGRESS).mock(side_effect=state)
    progress = RecordingProgress()
    result = await engine.run(bridge(n=2), progress, CancelToken())
    assert poll.calls.last.request.url.params["skip_current_image"] == "true"
    task_id = json.loads(img2img.calls.last.request.content)["force_task_id"]
    assert task_id.startswith("orch-") and json.loads(ours.calls.last.request.content)["id_task"] == task_id
    assert progress.steps[0] == (14, 20)
    assert len(result.images) == 2


@respx.mock
async def test_progress_failures_do_not_fail_the_job(engine: A1111Engine) -> None:
    done = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await done.wait()
        return httpx.Response(200, json=ok_body())

    def broken(request: httpx.Request) -> httpx.Response:
        done.set()
        return httpx.Response(200, text="garbage")

    respx.post(URL).mock(side_effect=slow)
    task_is("active")
    respx.get(PROGRESS).mock(side_effect=broken)
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1


@respx.mock
@pytest.mark.parametrize(("current", "legacy", "ours"), [
    (OURS, None, True),               # a fork that names the task it runs: ours
    ("task(other)", None, False),     # ... another client's, or another of our jobs queued before ours
    (None, "active", True),           # A1111 and Forge: only their UI's /internal/progress tells
    (None, "queued", False),
    (NULL, "active", True),           # a task that is not named is no answer: the UI is asked
    (None, None, False),              # neither (--nowebui): never interrupted
])
async def test_a_cancel_interrupts_the_server_only_while_it_runs_our_task(
        engine: A1111Engine, current: str | None, legacy: str | None, ours: bool) -> None:
    # /interrupt stops whatever the server runs: while our task waits in its queue, that is
    # another job (another client's, or another of ours), which must not be stopped.
    token = CancelToken()

    async def forever(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    respx.post(URL).mock(side_effect=forever)
    progress = server_runs(current)
    if legacy is not None:
        task_is(legacy)
    else:
        respx.post(TASK).mock(return_value=httpx.Response(404, json={"detail": "Not Found"}))
    interrupt = respx.post(INTERRUPT).mock(return_value=httpx.Response(200, json={}))
    recorded = RecordingProgress()
    run = asyncio.ensure_future(engine.run(bridge(), recorded, token))
    async with asyncio.timeout(30):
        while progress.call_count < 2:  # the first poll of the server's state is in
            await asyncio.sleep(0.01)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(run, 30)
    assert info.value.charged == "no"
    assert interrupt.call_count == (1 if ours else 0)
    # The server-wide step counts are reported only while they are our task's.
    assert (recorded.steps != []) == ours and all(step == (14, 20) for step in recorded.steps)


@respx.mock
async def test_a_cancel_in_a_job_interrupts_though_no_billable_request_may_leave(engine: A1111Engine) -> None:
    """In a job, once a cancel is asked, the runner refuses every request that can bill
    (`billable_send`); the interrupt bills nothing and must still go."""
    token = CancelToken()

    async def forever(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def runner_hook() -> None:
        if token.cancelled:
            raise Canceled("the job ended before this request was sent", charged="no")

    respx.post(URL).mock(side_effect=forever)
    progress = server_runs(OURS)
    interrupt = respx.post(INTERRUPT).mock(return_value=httpx.Response(200, json={}))
    with before_billable_sends(runner_hook):
        run = asyncio.ensure_future(engine.run(bridge(), RecordingProgress(), token))
        async with asyncio.timeout(30):
            while progress.call_count < 2:
                await asyncio.sleep(0.01)
        token.cancel()
        with pytest.raises(Canceled):
            await asyncio.wait_for(run, 30)
    assert interrupt.call_count == 1


@pytest.fixture
def hung_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll that is never answered is never given up on either: the render's result and a
    cancel cannot wait it out (two side calls' timeouts held a cancel 10 s)."""
    monkeypatch.setattr("tiers.a1111.SIDE_CALL_TIMEOUT", 3600.0)


def progress_then_hangs(*answers: dict[str, Any]) -> tuple[list[httpx.Request], HeldRequest]:
    """`GET /sdapi/v1/progress` answering `answers` in turn, then held open for good; the polls
    sent (respx records a call only once it is answered)."""
    hung = HeldRequest(httpx.Response(200, json={}))
    given = iter(answers)
    polls: list[httpx.Request] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        polls.append(request)
        body = next(given, None)
        return httpx.Response(200, json=body) if body is not None else await hung(request)

    respx.get(PROGRESS).mock(side_effect=answer)
    return polls, hung


@respx.mock
async def test_a_cancel_ends_the_render_at_once_though_the_progress_poll_hangs(
        engine: A1111Engine, hung_polls: None) -> None:
    # The server never said it runs our task: /interrupt, which stops whatever it runs (another
    # client's render), is not sent, as to a server that cannot tell.
    respx.post(URL).mock(side_effect=NoAnswer())
    _, poll = progress_then_hangs()
    interrupt = respx.post(INTERRUPT).mock(return_value=httpx.Response(200, json={}))
    token = CancelToken()
    run = asyncio.ensure_future(engine.run(bridge(), NullProgress(), token))
    await asyncio.wait_for(poll.sent.wait(), 10)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(run, 10)
    assert info.value.charged == "no" and poll.dropped and interrupt.call_count == 0


@respx.mock
async def test_a_render_finished_while_the_progress_poll_hangs_is_returned_at_once(
        engine: A1111Engine, hung_polls: None) -> None:
    _, poll = progress_then_hangs()

    async def done_once_polled(request: httpx.Request) -> httpx.Response:
        await poll.sent.wait()
        return httpx.Response(200, json=ok_body())

    respx.post(URL).mock(side_effect=done_once_polled)
    result = await asyncio.wait_for(engine.run(bridge(), NullProgress(), CancelToken()), 10)
    assert len(result.images) == 1 and poll.dropped


@respx.mock
@pytest.mark.parametrize(("aged", "interrupted"), [(0.0, True), (10.0, False)], ids=["recent", "stale"])
async def test_a_cancel_acts_on_what_a_recent_poll_said_without_asking_again(
        engine: A1111Engine, hung_polls: None, aged: float, interrupted: bool) -> None:
    # The first poll said the server runs our task; the next hangs. Asked again, the cancel waited
    # for it (and then, unanswered, interrupted nothing). A word older than a few polls is no word.
    now = [1000.0]
    engine.http.clock = lambda: now[0]
    respx.post(URL).mock(side_effect=NoAnswer())
    polls, poll = progress_then_hangs({"current_task": OURS, "state": {"sampling_step": 4, "sampling_steps": 10}})
    interrupt = respx.post(INTERRUPT).mock(return_value=httpx.Response(200, json={}))
    token = CancelToken()
    recorded = RecordingProgress()
    run = asyncio.ensure_future(engine.run(bridge(), recorded, token))
    await asyncio.wait_for(poll.sent.wait(), 10)
    now[0] += aged
    token.cancel()
    with pytest.raises(Canceled):
        await asyncio.wait_for(run, 10)
    assert recorded.steps == [(4, 10)] and len(polls) == 2 and poll.dropped
    assert interrupt.call_count == (1 if interrupted else 0)


async def test_cancel_before_send(engine: A1111Engine) -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Canceled):
        await engine.run(bridge(), NullProgress(), token)


async def test_bridge_without_draft_is_bad_input(engine: A1111Engine) -> None:
    with pytest.raises(BadEngineInput):
        await engine.run(bridge(init_image=None), NullProgress(), CancelToken())


def test_free_and_available(engine: A1111Engine) -> None:
    assert engine.availability() == (True, None)
    assert engine.estimate(bridge(n=4)) == 0
    assert engine.prices() == {"credits_per_image": 0}
    assert engine.kind == "remote" and engine.capabilities.leaves_machine


def test_unavailable_without_url(make_ctx: Any) -> None:
    available, reason = A1111Engine(make_ctx()).availability()
    assert not available and reason and "ORCH_A1111_URL" in reason


def test_unavailable_with_malformed_auth(make_ctx: Any) -> None:
    available, reason = A1111Engine(make_ctx(a1111_url=BASE, a1111_auth="no-colon")).availability()
    assert not available and reason and "ORCH_A1111_AUTH" in reason and "no-colon" not in reason


@respx.mock
@pytest.mark.parametrize(("running", "interrupted"), [(OURS, True), ("orch-someone-else", False)])
async def test_after_a_crash_the_dead_attempt_s_render_is_stopped_only_if_it_runs(
        engine: A1111Engine, running: str, interrupted: bool) -> None:
    server_runs(running)
    interrupt = respx.post(INTERRUPT).mock(return_value=httpx.Response(200, json={}))
    await engine.forget([{"id": OURS}])
    assert interrupt.call_count == (1 if interrupted else 0)
    assert isinstance(engine, Restartable)


@respx.mock
async def test_the_task_id_is_saved_before_the_render_is_sent(engine: A1111Engine) -> None:
    progress = RecordingProgress()
    order: list[str] = []
    progress.provider_request = lambda request_id, handle=None: order.append(f"saved {request_id}")  # type: ignore[method-assign]

    def answer(request: httpx.Request) -> httpx.Response:
        order.append("sent")
        return httpx.Response(200, json=ok_body())

    respx.post(URL).mock(side_effect=answer)
    server_runs(OURS)
    await engine.run(bridge(), progress, CancelToken())
    assert order == [f"saved {OURS}", "sent"]


@respx.mock
async def test_a_dropped_connection_is_told_as_one_and_not_as_a_bill(engine: A1111Engine) -> None:
    server_runs("orch-someone-else")
    respx.post(URL).mock(side_effect=httpx.RemoteProtocolError("peer closed connection"))
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.message.startswith("a1111: the connection to the server ended before its answer")
    assert "billed" not in info.value.message and info.value.charged == "no"


@pytest.mark.parametrize("odd", [float("inf"), float("nan"), None, "4 of 10", [4]])
def test_a_fork_s_odd_step_count_is_not_reported_and_does_not_end_the_job(odd: Any) -> None:
    # `int(Infinity)` raised OverflowError: the job failed as an engine crash, its render left running.
    progress = RecordingProgress()
    A1111Engine._report(progress, {"sampling_step": odd, "sampling_steps": 10, "job_no": 0, "job_count": 1})
    A1111Engine._report(progress, {"sampling_step": 4, "sampling_steps": odd, "job_no": 0, "job_count": 1})
    A1111Engine._report(progress, {"sampling_step": 4, "sampling_steps": 10, "job_no": 0, "job_count": 1})
    assert progress.steps == [(4, 10)]


@respx.mock
async def test_an_info_nested_past_the_recursion_limit_is_the_engine_s_error_not_a_crash(
        engine: A1111Engine) -> None:
    # Its RecursionError, which nothing expected, failed the job as a bug, its images made.
    task_is("unknown")
    body = ok_body()
    body["info"] = "[" * 100_000 + "]" * 100_000
    respx.post(URL).mock(return_value=httpx.Response(200, json=body))
    result = await engine.run(bridge(), NullProgress(), CancelToken())  # an info it cannot read is none
    assert len(result.images) == 1
    respx.post(URL).mock(return_value=httpx.Response(200, content=body["info"].encode()))
    with pytest.raises(EngineError, match="not JSON"):
        await engine.run(bridge(), NullProgress(), CancelToken())


@respx.mock
async def test_an_image_far_larger_than_asked_is_not_decoded(engine: A1111Engine) -> None:
    """It renders the size asked. An answer of sixteen 8192x8192 PNGs (300 KB each) decoded to 4 GB
    before any was stored; one was kept as the 768x512 job's image."""
    task_is("unknown")
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (1, 2, 3)).save(buf, format="PNG")
    body = {"images": [base64.b64encode(buf.getvalue()).decode()], "info": json.dumps({"all_seeds": [1]})}
    respx.post(URL).mock(return_value=httpx.Response(200, json=body))
    with pytest.raises(EngineError, match="returned a 4096x4096 image for the 768x512 asked"):
        await engine.run(bridge(width=768, height=512), NullProgress(), CancelToken())


@respx.mock
async def test_a_cancel_does_not_wait_for_the_answer_s_decode(engine: A1111Engine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The answer's images are decoded in a worker thread (seconds for n large ones), which was not
    # raced against a cancel, as the render before it is: the cancel waited for the decode.
    task_is("unknown")
    respx.post(URL).mock(return_value=httpx.Response(200, json=ok_body()))
    real = A1111Engine._result
    decoding, release = threading.Event(), threading.Event()

    def slow(self: A1111Engine, req: RenderRequest, response: httpx.Response) -> Any:
        decoding.set()
        release.wait(timeout=30)
        return real(self, req, response)

    monkeypatch.setattr(A1111Engine, "_result", slow)
    token = CancelToken()
    running = asyncio.create_task(engine.run(bridge(), NullProgress(), token))
    try:
        await asyncio.wait_for(asyncio.to_thread(decoding.wait, 5), 10)
        token.cancel()
        with pytest.raises(Canceled) as info:
            await asyncio.wait_for(running, 5)
    finally:
        release.set()
    assert info.value.charged == "no"
