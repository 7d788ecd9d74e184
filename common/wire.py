"""OpenAI wire models (requests and the few replies the gateway builds itself).

Request models check what Corral must rely on (a model name, non-empty messages, sane
numbers) and let every other field through (`extra="allow"`), so new OpenAI or llama.cpp
sampling fields reach llama-server untouched. Replies from llama-server are relayed as
they come; only the model list is built here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow")


def first_problem(
    errors: Sequence[Mapping[str, Any]], skip: tuple[str, ...] = ()
) -> tuple[str | None, str]:
    """The first of pydantic's `errors()` for people: its field as a dotted path (None for
    the whole object; parts in `skip` left out) and its message, without pydantic's own
    prefixes, input echoes or links."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in skip]
    message = str(first.get("msg", "Invalid value")).removeprefix("Value error, ")
    if first.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        message = "Input should be a JSON object"  # not "...or instance of <our class>"
    return ".".join(loc) or None, message


class StreamOptions(WireModel):
    include_usage: bool | None = None


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]  # OpenAI's


class ChatMessage(WireModel):
    role: Role  # a made-up one is a 400, as OpenAI answers
    # str, a list of content parts, or None (an assistant turn with tool calls)
    content: str | list[dict[str, Any]] | None = None


def _one_choice(n: int | None) -> int | None:
    """More than one choice per request is refused: llama-server would run each in a slot
    of its own while the task holds one worker slot, so the extra choices would wait
    inside llama-server, outside the priority queues."""
    if n is not None and n > 1:
        raise ValueError(
            "Corral serves one choice per request (n=1); send n requests for n choices"
        )
    return n


class _Generation(WireModel):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: Annotated[int | None, AfterValidator(_one_choice)] = Field(
        default=None, ge=1, json_schema_extra={"maximum": 1}
    )
    service_tier: str | None = None
    user: str | None = None
    # requests that share it go to the replica holding their prompt cache (`common.affinity`)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(WireModel):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


class RequestDefaults(BaseModel):
    """A model's request defaults (`defaults:` in its config, or set at run time): sampling
    fields a request does not set itself. Only these, so a default can never change what a
    request asks for (its model, its messages, whether it streams)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=5)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    typical_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None

    def fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ModelCard(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "corral"


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
