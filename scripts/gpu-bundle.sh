#!/usr/bin/env bash
# Builds, here on a machine without a GPU, everything the GPU checks of issue 7 run, and packs it
# into one small file for a GPU machine that has no Rust toolchain (see scripts/gpu-check.sh,
# which runs on that machine):
#   - phi-serve built with --features cuda (release);
#   - the test binaries of `cargo test --features cuda -p phi-engine --test cuda_parity` and
#     `-p phi-serve --test cuda` (release, so the GPU run spends no time in unoptimised code);
#   - the CPU benchmark tools bench-model and loadgen that benches/gpu.sh drives.
# The binaries are stripped and packed together in one xz stream: the three CUDA binaries each
# embed candle's kernels as PTX text, which xz's 64 MiB window stores once.
#
# Test binaries have the source tree's absolute path built in (CARGO_MANIFEST_DIR,
# CARGO_BIN_EXE_phi-serve); the bundle records it in ROOT and gpu-check.sh links that path to
# the tree it runs in.
#
# Takes about 40 minutes on 2 cores from nothing (candle's kernels alone are 6 to 10 minutes of
# nvcc), a few with target/cuda and target/release warm. Prints the bundle's size next to the
# size of the working tree, since a device run carries both under one limit (64 MiB).
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
mkdir -p "$stage/bin"
cp "$phi" "$stage/bin/phi-serve"
cp "$parity" "$stage/bin/cuda_parity"
cp "$serve_test" "$stage/bin/phi-serve-cuda-test"
cp "$root/target/release/bench-model" "$root/target/release/loadgen" "$stage/bin/"
strip --strip-debug "$stage"/bin/*
echo "$root" >"$stage/ROOT"
git rev-parse HEAD >"$stage/COMMIT"
git status --porcelain --untracked-files=no | sed 's/^/dirty: /' >>"$stage/COMMIT"

mkdir -p "$out"
rm -f "$out/bundle.tar.xz"
tar -C "$stage" -cf - ROOT COMMIT bin | xz -9e -T1 >"$out/bundle.tar.xz"

# What a device run carries besides the bundle: tracked files and untracked ones git keeps.
tree=$( (git ls-files -z --cached --others --exclude-standard) |
  xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
bundle=$(stat -c %s "$out/bundle.tar.xz")
limit=$((64 * 1024 * 1024))
ls -l "$stage/bin"
printf 'bundle %s: %.1f MiB; working tree %.1f MiB; together %.1f of 64 MiB\n' \
  "$out/bundle.tar.xz" "$(bc -l <<<"$bundle / 1048576")" "$(bc -l <<<"$tree / 1048576")" \
  "$(bc -l <<<"($bundle + $tree) / 1048576")"
if [ $((bundle + tree)) -gt "$limit" ]; then
  echo "TOO LARGE for one device run: carry less" >&2
  exit 1
fi
echo "carry it with: run(carry=[\"${out#"$root"/}\"], command=\"bash scripts/gpu-check.sh\")"
