#!/usr/bin/env bash
# The main job: default model and corpus, four cache strategies over the first 4096 scored
# tokens, then the table and the running-PPL plot in results/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin streamppl
scripts/fetch-defaults.sh
OUT=${OUT:-results/demo}
BIN="${CARGO_TARGET_DIR:-target}/release/streamppl"
"$BIN" eval --model models/SmolLM2-135M-Instruct.Q4_1.gguf --corpus datasets/gutenberg-mini/test.parquet \
  --strategy dense --strategy window:256 --strategy sink:4+252 --strategy recompute:256/64 \
  --max-tokens 4096 --out "$OUT" --rerun
"$BIN" table "$OUT" | tee "$OUT/table.md"
"$BIN" plot "$OUT" -o "$OUT/running_ppl.png" --title "SmolLM2-135M, gutenberg-mini, first 4096 tokens"
