#!/usr/bin/env python3
"""Generate tiny random-weight Phi-3 checkpoints and Hugging Face reference outputs.

Usage (from anywhere):  python models/make_tiny_models.py [--only NAME[,NAME...]]
  (--only: just those variants and/or "tokenizer", e.g. --only phi3-mini-4k-q; default: all)
Dependencies: models/requirements.txt (exact torch / transformers versions).

Deterministic (fixed seeds, one CPU thread) and rerunnable: every output below is deleted and
rewritten on each run. The tokenizer files and templates are read from the team assets folder
($PHI3_ASSETS, default /work/shared/phi3-assets) when it exists, otherwise from the copies this
script already put into the repository, so the repository alone is enough to regenerate.

Outputs
-------
models/tiny/<variant>/                      complete HF model folders (config.json written by
                                            save_pretrained, safetensors weights, generation_config.json,
                                            tokenizer.json, tokenizer_config.json, special_tokens_map.json)
models/tiny/phi3-mini-128k/config.legacy.json  same model, in the published microsoft/Phi-3-mini-128k
                                            config form (`rope_scaling` type "longrope" + top-level
                                            original_max_position_embeddings, `torch_dtype`)
models/tiny/phi3-mini-128k/config.legacy-su.json  the same with the April-2024 type "su"
models/tiny/phi4-mini/config.legacy.json    same for the Phi-4-mini form
crates/engine/tests/reference/<variant>/reference.json + logits.safetensors
crates/engine/tests/reference/tokenizer/tokenize.json, chat.json, phi-3-2024-04/*, llama.cpp inputs,
                                            the Phi-3.5 template

reference.json schema (one per variant)
---------------------------------------
{
  "transformers_version": str, "torch_version": str, "variant": str,
  "model_dir": "models/tiny/<variant>",          # relative to the repository root
  "seed": int,                                    # torch seed the weights were drawn with
  "storage_dtype": "bfloat16" | "float16" | "float32",
  "compute": "float32, eager attention, CPU, eval; weights upcast exactly from storage_dtype",
  "config_summary": {hidden_size, num_attention_heads, num_key_value_heads, head_dim, rotary_dim,
                     intermediate_size, num_hidden_layers, sliding_window, max_position_embeddings,
                     original_max_position_embeddings, rope_type, attention_factor, tie_word_embeddings},
  "notes": [str, ...],
  "logits_cases": [
    {"name": str,                                 # tensor "logits.<name>" in logits.safetensors,
     "input_ids": [int, ...],                     #   shape [len(positions), 32064], float32
     "positions": [int, ...],                     # which rows of the full [seq_len, 32064] logits are stored
     "rope_factors": "short" | "long" | null,     # LongRoPE set HF used for this forward call
     "description": str}
  ],
  "greedy_cases": [
    {"name": str, "prompt_ids": [int, ...],
     "generated_ids": [int, ...],                 # N new tokens, EOS disabled, no logits processors
     "logprobs": [float, ...],                    # log_softmax(raw logits)[generated token], float32
     "top_logprobs": [[[id, lp], ...5], ...N],    # top-5 of log_softmax(raw logits) at each step
     "min_margin": float,                         # min over steps of top1 - top2 raw logit
     "crosses_original_max": bool,                # LongRoPE: generation crossed original_max_position_embeddings
     "description": str}
  ]
}
phi3-mini-4k-q (the quantization test model) adds:
  logits_cases[i]["all_top_logits"]: [[[id, logit], ...5], ...len(input_ids)]  top-5 RAW logits at
                                   EVERY position (positions only selects the full rows stored)
  logits_cases[i]["all_logsumexp"]: [float, ...len(input_ids)]  (logprob = logit - logsumexp)
  "margin_stats": {rows, logits_case_rows, greedy_step_rows, median_margin, p05_margin, min_margin,
                   rows_margin_below_1, median_max_prob, p05_max_prob, argmax_is_successor,
                   argmax_is_current_token, distinct_argmax, max_abs_logit, logit_std}
                 over all positions of the logits cases + every greedy step (top1 - top2 raw logit)
  "quant_simulation": {format: {argmax_agreement, flips, row_max_abs_diff_median,
                       row_max_abs_diff_max, mean_kl}} for q8_0, q8_0+act, q4_0, q4_0+act and a
                       deliberately wrong Q4_0 dequantizer; "quant_simulation_how": how

tokenizer/tokenize.json: {"transformers_version", "tokenizers_version", "tokenizers": {dir_name: source},
  "entries": [{"tokenizer", "text", "ids", "decoded", "decoded_skip_special", "source"}]}
  (`ids` = AutoTokenizer.encode(text, add_special_tokens=False); `decoded` = decode(ids);
   `decoded_skip_special` = decode(ids, skip_special_tokens=True); `source` = "llama.cpp" | "extra")
tokenizer/chat.json: {"transformers_version", "templates": {letter: {"source", "tokenizer", "template"}},
  "entries": [{"template", "tokenizer", "conversation", "messages", "add_generation_prompt",
               "text", "ids"}]}
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
import tokenizers
from safetensors.torch import save_file, load_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    Phi3Config,
    Phi3ForCausalLM,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny"
REF = REPO / "crates" / "engine" / "tests" / "reference"
TOKREF = REF / "tokenizer"
ASSETS = Path(os.environ.get("PHI3_ASSETS", "/work/shared/phi3-assets"))

VOCAB = 32064
REAL_VOCAB = 32011  # ids 0..32010 exist in the tokenizer; 32011..32063 are padding rows
EOS_IDS = [32000, 32001, 32007]
SPECIAL_IDS = set(range(32000, 32011)) | {0, 1, 2}
MIN_MARGIN_REQUIRED = 1e-2  # hard requirement (brief)
MIN_MARGIN_TARGET = 0.1  # seed search aims higher, so bf16/f16 engines stay far from ties

# ----------------------------------------------------------------------------------------------
# Source files (read into memory first: the output folders they may come from are wiped later)
# ----------------------------------------------------------------------------------------------

# name -> list of (file name, [candidate source paths in order])
TOKENIZER_SOURCES = {
    "phi-3-mini-4k-instruct": {
        "tokenizer.json": [ASSETS / "phi-3-mini-4k-instruct/tokenizer.json", TINY / "phi3-mini-4k/tokenizer.json"],
        "tokenizer_config.json": [
            ASSETS / "phi-3-mini-4k-instruct/tokenizer_config.json",
            TINY / "phi3-mini-4k/tokenizer_config.json",
        ],
        "special_tokens_map.json": [
            ASSETS / "phi-3-mini-4k-instruct/special_tokens_map.json",
            TINY / "phi3-mini-4k/special_tokens_map.json",
        ],
    },
    "phi-3-medium": {
        "tokenizer.json": [ASSETS / "ortx-test-data/phi-3-medium/tokenizer.json", TINY / "phi3-medium-4k/tokenizer.json"],
        "tokenizer_config.json": [
            ASSETS / "ortx-test-data/phi-3-medium/tokenizer_config.json",
            TINY / "phi3-medium-4k/tokenizer_config.json",
        ],
        # the medium test data has no special_tokens_map.json; its tokens are the same as mini's
        "special_tokens_map.json": [
            ASSETS / "phi-3-mini-4k-instruct/special_tokens_map.json",
            TINY / "phi3-medium-4k/special_tokens_map.json",
        ],
    },
    "phi-3-2024-04": {
        "tokenizer.json": [ASSETS / "ortx-test-data/phi-3-2024-04/tokenizer.json", TOKREF / "phi-3-2024-04/tokenizer.json"],
        "tokenizer_config.json": [
            ASSETS / "ortx-test-data/phi-3-2024-04/tokenizer_config.json",
            TOKREF / "phi-3-2024-04/tokenizer_config.json",
        ],
    },
}
OTHER_SOURCES = {
    "microsoft-Phi-3.5-mini-instruct.jinja": [
        ASSETS / "llama.cpp/microsoft-Phi-3.5-mini-instruct.jinja",
        TOKREF / "microsoft-Phi-3.5-mini-instruct.jinja",
    ],
    "ggml-vocab-phi-3.gguf.inp": [ASSETS / "llama.cpp/ggml-vocab-phi-3.gguf.inp", TOKREF / "ggml-vocab-phi-3.gguf.inp"],
    "ggml-vocab-phi-3.gguf.out": [ASSETS / "llama.cpp/ggml-vocab-phi-3.gguf.out", TOKREF / "ggml-vocab-phi-3.gguf.out"],
}


# Each tokenizer.json is stored once: where a folder's copy would equal one of these files, it is
# a relative link to it instead. Nine copies of 1.8 MB made the repository too large to travel to
# a GPU machine (scripts/gpu-bundle.sh: tree and binaries together under 64 MiB).
SHARED_TOKENIZERS = [
    TINY / "phi3-mini-4k" / "tokenizer.json",
    TINY / "phi3-medium-4k" / "tokenizer.json",
    REPO / "crates" / "engine" / "tests" / "data" / "phi3-april-2024" / "tokenizer.json",
]


def write_file(path: Path, data: bytes):
    """Writes `data` to `path`, or links `path` to an equal file of SHARED_TOKENIZERS."""
    if path.is_symlink():
        path.unlink()  # never write through an old link into the file it names
    if path.name == "tokenizer.json":
        for shared in SHARED_TOKENIZERS:
            if shared != path and shared.is_file() and not shared.is_symlink() and shared.read_bytes() == data:
                path.symlink_to(os.path.relpath(shared, path.parent))
                return
    path.write_bytes(data)


def read_first(cands: list[Path]) -> bytes:
    for p in cands:
        if p.is_file():
            return p.read_bytes()
    raise SystemExit(f"missing source file; tried: {[str(c) for c in cands]}")


def load_sources():
    toks = {name: {fn: read_first(c) for fn, c in files.items()} for name, files in TOKENIZER_SOURCES.items()}
    other = {fn: read_first(c) for fn, c in OTHER_SOURCES.items()}
    return toks, other


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------

VARIANTS = [
    dict(
        name="phi3-mini-4k",
        tokenizer="phi-3-mini-4k-instruct",
        dtype=torch.bfloat16,
        seed=1007,
        config=dict(
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            sliding_window=12,
        ),
        max_shard_size=None,
        longrope=False,
        legacy_config=False,
    ),
    dict(
        name="phi3-medium-4k",
        tokenizer="phi-3-medium",
        dtype=torch.float16,
        seed=2001,
        config=dict(
            hidden_size=48,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=12,
        ),
        max_shard_size="2MB",
        longrope=False,
        legacy_config=False,
    ),
    dict(
        name="phi3-mini-128k",
        tokenizer="phi-3-mini-4k-instruct",
        dtype=torch.bfloat16,
        seed=3002,
        config=dict(
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            original_max_position_embeddings=32,
            sliding_window=262144,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.05, 1.2, 1.45],
                "long_factor": [1.5, 2.25, 4.0, 7.5],
            },
        ),
        max_shard_size=None,
        longrope=True,
        legacy_config=True,
        legacy_su=True,
    ),
    dict(
        name="phi4-mini",
        tokenizer="phi-3-mini-4k-instruct",
        dtype=torch.float32,
        seed=4002,
        config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            max_position_embeddings=256,
            original_max_position_embeddings=32,
            sliding_window=262144,
            partial_rotary_factor=0.75,
            tie_word_embeddings=True,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.1, 1.15, 1.25, 1.35, 1.5],
                "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0],
            },
        ),
        max_shard_size=None,
        longrope=True,
        legacy_config=True,
        # tied embeddings: the current token's own embedding pulls its logit up (greedy then
        # repeats it); larger layer outputs and a larger final norm keep the continuation varied
        init=dict(o_gain=5.0, down_gain=5.0, final_norm_scale=1.0),
    ),
    # For quantized inference (GGUF Q8_0 / Q4_0 / K-quants): every weight row is a multiple of 256
    # long. Phi-3-mini-4k-instruct's layout (real rope/window settings, real tokenizer), small
    # widths, tied embeddings (16 MB instead of 32). Weights come from init_successor (see there):
    # a random model whose next-token distributions are peaked far beyond quantization noise.
    dict(
        name="phi3-mini-4k-q",
        tokenizer="phi-3-mini-4k-instruct",
        dtype=torch.bfloat16,
        seed=5001,
        config=dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            sliding_window=2047,
            tie_word_embeddings=True,
        ),
        max_shard_size=None,
        longrope=False,
        legacy_config=False,
        cases="quant",
        init_fn="successor",
        init=dict(
            embed_std=0.17,  # embedding entries ~N(0, 0.17^2): logits of std ~3, max ~30
            alpha=0.8,  # layer-0 o_proj = alpha * R + noise (the successor map)
            qk=2.0,  # layer-0 q_proj = k_proj = qk * I + noise: each position attends to itself
            qkv_noise=0.3,  # std = gain / sqrt(fan_in) added to layer-0 q/k/v
            o_noise=0.3,
            gate_up_gain=1.2,  # both layers' MLPs and layer 1's attention: plain random
            down_gain=1.0,
            qkv_gain=1.6,
            o_gain=1.0,
        ),
        margin_target=0.25,  # min top1-top2 margin over the greedy steps (pick_seed)
    ),
]

# Weight-init scales (std of a normal unless said otherwise). Chosen so the output distribution
# is peaked (top1/top2 margins far from ties) and attention is not uniform, while the logits keep
# the scale of a real Phi-3 (std of a few units): logits of std ~30 would put float32 rounding
# alone near the 1e-4 tolerance the Rust tests hold the engine to.
INIT = dict(
    embed_std=1.0,
    lm_head_std=1.0,
    pad_row_std=0.01,  # embedding / lm_head rows 32011..32063 (never valid tokens)
    norm_lo=0.7,
    norm_hi=1.3,  # RMSNorm weights ~ U(lo, hi)
    qkv_gain=1.6,  # std = gain / sqrt(fan_in)
    o_gain=1.5,
    gate_up_gain=1.2,
    down_gain=1.5,
    final_norm_scale=1.0,  # model.norm weights ~ final_norm_scale * U(norm_lo, norm_hi)
)


def make_config(v) -> Phi3Config:
    c = dict(v["config"])
    c.update(
        vocab_size=VOCAB,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        attention_bias=False,
        attention_dropout=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        initializer_range=0.02,
        use_cache=True,
    )
    c.setdefault("tie_word_embeddings", False)
    return Phi3Config(**c)


@torch.no_grad()
def init_weights(model: Phi3ForCausalLM, seed: int, overrides: dict | None = None):
    g = torch.Generator().manual_seed(seed)
    init = {**INIT, **(overrides or {})}

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = tuple(p.shape)
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            std = init["embed_std"] if "embed_tokens" in name else init["lm_head_std"]
            w = normal(shape, std)
            w[REAL_VOCAB:] = normal((shape[0] - REAL_VOCAB, shape[1]), init["pad_row_std"])
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = init["norm_lo"] + (init["norm_hi"] - init["norm_lo"]) * torch.rand(shape, generator=g)
            if name == "model.norm.weight":
                w = w * init["final_norm_scale"]
        elif name.endswith("qkv_proj.weight"):
            w = normal(shape, init["qkv_gain"] / math.sqrt(shape[1]))
        elif name.endswith("o_proj.weight"):
            w = normal(shape, init["o_gain"] / math.sqrt(shape[1]))
        elif name.endswith("gate_up_proj.weight"):
            w = normal(shape, init["gate_up_gain"] / math.sqrt(shape[1]))
        elif name.endswith("down_proj.weight"):
            w = normal(shape, init["down_gain"] / math.sqrt(shape[1]))
        else:
            raise SystemExit(f"unexpected parameter {name}")
        p.copy_(w)


# (variant name, seed) -> the successor cycle that init_successor drew: token order[k] -> order[k+1]
SUCCESSOR: dict = {}


@torch.no_grad()
def init_successor(model: Phi3ForCausalLM, seed: int, init: dict) -> torch.Tensor:
    """Weights for phi3-mini-4k-q: random, plus one planted "successor" circuit, so that the
    next-token distributions are peaked far beyond quantization noise without repeating a token.

    Why: with i.i.d. random weights the logits over the vocabulary are Gaussian, and the gap
    between the two largest of 32064 Gaussians is small relative to their spread (median ~0.15
    std), whatever the init scale; Q8_0 noise then flips the argmax at several % of positions
    (measured at this shape with init_weights and phi4-mini's gains: 90% agreement), so "Q8_0
    agrees on >= 99% of steps" would fail for a correct engine. Tied embeddings add a second
    problem: the residual stream carries the current token's own embedding, whose logit wins
    unless the layers drown it (with init_weights' default gains: 99% agreement, but the argmax
    is the current token at ~90% of positions and greedy repeats one token).

    What: a random orthogonal R = Q B Q^T (Q from the QR of a Gaussian; B rotates 128 planes by
    2*pi*m_j/32011, m_j random in 1..32010, so R^32011 = I exactly) and one random cycle through
    all 32011 real token ids (`order`): embedding(order[k]) = R^k c0 (c0 ~ N(0, embed_std^2)), so
    R maps each token's embedding exactly onto its successor's (the embedding rows are still
    pseudo-random: pairwise correlations like independent Gaussian vectors). Layer 0's attention
    is q = k = qk*x, v = x (+ random noise of std qkv_noise/sqrt(256)): every position attends
    (almost only) to itself; its o_proj = alpha*R + noise, so layer 0 adds alpha*R*norm(x) ~
    the successor's embedding to the residual stream, and its logit stands out. Everything else
    (layer-0 MLP, layer 1 attention over the whole context and MLP) is plain random, so the
    logits also depend on the context, and where layer 1 outweighs the circuit the argmax is
    another token. alpha sets the balance; measured on the 533 recorded rows (seed 5001, simulated
    Q8_0 / Q4_0 with Q8_0 activations, see quant_simulation): alpha 0.7: successor is the argmax
    at 97.0% of rows, median top1-top2 margin 5.7, Q8_0 99.6% / Q4_0 96.4% agreement; 0.8:
    99.4%, 7.4, 100% / 99.6% (seeds 5002, 5003: 98.9-99.4%, 6.1-7.3, 99.8-100% / 97.4-99.3%);
    1.0: 100%, 10.4, 100% / 100% (the context never changes the argmax). Padding rows
    32011..32063 are N(0, pad_row_std^2), never the argmax. Returns `order`."""
    g = torch.Generator().manual_seed(seed)
    init = {**INIT, **init}
    cfg = model.config
    H, n = cfg.hidden_size, REAL_VOCAB

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    a = torch.randn(H, H, generator=g, dtype=torch.float64)
    Q, r = torch.linalg.qr(a)
    Q = Q * torch.sign(torch.diagonal(r))[None, :]
    m = torch.randint(1, n, (H // 2,), generator=g, dtype=torch.int64)
    order = torch.randperm(n, generator=g)
    c0 = torch.randn(H // 2, 2, generator=g, dtype=torch.float64) * init["embed_std"]
    k = torch.arange(n, dtype=torch.int64)
    ang = (2 * math.pi / n) * ((k[:, None] * m[None, :]) % n).double()  # [n, H/2], exact mod n
    cs, sn = torch.cos(ang), torch.sin(ang)
    z = torch.stack([c0[:, 0] * cs - c0[:, 1] * sn, c0[:, 0] * sn + c0[:, 1] * cs], dim=-1).reshape(n, H)
    theta = (2 * math.pi / n) * m.double()
    B = torch.zeros(H, H, dtype=torch.float64)
    idx = torch.arange(0, H, 2)
    B[idx, idx], B[idx, idx + 1] = torch.cos(theta), -torch.sin(theta)
    B[idx + 1, idx], B[idx + 1, idx + 1] = torch.sin(theta), torch.cos(theta)
    R = Q @ B @ Q.T
    cyc = z @ Q.T  # row k = R^k (Q c0)
    emb = torch.empty(cfg.vocab_size, H, dtype=torch.float64)
    emb[order] = cyc
    nxt = torch.roll(order, -1)
    closure = float((emb[order] @ R.T - emb[nxt]).abs().max())
    assert closure < 1e-9, closure  # R e(order[k]) == e(order[k+1]) for every k, the last included
    emb = emb.float()
    emb[n:] = normal((cfg.vocab_size - n, H), init["pad_row_std"])
    eye = torch.eye(H)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = tuple(p.shape)
        kind = name.split(".")[-2]
        if name == "model.embed_tokens.weight":
            w = emb
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = init["norm_lo"] + (init["norm_hi"] - init["norm_lo"]) * torch.rand(shape, generator=g)
        elif name.startswith("model.layers.0.self_attn.qkv_proj"):
            w = normal(shape, init["qkv_noise"] / math.sqrt(shape[1]))
            w[:H] += init["qk"] * eye
            w[H : 2 * H] += init["qk"] * eye
            w[2 * H :] += eye
        elif name.startswith("model.layers.0.self_attn.o_proj"):
            w = normal(shape, init["o_noise"] / math.sqrt(shape[1])) + init["alpha"] * R.float()
        elif kind in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            w = normal(shape, init[kind.replace("_proj", "_gain")] / math.sqrt(shape[1]))
        else:
            raise SystemExit(f"unexpected parameter {name}")
        p.copy_(w)
    return order

# ----------------------------------------------------------------------------------------------
# Prompts (token ids are made with the July-2024 tokenizer; all variants share the vocabulary)
# ----------------------------------------------------------------------------------------------

PROSE = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting one hundred and "
    "twelve steps, while the fog rolled over the harbour and the gulls argued about fish. "
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. 東京は雨です。 3.14159 + 2 = 5.14159!"
)


# phi3-mini-4k-q prompts (>= 400 tokens)
LONG_PROSE = (
    "Chapter One. The night train from Lisbon to Madrid left eleven minutes late, which the conductor "
    "blamed on a goat. Maria counted her coins twice: forty-two euros, a bus ticket, and a photograph of "
    "her grandmother standing beside a blue bicycle in 1968.\n"
    "Recipe: whisk 3 eggs with 250 ml of milk, add a pinch of salt, then fold in 120 g of flour until "
    "smooth. Rest for 30 minutes before frying.\n"
    "import numpy as np\n"
    "def normalize(x, eps=1e-6):\n    return (x - x.mean()) / (x.std() + eps)\n"
    "Le marché ouvre à sept heures; les pêcheurs arrivent avec des caisses de sardines et de maquereaux. "
    "Москва — столица России. 北京的秋天很美丽。 Der Zug fährt um 14:35 Uhr ab Gleis 9.\n"
    "Q: What is the capital of Australia? A: Canberra, not Sydney, although many people guess wrong.\n"
    "The committee approved the budget (vote: 7-2), postponed the bridge repairs until spring, and asked "
    "the mayor to publish all invoices online by 1 March 2025.\n"
    "SELECT name, COUNT(*) FROM orders WHERE status = 'shipped' GROUP BY name ORDER BY 2 DESC LIMIT 10;\n"
    "She laughed, closed the notebook, and walked out into the rain without an umbrella. Somewhere a "
    "radio played an old song about harbours, and the baker on the corner was already pulling the first "
    "loaves out of the oven, golden and cracked on top.\n"
    "fn main() { let v: Vec<u32> = (1..=10).map(|x| x * x).collect(); println!(\"{:?}\", v); }\n"
    "Weather: 18°C, light wind from the north-west, 40% chance of showers after 16:00."
)


def prompt_ids(tok, length: int, offset: int = 0) -> list[int]:
    ids = tok.encode(PROSE, add_special_tokens=False)
    assert len(ids) >= offset + length, (len(ids), offset, length)
    return ids[offset : offset + length]


def chat_prompt_ids(tok, user: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}
    ]
    return flat_ids(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))


def check_chat_len(ids, sw):
    assert len(ids) > sw, (len(ids), sw)
    return ids


def flat_ids(res) -> list[int]:
    if hasattr(res, "keys") and "input_ids" in res:
        res = res["input_ids"]
    if hasattr(res, "tolist"):
        res = res.tolist()
    if res and isinstance(res[0], list):
        assert len(res) == 1
        res = res[0]
    assert all(isinstance(x, int) for x in res), res
    return list(res)


def quant_cases(tok):
    """phi3-mini-4k-q: prompts of 8, 40 and 300 tokens and a chat prompt; every position of the
    logits cases goes into reference.json (top-5 + logsumexp), only `positions` into the
    safetensors file (full float32 rows)."""
    ids = tok.encode(LONG_PROSE, add_special_tokens=False)
    assert len(ids) >= 400, len(ids)
    chat = chat_prompt_ids(
        tok,
        "Summarise the following in two sentences, then suggest a title: the night train left late, "
        "Maria counted her coins, and the committee postponed the bridge repairs until spring.",
        system="You are a careful assistant. Answer briefly and in plain English.")
    long_pos = [0, 1, 2, 63, 64, 127, 128, 200, 255, 256, 298, 299]
    logits_cases = [
        dict(name="short", ids=ids[:8], positions=[0, 3, 7], description="8 tokens"),
        dict(name="medium", ids=ids[8:48], positions=[0, 13, 26, 39], description="40 tokens"),
        dict(name="long", ids=ids[48:348], positions=long_pos,
             description="300 tokens (prose, code, SQL, several scripts)"),
        dict(name="chat", ids=chat, positions=[0, len(chat) // 2, len(chat) - 2, len(chat) - 1],
             description="system + user prompt from the tokenizer's chat template (template D), "
                         "ending with <|assistant|>\n"),
    ]
    greedy_cases = [
        dict(name="short", ids=ids[100:108], N=32, description="8-token prompt, 32 new tokens"),
        dict(name="medium", ids=ids[200:240], N=32, description="40-token prompt, 32 new tokens"),
        dict(name="long", ids=ids[60:360], N=32, description="300-token prompt, 32 new tokens"),
        dict(name="chat", ids=chat, N=32, description="the chat prompt of logits case 'chat', 32 new tokens"),
    ]
    return logits_cases, greedy_cases


def cases_for(v, tok):
    """(logits_cases, greedy_cases) as lists of dicts with name/ids/positions/N/description."""
    cfg = v["config"]
    if v.get("cases") == "quant":
        return quant_cases(tok)
    if not v["longrope"]:
        sw = cfg["sliding_window"]
        long_ids = prompt_ids(tok, 30, offset=3)
        logits_cases = [
            dict(name="short", ids=prompt_ids(tok, 8), positions=[0, 3, 6, 7],
                 description="8 tokens, shorter than the sliding window"),
            dict(name="long", ids=long_ids,
                 positions=[0, sw - 1, sw, sw + 1, 20, 29],
                 description=f"30 tokens > sliding_window {sw}: positions >= {sw} see only the last {sw} keys"),
        ]
        greedy_cases = [
            dict(name="short", ids=prompt_ids(tok, 8, offset=10), N=24,
                 description=f"8-token prompt, 24 new tokens: decoding crosses the sliding window ({sw})"),
            dict(name="chat", ids=check_chat_len(chat_prompt_ids(
                     tok, "Write a short haiku about the sea and the moon.",
                     system="You are a helpful assistant."), sw), N=16,
                 description="prompt from the tokenizer's own chat template (system + user; templates B/C "
                             "drop the system message), longer than the window at prefill, 16 new tokens"),
        ]
    else:
        om = cfg["original_max_position_embeddings"]
        logits_cases = [
            dict(name="short", ids=prompt_ids(tok, 8), positions=[0, 3, 6, 7], rope="short",
                 description="8 tokens: short factors"),
            dict(name="at_original_max", ids=prompt_ids(tok, om, offset=1),
                 positions=[0, om // 2, om - 1], rope="short",
                 description=f"exactly original_max_position_embeddings ({om}) tokens: still short factors"),
            dict(name="long", ids=prompt_ids(tok, om + 8, offset=2),
                 positions=[0, om - 1, om, om + 7], rope="long",
                 description=f"{om + 8} tokens > original_max ({om}): long factors for ALL positions"),
        ]
        greedy_cases = [
            dict(name="short", ids=prompt_ids(tok, 8, offset=10), N=20,
                 description=f"8 + 20 tokens <= original_max {om}: short factors throughout"),
            dict(name="cross", ids=prompt_ids(tok, 20, offset=4), N=24,
                 description=(f"20-token prompt, 24 new tokens: crosses original_max {om}; when the sequence "
                              f"reaches {om + 1} tokens HF drops the cache and re-encodes everything with long "
                              "factors")),
            dict(name="long", ids=prompt_ids(tok, om + 4, offset=6), N=16,
                 description=f"{om + 4}-token prompt (> original_max): long factors throughout"),
        ]
    return logits_cases, greedy_cases


# ----------------------------------------------------------------------------------------------
# Reference computation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float()


def greedy_config(n: int) -> GenerationConfig:
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=n,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=32000,
        bos_token_id=1,
        temperature=None,
        top_k=None,
        top_p=None,
        repetition_penalty=None,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )


@torch.no_grad()
def run_greedy(model, ids: list[int], n: int):
    """HF generate (greedy, KV cache). Cross-checked against a cache-free argmax loop."""
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # do not let the model's [32000, 32001, 32007] stop it
    try:
        inp = torch.tensor([ids])
        out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), generation_config=greedy_config(n))
    finally:
        model.generation_config.eos_token_id = saved_eos
    gen = out.sequences[0, len(ids):].tolist()
    assert len(gen) == n, f"generate stopped early: {len(gen)} of {n}"
    steps = [l[0].float() for l in out.logits]
    assert len(steps) == n
    # cache-free recomputation (each step a fresh forward over the whole sequence)
    seq = list(ids)
    max_diff = 0.0
    for i in range(n):
        ref = full_logits(model, seq)[-1]
        assert int(ref.argmax()) == gen[i], f"step {i}: cache-free argmax {int(ref.argmax())} != {gen[i]}"
        max_diff = max(max_diff, float((ref - steps[i]).abs().max()))
        seq.append(gen[i])
    logprobs, tops, margins = [], [], []
    for i, lg in enumerate(steps):
        assert int(lg.argmax()) == gen[i]
        lp = torch.log_softmax(lg, dim=-1)
        top2 = torch.topk(lg, 2).values
        margins.append(float(top2[0] - top2[1]))
        logprobs.append(float(lp[gen[i]]))
        tv, ti = torch.topk(lp, 5)
        tops.append([[int(a), float(b)] for a, b in zip(ti.tolist(), tv.tolist())])
    return gen, logprobs, tops, margins, max_diff


@torch.no_grad()
def naive_cache_divergence(model, ids: list[int], gen: list[int]):
    """Teacher-forced decode that keeps the KV cache across the LongRoPE switch (no re-encode).
    Returns (first step whose argmax differs from the reference or None, max |logit diff|)."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    cache, first, maxd = out.cache, None, 0.0
    logits = out.logits[0, -1].float()
    seq = list(ids)
    for i, t in enumerate(gen):
        ref = full_logits(model, seq)[-1]
        maxd = max(maxd, float((ref - logits).abs().max()))
        if first is None and int(logits.argmax()) != t:
            first = i
        seq.append(t)
        out = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[0, -1].float()
    return first, maxd


# ---- phi3-mini-4k-q: quantization simulation (ggml's reference quantizers, dequantized to f32)


def q8_0_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref + dequantize: blocks of 32 along the last dim, d = amax/127 (stored
    f16), q = round(x/d)."""
    shape = x.shape
    b = x.reshape(-1, shape[-1] // 32, 32).float()
    d = b.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(b / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(b))
    return (q * d.half().float()).reshape(shape)


def q4_0_roundtrip(x: torch.Tensor, swap_halves: bool = False) -> torch.Tensor:
    """quantize_row_q4_0_ref + dequantize: d = (signed value of largest |x|) / -8 (stored f16),
    q = min(15, trunc(x/d + 8.5)), x' = (q - 8) d. swap_halves: a deliberately wrong dequantizer
    that puts the high nibbles (elements 16..31) first."""
    shape = x.shape
    b = x.reshape(-1, shape[-1] // 32, 32).float()
    mx = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))
    d = mx / -8
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.clamp(torch.floor(b * inv + 8.5), 0, 15)
    out = (q - 8) * d.half().float()
    if swap_halves:
        out = out.reshape(*out.shape[:-1], 2, 16).flip(-2).reshape(out.shape)
    return out.reshape(shape)


@torch.no_grad()
def quant_simulation(ref, seqs: list[tuple[list[int], int]]) -> dict:
    """Argmax agreement of quantized copies of `ref` with `ref` on the last `k` rows of each
    (ids, k): every 2-D weight (token embedding = tied output matrix, qkv, o, gate_up, down)
    round-tripped through Q8_0 / Q4_0; "+act" also round-trips every matmul input through Q8_0,
    as ggml's CPU vec_dot for these types does. Norm weights stay f32 (as in GGUF)."""
    import copy

    def rows(model):
        return torch.cat([full_logits(model, ids)[-k:] for ids, k in seqs])

    base = rows(ref)
    am = base.argmax(-1)
    lp = torch.log_softmax(base, -1)
    out = {}
    for label, fn, act in [("q8_0", q8_0_roundtrip, False), ("q8_0+act", q8_0_roundtrip, True),
                           ("q4_0", q4_0_roundtrip, False), ("q4_0+act", q4_0_roundtrip, True),
                           ("q4_0 nibble halves swapped (a bug)", lambda w: q4_0_roundtrip(w, True), True)]:
        mq = copy.deepcopy(ref)
        hooks = []
        for _, p in mq.named_parameters():
            if p.dim() == 2:
                p.copy_(fn(p.data))
        if act:
            for mod in mq.modules():
                if isinstance(mod, torch.nn.Linear):
                    hooks.append(mod.register_forward_pre_hook(lambda _m, a: (q8_0_roundtrip(a[0]),)))
        got = rows(mq)
        for h in hooks:
            h.remove()
        diff = (got - base).abs().amax(-1)
        kl = (lp.exp() * (lp - torch.log_softmax(got, -1))).sum(-1)
        out[label] = dict(argmax_agreement=round(float((got.argmax(-1) == am).double().mean()), 4),
                          flips=int((got.argmax(-1) != am).sum()),
                          row_max_abs_diff_median=round(float(diff.median()), 4),
                          row_max_abs_diff_max=round(float(diff.max()), 4),
                          mean_kl=round(float(kl.mean()), 6))
        del mq
    return out


def diverse(gen: list[int]) -> bool:
    """Varied continuation: >= N/2 distinct ids, none more than 3 times, no run of 3 equal ids,
    only real (non-padding) ids, no EOS ids."""
    n = len(gen)
    most = max(gen.count(t) for t in set(gen))
    runs = any(gen[i] == gen[i + 1] == gen[i + 2] for i in range(n - 2))
    return (len(set(gen)) >= n / 2 and most <= 3 and not runs and all(t < REAL_VOCAB for t in gen)
            and not any(t in EOS_IDS for t in gen))


def build_model(v, seed: int, storage: bool = True):
    """storage=True: the model in its storage dtype (what gets saved). storage=False: float32 eager
    model whose weights are rounded through the storage dtype, i.e. what a reload gives (the rotary
    inv_freq buffers stay float32, unlike model.to(bf16).to(f32))."""
    torch.manual_seed(seed)
    config = make_config(v)
    model = Phi3ForCausalLM(config)
    if config.tie_word_embeddings:
        model.tie_weights()
    if v.get("init_fn") == "successor":
        SUCCESSOR[(v["name"], seed)] = init_successor(model, seed, v["init"])
    else:
        init_weights(model, seed, v.get("init"))
    if storage:
        model = model.to(v["dtype"])
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(v["dtype"]).to(torch.float32))
        model.set_attn_implementation("eager")
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=list(EOS_IDS), pad_token_id=32000)
    return model


def pick_seed(v, tok):
    """First seed (from v['seed']) whose greedy cases are diverse and far from ties (in memory)."""
    _, greedy_cases = cases_for(v, tok)
    best = None
    for seed in range(v["seed"], v["seed"] + 60):
        m32 = build_model(v, seed, storage=False)
        ok, mm = True, float("inf")
        for gc in greedy_cases:
            gen, _, _, margins, _ = run_greedy(m32, gc["ids"], gc["N"])
            mm = min(mm, min(margins))
            if not diverse(gen):
                ok = False
                break
        del m32
        print(f"  {v['name']}: seed {seed} diverse={ok} min_margin={mm:.4f}")
        if ok and mm >= v.get("margin_target", MIN_MARGIN_TARGET):
            return seed
        if ok and mm >= MIN_MARGIN_REQUIRED and (best is None or mm > best[1]):
            best = (seed, mm)
    if best is None:
        raise SystemExit(f"{v['name']}: no seed met the margin/diversity checks")
    return best[0]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_json(path: Path, obj, indent: int = 1):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def legacy_config(v, written: dict, rope_type: str = "longrope") -> dict:
    """The published microsoft/Phi-3-mini-128k-instruct config.json form (June-2024 revision:
    type "longrope"; April-2024 revision: type "su"), same values."""
    c = v["config"]
    rs = c["rope_scaling"]
    out = {
        "_name_or_path": f"tiny-{v['name']}",
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "model_type": "phi3",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "original_max_position_embeddings": c["original_max_position_embeddings"],
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": rs["long_factor"], "short_factor": rs["short_factor"], "type": rope_type},
        "rope_theta": 10000.0,
        "sliding_window": c["sliding_window"],
        "tie_word_embeddings": c.get("tie_word_embeddings", False),
        "torch_dtype": str(v["dtype"]).replace("torch.", ""),
        "use_cache": True,
        "vocab_size": VOCAB,
    }
    if "partial_rotary_factor" in c:  # Phi-4-mini form: top-level partial_rotary_factor
        out["partial_rotary_factor"] = c["partial_rotary_factor"]
        out["lm_head_bias"] = False
        out["mlp_bias"] = False
    # sanity: same numbers as what save_pretrained wrote
    rp = written.get("rope_parameters") or written.get("rope_scaling")
    assert rp["long_factor"] == rs["long_factor"] and rp["short_factor"] == rs["short_factor"]
    return dict(sorted(out.items()))


def rope_summary(model) -> dict:
    cfg = model.config
    rp = cfg.rope_parameters
    hd = cfg.hidden_size // cfg.num_attention_heads
    rot = int(hd * rp.get("partial_rotary_factor", 1.0))
    rot_emb = model.model.rotary_emb
    return dict(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=hd,
        rotary_dim=rot,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=rp.get("original_max_position_embeddings"),
        rope_type=rp.get("rope_type"),
        attention_factor=float(rot_emb.attention_scaling),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
    )


@torch.no_grad()
def quant_variant_stats(v, seed, ref, logits_cases, gc_json, notes) -> dict:
    """phi3-mini-4k-q: margin statistics over every recorded row (all positions of the logits
    cases + every greedy step) and the quantization simulation; checks the targets."""
    order = SUCCESSOR[(v["name"], seed)]
    succ = torch.empty(REAL_VOCAB, dtype=torch.int64)
    succ[order] = torch.roll(order, -1)
    seqs = [(lc["ids"], len(lc["ids"])) for lc in logits_cases]
    seqs += [(gc["prompt_ids"] + gc["generated_ids"][:-1], len(gc["generated_ids"])) for gc in gc_json]
    rows = torch.cat([full_logits(ref, ids)[-k:] for ids, k in seqs])
    cur = torch.tensor([t for ids, k in seqs for t in ids[-k:]])
    top2 = torch.topk(rows, 2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    pmax = torch.softmax(rows, -1).amax(-1)
    am = rows.argmax(-1)
    n_tf = sum(len(lc["ids"]) for lc in logits_cases)
    stats = dict(
        rows=int(rows.shape[0]), logits_case_rows=n_tf, greedy_step_rows=int(rows.shape[0]) - n_tf,
        median_margin=round(float(margin.median()), 4), p05_margin=round(float(margin.quantile(0.05)), 4),
        min_margin=round(float(margin.min()), 4), rows_margin_below_1=int((margin < 1).sum()),
        median_max_prob=round(float(pmax.median()), 4), p05_max_prob=round(float(pmax.quantile(0.05)), 4),
        argmax_is_successor=round(float((am == succ[cur]).double().mean()), 4),
        argmax_is_current_token=round(float((am == cur).double().mean()), 4),
        distinct_argmax=int(am.unique().numel()),
        max_abs_logit=round(float(rows.abs().max()), 3), logit_std=round(float(rows.std()), 3),
    )
    qsim = quant_simulation(ref, seqs)
    for k in ("q8_0", "q8_0+act"):
        assert qsim[k]["argmax_agreement"] >= 0.995, (k, qsim[k])
    assert stats["median_margin"] >= 2.0 and stats["argmax_is_current_token"] < 0.05, stats
    print(f"  margin stats {stats}")
    for k, q in qsim.items():
        print(f"  simulated {k}: {q}")
    notes.append("weights: init_successor (make_tiny_models.py): embeddings on one cycle of a random rotation R "
                 "(R maps every token's embedding onto its successor's), layer-0 attention attends to "
                 "the current position and its o_proj is alpha*R + noise; the rest is random. "
                 f"alpha {v['init']['alpha']}; see margin_stats.argmax_is_successor")
    notes.append("all prompts are shorter than sliding_window (2047): the window never masks anything here")
    return {
        "margin_stats": stats,
        "quant_simulation": qsim,
        "quant_simulation_how": (
            "Python round trip of every 2-D weight (tied embedding/output, qkv, o, gate_up, down) through "
            "ggml's reference quantizers (quantize_row_q8_0_ref / quantize_row_q4_0_ref, f16 block scales), "
            "float32 eager forward; '+act' also round-trips every matmul input through Q8_0. Rows: the "
            "same as margin_stats (all logits-case positions, then each greedy case's steps teacher-forced)."
        ),
    }


def make_variant(v, tok_files: dict, tok):
    name = v["name"]
    out_dir = TINY / name
    ref_dir = REF / name
    print(f"== {name}")
    seed = pick_seed(v, tok)
    print(f"  chosen seed {seed}")

    # -------- checkpoint
    for d in (out_dir, ref_dir):
        if d.exists():
            shutil.rmtree(d)
    ref_dir.mkdir(parents=True)
    model = build_model(v, seed)
    kw = {"max_shard_size": v["max_shard_size"]} if v["max_shard_size"] else {}
    model.save_pretrained(out_dir, **kw)
    for fn, data in tok_files.items():
        write_file(out_dir / fn, data)
    gen_cfg = {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": list(EOS_IDS),
        "pad_token_id": 32000,
        "transformers_version": transformers.__version__,
    }
    write_json(out_dir / "generation_config.json", gen_cfg, indent=2)
    written = json.loads((out_dir / "config.json").read_text())
    legacy_files = []
    if v["legacy_config"]:
        write_json(out_dir / "config.legacy.json", legacy_config(v, written), indent=2)
        legacy_files.append("config.legacy.json")
        if v.get("legacy_su"):
            write_json(out_dir / "config.legacy-su.json", legacy_config(v, written, rope_type="su"), indent=2)
            legacy_files.append("config.legacy-su.json")
    stored = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        stored.update(load_file(f))
    expect = {k: t.detach().clone() for k, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in stored, "tied model must not store lm_head.weight"
        expect.pop("lm_head.weight", None)
    assert set(stored) == set(expect), (sorted(set(stored) ^ set(expect)))
    for k in stored:
        assert stored[k].dtype == v["dtype"], (k, stored[k].dtype)
        assert torch.equal(stored[k], expect[k]), k
    del model

    # -------- reference model: reload from the folder, float32, eager
    ref = Phi3ForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    for k, t in ref.state_dict().items():
        src = stored.get(k, stored["model.embed_tokens.weight"] if k == "lm_head.weight" else None)
        assert t.dtype == torch.float32 and torch.equal(t, src.float()), k
    folder_tok = AutoTokenizer.from_pretrained(out_dir)  # config.json present: tokenizer.json verbatim
    assert type(folder_tok).__name__ == "TokenizersBackend", type(folder_tok)
    logits_cases, greedy_cases = cases_for(v, tok)
    notes = []

    # the legacy config files must describe the very same model
    for fn in legacy_files:
        if fn == "config.legacy-su.json":
            # transformers 5.x renames "su" -> "longrope" only AFTER it has copied the top-level
            # original_max_position_embeddings into longrope parameters, so loading this form fails
            # with KeyError (missing original_max_position_embeddings). Check it differs from
            # config.legacy.json in the type only.
            su = json.loads((out_dir / fn).read_text())
            lr = json.loads((out_dir / "config.legacy.json").read_text())
            su["rope_scaling"]["type"] = "longrope"
            assert su == lr
            try:
                Phi3Config.from_json_file(str(out_dir / fn))
                notes.append(f"{fn}: (April-2024 'su' form) transformers loads it")
            except KeyError as e:
                notes.append(f"{fn}: April-2024 'su' form of config.legacy.json (same values); transformers "
                             f"{transformers.__version__} cannot load it ({e}); transformers 4.x treats 'su' as "
                             "'longrope', and so should the Rust loader")
            continue
        lcfg = Phi3Config.from_json_file(str(out_dir / fn))
        assert lcfg.rope_parameters == ref.config.rope_parameters, (lcfg.rope_parameters, ref.config.rope_parameters)
        alt = Phi3ForCausalLM.from_pretrained(out_dir, config=lcfg, dtype=torch.float32,
                                              attn_implementation="eager").eval()
        probe = logits_cases[-1]["ids"]
        assert torch.equal(full_logits(alt, probe), full_logits(ref, probe)), fn
        notes.append(f"{fn}: transformers loads it to the same rope_parameters and bit-identical logits")
        del alt

    tensors, lc_json = {}, []
    for lc in logits_cases:
        lg = full_logits(ref, lc["ids"])
        assert lg.shape == (len(lc["ids"]), VOCAB)
        tensors[f"logits.{lc['name']}"] = lg[lc["positions"]].contiguous()
        lc_json.append(dict(name=lc["name"], input_ids=lc["ids"], positions=lc["positions"],
                            rope_factors=lc.get("rope"), description=lc["description"]))
        if v.get("cases") == "quant":
            # every position: top-5 raw logits and logsumexp (argmax/margin/logprob statistics
            # over all rows without storing 32064 floats per row)
            tv, ti = torch.topk(lg, 5, dim=-1)
            lc_json[-1]["all_top_logits"] = [[[int(a), float(b)] for a, b in zip(i_, v_)]
                                             for i_, v_ in zip(ti.tolist(), tv.tolist())]
            lc_json[-1]["all_logsumexp"] = [float(x) for x in torch.logsumexp(lg, -1).tolist()]
        if not v["longrope"] and lc["name"] == "long" and v.get("cases") != "quant":
            # prove the window matters: the same forward without a window differs after position sw-1
            sw = ref.config.sliding_window
            ref.config.sliding_window = None
            try:
                lg_full = full_logits(ref, lc["ids"])
            finally:
                ref.config.sliding_window = sw
            d_before = float((lg_full[:sw] - lg[:sw]).abs().max())
            d_after = float((lg_full[sw:] - lg[sw:]).abs().max())
            assert d_before == 0.0 and d_after > 1e-2, (d_before, d_after)
            notes.append(f"case 'long': dropping the sliding window changes logits at positions >= {sw} "
                         f"by up to {d_after:.3f} (positions < {sw}: identical)")
    save_file(tensors, str(ref_dir / "logits.safetensors"),
              # a single metadata key: safetensors writes metadata from a hash map, so with two
              # keys their order (and the file bytes) would change from run to run
              metadata={"source": f"{name}; transformers {transformers.__version__}"})

    gc_json, all_margins = [], []
    for gc in greedy_cases:
        gen, lps, tops, margins, max_diff = run_greedy(ref, gc["ids"], gc["N"])
        assert min(margins) >= MIN_MARGIN_REQUIRED, (name, gc["name"], min(margins))
        assert diverse(gen), (name, gc["name"], gen)
        all_margins.append(min(margins))
        om = getattr(ref.config, "original_max_position_embeddings", None)
        crosses = bool(v["longrope"] and len(gc["ids"]) <= om < len(gc["ids"]) + gc["N"] - 1)
        gc_json.append(dict(name=gc["name"], prompt_ids=gc["ids"], generated_ids=gen, logprobs=lps,
                            top_logprobs=tops, min_margin=min(margins), crosses_original_max=crosses,
                            description=gc["description"]))
        notes.append(f"greedy '{gc['name']}': generate() (KV cache) vs cache-free full recompute, "
                     f"same tokens, max |logit diff| {max_diff:.2e}")
        if crosses:
            k, d = naive_cache_divergence(ref, gc["ids"], gen)
            notes.append(f"greedy '{gc['name']}': an engine that KEEPS the short-factor KV cache across "
                         f"original_max (no re-encode) differs from this reference by up to {d:.3f} in the "
                         f"logits; first step whose argmax changes: {k}")
    if v["longrope"]:
        notes.append(
            "LongRoPE (transformers %s): a forward call uses long factors for all its positions iff "
            "max(position_ids)+1 > original_max_position_embeddings, else short factors; cos/sin are "
            "always multiplied by attention_factor. During generate(), Phi3ForCausalLM."
            "prepare_inputs_for_generation drops the KV cache when the sequence first reaches "
            "original_max+1 tokens and re-encodes the whole sequence with long factors; the greedy "
            "references follow that (equal to recomputing every step without a cache)." % transformers.__version__
        )
    else:
        notes.append("sliding window (eager mask): query at position p attends keys p-sliding_window+1 .. p "
                     "(sliding_window keys including itself); the DynamicCache keeps the last "
                     "sliding_window-1 keys.")
    extra = {}
    if v.get("cases") == "quant":
        extra = quant_variant_stats(v, seed, ref, logits_cases, gc_json, notes)
    summary = rope_summary(ref)
    reference = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "variant": name,
        "model_dir": f"models/tiny/{name}",
        "seed": seed,
        "storage_dtype": str(v["dtype"]).replace("torch.", ""),
        "compute": "float32, eager attention, CPU, eval; weights upcast exactly from storage_dtype",
        "config_summary": summary,
        "notes": notes,
        "logits_cases": lc_json,
        "greedy_cases": gc_json,
        **extra,
    }
    write_json(ref_dir / "reference.json", reference)
    print(f"  {summary}")
    print(f"  min greedy margin {min(all_margins):.4f}")
    return dict(name=name, seed=seed, min_margin=min(all_margins), summary=summary)


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat-template references
# ----------------------------------------------------------------------------------------------

EXTRA_TEXTS = [
    "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "<s>",
    "<s>Hello</s>",
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n",
    "<|endoftext|>",
    "text<|end|>more text<|placeholder3|> tail",
    "<unk> unknown",
    "Größe, naïve café, façade, Ærøskøbing",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "emoji 😀😃 family 👨‍👩‍👧‍👦 thumbs 👍🏽👍🏿 flag 🇫🇷 heart ❤️",
    "👩🏾‍💻 woman technologist, 🏳️‍🌈 rainbow flag",
    "e\u0301 a\u0308 n\u0303 combining; precomposed é ä ñ",
    "Zalgo: Z\u0351\u036b\u0343a\u0310\u0300l\u0352g\u0350o",
    "   leading spaces",
    "trailing spaces   ",
    "  both  ",
    "tabs\tbetween\t\twords\t",
    "line1\nline2\n\nline4\n",
    "\n\n\nleading newlines",
    "crlf\r\nline\r\n",
    "mixed \t \n \t whitespace",
    "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n",
    "fn main() {\n    let v: Vec<u8> = vec![1, 2, 3];\n    println!(\"{:?}\", v);\n}\n",
    "if (x != 0 && y >= 1) { z = x << 2 | y; } // C-like",
    "0 1 12 123 1234 12345 3.14159 -42 1e-10 0x1F 1,000,000",
    "\x00\x01\x07 control bytes",
    "\u200b zero width \u200d joiner \ufeff bom",
    "\U0001d54f\U0001d552\U0001d55d math alphanumerics and \U0002a6a0 rare CJK",
    "ẞ ꙮ ᚠᛇᚻ runes",
]
CHAT_CONVERSATIONS = [
    ("system_user", [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Hello"}]),
    ("user_only", [{"role": "user", "content": "What is 2+2?"}]),
    ("multi_turn", [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me a joke."}]),
    ("empty_system", [{"role": "system", "content": ""},
                      {"role": "user", "content": "Hi there"}]),
    ("unicode", [{"role": "system", "content": "Réponds en français 🇫🇷."},
                 {"role": "user", "content": "Größe? 日本語 👍🏽 👨‍👩‍👧 e\u0301"}]),
    ("newlines_spaces", [{"role": "system", "content": "  Be brief.\n"},
                         {"role": "user", "content": "  line one\nline two  \n\n"},
                         {"role": "assistant", "content": " ok \n"},
                         {"role": "user", "content": "\tand\tagain "}]),
    ("assistant_last", [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello there."}]),
]


TOKREF_PROVENANCE = """# Provenance (written by models/make_tiny_models.py; do not edit by hand)

Byte copies of public data files (see the team's phi3-assets PROVENANCE for commits and sha256):

- `phi-3-2024-04/tokenizer.json`, `phi-3-2024-04/tokenizer_config.json`: the April-2024 Phi-3-mini
  tokenizer (all added tokens `rstrip:false`, `add_bos_token:true`, chat template B), from
  microsoft/onnxruntime-extensions `test/data/phi-3/` (snapshot 319f8d2c02c4e2f013129bea52e70e75ba79bbcf).
- `ggml-vocab-phi-3.gguf.inp` / `.out`: the 46 llama.cpp tokenizer test strings and their ids,
  from llama.cpp `models/` (upstream commit 07e4351ce663a7802b31f92fd7bc0e555c2044b6).
- `microsoft-Phi-3.5-mini-instruct.jinja`: the Phi-3.5-mini chat template (template E), from
  llama.cpp `models/templates/` (upstream commit 8b576b6c55bc4e6be898b47522f0ef402b93ef62).

Generated with Hugging Face transformers (version in each JSON): `tokenize.json`, `chat.json`.
The July-2024 mini tokenizer lives in `models/tiny/phi3-mini-4k/`, the medium one in
`models/tiny/phi3-medium-4k/`.
"""


def make_tokenizer_refs(tok_sources: dict, other: dict):
    print("== tokenizer references")
    if TOKREF.exists():
        shutil.rmtree(TOKREF)
    (TOKREF / "phi-3-2024-04").mkdir(parents=True)
    for fn, data in tok_sources["phi-3-2024-04"].items():
        write_file(TOKREF / "phi-3-2024-04" / fn, data)
    for fn, data in other.items():
        (TOKREF / fn).write_bytes(data)
    (TOKREF / "PROVENANCE.md").write_text(TOKREF_PROVENANCE, encoding="utf-8")

    # Tokenizer dirs. The April-2024 copy has no config.json: transformers 5 would then follow its
    # tokenizer_config ("LlamaTokenizer") and REBUILD the pipeline (Metaspace pre-tokenizer), which
    # tokenizes leading spaces differently from tokenizer.json. Passing the phi3 config makes it
    # load tokenizer.json verbatim (TokenizersBackend), exactly as for the model folders.
    dirs = {
        "phi-3-mini-4k-instruct": (TINY / "phi3-mini-4k", "models/tiny/phi3-mini-4k"),
        "phi-3-2024-04": (TOKREF / "phi-3-2024-04", "crates/engine/tests/reference/tokenizer/phi-3-2024-04"),
        "phi-3-medium": (TINY / "phi3-medium-4k", "models/tiny/phi3-medium-4k"),
    }
    phi3_cfg = Phi3Config()
    toks = {}
    for name, (d, _) in dirs.items():
        t = AutoTokenizer.from_pretrained(d, config=phi3_cfg)
        assert type(t).__name__ == "TokenizersBackend", (name, type(t))
        toks[name] = t

    inp = other["ggml-vocab-phi-3.gguf.inp"].decode("utf-8")
    llama_texts = inp.split("\n__ggml_vocab_test__\n")
    if llama_texts and llama_texts[-1] == "":
        llama_texts = llama_texts[:-1]
    llama_out = [[int(x) for x in line.split()]
                 for line in other["ggml-vocab-phi-3.gguf.out"].decode().split("\n")[: len(llama_texts)]]
    assert len(llama_texts) == 46, len(llama_texts)
    corpus = [(t, "llama.cpp") for t in llama_texts] + [(t, "extra") for t in EXTRA_TEXTS]
    assert len(corpus) >= 60

    entries, raw_mismatch, llama_mismatch = [], 0, 0
    for name, t in toks.items():
        file_raw = tokenizers.Tokenizer.from_file(str(dirs[name][0] / "tokenizer.json"))
        for i, (text, src) in enumerate(corpus):
            ids = t.encode(text, add_special_tokens=False)
            if ids != file_raw.encode(text, add_special_tokens=False).ids:
                raw_mismatch += 1
                print(f"  WARNING {name}: AutoTokenizer != tokenizer.json for {text!r}")
            if src == "llama.cpp" and ids != llama_out[i]:
                llama_mismatch += 1
                print(f"  WARNING {name}: != llama.cpp .out for {text!r}")
            dec, dec_skip = t.decode(ids), t.decode(ids, skip_special_tokens=True)
            if (dec, dec_skip) != (file_raw.decode(ids, skip_special_tokens=False),
                                   file_raw.decode(ids, skip_special_tokens=True)):
                raw_mismatch += 1
                print(f"  WARNING {name}: AutoTokenizer.decode != tokenizers decode for {text!r}")
            entries.append(dict(tokenizer=name, text=text, ids=ids, decoded=dec,
                                decoded_skip_special=dec_skip, source=src))
    print(f"  tokenize entries {len(entries)}; mismatches vs raw tokenizer.json {raw_mismatch}, "
          f"vs llama.cpp vectors {llama_mismatch}")
    write_json(TOKREF / "tokenize.json", {
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "how": "AutoTokenizer.from_pretrained(dir, config=Phi3Config()) -> TokenizersBackend (tokenizer.json "
               "verbatim); encode(text, add_special_tokens=False), decode(ids), decode(ids, "
               "skip_special_tokens=True). llama.cpp entries come from ggml-vocab-phi-3.gguf.inp (ids "
               "equal to .out for every tokenizer).",
        "tokenizers": {k: v[1] for k, v in dirs.items()},
        "entries": entries,
    })

    tmpl_e = other["microsoft-Phi-3.5-mini-instruct.jinja"].decode("utf-8")
    templates = {
        "D": dict(tokenizer="phi-3-mini-4k-instruct", source="models/tiny/phi3-mini-4k/tokenizer_config.json",
                  template=toks["phi-3-mini-4k-instruct"].chat_template),
        "B": dict(tokenizer="phi-3-2024-04",
                  source="crates/engine/tests/reference/tokenizer/phi-3-2024-04/tokenizer_config.json",
                  template=toks["phi-3-2024-04"].chat_template),
        "C": dict(tokenizer="phi-3-medium", source="models/tiny/phi3-medium-4k/tokenizer_config.json",
                  template=toks["phi-3-medium"].chat_template),
        "E": dict(tokenizer="phi-3-mini-4k-instruct",
                  source="crates/engine/tests/reference/tokenizer/microsoft-Phi-3.5-mini-instruct.jinja",
                  template=tmpl_e),
    }
    chat_entries = []
    for letter, info in templates.items():
        t = toks[info["tokenizer"]]
        for conv_name, msgs in CHAT_CONVERSATIONS:
            for agp in (True, False):
                text = t.apply_chat_template(msgs, chat_template=info["template"], add_generation_prompt=agp,
                                             tokenize=False)
                ids = flat_ids(t.apply_chat_template(msgs, chat_template=info["template"],
                                                     add_generation_prompt=agp, tokenize=True))
                assert ids == t.encode(text, add_special_tokens=False)
                chat_entries.append(dict(template=letter, tokenizer=info["tokenizer"], conversation=conv_name,
                                         messages=msgs, add_generation_prompt=agp, text=text, ids=ids))
    write_json(TOKREF / "chat.json", {
        "transformers_version": transformers.__version__,
        "how": "tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=..., "
               "tokenize=False) for text; tokenize=True (flattened input_ids; equals encode(text, "
               "add_special_tokens=False)) for ids. Jinja: transformers' sandboxed env, trim_blocks and "
               "lstrip_blocks on, bos_token '<s>', eos_token '<|endoftext|>'.",
        "templates": templates,
        "entries": chat_entries,
    })
    print(f"  chat entries {len(chat_entries)}")


def main():
    import argparse

    ap = argparse.ArgumentParser(description="Generate the tiny checkpoints and reference outputs.")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: " + ", ".join([x["name"] for x in VARIANTS] + ["tokenizer"])
                         + " (default: everything). Outputs not named are left as they are.")
    args = ap.parse_args()
    names = [x["name"] for x in VARIANTS] + ["tokenizer"]
    only = names if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"unknown --only entries {unknown}; choose from {names}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tok_sources, other = load_sources()
    # tokenizers are needed to make prompts before any model folder exists
    toks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, files in tok_sources.items():
            d = Path(tmp) / name
            d.mkdir()
            for fn, data in files.items():
                (d / fn).write_bytes(data)
            toks[name] = AutoTokenizer.from_pretrained(d, config=Phi3Config())
            assert type(toks[name]).__name__ == "TokenizersBackend"
    results = []
    for v in VARIANTS:
        if v["name"] in only:
            results.append(make_variant(v, tok_sources[v["tokenizer"]], toks[v["tokenizer"]]))
    if "tokenizer" in only:
        make_tokenizer_refs(tok_sources, other)
    print("== summary")
    for r in results:
        print(f"  {r['name']}: seed {r['seed']} min_margin {r['min_margin']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
