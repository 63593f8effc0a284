"""Creating, reading and cancelling jobs.

`submit()` is the flow of DESIGN.md up to the 202: the idempotency check (a replay is answered
before anything else), validation, the routing decision (with its engine's half-open probe, if any,
reserved), then one write transaction that persists the job (and, once priced, its ledger hold).
The scheduler is told only after that transaction commits, so a job a client has heard of always
exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pydantic import BaseModel
from sqlalchemy import update
from sqlmodel import Session, col, select

from orchestrator import cache, device_time, idempotency, quota, webhooks
from orchestrator.adopt import Adoption
from orchestrator.cache import cache_key, cached_copies
from orchestrator.clock import iso, shared_now, utcnow
from orchestrator.db import Database, changed
from orchestrator.device_time import DeviceTime
from orchestrator.disk import SETTING, DiskReserve
from orchestrator.errors import (
    BudgetExceeded,
    Canceled,
    ContentUnavailable,
    DeviceTimeExhausted,
    InvalidRequest,
    JobFinished,
    NotFound,
    NoUsableEngine,
    OrchestratorError,
    ProjectArchived,
    StorageFull,
    TooManyJobs,
    gone,
    not_found,
)
from orchestrator.events import EventBus, on_loop
from orchestrator.follow import catch_up, tell_end
from orchestrator.ids import new_id
from orchestrator.ledger import Balance, Ledger
from orchestrator.models import NO_LEASE, Asset, Job, Project
from orchestrator.routing import BUDGET_SKIP, Decision, Router, leaves_machine
from orchestrator.schemas import (
    MAX_SCALE,
    MAX_SIDE,
    MAX_TAGS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    DraftCreate,
    PolishCreate,
    PromoteCreate,
    Stage,
)
from orchestrator.store import ArtifactStore
from orchestrator.workers import Presence
from policies.schema import PRIVACY_LOCAL, PRIVACY_TAG, is_private
from tiers.base import MAX_SEED, RenderRequest, billed_by_provider, to_credits, to_millicredits

Body = DraftCreate | PromoteCreate | PolishCreate
# Retry-After for a request whose engine's half-open probe another request took while it was routed:
# routed again a moment later, it goes to the next candidate.
RESERVE_RETRY_SECONDS = 1

log = logging.getLogger(__name__)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _fitting(source: Asset, field: str, least: int, max_width: int, max_height: int) -> tuple[float, float] | None:
    """The values of `field` (scale, width or height) that keep both sides of the source's size
    within `least`..`max_width` x `least`..`max_height`, as the request may give them (a side a
    multiple of SIDE_MULTIPLE, a scale to 3 decimals); None when no value does."""
    w, h = source.width, source.height
    widest, highest = (max_width // SIDE_MULTIPLE * SIDE_MULTIPLE, max_height // SIDE_MULTIPLE * SIDE_MULTIPLE)
    if field == "scale":
        low = math.ceil(max(least / w, least / h) * 1000) / 1000
        # Within PolishCreate.scale's own bounds: the fitting scales a refusal tells may be sent.
        # Against the largest side a multiple of 8 reaches: a side is rounded to one (a 1022 px
        # limit named 7.984 as fitting a 128 px source, which made it 1024 and was refused).
        high = math.floor(min(widest / w, highest / h, MAX_SCALE) * 1000) / 1000
    else:
        ratio = h / w if field == "width" else w / h  # the other side, per pixel of this one
        # As for a scale: the other side is rounded to a multiple of 8 too (a 300 px limit named
        # 200 as fitting a 64x96 source, which made it 304).
        mine, other = (widest, highest) if field == "width" else (highest, widest)
        low = math.ceil(max(least, least / ratio, MIN_SIDE) / SIDE_MULTIPLE) * SIDE_MULTIPLE
        high = math.floor(min(mine, other / ratio, MAX_SIDE) / SIDE_MULTIPLE) * SIDE_MULTIPLE
    return (low, high) if 0 < low <= high else None


def _hint(field: str, fits: tuple[float, float] | None) -> str:
    if fits is None:
        return f"no {field} fits it"
    low, high = fits
    return f"only a {field} of {low:g} fits it" if low == high else f"a {field} of {low:g} to {high:g} fits it"


def _beyond(exact: tuple[float, float]) -> str:
    """Which sides of a worked-out size are out of the API's bounds, without the size itself (a
    `"width": 8192` on a 64x2048 source was told as 8192x262144, a height nobody asked for)."""
    said = {axis: "under" if side < MIN_SIDE else "over" if side > MAX_SIDE else None
            for axis, side in zip(("wide", "high"), exact, strict=True)}
    bound = {"under": MIN_SIDE, "over": MAX_SIDE}
    if said["wide"] == said["high"]:
        return f"{said['wide']} {bound[said['wide'] or 'over']} pixels a side"
    return " and ".join(f"{how} {bound[how]} pixels {axis}" for axis, how in said.items() if how)


class _Sides(NamedTuple):
    """The sides one engine makes, in pixels."""

    engine: str
    least: int
    max_width: int
    max_height: int
    setting: str | None = None  # the setting that sets the largest sides (`Capabilities.max_size_setting`)

    def takes(self, width: int, height: int) -> bool:
        return self.least <= min(width, height) and width <= self.max_width and height <= self.max_height

    def told(self) -> str:
        set_by = f", the most set by {self.setting}" if self.setting else ""
        if self.max_width == self.max_height:
            return f"{self.least} to {self.max_width} pixels a side{set_by}"
        return (f"widths of {self.least} to {self.max_width} and heights of {self.least} to {self.max_height} "
                f"pixels{set_by}")


@dataclass
class Prepared:
    """A validated request, ready to be routed and persisted."""

    project_id: str
    stage: Stage
    params: dict[str, Any]
    request: RenderRequest
    source: Asset | None
    # Where the job's end is POSTed instead of its project's URL (None: the project's).
    webhook_url: str | None = None


def render_request(params: dict[str, Any], init_image: Any = None) -> RenderRequest:
    """The engine's view of a job, rebuilt from the job's stored params."""
    fields = {k: params[k] for k in ("stage", "prompt", "negative_prompt", "n", "seed", "width", "height", "steps",
                                      "guidance_scale", "strength", "quality", "scale", "creativity")
              if params.get(k) is not None}
    source_size = params.get("source_size")
    return RenderRequest(**fields, tags=dict(params.get("tags") or {}), init_image=init_image,
                         source_size=(int(source_size[0]), int(source_size[1])) if source_size else None)


def _set(**values: Any) -> dict[str, Any]:
    """The values a request set, of parameters a stage took later: left out of the params when
    not set, a request that sets none is the same request as before, and copies (`cache_key`)
    the result of an identical earlier one instead of paying for it again."""
    return {name: value for name, value in values.items() if value is not None}


def raise_if_deleted_since(db: Database, asset_id: str) -> None:
    """`gone` for an asset deleted since its row was read live: its file, read next, had been swept
    meanwhile, and the request was told to restore it from a backup (a 500) rather than of the delete."""
    with db.session() as s:
        asset = s.get(Asset, asset_id)
    if asset is not None and asset.deleted_at is not None:
        raise gone(asset) from None


class JobService:
    def __init__(self, db: Database, router: Router, ledger: Ledger, bus: EventBus, notify: Callable[[], None],
                 default_policy: str, presence: Presence, store: ArtifactStore, max_pending: int = 0,
                 reserve: DiskReserve | None = None, default_quota_mb: int = 0,
                 default_local_seconds: int | None = None, lease_seconds: float = 60.0) -> None:
        self.db = db
        # How long a running job's lease lasts (ORCH_LEASE_SECONDS): an orphan's last renewal is
        # its `lease_expires_at` less this (`cancel_orphan` counts its device time up to there).
        self.lease = timedelta(seconds=lease_seconds)
        # The device-time quota of a project that sets none of its own (ORCH_PROJECT_LOCAL_SECONDS_PER_DAY; None: none).
        self.default_local_seconds = default_local_seconds
        # The storage quota of a project that sets none of its own (ORCH_PROJECT_STORAGE_QUOTA_MB; 0: none).
        self.default_quota_mb = default_quota_mb
        self.max_pending = max_pending  # unfinished jobs a project may have (0: no limit)
        self.reserve = reserve  # the data dir's free space a new job needs (None: not checked)
        self.store = store
        self.router = router
        self.ledger = ledger
        self.bus = bus
        self.notify = notify
        self.default_policy = default_policy
        self.presence = presence

    # -- preparing ---------------------------------------------------------------------------

    def prepare_draft(self, project_id: str, body: DraftCreate) -> Prepared:
        # No read here: `decide` loads the project (404 when missing) with its policy and budget.
        params: dict[str, Any] = {
            "stage": "ideation", "prompt": body.prompt, "negative_prompt": body.negative_prompt, "n": body.n,
            # Drawn so that the last image's seed (seed + n - 1) is still a seed the API takes.
            "seed": body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - body.n + 2),
            "width": body.width, "height": body.height, "steps": body.steps,
            "guidance_scale": body.guidance_scale, "tags": dict(body.tags),
        }
        return Prepared(project_id, "ideation", params, render_request(params), None, body.webhook_url)

    def prepare_promote(self, asset_id: str, body: PromoteCreate) -> Prepared:
        source, asked_negative = self._source(asset_id)
        width, height = self._size(source, body.width, body.height, 1.0, self._multiple("bridge"),
                                   limits=lambda: self._side_limits("bridge", body.engine, source.project_id))
        params: dict[str, Any] = {
            "stage": "bridge", "prompt": body.prompt or source.prompt,
            "negative_prompt": asked_negative if body.negative_prompt is None else body.negative_prompt,
            "n": 1, **_seed(body.seed, source),
            "width": width, "height": height, "strength": body.strength, "quality": body.quality,
            "steps": body.steps, **_set(guidance_scale=body.guidance_scale), "tags": self._tags(source, body.tags),
            "source_sha256": source.sha256, "source_size": [source.width, source.height],
        }
        return Prepared(source.project_id, "bridge", params, render_request(params), source, body.webhook_url)

    def prepare_polish(self, asset_id: str, body: PolishCreate) -> Prepared:
        source, asked_negative = self._source(asset_id)
        scale = body.scale if body.width is None and body.height is None else None
        width, height = self._size(source, body.width, body.height, scale or 1.0, self._multiple("polish"),
                                   limits=lambda: self._side_limits("polish", body.engine, source.project_id),
                                   # Its default too: a body leaving it out is the one writing it out.
                                   scale_sent=scale is not None)
        if scale == 1 and (width, height) == (source.width, source.height):
            scale = None  # the source's size, as no scale asks it: one request, one cache key
        params: dict[str, Any] = {
            "stage": "polish", "prompt": body.prompt or source.prompt, "negative_prompt": asked_negative,
            "n": 1, **_seed(body.seed, source),
            "width": width, "height": height, "scale": scale, "creativity": body.creativity,
            **_set(steps=body.steps, guidance_scale=body.guidance_scale),
            "tags": self._tags(source, body.tags), "source_sha256": source.sha256,
            "source_size": [source.width, source.height],
        }
        return Prepared(source.project_id, "polish", params, render_request(params), source, body.webhook_url)

    def _tags(self, source: Asset, tags: dict[str, str]) -> dict[str, str]:
        """The source job's tags under the request's own: a draft tagged `client=acme` makes acme's
        bridge and polish, for the policy rules too, without the client saying so again (a
        rule keeping acme's work local would otherwise not see the promotion). What is made from a
        private source stays private (a draft kept local must not become a cloud engine's img2img
        seed), and a request cannot lift it."""
        with self.db.session() as s:
            made_by = s.get(Job, source.job_id)
        inherited = _stored_tags((made_by.params.get("tags") or {}) if made_by else {})
        privacy = inherited.get(PRIVACY_TAG)
        if privacy and is_private({PRIVACY_TAG: privacy}) and PRIVACY_TAG in tags and not is_private(tags):
            why = (f"asset '{source.id}' is private (tags.{PRIVACY_TAG}={privacy}): what is made from it "
                   f"stays on this machine; leave tags.{PRIVACY_TAG} out")
            raise InvalidRequest(why, details={
                "source_asset_id": source.id,
                "errors": [{"loc": ["body", "tags", PRIVACY_TAG], "msg": why, "type": "value_error"}]})
        out = {**inherited, **tags}
        if privacy and is_private({PRIVACY_TAG: privacy}):
            out[PRIVACY_TAG] = privacy
        # Not the privacy tag: the service adds it to work it keeps local (`job_params`), to a draft of
        # 64 tags too, whose images could then be promoted by no request at all.
        counted = len(out) - (PRIVACY_TAG in out)
        if counted > MAX_TAGS:
            why = (f"with the {len(inherited)} tags asset '{source.id}' passes on, this job would have "
                   f"{counted} besides {PRIVACY_TAG} (at most {MAX_TAGS})")
            raise InvalidRequest(why, details={
                "source_asset_id": source.id,
                "errors": [{"loc": ["body", "tags"], "msg": why, "type": "too_long"}]})
        return out

    def _multiple(self, stage: str) -> int:
        """What a size the service works out must be a multiple of: the largest any engine of the
        stage asks (16 for an SD3 or FLUX model), so that none refuses a size the client never sent."""
        return max((engine.capabilities.size_multiple for engine in self.router.registry if stage in engine.stages),
                   default=8)

    def _routable(self, project_id: str, stage: Stage) -> set[str] | None:
        """The engines any rule of the project's policy may send a request of the stage to; None when
        its policy is not loaded (routing says why)."""
        with self.db.session() as s:
            name = s.scalar(select(Project.policy).where(col(Project.id) == project_id))
        try:
            policy = self.router.policies.get(name or "")
        except NotFound:  # routing tells it, in its own words
            return None
        return {engine for rule in policy.rules if rule.engines is not None and stage in rule.match.stages
                for engine in rule.engines}

    def _side_limits(self, stage: Stage, engine: str | None, project_id: str) -> list[_Sides]:
        """The sides the engines that may take a request of the stage make: the requested engine's,
        else those of the stage's engines that are set up (as routing, which does not count the
        others in a refusal). None known (an unknown engine, none set up): routing says why."""
        if engine is not None:
            engines = [self.router.registry.get(engine)] if engine in self.router.registry else []
        else:
            # Only those the project's policy can route the stage to: a cloud engine it never sends
            # to let a size through that the local one then refused by a side the client never sent.
            routable = self._routable(project_id, stage)
            engines = [e for e in self.router.registry if stage in e.stages and e.availability()[0]
                       and (routable is None or e.name in routable)]
        return [_Sides(e.name, e.capabilities.min_side, e.capabilities.max_width, e.capabilities.max_height,
                       e.capabilities.max_size_setting) for e in engines if stage in e.stages]

    @staticmethod
    def _size(source: Asset, width: int | None, height: int | None, scale: float, multiple: int, *,
              limits: Callable[[], list[_Sides]] | None = None, scale_sent: bool = False) -> tuple[int, int]:
        """An explicit width/height wins; one side alone keeps the source's aspect ratio.

        A size worked out from what the client sent (one side, or a `scale_sent`) is checked here,
        once it is known, and refused as that field: an engine's refusal would name a side the
        client never sent (`"scale": 0.1` on a 512 px source was "... (got 48)", `"width": 8192` on
        a 64x2048 one "8192x262144 is larger than this engine makes"). First against the API's
        bounds, then against `limits` (see `_side_limits`): refused when none of those engines
        makes it."""
        if width and height:
            return width, height
        if width:
            sent: tuple[str, float] | None = ("width", width)
            exact: tuple[float, float] = (width, width * source.height / source.width)
        elif height:
            sent, exact = ("height", height), (height * source.width / source.height, height)
        else:
            sent = ("scale", scale) if scale_sent else None
            exact = (source.width * scale, source.height * scale)
        size = (width or _round_to(exact[0], multiple), height or _round_to(exact[1], multiple))
        if sent is None:
            return size
        field, value = sent
        said = f"{field} {value:g} makes the {source.width}x{source.height} source"
        details: dict[str, Any] = {field: value, "source_size": [source.width, source.height]}
        # The engines' sides are asked only here, for a size worked out from what was sent (each
        # engine's availability is a look at its setup): most requests send neither.
        known = limits() if limits is not None else []
        # What fits is told within the API's bounds and, with one engine to take it, that engine's
        # too: a client sending the range a refusal gave must not be refused again for it.
        bounds = _Sides("", MIN_SIDE, MAX_SIDE, MAX_SIDE)
        if len(known) == 1:
            bounds = _Sides(known[0].engine, max(MIN_SIDE, known[0].least), min(MAX_SIDE, known[0].max_width),
                            min(MAX_SIDE, known[0].max_height))
        # The exact sides against the API's bounds: a rounded one is never under the multiple.
        if not MIN_SIDE <= min(exact) <= max(exact) <= MAX_SIDE:
            fits = _fitting(source, field, bounds.least, bounds.max_width, bounds.max_height)
            raise InvalidRequest(f"{said} {_beyond(exact)} ({_hint(field, fits)}); a side is {MIN_SIDE} to "
                                 f"{MAX_SIDE} pixels", details={**details, "fits": fits}, loc=("body", field))
        if known and not any(lim.takes(*size) for lim in known):
            made = f"{said} {size[0]}x{size[1]}"
            fits = None
            if len(known) == 1:
                [lim] = known
                fits = _fitting(source, field, bounds.least, bounds.max_width, bounds.max_height)
                why = f"{made}; {lim.engine} takes {lim.told()} ({_hint(field, fits)})"
            else:
                each = "; ".join(f"{lim.engine}: {lim.told()}" for lim in known)
                why = f"{made}; no engine here takes that ({each})"
            raise InvalidRequest(why, details={**details, "size": list(size), "fits": fits,
                                               "limits": [lim._asdict() for lim in known]}, loc=("body", field))
        return size

    def _source(self, asset_id: str) -> tuple[Asset, str]:
        """The asset, and the negative prompt its job was asked for: the asset's own is the one that
        shaped it, none where the model could not use it (a turbo draft at guidance 0), and a
        promotion to an engine that can must not lose the artist's."""
        with self.db.session() as s:
            asset = s.get(Asset, asset_id)
            asked = None if asset is None else s.scalar(select(Job.params).where(col(Job.id) == asset.job_id))
            project = None if asset is None else s.get(Project, asset.project_id)
        if asset is None:
            raise not_found("asset", "asset_id", asset_id)
        if project is not None:
            # Refused whatever its source: not 500 "restore its file" for a request never to be run.
            refuse_if_archived(project)
        negative = asked.get("negative_prompt") if isinstance(asked, dict) else None
        negative = negative if isinstance(negative, str) else asset.negative_prompt
        if asset.deleted_at is not None:
            raise gone(asset)
        try:
            # Read whole, as the runner will: a job that can never run is refused now, not failed
            # later (it would also hold credits). A damaged file keeps its size and its name.
            self.store.get(asset.sha256)
        except ContentUnavailable as exc:
            raise_if_deleted_since(self.db, asset_id)
            reason = exc.details.get("reason", "")
            what = ("its row holds a malformed sha256, which names no file (mend the row: `orchestrator check` "
                    "lists it)" if reason == "malformed" else
                    "its image file is " + {"missing": "missing from", "unreadable": "unreadable in"}.get(
                        reason, "damaged in") + " the store (restore it from a backup)")
            raise ContentUnavailable(f"asset '{asset_id}' has no content: {what}",
                                     details={"asset_id": asset_id, **exc.details}) from None
        return asset, negative

    def check_room(self, prepared: Prepared, decision: Decision, copies: list[Asset]) -> None:
        """Raise what a submit of the request as routed would be refused for by its project's
        unfinished jobs now (route/explain says what a submit would do): `TooManyJobs` for their
        number (unless it would copy `copies`, an earlier result: no job to wait for),
        `StorageQuotaExceeded` for what they and this job may store."""
        with self.db.snapshot() as s:
            project = self.project(s, prepared.project_id)
            pending, reserved = self._unfinished(s, project)
        if not copies:
            self._check_pending(project, pending)
        quota.refuse_if_over(project, self.default_quota_mb, reserved,
                             self._bound(decision.chosen, prepared.params, copies))

    def _unfinished(self, s: Session, project: Project) -> tuple[int, int]:
        """The project's unfinished jobs and the bytes they may still store (`quota.unfinished`),
        read only where a pending limit or a quota is in force."""
        if not self.max_pending and quota.quota_bytes(project, self.default_quota_mb) is None:
            return 0, 0
        return quota.unfinished(s, [project.id]).get(project.id, (0, 0))

    def _check_pending(self, project: Project, pending: int) -> None:
        """One project cannot fill the queue: local work is free, so its budget would not stop it.
        Counted under the project lock, so concurrent submits cannot pass the limit together."""
        limit = self.max_pending
        if limit and pending >= limit:
            raise TooManyJobs(
                f"project '{project.id}' has {pending} unfinished jobs, the most ORCH_MAX_PENDING_JOBS allows; "
                "wait for some to finish, or cancel some", details={"pending": pending, "limit": limit})

    def refuse_if_no_room(self) -> None:
        """`StorageFull` while the data dir's disk is below its reserve: asked before anything is
        held or written, so that no job is taken whose images could not be stored."""
        if self.reserve is None or self.reserve.off or (free := self.reserve.shortfall()) is None:
            return
        raise StorageFull(f"{self.reserve.said(free)}: nothing was made or held; its operator must make room "
                          f"(or lower {SETTING})", details=self.reserve.details(free))

    @staticmethod
    def project(s: Session, project_id: str) -> Project:
        """The project, or `NotFound`."""
        project = s.get(Project, project_id)
        if project is None:
            raise not_found("project", "project_id", project_id)
        return project

    # -- submitting --------------------------------------------------------------------------

    def submit(self, prepare: Callable[[], Prepared], body: Body, *, engine: str | None, max_credits: float | None,
               idempotency_key: str | None, scope: str,
               answer: Callable[[Job, list[Asset]], BaseModel] | None = None) -> tuple[Job, bool]:
        """Persist a new job; returns `(job, created)`. `created` is False for an idempotent replay.
        `prepare` runs after the key's look-up: a replay answers what the first request got, even
        where the request could not be prepared now (its source file gone, an engine's limit lowered).
        `answer` makes the body of the first answer from the job and its assets (a cache hit's),
        kept with the key for replays."""
        digest = idempotency.request_hash(body)
        if idempotency_key:
            replay = self._replay(idempotency_key, scope, digest)
            if replay is not None:
                return replay, False
        cache = getattr(body, "cache", True)
        # The probe of a half-open circuit is taken with the routing, before the commit: requests
        # routed together once all became it. The reservation lapses unless the job made adopts it.
        # Retries with one Idempotency-Key share it: they are one request, whose first to take the
        # lock makes the job and the others replay it (with a token each, they were refused 503).
        keyed = hashlib.sha256(f"{scope} {idempotency_key}".encode()).hexdigest()[:32] if idempotency_key else None
        token = f"submit-{keyed or secrets.token_hex(8)}"
        try:
            prepared = prepare()
            decision = self.decide(prepared, engine, max_credits, cache=cache, holder=token)
            # After the reads that answer for good (no such project or asset, archived, no route, over
            # the budget): a 503 says "send it again", and room made would still refuse those. Before
            # the probe is reserved and anything written.
            self.refuse_if_no_room()
            if not decision.copy:  # a copy sends nothing: no probe of a half-open circuit is its to take
                decision = self._reserve(decision, token, prepared, engine, max_credits, cache=cache)
        except OrchestratorError:
            # A request with this key may have committed since the look-up above, and its hold (or
            # its engine's failures, or its probe) can change the routing: the first request's answer is ours.
            if idempotency_key:
                replay = self._replay(idempotency_key, scope, digest)
                if replay is not None:
                    return replay, False
            raise
        reserved: str | None = None if decision.copy else decision.chosen
        try:
            job = self._new_job(prepared, decision, cache=cache)
            with self.db.transaction() as s:
                # The project lock (Postgres) or write lock (SQLite) comes first: of concurrent
                # requests with one key, exactly one gets past the second look-up and creates.
                project = self.ledger.lock_project(s, prepared.project_id)
                if idempotency_key:
                    existing = self._replay_in(s, idempotency_key, scope, digest)
                    if existing is not None:
                        return existing, False
                refuse_if_archived(project)  # archived since it was routed
                # Deleted since it was read? (A delete looks for the jobs of its asset under this lock.)
                if job.source_asset_id is not None:
                    source = s.get(Asset, job.source_asset_id)
                    if source is not None and source.deleted_at is not None:
                        raise gone(source)
                cached = self._cached(s, job) if job.cache_key else None
                pending, reserved_bytes = self._unfinished(s, project)
                if not cached:
                    self._check_pending(project, pending)
                # Routing read the balance before this lock: a request that held since may leave too
                # little for the choice (a cheaper or free candidate must then take it), or push the
                # project past a rule's `budget_used_over` (its own engines then apply). So the same
                # routing runs again on the balance now. A copy of an earlier result costs nothing,
                # so it needs no room in the budget.
                # So does a decision taken from a cached result that is gone now (its file damaged
                # since): it skipped the caps, as a free copy may, and must meet them after all.
                # And a policy changed since (a PATCH to `local-only` committed meanwhile, or a reload
                # that made the project's policy keep everything local, must not let this request be
                # queued for the cloud: the reload's `keep_local` may have looked before this commit).
                # And a copy's decision, which no engine's circuit breaker was asked about.
                # And a device-time quota lowered (or raised) since past the project's use: a PATCH
                # to 0 that committed meanwhile (this lock waited for it) let a local job be queued
                # after its 200. Read only where a quota is in force, as routing reads it.
                device = self.device_state(s, project)
                if not cached and (decision.copy or decision.policy != project.policy
                                   or self._reloaded_since(decision) or (decision.estimate > 0 and (
                                       project.budget_limit is not None or max_credits is not None))
                                   or device_time.exhausted(device) != device_time.exhausted(decision.device)):
                    balance = None if project.budget_limit is None else self.ledger.balance(s, project)
                    fresh = self._route(project.policy, prepared, engine, max_credits, balance, cache=False,
                                        holder=token, device=device)
                    if fresh.chosen != reserved:  # its probe too, taken as the first choice's was (a copy took none)
                        if not self.router.health.reserve(fresh.chosen, token):
                            raise NoUsableEngine(f"engine '{fresh.chosen}' cannot take a job now; send "
                                                 "the request again", details={"engine": fresh.chosen},
                                                 retry_after=RESERVE_RETRY_SECONDS)
                        if reserved is not None:
                            self.router.health.finished(reserved, token)
                        reserved = fresh.chosen
                    same = (fresh.chosen, fresh.rule) == (decision.chosen, decision.rule)
                    decision = fresh  # its candidates as the caps and the balance now leave them
                    job = self._new_job(prepared, decision, cache=cache)
                    if not same:
                        cached = self._cached(s, job) if job.cache_key else None
                # Assets or jobs another request stored or took since, or a quota lowered since: judged
                # on the job as routed now (the largest images its engine returns, or a copy's own
                # bytes). Its bound is held back from the quota while it is unfinished.
                bound = self._bound(job.engine, job.params, cached or [])
                quota.refuse_if_over(project, self.default_quota_mb, reserved_bytes, bound)
                job.reserved_bytes = bound
                # Ids are the list cursors: made under the write lock, they commit in id order, so a
                # client paging with `id > cursor` cannot step over a job committed just after.
                job.id = new_id("job")
                if cached:
                    job.status, job.cache_hit, job.started_at, job.finished_at = "succeeded", True, utcnow(), utcnow()
                    job.progress_step = job.progress_total = 1  # finished: a progress bar shows 100%
                    if job.params.get("seed_drawn"):
                        # The seed drawn for it made nothing: the copy's is the one that did (none
                        # where its engine takes none), as the job's params must say.
                        job.params = {**job.params, "seed": cached[0].seed}
                s.add(job)
                s.flush()
                copies = cached_copies(cached, job) if cached else []
                if copies:
                    quota.add_assets(s, copies)
                    webhooks.job_ended_at(s, job.id, job.project_id, job.status, job.webhook_url or project.webhook_url)
                else:
                    self.ledger.hold(s, project, job, decision.estimate, billable=self.billable(job.engine))
                if idempotency_key:
                    idempotency.remember(s, idempotency_key, scope, digest, job_id=job.id,
                                         response=answer(job, copies) if answer else None)
            if job.cache_hit:
                self._publish_cached(job)
            else:
                # Routed to a half-open circuit, this job is its probe now.
                if reserved is not None:
                    self.router.health.adopt(reserved, token, job.id)
                self.bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued"})
                self.notify()
            return job, True
        finally:
            if reserved is not None:
                self.router.health.finished(reserved, token)

    def billable(self, engine: str | None) -> bool:
        """Whether a job routed to `engine` here is held even at 0 credits (`tiers.base.billed_by_provider`)."""
        registry = self.router.registry
        return engine is not None and engine in registry and billed_by_provider(registry.get(engine))

    def _reserve(self, decision: Decision, token: str, prepared: Prepared, engine: str | None,
                 max_credits: float | None, *, cache: bool) -> Decision:
        """The decision whose engine `token` may be sent a job on (its probe, when half-open)."""
        for _ in range(3):
            # Routed again, a copy of an earlier result: it sends nothing, and takes no probe.
            if decision.copy or self.router.health.reserve(decision.chosen, token):
                return decision
            # Another request took the probe since routing looked: routed again, it is skipped now.
            decision = self.decide(prepared, engine, max_credits, cache=cache, holder=token)
        raise NoUsableEngine(f"engine '{decision.chosen}' cannot take a job now; send the request again",
                             details={"engine": decision.chosen}, retry_after=RESERVE_RETRY_SECONDS)

    def _cached(self, s: Session, job: Job) -> list[Asset]:
        assert job.cache_key is not None
        return cache.find(s, self.store, job.cache_key, job.project_id, job.source_asset_id)

    def _publish_cached(self, job: Job) -> None:
        # The events a run publishes (`orchestrator.runner`), with `cache_hit`: clients read both alike.
        self.bus.publish(job.id, "queued", {"job_id": job.id, "status": "queued"})
        self.bus.publish(job.id, "started", {"job_id": job.id, "status": "running", "engine": job.engine,
                                             "attempt": job.attempt, "cache_hit": True})
        asset_ids = self.asset_ids([job.id])[job.id]
        for index, asset_id in enumerate(asset_ids):
            self.bus.publish(job.id, "asset", {"asset_id": asset_id, "index": index})
        self.bus.publish(job.id, "succeeded", {"job_id": job.id, "status": "succeeded", "assets": asset_ids,
                                               "cache_hit": True})

    def decide(self, prepared: Prepared, engine: str | None, max_credits: float | None, *,
               cache: bool = True, holder: str | None = None) -> Decision:
        """The routing decision for a prepared request under its project's policy and budget.
        With `cache`, a choice an earlier identical job already made (a free copy) is kept
        whatever the budget has left or `max_credits` allows: the copy costs nothing. `holder`:
        the reservation of a half-open circuit's probe this request may hold (see `submit`)."""
        with self.db.snapshot() as s:
            project = self.project(s, prepared.project_id)
            refuse_if_archived(project)
            # Before the routing, which a full project's request (a copy of an earlier result too:
            # it adds assets) never needs; checked again under the project's lock in `submit`.
            # The stored bytes alone: what the unfinished jobs and this one may add is judged with
            # the pending limit, once, under the lock (a sum here too cost each submit 0.8 ms).
            quota.refuse_if_over(project, self.default_quota_mb)
            # Without a budget there is no share of it to route on: skip the ledger's sums.
            balance = None if project.budget_limit is None else self.ledger.balance(s, project)
            # Judged again under the project's lock in `submit`, for a quota changed meanwhile (a
            # job that ends meanwhile could as well have ended just after).
            device = self.device_state(s, project)
        return self._route(project.policy, prepared, engine, max_credits, balance, cache=cache, holder=holder,
                           device=device)

    def _bound(self, engine: str, params: dict[str, Any], copies: list[Asset]) -> int:
        """The most the images of a job with `params` on `engine` can take (`quota.job_bound`), or,
        where it copies an earlier result's images (`copies`), their own bytes."""
        if copies:
            return sum(a.bytes or 0 for a in copies)
        registry = self.router.registry
        return quota.job_bound(registry.get(engine) if engine in registry else None, render_request(params), params)

    def _route(self, policy: str, prepared: Prepared, engine: str | None, max_credits: float | None,
               balance: Balance | None, *, cache: bool, holder: str | None = None,
               device: DeviceTime | None = None) -> Decision:
        """`device`: the project's device time (`device_time.state`; None: no quota in force)."""
        used = None if balance is None else balance.used_fraction
        try:
            decision = self.router.decide(policy, prepared.request, engine, used, holder=holder, device=device)
        except (NoUsableEngine, DeviceTimeExhausted):
            # Every engine's circuit open (or the one asked for), or the project's device time used:
            # an earlier result is still copied, which holds no engine or device.
            copy = self._copy_past_circuits(policy, prepared, engine, used, device) if cache else None
            if copy is None:
                raise
            return _record_caps(copy, max_credits)
        if cache and any(c.for_now for c in decision.candidates):
            # The policy's choice passed over for its circuit: a paid render elsewhere of what a
            # copy from it gives for nothing (during a provider's outage, the studio paid twice).
            copy = self._copy_past_circuits(policy, prepared, engine, used, device)
            if copy is not None and copy.chosen != decision.chosen:
                return _record_caps(copy, max_credits)
        _record_caps(decision, max_credits)
        if (balance is None and max_credits is None) or (cache and self.has_cached(prepared, decision)):
            return decision
        if max_credits is not None:
            # Checked on the policy's own choice, before the budget may move it: the cap refuses
            # rather than reroutes, whatever the budget has left.
            # Told as the API tells credits (0.1 + 0.2 is 0.3, not 0.30000000000000004).
            cap = to_millicredits(max_credits)
            if decision.estimate > cap:
                raise BudgetExceeded(
                    f"the estimate ({to_credits(decision.estimate)} credits) is above max_credits ({to_credits(cap)})",
                    details={"estimate": to_credits(decision.estimate), "max_credits": to_credits(cap)},
                )
            # The cap holds for fallbacks too: the runner only tries candidates left unskipped.
            for candidate in decision.candidates:
                if candidate.skipped is None and (candidate.estimate or 0) > cap:
                    candidate.skipped = f"estimate above max_credits ({to_credits(cap)})"
            decision.candidates.sort(key=lambda c: c.skipped is not None)  # usable ones first, as ever
        if balance is not None:
            _within_budget(decision, balance)
        return decision

    def _copy_past_circuits(self, policy: str, prepared: Prepared, engine: str | None,
                            used: float | None, device: DeviceTime | None = None) -> Decision | None:
        """The decision the policy makes with no engine skipped for its circuit breaker (or the
        project's device time), when an earlier identical job of its choice has a result to copy;
        else None. It carries `device`: routed again without the copy, it is judged on it."""
        try:
            copy = self.router.decide(policy, prepared.request, engine, used, circuits=False, device=device)
        except OrchestratorError:
            return None
        if not self.has_cached(prepared, copy):
            return None
        copy.copy = True
        return copy

    def has_cached(self, prepared: Prepared, decision: Decision) -> bool:
        """Whether an identical earlier job's result would be copied (for nothing) instead."""
        return bool(self.cached(prepared, decision))

    def cached(self, prepared: Prepared, decision: Decision) -> list[Asset]:
        """The images of an identical earlier job that would be copied (for nothing) instead; none
        where no such job's are."""
        job = self._new_job(prepared, decision, cache=True)
        if not job.cache_key:  # free: nothing to copy, and nothing the budget could refuse
            return []
        with self.db.session() as s:
            return self._cached(s, job)

    @staticmethod
    def job_params(prepared: Prepared, decision: Decision) -> dict[str, Any]:
        """The params the job records (and route explain shows): the request's, with privacy."""
        params = prepared.params
        tags = params.get("tags") or {}
        if (decision.private or is_private(tags)) and tags.get(PRIVACY_TAG) != PRIVACY_LOCAL:
            # Made under a rule that keeps it local: its images are private, as a tagged request's are,
            # whatever rule or policy later routes their promotion or polish. A tag spelled `Local`
            # is recorded as `local`, which a dashboard filtering on it looks for (here, not in the
            # request's model: a retry's Idempotency-Key compares the body as it was sent).
            params = {**params, "tags": {**tags, PRIVACY_TAG: PRIVACY_LOCAL}}
        return params

    def _new_job(self, prepared: Prepared, decision: Decision, *, cache: bool) -> Job:
        engine = self.router.registry.get(decision.chosen)
        paid = cache and decision.estimate > 0
        params = self.job_params(prepared, decision)
        return Job(
            cache_key=cache_key(decision.chosen, engine.model, params) if paid else None,
            id=new_id("job"), project_id=prepared.project_id, stage=prepared.stage, engine=decision.chosen,
            model=engine.model, status="queued", params=params,
            source_asset_id=prepared.source.id if prepared.source else None,
            estimated=decision.estimate, routing=decision.as_dict(), attempts=[], webhook_url=prepared.webhook_url,
        )

    def _replay(self, key: str, scope: str, digest: str) -> Job | None:
        with self.db.session() as s:
            return self._replay_in(s, key, scope, digest)

    @staticmethod
    def _replay_in(s: Session, key: str, scope: str, digest: str) -> Job | None:
        row = idempotency.recall(s, key, scope, digest)
        if row is None:
            return None
        assert row.job_id is not None  # scopes are paths, and a stage's path only ever makes jobs
        return s.get(Job, row.job_id)

    # -- reading and cancelling ----------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self.db.session() as s:
            job = s.get(Job, job_id)
        if job is None:
            raise not_found("job", "job_id", job_id)
        return job

    def asset_ids(self, job_ids: list[str]) -> dict[str, list[str]]:
        with self.db.session() as s:
            return asset_ids_in(s, job_ids)

    def _reloaded_since(self, decision: Decision) -> bool:
        """Whether the policy `decision` was routed by has been reloaded with other rules since."""
        if decision.policy is None:  # not routed by a policy (every routed decision names one)
            return False
        try:
            return self.router.policies.get(decision.policy).content_hash != decision.policy_hash
        except NotFound:  # gone: routing again says so
            return True

    def keep_local(self, project_id: str, policy: str) -> list[str]:
        """A project moved to a policy that keeps everything on this machine: its unfinished jobs
        are made private and its queued jobs for engines that send data off it are canceled (their
        holds released; returned). The runner reads the mark from the row: no fallback of a job
        leaves the machine, and a job for such an engine that has sent nothing yet (claimed
        meanwhile, or queued again after a stop) is canceled before its first request. They kept
        the routing they were queued with, and a switch to `local-only` still sent prompts and
        images out. What a running job sent before the switch is out already."""
        unfinished = (col(Job.project_id) == project_id, col(Job.status).in_(("queued", "running")))
        registry = self.router.registry

        def leaving(job: Job) -> bool:
            return job.engine not in registry or leaves_machine(registry.get(job.engine))

        # Private first, then the look for what to cancel: a fallback moving a job off the machine
        # meanwhile either sees it private (and does not move it) or is seen by the look. Writes are
        # serialised (`Database.transaction`): a submit routed by the policy before it changed, and
        # committing meanwhile, has committed before this reads.
        with self.db.transaction() as s:
            for job in s.exec(select(Job).where(*unfinished)).all():
                if not is_private(job.params.get("tags") or {}):
                    params = {**job.params, "tags": {**(job.params.get("tags") or {}), PRIVACY_TAG: PRIVACY_LOCAL}}
                    s.execute(update(Job).where(col(Job.id) == job.id, *unfinished).values(params=params))
        with self.db.session() as s:
            queued = s.exec(select(Job).where(col(Job.project_id) == project_id, col(Job.status) == "queued")).all()
        why = f"canceled before it started: the project's policy '{policy}' keeps its work on this machine"
        canceled = []
        for job in queued:
            if leaving(job):
                with contextlib.suppress(JobFinished, NotFound):  # ended meanwhile (a user's cancel, its run)
                    if self.cancel_queued(job.id, why=why):
                        canceled.append(job.id)
        return canceled

    def cancel_queued(self, job_id: str, *, why: str | None = None) -> bool:
        """Cancel a job no worker holds; False when it is not queued any more. `why` (the error's
        message) says by default whether it had run before (queued again after a stop or a crash)."""
        with self.db.transaction() as s:
            now = utcnow()
            job = s.get(Job, job_id)
            if job is None:
                raise not_found("job", "job_id", job_id)
            if job.status in ("succeeded", "failed", "canceled"):
                raise JobFinished(f"job '{job_id}' already {job.status}", details={"status": job.status})
            if job.status != "queued":
                return False
            if why is None:
                # Queued again after its worker stopped or died, or moved to another engine: it had
                # started. (A claim a stop gave back before it started is an attempt that did not.)
                ran = any(((a.get("error") or {}).get("details") or {}).get("started") is not False
                          for a in job.attempts or [])
                why = "canceled while queued to run again" if ran else "canceled before it started"
            error = Canceled(why).to_dict()
            result = s.execute(update(Job).where(col(Job.id) == job_id, col(Job.status) == "queued").values(
                status="canceled", finished_at=now, error=error))
            if changed(result) != 1:
                # Claimed after our read: serialised writes rule it out today, but should it happen
                # the job runs, so its hold stays and the caller cancels it as a running job.
                return False
            self.ledger.settle_unstarted(s, job, note=why)
            webhooks.job_ended(s, job_id, job.project_id, "canceled")
        # Its end in the service's log as a running job's is: only the access log had it.
        log.info("job %s canceled while queued for %s: %s", job_id, job.engine, why)
        # A half-open circuit's probe, canceled before it ran: no verdict, so the next may go (it
        # held the engine for the whole cooldown).
        self.router.health.finished(job.engine, job_id)
        tell_end(self.bus, job, "canceled", error)
        return True

    def record_cancel(self, job_id: str) -> bool:
        """Note a cancel of a running job this process holds, before its token is set: should the
        process die before the job ends, recovery ends it canceled instead of running it again.
        False when the job is not running any more (back in the queue, or finished)."""
        with self.db.transaction() as s:
            result = s.execute(update(Job).where(col(Job.id) == job_id, col(Job.status) == "running")
                               .values(cancel_requested_at=utcnow()))
            return changed(result) == 1

    def ask_holder_to_cancel(self, job_id: str) -> bool:
        """Ask the live process that holds a running job (an `orchestrator worker`, another server)
        to cancel it; False when no live holder has it. The holder sees the request when its bell
        rings (or at its next look), stops the job and settles it as its own cancel; its success, should
        it finish first, yields to the request (see `orchestrator.runner`)."""
        with self.db.transaction() as s:
            now = shared_now()  # the clock leases are stamped by (the database's, on PostgreSQL)
            job = s.get(Job, job_id)
            if job is None or job.status != "running" or not self._held_live(job, now):
                return False
            result = s.execute(update(Job).where(col(Job.id) == job_id, col(Job.attempt) == job.attempt,
                                                 col(Job.status) == "running").values(cancel_requested_at=now))
            return changed(result) == 1

    def _held_live(self, job: Job, now: datetime) -> bool:
        """Whether a live process holds the running job: one whose lease runs and who lives, or
        one of this machine whose owner lock is held, whatever its lease says (a wall clock's step
        or a renewal waiting for the write lock runs a lease out; see `Scheduler._orphans`)."""
        if self.presence.locked(job.lease_owner):
            return True
        return (job.lease_expires_at is not None and job.lease_expires_at > now
                and self.presence.alive(job.lease_owner))

    def device_state(self, s: Session, project: Project) -> DeviceTime | None:
        """The project's device time as admission judges it (`device_time.state`)."""
        # Running leases judged by the clock they were stamped with, as recovery judges them: the
        # routing, a project's read and /metrics read outside a write transaction, where
        # `shared_now()` is this host's (an hour behind the database's, a running attempt read 0).
        registry = self.router.registry
        return device_time.state(s, project, self.default_local_seconds,
                                 local=device_time.local_engines(registry), lease=self.lease,
                                 leased_now=self.db.now(), told=device_time.telling_engines(registry))

    def device_used(self, s: Session, project_ids: list[str]) -> dict[str, float]:
        """Each project's device-seconds as admission counts them (`device_time.used_by`)."""
        registry = self.router.registry
        return device_time.used_by(s, project_ids, local=device_time.local_engines(registry),
                                   lease=self.lease, leased_now=self.db.now(),
                                   told=device_time.telling_engines(registry))

    def cancel_orphan(self, job_id: str) -> bool:
        """Cancel a running job whose worker is gone; False when it is back in the queue (a
        recovery or a fallback moved it meanwhile)."""
        error = Canceled("canceled; its worker was gone").to_dict()
        # The images its worker stored before it died, made and paid for (`orchestrator.adopt`), are
        # kept as recovery keeps them for a canceled job: checked against their sha256 before the
        # write lock is taken, and adopted only for the attempt read then.
        with self.db.session() as s:
            seen = s.get(Job, job_id)
        adoption = (Adoption.of(seen, self.store.intact, canceled=True)
                    if seen is not None and seen.status == "running" and seen.stored_images else None)
        adopted: list[str] | None = None
        with self.db.transaction() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise not_found("job", "job_id", job_id)
            if job.status == "running" and self._held_live(job, shared_now()):
                return False  # its holder renewed since the look: it is asked instead, at the next try
            running = update(Job).where(col(Job.id) == job_id, col(Job.status) == "running",
                                        col(Job.attempt) == job.attempt)
            values = {"status": "canceled", "finished_at": utcnow(), **NO_LEASE, "stored_images": None,
                      "error": error, "attempts": job.with_attempt("canceled", error)}
            # What the gone worker's attempt surely held of a local device counts toward its
            # project's quota, as recovery counts it (`device_time.held_until_lease`); never charged.
            registry = self.router.registry
            if job.engine in registry and registry.get(job.engine).kind == "local":
                held = device_time.held_until_lease(job, self.lease)
                if held is not None:
                    values["device_seconds"] = device_time.added(held)
            done = False
            if adoption is not None and adoption.job.attempt == job.attempt:
                done = changed(s.execute(running.values(**adoption.values()))) == 1
                if done:
                    adopted = adoption.write(s, self.ledger)  # its rows, its end's webhook, its charge as made
            elif job.sent_nothing():
                # Its worker vanished before its first paid request: nothing to charge, unless it
                # is alive after all and recording one right now (then the update below).
                done = changed(s.execute(running.where(col(Job.unsent_attempt) == job.attempt).values(**values))) == 1
                if done:
                    self.ledger.release(s, job, note="canceled before its worker sent anything")
            if not done:
                done = changed(s.execute(running.values(**values))) == 1
                if done:
                    # The worker may have reached the provider before it vanished.
                    self.ledger.capture(s, job, None, unreconciled=True, note="canceled while a worker held it")
            if done and adopted is None:
                webhooks.job_ended(s, job_id, job.project_id, "canceled")
        if adopted is not None:
            log.info("job %s canceled; its worker %s was gone, and the %d image(s) it stored are kept", job_id,
                     job.lease_owner, len(adopted))
            self._tell_adopted(job_id, adopted)
            return True
        if done:
            log.info("job %s canceled; its worker %s was gone", job_id, job.lease_owner)
            tell_end(self.bus, job, "canceled", error)
            return True
        job = self.get(job_id)
        if job.status in ("queued", "running"):
            return False
        raise JobFinished(f"job '{job_id}' already {job.status}", details={"status": job.status})

    def _tell_adopted(self, job_id: str, asset_ids: list[str]) -> None:
        """A stream this process has of the job is told its kept assets and its end, as recovery's
        adoption tells them (`Scheduler._tell_adopted`). Safe from any thread."""
        loop = self.bus.loop
        if loop is None:
            return
        with self.db.session() as s:
            ended = s.get(Job, job_id)
        if ended is None:
            return

        def tell() -> None:
            if self.bus.view(job_id) is not None:
                catch_up(self.bus, ended, asset_ids)

        if on_loop(loop):
            tell()
        else:
            loop.call_soon_threadsafe(tell)


def asset_ids_in(s: Session, job_ids: list[str]) -> dict[str, list[str]]:
    """Each job's assets' ids, in their order."""
    out: dict[str, list[str]] = {j: [] for j in job_ids}
    if not job_ids:
        return out
    rows = s.exec(select(Asset.job_id, Asset.id).where(col(Asset.job_id).in_(job_ids))
                  .order_by(col(Asset.job_id), col(Asset.index))).all()
    for job_id, asset_id in rows:
        out[job_id].append(asset_id)
    return out


def _stored_tags(tags: dict[str, str]) -> dict[str, str]:
    """A job's tags as requests' are read now. Jobs stored before the privacy key was read loosely
    may spell it `Privacy`: read as written, a private draft's promotion went to the cloud."""
    out = {key: value for key, value in tags.items() if key.strip().lower() != PRIVACY_TAG}
    spelled = [value for key, value in tags.items() if key.strip().lower() == PRIVACY_TAG]
    if spelled:  # two spellings (stored before they were refused): private if either says so
        out[PRIVACY_TAG] = next((value for value in spelled if is_private({PRIVACY_TAG: value})), spelled[0])
    return out


def _seed(requested: int | None, source: Asset) -> dict[str, Any]:
    """The request's seed, else the source's (seed 0 included), else a fresh one, marked drawn
    (any seed answers such a request: the result cache leaves it out)."""
    if requested is not None:
        return {"seed": requested}
    if source.seed is not None:
        return {"seed": source.seed}
    return {"seed": secrets.randbelow(MAX_SEED + 1), "seed_drawn": True}


def _record_caps(decision: Decision, max_credits: float | None) -> Decision:
    """`decision` with the request's cap recorded, on every decision routing makes (a copy's too:
    route/explain and the job show what the client asked): apart from the rule's, as
    `requested_max_credits` (a fallback that follows another rule, `JobRunner._routing_now`, is held
    to that rule's cap and this one, not to the first rule's), and with the rule's own as
    `max_credits`, the lower one (for the fallbacks, see `JobRunner._fall_back`)."""
    decision.extra["requested_max_credits"] = None if max_credits is None else to_credits(to_millicredits(max_credits))
    if max_credits is not None:
        rule_cap = decision.extra.get("max_credits")
        caps = [to_millicredits(max_credits), *([] if rule_cap is None else [to_millicredits(rule_cap)])]
        decision.extra["max_credits"] = to_credits(min(caps))
    return decision


def _within_budget(decision: Decision, balance: Balance) -> bool:
    """Move the choice down the candidates to the first one the budget can hold (a free local
    engine always fits), as the runner's fallback does; True when it moved. With none, the
    request is refused (402) here, so that route/explain says what a submit would."""
    usable = [c for c in decision.candidates if c.skipped is None]
    fitting = next((c for c in usable if balance.fits(c.estimate or 0)), None)
    if fitting is None:
        raise balance.refusal(min(c.estimate or 0 for c in usable))
    if fitting.engine == decision.chosen:
        return False
    left = balance.available or 0
    # Said as a refusal says it (`Balance.refusal`): "0.0 available" hid a window over its limit.
    available = (f"{to_credits(left)} credits available" if left >= 0 else
                 f"none available: {to_credits(-left)} credits over the limit")
    for candidate in usable[:usable.index(fitting)]:
        # Said so for the fallbacks too: room made by the time the choice fails, the policy's
        # preference is tried again (`routing.fallbacks`), held to the budget as it is then.
        candidate.skipped = f"{BUDGET_SKIP} ({available})"
    decision.chosen, decision.estimate = fitting.engine, fitting.estimate or 0
    decision.reason = f"the first candidate the project's budget can hold ({available})"
    # As the router leaves them: usable ones first, in order (the runner falls back through those
    # skipped here first, then the rest: `routing.fallbacks`).
    decision.candidates.sort(key=lambda c: c.skipped is not None)
    return True


def refuse_if_archived(project: Project) -> None:
    """A new job for an archived project is refused: an archive is the studio's word that its
    spending is over (a script still running against it must not go on paying)."""
    if project.archived_at is not None:
        raise ProjectArchived(f"project '{project.id}' is archived and takes no new job; take it back with "
                              "PATCH /v1/projects/{id} {\"archived\": false}",
                              details={"project_id": project.id, "archived_at": iso(project.archived_at)})
