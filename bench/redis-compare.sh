#!/usr/bin/env bash
# redis-benchmark against capkv's Redis protocol and against Redis 7 on this machine, in
# one run, and prints a markdown table for docs/benchmarks.md:
#
#   bench/redis-compare.sh            # 200,000 requests per cell
#   bench/redis-compare.sh --quick    # 20,000 requests per cell (smoke run)
#
# Systems: capkv 1 node (replication factor 1), capkv 3 nodes (RF 3; redis-benchmark on
# node 1, which forwards the writes of partitions other nodes lead), Redis with
# `appendfsync always` (durable: fsync before answering, like capkv), Redis with no
# persistence. Cells: SET and GET, 16 connections, without and with 16-deep pipelines,
# over 100,000 random keys (`-r`: the same key in every request would serialize capkv's
# pipelines, which keep order per key) and 256-byte values. Only one system runs at a
# time. Installs redis-server and redis-tools from Debian when missing (needs root or sudo).
set -euo pipefail

N=200000
while [ $# -gt 0 ]; do
  case $1 in
    --quick) N=20000; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# shellcheck source=bench/lib.sh
source bench/lib.sh
need_redis
cargo build --release -p capkv >&2
bench_setup redis-bench

stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

# One cell: requests per second of test $2 (set|get) on port $1, pipeline $3.
cell() {
  redis-benchmark -p "$1" -t "$2" -c 16 -n "$N" -r 100000 -d 256 -P "$3" --csv 2>/dev/null \
    | awk -F'","' 'NR==2 { gsub(/"/, "", $2); print int($2) }'
}

# Runs on a shared 2-core machine vary a lot in requests/s; the server's CPU per request
# (every process in PIDS, bench/lib.sh's cpu_ticks) varies much less, so the table gives
# both.
declare -A R C
run_system() { # name port
  local name=$1 port=$2 before
  # Fill the keyspace first so GET reads values.
  redis-benchmark -p "$port" -t set -c 16 -n 100000 -r 100000 -d 256 -P 16 -q >/dev/null 2>&1 || true
  for p in 1 16; do
    for t in set get; do
      before=$(cpu_ticks "${PIDS[@]}")
      R[$name,$t,$p]=$(cell "$port" "$t" "$p")
      # Server CPU microseconds per request.
      C[$name,$t,$p]=$(( ($(cpu_ticks "${PIDS[@]}") - before) * 1000000 / CLK_TCK / N ))
      echo "$name $t -P $p: ${R[$name,$t,$p]} requests/s, ${C[$name,$t,$p]} µs CPU/request" >&2
    done
  done
}

# --- capkv, 1 node, RF 1 ------------------------------------------------------------------
"$BIN" server --id 1 --data-dir "$WORK/c1" --listen 127.0.0.1:17379 --resp 127.0.0.1:16379 \
  --http 127.0.0.1:18379 --json off --replication-factor 1 >"$WORK/c1.log" 2>&1 &
PIDS+=($!)
wait_resp_port 16379
run_system "capkv 1 node" 16379
stop_all

# --- capkv, 3 nodes, RF 3 ----------------------------------------------------------------
CLUSTER="1=127.0.0.1:17381,2=127.0.0.1:17382,3=127.0.0.1:17383"
for i in 1 2 3; do
  "$BIN" server --id "$i" --data-dir "$WORK/n$i" --initial-cluster "$CLUSTER" \
    --resp "127.0.0.1:1638$i" --http "127.0.0.1:1838$i" --json off >"$WORK/n$i.log" 2>&1 &
  PIDS+=($!)
done
for i in 1 2 3; do wait_resp_port "1638$i"; done
# Every partition has a leader once a write to each goes through.
for k in $(seq 1 64); do redis-cli -p 16381 set "warm:$k" x >/dev/null; done
run_system "capkv 3 nodes" 16381
stop_all

# --- Redis 7, appendfsync always ----------------------------------------------------------
mkdir -p "$WORK/redis-aof" "$WORK/redis-mem"
redis-server --port 16400 --dir "$WORK/redis-aof" --appendonly yes --appendfsync always \
  --save '' --daemonize no >"$WORK/redis-aof.log" 2>&1 &
PIDS+=($!)
wait_resp_port 16400
run_system "Redis, appendfsync always" 16400
stop_all

# --- Redis 7, no persistence --------------------------------------------------------------
redis-server --port 16401 --dir "$WORK/redis-mem" --appendonly no --save '' \
  --daemonize no >"$WORK/redis-mem.log" 2>&1 &
PIDS+=($!)
wait_resp_port 16401
run_system "Redis, no persistence" 16401
stop_all

echo
echo "| system | SET -c 16 | GET -c 16 | SET -c 16 -P 16 | GET -c 16 -P 16 |"
echo "|---|---|---|---|---|"
for s in "capkv 1 node" "capkv 3 nodes" "Redis, appendfsync always" "Redis, no persistence"; do
  echo "| $s | ${R[$s,set,1]} | ${R[$s,get,1]} | ${R[$s,set,16]} | ${R[$s,get,16]} |"
done
echo
echo "| server CPU µs per request | SET -c 16 | GET -c 16 | SET -c 16 -P 16 | GET -c 16 -P 16 |"
echo "|---|---|---|---|---|"
for s in "capkv 1 node" "capkv 3 nodes" "Redis, appendfsync always" "Redis, no persistence"; do
  echo "| $s | ${C[$s,set,1]} | ${C[$s,get,1]} | ${C[$s,set,16]} | ${C[$s,get,16]} |"
done
echo
echo "requests/s; redis-benchmark $(redis-benchmark --version 2>/dev/null | head -1 | awk '{print $2}'), $N requests per cell, 100,000 random keys, 256-byte values, $(nproc) cores"
