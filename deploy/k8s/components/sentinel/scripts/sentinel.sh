#!/bin/sh
# One sentinel: it monitors the master the other sentinels know (or corral-valkey-0 on the
# very first start) under the name `corral`. Hostnames, not pod IPs, so that a pod that
# comes back with a new IP is still the same instance.
set -eu
domain="${CLUSTER_DOMAIN:-cluster.local}"
self="$(hostname).corral-sentinel.${POD_NAMESPACE}.svc.${domain}"
master=""
for i in 0 1 2; do
  [ "corral-sentinel-$i" = "$(hostname)" ] && continue
  reply=$(valkey-cli -t 2 -h "corral-sentinel-$i.corral-sentinel" -p 26379 --raw \
    sentinel get-master-addr-by-name corral 2>/dev/null) || continue
  host=$(echo "$reply" | sed -n 1p)
  port=$(echo "$reply" | sed -n 2p)
  case "$port" in '' | *[!0-9]*) continue ;; esac
  master="$host"
  break
done
[ -n "$master" ] || master="corral-valkey-0.corral-valkey.${POD_NAMESPACE}.svc.${domain}"
# Tuning: down-after-milliseconds is how long the master may be silent before a failover
# starts (the failover test runs with 1000; 5000 rides out a node's short hiccups).
cat > "${SENTINEL_CONF:-/data/sentinel.conf}" <<CONF
port 26379
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $self
sentinel monitor corral $master 6379 2
sentinel down-after-milliseconds corral 5000
sentinel failover-timeout corral 60000
sentinel parallel-syncs corral 1
CONF
echo "sentinel: $self, monitoring $master"
exec valkey-server "${SENTINEL_CONF:-/data/sentinel.conf}" --sentinel
