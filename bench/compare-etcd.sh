#!/usr/bin/env bash
# Side-by-side benchmark of capkv and etcd on this machine, with the same client
# (`capkv bench`), and writes docs/benchmarks.md.
#
#   bench/compare-etcd.sh            # full matrix, 20 s per cell
#   bench/compare-etcd.sh --quick    # a few seconds per cell (smoke run)
#
# Installs etcd-server/etcd-client from Debian if `etcd` is missing (needs root or sudo).
# Everything runs on loopback; both systems keep data on the same disk and are durable
# (etcd defaults; capkv fsyncs before acknowledging). Only the system under test is loaded
# at a time, and the order alternates between cells so drift hits both alike.
set -euo pipefail

QUICK=0
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if ! command -v etcd >/dev/null 2>&1; then
  echo "installing etcd-server and etcd-client from Debian..." >&2
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server etcd-client >/dev/null
fi

cargo build --release -p capkv >&2
BIN="$ROOT/target/release/capkv"
WORK=$(mktemp -d /var/tmp/capkv-bench.XXXXXX)
PIDS_ETCD=()
PIDS_CAPKV=()
cleanup() {
  for p in "${PIDS_ETCD[@]}" "${PIDS_CAPKV[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ $QUICK = 1 ]; then DURATION=3s; WARMUP=1s; else DURATION=20s; WARMUP=2s; fi
KEYS=100000
KEY_SIZE=8
VALUE_SIZE=256

# --- etcd: 3 members on loopback -------------------------------------------------------
ETCD_CLUSTER="e1=http://127.0.0.1:12380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380"
ETCD_ENDPOINTS="127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$WORK/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:${i}2379" --advertise-client-urls "http://127.0.0.1:${i}2379" \
    --listen-peer-urls "http://127.0.0.1:${i}2380" --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
    --initial-cluster "$ETCD_CLUSTER" --initial-cluster-state new --initial-cluster-token capkv-bench \
    --logger zap --log-level error >"$WORK/etcd-$i.log" 2>&1 &
  PIDS_ETCD+=($!)
done

# --- capkv: 3 nodes on loopback ----------------------------------------------------------
CAPKV_CLUSTER="1=127.0.0.1:17379,2=127.0.0.1:17380,3=127.0.0.1:17381"
CAPKV_ENDPOINTS="127.0.0.1:17379,127.0.0.1:17380,127.0.0.1:17381"
CAPKV_POLICY=lease # the server default
start_capkv() { # read policy
  CAPKV_POLICY=$1
  for i in 1 2 3; do
    RUST_LOG=warn "$BIN" server --id "$i" --data-dir "$WORK/capkv-$i" --listen "127.0.0.1:$((17378 + i))" \
      --initial-cluster "$CAPKV_CLUSTER" --read-policy "$CAPKV_POLICY" >>"$WORK/capkv-$i.log" 2>&1 &
    PIDS_CAPKV+=($!)
  done
}
stop_capkv() {
  for p in "${PIDS_CAPKV[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS_CAPKV[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS_CAPKV=()
}
start_capkv lease

wait_ready() {
  for _ in $(seq 1 120); do
    if ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINTS" endpoint health >/dev/null 2>&1 &&
       "$BIN" status --endpoints "$CAPKV_ENDPOINTS" --json 2>/dev/null |
         python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if all(n["up"] and all(p["leader"] for p in n["partitions"]) for n in d["nodes"]) else 1)' 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "clusters did not become ready; logs in $WORK" >&2
  exit 1
}
wait_ready
sleep 4 # let capkv's leader balancing settle

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

run_one() { # system workload clients level -> "ops ops_per_sec p50 p99 cpu_per_1k"
  local system=$1 workload=$2 clients=$3 level=$4 endpoints pids
  if [ "$system" = capkv ]; then endpoints=$CAPKV_ENDPOINTS; pids=("${PIDS_CAPKV[@]}"); else endpoints=$ETCD_ENDPOINTS; pids=("${PIDS_ETCD[@]}"); fi
  local conns=$(( clients < 8 ? clients : 8 ))
  local before after json
  before=$(cpu_ticks "${pids[@]}")
  json=$("$BIN" bench --target "$system" --endpoints "$endpoints" --workload "$workload" --clients "$clients" \
    --conns "$conns" --duration "$DURATION" --warmup "$WARMUP" --keys $KEYS --key-size $KEY_SIZE \
    --value-size $VALUE_SIZE --consistency "$level" --no-preload --json)
  after=$(cpu_ticks "${pids[@]}")
  python3 -c '
import json, sys
r = json.loads(sys.argv[1]); ticks = int(sys.argv[2]); tck = int(sys.argv[3])
cpu = ticks / tck
print(r["ops"], round(r["ops_per_sec"], 1), round(r["p50_ms"], 3), round(r["p99_ms"], 3),
      round(cpu / max(r["ops"], 1) * 1000, 4), r["errors"])
' "$json" $((after - before)) "$CLK_TCK"
}

# Preload every key once in both systems, so reads hit existing keys.
for system in capkv etcd; do
  if [ "$system" = capkv ]; then endpoints=$CAPKV_ENDPOINTS; else endpoints=$ETCD_ENDPOINTS; fi
  "$BIN" bench --target $system --endpoints "$endpoints" --workload get --clients 32 --conns 8 \
    --duration 0s --warmup 0s --keys $KEYS --key-size $KEY_SIZE --value-size $VALUE_SIZE --json >/dev/null
done

# workload clients capkv-level etcd-level capkv-read-policy
CELLS=(
  "put 1 linearizable linearizable lease"
  "put 16 linearizable linearizable lease"
  "put 64 linearizable linearizable lease"
  "get 16 linearizable linearizable lease"
  "get 64 linearizable linearizable lease"
  "get 16 prefix serializable lease"
  "get 16 linearizable linearizable read-index"
)
ROWS=()
n=0
for cell in "${CELLS[@]}"; do
  read -r workload clients capkv_level etcd_level policy <<<"$cell"
  if [ "$policy" != "$CAPKV_POLICY" ]; then
    stop_capkv
    start_capkv "$policy"
    wait_ready
    sleep 4
  fi
  if [ $((n % 2)) = 0 ]; then order="capkv etcd"; else order="etcd capkv"; fi
  for system in $order; do
    if [ "$system" = capkv ]; then
      read -r c_ops c_rate c_p50 c_p99 c_cpu c_err < <(run_one capkv "$workload" "$clients" "$capkv_level")
    else
      read -r e_ops e_rate e_p50 e_p99 e_cpu e_err < <(run_one etcd "$workload" "$clients" "$etcd_level")
    fi
  done
  ratio=$(python3 -c "print(round($c_rate / max($e_rate, 1e-9), 2))")
  label=$workload; [ "$capkv_level" = prefix ] && label="get (prefix vs serializable)"
  [ "$policy" = read-index ] && label="get (capkv ReadIndex)"
  echo "RESULT workload=$workload clients=$clients level=$capkv_level/$etcd_level read_policy=$policy capkv_ops=$c_rate etcd_ops=$e_rate ratio=$ratio capkv_p99_ms=$c_p99 etcd_p99_ms=$e_p99 capkv_cpu_s_per_1k=$c_cpu etcd_cpu_s_per_1k=$e_cpu errors=$c_err/$e_err"
  ROWS+=("| $label | $clients | $c_rate | $e_rate | **$ratio** | $c_p50 / $c_p99 | $e_p50 / $e_p99 | $c_cpu | $e_cpu |")
  n=$((n + 1))
done

# --- the report ---------------------------------------------------------------------------
FSYNC_MS=$(python3 - "$WORK" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
buf = b"x" * 4096
t = time.perf_counter()
for _ in range(200):
    os.write(fd, buf); os.fsync(fd)
os.close(fd)
print(round((time.perf_counter() - t) / 200 * 1000, 3))
PY
)
CPU_MODEL=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
MODE="full ($DURATION per cell after $WARMUP warm-up)"; [ $QUICK = 1 ] && MODE="quick ($DURATION per cell; smoke run, noisy)"
{
  echo "# Benchmarks: capkv vs etcd"
  echo
  echo "Generated by \`bench/compare-etcd.sh\` on $(date -u +%Y-%m-%d). Mode: $MODE."
  echo
  echo "## Machine"
  echo
  echo "- CPU: $CPU_MODEL, $(nproc) cores; RAM $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "- Disk: fsync of a 4 KiB write takes $FSYNC_MS ms on the benchmark's data disk (mean of 200)"
  echo "- etcd: $(etcd --version | head -1) (Debian package), 3 members, default settings (fsync on every commit)"
  echo "- capkv: $("$BIN" --version), 3 nodes, 8 partitions, RF 3, defaults (fsync before every acknowledgement, linearizable reads by leader lease; one cell with \`--read-policy read-index\`)"
  echo "- Client: \`capkv bench\` for both, on the same machine, closed loop, ${VALUE_SIZE}-byte values, ${KEY_SIZE}-byte keys, $KEYS keys uniform, every key preloaded"
  echo
  echo "## Results"
  echo
  echo "| workload | clients | capkv ops/s | etcd ops/s | capkv/etcd | capkv p50 / p99 ms | etcd p50 / p99 ms | capkv server CPU s / 1k ops | etcd server CPU s / 1k ops |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for r in "${ROWS[@]}"; do echo "$r"; done
  echo
  echo "Server CPU is user+system time of the three server processes during the cell, from /proc."
  echo "Both systems and the load generator share the same $(nproc) cores."
  echo
  echo "## Commands"
  echo
  echo '```'
  echo "bench/compare-etcd.sh$([ $QUICK = 1 ] && echo ' --quick')"
  echo "# each cell, e.g.:"
  echo "capkv bench --target capkv --endpoints $CAPKV_ENDPOINTS --workload put --clients 16 --conns 8 --duration $DURATION --warmup $WARMUP --keys $KEYS --key-size $KEY_SIZE --value-size $VALUE_SIZE --no-preload"
  echo "capkv bench --target etcd --endpoints $ETCD_ENDPOINTS --workload get --clients 16 --conns 8 --consistency serializable --duration $DURATION --warmup $WARMUP --keys $KEYS --no-preload"
  echo '```'
} > "$ROOT/docs/benchmarks.generated.md"
if [ -f "$ROOT/docs/benchmarks-notes.md" ]; then
  { echo; cat "$ROOT/docs/benchmarks-notes.md"; } >> "$ROOT/docs/benchmarks.generated.md"
fi
mv "$ROOT/docs/benchmarks.generated.md" "$ROOT/docs/benchmarks.md"
echo "wrote docs/benchmarks.md" >&2
