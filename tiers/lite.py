"""`lite`: the ideation tier. Fast drafts on a local few-step diffusion model, kept warm.

`n` variations run in batched forward passes (`num_images_per_prompt`, chunked by
`ORCH_LITE_MAX_BATCH`); variation i uses its own generator seeded `seed + i`, so any single
draft is reproduced by asking for n=1 with that seed: the same noise and parameters, and the same
pixels up to float rounding (batched kernels sum in another order; a colour value may differ by
one level). The same request with the same seed is byte-identical on the same machine.
Each denoising step reports progress with a preview (of the sampler's denoised estimate where it
has one); a cancelled token stops the pipeline at the next step boundary.
"""

from __future__ import annotations

import time
from typing import ClassVar

from orchestrator.errors import BadEngineInput
from tiers._local import (
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


class LiteEngine(LocalEngine):
    name = "lite"
    stages: frozenset[Stage] = frozenset({"ideation"})
    # Its work calls `Progress.on_device` once its model is loaded (see `LocalEngine`), in `_generate`,
    # which `run` hands the inference thread: a subclass that overrides none of them tells it too.
    tells_device_start: ClassVar[bool] = True
    device_start_told_by: ClassVar[tuple[str, ...]] = ("run", "_on_device", "_generate")
    # Its images are RGB, with no colour profile (see `LocalEngine`).
    opaque_images: ClassVar[bool] = True

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx, ctx.settings.lite_model, Capabilities(seeds=True, negative_prompt=True))

    async def preload(self) -> None:
        """Load the model (with its warm-up) now, on the inference thread, not at the first draft."""
        await self.runtime.call(self.runtime.text2img, self._model)

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        self.estimate(req)  # size limits
        cancel.raise_if_cancelled()
        return await self._on_device(self._generate, req, progress, cancel)

    def _generate(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        import torch

        pipe = self.runtime.text2img(self._model)
        progress.on_device()  # before its own count starts: a failure's count holds at least as much
        began = time.monotonic()  # after a first load: metered use is the work, not the loading
        seed = req.seed if req.seed is not None else 0
        steps = req.steps or self.defaults.steps
        limit = lcm_schedule(pipe)
        if limit is not None and steps > limit:
            raise BadEngineInput(f"steps: this LCM model takes at most {limit} (got {steps})",
                                 details={"field": "steps", "value": steps, "max": limit})
        check_steps(pipe, steps)
        guidance = self.defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
        notes: list[str] = []
        tell_prompt_overflow(pipe, req.prompt, progress, notes)
        negative = negative_prompt_arguments(pipe, req.negative_prompt, guidance, progress, notes)
        batch = self.settings.lite_max_batch
        chunks = [list(range(start, min(start + batch, req.n))) for start in range(0, req.n, batch)]
        images: list[RenderedImage] = []
        for chunk_index, chunk in enumerate(chunks):
            cancel.raise_if_cancelled()  # between chunks: not after the next chunk's first step
            on_step = self.runtime.step_callback(progress, cancel, done=chunk_index, passes=len(chunks),
                                                 planned=steps, size=(req.width, req.height))
            # CPU generators: the same seed gives the same noise on every device.
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in chunk]
            with torch.inference_mode(), denoised_previews(pipe):
                out = pipe(
                    prompt=req.prompt,
                    **negative,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=req.width,
                    height=req.height,
                    num_images_per_prompt=len(chunk),
                    generator=generators,
                    **step_arguments(pipe, on_step),
                    output_type="np",
                )
            made = finite_images(out.images, self.runtime.device)
            images.extend(RenderedImage(img, seed + i) for i, img in zip(chunk, made, strict=True))
        return RenderResult(
            images=images,
            model=self._model,
            # Text to image: no source for a strength or creativity to act on, no quality tiers.
            metadata={"steps": steps, "guidance_scale": guidance, **sampler_used(pipe),
                      "negative_prompt": negative.get("negative_prompt", ""),
                      **dict.fromkeys(("strength", "quality", "creativity")),
                      "device": self.runtime.device, DEVICE_SECONDS: time.monotonic() - began,
                      **({NOTES: notes} if notes else {})},
        )


def factory(ctx: EngineContext) -> LiteEngine:
    return LiteEngine(ctx)
