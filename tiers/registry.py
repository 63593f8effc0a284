"""Which engines exist. Built-ins are listed here; third-party engines register a factory
`(EngineContext) -> Engine` in the entry-point group `orchestrator.engines`:

    [project.entry-points."orchestrator.engines"]
    my-engine = "my_package.engine:factory"
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from orchestrator.errors import NotFound
from tiers.base import MAX_ENGINE_CHARS, Engine, EngineContext, EngineFactory
from tiers.guard import FAULTS, checked, conforms

log = logging.getLogger(__name__)
GROUP = "orchestrator.engines"

# Keys of the spend report (`orchestrator.spend`), which no engine may be named: the CSV's totals
# row's (a group keyed so would be read as it), and the key of charges that name no engine (an
# engine so named would be summed into their group, in the JSON as in the CSV).
TOTALS_KEY = "total"
NO_ENGINE_KEY = "-"

BUILTIN: dict[str, str] = {
    "lite": "tiers.lite:factory",
    "local-hifi": "tiers.local_hifi:factory",
    "gemini": "tiers.gemini:factory",
    "openai": "tiers.openai_images:factory",
    "stability": "tiers.stability:factory",
    "replicate": "tiers.replicate:factory",
    "fal": "tiers.fal:factory",
    "comfyui": "tiers.comfyui:factory",
    "a1111": "tiers.a1111:factory",
}

# Built-ins whose prices come from no prices file: the local engines' from
# ORCH_LOCAL_GPU_SECOND_CREDITS, and the self-hosted servers bill nobody.
PRICELESS = frozenset({"lite", "local-hifi", "comfyui", "a1111"})
# The hosted providers' engines: their models are the providers' ids (`fal-ai/nano-banana-2/edit`), never files.
HOSTED = frozenset(BUILTIN) - PRICELESS


def known_names(extra_engines: Iterable[str] = ()) -> set[str]:
    """Every engine name a registry may hold: the built-ins, the installed plugins' and
    ORCH_ENGINES' (without importing any of them)."""
    return {*BUILTIN, *(ep.name for ep in entry_points(group=GROUP)), *extra_engines}


def _import(target: str) -> EngineFactory:
    # An entry point's object may be dotted (`module:Class.factory`), as importlib.metadata reads it.
    module, _, attr = target.partition(":")
    found: Any = importlib.import_module(module)
    for part in attr.split("."):
        found = getattr(found, part)
    factory: EngineFactory = found
    return factory


def _source(ep: EntryPoint) -> str:
    """The package that registers `ep`, as pip names it (an entry point made by hand has none)."""
    dist = getattr(ep, "dist", None)
    return f"package {dist.name} ({ep.value})" if dist is not None else ep.value


def spend_key_problem(name: str) -> str | None:
    """Why an engine may not be called `name`, a key of the spend report (`GET /v1/spend`) its
    charges would be read as; None where it may. Without a path: a broken engine's reason, which
    clients read, has its paths cut (`hide_paths`)."""
    if name.lower() == TOTALS_KEY:
        return "is the key of the spend export's totals row"
    if name == NO_ENGINE_KEY:
        return "is the spend report's key for charges that name no engine"
    return None


def extra_engine_problems(entries: str) -> list[str]:
    """What is wrong with ORCH_ENGINES' entries (`name=module:factory,...`): a name given twice, or
    taken by a built-in engine (the entry was ignored with a warning) or by a plugin installed here
    (which of the two the name meant is a guess). A module not installed here is not one: hosts
    may share the setting and differ in their engines."""
    problems: list[str] = []
    seen: set[str] = set()
    installed = {ep.name: ep for ep in entry_points(group=GROUP)}
    for item in (item.strip() for item in entries.split(",") if item.strip()):
        name = item.partition("=")[0].strip()
        if len(name) > MAX_ENGINE_CHARS:
            problems.append(f"'{name[:40]}...' is longer than {MAX_ENGINE_CHARS} characters, which jobs store")
        elif name in BUILTIN:
            problems.append(f"'{name}' is a built-in engine's name: give the engine another")
        elif (reserved := spend_key_problem(name)) is not None:
            problems.append(f"'{name}' {reserved}: give the engine another name")
        elif name in installed:
            problems.append(f"'{name}' is the name of an installed plugin's engine ({_source(installed[name])}): "
                            "give the engine another, or uninstall the plugin")
        elif name in seen:
            problems.append(f"'{name}' is given twice")
        seen.add(name)
    return problems


def left_off(engine: Engine) -> bool:
    """A remote engine this process cannot send to (`reachable` False: no usable key, no server's
    URL): listed, unavailable, and no job of it runs here, nor is its accepted work followed or
    withdrawn from here. A plug-in that does not say is not judged."""
    if engine.kind != "remote":
        return False
    try:
        return getattr(engine, "reachable", None) is False
    except Exception:  # a plug-in's property that raises
        return False


@dataclass
class BrokenEngine:
    """An engine whose factory failed: listed, never routable, with the reason clients may read
    (the server's paths cut to their last part; the log has the whole error)."""

    name: str
    reason: str

    def __post_init__(self) -> None:
        # Imported here: orchestrator.store names hosted models by this module's HOSTED.
        from orchestrator.store import hide_paths

        self.reason = hide_paths(self.reason, self.name)


class EngineRegistry:
    def __init__(self, engines: dict[str, Engine], broken: dict[str, BrokenEngine] | None = None) -> None:
        self._engines = engines
        self.broken = broken or {}

    @classmethod
    def load(cls, ctx: EngineContext, extra: Iterable[EntryPoint] | None = None) -> EngineRegistry:
        factories: dict[str, EngineFactory | str] = dict(BUILTIN)
        plugins: dict[str, dict[tuple[str, str], EntryPoint]] = {}
        for ep in extra if extra is not None else entry_points(group=GROUP):
            if ep.name in BUILTIN:
                log.warning("engine entry point %r ignored: the name is taken by a built-in engine", ep.name)
                continue
            plugins.setdefault(ep.name, {})[_source(ep), ep.value] = ep
        broken: dict[str, BrokenEngine] = {}
        for name, registered in plugins.items():
            if (reserved := spend_key_problem(name)) is not None:  # as ORCH_ENGINES refuses it at start
                log.error("engine %s: %s; it is not loaded", name, reserved)
                broken[name] = BrokenEngine(name, f"{reserved}; it is not loaded")
                continue
            if len(registered) == 1:
                factories[name] = next(iter(registered.values())).value
                continue
            # Which one won was the order importlib.metadata lists packages in: jobs meant for one
            # engine would have run on another, and its prices charged.
            sources = " and ".join(sorted(source for source, _ in registered))
            each, none = ("both", "neither") if len(registered) == 2 else ("all", "none")
            log.error("engine %s: %s %s register it; %s is loaded (uninstall all but one)", name, sources, each, none)
            broken[name] = BrokenEngine(name, f"{sources} {each} register this name: {none} is loaded; "
                                              "uninstall all but one")
        for name, spec in ctx.settings.extra_engines.items():
            if name in BUILTIN or name in plugins:  # refused at start (`extra_engine_problems`)
                log.warning("ORCH_ENGINES entry %r ignored: the name is taken by a %s engine", name,
                            "built-in" if name in BUILTIN else "plugin's")
                continue
            factories[name] = spec
        engines: dict[str, Engine] = {}
        for name, target in factories.items():
            if len(name) > MAX_ENGINE_CHARS:  # jobs and the ledger store it
                log.error("engine %s...: its name is longer than %d characters; it is not loaded", name[:40],
                          MAX_ENGINE_CHARS)
                continue
            try:
                factory = _import(target) if isinstance(target, str) else target
            except (ImportError, AttributeError) as exc:  # not installed on this host: said in a line
                log.warning("engine %s is not installed here (%s: %s): it is listed as unavailable", name,
                            type(exc).__name__, exc)
                broken[name] = BrokenEngine(name, f"not installed in this process: {exc}")
                continue
            except FAULTS as exc:  # its module fails as it is imported (a bug, a syntax error, a sys.exit())
                log.exception("engine %s could not be imported", name)
                broken[name] = BrokenEngine(name, f"could not be imported: {type(exc).__name__}: {exc}")
                continue
            try:
                engine = factory(ctx)
                if not conforms(engine, Engine):
                    raise TypeError(f"{target} did not return an Engine")
                if engine.name != name:
                    raise ValueError(f"factory {target} built engine {engine.name!r}, registered as {name!r}")
                if name not in BUILTIN:
                    engine = checked(engine, str(target))
            except FAULTS as exc:
                log.exception("engine %s could not be created", name)
                # A bare sys.exit(2) or an empty message tells nothing without its type.
                why = str(exc) if isinstance(exc, Exception) and str(exc) else f"{type(exc).__name__}: {exc}"
                broken[name] = BrokenEngine(name, f"could not be created: {why}")
                continue
            engines[name] = engine
        return cls(engines, broken)

    def __iter__(self) -> Iterator[Engine]:
        return iter(self._engines.values())

    def __contains__(self, name: object) -> bool:
        return name in self._engines

    def names(self) -> list[str]:
        return [*self._engines, *self.broken]

    def get(self, name: str) -> Engine:
        try:
            return self._engines[name]
        except KeyError:
            reason = self.broken[name].reason if name in self.broken else "no such engine"
            raise NotFound(f"engine '{name}': {reason}", details={"engine": name}) from None

    async def aclose(self) -> None:
        for engine in self._engines.values():
            try:
                await engine.aclose()
            except Exception:  # closing must not stop the others from closing
                log.exception("closing engine %s failed", engine.name)
