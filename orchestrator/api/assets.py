from __future__ import annotations

from fastapi import APIRouter, Response
from sqlmodel import Session, col, select

from orchestrator.api.deps import ServicesDep
from orchestrator.api.serialize import asset_public
from orchestrator.errors import NotFound
from orchestrator.models import Asset
from orchestrator.schemas import AssetPublic, Lineage

router = APIRouter(tags=["assets"])
MAX_DEPTH = 100


def _get(s: Session, asset_id: str) -> Asset:
    asset = s.get(Asset, asset_id)
    if asset is None:
        raise NotFound(f"asset '{asset_id}' not found", details={"asset_id": asset_id})
    return asset


@router.get("/assets/{asset_id}", response_model=AssetPublic)
def get_asset(asset_id: str, services: ServicesDep) -> AssetPublic:
    with services.db.session() as s:
        return asset_public(_get(s, asset_id))


@router.get("/assets/{asset_id}/content", responses={200: {"content": {"image/png": {}}}})
def get_content(asset_id: str, services: ServicesDep) -> Response:
    with services.db.session() as s:
        asset = _get(s, asset_id)
    data = services.store.get(asset.sha256)
    return Response(data, media_type="image/png",
                    headers={"ETag": f'"{asset.sha256}"', "Cache-Control": "private, max-age=31536000, immutable"})


@router.get("/assets/{asset_id}/lineage", response_model=Lineage)
def lineage(asset_id: str, services: ServicesDep) -> Lineage:
    """Ancestors root first (draft -> bridge -> ...), and every descendant, breadth first."""
    with services.db.session() as s:
        asset = _get(s, asset_id)
        ancestors: list[Asset] = []
        parent_id = asset.parent_id
        while parent_id and len(ancestors) < MAX_DEPTH:
            parent = s.get(Asset, parent_id)
            if parent is None:
                break
            ancestors.append(parent)
            parent_id = parent.parent_id
        descendants: list[Asset] = []
        frontier = [asset.id]
        while frontier and len(descendants) < 10 * MAX_DEPTH:
            children = list(s.exec(select(Asset).where(col(Asset.parent_id).in_(frontier))
                                   .order_by(col(Asset.id))).all())
            descendants.extend(children)
            frontier = [c.id for c in children]
    return Lineage(ancestors=[asset_public(a) for a in reversed(ancestors)],
                   descendants=[asset_public(a) for a in descendants])
