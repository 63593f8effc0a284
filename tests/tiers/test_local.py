"""The local runtime and engines on the offline tiny pipeline: progress that counts what the
pipeline really runs, cancels between chunks, previews that never fail a job, and device errors
that say what to do."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from orchestrator.errors import Canceled, EngineError, EngineUnavailable
from orchestrator.settings import Settings
from tests.conftest import SettingsFactory
from tests.tiers.conftest import RecordingProgress, draft_image
from tiers import tiny
from tiers._local import _usable_cpus, hf_hub_reachable, latents_to_preview, runtime_for
from tiers.base import CancelToken, EngineContext, RenderRequest
from tiers.lite import LiteEngine
from tiers.local_hifi import LocalHifiEngine

EngineFactory = Callable[..., tuple[LiteEngine, LocalHifiEngine]]


@pytest.fixture
def engines(make_settings: SettingsFactory) -> Iterator[EngineFactory]:
    made: list[LiteEngine] = []

    def make(**overrides: Any) -> tuple[LiteEngine, LocalHifiEngine]:
        settings: Settings = make_settings(lite_model=tiny.NAME, **overrides)
        ctx = EngineContext(settings=settings)
        lite, hifi = LiteEngine(ctx), LocalHifiEngine(ctx)
        made.append(lite)
        return lite, hifi

    yield make
    for lite in made:
        lite.runtime.shutdown(timeout=30)


def draft(**kw: Any) -> RenderRequest:
    return RenderRequest(**{"stage": "ideation", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4,
                            "seed": 1, "n": 2, **kw})


def use_pndm(lite: LiteEngine) -> None:
    """PNDM (SD 1.5's default) runs one step more than asked."""
    from diffusers import PNDMScheduler

    pipe = lite.runtime.text2img(lite.model)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # type: ignore[no-untyped-call]


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


def test_latents_that_are_not_channel_images_have_no_preview() -> None:
    assert latents_to_preview(torch.zeros(1, 4096, 64)) is None  # FLUX packs its latents as tokens
    assert latents_to_preview(torch.zeros(1, 4, 8, 8)) is not None


async def test_running_out_of_device_memory_is_a_job_error_another_engine_may_retry(
        make_settings: SettingsFactory) -> None:
    runtime = runtime_for(EngineContext(settings=make_settings()))

    def allocate() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    try:
        with pytest.raises(EngineError) as info:
            await runtime.call(allocate)
        assert info.value.retryable and info.value.charged == "no"
        assert "ran out of memory" in info.value.message and "ORCH_LITE_MAX_BATCH" in info.value.message

        def other() -> None:
            raise RuntimeError("expected a tensor")

        with pytest.raises(RuntimeError, match="expected a tensor"):  # other errors pass unchanged
            await runtime.call(other)
    finally:
        runtime.shutdown(timeout=30)


def test_thread_count_follows_the_cpus_this_process_may_use() -> None:
    assert _usable_cpus() == len(os.sched_getaffinity(0))


# diffusers still passes huggingface_hub an argument it has deprecated; nothing of ours.
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
async def test_a_hub_model_that_cannot_be_fetched_says_the_hub_did_not_answer(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what hf_hub_reachable reads; the Hub client read it at import:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 20 s of retries
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model="nobody/no-such-model")))
    try:
        with pytest.raises(EngineUnavailable) as info:
            await lite.run(draft(n=1), RecordingProgress(), CancelToken())
    finally:
        lite.runtime.shutdown(timeout=30)
    assert "could not load model 'nobody/no-such-model'" in info.value.message
    assert "the Hub did not answer" in info.value.message


def test_a_malformed_hub_endpoint_is_an_unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://[not a host")
    assert hf_hub_reachable() is False


def test_a_ckpt_file_is_unavailable_with_what_to_do(make_settings: SettingsFactory, tmp_path: Any) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"a pickle")
    lite = LiteEngine(EngineContext(settings=make_settings(lite_model=str(checkpoint))))
    available, reason = lite.availability()
    assert not available and reason and "convert it to .safetensors" in reason
