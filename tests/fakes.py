"""A priced fake engine for tests: register it with ORCH_ENGINES="fake-paid=tests.fakes:factory" (and
PYTHONPATH set to the checkout: `tests` is not an installed package).

It costs `FAKE_PRICE` credits per image, renders a flat image from the source's mean colour, and
can be told to fail, to hang, to wait before it sends, to crash, or to report its own cost, through
tags.
Like the cloud engines, it announces its paid request (`billable_send`) before making it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageStat

from orchestrator.errors import ContentFiltered, EngineError, EngineTimeout, NoPrice
from tiers._local import LocalEngine
from tiers.base import (
    NOTES,
    CancelToken,
    Capabilities,
    EngineContext,
    PriceTable,
    Progress,
    RenderedImage,
    RenderRequest,
    RenderResult,
    Stage,
    billable_send,
    billable_send_refused,
    billable_sends_out,
)

FAKE_PRICE = 10.0  # credits per image
SENT: list[str] = []  # the prompt of every request that passed `billable_send`, in this process
# "engine.method" of each look at an engine's availability or price made on an event loop's thread:
# a plugin's may ask its server, and every request of the service waits meanwhile.
ON_THE_LOOP: list[str] = []


def _on_the_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    ON_THE_LOOP.append(what)


ENDING = threading.Event()  # set by a test as the runner starts ending a "crash-beside-a-send" job
ASKED = threading.Event()  # set once that job's other request has asked to send (and been answered)


class FakePaidEngine:
    kind: Literal["remote"] = "remote"
    stages: frozenset[Stage] = frozenset({"bridge", "polish"})
    capabilities = Capabilities(img2img=True, upscale=True, leaves_machine=True)
    announces_sends = True

    def __init__(self, ctx: EngineContext, name: str = "fake-paid") -> None:
        self.name = name
        self._prices = PriceTable(name, {"fake-1": {"image": FAKE_PRICE}}, "2026-11",
                                  ctx.price_overrides.get(name))
        self.calls = 0

    @property
    def model(self) -> str:
        return "fake-1"

    def availability(self) -> tuple[bool, str | None]:
        _on_the_loop(f"{self.name}.availability")
        return True, None

    def prices(self) -> dict[str, Any]:
        return self._prices.as_dict()

    def estimate(self, req: RenderRequest) -> int:
        _on_the_loop(f"{self.name}.estimate")
        return req.n * self._prices.millicredits(self.model, "image")

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        self.calls += 1
        behaviour = req.tags.get("fake", "")
        if behaviour == "wait-before-send":  # as reading and encoding a large draft does
            if "until" in req.tags:  # a file the test creates when it is done acting meanwhile
                while not Path(req.tags["until"]).exists():
                    await cancel.sleep(0.02)
            else:
                await cancel.sleep(float(req.tags.get("seconds", "1")))
        if behaviour == "wait-before-send" and req.tags.get("then") == "fail":  # the test acted meanwhile
            raise EngineError("fake engine failed after its wait", retryable=True)
        if behaviour == "fail":  # a failure that made nothing; before the send, so a cancel cannot stop it first
            raise EngineError("fake engine failed", retryable=True)
        if behaviour == "too-large":  # as a local engine's out-of-memory: the request's fault, not the engine's
            error = EngineError("fake engine ran out of memory", retryable=True)
            error.engine_fault = False
            raise error
        if behaviour == "crash-before-send":  # a bug while building the request: nothing was sent
            raise KeyError("size")
        if behaviour == "no-price-before-send":  # its prices file names no price for the model: nothing was sent
            raise NoPrice("fake engine: no price for this model")
        if behaviour == "crash-on-a-file":  # a plugin's own file missing: its error names the server's path
            raise FileNotFoundError(2, "No such file or directory", "/srv/acme-client/lora/weights.safetensors")
        if behaviour == "crash-beside-a-send":  # one request of two sent at once breaks before the other asks
            async def other() -> None:
                # Encoding its image, say, until the job is ending (a timer raced the end on a busy machine).
                deadline = time.monotonic() + 10
                while not ENDING.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                try:
                    await billable_send()
                    SENT.append(f"{req.prompt} (the other request)")
                finally:
                    ASKED.set()

            async def broken() -> None:
                raise KeyError("size")

            await asyncio.gather(other(), broken())
        if behaviour == "rate-limited":  # as `RemoteClient`: answered 429 (nothing made), its Retry-After waited out
            await billable_send()
            SENT.append(f"{req.prompt} (refused)")
            await cancel.race(asyncio.sleep(float(req.tags.get("answer_after", "0"))))  # out, until answered
            billable_send_refused()
            await cancel.race(asyncio.sleep(float(req.tags.get("retry_after", "1"))),
                              charged="unknown" if billable_sends_out() else "no")
        await billable_send()
        SENT.append(req.prompt)
        if behaviour == "second-call-no-id":  # a plugin's two paid calls, reporting no provider id
            until = Path(req.tags["until"])
            while not until.exists():  # preparing the second (not the token's wait, which tells no cost)
                await asyncio.sleep(0.02)
            cancel.raise_if_cancelled(charged="unknown" if billable_sends_out() else "no")
            await billable_send()
            SENT.append(f"{req.prompt} (second call)")
        if behaviour == "no-price-after-send":  # pricing the answer (a surplus image) with a price it lacks
            raise NoPrice("fake engine: no price for what it answered")
        if behaviour == "crash":  # a bug, not an EngineError: as reading an answer that lacks a field
            raise KeyError("images")
        if behaviour == "crash-said-late":  # as CUDA's errors: their text starts with a newline
            raise RuntimeError("\nCUDA error: an illegal memory access\nat /build/kernel.cu:12")
        progress.state("submitted")
        if behaviour == "hang-unsaved":  # as a synchronous provider's call: no id until it answers
            await cancel.race(asyncio.sleep(3600))
        if behaviour == "answer-late":  # a queueing provider slow to answer the submit (fal's, at times)
            await asyncio.sleep(float(req.tags.get("seconds", "1")))
        progress.provider_request(f"fake-{self.calls}", {"queue": "https://fake.test/requests"})
        if behaviour == "second-call":  # a multi-call job: another paid request after the first's id
            await billable_send()
            SENT.append(f"{req.prompt} (second call)")
        if behaviour in ("hang", "answer-late"):
            await cancel.race(asyncio.sleep(3600))
        if behaviour == "hang-free":  # as a free self-hosted server's render: a cancel says it cost nothing
            await cancel.race(asyncio.sleep(3600), charged="no")
        if behaviour == "slow" or req.tags.get("then") == "slow":  # `then`: after a wait-before-send
            await cancel.sleep(float(req.tags.get("seconds", "1")))
        if behaviour == "odd-progress":  # a plugin's values of other types than the protocol's
            import datetime

            import numpy as np

            progress.step(2.5, 4)  # type: ignore[arg-type]
            progress.step(np.int64(3), np.int64(4), Image.new("CMYK", (8, 8)))  # type: ignore[arg-type]
            progress.step("three", 4)  # type: ignore[arg-type]
            progress.state("polling", since=datetime.datetime(2026, 11, 30), ratio=float("nan"))
            progress.provider_request(f"fake-{self.calls}-odd", {"at": datetime.date(2026, 11, 30)})
        if behaviour == "timeout":
            raise EngineTimeout("fake engine: sent, no answer")
        if behaviour == "timeout-at-most":  # as `tiers._cloud.paid_calls`: asked for 4 credits' worth of it
            raise EngineTimeout("fake engine: sent, no answer", cost_millicredits=4000)
        if behaviour == "filtered":
            raise ContentFiltered("fake engine filtered the image")
        colour = (128, 128, 128)
        if req.init_image is not None:
            colour = tuple(int(c) for c in ImageStat.Stat(req.init_image.convert("RGB")).mean)  # type: ignore[assignment]
        # "short": answered, one image missing; "extra": two more than asked (a plugin's bug).
        count = req.n - 1 if behaviour == "short" else req.n + 2 if behaviour == "extra" else req.n
        # "seedless": images without a seed, as Gemini's, OpenAI's and fal's are; "huge-seed": one no
        # 64-bit column holds (a plugin's bug).
        seed = None if behaviour == "seedless" else 2**64 + 5 if behaviour == "huge-seed" else req.seed
        # "smaller": half the width asked, as a provider that makes less than it was paid for.
        size = (req.width // 2, req.height) if behaviour == "smaller" else (req.width, req.height)
        images = [RenderedImage(Image.new("RGB", size, colour), seed) for _ in range(count)]
        progress.step(1, 1)
        cost = req.tags.get("cost")
        # A cost of no whole millicredits (or an infinite one) is reported as it is: a plugin's bug.
        reported = None if cost is None else float(cost) * 1000
        # "long-model": a model name longer than the database's column (PostgreSQL refused the write);
        # "no-model": none at all (a plugin's bug).
        # "unstorable-text": a NUL (PostgreSQL refuses it) and a lone surrogate (not UTF-8) in what it names.
        model = {"long-model": "m" * 400, "no-model": None, "unstorable-text": "fake\x00one\ud800"}.get(
            behaviour, self.model)
        request_id = f"fake-{self.calls}" + ("\x00\udfff" if behaviour == "unstorable-text" else "")
        used = ({"negative_prompt": "blurry\x00ugly\ud800", "sampler": "euler\ud800", NOTES: ("a\x00note",)}
                if behaviour == "unstorable-text" else {})
        if behaviour == "finish-reasons":  # as Stability's: one per image, the last one's too long (a plugin's)
            used = {"finish_reasons": ["CONTENT_FILTERED"] * (count - 1) + ["x" * 500]}  # `FINISH_REASONS`
        return RenderResult(images=images, model=model,  # type: ignore[arg-type]
                            cost_millicredits=int(reported) if reported is not None and reported.is_integer()
                            else reported,  # type: ignore[arg-type]
                            # As Gemini's and OpenAI's usage with counts that are not counts.
                            cost_unread="usage unreadable" if behaviour == "unreadable-usage" else None,
                            provider_request_id=request_id, metadata=used)

    async def aclose(self) -> None:
        return None


WITHDRAWN: list[list[dict[str, Any]]] = []  # the handles fake-queue was asked to withdraw at its provider


class FakeQueueEngine(FakePaidEngine):
    """fake-paid behind a provider that keeps work by id (as Replicate and fal do): a process that
    starts after a crash can reattach. Tag `reattach=gone` makes the saved work unfindable."""

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx, name="fake-queue")
        self.reattached: list[list[dict[str, Any]]] = []

    def can_reattach(self, handles: list[dict[str, Any]], req: RenderRequest) -> bool:
        return len(handles) == 1

    async def withdraw(self, handles: list[dict[str, Any]]) -> bool:
        """Handles saved with `"queued": true` were taken off the provider's queue, as fal answers
        a cancel `OK`: nothing ran."""
        WITHDRAWN.append(handles)
        return bool(handles) and all(handle.get("queued") is True for handle in handles)

    async def reattach(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                       cancel: CancelToken) -> RenderResult:
        self.reattached.append(handles)
        if req.tags.get("reattach") == "gone":
            raise EngineError("fake queue: the saved request is gone", charged="unknown")
        if req.tags.get("reattach") == "aborted":  # as Replicate's `aborted`: ended before it ran, not billed
            raise EngineError("fake queue: the provider aborted the request before it ran").unbilled()
        if req.tags.get("reattach") == "polls-timed-out":  # each poll billed nothing; the work may have
            raise EngineTimeout("fake queue: no answer to the polls before the deadline", charged="no")
        if req.tags.get("reattach") == "hang":  # a long render, followed by each start in turn
            await cancel.race(asyncio.sleep(3600))
        images = [RenderedImage(Image.new("RGB", (req.width, req.height), (1, 2, 3)), req.seed) for _ in range(req.n)]
        progress.step(1, 1)
        return RenderResult(images=images, model=self.model, cost_millicredits=7_000,
                            provider_request_id=",".join(str(h["id"]) for h in handles))


def factory(ctx: EngineContext) -> FakePaidEngine:
    return FakePaidEngine(ctx)


def queue_factory(ctx: EngineContext) -> FakeQueueEngine:
    return FakeQueueEngine(ctx)


FORGOTTEN: list[dict[str, Any]] = []  # the handles fake-free was told to take off its server


class FakeServerEngine(FakePaidEngine):
    """fake-paid as a self-hosted server: free, and told after a crash to drop what the dead
    attempt queued (`Restartable`)."""

    async def forget(self, handles: list[dict[str, Any]]) -> None:
        FORGOTTEN.extend(handles)


RESUMED: list[dict[str, Any]] = []  # the handles fake-free-resuming was asked to resume from


class FakeResumingServerEngine(FakeServerEngine):
    """fake-free as a server that keeps finished work (ComfyUI): resumed, not forgotten."""

    async def resume(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                     cancel: CancelToken) -> RenderResult:
        RESUMED.extend(handles)
        return await self.run(req, progress, cancel)


def free_factory(ctx: EngineContext) -> FakePaidEngine:
    """A remote engine that costs nothing, as a self-hosted AUTOMATIC1111 does."""
    engine = FakeServerEngine(ctx, name="fake-free")
    engine._prices = PriceTable("fake-free", {"fake-1": {"image": 0}}, "2026-11")
    return engine


def resuming_factory(ctx: EngineContext) -> FakePaidEngine:
    """A remote engine that costs nothing and resumes after a crash, as a self-hosted ComfyUI does."""
    engine = FakeResumingServerEngine(ctx, name="fake-free")
    engine._prices = PriceTable("fake-free", {"fake-1": {"image": 0}}, "2026-11")
    return engine


def zero_priced_factory(ctx: EngineContext) -> FakePaidEngine:
    """A cloud engine an operator priced at 0 in the prices file: its provider may bill all the same."""
    engine = FakePaidEngine(ctx, name="fake-zero")
    engine._prices = PriceTable("fake-zero", {"fake-1": {"image": 0}}, "2026-11")
    return engine


def unpriced_factory(ctx: EngineContext) -> FakePaidEngine:
    engine = FakePaidEngine(ctx, name="fake-unpriced")
    engine._prices = PriceTable("fake-unpriced", {}, "2026-11")
    return engine


FORGET_TRIED: list[dict[str, Any]] = []  # the handles fake-free-forget-fails was told to take off its server


class FakeForgetFailingServerEngine(FakeServerEngine):
    """fake-free as a self-hosted server that cannot take the dead attempt's work off (unreachable
    for the delete, say): `forget` raises, which `Restartable` says it should not."""

    async def forget(self, handles: list[dict[str, Any]]) -> None:
        FORGET_TRIED.extend(handles)
        raise ConnectionError("fake-free: the server refused to drop the queued work")


def forget_failing_factory(ctx: EngineContext) -> FakePaidEngine:
    """fake-free (free, restartable) whose `forget` raises."""
    engine = FakeForgetFailingServerEngine(ctx, name="fake-free")
    engine._prices = PriceTable("fake-free", {"fake-1": {"image": 0}}, "2026-11")
    return engine


# What the plugin's work holds the device for before it fails.
PLUGIN_LOCAL_WORK_SECONDS = 0.3


class PluginLocalEngine(LocalEngine):
    """A plugin's local engine as one is written: `LocalEngine`'s runtime, model and limits, and
    work of its own on the inference thread that never calls `Progress.on_device`, then fails."""

    name = "plugin-local"
    stages: frozenset[Stage] = frozenset({"ideation"})

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx, ctx.settings.lite_model, Capabilities())

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        return await self._on_device(self._work, req, progress, cancel)

    def _work(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        time.sleep(PLUGIN_LOCAL_WORK_SECONDS)  # its work on the device
        raise EngineError("the plugin's work failed on the device", retryable=False, charged="no")


def plugin_local_factory(ctx: EngineContext) -> PluginLocalEngine:
    return PluginLocalEngine(ctx)


def holding_step_callback(real: Callable[..., Any]) -> Callable[..., Any]:
    """`LocalRuntime.step_callback` (`real`) whose callback holds the render at the end of the first
    denoising step, reported, until the job is interrupted (a stop, a cancel) or its process is
    killed: a test that acts on a job mid-render gets one at once, however loaded the machine,
    instead of starting a long render and racing its end."""
    def step_callback(runtime: Any, progress: Progress, cancel: CancelToken, **kwargs: Any) -> Callable[..., Any]:
        on_step = real(runtime, progress, cancel, **kwargs)

        def held(pipeline: Any, i: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            tensors = on_step(pipeline, i, timestep, tensors)  # reported (and a cancel seen) first
            while not cancel.cancelled:
                time.sleep(0.01)  # poll interval, on the inference thread as a step's work is
            return tensors

        return held

    return step_callback


# `holding_step_callback` installed in a server or worker process (`serve_process`'s `before`).
HOLD_AFTER_FIRST_STEP = ("from tests import fakes\nfrom tiers._local import LocalRuntime\n"
                         "LocalRuntime.step_callback = fakes.holding_step_callback(LocalRuntime.step_callback)")
