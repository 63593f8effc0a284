"""Loading a local model, on copies of the offline tiny pipeline: fp16-only folders and Hub cache
snapshots, load errors that name the model and say why, a warm-up that fails, a model that fails
to load, and previews in the model family's own colours."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from orchestrator.errors import BadEngineInput, EngineUnavailable
from orchestrator.store import model_name
from tests.conftest import SettingsFactory
from tests.tiers.conftest import EngineFactory, RecordingProgress, draft_image
from tiers import _local, tiny
from tiers._local import LatentSpace, latents_to_preview, runtime_for
from tiers.base import CancelToken, EngineContext, RenderRequest
from tiers.lite import LiteEngine
from tiers.local_hifi import LocalHifiEngine

Engines = Callable[[str], tuple[LiteEngine, LocalHifiEngine]]


@pytest.fixture
def load(engines: EngineFactory) -> Engines:
    """The local engines on `model`, on the CPU."""
    return lambda model: engines(lite_model=model, lite_device="cpu", local_max_size=256)


@pytest.fixture
def tiny_copy(tiny_cache_dir: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A copy of the tiny pipeline's diffusers folder, to change."""
    def copy(name: str) -> Path:
        folder = tmp_path / "models" / name
        shutil.copytree(tiny_cache_dir / "tiny-sd", folder, ignore=shutil.ignore_patterns(".tiny-sd-*"))
        return folder

    return copy


def draft(**kw: Any) -> RenderRequest:
    return RenderRequest(**{"stage": "ideation", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1,
                            "seed": 1, "n": 1, **kw})


def as_fp16_variant(folder: Path) -> None:
    """What `variant="fp16"` downloads leave: `*.fp16.safetensors` only."""
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))


def hub_cache(tmp_path: Path, repo_id: str, snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Hugging Face cache, under tmp_path, holding `snapshot` as `repo_id`'s main revision."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(snapshot, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / revision


async def test_a_folder_of_fp16_weights_only_loads_as_that_variant(load: Engines,
                                                                    tiny_copy: Callable[[str], Path]) -> None:
    folder = tiny_copy("fp16-only")
    as_fp16_variant(folder)
    lite, _ = load(str(folder))
    result = await lite.run(draft(), RecordingProgress(), CancelToken())
    assert len(result.images) == 1
    assert lite.runtime._pipes[(str(folder), "text2img")].unet.dtype == torch.float32  # cast to the run's dtype


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
async def test_a_hub_cache_snapshot_of_fp16_weights_only_loads_as_that_variant(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_copy("fp16-only")
    as_fp16_variant(folder)
    hub_cache(tmp_path, "acme/tiny-turbo", folder, monkeypatch)
    lite, _ = load("acme/tiny-turbo")
    result = await lite.run(draft(), RecordingProgress(), CancelToken())
    assert len(result.images) == 1 and result.model == "acme/tiny-turbo"


def test_a_hub_model_cached_whole_loads_from_the_cache_alone(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded with the Hub asked first, a Hub (a proxy, a mirror) that took the connection and never
    answered held the inference thread for good (the Hub client waits without a timeout)."""
    import huggingface_hub.constants

    hub_cache(tmp_path, "acme/tiny-turbo", tiny_copy("whole"), monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    lite, _ = load("acme/tiny-turbo")
    assert lite.runtime._folder_options("acme/tiny-turbo", Path("acme/tiny-turbo")) == {"local_files_only": True}
    lacking = tiny_copy("lacking")
    shutil.rmtree(lacking / "unet")
    hub_cache(tmp_path / "other", "acme/tiny-lacking", lacking, monkeypatch)
    assert lite.runtime._folder_options("acme/tiny-lacking", Path("acme/tiny-lacking")) == {}  # the Hub asked


async def test_a_bridge_on_a_hub_model_in_the_cache_asks_the_hub_nothing(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the model is image-to-image only was asked of the Hub (a newer revision's
    model_index.json): a Hub that took the connection held the inference thread 10 s, and one that
    answered moved the cache's `main` to a snapshot of that file alone, which loaded offline no more."""
    import huggingface_hub.constants
    import huggingface_hub.file_download

    hub_cache(tmp_path, "acme/tiny-turbo", tiny_copy("whole"), monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked: list[Any] = []

    def metadata(*args: Any, **kwargs: Any) -> Any:
        asked.append(args)
        raise OSError("the test's Hub does not answer")

    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", metadata)
    _, hifi = load("acme/tiny-turbo")
    request = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=2, strength=0.5,
                            seed=1, n=1, init_image=draft_image())
    result = await hifi.run(request, RecordingProgress(), CancelToken())
    assert len(result.images) == 1 and asked == []


@pytest.mark.parametrize("reachable", [True, False])
async def test_a_cached_snapshot_lacking_a_small_file_fetches_it_where_the_hub_answers(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        reachable: bool) -> None:
    """Its weights all cached, a snapshot lacking a tokenizer's file was loaded from the cache alone and failed."""
    import huggingface_hub.constants
    from diffusers import AutoPipelineForText2Image
    from huggingface_hub.utils import LocalEntryNotFoundError  # type: ignore[attr-defined]

    hub_cache(tmp_path, "acme/tiny-turbo", tiny_copy("whole"), monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    real = AutoPipelineForText2Image.from_pretrained.__func__  # type: ignore[attr-defined]
    calls: list[tuple[str, bool]] = []

    def from_pretrained(cls: Any, name: str, local_files_only: bool = False, **kwargs: Any) -> Any:
        calls.append((str(name), local_files_only))
        if local_files_only:
            raise OSError("Can't load tokenizer") from LocalEntryNotFoundError("tokenizer/vocab.json")
        return real(cls, tiny_copy("fetched"), **kwargs)

    monkeypatch.setattr(AutoPipelineForText2Image, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(_local, "hf_hub_reachable", lambda timeout=1.5, file=None: reachable)
    lite, _ = load("acme/tiny-turbo")
    if reachable:
        result = await lite.run(draft(), RecordingProgress(), CancelToken())
        assert len(result.images) == 1
        assert calls == [("acme/tiny-turbo", True), ("acme/tiny-turbo", False)]
    else:
        with pytest.raises(EngineUnavailable):
            await lite.run(draft(), RecordingProgress(), CancelToken())
        assert calls == [("acme/tiny-turbo", True)]


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
async def test_a_load_error_names_the_model_never_the_server_s_hub_cache(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_copy("no-text-encoder-weights")
    for weights in (folder / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    snapshot = hub_cache(tmp_path, "acme/tiny-turbo", folder, monkeypatch)
    lite, _ = load("acme/tiny-turbo")
    with pytest.raises(EngineUnavailable) as info:
        await lite.run(draft(), RecordingProgress(), CancelToken())
    message = info.value.message
    assert message.startswith("could not load model 'acme/tiny-turbo': its download in the Hugging Face cache "
                              "is incomplete (text_encoder/ missing) and the Hub did not answer")
    assert str(tmp_path) not in message and snapshot.name not in message and "models--" not in message
    reason = lite.availability()[1]
    assert reason is not None and str(tmp_path) not in reason


async def test_a_model_under_the_home_of_no_user_is_a_path_to_nothing(engines: EngineFactory) -> None:
    # pathlib raised "Could not determine home directory" as the engines were made: local-hifi was
    # listed broken with that, naming no setting, and the preview VAE's the same under a model.
    lite, hifi = engines(hifi_model="~nosuchuser-orch/models/sd15", lite_preview_vae="~nosuchuser-orch/taesd")
    assert hifi.availability() == (False, "model '~nosuchuser-orch/models/sd15' is a path to nothing: "
                                          "no such file or folder")
    assert lite.availability() == (True, None)
    assert model_name("~nosuchuser-orch/models/sd15") == "sd15"


async def test_a_folder_lacking_a_component_says_which(load: Engines, tiny_copy: Callable[[str], Path],
                                                       tmp_path: Path) -> None:
    folder = tiny_copy("sd15-novae")
    shutil.rmtree(folder / "vae")
    lite, _ = load(str(folder))
    with pytest.raises(EngineUnavailable) as info:
        await lite.run(draft(), RecordingProgress(), CancelToken())
    assert info.value.message == "could not load model 'sd15-novae': the model folder lacks vae/"


@pytest.mark.parametrize(("emptied", "said"), [
    ("tokenizer", "tokenizer/ (an empty folder)"),
    ("unet", "unet/ (its weights: a config.json alone)"),
    ("tokenizer-config", "tokenizer/ (its vocabulary: only tokenizer_config.json)"),
])
async def test_a_component_copied_in_part_is_named_not_loaded(load: Engines, tiny_copy: Callable[[str], Path],
                                                              emptied: str, said: str) -> None:
    # A copy cut short: an empty tokenizer folder loaded as a tokenizer of two tokens, the engine
    # said available, and every draft failed "OverflowError: int too big to convert".
    folder = tiny_copy(f"sd15-no-{emptied}")
    component, _, kept = emptied.partition("-")
    for file in (folder / component).iterdir():
        if file.name not in ("config.json", "tokenizer_config.json" if kept else ""):
            file.unlink()
    for stray in (".DS_Store", "README.md"):  # what a desktop or a copied repository leaves: no part of it
        (folder / component / stray).write_bytes(b"\0")
    lite, _ = load(str(folder))
    with pytest.raises(EngineUnavailable) as info:
        await lite.run(draft(), RecordingProgress(), CancelToken())
    assert info.value.message == f"could not load model 'sd15-no-{emptied}': the model folder lacks {said}"


async def test_a_load_error_that_starts_with_a_newline_keeps_its_reason(
        load: Engines, tiny_copy: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoPipelineForText2Image

    def needs_torchsde(*_args: Any, **_kwargs: Any) -> Any:  # as diffusers says a missing backend
        raise ImportError("\nDPMSolverSDEScheduler requires the torchsde library but it was not found in your "
                          "environment.\nYou can install it with pip: `pip install torchsde`\n")

    monkeypatch.setattr(AutoPipelineForText2Image, "from_pretrained", needs_torchsde)
    lite, _ = load(str(tiny_copy("sd15-sde")))
    with pytest.raises(EngineUnavailable) as info:
        await lite.run(draft(), RecordingProgress(), CancelToken())
    assert info.value.message == ("could not load model 'sd15-sde': ImportError: DPMSolverSDEScheduler requires the "
                                  "torchsde library but it was not found in your environment.")


def use_pndm_with_runge_kutta_steps(folder: Path) -> None:
    from diffusers import PNDMScheduler

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").unlink()
    PNDMScheduler.from_config(config, skip_prk_steps=False).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))


async def test_a_warm_up_that_fails_keeps_the_model_and_too_few_steps_are_refused(
        load: Engines, tiny_copy: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    # PNDM's Runge-Kutta steps need 4 steps at least: the 1-step warm-up failed, the model was
    # thrown away, and every draft reloaded it and failed with numpy's "could not be broadcast".
    folder = tiny_copy("sd15-pndm")
    use_pndm_with_runge_kutta_steps(folder)
    lite, hifi = load(str(folder))
    with caplog.at_level(logging.WARNING, logger="tiers._local"):
        result = await lite.run(draft(steps=4), RecordingProgress(), CancelToken())
    assert len(result.images) == 1 and result.metadata["sampler"] == "PNDMScheduler"
    assert "warm-up" in caplog.text and lite.availability() == (True, None)
    with pytest.raises(BadEngineInput) as info:
        await lite.run(draft(steps=2), RecordingProgress(), CancelToken())
    assert info.value.message == ("steps: this model's scheduler (PNDMScheduler) cannot run 2 steps; "
                                  "the fewest it runs is 4")
    assert info.value.details == {"field": "steps", "value": 2, "min": 4}
    bridge = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=2, seed=1, n=1,
                           init_image=draft_image(), strength=1.0)
    with pytest.raises(BadEngineInput, match=r"^steps: "):
        await hifi.run(bridge, RecordingProgress(), CancelToken())


async def test_a_model_that_failed_to_load_is_unavailable_until_a_later_load_succeeds(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_copy("sd15-half-copied")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    whole = unet.read_bytes()
    unet.write_bytes(whole[:1000])  # still being copied
    lite, hifi = load(str(folder))
    loads: list[str] = []
    load = lite.runtime._load_pipeline

    def counted_load(model: str, **kwargs: Any) -> Any:
        loads.append(model)
        return load(model, **kwargs)

    monkeypatch.setattr(lite.runtime, "_load_pipeline", counted_load)
    assert lite.availability() == (True, None)
    with pytest.raises(EngineUnavailable):
        await lite.preload()  # what ORCH_LITE_PRELOAD does at start
    available, reason = lite.availability()
    assert not available and reason is not None and reason.startswith("could not load model 'sd15-half-copied': ")
    assert str(tmp_path) not in reason and hifi.availability() == (False, reason)  # one model, one runtime
    with pytest.raises(EngineUnavailable):  # a job already queued fails at once, without a reload
        await lite.run(draft(), RecordingProgress(), CancelToken())
    assert len(loads) == 1
    unet.write_bytes(whole)
    monkeypatch.setattr(_local, "LOAD_RETRY_SECONDS", 0.0)  # a while later
    assert lite.availability() == (True, None)
    result = await lite.run(draft(), RecordingProgress(), CancelToken())
    assert len(result.images) == 1 and len(loads) == 2
    monkeypatch.setattr(_local, "LOAD_RETRY_SECONDS", 60.0)
    assert lite.availability() == (True, None)  # the failure is forgotten once a load succeeds


async def test_a_tiny_model_that_cannot_be_built_leaves_the_engine_unavailable_saying_why(
        engines: EngineFactory, tmp_path: Path) -> None:
    """A cache folder that is a file: the engine read available, and each draft failed with an
    unexpected FileExistsError."""
    (tmp_path / "a-file").write_text("not a folder")
    lite, _ = engines(lite_model="builtin:tiny-sd", lite_device="cpu", cache_dir=tmp_path / "a-file")
    with pytest.raises(EngineUnavailable, match="could not build the offline tiny model in ORCH_CACHE_DIR"):
        await lite.run(draft(), RecordingProgress(), CancelToken())
    available, reason = lite.availability()
    assert not available and reason is not None and "ORCH_CACHE_DIR" in reason and str(tmp_path) not in reason


async def test_one_folder_named_two_ways_is_loaded_once(engines: EngineFactory,
                                                        tiny_copy: Callable[[str], Path]) -> None:
    folder = tiny_copy("sd15")
    lite, hifi = engines(lite_model=str(folder), hifi_model=f"{folder}/", lite_device="cpu")
    await lite.run(draft(), RecordingProgress(), CancelToken())
    await hifi.run(RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, seed=1, n=1, steps=2,
                                 init_image=draft_image(), strength=0.5), RecordingProgress(), CancelToken())
    assert sorted(kind for _, kind in lite.runtime._pipes) == ["img2img", "text2img"]  # not a second text2img
    text2img, img2img = (lite.runtime._pipes[(str(folder.resolve()), kind)] for kind in ("text2img", "img2img"))
    assert img2img.unet is text2img.unet  # one copy of the weights


def pixel(image: Any) -> tuple[int, int, int]:
    value = image.getpixel((0, 0))
    return (value[0], value[1], value[2])


def test_previews_use_the_model_family_s_latent_colours(make_settings: SettingsFactory) -> None:
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0] = 1.0  # the first latent channel alone
    sdxl = SimpleNamespace(unet=SimpleNamespace(config={"addition_embed_type": "text_time"}))
    sd15 = SimpleNamespace(unet=SimpleNamespace(config={"addition_embed_type": None}))
    runtime = runtime_for(EngineContext(settings=make_settings()))
    try:
        xl_preview, sd_preview = runtime.preview(latents, sdxl), runtime.preview(latents, sd15)
    finally:
        runtime.shutdown(timeout=30)
    assert xl_preview is not None and sd_preview is not None

    def expected(rgb: tuple[float, float, float]) -> tuple[int, int, int]:
        r, g, b = (int((value + 1.0) * 127.5) for value in rgb)
        return (r, g, b)

    # SDXL's first row and bias; SD 1.x's first row, unchanged.
    assert pixel(xl_preview) == expected((0.3651 + 0.1084, 0.4232 - 0.0175, 0.4341 - 0.0011))
    assert pixel(sd_preview) == expected((0.298, 0.207, 0.208))
    assert latents_to_preview(latents) is not None and pixel(latents_to_preview(latents)) == pixel(sd_preview)


def test_playground_v2_5_s_previews_read_its_latents_as_its_pipeline_decodes_them(
        make_settings: SettingsFactory) -> None:
    """Playground v2.5 is an SDXL pipeline whose VAE config normalizes the latents per channel
    (`latents_mean`, `latents_std`, scaling 0.5), undone by the pipeline before its decode. Its
    previews read them as SDXL's (scaled by 0.13025): tinted red, at little more than half the
    contrast. The same VAE latents get SDXL's preview, from the approximation and a preview VAE."""
    mean, std = [-1.6574, 1.886, -1.383, 2.5155], [8.4927, 5.9022, 6.5498, 5.2299]  # its vae/config.json
    unet = SimpleNamespace(config={"addition_embed_type": "text_time"})
    sdxl = SimpleNamespace(unet=unet, vae=SimpleNamespace(config={"scaling_factor": 0.13025, "latents_mean": None,
                                                                  "latents_std": None}))
    playground = SimpleNamespace(unet=unet, vae=SimpleNamespace(config={"scaling_factor": 0.5, "latents_mean": mean,
                                                                        "latents_std": std}))
    as_sdxl = torch.zeros(1, 4, 8, 8)
    as_sdxl[0, 0] = 0.5
    as_playground = ((as_sdxl / 0.13025 - torch.tensor(mean).view(1, 4, 1, 1)) * 0.5
                     / torch.tensor(std).view(1, 4, 1, 1))
    runtime = runtime_for(EngineContext(settings=make_settings()))
    decoded: list[Any] = []

    def preview_vae(latents: Any, *, space: LatentSpace = LatentSpace.SD) -> Any:
        decoded.append(latents)
        raise RuntimeError("a decode that fails: the step gets the approximation")

    try:
        sdxl_preview, playground_preview = runtime.preview(as_sdxl, sdxl), runtime.preview(as_playground, playground)
        runtime._previewer = preview_vae
        runtime.preview(as_playground, playground)
    finally:
        runtime.shutdown(timeout=30)
    assert sdxl_preview is not None and playground_preview is not None
    assert pixel(playground_preview) == pixel(sdxl_preview)
    assert len(decoded) == 1 and torch.allclose(decoded[0], as_sdxl, atol=1e-5)


def test_previews_of_a_pipeline_on_sdxl_s_vae_use_sdxl_s_latent_colours(make_settings: SettingsFactory) -> None:
    """PixArt-Alpha and -Sigma have a transformer, no UNet, and SDXL's VAE (`scaling_factor`
    0.13025): their previews got SD 1.x's map, the wrong colours. Its VAE says the latent space:
    the same latents get SDXL's preview, from the approximation and a preview VAE told SDXL's space."""
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0] = 1.0
    sdxl = SimpleNamespace(unet=SimpleNamespace(config={"addition_embed_type": "text_time"}),
                           vae=SimpleNamespace(config={"scaling_factor": 0.13025}))
    pixart = SimpleNamespace(transformer=SimpleNamespace(config={"sample_size": 128}),
                             vae=SimpleNamespace(config={"scaling_factor": 0.13025, "latents_mean": None,
                                                         "latents_std": None}))
    sd15 = SimpleNamespace(unet=SimpleNamespace(config={"addition_embed_type": None}),
                           vae=SimpleNamespace(config={"scaling_factor": 0.18215}))
    runtime = runtime_for(EngineContext(settings=make_settings()))
    told: list[LatentSpace] = []

    def preview_vae(latents: Any, *, space: LatentSpace = LatentSpace.SD) -> Any:
        told.append(space)
        raise RuntimeError("a decode that fails: the step gets the approximation")

    try:
        sdxl_preview, pixart_preview = runtime.preview(latents, sdxl), runtime.preview(latents, pixart)
        sd_preview = runtime.preview(latents, sd15)
        runtime._previewer = preview_vae
        runtime.preview(latents, pixart)
    finally:
        runtime.shutdown(timeout=30)
    assert sdxl_preview is not None and pixart_preview is not None and sd_preview is not None
    assert pixel(pixart_preview) == pixel(sdxl_preview) != pixel(sd_preview)
    assert pixel(sd_preview) == pixel(latents_to_preview(latents))  # SD 1.x's VAE: SD 1.x's map, as ever
    assert told == [LatentSpace.SDXL]


# The first row and the bias of each map, as comfyanonymous/ComfyUI's comfy/latent_formats.py has
# them (its classes SD3 and Flux).
SD3_FIRST, SD3_BIAS = (-0.0922, -0.0175, 0.0749), (0.2394, 0.2135, 0.1925)
FLUX_FIRST, FLUX_BIAS = (-0.0346, 0.0244, 0.0681), (-0.0329, -0.0718, -0.0851)


def sd3_pipe(**vae: Any) -> Any:
    """A stand-in for an SD3 pipeline: its VAE config (SD3's unless `vae` says otherwise)."""
    return SimpleNamespace(transformer=object(),
                           vae=SimpleNamespace(config={"scaling_factor": 1.5305, "shift_factor": 0.0609, **vae}))


def flux_pipe(**vae: Any) -> Any:
    return SimpleNamespace(transformer=object(), vae_scale_factor=8,
                           vae=SimpleNamespace(config={"scaling_factor": 0.3611, "shift_factor": 0.1159, **vae}))


def expected(rgb: tuple[float, ...]) -> tuple[int, int, int]:
    r, g, b = (int((value + 1.0) * 127.5) for value in rgb)
    return (r, g, b)


def latent_of(space: LatentSpace, rgb: tuple[float, float, float]) -> torch.Tensor:
    """A latent pixel its space's map shows as `rgb` (in -1..1): by the map's pseudo-inverse."""
    weights, bias = _local.LATENT_RGB[space]
    shift = torch.tensor(bias or (0.0, 0.0, 0.0))
    return torch.linalg.pinv(torch.tensor(weights).T) @ (torch.tensor(rgb) - shift)


def close(image: Any, xy: tuple[int, int], rgb: tuple[float, float, float]) -> bool:
    """Whether `image` shows `rgb` at `xy`, but for the rounding of the maps' products."""
    return all(abs(got - want) <= 1 for got, want in zip(image.getpixel(xy)[:3], expected(rgb), strict=True))


@pytest.mark.parametrize(("pipe", "first", "bias"), [(sd3_pipe(), SD3_FIRST, SD3_BIAS),
                                                     (flux_pipe(), FLUX_FIRST, FLUX_BIAS)], ids=["sd3", "flux"])
def test_sd3_and_flux_previews_use_their_latent_colours(make_settings: SettingsFactory, pipe: Any,
                                                        first: tuple[float, ...], bias: tuple[float, ...]) -> None:
    """SD3's previews showed the first 3 of its 16 latent channels as colours (a shape, not the
    image's colours); FLUX's got none. Each VAE's config (its `scaling_factor` and `shift_factor`)
    says its latent space, whose map the approximation uses; the latents are read as the pipeline
    denoises them, as the maps' fits read them."""
    latents = torch.zeros(1, 16, 8, 8)
    latents[0, 0] = 1.0  # the first latent channel alone
    runtime = runtime_for(EngineContext(settings=make_settings()))
    try:
        preview = runtime.preview(latents, pipe)
    finally:
        runtime.shutdown(timeout=30)
    assert preview is not None and preview.size == (8, 8)
    assert pixel(preview) == expected(tuple(w + b for w, b in zip(first, bias, strict=True)))


def test_a_known_colour_s_sd3_and_flux_latents_preview_in_that_colour(make_settings: SettingsFactory) -> None:
    """Known by the pipeline's class too where its VAE config does not say (no `shift_factor`)."""
    orange = (0.8, 0.1, -0.6)
    sd3_class = type("StableDiffusion3Pipeline", (), {})
    flux_class = type("FluxPipeline", (), {"vae_scale_factor": 8})
    runtime = runtime_for(EngineContext(settings=make_settings()))
    try:
        for space, pipe in ((LatentSpace.SD3, sd3_pipe()), (LatentSpace.SD3, sd3_class()),
                            (LatentSpace.FLUX, flux_pipe()), (LatentSpace.FLUX, flux_class())):
            assert _local.latent_space(pipe) is space
            latents = latent_of(space, orange)[None, :, None, None].repeat(1, 1, 4, 6)
            if space is LatentSpace.FLUX:
                from diffusers import FluxPipeline

                latents = FluxPipeline._pack_latents(latents, 1, 16, 4, 6)
            preview = runtime.preview(latents, pipe, size=(48, 32))
            assert preview is not None and preview.size == (6, 4) and close(preview, (0, 0), orange), (space, pipe)
    finally:
        runtime.shutdown(timeout=30)
    assert _local.latent_space(type("Flux2Pipeline", (), {})()) is LatentSpace.SD  # 32 channels: not FLUX.1's


def packed_flux_latents(width: int, height: int, rgb: dict[str, tuple[float, float, float]]) -> torch.Tensor:
    """FLUX latents of a `width` x `height` image, its top-left quarter `rgb["corner"]` and the rest
    `rgb["rest"]`, packed by FLUX's own pipeline, as its steps hand them to the callback."""
    from diffusers import FluxPipeline

    rows, columns = height // 8, width // 8
    latents = latent_of(LatentSpace.FLUX, rgb["rest"])[None, :, None, None].repeat(2, 1, rows, columns)
    latents[:, :, : rows // 2, : columns // 2] = latent_of(LatentSpace.FLUX, rgb["corner"])[None, :, None, None]
    return FluxPipeline._pack_latents(latents, 2, 16, rows, columns)


class ImageProgress(RecordingProgress):
    """Keeps each step's preview image (None where the step has none) in `previews`."""

    def __init__(self) -> None:
        super().__init__()
        self.previews: list[Any] = []

    def step(self, step: int, total: int, preview: Any = None) -> None:
        super().step(step, total, preview)
        self.previews.append(preview)


def test_flux_s_packed_latents_are_previewed_the_right_way_up(make_settings: SettingsFactory) -> None:
    """Unpacked as its pipeline unpacks them for its decode, by the image's size: a wide image's
    preview is wide, its top left is top left. Without the size, no preview (64 tokens may be 8x8
    or 4x16)."""
    colours = {"corner": (0.9, -0.5, -0.5), "rest": (-0.5, -0.3, 0.9)}
    packed = packed_flux_latents(256, 64, colours)
    assert packed.shape == (2, 64, 64)
    runtime = runtime_for(EngineContext(settings=make_settings()))
    progress = ImageProgress()
    previews = progress.previews

    try:
        on_step = runtime.step_callback(progress, CancelToken(), done=0, passes=1, planned=1,
                                        size=(256, 64))
        on_step(flux_pipe(), 0, None, {"latents": packed})
        tall = runtime.preview(packed_flux_latents(64, 256, colours), flux_pipe(), size=(64, 256))
        unsized = runtime.preview(packed, flux_pipe())
        misfit = runtime.preview(packed, flux_pipe(), size=(256, 256))
    finally:
        runtime.shutdown(timeout=30)
    [wide] = previews
    assert wide is not None and wide.size == (32, 8)
    assert close(wide, (0, 0), colours["corner"]) and close(wide, (15, 3), colours["corner"])
    assert close(wide, (16, 0), colours["rest"]) and close(wide, (0, 4), colours["rest"])
    assert close(wide, (31, 7), colours["rest"])
    assert tall is not None and tall.size == (8, 32)
    assert close(tall, (0, 0), colours["corner"]) and close(tall, (3, 15), colours["corner"])
    assert close(tall, (4, 0), colours["rest"]) and close(tall, (0, 16), colours["rest"])
    assert unsized is None and misfit is None


def test_a_16_channel_preview_vae_decodes_sd3_s_and_flux_s_latents(make_settings: SettingsFactory,
                                                                   tmp_path: Path) -> None:
    """A TAESD of SD3 or FLUX (taesd3, taef1: 16 latent channels) as ORCH_LITE_PREVIEW_VAE: SD3's
    latents as they are, FLUX's unpacked first. Packed, a decode failed at each step, and after 3
    the approximation took over, which had no preview for them either; unpacked, they decode at the
    image's size. Packed latents it cannot unpack (no size) are not given it: no failure counted."""
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taef1"
    channels = (8, 8, 8, 8)
    AutoencoderTiny(latent_channels=16, encoder_block_out_channels=channels,  # type: ignore[attr-defined]
                    decoder_block_out_channels=channels, num_encoder_blocks=(1, 1, 1, 1),
                    num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(folder)
    runtime = runtime_for(EngineContext(settings=make_settings(lite_preview_vae=str(folder))))
    runtime._load_previewer()  # as a load of the Lite model does
    colours = {"corner": (0.9, -0.5, -0.5), "rest": (-0.5, -0.3, 0.9)}
    try:
        flux = [runtime.preview(packed_flux_latents(256, 64, colours), flux_pipe(), size=(256, 64))
                for _ in range(_local.PREVIEW_VAE_FAILURES)]
        sd3 = runtime.preview(torch.randn(1, 16, 8, 32), sd3_pipe())
        unsized = runtime.preview(packed_flux_latents(256, 64, colours), flux_pipe())
        failures = runtime._preview_failures
    finally:
        runtime.shutdown(timeout=30)
    assert all(preview is not None and preview.size == (256, 64) for preview in flux)  # the decode's: 8x the latents
    assert sd3 is not None and sd3.size == (256, 64)
    assert unsized is None and failures == 0


async def test_a_draft_s_previews_are_made_for_its_pipeline(load: Engines, tiny_copy: Callable[[str], Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """And told the size rendered, (width, height), which FLUX's packed latents are unpacked by:
    a draft's, a bridge's (each tile's, for a polish)."""
    lite, hifi = load(str(tiny_copy("sd15")))
    seen: list[Any] = []

    def preview(latents: Any, pipe: Any = None, *, size: tuple[int, int] | None = None) -> None:
        seen.append((type(pipe).__name__, size))

    monkeypatch.setattr(lite.runtime, "preview", preview)
    await lite.run(draft(steps=2, width=128, height=64), RecordingProgress(), CancelToken())
    assert seen == [("StableDiffusionPipeline", (128, 64))] * 2
    seen.clear()
    await hifi.run(RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=128, seed=1, n=1, steps=2,
                                 init_image=draft_image((64, 128)), strength=1.0), RecordingProgress(), CancelToken())
    assert seen and all(told == ("StableDiffusionImg2ImgPipeline", (64, 128)) for told in seen)


def test_two_runtimes_of_one_process_load_at_once(make_settings: SettingsFactory) -> None:
    """diffusers' low-memory load patches torch's module constructor for the whole process: two
    runtimes loading together (two devices, or a test's server beside a module's) left modules on
    the meta device ("Cannot copy out of meta tensor") and the patch in place for good."""
    import threading

    original = torch.nn.Module.register_parameter
    runtimes = [_local.LocalRuntime(make_settings(torch_threads=1)) for _ in range(2)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def load(runtime: _local.LocalRuntime) -> None:
        start.wait()
        try:
            runtime._executor.submit(runtime.text2img, tiny.NAME).result()
        except BaseException as exc:
            errors.append(exc)

    try:
        for _ in range(3):
            threads = [threading.Thread(target=load, args=(runtime,)) for runtime in runtimes]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert errors == []
            assert torch.nn.Module.register_parameter is original
            assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
            for runtime in runtimes:
                runtime._pipes.clear()  # loaded again in the next round
    finally:
        for runtime in runtimes:
            runtime.shutdown(5)


async def test_a_model_link_moved_to_another_model_unloads_the_old_one(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path) -> None:
    """Deploying a model by moving a link: the next draft loaded the new target, and the old one's
    pipelines (text-to-image and image-to-image) stayed on the device for good."""
    import weakref

    old, new = tiny_copy("sd15-v1"), tiny_copy("sd15-v2")
    link = tmp_path / "models" / "current"
    link.symlink_to(old, target_is_directory=True)
    lite, _ = load(str(link))
    await lite.run(draft(), RecordingProgress(), CancelToken())
    await lite.runtime.call(lite.runtime.img2img, str(link))  # local-hifi's, on the same setting
    assert set(lite.runtime._pipes) == {(str(old.resolve()), "text2img"), (str(old.resolve()), "img2img")}
    unloaded = weakref.ref(lite.runtime._pipes[(str(old.resolve()), "text2img")])
    link.unlink()
    link.symlink_to(new, target_is_directory=True)
    result = await lite.run(draft(), RecordingProgress(), CancelToken())
    assert set(lite.runtime._pipes) == {(str(new.resolve()), "text2img")} and unloaded() is None
    assert result.model == str(link)  # as the job records it: the name the operator gave the model


async def test_a_moved_link_keeps_the_old_model_another_setting_names(
        engines: EngineFactory, tiny_copy: Callable[[str], Path], tmp_path: Path) -> None:
    old, new = tiny_copy("sd15-v1"), tiny_copy("sd15-v2")
    link = tmp_path / "models" / "current"
    link.symlink_to(old, target_is_directory=True)
    lite, hifi = engines(lite_model=str(link), hifi_model=str(old), lite_device="cpu")
    await lite.run(draft(), RecordingProgress(), CancelToken())
    await hifi.runtime.call(hifi.runtime.img2img, hifi.model)
    link.unlink()
    link.symlink_to(new, target_is_directory=True)
    await lite.run(draft(), RecordingProgress(), CancelToken())
    kept, loaded = str(old.resolve()), str(new.resolve())
    assert set(lite.runtime._pipes) == {(kept, "text2img"), (kept, "img2img"), (loaded, "text2img")}


def test_a_moved_link_s_model_defaults_are_read_again(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = tiny_copy("lite-v1"), tiny_copy("lite-v2")  # names that tell nothing: read from the files
    index = json.loads((new / "model_index.json").read_text())
    (new / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    link = tmp_path / "models" / "current"
    link.symlink_to(old, target_is_directory=True)
    lite, _ = load(str(link))
    assert lite.defaults.told_by == "files" and lite.defaults.steps == 25
    link.unlink()
    link.symlink_to(new, target_is_directory=True)
    monkeypatch.setattr(_local, "DEFAULTS_RECHECK_SECONDS", 0.0)  # a while later
    assert lite.defaults.steps == 30 and lite.defaults.guidance_scale == 5.0  # SDXL's


async def test_a_model_folder_gone_since_start_is_said_gone_not_blamed_on_the_hub(
        load: Engines, tiny_copy: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_copy("sd15-on-a-share")
    lite, _ = load(str(folder))
    assert lite.availability() == (True, None)
    shutil.rmtree(folder)  # the share unmounted
    asked: list[float] = []

    def silent(timeout: float = 1.5, file: str | None = None) -> bool:
        asked.append(timeout)
        return False

    monkeypatch.setattr(_local, "hf_hub_reachable", silent)
    with pytest.raises(EngineUnavailable) as info:
        await lite.run(draft(), RecordingProgress(), CancelToken())
    assert info.value.message == ("could not load model 'sd15-on-a-share': it is a path to nothing now: no such "
                                  "file or folder (moved, or on a share not mounted?)")
    assert asked == []


async def test_a_loaded_model_whose_path_is_gone_a_while_stays_loaded(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path) -> None:
    folder = tiny_copy("sd15")
    link = tmp_path / "models" / "mounted"
    link.symlink_to(folder, target_is_directory=True)
    lite, _ = load(str(link))
    await lite.run(draft(), RecordingProgress(), CancelToken())
    loaded = lite.runtime._pipes[(str(folder.resolve()), "text2img")]
    link.unlink()  # unmounted a while
    with pytest.raises(EngineUnavailable, match="a path to nothing now"):
        await lite.run(draft(), RecordingProgress(), CancelToken())
    link.symlink_to(folder, target_is_directory=True)
    await lite.run(draft(), RecordingProgress(), CancelToken())  # back: no new load
    assert lite.runtime._pipes[(str(folder.resolve()), "text2img")] is loaded


async def test_a_model_no_setting_resolves_to_now_is_unloaded_though_another_setting_led_there_last(
        engines: EngineFactory, tiny_copy: Callable[[str], Path], tmp_path: Path) -> None:
    # Both links moved, and only the Lite model ran since: the old model was kept for the
    # local-hifi setting's last look, which may never come again.
    old, new = tiny_copy("sd15-v1"), tiny_copy("sd15-v2")
    lite_link, hifi_link = tmp_path / "models" / "lite-current", tmp_path / "models" / "hifi-current"
    for link in (lite_link, hifi_link):
        link.symlink_to(old, target_is_directory=True)
    lite, hifi = engines(lite_model=str(lite_link), hifi_model=str(hifi_link), lite_device="cpu")
    await lite.run(draft(), RecordingProgress(), CancelToken())
    await hifi.runtime.call(hifi.runtime.img2img, hifi.model)
    for link in (lite_link, hifi_link):
        link.unlink()
        link.symlink_to(new, target_is_directory=True)
    await lite.run(draft(), RecordingProgress(), CancelToken())
    assert set(lite.runtime._pipes) == {(str(new.resolve()), "text2img")}


async def test_a_moved_link_keeps_the_model_a_setting_names_before_its_first_job(
        engines: EngineFactory, tiny_copy: Callable[[str], Path], tmp_path: Path) -> None:
    old, new = tiny_copy("sd15-v1"), tiny_copy("sd15-v2")
    link = tmp_path / "models" / "current"
    link.symlink_to(old, target_is_directory=True)
    lite, _ = engines(lite_model=str(link), hifi_model=str(old), lite_device="cpu")  # local-hifi not run yet
    await lite.run(draft(), RecordingProgress(), CancelToken())
    link.unlink()
    link.symlink_to(new, target_is_directory=True)
    await lite.run(draft(), RecordingProgress(), CancelToken())
    assert (str(old.resolve()), "text2img") in lite.runtime._pipes  # its polish needs no new load


async def test_a_relative_model_path_gone_is_said_gone_and_its_model_kept(
        load: Engines, tiny_copy: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `share/sd15` reads like a Hub id: unmounted, its model was unloaded and the Hub blamed.
    folder = tiny_copy("sd15")
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "share" / "sd15"
    link.parent.mkdir()
    link.symlink_to(folder, target_is_directory=True)
    lite, _ = load("share/sd15")
    await lite.run(draft(), RecordingProgress(), CancelToken())
    loaded = lite.runtime._pipes[(str(folder.resolve()), "text2img")]
    link.unlink()
    monkeypatch.setattr(_local, "hf_hub_reachable", lambda timeout=1.5, file=None: False)
    with pytest.raises(EngineUnavailable, match="a path to nothing now"):
        await lite.run(draft(), RecordingProgress(), CancelToken())
    link.symlink_to(folder, target_is_directory=True)
    await lite.run(draft(), RecordingProgress(), CancelToken())
    assert lite.runtime._pipes[(str(folder.resolve()), "text2img")] is loaded


def tiny_transformer_pipeline(family: str, folder: Path) -> Any:
    """A random FLUX.1 or SD3 pipeline of diffusers' own classes, built offline as small as they
    go, with a VAE of 16 latent channels and its family's scaling and shift. The T5 encoder is
    given a CLIP tokenizer (the tiny model's vocabulary): it only needs token ids."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(0)
    vocab, merges = tiny._vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")

    def tokenizer() -> Any:
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)

    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=1, vocab_size=600, max_position_embeddings=77,
                          projection_dim=32)
    t5 = T5EncoderModel(T5Config(vocab_size=600, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))
    scale, shift = (0.3611, 0.1159) if family == "flux" else (1.5305, 0.0609)
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8,
                        scaling_factor=scale, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)
    transformer: Any
    if family == "flux":
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=CLIPTextModel(clip),
                            tokenizer=tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer(), transformer=transformer)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=CLIPTextModelWithProjection(clip), tokenizer=tokenizer(),
                                    text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=tokenizer(),
                                    text_encoder_3=t5, tokenizer_3=tokenizer(), transformer=transformer)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_flux_or_sd3_pipeline_s_steps_are_previewed_in_its_colours_the_right_way_up(
        make_settings: SettingsFactory, tmp_path: Path, family: str) -> None:
    """diffusers' own FLUX and SD3 pipelines, through the step callback: each step's preview is
    the image's shape (wide, tall), an eighth of its size, and the last one is the map of the
    latents the pipeline returns, as it unpacks them for its decode (`FluxPipeline._unpack_latents`)."""
    from diffusers import FluxPipeline

    pipe = tiny_transformer_pipeline(family, tmp_path)
    space = LatentSpace.FLUX if family == "flux" else LatentSpace.SD3
    runtime = runtime_for(EngineContext(settings=make_settings()))
    progress = ImageProgress()
    previews = progress.previews

    try:
        for width, height in ((256, 128), (128, 256)):
            previews.clear()
            on_step = runtime.step_callback(progress, CancelToken(), done=0, passes=1,
                                            planned=2, size=(width, height))
            with torch.inference_mode():
                out = pipe(prompt="a lighthouse", num_inference_steps=2, width=width, height=height,
                           guidance_scale=1.0, max_sequence_length=16, output_type="latent",
                           generator=torch.Generator("cpu").manual_seed(1), **_local.step_arguments(pipe, on_step))
            latents = out.images
            assert latents.dim() == (3 if family == "flux" else 4)  # FLUX's are packed
            if family == "flux":
                latents = FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            assert len(previews) == 2 and all(p is not None and p.size == (width // 8, height // 8) for p in previews)
            decoded = latents_to_preview(latents, space=space)
            assert decoded is not None and previews[-1].tobytes() == decoded.tobytes()
    finally:
        runtime.shutdown(timeout=30)


def test_a_preview_vae_of_another_family_is_refused_at_its_load(make_settings: SettingsFactory, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """SD 1.x's TAESD (4 latent channels) named for a FLUX model (16): loaded, it failed a decode
    at each of the first 3 steps (the device waiting on each) before the approximation took over.
    It is refused at its load now, saying why, and the approximation previews every step."""
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taesd"
    channels = (8, 8, 8, 8)
    AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,  # type: ignore[attr-defined]
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(folder)
    runtime = runtime_for(EngineContext(settings=make_settings(lite_preview_vae=str(folder))))
    colours = {"corner": (0.9, -0.5, -0.5), "rest": (-0.5, -0.3, 0.9)}
    try:
        with caplog.at_level(logging.WARNING, logger="tiers._local"):
            runtime._load_previewer(flux_pipe(latent_channels=16))  # as a load of the Lite model does
        refused = runtime._previewer is _local.latents_to_preview
        preview = runtime.preview(packed_flux_latents(64, 64, colours), flux_pipe(latent_channels=16), size=(64, 64))
    finally:
        runtime.shutdown(timeout=30)
    assert refused and preview is not None and preview.size == (8, 8)
    [said] = [r.getMessage() for r in caplog.records if "ORCH_LITE_PREVIEW_VAE" in r.getMessage()]
    assert "latents of 4 channels, the Lite model's have 16" in said
