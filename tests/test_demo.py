"""`orchestrator demo` as a new user sees it: its terminal, its contact sheet. (Its stages, Ctrl-C,
and its refusals are tested with the rest of the command line, in test_cli.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from orchestrator.demo import contact_sheet
from tests.conftest import VENDOR_KEYS

ROOT = Path(__file__).resolve().parents[1]


def _light(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """Whether anything is drawn in `box` on the sheet's dark ground."""
    return max(max(pixel) for pixel in image.crop(box).getdata()) > 150  # type: ignore[attr-defined]


def test_each_draft_is_labelled_under_it_with_its_index_and_seed() -> None:
    # The index drawn over the image was lost in the tiny model's noise.
    white = [Image.new("RGB", (64, 64), (255, 255, 255)) for _ in range(4)]
    sheet = contact_sheet(white, [f"{i}  seed {42 + i}" for i in range(4)])
    assert sheet.width == 2 * (64 + 8) + 8 and sheet.height > 2 * (64 + 8) + 8  # a caption's height more per row
    caption = (sheet.height - 8) // 2 - 64 - 8
    for column in range(2):
        x = 8 + column * (64 + 8)
        assert _light(sheet, (x, 8 + 64, x + 64, 8 + 64 + caption))  # the label, under its image
    assert not _light(sheet, (8 + 64, 0, 8 + 64 + 8, sheet.height))  # the gutter between the columns stays bare


def test_a_label_wider_than_its_image_keeps_its_index() -> None:
    sheet = contact_sheet([Image.new("RGB", (8, 8))] * 2, ["0  seed 1234567890", "1  seed 1234567890"])
    assert sheet.width == 2 * (8 + 8) + 8  # the sheet is not widened for a label
    assert _light(sheet, (8, 16, 16, sheet.height))


def test_the_demo_s_terminal_shows_its_own_lines_and_the_tiny_model_s_notice_once(
        tmp_path: Path, tiny_cache_dir: Path) -> None:
    """`make demo` told the tiny model's notice four times, and its service's INFO lines (lock
    files, the model's folder) landed between the progress bars."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("ORCH_") and name not in VENDOR_KEYS}
    env |= {"ORCH_DATA_DIR": str(tmp_path / "data"), "ORCH_CACHE_DIR": str(tiny_cache_dir),
            "ORCH_LITE_MODEL": "builtin:tiny-sd", "ORCH_LITE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "orchestrator", "demo", "--size", "64", "--out", str(tmp_path / "out")]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    told = done.stdout + done.stderr
    assert told.count("images are noise") == 1, told
    assert "  NOTE: builtin:tiny-sd has random weights: its images are noise" in done.stdout
    assert [line for line in done.stderr.splitlines() if line.startswith("INFO")] == [], done.stderr
    # Kept where `serve` keeps its log.
    assert "INFO orchestrator.workers: " in (tmp_path / "data" / "logs" / "orchestrator.log").read_text()
