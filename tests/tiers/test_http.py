"""The one retry layer (tiers/_http.py): an answer that arrived but cannot be read is not a request
that never left."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from orchestrator.errors import EngineError, EngineUnavailable
from tiers._http import RemoteClient

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
