"""Process settings: environment (STREAMLLM_*, REDIS_URL) over a YAML file over the defaults.

`configs/default.yaml` holds every default; its `engine` section maps one to one onto `EngineConfig`
(with `cache` onto `CacheConfig`) and its `server` section onto `ServerLimits`. The YAML file is chosen by
`Settings(config=...)` or STREAMLLM_CONFIG; nested values come from the environment with `__`, e.g.
STREAMLLM_ENGINE__CACHE__WINDOW=2044 or STREAMLLM_SERVER__MAX_TOKENS_CAP=1024.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from streaming_core.config import CacheConfig, EngineConfig


class ServerLimits(BaseModel):
    """What one request may ask, how long sessions live, and how the server shuts down."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=4 << 20, ge=1024)
    """Largest request body accepted; larger bodies get 413."""
    max_messages: int = Field(default=1024, ge=1)
    """Most messages one chat request may carry."""
    max_prompt_tokens: int = Field(default=65536, ge=1)
    """Most prompt tokens one request may prefill (a session's history beyond its window costs nothing)."""
    max_tokens_cap: int = Field(default=4096, ge=1)
    """Largest max_tokens / max_completion_tokens a request may ask for."""
    default_max_tokens: int = Field(default=512, ge=1)
    """Tokens generated at most when the request does not say."""
    session_ttl_seconds: int = Field(default=7 * 86400, ge=1)
    """Seconds an idle session's metadata stays in Redis."""
    pin_system_prompt: bool = True
    """Widen the sinks so that the system prompt is never evicted."""
    session_id_pattern: str = r"[A-Za-z0-9._:-]{1,128}"
    """Full-match syntax of client-chosen session ids."""
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    """On shutdown, seconds in-flight requests get to finish before they end with an error."""
    conversation_max_items: int = Field(default=1000, ge=2)
    """Items a conversation or response chain keeps in Redis, and responses it keeps retrievable; past it
    the oldest are dropped (the KV session, bounded by sinks + window, is not affected)."""
    engine_process: bool = False
    """Run the engine in a process of its own (`streaming_core/engine_process.py`): a crash or an OOM kill of
    the engine leaves the server up (503 engine_restarting until a new engine process is loaded, sessions
    rebuilt from Redis). Off by default: one HTTP stream measured 84% and 77% of the engine's rate that way
    against 89% and 81% with the engine as a thread of the server, in two interleaved runs
    (docs/perf-notes.md, ninth pass)."""
    replica_lease_seconds: float = Field(default=15.0, gt=0.1)
    """Lifetime of this replica's lease and session claims in Redis, renewed every third of it: a dead
    replica's sessions are free for another within this time."""

    @field_validator("session_id_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        re.compile(value)
        return value


class RedisLimits(BaseModel):
    """How long the server waits for Redis, and what it tells clients while Redis is away."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket_timeout_seconds: float = Field(default=0.5, gt=0)
    """Longest wait for one Redis reply; a frozen Redis fails a request after this (per attempt)."""
    connect_timeout_seconds: float = Field(default=0.5, gt=0)
    """Longest wait to open a connection; a dead host fails a request after this (per attempt)."""
    retries: int = Field(default=2, ge=0)
    """Retries of a command after a connection error or timeout (exponential backoff with jitter)."""
    health_check_interval_seconds: int = Field(default=5, ge=0)
    """A pooled connection idle this long is PINGed before use, so one broken by a restart is replaced."""
    retry_after_seconds: int = Field(default=2, ge=1)
    """Retry-After of the 503 answered while Redis is unavailable."""

    @property
    def command_deadline_seconds(self) -> float:
        """Longest a command may take in all, attempts, reconnects and backoff included: a connection and a
        reply timeout per attempt (3 s by default). The client gives up then, and a commit carries it as its
        deadline on Redis's clock."""
        return (self.socket_timeout_seconds + self.connect_timeout_seconds) * (self.retries + 1)


def _reject_unknown(value: Any, cls: type) -> Any:
    """Dataclasses ignore unknown keys under pydantic; a misspelt YAML key must fail instead."""
    if not isinstance(value, dict):
        return value
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    if cls is EngineConfig and "cache" in value:
        _reject_unknown(value["cache"], CacheConfig)
    return value


class Settings(BaseSettings):
    """Everything the server process reads from its environment and its config file."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMLLM_", env_nested_delimiter="__", frozen=True, populate_by_name=True, extra="forbid"
    )

    config: Path | None = None
    """YAML file with any of these settings (STREAMLLM_CONFIG); the environment overrides it."""
    data_dir: Path | None = None
    """Where converted models are cached and the disk KV tier lives, under kv-tier/<replica>
    (STREAMLLM_DATA_DIR); None: ~/.cache/streamllm."""
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Accepted Bearer keys (STREAMLLM_API_KEYS, comma-separated); none and no key file: no auth."""
    api_key_file: Path | None = None
    """File with one accepted key per line ('#' comments allowed), added to api_keys."""
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "STREAMLLM_REDIS_URL")
    )
    """Redis for session metadata (REDIS_URL); None starts an embedded Redis."""
    host: str = "127.0.0.1"
    """Interface `streamllm serve` binds."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port `streamllm serve` binds."""
    model_name: str | None = None
    """Model id served in the API; None: the loaded model's own name."""
    engine: EngineConfig = EngineConfig()
    """Model, device, dtype, batching and the sink+window cache (streaming_core.config)."""
    server: ServerLimits = ServerLimits()
    """Request limits, session lifetime, shutdown grace."""
    redis: RedisLimits = RedisLimits()
    """Redis timeouts and retries, and the Retry-After while it is unavailable."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("engine", mode="before")
    @classmethod
    def _known_engine_fields(cls, value: Any) -> Any:
        return _reject_unknown(value, EngineConfig)

    def api_key_list(self) -> list[str]:
        """Accepted API keys from the setting and the key file (empty: auth disabled)."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            for line in self.api_key_file.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    keys.append(line.strip())
        return keys

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        path = init_kwargs.get("config") or os.environ.get("STREAMLLM_CONFIG")
        if not path:
            return init_settings, env_settings
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=path)
