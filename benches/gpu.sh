#!/usr/bin/env bash
# GPU benchmark of phi-serve against transformers (PyTorch) on the same GPU, on a random-weight
# checkpoint of Phi-3-mini-4k's exact shape (3.8B parameters, bf16):
#   - prefill tokens/s of one ~2048-token prompt, and single-stream decode tokens/s at a short
#     context and after that prompt (`phi-serve generate`, after a warm-up run that JIT-compiles
#     the kernels);
#   - aggregate decode tokens/s at 1, 8, 32, 64 and 128 concurrent streams (`loadgen` against
#     `phi-serve serve`, greedy, 64 new tokens a request), and at 64 streams sampled with
#     temperature 0.8 and top_p 0.9 (drawn on the GPU, kernels/sampling.cu);
#   - the same numbers from transformers (benches/gpu_transformers.py, sdpa attention) when
#     torch and transformers are importable, the ratios phi-serve / transformers, and decode's
#     weight-read bandwidth as a fraction of the GPU's measured device-to-device copy bandwidth.
#
# STATUS: UNRUN. Written on a machine without a GPU; the numbers it prints have never been seen.
#
# The binaries are built elsewhere (Rust need not be installed on the GPU machine):
#   bash docker/build-cuda.sh && cargo build --release -p phi-serve-benches --bins
#   then carry target/cuda/release/phi-serve, target/release/{bench-model,loadgen} and run
#   BIN_DIR=... BENCH_BIN_DIR=... bash benches/gpu.sh
# With its line tables the CUDA binary is ~175 MB; `strip --strip-debug` makes it ~61 MiB and
# gzip ~17 MB, which is what to carry where transfers are limited (the others shrink alike).
# Needs about 20 GB of disk and 16 GB of host memory for the checkpoint (written once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

phi=${BIN_DIR:-$root/target/cuda/release}/phi-serve
bench_bin=${BENCH_BIN_DIR:-$root/target/release}
concurrency=${CONCURRENCY:-1,8,32,64,128}
# bench-model writes under $CARGO_TARGET_DIR/bench-models and copies the tokenizer from here.
export CARGO_TARGET_DIR=${BENCH_MODELS_ROOT:-$root/target}
export PHI_BENCH_TOKENIZER_DIR=$root/models/tiny/phi3-mini-4k

# The CUDA 13 libraries: the toolchain's (PHI_CUDA_LIBS from docker/cuda-toolchain.sh's
# env.sh), else those of the PyTorch wheels.
if [ -z "${PHI_CUDA_LIBS:-}" ]; then
  PHI_CUDA_LIBS=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
fi
[ -n "$PHI_CUDA_LIBS" ] && [ -d "$PHI_CUDA_LIBS" ] && export LD_LIBRARY_PATH=$PHI_CUDA_LIBS:${LD_LIBRARY_PATH:-}

echo "== benches/gpu.sh (UNRUN until now: check the numbers make sense)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$phi" --version || { echo "cannot run $phi (libraries: ldd below)" >&2; ldd "$phi" >&2; exit 1; }
dir=$("$bench_bin/bench-model" mini)

# ~2048 tokens of English-like text (each of these words is one or two tokens).
prompt=$(python3 -c '
import random
r = random.Random(7)
w = "the model server answers a question about weather in Paris please explain why memory bandwidth limits decode speed on GPUs".split()
print(" ".join(r.choice(w) for _ in range(1700)))')

gen() { # gen PROMPT MAX_TOKENS EXTRA... -> the speed line
  "$phi" generate --model "$dir" --device cuda --raw --prompt "$1" --max-tokens "$2" --ignore-eos \
    "${@:3}" 2>&1 >/dev/null | grep '^prompt: '
}
echo "== phi-serve generate (warm-up: kernels are JIT-compiled from PTX on first use)"
gen "hi" 8 >/dev/null
line=$(gen "$prompt" 16 --prefill-chunk 0)
echo "prefill, whole prompt: $line"
# 128 new tokens after the long prompt: decode where attention reads ~2k positions a layer, as
# much as 10% of the weights' bytes (the split decode kernel's case), beside the short one below.
line_chunked=$(gen "$prompt" 128)
echo "prefill, 512-token chunks, then decode at ~2k context: $line_chunked"
long_decode_tps=$(sed -E 's/.*generation: [0-9]+ tokens in [0-9.]+s \(([0-9.]+) tokens\/s\).*/\1/' <<<"$line_chunked")
# "prompt: N tokens in Xs (P tokens/s); generation: M tokens in Ys (D tokens/s); ..."
prefill_tps=$(sed -E 's/^prompt: [0-9]+ tokens in [0-9.]+s \(([0-9.]+) tokens\/s\).*/\1/' <<<"$line")
line=$(gen "Tell me a story." 256)
echo "single stream: $line"
decode_tps=$(sed -E 's/.*generation: [0-9]+ tokens in [0-9.]+s \(([0-9.]+) tokens\/s\).*/\1/' <<<"$line")

echo "== phi-serve serve + loadgen at concurrency $concurrency"
log=$(mktemp)
"$phi" serve --model "$dir" --device cuda --port 0 --max-batch-size 128 --max-queue 1024 \
  >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
url=
for _ in $(seq 1200); do
  url=$(sed -n 's/^phi-serve listening on //p' "$log")
  [ -n "$url" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "phi-serve did not start" >&2; cat "$log"; exit 1; }
"$bench_bin/loadgen" --url "$url" --concurrency 1 --max-tokens 8 >/dev/null 2>&1 # warm-up
table=$("$bench_bin/loadgen" --url "$url" --concurrency "$concurrency" --max-tokens 64)
echo "$table"
sampled=$("$bench_bin/loadgen" --url "$url" --concurrency 64 --max-tokens 64 --temperature 0.8 --top-p 0.9)
echo "sampled (temperature 0.8, top_p 0.9):"
echo "$sampled"
kill "$server" 2>/dev/null || true

echo "== transformers on the same GPU"
hf=
if python3 -c 'import torch, transformers' 2>/dev/null; then
  hf=$(python3 benches/gpu_transformers.py "$dir" --batches "$concurrency" | tail -n 1) || hf=
  echo "$hf"
else
  echo "SKIPPED: torch/transformers not importable"
fi

echo "== summary (ratio: phi-serve / transformers; bandwidth: the bf16 weights read once per decode step)"
PREFILL="$prefill_tps" DECODE="$decode_tps" LONG_DECODE="$long_decode_tps" TABLE="$table" SAMPLED="$sampled" HF="$hf" CONC="$concurrency" python3 - <<'PY'
import json, os
hf = json.loads(os.environ["HF"]) if os.environ["HF"] else None
def out_tps(table):
    agg = {}
    for line in table.splitlines():
        f = line.split()
        if len(f) > 4 and f[0].isdigit():
            agg[f[0]] = float(f[4])  # out tok/s
    return agg
agg = out_tps(os.environ["TABLE"])
sampled = out_tps(os.environ["SAMPLED"])
# Bytes a decode step reads: every weight but the embedding table (one row of it).
weights = (hf["weight_bytes"] if hf else 2 * 3_821_079_552) - 2 * 32064 * 3072
copy = hf["copy_bytes_per_s"] if hf else None

def row(name, ours, theirs, decode_streams=None):
    ratio = f"{ours / theirs:6.2f}x" if theirs else "    n/a"
    bw = ""
    if decode_streams and copy:
        # A decode step reads every weight once, whatever the batch: steps/s * weight bytes.
        bw = f"  weights read at {ours / decode_streams * weights / copy * 100:5.1f}% of copy bandwidth"
    theirs_s = f"{theirs:10.1f}" if theirs else "       n/a"
    print(f"{name:<26} {ours:10.1f} {theirs_s} {ratio}{bw}")

print(f"{'':<26} {'phi-serve':>10} {'transf.':>10} {'ratio':>7}")
row("prefill tok/s (1 prompt)", float(os.environ["PREFILL"]), hf and hf["prefill_tokens_per_s"])
row("decode tok/s, 1 stream", float(os.environ["DECODE"]), hf and hf["decode_tokens_per_s"].get("1"), 1)
row("  the same at ~2k context", float(os.environ["LONG_DECODE"]), None, 1)
for c in os.environ["CONC"].split(","):
    if c in agg:
        row(f"decode tok/s, {c} streams", agg[c], hf and hf["decode_tokens_per_s"].get(c), int(c))
if "64" in sampled:
    row("  64, t 0.8 top_p 0.9", sampled["64"], agg.get("64"))
    print("  (that row's ratio: sampled / greedy phi-serve, 64 streams)")
if copy:
    print(f"measured copy bandwidth: {copy / 1e9:.0f} GB/s (read + write)")
PY
