"""Real single-file checkpoints (SDXL, SD 2.x, SD 1.x) in the original (LDM/A1111) format, loaded
through the project's path by diffusers' own `from_single_file`, offline: every other single-file
test mocks that call.

A checkpoint is a tiny random pipeline written out under the original format's tensor names (the
reverse of diffusers' LDM-to-diffusers conversion). The configuration diffusers reads for the
family (stabilityai/stable-diffusion-xl-base-1.0, stabilityai/stable-diffusion-2-1,
stable-diffusion-v1-5/stable-diffusion-v1-5) is that tiny pipeline's, in a Hugging Face cache
under tmp_path: what a first load online leaves."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiers.conftest import EngineFactory, RecordingProgress, draft_image
from tests.tiers.test_local_loading import draft, hub_cache
from tiers import tiny
from tiers._family import model_defaults
from tiers.base import CancelToken, RenderRequest
from tiers.local_hifi import tile_boxes


def _clip(width: int, layers: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=width, intermediate_size=37,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=layers, vocab_size=600,
                          max_position_embeddings=77, projection_dim=width, hidden_act="gelu")


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, sample_size=64,
    )


def _tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = tiny._vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _tiny_sd2(folder: Path) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    # diffusers tells an SD 2.x file by the second attention of its first level (`input_blocks.2.1`)
    # reading a context 1024 wide, OpenCLIP-H's: so that level has attention, and two layers.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=1024, norm_num_groups=8,
    )
    # SD 2.1's own scheduler, v-prediction.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    return StableDiffusionPipeline(unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_clip(1024, 1)),
                                   tokenizer=_tokenizer(folder), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _tiny_sdxl(folder: Path) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # Two levels of two layers, as SDXL has three of two: the original format numbers them in threes.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=96,
        cross_attention_dim=80, norm_num_groups=8,
    )

    tokenizer = _tokenizer(folder)
    return StableDiffusionXLPipeline(
        # Of two widths, as SDXL's are (768 and 1280): diffusers tells its encoders apart by their width.
        unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_clip(32, 2)),
        # diffusers tells an SDXL file by its second text encoder's tenth layer.
        text_encoder_2=CLIPTextModelWithProjection(_clip(48, 10)), tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )


_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _unet_key(key: str, per_block: int, up_with_attention: set[int]) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping: Any = DIFFUSERS_TO_LDM_MAPPING["unet"]  # conv_in, conv_out, the time and size embeddings
    named: dict[str, str] = {**mapping["layers"], **mapping["addition_embed_type"]}
    if key in named:
        return named[key]
    match = re.fullmatch(r"(down_blocks|up_blocks|mid_block)\.(\d*)\.?(\w+)\.(\d+)\.(.*)", key)
    assert match is not None, key
    side, level, part, index, rest = match.groups()
    b, j, n = int(level or 0), int(index), per_block + 1
    if part == "resnets":
        for new, old in _RESNET:
            rest = rest.replace(new, old)
    if side == "mid_block":
        return f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"
    if part == "downsamplers":
        return f"input_blocks.{(b + 1) * n}.0.op.{rest.removeprefix('conv.')}"
    if part == "upsamplers":
        return f"output_blocks.{b * n + per_block}.{2 if b in up_with_attention else 1}.{rest}"
    slot = 0 if part == "resnets" else 1
    if side == "down_blocks":
        return f"input_blocks.{b * n + j + 1}.{slot}.{rest}"
    return f"output_blocks.{b * n + j}.{slot}.{rest}"


def _vae_key(key: str, levels: int) -> str:
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = re.sub(r"down_blocks\.(\d)\.(resnets|downsamplers\.0)",
                 lambda m: f"down.{m[1]}.{'block' if m[2] == 'resnets' else 'downsample'}", key)
    key = re.sub(r"up_blocks\.(\d)\.(resnets|upsamplers\.0)",
                 lambda m: f"up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}", key)
    if "mid_block.attentions.0." in key:
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
        key = re.sub(r"to_([qkv])\.", r"\1.", key).replace("to_out.0.", "proj_out.")
    return key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")


def _open_clip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    if "text_projection.weight" in weights:  # SDXL's; SD 2.x's encoder has none
        renamed["text_projection"] = weights.pop("text_projection.weight").T.contiguous()
    # transformers' CLIPTextModel names its tensors without the `text_model.` that the mapping has.
    weights = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in weights.items()}
    for key, value in weights.items():
        if re.search(r"\.[kv]_proj\.", key):
            continue
        if ".q_proj." in key:  # one in_proj of q, k and v
            value = torch.cat([weights[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            key = key.replace("self_attn.q_proj.", "self_attn.in_proj_")
        for new, old in (("text_model.embeddings.position_embedding.weight", "positional_embedding"),
                         ("text_model.embeddings.", ""), ("text_model.final_layer_norm", "ln_final"),
                         ("text_model.encoder.layers.", "transformer.resblocks."), ("self_attn", "attn"),
                         ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("fc1", "c_fc"), ("fc2", "c_proj")):
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def ldm_checkpoint(pipe: Any) -> dict[str, torch.Tensor]:
    """An SD 1.x, SD 2.x or SDXL pipeline's weights under the original format's names, as an A1111
    or Civitai file has them."""
    unet, vae = pipe.unet.config, pipe.vae.config
    up_with_attention = {i for i, kind in enumerate(unet.up_block_types) if "CrossAttn" in kind}
    levels = len(vae.down_block_types)
    out = {f"model.diffusion_model.{_unet_key(k, unet.layers_per_block, up_with_attention)}": v
           for k, v in pipe.unet.state_dict().items()}
    for key, value in pipe.vae.state_dict().items():
        if re.search(r"attentions\.0\.(to_[qkv]|to_out\.0)\.weight", key):
            value = value[:, :, None, None]  # 1x1 convolutions in the original
        out[f"first_stage_model.{_vae_key(key, levels)}"] = value
    xl = getattr(pipe, "text_encoder_2", None) is not None
    if unet.cross_attention_dim == 1024 and not xl:  # SD 2.x: OpenCLIP, its only text encoder
        for key, value in _open_clip(pipe.text_encoder.state_dict()).items():
            out[f"cond_stage_model.model.{key}"] = value
        return {k: v.contiguous() for k, v in out.items()}
    clip = "conditioner.embedders.0.transformer" if xl else "cond_stage_model.transformer"
    for key, value in pipe.text_encoder.state_dict().items():
        out[f"{clip}.text_model.{key.removeprefix('text_model.')}"] = value
    if xl:
        for key, value in _open_clip(pipe.text_encoder_2.state_dict()).items():
            out[f"conditioner.embedders.1.model.{key}"] = value
    return {k: v.contiguous() for k, v in out.items()}


# Where diffusers reads each family's configuration for a single file; the file's name; the guidance
# its drafts get. SD-Turbo (the default Lite model's family) is an SD 2.1 file: its name says Turbo.
CASES = {"SDXL": ("stabilityai/stable-diffusion-xl-base-1.0", "dreamy_v10", 5.0),
         "SD 2.x": ("stabilityai/stable-diffusion-2-1", "sd_turbo", 0.0),
         "SD 1.x": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "dreamy_v10", 7.5)}


@pytest.fixture(params=list(CASES))
def single_file(request: pytest.FixtureRequest, tmp_path: Path, tiny_cache_dir: Path,
                monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Any, float]:
    """A tiny single file of the family, the pipeline it was made of with the scheduler it must run
    on, and its guidance; the family's configuration in the Hugging Face cache. Its name does not
    tell its family (SDXL, SD 2.x or SD 1.x): its tensors do."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    repo, name, guidance = CASES[request.param]
    source = tmp_path / "source"
    source.mkdir()
    if request.param == "SD 1.x":
        shutil.copytree(tiny_cache_dir / "tiny-sd", source / "diffusers", ignore=shutil.ignore_patterns(".tiny-sd-*"))
        pipe = StableDiffusionPipeline.from_pretrained(source / "diffusers")
    else:
        pipe = _tiny_sdxl(source) if request.param == "SDXL" else _tiny_sd2(source)
        pipe.save_pretrained(source / "diffusers")
    configs = tmp_path / "configs"
    shutil.copytree(source / "diffusers", configs, ignore=shutil.ignore_patterns("*.safetensors"))
    if request.param == "SD 1.x":  # as the real repository's: a safety checker, and its image processor
        from transformers import CLIPImageProcessor

        index = json.loads((configs / "model_index.json").read_text())
        index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                     feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
        (configs / "model_index.json").write_text(json.dumps(index))
        CLIPImageProcessor().save_pretrained(configs / "feature_extractor")
    if request.param == "SD 2.x":
        # Not SD 2.1's DDIM with v-prediction, which the cache gives the file: Turbo is an epsilon
        # model distilled to start from pure noise, as SD-Turbo's own folder configures its Euler.
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                            prediction_type="epsilon")
    hub_cache(tmp_path, repo, configs, monkeypatch)
    checkpoint = tmp_path / f"{name}.safetensors"
    save_file(ldm_checkpoint(pipe), str(checkpoint))
    return checkpoint, pipe, guidance


async def test_a_real_single_file_drafts_and_bridges_offline(engines: EngineFactory,
                                                             single_file: tuple[Path, Any, float]) -> None:
    checkpoint, made, guidance = single_file
    lite, hifi = engines(lite_model=str(checkpoint), hifi_model=str(checkpoint), lite_device="cpu")
    drafted = await lite.run(draft(n=1, steps=2), RecordingProgress(), CancelToken())
    bridged = await hifi.run(RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, seed=1, n=1,
                                           steps=2, init_image=drafted.images[0].image, strength=0.5),
                             RecordingProgress(), CancelToken())
    loaded = lite.runtime._pipes[(str(checkpoint), "text2img")]
    assert type(loaded) is type(made)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # every tensor read back under its own name
        if getattr(made, name, None) is None:
            continue
        expected, got = getattr(made, name).state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == expected.keys(), name
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert lite.runtime._pipes[(str(checkpoint), "img2img")].unet is loaded.unet  # the bridge shares its weights
    assert loaded.scheduler.config.prediction_type == made.scheduler.config.prediction_type
    for result in (drafted, bridged):
        assert [image.image.size for image in result.images] == [(64, 64)]
        assert (result.metadata["steps"], result.metadata["guidance_scale"]) == (2, guidance)
        # The scheduler of the family's configuration in the cache; a Turbo's, for a Turbo.
        assert result.metadata["sampler"] == "EulerDiscreteScheduler"
        assert result.metadata["sampler_settings"]["timestep_spacing"] == made.scheduler.config.timestep_spacing
    assert bridged.metadata["strength"] == 0.5


# AUTOMATIC1111's LDM configs for SD 2.x, cut to the lines that matter: 2.x-base's has no
# `parameterization` (LDM's default, epsilon); 2.1's (768 px) says "v".
_LDM_CONFIG = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:{v}
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 64
    conditioning_key: crossattn
    scale_factor: 0.18215
"""
EPSILON_CONFIG = _LDM_CONFIG.format(v="")
V_CONFIG = _LDM_CONFIG.format(v='\n    parameterization: "v"')


def _sd2_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Any]:
    """A tiny SD 2.x file, models/dreamy_v20.safetensors (its name says nothing of a few-step
    model, nor of a 512 or 768 px one), and the pipeline it was made of; SD 2.1's configuration in the cache, DDIM
    with v-prediction, as diffusers gives every SD 2.x file."""
    from safetensors.torch import save_file

    source = tmp_path / "source"
    source.mkdir()
    made = _tiny_sd2(source)
    made.save_pretrained(source / "diffusers")
    configs = tmp_path / "configs"
    shutil.copytree(source / "diffusers", configs, ignore=shutil.ignore_patterns("*.safetensors"))
    hub_cache(tmp_path, CASES["SD 2.x"][0], configs, monkeypatch)
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = models / "dreamy_v20.safetensors"
    save_file(ldm_checkpoint(made), str(checkpoint))
    return checkpoint, made


def test_an_sd2_file_predicts_as_the_ldm_config_beside_it_says(
        engines: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    checkpoint, made = _sd2_file(tmp_path, monkeypatch)
    models = checkpoint.parent
    turbo = models / "sd_turbo.safetensors"
    shutil.copyfile(checkpoint, turbo)
    lite, _ = engines(lite_model=str(checkpoint), lite_device="cpu")
    caplog.set_level(logging.WARNING, logger="tiers._local")

    def loaded(model: Path, sidecar: str | None, text: str = "") -> str:
        for stale in (*models.glob("*.yaml"), *models.glob("*.yml")):
            stale.unlink()
        if sidecar is not None:
            (models / sidecar).write_text(text)
        caplog.clear()
        scheduler = lite.runtime._load_pipeline(str(model)).scheduler
        if model == checkpoint:  # the sampler otherwise as diffusers gave it
            assert type(scheduler) is type(made.scheduler)
            assert scheduler.config.timestep_spacing == made.scheduler.config.timestep_spacing
        predicts = str(scheduler.config.prediction_type)
        # Its defaults' size is the one of the model it is sampled as: 2.x-base's 512 px, 2.1's 768.
        assert model_defaults(str(model)).native_size == {"epsilon": 512, "v_prediction": 768}[predicts]
        return predicts

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "tiers._local" and r.levelno >= logging.WARNING]

    assert loaded(checkpoint, None) == "v_prediction"  # diffusers' choice, as before
    assert not warned()
    assert loaded(checkpoint, "dreamy_v20.yaml", EPSILON_CONFIG) == "epsilon"
    assert loaded(checkpoint, "dreamy_v20.yml", EPSILON_CONFIG) == "epsilon"
    assert loaded(checkpoint, "dreamy_v20.yaml", V_CONFIG) == "v_prediction"
    assert not warned()
    # One that cannot be parsed leaves diffusers' choice, and says so; the model loads all the same.
    assert loaded(checkpoint, "dreamy_v20.yaml", "model:\n  params: [unclosed\n") == "v_prediction"
    assert len(warned()) == 1
    assert "dreamy_v20.yaml" in warned()[0]
    # Without a config, Stability's own names say it: 2.1-base's file was sampled as 2.1's v model.
    base, v_model = models / "v2-1_512-ema-pruned.safetensors", models / "768-v-ema.safetensors"
    for copy in (base, v_model):
        shutil.copyfile(checkpoint, copy)
    assert loaded(base, None) == "epsilon"
    assert loaded(v_model, None) == "v_prediction"
    # The config comes first, and one passed over leaves the name to say it.
    assert loaded(base, "v2-1_512-ema-pruned.yaml", V_CONFIG) == "v_prediction"
    assert loaded(base, "v2-1_512-ema-pruned.yaml", "model:\n  params: [unclosed\n") == "epsilon"
    # A few-step file's rule comes first: Turbo is an epsilon model, whatever a config beside it says.
    assert loaded(turbo, "sd_turbo.yaml", V_CONFIG) == "epsilon"


async def test_a_2x_base_file_is_polished_in_tiles_of_its_own_512_px(
        engines: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an epsilon config beside it, a 2.x-base file was sampled as the 512 px model it is but
    polished in tiles of 2.1's 768 px: a 704 px polish was one pass, nearly twice its native size."""
    checkpoint, _ = _sd2_file(tmp_path, monkeypatch)
    checkpoint.with_suffix(".yaml").write_text(EPSILON_CONFIG)
    _, hifi = engines(lite_model=str(checkpoint), lite_device="cpu")
    assert hifi.defaults.public()["native_size"] == 512
    polished = await hifi.run(RenderRequest(stage="polish", prompt="a lighthouse", width=704, height=704, seed=1,
                                            n=1, steps=2, creativity=0.5, init_image=draft_image((352, 352))),
                              RecordingProgress(), CancelToken())
    assert [image.image.size for image in polished.images] == [(704, 704)]
    assert polished.metadata["tiles"] == len(tile_boxes(704, 704, 512)) > 1
