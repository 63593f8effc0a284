"""local-hifi: how polish blends its tiles, and how many steps an img2img pass is given."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.tiers.conftest import EngineFactory, RecordingProgress, draft_image
from tiers.base import CancelToken, RenderRequest
from tiers.local_hifi import _feather, tile_boxes


def blend_weights(width: int, height: int, tile: int) -> tuple[list[tuple[int, int, int, int]], Any]:
    """The tiles of an image and each one's blend weight over the whole image (0 outside its box)."""
    boxes = tile_boxes(width, height, tile)
    weights = np.zeros((len(boxes), height, width))
    for index, box in enumerate(boxes):
        left, top, right, bottom = box
        weights[index, top:bottom, left:right] = _feather(box, boxes)[:, :, 0]
    return boxes, weights


# 1024 px: tiles 256 px apart, overlaps of 256 px; 520 px: one span (within 1.25 tiles); 1000 and 961 px:
# three tiles meet along an axis; 300x200: one tile; 512 px: one tile wide; 193 px on tiles of 128
# (the smallest local-hifi makes, 2 x TILE_OVERLAP): three tiles meet on most of the middle one.
SIZES = [(1024, 1024, 512), (1024, 520, 512), (520, 1024, 512), (2048, 2048, 512), (1536, 1024, 512),
         (1000, 1000, 512), (961, 300, 512), (300, 200, 512), (512, 1500, 512), (193, 96, 128), (256, 96, 128)]


@pytest.mark.parametrize(("width", "height", "tiles"), [(1024, 520, 3), (1024, 576, 3), (1280, 640, 3),
                                                       (2048, 600, 5), (640, 640, 1), (1024, 1024, 9)])
def test_a_side_within_a_tile_and_a_quarter_is_one_span(width: int, height: int, tiles: int) -> None:
    # A 16:9 draft polished at scale 2 (1024x576) was two rows of tiles overlapping almost wholly:
    # twice the device time for the same image.
    boxes = tile_boxes(width, height, 512)
    assert len(boxes) == tiles
    covered = np.zeros((height, width), dtype=bool)
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        covered[top:bottom, left:right] = True
    assert covered.all()


@pytest.mark.parametrize(("width", "height", "tile"), SIZES)
def test_no_pixel_averages_two_tiles_at_full_weight(width: int, height: int, tile: int) -> None:
    # The ramp was TILE_OVERLAP wide while the overlaps were up to a tile wide: at 1024x1024, 44%
    # of the pixels were two to four separately rendered tiles averaged (ghosts, softness).
    boxes, weights = blend_weights(width, height, tile)
    assert not ((weights >= 1).sum(axis=0) > 1).any()
    # Every tile has a say everywhere in its box, so no pixel is left to the division's guard.
    for index, (left, top, right, bottom) in enumerate(boxes):
        assert weights[index, top:bottom, left:right].min() > 0
    assert weights.sum(axis=0).min() >= 1 - 1e-9


@pytest.mark.parametrize(("width", "tile"), [(648, 512), (1024, 512), (1536, 512), (2048, 512), (1000, 512),
                                             (961, 512), (193, 128), (256, 128)])
def test_two_overlapping_tiles_cross_fade_across_their_whole_overlap(width: int, tile: int) -> None:
    boxes, weights = blend_weights(width, 64, tile)  # one row of tiles: the weights along x
    assert len(boxes) > 1
    along = weights[:, 0, :]
    covering = (along > 0).sum(axis=0)
    for index in range(len(boxes) - 1):
        start, end = boxes[index + 1][0], boxes[index][2]  # the next tile starts inside this one
        shared = np.arange(start, end)[covering[start:end] == 2]  # not where a third tile comes in too
        assert len(shared) or tile < 3 * 64  # three tiles overlap everywhere only on tiles this small
        assert np.allclose(along[index, shared] + along[index + 1, shared], 1)
        assert (np.diff(along[index + 1, shared]) > 0).all()
        if len(shared) == end - start:  # no third tile: from nearly all the one to nearly all the other
            assert along[index + 1, start] < 0.01 and along[index + 1, end - 1] > 0.99


@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (1536, 1024), (1024, 520), (512, 1500)])
def test_where_only_two_tiles_meet_on_an_axis_the_weights_already_add_up_to_1(width: int, height: int) -> None:
    _, weights = blend_weights(width, height, 512)
    assert np.allclose(weights.sum(axis=0), 1)


# (steps asked, strength): diffusers' img2img runs int(steps x strength) of them.
STEP_CASES = [(2, 0.5), (4, 0.25), (5, 0.2), (10, 0.1), (1, 0.5), (1, 0.25), (1, 0.1), (1, 1 / 3), (2, 0.3),
              (3, 0.3), (1, 0.01), (8, 0.3), (20, 0.55), (1, 1.0)]


async def test_img2img_runs_the_steps_asked_for_and_adds_only_where_none_would_run(engines: EngineFactory) -> None:
    # ceil(1.0001 / strength) added a step at every exact reciprocal: 2 steps at 0.5 became 3, and
    # the pass started from timestep 332 instead of 499, a strength of 0.33 where 0.5 was asked.
    _, hifi = engines()
    pipe = await hifi.runtime.call(hifi.runtime.img2img, hifi.model)

    def runs(steps: int, strength: float) -> list[int]:
        pipe.scheduler.set_timesteps(steps)
        timesteps, count = pipe.get_timesteps(steps, strength, "cpu")  # the pipeline's own count
        assert count == len(timesteps)
        return [int(t) for t in timesteps]

    def scheduled(steps: int, strength: float) -> int:
        request = RenderRequest(stage="bridge", prompt="p", width=64, height=64, steps=steps, strength=strength,
                                init_image=draft_image())
        return hifi._steps(request, strength, pipe)

    for asked, strength in STEP_CASES:
        steps = await hifi.runtime.call(scheduled, asked, strength)
        ran = await hifi.runtime.call(runs, steps, strength)
        assert ran, (asked, strength)
        if await hifi.runtime.call(runs, asked, strength):
            assert steps == asked, (asked, strength)
        else:  # the fewest that run one
            assert steps > asked and not await hifi.runtime.call(runs, steps - 1, strength), (asked, strength)
    assert await hifi.runtime.call(runs, await hifi.runtime.call(scheduled, 2, 0.5), 0.5) == [499]


async def test_the_record_holds_the_steps_scheduled_which_with_the_strength_remake_the_image(
        engines: EngineFactory) -> None:
    _, hifi = engines()
    request = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64, steps=2, strength=0.5,
                            seed=1, n=1, init_image=draft_image())
    progress = RecordingProgress()
    result = await hifi.run(request, progress, CancelToken())
    assert result.metadata["steps"] == 2 and result.metadata["strength"] == 0.5  # was 3: a step added
    assert progress.steps == [(1, 1)]  # int(2 x 0.5) of them ran
