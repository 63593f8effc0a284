"""The Lite model's preview VAE (ORCH_LITE_PREVIEW_VAE): loaded with the model, never inside a
draft's step, from the Hugging Face cache without asking a Hub that does not answer; a decode that
fails once does not end it; a shutdown frees it. No test asks the Hub: TAESD is a tiny one made here."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from tests.conftest import SettingsFactory
from tests.tiers.conftest import EngineFactory, RecordingProgress
from tiers import _local, lite
from tiers._local import PREVIEW_VAE_FAILURES, LatentSpace, latents_to_preview, runtime_for
from tiers.base import DEVICE_SECONDS, CancelToken, EngineContext, RenderRequest

TAESD_ID = "acme/taesd"


def draft() -> RenderRequest:
    return RenderRequest(stage="ideation", prompt="a lighthouse", width=64, height=64, steps=2, seed=1, n=1)


def tiny_taesd() -> Any:
    from diffusers import AutoencoderTiny

    channels = (8, 8, 8, 8)
    return AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))


class PreviewLog(RecordingProgress):
    """Records each step's preview size (None: no preview)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int] | None] = []

    def step(self, step: int, total: int, preview: Any = None) -> None:
        super().step(step, total, preview)
        self.sizes.append(None if preview is None else preview.size)


class Loads:
    """Stands in for `AutoencoderTiny.from_pretrained`: notes what was asked for (the dtype left
    out), and gives a tiny TAESD, or what `then` makes of the call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, then: Any = None) -> None:
        from diffusers import AutoencoderTiny

        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.then = then
        monkeypatch.setattr(AutoencoderTiny, "from_pretrained", classmethod(self._load))

    def _load(self, cls: Any, name: str, **options: Any) -> Any:
        self.asked.append((name, {k: v for k, v in options.items() if k != "torch_dtype"}))
        return self.then(name, **options) if self.then is not None else tiny_taesd()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[float, str | None]]]:
    """An empty Hugging Face cache under tmp_path, and a Hub that does not answer: yields what
    `hf_hub_reachable` was asked (its timeout, and the file)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    asked: list[tuple[float, str | None]] = []

    def silent(timeout: float = 1.5, file: str | None = None) -> bool:
        asked.append((timeout, file))
        return False

    monkeypatch.setattr(_local, "hf_hub_reachable", silent)
    yield asked


def cache_taesd(tmp_path: Path, *, weights: bool = True) -> Path:
    """TAESD_ID in the Hugging Face cache of the `hub` fixture (with its weights, or its config only:
    a download cut short)."""
    repo = tmp_path / "hf-hub" / f"models--{TAESD_ID.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    tiny_taesd().save_pretrained(snapshot)
    if not weights:
        for file in snapshot.glob("*.safetensors"):
            file.unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


async def test_the_preview_vae_loads_with_the_model_from_the_cache_without_asking_the_hub(
        engines: EngineFactory, hub: list[tuple[float, str | None]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It loaded inside the first draft's first step, out of a preload's reach; and by its Hub id,
    which the Hub client retried for about 23 s where the Hub did not answer, the model cached."""
    from diffusers import AutoencoderTiny

    cache_taesd(tmp_path)
    real = AutoencoderTiny.from_pretrained  # loads it from the cache, as a real start does
    loads = Loads(monkeypatch, then=lambda name, **options: real(name, **options))
    lite_engine, _ = engines(lite_preview_vae=TAESD_ID)
    await lite_engine.preload()
    assert loads.asked == [(TAESD_ID, {"local_files_only": True})] and hub == []
    progress = PreviewLog()
    await lite_engine.run(draft(), progress, CancelToken())
    assert len(loads.asked) == 1
    # The preview VAE's (8x the latents), and a step without one while its decode is given back.
    assert progress.sizes[0] == (64, 64) and set(progress.sizes) <= {(64, 64), None}


async def test_a_preview_vae_not_cached_is_not_asked_for_where_the_hub_does_not_answer(
        engines: EngineFactory, hub: list[tuple[float, str | None]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cache_taesd(tmp_path, weights=False)  # a download cut short: the Hub would be asked for the rest
    loads = Loads(monkeypatch)
    lite_engine, _ = engines(lite_preview_vae=TAESD_ID)
    progress = PreviewLog()
    with caplog.at_level(logging.WARNING, logger="tiers._local"):
        await lite_engine.run(draft(), progress, CancelToken())
    # The file, not the Hub's root: a proxy refusing the way out answers that too (then 23 s of retries).
    assert loads.asked == [] and hub == [(_local.HUB_CHECK_SECONDS, f"{TAESD_ID}/config.json")]
    assert progress.sizes == [(8, 8), (8, 8)]  # the approximation
    assert sum("ORCH_LITE_PREVIEW_VAE" in r.getMessage() for r in caplog.records) == 1


async def test_a_draft_neither_waits_for_the_preview_vae_in_a_step_nor_is_metered_for_it(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A first draft without a preload loads the model and then the preview VAE, before its clock
    starts: the load is never counted in device-seconds (a metered job's charge)."""
    now = [1000.0]
    monkeypatch.setattr(lite, "time", SimpleNamespace(monotonic=lambda: now[0]))
    in_step: list[bool] = []
    stepping = threading.local()

    def slow(name: str, **options: Any) -> Any:
        in_step.append(getattr(stepping, "on", False))
        now[0] += 100.0  # a load of 100 s
        return tiny_taesd()

    Loads(monkeypatch, then=slow)
    folder = tmp_path / "taesd"
    folder.mkdir()
    lite_engine, _ = engines(lite_preview_vae=str(folder))
    step = lite_engine.runtime.step_callback

    def marked(*args: Any, **kwargs: Any) -> Any:
        on_step = step(*args, **kwargs)

        def call(*step_args: Any) -> Any:
            stepping.on = True
            try:
                return on_step(*step_args)
            finally:
                stepping.on = False

        return call

    monkeypatch.setattr(lite_engine.runtime, "step_callback", marked)
    result = await lite_engine.run(draft(), RecordingProgress(), CancelToken())
    assert in_step == [False] and result.metadata[DEVICE_SECONDS] == 0.0


def test_one_failed_decode_does_not_end_the_preview_vae(
        make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture) -> None:
    """A transient failure (a large batch's step out of memory) turned the preview VAE off until a
    restart. It gives way to the approximation after PREVIEW_VAE_FAILURES in a row."""
    runtime = runtime_for(EngineContext(settings=make_settings(lite_preview_vae="/models/taesd")))
    fails = [True, False, True, True, False] + [True] * PREVIEW_VAE_FAILURES + [False]
    calls: list[bool] = []

    def flaky(latents: Any, *, space: LatentSpace = LatentSpace.SD) -> Image.Image:
        calls.append(fails[len(calls)])
        if calls[-1]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Image.new("RGB", (16, 16))

    runtime._previewer = flaky
    try:
        with caplog.at_level(logging.WARNING, logger="tiers._local"):
            sizes = [getattr(runtime.preview(torch.zeros(1, 4, 8, 8)), "size", None) for _ in fails]
    finally:
        runtime.shutdown(timeout=30)
    # A failed decode's step gets the approximation (8 px); a decode that works resets the count.
    assert sizes == [(8, 8), (16, 16), (8, 8), (8, 8), (16, 16)] + [(8, 8)] * (PREVIEW_VAE_FAILURES + 1)
    assert len(calls) == len(fails) - 1  # given up after the failures in a row
    assert sum("ORCH_LITE_PREVIEW_VAE" in r.getMessage() for r in caplog.records) == 1


def test_a_shutdown_frees_the_preview_vae(make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    made: list[Any] = []

    def keep(name: str, **options: Any) -> Any:
        made.append(tiny_taesd())
        return made[-1]

    Loads(monkeypatch, then=keep)
    folder = tmp_path / "taesd"
    folder.mkdir()
    runtime = runtime_for(EngineContext(settings=make_settings(lite_preview_vae=str(folder))))
    runtime._load_previewer()
    assert runtime._previewer not in (None, latents_to_preview)
    vae = weakref.ref(made.pop())
    assert runtime.shutdown(timeout=30)
    gc.collect()
    assert runtime._previewer is None and vae() is None
