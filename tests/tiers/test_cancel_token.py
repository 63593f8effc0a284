"""The cancel token engines wait on: its race against a job's work."""

from __future__ import annotations

import asyncio
import gc
from contextlib import suppress
from typing import Any

import pytest

from orchestrator.errors import Canceled
from tiers.base import CancelToken


@pytest.mark.parametrize("ticks", range(5))
def test_a_cancel_that_meets_the_end_of_a_race_leaves_no_exception_unretrieved(ticks: int) -> None:
    """A cancel through another process met a job's end on a worker: the job ended canceled, as
    it should, and asyncio logged "Task exception was never retrieved" with a traceback."""
    reported: list[str] = []

    async def trial() -> Any:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        token = CancelToken()
        done: asyncio.Future[None] = loop.create_future()

        async def work() -> int:
            await done
            return 1

        racing = asyncio.ensure_future(token.race(work(), charged="no"))
        for _ in range(3):
            await asyncio.sleep(0)
        done.set_result(None)
        for _ in range(ticks):
            await asyncio.sleep(0)
        token.cancel()
        with suppress(Canceled):
            await racing
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()

    # What the suite made before is frozen out of the collections, for good, as conftest.py froze
    # what the collection made: only this trial's objects are looked at (a full collection of a
    # whole suite's heap took about 3 s, each). Collected first, or its garbage stayed for good;
    # what earlier tests left alive stays so (never unfrozen: that would undo conftest.py's freeze).
    gc.collect()
    gc.freeze()
    asyncio.run(trial())
    gc.collect()
    assert reported == []
