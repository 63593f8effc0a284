"""The one retry layer (tiers/_http.py): an answer that arrived but cannot be read is not a request
that never left, and a cancel says whether a request was out when it came."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, cast

import httpcore
import httpx
import pytest
import respx
from httpcore._backends.anyio import AnyIOStream

from orchestrator.errors import Canceled, EngineError, EngineTimeout, EngineUnavailable, RateLimited
from tests.tiers.conftest import BlockingSleep, NoAnswer
from tiers import _http
from tiers._http import RemoteClient, resolve_host, retry_after
from tiers.base import CancelToken, before_billable_sends

BASE = "https://provider.test"


def corrupt_gzip() -> httpx.Response:
    """A 200 whose body says gzip and is not: httpx raises `DecodingError` while reading it."""
    return httpx.Response(200, stream=httpx.ByteStream(b"this is not gzip at all"),
                          headers={"content-encoding": "gzip", "content-type": "application/json"})


@pytest.fixture
async def client(sleep: Any) -> AsyncIterator[RemoteClient]:
    http = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY", deadline=60.0,
                        sleep=sleep, clock=sleep.clock)
    yield http
    await http.aclose()


@respx.mock
async def test_an_unreadable_answer_to_a_post_is_not_resent_and_may_be_billed(client: RemoteClient) -> None:
    route = respx.post(f"{BASE}/images").mock(return_value=corrupt_gzip())
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    error = info.value
    assert not isinstance(error, EngineUnavailable) and error.code == "engine_error"
    assert error.charged == "unknown" and route.call_count == 1
    assert "answered but its answer could not be read (DecodingError)" in error.message
    assert "not re-sent" in error.message and "ORCH_PROV_API_KEY" not in error.message


@respx.mock
@pytest.mark.parametrize("bills", [True, False])
async def test_a_server_that_bills_nothing_is_not_said_to_have_billed(client: RemoteClient, bills: bool) -> None:
    # ComfyUI's and AUTOMATIC1111's errors said the image may have been "made and billed".
    client.bills = bills
    respx.post(f"{BASE}/images").mock(side_effect=[corrupt_gzip(), httpx.ReadTimeout("slow"),
                                                   httpx.Response(307, headers={"location": "https://elsewhere.test/"})])
    respx.post("https://elsewhere.test/").mock(return_value=httpx.Response(404))
    said = []
    for _ in range(3):
        with pytest.raises(EngineError) as info:
            await client.request("POST", "/images", json={"prompt": "a lighthouse"})
        said.append(info.value.message)
    assert [("billed" in text) for text in said] == [bills] * 3
    assert ["may have made the image" in said[0], "may have made the image" in said[1],
            "may have run it" in said[2]] == [not bills] * 3


@respx.mock
async def test_a_redirect_loop_on_a_post_is_not_resent_and_may_be_billed(client: RemoteClient) -> None:
    route = respx.post(f"{BASE}/images").mock(
        return_value=httpx.Response(307, headers={"location": f"{BASE}/images"}))
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert not isinstance(info.value, EngineUnavailable)
    assert info.value.charged == "unknown" and "(TooManyRedirects)" in info.value.message
    # The first send and the redirects it followed; nothing after them.
    assert route.call_count == 1 + client.client.max_redirects


@respx.mock
@pytest.mark.parametrize("status", [520, 524, 598])
async def test_a_gateway_s_origin_timeout_to_a_post_is_not_resent_and_may_be_billed(
        client: RemoteClient, sleep: Any, status: int) -> None:
    # Cloudflare's 524 comes at its 100 s limit, well within ORCH_REMOTE_DEADLINE: a second edit was a
    # second bill, and one too late to retry was given up on as an unbilled 5xx (hold released).
    route = respx.post(f"{BASE}/images").mock(
        side_effect=[httpx.Response(status, text="<html>A timeout occurred</html>"), httpx.Response(200, json={})])
    with pytest.raises(EngineTimeout) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert route.call_count == 1 and sleep.waits == []
    assert info.value.charged == "unknown" and info.value.details["status"] == status
    assert "not re-sent" in info.value.message


@respx.mock
@pytest.mark.parametrize("status", [502, 503, 504, 524])
async def test_a_provider_s_own_5xx_is_retried_and_a_poll_s_gateway_timeout_too(
        client: RemoteClient, sleep: Any, status: int) -> None:
    # providers.md: a provider's 5xx says nothing was made; a poll may be asked again whatever it met.
    method, idempotent = ("GET", True) if status == 524 else ("POST", False)
    route = respx.route(method=method, url=f"{BASE}/images").mock(
        side_effect=[httpx.Response(status), httpx.Response(200, json={"ok": 1})])
    response = await client.request(method, "/images", idempotent=idempotent)
    assert response.json() == {"ok": 1} and route.call_count == 2 and len(sleep.waits) == 1


@respx.mock
async def test_an_unreadable_answer_to_a_poll_is_asked_again(client: RemoteClient, sleep: Any) -> None:
    route = respx.get(f"{BASE}/results/1").mock(side_effect=[corrupt_gzip(), httpx.Response(200, json={"ok": 1})])
    response = await client.request("GET", "/results/1", idempotent=True)
    assert response.json() == {"ok": 1}
    assert route.call_count == 2 and len(sleep.waits) == 1


@respx.mock
async def test_a_poll_that_stays_unreadable_gives_up_at_the_deadline(client: RemoteClient) -> None:
    respx.get(f"{BASE}/results/1").mock(side_effect=lambda _request: corrupt_gzip())
    with pytest.raises(EngineError) as info:
        await client.request("GET", "/results/1", idempotent=True)
    assert not isinstance(info.value, EngineUnavailable)
    assert "answer could not be read" in info.value.message and "nothing was sent" not in info.value.message


@respx.mock
async def test_a_request_that_cannot_be_built_is_still_engine_unavailable(client: RemoteClient) -> None:
    # What h11 raises for a key with a newline in it, before anything is sent; its text holds the key.
    route = respx.post(f"{BASE}/images").mock(
        side_effect=httpx.LocalProtocolError("Illegal header value b'Bearer k-secret\\n'"))
    with pytest.raises(EngineUnavailable) as info:
        await client.request("POST", "/images")
    assert info.value.retryable is False and "ORCH_PROV_API_KEY" in info.value.message
    assert "k-secret" not in info.value.message and route.call_count == 1


@contextlib.asynccontextmanager
async def loopback(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                   ) -> AsyncIterator[str]:
    """A raw HTTP server on 127.0.0.1 answering with `handle`: real sockets, for what respx
    cannot play (a body cut short, silence after the head)."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@pytest.fixture
async def trickling() -> AsyncIterator[str]:
    """A server on 127.0.0.1 that sends its headers, then one byte of the body every 50 ms, for
    ever: never silent long enough for a read timeout."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while True:
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b" ")

    async with loopback(handle) as url:
        yield url


@pytest.mark.parametrize(("method", "idempotent", "charged"), [("POST", False, "unknown"), ("GET", True, "no")])
@pytest.mark.parametrize("cancel", [None, CancelToken()], ids=["plain", "cancellable"])
async def test_an_answer_that_never_ends_stops_at_the_deadline(
        trickling: str, monkeypatch: pytest.MonkeyPatch, method: str, idempotent: bool, charged: str,
        cancel: CancelToken | None) -> None:
    monkeypatch.setattr("tiers._http.MIN_ATTEMPT_SECONDS", 0.1)
    client = RemoteClient("prov", base_url=trickling, key_setting="ORCH_PROV_API_KEY", deadline=0.5,
                          read_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(EngineTimeout) as info:
        await asyncio.wait_for(client.request(method, "/images", idempotent=idempotent, cancel=cancel), 10)
    await asyncio.sleep(0.05)
    # Nothing of the request goes on reading in the background (the server's own tasks aside).
    ours = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()
            and "trickling" not in t.get_coro().__qualname__]  # type: ignore[union-attr]
    assert ours == []
    await client.aclose()
    assert time.monotonic() - started > 0.4  # not before the deadline...
    # ... and by it, not by the read timeout (which a trickle of bytes never lets fire)
    assert info.value.charged == charged and "ORCH_REMOTE_DEADLINE" in info.value.message


@respx.mock
async def test_a_header_that_cannot_be_encoded_is_refused_before_anything_is_announced(client: RemoteClient) -> None:
    route = respx.post(f"{BASE}/images").mock(return_value=httpx.Response(200))
    announced: list[str] = []

    async def record() -> None:
        announced.append("send")

    with before_billable_sends(record), pytest.raises(EngineUnavailable) as info:
        await client.request("POST", "/images", headers={"Authorization": "Bearer k\u2019secret"})
    assert announced == [] and route.call_count == 0
    assert info.value.charged == "no" and "ORCH_PROV_API_KEY" in info.value.message
    assert "secret" not in info.value.message


def rate_limited(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(429, headers={"retry-after": "5"}, json={"error": {"message": "slow down"}})


@respx.mock
async def test_a_cancel_during_the_back_off_after_a_429_says_nothing_was_charged() -> None:
    route = respx.post(f"{BASE}/images").mock(side_effect=rate_limited)
    sleep = BlockingSleep()
    client = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY", sleep=sleep)
    token = CancelToken()
    call = asyncio.create_task(client.request("POST", "/images", json={"prompt": "a lighthouse"}, cancel=token))
    await asyncio.wait_for(sleep.entered.wait(), 5)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await call
    # The only answer said nothing was made, and nothing was out when the cancel came.
    assert info.value.charged == "no" and route.call_count == 1
    assert info.value.message == "the job was canceled"  # not "while the provider was working"
    await client.aclose()


@respx.mock
async def test_a_cancel_while_a_post_is_out_may_have_been_charged() -> None:
    provider = NoAnswer()
    respx.post(f"{BASE}/images").mock(side_effect=provider)
    client = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY")
    token = CancelToken()
    call = asyncio.create_task(client.request("POST", "/images", json={"prompt": "a lighthouse"}, cancel=token))
    await asyncio.wait_for(provider.sent.wait(), 5)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await call
    assert info.value.charged == "unknown"
    await client.aclose()


@respx.mock
async def test_a_cancel_before_the_first_send_sends_nothing(client: RemoteClient) -> None:
    route = respx.post(f"{BASE}/images").mock(return_value=httpx.Response(200, json={}))
    token = CancelToken()
    token.cancel()
    with pytest.raises(Canceled) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"}, cancel=token)
    assert info.value.charged == "no" and route.call_count == 0


@respx.mock
async def test_a_key_header_never_follows_a_redirect_to_another_host(sleep: Any) -> None:
    # httpx drops only `Authorization` when a redirect leaves the origin; Gemini's key is a header
    # of its own.
    http = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY", sleep=sleep, clock=sleep.clock,
                        headers={"x-goog-api-key": "SECRET"})
    respx.get(f"{BASE}/models").mock(return_value=httpx.Response(307, headers={"location": f"{BASE}/v2/models"}))
    home = respx.get(f"{BASE}/v2/models").mock(
        return_value=httpx.Response(307, headers={"location": "https://elsewhere.test/models"}))
    away = respx.get("https://elsewhere.test/models").mock(return_value=httpx.Response(200, json={}))
    try:
        response = await http.request("GET", "/models", idempotent=True)
    finally:
        await http.aclose()
    assert response.status_code == 200
    assert home.calls.last.request.headers["x-goog-api-key"] == "SECRET"  # same origin: kept
    assert "x-goog-api-key" not in away.calls.last.request.headers


@respx.mock
async def test_a_request_that_can_bill_is_announced_before_it_leaves(client: RemoteClient) -> None:
    post = respx.post(f"{BASE}/images").mock(return_value=httpx.Response(200, json={}))
    get = respx.get(f"{BASE}/images/1").mock(return_value=httpx.Response(200, json={}))
    sent_when_announced: list[int] = []

    async def hook() -> None:
        sent_when_announced.append(post.call_count)

    with before_billable_sends(hook):
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
        await client.request("GET", "/images/1", idempotent=True)  # a poll bills nothing: not announced
    assert sent_when_announced == [0] and post.call_count == 1 and get.call_count == 1


@respx.mock
async def test_a_refused_announcement_sends_nothing(client: RemoteClient) -> None:
    # The orchestrator refuses when the job was canceled or taken over by another process.
    route = respx.post(f"{BASE}/images").mock(return_value=httpx.Response(200, json={}))

    async def hook() -> None:
        raise Canceled("the job was canceled")

    with before_billable_sends(hook), pytest.raises(Canceled) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert info.value.charged == "no" and route.call_count == 0


@respx.mock
async def test_a_cancel_while_the_send_is_being_recorded_sends_nothing(client: RemoteClient) -> None:
    route = respx.post(f"{BASE}/images").mock(return_value=httpx.Response(200, json={}))
    token = CancelToken()

    async def hook() -> None:  # the runner's write, during which the user cancels
        token.cancel()

    with before_billable_sends(hook), pytest.raises(Canceled) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"}, cancel=token)
    assert info.value.charged == "no" and route.call_count == 0


@respx.mock
async def test_a_cancel_before_a_second_paid_call_is_not_free_and_after_a_refusal_is(client: RemoteClient) -> None:
    """A plugin's second paid call, canceled before it went: its own "nothing sent" released a job
    whose first call was made and billed. A call answered that nothing was made (a 429) is no such call."""
    route = respx.post(f"{BASE}/images").mock(side_effect=[httpx.Response(200, json={}), httpx.Response(400)])
    out = 0

    async def announced() -> None:
        nonlocal out
        out += 1

    def refused() -> None:
        nonlocal out
        out -= 1

    token = CancelToken()
    with before_billable_sends(announced, refused, lambda: out > 0):
        await client.request("POST", "/images", json={"call": 1}, cancel=token)
        token.cancel()
        with pytest.raises(Canceled) as info:
            await client.request("POST", "/images", json={"call": 2}, cancel=token)
    assert info.value.charged == "unknown" and route.call_count == 1

    out = 0
    respx.post(f"{BASE}/edits").mock(return_value=httpx.Response(503))
    with before_billable_sends(announced, refused, lambda: out > 0), pytest.raises(EngineError):
        await client.request("POST", "/edits", json={"call": 1}, deadline=client.clock() + 0.5)
    assert out == 0  # every 503 said nothing was made


async def test_a_cancel_while_waiting_out_a_429_is_judged_when_it_comes() -> None:
    """Another paid request of the job went out during the wait: judged as the wait began, the
    cancel said "nothing sent", and the hold that request ran up was released."""
    http = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY", deadline=60.0,
                        sleep=asyncio.sleep)
    out = 0

    async def announced() -> None:
        pass

    token = CancelToken()
    with before_billable_sends(announced, None, lambda: out > 0):
        # An async def: what it returns is a coroutine, where `Sleep` promises an awaitable.
        waiting = asyncio.create_task(cast(Coroutine[Any, Any, None], http._sleep_unless(token)(5.0)))
        await asyncio.sleep(0.05)
        out = 1  # the job's other request is sent meanwhile
        token.cancel()
        with pytest.raises(Canceled) as info:
            await waiting
    assert info.value.charged == "unknown"
    await http.aclose()


@respx.mock
@pytest.mark.parametrize(("retry_after", "sends"), [("20", 2), ("35", 1)])
async def test_a_request_that_can_bill_is_not_resent_without_time_to_be_answered(
        sleep: Any, retry_after: str, sends: int) -> None:
    # Deadline 60 s, read timeout 120 s: a retry needs half the deadline (30 s) left after its
    # wait. Sent at 35 s, a slow answer would end as a timeout that may have billed; refused
    # there, the 429 says plainly that nothing was made (a fallback may take the job).
    http = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY", deadline=60.0, read_timeout=120.0,
                        sleep=sleep, clock=sleep.clock)
    throttled = httpx.Response(429, headers={"Retry-After": retry_after})
    route = respx.post(f"{BASE}/images").mock(side_effect=[throttled, throttled])
    with pytest.raises(RateLimited) as info:
        await http.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert route.call_count == sends and info.value.charged == "no"
    # A poll makes nothing: it is asked again whatever time is left.
    poll = respx.get(f"{BASE}/results/1").mock(side_effect=[throttled, httpx.Response(200, json={"ok": 1})])
    assert (await http.request("GET", "/results/1", idempotent=True)).json() == {"ok": 1}
    assert poll.call_count == 2
    await http.aclose()


@respx.mock
@pytest.mark.parametrize("hint", [{"retry-after": "0"}, {"retry-after-ms": "0"},
                                  {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}])
async def test_a_hint_to_come_back_at_once_still_backs_off(client: RemoteClient, sleep: Any,
                                                           hint: dict[str, str]) -> None:
    route = respx.post(f"{BASE}/images").mock(side_effect=[httpx.Response(429, headers=hint)] * 4
                                              + [httpx.Response(200, json={"ok": 1})])
    assert (await client.request("POST", "/images")).json() == {"ok": 1}
    # Not 5 sends as fast as the answers come back: the usual growing back-off.
    assert route.call_count == 5 and all(wait >= 0.25 for wait in sleep.waits) and sum(sleep.waits) >= 3.75


@respx.mock
@pytest.mark.parametrize("retry_after", ["600", "50"])
async def test_a_wait_the_deadline_cannot_hold_ends_the_try_at_once(sleep: Any, retry_after: str) -> None:
    # Deadline 60 s (a retry that can bill needs 30 s left after its wait): neither 600 s nor 50 s
    # fits, so the 429 is the answer now, and routing may fall back without waiting for nothing.
    http = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY", deadline=60.0,
                        sleep=sleep, clock=sleep.clock)
    route = respx.post(f"{BASE}/images").mock(return_value=httpx.Response(429, headers={"Retry-After": retry_after}))
    with pytest.raises(RateLimited) as info:
        await http.request("POST", "/images")
    assert route.call_count == 1 and sleep.waits == [] and info.value.charged == "no"
    assert info.value.details["retry_after"] == float(retry_after)
    assert f"asks to wait {retry_after} s" in info.value.message
    await http.aclose()


@pytest.fixture
async def slow_renderer() -> AsyncIterator[str]:
    """A server on 127.0.0.1 that, like a synchronous provider, sends nothing for 1.5 s (the
    render), then its whole answer."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.5)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{"ok":1}')
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async with loopback(handle) as url:
        yield url


async def test_a_render_slower_than_the_read_timeout_is_waited_for_until_the_deadline(slow_renderer: str) -> None:
    client = RemoteClient("prov", base_url=slow_renderer, key_setting="ORCH_PROV_API_KEY", deadline=30.0,
                          read_timeout=0.5)
    # Made and billed after 1.5 s of silence: not a timeout that may have billed.
    assert (await client.request("POST", "/images", json={"prompt": "a lighthouse"})).json() == {"ok": 1}
    # A poll is told apart by its silence: asked again, and given up at the deadline, not waited on.
    short = RemoteClient("prov", base_url=slow_renderer, key_setting="ORCH_PROV_API_KEY", deadline=1.2,
                         read_timeout=0.3)
    with pytest.raises(EngineError) as info:
        await short.request("GET", "/results/1", idempotent=True)
    assert "ReadTimeout" in info.value.message
    await client.aclose()
    await short.aclose()


@pytest.mark.parametrize("value", ["inf", "Infinity", "1e999", "nan"])
def test_a_hint_no_one_can_honour_is_no_hint(value: str) -> None:
    # Kept, it reached the job's error details as a number JSON cannot carry.
    assert retry_after(httpx.Response(429, headers={"retry-after": value})) is None


def resolving(monkeypatch: pytest.MonkeyPatch, names: dict[str, str]) -> None:
    """DNS as `names` says (host -> address); other hosts do not resolve."""
    import ipaddress

    from tiers import _http

    async def resolve(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address(names[host])] if host in names else []
    monkeypatch.setattr(_http, "resolve_host", resolve)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/admin",           # not https, and this machine
    "https://127.0.0.1/admin",                # this machine over https
    "https://169.254.169.254/latest/meta-data",  # a cloud's metadata address
    "https://[::ffff:10.0.0.7]/x.png",        # a LAN address written as IPv6
    "https://localhost/x.png",
    "https://LOCALHOST./x.png",               # a trailing dot is the same name
    "https://[::127.0.0.1]/x.png",            # IPv4 carried in IPv6: compatible,
    "https://[64:ff9b::a9fe:a9fe]/x.png",     # NAT64 (the metadata address),
    "https://[2002:a9fe:a9fe::]/x.png",       # 6to4,
    "https://[64:ff9b:1::7f00:1]/x.png",      # a local network's own NAT64,
    "https://[::ffff:0:7f00:1]/x.png",        # IPv4-translated
    "https://cdn.internal.test/x.png",        # a name that resolves to a LAN address
    "https://[fec0::7]/x.png",                # IPv6 site-local (a LAN's), global to Python 3.11
    "https://cdn.sitelocal.test/x.png",       # a name that resolves to one
    "http://cdn.public.test/x.png",           # a public host, in clear
])
@respx.mock
async def test_a_host_an_answer_names_is_fetched_only_if_public_and_https(
        client: RemoteClient, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    resolving(monkeypatch, {"cdn.internal.test": "10.1.2.3", "cdn.public.test": "93.184.216.34",
                            "cdn.sitelocal.test": "fec0::7"})
    fetched = respx.get(url).mock(return_value=httpx.Response(200, content=b"secret"))
    with pytest.raises(EngineError) as info:
        await client.request("GET", url, idempotent=True)
    assert fetched.call_count == 0 and not info.value.retryable
    assert "is not fetched" in info.value.message and "only public https hosts" in info.value.message


@pytest.mark.parametrize("url", ["https://straße.evil.test/x.png", "https://xn--strae-oqa.evil.test/x.png"])
@respx.mock
async def test_an_international_name_is_checked_as_the_name_connected_to(
        client: RemoteClient, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    # httpx connects to the punycode name (IDNA 2008); its Unicode form, resolved, became
    # another name (IDNA 2003: straße -> strasse), public, while the one connected to was local.
    resolving(monkeypatch, {"strasse.evil.test": "93.184.216.34", "xn--strae-oqa.evil.test": "127.0.0.1"})
    fetched = respx.get("https://xn--strae-oqa.evil.test/x.png").mock(return_value=httpx.Response(200))
    with pytest.raises(EngineError, match="is a private or local address") as info:
        await client.request("GET", url, idempotent=True)
    assert fetched.call_count == 0 and not info.value.retryable


@respx.mock
async def test_a_name_that_does_not_resolve_is_not_connected_to(
        client: RemoteClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # Let through, httpx resolved it again on its own, and a second answer could be this machine.
    resolving(monkeypatch, {})
    fetched = respx.get("https://cdn.flaky.test/x.png").mock(return_value=httpx.Response(200, content=b"a"))
    with pytest.raises(EngineError, match=r"could not reach the provider \(cdn.flaky.test does not resolve\)"):
        await client.request("GET", "https://cdn.flaky.test/x.png", idempotent=True)
    assert fetched.call_count == 0
    # Once it resolves (a lookup that failed for a while), it is fetched: a failure like any
    # connection's, retried.
    lookups: list[str] = []

    async def later(host: str, port: int) -> list[Any]:
        lookups.append(host)
        return [ipaddress.ip_address("93.184.216.34")] if len(lookups) > 1 else []
    monkeypatch.setattr(_http, "resolve_host", later)
    assert (await client.request("GET", "https://cdn.flaky.test/x.png", idempotent=True)).content == b"a"
    assert lookups == ["cdn.flaky.test"] * 2 and fetched.call_count == 1


@pytest.mark.parametrize("host", ["a..b.example", "x" * 64 + ".example", "cdn.example.."])
async def test_a_name_python_s_idna_codec_refuses_is_looked_up_as_it_is_connected_to(
        monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    # Given as str, the name went through CPython's IDNA 2003 codec first, whose UnicodeError for an
    # empty or 64-character label escaped the guard: the job "crashed in its engine", charged unknown,
    # and a fal job's images fetched before it, paid for, were lost. (No real lookup is made here.)
    asked: list[object] = []

    async def getaddrinfo(name: object, port: int, **_: Any) -> list[Any]:
        asked.append(name)
        if isinstance(name, str):
            name.encode("idna")  # what CPython does with a str: raises for these names
        raise OSError("Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    assert await resolve_host(host, 443) == []  # the real one (not `no_dns`): does not resolve
    assert asked == [host.encode("ascii")]  # the bytes httpx connects to


@pytest.mark.parametrize(("env", "through"), [
    ({}, False),
    ({"HTTPS_PROXY": "http://proxy.studio:3128"}, True),
    ({"ALL_PROXY": "http://proxy.studio:3128"}, True),
    ({"HTTP_PROXY": "http://proxy.studio:3128"}, False),  # not for https
    ({"HTTPS_PROXY": "http://proxy.studio:3128", "NO_PROXY": ".flaky.test"}, False),
    ({"HTTPS_PROXY": "http://proxy.studio:3128", "NO_PROXY": "localhost,*"}, False),  # httpx: no proxy at all
])
async def test_a_name_a_proxy_resolves_is_left_to_it(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], through: bool) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY")  # reads the environment
    assert client._through_proxy(httpx.URL("https://cdn.flaky.test/x.png")) is through
    await client.aclose()


PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


async def test_a_name_is_connected_to_the_address_it_was_checked_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name answered a public address to the check, 127.0.0.1 when httpx resolved
    it again to connect, and the service fetched this machine as an output. (127.0.0.2-3 stand for
    public addresses, real ones would be dialled; https is spoken in clear, no certificate at hand.)"""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    connections: dict[bytes, int] = {b"public": 0, b"private": 0}
    requests: dict[bytes, int] = {b"public": 0, b"private": 0}

    def serving(body: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections[body] += 1
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while await reader.readuntil(b"\r\n\r\n"):  # keeps the connection for the next request
                    requests[body] += 1
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
            writer.close()
        return handle

    private = await asyncio.start_server(serving(b"private"), "127.0.0.1", 0)
    port = private.sockets[0].getsockname()[1]
    public = await asyncio.start_server(serving(b"public"), "127.0.0.2", port)
    # The check's lookup: two addresses, the first refusing connections (as one of a CDN's may).
    checked = [ipaddress.ip_address("127.0.0.3"), ipaddress.ip_address("127.0.0.2")]
    monkeypatch.setattr(_http, "_public", lambda address, public=_http._public: address in checked or public(address))

    async def resolve(host: str, port: int) -> list[Any]:
        return list(checked) if host == "cdn.rebind.test" else []
    monkeypatch.setattr(_http, "resolve_host", resolve)
    loop = asyncio.get_running_loop()
    getaddrinfo = loop.getaddrinfo

    async def rebinding(host: str | bytes, *args: Any, **kwargs: Any) -> Any:  # the connect's lookup
        return await getaddrinfo("127.0.0.1" if host in ("cdn.rebind.test", b"cdn.rebind.test") else host,
                                 *args, **kwargs)
    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    names: list[str | None] = []

    async def in_clear(stream: Any, ssl_context: Any, server_hostname: str | None = None,
                       timeout: float | None = None) -> Any:
        names.append(server_hostname)
        return stream
    monkeypatch.setattr(AnyIOStream, "start_tls", in_clear)
    client = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY")
    try:
        url = f"https://cdn.rebind.test:{port}/out.png"
        answers = [(await client.request("GET", url, idempotent=True)).content for _ in range(2)]
    finally:
        await client.aclose()
        private.close()
        public.close()
    assert answers == [b"public", b"public"] and requests == {b"public": 2, b"private": 0}
    assert connections[b"public"] == 1  # kept for the next request, as before
    assert names == ["cdn.rebind.test"]  # the certificate is still checked against the name


def test_a_client_whose_connections_cannot_be_pinned_is_not_made() -> None:
    # Where an upgrade of httpx or httpcore moves what `pin_connections` reaches into, no client
    # is made: not one that fetches output hosts at whatever their names resolve to when connecting.
    with pytest.raises(RuntimeError, match="moved the connection pool's network backend"):
        _http.pin_connections(httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(200))), None)


@respx.mock
async def test_a_redirect_to_a_private_address_is_not_followed(
        client: RemoteClient, monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"cdn.public.test": "93.184.216.34"})
    respx.get("https://cdn.public.test/out.png").mock(
        return_value=httpx.Response(302, headers={"location": "https://169.254.169.254/latest/meta-data"}))
    metadata = respx.get("https://169.254.169.254/latest/meta-data").mock(return_value=httpx.Response(200))
    with pytest.raises(EngineError, match=r"169\.254\.169\.254 to fetch"):
        await client.request("GET", "https://cdn.public.test/out.png", idempotent=True)
    assert metadata.call_count == 0


@respx.mock
async def test_a_billable_request_redirected_somewhere_refused_may_have_been_billed(
        client: RemoteClient, monkeypatch: pytest.MonkeyPatch) -> None:
    respx.post(f"{BASE}/images").mock(
        return_value=httpx.Response(307, headers={"location": "https://10.0.0.5/images"}))
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert info.value.charged == "unknown" and "10.0.0.5 to fetch" in info.value.message


@respx.mock
async def test_a_redirect_s_body_is_never_read(client: RemoteClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx reads each redirect's body whole, past any cap: a small gzip there inflated to
    hundreds of megabytes."""
    resolving(monkeypatch, {"cdn.public.test": "93.184.216.34"})
    client.max_answer_bytes = 1 << 20
    bomb = gzipped_zeros(64 << 20)
    respx.get(f"{BASE}/out").mock(return_value=httpx.Response(
        302, headers={"location": "https://cdn.public.test/out.png", "content-encoding": "gzip"},
        stream=RecordedStream(bomb.content)))
    respx.get("https://cdn.public.test/out.png").mock(return_value=httpx.Response(200, content=b"png"))
    response = await client.request("GET", "/out", idempotent=True)
    assert response.content == b"png" and [r.status_code for r in response.history] == [302]
    assert RecordedStream.read == 0


@respx.mock
async def test_public_https_hosts_and_the_base_url_s_own_host_are_fetched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"cdn.public.test": "93.184.216.34"})
    public = respx.get("https://cdn.public.test/out.png").mock(return_value=httpx.Response(200, content=b"a"))
    # A local stand-in for the provider, serving its files on another port of its own host.
    own = respx.get("http://127.0.0.1:9001/out.png").mock(return_value=httpx.Response(200, content=b"b"))
    local = RemoteClient("prov", base_url="http://127.0.0.1:9000", key_setting="ORCH_PROV_API_KEY")
    try:
        assert (await local.request("GET", "https://cdn.public.test/out.png", idempotent=True)).content == b"a"
        assert (await local.request("GET", "http://127.0.0.1:9001/out.png", idempotent=True)).content == b"b"
    finally:
        await local.aclose()
    assert public.call_count == own.call_count == 1


class RecordedStream(httpx.AsyncByteStream):
    """A body that counts the bytes taken from it."""

    read = 0

    def __init__(self, data: bytes) -> None:
        self.data = data
        RecordedStream.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), 65536):
            RecordedStream.read += len(self.data[start:start + 65536])
            yield self.data[start:start + 65536]


def gzipped_zeros(size: int) -> httpx.Response:
    import gzip

    return httpx.Response(200, content=gzip.compress(b"\0" * size),
                          headers={"content-encoding": "gzip", "content-type": "application/octet-stream"})


@respx.mock
async def test_an_answer_that_inflates_past_the_cap_is_not_read_or_resent(client: RemoteClient) -> None:
    client.max_answer_bytes = 1 << 20
    route = respx.post(f"{BASE}/images").mock(return_value=gzipped_zeros(4 << 20))  # ~4 KB on the wire
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert route.call_count == 1 and info.value.charged == "unknown" and not info.value.retryable
    assert "larger than 1 MiB once decompressed" in info.value.message


@respx.mock
async def test_an_answer_of_millions_of_json_objects_is_not_parsed(client: RemoteClient,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # 250 KB of gzip inflating to 250 MB of `[{},{},...]`, within the byte cap, held 6.6 GB parsed.
    monkeypatch.setattr("tiers._http.MAX_JSON_CONTAINERS", 1000)
    route = respx.post(f"{BASE}/images").mock(return_value=httpx.Response(
        200, content=b' {"pad": [' + b"{}," * 1000 + b"{}]}", headers={"content-type": "application/json"}))
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert route.call_count == 1 and info.value.charged == "unknown" and not info.value.retryable
    assert "opens more than 1000 JSON objects and arrays" in info.value.message
    # Within it, and an image's bytes however many braces they hold, read as sent.
    respx.get(f"{BASE}/poll").mock(return_value=httpx.Response(200, json={"pad": [{}] * 900}))
    assert len((await client.request("GET", "/poll", idempotent=True)).json()["pad"]) == 900
    respx.get(f"{BASE}/out.png").mock(return_value=httpx.Response(200, content=b"\x89PNG" + b"{[" * 2000))
    assert (await client.request("GET", "/out.png", idempotent=True)).content.startswith(b"\x89PNG")


@respx.mock
async def test_a_compressed_answer_within_the_cap_reads_as_sent(client: RemoteClient) -> None:
    client.max_answer_bytes = 1 << 20
    respx.get(f"{BASE}/out").mock(return_value=gzipped_zeros(1 << 19))
    response = await client.request("GET", "/out", idempotent=True)
    assert response.content == b"\0" * (1 << 19) and "content-encoding" not in response.headers
    assert response.headers["content-type"] == "application/octet-stream"


@respx.mock
async def test_a_client_s_credentials_do_not_follow_a_redirect_to_another_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTOMATIC1111's basic auth (`auth=`): following redirects by hand re-applied it on every hop."""
    resolving(monkeypatch, {"elsewhere.test": "93.184.216.34"})
    respx.get("https://a1111.test/x").mock(
        return_value=httpx.Response(302, headers={"location": "https://elsewhere.test/y"}))
    away = respx.get("https://elsewhere.test/y").mock(return_value=httpx.Response(200, json={}))
    http = RemoteClient("a1111", base_url="https://a1111.test", key_setting="ORCH_A1111_AUTH", auth=("user", "secret"))
    try:
        await http.request("GET", "/x", idempotent=True)
    finally:
        await http.aclose()
    assert "authorization" not in away.calls.last.request.headers


@respx.mock
async def test_a_billable_request_whose_redirect_cannot_be_followed_is_not_sent_again(
        client: RemoteClient, monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"cdn.public.test": "93.184.216.34"})
    sent = respx.post(f"{BASE}/images").mock(
        return_value=httpx.Response(307, headers={"location": "https://cdn.public.test/images"}))
    respx.post("https://cdn.public.test/images").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert sent.call_count == 1 and info.value.charged == "unknown" and not info.value.retryable


async def test_a_transport_s_whole_answers_are_read() -> None:
    """A `transport=` answering with whole bodies (httpx.MockTransport, as a plugin's tests would)."""
    http = RemoteClient("prov", base_url=BASE, key_setting="ORCH_PROV_API_KEY",
                        transport=httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": True})))
    try:
        assert (await http.request("GET", "/x", idempotent=True)).json() == {"ok": True}
    finally:
        await http.aclose()


def streamed(data: bytes, coding: str) -> httpx.Response:
    """An answer read from the network as it would be, 64 KiB at a time, not a mock's whole body."""
    return httpx.Response(200, stream=RecordedStream(data),
                          headers={"content-encoding": coding, "content-type": "application/octet-stream"})


@respx.mock
async def test_one_read_that_inflates_past_the_cap_is_stopped_within_it(client: RemoteClient) -> None:
    """httpx inflates each network read whole: 48 KB of gzip, one read, was 48 MiB in memory."""
    import gzip
    import tracemalloc

    client.max_answer_bytes = 1 << 20
    body = gzip.compress(b"\0" * (48 << 20), 9)
    route = respx.get(f"{BASE}/out").mock(return_value=streamed(body, "gzip"))
    assert len(body) < 65536
    tracemalloc.start()
    try:
        with pytest.raises(EngineError) as info:
            await client.request("GET", "/out", idempotent=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "larger than 1 MiB once decompressed" in info.value.message and route.call_count == 1
    assert peak < 8 << 20


@respx.mock
@pytest.mark.parametrize(("coding", "said"), [("gzip, gzip", "stacked content-codings (gzip, gzip)"),
                                              ("br", "content-coding 'br', which was not asked for")])
async def test_an_answer_in_codings_not_asked_for_is_refused_once(client: RemoteClient, coding: str,
                                                                  said: str) -> None:
    import gzip

    route = respx.get(f"{BASE}/out").mock(return_value=streamed(gzip.compress(gzip.compress(b"x" * 100)), coding))
    with pytest.raises(EngineError) as info:
        await client.request("GET", "/out", idempotent=True)
    assert said in info.value.message and not info.value.retryable and route.call_count == 1
    assert route.calls.last.request.headers["accept-encoding"] == "gzip, deflate"


@respx.mock
@pytest.mark.parametrize("wbits", [15, -15], ids=["zlib-wrapped", "raw"])
async def test_deflate_answers_read_in_either_form(client: RemoteClient, wbits: int) -> None:
    import zlib

    data = bytes(range(256)) * 1000
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    respx.get(f"{BASE}/out").mock(return_value=streamed(packer.compress(data) + packer.flush(), "deflate"))
    assert (await client.request("GET", "/out", idempotent=True)).content == data


@respx.mock
@pytest.mark.parametrize("status", [503, 403, 404])
async def test_a_billable_request_redirected_to_a_failing_target_is_not_sent_again(
        client: RemoteClient, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    """The provider answered (303 to its result): the target's 503 is not the provider saying
    nothing was made, nor its 403 a refused key."""
    resolving(monkeypatch, {"cdn.public.test": "93.184.216.34"})
    sent = respx.post(f"{BASE}/images").mock(
        return_value=httpx.Response(303, headers={"location": "https://cdn.public.test/result/1"}))
    respx.get("https://cdn.public.test/result/1").mock(return_value=httpx.Response(status))
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert type(info.value) is EngineError and sent.call_count == 1
    assert info.value.charged == "unknown" and not info.value.retryable
    assert f"its target answered HTTP {status}" in info.value.message


@respx.mock
async def test_a_retry_after_date_past_any_calendar_is_no_hint(client: RemoteClient) -> None:
    route = respx.post(f"{BASE}/images").mock(side_effect=[
        httpx.Response(503, headers={"retry-after": "Mon, 01 Jan 2020 00:00:00 +99999999999999999999"}),
        httpx.Response(200, json={"ok": True})])
    assert (await client.request("POST", "/images", json={})).json() == {"ok": True}
    assert route.call_count == 2


class Pieces(httpx.AsyncByteStream):
    """A body arriving in the given pieces."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def in_pieces(coding: str, *pieces: bytes) -> httpx.Response:
    return httpx.Response(200, stream=Pieces(*pieces), headers={"content-encoding": coding})


@respx.mock
async def test_compressed_bodies_read_as_gzip_and_zlib_read_them(client: RemoteClient) -> None:
    import gzip
    import zlib

    data = bytes(range(256)) * 8
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw_body = raw.compress(data) + raw.flush()
    one, two = gzip.compress(data[:1000]), gzip.compress(data[1000:])
    respx.get(f"{BASE}/members").mock(return_value=in_pieces("gzip", one + two[:5], two[5:]))
    respx.get(f"{BASE}/raw").mock(return_value=in_pieces("deflate", raw_body[:1], raw_body[1:]))
    respx.get(f"{BASE}/trailing").mock(return_value=in_pieces("gzip", one, b"\0" * 16))
    respx.post(f"{BASE}/not-a-coding").mock(return_value=in_pieces("UTF-8", b"plain"))
    # Concatenated members are one body (only the first was read); a raw deflate body whose first
    # read was one byte lost that byte; zeros after the member are ignored, as by gzip(1); a
    # token that names no compression is no compression (it was refused, a paid image with it).
    assert (await client.request("GET", "/members", idempotent=True)).content == data
    assert (await client.request("GET", "/raw", idempotent=True)).content == data
    assert (await client.request("GET", "/trailing", idempotent=True)).content == data[:1000]
    assert (await client.request("POST", "/not-a-coding")).content == b"plain"


@respx.mock
async def test_a_compressed_body_cut_short_is_not_taken_for_the_whole(client: RemoteClient) -> None:
    import gzip

    body = gzip.compress(bytes(range(256)) * 8)
    route = respx.post(f"{BASE}/images").mock(return_value=in_pieces("gzip", body[:-6]))
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={})
    assert route.call_count == 1 and info.value.charged == "unknown"
    # A second member cut before its first byte out is not bytes trailing the first.
    respx.get(f"{BASE}/second").mock(return_value=in_pieces("gzip", body + body[:20]))
    with pytest.raises(EngineError, match="could not be read"):
        await client.request("GET", "/second", idempotent=True)


@contextlib.asynccontextmanager
async def first_answer_cut(head: str, then: str = "drop",
                           redirect: bool = False) -> AsyncIterator[tuple[str, list[int]]]:
    """A server whose first answer is `head` and 10 of its 500 promised bytes, then a dropped
    connection (`then="drop"`) or silence (`"stall"`); every later request gets a 200. With
    `redirect`, a 307 to /other comes first (not counted in the calls)."""
    calls: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        if redirect and not request.split(b" ", 2)[1].startswith(b"/other"):
            await reader.readexactly(int(request.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
            writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /other\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        calls.append(1)
        if len(calls) == 1:
            writer.write(f"HTTP/1.1 {head}\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                         '{"error": '.encode())
            await writer.drain()
            if then == "stall":
                await asyncio.sleep(30)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    async with loopback(handle) as url:
        yield url, calls


@pytest.mark.parametrize("head", ["503 Service Unavailable", "429 Too Many Requests"])
async def test_a_refusal_whose_body_is_cut_off_is_retried_as_a_refusal(head: str, sleep: Any) -> None:
    # Its status line said nothing was made; only the explanation was lost.
    async with first_answer_cut(head) as (url, calls):
        client = RemoteClient("prov", base_url=url, key_setting="ORCH_PROV_API_KEY", deadline=60.0,
                              sleep=sleep, clock=sleep.clock)
        response = await client.request("POST", "/images", json={"prompt": "x"})
        await client.aclose()
    assert (response.status_code, len(calls)) == (200, 2)


async def test_an_answer_cut_off_after_a_200_may_still_have_been_billed(sleep: Any) -> None:
    async with first_answer_cut("200 OK") as (url, calls):
        client = RemoteClient("prov", base_url=url, key_setting="ORCH_PROV_API_KEY", deadline=60.0,
                              sleep=sleep, clock=sleep.clock)
        with pytest.raises(EngineTimeout) as info:
            await client.request("POST", "/images", json={"prompt": "x"})
        await client.aclose()
    assert (info.value.charged, len(calls)) == ("unknown", 1)


async def test_a_refusal_whose_body_stalls_to_the_deadline_cost_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tiers._http.MIN_ATTEMPT_SECONDS", 0.1)
    async with first_answer_cut("503 Service Unavailable", then="stall") as (url, calls):
        client = RemoteClient("prov", base_url=url, key_setting="ORCH_PROV_API_KEY", deadline=0.5,
                              read_timeout=5.0)
        with pytest.raises(EngineError) as info:
            await client.request("POST", "/images", json={"prompt": "x"})
        await client.aclose()
    assert (info.value.charged, info.value.details.get("status"), len(calls)) == ("no", 503, 1)
    assert info.value.message.endswith("provider error HTTP 503: (its body was cut off)")


@pytest.mark.parametrize("then", ["drop", "stall"])
async def test_a_redirected_paid_request_whose_refusal_is_cut_off_may_have_been_billed(
        then: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The provider answered the billable request (with a redirect): its target's 503 is not the
    # provider saying nothing was made, whether its body is cut off or stalls.
    monkeypatch.setattr("tiers._http.MIN_ATTEMPT_SECONDS", 0.1)
    async with first_answer_cut("503 Service Unavailable", then=then, redirect=True) as (url, calls):
        client = RemoteClient("prov", base_url=url, key_setting="ORCH_PROV_API_KEY", deadline=0.5,
                              read_timeout=5.0)
        with pytest.raises(EngineError) as info:
            await client.request("POST", "/images", json={"prompt": "x"})
        await client.aclose()
    assert (info.value.charged, len(calls)) == ("unknown", 1), info.value.message


async def test_a_500_whose_body_is_cut_off_is_not_taken_for_a_refusal(sleep: Any) -> None:
    # A webui's "processing failed" is told by its body (`tiers.a1111.not_sent_again`): cut off,
    # it must not be sent again for the webui to render once more.
    from tiers.a1111 import not_sent_again

    async with first_answer_cut("500 Internal Server Error") as (url, calls):
        client = RemoteClient("prov", base_url=url, key_setting="ORCH_PROV_API_KEY", deadline=60.0,
                              sleep=sleep, clock=sleep.clock)
        client.final_answer = not_sent_again
        with pytest.raises(EngineTimeout) as info:
            await client.request("POST", "/sdapi/v1/img2img", json={"prompt": "x"})
        await client.aclose()
    assert (info.value.charged, len(calls)) == ("unknown", 1)



async def test_scrub_takes_out_only_our_own_credentials_and_short_ones_as_words() -> None:
    # An output URL's `user:pass@` is the provider's, not ours: remembered, "out of memory" in a
    # failure text became "***", and a provider could change how a failure was judged. A
    # self-hosted server's short password was left in.
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200)

    client = RemoteClient("comfyui", base_url="http://admin:hunter2@comfy.test:8188", key_setting="ORCH_COMFYUI_URL",
                          transport=httpx.MockTransport(answer))
    await client.request("GET", "/queue", idempotent=True)
    await client.request("GET", "https://cdn:out%20of%20memory@cdn.example.com/o.png", idempotent=True)
    assert seen[0].startswith("Basic ") and seen[1].startswith("Basic ")  # both sent one
    assert client.scrub("bad login admin:hunter2; password hunter2, not hunter22") == (
        "bad login ***; password ***, not hunter22")
    assert client.scrub("CUDA out of memory") == "CUDA out of memory"
    await client.aclose()


@respx.mock
async def test_a_provider_that_refuses_connections_lets_the_job_fall_back_soon(client: RemoteClient,
                                                                               sleep: Any) -> None:
    # Retried until half the deadline (150 s by default): each job held over two minutes before
    # another engine could take it, though nothing was ever sent.
    route = respx.post(f"{BASE}/images").mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert "could not reach the provider" in info.value.message and "nothing was sent" in info.value.message
    assert info.value.retryable and info.value.charged == "no"
    assert route.call_count == 4 and sum(sleep.waits) < 10


@respx.mock
async def test_a_connection_refused_now_and_then_is_ridden_out(client: RemoteClient, sleep: Any) -> None:
    # Refusals between other answers are not "in a row"; a poll is not held to the count at all.
    route = respx.post(f"{BASE}/images").mock(side_effect=[
        httpx.ConnectError("refused"), httpx.ConnectError("refused"), httpx.ConnectError("refused"),
        httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(200, json={"ok": 1})])
    assert (await client.request("POST", "/images", json={})).json() == {"ok": 1}
    assert route.call_count == 6
    poll = respx.get(f"{BASE}/results/1").mock(
        side_effect=[httpx.ConnectError("refused")] * 6 + [httpx.Response(200, json={"ok": 2})])
    assert (await client.request("GET", "/results/1", idempotent=True)).json() == {"ok": 2}
    assert poll.call_count == 7


@contextlib.asynccontextmanager
async def answers_that_never_come(then: str) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on 127.0.0.1 that takes each request and then stays silent (`then="silent"`), or
    sends the head and part of the body and drops the connection (`"drop"`)."""
    calls: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        calls.append(1)
        if then == "silent":
            await asyncio.sleep(30)
        else:
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"id": ')
            await writer.drain()
        writer.close()

    async with loopback(handle) as url:
        yield url, calls


@pytest.mark.parametrize("then", ["silent", "drop"])
async def test_a_poll_the_provider_never_answers_is_a_timeout_not_a_request_that_never_left(
        then: str, sleep: Any) -> None:
    # A status poll of paid work whose every try was taken and not answered (a stalled gateway)
    # failed the job as "could not reach the provider ...; nothing was sent", an `engine_error`,
    # where the same poll trickling its answer was a `timeout`: the provider was reached, and the
    # work the poll follows may be billed.
    async with answers_that_never_come(then) as (url, calls):
        client = RemoteClient("prov", base_url=url, key_setting="ORCH_PROV_API_KEY", deadline=60.0,
                              read_timeout=0.1, sleep=sleep, clock=sleep.clock)
        with pytest.raises(EngineTimeout) as info:
            await asyncio.wait_for(client.request("GET", "/predictions/p-1", idempotent=True), 10)
        await client.aclose()
    assert len(calls) > 1  # a poll is asked again until the deadline
    assert "could not reach" not in info.value.message and "nothing was sent" not in info.value.message
    assert info.value.code == "timeout" and info.value.charged == "no"  # the poll itself costs nothing


@respx.mock
@pytest.mark.parametrize("charset", ["base64", "rot13"])
@pytest.mark.parametrize("size", [100, 2 * 2**20], ids=["small", "past-the-json-bound"])
async def test_an_error_body_in_a_charset_that_is_no_text_encoding_is_still_told(
        client: RemoteClient, charset: str, size: int) -> None:
    # A codec Python knows that decodes no text (`base64`, `rot13`): quoting the body raised
    # (AssertionError, TypeError or LookupError) out of the client, a 503 that had sent nothing
    # failing its job as an engine bug, charged "unknown", with no fallback.
    body = b"Service Unavailable " * (size // 20)
    route = respx.post(f"{BASE}/images").mock(return_value=httpx.Response(
        503, content=body, headers={"content-type": f"text/plain; charset={charset}"}))
    with pytest.raises(EngineError) as info:
        await client.request("POST", "/images", json={"prompt": "a lighthouse"})
    assert route.call_count >= 1 and info.value.charged == "no"
    assert "Service Unavailable" in info.value.message


class _Connected(httpcore.AsyncNetworkStream):
    def __init__(self, host: str) -> None:
        self.host = host


class _SlowToAccept(httpcore.AsyncNetworkBackend):
    """Every address accepts after `latency` seconds (a lost SYN is sent again after 1 s), and
    times out on a timeout shorter than that, as a real connect does."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.tried: list[str] = []

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> _Connected:
        self.tried.append(host)
        if timeout is not None and timeout < self.latency:
            await asyncio.sleep(timeout)
            raise httpcore.ConnectTimeout(f"{host} did not answer in {timeout}")
        await asyncio.sleep(self.latency)
        return _Connected(host)


async def test_a_host_whose_addresses_are_all_slow_connects_within_the_connect_timeout() -> None:
    # Before pinning, anyio connected the name trying its addresses a quarter-second apart, all
    # within the one connect timeout (happy eyeballs). Split into equal shares, two addresses
    # that each take 0.3 s of a 0.5 s timeout never connected.
    inner = _SlowToAccept(0.3)
    backend = _http._PinnedBackend(inner, None)
    backend.pin("cdn.slow.test", [ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")])
    stream = await backend.connect_tcp("cdn.slow.test", 443, timeout=0.5)
    assert isinstance(stream, _Connected) and stream.host == "192.0.2.1"
