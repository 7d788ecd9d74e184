#!/bin/sh
# One Valkey of the Sentinel set: a replica of the current master, or the master itself
# when no sentinel knows one yet (the very first start: corral-valkey-0). A former master
# that restarts after a failover finds the new one here and follows it.
set -eu
domain="${CLUSTER_DOMAIN:-cluster.local}"
self="$(hostname).corral-valkey.${POD_NAMESPACE}.svc.${domain}"
master=""
for i in 0 1 2; do
  reply=$(valkey-cli -t 2 -h "corral-sentinel-$i.corral-sentinel" -p 26379 --raw \
    sentinel get-master-addr-by-name corral 2>/dev/null) || continue
  host=$(echo "$reply" | sed -n 1p)
  port=$(echo "$reply" | sed -n 2p)
  case "$port" in '' | *[!0-9]*) continue ;; esac
  master="$host"
  break
done
[ -n "$master" ] || master="corral-valkey-0.corral-valkey.${POD_NAMESPACE}.svc.${domain}"
set -- --appendonly yes --appendfsync everysec --maxmemory 1536mb \
  --maxmemory-policy noeviction --dir /data --save "" --replica-announce-ip "$self"
if [ "$master" != "$self" ]; then
  set -- "$@" --replicaof "$master" 6379
fi
echo "valkey: $self, master $master"
exec valkey-server "$@"
