from __future__ import annotations

import io
import struct
import zlib

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
