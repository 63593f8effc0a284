"""Spend reports for cost dashboards: charged credits grouped by day, engine, stage or project,
and what the local drafts saved against the cheapest configured cloud engine."""

from __future__ import annotations

import csv
import io
from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import case, distinct, exists, func, or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from orchestrator.errors import OrchestratorError
from orchestrator.ledger import charges
from orchestrator.models import Asset, Job, LedgerEntry, Project
from orchestrator.routing import priced
from orchestrator.schemas import GroupBy
from tiers.base import RenderRequest, to_credits
from tiers.registry import NO_ENGINE_KEY, TOTALS_KEY, EngineRegistry

NAMES_PER_QUERY = 500


def spend(s: Session, group_by: GroupBy, start: datetime | None, end: datetime | None,
          project_id: str | None) -> dict[str, Any]:
    """Summed by the database, not row by row here: a dashboard's month of a busy project is tens
    of thousands of entries (a history of 100,000 captures took 2.5 s by day, read into Python)."""
    where: list[Any] = [charges()]
    if start is not None:
        where.append(col(LedgerEntry.created_at) >= start)
    if end is not None:
        where.append(col(LedgerEntry.created_at) < end)
    if project_id:
        where.append(col(LedgerEntry.project_id) == project_id)
    key = _group_key(group_by, s.get_bind().dialect.name).label("key")
    amount = col(LedgerEntry.amount)
    # A job is counted by its capture: an adjustment made later is not another job.
    captured_job = case((col(LedgerEntry.kind) == "capture", col(LedgerEntry.job_id)))
    rows = s.exec(select(key, func.sum(amount), func.sum(case((col(LedgerEntry.unreconciled), amount), else_=0)),
                         func.count(distinct(captured_job)))
                  .where(*where).group_by(key)).all()
    waiting = dict(s.exec(select(key, func.count()).where(*where, col(LedgerEntry.unreconciled)).group_by(key)).all())
    # The images of those jobs, each job once per group. A job moved to another engine after the
    # first had (maybe) billed it is captured by both, maybe on two days: its images are counted
    # with the capture of the engine that made them only.
    captured = (*where, col(LedgerEntry.kind) == "capture", col(LedgerEntry.job_id).is_not(None))
    jobs = (select(key, col(LedgerEntry.job_id).label("job_id"), col(LedgerEntry.engine).label("engine"))
            .where(*captured).distinct().subquery())
    made = (col(Asset.job_id) == jobs.c.job_id) & or_(jobs.c.engine.is_(None), col(Asset.engine) == jobs.c.engine)
    images: Counter[Any] = Counter(dict(s.exec(select(jobs.c.key, func.count(col(Asset.id)))
                                               .join(Asset, made).group_by(jobs.c.key)).all()))
    # Where the engine that made them captured nothing (a free engine the job fell back to after a
    # paid one's unknown outcome was charged), with the job's latest capture, in the window of that
    # capture: they were counted in no group.
    other = aliased(LedgerEntry)
    captures_of_the_job = (col(other.kind) == "capture", col(other.job_id) == col(Asset.job_id))
    by_their_maker = exists().where(*captures_of_the_job, or_(col(other.engine).is_(None),
                                                              col(other.engine) == col(Asset.engine)))
    jobs_here = select(col(LedgerEntry.job_id)).where(*captured)
    latest = (select(func.max(col(other.id)).label("id"))
              .where(col(other.kind) == "capture", col(other.job_id).in_(jobs_here))
              .group_by(col(other.job_id)).subquery())
    images.update(dict(s.exec(select(key, func.count(col(Asset.id))).select_from(LedgerEntry)
                              .join(latest, latest.c.id == col(LedgerEntry.id))
                              .join(Asset, col(Asset.job_id) == col(LedgerEntry.job_id))
                              .where(*captured, ~by_their_maker).group_by(key)).all()))
    out: list[dict[str, Any]] = [
        {"key": str(k), "charged": to_credits(int(charged)), "unreconciled": to_credits(int(unreconciled)),
         "unreconciled_entries": int(waiting.get(k, 0)), "jobs": int(job_count), "images": int(images.get(k, 0))}
        for k, charged, unreconciled, job_count in sorted(rows, key=lambda row: str(row[0]))]
    if group_by == "project":  # a dashboard labels its rows by name, not by id
        ids = [g["key"] for g in out]
        names: dict[str, str] = {}
        for i in range(0, len(ids), NAMES_PER_QUERY):  # within the databases' bound parameters
            names.update(s.exec(select(col(Project.id), col(Project.name))
                                .where(col(Project.id).in_(ids[i:i + NAMES_PER_QUERY]))).all())
        for group in out:
            group["name"] = names.get(group["key"])
    total = sum(int(row[1]) for row in rows)
    return {"group_by": group_by, "from": start, "to": end, "groups": out, "total": to_credits(total)}


def _group_key(group_by: GroupBy, dialect: str) -> Any:
    if group_by == "day":  # the UTC calendar day, as every time in the API is UTC
        if dialect == "postgresql":
            return func.to_char(func.timezone("UTC", col(LedgerEntry.created_at)), "YYYY-MM-DD")
        return func.date(col(LedgerEntry.created_at))  # SQLite keeps the UTC time as text
    return {"engine": func.coalesce(col(LedgerEntry.engine), NO_ENGINE_KEY),
            "stage": func.coalesce(col(LedgerEntry.stage), "-"), "project": col(LedgerEntry.project_id)}[group_by]


def savings(s: Session, registry: EngineRegistry, start: datetime | None, end: datetime | None,
            project_id: str | None) -> dict[str, Any]:
    """What the local drafts of the period would have cost on the cheapest available cloud engine:
    drafts a local engine rendered, not a paid engine's (which cost what they cost) nor copies of
    an earlier result (which cost nothing either way)."""
    local = [engine.name for engine in registry if engine.kind == "local"]
    # The copies as the partial index `ix_jobs_cache_hits` says them (see `models.CACHE_HIT`), not every
    # job rendered, and the drafts read from their index alone. SQLite looks a NOT IN list up in a
    # temporary index; PostgreSQL hashes it only while the ids fit `work_mem` (about 200k copies),
    # and past that reread the list for every draft (a report that ran for minutes): an anti-join there.
    copy = select(Job.id).where(col(Job.cache_hit))
    not_a_copy = (~copy.where(col(Job.id) == col(Asset.job_id)).exists() if s.get_bind().dialect.name == "postgresql"
                  else col(Asset.job_id).not_in(copy))
    where: list[Any] = [col(Asset.stage) == "ideation", col(Asset.engine).in_(local), not_a_copy]
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
        # Compared with what would have made them the paid way: a bridge (a polish-only upscaler
        # may price a bridge all the same, at a figure that means nothing).
        if engine.kind != "remote" or "bridge" not in engine.stages or not engine.availability()[0]:
            continue
        try:
            cost = sum(priced(engine, RenderRequest(stage="bridge", prompt="draft", width=w, height=h)) * int(n)
                       for w, h, n in sizes)
        except OrchestratorError:  # an engine that cannot price a size does not count
            continue
        if cost > 0 and (best is None or cost < best[0]):
            best = (cost, engine.name)
    return {"drafts": drafts, "credits": to_credits(best[0]) if best else 0.0,
            "compared_with": best[1] if best else None}


# What a spreadsheet takes for the start of a formula in a cell it opens (quoting does not stop it).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _text_cell(text: str) -> str:
    """Text from users (a project's name; a plugin engine's) as a CSV cell a spreadsheet shows as
    text: a name like `=HYPERLINK(...)` ran as a formula on whoever opened the export. A lone `-`
    (a charge without an engine or stage, as the JSON says it) is no formula."""
    return f"'{text}" if text.startswith(_FORMULA_STARTS) and text != "-" else text


def _key_cell(key: str) -> str:
    """A group's key as a CSV cell: one reading `total` (in any case) is written `'total`, as a
    formula-like name is, so that only the totals row is keyed `total`. No engine may be named so
    (`tiers.registry`), but the ledger may name one a plugin registered, or one charged before
    that was refused."""
    return f"'{key}" if key.lower() == TOTALS_KEY else _text_cell(key)


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    # By project, the projects' names come last: a reader of the other columns by position still reads them.
    named = report["group_by"] == "project"
    writer.writerow(["key", "charged", "unreconciled", "jobs", "images"] + (["name"] if named else []))
    for g in report["groups"]:
        writer.writerow([_key_cell(str(g["key"])), f"{g['charged']:.3f}", f"{g['unreconciled']:.3f}", g["jobs"],
                         g["images"]] + ([_text_cell(g.get("name") or "")] if named else []))
    writer.writerow([TOTALS_KEY, f"{report['total']:.3f}", "", "", ""] + ([""] if named else []))
    return buf.getvalue()
