"""Replicate predictions (`google/nano-banana-2` by default).

Each output image is one prediction: a create POST held open with `Prefer: wait`, then, if the
wait ran out, polling `GET /v1/predictions/{id}`. The create is never re-sent when it got no
answer, nor after a 500, 502 or 504 (held open by the wait, the prediction may exist and be
billed by then: providers.md says never re-POST a create; a 503 says the request was not handled);
polls and output downloads are idempotent. A cancel while the create is held open does not drop
it: the job ends, and the prediction the create answers with is canceled once it comes.

Once Replicate has accepted a prediction, a failure leaves the bill `unknown` unless the status
says otherwise (`aborted` is free, `succeeded` is billed): the ledger keeps the estimate as
unreconciled rather than releasing money that may have been spent. Replicate reports no money
amount, so the actual cost is always `None`.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from orchestrator.errors import (
    BadEngineInput,
    Canceled,
    ContentFiltered,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
)
from tiers._cloud import Asked, CanceledFetched, CloudEngine, failed_follows, follows_billed, paid_calls
from tiers._http import RemoteClient, answer_json, error_text, json_object, path_id
from tiers._images import b64encode, class_bound, encode_image, nearest_aspect, shaped_as, size_class
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

# Credits (1 credit = $0.01) per output image, by output resolution for the Nano Banana models.
# Config defaults (providers.md, Nov 2026): Replicate does not publish nano-banana-2's prices in
# our sources, so it borrows fal's for the same model ($0.08 at 1K, x1.5 at 2K, x2 at 4K).
PRICES_AS_OF = "2026-11"
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "google/nano-banana-2": {"1K": 8.0, "2K": 12.0, "4K": 16.0},
    "black-forest-labs/flux-1.1-pro": {"image": 4.0},
}
PENDING = frozenset({"starting", "processing"})
SETTLED = frozenset({"succeeded", "failed", "aborted", "canceled"})
FILTER_WORDS = ("nsfw", "safety", "sensitive")
FLUX_ASPECTS = ("1:1", "16:9", "3:2", "2:3", "4:5", "5:4", "9:16", "3:4", "4:3")
PREFER_WAIT = 60
# Seconds past the job's deadline (ORCH_REMOTE_DEADLINE) after which Replicate cancels a prediction
# itself (`Cancel-After`): by then this service has given it up.
CANCEL_AFTER_MARGIN = 60
MAX_INLINE_BYTES = 7 * 1024 * 1024
# Seconds a cancel at Replicate is given to be answered, and the download of an output a user's
# cancel found made (`ReplicateEngine._kept_on_cancel`): the job ends once they are done.
STOP_SECONDS = 10


def is_nano_banana(model: str) -> bool:
    return model.startswith("google/nano-banana")


def takes_resolution(model: str) -> bool:
    """Whether the model is told an output resolution (1K | 2K | 4K): the Gemini 3 image models.
    FLUX 1.1 pro takes an aspect ratio only, and google/nano-banana (Gemini 2.5) makes 1K: both
    answer about a megapixel whatever was asked."""
    return model.startswith(("google/nano-banana-2", "google/nano-banana-pro"))


def price_variant(model: str, req: RenderRequest) -> str:
    return size_class(req.width, req.height) if is_nano_banana(model) else "image"


def model_input(model: str, req: RenderRequest, prompt: str, image_uri: str | None) -> dict[str, Any]:
    """The prediction's `input` object. Every Replicate model names its inputs its own way:
    google/nano-banana-2 takes `prompt`, `image_input` (a list of URLs or data URIs),
    `aspect_ratio` (`match_input_image` keeps the draft's framing) and `output_format`, plus
    `resolution` (1K | 2K | 4K, *unverified*: without it a polish came back at the model's default
    size, whatever was asked). FLUX 1.1 pro takes one `image_prompt` and a fixed list of aspect
    ratios (*unverified*). A model added to the price table needs its mapping here."""
    if model.startswith("black-forest-labs/flux"):
        flux: dict[str, Any] = {"prompt": prompt, "output_format": "png",
                                "aspect_ratio": nearest_aspect(req.width, req.height, FLUX_ASPECTS)}
        if image_uri:
            flux["image_prompt"] = image_uri
        if req.seed is not None:
            flux["seed"] = req.seed
        return flux
    body: dict[str, Any] = {"prompt": prompt, "output_format": "png"}
    if takes_resolution(model):
        body["resolution"] = size_class(req.width, req.height)
    if image_uri:
        body["image_input"] = [image_uri]
        body["aspect_ratio"] = "match_input_image"
    return body


def _never_ran(prediction: dict[str, Any] | None) -> bool:
    """Whether a prediction (a cancel's answer, or one that failed) ended before it started:
    Replicate bills the time a prediction runs (setup and queueing are free; "aborted (never
    started): no charge"), and one that never started made no output to bill by."""
    if prediction is None or prediction.get("status") not in ("canceled", "aborted", "failed"):
        return False
    metrics = prediction.get("metrics")
    ran = isinstance(metrics, dict) and bool(metrics.get("predict_time"))
    # Only an answer that says so: one without `started_at` says nothing of it.
    return "started_at" in prediction and prediction["started_at"] is None and not ran


def _succeeded(answer: dict[str, Any], prediction_id: str) -> bool:
    """Whether a cancel's `answer` is the prediction, succeeded: it had ended before the cancel came
    (a cancel of a prediction that has ended answers it as it stands), its output there to fetch."""
    return answer.get("status") == "succeeded" and str(answer.get("id")) == prediction_id


def _filtered(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in FILTER_WORDS)


class ReplicateEngine(CloudEngine):
    name = "replicate"
    key_settings = ("ORCH_REPLICATE_API_KEY", "REPLICATE_API_TOKEN")
    optional_prices = frozenset[str]()  # it reads its defaults' keys only
    key_noun = "API token"
    capabilities = Capabilities(img2img=True, upscale=True, seeds=False, negative_prompt=False,
                                leaves_machine=True, max_width=4096, max_height=4096, size_multiple=1)
    # Seconds between polls once the `Prefer: wait` window has run out; tests set it to 0.
    poll_interval: float = 1.0

    def __init__(self, ctx: EngineContext, client: RemoteClient | None = None) -> None:
        s = ctx.settings
        super().__init__(ctx, s.replicate_model, s.replicate_api_key, DEFAULT_PRICES, PRICES_AS_OF)
        # The key goes on each API call, not on the client: outputs are downloaded with the same
        # client from CDN hosts that must never see it.
        self._auth = {"Authorization": f"Bearer {self._key or ''}"}
        # The hold must end, answered "processing", well before the deadline: a create the deadline
        # cuts is a timeout that may have billed, where polling would have found the image.
        self._wait = max(1, min(PREFER_WAIT, int(s.remote_deadline / 2)))
        self.http = self.remote_client(ctx, client, base_url=s.replicate_base_url)
        self.http.final_answer = maybe_created

    def estimate(self, req: RenderRequest) -> int:
        if size_class(req.width, req.height) != "1K" and not takes_resolution(self._model):
            # It would answer about 1K, paid, for a larger polish: routing takes an engine that can.
            raise BadEngineInput(f"{self.name}: {self._model} makes images of about 1024 px on the long side, "
                                 f"smaller than the {req.width}x{req.height} asked", retryable=True,
                                 details={"engine": self.name, "width": req.width, "height": req.height})
        return req.n * self._prices.millicredits(self._model, price_variant(self._model, req))

    def largest_size(self, req: RenderRequest) -> tuple[int, int]:
        """The model picks the size: in the resolution asked (`takes_resolution`), else about a
        megapixel at its aspect ratio, whatever was asked. The largest of the class at any aspect
        ratio, for the storage quota (`orchestrator.quota`)."""
        return class_bound(size_class(req.width, req.height) if takes_resolution(self._model) else "1K")

    def _input(self, req: RenderRequest) -> dict[str, Any]:
        image_uri = None
        if req.init_image is not None:
            # `match_input_image` (or FLUX's own aspect): the draft goes in the shape asked for.
            shaped = shaped_as(req.init_image, req.width, req.height)
            data = encode_image(shaped, fmt="PNG", max_bytes=MAX_INLINE_BYTES, max_side=2048)
            image_uri = f"data:image/png;base64,{b64encode(data)}"
        return model_input(self._model, req, instruction_prompt(req), image_uri)

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        images: list[RenderedImage] = []
        prediction_ids: list[str] = []
        predict_time = 0.0
        base = await asyncio.to_thread(self._input, req)  # the draft's PNG, off the event loop
        asked = Asked(req.n, lambda: self.estimate(req))

        def result() -> RenderResult:
            return RenderResult(
                images=list(images),
                model=self._model,
                cost_millicredits=None,
                provider_request_id=",".join(prediction_ids) or None,
                metadata={"predict_time": round(predict_time, 3), **PROMPT_AND_IMAGE_ONLY},
            )

        with paid_calls(images, asked, result):  # earlier predictions were made and billed, whatever fails later
            for i in range(req.n):
                cancel.raise_if_cancelled()
                # A model that takes a seed gets seed + i, like every engine: n different images.
                seed = base["seed"] + i if "seed" in base else None
                body = {"input": base if seed is None else {**base, "seed": seed}}
                asked.asking()
                try:
                    prediction = await self._predict(body, progress, cancel)
                except _CanceledMade as exc:
                    # Made and paid for before the cancel reached it: its image is the job's.
                    prediction_ids.append(str(exc.prediction["id"]))
                    kept = await self._kept_on_cancel(exc.prediction, self.http.clock() + STOP_SECONDS)
                    images.extend(RenderedImage(out.image, seed=seed) for out in kept)
                    raise
                prediction_ids.append(str(prediction["id"]))
                try:
                    outputs = await self._outputs(prediction, cancel)
                except CanceledFetched as exc:  # made and paid for: its image is the job's
                    images.extend(RenderedImage(out.image, seed=seed) for out in exc.images)
                    raise
                images.extend(RenderedImage(out.image, seed=seed) for out in outputs)
                metrics = prediction.get("metrics")
                if isinstance(metrics, dict) and isinstance(metrics.get("predict_time"), int | float):
                    predict_time += float(metrics["predict_time"])
                progress.step(len(images), req.n)
        return result()

    async def _predict(self, body: dict[str, Any], progress: Progress, cancel: CancelToken) -> dict[str, Any]:
        deadline = self.http.new_deadline()
        progress.state("submitted")
        # A cancel while the create is held open ends the job at once, but the create is left to be
        # answered, and the prediction it names is then canceled (`_withdraw_created`).
        response = await self.send_withdrawable(
            "POST", f"/v1/models/{self._model}/predictions", json=body, deadline=deadline,
            headers={**self._auth, "Prefer": f"wait={self._wait}",
                     # Replicate stops it by itself once nobody can be following it: a crash, or a
                     # shutdown while the create is held open, leaves no id to cancel it by.
                     "Cancel-After": f"{math.ceil(self.http.deadline_seconds + CANCEL_AFTER_MARGIN)}s"},
            cancel=cancel, progress=progress, withdraw=self._withdraw_created,
        )
        if response.status_code == 404:  # no such model (retired, misspelt): another engine may serve
            raise self.model_not_served(response)
        if maybe_created(response):
            raise EngineError(
                f"replicate: the create was answered HTTP {response.status_code} while it was held open; the "
                "prediction may exist and be billed, so it is not created again",
                details={"engine": self.name, "status": response.status_code}, charged="unknown")
        if not response.is_success:  # any 2xx is the prediction made
            raise self._refused(response)
        prediction = await asyncio.to_thread(self._json, response)  # its output may be inline, megabytes
        progress.provider_request(str(prediction["id"]))
        return await self._settle(prediction, deadline, progress, cancel)

    def can_reattach(self, handles: list[dict[str, Any]], req: RenderRequest) -> bool:
        """Each image is a prediction of its own, made one after another, so only a job whose `n`
        predictions were all accepted can be finished: with fewer, whether the next one was sent
        when the process died is unknown, and it must not be sent twice."""
        return len(handles) == req.n

    async def reattach(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                       cancel: CancelToken) -> RenderResult:
        if not self.can_reattach(handles, req):
            raise EngineError(f"replicate: {len(handles)} of {req.n} predictions were accepted before the "
                              "server stopped; the rest is not sent again",
                              details={"engine": self.name, "predictions": [h.get("id") for h in handles]},
                              charged="unknown")
        base = model_input(self._model, req, "", None)  # only for the seed the model takes, if any
        images: list[RenderedImage] = []
        # Every prediction was asked for: a failure of one that never ran bills the images made only.
        asked = Asked(req.n, lambda: self.estimate(req))
        asked.asking(len(handles))

        def result() -> RenderResult:
            return RenderResult(images=list(images), model=self._model, cost_millicredits=None,
                                provider_request_id=",".join(str(h["id"]) for h in handles),
                                metadata=dict(PROMPT_AND_IMAGE_ONLY))

        failures: list[EngineError] = []
        # One for all: they run side by side at Replicate, and one that never ends held each next one
        # to a deadline of its own (n times ORCH_REMOTE_DEADLINE); each is still read once past it.
        deadline = self.http.new_deadline()
        # Seconds the downloads have left, all together: with the CDN down, each waited out a
        # deadline of its own in turn. Counted while they run only: a deadline started at the first
        # download ran out while later predictions were polled, and a prediction finishing late
        # had its download given one attempt of a second, its image (paid for) lost to one 503.
        fetching = self.http.deadline_seconds
        # Seconds the first reads have past the polls' deadline, all together, for the same reason:
        # one read with the deadline gone (or nearly) had a single attempt, and one 503 stopped a
        # prediction that had succeeded long since, its image lost.
        late_reads = self.http.deadline_seconds
        # The stops of the predictions given up on go side by side, and the next one is read
        # meanwhile: each waited for, up to its 10 s, before the next read, n=16 with Replicate
        # down took some 200 s to fail (fake clock) where the reads have 120 s at most.
        stops = _Stops(self, progress)
        # Predictions given up on whose stops answered that they had succeeded, not fetched yet: a
        # cancel while one of them is fetched keeps the rest as made (`canceled`), as it keeps
        # those its own stops find made. Left here, they stayed failures: their images (paid for)
        # not fetched, the job charged "unknown" with every prediction made.
        found_made: list[tuple[str, EngineError, dict[str, Any]]] = []
        made_at: list[int] = []  # the prediction each of `images` came from: they stay in its order
        place = {str(handle["id"]): i for i, handle in enumerate(handles)}
        # Stops of the predictions not read yet, sent as a user's cancel met an output downloading:
        # sent after that download was let finish (10 s), they ran on (and billed) meanwhile, and
        # the cancel took those 10 s on top of its stops'.
        early_stops: dict[int, asyncio.Future[dict[str, Any] | None]] = {}

        def stop_the_rest(i: int) -> None:
            for j in range(i + 1, len(handles)):
                early_stops[j] = asyncio.ensure_future(self._stop_saved(handles[j]))

        async def follow(i: int, finished: dict[str, Any] | None) -> None:
            """Read prediction `i` until it settles (unless it is `finished`), and keep its image."""
            nonlocal fetching, late_reads
            if finished is None:
                # Read inside `_settle`: a cancel or a failure of that first read stops the prediction too.
                reading = self.http.clock()
                try:
                    prediction = await self._settle({"id": handles[i]["id"]}, deadline, progress, cancel,
                                                    read_first=True, read_by=max(deadline, reading + late_reads),
                                                    stops=stops)
                finally:
                    late_reads -= max(self.http.clock() - max(reading, deadline), 0.0)
            else:
                prediction = finished
            started = self.http.clock()
            try:
                # A prediction found made after its stop (`finished`) leaves no others unread.
                outputs = await self._outputs(prediction, cancel, started + fetching,
                                              at_cancel=None if finished is not None else lambda: stop_the_rest(i))
            except CanceledFetched as exc:  # made and paid for: its image is the job's
                keep(i, exc.images)
                raise
            finally:
                fetching -= self.http.clock() - started
            keep(i, outputs)

        def keep(i: int, outputs: list[RenderedImage]) -> None:
            seed = base["seed"] + i if "seed" in base else None
            at = bisect.bisect_right(made_at, i)
            images[at:at] = [RenderedImage(out.image, seed=seed) for out in outputs]
            made_at[at:at] = [i] * len(outputs)
            progress.step(len(images), req.n)

        async def followed(i: int, finished: dict[str, Any] | None = None) -> None:
            try:
                await follow(i, finished)
            except Canceled as exc:
                await canceled(i, finished, exc)
                raise
            except EngineError as exc:
                # Each prediction was accepted and runs on its own: one that failed (gone at
                # Replicate, its output unreadable) says nothing of the others, made and billed.
                failures.append(exc)

        async def canceled(i: int, finished: dict[str, Any] | None, exc: Canceled) -> None:
            """The job ends on `exc`, met following prediction `i`: the predictions not read yet
            would run on for nobody, and so would `i` when its read met the cancel (`_Unstopped`).
            They are stopped side by side, with the stops still out: one after another, each given
            its cancel's 10 s, a job of n=16 with Replicate down took some 100 s to end on its
            user's cancel, and `i`'s own stop, sent first, held those of n=2 back 10 s. A stop may
            answer that its prediction never ran (not billed: the whole estimate was charged), or
            that it had succeeded (made and billed: its image is kept, as a run's cancel keeps it)."""
            unstopped = [i] if isinstance(exc, _Unstopped) else []
            out = unstopped + (list(range(i + 1, len(handles))) if finished is None else [])
            # Predictions that may have billed (`doubtful`) or surely did (`billed`), not among the
            # images kept nor the failures; `i` itself, its stop not ours, by what its error says.
            # `i`'s output fetched on the cancel (`CanceledFetched`) is among the images kept.
            own = not unstopped and not isinstance(exc, CanceledFetched)
            billed = int(own and exc.charged == "yes")
            doubtful = int(own and not billed and not exc.work_unbilled)
            stopping = out if not cancel.abandoned else []
            doubtful += len(out) - len(stopping)
            at_stop, answers = await asyncio.gather(
                stops.settled(), asyncio.gather(*(early_stops.pop(j) if j in early_stops
                                                  else self._stop_saved(handles[j]) for j in stopping)))
            made: list[tuple[int, dict[str, Any]]] = []
            for prediction_id, failure, prediction in [*found_made, *at_stop]:  # given up on, then found made
                failures.remove(failure)
                made.append((place[prediction_id], prediction))
            found_made.clear()
            for j, answer in zip(stopping, answers, strict=True):
                prediction_id = str(handles[j]["id"])
                if _never_ran(answer):
                    if j in unstopped:  # as a run's cancel tells it (`_settle`)
                        await progress.withdrawn([{"id": prediction_id}])
                elif answer is not None and _succeeded(answer, prediction_id):
                    made.append((j, answer))
                else:
                    doubtful += 1
            by = self.http.clock() + STOP_SECONDS
            fetched = await asyncio.gather(*(self._kept_on_cancel(prediction, by) for _, prediction in made))
            for (j, _), outputs in zip(made, fetched, strict=True):
                keep(j, outputs)
                billed += not outputs  # made and billed, its output lost
            if doubtful or any(not failure.work_unbilled for failure in failures):
                # One may have run, or an earlier one failed and may have billed: not known, though
                # a cancel of `i`'s download says "yes" (of `i` alone), which "at least" kept.
                exc.charged = "unknown"
            elif made:
                exc.at_least_charged("yes")
            elif unstopped and not billed:
                exc.unbilled()  # every one stopped said it never ran
            follows_billed(asked, len(images), failures, billed + doubtful)

        with paid_calls(images, asked, result), stops.kept():
            for i in range(len(handles)):
                await followed(i)
            # The failures are judged by their stops' answers. One may say its prediction
            # succeeded: read once at the deadline, still running, it finished before its stop
            # came, and its image, made and paid for, was lost with the job failed as if it had.
            found_made.extend(await stops.settled())
            while found_made:
                prediction_id, exc, finished = found_made.pop(0)
                failures.remove(exc)
                await followed(place[prediction_id], finished)
            if failures:
                raise failed_follows(failures, asked, len(images), "predictions")
        return result()

    async def _read(self, prediction_id: str, deadline: float, cancel: CancelToken) -> dict[str, Any]:
        """The prediction as a poll reads it, asked again when its answer cannot be read (a one-off
        gateway page ended a prediction about to succeed, and cancelled it, paid)."""
        return await self.read_again_if_unreadable(lambda: self._get(prediction_id, deadline, cancel),
                                                   lambda poll: self._polled(poll, prediction_id), deadline, cancel)

    def _polled(self, poll: httpx.Response, prediction_id: str) -> dict[str, Any]:
        """A poll's answer, which must be the prediction asked for: another's (a cache or a proxy
        answering for the wrong path) was taken for it, its image fetched and kept in its place, a
        job of n=2 ending with one image twice and the other prediction neither fetched nor stopped."""
        prediction = self._json(poll)
        if str(prediction["id"]) != prediction_id:
            raise EngineError(f"replicate: polling {prediction_id} answered another prediction "
                              f"({self.said(prediction['id'], 40)!r})",
                              details={"engine": self.name, "prediction": prediction_id}, charged="unknown")
        return prediction

    async def _get(self, prediction_id: str, deadline: float, cancel: CancelToken) -> httpx.Response:
        poll = await cancel.race(self.http.request(
            "GET", f"/v1/predictions/{prediction_id}", idempotent=True, deadline=deadline, headers=self._auth,
        ))
        if not poll.is_success:  # any 2xx is the prediction as it stands
            raise EngineError(f"replicate: polling {prediction_id} failed (HTTP {poll.status_code}): "
                              f"{error_text(poll)}", details={"engine": self.name}, charged="unknown")
        return poll

    async def _settle(self, prediction: dict[str, Any], deadline: float, progress: Progress,
                      cancel: CancelToken, *, read_first: bool = False,
                      read_by: float | None = None, stops: _Stops | None = None) -> dict[str, Any]:
        """Poll an accepted prediction until it is no longer pending; return it if it succeeded.
        With `read_first`, `prediction` holds only its id, and it is read before anything else,
        asked again until `read_by` when given (else `deadline`). With `stops`, a failure leaves
        the prediction's stop to them, sent without waiting for its answer (a reattach's)."""
        prediction_id = str(prediction["id"])
        try:
            if read_first:
                prediction = await self._read(prediction_id, deadline if read_by is None else read_by, cancel)
            while prediction.get("status") in PENDING:
                progress.state(str(prediction["status"]))
                remaining = deadline - self.http.clock()
                if remaining <= 0:
                    raise EngineTimeout(
                        f"replicate: prediction {prediction_id} did not finish before the deadline",
                        details={"engine": self.name, "prediction": prediction_id},
                    )
                await cancel.sleep(min(self.poll_interval, remaining))
                prediction = await self._read(prediction_id, deadline, cancel)
            if prediction.get("status") not in SETTLED:
                # A status this code does not know (one Replicate added): the prediction may still run
                # and bill, and nobody follows it now. Raised here to be stopped as a failed poll's.
                self._check_status(prediction)
        except Canceled:
            if cancel.abandoned:  # another process follows the prediction on
                raise Canceled("the job was canceled while Replicate was working", charged="unknown") from None
            if stops is not None:
                # A reattach's: stopped with the predictions not read yet, side by side (`reattach`).
                # Stopped here first, its cancel's 10 s were waited out before theirs went out.
                raise _Unstopped("the job was canceled while Replicate was working", charged="unknown") from None
            answer = await self._cancel_remote(prediction_id)
            if _never_ran(answer):
                # The job may have ended already, charged as if it ran (recovery's, when this
                # worker was stopped past its lease): the provider's word settles that charge.
                await progress.withdrawn([{"id": prediction_id}])
                raise Canceled("the job was canceled before Replicate started its prediction",
                               details={"engine": self.name, "prediction": prediction_id}).unbilled() from None
            if answer is not None and _succeeded(answer, prediction_id):
                raise _CanceledMade(answer) from None
            raise Canceled("the job was canceled while Replicate was working", charged="unknown") from None
        except EngineError as exc:
            # We stop following a prediction that may still run and bill: stop it too, unless
            # another process follows it now (this one was stopped past its lease). One stopped
            # before it ran cost nothing, and another engine may take the job.
            if stops is not None:
                exc.charged = "unknown"  # until its stop's answer says otherwise (`_Stops.settled`)
                stops.start(prediction_id, exc)
                raise
            finished = await self._stopped(prediction_id, exc, await self._stop(prediction_id), progress)
            if finished is None:
                raise
            prediction = finished
        self._check_status(prediction)
        return prediction

    async def _stop(self, prediction_id: str) -> dict[str, Any] | None:
        """The cancel of a prediction given up on, as `_cancel_remote` answers it; None, sending
        nothing, when another process follows the job now."""
        return await self._cancel_remote(prediction_id) if await still_holds_the_job() else None

    async def _stopped(self, prediction_id: str, exc: EngineError, answer: dict[str, Any] | None,
                       progress: Progress) -> dict[str, Any] | None:
        """Judge `exc`, the failure a prediction was given up on for, by its stop's `answer`.
        Returns the prediction when that answer is it succeeded: it finished after its last read
        (a cancel of a prediction that has ended answers it as it stands), its output there to fetch."""
        if answer is not None and _succeeded(answer, prediction_id):
            exc.charged = "unknown"  # kept as the failure only should its job end first (a cancel)
            return answer
        if _never_ran(answer):
            await progress.withdrawn([{"id": prediction_id}])
            exc.unbilled()
        else:
            exc.charged = "unknown"
        return None

    async def _kept_on_cancel(self, prediction: dict[str, Any], deadline: float) -> list[RenderedImage]:
        """The output of a prediction a user's cancel found succeeded: made and paid for, so fetched
        (within `deadline`, the job's own token being set) and kept; none when that fails, logged."""
        try:
            return await self._outputs(prediction, CancelToken(), deadline)
        except EngineError as exc:
            log.warning("replicate: prediction %s had succeeded when its job was canceled, and its output could "
                        "not be fetched (%s); it is billed and not kept", prediction.get("id"), exc.message[:200])
            return []

    def _check_status(self, prediction: dict[str, Any]) -> None:
        status = prediction.get("status")
        details = {"engine": self.name, "prediction": prediction.get("id"),
                   "status": self.said(status) if isinstance(status, str) else status}
        if status == "succeeded":
            return
        if status == "failed":
            said = str(prediction.get("error") or "no reason given")
            text = self.said(said, 300)  # judged as said, quoted without our credentials
            if _filtered(said):
                raise ContentFiltered(f"replicate filtered the request: {text}", details=details,
                                      charged="unknown")
            failed = EngineError(f"replicate: the prediction failed: {text}", details=details, charged="unknown")
            raise failed.unbilled() if _never_ran(prediction) else failed
        if status == "aborted":
            # Ended by Replicate before it started (not charged): another engine may take the job.
            raise EngineError("replicate: the prediction was aborted by the provider before it ran",
                              details=details).unbilled()
        if status == "canceled":
            # Not by this job's cancel, which never reads the prediction again: someone canceled
            # it on Replicate, or its `Cancel-After` ran out while it waited for a machine (the
            # service was down meanwhile). A failure of the job, not the user's cancel; it may have
            # run and billed, unless it never started.
            canceled = EngineError("replicate: the prediction was canceled on Replicate, not by this job",
                                   details=details, retryable=False, charged="unknown")
            raise canceled.unbilled() if _never_ran(prediction) else canceled
        raise EngineError(f"replicate: unexpected prediction status {self.said(status)!r}", details=details,
                          charged="unknown")

    async def _outputs(self, prediction: dict[str, Any], cancel: CancelToken, deadline: float | None = None,
                       at_cancel: Callable[[], None] | None = None) -> list[RenderedImage]:
        output = prediction.get("output")
        urls = [output] if isinstance(output, str) else output if isinstance(output, list) else []
        urls = [u for u in urls if isinstance(u, str) and u]
        # One prediction per image (each with its seed): a model that makes several keeps its first.
        return await self.fetch_outputs(urls, cancel, wanted=1, empty="the prediction succeeded without an image",
                                        details={"prediction": prediction.get("id")}, deadline=deadline,
                                        at_cancel=at_cancel)

    async def withdraw(self, handles: list[dict[str, Any]]) -> bool:
        """True when every prediction's cancel answered that it never started (`_never_ran`). The
        cancels go side by side: one after another, each given 10 s, n of them held a cancel n times that."""
        # Saved ids only, as Replicate writes them: a request carrying the token goes nowhere else.
        ids = [path_id(handle.get("id")) for handle in handles]
        answers = await asyncio.gather(*(self._cancel_remote(prediction_id) for prediction_id in ids
                                         if prediction_id is not None))
        return bool(handles) and None not in ids and all(_never_ran(answer) for answer in answers)

    async def _stop_saved(self, handle: dict[str, Any]) -> dict[str, Any] | None:
        """A user's cancel of a saved prediction (`_cancel_remote`'s answer): saved ids only, as
        Replicate writes them, since a request carrying the token goes nowhere else."""
        prediction_id = path_id(handle.get("id"))
        return None if prediction_id is None else await self._cancel_remote(prediction_id)

    async def _withdraw_created(self, response: httpx.Response) -> list[dict[str, Any]] | None:
        """The answer to a create the job's cancel left out: the prediction it made is canceled.
        Not saved with the job (`Progress.provider_request`), which has ended by now. Returns its
        handle when Replicate said it never ran, as `withdraw` judges (`_never_ran`), [] when the
        create was refused (no prediction made), and None when one may have run."""
        if not response.is_success:
            if maybe_created(response):
                log.warning("replicate: a create left out by a cancel was answered HTTP %d; a prediction it may "
                            "have made has no id to cancel it by, and runs until its Cancel-After",
                            response.status_code)
            else:
                log.info("replicate: a create left out by a cancel was answered HTTP %d: nothing to cancel",
                         response.status_code)
            return [] if 400 <= response.status_code < 500 else None
        try:
            prediction = self._json(response)
        except EngineError:
            log.warning("replicate: a create left out by a cancel was answered with no prediction to cancel; "
                        "one it may have made runs until its Cancel-After")
            return None
        prediction_id, status = str(prediction["id"]), prediction["status"]
        if status in ("succeeded", "failed", "canceled", "aborted"):  # nothing left to stop
            log.info("replicate: prediction %s, created after its job was canceled, had already ended (%s)",
                     prediction_id[:100], status)
            return [{"id": prediction_id}] if _never_ran(prediction) else None
        if path_id(prediction_id):  # the key goes with it, only to such a path
            log.info("replicate: prediction %s, created after its job was canceled, is canceled", prediction_id)
            handles = [{"id": prediction_id}]
            return handles if await self.withdraw(handles) else None
        log.warning("replicate: a create left out by a cancel named prediction %r, not an id it is canceled "
                    "by; it runs until its Cancel-After", prediction_id[:100])
        return None

    async def _cancel_remote(self, prediction_id: str) -> dict[str, Any] | None:
        """Best effort: the job is over for us either way, so a failure is only logged (the
        prediction may run on, and bill, until its Cancel-After). Returns the prediction as the
        cancel answered it, or None when it did not."""
        try:
            response = await self.http.request("POST", f"/v1/predictions/{prediction_id}/cancel", idempotent=True,
                                               deadline=self.http.clock() + STOP_SECONDS, headers=self._auth)
        except (EngineError, httpx.HTTPError) as exc:
            log.warning("replicate: canceling prediction %s failed (%s); it may run on, and bill, until its "
                        "Cancel-After", prediction_id, exc)
            return None
        if response.status_code != 200:
            log.warning("replicate: canceling prediction %s was answered HTTP %d (%s); it may run on, and bill, "
                        "until its Cancel-After", prediction_id, response.status_code, error_text(response)[:200])
            return None
        try:
            # In a worker thread: a prediction that has ended is answered whole, its output possibly
            # inline (a data URI of megabytes), which held the event loop while it was parsed.
            answer = await asyncio.to_thread(answer_json, response)
        except ValueError:
            return None
        if not isinstance(answer, dict):
            return None
        if "id" in answer and str(answer["id"]) != prediction_id:
            # Another's answer (a cache or a proxy on the wrong path), read as this one's: its
            # "never started" released the hold of a prediction that may have run and billed.
            log.warning("replicate: canceling prediction %s answered another prediction (%r); it may run on, "
                        "and bill, until its Cancel-After", prediction_id, self.said(answer["id"], 40))
            return None
        return answer

    def _refused(self, response: httpx.Response) -> EngineError:
        if response.status_code == 402:
            return EngineUnavailable("replicate refused to bill the account (HTTP 402): check its billing",
                                     details={"engine": self.name, "status": 402})
        return self.http.fail(response)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        # A 2xx means Replicate accepted the prediction, so even an unreadable one may be billed.
        body = json_object(response, self.name, charged="unknown")
        if not body.get("id") or not isinstance(body.get("status"), str):
            raise EngineError("replicate: the answer is not a prediction (no id or status)",
                              details={"engine": self.name}, charged="unknown")
        if path_id(body["id"]) is None:
            # The id goes into the path each poll and cancel sends the key to, and into the job's
            # row: a faulty answer's `../../../v1/account` sent the key to another endpoint, whose
            # answer was then read as the prediction.
            raise EngineError(f"replicate: the answer is not a prediction (its id {self.said(body['id'], 40)!r} is "
                              "not an id: letters, digits, '-' and '_')", details={"engine": self.name},
                              charged="unknown")
        return body


class _Unstopped(Canceled):
    """A reattach's cancel while it reads a prediction, which is then stopped with the rest."""


class _CanceledMade(Canceled):
    """A user's cancel whose stop answered that the prediction had succeeded: made and billed,
    its image is fetched and kept (`ReplicateEngine._kept_on_cancel`), and the charge is known."""

    def __init__(self, prediction: dict[str, Any]) -> None:
        super().__init__("the job was canceled after Replicate had made its prediction, billed",
                         details={"engine": "replicate", "prediction": str(prediction["id"])}, charged="yes")
        self.prediction = prediction


class _Stops:
    """The stops (`ReplicateEngine._stop`) of the predictions a reattach gives up on, each sent as
    it is given up on and answered while the next ones are read; `settled` judges each failure by
    its stop's answer, as `_settle` does one stopped on its own."""

    def __init__(self, engine: ReplicateEngine, progress: Progress) -> None:
        self._engine, self._progress = engine, progress
        self._out: list[tuple[str, EngineError, asyncio.Task[dict[str, Any] | None]]] = []

    def start(self, prediction_id: str, exc: EngineError) -> None:
        self._out.append((prediction_id, exc, asyncio.create_task(self._engine._stop(prediction_id))))

    async def settled(self) -> list[tuple[str, EngineError, dict[str, Any]]]:
        """Until every stop sent so far is answered, each failure then judged by its answer; returns
        those whose stop answered that the prediction succeeded, with it (`ReplicateEngine._stopped`)."""
        out = list(self._out)
        if out:
            # Not a gather: cancelled (its reattach's task), that cancelled the stops with it, cut
            # mid-request; they stay in `_out` until answered, for `kept` to hold them.
            await asyncio.wait([task for _, _, task in out])
        self._out = self._out[len(out):]
        answers = [task.result() for _, _, task in out]
        finished = []
        for (prediction_id, exc, _), answer in zip(out, answers, strict=True):
            if (prediction := await self._engine._stopped(prediction_id, exc, answer, self._progress)) is not None:
                finished.append((prediction_id, exc, prediction))
        return finished

    @contextmanager
    def kept(self) -> Iterator[None]:
        """Around the reattach: stops still out when it ends otherwise than through `settled` (its
        task cancelled, while `settled` waits for them too) are left to finish, each bounded by its
        cancel's 10 s, as the engine's other requests left out are (`CloudEngine.aclose` ends them)."""
        try:
            yield
        finally:
            for _, _, task in self._out:
                self._engine._keep_until_done(task)
            self._out = []


# Answers to a create held open by `Prefer: wait` that say nothing of whether the prediction was
# made first (a gateway giving up on it, a server error while it waited). A 503 is a request not
# handled (RFC 9110), and a 429 one throttled: both are sent again.
UNKNOWN_OUTCOME_STATUSES = frozenset({500, 502, 504})


def maybe_created(response: httpx.Response) -> bool:
    """A create whose prediction may exist: never re-POSTed (providers.md), unlike other 5xx."""
    return (response.status_code in UNKNOWN_OUTCOME_STATUSES and response.request.method == "POST"
            and response.request.url.path.endswith("/predictions"))


def factory(ctx: EngineContext) -> ReplicateEngine:
    return ReplicateEngine(ctx)
