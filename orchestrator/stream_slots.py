"""The event streams each project key holds open (ORCH_MAX_STREAMS_PER_KEY).

A stream holds a connection, a subscription and a key check every few seconds for as long as the
client stays: a client that reconnects in a loop without closing, or follows every job of a batch
at once, could hold thousands. Counted per process (each server answers its own connections)."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.errors import TooManyStreams


class StreamSlots:
    """How many event streams each project key has open in this process. Used on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self._open: dict[str, int] = {}

    def check(self, key_id: str) -> None:
        """`TooManyStreams` when `key_id` holds every slot it may."""
        held = self._open.get(key_id, 0)
        if self.limit and held >= self.limit:
            raise TooManyStreams(
                f"this key already has {held} event stream{'' if held == 1 else 's'} open on this server "
                "(ORCH_MAX_STREAMS_PER_KEY): close one, or poll GET /v1/jobs/{id}",
                details={"open": held, "limit": self.limit})

    def take(self, key_id: str) -> Callable[[], None]:
        """A slot for one more stream of `key_id`, or `TooManyStreams`; returns what gives it back
        (once, however often it is called)."""
        self.check(key_id)
        self._open[key_id] = self._open.get(key_id, 0) + 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            left = self._open[key_id] - 1
            if left:
                self._open[key_id] = left
            else:
                del self._open[key_id]

        return give_back
