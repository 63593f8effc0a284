"""`orchestrator check` on the ledger: real settlements (partial, over the hold, reconciled) add up;
an entry edited, lost or added by hand is named. And on the projects' storage usage: a counter
changed by hand is named with its figures."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, text
from sqlalchemy.exc import DatabaseError
from sqlmodel import Session, col, select

from orchestrator import check
from orchestrator.cli import main
from orchestrator.db import Database
from orchestrator.ledger import Ledger
from orchestrator.models import LedgerEntry
from orchestrator.server import serve_in_thread
from orchestrator.settings import Settings
from tests.credits import ledger, make_draft, project_with_draft, promote_ok, wait_for_job


@pytest.fixture
def served(paid_settings_for: Callable[..., Settings], tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[httpx.Client, Path]]:
    """A service of its own (its database is edited by hand), and the CLI's environment on it."""
    settings = paid_settings_for(tmp_path / "data")
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        yield client, settings.data_dir / "orchestrator.db"


def paid_jobs(api: httpx.Client) -> tuple[str, dict[str, dict[str, dict[str, object]]]]:
    """One job of each way a hold is settled; returns the project and, per way, its entries by kind."""
    project_id, asset_id = project_with_draft(api, {"limit": 1000, "period": "month"})
    ways = {"partial": {"cost": "7.5"}, "over": {"cost": "12"}, "estimate": {}, "unknown": {"fake": "timeout"},
            "reconciled": {"fake": "timeout"}}
    jobs = {way: wait_for_job(api, promote_ok(api, asset_id, tags=tags)["id"]) for way, tags in ways.items()}
    capture = next(e for e in ledger(api, project_id)
                   if e["kind"] == "capture" and e["job_id"] == jobs["reconciled"]["id"])
    reconciled = api.post(f"/v1/projects/{project_id}/ledger/{capture['id']}/reconcile", json={"charged": 3})
    assert reconciled.status_code == 201, reconciled.text
    entries = ledger(api, project_id)
    by_way = {way: {e["kind"]: e for e in entries if e["job_id"] == job["id"]} for way, job in jobs.items()}
    return project_id, by_way


def run_check(capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["check"])
    return status, capsys.readouterr().out


def test_settlements_the_service_writes_add_up(served: tuple[httpx.Client, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    api, _db = served
    _project, by_way = paid_jobs(api)
    assert set(by_way["partial"]) == {"hold", "capture", "release"} and by_way["over"]["capture"]["over_hold"]
    assert set(by_way["reconciled"]) == {"hold", "capture", "adjustment"}
    status, out = run_check(capsys)
    assert status == 0, out
    count = sum(len(kinds) for kinds in by_way.values())
    assert f"ledger: {count} entries, 5 holds\n" in out
    assert "1 capture waits to be reconciled" in out  # the timeout not reconciled yet
    assert out.endswith("ok\n")


def test_entries_that_do_not_add_up_are_named(served: tuple[httpx.Client, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    api, db = served
    check_ledger_findings(api, f"sqlite:///{db}", capsys)


def check_ledger_findings(api: httpx.Client, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Edits a ledger the service wrote, by hand, the way each check should catch; `check` then runs
    on the database at `url` (the environment must point the CLI at it)."""
    project_id, by_way = paid_jobs(api)

    def entry(way: str, kind: str) -> int:
        return int(str(by_way[way][kind]["id"]))

    def job(way: str) -> str:
        return str(by_way[way]["hold"]["job_id"])

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE ledger_entries SET amount = amount + 1000 WHERE id = :id"),
                     {"id": entry("partial", "release")})
        conn.execute(text("UPDATE ledger_entries SET settled = :no WHERE id = :id"),
                     {"no": False, "id": entry("over", "hold")})
        conn.execute(text("DELETE FROM ledger_entries WHERE id = :id"), {"id": entry("estimate", "capture")})
        # Adjusted before its capture was marked reconciled; a release of nothing; an adjustment of
        # a capture (not a hold); two open holds for a finished job.
        added = []
        for kind, hold_id, job_id in (("adjustment", entry("unknown", "hold"), job("unknown")),
                                      ("release", None, job("unknown")),
                                      ("adjustment", entry("partial", "capture"), job("partial")),
                                      ("hold", None, job("over")), ("hold", None, job("over")),
                                      # charged twice by its engine: on its hold, and as metered work; a hold of no job
                                      ("capture", None, job("partial")), ("hold", None, None)):
            added.append(conn.execute(text(
                "INSERT INTO ledger_entries (project_id, job_id, kind, amount, hold_id, engine, unreconciled, "
                "settled, over_hold, created_at) VALUES (:project, :job, :kind, 1000, :hold, 'fake-paid', :no, :no, "
                ":no, CURRENT_TIMESTAMP) RETURNING id"), {"project": project_id, "job": job_id, "kind": kind,
                                                          "hold": hold_id, "no": False}).scalar_one())
    engine.dispose()

    status, out = run_check(capsys)
    assert status == 1, out
    lines = set(out.splitlines())
    # One of a kind is said in the singular ("1 holds ...: entries 7" once).
    assert f"1 {check.ONE[check.AMOUNTS]}: entry {entry('partial', 'hold')}" in lines
    assert (f"1 settled hold still marked open (settled by an older version; a running service's sweep marks "
            f"it): entry {entry('over', 'hold')}") in lines
    assert f"1 {check.ONE[check.SETTLED_WITHOUT_ENTRY]}: entry {entry('estimate', 'hold')}" in lines
    assert f"1 {check.ONE[check.SECOND_OPEN_HOLD]}: entry {added[4]}" in lines
    assert f"1 {check.ONE[check.LOOSE_RELEASE]}: entry {added[1]}" in lines
    assert f"1 {check.ONE[check.STRAY]}: entry {added[2]}" in lines
    assert f"2 {check.EARLY_ADJUSTMENT}: entries {added[0]}, {added[2]}" in lines
    assert f"1 {check.ONE[check.SECOND_CHARGE]}: entry {added[5]}" in lines
    assert f"1 {check.ONE[check.JOBLESS_HOLD]}: entry {added[6]}" in lines
    # The open holds of the finished "over" job: informational, the service's sweep settles them.
    assert (f"2 open holds of finished jobs (a running service's sweep settles them): "
            f"entries {added[3]}, {added[4]}") in lines
    assert "PROBLEMS: the ledger entries above do not add up" in out


def test_storage_usage_changed_by_hand_is_named(served: tuple[httpx.Client, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    api, db = served
    check_storage_findings(api, f"sqlite:///{db}", capsys)


def check_storage_findings(api: httpx.Client, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Projects whose usage the service kept add up, a deleted asset left out; then one counter is
    raised by hand, one zeroed, and one project's asset is made one stored before sizes were kept
    (its size taken out of the counter, as it was never added): the first two are named with their
    figures, the third's asset only counted. `check` runs on the database at `url`."""
    projects = [project_with_draft(api)[0] for _ in range(3)]
    gone = make_draft(api, projects[0])
    assert api.delete(f"/v1/assets/{gone}").status_code == 204
    status, out = run_check(capsys)
    assert status == 0, out
    assert "storage usage: 3 projects\n" in out and "not measured" not in out and out.endswith("ok\n"), out

    raised, unmeasured, zeroed = projects
    engine = create_engine(url)
    with engine.begin() as conn:
        summed = {project_id: int(amount) for project_id, amount in conn.execute(text(
            "SELECT project_id, SUM(bytes) FROM assets WHERE deleted_at IS NULL GROUP BY project_id"))}
        assert all(summed[project_id] > 0 for project_id in projects), summed
        conn.execute(text("UPDATE projects SET storage_bytes = storage_bytes + 1000 WHERE id = :id"), {"id": raised})
        conn.execute(text("UPDATE projects SET storage_bytes = 0 WHERE id = :id"), {"id": zeroed})
        conn.execute(text("UPDATE assets SET bytes = NULL WHERE project_id = :id"), {"id": unmeasured})
        conn.execute(text("UPDATE projects SET storage_bytes = 0 WHERE id = :id"), {"id": unmeasured})
    engine.dispose()

    status, out = run_check(capsys)
    assert status == 1, out
    lines = out.splitlines()
    assert (f"project {raised}: {summed[raised] + 1000} bytes recorded, its live assets hold {summed[raised]} "
            "(difference +1000)") in lines
    assert (f"project {zeroed}: 0 bytes recorded, its live assets hold {summed[zeroed]} "
            f"(difference -{summed[zeroed]})") in lines
    assert unmeasured not in out  # counted as 0, as the service counts it: its usage adds up
    assert ("1 live asset not measured yet (stored before sizes were kept, counted as 0): the service's asset "
            "sweep measures it at its next start") in lines
    assert "recorded size" not in out  # a row not measured has no size to differ from its file's
    assert "PROBLEMS: the projects above record a storage usage that is not what their live assets hold" in out


def test_a_capture_and_a_release_whose_hold_is_gone_are_named(served: tuple[httpx.Client, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # The sqlite3 shell has foreign keys off: a hold deleted by hand left its capture and release
    # naming nothing, and `check` said the ledger was fine.
    api, db = served
    _project_id, by_way = paid_jobs(api)
    partial = by_way["partial"]
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM ledger_entries WHERE id = ?", (int(str(partial["hold"]["id"])),))
    status, out = run_check(capsys)
    assert status == 1, out
    assert f"2 {check.STRAY}: entries {partial['capture']['id']}, {partial['release']['id']}" in out.splitlines()


def test_the_sweep_mends_a_hold_settled_without_its_flag(served: tuple[httpx.Client, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # A process of a version before the `settled` flag, still running through an upgrade, writes
    # the capture alone: the hold counted as held for good, and the sweep failed on it each time
    # (settling it again broke the unique constraint), leaving every other hold unswept.
    api, db = served
    project_id, by_way = paid_jobs(api)
    hold = by_way["partial"]["hold"]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE ledger_entries SET settled = 0 WHERE id = ?", (int(str(hold["id"])),))
    assert api.get(f"/v1/projects/{project_id}/budget").json()["held"] == hold["amount"]
    status, out = run_check(capsys)
    assert status == 0 and "1 settled hold still marked open" in out  # told, and mended by the sweep

    database = Database(f"sqlite:///{db}")
    with database.transaction() as s:
        assert Ledger().sweep(s) == 0  # nothing to settle: only the flag to mend
    database.engine.dispose()
    assert api.get(f"/v1/projects/{project_id}/budget").json()["held"] == 0
    status, out = run_check(capsys)
    assert status == 0, out


def test_the_check_reads_the_ledger_as_of_one_moment(served: tuple[httpx.Client, Path]) -> None:
    # Beside a running service: a capture committed between two of the check's reads made a hold
    # look open in one and settled in the next ("holds still open with a capture"), exit 1.
    api, db = served
    project_id, _ = paid_jobs(api)
    engine = check.read_only_engine(f"sqlite:///{db}")
    try:
        with Session(engine) as s, s.begin():
            before = s.exec(select(func.count()).select_from(LedgerEntry)).one()
            with sqlite3.connect(db) as conn:  # the service writes meanwhile
                conn.execute("INSERT INTO ledger_entries (project_id, kind, amount, unreconciled, settled, over_hold, "
                             "created_at) VALUES (?, 'grant', 1000, 0, 0, 0, CURRENT_TIMESTAMP)", (project_id,))
            assert s.exec(select(func.count()).select_from(LedgerEntry)).one() == before
    finally:
        engine.dispose()


@pytest.mark.parametrize("meanwhile", ["nothing", "a service opened it", "a migration wrote it", "a torn read"])
def test_the_check_of_a_database_nothing_writes_leaves_no_file_beside_it(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], meanwhile: str) -> None:
    """Read with `mode=ro` alone, a WAL database made the -wal and -shm files a read-only
    connection cannot remove: left owned by whoever ran the check, they kept the service from
    writing; on a read-only mount they cannot be made at all. It is read as immutable, and read
    again as a live one should anything write it meanwhile."""
    settings = paid_settings_for(tmp_path / "data")
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        paid_jobs(client)
    db = settings.data_dir / "orchestrator.db"
    beside = [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm")]
    assert not any(path.exists() for path in beside)  # the service's last connection removed them
    opened: list[str] = []
    connect = sqlite3.connect
    service: list[sqlite3.Connection] = []

    def recorded(database: str, **options: Any) -> sqlite3.Connection:
        opened.append(database)
        if meanwhile in ("a service opened it", "a migration wrote it") and not service:  # as the check reads
            service.append(connect(db))
            service[0].execute("PRAGMA journal_mode=WAL")
            service[0].execute("UPDATE alembic_version SET version_num = version_num")
            service[0].commit()
            if meanwhile == "a migration wrote it":
                service[0].close()  # its -wal goes with its last connection
        return connect(database, **options)

    monkeypatch.setattr(sqlite3, "connect", recorded)
    passes: list[bool] = []  # each read of the database: as immutable?
    read_only_engine = check.read_only_engine

    def counted(url: str, *, immutable: bool = False) -> Any:
        passes.append(immutable)
        return read_only_engine(url, immutable=immutable)

    monkeypatch.setattr(check, "read_only_engine", counted)
    if meanwhile == "a torn read":
        check_ledger = check.check_ledger
        torn: list[bool] = []

        def torn_once(engine: Any) -> check.LedgerReport:
            if not torn:
                torn.append(True)
                raise DatabaseError("SELECT", {}, sqlite3.DatabaseError("database disk image is malformed"))
            return check_ledger(engine)

        monkeypatch.setattr(check, "check_ledger", torn_once)
    try:
        status, out = run_check(capsys)
        assert status == 0 and out.endswith("ok\n"), out
        assert passes == {"nothing": [True], "a service opened it": [True, False]}.get(meanwhile, [True, True])
        uris = [uri for uri in opened if uri.startswith("file:")]
        assert uris and uris[0].endswith("?mode=ro&immutable=1"), uris  # what SQLite is told
        assert any(path.exists() for path in beside) is (meanwhile == "a service opened it")  # its own
    finally:
        for conn in service:
            conn.close()


def test_the_check_of_a_damaged_database_says_so_and_leaves_no_file_beside_it(
        paid_settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Read again live after two failed immutable reads, SQLite left its -wal and -shm files there.
    settings = paid_settings_for(tmp_path / "data")
    monkeypatch.setenv("ORCH_DATA_DIR", str(settings.data_dir))
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        paid_jobs(client)
    db = settings.data_dir / "orchestrator.db"
    with db.open("r+b") as file:  # the page after the schema's
        file.seek(4096)
        file.write(b"\xff" * 4096)
    assert main(["check"]) == 2
    assert "malformed" in capsys.readouterr().err
    assert not any(db.with_name(db.name + suffix).exists() for suffix in ("-wal", "-shm"))


def test_a_job_charged_by_each_engine_it_moved_between_is_not_charged_twice(sqlite_db: Database) -> None:
    """A queued job whose earlier attempt a provider accepted, moved off that engine because no
    process has it any more (`Scheduler._move_unserved`): its hold there is captured, the work
    being billed whatever became of it, and a free engine it moved to that reported a cost (or
    metered local work) captures that without a hold. Each engine's bill once; the check called it
    the job charged twice."""
    from orchestrator.errors import EngineUnavailable
    from orchestrator.models import Job, Project

    ledger = Ledger()
    with sqlite_db.transaction() as s:
        project = Project(id="prj_moved", name="moved", policy="balanced")
        s.add(project)
        s.flush()
        job = Job(id="job_moved", project_id=project.id, stage="bridge", engine="engine-paid", status="running",
                  estimated=10_000, attempt=2, provider_work={"engine": "engine-paid", "handles": [{"id": "p-1"}]})
        s.add(job)
        s.flush()
        ledger.hold(s, project, job, 10_000)
    with sqlite_db.transaction() as s:  # as `JobRunner._requeue_on` moves it
        ledger.settle_failure(s, job, EngineUnavailable("engine 'engine-paid' is not installed", charged="no"))
        moved = s.get(Job, job.id)
        assert moved is not None
        moved.engine, moved.estimated, moved.provider_work = "engine-free", 0, None
        s.add(moved)
        assert ledger.hold(s, project, moved, 0) is None  # free, not billed by a provider
    with sqlite_db.transaction() as s:  # as `JobRunner._succeed_in` charges what the free engine reported
        ledger.charge_made(s, moved, 3_000)
    with Session(sqlite_db.engine) as s:
        charged = [(e.engine, e.amount, e.hold_id is None) for e in s.exec(
            select(LedgerEntry).where(LedgerEntry.kind == "capture").order_by(col(LedgerEntry.id))).all()]
    assert charged == [("engine-paid", 10_000, False), ("engine-free", 3_000, True)]
    report = check.check_ledger(sqlite_db.engine)
    assert report.ok, report.problems


@pytest.mark.parametrize("hand_made", ["engine-paid", None], ids=["same engine", "no engine"])
def test_a_capture_made_by_hand_without_a_hold_of_a_job_charged_on_its_hold_is_a_second_charge(
        sqlite_db: Database, hand_made: str | None) -> None:
    """Only a capture on another engine than the hold's may be that engine's own bill (a job moved
    off it): one naming no engine (typed in by hand, as the service never writes one) says no such
    thing, and was no longer listed, where before the check of moved jobs it was."""
    from orchestrator.models import Job, Project

    ledger = Ledger()
    with sqlite_db.transaction() as s:
        project = Project(id="prj_twice", name="twice", policy="balanced")
        s.add(project)
        s.flush()
        job = Job(id="job_twice", project_id=project.id, stage="bridge", engine="engine-paid", status="running",
                  estimated=10_000)
        s.add(job)
        s.flush()
        ledger.hold(s, project, job, 10_000)
    with sqlite_db.transaction() as s:
        ledger.charge_made(s, job, None)
        s.add(LedgerEntry(project_id=project.id, job_id=job.id, kind="capture", amount=10_000, engine=hand_made,
                          stage="bridge", note="charged by hand"))
    with Session(sqlite_db.engine) as s:
        second = s.exec(select(LedgerEntry.id).where(LedgerEntry.kind == "capture",
                                                     col(LedgerEntry.hold_id).is_(None))).one()
    assert check.check_ledger(sqlite_db.engine).problems == {check.SECOND_CHARGE: [str(second)]}


def test_a_job_that_starts_as_the_store_is_listed_has_its_young_files_counted_in_flight(
        sqlite_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check read once, before listing the store, whether a job runs. A job claimed between
    that read and the listing, its images stored before the transaction naming them commits, had
    them counted as files no asset names and listed to move out of the store (which lost the job's
    images once its rows named them)."""
    from orchestrator.models import Asset, Job, Project
    from orchestrator.store import ArtifactStore

    store = ArtifactStore(tmp_path / "assets")
    with sqlite_db.transaction() as s:
        s.add(Project(id="prj_mid", name="mid", policy="balanced"))
        s.flush()
        s.add(Job(id="job_done", project_id="prj_mid", stage="ideation", engine="lite", status="succeeded"))
        s.add(Job(id="job_mid", project_id="prj_mid", stage="ideation", engine="lite", status="queued"))
        s.flush()
        s.add(Asset(id="ast_done", project_id="prj_mid", job_id="job_done", stage="ideation", engine="lite",
                    model="m", prompt="p", width=64, height=64, sha256=store.put(b"an earlier image")))
    listing = Path.glob

    def claimed_as_listed(self: Path, pattern: str, *args: Any, **kwargs: Any) -> Any:
        if self == store.root and pattern == "*/*.png":
            with sqlite_db.transaction() as s:  # as a worker claims the job, then stores its images
                s.execute(text("UPDATE jobs SET status = 'running' WHERE id = 'job_mid'"))
            store.put(b"the running job's first image")
            store.put(b"the running job's second image")
        return listing(self, pattern, *args, **kwargs)

    monkeypatch.setattr(Path, "glob", claimed_as_listed)
    report = check.check_store(check.read_only_engine(str(sqlite_db.engine.url)), store)
    assert (report.files, report.unnamed, report.in_flight, report.unnamed_paths) == (3, 0, 2, [])


def test_the_files_a_dead_paid_job_stored_for_its_recovery_are_not_listed_to_move_out(
        sqlite_db: Database, tmp_path: Path) -> None:
    """A process killed between a paid job's files and their rows leaves them on the job's row for
    its recovery to adopt (`orchestrator.adopt`): listed among the files no asset names, the check
    told the operator to move out of the store images that were paid for and about to be kept."""
    import os
    import time

    from orchestrator.adopt import stored_images
    from orchestrator.models import Asset, Job, Project
    from orchestrator.store import ArtifactStore

    store = ArtifactStore(tmp_path / "assets")
    named, adoptable, orphan = (store.put(data) for data in (b"a named image", b"a paid image", b"an orphan"))
    hours_ago = time.time() - 2 * 3600
    for sha in (named, adoptable, orphan):
        os.utime(store.path_for(sha), (hours_ago, hours_ago))  # past the sweep's grace: a crash's leftovers
    with sqlite_db.transaction() as s:
        s.add(Project(id="prj_dead", name="dead", policy="balanced"))
        s.flush()
        s.add(Job(id="job_done", project_id="prj_dead", stage="ideation", engine="lite", status="succeeded"))
        s.add(Job(id="job_dead", project_id="prj_dead", stage="bridge", engine="fake-paid", status="running",
                  attempt=1, stored_images=stored_images(
                      1, model="fake-1", cost=None, cost_unread=None, provider_request_id=None, cache_key=None,
                      images=[{"sha256": adoptable, "bytes": 12, "seed": 1, "width": 8, "height": 8,
                               "record": {"prompt": "p"}}])))
        s.flush()
        s.add(Asset(id="ast_done", project_id="prj_dead", job_id="job_done", stage="ideation", engine="lite",
                    model="m", prompt="p", width=64, height=64, sha256=named))
    report = check.check_store(check.read_only_engine(str(sqlite_db.engine.url)), store)
    assert (report.files, report.unnamed, report.unnamed_paths) == (3, 1, [str(store.path_for(orphan))])
