"""`GET /v1/assets/{id}/lineage` on long chains and wide trees: bounded, and it says so."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from sqlalchemy import event

from orchestrator.db import Database
from orchestrator.models import Asset, Job, Project
from orchestrator.settings import Settings


def add_assets(settings: Settings, parents: list[str | None], ids: list[str], project: str = "prj_tree") -> None:
    db = Database(settings.resolved_database_url)
    job_id = project.replace("prj_", "job_")
    try:
        with db.transaction() as s:
            if s.get(Project, project) is None:
                s.add(Project(id=project, name="tree", policy="balanced"))
                s.flush()
                s.add(Job(id=job_id, project_id=project, stage="ideation", engine="lite", status="succeeded"))
                s.flush()
            for asset_id, parent in zip(ids, parents, strict=True):
                s.add(Asset(id=asset_id, project_id=project, job_id=job_id, index=0, stage="bridge",
                            parent_id=parent, engine="lite", model="m", prompt="p", seed=1, width=64, height=64,
                            sha256="0" * 64))
                s.flush()  # a child's row after its parent's (foreign key)
    finally:
        db.dispose()


def test_a_lineage_cut_at_its_bounds_says_it_is_truncated(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    settings = make_settings()
    client = start_server(settings)
    chain = [f"ast_{i:026d}" for i in range(102)]  # 101 ancestors above the last
    add_assets(settings, [None, *chain[:-1]], chain)
    leaf = client.get(f"/v1/assets/{chain[-1]}/lineage").json()
    assert len(leaf["ancestors"]) == 100 and leaf["truncated"] is True
    assert leaf["ancestors"][-1]["id"] == chain[-2]  # the nearest ones are kept
    whole = client.get(f"/v1/assets/{chain[-2]}/lineage").json()  # exactly 100 above it: complete
    assert len(whole["ancestors"]) == 100 and whole["truncated"] is False

    children = [f"ast_{i:026d}" for i in range(1000, 2001)]  # 1001 children of the root
    add_assets(settings, [chain[0]] * len(children), children)
    root = client.get(f"/v1/assets/{chain[0]}/lineage").json()
    assert len(root["descendants"]) == 1000 and root["truncated"] is True
    assert client.get(f"/v1/assets/{chain[-1]}/lineage").json()["descendants"] == []


def test_a_wide_tree_is_not_read_past_the_bound(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    """Each level's children are read up to what the answer can hold: a draft promoted thousands
    of times (cache hits are free and instant) cost a lineage request every row of them."""
    settings = make_settings()
    client = start_server(settings)
    add_assets(settings, [None], ["ast_root"])
    children = [f"ast_{i:026d}" for i in range(3000)]
    add_assets(settings, ["ast_root"] * len(children), children)
    loaded: list[str] = []

    def count(target: Asset, _context: object) -> None:
        loaded.append(target.id)

    event.listen(Asset, "load", count)
    try:
        root = client.get("/v1/assets/ast_root/lineage").json()
    finally:
        event.remove(Asset, "load", count)
    assert len(root["descendants"]) == 1000 and root["truncated"] is True
    assert root["descendants"][-1]["id"] == children[999]
    assert len(loaded) <= 1002  # the asset, its children up to the bound, and one to know it is cut


def test_a_lineage_stays_in_its_asset_s_project(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    """Promotions and polishes stay in their source's project, so a chain never crosses projects;
    one written by hand across two (a restore, a merge of databases) does not show the other
    project's prompts and images to whoever reads this one's."""
    settings = make_settings()
    client = start_server(settings)
    mine, theirs = "ast_" + "1" * 26, "ast_" + "2" * 26
    add_assets(settings, [None], [mine])
    add_assets(settings, [mine], [theirs], project="prj_other")  # another project's asset, said to come from mine
    add_assets(settings, [theirs], ["ast_" + "3" * 26], project="prj_tree")  # and one of mine from theirs
    seen = client.get(f"/v1/assets/{mine}/lineage").json()
    assert seen["descendants"] == [] and seen["ancestors"] == []
    leaf = client.get(f"/v1/assets/{'ast_' + '3' * 26}/lineage").json()
    assert leaf["ancestors"] == [] and leaf["truncated"] is False
    between = client.get(f"/v1/assets/{theirs}/lineage").json()
    assert between["ancestors"] == [] and between["descendants"] == []
