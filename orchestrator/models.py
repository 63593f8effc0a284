"""Tables. The schema itself exists only through the Alembic revisions in `migrations/`;
`tests/test_migrations.py` proves these models and the migrations agree.

Jobs are shaped for more than one worker from the start: `attempt` is bumped on every claim and
every write a worker makes carries it; `lease_owner`/`lease_expires_at` replace a bare running
flag so a dead worker's job is found.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from orchestrator.clock import utcnow
from tiers.base import MAX_ENGINE_CHARS, MAX_MODEL_CHARS, Stage

# What the columns hold, for mypy to check every comparison and write against (stored as text).
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
LedgerKind = Literal["grant", "hold", "capture", "release", "adjustment"]

# The ledger's captures of nothing held; one per job (see `LedgerEntry`).
HOLDLESS_CAPTURE = sa.text("kind = 'capture' AND hold_id IS NULL")
# A job that copied an earlier result, as each database writes `WHERE jobs.cache_hit` (SQLite, then
# PostgreSQL): SQLite uses a partial index only for a query that says its condition as it is written.
CACHE_HIT = (sa.text("cache_hit = 1"), sa.text("cache_hit"))
# The jobs that held a local engine's device (their `device_seconds` kept): a project's use of the
# last 24 hours is summed from the few of them in its window, not from all of its jobs.
ON_DEVICE = sa.text("device_seconds IS NOT NULL")
# Assets whose file's size is not known yet (see `Asset.bytes`).
UNMEASURED = sa.text("bytes IS NULL")


class UTCDateTime(TypeDecorator[datetime]):
    """Always timezone-aware UTC in Python, whatever the database keeps (SQLite keeps naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable)


def _json() -> Any:
    return Field(default=None, sa_type=sa.JSON, nullable=True)


class Project(SQLModel, table=True):
    __tablename__ = "projects"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    policy: str = Field(max_length=100)
    budget_limit: int | None = Field(default=None, sa_type=sa.BigInteger)  # millicredits
    budget_period: str = Field(default="none", max_length=10)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    # Archived through the API: it takes no new job; its jobs, assets and ledger stay as they are.
    archived_at: datetime | None = _ts()
    # Where each job's end is POSTed (`orchestrator.webhooks`); null: nowhere.
    webhook_url: str | None = Field(default=None, max_length=2000)
    # The most its live assets' files may hold, in MiB: a new job is refused at or over it
    # (`orchestrator.quota`); null: no quota.
    storage_quota_mb: int | None = None
    # The bytes of its live assets' files (each asset's `bytes`), changed in the transaction that adds
    # or deletes assets: a submit reads one row, not a sum over a project's 200,000 assets.
    storage_bytes: int = Field(default=0, sa_type=sa.BigInteger, sa_column_kwargs={"server_default": "0"})
    # The most device-seconds its local jobs may have held over the last 24 hours before a new one
    # that only a local engine could take is refused (`orchestrator.device_time`); null: the
    # server's ORCH_PROJECT_LOCAL_SECONDS_PER_DAY.
    local_seconds_per_day: int | None = None


# What a job's row holds of a lease, dropped whenever the job goes back to the queue or ends: a
# stamp left on a queued job was taken by recovery for a later claim's (`held_until_lease`).
NO_LEASE: Final[Mapping[str, Any]] = MappingProxyType({
    "lease_owner": None, "lease_expires_at": None, "lease_taken_at": None, "lease_taken_attempt": None,
    "lease_renewed_at": None, "device_began_at": None})


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (sa.Index("ix_jobs_status_created", "status", "created_at"),
                      # A project's jobs a page at a time, in id order (/v1/jobs): with the project
                      # alone in the index, each page sorted all of a big project's jobs.
                      sa.Index("ix_jobs_project_id", "project_id", "id"),
                      # With the bound each unfinished job holds of its project's storage quota: a
                      # submit counts them and sums it from the index alone (`quota.unfinished`).
                      sa.Index("ix_jobs_project_status", "project_id", "status", "id", "reserved_bytes"),
                      # Queued jobs numbered in turns by project, in index order (orchestrator.queue).
                      sa.Index("ix_jobs_status_project_created", "status", "project_id", "created_at", "id"),
                      # Each lane's oldest queued jobs, and which engines have any (orchestrator.queue).
                      sa.Index("ix_jobs_status_engine_created", "status", "engine", "created_at", "id"),
                      # /metrics counts jobs from the index alone, not by reading every row's JSON.
                      sa.Index("ix_jobs_totals", "stage", "engine", "status"),
                      # The few copies of earlier results, which /v1/spend's savings leaves out:
                      # asked of every job instead, each report read the whole table.
                      sa.Index("ix_jobs_cache_hits", "id", sqlite_where=CACHE_HIT[0], postgresql_where=CACHE_HIT[1]),
                      # The jobs that ended since a /metrics scrape's watermark (orchestrator.metrics):
                      # read through every ended job, each scrape's cost grew with the history.
                      sa.Index("ix_jobs_finished_at", "finished_at"),
                      # A project's device-seconds of the last 24 hours (`device_time.used`), from
                      # the index alone: the few jobs that ran on a local engine, by their end.
                      sa.Index("ix_jobs_device_seconds", "project_id", "finished_at", "device_seconds",
                               sqlite_where=ON_DEVICE, postgresql_where=ON_DEVICE))

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    stage: Stage = Field(sa_type=sa.String(20))
    engine: str = Field(max_length=MAX_ENGINE_CHARS)
    model: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)
    status: JobStatus = Field(default="queued", sa_type=sa.String(20))
    params: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    # No foreign key: assets already point at jobs, and a cycle would complicate every migration.
    source_asset_id: str | None = Field(default=None, index=True, max_length=40)
    error: dict[str, Any] | None = _json()
    progress_step: int = 0
    progress_total: int = 0
    routing: dict[str, Any] | None = _json()
    attempts: list[dict[str, Any]] | None = _json()
    estimated: int = Field(default=0, sa_type=sa.BigInteger)  # millicredits
    # The most its images can take in the store, held back from its project's storage quota while
    # it is unfinished (`orchestrator.quota.job_bound`); null: taken before migration 0030, holds none.
    reserved_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    # The seconds local engines' work on it held the device, summed over its attempts: a success's
    # as metered local work is charged (`runner.device_seconds`), a failed, canceled, moved or
    # stopped one's as the runner measured it, a crashed one's up to its lease's last renewal. What
    # its project's `local_seconds_per_day` counts, from its end. Null: no attempt on a local
    # engine has ended yet, or it ended before migration 0034.
    device_seconds: float | None = None
    cache_hit: bool = False
    # Identifies an identical paid request (engine, model, parameters, source, seed) for the result cache.
    cache_key: str | None = Field(default=None, index=True, max_length=64)
    # Queue bookkeeping: claim counter and lease.
    attempt: int = 0
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_expires_at: datetime | None = _ts()
    provider_request_id: str | None = Field(default=None, max_length=500)
    # What the provider accepted for this job, for a later process to reattach to after a crash:
    # {"engine": name, "handles": [{"id": ..., **handle}, ...]} (see tiers.base.Reattachable).
    provider_work: dict[str, Any] | None = _json()
    # The attempt that has not yet sent its engine a request that can bill: set by the claim for
    # engines that announce their sends (`tiers.base.billable_send`), cleared just before the first
    # one leaves. Recovery runs such an attempt again instead of charging it as possibly billed.
    unsent_attempt: int | None = None
    # The images a running attempt of a remote engine is storing, committed before their files and
    # the rows naming them (`orchestrator.adopt`): {"attempt", "model", "cost_millicredits", "cost_unread",
    # "provider_request_id", "cache_key", "images": [{"sha256", "bytes", "seed", "width", "height",
    # "record"}]}. Made and billed: a recovery of that attempt adopts them, and the orphan sweep
    # leaves the files a running job's row names. Null once the job ends.
    stored_images: dict[str, Any] | None = _json()
    # A cancel asked of a job that another live process holds: that process sees it when the
    # commit rings its bell (or at its next look) and stops the job; a result it finishes meanwhile is not kept.
    cancel_requested_at: datetime | None = _ts()
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    started_at: datetime | None = _ts()
    # When the running attempt's claim took its lease, by the clock leases are stamped with
    # (`clock.shared_now`: the database's on PostgreSQL), where `started_at` is the claiming host's:
    # recovery counts a dead attempt's device time from it to the lease's last renewal, both by one
    # clock (`device_time.held_until_lease`). Null: a claim to move the job, one before 0036, or no lease.
    lease_taken_at: datetime | None = _ts()
    # The attempt whose claim stamped `lease_taken_at`: a release without these columns (a rolling
    # upgrade) claims the job again without stamping it, and a stamp another attempt left, hours
    # old, counted those hours. Null: stamped before 0037, or none.
    lease_taken_attempt: int | None = None
    # When the running attempt's lease was last taken or renewed, by the leases' clock, where its
    # device time is counted to (`device_time.held_until_lease`). Read before 0038 as the expiry
    # less the reader's own ORCH_LEASE_SECONDS, which the holder's may not be (300 s against a
    # holder's 60: 240 s short, or 0). Taken only where `lease_taken_attempt` is the row's attempt
    # and it is not before `lease_taken_at` (one an earlier claim left). Null: none, or the claim
    # was made by a release before 0038.
    lease_renewed_at: datetime | None = _ts()
    # When the running attempt's work started on the device, its model loaded, by the leases'
    # clock: stamped by the runner as a local engine that tells it (`tells_device_start`) does, so
    # that its seconds so far, like its end's, leave the load out (`device_time.held_so_far`).
    # Taken only with the claim's stamps (`lease_taken_attempt` the row's attempt) and not before
    # `lease_taken_at`. Null: not told (yet), an engine that does not tell, or no lease.
    device_began_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    # Where its end is POSTed, as its request asked, instead of its project's `webhook_url`
    # (`orchestrator.webhooks`); null: the project's. Kept on the row: a fallback, a retry of the
    # delivery and a restart all read it here.
    webhook_url: str | None = Field(default=None, max_length=2000)

    def has_provider_work(self) -> bool:
        """Whether a provider accepted work for this job (an attempt saved its handles): that
        work is billed whatever ends the job."""
        return bool((self.provider_work or {}).get("handles"))

    def with_attempt(self, status: str, error: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """`attempts` with this attempt's end added: its engine, how it ended and its error."""
        return [*(self.attempts or []), {"engine": self.engine, "status": status, "error": error}]

    def moves(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        """The fallbacks its attempts record, oldest first: (engine left, engine moved to, the
        error that moved it). A failed attempt another engine's followed is one; a failed last
        attempt ended the job, and one ended by a crash or a stop ran again on the same engine."""
        attempts = [a for a in self.attempts or [] if isinstance(a, dict)]
        moves: list[tuple[str, str, dict[str, Any] | None]] = []
        for index, attempt in enumerate(attempts):
            after = attempts[index + 1].get("engine") if index + 1 < len(attempts) else self.engine
            source, error = attempt.get("engine"), attempt.get("error")
            if (attempt.get("status") == "failed" and isinstance(source, str) and isinstance(after, str)
                    and after != source):
                moves.append((source, after, error if isinstance(error, dict) else None))
        return moves

    def sent_nothing(self) -> bool:
        """Whether the current attempt is known to have sent no request that can bill, and no
        earlier one left provider work to follow. Whoever acts on it must also make its update
        conditional on `unsent_attempt == attempt`: the attempt's worker may be sending now."""
        return (self.unsent_attempt is not None and self.unsent_attempt == self.attempt
                and not self.has_provider_work())


class Asset(SQLModel, table=True):
    __tablename__ = "assets"
    # /metrics counts assets by stage, and /v1/spend's savings its drafts by size, from the index
    # alone: the engine and job that made them are in it too, or each draft's row was read.
    __table_args__ = (sa.Index("ix_assets_stage_size", "stage", "width", "height", "project_id", "created_at",
                               "engine", "job_id"),
                      # A project's assets a page at a time, in id order.
                      sa.Index("ix_assets_project_id", "project_id", "id"),
                      # Draft retention's (`orchestrator.retention`): a stage's live assets oldest first,
                      # past those deleted already. Not a partial index: SQLite's planner, without
                      # statistics, took the stage's index above over it and sorted every old draft.
                      sa.Index("ix_assets_stage_live", "stage", "deleted_at", "created_at", "id"),
                      # The assets stored before their size was kept (migration 0029), which the asset
                      # sweep measures (`orchestrator.quota.measure`): empty once it has, but for those whose file is
                      # missing or no regular file, looked at again each sweep until mended.
                      sa.Index("ix_assets_unmeasured", "id", sqlite_where=UNMEASURED, postgresql_where=UNMEASURED))

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=40)
    index: int = 0
    stage: Stage = Field(sa_type=sa.String(20))
    parent_id: str | None = Field(default=None, foreign_key="assets.id", index=True, max_length=40)
    engine: str = Field(max_length=MAX_ENGINE_CHARS)
    model: str = Field(max_length=MAX_MODEL_CHARS)
    prompt: str
    negative_prompt: str = ""
    seed: int | None = Field(default=None, sa_type=sa.BigInteger)
    width: int
    height: int
    sha256: str = Field(max_length=64, index=True)
    record: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    # Deleted through the API: the row stays (its job, its ledger entries and its lineage name it),
    # its image is no longer served, and the asset sweep removes the file once no live row names it.
    deleted_at: datetime | None = _ts()
    # The size of its file (the PNG as stored), counted in its project's `storage_bytes` while it is
    # live. Null: stored before sizes were kept, not measured yet (counted as 0 until it is). Last:
    # the name hides the builtin for what the class body says after it.
    bytes: int | None = Field(default=None, sa_type=sa.BigInteger)


class IdempotencyKey(SQLModel, table=True):
    """A creating POST's key: the body it came with and what it made, a job, a project, a grant or
    a project key (one of the four columns; kept at least 48 h, see `orchestrator.idempotency`),
    and the body of its first answer, which a replay answers with (none for a grant, whose entry
    never changes, a project key, whose secret is not kept, and keys stored before 0016)."""

    __tablename__ = "idempotency_keys"

    key: str = Field(primary_key=True, max_length=300)
    scope: str = Field(primary_key=True, max_length=200)
    request_hash: str = Field(max_length=64)
    job_id: str | None = Field(default=None, foreign_key="jobs.id", max_length=40)
    project_id: str | None = Field(default=None, foreign_key="projects.id", max_length=40)
    ledger_entry_id: int | None = Field(default=None, foreign_key="ledger_entries.id")
    api_key_id: str | None = Field(default=None, foreign_key="api_keys.id", max_length=40)
    response: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON, nullable=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False, index=True)


class LedgerEntry(SQLModel, table=True):
    """Append-only (see `orchestrator.ledger`). Amounts are millicredits, positive but for
    adjustments (signed); `kind` says which way they move.

    A capture or release names the hold it settles (`hold_id`), and an adjustment the hold of the
    capture it reconciles; the unique constraint on `(hold_id, kind)` makes a second one of a kind
    impossible, whatever a retry, a crash or a duplicate worker tries. A capture without a hold
    (metered local work, a cost reported for a job estimated free) is one per job: NULLs are never
    equal in a unique constraint, so a partial unique index on `job_id` guards those.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (sa.UniqueConstraint("hold_id", "kind", name="uq_ledger_settlement"),
                      sa.Index("uq_ledger_holdless_capture", "job_id", unique=True,
                               sqlite_where=HOLDLESS_CAPTURE, postgresql_where=HOLDLESS_CAPTURE),
                      # Sums that must not read the whole ledger: open holds by project (the budget
                      # check of every paid submit) and a budget window's charges and grants. With
                      # `amount` in the index, SQLite sums without reading the rows.
                      sa.Index("ix_ledger_open_holds", "kind", "settled", "project_id"),
                      # What a page of jobs shows each job held and charged, from the index alone:
                      # with the job alone in it, SQLite summed 50 jobs' charges by walking every
                      # capture of the ledger (its kind was the better-looking index). The engine
                      # too, for each engine's share of a job that fell back (migration 0035).
                      sa.Index("ix_ledger_entries_job_id", "job_id", "kind", "settled", "engine", "amount"),
                      sa.Index("ix_ledger_project_window", "project_id", "kind", "created_at", "amount"),
                      # A spend report's window of every project, read from the index alone: with
                      # the kind alone, SQLite walked every capture ever written (migration 0023).
                      sa.Index("ix_ledger_charges_window", "kind", "created_at", "project_id", "engine", "stage",
                               "job_id", "unreconciled", "amount"),
                      # /metrics' totals by engine, read from the index alone.
                      sa.Index("ix_ledger_totals", "kind", "engine", "stage", "unreconciled", "amount"),
                      # SQLite: an id is never given again (see migration 0017); PostgreSQL's never is.
                      {"sqlite_autoincrement": True})

    id: int | None = Field(default=None, primary_key=True)
    project_id: str = Field(foreign_key="projects.id", index=True, max_length=40)
    job_id: str | None = Field(default=None, foreign_key="jobs.id", max_length=40)
    kind: LedgerKind = Field(sa_type=sa.String(12))
    amount: int = Field(sa_type=sa.BigInteger)
    hold_id: int | None = Field(default=None, foreign_key="ledger_entries.id", index=True)
    engine: str | None = Field(default=None, max_length=MAX_ENGINE_CHARS)
    stage: Stage | None = Field(default=None, sa_type=sa.String(20))
    unreconciled: bool = False
    # On a hold: a capture or release names it. Set in the transaction that writes that entry (the
    # unique `(hold_id, kind)` stays the guard against settling twice); open holds are found by it.
    settled: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    # True when a capture exceeded its hold (the provider charged more than estimated).
    over_hold: bool = False
    note: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False, index=True)


class ApiKey(SQLModel, table=True):
    """A project-scoped API key. Only its SHA-256 is kept: the secret is shown once, at creation.
    (A plain hash suffices: the secrets are 256 random bits, not passwords to brute-force.)"""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", index=True, max_length=40)
    name: str = Field(max_length=200)
    prefix: str = Field(max_length=20)  # the secret's first characters, to tell keys apart in lists
    secret_sha256: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    revoked_at: datetime | None = _ts()


class EngineHealthRow(SQLModel, table=True):
    """What every process sharing the database observed of an engine (see `orchestrator.health`):
    consecutive failures, when its circuit opened, when it last succeeded, and recent latencies by
    stage (seconds, newest last)."""

    __tablename__ = "engine_health"

    engine: str = Field(primary_key=True, max_length=MAX_ENGINE_CHARS)
    failures: int = 0
    opened_at: datetime | None = _ts()
    latencies: dict[str, list[float]] = Field(default_factory=dict, sa_type=sa.JSON, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    # When the latest success counted happened (not when it was written), never before what its
    # process knew of then (`orchestrator.health._Observation.order`): failures a process tells
    # after it that happened before it are not counted.
    succeeded_at: datetime | None = _ts()


class StoreIdentity(SQLModel, table=True):
    """The one row naming the artifact store this database's assets live in: the same id is in
    `ORCH_DATA_DIR/assets/.store-id` (see `orchestrator.identity`)."""

    __tablename__ = "store_identity"

    id: int = Field(default=1, primary_key=True)
    store_id: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class PolicyVersion(SQLModel, table=True):
    """The newest good version of each policy file of `ORCH_POLICY_DIR` that a process of this
    database read, or the file's removal (`content` None): what every process serves while the
    file is refused (see `orchestrator.policy_versions`)."""

    __tablename__ = "policy_versions"

    name: str = Field(primary_key=True, max_length=64)
    source: str = Field(sa_type=sa.Text)  # the file's path, as `Policy.source` reports it
    content: bytes | None = Field(default=None, sa_type=sa.LargeBinary, nullable=True)
    content_hash: str | None = Field(default=None, max_length=16)
    # When the latest read of the file a process's load made was made (ns of the service's clock;
    # for a removal, the listing that missed the file): see `policy_versions.PolicyVersions._newer`.
    read_ns: int = Field(sa_type=sa.BigInteger)
    recorded_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


# The rows of `GET /v1/webhooks/deliveries?status=pending` and `?status=failed`, as
# `orchestrator.webhook_deliveries.with_status` writes them: a given-up row as one term with neither
# column bare, so that SQLite without statistics does not read every given-up row from
# `ix_webhook_deliveries_due` (both columns equal to NULL) and sort them for a page.
PENDING_DELIVERY = sa.text("delivered_at IS NULL AND next_attempt_at IS NOT NULL")
FAILED_DELIVERY = sa.text("coalesce(next_attempt_at, delivered_at) IS NULL")


class WebhookDelivery(SQLModel, table=True):
    """A job's end to POST to its project's webhook (`orchestrator.webhooks`): written in the
    transaction that ends the job (an outbox), so no end is lost to a crash between the two.

    `next_attempt_at` is both the schedule and the lease: a sender claims a due row by moving it
    past the send's timeout (only one update of the value it read succeeds), so a sender that dies
    mid-send leaves the row due again. Delivered: `delivered_at` set; given up: neither set.
    `POST /v1/webhook-deliveries/{id}/redeliver` makes a delivered or given-up row due again
    (`orchestrator.webhook_deliveries`), stamping `redelivered_at`."""

    __tablename__ = "webhook_deliveries"
    # The due rows, soonest first, and /metrics' counts of pending and given-up ones, read from the
    # index alone (delivered and given-up rows have no next attempt): the table only grows.
    # A project's deliveries newest first, a page at a time (`GET /v1/projects/{id}/webhook-deliveries`).
    # Every project's pending, or given-up, deliveries newest first (`GET /v1/webhooks/deliveries`),
    # an index of each status's rows alone: a page of pending ones in 100,000 rows was a scan of the
    # whole table (41 ms on SQLite); read from one index of every undelivered row, a page read past
    # each row of the other status (220 to 245 ms for an empty pending page beside 300,000 given up).
    __table_args__ = (sa.Index("ix_webhook_deliveries_due", "next_attempt_at", "delivered_at"),
                      sa.Index("ix_webhook_deliveries_project", "project_id", "id"),
                      sa.Index("ix_webhook_deliveries_pending", "id", sqlite_where=PENDING_DELIVERY,
                               postgresql_where=PENDING_DELIVERY),
                      sa.Index("ix_webhook_deliveries_failed", "id", sqlite_where=FAILED_DELIVERY,
                               postgresql_where=FAILED_DELIVERY))

    id: str = Field(primary_key=True, max_length=40)
    job_id: str = Field(foreign_key="jobs.id", index=True, max_length=40)
    # The job's, written beside it (migration 0028 filled in the rows made before): listed by
    # project, a page was all the project's jobs' deliveries, read and sorted (440 ms at 100,000).
    # Nullable only so that a row written without it is not refused: such a row is listed nowhere.
    project_id: str | None = Field(default=None, max_length=40)
    url: str = Field(max_length=2000)
    event: str = Field(max_length=20)
    attempts: int = 0
    next_attempt_at: datetime | None = _ts()
    delivered_at: datetime | None = _ts()
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    # When it was last put back to be sent (a redeliver): retention counts a given-up row's age
    # from then, not from the job's end, so a redelivery given up again is not pruned at once.
    redelivered_at: datetime | None = _ts()
    # A sender's claim, while it lasts (its end, as `next_attempt_at` then is): a row waiting out
    # a backoff and one being sent both have a next attempt ahead, and only the first may be made
    # due at once by a redeliver (the second would be sent twice at a time).
    leased_until: datetime | None = _ts()
