"""Opaque, time-ordered ids (`job_01J...`): sorting by id is sorting by creation, which makes
cursor pagination a simple `id > cursor`."""

from __future__ import annotations

import os
import re
import threading
from datetime import UTC, datetime, timedelta

from orchestrator import clock
from orchestrator.errors import InvalidRequest, shown

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_lock = threading.Lock()
# The last id made, per clock (this host's, or a database's): monotonic within each.
_last: dict[str, tuple[int, int]] = {}
ID_RE = re.compile(r"^[a-z]{3}_[0-9a-hjkmnp-tv-z]{26}$")
_INT_CURSOR = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and always within SQL's BIGINT
# The ledger's ids are SQL INTEGERs: PostgreSQL refuses a larger number outright (a 500, not a miss).
MAX_INT_ID = 2**31 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """48 bits of milliseconds, 10 of the microsecond within it, 70 random bits; monotonic within
    a process. The microseconds order the ids of two processes made in one millisecond: writes
    are serialised (`Database.transaction`), so an id made in a later transaction is made later,
    and with the random bits alone it would still sort first half of the time."""
    us = clock.now_us()  # the database's clock in a PostgreSQL write transaction: see `orchestrator.clock`
    which = "database" if clock.by_database() else "local"
    with _lock:
        ms = us // 1000
        tail = (us % 1000) << 70 | int.from_bytes(os.urandom(9), "big") >> 2
        last = _last.get(which, (0, 0))
        if (ms, tail) <= last:  # the same instant, or the clock stepped back
            ms, tail = last[0], last[1] + 1
        _last[which] = (ms, tail)
    return f"{prefix}_{_b32(ms, 10)}{_b32(tail & ((1 << 80) - 1), 16)}"


# Crockford's letters as the digits `int(..., 32)` reads: a decode a few times faster than a loop.
_AS_DIGITS = str.maketrans(_ALPHABET, "0123456789abcdefghijklmnopqrstuv")


def made_at(made: str) -> datetime:
    """The time `new_id` made `made` at, to the microsecond, by the clock it was made from: that
    clock's time then, or, when it had stepped back, the later time of the id made before it (ids
    stay ordered), ahead of it."""
    digits = made.partition("_")[2][:12].translate(_AS_DIGITS)
    # 10 letters of milliseconds, then the tail, whose first 10 bits (2 letters) are the microsecond.
    return clock.at(int(digits[:10], 32) * 1000 + int(digits[10:], 32))


def lowest_id(prefix: str, when: datetime) -> str:
    """The least id `new_id(prefix)` makes at `when`'s millisecond: every id made then or later
    sorts at or after it, every one made before it sorts before it (by the clock ids are made from)."""
    us = (when - _EPOCH) // timedelta(microseconds=1)
    return f"{prefix}_{_b32(max(0, us // 1000), 10)}{'0' * 16}"


def _malformed(cursor: str) -> InvalidRequest:
    return InvalidRequest("malformed cursor: pass back the 'next_cursor' of the previous page",
                          details={"cursor": shown(cursor)}, loc=("query", "cursor"))


def id_cursor(cursor: str | None, prefix: str) -> str | None:
    """The id a page starts after: one of the listed kind (`prefix`), as `next_cursor` gives it.
    An empty cursor is the first page, like no cursor; any other text is refused, as it would
    silently start the list somewhere."""
    if not cursor:
        return None
    if not ID_RE.fullmatch(cursor) or not cursor.startswith(f"{prefix}_"):
        raise _malformed(cursor)
    return cursor


def int_cursor(cursor: str | None) -> int | None:
    """`id_cursor` for tables keyed by integers (the ledger)."""
    if not cursor:
        return None
    if not _INT_CURSOR.fullmatch(cursor):
        raise _malformed(cursor)
    return min(int(cursor), MAX_INT_ID)  # past every id: an empty page
