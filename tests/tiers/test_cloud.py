"""What the five paid cloud engines share (tiers/_cloud.py): unavailable without a key, saying
which settings hold it; model and prices from the settings and the prices file."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import httpx
import pytest
import respx
from sqlmodel import col, select

from orchestrator.db import Database
from orchestrator.errors import Canceled, EngineError, EngineTimeout, NoPrice
from orchestrator.ledger import Ledger
from orchestrator.models import Job, LedgerEntry, Project
from tests.tiers.conftest import BlockingSleep, HeldRequest, NoAnswer, bridge, canceled_while_out
from tiers._cloud import Asked, paid_calls, token_counts
from tiers.base import MAX_AMOUNT, CancelToken, NullProgress, PriceTable, before_billable_sends
from tiers.fal import FalEngine
from tiers.gemini import GeminiEngine
from tiers.openai_images import OpenAIImagesEngine
from tiers.replicate import ReplicateEngine
from tiers.stability import StabilityEngine

# The engines under test: built from the context alone, each with its `run` (CloudEngine, their base, has neither).
CloudClass = type[GeminiEngine | OpenAIImagesEngine | StabilityEngine | ReplicateEngine | FalEngine]
CASES = [
    (GeminiEngine, "gemini", "no API key: set ORCH_GEMINI_API_KEY or GEMINI_API_KEY"),
    (OpenAIImagesEngine, "openai", "no API key: set ORCH_OPENAI_API_KEY or OPENAI_API_KEY"),
    (StabilityEngine, "stability", "no API key: set ORCH_STABILITY_API_KEY or STABILITY_API_KEY"),
    (ReplicateEngine, "replicate", "no API token: set ORCH_REPLICATE_API_KEY or REPLICATE_API_TOKEN"),
    (FalEngine, "fal", "no API key: set ORCH_FAL_API_KEY or FAL_KEY"),
]


@pytest.mark.parametrize(("cls", "prefix", "reason"), CASES, ids=[c[1] for c in CASES])
async def test_a_key_makes_the_engine_available(make_ctx: Any, cls: CloudClass, prefix: str,
                                                reason: str) -> None:
    without = cls(make_ctx(**{f"{prefix}_api_key": None}))
    assert without.availability() == (False, reason)
    with_key = cls(make_ctx(**{f"{prefix}_api_key": "k-secret"}))
    assert with_key.availability() == (True, None)
    assert with_key.kind == "remote" and with_key.stages == frozenset({"bridge", "polish"})
    # The 401/403 message names both settings, never the key.
    assert with_key.http.key_setting.startswith(f"ORCH_{prefix.upper()}_API_KEY (or ")
    await without.aclose()
    await with_key.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
@pytest.mark.parametrize("key", ["k\u2019secret", "k-se\ncret", "k-secret\u200b", "k secret", "k-se\u2028cret",
                                 "k-se\u202ecret"])
async def test_a_key_no_header_can_carry_makes_the_engine_unavailable(
        make_ctx: Any, cls: CloudClass, prefix: str, key: str) -> None:
    # Every request would fail before it left; routing must not pick the engine and hold credits.
    engine = cls(make_ctx(**{f"{prefix}_api_key": key}))
    available, reason = engine.availability()
    assert available is False and reason is not None
    assert reason.startswith(f"the {cls.key_noun} in ORCH_{prefix.upper()}_API_KEY (or ")
    assert "cannot carry" in reason and "secret" not in reason and "cret" not in reason
    await engine.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
@pytest.mark.parametrize("key", ['"k-secret"', "'k-secret'"])
async def test_a_key_in_quotes_an_env_file_kept_makes_the_engine_unavailable(
        make_ctx: Any, cls: CloudClass, prefix: str, key: str) -> None:
    # Every call was refused (401) by the provider; the start is not refused for it (the vendor's
    # own variable, FAL_KEY say, may hold it), the engine says why it is off.
    engine = cls(make_ctx(**{f"{prefix}_api_key": key}))
    available, reason = engine.availability()
    assert available is False and reason is not None and "wrapped in quotes" in reason and "secret" not in reason
    await engine.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
async def test_a_byte_order_mark_and_surrounding_whitespace_are_dropped(
        make_ctx: Any, cls: CloudClass, prefix: str) -> None:
    engine = cls(make_ctx(**{f"{prefix}_api_key": "\ufeff k-secret\r\n"}))
    assert engine.availability() == (True, None)
    await engine.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
async def test_model_and_prices_come_from_the_settings(make_ctx: Any, cls: CloudClass, prefix: str) -> None:
    default = cls(make_ctx())
    model = default.model
    assert model and model in default.prices()["credits_per_image"]
    variant = next(iter(default.prices()["credits_per_image"][model]))
    # A key the engine reads is the prices file's; one it does not is read by nobody, and not listed.
    overrides = {prefix: {model: {variant: 1.5, "custom-variant": 2.5}}}
    ctx = make_ctx(**{f"{prefix}_model": model})
    ctx.price_overrides.update(overrides)
    priced = cls(ctx)
    table = priced.prices()
    assert table["credits_per_image"][model][variant] == 1.5
    assert "custom-variant" not in table["credits_per_image"][model]
    assert table["as_of"] == default.prices()["as_of"]
    await default.aclose()
    await priced.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
async def test_a_model_without_a_price_is_told_at_start_and_in_the_engine_list(
        make_ctx: Any, cls: CloudClass, prefix: str) -> None:
    # Routing skips it (an unknown price is never free): available, with no word of why, every
    # job went to another engine.
    default = cls(make_ctx(**{f"{prefix}_api_key": "k"}))
    typo = cls(make_ctx(**{f"{prefix}_api_key": "k", f"{prefix}_model": "acme/imagen-typo"}))
    assert default.note is None
    assert typo.note is not None and "no price for model 'acme/imagen-typo'" in typo.note
    assert f"ORCH_{prefix.upper()}_MODEL" in typo.note and "ORCH_PRICES_FILE" in typo.note
    ctx = make_ctx(**{f"{prefix}_api_key": "k", f"{prefix}_model": "acme/imagen-typo"})
    # OpenAI's model needs its input token rates too (the draft each call sends is billed by them).
    rates = {"input_image_tokens_per_million": 1000, "input_text_tokens_per_million": 500} if prefix == "openai" else {}
    ctx.price_overrides.update({prefix: {"acme/imagen-typo": {"1K": 4.0, **rates}}})
    priced = cls(ctx)
    assert priced.note is None
    off = cls(make_ctx(**{f"{prefix}_api_key": None, f"{prefix}_model": "acme/imagen-typo"}))
    assert off.note is None  # not set up: nothing to say of its model
    for engine in (default, typo, priced, off):
        await engine.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
async def test_a_job_canceled_before_it_is_sent_sends_nothing(make_ctx: Any, cls: CloudClass,
                                                              prefix: str) -> None:
    engine = cls(make_ctx(**{f"{prefix}_api_key": "k-secret"}))
    token = CancelToken()
    token.cancel()
    with respx.mock(assert_all_called=False) as mock:
        anything = mock.route().mock(return_value=httpx.Response(500))
        with pytest.raises(Canceled):
            await engine.run(bridge(), NullProgress(), token)
    assert anything.call_count == 0
    await engine.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
async def test_a_cancel_while_rate_limited_releases_what_was_held(make_ctx: Any, cls: CloudClass,
                                                                  prefix: str) -> None:
    """Canceled in the wait after a 429: the provider made nothing, so the job owes nothing
    (`charged="no"`: the ledger releases the hold instead of capturing it unreconciled)."""
    engine = cls(make_ctx(**{f"{prefix}_api_key": "k-secret"}))
    back_off = BlockingSleep()
    engine.http.sleep = back_off
    token = CancelToken()
    with respx.mock(assert_all_called=False) as mock:
        anything = mock.route().mock(return_value=httpx.Response(429, headers={"retry-after": "5"}))
        run = asyncio.create_task(engine.run(bridge(), NullProgress(), token))
        await asyncio.wait_for(back_off.entered.wait(), 5)
        token.cancel()
        with pytest.raises(Canceled) as info:
            await run
    assert info.value.charged == "no" and anything.call_count == 1
    await engine.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
async def test_a_cancel_while_the_generation_call_is_out_may_have_been_charged(
        make_ctx: Any, cls: CloudClass, prefix: str) -> None:
    engine = cls(make_ctx(**{f"{prefix}_api_key": "k-secret"}))
    engine.output_kept_seconds = 0.05  # a synchronous call's answer is awaited that long after a user's cancel
    provider = NoAnswer()
    token = CancelToken()
    with respx.mock(assert_all_called=False) as mock:
        mock.route().mock(side_effect=provider)
        run = asyncio.create_task(engine.run(bridge(), NullProgress(), token))
        await asyncio.wait_for(provider.sent.wait(), 5)
        token.cancel()
        with pytest.raises(Canceled) as info:
            await run
    assert info.value.charged == "unknown"
    await engine.aclose()


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
async def test_a_cdn_s_origin_timeout_to_the_paid_call_is_not_resent(
        make_ctx: Any, sleep: Any, cls: CloudClass, prefix: str) -> None:
    # Cloudflare's 524: the provider took the call and did not answer within the CDN's 100 s.
    engine = cls(make_ctx(**{f"{prefix}_api_key": "k-secret"}))
    engine.http.sleep = sleep
    with respx.mock(assert_all_called=False) as mock:
        paid = mock.route(method="POST").mock(return_value=httpx.Response(524, text="A timeout occurred"))
        with pytest.raises(EngineError) as info:
            await engine.run(bridge(), NullProgress(), CancelToken())
    await engine.aclose()
    assert paid.call_count == 1 and info.value.code == "timeout" and info.value.charged == "unknown"


def test_token_rates_are_listed_apart_from_image_prices() -> None:
    # `/v1/engines` once showed "output_tokens_per_million: 6000" among the credits per image.
    table = PriceTable("gemini", {"m": {"1K": 6.7, "output_tokens_per_million": 6000,
                                        "input_tokens_per_million": 50}, "plain": {"image": 4.0}}, "2026-11")
    assert table.as_dict() == {"as_of": "2026-11", "credits_per_image": {"m": {"1K": 6.7}, "plain": {"image": 4.0}},
                               "credits_per_million_tokens": {"m": {"output": 6000, "input": 50}}}
    assert "credits_per_million_tokens" not in PriceTable("x", {"plain": {"image": 4.0}}, "2026-11").as_dict()
    assert table.millicredits("m", "output_tokens_per_million") == 6_000_000  # still priced by its full name


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
@respx.mock
async def test_every_paid_request_is_announced_before_it_is_sent(make_ctx: Any, cls: CloudClass,
                                                                 prefix: str) -> None:
    # The runner refuses the announcement (the job was canceled, or another process took it):
    # then nothing that can bill may leave, whichever engine it is.
    provider = respx.route().mock(return_value=httpx.Response(500))
    engine = cls(make_ctx(**{f"{prefix}_api_key": "k-secret"}))
    assert engine.announces_sends

    async def refuse() -> None:
        raise Canceled("the job was canceled")

    try:
        with before_billable_sends(refuse), pytest.raises(Canceled) as info:
            await engine.run(bridge(), NullProgress(), CancelToken())
    finally:
        await engine.aclose()
    assert info.value.charged == "no"
    assert [call.request.method for call in provider.calls if call.request.method not in ("GET", "HEAD")] == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_formats_providers_send_are_decoded(fmt: str) -> None:
    import io

    from PIL import Image

    from tiers._images import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 10, 10)).save(buf, format=fmt)
    assert decode_image(buf.getvalue(), "prov").size == (16, 8)


def test_a_jpeg_is_turned_upright_as_its_exif_says() -> None:
    # Orientation 6 (rotate 90 degrees clockwise to view): stored as its pixels lay, it was sideways.
    import io

    from PIL import Image

    from tiers._images import decode_image

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 10, 10)).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), "prov").size == (8, 16)


def test_a_16_bit_grey_png_is_decoded_to_8_bits_as_it_looks() -> None:
    import io

    from PIL import Image

    from tiers._images import decode_image

    buf = io.BytesIO()
    Image.new("I;16", (4, 4), 32896).save(buf, format="PNG")
    image = decode_image(buf.getvalue(), "prov")
    assert (image.mode, image.getpixel((0, 0))) == ("RGB", (128, 128, 128))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_every_16_bit_grey_mode_keeps_its_levels(mode: str) -> None:
    from PIL import Image

    from tiers._images import eight_bit

    assert eight_bit(Image.new(mode, (2, 2), 32896)).getpixel((1, 1)) == (128, 128, 128)
    wide = Image.new("I", (3, 1))
    wide.putdata([70_000, -5, 32_896])  # PIL's 32-bit grey: clipped to 16 bits first
    assert list(eight_bit(wide).getdata()) == [(255, 255, 255), (0, 0, 0), (128, 128, 128)]


@pytest.mark.parametrize("fmt", ["EPS", "BMP", "GIF", "TIFF"])
def test_formats_no_provider_sends_are_not_handed_to_their_readers(fmt: str) -> None:
    """Some of Pillow's readers run outside programs (EPS: Ghostscript) on what they open."""
    import io

    from PIL import Image

    from tiers._images import decode_image

    if fmt == "EPS":
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 8\nshowpage\n"
    else:
        buf = io.BytesIO()
        Image.new("RGB", (16, 8)).save(buf, format=fmt)
        data = buf.getvalue()
    with pytest.raises(EngineError, match="not a PNG, JPEG or WebP image"):
        decode_image(data, "prov")


@pytest.mark.parametrize(("prompt", "at_least"), [
    ("a lighthouse at dusk " * 100, 2100 // 4),
    # About one token a character in CJK: counted at a quarter, a 10,000-character prompt's hold fell short.
    ("夕暮れの灯台" * 1000, 6000),
    ("🙂" * 50 + "ok", 50)])
def test_a_prompt_s_tokens_are_held_at_their_most(prompt: str, at_least: int) -> None:
    from tiers._cloud import prompt_tokens

    assert prompt_tokens(prompt) >= at_least
    assert prompt_tokens(prompt) <= len(prompt) + 64


@pytest.mark.parametrize(("cls", "prefix"), [(c[0], c[1]) for c in CASES], ids=[c[1] for c in CASES])
@pytest.mark.parametrize("status", [400, 500])
@respx.mock
async def test_an_error_echoing_the_request_s_headers_does_not_carry_the_key(
        make_ctx: Any, sleep: Any, cls: CloudClass, prefix: str, status: int) -> None:
    """Providers.md: keys never appear in job records; a proxy's error page may echo the headers."""
    key = "k-secret-0123456789"
    base = f"https://{prefix}.example"

    def echo(request: httpx.Request) -> httpx.Response:
        seen = "; ".join(f"{name}={value}" for name, value in request.headers.items() if key in value)
        # The key across the 300 characters an error keeps: cut before it was taken out, its first part stayed.
        told = "refused, your headers: "
        padding = "." * (292 - len(told) - seen.index(key))
        return httpx.Response(status, json={"error": {"message": f"{told}{padding}{seen}"}})

    respx.route(host=f"{prefix}.example").mock(side_effect=echo)
    engine = cls(make_ctx(**{f"{prefix}_api_key": key, f"{prefix}_base_url": base}))
    engine.http.sleep = sleep
    with pytest.raises(EngineError) as info:
        await engine.run(bridge(), NullProgress(), CancelToken())
    if "your headers" in info.value.message:  # (Replicate's 500 to a create says only that it may have billed)
        assert "***" in info.value.message
    assert key[:8] not in info.value.message and key not in str(info.value.details)


@pytest.mark.parametrize(("size", "asked", "min_side", "made"), [
    ((512, 512), (1536, 1024), 1, (627, 418)),    # the draft's pixels, in the shape asked
    ((512, 512), (1024, 1024), 1, (512, 512)),    # already that shape: untouched
    ((64, 64), (1344, 768), 64, (112, 64)),       # no side under the provider's least
])
def test_a_draft_is_sent_in_the_shape_asked(size: tuple[int, int], asked: tuple[int, int], min_side: int,
                                            made: tuple[int, int]) -> None:
    from PIL import Image

    from tiers._images import shaped_as

    assert shaped_as(Image.new("RGB", size), *asked, min_side=min_side).size == made


@pytest.mark.parametrize("bad", [float("inf"), -5, 1290.5, "1290", True, None, 2**63, MAX_AMOUNT + 1])
def test_token_counts_are_whole_non_negative_64_bit_numbers_or_none(bad: object) -> None:
    # A usage block's `1e400` (an infinity to json.loads) raised OverflowError out of the cost, after
    # the paid image was decoded; a negative count made a negative cost.
    assert token_counts(1300, 1290) == (1300, 1290)
    assert token_counts(1300, bad) is None


@pytest.mark.parametrize(("made", "error", "expected"), [
    # The third call was refused: the two made are the most it cost.
    (2, EngineError("refused"), ("unknown", 2000)),
    # Sent without an answer: the three asked for may all be billed, the fourth was never asked.
    (2, EngineError("no answer", charged="unknown"), ("unknown", 3000)),
    # A cancel while the third call was out: the token cannot tell whether it was sent.
    (2, Canceled("canceled"), ("unknown", 3000)),
    # A cancel the provider answered for: the third call never ran (taken off its queue).
    (2, Canceled("canceled before it ran", charged="no"), ("unknown", 2000)),
    # Nothing made, refused: free, no ceiling needed.
    (0, EngineError("refused"), ("no", None)),
    # A cost the provider reported is kept.
    (2, EngineError("made, not read", charged="yes", cost_millicredits=1234), ("yes", 1234)),
])
def test_a_loop_of_paid_calls_that_fails_part_way_costs_at_most_what_it_asked_for(
        made: int, error: EngineError, expected: tuple[str, int | None]) -> None:
    images: list[object] = []
    asked = Asked(4, lambda: 4000)
    with pytest.raises(EngineError) as info, paid_calls(images, asked):
        for _ in range(4):
            asked.asking()
            if len(images) == made:
                raise error
            images.append(object())
    assert (info.value.charged, info.value.cost_millicredits) == expected


def test_every_image_asked_for_leaves_the_estimate_whole() -> None:
    asked = Asked(2, lambda: 3001)
    with pytest.raises(EngineError) as info, paid_calls([object()], asked):
        asked.asking(2)  # one call for both, as OpenAI's edits call asks
        raise EngineError("no answer", charged="unknown")
    assert info.value.cost_millicredits is None  # the ledger captures the whole hold
    assert Asked(3, lambda: 1000).share(1) == 334  # rounded up: a share is never below its price


def test_a_failure_after_a_paid_send_stays_itself_when_the_request_has_no_price_here() -> None:
    # A worker whose prices file (or model) differs from the router's: the share's estimate raised
    # NoPrice, which replaced the timeout and, saying nothing was billed, released the hold.
    def unpriced() -> int:
        raise NoPrice("gemini has no price for gemini-3.1-flash-lite-image at 2K")

    asked = Asked(2, unpriced)
    with pytest.raises(EngineTimeout) as info, paid_calls([], asked):
        asked.asking()
        raise EngineTimeout("no answer")
    assert (info.value.charged, info.value.cost_millicredits) == ("unknown", None)  # the whole hold


def test_a_ceiling_is_never_below_what_the_provider_reported_for_the_calls_made() -> None:
    # An estimate is no bound (a stale price table, more tokens than guessed): the first call's
    # reported cost was above its share, and the capture was cut below what was surely billed.
    images: list[object] = []
    asked = Asked(3, lambda: 3000)
    with pytest.raises(EngineError) as info, paid_calls(images, asked):
        asked.asking(1)
        images.append(object())
        asked.charged(5000)
        asked.asking(1)
        images.append(object())
        asked.charged(None)  # the second said nothing of its cost: the bill is not known
        asked.asking(1)
        raise EngineError("refused")
    assert (info.value.charged, info.value.cost_millicredits) == ("unknown", 5000)


def test_a_last_call_whose_outcome_is_unknown_charges_at_least_what_the_earlier_calls_reported() -> None:
    # Every image asked for: the hold was captured, below the first call's reported cost.
    asked = Asked(2, lambda: 3000)
    with pytest.raises(EngineError) as info, paid_calls(images := [object()], asked):
        asked.asking(1)
        asked.charged(5000)
        asked.asking(1)
        raise EngineError("no answer", charged="unknown")
    assert len(images) == 1 and (info.value.charged, info.value.cost_millicredits) == ("unknown", 5000)
    asked = Asked(2, lambda: 3000)  # reported within the estimate: the whole hold, as before
    with pytest.raises(EngineError) as info, paid_calls([object()], asked):
        asked.asking(1)
        asked.charged(1400)
        asked.asking(1)
        raise EngineError("no answer", charged="unknown")
    assert info.value.cost_millicredits is None


@pytest.mark.parametrize(("error", "sent", "expected"), [
    # Refused, or withdrawn with the provider's word that it never ran: the calls made are the bill.
    (EngineError("refused"), True, ("yes", 2500)),
    (Canceled("canceled before it ran", charged="no"), True, ("yes", 2500)),
    # The token's own cancel before the next call was sent: none was out.
    (Canceled("canceled"), False, ("yes", 2500)),
    # The failing call may have billed too, or the token's own cancel knows nothing of it: the share
    # of the three asked for.
    (EngineError("no answer", charged="unknown"), True, ("unknown", 3375)),
    (Canceled("canceled"), True, ("unknown", 3375)),
])
def test_a_failure_after_calls_that_each_said_their_cost_charges_that_cost(
        error: EngineError, sent: bool, expected: tuple[str, int | None]) -> None:
    images: list[object] = []
    asked = Asked(4, lambda: 4500)
    with pytest.raises(EngineError) as info, paid_calls(images, asked):
        for cost in (1000, 1500):
            asked.asking(1)
            images.append(object())
            asked.charged(cost)
        if sent:
            asked.asking(1)
        raise error
    assert (info.value.charged, info.value.cost_millicredits) == expected


# The synchronous paid calls (their answer is the image): the engine, its request and a 200 answer.
SYNC_CASES = ["gemini", "openai", "stability-generate", "stability-conservative"]


def sync_case(make_ctx: Any, case: str) -> tuple[GeminiEngine | OpenAIImagesEngine | StabilityEngine, Any,
                                                  httpx.Response]:
    from tests.tiers import test_gemini, test_openai_images, test_stability

    if case == "gemini":
        return (GeminiEngine(make_ctx(gemini_api_key="g-secret", gemini_base_url=test_gemini.BASE)), bridge(),
                httpx.Response(200, json=test_gemini.ok_body()))
    if case == "openai":
        return (OpenAIImagesEngine(make_ctx(openai_api_key="sk-secret", openai_base_url=test_openai_images.BASE)),
                bridge(), test_openai_images.ok())
    engine = StabilityEngine(make_ctx(stability_api_key="sk-stab-secret", stability_base_url=test_stability.BASE))
    req = test_stability.bridge() if case == "stability-generate" else test_stability.polish()
    return engine, req, test_stability.ok(seed=7)


async def canceled_then_answered(engine: Any, req: Any, held: HeldRequest, *,
                                 before: httpx.Response | None = None) -> Canceled:
    """Run `req`, cancel it while `held` is out, then let `held` answer; the run's `Canceled`.
    `before`: the answer of the job's first call, answered at once (`held` is the second's)."""
    token = CancelToken()
    with respx.mock(assert_all_called=False) as mock:
        answers = iter([before] if before is not None else [])

        async def answer(request: httpx.Request) -> httpx.Response:
            return next(answers, None) or await held(request)

        mock.route(method="POST").mock(side_effect=answer)
        run = asyncio.create_task(engine.run(req, NullProgress(), token))
        await asyncio.wait_for(held.sent.wait(), 5)
        token.cancel()
        await asyncio.sleep(0.05)  # the cancel has reached the engine before the answer comes
        held.answer.set()
        with pytest.raises(Canceled) as info:
            await asyncio.wait_for(run, 10)
    return info.value


@pytest.mark.parametrize("case", SYNC_CASES)
@pytest.mark.parametrize("n", [1, 2])
async def test_a_user_s_cancel_while_a_synchronous_call_is_out_keeps_what_its_answer_brings(
        make_ctx: Any, case: str, n: int) -> None:
    # The provider answers the call a user's cancel found out, within `output_kept_seconds`: its
    # image, made and billed, was dropped with the call, and the hold captured `unknown`. With n=2
    # the cancel meets the second call, the first answered before it.
    engine, req, answer = sync_case(make_ctx, case)
    req = replace(req, n=n)
    with respx.mock(assert_all_called=False) as mock:
        mock.route(method="POST").mock(return_value=answer)
        normal = await engine.run(req, NullProgress(), CancelToken())  # what the same answers cost uncanceled
    held = HeldRequest(answer)
    canceled = await canceled_then_answered(engine, req, held, before=answer if n == 2 else None)
    await engine.aclose()
    assert held.answered and not held.dropped
    made = canceled.made
    assert made is not None and len(made.images) == n and canceled.charged == "yes"
    assert canceled.cost_millicredits == normal.cost_millicredits and made.cost_millicredits == normal.cost_millicredits
    if case.startswith("stability"):
        assert made.metadata["finish_reasons"] == ["SUCCESS"] * n
    else:
        assert normal.cost_millicredits is not None  # charged by its usage, as a normal answer


@pytest.mark.parametrize("case", SYNC_CASES)
@pytest.mark.parametrize("status", [400, 503])
async def test_a_user_s_cancel_answered_with_an_error_the_provider_bills_not_releases_the_hold(
        make_ctx: Any, case: str, status: int) -> None:
    engine, req, _answer = sync_case(make_ctx, case)
    engine.http.sleep = BlockingSleep()  # a 503 is not sent again: the job is canceled
    held = HeldRequest(httpx.Response(status, json={"error": {"code": status, "message": "no"}}))
    canceled = await canceled_then_answered(engine, req, held)
    await engine.aclose()
    assert held.answered and canceled.made is None and canceled.charged == "no"


@pytest.mark.parametrize("case", SYNC_CASES)
async def test_a_user_s_cancel_drops_a_synchronous_call_not_answered_within_the_bound(
        make_ctx: Any, case: str) -> None:
    engine, req, _answer = sync_case(make_ctx, case)
    engine.output_kept_seconds = 0.05
    provider = NoAnswer()
    token = CancelToken()
    with respx.mock(assert_all_called=False) as mock:
        mock.route(method="POST").mock(side_effect=provider)
        run = asyncio.create_task(engine.run(req, NullProgress(), token))
        await asyncio.wait_for(provider.sent.wait(), 5)
        token.cancel()
        with pytest.raises(Canceled) as info:
            await asyncio.wait_for(run, 10)
    await engine.aclose()
    assert info.value.charged == "unknown" and info.value.made is None


@pytest.mark.parametrize("case", SYNC_CASES)
async def test_a_stop_drops_a_synchronous_call_out_at_once(make_ctx: Any, case: str) -> None:
    # A stop (a shutdown) is not a user's cancel: the job is left to the restart, as before.
    engine, req, answer = sync_case(make_ctx, case)
    held = HeldRequest(answer)
    with respx.mock(assert_all_called=False) as mock:
        mock.route(method="POST").mock(side_effect=held)
        canceled = await canceled_while_out(engine, req, held, abandon=True)
    await engine.aclose()
    assert canceled.charged == "unknown" and canceled.made is None


async def test_a_user_s_cancel_answered_with_a_usage_that_cannot_be_read_is_flagged_for_reconciliation(
        make_ctx: Any, db: Database) -> None:
    # The first of two calls is out at a user's cancel and answers its image, with a usage whose
    # counts are no counts: charged as made, the estimate's share for that one image, but its cost
    # is nobody's to know, so the capture waits for the invoice as a success's so answered does. It
    # was captured as a known bill (the share replaced the unknown cost), never reconciled.
    from tests.tiers import test_gemini

    engine, req, _answer = sync_case(make_ctx, "gemini")
    req = replace(req, n=2)
    body = test_gemini.ok_body()
    body["usageMetadata"] = {"promptTokenCount": 1300, "candidatesTokenCount": "x", "totalTokenCount": 2590}
    held = HeldRequest(httpx.Response(200, json=body))
    canceled = await canceled_then_answered(engine, req, held)
    await engine.aclose()
    assert held.answered and canceled.made is not None and len(canceled.made.images) == 1
    assert canceled.charged == "yes" and canceled.cost_unread

    ledger = Ledger()
    project = Project(id="prj_unread", name="unread", policy="balanced", budget_limit=None, budget_period="none")
    job = Job(id="job_unread", project_id=project.id, stage=req.stage, engine=engine.name, params={"n": 2})
    with db.transaction() as s:
        s.add(project)
    with db.transaction() as s:
        s.add(job)
        ledger.hold(s, ledger.lock_project(s, project.id), job, engine.estimate(req))
    with db.transaction() as s:
        ledger.settle_failure(s, job, canceled)
    with db.session() as s:
        captures = s.exec(select(LedgerEntry).where(col(LedgerEntry.job_id) == job.id,
                                                    col(LedgerEntry.kind) == "capture")).all()
    assert len(captures) == 1 and captures[0].unreconciled
    assert 0 < captures[0].amount <= engine.estimate(req)


@pytest.mark.parametrize("case", SYNC_CASES)
@pytest.mark.parametrize("status", [429, 503])
async def test_a_later_call_answered_unbilled_after_a_user_s_cancel_charges_the_earlier_calls_alone(
        make_ctx: Any, case: str, status: int) -> None:
    # A job of two calls: the first made its image, the second is out at a user's cancel and is
    # answered with a 429 or 503, which made nothing and is not sent again. As in the service, the
    # first call's send is counted as out (`billable_sends_out`): the client's "unknown" for the
    # second's wait ended the job charged the whole estimate for a person to reconcile, though
    # the bill was known. Charged now as a refusal then is: the first call's cost (Stability
    # reports none: the estimate's share of that one image).
    engine, req, answer = sync_case(make_ctx, case)
    req = replace(req, n=2)
    with respx.mock(assert_all_called=False) as mock:
        mock.route(method="POST").mock(return_value=answer)
        first = await engine.run(replace(req, n=1), NullProgress(), CancelToken())  # the first call's cost
    out = 0

    async def sending() -> None:  # the runner's count of the attempt's sends
        nonlocal out
        out += 1

    def refused() -> None:
        nonlocal out
        out -= 1

    held = HeldRequest(httpx.Response(status, json={"error": {"code": status, "message": "busy"}}))
    with before_billable_sends(sending, refused, lambda: out > 0):
        canceled = await canceled_then_answered(engine, req, held, before=answer)
    await engine.aclose()
    assert held.answered and canceled.made is not None and len(canceled.made.images) == 1
    if case.startswith("stability"):
        assert canceled.charged == "unknown"
        assert canceled.cost_millicredits == -(-engine.estimate(req) // 2)
    else:
        assert (canceled.charged, canceled.cost_millicredits) == ("yes", first.cost_millicredits)
