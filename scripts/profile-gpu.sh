#!/usr/bin/env bash
# Where the GPU time goes, in one invocation on a GPU machine with torch, transformers and Nsight
# Compute (ncu): random-weight checkpoints of SmolLM2-135M's and Llama-2-7B's shapes (bf16,
# SmolLM2's vocabulary and tokenizer), then
#   1. wall speed of the block engine, sink:4+1020, 65,536 tokens (no profiler): SmolLM2 shape
#      at B = 1024, 2048, 4096, the 7B shape at B = 2048;
#      at B = 2048 with the attention's keys in 1 to 4 splits (STREAMPPL_KEY_SPLITS); and exact
#      re-computation (recompute:1024 on 4096 tokens, recompute:4096 on 448);
#   2. the token engine and re-computation per token at caches 256..4096 (`reproduce figure10
#      --scale paper` on the SmolLM2 shape);
#   3. every kernel of a 4096-token run (two blocks of 2048) of each shape under ncu (one metric,
#      gpu__time_duration, clocks left alone): OUT/ncu-*.csv raw and OUT/profile.md summed by
#      kernel, beside the wall time of the same run without the profiler (the difference is the
#      host: launches, allocation, synchronisation).
# PROFILE_PARTS (default "figure10 7b") adds the parts after 1 and 3's SmolLM2 runs: the token
# engine (2) and the 7B shape (1 and 3).
# Usage: scripts/profile-gpu.sh STREAMPPL_BINARY[.xz] SMOLLM2_TOKENIZER_JSON CORPUS OUT_DIR
set -euo pipefail
if (( $# != 4 )); then
    echo "usage: $0 STREAMPPL_BINARY[.xz] SMOLLM2_TOKENIZER_JSON CORPUS OUT_DIR" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$1; TOKENIZER=$(realpath "$2"); CORPUS=$(realpath "$3")
mkdir -p "$4"; OUT=$(realpath "$4")
if [[ "$BIN" == *.xz ]]; then xz -dkf "$BIN"; BIN=${BIN%.xz}; fi
chmod +x "$BIN"; BIN=$(realpath "$BIN")
WORK=$(mktemp -d -t profile-gpu.XXXXXX)
REPORT=$OUT/profile.md
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sed 's/^/GPU: /' > "$REPORT"
echo "streamppl: $("$BIN" --version)" >> "$REPORT"
log "writing the random checkpoints"
python3 - "$WORK/smol" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                  rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                  initializer_range=0.05)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1], safe_serialization=True)
open(f"{sys.argv[1]}/tokenizer_config.json", "w").write('{"add_bos_token": false}\n')
PY
cp "$TOKENIZER" "$WORK/smol/tokenizer.json"

# speed MODEL STRATEGY TOKENS NAME [ARGS...]: one run; its tok/s and wall in the report.
speed() {
    local model=$1 strategy=$2 tokens=$3 name=$4; shift 4
    "$BIN" eval --model "$model" --corpus "$CORPUS" --strategy "$strategy" --device cuda \
        --dtype bf16 --max-tokens "$tokens" --rerun --checkpoint-every 86400 \
        --out "$WORK/runs/$name" "$@" > "$WORK/$name.log" 2>&1 || { tail -3 "$WORK/$name.log"; return 0; }
    python3 - "$WORK/runs/$name/$strategy/run.json" "$name" >> "$REPORT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
def find(d, key):
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key:
                return v
            got = find(v, key)
            if got is not None:
                return got
    return None
print(f"- {sys.argv[2]}: {find(r, 'tokens_per_second'):.0f} tok/s, "
      f"{find(r, 'wall_seconds'):.3f} s scoring wall")
PY
}

echo "## block engine, sink:4+1020, bf16, no profiler" >> "$REPORT"
S=sink:4+1020
for b in 1024 2048 4096; do speed "$WORK/smol" $S 65536 "smol-b$b" --block-size "$b"; done
speed "$WORK/smol" $S 4096 smol-b2048-4096 --block-size 2048
echo "## key splits of the attention (STREAMPPL_KEY_SPLITS), SmolLM2 shape, B=2048" >> "$REPORT"
for n in 1 2 3 4; do
    STREAMPPL_KEY_SPLITS=$n speed "$WORK/smol" $S 65536 "smol-b2048-splits$n" --block-size 2048
done
"$BIN" compare "$WORK/runs/smol-b2048-splits1/$S" "$WORK/runs/smol-b2048-splits3/$S" \
    | sed 's/^/- splits 3 vs 1: /' >> "$REPORT"
echo "## exact re-computation (batched windows), no profiler" >> "$REPORT"
speed "$WORK/smol" recompute:1024 4096 smol-recompute1024-4096
speed "$WORK/smol" recompute:4096 448 smol-recompute4096-448
log "speed done"
PARTS=${PROFILE_PARTS-figure10 7b}
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part 7b; then
    # The 7B checkpoint (14 GB, mostly host work) is written while the profiles below run.
    python3 "$HERE/bench_gpu_reference.py" write-7b "$WORK/7b" > "$WORK/write-7b.log" 2>&1 &
    WRITER=$!
fi

if part figure10; then
    echo "## figure10 on the SmolLM2 shape (token engine and re-computation)" >> "$REPORT"
    "$BIN" reproduce figure10 --scale paper --model "$WORK/smol" --corpus "$CORPUS" --device cuda \
        --out "$WORK/figure10" > "$WORK/figure10.log" 2>&1 || tail -5 "$WORK/figure10.log"
    cat "$WORK/figure10/table.md" >> "$REPORT" 2>/dev/null || echo "(figure10 failed)" >> "$REPORT"
    cp -r "$WORK/figure10" "$OUT/figure10-smol" 2>/dev/null || true
fi

# kernels NAME MODEL: every kernel of a 4096-token B=2048 run under ncu, summed by name.
kernels() {
    local name=$1 model=$2
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        "$BIN" eval --model "$model" --corpus "$CORPUS" --strategy sink:4+1020 --device cuda \
        --dtype bf16 --block-size 2048 --max-tokens 4096 --rerun --checkpoint-every 86400 \
        --out "$WORK/ncu-$name" > "$OUT/ncu-$name.csv" 2> "$WORK/ncu-$name.err" \
        || { tail -5 "$WORK/ncu-$name.err"; return 0; }
    python3 - "$OUT/ncu-$name.csv" "$name" >> "$REPORT" <<'PY'
import csv, sys, collections
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r.get("Metric Name") == "gpu__time_duration.sum"]
unit = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}
total, count = collections.Counter(), collections.Counter()
for r in rows:
    ms = float(r["Metric Value"].replace(",", "")) * unit[r["Metric Unit"]]
    k = r["Kernel Name"].split("(")[0][:60]
    total[k] += ms; count[k] += 1
all_ms = sum(total.values())
print(f"\n## kernels of {sys.argv[2]}, 4096 tokens, B=2048: {len(rows)} launches, {all_ms:.2f} ms on the GPU\n")
print("| kernel | launches | ms | share |\n|---|---:|---:|---:|")
for k, ms in total.most_common(30):
    print(f"| {k} | {count[k]} | {ms:.3f} | {100 * ms / all_ms:.1f}% |")
PY
}
kernels smol "$WORK/smol"
log "smol kernels done"

if ! part 7b; then cat "$REPORT"; exit 0; fi
wait "$WRITER" || { cat "$WORK/write-7b.log"; exit 1; }
cp "$TOKENIZER" "$WORK/7b/tokenizer.json"
echo "## 7B shape" >> "$REPORT"
speed "$WORK/7b" $S 65536 7b-b2048 --block-size 2048
speed "$WORK/7b" $S 4096 7b-b2048-4096 --block-size 2048
STREAMPPL_KEY_SPLITS=2 speed "$WORK/7b" $S 65536 7b-b2048-splits2 --block-size 2048
kernels 7b "$WORK/7b"
log "done"
cat "$REPORT"
