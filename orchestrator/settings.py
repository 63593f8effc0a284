"""One settings class, read from `ORCH_*` environment variables (and an optional TOML file).

The remote engines also accept the vendor's usual variable (`GEMINI_API_KEY`, `OPENAI_API_KEY`, ...)
so a studio that already exports them needs no extra configuration.

A name that sets nothing is a typo until shown otherwise: an unknown key in the TOML file is a
configuration error, an unknown `ORCH_*` variable a warning (the prefix is not ours alone), both
with the closest known name. Left unnoticed, `ORCH_ADMIN_KYE` serves /v1 without a key.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import logging
import os
import re
import tomllib
import unicodedata
import urllib.parse
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import httpx
from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticUseDefault
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import URL

from orchestrator.control_characters import CONTROL_CHARACTER
from orchestrator.schemas import MAX_SIDE
from tiers.base import MAX_MODEL_CHARS, MAX_UPSCALER_CHARS, in_kept_quotes

log = logging.getLogger(__name__)
PREFIX = "ORCH_"
# Read with os.environ rather than as a setting: it names the file the settings come from.
CONFIG_FILE_VARIABLE = "ORCH_CONFIG_FILE"
# The longest a duration setting may be: past that, a typo (or `inf`) rather than a wish.
DAY = 86_400.0

Device = Literal["auto", "cpu", "cuda", "mps"]


def http_address(value: str, *, example: str) -> httpx.URL:
    """`value` as an http:// or https:// URL with a host and a TCP port; ValueError saying what is
    wrong otherwise (not repeating the value, which may hold a password)."""
    _, sep, rest = value.partition("://")
    if sep and "@" in rest[len(re.split(r"[/?#]", rest, maxsplit=1)[0]):]:
        # The host ends at the first /, ? or #: `http://u:pa/ss@host:7860` read host `u`, port `pa`
        # ("must be an address with a host"), and `http://u:12/ss@host` was taken, every render sent
        # to host `u`, port 12. An @ in a path is rare enough to be written %40 as well.
        raise ValueError("has an @ after a /, ? or #: a user:password in it must be percent-encoded (/ as %2F, "
                         "? as %3F, # as %23, @ as %40), and so must an @ in its path")
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        url = None
    # A bracket left open (`http://[bad`) became the host "%5Bbad"; an IPv6 zone's % has colons beside it.
    if (url is None or url.scheme not in ("http", "https") or not url.host
            or ("%" in url.host and ":" not in url.host)):
        raise ValueError(f"must be an http:// or https:// address with a host, e.g. {example}")
    if url.port is not None and not 0 < url.port < 65536:
        # The socket layer takes it modulo 65536: 99999 connected to port 34463 without a word.
        raise ValueError(f"has port {url.port}, which is not a TCP port (1-65535)")
    if b"?" in url.raw_path:
        # Each request's path is put after the address's own: `http://h:7860/?token=x` asked
        # `/?token=x/sdapi/v1/txt2img`, the server's root, for every render.
        raise ValueError("has a query (?...), which would end up before every request's path: give the address "
                         "without it")
    return url


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


# The API versions each engine puts before its paths (`tiers/*.py`), refused at a base URL's end.
API_VERSIONS = {"openai_base_url": ("v1",), "replicate_base_url": ("v1",),
                "gemini_base_url": ("v1beta", "v1", "v1alpha"), "stability_base_url": ("v2beta", "v1")}


PROVIDER_KEYS = frozenset({"gemini_api_key", "openai_api_key", "stability_api_key", "replicate_api_key",
                           "fal_api_key"})


# No path, name, address or key holds a control character (`CONTROL_CHARACTER`). Whitespace at a
# value's ends (a CRLF env file's \r, a trailing U+2028) is each setting's own to drop, and is not
# looked at here.
_CONTROL_NAMES = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\x85": "a next line"}
# Settings refusing such characters with their own words (the admin key, the upscaler), or, for a
# provider's key, leaving its engine unavailable (see `tiers._cloud`): its vendor's variable may be
# a shell's, which is no reason to stop every command.
_OWN_CONTROL_CHECK = PROVIDER_KEYS | {"admin_key", "a1111_upscaler"}
# Lists whose items are stripped, so that one item a line (a TOML multi-line string) stays readable.
_COMMA_LISTS = frozenset({"engines", "cors_origins"})


def control_character_problem(text: str) -> str | None:
    """The refusal of a value holding a control character, naming the first without repeating the
    value (it may be a password); None when it holds none."""
    if (found := CONTROL_CHARACTER.search(text)) is None:
        return None
    char = found.group()
    return f"holds a control character (U+{ord(char):04X}{_called(char)}) inside it: remove it"


def _called(char: str) -> str:
    if char in _CONTROL_NAMES:
        return f", {_CONTROL_NAMES[char]}"
    # Unicode names the separators and the direction controls (U+202E is "RIGHT-TO-LEFT OVERRIDE"),
    # which are invisible where the value is shown; C0 and C1 controls have no name but the number.
    name = unicodedata.name(char, "").lower()
    return f", {'an' if name[0] in 'aeiou' else 'a'} {name}" if name else ""


def _refuse_control_characters(value: Any, field: str) -> None:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    elif isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        return
    items = value.split(",") if field in _COMMA_LISTS else [value]
    if field == "engines":
        # `name=module:factory`: the name and its target are each read stripped (`extra_engines`),
        # so a tab around "=" (a file's entries aligned with tabs) is whitespace, as a space is.
        items = [part for item in items for part in item.partition("=")[::2]]
    for item in items:
        if (problem := control_character_problem(item.strip())) is not None:
            # A newline inside a value made a data dir `da\nta`, a checkpoint no webui lists, a line
            # break in the log lines and headers quoting it.
            raise ValueError(problem)


def _refuse_quoted(value: Any) -> None:
    """A value written in quotes that were kept (an env file read without a shell) is refused."""
    if isinstance(value, str) and in_kept_quotes(value):
        raise ValueError(f"is wrapped in {value[0]} quotes, which were kept as part of it (an env file read without "
                         "a shell keeps them): write it without")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        extra="ignore",
        populate_by_name=True,
        # Empty counts as unset too; `~nobody/x.toml` is kept as given (pydantic's expansion raises).
        toml_file=os.path.expanduser(os.environ.get(CONFIG_FILE_VARIABLE) or "orchestrator.toml"),
    )

    data_dir: Path = Path("./.orchestrator")
    # Shared across data dirs: the offline tiny model is built here once per machine.
    cache_dir: Path = Field(default_factory=lambda: Path(os.path.expanduser(os.environ.get("XDG_CACHE_HOME")
                                                                             or "~/.cache")) / "orchestrator")
    # Out of the settings' repr (a crash reporter, a debug print): these URLs may hold a password.
    database_url: str | None = Field(None, repr=False)
    admin_key: SecretStr | None = None
    # The key of projects' webhook signatures (`orchestrator.webhooks`); unset: sent unsigned.
    webhook_secret: SecretStr | None = None
    # Webhook sends at once per process (`orchestrator.webhooks.Deliverer`): at most 2 to one
    # destination, so one that does not answer holds those, not every project's deliveries.
    webhook_concurrency: int = Field(8, ge=1, le=256)

    lite_model: str = "auto"
    lite_device: Device = "auto"
    hifi_model: str | None = None
    # TAESD folder or Hub id for sharper step previews; unset = the free latent-to-RGB approximation.
    lite_preview_vae: str | None = None
    lite_max_batch: int = Field(4, ge=1, le=16)
    # Half precision on CUDA: fp16, or bf16 for GPUs and models that overflow in fp16.
    lite_dtype: Literal["fp16", "bf16"] = "fp16"
    # Load the Lite model when a process that runs jobs starts (and gets the device), so the
    # first draft after a start or deploy does not wait for it.
    lite_preload: bool = False
    # Torch intra-op threads of the inference thread; 0 = every CPU this process may use.
    # At most 1024: torch's thread pool at 100000 crashed the process, and past 2**31 broke the
    # inference thread for good.
    torch_threads: int = Field(0, ge=0, le=1024)
    # Largest width/height a local engine accepts; guards memory on small machines. At most what
    # any request may ask (schemas.MAX_SIDE): above it, /v1/engines told a max_width no request could reach.
    local_max_size: int = Field(2048, ge=64, le=MAX_SIDE)

    # Extra engines without packaging: "name=module:factory,other=module:factory".
    engines: str = ""

    policy: str = "balanced"
    policy_dir: Path | None = None
    prices_file: Path | None = None
    # Credits per GPU-second charged for local engines (0 = local work is free).
    local_gpu_second_credits: float = Field(0.0, ge=0, le=1_000_000, allow_inf_nan=False)

    # Origins whose browser pages may call the API (CORS), comma-separated, as a browser sends them
    # ("https://dash.studio.example", "http://localhost:3000"); "*" for any. Unset: none may.
    cors_origins: str = ""

    # Largest request body accepted (413 above it); every body is a small JSON document.
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Unfinished (queued or running) jobs a project may have; more are refused with 429 (0: no limit).
    max_pending_jobs: int = Field(200, ge=0)
    # Event streams one project key may hold open on a server at once; more are refused with 429
    # (0: no limit). The admin key's, and a service's without keys, are not counted.
    max_streams_per_key: int = Field(64, ge=0)
    # MiB the data dir's filesystem keeps free: below it, new jobs are refused and a claimed paid
    # job is failed before its first request, unsent and uncharged (a cloud engine's images made on
    # a full disk were charged and lost). 256: room for the images of jobs already past the check
    # (a 4096-pixel square's RGB pixels are 48 MiB before PNG's compression), SQLite's journal and
    # the log; 0 turns the check off. At most 1 TiB: past it, a typo.
    min_free_disk_mb: int = Field(256, ge=0, le=1 << 20)
    # MiB a project's live assets may hold where the project sets no `storage_quota_mb` of its own
    # (`orchestrator.quota`); 0: no quota for those. Read at each submit: a change applies to every
    # such project at the next start. At most 2**30 MiB (a PiB), as a project's own.
    project_storage_quota_mb: int = Field(0, ge=0, le=1 << 30)
    # Device-seconds a project's local jobs may have held over the last 24 hours, where the project
    # sets no `local_seconds_per_day` of its own, before a new job only a local engine could take is
    # refused (`orchestrator.device_time`); unset: no limit for those. 0: no local work for them. At
    # most a day of 1024 devices: past it, a typo.
    project_local_seconds_per_day: int | None = Field(None, ge=0, le=86_400 * 1024)

    # Seconds a running job's lease lasts without a heartbeat before the sweeper recovers it.
    # Floored: renewed every third of it, 0.001 kept an idle service's core busy, and each other
    # process read as dead (its presence is stale after three leases).
    lease_seconds: float = Field(60.0, ge=0.5, le=DAY, allow_inf_nan=False)
    # Floored: 1e-9 kept an idle service's core busy (for the poll below too).
    sweep_interval: float = Field(15.0, ge=0.05, le=DAY, allow_inf_nan=False)
    # Seconds a stop waits for paid requests already sent to a provider that nothing could follow
    # after a restart (a synchronous call): they answer and their images are kept and charged,
    # instead of being failed `interrupted` with their estimate captured unreconciled.
    stop_grace: float = Field(120.0, ge=0, le=DAY, allow_inf_nan=False)
    # Days a draft is kept unless something descends from it (`orchestrator.retention`); unset:
    # kept forever. At least a day (a draft just made is still being looked at); past a century, a typo.
    draft_retention_days: int | None = Field(None, ge=1, le=36_500)
    # Days a delivered or given-up webhook delivery is kept (`orchestrator.webhook_deliveries`); 0:
    # kept forever. A pending one is kept whatever its age.
    webhook_retention_days: int = Field(30, ge=0, le=36_500)
    # Whether `serve` also runs jobs; false for API servers in front of `orchestrator worker`s.
    run_jobs: bool = True
    # Seconds between looks at what other processes changed: jobs they queued (for a worker),
    # cancels they asked for (for a job's holder), progress of jobs they run (for an event stream).
    # Their commits ring a bell that makes a process look at once; this look is the fallback.
    poll_interval: float = Field(0.5, ge=0.01, le=60, allow_inf_nan=False)

    gemini_api_key: SecretStr | None = Field(None, validation_alias=_alias("ORCH_GEMINI_API_KEY", "GEMINI_API_KEY"))
    gemini_base_url: str = "https://generativelanguage.googleapis.com"
    gemini_model: str = "gemini-3.1-flash-image"

    openai_api_key: SecretStr | None = Field(None, validation_alias=_alias("ORCH_OPENAI_API_KEY", "OPENAI_API_KEY"))
    openai_base_url: str = "https://api.openai.com"
    openai_model: str = "gpt-image-1.5"

    stability_api_key: SecretStr | None = Field(
        None, validation_alias=_alias("ORCH_STABILITY_API_KEY", "STABILITY_API_KEY")
    )
    stability_base_url: str = "https://api.stability.ai"
    stability_model: str = "sd3.5-large"

    replicate_api_key: SecretStr | None = Field(
        None, validation_alias=_alias("ORCH_REPLICATE_API_KEY", "REPLICATE_API_TOKEN")
    )
    replicate_base_url: str = "https://api.replicate.com"
    replicate_model: str = "google/nano-banana-2"

    fal_api_key: SecretStr | None = Field(None, validation_alias=_alias("ORCH_FAL_API_KEY", "FAL_KEY"))
    fal_base_url: str = "https://queue.fal.run"
    fal_model: str = "fal-ai/nano-banana-2/edit"

    comfyui_url: str | None = Field(None, repr=False)
    comfyui_workflow: Path | None = None
    a1111_url: str | None = Field(None, repr=False)
    a1111_auth: SecretStr | None = None  # "user:password" for --api-auth
    # The checkpoint each render asks for (its title, name or hash); unset = whichever the server has loaded.
    a1111_checkpoint: str | None = None
    # What img2img enlarges a draft with before it denoises (a polish); unset = the server's setting.
    a1111_upscaler: str | None = None
    # Jobs one process sends at once to each of them: they render one at a time, and a job waiting
    # in the server's own queue runs out its deadline there, out of reach of a cancel (A1111).
    self_hosted_concurrency: int = Field(1, ge=1, le=64)

    # Total seconds a remote call may take, retries and polling included.
    remote_deadline: float = Field(300.0, gt=0, le=DAY, allow_inf_nan=False)
    remote_connect_timeout: float = Field(10.0, gt=0, le=DAY, allow_inf_nan=False)
    remote_read_timeout: float = Field(120.0, gt=0, le=DAY, allow_inf_nan=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        _warn_unknown_variables(settings_cls, os.environ)
        named = str(settings_cls.model_config.get("toml_file") or "")
        if (problem := control_character_problem(named)) is not None:
            # The file's name is in every error about its keys (and in `source_of`): a line break in
            # it split the one-line refusal in two. Refused whether or not such a file is there.
            details = PydanticCustomError("config_file", "{variable}: {problem}",
                                          {"variable": CONFIG_FILE_VARIABLE, "problem": problem})
            raise ValidationError.from_exception_data(
                "Settings", [InitErrorDetails(type=details, loc=(), input=ascii(named))])
        try:
            toml = _StrictTomlSource(settings_cls)
        except (OSError, RuntimeError) as exc:  # a folder on its path this user may not open (is_file() raised)
            raise _config_file_error(settings_cls.model_config.get("toml_file"), "cannot be read",
                                     getattr(exc, "strerror", None) or str(exc)) from None
        in_file = {field for key, value in toml.toml_data.items()  # an empty value is as if left out
                   if not (isinstance(value, str) and not value.strip())
                   and (field := field_of_key(settings_cls, key)) is not None}
        return (init_settings, _EnvSource(settings_cls, set_in_file=in_file), toml)

    @field_validator("a1111_upscaler")
    @classmethod
    def _upscaler_name(cls, value: str | None) -> str | None:
        # The image's record keeps it: a name as the webui lists them ("R-ESRGAN 4x+"), one line,
        # taken without an env file's stray spaces (with them it names no upscaler the server has).
        if value is None or not value.strip():
            return None
        value = value.strip()
        if len(value) > MAX_UPSCALER_CHARS or not value.isprintable():
            raise ValueError(f"must be an upscaler's name as the webui lists it (one line, at most "
                             f"{MAX_UPSCALER_CHARS} characters), such as 'R-ESRGAN 4x+'")
        return value

    # `policy_dir = ""` in the file (or `Settings(policy_dir="")`) would otherwise be Path(""), the
    # working directory: every *.toml there read as a policy. An empty path or name means what
    # leaving it out means. (Empty variables never get here: `_EnvSource` drops them.)
    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if value == "" and name != "admin_key" and name is not None and cls.model_fields[name].default != "":
            raise PydanticUseDefault()
        return value

    @field_validator("data_dir", "cache_dir", "policy_dir", "prices_file", "comfyui_workflow", "database_url",
                     "gemini_model", "openai_model", "stability_model", "replicate_model", "fal_model",
                     "lite_model", "hifi_model", "lite_preview_vae", "a1111_checkpoint", mode="before")
    @classmethod
    def _no_stray_spaces(cls, value: Any) -> Any:
        # `ORCH_DATA_DIR=/srv/orch ` (an env file's trailing space) started on a new, empty data dir
        # named with the space, the studio's own looking lost; a model named with one was unpriced,
        # and a local one (`builtin:tiny-sd `) left both local engines unavailable.
        # (Quotes an env file kept did the same, in a folder named `"`: see `_not_quoted`.)
        return value.strip() if isinstance(value, str) else value

    @field_validator("data_dir", "cache_dir", "policy_dir", "prices_file", "comfyui_workflow")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        # `~/orchdata` in a systemd unit, an env file or the TOML file (no shell to expand it)
        # made a folder named `~` in the working directory.
        return None if value is None else Path(os.path.expanduser(value))  # as given when there is no such home

    @field_validator("lite_model", "hifi_model", "lite_preview_vae")
    @classmethod
    def _home_in_model(cls, value: str | None) -> str | None:
        # A path there may start with ~ as well; a Hub id never does.
        return os.path.expanduser(value) if value is not None and value.startswith("~") else value

    @field_validator("lite_model", "hifi_model", "gemini_model", "openai_model", "stability_model",
                     "replicate_model", "fal_model", "a1111_checkpoint")
    @classmethod
    def _stored_model(cls, value: str | None) -> str | None:
        # Jobs and assets store it: refused at start, not by the first job's write on PostgreSQL.
        if value is not None and len(value) > MAX_MODEL_CHARS:
            raise ValueError(f"is {len(value)} characters long; at most {MAX_MODEL_CHARS} (a model's folder can "
                             "be named by a shorter path, a symbolic link to it)")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # The TOML file's `max_pending_jobs = false` read as 0 (no limit), silently; an environment
        # variable's "false" is refused, as this is now.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool and bool not in get_args(annotation):
                raise ValueError("expected a number, not true/false")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _not_quoted(cls, value: Any, info: ValidationInfo) -> Any:
        # A quoted admin key refused every client, a quoted model name was a model nobody serves.
        # (A provider's key, which may come from the vendor's own variable, leaves its engine
        # unavailable, saying why, rather than stopping every command: see `tiers._cloud`.)
        if info.field_name not in PROVIDER_KEYS:
            _refuse_quoted(value.strip() if isinstance(value, str) else value)
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is not None and info.field_name not in _OWN_CONTROL_CHECK:
            _refuse_control_characters(value, info.field_name)
        return value

    @field_validator("admin_key")
    @classmethod
    def _admin_key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # Blank would turn auth on with a key that an empty "Authorization: Bearer" matches; taking
        # it as unset would leave the API open to someone who meant to close it. Neither is safe.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty or blank: set a key, or leave the variable unset for an open API")
        # A header's value has no whitespace at its ends (a client's token is read so): a key
        # written with a trailing space or a CRLF env file's \r locked every client out.
        key = None if value is None else value.get_secret_value().strip()
        if key is not None and any(char.isspace() or not char.isprintable() for char in key):
            # No client can send it in a bearer token (a control character, a space inside):
            # the service would start closed to everyone. (Non-ASCII letters are sent as UTF-8.)
            raise ValueError("must not hold spaces or control characters: it is sent in an HTTP header")
        return None if key is None else SecretStr(key)

    @field_validator("a1111_auth")
    @classmethod
    def _one_a1111_auth(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # Both given, httpx sent ORCH_A1111_AUTH's and dropped the URL's without a word: an operator
        # who changed one of them saw the other still used. (The URL is validated first: declared first.)
        url = info.data.get("a1111_url")
        if value is not None and url and httpx.URL(url).userinfo:
            raise ValueError("is set, and ORCH_A1111_URL holds a user:password too: give the server's --api-auth "
                             "in one of them")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # A short key is guessed from one signed body; whitespace at its ends is an env file's, not the key's.
        if value is None:
            return None
        secret = value.get_secret_value().strip()
        if len(secret) < 16:
            raise ValueError("must be at least 16 characters: the receivers' check of each delivery rests on it")
        if secret.startswith("whsec_"):  # Standard Webhooks' form, decoded as `orchestrator.webhooks.signing_key` does
            try:
                base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except binascii.Error:
                raise ValueError("starts with whsec_ but what follows is not base64") from None
        return SecretStr(secret)

    @field_validator("comfyui_url", "a1111_url", "gemini_base_url", "openai_base_url", "stability_base_url",
                     "replicate_base_url", "fal_base_url")
    @classmethod
    def _server_url(cls, value: str | None) -> str | None:
        # `localhost:7860` (no scheme) was taken, the engine listed as available, and every job
        # failed with a hint about the password. The value is not repeated: it may hold one.
        if value is None:
            return None
        value = value.strip()  # httpx would send " http://..." as a relative path
        http_address(value, example="http://127.0.0.1:7860")
        return value

    @field_validator("gemini_base_url", "openai_base_url", "stability_base_url", "replicate_base_url")
    @classmethod
    def _without_api_version(cls, value: str, info: ValidationInfo) -> str:
        # The engines add their API's version (`/v1/images/edits`): a base written as an SDK's
        # (`https://api.openai.com/v1`) asked `/v1/v1/...`, and every paid job failed with a 404.
        # Only the engine's own versions: a gateway's path may end in one of its own (`/api/v2`).
        versions = API_VERSIONS[str(info.field_name)]
        last = httpx.URL(value).path.rstrip("/").rpartition("/")[2]
        if last.lower() in versions:
            raise ValueError(f"ends with /{last}: give the address without it (the engine adds its API's "
                             "version to each path)")
        return value

    @field_validator("engines")
    @classmethod
    def _engine_entries(cls, value: str) -> str:
        for item in (item.strip() for item in value.split(",") if item.strip()):
            name, _, target = item.partition("=")
            module, _, factory = target.partition(":")
            if not (name.strip() and module.strip() and factory.strip()):
                raise ValueError(f"{item!r} is not name=module:factory (e.g. my-engine=studio_engines.flux:create)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        return ",".join(_origin(item.strip()) for item in value.split(",") if item.strip())

    @property
    def cors_origin_list(self) -> list[str]:
        return [item.strip() for item in self.cors_origins.split(",") if item.strip()]

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        # Quoted: a data dir named `dq?x` would otherwise open `dq` (the rest read as a query).
        return URL.create("sqlite", database=str((self.data_dir / "orchestrator.db").resolve())).render_as_string(
            hide_password=False)

    @property
    def extra_engines(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.engines.split(",") if item.strip())
        return {name.strip(): target.strip() for name, target in pairs}

    @property
    def assets_dir(self) -> Path:
        return self.data_dir / "assets"

    @property
    def effective_hifi_model(self) -> str:
        return self.hifi_model or self.lite_model


def _origin(origin: str) -> str:
    """An origin as a browser sends it: a dashboard's own would never match another spelling
    (`https://Dash.Example`, `https://b.example:443`), and it failed with nothing in the log."""
    if origin == "*":
        return origin
    problem = "give scheme://host[:port] with no path or trailing slash (e.g. https://dash.studio.example), or *"
    if "@" in origin:
        # Before any refusal that quotes the origin: with a path or a bad port as well, its password
        # went to the terminal and the journal. No origin holds an @ (nor does a host).
        raise ValueError(f"an origin has no user or password: {problem}")
    if not re.fullmatch(r"https?://[^/\s?#]+", origin, flags=re.IGNORECASE):
        raise ValueError(f"{origin!r} is not an origin: {problem}")
    parts = urllib.parse.urlsplit(origin)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{origin!r} is not an origin: its port is not a number from 1 to 65535") from None
    host = parts.hostname or ""
    if not host or port == 0:
        raise ValueError(f"{origin!r} is not an origin: {problem}")
    if "*" in host:
        raise ValueError(f"{origin!r}: wildcards are not supported; list each origin")
    try:
        # As a browser sends it: `https://bücher.example` comes as `https://xn--bcher-kva.example`,
        # and its dashboard was refused with nothing in the log.
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise ValueError(f"{origin!r} is not an origin: its host is not a name a browser can send") from None
    scheme = parts.scheme.lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def input_fields(settings_cls: type[BaseSettings]) -> dict[str, str]:
    """Every name a field is read under (its name and its aliases), in lower case, to the field."""
    names: dict[str, str] = {}
    for field_name, field in settings_cls.model_fields.items():
        names[field_name] = field_name
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        names |= {choice.lower(): field_name for choice in choices if isinstance(choice, str)}
    return names


def _input_names(settings_cls: type[BaseSettings]) -> set[str]:
    return set(input_fields(settings_cls))


def source_of(field: str) -> str:
    """Where a setting's value came from, as a problem with it is told: its ORCH_ variable, or
    else the config file's key (`orchestrator.toml: data_dir`)."""
    variable = f"{PREFIX}{field.upper()}"
    # An empty or blank one is not set (`_EnvSource`): the file's value was read, and the blank
    # variable (a CRLF env file's `ORCH_POLICY=\r`) was named for it.
    if any(name.upper() == variable and (value.strip() or field == "admin_key") for name, value in os.environ.items()):
        return variable
    path = Path(str(Settings.model_config.get("toml_file") or ""))
    try:
        keys = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):
        return variable
    key = next((k for k in keys if field_of_key(Settings, k) == field), None)  # FAL_KEY is fal_api_key's
    return f"{path}: {key}" if key else variable


def field_of_key(settings_cls: type[BaseSettings], key: str) -> str | None:
    """The setting a config file's key sets: under one of its names, or written as its variable
    is named (`ORCH_DATA_DIR`, as README's table lists them); None for a key the file may not hold."""
    known = input_fields(settings_cls)
    if key.lower() in known:
        return known[key.lower()]
    bare = key.lower().removeprefix(PREFIX.lower())
    return bare if bare in settings_cls.model_fields else None


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(name.lower(), list(candidates), n=1)
    return found[0] if found else None


class _EnvSource(EnvSettingsSource):
    """`ORCH_X=` in a compose file or an env template means "not set": dropped here, so the config
    file's value (or the default) answers, as if the line were not there. (Validated as empty, it
    replaced the file's value with the default: a file's PostgreSQL URL with a local SQLite file.)
    Not the admin key, whose blank value is refused rather than silently leaving the API open.
    Dropped before a field's names are tried in turn: an empty `ORCH_GEMINI_API_KEY=` hid the
    vendor's `GEMINI_API_KEY`.

    A vendor's variable (`OPENAI_API_KEY`) is a fallback: it is dropped too for a setting the
    config file sets (`set_in_file`). Read as the environment, it outranked the file's
    `ORCH_OPENAI_API_KEY`, and an operator's personal key exported in the shell paid for the
    studio's renders. An `ORCH_` variable still outranks the file."""

    def __init__(self, settings_cls: type[BaseSettings], *, set_in_file: set[str]) -> None:
        # Before the base class's constructor, which loads the variables.
        self._fallbacks_hidden = {
            choice.lower() for field in set_in_file
            if isinstance(alias := settings_cls.model_fields[field].validation_alias, AliasChoices)
            for choice in alias.choices if isinstance(choice, str) and not choice.upper().startswith(PREFIX)}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        admin = f"{PREFIX}admin_key"
        # Blank counts as empty: `ORCH_DATABASE_URL=\r` (a CRLF env file's empty line), stripped by a
        # validator, would otherwise be read as set to nothing, the file's value replaced by the default.
        return {name: value for name, value in super()._load_env_vars().items()
                if (name.lower() == admin.lower() or (value is not None and value.strip()))
                and name.lower() not in self._fallbacks_hidden}


def _config_file_error(file_path: Any, what: str, error: str) -> ValidationError:
    details = PydanticCustomError("config_file", "{file}: {what}: {error}",
                                  {"file": str(file_path), "what": what, "error": error})
    return ValidationError.from_exception_data("Settings",
                                               [InitErrorDetails(type=details, loc=(), input=str(file_path))])


class _StrictTomlSource(TomlConfigSettingsSource):
    """pydantic-settings passes a TOML key that matches no field on as an extra, which
    `extra="ignore"` then drops: `max_body_byts = 2048` silently kept the default. Such a key is
    refused here as a validation error, so it is reported like any other bad setting."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        # A syntax error is a bad setting like any other: reported with its file, not a traceback.
        try:
            # A byte-order mark (as Windows editors write) is not TOML's, and a policy file may
            # have one: read past it here too.
            data: dict[str, Any] = tomllib.loads(file_path.read_bytes().decode("utf-8-sig"))
            return data
        except OSError as exc:
            raise _config_file_error(file_path, "cannot be read", exc.strerror or str(exc)) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise _config_file_error(file_path, "not valid TOML", str(exc)) from None

    def __call__(self) -> dict[str, Any]:
        known = input_fields(self.settings_cls)
        fields = list(self.settings_cls.model_fields)
        # pydantic-settings reads a key under the field's names; one written as its variable is named
        # is moved to its field below.
        as_variables = {key: field for key in self.toml_data
                        if key.lower() not in known and (field := field_of_key(self.settings_cls, key)) is not None}
        errors: list[InitErrorDetails] = []

        def refuse(key: str, message: str, **context: str) -> None:
            error = PydanticCustomError("unknown_setting", "{file}: " + message,
                                        {"file": str(self.toml_file_path), "key": key, **context})
            errors.append(InitErrorDetails(type=error, loc=(key,), input=self.toml_data[key]))

        first: dict[str, str] = {}  # each field's key in the file
        for key in self.toml_data:
            field = field_of_key(self.settings_cls, key)
            if field is None:
                match = _closest(key.lower().removeprefix(PREFIX.lower()), fields)
                refuse(key, "unknown key '{key}'{hint}", hint=f" (did you mean '{match}'?)" if match else "")
            elif field in first:
                # `GEMINI_API_KEY` and `gemini_api_key` both: one was taken without a word.
                refuse(key, "'{key}' and '{other}' set the same setting ({field}): keep one", field=field,
                       other=first[field])
            else:
                first[field] = key
        values = dict(super().__call__())
        for key, field in as_variables.items():
            if key in values:
                values[field] = values.pop(key)
        if errors:
            raise ValidationError.from_exception_data(self.settings_cls.__name__, errors)
        return values


# What a variable named like a command's option is given by instead: no setting's name is near
# enough to suggest one (`ORCH_PORT` from another service's habit of `PORT`).
_OPTIONS = {
    "host": "the address is given by `orchestrator serve --host/--port`",
    "port": "the address is given by `orchestrator serve --host/--port`",
    "log_level": "the log level is given by `orchestrator serve --log-level` or `orchestrator worker --log-level`",
    "allow_open": "that is `orchestrator serve --allow-open`",
    "no_jobs": "that is ORCH_RUN_JOBS=false, or `orchestrator serve --no-jobs`",
}


def unknown_variables(settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> list[str]:
    """A sentence for each ORCH_ variable that is no setting (a typo leaves the API open when it is
    ORCH_ADMIN_KYE): logged at start, and again into the data dir's log once that is open."""
    # Matched without regard to case, as pydantic-settings reads them.
    known = {f"{PREFIX}{field}".lower() for field in settings_cls.model_fields}
    known |= {name for name in _input_names(settings_cls) if name.startswith(PREFIX.lower())}
    known.add(CONFIG_FILE_VARIABLE.lower())
    suffixes = sorted(name.removeprefix(PREFIX.lower()) for name in known)
    told = []
    for variable in sorted(environ):
        if not variable.lower().startswith(PREFIX.lower()) or variable.lower() in known:
            continue
        option = _OPTIONS.get(variable[len(PREFIX):].lower())
        match = _closest(variable[len(PREFIX):], suffixes)
        hint = f" ({option})" if option else f" (did you mean {PREFIX}{match.upper()}?)" if match else ""
        told.append(f"{variable} is not a setting of this service and is ignored{hint}")
    return told


def _warn_unknown_variables(settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
    for sentence in unknown_variables(settings_cls, environ):
        log.warning("%s", sentence)
