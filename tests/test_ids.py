"""Ids are list cursors: they sort in the order they were made, within a process and across two."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator import clock, ids


def made_at(monkeypatch: pytest.MonkeyPatch, ns: int, random: bytes) -> str:
    monkeypatch.setattr(clock, "_host_us", lambda: ns // 1000)
    monkeypatch.setattr(ids, "os", SimpleNamespace(urandom=lambda size: random[:size]))
    return ids.new_id("job")


def test_two_processes_in_one_millisecond_sort_by_the_microsecond(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes are serialised, so a later transaction's id is made later; within one millisecond
    only the microseconds can say so (a fresh process has no previous id to count from)."""
    monkeypatch.setattr(ids, "_last", {})
    first = made_at(monkeypatch, 1_790_000_000_123_400_000, b"\xff" * 10)  # the largest random part
    monkeypatch.setattr(ids, "_last", {})  # the other process
    second = made_at(monkeypatch, 1_790_000_000_123_401_000, b"\x00" * 10)  # 1 us later, the smallest
    assert first[:14] == second[:14]  # the same millisecond
    assert second > first
    assert ids.ID_RE.fullmatch(first) and ids.ID_RE.fullmatch(second)


def test_ids_stay_ordered_when_the_clock_stands_still_or_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "_last", {})
    first = made_at(monkeypatch, 1_790_000_000_123_999_000, b"\xff" * 10)
    same = made_at(monkeypatch, 1_790_000_000_123_999_000, b"\x00" * 10)
    back = made_at(monkeypatch, 1_790_000_000_100_000_000, b"\x00" * 10)  # NTP stepped the clock back
    assert first < same < back


def test_an_id_tells_the_microsecond_it_was_made_at(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "_last", {})
    first = made_at(monkeypatch, 1_790_000_000_123_456_789, b"\x00" * 10)
    assert ids.made_at(first) == clock.at(1_790_000_000_123_456)
    # After the clock stepped back, an id made then is of the time of the one before it: ahead of the clock.
    back = made_at(monkeypatch, 1_790_000_000_100_000_000, b"\x00" * 10)
    assert ids.made_at(back) == clock.at(1_790_000_000_123_456)
    assert ids.made_at(ids.lowest_id("whd", clock.at(1_790_000_000_123_456))) == clock.at(1_790_000_000_123_000)
