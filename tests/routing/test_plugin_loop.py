"""A third-party engine that blocks the event loop: told in the log and its note, never hidden."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator
from typing import Any

import pytest

from tests.fakes import FakePaidEngine
from tiers.base import CancelToken, EngineContext, NullProgress, RenderRequest, RenderResult
from tiers.guard import LOOP_HOLD_LIMIT, ThirdParty, _Timed

REQUEST = RenderRequest(stage="bridge", prompt="x")


class Blocking(FakePaidEngine):
    """A plugin whose run sleeps as `time.sleep` (or a `requests.post`) does, holding the loop."""

    def __init__(self, ctx: EngineContext, seconds: float, *, blocks: bool = True) -> None:
        super().__init__(ctx, name="blocking")
        self.seconds, self.blocks = seconds, blocks

    async def run(self, req: RenderRequest, progress: Any, cancel: CancelToken) -> RenderResult:
        await asyncio.sleep(0)
        if self.blocks:
            time.sleep(self.seconds)
        else:
            await asyncio.sleep(self.seconds)
        return RenderResult(images=[], model="fake-1")


def plugin(seconds: float, *, blocks: bool = True) -> ThirdParty:
    return ThirdParty(Blocking(EngineContext(settings=None), seconds, blocks=blocks))  # type: ignore[arg-type]


async def test_a_plugin_that_blocks_the_loop_is_told_in_the_log_and_its_note(caplog: pytest.LogCaptureFixture) -> None:
    """A `time.sleep(30)` in a plugin's run froze the service (a health check took 29.8 s), and
    nothing said why: no warning, `/v1/engines` said `health: ok`."""
    engine = plugin(LOOP_HOLD_LIMIT * 1.2)
    caplog.set_level(logging.WARNING, logger="tiers.guard")
    await engine.run(REQUEST, NullProgress(), CancelToken())
    [record] = [r for r in caplog.records if "event loop" in r.getMessage()]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith("engine blocking held the service's event loop for ")
    assert " s in run(): every request waited; do blocking work in asyncio.to_thread" in message
    assert engine.note is not None
    assert "Its run() held the service's event loop for " in engine.note and "asyncio.to_thread" in engine.note
    # Said once in the log for a while (each of its jobs would repeat it), and still in its note.
    caplog.clear()
    await engine.run(REQUEST, NullProgress(), CancelToken())
    assert [r for r in caplog.records if "event loop" in r.getMessage()] == []
    assert engine.note is not None and "run() held" in engine.note


async def test_a_plugin_that_awaits_as_long_is_not_told(caplog: pytest.LogCaptureFixture) -> None:
    engine = plugin(LOOP_HOLD_LIMIT * 1.2, blocks=False)
    caplog.set_level(logging.WARNING, logger="tiers.guard")
    await engine.run(REQUEST, NullProgress(), CancelToken())
    assert [r for r in caplog.records if "event loop" in r.getMessage()] == []
    assert engine.note is None


def timed(awaitable: Any, held: list[float] | None = None, limit: float = 10.0) -> _Timed[Any]:
    return _Timed(awaitable, limit, (held if held is not None else []).append)


async def test_the_timing_passes_results_and_exceptions_as_await_does() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        return 42

    async def fail() -> None:
        await asyncio.sleep(0)
        raise raised

    raised = ValueError("its own")
    assert await timed(answer()) == 42
    with pytest.raises(ValueError) as info:
        await timed(fail())
    assert info.value is raised
    held: list[float] = []
    assert await timed(answer(), held, limit=0.0) == 42
    assert len(held) == 3  # one step per await, and the last to its return


class Echo:
    """An awaitable that yields what it is sent back, and answers what is thrown into it."""

    def __init__(self) -> None:
        self.closed = False

    def __await__(self) -> Generator[Any, Any, Any]:
        try:
            got = yield "first"
            while got != "stop":
                try:
                    got = yield f"echo {got}"
                except KeyError as exc:
                    got = yield f"caught {exc.args[0]}"
            return "stopped"
        except GeneratorExit:
            self.closed = True
            raise


def drive(awaitable: Any) -> list[Any]:
    """What the steps of `awaitable` yield, return and raise, driven as a task drives a coroutine."""
    steps: list[Any] = []
    it = awaitable.__await__()
    steps.append(next(it))
    for action in ("send", "throw", "send", "throw-other", "send-stop"):
        try:
            if action == "send":
                steps.append(it.send(len(steps)))
            elif action == "throw":
                steps.append(it.throw(KeyError("k")))
            elif action == "throw-other":
                steps.append(it.throw(ValueError("v")))
            else:
                steps.append(it.send("stop"))
        except StopIteration as stop:
            steps.append(("returned", stop.value))
        except Exception as exc:  # compared as the plain await's
            steps.append(("raised", type(exc).__name__, str(exc)))
            break
    return steps


def test_the_timing_passes_sent_values_and_thrown_exceptions_as_await_does() -> None:
    plain = drive(Echo())
    assert drive(timed(Echo())) == plain
    assert plain == ["first", "echo 1", "caught k", "echo 3", ("raised", "ValueError", "v")]


def test_the_timing_closes_what_it_awaits_when_it_is_closed() -> None:
    echo = Echo()
    it = timed(echo).__await__()
    assert next(it) == "first"
    it.close()
    assert echo.closed


async def test_the_timing_passes_a_cancel_through() -> None:
    seen: list[str] = []

    async def waits(swallow: bool) -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("cancelled")
            if swallow:
                return "ended on its own"
            raise
        return "slept"

    task = asyncio.ensure_future(timed(waits(swallow=False)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]
    # One that ends on its own once told answers as its plain await does.
    task = asyncio.ensure_future(timed(waits(swallow=True)))
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task == "ended on its own"
    assert seen == ["cancelled", "cancelled"]
