#!/usr/bin/env bash
# The GPU checks of issue 7 in one run, on a GPU machine without Rust, from the bundle that
# scripts/gpu-bundle.sh built elsewhere (target/gpu-bundle/bundle.tar.xz):
#   1. the `cuda_parity` tests (phi-engine): kernels and forward passes on the GPU against the
#      CPU and the transformers reference;
#   2. the `cuda` tests (phi-serve): the real binary on the GPU over HTTP;
#   3. benches/gpu.sh: speed against transformers on the same GPU (needs ~20 GB of disk).
# Each step has its own time limit, so that one that hangs still leaves the others' results.
# Logs go to $OUT when it is set (the device tool brings that folder back), else
# target/gpu-check; summary.txt there holds every test's result line and the benchmark's table.
#
# usage: bash scripts/gpu-check.sh [tests|bench|all]   (default all)
# With the device tool, from this machine: run(carry=["target/gpu-bundle"],
#   command="bash scripts/gpu-check.sh", timeout_s=590).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
what=${1:-all}
bundle=${BUNDLE:-$root/target/gpu-bundle/bundle.tar.xz}
logs=${OUT:-$root/target/gpu-check}
mkdir -p "$logs"
summary=$logs/summary.txt
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

[ -f "$bundle" ] || { note "no bundle at $bundle: run scripts/gpu-bundle.sh first"; exit 1; }
unpacked=$root/target/gpu-check-bin
rm -rf "$unpacked" && mkdir -p "$unpacked"
xz -dc "$bundle" | tar -xf - -C "$unpacked"
bin=$unpacked/bin
note "bundle of $(head -n 1 "$unpacked/COMMIT"); this tree: $(git rev-parse HEAD 2>/dev/null || echo '?')"
sed -n 's/^dirty: /  built with uncommitted: /p' "$unpacked/COMMIT" | tee -a "$summary"

# The test binaries read the sources (models/tiny, the reference outputs) and start phi-serve
# under the paths they were built in: make those paths lead here.
built=$(cat "$unpacked/ROOT")
if [ "$built" != "$root" ]; then
  if [ -e "$built" ] && [ ! -L "$built" ]; then
    note "$built exists and is not this tree: the tests would read other files"
    exit 1
  fi
  mkdir -p "$(dirname "$built")" && ln -sfn "$root" "$built"
fi
mkdir -p "$root/target/cuda/release"
cp "$bin/phi-serve" "$root/target/cuda/release/phi-serve"

# The CUDA 13 libraries the binaries link (cuBLAS, cuRAND, the runtime): PyTorch's wheels'.
if [ -z "${PHI_CUDA_LIBS:-}" ]; then
  PHI_CUDA_LIBS=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
fi
[ -n "$PHI_CUDA_LIBS" ] && export LD_LIBRARY_PATH=$PHI_CUDA_LIBS:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
if ! "$bin/phi-serve" --version >/dev/null 2>"$logs/ldd.txt"; then
  ldd "$bin/phi-serve" >>"$logs/ldd.txt" 2>&1
  note "phi-serve does not start here (libraries: ldd.txt)"
  exit 1
fi

status=0
step() { # step NAME LIMIT_S COMMAND...: runs it with a limit, logs it, notes how it ended
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  grep -E '^test result|SKIPPED|FAILED|panicked' "$logs/$name.log" | head -n 20 >>"$summary"
  note "== $name: rc=$rc in $((SECONDS - start)) s$([ $rc = 124 ] && echo " (timed out after $limit s)")"
  [ $rc = 0 ] || status=1
}

if [ "$what" = all ] || [ "$what" = tests ]; then
  step cuda_parity 240 "$bin/cuda_parity" --test-threads=1 --nocapture
  step serve_cuda 180 "$bin/phi-serve-cuda-test" --test-threads=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  step gpu_bench 420 env BIN_DIR="$bin" BENCH_BIN_DIR="$bin" BENCH_MODELS_ROOT=/tmp/phi-bench \
    PHI_CUDA_LIBS="${PHI_CUDA_LIBS:-}" bash benches/gpu.sh
  sed -n '/^== summary/,$p' "$logs/gpu_bench.log" >>"$summary"
fi
cat "$summary"
exit $status
