#!/bin/sh
# One sentinel: it monitors the master the other sentinels know (or corral-valkey-0 on the
# very first start) under the name `corral`. Hostnames, not pod IPs, so that a pod that
# comes back with a new IP is still the same instance.
set -eu
skip="$(hostname)"
. "$(dirname "$0")/find-master.sh"
self="$(hostname).corral-sentinel.${POD_NAMESPACE}.svc.${domain}"
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
