"""The ledger's concurrency guarantees on PostgreSQL (row lock `FOR UPDATE` instead of SQLite's
`BEGIN IMMEDIATE`), on a database made for this test and dropped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import URL, event, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import ORMExecuteState
from sqlmodel import Session, col, select

from orchestrator import idempotency, webhooks
from orchestrator.bells import CHANNEL, PostgresBell
from orchestrator.clock import shared_now
from orchestrator.db import POOL_SIZE, WRITE_LOCK, Database, WriteLockHeld, refuses_writes, transient
from orchestrator.ids import new_id
from orchestrator.jobs import JobService
from orchestrator.ledger import Ledger
from orchestrator.models import IdempotencyKey, Job, Project, WebhookDelivery
from orchestrator.schemas import DraftCreate
from orchestrator.server import serve_in_thread
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore
from tests.api import (
    TERMINAL,
    assert_error,
    check_nul_refused,
    create_project,
    iter_sse,
    read_events,
    submit_draft,
    wait_for_job,
    worker_process,
)
from tests.api.test_device_time import (
    check_a_claim_that_stamps_no_lease_taken_at_is_not_counted_from_an_earlier_claim_s,
    check_a_local_job_a_dead_process_left_counts_what_it_held,
    check_a_local_job_s_success_keeps_its_device_seconds,
    check_a_local_job_that_fails_after_its_work_counts_it,
    check_a_process_of_another_lease_length_counts_a_running_attempt_alike,
    check_a_project_at_its_quota_is_refused_429_until_its_seconds_age_out,
    check_a_quota_lowered_while_a_request_is_routed_refuses_it,
    check_a_running_local_attempt_counts_toward_the_quota,
    running_and_requeued,
)
from tests.api.test_job_reads import (
    check_a_job_is_read_as_of_one_moment,
    check_a_lineage_stops_short_of_megabytes,
    check_pages_stop_short_of_megabytes,
    check_the_stored_bound_is_never_below_the_text,
    held_job,
)
from tests.api.test_retention import check_batches, check_draft_retention, check_two_sweeps_at_once
from tests.api.test_storage_quota import (
    check_0030_leaves_jobs_taken_before_it_holding_nothing_and_downgrades,
    check_a_submit_at_the_quota_is_refused_with_nothing_written,
    check_assets_measured,
    check_unfinished_jobs_hold_their_images_bound_back_from_the_quota,
    check_usage_counts_each_asset_written_and_lowers_on_delete,
    client_for,
    services_of,
)
from tests.api.test_webhook_deliveries import (
    check_0031_indexes_the_rows_there_and_downgrades,
    check_a_claim_after_the_read_is_left_to_its_sender,
    check_a_claimed_delivery_is_left_to_its_sender,
    check_a_late_sender_leaves_a_redelivery_alone,
    check_deliveries_made_before_given_their_project,
    check_every_project_s_deliveries_read,
    check_old_deliveries_pruned,
)
from tests.api.test_webhook_sending import (
    check_a_claim_given_back_behind_the_cursor_is_reached,
    check_a_claim_given_back_is_due_at_once,
    check_a_full_destination_is_read_past,
    check_a_missed_url_that_passes_its_schedule_behind_the_cursor_is_reached,
    check_a_set_aside_destination_s_rows_past_their_schedule_are_given_up_unsent,
    check_a_set_aside_destination_s_rows_spelt_past_the_sql_filter_are_given_up_too,
    check_many_distinct_urls_the_sql_filter_misses_are_read_past_in_few_reads,
    check_spellings_the_sql_filter_misses_do_not_fill_every_read,
    check_the_give_up_reaches_missed_urls_behind_a_live_backlog,
    check_the_give_up_reads_a_bounded_number_of_missed_urls,
    check_the_sql_filter_folds_no_capital_into_another_host_s_letter,
    check_the_sql_filter_of_a_host_of_many_non_ascii_letters_runs,
    check_the_sql_filter_of_an_idn_destination,
    check_the_sql_filter_of_an_idn_destination_folds_its_non_ascii_capitals,
)
from tests.api.test_webhooks import SECRET as WEBHOOK_SECRET
from tests.api.test_webhooks import check_a_succeeded_draft_is_posted_once_signed, check_two_deliverers_send_a_row_once
from tests.conftest import isolate, random_runs
from tests.credits import PRICE, assert_settled_once, get_json, ledger, project_with_draft, promote_ok
from tests.credits.conftest import ENGINES, POLICY, Service
from tests.credits.test_adopt import DIE_BEFORE_THE_ROWS, check_adopted
from tests.credits.test_budget import check_budget_race
from tests.credits.test_check import check_ledger_findings, check_storage_findings
from tests.credits.test_random_outcomes import KILL_SEEDS, SEEDS, kill_in_the_mix, run_the_mix
from tests.credits.test_spend import check_windows_add_up
from tests.credits.test_views_agree import all_agree
from tests.policies.test_shared_versions import check_a_process_that_missed_an_edit_serves_it_while_the_file_is_refused
from tests.routing.conftest import FAKE_ENGINES, FALLBACK_POLICY, write_policies
from tests.routing.test_fallback import (
    BUDGET_FIRST_POLICY,
    PAID_ONLY_POLICY,
    SOFT_FALLBACK_POLICY,
    check_a_cancel_racing_a_fallback_s_move_settles_each_hold_once,
    check_a_fallback_follows_the_rule_the_budget_s_share_picks_now,
    check_a_fallback_whose_images_would_pass_the_storage_quota_is_skipped,
    check_every_view_agrees_with_the_jobs_after_fallbacks,
    check_two_fallbacks_into_room_for_one,
)
from tests.routing.test_health import (
    check_a_circuit_a_host_behind_opened_cools_down_on_every_host,
    check_a_circuit_opened_while_the_first_sync_runs_is_judged_by_the_database_s_clock,
    check_a_clock_stepped_back_before_the_first_sync_leaves_no_success_ahead,
    check_what_a_process_saw_before_it_first_synced_is_stamped_by_the_database_s_clock,
)
from tests.routing.test_random_fallbacks import MIX_ENGINES, check_random_fallback_chains, mix_policies
from tests.test_db import check_json_columns_take_what_engines_report
from tests.test_metrics import (
    check_device_seconds_by_project,
    check_job_histograms,
    check_later_scrapes_read_the_recent_jobs_and_agree_with_a_full_read,
    check_local_seconds_used_by_project,
    check_local_seconds_used_of_more_projects_than_a_statement_binds,
)
from tests.test_migrations import check_holds_marked_settled_by_0010

psycopg = pytest.importorskip("psycopg")
# The server the tests create their databases on: ORCHESTRATOR_TEST_POSTGRES, the URL of a database
# its user may connect to, with the right to create databases (not ORCH_*: the service warns of ORCH_*
# variables it does not know); else this machine's, with trust auth.
GIVEN = os.environ.get("ORCHESTRATOR_TEST_POSTGRES")
CANDIDATES = [GIVEN] if GIVEN else [f"postgresql://{user}@127.0.0.1:5432/test" for user in ("postgres", "root")]
_absent: list[str] = []  # why the server could not be reached: probed once, not by every test


def admin_connection() -> tuple[object, URL]:
    """A connection with the right to create databases, and its URL (the database left to fill in)."""
    if _absent:
        pytest.skip(_absent[0])
    errors = []
    for given in CANDIDATES:
        url = make_url(given)  # `postgresql://` or SQLAlchemy's `postgresql+psycopg://`, with any query
        try:
            conn = psycopg.connect(_libpq(url), connect_timeout=2, autocommit=True)
        except psycopg.Error as exc:
            errors.append(f"{url.render_as_string()}: {str(exc).strip()}")
        else:
            return conn, url.set(drivername="postgresql+psycopg")
    if GIVEN:  # asked for by name: a server that does not answer is a failure, not a skip
        pytest.fail(f"ORCHESTRATOR_TEST_POSTGRES does not answer: {'; '.join(errors)}")
    _absent.append("no PostgreSQL to test on (set ORCHESTRATOR_TEST_POSTGRES to a URL): " + "; ".join(errors))
    pytest.skip(_absent[0])


def _libpq(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    conn, server = admin_connection()
    name = f"orch_credits_{uuid.uuid4().hex[:12]}"
    with conn:  # type: ignore[attr-defined]
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[attr-defined]
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[attr-defined]


@pytest.fixture
def pg_db(postgres_url: str) -> Iterator[Database]:
    """A migrated PostgreSQL database of its own, closed after the test."""
    db = Database(postgres_url)
    db.migrate()
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def pg_api(postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> Iterator[httpx.Client]:
    """A service on the fresh Postgres database (its migrations run at start-up)."""
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url)
    assert settings.resolved_database_url == postgres_url
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        yield client


def test_json_columns_take_what_engines_report_on_postgres(postgres_url: str) -> None:
    db = Database(postgres_url)
    try:
        check_json_columns_take_what_engines_report(db)
    finally:
        db.dispose()


def test_pages_and_lineages_stop_short_of_megabytes_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings]) -> None:
    # Their rows are read `PAGE_BATCH` at a time there through a server-side cursor (yield_per).
    settings = make_settings(run_jobs=False, database_url=postgres_url)
    check_pages_stop_short_of_megabytes(settings)
    check_a_lineage_stops_short_of_megabytes(settings)
    check_the_stored_bound_is_never_below_the_text(settings)


def test_concurrent_promotions_never_overspend_on_postgres(pg_api: httpx.Client) -> None:
    check_budget_race(pg_api, total=20, fits=5)


@pytest.mark.parametrize("seed", SEEDS[:random_runs(1)])
def test_a_random_mix_of_outcomes_leaves_every_account_agreeing_on_postgres(pg_api: httpx.Client, seed: int) -> None:
    run_the_mix(pg_api, seed)


@pytest.mark.parametrize("seed", KILL_SEEDS[:random_runs(1)])
def test_a_kill_in_the_middle_of_a_random_mix_leaves_every_hold_settled_once_on_postgres(
        seed: int, postgres_url: str, service_env: dict[str, str], tmp_path: Path,
        paid_settings_for: Callable[..., Settings], services: list[Service], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    kill_in_the_mix(seed, service_env, tmp_path, paid_settings_for, services, monkeypatch, capsys, postgres_url)


def test_an_archived_project_takes_no_new_job_on_postgres(pg_api: httpx.Client) -> None:
    # The PATCH takes the project's row lock there, as a submit does.
    from tests.credits.test_archive import test_an_archived_project_takes_no_new_job_and_keeps_its_history

    test_an_archived_project_takes_no_new_job_and_keeps_its_history(pg_api)


def test_budgets_hold_whatever_the_server_s_default_isolation_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> None:
    # Under REPEATABLE READ a writer that waited for the write lock read the balance from before the
    # previous writer's commit: 40 promotes on a 50-credit budget once held 120.
    conn, _ = admin_connection()
    url = make_url(postgres_url)
    with conn:  # type: ignore[attr-defined]
        conn.execute(f"ALTER DATABASE \"{url.database}\" SET default_transaction_isolation = 'repeatable read'")  # type: ignore[attr-defined]
    with psycopg.connect(_libpq(url), autocommit=True) as scratch:
        scratch.execute("CREATE SCHEMA studio")
    # The URL's own options (a schema) are kept beside the service's.
    db = Database(url.update_query_dict({"options": "-csearch_path=studio"}).render_as_string(hide_password=False))
    with db.session() as s:
        shown = {name: s.exec(text(f"SHOW {name}")).one()[0]  # type: ignore[call-overload]
                 for name in ("transaction_isolation", "lock_timeout", "tcp_keepalives_idle", "search_path",
                              "idle_in_transaction_session_timeout")}
    assert shown == {"transaction_isolation": "read committed", "lock_timeout": "30s", "tcp_keepalives_idle": "30",
                     "search_path": "studio", "idle_in_transaction_session_timeout": "5min"}
    db.dispose()
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        check_budget_race(client, total=20, fits=5)


def test_nul_characters_are_refused_on_postgres(pg_api: httpx.Client) -> None:
    project = create_project(pg_api, "nul")["id"]
    check_nul_refused(pg_api, project)
    # What the checks did not refuse still works on this database.
    assert pg_api.get(f"/v1/projects/{project}").status_code == 200


def test_draft_retention_on_postgres(postgres_url: str, make_settings: Callable[..., Settings],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    check_draft_retention(make_settings, database_url=postgres_url)
    db = Database(postgres_url)
    try:  # on the database the check above left (none of its live drafts is retention's)
        check_batches(db, monkeypatch)
        check_two_sweeps_at_once(db)
    finally:
        db.dispose()


def test_device_time_used_and_its_quota_on_postgres(postgres_url: str,
                                                    make_settings: Callable[..., Settings]) -> None:
    # The float column summed by the partial index, and the window's times, as PostgreSQL keeps them.
    check_a_local_job_s_success_keeps_its_device_seconds(make_settings, database_url=postgres_url)
    check_a_project_at_its_quota_is_refused_429_until_its_seconds_age_out(make_settings, True,
                                                                          database_url=postgres_url)


def test_a_local_failure_s_device_seconds_on_postgres(postgres_url: str, make_settings: Callable[..., Settings],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The column's sum with the attempt's seconds (coalesce + a float parameter), as PostgreSQL adds them.
    check_a_local_job_that_fails_after_its_work_counts_it(make_settings, monkeypatch, database_url=postgres_url)


def test_a_running_local_attempt_counts_toward_the_quota_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings]) -> None:
    # Its lease's stamps (timestamptz, by the database's clock) and the unfinished jobs read there.
    check_a_running_local_attempt_counts_toward_the_quota(make_settings, database_url=postgres_url)


def test_a_running_local_attempt_is_read_by_the_leases_clock_on_a_host_behind_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads outside a write transaction (`GET /v1/projects`, `/v1/route/explain`'s routing,
    `/metrics`) capped a running attempt's lease at this host's clock: an hour behind the
    database's, its 100 s counted 0, so the project read 30 of its 120 s and explain routed a draft
    its submit then refused. Read by the leases' clock (`Database.now`), as recovery reads it."""
    real = time.time_ns
    monkeypatch.setattr("orchestrator.clock._host_us", lambda: real() // 1000 - 3600 * 1_000_000)
    with client_for(make_settings(run_jobs=False, lease_seconds=60, database_url=postgres_url)) as client:
        project_id = create_project(client, local_seconds_per_day=120)["id"]
        running_and_requeued(services_of(client), project_id)
        used = client.get(f"/v1/projects/{project_id}").json()["local_seconds_used"]
        assert used == pytest.approx(100.0 + 30.0, abs=3.0)
        explained = client.post("/v1/route/explain", json={"stage": "ideation", "project_id": project_id,
                                                           "prompt": "more"})
        assert_error(explained, 429, "device_time_exhausted")
        line = f'orchestrator_project_local_seconds_used{{project="{project_id}"}} '
        [shown] = [row for row in client.get("/metrics").text.splitlines() if row.startswith(line)]
        assert float(shown.removeprefix(line)) == pytest.approx(used, abs=5.0)


def test_a_dead_process_s_local_attempt_counts_on_postgres(postgres_url: str,
                                                          make_settings: Callable[..., Settings]) -> None:
    # Recovery's count from started_at (a timestamptz) to the lease's last renewal, as PostgreSQL reads them.
    # Its lease ran out as the rows were written: on a database other hosts may share, a live lease
    # of another host is waited out (30 s, then up to a 15 s sweep), which tells nothing of the count.
    check_a_local_job_a_dead_process_left_counts_what_it_held(make_settings, renewed_ago=61, database_url=postgres_url)


@pytest.mark.parametrize("skew", [3600, -3600], ids=["host-an-hour-ahead", "host-an-hour-behind"])
def test_a_dead_process_s_local_attempt_counts_by_one_clock_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
        skew: int) -> None:
    """Recovery counted from `started_at`, the claiming host's clock, to the lease's last renewal,
    the database's: a host an hour ahead counted nothing of a dead attempt's 70 s, one an hour
    behind 3670 s. The claim is made here with this host's clock off by `skew` seconds; its times
    are then set back as though it had been made 100 s ago and its lease last renewed 70 s after."""
    real = time.time_ns
    monkeypatch.setattr("orchestrator.clock._host_us", lambda: real() // 1000 + skew * 1_000_000)
    services = Services.build(make_settings(database_url=postgres_url, lease_seconds=60))
    try:
        project_id = new_id("prj")
        with services.db.transaction() as s:
            s.add(Project(id=project_id, name="skewed host", policy="balanced", local_seconds_per_day=3600))
        body = DraftCreate(prompt="a lighthouse", n=1, width=64, height=64, steps=1)
        job_id = services.jobs.submit(lambda: services.jobs.prepare_draft(project_id, body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="test")[0].id
        [(claim, _lane)] = services.scheduler._claim_ready({})
        assert claim.job.id == job_id and claim.job.engine == "lite"
        services.scheduler._claimed.clear()  # its process is gone: nobody here holds it
        with services.db.transaction() as s:
            # Every time the claim stamped, 100 s back (`lease_taken_at` too, where the schema has
            # it), and its lease as renewed 30 s back (`lease_renewed_at` too, where it has it).
            taken = (", lease_taken_at = lease_taken_at - interval '100 seconds'"
                     if _has_column(s, "lease_taken_at") else "")
            renewed = (", lease_renewed_at = lease_renewed_at - interval '30 seconds'"
                       if _has_column(s, "lease_renewed_at") else "")
            s.execute(text(f"UPDATE jobs SET started_at = started_at - interval '100 seconds'{taken}{renewed}, "
                           "lease_expires_at = lease_expires_at - interval '30 seconds' WHERE id = :id"),
                      {"id": job_id})
        with services.db.session() as s:
            left = s.get(Job, job_id)
            assert left is not None and left.status == "running"
        assert services.scheduler._recover_one(left) is not None
        with services.db.session() as s:
            recovered = s.get(Job, job_id)
            assert recovered is not None and recovered.status == "queued"
            assert recovered.device_seconds == pytest.approx(70.0, abs=0.5)
    finally:
        asyncio.run(services.aclose())


@pytest.mark.parametrize("requeue", ["stop", "old-release"])
def test_a_claim_that_stamps_no_lease_taken_at_is_not_counted_from_an_earlier_claim_s_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings], requeue: str) -> None:
    # The stamp and the attempt as PostgreSQL stores them, the count by the database's clock.
    check_a_claim_that_stamps_no_lease_taken_at_is_not_counted_from_an_earlier_claim_s(
        make_settings, requeue, database_url=postgres_url)


def test_a_process_of_another_lease_length_counts_a_running_attempt_alike_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings]) -> None:
    # The claim's and the renewal's stamps by the database's clock, as PostgreSQL stores them.
    check_a_process_of_another_lease_length_counts_a_running_attempt_alike(make_settings, database_url=postgres_url)


def _has_column(s: Session, name: str) -> bool:
    return bool(s.execute(text("SELECT count(*) FROM information_schema.columns WHERE table_name = 'jobs' "
                               "AND column_name = :name"), {"name": name}).scalar_one())


def test_a_quota_lowered_while_a_request_is_routed_refuses_it_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    # The PATCH takes the project's row lock, which the submit then waits for, not SQLite's write lock.
    check_a_quota_lowered_while_a_request_is_routed_refuses_it(make_settings, monkeypatch, database_url=postgres_url)


def test_storage_usage_and_quota_on_postgres(postgres_url: str, make_settings: Callable[..., Settings],
                                             tmp_path: Path) -> None:
    check_usage_counts_each_asset_written_and_lowers_on_delete(make_settings, database_url=postgres_url)
    check_a_submit_at_the_quota_is_refused_with_nothing_written(make_settings, database_url=postgres_url)
    # The sum of the unfinished jobs' bounds under the project's row lock, as PostgreSQL runs it.
    check_unfinished_jobs_hold_their_images_bound_back_from_the_quota(make_settings, database_url=postgres_url)
    db = Database(postgres_url)
    try:  # its partial index's condition, as PostgreSQL writes it
        check_assets_measured(db, ArtifactStore(tmp_path / "measured"))
    finally:
        db.dispose()


def test_one_idempotency_key_from_two_racing_requests_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two submits with one key, held together right after each has looked the key up (deterministic:
    over HTTP the same race fails most runs, but not all)."""
    services = Services.build(paid_settings_for(tmp_path / "data", database_url=postgres_url))
    assert services.db.url == postgres_url
    try:
        with services.db.transaction() as s:
            s.add(Project(id="prj_race", name="race", policy=POLICY))
        body = DraftCreate(prompt="race", n=1, width=64, height=64, steps=1, seed=1)
        prepared = services.jobs.prepare_draft("prj_race", body)
        barrier = threading.Barrier(2)
        looked_up = JobService._replay_in

        def gated(s: Session, key: str, scope: str, digest: str) -> Job | None:
            found = looked_up(s, key, scope, digest)
            # Both callers pass here before either goes on. A fixed submit that looks the key up under
            # the project's lock lets only one in: the gate then gives up instead of deadlocking.
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=2)
            return found

        monkeypatch.setattr(JobService, "_replay_in", staticmethod(gated))
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(services.jobs.submit, lambda: prepared, body, engine=None, max_credits=None,
                                   idempotency_key="race", scope="/race") for _ in range(2)]
            results = [f.result() for f in futures]
        assert len({job.id for job, _ in results}) == 1
        assert sorted(created for _, created in results) == [False, True]
        with services.db.session() as s:
            assert len(s.exec(select(Job).where(col(Job.project_id) == "prj_race")).all()) == 1
    finally:
        asyncio.run(services.aclose())


def test_one_idempotency_key_on_two_racing_project_creations_on_postgres(
        pg_api: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first creations with one key: the second must answer with the first's project, not a
    500 (each look-up waits at a barrier, which write transactions, serialised on PostgreSQL as on
    SQLite, break after 2 s: the second then finds the first's key)."""
    barrier = threading.Barrier(2)
    recall = idempotency.recall

    def gated(s: Session, key: str, scope: str, digest: str) -> IdempotencyKey | None:
        found = recall(s, key, scope, digest)
        with contextlib.suppress(threading.BrokenBarrierError):  # the loser's third look-up is alone
            barrier.wait(timeout=2)
        return found

    monkeypatch.setattr(idempotency, "recall", gated)
    base = pg_api.base_url

    def create(_: int) -> httpx.Response:
        with httpx.Client(base_url=base, timeout=30.0) as own:
            return own.post("/v1/projects", json={"name": "race"}, headers={"Idempotency-Key": "prj-race"})

    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(create, range(2)))
    assert [r.status_code for r in responses] == [201, 201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sorted("idempotent-replayed" in r.headers for r in responses) == [False, True]
    assert [p["name"] for p in pg_api.get("/v1/projects").json()["items"]] == ["race"]


def test_a_connection_lost_as_a_write_commits_is_not_told_as_nothing_written_on_postgres(
        pg_api: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The COMMIT reached PostgreSQL and its answer was lost: the 503 said "nothing was written,
    send the request again", and a client without a key doing so paid for the job twice."""
    import psycopg
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    commit = PGDialect_psycopg.do_commit
    cut: list[bool] = [True]

    def answer_lost(self: PGDialect_psycopg, connection: Any) -> None:
        doomed = cut and connection.execute("SELECT count(*) FROM projects WHERE name = 'in doubt'").fetchone()[0]
        commit(self, connection)  # committed on the server...
        if doomed:
            cut.clear()
            raise psycopg.OperationalError("server closed the connection unexpectedly")  # ...its answer lost

    monkeypatch.setattr(PGDialect_psycopg, "do_commit", answer_lost)
    key = {"Idempotency-Key": "in-doubt-1"}
    first = pg_api.post("/v1/projects", json={"name": "in doubt"}, headers=key)
    assert first.status_code == 503, first.text
    error = first.json()["error"]
    assert error["code"] == "database_unavailable" and error["details"] == {"written": "unknown"}
    assert "may have been written" in error["message"] and "nothing was written" not in error["message"]
    made = [p["id"] for p in pg_api.get("/v1/projects").json()["items"] if p["name"] == "in doubt"]
    assert len(made) == 1  # it was
    again = pg_api.post("/v1/projects", json={"name": "in doubt"}, headers=key)
    assert again.status_code == 201 and again.json()["id"] == made[0]
    assert again.headers.get("idempotent-replayed") == "true"


@pytest.mark.parametrize(("tags", "doomed", "ends"), [
    ({"fake": "slow", "seconds": "0.2"}, "status = 'succeeded'", "succeeded"),
    ({"fake": "timeout"}, "status = 'failed'", "failed"),
    ({"fake": "fail"}, "status = 'queued' AND engine <> 'fake-paid'", "failed"),  # moved to a fallback first
])
def test_a_job_s_end_whose_commit_answer_was_lost_is_told_as_it_was_written_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        tags: dict[str, str], doomed: str, ends: str) -> None:
    """The COMMIT of a job's end (its success, its failure, its move to a fallback) reached
    PostgreSQL and its answer was lost: the write's retry found the row no longer the attempt's and
    took the attempt for superseded ("its result is discarded", the result stored and charged), its
    stream told nothing more until a follower read the row ORCH_POLL_INTERVAL later."""
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    commit = PGDialect_psycopg.do_commit
    armed: list[bool] = []

    def answer_lost(self: PGDialect_psycopg, connection: Any) -> None:
        cut = bool(armed) and connection.execute(
            f"SELECT count(*) FROM jobs WHERE stage <> 'ideation' AND {doomed}").fetchone()[0] > 0
        commit(self, connection)  # committed on the server...
        if cut:
            armed.clear()
            raise psycopg.OperationalError("server closed the connection unexpectedly")  # ...its answer lost

    monkeypatch.setattr(PGDialect_psycopg, "do_commit", answer_lost)
    # No follower's read of the row to make up for a stream told nothing within the test.
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url, poll_interval=60)
    caplog.set_level(logging.INFO, logger="orchestrator.runner")
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client)
        armed.append(True)
        job = promote_ok(client, asset_id, engine=None if tags["fake"] == "fail" else "fake-paid", tags=tags)
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=httpx.Timeout(30, read=15)) as response:
            events = list(iter_sse(response))  # a stream left without its end times out here
        done = wait_for_job(client, job["id"])
        entries = [e for e in ledger(client, project_id) if e["job_id"] == job["id"]]
    assert not armed  # the answer was lost
    assert done["status"] == ends and events[-1].event == ends, [e.event for e in events]
    assert_settled_once(entries)
    assert "superseded" not in caplog.text
    if ends == "succeeded":
        assert [e.data["asset_id"] for e in events if e.event == "asset"] == done["assets"] == events[-1].data["assets"]
    else:
        assert events[-1].data["error"]["code"] == done["error"]["code"]
    if tags["fake"] == "fail":
        moved = [e.data for e in events if e.event == "state" and e.data.get("state") == "fallback"]
        assert moved and moved[0]["from"] == "fake-paid" and len(done["attempts"]) >= 2
        assert any(e.event == "queued" and e.data.get("requeued") for e in events)


def test_a_claim_waits_for_a_cancel_that_read_the_job_first_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> None:
    """Under READ COMMITTED the dispatcher could claim a job between the cancel's read and its
    UPDATE, and the job would run while its cancel was answered. Write transactions are serialised
    (`Database.transaction`): the claim waits for the cancel, then finds nothing to claim."""
    services = Services.build(paid_settings_for(tmp_path / "data", database_url=postgres_url))
    try:
        with services.db.transaction() as s:
            s.add(Project(id="prj_cancel", name="cancel", policy=POLICY))
        body = DraftCreate(prompt="race", n=1, width=64, height=64, steps=1, seed=1)
        job, _ = services.jobs.submit(lambda: services.jobs.prepare_draft("prj_cancel", body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="/race")
        claims: list[object] = []
        workers: list[threading.Thread] = []

        def claim_meanwhile(state: ORMExecuteState) -> None:
            # Just before the cancel's UPDATE, another connection tries to claim the job.
            if state.is_update and not workers:
                with services.db.session() as s:
                    queued = s.get(Job, job.id)
                assert queued is not None
                worker = threading.Thread(target=lambda: claims.append(services.scheduler._claim(queued)))
                workers.append(worker)
                worker.start()
                worker.join(0.5)
                assert worker.is_alive(), "the claim did not wait for the cancel's transaction"

        event.listen(Session, "do_orm_execute", claim_meanwhile)
        try:
            assert services.jobs.cancel_queued(job.id) is True
        finally:
            event.remove(Session, "do_orm_execute", claim_meanwhile)
        workers[0].join(10)
        assert claims == [None]
        assert services.jobs.get(job.id).status == "canceled"
    finally:
        asyncio.run(services.aclose())


def test_a_job_queued_again_to_wait_whose_commit_answer_was_lost_is_taken_as_written_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job claimed off an open circuit goes back to the queue to wait for the verdict; that
    write's COMMIT reached PostgreSQL and its answer was lost. Its retry found the row no longer
    the claim's and took it for superseded: the job was not marked waiting, and this process
    could claim it again before the circuit's verdict."""
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    services = Services.build(paid_settings_for(tmp_path / "data", database_url=postgres_url))
    try:
        with services.db.transaction() as s:
            s.add(Project(id="prj_wait", name="wait", policy=POLICY))
        body = DraftCreate(prompt="wait", n=1, width=64, height=64, steps=1, seed=1)
        job, _ = services.jobs.submit(lambda: services.jobs.prepare_draft("prj_wait", body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="/wait")
        with services.db.session() as s:
            queued = s.get(Job, job.id)
        assert queued is not None
        claim = services.scheduler._claim(queued, move=True)
        assert claim is not None and claim.attempt == queued.attempt + 1

        commit = PGDialect_psycopg.do_commit
        armed = [True]

        def answer_lost(self: PGDialect_psycopg, connection: Any) -> None:
            cut = bool(armed) and connection.execute(
                f"SELECT count(*) FROM jobs WHERE id = '{job.id}' AND status = 'queued'").fetchone()[0] > 0
            commit(self, connection)  # committed on the server...
            if cut:
                armed.clear()
                raise psycopg.OperationalError("server closed the connection unexpectedly")  # ...its answer lost

        monkeypatch.setattr(PGDialect_psycopg, "do_commit", answer_lost)
        services.runner._requeue_waiting(claim)  # raised StaleAttempt
        assert not armed  # the answer was lost
        row = services.jobs.get(job.id)
        # Its claim's number stays taken (a stream on another process may have told the claim).
        assert (row.status, row.attempt, row.attempts) == ("queued", claim.attempt, queued.attempts)
    finally:
        asyncio.run(services.aclose())


def test_a_claim_whose_commit_answer_was_lost_is_taken_as_made_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim's COMMIT reached PostgreSQL and its answer was lost: the dispatch raised, and the job
    waited `running` under this process's lease, run by nobody, until recovery found the lease out
    (a plugin's paid job then failed as possibly billed)."""
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    services = Services.build(paid_settings_for(tmp_path / "data", database_url=postgres_url))
    try:
        with services.db.transaction() as s:
            s.add(Project(id="prj_claim", name="claim", policy=POLICY))
        body = DraftCreate(prompt="claim", n=1, width=64, height=64, steps=1, seed=1)
        job, _ = services.jobs.submit(lambda: services.jobs.prepare_draft("prj_claim", body), body, engine=None,
                                      max_credits=None, idempotency_key=None, scope="/claim")
        with services.db.session() as s:
            queued = s.get(Job, job.id)
        assert queued is not None
        commit = PGDialect_psycopg.do_commit
        armed = [True]

        def answer_lost(self: PGDialect_psycopg, connection: Any) -> None:
            cut = bool(armed) and connection.execute(
                f"SELECT count(*) FROM jobs WHERE id = '{job.id}' AND status = 'running'").fetchone()[0] > 0
            commit(self, connection)  # committed on the server...
            if cut:
                armed.clear()
                raise psycopg.OperationalError("server closed the connection unexpectedly")  # ...its answer lost

        monkeypatch.setattr(PGDialect_psycopg, "do_commit", answer_lost)
        claim = services.scheduler._claim(queued)  # raised
        assert not armed  # the answer was lost
        assert claim is not None and (claim.job.id, claim.attempt) == (job.id, queued.attempt + 1)
        assert services.scheduler._claimed[job.id] is claim  # a cancel finds it
        row = services.jobs.get(job.id)
        assert (row.status, row.attempt) == ("running", claim.attempt)
    finally:
        asyncio.run(services.aclose())


def test_check_of_a_database_a_migration_keeps_locked_says_try_again_on_postgres(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A `migrate` holding its tables past the lock timeout: `check` exited 2 ("nothing to check
    where the settings point", a setup to fix) with a bare "canceling statement due to lock timeout"."""
    from orchestrator.cli import main

    isolate(monkeypatch, tmp_path)
    Database(postgres_url).migrate()
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))
    # Its lock timeout shortened through the URL's options, which the service keeps (see `postgres_connect_args`).
    monkeypatch.setenv("ORCH_DATABASE_URL", postgres_url + "?options=-c%20lock_timeout%3D300")
    locker = psycopg.connect(make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        locker.execute("LOCK TABLE alembic_version, jobs, assets, ledger_entries IN ACCESS EXCLUSIVE MODE")
        assert main(["check"]) == 3
    finally:
        locker.close()
    err = capsys.readouterr().err
    assert "could not check: the database did not answer for now" in err and "try again" in err
    assert "lock timeout (a table stayed locked past the lock timeout: a `migrate` running" in err
    assert main(["check"]) == 0  # once the lock is gone


def test_write_transactions_commit_one_at_a_time_on_postgres(postgres_url: str) -> None:
    """Ids made at the top of a write transaction are list cursors: a second writer waits from the
    moment the first one starts, so it cannot commit a smaller id after a larger one is seen."""
    db = Database(postgres_url)
    db.migrate()
    entered = threading.Event()
    try:
        with db.transaction() as first:
            first_id = new_id("prj")
            second_ids: list[str] = []

            def second() -> None:
                with db.transaction() as s:
                    entered.set()
                    second_ids.append(new_id("prj"))
                    s.add(Project(id=second_ids[0], name="second", policy=POLICY))

            writer = threading.Thread(target=second)
            writer.start()
            assert not entered.wait(0.5), "a second write transaction started while the first was open"
            first.add(Project(id=first_id, name="first", policy=POLICY))
        writer.join(10)
        assert entered.is_set() and second_ids[0] > first_id
        with db.session() as s:
            names = [p.name for p in s.exec(select(Project).order_by(col(Project.id))).all()]
        assert names == ["first", "second"]
    finally:
        db.dispose()


def test_ping_finds_the_write_lock_a_stalled_writer_holds_on_postgres(postgres_url: str) -> None:
    """Every write transaction takes the advisory lock first: one stopped while holding it stalls
    every write (for up to `IDLE_IN_TRANSACTION_SECONDS`), and /readyz must say so."""
    db = Database(postgres_url)
    db.migrate()
    stalled = psycopg.connect(_libpq(make_url(postgres_url)), autocommit=True)
    try:
        stalled.execute("BEGIN")
        stalled.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        with pytest.raises(WriteLockHeld, match="held for over 1 s"):
            db.ping()
        stalled.execute("ROLLBACK")
        db.ping()
        # The probe gave the lock back, and its connection's lock wait is a write's again.
        assert stalled.execute("SELECT pg_try_advisory_lock(%s)", (WRITE_LOCK,)).fetchone() == (True,)
        stalled.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK,))
        with db.engine.connect() as connection:
            assert connection.execute(text("SHOW lock_timeout")).scalar_one() == "30s"
    finally:
        stalled.close()
        db.dispose()


def test_concurrent_migrations_on_postgres(postgres_url: str) -> None:
    from tests.test_migrations import upgrade_concurrently

    upgrade_concurrently(postgres_url)


def test_a_migration_waits_a_bounded_time_for_a_table_but_not_for_another_migration_on_postgres(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ALTER queued behind an open transaction waited forever, and every reader of its table
    queued behind it (the service answered 503s); a second service waiting for the first's
    upgrade must still wait as long as that takes."""
    from sqlalchemy.exc import OperationalError

    from orchestrator import db as db_module
    from orchestrator.db import upgrade

    monkeypatch.setattr(db_module, "LOCK_TIMEOUT_SECONDS", 1)
    upgrade(postgres_url, "0013")
    url = make_url(postgres_url)
    with psycopg.connect(_libpq(url)) as reader:  # a transaction left open on `assets`
        reader.execute("SELECT count(*) FROM assets")
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            upgrade(postgres_url)  # 0014 alters `assets`
        assert time.monotonic() - started < 20
    with psycopg.connect(_libpq(url), autocommit=True) as other:
        assert other.execute("SELECT version_num FROM alembic_version").fetchone() == ("0013",)
        other.execute("SELECT pg_advisory_lock(7202611280)")  # another process's upgrade, for 3 s
        threading.Timer(3, lambda: other.execute("SELECT pg_advisory_unlock(7202611280)")).start()
        upgrade(postgres_url)  # waits past its 1 s lock timeout, then upgrades
        assert other.execute("SELECT version_num FROM alembic_version").fetchone() != ("0013",)


def test_another_application_s_tables_refuse_a_first_migration_but_not_another_schema_s_on_postgres(
        postgres_url: str) -> None:
    """A database holding another application's tables is not filled with ours; tables in another
    schema on the search path (an application's in `public`, PostGIS's) are not in our way."""
    from orchestrator.db import ForeignDatabase, upgrade

    url = make_url(postgres_url)
    with psycopg.connect(_libpq(url), autocommit=True) as scratch:
        scratch.execute("CREATE TABLE crm_users (id integer PRIMARY KEY)")
        scratch.execute("CREATE SCHEMA orch")
    with pytest.raises(ForeignDatabase, match=r"another application \(crm_users\)"):
        upgrade(postgres_url)
    in_orch = url.update_query_dict({"options": "-csearch_path=orch,public"}).render_as_string(hide_password=False)
    upgrade(in_orch)
    with psycopg.connect(_libpq(url), autocommit=True) as scratch:
        tables = {row[0] for row in scratch.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'orch'")}
    assert {"jobs", "assets", "alembic_version"} <= tables


def test_migrations_run_on_postgres(postgres_url: str) -> None:
    from sqlalchemy import create_engine, inspect

    from orchestrator.db import upgrade

    upgrade(postgres_url)
    upgrade(postgres_url)  # a second run is a no-op
    engine = create_engine(postgres_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"projects", "jobs", "assets", "idempotency_keys", "ledger_entries", "alembic_version"} <= tables


def test_models_and_migrations_agree_and_round_trip_on_postgres(postgres_url: str) -> None:
    """Checked on SQLite alone, a revision whose PostgreSQL side drifted from the models (a type, a
    default, a partial index) would pass; and every downgrade must take the schema back."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine
    from sqlmodel import SQLModel

    import orchestrator.models  # noqa: F401
    from orchestrator.db import alembic_config, upgrade

    def agree() -> list[Any]:
        engine = create_engine(postgres_url)
        try:
            with engine.connect() as conn:
                opts = {"compare_type": True, "compare_server_default": True}
                return list(compare_metadata(MigrationContext.configure(conn, opts=opts), SQLModel.metadata))
        finally:
            engine.dispose()

    upgrade(postgres_url)
    assert agree() == []
    command.downgrade(alembic_config(postgres_url), "base")
    upgrade(postgres_url)
    assert agree() == []


def test_ledger_ids_beyond_an_integer_are_misses_on_postgres(pg_api: httpx.Client) -> None:
    # PostgreSQL refuses to compare an INTEGER column with a larger number: that was a 500.
    project = create_project(pg_api, "big ids")["id"]
    for entry in ("2147483648", "99999999999"):
        response = pg_api.post(f"/v1/projects/{project}/ledger/{entry}/reconcile", json={"charged": 1})
        assert response.status_code == 404, response.text
    page = pg_api.get(f"/v1/projects/{project}/ledger", params={"cursor": "999999999999999999"})
    assert page.status_code == 200, page.text
    assert page.json() == {"items": [], "next_cursor": None}


def test_an_api_server_and_a_worker_share_a_postgres_database(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings], policy_dir: Path) -> None:
    """The larger install: an API server that runs no jobs and a worker process, on PostgreSQL."""
    # Looks at the queue a minute apart (the most allowed): the processes learn of each other's
    # commits by bells.
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url, run_jobs=False, poll_interval=60)
    env = {"ORCH_DATABASE_URL": postgres_url, "ORCH_ENGINES": ENGINES, "ORCH_POLICY": POLICY,
           "ORCH_POLICY_DIR": str(policy_dir), "ORCH_POLL_INTERVAL": "60"}
    with (serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client,
          worker_process(settings, tmp_path, "worker.log", env=env) as worker):
        project = create_project(client, "two processes", budget={"limit": 100, "period": "none"})["id"]
        draft = submit_draft(client, project, n=2)
        events = read_events(client, draft["id"], timeout=120)
        assert [e.event for e in events if e.event in TERMINAL] == ["succeeded"]
        assets = client.get(f"/v1/jobs/{draft['id']}").json()["assets"]
        assert len(assets) == 2
        # From here on nothing loads a model or starts a process: each step takes seconds, unless
        # it waits for a poll because a bell was not heard.
        began = time.monotonic()

        # A paid bridge held by the API server, run and charged once by the worker.
        promoted = client.post(f"/v1/assets/{assets[0]}/promote", json={"engine": "fake-paid"})
        assert promoted.status_code == 202, promoted.text
        done = wait_for_job(client, promoted.json()["id"], timeout=60)
        assert done["status"] == "succeeded" and done["cost"]["charged"] == 10 and done["cost"]["held"] == 0

        # A paid job canceled through the API server while the worker waits on the provider.
        hanging = client.post(f"/v1/assets/{assets[1]}/promote",
                              json={"engine": "fake-paid", "tags": {"fake": "hang"}}).json()
        wait_for_job(client, hanging["id"], ("running",), timeout=60)
        assert client.post(f"/v1/jobs/{hanging['id']}/cancel").status_code == 202
        canceled = wait_for_job(client, hanging["id"], ("canceled",), timeout=30)
        assert canceled["attempts"][-1]["status"] == "canceled"  # ended by the worker's runner
        assert canceled["cost"]["held"] == 0  # settled once, nothing left held
        budget = client.get(f"/v1/projects/{project}/budget").json()
        assert budget["held"] == 0 and budget["charged"] == 10 + canceled["cost"]["charged"]
        assert time.monotonic() - began < 55, "a step waited for a poll: a bell was not heard"
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()


def test_a_commit_notifies_the_other_processes_and_a_rollback_does_not_on_postgres(postgres_url: str) -> None:
    db = Database(postgres_url)
    db.migrate()
    bell = PostgresBell(postgres_url)
    db.bell = bell
    listener = psycopg.connect(bell.conninfo, autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANNEL}")
        with contextlib.suppress(RuntimeError), db.transaction() as s:
            s.add(Project(id=new_id("prj"), name="rolled back", policy="balanced"))
            raise RuntimeError("rolled back")
        with db.transaction() as s:
            s.add(Project(id=new_id("prj"), name="kept", policy="balanced"))
        heard = [n.payload for n in listener.notifies(timeout=1.0)]
        assert heard == [bell.tag]  # the commit's, from this process's tag (which it ignores)

        async def hears_another_process() -> None:
            other = PostgresBell(postgres_url)
            rung = asyncio.Event()
            other.listen(rung.set)
            try:
                await asyncio.wait_for(rung.wait(), 10)  # the catch-up look once it listens
                rung.clear()
                await asyncio.to_thread(add_project_row, db)
                await asyncio.wait_for(rung.wait(), 10)
            finally:
                await asyncio.to_thread(other.close)

        asyncio.run(hears_another_process())
    finally:
        listener.close()
        db.dispose()


def add_project_row(db: Database) -> None:
    with db.transaction() as s:
        s.add(Project(id=new_id("prj"), name="rung", policy="balanced"))


def test_downgrades_that_would_drop_what_is_in_use_are_refused_on_postgres(postgres_url: str) -> None:
    from tests.test_migrations import check_downgrades_refused_one_by_one

    check_downgrades_refused_one_by_one(postgres_url)


def test_0010_marks_settled_holds_on_postgres(postgres_url: str) -> None:
    check_holds_marked_settled_by_0010(postgres_url)


@pytest.mark.parametrize("findings", [check_ledger_findings, check_storage_findings], ids=["ledger", "storage"])
def test_check_finds_what_does_not_add_up_on_postgres(
        pg_api: httpx.Client, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        findings: Callable[[httpx.Client, str, pytest.CaptureFixture[str]], None]) -> None:
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "data"))  # pg_api's: its assets
    monkeypatch.setenv("ORCH_DATABASE_URL", postgres_url)
    findings(pg_api, postgres_url, capsys)


def test_ids_made_in_write_transactions_follow_the_database_s_clock_on_postgres(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hosts sharing the database: one whose clock is 5 s behind made ids that sorted before ones
    # already committed, and a client paging with `?cursor=` stepped over its jobs.
    db = Database(postgres_url)
    try:
        with db.transaction():
            first = new_id("job")
        behind = time.time_ns() // 1000 - 5_000_000
        monkeypatch.setattr("orchestrator.clock._host_us", lambda: behind)
        monkeypatch.setattr("orchestrator.ids._last", {})  # another host's process
        with db.transaction():
            later = new_id("job")
        assert later > first
    finally:
        db.dispose()


def test_budget_windows_follow_the_database_s_clock_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A host whose clock is off stamped entries into its own month, and read budgets by it: a
    # worker a minute slow at midnight put a capture into the month before, where the new month
    # never counted it. Here this host runs 40 days ahead, so its month is never the server's.
    services = Services.build(paid_settings_for(tmp_path / "data", database_url=postgres_url))
    try:
        with services.db.transaction() as s:
            project = Project(id="prj_window", name="window", policy=POLICY, budget_limit=100_000,
                              budget_period="month")
            s.add(project)
        ahead = time.time_ns() // 1000 + 40 * 86_400 * 1_000_000
        monkeypatch.setattr("orchestrator.clock._host_us", lambda: ahead + 0)
        with services.db.transaction() as s:
            entry = services.ledger.grant(s, "prj_window", 5_000, note="top-up")
        with services.db.session() as s:  # a budget read, outside any write
            balance = services.ledger.balance(s, project)
        assert balance.window_start is not None and balance.window_end is not None
        assert balance.window_start <= entry.created_at < balance.window_end and balance.granted == 5_000
    finally:
        asyncio.run(services.aclose())


def test_leases_are_stamped_and_judged_by_the_database_s_clock_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts sharing the database: one whose clock ran ten minutes ahead judged another host's
    live lease run out and took its paid job as an orphan (failed "interrupted", estimate captured);
    one running behind stamped leases that had run out for everyone else."""
    from datetime import timedelta

    from orchestrator.clock import shared_now, utcnow
    from orchestrator.models import LedgerEntry

    services = Services.build(paid_settings_for(tmp_path / "data", database_url=postgres_url))
    try:
        with services.db.session() as s:
            server_now = s.exec(text("SELECT clock_timestamp()")).one()[0]  # type: ignore[call-overload]
        ahead = time.time_ns() // 1000 + 600_000_000
        monkeypatch.setattr("orchestrator.clock._host_us", lambda: ahead + 0)
        assert utcnow() - server_now > timedelta(minutes=9)  # this host's clock, outside a transaction
        job_id, lease_left = new_id("job"), timedelta(seconds=90)
        with services.db.transaction() as s:
            s.add(Project(id="prj_clock", name="clock", policy=POLICY))
            s.flush()
            # Another host's worker: no owner lock here speaks for it, only its lease.
            s.add(Job(id=job_id, project_id="prj_clock", stage="bridge", engine="fake-paid", model="fake-1",
                      estimated=10_000, params={"stage": "bridge", "prompt": "x", "negative_prompt": "", "n": 1,
                                                "seed": 5, "width": 64, "height": 64, "tags": {}},
                      attempts=[], status="running", attempt=1, lease_owner="gpu-host-7:4242:0",
                      lease_expires_at=server_now + lease_left))
            s.flush()
            s.add(LedgerEntry(project_id="prj_clock", job_id=job_id, kind="hold", amount=10_000, engine="fake-paid"))
            stamped, own = shared_now(), utcnow()  # in a write transaction: the server's clock, and this host's
        assert abs(stamped - server_now) < timedelta(seconds=30) and own - stamped > timedelta(minutes=9)
        # A claim stamps its lease by the server's clock, its start by this host's (a preview
        # file's time, which is this host's, is compared with it).
        with services.db.transaction() as s:
            s.add(Job(id=new_id("job"), project_id="prj_clock", stage="bridge", engine="fake-paid", model="fake-1",
                      params={"stage": "bridge", "prompt": "x", "negative_prompt": "", "n": 1, "seed": 5,
                              "width": 64, "height": 64, "tags": {}}, attempts=[], status="queued"))
        [(claim, _lane)] = services.scheduler._claim_ready({})
        assert claim.job.lease_expires_at is not None and claim.job.started_at is not None
        assert abs(claim.job.lease_expires_at - services.scheduler.lease - server_now) < timedelta(seconds=30)
        assert claim.job.started_at - server_now > timedelta(minutes=9)
        assert job_id not in {job.id for job in services.scheduler._orphans(False)}
        assert asyncio.run(services.scheduler.recover(all_foreign=False)) == []
        with services.db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.status == "running" and job.error is None
        # Once the lease has run out by the server's clock, it is an orphan.
        with services.db.transaction() as s:
            s.execute(text("UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 second' "
                           "WHERE id = :id"), {"id": job_id})
        assert job_id in {job.id for job in services.scheduler._orphans(False)}
    finally:
        asyncio.run(services.aclose())


def test_spend_is_summed_by_postgres_as_by_sqlite(pg_api: httpx.Client) -> None:
    """The report's sums and its UTC day keys are the database's own SQL, so both are checked here."""
    project_id, asset_id = project_with_draft(pg_api, {"limit": 100, "period": "month"})
    for tags in ({}, {"fake": "timeout"}):  # one image, and one capture left unreconciled
        wait_for_job(pg_api, promote_ok(pg_api, asset_id, tags=tags)["id"])
    days = {e["created_at"][:10] for e in ledger(pg_api, project_id) if e["kind"] == "capture"}
    expected = {"charged": 2 * PRICE, "unreconciled": PRICE, "unreconciled_entries": 1, "jobs": 2, "images": 1}
    name = pg_api.get(f"/v1/projects/{project_id}").json()["name"]
    for group_by, key in (("engine", "fake-paid"), ("stage", "bridge"), ("day", min(days)), ("project", project_id)):
        if group_by == "day" and len(days) > 1:
            continue  # the captures straddle midnight
        report = pg_api.get("/v1/spend", params={"group_by": group_by, "project_id": project_id}).json()
        named = {"name": name} if group_by == "project" else {}
        assert report["groups"] == [{"key": key, **expected, **named}], (group_by, report)
        assert report["total"] == 2 * PRICE
    # Every other view of the same money, read by PostgreSQL's SQL too, after a grant and a reconcile.
    assert pg_api.post(f"/v1/projects/{project_id}/grants", json={"amount": 0.125}).status_code == 201
    waiting = get_json(pg_api, f"/v1/projects/{project_id}/ledger", unreconciled="true")["items"]
    assert pg_api.post(f"/v1/projects/{project_id}/ledger/{waiting[0]['id']}/reconcile",
                       json={"charged": 4.321}).status_code == 201
    all_agree(pg_api, [project_id])


def test_every_view_agrees_with_the_jobs_after_fallbacks_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> None:
    """Each engine's share of a job that fell back, summed by PostgreSQL's SQL, against the ledger,
    the spend report, /metrics and the budgets."""
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "budget-first-test": BUDGET_FIRST_POLICY})
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url, engines=FAKE_ENGINES,
                                 policy="fallback-test", policy_dir=folder, local_gpu_second_credits=1.5)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        check_every_view_agrees_with_the_jobs_after_fallbacks(client, tmp_path)


def test_a_fallback_whose_images_would_pass_the_storage_quota_is_skipped_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The unfinished jobs' bounds summed under the project's row lock, with the job's new one in its row.
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "paid-only-test": PAID_ONLY_POLICY})
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url, engines=FAKE_ENGINES,
                                 policy="fallback-test", policy_dir=folder)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        check_a_fallback_whose_images_would_pass_the_storage_quota_is_skipped(client, monkeypatch)


def test_a_fallback_follows_the_rule_the_budget_s_share_picks_now_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> None:
    # The share judged again under the project's row lock (`FOR UPDATE`), as the move takes its hold.
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "soft-fallback-test": SOFT_FALLBACK_POLICY})
    check_a_fallback_follows_the_rule_the_budget_s_share_picks_now(
        paid_settings_for(tmp_path / "data", database_url=postgres_url, engines=FAKE_ENGINES,
                          policy="fallback-test", policy_dir=folder), tmp_path)


def test_two_fallbacks_into_room_for_one_take_it_once_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> None:
    """Two moves to a candidate skipped for the budget, each releasing its own hold, under the
    project's row lock: one takes the room, the other is refused and goes on (`FOR UPDATE`)."""
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY,
                                                    "budget-first-test": BUDGET_FIRST_POLICY})
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url, engines=FAKE_ENGINES,
                                 policy="fallback-test", policy_dir=folder)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        check_two_fallbacks_into_room_for_one(client, tmp_path)


@pytest.mark.parametrize("first", ["move", "cancel"])
def test_a_cancel_racing_a_fallback_s_move_settles_each_hold_once_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """READ COMMITTED, and the hold updated by its id alone: the second of the two transactions
    (the cancel's, the move's) is seen waiting for the advisory write lock while the first is open,
    so it reads the hold and the job only once the first has committed."""
    folder = write_policies(tmp_path / "policies", {"fallback-test": FALLBACK_POLICY})
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url, engines=FAKE_ENGINES,
                                 policy="fallback-test", policy_dir=folder)
    with psycopg.connect(_libpq(make_url(postgres_url)), autocommit=True) as watcher:

        def waits_for_the_write_lock(pid: int) -> bool:
            return watcher.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND NOT granted "
                "AND ((classid::bigint << 32) | objid::bigint) = %s", (pid, WRITE_LOCK)).fetchone() == (1,)

        check_a_cancel_racing_a_fallback_s_move_settles_each_hold_once(settings, monkeypatch, first,
                                                                       waits_for_the_write_lock)


def test_every_window_adds_up_at_its_edges_on_postgres_whatever_its_time_zone(postgres_url: str) -> None:
    """The day keys and the window bounds are the server's SQL: a session 14 hours ahead of UTC
    (Kiritimati) still files each charge under its UTC day, and in its UTC budget window."""
    db = Database(make_url(postgres_url).update_query_dict({"options": "-c TimeZone=Pacific/Kiritimati"})
                  .render_as_string(hide_password=False))
    db.migrate()
    try:
        check_windows_add_up(db)
    finally:
        db.dispose()


def test_job_histograms_hold_each_ended_jobs_run_and_wait_on_postgres(pg_db: Database) -> None:
    # The times are subtracted in PostgreSQL's SQL there (SQLite's `julianday` here).
    check_job_histograms(pg_db)


def test_later_scrapes_read_the_recent_jobs_and_agree_with_a_full_read_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL's timestamps compared with the watermark, its sums of milliseconds numeric.
    check_later_scrapes_read_the_recent_jobs_and_agree_with_a_full_read(pg_db, monkeypatch)


def test_each_project_s_device_seconds_are_counted_as_its_jobs_end_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # The float column rounded to milliseconds and summed (numeric) in PostgreSQL's SQL.
    check_device_seconds_by_project(pg_db, monkeypatch)


def test_each_project_s_local_seconds_used_is_the_sum_its_quota_is_judged_against_on_postgres(
        pg_db: Database) -> None:
    # The unfinished jobs' lease stamps (timestamptz) and the window's float sum, as PostgreSQL reads them.
    check_local_seconds_used_by_project(pg_db)


def test_local_seconds_used_of_more_projects_than_a_statement_binds_on_postgres(pg_db: Database) -> None:
    # 65,534 projects' ids and the window's bound: one over psycopg's 65,535 parameters a statement.
    check_local_seconds_used_of_more_projects_than_a_statement_binds(pg_db, 65_535)


@contextlib.contextmanager
def _captured_between_two_sums(db: Database, ledger: Ledger, job_id: str) -> Iterator[list[bool]]:
    """The job ends, on another connection, right after the first sum the block reads."""
    captured: list[bool] = []

    def capture_after_the_first_sum(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if captured or "sum(" not in statement.lower():
            return
        captured.append(True)
        with db.transaction() as other:
            finished = other.get(Job, job_id)
            assert finished is not None
            ledger.capture(other, finished, None)

    event.listen(db.engine, "after_cursor_execute", capture_after_the_first_sum)
    try:
        yield captured
    finally:
        event.remove(db.engine, "after_cursor_execute", capture_after_the_first_sum)
    assert captured


def test_a_balance_is_read_as_of_one_moment_on_postgres(postgres_url: str) -> None:
    """The balance adds up three sums. Under READ COMMITTED a capture that committed between the
    first (charged) and the second (held) counted in neither: 10 credits vanished from both, and
    looked available, until the next read."""
    db = Database(postgres_url)
    db.migrate()
    ledger = Ledger()
    try:
        project_id, job_id = held_job(db, ledger, POLICY)
        with _captured_between_two_sums(db, ledger, job_id), db.snapshot() as s:
            project = s.get(Project, project_id)
            assert project is not None
            balance = ledger.balance(s, project)
        assert (balance.charged, balance.held) == (0, 10_000)  # as it was when the read began
        with db.snapshot() as s:
            after = ledger.balance(s, project)
        assert (after.charged, after.held) == (10_000, 0)
    finally:
        db.dispose()


def test_a_job_is_read_as_of_one_moment_on_postgres(postgres_url: str, tmp_path: Path,
                                                    paid_settings_for: Callable[..., Settings]) -> None:
    """Its row, assets and money: READ COMMITTED gave each of them a moment of its own."""
    check_a_job_is_read_as_of_one_moment(paid_settings_for(tmp_path / "data", database_url=postgres_url))


def test_0019_rewrites_misread_keys_on_postgres_whatever_its_time_zone(postgres_url: str) -> None:
    # A naive bound on `timestamptz` is read in the session's zone: keys an hour either side of
    # the cut-off would be rewritten or kept by the server's TimeZone, not by when they were stored.
    from tests.test_migrations import check_0019

    check_0019(make_url(postgres_url).update_query_dict({"options": "-c TimeZone=America/Los_Angeles"})
               .render_as_string(hide_password=False))


def test_0019_from_a_database_at_0012_rewrites_misread_keys_of_any_date_on_postgres(postgres_url: str) -> None:
    from tests.test_migrations import check_0019_from_0012

    check_0019_from_0012(postgres_url)


def test_savings_leave_copies_out_by_an_anti_join_on_postgres(postgres_url: str) -> None:
    """`NOT IN (copies)` is hashed by PostgreSQL only while the copies' ids fit `work_mem`: past
    about 200k of them it reread the list for every draft, and a spend report ran for minutes."""

    from sqlalchemy import event

    from orchestrator.db import Database
    from orchestrator.models import Asset, Job, Project
    from orchestrator.spend import savings

    db = Database(postgres_url)
    db.migrate()
    seen: list[tuple[str, Any]] = []
    try:
        with db.transaction() as s:
            s.add(Project(id="prj_saved", name="saved", policy="balanced"))
            s.flush()
            for job_id, copy in (("job_drawn", False), ("job_copy", True)):
                s.add(Job(id=job_id, project_id="prj_saved", stage="ideation", engine="lite", status="succeeded",
                          cache_hit=copy))
            s.flush()
            for n, job_id in enumerate(("job_drawn", "job_drawn", "job_copy")):
                s.add(Asset(id=f"ast_{n}", project_id="prj_saved", job_id=job_id, index=n, stage="ideation",
                            engine="lite", model="m", prompt="x", width=64, height=64, sha256=f"{n:064x}"))

        def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
            seen.append((statement, parameters))

        event.listen(db.engine, "before_cursor_execute", before)
        with db.snapshot() as s:
            result = savings(s, [SimpleNamespace(name="lite", kind="local")], None, None, None)  # type: ignore[arg-type]
        event.remove(db.engine, "before_cursor_execute", before)
        assert result["drafts"] == 2  # the copy's draft left out
        statement, parameters = next((q, p) for q, p in seen if "FROM assets" in q)
        with db.engine.connect() as conn:
            plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
    finally:
        db.dispose()
    assert "Anti Join" in plan and "SubPlan" not in plan, plan


def test_withdrawn_work_the_provider_never_ran_is_reconciled_at_nothing_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> None:
    """The capture is read FOR UPDATE there, so that a person's reconcile and this one wait in turn."""
    from tests.credits.test_crash import check_withdrawn_work_reconciled

    check_withdrawn_work_reconciled(paid_settings_for(tmp_path / "data", database_url=postgres_url, run_jobs=False),
                                    True)


def test_a_process_that_missed_a_policy_edit_serves_it_while_the_file_is_refused_on_postgres(
        pg_db: Database, tmp_path: Path) -> None:
    check_a_process_that_missed_an_edit_serves_it_while_the_file_is_refused(tmp_path, pg_db)


def _read_only(postgres_url: str, on: bool, *, cut: bool) -> None:
    """The database made to take no writes, or to take them again, as a failover to a standby and
    its end look to the service; `cut` ends its connections (a failover's do end)."""
    conn, _ = admin_connection()
    name = make_url(postgres_url).database
    with conn:  # type: ignore[attr-defined]
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')  # type: ignore[attr-defined]
        if cut:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "  # type: ignore[attr-defined]
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))


def test_connections_opened_while_the_database_took_no_writes_are_dropped_once_it_takes_them_on_postgres(
        postgres_url: str) -> None:
    # A session keeps the read-only default it began with: pooled, each failed every write until a restart.
    db = Database(postgres_url)
    try:
        with db.transaction() as s:
            s.execute(text("CREATE TABLE notes (n integer)"))
        _read_only(postgres_url, True, cut=True)
        try:
            for _ in range(3):
                with pytest.raises(DBAPIError) as refused, db.transaction() as s:
                    s.execute(text("INSERT INTO notes VALUES (1)"))
                assert refuses_writes(refused.value) and transient(refused.value)
        finally:
            _read_only(postgres_url, False, cut=False)
        for _ in range(3):
            with db.transaction() as s:
                s.execute(text("INSERT INTO notes VALUES (2)"))
        with db.session() as s:
            assert s.execute(text("SELECT count(*) FROM notes")).scalar() == 3
    finally:
        db.dispose()


def test_a_failover_to_a_standby_is_waited_out_and_a_paid_render_made_meanwhile_kept_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> None:
    """While the database took no writes (25006), each request was a 500 with a traceback, /readyz
    said ready, a paid job's images were made and lost (its end not waited out, as a database away
    is), and once writes were taken again the pooled connections opened meanwhile kept failing."""
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url)
    with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        project_id, asset_id = project_with_draft(client)
        job = promote_ok(client, asset_id, engine="fake-paid", tags={"fake": "slow", "seconds": "3"})
        wait_for_job(client, job["id"], statuses=("running",))
        _read_only(postgres_url, True, cut=True)
        try:
            refused = client.post("/v1/projects", json={"name": "during the failover"})
            error = assert_error(refused, 503, "database_unavailable")
            assert "takes no writes" in error["message"] and "nothing was written" in error["message"], error
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "takes no writes" in ready.text, ready.text
            time.sleep(4)  # the render is over: its end waits for the database
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        finally:
            _read_only(postgres_url, False, cut=False)  # the connections opened meanwhile stay read-only
        done = wait_for_job(client, job["id"])
        assert done["status"] == "succeeded" and len(done["assets"]) == 1, done
        assert client.get(f"/v1/assets/{done['assets'][0]}/content").status_code == 200
        assert_settled_once([e for e in ledger(client, project_id) if e["job_id"] == job["id"]])
        # The pool hands its connections out in turn: each opened during the failover is met.
        for i in range(2 * POOL_SIZE):
            assert client.post("/v1/projects", json={"name": f"after the failover {i}"}).status_code == 201
        assert client.get("/readyz").status_code == 200


def test_a_job_s_end_is_delivered_once_to_its_webhook_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings],
        start_server: Callable[[Settings], httpx.Client]) -> None:
    # The claim reads the project's URL in its UPDATE ... RETURNING; the end writes the row from a SELECT.
    check_a_succeeded_draft_is_posted_once_signed(
        start_server(make_settings(database_url=postgres_url, webhook_secret=WEBHOOK_SECRET)))


def test_two_deliverers_send_a_row_once_on_postgres(pg_db: Database) -> None:
    check_two_deliverers_send_a_row_once(pg_db)


def test_a_job_s_own_webhook_url_is_read_by_the_end_s_statement_on_postgres(pg_db: Database) -> None:
    from tests.api.test_job_webhooks import check_the_end_reads_the_job_s_url

    check_the_end_reads_the_job_s_url(pg_db)


def test_a_project_key_names_a_job_url_only_on_its_project_s_receiver_on_postgres(
        postgres_url: str, make_settings: Callable[..., Settings],
        start_server: Callable[[Settings], httpx.Client]) -> None:
    from tests.api.test_job_webhooks import (
        ADMIN_KEY,
        check_a_project_key_names_a_job_url_only_on_its_project_s_receiver,
    )

    check_a_project_key_names_a_job_url_only_on_its_project_s_receiver(
        make_settings(database_url=postgres_url, admin_key=ADMIN_KEY, hifi_model="builtin:tiny-sd"), start_server)


def test_webhook_deliveries_are_listed_within_a_time_range_on_postgres(pg_db: Database) -> None:
    from tests.api.test_webhook_deliveries import check_a_time_range_read

    check_a_time_range_read(pg_db)


@pytest.mark.parametrize("check", [check_a_full_destination_is_read_past, check_a_claim_given_back_is_due_at_once,
                                   check_spellings_the_sql_filter_misses_do_not_fill_every_read,
                                   check_many_distinct_urls_the_sql_filter_misses_are_read_past_in_few_reads,
                                   check_the_sql_filter_of_an_idn_destination,
                                   check_the_sql_filter_of_an_idn_destination_folds_its_non_ascii_capitals,
                                   check_the_sql_filter_folds_no_capital_into_another_host_s_letter,
                                   check_the_sql_filter_of_a_host_of_many_non_ascii_letters_runs])
def test_webhook_sends_at_once_read_and_give_back_rows_on_postgres(pg_db: Database,
                                                                   check: Callable[[Database], None]) -> None:
    check(pg_db)


def test_a_set_aside_webhook_destination_s_rows_past_their_schedule_are_given_up_unsent_on_postgres(
        pg_db: Database) -> None:
    # The conditional bulk update on PostgreSQL's timestamps (`coalesce` of two) and its `substr`.
    check_a_set_aside_destination_s_rows_past_their_schedule_are_given_up_unsent(pg_db)


def test_a_set_aside_webhook_destination_s_rows_spelt_past_the_sql_filter_are_given_up_on_postgres(
        pg_db: Database) -> None:
    # The read of the URLs left past their schedule, and the update of them by exact URL.
    check_a_set_aside_destination_s_rows_spelt_past_the_sql_filter_are_given_up_too(pg_db)


def test_the_webhook_give_up_reads_a_bounded_number_of_missed_urls_soonest_due_first_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # Grouped by URL, ordered by the soonest `next_attempt_at` of each.
    check_the_give_up_reads_a_bounded_number_of_missed_urls(pg_db, monkeypatch)


def test_the_webhook_give_up_reaches_missed_urls_behind_a_live_backlog_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cursor compared in HAVING with each URL's soonest `next_attempt_at`, PostgreSQL's timestamps and collation.
    check_the_give_up_reaches_missed_urls_behind_a_live_backlog(pg_db, monkeypatch)


def test_the_webhook_give_up_reaches_a_url_that_passes_its_schedule_behind_the_cursor_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # `_came_past` in PostgreSQL's own functions (greatest, date_part), compared in HAVING.
    check_a_missed_url_that_passes_its_schedule_behind_the_cursor_is_reached(pg_db, monkeypatch)


def test_the_webhook_give_up_reaches_a_claim_given_back_behind_the_cursor_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # The given-back row's due time, the database's clock, against the cursor's epoch seconds.
    check_a_claim_given_back_behind_the_cursor_is_reached(pg_db, monkeypatch)


@pytest.mark.parametrize("skew", [300, -300], ids=["host-ahead", "host-behind"])
def test_the_webhook_sender_judges_leases_and_backoffs_by_the_database_s_clock_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch, skew: int) -> None:
    """`Deliverer._due` read `next_attempt_at` (a claim's lease, a retry's backoff) against this
    host's clock, not the one they are stamped by: a host 5 minutes ahead read another process's
    claim mid-send as due and claimed it again (the delivery sent twice at once), and a row still in
    its backoff as due (sent early; given back at a stop, due from then: its backoff skipped); one
    5 minutes behind read nothing due, a given-back claim included, for 5 minutes."""
    with pg_db.transaction() as s:
        s.add(Project(id="prj_1", name="p", policy="balanced"))
        s.flush()
        s.add(Job(id="job_1", project_id="prj_1", stage="ideation", engine="lite", status="failed"))
    with pg_db.transaction() as s:
        now = shared_now()  # the database's
        for name, due in (("sending", now - timedelta(seconds=1)), ("backing_off", now + timedelta(seconds=120)),
                          ("given_back", now - timedelta(seconds=2))):
            s.add(WebhookDelivery(id=f"whd_{name}", job_id="job_1", url=f"http://{name}.example/h",
                                  event="job.failed", next_attempt_at=due))
    elsewhere = webhooks.Deliverer(pg_db, lambda job_id: {}, None, interval=0.1)
    claimed = elsewhere._claim_all([row for row in elsewhere._due() if row.id != "whd_backing_off"])
    assert sorted(row.id for row in claimed) == ["whd_given_back", "whd_sending"]
    elsewhere._release([row for row in claimed if row.id == "whd_given_back"])  # a stop gave it back
    real = time.time_ns
    monkeypatch.setattr("orchestrator.clock._host_us", lambda: real() // 1000 + skew * 1_000_000)
    here = webhooks.Deliverer(pg_db, lambda job_id: {}, None, interval=0.1)
    # What it reads it claims: another's claim mid-send among them, it was sent twice at once.
    assert [row.id for row in here._claim_all(here._due())] == ["whd_given_back"]


def test_webhook_deliveries_made_before_0028_are_given_their_project_on_postgres(postgres_url: str) -> None:
    check_deliveries_made_before_given_their_project(postgres_url)


def test_old_webhook_deliveries_are_pruned_pending_ones_never_on_postgres(pg_db: Database) -> None:
    check_old_deliveries_pruned(pg_db)


def test_a_redelivery_leaves_a_claimed_delivery_to_its_sender_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_a_claimed_delivery_is_left_to_its_sender(pg_db, monkeypatch)


def test_a_sender_whose_claim_ended_leaves_a_redelivery_alone_on_postgres(pg_db: Database) -> None:
    check_a_late_sender_leaves_a_redelivery_alone(pg_db)


def test_every_project_s_webhook_deliveries_are_read_a_page_at_a_time_on_postgres(pg_db: Database) -> None:
    check_every_project_s_deliveries_read(pg_db)


def test_a_pending_delivery_claimed_after_it_was_read_is_left_to_its_sender_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_a_claim_after_the_read_is_left_to_its_sender(pg_db, monkeypatch)


def test_0031_indexes_the_rows_there_and_downgrades_on_postgres(postgres_url: str) -> None:
    check_0031_indexes_the_rows_there_and_downgrades(postgres_url)


def test_0030_leaves_jobs_taken_before_it_holding_nothing_and_downgrades_on_postgres(postgres_url: str) -> None:
    # The index dropped and made again with a row in the table, as PostgreSQL's DDL runs it.
    check_0030_leaves_jobs_taken_before_it_holding_nothing_and_downgrades(postgres_url)


def test_a_circuit_a_host_behind_opened_cools_down_on_every_host_on_postgres(pg_db: Database) -> None:
    check_a_circuit_a_host_behind_opened_cools_down_on_every_host(pg_db)


def test_services_on_hosts_whose_clocks_differ_share_a_circuit_s_cooldown_on_postgres(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings]) -> None:
    """As the services are built: each reads the database's clock before its first route, so the
    worker's own clock, a day behind, stamps nothing (its opening was past the cooldown on the API
    server at once)."""
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url, run_jobs=False)
    worker, api = Services.build(settings), Services.build(settings)
    try:
        worker.engine_health.clock = lambda: time.time() - 86400
        for _ in range(worker.engine_health.threshold):
            worker.engine_health.failed("fake-paid")
        worker.engine_health.sync(worker.db)
        api.engine_health.sync(api.db)
        cooldown = api.engine_health.cooldown
        assert api.health("fake-paid") == "open" and not api.engine_health.allow("fake-paid")
        assert cooldown - 20 < api.engine_health.opens_in("fake-paid") <= cooldown
    finally:
        asyncio.run(worker.aclose())
        asyncio.run(api.aclose())


def test_what_a_process_saw_before_it_first_synced_is_stamped_by_the_database_s_clock_on_postgres(
        pg_db: Database) -> None:
    check_what_a_process_saw_before_it_first_synced_is_stamped_by_the_database_s_clock(pg_db)


def test_a_clock_stepped_back_before_the_first_sync_leaves_no_success_ahead_on_postgres(pg_db: Database) -> None:
    check_a_clock_stepped_back_before_the_first_sync_leaves_no_success_ahead(pg_db)


def test_a_circuit_opened_while_the_first_sync_runs_is_judged_by_the_database_s_clock_on_postgres(
        pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    check_a_circuit_opened_while_the_first_sync_runs_is_judged_by_the_database_s_clock(pg_db, monkeypatch)


@pytest.mark.parametrize("seed", tuple(range(1, random_runs(1) + 1)))
def test_random_fallback_chains_leave_every_view_agreeing_on_postgres(
        seed: int, postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Moves judged under the project's row lock (`FOR UPDATE`): the budget, the storage quota and the
    # rule's share, with submits and cancels of the project's other jobs going on beside them.
    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url, engines=MIX_ENGINES,
                                 policy="mix-test", policy_dir=mix_policies(tmp_path / "policies"),
                                 local_gpu_second_credits=2.0)
    check_random_fallback_chains(settings, seed, monkeypatch)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_stopped_during_its_migration_says_so_and_leaves_a_whole_revision_on_postgres(
        postgres_url: str, tmp_path: Path, tiny_cache_dir: Path, stop: signal.Signals) -> None:
    from tests.test_cli import check_a_start_stopped_mid_migration

    check_a_start_stopped_mid_migration(postgres_url, tmp_path / "data", tiny_cache_dir, tmp_path, stop)


def test_a_paid_job_killed_between_its_files_and_its_rows_keeps_its_images_on_postgres(
        service_env: dict[str, str], tmp_path: Path, paid_settings_for: Callable[..., Settings],
        services: list[Service], postgres_url: str) -> None:
    settings = paid_settings_for(Path(service_env["ORCH_DATA_DIR"]), database_url=postgres_url)
    check_adopted({**service_env, "ORCH_DATABASE_URL": postgres_url}, tmp_path, settings, services,
                  DIE_BEFORE_THE_ROWS, swept_first=True)


def test_a_success_whose_commit_was_lost_as_another_process_adopted_its_images_tells_the_adopted_assets(
        postgres_url: str, tmp_path: Path, paid_settings_for: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's COMMIT of a paid job's success was lost with its connection (not in the database),
    and while its final write retried, another process, finding its lease out, adopted the images
    its row said it stored (`orchestrator.adopt`), ending the job `succeeded` with attempts alike.
    The worker's retry read the row as its own write landed and told its stream the ids of asset
    rows that were never committed (each a 404), not the adopted ones the job lists."""
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    from orchestrator.adopt import Adoption

    settings = paid_settings_for(tmp_path / "data", database_url=postgres_url)
    other = Services.build(settings)  # the process whose recovery adopts them
    commit = PGDialect_psycopg.do_commit
    armed: list[bool] = []
    adopted: list[str] = []

    def lost_meanwhile(self: PGDialect_psycopg, connection: Any) -> None:
        ended = bool(armed) and connection.execute(
            "SELECT id FROM jobs WHERE stage <> 'ideation' AND status = 'succeeded'").fetchone()
        if not ended:
            commit(self, connection)
            return
        armed.clear()
        connection.rollback()  # the COMMIT never reached the server
        with other.db.session() as s:
            job = s.get(Job, ended[0])
        assert job is not None and job.status == "running"
        adoption = Adoption.of(job, other.runner.store.intact)
        assert adoption is not None and other.scheduler._adopt(job, adoption) is not None
        adopted.append(job.id)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(PGDialect_psycopg, "do_commit", lost_meanwhile)
    try:
        with serve_in_thread(settings) as base, httpx.Client(base_url=base, timeout=30.0) as client:
            project_id, asset_id = project_with_draft(client)
            armed.append(True)
            job = promote_ok(client, asset_id, engine="fake-paid")
            with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=httpx.Timeout(30, read=15)) as answer:
                events = list(iter_sse(answer))
            done = wait_for_job(client, job["id"])
            entries = [e for e in ledger(client, project_id) if e["job_id"] == job["id"]]
            told = [e.data["asset_id"] for e in events if e.event == "asset"]
            found = [client.get(f"/v1/assets/{asset}").status_code for asset in told]
            # The worker, superseded, discards what it stored but the files the adopted rows name.
            content = client.get(f"/v1/assets/{done['assets'][0]}/content")
    finally:
        asyncio.run(other.aclose())
    assert adopted == [job["id"]] and done["status"] == "succeeded" and len(done["assets"]) == 1
    assert events[-1].event == "succeeded", [e.event for e in events]
    assert told == done["assets"] == events[-1].data["assets"], (told, done["assets"])
    assert found == [200] and content.status_code == 200
    sha = hashlib.sha256(content.content).hexdigest()
    assert list((tmp_path / "data" / "assets").glob(f"*/{sha}.png")), "the adopted file was discarded"
    assert_settled_once(entries)
