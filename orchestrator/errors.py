"""The one exception tree. Every error a client can see is an `OrchestratorError`; the API maps
it to `{"error": {"code", "message", "details"}}` with `status` in exactly one place (`api/errors.py`).

    OrchestratorError
    ├── InvalidRequest          422 invalid_request   (bad input the schema could not catch)
    │   ├── BadRequest          400 invalid_request   (a body that is not JSON, a NUL in the URL, a foreign Host)
    │   │   └── HeadTooLarge    431 invalid_request   (a request line and headers over 32 KiB: `http_protocol`)
    │   └── NotJSON             415 invalid_request   (a body not sent as JSON)
    ├── Unauthorized            401 unauthorized
    ├── Forbidden               403 forbidden
    ├── NotFound                404 not_found
    ├── MethodNotAllowed        405 method_not_allowed
    ├── PayloadTooLarge         413 payload_too_large (ORCH_MAX_BODY_BYTES)
    ├── ContentUnavailable      500 content_unavailable (an asset's file missing or damaged)
    ├── Conflict                409 conflict
    │   ├── IdempotencyConflict 409 idempotency_conflict
    │   ├── JobFinished         409 job_finished
    │   └── ProjectArchived     409 project_archived
    ├── Gone                    410 gone          (a deleted asset)
    ├── BudgetExceeded          402 budget_exceeded
    ├── DatabaseUnavailable     503 database_unavailable (/readyz; SQLAlchemy's own errors map to it too)
    ├── StorageFull             503 storage_full  (the database's disk, or the data dir's below ORCH_MIN_FREE_DISK_MB)
    ├── StorageQuotaExceeded    507 storage_quota_exceeded (assets and unfinished jobs' bounds over storage_quota_mb)
    ├── ServerStopping          503 server_stopping (a request still open when a stop's wait ran out)
    ├── TooManyJobs             429 rate_limited  (ORCH_MAX_PENDING_JOBS unfinished jobs already)
    ├── TooManyStreams          429 rate_limited  (ORCH_MAX_STREAMS_PER_KEY event streams open already)
    ├── DeviceTimeExhausted     429 device_time_exhausted (local engines' device-seconds over local_seconds_per_day)
    ├── NoRoute                 422 no_route
    │   ├── NoUsableEngine      503 no_route (a rule matched, none of its engines can take it now)
    │   └── NoPrice             422 no_route (a priced engine without a price entry is not routable)
    ├── Interrupted             interrupted (a crash or a stop under a job: a job's error, never an answer's)
    └── EngineError             job errors raised by engines; 503 when surfaced synchronously
        ├── EngineUnavailable   engine_unavailable (missing/invalid key or URL: not retryable)
        ├── RateLimited         rate_limited      (retries exhausted)
        ├── ContentFiltered     content_filtered  (HTTP 200 without an image, moderation)
        ├── NoImage             no_image          (HTTP 200 without an image, for no reason told)
        ├── EngineTimeout       timeout           (sent, no answer: outcome unknown)
        ├── BadEngineInput      invalid_request   (the provider refused our input: never retried)
        ├── ImagesNotStored     storage_full      (made, and the data dir's disk had no room for them)
        ├── NoRoomForImages     storage_full      (not sent, or not rendered: the data dir's disk below its reserve)
        ├── SourceUnavailable   content_unavailable (a bridge or polish's source file, gone since the submit)
        └── Canceled            canceled

The middlewares (`api/request_limits.py`, `api/cross_site.py`, `server.AnswerWhenStopped`) answer
before or after any route, with the same exceptions through the same `api.errors.answer`.

`OrchestratorError.retry_after` is the wait, in seconds, the API tells a client (`Retry-After`);
`EngineError.retryable` says whether routing may fall back to the next engine;
`EngineError.charged` says whether the provider may have billed the call ("no", "unknown", "yes"),
which decides between release and an unreconciled capture in the ledger; `cost_millicredits` is
what the provider reported charging, when it answered before the job failed, or (charged
"unknown") the most it can have charged, for a job that failed before asking for all its images.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.clock import iso

if TYPE_CHECKING:
    from tiers.base import RenderResult

Charged = Literal["no", "unknown", "yes"]


def first_line(exc: BaseException | str, default: str = "") -> str:
    """The first line of an error's text that says anything: a database error's next lines hold
    its SQL and values, and some messages start with a newline. `default` when there is none."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), default)


class OrchestratorError(Exception):
    code = "internal_error"
    status = 500
    retry_after: int | None = None

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if retry_after is not None:
            self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidRequest(OrchestratorError):
    code, status = "invalid_request", 422

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 loc: tuple[str, ...] | None = None) -> None:
        """`loc`: where the request went wrong (`("query", "cursor")`), listed in `details.errors`
        as the schema's own refusals are."""
        if loc is not None:
            details = {**(details or {}), "errors": [{"loc": list(loc), "msg": message, "type": "value_error"}]}
        super().__init__(message, details=details)


class BadRequest(InvalidRequest):
    """A request that could not be read as one: its body is not JSON, its URL holds a NUL, its
    Host names another machine (a DNS rebinding page)."""

    status = 400


class HeadTooLarge(BadRequest):
    """A request line and headers too long to be read (`http_protocol.MAX_HEAD_BYTES`)."""

    status = 431


class NotJSON(InvalidRequest):
    status = 415


class RangeNotSatisfiable(InvalidRequest):
    """A `Range` no byte of the image is in (RFC 9110 15.5.17): answered with `Content-Range:
    bytes */<size>`, which tells the client the image's length."""

    status = 416

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message, details={"size": size}, loc=("header", "Range"))
        self.size = size


class Unauthorized(OrchestratorError):
    code, status = "unauthorized", 401


class Forbidden(OrchestratorError):
    code, status = "forbidden", 403


class NotFound(OrchestratorError):
    code, status = "not_found", 404


class MethodNotAllowed(OrchestratorError):
    code, status = "method_not_allowed", 405


class PayloadTooLarge(OrchestratorError):
    code, status = "payload_too_large", 413


# An id (or a cursor) is echoed in its error up to this length: ours are far shorter, and a
# 5000-character one sent back whole twice (message and details) only fills a client's log.
MAX_SHOWN_ID = 100
# A project key's secret (see `orchestrator.keys`): recognisable in a leaked log or a secret
# scanner, and tells the admin key apart without a lookup.
SECRET_PREFIX = "orch_pk_"
# Anything that starts like a secret, whole or cut short, where text is shown or logged; in a URL
# (an access log's) its underscores may come percent-encoded.
_SECRET_LIKE = re.compile(r"orch(?:_|%5[fF])pk(?:_|%5[fF])[A-Za-z0-9_%-]+")


def mask_secrets(text: str) -> str:
    """`text` with every key's secret in it cut to its prefix (an access log's URL, a message)."""
    return _SECRET_LIKE.sub(SECRET_PREFIX + "…", text)


def shown(text: str) -> str:
    """An id or cursor a client sent, as an error echoes it: a key's secret sent in its place
    masked (a pipeline given `PROJECT=$KEY` had it in every error body, and so in its logs), and
    cut to `MAX_SHOWN_ID` characters."""
    text = mask_secrets(text)
    return text if len(text) <= MAX_SHOWN_ID else text[:MAX_SHOWN_ID] + "…"


def not_found(what: str, field: str, value: str | int) -> NotFound:
    """The 404 of an id that names nothing: `not_found("project", "project_id", project_id)`."""
    text = str(value)
    told = shown(text)
    return NotFound(f"{what} '{told}' not found", details={field: value if told == text else told})


class ContentUnavailable(OrchestratorError):
    """An asset's row is there but its image file is missing from the store, or damaged (its bytes
    do not hash to its sha256): the operator's to restore; `orchestrator check` lists every such file.
    A 500, not a 503: sending the request again changes nothing until someone restores the file."""

    code, status = "content_unavailable", 500


class Conflict(OrchestratorError):
    code, status = "conflict", 409


class Gone(OrchestratorError):
    """An asset deleted through the API: its id stays known (a job, a lineage names it), its
    image is not served any more."""

    code, status = "gone", 410


def gone(asset: Any) -> Gone:
    """The error for a deleted asset (an `orchestrator.models.Asset`)."""
    return Gone(f"asset '{asset.id}' was deleted", details={"asset_id": asset.id, "deleted_at": iso(asset.deleted_at)})


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class JobFinished(Conflict):
    code = "job_finished"


class ProjectArchived(Conflict):
    """A new job asked of an archived project (`PATCH /v1/projects/{id}` with `"archived": true`)."""
    code = "project_archived"


class DeliveryPending(Conflict):
    """A redelivery asked of a webhook delivery that is still to be sent (or being sent)."""
    code = "delivery_pending"


class NoWebhookUrl(Conflict):
    """A redelivery asked of a delivery whose project has no `webhook_url` now: nowhere to send it."""
    code = "no_webhook_url"


class DatabaseUnavailable(OrchestratorError):
    """The database is unavailable for now (busy, restarting, unreachable): nothing was written,
    and asking again may work."""

    code, status = "database_unavailable", 503
    retry_after = 5


class StorageFull(OrchestratorError):
    """The database's disk is full, or a new job was asked while the data dir's disk is below the
    reserve `ORCH_MIN_FREE_DISK_MB` keeps free: nothing was written, and nothing will be until its
    operator makes room."""

    code, status = "storage_full", 503
    retry_after = 60


class StorageQuotaExceeded(OrchestratorError):
    """A new job asked of a project whose live assets hold its `storage_quota_mb` or more, or would
    with what its unfinished jobs and the new one may store: nothing was written or held. Not a
    503: sending it again changes nothing until some of the project's assets are deleted, its jobs
    end or the admin raises its quota, so no `Retry-After` is told."""

    code, status = "storage_quota_exceeded", 507


class ServerStopping(OrchestratorError):
    """The server stopped before the request was finished: sending it again is safe (with the same
    Idempotency-Key for a POST)."""

    code, status = "server_stopping", 503
    retry_after = 1


class BudgetExceeded(OrchestratorError):
    code, status = "budget_exceeded", 402


class TooManyJobs(OrchestratorError):
    """The project already has as many unfinished jobs as `ORCH_MAX_PENDING_JOBS` allows."""

    code, status = "rate_limited", 429
    retry_after = 5  # a guess at how soon some of the project's jobs finish


class DeviceTimeExhausted(OrchestratorError):
    """A new job that only a local engine could take, asked of a project whose local jobs held the
    device for its `local_seconds_per_day` or more over the last 24 hours (`orchestrator.device_time`):
    nothing was written. `Retry-After` says when enough of those seconds are 24 hours old."""

    code, status = "device_time_exhausted", 429


class TooManyStreams(OrchestratorError):
    """The project key already has as many event streams open as `ORCH_MAX_STREAMS_PER_KEY` allows."""

    code, status = "rate_limited", 429
    retry_after = 5


class NoRoute(OrchestratorError):
    code, status = "no_route", 422


class NoUsableEngine(NoRoute):
    """A rule matched but none of its engines can take the request right now."""

    status = 503


class NoPrice(NoRoute):
    """The engine charges money but has no price for this request: never treated as free."""


class EngineError(OrchestratorError):
    code, status = "engine_error", 503
    retryable: bool = True
    charged: Charged = "no"
    # The provider's reported cost of a call that finished before the job failed (images made,
    # then not stored), or with charged "unknown" the most it can have billed: the ledger
    # captures it instead of the estimate.
    cost_millicredits: int | None = None
    # With charged "yes" and no `cost_millicredits`: why the provider's report of the cost could
    # not be read (`RenderResult.cost_unread`). The estimate captured then waits for reconciliation,
    # as it does for a success with that report.
    cost_unread: str | None = None
    # Whether the failure says the engine is unwell (its circuit breaker counts it); a request too
    # large for the device's memory says nothing of the engine's health.
    engine_fault: bool = True
    # What the job's earlier calls made before this failure, made and paid for (a job of n images
    # asked for one call at a time): the runner keeps them as the failed or canceled job's assets.
    made: RenderResult | None = None
    _said_unbilled: bool = False

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retryable: bool | None = None,
        charged: Charged | None = None,
        cost_millicredits: int | None = None,
    ) -> None:
        super().__init__(message, details=details)
        if retryable is not None:
            self.retryable = retryable
        if charged is not None:
            self.charged = charged
        # Whether whoever raised it said what it cost, or left the class's default: a cancel token's
        # own `Canceled` knows nothing of what an engine had sent (see `JobRunner._doubt_a_free_cancel`).
        self.charged_told = charged is not None
        self.cost_millicredits = cost_millicredits

    def unbilled(self) -> EngineError:
        """The provider answered that the job's work there never ran or is a failure it bills not
        (a prediction canceled or aborted before it started, a request taken off its queue): believed
        even of work an earlier process sent, which any other failure leaves charged."""
        self.charged, self.charged_told, self._said_unbilled = "no", True, True
        return self

    @property
    def work_unbilled(self) -> bool:
        """Whether the provider said so (`unbilled`), and nothing since said otherwise (an image of
        the job made before it, `at_least_charged`)."""
        return self._said_unbilled and self.charged == "no"

    def at_least_charged(self, charged: Charged) -> EngineError:
        """Raise what the error says about billing, never lower it ("no" < "unknown" < "yes")."""
        order: list[Charged] = ["no", "unknown", "yes"]
        if order.index(charged) > order.index(self.charged):
            self.charged = charged
        return self


class NoImage(EngineError):
    """The provider answered this prompt without an image (a refusal in words, an empty result):
    the model's answer, not the engine unwell, so its circuit does not count it (an artist retrying
    a borderline prompt opened it for every project)."""
    code = "no_image"
    engine_fault = False


class EngineUnavailable(EngineError):
    code = "engine_unavailable"


class RateLimited(EngineError):
    code, status = "rate_limited", 429


class ContentFiltered(EngineError):
    code, status = "content_filtered", 422
    retryable = False


class EngineTimeout(EngineError):
    code, status = "timeout", 504
    charged: Charged = "unknown"


class BadEngineInput(EngineError):
    code, status = "invalid_request", 422
    retryable = False


class ImagesNotStored(EngineError):
    """The engine made the images and the data dir's disk had no room for them (full, over its
    quota, or mounted read-only), or the service may not write there (its owner or mode): the
    operator's to mend, not the engine's failure."""

    code, status = "storage_full", 503
    retryable = False
    engine_fault = False


class NoRoomForImages(EngineError):
    """A remote job (paid, or a self-hosted server's) claimed while the data dir's disk is below
    `ORCH_MIN_FREE_DISK_MB`: failed before its first request, nothing sent and nothing charged,
    rather than paying for images that could not be stored (`ImagesNotStored`); a local one before
    it renders, rather than holding the device for them. The operator's to mend; no other engine would store them."""

    code, status = "storage_full", 503
    retryable = False
    engine_fault = False


class SourceUnavailable(EngineError):
    """A bridge or polish's source image, accepted at the submit, cannot be read from the store when
    the job runs (gone, unreadable, damaged): the operator's to restore, as `ContentUnavailable`
    says of a request; nothing was sent, and no engine would do better with it."""

    code, status = "content_unavailable", 500
    retryable = False
    engine_fault = False


class Canceled(EngineError):
    code, status = "canceled", 409
    retryable = False


class StoppedPartWay(EngineError):
    """A stop that did not wait ended a job of several paid calls part-way, a later request out
    that nothing can follow: a job's error, told as `Interrupted` is. The images the earlier calls
    made are kept (`made`)."""

    code = "interrupted"
    retryable = False


class Interrupted(OrchestratorError):
    """A job's process stopped under it (a crash, or a stop that queued it again): a job's error
    and an attempt's, never an answer's."""

    code = "interrupted"


class StaleAttempt(Exception):
    """A newer claim owns the job, or another transaction ended it: this attempt's write is
    rolled back and its results discarded. Internal: never an answer's error."""


class HoldSettledMeanwhile(StaleAttempt):
    """A hold read open was settled by another transaction before this one could settle it (a
    stale read: READ COMMITTED reads before a write lock): settling it again would both release
    and capture it. Every settlement runs under the database's write lock, so this only guards
    against a path that does not."""
