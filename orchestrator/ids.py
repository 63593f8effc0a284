"""Opaque, time-ordered ids (`job_01J...`): sorting by id is sorting by creation, which makes
cursor pagination a simple `id > cursor`."""

from __future__ import annotations

import os
import re
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_lock = threading.Lock()
_last = (0, 0)
ID_RE = re.compile(r"^[a-z]{3}_[0-9a-hjkmnp-tv-z]{26}$")


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
