#!/usr/bin/env bash
# Load benchmark of the serving core: starts a release phi-serve on a Phi-3-shaped random-weight
# model (438M parameters by default, `tiny` for a quick look) with room for 64 concurrent
# sequences, runs `loadgen` over concurrency 1, 4, 16 and 64, prints its table and stops the
# server. Extra arguments go to loadgen (e.g. --max-tokens 32 --concurrency 1,16).
#
#   bash benches/load.sh [438m|tiny] [loadgen args...]
set -euo pipefail
cd "$(dirname "$0")/.."

model=438m
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
  model=$1
  shift
fi
cargo build --release -q -p phi-serve -p phi-serve-benches --bins
dir=$(target/release/bench-model "$model")

log=$(mktemp)
target/release/phi-serve serve --model "$dir" --port 0 --max-batch-size 64 --max-queue 256 \
  >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
url=
for _ in $(seq 600); do
  url=$(sed -n 's/^phi-serve listening on //p' "$log")
  [ -n "$url" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "phi-serve did not start" >&2; cat "$log"; exit 1; }
echo "phi-serve on $url (model $dir, $(nproc) CPUs), commit $(git rev-parse --short HEAD)"
target/release/loadgen --url "$url" "$@"
