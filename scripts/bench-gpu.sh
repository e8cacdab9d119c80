#!/usr/bin/env bash
# The GPU bench, in one invocation on an idle NVIDIA machine with torch and transformers (no
# network, no Rust): OUT_DIR/NAME.{json,md} like the CPU bench (results/bench/), and NAME.log.
#   - a Llama-2-7B-shaped checkpoint with random weights (bf16 safetensors, SmolLM2's vocabulary
#     of 49,152 so its tokenizer serves), written here with the machine's own torch;
#   - streamppl on it: block engine sink:4+1020 over 65,536 tokens (B = 2048 and 1024), dense
#     prefill of 4096 tokens, token engine; transformers on the same checkpoint: the
#     reference-style token loop (one token per pass, 4 + 1020 kept) and one dense forward pass;
#   - streamppl on SmolLM2: block engine sink:4+1020 at B = 256..4096 in bf16 and 2048 in f32,
#     peak GPU memory at 16,384 and 1,048,576 tokens, exact recompute:1024 on a 1/16 sample of
#     65,536 tokens, token engine.
# Each step has its own timeout, and all of them share a budget (BENCH_BUDGET_S, default 480 s;
# the most important steps run first): a failed, timed-out or skipped step is a row of the
# report, not the end of the bench.
# Usage: scripts/bench-gpu.sh STREAMPPL_BINARY[.xz] SMOLLM2.gguf CORPUS NAME OUT_DIR
set -euo pipefail
if (( $# != 5 )); then
    echo "usage: $0 STREAMPPL_BINARY[.xz] SMOLLM2.gguf CORPUS NAME OUT_DIR" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$1; NAME=$4
SMOL=$(realpath "$2"); CORPUS=$(realpath "$3")
mkdir -p "$5"; OUT=$(realpath "$5")
LOG=$OUT/$NAME.log; : > "$LOG"
# Holds the 7B checkpoint (14 GB): under TMPDIR, /tmp by default.
WORK=$(mktemp -d -t bench-gpu.XXXXXX)
M7B=$WORK/llama-7b-random
mkdir -p "$WORK/logs" "$WORK/runs"
: > "$WORK/plan.tsv"; : > "$WORK/steps.tsv"
STARTED=$(date +%s)
DEADLINE=$(( STARTED + ${BENCH_BUDGET_S:-480} ))
# nvidia-smi's index of the GPU that streamppl's `cuda` (device 0) is.
GPU=${CUDA_VISIBLE_DEVICES:-0}; GPU=${GPU%%,*}

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG" >&2; }

gpu_used_mib() {
    nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -d ' ' || true
}

# The status of step ID in steps.tsv (empty if it has not run).
status_of() { awk -F'\t' -v id="$1" '$1 == id { s = $2 } END { print s }' "$WORK/steps.tsv"; }

# steps.tsv row: id, status (ok|failed|timeout|skipped), exit code, wall seconds (process, load
# included), peak GPU MiB, idle GPU MiB before the step, time limit, reason if skipped.
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/steps.tsv"; }

# step ID LIMIT CMD...: CMD under `timeout` (at most LIMIT seconds, and never past the budget),
# stdout/stderr in $WORK/logs/ID.{out,err}, timed with date, the GPU's used memory sampled every
# 100 ms; records its row and never fails the bench. NEEDS="ID ..." in the caller's environment
# skips it unless those steps passed.
step() {
    local id=$1 limit=$2; shift 2
    local dep
    for dep in ${NEEDS:-}; do
        if [[ $(status_of "$dep") != ok ]]; then
            log "$id: skipped ($dep did not pass)"
            record "$id" skipped "" "" "" "" "$limit" "needs $dep"
            return 0
        fi
    done
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < 20 )); then
        log "$id: skipped (time budget spent)"
        record "$id" skipped "" "" "" "" "$limit" "time budget spent"
        return 0
    fi
    if (( limit > left )); then limit=$left; fi
    local idle; idle=$(gpu_used_mib)
    nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
        > "$WORK/logs/$id.gpumem" 2>/dev/null &
    local sampler=$!
    log "$id: start (limit ${limit}s): $*"
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$id.out" 2> "$WORK/logs/$id.err" || rc=$?
    t1=$(date +%s.%N)
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    local peak wall status=ok
    peak=$(tr -d ' ' < "$WORK/logs/$id.gpumem" | grep -E '^[0-9]+$' | sort -n | tail -1 || true)
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
    record "$id" "$status" "$rc" "$wall" "$peak" "$idle" "$limit" ""
    log "$id: $status (exit $rc, ${wall}s, peak GPU ${peak:-?} MiB, idle ${idle:-?} MiB)"
    if [[ $status != ok ]]; then tail -n 5 "$WORK/logs/$id.err" | sed 's/^/    /' | tee -a "$LOG" >&2; fi
}

# ev ID NAME MODEL STRATEGY ENGINE BLOCK DTYPE TOKENS LIMIT [EVAL_ARGS...]: one `streamppl eval`
# step, fresh (--rerun), no checkpoint to time (--checkpoint-every 1 day), into
# $WORK/runs/ID/<strategy>/run.json; MODEL is `7b` or `smollm2`; ENGINE is block, token or
# windows (recompute: neither --engine nor --block-size applies). plan.tsv keeps what the step
# was meant to measure, for the report to show even if it fails.
ev() {
    local id=$1 name=$2 model=$3 strategy=$4 engine=$5 block=$6 dtype=$7 tokens=$8 limit=$9
    shift 9
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$name" "$model" "$strategy" "$engine" \
        "$block" "$dtype" "$tokens" "$*" >> "$WORK/plan.tsv"
    local path=$SMOL
    if [[ $model == 7b ]]; then path=$M7B; fi
    local args=(eval --model "$path" --corpus "$CORPUS" --strategy "$strategy" --device cuda
        --dtype "$dtype" --max-tokens "$tokens" --rerun --checkpoint-every 86400
        --out "$WORK/runs/$id")
    case $engine in
        block) args+=(--engine block --block-size "$block") ;;
        token) args+=(--engine token) ;;
    esac
    step "$id" "$limit" "$BIN" "${args[@]}" "$@"
}

log "bench $NAME: work folder $WORK ($(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free), budget ${BENCH_BUDGET_S:-480}s"
if [[ "$BIN" == *.xz ]]; then xz -dkf "$BIN"; BIN=${BIN%.xz}; fi
chmod +x "$BIN"; BIN=$(realpath "$BIN")
nvidia-smi -i "$GPU" --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$WORK/gpu.csv"
cat /proc/loadavg > "$WORK/loadavg"
"$BIN" --version > "$WORK/streamppl-version" 2>&1 || true
sha256sum "$BIN" | cut -d' ' -f1 > "$WORK/streamppl-sha256"
log "GPU: $(cat "$WORK/gpu.csv"); streamppl: $(cat "$WORK/streamppl-version")"

REF=(python3 "$HERE/bench_gpu_reference.py")
S=sink:4+1020
step env 60 "${REF[@]}" env --out "$WORK/env.json"
# Untimed: the first run on a fresh machine pays inside its own time for what the next ones
# find ready (likely the driver compiling and caching the kernels' PTX on first use): on the
# H200 a first SmolLM2 run read 3.0k (this bench, 2026-12-02) and 3.4k tok/s (2026-12-03)
# where the same run read 120k-170k after it.
step warm-up 120 "$BIN" eval --model "$SMOL" --corpus "$CORPUS" --strategy "$S" --device cuda \
    --dtype bf16 --max-tokens 8192 --rerun --checkpoint-every 86400 --out "$WORK/runs/warm-up"
ev smol-b2048 "block engine" smollm2 "$S" block 2048 bf16 65536 60
step write-7b 240 "${REF[@]}" write-7b "$M7B"
NEEDS=write-7b step tokenizer-7b 60 "$BIN" info "$SMOL" --save-tokenizer "$M7B/tokenizer.json"
NEEDS="write-7b tokenizer-7b" ev 7b-b2048 "block engine" 7b "$S" block 2048 bf16 65536 180
NEEDS=write-7b step reference 240 "${REF[@]}" reference "$M7B" --out "$WORK/reference.json"
NEEDS="write-7b tokenizer-7b" ev 7b-dense "dense prefill" 7b dense block 4096 bf16 4096 150
NEEDS="write-7b tokenizer-7b" ev 7b-b1024 "block engine" 7b "$S" block 1024 bf16 65536 150
ev smol-flat-16k "flat memory, short" smollm2 "$S" block 2048 bf16 16384 60
ev smol-flat-1m "flat memory, long" smollm2 "$S" block 2048 bf16 1048576 150
# 4096 windows of 1025 tokens; the full 65,536 takes 16 times as long.
ev smol-recompute "exact recompute, 1/16 sample" smollm2 recompute:1024 windows - bf16 65536 90 \
    --score-every 16
for b in 256 512 1024 4096; do
    ev "smol-b$b" "block engine" smollm2 "$S" block "$b" bf16 65536 60
done
ev smol-f32-b2048 "block engine" smollm2 "$S" block 2048 f32 65536 60
NEEDS="write-7b tokenizer-7b" ev 7b-token "token engine" 7b "$S" token - bf16 256 120
ev smol-token "token engine" smollm2 "$S" token - bf16 512 60

log "steps done in $(( $(date +%s) - STARTED ))s; logs, runs and the 7B checkpoint stay in $WORK"
python3 "$HERE/bench_gpu_report.py" --work "$WORK" --name "$NAME" --out "$OUT" \
    --smollm2 "$SMOL" --corpus "$CORPUS" --streamppl "$BIN"
cat "$OUT/$NAME.md"
