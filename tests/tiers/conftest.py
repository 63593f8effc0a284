"""Fixtures and helpers for engine tests: settings with fake keys, a recording sleep so retries cost
no time, test images, a multipart parser, a recording Progress and a RenderRequest builder."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import heapq
import io
import itertools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from PIL import Image

from orchestrator.errors import Canceled
from orchestrator.settings import Settings
from tests.conftest import isolate
from tiers import tiny
from tiers.base import CancelToken, EngineContext, NullProgress, RenderRequest
from tiers.lite import LiteEngine
from tiers.local_hifi import LocalHifiEngine


class RecordingSleep:
    """Stands in for asyncio.sleep inside RemoteClient: records the waits, takes no time."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)

    def clock(self) -> float:
        """A clock that the recorded waits move on: set it as a client's clock and its retries
        reach their deadline."""
        return 1000.0 + sum(self.waits)


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


T = TypeVar("T")


class FakeTime:
    """A clock for work done side by side. `RecordingSleep`'s clock adds every wait to the last, as
    if all were made one after another; here `sleep` waits until the clock reaches its end, and
    `run` moves the clock on, to the earliest waiter's end, only once every task waits: two waits
    of 10 s made together take 10 s, not 20."""

    # Turns of the event loop with nothing run by the test's own task before the clock is moved
    # on: the other tasks (an in-memory respx exchange takes a few) have run as far as they can.
    IDLE_TURNS = 50

    def __init__(self) -> None:
        self.now = 0.0
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (self.now + max(seconds, 0.0), next(self._order), woken))
        await woken

    async def run(self, awaitable: Awaitable[T], within: float = 30.0) -> T:
        """`await awaitable`, the clock moved on whenever every task waits; `within` real seconds
        at most (a bound for a loaded machine)."""
        task = asyncio.ensure_future(awaitable)
        try:
            await self._drive(task, within)
        finally:
            task.cancel()  # a no-op once it is done
        return task.result()

    async def _drive(self, task: asyncio.Future[Any], within: float) -> None:
        async with asyncio.timeout(within):
            while not task.done():
                for _ in range(self.IDLE_TURNS):
                    await asyncio.sleep(0)
                    if task.done():
                        break
                while self._waiting and self._waiting[0][2].done():  # a waiter cancelled
                    heapq.heappop(self._waiting)
                if task.done() or not self._waiting:
                    await asyncio.sleep(0.001)  # a thread's work (decoding an image) under way
                    continue
                self.now = max(self.now, self._waiting[0][0])
                while self._waiting and self._waiting[0][0] <= self.now:
                    woken = heapq.heappop(self._waiting)[2]
                    if not woken.done():
                        woken.set_result(None)


class BlockingSleep:
    """Stands in for asyncio.sleep: a back-off wait that lasts until the test is done with it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.entered.set()
        await asyncio.Event().wait()


class NoAnswer:
    """A respx side effect: the provider takes the request and never answers; `sent` is set once
    the request is out."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()

    async def __call__(self, _request: httpx.Request) -> httpx.Response:
        self.sent.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class HeldRequest:
    """A respx side effect: the request is out (a create held open by `Prefer: wait`, a large
    upload, a slow queue) until `answer` is set, then answered with `response`. `sent`: it is out;
    `dropped`: it was cut before its answer; `answered`: it got one."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.sent, self.answer = asyncio.Event(), asyncio.Event()
        self.dropped = self.answered = False

    async def __call__(self, _request: httpx.Request) -> httpx.Response:
        self.sent.set()
        try:
            await self.answer.wait()
        except asyncio.CancelledError:
            self.dropped = True
            raise
        self.answered = True
        return self.response


async def canceled_while_out(engine: Any, req: RenderRequest, held: HeldRequest, *,
                             abandon: bool = False) -> Canceled:
    """Run `req` on `engine`, cancel it while `held` is out, and return its `Canceled`: at once,
    the request still out."""
    token = CancelToken()
    run = asyncio.create_task(engine.run(req, NullProgress(), token))
    await asyncio.wait_for(held.sent.wait(), 5)
    token.cancel(abandon=abandon)
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(run, 5)
    assert not held.answer.is_set()
    return info.value


async def until(predicate: Callable[[], bool], within: float = 30.0, *, then: float = 0.0) -> None:
    """Poll `predicate` until it holds, for `within` seconds at most (a bound for a loaded machine,
    not a wait: the test's assertions then say what was missing); then let what follows it run for
    `then` seconds (a second call that must not come)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not predicate():
                await asyncio.sleep(0.005)
    if then:
        await asyncio.sleep(then)


Answer = Callable[[], httpx.Response]
SideEffect = Callable[[httpx.Request], httpx.Response]


def cancel_at_poll(token: CancelToken, answer: Answer) -> SideEffect:
    """A poll's side effect: the job is canceled as the poll is answered with `answer()`."""
    def poll(request: httpx.Request) -> httpx.Response:
        token.cancel()
        return answer()

    return poll


def deadline_at_poll(engine: Any, answer: Answer) -> SideEffect:
    """A poll's side effect: the engine's clock jumps past its deadline at each poll."""
    now = [0.0]
    engine.http.clock = lambda: now[0]

    def poll(request: httpx.Request) -> httpx.Response:
        now[0] += 100.0
        return answer()

    return poll


@pytest.fixture
def make_ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., EngineContext]:
    """`make_ctx(**settings)`: an engine's context, which the developer's environment (a real
    ORCH_GEMINI_API_KEY, an orchestrator.toml) cannot reach."""
    isolate(monkeypatch, tmp_path)

    def make(**overrides: Any) -> EngineContext:
        values: dict[str, Any] = {"data_dir": tmp_path, "remote_deadline": 60.0}
        values.update(overrides)
        return EngineContext(settings=Settings(**values))

    return make


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def draft_image(size: tuple[int, int] = (64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (10, 120, 200))
    img.putpixel((0, 0), (255, 0, 0))
    return img


def multipart(request: httpx.Request) -> tuple[dict[str, str], dict[str, bytes]]:
    """The text fields and the files of a multipart request, parsed independently of httpx."""
    raw = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode() + request.read()
    message = email.message_from_bytes(raw, policy=email.policy.HTTP)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if part.get_filename():
            files[name] = payload
        else:
            fields[name] = payload.decode()
    return fields, files


class LoopSpy:
    """Functions of an engine's module replaced by spies that note which were called, and which of
    those on the event loop's thread (image work there stalls the API, every event stream and
    the lease renewals)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, *names: str) -> None:
        self.called: set[str] = set()
        self.on_loop: list[str] = []
        for name in names:
            monkeypatch.setattr(module, name, self._spying(name, getattr(module, name)))

    def _spying(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.called.add(name)
            try:
                asyncio.get_running_loop()
                self.on_loop.append(name)
            except RuntimeError:
                pass  # a worker thread: no loop runs there
            return real(*args, **kwargs)
        return call


class RecordingProgress(NullProgress):
    """A Progress that records the steps, states and provider request ids an engine reports."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []
        self.states: list[str] = []
        self.request_ids: list[str] = []
        self.handles: list[dict[str, Any]] = []  # as the runner saves them, for `reattach`

    def step(self, step: int, total: int, preview: Any = None) -> None:
        self.steps.append((step, total))

    def state(self, state: str, **details: Any) -> None:
        self.states.append(state)

    def provider_request(self, request_id: str, handle: Mapping[str, Any] | None = None) -> None:
        self.request_ids.append(request_id)
        self.handles.append({**(handle or {}), "id": request_id})


def bridge(**kw: Any) -> RenderRequest:
    """A bridge-stage request carrying a fresh draft; keyword arguments override the defaults."""
    values: dict[str, Any] = {"stage": "bridge", "prompt": "a lighthouse", "width": 1024, "height": 1024,
                              "init_image": draft_image()}
    values.update(kw)
    return RenderRequest(**values)


EngineFactory = Callable[..., tuple[LiteEngine, LocalHifiEngine]]


@pytest.fixture
def engines(make_settings: Callable[..., Settings]) -> Iterator[EngineFactory]:
    """`engines(**settings)`: the two local engines, sharing one runtime, on the tiny model unless
    `lite_model` says otherwise; their inference thread is stopped afterwards."""
    made: list[LiteEngine] = []

    def make(**overrides: Any) -> tuple[LiteEngine, LocalHifiEngine]:
        ctx = EngineContext(settings=make_settings(**{"lite_model": tiny.NAME, **overrides}))
        lite, hifi = LiteEngine(ctx), LocalHifiEngine(ctx)
        made.append(lite)
        return lite, hifi

    yield make
    for lite in made:
        lite.runtime.shutdown(timeout=30)


# An error body of 8 MiB of `[0,0,...]` under a key no engine reads: some 0.4 s to parse whole,
# on the event loop every other job's polls, event streams and lease renewals held meanwhile.
LARGE_ERROR_PADDING = b"[" + b"0," * 2**22 + b"0]"


@pytest.fixture
def loop_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the bodies read as JSON (`tiers._http.text_json`) on the event loop; those
    read in a worker thread are not listed."""
    import tiers._http

    real = tiers._http.text_json
    sizes: list[int] = []

    def parsing(text: str | bytes) -> Any:
        try:
            asyncio.get_running_loop()
            sizes.append(len(text))
        except RuntimeError:
            pass  # a worker thread
        return real(text)

    monkeypatch.setattr(tiers._http, "text_json", parsing)
    return sizes
