#!/usr/bin/env bash
# Speed and memory of the engines on the default model and corpus: results/bench/NAME.{json,md}.
# Run it on an idle machine; pass --quick for a smoke test. Extra arguments go to `streamppl bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin streamppl
scripts/fetch-defaults.sh
exec "${CARGO_TARGET_DIR:-target}/release/streamppl" bench "$@"
