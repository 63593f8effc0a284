"""`builtin:tiny-sd`: a random-weight Stable Diffusion pipeline built offline from small configs.

It exists so tests, CI and `make demo` exercise the real diffusers code path (UNet, VAE, text
encoder, tokenizer, scheduler) on any machine without the network. Its images are noise.
The VAE has four blocks so its scale factor is 8 like real Stable Diffusion: a 512x512 image
denoises a 64x64 latent.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAME = "builtin:tiny-sd"

_VERSION = "2"
# Held while torch modules are made, here and by a load in tiers._local (see its MODULE_BUILD_LOCK);
# taken before the lock file, so a load building the model and a build on another thread cannot deadlock.
MODULE_BUILD_LOCK = threading.RLock()


def note(setting: str) -> str:
    """What an engine on the tiny model says of it: `setting` is the one that chose it."""
    return f"{NAME} has random weights: its images are noise (set {setting} to a real model)"


def _vocab() -> tuple[dict[str, int], list[str]]:
    # A byte-level BPE vocabulary small enough to build in memory: every printable byte, with
    # and without CLIP's end-of-word marker, plus the special tokens.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to code points >= 256.
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    return {t: i for i, t in enumerate(tokens)}, ["#version: 0.2"]


def save_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a normal diffusers folder (idempotent).

    It is built in a temporary folder and renamed into place, under a lock file: two processes
    starting at once never load a half-written model, nor remove the copy the other just made."""
    if _current(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with MODULE_BUILD_LOCK, open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _current(folder):  # built by another process while this one waited
            return folder
        staging = Path(tempfile.mkdtemp(prefix=".tiny-sd-", dir=folder.parent))
        try:
            _build(staging, seed)
            (staging / _FILES).write_text(_manifest(staging))
            (staging / _MARKER).write_text(_VERSION)
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)  # an older version
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s in %s", NAME, folder)
    return folder


# The version, alone in its file as releases before the list read it (a rolling upgrade sharing
# ORCH_CACHE_DIR must not have each release take the other's copy for stale and build it again
# under the other's load), and the list of every file and its size.
_MARKER, _FILES = ".tiny-sd-version", ".tiny-sd-files"


def _current(folder: Path) -> bool:
    """Whether the copy is of this version and whole. With the version alone trusted, a copy
    missing or cutting short a file (a disk cleaner, a full disk) failed every load after every
    restart, naming no folder to delete."""
    try:
        if (folder / _MARKER).read_text() != _VERSION:
            return False
        files = (folder / _FILES).read_text().splitlines()
        for line in files:
            name, _, size = line.rpartition("\t")
            if (folder / name).stat().st_size != int(size):
                return False
    except (OSError, ValueError):
        return False
    return bool(files)


def _manifest(folder: Path) -> str:
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name not in (_MARKER, _FILES))
    return "".join(f"{path.relative_to(folder)}\t{path.stat().st_size}\n" for path in files)


def _build(folder: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=600,
            max_position_embeddings=77,
        )
    )
    vocab, merges = _vocab()
    tok_dir = folder / "_tokenizer_src"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing",
        steps_offset=1,
    )
    pipe: Any = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
