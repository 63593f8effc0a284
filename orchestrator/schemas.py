"""Request and response bodies of the REST API (README's *The API at a glance*)."""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticUseDefault
from typing_extensions import TypeAliasType

from orchestrator.control_characters import CONTROL_CHARACTER
from tiers.base import MAX_AMOUNT, MAX_SEED, MILLI, to_credits, to_millicredits, whole_thousandths

# Named aliases: the OpenAPI document gets one schema for each (a generated client one type), not
# an inline enum at every use.
Stage = TypeAliasType("Stage", Literal["ideation", "bridge", "polish"])
Period = TypeAliasType("Period", Literal["day", "week", "month", "none"])
JobStatus = TypeAliasType("JobStatus", Literal["queued", "running", "succeeded", "failed", "canceled"])
DeliveryStatus = TypeAliasType("DeliveryStatus", Literal["pending", "delivered", "failed"])
Quality = TypeAliasType("Quality", Literal["low", "medium", "high"])
GroupBy = TypeAliasType("GroupBy", Literal["day", "engine", "stage", "project"])
T = TypeVar("T")



def _visible(text: str) -> str:
    """A prompt of only zero-width, format or control characters (U+200B, U+FEFF, U+0001) is as
    empty as one of spaces, which `strip_whitespace` already refuses."""
    if all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text):
        raise ValueError("has no visible text")
    return text


def _not_blank(value: Any) -> Any:
    # Stripped first, "   " was told "String should have at least 1 character": three were sent.
    if isinstance(value, str) and value and value.isspace():
        raise ValueError("is only whitespace")
    return value


Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=10000),
                   AfterValidator(_visible), BeforeValidator(_not_blank)]
MAX_TAGS = 64
V = TypeVar("V")


def privacy_key(tags: dict[str, V]) -> dict[str, V]:
    """`Privacy` or ` privacy ` is the privacy tag, stored as `privacy`: a near miss must not send a
    private image to the cloud (values are already read loosely, see `policies.schema.is_private`).
    Requests' tags and policy rules' `match.tags` are read alike."""
    from policies.schema import PRIVACY_TAG  # policies.schema imports this module

    out: dict[str, V] = {}
    for key, value in tags.items():
        name = PRIVACY_TAG if key.strip().lower() == PRIVACY_TAG else key
        if name in out:
            raise ValueError(f"the {PRIVACY_TAG} tag is given twice, spelled differently")
        out[name] = value
    return out


# Bounded in number too: tags are stored with the job and sent back with every read of it and of
# its lists, so thousands of them would weigh on every client of the project.
Tags = Annotated[dict[Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(_visible)],
                      Annotated[str, StringConstraints(max_length=500)]], Field(max_length=MAX_TAGS),
                 AfterValidator(privacy_key)]


def _not_a_bool(value: Any) -> Any:
    # Lax pydantic reads true/false as 1/0: `"guidance_scale": false` would quietly become 0.0.
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    # Before the bounds: NaN fails every comparison, and was refused as "greater than or equal to 0".
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, not {value}")
    # -0.0 passes `ge=0`: kept, it was recorded as "CFG scale: -0.0" and made a retry of the same
    # request under its Idempotency-Key (0 or 0.0 the first time) a different one (409).
    return 0.0 if isinstance(value, float) and value == 0 else value


NoBool = BeforeValidator(_not_a_bool)


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 2.0 as an integer, and so does the API document: a client that computes a
    # size as a float (`512 * 1.5`) sends `768.0`. A fraction is still refused.
    value = _not_a_bool(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


Whole = BeforeValidator(_whole_number)


def _null_is_default(value: Any) -> Any:
    # Many clients send an optional field they never set as null: for a field whose null means
    # nothing else, that is the default, as when it is left out (it was a 422 for some fields and
    # not for others of the same body).
    if value is None:
        raise PydanticUseDefault()
    return value


NullIsDefault = BeforeValidator(_null_is_default)

# Request-level bounds of width/height. An engine may take less: see `Side`'s description.
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 8, 8192, 8
MAX_SCALE = 8  # a polish's largest `scale`
DEFAULT_SCALE = 2.0
_SIDE_DESCRIPTION = (
    f"Pixels: a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, the bounds every request is checked "
    "against. The engine that runs the job may take less: local engines (Lite, local-hifi) take 64 up to "
    "ORCH_LOCAL_MAX_SIZE (2048 by default), and GET /v1/engines tells each engine's `capabilities.max_width` "
    "and `max_height`. A size that no candidate engine takes is refused with 422."
)

Seed = Annotated[int, Whole, Field(ge=0, le=MAX_SEED)]
Side = Annotated[int, Whole, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE),
                 Field(description=_SIDE_DESCRIPTION)]
Steps = Annotated[int, Whole, Field(ge=1, le=150)]
Guidance = Annotated[float, NoBool, Field(ge=0, le=30)]


def _whole_millicredits(value: float) -> float:
    # The ledger counts millicredits: 1.23456 would be stored as 1.235 and 0.0004 as nothing.
    if not whole_thousandths(value):
        raise ValueError("credits have at most 3 decimals (the ledger counts thousandths)")
    # As the ledger counts it: a grant of 0.1 + 0.2 retried with its key as 0.3 was hashed as
    # another request (409), and echoed as 0.30000000000000004.
    return to_credits(to_millicredits(value))


MAX_CREDITS = MAX_AMOUNT // MILLI  # a billion credits: far above any real budget; sums of them fit a BIGINT
Thousandths = AfterValidator(_whole_millicredits)
Credits = Annotated[float, NoBool, Field(ge=0, le=MAX_CREDITS, allow_inf_nan=False,
                                         description="Credits, to the thousandth: at most 3 decimals."), Thousandths]


# NUL: PostgreSQL cannot store it and PNG text chunks end at it. A lone UTF-16 surrogate
# ("\ud800" in JSON, which Python's parser takes) is not Unicode text: it cannot be encoded as
# UTF-8, so storing it fails, and so does any answer that echoes it. A surrogate pair in JSON is
# decoded to one code point, so any surrogate left in a str stands alone.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_NUL_MESSAGE = "contains a NUL character (\\u0000)"
_SURROGATE_MESSAGE = "contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"


def storable(text: str) -> str:
    """`text` with what cannot be stored replaced (U+FFFD): for what a provider names, which no
    one may refuse once its images are made."""
    return _UNSTORABLE.sub("\ufffd", text)


def _unstorable(text: str) -> str | None:
    """Why `text` cannot be stored or answered as it is, or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return _NUL_MESSAGE if found.group() == "\x00" else _SURROGATE_MESSAGE


class FieldError(ValueError):
    """A check of the whole body that found its problem at `loc` (keys and indexes, () for the body
    itself): the error is listed there, as a field's own would be (`orchestrator.api.errors`)."""

    def __init__(self, loc: tuple[str | int, ...], why: str) -> None:
        super().__init__(f"{_dotted(loc) or 'text'} {why}")
        self.loc, self.why = loc, why


class UnstorableText(FieldError):
    """Text a request body holds that cannot be stored: found before the fields are read
    (pydantic's own check of a lone surrogate says less)."""


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(map(str, loc))  # as the API's messages name a place (`tags.k.0`)


def _unstorable_at(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[tuple[str | int, ...], str] | None:
    """Where a JSON value holds text that cannot be stored (() for the value itself) and why, or
    None. The place never includes the offending text: the error message echoes it."""
    if isinstance(value, str):
        return None if (why := _unstorable(value)) is None else (loc, why)
    children: list[tuple[Any, tuple[str | int, ...]]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (why := _unstorable(key)) is not None:
                return loc, why  # the object whose key it is
            children.append((item, (*loc, str(key))))
    elif isinstance(value, list):
        children = [(item, (*loc, i)) for i, item in enumerate(value)]
    for item, where in children:
        if (found := _unstorable_at(item, where)) is not None:
            return found
    return None


# Pydantic's names of numeric limits -> JSON Schema's.
_LIMIT_KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum",
                   "multiple_of": "multipleOf"}
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not")


def _standard_limits(schema: Any) -> None:
    """Rename, in place, limits written under pydantic's names in a field's JSON Schema (and in its
    subschemas: `anyOf` of an optional field, ...) to JSON Schema's keywords."""
    if not isinstance(schema, dict):
        return
    for key in [k for k in schema if k in _LIMIT_KEYWORDS]:
        schema[_LIMIT_KEYWORDS[key]] = schema.pop(key)
    for key in _SUBSCHEMA_LISTS:
        for item in schema.get(key, ()):
            _standard_limits(item)
    for key in _SUBSCHEMAS:
        _standard_limits(schema.get(key))


class Strict(BaseModel):
    """A request body: JSON types are kept (a number sent as a string, or "yes" for true, is a
    422, not a guess), unknown fields are refused, and so is text with NUL characters or lone
    surrogates (see `_UNSTORABLE`; no prompt or name needs one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Fields added since releases hashed a body with every default (`idempotency.Digest.legacy`):
    # the bodies those releases hashed did not have them.
    added_since_whole_hashes: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # A limit behind a validator (`NoBool` before `Field(ge=1)`) is not part of the number's own
        # schema: pydantic checks it in a validator of its own and writes it into the JSON Schema
        # under its Python name (`"ge": 1`), which no client reads. Putting `NoBool` after the limits
        # would fix the document but change which error a request gets (the number's own schema
        # checks `multiple_of` first), so validation stays as it is and the document is renamed here.
        schema = handler.resolve_ref_schema(handler(core_schema))
        for field_schema in schema.get("properties", {}).values():
            _standard_limits(field_schema)
        return schema

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        if (found := _unstorable_at(data)) is not None:
            raise UnstorableText(*found)
        return data


# A name is a label shown in lists, dashboards and CSV exports: control characters (a bell, an
# escape sequence for a terminal) and the bidirectional overrides that make text read otherwise
# than it is stored have no place in one. Prompts are free text and are not held to this.
def _printable(name: str) -> str:
    found = CONTROL_CHARACTER.search(name)
    if found is not None:
        raise ValueError(f"contains U+{ord(found.group()):04X}, a control character, line break or direction mark, "
                         "which a name cannot hold")
    return name


# Nothing but zero-width characters (U+200B, U+FEFF) lists as a project or key without a name.
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                 AfterValidator(_printable), AfterValidator(_visible), BeforeValidator(_not_blank)]


MAX_WEBHOOK_URL_CHARS = 2000


def _webhook_url(url: str) -> str:
    """An absolute http(s) URL with a host and no credentials: a user and password in it would be
    sent in the clear to every log that prints the project (a secret belongs in the receiver's check
    of the signature)."""
    found = CONTROL_CHARACTER.search(url)
    if found is not None:
        raise ValueError(f"contains U+{ord(found.group()):04X}, a control character, line break or direction mark")
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise ValueError(f"is longer than {MAX_WEBHOOK_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user or password")
    try:
        parts.port  # noqa: B018 -- read for its check: a port that is not a number raises
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    # Read again as the deliverer's httpx reads it: `urlsplit` takes " https://..." (it strips the
    # space) and a host that is no IDNA label (`xn--a`), which httpx never sends to.
    try:
        sent = httpx.URL(url)
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise ValueError(f"cannot be sent to: {exc}") from None
    if sent.scheme not in ("http", "https") or not sent.host:
        raise ValueError("must be an absolute http:// or https:// URL")
    return url


WebhookUrl = Annotated[str, AfterValidator(_webhook_url)]
_WEBHOOK_DESCRIPTION = ("Where each of the project's jobs' ends is POSTed (`job.succeeded`, `job.failed`, "
                        "`job.canceled`, signed when ORCH_WEBHOOK_SECRET is set): an absolute `https://` or `http://` "
                        "URL without a user or password, at most 2,000 characters; null: none.")
_JOB_WEBHOOK_DESCRIPTION = (
    "Where this job's end is POSTed (`job.succeeded`, `job.failed`, `job.canceled`), instead of its project's "
    "`webhook_url`: checked as that one is (an absolute `https://` or `http://` URL without a user or password, at "
    "most 2,000 characters), signed alike (when ORCH_WEBHOOK_SECRET is set); null: the project's, if any. With a "
    "project key, only on its project's receiver (the scheme, host and port of the project's `webhook_url`, which the "
    "admin key sets): another, or any when the project has none, is 403 `forbidden`; the admin key may name any.")


# 2**30 MiB is a PiB: past any disk, and within the column's 32-bit integer.
MAX_STORAGE_QUOTA_MB = 2**30
StorageQuotaMb = Annotated[int, Whole, Field(ge=1, le=MAX_STORAGE_QUOTA_MB)]
_QUOTA_DESCRIPTION = ("The most its live (not deleted) assets' files may hold, in MiB (1,048,576 bytes), 1 to "
                      f"{MAX_STORAGE_QUOTA_MB}: a new job is refused (507 `storage_quota_exceeded`) where they, "
                      "the most the project's unfinished jobs' images may take and the most its own may take "
                      "would pass it. Null: no quota.")

# A day of 1024 devices: past it, a typo (`device_time.MAX_LOCAL_SECONDS_PER_DAY`).
MAX_LOCAL_SECONDS_PER_DAY = 86_400 * 1024
LocalSecondsPerDay = Annotated[int, Whole, Field(ge=0, le=MAX_LOCAL_SECONDS_PER_DAY)]
_LOCAL_SECONDS_DESCRIPTION = (
    "The most device-seconds its jobs on local engines (`lite`, `local-hifi`) may have held over the last 24 hours, "
    f"0 to {MAX_LOCAL_SECONDS_PER_DAY}: at or over it, local engines are unavailable to its new jobs (a rule that "
    "lists a cloud engine too routes there), and a job only a local engine may take is refused (429 "
    "`device_time_exhausted`, `Retry-After` when enough of the seconds are 24 hours old). 0: no local work. Jobs "
    "already queued or running are never stopped by it. Null: the server's default "
    "(ORCH_PROJECT_LOCAL_SECONDS_PER_DAY; unset: no limit).")


class Budget(Strict):
    """A budget: at most `limit` credits charged per `period`."""

    limit: Credits | None = Field(None, description=(
        "The most the project's jobs may cost in a window, in credits (at most 3 decimals); null: no limit."))
    period: Period = Field("none", description=(
        "The window the limit is for: a UTC calendar `day`, an ISO `week`, a calendar `month`, or `none` (one window "
        "for all time)."))

    @model_validator(mode="before")
    @classmethod
    def _null_period_is_left_out(cls, data: Any) -> Any:
        # As left out, not as its default written: in a PATCH a left-out period keeps the
        # budget's own (a monthly budget sent `"period": null` became an all-time one).
        if isinstance(data, dict) and "period" in data and data["period"] is None:
            return {key: value for key, value in data.items() if key != "period"}
        return data


class ProjectCreate(Strict):
    """A new project: a name, and optionally its routing policy and budget."""

    name: Name = Field(description="A label for lists, dashboards and exports: 1 to 200 characters, no control "
                                   "characters.", examples=["Lighthouse campaign"])
    policy: str | None = Field(None, description=(
        "The routing policy its jobs are placed by (`GET /v1/policies`); null: the service's default (ORCH_POLICY)."))
    budget: Budget | None = Field(None, description="Its budget; null: no limit.")
    webhook_url: WebhookUrl | None = Field(None, description=_WEBHOOK_DESCRIPTION)
    storage_quota_mb: StorageQuotaMb | None = Field(None, description=_QUOTA_DESCRIPTION)
    local_seconds_per_day: LocalSecondsPerDay | None = Field(None, description=_LOCAL_SECONDS_DESCRIPTION)

    added_since_whole_hashes = frozenset({"webhook_url", "storage_quota_mb", "local_seconds_per_day"})


def _value_only(schema: dict[str, Any]) -> None:
    """The schema of a field that may be left out but not sent as null: its non-null form, no default."""
    options = [option for option in schema.pop("anyOf", []) if option.get("type") != "null"]
    if options:
        schema.update(options[0])
    schema.pop("default", None)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class BudgetUpdate(Budget):
    """A budget's fields to change: those left out keep their value. No default is offered (a
    generated client writes defaults out, and `"period": "none"` sent with a new limit made a
    monthly budget an all-time one)."""

    limit: Credits | None = Field(None, json_schema_extra=_no_default, description=(
        "The most the project's jobs may cost in a window, in credits (at most 3 decimals); null: no limit; left "
        "out: unchanged."))
    period: Period = Field("none", json_schema_extra=_value_only, description=(
        "The window the limit is for: a UTC calendar `day`, an ISO `week`, a calendar `month`, or `none` (one window "
        "for all time); left out (or null): unchanged."))


class ProjectUpdate(Strict):
    """A merge patch: fields left out keep their value, also inside `budget` (changing a monthly
    budget's limit keeps it monthly); `"budget": null` removes the budget."""

    # Null is refused below: the schema offers only a value (or leaving the field out).
    name: Name | None = Field(None, json_schema_extra=_value_only, description="A new name.")
    policy: str | None = Field(None, json_schema_extra=_value_only, description=(
        "Another routing policy (`GET /v1/policies`), for the project's next jobs (and its queued ones, for a "
        "policy that keeps all work local)."))
    budget: BudgetUpdate | None = Field(None, description=(
        "The budget's fields given replace its own (the others stay); null removes the budget (no limit)."))
    archived: bool | None = Field(None, json_schema_extra=_value_only, description=(
        "`true` archives the project: it takes no new job (409 `project_archived`) and `GET /v1/projects` leaves "
        "it out unless asked; its queued and running jobs finish, and its jobs, assets, ledger and spend stay. "
        "`false` takes it back."))
    webhook_url: WebhookUrl | None = Field(None, description=_WEBHOOK_DESCRIPTION + " Null removes it.")
    storage_quota_mb: StorageQuotaMb | None = Field(None, description=_QUOTA_DESCRIPTION + " Null removes it.")
    local_seconds_per_day: LocalSecondsPerDay | None = Field(None, description=(
        _LOCAL_SECONDS_DESCRIPTION + " Null removes its own."))

    @model_validator(mode="after")
    def _required_stay(self) -> ProjectUpdate:
        for name in ("name", "policy", "archived"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise FieldError((name,), "cannot be removed (null); send a new value or leave it out")
        return self


class ProjectBudget(BaseModel):
    """A project's budget as answered: both fields always there (`limit` null: no limit)."""
    limit: float | None = Field(description="Credits its jobs may cost in a window; null: no limit.")
    period: Period = Field(description="The window: a UTC calendar `day`, an ISO `week`, a calendar `month`, or "
                                       "`none` (one window for all time).")


class ProjectPublic(BaseModel):
    """A project: its jobs, assets and ledger, one routing policy and one budget."""

    id: str = Field(description="The project's id (`prj_...`).")
    name: str = Field(description="Its label.")
    policy: str = Field(description="The routing policy its jobs are placed by.")
    budget: ProjectBudget = Field(description="Its budget (`GET .../budget`: what is left of it).")
    created_at: datetime = Field(description="When it was made (RFC 3339, UTC).")
    archived_at: datetime | None = Field(None, description="When it was archived (it takes no new job); null: "
                                                           "it is not.")
    webhook_url: str | None = Field(None, description="Where its jobs' ends are POSTed; null: nowhere.")
    storage_quota_mb: int | None = Field(None, description=(
        "Its own storage quota in MiB (1,048,576 bytes); null: the server's default (ORCH_PROJECT_STORAGE_QUOTA_MB), "
        "if any, applies."))
    storage_quota_bytes: int | None = Field(None, description=(
        "The quota in force, in bytes (its own, else the server's default): new jobs are refused (507 "
        "`storage_quota_exceeded`) while `storage_bytes` is at or over it, or would be with what its unfinished jobs "
        "and the new one may store (`storage_reserved_bytes`); null: no quota."))
    storage_bytes: int = Field(0, description=(
        "The bytes its live (not deleted) assets' files hold, each asset counted whole (identical images too); "
        "assets stored before migration 0029 count once the service's asset sweep has measured them."))
    storage_reserved_bytes: int = Field(0, description=(
        "The most its unfinished (queued, running) jobs' images may still take: held back from its quota, a new "
        "job is refused (507 `storage_quota_exceeded`) when `storage_bytes`, this and the most its own images may "
        "take pass the quota. 0 where no quota is in force."))
    local_seconds_per_day: int | None = Field(None, description=(
        "Its own device-time quota: device-seconds its local jobs may have held over the last 24 hours; null: the "
        "server's default (ORCH_PROJECT_LOCAL_SECONDS_PER_DAY), if any, applies."))
    local_seconds_quota: int | None = Field(None, description=(
        "The device-time quota in force (its own, else the server's default): while `local_seconds_used` is at or "
        "over it, local engines are unavailable to its new jobs, and one only a local engine may take is refused "
        "(429 `device_time_exhausted`); null: no limit."))
    local_seconds_used: float = Field(0.0, description=(
        "The device-seconds its jobs on local engines held over the last 24 hours, counted from each job's end: "
        "every attempt on a local engine, whatever its outcome (a success's as ORCH_LOCAL_GPU_SECOND_CREDITS "
        "meters it; a failed, canceled or interrupted one's as the service measured it, though only a success is "
        "charged); to the millisecond, cut (never rounded up to the quota)."))


_SEED_DESCRIPTION = "The first image's seed; null: a random one, recorded in the job's `params`."
_STEPS_DESCRIPTION = "Denoising steps, 1 to 150; null: the engine's default (`model_defaults` in GET /v1/engines)."
_GUIDANCE_DESCRIPTION = ("How closely to follow the prompt (classifier-free guidance), 0 to 30; null: the engine's "
                         "default.")
# Of the engines a bridge or polish may run on, local-hifi and AUTOMATIC1111 take both, ComfyUI those
# its workflow has a placeholder for, Stability's image-to-image the guidance.
_TAKEN_BY = " Engines that take none (the cloud ones, mostly) leave it out of the image's record."
_ENGINE_DESCRIPTION = ("The engine to run on (GET /v1/engines), where the project's policy allows it; null: the "
                       "policy decides.")
_TAGS_DESCRIPTION = ("Labels kept with the job, at most 64: policy rules match on them, and `privacy: local` keeps "
                     "the work on this machine.")
_INHERITED_TAGS_DESCRIPTION = _TAGS_DESCRIPTION + " Added to the source's job's tags, which the job carries too."
_CACHE_DESCRIPTION = ("For a paid engine: `true` answers a request identical to an earlier one of the project that "
                      "succeeded with copies of its images, charging nothing; `false` always renders anew.")
_MAX_CREDITS_DESCRIPTION = ("The most this job may cost, in credits: refused (402 `budget_exceeded`) when the "
                            "estimate is higher; null: only the budget limits it.")
_SIDE_BOUNDS = f"a multiple of {SIDE_MULTIPLE}, {MIN_SIDE} to {MAX_SIDE}, within the engine's limits"
_KEEPS_ASPECT = "or the one that keeps the source's aspect ratio when only `{other}` is given"
_PROMOTE_SIDE = "The image's {side} in pixels ({bounds}); null: the source's, {keeps}."
_POLISH_SIDE = "The image's {side} in pixels ({bounds}), in place of `scale`; null: set by `scale`, {keeps}."


def _side_description(template: str, side: str, other: str) -> str:
    return template.format(side=side, bounds=_SIDE_BOUNDS, keeps=_KEEPS_ASPECT.format(other=other))


class DraftCreate(Strict):
    """Drafts of a prompt (stage `ideation`); every field but `prompt` has a default."""

    added_since_whole_hashes = frozenset({"webhook_url"})

    prompt: Prompt = Field(description="What to draw: 1 to 10,000 characters.", examples=["a lighthouse at dusk"])
    negative_prompt: Annotated[str, StringConstraints(max_length=10000), NullIsDefault] = Field(
        "", description="What to keep out of the image; empty: nothing.")
    n: Annotated[int, Whole, Field(ge=1, le=16), NullIsDefault] = Field(
        4, description="How many drafts, 1 to 16: image i is seeded `seed + i`.")
    seed: Seed | None = Field(None, description=_SEED_DESCRIPTION)
    width: Annotated[Side, NullIsDefault] = 512
    height: Annotated[Side, NullIsDefault] = 512
    steps: Steps | None = Field(None, description=_STEPS_DESCRIPTION)
    guidance_scale: Guidance | None = Field(None, description=_GUIDANCE_DESCRIPTION)
    engine: str | None = Field(None, description=_ENGINE_DESCRIPTION)
    tags: Annotated[Tags, NullIsDefault] = Field(default_factory=dict, description=_TAGS_DESCRIPTION)
    cache: Annotated[bool, NullIsDefault] = Field(True, description=_CACHE_DESCRIPTION)
    webhook_url: WebhookUrl | None = Field(None, description=_JOB_WEBHOOK_DESCRIPTION)

    @field_validator("seed")
    @classmethod
    def _seeds_in_range(cls, seed: int | None, info: ValidationInfo) -> int | None:
        # Image i of the job uses seed + i; a seed past the maximum could not be asked for again
        # (n=1 with that seed) to reproduce the image. `n` is checked first, being declared first.
        n = info.data.get("n")
        if seed is not None and isinstance(n, int) and seed + n - 1 > MAX_SEED:
            raise ValueError(f"with n={n}, the images use seeds {seed} to {seed + n - 1}, past the largest "
                             f"seed ({MAX_SEED}); give a seed of at most {MAX_SEED - n + 1}")
        return seed


class PromoteCreate(Strict):
    """A promotion of an asset (stage `bridge`); every field has a default, and the body may be left out."""

    added_since_whole_hashes = frozenset({"guidance_scale", "webhook_url"})

    prompt: Prompt | None = Field(None, description="What to draw; null: the source asset's prompt.")
    negative_prompt: Annotated[str, StringConstraints(max_length=10000)] | None = Field(None, description=(
        "What to keep out of the image; null: the one the source was asked with."))
    strength: Annotated[float, NoBool, Field(ge=0.01, le=1), NullIsDefault] = Field(0.55, description=(
        "How far the image may move from the source, 0.01 to 1 (image-to-image strength)."))
    width: Side | None = Field(None, description=_side_description(_PROMOTE_SIDE, "width", "height"))
    height: Side | None = Field(None, description=_side_description(_PROMOTE_SIDE, "height", "width"))
    quality: Annotated[Quality, NullIsDefault] = Field("high", description=(
        "`low`, `medium` or `high`, for engines that offer (and price) tiers of quality."))
    seed: Seed | None = Field(None, description="The image's seed; null: the source's (or a random one, recorded).")
    steps: Steps | None = Field(None, description=_STEPS_DESCRIPTION + _TAKEN_BY)
    guidance_scale: Guidance | None = Field(None, description=_GUIDANCE_DESCRIPTION + _TAKEN_BY)
    engine: str | None = Field(None, description=_ENGINE_DESCRIPTION)
    max_credits: Credits | None = Field(None, description=_MAX_CREDITS_DESCRIPTION)
    tags: Annotated[Tags, NullIsDefault] = Field(default_factory=dict, description=_INHERITED_TAGS_DESCRIPTION)
    cache: Annotated[bool, NullIsDefault] = Field(True, description=_CACHE_DESCRIPTION)
    webhook_url: WebhookUrl | None = Field(None, description=_JOB_WEBHOOK_DESCRIPTION)


class PolishCreate(Strict):
    """The final render of an asset (stage `polish`); every field has a default, and the body may be left out."""

    added_since_whole_hashes = frozenset({"steps", "guidance_scale", "webhook_url"})

    # 2.0, not 2: a default is not validated, and the int would make the result cache (which keys on
    # the request as JSON) tell a request without `scale` from one with `"scale": 2`, charging both.
    scale: Annotated[float, NoBool, Field(gt=0, le=MAX_SCALE)] | None = Field(
        DEFAULT_SCALE, description="the output size over the source's; null with no width/height keeps the source's "
                                   "size (a refine without upscaling); with width/height, the size decides (only "
                                   "this default may be sent beside them)")
    width: Side | None = Field(None, description=_side_description(_POLISH_SIDE, "width", "height"))
    height: Side | None = Field(None, description=_side_description(_POLISH_SIDE, "height", "width"))
    prompt: Prompt | None = Field(None, description="What to draw; null: the source asset's prompt.")
    creativity: Annotated[float, NoBool, Field(ge=0.01, le=1), NullIsDefault] = Field(0.3, description=(
        "How far the engine may stray from the source, 0.01 to 1."))
    seed: Seed | None = Field(None, description="The image's seed; null: the source's (or a random one, recorded).")
    steps: Steps | None = Field(None, description=_STEPS_DESCRIPTION + _TAKEN_BY)
    guidance_scale: Guidance | None = Field(None, description=_GUIDANCE_DESCRIPTION + _TAKEN_BY)
    engine: str | None = Field(None, description=_ENGINE_DESCRIPTION)
    max_credits: Credits | None = Field(None, description=_MAX_CREDITS_DESCRIPTION)
    tags: Annotated[Tags, NullIsDefault] = Field(default_factory=dict, description=_INHERITED_TAGS_DESCRIPTION)
    cache: Annotated[bool, NullIsDefault] = Field(True, description=_CACHE_DESCRIPTION)
    webhook_url: WebhookUrl | None = Field(None, description=_JOB_WEBHOOK_DESCRIPTION)

    @model_validator(mode="after")
    def _scale_or_size(self) -> PolishCreate:
        # Both given: one would be dropped without a word. The default written out is the default
        # left out (a generated client sends it with every body): the size decides.
        if ("scale" in self.model_fields_set and self.scale not in (None, DEFAULT_SCALE)
                and (self.width or self.height)):
            raise ValueError("give either scale or width/height, not both")
        return self


class Progress(BaseModel):
    """How far the job's engine has got: a progress bar's numbers."""

    step: int = Field(description="Steps done.")
    total: int = Field(description="Steps in all; 0 until the job starts.")
    fraction: float = Field(description="`step / total`, 0 to 1 (0 until the job starts, 1 once it succeeded).")


class EngineCost(BaseModel):
    """One engine's share of a job's ledger entries, in credits."""

    engine: str | None = Field(description="The engine its entries name.")
    estimated: float = Field(description="Held for the job on this engine: its estimate when the job was moved "
                             "to it (0 where nothing was held: free work, a copy).")
    held: float = Field(description="Of that, still held (the job runs or waits on it).")
    charged: float = Field(description="Charged on it: captures and reconciling adjustments, metered local work "
                           "included.")
    released: float = Field(description="Released: what it held and did not charge (all of it for an engine that "
                            "failed before it billed, and the job then fell back).")


class Cost(BaseModel):
    """What the job costs, in credits."""

    estimated: float = Field(description="The estimate of the engine it runs (or ran last) on, held against the "
                             "budget: the routing's when the job was made, the fallback's after it moved to another "
                             "engine. What each engine tried was held and charged is in `engines`.")
    held: float = Field(description="Still held for it: 0 once the job ended (the hold is captured or released).")
    charged: float = Field(description="Charged: what it cost, on every engine it was tried on (0 for a cache hit, "
                           "and for local work unless ORCH_LOCAL_GPU_SECOND_CREDITS meters it).")
    cache_hit: bool = Field(description="It copied an identical earlier job's result, for nothing.")
    engines: list[EngineCost] = Field(default_factory=list, description=(
        "Its ledger entries by engine, in the order it was tried on them (one for a job that never fell back; "
        "none for a job without ledger entries, such as a free local draft or a cached copy): their `held` and "
        "`charged` add up to the job's, to the "
        "thousandth, and to what the project's ledger, budget, spend report and /metrics count for it."))


class ErrorBody(BaseModel):
    """An error: its code, a sentence, and facts."""

    code: str = Field(description=(
        "What went wrong, for code to act on: `invalid_request` (422, 400, 415), `unauthorized` (401), "
        "`forbidden` (403), `not_found` (404), `method_not_allowed` (405), `conflict`, `idempotency_conflict`, "
        "`job_finished`, `project_archived`, `delivery_pending`, `no_webhook_url` (409), "
        "`gone` (410: a deleted asset), `payload_too_large` (413), "
        "`budget_exceeded` (402), `no_route` (422, 503), "
        "`rate_limited` (429), `device_time_exhausted` (429: the project's local jobs held the device for its "
        "`local_seconds_per_day` over the last 24 hours), `engine_unavailable`, `database_unavailable`, "
        "`storage_full`, `server_stopping` "
        "(503: send again), `storage_quota_exceeded` (507: the project's assets, with what its unfinished jobs "
        "and this one may store, pass its storage quota), "
        "`content_unavailable` (500: an asset's file is missing or damaged; a job's: its source's), "
        "`internal_error` (500). A job's `error` also uses `content_filtered`, `no_image`, `engine_error`, `timeout`, "
        "`canceled`, `interrupted`. More may come: read one you do not know by the answer's HTTP status."))
    message: str = Field(description="What went wrong and what to do, for people; its wording may change: act on "
                                     "`code`.")
    details: dict[str, Any] = Field(default_factory=dict, description=(
        "Facts for code, by error: `errors` (each with `loc`, `msg` and `type`) for invalid input, `candidates` "
        "when no engine may take a request, the ids, limits and amounts concerned."))


class ErrorResponse(BaseModel):
    """Every error the API answers: `{"error": {"code", "message", "details"}}`."""

    error: ErrorBody = Field(description="What went wrong.")


class RouteCandidate(BaseModel):
    model_config = ConfigDict(extra="allow")

    engine: str = Field(description="The engine's name, as `GET /v1/engines` lists it.")
    estimate: float | None = Field(None, description="credits it would hold; null where it could not be priced")
    skipped: str | None = Field(None, description="why it is left out; null: usable, tried in this order")


class Routing(BaseModel):
    """A routing decision, as a job records it (and route/explain shows it)."""

    model_config = ConfigDict(extra="allow")

    policy: str | None = Field(None, description="The routing policy that decided: the project's.")
    policy_hash: str | None = Field(None, description="the policy file's content hash when it decided")
    rule: str | None = Field(None, description="the policy rule that matched")
    reason: str | None = Field(None, description=(
        "Why the first choice: the rule's `reason`, else its strategy's, or `requested by the client` when the "
        "request named an engine."))
    private: bool | None = Field(None, description="the request was kept on this machine (a privacy tag)")
    chosen: str | None = Field(None, description="the engine it chose first")
    estimate: float | None = Field(None, description="credits the first choice would hold")
    candidates: list[RouteCandidate] = Field(default_factory=list,
                                             description="every engine the rule names, usable ones first")
    rule_index: int | None = Field(None, description=(
        "The matched rule's position in the policy, counting from 1; null in a decision recorded without it."))
    strategy: str | None = Field(None, description="the rule's ordering: cheapest, fastest, ... (see README)")
    max_credits: float | None = Field(None, description=(
        "the most the job may hold: the lower of the request's max_credits and the rule's; a fallback "
        "priced above it is skipped"))


class Attempt(BaseModel):
    """One engine's try at a job; a job that fell back has several."""

    model_config = ConfigDict(extra="allow")

    engine: str = Field(description="The engine that tried.")
    status: str = Field(description="`succeeded`, `failed`, `canceled` or `interrupted` (its process stopped)")
    error: ErrorBody | None = Field(None, description="why it did not succeed; null when it did")


class JobPublic(BaseModel):
    """A job: one stage's request, the engine it runs on, its progress, images and cost."""

    id: str = Field(description="The job's id (`job_...`).")
    project_id: str = Field(description="The project it belongs to.")
    stage: Stage = Field(description="`ideation` (drafts), `bridge` (a promotion) or `polish`.")
    engine: str = Field(description="The engine it runs on; after a fallback, the one it moved to.")
    model: str | None = Field(description="The engine's model, by name; null where it names none.")
    status: JobStatus = Field(description="`queued`, `running`, then one of `succeeded`, `failed` or `canceled`.")
    params: dict[str, Any] = Field(description="The request as the job runs it: prompt, seed, size, steps, tags, ...")
    progress: Progress = Field(description="How far it has got.")
    assets: list[str] = Field(description="The ids of the images it made, in order (image i has seed `seed + i`).")
    source_asset_id: str | None = Field(description="The asset a bridge or polish starts from; null for drafts.")
    error: ErrorBody | None = Field(description="Why it failed or was canceled; null otherwise.")
    cost: Cost = Field(description="What it is estimated to cost, holds and was charged, in credits.")
    routing: Routing | None = Field(description="The routing decision that placed it: policy, rule, candidates.")
    attempts: list[Attempt] = Field(description="Each engine's try, in order: more than one after a fallback.")
    # What the provider calls the request (its id, or ids for a job of several calls): for
    # reconciling an invoice or asking the provider about the job. Null for local work.
    provider_request_id: str | None = Field(None, description=(
        "The provider's id of the request (ids, for several calls), for reconciling an invoice or asking the "
        "provider about the job; null for local work."))
    created_at: datetime = Field(description="When it was made (RFC 3339, UTC).")
    started_at: datetime | None = Field(description="When an engine started it; null until then.")
    finished_at: datetime | None = Field(description="When it ended; null until then.")
    webhook_url: str | None = Field(None, description=(
        "Where its end is POSTed, as its request gave it; null: its project's `webhook_url` as it ends, if any."))


class AssetPublic(BaseModel):
    """An image: what made it and from what (its lineage), and where its bytes are."""

    id: str = Field(description="The asset's id (`ast_...`).")
    project_id: str = Field(description="The project it belongs to.")
    job_id: str = Field(description="The job that made it.")
    stage: Stage = Field(description="The stage of that job.")
    parent_id: str | None = Field(description="The asset it was made from (a bridge's or polish's source); null for "
                                              "a draft.")
    engine: str = Field(description="The engine that made it.")
    model: str = Field(description="The engine's model, by name.")
    prompt: str = Field(description="The prompt it was made with.")
    negative_prompt: str = Field(description="The negative prompt the engine was given (empty: none).")
    seed: int | None = Field(description="Its seed: the same request with it makes the same image on a local "
                                         "engine; null where the engine takes none.")
    width: int = Field(description="Pixels.")
    height: int = Field(description="Pixels.")
    sha256: str = Field(description="The SHA-256 of its PNG, in hex: also its content's ETag.")
    created_at: datetime = Field(description="When it was made (RFC 3339, UTC).")
    content_url: str = Field(description="Where its PNG is: `/v1/assets/{id}/content`.")
    record: dict[str, Any] = Field(description="the whole generation record (steps, guidance, sampler, "
                                   "strength, ...), as the PNG's `orchestrator` chunk holds it")
    deleted_at: datetime | None = Field(None, description="when it was deleted (`DELETE /v1/assets/{id}`): only "
                                        "a lineage lists a deleted asset, whose content is then 410 `gone`")


class Lineage(BaseModel):
    """An asset's chain: what it was made from, and what was made from it."""

    asset: AssetPublic = Field(description="the asset asked about: the chain is ancestors, it, descendants")
    ancestors: list[AssetPublic] = Field(description="What it was made from, root first (draft, bridge, ...).")
    descendants: list[AssetPublic] = Field(description="What was made from it, breadth first.")
    truncated: bool = Field(False, description="true when the walk stopped at its bounds (100 ancestors, "
                                               "1000 descendants, or descendants whose prompts and records pass "
                                               "4 MiB): the lists are not the whole lineage")


class WebhookDeliveryPublic(BaseModel):
    """A job's end as its project's webhook gets it (see the README's Webhooks): where it goes, and
    how its attempts went."""

    id: str = Field(description="The delivery's id (`whd_...`): the `webhook-id` header its receiver got, the same "
                                "at every attempt and redelivery (receivers dedupe by it).")
    project_id: str = Field(description="The project of its job.")
    job_id: str = Field(description="The job whose end it tells.")
    type: str = Field(description="The body's `type`: `job.succeeded`, `job.failed` or `job.canceled`.")
    url: str = Field(description="Where it is POSTed: the job's own `webhook_url`, else the project's as the job "
                                 "ended, or as it was redelivered.")
    status: DeliveryStatus = Field(description=(
        "`pending`: to be sent, or tried again at `next_attempt_at` (`POST /v1/webhook-deliveries/{id}/redeliver` "
        "brings that forward to now); `delivered`: a 2xx answer came; `failed`: given up after its last attempt, or "
        "unsent once past its retry schedule while its destination was set aside (`POST /v1/webhook-deliveries/{id}/"
        "redeliver` sends it again)."))
    attempts: int = Field(description="Attempts made since it was made or last redelivered.")
    last_error: str | None = Field(description=(
        "Why the latest failed attempt failed: `answered 503` (the receiver's status), or the exception "
        "(`ConnectError: ...`, `TimeoutError`); for one given up unsent, `not sent: ...` with its destination's "
        "last failed attempt; null when none failed."))
    next_attempt_at: datetime | None = Field(description=(
        "When it is sent next (pending only; while a process is sending it, when that send's claim ends); null "
        "once delivered or given up."))
    created_at: datetime = Field(description="When it was made: as the job ended (RFC 3339, UTC).")
    delivered_at: datetime | None = Field(description="When a 2xx answer came; null until then.")
    redelivered_at: datetime | None = Field(description="When it was last redelivered; null: never.")


def _page_title(model: type[BaseModel]) -> str:
    """`AssetPage` for `Page[AssetPublic]`: its schema's title, and its name in the API document
    (`orchestrator.api.docs.clean_schema_names`), in place of pydantic's `Page_AssetPublic_`."""
    generic = model.__pydantic_generic_metadata__
    if generic["origin"] is None or not generic["args"]:
        return model.__name__
    return "".join(getattr(arg, "__name__", str(arg)).removesuffix("Public") for arg in generic["args"]) + "Page"


class Page(BaseModel, Generic[T]):
    """A page of a list: pass `next_cursor` back as `cursor` for the next one, until it is null."""

    model_config = ConfigDict(model_title_generator=_page_title, json_schema_extra={
        "description": "A page of a list: pass `next_cursor` back as `cursor` for the next one, until it is null."})

    items: list[T] = Field(description="This page's items, in the list's order.")
    next_cursor: str | None = Field(description="The `cursor` of the next page; null on the last one.")


class PolicySummary(BaseModel):
    name: str = Field(description="The policy's name: what a project's `policy` names.")
    description: str = Field(description="What the policy is for, in its file's words (empty when it says none).")
    source: str = Field(description="the file it was read from, or `builtin`")
    content_hash: str = Field(description=(
        "The first 16 hex digits of its file's SHA-256: it changes with the file, and a job's "
        "`routing.policy_hash` records it."))


class PolicyDetail(PolicySummary):
    rules: list[dict[str, Any]] = Field(description="the `[[rules]]` tables as loaded, in the order they are "
                                                    "tried; each named (`rule N` when the file gives no name)")


class PolicyList(Page[PolicySummary]):
    errors: list[str] = Field(description="the policy files the last load refused, with why")
    warnings: list[str] = Field(description="what loaded but cannot route as written (an engine this service lacks)")


class PolicyReload(BaseModel):
    loaded: list[str] = Field(description="The names of the policies in service after the reload, sorted.")
    errors: list[str] = Field(description=(
        "The policy files this reload refused, each with why; a refused policy keeps its last good version."))
    warnings: list[str] = Field(description=(
        "What loaded but may not route as written: an engine this service lacks, a rule that refuses every "
        "request it matches, or one an earlier rule hides."))


class RouteExplanation(BaseModel):
    project_id: str = Field(description=(
        "The project the job would belong to: the request's, or the source asset's for `bridge` and `polish`."))
    stage: Stage = Field(description="The stage explained, as the request named it.")
    engine: str = Field(description="the engine the job would run on first")
    estimate: float = Field(description="credits the job would hold (0 for a cache hit)")
    cache_hit: bool = Field(description="an identical earlier job's result would be copied, for nothing")
    routing: Routing = Field(description="the decision as a job records it: policy, rule, candidates "
                                         "in the order they would be tried, and why others were skipped")
    params: dict[str, Any] = Field(description="the request as the job would store it")


class EnginePublic(BaseModel):
    """An engine jobs can be routed to, and whether it can take them now."""

    name: str = Field(description="What requests (`engine`) and policy rules call it.")
    kind: Literal["local", "remote"] = Field(description="`local`: runs on this machine; `remote`: a provider's API "
                                                         "or a self-hosted server.")
    stages: list[Stage] = Field(description="The stages it serves.")
    available: bool = Field(description="Whether it can take jobs: set up (a key, a URL, a model) and loaded.")
    health: Literal["ok", "degraded", "open"] = Field(description=(
        "`ok`; `degraded`: it failed lately; `open`: its circuit breaker sends it no jobs for now (its "
        "cooldown, or, past it, none but the one probe this server let through, until its verdict)."))
    model: str | None = Field(description="Its model, by name; null where it names none.")
    note: str | None = Field(description="Why it is unavailable, or a word on its setup.")
    prices: dict[str, Any] = Field(description="Its price table, in credits (`credits_per_image`, `as_of`); empty "
                                               "for a free engine.")
    capabilities: dict[str, Any] = Field(description=(
        "What it can make: `min_side`, `max_width`, `max_height`, `size_multiple`, ...; `max_size_setting`: the "
        "setting that sets `max_width` and `max_height` (`ORCH_LOCAL_MAX_SIZE` for the local engines; null: the "
        "engine's own limit)"))
    model_defaults: dict[str, Any] | None = Field(None, description=(
        "a local engine's: the `steps` and `guidance_scale` a job that names none gets (local-hifi's bridge takes "
        "twice the steps), the `native_size` the model was made for (local-hifi's polish tiles are cut at it; a "
        "draft that names no size is 512 x 512 whatever the model, so ask an SDXL model's at 1024), whether the "
        "model is a `few_step` distilled one, and "
        "what told them (`read_from`): the model's `name`, its `files`, or a `guess` (SD 1.5's) until they do"))


class WorkerPublic(BaseModel):
    owner: str = Field(description="`host:pid:tag`, as jobs' leases name it")
    host: str = Field(description="The host name it runs on (the first part of `owner`).")
    pid: int | None = Field(description="Its process id on that host; null when `owner` names none.")
    this_process: bool = Field(description="Whether it is the process that answered this request.")
    this_machine: bool = Field(description="Whether it runs on the machine that answered (another machine's, on a "
                                           "shared data dir, is listed while it touches its lock file).")
    engines: list[str] = Field(description="The engines whose jobs it runs.")
    devices: list[str] = Field(description="the local devices whose jobs it runs (device lock names; this machine's "
                                           "workers only)")
    running_jobs: list[str] = Field(description="The ids of the jobs it runs now.")


class WorkersPublic(BaseModel):
    items: list[WorkerPublic] = Field(description="processes that run jobs, alive now, of every machine on the "
                                                  "data dir")
    # The list shape every list answers with; the workers of an install are few, so one page holds them.
    next_cursor: None = Field(None, description="always null: every live worker is in this one answer")
    runs_jobs_here: bool = Field(description="whether this API server also runs jobs (ORCH_RUN_JOBS)")
    queued: int = Field(description="jobs waiting for a worker")


class SpendGroup(BaseModel):
    """One row of a spend report."""

    key: str = Field(description="the day (YYYY-MM-DD, UTC), engine, stage or project id of the row (`-` for none)")
    charged: float = Field(description="credits charged, adjustments included")
    unreconciled: float = Field(description="of which still waiting for reconciliation with the invoice (charged at "
                                "the estimate when the outcome was unknown, or as reported when over twice it)")
    unreconciled_entries: int = Field(description="the captures waiting for it: an engine priced 0 has some to "
                                      "check while its `unreconciled` credits read 0")
    jobs: int = Field(description="jobs charged in the row")
    images: int = Field(description="images those jobs made, each counted once: in the row of the engine that made "
                        "it, or, where that engine charged nothing (a free fallback), of the job's latest charge")
    name: str | None = Field(None, description="with `group_by=project`: the project's name")


class SpendSavings(BaseModel):
    """What drafting on the local Lite model saved."""

    drafts: int = Field(description="drafts made in the period")
    credits: float = Field(description="what they would have cost on the cheapest available cloud engine")
    compared_with: str | None = Field(description="that engine; null when none could price them")


class SpendReport(BaseModel):
    """`GET /v1/spend` as JSON (`format=csv` answers the groups and the total as CSV)."""

    group_by: GroupBy = Field(description="what the rows are: days, engines, stages or projects")
    from_: datetime | None = Field(alias="from", description="the window's start, as asked; null: the ledger's start")
    to: datetime | None = Field(description="the window's end (exclusive), as asked; null: no end")
    groups: list[SpendGroup] = Field(description="the rows, by key")
    total: float = Field(description="credits charged in the window, the groups' sum")
    savings: SpendSavings = Field(description="what drafting locally saved in the window")


class Health(BaseModel):
    status: Literal["ok"] = Field(description=(
        "Always `ok` in a 200: the process serves requests (for `/readyz`, its database answers too)."))
    version: str = Field(description="The service's version.")
