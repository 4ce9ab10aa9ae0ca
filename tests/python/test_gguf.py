"""GGUF files written by `phi-serve quantize`, checked with llama.cpp's own tools.

- llama.cpp's Python `gguf` package (its reader and its NumPy ports of ggml's dequantizers)
  reads every file: the `phi3` keys llama.cpp's loader needs, the tokenizer arrays, the tensor
  names, shapes and block formats, and the blocks themselves, which must decode to the
  checkpoint's weights within each format's quantization error.
- The real binary serves the file over HTTP and answers, through the `openai` SDK, what the
  safetensors checkpoint answers (float32 file), or what `--quantize` at load time answers
  (quantized file).
- Where `llama-cpp-python` is installed (benches/llama_cpp.sh builds it), llama.cpp itself loads
  and runs the file, and its greedy tokens equal phi-serve's.
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize, quantize
from openai import OpenAI

from conftest import ROOT, _binary, start_server, stop_server

# The checkpoint whose rows (256 and 512 values) fit every block format, K-quants included.
QMODEL = ROOT / "models" / "tiny" / "phi3-mini-4k-q"
VOCAB = ROOT / "crates" / "engine" / "tests" / "data" / "llama-cpp-vocab" / "ggml-vocab-phi-3.gguf"

# Formats with no NumPy quantizer in `gguf` (the K-quants): the largest relative RMS error
# (|dequantized - weight| / |weight|) a matrix may show, about 1.5 times what they measured here.
# A block laid out wrongly decodes to noise (relative error 1 or more).
RMS_TOL = {"Q6_K": 0.05, "Q5_K": 0.08, "Q4_K": 0.12, "Q3_K": 0.23, "Q2_K": 0.45}

# llama.cpp's `general.file_type` of each scheme.
FILE_TYPES = {
    "f32": 0, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9,
    "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q3_k": 11, "q2_k": 10,
}

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def convert(model: Path, kind: str, out: Path) -> Path:
    subprocess.run(
        [_binary(), "quantize", "--model", str(model), "--type", kind, "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {k: convert(QMODEL, k, d / f"{k}.gguf") for k in FILE_TYPES}


def weights() -> dict:
    """The checkpoint's tensors as float32 (read by hand: NumPy has no bfloat16)."""
    raw = (QMODEL / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + n + o for o in info["data_offsets"])
        assert info["dtype"] == "BF16", info["dtype"]
        bits = np.frombuffer(raw[start:end], dtype="<u2").astype(np.uint32) << 16
        out[name] = bits.view(np.float32).reshape(info["shape"])
    return out


def test_llama_cpp_metadata(files):
    cfg = json.loads((QMODEL / "config.json").read_text())
    vocab = GGUFReader(str(VOCAB))
    for kind, path in files.items():
        r = GGUFReader(str(path))
        assert field(r, "general.architecture") == "phi3"
        assert field(r, "phi3.embedding_length") == cfg["hidden_size"]
        assert field(r, "phi3.feed_forward_length") == cfg["intermediate_size"]
        assert field(r, "phi3.block_count") == cfg["num_hidden_layers"]
        assert field(r, "phi3.attention.head_count") == cfg["num_attention_heads"]
        assert field(r, "phi3.attention.head_count_kv") == cfg["num_key_value_heads"]
        assert field(r, "phi3.context_length") == cfg["max_position_embeddings"]
        assert field(r, "phi3.attention.sliding_window") == cfg["sliding_window"]
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        assert field(r, "phi3.rope.dimension_count") == head_dim
        assert field(r, "general.file_type") == FILE_TYPES[kind]
        # The tokenizer arrays are the ones llama.cpp's converter writes for Phi-3.
        assert field(r, "tokenizer.ggml.model") == "llama"
        assert field(r, "tokenizer.ggml.tokens") == field(vocab, "tokenizer.ggml.tokens")
        assert field(r, "tokenizer.ggml.token_type") == field(vocab, "tokenizer.ggml.token_type")
        assert field(r, "tokenizer.ggml.eos_token_id") == 32000
        assert json.loads(field(r, "tokenizer.huggingface.json"))["model"]["type"] == "BPE"
        assert "<|assistant|>" in field(r, "tokenizer.chat_template")


def test_blocks_are_ggml_blocks(files):
    """Where `gguf` can quantize a format (its NumPy ports of ggml's reference quantizers: F32,
    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), phi-serve's blocks are byte for byte the ones llama.cpp's
    quantizer writes; the K-quants, which it can only decode, decode to the weights within
    their error."""
    w = weights()
    formats_seen = set()
    for kind, path in files.items():
        r = GGUFReader(str(path))
        tensors = {t.name: t for t in r.tensors}
        expected = {gguf_name(n) for n in w}
        assert expected <= set(tensors), f"{kind}: missing {expected - set(tensors)}"
        for name, weight in w.items():
            t = tensors[gguf_name(name)]
            # GGUF lists dimensions innermost first.
            assert list(reversed([int(x) for x in t.shape])) == list(weight.shape), name
            fmt = t.tensor_type.name
            formats_seen.add(fmt)
            if weight.ndim == 1:
                assert t.tensor_type == GGMLQuantizationType.F32, f"{name} must stay float32"
            got = dequantize(t.data, t.tensor_type).reshape(weight.shape)
            try:
                ggml = np.asarray(quantize(weight, t.tensor_type))
            except NotImplementedError:
                rel = np.sqrt(np.mean((got - weight) ** 2)) / np.sqrt(np.mean(weight**2))
                assert rel <= RMS_TOL[fmt], f"{kind} {name} ({fmt}): relative RMS error {rel:.4f}"
                continue
            same = np.array_equal(ggml.view(np.uint8).ravel(), np.asarray(t.data).view(np.uint8).ravel())
            assert same, f"{kind} {name} ({fmt}): blocks differ from ggml's reference quantizer"
    # llama.cpp's Q4_K_M mix: Q4_K, Q5_K for QKV, Q6_K for the tied output and some ffn_down.
    want = {"F32", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert want <= formats_seen, formats_seen


def chat(url: str, n: int = 12) -> tuple[str, str]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    r = client.chat.completions.create(
        model="phi3",
        messages=[{"role": "user", "content": "Count to ten in French, please."}],
        max_tokens=n,
        temperature=0,
        logprobs=True,
    )
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_served_gguf_answers_like_the_checkpoint(files):
    a = start_server(model=files["f32"])
    b = start_server(model=QMODEL)
    try:
        assert chat(a.url) == chat(b.url)
    finally:
        stop_server(a)
        stop_server(b)


def test_served_quantized_gguf_answers_like_quantize_at_load(files):
    a = start_server(model=files["q4_k_m"])
    b = start_server("--quantize", "q4_k_m", model=QMODEL)
    try:
        assert chat(a.url) == chat(b.url)
    finally:
        stop_server(a)
        stop_server(b)


def greedy_cases() -> list[dict]:
    ref = ROOT / "crates" / "engine" / "tests" / "reference" / "phi3-mini-4k-q" / "reference.json"
    return json.loads(ref.read_text())["greedy_cases"]


@pytest.mark.parametrize("kind,min_agree", [("f32", 1.0), ("q8_0", 0.9)])
def test_llama_cpp_runs_the_file(files, kind, min_agree):
    """llama.cpp loads the file and continues the reference prompts as transformers did."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (benches/llama_cpp.sh builds it)"
    )
    llm = llama_cpp.Llama(model_path=str(files[kind]), n_ctx=2048, n_threads=2, verbose=False)
    agree = total = 0
    for case in greedy_cases():
        want = case["generated_ids"]
        llm.reset()
        got = []
        for tok in llm.generate(case["prompt_ids"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            got.append(tok)
            if len(got) == len(want):
                break
        # Count the agreeing prefix: after a first difference the continuations diverge.
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        agree += n
        total += len(want)
    assert agree / total >= min_agree, f"{kind}: llama.cpp agrees on {agree}/{total} greedy tokens"
