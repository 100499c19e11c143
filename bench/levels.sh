#!/usr/bin/env bash
# Reads at every level (docs/benchmarks.md, "Read levels"): 3 nodes on loopback, get-16
# and get-64 at each level, with throughput, p99 and the share of reads each node served.
# Then the same with one partition whose leader's node shares CPU 0 with the load
# generator while the followers have CPU 1 (taskset): reads the leader serves alone are
# limited to one core, and levels the followers serve can use the other; then what each
# level does during a partition (the partition_reads example).
#
#   bench/levels.sh [--duration 10s] [--partition-seconds 5] [--only-pinned]
#
# Needs a release build (cargo build --release) and, for the partition part, the example
# (cargo build --release -p capkv --example partition_reads).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=10s
PSECONDS=5
ONLY_PINNED=""
PIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --partition-seconds) PSECONDS=$2; shift 2 ;;
    --only-pinned) ONLY_PINNED=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

LEVELS="linearizable linearizable-follower bounded:5 bounded:100ms session prefix eventual"
CLUSTER="1=127.0.0.1:17679,2=127.0.0.1:17680,3=127.0.0.1:17681"
ENDPOINTS="127.0.0.1:17679,127.0.0.1:17680,127.0.0.1:17681"
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup levels

start_cluster() {
  rm -rf "$WORK"/node-*
  PIDS=()
  for i in 1 2 3; do
    RUST_LOG=warn "$BIN" server --id "$i" --data-dir "$WORK/node-$i" --listen "127.0.0.1:$((17678 + i))" \
      --http "127.0.0.1:$((18678 + i))" --initial-cluster "$CLUSTER" --partitions "$1" \
      >>"$WORK/node-$i.log" 2>&1 &
    PIDS+=($!)
  done
  for _ in $(seq 1 300); do
    cluster_formed "$BIN" "$ENDPOINTS" && return 0
    sleep 0.2
  done
  echo "the cluster did not form; logs in $WORK" >&2
  exit 1
}

stop_cluster() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}

# One row: level, clients, then the bench's JSON.
row() {
  python3 - "$@" <<'PY'
import json, sys
level, clients, raw = sys.argv[1], sys.argv[2], sys.argv[3]
r = json.loads(raw)
by = r.get("served_by", {})
total = sum(by.values()) or 1
share = " / ".join("%.0f%%" % (100.0 * by.get(str(n), 0) / total) for n in (1, 2, 3))
print("| %s | %s | %.0f | %.2f | %s | %d |" % (level, clients, r["ops_per_sec"], r["p99_ms"], share, r["errors"]))
PY
}

bench_levels() {
  local preload="" json
  for level in $LEVELS; do
    for clients in 16 64; do
      # shellcheck disable=SC2086
      json=$($PIN "$BIN" bench --target capkv --endpoints "$ENDPOINTS" --workload get --clients "$clients" \
        --conns 8 --duration "$DURATION" --warmup 2s --keys 10000 --key-size 8 --value-size 256 \
        --consistency "$level" $preload --json)
      preload="--no-preload"
      row "$level" "$clients" "$json"
    done
  done
}

header() {
  echo "| level | clients | ops/s | p99 ms | served by node 1 / 2 / 3 | errors |"
  echo "|---|---|---|---|---|---|"
}

if [ -z "$ONLY_PINNED" ]; then
echo "### 3 nodes, 8 partitions (leaders spread), no pinning"
echo
header
start_cluster 8
bench_levels
stop_cluster
fi

echo
echo "### 3 nodes, 1 partition: the leader's node and the load generator on CPU 0, the followers on CPU 1"
echo
start_cluster 1
leader=$("$BIN" status --endpoints "$ENDPOINTS" --json |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print([p["leader"] for n in d["nodes"] for p in n["partitions"] if p["leader"]][0])')
for i in 1 2 3; do
  cpu=1
  [ "$i" = "$leader" ] && cpu=0
  taskset -a -p -c "$cpu" "${PIDS[$((i - 1))]}" >/dev/null
done
PIN="taskset -c 0"
echo "(leader: node $leader)"
echo
header
LEVELS="linearizable linearizable-follower bounded:100ms session eventual"
bench_levels
stop_cluster
PIN=""
[ -n "$ONLY_PINNED" ] && exit 0

echo
echo "### During a partition"
echo
target/release/examples/partition_reads "$PSECONDS"
