"""Fixtures for engine tests: settings with fake keys, a recording sleep so retries cost no time."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from orchestrator.settings import Settings
from tiers.base import EngineContext


class RecordingSleep:
    """Stands in for asyncio.sleep inside RemoteClient: records the waits, takes no time."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def make_ctx(tmp_path: Path) -> Callable[..., EngineContext]:
    def make(**overrides: Any) -> EngineContext:
        values: dict[str, Any] = {"data_dir": tmp_path, "remote_deadline": 60.0}
        values.update(overrides)
        return EngineContext(settings=Settings(**values))

    return make


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def draft_image(size: tuple[int, int] = (64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (10, 120, 200))
    img.putpixel((0, 0), (255, 0, 0))
    return img
