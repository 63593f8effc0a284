"""One settings class, read from `ORCH_*` environment variables (and an optional TOML file).

The remote engines also accept the vendor's usual variable (`GEMINI_API_KEY`, `OPENAI_API_KEY`, ...)
so a studio that already exports them needs no extra configuration.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

Device = Literal["auto", "cpu", "cuda", "mps"]


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ORCH_",
        extra="ignore",
        populate_by_name=True,
        toml_file=os.environ.get("ORCH_CONFIG_FILE", "orchestrator.toml"),
    )

    data_dir: Path = Path("./.orchestrator")
    # Shared across data dirs: the offline tiny model is built here once per machine.
    cache_dir: Path = Field(default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache")
                            .expanduser() / "orchestrator")
    database_url: str | None = None
    admin_key: SecretStr | None = None

    lite_model: str = "auto"
    lite_device: Device = "auto"
    hifi_model: str | None = None
    # TAESD folder or Hub id for sharper step previews; unset = the free latent-to-RGB approximation.
    lite_preview_vae: str | None = None
    lite_max_batch: int = Field(4, ge=1, le=16)
    # Half precision on CUDA: fp16, or bf16 for GPUs and models that overflow in fp16.
    lite_dtype: Literal["fp16", "bf16"] = "fp16"
    # Torch intra-op threads of the inference thread; 0 = all physical cores.
    torch_threads: int = Field(0, ge=0)
    # Largest width/height a local engine accepts; guards memory on small machines.
    local_max_size: int = Field(2048, ge=64)

    # Extra engines without packaging: "name=module:factory,other=module:factory".
    engines: str = ""

    policy: str = "balanced"
    policy_dir: Path | None = None
    prices_file: Path | None = None
    # Credits per GPU-second charged for local engines (0 = local work is free).
    local_gpu_second_credits: float = Field(0.0, ge=0)

    # Largest request body accepted (413 above it); every body is a small JSON document.
    max_body_bytes: int = Field(1 << 20, ge=1024)

    # Seconds a running job's lease lasts without a heartbeat before the sweeper recovers it.
    lease_seconds: float = Field(60.0, gt=0)
    sweep_interval: float = Field(15.0, gt=0)

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

    comfyui_url: str | None = None
    comfyui_workflow: Path | None = None
    a1111_url: str | None = None
    a1111_auth: SecretStr | None = None  # "user:password" for --api-auth

    # Total seconds a remote call may take, retries and polling included.
    remote_deadline: float = Field(300.0, gt=0)
    remote_connect_timeout: float = Field(10.0, gt=0)
    remote_read_timeout: float = Field(120.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @field_validator("hifi_model", "comfyui_url", "a1111_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'orchestrator.db').resolve()}"

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
