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
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "installing redis-server and redis-tools from Debian..." >&2
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release -p capkv >&2
WORK=$(mktemp -d /var/tmp/capkv-redis-diff.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
redis-server --port 16600 --dir "$WORK" --save '' --appendonly no --daemonize no \
  >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
"$ROOT/target/release/capkv" server --id 1 --data-dir "$WORK/capkv" \
  --listen 127.0.0.1:17601 --resp 127.0.0.1:16601 --http 127.0.0.1:18601 --json off \
  --replication-factor 1 >"$WORK/capkv.log" 2>&1 &
PIDS+=($!)
for port in 16600 16601; do
  for _ in $(seq 1 200); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
done
failed=0
for seed in $(seq 1 "$SEEDS"); do
  python3 bench/redis_diff.py "$seed" "$COMMANDS" 16600 16601 || failed=$((failed + 1))
done
echo "$failed of $SEEDS seeds had differences"
[ "$failed" = 0 ]
