#!/usr/bin/env bash
# What partitions cost: for each partition count, 3 nodes on loopback (RF 3) are started,
# timed until every partition has a leader, left idle, then loaded with put-16. Prints a
# markdown table: formation time, idle CPU and RSS, put-16 throughput, and per put the
# server CPU, fsyncs, peer message batches, context switches, and writes per Raft entry
# (the engine's counters).
#
#   bench/scale.sh [--partitions "8 64 256 1024"] [--idle 10]
#                  [--duration 15s]
#
# Durable as always (fsync before every acknowledgement). Needs a release build.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNTS="8 64 256 1024"
ENGINES="raftstore"
IDLE=10
DURATION=15s
while [ $# -gt 0 ]; do
  case "$1" in
    --partitions) COUNTS=$2; shift 2 ;;
    --idle) IDLE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done


CLUSTER="1=127.0.0.1:17579,2=127.0.0.1:17580,3=127.0.0.1:17581"
ENDPOINTS="127.0.0.1:17579,127.0.0.1:17580,127.0.0.1:17581"
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup scale

# Sum over the three nodes of an engine counter (capkv_engine_events{event=...}), or "".
engine_counter() {
  local sum="" v
  for i in 1 2 3; do
    v=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' \
      "http://127.0.0.1:$((18578 + i))/metrics" 2>/dev/null |
      awk -v ev="$1" 'index($1, "capkv_engine_events{") == 1 && index($1, "event=\"" ev "\"") { print $2 }')
    [ -n "$v" ] && sum=$(( ${sum:-0} + ${v%.*} ))
  done
  echo "$sum"
}

# Voluntary + involuntary context switches of the given pids (all their threads).
ctx_switches() {
  local sum=0 p t
  for p in "$@"; do
    for t in /proc/"$p"/task/*/status; do
      sum=$((sum + $(awk '/ctxt_switches/ { s += $2 } END { print s + 0 }' "$t" 2>/dev/null || echo 0)))
    done
  done
  echo $sum
}

echo "| engine | partitions | formed s | idle CPU % of a core (3 servers) | RSS MB per node (max) | put-16 ops/s | CPU ms / put | fsyncs / put | batches / put | ctx switches / put | writes / entry |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for engine in $ENGINES; do
  for n in $COUNTS; do
    rm -rf "$WORK"/node-*
    PIDS=()
    start=$(date +%s.%N)
    for i in 1 2 3; do
      RUST_LOG=warn "$BIN" server --id "$i" --data-dir "$WORK/node-$i" --listen "127.0.0.1:$((17578 + i))" \
        --http "127.0.0.1:$((18578 + i))" --initial-cluster "$CLUSTER" --partitions "$n" \
        >>"$WORK/$engine-$n-$i.log" 2>&1 &
      PIDS+=($!)
    done
    formed=""
    for _ in $(seq 1 600); do
      if cluster_formed "$BIN" "$ENDPOINTS"; then
        formed=$(python3 -c "import sys; print('%.1f' % (float(sys.argv[1]) - float(sys.argv[2])))" "$(date +%s.%N)" "$start")
        break
      fi
      sleep 0.2
    done
    [ -n "$formed" ] || { echo "the $engine cluster with $n partitions did not form; logs in $WORK" >&2; exit 1; }
    # Settle (leader balancing, groups falling asleep), then measure idle.
    sleep 5
    before=$(cpu_ticks "${PIDS[@]}")
    sleep "$IDLE"
    after=$(cpu_ticks "${PIDS[@]}")
    idle=$(python3 -c "import sys; print('%.1f' % ((int(sys.argv[1]) / int(sys.argv[2])) / float(sys.argv[3]) * 100))" $((after - before)) "$CLK_TCK" "$IDLE")
    rss=0
    for p in "${PIDS[@]}"; do
      r=$(awk '/VmRSS/ { print int($2 / 1024) }' "/proc/$p/status")
      [ "$r" -gt "$rss" ] && rss=$r
    done
    f0=$(engine_counter fsyncs); b0=$(engine_counter peer_batches_sent)
    w0=$(engine_counter proposals); e0=$(engine_counter entries_proposed)
    c0=$(ctx_switches "${PIDS[@]}")
    before=$(cpu_ticks "${PIDS[@]}")
    json=$("$BIN" bench --target capkv --endpoints "$ENDPOINTS" --workload put --clients 16 \
      --conns 8 --duration "$DURATION" --warmup 2s --keys 100000 --key-size 8 --value-size 256 --json)
    after=$(cpu_ticks "${PIDS[@]}")
    c1=$(ctx_switches "${PIDS[@]}")
    f1=$(engine_counter fsyncs); b1=$(engine_counter peer_batches_sent)
    w1=$(engine_counter proposals); e1=$(engine_counter entries_proposed)
    python3 - "$json" $((after - before)) "$CLK_TCK" $((c1 - c0)) "$engine" "$n" "$formed" "$idle" "$rss" \
      "$f0" "$f1" "$b0" "$b1" "$w0" "$w1" "$e0" "$e1" <<'PY'
import json, sys
a = sys.argv
r = json.loads(a[1]); ops = max(r["ops"], 1)
cpu = int(a[2]) / int(a[3])
def per(x0, x1, d):
    if x0 == "" or x1 == "":
        return "-"
    return "%.2f" % ((int(x1) - int(x0)) / d)
# The bench counts each put once; the engine counters sum the three nodes, and only the
# leaders propose, so proposals count each put once too.
writes = "-" if a[14] == "" else (int(a[15]) - int(a[14]))
entries = "-" if a[16] == "" else (int(a[17]) - int(a[16]))
wpe = "-" if writes == "-" or not entries else "%.2f" % (writes / entries)
print("| %s | %s | %s | %s | %s | %.0f | %.3f | %s | %s | %.1f | %s |" % (
    a[5], a[6], a[7], a[8], a[9], r["ops_per_sec"], cpu / ops * 1000,
    per(a[10], a[11], ops), per(a[12], a[13], ops), int(a[4]) / ops, wpe))
PY
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  done
done
