"""The seam between the orchestrator and every engine.

An engine is anything with a name, a kind, the stages it serves, an `estimate()` in millicredits
and an async `run()` that reports progress, honours a cancel token and returns images. The
orchestrator reaches engines through the registry (`tiers.registry`); the few places that import
one by name (the Lite engine's warm-up, the tiny model's build, the paid engines' prices files)
are in `orchestrator.services`.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import threading
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from orchestrator.errors import Canceled, Charged, NoPrice

if TYPE_CHECKING:
    from PIL.Image import Image

    from orchestrator.settings import Settings

Stage = Literal["ideation", "bridge", "polish"]
Kind = Literal["local", "remote"]
STAGES: tuple[Stage, ...] = ("ideation", "bridge", "polish")
T = TypeVar("T")

MILLI = 1000
# The longest engine name and model the database stores (PostgreSQL enforces its VARCHARs;
# SQLite does not, so a longer one worked there and failed the job's writes on PostgreSQL).
MAX_ENGINE_CHARS, MAX_MODEL_CHARS = 100, 300
# What a job and its images record for a model their engine could not name (a plugin's `model`
# that raised or hung): such a result is never copied for a later request (`orchestrator.cache`).
UNKNOWN_MODEL = "unknown"
# The longest upscaler name an AUTOMATIC1111 image's record keeps (`ORCH_A1111_UPSCALER`; the webui's
# are under 40 characters).
MAX_UPSCALER_CHARS = 100
# The largest side of a step preview (`Progress.step`): it is shown small, and a full-size one cost
# a 2048 px PNG encode (half a second) at each throttled write. A local engine's TAESD decodes at
# most this; any engine's larger preview (a plugin's, a ComfyUI server's) is shrunk to it, its
# aspect kept, before it is encoded, served or written (`orchestrator.store.encode_preview`).
PREVIEW_MAX_SIDE = 512


def in_kept_quotes(text: str) -> bool:
    """Whether a setting's text is wrapped in matching quotes an env file read without a shell
    kept as part of it (`docker run --env-file`)."""
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'"


def home_expanded(path: str) -> Path:
    """`path` with a leading `~` or `~user` expanded, or as given when that home is unknown (no
    such user, no HOME): pathlib raises there, which failed a model's loading with "Could not
    determine home directory" where the model is only a path to nothing (the settings expand
    what they can, and leave the rest as given)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def to_millicredits(credits: float) -> int:
    return round(credits * MILLI)


# How an allocator says it ran out: CUDA and MPS ("out of memory"), the CPU ("DefaultCPUAllocator:
# can't allocate memory"), Windows ("not enough memory"); torch's error type by name.
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory", "outofmemoryerror")


def says_out_of_memory(text: str) -> bool:
    """Whether an error's text (ours, or a self-hosted server's) says a device ran out of memory:
    the request's size, not the engine's health, so no circuit breaker counts it."""
    lowered = text.lower()
    return any(words in lowered for words in OUT_OF_MEMORY)


def whole_thousandths(credits: float) -> bool:
    """Whether `credits` is a whole number of thousandths, as the ledger counts them, within what
    floating point makes of a decimal (1.001 * 1000 is 1000.9999999999999)."""
    scaled = credits * MILLI
    return abs(scaled - round(scaled)) <= 4 * math.ulp(scaled)


def to_credits(millicredits: int) -> float:
    return round(millicredits / MILLI, 3)


# The most one amount may be, in millicredits: a billion credits (`orchestrator.schemas.MAX_CREDITS`).
# Not the 64-bit column's limit: sums of amounts must fit it too, and be exact JSON numbers; two
# costs of 2**62 reported by a plugin made every spend total overflow on SQLite (a 500 on spend,
# budget, metrics and every new paid job of the project) and turn inexact on PostgreSQL.
MAX_AMOUNT = 10**12


def is_amount(value: object) -> bool:
    """Whether `value` is an amount the ledger can hold: a whole, non-negative number of
    millicredits (a numpy integer too) of at most `MAX_AMOUNT`, not a bool, a fraction or an
    infinity."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= int(value) <= MAX_AMOUNT


# The seeds a job may ask for, and so the ones an image's record keeps: 32 bits, as most engines take.
MAX_SEED = 2**32 - 1


def provider_seed(value: object) -> int | None:
    """The seed a provider reports it used, or None: only a whole number a job could ask for again
    (0..MAX_SEED) is kept. A larger one (or a float such as 1e30, made one by `int()`) failed the
    asset's write, its 64-bit column refusing it, after the images were made (and paid for)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED else None


@dataclass(frozen=True)
class Capabilities:
    img2img: bool = False
    upscale: bool = False
    seeds: bool = False
    negative_prompt: bool = False
    # True when the request's prompt and pixels leave this machine.
    leaves_machine: bool = False
    max_width: int = 2048
    max_height: int = 2048
    # The least side it makes (the API's own least by default).
    min_side: int = 8
    size_multiple: int = 8
    # The setting that sets max_width/max_height (a local engine's ORCH_LOCAL_MAX_SIZE), named when
    # a size beyond them is refused; None: the engine's own limit, which no setting here changes.
    max_size_setting: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RenderRequest:
    """What an engine is asked to make. The service resolves defaults before it gets here, except
    `steps`/`guidance_scale`, which stay `None` when the engine's own defaults should apply."""

    stage: Stage
    prompt: str
    negative_prompt: str = ""
    n: int = 1
    seed: int | None = None
    width: int = 512
    height: int = 512
    steps: int | None = None
    guidance_scale: float | None = None
    # bridge
    init_image: Image | None = None
    # The draft's (width, height): known when estimating, before `init_image` is read from disk.
    source_size: tuple[int, int] | None = None
    strength: float = 0.55
    quality: str = "high"
    # polish
    scale: float | None = None
    creativity: float = 0.3
    tags: Mapping[str, str] = field(default_factory=dict)


def instruction_prompt(req: RenderRequest) -> str:
    """The prompt for engines that follow instructions (Gemini and the models behind Replicate
    and fal): say what to do with the image, then what the artist asked for."""
    if req.stage == "polish":
        return f"Refine and upscale this image, keep the composition and content exactly: {req.prompt}"
    if req.init_image is not None:
        return f"Render this draft in high fidelity, keep its composition: {req.prompt}"
    return req.prompt


DEVICE_SECONDS = "device_seconds"
# `metadata[NOTES]`: sentences about how the request was taken that the client should read (a
# prompt cut to the text encoder's window); each image's generation record carries them.
NOTES = "notes"
# `metadata[FINISH_REASONS]`: the provider's word for how each image's generation ended (Stability's
# `finish_reason`, Gemini's `finishReason`), one per image in the images' order, None where it said
# none; each image's record carries its own (`finish_reason`), so a studio can tell a filtered one.
FINISH_REASONS = "finish_reasons"


@dataclass
class RenderedImage:
    image: Image
    seed: int | None = None


# The generation parameters each image's record names (`JobRunner._record`). `metadata[key]`, where
# an engine sets it, is the value it sent or used (a clamped one as clamped), and None says it did
# not use it: the record leaves the key out ("" for `negative_prompt`). Unset, the job's is recorded
# (`upscaler`, what enlarged the source before it was denoised, is no job's: only an engine names it,
# as `sampler_settings`, what of its scheduler's config makes another sampler than `sampler` names).
RECORDED_PARAMETERS = ("negative_prompt", "steps", "guidance_scale", "sampler", "sampler_settings", "strength",
                       "quality", "scale", "creativity", "upscaler")
# What an engine sent a prompt and an image alone (Gemini, Replicate, fal) used of the rest: nothing
# (`scale` stays: it says how the size asked for was worked out; no job asks for an upscaler or
# sampler settings).
PROMPT_AND_IMAGE_ONLY: dict[str, None] = dict.fromkeys(key for key in RECORDED_PARAMETERS
                                                       if key not in ("scale", "upscaler", "sampler_settings"))


@dataclass
class RenderResult:
    """`metadata[DEVICE_SECONDS]`, from a local engine: the seconds its work held the device, which
    metered local use (`ORCH_LOCAL_GPU_SECOND_CREDITS`) charges; loading the model is not in it.
    `metadata[key]` for a key of `RECORDED_PARAMETERS`: what the image's record says of it."""

    images: list[RenderedImage]
    model: str
    # What the provider says it charged, when it says so; `None` means "use the estimate".
    cost_millicredits: int | None = None
    provider_request_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Why the estimate stands for a cost the provider did report, in a form that could not be read
    # (a usage block's malformed counts): the estimate is then captured flagged `unreconciled`.
    # Last: a plugin's positional arguments keep their places.
    cost_unread: str | None = None


class Progress(Protocol):
    """Where an engine reports what it is doing. Implementations must be thread-safe: local
    engines call `step` from their inference thread."""

    def step(self, step: int, total: int, preview: Image | None = None) -> None: ...

    def state(self, state: str, **details: Any) -> None: ...

    def on_device(self) -> None:
        """Called by a local engine that sets `tells_device_start = True` as its work starts on the
        device, its model loaded (where its `DEVICE_SECONDS` count starts): an attempt that ends
        without a result (failed, canceled) counts toward its project's device-time quota from here
        to the engine's return, leaving the load out as a success's count does; one that never
        called it (canceled or failed while its model loaded) counts nothing."""
        ...

    def provider_request(self, request_id: str, handle: Mapping[str, Any] | None = None) -> None:
        """Called as soon as a provider has accepted work, so a crash can find it again. `handle`
        is what `Reattachable.reattach` needs besides the id (the provider's own URLs, say); the
        id and the handle are saved with the job, in the order they came."""
        ...

    async def withdrawn(self, handles: list[dict[str, Any]]) -> None:
        """Awaited once a request of the job's is known to have billed nothing: one its cancel left
        out (a create, see `tiers._cloud.CloudEngine.send_withdrawable`) refused (`handles`
        empty), or work withdrawn, after its answer or while it was followed, that the provider
        said never ran (by `Withdrawable.withdraw`'s rules). The charge the job ended with for it is settled at 0, as
        for an ended job's saved work (`Ledger.void_withdrawn`)."""
        ...


class NullProgress:
    def step(self, step: int, total: int, preview: Image | None = None) -> None:
        pass

    def state(self, state: str, **details: Any) -> None:
        pass

    def on_device(self) -> None:
        pass

    def provider_request(self, request_id: str, handle: Mapping[str, Any] | None = None) -> None:
        pass

    async def withdrawn(self, handles: list[dict[str, Any]]) -> None:
        pass


class CancelToken:
    """Set from the event loop (the API's cancel); read from any thread (the inference thread
    checks it between denoising steps) and awaitable (remote engines race it against polling)."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()
        self.abandoned = False
        # The event loop's time by which an answer a user's cancel lets end (made and billed: see
        # `keep`) must have ended; None: none is being let end.
        self.kept_until: float | None = None

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set()

    def cancel(self, *, abandon: bool = False) -> None:
        """Stop the job. `abandon`: this process lets go of it (a shutdown, or another process
        took it over) and someone will follow its provider work again, so an engine must leave
        that work running rather than cancel it at the provider as it does for a user's cancel."""
        with self._lock:
            self.abandoned = self.abandoned or abandon
            self._flag.set()
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def keep(self, seconds: float) -> float:
        """An engine lets an answer a user's cancel met (made and billed) end within `seconds`,
        to keep its images: a stop meanwhile waits for it that long (`Scheduler.stop`), rather than
        leave the job to a recovery that loses them, charged unknown. Returns that loop time. On the
        event loop."""
        until = asyncio.get_running_loop().time() + max(seconds, 0.0)
        self.kept_until = until if self.kept_until is None else max(self.kept_until, until)
        return until

    def raise_if_cancelled(self, *, charged: Charged | None = None) -> None:
        """Raise `Canceled` if the token is cancelled; `charged` says what the attempt cost, where
        the caller knows (left out, the runner judges by what it saw sent)."""
        if self._flag.is_set():
            raise Canceled("the job was canceled", charged=charged)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake and raise `Canceled` as soon as the token is cancelled."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            if self._flag.is_set():
                raise Canceled("the job was canceled")
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            return
        finally:
            with self._lock:
                self._waiters.remove(entry)
        raise Canceled("the job was canceled")

    async def race(self, awaitable: Awaitable[T], *, charged: Charged = "unknown") -> T:
        """Await `awaitable` unless the token is cancelled first; then abandon it and raise
        `Canceled`, saying whether the provider may already have billed (`charged`)."""
        task = asyncio.ensure_future(awaitable)
        waiter = asyncio.ensure_future(self._wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled (a timeout around it, a stop): so is the work
            task.cancel()
            raise
        finally:
            waiter.cancel()
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: the Canceled it holds is re-raised below
        if task.done():
            return task.result()
        task.cancel()
        # "No" when nothing that can bill was out (a retry's wait, a connect that never got through).
        raise Canceled("the job was canceled" if charged == "no" else
                       "the job was canceled while the provider was working", charged=charged)

    async def _wait(self) -> None:
        """Until the token is cancelled; ends without an exception, as `race` may have cancelled
        it already: on Python 3.11 a cancel that meets `sleep`'s `wait_for` as the event is set is
        swallowed, and the Canceled the task then held was never retrieved (an ERROR in the log
        for a cancel that met a job's end)."""
        with suppress(Canceled):
            while True:
                await self.sleep(3600)


# Jobs of one remote engine a process runs at once unless the engine says (`Engine.concurrency`).
REMOTE_CONCURRENCY = 4


@runtime_checkable
class Engine(Protocol):
    """An engine may also set `announces_sends = True`: it awaits `billable_send()` before every
    request that can bill (`RemoteClient` does so for each request not marked idempotent). Then a
    job whose process died before its first such request is sent again after the crash rather than
    failed and charged as possibly billed. A local engine may set `tells_device_start = True`: it
    calls `Progress.on_device()` as its work starts, its model loaded, and an attempt of it that
    ends without a result counts its project's device time from there (never called: nothing).
    A subclass of `tiers._local.LocalEngine` inherits it only while it overrides none of the
    methods that tell it (`device_start_told_by`; `run` where none are named, and then only if
    `run`'s own code calls `on_device`); one that does, and does not say it again, counts such an
    attempt from its engine's start.

    A remote engine's `Canceled` says what it cost (`charged=`); one that does not (the token's
    own, from `cancel.sleep` or `raise_if_cancelled`) is taken as free only while nothing of the
    attempt can have been sent, and as `unknown` otherwise. A `charged="no"` is taken as said: an
    engine of several billable requests per job says it only while none of them is out (once one
    is, a cancel costs at least `unknown`, as `tiers._cloud.paid_calls` does for the built-ins);
    `billable_send()` raises a cancel of a later request so already once the provider accepted an
    earlier one (`Progress.provider_request`). An engine whose earlier requests made images before
    a later one failed or was canceled sets them on the error (`EngineError.made`, a `RenderResult`):
    they were paid for, and the job keeps them as its assets.

    A remote engine may set `concurrency`, how many of its jobs one process runs at once
    (`REMOTE_CONCURRENCY` when it does not; a local engine's device runs one).

    An engine whose provider picks the size of the images it returns may have `largest_size(req)`,
    the largest (width, height) it returns for the request: storage quotas hold that back for the
    job (`orchestrator.quota`), and the size asked where it has none."""

    name: str
    kind: Kind
    stages: frozenset[Stage]
    capabilities: Capabilities

    @property
    def model(self) -> str: ...

    def availability(self) -> tuple[bool, str | None]:
        """`(True, None)` when usable; otherwise `(False, "why, and which setting fixes it")`."""
        ...

    def prices(self) -> dict[str, Any]:
        """The price table in use, in credits, for `/v1/engines`."""
        ...

    def estimate(self, req: RenderRequest) -> int:
        """Millicredits this request will cost; raises `NoPrice` when it cannot say."""
        ...

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        """Make the images. It runs on the service's event loop, so it must never block it: no
        `time.sleep`, no synchronous HTTP client (`requests`), no heavy work between two awaits;
        do blocking work in `asyncio.to_thread` (or await an async client). Meanwhile every request
        and every other job of the service waits; a plugin's step that holds the loop longer than
        `tiers.guard.LOOP_HOLD_LIMIT` is named in the log and in its `/v1/engines` note."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class _SendHooks:
    before: Callable[[], Awaitable[None]]
    refused: Callable[[], None] | None
    out: Callable[[], bool] | None
    held: Callable[[], Awaitable[bool]] | None = None


# What the runner does about the requests of the job it runs that can bill (see `billable_send`).
# A context variable: every task an engine starts for that job (a gather of per-image calls) sees
# that job's hooks, and no other job's.
_send_hooks: ContextVar[_SendHooks | None] = ContextVar("send_hooks", default=None)


async def billable_send() -> None:
    """Await just before a request that can bill leaves the machine. The orchestrator records,
    before it goes, that this attempt of the job has sent something, so that after a crash a job
    that had sent nothing is run again instead of being charged as possibly billed. Raises when
    the request must not go: `Canceled` (a cancel was asked; nothing was sent) or another
    exception when another process has taken the job over. Outside a job it does nothing."""
    hooks = _send_hooks.get()
    if hooks is not None:
        await hooks.before()


def billable_send_refused() -> None:
    """Call when a request `billable_send()` announced is known to have made nothing (a 429 or a
    5xx to be retried, a connection never made): a cancel of the job is free again, as long as no
    other request of it is out (`RemoteClient` does so). Outside a job it does nothing."""
    hooks = _send_hooks.get()
    if hooks is not None and hooks.refused is not None:
        hooks.refused()


def billable_sends_out() -> bool:
    """Whether a request of this job announced by `billable_send()` may have been made and billed
    (not answered that nothing was made): a cancel then costs at least `unknown`, whatever the
    request at hand. Outside a job, False."""
    hooks = _send_hooks.get()
    return hooks is not None and hooks.out is not None and hooks.out()


async def still_holds_the_job() -> bool:
    """Whether the work a provider accepted for the job is still this engine call's to end:
    False when another process has taken the job over and follows that work on. Await it before
    withdrawing such work on a failure: a process stopped past its lease (SIGSTOP, a paused VM)
    resumes with its deadline gone, and its withdrawal canceled the work under the new attempt.
    Outside a job, True."""
    hooks = _send_hooks.get()
    return hooks is None or hooks.held is None or await hooks.held()


@contextmanager
def before_billable_sends(hook: Callable[[], Awaitable[None]], refused: Callable[[], None] | None = None,
                          out: Callable[[], bool] | None = None,
                          held: Callable[[], Awaitable[bool]] | None = None) -> Iterator[None]:
    """Run `hook` at each `billable_send()` of the engine call made inside this block, `refused`
    at each `billable_send_refused()`, and answer `billable_sends_out()` with `out` and
    `still_holds_the_job()` with `held`."""
    token = _send_hooks.set(_SendHooks(hook, refused, out, held))
    try:
        yield
    finally:
        _send_hooks.reset(token)


@runtime_checkable
class Reattachable(Protocol):
    """An engine whose provider keeps work by id (a queue or a prediction), so a job whose process
    died after the provider accepted it can be finished by a later process instead of being
    written off as 'billed, result unknown'."""

    def can_reattach(self, handles: list[dict[str, Any]], req: RenderRequest) -> bool:
        """Whether `handles` cover all of `req`, so that `reattach` can finish it."""
        ...

    async def reattach(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                       cancel: CancelToken) -> RenderResult:
        """Finish `req` from the work `handles` name (each `{"id": ..., **handle}` as given to
        `Progress.provider_request`, oldest first) without sending any new paid request. Raises
        an `EngineError` when they do not cover the whole request: whether the rest was sent is
        unknown, so it must not be sent again. `req.init_image` may be None for a bridge or
        polish whose source image can no longer be read: following work sends no image."""
        ...


@runtime_checkable
class Restartable(Protocol):
    """A free engine (a self-hosted server) whose job is simply run again after a crash, and
    whose server may still hold what the dead attempt gave it: a queued prompt, a running task.
    `forget` takes that off the server first (best effort, never raising), so it does not render
    the job twice. `handles` are those the dead attempt gave `Progress.provider_request`."""

    async def forget(self, handles: list[dict[str, Any]]) -> None:
        ...


@runtime_checkable
class Withdrawable(Protocol):
    """An engine whose provider can be told to stop work it accepted by id (a Replicate
    prediction, a fal queue request): a job that ends while no process follows its work (canceled
    after its worker died or while queued to be reattached; one that failed with it out) has it
    withdrawn, best effort, rather than left to run and bill for nobody. What it raises is logged.

    It returns True only when the provider said that none of the work ran (fal took every
    request off its queue; Replicate canceled every prediction before it started): the job's
    charge for reconciliation is then settled at 0 (`Ledger.void_withdrawn`). False when any of
    it may have run and billed, or the provider's answer cannot tell."""

    async def withdraw(self, handles: list[dict[str, Any]]) -> bool:
        ...


def billed_by_provider(engine: object) -> bool:
    """Whether a provider bills `engine`'s jobs whatever the prices file says: a cloud engine,
    that is a remote one other than a self-hosted `Restartable` server. A job priced 0 on one
    still gets a hold of 0 (orchestrator.ledger), so that an outcome nobody knows is captured,
    flagged, for the invoice to settle."""
    return getattr(engine, "kind", None) == "remote" and not isinstance(engine, Restartable)


@runtime_checkable
class Resumable(Restartable, Protocol):
    """A restartable engine that can do better than start over after a crash: its server keeps
    finished work by id (ComfyUI's history), so `resume` collects what the dead attempt's `handles`
    made, waits for what they are still making, and renders only the rest. Used instead of
    `forget` + `run` when the job runs again; `forget` still serves a job that is not run again."""

    async def resume(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                     cancel: CancelToken) -> RenderResult:
        ...


@dataclass
class EngineContext:
    """What a factory gets to build its engine: settings, price overrides from the prices file,
    and shared local resources (the per-device inference runtime)."""

    settings: Settings
    price_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)


EngineFactory = Callable[[EngineContext], Engine]


TOKEN_RATE_SUFFIX = "_tokens_per_million"


class PriceTable:
    """Credits per output image, by model then by variant (size, quality...). Dated defaults come
    from each engine file; the prices file overrides them per engine."""

    def __init__(self, engine: str, defaults: Mapping[str, Mapping[str, float]], as_of: str,
                 overrides: Mapping[str, Any] | None = None, *, optional: Collection[str] | None = None) -> None:
        """`optional`: the price keys the engine reads beyond its defaults' (Gemini's thinking
        tokens), for an engine that reads no others (a built-in one); None: a plugin's, whose keys
        are its own."""
        self.engine = engine
        self.as_of = as_of
        table: dict[str, dict[str, float]] = {m: dict(v) for m, v in defaults.items()}
        # A key none of the engine's models has (`"1k"` for `"1K"`) is read by nobody: warned of
        # at start (`orchestrator.prices.unread_prices`), and left out, or `/v1/engines` listed it
        # beside the real prices as if it were one.
        reads = None if optional is None else set().union(*defaults.values(), optional)
        for model, variants in (overrides or {}).items():
            if isinstance(variants, Mapping):
                table.setdefault(model, {}).update({k: float(v) for k, v in variants.items()
                                                    if reads is None or k in reads})
        self.table = table

    def millicredits(self, model: str, variant: str) -> int:
        try:
            return to_millicredits(self.table[model][variant])
        except KeyError:
            raise NoPrice(
                f"engine '{self.engine}' has no price for model '{model}' ({variant}); add it to the prices file",
                details={"engine": self.engine, "model": model, "variant": variant},
            ) from None

    def as_dict(self) -> dict[str, Any]:
        """For `/v1/engines`: per-image prices apart from the per-million-token rates (Gemini's,
        OpenAI's) that reconcile them, which are not prices of an image."""
        per_image = {m: {k: v for k, v in variants.items() if not k.endswith(TOKEN_RATE_SUFFIX)}
                     for m, variants in self.table.items()}
        tokens = {m: {k.removesuffix(TOKEN_RATE_SUFFIX): v for k, v in variants.items()
                      if k.endswith(TOKEN_RATE_SUFFIX)} for m, variants in self.table.items()}
        prices: dict[str, Any] = {"as_of": self.as_of, "credits_per_image": per_image}
        if any(tokens.values()):
            prices["credits_per_million_tokens"] = {m: rates for m, rates in tokens.items() if rates}
        return prices
