from __future__ import annotations

from common import redis_keys
from common.priority import Priority


def test_queue_names_sort_in_priority_order() -> None:
    names = [redis_keys.queue_name("m", p) for p in (Priority.LOW, Priority.HIGH, Priority.NORMAL)]
    assert sorted(names) == ["p1-high.m", "p2-normal.m", "p3-low.m"]
    assert redis_keys.model_queues("m") == ["p1-high.m", "p2-normal.m", "p3-low.m"]


def test_queue_names_keep_dotted_aliases_readable() -> None:
    assert redis_keys.queue_name("llama-3.1-8b", Priority.HIGH) == "p1-high.llama-3.1-8b"


def test_channel_round_trips_request_id_and_matches_pattern() -> None:
    import fnmatch

    ch = redis_keys.channel("gw-1", "req_abc")
    assert redis_keys.request_id_of(ch) == "req_abc"
    assert fnmatch.fnmatchcase(ch, redis_keys.channel_pattern("gw-1"))
    assert not fnmatch.fnmatchcase(ch, redis_keys.channel_pattern("gw-2"))


def test_all_keys_share_the_prefix() -> None:
    for name in (
        redis_keys.cancel_key("r"),
        redis_keys.claim_key("t"),
        redis_keys.worker_key("w"),
        redis_keys.WORKERS,
        redis_keys.CATALOG,
    ):
        assert name.startswith("corral:")
