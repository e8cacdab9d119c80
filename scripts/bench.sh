#!/usr/bin/env bash
# Speed and memory of the engines on the default model and corpus, and the block engine on
# Gemma 3 270M beside them: results/bench/NAME.{json,md}.
# Run it on an idle machine; pass --quick for a smoke test. Extra arguments go to `streamppl bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin streamppl
scripts/fetch-defaults.sh
scripts/fetch-defaults.sh --model gemma3-270m
exec "${CARGO_TARGET_DIR:-target}/release/streamppl" bench --also-model gemma3-270m "$@"
