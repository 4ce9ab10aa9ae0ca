#!/usr/bin/env bash
# Builds, here on a machine without a GPU, everything the GPU checks of issue 7 run, and packs it
# for a GPU machine that has no Rust toolchain (scripts/gpu-check.sh runs it there). Two
# bundles, because a device run carries the tracked tree and the carried paths under one limit
# of 64 MiB, and the tree alone is about 54 MiB:
#   parity.tar.xz  the test binary of `cargo test --features cuda -p phi-engine --test
#                  cuda_parity`, carried beside the whole tree;
#   serve.tar.xz   phi-serve built with --features cuda, the test binary of `-p phi-serve
#                  --test cuda`, and the CPU benchmark tools bench-model and loadgen that
#                  benches/gpu.sh drives, carried beside the tree made light by
#                  scripts/gpu-slim.sh (the CPU-only fixtures left out).
# Everything is built in release, so the GPU run spends no time in unoptimised code, stripped,
# and packed with xz. It prints each run's size against the limit.
#
# Test binaries have the source tree's absolute path built in (CARGO_MANIFEST_DIR,
# CARGO_BIN_EXE_phi-serve); each bundle records it in ROOT and gpu-check.sh links that path to
# the tree it runs in.
#
# Takes about an hour on 2 cores from nothing (candle's kernels are compiled with nvcc once per
# feature set, 12 minutes each), a few minutes with target/cuda and target/release warm.
#
# usage: scripts/gpu-bundle.sh [OUTDIR]   (default target/gpu-bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${1:-$root/target/gpu-bundle}

toolchain=${CUDA_TOOLCHAIN_DIR:-$root/target/cuda-toolchain}
[ -f "$toolchain/env.sh" ] || bash docker/cuda-toolchain.sh "$toolchain"

# The path of each executable a `cargo ... --message-format=json` build produced, for one target.
executable() { # executable TARGET_NAME < cargo's json lines
  python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == name and m.get("executable"):
        print(m["executable"])' "$1"
}

cuda_cargo() {
  # A subshell, so the toolchain's environment never reaches the CPU build below.
  (
    # shellcheck source=/dev/null
    source "$toolchain/env.sh"
    CARGO_TARGET_DIR=$root/target/cuda cargo "$@"
  )
}

echo "== gpu-bundle: phi-serve --features cuda"
cuda_cargo build --release --locked --features cuda -p phi-serve
phi=$root/target/cuda/release/phi-serve
echo "== gpu-bundle: test binaries (cuda_parity, phi-serve cuda)"
parity=$(cuda_cargo test --release --locked --features cuda -p phi-engine --test cuda_parity \
  --no-run --message-format=json-render-diagnostics | executable cuda_parity)
serve_test=$(cuda_cargo test --release --locked --features cuda -p phi-serve --test cuda \
  --no-run --message-format=json-render-diagnostics | executable cuda)
echo "== gpu-bundle: bench-model, loadgen (CPU)"
cargo build --release --locked -p phi-serve-benches --bin bench-model --bin loadgen

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pack() { # pack NAME FILE...: NAME.tar.xz of the files (stripped) with ROOT and COMMIT
  local name=$1 dir=$stage/$1
  shift
  mkdir -p "$dir/bin"
  cp "$@" "$dir/bin/"
  strip --strip-all "$dir"/bin/*
  echo "$root" >"$dir/ROOT"
  git rev-parse HEAD >"$dir/COMMIT"
  git status --porcelain --untracked-files=no | sed 's/^/dirty: /' >>"$dir/COMMIT"
  # One xz stream with a window larger than the binaries: the CUDA code the binaries share
  # (candle's kernels, ~45 MB each) is stored once.
  tar -C "$dir" -cf - ROOT COMMIT bin | xz -9e -T1 --lzma2=preset=9e,dict=256MiB >"$out/$name.tar.xz"
}
mkdir -p "$out"
rm -f "$out"/*.tar.xz
cp "$parity" "$stage/cuda_parity"
pack parity "$stage/cuda_parity"
cp "$serve_test" "$stage/phi-serve-cuda-test"
pack serve "$phi" "$stage/phi-serve-cuda-test" "$root/target/release/bench-model" \
  "$root/target/release/loadgen"

# What a device run carries besides a bundle: tracked files and untracked ones git keeps (the
# size of a link is the link's), in full and as scripts/gpu-slim.sh leaves them.
sizes() { xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
tree=$(git ls-files -z --cached --others --exclude-standard | sizes)
mapfile -t slim < <(bash scripts/gpu-slim.sh paths)
fixtures=$(git ls-files -z -- "${slim[@]}" | sizes)
limit=$((64 * 1024 * 1024))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
ok=0
check() { # check WHAT TREE_BYTES BUNDLE
  local bundle total
  bundle=$(stat -c %s "$out/$3")
  total=$(($2 + bundle))
  printf '%-44s tree %s + %s = %s of 64 MiB\n' "$1" "$(mib "$2")" "$(mib "$bundle")" "$(mib "$total")"
  [ "$total" -le "$limit" ] || { echo "  TOO LARGE to travel" >&2; ok=1; }
}
ls -l "$out"
check "run 1 (parity, whole tree)" "$tree" parity.tar.xz
check "run 2 (serve and bench, after gpu-slim on)" "$((tree - fixtures))" serve.tar.xz
echo "run 1: run(carry=[\"${out#"$root"/}/parity.tar.xz\"], command=\"bash scripts/gpu-check.sh parity\")"
echo "run 2: scripts/gpu-slim.sh on, then run(carry=[\"${out#"$root"/}/serve.tar.xz\"],"
echo "       command=\"bash scripts/gpu-check.sh serve bench\"), then scripts/gpu-slim.sh off"
exit $ok
