#!/usr/bin/env bash
# Installs what the test suite uses beyond the Rust toolchain:
# - libfaketime (Debian package `faketime`): `capkv check`'s clock nemesis restarts nodes
#   with their clocks running at 0.6x-1.5x. Without it the clock nemesis runs wall-clock
#   jumps only (and says so), and the suite still passes.
# Safe to run again; does nothing when everything is there.
set -euo pipefail

have_faketime() {
  for lib in /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 \
             /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 \
             /usr/lib/faketime/libfaketime.so.1; do
    [ -e "$lib" ] && return 0
  done
  return 1
}

if have_faketime; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "note: no apt-get; install libfaketime by hand for clock-rate faults" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "note: not root and no sudo; install the Debian package faketime for clock-rate faults" >&2
    exit 0
  fi
fi
echo "installing libfaketime (Debian package faketime) for capkv check's clock-rate faults" >&2
if ! $sudo apt-get install -y -q faketime >/dev/null 2>&1; then
  $sudo apt-get update -q >/dev/null 2>&1 || true
  $sudo apt-get install -y -q faketime >/dev/null 2>&1 || \
    echo "note: could not install faketime; clock faults will be wall-clock jumps only" >&2
fi
