from __future__ import annotations

from common import keys
from common.priority import Priority


def test_queue_names_sort_in_priority_order() -> None:
    names = [keys.queue_name("m", p) for p in (Priority.LOW, Priority.HIGH, Priority.NORMAL)]
    assert sorted(names) == ["p1-high.m", "p2-normal.m", "p3-low.m"]
    assert keys.model_queues("m") == ["p1-high.m", "p2-normal.m", "p3-low.m"]


def test_queue_names_keep_dotted_aliases_readable() -> None:
    assert keys.queue_name("llama-3.1-8b", Priority.HIGH) == "p1-high.llama-3.1-8b"


def test_channel_round_trips_request_id_and_matches_pattern() -> None:
    import fnmatch

    ch = keys.channel("gw-1", "req_abc")
    assert keys.request_id_of(ch) == "req_abc"
    assert fnmatch.fnmatchcase(ch, keys.channel_pattern("gw-1"))
    assert not fnmatch.fnmatchcase(ch, keys.channel_pattern("gw-2"))


def test_all_keys_share_the_prefix() -> None:
    for name in (keys.cancel_key("r"), keys.claim_key("t"), keys.worker_key("w"),
                 keys.WORKERS, keys.CATALOG):  # fmt: skip
        assert name.startswith("corral:")
