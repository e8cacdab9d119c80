#!/usr/bin/env bash
# On a GPU machine with torch: the CUDA build of streamppl (f32) against the references.
#   1. every transformers fixture (tests/fixtures/hf/*): dense NLLs on --device cuda against
#      --device cpu (which tests/hf_families.rs checks against transformers): the families'
#      non-CPU code path, candle's CUDA ops;
#   2. a random model of SmolLM2-135M's shape (written here with torch, the byte-level fixture
#      tokenizer, 384 tokens): dense, window:256 and sink:4+252 over 3000 tokens, cuda against cpu.
# Usage: scripts/check-gpu.sh STREAMPPL_BINARY[.xz] OUT_DIR     (writes OUT_DIR/gpu-check.md)
set -euo pipefail
BIN=$1; OUT=$2
if [[ "$BIN" == *.xz ]]; then xz -dkf "$BIN"; BIN=${BIN%.xz}; fi
chmod +x "$BIN"; BIN=$(realpath "$BIN")
mkdir -p "$OUT"; WORK=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /' > "$OUT/gpu-check.md"

echo "## transformers fixtures, dense: cuda vs cpu (cpu vs transformers: tests/hf_families.rs)" >> "$OUT/gpu-check.md"
for dir in tests/fixtures/hf/*/; do
    name=$(basename "$dir")
    for dev in cpu cuda; do
        "$BIN" eval --model "$dir" --corpus tests/fixtures/hf/corpus.txt --strategy dense --device $dev --out "$WORK/fx-$dev-$name" > /dev/null 2> "$WORK/err" || { cat "$WORK/err"; exit 1; }
    done
    echo "- $name: $("$BIN" compare "$WORK/fx-cpu-$name/dense" "$WORK/fx-cuda-$name/dense")" >> "$OUT/gpu-check.md"
done

echo "## SmolLM2-135M shape, random weights, 3000 tokens, cuda vs cpu (f32)" >> "$OUT/gpu-check.md"
python3 - "$WORK/smol" <<'EOF'
import sys, shutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=384, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                  rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                  initializer_range=0.05)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1], safe_serialization=True)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(f"tests/fixtures/hf/llama-linear/{f}", sys.argv[1])
EOF
for s in dense window:256 sink:4+252; do
    for dev in cpu cuda; do
        "$BIN" eval --model "$WORK/smol" --corpus docs/semantics.md --corpus README.md --strategy "$s" --max-tokens 3000 --device $dev --out "$WORK/$dev" > "$WORK/$dev-$s.out" 2> "$WORK/err" || { cat "$WORK/err"; exit 1; }
    done
    echo "- $s: $("$BIN" compare "$WORK/cpu/$s" "$WORK/cuda/$s"); cpu: $(grep -o 'PPL = [0-9.]*.*' "$WORK/cpu-$s.out"); cuda: $(grep -o 'PPL = [0-9.]*.*' "$WORK/cuda-$s.out")" >> "$OUT/gpu-check.md"
done
cat "$OUT/gpu-check.md"
