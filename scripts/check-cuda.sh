#!/usr/bin/env bash
# CI: proves the CUDA build compiles and is lint-clean, on a machine without a GPU or a system
# CUDA toolkit. Makes the PyPI CUDA 13.0 toolchain (docker/cuda-toolchain.sh) under target/ if
# it is not there yet, then, with CARGO_TARGET_DIR=target/cuda (the CPU build in target/ is left
# alone):
#   1. cargo clippy --features cuda -p phi-engine -p phi-serve --all-targets -- -D warnings
#      (clippy type-checks everything `cargo check` does; the GPU tests are compiled, not run);
#   2. the same for --features flash-attn, against a stub of candle-flash-attn with the real
#      crate's signatures, in a scratch copy of the sources: the real kernels take an hour or
#      more to compile, the stub proves phi-serve's flash-attention code compiles.
# It is not a cheap check: candle-kernels' build script runs nvcc on every kernel even for
# `cargo check` (about 6 to 10 minutes on 2 cores from nothing; cache target/ to make it fast).
#
# usage: scripts/check-cuda.sh [--no-flash-attn]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

flash=1
[ "${1:-}" = "--no-flash-attn" ] && flash=0

toolchain=${CUDA_TOOLCHAIN_DIR:-$root/target/cuda-toolchain}
[ -f "$toolchain/env.sh" ] || bash docker/cuda-toolchain.sh "$toolchain"
# shellcheck source=/dev/null
source "$toolchain/env.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/cuda}

echo "== cuda: clippy --features cuda (sm_$CUDA_COMPUTE_CAP)"
cargo clippy --locked --features cuda -p phi-engine -p phi-serve --all-targets -- -D warnings

[ "$flash" = 1 ] || { echo "== cuda: ok"; exit 0; }

echo "== cuda: clippy --features flash-attn (stubbed kernels)"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# A copy, so the stub's entry in Cargo.lock never touches the real one; the stub lives outside
# it (a path dependency inside a workspace's folder would become one of its members).
mkdir -p "$scratch/ws" "$scratch/stub/src"
tar --exclude=./target --exclude=./.git --exclude=./.venv -cf - . | tar -xf - -C "$scratch/ws"
locked() { sed -n "/^name = \"$1\"\$/{n;s/^version = \"\(.*\)\"\$/\1/p}" Cargo.lock; }
printf '%s\n' '[package]' 'name = "candle-flash-attn"' "version = \"$(locked candle-flash-attn)\"" \
  'edition = "2021"' '[dependencies]' \
  "candle-core = { version = \"=$(locked candle-core)\", features = [\"cuda\"] }" \
  >"$scratch/stub/Cargo.toml"
# The functions phi-engine calls, with candle-flash-attn's signatures.
printf '%s\n' \
  '//! Type-checking stub of candle-flash-attn (scripts/check-cuda.sh).' \
  'use candle_core::{Result, Tensor};' \
  'pub fn flash_attn_windowed(' \
  '    _q: &Tensor,' \
  '    _k: &Tensor,' \
  '    _v: &Tensor,' \
  '    _softmax_scale: f32,' \
  '    _window_size_left: Option<usize>,' \
  '    _window_size_right: Option<usize>,' \
  ') -> Result<Tensor> {' \
  '    unimplemented!("type-checking stub")' \
  '}' >"$scratch/stub/src/lib.rs"
(
  cd "$scratch/ws"
  cargo clippy --features flash-attn -p phi-engine -p phi-serve --all-targets \
    --config "patch.crates-io.candle-flash-attn.path=\"$scratch/stub\"" -- -D warnings
)
echo "== cuda: ok"
