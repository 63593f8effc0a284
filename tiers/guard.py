"""The guard around third-party engines (`orchestrator.engines` plugins, ORCH_ENGINES): their
bugs fail their own work, never the service or another engine's. Built-ins are not wrapped."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast, get_args

from orchestrator.errors import Canceled, NoPrice, OrchestratorError
from orchestrator.schemas import storable
from tiers._images import MAX_OUTPUT_PIXELS
from tiers.base import (
    MAX_MODEL_CHARS,
    UNKNOWN_MODEL,
    CancelToken,
    Capabilities,
    Engine,
    Kind,
    Progress,
    Reattachable,
    RenderRequest,
    RenderResult,
    Restartable,
    Resumable,
    Stage,
    Withdrawable,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds a third-party engine has, once its job is canceled, to end on its own before its task
# is stopped: long enough to take its work off a provider, short enough not to hold a job forever.
PLUGIN_CANCEL_GRACE = 30.0
# Seconds one step of a third-party engine's coroutine (its code between two awaits) may hold the
# event loop before the log and `/v1/engines` say so: meanwhile every request, health check and
# other job of the service waits. A `time.sleep` or a blocking HTTP client in `async def run` does it.
LOOP_HOLD_LIMIT = 0.5
# Seconds between two warnings of one engine's holds: one that blocks does so on every job.
LOOP_HOLD_WARN_EVERY = 600.0
# Seconds a third-party engine's `availability()`, `estimate()`, `prices()`, `can_reattach()`,
# `model` or `note` may take. All are asked while a request or a recovery waits, and a submit asks
# some again under the database's write lock (see `JobService.submit`), as a job's end reads its
# model: one blocked on a licence server or a price list held every write of the service (job
# ends, claims, heartbeats) until it answered.
PLUGIN_CALL_LIMIT = 2.0


# What `_limited` names as a property ("its model did not answer"), not as a call.
PROPERTIES = frozenset({"model", "note"})


class PluginFault(Exception):
    """A third-party engine broke a rule no built-in breaks; the job fails as on any engine bug."""


class Overdue(Exception):
    """A third-party engine's synchronous call did not answer within its limit (`PLUGIN_CALL_LIMIT`)."""


# What a plugin's synchronous calls may raise and still be only its own failure: KeyboardInterrupt
# is left out, as there it is more likely the operator's Ctrl-C than the plugin's.
FAULTS = (Exception, SystemExit, GeneratorExit)


def conforms(engine: object, protocol: type) -> bool:
    """Whether `engine` has every member of `protocol`, looked up as Python 3.12's `isinstance`
    does (`inspect.getattr_static`): on 3.11 `isinstance` ran each property, and a plugin whose
    `model` raised was listed as broken, though the guard reads that `model` as unknown."""
    members = {name for cls in protocol.__mro__ if cls.__module__ not in ("typing", "builtins")
               for name in (*inspect.get_annotations(cls), *vars(cls)) if not name.startswith("_")}
    missing = object()
    return all(inspect.getattr_static(engine, name, missing) is not missing for name in members)


class _Timed(Generic[T]):
    """Awaits `awaitable` as `await awaitable` does (what it sends, returns and raises, and what is
    thrown into it, a cancel too, pass through unchanged), timing each of its steps: each runs the
    plugin's code on the event loop until its next await, and `held(seconds)` hears of every step
    longer than `limit`. Only told, never stopped: nothing can take the loop back from it."""

    def __init__(self, awaitable: Awaitable[T], limit: float, held: Callable[[float], None]) -> None:
        self._awaitable, self._limit, self._held = awaitable, limit, held

    def __await__(self) -> Generator[Any, Any, T]:
        # `yield from` (PEP 380) spelled out, with a clock around each step.
        inner = self._awaitable.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            started = time.monotonic()
            try:
                if thrown is not None:
                    throw = getattr(inner, "throw", None)
                    if throw is None:
                        raise thrown
                    yielded = throw(thrown)
                else:
                    yielded = next(inner) if sent is None else inner.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            finally:
                thrown = None  # the exception's traceback holds this frame
                if (seconds := time.monotonic() - started) > self._limit:
                    self._held(seconds)
            try:
                sent = yield yielded
            except GeneratorExit:
                close = getattr(inner, "close", None)
                if close is not None:
                    close()
                raise
            except BaseException as exc:
                sent, thrown = None, exc


class ThirdParty:
    """A third-party engine, held so that its bugs fail its own work, never the service or another
    engine's: an `availability()` that raises, or answers something other than `(bool, reason)`,
    reads as unavailable (the service still starts, and routing goes on to the rule's next
    engine), an `estimate()` that raises as no price (unknown is never free), and either one that
    does not answer within `call_limit` seconds so too; `prices()` and `model` that raise read as
    none, as does a `prices()` that does not answer in time; a `run()` that ignores its cancel is
    stopped after `cancel_grace` seconds, and one that raises `CancelledError`, `SystemExit`,
    `KeyboardInterrupt` or any other `BaseException` of its own fails its job (asyncio lets those
    end the event loop itself).
    One whose code holds the event loop longer than `loop_hold_limit` seconds between two awaits
    (a blocking call in `run()`) is told in the log and in its note (`/v1/engines`): it cannot be
    stopped, and every request waits meanwhile. Everything else is the engine's own (`__getattr__`)."""

    def __init__(self, engine: Engine) -> None:
        self.wrapped = self._engine = engine
        self.name, self.kind, self.stages = engine.name, engine.kind, engine.stages
        self.capabilities: Capabilities = engine.capabilities  # checked at load (`checked`)
        self.cancel_grace = PLUGIN_CANCEL_GRACE
        self.loop_hold_limit = LOOP_HOLD_LIMIT
        self._loop_held: str | None = None  # said in its note until the service stops
        self._loop_hold_warned = -LOOP_HOLD_WARN_EVERY
        self.call_limit = PLUGIN_CALL_LIMIT
        self._overdue: dict[str, tuple[object, float]] = {}  # by method: the call past its limit, and its start
        self._overdue_lock = threading.Lock()
        self._overdue_warned: dict[str, float] = {}  # by method: when its last late call was warned of

    # A plugin's images are not taken to be opaque on its word: a storage quota holds its jobs at
    # 4 bytes a pixel and a colour profile (`orchestrator.quota.opaque`).
    opaque_images = False

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._engine, attr)

    @property
    def model(self) -> str:
        try:
            model = self._limited("model", lambda: self._engine.model)
        except Overdue:
            return UNKNOWN_MODEL  # said in the log
        except FAULTS:
            log.exception("engine %s: its model failed", self.name)
            return UNKNOWN_MODEL
        if not isinstance(model, str):
            return UNKNOWN_MODEL
        # As jobs store it (see the runner's cut of a result's); a NUL failed every submit's write on PostgreSQL.
        return storable(model[:MAX_MODEL_CHARS])

    @property
    def note(self) -> str | None:
        try:
            note = self._limited("note", lambda: getattr(self._engine, "note", None))
        except Overdue as exc:
            note = str(exc)
        except FAULTS:
            log.exception("engine %s: its note failed", self.name)
            note = None
        notes = [text for text in (self._loop_held, note) if isinstance(text, str) and text]
        return " ".join(notes) if notes else None

    def _held_loop(self, method: str, seconds: float) -> None:
        at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        self._loop_held = (f"Its {method}() held the service's event loop for {seconds:.1f} s (the last time at {at}): "
                           "every request waited; a plugin must do its blocking work in asyncio.to_thread.")
        now = time.monotonic()
        if now - self._loop_hold_warned >= LOOP_HOLD_WARN_EVERY:
            self._loop_hold_warned = now
            log.warning("engine %s held the service's event loop for %.1f s in %s(): every request waited; do "
                        "blocking work in asyncio.to_thread (said at most every %.0f minutes)", self.name, seconds,
                        method, LOOP_HOLD_WARN_EVERY / 60)

    def _limited(self, method: str, call: Callable[[], T]) -> T:
        """`call()` on a thread of its own, given `call_limit` seconds; `Overdue` past them. While
        a call of `method` (or read of the property) is past its limit and still running, the next
        ones are refused at once: a plugin that hangs holds one thread, and one request's wait, not
        every request's."""
        shown = method if method in PROPERTIES else f"{method}()"
        with self._overdue_lock:
            hung = self._overdue.get(method)
        if hung is not None:
            raise Overdue(f"its {shown} has not answered for {time.monotonic() - hung[1]:.0f} s")
        token, started = object(), time.monotonic()
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()
        context = contextvars.copy_context()

        def target() -> None:
            try:
                outcome.append((True, context.run(call)))
            except BaseException as exc:  # raised again on the caller's thread, as a direct call raised it
                outcome.append((False, exc))
            finally:
                done.set()
                with self._overdue_lock:
                    if self._overdue.get(method, (None,))[0] is token:
                        del self._overdue[method]
                        log.info("engine %s: its %s answered after %.1f s", self.name, shown,
                                 time.monotonic() - started)

        threading.Thread(target=target, name=f"{self.name}.{method}", daemon=True).start()
        if not done.wait(self.call_limit):
            with self._overdue_lock:
                late = not done.is_set()
                if late:
                    self._overdue[method] = (token, started)
            if late:
                # One that is always slow is late on every call: said once every LOOP_HOLD_WARN_EVERY.
                now = time.monotonic()
                warn = now - self._overdue_warned.get(method, -LOOP_HOLD_WARN_EVERY) >= LOOP_HOLD_WARN_EVERY
                if warn:
                    self._overdue_warned[method] = now
                log.log(logging.WARNING if warn else logging.DEBUG,
                        "engine %s: its %s did not answer within %g s; it is asked again once it has "
                        "(said at most every %.0f minutes)", self.name, shown, self.call_limit,
                        LOOP_HOLD_WARN_EVERY / 60)
                raise Overdue(f"its {shown} did not answer within {self.call_limit:g} s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return cast(T, value)

    def availability(self) -> tuple[bool, str | None]:
        try:
            answer = self._limited("availability", self._engine.availability)
        except Overdue as exc:
            return False, str(exc)
        except FAULTS as exc:
            log.exception("engine %s: availability() failed", self.name)
            return False, f"its availability check failed: {type(exc).__name__}: {exc}"[:500]
        if (not isinstance(answer, tuple) or len(answer) != 2 or not isinstance(answer[0], bool)
                or not isinstance(answer[1], str | None)):
            return False, f"its availability check answered {answer!r}, not (bool, reason)"[:500]
        return answer

    def prices(self) -> dict[str, Any]:
        try:
            prices = self._limited("prices", self._engine.prices)
        except Overdue:
            return {}  # said in the log; every GET /v1/engines waited, and held a request thread, as long
        except FAULTS:
            log.exception("engine %s: prices() failed", self.name)
            return {}
        if not isinstance(prices, dict):
            log.error("engine %s: prices() answered %s, not a dict", self.name, type(prices).__name__)
            return {}
        return prices

    def largest_size(self, req: RenderRequest) -> tuple[int, int]:
        """The plugin's own `largest_size` (see `tiers.base.Engine`), where it has one that answers two
        positive sides of at most `MAX_OUTPUT_PIXELS` in time; else the size asked, as for an engine
        without one. A submit asks it under its project's write lock: one that raised failed every
        submit routed to the plugin, one that hung held every writer, and too large a size made the
        job's bound (`orchestrator.quota.job_bound`) too large for its column."""
        asked = (req.width, req.height)
        largest = getattr(self._engine, "largest_size", None)
        if not callable(largest):
            return asked
        try:
            size = self._limited("largest_size", lambda: largest(req))
        except Overdue:
            return asked  # said in the log
        except FAULTS:
            log.exception("engine %s: largest_size() failed", self.name)
            return asked
        if (not isinstance(size, tuple | list) or len(size) != 2
                or not all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in size)
                or size[0] * size[1] > MAX_OUTPUT_PIXELS):
            log.error("engine %s: largest_size() answered %.100r, not (width, height) of at most %d pixels",
                      self.name, size, MAX_OUTPUT_PIXELS)
            return asked
        return size[0], size[1]

    def estimate(self, req: RenderRequest) -> int:
        try:
            return self._limited("estimate", lambda: self._engine.estimate(req))
        except Overdue as exc:
            raise NoPrice(f"engine '{self.name}': {exc}", details={"engine": self.name}) from None
        except OrchestratorError:
            raise
        except FAULTS as exc:
            log.exception("engine %s: estimate() failed", self.name)
            raise NoPrice(f"engine '{self.name}': its estimate failed: {type(exc).__name__}: {exc}"[:500],
                          details={"engine": self.name}) from None

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        return await self._contained("run", lambda: self._engine.run(req, progress, cancel), cancel)

    async def _contained(self, method: str, call: Callable[[], Awaitable[T]], cancel: CancelToken | None) -> T:
        """`call()`'s result, its task stopped `cancel_grace` seconds after a cancel it ignores,
        and whenever this task is (a timeout around it, a stop)."""
        work = asyncio.ensure_future(self._guarded(method, call))
        try:
            if cancel is None:
                return await work
            try:
                return await cancel.race(asyncio.shield(work))
            except Canceled:
                if not work.done():
                    # It was told through the same token: time to take its work off the provider.
                    await asyncio.wait({work}, timeout=self.cancel_grace)
                if work.done():
                    return work.result()  # its own Canceled, saying what it cost, or its result
                log.warning("engine %s ignored a cancel for %.0f s: its task was stopped", self.name,
                            self.cancel_grace)
                raise Canceled(f"engine '{self.name}' did not stop within {self.cancel_grace:.0f} s of the "
                               "cancel; it was stopped", charged="unknown" if self.kind == "remote" else "no") from None
        finally:
            if not work.done():
                work.cancel()

    async def _guarded(self, method: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await _Timed(call(), self.loop_hold_limit, lambda seconds: self._held_loop(method, seconds))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # stopped by `_contained`
            raise PluginFault("it raised CancelledError while nobody canceled it") from None
        except SystemExit as exc:
            raise PluginFault(f"it raised SystemExit({exc.code!r})") from None
        except Exception:
            raise
        except BaseException as exc:  # KeyboardInterrupt and the like, raised in a task, end the event loop
            raise PluginFault(f"it raised {type(exc).__name__}") from None

    async def aclose(self) -> None:
        await self._engine.aclose()


class _Reattaching(ThirdParty):
    """What a `Reattachable` plugin adds, held as its run is. Real methods, not `__getattr__`'s:
    from Python 3.12, `isinstance` against a protocol looks at the class only."""

    def can_reattach(self, handles: list[dict[str, Any]], req: RenderRequest) -> bool:
        try:
            return bool(self._limited("can_reattach", lambda: self._engine.can_reattach(handles, req)))  # type: ignore[attr-defined]
        except Overdue as exc:
            log.warning("engine %s: whether it can follow its saved work is taken as no: %s", self.name, exc)
            return False
        except FAULTS:
            log.exception("engine %s: can_reattach() failed", self.name)
            return False

    async def reattach(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                       cancel: CancelToken) -> RenderResult:
        return await self._contained(
            "reattach", lambda: self._engine.reattach(req, handles, progress, cancel), cancel)  # type: ignore[attr-defined]


class _Restarting(ThirdParty):
    async def forget(self, handles: list[dict[str, Any]]) -> None:
        """Best effort, as a built-in's: one that hangs is stopped after `cancel_grace` seconds,
        or it would hold its job (and a user's cancel of it) for as long as it likes."""
        try:
            async with asyncio.timeout(self.cancel_grace):
                await self._contained("forget", lambda: self._engine.forget(handles), None)  # type: ignore[attr-defined]
        except TimeoutError:
            log.warning("engine %s: forget() did not end within %g s; it was stopped", self.name, self.cancel_grace)


class _Withdrawing(ThirdParty):
    async def withdraw(self, handles: list[dict[str, Any]]) -> bool:
        """Best effort and bounded, as `forget`: its SystemExit would end the event loop. Only a
        plain True says nothing ran: what a plugin answers otherwise (or raises) may have billed."""
        try:
            async with asyncio.timeout(self.cancel_grace):
                answer = await self._contained("withdraw", lambda: self._engine.withdraw(handles), None)  # type: ignore[attr-defined]
        except TimeoutError:
            log.warning("engine %s: withdraw() did not end within %g s; it was stopped", self.name,
                        self.cancel_grace)
            return False
        return answer is True


class _Resuming(_Restarting):
    async def resume(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                     cancel: CancelToken) -> RenderResult:
        return await self._contained(
            "resume", lambda: self._engine.resume(req, handles, progress, cancel), cancel)  # type: ignore[attr-defined]


def _contain(engine: Engine) -> ThirdParty:
    """`engine` held in a `ThirdParty` that has the optional protocols it has, and no others."""
    bases = [cls for cls, protocol in ((_Reattaching, Reattachable), (_Resuming, Resumable),
                                       (_Restarting, Restartable), (_Withdrawing, Withdrawable))
             if conforms(engine, protocol)]
    if _Resuming in bases and _Restarting in bases:
        bases.remove(_Restarting)
    cls: type[ThirdParty] = type("ThirdParty", tuple(bases), {}) if bases else ThirdParty
    return cls(engine)


def checked(engine: Engine, target: str) -> Engine:
    """A third-party engine whose declared kind, stages and capabilities are ones the service
    knows, contained (`ThirdParty`): else one bad field fails `/v1/engines` for every caller."""
    if engine.kind not in get_args(Kind):
        raise ValueError(f"{target}: kind {engine.kind!r} is not one of {', '.join(get_args(Kind))}")
    stages = getattr(engine, "stages", None)
    if not isinstance(stages, frozenset | set) or not stages or not stages <= set(get_args(Stage)):
        raise ValueError(f"{target}: stages {stages!r} must be a non-empty set of {', '.join(get_args(Stage))}")
    capabilities = engine.capabilities
    if not isinstance(capabilities, Capabilities):
        raise TypeError(f"{target}: capabilities must be a tiers.base.Capabilities")
    for field in dataclasses.fields(capabilities):
        value = getattr(capabilities, field.name)
        # Routing compares the sizes with each request: a None there was a 500 for every request
        # whose rule names the engine, though the rule's next engine could serve it. The flags
        # are held to what they say (`leaves_machine` decides privacy), as the README tells.
        if field.type in (bool, "bool") and not isinstance(value, bool):
            raise TypeError(f"{target}: capabilities.{field.name} is {value!r}, not a bool")
        if field.type in (int, "int") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{target}: capabilities.{field.name} is {value!r}, not a positive int")
    if not isinstance(setting := capabilities.max_size_setting, str | None):
        raise TypeError(f"{target}: capabilities.max_size_setting is {setting!r}, not a setting's name or None")
    if capabilities.min_side > min(capabilities.max_width, capabilities.max_height):
        raise ValueError(f"{target}: capabilities.min_side {capabilities.min_side} is past its max_width/max_height")
    return _contain(engine)
