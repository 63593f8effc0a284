"""How a periodic duty tells of a failure that repeats (a database away for minutes, a full disk):
the first with its traceback, then a line a minute while it lasts, and its end. A traceback per
try, as the loops once wrote, filled the log (20 MB an hour from the dispatcher alone), often on
the disk that had just filled. A database that is away (restarting, its connections cut) is
expected now and then: its first failure is a warning's line, and only an outage that lasts a
minute is the duty's level."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from orchestrator.db import tables_missing, transient
from orchestrator.errors import first_line

REMIND_SECONDS = 60.0


class Outage:
    """One duty's run of failures: `failed(exc)` after each failed try, `recovered()` after each
    good one, `reset()` when the duty had nothing to try (no outage is known to go on). The first
    failure of each kind is told whole: a bug that follows a locked database is not a reminder's
    first line."""

    def __init__(self, logger: logging.Logger, duty: str, retry: str, *, level: int = logging.ERROR,
                 clock: Callable[[], float] = time.monotonic,
                 away: Callable[[BaseException], bool] = transient) -> None:
        """`away`: whether a failure says the database is away (told as a line, not a traceback)."""
        self.logger, self.duty, self.retry, self.level, self.clock = logger, duty, retry, level, clock
        self.away = away
        self._since: float | None = None
        self._told = 0.0
        self._tries = 0
        # Kinds told in this outage: a type, and whether it said the database is away (a locked
        # SQLite and a missing table are both an OperationalError, and only the first is a blip).
        self._kinds: set[tuple[type[BaseException], bool]] = set()

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self._tries += 1
        since = self._since = now if self._since is None else self._since
        away = self.away(exc)
        kind = (type(exc), away)
        if kind not in self._kinds and away:
            # Every loop of every process meets the same blip: a line each, not a traceback each.
            self._told = now
            self._kinds.add(kind)
            self.logger.warning("%s failed; %s (the database is away: %s)", self.duty, self.retry,
                                first_line(exc, type(exc).__name__)[:300])
        elif kind not in self._kinds and tables_missing(exc):
            self._told = now
            self._kinds.add(kind)
            self.logger.log(self.level, "%s failed; %s (the database lacks some or all of this service's tables, "
                            "made anew or emptied for a restore: finish the restore or run `orchestrator migrate`): %s",
                            self.duty, self.retry, first_line(exc, type(exc).__name__)[:300])
        elif kind not in self._kinds:
            self._told = now
            self._kinds.add(kind)
            self.logger.log(self.level, "%s failed; %s", self.duty, self.retry, exc_info=exc)
        elif now - self._told >= REMIND_SECONDS:
            self._told = now
            first = first_line(exc, type(exc).__name__)
            self.logger.log(self.level, "%s still failing (%d tries in %.0f s): %s", self.duty, self._tries,
                            now - since, first[:300])
        else:
            self.logger.debug("%s failed again: %s", self.duty, exc)

    @property
    def ongoing(self) -> bool:
        """Whether the last try failed (and nothing has reset it since)."""
        return self._since is not None

    def recovered(self) -> None:
        if self._since is not None:
            self.logger.info("%s works again (after %d failed tries)", self.duty, self._tries)
        self.reset()

    def reset(self) -> None:
        self._since, self._tries = None, 0
        self._kinds.clear()
