"""Third-party engines: the `orchestrator.engines` entry points and `ORCH_ENGINES`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from orchestrator.errors import NotFound
from tests.fakes import FakePaidEngine
from tests.routing.conftest import SettingsFactory, running
from tiers import registry as registry_module
from tiers.base import EngineContext, RenderRequest
from tiers.gemini import GeminiEngine
from tiers.lite import LiteEngine
from tiers.registry import BUILTIN, GROUP, EngineRegistry

HERE = __name__


def fake_ep_factory(ctx: EngineContext) -> FakePaidEngine:
    return FakePaidEngine(ctx, name="fake-ep")


def raising_factory(ctx: EngineContext) -> FakePaidEngine:
    raise RuntimeError("licence server unreachable")


def misnamed_factory(ctx: EngineContext) -> FakePaidEngine:
    return FakePaidEngine(ctx, name="something-else")


def not_an_engine_factory(ctx: EngineContext) -> object:
    return object()


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
    assert isinstance(engine, FakePaidEngine)
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
    assert isinstance(registry.get("fake-ep"), FakePaidEngine)


@pytest.mark.parametrize(("target", "reason"), [
    (f"{HERE}:raising_factory", "licence server unreachable"),
    (f"{HERE}:misnamed_factory", "registered as 'broken-ep'"),
    (f"{HERE}:not_an_engine_factory", "did not return an Engine"),
    ("tests.no_such_module:factory", "No module named"),
    (f"{HERE}:no_such_attribute", "no_such_attribute"),
])
def test_failing_factory_is_listed_as_broken(load: Load, target: str, reason: str) -> None:
    registry = load(extra=[ep("broken-ep", target), ep("fake-ep", f"{HERE}:fake_ep_factory")])
    assert "broken-ep" not in registry
    assert "broken-ep" in registry.names()
    broken = registry.broken["broken-ep"]
    assert broken.reason.startswith("could not be created:") and reason in broken.reason
    with pytest.raises(NotFound) as info:
        registry.get("broken-ep")
    assert reason in info.value.message
    # One broken plug-in does not take the others down.
    assert "fake-ep" in registry and "lite" in registry


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
    assert broken["available"] is False
    assert "licence server unreachable" in broken["note"]
    assert set(BUILTIN) <= set(listed)
