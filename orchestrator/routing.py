"""Which engine serves a request, and why.

Every decision is recorded on the job (`routing`) and can be asked for without running anything
(`POST /v1/route/explain`). Candidates that cannot serve the request are kept in the decision with
the reason they were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import BadEngineInput, NoPrice, NoRoute
from tiers.base import Engine, RenderRequest, Stage, to_credits
from tiers.registry import EngineRegistry

# Without a policy: remote engines first when configured, else the local ones.
DEFAULT_ORDER: dict[Stage, tuple[str, ...]] = {
    "ideation": ("lite",),
    "bridge": ("gemini", "stability", "openai", "fal", "replicate", "comfyui", "a1111", "local-hifi"),
    "polish": ("stability", "gemini", "openai", "fal", "replicate", "comfyui", "a1111", "local-hifi"),
}


@dataclass
class Candidate:
    engine: str
    estimate: int | None = None  # millicredits
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine,
                "estimate": None if self.estimate is None else to_credits(self.estimate),
                "skipped": self.skipped}


@dataclass
class Decision:
    stage: Stage
    chosen: str
    estimate: int
    candidates: list[Candidate]
    policy: str | None = None
    policy_hash: str | None = None
    rule: str | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "policy_hash": self.policy_hash, "rule": self.rule,
                "reason": self.reason, "chosen": self.chosen, "estimate": to_credits(self.estimate),
                "candidates": [c.as_dict() for c in self.candidates], **self.extra}

    def fallbacks(self) -> list[str]:
        """Usable candidates after the chosen one, in order."""
        usable = [c.engine for c in self.candidates if c.skipped is None]
        return usable[usable.index(self.chosen) + 1:] if self.chosen in usable else []


def assess(engine: Engine, stage: Stage, req: RenderRequest) -> Candidate:
    """Whether `engine` can take `req`, with its estimate or the reason it cannot."""
    candidate = Candidate(engine.name)
    if stage not in engine.stages:
        candidate.skipped = f"does not serve the {stage} stage"
        return candidate
    available, why = engine.availability()
    if not available:
        candidate.skipped = f"unavailable: {why}"
        return candidate
    try:
        candidate.estimate = engine.estimate(req)
    except NoPrice as exc:
        candidate.skipped = f"unpriced: {exc.message}"
    except BadEngineInput as exc:
        candidate.skipped = f"cannot take this request: {exc.message}"
    return candidate


class Router:
    def __init__(self, registry: EngineRegistry) -> None:
        self.registry = registry

    def decide(self, stage: Stage, req: RenderRequest, requested: str | None) -> Decision:
        if requested is not None:
            return self._requested(stage, req, requested)
        candidates = [assess(self.registry.get(name), stage, req)
                      for name in DEFAULT_ORDER[stage] if name in self.registry]
        usable = [c for c in candidates if c.skipped is None]
        if not usable:
            raise NoRoute(f"no engine can serve this {stage} request",
                          details={"candidates": [c.as_dict() for c in candidates]})
        first = usable[0]
        assert first.estimate is not None
        return Decision(stage, first.engine, first.estimate, candidates, reason="default order")

    def _requested(self, stage: Stage, req: RenderRequest, name: str) -> Decision:
        if name not in self.registry:
            raise NoRoute(f"unknown engine '{name}'", details={"engine": name, "known": self.registry.names()})
        engine = self.registry.get(name)
        if stage not in engine.stages:
            raise NoRoute(f"engine '{name}' does not serve the {stage} stage", details={"engine": name})
        available, why = engine.availability()
        if not available:
            raise NoRoute(f"engine '{name}' is unavailable: {why}", details={"engine": name})
        estimate = engine.estimate(req)  # NoPrice and BadEngineInput reach the client as they are
        return Decision(stage, name, estimate, [Candidate(name, estimate)], reason="requested by the client")
