"""Google Gemini image models ("Nano Banana" family) through `generateContent`.

Bridge sends the draft as an inline image beside the prompt; polish asks for a larger
`imageSize`. Synchronous: a call that was sent but got no answer is never re-sent (it may have
been billed). Cost comes from `usageMetadata` tokens x the configured token prices.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx

from orchestrator.errors import (
    BadEngineInput,
    ContentFiltered,
    EngineError,
    EngineUnavailable,
    NoImage,
    NoPrice,
    RateLimited,
)
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
from tiers._http import RemoteClient, answer_json, error_json, error_text, text_encoding
from tiers._images import (
    b64decode_tolerant,
    b64encode,
    class_bound,
    decode_image,
    encode_image,
    nearest_aspect,
    size_class,
)
from tiers.base import (
    FINISH_REASONS,
    PROMPT_AND_IMAGE_ONLY,
    CancelToken,
    Capabilities,
    EngineContext,
    Progress,
    RenderedImage,
    RenderRequest,
    RenderResult,
    instruction_prompt,
)

ASPECTS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9")
FILTER_REASONS = frozenset(
    {"IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "SAFETY",
     "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION"}
)
# Credits (1 credit = $0.01) per output image by imageSize, and per 1M tokens (providers.md, Nov 2026).
PRICES_AS_OF = "2026-11"
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gemini-3.1-flash-image": {"1K": 6.7, "2K": 10.1, "4K": 15.1,
                               "output_tokens_per_million": 6000, "input_tokens_per_million": 50},
    "gemini-3-pro-image": {"1K": 13.4, "2K": 13.4, "4K": 24.0,
                           "output_tokens_per_million": 12000, "input_tokens_per_million": 200},
    "gemini-2.5-flash-image": {"1K": 3.9, "2K": 3.9, "4K": 3.9,
                               "output_tokens_per_million": 3000, "input_tokens_per_million": 30},
}
# Prices a prices file may add that no model has by default (see `_actual_cost`).
OPTIONAL_PRICES = frozenset({"thinking_tokens_per_million"})
INPUT_IMAGE_TOKENS = 1120
# Output tokens held per image beyond its table price: the answer's text part, and images that come
# out larger than the token count the price was computed from (providers.md's 1K example bills
# 1290 tokens against the 1120 of its price). What was not used is released at capture.
OUTPUT_TOKEN_ALLOWANCE = 256
MAX_INLINE_BYTES = 7 * 1024 * 1024


class GeminiEngine(CloudEngine):
    name = "gemini"
    key_settings = ("ORCH_GEMINI_API_KEY", "GEMINI_API_KEY")
    optional_prices = OPTIONAL_PRICES
    capabilities = Capabilities(img2img=True, upscale=True, seeds=False, negative_prompt=False,
                                leaves_machine=True, max_width=4096, max_height=4096, size_multiple=1)

    def __init__(self, ctx: EngineContext, client: RemoteClient | None = None) -> None:
        s = ctx.settings
        super().__init__(ctx, s.gemini_model, s.gemini_api_key, DEFAULT_PRICES, PRICES_AS_OF)
        self.http = self.remote_client(ctx, client, base_url=s.gemini_base_url,
                                       headers={"x-goog-api-key": self._key or ""})
        self.http.final_answer = lambda response: daily_quota_exhausted(response) or credits_depleted(response)
        self.http.timed_out = google_deadline_exceeded

    def estimate(self, req: RenderRequest) -> int:
        size = size_class(req.width, req.height)
        if size != "1K" and not self._sized():
            # The 2.5 model takes no imageSize and answers about 1K whatever was asked: a 2K
            # polish came back at its source's size. Refused here, routing takes an engine that can.
            raise BadEngineInput(f"{self.name}: {self._model} makes images of about 1024 px on the long side, "
                                 f"smaller than the {req.width}x{req.height} asked", retryable=True,
                                 details={"engine": self.name, "width": req.width, "height": req.height})
        per_image = self._prices.millicredits(self._model, size) + self._output_allowance()
        input_tokens = INPUT_IMAGE_TOKENS + prompt_tokens(req.prompt)
        per_input = math.ceil(input_tokens * self._token_rate("input_tokens_per_million") / 1e6)
        return req.n * (per_image + per_input)

    def largest_size(self, req: RenderRequest) -> tuple[int, int]:
        """Google picks the size within the class asked (the 2.5 model's is 1K): the largest of
        any of its aspect ratios, for the storage quota (`orchestrator.quota`)."""
        return class_bound(size_class(req.width, req.height) if self._sized() else "1K")

    def _sized(self) -> bool:
        """Whether the model takes `imageSize` (1K/2K/4K): the Gemini 3 image models; the earlier
        ones make 1K only."""
        return self._model.startswith("gemini-3")

    def _output_allowance(self) -> int:
        return math.ceil(OUTPUT_TOKEN_ALLOWANCE * self._token_rate("output_tokens_per_million") / 1e6)

    def _token_rate(self, key: str) -> int:
        """A token price in millicredits per million, 0 for a price file that gives per-image
        prices only (a new model priced from its page): the per-image price is then the estimate."""
        try:
            return self._prices.millicredits(self._model, key)
        except NoPrice:
            return 0

    def _actual_cost(self, usage: Any) -> int | None:
        """The cost by the answer's tokens, or None (the estimate is captured) when a price is
        missing or a token count is malformed (`unreadable_usage`). Thinking tokens are billed as
        output at the model's text rate, which the image rate would overstate: without a
        `thinking_tokens_per_million` price an answer that thought is charged its estimate rather
        than a sum that leaves them out."""
        if not isinstance(usage, dict):
            return None
        counts = token_counts(*_counted(usage))
        if counts is None:
            return None
        out_tokens, in_tokens, thoughts = counts
        try:
            out_rate = self._prices.millicredits(self._model, "output_tokens_per_million")
            in_rate = self._prices.millicredits(self._model, "input_tokens_per_million")
            thought_rate = self._prices.millicredits(self._model, "thinking_tokens_per_million") if thoughts else 0
        except NoPrice:
            return None
        return math.ceil((out_tokens * out_rate + in_tokens * in_rate + thoughts * thought_rate) / 1e6)

    def _body(self, req: RenderRequest) -> dict[str, Any]:
        width, height = req.width, req.height
        parts: list[dict[str, Any]] = [{"text": instruction_prompt(req)}]
        if req.init_image is not None:
            data = encode_image(req.init_image, fmt="PNG", max_bytes=MAX_INLINE_BYTES, max_side=2048)
            parts.append({"inline_data": {"mime_type": "image/png", "data": b64encode(data)}})
        image_config: dict[str, Any] = {"aspectRatio": nearest_aspect(width, height, ASPECTS)}
        if self._sized():
            image_config["imageSize"] = size_class(width, height)
        return {
            "contents": [{"parts": parts}],
            "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": image_config},
        }

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        images: list[RenderedImage] = []
        finish_reasons: list[str | None] = []  # each image's candidate's `finishReason`
        bill = TokenBill(_counted)
        asked = Asked(req.n, lambda: self.estimate(req))

        def result() -> RenderResult:
            return bill.result(images, self._model,
                               {"image_size": size_class(req.width, req.height), FINISH_REASONS: list(finish_reasons),
                                **PROMPT_AND_IMAGE_ONLY})

        with paid_calls(images, asked, result):
            # Encoded once, off the event loop: a 2048 draft's PNG took seconds, and the API, every
            # event stream and the lease renewals stood still meanwhile.
            sent = await asyncio.to_thread(self._body, req)
            for _ in range(req.n):
                cancel.raise_if_cancelled()
                progress.state("submitted")
                asked.asking()
                with answered_at_cancel(cancel, result):
                    response = await self.send_answered(
                        "POST", f"/v1beta/models/{self._model}:generateContent", json=sent, cancel=cancel
                    )
                    if not response.is_success:  # any 2xx is its answer, and may have been billed
                        raise self._refusal(response)
                    with reading_an_answer():
                        # Off the event loop: the answer holds the image in base64 (megabytes to parse).
                        body = await asyncio.to_thread(self._json, response)
                        if body.get("responseId"):
                            bill.request_ids.append(str(body["responseId"]))
                            progress.provider_request(str(body["responseId"]))
                        usage = body.get("usageMetadata") or {}
                        cost = self._actual_cost(usage)
                        bill.read(usage, cost)
                        try:
                            image, reason = await asyncio.to_thread(self._image, body)
                        except EngineError as exc:
                            # An answer without an image (text only, NO_IMAGE, an image its safety filter
                            # withheld) is billed by its tokens as one with: its usage says the cost, not
                            # the image's whole estimate. Only when every earlier call's is known too
                            # (else `paid_calls` captures a share). A prompt blocked before anything was
                            # generated reports no output tokens and is not billed.
                            made = not isinstance(exc, ContentFiltered) or _generated(usage)
                            if made and cost is not None and bill.total is not None:
                                exc.charged, exc.cost_millicredits = "yes", bill.total + cost
                            elif made:  # billed, by how much unknown (thinking tokens unpriced, a count malformed)
                                exc.at_least_charged("unknown")
                            raise
                        images.append(RenderedImage(image))
                        finish_reasons.append(reason)
                    bill.add(cost)
                    asked.charged(cost)
                progress.step(len(images), req.n)
        return result()

    def _refusal(self, response: httpx.Response) -> EngineError:
        """The error for a generation call's answer that is not a 2xx: nothing was made."""
        # Not `response.text`, which raised for a charset that names no text encoding.
        text = response.content.decode(text_encoding(response), errors="replace")
        if credits_depleted(response):  # the account's, not a rate: another engine may serve
            return EngineUnavailable(f"gemini: the account's prepaid credits are used up: "
                                    f"{error_text(response)}", details={"engine": self.name, "status": 429})
        if response.status_code == 429:  # a per-day quota: final until it resets
            return RateLimited(f"gemini: the daily quota is used up: {error_text(response)}",
                              details={"engine": self.name, "status": 429, "daily_quota": True})
        if response.status_code == 400 and "API key" in text:
            return EngineUnavailable(
                "gemini refused the API key: check ORCH_GEMINI_API_KEY (or GEMINI_API_KEY)",
                details={"engine": self.name, "status": 400},
            )
        if response.status_code == 404:  # "models/x is not found": retired or misspelt
            return self.model_not_served(response)
        if response.status_code == 400 and _google_status(response) == "FAILED_PRECONDITION":
            # The account's (billing, a region without the API), not the request's: another
            # engine may serve it.
            return EngineUnavailable(f"gemini cannot be used with this account now: {error_text(response)}",
                                    details={"engine": self.name, "status": 400})
        return self.http.fail(response)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = answer_json(response)
        except ValueError:
            raise EngineError(f"gemini: the provider answered {response.status_code} with a body that is not JSON",
                              details={"engine": self.name, "status": response.status_code}) from None
        if isinstance(body, list) and body:
            body = body[0]
        if not isinstance(body, dict):
            raise EngineError("gemini: unexpected response shape",
                              details={"engine": self.name, "status": response.status_code})
        return body

    def _image(self, body: dict[str, Any]) -> tuple[Any, str | None]:
        """The answer's image and its candidate's `finishReason` (None where it gives none), or
        the error an answer without one is."""
        feedback = body.get("promptFeedback") or {}
        if not isinstance(feedback, dict):
            raise self._malformed("promptFeedback")
        if feedback.get("blockReason"):
            blocked = self.said(feedback["blockReason"])
            raise ContentFiltered(f"gemini blocked the prompt ({blocked})",
                                  details={"engine": self.name, "reason": blocked})
        candidates = body.get("candidates") or []
        if not isinstance(candidates, list):
            raise self._malformed("candidates")
        if not candidates:  # an empty result, said with a 200: the model's answer (providers.md)
            raise NoImage("gemini returned no image (the response has no candidates)",
                          details={"engine": self.name, "reason": None})
        candidate = candidates[0]
        if not isinstance(candidate, dict):
            raise self._malformed("candidates")
        content = candidate.get("content") or {}
        parts = (content.get("parts") or []) if isinstance(content, dict) else None
        if not isinstance(parts, list):
            raise self._malformed("content")
        images = [p for p in parts if isinstance(p, dict) and (p.get("inlineData") or p.get("inline_data"))
                  and not p.get("thought")]
        if images:
            inline = images[-1].get("inlineData") or images[-1].get("inline_data")
            if not isinstance(inline, dict):
                raise self._malformed("inlineData")
            image = decode_image(b64decode_tolerant(str(inline.get("data", "")), self.name), self.name)
            said = candidate.get("finishReason")
            # The provider's word, so short and without our key, as an error quotes it.
            return image, (self.said(said) if isinstance(said, str) and said else None)
        reason = candidate.get("finishReason") or ""
        if not isinstance(reason, str):  # a list or an object: no reason, and unhashable for the lookup
            raise self._malformed("finishReason")
        if reason in FILTER_REASONS:
            raise ContentFiltered(f"gemini returned no image ({reason})",
                                  details={"engine": self.name, "reason": reason})
        told = self.said(reason)
        raise NoImage(f"gemini returned no image (finishReason {told or 'missing'})",
                      details={"engine": self.name, "reason": told or None})

    def _malformed(self, where: str) -> EngineError:
        # Raised while reading a 200 (`reading_an_answer`): the call may have been billed.
        return EngineError(f"gemini: unexpected response shape ({where})", details={"engine": self.name})


def _counted(usage: dict[str, Any]) -> tuple[Any, ...]:
    """The token counts a usage block gives, as given: output, prompt, thinking."""
    return usage.get("candidatesTokenCount"), usage.get("promptTokenCount", 0), usage.get("thoughtsTokenCount", 0)


def _generated(usage: Any) -> bool:
    """Whether an answer's usage reports output tokens: something was generated, and billed,
    even if the safety filter withheld it."""
    out = usage.get("candidatesTokenCount") if isinstance(usage, dict) else None
    return isinstance(out, int) and not isinstance(out, bool) and out > 0


def daily_quota_exhausted(response: Any) -> bool:
    """A 429 whose QuotaFailure names a per-day quota: retrying before the reset only burns the
    deadline, while routing could already use another engine."""
    if response.status_code != 429:
        return False
    # A gateway's 429 may say anything (`{"error": "Too many requests"}`): only Google's shape is read.
    error = _google_error(response)
    details = error.get("details") if error is not None else None
    for detail in details if isinstance(details, list) else []:
        violations = detail.get("violations") if isinstance(detail, dict) else None
        for violation in violations if isinstance(violations, list) else []:
            if not isinstance(violation, dict):
                continue
            quota = f"{violation.get('quotaId', '')} {violation.get('quotaMetric', '')}".lower()
            if "perday" in quota or "per_day" in quota:
                return True
    return False


def credits_depleted(response: Any) -> bool:
    """A 429 saying the account's prepaid credits are spent ("Your prepayment credits are
    depleted"): no wait cures it, and retried until half the deadline it held every job two
    minutes before falling back, told as a rate limit."""
    if response.status_code != 429:
        return False
    error = _google_error(response)
    message = str(error.get("message", "")).lower() if error is not None else ""
    return "credits are depleted" in message or "prepayment credits" in message


def google_deadline_exceeded(response: httpx.Response) -> bool:
    """Google's own 504 `DEADLINE_EXCEEDED`: its model did not finish in its time. Retried (Google
    bills no error answer), and once that outlasts the deadline the job's error is `timeout`.
    A 504 in another shape (a proxy's page) stays an engine error."""
    return response.status_code == 504 and _google_status(response) == "DEADLINE_EXCEEDED"


def factory(ctx: EngineContext) -> GeminiEngine:
    return GeminiEngine(ctx)


def _google_error(response: Any) -> dict[str, Any] | None:
    """The `error` object of a Google error body (sometimes wrapped in a one-element list). Read up
    to `error_json`'s bound: Google's is a few hundred bytes, and one of megabytes was parsed whole
    on the event loop for each look (a 429's daily quota, then its credits)."""
    try:
        body = error_json(response)
    except ValueError:
        return None
    if isinstance(body, list) and body:
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def _google_status(response: httpx.Response) -> str | None:
    status = (_google_error(response) or {}).get("status")
    return status if isinstance(status, str) else None
