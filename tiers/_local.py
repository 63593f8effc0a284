"""The local inference runtime shared by `lite` and `local-hifi`.

One runtime per device: a single dedicated inference thread (torch runs there with an explicit
thread count, so the web server's threads never oversubscribe the cores), and a cache of loaded
pipelines so each model is loaded once and kept warm. Image-to-image pipelines are built with
`from_pipe`, sharing the text-to-image pipeline's components instead of loading them again.

torch and diffusers are imported lazily, inside the inference thread, so the API starts fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import enum
import functools
import gc
import inspect
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from orchestrator.errors import BadEngineInput, Canceled, EngineError, EngineUnavailable, first_line
from orchestrator.store import hide_paths, model_name
from tiers import tiny
from tiers._family import (
    NO_UNET,
    SINGLE_FILE_FAMILIES,
    ModelDefaults,
    few_step_scheduler,
    ldm_parameterization,
    ldm_sidecar,
    model_defaults,
    sd2_name_parameterization,
    single_file_family,
    snapshot_folder,
)
from tiers.base import (
    PREVIEW_MAX_SIDE,
    CancelToken,
    Capabilities,
    EngineContext,
    Progress,
    RenderRequest,
    RenderResult,
    home_expanded,
    says_out_of_memory,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from orchestrator.settings import Settings

log = logging.getLogger(__name__)
# transformers warns at import time about optional image processors a diffusion pipeline never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
T = TypeVar("T")
PipelineKind = Literal["text2img", "img2img"]
AUTO_MODEL = "stabilityai/sd-turbo"

# The least side a local engine makes: the latent is an eighth of it, and UNets' down-sampling
# needs 8 latent pixels.
MIN_SIDE = 64
TAESD_SCALE = 8  # pixels per latent pixel, each way
# A preview VAE's decodes take at most 1 / (1 + this) of the inference thread's time: after one
# that took t seconds, the steps of the next t x this seconds go without a preview (every step
# with a fast GPU's decode, about one in a few seconds with a CPU's).
PREVIEW_VAE_SPACING = 3.0
# A preview VAE gives way to the approximation after this many failed decodes in a row: one that
# ran out of memory once (a large batch's step) may well work at the next step.
PREVIEW_VAE_FAILURES = 3


class LatentSpace(enum.Enum):
    """The latent space of a pipeline's VAE, which the free preview's colours depend on (`latent_space`)."""

    SD = "SD 1.x/2.x"
    SDXL = "SDXL"
    SD3 = "SD3"
    FLUX = "FLUX"


RGB = tuple[float, float, float]
# Linear map from SD 1.x/2.x latents to RGB: a free preview without running the VAE.
_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
# SDXL's VAE has a latent space of its own: SD 1.x's map gave its previews the wrong colours.
_LATENT_RGB_XL = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                  (-0.3165, -0.2492, -0.2188))
_LATENT_RGB_XL_BIAS = (0.1084, -0.0175, -0.0011)
# SDXL's VAE's `scaling_factor`: its pipelines denoise the VAE's latents times this, the scale
# SDXL's map above and TAESDXL read.
_SDXL_SCALING_FACTOR = 0.13025
# SD3's and FLUX's VAEs have 16 latent channels each, in spaces of their own. These maps are the
# fits ComfyUI's previews use, the `latent_rgb_factors` (a row per channel) and
# `latent_rgb_factors_bias` of its classes `SD3` and `Flux` in comfyanonymous/ComfyUI,
# comfy/latent_formats.py. Its sampler hands its previews the latents it denoises, the VAE's after
# `process_in`, (latent - shift_factor) * scale_factor with SD3's (0.0609, 1.5305) and FLUX's
# (0.1159, 0.3611): what SD3's and FLUX's diffusers pipelines denoise too, with the same numbers
# in their VAE configs (`shift_factor`, `scaling_factor`), so the maps read the step's latents as
# they are. (Stability's own reference code, Stability-AI/sd3.5 sd3_impls.py, has an older SD3 fit
# with no bias.)
_LATENT_RGB_SD3 = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189))
_LATENT_RGB_SD3_BIAS = (0.2394, 0.2135, 0.1925)
_LATENT_RGB_FLUX = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778))
_LATENT_RGB_FLUX_BIAS = (-0.0329, -0.0718, -0.0851)
# Each space's map: a row per latent channel, and a bias (None: none to add).
LATENT_RGB: dict[LatentSpace, tuple[tuple[RGB, ...], RGB | None]] = {
    LatentSpace.SD: (_LATENT_RGB, None),
    LatentSpace.SDXL: (_LATENT_RGB_XL, _LATENT_RGB_XL_BIAS),
    LatentSpace.SD3: (_LATENT_RGB_SD3, _LATENT_RGB_SD3_BIAS),
    LatentSpace.FLUX: (_LATENT_RGB_FLUX, _LATENT_RGB_FLUX_BIAS),
}
# The (`scaling_factor`, `shift_factor`) of the VAE configs of SD3 (3 and 3.5) and FLUX.1, which
# say their latent spaces (SDXL's says its own `scaling_factor` alone).
_VAE_SCALES = {LatentSpace.SD3: (1.5305, 0.0609), LatentSpace.FLUX: (0.3611, 0.1159)}

# How often defaults a model's name and files do not tell yet are read again (see `LocalEngine.defaults`).
DEFAULTS_RECHECK_SECONDS = 10.0
# How long a model that failed to load stays unavailable before a job may try it again (a file
# still being copied into place may be whole by then).
LOAD_RETRY_SECONDS = 60.0
# How long a load of a Hub model that is not cached waits for the Hub to answer before failing
# (diffusers itself retries it for about 25 s).
HUB_CHECK_SECONDS = 5.0

# diffusers' `low_cpu_mem_usage` load (accelerate's `init_empty_weights`) patches
# `torch.nn.Module.register_parameter` for the whole process, not the thread: two runtimes of one
# process (two services, a test's server and a module's shared one) loading at once left modules on
# the meta device ("Cannot copy out of meta tensor") and the patch installed for good. One load at a
# time per process; a build of the tiny model (which makes modules) takes it too.
MODULE_BUILD_LOCK = tiny.MODULE_BUILD_LOCK

# A variant's weight files (`diffusion_pytorch_model.fp16.safetensors`, or sharded
# `model.fp16-00001-of-00002.safetensors`): what `variant="fp16"` downloads leave.
_FP16_WEIGHTS = re.compile(r"\.fp16(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")


def prompt_overflow(pipe: Any, prompt: str) -> tuple[int, int] | None:
    """(the prompt's tokens, the tokens the text encoder reads), both without the start and end
    markers, when the prompt is longer than the encoder's window; else None."""
    tokenizers = [getattr(pipe, name, None) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]
    present = [t for t in tokenizers if t is not None]
    if not present or any(not type(t).__name__.startswith("CLIPTokenizer") for t in present):
        return None  # a T5 encoder (SD3, FLUX, PixArt) reads far more, up to a window of its own
    tokenizer = present[0]  # SDXL's two CLIP encoders read the same 77; its refiner has the second only
    window = getattr(tokenizer, "model_max_length", None)
    if not isinstance(window, int) or window > 100_000:  # unset: transformers' "very large"
        return None
    if prompt.isascii() and len(prompt) + 2 <= window:
        # A byte-level BPE token covers at least one byte: no need to tokenize. Only ASCII text,
        # which the tokenizer's lowercasing and normalizing never lengthen ("İ", 2 bytes, is 3 lowered).
        return None
    tokens = len(tokenizer(prompt, truncation=False).input_ids)
    return (tokens - 2, window - 2) if tokens > window else None


def tell_prompt_overflow(pipe: Any, prompt: str, progress: Progress, notes: list[str]) -> None:
    """The text encoder reads a fixed window: the rest of the prompt has no effect, and the client
    would otherwise never know (diffusers only logs it). Told in the notes and a `prompt_truncated`
    state event, on drafts as on bridge and polish."""
    overflow = prompt_overflow(pipe, prompt)
    if overflow is not None:
        notes.append(f"the prompt is {overflow[0]} tokens long; the model read the first {overflow[1]}")
        progress.state("prompt_truncated", tokens=overflow[0], read=overflow[1])


def _on_lcm_scheduler(pipe: Any, model: str) -> Any:
    """`pipe` on LCM's scheduler when its defaults are an LCM model's: a single file gets its base
    family's (DDIM, Euler), and an LCM-LoRA merge saved as a folder may keep its base's; on those,
    its 4 steps came out as noise."""
    if model_defaults(model).lcm and type(pipe.scheduler).__name__ != "LCMScheduler":
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


# What of a scheduler's config makes another sampler than its class alone names (a fine-tune's
# DPMSolverMultistepScheduler with `algorithm_type = "sde-dpmsolver++"` and Karras sigmas is
# AUTOMATIC1111's "DPM++ 2M SDE" with the Karras schedule): recorded, to run it again as it ran.
SAMPLER_SETTINGS = ("algorithm_type", "solver_order", "use_karras_sigmas", "use_exponential_sigmas",
                    "use_beta_sigmas", "timestep_spacing")


def sampler_used(pipe: Any) -> dict[str, Any]:
    """The record's `sampler` (the scheduler's class) and `sampler_settings` (its config's values
    of `SAMPLER_SETTINGS` that it has)."""
    config = getattr(pipe.scheduler, "config", {})
    return {"sampler": type(pipe.scheduler).__name__,
            "sampler_settings": {key: config[key] for key in SAMPLER_SETTINGS if key in config}}


def step_arguments(pipe: Any, on_step: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The pipeline call's arguments that run `on_step` (`LocalRuntime.step_callback`) after each
    denoising step: `callback_on_step_end`, else the older `callback` of the pipelines that have
    only that (PixArt), else none. PixArt takes any keyword and dropped `callback_on_step_end`
    without a word: its drafts showed no step, and a cancel did not stop them."""
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:
        return {"callback_on_step_end": on_step, "callback_on_step_end_tensor_inputs": ["latents"]}
    if "callback" in params and "callback_steps" in params:
        def legacy(i: int, timestep: Any, latents: Any) -> None:
            on_step(pipe, i, timestep, {"latents": latents})

        return {"callback": legacy, "callback_steps": 1}
    return {}  # no step is shown, and a cancel ends the job while its render runs on (as a load does)


# The form of the model output that multistep solvers keep, converted, as the last of their
# `model_outputs`: the clean latents (x0) where their config says they solve in x0 (DPM-Solver++,
# UniPC's default), the noise where they solve in it (DPM-Solver, UniPC with `predict_x0` off, DEIS).
def _solver_form(name: str, config: Any) -> Literal["x0", "noise"] | None:
    if name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"):
        algorithm = config.get("algorithm_type", "")
        return "x0" if algorithm in ("dpmsolver++", "sde-dpmsolver++") else (
            "noise" if algorithm in ("dpmsolver", "sde-dpmsolver") else None)
    if name == "UniPCMultistepScheduler":
        return "x0" if config.get("predict_x0") else "noise"
    if name == "DEISMultistepScheduler":
        return "noise" if config.get("algorithm_type") == "deis" else None
    return None


# Schedulers whose step gives no x0 and keeps none, over a sample of the training's noise schedule,
# x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise with a_t = `alphas_cumprod[timestep]`: the `timestep` and
# `sample` each step is given are what the UNet saw (PNDM's Runge-Kutta and first PLMS steps, which
# move on from a sample they kept, `cur_sample`, are each given the intermediate sample the UNet
# saw, at its half or repeated timestep), so x0 is made from the step's own inputs (TCD makes the
# same one inside its step, and gives back only `pred_noised_sample`).
_TRAIN_SCHEDULE_STEPS = frozenset({"PNDMScheduler", "TCDScheduler"})


def _x0_at_timestep(scheduler: Any, model_output: Any, timestep: Any, sample: Any) -> Any:
    """x0 of `sample` at the train `timestep` (a tensor or a number), from the model's output of the
    scheduler's `prediction_type`, or None where it cannot be made: no `alphas_cumprod`, a timestep
    that is not one of its indices, a model output of another shape (a learned variance's), another
    prediction type. In float32, as a float16 sample's would lose the small values, in the sample's
    dtype again; not clamped."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or getattr(model_output, "shape", None) != sample.shape:
        return None
    at = float(timestep)  # a one-element tensor (on CUDA, a sync, as the step makes one itself) or a number
    if not at.is_integer() or not 0 <= at < len(alphas):
        return None
    alpha = float(alphas[int(at)])
    if not 0 < alpha <= 1:
        return None
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction == "sample":
        return model_output.to(sample.dtype)
    if prediction == "epsilon":
        return _x0_of_noise(sample, model_output, math.sqrt(alpha), math.sqrt(1 - alpha))
    if prediction == "v_prediction":
        import torch

        x0 = torch.mul(sample.to(torch.float32), math.sqrt(alpha))
        return x0.sub_(model_output.to(torch.float32), alpha=math.sqrt(1 - alpha)).to(sample.dtype)
    return None


def _x0_of_noise(sample: Any, noise: Any, alpha_t: float, sigma_t: float) -> Any:
    """x0 = (x_t - sigma_t x noise) / alpha_t, of a sample x_t = alpha_t x0 + sigma_t x noise."""
    import torch

    if alpha_t <= 0 or getattr(noise, "shape", None) != sample.shape:
        return None
    # One new tensor, divided in place: tens of microseconds on a draft's latents on a CPU.
    x0 = torch.add(sample.to(torch.float32), noise.to(torch.float32), alpha=-sigma_t)
    return x0.div_(alpha_t).to(sample.dtype)


def _x0_of_solver_noise(scheduler: Any, noise: Any, index: int, sample: Any) -> Any:
    """x0 of a noise-form solver's step: its converted noise (after its own thresholding, where set)
    with the sample's sigma, `sigmas[index]`, as the solver's parameterization (`_sigma_to_alpha_sigma_t`,
    flow sigmas included) makes alpha_t and sigma_t of it: the x0 its x0 form would have kept."""
    # Of a Python float: the parameterizations are arithmetic alone, and a tensor's each took microseconds.
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(float(scheduler.sigmas[index]))
    return _x0_of_noise(sample, noise, float(alpha_t), float(sigma_t))


def _x0_of_velocity(scheduler: Any, velocity: Any, index: int, sample: Any) -> Any:
    """Flow matching's x0 = sample - sigma x velocity, as the scheduler's stochastic sampling makes
    it, in float32 as it steps: at the last step (the next sigma 0) it is that step's result."""
    import torch

    return sample.to(torch.float32) - scheduler.sigmas[index] * velocity


class _DenoisedRecorder:
    """Stands in for a scheduler's `step` (an attribute of the instance, `denoised_previews`) and
    keeps, for its preview, the step's estimate of the clean latents, x0: the
    `pred_original_sample` (Euler, Euler Ancestral, Heun, KDPM2, LMS, DDIM, DDPM) or `denoised` (LCM)
    its output carries and the pipelines drop; the x0 a DPM-Solver++ or UniPC keeps in
    `model_outputs`. Where the step gives none, what makes it, for `latest` to make when a preview
    is made: from the noise DPM-Solver (`algorithm_type` "dpmsolver", "sde-dpmsolver"), UniPC with
    `predict_x0` off and DEIS keep, with the step's sigma; from the step's own model output,
    timestep and sample with `alphas_cumprod` and `prediction_type` (PNDM, TCD); from flow
    matching's (SD3, FLUX) sample and velocity, x0 = sample - sigma x velocity. Nothing is copied
    and nothing the step computes is changed: the step's images are the same. Other schedulers
    record nothing (their previews show x_t)."""

    __slots__ = ("__wrapped__", "_make", "_original", "_scheduler", "_x0")

    def __init__(self, scheduler: Any, original: Callable[..., Any]) -> None:
        self._scheduler, self._original = scheduler, original
        # The pipelines pass `generator` and `eta` only to a step whose signature (`inspect.signature`,
        # which follows this) names them: behind (*args, **kwargs), Euler Ancestral's, DDPM's and
        # LCM's noise came from torch's global generator, other images for the same seed.
        self.__wrapped__ = original
        self._x0: Any = None
        self._make: Callable[[], Any] | None = None  # makes the step's x0 from what it references

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The pipelines ask for a tuple (`return_dict=False`), whose second item is x0 for some
        # schedulers and not for others (TCD's); the output's fields say which it is. Its tuple is
        # the same (`BaseOutput.to_tuple`, the fields that are set, in order): they read item 0.
        wants_tuple = kwargs.get("return_dict", True) is False
        if wants_tuple:
            kwargs["return_dict"] = True
        self._x0 = self._make = None
        output = self._original(*args, **kwargs)
        try:
            self._record(output, args, kwargs)
        except Exception as exc:  # a preview is a nicety: this step's shows its noisy latents
            self._x0 = self._make = None
            log.debug("no denoised preview for this step: %s: %s", type(exc).__name__, first_line(exc)[:200])
        to_tuple = getattr(output, "to_tuple", None)
        return to_tuple() if wants_tuple and callable(to_tuple) else output

    def _record(self, output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        scheduler = self._scheduler
        for field in ("pred_original_sample", "denoised"):
            estimate = getattr(output, field, None)
            if estimate is not None:
                self._x0 = estimate
                return
        name, config = type(scheduler).__name__, scheduler.config

        def argument(position: int, keyword: str) -> Any:  # step(model_output, timestep, sample, ...)
            return args[position] if len(args) > position else kwargs[keyword]

        form = _solver_form(name, config)
        if form == "x0":
            self._x0 = scheduler.model_outputs[-1]
        elif form == "noise":
            # The sample the UNet saw, not the one UniPC's corrector makes of it; its index moved on by one.
            self._make = functools.partial(_x0_of_solver_noise, scheduler, scheduler.model_outputs[-1],
                                           scheduler.step_index - 1, argument(2, "sample"))
        elif name in _TRAIN_SCHEDULE_STEPS:
            self._make = functools.partial(_x0_at_timestep, scheduler, argument(0, "model_output"),
                                           argument(1, "timestep"), argument(2, "sample"))
        elif (name == "FlowMatchEulerDiscreteScheduler" and not config.get("invert_sigmas")
              and kwargs.get("per_token_timesteps") is None):
            self._make = functools.partial(_x0_of_velocity, scheduler, argument(0, "model_output"),
                                           scheduler.step_index - 1, argument(2, "sample"))

    def latest(self) -> Any:
        """The last step's x0, or None where its scheduler gives none or it cannot be made."""
        return self._make() if self._make is not None else self._x0

    def forget(self) -> None:
        self._x0 = self._make = None


@contextmanager
def denoised_previews(pipe: Any) -> Iterator[None]:
    """For one call of `pipe`, its step previews show the denoised estimate (x0) of the schedulers
    that give one or whose step's inputs make one (`_DenoisedRecorder`) instead of the noisy latents
    (x_t), which told nothing in a few-step draft's first steps. The scheduler's `step` is wrapped
    on the instance (never its class), and put back as it was however the call ends: an
    image-to-image pipeline `from_pipe` made shares its scheduler with the text-to-image one, and
    the inference thread runs one call at a time. Nothing the recorder referenced outlives the call."""
    scheduler = getattr(pipe, "scheduler", None)
    original = getattr(scheduler, "step", None)
    if scheduler is None or not callable(original) or isinstance(original, _DenoisedRecorder):
        yield
        return
    missing = object()
    own = getattr(scheduler, "__dict__", {}).get("step", missing)  # the instance's own `step`, if it had one
    recorder: _DenoisedRecorder | None = _DenoisedRecorder(scheduler, original)
    try:
        scheduler.step = recorder
    except Exception as exc:  # a scheduler that takes no attribute of its own: previews of x_t
        log.debug("no denoised previews: %s: %s", type(exc).__name__, first_line(exc)[:200])
        recorder = None
    try:
        yield
    finally:
        if recorder is not None:
            if own is missing:
                del scheduler.step
            else:
                scheduler.step = own
            recorder.forget()


def step_estimate(pipe: Any, latents: Any) -> Any:
    """What the step's preview shows: the x0 `denoised_previews` recorded for `pipe`'s last step
    where it has one of the latents' shape, else the latents (x_t)."""
    recorder = getattr(getattr(pipe, "scheduler", None), "__dict__", {}).get("step")
    if not isinstance(recorder, _DenoisedRecorder):
        return latents
    try:
        estimate = recorder.latest()
    except Exception as exc:
        log.debug("no denoised preview for this step: %s: %s", type(exc).__name__, first_line(exc)[:200])
        return latents
    return estimate if estimate is not None and getattr(estimate, "shape", None) == latents.shape else latents


def negative_prompt_arguments(pipe: Any, negative_prompt: str, guidance: float, progress: Progress,
                              notes: list[str]) -> dict[str, Any]:
    """The pipeline call's `negative_prompt`, if it has an effect there. A negative prompt works
    through classifier-free guidance alone: LCM's pipelines take none (and any keyword without a
    word), FLUX's only with a `true_cfg_scale` (not set here), and the others skip it at a guidance
    of 1 or less (the SD-Turbo family's default) or with a guidance-distilled UNet. There it changed
    nothing while the image's record said it applied: told in the notes and a
    `negative_prompt_ignored` state event instead."""
    if not negative_prompt:
        return {}
    params = inspect.signature(pipe.__call__).parameters
    name = type(pipe).__name__
    if "negative_prompt" not in params:
        why = f"the model's pipeline ({name}) takes no negative prompt"
    elif "true_cfg_scale" in params:
        why = f"the model's pipeline ({name}) uses a negative prompt only with true classifier-free guidance"
    elif getattr(getattr(getattr(pipe, "unet", None), "config", None), "time_cond_proj_dim", None) is not None:
        why = "the model's guidance is distilled into its UNet, which runs without a negative prompt"
    elif guidance <= 1:
        why = f"at guidance {guidance:g} the model runs without classifier-free guidance"
    else:
        overflow = prompt_overflow(pipe, negative_prompt)
        if overflow is not None:  # cut as the prompt is, and as silently
            notes.append(f"the negative prompt is {overflow[0]} tokens long; the model read the first {overflow[1]}")
            progress.state("negative_prompt_truncated", tokens=overflow[0], read=overflow[1])
        return {"negative_prompt": negative_prompt}
    notes.append(f"{why}: the negative prompt was not used")
    progress.state("negative_prompt_ignored", pipeline=name, guidance_scale=guidance)
    return {}


def _hub_fetch_failed(exc: BaseException) -> bool:
    """Whether the Hugging Face Hub's client failed to fetch a file somewhere behind `exc`: a single
    file lacking its text encoder's weights, its configuration cached, was blamed on an offline Hub."""
    # Where every version the dependencies allow has them (`huggingface_hub.errors` only lately).
    from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled  # type: ignore[attr-defined]

    seen: BaseException | None = exc
    for _ in range(20):  # a chain, not a cycle
        if seen is None:
            return False
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _identity(model: str) -> str:
    """One key per model however its path is spelled (`/m/sd` and `/m/sd/`, through a link):
    ORCH_LITE_MODEL and ORCH_HIFI_MODEL naming one folder two ways loaded its weights twice."""
    path = home_expanded(model)
    try:
        return str(path.resolve()) if model != tiny.NAME and path.exists() else model
    except (OSError, ValueError):  # a name too long for a file, a NUL
        return model


def _pipeline_class(folder: Path) -> str | None:
    """The pipeline class a model folder's model_index.json names; None when it cannot be read
    (the load says what is wrong with it)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    pipeline = index.get("_class_name") if isinstance(index, dict) else None
    return pipeline if isinstance(pipeline, str) else None


def hf_hub_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds the whole of a Hub model, so that it loads offline."""
    folder = snapshot_folder(repo_id)
    return folder is not None and not _snapshot_lacks(folder)


def _shards(part: Path, files: list[str]) -> set[str]:
    """The weight files a component's shard indexes (`*.safetensors.index.json`) name."""
    shards: set[str] = set()
    for index in (name for name in files if name.endswith(".index.json")):
        found = json.loads((part / index).read_text())
        weight_map = found.get("weight_map") if isinstance(found, dict) else None
        if isinstance(weight_map, dict):
            shards |= {str(shard) for shard in weight_map.values()}
    return shards


def _components(folder: Path) -> list[str] | None:
    """The components model_index.json lists (None when it cannot be read as an index): not its
    metadata (`_class_name`), nor one the pipeline goes without (a null safety checker)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2
            and all(isinstance(part, str) for part in value)]


def _snapshot_lacks(folder: Path) -> list[str]:
    """The components model_index.json lists that a cached snapshot lacks, or holds without
    weights (a model's folder, with a config.json); ["model_index.json"] when that cannot be read.
    A first download cut short (a Ctrl-C in the first `make demo`) leaves model_index.json, and
    maybe configs, without weights: `auto` took that for SD-Turbo cached, and offline every draft
    then failed."""
    components = _components(folder)
    if components is None:
        return ["model_index.json"]
    try:
        lacking = []
        for name in components:
            part = folder / name
            # A snapshot's files are links to blobs that are made only once downloaded whole.
            files = [f.name for f in part.iterdir() if f.exists()] if part.is_dir() else []
            if not files or ("config.json" in files and not any(f.endswith((".safetensors", ".bin")) for f in files)):
                lacking.append(f"{name}/")
            elif not all((part / shard).exists() for shard in _shards(part, files)):
                lacking.append(f"{name}/")  # sharded weights, some shards not downloaded yet
        return lacking
    except (OSError, ValueError):
        return ["model_index.json"]


# The Hub's rule for repository ids: `name` or `org/name`, each of word characters, `-` and `.`,
# neither starting nor ending with `-` or `.`, at most 96 long, with no `--` or `..`, not ending `.git`.
_HUB_PART = r"(?![-.])[\w.-]{1,96}(?<![-.])"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}", re.ASCII)


def _is_hub_id(spec: str) -> bool:
    return (_HUB_ID.fullmatch(spec) is not None and "--" not in spec and ".." not in spec
            and not spec.endswith(".git"))


def hf_hub_reachable(timeout: float = 1.5, file: str | None = None) -> bool:
    """Whether the Hub (HF_ENDPOINT) answers; given a `file` (`org/name/model_index.json`), whether
    it serves that file: a proxy refusing the way out (403, 404) answers too, and `auto` then chose
    a model it could not fetch. A mirror may refuse its root and serve files: the file is asked."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if file is not None:
        repo, _, name = file.rpartition("/")
        endpoint = f"{endpoint}/{repo}/resolve/main/{name}"
    # A mirror that wants the token refuses without it (401), as the Hub does a gated model.
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token and file is not None else {}
    try:
        answer = httpx.head(endpoint, timeout=timeout, follow_redirects=file is not None, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL):  # a malformed HF_ENDPOINT is no Hub either
        return False
    return file is None or answer.is_success


def _hub_answers_if_needed(model: str, source: Path) -> None:
    """Raise OSError for a Hub id that is neither in the cache whole nor fetchable: diffusers would
    retry the Hub for about 25 s, its warnings on the terminal, before failing alike."""
    if source.exists() or not _is_hub_id(model):
        return
    snapshot = snapshot_folder(model)
    if (snapshot is None or _snapshot_lacks(snapshot)) and not hf_hub_reachable(timeout=HUB_CHECK_SECONDS):
        raise OSError(f"{model} cannot be fetched: the Hugging Face Hub did not answer")


def _is_path(spec: str) -> bool:
    """A local file or folder, as opposed to a Hub id (`org/name`) or a builtin."""
    return spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith((".safetensors", ".ckpt"))


@contextmanager
def _named_safetensors(path: Path) -> Iterator[Path]:
    """`path`, or a link to it named `*.safetensors` while the block runs: diffusers picks its
    reader by the exact suffix, and read `SD15.SAFETENSORS` (copied from Windows) as a pickle."""
    if path.suffix == ".safetensors":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="orchestrator-model-") as folder:
        link = Path(folder) / f"{path.stem}.safetensors"
        link.symlink_to(path.resolve())
        yield link


# An LDM config's `model.params.parameterization` as diffusers' `prediction_type`.
_PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}


def _sd2_prediction(path: Path) -> str | None:
    """The prediction type of an SD 2.x file: the one the LDM config beside it (`name.yaml` or
    `name.yml`, as AUTOMATIC1111 keeps one) gives it, else the one its name says where it keeps one
    of Stability's (`v2-1_512-ema-pruned`: epsilon); None where neither says. A config that cannot
    be read is warned of and passed over.

    diffusers reads every SD 2.x file through SD 2.1's configuration, v-prediction, so a 2.x-base
    file (512 px, epsilon) was sampled as the other kind of model: the two have the same tensors,
    and only the config beside the file, or its name, tells them apart (its native size too, see
    `tiers._family`)."""
    sidecar = ldm_sidecar(path)
    if sidecar is not None:
        import yaml

        try:
            return _PARAMETERIZATIONS[ldm_parameterization(sidecar)]
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:
            # Only the scheduler's prediction type hangs on it: the model loads all the same.
            log.warning("ignoring %s beside the model: %s; its prediction type is its name's, else diffusers' "
                        "for SD 2.x", sidecar, first_line(exc) or type(exc).__name__)
    said = sd2_name_parameterization(path)
    return None if said is None else _PARAMETERIZATIONS[said]


def _model_cached_whole(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a single model's repository (a TAESD: config.json and
    its weights, no model_index.json) with its weights downloaded."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a Hub id
        return False
    if not isinstance(found, str):
        return False
    try:  # a snapshot's files are links to blobs that are made only once downloaded whole
        return any(f.name.endswith((".safetensors", ".bin")) and f.exists() for f in Path(found).parent.iterdir())
    except OSError:
        return False


def _single_model_options(spec: str) -> dict[str, Any]:
    """`from_pretrained`'s options for a single model (the preview VAE) given as a folder or a Hub
    id, loaded as the pipelines are: from the cache alone when it holds the model whole, and a Hub
    id it does not hold only where the Hub answers. With the Hub silent, the Hub client retried it
    for about 23 s even with the model cached. Raises OSError for one that cannot be had."""
    if home_expanded(spec).exists():
        return {}
    if _is_path(spec):
        raise OSError(f"'{spec}' is a path to nothing: no such file or folder")
    if not _is_hub_id(spec):
        raise OSError(f"'{spec}' is neither an existing folder nor a Hugging Face model id (org/name)")
    if _model_cached_whole(spec):
        return {"local_files_only": True}
    # Its own file asked (a proxy refusing the way out answers the Hub's root): then the Hub's
    # retries (23 s) are not waited for here.
    if not hf_hub_reachable(timeout=HUB_CHECK_SECONDS, file=f"{spec}/config.json"):
        raise OSError(f"{spec} is not in the Hugging Face cache, and the Hub does not serve it (offline, a proxy, "
                      "or a misspelt or gated id)")
    return {}


@functools.lru_cache(maxsize=8)
def resolve_model(spec: str) -> str:
    """`auto` becomes SD-Turbo when it is cached or the Hub answers, else the offline tiny model."""
    if spec != "auto":
        return spec
    if hf_hub_cached(AUTO_MODEL) or hf_hub_reachable(file=f"{AUTO_MODEL}/model_index.json"):
        return AUTO_MODEL
    log.warning("ORCH_LITE_MODEL=auto: %s is neither cached nor reachable; using %s (its images are noise)",
                AUTO_MODEL, tiny.NAME)
    return tiny.NAME


# The length of an LCM training schedule where its scheduler's configuration names none.
LCM_SCHEDULE = 50


def lcm_schedule(pipe: Any) -> int | None:
    """The length of the pipeline's LCM training schedule (`original_inference_steps`); None for
    other schedulers.

    An LCM scheduler runs every step it is asked for (img2img does not run steps x strength),
    picked from that schedule shortened to `int(length * strength)`, and raises a ValueError when
    asked for more steps than that."""
    scheduler: Any = getattr(pipe, "scheduler", None)
    if type(scheduler).__name__ != "LCMScheduler":
        return None
    return int(getattr(scheduler.config, "original_inference_steps", None) or LCM_SCHEDULE)


def check_steps(pipe: Any, steps: int) -> None:
    """Raise `BadEngineInput` when the pipeline's scheduler cannot make a schedule of `steps`
    steps while it can make one of 50: PNDM with its Runge-Kutta steps needs 4 at least, and
    failed inside the pipeline with numpy's "operands could not be broadcast"."""
    scheduler: Any = getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "set_timesteps"):
        return

    def takes(count: int) -> bool:
        try:
            copy.deepcopy(scheduler).set_timesteps(count)  # a copy: the job's own call sets it again
        except Exception:
            return False
        return True

    # A scheduler that needs more than a count (FLUX's `mu`) fails alike at 50: the pipeline's to set up.
    if takes(steps) or not takes(50):
        return
    fewest = next(count for count in range(1, 51) if takes(count))
    raise BadEngineInput(f"steps: this model's scheduler ({type(scheduler).__name__}) cannot run {steps} "
                         f"steps; the fewest it runs is {fewest}",
                         details={"field": "steps", "value": steps, "min": fewest})


def finite_images(images: Any, device: str) -> list[Image]:
    """The PIL images of a pipeline's `output_type="np"` output, refused when any value is NaN or
    infinite: converted as diffusers would, such an image was saved black (a half-precision
    overflow in the VAE, usually) and counted a success."""
    import numpy as np

    if not np.isfinite(images).all():
        hint = " (set ORCH_LITE_DTYPE=bf16, or use a VAE that runs in fp16)" if device.startswith("cuda") else ""
        raise EngineError(f"the model's output holds NaN or infinite values: its image would be black{hint}",
                          retryable=False, charged="no", details={"device": device})
    from diffusers.image_processor import VaeImageProcessor

    # As the pipeline's "pil" output does; RGB whatever the VAE's channels (one grey, four RGBA):
    # the storage quota holds a local engine's images at 3 bytes a pixel (`opaque_images`).
    return [image if image.mode == "RGB" else image.convert("RGB")
            for image in VaeImageProcessor.numpy_to_pil(images)]


def _out_of_memory(exc: BaseException) -> BaseException | None:
    """The allocator's error among `exc` and its causes (a load that ran out of memory is the
    model's failure, caused by one), or None."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, RuntimeError) and says_out_of_memory(str(seen)):
            return seen
        seen = seen.__cause__
    return None


def _fp16_only(folder: Path) -> bool:
    """Whether a component of a diffusers folder holds fp16-variant weights and no full-size ones:
    diffusers looks for the full-size names unless told the variant."""
    try:
        components = [path for path in folder.iterdir() if path.is_dir()]
        for component in components:
            weights = [f.name for f in component.iterdir() if f.name.endswith((".safetensors", ".bin"))]
            if weights and all(_FP16_WEIGHTS.search(name) for name in weights):
                return True
    except OSError:
        return False  # unreadable: the load says why
    return False


# A tokenizer folder's files that are not its vocabulary (whose names vary by tokenizer): from a
# folder holding only these, transformers builds a tokenizer of two tokens, and every prompt then
# failed ("int too big to convert").
_NOT_VOCABULARY = frozenset({"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "chat_template.jinja", "chat_template.json"})


def _holds_content(name: str) -> bool:
    """Whether a file of a component's folder may be part of the component: not a file a copy or a
    desktop leaves beside it (.DS_Store, .gitattributes, a README.md or a LICENSE), which made a
    tokenizer folder without its vocabulary, or one holding nothing else, pass for whole."""
    return not name.startswith(".") and not name.lower().endswith(".md") and not name.upper().startswith("LICENSE")


def _missing_components(folder: Path) -> list[str]:
    """The components model_index.json lists that the folder lacks, each as `name/`, with why when
    its subfolder is there: empty, a config without weights, a tokenizer without its vocabulary
    (a copy cut short). diffusers says only "no file named config.json found in directory <the
    folder>" of a missing one, and loads an empty tokenizer folder as a tokenizer that fails
    every prompt."""
    missing = []
    for name in _components(folder) or ():  # none: no diffusers folder, which the load says
        part = folder / name
        try:
            files = [f.name for f in part.iterdir() if _holds_content(f.name)] if part.is_dir() else None
        except OSError:
            continue  # unreadable: the load says why
        if files is None:
            missing.append(f"{name}/")
        elif not files:
            missing.append(f"{name}/ (an empty folder)")
        elif "config.json" in files and not any(f.endswith((".safetensors", ".bin")) for f in files):
            missing.append(f"{name}/ (its weights: a config.json alone)")
        elif name.startswith("tokenizer") and set(files) <= _NOT_VOCABULARY:
            missing.append(f"{name}/ (its vocabulary: only {', '.join(sorted(files))})")
    return missing


def _refuse_conditioned_unet(pipe: Any) -> None:
    """Raise ValueError for a pipeline whose UNet takes more channels than its VAE's latents: an
    inpainting model (9: the mask and the masked image's latents too), InstructPix2Pix (8) or
    depth-to-image (5). diffusers loads such a folder or SD 1.x/SDXL file as its family's text-to-image
    pipeline all the same (and from_pipe makes an image-to-image one of it), which feeds the UNet the
    latents alone: every draft and bridge failed with "The size of tensor a (9) must match the size
    of tensor b (4)", both engines reading available."""
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    _refuse_channels(getattr(getattr(unet, "config", None), "in_channels", None),
                     getattr(getattr(vae, "config", None), "latent_channels", None))


def _refuse_conditioned_folder(folder: Path) -> None:
    """`_refuse_conditioned_unet` from a diffusers folder's configs, before its weights are read:
    refused after a whole load, an SDXL inpainting folder was read again (gigabytes) at each try."""
    def config(part: str) -> dict[str, Any]:
        try:
            read = json.loads((folder / part / "config.json").read_text())
        except (OSError, ValueError):
            return {}  # the load says what is wrong with it
        return read if isinstance(read, dict) else {}

    unet = config("unet")
    _refuse_channels(unet.get("in_channels"), config("vae").get("latent_channels", 4) if unet else None)


# An original (LDM) checkpoint's UNet `conv_in` ([320, in_channels, 3, 3]) and its VAE's
# `post_quant_conv` ([latent_channels, latent_channels, 1, 1]), as diffusers' single-file loader names them.
_CHECKPOINT_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_CHECKPOINT_POST_QUANT_CONV = "first_stage_model.post_quant_conv.weight"


def _refuse_conditioned_file(checkpoint: Any) -> None:
    """`_refuse_conditioned_unet` from an open safetensors checkpoint's shapes (its header), before
    its weights are read: refused only after a whole load, an inpainting file was read into memory
    (gigabytes) at each try. Where the file holds no VAE, 4 latent channels: every family loaded from
    one file has 4."""
    keys = set(checkpoint.keys())

    def shape(key: str) -> list[int]:
        return list(checkpoint.get_slice(key).get_shape()) if key in keys else []

    conv_in, post_quant = shape(_CHECKPOINT_CONV_IN), shape(_CHECKPOINT_POST_QUANT_CONV)
    if len(conv_in) == 4:
        _refuse_channels(conv_in[1], post_quant[0] if len(post_quant) == 4 else 4)


def _refuse_channels(takes: object, latents: object) -> None:
    if isinstance(takes, int) and isinstance(latents, int) and takes > latents:
        raise ValueError(f"its UNet takes {takes} input channels, not the VAE's {latents} latent channels (an "
                         "inpainting, InstructPix2Pix or depth-to-image model): it makes neither drafts nor bridges "
                         "and polishes; give a text-to-image model")


def is_sdxl(pipe: Any) -> bool:
    """Whether the pipeline is SDXL's (base, refiner, Turbo, Lightning): its UNet takes the
    image's size as added "text_time" conditioning."""
    config = getattr(getattr(pipe, "unet", None), "config", None)
    added = config.get("addition_embed_type") if isinstance(config, dict) else None
    return added == "text_time" or "StableDiffusionXL" in type(pipe).__name__


def _vae_setting(pipe: Any, name: str) -> Any:
    """`name` in the config of `pipe`'s VAE (a dict, or attributes), None where it has none."""
    config = getattr(getattr(pipe, "vae", None), "config", None)
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def latent_space(pipe: Any) -> LatentSpace:
    """The latent space of `pipe`'s latents, as the previews read them: said by its VAE config's
    `scaling_factor` (and `shift_factor`) where those are SD3's, FLUX's or SDXL's, else by the
    pipeline (its class, `is_sdxl`). PixArt-Alpha and -Sigma use SDXL's VAE but have a transformer,
    no UNet: by the pipeline alone their previews got SD 1.x's map, the wrong colours. Another
    `scaling_factor` decides nothing: 0.18215, SD 1.x's and 2.x's, is also what diffusers fills in
    for a config without one, and Playground v2.5's VAE (SDXL's, normalized) says 0.5. FLUX.2's
    pipeline (32 latent channels, packed otherwise) is not FLUX.1's."""
    scale = _vae_setting(pipe, "scaling_factor")
    if _is_number(scale):
        if math.isclose(scale, _SDXL_SCALING_FACTOR, rel_tol=1e-3):
            return LatentSpace.SDXL
        shift = _vae_setting(pipe, "shift_factor")
        if _is_number(shift):
            for space, (space_scale, space_shift) in _VAE_SCALES.items():
                if math.isclose(scale, space_scale, rel_tol=1e-3) and math.isclose(shift, space_shift, abs_tol=1e-4):
                    return space
    name = type(pipe).__name__
    if name.startswith("StableDiffusion3"):
        return LatentSpace.SD3
    if name.startswith("Flux") and not name[4:5].isdigit():
        return LatentSpace.FLUX
    return LatentSpace.SDXL if is_sdxl(pipe) else LatentSpace.SD


def latents_to_preview(latents: Any, *, space: LatentSpace = LatentSpace.SD) -> Image | None:
    """An RGB preview of the first latent in the batch: a matrix product with the map of its
    latent `space` (`LATENT_RGB`), no VAE. Latents of other channels than the map's (a family it
    does not know) show their first three channels; None for latents that are not images of
    channels (FLUX's packed ones, see `unpacked_flux_latents`)."""
    import torch
    from PIL import Image as PILImage

    if latents.dim() != 4:
        return None
    lat = latents[0].float()
    weights, bias = LATENT_RGB[space]
    if lat.shape[0] != len(weights):
        rgb = lat[:3]
    else:
        rgb = torch.einsum("chw,cr->rhw", lat, torch.tensor(weights, dtype=lat.dtype, device=lat.device))
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=lat.dtype, device=lat.device)[:, None, None]
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return PILImage.fromarray(rgb, mode="RGB")


def unpacked_flux_latents(latents: Any, size: tuple[int, int] | None, pipe: Any = None) -> Any:
    """The first of FLUX's packed latents, as an image of channels (1, 16, height / 8, width / 8)
    its previews can read, or None where that cannot be told. FLUX's pipelines pack the VAE's
    latents into a sequence of tokens (batch, (height / 16) x (width / 16), 64): the tokens go row
    by row from the top left, and each holds a 2x2 patch of the 16 channels, channel first, then the
    patch's row, then its column (`FluxPipeline._unpack_latents`). The image's (width, height),
    `size`, tells the rows from the columns: the tokens alone do not (64 of them may be 8x8 or 4x16)."""
    if size is None or latents.dim() != 3:
        return None
    factor = getattr(pipe, "vae_scale_factor", None)
    scale = factor if isinstance(factor, int) and factor > 0 else TAESD_SCALE
    width, height = size
    # The pipeline's own rounding: each side to a whole number of 2x2 patches of latents.
    rows, columns = height // (scale * 2), width // (scale * 2)
    _batch, tokens, features = latents.shape
    if rows * columns != tokens or features % 4:
        return None
    patches = latents[:1].reshape(1, rows, columns, features // 4, 2, 2)
    # (1, row, column, channel, patch row, patch column) -> (1, channel, row, patch row, column, patch column)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(1, features // 4, rows * 2, columns * 2)


def _in_sdxl_scale(latents: Any, pipe: Any) -> Any:
    """The latents of a pipeline in SDXL's latent space (`latent_space`) as SDXL's own are scaled,
    for its previews: Playground v2.5's VAE config normalizes them per channel (`latents_mean`,
    `latents_std`, `scaling_factor` 0.5), which the pipeline undoes before its decode; read as
    SDXL's, its previews came out tinted red (a VAE latent of zeros: (162, 139, 136) where SDXL's
    map gives (141, 125, 127)) and at little more than half the contrast. Others, SDXL's own, are
    returned as they are."""
    mean, std = _vae_setting(pipe, "latents_mean"), _vae_setting(pipe, "latents_std")
    scale = _vae_setting(pipe, "scaling_factor")

    def four_numbers(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) == 4 and all(
            isinstance(number, (int, float)) for number in value)

    if (not four_numbers(mean) or not four_numbers(std) or not isinstance(scale, (int, float)) or scale <= 0
            or latents.dim() != 4 or latents.shape[1] != 4):
        return latents
    import torch

    def per_channel(values: Any) -> Any:
        return torch.tensor(values, dtype=torch.float32, device=latents.device).view(1, 4, 1, 1)

    # As diffusers' SDXL pipeline denormalizes them for its decode, then scaled as SDXL's.
    return (latents.float() * per_channel(std) / scale + per_channel(mean)) * _SDXL_SCALING_FACTOR


def _no_preview(_latents: Any, *, space: LatentSpace = LatentSpace.SD) -> None:
    return None


CGROUP = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")


def _usable_cpus(cgroup: Path = CGROUP, membership: Path = MEMBERSHIP) -> int:
    """The CPUs this process may run on (its `taskset` or cpuset), not all of the host's, and no
    more than its CPU quota (a container's `--cpus`, a systemd unit's `CPUQuota=`: cgroup v2's
    `cpu.max`, or v1's CFS quota): more torch threads than the quota allows are throttled in turn,
    and run slower than fewer."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cpus = max(1, os.cpu_count() or 2)
    quota = _cpu_quota(cgroup, membership)
    return cpus if quota is None else min(cpus, quota)


def _cpu_quota(cgroup: Path, membership: Path = MEMBERSHIP) -> int | None:
    """The tightest CPU quota of this process's cgroup and those above it, rounded up; None when
    none has one, or none can be read (not Linux, a cgroup of another shape). In a container the
    process's group is the mount's root; on a host it is a unit's (`system.slice/x.service`),
    whose quota the root does not show."""
    own = _own_cgroups(membership)
    quotas = [_quota(folder / "cpu.max", None) for folder in _up_from(cgroup, own.get("v2", ""))]
    quotas += [_quota(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us")
               for folder in _up_from(cgroup / "cpu", own.get("cpu", ""))]
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def _own_cgroups(membership: Path) -> dict[str, str]:
    """This process's cgroup paths from /proc/self/cgroup: "v2" for the unified hierarchy's
    (`0::/path`), "cpu" for cgroup v1's cpu controller (`4:cpu,cpuacct:/path`)."""
    try:
        lines = membership.read_text().splitlines()
    except (OSError, ValueError):
        return {}
    own: dict[str, str] = {}
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and not controllers:
            own["v2"] = path
        elif "cpu" in controllers.split(","):
            own["cpu"] = path
    return own


def _up_from(root: Path, path: str) -> list[Path]:
    """`root/path` and each folder above it up to `root` (a path that would leave `root` is read
    as `root` alone)."""
    parts = [part for part in path.split("/") if part and part != "."]
    if ".." in parts:
        parts = []
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _quota(quota_file: Path, period_file: Path | None) -> int | None:
    """One cgroup's quota in CPUs, rounded up: v2's `cpu.max` ("<quota> <period>"), or v1's two
    files; None for no quota ("max", -1) or none readable."""
    try:
        if period_file is None:
            quota, period = quota_file.read_text().split()[:2]
        else:
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


class LocalRuntime:
    """One per device. Everything torch does for this device happens on `self._thread`."""

    def __init__(self, settings: Settings, device: str | None = None) -> None:
        self.settings = settings
        self._requested_device = device or settings.lite_device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference",
                                            initializer=self._init_thread)
        self._pipes: dict[tuple[str, str], Any] = {}
        # What each model setting resolved to at its last use (see `_follow`).
        self._resolved: dict[str, str] = {}
        self._load_lock = threading.Lock()
        self._device: str | None = None
        # Why the requested device cannot be used, once a job has found out (torch is imported on
        # the inference thread only): the engines then say so in their availability.
        self.device_problem: str | None = None
        # A model's last failure to load (when, and the error): the engines say so in their
        # availability, and a job retries the load only after LOAD_RETRY_SECONDS.
        self._load_failures: dict[str, tuple[float, EngineUnavailable]] = {}
        # A model that loads but cannot serve one kind of pipeline (a refiner's drafts, PixArt's
        # img2img): said by that kind's engine only, the other one using the model as ever.
        self._unfit: dict[tuple[str, PipelineKind], tuple[float, EngineUnavailable]] = {}
        # The Lite model's preview: None until it is loaded (the approximation meanwhile), then the
        # preview VAE's decode, or the approximation (`latents_to_preview`), or none (`_no_preview`).
        self._previewer: Callable[..., Image | None] | None = None
        self._preview_failures = 0  # the preview VAE's decodes that failed in a row
        self._vae_preview_after = 0.0  # monotonic time before which a step gets no preview VAE decode

    def _init_thread(self) -> None:
        import torch

        threads = self.settings.torch_threads or _usable_cpus()
        torch.set_num_threads(threads)
        # Through the libraries' own switches: importing them resets their loggers' levels, so a
        # level set on the logger before the import did not hold.
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
        # The Hub client's own stderr handler beside ours printed each of its warnings twice (once
        # without a name, outside the log file): they go through ours alone.
        from huggingface_hub.utils import logging as hlogging

        hub = hlogging.get_logger("huggingface_hub")
        for handler in list(hub.handlers):
            hub.removeHandler(handler)
        # diffusers still passes the Hub client an argument it has deprecated: nothing a user can change.
        warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated",
                                category=UserWarning)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the inference thread; the event loop stays free."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except BaseException as exc:
            failure = exc
        if not isinstance(failure, Exception):
            raise failure  # KeyboardInterrupt, SystemExit: as they came
        # Outside the except block: its frames would keep what the failed call made alive.
        out_of_memory = _out_of_memory(failure)
        if out_of_memory is not None:
            # What the failed step (or load) held on the device is referenced from the traceback's
            # frames, and an exception refers to its own traceback: freed only by the cycle
            # collector, some time after `empty_cache` had found nothing to give back.
            for error in (failure, out_of_memory):
                error.__traceback__ = None
            gc.collect()
            if self._device == "cuda":
                import torch

                torch.cuda.empty_cache()  # what the failed job held, for the next one
        try:  # after the memory is given back: the VAE's cast needs a new copy of it
            self._restore_vaes()
        except Exception as exc:  # out of memory again: the next job's failure mends it, or says why
            log.warning("a VAE could not be put back to its dtype after a failed call: %s: %s", type(exc).__name__,
                        first_line(exc)[:200])
        if out_of_memory is not failure:
            raise failure  # a load that ran out of memory says so itself, as the model's failure
        # Nothing left the machine and nothing was charged: a smaller size or batch, or
        # another engine, may well succeed.
        error = EngineError(
            f"the {self._device or 'device'} ran out of memory; try a smaller size or n, or a lower "
            "ORCH_LITE_MAX_BATCH / ORCH_LOCAL_MAX_SIZE", details={"device": self._device or "unknown"},
            retryable=True, charged="no")
        # The request's size, not the engine's health: five large ones must not shut every
        # project's drafts out for the circuit's cooldown.
        error.engine_fault = False
        raise error from failure

    def _restore_vaes(self) -> None:
        """After a failed call: an SDXL pipeline casts its fp16 VAE to fp32 for the decode and back
        only when the decode succeeds. Left in fp32 (the decode is where a large image runs out of
        memory), the VAE refused the next job's fp16 latents ("Input type (c10::Half) and bias
        type (float) should be the same"), and every later SDXL job failed until a restart."""
        if self._device is None:
            return  # nothing was loaded
        dtype = self.dtype()
        for pipe in self._pipes.values():
            vae = getattr(pipe, "vae", None)
            if vae is not None and getattr(vae, "dtype", dtype) != dtype:
                vae.to(dtype=dtype)

    @property
    def device(self) -> str:
        if self._device is None:
            try:
                self._device = self._pick_device()
            except EngineUnavailable as exc:
                self.device_problem = exc.message
                raise
        return self._device

    def _pick_device(self) -> str:
        import torch

        wanted = self._requested_device
        if wanted == "auto":
            if torch.cuda.is_available():
                return "cuda"
            if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                return "mps"
            return "cpu"
        if wanted == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("ORCH_LITE_DEVICE=cuda but torch sees no CUDA device: set ORCH_LITE_DEVICE=auto "
                                    f"(or cpu), or install a CUDA build of torch (this one is {torch.__version__})")
        if wanted == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise EngineUnavailable("ORCH_LITE_DEVICE=mps but torch sees no Apple GPU (MPS is macOS on Apple "
                                    "silicon only): set ORCH_LITE_DEVICE=auto (or cpu)")
        return wanted

    def dtype(self) -> Any:
        import torch

        if self.device == "cuda":
            return torch.bfloat16 if self.settings.lite_dtype == "bf16" else torch.float16
        if self.device == "mps":
            return torch.float16
        return torch.float32

    def device_identity(self) -> str:
        """The device as the device lock names it (see `orchestrator.workers`): a CUDA GPU by its
        UUID when torch knows it, so `CUDA_VISIBLE_DEVICES=0`, the UUID form and no variable at all
        name one GPU alike."""
        device = self.device
        if device != "cuda":
            return device
        import torch

        uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
        return f"cuda-{uuid}" if uuid else device

    def load_failure(self, model: str, kind: PipelineKind | None = None) -> EngineUnavailable | None:
        """Why the model could not be loaded (or, given a `kind`, made that kind of pipeline), when
        it failed less than LOAD_RETRY_SECONDS ago."""
        identity = _identity(model)
        for failure in (self._load_failures.get(identity), self._unfit.get((identity, kind)) if kind else None):
            if failure is not None and time.monotonic() - failure[0] < LOAD_RETRY_SECONDS:
                return failure[1]
        return None

    def _unfit_for(self, model: str, kind: PipelineKind, message: str) -> EngineUnavailable:
        """The error for a model that cannot make `kind` pipelines, remembered for that kind's engine."""
        name = model_name(model) or model  # a job's error: never the server's path
        message = message.replace("{name}", name)
        # A copy is kept: the raised one's traceback holds the frames, and the pipeline they loaded.
        self._unfit[(_identity(model), kind)] = (time.monotonic(), EngineUnavailable(message, details={"model": name}))
        return EngineUnavailable(message, details={"model": name})

    # -- loading (inference thread only) -------------------------------------------------------

    def text2img(self, model: str) -> Any:
        with self._load_lock:
            key = self._key(model, "text2img")
            if key not in self._pipes:
                self._refuse_image_to_image_only(model)
                pipe = self._load(model)
                self._refuse_image_to_image_only(model)  # a Hub model's files are on disk only now
                self._pipes[key] = pipe
            return self._pipes[key]

    def _refuse_image_to_image_only(self, model: str) -> None:
        """Raise for a model whose folder (or cached snapshot) holds an image-to-image pipeline (an
        SDXL refiner): diffusers loads it as its family's text-to-image pipeline all the same, and
        every draft failed with "Model expects an added time embedding vector of length ..."."""
        source = self._source(model)
        if source.is_file():
            return
        folder = source if source.is_dir() else snapshot_folder(model)  # a Hub id's, once downloaded
        pipeline = _pipeline_class(folder) if folder is not None else None
        if pipeline is not None and "Img2Img" in pipeline:
            raise self._unfit_for(model, "text2img", f"model '{{name}}' is an image-to-image pipeline ({pipeline}): "
                                  "it makes no drafts; set ORCH_LITE_MODEL to a text-to-image model (it may "
                                  "still serve bridges and polishes as ORCH_HIFI_MODEL)")

    def img2img(self, model: str) -> Any:
        with self._load_lock:
            key = self._key(model, "img2img")
        if key in self._pipes:
            return self._pipes[key]
        if self._image_to_image_only(model):
            # An SDXL refiner has no text-to-image form: loaded as what it is.
            with self._load_lock:
                if key not in self._pipes:
                    self._pipes[key] = self._load(model, image_to_image=True)
                return self._pipes[key]
        base = self.text2img(model)
        with self._load_lock:
            if key not in self._pipes:
                from diffusers import AutoPipelineForImage2Image

                try:
                    pipe = AutoPipelineForImage2Image.from_pipe(base)
                except (ValueError, TypeError) as exc:  # a family diffusers has no img2img pipeline for
                    # Remembered: local-hifi said it was available, and every bridge was routed to it.
                    raise self._unfit_for(model, "img2img", f"model '{{name}}' has no image-to-image pipeline in "
                                          f"diffusers ({type(base).__name__}): choose another "
                                          "ORCH_HIFI_MODEL") from exc
                pipe.set_progress_bar_config(disable=True)
                self._pipes[key] = pipe
            return self._pipes[key]

    def _key(self, model: str, kind: str) -> tuple[str, str]:
        identity = _identity(model)
        self._follow(model, identity)
        return identity, kind

    def _follow(self, model: str, identity: str) -> None:
        """Drop the pipelines `model` was loaded as when it resolves elsewhere now (a link moved to
        deploy another model): kept, they held their memory beside the new model's for good. Kept
        while the path leads nowhere (a share unmounted for a while: back, it needs no new load),
        and while a model setting resolves there now (ORCH_HIFI_MODEL naming the old target)."""
        before = self._resolved.get(model)
        if before == identity or self._gone(model):
            return
        self._resolved[model] = identity
        if before is None or before in {_identity(m) for m in self._model_settings()}:
            return
        dropped = [key for key in self._pipes if key[0] == before]
        for key in dropped:
            del self._pipes[key]
        if dropped:
            log.info("model %s now resolves to %s: %s is unloaded", model, identity, before)
            self._free_device_memory()

    def _gone(self, model: str) -> bool:
        """Whether `model` resolved to a file or folder here before and leads nowhere now."""
        before = self._resolved.get(model)
        return before is not None and Path(before).is_absolute() and not home_expanded(model).exists()

    def _model_settings(self) -> set[str]:
        """The models this runtime's engines name now, and every one it has loaded."""
        named = {resolve_model(self.settings.lite_model), resolve_model(self.settings.effective_hifi_model)}
        return named | set(self._resolved)

    def _free_device_memory(self) -> None:
        # Pipelines hold reference cycles: freed only by the cycle collector, some time after
        # `empty_cache` had found nothing to give back.
        gc.collect()
        if self._device == "cuda":
            import torch

            torch.cuda.empty_cache()
        elif self._device == "mps":
            import torch

            torch.mps.empty_cache()

    def _image_to_image_only(self, model: str) -> bool:
        """Whether the model's folder (or Hub repository) holds an image-to-image pipeline."""
        source = self._source(model)
        if source.is_file():
            return False
        # A Hub id's cached snapshot is read as it is: asked through diffusers, the Hub was asked
        # for a newer revision first, which held the inference thread (10 s, or for good) where the
        # Hub took the connection and did not answer, and once answered moved the cache's `main` to
        # a snapshot of that one file, which then read as a download cut short and loaded offline no more.
        folder = source if source.is_dir() else snapshot_folder(model)
        if folder is not None:
            return "Img2Img" in (_pipeline_class(folder) or "")
        from diffusers import DiffusionPipeline

        try:  # not downloaded yet: the load that follows downloads it from the Hub anyway
            config = DiffusionPipeline.load_config(model)
        except (OSError, ValueError):  # not there, or not reachable: the normal load says why
            return False
        return "Img2Img" in str(config.get("_class_name", ""))

    def _load(self, model: str, *, image_to_image: bool = False) -> Any:
        failed = self.load_failure(model)
        if failed is not None:  # every job reloading a broken model, each failing alike, helps no one
            raise EngineUnavailable(failed.message, details=failed.details)
        try:
            pipe = self._load_pipeline(model, image_to_image=image_to_image)
        except EngineUnavailable as exc:
            # A copy: the error's traceback would keep what the failed load had made in memory.
            self._load_failures[_identity(model)] = (time.monotonic(),
                                                     EngineUnavailable(exc.message, details=exc.details))
            raise
        self._load_failures.pop(_identity(model), None)
        try:
            self._warm_up(pipe, model, image_to_image=image_to_image)
        except Exception as exc:  # an optimisation: the model is loaded; a job that fails alike says why
            log.warning("the warm-up of %s failed (the model stays loaded): %s: %s", model, type(exc).__name__,
                        first_line(exc)[:200])
        if self._previewer is None and self.settings.lite_preview_vae and self._is_lite(model):
            # With the model, not at its first step: the draft waited there with the device held
            # (for the Hub's retries too), had the wait counted in its device-seconds, and a
            # preload did not cover it.
            self._load_previewer(pipe)
        return pipe

    def _load_pipeline(self, model: str, *, image_to_image: bool = False) -> Any:
        with MODULE_BUILD_LOCK:
            return self._load_pipeline_locked(model, image_to_image=image_to_image)

    def _load_pipeline_locked(self, model: str, *, image_to_image: bool = False) -> Any:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
        from safetensors import SafetensorError

        source = self._source(model)
        log.info("loading %s on %s", model, self.device)
        auto = AutoPipelineForImage2Image if image_to_image else AutoPipelineForText2Image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # diffusers' torch_dtype -> dtype rename
                if (_is_path(model) or self._gone(model)) and not source.exists():
                    raise FileNotFoundError(model)  # told below, not as the Hub's failure
                if source.is_file():
                    pipe = self._load_single_file(source)
                else:
                    if source.is_dir():
                        _refuse_conditioned_folder(source)
                    _hub_answers_if_needed(model, source)
                    pipe = _on_lcm_scheduler(self._from_pretrained(auto, model, source), model)
            _refuse_conditioned_unet(pipe)
            if getattr(pipe, "safety_checker", None) is not None:
                pipe.safety_checker = None  # drafts are private sketches; the checker would black them out
            # In the try: a model that does not fit on the device is a failure to load it, remembered
            # for LOAD_RETRY_SECONDS. Taken as a request too large, every job read it from disk again
            # on the inference thread (the drafts waiting) and ran out of memory again.
            pipe = pipe.to(self.device)
        except Exception as exc:  # any failure to load is the model's, and told as one
            # OSError and ValueError mostly; SafetensorError for a .ckpt or a damaged file; diffusers'
            # own errors (a LoRA or VAE file given as a checkpoint) derive from Exception itself.
            first = first_line(exc)
            reason = f"{type(exc).__name__}: {first}" if not isinstance(exc, (OSError, ValueError)) else first
            snapshot = None if source.exists() else snapshot_folder(model)
            lacking = _snapshot_lacks(snapshot) if snapshot is not None else []
            if (_is_path(model) or self._gone(model)) and not source.exists():
                # There at start (else the engine says so), gone since: a share unmounted, a folder
                # moved (`share/sd15` too, which reads like a Hub id). It was blamed on the Hub.
                reason = "it is a path to nothing now: no such file or folder (moved, or on a share not mounted?)"
            elif not source.exists() and (snapshot is None or lacking) and not hf_hub_reachable():
                # diffusers then blames a missing file: the cause is the network.
                cached = (f"its download in the Hugging Face cache is incomplete ({', '.join(lacking)} missing)"
                          if snapshot is not None else "it is not in the Hugging Face cache")
                reason = (f"{cached} and the Hub did not answer "
                          "(offline? see HF_ENDPOINT, HF_HUB_OFFLINE; or give a local folder or file)")
            elif source.is_file() and not isinstance(exc, SafetensorError) and _hub_fetch_failed(exc):
                # from_single_file reads the model family's configuration from the Hub (or its cache).
                reason = ("a single checkpoint file needs its model family's configuration from the Hugging "
                          "Face Hub or its cache, and the Hub did not answer (load it once online, or convert "
                          f"it to a diffusers folder): {reason or type(exc).__name__}")
            # The job's error reaches its project's key: the model by its name, never the server's
            # path to it, nor to its Hugging Face cache (the log has the paths).
            log.warning("could not load model %s: %s", model, reason)
            name = model_name(model) or model
            reason = hide_paths(reason.replace(str(source), name).replace(model, name))
            raise EngineUnavailable(f"could not load model '{name}': {reason}"[:400],
                                    details={"model": name}) from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _from_pretrained(self, auto: Any, model: str, source: Path) -> Any:
        """A diffusers folder or Hub id's pipeline. A snapshot whose weights are all cached, loaded
        from the cache alone, may still lack a small file (a tokenizer's, a scheduler's): fetched
        then, where the Hub answers for the model."""
        options = self._folder_options(model, source)
        try:
            return auto.from_pretrained(str(source) if source.exists() else model, torch_dtype=self.dtype(), **options)
        except Exception as exc:
            if not (options.pop("local_files_only", False) and _hub_fetch_failed(exc)
                    and hf_hub_reachable(timeout=HUB_CHECK_SECONDS, file=f"{model}/model_index.json")):
                raise
        return auto.from_pretrained(model, torch_dtype=self.dtype(), **options)

    def _folder_options(self, model: str, source: Path) -> dict[str, Any]:
        """`from_pretrained`'s options for a diffusers folder or a Hub id: the fp16 variant when
        that is all the folder (or the Hub id's cached snapshot) holds; raises OSError naming the
        component folders a local folder lacks."""
        folder = source if source.is_dir() else None
        if folder is not None:
            missing = _missing_components(folder)
            if missing:
                raise OSError(f"the model folder lacks {', '.join(missing)}")
        options: dict[str, Any] = {}
        if folder is None and _is_hub_id(model):
            folder = snapshot_folder(model)
            if folder is not None and not _snapshot_lacks(folder):
                # From the cache alone, as the preview VAE is: asked first, a Hub (or a proxy, a
                # mirror) that takes the connection and never answers held the inference thread,
                # and every later draft behind it, for good. A draft needs nothing from the network.
                options["local_files_only"] = True
        # The weights are cast to the run's dtype all the same.
        if folder is not None and _fp16_only(folder):
            options["variant"] = "fp16"
        return options

    def _source(self, model: str) -> Path:
        if model == tiny.NAME:
            try:
                return tiny.save_tiny_pipeline(self.settings.cache_dir / "tiny-sd")
            except OSError as exc:
                # Unavailable for a while, saying why, as a model that fails to load: it read available,
                # and each job failed with an unexpected FileExistsError.
                error = EngineUnavailable(f"could not build the offline tiny model in ORCH_CACHE_DIR "
                                          f"({exc.strerror or type(exc).__name__})",
                                          details={"model": model, "setting": "ORCH_CACHE_DIR"})
                self._load_failures[_identity(model)] = (time.monotonic(), error)
                raise error from exc
        return home_expanded(model)

    def _load_single_file(self, path: Path) -> Any:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            family = single_file_family(f.keys())
            if family in SINGLE_FILE_FAMILIES:
                _refuse_conditioned_file(f)
        if family == NO_UNET:
            raise ValueError("it holds no Stable Diffusion UNet (no model.diffusion_model.* tensors: a LoRA, a VAE or "
                             "an embedding?): give a whole checkpoint, a diffusers folder or a Hub id")
        if family not in SINGLE_FILE_FAMILIES:
            # Read as Stable Diffusion, it failed offline with "load it once online", which fails too.
            raise ValueError(f"it is a single file of {family}, which is loaded from a diffusers folder or a Hub "
                             "id only: give one of those")
        cls = StableDiffusionXLPipeline if family == "SDXL" else StableDiffusionPipeline
        # Its family's configuration is read from the cache, where diffusers otherwise asks the Hub
        # first: a Hub that takes the connection and never answers (a proxy, a mirror) held the
        # inference thread for good, its client waiting without a timeout. (Not in the cache, the
        # configuration is fetched all the same: diffusers does so itself.)
        with _named_safetensors(path) as named:
            pipe = cls.from_single_file(str(named), torch_dtype=self.dtype(), local_files_only=True)
        if model_defaults(str(path)).few_step:
            pipe.scheduler = few_step_scheduler(pipe.scheduler, str(path))
        elif family == "SD 2.x":
            predicts = _sd2_prediction(path)
            if predicts is not None and predicts != pipe.scheduler.config.get("prediction_type"):
                pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=predicts)
        return _on_lcm_scheduler(pipe, str(path))

    def _warm_up(self, pipe: Any, model: str, *, image_to_image: bool = False) -> None:
        # One tiny step compiles kernels and allocates buffers before the first user waits on it.
        size = 64 if model == tiny.NAME else 256
        if image_to_image:
            from PIL import Image as PILImage

            pipe(prompt="warm-up", image=PILImage.new("RGB", (size, size)), strength=1.0, num_inference_steps=1,
                 guidance_scale=0.0, output_type="latent")
        else:
            pipe(prompt="warm-up", num_inference_steps=1, guidance_scale=0.0, width=size, height=size,
                 output_type="latent")

    def step_callback(self, progress: Progress, cancel: CancelToken, *, done: int, passes: int,
                      planned: int, size: tuple[int, int] | None = None,
                      ) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
        """A pipeline's `callback_on_step_end` for its pass `done` (0-based) of `passes` (a batch's
        chunks, a polish's tiles): a cancel stops it within the step (`_interrupt`), and each step
        is reported with a preview. The steps of a pass are the pipeline's own count, `planned`
        until it knows: some schedulers take one more than asked (PNDM), and strength decides an
        img2img pass's, so a count made beforehand took the bar past 100% and then back. `size`,
        the (width, height) the pass renders, is what unpacks FLUX's latents for its previews."""
        def on_step(pipeline: Any, i: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if cancel.cancelled:
                pipeline._interrupt = True
                raise Canceled("the job was canceled")
            per_pass = max(getattr(pipeline, "num_timesteps", 0) or planned, i + 1)
            progress.step(done * per_pass + i + 1, passes * per_pass,
                          self._step_preview(kwargs["latents"], pipeline, size))
            return kwargs

        return on_step

    def _step_preview(self, latents: Any, pipe: Any, size: tuple[int, int] | None = None) -> Image | None:
        """A step's preview, of its denoised estimate where the call runs in `denoised_previews` and
        its scheduler has one (`step_estimate`), else of its latents: every step's with the latent
        approximation; with a preview VAE, none until the time its last decode took has been given
        back `PREVIEW_VAE_SPACING` times over to the denoising (`preview_url` is optional in
        progress events)."""
        if self._previewer in (None, latents_to_preview, _no_preview) or not self._lite_pipe(pipe):
            return self.preview(step_estimate(pipe, latents), pipe, size=size)
        if time.monotonic() < self._vae_preview_after:
            return None
        began = time.monotonic()
        preview = self.preview(step_estimate(pipe, latents), pipe, size=size)
        ended = time.monotonic()
        self._vae_preview_after = ended + (ended - began) * PREVIEW_VAE_SPACING
        return preview

    def preview(self, latents: Any, pipe: Any = None, *, size: tuple[int, int] | None = None) -> Image | None:
        """A step's preview of `pipe`'s latents, or None. A preview is a nicety: a TAESD that cannot
        be loaded, or fails `PREVIEW_VAE_FAILURES` decodes in a row (it does not fit the model's
        latents), gives way to the approximation (a single failed decode gets it for that step),
        and an approximation that fails ends previews; neither ever fails the job. The preview VAE
        is the Lite model's (`ORCH_LITE_PREVIEW_VAE`), loaded with it: another model's pipelines
        (`local-hifi`'s, maybe of another latent family) get the approximation, and their failures
        end nothing. FLUX's packed latents are unpacked first, for both, with the image's
        (width, height), `size`; without it they get no preview, and the preview VAE is not asked
        to decode them (TAEF1 takes the unpacked ones)."""
        space = latent_space(pipe)
        if space is LatentSpace.SDXL:
            latents = _in_sdxl_scale(latents, pipe)
        elif space is LatentSpace.FLUX and latents.dim() == 3:
            latents = unpacked_flux_latents(latents, size, pipe)
            if latents is None:
                return None
        if not self._lite_pipe(pipe):
            try:
                return latents_to_preview(latents, space=space)
            except Exception as exc:
                log.debug("no step preview for this model: %s: %s", type(exc).__name__, first_line(exc)[:200])
                return None
        previewer = self._previewer
        if previewer is _no_preview:
            return None
        if previewer is not None and previewer is not latents_to_preview:
            try:
                image = previewer(latents, space=space)
            except Exception as exc:
                self._preview_vae_failed(exc)
            else:
                self._preview_failures = 0
                return image
        try:
            return latents_to_preview(latents, space=space)
        except Exception as exc:
            log.warning("step previews are off: %s: %s", type(exc).__name__, first_line(exc)[:200])
            self._previewer = _no_preview
            return None

    def _preview_vae_failed(self, exc: Exception) -> None:
        self._preview_failures += 1
        if self._preview_failures < PREVIEW_VAE_FAILURES:
            log.info("a decode of ORCH_LITE_PREVIEW_VAE failed (%d in a row; the step gets the latent approximation): "
                     "%s: %s", self._preview_failures, type(exc).__name__, first_line(exc)[:200])
            return
        log.warning("ORCH_LITE_PREVIEW_VAE=%s cannot preview this model (%d decodes failed in a row, the last %s: %s); "
                    "using the latent approximation", self.settings.lite_preview_vae, self._preview_failures,
                    type(exc).__name__, first_line(exc)[:200])
        self._previewer = latents_to_preview

    def _lite_pipe(self, pipe: Any) -> bool:
        """Whether `pipe` (None: not said) may be one of the Lite model's pipelines: it is not
        one this runtime loaded for another model."""
        if pipe is None or not self.settings.lite_preview_vae:
            return True
        lite = _identity(resolve_model(self.settings.lite_model))
        return not any(held is pipe and key[0] != lite for key, held in list(self._pipes.items()))

    def _is_lite(self, model: str) -> bool:
        return _identity(model) == _identity(resolve_model(self.settings.lite_model))

    def _load_previewer(self, pipe: Any = None) -> None:
        """Load the preview VAE (inference thread only); one that cannot be loaded, or whose latents
        are not `pipe`'s (the Lite model's), leaves the approximation, until a restart."""
        try:
            self._previewer = self._make_previewer(_vae_setting(pipe, "latent_channels"))
        except Exception as exc:
            log.warning("ORCH_LITE_PREVIEW_VAE=%s cannot be loaded (%s: %s); using the latent approximation",
                        self.settings.lite_preview_vae, type(exc).__name__, first_line(exc)[:200])
            self._previewer = latents_to_preview
        self._preview_failures = 0

    def _make_previewer(self, latent_channels: Any = None) -> Callable[..., Image | None]:
        """The preview VAE's decode. `latent_channels`, the Lite model's VAE's: a TAESD of another
        family (TAESD's 4 channels for an SD3 or FLUX model's 16) is refused here, saying so,
        rather than failing its first decodes while the device waits on them."""
        taesd = self.settings.lite_preview_vae
        if not taesd:
            return latents_to_preview
        from diffusers import AutoencoderTiny

        options = _single_model_options(taesd)
        source = home_expanded(taesd)
        with MODULE_BUILD_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' torch_dtype -> dtype rename
            vae = AutoencoderTiny.from_pretrained(str(source) if source.exists() else taesd, torch_dtype=self.dtype(),
                                                  **options).to(self.device)
        takes = getattr(vae.config, "latent_channels", None)
        if _is_number(latent_channels) and _is_number(takes) and takes != latent_channels:
            raise ValueError(f"it decodes latents of {takes} channels, the Lite model's have {latent_channels} "
                             "(the TAESD of another family)")

        def decode(latents: Any, *, space: LatentSpace = LatentSpace.SD) -> Image:  # the TAESD named is the family's
            import torch
            from PIL import Image as PILImage

            first = latents[:1].to(vae.dtype)
            height, width = (side * TAESD_SCALE for side in first.shape[-2:])
            # Shrunk before the decode, not after it: a full-size decode cost seconds a step on a CPU
            # (1.2 s at 512 px, 13 s at 1024), more than the step itself, for a picture shown small.
            shrink = math.ceil(max(first.shape[-2:]) * TAESD_SCALE / PREVIEW_MAX_SIDE)
            with torch.no_grad():
                if shrink > 1:
                    first = torch.nn.functional.avg_pool2d(first, shrink, ceil_mode=True)
                img = vae.decode(first).sample[0]
            arr = ((img.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            image = PILImage.fromarray(arr, mode="RGB")
            # The pooling rounds each side up: a few latents across (a 1032x64 strip) came out squashed.
            # The image's shape, at the size decoded (enlarged, a 520 px draft's 264 px would be 512).
            fits = min(PREVIEW_MAX_SIDE, max(image.size)) / max(height, width)
            size = (max(1, round(width * fits)), max(1, round(height * fits)))
            return image if image.size == size else image.resize(size, PILImage.Resampling.BILINEAR)

        return decode

    def shutdown(self, timeout: float = 0.0) -> bool:
        """Stop the inference thread (work not started is dropped) and, once it has ended, drop
        the models. True when it ended within `timeout` seconds: the device is idle then."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if timeout <= 0:
            return False
        waiter = threading.Thread(target=self._executor.shutdown, kwargs={"wait": True}, name="inference shutdown",
                                  daemon=True)
        waiter.start()
        waiter.join(timeout)
        if waiter.is_alive():
            return False
        self._pipes.clear()
        self._previewer = None  # its decode holds the preview VAE
        if self._device not in (None, "cpu"):
            # A GPU's cache is given back for the next process. Nothing was loaded, or only into
            # RAM, which the process's end (or the collector's next pass) frees: a full collection
            # of a process holding torch took a second and more, at every stop.
            self._free_device_memory()
        return True


def runtime_for(ctx: EngineContext) -> LocalRuntime:
    """The context's one runtime per device, created on first use (shared by lite and local-hifi)."""
    runtime = ctx.shared.get("local_runtime")
    if runtime is None:
        runtime = ctx.shared["local_runtime"] = LocalRuntime(ctx.settings)
    assert isinstance(runtime, LocalRuntime)
    return runtime


def _calls_on_device(function: object) -> bool:
    """Whether `function`'s code names `on_device` (`Progress.on_device`), in itself, a function
    nested in it or one it wraps (`functools.wraps`): what can be told of it without running it."""
    # Read as a class is made: whatever its attributes raise (a lazy proxy outside its context)
    # must not fail that, so it reads as not telling.
    try:
        function = getattr(function, "__func__", function)  # a staticmethod's or classmethod's
        with contextlib.suppress(ValueError):  # a cycle of `__wrapped__`
            function = inspect.unwrap(function) if callable(function) else function
        code = getattr(function, "__code__", None)
    except Exception:
        return False
    return isinstance(code, types.CodeType) and _names_on_device(code)


def _names_on_device(code: types.CodeType) -> bool:
    return "on_device" in code.co_names or any(
        isinstance(const, types.CodeType) and _names_on_device(const) for const in code.co_consts)


class LocalEngine:
    """What `lite` and `local-hifi` share: the device runtime, a resolved model with its defaults,
    no price (unless metered per device-second) and the size limits of local inference."""

    name: str
    kind: Literal["local"] = "local"
    # The pipeline its jobs run: a model unfit for it (`LocalRuntime.load_failure`) makes it unavailable.
    pipeline_kind: PipelineKind = "text2img"
    # Whether its work calls `Progress.on_device` once its model is loaded: an attempt that ends
    # without a result then counts toward its project's device time from there, its model's load
    # left out; else from its engine's start. Inherited only with the code that tells it
    # (`__init_subclass__`).
    tells_device_start: ClassVar[bool] = False
    # The methods whose code tells it, of a class that says `tells_device_start = True`: a subclass
    # that overrides none of them (its own, or a mixin's before it) keeps the value, where the class
    # that said it has every one of them. One that names none is read as `run`, trusted only where
    # that `run`'s own code calls `on_device` (not a helper it calls, which a subclass may override).
    device_start_told_by: ClassVar[tuple[str, ...]] = ("run",)
    # Whether its images are only ever RGB (`finite_images`), with no colour profile: a storage
    # quota holds its jobs at 3 bytes a pixel, no profile (`orchestrator.quota.image_bound`).
    # Said by each class for itself too: a subclass's own work may make other images.
    opaque_images: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "tells_device_start" in cls.__dict__:
            return
        # The class whose value it would inherit: where the attribute was said (or set here) last.
        sayer = next(base for base in cls.__mro__[1:] if "tells_device_start" in base.__dict__)
        # Where its names were said: the sayer's own line, else (a mixin without them) this class's.
        namer = next(base for base in (sayer.__mro__ if hasattr(sayer, "device_start_told_by") else cls.__mro__)
                     if "device_start_told_by" in base.__dict__)
        # One that names none is told by `run`, as a class that does not name them.
        told_by: tuple[str, ...] = namer.__dict__["device_start_told_by"] or ("run",)
        # Read as told by `run` without naming it, a class whose `run` hands the telling to a helper
        # passed it to a subclass overriding only that helper, whose attempts then counted 0: such
        # a class passes it on only where its `run`'s own code tells. Only a sayer of True: a False
        # set on a class that never said it (a mixin deriving from LocalEngine) hid `lite`'s True
        # from a class mixing it before `lite`.
        # Names a class above the sayer said describe that class's `run`: a sayer that replaced it
        # (a `lite` whose own `run` hands the work to a helper of its own) is read as naming none.
        replaced = (namer is not sayer
                    and inspect.getattr_static(sayer, "run", None) is not inspect.getattr_static(namer, "run", None))
        unnamed = namer is LocalEngine or not namer.__dict__["device_start_told_by"] or replaced
        if (sayer.__dict__["tells_device_start"] and unnamed
                and not _calls_on_device(inspect.getattr_static(sayer, "run", None))):
            cls.tells_device_start = False
        # A subclass whose own work never called it counted each failed attempt 0 s, whatever it
        # held: one that overrides a telling method tells only where it says so. One that keeps
        # them (`lite` renamed, or mixed with methods of its own) read False, and counted its load.
        # A name the sayer lacks (a mixin that says it without the code, a misspelt name) is code
        # nobody can be said to keep: compared as absent on both, it passed the value to engines
        # whose own `run` never tells.
        if sayer.__dict__["tells_device_start"] and not all(
                (method := inspect.getattr_static(sayer, name, None)) is not None
                and inspect.getattr_static(cls, name, None) is method
                for name in told_by):
            cls.tells_device_start = False
        if "opaque_images" not in cls.__dict__:
            cls.opaque_images = False

    def __init__(self, ctx: EngineContext, model_spec: str, capabilities: Capabilities) -> None:
        self.settings = ctx.settings
        self.runtime = runtime_for(ctx)
        self._model = resolve_model(model_spec)
        self._defaults = model_defaults(self._model)
        self._defaults_read = time.monotonic()
        self._defaults_of = _identity(self._model)  # what the model's path led to when they were read
        limit = ctx.settings.local_max_size
        self._capabilities = dataclasses.replace(capabilities, max_width=limit, max_height=limit,
                                                 max_size_setting="ORCH_LOCAL_MAX_SIZE",
                                                 min_side=MIN_SIDE, size_multiple=self._defaults.size_multiple)

    @property
    def defaults(self) -> ModelDefaults:
        """The model's defaults. Those its name and files do not tell yet (a Hub model before its
        first load has downloaded it, a file still being copied), and those of a path that leads
        elsewhere now (a link moved to deploy another model), are read again, at most every
        `DEFAULTS_RECHECK_SECONDS`: jobs ask on the event loop."""
        if time.monotonic() - self._defaults_read >= DEFAULTS_RECHECK_SECONDS:
            self._defaults_read = time.monotonic()
            identity = _identity(self._model)
            if self._defaults.told_by == "nothing" or identity != self._defaults_of:
                self._defaults, self._defaults_of = model_defaults(self._model), identity
        return self._defaults

    @property
    def capabilities(self) -> Capabilities:
        """Sizes in the multiples the model's family takes, as its defaults say now."""
        multiple = self.defaults.size_multiple
        if self._capabilities.size_multiple != multiple:
            self._capabilities = dataclasses.replace(self._capabilities, size_multiple=multiple)
        return self._capabilities

    @property
    def model(self) -> str:
        return self._model

    async def _on_device(self, fn: Callable[[RenderRequest, Progress, CancelToken], RenderResult],
                         req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        """Run `fn` on the inference thread. A cancel ends the job at once, even during a model's
        first load, which nothing can interrupt: the thread stops at its next denoising step on its
        own, its result is dropped, and the next job waits for it on the same thread."""
        return await cancel.race(self.runtime.call(fn, req, progress, cancel), charged="no")

    @property
    def model_setting(self) -> str:
        """The setting that names this engine's model."""
        return "ORCH_LITE_MODEL"

    @property
    def note(self) -> str | None:
        return tiny.note(self.model_setting) if self._model == tiny.NAME else None

    def availability(self) -> tuple[bool, str | None]:
        if self.runtime.device_problem:
            return False, self.runtime.device_problem
        failed = self.runtime.load_failure(self._model, self.pipeline_kind)
        if failed is not None:  # told with the model's name, never the server's paths
            return False, f"{failed.message} (a job tries again {LOAD_RETRY_SECONDS:.0f} s after the failure)"
        # A pickle can run code when loaded; the loader reads safetensors only. (A `.bin` or `.pt`
        # read available, and each draft failed with "SafetensorError: header too large".)
        if self._model.lower().endswith(".ckpt"):
            return False, f"model '{self._model}' is a .ckpt file: convert it to .safetensors"
        if not self._model.lower().endswith(".safetensors") and home_expanded(self._model).is_file():
            return False, (f"model '{self._model}' is not a .safetensors file, the only kind of single file loaded (a "
                           "pickle can run code): convert it to .safetensors, or give a diffusers folder")
        if _is_path(self._model) and not home_expanded(self._model).exists():
            # Else the loader takes it for a Hub id, and the first draft fails with a Hub error.
            return False, f"model '{self._model}' is a path to nothing: no such file or folder"
        if (self._model != tiny.NAME and not _is_hub_id(self._model)
                and not home_expanded(self._model).exists()):
            # `models/missing/sd-turbo` or `my model`: the loader would fail on the first draft
            # with a Hub validation error; say what is wrong before any job is taken. (A two-part
            # relative path, `models/sd-turbo`, reads as a Hub id: `./models/sd-turbo` is a path.)
            return False, (f"model '{self._model}' is neither an existing file or folder nor a Hugging Face "
                           "model id (org/name): give an absolute path, ./relative/path, or a Hub id")
        return True, None

    def prices(self) -> dict[str, Any]:
        return {"credits_per_gpu_second": self.settings.local_gpu_second_credits}

    def estimate(self, req: RenderRequest) -> int:
        """0 credits; raises `BadEngineInput` for a size local inference cannot take."""
        limit, multiple = self.settings.local_max_size, self.defaults.size_multiple
        for label, value in (("width", req.width), ("height", req.height)):
            if value % multiple or not MIN_SIDE <= value <= limit:
                raise BadEngineInput(
                    f"{label} must be a multiple of {multiple} between {MIN_SIDE} and {limit} for engine '{self.name}' "
                    f"(got {value})", details={"field": label, "value": value, "max": limit, "multiple": multiple},
                )
        return 0

    async def aclose(self) -> None:
        return None
