"""Which engine serves a request, and why.

The project's policy (a TOML file, see `policies/`) is matched against the request: the first
matching rule either denies it or lists candidate engines and a strategy. Candidates that do not
serve the stage, are unavailable, unpriced, over the rule's `max_credits`, behind an open circuit,
or would send a private request off this machine are skipped with the reason. Every decision is
recorded on the job and can be asked for without running anything (`POST /v1/route/explain`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any

from orchestrator.device_time import DeviceTime
from orchestrator.errors import BadEngineInput, BudgetExceeded, NoPrice, NoRoute, NotFound, NoUsableEngine, shown
from orchestrator.health import EngineHealth
from orchestrator.store import hide_paths
from policies import Policy, PolicyStore, RequestFacts, Rule, order_candidates
from tiers.base import MAX_AMOUNT, Engine, RenderRequest, Stage, is_amount, to_credits
from tiers.registry import EngineRegistry, left_off

# An engine's estimate (millicredits) where another live worker runs it and this process lacks it; None: not so.
Elsewhere = Callable[[str], int | None]


def leaves_machine(engine: Engine) -> bool:
    """Whether the engine sends a request's data off this machine (every remote engine may: a
    self-hosted server may run on another host)."""
    return engine.kind == "remote" or engine.capabilities.leaves_machine


def policy_warnings(policies: PolicyStore, registry: EngineRegistry) -> list[str]:
    """What the loaded policies name that fails every request it routes, with these engines."""
    names = registry.names()  # broken ones too: named by a policy, they are not unknown
    return policies.engine_warnings(names, [name for name in names
                                            if name in registry and leaves_machine(registry.get(name))],
                                    {engine.name: engine.stages for engine in registry})


def priced(engine: Engine, req: RenderRequest) -> int:
    """`engine.estimate(req)`, refusing one that is not a whole, non-negative number of
    millicredits (a third-party engine's bug) as no price: taken as money back, it would win every
    `cheapest` race and hold nothing; a fraction or an infinity in the ledger breaks its sums."""
    estimate = engine.estimate(req)
    if not is_amount(estimate):
        told = (f"{to_credits(int(estimate))} credits" if isinstance(estimate, numbers.Integral)
                else f"{estimate!r}"[:40])
        raise NoPrice(f"engine '{engine.name}' estimated {told}; a price is a whole, non-negative number of "
                      f"millicredits, at most {to_credits(MAX_AMOUNT):g} credits", details={"engine": engine.name})
    return int(estimate)


@dataclass
class Candidate:
    engine: str
    estimate: int | None = None  # millicredits
    skipped: str | None = None
    # Why the request itself can never go here (its size, no price, privacy, the stage, the rule's
    # cap): when nothing is usable and nothing may become so, the request is refused with it.
    refusal: BadEngineInput | NoRoute | BudgetExceeded | None = field(default=None, repr=False)
    # Skipped for now only (an open circuit): the same request may be taken later.
    for_now: bool = False
    # Not an engine of this stage (a rule naming `lite` for drafts and polish alike): its refusal
    # is told only when no engine of the stage said why it cannot take the request.
    off_stage: bool = False
    # A local engine skipped for its project's device-time quota (`orchestrator.device_time`).
    over_device_time: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine,
                "estimate": None if self.estimate is None else to_credits(self.estimate),
                "skipped": self.skipped}


@dataclass
class Decision:
    stage: Stage
    chosen: str
    estimate: int
    # Usable ones first, in order; a fallback tries those skipped for the budget before the rest (`fallbacks`).
    candidates: list[Candidate]
    policy: str | None = None
    policy_hash: str | None = None
    rule: str | None = None
    reason: str | None = None
    # The rule keeps this request on the machine (its `private`, or the request's privacy tag):
    # what the job makes is private too, so its promotions and polishes stay local.
    private: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # Taken to copy an earlier identical job's result, its engine's circuit breaker not asked: a
    # copy sends nothing (see `JobService._route`). Not recorded.
    copy: bool = False
    # The project's device time it was routed on (None: no quota in force); routing again under
    # the submit's lock judges on the same. Not recorded.
    device: DeviceTime | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "policy_hash": self.policy_hash, "rule": self.rule,
                "reason": self.reason, "private": self.private, "chosen": self.chosen,
                "estimate": to_credits(self.estimate),
                "candidates": [c.as_dict() for c in self.candidates], **self.extra}


# How a candidate passed over because the project's budget could not hold its estimate then is
# recorded (`orchestrator.jobs._within_budget`): the one skip a fallback looks at again.
BUDGET_SKIP = "does not fit the budget"


def skipped_for_budget(candidate: dict[str, Any]) -> bool:
    """Whether a recorded candidate was passed over for the budget alone (it serves the request,
    priced, within every cap, its circuit closed when it was routed)."""
    skipped = candidate.get("skipped")
    return isinstance(skipped, str) and skipped.startswith(BUDGET_SKIP)


def fallbacks(routing: dict[str, Any] | None, tried: set[str]) -> list[str]:
    """Candidates of a recorded decision that have not been tried yet, in the order to try them.

    Those passed over because the budget could not hold them come first: the policy ranked them
    before its choice (the budget moved the choice down to the first it could hold), and room may
    have been made since (the failed engine's hold released, a grant, a limit raised, a new
    window). Each is priced and held to the budget as it is at the move, and skipped again when it
    still does not fit. Then the usable ones, in order. Left out, they were never tried, however
    much room a fallback found."""
    if not routing:
        return []
    candidates = routing.get("candidates", [])
    order = [c for c in candidates if skipped_for_budget(c)] + [c for c in candidates if c.get("skipped") is None]
    return [c["engine"] for c in order if c["engine"] not in tried]


class Router:
    def __init__(self, registry: EngineRegistry, policies: PolicyStore, health: EngineHealth) -> None:
        self.registry = registry
        self.policies = policies
        self.health = health

    def rule_for(self, policy_name: str, req: RenderRequest, budget_used: float | None,
                 version: str | None, routed: str | None = None) -> str | None:
        """The name of the rule of the policy that the request (its engine left to the policy)
        matches with `budget_used`; None when the policy is not loaded as `version` (its content
        hash: a job routed by another version of the file follows its recorded decision) or no
        rule fits. `routed`: the rule the job was routed by, given back unless the budget's share
        alone moved the request off it (the same facts match it at another share)."""
        try:
            policy = self.policies.get(policy_name)
        except NotFound:
            return None
        if policy.content_hash != version:
            return None
        facts = RequestFacts.from_request(req, engine=None, budget_used=budget_used)
        matched = policy.match(facts)
        now = None if matched is None else matched[1].name
        if routed is None or now == routed:
            return now
        # The job's facts are not the submit's: a private rule's request is recorded with
        # tags.privacy=local (`JobService.job_params`), which an earlier rule may match. Such a
        # rule, no share of the budget making the recorded one apply, is no budget's doing: the
        # job follows its recorded decision, as every job did before fallbacks judged the share.
        thresholds = {r.match.budget_used_over for r in policy.rules if r.match.budget_used_over is not None}
        shares: set[float | None] = {None, 0.0, math.inf, *thresholds,
                                     *(math.nextafter(t, math.inf) for t in thresholds)}
        if any((other := policy.match(replace(facts, budget_used=share))) is not None and other[1].name == routed
               for share in shares):
            return now
        return routed

    def keeps_local(self, policy_name: str, req: RenderRequest, budget_used: float | None,
                    routed: str | None = None) -> bool:
        """Whether the rule of the policy as loaded now that the request matches with `budget_used`
        keeps it on this machine (`Rule.keeps_local`); a policy not loaded or a request no rule
        matches: no. `routed`: the hash of the version the job was routed by, when another than
        this process's says it is kept local, judged by the file as it reads now, as
        `services._keeps_all_local` judges (this process may not have looked at an edit yet).
        Routed by the version loaded: no, as that version judged it (a private rule's job was
        marked); the request's facts now are not the submit's (the client's choice of engine is
        not recorded, so a rule on `engine` never fits), and a share of the budget that crossed a
        private rule's since moves a fallback there (`JobRunner._routing_now`), not a first send."""
        try:
            policy = self.policies.get(policy_name)
        except NotFound:
            return False
        if routed is not None and routed == policy.content_hash:
            return False
        facts = RequestFacts.from_request(req, engine=None, budget_used=budget_used)

        def private(loaded: Policy) -> bool:
            matched = loaded.match(facts)
            return matched is not None and matched[1].keeps_local(req.tags)

        if not private(policy) or routed is None:
            return private(policy)
        now = self.policies.as_it_reads_now(policy_name)
        return now is None or private(now)

    def decide(self, policy_name: str, req: RenderRequest, requested: str | None,
               budget_used: float | None, *, holder: str | None = None, circuits: bool = True,
               device: DeviceTime | None = None, elsewhere: Elsewhere | None = None) -> Decision:
        """`holder`: the reservation of a half-open circuit's probe this request already holds
        (see `EngineHealth.reserve`); that engine is not skipped as "its probe is out".
        `circuits=False`: no engine is skipped for its circuit breaker or the project's device
        time (for a copy, which sends nothing). `device`: the project's device time; exhausted,
        its local engines are skipped as unavailable to it, and a request no other engine may take
        is refused `DeviceTimeExhausted`. `elsewhere`: see `assess`."""
        try:
            # Read once: a reload between a look and a read could take the policy away in between.
            policy = self.policies.get(policy_name)
        except NotFound:
            # The project's policy is gone (a file removed, a mistyped ORCH_POLICY): the service's
            # setup is at fault, not the request or the project.
            # Its file there but refused (a syntax error): "restore the policy file" sent the operator
            # looking for a file that was in its place. (Why is in GET /v1/policies: the error names
            # the server's path.)
            refused = any(PurePath(error.file).stem == policy_name for error in self.policies.errors)
            fix = ("its file was refused (GET /v1/policies says why): mend it, or set the project's policy (PATCH)"
                   if refused else "set the project's policy (PATCH) or restore the policy file")
            # Not the policies loaded: a project key is told this too, and another studio client's
            # policy is named for it (GET /v1/policies lists them for the admin key).
            raise NoUsableEngine(f"the project's policy '{policy_name}' is not loaded; {fix}",
                                 details={"policy": policy_name, "file_refused": refused}) from None
        if requested is not None and requested not in self.registry and requested not in self.registry.broken:
            known = sorted([engine.name for engine in self.registry] + list(self.registry.broken))
            raise NoRoute(f"unknown engine '{shown(requested)}' (known: {', '.join(known)})",
                          details={"engine": shown(requested), "known": known})
        facts = RequestFacts.from_request(req, engine=requested, budget_used=budget_used)
        matched = policy.match(facts)
        if matched is None:
            raise NoRoute(f"policy '{policy.name}' has no rule for this request",
                          details={"policy": policy.name})
        index, rule = matched
        base = {"policy": policy.name, "policy_hash": policy.content_hash, "rule": rule.name}
        if rule.deny is not None:
            # A deny rule's `reason` is told too (it was dropped): why the studio refuses this.
            raise NoRoute(f"policy '{policy.name}', rule '{rule.name}': {rule.deny}"
                          + (f" ({rule.reason})" if rule.reason else ""), details=base)
        assert rule.engines is not None
        if requested is not None and requested not in rule.engines:
            # A rule matched on the budget's use says so: the client is told why, not only where.
            why = ("" if rule.match.budget_used_over is None else
                   f" (the project has used over {rule.match.budget_used_over:.0%} of its budget)")
            raise NoRoute(
                f"engine '{requested}' is not allowed here: policy '{policy.name}', rule '{rule.name}' "
                f"allows {', '.join(rule.engines)}{why}",
                details={**base, "engine": requested, "allowed": rule.engines},
            )
        names = [requested] if requested is not None else list(rule.engines)
        exhausted = device if device is not None and device.exhausted and circuits else None
        assessed = {name: self.assess(name, req, rule, holder=holder, circuits=circuits, device=exhausted,
                                      elsewhere=elsewhere) for name in names}
        ordered = self._order(rule, req.stage, assessed)
        usable = [c for c in ordered if c.skipped is None]
        if not usable:
            refusals = [c.refusal for c in sorted(ordered, key=lambda c: c.off_stage) if c.refusal is not None]
            if refusals and not any(c.for_now for c in ordered):
                # Every engine that is set up refused the request itself: a 422 (402 for the
                # rule's cap), not "try later". Engines not set up (no key) cannot change that.
                refusal = refusals[0]
                refusal.details = {**refusal.details, **base, "candidates": [c.as_dict() for c in ordered]}
                # The engines left out for their setup belong in the sentence too: a private request
                # refused by the cloud engines because the local one has no model is the operator's
                # to fix, and reads as the client's fault without it.
                others = [f"{c.engine}: {c.skipped}" for c in ordered if c.refusal is None and c.skipped]
                if others:
                    refusal.message = f"{refusal.message} (and {'; '.join(others)})"[:1000]
                raise refusal
            # The reasons belong in the sentence: "no engine now" alone reads like an outage when
            # the request was too large for the only engine that is set up.
            why = "; ".join(f"{c.engine}: {c.skipped}" for c in ordered)
            # Open circuits tell when to ask again; an engine that is not set up does not come back by waiting.
            waits = [self.health.opens_in(c.engine) for c in ordered if c.for_now and not c.over_device_time]
            if exhausted is not None and any(c.over_device_time for c in ordered):
                # A 429 of the project's own use, not the 503 of an outage: waiting for its seconds
                # to age out (or an engine's circuit, whichever comes first) is what helps.
                skipped_others = "; ".join(f"{c.engine}: {c.skipped}" for c in ordered if not c.over_device_time)
                told = [*waits, *([exhausted.retry_after] if exhausted.retry_after is not None else [])]
                error = exhausted.error(f" (policy '{policy.name}', rule '{rule.name}'"
                                        + (f"; {skipped_others})" if skipped_others else ")"),
                                        retry_after=math.ceil(min(told)) if told else None)
                error.details = {**error.details, **base, "candidates": [c.as_dict() for c in ordered]}
                raise error
            raise NoUsableEngine(
                # "now" only where waiting helps (an open circuit): an engine not set up stays so.
                f"no engine can take this request{' now' if waits else ''} (policy '{policy.name}', "
                f"rule '{rule.name}'): {why}"[:1000],
                details={**base, "candidates": [c.as_dict() for c in ordered]},
                retry_after=math.ceil(min(waits)) if waits else None,
            )
        first = usable[0]
        assert first.estimate is not None
        cap = rule.max_millicredits
        reason = rule.reason or f"first usable engine by the '{rule.strategy}' strategy"
        return Decision(req.stage, first.engine, first.estimate, ordered, policy=policy.name,
                        policy_hash=policy.content_hash, rule=rule.name, device=device,
                        reason="requested by the client" if requested else reason,
                        private=rule.keeps_local(req.tags),
                        # Fallbacks are held to the rule's cap as the first choice was (see `JobRunner._fall_back`).
                        extra={"rule_index": index, "strategy": rule.strategy,
                               "max_credits": None if cap is None else to_credits(cap)})

    def _order(self, rule: Rule, stage: Stage, assessed: dict[str, Candidate]) -> list[Candidate]:
        if len(assessed) == 1:
            return list(assessed.values())
        remote = {n for n in assessed if n in self.registry and self.registry.get(n).kind == "remote"}
        # "cheapest" compares what cloud engines charge; free local engines stay the fallbacks,
        # tried after the cloud ones in the order the rule lists them.
        estimates = {n: c.estimate if n in remote else None for n, c in assessed.items()}
        latencies = {n: self.health.median_latency(n, stage) for n in assessed}
        order = order_candidates(rule.model_copy(update={"engines": list(assessed)}), estimates, latencies)
        candidates = [assessed[n] for n in order]
        return [c for c in candidates if c.skipped is None] + [c for c in candidates if c.skipped is not None]

    def assess(self, name: str, req: RenderRequest, rule: Rule | None = None, *,
               holder: str | None = None, circuits: bool = True, device: DeviceTime | None = None,
               elsewhere: Elsewhere | None = None) -> Candidate:
        """Whether engine `name` can take `req` under `rule`, with its estimate or why not. `device`:
        the project's device time, exhausted: a local engine is skipped for it. `elsewhere`: for an
        engine this process lacks (not installed, or left off: its key given to other hosts), its
        estimate where another live worker runs it (a fallback's, `JobRunner._routing_now`), else None."""
        candidate = Candidate(name)
        away = elsewhere(name) if elsewhere is not None and name not in self.registry else None
        if away is not None:
            return self._assess_elsewhere(candidate, away, req, rule, holder=holder, circuits=circuits)
        if name not in self.registry:
            reason = self.registry.broken[name].reason if name in self.registry.broken else "no such engine"
            candidate.skipped = f"unknown engine: {reason}"
            return candidate
        engine: Engine = self.registry.get(name)
        caps = engine.capabilities
        if rule is not None and rule.keeps_local(req.tags) and leaves_machine(engine):
            candidate.skipped = "private request: this engine sends data off the machine"
            candidate.refusal = NoRoute(f"engine '{name}' sends data off the machine, and this request is private "
                                        "(tags.privacy=local)", details={"engine": name})
        elif req.stage not in engine.stages:
            candidate.skipped = f"does not serve the {req.stage} stage"
            candidate.off_stage = True
            candidate.refusal = NoRoute(f"engine '{name}' does not serve the {req.stage} stage",
                                        details={"engine": name, "stage": req.stage})
        elif not (available := engine.availability())[0] and not (
                # Left off here (its key given to other hosts): judged as any other, priced here, where
                # another live worker runs it.
                elsewhere is not None and left_off(engine) and elsewhere(name) is not None):
            # Told to whoever asked, a project key's client too: the model by its name, not its path.
            candidate.skipped = f"unavailable: {hide_paths(available[1] or 'not set up', name)}"
        elif req.width > caps.max_width or req.height > caps.max_height:
            # Checked here for every engine: an estimate of 0 (a self-hosted server) says nothing of size.
            setting = caps.max_size_setting
            candidate.refusal = BadEngineInput(
                f"{name}: {req.width}x{req.height} is larger than this engine makes "
                f"({caps.max_width}x{caps.max_height} at most{f', set by {setting}' if setting else ''})",
                details={"engine": name, "field": "width" if req.width > caps.max_width else "height",
                         "width": req.width, "height": req.height,
                         "max_width": caps.max_width, "max_height": caps.max_height,
                         **({"setting": setting} if setting else {})})
            candidate.skipped = f"cannot take this request: {candidate.refusal.message}"
        if candidate.skipped:
            return candidate
        try:
            candidate.estimate = priced(engine, req)
        except NoPrice as exc:
            candidate.estimate = None
            candidate.skipped = f"unpriced: {exc.message}"
            candidate.refusal = exc
        except BadEngineInput as exc:
            candidate.skipped = f"cannot take this request: {exc.message}"
            candidate.refusal = exc
        limit = rule.max_millicredits if rule is not None else None
        if candidate.estimate is not None and limit is not None and candidate.estimate > limit:
            candidate.skipped = f"estimate {to_credits(candidate.estimate)} is over the rule's max_credits"
            candidate.refusal = BudgetExceeded(
                f"engine '{name}': the estimate ({to_credits(candidate.estimate)} credits) is over the rule's "
                f"max_credits ({to_credits(limit)})",
                details={"engine": name, "estimate": to_credits(candidate.estimate), "max_credits": to_credits(limit)})
        # The quota and the circuit last: a request the engine refuses (size, price, the rule's cap)
        # is refused whatever its health or the project's use, and "try later" would only defer
        # that answer.
        if candidate.skipped is None and device is not None and device.exhausted and engine.kind == "local":
            candidate.skipped = device.skipped()
            candidate.for_now = candidate.over_device_time = True
        elif candidate.skipped is None and circuits and not self.health.allow(name, holder):
            candidate.skipped = ("circuit half-open: its probe request is out" if self.health.probe_out(name)
                                 else "circuit open after repeated failures")
            candidate.for_now = True
        return candidate

    def _assess_elsewhere(self, candidate: Candidate, estimate: int, req: RenderRequest, rule: Rule | None, *,
                          holder: str | None, circuits: bool) -> Candidate:
        """An engine only another worker runs, at `estimate`: this process cannot say whether it
        sends data off the machine, so a private request never goes there; the rule's cap and its
        circuit judged as for any other."""
        name = candidate.engine
        candidate.estimate = estimate
        limit = rule.max_millicredits if rule is not None else None
        if rule is not None and rule.keeps_local(req.tags):
            candidate.skipped = "private request: this engine runs on another worker, which may send data elsewhere"
        elif limit is not None and estimate > limit:
            candidate.skipped = f"estimate {to_credits(estimate)} is over the rule's max_credits"
        elif circuits and not self.health.allow(name, holder):
            candidate.skipped = ("circuit half-open: its probe request is out" if self.health.probe_out(name)
                                 else "circuit open after repeated failures")
            candidate.for_now = True
        return candidate
