"""`local-hifi`: bridge and polish with diffusers img2img on the local device.

Bridge: the draft, resized to the target size, is the img2img seed; more steps than a draft.
Polish: resize by `scale` (Lanczos), then img2img at low strength (`creativity`). When the target
is more than `ONE_PASS` times the model's native size on a side, the refine pass runs tile by tile
with feathered overlaps, so memory stays bounded and the model works at the scale it was trained
for. (A bridge runs in one pass, up to ORCH_LOCAL_MAX_SIZE.)
This is the embedded default for bridge and polish: the whole workflow runs offline.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import TYPE_CHECKING, Any, ClassVar

from orchestrator.errors import BadEngineInput
from tiers._local import (
    LCM_SCHEDULE,
    LocalEngine,
    check_steps,
    denoised_previews,
    finite_images,
    lcm_schedule,
    negative_prompt_arguments,
    sampler_used,
    step_arguments,
    tell_prompt_overflow,
)
from tiers.base import (
    DEVICE_SECONDS,
    NOTES,
    CancelToken,
    Capabilities,
    EngineContext,
    Progress,
    RenderedImage,
    RenderRequest,
    RenderResult,
    Stage,
)

if TYPE_CHECKING:
    from PIL.Image import Image

TILE_OVERLAP = 64


# A side up to this many tiles long is rendered in one pass: the model makes a little over its
# native size well, and two passes overlapping almost wholly would cost twice the device time.
ONE_PASS = 1.25


def tile_boxes(width: int, height: int, tile: int, overlap: int = TILE_OVERLAP) -> list[tuple[int, int, int, int]]:
    """Boxes (left, top, right, bottom) of `tile`-sized tiles covering the image with overlap; a
    side no longer than `ONE_PASS` tiles is one span (a 1024x576 polish is one row of tiles)."""

    def spans(length: int) -> list[tuple[int, int]]:
        if length <= tile * ONE_PASS:
            return [(0, length)]
        count = math.ceil((length - overlap) / (tile - overlap))
        step = (length - tile) / (count - 1)
        return [(round(i * step), round(i * step) + tile) for i in range(count)]

    return [(left, top, right, bottom) for top, bottom in spans(height) for left, right in spans(width)]


class LocalHifiEngine(LocalEngine):
    name = "local-hifi"
    stages: frozenset[Stage] = frozenset({"bridge", "polish"})
    pipeline_kind = "img2img"
    # Its work calls `Progress.on_device` once its model is loaded (see `LocalEngine`), in `_render`,
    # which `run` hands the inference thread: a subclass that overrides none of them tells it too.
    tells_device_start: ClassVar[bool] = True
    device_start_told_by: ClassVar[tuple[str, ...]] = ("run", "_on_device", "_render")
    # Its images are RGB, with no colour profile (see `LocalEngine`).
    opaque_images: ClassVar[bool] = True

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx, ctx.settings.effective_hifi_model,
                         Capabilities(img2img=True, upscale=True, seeds=True, negative_prompt=True))

    @property
    def model_setting(self) -> str:
        # Unset, it is the Lite model's: ORCH_LITE_MODEL changes both.
        return "ORCH_HIFI_MODEL" if self.settings.hifi_model else "ORCH_LITE_MODEL"

    def estimate(self, req: RenderRequest) -> int:
        """0 credits; raises `BadEngineInput` for a size, or an LCM model's strength, it cannot take:
        at submit, a 422 with nothing queued, rather than a job failed once the model has loaded."""
        cost = super().estimate(req)
        if self.defaults.lcm:  # the schedule's usual length: the loaded scheduler's is checked at the run
            self._refuse_too_weak(req, LCM_SCHEDULE)
        return cost

    @staticmethod
    def _refuse_too_weak(req: RenderRequest, schedule: int) -> None:
        field = "strength" if req.stage == "bridge" else "creativity"
        strength = req.strength if req.stage == "bridge" else req.creativity
        if int(schedule * strength) < 1:
            least = round(1 / schedule, 4)
            raise BadEngineInput(f"{field}: this LCM model needs at least {least} (got {strength})",
                                 details={"field": field, "value": strength, "min": least})

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        self.estimate(req)  # size limits
        if req.init_image is None:
            raise BadEngineInput(f"{self.name} needs a source image for {req.stage}")
        cancel.raise_if_cancelled()
        return await self._on_device(self._render, req, progress, cancel)

    def _steps(self, req: RenderRequest, strength: float, pipe: Any) -> int:
        base = req.steps or (self.defaults.steps * 2 if req.stage == "bridge" else self.defaults.steps)
        schedule = lcm_schedule(pipe)
        if schedule is not None:
            self._refuse_too_weak(req, schedule)
        if schedule is not None and type(pipe).__name__.startswith("LatentConsistencyModel"):
            # The LCM pipelines hand `strength` to the scheduler, which runs every step asked for,
            # from its schedule shortened to int(schedule x strength).
            return min(base, int(schedule * strength))
        # Other img2img pipelines run int(steps x strength) steps: add steps only where none would run
        # (counted as diffusers counts, float rounding included: ceil(1 / strength) would add one to
        # 2 steps at 0.5 and start from a later timestep than asked; the API keeps strength >= 0.01,
        # so this stays within 100 steps), within what an LCM scheduler on such a pipeline takes at all.
        # Flow-matching img2img (SD3, FLUX) counts otherwise: one step runs at any strength, but where
        # steps x strength < 1 it starts at the schedule's last sigma (nearly nothing changes) or, for
        # 1 step, its first (the image made anew). Padded alike, it starts nearer the strength asked
        # (2 steps at 0.3: from sigma 0.33, not 0.001; 1 step at 0.01: from 0.001, not 1).
        steps = base if int(base * strength) >= 1 else math.floor(1 / strength)
        while int(steps * strength) < 1:  # once or twice at most, from the floor
            steps += 1
        return steps if schedule is None else min(steps, schedule)

    def _render(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        from PIL import Image as PILImage

        assert req.init_image is not None
        pipe = self.runtime.img2img(self._model)
        progress.on_device()  # before its own count starts: a failure's count holds at least as much
        began = time.monotonic()  # after a first load: metered use is the work, not the loading
        strength = req.strength if req.stage == "bridge" else req.creativity
        steps = self._steps(req, strength, pipe)
        check_steps(pipe, steps)
        guidance = self.defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
        source = req.init_image.convert("RGB").resize((req.width, req.height), PILImage.Resampling.LANCZOS)
        tile = max(self.defaults.native_size, 2 * TILE_OVERLAP)  # tiles must be wider than their overlap
        boxes = [(0, 0, req.width, req.height)]
        if req.stage == "polish" and max(req.width, req.height) > tile * ONE_PASS:
            boxes = tile_boxes(req.width, req.height, tile)
        seed = req.seed if req.seed is not None else 0
        notes: list[str] = []
        tell_prompt_overflow(pipe, req.prompt, progress, notes)
        negative = negative_prompt_arguments(pipe, req.negative_prompt, guidance, progress, notes)
        images: list[RenderedImage] = []
        for index in range(req.n):
            canvas = self._refine(pipe, req, source, boxes, steps, strength, guidance, seed + index, negative,
                                  progress, cancel, first_pass=index * len(boxes), passes=req.n * len(boxes))
            images.append(RenderedImage(canvas, seed + index))
        return RenderResult(
            images=images,
            model=self._model,
            # The steps scheduled, as img2img records them (A1111's "Steps" beside "Denoising strength"):
            # sent back with the strength, they make the same image; int(steps x strength) of them ran.
            # A polish's strength is its creativity; no quality tiers here.
            metadata={"steps": steps, "guidance_scale": guidance, "tiles": len(boxes), "quality": None,
                      "strength": strength if req.stage == "bridge" else None,
                      "creativity": strength if req.stage == "polish" else None,
                      **sampler_used(pipe), "device": self.runtime.device,
                      "negative_prompt": negative.get("negative_prompt", ""),
                      DEVICE_SECONDS: time.monotonic() - began, **({NOTES: notes} if notes else {})},
        )

    def _refine(self, pipe: Any, req: RenderRequest, source: Image, boxes: list[tuple[int, int, int, int]],
                steps: int, strength: float, guidance: float, seed: int, negative: dict[str, Any], progress: Progress,
                cancel: CancelToken, *, first_pass: int, passes: int) -> Image:
        import numpy as np
        import torch
        from PIL import Image as PILImage

        acc = np.zeros((req.height, req.width, 3), dtype=np.float64)
        weight = np.zeros((req.height, req.width, 1), dtype=np.float64)
        # SD3 and FLUX img2img render at their default size (1024 px) unless told the image's: the
        # draft would be squashed square and cost up to 4x the work. SD and SDXL take the image's.
        sized = {"width", "height"} <= inspect.signature(pipe.__call__).parameters.keys()
        for tile_index, box in enumerate(boxes):
            cancel.raise_if_cancelled()  # between tiles: not after the next tile's first step
            tile_img = source.crop(box)
            size = {"width": tile_img.width, "height": tile_img.height} if sized else {}
            on_step = self.runtime.step_callback(progress, cancel, done=first_pass + tile_index, passes=passes,
                                                 planned=1, size=tile_img.size)
            with torch.inference_mode(), denoised_previews(pipe):
                out = pipe(
                    prompt=req.prompt,
                    **negative,
                    image=tile_img,
                    strength=strength,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    **step_arguments(pipe, on_step),
                    output_type="np",
                    **size,
                )
            [made] = finite_images(out.images, self.runtime.device)
            rendered = np.asarray(made.convert("RGB").resize(tile_img.size), dtype=np.float64)
            mask = _feather(box, boxes)
            left, top, right, bottom = box
            acc[top:bottom, left:right] += rendered * mask
            weight[top:bottom, left:right] += mask
        # Rounded: the weighted mean of identical tiles comes out as 254.9999, which a cast makes 254.
        blended = np.rint(acc / np.maximum(weight, 1e-8)).clip(0, 255).astype(np.uint8)
        return PILImage.fromarray(blended, mode="RGB")

def _feather(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> Any:
    """Blend weights for a tile: across the whole of each overlap with a neighbouring tile, a linear
    ramp that mirrors the neighbour's, so the two cross-fade and their weights add up to 1 (where three
    tiles overlap, on a short axis, the blend's division by the weights' sum still makes it 1)."""
    import numpy as np

    left, top, right, bottom = box

    def ramp(start: int, end: int, spans: list[tuple[int, int]]) -> Any:
        # tile_boxes spaces the tiles evenly, so an overlap may be nearly a tile wide: a ramp of only
        # TILE_OVERLAP left two tiles at full weight, averaged (ghosts), across the rest of it.
        index = spans.index((start, end))
        centres = np.arange(start, end) + 0.5  # at pixel centres: never 0 where a single tile lies
        w = np.ones(end - start)
        if index > 0 and spans[index - 1][1] > start:
            w = np.minimum(w, (centres - start) / (spans[index - 1][1] - start))
        if index + 1 < len(spans) and spans[index + 1][0] < end:
            w = np.minimum(w, (end - centres) / (end - spans[index + 1][0]))
        return w

    # tile_boxes lays a grid: every tile in a column spans the same columns, every tile in a row the same rows.
    wx = ramp(left, right, sorted({(b[0], b[2]) for b in boxes}))
    wy = ramp(top, bottom, sorted({(b[1], b[3]) for b in boxes}))
    return (wy[:, None] * wx[None, :])[:, :, None]


def factory(ctx: EngineContext) -> LocalHifiEngine:
    return LocalHifiEngine(ctx)
