"""OpenAI GPT image models through `POST /v1/images/edits` (multipart).

Bridge and polish both send the draft as the `image` file, with `input_fidelity=high` to the
gpt-image-1 family (not to the `-mini` models, which refuse it, nor to gpt-image-2 and later,
for which OpenAI says to omit it), so the composition survives; polish only changes the wording of
the prompt (the API tops out at 1536 pixels, it cannot upscale further). The requested size maps
onto the nearest of the three sizes the API knows. Synchronous: a call that was sent but got no
answer is never re-sent (it may have been billed). A 429 `insufficient_quota` is not retried
(waiting does not refill the account): it is `engine_unavailable`, and routing falls back. Cost
comes from the `usage` tokens x the configured token prices when the answer has them; otherwise
`None`, and the ledger keeps the estimate.
"""

from __future__ import annotations

import asyncio
import datetime
import math
from typing import Any

import httpx

from orchestrator.errors import BadEngineInput, ContentFiltered, EngineError, EngineUnavailable, NoImage, NoPrice
from tiers._cloud import (
    Asked,
    CloudEngine,
    TokenBill,
    answered_at_cancel,
    paid_calls,
    prompt_tokens,
    reading_an_answer,
    token_counts,
)
from tiers._http import RemoteClient, error_json, error_text, header_request_id, json_object
from tiers._images import b64decode_tolerant, decode_image, encode_image, nearest_aspect
from tiers.base import (
    PROMPT_AND_IMAGE_ONLY,
    CancelToken,
    Capabilities,
    EngineContext,
    Progress,
    RenderedImage,
    RenderRequest,
    RenderResult,
    is_amount,
)

SIZES = {"1:1": "1024x1024", "3:2": "1536x1024", "2:3": "1024x1536"}
QUALITIES = frozenset({"low", "medium", "high"})
# The fields of an edit this engine chooses, not the user (the prompt and image are theirs).
CHOSEN_FIELDS = frozenset({"input_fidelity", "quality", "size", "output_format", "n"})
INPUT_RATES = ("input_image_tokens_per_million", "input_text_tokens_per_million")
# Error codes of an account that may not spend more (429s, and a spending limit's 400).
SPENT_UP = frozenset({"insufficient_quota", "billing_not_active", "billing_hard_limit_reached"})
MAX_N = 10  # the most images one edits call may return
# providers.md: images under 50 MB (decimal); leave room for the multipart fields.
MAX_UPLOAD_BYTES = 49_000_000
# Credits (1 credit = $0.01) per output image by "quality-size", and per 1M tokens (providers.md, Nov 2026).
PRICES_AS_OF = "2026-11"
_GPT_IMAGE_1: dict[str, float] = {
    "low-1024x1024": 1.1, "low-1536x1024": 1.6, "low-1024x1536": 1.6,
    "medium-1024x1024": 4.2, "medium-1536x1024": 6.3, "medium-1024x1536": 6.3,
    "high-1024x1024": 16.7, "high-1536x1024": 25.0, "high-1024x1536": 25.0,
    "output_image_tokens_per_million": 4000, "input_image_tokens_per_million": 1000,
    "input_text_tokens_per_million": 500,
}
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-image-1.5": dict(_GPT_IMAGE_1),
    "gpt-image-1": dict(_GPT_IMAGE_1),
    # providers.md gives mini prices at 1024x1024 only and no token prices: it raises NoPrice
    # (never priced as free) until the prices file adds its input token rates (and other sizes).
    "gpt-image-1-mini": {"low-1024x1024": 0.5, "medium-1024x1024": 1.1, "high-1024x1024": 3.6},
}
# Models OpenAI shut down, and when (providers.md): from that day (UTC) a request for one fails,
# so the engine says so and is not routed, rather than failing over job by job.
SHUT_DOWN = {"gpt-image-1": datetime.date(2026, 10, 23), "gpt-image-1-mini": datetime.date(2026, 12, 1),
             "gpt-image-1.5": datetime.date(2026, 12, 1)}


def today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


# Input image tokens billed for the draft at input_fidelity=high, by output size. Unverified and
# deliberately on the high side: the estimate is a hold, the `usage` of the answer reconciles it.
INPUT_IMAGE_TOKENS = {"1024x1024": 4500, "1536x1024": 6600, "1024x1536": 6600}


def image_size(width: int, height: int) -> str:
    return SIZES[nearest_aspect(width, height, tuple(SIZES))]


def _error(response: httpx.Response) -> dict[str, Any]:
    # Read up to `error_json`'s bound only: OpenAI's error is a few hundred bytes, and a body of
    # megabytes was parsed whole on the event loop, three times for one refusal.
    try:
        err = error_json(response).get("error")
    except (ValueError, AttributeError):
        return {}
    return err if isinstance(err, dict) else {}


def _error_code(response: httpx.Response) -> str | None:
    code = _error(response).get("code")
    return str(code) if code else None


def quota_exhausted(response: httpx.Response) -> bool:
    """A 429 that waiting does not cure: the account has no credit left (`insufficient_quota`) or
    its billing is off (`billing_not_active`: retried, each job waited 2.5 minutes, told "rate limited")."""
    return response.status_code == 429 and _error_code(response) in SPENT_UP


def _counted(usage: dict[str, Any]) -> tuple[Any, ...]:
    """The token counts a usage block gives: output, input image, input text."""
    details = usage.get("input_tokens_details")
    if isinstance(details, dict):
        # A split that names one kind only: the rest of the input is the other (a missing
        # `image_tokens` billed the image, most of the input, at nothing).
        image_tokens, text_tokens = details.get("image_tokens"), details.get("text_tokens")
        if image_tokens is None:
            image_tokens = _rest(usage.get("input_tokens", 0), text_tokens or 0)
        if text_tokens is None:
            text_tokens = _rest(usage.get("input_tokens", 0), image_tokens)
    else:
        # Without the split, bill every input token at the dearer image rate.
        image_tokens, text_tokens = usage.get("input_tokens", 0), 0
    return usage.get("output_tokens"), image_tokens, text_tokens


def _rest(total: Any, part: Any) -> Any:
    """`total - part` when both are token counts; else `total`, for `token_counts` to judge."""
    if is_amount(total) and is_amount(part):
        return max(int(total) - int(part), 0)
    return total


def takes_input_fidelity(model: str) -> bool:
    """`input_fidelity=high` keeps a draft's composition on the gpt-image-1 family; the `-mini`
    models refuse it, and OpenAI's reference says to omit it for gpt-image-2 and later."""
    return (model == "gpt-image-1" or model.startswith(("gpt-image-1.", "gpt-image-1-"))) and "-mini" not in model


def quality(req: RenderRequest) -> str:
    return req.quality if req.quality in QUALITIES else "high"


class OpenAIImagesEngine(CloudEngine):
    name = "openai"
    key_settings = ("ORCH_OPENAI_API_KEY", "OPENAI_API_KEY")
    optional_prices = frozenset[str]()  # it reads its defaults' keys only
    capabilities = Capabilities(img2img=True, upscale=False, seeds=False, negative_prompt=False,
                                leaves_machine=True, max_width=1536, max_height=1536, size_multiple=1)

    def __init__(self, ctx: EngineContext, client: RemoteClient | None = None) -> None:
        s = ctx.settings
        super().__init__(ctx, s.openai_model, s.openai_api_key, DEFAULT_PRICES, PRICES_AS_OF)
        self.http = self.remote_client(ctx, client, base_url=s.openai_base_url,
                                       headers={"Authorization": f"Bearer {self._key or ''}"})
        self.http.final_answer = quota_exhausted

    def availability(self) -> tuple[bool, str | None]:
        available, why = super().availability()
        ended = SHUT_DOWN.get(self._model)
        if available and ended is not None and today() >= ended:
            return False, (f"OpenAI shut '{self._model}' down on {ended.isoformat()}: set ORCH_OPENAI_MODEL to its "
                           "successor (gpt-image-2.6-*), with its prices in ORCH_PRICES_FILE")
        return available, why

    @property
    def note(self) -> str | None:
        """A model priced by the image alone (the README's successor set-up before token rates were
        asked for) is never routed: said where the operator looks, not only in each job's routing."""
        said = super().note
        if said is None and self.configured:
            missing = [key for key in INPUT_RATES if key not in self._prices.table.get(self._model, {})]
            if missing:
                return (f"no {' or '.join(missing)} for model '{self._model}' (the draft each call sends is billed "
                        "as input tokens): routing skips it until ORCH_PRICES_FILE gives them")
        return said

    def largest_size(self, req: RenderRequest) -> tuple[int, int]:
        """The one of its three sizes it answers the request in, for the storage quota (`orchestrator.quota`)."""
        width, height = image_size(req.width, req.height).split("x")
        return int(width), int(height)

    def estimate(self, req: RenderRequest) -> int:
        size = image_size(req.width, req.height)
        made = tuple(int(side) for side in size.split("x"))
        if made[0] < req.width or made[1] < req.height:
            # Its three sizes are all it makes: a 1536x1536 polish came back 1024x1024, no larger
            # than its source, and paid for. Refused here, routing takes an engine that can.
            raise BadEngineInput(f"{self.name}: makes {size} at most at this aspect, smaller than the "
                                 f"{req.width}x{req.height} asked", retryable=True,
                                 details={"engine": self.name, "width": req.width, "height": req.height})
        per_image = self._prices.millicredits(self._model, f"{quality(req)}-{size}")
        # The draft sent with every call is billed as input tokens, often more than a low-quality
        # image itself (4,500 tokens at gpt-image-1's rate: 4.5 credits against 1.1): without its
        # rate the estimate would hold a fraction of the bill, so the model is not priced.
        image_rate, text_rate = (self._prices.millicredits(self._model, key) for key in INPUT_RATES)
        text_tokens = prompt_tokens(req.prompt)
        per_call = math.ceil((INPUT_IMAGE_TOKENS[size] * image_rate + text_tokens * text_rate) / 1e6)
        # Input is paid per call: one for every MAX_N images, and another for each answer that
        # comes back short (the missing images are asked for again). The hold covers the worst
        # case, a call per image; what was not used is released at capture.
        return req.n * (per_image + per_call)

    def _actual_cost(self, usage: Any) -> int | None:
        """The cost by the answer's tokens, or None (the estimate is captured) when a price is
        missing or a token count is malformed (`unreadable_usage`)."""
        if not isinstance(usage, dict):
            return None
        counts = token_counts(*_counted(usage))
        if counts is None:
            return None
        out_tokens, image_tokens, text_tokens = counts
        try:
            out_rate = self._prices.millicredits(self._model, "output_image_tokens_per_million")
            image_rate = self._prices.millicredits(self._model, "input_image_tokens_per_million")
            text_rate = self._prices.millicredits(self._model, "input_text_tokens_per_million")
        except NoPrice:
            return None
        return math.ceil((out_tokens * out_rate + image_tokens * image_rate + text_tokens * text_rate) / 1e6)

    @staticmethod
    def _prompt(req: RenderRequest) -> str:
        if req.stage == "polish":
            return f"Refine this image in high fidelity, keep composition and content exactly: {req.prompt}"
        return f"Render this draft in high fidelity, keep its composition: {req.prompt}"

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        if req.init_image is None:
            raise BadEngineInput(f"{self.name}: {req.stage} needs a draft image to edit",
                                 details={"engine": self.name})
        size = image_size(req.width, req.height)
        # Bytes, not a file object: a retried send must upload the whole image again.
        draft = await asyncio.to_thread(encode_image, req.init_image, fmt="PNG", max_bytes=MAX_UPLOAD_BYTES)
        images: list[RenderedImage] = []
        bill = TokenBill(_counted)
        asked = Asked(req.n, lambda: self.estimate(req))

        def result() -> RenderResult:
            return bill.result(images, self._model, {"size": size, **PROMPT_AND_IMAGE_ONLY, "quality": quality(req)})

        with paid_calls(images, asked, result):
            while len(images) < req.n:
                count = min(MAX_N, req.n - len(images))
                cancel.raise_if_cancelled()
                progress.state("submitted")
                fields = {
                    "prompt": self._prompt(req),
                    "model": self._model,
                    "size": size,
                    "quality": quality(req),
                    "n": str(count),
                    "output_format": "png",
                }
                if takes_input_fidelity(self._model):
                    fields["input_fidelity"] = "high"
                asked.asking(count)
                with answered_at_cancel(cancel, result):
                    response = await self.send_answered(
                        "POST", "/v1/images/edits", data=fields, files={"image": ("draft.png", draft, "image/png")},
                        cancel=cancel,
                    )
                    request_id = header_request_id(response)
                    if not response.is_success:  # any 2xx is its answer, and may have been billed
                        # Refused: nothing the provider made is named by it, so it is not saved as
                        # accepted work (a job with such work is never taken as surely unbilled).
                        raise self._error(response, request_id)
                    if request_id:
                        bill.request_ids.append(request_id)
                        progress.provider_request(request_id)
                    with reading_an_answer():
                        # Off the event loop: the answer holds n images in base64 (tens of MB to parse).
                        body = await asyncio.to_thread(json_object, response, self.name)
                        await asyncio.to_thread(self._images, body, count, images)
                    cost = self._actual_cost(body.get("usage"))
                    bill.read(body.get("usage"), cost)
                    bill.add(cost)
                    asked.charged(cost)
                progress.step(len(images), req.n)
        return result()

    def _error(self, response: httpx.Response, request_id: str | None) -> EngineError:
        if response.status_code < 400:  # no refusal, whatever its body says: it may have billed
            return self.http.fail(response)
        code = _error_code(response)
        if response.status_code == 400 and code in ("moderation_blocked", "content_policy_violation"):
            return ContentFiltered(
                f"openai blocked the request (moderation): {error_text(response)}",
                details={"engine": self.name, "reason": code, "request_id": request_id},
            )
        if response.status_code == 404 or code == "model_not_found" or (
                response.status_code == 400 and _error(response).get("param") == "model"):
            # A model the API does not take (retired, misspelt) answers 400 naming the `model`
            # parameter too: another engine may take the job, which is not the request's fault.
            return self.model_not_served(response)
        if code in SPENT_UP:
            # Nothing was made; another engine may take the job while someone tops up the account
            # (a spending limit is a 400, which read as the request's own fault: no fallback).
            return EngineUnavailable(f"openai: the account's quota is used up: {error_text(response)}",
                                     details={"engine": self.name, "status": response.status_code, "reason": code})
        error = self.http.fail(response)
        param = _error(response).get("param")
        if response.status_code == 400 and isinstance(param, str) and param in CHOSEN_FIELDS:
            # A field this engine chose for the model refused by it (a successor that takes another
            # size or no `input_fidelity`): not the user's request, so another engine may take it;
            # and the engine set up wrong for its model, which its circuit counts.
            error.retryable = error.engine_fault = True
            error.message += f" (the field '{param}' was chosen for model '{self._model}', ORCH_OPENAI_MODEL)"
        if request_id:  # for the provider's support, as a refusal's own message rarely says enough
            error.details.setdefault("request_id", request_id)
        return error

    def _images(self, body: dict[str, Any], wanted: int, images: list[RenderedImage]) -> None:
        """Decode the answer's images into `images`: one that cannot be read is raised after the
        others of its batch are in, which the job keeps (`paid_calls`), as they were made and billed."""
        data = body.get("data")
        encoded = [d["b64_json"] for d in data if isinstance(d, dict) and d.get("b64_json")] \
            if isinstance(data, list) else []
        if not encoded:
            error = NoImage("openai returned no image", details={"engine": self.name})
            # OpenAI refuses a prompt with a 400 (moderation_blocked): a 200 without an image says the
            # endpoint is not answering as OpenAI does (a gateway's `url`s), which the circuit counts.
            error.engine_fault = True
            raise error
        # The `n` asked for, never more: each decoded image may be 16 MP.
        unreadable: EngineError | None = None
        for item in encoded[:wanted]:
            try:
                images.append(RenderedImage(decode_image(b64decode_tolerant(str(item), self.name), self.name)))
            except EngineError as exc:
                unreadable = unreadable or exc
        if unreadable is not None:
            raise unreadable


def factory(ctx: EngineContext) -> OpenAIImagesEngine:
    return OpenAIImagesEngine(ctx)
