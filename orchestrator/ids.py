"""Opaque, time-ordered ids (`job_01J...`): sorting by id is sorting by creation, which makes
cursor pagination a simple `id > cursor`."""

from __future__ import annotations

import os
import re
import threading
import time

from orchestrator.errors import InvalidRequest

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_lock = threading.Lock()
_last = (0, 0)
ID_RE = re.compile(r"^[a-z]{3}_[0-9a-hjkmnp-tv-z]{26}$")
_INT_CURSOR = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and always within SQL's BIGINT
# The ledger's ids are SQL INTEGERs: PostgreSQL refuses a larger number outright (a 500, not a miss).
MAX_INT_ID = 2**31 - 1


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """48 bits of milliseconds then 80 random bits, monotonic within a process."""
    global _last
    with _lock:
        ms = int(time.time() * 1000)
        last_ms, last_rand = _last
        rand = last_rand + 1 if ms <= last_ms else int.from_bytes(os.urandom(10), "big")
        ms = max(ms, last_ms)
        _last = (ms, rand)
    return f"{prefix}_{_b32(ms, 10)}{_b32(rand & ((1 << 80) - 1), 16)}"


def _malformed(cursor: str) -> InvalidRequest:
    return InvalidRequest("malformed cursor: pass back the 'next_cursor' of the previous page",
                          details={"cursor": cursor})


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
