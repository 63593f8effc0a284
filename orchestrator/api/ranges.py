"""Byte range requests (RFC 9110 section 14) of an image whose bytes never change.

One satisfiable range of bytes is answered 206 with those bytes; one that no byte of the image is
in, 416. A `Range` this service does not take is ignored, as section 14.2 allows any server to
ignore one: the image is sent whole (200). That is a header that is not a `bytes` range set, or
one with an invalid range (`bytes=5-2`, `bytes=a-b`), sent on more than one line, and a set of
two or more ranges: answered whole, the client has every byte it asked for, and the service never
writes a multipart/byteranges body nor reads the image once for each of a thousand ranges.
"""

from __future__ import annotations

import re

from orchestrator.errors import RangeNotSatisfiable

# One range-spec (RFC 9110 14.1.1): `first-` or `first-last`, or `-suffix`; digits are ASCII only
# (`str.isdigit` takes `²` and the other scripts' digits).
_RANGE_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)", re.ASCII)
# Past the largest image by far: a longer number is read as this. Python refuses to read one of
# more than 4300 digits, and a head of 32 KiB may hold one.
_BEYOND_DIGITS = 18


def _number(digits: str) -> tuple[int, str]:
    """`digits` as a key that orders numbers of any length: its significant digits' count, then
    those digits, which order as the numbers do among numbers as long (two of 20 digits read as
    one key made `bytes=<20 nines>-<a smaller 20>` a 416, where a last before the first is ignored)."""
    significant = digits.lstrip("0")
    return len(significant), significant


def _position(digits: str, size: int) -> int:
    """`digits` as a byte position, `size` or more read as `size`."""
    places, significant = _number(digits)
    return size if places > _BEYOND_DIGITS else min(int(significant or "0"), size)


def byte_range(ranges: list[str], if_range: list[str], etag: str, size: int) -> tuple[int, int] | None:
    """The bytes `[start, end]` (end included) of an image of `size` bytes that the request's
    `Range` lines ask for, or None to send it whole (no `Range`, one this service ignores, or an
    `If-Range` that is not the image's `etag`). Raises `RangeNotSatisfiable` for a range none of
    its bytes is in."""
    if len(ranges) != 1:  # none, or a field that may be sent once sent twice: invalid, ignored
        return None
    # If-Range (RFC 9110 13.1.5) compares strongly, and a date is never the image's validator (it
    # has no Last-Modified): either way the client's partial copy may be of other bytes, so it
    # gets the whole image.
    if if_range and (len(if_range) != 1 or if_range[0].strip(" \t") != etag):
        return None
    unit, equals, ranges_set = ranges[0].strip(" \t").partition("=")
    if not equals or unit.lower() != "bytes":  # range units are case-insensitive (14.1)
        return None
    # A list may hold empty elements, which its reader ignores (RFC 9110 5.6.1).
    specs = [spec for spec in (part.strip(" \t") for part in ranges_set.split(",")) if spec]
    if len(specs) != 1:
        return None
    spec = _RANGE_SPEC.fullmatch(specs[0])
    if spec is None:
        return None
    first, last, suffix = spec.groups()
    if suffix is not None:
        if _number(suffix)[0] == 0:
            raise RangeNotSatisfiable(f"the range 'bytes={specs[0][:60]}' asks for no bytes; the image has "
                                      f"{size} bytes", size=size)
        if size == 0:
            # Satisfiable (14.1.1: of no bytes, a suffix of some is), yet no Content-Range can
            # name a byte of it: sent whole, as an ignored Range is.
            return None
        return size - _position(suffix, size), size - 1
    if last and _number(last) < _number(first):  # 14.1.1: invalid, so the header is ignored
        return None
    start = _position(first, size)
    if start >= size:
        raise RangeNotSatisfiable(f"the range 'bytes={specs[0][:60]}' starts past the image's last byte; it has "
                                  f"{size} bytes", size=size)
    return start, (min(_position(last, size), size - 1) if last else size - 1)
