#!/usr/bin/env python3
"""Generate tiny random-weight Phi-3 checkpoints and Hugging Face reference outputs.

Usage (from anywhere):  python models/make_tiny_models.py
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


# ----------------------------------------------------------------------------------------------
# Prompts (token ids are made with the July-2024 tokenizer; all variants share the vocabulary)
# ----------------------------------------------------------------------------------------------

PROSE = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting one hundred and "
    "twelve steps, while the fog rolled over the harbour and the gulls argued about fish. "
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. 東京は雨です。 3.14159 + 2 = 5.14159!"
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


def cases_for(v, tok):
    """(logits_cases, greedy_cases) as lists of dicts with name/ids/positions/N/description."""
    cfg = v["config"]
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
        if ok and mm >= MIN_MARGIN_TARGET:
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
        (out_dir / fn).write_bytes(data)
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
        if not v["longrope"] and lc["name"] == "long":
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
        (TOKREF / "phi-3-2024-04" / fn).write_bytes(data)
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
        results.append(make_variant(v, tok_sources[v["tokenizer"]], toks[v["tokenizer"]]))
    make_tokenizer_refs(tok_sources, other)
    print("== summary")
    for r in results:
        print(f"  {r['name']}: seed {r['seed']} min_margin {r['min_margin']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
