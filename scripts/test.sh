#!/usr/bin/env bash
# The test suite: installs what the tests use beyond Rust (scripts/install-test-deps.sh),
# then runs every test. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
exec cargo test --workspace "$@"
