#!/usr/bin/env bash
# Builds a CUDA 13.0 toolchain from PyPI wheels in DIR (no GPU, no system CUDA needed) and writes
# DIR/env.sh with what candle's `cuda` and `flash-attn` features need to compile and link.
# usage: docker/cuda-toolchain.sh [DIR]    (default: target/cuda-toolchain)    then: source DIR/env.sh
# Idempotent: a second run only re-checks. Needs python3 (venv), gcc, git.
#
# Provenance: copied from the project's shared build notes (shared/cuda/setup-cuda-toolchain.sh,
# "Building phi-serve for NVIDIA GPUs without a GPU or a system CUDA toolkit", verified with
# candle 0.11.1 / cudarc 0.19.10 / CUDA 13.0.88). Changes here: the default DIR, PIP_ARGS, and
# the CUTLASS wheel is deleted once unpacked. Everything comes from PyPI:
#   nvcc/crt/nvvm (pinned together: unpinned, pip pulls crt and nvvm of a newer release),
#   runtime/cccl headers, cuBLAS/cuRAND/NVRTC (what candle links), CUTLASS 3.5.0 headers.
# All CUDA 13 wheels install into <site-packages>/nvidia/cu13/{bin,include,lib}.
set -euo pipefail
DIR=${1:-target/cuda-toolchain}
mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
PY=${PYTHON:-python3}
# Extra pip flags, e.g. PIP_ARGS="--no-cache-dir" in a container layer.
read -r -a PIP_EXTRA <<< "${PIP_ARGS:-}"
# One CUDA release for the compiler pieces (nvcc pulls crt and nvvm, which must match it), and
# the libraries that cudarc links against (candle enables cudarc's dynamic linking).
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
      nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
CUTLASS_WHEEL=nvidia-cutlass==3.5.0.0                    # headers of CUTLASS v3.5.0
CUTLASS_COMMIT=7d49e6c7e2f8896c47f586706e67e1fb215529dc  # what candle-flash-attn 0.11 pins

[ -x "$DIR/venv/bin/python" ] || "$PY" -m venv "$DIR/venv"
"$DIR/venv/bin/python" -m pip install -q --disable-pip-version-check "${PIP_EXTRA[@]}" "${PKGS[@]}"
CU=$("$DIR/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/nvidia/cu13
[ -x "$CU/bin/nvcc" ] || { echo "nvcc not found under $CU" >&2; exit 1; }

# The wheels ship only versioned libraries; the linker wants the plain names.
for l in cublas cublasLt nvrtc cudart; do ln -sf "lib$l.so.13" "$CU/lib/lib$l.so"; done
ln -sf libcurand.so.10 "$CU/lib/libcurand.so"
# No wheel ships the driver (libcuda.so.1 comes with the GPU driver at run time), so link against
# a stub that exports the driver API's symbols, generated from cuda.h, as CUDA's own stubs do.
# cudarc's build script records its link search folders when it first runs: make the stub
# before the first build (or `cargo clean -p cudarc` after adding it).
if [ ! -f "$CU/lib/stubs/libcuda.so" ]; then
  mkdir -p "$CU/lib/stubs"
  gcc -E -P "$CU/include/cuda.h" | grep -oE '\bCUresult\s+cu[A-Za-z0-9_]+\s*\(' \
    | sed -E 's/CUresult\s+//; s/\s*\(//' | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' > "$DIR/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$DIR/libcuda-stub.c"
fi

# candle-flash-attn's build clones CUTLASS from GitHub unless cudaforge's cache already holds the
# pinned commit: fill that cache with the same release's headers from PyPI.
CF=$DIR/cudaforge/git/checkouts/cutlass-${CUTLASS_COMMIT:0:16}
if [ ! -f "$CF/include/cutlass/version.h" ]; then
  rm -rf "$CF" "$DIR/cutlass-wheel"; mkdir -p "$CF/tools/util" "$DIR/cutlass-wheel"
  "$DIR/venv/bin/python" -m pip download -q --disable-pip-version-check "${PIP_EXTRA[@]}" \
    --no-deps -d "$DIR/cutlass-wheel" "$CUTLASS_WHEEL"
  "$DIR/venv/bin/python" -c 'import glob, sys, zipfile; zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]).extractall(sys.argv[1])' "$DIR/cutlass-wheel"
  cp -r "$DIR/cutlass-wheel/cutlass_library/source/include" "$CF/include"
  cp -r "$DIR/cutlass-wheel/cutlass_library/source/tools/util/include" "$CF/tools/util/include"
  rm -rf "$DIR/cutlass-wheel"
  git -C "$CF" init -q && echo "$CUTLASS_COMMIT" > "$CF/.git/HEAD"  # cudaforge checks HEAD only
fi

cat > "$DIR/env.sh" <<ENV
# CUDA 13.0 toolchain from PyPI for building with --features cuda (kernels for sm_90 unless CUDA_COMPUTE_CAP says otherwise).
export CUDA_HOME="$CU" CUDA_PATH="$CU" CUDA_ROOT="$CU" NVCC="$CU/bin/nvcc"
export PATH="$CU/bin:\$PATH"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=\${CUDARC_CUDA_VERSION:-13000}
export CUDAFORGE_HOME="$DIR/cudaforge"
# At run time on a GPU machine: the driver's libcuda.so.1 plus these wheels' libraries.
export PHI_CUDA_LIBS="$CU/lib"
ENV
"$CU/bin/nvcc" --version | tail -n 1
echo "now: source $DIR/env.sh"
