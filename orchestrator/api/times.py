"""RFC 3339 times in query strings (`?from=`, `?since=`): read as the contract writes them, with
a zone, and refused (422 `invalid_request`, naming the parameter) as anything else, rather than
read as pydantic's guess (a bare number as Unix seconds, a decimal comma)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator

from orchestrator.errors import InvalidRequest


def _rfc3339(value: Any) -> Any:
    # Pydantic reads a bare number as Unix seconds ("to=0.5" was 1970); the contract's times are RFC 3339.
    if isinstance(value, str) and (not _DATE.match(value) or not value.isascii()):
        raise ValueError("expected an RFC 3339 time, e.g. 2026-11-01T00:00:00Z")
    if isinstance(value, str) and "," in value:
        # A decimal comma (ISO 8601 allows one, RFC 3339 does not) passed pydantic, and its digits
        # past the microsecond were cut where a point's are rounded up: the bound moved back.
        raise ValueError("expected an RFC 3339 time, e.g. 2026-11-01T00:00:00.5Z (a fraction after a '.', not a ',')")
    if isinstance(value, str) and _UNENCODED_PLUS.search(value):
        # A query string reads `+` as a space: `...T01:00:00+01:00` arrives as `...T01:00:00 01:00`.
        raise ValueError("a '+' in a query string reads as a space: URL-encode the zone's '+' as %2B")
    if isinstance(value, str):
        _in_range(value)
    fraction = _BEYOND_MICROSECONDS.search(value) if isinstance(value, str) else None
    if fraction is not None:
        # RFC 3339 allows any number of digits (Go and .NET send 7 to 9); pydantic drops those past
        # the microsecond. Times are stored in whole microseconds, so rounding a bound up to the
        # next one keeps it exact, for `from` (inclusive) as for `to` (exclusive).
        cut = value[:fraction.start(2)] + value[fraction.end(2):]
        try:
            parsed = datetime.fromisoformat(cut.upper())  # RFC 3339 allows a lower-case t and z; Python does not
        except ValueError:
            return value  # pydantic says what is wrong with it
        if not fraction.group(2).strip("0"):
            return parsed
        try:
            return parsed + timedelta(microseconds=1)
        except OverflowError:  # past 9999-12-31T23:59:59.999999: not a ValueError, it was a 500
            raise ValueError("is out of range (after 9999-12-31T23:59:59.999999)") from None
    return value


def _in_range(value: str) -> None:
    """Raise ValueError naming the part of a time that is out of range (hour 24, second 60, a
    zone 25 hours off, 30 February): pydantic said "unexpected extra characters" of them. A
    value Python cannot read for another reason is left to pydantic to describe."""
    try:
        datetime.fromisoformat(value.upper())  # RFC 3339 allows a lower-case t and z; Python does not
    except ValueError as exc:
        said = str(exc)
        if said.startswith("offset must be"):
            raise ValueError("is out of range: a zone's offset is less than 24 hours (-23:59 to +23:59)") from None
        if " must be in " in said or "out of range" in said:
            raise ValueError(f"is out of range: {said}") from None


# ASCII digits only, as RFC 3339 has them (a time of other characters is refused before these):
# `\d` alone took an Arabic zero past the microsecond and moved the bound a microsecond up.
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_UNENCODED_PLUS = re.compile(r"[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)? \d{2}:?\d{2}$", re.ASCII)
_BEYOND_MICROSECONDS = re.compile(r"[Tt ]\d{2}:\d{2}:\d{2}\.(\d{6})(\d+)", re.ASCII)
Rfc3339 = Annotated[datetime, BeforeValidator(_rfc3339)]


def utc_bound(name: str, value: datetime | None) -> datetime | None:
    """Query parameter `name`'s time in UTC; 422 for one without a zone (a naive time is no
    instant) or out of range once in UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise InvalidRequest(f"'{name}' needs a timezone (RFC 3339, e.g. 2026-11-01T00:00:00Z)", loc=("query", name))
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is a year before the first one
        raise InvalidRequest(f"'{name}' is out of range once in UTC", details={name: value.isoformat()},
                             loc=("query", name)) from None


