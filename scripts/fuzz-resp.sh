#!/usr/bin/env bash
# Runs the RESP decoder's fuzz harness (crates/capkv-server/tests/resp_fuzz.rs) for a set
# time: scripts/fuzz-resp.sh 10m (s, m or h; default 60s). Prints the seed; replay a
# failure with CAPKV_FUZZ_SEED=<seed>.
set -euo pipefail
cd "$(dirname "$0")/.."
span="${1:-60s}"
case "$span" in
  *h) seconds=$(( ${span%h} * 3600 )) ;;
  *m) seconds=$(( ${span%m} * 60 )) ;;
  *s) seconds=${span%s} ;;
  *) seconds=$span ;;
esac
CAPKV_FUZZ_SECONDS=$seconds exec cargo test --release -p capkv-server --test resp_fuzz -- --nocapture
