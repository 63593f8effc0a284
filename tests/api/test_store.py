"""The artifact store never names a path outside its root; writes are atomic and content-addressed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.errors import NotFound
from orchestrator.store import ArtifactStore, RecentContent, encode_png, infotext, read_record

GOOD = "ab" * 32


@pytest.mark.parametrize("name", [
    "../" + "a" * 61,
    "../../etc/passwd",
    "/etc/passwd",
    "ab/../../" + "0" * 55,
    "A" * 64,  # hex, but not the lower case the store writes
    "g" * 64,
    "a" * 63,
    "a" * 65,
    "a" * 64 + "\n",
    "a" * 64 + "/",
    "a" * 32 + "\x00" + "a" * 31,
    "",
    ".",
    "..",
])
def test_path_for_refuses_anything_but_a_sha256(tmp_path: Path, name: str) -> None:
    store = ArtifactStore(tmp_path / "assets")
    with pytest.raises(NotFound):
        store.path_for(name)
    with pytest.raises(NotFound):
        store.get(name)


def test_path_for_stays_under_the_root(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "assets")
    path = store.path_for(GOOD)
    assert path == (tmp_path / "assets" / "ab" / f"{GOOD}.png").resolve()
    assert path.is_relative_to(store.root)


def test_put_get_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "assets")
    data = b"\x89PNG not really"
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.get(sha) == data
    assert store.put(data) == sha  # the same bytes twice: one file
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == [f"{sha}.png"]
    assert store.path_for(sha).stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: backups read it
    with pytest.raises(NotFound):
        store.get("0" * 64)  # well-formed, but never stored


def test_sweep_temp_removes_leftovers_of_a_crash(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "assets")
    sha = store.put(b"kept")
    crashed = store.root / sha[:2] / ".tmp-abc.png"
    crashed.write_bytes(b"half")
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))
    # A fresh one may be another process's write in progress: it stays.
    writing = store.root / sha[:2] / ".tmp-def.png"
    writing.write_bytes(b"in progress")
    assert store.sweep_temp() == 1
    assert writing.exists()
    writing.unlink()
    assert store.get(sha) == b"kept"
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == [f"{sha}.png"]
    assert store.path_for(sha).stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: backups read it


def test_png_carries_infotext_and_record() -> None:
    record = {"prompt": "a fox", "negative_prompt": "blur", "seed": 7, "steps": 4, "guidance_scale": 0.0,
              "sampler": "EulerDiscreteScheduler", "width": 8, "height": 8, "model": "m", "engine": "lite",
              "stage": "ideation", "parent_id": None}
    data = encode_png(Image.new("RGB", (8, 8), (1, 2, 3)), record)
    assert read_record(data) == record
    with Image.open(io.BytesIO(data)) as img:
        assert img.info["parameters"] == infotext(record)
        assert json.loads(img.info["orchestrator"]) == record
    assert infotext(record).splitlines() == [
        "a fox",
        "Negative prompt: blur",
        "Steps: 4, Sampler: EulerDiscreteScheduler, CFG scale: 0.0, Seed: 7, Size: 8x8, Model: m, Engine: lite, "
        "Stage: ideation",
    ]
    # Deterministic: the same image and record encode to the same bytes.
    assert encode_png(Image.new("RGB", (8, 8), (1, 2, 3)), dict(record)) == data


def test_png_metadata_quotes_separators_and_names_no_server_path() -> None:
    # A1111's readers split on ", " and ": ": a model named `my,sd` lost its second half, and the
    # server's folder went out with every image.
    record = {"prompt": "a fox", "seed": 7, "width": 8, "height": 8, "model": "/srv/models/my,sd",
              "sampler": "DPM++ 2M: Karras", "engine": "lite", "stage": "ideation"}
    data = encode_png(Image.new("RGB", (8, 8)), record)
    assert read_record(data)["model"] == "my,sd"
    with Image.open(io.BytesIO(data)) as img:
        settings = img.info["parameters"].splitlines()[-1]
    assert settings == ('Sampler: "DPM++ 2M: Karras", Seed: 7, Size: 8x8, Model: "my,sd", Engine: lite, '
                        "Stage: ideation")
    assert "/srv" not in data.decode("latin-1")
    for kept in ("stabilityai/sd-turbo", "builtin:tiny-sd"):  # Hub ids and built-ins are names already
        assert read_record(encode_png(Image.new("RGB", (8, 8)), {**record, "model": kept}))["model"] == kept
    # A Hugging Face cache snapshot is named by its repository, not by its hash.
    cached = "/root/.cache/huggingface/hub/models--stabilityai--sd-turbo/snapshots/b261bac6fd2cf515557d5d0707"
    named = read_record(encode_png(Image.new("RGB", (8, 8)), {**record, "model": cached}))["model"]
    assert named == "stabilityai/sd-turbo"


def test_recent_content_is_bounded_and_drops_the_least_recently_used() -> None:
    recent = RecentContent(max_bytes=10)
    recent.add("ast_a", "a" * 64, b"aaaa")
    recent.add("ast_b", "b" * 64, b"bbbb")
    assert recent.get("ast_a") == ("a" * 64, b"aaaa")  # now the most recently used
    recent.add("ast_c", "c" * 64, b"cccc")  # 12 bytes: the least recently used (b) goes
    assert recent.get("ast_b") is None
    assert recent.get("ast_a") is not None and recent.get("ast_c") is not None
    assert recent.size == 8
    recent.add("ast_a", "a" * 64, b"aaaa")  # the same asset again is counted once
    assert recent.size == 8


def test_recent_content_skips_what_could_never_fit() -> None:
    recent = RecentContent(max_bytes=10)
    recent.add("ast_a", "a" * 64, b"aaaa")
    recent.add("ast_big", "b" * 64, b"x" * 11)
    assert recent.get("ast_big") is None
    assert recent.get("ast_a") == ("a" * 64, b"aaaa")  # not evicted for nothing
