#!/usr/bin/env bash
# Builds the CUDA release binary of phi-serve without a GPU or a system CUDA toolkit: makes the
# PyPI CUDA 13.0 toolchain (docker/cuda-toolchain.sh) in a folder if it is not there yet, then
# `cargo build --release --features cuda -p phi-serve`.
#
# usage: docker/build-cuda.sh [--flash-attn] [--toolchain DIR] [-- EXTRA CARGO ARGS]
#   --flash-attn     also build flash-attention kernels (feature `flash-attn`; about an hour or
#                    more on 2 cores: it compiles ~50 CUTLASS kernels)
#   --toolchain DIR  where the toolchain lives (default $CUDA_TOOLCHAIN_DIR or target/cuda-toolchain)
# Environment:
#   CUDA_COMPUTE_CAP  GPU generation the kernels are compiled for (default 90: H100/H200;
#                     80 A100, 86 RTX 30xx/A10, 89 L4/L40S/RTX 40xx, 120 RTX 50xx/Blackwell).
#                     A binary runs only on the generation it was built for.
#   CARGO_TARGET_DIR  default target/cuda, so the CPU build in target/ is left alone.
# Prints the binary's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLCHAIN=${CUDA_TOOLCHAIN_DIR:-target/cuda-toolchain}
FEATURES=cuda
CARGO_EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --flash-attn) FEATURES=cuda,flash-attn ;;
    --toolchain) TOOLCHAIN=$2; shift ;;
    --) shift; CARGO_EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}

if [ ! -f "$TOOLCHAIN/env.sh" ]; then
  bash docker/cuda-toolchain.sh "$TOOLCHAIN"
fi
# shellcheck source=/dev/null
source "$TOOLCHAIN/env.sh"

echo "building phi-serve --features $FEATURES for sm_$CUDA_COMPUTE_CAP into $CARGO_TARGET_DIR" >&2
cargo build --release --locked -p phi-serve --features "$FEATURES" "${CARGO_EXTRA[@]}"
echo "$CARGO_TARGET_DIR/release/phi-serve"
