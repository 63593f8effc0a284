"""Per-project quotas of local device time (`local_seconds_per_day`, set by the admin key on a project).

Local work costs no credits unless ORCH_LOCAL_GPU_SECOND_CREDITS meters it, so a budget does not
stop one project from holding the device: n=16 at ORCH_LOCAL_MAX_SIZE with many steps, queued
ORCH_MAX_PENDING_JOBS times. A quota bounds the device-seconds its local jobs held over the last
24 hours (a rolling window, not a calendar day: no midnight lets a day's worth through twice in an
hour). Every attempt on a local engine counts, whatever its outcome, summed on the job's row
(`Job.device_seconds`, `added`) and counted from the job's end (`finished_at`, the clock of the host
that ended it) for 24 hours; until the job ends, its earlier attempts' sum and its running attempt's
seconds so far count at once (`ongoing_by`): a success's seconds are the ones metered local work is charged for
(`runner.device_seconds`: the engine's own count, which leaves out loading the model); a failed or
canceled attempt's, one a fallback moved to another engine (a cloud one included) and one a stop
queued again are the runner's measure from the start of the engine's work on the device (told by
the engine once its model is loaded, `Progress.on_device`: the load is left out, as from the
engine's own count, which comes only with a result) to its return or raise; one whose process died is
counted by recovery from its claim to its lease's last renewal, by the leases' clock (`held_until_lease`). A
running attempt whose lease is live (a process renews it while its engine works, a hung one too
as long as it renews) counts from its claim to now by that clock; one whose lease has run out (its
process dead, not yet recovered) as recovery will count it, to the last renewal (`held_so_far`):
a project cannot start long local jobs one after another while the first still holds the device
uncounted, nor read a third of a lease short. Of an engine that tells its work's start on the
device, both count from there (`Job.device_began_at`, stamped by the runner as it is told), as its
end does, and a live one counts nothing while its model loads; of another, from its claim, its
model's load included, which its end, with the engine's own count, may leave out again. Metering
charges a success alone: a failure is never charged for its seconds.

A new job is judged when it is routed (`JobService.decide`, for `POST /v1/route/explain` too), and
again under the project's lock as it is taken (a quota PATCHed meanwhile routes it again): with
the project at or over its quota, local engines count as unavailable to it, so a rule that lists a
cloud engine as well routes there, and one that lists only local engines (or a private request) is
refused 429 `device_time_exhausted`, its `Retry-After` when enough of the seconds are 24 hours old
to take the project under its quota again (24 hours at least where its unfinished jobs' seconds alone
keep it there: they age out only from their end). Nothing is written on a refusal. A copy of an
earlier result holds no device and is never refused for it. Judged at admission, and as a fallback
moves a job onto a local engine (`JobRunner._requeue_on`: the candidate skipped, `device_time`): a
job already queued or running is never stopped by it, so the quota can be passed by what the
project's jobs admitted under it go on to use (ORCH_MAX_PENDING_JOBS of them at most).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from sqlmodel import Session, col, func, select
from sqlmodel.sql.expression import Select

from orchestrator.clock import shared_now, utcnow
from orchestrator.errors import DeviceTimeExhausted
from orchestrator.models import Job, Project

SETTING = "ORCH_PROJECT_LOCAL_SECONDS_PER_DAY"
WINDOW = timedelta(days=1)
UNFINISHED = ("queued", "running")
# Projects read by one query: each is a bound parameter, and a statement takes at most 65,535 on
# PostgreSQL (psycopg) and 32,766 on SQLite; /metrics reads every project's.
PROJECTS_A_QUERY = 10_000


class LeaseStamps(Protocol):
    """What `held_until_lease` reads of a job's row (a `Job`, or the columns `ongoing_by` selects)."""

    @property
    def attempt(self) -> int: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def lease_expires_at(self) -> datetime | None: ...
    @property
    def lease_taken_at(self) -> datetime | None: ...
    @property
    def lease_taken_attempt(self) -> int | None: ...
    @property
    def lease_renewed_at(self) -> datetime | None: ...
    @property
    def device_began_at(self) -> datetime | None: ...


def added(seconds: float) -> Any:
    """`jobs.device_seconds` with an attempt's `seconds` added, for an UPDATE's values: a job keeps
    the sum of its attempts on local engines (one ended by a crash, or one a fallback moved off),
    whatever engine it ends on."""
    return func.coalesce(col(Job.device_seconds), 0.0) + seconds


def held_until_lease(job: LeaseStamps, lease: timedelta, now: datetime | None = None) -> float | None:
    """The seconds a local attempt whose process stopped without ending it surely held the device:
    from its claim's taking of the lease (`lease_taken_at`), or its work's start on the device
    after it where the runner stamped that (`device_began_at`, of an engine that tells it: its
    model's load left out), to the lease's last renewal (`lease_renewed_at`), never past `now`
    (default `shared_now()`), all by the clock leases are
    stamped with: `started_at`, the claiming host's clock, was an hour off the database's on a host
    an hour off. Stamps are taken only where the claim that made them is the row's attempt
    (`lease_taken_attempt`): a release without the columns (a rolling upgrade) claims a job again
    leaving an earlier claim's stamps, hours old. Otherwise, and for a row claimed before migration
    0037, it is counted from its `started_at`. A renewal stamp before the claim's (an earlier
    claim's, left by a release without it), or none (before 0038), is read as `lease_expires_at`
    less `lease` (this process's ORCH_LEASE_SECONDS, which the holder's may not be). None when the
    row lacks a start or a lease. A lower bound: the process may have held the device up to its
    death (or, hung, beyond)."""
    start, stamped = _claimed_at(job)
    if start is None or job.lease_expires_at is None:
        return None
    renewed = (job.lease_renewed_at if stamped and job.lease_renewed_at is not None
               and job.lease_renewed_at >= start else job.lease_expires_at - lease)
    renewed = min(renewed, now or shared_now())
    return max(0.0, (renewed - (_on_device_at(job, start, stamped) or start)).total_seconds())


def held_so_far(job: LeaseStamps, lease: timedelta, now: datetime | None = None, *,
                tells: bool = False) -> float | None:
    """A running local attempt's seconds so far, as a reader counts it while the job is unfinished
    (admission, a project's read, /metrics): while its lease is live (`lease_expires_at` after
    `now`, the leases' clock, default `shared_now()`: its holder renews it, as recovery judges it),
    from its claim (as `held_until_lease`) to `now` (counted to its last renewal, a draft read 0 two
    seconds in, and every running attempt up to a third of its lease short); once its lease has
    run out (its process dead, or its renewals failing), to its last renewal, as recovery will
    count it (`held_until_lease`). Both from its work's start on the device where the runner
    stamped it (`device_began_at`); `tells`: its engine tells that start (`telling_engines`), so a
    live one its claim stamped that has not told it yet (its model loads) counts 0, as its end
    would. None as there."""
    now = now or shared_now()
    if job.lease_expires_at is None or job.lease_expires_at <= now:
        return held_until_lease(job, lease, now)
    start, stamped = _claimed_at(job)
    if start is None:
        return None
    on_device = _on_device_at(job, start, stamped)
    if on_device is None and stamped and tells:
        return 0.0  # its model loads: its end leaves that out too
    return max(0.0, (now - (on_device or start)).total_seconds())


def _claimed_at(job: LeaseStamps) -> tuple[datetime | None, bool]:
    """When the row's attempt was claimed, and whether by the leases' clock: its lease's taking
    where that claim stamped it (`lease_taken_attempt` is the row's attempt), else the claiming
    host's `started_at`."""
    if job.lease_taken_at is not None and job.lease_taken_attempt == job.attempt:
        return job.lease_taken_at, True
    return job.started_at, False


def _on_device_at(job: LeaseStamps, claimed: datetime, stamped: bool) -> datetime | None:
    """When the row's attempt started its work on the device (`device_began_at`), where its claim
    is stamped (`_claimed_at`) and it is not before it (one an earlier claim left: a release
    without the column keeps it); None: not told, or not to be taken."""
    began = job.device_began_at
    return began if stamped and began is not None and began >= claimed else None


def quota_seconds(project: Project, default: int | None) -> int | None:
    """The quota in force: the project's own, else the server's ORCH_PROJECT_LOCAL_SECONDS_PER_DAY
    (`default`); None: no quota."""
    return project.local_seconds_per_day if project.local_seconds_per_day is not None else default


def used_by(s: Session, project_ids: list[str], *, local: Collection[str], lease: timedelta,
            now: datetime | None = None, leased_now: datetime | None = None,
            told: Collection[str] = ()) -> dict[str, float]:
    """The device-seconds each project's local jobs held over the 24 hours before `now` (`ended_by`)
    and hold so far unended (`ongoing_by`, `local`, `lease`, `leased_now` and `told` as there);
    none for a project without any."""
    ended = ended_by(s, project_ids, now)
    ongoing = ongoing_by(s, project_ids, local=local, lease=lease, now=leased_now, told=told)
    return {project_id: ended.get(project_id, 0.0) + ongoing.get(project_id, 0.0)
            for project_id in sorted(ended.keys() | ongoing.keys())}


def ended_by(s: Session, project_ids: list[str], now: datetime | None = None) -> dict[str, float]:
    """The device-seconds of each project's jobs that ended in the 24 hours before `now`; none for
    a project without any. Read from `ix_jobs_device_seconds` alone."""
    if not project_ids:
        return {}
    since = (now or utcnow()) - WINDOW
    ended: dict[str, float] = {}
    for some in _slices(project_ids):
        rows = s.exec(select(col(Job.project_id), func.coalesce(func.sum(col(Job.device_seconds)), 0.0)).where(
            col(Job.project_id).in_(some), col(Job.device_seconds).is_not(None),
            col(Job.finished_at) > since).group_by(col(Job.project_id)))
        ended.update((project_id, float(total or 0.0)) for project_id, total in rows)
    return ended


def _slices(project_ids: list[str]) -> Iterable[list[str]]:
    return (project_ids[start:start + PROJECTS_A_QUERY] for start in range(0, len(project_ids), PROJECTS_A_QUERY))


class _Unfinished(NamedTuple):
    project_id: str
    status: str
    engine: str
    device_seconds: float | None
    finished_at: datetime | None
    attempt: int
    started_at: datetime | None
    lease_expires_at: datetime | None
    lease_taken_at: datetime | None
    lease_taken_attempt: int | None
    lease_renewed_at: datetime | None
    device_began_at: datetime | None


def ongoing_by(s: Session, project_ids: list[str], *, local: Collection[str], lease: timedelta,
               now: datetime | None = None, told: Collection[str] = ()) -> dict[str, float]:
    """The device-seconds each project's unfinished (queued, running) jobs hold so far: their
    earlier attempts' (kept on the row until the job ends), and, of one running on an engine in
    `local` (those of kind local), its attempt's so far by the leases' clock: to `now` while its
    lease is live, else to its last renewal, as recovery will count it (`held_so_far`, `lease`:
    ORCH_LEASE_SECONDS), from its work's start on the device where stamped; `told`: the engines
    that tell that start (`telling_engines`), whose attempts count nothing until they do.
    Counted whole at every read, never aged: each counts from its job's end once it ends. Read
    through `ix_jobs_project_status` (a project has ORCH_MAX_PENDING_JOBS unfinished jobs at most).
    `now`: the leases' clock now (`Database.now()`); by default `shared_now()`, which is this
    host's outside a PostgreSQL write transaction."""
    if not project_ids:
        return {}
    # `Select`: sqlmodel's `select` is typed for four columns at most.
    rows: list[Any] = []
    for some in _slices(project_ids):
        rows += s.exec(Select(*(col(getattr(Job, name)) for name in _Unfinished._fields)).where(
            col(Job.project_id).in_(some), col(Job.status).in_(UNFINISHED))).all()
    now = now or shared_now()
    held: dict[str, float] = {}
    for row in map(_Unfinished._make, rows):
        # A row stamped ended and unfinished (a cancel's write racing): the ended sum counts it.
        seconds = (row.device_seconds or 0.0) if row.finished_at is None else 0.0
        if row.status == "running" and row.engine in local:
            seconds += held_so_far(row, lease, now, tells=row.engine in told) or 0.0
        if seconds:
            held[row.project_id] = held.get(row.project_id, 0.0) + seconds
    return held


def local_engines(engines: Iterable[Any]) -> frozenset[str]:
    """The names of the engines of kind local among `engines` (a registry)."""
    return frozenset(engine.name for engine in engines if getattr(engine, "kind", None) == "local")


def telling_engines(engines: Iterable[Any]) -> frozenset[str]:
    """The names of the local engines among `engines` (a registry) that tell their work's start on
    the device (`tells_device_start`): their running attempts count from there (`held_so_far`)."""
    return frozenset(engine.name for engine in engines if getattr(engine, "kind", None) == "local"
                     and getattr(engine, "tells_device_start", False))


@dataclass(frozen=True)
class DeviceTime:
    """A project's device time as a submit judges it."""

    project_id: str
    quota: int | None  # seconds per 24 hours; None: no quota
    used: float  # over the last 24 hours
    own: bool  # the project's own quota, not the server's default
    retry_after: int | None = None  # when exhausted: seconds until it is under its quota again; None: never

    @property
    def exhausted(self) -> bool:
        return self.quota is not None and self.used >= self.quota

    @property
    def said(self) -> str:
        whose = "its quota" if self.own else f"the quota {SETTING} sets"
        return (f"project '{self.project_id}' has used {_seconds(self.used)} device-seconds on local engines over "
                f"the last 24 hours, at or over {whose} of {self.quota}")

    def skipped(self) -> str:
        """Why a local engine is skipped for the project (a routing candidate's `skipped`)."""
        return f"device-time quota used: {_seconds(self.used)} of {self.quota} device-seconds in the last 24 hours"

    def error(self, others: str = "", retry_after: int | None = None) -> DeviceTimeExhausted:
        """The refusal of a job no engine but a local one could take; `others`: why the rest could not."""
        # A quota of 0 is never under again: telling such a project to wait would mislead it.
        wait, advice = ((f"; it is under it again in {self.retry_after} s", "wait, or ask")
                        if self.retry_after is not None else ("; waiting does not bring it under it", "ask"))
        return DeviceTimeExhausted(
            f"{self.said}{wait}: nothing was made or held; {advice} the admin for a larger quota "
            f"(`local_seconds_per_day`){others}"[:1000],
            details={"project_id": self.project_id, "used_seconds": shown(self.used), "quota_seconds": self.quota},
            retry_after=retry_after if retry_after is not None else self.retry_after)


def exhausted(device: DeviceTime | None) -> bool:
    """Whether `device` (`state`'s answer; None: no quota) leaves local engines unavailable."""
    return device is not None and device.exhausted


def state(s: Session, project: Project, default: int | None, *, local: Collection[str], lease: timedelta,
          now: datetime | None = None, leased_now: datetime | None = None,
          told: Collection[str] = ()) -> DeviceTime | None:
    """The project's device time (`used_by`, `local`, `lease`, `leased_now` and `told` as there),
    or None where no quota is in force (nothing to judge, so nothing read)."""
    quota = quota_seconds(project, default)
    if quota is None:
        return None
    now = now or utcnow()
    ongoing = ongoing_by(s, [project.id], local=local, lease=lease, now=leased_now,
                         told=told).get(project.id, 0.0)
    used = ended_by(s, [project.id], now).get(project.id, 0.0) + ongoing
    if used < quota:
        return DeviceTime(project.id, quota, used, project.local_seconds_per_day is not None)
    return DeviceTime(project.id, quota, used, project.local_seconds_per_day is not None,
                      _under_again_in(s, project.id, quota, used, ongoing, now))


def _under_again_in(s: Session, project_id: str, quota: int, used: float, ongoing: float,
                    now: datetime) -> int | None:
    """Seconds until the oldest of the window's jobs have aged out of it enough to leave the project
    under `quota`; None for a quota of 0, which nothing ages under. `ongoing`: the part of `used`
    its unfinished jobs hold, which ages out only 24 hours after they end."""
    if quota <= 0:
        return None
    left = used
    rows = s.exec(select(col(Job.finished_at), col(Job.device_seconds)).where(
        col(Job.project_id) == project_id, col(Job.device_seconds).is_not(None),
        col(Job.finished_at) > now - WINDOW).order_by(col(Job.finished_at)))
    for finished_at, seconds in rows:
        left -= seconds or 0.0
        if left < quota and finished_at is not None:
            return max(1, math.ceil((finished_at + WINDOW - now).total_seconds()))
    if ongoing >= quota:  # they end now at the soonest
        return math.ceil(WINDOW.total_seconds())
    return 1  # read apart from the sum: jobs aged out between the two reads


def shown(seconds: float) -> float:
    """`seconds` as the API tells them, to the millisecond: cut, never rounded up, so that what is
    shown is at or over a quota (a whole number) exactly when the project is (4.9996 s told as
    5.0 against a quota of 5 said local engines were unavailable while a job was still taken)."""
    return math.floor(seconds * 1000) / 1000


def _seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")
