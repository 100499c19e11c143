#!/usr/bin/env bash
# Installs what the test suite uses beyond the Rust toolchain:
# - libfaketime (Debian package `faketime`): `capkv check`'s clock nemesis restarts nodes
#   with their clocks running at 0.6x-1.5x. Without it the clock nemesis runs wall-clock
#   jumps only (and says so), and the suite still passes.
# - redis-cli (Debian package `redis-tools`) and redis-py (PyPI `redis`): the front-end
#   tests drive capkv's Redis protocol with them, and the README's examples use redis-cli.
#   Without them those parts are skipped with a note.
# Safe to run again; installs only what is missing.
set -euo pipefail

have_faketime() {
  for lib in /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 \
             /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 \
             /usr/lib/faketime/libfaketime.so.1; do
    [ -e "$lib" ] && return 0
  done
  return 1
}

apt_packages=()
have_faketime || apt_packages+=(faketime)
command -v redis-cli >/dev/null || apt_packages+=(redis-tools)

if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else sudo="none"; fi
  fi
  if ! command -v apt-get >/dev/null || [ "$sudo" = none ]; then
    echo "note: cannot install ${apt_packages[*]} (no apt-get, or not root and no sudo); the tests that use them are skipped or reduced" >&2
  else
    echo "installing Debian packages for the tests: ${apt_packages[*]}" >&2
    if ! $sudo apt-get install -y -q "${apt_packages[@]}" >/dev/null 2>&1; then
      $sudo apt-get update -q >/dev/null 2>&1 || true
      $sudo apt-get install -y -q "${apt_packages[@]}" >/dev/null 2>&1 || \
        echo "note: could not install ${apt_packages[*]}; the tests that use them are skipped or reduced" >&2
    fi
  fi
fi

if command -v python3 >/dev/null && ! python3 -c 'import redis' 2>/dev/null; then
  echo "installing redis-py (PyPI redis) for the front-end tests" >&2
  python3 -m pip install -q --disable-pip-version-check redis >/dev/null 2>&1 || \
    python3 -m pip install -q --disable-pip-version-check --user redis >/dev/null 2>&1 || \
    python3 -m pip install -q --disable-pip-version-check --break-system-packages redis >/dev/null 2>&1 || \
    echo "note: could not install redis-py; its part of the front-end tests is skipped" >&2
fi
exit 0
