"""Spend reports for cost dashboards: charged credits grouped by day, engine, stage or project,
and what the local drafts saved against the cheapest configured cloud engine."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func
from sqlmodel import Session, col, select

from orchestrator.errors import OrchestratorError
from orchestrator.ledger import charges
from orchestrator.models import Asset, LedgerEntry
from tiers.base import RenderRequest, to_credits
from tiers.registry import EngineRegistry

GroupBy = Literal["day", "engine", "stage", "project"]


def spend(s: Session, group_by: GroupBy, start: datetime | None, end: datetime | None,
          project_id: str | None) -> dict[str, Any]:
    where: list[Any] = [charges()]
    if start is not None:
        where.append(col(LedgerEntry.created_at) >= start)
    if end is not None:
        where.append(col(LedgerEntry.created_at) < end)
    if project_id:
        where.append(col(LedgerEntry.project_id) == project_id)
    rows = s.exec(select(LedgerEntry).where(*where).order_by(col(LedgerEntry.id))).all()
    groups: dict[str, dict[str, Any]] = {}
    jobs_seen: dict[str, set[str]] = {}
    for entry in rows:
        key = {
            "day": entry.created_at.date().isoformat(),
            "engine": entry.engine or "-",
            "stage": entry.stage or "-",
            "project": entry.project_id,
        }[group_by]
        group = groups.setdefault(key, {"key": key, "charged": 0, "unreconciled": 0})
        group["charged"] += entry.amount
        if entry.unreconciled:
            group["unreconciled"] += entry.amount
        if entry.job_id and entry.kind == "capture":  # an adjustment made later is not another job
            jobs_seen.setdefault(key, set()).add(entry.job_id)
    images = _images_per_job(s, {j for js in jobs_seen.values() for j in js})
    out = []
    for key in sorted(groups):
        group = groups[key]
        job_ids = jobs_seen.get(key, set())
        out.append({"key": key, "charged": to_credits(group["charged"]),
                    "unreconciled": to_credits(group["unreconciled"]), "jobs": len(job_ids),
                    "images": sum(images.get(j, 0) for j in job_ids)})
    total = sum(g["charged"] for g in groups.values())
    return {"group_by": group_by, "from": start, "to": end, "groups": out, "total": to_credits(total)}


# Job ids per query: one bind parameter each, and PostgreSQL takes at most 65535 (SQLite builds
# as few as 32766): a report over a busy install's history must not hit either.
ID_BATCH = 10_000


def _images_per_job(s: Session, job_ids: set[str]) -> dict[str, int]:
    ids = sorted(job_ids)
    counts: dict[str, int] = {}
    for start in range(0, len(ids), ID_BATCH):
        rows = s.exec(select(Asset.job_id, func.count()).where(col(Asset.job_id).in_(ids[start:start + ID_BATCH]))
                      .group_by(col(Asset.job_id))).all()
        counts.update((job_id, int(n)) for job_id, n in rows)
    return counts


def savings(s: Session, registry: EngineRegistry, start: datetime | None, end: datetime | None,
            project_id: str | None) -> dict[str, Any]:
    """What the local drafts of the period would have cost on the cheapest available cloud engine."""
    where: list[Any] = [col(Asset.stage) == "ideation"]
    if start is not None:
        where.append(col(Asset.created_at) >= start)
    if end is not None:
        where.append(col(Asset.created_at) < end)
    if project_id:
        where.append(col(Asset.project_id) == project_id)
    sizes = s.exec(select(Asset.width, Asset.height, func.count()).where(*where)
                   .group_by(col(Asset.width), col(Asset.height))).all()
    drafts = sum(int(n) for _, _, n in sizes)
    best: tuple[int, str] | None = None
    for engine in registry:
        if engine.kind != "remote" or not engine.availability()[0]:
            continue
        try:
            cost = sum(engine.estimate(RenderRequest(stage="bridge", prompt="draft", width=w, height=h)) * int(n)
                       for w, h, n in sizes)
        except OrchestratorError:  # an engine that cannot price a size does not count
            continue
        if cost > 0 and (best is None or cost < best[0]):
            best = (cost, engine.name)
    return {"drafts": drafts, "credits": to_credits(best[0]) if best else 0.0,
            "compared_with": best[1] if best else None}


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", "charged", "unreconciled", "jobs", "images"])
    for g in report["groups"]:
        writer.writerow([g["key"], f"{g['charged']:.3f}", f"{g['unreconciled']:.3f}", g["jobs"], g["images"]])
    writer.writerow(["total", f"{report['total']:.3f}", "", "", ""])
    return buf.getvalue()
