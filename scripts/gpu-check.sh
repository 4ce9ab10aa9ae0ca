#!/usr/bin/env bash
# The GPU checks of issue 7, on a GPU machine without Rust, from the bundles that
# scripts/gpu-bundle.sh built elsewhere (target/gpu-bundle):
#   parity  the `cuda_parity` tests (phi-engine, parity.tar.xz): kernels, forward passes and
#           GGUF formats on the GPU against the CPU and the transformers reference;
#   serve   the `cuda` tests (phi-serve, serve.tar.xz): the real binary on the GPU over HTTP;
#   bench   benches/gpu.sh (serve.tar.xz): speed against transformers on the same GPU (needs
#           ~20 GB of disk).
# Each step has its own time limit, so that one that hangs still leaves the others' results.
# Logs go to $OUT when it is set (the device tool brings that folder back), else
# target/gpu-check; summary.txt there holds every test's result line and the benchmark's table.
#
# usage: bash scripts/gpu-check.sh STEP...   (parity, serve, bench)
# With the device tool (two runs, as gpu-bundle.sh prints: the tree and a bundle must fit in
# 64 MiB together): run(carry=["target/gpu-bundle/parity.tar.xz"], command="bash
# scripts/gpu-check.sh parity", timeout_s=300); then, after scripts/gpu-slim.sh on,
# run(carry=["target/gpu-bundle/serve.tar.xz"], command="bash scripts/gpu-check.sh serve
# bench", timeout_s=590), and scripts/gpu-slim.sh off.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
[ $# -gt 0 ] || { echo "usage: $0 parity|serve|bench..." >&2; exit 2; }
bundles=${BUNDLE_DIR:-$root/target/gpu-bundle}
logs=${OUT:-$root/target/gpu-check}
mkdir -p "$logs"
summary=$logs/summary.txt
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

# The CUDA 13 libraries the binaries link (cuBLAS, cuRAND, the runtime): PyTorch's wheels'.
if [ -z "${PHI_CUDA_LIBS:-}" ]; then
  PHI_CUDA_LIBS=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
fi
[ -n "$PHI_CUDA_LIBS" ] && export LD_LIBRARY_PATH=$PHI_CUDA_LIBS:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
note "this tree: $(git rev-parse HEAD 2>/dev/null || echo '?')"

bin=$root/target/gpu-check-bin
unpacked=
unpack() { # unpack NAME: the bundle's binaries into $bin, its build path linked to this tree
  case " $unpacked " in *" $1 "*) return 0 ;; esac
  local file=$bundles/$1.tar.xz dir=$root/target/gpu-check-$1
  [ -f "$file" ] || { note "no $file: run scripts/gpu-bundle.sh and carry it"; return 1; }
  rm -rf "$dir" && mkdir -p "$dir" "$bin"
  xz -dc "$file" | tar -xf - -C "$dir" || { note "cannot unpack $file"; return 1; }
  cp "$dir"/bin/* "$bin/"
  note "$1 bundle of $(head -n 1 "$dir/COMMIT")"
  sed -n 's/^dirty: /  built with uncommitted: /p' "$dir/COMMIT" | tee -a "$summary"
  # The test binaries read the sources (models/tiny, the reference outputs) and start phi-serve
  # under the paths they were built in: make those paths lead here.
  local built
  built=$(cat "$dir/ROOT")
  if [ "$built" != "$root" ]; then
    if [ -e "$built" ] && [ ! -L "$built" ]; then
      note "$built exists and is not this tree: the tests would read other files"
      return 1
    fi
    mkdir -p "$(dirname "$built")" && ln -sfn "$root" "$built"
  fi
  if [ -f "$bin/phi-serve" ]; then
    mkdir -p "$root/target/cuda/release"
    cp "$bin/phi-serve" "$root/target/cuda/release/phi-serve"
    if ! "$bin/phi-serve" --version >/dev/null 2>"$logs/ldd.txt"; then
      ldd "$bin/phi-serve" >>"$logs/ldd.txt" 2>&1
      note "phi-serve does not start here (libraries: ldd.txt)"
      return 1
    fi
  fi
  unpacked="$unpacked $1"
}

status=0
step() { # step NAME LIMIT_S COMMAND...: runs it with a limit, logs it, notes how it ended
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  grep -E '^test result|SKIPPED|FAILED|panicked|on cuda:0' "$logs/$name.log" | head -n 30 >>"$summary"
  note "== $name: rc=$rc in $((SECONDS - start)) s$([ $rc = 124 ] && echo " (timed out after $limit s)")"
  [ $rc = 0 ] || status=1
}

for what in "$@"; do
  case "$what" in
    parity)
      unpack parity || { status=1; continue; }
      step cuda_parity 240 "$bin/cuda_parity" --test-threads=1 --nocapture
      ;;
    serve)
      unpack serve || { status=1; continue; }
      step serve_cuda 150 "$bin/phi-serve-cuda-test" --test-threads=1
      ;;
    bench)
      unpack serve || { status=1; continue; }
      step gpu_bench 400 env BIN_DIR="$bin" BENCH_BIN_DIR="$bin" BENCH_MODELS_ROOT=/tmp/phi-bench \
        PHI_CUDA_LIBS="${PHI_CUDA_LIBS:-}" bash benches/gpu.sh
      sed -n '/^== summary/,$p' "$logs/gpu_bench.log" >>"$summary"
      ;;
    *)
      note "unknown step $what"
      status=1
      ;;
  esac
done
cat "$summary"
exit $status
