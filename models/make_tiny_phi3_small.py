"""Makes models/tiny/phi3-small-8k (a tiny random-weight Phi3SmallForCausalLM checkpoint in the
Hugging Face layout) and its reference outputs in crates/engine/tests/reference/phi3-small-8k/.

Why not transformers: Phi-3-small is remote code (modeling_phi3_small.py with Triton block-sparse
kernels) that is not part of transformers and cannot be fetched here. The reference is mlx-lm's
`phi3small` model (an independent implementation that loads the official checkpoints), run on
the CPU in float32. Its full-sequence prefill places a query's block at the wrong offset when
the length is not a multiple of the block size (it builds the block mask for the last q_len rows
of whole blocks), so every reference here is taken where mlx-lm is right: full forward passes of
whole blocks (the logits cases) and one-token steps through its KV cache (the greedy cases,
prompt included). The script checks that both agree where they overlap.

    python3 -m venv /tmp/mlx && /tmp/mlx/bin/pip install -r models/requirements-phi3-small.txt
    /tmp/mlx/bin/python models/make_tiny_phi3_small.py

Deterministic (numpy seeds); the tokenizer files (cl100k_base.tiktoken, tokenizer_config.json,
special_tokens_map.json) must already be in the model folder (see models/README.md).
"""

import base64
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
import numpy as np
import tiktoken
from mlx_lm.models import phi3small
from mlx_lm.utils import load_model

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "tiny" / "phi3-small-8k"
REF = REPO / "crates" / "engine" / "tests" / "reference" / "phi3-small-8k"

VOCAB = 100352
HIDDEN, HEADS, KV_HEADS, FF, LAYERS = 32, 4, 2, 64, 2
HEAD_DIM = HIDDEN // HEADS
BLOCK, LOCAL_BLOCKS, VERT_STRIDE = 32, 2, 4
MIN_MARGIN = 0.02
TOP = 64  # logits kept per recorded position
DUMMY_IDS = [100256, 100258, 100259, 100260, 100264, 100265] + list(range(100267, VOCAB))

CONFIG = {
    "_name_or_path": "Phi-3-small-8k-instruct (tiny random weights)",
    "architectures": ["Phi3SmallForCausalLM"],
    "attention_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
        "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
        "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer",
    },
    "blocksparse_block_size": BLOCK,
    "blocksparse_homo_head_pattern": False,
    "blocksparse_num_local_blocks": LOCAL_BLOCKS,
    "blocksparse_triton_kernel_block_size": BLOCK,
    "blocksparse_vert_stride": VERT_STRIDE,
    "bos_token_id": 100257,
    "dense_attention_every_n_layers": 2,
    "embedding_dropout_prob": 0.1,
    "eos_token_id": 100257,
    "ff_dim_multiplier": None,
    "ff_intermediate_size": FF,
    "ffn_dropout_prob": 0.1,
    "gegelu_limit": 20.0,
    "gegelu_pad_to_256": True,
    "hidden_act": "gegelu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "max_position_embeddings": 8192,
    "model_type": "phi3small",
    "mup_attn_multiplier": 1.0,
    "mup_embedding_multiplier": 10.0,
    "mup_use_scaling": True,
    "mup_width_multiplier": 8.0,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS,
    "pad_sequence_to_multiple_of_64": True,
    "reorder_and_upcast_attn": False,
    "rope_embedding_base": 1000000,
    "rope_position_scale": 1.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1",
    "use_cache": True,
    "vocab_size": VOCAB,
}
GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 100257,
    "eos_token_id": [100257, 100266],
    "transformers_version": "4.38.1",
}

PROSE = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each step "
    "as his father had taught him. At the top he polished the great lens, trimmed the wick, "
    "and watched the ships pass beyond the reef. Some nights the fog rolled in so thick that "
    "he could not see his own hands, and then he rang the bell until dawn. The villagers said "
    "he never slept, but the truth was simpler: he slept in the afternoons, when the sea was "
    "calm and the gulls were quiet. Numbers like 3.14159, 2718 and 1,000,000 appeared in his "
    "log, next to notes on wind, tide and the colour of the sky at sunset. "
)


def encoding() -> tiktoken.Encoding:
    """cl100k_base from the model folder's ranks file with Phi-3-small's special tokens."""
    ranks = {}
    for line in (MODEL / "cl100k_base.tiktoken").read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    special = {
        "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260, "<|system|>": 100261, "<|user|>": 100262,
        "<|assistant|>": 100263, "<|end|>": 100266, "<|endofprompt|>": 100276,
    }
    pat = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
           r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
    return tiktoken.Encoding("phi3small", pat_str=pat, mergeable_ranks=ranks, special_tokens=special)


def init_weights(seed: int, gains: dict) -> dict:
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def norm(w):
        return {"weight": rng.uniform(0.7, 1.3, size=w).astype(np.float32), "bias": normal(w, 0.1)}

    w = {"model.embed_tokens.weight": normal((VOCAB, HIDDEN), gains["embed"])}
    qkv_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, (out, inp, gain) in {
            "self_attn.query_key_value": (qkv_out, HIDDEN, gains["qkv"]),
            "self_attn.dense": (HIDDEN, HEADS * HEAD_DIM, gains["dense"]),
            "mlp.up_proj": (2 * FF, HIDDEN, gains["up"]),
            "mlp.down_proj": (HIDDEN, FF, gains["down"]),
        }.items():
            w[f"{p}.{name}.weight"] = normal((out, inp), gain / np.sqrt(inp))
            w[f"{p}.{name}.bias"] = normal((out,), 0.1)
        for name in ["input_layernorm", "post_attention_layernorm"]:
            for k, v in norm(HIDDEN).items():
                w[f"{p}.{name}.{k}"] = v
    for k, v in norm(HIDDEN).items():
        w[f"model.final_layernorm.{k}"] = v
    return w


def save_checkpoint(weights: dict):
    MODEL.mkdir(parents=True, exist_ok=True)
    stored = {k: mx.array(v).astype(mx.bfloat16) for k, v in sorted(weights.items())}
    mx.save_safetensors(str(MODEL / "model.safetensors"), stored, metadata={"format": "pt"})
    (MODEL / "config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True) + "\n")
    (MODEL / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")


def load_reference():
    model, _ = load_model(MODEL)
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    return model


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_forward(w: dict, ids, sparse: bool) -> np.ndarray:
    """Phi3SmallForCausalLM's forward pass over `ids` (every position), float64."""
    n, g = len(ids), HEADS // KV_HEADS
    x = w["model.embed_tokens.weight"][ids] * CONFIG["mup_embedding_multiplier"]
    pos = np.arange(n)[:, None]
    inv = CONFIG["rope_embedding_base"] ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    ang = np.concatenate([pos * inv, pos * inv], -1)  # [n, hd]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(t):  # [n, heads, hd], rotate-half
        half = HEAD_DIM // 2
        rot = np.concatenate([-t[..., half:], t[..., :half]], -1)
        return t * cos + rot * sin

    qb, kb = np.arange(n)[:, None] // BLOCK, np.arange(n)[None, :] // BLOCK
    causal = np.arange(n)[None, :] <= np.arange(n)[:, None]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        lin = lambda name, t: t @ w[f"{p}.{name}.weight"].T + w[f"{p}.{name}.bias"]
        a = layer_norm(x, w[f"{p}.input_layernorm.weight"], w[f"{p}.input_layernorm.bias"])
        qkv = lin("self_attn.query_key_value", a).reshape(n, KV_HEADS, g + 2, HEAD_DIM)
        q = rope(qkv[:, :, :g].reshape(n, HEADS, HEAD_DIM))
        k, v = rope(qkv[:, :, g]), qkv[:, :, g + 1]
        layer_sparse = sparse and (i + 1) % CONFIG["dense_attention_every_n_layers"] != 0
        out = np.zeros((n, HEADS, HEAD_DIM))
        for h in range(HEADS):
            s = q[:, h] @ k[:, h // g].T * (CONFIG["mup_attn_multiplier"] / HEAD_DIM)
            seen = causal.copy()
            if layer_sparse:
                seen &= (qb - kb < LOCAL_BLOCKS) | ((kb + h + 1) % VERT_STRIDE == 0)
            s = np.where(seen, s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            out[:, h] = (e / e.sum(-1, keepdims=True)) @ v[:, h // g]
        x = x + lin("self_attn.dense", out.reshape(n, -1))
        m = layer_norm(x, w[f"{p}.post_attention_layernorm.weight"], w[f"{p}.post_attention_layernorm.bias"])
        y = lin("mlp.up_proj", m)
        gate, linear = np.minimum(y[:, 0::2], 20.0), np.clip(y[:, 1::2], -20.0, 20.0)
        x = x + lin("mlp.down_proj", gate / (1 + np.exp(-1.702 * gate)) * (linear + 1))
    x = layer_norm(x, w["model.final_layernorm.weight"], w["model.final_layernorm.bias"])
    logits = x @ w["model.embed_tokens.weight"].T / CONFIG["mup_width_multiplier"]
    logits[:, DUMMY_IDS] = -np.inf
    return logits


def stepwise(model, prompt, n_new):
    """Every prompt token and then greedy tokens, one at a time through the KV cache (a single
    query: the block mask is right at any length). Returns (generated, logits of every step)."""
    cache = model.make_cache() if hasattr(model, "make_cache") else None
    if cache is None:
        from mlx_lm.models.cache import make_prompt_cache
        cache = make_prompt_cache(model)
    rows, gen = [], []
    tokens = list(prompt)
    i = 0
    while True:
        out = model(mx.array([[tokens[i]]]), cache=cache)
        row = np.array(out[0, -1].astype(mx.float32))
        rows.append(row)
        i += 1
        if i == len(tokens):
            if len(gen) == n_new:
                break
            nxt = int(np.argmax(row))
            gen.append(nxt)
            tokens.append(nxt)
    return gen, np.stack(rows)


def maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference of the finite logits (the masked ids are -inf in both)."""
    fin = np.isfinite(a)
    assert (fin == np.isfinite(b)).all(), "the -inf ids differ"
    return float(np.abs(a[fin] - b[fin]).max())


def margin(row: np.ndarray) -> float:
    top2 = np.sort(row)[-2:]
    return float(top2[1] - top2[0])


def top(row: np.ndarray, k: int):
    ids = np.argsort(-row, kind="stable")[:k]
    return [int(i) for i in ids], [float(row[i]) for i in ids]


def make():
    enc = encoding()
    prose = enc.encode(PROSE * 6)
    chat = enc.encode(
        "<|endoftext|><|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n"
        "Tell me about the lighthouse.<|end|>\n<|assistant|>\n",
        allowed_special="all",
    )
    logits_lengths = [64, 160, 256]
    greedy_prompts = {
        "short": prose[:5],
        "mid": prose[10:50],
        "crossing": prose[20:120],
        "long": prose[:200],
        "chat": chat,
    }
    n_new = 20

    gains = {"embed": 8.0, "qkv": 4.0, "dense": 240.0, "up": 2.0, "down": 240.0}
    for seed in range(1000, 1100):
        weights = init_weights(seed, gains)
        save_checkpoint(weights)
        model = load_reference()
        ok = True
        greedy = {}
        for name, prompt in greedy_prompts.items():
            gen, rows = stepwise(model, prompt, n_new)
            steps = rows[len(prompt) - 1:]
            m = min(margin(r) for r in steps)
            distinct = len(set(gen))
            if m < MIN_MARGIN or distinct < 8 or any(t >= 100256 for t in gen):
                print(f"seed {seed}: {name} margin {m:.3f}, {distinct} distinct", file=sys.stderr)
                ok = False
                break
            greedy[name] = (prompt, gen, rows)
        if ok:
            break
    else:
        raise SystemExit("no seed met the margin and diversity targets")
    print(f"seed {seed}", file=sys.stderr)

    # A second, independent forward pass (numpy, float64, written from PHI3_SMALL.md) agrees
    # with the reference at every position, and block sparsity matters: without it the logits
    # past the local blocks change.
    stored = {k: np.array(v.astype(mx.float32), dtype=np.float64)
              for k, v in mx.load(str(MODEL / "model.safetensors")).items()}
    ids = greedy["long"][0][:160]
    _, steps = stepwise(model, ids, 0)
    ours = numpy_forward(stored, ids, sparse=True)
    d = maxdiff(ours, steps)
    assert d < 1e-3, f"numpy and mlx-lm disagree by {d}"
    dense = numpy_forward(stored, ids, sparse=False)
    sparsity = maxdiff(dense[64:], ours[64:])
    assert sparsity > 1e-2, f"block sparsity changes the logits by only {sparsity}"
    assert maxdiff(dense[:64], ours[:64]) < 1e-9
    # mlx-lm's full-sequence pass adds its boolean causal mask to the scores of the sparse
    # layers (no -inf): record how far off it is, to say why it is not used.
    d_full = maxdiff(np.array(model(mx.array([ids]))[0].astype(mx.float32)), steps)
    print(f"numpy vs mlx-lm stepwise {d:.3g}; sparsity effect {sparsity:.3g}; "
          f"mlx-lm full pass off by {d_full:.3g}", file=sys.stderr)

    REF.mkdir(parents=True, exist_ok=True)
    tensors = {}
    cases = []
    for n in logits_lengths:
        ids = prose[200:200 + n]
        _, rows = stepwise(model, ids, 0)
        name = f"prose_{n}"
        full_rows = [n // 2, n - 1]
        tensors[f"logits.{name}"] = mx.array(rows[full_rows])
        cases.append({
            "name": name,
            "input_ids": ids,
            "full_rows": full_rows,
            "top": [dict(zip(["ids", "logits"], top(r, TOP))) for r in rows],
        })
    greedy_cases = []
    for name, (prompt, gen, rows) in greedy.items():
        steps = rows[len(prompt) - 1:]
        greedy_cases.append({
            "name": name,
            "prompt_ids": prompt,
            "generated_ids": gen,
            "min_margin": min(margin(r) for r in steps),
            "steps": [dict(zip(["ids", "logits"], top(r, 16))) for r in steps],
        })
    mx.save_safetensors(str(REF / "logits.safetensors"), tensors)
    reference = {
        "about": "mlx-lm phi3small (float32, CPU) on models/tiny/phi3-small-8k; "
                 "made by models/make_tiny_phi3_small.py",
        "versions": {"mlx": mx.__version__, "mlx_lm": __import__("mlx_lm").__version__,
                     "tiktoken": tiktoken.__version__},
        "seed": seed,
        "gains": gains,
        "sparsity_effect": sparsity,
        "numpy_vs_mlx": d,
        "mlx_full_pass_error": d_full,
        "logits_cases": cases,
        "greedy_cases": greedy_cases,
    }
    (REF / "reference.json").write_text(json.dumps(reference) + "\n")
    for c in greedy_cases:
        print(c["name"], len(c["prompt_ids"]), "->", c["generated_ids"][:8], f"margin {c['min_margin']:.3f}",
              file=sys.stderr)


if __name__ == "__main__":
    make()
