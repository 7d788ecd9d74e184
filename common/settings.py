"""Settings: one YAML file (`CORRAL_CONFIG`, default `./corral.yaml`), every field
overridable by `CORRAL_*` environment variables (nested with `__`), and command-line flags
over both. Nothing is built at import time: `load_settings()` is called by each process's
entry point and the result passed down, so tests build their own.
"""

from __future__ import annotations

import json
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from common.engines import LLAMA_SERVER, EngineConfig
from common.errors import InvalidRequest
from common.wire import RequestDefaults

DEFAULT_CONFIG = "corral.yaml"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral"


class CacheConfig(BaseModel):
    """A model's response cache (`gateway.cache`): replies to requests whose output their
    input decides (temperature 0, a seed, embeddings) are kept in Redis and replayed."""

    model_config = ConfigDict(extra="forbid")

    ttl: float = Field(default=3600, gt=0)  # seconds a reply is kept
    max_entries: int = Field(default=1000, ge=1)  # per model; the oldest go first past it
    max_entry_bytes: int = Field(default=2**20, ge=256)  # a larger reply is not kept


class ModelConfig(BaseModel):
    """One model of the catalog, keyed by its alias."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path  # a GGUF file; for another engine, what `{model_path}` stands for
    # `llama-server`, or any OpenAI-compatible server's command (`common.engines`)
    engine: Literal["llama-server"] | EngineConfig = LLAMA_SERVER
    flags: list[str] = Field(default_factory=list)  # passed to the engine as is, last
    # the context llama-server gets (all slots together); "auto": the most that fits the
    # room on the device it is loaded on, up to the training context per slot
    ctx_size: Annotated[int, Field(ge=64)] | Literal["auto"] = 4096
    parallel: int = Field(default=2, ge=1, le=256)  # llama-server slots = worker concurrency
    embedding: bool = False  # served with --embeddings --pooling mean
    preload: bool = False  # loaded at start (and kept loaded: no idle_ttl), `replicas` copies
    pinned: bool = False  # never evicted for another model
    idle_ttl: float = Field(default=300, ge=0)  # unload after this long unused; 0 = never
    vram_mb: int | None = Field(default=None, ge=1)  # memory need override (else estimated)
    replicas: int = Field(default=1, ge=1)  # copies placed when it is loaded
    mmproj: Path | None = None  # a vision projector GGUF (llama-server's --mmproj)
    # request fields a request does not set itself: temperature, top_p, top_k, min_p,
    # repeat_penalty, max_tokens...; the request's own values win
    defaults: dict[str, Any] = Field(default_factory=dict)
    cache: CacheConfig | None = None  # the response cache; None: off (`cache: true`: on)
    # With two or more replicas: a request goes to the replica that served its affinity key
    # last (its prompt cache, `common.affinity`), and to the shared queue if that replica
    # has not taken it within `affinity_wait` seconds (busy, or gone). false: shared only.
    affinity: bool = True
    affinity_wait: float = Field(default=2.0, ge=0)

    @field_validator("engine", mode="before")
    @classmethod
    def _one_engine(cls, value: object) -> object:
        """One clear error for the one form that was meant, not one per form."""
        if isinstance(value, dict):
            return EngineConfig.model_validate(value)
        if isinstance(value, str) and value != LLAMA_SERVER:
            raise ValueError(
                f"unknown engine {value!r}: `{LLAMA_SERVER}`, or a server's command as"
                " `{command: [...], health: /health}`"
            )
        return value

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_switch(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "on", "off"):
            value = value.lower() in ("true", "1", "on")
        if value is True:
            return CacheConfig()
        return None if value is False else value

    @model_validator(mode="after")
    def _engine_fits(self) -> ModelConfig:
        if self.ctx_size == "auto" and not self.is_gguf:
            raise ValueError(
                "ctx_size: auto is worked out from a GGUF header; give this engine a number"
            )
        return self

    @property
    def custom_engine(self) -> EngineConfig | None:
        """The engine's command if it is not the default llama-server."""
        return self.engine if isinstance(self.engine, EngineConfig) else None

    @property
    def is_gguf(self) -> bool:
        """Whether the model is a GGUF file whose header Corral reads (checked before a
        load, and its memory need estimated): always for llama-server, for another engine
        only a `.gguf` file."""
        return self.custom_engine is None or self.model_path.suffix.lower() == ".gguf"

    @property
    def engine_flags(self) -> list[str]:
        """Every argument the engine gets, as configured: its command, then `flags`."""
        custom = self.custom_engine
        return [*custom.command, *self.flags] if custom else list(self.flags)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CORRAL_", env_nested_delimiter="__", extra="ignore"
    )

    environment: Literal["development", "production"] = "development"
    # None: `corral up` starts an embedded Valkey; `corral gateway`/`worker` need a URL.
    redis_url: str | None = None
    # Sentinel (`redis_url` = "sentinel://s1:26379/0;sentinel://s2:26379", common.redis_conn):
    redis_sentinel_master: str | None = None  # the master's name the sentinels monitor
    redis_sentinel_password: SecretStr | None = None  # the sentinels' own, if they want one
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    models_dir: Path | None = None  # relative model paths resolve here (default data_dir/models)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    llama_server: str | None = None  # CORRAL_LLAMA_SERVER: path of the llama-server binary

    request_timeout: float = Field(default=600, gt=0)  # whole request, queue wait included
    max_request_timeout: float = Field(default=3600, gt=0)  # cap of X-Request-Timeout
    max_file_bytes: int = Field(default=100 * 2**20, ge=1)  # POST /v1/files (batch input)
    task_time_limit: float = Field(default=900, gt=0)
    load_timeout: float = Field(default=120, gt=0)  # a model load, and a request waiting on it
    # On SIGTERM a gateway lets open requests finish this long, then ends them with a
    # clear error; a worker lets its running tasks finish this long, then gives them up
    # (a whole reply runs again elsewhere; a stream's client is told)
    drain_timeout: float = Field(default=30, ge=0)
    preload_models: list[str] = Field(default_factory=list)  # aliases to preload; "*" = all
    # `corral up`: floating workers per device, so at most this many models are resident on
    # one GPU (or the CPU) at once; how many fit is the device's memory's say
    max_models_per_device: int = Field(default=3, ge=1, le=64)
    min_residency: float = Field(default=30, ge=0)  # a loaded model is not swapped out sooner
    max_swap_wait: float = Field(default=10, ge=0)  # ... unless a newcomer waited this long
    visibility_timeout: float | None = None  # default 2 x task_time_limit
    max_queue_size_per_model: int = Field(default=500, ge=1)
    # Aging: a low request queued longer than this (s) moves to normal. None: off.
    low_max_wait: float | None = Field(default=None, gt=0)
    heartbeat_interval: float = Field(default=1.0, gt=0)
    heartbeat_ttl: float = Field(default=3.0, gt=0)
    flush_interval_ms: float = Field(default=10.0, ge=0)
    broker_pool_limit: int = Field(default=64, ge=1)
    redis_max_connections: int = Field(default=128, ge=4)  # per gateway process
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    # Tenancy and hardening. The admin key is a SecretStr so it never shows in a
    # repr, a log line or a dumped config.
    admin_key: SecretStr | None = None  # CORRAL_ADMIN_KEY: every route, management included
    # The admin key leaves a loopback (or --insecure) gateway open until a user key exists:
    # `corral up`'s own local key, a credential for the CLI that locks nobody out.
    open_until_user_keys: bool = False
    insecure: bool = False  # run without keys on a non-loopback address (--insecure)
    priority_over_cap: Literal["downgrade", "reject"] = "downgrade"
    max_body_bytes: int = Field(default=8 * 2**20, ge=1024)  # larger bodies: 413
    body_timeout: float = Field(default=30, gt=0)  # the whole body must arrive within this
    header_timeout: float = Field(default=10, gt=0)  # the request head must arrive within this
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: off
    metrics_public: bool = False  # serve the gateway's /metrics without the admin key
    worker_metrics_host: str = "127.0.0.1"  # where a worker serves its own /metrics
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port

    @model_validator(mode="before")
    @classmethod
    def _env_model_names(cls, data: Any) -> Any:
        """`CORRAL_MODELS__QWEN2_5_7B__PARALLEL=8` means the model `qwen2.5-7b`: a variable's
        name holds no dots nor dashes and arrives lowercased, so such a partial entry (no
        `model_path`) is merged into the one configured model it names that way."""
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            return data
        merged = dict(models)
        for name, fields in models.items():
            if not isinstance(fields, dict) or "model_path" in fields:
                continue
            named = [a for a in models if a != name and _env_name(a) == name]
            if len(named) == 1 and isinstance(models[named[0]], dict):
                merged[named[0]] = {**merged[named[0]], **fields}
                del merged[name]
        for name, fields in merged.items():
            # no path: the model of that name under models_dir (`common.discovery`)
            if isinstance(fields, dict) and "model_path" not in fields:
                merged[name] = {**fields, "model_path": f"{name}.gguf"}
        return {**data, "models": merged}

    @field_validator("models", mode="after")
    @classmethod
    def _check_defaults(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for model in models.values():
            model.defaults = RequestDefaults.model_validate(model.defaults).fields()
        return models

    @field_validator("admin_key", "redis_sentinel_master", "redis_sentinel_password", mode="before")
    @classmethod
    def _no_empty_key(cls, value: object) -> object:
        # CORRAL_ADMIN_KEY= (empty, e.g. `${CORRAL_ADMIN_KEY:-}` in compose) means no key.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        # CORRAL_CORS_ORIGINS="https://a.example,https://b.example", a JSON list, or YAML's
        if isinstance(value, str) and value.strip().startswith("["):
            return json.loads(value)
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        # Absolute at once: `corral up` hands paths under them to children, which resolved
        # a relative one against the directory a second time.
        self.data_dir = self.data_dir.expanduser().absolute()
        if self.models_dir is not None:
            self.models_dir = self.models_dir.expanduser().absolute()
        if self.visibility_timeout is None:
            self.visibility_timeout = 2 * self.task_time_limit
        elif self.visibility_timeout < 2 * self.task_time_limit:
            # kombu redelivers an unacked task after this, running or not.
            raise ValueError("visibility_timeout must be at least 2 x task_time_limit")
        if self.heartbeat_ttl < 2 * self.heartbeat_interval:
            raise ValueError("heartbeat_ttl must be at least 2 x heartbeat_interval")
        if self.environment == "production" and not self.redis_url:
            raise ValueError("production needs CORRAL_REDIS_URL (no embedded Redis)")
        if self.redis_url and self.redis_url.lstrip().lower().startswith("sentinel://"):
            from common.redis_conn import RedisTarget  # redis-py, only for this form

            RedisTarget(self.redis_url, self.redis_sentinel_master)  # raises what is wrong
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags > environment > YAML file > defaults.
        yaml_source = InitSettingsSource(settings_cls, init_kwargs=_yaml_data.get() or {})
        return (init_settings, env_settings, yaml_source)

    def resolve_model_path(self, model: ModelConfig) -> Path:
        """The model's file: its path as given if absolute, else under `models_dir`."""
        path = model.model_path.expanduser()
        if path.is_absolute():
            return path
        return (self.models_dir or self.data_dir / "models") / path

    def resolved(self, model: ModelConfig) -> ModelConfig:
        """`model` with its path resolved here (`resolve_model_path`), as it is announced
        to the cluster and handed to llama-server."""
        return model.model_copy(update={"model_path": self.resolve_model_path(model)})

    def load_timeout_for(self, model: ModelConfig) -> float:
        """How long a load of `model` may take, and a request wait on it: its engine's
        `ready_timeout` if it has one (vLLM takes minutes), else `load_timeout`."""
        custom = model.custom_engine
        return (custom.ready_timeout if custom else None) or self.load_timeout

    def preloaded(self, alias: str, model: ModelConfig) -> bool:
        """Whether `alias` is kept loaded: `preload: true`, or named in `preload_models`
        (`"*"`: every model)."""
        wanted = self.preload_models
        return model.preload or "*" in wanted or alias in wanted

    def local_url(self) -> str:
        """The gateway's base URL for a client on this machine: an any-address bind is
        reached on loopback, an IPv6 address goes in brackets."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise InvalidRequest(
                "No Redis URL: pass --redis-url or set CORRAL_REDIS_URL (`corral up` starts "
                "an embedded server, which the CLI finds by itself on the same machine)."
            )
        return self.redis_url


def _env_name(alias: str) -> str:
    """How a model's alias reads in a CORRAL_MODELS__<ALIAS>__<FIELD> variable's name."""
    return re.sub(r"[^a-z0-9]", "_", alias.lower())


_yaml_data: ContextVar[dict[str, Any] | None] = ContextVar("corral_yaml_data", default=None)


def read_config_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The YAML config as a dict. A missing default file is fine; a missing named one is not."""
    explicit = path is not None or "CORRAL_CONFIG" in os.environ
    target = Path(path or os.environ.get("CORRAL_CONFIG", DEFAULT_CONFIG)).expanduser()
    if not target.exists():
        if explicit:
            raise FileNotFoundError(f"config file not found: {target}")
        return {}
    data = yaml.safe_load(target.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{target}: the config must be a YAML mapping, not {type(data).__name__}")
    models_dir = data.get("models_dir")
    if models_dir is not None and not Path(models_dir).expanduser().is_absolute():
        data["models_dir"] = str(target.resolve().parent / models_dir)
    return data


def load_settings(config: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build settings from the YAML file, the environment and `overrides` (flags), in
    increasing order of precedence. `None` overrides are ignored (an unset flag)."""
    token = _yaml_data.set(read_config_file(config))
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _yaml_data.reset(token)
