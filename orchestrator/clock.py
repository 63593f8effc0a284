"""Two clocks. `utcnow()` is this host's: the times a row records for people (a job's start and
end), compared with other times of this host (a preview file's). `shared_now()` is the one every
host sharing the database agrees on: inside a PostgreSQL write transaction the database server's,
else this host's. Leases are stamped and judged by it, ids made from it, and ledger entries (whose
times decide the budget window they count in), whatever the hosts' own clocks say (a host running
a minute ahead took live jobs as orphans)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

# Microseconds since the epoch by the clock of this block (see `using`); None: this host's.
_clock: ContextVar[Callable[[], int] | None] = ContextVar("clock", default=None)


class DatabaseClock:
    """A database server's clock, read once and carried on by this host's monotonic clock (which
    never steps, unlike its wall clock)."""

    def __init__(self, database_microseconds: int) -> None:
        self.start = (database_microseconds, time.monotonic_ns() // 1000)

    def __call__(self) -> int:
        database, monotonic = self.start
        return database + time.monotonic_ns() // 1000 - monotonic


@contextmanager
def using(microseconds: Callable[[], int]) -> Iterator[None]:
    """Tell the time of this block (this thread or task) by `microseconds` instead of this host's
    clock: `Database.transaction` passes the database's on PostgreSQL."""
    token = _clock.set(microseconds)
    try:
        yield
    finally:
        _clock.reset(token)


def by_database() -> bool:
    """Whether this block tells the time by a database's clock."""
    return _clock.get() is not None


def _host_us() -> int:
    return time.time_ns() // 1000


def now_us() -> int:
    """`shared_now()` in microseconds since the epoch."""
    source = _clock.get()
    return source() if source is not None else _host_us()


def at(microseconds: int) -> datetime:
    return datetime.fromtimestamp(microseconds // 1_000_000, UTC).replace(microsecond=microseconds % 1_000_000)


def utcnow() -> datetime:
    """This host's clock."""
    return at(_host_us())


def shared_now() -> datetime:
    """The clock hosts sharing the database agree on (see the module docstring)."""
    return at(now_us())


def iso(value: datetime) -> str:
    """ISO 8601 with `Z` for UTC, as pydantic writes the API's other times."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
