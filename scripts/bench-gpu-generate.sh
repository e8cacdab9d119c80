#!/usr/bin/env bash
# Per-token latency of `streamppl generate` (token engine) on a GPU at caches of 1024 and 4096
# keys (sink:4+1020, sink:4+4092), on an idle NVIDIA machine with torch and transformers (no
# network, no Rust). Models with random weights, written here with the machine's own torch:
# SmolLM2-135M's shape (bf16 and f32) and Llama-2-7B's (bf16), both with SmolLM2's vocabulary and
# tokenizer. Random weights answer nonsense and rarely end a turn, which does not change what a
# token costs; they have no chat template, so turns are plain (a warning says so).
# Writes OUT_DIR/gpu-generate.md (the GPU, then per run: tokens, tok/s, the median latency over
# the whole run and, from `plot-generation`, over its last tenth, when the cache is full) and
# the run folders.
# Usage: scripts/bench-gpu-generate.sh STREAMPPL_BINARY[.xz] SMOLLM2_TOKENIZER_JSON PROMPTS OUT_DIR
set -euo pipefail
if (( $# != 4 )); then
    echo "usage: $0 STREAMPPL_BINARY[.xz] SMOLLM2_TOKENIZER_JSON PROMPTS OUT_DIR" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$1; TOKENIZER=$(realpath "$2"); PROMPTS=$(realpath "$3")
mkdir -p "$4"; OUT=$(realpath "$4")
if [[ "$BIN" == *.xz ]]; then xz -dkf "$BIN"; BIN=${BIN%.xz}; fi
chmod +x "$BIN"; BIN=$(realpath "$BIN")
WORK=$(mktemp -d -t bench-gpu-generate.XXXXXX)
REPORT=$OUT/gpu-generate.md
{
    echo "# Per-token latency of generation on the GPU (token engine, random weights)"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /'
    echo "Host: $(nproc) cores; $(date -u +%FT%TZ); one run each"
    echo
    echo "| model | dtype | strategy | tokens | tok/s | median latency, whole run (ms) | last tenth, cache full (ms) |"
    echo "|---|---|---|---:|---:|---:|---:|"
} > "$REPORT"

python3 "$HERE/bench_gpu_reference.py" write-smol "$WORK/smol"
python3 "$HERE/bench_gpu_reference.py" write-7b "$WORK/llama-7b"
for m in smol llama-7b; do cp "$TOKENIZER" "$WORK/$m/tokenizer.json"; done

# run MODEL DTYPE STRATEGY TOKENS: one generation, its row appended to the report.
run() {
    local model=$1 dtype=$2 strategy=$3 tokens=$4
    local out=$OUT/runs/$model-$dtype
    timeout 240 "$BIN" generate --model "$WORK/$model" --device cuda --dtype "$dtype" \
        --strategy "$strategy" --prompts "$PROMPTS" --repeat-prompts --total-tokens "$tokens" \
        --max-new-tokens 512 --quiet --out "$out" 2> "$WORK/err" || { tail -5 "$WORK/err"; return 0; }
    local dir=$out/$strategy
    "$BIN" plot-generation "$dir" --out "$dir/generation.png" > "$WORK/health.md" 2> /dev/null
    # The health row's latency cell: "EARLY → LATE (×R)".
    local late
    late=$(awk -F'|' 'NR == 3 { split($8, a, "→"); sub(/\(.*/, "", a[2]); gsub(/ /, "", a[2]); print a[2] }' "$WORK/health.md")
    python3 - "$dir/run.json" "$model" "$dtype" "$strategy" "$late" >> "$REPORT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {sys.argv[3]} | `{sys.argv[4]}` | {r['tokens_generated']} | "
      f"{r['tokens_per_second']:.1f} | {1e3 * r['median_latency_s']:.2f} | {sys.argv[5]} |")
PY
}

for cache in 1024 4096; do
    strategy=sink:4+$((cache - 4))
    run smol bf16 "$strategy" $((cache + 2000))
    run smol f32 "$strategy" $((cache + 2000))
    run llama-7b bf16 "$strategy" $((cache + 1000))
done
cat "$REPORT"
