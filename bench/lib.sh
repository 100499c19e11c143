# Shared by the bench scripts (sourced).

CLK_TCK=$(getconf CLK_TCK)

# Total user+system CPU ticks (CLK_TCK per second) of the given pids.
cpu_ticks() {
  local sum=0
  for p in "$@"; do
    local s
    s=$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null || echo "0 0")
    sum=$((sum + ${s% *} + ${s#* }))
  done
  echo $sum
}

# A private copy of the release binary ($BIN), a work dir under /var/tmp ($WORK) and the
# server pids ($PIDS), all cleaned up on exit (servers killed by pid). $1 names them.
bench_setup() {
  BIN=$(mktemp -t "capkv-$1-bin.XXXXXX")
  cp target/release/capkv "$BIN"
  chmod +x "$BIN"
  WORK=$(mktemp -d "/var/tmp/capkv-$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK" "$BIN"
}

# Whether the cluster at $2 (endpoints) is formed: every node up, every partition led
# ($1: the capkv binary).
cluster_formed() {
  "$1" status --endpoints "$2" --json 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if all(n["up"] and all(p["leader"] for p in n["partitions"]) for n in d["nodes"]) else 1)' 2>/dev/null
}

# Installs redis-server and redis-tools (redis-cli, redis-benchmark) from Debian when
# missing (needs root or sudo).
need_redis() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-benchmark >/dev/null 2>&1; then
    return 0
  fi
  echo "installing redis-server and redis-tools from Debian..." >&2
  local sudo=""
  [ "$(id -u)" != 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server redis-tools >/dev/null
}

# Waits until redis-cli PING answers on port $1 (a Redis or capkv's RESP port).
wait_resp_port() {
  for _ in $(seq 1 200); do
    if [ "$(redis-cli -p "$1" ping 2>/dev/null)" = "PONG" ]; then return 0; fi
    sleep 0.1
  done
  echo "nothing answers PING on port $1" >&2
  return 1
}
