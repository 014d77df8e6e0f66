# Sourced by the scripts that run `ray start` clusters in a private network namespace (elastic_estep.sh,
# node_loss_estep.sh): loopback up, no token auth, a Ray temp folder of their own (`ray start` records its
# address there, ray_current_cluster, not in /tmp/ray), and the cluster stopped and removed on exit.
bin=$(dirname "$(command -v python)")
ip link set lo up
export RAY_AUTH_MODE=disabled
export RAY_TMPDIR=$(mktemp -d /tmp/rt-XXXXXX)
trap '"$bin/ray" stop --force >/dev/null 2>&1 || true; rm -rf "$RAY_TMPDIR"' EXIT
