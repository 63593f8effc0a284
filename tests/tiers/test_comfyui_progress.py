"""The ComfyUI engine's step progress from the server's websocket: a real websocket server on
loopback, with respx answering the HTTP routes of the same host and port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import respx
from PIL import Image
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from orchestrator.errors import Canceled
from tests.tiers.conftest import RecordingProgress, png_bytes, until
from tests.tiers.test_comfyui import WORKFLOW, bridge, history, mock_server, write_workflow
from tiers.base import CancelToken, NullProgress
from tiers.comfyui import MAX_UNIT, ComfyUIEngine, _Steps, not_samplers, websocket_url

Frame = str | bytes
Script = Callable[[str, int], list[Frame]]
ProcessRequest = Callable[[ServerConnection, Request], Response | None]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """websockets takes a proxy from the environment, as httpx does: these tests reach loopback."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy", "socks_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


class FakeComfy:
    """ComfyUI's websocket: sends `script(prompt_id, index)` for each prompt the engine queues
    (told by `queued`), in order, once the engine is connected; records what it saw."""

    def __init__(self, script: Script | None = None, process_request: ProcessRequest | None = None) -> None:
        self.script: Script = script or (lambda prompt_id, index: [])
        self.process_request = process_request
        self.paths: list[str] = []  # of the upgrade requests, accepted or not
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_codes: list[int | None] = []
        self._queued: asyncio.Queue[str] = asyncio.Queue()
        self.server: Server | None = None

    async def start(self) -> int:
        def on_request(connection: ServerConnection, request: Request) -> Response | None:
            self.paths.append(request.path)
            return self.process_request(connection, request) if self.process_request else None

        self.server = await serve(self._handler, "127.0.0.1", 0, process_request=on_request)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def queued(self, prompt_id: str) -> None:
        self._queued.put_nowait(prompt_id)

    async def _handler(self, socket: ServerConnection) -> None:
        self.connected.set()
        sender = asyncio.create_task(self._send(socket))
        try:
            await socket.wait_closed()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self.close_codes.append(socket.close_code)
            self.closed.set()

    async def _send(self, socket: ServerConnection) -> None:
        index = 0
        while True:
            prompt_id = await self._queued.get()
            with contextlib.suppress(ConnectionClosed):  # the client may close on a frame (too big)
                for frame in self.script(prompt_id, index):
                    await socket.send(frame)
            index += 1


class Steps(RecordingProgress):
    """Records steps and previews; `reach(count)` waits (2 s at most) until `count` steps are told."""

    def __init__(self) -> None:
        super().__init__()
        self.previews: list[tuple[int, Image.Image]] = []
        self._told = asyncio.Event()

    def step(self, step: int, total: int, preview: Any = None) -> None:
        super().step(step, total, preview)
        if preview is not None:
            self.previews.append((step, preview))
        self._told.set()

    async def reach(self, count: int) -> None:
        # Generous: every test's count is reached, and a loaded machine (a whole suite's pauses) is slow.
        with contextlib.suppress(TimeoutError):  # then the test's assertions say what was missing
            async with asyncio.timeout(30):
                while len(self.steps) < count:
                    self._told.clear()
                    await self._told.wait()


def comfy_routes(base: str, fake: FakeComfy | None,
                 gate: Callable[[int], Awaitable[None]]) -> dict[str, respx.Route]:
    """`mock_server`'s routes at `base`: a queued prompt is told to `fake`, and the history of the
    job's k-th prompt appears once `gate(k)` returns."""
    routes = mock_server(base=base)
    queue_prompt = cast(Callable[[httpx.Request], httpx.Response], routes["prompt"].side_effect)
    prompts: list[str] = []

    def on_prompt(request: httpx.Request) -> httpx.Response:
        response = queue_prompt(request)
        prompts.append(json.loads(request.content)["prompt_id"])
        if fake is not None:
            fake.queued(prompts[-1])
        return response

    async def on_history(request: httpx.Request) -> httpx.Response:
        prompt_id = request.url.path.rsplit("/", 1)[1]
        await gate(prompts.index(prompt_id))
        return httpx.Response(200, json=history(prompt_id))

    routes["prompt"].side_effect = on_prompt
    routes["history"].side_effect = on_history
    return routes


def engine_at(make_ctx: Any, tmp_path: Path, base: str, **settings: Any) -> ComfyUIEngine:
    eng = ComfyUIEngine(make_ctx(comfyui_url=base, comfyui_workflow=write_workflow(tmp_path), **settings))
    eng.poll_interval = 0
    return eng


async def tasks_left(*fakes: FakeComfy) -> list[asyncio.Task[Any]]:
    """The tasks still pending once the fake servers are stopped: what the engine left behind.
    (A task cancelled without being awaited, as `CancelToken.race` leaves its waiter, needs a turn
    of the loop to end: it is given a moment.)"""
    for fake in fakes:
        await fake.stop()

    def pending() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]

    await until(lambda: not pending(), within=10)
    return pending()


def progress_frame(prompt_id: Any, value: Any, maximum: Any, node: str = "3") -> str:
    return json.dumps({"type": "progress", "data": {"value": value, "max": maximum, "prompt_id": prompt_id,
                                                    "node": node}})


def preview_frame(image: bytes, fmt: int = 2, event: int = 1) -> bytes:
    return event.to_bytes(4, "big") + fmt.to_bytes(4, "big") + image


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tiers.comfyui"]


@respx.mock
async def test_steps_follow_the_sampler_over_the_whole_job(make_ctx: Any, tmp_path: Path) -> None:
    def script(prompt_id: str, index: int) -> list[Frame]:
        frames: list[Frame] = [
            json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}),
            json.dumps({"type": "execution_start", "data": {"prompt_id": prompt_id}}),
            json.dumps({"type": "executing", "data": {"node": "3", "prompt_id": prompt_id}}),
        ]
        if index == 0:  # a base sampler, then a refiner whose count starts again at 0
            frames += [progress_frame(prompt_id, v, 4) for v in (1, 2)]
            frames += [progress_frame(prompt_id, v, 4, node="20") for v in (1, 2, 3)]
        else:
            frames += [progress_frame(prompt_id, v, 4) for v in (1, 2, 3, 4)]
        return [*frames, json.dumps({"type": "executing", "data": {"node": None, "prompt_id": prompt_id}})]

    fake = FakeComfy(script)
    base = f"http://127.0.0.1:{await fake.start()}/comfy"
    progress = Steps()
    routes = comfy_routes(base, fake, lambda k: progress.reach([3, 7][k]))
    engine = engine_at(make_ctx, tmp_path, base)

    result = await engine.run(bridge(n=2, seed=7), progress, CancelToken())

    assert progress.steps == [(1, 8), (2, 8), (3, 8), (4, 8), (5, 8), (6, 8), (7, 8), (8, 8)]
    assert [img.seed for img in result.images] == [7, 8]
    client_ids = {json.loads(c.request.content)["client_id"] for c in routes["prompt"].calls}
    assert len(client_ids) == 1 and fake.paths == [f"/comfy/ws?clientId={client_ids.pop()}"]
    await until(fake.closed.is_set)
    assert fake.close_codes == [1000]  # closed by the engine when the render ended
    assert await tasks_left(fake) == []
    await engine.aclose()


@respx.mock
async def test_frames_of_other_prompts_are_ignored(make_ctx: Any, tmp_path: Path) -> None:
    def script(prompt_id: str, index: int) -> list[Frame]:
        return [progress_frame("someone-else", 50, 100), progress_frame(None, 3, 4),
                json.dumps({"type": "progress", "data": {"value": 3, "max": 4}}),
                progress_frame(prompt_id.upper(), 3, 4),
                progress_frame(prompt_id, 1, 4)]

    fake = FakeComfy(script)
    base = f"http://127.0.0.1:{await fake.start()}"
    progress = Steps()
    comfy_routes(base, fake, lambda k: progress.reach(1))
    engine = engine_at(make_ctx, tmp_path, base)

    await engine.run(bridge(), progress, CancelToken())

    assert progress.steps == [(1, 4), (4, 4)]
    assert await tasks_left(fake) == []
    await engine.aclose()


def not_found(connection: ServerConnection, request: Request) -> Response:
    return connection.respond(HTTPStatus.NOT_FOUND, "404: Not Found\n")


@respx.mock
@pytest.mark.parametrize("server", ["refused", "404"])
async def test_a_server_without_a_websocket_renders_as_before(make_ctx: Any, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture, server: str) -> None:
    caplog.set_level(logging.DEBUG, logger="tiers.comfyui")
    fake = FakeComfy(process_request=not_found)
    port = await fake.start()
    if server == "refused":
        await fake.stop()  # nothing listens on the port any more
    base = f"http://127.0.0.1:{port}"
    progress = Steps()

    async def after_the_attempt(k: int) -> None:
        await until(lambda: bool(logged(caplog)))

    comfy_routes(base, None, after_the_attempt)
    engine = engine_at(make_ctx, tmp_path, base)

    result = await engine.run(bridge(n=2), progress, CancelToken())

    assert len(result.images) == 2 and result.images[1].image.getpixel((0, 0)) == (1, 2, 3)
    assert progress.steps == [(1, 2), (2, 2)]
    [record] = logged(caplog)  # one line, and no retrying
    assert record.levelno == logging.INFO and "websocket" in record.getMessage()
    if server == "404":
        assert "HTTP 404" in record.getMessage() and len(fake.paths) == 1
    assert await tasks_left(fake) == []
    await engine.aclose()


@respx.mock
async def test_an_upgrade_that_is_never_answered_does_not_hold_the_job(make_ctx: Any, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tiers.comfyui")
    accepted, hung_up = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024):  # the upgrade request, never answered
                pass
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def once_connected(k: int) -> None:
        await until(accepted.is_set)

    comfy_routes(base, None, once_connected)
    engine = engine_at(make_ctx, tmp_path, base, remote_connect_timeout=600.0)
    progress = Steps()

    # Not held until the websocket's connect timeout gives up (10 minutes).
    result = await asyncio.wait_for(engine.run(bridge(), progress, CancelToken()), 60)

    assert len(result.images) == 1 and progress.steps == [(1, 1)]
    await until(hung_up.is_set)
    assert hung_up.is_set()  # the engine let go of the connection
    assert logged(caplog) == []  # a render that ends first is no failure of the websocket
    server.close()
    await server.wait_closed()
    assert await tasks_left() == []
    await engine.aclose()


@respx.mock
async def test_malformed_frames_do_not_break_the_job(make_ctx: Any, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tiers.comfyui")

    def script(prompt_id: str, index: int) -> list[Frame]:
        bad: list[Frame] = [
            "not json", "{", "[1, 2]", "null", '"progress"', "[" * 100_000 + "]" * 100_000,
            json.dumps({"type": "progress", "data": "3 of 4"}),
            json.dumps({"type": "progress", "data": {"value": 1, "max": 4, "prompt_id": [prompt_id]}}),
            *(progress_frame(prompt_id, value, maximum) for value, maximum in [
                ("3", 4), (3, "4"), (True, 4), (3, True), (1.5, 4), (3, 4.0), (None, 4), (3, None),
                (-1, 4), (5, 4), (0, 0), (3, -4)]),
            # More digits than Python parses into an int.
            '{"type": "progress", "data": {"value": 1, "max": ' + "4" * 5000 + f', "prompt_id": "{prompt_id}"}}}}',
            b"", b"\x00", b"\x00\x00\x00\x01", preview_frame(b"not an image"),
        ]
        return [*bad, progress_frame(prompt_id, 2, 4), "x" * (9 * 2**20)]

    fake = FakeComfy(script)
    base = f"http://127.0.0.1:{await fake.start()}"
    progress = Steps()

    async def after_the_frames(k: int) -> None:
        await progress.reach(1)
        await until(fake.closed.is_set)

    comfy_routes(base, fake, after_the_frames)
    engine = engine_at(make_ctx, tmp_path, base)

    result = await engine.run(bridge(), progress, CancelToken())

    assert len(result.images) == 1
    assert progress.steps == [(2, 4), (4, 4)] and progress.previews == []
    assert fake.close_codes == [1009]  # the engine refused the huge frame ("message too big")
    [record] = logged(caplog)
    assert "1009" in record.getMessage()
    assert await tasks_left(fake) == []
    await engine.aclose()


@respx.mock
async def test_previews_come_with_their_step(make_ctx: Any, tmp_path: Path) -> None:
    def script(prompt_id: str, index: int) -> list[Frame]:
        def at(value: int) -> str:
            return progress_frame(prompt_id, value, 8)

        return [
            preview_frame(png_bytes((0, 0, 255))),  # before any step of the prompt: whose is it?
            at(1), preview_frame(jpeg_bytes((255, 0, 0)), fmt=1),
            preview_frame(png_bytes((0, 0, 255))),  # a second one for the same step
            at(2), preview_frame(png_bytes((0, 0, 255)), fmt=3),  # a format ComfyUI does not send
            at(3), preview_frame(png_bytes((0, 0, 255)), event=2),  # not a preview
            at(4), preview_frame(png_bytes((0, 0, 255), size=(2048, 1024))),  # past the preview limit
            at(5), preview_frame(b"\x89PNG\r\n\x1a\n broken"),
            at(6), preview_frame(png_bytes((0, 255, 0), size=(8, 8))),
            at(7),
        ]

    fake = FakeComfy(script)
    base = f"http://127.0.0.1:{await fake.start()}"
    progress = Steps()
    comfy_routes(base, fake, lambda k: progress.reach(9))
    engine = engine_at(make_ctx, tmp_path, base)

    await engine.run(bridge(), progress, CancelToken())

    assert [step for step, _ in progress.steps] == [1, 1, 2, 3, 4, 5, 6, 6, 7, 8]
    assert [step for step, _ in progress.previews] == [1, 6]
    red, green = (image.convert("RGB").getpixel((4, 4)) for _, image in progress.previews)
    assert isinstance(red, tuple) and red[0] > 200 and red[1] < 60 and green == (0, 255, 0)
    assert await tasks_left(fake) == []
    await engine.aclose()


@respx.mock
async def test_an_upscaler_s_progress_before_the_sampler_does_not_hide_its_steps(make_ctx: Any,
                                                                                 tmp_path: Path) -> None:
    """An upscale-then-refine polish: the model upscaler's tile frames came first and set the scale
    to its 4 tiles, and the sampler's steps then never moved it, nor showed a preview."""
    graph = {**WORKFLOW,
             "30": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.pth"}},
             "31": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["30", 0], "image": ["10", 0]}}}

    def script(prompt_id: str, index: int) -> list[Frame]:
        frames: list[Frame] = [progress_frame(prompt_id, v, 4, node="31") for v in (1, 2, 3, 4)]
        for v in range(1, 6):
            frames += [progress_frame(prompt_id, v, 5, node="3"), preview_frame(jpeg_bytes((v, v, v)), fmt=1)]
        return frames

    fake = FakeComfy(script)
    base = f"http://127.0.0.1:{await fake.start()}"
    progress = Steps()
    comfy_routes(base, fake, lambda k: progress.reach(8))  # 4 steps told, each with its preview
    engine = ComfyUIEngine(make_ctx(comfyui_url=base, comfyui_workflow=write_workflow(tmp_path, graph)))
    engine.poll_interval = 0

    await engine.run(bridge(stage="polish", creativity=0.3), progress, CancelToken())

    assert sorted(set(progress.steps)) == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert [step for step, _ in progress.previews] == [1, 2, 3, 4]
    assert await tasks_left(fake) == []
    await engine.aclose()


def test_a_workflow_without_a_node_named_sampler_counts_every_node_s_frames() -> None:
    assert not_samplers({"1": {"class_type": "UltimateSDUpscale", "inputs": {}}}) == frozenset()
    assert not_samplers({"1": {"class_type": "SamplerCustomAdvanced", "inputs": {}},
                         "2": {"class_type": "VAEDecodeTiled", "inputs": {}}}) == {"2"}


@respx.mock
async def test_a_cancel_during_a_render_closes_the_websocket(make_ctx: Any, tmp_path: Path) -> None:
    fake = FakeComfy(lambda prompt_id, index: [progress_frame(prompt_id, 1, 4)])
    base = f"http://127.0.0.1:{await fake.start()}"
    progress = Steps()
    token = CancelToken()

    async def cancel_once_told(k: int) -> None:
        await progress.reach(1)
        token.cancel()
        await asyncio.Event().wait()  # the poll is still out when the job is canceled

    routes = comfy_routes(base, fake, cancel_once_told)
    engine = engine_at(make_ctx, tmp_path, base)

    with pytest.raises(Canceled) as info:
        await engine.run(bridge(), progress, token)

    assert info.value.charged == "no" and progress.steps == [(1, 4)]
    prompt_id = json.loads(routes["prompt"].calls.last.request.content)["prompt_id"]
    assert json.loads(routes["queue"].calls.last.request.content) == {"delete": [prompt_id]}  # as before
    await until(fake.closed.is_set)
    assert fake.close_codes == [1000]
    assert await tasks_left(fake) == []
    await engine.aclose()


@respx.mock
async def test_a_redirect_is_not_followed(make_ctx: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tiers.comfyui")
    elsewhere = FakeComfy(lambda prompt_id, index: [progress_frame(prompt_id, 1, 4)])
    other_port = await elsewhere.start()

    def redirect(connection: ServerConnection, request: Request) -> Response:
        return Response(302, "Found", Headers({"Location": f"ws://127.0.0.1:{other_port}{request.path}",
                                               "Content-Length": "0"}))

    fake = FakeComfy(process_request=redirect)
    base = f"http://127.0.0.1:{await fake.start()}"
    progress = Steps()

    async def after_the_attempt(k: int) -> None:
        await until(lambda: bool(logged(caplog)))

    comfy_routes(base, elsewhere, after_the_attempt)
    engine = engine_at(make_ctx, tmp_path, base)

    await engine.run(bridge(), progress, CancelToken())

    assert len(fake.paths) == 1 and elsewhere.paths == []
    assert progress.steps == [(1, 1)]
    assert "HTTP 302" in logged(caplog)[0].getMessage()
    assert await tasks_left(fake, elsewhere) == []
    await engine.aclose()


@respx.mock
@pytest.mark.parametrize(("userinfo", "credentials"), [
    ("render:pw-secret-2", b"render:pw-secret-2"),
    ("render:p%40ss", b"render:p@ss"),  # percent-encoded, as the README tells for an `@`
    ("render", b"render:"),  # a user without a password: httpx sends it with an empty one
])
async def test_the_websocket_sends_the_url_s_credentials_as_the_http_requests_do(
        make_ctx: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, userinfo: str, credentials: bytes) -> None:
    """A proxy in front of ComfyUI takes the URL's user:password on the websocket too. With a user
    and no password, websockets refused the URL (InvalidURI) while httpx sent `user:`: the jobs
    rendered with no step progress."""
    caplog.set_level(logging.DEBUG, logger="tiers.comfyui")
    told: list[str | None] = []

    def record(connection: ServerConnection, request: Request) -> Response | None:
        told.append(request.headers.get("Authorization"))
        return None

    fake = FakeComfy(lambda prompt_id, index: [progress_frame(prompt_id, 1, 4)], process_request=record)
    host = f"127.0.0.1:{await fake.start()}"
    progress = Steps()
    routes = comfy_routes(f"http://{host}", fake, lambda k: progress.reach(1))
    engine = engine_at(make_ctx, tmp_path, f"http://{userinfo}@{host}")

    await engine.run(bridge(), progress, CancelToken())

    basic = "Basic " + base64.b64encode(credentials).decode()
    assert routes["prompt"].calls.last.request.headers["authorization"] == basic
    assert told == [basic] and progress.steps[0] == (1, 4)
    assert not logged(caplog), logged(caplog)[0].getMessage()  # no "no step progress"
    assert await tasks_left(fake) == []
    await engine.aclose()


def test_progress_is_followed_by_default(make_ctx: Any, tmp_path: Path) -> None:
    assert engine_at(make_ctx, tmp_path, "http://127.0.0.1:8188").follow_progress is True


@respx.mock
async def test_each_render_tries_once_and_only_the_first_failure_is_told_at_info(
        make_ctx: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tiers.comfyui")
    fake = FakeComfy(process_request=not_found)
    base = f"http://127.0.0.1:{await fake.start()}"

    async def after_the_attempt(k: int) -> None:
        await until(lambda: len(logged(caplog)) == len(fake.paths))

    comfy_routes(base, None, after_the_attempt)
    engine = engine_at(make_ctx, tmp_path, base)

    for _ in range(2):
        await engine.run(bridge(), NullProgress(), CancelToken())
        await until(lambda: len(logged(caplog)) == len(fake.paths))

    assert len(fake.paths) == 2
    assert [r.levelno for r in logged(caplog)] == [logging.INFO, logging.DEBUG]
    assert await tasks_left(fake) == []
    await engine.aclose()


@pytest.mark.parametrize(("base", "expected"), [
    ("http://127.0.0.1:8188", "ws://127.0.0.1:8188/ws?clientId=c1"),
    ("https://comfy.example.com/", "wss://comfy.example.com/ws?clientId=c1"),
    ("https://user:secret@comfy.example.com:8443/studio/comfy/",
     "wss://user:secret@comfy.example.com:8443/studio/comfy/ws?clientId=c1"),
    ("http://[::1]:8188/", "ws://[::1]:8188/ws?clientId=c1"),
])
def test_the_websocket_is_the_configured_server_s(base: str, expected: str) -> None:
    assert websocket_url(base, "c1") == expected


def test_the_overall_figure_never_goes_back() -> None:
    progress = RecordingProgress()
    steps = _Steps(progress, 3)
    steps.images(1)  # the first image came without frames (the websocket was not up yet)
    steps.sampled(1, 2, 4)  # then the sampler's 4 steps become the unit
    steps.sampled(1, 1, 4)  # a second sampler starting again
    steps.sampled(1, 4, 4)  # the sampler's end: the image is not made until downloaded
    steps.images(2)
    steps.sampled(2, 5, 10)  # another count is scaled to the unit
    steps.images(3)
    assert progress.steps == [(1, 3), (6, 12), (7, 12), (8, 12), (10, 12), (12, 12)]

    huge = RecordingProgress()
    steps = _Steps(huge, 1)
    steps.sampled(0, 1, 10**9)
    steps.sampled(0, 5 * 10**8, 10**9)
    assert huge.steps == [(MAX_UNIT // 2, MAX_UNIT)]
