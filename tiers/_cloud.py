"""What the paid cloud engines share: an API key (without one the engine is unavailable and says
which setting to fill), a model from the settings, a dated price table, one `RemoteClient` whose
401/403 errors name the same setting, and fetching output images the provider hosts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sized
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import httpx

from orchestrator.errors import Canceled, ContentFiltered, EngineError, EngineUnavailable, NoImage, NoPrice
from tiers._http import KeptOut, RemoteClient, SendsCredentials, error_text
from tiers._images import b64decode_tolerant, decode_image
from tiers.base import (
    CancelToken,
    EngineContext,
    Kind,
    PriceTable,
    Progress,
    RenderedImage,
    RenderResult,
    Stage,
    in_kept_quotes,
    is_amount,
)

if TYPE_CHECKING:
    from pydantic import SecretStr

log = logging.getLogger(__name__)


def token_counts(*counts: Any) -> tuple[int, ...] | None:
    """A provider's token counts (its usage block) as whole numbers, or None when any is not one:
    whole, non-negative and at most `MAX_AMOUNT`, as an amount is. `1e400` reads as an infinity (`int()`
    raised OverflowError, failing a paid job), and a negative count made a negative cost."""
    if not all(is_amount(count) for count in counts):
        return None
    return tuple(int(count) for count in counts)


def unreadable_usage(usage: Any, counted: Callable[[dict[str, Any]], tuple[Any, ...]]) -> str | None:
    """Why a usage block the provider did give cannot be read as token counts (`counted` picks
    them out), or None: readable, or none given. Its cost is then the estimate, which the ledger
    flags for reconciliation: the provider said what it billed, in a form that says nothing."""
    if not isinstance(usage, dict) or not usage:
        return None
    counts = counted(usage)
    if token_counts(*counts) is not None:
        return None
    odd = ", ".join(repr(count)[:20] for count in counts if not is_amount(count))
    return f"the provider's usage holds token counts that are not counts ({odd}); the estimate is captured"


class TokenBill:
    """What a job's calls billed by their tokens (gemini, openai) cost as their answers said: the
    sum of the calls' costs, None once one call's is not known (the ledger then captures the
    estimate), why the first usage block that could not be read as counts was not, and the
    provider's ids of the calls. One tally for the engines that bill this way, so their results
    say a cost, an unread usage and their requests alike."""

    def __init__(self, counted: Callable[[dict[str, Any]], tuple[Any, ...]]) -> None:
        self.total: int | None = 0
        self.unread: str | None = None
        self.request_ids: list[str] = []
        self._counted = counted  # the engine's token counts of a usage block (`unreadable_usage`)

    def read(self, usage: Any, cost: int | None) -> None:
        """A call's `usage` as priced (`cost`; None: not priced): the first reason a block given
        cannot be read is kept."""
        if cost is None:  # only then: a priced block was read once already
            self.unread = self.unread or unreadable_usage(usage, self._counted)

    def add(self, cost: int | None) -> None:
        """A finished call's cost (None: not known, and so, from now on, neither is the total)."""
        self.total = None if cost is None or self.total is None else self.total + cost

    def result(self, images: list[RenderedImage], model: str, metadata: dict[str, Any]) -> RenderResult:
        return RenderResult(
            images=list(images),
            model=model,
            cost_millicredits=self.total,
            cost_unread=self.unread if self.total is None else None,
            provider_request_id=",".join(self.request_ids) or None,
            metadata=metadata,
        )


def prompt_tokens(prompt: str) -> int:
    """A prompt's tokens as a hold counts them: about four ASCII characters a token, but one a
    character for other scripts (CJK takes about that), plus the request's framing. An estimate,
    not a bound (an emoji may take more): what the provider reports is what is charged."""
    ascii_chars = sum(1 for c in prompt if c.isascii())
    return ascii_chars // 4 + (len(prompt) - ascii_chars) + 64


@contextmanager
def reading_an_answer() -> Iterator[None]:
    """Around reading a generation call the provider answered with 2xx: it may have billed the call,
    so a broken answer (no image, bad base64, odd JSON) keeps its hold captured for a person to
    reconcile, and routing never repeats it on another engine. A content filter's error keeps the
    charge its raiser decided (providers differ on billing filtered output), and so does one the
    answer itself says was not billed (`EngineError.unbilled`: Stability's finish reason ERROR)."""
    try:
        yield
    except ContentFiltered:
        raise
    except EngineError as exc:
        if not exc.work_unbilled:
            exc.at_least_charged("unknown")
        raise


class Asked:
    """How many of a job's `n` images a loop of paid calls has asked its provider for. A failure
    part-way can have been billed for those, never for the ones not yet asked: the hold is then
    captured for that share of the estimate, not the whole of it."""

    def __init__(self, n: int, estimate: Callable[[], int]) -> None:
        # The engine's `estimate`, asked only on a failure: a request routing would have refused
        # (a size the engine cannot make) may still be run directly.
        self.n, self.estimate, self.count = n, estimate, 0
        self.reported = 0  # what the provider reported charging for the calls that finished
        self.calls, self.finished, self.unreported = 0, 0, 0  # calls sent, finished, and finished saying no cost

    def asking(self, count: int = 1) -> None:
        """Called just before a call that asks for `count` images is sent."""
        self.count += count
        self.calls += 1

    def charged(self, cost: int | None) -> None:
        """A finished call's cost as the provider reported it (None: it did not say)."""
        self.reported += cost or 0
        self.finished += 1
        self.unreported += cost is None

    @property
    def known(self) -> int | None:
        """What every call that finished cost, when each said (None when none finished, or one
        did not say)."""
        return self.reported if self.finished and not self.unreported else None

    def share(self, images: int) -> int | None:
        """The estimate's share for `images` (rounded up: never below their price), or None
        (the whole hold) when the request has no estimate."""
        try:
            estimate = self.estimate()
        except (EngineError, NoPrice):
            # No price here now (a prices file or model another process routed with): a failure
            # after a paid send must not become this one, which says nothing was billed.
            return None
        return -(-estimate * min(images, self.n) // max(self.n, 1))


@contextmanager
def paid_calls(made: Sized, asked: Asked | None = None,
               kept: Callable[[], RenderResult] | None = None) -> Iterator[None]:
    """Around a loop of paid calls that fills `made`: once one call has made an image, any later
    failure (an error, a cancel) leaves that charge behind instead of releasing the whole hold.
    With `asked`, what that charge can be is bounded: the images made, and those of the failing
    call unless it surely billed nothing. With `kept`, the result of the images made so far: the
    error carries it (`EngineError.made`), and the job keeps them, as they were paid for."""
    try:
        yield
    except EngineError as exc:
        if kept is not None and len(made) and exc.made is None:
            exc.made = kept()
        # A token's own cancel says "no" knowing nothing of a call in flight (see
        # `JobRunner._doubt_a_free_cancel`): only an engine's refusal, or a cancel whose raiser
        # said what it cost (the provider answered that the call never ran), says it billed nothing.
        surely_free = exc.charged == "no" and (exc.charged_told or not isinstance(exc, Canceled))
        # ... or a cancel between two calls: none was out.
        surely_free = surely_free or (exc.charged == "no" and asked is not None and asked.calls == asked.finished)
        billed = len(made) if surely_free or asked is None else asked.count
        if surely_free and asked is not None and asked.known is not None and exc.cost_millicredits is None:
            # Billed nothing for the failing call, and every call before it said what it cost: the
            # bill is known, not a share of the estimate for a person to reconcile.
            exc.at_least_charged("yes")
            exc.cost_millicredits = asked.known
            raise
        if len(made):
            exc.at_least_charged("unknown")
        if asked is not None and exc.charged != "no" and exc.cost_millicredits is None:
            # Never below what the provider already said it charged (an estimate is not a bound:
            # a stale price table, a longer prompt than guessed).
            if billed < asked.n:
                share = asked.share(billed)
                exc.cost_millicredits = None if share is None else max(share, asked.reported)
            elif asked.reported and (whole := asked.share(asked.n)) is not None and asked.reported > whole:
                # Every image asked for: the whole hold, unless the calls that finished said more.
                exc.cost_millicredits = asked.reported
        raise



def follows_billed(asked: Asked, made: int, failures: list[EngineError], unsettled: int = 0) -> None:
    """Bound what a follow of accepted work (a reattach) that ends early is charged: the images
    made, the failed work the provider did not say was free, and `unsettled` pieces of work still
    out that may have billed. Every piece was counted as asked (`Asked.count`): a cancel then
    captured the whole estimate though the provider had said some of the work never ran or failed
    unbilled."""
    asked.count = made + sum(not failure.work_unbilled for failure in failures) + unsettled


def failed_follows(failures: list[EngineError], asked: Asked, made: int, noun: str) -> EngineError:
    """The error a follow of accepted work (a reattach after a crash) ends with when some of its
    images' work failed, each followed on its own (one gone at the provider left the others, made
    and billed, neither fetched nor charged as made). Raised through `paid_calls`, it is charged for
    the images made and the failed work the provider did not say was free; work it said never ran
    (`EngineError.unbilled`) is not counted."""
    billable = [failure for failure in failures if not failure.work_unbilled]
    error = (billable or failures)[0]
    follows_billed(asked, made, failures)
    if len(failures) > 1 or made:
        error.message = f"{len(failures)} of {asked.n} {noun} failed, {made} made; the first: {error.message}"[:500]
    error.details.setdefault("failed", len(failures))
    return error

# Seconds a user's cancel gives the downloads of output images out (made and billed) to finish,
# as Replicate's cancel answered "succeeded" gives its fetch (`tiers.replicate.STOP_SECONDS`).
OUTPUT_KEPT_SECONDS = 10.0


class CanceledFetched(Canceled):
    """A user's cancel met while output images were downloaded: the provider made and billed
    them, and the downloads out finished; `images` holds them, for the engine to keep with the
    images made before (`paid_calls`' `made`)."""

    def __init__(self, images: list[RenderedImage]) -> None:
        super().__init__("the job was canceled while its output, made and billed, was downloaded; it is kept",
                         charged="yes")
        self.images = images


def user_canceled(cancel: CancelToken) -> bool:
    """Whether `cancel` is a user's cancel: a stop's (a shutdown, a job taken over) abandons the
    job to the next start, which follows what a provider accepted, and keeps nothing here."""
    return cancel.cancelled and not cancel.abandoned


@contextmanager
def answered_at_cancel(cancel: CancelToken, kept: Callable[[], RenderResult]) -> Iterator[None]:
    """Around the handling of a synchronous call's answer (`CloudEngine.send_answered`), to its
    images added and its cost counted. Once a user's cancel came (while the call was out, and it
    answered within `output_kept_seconds`, or since), the job ends `canceled` here: keeping the
    images made (`kept`), charged "yes" at the cost the answers said, as a success is (unsaid:
    the estimate's share of the images asked, as for an output a cancel let download); or, where
    the answer is an error (a refusal, an answer without an image), with what that error says it
    cost: one the provider bills not releases the hold, as it would uncanceled. A stop's cancel
    changes nothing here."""
    try:
        yield
    except Canceled:
        raise
    except EngineError as exc:
        if not user_canceled(cancel):
            raise
        canceled = Canceled(f"the job was canceled while the provider was working, which then answered: "
                            f"{exc.message}"[:500], details=exc.details, charged=exc.charged,
                            cost_millicredits=exc.cost_millicredits)
        if exc.work_unbilled:
            canceled.unbilled()
        canceled.cost_unread, canceled.made = exc.cost_unread, exc.made
        raise canceled from exc
    if user_canceled(cancel):
        result = kept()
        answered = Canceled("the job was canceled while the provider was working; its answer, made and billed, "
                            "came and is kept", charged="yes", cost_millicredits=result.cost_millicredits)
        answered.made, answered.cost_unread = result, result.cost_unread
        raise answered


def _answer_at_cancel(sending: asyncio.Future[httpx.Response], cancel: CancelToken) -> httpx.Response:
    """The answer of `CloudEngine.send_answered`'s request, done once the job's `cancel` came. A
    `Canceled` it ended with was raised before the call went out (again): between attempts (a 503
    or 429 answered after a user's cancel, not sent again) or before its first send, so this call
    made nothing. The client says `unknown` all the same once an earlier request of the job was
    sent (`billable_sends_out`, which cannot tell one answered from one out); a synchronous
    engine's calls go one at a time, and what the earlier ones made and cost is its `paid_calls`'
    to charge. Left "unknown", a job of n=2 whose first call was made and said its cost captured
    the whole estimate for a person to reconcile. A stop's cancel keeps what the client said."""
    try:
        return sending.result()
    except Canceled as exc:
        if not cancel.abandoned:
            exc.charged, exc.charged_told = "no", True
        raise


# Status answers in a row that cannot be read (a proxy's error page with a 200, a body cut short)
# before the work they report on is given up, and so withdrawn: a poll costs nothing, the work may.
UNREADABLE_POLLS = 3

T = TypeVar("T")


def _usable_key(key: SecretStr | None) -> tuple[str | None, str | None]:
    """The key as a header can carry it, or why it cannot be used.

    Keys pasted from files often end in a newline or start with a byte-order mark; those are
    dropped. Anything else outside printable ASCII (a smart quote, a zero-width space) would make
    every request fail before it leaves, so the engine reports itself unavailable instead.
    """
    if key is None:
        return None, None
    value = key.get_secret_value().strip().strip("\ufeff").strip()
    if not value:
        return None, None
    if not all(" " < char < "\x7f" for char in value):
        return None, "holds a character an HTTP header cannot carry (a space, a non-ASCII or control character)"
    if in_kept_quotes(value):
        return None, "is wrapped in quotes, which were kept as part of it (an env file read without a shell)"
    return value, None


class CloudEngine(SendsCredentials):
    name: str  # each engine's own; not a ClassVar, which `tiers.base.Engine`'s `name` would not match
    kind: Kind = "remote"
    stages: frozenset[Stage] = frozenset({"bridge", "polish"})
    # The orchestrator's setting and the vendor's own variable that hold the key.
    key_settings: ClassVar[tuple[str, str]]
    key_noun: ClassVar[str] = "API key"
    # Every paid request goes through `self.http`, which announces it (`tiers.base.billable_send`).
    announces_sends: ClassVar[bool] = True
    http: RemoteClient
    poll_interval: float = 1.0  # seconds between looks at work a provider accepted
    # Seconds a user's cancel lets output downloads out finish (`fetch_outputs`); tests shorten it.
    output_kept_seconds: float = OUTPUT_KEPT_SECONDS
    # Price keys read beyond those of the default table's models (`PriceTable`'s `optional`); None
    # for a plugin's engine, whose prices file keys are its own.
    optional_prices: ClassVar[frozenset[str] | None] = None

    def __init__(self, ctx: EngineContext, model: str, key: SecretStr | None,
                 prices: Mapping[str, Mapping[str, float]], prices_as_of: str) -> None:
        self._model = model
        self._key, self._key_problem = _usable_key(key)
        self._prices = PriceTable(self.name, prices, prices_as_of, ctx.price_overrides.get(self.name),
                                  optional=self.optional_prices)
        # Requests a cancel left out, each followed until answered to withdraw what it made.
        self._withdrawing: set[asyncio.Task[Any]] = set()

    def remote_client(self, ctx: EngineContext, client: RemoteClient | None, *, base_url: str,
                      headers: dict[str, str] | None = None) -> RemoteClient:
        """`client` (tests pass one), else one for `base_url` with the `ORCH_REMOTE_*` timeouts."""
        ours, vendors = self.key_settings
        http = client or RemoteClient.for_settings(self.name, ctx.settings, base_url=base_url, headers=headers,
                                                   key_setting=f"{ours} (or {vendors})")
        if self._key:
            http.remember_secret(self._key)
        return http

    @property
    def model(self) -> str:
        return self._model

    def said(self, value: object, limit: int = 100) -> str:
        """A value of a provider's answer (a status, a reason, a failure's text) as an error quotes
        it: without our credentials (a proxy may echo a request's headers anywhere), then cut (cut
        first, a key across the cut kept its first part)."""
        return self.http.scrub(str(value))[:limit]

    def model_not_served(self, response: httpx.Response) -> EngineUnavailable:
        """The provider does not serve the configured model (retired, misspelt): nothing was made,
        and, unlike a refused input, another engine may well take the job."""
        setting = f"ORCH_{self.name.upper()}_MODEL"
        return EngineUnavailable(
            f"{self.name} does not serve the model '{self._model}' (HTTP {response.status_code}): "
            f"{error_text(response)}; set {setting} to a model it serves",
            details={"engine": self.name, "status": response.status_code, "model": self._model,
                     "setting": setting},
        )

    @property
    def configured(self) -> bool:
        """Whether the operator set it up (a key given): unavailable without one is off by choice."""
        return bool(self._key or self._key_problem)

    @property
    def reachable(self) -> bool:
        """Whether this process has a key a request can carry (see `tiers.registry.left_off`)."""
        return self._key is not None

    async def read_again_if_unreadable(self, fetch: Callable[[], Awaitable[httpx.Response]],
                                       read: Callable[[httpx.Response], T], deadline: float,
                                       cancel: CancelToken) -> T:
        """`read(await fetch())` for an idempotent look at accepted work (a status, a finished
        result), fetched again when `read` cannot read the answer, up to `UNREADABLE_POLLS`
        answers within `deadline`: one gateway page with a 200 gave up paid work about to succeed.
        What `fetch` raises (a refusal, an outage its retries did not outlast) is not asked again here."""
        for attempt in range(1, UNREADABLE_POLLS + 1):
            response = await fetch()
            try:
                # In a worker thread: a finished answer may hold its output inline (a data URI of
                # megabytes), which held the event loop while it was parsed.
                return await asyncio.to_thread(read, response)
            except EngineError:
                if attempt == UNREADABLE_POLLS or self.http.clock() >= deadline:
                    raise
            await cancel.sleep(min(self.poll_interval, max(deadline - self.http.clock(), 0)))
        raise AssertionError("unreachable")

    def availability(self) -> tuple[bool, str | None]:
        ours, vendors = self.key_settings
        if self._key_problem:
            return False, f"the {self.key_noun} in {ours} (or {vendors}) {self._key_problem}: set it again"
        if not self._key:
            return False, f"no {self.key_noun}: set {ours} or {vendors}"
        return True, None

    def prices(self) -> dict[str, Any]:
        return self._prices.as_dict()

    @property
    def note(self) -> str | None:
        """Said at start-up and in `/v1/engines`: a model the price table does not name (a typo in
        ORCH_<ENGINE>_MODEL, a new model) leaves the engine available but never routed, as an
        unknown price never means free, and nothing else told why every job went elsewhere. An
        engine not set up (no key) says nothing of its model."""
        if not self.configured or self._model in self._prices.table:
            return None
        return (f"no price for model '{self._model}' (ORCH_{self.name.upper()}_MODEL): routing skips the requests "
                "it would render until ORCH_PRICES_FILE names its prices, or the model is one priced here")

    async def fetch_outputs(self, urls: list[str], cancel: CancelToken, *, wanted: int, empty: str,
                            details: dict[str, Any], deadline: float | None = None,
                            at_cancel: Callable[[], None] | None = None,
                            kept_until: float | None = None) -> list[RenderedImage]:
        """The first `wanted` output images at `urls` (the provider's CDN, or data URIs): an
        answer listing hundreds of large images is not downloaded and decoded whole to keep a few.
        The provider has billed the job by now, so every failure from here on is a charged one.
        Only for engines whose client carries no key (fal and replicate put it on each API call):
        CDN hosts never see it. `deadline`: when the downloads must end (else one of their own).
        A user's cancel meanwhile lets them finish, for `output_kept_seconds` at most, and raises
        `CanceledFetched` holding the images (made and billed, as a cancel answered "succeeded"
        keeps its image); dropped, they were lost though paid for. One that abandons the job
        (another process follows the work on, and fetches them) drops them. `at_cancel` is called
        as a user's cancel meets the downloads, before they are let finish: what it starts (the
        stops of work still running) goes out at once, not after their 10 s. `kept_until`: the
        event loop's time by which downloads a user's cancel met must end, where that cancel came
        earlier, while what lists them was fetched (fal's result): one bound for both."""
        try:
            if not urls:
                raise NoImage(f"{self.name}: {empty}", details={"engine": self.name, **details})
            fetching = asyncio.ensure_future(self._fetched(urls[:wanted], deadline))
            try:
                return await cancel.race(asyncio.shield(fetching), charged="yes")
            except Canceled:
                if cancel.abandoned:
                    raise
                if at_cancel is not None:
                    at_cancel()
                kept_for = (self.output_kept_seconds if kept_until is None
                            else max(kept_until - asyncio.get_running_loop().time(), 0.0))
                cancel.keep(kept_for)  # a stop meanwhile waits for it
                await asyncio.wait({fetching}, timeout=kept_for)
                if not fetching.done():
                    log.warning("%s: the job was canceled while its output (made and billed) was downloaded, "
                                "which did not end within %.0f s; it is not kept", self.name, kept_for)
                    raise
                if fetching.cancelled() or fetching.exception() is not None:
                    log.warning("%s: the job was canceled while its output (made and billed) was downloaded, which "
                                "then failed (%s); it is not kept", self.name,
                                "cancelled" if fetching.cancelled() else fetching.exception())
                    raise
                raise CanceledFetched(fetching.result()) from None
            finally:
                if not fetching.done():
                    fetching.cancel()
        except EngineError as exc:
            exc.at_least_charged("yes")
            raise

    async def _fetched(self, urls: list[str], deadline: float | None) -> list[RenderedImage]:
        return [RenderedImage(await asyncio.to_thread(decode_image, await self._download(url, deadline), self.name))
                for url in urls]

    async def _download(self, url: str, deadline: float | None = None) -> bytes:
        if url.startswith("data:"):
            return b64decode_tolerant(url.partition(",")[2], self.name)
        try:
            response = await self.http.request("GET", url, idempotent=True, deadline=deadline)
        except EngineUnavailable as exc:
            if exc.details.get("status") not in (401, 403):
                raise
            # No key goes to the CDN: its refusal is of the URL (a signed one expired), not of ours.
            raise EngineError(f"{self.name}: downloading the output was refused (HTTP {exc.details['status']}); "
                              "its URL may have expired", details={"engine": self.name,
                                                                   "status": exc.details["status"]}) from None
        if response.status_code != 200:
            raise EngineError(f"{self.name}: downloading the output failed (HTTP {response.status_code})",
                              details={"engine": self.name, "status": response.status_code})
        return response.content

    async def send_answered(self, method: str, url: str, *, cancel: CancelToken, **kwargs: Any) -> httpx.Response:
        """`self.http.request(..., cancel=cancel)` for a synchronous call that can bill, whose
        answer is what it made (the image, what it cost). A user's cancel while it is out lets it
        answer, within `output_kept_seconds`, as an output a cancel finds downloading is let
        finish: the answer is returned, to be read as any other within `answered_at_cancel`, which
        ends the job `canceled` keeping its images, charged as made; dropped, they were billed and
        lost, the hold captured `unknown`. An answer that the client sends no further (a 503, a
        429, once the job is canceled) ends it with `Canceled` saying what it cost, as a cancel
        between attempts does; none by then drops the call, `Canceled` (`charged="unknown"`). A
        cancel before it is sent, between attempts, or one that abandons the job (a stop: nobody
        could ask for the answer after the restart, and the stop decides how long it waits), is as
        the client has it."""
        if cancel.cancelled:  # nothing is out: the client says what that cost
            return await self.http.request(method, url, cancel=cancel, **kwargs)
        kept = KeptOut()
        sending = asyncio.ensure_future(self.http.request(method, url, cancel=kept, **kwargs))
        try:
            try:
                return await cancel.race(asyncio.shield(sending))
            except Canceled:
                if sending.done():  # its own (a send refused), or an answer in the same instant
                    return _answer_at_cancel(sending, cancel)
            # The request sends nothing more, but one out is let answer (see `KeptOut`).
            kept.cancel(abandon=cancel.abandoned)
            if kept.out and cancel.abandoned:
                sending.cancel()  # a stop: dropped, as ever
            elif not cancel.abandoned:
                cancel.keep(self.output_kept_seconds)  # a stop meanwhile waits for it
            await asyncio.wait({sending}, timeout=self.output_kept_seconds)
            if not sending.done() or sending.cancelled():
                if not cancel.abandoned:
                    log.warning("%s: the job was canceled while a generation call was out, which was not answered "
                                "within %.0f s; what it made is not kept", self.name, self.output_kept_seconds)
                raise Canceled("the job was canceled while the provider was working", charged="unknown")
            # Answered (a failure is the caller's `answered_at_cancel` to end the job with), or not out:
            # the client ended it on the cancel, saying what it cost.
            return _answer_at_cancel(sending, cancel)
        finally:
            if not sending.done():
                sending.cancel()  # this call was itself cancelled (a timeout around it): so is the request

    async def send_withdrawable(self, method: str, url: str, *, cancel: CancelToken, deadline: float,
                                progress: Progress,
                                withdraw: Callable[[httpx.Response], Awaitable[list[dict[str, Any]] | None]],
                                **kwargs: Any) -> httpx.Response:
        """`self.http.request(..., cancel=cancel)` for a request that can bill and whose answer
        names the work it started (a prediction's id, a queue request's cancel URL). A user's
        cancel while it is out ends the call at once with `Canceled` (`charged="unknown"`), as the
        client's own race does; but the request is not dropped: it is left to be answered (within
        `deadline`), and `withdraw` is then given the answer, in the background, to stop that
        work at the provider, best effort. It returns the handles of the work the provider said
        never ran ([] for a request refused, which made none; None where work may have run),
        which `progress.withdrawn` is told: the job's charge for it is then nothing.
        A cancel before the request is sent or between its attempts, and one that abandons the
        job (another process follows the work on), are as the client has them."""
        if cancel.cancelled:  # nothing is out: the client says what that cost
            return await self.http.request(method, url, deadline=deadline, cancel=cancel, **kwargs)
        kept = KeptOut()
        sending = asyncio.create_task(self.http.request(method, url, deadline=deadline, cancel=kept, **kwargs))
        followed = False
        try:
            try:
                return await cancel.race(asyncio.shield(sending))
            except Canceled:
                if sending.done():  # its own (a send refused), or an answer in the same instant
                    return sending.result()
            # The job is canceled: the request sends nothing more, but one out is not cut (see `KeptOut`).
            kept.cancel(abandon=cancel.abandoned)
            if kept.out and not cancel.abandoned:
                self._keep_until_done(asyncio.create_task(self._withdraw_when_answered(sending, withdraw, progress)))
                followed = True
                raise Canceled("the job was canceled while the provider was working", charged="unknown")
            if kept.out:  # abandoned: dropped, as ever; another process follows the job on
                sending.cancel()
            await asyncio.wait({sending})
            if sending.cancelled():
                raise Canceled("the job was canceled while the provider was working", charged="unknown")
            # Not out: the client ended it on the cancel, saying what it cost (or it was just answered).
            return sending.result()
        finally:
            if not followed and not sending.done():
                sending.cancel()  # this call was itself cancelled (a timeout around it): so is the request

    def _keep_until_done(self, task: asyncio.Task[Any]) -> None:
        """Hold `task`, withdrawing work its call left behind, until it is done (the event loop
        keeps only a weak reference to a task); `aclose` ends those still out."""
        if not task.done():
            self._withdrawing.add(task)
            task.add_done_callback(self._withdrawing.discard)

    async def _withdraw_when_answered(self, sending: asyncio.Task[httpx.Response],
                                      withdraw: Callable[[httpx.Response], Awaitable[list[dict[str, Any]] | None]],
                                      progress: Progress) -> None:
        try:
            response = await sending
        except Canceled as exc:
            if exc.charged == "no":  # answered that nothing was made, and not sent again
                log.info("%s: a request left out by a cancel made nothing", self.name)
                await self._told_withdrawn(progress, [])
            return
        except Exception as exc:
            log.warning("%s: a request left out by a cancel got no answer (%s); whatever it made is left "
                        "to the provider", self.name, exc)
            return
        try:
            never_ran = await withdraw(response)
        except Exception:  # best effort: the job has ended either way
            log.warning("%s: withdrawing the work of a request left out by a cancel failed", self.name,
                        exc_info=True)
            return
        if never_ran is not None:
            await self._told_withdrawn(progress, never_ran)

    async def _told_withdrawn(self, progress: Progress, handles: list[dict[str, Any]]) -> None:
        try:
            await progress.withdrawn(handles)
        except Exception:  # the charge stays for a person to reconcile, as it was
            log.warning("%s: settling the charge of work withdrawn unrun failed", self.name, exc_info=True)

    async def aclose(self) -> None:
        pending = list(self._withdrawing)
        if pending:
            # Their answers would never be read: the work they started runs on until the provider ends it.
            log.warning("%s: %d request(s) left out by a cancel, or withdrawing work given up on, still unanswered "
                        "at close; their work is not withdrawn", self.name, len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.http.aclose()
