"""`builtin:tiny-sd` is built once per cache folder, however many processes start at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tiers import tiny


def test_two_builders_at_once_build_once_and_keep_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second builder looked before the first finished: it waits, finds the copy made, and
    keeps it (it used to remove it as 'an older version' while the first was loading it)."""
    second_looked = threading.Event()
    built: list[str] = []
    real_current = tiny._current

    def current(folder: Path) -> bool:
        if threading.current_thread().name == "builder-2":
            second_looked.set()
        return real_current(folder)

    def build(folder: Path, seed: int) -> None:
        built.append(threading.current_thread().name)
        assert second_looked.wait(30), "the second builder never looked"
        (folder / "model_index.json").write_text("{}")

    monkeypatch.setattr(tiny, "_current", current)
    monkeypatch.setattr(tiny, "_build", build)
    folder = tmp_path / "tiny-sd"
    threads = [threading.Thread(target=tiny.save_tiny_pipeline, args=(folder,), name=f"builder-{i}") for i in (1, 2)]
    threads[0].start()
    while not built and threads[0].is_alive():  # the first is building before the second starts
        threads[0].join(0.01)
    threads[1].start()
    for thread in threads:
        thread.join(30)
    assert built == ["builder-1"]
    assert (folder / "model_index.json").exists() and tiny._current(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-sd.lock", "tiny-sd"]  # no staging left
    assert (folder / ".tiny-sd-version").read_text() == tiny._VERSION  # as releases before the file list read it


def test_a_damaged_copy_is_built_again(tmp_path: Path, tiny_cache_dir: Path) -> None:
    """Its weights deleted, the marker still read current: every load failed, after every restart."""
    import shutil

    whole = shutil.copytree(tiny_cache_dir / "tiny-sd", tmp_path / "whole")
    assert tiny._current(whole)
    for damage in ("unet/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json", "vae/config.json"):
        folder = shutil.copytree(whole, tmp_path / damage.replace("/", "-"))
        if damage.endswith(".json"):
            (folder / damage).unlink()
        else:  # cut short
            (folder / damage).write_bytes((folder / damage).read_bytes()[:100])
        assert not tiny._current(folder), damage
        assert tiny.save_tiny_pipeline(folder) == folder
        assert tiny._current(folder), damage
        assert (folder / damage).stat().st_size == (whole / damage).stat().st_size, damage
