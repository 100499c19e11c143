#!/usr/bin/env bash
# Compares capkv's two replication engines on this machine: 3 nodes on loopback, the same
# client (`capkv bench`), one engine's cluster at a time. Prints a markdown table.
#
#   bench/engines.sh [--duration 20s] [--partitions 8] [--engines "openraft raftstore"]
#                    [--cells "put 16,put 64,get 16"]
#
# Durable as always (fsync before every acknowledgement). Needs a release build.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=20s
PARTITIONS=8
ENGINES="openraft raftstore"
CELLS=("put 16" "put 64" "get 16")
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --partitions) PARTITIONS=$2; shift 2 ;;
    --engines) ENGINES=$2; shift 2 ;;
    --cells) IFS=',' read -ra CELLS <<<"$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done


CLUSTER="1=127.0.0.1:17479,2=127.0.0.1:17480,3=127.0.0.1:17481"
ENDPOINTS="127.0.0.1:17479,127.0.0.1:17480,127.0.0.1:17481"
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup engines

echo "| engine | partitions | workload | clients | ops/s | p50 / p99 ms | server CPU ms / op |"
echo "|---|---|---|---|---|---|---|"
for engine in $ENGINES; do
  rm -rf "$WORK"/node-*
  PIDS=()
  for i in 1 2 3; do
    RUST_LOG=warn "$BIN" server --id "$i" --data-dir "$WORK/node-$i" --listen "127.0.0.1:$((17478 + i))" \
      --http "127.0.0.1:$((18478 + i))" --initial-cluster "$CLUSTER" --partitions "$PARTITIONS" \
      --engine "$engine" >>"$WORK/$engine-$i.log" 2>&1 &
    PIDS+=($!)
  done
  ready=0
  for _ in $(seq 1 240); do
    if cluster_formed "$BIN" "$ENDPOINTS"; then
      ready=1; break
    fi
    sleep 0.5
  done
  [ $ready = 1 ] || { echo "the $engine cluster did not become ready; logs in $WORK" >&2; exit 1; }
  sleep 4 # leader balancing (openraft) settles
  for cell in "${CELLS[@]}"; do
    read -r workload clients <<<"$cell"
    before=$(cpu_ticks "${PIDS[@]}")
    json=$("$BIN" bench --target capkv --endpoints "$ENDPOINTS" --workload "$workload" --clients "$clients" \
      --conns 8 --duration "$DURATION" --warmup 2s --keys 100000 --key-size 8 --value-size 256 --json)
    after=$(cpu_ticks "${PIDS[@]}")
    python3 -c '
import json, sys
r = json.loads(sys.argv[1]); cpu = int(sys.argv[2]) / int(sys.argv[3])
print("| %s | %s | %s | %s | %.0f | %.2f / %.2f | %.3f |" % (sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7],
      r["ops_per_sec"], r["p50_ms"], r["p99_ms"], cpu / max(r["ops"], 1) * 1000))
' "$json" $((after - before)) "$CLK_TCK" "$engine" "$PARTITIONS" "$workload" "$clients"
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
done
