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


def test_a_replicas_affinity_queues_sort_just_before_their_shared_queue() -> None:
    """kombu's sorted BRPOP takes a replica's own requests of a priority first, and still
    every high request before any normal one, whatever the alias or worker id."""
    for alias, worker in (("m", "w1@host"), ("A.b-1", "0-worker@x"), ("zz", "~")):
        consumed = [*redis_keys.consumed_queues(alias, worker), redis_keys.worker_queue(worker)]
        order = sorted(consumed)
        assert order[1:] == [
            redis_keys.affinity_queue(alias, Priority.HIGH, worker),
            redis_keys.queue_name(alias, Priority.HIGH),
            redis_keys.affinity_queue(alias, Priority.NORMAL, worker),
            redis_keys.queue_name(alias, Priority.NORMAL),
            redis_keys.affinity_queue(alias, Priority.LOW, worker),
            redis_keys.queue_name(alias, Priority.LOW),
            redis_keys.batch_queue(alias),
        ]


def test_kombu_binding_keys_are_kombus_own() -> None:
    from kombu.transport.redis import Channel

    q = "p1-high+m@w"
    assert redis_keys.kombu_bindings(q) == [
        Channel.keyprefix_queue % (q,),
        Channel.keyprefix_binding_permanent % (q,),
    ]
