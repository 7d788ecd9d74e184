"""Prefix affinity: which replica a request should go to for its prompt cache.

llama-server keeps each slot's last prompt (and, with `--cache-ram`, more in host memory),
so a conversation's next turn, or any request sharing a long system prompt, skips most of
its prompt processing on the replica that served the previous one. A request's affinity
key names what it shares with earlier requests, in this order:

1. OpenAI's `prompt_cache_key` field (the client says what to group by);
2. the `X-Session-ID` header;
3. a hash of its leading prompt: for a chat, the system (and developer) messages and the
   first user message, the part every turn of a conversation repeats; for a completion,
   the prompt's first `PREFIX_BYTES`. Capped at `PREFIX_BYTES`, so requests that share a
   long system prompt share a key.

The first two are namespaced by the API key that sent them (two tenants' "session 1" are
not one session); a prompt's hash is not (a shared prefix is shared in the cache too).
Embeddings have no key: they keep no prompt cache.

The worker that runs a request remembers its key (`redis_keys.affinity_key`); the next
request with the key goes to that replica (`gateway.queueing.affinity`). When replicas
join or leave, only the keys of a replica that left move, each to whichever replica is
free first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from common.jobs import JobKind

PREFIX_BYTES = 4096  # of the rendered leading prompt: past this, requests share a key
AFFINITY_TTL_S = 3600  # a key's last replica is remembered this long after its last request
LEADING_ROLES = ("system", "developer")


def _digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def affinity_key(
    kind: JobKind, body: Mapping[str, Any], session: str | None, owner: str | None
) -> str | None:
    """The request's affinity key (a hex digest), or None when it has none."""
    if kind is JobKind.EMBEDDING:
        return None
    explicit = body.get("prompt_cache_key")
    if isinstance(explicit, str) and explicit:
        return _digest("key", owner or "-", explicit)
    if session and session.strip():
        return _digest("session", owner or "-", session.strip())
    leading = leading_prompt(kind, body)
    return _digest("prefix", leading) if leading else None


def leading_prompt(kind: JobKind, body: Mapping[str, Any]) -> str:
    """The part of the prompt that later requests of the same conversation repeat, rendered
    and cut at `PREFIX_BYTES` ("": nothing to go by)."""
    if kind is JobKind.CHAT:
        text = _leading_messages(body.get("messages"))
    else:
        text = _prompt_text(body.get("prompt"))
    return text.encode("utf-8", "surrogatepass")[:PREFIX_BYTES].decode("utf-8", "ignore")


def _leading_messages(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    out: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = str(message.get("role", ""))
        out.append(f"{role}\x1f{_content_text(message.get('content'))}\x1e")
        if role not in LEADING_ROLES:  # the first user (or other) message ends the lead
            break
    return "".join(out)


def _content_text(content: Any) -> str:
    """A message's content as text: its text parts, and for other parts their JSON (an
    image's URL names the image)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                parts.append(json.dumps(part, sort_keys=True)[:PREFIX_BYTES])
        return "\x1d".join(parts)
    return "" if content is None else json.dumps(content, sort_keys=True)[:PREFIX_BYTES]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:  # a batch of prompts, or one prompt's tokens
        first = prompt[0]
        if isinstance(first, str):
            return first
        return json.dumps(prompt if isinstance(first, int) else first)[:PREFIX_BYTES]
    return ""


# KEYS: a replica's affinity queue, the shared queue of its model and priority. Moves every
# message to the end of the shared queue that is served next, the oldest served first:
# they have waited already. Returns how many moved.
GIVE_BACK_LUA = """
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
return n
"""
