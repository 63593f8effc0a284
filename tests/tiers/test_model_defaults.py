"""Per-model defaults of the local engines: from the model's name, else from its files."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import BadEngineInput
from tests.tiers.conftest import EngineFactory
from tests.tiers.test_local_loading import draft, hub_cache
from tests.tiers.test_local_single_file import EPSILON_CONFIG, V_CONFIG
from tiers._family import ModelDefaults, few_step_scheduler, model_defaults

# SD3 and FLUX patch their latents: sizes in multiples of 16.
TRANSFORMER = ModelDefaults(steps=28, guidance_scale=3.5, native_size=1024, size_multiple=16)
TRANSFORMER_FAST = ModelDefaults(steps=4, guidance_scale=0.0, native_size=1024, size_multiple=16)
TURBO = ModelDefaults(steps=2, guidance_scale=0.0, native_size=512, few_step=True)


@pytest.mark.parametrize(("model", "expected"), [
    ("stabilityai/sd-turbo", TURBO),
    ("stabilityai/sdxl-turbo", TURBO),  # trained at 512
    ("ByteDance/SDXL-Lightning", ModelDefaults(steps=4, guidance_scale=0.0, native_size=1024, few_step=True)),
    # Latent consistency pipelines compute w = guidance - 1: guidance 0 would be w = -1.
    ("SimianLuo/LCM_Dreamshaper_v7", ModelDefaults(steps=4, guidance_scale=8.5, native_size=512, lcm=True)),
    # One file is loaded into its family's UNet, without LCM's guidance embedding (an LCM-LoRA
    # merge): guidance 1, no classifier-free guidance, which at 8.5 burnt the image.
    ("stabilityai/stable-diffusion-xl-base-1.0", ModelDefaults(steps=30, guidance_scale=5.0, native_size=1024)),
    ("stabilityai/stable-diffusion-2-1", ModelDefaults(steps=25, guidance_scale=7.5, native_size=768)),
    # Only the model's own name counts: "alexl" in the folder is not "xl".
    ("/home/alexl/models/v1-5-pruned-emaonly.safetensors",
     ModelDefaults(steps=25, guidance_scale=7.5, native_size=512)),
    ("/models/dreamshaper_xl.safetensors", ModelDefaults(steps=30, guidance_scale=5.0, native_size=1024)),
    # A Hugging Face cache folder is named by its repository, not by the snapshot's hash.
    ("/root/.cache/huggingface/hub/models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/462165984030",
     ModelDefaults(steps=30, guidance_scale=5.0, native_size=1024)),
    ("stabilityai/stable-diffusion-2-1-base", ModelDefaults(steps=25, guidance_scale=7.5, native_size=512)),
    ("stabilityai/stable-diffusion-3.5-large-turbo", TRANSFORMER_FAST),
    ("stabilityai/stable-diffusion-3.5-medium", TRANSFORMER),
    ("black-forest-labs/FLUX.1-schnell", TRANSFORMER_FAST),
    ("black-forest-labs/FLUX.1-dev", TRANSFORMER),
    # Names that only look like a family: an SD 1.5 model called hyperRealism, an SDXL turbo fine-tune.
    ("/models/hyperRealism_30.safetensors", ModelDefaults(steps=25, guidance_scale=7.5, native_size=512)),
    # "xl" inside a word is not SDXL.
    ("studio/foxlight-v2", ModelDefaults(steps=25, guidance_scale=7.5, native_size=512)),
    ("/models/juggernautXL_v9.safetensors", ModelDefaults(steps=30, guidance_scale=5.0, native_size=1024)),
    ("ByteDance/Hyper-SD", ModelDefaults(steps=4, guidance_scale=0.0, native_size=512, few_step=True)),
    ("/models/dreamshaperXL_turbo.safetensors", ModelDefaults(steps=2, guidance_scale=0.0, native_size=1024,
                                                                few_step=True)),
    ("/models/sd_xl_turbo_1.0_fp16.safetensors", TURBO),
    # Lightning and Hyper-SD files name the steps they were distilled for.
    ("/models/sdxl_lightning_2step.safetensors", ModelDefaults(steps=2, guidance_scale=0.0, native_size=1024,
                                                              few_step=True)),
    ("/models/sdxl_lightning_1step_x0.safetensors", ModelDefaults(steps=1, guidance_scale=0.0, native_size=1024,
                                                                 few_step=True)),
    ("/models/Hyper-SDXL-8steps.safetensors", ModelDefaults(steps=8, guidance_scale=0.0, native_size=1024,
                                                           few_step=True)),
])
def test_model_defaults(model: str, expected: ModelDefaults) -> None:
    assert model_defaults(model) == expected


def test_a_few_step_single_file_gets_a_schedule_that_starts_from_noise() -> None:
    """A single file is given its base family's scheduler: SD 2.1's (DDIM, "leading", v-prediction)
    for sd_turbo.safetensors. At 2 steps that starts at t=501; SD-Turbo is an epsilon model
    trained to start at t=999."""
    from diffusers import DDIMScheduler

    given = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    given.set_timesteps(2)  # type: ignore[attr-defined]
    assert given.timesteps.tolist() == [501, 1]  # type: ignore[attr-defined]
    fixed = few_step_scheduler(given, "/models/sd_turbo.safetensors")
    fixed.set_timesteps(2)
    assert fixed.timesteps.tolist() == [999, 499]
    assert fixed.config.prediction_type == "epsilon"
    assert (fixed.config.beta_start, fixed.config.beta_end) == (0.00085, 0.012)  # the family's betas kept


def test_the_one_step_lightning_file_predicts_the_image_not_the_noise() -> None:
    from diffusers import EulerDiscreteScheduler

    given = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert few_step_scheduler(given, "/m/sdxl_lightning_1step_x0.safetensors").config.prediction_type == "sample"
    assert few_step_scheduler(given, "/m/sdxl_lightning_4step.safetensors").config.prediction_type == "epsilon"


SDXL = ModelDefaults(steps=30, guidance_scale=5.0, native_size=1024)
SD15 = ModelDefaults(steps=25, guidance_scale=7.5, native_size=512)
Folder = Callable[..., Path]


@pytest.fixture
def diffusers_folder(tmp_path: Path) -> Folder:
    """A diffusers folder's configuration files (no weights): `configs` maps a file under the
    folder to its JSON."""
    def make(name: str, pipeline: str, **configs: dict[str, Any]) -> Path:
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        # The components whose configs are given (a download that got them all).
        components = {file.split("__")[0]: ["diffusers", "X"] for file in configs}
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}))
        for file, config in configs.items():
            path = folder / file.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config))
        return folder

    return make


def safetensors_file(path: Path, keys: list[str]) -> Path:
    """A safetensors file whose header names `keys` (one float each)."""
    header = {key: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, key in enumerate(keys)}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(4 * len(keys)))
    return path


@pytest.mark.parametrize(("pipeline", "configs", "expected"), [
    # An SDXL fine-tune whose name says nothing of it (Playground v2.5 is SDXL's pipeline).
    ("StableDiffusionXLPipeline", {"unet__config.json": {"sample_size": 128}}, SDXL),
    ("StableDiffusionXLPipeline", {}, SDXL),
    # SD 2.1's 768 px v-prediction model: its UNet works on 96x96 latents.
    ("StableDiffusionPipeline", {"unet__config.json": {"sample_size": 96}}, ModelDefaults(25, 7.5, 768)),
    ("StableDiffusionPipeline", {"unet__config.json": {"sample_size": 64}}, SD15),
    # LCM-SDXL: LCM's scheduler and a UNet distilled with its guidance embedding.
    ("StableDiffusionXLPipeline", {"scheduler__scheduler_config.json": {"_class_name": "LCMScheduler"},
                                   "unet__config.json": {"time_cond_proj_dim": 256}},
     ModelDefaults(steps=4, guidance_scale=8.5, native_size=1024, lcm=True)),
    # Merged with LCM-LoRA: LCM's scheduler, the base UNet; its guidance is classifier-free.
    ("StableDiffusionXLPipeline", {"scheduler__scheduler_config.json": {"_class_name": "LCMScheduler"},
                                   "unet__config.json": {"sample_size": 128, "time_cond_proj_dim": None}},
     ModelDefaults(steps=4, guidance_scale=1.0, native_size=1024, lcm=True)),
    ("LatentConsistencyModelPipeline", {}, ModelDefaults(steps=4, guidance_scale=8.5, native_size=512, lcm=True)),
    ("StableDiffusion3Pipeline", {}, TRANSFORMER),
    ("FluxPipeline", {"transformer__config.json": {"guidance_embeds": True}}, TRANSFORMER),  # FLUX.1-dev
    ("FluxPipeline", {"transformer__config.json": {"guidance_embeds": False}}, TRANSFORMER_FAST),  # schnell
    # A pipeline of a family the defaults do not know: SD 1.5's guess, settled.
    ("KandinskyV22Pipeline", {}, SD15),
])
def test_a_folder_whose_name_says_nothing_is_read_from_its_configuration(
        diffusers_folder: Folder, pipeline: str, configs: dict[str, Any], expected: ModelDefaults) -> None:
    defaults = model_defaults(str(diffusers_folder("lite-v2", pipeline, **configs)))
    assert defaults == expected
    assert defaults.told_by == "files"


@pytest.mark.parametrize(("pipeline", "unet", "guidance"), [
    ("LatentConsistencyModelPipeline", {}, 8.5),  # SimianLuo's LCM_Dreamshaper_v7
    ("StableDiffusionPipeline", {"time_cond_proj_dim": 256}, 8.5),  # an LCM-distilled UNet
    ("StableDiffusionPipeline", {"sample_size": 64}, 1.0),  # merged with LCM-LoRA
])
def test_an_lcm_model_by_its_name_has_its_guidance_read_from_its_unet(
        diffusers_folder: Folder, pipeline: str, unet: dict[str, Any], guidance: float) -> None:
    """The name says LCM; only the files say whether the guidance is embedded (8.5, w = 7.5) or
    classifier-free, where 8.5 burns the image."""
    folder = diffusers_folder("dreamshaper-8-lcm", pipeline, **{"unet__config.json": unet})
    defaults = model_defaults(str(folder))
    assert defaults == ModelDefaults(steps=4, guidance_scale=guidance, native_size=512, lcm=True)
    assert defaults.told_by == "name"


@pytest.mark.parametrize(("name", "native"), [("dreamshaper_8_lcm.safetensors", 512),
                                              ("juggernautXL_lcm.safetensors", 1024)])
def test_an_lcm_single_file_is_a_merge_without_guidance(tmp_path: Path, name: str, native: int) -> None:
    checkpoint = safetensors_file(tmp_path / name, ["model.diffusion_model.out.0.weight"])
    assert model_defaults(str(checkpoint)) == ModelDefaults(steps=4, guidance_scale=1.0, native_size=native, lcm=True)


def test_an_lcm_model_whose_unet_is_not_there_yet_is_read_again(diffusers_folder: Folder) -> None:
    folder = diffusers_folder("lcm-house", "StableDiffusionPipeline", **{"unet__config.json": {}})
    (folder / "unet" / "config.json").unlink()
    defaults = model_defaults(str(folder))
    assert defaults.guidance_scale == 8.5 and defaults.told_by == "nothing"
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 64}))
    defaults = model_defaults(str(folder))
    assert defaults.guidance_scale == 1.0 and defaults.told_by == "name"


@pytest.mark.parametrize(("name", "guided", "expected"), [
    ("flux", False, TRANSFORMER_FAST), ("FLUX.1-dev-local", False, TRANSFORMER_FAST), ("flux", True, TRANSFORMER),
    ("flux-schnell", True, TRANSFORMER_FAST),  # the name says schnell: taken as said
])
def test_a_flux_folder_is_told_dev_or_schnell_by_its_transformer(diffusers_folder: Folder, name: str, guided: bool,
                                                                  expected: ModelDefaults) -> None:
    """`~/models/flux` holding FLUX.1-schnell got dev's 28 steps at guidance 3.5 (7x the work, and a
    guidance the pipeline never passes recorded)."""
    folder = diffusers_folder(name, "FluxPipeline", **{"transformer__config.json": {"guidance_embeds": guided}})
    assert model_defaults(str(folder)) == expected


def test_a_flux_folder_whose_files_are_not_there_yet_is_read_again(diffusers_folder: Folder) -> None:
    """Read as dev by its name while a copy was under way, a schnell folder kept 28 steps."""
    folder = diffusers_folder("flux", "FluxPipeline", **{"transformer__config.json": {}})
    (folder / "transformer" / "config.json").unlink()
    assert model_defaults(str(folder)).told_by == "nothing"
    (folder / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    defaults = model_defaults(str(folder))
    assert defaults == TRANSFORMER_FAST and defaults.told_by == "files"


def test_the_name_comes_before_the_files(diffusers_folder: Folder) -> None:
    """Only the name tells a distilled model from its base: SDXL-Turbo's folder says SDXL."""
    folder = diffusers_folder("sdxl-turbo", "StableDiffusionXLPipeline", **{"unet__config.json": {"sample_size": 128}})
    assert model_defaults(str(folder)) == TURBO


@pytest.mark.parametrize(("index", "told_by"), [("{not json", "nothing"), ("[1, 2]", "nothing"),
                                               ('{"_class_name": 7}', "files")])
def test_a_folder_with_a_damaged_index_gets_the_guess(tmp_path: Path, index: str, told_by: str) -> None:
    folder = tmp_path / "house-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(index)
    defaults = model_defaults(str(folder))
    assert defaults == SD15 and defaults.told_by == told_by


def test_a_download_that_has_only_the_index_yet_is_read_again(diffusers_folder: Folder) -> None:
    """A download fetches model_index.json first: FLUX schnell without its transformer's config
    reads as dev, which must not be the last word."""
    folder = diffusers_folder("house-0", "FluxPipeline")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    assert model_defaults(str(folder)).told_by == "nothing"
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    defaults = model_defaults(str(folder))
    assert defaults == TRANSFORMER_FAST and defaults.told_by == "files"


@pytest.mark.parametrize(("keys", "expected", "told_by"), [
    (["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.out.0.weight"], SDXL, "files"),
    (["cond_stage_model.model.ln_final.weight", "model.diffusion_model.out.0.weight"], ModelDefaults(25, 7.5, 768),
     "files"),
    (["cond_stage_model.transformer.text_model.final_layer_norm.weight", "model.diffusion_model.out.0.weight"], SD15,
     "files"),  # SD 1.x: settled
])
def test_a_single_file_is_told_by_its_tensors_names(tmp_path: Path, keys: list[str], expected: ModelDefaults,
                                                    told_by: str) -> None:
    defaults = model_defaults(str(safetensors_file(tmp_path / "juggernaut.safetensors", keys)))
    assert defaults == expected
    assert defaults.told_by == told_by


SD2_KEYS = ["cond_stage_model.model.ln_final.weight", "model.diffusion_model.out.0.weight"]


@pytest.mark.parametrize(("name", "keys", "sidecar", "native", "told_by"), [
    # The loader samples a 2.x file with an LDM config that leaves out `parameterization` as a
    # 2.x-base (epsilon) model, made at 512 px; with "v" as 2.1's 768 px model.
    ("v2-1_512-ema-pruned", SD2_KEYS, ("yaml", EPSILON_CONFIG), 512, "files"),
    ("v2-1_512-ema-pruned", SD2_KEYS, ("yml", EPSILON_CONFIG), 512, "files"),
    ("v2-1_768-ema-pruned", SD2_KEYS, ("yaml", V_CONFIG), 768, "files"),
    # Without one, or with one the load ignores (with a warning), it is read as 2.1's v-prediction model...
    ("dreamy_v20", SD2_KEYS, None, 768, "files"),
    ("dreamy_v20", SD2_KEYS, ("yaml", "model:\n  params: [unclosed\n"), 768, "files"),
    ("dreamy_v20", SD2_KEYS, ("yaml", "model:\n  params:\n    parameterization: x0\n"), 768, "files"),
    # ... unless its name says which, as Stability's do: 512 or base is 2.x-base, 768 or v is 2.1's.
    ("v2-1_512-ema-pruned", SD2_KEYS, None, 512, "name"),
    ("512-base-ema", SD2_KEYS, None, 512, "name"),
    ("sd2-base", SD2_KEYS, None, 512, "name"),
    ("v2-1_512-ema-pruned", SD2_KEYS, ("yaml", "model:\n  params: [unclosed\n"), 512, "name"),
    ("768-v-ema", SD2_KEYS, None, 768, "name"),
    ("v2-1_768-ema-pruned", SD2_KEYS, None, 768, "name"),
    ("base_768", SD2_KEYS, None, 768, "files"),  # says both: as if it said neither
    ("realvision_v_2", SD2_KEYS, None, 768, "files"),  # a lone v is no word of Stability's
    ("stable-diffusion-2-1-base", SD2_KEYS, None, 512, "name"),
    ("v2-1_768-ema-pruned", SD2_KEYS, ("yaml", EPSILON_CONFIG), 512, "files"),  # the config comes first
    # A name that says 2.x is 2.1's size unless the config beside the file says otherwise.
    ("stable-diffusion-2-1", SD2_KEYS, ("yaml", EPSILON_CONFIG), 512, "files"),
    ("stable-diffusion-2-1", SD2_KEYS, None, 768, "name"),
    # A few-step file's name comes first, as at its load; other families have no such config to read.
    ("sd_turbo", SD2_KEYS, ("yaml", V_CONFIG), 512, "name"),
    ("house", ["conditioner.embedders.1.model.ln_final.weight"], ("yaml", V_CONFIG), 1024, "files"),
    ("house", ["cond_stage_model.transformer.text_model.final_layer_norm.weight", "model.diffusion_model.out.0.weight"],
     ("yaml", V_CONFIG), 512, "files"),
])
def test_an_sd2_file_is_the_size_the_ldm_config_beside_it_says(
        tmp_path: Path, name: str, keys: list[str], sidecar: tuple[str, str] | None, native: int,
        told_by: str) -> None:
    """A 2.x-base file with its config got SD 2.1's 768 px while its load sampled it as the
    512 px epsilon model: the two have the same tensors."""
    checkpoint = safetensors_file(tmp_path / f"{name}.safetensors", keys)
    if sidecar is not None:
        suffix, text = sidecar
        (tmp_path / f"{name}.{suffix}").write_text(text)
    defaults = model_defaults(str(checkpoint))
    assert defaults.native_size == native
    assert defaults.told_by == told_by


def test_a_folder_named_as_sd2_reads_no_config_beside_it(tmp_path: Path) -> None:
    """Only a single file has its LDM config beside it: a diffusers folder says its size itself."""
    folder = tmp_path / "stable-diffusion-2-1"
    folder.mkdir()
    (tmp_path / "stable-diffusion-2-1.yaml").write_text(EPSILON_CONFIG)
    assert model_defaults(str(folder)).native_size == 768


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 10_000) + b"{}", struct.pack("<Q", 1 << 62),
                                     struct.pack("<Q", 2) + b"\xff\xfe"])
def test_a_damaged_or_half_copied_single_file_gets_the_guess_for_now(tmp_path: Path, content: bytes) -> None:
    damaged = tmp_path / "house.safetensors"
    damaged.write_bytes(content)
    defaults = model_defaults(str(damaged))
    assert defaults == SD15 and defaults.told_by == "nothing"


def test_an_empty_model_file_leaves_the_engines_to_say_why_at_the_load(engines: EngineFactory,
                                                                       tmp_path: Path) -> None:
    """Reading its defaults raised, and both local engines were broken for good with "unpack
    requires a buffer of 8 bytes", where the load says what is wrong and is tried again."""
    empty = tmp_path / "house.safetensors"
    empty.write_bytes(b"")
    lite, hifi = engines(lite_model=str(empty))
    assert lite.defaults == hifi.defaults == SD15


def test_a_hub_model_is_read_from_its_cached_snapshot_once_downloaded(
        engines: EngineFactory, diffusers_folder: Folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not cached at start: SD 1.5's guess, looked at again until its first load has downloaded
    it. Then a FLUX model's sizes must be multiples of 16, as its pipeline would otherwise round
    a 72 px request down without a word."""
    import huggingface_hub.constants

    from tiers import _local

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    lite, _ = engines(lite_model="acme/house-model", local_max_size=256)
    read_again: list[str] = []
    monkeypatch.setattr(_local, "model_defaults", lambda model: read_again.append(model) or model_defaults(model))  # type: ignore[func-returns-value]
    for _ in range(3):  # asked by every job, on the event loop: not read again at each
        assert lite.defaults.told_by == "nothing"
    assert read_again == []
    monkeypatch.setattr(_local, "DEFAULTS_RECHECK_SECONDS", 0.0)
    assert lite.defaults == SD15 and lite.defaults.told_by == "nothing"
    lite.estimate(draft(width=72, height=72))
    snapshot = diffusers_folder("snapshot", "FluxPipeline", **{"transformer__config.json": {"guidance_embeds": False}})
    hub_cache(tmp_path, "acme/house-model", snapshot, monkeypatch)
    assert lite.defaults == TRANSFORMER_FAST
    assert lite.capabilities.size_multiple == 16
    with pytest.raises(BadEngineInput, match="multiple of 16"):
        lite.estimate(draft(width=72, height=72))
