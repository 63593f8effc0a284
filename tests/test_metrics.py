"""`/metrics`' reads: scrapes that come while one reads share it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from orchestrator.metrics import SharedRead
from orchestrator.services import Services
from tests.conftest import SettingsFactory

SCRAPES = 8


class HeldRead:
    """A read that counts its calls and waits for `release` before it answers."""

    def __init__(self, answer: Any = "text") -> None:
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.answer = answer

    def __call__(self, *_: Any) -> str:
        self.calls += 1
        self.started.set()
        assert self.release.wait(10)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return f"{self.answer} {self.calls}"


def scrapes_during_one_read(scrape: Any, read: HeldRead) -> list[Any]:
    """`SCRAPES` scrapes, all sent while the first one's read is held; what each got (or raised)."""
    def one() -> Any:
        try:
            return scrape()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(SCRAPES) as pool:
        first = pool.submit(one)
        assert read.started.wait(10)
        rest = [pool.submit(one) for _ in range(SCRAPES - 1)]
        time.sleep(0.3)  # for the scrapes to come: one late on a busy machine reads again, with any later still
        read.release.set()
        return [first.result(10), *(future.result(10) for future in rest)]


def test_scrapes_that_come_while_one_reads_share_its_read_and_a_later_one_reads_afresh() -> None:
    read = HeldRead()
    shared = SharedRead(read)
    answers = scrapes_during_one_read(shared, read)
    # Before, each read alone: as many reads as scrapes.
    assert read.calls < SCRAPES // 2 and answers[0] == "text 1" and answers.count("text 1") > SCRAPES // 2, answers
    calls = read.calls
    assert shared() == f"text {calls + 1}"  # none running: read afresh


def test_a_failed_read_is_told_to_every_scrape_that_shared_it_and_the_next_reads_again() -> None:
    read = HeldRead(RuntimeError("database away"))
    shared = SharedRead(read)
    answers = scrapes_during_one_read(shared, read)
    assert all(isinstance(answer, RuntimeError) for answer in answers), answers
    read.answer = "back"
    assert shared() == f"back {read.calls}"


@pytest.fixture
def services(make_settings: SettingsFactory) -> Iterator[Services]:
    built = Services.build(make_settings())
    yield built
    asyncio.run(built.aclose())


def test_a_burst_of_scrapes_reads_the_database_once(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each scrape grouped the whole jobs and ledger tables: a burst ran as many reads side by side.
    read = HeldRead()
    monkeypatch.setattr("orchestrator.services.metrics_text", read)
    answers = scrapes_during_one_read(services.metrics, read)
    assert read.calls < SCRAPES // 2 and answers.count("text 1") > SCRAPES // 2, answers
