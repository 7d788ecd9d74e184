"""Memory is a property of the device, not of the worker: every worker on one GPU (or on one
host's CPU) reserves what its model needs from that device's ledger, atomically, so one
large model or several small ones fit the same device without a static split.

A device is named by its GPU's UUID (`gpu:GPU-…`, the same whichever container or index
sees it) or by its host (`cpu:<hostname>`); `corral worker --device` names another one
(tests run several "machines" on one host that way). The ledger is a Redis hash
(`redis_keys.device_key`):

    budget:<worker>    MiB the device holds, as that worker was told (flags) or measured
    reserved:<worker>  MiB its model holds, or is being loaded into

Only live workers count (their registry entry has not expired): a dead worker's fields are
dropped by the next reservation. The device's budget is the smallest that a live worker
announced (workers of one device should agree; the smallest never over-commits). The
worker-side scripts are here next to `read_room`, the gateway's reading of the same hash,
so both apply one rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

BUDGET, RESERVED = "budget:", "reserved:"


def gpu_device(uuid: str) -> str:
    return f"gpu:{uuid}"


def cpu_device(host: str) -> str:
    return f"cpu:{host}"


@dataclass(frozen=True)
class Room:
    """One device's memory as its ledger says, live workers only."""

    budget_mb: int | None  # None: no live worker announced one
    reserved: Mapping[str, int] = field(default_factory=dict)  # worker -> MiB

    @property
    def reserved_mb(self) -> int:
        return sum(self.reserved.values())

    def free_mb(self, but: str | None = None) -> int | None:
        """MiB not reserved (by anyone but `but`, whose own reservation counts as free)."""
        if self.budget_mb is None:
            return None
        return self.budget_mb - sum(mb for w, mb in self.reserved.items() if w != but)


def read_room(raw: Mapping[str, str], live: set[str]) -> Room:
    """A ledger hash as `Room`, counting only `live` workers (the reservation script's rule)."""
    budgets: list[int] = []
    reserved: dict[str, int] = {}
    for name, value in raw.items():
        kind, _, worker = name.partition(":")
        if worker not in live:
            continue
        if kind + ":" == BUDGET:
            budgets.append(int(value))
        elif kind + ":" == RESERVED:
            reserved[worker] = int(value)
    return Room(min(budgets) if budgets else None, reserved)


# Reserve memory for a worker's model if the device has room, atomically over every worker
# of the device, so two loads never both take the last free MiB; dead workers' fields are
# dropped on the way. (It reads the registry keys it finds in the ledger, which it cannot
# declare in advance: fine on one Redis, which is all kombu supports.)
# KEYS: the ledger. ARGV: the worker, MiB wanted (0: only drop the dead and report), the
# registry key prefix. Returns {1 if reserved else 0, the budget (-1: none), MiB reserved
# by the other live workers}.
RESERVE_LUA = """
local me, want, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local raw = redis.call('HGETALL', KEYS[1])
local alive, budget, others = {}, nil, 0
for i = 1, #raw, 2 do
  local kind, w = string.match(raw[i], '^(%a+):(.+)$')
  if w then
    if alive[w] == nil then
      alive[w] = w == me or redis.call('EXISTS', prefix .. w) == 1
      if not alive[w] then redis.call('HDEL', KEYS[1], 'budget:' .. w, 'reserved:' .. w) end
    end
    if alive[w] then
      local mb = tonumber(raw[i + 1])
      if kind == 'budget' and (budget == nil or mb < budget) then budget = mb end
      if kind == 'reserved' and w ~= me then others = others + mb end
    end
  end
end
if budget == nil then return {0, -1, others} end
if want <= 0 then return {1, budget, others} end
if others + want > budget then return {0, budget, others} end
redis.call('HSET', KEYS[1], 'reserved:' .. me, want)
return {1, budget, others}
"""
