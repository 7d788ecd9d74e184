#!/bin/sh
# One Valkey of the Sentinel set: a replica of the current master, or the master itself
# when no sentinel knows one yet (the very first start: corral-valkey-0). A former master
# that restarts after a failover finds the new one here and follows it.
set -eu
. "$(dirname "$0")/find-master.sh"
self="$(hostname).corral-valkey.${POD_NAMESPACE}.svc.${domain}"
set -- --appendonly yes --appendfsync everysec --maxmemory 1536mb \
  --maxmemory-policy noeviction --dir /data --save "" --replica-announce-ip "$self"
if [ "$master" != "$self" ]; then
  set -- "$@" --replicaof "$master" 6379
fi
echo "valkey: $self, master $master"
exec valkey-server "$@"
