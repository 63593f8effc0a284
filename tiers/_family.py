"""A local model's family, and so the steps, guidance and sizes it is meant to run with.

The name comes first (the last part of a Hub id or path): only a name tells a few-step distilled
checkpoint (Turbo, Lightning, Hyper-SD) from its base model, as no configuration file does. A name
that says nothing of its family (`/models/lite-v2`, `playground-v2.5-1024px-aesthetic`) is read
from the model's files instead: a diffusers folder's `model_index.json` and component configs
(in a Hub id's cached snapshot too), or a single file's safetensors header, so that it does not
get SD 1.5's 25 steps at guidance 7.5 and 512 px whatever it is.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tiers import tiny
from tiers.base import home_expanded

# Configuration files are a few kB; anything larger is not one.
MAX_CONFIG_BYTES = 1 << 20
# A safetensors header lists every tensor's name, dtype and offsets: under 1 MB for the largest models.
MAX_HEADER_BYTES = 16 << 20
# The VAE of every Stable Diffusion family shrinks images 8x: a UNet's `sample_size` is in latents.
LATENT_SCALE = 8

Told = Literal["name", "files", "nothing"]


@dataclass(frozen=True)
class ModelDefaults:
    steps: int
    guidance_scale: float
    native_size: int
    # Transformer models patch 2x2 latents of 8 px: their pipelines refuse (SD3) or silently round
    # down (FLUX) sizes that are not multiples of 16.
    size_multiple: int = 8
    # Distilled to denoise in a few steps from pure noise (Turbo, Lightning, Hyper-SD): its
    # schedule must start at the last timestep ("trailing" spacing), see `few_step_scheduler`.
    few_step: bool = False
    # A latent-consistency model, which runs on LCM's scheduler (a single file is given its base
    # family's, see `tiers._local`).
    lcm: bool = False
    # What told the family: "nothing" is a guess, worth another look once the model is whole on
    # disk (a Hub model is downloaded at its first load; a file may still be being copied).
    told_by: Told = field(default="name", compare=False)

    def public(self) -> dict[str, Any]:
        """For `GET /v1/engines`: what a job that names no steps or guidance gets, and what told it."""
        return {"steps": self.steps, "guidance_scale": self.guidance_scale, "native_size": self.native_size,
                "few_step": self.few_step, "read_from": "guess" if self.told_by == "nothing" else self.told_by}


SD15 = ModelDefaults(steps=25, guidance_scale=7.5, native_size=512)
SDXL = ModelDefaults(steps=30, guidance_scale=5.0, native_size=1024)
# SD 2.x: 2.0 and 2.1 are 768 px v-prediction models; their "base" models predict the noise at 512 px.
SD2 = ModelDefaults(steps=25, guidance_scale=7.5, native_size=768)
SD2_BASE = replace(SD2, native_size=512)
TRANSFORMER = ModelDefaults(steps=28, guidance_scale=3.5, native_size=1024, size_multiple=16)
TRANSFORMER_FAST = ModelDefaults(steps=4, guidance_scale=0.0, native_size=1024, size_multiple=16)
# Latent consistency pipelines, and a UNet distilled with LCM's guidance embedding, embed the
# guidance (w = guidance - 1): 0 would be w = -1.
LCM = ModelDefaults(steps=4, guidance_scale=8.5, native_size=512, lcm=True)
# A model merged with LCM-LoRA keeps its UNet, with no such embedding: its pipeline applies the
# guidance as classifier-free guidance, which at 8.5 burns the image (LCM-LoRA takes 1 to 2; 1 is none).
LCM_MERGED = replace(LCM, guidance_scale=1.0)


def own_name(model: str) -> str:
    """The model's own name: the last part of a Hub id or path, or the repository of a Hugging Face
    cache folder (`.../models--stabilityai--sdxl-turbo/snapshots/<hash>` is `sdxl-turbo`)."""
    parts = model.replace("\\", "/").rstrip("/").split("/")
    for part in reversed(parts):
        if part.startswith("models--"):
            return part.rsplit("--", 1)[-1].lower()
    return parts[-1].lower()


def model_defaults(model: str) -> ModelDefaults:
    """The defaults of `model` (a Hub id, a folder, a single file or a builtin): by its name, else
    by its files, else SD 1.5's (`told_by="nothing"`)."""
    if model == tiny.NAME:
        return ModelDefaults(steps=4, guidance_scale=0.0, native_size=512)
    named = _by_name(own_name(model))
    if named is not None and named.lcm:
        return _lcm_guidance(model, named)
    if named == TRANSFORMER:
        # FLUX dev and schnell share a folder name often enough (`~/models/flux`), and distillation
        # shows in the transformer's config (`guidance_embeds`): what the files say comes first,
        # and until they can say it (a download, a copy under way) the name's is a guess.
        read = _by_files(model)
        if read is None or read.told_by == "nothing":
            return replace(named, told_by="nothing")
        if read.size_multiple == TRANSFORMER.size_multiple:
            return read
    if named == SD2:
        named = _sd2_by_config_or_name(model, named)
    return named or _by_files(model) or replace(SD15, told_by="nothing")


def _lcm_guidance(model: str, named: ModelDefaults) -> ModelDefaults:
    """An LCM model by its name: whether its guidance is embedded only its files tell. A single
    file is loaded into its base family's UNet, which has no guidance embedding (LCM checkpoints
    shared as one file are LCM-LoRA merges); a folder says it in its configuration; a Hub model
    not downloaded yet gets the latent-consistency pipelines' 8.5 until it is."""
    try:
        path = home_expanded(model)
        if path.is_file():
            return replace(named, guidance_scale=LCM_MERGED.guidance_scale)
        folder = path if path.is_dir() else snapshot_folder(model)
        embedded = _guidance_embedded(folder) if folder is not None else None
    except (OSError, ValueError, RecursionError):
        embedded = None
    if embedded is None:
        return replace(named, told_by="nothing")
    return replace(named, guidance_scale=(LCM if embedded else LCM_MERGED).guidance_scale)


def _guidance_embedded(folder: Path) -> bool | None:
    """Whether a diffusers folder's UNet takes LCM's guidance embedding (`time_cond_proj_dim`), or
    its pipeline is a latent-consistency one; None while its configuration is not there to read."""
    index = _config(folder / "model_index.json")
    unet = _config(folder / "unet" / "config.json")
    if str(index.get("_class_name") or "").startswith("LatentConsistencyModel"):
        return True
    if not unet:
        return None
    return unet.get("time_cond_proj_dim") is not None


def _by_name(name: str) -> ModelDefaults | None:
    """A folder such as /home/alexl/... must not read as "xl": only the model's own name counts."""
    # "xl" as a word's end or start (sdxl, juggernautXL_v9, xl-base), not inside one (foxlight).
    xl = re.search(r"xl(?![a-z])|(?<![a-z])xl", name) is not None
    if "flux" in name:
        return TRANSFORMER_FAST if "schnell" in name else TRANSFORMER
    if "stable-diffusion-3" in name or name.startswith("sd3"):
        return TRANSFORMER_FAST if "turbo" in name else TRANSFORMER
    if "lcm" in name:
        return replace(LCM, native_size=1024 if xl else 512)
    if "turbo" in name:
        # Adversarially distilled at 512 px (SDXL-Turbo too): 1-4 steps, no guidance. Fine-tunes of
        # SDXL sold as "XL turbo" keep SDXL's 1024.
        native = 1024 if xl and not re.match(r"sd_?xl[-_]turbo", name) else 512
        return ModelDefaults(steps=2, guidance_scale=0.0, native_size=native, few_step=True)
    # Hyper-SD by name ("Hyper-SDXL-..."), not any model whose name starts with "hyper" (hyperRealism).
    if "lightning" in name or re.search(r"(?<![a-z])hyper[-_ ]?sd", name):
        # Their files name the steps they were distilled for: sdxl_lightning_2step, Hyper-SDXL-8steps.
        distilled = re.search(r"(\d+)[-_]?steps?(?![a-z])", name)
        steps = int(distilled.group(1)) if distilled and 0 < int(distilled.group(1)) <= 16 else 4
        return ModelDefaults(steps=steps, guidance_scale=0.0, native_size=1024 if xl else 512, few_step=True)
    if xl:
        return SDXL
    if ("stable-diffusion-2" in name or "sd2" in name) and "base" not in name:
        return SD2
    return None


def _by_files(model: str) -> ModelDefaults | None:
    """The family a diffusers folder or a single safetensors file says it is; None when there is
    nothing to read yet, or it cannot be read (the load says why)."""
    try:
        path = home_expanded(model)
        if path.is_file():
            return _single_file(path)
        folder = path if path.is_dir() else snapshot_folder(model)
        return _folder(folder) if folder is not None else None
    except (OSError, ValueError, RecursionError, struct.error):
        return None


def snapshot_folder(repo_id: str) -> Path | None:
    """The Hugging Face cache's snapshot folder of a Hub id, if it has one."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
        return None
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except ValueError:  # HFValidationError: not a Hub id at all, so in no cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def _config(path: Path) -> dict[str, Any]:
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        return {}
    loaded = json.loads(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


# The component configs the defaults are read from, by the component's name in model_index.json.
_CONFIGS = {"unet": "config.json", "transformer": "config.json", "scheduler": "scheduler_config.json"}


def _folder(folder: Path) -> ModelDefaults | None:
    index = _config(folder / "model_index.json")
    if not index:
        return None  # not a diffusers folder (the load says so), or its download has not begun
    pipeline = str(index.get("_class_name") or "")
    configs = {name: _config(folder / name / file) for name, file in _CONFIGS.items()}
    # A download fetches model_index.json first: until the configs it names are there, the
    # family read now is a guess (FLUX schnell read as dev), to be read again.
    told: Told = "nothing" if any(name in index and not configs[name] for name in _CONFIGS) else "files"
    if "Flux" in pipeline:
        # FLUX.1-dev is guidance-distilled (the guidance is an input of its transformer); schnell is
        # timestep-distilled to 1-4 steps and takes none.
        guided = configs["transformer"].get("guidance_embeds")
        return replace(TRANSFORMER_FAST if guided is False else TRANSFORMER, told_by=told)
    if "StableDiffusion3" in pipeline:
        return replace(TRANSFORMER, told_by=told)
    if not pipeline.startswith(("StableDiffusion", "LatentConsistencyModel")):
        return replace(SD15, told_by=told)  # Kandinsky, PixArt: a family these defaults do not know
    xl = "XL" in pipeline
    sample_size = configs["unet"].get("sample_size")
    native = (sample_size * LATENT_SCALE if isinstance(sample_size, int) and 32 <= sample_size <= 256
              else 1024 if xl else 512)
    consistency = pipeline.startswith("LatentConsistencyModel")
    if consistency or configs["scheduler"].get("_class_name") == "LCMScheduler":
        embedded = consistency or configs["unet"].get("time_cond_proj_dim") is not None
        return replace(LCM if embedded else LCM_MERGED, native_size=native, told_by=told)
    return replace(SDXL if xl else SD15, native_size=native, told_by=told)


# The families the loader builds from a single file (as Stable Diffusion 1.x/2.x or SDXL base);
# others (FLUX, SD3, an SDXL refiner) are loaded from a diffusers folder or a Hub id only.
SINGLE_FILE_FAMILIES = ("SDXL", "SD 2.x", "SD 1.x")
# What `single_file_family` calls a file without a UNet in the original layout diffusers converts
# from (`model.diffusion_model.*`): a LoRA, a VAE, an embedding, a diffusers-layout component.
NO_UNET = "no UNet"


def single_file_family(keys: Iterable[str]) -> str:
    """A single checkpoint's family by its tensors' names, as diffusers' own check tells them:
    one of `SINGLE_FILE_FAMILIES`, or "FLUX", "SD3", "an SDXL refiner" or `NO_UNET`."""
    names = list(keys)

    def has(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in names)

    if has("double_blocks.", "model.diffusion_model.double_blocks."):
        return "FLUX"
    if has("joint_blocks.", "model.diffusion_model.joint_blocks."):
        return "SD3"
    if has("conditioner.embedders.1"):
        return "SDXL"
    # SDXL base has CLIP as its first embedder and OpenCLIP as its second; the refiner OpenCLIP alone.
    if has("conditioner.embedders.0.model."):
        return "an SDXL refiner"
    if not has("model.diffusion_model."):
        # diffusers takes such a file for SD 1.x and converts none of it: offline the load said the
        # Hub did not answer (as if that were all that was wrong); its defaults read as SD 1.5's "files".
        return NO_UNET
    return "SD 2.x" if has("cond_stage_model.model.") else "SD 1.x"


def _single_file(path: Path) -> ModelDefaults | None:
    """SDXL (its second text encoder), SD 2.x (OpenCLIP as its text encoder) or else SD 1.x, by
    their tensors' names, as the loader tells them apart; None for a header that cannot be read
    (a damaged file, or one still being copied), for a file the loader refuses (not safetensors,
    a family it cannot load from one file): their names' guess."""
    if path.suffix.lower() != ".safetensors":
        return None
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            return None
        raw = f.read(length)
    if len(raw) < length:
        return None  # cut short: still being copied
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        return None
    family = {"SDXL": SDXL, "SD 2.x": SD2, "SD 1.x": SD15}.get(single_file_family(header))
    if family is None:
        return None
    read = replace(family, told_by="files")
    return _sd2_by_config_or_name(str(path), read) if family == SD2 else read


# What an LDM config's `model.params.parameterization` may say; left out, it is LDM's default, "eps".
LDM_PARAMETERIZATIONS = ("eps", "v")


def ldm_sidecar(path: Path) -> Path | None:
    """The LDM config kept beside a single file under its name, as AUTOMATIC1111 keeps one
    (`name.yaml`, else `name.yml`); None without one."""
    return next((p for p in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if p.is_file()), None)


def ldm_parameterization(sidecar: Path) -> str:
    """What the model of an LDM config predicts: "eps" (the noise) or "v", one of
    `LDM_PARAMETERIZATIONS`. Raises OSError, ValueError, RecursionError (nesting deeper than the
    parser goes) or yaml.YAMLError for a config that cannot be read, parsed or understood."""
    import yaml

    if sidecar.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
    config = yaml.safe_load(sidecar.read_text(encoding="utf-8"))  # UnicodeDecodeError is a ValueError
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise ValueError("no `model` section: not an LDM config")
    params = model.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError("`model.params` is not a mapping")
    parameterization = params.get("parameterization", "eps")
    if not isinstance(parameterization, str) or parameterization not in LDM_PARAMETERIZATIONS:
        raise ValueError(f"`model.params.parameterization` is {parameterization!r}, not one of "
                         f"{', '.join(map(repr, LDM_PARAMETERIZATIONS))}")
    return parameterization


def sd2_name_parameterization(path: Path) -> str | None:
    """What an SD 2.x file predicts by its name, where it keeps one of Stability's: `512` or `base`
    as a word of it ("v2-1_512-ema-pruned", "512-base-ema", "stable-diffusion-2-1-base") is the
    noise at 512 px, `768` ("768-v-ema", "v2-1_768-ema-pruned") is "v" at 768. None for a name that
    says neither, or both. A lone `v` is not taken for "v": too many names hold one ("x_v_2")."""
    words = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
    says_v, says_eps = "768" in words, bool(words & {"512", "base"})
    return None if says_v == says_eps else ("v" if says_v else "eps")


def _sd2_by_config_or_name(model: str, sd2: ModelDefaults) -> ModelDefaults:
    """An SD 2.x single file's size, as the loader samples it (`tiers._local`): by the LDM config
    beside it, else by its name, 2.x-base's 512 px where it predicts the noise, 2.1's 768 where it
    says "v". The two have the same tensors. Where neither says (or the config is one the load
    warns of and ignores, and the name says nothing), the loader reads the file as 2.1's
    v-prediction model, and so do these defaults."""
    try:
        path = home_expanded(model)
        if not path.is_file():  # a folder says its size itself
            return sd2
        sidecar = ldm_sidecar(path)
    except (OSError, ValueError):  # a name too long for a file, a NUL
        return sd2
    if sidecar is not None:
        import yaml

        try:
            return replace(SD2_BASE if ldm_parameterization(sidecar) == "eps" else SD2, told_by="files")
        except (OSError, ValueError, RecursionError, yaml.YAMLError):
            pass
    said = sd2_name_parameterization(path)
    return sd2 if said is None else replace(SD2_BASE if said == "eps" else SD2, told_by="name")


def few_step_scheduler(scheduler: Any, model: str) -> Any:
    """The scheduler a few-step distilled checkpoint needs, from the one a single file was given.

    A single file carries weights only: diffusers gives it its base family's scheduler (SDXL's
    Euler or SD 2.1's DDIM, "leading" spacing, and v-prediction for every SD 2.x file). At 2 steps
    "leading" starts denoising at t=501, taking pure noise for a half-made image, and the drafts
    come out washed out and blotchy. Turbo, Lightning and Hyper-SD are epsilon models trained to
    start from t=999: Euler with "trailing" spacing, as their own diffusers folders configure
    (SDXL-Lightning's 1-step `_x0` file predicts the clean image, "sample", not the noise)."""
    from diffusers import EulerDiscreteScheduler

    predicts = "sample" if re.search(r"(?<![a-z])x0(?![a-z0-9])", own_name(model)) else "epsilon"
    return EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="trailing",
                                              prediction_type=predicts)
