"""Image helpers shared by engines: encoding inputs the way a provider accepts them, decoding
what it returns, and mapping pixel sizes onto the provider's size vocabulary."""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from orchestrator.errors import EngineError


def encode_image(image: Image.Image, *, fmt: str = "PNG", max_bytes: int | None = None,
                 max_side: int | None = None) -> bytes:
    """Encode `image` as `fmt`, shrinking it until it fits `max_side` and `max_bytes`."""
    img = image.convert("RGB") if fmt.upper() in ("JPEG", "WEBP") or image.mode not in ("RGB", "RGBA") else image
    if max_side and max(img.size) > max_side:
        img = _scaled(img, max_side / max(img.size))
    while True:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 92} if fmt.upper() == "JPEG" else {}))
        data = buf.getvalue()
        if max_bytes is None or len(data) <= max_bytes or min(img.size) <= 64:
            return data
        img = _scaled(img, 0.8)


def _scaled(img: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, Image.Resampling.LANCZOS)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_tolerant(data: str, engine: str) -> bytes:
    """Decode standard or URL-safe base64, with or without padding (Google's SDK sends URL-safe)."""
    cleaned = "".join(data.split()).replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EngineError(f"{engine}: the provider returned image data that is not valid base64",
                          details={"engine": engine}) from exc


# The largest image an engine may return: a request's largest side (8192) squared. A few hundred
# KB of PNG can declare far more pixels than that, which decoding would have to hold in memory.
MAX_OUTPUT_PIXELS = 8192 * 8192
# What providers and self-hosted servers send back. Pillow opens some forty formats, and some
# readers run outside programs (EPS runs Ghostscript) on bytes a provider, or whatever it names as
# its output, chose.
OUTPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, engine: str, asked: tuple[int, int] | None = None) -> Image.Image:
    """The image an engine returned, decoded once its header says it is not too large: beyond
    MAX_OUTPUT_PIXELS, or (`asked`: the size an engine renders exactly) beyond twice those pixels."""
    try:
        with warnings.catch_warnings():  # PIL's warning for what is refused just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=OUTPUT_FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise EngineError(f"{engine}: the provider returned an image too large to decode ({exc})",
                          details={"engine": engine}) from exc
    except Exception as exc:
        raise EngineError(f"{engine}: the provider returned bytes that are not a PNG, JPEG or WebP image",
                          details={"engine": engine}) from exc
    width, height = img.size
    if width * height > MAX_OUTPUT_PIXELS:
        raise EngineError(f"{engine}: the provider returned a {width}x{height} image, more than "
                          f"{MAX_OUTPUT_PIXELS} pixels; it is not decoded",
                          details={"engine": engine, "width": width, "height": height})
    if asked is not None and width * height > 2 * asked[0] * asked[1]:
        # A server's answer, not what was asked: 16 of them at 8192x8192 held 4 GB before any was stored.
        raise EngineError(f"{engine}: the provider returned a {width}x{height} image for the {asked[0]}x{asked[1]} "
                          "asked; it is not decoded", details={"engine": engine, "width": width, "height": height})
    try:
        img.load()
        # A camera-style JPEG says which way is up in its EXIF: stored as its pixels lie, it was sideways.
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise EngineError(f"{engine}: the provider returned bytes that are not an image",
                          details={"engine": engine}) from exc
    return eight_bit(upright if upright is not None else img)


SIXTEEN_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def eight_bit(image: Image.Image) -> Image.Image:
    """`image` in a mode a PNG of the store holds as it looks: 16-bit grey scaled to 8 bits (PIL's
    own conversion clips it at 255, and a mid-grey image was stored white), and a palette's or a
    grey image's transparency kept as an alpha channel (not a colour key other pixels may share)."""
    if image.mode in SIXTEEN_BIT:
        # In 16 (or PIL's 32) bits, not widened to 64: an 8192x8192 grey PNG of 150 KB took 1.4 GB.
        if image.mode == "I":
            grey = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
        else:
            grey = (np.asarray(image) >> 8).astype(np.uint8)  # the 16-bit modes read as (either-endian) uint16
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("LA", "PA", "La") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return image.convert("RGBA")
    return image


def shaped_as(image: Image.Image, width: int, height: int, min_side: int = 1) -> Image.Image:
    """`image` stretched to the aspect ratio of width x height, about as many pixels as it had (and
    no side under `min_side`), for providers whose image-to-image output takes the input image's
    shape: a draft of another shape came back in its own."""
    if abs(image.width / image.height - width / height) <= 0.01 * width / height:
        return image
    scale = max(math.sqrt(image.width * image.height / (width * height)), min_side / min(width, height))
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)


def nearest_aspect(width: int, height: int, choices: Sequence[str]) -> str:
    """The provider's aspect ratio ("16:9") closest to width/height."""
    target = width / height

    def distance(choice: str) -> float:
        w, h = (int(x) for x in choice.split(":"))
        return abs(w / h - target)

    return min(choices, key=distance)


def size_class(width: int, height: int) -> str:
    """The Nano Banana family's output resolution for a size (Gemini's `imageSize`, fal's and
    Replicate's `resolution`): the smallest whose image holds it. A class is about its side squared
    in pixels at every aspect ratio (1K at 16:9 is 1376x768, at 21:9 1584x672): by the long side
    alone, a 16:9 image of 1K's own size was asked for, and paid, at 2K."""
    pixels, side = width * height, max(width, height)
    for name in ("1K", "2K"):
        edge = CLASS_EDGES[name]
        if pixels <= CLASS_PIXELS_SLACK * edge * edge and side <= CLASS_SIDE_SLACK * edge:
            return name
    return "4K"


def class_bound(name: str) -> tuple[int, int]:
    """A width x height at least as large as any image of the class in its pixels and its rows
    (its long side, standing): what a PNG of any of its aspect ratios takes stays within that of
    this size (`orchestrator.quota.image_bound`), though no image has it."""
    edge = CLASS_EDGES[name]
    long = math.ceil(CLASS_SIDE_SLACK * edge)
    return math.ceil(CLASS_PIXELS_SLACK * edge * edge / long), long


# A class's pixels, as Google's sizes have them at every aspect (at most 1.025x its side squared:
# 4:3's 1200x896); and its long side at the widest (21:9: 1584 for 1K), past which a thin image
# needs the next one.
CLASS_PIXELS_SLACK = 1.03
# Each class's edge: its square size (fal's Nano Banana 2 also makes 0.5K, which `size_class` never says).
CLASS_EDGES = {"0.5K": 512, "1K": 1024, "2K": 2048, "4K": 4096}
CLASS_SIDE_SLACK = 1.56
