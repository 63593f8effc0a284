"""Third-party engines: the `orchestrator.engines` entry points and `ORCH_ENGINES`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from orchestrator.errors import NotFound
from tests.fakes import FakePaidEngine, FakeQueueEngine
from tests.routing import run_draft, wait_for_job
from tests.routing.conftest import SettingsFactory, running, write_policies
from tiers import guard
from tiers import registry as registry_module
from tiers.base import CancelToken, EngineContext, Progress, RenderedImage, RenderRequest, RenderResult
from tiers.gemini import GeminiEngine
from tiers.guard import ThirdParty
from tiers.lite import LiteEngine
from tiers.registry import BUILTIN, GROUP, EngineRegistry

HERE = __name__


def fake_ep_factory(ctx: EngineContext) -> FakePaidEngine:
    return FakePaidEngine(ctx, name="fake-ep")


def raising_factory(ctx: EngineContext) -> FakePaidEngine:
    raise RuntimeError("licence server unreachable")


def file_factory(ctx: EngineContext) -> FakePaidEngine:
    raise FileNotFoundError(2, "No such file or directory", "/srv/acme-client/engine-config.json")


def misnamed_factory(ctx: EngineContext) -> FakePaidEngine:
    return FakePaidEngine(ctx, name="something-else")


def not_an_engine_factory(ctx: EngineContext) -> object:
    return object()


def bad_kind_factory(ctx: EngineContext) -> FakePaidEngine:
    engine = FakePaidEngine(ctx, name="broken-ep")
    engine.kind = "gpu"  # type: ignore[assignment]
    return engine


def no_stages_factory(ctx: EngineContext) -> FakePaidEngine:
    engine = FakePaidEngine(ctx, name="broken-ep")
    engine.stages = frozenset()
    return engine


def exiting_factory(ctx: EngineContext) -> FakePaidEngine:
    raise SystemExit(2)  # a licence check that calls sys.exit(): once it ended the service's start


def capable(**capabilities: Any) -> Callable[[EngineContext], FakePaidEngine]:
    def factory(ctx: EngineContext) -> FakePaidEngine:
        engine = FakePaidEngine(ctx, name="broken-ep")
        engine.capabilities = dataclasses.replace(engine.capabilities, **capabilities)
        return engine
    return factory


# Routing compares these with every request: each was a 500 for whatever the rule naming it routed.
no_size_factory = capable(max_width=None)
float_size_factory = capable(max_height=1024.0)
zero_multiple_factory = capable(size_multiple=0)
string_flag_factory = capable(img2img="yes")
min_past_max_factory = capable(min_side=4096)
# Named in a refusal's message and details, and shown by `/v1/engines`.
number_setting_factory = capable(max_size_setting=2048)


class Acme:
    """`module:Acme.factory` is an entry point's object as importlib.metadata reads it."""

    @staticmethod
    def factory(ctx: EngineContext) -> FakePaidEngine:
        return FakePaidEngine(ctx, name="acme")


class Faulty(FakePaidEngine):
    """A plugin with the bugs a service must outlive: `fault` names the method that raises."""

    def __init__(self, ctx: EngineContext, fault: str) -> None:
        super().__init__(ctx, name="faulty")
        self.fault = fault

    def availability(self) -> tuple[bool, str | None]:
        if self.fault == "availability":
            raise RuntimeError("licence check crashed")
        return super().availability()

    def prices(self) -> dict[str, Any]:
        if self.fault == "prices":
            raise KeyError("tier")
        return super().prices()

    def estimate(self, req: RenderRequest) -> int:
        if self.fault == "estimate":
            raise ZeroDivisionError("division by zero")
        return super().estimate(req)


def faulty_availability(ctx: EngineContext) -> Faulty:
    return Faulty(ctx, "availability")


def faulty_prices(ctx: EngineContext) -> Faulty:
    return Faulty(ctx, "prices")


def faulty_estimate(ctx: EngineContext) -> Faulty:
    return Faulty(ctx, "estimate")


def ep(name: str, target: str) -> EntryPoint:
    return EntryPoint(name=name, value=target, group=GROUP)


Load = Callable[..., EngineRegistry]


@pytest.fixture
def load(new_settings: SettingsFactory) -> Iterator[Load]:
    """`load(extra=..., **settings)`: a registry built like the service builds it; closed afterwards."""
    built: list[EngineRegistry] = []

    def make(extra: Iterable[EntryPoint] | None = None, **settings: Any) -> EngineRegistry:
        registry = EngineRegistry.load(EngineContext(settings=new_settings(**settings)), extra=extra)
        built.append(registry)
        return registry

    yield make
    for registry in built:
        asyncio.run(registry.aclose())


def test_entry_point_engine_is_registered(load: Load) -> None:
    registry = load(extra=[ep("fake-ep", f"{HERE}:fake_ep_factory")])
    assert "fake-ep" in registry
    engine = registry.get("fake-ep")
    assert isinstance(engine, ThirdParty) and isinstance(engine.wrapped, FakePaidEngine)
    assert engine.name == "fake-ep" and engine.kind == "remote"
    assert registry.broken == {}
    assert set(BUILTIN) <= set(registry.names())
    assert registry.names().count("fake-ep") == 1


def test_installed_entry_points_are_read(load: Load, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def entry_points(*, group: str) -> list[EntryPoint]:
        asked.append(group)
        return [ep("fake-ep", f"{HERE}:fake_ep_factory")]

    monkeypatch.setattr(registry_module, "entry_points", entry_points)
    registry = load()
    assert asked == [GROUP]
    assert isinstance(registry.get("fake-ep").wrapped, FakePaidEngine)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("target", "reason"), [
    (f"{HERE}:raising_factory", "licence server unreachable"),
    # A field no client can be told: `/v1/engines` failed for every caller.
    (f"{HERE}:bad_kind_factory", "kind 'gpu' is not one of local, remote"),
    (f"{HERE}:no_stages_factory", "stages frozenset() must be a non-empty set"),
    (f"{HERE}:misnamed_factory", "registered as 'broken-ep'"),
    (f"{HERE}:not_an_engine_factory", "did not return an Engine"),
    ("tests.no_such_module:factory", "No module named"),
    ("tests.routing.boom_engine:factory", "a module that fails as it is imported"),  # once a failed start
    (f"{HERE}:no_such_attribute", "no_such_attribute"),
    (f"{HERE}:exiting_factory", "SystemExit"),
    ("tests.routing.exiting_engine:factory", "SystemExit"),
    (f"{HERE}:no_size_factory", "capabilities.max_width is None, not a positive int"),
    (f"{HERE}:float_size_factory", "capabilities.max_height is 1024.0, not a positive int"),
    (f"{HERE}:zero_multiple_factory", "capabilities.size_multiple is 0"),
    (f"{HERE}:string_flag_factory", "capabilities.img2img is 'yes', not a bool"),
    (f"{HERE}:min_past_max_factory", "min_side 4096 is past its max_width/max_height"),
    (f"{HERE}:number_setting_factory", "capabilities.max_size_setting is 2048, not a setting's name or None"),
])
def test_failing_factory_is_listed_as_broken(load: Load, target: str, reason: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    registry = load(extra=[ep("broken-ep", target), ep("fake-ep", f"{HERE}:fake_ep_factory")])
    assert "broken-ep" not in registry
    assert "broken-ep" in registry.names()
    broken = registry.broken["broken-ep"]
    assert broken.reason.startswith(("could not be created:", "not installed in this process:",
                                     "could not be imported:"))
    assert reason in broken.reason
    with pytest.raises(NotFound) as info:
        registry.get("broken-ep")
    assert reason in info.value.message
    # One broken plug-in does not take the others down.
    assert "fake-ep" in registry and "lite" in registry
    if "such" in reason:  # not installed here (hosts may differ in their engines): a line, no traceback
        [record] = [r for r in caplog.records if "broken-ep" in r.getMessage()]
        assert "is not installed here" in record.getMessage() and record.exc_info is None


def test_an_entry_point_naming_a_class_s_attribute_loads(load: Load) -> None:
    registry = load(extra=[ep("acme", f"{HERE}:Acme.factory")])
    assert "acme" in registry and registry.broken == {}


def test_a_broken_engine_s_reason_names_no_server_path(load: Load, caplog: pytest.LogCaptureFixture) -> None:
    """Routing tells a project's key why an engine was skipped, and `/v1/engines` lists it: the
    path is cut to its last part; the operator's log keeps it whole."""
    registry = load(extra=[ep("broken-ep", f"{HERE}:file_factory")])
    reason = registry.broken["broken-ep"].reason
    assert "engine-config.json" in reason and "/srv" not in reason
    with pytest.raises(NotFound) as info:
        registry.get("broken-ep")
    assert "/srv" not in info.value.message
    assert any(r.exc_info and "/srv/acme-client/engine-config.json" in str(r.exc_info[1]) for r in caplog.records)


def test_an_engine_name_longer_than_jobs_can_store_is_not_loaded(load: Load) -> None:
    """Jobs and the ledger store the name (100 characters, which PostgreSQL enforces)."""
    from tiers.registry import extra_engine_problems

    long = "e" * 101
    registry = load(extra=[ep(long, f"{HERE}:fake_ep_factory"), ep("fake-ep", f"{HERE}:fake_ep_factory")])
    assert long not in registry.names() and "fake-ep" in registry
    assert extra_engine_problems(f"{long}=x:y,ok=x:y") == [f"'{'e' * 40}...' is longer than 100 characters, "
                                                           "which jobs store"]


def test_an_engine_may_not_take_the_spend_report_s_key_for_charges_without_one() -> None:
    """GET /v1/spend groups a charge without an engine under "-" (SQL coalesce): an ORCH_ENGINES
    engine named "-" started, and its charges were summed into that group, JSON and CSV alike."""
    from tiers.registry import extra_engine_problems

    assert extra_engine_problems("-=tests.fakes:factory,ok=x:y") == [
        "'-' is the spend report's key for charges that name no engine: give the engine another name"]
    assert extra_engine_problems("-x=tests.fakes:factory") == []  # written "'-x" in the CSV, its own group


def test_name_clashing_with_a_builtin_is_ignored(load: Load) -> None:
    registry = load(extra=[ep("gemini", f"{HERE}:raising_factory"), ep("lite", "tests.fakes:factory")],
                    engines="local-hifi=tests.fakes:factory")
    assert isinstance(registry.get("gemini"), GeminiEngine)
    assert isinstance(registry.get("lite"), LiteEngine)
    assert type(registry.get("local-hifi")).__name__ == "LocalHifiEngine"
    assert registry.broken == {}


def test_settings_engines_register_factories(load: Load) -> None:
    registry = load(engines="fake-paid=tests.fakes:factory, fake-b=tests.routing:fake_b_factory")
    assert registry.get("fake-paid").name == "fake-paid"
    assert registry.get("fake-b").name == "fake-b"
    request = RenderRequest(stage="bridge", prompt="x", n=2)
    assert registry.get("fake-paid").estimate(request) == 20_000
    assert registry.get("fake-b").estimate(request) == 40_000


def test_engines_endpoint_lists_plugins_and_broken_ones(new_settings: SettingsFactory,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: [
        ep("fake-ep", f"{HERE}:fake_ep_factory"), ep("broken-ep", f"{HERE}:raising_factory")])
    with running(new_settings()) as client:
        response = client.get("/v1/engines")
    assert response.status_code == 200
    listed = {e["name"]: e for e in response.json()}
    plugin = listed["fake-ep"]
    assert (plugin["kind"], plugin["available"], plugin["health"], plugin["model"]) == ("remote", True, "ok", "fake-1")
    assert plugin["stages"] == ["bridge", "polish"]
    assert plugin["prices"]["credits_per_image"] == {"fake-1": {"image": 10.0}}
    broken = listed["broken-ep"]
    assert broken["available"] is False and broken["health"] == "ok"  # no circuit tripped: it never ran
    assert "licence server unreachable" in broken["note"]
    assert set(BUILTIN) <= set(listed)


@pytest.mark.parametrize("fault", ["availability", "prices", "estimate"])
def test_a_plugin_that_raises_is_unavailable_or_unpriced_and_the_service_runs_on(
        new_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fault: str) -> None:
    """An availability check that raised stopped the service from starting; an estimate that
    raised made every request its policy rule reached a 500."""
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: [ep("faulty", f"{HERE}:faulty_{fault}")])
    policies = write_policies(tmp_path / "policies", {"studio": (
        'name = "studio"\n[[rules]]\nname = "all"\nmatch = {}\nengines = ["faulty", "lite", "local-hifi"]\n')})
    with running(new_settings(policy_dir=policies, policy="studio")) as client:
        listed = {e["name"]: e for e in client.get("/v1/engines").json()}
        project = client.post("/v1/projects", json={"name": "p"}).json()["id"]
        [draft] = run_draft(client, project)["assets"]
        explained = client.post(f"/v1/assets/{draft}/promote", json={"engine": "faulty"})
        routed = client.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": draft})
    # The rule's next engine takes what the plugin cannot.
    assert routed.status_code == 200, routed.text
    assert routed.json()["engine"] == ("faulty" if fault == "prices" else "local-hifi")
    plugin = listed["faulty"]
    assert plugin["available"] is (fault != "availability")
    if fault == "availability":
        assert "its availability check failed: RuntimeError: licence check crashed" in plugin["note"]
    if fault == "prices":
        assert plugin["prices"] == {}
    if fault != "prices":
        # Refused, naming why (unavailable now, or not priced): never a 500.
        assert explained.status_code == (503 if fault == "availability" else 422), explained.text
        assert explained.json()["error"]["code"] == "no_route", explained.text
        if fault == "estimate":
            assert "its estimate failed: ZeroDivisionError" in explained.text


# Set: the hanging plugin's calls answer (each waits for it, a licence server that never replies).
ANSWER = threading.Event()


class Hanging(FakePaidEngine):
    def __init__(self, ctx: EngineContext, method: str) -> None:
        super().__init__(ctx, name="hanging")
        self.method = method

    def availability(self) -> tuple[bool, str | None]:
        if self.method == "availability":
            ANSWER.wait(60)
        return super().availability()

    def estimate(self, req: RenderRequest) -> int:
        if self.method == "estimate":
            ANSWER.wait(60)
        return super().estimate(req)

    def prices(self) -> dict[str, Any]:
        if self.method == "prices":
            ANSWER.wait(60)
        return super().prices()


def hanging_availability(ctx: EngineContext) -> Hanging:
    return Hanging(ctx, "availability")


def hanging_estimate(ctx: EngineContext) -> Hanging:
    return Hanging(ctx, "estimate")


@pytest.mark.parametrize("method", ["availability", "estimate"])
def test_a_plugin_whose_check_hangs_is_passed_over_after_its_limit_and_used_again_once_it_answers(
        new_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, method: str) -> None:
    """Both are asked while a request waits, and again by a submit under the database's write
    lock: one that blocked held every request, and every write of the service, for as long."""
    monkeypatch.setattr(guard, "PLUGIN_CALL_LIMIT", 0.3)
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: [ep("hanging", f"{HERE}:hanging_{method}")])
    policies = write_policies(tmp_path / "policies", {"studio": (
        'name = "studio"\n[[rules]]\nname = "all"\nmatch = {}\nengines = ["hanging", "lite", "local-hifi"]\n')})
    ANSWER.set()
    try:
        with running(new_settings(policy_dir=policies, policy="studio")) as client:
            project = client.post("/v1/projects", json={"name": "p"}).json()["id"]
            [draft] = run_draft(client, project)["assets"]
            ANSWER.clear()  # from here on, its licence server is away
            body = {"stage": "bridge", "source_asset_id": draft}
            late = client.post("/v1/route/explain", json=body)
            again = client.post("/v1/route/explain", json=body)
            ANSWER.set()
            deadline = time.monotonic() + 30
            while (answered := client.post("/v1/route/explain", json=body)).json().get("engine") != "hanging":
                assert time.monotonic() < deadline, answered.text
                time.sleep(0.05)
    finally:
        ANSWER.set()

    def skipped(response: Any) -> str:
        assert response.status_code == 200, response.text
        assert response.json()["engine"] == "local-hifi", response.text  # the rule's next engine took it
        [hanging] = [c for c in response.json()["routing"]["candidates"] if c["engine"] == "hanging"]
        return str(hanging["skipped"])

    told = "unavailable" if method == "availability" else "unpriced"
    assert skipped(late).startswith(f"{told}: ") and f"its {method}() did not answer within 0.3 s" in skipped(late)
    # While that call still hangs, the next is refused at once, not made to wait (and a thread spent) again.
    assert f"its {method}() has not answered for " in skipped(again)


class HangingProperty(FakeQueueEngine):
    """A plugin whose `model`, `note` or `can_reattach()` asks a server that does not answer
    (`ANSWER`) before it answers: the loaded checkpoint, a licence's state."""

    def __init__(self, ctx: EngineContext, method: str) -> None:
        super().__init__(ctx)
        self.method = method

    @property
    def model(self) -> str:
        if self.method == "model":
            ANSWER.wait(60)
        return "queue-1"

    @property
    def note(self) -> str | None:
        if self.method == "note":
            ANSWER.wait(60)
        return "licensed"

    def can_reattach(self, handles: list[dict[str, Any]], req: RenderRequest) -> bool:
        if self.method == "can_reattach":
            ANSWER.wait(60)
        return True


@pytest.mark.parametrize(("method", "late", "answered"), [
    ("model", "unknown", "queue-1"),
    ("note", "its note did not answer within 0.3 s", "licensed"),
    ("can_reattach", False, True),
])
def test_a_plugin_whose_model_note_or_reattach_check_hangs_answers_as_unknown_after_its_limit(
        method: str, late: object, answered: object) -> None:
    """Each is read while a request or a recovery waits, the model by a submit and by a job's end
    under the database's write lock: one that blocked held every write of the service as long."""
    hanging = HangingProperty(EngineContext(settings=None), method)  # type: ignore[arg-type]
    plugin = registry_module.checked(hanging, "tests:hanging")  # type: ignore[arg-type, attr-defined]
    assert isinstance(plugin, ThirdParty)
    plugin.call_limit = 0.3

    def ask() -> object:
        if method == "can_reattach":
            return plugin.can_reattach([{"id": "q-1"}], RenderRequest(stage="bridge", prompt="x"))
        return getattr(plugin, method)

    ANSWER.clear()
    try:
        started = time.monotonic()
        assert ask() == late
        again = ask()  # at once, while the first still hangs
        assert time.monotonic() - started < 5
        if method == "note":
            assert str(again).startswith("its note has not answered for "), again
        else:
            assert again == late
    finally:
        ANSWER.set()
    deadline = time.monotonic() + 10
    while ask() != answered:  # asked again once the late one has answered
        assert time.monotonic() < deadline
        time.sleep(0.01)


class Nameless(FakePaidEngine):
    """A plugin that asks a server for its loaded checkpoint, which may be away (`ODD_FAULT`
    "model"); its price and its results do not need it."""

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx, name="nameless")

    @property
    def model(self) -> str:
        if ODD_FAULT["fault"] == "model":
            raise RuntimeError("checkpoint server unreachable")
        return "fake-1"

    def estimate(self, req: RenderRequest) -> int:
        return req.n * self._prices.millicredits("fake-1", "image")

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        self.calls += 1
        progress.step(1, 1)
        images = [RenderedImage(Image.new("RGB", (req.width, req.height), (9, 9, 9)), req.seed)
                  for _ in range(req.n)]
        return RenderResult(images=images, model="fake-1", provider_request_id=f"nameless-{self.calls}")


def nameless_factory(ctx: EngineContext) -> Nameless:
    return Nameless(ctx)


def test_a_paid_job_whose_plugin_could_not_name_its_model_is_never_copied(
        new_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A copy is found by engine, model and request: with the model unknown, an earlier job's
    images may be another checkpoint's, and the second request was charged nothing for them."""
    monkeypatch.setattr(registry_module, "entry_points",
                        lambda *, group: [ep("nameless", f"{HERE}:nameless_factory")])
    policies = write_policies(tmp_path / "policies", {"studio": (
        'name = "studio"\n[[rules]]\nname = "all"\nmatch = {}\nengines = ["nameless", "lite"]\n')})
    with running(new_settings(policy_dir=policies, policy="studio")) as client:
        project = client.post("/v1/projects", json={"name": "p"}).json()["id"]
        [draft] = run_draft(client, project)["assets"]
        monkeypatch.setitem(ODD_FAULT, "fault", "model")
        jobs = []
        for _ in range(2):
            submitted = client.post(f"/v1/assets/{draft}/promote", json={"engine": "nameless", "prompt": "a barn"})
            assert submitted.status_code == 202, submitted.text
            jobs.append(wait_for_job(client, submitted.json()["id"]))
        monkeypatch.setitem(ODD_FAULT, "fault", "")
        named = []
        for _ in range(2):  # one after the other: the second finds the first's result
            submitted = client.post(f"/v1/assets/{draft}/promote", json={"engine": "nameless", "prompt": "a barn"})
            named.append(wait_for_job(client, submitted.json()["id"]))
    def outcome(job: dict[str, Any]) -> tuple[str, bool, float]:
        return job["status"], job["cost"]["cache_hit"], job["cost"]["charged"]

    assert [outcome(j) for j in jobs] == [("succeeded", False, 10.0)] * 2  # each rendered, and paid for
    assert [outcome(j) for j in named] == [("succeeded", False, 10.0), ("succeeded", True, 0)]  # named: copied


def test_a_plugin_late_on_every_call_is_warned_of_once_and_a_late_answer_is_told(
        caplog: pytest.LogCaptureFixture) -> None:
    plugin = ThirdParty(Hanging(EngineContext(settings=None), "availability"))  # type: ignore[arg-type]
    plugin.call_limit = 0.5  # a call that answers at once is never late, even on a loaded machine
    caplog.set_level(logging.DEBUG, logger="tiers.guard")
    ANSWER.set()
    assert plugin.availability() == (True, None)
    try:
        for _ in range(2):  # two late calls, each answered after its limit
            ANSWER.clear()
            available, why = plugin.availability()
            assert available is False and why == "its availability() did not answer within 0.5 s"
            ANSWER.set()
            deadline = time.monotonic() + 10
            while plugin.availability() != (True, None):  # asked again once the late one has answered
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        ANSWER.set()
    told = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "tiers.guard"]
    assert [level for level, _ in told if "did not answer" in _] == ["WARNING", "DEBUG"]
    assert sum("its availability() answered after" in message for _, message in told) == 2


def test_a_plugin_whose_price_list_hangs_lists_no_prices_until_it_answers() -> None:
    """`GET /v1/engines` asks it: each dashboard's poll held a request thread for as long."""
    plugin = ThirdParty(Hanging(EngineContext(settings=None), "prices"))  # type: ignore[arg-type]
    plugin.call_limit = 0.5
    ANSWER.clear()
    try:
        assert plugin.prices() == {}
        assert plugin.prices() == {}  # at once, while the first still hangs
    finally:
        ANSWER.set()
    deadline = time.monotonic() + 10
    while not plugin.prices():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert plugin.prices() == plugin.wrapped.prices()


class Stubborn(FakePaidEngine):
    """A plugin whose run ignores its cancel token, or raises what only a stop may raise."""

    def __init__(self, ctx: EngineContext, raises: BaseException | None = None) -> None:
        super().__init__(ctx, name="stubborn")
        self.raises = raises

    async def run(self, req: RenderRequest, progress: Any, cancel: Any) -> Any:
        if self.raises is not None:
            raise self.raises
        await asyncio.sleep(3600)


async def test_a_plugin_that_ignores_its_cancel_is_stopped_after_the_grace() -> None:
    from orchestrator.errors import Canceled
    from tiers.base import CancelToken, NullProgress

    plugin = ThirdParty(Stubborn(EngineContext(settings=None)))  # type: ignore[arg-type]
    plugin.cancel_grace = 0.05
    token = CancelToken()
    run = asyncio.ensure_future(plugin.run(RenderRequest(stage="bridge", prompt="x"), NullProgress(), token))
    await asyncio.sleep(0.01)
    token.cancel()
    with pytest.raises(Canceled) as info:
        await asyncio.wait_for(run, 5)
    assert "did not stop within" in info.value.message and info.value.charged == "unknown"  # a remote engine


class LibraryAbort(BaseException):
    """What a library may raise past `except Exception` (gevent's, pytest's outcomes)."""


@pytest.mark.parametrize("raised", [asyncio.CancelledError(), SystemExit(3), KeyboardInterrupt(), GeneratorExit(),
                                    LibraryAbort()],
                         ids=["CancelledError", "SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException"])
async def test_a_plugin_raising_what_only_a_stop_may_raise_fails_its_job(raised: BaseException) -> None:
    """A CancelledError left the job running with nothing to end it; a SystemExit or a
    KeyboardInterrupt raised in its task stopped the event loop, and the service with it; the others
    passed the runner's `except Exception`, leaving the job running until its lease ran out."""
    from tiers.base import CancelToken, NullProgress
    from tiers.guard import PluginFault

    plugin = ThirdParty(Stubborn(EngineContext(settings=None), raises=raised))  # type: ignore[arg-type]
    with pytest.raises(PluginFault):
        await plugin.run(RenderRequest(stage="bridge", prompt="x"), NullProgress(), CancelToken())


@pytest.mark.parametrize(("name", "factory", "protocols"), [
    ("fake-paid", "tests.fakes:factory", set()),
    ("fake-queue", "tests.fakes:queue_factory", {"Reattachable"}),
    ("fake-free", "tests.fakes:free_factory", {"Restartable"}),
    ("fake-free", "tests.fakes:resuming_factory", {"Restartable", "Resumable"}),
])
def test_a_plugin_keeps_the_recovery_protocols_it_has_and_no_others(load: Load, name: str, factory: str,
                                                                     protocols: set[str]) -> None:
    """Held in the guard, a plugin must still read as Reattachable (its accepted work followed
    after a crash) or Restartable (a free server's job run again), as the class itself says:
    Python 3.12's isinstance against a protocol looks at the class only, never `__getattr__`."""
    import inspect

    from tiers.base import Reattachable, Restartable, Resumable

    engine = load(engines=f"{name}={factory}").get(name)
    assert isinstance(engine, ThirdParty)
    members = {"Reattachable": ("can_reattach", "reattach"), "Restartable": ("forget",), "Resumable": ("resume",)}
    has = {proto for proto, names in members.items()
           if all(inspect.getattr_static(engine, n, None) is not None for n in names)}
    assert has == protocols
    assert {p.__name__ for p in (Reattachable, Restartable, Resumable) if isinstance(engine, p)} == protocols


async def test_a_plugin_s_task_stops_when_its_job_is_stopped_during_the_cancel_grace() -> None:
    from tiers.base import CancelToken, NullProgress

    started = asyncio.Event()

    class Slow(Stubborn):
        async def run(self, req: RenderRequest, progress: Any, cancel: Any) -> Any:
            started.set()
            try:
                await asyncio.sleep(3600)
            finally:
                stopped.append(True)

    stopped: list[bool] = []
    plugin = ThirdParty(Slow(EngineContext(settings=None)))  # type: ignore[arg-type]
    plugin.cancel_grace = 3600
    token = CancelToken()
    run = asyncio.ensure_future(plugin.run(RenderRequest(stage="bridge", prompt="x"), NullProgress(), token))
    await started.wait()
    token.cancel()
    await asyncio.sleep(0.05)  # in the grace now
    run.cancel()  # a stop, or a timeout around the job
    with pytest.raises(asyncio.CancelledError):
        await run
    await asyncio.sleep(0.05)
    assert stopped == [True]


ODD_FAULT = {"fault": ""}


class Odd(FakePaidEngine):
    """A plugin that starts well, then answers with values of the wrong shape, or whose `model`
    raises (`ODD_FAULT` says which, read at each call)."""

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx, name="odd")

    @property
    def model(self) -> str:
        if ODD_FAULT["fault"] == "model":
            raise RuntimeError("licence server unreachable")
        return "odd\x00one" if ODD_FAULT["fault"] == "nul" else "odd-1"

    def availability(self) -> Any:
        return False if ODD_FAULT["fault"] == "availability" else super().availability()

    def prices(self) -> Any:
        return None if ODD_FAULT["fault"] == "prices" else super().prices()


def odd_factory(ctx: EngineContext) -> Odd:
    return Odd(ctx)


@pytest.mark.parametrize(("fault", "seen"), [
    ("model", {"model": "unknown", "available": True}),
    ("availability", {"available": False, "note": "its availability check answered False, not (bool, reason)"}),
    ("prices", {"prices": {}, "available": True}),
    ("nul", {"model": "odd\ufffdone"}),  # PostgreSQL refused every submit's job row
])
def test_a_plugin_answering_the_wrong_shape_is_listed_as_it_can_be(
        new_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, fault: str, seen: dict[str, Any]) -> None:
    """A bare False from availability(), prices() of None or a model that raises made
    /v1/engines a 500 for every caller."""
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: [ep("odd", f"{HERE}:odd_factory")])
    with running(new_settings()) as client:
        monkeypatch.setitem(ODD_FAULT, "fault", fault)
        response = client.get("/v1/engines")
    assert response.status_code == 200, response.text
    listed = {e["name"]: e for e in response.json()}["odd"]
    assert {key: listed[key] for key in seen} == seen


async def test_a_plugin_s_forget_that_hangs_is_stopped_after_the_grace() -> None:
    """It held its job, and a user's cancel of it, for as long as it liked."""
    from tests.fakes import FakeServerEngine

    stopped: list[bool] = []

    class Hanging(FakeServerEngine):
        async def forget(self, handles: list[dict[str, Any]]) -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                stopped.append(True)

    plugin = registry_module.checked(Hanging(EngineContext(settings=None)), "tests:hanging")  # type: ignore[arg-type, attr-defined]
    assert isinstance(plugin, ThirdParty)
    plugin.cancel_grace = 0.05
    await asyncio.wait_for(plugin.forget([{"id": "p1"}]), 5)
    assert stopped == [True]


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt()], ids=["SystemExit", "KeyboardInterrupt"])
async def test_a_plugin_s_withdraw_is_held_as_its_run_is(raised: BaseException) -> None:
    """Called as it was, a SystemExit from it ended the event loop (and nothing held a hang)."""
    from tests.fakes import FakePaidEngine, FakeQueueEngine
    from tiers.base import Withdrawable
    from tiers.guard import PluginFault

    class Failing(FakeQueueEngine):
        async def withdraw(self, handles: list[dict[str, Any]]) -> bool:
            raise raised

    plugin = registry_module.checked(Failing(EngineContext(settings=None)), "tests:failing")  # type: ignore[arg-type, attr-defined]
    assert isinstance(plugin, ThirdParty) and isinstance(plugin, Withdrawable)
    with pytest.raises(PluginFault):
        await plugin.withdraw([{"id": "q-1"}])
    plain = registry_module.checked(FakePaidEngine(EngineContext(settings=None)), "tests:plain")  # type: ignore[arg-type, attr-defined]
    assert not isinstance(plain, Withdrawable)  # only what the plugin has


@pytest.mark.parametrize(("answer", "unbilled"), [(True, True), (1, False), ("yes", False), (None, False)])
async def test_only_a_plugin_s_plain_true_says_its_withdrawn_work_never_ran(answer: object, unbilled: bool) -> None:
    """What else a plugin answers may have billed: its job's charge must wait for the invoice."""
    from tests.fakes import FakeQueueEngine
    from tiers.base import Withdrawable

    class Answering(FakeQueueEngine):
        async def withdraw(self, handles: list[dict[str, Any]]) -> Any:
            return answer

    plugin = registry_module.checked(Answering(EngineContext(settings=None)), "tests:answering")  # type: ignore[arg-type, attr-defined]
    assert isinstance(plugin, ThirdParty) and isinstance(plugin, Withdrawable)
    assert await plugin.withdraw([{"id": "q-1"}]) is unbilled


async def test_a_plugin_s_withdraw_that_hangs_is_stopped_and_says_it_may_have_billed() -> None:
    from tests.fakes import FakeQueueEngine

    class Hanging(FakeQueueEngine):
        async def withdraw(self, handles: list[dict[str, Any]]) -> bool:
            await asyncio.sleep(60)
            return True

    plugin = registry_module.checked(Hanging(EngineContext(settings=None)), "tests:hanging")  # type: ignore[arg-type, attr-defined]
    assert isinstance(plugin, ThirdParty)
    plugin.cancel_grace = 0.05
    assert await asyncio.wait_for(plugin.withdraw([{"id": "q-1"}]), 5) is False


def test_a_plugin_whose_model_raises_at_start_is_loaded(load: Load, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python 3.11 `isinstance` against the Engine protocol ran the property: the plugin was
    listed broken ("could not be created"), though its model reads as unknown once loaded."""
    monkeypatch.setitem(ODD_FAULT, "fault", "model")
    registry = load(extra=[ep("odd", f"{HERE}:odd_factory")])
    assert registry.broken == {}
    assert registry.get("odd").model == "unknown"


def chaos_a_factory(ctx: EngineContext) -> FakePaidEngine:
    return FakePaidEngine(ctx, name="chaos")


chaos_b_factory = chaos_a_factory


def installed(tmp_path: Path, packages: dict[str, str]) -> list[EntryPoint]:
    """The `orchestrator.engines` entry points of `packages` (`{distribution: "name = module:attr"}`),
    as importlib.metadata reads them from installed packages' metadata."""
    from importlib.metadata import distributions

    for dist, line in packages.items():
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{line}\n")
    return [e for d in distributions(path=[str(tmp_path)]) for e in d.entry_points if e.group == GROUP]


def test_a_name_two_installed_packages_register_is_refused(load: Load, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Whichever importlib.metadata listed first won, and the log said the other's name was a built-in's."""
    found = installed(tmp_path, {"chaos-a": f"chaos = {HERE}:chaos_a_factory",
                                 "chaos-b": f"chaos = {HERE}:chaos_b_factory",
                                 "acme-engine": f"acme = {HERE}:Acme.factory"})
    assert len(found) == 3
    registry = load(extra=found)
    assert "chaos" not in registry and "acme" in registry
    reason = registry.broken["chaos"].reason
    assert reason == (f"package chaos-a ({HERE}:chaos_a_factory) and package chaos-b ({HERE}:chaos_b_factory) "
                      "both register this name: neither is loaded; uninstall all but one")
    with pytest.raises(NotFound) as info:
        registry.get("chaos")
    assert "chaos-a" in info.value.message and "chaos-b" in info.value.message
    assert not any("built-in" in r.getMessage() for r in caplog.records)


def test_an_orch_engines_entry_named_as_an_installed_plugin_is_refused(load: Load, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The ORCH_ENGINES entry silently took the plugin's place."""
    from tiers.registry import extra_engine_problems

    found = installed(tmp_path, {"chaos-a": f"chaos = {HERE}:chaos_a_factory"})
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: found)
    assert extra_engine_problems("chaos=tests.fakes:factory, fake-b=tests.routing:fake_b_factory") == [
        f"'chaos' is the name of an installed plugin's engine (package chaos-a ({HERE}:chaos_a_factory)): "
        "give the engine another, or uninstall the plugin"]
    # Past that check (a registry built by hand), the plugin keeps its name, as a built-in does.
    registry = load(engines="chaos=tests.routing:fake_b_factory")
    assert isinstance(registry.get("chaos").wrapped, FakePaidEngine)  # type: ignore[attr-defined]
    assert registry.get("chaos").estimate(RenderRequest(stage="bridge", prompt="x")) == 10_000


def blocking_chaos_factory(ctx: EngineContext) -> FakePaidEngine:
    import time

    class Chaos(FakePaidEngine):
        async def run(self, req: RenderRequest, progress: Any, cancel: Any) -> Any:
            from tiers.guard import LOOP_HOLD_LIMIT

            time.sleep(LOOP_HOLD_LIMIT * 1.2)  # as a `requests.post` in `async def run`
            return await super().run(req, progress, cancel)

    return Chaos(ctx, name="chaos")


def test_the_readme_s_plugin_policy_routes_to_it_and_a_blocking_run_is_told(
        new_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Under a shipped policy a plugin's engine is refused (the README said nothing of it); the
    README's policy routes to it. Its run blocking the loop is said in the log and `/v1/engines`."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```toml\n# ORCH_POLICY_DIR/with-chaos.toml\n", 1)[1].split("```", 1)[0]
    plugin = ep("chaos", f"{HERE}:blocking_chaos_factory")
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: [plugin])
    policies = write_policies(tmp_path / "policies", {"with-chaos": example})
    with running(new_settings(policy_dir=policies)) as client:
        balanced = client.post("/v1/projects", json={"name": "b", "policy": "balanced"}).json()["id"]
        mine = client.post("/v1/projects", json={"name": "c", "policy": "with-chaos"}).json()["id"]
        [refused_draft] = run_draft(client, balanced)["assets"]
        refused = client.post(f"/v1/assets/{refused_draft}/promote", json={"engine": "chaos"})
        [draft] = run_draft(client, mine)["assets"]
        routed = client.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": draft})
        promoted = client.post(f"/v1/assets/{draft}/promote", json={"engine": "chaos"})
        assert promoted.status_code == 202, promoted.text
        wait_for_job(client, promoted.json()["id"], ("succeeded",))
        listed = {e["name"]: e for e in client.get("/v1/engines").json()}["chaos"]
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_route", refused.text
    assert routed.status_code == 200 and routed.json()["engine"] == "chaos", routed.text
    assert listed["available"] is True and "Its run() held the service's event loop for " in listed["note"]
    assert any(r.levelname == "WARNING" and "engine chaos held the service's event loop" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("answer", ["raises", "hangs", "text", (0, 512), (True, 512), (2**40, 2**40), None])
def test_a_plugin_s_largest_size_that_fails_is_taken_as_the_size_asked(answer: object) -> None:
    """Asked at a submit under its project's write lock: one that raised failed every submit routed to
    the plugin (a 500), one that hung held every writer of the service, and a size past what can be
    stored made the job's bound too large for its BIGINT column."""
    from orchestrator import quota

    class Sized(FakePaidEngine):
        def largest_size(self, req: RenderRequest) -> Any:
            if answer == "raises":
                raise ZeroDivisionError
            if answer == "hangs":
                time.sleep(2)
            return answer

    plugin = registry_module.checked(Sized(EngineContext(settings=None)), "tests:sized")  # type: ignore[arg-type, attr-defined]
    assert isinstance(plugin, ThirdParty)
    plugin.call_limit = 0.05
    asked = RenderRequest(stage="ideation", prompt="p", n=16, width=320, height=256)
    started = time.monotonic()
    assert quota.output_size(plugin, asked) == (320, 256)
    assert time.monotonic() - started < 1
    assert quota.job_bound(plugin, asked, {"prompt": "p"}) < 2**63


def test_a_plugin_s_largest_size_is_its_own_and_one_without_is_held_at_the_size_asked() -> None:
    from orchestrator import quota

    class Sized(FakePaidEngine):
        def largest_size(self, req: RenderRequest) -> tuple[int, int]:
            return 1024, 768

    asked = RenderRequest(stage="ideation", prompt="p", n=1, width=320, height=256)
    sized = registry_module.checked(Sized(EngineContext(settings=None)), "tests:sized")  # type: ignore[arg-type, attr-defined]
    plain = registry_module.checked(FakePaidEngine(EngineContext(settings=None)), "tests:plain")  # type: ignore[arg-type, attr-defined]
    assert (quota.output_size(sized, asked), quota.output_size(plain, asked)) == ((1024, 768), (320, 256))


@pytest.mark.parametrize(("name", "reason"), [
    ("Total", "is the key of the spend export's totals row"),
    ("-", "is the spend report's key for charges that name no engine"),
])
def test_a_plugin_named_as_a_spend_report_key_is_not_loaded(load: Load, name: str, reason: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """An installed plugin's engine may not take a name ORCH_ENGINES is refused at start for: its
    charges would be read as the spend report's totals row, or merged with those naming no engine."""
    registry = load(extra=[ep(name, f"{HERE}:fake_ep_factory"), ep("fake-ep", f"{HERE}:fake_ep_factory")])
    assert name not in registry and name in registry.names()
    assert registry.broken[name].reason.startswith(reason)
    assert reason in caplog.text
    assert isinstance(registry.get("fake-ep").wrapped, FakePaidEngine)  # type: ignore[attr-defined]
