#!/usr/bin/env bash
# On a GPU machine with torch: the CUDA build of streamppl against the CPU engine.
#   1. every transformers fixture (tests/fixtures/hf/*), f32: dense, sink:4+60 (block engine,
#      the fused masked softmax with sinks and, for Mistral, a layer window), recompute:32
#      (windows batched as heads) and the token engine, cuda against cpu (tests/hf_families.rs
#      checks cpu against transformers);
#   2. a random model of SmolLM2-135M's shape and vocabulary (written here with torch; the
#      tokenizer is SmolLM2's, from `streamppl info MODEL --save-tokenizer`) on the first 3000
#      tokens of CORPUS: dense, window:256 and sink:4+252, cuda f32 against cpu, and bf16
#      against f32 on cuda (mean |dNLL| and PPL ratio);
#   3. the fused attention kernel (bf16) against the materialized one (STREAMPPL_ATTENTION=
#      materialized) on that model (head dim 64) and on a small random model of head dim 128:
#      dense, sink:4+252 and batched exact re-computation.
# Usage: scripts/check-gpu.sh STREAMPPL_BINARY[.xz] SMOLLM2_TOKENIZER_JSON CORPUS OUT_DIR
#        (writes OUT_DIR/gpu-check.md)
set -euo pipefail
BIN=$1; TOKENIZER=$2; CORPUS=$3; OUT=$4
if [[ "$BIN" == *.xz ]]; then xz -dkf "$BIN"; BIN=${BIN%.xz}; fi
chmod +x "$BIN"; BIN=$(realpath "$BIN")
mkdir -p "$OUT"; WORK=$(mktemp -d); REPORT=$OUT/gpu-check.md
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /' > "$REPORT"

# eval DIR DEVICE DTYPE OUT ARGS...: one run, its summary line kept in OUT.log
run() {
    local model=$1 dev=$2 dtype=$3 out=$4; shift 4
    "$BIN" eval --model "$model" --device "$dev" --dtype "$dtype" --out "$out" --rerun "$@" \
        > "$out.log" 2> "$WORK/err" || { cat "$WORK/err"; exit 1; }
}

echo "## transformers fixtures, f32: cuda vs cpu (cpu vs transformers: tests/hf_families.rs)" >> "$REPORT"
for dir in tests/fixtures/hf/*/; do
    name=$(basename "$dir")
    for dev in cpu cuda; do
        run "$dir" $dev f32 "$WORK/fx-$dev-$name" --corpus tests/fixtures/hf/corpus.txt \
            --strategy dense --strategy sink:4+60 --strategy recompute:32 --block-size 100
        run "$dir" $dev f32 "$WORK/fxt-$dev-$name" --corpus tests/fixtures/hf/corpus.txt \
            --strategy sink:4+60 --engine token --max-tokens 300
    done
    for s in dense sink:4+60 recompute:32; do
        echo "- $name $s: $("$BIN" compare "$WORK/fx-cpu-$name/$s" "$WORK/fx-cuda-$name/$s")" >> "$REPORT"
    done
    echo "- $name sink:4+60, token engine: $("$BIN" compare "$WORK/fxt-cpu-$name/sink:4+60" "$WORK/fxt-cuda-$name/sink:4+60")" >> "$REPORT"
done

echo "## SmolLM2-135M shape and vocabulary, random weights, 3000 tokens of $(basename "$CORPUS")" >> "$REPORT"
python3 - "$WORK/smol" "$TOKENIZER" <<'PY'
import sys, shutil, json, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                  rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                  initializer_range=0.05)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1], safe_serialization=True)
shutil.copy(sys.argv[2], f"{sys.argv[1]}/tokenizer.json")
json.dump({"add_bos_token": False}, open(f"{sys.argv[1]}/tokenizer_config.json", "w"))
PY
STRATS=(--strategy dense --strategy window:256 --strategy sink:4+252)
run "$WORK/smol" cpu f32 "$WORK/cpu" --corpus "$CORPUS" --max-tokens 3000 "${STRATS[@]}"
for dtype in f32 bf16; do
    run "$WORK/smol" cuda $dtype "$WORK/cuda-$dtype" --corpus "$CORPUS" --max-tokens 3000 "${STRATS[@]}"
done
ppl() { grep -o '"ppl": [0-9.]*' "$1/run.json" | head -1 | awk '{print $2}'; }
for s in dense window:256 sink:4+252; do
    echo "- $s, cuda f32 vs cpu: $("$BIN" compare "$WORK/cpu/$s" "$WORK/cuda-f32/$s"); PPL cpu $(ppl "$WORK/cpu/$s"), cuda $(ppl "$WORK/cuda-f32/$s")" >> "$REPORT"
    echo "- $s, cuda bf16 vs f32: $("$BIN" compare "$WORK/cuda-f32/$s" "$WORK/cuda-bf16/$s"); PPL f32 $(ppl "$WORK/cuda-f32/$s"), bf16 $(ppl "$WORK/cuda-bf16/$s")" >> "$REPORT"
done
echo "## fused attention vs materialized scores, bf16 (same dtype: only the attention differs)" >> "$REPORT"
python3 - "$WORK/hd128" "$TOKENIZER" <<'PY'
import sys, shutil, json, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                  rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
                  initializer_range=0.05)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1], safe_serialization=True)
shutil.copy(sys.argv[2], f"{sys.argv[1]}/tokenizer.json")
json.dump({"add_bos_token": False}, open(f"{sys.argv[1]}/tokenizer_config.json", "w"))
PY
FUSED=(--strategy dense --strategy sink:4+252 --strategy recompute:256 --max-tokens 1500)
for m in smol hd128; do
    run "$WORK/$m" cuda bf16 "$WORK/fused-$m" --corpus "$CORPUS" "${FUSED[@]}"
    STREAMPPL_ATTENTION=materialized run "$WORK/$m" cuda bf16 "$WORK/mat-$m" --corpus "$CORPUS" "${FUSED[@]}"
    for s in dense sink:4+252 recompute:256; do
        echo "- $m $s: $("$BIN" compare "$WORK/mat-$m/$s" "$WORK/fused-$m/$s"); PPL materialized $(ppl "$WORK/mat-$m/$s"), fused $(ppl "$WORK/fused-$m/$s")" >> "$REPORT"
    done
done
cat "$REPORT"
