"""`lite`: the ideation tier. Fast drafts on a local few-step diffusion model, kept warm.

`n` variations run in batched forward passes (`num_images_per_prompt`, chunked by
`ORCH_LITE_MAX_BATCH`); variation i uses its own generator seeded `seed + i`, so any single
draft is reproduced by asking for n=1 with that seed: the same noise and parameters, and the same
pixels up to float rounding (batched kernels sum in another order; a colour value may differ by
one level). The same request with the same seed is byte-identical on the same machine.
Each denoising step reports progress with a preview; a cancelled token stops the pipeline at the
next step boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from orchestrator.errors import BadEngineInput, Canceled
from tiers import tiny
from tiers._local import LocalRuntime, model_defaults, resolve_model
from tiers.base import (
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
    from orchestrator.settings import Settings


def runtime_for(ctx: EngineContext) -> LocalRuntime:
    """The context's one runtime per device, created on first use (shared by lite and local-hifi)."""
    runtime = ctx.shared.get("local_runtime")
    if runtime is None:
        runtime = ctx.shared["local_runtime"] = LocalRuntime(ctx.settings)
    assert isinstance(runtime, LocalRuntime)
    return runtime


def check_size(req: RenderRequest, settings: Settings, engine: str) -> None:
    limit = settings.local_max_size
    for label, value in (("width", req.width), ("height", req.height)):
        if value % 8 or not 64 <= value <= limit:
            raise BadEngineInput(
                f"{label} must be a multiple of 8 between 64 and {limit} for engine '{engine}' (got {value})",
                details={"field": label, "value": value, "max": limit},
            )


class LiteEngine:
    name = "lite"
    kind: Literal["local"] = "local"
    stages: frozenset[Stage] = frozenset({"ideation"})

    def __init__(self, ctx: EngineContext) -> None:
        self.settings = ctx.settings
        self.runtime = runtime_for(ctx)
        self._model = resolve_model(ctx.settings.lite_model)
        self.defaults = model_defaults(self._model)
        self.capabilities = Capabilities(seeds=True, negative_prompt=True, max_width=ctx.settings.local_max_size,
                                         max_height=ctx.settings.local_max_size)

    @property
    def model(self) -> str:
        return self._model

    @property
    def note(self) -> str | None:
        return tiny.NOTE if self._model == tiny.NAME else None

    def availability(self) -> tuple[bool, str | None]:
        return True, None

    def prices(self) -> dict[str, Any]:
        return {"credits_per_gpu_second": self.settings.local_gpu_second_credits}

    def estimate(self, req: RenderRequest) -> int:
        check_size(req, self.settings, self.name)
        return 0

    async def load(self) -> None:
        """Load the model and warm it up now rather than on the first request."""
        await self.runtime.call(self.runtime.text2img, self._model)

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        check_size(req, self.settings, self.name)
        cancel.raise_if_cancelled()
        return await self.runtime.call(self._generate, req, progress, cancel)

    def _generate(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        import torch

        pipe = self.runtime.text2img(self._model)
        seed = req.seed if req.seed is not None else 0
        steps = req.steps or self.defaults.steps
        guidance = self.defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
        batch = self.settings.lite_max_batch
        chunks = [list(range(start, min(start + batch, req.n))) for start in range(0, req.n, batch)]
        total = steps * len(chunks)
        images: list[RenderedImage] = []
        for chunk_index, chunk in enumerate(chunks):
            done_before = chunk_index * steps

            def on_step(pipeline: Any, i: int, t: Any, kwargs: dict[str, Any], done: int = done_before) -> Any:
                if cancel.cancelled:
                    pipeline._interrupt = True
                    raise Canceled("the job was canceled")
                progress.step(done + i + 1, total, self.runtime.preview(kwargs["latents"]))
                return kwargs

            # CPU generators: the same seed gives the same noise on every device.
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in chunk]
            with torch.inference_mode():
                out = pipe(
                    prompt=req.prompt,
                    negative_prompt=req.negative_prompt or None,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=req.width,
                    height=req.height,
                    num_images_per_prompt=len(chunk),
                    generator=generators,
                    callback_on_step_end=on_step,
                    callback_on_step_end_tensor_inputs=["latents"],
                )
            images.extend(RenderedImage(img, seed + i) for i, img in zip(chunk, out.images, strict=True))
        return RenderResult(
            images=images,
            model=self._model,
            metadata={"steps": steps, "guidance_scale": guidance, "sampler": type(pipe.scheduler).__name__,
                      "device": self.runtime.device},
        )

    async def aclose(self) -> None:
        return None


def factory(ctx: EngineContext) -> LiteEngine:
    return LiteEngine(ctx)
