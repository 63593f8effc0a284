"""A project key's event-stream slots (ORCH_MAX_STREAMS_PER_KEY), given back however a stream ends."""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from typing import Any

import pytest

from orchestrator.api.jobs import HeldStream
from orchestrator.errors import TooManyStreams
from orchestrator.stream_slots import StreamSlots


def test_slots_are_counted_per_key_and_given_back_once() -> None:
    slots = StreamSlots(limit=2)
    first, _second = slots.take("key_a"), slots.take("key_a")
    with pytest.raises(TooManyStreams) as refused:
        slots.take("key_a")
    assert (refused.value.status, refused.value.code, refused.value.retry_after) == (429, "rate_limited", 5)
    slots.take("key_b")  # another key's own count
    first()
    first()  # twice: still one slot back, not two
    slots.take("key_a")
    with pytest.raises(TooManyStreams):
        slots.take("key_a")


def test_no_limit_takes_every_stream() -> None:
    slots = StreamSlots(limit=0)
    for _ in range(1000):
        slots.take("key_a")  # never refused


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("sending", ["fails", "is silent"])  # uvicorn, after a hang-up, drops what is sent
async def test_a_stream_whose_client_left_before_its_first_byte_gives_its_slot_back(spec_version: str,
                                                                                    sending: str) -> None:
    """Its body may never start, so a `finally` in the body would never run: the answer itself gives it back."""
    released: list[bool] = []

    async def body() -> Any:
        yield "never sent"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if sending == "fails":
            raise OSError("the client is gone")

    stream = HeldStream(body(), release=lambda: released.append(True), headers={})
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
    with contextlib.suppress(Exception):  # how Starlette reports the hang-up depends on the spec version
        await stream(scope, receive, send)
    assert released == [True]
