"""Engine health: a circuit breaker per engine and observed latencies per engine and stage.

After `threshold` consecutive failures an engine's circuit opens: routing skips it for
`cooldown` seconds; then one probe request is let through (half-open). A success closes the
circuit; a failed probe opens it again. Kept in memory: a restart gives every engine a fresh
chance, which is what an operator restarting after a fix wants.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Health = Literal["ok", "degraded", "open"]
LATENCY_WINDOW = 50


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    latencies: dict[str, deque[float]] = field(default_factory=dict)


class EngineHealth:
    def __init__(self, threshold: int = 5, cooldown: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self._circuits: dict[str, _Circuit] = {}
        self._lock = threading.Lock()

    def _get(self, engine: str) -> _Circuit:
        return self._circuits.setdefault(engine, _Circuit())

    def state(self, engine: str) -> Health:
        with self._lock:
            c = self._get(engine)
            if c.opened_at is not None and self.clock() - c.opened_at < self.cooldown:
                return "open"
            return "degraded" if c.failures or c.opened_at is not None else "ok"

    def allow(self, engine: str) -> bool:
        """May a request go to `engine` now? In half-open state, only one probe at a time."""
        with self._lock:
            c = self._get(engine)
            if c.opened_at is None:
                return True
            cooling = self.clock() - c.opened_at < self.cooldown
            return not (cooling or c.probing)

    def started(self, engine: str) -> None:
        with self._lock:
            c = self._get(engine)
            if c.opened_at is not None:
                c.probing = True

    def finished(self, engine: str) -> None:
        """A call ended, whatever its verdict: a half-open circuit may let the next probe through."""
        with self._lock:
            self._get(engine).probing = False

    def succeeded(self, engine: str, stage: str, seconds: float) -> None:
        with self._lock:
            c = self._get(engine)
            c.failures, c.opened_at, c.probing = 0, None, False
            c.latencies.setdefault(stage, deque(maxlen=LATENCY_WINDOW)).append(seconds)

    def failed(self, engine: str) -> None:
        with self._lock:
            c = self._get(engine)
            c.failures += 1
            if c.probing or c.failures >= self.threshold:
                c.opened_at, c.probing = self.clock(), False

    def median_latency(self, engine: str, stage: str) -> float | None:
        with self._lock:
            samples = self._get(engine).latencies.get(stage)
            return statistics.median(samples) if samples else None
