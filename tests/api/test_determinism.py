"""Same request and seed, same bytes; variation i of a batch is the single draft with seed + i."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import httpx
import numpy as np
from PIL import Image

from orchestrator.settings import Settings
from tests.api import create_project, run_draft
from tests.conftest import SettingsFactory


def content(client: httpx.Client, asset_id: str) -> bytes:
    response = client.get(f"/v1/assets/{asset_id}/content")
    assert response.status_code == 200
    return response.content


def record(data: bytes) -> dict[str, object]:
    with Image.open(io.BytesIO(data)) as img:
        value: dict[str, object] = json.loads(img.info["orchestrator"])
    return value


def test_same_request_same_seed_gives_identical_bytes(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    body = {"prompt": "a red fox in snow", "negative_prompt": "blurry", "guidance_scale": 2.0, "seed": 31337, "n": 2,
            "steps": 3}
    first = run_draft(server, project, **body)
    second = run_draft(server, project, **body)
    assert first["id"] != second["id"]
    assert second["cost"]["cache_hit"] is False  # rendered again, not copied
    assert first["assets"] != second["assets"]  # new assets ...
    for a, b in zip(first["assets"], second["assets"], strict=True):
        assert content(server, a) == content(server, b)  # ... with the same bytes
    # The two variations differ from each other.
    assert content(server, first["assets"][0]) != content(server, first["assets"][1])

    other_seed = run_draft(server, project, **{**body, "seed": 31338, "n": 1})
    assert content(server, other_seed["assets"][0]) != content(server, first["assets"][0])


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_variation_i_equals_single_draft_with_seed_plus_i(server: httpx.Client) -> None:
    """Variation i of a batch is reproduced by n=1 with seed + i: the same generation record and the
    same pixels up to one level of rounding. (Not byte-identical: torch's batched CPU kernels sum
    in another order, which flips the rounding of a pixel or two; one level is the most seen.)"""
    project = create_project(server)["id"]
    seed = 4242
    batch = run_draft(server, project, prompt="a castle", seed=seed, n=3, steps=2)
    for i, asset_id in enumerate(batch["assets"]):
        single = run_draft(server, project, prompt="a castle", seed=seed + i, n=1, steps=2)
        batch_bytes = content(server, asset_id)
        single_bytes = content(server, single["assets"][0])
        assert record(batch_bytes)["seed"] == seed + i
        assert record(batch_bytes) == record(single_bytes)
        assert server.get(f"/v1/assets/{asset_id}").json()["seed"] == seed + i
        a, b = pixels(batch_bytes), pixels(single_bytes)
        assert a.shape == b.shape == (64, 64, 3)
        diff = np.abs(a - b)
        assert diff.max() <= 1, f"variation {i} differs by {diff.max()} levels"
        assert (diff > 0).mean() < 0.01, f"variation {i}: {(diff > 0).sum()} values differ"
        # ... and it is not some other image that happens to be close: other seeds are far away.
        if i:
            assert np.abs(a - pixels(content(server, batch["assets"][0]))).mean() > 5


def test_with_a_batch_of_one_the_single_draft_is_byte_identical(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    # What the README offers to those who need exact copies: every image made alone.
    server = start_server(make_settings(lite_max_batch=1))
    project = create_project(server)["id"]
    batch = run_draft(server, project, prompt="a castle", seed=77, n=2, steps=2)
    single = run_draft(server, project, prompt="a castle", seed=78, n=1, steps=2)
    assert content(server, batch["assets"][1]) == content(server, single["assets"][0])


def test_a_promotion_keeps_a_draft_seed_of_zero(shared_server: httpx.Client) -> None:
    # `source.seed or random` once read seed 0 as "no seed": each promotion got a random one.
    project = create_project(shared_server, "seed zero")["id"]
    draft = run_draft(shared_server, project, n=1, seed=0, width=64, height=64, steps=1)
    seeds = []
    for _ in range(2):
        response = shared_server.post(f"/v1/assets/{draft['assets'][0]}/promote", json={"strength": 0.5, "steps": 2})
        assert response.status_code == 202, response.text
        seeds.append(response.json()["params"]["seed"])
    assert seeds == [0, 0]
