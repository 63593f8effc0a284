"""The local runtime and engines on the offline tiny pipeline: progress that counts what the
pipeline really runs, cancels between chunks, previews that never fail a job, and device errors
that say what to do."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import respx
import torch

from orchestrator.errors import BadEngineInput, Canceled, EngineError, EngineUnavailable
from tests.conftest import SettingsFactory
from tests.tiers.conftest import EngineFactory, RecordingProgress, draft_image
from tiers import tiny
from tiers._local import (
    LocalRuntime,
    _usable_cpus,
    finite_images,
    hf_hub_reachable,
    latents_to_preview,
    prompt_overflow,
    runtime_for,
)
from tiers.base import NOTES, CancelToken, EngineContext, RenderRequest, Stage
from tiers.lite import LiteEngine
from tiers.local_hifi import LocalHifiEngine, tile_boxes


def draft(**kw: Any) -> RenderRequest:
    return RenderRequest(**{"stage": "ideation", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4,
                            "seed": 1, "n": 2, **kw})


def use_pndm(lite: LiteEngine) -> None:
    """PNDM (SD 1.5's default) runs one step more than asked."""
    from diffusers import PNDMScheduler

    pipe = lite.runtime.text2img(lite.model)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)


async def test_progress_counts_the_steps_the_scheduler_really_takes(engines: EngineFactory) -> None:
    lite, _ = engines(lite_max_batch=1)
    await lite.runtime.call(use_pndm, lite)
    progress = RecordingProgress()
    await lite.run(draft(), progress, CancelToken())
    # Two chunks of 5 steps: steadily up to exactly 100%, never past it, never back.
    assert progress.steps == [(i, 10) for i in range(1, 11)]


async def test_local_hifi_progress_ends_at_100_percent_on_its_last_tile(engines: EngineFactory) -> None:
    _, hifi = engines(local_max_size=256)
    req = RenderRequest(stage="polish", prompt="a lighthouse", width=160, height=96, steps=4, seed=1, n=1,
                        init_image=draft_image(), creativity=0.5)
    progress = RecordingProgress()
    await hifi.run(req, progress, CancelToken())
    totals = {total for _, total in progress.steps}
    assert len(totals) == 1 and progress.steps[-1][0] == totals.pop()
    assert [step for step, _ in progress.steps] == list(range(1, len(progress.steps) + 1))


class SizedPipe:
    """The tiny img2img pipeline behind the signature of SD3's and FLUX's, which take the size to
    render at (and otherwise render at their default 1024 px)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.scheduler = inner, inner.scheduler
        self.sizes: list[tuple[int | None, int | None]] = []

    def __call__(self, *, width: int | None = None, height: int | None = None, **kwargs: Any) -> Any:
        self.sizes.append((width, height))
        return self.inner(**kwargs)


async def test_a_pipeline_that_takes_a_size_is_told_each_tile_s(engines: EngineFactory,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _, hifi = engines(local_max_size=256)
    sized = SizedPipe(await hifi.runtime.call(hifi.runtime.img2img, hifi.model))
    monkeypatch.setattr(hifi.runtime, "img2img", lambda model: sized)
    monkeypatch.setattr(hifi, "_defaults", dataclasses.replace(hifi.defaults, native_size=128))  # tiles of 128 px
    bridge = RenderRequest(stage="bridge", prompt="a lighthouse", width=96, height=64, steps=2, seed=1, n=1,
                           init_image=draft_image(), strength=0.5)
    assert (await hifi.run(bridge, RecordingProgress(), CancelToken())).images[0].image.size == (96, 64)
    assert sized.sizes == [(96, 64)]
    sized.sizes.clear()
    polish = RenderRequest(stage="polish", prompt="a lighthouse", width=256, height=96, steps=2, seed=1, n=1,
                           init_image=draft_image(), creativity=0.5)
    await hifi.run(polish, RecordingProgress(), CancelToken())
    boxes = tile_boxes(256, 96, 128)
    assert len(boxes) > 1 and sized.sizes == [(right - left, bottom - top) for left, top, right, bottom in boxes]


def test_tiles_that_change_nothing_blend_back_into_the_source(engines: EngineFactory) -> None:
    # The overlaps' weighted means (254.9999) were cast down: ~14% of a 1024 px image came back 1 darker.
    import numpy as np
    from PIL import Image as PILImage

    class Unchanged:
        def __call__(self, *, image: Any, output_type: str, **kwargs: Any) -> Any:
            assert output_type == "np"
            return SimpleNamespace(images=np.asarray(image, dtype=np.float32)[None] / 255)

    _, hifi = engines()

    source = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    boxes = tile_boxes(512, 512, 256)
    assert len(boxes) > 1
    request = RenderRequest(stage="polish", prompt="p", width=512, height=512)
    out = hifi._refine(Unchanged(), request, source, boxes, 1, 0.3, 0.0, 0, {}, RecordingProgress(), CancelToken(),
                       first_pass=0, passes=len(boxes))
    assert np.array_equal(np.asarray(out), np.asarray(source))


async def test_an_output_of_nan_fails_instead_of_saving_a_black_image(engines: EngineFactory,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A VAE overflowing in half precision decodes NaN, which the pipeline's own conversion to PIL
    made a black image: saved, and counted a success (charged, where metered)."""
    from orchestrator.errors import EngineError

    lite, hifi = engines(local_max_size=256)
    for engine, request in ((lite, draft(n=1, steps=1)),
                            (hifi, RenderRequest(stage="bridge", prompt="p", width=64, height=64, steps=2, seed=1,
                                                 n=1, init_image=draft_image(), strength=0.5))):
        load = engine.runtime.text2img if engine is lite else engine.runtime.img2img
        vae = (await engine.runtime.call(load, engine.model)).vae
        decode = vae.decode

        def to_nan(*args: Any, decode: Any = decode, **kwargs: Any) -> Any:
            out = decode(*args, **kwargs)
            out[0].fill_(float("nan"))
            return out

        monkeypatch.setattr(vae, "decode", to_nan)
        with pytest.raises(EngineError) as caught:
            await engine.run(request, RecordingProgress(), CancelToken())
        assert "NaN" in str(caught.value) and not caught.value.retryable and caught.value.charged == "no"
        monkeypatch.undo()
        assert (await engine.run(request, RecordingProgress(), CancelToken())).images  # fine again


async def test_a_prompt_longer_than_the_text_encoder_reads_is_said_to_be_cut(engines: EngineFactory) -> None:
    lite, hifi = engines()
    progress = RecordingProgress()
    long_prompt = " ".join(["a lighthouse on a cliff at dusk"] * 20)  # 140 words
    result = await lite.run(draft(prompt=long_prompt, n=1, steps=1), progress, CancelToken())
    assert "prompt_truncated" in progress.states
    [note] = result.metadata["notes"]
    tokens = int(note.split("the prompt is ")[1].split(" ")[0])
    assert tokens > 75 and note.endswith("the model read the first 75"), note
    short = RecordingProgress()
    result = await lite.run(draft(n=1, steps=1), short, CancelToken())
    assert "prompt_truncated" not in short.states and "notes" not in result.metadata
    # A bridge (a polish alike) with that prompt: it was cut there without a word.
    bridged = RecordingProgress()
    bridge = RenderRequest(stage="bridge", prompt=long_prompt, width=64, height=64, steps=2, seed=1, n=1,
                           init_image=draft_image(), strength=0.5)
    result = await hifi.run(bridge, bridged, CancelToken())
    assert "prompt_truncated" in bridged.states and result.metadata["notes"] == [note]

    # A negative prompt, where it has an effect (a guidance above 1), is cut alike.
    negated = RecordingProgress()
    result = await lite.run(draft(negative_prompt=long_prompt, guidance_scale=2.0, n=1, steps=1), negated,
                            CancelToken())
    assert "negative_prompt_truncated" in negated.states
    assert result.metadata["notes"] == [f"the negative {note.removeprefix('the ')}"]

    clip = lite.runtime.text2img(lite.model).tokenizer
    T5TokenizerFast = type("T5TokenizerFast", (), {"model_max_length": 512})  # known by its name
    assert prompt_overflow(SimpleNamespace(tokenizer=None, tokenizer_2=clip), long_prompt) == (tokens, 75)  # a refiner
    assert prompt_overflow(SimpleNamespace(tokenizer=clip, tokenizer_3=T5TokenizerFast()), long_prompt) is None  # SD3
    # Fewer bytes than the window, more tokens: the tokenizer lowercases "İ" (2 bytes) to 3.
    dotted = "İ" * 37
    assert len(dotted.encode()) + 2 <= 77 < len(clip(dotted, truncation=False).input_ids)
    assert prompt_overflow(SimpleNamespace(tokenizer=clip), dotted) is not None


async def test_a_cancel_between_chunks_stops_before_the_next_chunk(engines: EngineFactory) -> None:
    lite, _ = engines(lite_max_batch=1)
    token = CancelToken()

    class CancelAtTheLastStepOfTheFirstChunk(RecordingProgress):
        def step(self, step: int, total: int, preview: Any = None) -> None:
            super().step(step, total, preview)
            if step == total // 2:
                token.cancel()

    progress = CancelAtTheLastStepOfTheFirstChunk()
    with pytest.raises(Canceled):
        await lite.run(draft(steps=3), progress, token)
    assert [step for step, _ in progress.steps] == [1, 2, 3]  # no step of the second chunk ran


async def test_a_cancel_during_a_model_load_ends_the_job_at_once(engines: EngineFactory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    lite, _ = engines()
    loading, loaded = threading.Event(), threading.Event()
    load = lite.runtime.text2img

    def slow_load(model: str) -> Any:  # a real model's first load: tens of seconds nothing interrupts
        loading.set()
        loaded.wait(30)
        return load(model)

    monkeypatch.setattr(lite.runtime, "text2img", slow_load)
    token, progress = CancelToken(), RecordingProgress()
    job = asyncio.create_task(lite.run(draft(n=1), progress, token))
    assert await asyncio.to_thread(loading.wait, 30)
    token.cancel()
    with pytest.raises(Canceled) as canceled:
        await asyncio.wait_for(job, 5)  # not after the load
    assert canceled.value.charged == "no"
    loaded.set()
    # The load goes on and keeps the model warm; the abandoned job stops before its first step,
    # and the next job runs after it on the same thread.
    result = await lite.run(draft(n=1), RecordingProgress(), CancelToken())
    assert len(result.images) == 1 and progress.steps == []


async def test_a_preview_vae_that_cannot_load_falls_back_to_the_approximation(
        engines: EngineFactory, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    lite, _ = engines(lite_preview_vae=str(tmp_path / "no-such-taesd"))
    previews: list[Any] = []

    class KeepPreviews(RecordingProgress):
        def step(self, step: int, total: int, preview: Any = None) -> None:
            super().step(step, total, preview)
            previews.append(preview)

    with caplog.at_level(logging.WARNING, logger="tiers._local"):
        result = await lite.run(draft(n=1), KeepPreviews(), CancelToken())
    assert len(result.images) == 1 and all(p is not None and p.size == (8, 8) for p in previews)
    assert sum("ORCH_LITE_PREVIEW_VAE" in r.getMessage() for r in caplog.records) == 1  # said once


def test_a_preview_vae_s_previews_are_small_whatever_the_image_size(
        make_settings: SettingsFactory, tmp_path: Any) -> None:
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taesd"
    channels = (8, 8, 8, 8)
    AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,  # type: ignore[attr-defined]
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(folder)
    runtime = runtime_for(EngineContext(settings=make_settings(lite_preview_vae=str(folder))))
    runtime._load_previewer()  # as a load of the Lite model does
    try:
        small, large = (runtime.preview(torch.randn(1, 4, side // 8, side // 8)) for side in (256, 1024))
        assert small is not None and small.size == (256, 256)  # decoded at the image's size
        assert large is not None and large.size == (512, 512)
        # The image's shape, a narrow strip's too (pooled 3 latents high, it came out 344x24, not
        # 344x21), at the size decoded (not enlarged: a 520 px image's preview is decoded at 264).
        wide, tall = runtime.preview(torch.randn(1, 4, 8, 129)), runtime.preview(torch.randn(1, 4, 144, 96))
        assert wide is not None and wide.size == (344, 21)
        assert tall is not None and tall.size == (256, 384)
        odd = runtime.preview(torch.randn(1, 4, 65, 65))
        assert odd is not None and odd.size == (264, 264)
    finally:
        runtime.shutdown(timeout=30)


def test_latents_that_are_not_channel_images_have_no_preview() -> None:
    assert latents_to_preview(torch.zeros(1, 4096, 64)) is None  # FLUX packs its latents as tokens
    assert latents_to_preview(torch.zeros(1, 4, 8, 8)) is not None


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_local_engine_s_images_are_rgb_with_no_profile_whatever_its_vae_makes(channels: int) -> None:
    """A storage quota holds a local engine's image at 3 bytes a pixel and no colour profile
    (`opaque_images`): a VAE of four channels made an RGBA image, which the store keeps as such."""
    import numpy as np

    [image] = finite_images(np.full((1, 8, 6, channels), 0.5, dtype=np.float32), "cpu")
    assert (image.mode, image.size, image.info.get("icc_profile")) == ("RGB", (6, 8), None)
    assert LiteEngine.opaque_images and LocalHifiEngine.opaque_images


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    # What torch's CPU build raises (torch 2.13).
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["cuda", "cpu"])
async def test_running_out_of_device_memory_is_a_job_error_another_engine_may_retry(
        make_settings: SettingsFactory, error: RuntimeError) -> None:
    runtime = runtime_for(EngineContext(settings=make_settings()))

    def allocate() -> None:
        raise error

    try:
        with pytest.raises(EngineError) as info:
            await runtime.call(allocate)
        assert info.value.retryable and info.value.charged == "no"
        assert not info.value.engine_fault  # the request's size: the engine's circuit is not counted
        assert "ran out of memory" in info.value.message and "ORCH_LITE_MAX_BATCH" in info.value.message

        def other() -> None:
            raise RuntimeError("expected a tensor")

        with pytest.raises(RuntimeError, match="expected a tensor"):  # other errors pass unchanged
            await runtime.call(other)
    finally:
        runtime.shutdown(timeout=30)


@pytest.mark.parametrize(("device", "wanted", "expected"), [
    ("cuda", "fp16", torch.float16), ("cuda", "bf16", torch.bfloat16), ("mps", "bf16", torch.float16),
    ("cpu", "fp16", torch.float32), ("cpu", "bf16", torch.float32)])
def test_half_precision_on_accelerators_full_on_cpu(make_settings: SettingsFactory, device: str, wanted: str,
                                                    expected: torch.dtype) -> None:
    runtime = runtime_for(EngineContext(settings=make_settings(lite_dtype=wanted)))
    runtime._device = device  # as picked on such a machine
    assert runtime.dtype() == expected


async def test_the_inference_thread_takes_the_thread_count_it_is_given(make_settings: SettingsFactory) -> None:
    runtime = runtime_for(EngineContext(settings=make_settings(torch_threads=1)))
    try:
        assert await runtime.call(torch.get_num_threads) == 1
    finally:
        runtime.shutdown(timeout=30)


def test_thread_count_follows_the_cpus_this_process_may_use(tmp_path: Any) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert _usable_cpus(tmp_path / "absent") == affinity


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000"}, None), ({"cpu.max": "50000 100000"}, 1), ({"cpu.max": "150000 100000"}, 2),
    ({"cpu.max": "garbage"}, None),
    # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None)])
def test_thread_count_follows_a_container_s_cpu_quota(tmp_path: Any, files: dict[str, str],
                                                      expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert _usable_cpus(tmp_path) == (affinity if expected is None else min(affinity, expected))


@pytest.mark.parametrize(("files", "expected"), [
    ({"system.slice/orch.service/cpu.max": "100000 100000"}, 1),       # a systemd unit's CPUQuota=100%
    ({"system.slice/cpu.max": "50000 100000", "system.slice/orch.service/cpu.max": "max 100000"}, 1),
    ({"cpu.max": "300000 100000", "system.slice/orch.service/cpu.max": "100000 100000"}, 1),  # the tightest
    ({"cpu/system.slice/orch.service/cpu.cfs_quota_us": "50000",                             # cgroup v1
      "cpu/system.slice/orch.service/cpu.cfs_period_us": "100000"}, 1),
    ({"system.slice/orch.service/cpu.max": "max 100000"}, None)])
def test_thread_count_follows_the_quota_of_the_process_s_own_cgroup(
        tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    """On a host (no cgroup namespace) the process's group is its unit's, below the mount's root,
    which shows no quota: torch took every core while the unit could use one."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    membership = tmp_path / "membership"
    membership.write_text("12:cpu,cpuacct:/system.slice/orch.service\n0::/system.slice/orch.service\n")
    affinity = len(os.sched_getaffinity(0))
    assert _usable_cpus(root, membership) == (affinity if expected is None else min(affinity, expected))
    membership.write_text("0::/../../system.slice/orch.service\n")  # never read outside the mount
    assert _usable_cpus(root, membership) == (min(affinity, 3) if "cpu.max" in files else affinity)


async def draft_refused(lite: LiteEngine) -> EngineUnavailable:
    """What a draft on `lite` is refused with (the engine is shut down after)."""
    try:
        with pytest.raises(EngineUnavailable) as info:
            await lite.run(draft(n=1), RecordingProgress(), CancelToken())
    finally:
        lite.runtime.shutdown(timeout=30)
    return info.value


# diffusers still passes huggingface_hub an argument it has deprecated; nothing of ours.
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
async def test_a_hub_model_that_cannot_be_fetched_says_the_hub_did_not_answer(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what hf_hub_reachable reads; the Hub client read it at import:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 20 s of retries
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model="nobody/no-such-model")))
    refused = await draft_refused(lite)
    assert "could not load model 'nobody/no-such-model'" in refused.message
    assert "the Hub did not answer" in refused.message


async def test_a_hub_model_not_cached_fails_at_once_when_the_hub_does_not_answer(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # diffusers retried the Hub for ~25 s, each retry's warning printed twice on the terminal.
    import logging

    import diffusers
    import huggingface_hub

    import tiers._local as local

    asked: list[str] = []
    monkeypatch.setattr(local, "hf_hub_reachable", lambda timeout=1.5, file=None: False)
    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained",
                        classmethod(lambda cls, name, **kw: asked.append(name)))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model="nobody/not-cached")))
    refused = await draft_refused(lite)
    assert "the Hub did not answer" in refused.message and asked == []
    # The Hub client's warnings reach the log once, through ours: its own stderr handler is gone.
    assert logging.getLogger(huggingface_hub.__name__).handlers == []


@pytest.mark.parametrize(("cached", "reachable", "expected"), [
    (True, False, "stabilityai/sd-turbo"),   # in the Hugging Face cache: used offline
    (False, True, "stabilityai/sd-turbo"),   # the Hub answers: fetched at the first draft
    (False, False, tiny.NAME),               # neither: the smoke model, with a warning
])
def test_auto_is_sd_turbo_when_it_can_be_had_else_the_smoke_model(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        cached: bool, reachable: bool, expected: str) -> None:
    import tiers._local as local

    monkeypatch.setattr(local, "hf_hub_cached", lambda repo_id: cached)
    monkeypatch.setattr(local, "hf_hub_reachable", lambda timeout=1.5, file=None: reachable)
    local.resolve_model.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="tiers._local"):
            assert local.resolve_model("auto") == expected
    finally:
        local.resolve_model.cache_clear()  # the next test sees the real cache and Hub
    warned = "ORCH_LITE_MODEL=auto" in caplog.text and "its images are noise" in caplog.text
    assert warned is (expected == tiny.NAME)
    assert local.resolve_model("org/model") == "org/model"  # anything else is taken as given


def test_a_hub_model_is_cached_only_when_its_snapshot_is_whole(
        tiny_cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first download cut short leaves model_index.json (fetched first) without weights: `auto`
    took SD-Turbo for cached, and offline every draft failed instead of using the smoke model."""
    import tiers._local as local

    whole = shutil.copytree(tiny_cache_dir / "tiny-sd", tmp_path / "whole")
    index_only = tmp_path / "index-only"
    index_only.mkdir()
    shutil.copy(whole / "model_index.json", index_only)
    configs_only = shutil.copytree(whole, tmp_path / "configs-only",
                                   ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    dangling = shutil.copytree(whole, tmp_path / "dangling")
    for weights in (dangling / "unet").glob("*.safetensors"):
        weights.unlink()
        weights.symlink_to(tmp_path / "blobs" / "not-yet-downloaded")  # the cache links a blob once whole
    sharded = shutil.copytree(whole, tmp_path / "sharded")
    for weights in (sharded / "unet").glob("*.safetensors"):  # a large UNet comes in shards
        weights.rename(sharded / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",'
        ' "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}')
    for folder, cached in [(whole, True), (index_only, False), (configs_only, False), (dangling, False),
                           (sharded, False)]:
        monkeypatch.setattr(local, "snapshot_folder", lambda repo_id, folder=folder: folder)
        assert local.hf_hub_cached("stabilityai/sd-turbo") is cached, folder.name
    monkeypatch.setattr(local, "hf_hub_reachable", lambda timeout=1.5, file=None: False)
    local.resolve_model.cache_clear()
    try:
        assert local.resolve_model("auto") == tiny.NAME  # the last: weights missing, Hub offline
    finally:
        local.resolve_model.cache_clear()


@pytest.mark.parametrize("endpoint", ["http://[not a host", "huggingface.co"])
def test_a_malformed_hub_endpoint_is_an_unreachable_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    def no_lookup(*args: Any, **kwargs: Any) -> Any:  # as on a machine without DNS; and no test goes online
        raise socket.gaierror(socket.EAI_NONAME, "no such host")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert hf_hub_reachable() is False


@pytest.mark.parametrize(("status", "reachable"), [(200, True), (403, False), (404, False), (502, False)])
@respx.mock
def test_auto_counts_on_the_hub_only_where_it_serves_the_model(monkeypatch: pytest.MonkeyPatch, status: int,
                                                               reachable: bool) -> None:
    # A proxy refusing the way out answers as well: `auto` chose SD-Turbo, and the first draft failed.
    # A mirror refusing its root (401, 405) and serving files is reachable.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example/")
    respx.head("https://hub.example/stabilityai/sd-turbo/resolve/main/model_index.json").mock(
        return_value=httpx.Response(status))
    respx.head("https://hub.example/").mock(return_value=httpx.Response(405))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert hf_hub_reachable(file="stabilityai/sd-turbo/model_index.json") is reachable
    assert respx.calls.last.request.headers["authorization"] == "Bearer hf_test"  # a mirror may want it
    assert hf_hub_reachable() is True  # the Hub answers


@pytest.mark.parametrize("spec", ["models/missing/sd-turbo", "my model", "org/model.git"])
def test_a_model_that_is_neither_a_file_nor_a_hub_id_is_unavailable_saying_so(
        make_settings: SettingsFactory, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.chdir(tmp_path)
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=spec)))
    available, reason = lite.availability()
    assert not available and reason and "neither an existing file or folder nor a Hugging Face model id" in reason
    (tmp_path / spec).mkdir(parents=True)  # the same spec, once it names a folder here, is a model to load
    assert lite.availability() == (True, None)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
async def test_loading_a_model_that_is_no_hub_id_fails_as_an_unavailable_model(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model="models/missing/sd-turbo")))
    refused = await draft_refused(lite)  # not the Hub client's HFValidationError
    # Named as clients read a relative path of more than two parts (see `store.model_name`): its last part.
    assert "could not load model 'sd-turbo'" in refused.message


@pytest.mark.parametrize("name", ["model.ckpt", "MODEL.CKPT", "model.pt", "model.pth", "model.bin", "model"])
def test_a_file_not_in_safetensors_is_unavailable_with_what_to_do(make_settings: SettingsFactory, tmp_path: Any,
                                                                  name: str) -> None:
    """Only safetensors are loaded (a pickle can run code). A `.pt`, `.pth` or `.bin` read available,
    and every draft then failed with "SafetensorError: header too large", never saying what to do."""
    checkpoint = tmp_path / name
    torch.save({"state_dict": {"model.diffusion_model.out.0.weight": torch.zeros(4)}}, str(checkpoint))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(checkpoint))))
    available, reason = lite.availability()
    assert not available and reason and "convert it to .safetensors" in reason
    assert f"model '{checkpoint}' is " in reason  # the operator's view (a project key's names the file only)


@pytest.mark.parametrize(("key", "family"), [
    ("double_blocks.0.img_attn.norm.key_norm.scale", "FLUX"),
    ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "FLUX"),
    ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "SD3"),
    ("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias", "an SDXL refiner"),
])
async def test_a_single_file_of_a_family_it_cannot_load_says_to_give_a_folder(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, key: str,
        family: str) -> None:
    """Loaded as Stable Diffusion 1.x, a FLUX or SD3 file failed offline with "load it once online":
    online it fails all the same. README says to give a diffusers folder or a Hub id: so does the error."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    def from_single_file(cls: Any, path: str, **kwargs: Any) -> Any:
        raise AssertionError("not a file this loader can take")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(from_single_file))
    checkpoint = tmp_path / "my_model.safetensors"
    save_file({key: torch.zeros(4)}, str(checkpoint))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(checkpoint))))
    refused = await draft_refused(lite)
    assert refused.message == (f"could not load model 'my_model.safetensors': it is a single file of {family}, "
                               "which is loaded from a diffusers folder or a Hub id only: give one of those")
    assert lite.defaults.told_by == "nothing"  # SD 1.5's defaults, read from its files, they were not


@pytest.mark.parametrize("key", [
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",  # a kohya LoRA
    "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight",  # a diffusers LoRA
    "first_stage_model.decoder.conv_in.weight",  # a VAE
    "encoder.conv_in.weight",  # a VAE in diffusers' layout
])
async def test_a_single_file_without_a_unet_says_so_not_that_the_hub_did_not_answer(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, key: str) -> None:
    """A LoRA or VAE given as ORCH_LITE_MODEL was read as an SD 1.x checkpoint: offline its drafts failed
    saying the Hub did not answer (reproduced with a server on a one-tensor file), and its defaults
    read as SD 1.5's, `read_from` "files"."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    def from_single_file(cls: Any, path: str, **kwargs: Any) -> Any:
        raise AssertionError("not a file this loader can take")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(from_single_file))
    checkpoint = tmp_path / "detail_tweaker.safetensors"
    save_file({key: torch.zeros(4)}, str(checkpoint))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(checkpoint))))
    refused = await draft_refused(lite)
    assert refused.message == ("could not load model 'detail_tweaker.safetensors': it holds no Stable Diffusion UNet "
                               "(no model.diffusion_model.* tensors: a LoRA, a VAE or an embedding?): give a whole "
                               "checkpoint, a diffusers folder or a Hub id")
    assert lite.defaults.told_by == "nothing"


@pytest.mark.parametrize("device", ["cuda", "mps"])
async def test_a_device_torch_does_not_have_is_unavailable_before_any_load(
        make_settings: SettingsFactory, device: str) -> None:
    """Not a crash after the whole model loaded, for every draft: what to set instead."""
    if (device == "cuda" and torch.cuda.is_available()) or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {device}")
    lite = LiteEngine(EngineContext(settings=make_settings(lite_device=device)))
    assert lite.availability() == (True, None)  # torch is not imported to answer this
    refused = await draft_refused(lite)
    assert refused.message.startswith(f"ORCH_LITE_DEVICE={device} but torch sees no ")
    assert "ORCH_LITE_DEVICE=auto" in refused.message
    # Found out once: /v1/engines and routing say so, rather than each draft failing in turn.
    assert lite.availability() == (False, refused.message)


@pytest.mark.parametrize(("name", "sampler"), [("sd_turbo.safetensors", "EulerDiscreteScheduler"),
                                              ("dreamshaper_8.safetensors", "DDIMScheduler")])
async def test_a_few_step_single_file_denoises_from_noise(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, tiny_cache_dir: Any,
        name: str, sampler: str) -> None:
    """diffusers gives a single file its family's scheduler (SD 2.1's DDIM, "leading" spacing, for
    sd_turbo.safetensors): a Turbo file gets the "trailing" Euler it was distilled for; others keep theirs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    def from_single_file(cls: Any, path: str, **kwargs: Any) -> Any:  # what diffusers builds, offline
        pipe = StableDiffusionPipeline.from_pretrained(tiny_cache_dir / "tiny-sd", **kwargs)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading",
                                                   prediction_type="v_prediction")
        return pipe

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(from_single_file))
    checkpoint = tmp_path / name
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, str(checkpoint))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(checkpoint))))
    try:
        result = await lite.run(draft(n=1, steps=2), RecordingProgress(), CancelToken())
        config = lite.runtime._pipes[(str(checkpoint), "text2img")].scheduler.config
    finally:
        lite.runtime.shutdown(timeout=30)
    assert result.metadata["sampler"] == sampler
    assert (config.timestep_spacing, config.prediction_type) == (
        ("trailing", "epsilon") if sampler == "EulerDiscreteScheduler" else ("leading", "v_prediction"))


async def test_an_lcm_single_file_runs_on_lcm_s_scheduler_without_classifier_free_guidance(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, tiny_cache_dir: Any) -> None:
    """An LCM checkpoint shared as one file is an LCM-LoRA merge, which diffusers gives its base
    family's scheduler (DDIM here) and a UNet without LCM's guidance embedding: 4 DDIM steps at
    classifier-free guidance 8.5 came out as noise. It gets LCM's scheduler and guidance 1 (none)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    def from_single_file(cls: Any, path: str, **kwargs: Any) -> Any:  # what diffusers builds, offline
        pipe = StableDiffusionPipeline.from_pretrained(tiny_cache_dir / "tiny-sd", **kwargs)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(from_single_file))
    checkpoint = tmp_path / "dreamshaper_8_lcm.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, str(checkpoint))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(checkpoint))))
    try:
        result = await lite.run(draft(n=1, negative_prompt="blurry"), RecordingProgress(), CancelToken())
    finally:
        lite.runtime.shutdown(timeout=30)
    assert result.metadata["sampler"] == "LCMScheduler"
    assert (result.metadata["steps"], result.metadata["guidance_scale"]) == (4, 1.0)
    assert any("negative prompt was not used" in note for note in result.metadata["notes"])


@pytest.mark.parametrize("name", ["mymodel.safetensors", "SD15.SAFETENSORS"])
async def test_a_single_file_reads_its_family_s_configuration_from_the_cache_first(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, tiny_cache_dir: Any,
        name: str) -> None:
    """Asked first, a Hub that took the connection and never answered held the inference thread for
    good. (diffusers fetches a configuration that is not in the cache itself.) And diffusers picks
    its reader by the exact suffix: `SD15.SAFETENSORS` (copied from Windows) was read as a pickle,
    failing with "Unable to load weights from checkpoint file"."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    calls: list[tuple[Path, bool]] = []

    def from_single_file(cls: Any, path: str, local_files_only: bool = False, **kwargs: Any) -> Any:
        calls.append((Path(path), local_files_only))
        return StableDiffusionPipeline.from_pretrained(tiny_cache_dir / "tiny-sd", **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(from_single_file))
    checkpoint = tmp_path / name
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, str(checkpoint))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(checkpoint))))
    try:
        result = await lite.run(draft(n=1, steps=1), RecordingProgress(), CancelToken())
    finally:
        lite.runtime.shutdown(timeout=30)
    assert len(result.images) == 1
    assert [(path.name, cached_only) for path, cached_only in calls] == [(f"{checkpoint.stem}.safetensors", True)]
    if name != name.lower():
        assert not calls[0][0].exists()  # a link made for the load, gone once it is loaded


def test_a_relative_path_to_no_safetensors_file_in_capitals_is_a_path(make_settings: SettingsFactory) -> None:
    missing = LiteEngine(EngineContext(settings=make_settings(lite_model="Missing.SAFETENSORS")))
    assert missing.availability() == (False, "model 'Missing.SAFETENSORS' is a path to nothing: no such file or folder")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
async def test_a_single_file_that_is_not_a_checkpoint_is_unavailable_saying_why(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # A LoRA given as the model: loaded as a Stable Diffusion checkpoint, diffusers' own error
    # escaped as an engine crash (no fallback).
    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(lora))))
    refused = await draft_refused(lite)
    assert refused.message.startswith("could not load model 'lora.safetensors': ")  # its name, not its path
    assert str(tmp_path) not in refused.message and refused.details == {"model": "lora.safetensors"}
    # Not that the Hub did not answer: no configuration makes a model of it.
    assert "it holds no Stable Diffusion UNet" in refused.message


async def test_a_single_file_s_own_fault_offline_is_not_blamed_on_the_hub(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Its family's configuration in the cache, the file lacking its text encoder's weights: the
    message said the Hub did not answer, hiding what to fix."""
    import huggingface_hub.constants
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    def from_single_file(cls: Any, path: str, **kwargs: Any) -> Any:
        raise ValueError("Failed to load CLIPTextModel. Weights for this component appear to be missing")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(from_single_file))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    checkpoint = tmp_path / "mymodel.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, str(checkpoint))
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(checkpoint))))
    refused = await draft_refused(lite)
    assert refused.message == ("could not load model 'mymodel.safetensors': Failed to load CLIPTextModel. "
                                  "Weights for this component appear to be missing")


async def test_a_model_without_an_image_to_image_pipeline_is_unavailable_for_bridge(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch, tiny_cache_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoPipelineForImage2Image

    def no_img2img(pipe: Any, **_kwargs: Any) -> Any:
        raise ValueError(f"AutoPipeline can't find a pipeline linked to {type(pipe).__name__}")

    monkeypatch.setattr(AutoPipelineForImage2Image, "from_pipe", no_img2img)
    folder = tmp_path / "srv" / "clientx" / "hifi-model"  # the server's path: no project key may read it
    shutil.copytree(tiny_cache_dir / "tiny-sd", folder)
    bridge = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=2, seed=1, n=1,
                           init_image=draft_image(), strength=0.5)
    lite, hifi = engines(lite_model=str(folder), hifi_model=str(folder))
    assert hifi.availability() == (True, None)
    with pytest.raises(EngineUnavailable, match="'hifi-model' has no image-to-image pipeline in diffusers") as info:
        await hifi.run(bridge, RecordingProgress(), CancelToken())
    assert "srv" not in info.value.message and info.value.details == {"model": "hifi-model"}
    # Said by the engine, as a model that fails to load is: every bridge was routed to it. The
    # same model's drafts are made as ever.
    available, why = hifi.availability()
    assert not available and why is not None and why.startswith(info.value.message)
    assert lite.availability() == (True, None)
    assert len((await lite.run(draft(n=1, steps=1), RecordingProgress(), CancelToken())).images) == 1


def save_tiny_sdxl_refiner(folder: Any, tokenizer: Any) -> None:
    """An SDXL refiner's shape (image-to-image only, one text encoder, aesthetic-score
    conditioning), random and tiny."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=72,
        cross_attention_dim=32, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=8, sample_size=64)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, projection_dim=32,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=600, max_position_embeddings=77))
    StableDiffusionXLImg2ImgPipeline(  # type: ignore[attr-defined]
        vae=vae, text_encoder=None, text_encoder_2=text, tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer), unet=unet, scheduler=EulerDiscreteScheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False).save_pretrained(folder)


async def test_an_image_to_image_only_model_is_loaded_as_one(engines: EngineFactory, tiny_cache_dir: Any,
                                                                     tmp_path: Any) -> None:
    # Loaded as text-to-image, an SDXL refiner failed every job ("expects an added time embedding
    # vector of length 72, but a vector of 80 was created").
    save_tiny_sdxl_refiner(tmp_path / "refiner", tiny_cache_dir / "tiny-sd" / "tokenizer")
    _, hifi = engines(hifi_model=str(tmp_path / "refiner"), local_max_size=256)
    bridge = RenderRequest(stage="bridge", prompt="a lighthouse", width=96, height=64, steps=2, seed=1, n=1,
                           init_image=draft_image(), strength=0.5)
    result = await hifi.run(bridge, RecordingProgress(), CancelToken())
    assert result.images[0].image.size == (96, 64) and result.model == str(tmp_path / "refiner")
    pipe = await hifi.runtime.call(hifi.runtime.img2img, hifi.model)
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"


async def test_an_image_to_image_only_model_makes_no_drafts_and_says_so(engines: EngineFactory, tiny_cache_dir: Any,
                                                                       tmp_path: Any) -> None:
    """As the Lite model, a refiner was loaded as SDXL's text-to-image pipeline, read available,
    and every draft failed with diffusers' "Model expects an added time embedding vector of length
    72"; as the same service's local-hifi model it serves bridges."""
    save_tiny_sdxl_refiner(tmp_path / "refiner", tiny_cache_dir / "tiny-sd" / "tokenizer")
    lite, hifi = engines(lite_model=str(tmp_path / "refiner"), hifi_model=str(tmp_path / "refiner"),
                         local_max_size=256)
    with pytest.raises(EngineUnavailable) as refused:
        await lite.run(draft(n=1, steps=1), RecordingProgress(), CancelToken())
    assert refused.value.message == (
        "model 'refiner' is an image-to-image pipeline (StableDiffusionXLImg2ImgPipeline): it makes no drafts; set "
        "ORCH_LITE_MODEL to a text-to-image model (it may still serve bridges and polishes as ORCH_HIFI_MODEL)")
    available, why = lite.availability()
    assert not available and why is not None and why.startswith(refused.value.message)
    # What is kept is a copy without a traceback: the raised one's frames held what they loaded.
    assert all(error.__traceback__ is None for _, error in lite.runtime._unfit.values())
    assert hifi.availability() == (True, None)
    bridge = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=2, seed=1, n=1,
                           init_image=draft_image(), strength=0.5)
    assert len((await hifi.run(bridge, RecordingProgress(), CancelToken())).images) == 1


def save_tiny_inpainting_model(folder: Any, tokenizer: Any) -> None:
    """An SD 1.x inpainting model's shape (its UNet takes 9 channels: the latents, the mask and the
    masked image's latents), random and tiny."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=64, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=8, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=600, max_position_embeddings=77))
    StableDiffusionInpaintPipeline(  # type: ignore[attr-defined]
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tokenizer), unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(folder)


async def test_an_inpainting_model_is_refused_at_its_load_saying_why(engines: EngineFactory, tiny_cache_dir: Any,
                                                                     tmp_path: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers loads an inpainting model (a folder, or an SD 1.x file: `sd-v1-5-inpainting`) as
    its family's text-to-image and image-to-image pipelines, whose UNet then gets 4 channels where it
    takes 9: both engines read available, and every draft and bridge failed with torch's "The size
    of tensor a (9) must match the size of tensor b (4)" (the warm-up too, logged only)."""
    save_tiny_inpainting_model(tmp_path / "sd-inpainting", tiny_cache_dir / "tiny-sd" / "tokenizer")
    lite, hifi = engines(lite_model=str(tmp_path / "sd-inpainting"), local_max_size=256)
    loads: list[object] = []
    load = LocalRuntime._from_pretrained

    def loading(self: LocalRuntime, *args: Any) -> Any:
        loads.append(args)
        return load(self, *args)

    monkeypatch.setattr(LocalRuntime, "_from_pretrained", loading)
    with pytest.raises(EngineUnavailable) as refused:
        await lite.run(draft(n=1, steps=1), RecordingProgress(), CancelToken())
    assert loads == []  # told from its configs: its weights (gigabytes for SDXL's) were read at each try
    assert refused.value.message == (
        "could not load model 'sd-inpainting': its UNet takes 9 input channels, not the VAE's 4 latent channels "
        "(an inpainting, InstructPix2Pix or depth-to-image model): it makes neither drafts nor bridges and "
        "polishes; give a text-to-image model")
    for engine in (lite, hifi):
        available, why = engine.availability()
        assert not available and why is not None and why.startswith(refused.value.message)
    bridge = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=2, seed=1, n=1,
                           init_image=draft_image(), strength=0.5)
    with pytest.raises(EngineUnavailable) as also:
        await hifi.run(bridge, RecordingProgress(), CancelToken())
    assert also.value.message == refused.value.message


def save_checkpoint_header(path: Path, unet_in_channels: int, *, sdxl: bool = False) -> None:
    """A single file with an original checkpoint's names and shapes for the UNet's `conv_in` and
    the VAE's `post_quant_conv` (and SDXL's second text encoder), nothing else: what is read of it
    before a load."""
    from safetensors.torch import save_file

    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, unet_in_channels, 3, 3,
                                                                            dtype=torch.float16),
               "first_stage_model.post_quant_conv.weight": torch.zeros(4, 4, 1, 1, dtype=torch.float16)}
    if sdxl:
        tensors["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4, dtype=torch.float16)
    save_file(tensors, str(path))


@pytest.mark.parametrize("setting", ["lite_model", "hifi_model"])
async def test_an_inpainting_single_file_is_refused_from_its_header_before_its_load(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, setting: str) -> None:
    """`sd-v1-5-inpainting.safetensors` (or SDXL's) was refused only once diffusers had read the whole
    file (gigabytes) into memory, at each try: its UNet's `conv_in` in the header says 9 channels."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    loads: list[str] = []

    def from_single_file(cls: Any, path: str, **kwargs: Any) -> Any:
        loads.append(path)
        raise AssertionError("the whole file was loaded")

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(from_single_file))
    checkpoint = tmp_path / "sd-inpainting.safetensors"
    save_checkpoint_header(checkpoint, 9, sdxl=setting == "hifi_model")
    lite, hifi = engines(**{setting: str(checkpoint)}, local_max_size=256)
    engine, job = ((lite, draft(n=1, steps=1)) if setting == "lite_model" else
                   (hifi, RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=2, seed=1,
                                        n=1, init_image=draft_image(), strength=0.5)))
    with pytest.raises(EngineUnavailable) as refused:
        await engine.run(job, RecordingProgress(), CancelToken())
    assert loads == []
    assert refused.value.message == (
        "could not load model 'sd-inpainting.safetensors': its UNet takes 9 input channels, not the VAE's 4 latent "
        "channels (an inpainting, InstructPix2Pix or depth-to-image model): it makes neither drafts nor bridges and "
        "polishes; give a text-to-image model")
    text_to_image = tmp_path / "sd.safetensors"  # 4 channels: a text-to-image model's, loaded
    save_checkpoint_header(text_to_image, 4, sdxl=setting == "hifi_model")
    engine = engines(**{setting: str(text_to_image)}, local_max_size=256)[0 if setting == "lite_model" else 1]
    with pytest.raises(EngineUnavailable) as failed:
        await engine.run(job, RecordingProgress(), CancelToken())
    assert [Path(path).name for path in loads] == ["sd.safetensors"]
    assert failed.value.message.endswith("AssertionError: the whole file was loaded")


async def test_an_lcm_lora_merge_saved_as_a_folder_runs_on_lcm_s_scheduler(
        engines: EngineFactory, tiny_cache_dir: Path, tmp_path: Path) -> None:
    """Merged with LCM-LoRA and saved with its base's scheduler (Euler here), 4 steps at guidance 1
    came out as noise: it gets LCM's scheduler, as a single file does."""
    folder = tmp_path / "dreamshaper-8-lcm"
    shutil.copytree(tiny_cache_dir / "tiny-sd", folder)
    lite, _ = engines(lite_model=str(folder))
    result = await lite.run(draft(n=1), RecordingProgress(), CancelToken())
    assert result.metadata["sampler"] == "LCMScheduler"
    assert (result.metadata["steps"], result.metadata["guidance_scale"]) == (4, 1.0)


@pytest.mark.parametrize(("scheduler", "settings"), [
    ("LMSDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True}),
])
async def test_a_model_shipped_with_a_scheduler_that_needs_scipy_makes_drafts(
        engines: EngineFactory, tiny_cache_dir: Path, tmp_path: Path, scheduler: str, settings: dict[str, Any]) -> None:
    """Older SD 1.x fine-tunes ship LMS; some, beta sigmas: diffusers needs scipy for both, and
    such a model failed to load with "LMSDiscreteScheduler requires the scipy library"."""
    folder = tmp_path / "fine-tune"
    shutil.copytree(tiny_cache_dir / "tiny-sd", folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update({"_class_name": scheduler, **settings})
    config_file.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", scheduler]}))
    lite, _ = engines(lite_model=str(folder))
    result = await lite.run(draft(n=2, steps=2), RecordingProgress(), CancelToken())
    assert len(result.images) == 2 and result.metadata["sampler"].startswith(scheduler), result.metadata


async def test_a_model_s_scheduler_settings_are_recorded_with_its_sampler(
        engines: EngineFactory, tiny_cache_dir: Path, tmp_path: Path) -> None:
    """A fine-tune shipping DPM++ with SDE and Karras sigmas was recorded as its class alone, plain
    "DPM++ 2M" in the infotext: the image could not be made again from its own file."""
    folder = tmp_path / "fine-tune"
    shutil.copytree(tiny_cache_dir / "tiny-sd", folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++",
                   "use_karras_sigmas": True})
    config_file.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", config["_class_name"]]}))
    lite, _ = engines(lite_model=str(folder))
    result = await lite.run(draft(n=1), RecordingProgress(), CancelToken())
    assert result.metadata["sampler"] == "DPMSolverMultistepScheduler"
    settings = result.metadata["sampler_settings"]
    assert (settings["algorithm_type"], settings["use_karras_sigmas"]) == ("sde-dpmsolver++", True)
    assert settings["timestep_spacing"] == config.get("timestep_spacing", "linspace")


def with_legacy_callback(pipe: Any) -> Any:
    """`pipe` as PixArt's pipelines are called: `callback(i, t, latents)` every `callback_steps`,
    no `callback_on_step_end`, and any other keyword taken (and dropped) without a word."""
    class Legacy(type(pipe)):  # type: ignore[misc]
        def __call__(self, *args: Any, callback: Any = None, callback_steps: int = 1, **kwargs: Any) -> Any:
            kwargs.pop("callback_on_step_end", None)  # what PixArt's **kwargs swallowed
            kwargs.pop("callback_on_step_end_tensor_inputs", None)

            def on_step_end(pipeline: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                if callback is not None and i % callback_steps == 0:
                    callback(i, t, tensors["latents"])
                return tensors

            return super().__call__(*args, callback_on_step_end=on_step_end, **kwargs)

    legacy = Legacy(**pipe.components)
    legacy.set_progress_bar_config(disable=True)
    return legacy


async def test_a_pipeline_with_only_the_older_step_callback_shows_its_steps_and_stops_on_cancel(
        engines: EngineFactory) -> None:
    """PixArt's pipelines take `callback`, not `callback_on_step_end`, which their **kwargs
    dropped: a draft showed no step, and a canceled one ran on to its end on the device."""
    lite, _ = engines()
    key = (lite.model, "text2img")
    lite.runtime._pipes[key] = with_legacy_callback(await lite.runtime.call(lite.runtime.text2img, lite.model))
    progress = RecordingProgress()
    await lite.run(draft(n=1, steps=3), progress, CancelToken())
    assert progress.steps == [(1, 3), (2, 3), (3, 3)]

    cancel = CancelToken()

    class CancelAtFirstStep(RecordingProgress):
        def step(self, step: int, total: int, preview: Any = None) -> None:
            super().step(step, total, preview)
            cancel.cancel()

    stopped = CancelAtFirstStep()
    with pytest.raises(Canceled):
        await lite.run(draft(n=1, steps=3), stopped, cancel)
    await lite.runtime.call(lambda: None)  # the inference thread is done with the job
    assert stopped.steps == [(1, 3)]


def test_a_pipeline_that_takes_no_step_callback_is_called_without_one() -> None:
    from tiers._local import step_arguments

    class Plain:
        def __call__(self, prompt: str, num_inference_steps: int = 4) -> None: ...

    def on_step(*_args: Any) -> dict[str, Any]:
        return {}

    assert step_arguments(Plain(), on_step) == {}  # IF, Kandinsky's combined pipelines: a keyword was a TypeError


def use_lcm(lite: LiteEngine) -> None:
    """A latent-consistency model: the tiny components, a UNet that takes LCM's guidance embedding,
    and its scheduler (trained on a 50-step schedule)."""
    from diffusers import (
        LatentConsistencyModelImg2ImgPipeline,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        UNet2DConditionModel,
    )

    base = lite.runtime.text2img(lite.model)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 32})
    parts = {"vae": base.vae, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer, "unet": unet,
             "scheduler": LCMScheduler.from_config(base.scheduler.config),
             "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    lite.runtime._pipes[(lite.model, "text2img")] = LatentConsistencyModelPipeline(**parts)
    lite.runtime._pipes[(lite.model, "img2img")] = LatentConsistencyModelImg2ImgPipeline(**parts)


@pytest.mark.parametrize(("stage", "strength", "runs"), [
    ("polish", 0.3, 4), ("polish", 0.1, 4), ("polish", 0.07, 3), ("bridge", 0.15, 7), ("bridge", 0.55, 8)])
async def test_an_lcm_model_refines_at_any_strength_with_the_steps_its_schedule_holds(
        engines: EngineFactory, stage: Stage, strength: float, runs: int) -> None:
    # LCM runs every step asked for (not steps x strength) and refuses more than int(50 x strength).
    lite, hifi = engines()
    use_lcm(lite)
    req = RenderRequest(stage=stage, prompt="a lighthouse", width=64, height=64, seed=1, n=1,
                        init_image=draft_image(), strength=strength, creativity=strength)
    progress = RecordingProgress()
    result = await hifi.run(req, progress, CancelToken())
    assert len(result.images) == 1 and result.metadata["steps"] == runs
    assert progress.steps[-1] == (runs, runs)


@pytest.mark.parametrize(("creativity", "runs"), [(0.2, 1), (0.1, 1), (0.5, 2)])
async def test_an_lcm_scheduler_on_a_plain_img2img_pipeline_still_runs_a_step(
        engines: EngineFactory, creativity: float, runs: int) -> None:
    # An SD img2img pipeline with LCM's scheduler (an LCM-distilled SD 1.5, say) runs int(steps x
    # strength) steps like any other, and its scheduler takes at most 50.
    from diffusers import LCMScheduler

    lite, hifi = engines()
    pipe = lite.runtime.img2img(lite.model)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    req = RenderRequest(stage="polish", prompt="a lighthouse", width=64, height=64, seed=1, n=1,
                        init_image=draft_image(), creativity=creativity)
    progress = RecordingProgress()
    result = await hifi.run(req, progress, CancelToken())
    assert len(result.images) == 1 and progress.steps[-1] == (runs, runs)
    assert result.metadata["steps"] * creativity >= 1


async def test_an_lcm_model_says_what_it_cannot_take(engines: EngineFactory) -> None:
    lite, hifi = engines()
    use_lcm(lite)
    low = RenderRequest(stage="polish", prompt="a lighthouse", width=64, height=64, seed=1, n=1,
                        init_image=draft_image(), creativity=0.01)
    with pytest.raises(BadEngineInput, match=r"creativity: this LCM model needs at least 0\.02"):
        await hifi.run(low, RecordingProgress(), CancelToken())
    with pytest.raises(BadEngineInput, match="steps: this LCM model takes at most 50"):
        await lite.run(draft(steps=60, n=1), RecordingProgress(), CancelToken())


def test_an_lcm_model_refuses_a_strength_too_weak_when_the_job_is_asked_for(engines: EngineFactory) -> None:
    # Known from the model's files before it loads: a 422 at submit, not a job failed once loaded.
    _lite, hifi = engines()
    weak = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, seed=1, n=1, strength=0.019)
    assert hifi.estimate(weak) == 0  # not an LCM model: it runs a step more
    hifi._defaults, hifi._defaults_read = dataclasses.replace(hifi._defaults, lcm=True), time.monotonic()
    with pytest.raises(BadEngineInput, match=r"strength: this LCM model needs at least 0\.02") as info:
        hifi.estimate(weak)
    assert info.value.details == {"field": "strength", "value": 0.019, "min": 0.02}
    assert hifi.estimate(dataclasses.replace(weak, strength=0.02)) == 0


def test_a_transformer_model_takes_sizes_in_multiples_of_16(make_settings: SettingsFactory) -> None:
    # SD3's pipeline raises for 520 px, and FLUX's quietly renders 512: refused before either.
    settings = make_settings(lite_model="stabilityai/stable-diffusion-3.5-medium")
    lite = LiteEngine(EngineContext(settings=settings))
    try:
        assert lite.capabilities.size_multiple == 16
        with pytest.raises(BadEngineInput, match="width must be a multiple of 16") as info:
            lite.estimate(draft(width=520, height=512))
        assert info.value.details["multiple"] == 16
        assert lite.estimate(draft(width=528, height=512)) == 0
    finally:
        lite.runtime.shutdown(timeout=30)


@pytest.mark.parametrize("case", ["lcm", "guidance-1", "guided"])
async def test_a_negative_prompt_that_has_no_effect_is_told_not_recorded_as_used(
        engines: EngineFactory, case: str) -> None:
    """LCM's pipelines take any keyword and drop `negative_prompt` without a word, and the others
    skip it without classifier-free guidance (a guidance of 1 or less, the turbo models' default):
    the client is told, in the notes and a state event. A guided pipeline uses it, and says nothing."""
    lite, hifi = engines()
    if case == "lcm":
        use_lcm(lite)
    guidance = 2.0 if case == "guided" else 1.0
    told = []
    for engine, req in ((lite, draft(n=1, negative_prompt="blurry", guidance_scale=guidance)),
                        (hifi, RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, seed=1, n=1,
                                             init_image=draft_image(), strength=0.5, negative_prompt="blurry",
                                             guidance_scale=guidance))):
        progress = RecordingProgress()
        result = await engine.run(req, progress, CancelToken())
        told.append((result.metadata.get(NOTES), progress.states))
        # What the image's record says was used (its PNG's infotext is read by other tools).
        assert result.metadata["negative_prompt"] == ("blurry" if case == "guided" else "")
    if case == "guided":
        assert told == [(None, []), (None, [])]
    elif case == "lcm":
        pipelines = ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")
        assert told == [([f"the model's pipeline ({name}) takes no negative prompt: the negative prompt was not "
                          "used"], ["negative_prompt_ignored"]) for name in pipelines]
    else:
        assert told == [(["at guidance 1 the model runs without classifier-free guidance: the negative prompt was "
                          "not used"], ["negative_prompt_ignored"])] * 2
