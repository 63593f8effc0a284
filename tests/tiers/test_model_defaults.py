"""Per-model defaults of the local engines, from the model's name."""

from __future__ import annotations

import pytest

from tiers._local import ModelDefaults, few_step_scheduler, model_defaults

# SD3 and FLUX patch their latents: sizes in multiples of 16.
TRANSFORMER = ModelDefaults(steps=28, guidance_scale=3.5, native_size=1024, size_multiple=16)
TRANSFORMER_FAST = ModelDefaults(steps=4, guidance_scale=0.0, native_size=1024, size_multiple=16)
TURBO = ModelDefaults(steps=2, guidance_scale=0.0, native_size=512, few_step=True)


@pytest.mark.parametrize(("model", "expected"), [
    ("stabilityai/sd-turbo", TURBO),
    ("stabilityai/sdxl-turbo", TURBO),  # trained at 512
    ("ByteDance/SDXL-Lightning", ModelDefaults(steps=4, guidance_scale=0.0, native_size=1024, few_step=True)),
    # Latent consistency pipelines compute w = guidance - 1: guidance 0 would be w = -1.
    ("SimianLuo/LCM_Dreamshaper_v7", ModelDefaults(steps=4, guidance_scale=8.5, native_size=512)),
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
    given.set_timesteps(2)
    assert given.timesteps.tolist() == [501, 1]
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
