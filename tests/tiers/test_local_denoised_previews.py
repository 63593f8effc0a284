"""Step previews of the denoised estimate (x0), not the noisy latents (x_t): computed here apart,
from each step's model output, sample and sigma, as the scheduler defines it; the images the same
bytes; the scheduler's `step` its own again however the call ends; x_t where a scheduler has no x0."""

from __future__ import annotations

import contextlib
import gc
import inspect
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.errors import Canceled
from tests.conftest import SettingsFactory
from tests.tiers.conftest import EngineFactory, RecordingProgress, draft_image
from tests.tiers.test_local_loading import tiny_transformer_pipeline
from tiers import _local, lite, local_hifi
from tiers._local import latents_to_preview, runtime_for
from tiers.base import CancelToken, EngineContext, RenderRequest


def draft(**kw: Any) -> RenderRequest:
    return RenderRequest(**{"stage": "ideation", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4,
                            "seed": 1, "n": 1, **kw})


class PreviewProgress(RecordingProgress):
    """Records each step's preview as its bytes; `then(step)` runs after each step is recorded."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.previews: list[bytes | None] = []
        self.then = then

    def step(self, step: int, total: int, preview: Any = None) -> None:
        super().step(step, total)
        self.previews.append(None if preview is None else preview.tobytes())
        if self.then is not None:
            self.then(step)


class Steps:
    """Spies on a scheduler class's `step` (the class's, which the engines never touch): each
    step's x0, made here by `x0(scheduler, model_output, timestep, sample)` after the step, and its result
    x_t, as the maps a preview shows (no preview VAE: the SD 1.x approximation)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type,
                 x0: Callable[[Any, torch.Tensor, Any, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.x0: list[bytes] = []
        self.xt: list[bytes] = []
        self.x0_tensors: list[weakref.ref[torch.Tensor]] = []
        real = cls.step  # type: ignore[attr-defined]

        def step(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
                 **kwargs: Any) -> Any:
            out = real(scheduler, model_output, timestep, sample, *args, **kwargs)
            self.xt.append(preview_bytes(out[0]))
            if x0 is not None:
                self.x0.append(preview_bytes(x0(scheduler, model_output, timestep, sample)))
            estimate = getattr(out, "pred_original_sample", None)
            if estimate is not None:
                self.x0_tensors.append(weakref.ref(estimate))
            return out

        monkeypatch.setattr(cls, "step", step)


def preview_bytes(latents: torch.Tensor) -> bytes:
    image = latents_to_preview(latents)
    assert image is not None
    return image.tobytes()


def euler_x0(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    """Euler's x0 of an epsilon-predicting model (the tiny one's) without churn: sample - sigma x noise."""
    assert scheduler.config.prediction_type == "epsilon"
    return sample.to(torch.float32) - scheduler.sigmas[scheduler.step_index - 1] * model_output


def dpm_x0(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    """x0 = (sample - sigma_t x noise) / alpha_t, in DPM-Solver's parameterization of the step's sigma."""
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index - 1])
    return (sample - sigma_t * model_output) / alpha_t


async def with_scheduler(lite_engine: Any, cls: Any, **config: Any) -> Any:
    """The Lite model's pipeline, its scheduler made `cls` of its config (and `config`), on the
    inference thread: before local-hifi's pipeline is made from it, sharing it."""
    def use() -> Any:
        pipe = lite_engine.runtime.text2img(lite_engine.model)
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **config)
        return pipe

    return await lite_engine.runtime.call(use)


def own_step(pipe: Any, cls: type) -> bool:
    """The scheduler's `step` is its class's again, with nothing of the call left on the instance."""
    return "step" not in vars(pipe.scheduler) and pipe.scheduler.step.__func__ is cls.step  # type: ignore[attr-defined]


def close(a: bytes, b: bytes) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1


async def test_a_draft_s_step_previews_show_the_scheduler_s_denoised_estimate(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Euler's step previews showed its noisy latents x_t, mostly noise in a 4-step draft's first
    steps; each shows that step's x0 now, and the scheduler is left as it was, holding nothing."""
    from diffusers import EulerDiscreteScheduler

    lite_engine, _ = engines()
    pipe = await lite_engine.runtime.call(lite_engine.runtime.text2img, lite_engine.model)
    assert type(pipe.scheduler) is EulerDiscreteScheduler
    steps = Steps(monkeypatch, EulerDiscreteScheduler, euler_x0)
    progress = PreviewProgress()
    await lite_engine.run(draft(), progress, CancelToken())
    assert len(progress.previews) == 4
    assert progress.previews == steps.x0
    assert progress.previews[0] != steps.xt[0]
    assert own_step(pipe, EulerDiscreteScheduler)
    gc.collect()
    assert steps.x0_tensors and all(ref() is None for ref in steps.x0_tensors)


IDENTICAL = [("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
             ("PNDMScheduler", {"skip_prk_steps": True}), ("PNDMScheduler", {"skip_prk_steps": False}),
             ("DEISMultistepScheduler", {}), ("TCDScheduler", {}),
             ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
             ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"})]


@pytest.mark.parametrize(("scheduler", "config"), IDENTICAL, ids=[f"{name}-{config}" for name, config in IDENTICAL])
async def test_denoised_previews_leave_the_images_byte_identical(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch, scheduler: str, config: dict[str, Any]) -> None:
    """The scheduler's step is wrapped to keep its estimate, never to change its result. Behind a
    wrapper of another signature, the pipeline stopped passing `generator` to Euler Ancestral's
    step, whose noise then came from torch's global generator: other images for the same seed."""
    import diffusers

    lite_engine, hifi = engines()

    await with_scheduler(lite_engine, getattr(diffusers, scheduler), **config)
    bridge = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=4, seed=3, n=1,
                           init_image=draft_image(), strength=0.75)
    made: list[list[bytes]] = []
    for wrapped in (True, False):
        if not wrapped:
            monkeypatch.setattr(lite, "denoised_previews", lambda pipe: contextlib.nullcontext())
            monkeypatch.setattr(local_hifi, "denoised_previews", lambda pipe: contextlib.nullcontext())
        torch.manual_seed(len(made))  # the global generator differs between the runs: it must not matter
        drafts = await lite_engine.run(draft(n=2), PreviewProgress(), CancelToken())
        bridged = await hifi.run(bridge, PreviewProgress(), CancelToken())
        made.append([image.image.tobytes() for image in (*drafts.images, *bridged.images)])
    assert made[0] == made[1]


async def test_a_bridge_s_step_previews_show_the_denoised_estimate(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """local-hifi's image-to-image pipeline shares the Lite pipeline's scheduler (`from_pipe`):
    its previews get x0 too, and the shared scheduler is left as it was."""
    from diffusers import EulerDiscreteScheduler

    lite_engine, hifi = engines()
    await lite_engine.runtime.call(lite_engine.runtime.img2img, hifi.model)  # its warm-up steps before the spy's
    steps = Steps(monkeypatch, EulerDiscreteScheduler, euler_x0)
    progress = PreviewProgress()
    req = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=4, seed=3, n=1,
                        init_image=draft_image(), strength=0.75)
    await hifi.run(req, progress, CancelToken())
    assert progress.previews and progress.previews == steps.x0
    assert progress.previews[0] != steps.xt[0]
    for kind in ("text2img", "img2img"):
        assert own_step(lite_engine.runtime._pipes[(lite_engine.model, kind)], EulerDiscreteScheduler)


async def test_the_preview_vae_decodes_the_denoised_estimate(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORCH_LITE_PREVIEW_VAE's decodes get x0 too (here a stand-in that records what it is given)."""
    from diffusers import EulerDiscreteScheduler

    lite_engine, _ = engines(lite_preview_vae="/models/taesd")
    runtime = lite_engine.runtime
    await runtime.call(runtime.text2img, lite_engine.model)  # the preview VAE is loaded with it
    decoded: list[bytes] = []

    def decode(latents: torch.Tensor, *, space: _local.LatentSpace = _local.LatentSpace.SD) -> Any:
        decoded.append(preview_bytes(latents))
        return latents_to_preview(latents, space=space)

    runtime._previewer = decode
    steps = Steps(monkeypatch, EulerDiscreteScheduler, euler_x0)
    await lite_engine.run(draft(), PreviewProgress(), CancelToken())
    # Spaced by the time each decode took (none here): the first step's, and maybe others.
    assert decoded and decoded[0] == steps.x0[0] != steps.xt[0] and all(d in steps.x0 for d in decoded)


@pytest.mark.parametrize("ending", ["cancel", "error"])
async def test_the_scheduler_s_own_step_is_back_after_a_call_that_did_not_finish(
        engines: EngineFactory, ending: str) -> None:
    from diffusers import EulerDiscreteScheduler

    lite_engine, _ = engines()
    pipe = await lite_engine.runtime.call(lite_engine.runtime.text2img, lite_engine.model)
    cancel = CancelToken()

    def stop(step: int) -> None:
        if step == 2:
            if ending == "cancel":
                cancel.cancel()
            else:
                raise RuntimeError("a failure mid-call")

    with pytest.raises(Canceled if ending == "cancel" else RuntimeError):
        await lite_engine.run(draft(), PreviewProgress(stop), cancel)
    await lite_engine.runtime.call(lambda: None)  # a cancel returns at once: the call ends at its next step
    assert own_step(pipe, EulerDiscreteScheduler)


async def test_a_step_the_scheduler_had_wrapped_itself_is_put_back_as_it_was(engines: EngineFactory) -> None:
    lite_engine, _ = engines()
    pipe = await lite_engine.runtime.call(lite_engine.runtime.text2img, lite_engine.model)
    real = pipe.scheduler.step
    calls: list[int] = []

    def own(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    pipe.scheduler.step = own
    progress = PreviewProgress()
    await lite_engine.run(draft(), progress, CancelToken())
    assert vars(pipe.scheduler)["step"] is own and len(calls) == 4


async def test_dpm_solver_plus_plus_previews_show_its_denoised_estimate(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """DPM-Solver++ returns only the next sample, but keeps each step's x0 in `model_outputs`."""
    from diffusers import DPMSolverMultistepScheduler

    lite_engine, _ = engines()

    pipe = await with_scheduler(lite_engine, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    steps = Steps(monkeypatch, DPMSolverMultistepScheduler, dpm_x0)
    progress = PreviewProgress()
    await lite_engine.run(draft(), progress, CancelToken())
    assert len(progress.previews) == len(steps.x0) == 4
    assert all(close(shown, x0) for shown, x0 in zip(progress.previews, steps.x0, strict=True))  # type: ignore[arg-type]
    assert progress.previews[0] != steps.xt[0]
    assert own_step(pipe, DPMSolverMultistepScheduler)


def train_x0(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    """x0 of the sample the UNet saw at the train `timestep`, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise
    with a_t = alphas_cumprod[timestep], from its output of the scheduler's prediction type (float64)."""
    a = scheduler.alphas_cumprod[int(timestep)].to(torch.float64)
    x, out = sample.to(torch.float64), model_output.to(torch.float64)
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt()
    assert prediction == "v_prediction"
    return a.sqrt() * x - (1 - a).sqrt() * out


# SD 1.5's scheduler config (its PNDM's), which the others are made from, as a pipeline's are.
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}

# The schedulers whose step gives no x0 (and the noise forms of those that keep one in their x0 form).
WITHOUT_X0 = [
    ("PNDMScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": False}),
    ("PNDMScheduler", {"skip_prk_steps": False, "timestep_spacing": "trailing"}),
    ("PNDMScheduler", {"prediction_type": "v_prediction"}),
    ("DEISMultistepScheduler", {}),
    ("DEISMultistepScheduler", {"solver_order": 3}),
    ("TCDScheduler", {}),
    ("TCDScheduler", {"prediction_type": "v_prediction"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                     "prediction_type": "v_prediction"}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"predict_x0": False}),
]


@pytest.mark.parametrize(("name", "config"), WITHOUT_X0,
                         ids=[f"{name}-{config}" for name, config in WITHOUT_X0])
@pytest.mark.parametrize("timestep_as", ["tensor", "int"])
def test_a_step_without_an_x0_of_its_own_gets_the_x0_of_the_sample_the_unet_saw(
        name: str, config: dict[str, Any], timestep_as: str) -> None:
    """PNDM's steps (its Runge-Kutta ones, 4 model outputs a step, and PLMS's first, which goes on
    from the sample it kept), DEIS's, TCD's and DPM-Solver's in its noise form gave no x0: their
    previews showed x_t. Each step's is now the x0 of the sample it was given, at the timestep it
    was given, from its model output: the UNet's view, not the sample the step goes on from."""
    import diffusers

    scheduler = getattr(diffusers, name).from_config({**SD15_SCHEDULER, **config})
    scheduler.set_timesteps(4)
    pipe = type("Pipe", (), {"scheduler": scheduler})()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    noisy_seen = 0
    with _local.denoised_previews(pipe):
        assert isinstance(vars(scheduler)["step"], _local._DenoisedRecorder)
        # As the pipelines pass it: where the step's signature (the wrapper's, the step's) names it.
        extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in scheduler.timesteps:
            # A stand-in for the UNet whose output depends on what it is given, as the solvers' history does.
            model_output = 0.3 * sample + torch.randn(sample.shape, generator=generator)
            timestep = t if timestep_as == "tensor" else int(t)
            noisy = scheduler.step(model_output, timestep, sample, **extra, return_dict=False)[0]
            estimate = _local.step_estimate(pipe, noisy)
            assert estimate is not noisy and estimate.dtype == sample.dtype
            torch.testing.assert_close(estimate.to(torch.float64), train_x0(scheduler, model_output, t, sample),
                                       rtol=1e-4, atol=1e-4)
            noisy_seen += not torch.allclose(estimate, noisy, atol=1e-2)
            sample = noisy
    assert noisy_seen >= 1 and "step" not in vars(scheduler)
    assert len(scheduler.timesteps) == (13 if config.get("skip_prk_steps") is False else
                                        5 if name == "PNDMScheduler" else 4)


def test_the_x0_of_a_float16_step_is_made_in_float32_and_given_back_in_float16() -> None:
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(4)
    pipe = type("Pipe", (), {"scheduler": scheduler})()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((1, 4, 8, 8), generator=generator).to(torch.float16)
    model_output = (sample.to(torch.float32) * 0.9 + 1e-3).to(torch.float16)  # nearly all of x_t is noise
    t = scheduler.timesteps[0]
    with _local.denoised_previews(pipe):
        noisy = scheduler.step(model_output, t, sample).prev_sample
        estimate = _local.step_estimate(pipe, noisy)
    assert estimate.dtype == torch.float16
    expected = train_x0(scheduler, model_output, t, sample).to(torch.float16)
    torch.testing.assert_close(estimate, expected, rtol=1e-3, atol=1e-3)


def test_no_x0_is_made_where_the_step_s_inputs_do_not_give_one() -> None:
    """An unknown prediction type, no `alphas_cumprod`, a timestep that is not a train timestep, a
    model output of another shape (a learned variance's 8 channels): no x0, the preview shows x_t."""
    sample, out = torch.ones((1, 4, 8, 8)), torch.zeros((1, 4, 8, 8))
    alphas = torch.linspace(0.99, 0.01, 1000)

    def scheduler(prediction_type: str = "epsilon", alphas_cumprod: Any = alphas) -> Any:
        return type("Scheduler", (), {"config": {"prediction_type": prediction_type},
                                      "alphas_cumprod": alphas_cumprod})()

    x0 = _local._x0_at_timestep
    assert x0(scheduler(), out, torch.tensor(500), sample) is not None
    assert x0(scheduler("flow_prediction"), out, 500, sample) is None
    assert x0(scheduler(alphas_cumprod=None), out, 500, sample) is None
    assert x0(scheduler(), out, 1000, sample) is None
    assert x0(scheduler(), out, -1, sample) is None
    assert x0(scheduler(), out, torch.tensor(500.5), sample) is None
    assert x0(scheduler(), torch.zeros((1, 8, 8, 8)), 500, sample) is None


def train_x0_of_pipeline(scheduler: Any, model_output: torch.Tensor, timestep: Any,
                         sample: torch.Tensor) -> torch.Tensor:
    return train_x0(scheduler, model_output, timestep, sample).to(sample.dtype)


E2E = [("PNDMScheduler", {"skip_prk_steps": True}), ("PNDMScheduler", {"skip_prk_steps": False}),
       ("DEISMultistepScheduler", {}), ("TCDScheduler", {}),
       ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"})]


@pytest.mark.parametrize(("name", "config"), E2E, ids=[f"{name}-{config}" for name, config in E2E])
async def test_a_draft_s_previews_show_x0_with_pndm_deis_tcd_and_dpm_solver_s_noise_form(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch, name: str, config: dict[str, Any]) -> None:
    """PNDM is SD 1.5's default scheduler: a draft's step previews showed x_t, mostly noise in its
    first steps; each shows that step's x0 now, and the scheduler is left as it was."""
    import diffusers

    cls = getattr(diffusers, name)
    lite_engine, _ = engines()

    pipe = await with_scheduler(lite_engine, cls, **config)
    steps = Steps(monkeypatch, cls, train_x0_of_pipeline)
    progress = PreviewProgress()
    await lite_engine.run(draft(), progress, CancelToken())
    assert len(progress.previews) == len(steps.x0) == len(pipe.scheduler.timesteps) >= 4
    assert all(close(shown, x0) for shown, x0 in zip(progress.previews, steps.x0, strict=True))  # type: ignore[arg-type]
    assert progress.previews[0] != steps.xt[0]
    assert own_step(pipe, cls)


async def test_a_scheduler_without_a_denoised_estimate_keeps_previews_of_the_latents(
        engines: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """IPNDM's step gives no x0, and its sample is not one of the training's noise schedule."""
    from diffusers import IPNDMScheduler

    lite_engine, _ = engines()

    pipe = await with_scheduler(lite_engine, IPNDMScheduler)
    steps = Steps(monkeypatch, IPNDMScheduler)
    progress = PreviewProgress()
    await lite_engine.run(draft(), progress, CancelToken())
    assert progress.previews and progress.previews == steps.xt
    assert own_step(pipe, IPNDMScheduler)


@pytest.fixture
def flow_runtime(make_settings: SettingsFactory) -> Iterator[_local.LocalRuntime]:
    runtime = runtime_for(EngineContext(settings=make_settings()))
    try:
        yield runtime
    finally:
        runtime.shutdown(timeout=30)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_matching_previews_show_sample_minus_sigma_times_velocity(
        flow_runtime: _local.LocalRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, family: str) -> None:
    """FlowMatchEulerDiscreteScheduler's step returns only the next sample: x0 is made from the
    step's sample, velocity and sigma, x0 = sample - sigma x velocity; at the last step (the next
    sigma 0) it is the latents the pipeline returns."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_transformer_pipeline(family, tmp_path)
    width, height = 128, 64
    expected: list[bytes] = []
    noisy: list[bytes] = []
    real = FlowMatchEulerDiscreteScheduler.step

    def step(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             **kwargs: Any) -> Any:
        out = real(scheduler, model_output, timestep, sample, *args, **kwargs)
        x0 = sample.to(torch.float32) - scheduler.sigmas[scheduler.step_index - 1] * model_output
        for latents, made in ((x0, expected), (out[0], noisy)):
            preview = flow_runtime.preview(latents, pipe, size=(width, height))
            assert preview is not None
            made.append(preview.tobytes())
        return out

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", step)
    progress = PreviewProgress()
    on_step = flow_runtime.step_callback(progress, CancelToken(), done=0, passes=1, planned=3, size=(width, height))
    with torch.inference_mode(), _local.denoised_previews(pipe):
        out = pipe(prompt="a lighthouse", num_inference_steps=3, width=width, height=height, guidance_scale=1.0,
                   max_sequence_length=16, output_type="latent", generator=torch.Generator("cpu").manual_seed(1),
                   **_local.step_arguments(pipe, on_step))
    assert len(progress.previews) == 3 and progress.previews == expected
    assert progress.previews[0] != noisy[0]
    final = flow_runtime.preview(out.images, pipe, size=(width, height))
    assert final is not None and progress.previews[-1] == final.tobytes()
    assert own_step(pipe, FlowMatchEulerDiscreteScheduler)
