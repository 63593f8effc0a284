from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import respx
from PIL import Image

from orchestrator.errors import BadEngineInput, Canceled, EngineError, EngineTimeout, EngineUnavailable
from tests.tiers.conftest import (
    LARGE_ERROR_PADDING,
    HeldRequest,
    NoAnswer,
    RecordingProgress,
    multipart,
    png_bytes,
    until,
)
from tests.tiers.conftest import bridge as base_bridge
from tiers.base import CancelToken, NullProgress, RenderRequest, Restartable, Resumable, before_billable_sends
from tiers.comfyui import ComfyUIEngine, _results_refused, substitute

BASE = "http://comfy.test:8188"
# A route's side effect as the functions here set it (respx types it as any of what it accepts).
Handler = Callable[[httpx.Request], httpx.Response]

WORKFLOW: dict[str, Any] = {
    "3": {"class_type": "KSampler", "inputs": {
        "seed": "{{seed}}", "steps": "{{steps}}", "cfg": 7, "sampler_name": "euler", "scheduler": "normal",
        "denoise": "{{strength}}", "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
        "latent_image": ["12", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "masterpiece, {{prompt}}", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{negative_prompt}}", "clip": ["4", 1]}},
    "10": {"class_type": "LoadImage", "inputs": {"image": "{{image}}"}},
    "11": {"class_type": "ImageScale", "inputs": {"image": ["10", 0], "width": "{{width}}",
                                                  "height": "{{height}}", "upscale_method": "lanczos",
                                                  "crop": "disabled"}},
    "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "orch", "images": ["8", 0]}},
}


def write_workflow(tmp_path: Path, graph: Any = WORKFLOW, name: str = "img2img.json") -> Path:
    path = tmp_path / name
    path.write_text(graph if isinstance(graph, str) else json.dumps(graph))
    return path


@pytest.fixture
def engine(make_ctx: Any, sleep: Any, tmp_path: Path) -> ComfyUIEngine:
    eng = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=write_workflow(tmp_path)))
    eng.http.sleep = sleep
    eng.poll_interval = 0
    # respx answers for a made-up host, which a websocket would look up in DNS: the websocket's
    # tests (test_comfyui_progress.py) run a real server on loopback.
    eng.follow_progress = False
    return eng


def bridge(**kw: Any) -> RenderRequest:
    return base_bridge(**{"negative_prompt": "blurry", "width": 1024, "height": 768, "seed": 42, **kw})


def history(prompt_id: str, images: list[dict[str, str]] | None = None, status: str = "success",
            messages: list[Any] | None = None) -> dict[str, Any]:
    images = images if images is not None else [
        {"filename": "orch_00001_.png", "subfolder": "", "type": "output"}]
    return {prompt_id: {
        "prompt": [1, prompt_id, {}, {}, ["9"]],
        "outputs": {"9": {"images": images},
                    "20": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]}},
        "status": {"status_str": status, "completed": status == "success", "messages": messages or []},
    }}


def mock_server(upload: Any = None, prompt: Any = None, *, own_ids: bool = False,
                running: bool = True, base: str = BASE,
                node_errors: dict[str, Any] | None = None) -> dict[str, respx.Route]:
    """A ComfyUI at `base` that answers /history with nothing once, then with the queued prompt's
    outputs. `own_ids`: a server older than client-chosen prompt ids, which queues under an id of
    its own. `running`: whether `GET /queue` shows the queued prompt running (else another one is).
    `node_errors`: outputs that failed validation, listed in the 200 that queued the others."""
    queued: dict[str, str] = {}

    def on_prompt(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        queued["id"] = str(uuid.uuid4()) if own_ids else body["prompt_id"]
        return httpx.Response(200, json={"prompt_id": queued["id"], "number": 1, "node_errors": node_errors or {}})

    polls = {"n": 0}

    def on_history(request: httpx.Request) -> httpx.Response:
        polls["n"] += 1
        prompt_id = request.url.path.rsplit("/", 1)[1]
        known = prompt_id == queued.get("id") and polls["n"] > 1
        return httpx.Response(200, json=history(prompt_id) if known else {})

    def on_queue(request: httpx.Request) -> httpx.Response:
        current = queued.get("id") if running else "someone-else"
        return httpx.Response(200, json={"queue_running": [[0, current, {}, {}, ["9"]]], "queue_pending": []})

    return {
        "upload": respx.post(f"{base}/upload/image").mock(
            side_effect=upload, return_value=httpx.Response(200, json={"name": "orch-draft.png", "subfolder": "",
                                                                      "type": "input"})),
        "prompt": respx.post(f"{base}/prompt").mock(side_effect=prompt or on_prompt),
        "history": respx.get(url__regex=rf"{re.escape(base)}/history/.+").mock(side_effect=on_history),
        "view": respx.get(f"{base}/view").mock(return_value=httpx.Response(200, content=png_bytes((1, 2, 3)))),
        "queue": respx.post(f"{base}/queue").mock(return_value=httpx.Response(200, json={})),
        "queue_state": respx.get(f"{base}/queue").mock(side_effect=on_queue),
        "interrupt": respx.post(f"{base}/interrupt").mock(return_value=httpx.Response(200)),
    }


async def cancel_while_polling(engine: ComfyUIEngine, routes: dict[str, respx.Route], *,
                               abandon: bool = False) -> pytest.ExceptionInfo[Canceled]:
    """Run a job that is canceled (or, with `abandon`, let go of by a stopping process) while it
    waits for its prompt's history."""
    token = CancelToken()

    def pending(request: httpx.Request) -> httpx.Response:
        token.cancel(abandon=abandon)
        return httpx.Response(200, json={})

    routes["history"].side_effect = pending
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    return info


@respx.mock
async def test_success_uploads_draft_and_queues_typed_graph(engine: ComfyUIEngine) -> None:
    routes = mock_server()
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())

    fields, files = multipart(routes["upload"].calls.last.request)
    pixels = Image.open(io.BytesIO(files["image"]))
    assert pixels.getpixel((0, 0)) == (255, 0, 0)
    assert fields["type"] == "input" and fields["overwrite"] == "true"

    sent = json.loads(routes["prompt"].calls.last.request.content)
    graph = sent["prompt"]
    assert graph["3"]["inputs"]["seed"] == 42 and graph["3"]["inputs"]["steps"] == 20
    assert graph["3"]["inputs"]["denoise"] == 0.55 and isinstance(graph["3"]["inputs"]["denoise"], float)
    assert graph["11"]["inputs"]["width"] == 1024 and graph["11"]["inputs"]["height"] == 768
    assert graph["6"]["inputs"]["text"] == "masterpiece, a lighthouse"
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert graph["10"]["inputs"]["image"] == "orch-draft.png"
    assert graph["3"]["inputs"]["model"] == ["4", 0]
    assert sent["client_id"] and sent["prompt_id"] == progress.request_ids[0]

    assert routes["history"].call_count == 2
    view = routes["view"].calls.last.request.url.params
    assert dict(view) == {"filename": "orch_00001_.png", "subfolder": "", "type": "output"}
    assert len(result.images) == 1 and result.images[0].image.getpixel((0, 0)) == (1, 2, 3)
    assert result.images[0].seed == 42
    assert result.cost_millicredits == 0 and result.provider_request_id == sent["prompt_id"]
    assert progress.steps == [(1, 1)]
    assert result.metadata["steps"] == 20  # the template takes {{steps}}: ComfyUI's default was sent


@pytest.mark.parametrize(("guidance", "sent"), [(4.5, 4.5), (0.0, 0.0), (None, 8.0)])
@respx.mock
async def test_a_guidance_placeholder_takes_the_request_s_guidance_or_comfyui_s_default(
        make_ctx: Any, tmp_path: Path, guidance: float | None, sent: float) -> None:
    """A workflow could take a bridge's steps but not its guidance: the sampler's `cfg` stayed the
    template's whatever the request asked."""
    graph = json.loads(json.dumps(WORKFLOW))
    graph["3"]["inputs"]["cfg"] = "{{guidance_scale}}"
    engine = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=write_workflow(tmp_path, graph)))
    engine.poll_interval, engine.follow_progress = 0, False
    routes = mock_server()
    result = await engine.run(bridge(guidance_scale=guidance), NullProgress(), CancelToken())
    cfg = json.loads(routes["prompt"].calls.last.request.content)["prompt"]["3"]["inputs"]["cfg"]
    assert cfg == sent and isinstance(cfg, float)
    assert result.metadata["guidance_scale"] == sent


@respx.mock
async def test_polish_uses_creativity_and_n_queues_one_prompt_per_image(engine: ComfyUIEngine) -> None:
    routes = mock_server()
    result = await engine.run(bridge(stage="polish", creativity=0.25, n=2, seed=7), NullProgress(), CancelToken())
    graphs = [json.loads(c.request.content)["prompt"] for c in routes["prompt"].calls]
    assert [g["3"]["inputs"]["seed"] for g in graphs] == [7, 8]
    assert all(g["3"]["inputs"]["denoise"] == 0.25 for g in graphs)
    assert [img.seed for img in result.images] == [7, 8]
    assert routes["upload"].call_count == 1


def test_substitute_keeps_unknown_text_and_does_not_rescan() -> None:
    graph = {"a": {"inputs": {"text": "{{prompt}} / {{ seed }}", "n": "{{seed}}", "keep": "{{other}}"}}}
    out = substitute(graph, {"prompt": "say {{seed}}", "seed": 5})
    assert out == {"a": {"inputs": {"text": "say {{seed}} / 5", "n": 5, "keep": "{{other}}"}}}


@respx.mock
async def test_5xx_then_success(engine: ComfyUIEngine) -> None:
    ok = httpx.Response(200, json={"prompt_id": "x", "number": 1, "node_errors": {}})
    routes = mock_server(prompt=[httpx.Response(503), ok])  # the server's own: a proxy's 502 is not resent
    routes["history"].side_effect = lambda request: httpx.Response(
        200, json=history(request.url.path.rsplit("/", 1)[1]))
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert routes["prompt"].call_count == 2


@respx.mock
async def test_429_with_retry_after_then_success(engine: ComfyUIEngine, sleep: Any) -> None:
    routes = mock_server(upload=[
        httpx.Response(429, headers={"Retry-After": "7"}),
        httpx.Response(200, json={"name": "orch-draft.png", "subfolder": "", "type": "input"})])
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert routes["upload"].call_count == 2 and sleep.waits == [7.0]


@pytest.mark.parametrize("down", [httpx.ConnectError("refused"), httpx.Response(502), httpx.Response(503)],
                         ids=["refused", "proxy-502", "proxy-503"])
@respx.mock
async def test_a_server_down_is_waited_for_about_a_minute_not_the_deadline(
        engine: ComfyUIEngine, sleep: Any, down: Any) -> None:
    """The draft's upload is the job's first request: a ComfyUI down (or a proxy answering for it)
    held each job for the whole ORCH_REMOTE_DEADLINE (300 s) before another engine could take it,
    where AUTOMATIC1111 gives a restart 8 tries."""
    routes = mock_server(upload=[down] * 5 + [httpx.Response(200, json={"name": "orch-draft.png"})])
    await engine.run(bridge(), NullProgress(), CancelToken())  # a restart: ridden out
    assert routes["upload"].call_count == 6

    def stays_down(request: httpx.Request) -> httpx.Response:
        if isinstance(down, Exception):
            raise down
        return down

    routes["upload"].mock(side_effect=stays_down)
    sleep.waits.clear()
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert routes["upload"].call_count == 6 + 8 and sum(sleep.waits) < 90, sleep.waits
    assert info.value.retryable and info.value.charged == "no"
    assert routes["prompt"].call_count == 1  # the first job's only


@respx.mock
async def test_a_prompt_queued_with_an_answer_that_cannot_be_read_is_followed(engine: ComfyUIEngine) -> None:
    # The job failed on the 200's body and left the queued prompt to render for nobody.
    routes = mock_server()
    queue_it: Callable[[httpx.Request], httpx.Response] = routes["prompt"].side_effect  # type: ignore[assignment]

    def garbled(request: httpx.Request) -> httpx.Response:
        queue_it(request)  # queued, as the server does before it answers
        return httpx.Response(200, content=b"\xff<html>cut sh")

    routes["prompt"].side_effect = garbled
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1 and routes["prompt"].call_count == 1
    assert routes["queue"].call_count == 0 and routes["interrupt"].call_count == 0


@respx.mock
async def test_read_timeout_on_prompt_is_not_resent_and_the_prompt_is_dropped(engine: ComfyUIEngine) -> None:
    routes = mock_server(prompt=httpx.ReadTimeout("slow"))
    progress = RecordingProgress()
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), progress, CancelToken())
    assert routes["prompt"].call_count == 1 and routes["history"].call_count == 0
    assert info.value.charged == "no"
    assert json.loads(routes["queue"].calls.last.request.content) == {"delete": [progress.request_ids[0]]}


@respx.mock
@pytest.mark.parametrize("answer", ["read-timeout", "deadline"])
async def test_a_prompt_sent_without_an_answer_is_not_told_as_billed(make_ctx: Any, tmp_path: Path,
                                                                    answer: str) -> None:
    # The server bills nothing: its timeout said it "may have made and billed the image".
    engine = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=write_workflow(tmp_path),
                                    remote_deadline=0.1))  # an attempt is still given a second
    engine.follow_progress = False
    mock_server(prompt=httpx.ReadTimeout("slow") if answer == "read-timeout" else NoAnswer())
    with pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "may have made the image" in info.value.message and "billed" not in info.value.message
    assert "asked the server to drop prompt" in info.value.message and info.value.charged == "no"


@respx.mock
@pytest.mark.parametrize("answer", [httpx.Response(500, text="boom"), httpx.Response(404, text="<html>proxy</html>")])
async def test_a_history_that_cannot_be_read_takes_the_prompt_off_the_server(engine: ComfyUIEngine, sleep: Any,
                                                                           answer: httpx.Response) -> None:
    # The job failed (or fell back) and the prompt went on rendering on the shared GPU for nobody.
    engine.http.clock = sleep.clock  # the 500s are retried until the deadline, which the waits reach
    routes = mock_server()
    routes["history"].mock(side_effect=None, return_value=answer)
    progress = RecordingProgress()
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), progress, CancelToken())
    assert not isinstance(info.value, EngineTimeout)
    assert json.loads(routes["queue"].calls.last.request.content) == {"delete": [progress.request_ids[0]]}
    assert routes["interrupt"].call_count == 1  # it was running: interrupted too


@respx.mock
@pytest.mark.parametrize("status", [502, 504, 520, 524])
async def test_a_proxy_s_gateway_error_to_the_prompt_is_not_resent_and_the_prompt_is_followed(
        engine: ComfyUIEngine, status: int) -> None:
    """The proxy gave up waiting, the server had queued the prompt: sent again, it was rendered
    twice on the shared GPU. Followed under the id we chose, its image is collected."""
    routes = mock_server()
    real = cast(Handler, routes["prompt"].side_effect)  # mock_server's on_prompt

    def queued_then_gateway(request: httpx.Request) -> httpx.Response:
        real(request)  # the server queues it...
        return httpx.Response(status, text="<html>bad gateway</html>")  # ...and the proxy answers

    routes["prompt"].mock(side_effect=queued_then_gateway)
    result = await engine.run(bridge(), RecordingProgress(), CancelToken())
    assert routes["prompt"].call_count == 1 and len(result.images) == 1


@respx.mock
async def test_malformed_prompt_answer(engine: ComfyUIEngine) -> None:
    # A 200 that queued nothing after all (a proxy's page): followed by its id, found nowhere.
    mock_server(prompt=[httpx.Response(200, text="<html>")])
    with pytest.raises(EngineError, match="no longer knows prompt") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.charged == "no"


@respx.mock
async def test_node_errors_are_bad_input_naming_the_nodes(engine: ComfyUIEngine) -> None:
    refused = httpx.Response(400, json={
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": "", "extra_info": {}},
        "node_errors": {"5": {"class_type": "EmptyLatentImage", "dependent_outputs": ["9"], "errors": [
            {"type": "value_bigger_than_max", "message": "Value 20000 bigger than max of 16384",
             "details": "width", "extra_info": {}}]}}})
    routes = mock_server(prompt=[refused])
    with pytest.raises(BadEngineInput) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert "node 5 (EmptyLatentImage)" in info.value.message and "width" in info.value.message
    assert info.value.details["nodes"] == ["5"] and routes["prompt"].call_count == 1


@respx.mock
async def test_outputs_the_server_refused_while_queueing_the_rest_fail_the_job(engine: ComfyUIEngine) -> None:
    """A 200 from /prompt still lists the outputs that failed validation: the server queued only
    the others (a first pass's save), whose images are not the workflow's result."""
    routes = mock_server(node_errors={"9": {"class_type": "SaveImage", "dependent_outputs": ["9"], "errors": [
        {"type": "value_bigger_than_max", "message": "Value 9000 bigger than max of 8192", "details": "width",
         "extra_info": {}}]}})
    with pytest.raises(BadEngineInput, match=r"refused some of the workflow's outputs: node 9 \(SaveImage\)") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.details["nodes"] == ["9"]
    # What was queued is taken off the server, and nothing of it is collected.
    sent = json.loads(routes["prompt"].calls[0].request.content)["prompt_id"]
    assert json.loads(routes["queue"].calls[0].request.content) == {"delete": [sent]}
    assert routes["history"].call_count == 0 and routes["view"].call_count == 0


@respx.mock
async def test_a_preview_the_server_refused_does_not_fail_the_job(make_ctx: Any, sleep: Any, tmp_path: Path) -> None:
    # An unconnected PreviewImage left in the workflow: the result's SaveImage passed and was queued.
    graph = {**WORKFLOW, "20": {"class_type": "PreviewImage", "inputs": {}}}
    eng = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=write_workflow(tmp_path, graph)))
    eng.http.sleep, eng.poll_interval, eng.follow_progress = sleep, 0, False

    routes = mock_server(node_errors={"20": {"class_type": "PreviewImage", "dependent_outputs": ["20"], "errors": [
        {"type": "required_input_missing", "message": "Required input is missing", "details": "images"}]}})
    result = await eng.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1 and routes["queue"].call_count == 0
    await eng.aclose()


def test_only_node_errors_that_reach_the_result_refuse_a_queued_prompt() -> None:
    graph = {**WORKFLOW, "20": {"class_type": "PreviewImage", "inputs": {}},
             "21": {"class_type": "SaveImage", "inputs": {}}}

    def failed(*outputs: str) -> dict[str, Any]:
        return {"5": {"class_type": "EmptyLatentImage", "dependent_outputs": list(outputs), "errors": []}}

    assert not _results_refused({}, graph) and not _results_refused(None, graph)
    assert not _results_refused(failed("20"), graph)                 # a preview only
    assert _results_refused(failed("20", "9"), graph)                # a save: the result is cut short
    assert _results_refused({"5": {"errors": []}}, graph)            # not told which: taken as the result's
    marked = {**graph, "21": {**graph["21"], "_meta": {"title": "Orchestrator Output"}}}
    assert not _results_refused(failed("9"), marked)                 # an intermediate save, not the result
    assert _results_refused(failed("21"), marked)


@pytest.mark.parametrize("refusal", [
    {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
     "node_errors": {"4": {"class_type": "CheckpointLoaderSimple", "errors": [
         {"type": "value_not_in_list", "message": "Value not in list",
          "details": "ckpt_name: 'sdxl.safetensors' not in []"}]}}},
    {"error": {"type": "missing_node_type", "message": "Node 'UltimateSDUpscale' not found. "
               "The custom node may not be installed.", "details": "Node ID '#7'"}, "node_errors": {}},
    # A workflow whose output node was deleted: ComfyUI's own 400 for it.
    {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
               "extra_info": {}}, "node_errors": {}},
], ids=["checkpoint-missing", "custom-node-missing", "no-output-node"])
@respx.mock
async def test_a_server_lacking_what_the_workflow_names_is_unavailable_not_bad_input(
        engine: ComfyUIEngine, refusal: dict[str, Any]) -> None:
    """No request can pass there; another engine may take the job (retryable, counted by the
    circuit breaker), and the operator is told where to look."""
    mock_server(prompt=[httpx.Response(400, json=refusal)])
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.retryable and "ORCH_COMFYUI_WORKFLOW" in info.value.message
    assert any(said in info.value.message for said in ("sdxl.safetensors", "UltimateSDUpscale", "has no outputs"))


@respx.mock
async def test_an_execution_error_echoing_the_server_s_credentials_does_not_carry_them(
        make_ctx: Any, sleep: Any, tmp_path: Path) -> None:
    # A custom node's exception that prints the request it got: the basic auth of ORCH_COMFYUI_URL
    # reached the job's error, its events and the log.
    eng = ComfyUIEngine(make_ctx(comfyui_url="http://render:pw-secret-2@comfy.test:8188",
                                 comfyui_workflow=write_workflow(tmp_path)))
    eng.http.sleep = sleep
    eng.poll_interval = 0
    routes = mock_server()
    basic = base64.b64encode(b"render:pw-secret-2").decode()
    routes["history"].side_effect = lambda request: httpx.Response(200, json=history(
        request.url.path.rsplit("/", 1)[1], images=[], status="error", messages=[
            ["execution_error", {"node_id": "3", "node_type": "Fetch", "exception_type": "RuntimeError",
                                 "exception_message": f"got Authorization: Basic {basic} (render:pw-secret-2)"}]]))
    with pytest.raises(EngineError) as info:
        await eng.run(bridge(), NullProgress(), CancelToken())
    assert routes["history"].calls.last.request.headers["authorization"] == f"Basic {basic}"
    assert basic not in info.value.message and "pw-secret-2" not in info.value.message, info.value.message


@respx.mock
async def test_a_proxy_s_user_and_password_in_the_url_are_sent_but_never_logged(
        make_ctx: Any, sleep: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # httpx sent them from the base URL on its own, and its request log line printed each URL whole.
    eng = ComfyUIEngine(make_ctx(comfyui_url="http://render:pw-secret-2@comfy.test:8188",
                                 comfyui_workflow=write_workflow(tmp_path)))
    eng.http.sleep = sleep
    eng.poll_interval = 0
    eng.follow_progress = False
    routes = mock_server()
    # httpx's own logger too: the CLI's tests, run before this one in the same process, leave it at WARNING.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="httpx"):
        await eng.run(bridge(), NullProgress(), CancelToken())
    sent = routes["prompt"].calls.last.request
    assert any(record.name == "httpx" for record in caplog.records)  # its request lines were looked at
    assert sent.headers["authorization"] == "Basic " + base64.b64encode(b"render:pw-secret-2").decode()
    assert sent.url.userinfo == b""
    assert caplog.records and not any("pw-secret-2" in record.getMessage() for record in caplog.records)


@respx.mock
async def test_execution_error_in_history(engine: ComfyUIEngine) -> None:
    routes = mock_server()
    routes["history"].side_effect = lambda request: httpx.Response(200, json=history(
        request.url.path.rsplit("/", 1)[1], images=[], status="error", messages=[
            ["execution_start", {"prompt_id": "x"}],
            ["execution_error", {"node_id": "3", "node_type": "KSampler", "exception_type": "torch.OutOfMemoryError",
                                 "exception_message": "CUDA out of memory"}]]))
    with pytest.raises(EngineError, match=r"node 3 \(KSampler\).*CUDA out of memory") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not info.value.engine_fault  # the request's size: no circuit counts it (see test_a1111)


@respx.mock
async def test_an_error_status_whose_messages_are_of_another_shape_is_an_engine_error(engine: ComfyUIEngine) -> None:
    # A number there raised TypeError: the job "failed unexpectedly", never moving to the next engine.
    routes = mock_server()
    routes["history"].side_effect = lambda request: httpx.Response(200, json={
        (pid := request.url.path.rsplit("/", 1)[1]): {**history(pid, images=[], status="error")[pid],
                                                      "status": {"status_str": "error", "messages": 5}}})
    with pytest.raises(EngineError, match="status error without details") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.retryable


@pytest.mark.parametrize("errors", [7, [{"type": {"odd": 1}, "message": "m"}], None])
@respx.mock
async def test_node_errors_of_another_shape_are_a_refusal(engine: ComfyUIEngine, errors: Any) -> None:
    refusal = {"error": {"type": ["x"], "message": "invalid prompt"},
               "node_errors": {"9": {"class_type": "SaveImage", "errors": errors}}}
    mock_server(prompt=[httpx.Response(400, json=refusal)])
    with pytest.raises(BadEngineInput, match=r"node 9 \(SaveImage\)"):
        await engine.run(bridge(), NullProgress(), CancelToken())


@respx.mock
async def test_no_output_images_is_a_failure(engine: ComfyUIEngine) -> None:
    routes = mock_server()
    routes["history"].side_effect = lambda request: httpx.Response(
        200, json=history(request.url.path.rsplit("/", 1)[1], images=[]))
    with pytest.raises(EngineError, match="SaveImage"):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert routes["view"].call_count == 0


@respx.mock
@pytest.mark.parametrize("images", [5, True, 1.5, "orch_00001_.png"])
async def test_an_output_whose_images_are_no_list_is_the_servers_failure(engine: ComfyUIEngine, images: Any) -> None:
    # A number there raised TypeError: the job failed as an engine bug, not retried on the next engine.
    routes = mock_server()
    routes["history"].side_effect = lambda request: httpx.Response(200, json={request.url.path.rsplit("/", 1)[1]: {
        "outputs": {"9": {"images": images}}, "status": {"status_str": "success", "messages": []}}})
    with pytest.raises(EngineError, match="without output images") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.retryable and routes["view"].call_count == 0


def saved(filename: str) -> dict[str, Any]:
    return {"images": [{"filename": filename, "subfolder": "", "type": "output"}]}


def two_saves(make_ctx: Any, tmp_path: Path, title: str | None,
              ran: tuple[str, str] = ("9", "15")) -> tuple[ComfyUIEngine, dict[str, respx.Route]]:
    """A workflow that saves a first pass (node 15, first in the file) and the final image (node 9,
    titled `title`); the server's history lists their outputs in the order `ran`."""
    graph = {"15": {"class_type": "SaveImage", "inputs": {"filename_prefix": "pass1", "images": ["3", 0]}},
             **WORKFLOW}
    if title is not None:
        graph["9"] = {**graph["9"], "_meta": {"title": title}}
    eng = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=write_workflow(tmp_path, graph)))
    eng.poll_interval = 0
    eng.follow_progress = False
    routes = mock_server()

    def on_history(request: httpx.Request) -> httpx.Response:
        entry = history(request.url.path.rsplit("/", 1)[1])
        for value in entry.values():
            value["outputs"] = {node: saved("final.png" if node == "9" else "pass1.png") for node in ran}
        return httpx.Response(200, json=entry)

    routes["history"].side_effect = on_history
    return eng, routes


@respx.mock
async def test_results_are_taken_in_the_template_s_node_order(make_ctx: Any, tmp_path: Path) -> None:
    engine, routes = two_saves(make_ctx, tmp_path, title=None)
    await engine.run(bridge(), NullProgress(), CancelToken())
    assert routes["view"].calls.last.request.url.params["filename"] == "pass1.png"


@respx.mock
@pytest.mark.parametrize("title", ["orchestrator output", " Orchestrator Output "])
async def test_nodes_titled_orchestrator_output_make_the_results(make_ctx: Any, tmp_path: Path, title: str) -> None:
    engine, routes = two_saves(make_ctx, tmp_path, title=title, ran=("15", "9"))  # first everywhere: not it
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert [call.request.url.params["filename"] for call in routes["view"].calls] == ["final.png"]
    assert len(result.images) == 1


@respx.mock
async def test_marked_nodes_that_save_nothing_fail_naming_them(make_ctx: Any, tmp_path: Path) -> None:
    engine, routes = two_saves(make_ctx, tmp_path, title="orchestrator output")

    def only_the_first_pass(request: httpx.Request) -> httpx.Response:
        entry = history(request.url.path.rsplit("/", 1)[1])
        for value in entry.values():
            value["outputs"] = {"15": saved("pass1.png")}
        return httpx.Response(200, json=entry)

    routes["history"].side_effect = only_the_first_pass
    with pytest.raises(EngineError, match=r"titled 'orchestrator output' \(9\) saved no images"):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert routes["view"].call_count == 0


@respx.mock
async def test_cancel_during_polling_drops_and_interrupts(engine: ComfyUIEngine) -> None:
    routes = mock_server()
    info = await cancel_while_polling(engine, routes)
    prompt_id = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    assert info.value.charged == "no"
    assert json.loads(routes["interrupt"].calls.last.request.content) == {"prompt_id": prompt_id}
    assert json.loads(routes["queue"].calls.last.request.content) == {"delete": [prompt_id]}
    assert routes["view"].call_count == 0


def queue_hangs_once(routes: dict[str, respx.Route], monkeypatch: pytest.MonkeyPatch) -> HeldRequest:
    """`GET /queue` held open the first time, and never given up on (`CLEANUP_TIMEOUT` held a
    cancel 5 s); answered as before after that, when the canceled job takes its prompt off."""
    monkeypatch.setattr("tiers.comfyui.CLEANUP_TIMEOUT", 3600.0)
    hung = HeldRequest(httpx.Response(200, json={}))
    answer = cast(Handler, routes["queue_state"].side_effect)

    async def first_hangs(request: httpx.Request) -> httpx.Response:
        return await hung(request) if not hung.sent.is_set() else answer(request)

    routes["queue_state"].side_effect = first_hangs
    return hung


@respx.mock
async def test_a_cancel_does_not_wait_for_a_look_at_the_queue(engine: ComfyUIEngine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    routes = mock_server()
    routes["history"].mock(side_effect=None, return_value=httpx.Response(200, json={}))  # still rendering
    look = queue_hangs_once(routes, monkeypatch)
    token = CancelToken()
    run = asyncio.ensure_future(engine.run(bridge(), NullProgress(), token))
    await asyncio.wait_for(look.sent.wait(), 10)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(run, 10)
    prompt_id = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    assert info.value.charged == "no" and look.dropped
    assert dropped(routes) == ([prompt_id], [prompt_id])


@respx.mock
async def test_a_stopping_process_leaves_its_prompt_to_run_for_the_next_attempt(engine: ComfyUIEngine) -> None:
    """A deploy's restart must not throw away a render in progress: the job's next attempt
    collects the prompt from the history (see `resume`)."""
    routes = mock_server()
    await cancel_while_polling(engine, routes, abandon=True)
    assert routes["interrupt"].call_count == 0 and routes["queue"].call_count == 0


@respx.mock
@pytest.mark.parametrize("own_ids", [False, True], ids=["our-id", "server-id"])
async def test_a_cancel_while_the_prompt_is_being_queued_drops_it_once_queued(
        engine: ComfyUIEngine, own_ids: bool) -> None:
    """The server queues a prompt only after validating it, disconnected or not: a delete sent
    while `POST /prompt` is out would come first and leave it to render for nobody."""
    routes = mock_server()
    held = HeldRequest(httpx.Response(200))
    order: list[str] = []

    async def queueing(request: httpx.Request) -> httpx.Response:
        await held(request)
        order.append("queued")
        prompt_id = "server-7" if own_ids else json.loads(request.content)["prompt_id"]
        return httpx.Response(200, json={"prompt_id": prompt_id, "number": 1, "node_errors": {}})

    def deleting(request: httpx.Request) -> httpx.Response:
        order.append("delete")
        return httpx.Response(200, json={})

    routes["prompt"].side_effect = queueing
    routes["queue"].side_effect = deleting
    token = CancelToken()
    run = asyncio.create_task(engine.run(bridge(), NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel()
    await until(lambda: order != [], within=0.2)  # nothing is deleted while the request is out
    held.answer.set()
    with pytest.raises(Canceled):
        await asyncio.wait_for(run, 10)
    assert held.answered and order[0] == "queued" and "delete" in order
    deleted = {json.loads(call.request.content)["delete"][0] for call in routes["queue"].calls}
    assert ("server-7" in deleted) == own_ids
    assert routes["prompt"].call_count == 1 and routes["history"].call_count == 0


@respx.mock
async def test_a_job_canceled_before_its_prompt_is_sent_sends_none(engine: ComfyUIEngine) -> None:
    # The cancel landed as the upload answered: the prompt was sent, waited for, then deleted.
    routes = mock_server()
    token = CancelToken()

    def uploaded_as_canceled(request: httpx.Request) -> httpx.Response:
        token.cancel()
        return httpx.Response(200, json={"name": "orch-draft.png", "subfolder": "", "type": "input"})

    routes["upload"].side_effect = uploaded_as_canceled
    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), NullProgress(), token)
    assert routes["prompt"].call_count == 0 and info.value.charged == "no"


@respx.mock
async def test_a_process_stopping_while_the_prompt_is_being_queued_does_not_wait_for_it(
        engine: ComfyUIEngine) -> None:
    routes = mock_server()
    held = HeldRequest(httpx.Response(200, json={"prompt_id": "x", "number": 1, "node_errors": {}}))
    routes["prompt"].side_effect = held
    token = CancelToken()
    run = asyncio.create_task(engine.run(bridge(), NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel(abandon=True)
    with pytest.raises(Canceled):
        await asyncio.wait_for(run, 5)
    # The next attempt finds the prompt by its id: nothing is taken off the server.
    assert held.dropped and routes["queue"].call_count == 0


@respx.mock
async def test_a_cancel_while_another_prompt_runs_only_takes_ours_off_the_queue(engine: ComfyUIEngine) -> None:
    # Servers before targeted interrupts stop whatever runs, whatever prompt_id is sent.
    routes = mock_server(running=False)
    await cancel_while_polling(engine, routes)
    prompt_id = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    assert json.loads(routes["queue"].calls.last.request.content) == {"delete": [prompt_id]}
    assert routes["queue_state"].call_count == 1 and routes["interrupt"].call_count == 0


@respx.mock
async def test_a_server_that_names_the_prompt_itself_is_followed_by_its_id(engine: ComfyUIEngine) -> None:
    routes = mock_server(own_ids=True)
    progress = RecordingProgress()
    result = await engine.run(bridge(), progress, CancelToken())
    ours = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    theirs = routes["prompt"].calls.last.response.json()["prompt_id"]
    assert ours != theirs and len(result.images) == 1
    assert routes["history"].calls.last.request.url.path == f"/history/{theirs}"
    assert result.provider_request_id == theirs and progress.request_ids == [ours, theirs]


@respx.mock
async def test_variations_need_a_seed_placeholder(make_ctx: Any, tmp_path: Path) -> None:
    # n identical graphs would be one cached image n times.
    graph = json.loads(json.dumps(WORKFLOW))
    graph["3"]["inputs"]["seed"] = 42
    eng = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=write_workflow(tmp_path, graph)))
    eng.poll_interval = 0
    eng.follow_progress = False
    routes = mock_server()
    with pytest.raises(BadEngineInput, match=r"made 1 of 2 images and has no \{\{seed\}\}"):
        await eng.run(bridge(n=2), NullProgress(), CancelToken())
    assert routes["prompt"].call_count == 1  # a workflow that is itself a batch would have been enough
    assert len((await eng.run(bridge(n=1), NullProgress(), CancelToken())).images) == 1
    await eng.aclose()


@respx.mock
async def test_cleanup_failure_still_cancels(engine: ComfyUIEngine) -> None:
    routes = mock_server()
    routes["interrupt"].side_effect = httpx.ConnectError("down")
    routes["queue"].mock(return_value=httpx.Response(404))
    info = await cancel_while_polling(engine, routes)
    # Both cleanups were tried and failed; the cancel still ends the job, with nothing charged.
    assert routes["queue"].call_count == 1 and routes["interrupt"].call_count >= 1  # connect errors are retried
    assert info.value.charged == "no"


@respx.mock
async def test_404_means_wrong_url(engine: ComfyUIEngine) -> None:
    mock_server(upload=[httpx.Response(404, text="Not Found")])
    with pytest.raises(EngineUnavailable, match="ORCH_COMFYUI_URL"):
        await engine.run(bridge(), NullProgress(), CancelToken())


async def test_bridge_without_draft_is_bad_input(engine: ComfyUIEngine) -> None:
    with pytest.raises(BadEngineInput):
        await engine.run(bridge(init_image=None), NullProgress(), CancelToken())


def test_free_and_available(engine: ComfyUIEngine) -> None:
    assert engine.availability() == (True, None)
    assert engine.estimate(bridge(n=4)) == 0
    assert engine.prices() == {"credits_per_image": 0}
    assert engine.model == "comfyui:img2img"
    assert engine.kind == "remote" and engine.capabilities.leaves_machine


def test_unavailable_without_url(make_ctx: Any, tmp_path: Path) -> None:
    available, reason = ComfyUIEngine(make_ctx(comfyui_workflow=write_workflow(tmp_path))).availability()
    assert not available and reason and "ORCH_COMFYUI_URL" in reason


def test_unavailable_without_workflow(make_ctx: Any) -> None:
    available, reason = ComfyUIEngine(make_ctx(comfyui_url=BASE)).availability()
    assert not available and reason and "ORCH_COMFYUI_WORKFLOW" in reason


@pytest.mark.parametrize(("content", "why"), [
    ("{not json", "not valid JSON"),
    ({"nodes": [], "links": []}, "UI format"),
    ([1, 2], "JSON object"),
    ("null", "JSON object"),
    ({"1": {"inputs": {}}}, "class_type"),
    ({**WORKFLOW, "99": {"class_type": "X", "inputs": {"v": "{{promt}}"}}}, "{{promt}}"),
    ({k: v for k, v in WORKFLOW.items() if k != "10"}, "{{image}}"),
])
def test_unavailable_with_bad_workflow(make_ctx: Any, tmp_path: Path, content: Any, why: str) -> None:
    path = write_workflow(tmp_path, content, name="broken.json")
    available, reason = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=path)).availability()
    assert not available and reason and "'broken.json'" in reason and why in reason
    assert str(tmp_path) not in reason  # project keys read it: the file by its name, never the server's folders


@pytest.mark.parametrize("folder", ["o'brien-client", "acme client's"])
def test_unavailable_with_missing_workflow_file(make_ctx: Any, tmp_path: Path, folder: str) -> None:
    # A quote in the folder once let it through to project keys (`store.hide_paths` stopped at it).
    path = tmp_path / folder / "missing.json"
    available, reason = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=path)).availability()
    assert not available and reason and "'missing.json'" in reason
    assert folder not in reason and str(tmp_path) not in reason


def nested(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(("data", "why"), [
    (json.dumps(WORKFLOW).encode("utf-16"), "not UTF-8"),  # PowerShell's `>`
    (json.dumps({**WORKFLOW, "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "café {{prompt}}"}}},
                ensure_ascii=False).encode("latin-1"), "not UTF-8"),
    (("[" * 100_000 + "]" * 100_000).encode(), "nests deeper"),  # past json's own recursion
    (json.dumps({**WORKFLOW, "99": {"class_type": "X", "inputs": {"v": nested(70)}}}).encode(), "nests deeper"),
], ids=["utf16", "latin1", "past-json", "deep"])
def test_unavailable_with_an_unreadable_workflow(make_ctx: Any, tmp_path: Path, data: bytes, why: str) -> None:
    # These once raised out of availability() (UnicodeDecodeError, RecursionError), which the
    # service's start calls for every engine: it did not start at all.
    path = tmp_path / "broken.json"
    path.write_bytes(data)
    available, reason = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=path)).availability()
    assert not available and reason and "'broken.json'" in reason and why in reason


def test_a_workflow_with_a_byte_order_mark_loads(make_ctx: Any, tmp_path: Path) -> None:
    path = tmp_path / "notepad.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(WORKFLOW).encode())
    assert ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=path)).availability() == (True, None)


def test_the_service_starts_beside_a_utf16_workflow(
        make_settings: Any, start_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "wf.json"
    path.write_bytes(json.dumps(WORKFLOW).encode("utf-16"))
    client = start_server(make_settings(comfyui_url=BASE, comfyui_workflow=path))
    engines = {e["name"]: e for e in client.get("/v1/engines").json()}
    assert engines["comfyui"]["available"] is False and "not UTF-8" in engines["comfyui"]["note"]


async def test_run_with_bad_workflow_is_unavailable(make_ctx: Any, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, "{", name="broken.json")
    eng = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=path))
    with pytest.raises(EngineUnavailable, match=r"broken\.json"):
        await eng.run(bridge(), NullProgress(), CancelToken())


@respx.mock
async def test_a_queue_answer_that_is_not_comfyui_s_interrupts_nothing(engine: ComfyUIEngine) -> None:
    # A proxy's page in front of the server: the cancel still ends as a cancel (it was a
    # JSONDecodeError), and with nothing known to be ours running, nothing is interrupted.
    routes = mock_server()
    routes["queue_state"].side_effect = None
    routes["queue_state"].return_value = httpx.Response(200, text="<html>sign in</html>")
    await cancel_while_polling(engine, routes)
    assert routes["queue_state"].call_count == 1 and routes["interrupt"].call_count == 0


@respx.mock
async def test_after_a_crash_the_dead_attempt_s_prompts_leave_the_server(engine: ComfyUIEngine) -> None:
    # One pending, one running (the dead attempt's second image): both go, the running one by interrupt.
    delete = respx.post(f"{BASE}/queue").mock(return_value=httpx.Response(200, json={}))
    respx.get(f"{BASE}/queue").mock(return_value=httpx.Response(200, json={
        "queue_running": [[1, "p-2", {}, {}, ["9"]]], "queue_pending": []}))
    interrupt = respx.post(f"{BASE}/interrupt").mock(return_value=httpx.Response(200))
    await engine.forget([{"id": "p-1"}, {"id": "p-2"}])
    assert [json.loads(c.request.content) for c in delete.calls] == [{"delete": ["p-1"]}, {"delete": ["p-2"]}]
    assert [json.loads(c.request.content) for c in interrupt.calls] == [{"prompt_id": "p-2"}]
    assert isinstance(engine, Restartable)


@respx.mock
@pytest.mark.parametrize("known", [True, False], ids=["still-queued", "forgotten"])
async def test_a_prompt_the_restarted_server_forgot_fails_at_once(engine: ComfyUIEngine, known: bool) -> None:
    routes = mock_server()
    polls = {"n": 0}

    def slow_history(request: httpx.Request) -> httpx.Response:
        polls["n"] += 1
        prompt_id = request.url.path.rsplit("/", 1)[1]
        return httpx.Response(200, json=history(prompt_id) if known and polls["n"] > 7 else {})

    def queue_state(request: httpx.Request) -> httpx.Response:
        pending = [[2, json.loads(routes["prompt"].calls.last.request.content)["prompt_id"], {}, {}, ["9"]]]
        return httpx.Response(200, json={"queue_running": [], "queue_pending": pending if known else []})

    routes["history"].side_effect = slow_history
    routes["queue_state"].side_effect = queue_state
    if known:  # waited out: a queued prompt is not taken for a lost one
        result = await engine.run(bridge(), NullProgress(), CancelToken())
        assert len(result.images) == 1 and polls["n"] == 8
        return
    with pytest.raises(EngineError, match="no longer knows prompt") as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert polls["n"] == 6  # five empty answers, a look at the queue, the history once more
    assert info.value.retryable and info.value.charged == "no"


def earlier_server(finished: dict[str, list[list[Any]]], running: list[str], *,
                   finish_after: int = 2) -> dict[str, respx.Route]:
    """A ComfyUI that still has a dead attempt's prompts: `finished` in its history (with their
    history entries' messages), `running` in its queue until each has been asked for
    `finish_after` times, anything else forgotten. New prompts go through `mock_server`'s flow."""
    routes = mock_server()
    new_history = cast(Handler, routes["history"].side_effect)  # mock_server's on_history
    asked: dict[str, int] = {}

    def on_history(request: httpx.Request) -> httpx.Response:
        prompt_id = request.url.path.rsplit("/", 1)[1]
        if prompt_id in finished:
            return httpx.Response(200, json=history(prompt_id, status="error", messages=finished[prompt_id])
                                  if finished[prompt_id] else history(prompt_id))
        if prompt_id in running:
            asked[prompt_id] = asked.get(prompt_id, 0) + 1
            return httpx.Response(200, json=history(prompt_id) if asked[prompt_id] > finish_after else {})
        return new_history(request)

    def on_queue(request: httpx.Request) -> httpx.Response:
        still = [p for p in running if asked.get(p, 0) <= finish_after]
        return httpx.Response(200, json={"queue_running": [[0, p, {}, {}, ["9"]] for p in still[:1]],
                                         "queue_pending": [[1, p, {}, {}, ["9"]] for p in still[1:]]})

    routes["history"].side_effect = on_history
    routes["queue_state"].side_effect = on_queue
    return routes


def sent_seeds(routes: dict[str, respx.Route]) -> list[int]:
    return [json.loads(c.request.content)["prompt"]["3"]["inputs"]["seed"] for c in routes["prompt"].calls]


@respx.mock
async def test_after_a_crash_finished_and_running_prompts_are_kept_and_only_the_rest_rendered(
        engine: ComfyUIEngine) -> None:
    # The dead attempt had queued three prompts: the first finished, the second still runs, and
    # the server lost the third. Only the third image is rendered again, with its own seed.
    routes = earlier_server({"p-1": []}, ["p-2"])
    handles = [{"id": "p-1", "seed": 42}, {"id": "p-2", "seed": 43}, {"id": "p-3", "seed": 44}]
    progress = RecordingProgress()
    result = await engine.resume(bridge(n=3, seed=42), handles, progress, CancelToken())
    assert sent_seeds(routes) == [44]
    assert [img.seed for img in result.images] == [42, 43, 44]
    assert result.provider_request_id is not None
    assert result.provider_request_id.split(",")[:2] == ["p-1", "p-2"]
    assert routes["upload"].call_count == 1 and routes["queue"].call_count == 0  # nothing to take off
    assert progress.steps == [(1, 3), (2, 3), (3, 3)]
    assert progress.handles[-1]["seed"] == 44  # saved for a crash of this attempt too


@respx.mock
async def test_a_resumed_job_whose_prompts_all_finished_sends_nothing(engine: ComfyUIEngine) -> None:
    # No seed in the request: the dead attempt's first prompt had the one drawn for it.
    routes = earlier_server({"p-1": [], "p-2": []}, [])
    result = await engine.resume(bridge(n=2, seed=None), [{"id": "p-1", "seed": 9}, {"id": "p-2", "seed": 10}],
                                 NullProgress(), CancelToken())
    assert [img.seed for img in result.images] == [9, 10]
    assert routes["prompt"].call_count == 0 and routes["upload"].call_count == 0


@respx.mock
async def test_a_failed_or_seedless_earlier_prompt_is_rendered_again(engine: ComfyUIEngine) -> None:
    # p-1 failed on the server (rendered again with its seed); p-2 was saved by a version that
    # kept no seeds, so it cannot be matched to an image: it is taken off the server and redone.
    failed = [["execution_error", {"node_id": "3", "node_type": "KSampler", "exception_type": "OOM",
                                   "exception_message": "out of memory"}]]
    routes = earlier_server({"p-1": failed}, ["p-2"])
    result = await engine.resume(bridge(n=2, seed=42), [{"id": "p-1", "seed": 42}, {"id": "p-2"}],
                                 NullProgress(), CancelToken())
    assert sent_seeds(routes) == [42, 43]
    assert [img.seed for img in result.images] == [42, 43]
    assert [json.loads(c.request.content) for c in routes["queue"].calls] == [{"delete": ["p-2"]}]


@respx.mock
async def test_a_cancel_while_waiting_for_an_earlier_prompt_takes_it_off_the_server(engine: ComfyUIEngine) -> None:
    routes = earlier_server({}, ["p-1"], finish_after=100)
    token = CancelToken()
    waiting = cast(Handler, routes["history"].side_effect)  # earlier_server's on_history

    def cancel_on_second_look(request: httpx.Request) -> httpx.Response:
        if routes["history"].call_count >= 2:
            token.cancel()
        return waiting(request)

    routes["history"].side_effect = cancel_on_second_look
    with pytest.raises(Canceled):
        await engine.resume(bridge(seed=42), [{"id": "p-1", "seed": 42}], NullProgress(), token)
    assert [json.loads(c.request.content) for c in routes["queue"].calls] == [{"delete": ["p-1"]}]
    assert routes["prompt"].call_count == 0
    assert isinstance(engine, Resumable)


EARLIER = [{"id": "p-1", "seed": 42}, {"id": "p-2", "seed": 43}, {"id": "p-3", "seed": 44}]


def dropped(routes: dict[str, respx.Route]) -> tuple[list[str], list[str]]:
    """The prompts taken off the queue, in order, and those interrupted."""
    return ([p for c in routes["queue"].calls for p in json.loads(c.request.content)["delete"]],
            [json.loads(c.request.content)["prompt_id"] for c in routes["interrupt"].calls])


@respx.mock
async def test_a_cancel_of_a_resume_does_not_wait_for_a_look_at_the_queue(engine: ComfyUIEngine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    routes = earlier_server({}, ["p-1", "p-2"], finish_after=100)
    look = queue_hangs_once(routes, monkeypatch)
    token = CancelToken()
    run = asyncio.ensure_future(engine.resume(bridge(n=2, seed=42), EARLIER[:2], NullProgress(), token))
    await asyncio.wait_for(look.sent.wait(), 10)  # p-1 has no history yet: is it still queued?
    token.cancel()
    with pytest.raises(Canceled):
        await asyncio.wait_for(run, 10)
    assert look.dropped and dropped(routes) == (["p-1", "p-2"], ["p-1"])


@respx.mock
@pytest.mark.parametrize("abandon", [False, True], ids=["canceled", "abandoned"])
@pytest.mark.parametrize("at", ["before", "first-look", "following", "following-second"])
async def test_a_canceled_resume_takes_every_earlier_prompt_not_read_off_the_server(
        engine: ComfyUIEngine, at: str, abandon: bool) -> None:
    """The earlier prompts were walked one at a time, and a cancel dropped at most the one being
    followed: those not looked at yet rendered on the shared GPU for nobody. A stopping process
    (abandon) leaves them all to the job's next attempt."""
    # p-1 runs (or, for following-second, finished), the others wait in the queue.
    second = at == "following-second"
    routes = earlier_server({"p-1": []} if second else {}, ["p-2", "p-3"] if second else ["p-1", "p-2", "p-3"],
                            finish_after=100)
    token = CancelToken()
    waiting = cast(Handler, routes["history"].side_effect)  # earlier_server's on_history
    looks: dict[str, int] = {}
    hang = NoAnswer()

    async def cancel_there(request: httpx.Request) -> httpx.Response:
        prompt_id = request.url.path.rsplit("/", 1)[1]
        looks[prompt_id] = looks.get(prompt_id, 0) + 1
        if at == "first-look":
            token.cancel(abandon=abandon)
            return await hang(request)  # canceled while the read is out
        if looks[prompt_id] == 2 and prompt_id == ("p-2" if second else "p-1"):  # waiting for it
            token.cancel(abandon=abandon)
        return waiting(request)

    routes["history"].side_effect = cancel_there
    if at == "before":
        token.cancel(abandon=abandon)
    with pytest.raises(Canceled) as info:
        await engine.resume(bridge(n=3, seed=42), EARLIER, NullProgress(), token)
    assert info.value.charged == "no"
    assert routes["prompt"].call_count == 0 and routes["upload"].call_count == 0
    assert looks == {"before": {}, "first-look": {"p-1": 1}, "following": {"p-1": 2},
                     "following-second": {"p-1": 1, "p-2": 2}}[at]
    if abandon:
        assert dropped(routes) == ([], [])
    elif second:  # p-1 had finished and was read: nothing to take off
        assert dropped(routes) == (["p-2", "p-3"], ["p-2"])
    else:  # each once; only the running one interrupted
        assert dropped(routes) == (["p-1", "p-2", "p-3"], ["p-1"])


@respx.mock
@pytest.mark.parametrize("failure", ["unreadable-at-first-look", "unreadable-while-following", "timeout"])
async def test_a_resume_that_fails_on_an_earlier_prompt_takes_the_others_off_the_server(
        make_ctx: Any, tmp_path: Path, sleep: Any, failure: str) -> None:
    """A failure waiting for the first earlier prompt (its history a proxy's page, or its deadline
    past) ends the job: the two queued behind it must not render for nobody."""
    engine, now = timed_engine(make_ctx, tmp_path, sleep)
    routes = earlier_server({}, ["p-1", "p-2", "p-3"], finish_after=100)
    waiting = cast(Handler, routes["history"].side_effect)  # earlier_server's on_history
    looks = [0]

    def failing(request: httpx.Request) -> httpx.Response:
        looks[0] += 1
        first = looks[0] == 1
        if failure == "timeout" and not first:
            now[0] += 400.0  # past the 300 s deadline
        elif failure == "unreadable-at-first-look" or (failure == "unreadable-while-following" and not first):
            return httpx.Response(404, text="<html>proxy</html>")
        return waiting(request)

    routes["history"].side_effect = failing
    with pytest.raises(EngineError) as info:
        await engine.resume(bridge(n=3, seed=42), EARLIER, NullProgress(), CancelToken())
    assert not isinstance(info.value, Canceled)
    assert isinstance(info.value, EngineTimeout) == (failure == "timeout")
    assert info.value.charged == "no"
    assert looks[0] == (1 if failure == "unreadable-at-first-look" else 2)
    assert dropped(routes) == (["p-1", "p-2", "p-3"], ["p-1"])
    assert routes["prompt"].call_count == 0


def timed_engine(make_ctx: Any, tmp_path: Path, sleep: Any) -> tuple[ComfyUIEngine, list[float]]:
    """An engine with ORCH_REMOTE_DEADLINE at 300 s on a clock the test moves (`now[0]`)."""
    eng = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=write_workflow(tmp_path), remote_deadline=300.0))
    eng.http.sleep = sleep
    eng.poll_interval = 0
    eng.follow_progress = False
    now = [1000.0]
    eng.http.clock = lambda: now[0] + sum(sleep.waits)
    return eng, now


@respx.mock
async def test_each_prompt_of_a_job_has_its_own_deadline(make_ctx: Any, tmp_path: Path, sleep: Any) -> None:
    """Two images of 200 s each, within a 300 s ORCH_REMOTE_DEADLINE apiece: one deadline for both
    timed the second out, retryable and free, and the job fell back to the next (maybe paid) engine
    with the first image made."""
    engine, now = timed_engine(make_ctx, tmp_path, sleep)
    routes = mock_server()
    polls: dict[str, int] = {}

    def rendering(request: httpx.Request) -> httpx.Response:
        prompt_id = request.url.path.rsplit("/", 1)[1]
        polls[prompt_id] = polls.get(prompt_id, 0) + 1
        now[0] += 50.0
        return httpx.Response(200, json=history(prompt_id) if polls[prompt_id] >= 4 else {})

    routes["history"].side_effect = rendering
    result = await engine.run(bridge(n=2), NullProgress(), CancelToken())
    assert [img.seed for img in result.images] == [42, 43]
    assert list(polls.values()) == [4, 4] and routes["queue"].call_count == 0  # nothing dropped


@respx.mock
@pytest.mark.parametrize("held", [True, False], ids=["held", "taken-over"])
async def test_a_deadline_takes_the_prompt_off_unless_another_process_follows_it(
        make_ctx: Any, tmp_path: Path, sleep: Any, held: bool) -> None:
    # Taken over: this process was stopped past its lease; the new attempt resumes by following
    # the same prompt, which the old one's late timeout deleted under it.
    engine, now = timed_engine(make_ctx, tmp_path, sleep)
    routes = mock_server()

    def never(request: httpx.Request) -> httpx.Response:
        now[0] += 400.0  # past the 300 s deadline
        return httpx.Response(200, json={})

    async def send() -> None:
        pass

    async def still_held() -> bool:
        return held

    routes["history"].side_effect = never
    with before_billable_sends(send, held=still_held), pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert routes["queue"].call_count == (1 if held else 0)
    assert ("asked the server to drop prompt" in info.value.message) == held


@respx.mock
async def test_the_downloads_have_a_deadline_of_their_own(make_ctx: Any, tmp_path: Path, sleep: Any) -> None:
    """A render that ends near its deadline left its download the 1 s floor, and a download
    retried once found the deadline past: the image, made, was lost to a retryable timeout."""
    engine, now = timed_engine(make_ctx, tmp_path, sleep)
    routes = mock_server()

    def long_render(request: httpx.Request) -> httpx.Response:
        now[0] += 299.5
        return httpx.Response(200, json=history(request.url.path.rsplit("/", 1)[1]))

    fetches: list[float] = []

    def slow_link_once(request: httpx.Request) -> httpx.Response:
        fetches.append(now[0])
        if len(fetches) == 1:
            now[0] += 5.0
            raise httpx.ReadTimeout("slow link")
        return httpx.Response(200, content=png_bytes((1, 2, 3)))

    routes["history"].side_effect = long_render
    routes["view"].side_effect = slow_link_once
    result = await engine.run(bridge(), NullProgress(), CancelToken())
    assert len(result.images) == 1 and len(fetches) == 2


@respx.mock
@pytest.mark.parametrize("answer", [httpx.Response(404, text="gone"), httpx.Response(500, text="boom"),
                                    httpx.Response(200, content=b"not an image")], ids=["404", "500", "garbage"])
async def test_a_made_image_that_cannot_be_fetched_is_not_rendered_elsewhere(
        engine: ComfyUIEngine, sleep: Any, answer: httpx.Response) -> None:
    """The history says the server made the image: a retryable error would send the job to the
    next engine, which could bill for an image the free server has."""
    engine.http.clock = sleep.clock  # the 500s are retried until the deadline, which the waits reach
    routes = mock_server()
    routes["view"].mock(return_value=answer)
    progress = RecordingProgress()
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), progress, CancelToken())
    assert not info.value.retryable and info.value.charged == "no"
    assert info.value.details["prompt_id"] == progress.request_ids[0]
    assert "stays on the server as orch_00001_.png" in info.value.message
    assert routes["queue"].call_count == 0  # it finished: nothing to take off


@respx.mock
async def test_after_a_crash_each_earlier_prompt_has_its_own_deadline(make_ctx: Any, tmp_path: Path,
                                                                      sleep: Any) -> None:
    # Both still running when the job is resumed, each taking 250 s more of a 300 s deadline.
    engine, now = timed_engine(make_ctx, tmp_path, sleep)
    routes = earlier_server({}, ["p-1", "p-2"], finish_after=4)
    waiting = cast(Handler, routes["history"].side_effect)  # earlier_server's on_history

    def rendering(request: httpx.Request) -> httpx.Response:
        now[0] += 50.0
        return waiting(request)

    routes["history"].side_effect = rendering
    result = await engine.resume(bridge(n=2, seed=42), [{"id": "p-1", "seed": 42}, {"id": "p-2", "seed": 43}],
                                 NullProgress(), CancelToken())
    assert [img.seed for img in result.images] == [42, 43] and routes["prompt"].call_count == 0


@respx.mock
async def test_after_a_crash_a_kept_image_that_cannot_be_fetched_is_not_rendered_elsewhere(
        engine: ComfyUIEngine) -> None:
    routes = earlier_server({"p-1": []}, [])
    routes["view"].mock(return_value=httpx.Response(404, text="gone"))
    with pytest.raises(EngineError) as info:
        await engine.resume(bridge(seed=42), [{"id": "p-1", "seed": 42}], NullProgress(), CancelToken())
    assert not info.value.retryable and info.value.details["prompt_id"] == "p-1"
    assert routes["prompt"].call_count == 0


@respx.mock
async def test_a_workflow_without_size_placeholders_must_make_the_size_asked(make_ctx: Any, tmp_path: Path) -> None:
    # It made its source's size: a polish asked to double came back as the draft, its record
    # saying scale 2, and succeeded. A fixed 2x upscaler's output is the size asked, and is taken.
    fixed = {node: spec for node, spec in WORKFLOW.items() if node != "11"}
    fixed["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    engine = ComfyUIEngine(make_ctx(comfyui_url=BASE, comfyui_workflow=write_workflow(tmp_path, fixed)))
    engine.poll_interval, engine.follow_progress = 0, False
    routes = mock_server()
    upscale = RenderRequest(stage="polish", prompt="a lighthouse", width=128, height=96, scale=2.0,
                            init_image=Image.new("RGB", (64, 48)), source_size=(64, 48))
    assert engine.estimate(upscale) == 0  # what it makes is known once it is made
    routes["view"].mock(return_value=httpx.Response(200, content=png_bytes((1, 2, 3), size=(64, 48))))
    with pytest.raises(BadEngineInput, match=r"made 64x48, not the 128x96 asked, and has no \{\{width\}\}") as caught:
        await engine.run(upscale, NullProgress(), CancelToken())
    assert caught.value.retryable and caught.value.charged == "no"  # the next engine; the server bills nobody
    assert not caught.value.engine_fault  # the workflow's answer to a size: no reason to stop routing to it
    routes["view"].mock(return_value=httpx.Response(200, content=png_bytes((1, 2, 3), size=(128, 96))))
    assert [i.image.size for i in (await engine.run(upscale, NullProgress(), CancelToken())).images] == [(128, 96)]


async def test_a_workflow_with_size_placeholders_makes_what_it_makes_of_them(engine: ComfyUIEngine) -> None:
    with respx.mock:
        mock_server()  # its image is smaller than the 1024x768 asked: the workflow's own business
        assert len((await engine.run(bridge(), NullProgress(), CancelToken())).images) == 1


DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested past Python's recursion limit


@respx.mock
async def test_an_answer_nested_past_the_recursion_limit_fails_the_job_and_drops_the_prompt(
        engine: ComfyUIEngine) -> None:
    """Its RecursionError, which nothing expected, failed the job as an engine bug and skipped the
    cleanup: the prompt rendered on the shared GPU for nobody."""
    routes = mock_server()
    routes["history"].side_effect = lambda request: httpx.Response(
        200, content=DEEP.encode(), headers={"content-type": "application/json"})
    with pytest.raises(EngineError, match="not JSON"):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert routes["queue"].called


@respx.mock
async def test_a_prompt_id_an_answer_chose_cannot_steer_requests_to_other_paths(engine: ComfyUIEngine) -> None:
    """`/history/{id}` with an older server's own id: `../../admin/reset` had each poll sent to that
    path of the host (a studio's gateway, with the URL's credentials)."""
    routes = mock_server()
    routes["prompt"].side_effect = lambda request: httpx.Response(
        200, json={"prompt_id": "../../admin/reset", "number": 1, "node_errors": {}})
    stray = respx.get(url__regex=r".*/admin/.*").mock(return_value=httpx.Response(200, json={}))
    with pytest.raises(EngineError, match="no longer knows prompt"):  # followed by our own id
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert not stray.called
    asked = {call.request.url.path for call in routes["history"].calls}
    assert all(re.fullmatch(r"/history/[0-9a-f-]{36}", path) for path in asked), asked


@respx.mock
async def test_a_cancel_still_interrupts_when_the_queue_delete_fails(engine: ComfyUIEngine) -> None:
    """One step failing (a proxy's 502 for the delete) sent no look at the queue and no interrupt:
    the running prompt rendered on for nobody."""
    routes = mock_server()  # GET /queue shows our prompt running
    routes["queue"].mock(return_value=httpx.Response(502))
    token = CancelToken()

    def pending(request: httpx.Request) -> httpx.Response:
        token.cancel()
        return httpx.Response(200, json={})

    routes["history"].side_effect = pending
    with pytest.raises(Canceled):
        await engine.run(bridge(), NullProgress(), token)
    assert routes["interrupt"].called


@respx.mock
@pytest.mark.parametrize("where", ["sending", "following"])
@pytest.mark.parametrize("abandon", [False, True])
async def test_a_cancel_names_the_prompt_whether_it_was_being_sent_or_followed(
        engine: ComfyUIEngine, where: str, abandon: bool) -> None:
    """The same error from `_execute` and `_follow` (one `_let_go_and_say` since b5113e2), pinned as
    each said it before: the prompt named, charged nothing, the server asked to drop it only on a
    cancel (a stopping process leaves it to the next attempt)."""
    routes = mock_server()
    token = CancelToken()
    sent: list[str] = []
    if where == "sending":
        held = HeldRequest(httpx.Response(200, json={"prompt_id": "x", "number": 1, "node_errors": {}}))

        async def out(request: httpx.Request) -> httpx.Response:
            sent.append(json.loads(request.content)["prompt_id"])
            return await held(request)

        routes["prompt"].side_effect = out
        run = asyncio.ensure_future(engine.run(bridge(), NullProgress(), token))
        await asyncio.wait_for(held.sent.wait(), 5)
        token.cancel(abandon=abandon)
        with pytest.raises(Canceled) as info:
            await asyncio.wait_for(run, 10)
    else:
        info = await cancel_while_polling(engine, routes, abandon=abandon)
    prompt_id = sent[0] if sent else json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    assert info.value.message == "comfyui: the job was canceled"
    assert info.value.details == {"engine": "comfyui", "prompt_id": prompt_id}
    assert info.value.charged == "no" and info.value.charged_told and not info.value.retryable
    assert info.value.__suppress_context__ and info.value.__cause__ is None
    assert routes["queue"].call_count == (0 if abandon else 1)


@respx.mock
@pytest.mark.parametrize("held", [True, False], ids=["held", "taken-over"])
async def test_a_deadline_while_following_names_the_prompt_and_what_became_of_it(
        make_ctx: Any, tmp_path: Path, sleep: Any, held: bool) -> None:
    engine, now = timed_engine(make_ctx, tmp_path, sleep)
    routes = mock_server()

    def never(request: httpx.Request) -> httpx.Response:
        now[0] += 400.0  # past the 300 s deadline
        return httpx.Response(200, json={})

    async def send() -> None:
        pass

    async def still_held() -> bool:
        return held

    routes["history"].side_effect = never
    with before_billable_sends(send, held=still_held), pytest.raises(EngineTimeout) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    prompt_id = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    told = "asked the server to drop" if held else "left to the job's next attempt"
    assert info.value.message == (f"comfyui: prompt {prompt_id} did not finish before the deadline "
                                  f"(ORCH_REMOTE_DEADLINE) ({told} prompt {prompt_id})")
    assert info.value.details == {"engine": "comfyui", "prompt_id": prompt_id}
    assert info.value.charged == "no" and info.value.retryable and info.value.code == "timeout"


@respx.mock
async def test_a_prompt_refusal_of_megabytes_is_not_parsed_on_the_event_loop(
        engine: ComfyUIEngine, loop_parses: list[int]) -> None:
    # `_prompt_refused` read the 400's body whole as JSON on the event loop, for its node errors.
    body = (b'{"error": {"type": "prompt_outputs_failed_validation", "message": "failed"}, "node_errors": {}, '
            b'"pad": ' + LARGE_ERROR_PADDING + b"}")
    mock_server(prompt=[httpx.Response(400, content=body, headers={"content-type": "application/json"})])
    with pytest.raises(BadEngineInput):
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert all(size < len(body) for size in loop_parses), loop_parses  # never the whole body


@respx.mock
async def test_a_missing_input_refused_with_a_list_of_megabytes_is_still_the_server_s(engine: ComfyUIEngine) -> None:
    # ComfyUI's value_not_in_list names every value the input offers (twice: in its details and its
    # input_config): a LoadImage of a server whose input folder holds tens of thousands of drafts
    # lists megabytes. A bound on the body read for its types (as for other errors, 1 MiB) took the
    # server's lack for the request's bad input, failing the job where another engine may take it.
    offered = [f"orch-{i:064x}.png" for i in range(20_000)]
    refusal = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
               "node_errors": {"10": {"class_type": "LoadImage", "errors": [
                   {"type": "value_not_in_list", "message": "Value not in list",
                    "details": f"image: 'orch-draft.png' not in {offered}",
                    "extra_info": {"input_name": "image", "input_config": [offered],
                                   "received_value": "orch-draft.png"}}]}}}
    mock_server(prompt=[httpx.Response(400, json=refusal)])
    with pytest.raises(EngineUnavailable) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    assert info.value.retryable and "ORCH_COMFYUI_WORKFLOW" in info.value.message


Answering = Callable[[httpx.Request], httpx.Response]


def padded(response: httpx.Response) -> httpx.Response:
    """`response`'s JSON object with megabytes more under a key no engine reads."""
    body = response.content
    assert body.startswith(b"{")
    rest = b"}" if body.strip() == b"{}" else b", " + body[1:]
    return httpx.Response(response.status_code, content=b'{"pad": ' + LARGE_ERROR_PADDING + rest,
                          headers={"content-type": "application/json"})


@respx.mock
@pytest.mark.parametrize("where", ["history", "queue"])
async def test_a_history_or_queue_answer_of_megabytes_is_not_parsed_on_the_event_loop(
        engine: ComfyUIEngine, loop_parses: list[int], where: str) -> None:
    # `_history`'s and `_lost`'s answers, and the cleanup's look at the queue, were read whole as
    # JSON on the event loop: a large history (many outputs) or queue (many workflows, each whole)
    # held every other job's polls, event streams and lease renewals while it was parsed.
    routes = mock_server()
    if where == "history":
        on_history = cast(Answering, routes["history"].side_effect)
        routes["history"].side_effect = lambda request: padded(on_history(request))
        result = await engine.run(bridge(), NullProgress(), CancelToken())
        assert len(result.images) == 1
    else:
        on_queue = cast(Answering, routes["queue_state"].side_effect)
        routes["queue_state"].side_effect = lambda request: padded(on_queue(request))
        await cancel_while_polling(engine, routes)
        assert routes["queue_state"].call_count >= 1 and routes["interrupt"].call_count == 1  # the queue was read
    assert all(size < 2**20 for size in loop_parses), loop_parses  # never the whole body


@respx.mock
@pytest.mark.parametrize("where", ["history", "queue", "view"])
async def test_a_cancel_does_not_wait_for_the_parse_of_a_history_or_queue_answer(
        engine: ComfyUIEngine, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    # The history's and `_lost`'s queue answers are parsed in a worker thread (seconds for one of
    # megabytes), as an image is decoded, which was not raced against a cancel: the cancel waited
    # for the parse, however long.
    import tiers.comfyui

    routes = mock_server()
    if where != "view":
        routes["history"].mock(side_effect=None, return_value=httpx.Response(200, json={}))  # still rendering
    name, path = {"history": ("json_object", "/history/"), "queue": ("answer_json", "/queue"),
                  "view": ("decode_image", "")}[where]
    real = getattr(tiers.comfyui, name)
    parsing, release = threading.Event(), threading.Event()

    def slow(answer: Any, *args: Any) -> Any:
        if (not isinstance(answer, httpx.Response) or answer.request.url.path.startswith(path)) \
                and not parsing.is_set():
            parsing.set()
            release.wait(timeout=30)
        return real(answer, *args)

    monkeypatch.setattr(tiers.comfyui, name, slow)
    token = CancelToken()
    run = asyncio.ensure_future(engine.run(bridge(), NullProgress(), token))
    try:
        await asyncio.wait_for(asyncio.to_thread(parsing.wait, 5), 10)
        token.cancel()
        with pytest.raises(Canceled) as info:
            await asyncio.wait_for(run, 5)
    finally:
        release.set()
    prompt_id = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    # A prompt still out is taken off the server; one whose image was being decoded had finished.
    left = ([], []) if where == "view" else ([prompt_id], [prompt_id])
    assert info.value.charged == "no" and dropped(routes) == left


@respx.mock
@pytest.mark.parametrize("case", ["ours-running", "another-running", "delete-refused"])
async def test_a_cancel_does_not_wait_for_the_parse_of_the_queue_it_reads_to_drop_its_prompt(
        engine: ComfyUIEngine, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    # A canceled prompt is taken off the server (`_drop`), which reads `GET /queue` to know whether
    # to interrupt it: that answer's parse (seconds for one of megabytes) was waited out, however
    # long, though the parses the job's own looks make no longer hold a cancel. It is bounded as
    # the cleanup's requests are; not parsed by then, the prompt was deleted but not interrupted,
    # and rendered on for nobody: the queue's bytes, after the delete, still naming it say it runs
    # (where the delete was refused, it may be pending still: not known to run, not interrupted).
    import tiers.comfyui
    from tiers._http import answer_json as real

    monkeypatch.setattr(tiers.comfyui, "CLEANUP_TIMEOUT", 0.2)
    routes = mock_server(running=case != "another-running")
    if case == "delete-refused":
        routes["queue"].mock(return_value=httpx.Response(403, text="<html>Forbidden</html>"))
    parsing, release = threading.Event(), threading.Event()

    def slow(answer: httpx.Response) -> Any:
        if answer.request.url.path == "/queue":
            parsing.set()
            release.wait(timeout=30)
        return real(answer)

    monkeypatch.setattr(tiers.comfyui, "answer_json", slow)
    try:
        info = await asyncio.wait_for(cancel_while_polling(engine, routes), 10)
    finally:
        release.set()
    prompt_id = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    assert parsing.is_set() and info.value.charged == "no"
    # Deleted, and interrupted only where the queue names it (another's render is left alone).
    assert dropped(routes) == ([prompt_id], [prompt_id] if case == "ours-running" else [])


@respx.mock
async def test_an_interrupt_a_late_parse_decides_goes_by_a_fresh_look_at_the_queue(
        engine: ComfyUIEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the queue's parse runs past CLEANUP_TIMEOUT, its bytes decide the interrupt: they were
    # read that long before it went out, and our prompt may have ended meanwhile and another's
    # begun, which a server that predates targeted interrupts (it ignores `prompt_id` and stops
    # whatever runs) stopped instead. The queue is looked at again, its bytes searched at once.
    import tiers.comfyui
    from tiers._http import answer_json as real

    monkeypatch.setattr(tiers.comfyui, "CLEANUP_TIMEOUT", 0.2)
    routes = mock_server()
    ours = routes["queue_state"].side_effect
    assert callable(ours)

    looks_since_the_delete: list[httpx.Request] = []

    def ended_after_the_look(request: httpx.Request) -> httpx.Response:
        if routes["queue"].call_count:
            looks_since_the_delete.append(request)
        if len(looks_since_the_delete) > 1:  # ours ended after the first look: another's runs
            another = [[1, "someone-else", {}, {}, ["9"]]]
            return httpx.Response(200, json={"queue_running": another, "queue_pending": []})
        running = ours(request)
        assert isinstance(running, httpx.Response)
        return running

    routes["queue_state"].side_effect = ended_after_the_look
    release = threading.Event()

    def slow(answer: httpx.Response) -> Any:
        if answer.request.url.path == "/queue":
            release.wait(timeout=30)
        return real(answer)

    monkeypatch.setattr(tiers.comfyui, "answer_json", slow)
    try:
        await asyncio.wait_for(cancel_while_polling(engine, routes), 10)
    finally:
        release.set()
    prompt_id = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    assert dropped(routes) == ([prompt_id], [])  # deleted; ended by the interrupt's time: another's left alone
