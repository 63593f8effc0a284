"""Step previews across processes: the running process keeps its job's latest preview in the data
dir, and any process serves it and names it in the progress events it tells from the row."""

from __future__ import annotations

import asyncio
import io
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from sqlmodel import col

from orchestrator import runner as runner_module
from orchestrator import store as store_module
from orchestrator.app import create_app
from orchestrator.clock import utcnow
from orchestrator.errors import Canceled
from orchestrator.follow import catch_up
from orchestrator.ids import new_id
from orchestrator.models import Job
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import PREVIEW_TEMP_SECONDS, Preview, PreviewFiles
from tests.api import assert_error, iter_sse
from tests.api.test_workers import add_job, other_process, row  # noqa: F401 (a fixture)
from tiers.base import CancelToken, Capabilities, EngineContext, Progress, RenderedImage, RenderRequest, RenderResult
from tiers.guard import ThirdParty

SettingsFactory = Callable[..., Settings]
ENGINE = "fake-preview"
ENGINES = f"{ENGINE}=tests.api.test_previews_shared:factory"
STEPPED_ENGINES = "fake-stepped=tests.api.test_previews_shared:stepped_factory"
LARGE_ENGINES = "fake-large=tests.api.test_previews_shared:large_factory"
EMPTY_ENGINES = "fake-empty=tests.api.test_previews_shared:empty_factory"
LATE_ENGINES = "fake-late=tests.api.test_previews_shared:late_factory"
STEPS = 4


class PreviewEngine:
    """A local engine that reports steps 1..STEPS-1 with previews from its own thread (as the
    inference thread does), then waits for `release` (or a cancel) before its last step."""

    name = ENGINE
    kind: Literal["local"] = "local"
    stages = frozenset({"ideation"})
    capabilities = Capabilities(seeds=True)

    def __init__(self) -> None:
        self.stepped = threading.Event()
        self.release = threading.Event()

    @property
    def model(self) -> str:
        return "fake-preview-1"

    def availability(self) -> tuple[bool, str | None]:
        return True, None

    def prices(self) -> dict[str, Any]:
        return {}

    def estimate(self, req: RenderRequest) -> int:
        return 0

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        return await asyncio.to_thread(self._denoise, req, progress, cancel)

    def _denoise(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        for step in range(1, STEPS):
            progress.step(step, STEPS, preview_of(step))
        self.stepped.set()
        while not self.release.wait(0.01):  # poll interval for a cancel, as between denoising steps
            if cancel.cancelled:
                raise Canceled("the job was canceled")
        progress.step(STEPS, STEPS, preview_of(STEPS))
        return RenderResult(images=[RenderedImage(Image.new("RGB", (req.width, req.height)), req.seed)],
                            model=self.model)

    async def aclose(self) -> None:
        pass


def factory(ctx: EngineContext) -> PreviewEngine:
    return PreviewEngine()


class SteppedEngine(PreviewEngine):
    """Reports steps 1 and 2 with previews, puts each step in `at` once told, and goes on from
    each once `go` is released."""

    name = "fake-stepped"

    def __init__(self) -> None:
        super().__init__()
        self.at: queue.Queue[int] = queue.Queue()
        self.go = threading.Semaphore(0)

    def preview(self, step: int) -> Image.Image:
        return preview_of(step)

    def _denoise(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        for step in (1, 2):
            progress.step(step, STEPS, self.preview(step))
            self.at.put(step)
            while not self.go.acquire(timeout=0.01):
                if cancel.cancelled:
                    raise Canceled("the job was canceled")
        return RenderResult(images=[RenderedImage(Image.new("RGB", (req.width, req.height)), req.seed)],
                            model=self.model)


def stepped_factory(ctx: EngineContext) -> SteppedEngine:
    return SteppedEngine()


class LargeEngine(SteppedEngine):
    """A plugin whose step previews are its image's full size, 2048x1000 (a wide one, where the
    Lite model's are at most PREVIEW_MAX_SIDE a side), each half red and half green."""

    name = "fake-large"

    def preview(self, step: int) -> Image.Image:
        image = Image.new("RGB", (2048, 1000), (255, 0, 0))
        image.paste((0, 255, 0), (1024, 0, 2048, 1000))
        return image


def large_factory(ctx: EngineContext) -> LargeEngine:
    return LargeEngine()


class EmptyEngine(SteppedEngine):
    """A plugin whose step previews are empty images: 0x512 at step 1, 512x0 at step 2."""

    name = "fake-empty"

    def preview(self, step: int) -> Image.Image:
        return Image.new("RGB", (0, 512) if step == 1 else (512, 0))


def empty_factory(ctx: EngineContext) -> EmptyEngine:
    return EmptyEngine()


class LateEngine(PreviewEngine):
    """A plugin whose own thread tells a step, with its preview, once `late` is set: after its
    render has returned."""

    name = "fake-late"

    def __init__(self) -> None:
        super().__init__()
        self.late = threading.Event()
        self.told = threading.Event()

    def _denoise(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        def tell() -> None:
            if self.late.wait(30):
                progress.step(2, STEPS, preview_of(2))
                self.told.set()

        threading.Thread(target=tell, daemon=True).start()
        return RenderResult(images=[RenderedImage(Image.new("RGB", (req.width, req.height)), req.seed)],
                            model=self.model)


def late_factory(ctx: EngineContext) -> LateEngine:
    return LateEngine()


class BrokenEngine(SteppedEngine):
    """A plugin whose step 1 preview cannot be read (a 1024x1024 PNG cut short, opened lazily, as
    `Image.open` of a file it is still writing would be); step 2's is whole."""

    name = "fake-broken"
    side = 1024

    def preview(self, step: int) -> Image.Image:
        if step != 1:
            return preview_of(step)
        buf = io.BytesIO()
        Image.effect_noise((self.side, self.side), 50).convert("RGB").save(buf, format="PNG")
        return Image.open(io.BytesIO(buf.getvalue()[:len(buf.getvalue()) // 2]))


def broken_factory(ctx: EngineContext) -> BrokenEngine:
    return BrokenEngine()


class SmallBrokenEngine(BrokenEngine):
    """`BrokenEngine` with a preview already within `PREVIEW_MAX_SIDE`: no shrink reads its pixels."""

    name = "fake-small-broken"
    side = 256


def small_broken_factory(ctx: EngineContext) -> SmallBrokenEngine:
    return SmallBrokenEngine()


class DeepEngine(SteppedEngine):
    """A plugin whose step previews are 16-bit grayscale (mode I;16), mid-gray: 30000 of 65535."""

    name = "fake-deep"

    def preview(self, step: int) -> Image.Image:
        return Image.new("I;16", (1024, 1024), 30000)


def deep_factory(ctx: EngineContext) -> DeepEngine:
    return DeepEngine()


def preview_of(step: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (step * 50, 0, 0))


def kept(step: int) -> Preview:
    """The preview of `step` as the runner keeps it."""
    return Preview(preview_of(step))


def red(png: bytes) -> int:
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (8, 8)
        pixel = image.convert("RGB").getpixel((0, 0))
    assert isinstance(pixel, tuple)
    return int(pixel[0])


@pytest.fixture
def worker(make_settings: SettingsFactory) -> Iterator[Services]:
    """The services of one process (a worker, or a server following a job), its scheduler driven by hand."""
    built = Services.build(make_settings(engines=ENGINES))
    try:
        yield built
    finally:
        asyncio.run(built.aclose())


def engine_of(services: Services) -> PreviewEngine:
    engine = services.registry.get(ENGINE)
    assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, PreviewEngine)
    return engine.wrapped


@pytest.mark.parametrize("ending", ["succeeded", "canceled"])
def test_a_worker_s_preview_is_served_by_another_process_while_the_job_runs(
        worker: Services, make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    monkeypatch.setattr(runner_module, "PROGRESS_WRITE_INTERVAL", 0.0)  # every step but the last writes
    api = start_server(make_settings(run_jobs=False))  # another process's API on the same data dir
    job_id = add_job(worker, engine=ENGINE)
    [(claim, _lane)] = worker.scheduler._claim_ready({})
    engine = engine_of(worker)
    running = threading.Thread(target=asyncio.run, args=(worker.runner.run(claim),))
    running.start()
    try:
        assert engine.stepped.wait(30)
        # The writes go behind the inference thread: the row's step comes after its preview file.
        deadline = time.monotonic() + 30
        while row(worker, job_id).progress_step != STEPS - 1:
            assert time.monotonic() < deadline, f"progress still {row(worker, job_id).progress_step}"
            time.sleep(0.01)
        preview = api.get(f"/v1/jobs/{job_id}/preview")
        assert preview.status_code == 200, preview.text
        assert preview.headers["content-type"] == "image/png"
        assert red(preview.content) == (STEPS - 1) * 50  # the latest step's
        # The API server tells the stream from the row, and names the preview it can serve.
        with api.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as response:
            progress = next(e for e in iter_sse(response) if e.event == "progress")
        assert progress.data["step"] == STEPS - 1
        assert progress.data["preview_url"] == f"/v1/jobs/{job_id}/preview?step={STEPS - 1}"
        assert api.get(progress.data["preview_url"]).status_code == 200
    finally:
        if ending == "succeeded":
            engine.release.set()
        else:
            claim.cancel.cancel()
        running.join(30)
    assert row(worker, job_id).status == ending
    files = worker.runner.preview_files
    assert not files.exists(job_id)
    assert_error(api.get(f"/v1/jobs/{job_id}/preview"), 404, "not_found")
    # A file a crashed process left is no preview of a job that is not running.
    files.write(job_id, kept(1))
    assert_error(api.get(f"/v1/jobs/{job_id}/preview"), 404, "not_found")


def test_progress_reported_on_the_event_loop_is_written_behind_it(worker: Services,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote engine reports on the event loop: while the database's write lock is held
    elsewhere, the loop goes on, and the write made after the wait is the latest step's."""
    monkeypatch.setattr(runner_module, "PROGRESS_WRITE_INTERVAL", 0.0)
    job_id = add_job(worker, engine=ENGINE)
    [(claim, _lane)] = worker.scheduler._claim_ready({})
    lock_free = threading.Event()
    written: list[tuple[int, bool]] = []
    real = runner_module.JobRunner.write_progress

    def behind_a_held_lock(self: runner_module.JobRunner, claim: runner_module.Claim, step: int,
                           total: int) -> None:
        written.append((step, threading.current_thread() is threading.main_thread()))
        assert lock_free.wait(10), "the event loop waited for the write"
        real(self, claim, step, total)

    monkeypatch.setattr(runner_module.JobRunner, "write_progress", behind_a_held_lock)

    async def report() -> None:
        progress = runner_module.JobProgress(worker.runner, claim)
        for step in (1, 2, 3):
            progress.step(step, 5)
        lock_free.set()
        deadline = time.monotonic() + 30
        while row(worker, job_id).progress_step != 3:
            assert time.monotonic() < deadline, f"progress still {row(worker, job_id).progress_step}"
            await asyncio.sleep(0.01)

    asyncio.run(report())
    assert written == [(1, False), (3, False)]  # one write at a time; step 2 was overtaken


def test_progress_reported_on_the_inference_thread_is_written_behind_it(worker: Services,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A local engine reports from its inference thread, which made the writes itself: a write
    lock held elsewhere (a backup, a stalled writer) stopped the denoising until it was free."""
    monkeypatch.setattr(runner_module, "PROGRESS_WRITE_INTERVAL", 0.0)
    job_id = add_job(worker, engine=ENGINE)
    [(claim, _lane)] = worker.scheduler._claim_ready({})
    lock_free = threading.Event()
    writers: list[str] = []
    real = runner_module.JobRunner.write_progress

    def behind_a_held_lock(self: runner_module.JobRunner, claim: runner_module.Claim, step: int,
                           total: int) -> None:
        writers.append(threading.current_thread().name)
        assert lock_free.wait(10), "the inference thread waited for the write"
        real(self, claim, step, total)

    monkeypatch.setattr(runner_module.JobRunner, "write_progress", behind_a_held_lock)
    progress = runner_module.JobProgress(worker.runner, claim)
    stepped = threading.Event()

    def inference() -> None:  # no event loop, as on the device's thread
        for step in (1, 2, 3):
            progress.step(step, 5)
        stepped.set()

    threading.Thread(target=inference, name="inference").start()
    assert stepped.wait(30)  # every step told while the first write still waits for the lock
    lock_free.set()
    deadline = time.monotonic() + 30
    while row(worker, job_id).progress_step != 3:
        assert time.monotonic() < deadline, f"progress still {row(worker, job_id).progress_step}"
        time.sleep(0.01)
    assert len(writers) == 2 and all(name.startswith("progress") for name in writers)  # step 2 was overtaken


def test_a_step_s_preview_is_encoded_once_however_often_it_is_asked_for(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each GET encoded the latest preview to PNG again (tens of ms for a 512 px one): clients
    # polling it cost the server an encode each.
    encoded: list[int] = []  # the step of each preview encoded (its red is 50 a step)
    save = Image.Image.save

    def counted(image: Image.Image, fp: Any, format: str | None = None, **params: Any) -> None:
        if format == "PNG" and image.size == (8, 8):
            pixel = image.getpixel((0, 0))
            assert isinstance(pixel, tuple)
            encoded.append(int(pixel[0]) // 50)
        save(image, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", counted)
    app = create_app(make_settings(run_jobs=False, engines=STEPPED_ENGINES))
    with TestClient(app) as client:
        services: Services = app.state.services
        job_id = add_job(services, engine="fake-stepped")
        [(claim, _lane)] = services.scheduler._claim_ready({})
        engine = services.registry.get("fake-stepped")
        assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, SteppedEngine)
        stepped = engine.wrapped
        running = threading.Thread(target=asyncio.run, args=(services.runner.run(claim),))
        running.start()
        try:
            for step in (1, 2):
                assert stepped.at.get(timeout=30) == step
                for _ in range(3):
                    preview = client.get(f"/v1/jobs/{job_id}/preview")
                    assert preview.status_code == 200 and red(preview.content) == step * 50
                # Once, by the first GET or the preview file's write, whichever came first.
                assert encoded.count(step) == 1, encoded
                stepped.go.release()
        finally:
            stepped.go.release(2)  # whatever is left, should an assertion have stopped the loop
            running.join(30)
        assert row(services, job_id).status == "succeeded"


def test_a_plugin_s_full_size_preview_is_shrunk_as_a_local_engine_s_is(make_settings: SettingsFactory) -> None:
    # A plugin's 2048x1000 preview was served and written at that size, where the Lite model's
    # are PREVIEW_MAX_SIDE (512) a side at most: shrunk to 512x250 now, the same picture.
    app = create_app(make_settings(run_jobs=False, engines=LARGE_ENGINES))
    with TestClient(app) as client:
        services: Services = app.state.services
        job_id = add_job(services, engine="fake-large")
        [(claim, _lane)] = services.scheduler._claim_ready({})
        engine = services.registry.get("fake-large")
        assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, LargeEngine)
        large = engine.wrapped
        running = threading.Thread(target=asyncio.run, args=(services.runner.run(claim),))
        running.start()
        try:
            assert large.at.get(timeout=30) == 1
            served = client.get(f"/v1/jobs/{job_id}/preview")
            assert served.status_code == 200, served.text
            preview = services.runner.previews[job_id]
            services.runner.write_preview(job_id, preview)  # as the write behind the engine makes it
            written = services.runner.preview_files.read(job_id)
            assert written == served.content
            with Image.open(io.BytesIO(served.content)) as image:
                assert image.size == (512, 250)
                rgb = image.convert("RGB")
                assert rgb.getpixel((10, 125)) == (255, 0, 0) and rgb.getpixel((500, 125)) == (0, 255, 0)
        finally:
            large.go.release(2)
            running.join(30)
        assert row(services, job_id).status == "succeeded"


def test_a_plugin_s_full_size_preview_is_held_shrunk_from_the_step_that_publishes_it(
        make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrunk only when first encoded (a GET, or the write behind the engine, at most once a
    # second), the plugin's whole 2048x1000 preview was held until its next step: 6,144,000 bytes
    # per running job here, 201,326,592 (192 MiB) for an 8192x8192 one. Held at 512x250 now.
    monkeypatch.setattr(runner_module, "PROGRESS_WRITE_INTERVAL", 3600.0)  # no write behind encodes it
    app = create_app(make_settings(run_jobs=False, engines=LARGE_ENGINES))
    with TestClient(app):
        services: Services = app.state.services
        job_id = add_job(services, engine="fake-large")
        [(claim, _lane)] = services.scheduler._claim_ready({})
        engine = services.registry.get("fake-large")
        assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, LargeEngine)
        large = engine.wrapped
        running = threading.Thread(target=asyncio.run, args=(services.runner.run(claim),))
        running.start()
        try:
            assert large.at.get(timeout=30) == 1
            held = services.runner.previews[job_id].image  # nobody has asked for it yet
            assert held.size == (512, 250)
            assert held.width * held.height * len(held.getbands()) == 384_000
        finally:
            large.go.release(2)
            running.join(30)
        assert row(services, job_id).status == "succeeded"


def test_an_empty_preview_is_dropped_and_its_step_told_without_one(make_settings: SettingsFactory) -> None:
    # A plugin's 0x512 preview was kept and named by the step's event: every GET of the preview
    # failed with a 500 (PNG holds no empty image), and so did each write of its file.
    app = create_app(make_settings(run_jobs=False, engines=EMPTY_ENGINES))
    with TestClient(app) as client:
        services: Services = app.state.services
        told: list[dict[str, Any]] = []
        publish = services.bus.publish

        def recorded(job_id: str, type_: str, data: dict[str, Any], **kwargs: Any) -> None:
            if type_ == "progress":
                told.append(data)
            publish(job_id, type_, data, **kwargs)

        services.bus.publish = recorded  # type: ignore[method-assign]
        job_id = add_job(services, engine="fake-empty")
        [(claim, _lane)] = services.scheduler._claim_ready({})
        engine = services.registry.get("fake-empty")
        assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, EmptyEngine)
        empty = engine.wrapped
        running = threading.Thread(target=asyncio.run, args=(services.runner.run(claim),))
        running.start()
        try:
            for step in (1, 2):
                assert empty.at.get(timeout=30) == step
                assert_error(client.get(f"/v1/jobs/{job_id}/preview"), 404, "not_found")
                assert job_id not in services.runner.previews
                empty.go.release()
        finally:
            empty.go.release(2)
            running.join(30)
        assert row(services, job_id).status == "succeeded"
    assert told[:2] == [{"step": 1, "total": STEPS, "fraction": 0.25}, {"step": 2, "total": STEPS, "fraction": 0.5}]


@pytest.mark.parametrize(("name", "factory", "kind"), [
    # Shrunk on the engine's thread as it is told (it was shrunk when first read, by a GET or the
    # write behind), a plugin's unreadable preview raised out of `progress.step` into the plugin:
    # its render failed ("image file is truncated") for a preview, which is only ever shown.
    ("fake-broken", "broken_factory", BrokenEngine),
    # Only a shrink read a preview's pixels as it was told: one within PREVIEW_MAX_SIDE (256 px, cut
    # short, opened lazily) was kept unread, its step told with a `preview_url`, and each GET of it
    # failed 500 when the encode met the truncated data.
    ("fake-small-broken", "small_broken_factory", SmallBrokenEngine),
], ids=["shrunk", "small"])
def test_a_preview_that_cannot_be_read_is_dropped_and_the_render_goes_on(
        make_settings: SettingsFactory, name: str, factory: str, kind: type[BrokenEngine]) -> None:
    app = create_app(make_settings(run_jobs=False, engines=f"{name}=tests.api.test_previews_shared:{factory}"))
    with TestClient(app, raise_server_exceptions=False) as client:
        services: Services = app.state.services
        told: list[dict[str, Any]] = []
        publish = services.bus.publish

        def recorded(job_id: str, type_: str, data: dict[str, Any], **kwargs: Any) -> None:
            if type_ == "progress":
                told.append(data)
            publish(job_id, type_, data, **kwargs)

        services.bus.publish = recorded  # type: ignore[method-assign]
        job_id = add_job(services, engine=name)
        [(claim, _lane)] = services.scheduler._claim_ready({})
        engine = services.registry.get(name)
        assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, kind)
        broken = engine.wrapped
        running = threading.Thread(target=asyncio.run, args=(services.runner.run(claim),))
        running.start()
        try:
            assert broken.at.get(timeout=30) == 1
            assert_error(client.get(f"/v1/jobs/{job_id}/preview"), 404, "not_found")
            broken.go.release()
            assert broken.at.get(timeout=30) == 2
            assert client.get(f"/v1/jobs/{job_id}/preview").status_code == 200
        finally:
            broken.go.release(2)
            running.join(30)
        job = row(services, job_id)
        assert job.status == "succeeded", job.error
    assert told[0] == {"step": 1, "total": STEPS, "fraction": 0.25}
    assert told[1]["step"] == 2 and "preview_url" in told[1]


def test_a_16_bit_preview_is_shown_as_it_looks(make_settings: SettingsFactory) -> None:
    # Converted to RGB as it was, each 16-bit sample above 255 was cut to 255: a mid-gray preview
    # (30000 of 65535) was served all white.
    app = create_app(make_settings(run_jobs=False, engines="fake-deep=tests.api.test_previews_shared:deep_factory"))
    with TestClient(app) as client:
        services: Services = app.state.services
        job_id = add_job(services, engine="fake-deep")
        [(claim, _lane)] = services.scheduler._claim_ready({})
        engine = services.registry.get("fake-deep")
        assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, DeepEngine)
        deep = engine.wrapped
        running = threading.Thread(target=asyncio.run, args=(services.runner.run(claim),))
        running.start()
        try:
            assert deep.at.get(timeout=30) == 1
            answer = client.get(f"/v1/jobs/{job_id}/preview")
            assert answer.status_code == 200
            with Image.open(io.BytesIO(answer.content)) as shown:
                assert shown.size == (512, 512)
                assert shown.convert("L").getpixel((256, 256)) == 30000 // 256
        finally:
            deep.go.release(2)
            running.join(30)
        assert row(services, job_id).status == "succeeded"


def test_a_step_told_after_the_engine_returned_keeps_no_preview(make_settings: SettingsFactory) -> None:
    # A plugin's thread that told a step once its render had returned (its job succeeded, no cancel
    # set) put a preview in the runner's map that nothing removed again: held by the process for
    # good, one per such job (up to 192 MiB for an 8192x8192 preview, before it was shrunk), and
    # served by GET /v1/jobs/{id}/preview for the finished job.
    app = create_app(make_settings(run_jobs=False, engines=LATE_ENGINES))
    with TestClient(app) as client:
        services: Services = app.state.services
        job_id = add_job(services, engine="fake-late")
        [(claim, _lane)] = services.scheduler._claim_ready({})
        engine = services.registry.get("fake-late")
        assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, LateEngine)
        late = engine.wrapped
        asyncio.run(services.runner.run(claim))
        assert row(services, job_id).status == "succeeded"
        late.late.set()
        assert late.told.wait(30)
        assert job_id not in services.runner.previews
        assert_error(client.get(f"/v1/jobs/{job_id}/preview"), 404, "not_found")


def test_a_preview_is_encoded_once_when_asked_for_from_threads_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def slow(image: Image.Image) -> bytes:
        calls.append(1)
        time.sleep(0.05)  # long enough for every thread to ask meanwhile
        return b"png"

    monkeypatch.setattr(store_module, "encode_preview", slow)
    preview = kept(1)
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _: preview.png(), range(8))) == {b"png"}
    assert calls == [1]


def test_a_preview_written_behind_a_job_that_ended_meanwhile_is_not_left(worker: Services) -> None:
    """The write behind the engine read the latest preview, the job ended (finding no file to
    remove), then the file was written: it stayed until the sweep, its entry for good."""
    job_id = add_job(worker)
    runner = worker.runner
    runner.write_preview(job_id, kept(1))  # the job's end popped its preview already
    assert not runner.preview_files.exists(job_id)
    assert job_id not in runner._preview_written
    runner.previews[job_id] = kept(2)  # running: kept
    runner.write_preview(job_id, kept(2))
    assert runner.preview_files.exists(job_id)


def test_the_follower_names_the_preview_when_the_running_process_wrote_one(
        worker: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = add_job(worker)
    files = worker.runner.preview_files

    async def no_loop() -> None:
        pass

    # The test tells each tick: the follower's own loop, reading a row in its thread while the test
    # wrote that row and then its file, told step 2 without its preview under a loaded CI.
    monkeypatch.setattr(worker.follower, "_loop", no_loop)

    async def scenario() -> list[dict[str, Any]]:
        bus, follower = worker.bus, worker.follower
        bus.bind(asyncio.get_running_loop())
        catch_up(bus, row(worker, job_id), [])
        follower.follow(job_id)
        seen: list[dict[str, Any]] = []

        async def listen() -> None:
            async for event in bus.subscribe(job_id):
                if event.type == "progress":
                    seen.append(event.data)

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0)  # the listener subscribes
        # Another process runs the job: its progress write comes with a preview file, then without.
        with worker.db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == job_id).values(status="running", attempt=1, started_at=utcnow(),
                                                                      progress_step=2, progress_total=4))
        files.write(job_id, kept(2))
        await follower.tick()
        files.remove(job_id)
        with worker.db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == job_id).values(progress_step=3))
        await follower.tick()
        with worker.db.transaction() as s:
            s.execute(update(Job).where(col(Job.id) == job_id).values(status="canceled"))
        await follower.tick()
        await asyncio.wait_for(listener, timeout=10)
        return seen

    assert asyncio.run(scenario()) == [
        {"step": 2, "total": 4, "fraction": 0.5, "preview_url": f"/v1/jobs/{job_id}/preview?step=2"},
        {"step": 3, "total": 4, "fraction": 0.75},
    ]


def test_preview_files_of_jobs_not_running_are_swept_at_start(
        make_settings: SettingsFactory, other_process: subprocess.Popen[bytes]) -> None:  # noqa: F811
    services = Services.build(make_settings())
    files = services.runner.preview_files
    lease: dict[str, Any] = {"status": "running", "attempt": 1, "lease_expires_at": utcnow() + timedelta(minutes=5)}
    crashed = add_job(services, **{**lease, "lease_owner": "dead-host:1:0",
                                   "lease_expires_at": utcnow() - timedelta(seconds=1)})
    elsewhere = add_job(services, **lease, lease_owner=f"{socket.gethostname()}:{other_process.pid}:0")
    finished = add_job(services, status="succeeded")
    for job_id in (crashed, elsewhere, finished):
        files.write(job_id, kept(1))
    old_temp, new_temp, other = files.root / ".tmp-old.png", files.root / ".tmp-new.png", files.root / "notes.txt"
    for path in (old_temp, new_temp, other):
        path.write_bytes(b"x")
    past = time.time() - PREVIEW_TEMP_SECONDS - 1
    os.utime(old_temp, (past, past))

    async def start_and_stop() -> None:
        await services.scheduler.start()
        try:
            assert row(services, crashed).status == "queued"  # recovered first, then swept
            left = sorted(p.name for p in files.root.iterdir())
            assert left == sorted([f"{elsewhere}.png", new_temp.name, other.name])
        finally:
            await services.aclose()

    asyncio.run(start_and_stop())


def test_a_fast_job_writes_no_preview_file(worker: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    files = worker.runner.preview_files
    monkeypatch.setattr(files, "write", lambda job_id, image: written.append(job_id))
    # All its steps within the interval between the row's progress writes (made long: the machine
    # may be slow), so no write takes a preview file along.
    monkeypatch.setattr(runner_module, "PROGRESS_WRITE_INTERVAL", 3600.0)
    job_id = add_job(worker, engine=ENGINE)
    engine_of(worker).release.set()
    [(claim, _lane)] = worker.scheduler._claim_ready({})
    asyncio.run(worker.runner.run(claim))
    assert row(worker, job_id).status == "succeeded"
    assert written == [] and not files.root.exists()


def test_a_preview_file_is_named_only_by_a_job_id(tmp_path: Path) -> None:
    files = PreviewFiles(tmp_path / "previews")
    for name in ("../escape", "job_../../x", "ast_01j00000000000000000000000", ""):
        assert files.path_for(name) is None
        files.write(name, kept(1))
        assert files.read(name) is None and not files.exists(name)
    assert not files.root.exists() and list(tmp_path.iterdir()) == []


def test_a_preview_is_never_read_through_a_link_nor_from_a_fifo(tmp_path: Path) -> None:
    """The folder may be shared with other users of the data dir's group: a link named as a job's
    preview served the file it led to (the server's /proc/<pid>/environ, its keys) to any key of
    the job's project, and a FIFO held the request for ever."""
    files = PreviewFiles(tmp_path / "previews")
    files.root.mkdir()
    secret = tmp_path / "environ"
    secret.write_bytes(b"ORCH_ADMIN_KEY=hunter2")
    linked, fifo = new_id("job"), new_id("job")
    path = files.path_for(linked)
    assert path is not None
    path.symlink_to(secret)
    assert files.read(linked) is None and not files.exists(linked)
    fifo_path = files.path_for(fifo)
    assert fifo_path is not None
    os.mkfifo(fifo_path)
    assert files.read(fifo) is None and not files.exists(fifo)  # at once: no writer is waited for
    files.write(linked, kept(2))  # the job's own preview replaces the link
    assert files.read(linked) == path.read_bytes() and not path.is_symlink()


def test_a_crashed_attempt_s_preview_is_not_shown_for_the_next_one(
        worker: Services, make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    """The job runs again (attempt 2) before the sweeper removed attempt 1's file: until attempt 2
    writes its own, there is no preview, rather than the dead attempt's."""
    api = start_server(make_settings(run_jobs=False))
    job_id = add_job(worker)
    files = worker.runner.preview_files
    files.write(job_id, kept(3))
    path = files.path_for(job_id)
    assert path is not None
    written = path.stat().st_mtime
    os.utime(path, (written - 60, written - 60))  # attempt 1 wrote it a minute ago
    with worker.db.transaction() as s:
        s.execute(update(Job).where(col(Job.id) == job_id).values(status="running", attempt=2, started_at=utcnow(),
                                                                  progress_step=1, progress_total=4))
    assert_error(api.get(f"/v1/jobs/{job_id}/preview"), 404, "not_found")
    with api.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as response:
        progress = next(e for e in iter_sse(response) if e.event == "progress")
    assert "preview_url" not in progress.data
    files.write(job_id, kept(1))  # attempt 2's own
    assert red(api.get(f"/v1/jobs/{job_id}/preview").content) == 50


def test_a_preview_stamped_by_a_clock_a_little_behind_is_the_running_attempt_s(worker: Services) -> None:
    """A file's time comes from the kernel's coarse clock (a few ms behind the one that stamped the
    attempt's start), or from another host on a shared filesystem: the first step's preview of a
    fast job looked older than its attempt and was never served."""
    job_id = add_job(worker)
    files = worker.runner.preview_files
    files.write(job_id, kept(2))
    path = files.path_for(job_id)
    assert path is not None
    started = utcnow()
    for behind, served in ((0.004, True), (0.5, True), (30.0, False)):
        stamp = started.timestamp() - behind
        os.utime(path, (stamp, stamp))
        assert files.exists(job_id, since=started) is served, behind
        assert (files.read(job_id, since=started) is not None) is served, behind


def test_recovery_removes_a_dead_attempt_s_preview(worker: Services) -> None:
    """Written a moment before its process died, within the slack a file's time is given: the next
    attempt, started at once by another worker, would have served it as its own."""
    job_id = add_job(worker, status="running", attempt=1, lease_owner="dead-host:1:0", started_at=utcnow(),
                     lease_expires_at=utcnow() - timedelta(seconds=1))
    files = worker.runner.preview_files
    files.write(job_id, kept(3))
    assert asyncio.run(worker.scheduler.recover(all_foreign=False)) == [job_id]
    assert row(worker, job_id).status == "queued" and not files.exists(job_id)


@pytest.mark.parametrize(("size", "shrunk"),
                         [((600, 8000), (38, 512)), ((8192, 4), (512, 1)), ((513, 513), (512, 512))])
def test_a_preview_is_shrunk_to_the_bound_its_aspect_kept(size: tuple[int, int], shrunk: tuple[int, int]) -> None:
    with Image.open(io.BytesIO(Preview(Image.new("RGB", size)).png())) as image:
        assert image.size == shrunk


def test_a_preview_within_the_bound_is_encoded_at_its_size() -> None:
    with Image.open(io.BytesIO(Preview(Image.new("RGBA", (512, 300))).png())) as image:
        assert (image.size, image.mode) == ((512, 300), "RGBA")


def test_a_preview_name_that_cannot_be_removed_does_not_stop_the_preview_sweep(tmp_path: Path) -> None:
    # A folder named as a temp file, or as a stopped job's preview, raised out of the sweep, which
    # the scheduler runs at its start (the service did not start) and at each of its sweeps.
    files = PreviewFiles(tmp_path / "previews")
    files.root.mkdir()
    old = time.time() - 2 * PREVIEW_TEMP_SECONDS
    stuck_temp, stuck_job = files.root / ".tmp-stuck", files.path_for(new_id("job"))
    assert stuck_job is not None
    for folder in (stuck_temp, stuck_job):
        folder.mkdir()
        os.utime(folder, (old, old))
    temp = files.root / ".tmp-left.png"
    temp.write_bytes(b"half")
    os.utime(temp, (old, old))
    gone = new_id("job")
    files.write(gone, kept(1))
    assert files.sweep(lambda job_ids: set()) == 2
    assert sorted(path.name for path in files.root.iterdir()) == sorted([stuck_temp.name, stuck_job.name])


def test_a_folder_among_the_previews_is_passed_over_without_a_warning_at_each_sweep(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The scheduler sweeps every 15 s (ORCH_SWEEP_INTERVAL): a folder named as a temp file or as a
    # stopped job's preview was tried and warned of at each sweep, forever, though no preview write
    # ever makes a folder (as `ArtifactStore.sweep_temp` passes over one without a word).
    files = PreviewFiles(tmp_path / "previews")
    files.root.mkdir()
    old = time.time() - 2 * PREVIEW_TEMP_SECONDS
    stuck_job = files.path_for(new_id("job"))
    assert stuck_job is not None
    for folder in (files.root / ".tmp-stuck", stuck_job):
        folder.mkdir()
        os.utime(folder, (old, old))
    temp = files.root / ".tmp-left.png"
    temp.write_bytes(b"half")
    os.utime(temp, (old, old))
    with caplog.at_level("WARNING", logger="orchestrator.store"):
        assert [files.sweep(lambda job_ids: set()) for _ in range(3)] == [1, 0, 0]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    assert sorted(path.name for path in files.root.iterdir()) == sorted([".tmp-stuck", stuck_job.name])
