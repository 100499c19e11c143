#!/usr/bin/env bash
# Sends the same random stream of string and key commands to Redis 7 and to a 1-node
# capkv (RESP) and compares every reply (bench/redis_diff.py). What it found is fixed or
# listed in docs/protocols.md.
#
#   bench/redis-diff.sh [--seeds N] [--commands M]    # default 16 seeds of 800 commands
#
# Installs redis-server from Debian when missing (needs root or sudo).
set -euo pipefail
SEEDS=16
COMMANDS=800
while [ $# -gt 0 ]; do
  case $1 in
    --seeds) SEEDS=$2; shift 2 ;;
    --commands) COMMANDS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
source bench/lib.sh
need_redis
cargo build --release -p capkv >&2
bench_setup redis-diff
redis-server --port 16600 --dir "$WORK" --save '' --appendonly no --daemonize no \
  >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
"$BIN" server --id 1 --data-dir "$WORK/capkv" \
  --listen 127.0.0.1:17601 --resp 127.0.0.1:16601 --http 127.0.0.1:18601 --json off \
  --replication-factor 1 >"$WORK/capkv.log" 2>&1 &
PIDS+=($!)
wait_resp_port 16600
wait_resp_port 16601
failed=0
for seed in $(seq 1 "$SEEDS"); do
  python3 bench/redis_diff.py "$seed" "$COMMANDS" 16600 16601 || failed=$((failed + 1))
done
echo "$failed of $SEEDS seeds had differences"
[ "$failed" = 0 ]
