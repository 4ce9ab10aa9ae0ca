"""The transformers (PyTorch) side of benches/gpu.sh, on the same random-weight checkpoint and GPU.

UNRUN: written on a machine without a GPU; run by benches/gpu.sh, which says so again.

Prints one JSON object: device-to-device copy bandwidth (read + write bytes per second, the
roofline of a memory-bound decode step), prefill tokens/s of one prompt of --prefill tokens,
and decode tokens/s at each batch size (greedy, every sequence forced to --new-tokens tokens,
prefill time subtracted).

    python3 benches/gpu_transformers.py MODEL_DIR --batches 1,8,32,64,128
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def timed(fn, repeat=3):
    """Best wall time of `fn()` over `repeat` runs, after one warm-up run."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(gib=4):
    n = gib * (1 << 30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    secs = timed(lambda: dst.copy_(src), repeat=10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / secs  # bytes read + bytes written, per second


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens of the decode runs")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
    args = ap.parse_args()

    out = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "copy_bytes_per_s": copy_bandwidth(),
    }
    import transformers

    out["transformers"] = transformers.__version__
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # `dtype` since 4.56, `torch_dtype` before.
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        args.model, attn_implementation=args.attn, **{dtype_kw: torch.bfloat16}
    ).to("cuda")
    model.eval()
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)

    def ids(batch, length):
        return torch.randint(0, 32000, (batch, length), generator=gen).to("cuda")

    with torch.inference_mode():
        prompt = ids(1, args.prefill)
        # Only the last position's logits, as a server computes them (`logits_to_keep` since
        # transformers 4.50).
        keep = {"logits_to_keep": 1} if (major, minor) >= (4, 50) else {}
        secs = timed(lambda: model(prompt, use_cache=True, **keep))
        out["prefill_tokens_per_s"] = args.prefill / secs

        decode = {}
        for b in [int(x) for x in args.batches.split(",")]:
            p = ids(b, args.prompt)
            mask = torch.ones_like(p)

            def run(n):
                return lambda: model.generate(
                    input_ids=p,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=32000,
                )

            first = timed(run(1), repeat=2)  # prefill plus one token
            full = timed(run(args.new_tokens), repeat=1)
            decode[str(b)] = b * (args.new_tokens - 1) / max(full - first, 1e-9)
        out["decode_tokens_per_s"] = decode
    print(json.dumps(out))


if __name__ == "__main__":
    main()
