"""The local runtime after a failure, and what previews cost it: memory a failed call held is given
back, a model that does not fit is a failure to load it, a VAE a failed decode left upcast is put
back, and a preview VAE neither decodes full-size latents nor runs at every slow step."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from orchestrator.errors import EngineError, EngineUnavailable
from tests.conftest import SettingsFactory
from tiers import _local, tiny
from tiers._local import LatentSpace, LocalRuntime, runtime_for
from tiers.base import CancelToken, EngineContext


@pytest.fixture
def runtime(make_settings: SettingsFactory) -> Iterator[LocalRuntime]:
    runtime = runtime_for(EngineContext(settings=make_settings()))
    try:
        yield runtime
    finally:
        runtime.shutdown(timeout=30)


async def test_what_a_call_that_ran_out_of_memory_held_is_freed_at_once(runtime: LocalRuntime) -> None:
    """The failed step's tensors stayed referenced from its traceback (and the traceback from its
    exception) until the cycle collector ran, so `empty_cache` gave nothing back."""
    held: list[weakref.ref[torch.Tensor]] = []

    def step() -> None:
        activations = torch.zeros(1024)
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    gc.disable()  # a collection by chance would free them too; the traceback must let go of them
    try:
        with pytest.raises(EngineError, match="ran out of memory") as info:
            await runtime.call(step)
        assert isinstance(info.value.__cause__, torch.OutOfMemoryError)  # still told, without its frames
        assert held and held[0]() is None
    finally:
        gc.enable()


async def test_a_model_that_does_not_fit_on_the_device_is_a_failure_to_load_it(
        runtime: LocalRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory while moving the model to the device was taken as a request too large:
    retryable, the engine available, and every job loaded the model again to fail alike."""
    from diffusers import DiffusionPipeline

    def too_large(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(DiffusionPipeline, "to", too_large)
    with pytest.raises(EngineUnavailable, match=r"could not load model .*OutOfMemoryError: CUDA out of memory"):
        await runtime.call(runtime.text2img, tiny.NAME)
    failure = runtime.load_failure(tiny.NAME)
    assert failure is not None and "out of memory" in failure.message
    monkeypatch.undo()
    with pytest.raises(EngineUnavailable, match="out of memory"):  # not loaded again before its retry time
        await runtime.call(runtime.text2img, tiny.NAME)


async def test_a_vae_left_upcast_by_a_failed_decode_is_put_back(runtime: LocalRuntime) -> None:
    """SDXL's pipelines cast their fp16 VAE to fp32 for the decode and back after it: a decode that
    ran out of memory left it fp32, and each later job failed on a dtype mismatch."""
    pipe = await runtime.call(runtime.text2img, tiny.NAME)
    assert pipe.vae.dtype == torch.float32  # the CPU's dtype

    def decode_out_of_memory() -> None:
        pipe.vae.to(dtype=torch.float64)  # the upcast (to what the CPU does not run with)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    with pytest.raises(EngineError, match="ran out of memory"):
        await runtime.call(decode_out_of_memory)
    assert pipe.vae.dtype == torch.float32
    img2img = await runtime.call(runtime.img2img, tiny.NAME)
    assert img2img.vae is pipe.vae  # shared with the image-to-image form, which is mended alike


async def test_a_vae_that_cannot_be_put_back_leaves_the_failure_as_it_was(
        runtime: LocalRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    await runtime.call(runtime.text2img, tiny.NAME)

    def restore_out_of_memory(self: LocalRuntime) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 160.00 MiB")

    def decode_out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(LocalRuntime, "_restore_vaes", restore_out_of_memory)
    with caplog.at_level("WARNING", logger="tiers._local"), \
            pytest.raises(EngineError, match="ran out of memory") as info:
        await runtime.call(decode_out_of_memory)
    assert "4.00 GiB" in str(info.value.__cause__)  # the job's own failure, not the mend's
    assert any("could not be put back" in r.getMessage() for r in caplog.records)
    with pytest.raises(KeyboardInterrupt):  # not made into anything else
        await runtime.call(_interrupt)


def _interrupt() -> None:
    raise KeyboardInterrupt


@pytest.fixture
def taesd(tmp_path: Any) -> str:
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taesd"
    channels = (8, 8, 8, 8)
    AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,  # type: ignore[attr-defined]
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(folder)
    return str(folder)


def test_a_preview_vae_decodes_latents_shrunk_to_the_preview_s_size(
        make_settings: SettingsFactory, taesd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderTiny

    decoded: list[tuple[int, ...]] = []
    real = AutoencoderTiny.decode

    def recording(self: Any, latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        decoded.append(tuple(latents.shape))
        return real(self, latents, *args, **kwargs)

    monkeypatch.setattr(AutoencoderTiny, "decode", recording)
    runtime = runtime_for(EngineContext(settings=make_settings(lite_preview_vae=taesd)))
    runtime._load_previewer()  # as a load of the Lite model does
    try:
        small, large = (runtime.preview(torch.randn(2, 4, side // 8, side // 8)) for side in (256, 2048))
    finally:
        runtime.shutdown(timeout=30)
    assert decoded == [(1, 4, 32, 32), (1, 4, 64, 64)]  # the first image's, at most 512 px decoded
    assert small is not None and small.size == (256, 256)
    assert large is not None and large.size == (512, 512)


def test_a_slow_preview_vae_previews_only_some_steps(
        make_settings: SettingsFactory, taesd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU's TAESD decode took longer than the step it showed: each step's previews doubled a
    job's time. Its decodes now take at most a quarter of the thread's time."""
    now = [1000.0]
    monkeypatch.setattr(_local, "time", SimpleNamespace(monotonic=lambda: now[0]))
    runtime = runtime_for(EngineContext(settings=make_settings(lite_preview_vae=taesd)))
    runtime._load_previewer()

    def slow_decode(latents: Any, *, space: LatentSpace = LatentSpace.SD) -> Any:
        from PIL import Image

        now[0] += 1.0  # a decode of one second
        return Image.new("RGB", (8, 8))

    runtime._previewer = slow_decode
    previews: list[bool] = []

    class Progress:
        def step(self, step: int, total: int, preview: Any = None) -> None:
            previews.append(preview is not None)

    on_step = runtime.step_callback(Progress(), CancelToken(), done=0, passes=1, planned=10)  # type: ignore[arg-type]
    pipe = type("Pipe", (), {"num_timesteps": 10})()
    try:
        for i in range(10):
            on_step(pipe, i, None, {"latents": torch.zeros(1, 4, 8, 8)})
            now[0] += 0.5  # each step's own half second
    finally:
        runtime.shutdown(timeout=30)
    # A decode of 1 s, then 3 s of steps without one, and so on.
    assert previews == [True, False, False, False, False, False, True, False, False, False]


def test_another_model_s_latents_neither_use_nor_turn_off_the_lite_preview_vae(
        make_settings: SettingsFactory, taesd: str, caplog: pytest.LogCaptureFixture) -> None:
    """ORCH_LITE_PREVIEW_VAE is the Lite model's: a local-hifi model of another latent family
    (FLUX packs its latents as tokens) made its decode fail, which turned Lite's previews to the
    approximation until a restart."""
    runtime = runtime_for(EngineContext(settings=make_settings(lite_model=tiny.NAME, hifi_model="/models/flux",
                                                               lite_preview_vae=taesd)))
    lite_pipe, hifi_pipe = object(), object()
    runtime._pipes[(tiny.NAME, "text2img")] = lite_pipe
    runtime._pipes[("/models/flux", "img2img")] = hifi_pipe
    runtime._load_previewer()  # as the load of lite_pipe would have
    try:
        assert runtime.preview(torch.zeros(1, 4096, 64), hifi_pipe) is None
        assert runtime.preview(torch.zeros(1, 4, 8, 8), hifi_pipe).size == (8, 8)  # type: ignore[union-attr]
        lite_preview = runtime.preview(torch.zeros(1, 4, 8, 8), lite_pipe)
    finally:
        runtime._pipes.clear()
        runtime.shutdown(timeout=30)
    assert lite_preview is not None and lite_preview.size == (64, 64)  # the preview VAE's, 8x the latents
    assert "ORCH_LITE_PREVIEW_VAE" not in caplog.text


@pytest.mark.parametrize(("device", "collected"), [(None, False), ("cpu", False), ("cuda", True), ("mps", True)])
def test_a_stop_runs_a_full_collection_only_to_give_a_gpu_s_cache_back(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, device: str | None, collected: bool) -> None:
    """Every stop ran a full collection, which in a process holding torch took a second and more:
    it only matters where `empty_cache` gives the device's memory back for the next process."""
    runtime = runtime_for(EngineContext(settings=make_settings()))
    runtime._device = device  # what the first job found (None: no job used the device)
    freed: list[bool] = []
    monkeypatch.setattr(runtime, "_free_device_memory", lambda: freed.append(True))
    runtime._pipes[(tiny.NAME, "text2img")] = object()
    assert runtime.shutdown(timeout=30)
    assert runtime._pipes == {} and freed == ([True] if collected else [])
