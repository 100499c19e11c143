#!/usr/bin/env bash
# Runs the raft engine's seeded simulation over many seeds (the suite runs 4):
#   bench/sim.sh [SEEDS] [FIRST_SEED] [STEPS]
# Every failure names its seed; replay one with
#   CAPKV_SIM_SEEDS=1 CAPKV_SIM_FIRST_SEED=<seed> cargo test --release -p capkv-raftstore --test sim
set -euo pipefail
cd "$(dirname "$0")/.."
CAPKV_SIM_SEEDS=${1:-200} CAPKV_SIM_FIRST_SEED=${2:-1} CAPKV_SIM_STEPS=${3:-20000} \
  cargo test --release -p capkv-raftstore --test sim -- --nocapture raft_safety_holds_under_faults
