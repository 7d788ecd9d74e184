# Sourced by valkey.sh and sentinel.sh: sets `master` to the master the sentinels know (a
# DNS name, as they announce it), else to the first Valkey's (the set's very first start),
# and `domain` to the cluster's DNS domain. A sentinel named in `skip` is not asked.
domain="${CLUSTER_DOMAIN:-cluster.local}"
master=""
for i in 0 1 2; do
  [ "corral-sentinel-$i" = "${skip:-}" ] && continue
  reply=$(valkey-cli -t 2 -h "corral-sentinel-$i.corral-sentinel" -p 26379 --raw \
    sentinel get-master-addr-by-name corral 2>/dev/null) || continue
  host=$(echo "$reply" | sed -n 1p)
  port=$(echo "$reply" | sed -n 2p)
  case "$port" in '' | *[!0-9]*) continue ;; esac  # an error reply is no address
  master="$host"
  break
done
[ -n "$master" ] || master="corral-valkey-0.corral-valkey.${POD_NAMESPACE}.svc.${domain}"
