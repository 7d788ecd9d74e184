"""A request's affinity key: what it shares with earlier requests."""

from __future__ import annotations

from common.affinity import PREFIX_BYTES, affinity_key, leading_prompt
from common.jobs import JobKind

CHAT = JobKind.CHAT


def chat(*turns: tuple[str, str], **extra: object) -> dict[str, object]:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


def test_every_turn_of_a_conversation_has_its_first_turns_key() -> None:
    first = chat(("system", "You are terse."), ("user", "Name a prime."))
    later = chat(
        ("system", "You are terse."),
        ("user", "Name a prime."),
        ("assistant", "7"),
        ("user", "Another?"),
    )
    key = affinity_key(CHAT, first, None, None)
    assert key is not None and affinity_key(CHAT, later, None, None) == key
    other = chat(("system", "You are terse."), ("user", "Name a colour."))
    assert affinity_key(CHAT, other, None, None) != key  # another conversation


def test_a_long_shared_system_prompt_is_one_key_whatever_follows() -> None:
    system = "Rules. " * (PREFIX_BYTES // 4)
    a = chat(("system", system), ("user", "one"))
    b = chat(("system", system), ("user", "two"))
    assert affinity_key(CHAT, a, None, None) == affinity_key(CHAT, b, None, None)
    assert len(leading_prompt(CHAT, a).encode()) == PREFIX_BYTES


def test_explicit_key_then_session_then_prompt_and_tenants_apart() -> None:
    body = chat(("user", "hi"), prompt_cache_key="conv-1")
    by_prompt = affinity_key(CHAT, chat(("user", "hi")), None, "key_a")
    explicit = affinity_key(CHAT, body, "s-1", "key_a")
    assert explicit not in (None, by_prompt)
    assert (
        affinity_key(CHAT, {**body, "messages": [{"role": "user", "content": "x"}]}, None, "key_a")
        == explicit
    )
    assert affinity_key(CHAT, body, None, "key_b") != explicit  # another tenant's "conv-1"
    session = affinity_key(CHAT, chat(("user", "hi")), "s-1", "key_a")
    assert session not in (None, explicit, by_prompt)
    assert affinity_key(CHAT, chat(("user", "bye")), "s-1", "key_a") == session
    # a prompt's hash is the same for every tenant: the cache holds it for all of them
    assert affinity_key(CHAT, chat(("user", "hi")), None, "key_b") == by_prompt


def test_parts_completions_and_what_has_no_key() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = chat(("user", "x"))
    parts["messages"] = [{"role": "user", "content": [{"type": "text", "text": "see"}, image]}]
    other = {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}]}]}
    assert affinity_key(CHAT, parts, None, None) != affinity_key(CHAT, other, None, None)
    doc = "Once upon a time " * 400
    a = affinity_key(JobKind.COMPLETION, {"prompt": doc + "the end"}, None, None)
    b = affinity_key(JobKind.COMPLETION, {"prompt": doc + "and then"}, None, None)
    assert a is not None and a == b
    assert affinity_key(JobKind.COMPLETION, {"prompt": [1, 2, 3]}, None, None) is not None
    assert affinity_key(JobKind.EMBEDDING, {"input": "x"}, "s", None) is None
    assert affinity_key(CHAT, {"messages": []}, None, None) is None
