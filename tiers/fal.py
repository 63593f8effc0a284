"""fal.ai queue (`fal-ai/nano-banana-2/edit` by default).

The submit POST returns `status_url`, `response_url` and `cancel_url`; those absolute URLs are the
only ones used afterwards, since fal's path layout for apps with sub-paths is its own business.
The submit is never re-sent when it got no answer (the request may be queued and billed); status
polls, the result fetch and output downloads are idempotent. A cancel while the submit is out does
not drop it: the job ends, and the request it queued is canceled once its answer comes.

Once fal has accepted a request, a failure leaves the bill `unknown` (the ledger keeps the
estimate unreconciled) and a result that was fetched is billed. fal reports no money amount: the
actual cost is `None` (the estimate is captured), except for an answer listing more images than
asked, charged for each (see `_cost_of_surplus`; past twice the hold, the ledger flags it for review).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

import httpx

from orchestrator.errors import BadEngineInput, Canceled, ContentFiltered, EngineError, EngineTimeout, NoImage, NoPrice
from tiers._cloud import CanceledFetched, CloudEngine, paid_calls
from tiers._http import RemoteClient, answer_json, error_json, error_text, json_object, without_credentials
from tiers._images import (
    CLASS_EDGES,
    CLASS_PIXELS_SLACK,
    CLASS_SIDE_SLACK,
    b64encode,
    class_bound,
    encode_image,
    shaped_as,
    size_class,
)
from tiers.base import (
    PROMPT_AND_IMAGE_ONLY,
    CancelToken,
    Capabilities,
    EngineContext,
    Progress,
    RenderedImage,
    RenderRequest,
    RenderResult,
    instruction_prompt,
    still_holds_the_job,
)

log = logging.getLogger(__name__)

# Credits (1 credit = $0.01) per output image by resolution. Config defaults (providers.md, Nov 2026).
PRICES_AS_OF = "2026-11"
HALF_K = "0.5K"
HALF_K_SIDE = CLASS_EDGES[HALF_K]
_NANO_BANANA_2 = {HALF_K: 6.0, "1K": 8.0, "2K": 12.0, "4K": 16.0}
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "fal-ai/nano-banana-2": dict(_NANO_BANANA_2),
    "fal-ai/nano-banana-2/edit": dict(_NANO_BANANA_2),
}
# Priced (providers.md lists it) but text-to-image only: its input takes no image, so a bridge or
# polish sent there was paid for a picture that never saw the draft, and "succeeded".
TEXT_ONLY_MODELS = frozenset({"fal-ai/nano-banana-2"})
PENDING = frozenset({"IN_QUEUE", "IN_PROGRESS"})
# fal's answer (a 400) to a cancel of a request that finished: its outputs are made, and billed.
ALREADY_COMPLETED = "ALREADY_COMPLETED"
# fal's error types are not all documented (*unverified*): match the policy-ish words.
FILTER_WORDS = ("content_policy", "nsfw", "safety", "moderation")
MAX_INLINE_BYTES = 7 * 1024 * 1024


def _filtered(*texts: object) -> bool:
    lowered = " ".join(str(t) for t in texts if t).lower()
    return any(word in lowered for word in FILTER_WORDS)


# fal's infrastructure failures (its "Request Error Types": the request timed out, no runner
# could take it, the runner went away or broke), said in `error_type` and the `X-Fal-Error-Type`
# header. They are 5xx, and fal bills no 5xx: nothing was charged, and another engine may take the job.
INFRA_ERRORS = frozenset({"request_timeout", "startup_timeout", "runner_scheduling_failure",
                          "runner_connection_timeout", "runner_disconnected", "runner_connection_refused",
                          "runner_connection_error", "runner_incomplete_response", "runner_server_error",
                          "internal_error"})


def unbilled(error_type: object) -> bool:
    return isinstance(error_type, str) and error_type in INFRA_ERRORS


def stored_failure(response: httpx.Response) -> bool:
    """A result fetched as a 5xx naming its error type: the request's failure as fal stored it,
    which asking again only repeats (retried as a passing outage, it held the job to a fresh
    deadline). Only the result's: a submit or a poll answered so is a passing outage, retried."""
    return response.status_code >= 500 and bool(response.headers.get("x-fal-error-type"))


# fal's own domains: its queue answers name URLs there, whatever base URL the request went to.
FAL_SITES = ("fal.run", "fal.ai", "fal.media")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _port(url: httpx.URL) -> int | None:
    return url.port or {"http": 80, "https": 443}.get(url.scheme)


def _taken_off_the_queue(seen: dict[str, Any], cancel_answer: str | None) -> bool:
    """Whether a canceled request surely never ran: it was last seen waiting in the queue, and the
    cancel answered that fal took it off (fal bills no time spent in its queue, and only outputs
    made). A request that started in between is answered CANCELLATION_REQUESTED, and may bill."""
    return seen.get("status") == "IN_QUEUE" and cancel_answer == "OK"


# The largest queue position told: a count, not whatever the answer held there.
MAX_QUEUE_POSITION = 1_000_000


def _queue_position(value: object) -> int | None:
    """A status's `queue_position` as the job's `state` event tells it: a count, or None. Any other
    value (a megabyte string, an object) went into every event its stream's clients were sent."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_QUEUE_POSITION:
        return value
    return None


class FalEngine(CloudEngine):
    name = "fal"
    key_settings = ("ORCH_FAL_API_KEY", "FAL_KEY")
    optional_prices = frozenset[str]()  # it reads its defaults' keys only
    capabilities = Capabilities(img2img=True, upscale=True, seeds=False, negative_prompt=False,
                                leaves_machine=True, max_width=4096, max_height=4096, size_multiple=1)
    # Seconds between status polls; tests set it to 0.
    poll_interval: float = 1.0

    def __init__(self, ctx: EngineContext, client: RemoteClient | None = None) -> None:
        s = ctx.settings
        super().__init__(ctx, s.fal_model.strip("/"), s.fal_api_key, DEFAULT_PRICES, PRICES_AS_OF)
        # The key goes on each queue call, not on the client: outputs are downloaded with the same
        # client from CDN hosts that must never see it.
        self._auth = {"Authorization": f"Key {self._key or ''}"}
        self.http = self.remote_client(ctx, client, base_url=s.fal_base_url)
        self._base = httpx.URL(s.fal_base_url)

    def availability(self) -> tuple[bool, str | None]:
        if self._model in TEXT_ONLY_MODELS:
            return False, (f"ORCH_FAL_MODEL={self._model} is text-to-image only: it would not see the draft "
                           f"(use {self._model}/edit)")
        return super().availability()

    def _keyed(self, url: object) -> bool:
        """Whether a queue URL from an answer may be sent the key: https on fal's own domains, or
        on the base URL's host or its subdomains, at its port (a proxy, or a local stand-in over its own
        scheme). An answer naming another host would otherwise collect the key."""
        if not isinstance(url, str):
            return False
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            return False
        host, base = parsed.host, self._base
        if not host or parsed.scheme not in {"https", base.scheme}:
            return False
        if parsed.scheme == "https" and any(host == site or host.endswith(f".{site}") for site in FAL_SITES):
            return True
        if _port(parsed) != _port(base):
            return False  # another port of the base's host is another service, maybe another user's
        if host == base.host:
            return True
        # Not its siblings: the base's parent may be a host shared by many (`studio-fal.herokuapp.com`'s
        # `herokuapp.com`), whose other tenants then collected the key.
        return not _is_address(base.host) and host.endswith(f".{base.host}")

    def _resolution(self, req: RenderRequest) -> str:
        """The resolution tier asked for and paid: Nano Banana 2's 0.5K (three quarters of 1K's
        price) where the model's prices name it, for a size it holds as `size_class` judges the
        others (Google's 0.5K at 16:9 is 688x384: by the long side alone it was asked, and paid, at 1K),
        else 1K, 2K or 4K."""
        if (HALF_K in self._prices.table.get(self._model, {})
                and req.width * req.height <= CLASS_PIXELS_SLACK * HALF_K_SIDE ** 2
                and max(req.width, req.height) <= CLASS_SIDE_SLACK * HALF_K_SIDE):
            return HALF_K
        return size_class(req.width, req.height)

    def estimate(self, req: RenderRequest) -> int:
        return req.n * self._prices.millicredits(self._model, self._resolution(req))

    def largest_size(self, req: RenderRequest) -> tuple[int, int]:
        """The provider picks the size within the resolution asked (a 256 px draft comes back at
        0.5K or 1K): the largest of any of its aspect ratios, for the storage quota (`orchestrator.quota`)."""
        return class_bound(self._resolution(req))

    def _body(self, req: RenderRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": instruction_prompt(req), "num_images": req.n, "output_format": "png",
                                "resolution": self._resolution(req)}
        if req.init_image is not None:
            # The edit answers in the input's shape: the draft goes in the shape asked for.
            shaped = shaped_as(req.init_image, req.width, req.height)
            data = encode_image(shaped, fmt="PNG", max_bytes=MAX_INLINE_BYTES, max_side=2048)
            body["image_urls"] = [f"data:image/png;base64,{b64encode(data)}"]
        return body

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        cancel.raise_if_cancelled()
        body = await asyncio.to_thread(self._body, req)  # the draft's PNG, off the event loop
        cancel.raise_if_cancelled()
        deadline = self.http.new_deadline()
        progress.state("submitted")
        # A cancel while the submit is out ends the job at once, but the submit is left to be
        # answered, and the request it queued is then canceled (`_withdraw_submitted`).
        response = await self.send_withdrawable(
            "POST", f"/{self._model}", json=body, deadline=deadline, headers=self._auth, cancel=cancel,
            progress=progress, withdraw=self._withdraw_submitted,
        )
        if response.status_code == 404:  # no such model (retired, misspelt): another engine may serve
            raise self.model_not_served(response)
        if not response.is_success:  # any 2xx is the request queued
            raise await self._refused(response)
        queued = self._json(response)
        request_id = queued.get("request_id")
        urls = {k: queued.get(k) for k in ("status_url", "response_url", "cancel_url")}
        if not request_id or not all(self._keyed(u) for u in urls.values()):
            raise EngineError("fal: the submit answer lacks request_id or queue URLs on fal's own https site "
                              f"({self._base.host}); they are not followed, since each call carries the key",
                              details={"engine": self.name, "urls": urls}, charged="unknown")
        request_id = str(request_id)
        progress.provider_request(request_id, urls)
        # The submit's answer is the request's place in fal's queue (`queue_position`): it waits
        # there until a poll says otherwise, so a cancel answered `OK` before any poll was answered
        # took it off unrun, as after a poll that saw it IN_QUEUE.
        return await self._follow(req, request_id, urls, deadline, progress, cancel, {"status": "IN_QUEUE"})

    def can_reattach(self, handles: list[dict[str, Any]], req: RenderRequest) -> bool:
        """One queue request holds all the job's images, followed through the URLs fal gave."""
        return len(handles) == 1 and all(self._keyed(handles[0].get(k))
                                         for k in ("status_url", "response_url", "cancel_url"))

    async def reattach(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                       cancel: CancelToken) -> RenderResult:
        if not self.can_reattach(handles, req):
            raise EngineError("fal: the saved request cannot be followed (no single request with its queue URLs)",
                              details={"engine": self.name}, charged="unknown")
        urls = {k: handles[0][k] for k in ("status_url", "response_url", "cancel_url")}
        # Nothing is known of where it is now: the dead attempt may have seen it start.
        return await self._follow(req, str(handles[0]["id"]), urls, self.http.new_deadline(), progress, cancel, {})

    async def _follow(self, req: RenderRequest, request_id: str, urls: dict[str, Any], deadline: float,
                      progress: Progress, cancel: CancelToken, seen: dict[str, Any]) -> RenderResult:
        """From an accepted request to its images: poll, check, fetch the result and its images.
        `seen["status"]`: the request's state as last known, before any poll."""
        completed: dict[str, Any] | None
        try:
            completed = await self._wait(request_id, str(urls["status_url"]), deadline, progress, cancel, seen)
        except Canceled:
            # abandoned: another process follows the request on
            answer = None if cancel.abandoned else await self._cancel_remote(str(urls["cancel_url"]))
            if _taken_off_the_queue(seen, answer):
                # The job may have ended already, charged as if it ran (recovery's, when this
                # worker was stopped past its lease): fal's word settles that charge.
                await progress.withdrawn([{"id": request_id}])
                raise Canceled("the job was canceled while its request waited in fal's queue",
                               details={"engine": self.name, "request": request_id}).unbilled() from None
            if answer != ALREADY_COMPLETED:
                raise Canceled("the job was canceled while fal was working", charged="unknown") from None
            # It finished meanwhile, its images made and billed: its result is fetched and kept
            # (`_completed_result`, the cancel met), as Replicate's prediction a cancel finds succeeded is.
            completed = None
        except EngineError as exc:
            # We stop following a request that may still run and bill: stop it too, unless another
            # process follows it now (this one was stopped past its lease). One taken off the
            # queue cost nothing, and another engine may take the job.
            answer = await self._cancel_remote(str(urls["cancel_url"])) if await still_holds_the_job() else None
            if _taken_off_the_queue(seen, answer):
                await progress.withdrawn([{"id": request_id}])
                exc.unbilled()
                raise
            if answer != ALREADY_COMPLETED:
                exc.charged = "unknown"
                raise
            # It finished after its last poll, its images made and billed: its result is fetched
            # and the job goes on, as Replicate's prediction given up on whose cancel finds it succeeded.
            log.info("fal: request %s, given up on (%s), had completed; its result is fetched",
                     request_id[:100], exc.message[:200])
            completed = None
        if completed is not None:  # else its result says how it ended
            self._check_completed(request_id, completed)
        try:
            output, kept_until = await self._completed_result(str(urls["response_url"]), cancel)
        except EngineError as exc:
            # COMPLETED: fal has run (and billed) the request, unless its result is a stored 5xx,
            # which fal bills not.
            if not exc.work_unbilled:
                exc.at_least_charged("unknown")
            raise
        images: list[RenderedImage] = []

        def result(cost: int | None = None) -> RenderResult:
            return RenderResult(images=list(images), model=self._model, cost_millicredits=cost,
                                provider_request_id=request_id,
                                metadata={"resolution": self._resolution(req), **PROMPT_AND_IMAGE_ONLY})

        # The request made (and fal billed) every image it lists: one flagged, or one whose download
        # fails, leaves the others to the job, as a later call's failure does on the other engines.
        try:
            listed, flagged = self._listed(output)
        except NoImage:
            if kept_until is None:
                raise
            # Read after a user's cancel: the job ends canceled, charged as a cancel there was.
            raise Canceled("the job was canceled while fal's result was fetched", charged="unknown") from None
        with paid_calls(images, kept=result):
            try:
                await self._images(listed, flagged, req.n, images, cancel, kept_until)
            except EngineError as exc:
                # Billed for each listed image, as a success is: a failed download (or a cancel
                # while one is out) is charged the surplus too.
                if exc.charged == "yes" and exc.cost_millicredits is None:
                    exc.cost_millicredits = self._cost_of_surplus(req, len(listed))
                raise
        progress.step(len(images), req.n)
        return result(self._cost_of_surplus(req, len(listed)))

    async def _wait(self, request_id: str, status_url: str, deadline: float, progress: Progress,
                    cancel: CancelToken, seen: dict[str, Any]) -> dict[str, Any]:
        """Poll until COMPLETED and return that status; `seen["status"]` is the last one read."""
        async def poll() -> httpx.Response:
            response = await cancel.race(self.http.request(
                "GET", status_url, params={"logs": "1"}, idempotent=True, deadline=deadline,
                headers=self._auth,
            ))
            if response.status_code not in (200, 202):
                raise EngineError(f"fal: polling {request_id} failed (HTTP {response.status_code}): "
                                  f"{error_text(response)}", details={"engine": self.name})
            return response

        while True:
            status = await self.read_again_if_unreadable(poll, self._json, deadline, cancel)
            state = seen["status"] = status.get("status")
            if state == "COMPLETED":
                return status
            if not isinstance(state, str) or state not in PENDING:  # an object is unhashable: a TypeError
                raise EngineError(f"fal: unexpected queue status {self.said(state)!r}",
                                  details={"engine": self.name, "request": request_id})
            if state == "IN_QUEUE":
                progress.state("queued", position=_queue_position(status.get("queue_position")))
            else:
                progress.state("running")
            remaining = deadline - self.http.clock()
            if remaining <= 0:
                raise EngineTimeout(f"fal: request {request_id} did not finish before the deadline",
                                    details={"engine": self.name, "request": request_id})
            await cancel.sleep(min(self.poll_interval, remaining))

    def _check_completed(self, request_id: str, status: dict[str, Any]) -> None:
        error, error_type = status.get("error"), status.get("error_type")
        if not error and not error_type:
            return
        details = {"engine": self.name, "request": request_id, "error_type": error_type}
        said = self.said(f"({error_type or 'error'}): {error or ''}", 400)
        message = f"fal: the request failed {said}"
        # The type first: an infrastructure failure fal bills none of is one whatever its text says
        # ("Safety checker failed to load" was told the artist as their content filtered, and captured).
        if unbilled(error_type):
            raise EngineError(message, details=details).unbilled()
        if _filtered(error_type, error):
            raise ContentFiltered(message, details=details, charged="unknown")
        raise EngineError(message, details=details, charged="unknown")

    async def _completed_result(self, response_url: str, cancel: CancelToken) -> tuple[dict[str, Any], float | None]:
        """The completed request's answer (`_result`), and None; its images are made and billed. A
        user's cancel meanwhile lets the fetch end, within `output_kept_seconds`, and returns the
        answer with the event loop's time by which its images' downloads must end too (one bound
        for both): dropped, the images paid for were lost and the job charged `unknown`, where a
        cancel a moment later, meeting their download, kept them (`fetch_outputs`). A fetch not
        done by then is dropped, charged `unknown` as before; one that abandons the job (another
        process follows the request on, and fetches its result) drops it at once."""
        # A deadline of its own: what the queue and the render left of the submit's could be too
        # little for one retry, and the image paid for would be lost. The job's token is raced
        # here, not in the fetch, which a cancel must not cut.
        fetching = asyncio.ensure_future(self._result(response_url, self.http.new_deadline(), CancelToken()))
        try:
            return await cancel.race(asyncio.shield(fetching)), None
        except Canceled:
            if cancel.abandoned:
                raise
            kept_until = cancel.keep(self.output_kept_seconds)  # a stop meanwhile waits for it
            await asyncio.wait({fetching}, timeout=self.output_kept_seconds)
            if not fetching.done():
                log.warning("fal: the job was canceled while its result (made and billed) was fetched, which did "
                            "not end within %.0f s; its images are not kept", self.output_kept_seconds)
                raise
            failed = None if fetching.cancelled() else fetching.exception()
            if isinstance(failed, EngineError) and failed.work_unbilled:  # a failure fal stored, unbilled
                raise Canceled("the job was canceled while fal's result, a failure it bills not, was fetched",
                               details={"engine": self.name}).unbilled() from None
            if fetching.cancelled() or failed is not None:
                log.warning("fal: the job was canceled while its result (made and billed) was fetched, which then "
                            "failed (%s); its images are not kept", failed or "cancelled")
                raise
            return fetching.result(), kept_until
        finally:
            if not fetching.done():
                fetching.cancel()

    async def _result(self, response_url: str, deadline: float, cancel: CancelToken) -> dict[str, Any]:
        """The completed request's answer; one that cannot be read is fetched again, as a status is
        (the images were paid for, and a second GET would have had them)."""
        return await self.read_again_if_unreadable(lambda: self._fetch_result(response_url, deadline, cancel),
                                                   self._json, deadline, cancel)

    async def _fetch_result(self, response_url: str, deadline: float, cancel: CancelToken) -> httpx.Response:
        response = await cancel.race(self.http.request(
            "GET", response_url, idempotent=True, deadline=deadline, headers=self._auth, final_if=stored_failure,
        ))
        if not response.is_success:  # any 2xx is the result, made and billed
            error_type = response.headers.get("x-fal-error-type")
            if stored_failure(response):  # a 5xx: fal bills none
                raise EngineError(f"fal: the request failed ({error_type}): {error_text(response)}",
                                  details={"engine": self.name, "status": response.status_code,
                                           "error_type": error_type}).unbilled()
            if response.status_code in (404, 410):
                # The request completed (its status said so), but its result is gone: kept a while
                # only, it expired while the job was away (a service down past fal's keeping). Not
                # the request's fault, as `_refused` reads a 4xx without fal's validation body.
                raise EngineError(f"fal: the request completed, but its result is no longer kept "
                                  f"(HTTP {response.status_code}): {error_text(response)}"[:500],
                                  details={"engine": self.name, "status": response.status_code},
                                  retryable=False, charged="unknown")
            # fal reports model-side refusals (validation, content policy) on the result.
            error = await self._refused(response)
            error.charged = "unknown"
            raise error
        return response

    def _cost_of_surplus(self, req: RenderRequest, listed: int) -> int | None:
        """What fal bills for an answer listing more images than asked (a prompt that asks for
        several: the model may make them, and fal bills each it made), only the asked ones kept;
        None otherwise (the estimate is the price). Captured as a charge past the hold, flagged."""
        if listed <= req.n:
            return None
        try:
            return listed * self._prices.millicredits(self._model, self._resolution(req))
        except NoPrice:  # unpriced here now: the images were made, so the hold is what is charged
            return None

    def _listed(self, output: dict[str, Any]) -> tuple[list[str], list[bool]]:
        """The answer's image URLs, and whether the safety checker flagged each."""
        entries = output.get("images")
        if not isinstance(entries, list) and isinstance(output.get("image"), dict):
            entries = [output["image"]]  # a single-image app (an upscaler) answers `image`
        found = [e.get("url") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        urls = [u for u in found if isinstance(u, str) and u]
        if not urls:
            # fal prices its image apps per output image: a result with none may have cost nothing.
            # Captured for a person to reconcile, as an answer without an image is everywhere else.
            raise NoImage("fal: the request completed without an image", details={"engine": self.name},
                          charged="unknown")
        flags = output.get("has_nsfw_concepts")
        # Flags are per image, in the images' order. A model with a safety checker answers a flagged
        # image blacked out: not a result, and not fetched.
        return urls, [isinstance(flags, list) and i < len(flags) and flags[i] is True for i in range(len(urls))]

    async def _images(self, urls: list[str], flagged: list[bool], wanted: int, images: list[RenderedImage],
                      cancel: CancelToken, kept_until: float | None = None) -> None:
        """Fetch the first `wanted` listed images that are not flagged into `images`, in their order:
        all at once, under one deadline (a CDN down held each download for a deadline of its own,
        one after another: n times ORCH_REMOTE_DEADLINE). `kept_until`: see `fetch_outputs`."""
        deadline = self.http.new_deadline()
        listed = [url for url, bad in zip(urls[:wanted], flagged, strict=False) if not bad]
        outcomes = await asyncio.gather(
            *(self.fetch_outputs([url], cancel, wanted=1, empty="", details={}, deadline=deadline,
                                 kept_until=kept_until) for url in listed),
            return_exceptions=True)
        failures: list[BaseException] = []
        for outcome in outcomes:
            if isinstance(outcome, CanceledFetched):  # finished on a user's cancel: made and paid for, kept
                images.extend(outcome.images)
            if isinstance(outcome, BaseException):
                failures.append(outcome)
            else:
                images.extend(outcome)
        if failures:
            # Made and billed as the others were: one that cannot be fetched (an expired URL, bytes
            # that are no image) is raised once the rest are in, not in place of them; a cancel
            # (or a fault not the provider's) before it.
            raise min(failures, key=lambda e: 2 - isinstance(e, Canceled) - 2 * (not isinstance(e, EngineError)))
        if any(flagged[:wanted]):
            told = sum(flagged[:wanted])
            raise ContentFiltered(f"fal: the model's safety checker flagged {told} of the {min(wanted, len(urls))} "
                                  "image(s) (has_nsfw_concepts)", details={"engine": self.name, "flagged": told},
                                  charged="unknown")

    async def withdraw(self, handles: list[dict[str, Any]]) -> bool:
        """True when fal took every request off its queue: fal answers a cancel `OK` only for a
        request it removed from the queue, which never ran (its queue time is not billed). A
        running one is answered CANCELLATION_REQUESTED, and its app may have made, and billed, images."""
        unbilled = bool(handles)
        for handle in handles:
            if not self._keyed(handle.get("cancel_url")):  # the key goes only where a saved URL may take it
                unbilled = False
                continue
            unbilled = await self._cancel_remote(str(handle["cancel_url"])) == "OK" and unbilled
        return unbilled

    async def _withdraw_submitted(self, response: httpx.Response) -> list[dict[str, Any]] | None:
        """The answer to a submit the job's cancel left out: the request it queued is canceled.
        Not saved with the job (`Progress.provider_request`), which has ended by now. Returns its
        handle when fal took it off its queue, as `withdraw` judges, [] when the submit was
        refused (nothing queued), and None when the request may have run."""
        if not response.is_success:
            log.info("fal: a submit left out by a cancel was answered HTTP %d: nothing to cancel",
                     response.status_code)
            return [] if 400 <= response.status_code < 500 else None
        try:
            queued = self._json(response)
        except EngineError:
            queued = {}
        cancel_url = queued.get("cancel_url")
        if not self._keyed(cancel_url):  # the key goes with it: only to fal's own queue URLs
            log.warning("fal: a submit left out by a cancel was answered with no cancel URL on fal's own site; "
                        "the request it may have queued is not canceled")
            return None
        log.info("fal: request %s, queued after its job was canceled, is canceled",
                 str(queued.get("request_id"))[:100])
        handles = [{"id": str(queued.get("request_id")), "cancel_url": cancel_url}]
        return handles if await self.withdraw(handles) else None

    async def _cancel_remote(self, cancel_url: str) -> str | None:
        """Best effort: the job is over for us either way, so a failure is only logged (the request
        may run on, and bill). Returns the `status` fal answered (`OK`: taken off the queue;
        `CANCELLATION_REQUESTED`: the running app is asked to stop; `ALREADY_COMPLETED`: it finished), or None."""
        try:
            response = await self.http.request("PUT", cancel_url, idempotent=True, deadline=self.http.clock() + 10,
                                               headers=self._auth)
        except (EngineError, httpx.HTTPError) as exc:
            log.warning("fal: canceling %s failed (%s); the request may run on, and bill", cancel_url[:200], exc)
            return None
        try:  # `{"status": ...}`: a body of megabytes is no answer of fal's, and was parsed on the event loop
            answer = error_json(response)
        except ValueError:
            answer = None
        status = answer.get("status") if isinstance(answer, dict) else None
        if response.status_code not in (200, 202):
            # ALREADY_COMPLETED (400) and NOT_FOUND (404) leave nothing running to stop.
            level = logging.INFO if status in (ALREADY_COMPLETED, "NOT_FOUND") else logging.WARNING
            log.log(level, "fal: canceling %s was answered HTTP %d (%s)", cancel_url[:200], response.status_code,
                    error_text(response)[:200])
            # The one said: the request finished, its result there to fetch.
            return ALREADY_COMPLETED if response.status_code == 400 and status == ALREADY_COMPLETED else None
        return status if isinstance(status, str) else None

    async def _refused(self, response: httpx.Response) -> EngineError:
        """fal's validation body is `{"detail": [{"loc", "msg", "type"}]}`; a `type` of
        `content_policy_violation` is moderation, not bad input."""
        if response.status_code < 400:  # no refusal, whatever its body says: it may have billed
            return self.http.fail(response)
        try:
            # In a worker thread: a body of megabytes held the event loop. Read whole all the same,
            # not cut at `error_json`'s bound: each item echoes the value it refuses (`input`), and
            # a content policy refusal of the draft holds its data URI, megabytes, before its type.
            detail = (await asyncio.to_thread(answer_json, response)).get("detail")
        except (ValueError, AttributeError):
            detail = None
        if not isinstance(detail, list) or not detail:
            return self.http.fail(response)
        items = [d for d in detail if isinstance(d, dict)]
        message = without_credentials("; ".join(str(d.get("msg", "")) for d in items if d.get("msg")), response) \
            or error_text(response)
        details = {"engine": self.name, "status": response.status_code,
                   "types": [d.get("type") for d in items]}
        if any(_filtered(d.get("type")) for d in items):
            return ContentFiltered(f"fal filtered the request: {message[:300]}", details=details)
        return BadEngineInput(f"fal: the provider refused the request (HTTP {response.status_code}): "
                              f"{message[:300]}", details=details)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        # Every call that parses JSON follows an accepted submit, so the bill is unknown.
        return json_object(response, self.name, charged="unknown")


def factory(ctx: EngineContext) -> FalEngine:
    return FalEngine(ctx)
