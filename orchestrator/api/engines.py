from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from orchestrator.api.deps import CallerDep, ServicesDep
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.schemas import EnginePublic
from orchestrator.store import hide_paths, model_name
from tiers._family import ModelDefaults

router = APIRouter(tags=["engines"], route_class=StrictJSONRoute)


@router.get("/engines", response_model=list[EnginePublic], summary="List engines")
def list_engines(services: ServicesDep, caller: CallerDep) -> list[EnginePublic]:
    """Every engine, available or not and why; a project key reads the notes with the server's
    file paths cut to their last part (a model, a workflow file), as it reads policy files."""
    out = []
    for engine in services.registry:
        available, why = engine.availability()
        note: Any = getattr(engine, "note", None)
        defaults = getattr(engine, "defaults", None)  # the local engines'
        out.append(EnginePublic(
            name=engine.name, kind=engine.kind, stages=sorted(engine.stages), available=available,
            health=services.health(engine.name), model=model_name(engine.model, engine.name), note=why or note,
            prices=engine.prices(), capabilities=engine.capabilities.as_dict(),
            model_defaults=defaults.public() if isinstance(defaults, ModelDefaults) else None,
        ))
    for broken in services.registry.broken.values():
        # `open` is a circuit that failures tripped: one that never loaded says so in `available` and `note`.
        out.append(EnginePublic(name=broken.name, kind="remote", stages=[], available=False,
                                health=services.health(broken.name),
                                model=None, note=broken.reason, prices={}, capabilities={}))
    if caller.project_id is not None:
        for listed in out:
            listed.note = listed.note and hide_paths(listed.note, listed.name)
    return out
