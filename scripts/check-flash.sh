#!/usr/bin/env bash
# A quick check of the fused attention kernel (flash.cu) on a GPU machine with torch, for a kernel
# change when the full scripts/check-gpu.sh does not fit: random bf16 models of SmolLM2's shape
# (head dim 64) and of head dim 128, the fused kernel against the materialized attention
# (STREAMPPL_ATTENTION=materialized) on dense and sink:4+252 (mean |dNLL| at bf16's noise level,
# 0.045-0.053 at head dim 64 and 0.012-0.013 at 128 on random weights, means the same function),
# and the SmolLM2 shape's block-engine speed at sink:4+1020 over 65,536 tokens.
# Usage: scripts/check-flash.sh STREAMPPL_BINARY[.xz] SMOLLM2_TOKENIZER_JSON CORPUS
set -euo pipefail
BIN=$1; TOKENIZER=$(realpath "$2"); CORPUS=$(realpath "$3")
if [[ "$BIN" == *.xz ]]; then xz -dkf "$BIN"; BIN=${BIN%.xz}; fi
chmod +x "$BIN"; BIN=$(realpath "$BIN")
WORK=$(mktemp -d)
python3 - "$WORK" "$TOKENIZER" <<'PY'
import sys, shutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
for name, hidden, ffn, layers, heads, kv in [("hd64", 576, 1536, 30, 9, 3), ("hd128", 512, 1024, 4, 4, 2)]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                      tie_word_embeddings=True, initializer_range=0.05)
    out = f"{sys.argv[1]}/{name}"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    shutil.copy(sys.argv[2], f"{out}/tokenizer.json")
    open(f"{out}/tokenizer_config.json", "w").write('{"add_bos_token": false}\n')
PY
run() { "$BIN" eval --corpus "$CORPUS" --device cuda --dtype bf16 --rerun "$@" > /dev/null 2>&1; }
for m in hd64 hd128; do
    for s in dense sink:4+252; do
        run --model "$WORK/$m" --strategy $s --max-tokens 1500 --out "$WORK/fused-$m"
        STREAMPPL_ATTENTION=materialized run --model "$WORK/$m" --strategy $s --max-tokens 1500 \
            --out "$WORK/mat-$m"
        echo "$m $s, fused vs materialized: $("$BIN" compare "$WORK/mat-$m/$s" "$WORK/fused-$m/$s")"
    done
done
run --model "$WORK/hd64" --strategy sink:4+1020 --max-tokens 65536 --out "$WORK/speed"
echo "hd64 (SmolLM2 shape) sink:4+1020, 65,536 tokens: $(grep -o '"tokens_per_second": [0-9.]*' "$WORK/speed/sink:4+1020/run.json")"
