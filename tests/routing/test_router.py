"""`Router.decide` over small stub engines and policy files written to a temporary folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest

from orchestrator.device_time import DeviceTime
from orchestrator.errors import BadEngineInput, BudgetExceeded, DeviceTimeExhausted, NoPrice, NoRoute, NoUsableEngine
from orchestrator.health import EngineHealth
from orchestrator.routing import Decision, Router, fallbacks, priced
from policies import PolicyStore
from tiers.base import Capabilities, RenderRequest, RenderResult, Stage
from tiers.registry import BrokenEngine, EngineRegistry


class StubEngine:
    """Just enough of an engine for routing: a kind, stages, availability and a price."""

    def __init__(self, name: str, kind: Literal["local", "remote"] = "remote", price: float | None = 10.0, *,
                 stages: tuple[Stage, ...] = ("bridge", "polish"), available: bool = True,
                 leaves_machine: bool | None = None, size_multiple: int = 8) -> None:
        self.name = name
        self.kind = kind
        self.stages = frozenset(stages)
        self.price = price
        self.available = available
        self.capabilities = Capabilities(leaves_machine=kind == "remote" if leaves_machine is None else leaves_machine,
                                         size_multiple=size_multiple)

    @property
    def model(self) -> str:
        return f"{self.name}-model"

    def availability(self) -> tuple[bool, str | None]:
        return (True, None) if self.available else (False, f"no API key: set ORCH_{self.name.upper()}_API_KEY")

    def prices(self) -> dict[str, Any]:
        return {}

    def estimate(self, req: RenderRequest) -> int:
        for label, value in (("width", req.width), ("height", req.height)):
            if value % self.capabilities.size_multiple or not 64 <= value <= 2048:
                raise BadEngineInput(f"{label} must be a multiple of {self.capabilities.size_multiple} "
                                     f"between 64 and 2048 for engine '{self.name}' (got {value})")
        if self.price is None:
            raise NoPrice(f"engine '{self.name}' has no price for model '{self.model}'")
        return req.n * round(self.price * 1000)

    async def run(self, req: RenderRequest, progress: Any, cancel: Any) -> RenderResult:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


ENGINES = [
    StubEngine("lite", "local", 0, stages=("ideation",)),
    StubEngine("cloud-a", price=10),
    StubEngine("cloud-b", price=5),
    StubEngine("cloud-c", price=20, size_multiple=1),
    StubEngine("local", "local", 0),
    StubEngine("local2", "local", 0),
    # Local kind, but it sends the request to another process on another host (a ComfyUI server).
    StubEngine("selfhosted", "local", 0, leaves_machine=True),
    StubEngine("offline", available=False),
    StubEngine("local-offline", "local", 0, available=False),
    StubEngine("unpriced", price=None),
    # A third-party engine's bug: it would be "cheapest", take no hold and run unchecked.
    StubEngine("negative", price=-5),
]

POLICIES = {
    # Stage matching, deny, the budget rule; privacy comes from the request's tags alone.
    "routes": """
        [[rules]]
        name = "drafts"
        match = { stage = "ideation" }
        engines = ["lite"]

        [[rules]]
        name = "deny-secret"
        match = { tags = { project = "secret" } }
        deny = "secret projects are not rendered here"
        reason = "the contract forbids it"

        [[rules]]
        name = "near-budget"
        match = { stage = ["bridge", "polish"], budget_used_over = 0.8 }
        engines = ["local"]
        reason = "soft budget limit"

        [[rules]]
        name = "bridge"
        match = { stage = "bridge" }
        engines = ["cloud-a", "cloud-b", "selfhosted", "local"]
        reason = "bridge engines in order"

        [[rules]]
        name = "polish"
        match = { stage = "polish" }
        engines = ["cloud-c", "local"]
    """,
    "ordered": """
        [[rules]]
        name = "all"
        match = { stage = ["bridge", "polish"] }
        engines = ["local2", "cloud-c", "local", "cloud-a", "cloud-b"]
    """,
    "cheapest": """
        [[rules]]
        name = "all"
        match = { stage = ["bridge", "polish"] }
        engines = ["local2", "cloud-c", "local", "cloud-a", "cloud-b"]
        strategy = "cheapest"
    """,
    "fastest": """
        [[rules]]
        name = "all"
        match = { stage = ["bridge", "polish"] }
        engines = ["cloud-a", "cloud-b", "cloud-c"]
        strategy = "fastest"
    """,
    "one-rule": """
        [[rules]]
        name = "everything"
        match = {}
        engines = ["lite", "cloud-a"]
    """,
    "capped": """
        [[rules]]
        name = "capped"
        match = { stage = ["bridge", "polish"] }
        engines = ["cloud-c", "cloud-a", "cloud-b", "local"]
        strategy = "cheapest"
        max_credits = 8
    """,
    "odd": """
        [[rules]]
        name = "odd"
        match = { stage = ["bridge", "polish"] }
        engines = ["ghost", "broken", "lite", "offline", "unpriced", "cloud-a"]
    """,
    "buggy": """
        [[rules]]
        name = "buggy"
        match = { stage = ["bridge", "polish"] }
        engines = ["cloud-b", "negative"]
        strategy = "cheapest"
    """,
    "private-mix": """
        [[rules]]
        name = "mix"
        match = { stage = "bridge" }
        engines = ["cloud-a", "local-offline"]
        private = true
    """,
    "unusable": """
        [[rules]]
        name = "unusable"
        match = { stage = "bridge" }
        engines = ["offline", "unpriced", "cloud-b"]
    """,
}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    for name, rules in POLICIES.items():
        body = "\n".join(line.strip() for line in rules.splitlines())
        (tmp_path / f"{name}.toml").write_text(f'name = "{name}"\n{body}\n')
    return tmp_path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> EngineHealth:
    return EngineHealth(threshold=2, cooldown=30.0, clock=clock)


@pytest.fixture
def router(policy_dir: Path, health: EngineHealth) -> Router:
    registry = EngineRegistry({e.name: e for e in ENGINES},
                              {"broken": BrokenEngine("broken", "could not be created: licence expired")})
    store = PolicyStore(extra_dir=policy_dir)
    assert store.errors == [], [e.message for e in store.errors]
    return Router(registry, store, health)


Decide = Callable[..., Decision]


@pytest.fixture
def decide(router: Router) -> Decide:
    def run(policy: str, stage: Stage = "bridge", *, engine: str | None = None, budget_used: float | None = None,
            **fields: Any) -> Decision:
        values: dict[str, Any] = {"prompt": "a lighthouse", "width": 64, "height": 64, **fields}
        return router.decide(policy, RenderRequest(stage=stage, **values), engine, budget_used)

    return run


def order(decision: Decision) -> list[str]:
    return [c.engine for c in decision.candidates]


def skipped(decision: Decision) -> dict[str, str]:
    return {c.engine: c.skipped for c in decision.candidates if c.skipped is not None}


def usable(decision: Decision) -> list[str]:
    return [c.engine for c in decision.candidates if c.skipped is None]


# -- matching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "rule", "chosen", "candidates"), [
    ("ideation", "drafts", "lite", ["lite"]),
    ("bridge", "bridge", "cloud-a", ["cloud-a", "cloud-b", "selfhosted", "local"]),
    ("polish", "polish", "cloud-c", ["cloud-c", "local"]),
])
def test_stage_picks_the_rule(decide: Decide, router: Router, stage: Stage, rule: str, chosen: str,
                              candidates: list[str]) -> None:
    decision = decide("routes", stage)
    assert decision.rule == rule
    assert decision.chosen == chosen
    assert decision.stage == stage
    assert order(decision) == candidates
    assert skipped(decision) == {}
    assert decision.policy == "routes"
    assert decision.policy_hash == router.policies.get("routes").content_hash
    assert decision.estimate == {"lite": 0, "cloud-a": 10_000, "cloud-c": 20_000}[chosen]
    record = decision.as_dict()
    assert record["chosen"] == chosen and record["rule"] == rule and record["strategy"] == "ordered"
    assert record["candidates"][0] == {"engine": chosen, "estimate": decision.estimate / 1000, "skipped": None}


def test_an_unknown_requested_engine_is_told_as_unknown(decide: Decide) -> None:
    with pytest.raises(NoRoute) as info:
        decide("routes", "bridge", engine="ghost")
    assert info.value.message.startswith("unknown engine 'ghost' (known: ")
    assert info.value.details["engine"] == "ghost" and "cloud-a" in info.value.details["known"]


@pytest.mark.parametrize("stage", ["bridge", "polish"])
@pytest.mark.parametrize("policy", ["routes", "ordered", "cheapest", "capped"])
def test_private_request_never_gets_an_engine_that_leaves_the_machine(decide: Decide, router: Router,
                                                                      policy: str, stage: Stage) -> None:
    decision = decide(policy, stage, tags={"privacy": "local"})
    for name in usable(decision):
        engine = router.registry.get(name)
        assert engine.kind == "local" and not engine.capabilities.leaves_machine, name
    assert router.registry.get(decision.chosen).kind == "local"
    remote = [c for c in decision.candidates if router.registry.get(c.engine).kind == "remote"]
    assert remote, "the policy lists remote engines, so the test must see them skipped"
    for candidate in remote:
        assert candidate.skipped is not None and "private" in candidate.skipped


def test_private_request_skips_a_local_engine_that_sends_data_elsewhere(decide: Decide) -> None:
    decision = decide("routes", "bridge", tags={"privacy": "local"})
    assert decision.chosen == "local"
    assert usable(decision) == ["local"]
    assert set(skipped(decision)) == {"cloud-a", "cloud-b", "selfhosted"}
    assert all("private" in reason for reason in skipped(decision).values())
    # A tag other than privacy=local changes nothing; a near miss in case or spaces is still local.
    assert decide("routes", "bridge", tags={"privacy": "team"}).chosen == "cloud-a"
    for near_miss in ("LOCAL", "Local", " local "):
        assert decide("routes", "bridge", tags={"privacy": near_miss}).chosen == "local"


def test_a_private_refusal_names_the_local_engine_that_is_not_set_up(decide: Decide) -> None:
    # The cloud engine refuses the private request; the local one would take it but has no setup:
    # the operator's to fix, which the sentence must say, not only that the request is private.
    with pytest.raises(NoRoute) as info:
        decide("private-mix", "bridge")
    assert info.value.message.startswith("engine 'cloud-a' sends data off the machine")
    assert "(and local-offline: unavailable: no API key" in info.value.message
    assert [c["engine"] for c in info.value.details["candidates"]] == ["cloud-a", "local-offline"]


def test_private_request_naming_a_remote_engine_is_refused(decide: Decide) -> None:
    with pytest.raises(NoRoute) as info:
        decide("routes", "bridge", engine="cloud-a", tags={"privacy": "local"})
    candidates = info.value.details["candidates"]
    assert [c["engine"] for c in candidates] == ["cloud-a"]
    assert "private" in candidates[0]["skipped"]


# -- the requested engine and deny rules ----------------------------------------------------------


@pytest.mark.parametrize("engine", ["cloud-b", "local", "selfhosted"])
def test_requested_engine_allowed_by_the_rule(decide: Decide, engine: str) -> None:
    decision = decide("routes", "bridge", engine=engine)
    assert decision.chosen == engine
    assert order(decision) == [engine]
    assert decision.reason == "requested by the client"
    assert decision.rule == "bridge"


@pytest.mark.parametrize(("stage", "engine", "rule"), [
    ("bridge", "cloud-c", "bridge"),
    ("polish", "cloud-a", "polish"),
    ("ideation", "local", "drafts"),
])
def test_requested_engine_outside_the_rule_is_no_route(decide: Decide, stage: Stage, engine: str,
                                                       rule: str) -> None:
    with pytest.raises(NoRoute) as info:
        decide("routes", stage, engine=engine)
    exc = info.value
    assert type(exc) is NoRoute
    assert exc.status == 422 and exc.code == "no_route"
    assert f"'{engine}'" in exc.message and f"rule '{rule}'" in exc.message and "'routes'" in exc.message
    assert exc.details["rule"] == rule and exc.details["engine"] == engine
    assert engine not in exc.details["allowed"]


@pytest.mark.parametrize("stage", ["bridge", "polish"])
def test_deny_rule_refuses_with_its_message(decide: Decide, stage: Stage) -> None:
    with pytest.raises(NoRoute) as info:
        decide("routes", stage, tags={"project": "secret"})
    exc = info.value
    assert exc.status == 422
    # The reason too: once loaded and dropped.
    assert exc.message == ("policy 'routes', rule 'deny-secret': secret projects are not rendered here "
                           "(the contract forbids it)")
    assert exc.details["rule"] == "deny-secret" and exc.details["policy"] == "routes"


def test_no_matching_rule_is_no_route(decide: Decide) -> None:
    with pytest.raises(NoRoute) as info:
        decide("unusable", "polish")
    assert info.value.status == 422
    assert "no rule" in info.value.message


def test_a_policy_that_is_not_loaded_is_a_setup_error(decide: Decide) -> None:
    # Not 404: the project exists; the service lacks its policy.
    with pytest.raises(NoRoute) as info:
        decide("nope", "bridge")
    assert info.value.status == 503 and "policy 'nope' is not loaded" in info.value.message


# -- strategies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "expected"), [
    ("ordered", ["local2", "cloud-c", "local", "cloud-a", "cloud-b"]),
    # Cloud engines by estimate; free local engines after them, in the order the rule lists them.
    ("cheapest", ["cloud-b", "cloud-a", "cloud-c", "local2", "local"]),
])
def test_ordered_and_cheapest(decide: Decide, policy: str, expected: list[str]) -> None:
    decision = decide(policy, "bridge")
    assert order(decision) == expected
    assert decision.chosen == expected[0]
    assert decision.extra["strategy"] == policy


def test_cheapest_with_two_images_compares_the_total(decide: Decide) -> None:
    decision = decide("cheapest", "polish", n=2)
    assert decision.chosen == "cloud-b"
    assert decision.estimate == 10_000
    assert {c.engine: c.estimate for c in decision.candidates}["cloud-c"] == 40_000


@pytest.mark.parametrize(("latencies", "expected"), [
    ({}, ["cloud-a", "cloud-b", "cloud-c"]),  # nothing observed: the rule's order
    ({"cloud-c": [1.0], "cloud-a": [3.0, 2.5, 3.5]}, ["cloud-c", "cloud-a", "cloud-b"]),
    ({"cloud-b": [0.5], "cloud-c": [9.0, 0.1, 9.0]}, ["cloud-b", "cloud-c", "cloud-a"]),  # median, not mean/min
])
def test_fastest_uses_observed_median_latency(decide: Decide, health: EngineHealth,
                                              latencies: dict[str, list[float]], expected: list[str]) -> None:
    for name, samples in latencies.items():
        for seconds in samples:
            health.succeeded(name, "bridge", seconds)
    # Latency seen on another stage says nothing about this one.
    health.succeeded("cloud-a", "polish", 0.01)
    decision = decide("fastest", "bridge")
    assert order(decision) == expected
    assert decision.chosen == expected[0]


def test_max_credits_skips_engines_over_the_cap(decide: Decide) -> None:
    decision = decide("capped", "bridge")
    assert decision.chosen == "cloud-b"
    assert usable(decision) == ["cloud-b", "local"]
    assert order(decision)[2:] == ["cloud-a", "cloud-c"]  # skipped ones come last
    reasons = skipped(decision)
    assert set(reasons) == {"cloud-a", "cloud-c"}
    assert "max_credits" in reasons["cloud-a"] and "10.0" in reasons["cloud-a"]
    assert "max_credits" in reasons["cloud-c"]


def test_max_credits_counts_every_image(decide: Decide) -> None:
    decision = decide("capped", "bridge", n=2)  # cloud-b: 2 x 5 = 10 > 8
    assert decision.chosen == "local"
    assert "max_credits" in skipped(decision)["cloud-b"]


# -- engines that cannot take the request ---------------------------------------------------------


def test_skip_reasons(decide: Decide) -> None:
    decision = decide("odd", "bridge")
    assert decision.chosen == "cloud-a"
    assert order(decision)[0] == "cloud-a"
    reasons = skipped(decision)
    assert reasons["ghost"] == "unknown engine: no such engine"
    assert reasons["broken"] == "unknown engine: could not be created: licence expired"
    assert reasons["lite"] == "does not serve the bridge stage"
    assert reasons["offline"].startswith("unavailable: no API key")
    assert reasons["unpriced"].startswith("unpriced:") and "no price" in reasons["unpriced"]
    assert {c.engine: c.estimate for c in decision.candidates}["unpriced"] is None


def test_a_negative_estimate_is_no_price_not_a_bargain(decide: Decide) -> None:
    decision = decide("buggy", "bridge")
    assert (decision.chosen, decision.estimate) == ("cloud-b", 5_000)
    reasons = skipped(decision)
    assert reasons["negative"].startswith("unpriced:") and "-5.0" in reasons["negative"]
    assert {c.engine: c.estimate for c in decision.candidates}["negative"] is None
    with pytest.raises(NoPrice):
        decide("buggy", "bridge", engine="negative")


def test_fallbacks_lists_the_usable_rest_in_order(decide: Decide) -> None:
    routing = decide("capped", "bridge").as_dict()
    assert fallbacks(routing, {"cloud-b"}) == ["local"]
    assert fallbacks(routing, set()) == ["cloud-b", "local"]
    assert fallbacks(routing, {"cloud-b", "local"}) == []
    assert fallbacks(None, set()) == []


def test_fallbacks_look_again_at_candidates_skipped_for_the_budget_first() -> None:
    """As `_within_budget` records them: passed over for the budget, ranked above the choice by the
    policy; other skips (a cap, no price, an engine not set up) are never fallbacks."""
    routing = {"candidates": [
        {"engine": "cheap", "estimate": 1.0, "skipped": None},
        {"engine": "local", "estimate": 0.0, "skipped": None},
        {"engine": "unpriced", "estimate": None, "skipped": "unpriced: no price"},
        {"engine": "capped", "estimate": 50.0, "skipped": "estimate above max_credits (20.0)"},
        {"engine": "best", "estimate": 20.0, "skipped": "does not fit the budget (5.0 credits available)"},
        {"engine": "good", "estimate": 10.0,
         "skipped": "does not fit the budget (none available: 1.0 credits over the limit)"}]}
    assert fallbacks(routing, {"cheap"}) == ["best", "good", "local"]
    assert fallbacks(routing, {"cheap", "best"}) == ["good", "local"]
    assert fallbacks(routing, {"cheap", "best", "good", "local"}) == []


def test_no_usable_engine_is_503(decide: Decide, health: EngineHealth, clock: Clock) -> None:
    """One candidate may take the request later (its circuit is open): 'try later'."""
    for _ in range(health.threshold):
        health.failed("cloud-b")
    with pytest.raises(NoUsableEngine) as info:
        decide("unusable", "bridge")
    exc = info.value
    assert isinstance(exc, NoRoute)
    assert exc.status == 503 and exc.code == "no_route"
    assert "'unusable'" in exc.message
    reasons = {c["engine"]: c["skipped"] for c in exc.details["candidates"]}
    assert reasons["offline"].startswith("unavailable")
    assert reasons["unpriced"].startswith("unpriced")
    assert reasons["cloud-b"].startswith("circuit open")
    assert exc.retry_after == 30  # its whole cooldown is left: when to ask again (Retry-After)
    clock.now += 10.5
    with pytest.raises(NoUsableEngine) as later:
        decide("unusable", "bridge")
    assert later.value.retry_after == 20  # the rest, rounded up
    # The sentence itself says why, not only "now" (which reads like an outage).
    assert f"offline: {reasons['offline']}" in exc.message and f"unpriced: {reasons['unpriced']}" in exc.message


def test_what_every_set_up_engine_refuses_is_refused_whatever_engines_lack_keys(decide: Decide) -> None:
    """An engine without its key cannot make the request acceptable: the refusal of the others is
    the answer (422), not a 503 that a client would retry for ever."""
    with pytest.raises(BadEngineInput) as large:
        decide("unusable", "bridge", width=4096)  # too large for unpriced and cloud-b; offline has no key
    assert large.value.status == 422 and large.value.details["rule"] == "unusable"
    assert {c["engine"] for c in large.value.details["candidates"]} == {"offline", "unpriced", "cloud-b"}


def test_an_open_circuit_does_not_turn_a_request_its_engine_can_never_take_into_try_later(
        decide: Decide, health: EngineHealth) -> None:
    """A request over the rule's cap, or too large, for every engine that could serve it is refused
    for good: an open circuit on those engines was a 503 with Retry-After, and a client that
    waited got the 402 or 422 only after the cooldown."""
    for engine in ("cloud-b", "cloud-c"):
        for _ in range(health.threshold):
            health.failed(engine)
    with pytest.raises(BudgetExceeded) as capped:
        decide("capped", "bridge", engine="cloud-c")  # 20 credits, the rule allows 8
    assert capped.value.status == 402 and capped.value.retry_after is None
    with pytest.raises(BadEngineInput) as large:
        decide("unusable", "bridge", width=4096)
    assert large.value.status == 422
    reasons = {c["engine"]: c["skipped"] for c in large.value.details["candidates"]}
    assert reasons["cloud-b"].startswith("cannot take this request")
    # One it could take later still waits for its circuit.
    with pytest.raises(NoUsableEngine) as later:
        decide("unusable", "bridge")
    assert later.value.retry_after == 30


def test_a_size_beyond_an_engine_s_capabilities_is_refused_even_when_it_charges_nothing(router: Router) -> None:
    free = StubEngine("free-server", "local", 0)  # estimates 0 for any size, as a self-hosted server does
    free.capabilities = Capabilities(max_width=1024, max_height=1024)
    router.registry = EngineRegistry({**{e.name: e for e in ENGINES}, "free-server": free})
    big = router.assess("free-server", RenderRequest(stage="polish", prompt="x", width=2048, height=1024))
    assert big.skipped is not None and "1024x1024 at most" in big.skipped
    assert isinstance(big.refusal, BadEngineInput)
    fits = router.assess("free-server", RenderRequest(stage="polish", prompt="x", width=1024, height=1024))
    assert fits.skipped is None and fits.estimate == 0


def test_a_requested_engine_the_rule_keeps_from_the_request_is_refused_not_try_later(decide: Decide) -> None:
    with pytest.raises(BudgetExceeded) as capped:
        decide("capped", "bridge", engine="cloud-c")  # 20 credits, the rule allows 8
    assert capped.value.status == 402 and capped.value.details["max_credits"] == 8
    with pytest.raises(NoRoute) as staged:
        decide("odd", "bridge", engine="lite")  # listed by the rule, but a drafts-only engine
    assert staged.value.status == 422 and "does not serve the bridge stage" in staged.value.message
    with pytest.raises(NoRoute) as private:
        decide("routes", "bridge", engine="cloud-a", tags={"privacy": "local"})
    assert private.value.status == 422 and "private" in private.value.message


def test_a_refusal_names_the_engine_of_the_stage_not_one_the_rule_lists_for_another(decide: Decide) -> None:
    # One rule for every stage names lite first: a polish too large for the only engine of its
    # stage was answered "engine 'lite' does not serve the bridge stage", a no_route.
    with pytest.raises(BadEngineInput) as large:
        decide("one-rule", "bridge", width=4096)
    assert large.value.message.startswith("cloud-a: 4096x64 is larger than")
    assert [c["engine"] for c in large.value.details["candidates"]] == ["lite", "cloud-a"]
    with pytest.raises(NoRoute, match="engine 'lite' does not serve the bridge stage"):  # none of the stage
        decide("one-rule", "bridge", engine="lite")


def test_bad_size_is_a_422_bad_engine_input(decide: Decide) -> None:
    with pytest.raises(BadEngineInput) as info:
        decide("routes", "bridge", width=100)
    assert info.value.status == 422 and info.value.code == "invalid_request"
    assert "width" in info.value.message


def test_bad_size_for_some_engines_only_skips_them(decide: Decide) -> None:
    decision = decide("routes", "polish", width=100)  # cloud-c takes any size, local wants multiples of 8
    assert decision.chosen == "cloud-c"
    assert skipped(decision)["local"].startswith("cannot take this request")


# -- circuit breaker ------------------------------------------------------------------------------


def test_open_circuit_is_skipped_then_probed_after_cooldown(decide: Decide, health: EngineHealth,
                                                            clock: Clock) -> None:
    health.failed("cloud-a")
    assert health.state("cloud-a") == "degraded"
    assert decide("routes", "bridge").chosen == "cloud-a"  # one failure under threshold 2

    health.failed("cloud-a")
    assert health.state("cloud-a") == "open"
    decision = decide("routes", "bridge")
    assert decision.chosen == "cloud-b"
    assert skipped(decision) == {"cloud-a": "circuit open after repeated failures"}
    assert order(decision)[-1] == "cloud-a"

    clock.now += 29.0
    assert decide("routes", "bridge").chosen == "cloud-b"

    clock.now += 2.0  # past the cooldown: one probe may go
    assert health.state("cloud-a") == "degraded"
    assert decide("routes", "bridge").chosen == "cloud-a"
    health.assign("cloud-a", "job-probe")  # the probe is committed: nobody else gets the engine meanwhile
    assert skipped(decide("routes", "bridge")) == {"cloud-a": "circuit half-open: its probe request is out"}

    health.succeeded("cloud-a", "bridge", 1.0)
    assert health.state("cloud-a") == "ok"
    decision = decide("routes", "bridge")
    assert decision.chosen == "cloud-a" and skipped(decision) == {}


def test_a_half_open_circuit_is_told_open_while_its_probe_is_out(decide: Decide, health: EngineHealth,
                                                                  clock: Clock) -> None:
    """`GET /v1/engines` said `degraded` (it takes jobs) while routing sent every request but the
    probe elsewhere: the health tells what routing does."""
    for take in (lambda: health.reserve("cloud-a", "token"), lambda: health.admit("cloud-a", "job-queued"),
                 lambda: health.assign("cloud-a", "job-started")):
        health.failed("cloud-a")
        health.failed("cloud-a")
        clock.now += 31.0
        assert health.state("cloud-a") == "degraded" and decide("routes", "bridge").chosen == "cloud-a"
        take()
        assert skipped(decide("routes", "bridge")) == {"cloud-a": "circuit half-open: its probe request is out"}
        assert health.state("cloud-a") == "open"
        clock.now += 31.0  # a probe that never reported lapses: the next may go
        assert health.state("cloud-a") == "degraded" and decide("routes", "bridge").chosen == "cloud-a"
    health.admit("cloud-a", "job-canceled")
    health.finished("cloud-a", "job-canceled")  # no verdict: the next may go
    assert health.state("cloud-a") == "degraded" and decide("routes", "bridge").chosen == "cloud-a"


def test_failed_probe_opens_the_circuit_again(decide: Decide, health: EngineHealth, clock: Clock) -> None:
    health.failed("cloud-a")
    health.failed("cloud-a")
    clock.now += 31.0
    health.assign("cloud-a", "job-probe")
    health.failed("cloud-a")
    assert health.state("cloud-a") == "open"
    assert decide("routes", "bridge").chosen == "cloud-b"


# -- budget ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("budget_used", "rule", "chosen"), [
    (None, "bridge", "cloud-a"),  # no limit: no fraction to be over
    (0.0, "bridge", "cloud-a"),
    (0.8, "bridge", "cloud-a"),  # "over", not "at"
    (0.81, "near-budget", "local"),
    (1.5, "near-budget", "local"),
])
def test_budget_used_over_switches_to_local(decide: Decide, budget_used: float | None, rule: str,
                                            chosen: str) -> None:
    decision = decide("routes", "bridge", budget_used=budget_used)
    assert (decision.rule, decision.chosen) == (rule, chosen)
    if rule == "near-budget":
        assert decision.reason == "soft budget limit"
        assert decision.estimate == 0


@pytest.mark.parametrize("estimate", [1000.9999999999999, float("inf"), float("nan"), True, "5", 2**63])
def test_an_estimate_that_is_not_whole_millicredits_is_no_price(estimate: Any) -> None:
    """A plugin's fraction went into the ledger as a float its sums truncated; an infinity made
    every later sum of the project fail."""
    engine = SimpleNamespace(name="odd", estimate=lambda req: estimate)
    with pytest.raises(NoPrice) as info:
        priced(engine, RenderRequest(stage="bridge", prompt="x"))
    assert "a price is a whole, non-negative number of millicredits" in info.value.message


def test_a_numpy_integer_estimate_is_a_price() -> None:
    import numpy as np

    engine = SimpleNamespace(name="np", estimate=lambda req: np.int64(2500))
    estimate = priced(engine, RenderRequest(stage="bridge", prompt="x"))
    assert estimate == 2500 and type(estimate) is int


# -- device-time quotas ---------------------------------------------------------------------------

OVER = DeviceTime("prj_x", quota=60, used=75.0, own=True, retry_after=3000)


def test_a_project_over_its_device_time_skips_local_engines_only_and_routes_on(router: Router) -> None:
    request = RenderRequest(stage="bridge", prompt="a lighthouse", width=64, height=64)
    decision = router.decide("ordered", request, None, None, device=OVER)
    assert decision.chosen == "cloud-c" and usable(decision) == ["cloud-c", "cloud-a", "cloud-b"]
    told = "device-time quota used: 75 of 60 device-seconds in the last 24 hours"
    assert skipped(decision) == {"local2": told, "local": told}
    # Under its quota, or for a copy (which sends nothing), nothing is skipped for it.
    under = DeviceTime("prj_x", quota=60, used=59.9, own=True)
    assert router.decide("ordered", request, None, None, device=under).chosen == "local2"
    assert router.decide("ordered", request, None, None, device=OVER, circuits=False).chosen == "local2"


def test_a_request_only_local_engines_may_take_is_refused_429_with_the_sooner_wait(
        router: Router, health: EngineHealth) -> None:
    draft = RenderRequest(stage="ideation", prompt="a lighthouse", width=64, height=64)
    with pytest.raises(DeviceTimeExhausted) as refused:
        router.decide("routes", draft, None, None, device=OVER)
    assert (refused.value.status, refused.value.retry_after) == (429, 3000)
    assert refused.value.details["candidates"] == [{"engine": "lite", "estimate": 0.0, "skipped": (
        "device-time quota used: 75 of 60 device-seconds in the last 24 hours")}]
    # A request the local engine could never take is refused for that, not told to wait.
    with pytest.raises(BadEngineInput):
        router.decide("routes", RenderRequest(stage="ideation", prompt="x", width=4096, height=64), None, None,
                      device=OVER)
    # With the other engine's circuit open, the sooner of the two waits is told.
    for _ in range(2):
        health.failed("cloud-c")
    polish = RenderRequest(stage="polish", prompt="a lighthouse", width=64, height=64)
    with pytest.raises(DeviceTimeExhausted) as refused:
        router.decide("routes", polish, None, None, device=OVER)
    assert refused.value.retry_after == 30 and "cloud-c: circuit open" in refused.value.message
