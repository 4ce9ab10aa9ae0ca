#!/usr/bin/env bash
# phi-serve against llama.cpp on the CPU, from scratch: the same GGUF files (Q4_0, Q4_K_M, Q8_0 of
# a random-weight model of Phi-3-mini's full size), the same thread count, at the engine level
# (prompt processing of ~512 tokens, 128 generated tokens) and over HTTP (one streamed chat
# request: time to first token, decode tokens/s), next to the machine's memory read bandwidth.
# See "phi-serve against llama.cpp" in benches/README.md; benches/llama_cpp_bench.py does the work.
#
#   bash benches/llama_cpp.sh [--threads N] [--reps N] [--formats q4_0,q8_0] [--skip-http] ...
#
# It builds the release binaries (unless PHI_SERVE_BIN is set: then that binary and BENCH_MODEL_BIN,
# default target/release/bench-model, are used as they are), installs llama-cpp-python[server]
# 0.3.36 from PyPI, built from source, into target/llama-cpp-venv (once; LLAMA_VENV=DIR uses
# another venv, created there if llama_cpp is not importable), then runs the driver with that
# venv's python. Arguments go to the driver (`--help` lists them).
#
# llama.cpp's CPU flags (/work/shared/CPU.md): no native build, AMX off, and each of AVX, AVX2,
# FMA, F16C, BMI2, AVX-VNNI, AVX-512 (F, VBMI, VNNI, BF16) on exactly when /proc/cpuinfo lists
# it, so the build runs on the machine that builds it (on the Sapphire Rapids machines this is
# CPU.md's list; an AVX-512 build dies of SIGILL on a CPU without it). LLAMA_CMAKE_ARGS replaces
# the whole list. The multimodal library (LLAVA_BUILD) is not built: nothing here uses it.
#
# Disk: the bf16 checkpoint is 7.6 GB and the three GGUF files 8.7 GB, under target/bench-models/
# by default (--models-root DIR puts both elsewhere, --drop-checkpoint removes the checkpoint
# once the GGUF files exist). Writing them takes minutes; they are cached.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ -n "${PHI_SERVE_BIN:-}" ]; then
  phi=$PHI_SERVE_BIN
  bench_model=${BENCH_MODEL_BIN:-$root/target/release/bench-model}
else
  cargo build --release -q -p phi-serve -p phi-serve-benches --bins
  phi=$root/target/release/phi-serve
  bench_model=$root/target/release/bench-model
fi

venv=${LLAMA_VENV:-$root/target/llama-cpp-venv}
if ! "$venv/bin/python" -c 'import llama_cpp.server.app' 2>/dev/null; then
  if [ -n "${LLAMA_CMAKE_ARGS:-}" ]; then
    cmake_args=$LLAMA_CMAKE_ARGS
  else
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    cmake_args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
      avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
      if [[ $flags == *" ${pair%%:*} "* ]]; then on=ON; else on=OFF; fi
      cmake_args+=" -DGGML_${pair#*:}=$on"
    done
  fi
  echo "== installing llama-cpp-python[server]==0.3.36 into $venv, built from source with"
  echo "   CMAKE_ARGS=$cmake_args"
  echo "   (30+ minutes on 2 cores)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # --no-cache-dir: pip's wheel cache does not know CMAKE_ARGS, so a wheel built with other
  # flags could be reused. The build happens in a folder of its own (not /tmp, whose cleaners
  # have removed sources from under a running build).
  build_tmp=$venv.build-tmp
  rm -rf "$build_tmp" && mkdir -p "$build_tmp"
  TMPDIR=$build_tmp CMAKE_ARGS=$cmake_args FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$venv/bin/pip" install --no-cache-dir --no-binary llama-cpp-python \
    'llama-cpp-python[server]==0.3.36'
  rm -rf "$build_tmp"
  echo "$cmake_args" >"$venv/llama-cmake-args"
fi
[ -f "$venv/llama-cmake-args" ] && export LLAMA_CMAKE_ARGS_USED=$(cat "$venv/llama-cmake-args")

exec "$venv/bin/python" benches/llama_cpp_bench.py --phi-serve "$phi" --bench-model "$bench_model" "$@"
