from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from orchestrator.errors import EngineError
from tiers._images import decode_image


def png_declaring(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header declares `width` x `height` pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def cut_off_png() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()[:200]  # the header reads; the pixels do not


@pytest.mark.parametrize(("data", "told"), [
    (b"<html>not an image</html>", "not a PNG, JPEG or WebP image"),
    (png_declaring(30_000, 30_000), "too large to decode"),   # past PIL's own bomb limit
    (png_declaring(12_000, 12_000), "more than"),             # past ours
    (cut_off_png(), "not an image"),
], ids=["html", "bomb", "over-our-cap", "cut-off"])
def test_an_image_that_is_not_decoded_names_the_engine_as_every_engine_error_does(data: bytes, told: str) -> None:
    # The job's error details had no engine for these alone: a client reading `details.engine`
    # could not tell which provider sent the bad image.
    with pytest.raises(EngineError, match=told) as info:
        decode_image(data, "prov")
    assert info.value.details["engine"] == "prov"


@pytest.mark.parametrize(("engine", "settings", "made"), [
    ("fal", {"fal_api_key": "k"}, (512, 512)),  # 0.5K: a 256 px draft is asked (and paid) at it
    ("replicate", {"replicate_api_key": "k"}, (1024, 1024)),  # google/nano-banana-2: 1K
    ("replicate", {"replicate_api_key": "k", "replicate_model": "black-forest-labs/flux-1.1-pro"}, (1024, 1024)),
])
def test_a_provider_that_picks_the_size_is_held_at_the_largest_it_returns(
        make_ctx: Any, engine: str, settings: dict[str, Any], made: tuple[int, int]) -> None:
    """fal and Replicate answer in a size class whatever was asked, as Gemini does: a job's storage
    bound was of the 256x256 asked, a sixteenth of the 1K image its provider returns."""
    from orchestrator import quota
    from tiers.base import RenderRequest
    from tiers.fal import FalEngine
    from tiers.replicate import ReplicateEngine

    eng = (FalEngine if engine == "fal" else ReplicateEngine)(make_ctx(**settings))
    asked = RenderRequest(stage="ideation", prompt="p", n=1, width=256, height=256)
    width, height = quota.output_size(eng, asked)
    assert width * height >= made[0] * made[1] and height >= max(made)
    params = {"prompt": "p"}
    assert quota.job_bound(eng, asked, params) >= quota.image_bound(*made, quota.text_bound(params))
