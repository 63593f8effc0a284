"""Stability AI REST v2beta: SD3.5 / Ultra image-to-image and the two upscalers.

Which endpoint a request goes to:

- bridge: `generate/sd3` (`mode=image-to-image`, `model=<stability_model>`), or `generate/ultra`
  when `stability_model` is "ultra"; the draft is the `image`, `req.strength` its strength. These
  take no size: they answer about 1 megapixel in the shape of the image sent. So a draft of another
  shape is sent stretched to the one asked for, what comes back is resized to the size asked for,
  and a size above 1 megapixel is refused before anything is sent (another engine can make it),
  as is an image Stability does not take (beyond 1:2.5 or 2.5:1, the draft's own for an upscale).
- polish to the draft's own size (or smaller): a refine through the bridge endpoint above.
- polish to a larger size (`req.scale`, or a `width`/`height` above the draft's): an upscale. The
  upscalers stop at about 4 megapixels, so a factor above 4 or an output above that is refused
  before anything is sent, leaving it to an engine that can honour it. They choose their output
  size themselves, so what comes back is resized to the size asked for. Then:
  - `req.creativity > 0.35`: creative upscale (asynchronous: a create that returns an id, then
    `GET /v2beta/results/{id}` polls, 202 while working).
  - otherwise: conservative upscale (synchronous), `creativity` clamped to its 0.2-0.5 range.

Every call asks for `Accept: application/json` and decodes `{"image", "finish_reason", "seed"}`
(`{"result", ...}` from the results of an async job), or an answer that is the image's bytes
(`image/*`, or untyped and starting as a PNG, JPEG or WebP does; its seed and finish reason in
headers), which a result poll may give.
A create is never re-sent when it got no answer (it may have been billed); result polls are, since
a GET makes nothing. Stability has no cancel endpoint: a job canceled after the provider took it
may still be billed. Stability does not report what it charged, so `cost_millicredits` is `None`.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Literal

import httpx
from PIL import Image

from orchestrator.errors import (
    BadEngineInput,
    Canceled,
    ContentFiltered,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    NoImage,
)
from tiers._cloud import (
    UNREADABLE_POLLS,
    Asked,
    CanceledFetched,
    CloudEngine,
    answered_at_cancel,
    failed_follows,
    follows_billed,
    paid_calls,
    reading_an_answer,
)
from tiers._http import (
    RemoteClient,
    answer_json,
    error_json,
    error_text,
    header_request_id,
    json_object,
    path_id,
)
from tiers._images import b64decode_tolerant, decode_image, encode_image, shaped_as
from tiers.base import (
    FINISH_REASONS,
    CancelToken,
    Capabilities,
    EngineContext,
    Progress,
    RenderedImage,
    RenderRequest,
    RenderResult,
    provider_seed,
)

# The 10 MiB limit is the whole multipart body's: leave room for the other fields.
MAX_UPLOAD_BYTES = 9 * 1024 * 1024
# Over the rate limit, Stability locks the client out for 60 s (a 429 that may not say so).
RATE_LIMIT_PAUSE = 60.0
# The creative upscaler takes inputs up to about 1 megapixel (unverified): shrink the long side.
CREATIVE_MAX_SIDE = 1024
MAX_SCALE = 4.0
MAX_UPSCALE_PIXELS = 4 * 1024 * 1024
# The least side of an image Stability takes.
MIN_SIDE = 64
# SD3.5 and Ultra answer about 1 megapixel (1024x1024, 1344x768, 1536x640, ...).
MAX_GENERATE_PIXELS = 1024 * 1024
# Every image Stability takes lies between 1:2.5 and 2.5:1 (its API reference, "Image Aspect Ratio").
MAX_ASPECT = 2.5
CREATIVE_THRESHOLD = 0.35
CONSERVATIVE_CREATIVITY = (0.2, 0.5)
CREATIVE_CREATIVITY = (0.1, 0.5)
# What SD3 takes as `cfg_scale`: a request's guidance beyond it (ours go 0 to 30, a local model's
# range) got a 400, which no fallback follows.
SD3_CFG_SCALE = (1.0, 10.0)
MAX_SEED = 4294967294


def stability_seed(seed: int) -> int:
    """The seed sent for `seed`: within 1..4294967294, never 0, which Stability reads as "random"
    (a job pinned to seed 0, or a variation wrapping to it, came out different at each run). A
    seed in that range goes as itself (so a recorded seed makes the image again); the rest wrap
    within it, so that consecutive seeds (a job's variations) stay distinct."""
    return (seed - 1) % MAX_SEED + 1
POLL_INTERVAL = 5.0
FILTERED = "CONTENT_FILTERED"
# The finish reason of a generation that failed (its API reference: SUCCESS | CONTENT_FILTERED | ERROR).
FAILED = "ERROR"
# Credits per output image (1 credit = $0.01; providers.md, Nov 2026). The upscalers are priced as
# models of their own so the prices file can override them like any other model.
PRICES_AS_OF = "2026-11"
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "ultra": {"image": 8.0},
    "core": {"image": 3.0},
    "sd3.5-large": {"image": 6.5},
    "sd3.5-large-turbo": {"image": 4.0},
    "sd3.5-medium": {"image": 3.5},
    "upscale-conservative": {"image": 40.0},
    "upscale-creative": {"image": 60.0},
    "upscale-fast": {"image": 2.0},
}

# Priced (providers.md lists it) but text-to-image only: a bridge or polish cannot use it.
TEXT_ONLY_MODELS = frozenset({"core"})

Operation = Literal["generate", "upscale-conservative", "upscale-creative"]


def upscale_factor(req: RenderRequest) -> float:
    """How much larger than the draft a polish is asked to be: its `scale`, else (a polish given a
    `width`/`height`) the larger ratio of the requested size to the draft's."""
    if req.scale is not None:
        return req.scale
    source = _source_size(req)
    return max(req.width / source[0], req.height / source[1])


def _source_size(req: RenderRequest) -> tuple[int, int]:
    """The draft's size (the size asked for when no draft is known yet)."""
    source = req.source_size or (req.init_image.size if req.init_image is not None else None)
    return (req.width, req.height) if source is None else (source[0], source[1])


def operation(req: RenderRequest) -> Operation:
    if req.stage != "polish" or upscale_factor(req) <= 1.0:
        return "generate"
    return "upscale-creative" if req.creativity > CREATIVE_THRESHOLD else "upscale-conservative"


# Content types that say nothing of what a body is: an image's bytes under one (a proxy's or a
# CDN's default) are known by their first bytes.
UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})


def _whole_image(content: bytes) -> bool | None:
    """Whether `content`, starting as a PNG, JPEG or WebP does, ends as one does too (None: not one of
    those): a body cut short (a proxy ending it early) was taken for the image, failed to decode,
    and the upscale, paid for, was lost where a second look would have found it."""
    if content.startswith(b"\x89PNG\r\n\x1a\n"):
        # Its IEND chunk: decoders stop there and ignore bytes after it (padding, an appended
        # trailer), a PNG so sent was asked for until the poll gave up.
        ended = _png_ended(content)
        return PNG_IEND in content if ended is None else ended
    if content.startswith(b"\xff\xd8\xff"):
        ended = _jpeg_ended(content)
        # A layout this reading does not know: whole when it ends as a JPEG does, as before.
        return content.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9") if ended is None else ended
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return len(content) >= int.from_bytes(content[4:8], "little") + 8
    signatures = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")
    if len(content) < 12 and (content[:4] == b"RIFF" or any(start.startswith(content) for start in signatures)):
        return False  # cut before its signature ended (or, for a WebP, before it said it was one)
    return None


PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # its length (0), type and CRC
# Chunks read before the walk gives up (None: an IEND anywhere is the end, as before): libpng
# writes IDAT chunks of 8 KiB, some 32000 for as large an answer as is read (256 MiB).
PNG_MAX_CHUNKS = 65536


def _png_ended(content: bytes) -> bool | None:
    """Whether a PNG's IEND chunk, whole, comes before `content` ends, found chunk by chunk as
    decoders find it: its bytes anywhere were taken for it, and a PNG holding another in a chunk
    (a thumbnail, as a C2PA manifest may) cut just after that one's IEND for a whole one. False:
    cut before; None: too many chunks to read."""
    at = 8  # after the signature
    for _ in range(PNG_MAX_CHUNKS):
        if at + 8 > len(content):
            return False
        if content[at + 4:at + 8] == b"IEND":
            return content[at:at + 12] == PNG_IEND  # whole, its CRC too (one cut in it, then padded: not)
        at += 12 + int.from_bytes(content[at:at + 4], "big")  # length, type, data, CRC
    return None


# JPEG markers that stand alone, without a length: TEM and RST0-7 (SOI and EOI are read apart).
JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
JPEG_SOS, JPEG_EOI = 0xDA, 0xD9
# In a scan's coded data, the first marker that ends it: an FF followed by neither a stuffed 00, a
# restart marker (or TEM), nor another FF (a fill byte). Found by the regex engine, not a byte at a
# time in Python: a body of fill bytes or restart markers took some 0.4 us a byte, 100 s and more
# for an answer of 256 MiB (`tiers._http.MAX_ANSWER_BYTES`); `_readable`, which runs this, runs in a
# worker thread all the same, as the regex's seconds on such a body held the event loop.
JPEG_SCAN_END = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
JPEG_FILL = re.compile(rb"\xff+")
# Markers read before the walk gives up (None: the old rule judges): a JPEG has tens of them, its
# restart markers read with its scans; a body of thousands of empty segments is bounded so too.
JPEG_MAX_MARKERS = 1024


def _jpeg_ended(content: bytes) -> bool | None:
    """Whether a JPEG's end marker (EOI, FFD9) comes before `content` ends, found as decoders find
    it, so that bytes after it (padding, an appended trailer) are the image's, as they are after a
    PNG's IEND: a body not ending with FFD9 was taken for one cut short. Its marker segments are
    stepped over by their lengths (they hold any bytes, an EXIF thumbnail's own FFD9 among them,
    which would take a JPEG cut after it for a whole one), and a scan's coded data is read to the
    next marker (an FF there is followed by 00, or is a restart marker). Bytes between segments
    that are no marker are skipped, as libjpeg and Pillow skip them (such a JPEG cut after a
    thumbnail's FFD9 was judged by the old rule, and taken for whole). False: cut before its EOI;
    None: not laid out as this reads a JPEG, or too many markers to read."""
    at = 2  # after SOI
    for _ in range(JPEG_MAX_MARKERS):
        at = content.find(b"\xff", at)  # past bytes that are no marker
        if at < 0:
            return False
        fill = JPEG_FILL.match(content, at)
        at = fill.end() - 1 if fill is not None else at  # the last of its fill bytes
        if at + 2 > len(content):
            return False
        marker = content[at + 1]
        if marker == JPEG_EOI:
            return True
        if marker in JPEG_STANDALONE or marker == 0x00:  # FF00 outside a scan: skipped, as decoders do
            at += 2
            continue
        if at + 4 > len(content):
            return False
        length = int.from_bytes(content[at + 2:at + 4], "big")
        if length < 2:
            return None
        at += 2 + length
        if marker == JPEG_SOS:  # the scan's coded data, to the marker that ends it
            end = JPEG_SCAN_END.search(content, at)
            if end is None:
                return False
            at = end.start()
    return None


def _image_bytes(response: httpx.Response) -> bool:
    """Whether an answer is the image itself (`image/*`), as Stability sends one asked `Accept: image/*`
    and may send a finished job's result (providers.md: "200 bytes/JSON done"). Untyped, a PNG,
    JPEG or WebP is one too: its bytes were taken for an unreadable answer, asked twice more, and
    the upscale, paid for, lost. Neither is a body cut short, nor JSON under an image type (a
    proxy's rewrite): read as bytes, both failed to decode, the upscale lost without a second look."""
    kind = str(response.headers.get("content-type", "")).partition(";")[0].strip().lower()
    content = response.content
    whole = _whole_image(content)
    if whole is not None:
        return whole and (kind.startswith("image/") or kind in UNTYPED)
    return kind.startswith("image/") and bool(content) and content.lstrip()[:1] not in (b"{", b"[")


def _readable(response: httpx.Response) -> bool:
    if _image_bytes(response):
        return True
    try:
        return isinstance(answer_json(response), dict)
    except ValueError:
        return False


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A done callback: the outcome of work left to run on is retrieved, whatever it is."""
    if not future.cancelled():
        future.exception()


def _sized_as_asked(image: Image.Image, req: RenderRequest) -> Image.Image:
    """Stability's calls pick their own output size: what comes back is resized to the size asked for."""
    size = (req.width, req.height)
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


class StabilityEngine(CloudEngine):
    name = "stability"
    key_settings = ("ORCH_STABILITY_API_KEY", "STABILITY_API_KEY")
    optional_prices = frozenset[str]()  # it reads its defaults' keys only
    capabilities = Capabilities(img2img=True, upscale=True, seeds=True, negative_prompt=True,
                                leaves_machine=True, max_width=4096, max_height=4096, size_multiple=1)

    def __init__(self, ctx: EngineContext, client: RemoteClient | None = None) -> None:
        s = ctx.settings
        super().__init__(ctx, s.stability_model, s.stability_api_key, DEFAULT_PRICES, PRICES_AS_OF)
        # Seconds between result polls; an attribute so tests can make it zero.
        self.poll_interval = POLL_INTERVAL
        self.http = self.remote_client(ctx, client, base_url=s.stability_base_url,
                                       headers={"authorization": f"Bearer {self._key or ''}",
                                                "accept": "application/json"})
        self.http.rate_limit_pause = RATE_LIMIT_PAUSE

    def availability(self) -> tuple[bool, str | None]:
        if self._model in TEXT_ONLY_MODELS:
            return False, (f"ORCH_STABILITY_MODEL={self._model} has no image-to-image endpoint "
                           "(use sd3.5-large, sd3.5-large-turbo, sd3.5-medium or ultra)")
        return super().availability()

    def _priced_model(self, req: RenderRequest) -> str:
        op = operation(req)
        return self._model if op == "generate" else op

    def estimate(self, req: RenderRequest) -> int:
        """Raises `BadEngineInput` for an upscale beyond the upscalers: routed and held, it was
        accepted (its credits held, `cloud-first` choosing it) only to fail when it ran."""
        self._check_reach(req)
        return req.n * self._prices.millicredits(self._priced_model(req), "image")

    def _check_reach(self, req: RenderRequest) -> None:
        factor = upscale_factor(req)
        # A bridge sends the draft stretched to the size asked; an upscale sends the draft as it is.
        sent = (req.width, req.height) if operation(req) == "generate" else _source_size(req)
        if max(sent) > MAX_ASPECT * min(sent):
            # Stability would refuse it with a 400, read as the request's fault: let routing choose another.
            raise BadEngineInput(
                f"{self.name}: takes images between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1; "
                f"{sent[0]}x{sent[1]} is beyond it",
                details={"engine": self.name, "width": sent[0], "height": sent[1]}, retryable=True,
            )
        if operation(req) == "generate" and req.width * req.height > MAX_GENERATE_PIXELS:
            # It would answer about 1 megapixel, paid, resized up to the size asked: not a render at that size.
            raise BadEngineInput(
                f"{self.name}: {self._model} image-to-image makes about 1 megapixel; {req.width}x{req.height} "
                "is beyond it", details={"engine": self.name, "width": req.width, "height": req.height},
                retryable=True,
            )
        if operation(req) != "generate" and (factor > MAX_SCALE or req.width * req.height > MAX_UPSCALE_PIXELS):
            # Nothing was sent: let routing choose (or fall back to) an engine that can upscale that far.
            raise BadEngineInput(
                f"{self.name}: the upscalers stop at {MAX_SCALE:g}x and about 4 megapixels; "
                f"{req.width}x{req.height} ({factor:g}x) is beyond them",
                details={"engine": self.name, "scale": round(factor, 3), "width": req.width,
                         "height": req.height}, retryable=True,
            )

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        if req.init_image is None:
            raise BadEngineInput(f"{self.name}: {req.stage} needs a draft image",
                                 details={"engine": self.name})
        self._check_reach(req)  # a job routed before a price or a limit changed
        op = operation(req)
        max_side = CREATIVE_MAX_SIDE if op == "upscale-creative" else None
        # Off the event loop: a large draft's PNG takes seconds (see `tiers.gemini`).
        draft = await asyncio.to_thread(self._draft, req.init_image, req, op, max_side)
        images: list[RenderedImage] = []
        request_ids: list[str] = []
        finish_reasons: list[str] = []
        asked = Asked(req.n, lambda: self.estimate(req))

        def result() -> RenderResult:
            return RenderResult(
                images=list(images),
                model=self._priced_model(req),
                cost_millicredits=None,
                provider_request_id=",".join(request_ids) or None,
                metadata={"endpoint": self._path(op), FINISH_REASONS: list(finish_reasons), **self._used(req, op)},
            )

        with paid_calls(images, asked, result):
            for i in range(req.n):
                cancel.raise_if_cancelled()
                progress.state("submitted")
                fields = self._fields(req, op, None if req.seed is None else stability_seed(req.seed + i))
                asked.asking()
                files = {"image": ("draft.png", draft, "image/png")}
                request_id: str | None
                # A generate or conservative upscale is answered with its image: a user's cancel while
                # it is out lets it answer, and keeps that image (`send_answered`).
                with answered_at_cancel(cancel, result):
                    try:
                        if op == "upscale-creative":
                            response, request_id = await self._creative(fields, files, progress, cancel)
                        else:
                            response = await self._send("POST", self._path(op), data=fields, files=files,
                                                        cancel=cancel, kept_at_cancel=True)
                            request_id = header_request_id(response)
                            if request_id and response.is_success:  # a refusal names no work made
                                progress.provider_request(request_id)
                        if request_id:
                            request_ids.append(request_id)
                        if not response.is_success:  # any 2xx is its answer, and may have been billed
                            error = self._error(response)
                            if request_id:  # for the provider's support
                                error.details.setdefault("request_id", request_id)
                            # A creative upscale's final poll failing comes after the provider took the job.
                            raise self._creative_failed(response, error) if op == "upscale-creative" else error
                        with reading_an_answer():
                            image, seed, reason = await self._read(response, req, cancel,
                                                                   followable=op == "upscale-creative")
                    except _CanceledAnswered as exc:
                        if exc.job_id:
                            request_ids.append(exc.job_id)
                        canceled = await self._kept_at_cancel(exc, req, finish_reasons, cancel)
                        if isinstance(canceled, CanceledFetched):
                            images.extend(canceled.images)
                        raise canceled from None
                    images.append(RenderedImage(image, seed=seed))
                    finish_reasons.append(reason)
                progress.step(len(images), req.n)
        return result()

    def _path(self, op: Operation) -> str:
        if op == "upscale-conservative":
            return "/v2beta/stable-image/upscale/conservative"
        if op == "upscale-creative":
            return "/v2beta/stable-image/upscale/creative"
        return "/v2beta/stable-image/generate/" + ("ultra" if self._model == "ultra" else "sd3")

    def _fields(self, req: RenderRequest, op: Operation, seed: int | None) -> dict[str, str]:
        fields = {"prompt": req.prompt, "output_format": "png"}
        if req.negative_prompt:
            fields["negative_prompt"] = req.negative_prompt
        if seed is not None:
            fields["seed"] = str(seed)
        if op == "upscale-conservative":
            fields["creativity"] = f"{_clamp(req.creativity, CONSERVATIVE_CREATIVITY):g}"
        elif op == "upscale-creative":
            fields["creativity"] = f"{_clamp(req.creativity, CREATIVE_CREATIVITY):g}"
        else:
            # A same-size polish is a refine: its denoise is the user's `creativity`, as on every
            # other engine (a polish carries no `strength`, whose default reworked the image at 0.55).
            strength = req.creativity if req.stage == "polish" else req.strength
            fields["strength"] = f"{_clamp(strength, (0.0, 1.0)):g}"
            if self._model != "ultra":
                fields["mode"] = "image-to-image"
                fields["model"] = self._model
                if req.guidance_scale is not None:
                    fields["cfg_scale"] = f"{_clamp(req.guidance_scale, SD3_CFG_SCALE):g}"
        return fields

    def _used(self, req: RenderRequest, op: Operation) -> dict[str, Any]:
        """What the image's record says of the request's parameters: the values sent, as sent (a
        clamped `creativity`, a refine's `creativity` sent as its `strength`); None for those not sent."""
        fields = self._fields(req, op, None)
        sent = {key: float(fields[key]) if key in fields else None for key in ("strength", "creativity", "cfg_scale")}
        if req.stage == "polish" and op == "generate":  # a refine: its denoise is the polish's creativity
            sent["creativity"], sent["strength"] = sent["strength"], None
        return {"negative_prompt": fields.get("negative_prompt", ""), "steps": None, "sampler": None, "quality": None,
                "guidance_scale": sent["cfg_scale"], "strength": sent["strength"], "creativity": sent["creativity"]}

    async def _creative(self, fields: dict[str, str], files: dict[str, Any], progress: Progress,
                        cancel: CancelToken) -> tuple[httpx.Response, str]:
        deadline = self.http.new_deadline()
        created = await self._send(
            "POST", self._path("upscale-creative"), data=fields, files=files, deadline=deadline, cancel=cancel
        )
        if not created.is_success:
            raise self._error(created)
        with reading_an_answer():
            body = json_object(created, self.name)
        job_id = body.get("id")
        if not isinstance(job_id, str) or not job_id:
            # Accepted but unnamed: the job may run and bill, and cannot be found again.
            raise EngineError("stability: the creative upscale answered without an id",
                              details={"engine": self.name}, charged="unknown")
        if path_id(job_id) is None:  # Stability's are 64 hex characters
            # Accepted, but under a name that is not an id: not followed, as one without any.
            raise EngineError(f"stability: the creative upscale answered with {self.said(job_id, 40)!r}, which is "
                              "not an id (letters, digits, '-' and '_'); it is not polled",
                              details={"engine": self.name}, charged="unknown")
        progress.provider_request(job_id, {"creative": True})
        return await self._poll_creative(job_id, deadline, progress, cancel), job_id

    def can_reattach(self, handles: list[dict[str, Any]], req: RenderRequest) -> bool:
        """Only creative upscales run as jobs Stability keeps by id (the other calls answer with
        the image), one per image: all `n` must have been accepted."""
        return len(handles) == req.n and all(h.get("creative") and path_id(h.get("id")) for h in handles)

    async def reattach(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                       cancel: CancelToken) -> RenderResult:
        if not self.can_reattach(handles, req):
            raise EngineError(f"{self.name}: only creative upscales can be followed again, and all {req.n} "
                              f"were not accepted ({len(handles)} saved)",
                              details={"engine": self.name}, charged="unknown")
        images: list[RenderedImage] = []
        finish_reasons: list[str] = []

        def result() -> RenderResult:
            return RenderResult(images=list(images), model=self._priced_model(req), cost_millicredits=None,
                                provider_request_id=",".join(str(h["id"]) for h in handles),
                                metadata={"endpoint": self._path("upscale-creative"),
                                          FINISH_REASONS: list(finish_reasons),
                                          **self._used(req, "upscale-creative")})

        # Every upscale was accepted: a failure of one bills the images made and the failures only.
        asked = Asked(req.n, lambda: self.estimate(req))
        asked.asking(len(handles))
        failures: list[EngineError] = []
        # One for all: they run side by side at Stability, and one that never ends held each next one
        # to a deadline of its own (n times ORCH_REMOTE_DEADLINE); each is still read once past it.
        deadline = self.http.new_deadline()
        # Seconds the reads have past that deadline, all together: each upscale's first read is its
        # image too, and one read with the deadline gone (or nearly) had a single attempt of a
        # second, so one 503 (or a large answer) lost an upscale made and paid for.
        late_reads = self.http.deadline_seconds
        with paid_calls(images, asked, result):
            for i, handle in enumerate(handles):
                job_id = str(handle["id"])
                started = self.http.clock()
                try:
                    response = await self._poll_creative(job_id, deadline, progress, cancel, read_first=True,
                                                         read_by=max(deadline, started + late_reads))
                    if not response.is_success:
                        raise self._creative_failed(response, self._error(response))
                    with reading_an_answer():
                        image, seed, reason = await self._read(response, req, cancel)
                except _CanceledAnswered as exc:
                    canceled = await self._kept_at_cancel(exc, req, finish_reasons, cancel)
                    out = len(handles) - i  # this one and the rest, running on
                    if isinstance(canceled, CanceledFetched) or canceled.work_unbilled:  # this one settled
                        if isinstance(canceled, CanceledFetched):
                            images.extend(canceled.images)
                        out -= 1
                        if out or any(not failure.work_unbilled for failure in failures):
                            canceled.charged = "unknown"  # the rest may have billed: not known
                    follows_billed(asked, len(images), failures, out)
                    raise canceled from None
                except Canceled:
                    # Stability has no cancel: this one and the rest run on, charged as asked; the
                    # failures it said were free are not (the whole estimate was captured).
                    follows_billed(asked, len(images), failures, len(handles) - i)
                    raise
                except EngineError as exc:
                    # Each upscale is a job of its own at Stability: one expired or failed says
                    # nothing of the others, made and billed.
                    failures.append(exc)
                    continue
                finally:
                    late_reads -= max(self.http.clock() - max(started, deadline), 0.0)
                images.append(RenderedImage(image, seed=seed))
                finish_reasons.append(reason)
                progress.step(len(images), req.n)
            if failures:
                raise failed_follows(failures, asked, len(images), "creative upscales")
        return result()

    async def _poll_creative(self, job_id: str, deadline: float, progress: Progress,
                             cancel: CancelToken, *, read_first: bool = False,
                             read_by: float | None = None) -> httpx.Response:
        """Poll a creative upscale the provider accepted until it answers with its result. With
        `read_first` (work accepted long ago), its first poll goes at once, even past `deadline`,
        retried until `read_by` when given."""
        progress.state("polling", provider_id=job_id)
        unreadable = 0
        try:
            while True:
                remaining = deadline - self.http.clock()
                asked_by = deadline
                if read_first:
                    read_first = False
                    asked_by = deadline if read_by is None else read_by
                elif remaining <= 0:
                    raise EngineTimeout(
                        f"{self.name}: creative upscale {job_id} did not finish before the deadline",
                        details={"engine": self.name, "provider_id": job_id},
                    )
                else:
                    # The last wait ends at the deadline, its poll the last one: a whole interval ran
                    # the job up to 5 s past it.
                    await cancel.sleep(min(self.poll_interval, remaining))
                response = await self._fetch_creative(job_id, asked_by, cancel)
                if response.status_code == 202:
                    continue
                if response.status_code == 404:
                    raise EngineError(f"{self.name}: creative upscale {job_id} is unknown or expired",
                                      details={"engine": self.name, "provider_id": job_id}, charged="unknown")
                # Off the event loop: finding a hostile 256 MiB image's end (or reading as much JSON)
                # held it for seconds, every other job's polls and event streams with it.
                if response.is_success and unreadable < UNREADABLE_POLLS - 1:
                    checking = asyncio.ensure_future(asyncio.to_thread(_readable, response))
                    try:
                        readable = await cancel.race(asyncio.shield(checking))
                    except Canceled:
                        # Raced: a hostile answer's check takes seconds, which a cancel waited out.
                        raise _CanceledAnswered(response, checking, job_id, abandon=cancel.abandoned) from None
                    if not readable:
                        # Asked again (kept 24 h): one gateway page lost an upscale made, and paid for.
                        unreadable += 1
                        continue
                return response
        except _CanceledAnswered:
            raise
        except Canceled as exc:
            # The provider has the job and no way to stop it: it may finish and bill.
            raise Canceled(exc.message, details={"engine": self.name, "provider_id": job_id},
                           charged="unknown") from None
        except EngineError as exc:
            # Whatever stopped the polling (a 5xx, a 429, the network), the job runs on and bills.
            exc.at_least_charged("unknown")
            raise

    async def _fetch_creative(self, job_id: str, asked_by: float, cancel: CancelToken) -> httpx.Response:
        """One poll of a creative upscale's result. A user's cancel while it is out lets it end,
        within `output_kept_seconds`: it may be the answer bringing the upscale, made and billed (an
        image of megabytes takes a while), which raises `_CanceledAnswered` for `_kept_at_cancel`
        to keep within what is left of that bound; dropped, it was lost and the job charged
        `unknown`. An answer that the upscale failed, in Stability's own words (which it bills not),
        releases the hold as it does before a cancel; any other answer, or none by then, ends the
        job `unknown`; a cancel abandoning the job (another process polls on) drops the poll at once."""
        polling = asyncio.ensure_future(self._send("GET", f"/v2beta/results/{job_id}", idempotent=True,
                                                   deadline=asked_by))
        try:
            return await cancel.race(asyncio.shield(polling))
        except Canceled:
            if cancel.abandoned:
                raise
            by = cancel.keep(self.output_kept_seconds)  # a stop meanwhile waits for it
            await asyncio.wait({polling}, timeout=self.output_kept_seconds)
            if not polling.done() or polling.cancelled() or polling.exception() is not None:
                raise
            response = polling.result()
            if response.status_code != 404 and not response.is_success:  # 404: expired, charged
                failed = self._creative_failed(response, self._error(response))
                if failed.work_unbilled:
                    # Stability's own word that the upscale failed, which it bills not: the hold is
                    # released (`_kept_at_cancel` settles it), as when that answer came before the cancel.
                    settled: asyncio.Future[tuple[Any, int | None, str]] = asyncio.get_running_loop().create_future()
                    settled.set_exception(failed)
                    raise _CanceledAnswered(response, None, job_id, reading=settled, abandon=False, by=by) from None
            # Still working, or no result: as a cancel between polls. Any other 2xx may bring the
            # upscale, as it does read before the cancel (a 203 of a proxy was lost, charged `unknown`).
            if response.status_code == 202 or not response.is_success:
                raise
            checking = asyncio.ensure_future(asyncio.to_thread(_readable, response))
            raise _CanceledAnswered(response, checking, job_id, abandon=False, by=by) from None
        finally:
            if not polling.done():
                polling.cancel()

    async def _read(self, response: httpx.Response, req: RenderRequest, cancel: CancelToken,
                    *, followable: bool = True) -> tuple[Any, int | None, str]:
        """`_result` in a worker thread (a hostile answer of 256 MiB takes seconds), raced against
        a user's cancel, which raises `_CanceledAnswered` with the reading still under way. Not
        `followable` (a generate or sync upscale call's answer, which Stability keeps no job of), a
        stop's cancel lets the read end: nobody can ask for that image after the restart."""
        reading = asyncio.ensure_future(asyncio.to_thread(self._result, response, req))
        try:
            return await cancel.race(asyncio.shield(reading))
        except Canceled:
            if reading.done():  # read in the same instant
                return reading.result()
            if cancel.abandoned and not followable:
                return await reading
            raise _CanceledAnswered(response, None, reading=reading, abandon=cancel.abandoned) from None

    async def _kept_at_cancel(self, exc: _CanceledAnswered, req: RenderRequest,
                              finish_reasons: list[str], cancel: CancelToken) -> Canceled:
        """The error a job ends with on a user's cancel met while an answer of work made (and billed)
        was checked or read: its image kept when that ends within `output_kept_seconds`
        (`CanceledFetched`, charged "yes", as an output a cancel finds downloading is), its finish
        reason added to `finish_reasons` as a read before the cancel adds it; else the
        cancel as it was, charged "unknown", the work left to the thread (it cannot be stopped).
        A cancel abandoning the job (another process follows it on) keeps nothing."""
        checked, response = exc.checked, exc.response

        async def read() -> tuple[Any, int | None, str] | None:
            if exc.reading is not None:
                return await exc.reading
            if checked is not None and not await checked:
                return None  # unreadable: it would have been asked again
            return await asyncio.to_thread(self._result, response, req)

        reading = asyncio.ensure_future(read())
        if not exc.abandon:
            # One bound from the cancel: what the poll it met left of it (`_fetch_creative`), or all.
            left = self.output_kept_seconds if exc.by is None else exc.by - asyncio.get_running_loop().time()
            cancel.keep(left)  # a stop meanwhile waits for it
            await asyncio.wait({reading}, timeout=max(left, 0.0))
        if not reading.done():
            reading.cancel()
            # Cancelled before it awaited them (a stop's), the check and the read run on in their
            # threads: what they raise is retrieved, not logged as an ERROR never retrieved.
            running_on: list[asyncio.Future[Any] | None] = [exc.checked, exc.reading]
            for unread in running_on:
                if unread is not None:
                    unread.add_done_callback(_retrieved)
            return Canceled(exc.message, details={"engine": self.name}, charged="unknown")
        failed = None if reading.cancelled() else reading.exception()
        answered = None if reading.cancelled() or failed is not None else reading.result()
        if answered is None:
            canceled = Canceled(exc.message, details={"engine": self.name}, charged="unknown")
            # An answer saying the generation failed (finish reason ERROR), which Stability bills
            # not: the hold is released, as when that answer was read before the cancel.
            if isinstance(failed, EngineError) and failed.work_unbilled:
                canceled.unbilled()
            return canceled
        image, seed, reason = answered
        finish_reasons.append(reason)
        return CanceledFetched([RenderedImage(image, seed=seed)])

    async def _send(self, method: str, url: str, *, kept_at_cancel: bool = False, **kwargs: Any) -> httpx.Response:
        """`kept_at_cancel`: a call answered with its image (`CloudEngine.send_answered`)."""
        # Stability answers a bad key with 401 and content moderation with 403, which its body
        # tells from the 403 of a permission or a blocked network (`_error`).
        if kept_at_cancel:
            return await self.send_answered(method, url, answered=(403,), **kwargs)
        return await self.http.request(method, url, answered=(403,), **kwargs)

    def _draft(self, image: Image.Image, req: RenderRequest, op: Operation, max_side: int | None) -> bytes:
        source = shaped_as(image, req.width, req.height, MIN_SIDE) if op == "generate" else image
        if op == "generate" and max(source.size) > MAX_ASPECT * min(source.size):
            # A draft within shaped_as's 1% of a shape at the edge, itself past it (1288x512 for
            # 1280x512): sent as the size asked, which `_check_reach` has held within Stability's range.
            source = source.resize((req.width, req.height), Image.Resampling.LANCZOS)
        return encode_image(source, fmt="PNG", max_bytes=MAX_UPLOAD_BYTES, max_side=max_side)

    def _result(self, response: httpx.Response, req: RenderRequest) -> tuple[Any, int | None, str]:
        """The image (at the size asked), its seed and the finish reason of an answer: JSON, or the
        image's bytes with its seed and finish reason in headers."""
        body = {} if _image_bytes(response) else json_object(response, self.name)
        reason = str(body.get("finish_reason") or response.headers.get("finish-reason") or "SUCCESS")
        if FILTERED in (reason, response.headers.get("finish-reason")):
            # The provider made (and may bill) a blurred image.
            raise ContentFiltered(f"{self.name}: the output was content filtered",
                                  details={"engine": self.name, "reason": FILTERED}, charged="unknown")
        if FAILED in (reason, response.headers.get("finish-reason")):
            # Whatever came with it (an image, or none), the generation failed, and Stability bills
            # no failed generation (providers.md): an image so answered was stored and its hold
            # captured. Nothing is kept, and the hold is released; another engine may take the job.
            raise EngineError(f"{self.name}: the generation failed (finish_reason {FAILED}); Stability does not "
                              "bill a failed generation", details={"engine": self.name, "reason": FAILED}).unbilled()
        # The generate and sync upscale calls answer `image`; the results of an async job
        # (`GET /v2beta/results/{id}`) answer `result`.
        encoded = body.get("image") or body.get("result")
        if _image_bytes(response) and response.content:
            encoded = None
        elif not isinstance(encoded, str) or not encoded:
            error = NoImage(f"{self.name} returned no image (finish_reason {self.said(reason)})",
                            details={"engine": self.name, "reason": self.said(reason)})
            # Its filter says CONTENT_FILTERED: an empty 200 for no reason is the endpoint unwell.
            error.engine_fault = True
            raise error
        raw = response.content if encoded is None else b64decode_tolerant(encoded, self.name)
        image = decode_image(raw, self.name)
        seed = body.get("seed", response.headers.get("seed"))
        try:
            seed = int(seed) if isinstance(seed, str) else seed  # a header's text
        except ValueError:
            seed = None
        # Kept in the result (`FINISH_REASONS`), and so in the image's record: the provider's
        # words, so short and without our key, as an error quotes them.
        return _sized_as_asked(image, req), provider_seed(seed), self.said(reason)

    def _creative_failed(self, response: httpx.Response, error: EngineError) -> EngineError:
        """`error`, for a creative upscale's result answered `response`, a failure: unbilled when
        Stability's own error body says the upscale failed (a 400 or 422 naming its errors, or its
        content moderation's 403), as Stability charges nothing for a failed generation
        (providers.md); else (a proxy's page, a 403 of the key) charged `unknown`, as the provider
        took the job and may have made it. It was captured for reconciliation every time."""
        try:
            body = error_json(response)
        except ValueError:
            body = None
        said = isinstance(body, dict) and isinstance(body.get("errors"), list)
        if said and (response.status_code in (400, 422) or (response.status_code == 403 and isinstance(body, dict)
                                                                and body.get("name") == "content_moderation")):
            return error.unbilled()
        return error.at_least_charged("unknown")

    def _error(self, response: httpx.Response) -> EngineError:
        if response.status_code < 400:  # no refusal, whatever its body says: it may have billed
            return self.http.fail(response)
        try:
            body = error_json(response)
        except ValueError:
            body = None
        status = response.status_code
        if isinstance(body, dict) and body.get("name") == "content_moderation":
            return ContentFiltered(f"{self.name} refused the request (content moderation)",
                                   details={"engine": self.name, "reason": "content_moderation", "status": status})
        # Refusals of the account, not of the request: another engine may well take the job.
        details = {"engine": self.name, "status": status}
        if status == 402:
            return EngineUnavailable(f"{self.name} refused to bill the account (HTTP 402): {error_text(response)}; "
                                     "check its credits", details=details)
        if status == 403:
            return EngineUnavailable(f"{self.name} refused the request (HTTP 403): {error_text(response)}; check "
                                     f"{self.http.key_setting} and the account's permissions",
                                     details={**details, "setting": self.http.key_setting})
        if status == 404:
            return EngineUnavailable(f"{self.name} has no such endpoint (HTTP 404, {response.request.url.path}): "
                                     f"{error_text(response)}; check ORCH_STABILITY_BASE_URL", details=details)
        return self.http.fail(response)


class _CanceledAnswered(Canceled):
    """A user's cancel met while an answer of work made was checked (`checked`: `_readable`) or
    read (`reading`: `_result`), in a worker thread; `StabilityEngine._kept_at_cancel` judges it."""

    def __init__(self, response: httpx.Response, checked: asyncio.Future[bool] | None, job_id: str | None = None,
                 *, reading: asyncio.Future[tuple[Any, int | None, str]] | None = None, abandon: bool,
                 by: float | None = None) -> None:
        super().__init__("the job was canceled while the provider's answer was read", charged="unknown")
        self.response, self.checked, self.reading, self.job_id = response, checked, reading, job_id
        self.abandon = abandon  # another process follows the work on
        self.by = by  # the event loop's time the check and read must end by (None: the whole bound from now)


def factory(ctx: EngineContext) -> StabilityEngine:
    return StabilityEngine(ctx)
