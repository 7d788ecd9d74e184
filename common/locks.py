"""Locks in Redis: a key holding its holder's token, with a TTL. Released only by its
holder, with one compare-and-delete script, so a late release never frees a lock someone
else took after it expired. Used for placement (one load per cold model) and for the
gateway duties one gateway at a time carries (`gateway.leader`)."""

from __future__ import annotations

# KEYS: the lock. ARGV: the holder's token. Deletes it only if the token still holds it.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
