#!/usr/bin/env python3
"""phi-serve against llama.cpp (llama-cpp-python) on the CPU, on the same GGUF files.

Run through `benches/llama_cpp.sh`, which builds the binaries and the llama-cpp-python venv and
then runs this file with that venv's python. Phases:

  1. model: the full-size Phi-3-mini-shaped random-weight checkpoint (`bench-model mini`, bf16),
     written as GGUF Q4_0, Q4_K_M and Q8_0 by `phi-serve quantize` (cached next to it);
  2. memory read bandwidth: a 2 GiB streaming sum in C (gcc -O3 -march=native -fopenmp, the
     method of /work/shared/CPU.md), best of 5, on 1 thread and on the benchmark's thread count;
  3. engine level, per format: a ~512-token prompt and 128 greedy tokens; phi-serve through
     `phi-serve generate --raw --ignore-eos` (one process a run, its own timing line), llama.cpp
     through llama-cpp-python's low-level API on the same text's token ids (`eval` of the prompt
     plus the first sample, then 127 steps of eval + sample); a warm-up, then the best of --reps;
  4. HTTP level, per format: `phi-serve serve` and `python -m llama_cpp.server`, one at a time, the
     same streamed chat request (max_tokens 128, temperature 0); time to first token and decode
     tokens/s from the stream; a warm-up request, then the best of --reps;
  5. the table (also target/llama-cpp-bench/results.{md,json}).

Internal modes (`_tokenize`, `_llama_engine`, `_llama_info`) run llama.cpp in a child process, so a
crash there (e.g. an instruction the CPU lacks) is reported instead of killing the run.
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("q4_0", "q4_k_m", "q8_0")
CHECKPOINT_NAME = "phi3-mini-random"
GGUF_DIR_NAME = "phi3-mini-random-gguf"
STAMP = ".bench-model-stamp"

# ---------------------------------------------------------------------------------------------
# GGUF: tensor bytes from the header (ggml type -> (elements per block, bytes per block)).
GGML_BLOCK = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 30: (1, 2),
}
GGML_NAME = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
             10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}


def _read(f, fmt):
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, f.read(size))


def _read_str(f):
    (n,) = _read(f, "<Q")
    return f.read(n).decode("utf-8", "replace")


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}


def _skip_value(f, t):
    if t in _SCALAR:
        f.seek(struct.calcsize(_SCALAR[t]), 1)
    elif t == 8:
        (n,) = _read(f, "<Q")
        f.seek(n, 1)
    elif t == 9:
        et, n = _read(f, "<IQ")
        if et in _SCALAR:
            f.seek(n * struct.calcsize(_SCALAR[et]), 1)
        else:
            for _ in range(n):
                _skip_value(f, et)
    else:
        raise ValueError(f"unknown GGUF value type {t}")


def gguf_weights(path):
    """Tensor bytes of a GGUF file: total, the embedding table's, and per ggml type."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        _read(f, "<I")
        n_tensors, n_kv = _read(f, "<QQ")
        for _ in range(n_kv):
            _read_str(f)
            (t,) = _read(f, "<I")
            _skip_value(f, t)
        total, embd, embd_rows, types = 0, 0, 1, {}
        for _ in range(n_tensors):
            name = _read_str(f)
            (nd,) = _read(f, "<I")
            dims = _read(f, f"<{nd}Q")
            t, _off = _read(f, "<IQ")
            n = 1
            for d in dims:
                n *= d
            per, size = GGML_BLOCK[t]
            b = n // per * size
            total += b
            key = GGML_NAME.get(t, str(t))
            types[key] = types.get(key, 0) + b
            if name == "token_embd.weight":
                embd, embd_rows = b, dims[-1]
    # A decode step reads every tensor once, but of the embedding table only one row.
    decode = total - embd + embd // embd_rows
    return {"tensor_bytes": total, "embedding_bytes": embd, "decode_bytes": decode,
            "bytes_by_type": types, "file_bytes": os.path.getsize(path)}


# ---------------------------------------------------------------------------------------------
# Small helpers.

def log(msg):
    print(msg, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def physical_cores():
    cores = set()
    phys = core = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
            elif not line.strip():
                if core is not None:
                    cores.add((phys, core))
                phys = core = None
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


def machine():
    info = {"cpus": os.cpu_count(), "physical_cores": physical_cores()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
        info["avx512f"] = "avx512f" in flags
        info["amx"] = "amx_tile" in flags
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        info["commit"] = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True).stdout.strip()
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True).stdout.strip()
        info["worktree_dirty"] = bool(dirty)
    except (subprocess.CalledProcessError, OSError):
        pass
    return info


def _busy_s():
    """CPU seconds the whole machine has been busy (steal included: time the host gave away)."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:9]))
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_s():
    """CPU seconds of this process and its finished children."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class CpuWatch:
    """Share of the machine's CPU that other processes (or the hypervisor) took meanwhile: the
    measure of how noisy a measurement is on a shared machine. Counts a child once it has exited."""

    def __init__(self):
        self.t, self.busy, self.own = time.monotonic(), _busy_s(), _own_s()

    def foreign_pct(self):
        wall = max(time.monotonic() - self.t, 1e-3)
        other = (_busy_s() - self.busy) - (_own_s() - self.own)
        return round(max(0.0, 100.0 * other / (wall * (os.cpu_count() or 1))), 1)


def wait_quiet(limit_s, threshold_pct=10.0, windows=4):
    """Waits (at most limit_s) until other processes use under threshold_pct of the CPUs in
    `windows` 5-second windows in a row (bursty loads such as a test suite slip through a single
    window); returns the seconds waited."""
    t, quiet, said = time.monotonic(), 0, False
    while limit_s > 0 and quiet < windows:
        w = CpuWatch()
        time.sleep(5)
        load = w.foreign_pct()
        quiet = quiet + 1 if load < threshold_pct else 0
        if quiet == 0 and not said:
            log(f"   waiting for the machine to quieten ({load:.0f}% of the CPUs busy elsewhere)")
            said = True
        if time.monotonic() - t >= limit_s and quiet < windows:
            log(f"   (gave up waiting after {limit_s:.0f} s: {load:.0f}% of the CPUs busy elsewhere)")
            break
    return round(time.monotonic() - t, 1)


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def spread(values):
    """(max - min) / max in percent."""
    values = [v for v in values if v]
    if len(values) < 2:
        return 0.0
    return 100.0 * (max(values) - min(values)) / max(values)


# ---------------------------------------------------------------------------------------------
# Phase 1: the model files.

def ensure_models(args, phases):
    root = Path(args.models_root)
    ckpt = root / "bench-models" / CHECKPOINT_NAME
    gdir = root / "bench-models" / GGUF_DIR_NAME
    gdir.mkdir(parents=True, exist_ok=True)
    files = {fmt: gdir / f"{fmt}.gguf" for fmt in args.formats}
    ckpt_stamp = (ckpt / STAMP).read_text() if (ckpt / STAMP).is_file() else None

    def fresh(fmt):
        f = files[fmt]
        stamp = f.with_suffix(".stamp")
        if args.requantize or not f.is_file() or not stamp.is_file():
            return False
        # A GGUF is stale when the checkpoint it came from was regenerated since (a dropped
        # checkpoint cannot be compared: the file is trusted).
        return ckpt_stamp is None or stamp.read_text() == ckpt_stamp

    todo = [fmt for fmt in args.formats if not fresh(fmt)]
    if not todo:
        log(f"== model: GGUF files cached in {gdir}")
        return files
    # Space: the bf16 checkpoint (7.64 GB) plus the GGUF files still to write.
    need = {"q4_0": 2.2e9, "q4_k_m": 2.4e9, "q8_0": 4.1e9}
    want = sum(need.get(f, 4.1e9) for f in todo) + (0 if ckpt_stamp else 7.7e9)
    free = shutil.disk_usage(gdir).free
    log(f"== model: writing {', '.join(todo)} into {gdir} (needs ~{want / 1e9:.1f} GB, "
        f"{free / 1e9:.1f} GB free)")
    if free < want:
        sys.exit(f"not enough space in {gdir}: ~{want / 1e9:.1f} GB needed, "
                 f"{free / 1e9:.1f} GB free (see --models-root, --drop-checkpoint)")
    t = time.monotonic()
    env = dict(os.environ, CARGO_TARGET_DIR=str(root),
               PHI_BENCH_TOKENIZER_DIR=str(ROOT / "models/tiny/phi3-mini-4k"))
    out = run([args.bench_model, "mini"], env=env, capture_output=True)
    sys.stderr.write(out.stderr)
    ckpt = Path(out.stdout.strip())
    phases["checkpoint_s"] = round(time.monotonic() - t, 1)
    log(f"   checkpoint {ckpt} ({phases['checkpoint_s']} s)")
    ckpt_stamp = (ckpt / STAMP).read_text()
    for fmt in todo:
        t = time.monotonic()
        part = files[fmt].with_name(f"{fmt}.partial.gguf")
        run([args.phi_serve, "quantize", "--model", str(ckpt), "--type", fmt, "--out", str(part),
             "--force"], stdout=subprocess.DEVNULL)
        part.rename(files[fmt])
        files[fmt].with_suffix(".stamp").write_text(ckpt_stamp)
        phases[f"quantize_{fmt}_s"] = round(time.monotonic() - t, 1)
        log(f"   {files[fmt]}: {files[fmt].stat().st_size / 1e9:.2f} GB "
            f"({phases[f'quantize_{fmt}_s']} s)")
    if args.drop_checkpoint:
        shutil.rmtree(ckpt)
        log(f"   removed the bf16 checkpoint {ckpt} (--drop-checkpoint)")
    return files


# ---------------------------------------------------------------------------------------------
# Phase 2: memory read bandwidth.

BW_C = r"""
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
/* Streaming read of a buffer: each thread sums a contiguous share with 64 independent
   accumulators (vectorised, so the loop is bound by memory, not by add latency). */
int main(int argc, char **argv) {
    size_t bytes = (size_t)(atof(argv[1]) * (1UL << 30)), n = bytes / sizeof(float);
    int reps = atoi(argv[2]);
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) return 1;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    double best = 1e30, sink = 0;
    for (int r = 0; r < reps; r++) {
        double t = omp_get_wtime(), s = 0;
#pragma omp parallel reduction(+ : s)
        {
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
            size_t share = (n / nt) & ~(size_t)63, lo = id * share;
            size_t hi = id == nt - 1 ? n : lo + share;
            float acc[64] = {0};
            size_t i = lo;
            for (; i + 64 <= hi; i += 64)
                for (int j = 0; j < 64; j++) acc[j] += a[i + j];
            for (; i < hi; i++) acc[0] += a[i];
            for (int j = 0; j < 64; j++) s += acc[j];
        }
        t = omp_get_wtime() - t;
        if (t < best) best = t;
        sink += s;
    }
    printf("%.3f %g\n", bytes / best / 1e9, sink);
    free(a);
    return 0;
}
"""


def measure_bandwidth(out_dir, threads):
    src, exe = out_dir / "membw.c", out_dir / "membw"
    src.write_text(BW_C)
    run(["gcc", "-O3", "-march=native", "-fopenmp", "-o", str(exe), str(src)])
    res = {}
    for t in sorted({1, threads}):
        env = dict(os.environ, OMP_NUM_THREADS=str(t), OMP_PROC_BIND="spread")
        out = run([str(exe), "2", "5"], env=env, capture_output=True).stdout.split()
        res[t] = float(out[0])
    return res


# ---------------------------------------------------------------------------------------------
# llama.cpp in a child process.

def child(mode, **kw):
    """Runs this file in `mode` with the venv's python; returns its JSON answer."""
    p = subprocess.run([sys.executable, __file__, mode], input=json.dumps(kw), text=True,
                       capture_output=True)
    if p.returncode != 0:
        sig = f" (signal {signal.Signals(-p.returncode).name})" if p.returncode < 0 else ""
        raise RuntimeError(f"llama.cpp child {mode} failed with {p.returncode}{sig}: "
                           f"{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _child_main(mode, kw):
    import llama_cpp
    from llama_cpp import Llama

    if mode == "_llama_info":
        print(json.dumps({"version": llama_cpp.__version__,
                          "system_info": llama_cpp.llama_print_system_info().decode()}))
        return
    if mode == "_tokenize":
        llm = Llama(model_path=kw["model"], vocab_only=True, verbose=False)
        print(json.dumps([len(llm.tokenize(t.encode(), add_bos=True)) for t in kw["texts"]]))
        return
    if mode == "_llama_engine":
        t = time.perf_counter()
        llm = Llama(model_path=kw["model"], n_ctx=2048, n_threads=kw["threads"],
                    n_threads_batch=kw["threads"], n_batch=512, verbose=False)
        load_s = time.perf_counter() - t
        ids = llm.tokenize(kw["text"].encode(), add_bos=True)
        gen = kw["gen"]
        runs = []
        for rep in range(kw["reps"] + 1):
            # Run 0 is a short warm-up (32 prompt tokens, 4 generated).
            prompt, steps = (ids[:32], 4) if rep == 0 else (ids, gen)
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            tok = llm.sample(temp=0.0)
            t1 = time.perf_counter()
            for _ in range(steps - 1):
                llm.eval([tok])
                tok = llm.sample(temp=0.0)
            t2 = time.perf_counter()
            runs.append({"prompt_tokens": len(prompt), "prompt_s": t1 - t0,
                         "pp": len(prompt) / (t1 - t0), "gen_tokens": steps, "gen_s": t2 - t1,
                         "tg": (steps - 1) / (t2 - t1)})
        print(json.dumps({"load_s": load_s, "runs": runs}))
        return
    raise SystemExit(f"unknown mode {mode}")


# ---------------------------------------------------------------------------------------------
# Phase 3: engine level.

WORDS = ("the model server answers a question about weather in Paris please explain why memory "
         "bandwidth limits decode speed on small machines while prompt processing is bound by "
         "arithmetic and every weight is read once for each generated token so quantized "
         "formats help a lot").split()


def make_prompt(model, n_tokens):
    """English-like text that llama.cpp tokenizes (BOS included) to at most n_tokens, as close
    as whole words allow."""
    r = random.Random(7)
    words = [r.choice(WORDS) for _ in range(2 * n_tokens)]
    lengths = list(range(max(1, n_tokens // 4), len(words) + 1))
    counts = child("_tokenize", model=str(model), texts=[" ".join(words[:m]) for m in lengths])
    m = max((m for m, c in zip(lengths, counts) if c <= n_tokens), default=lengths[0])
    text = " ".join(words[:m])
    return text, counts[lengths.index(m)]


GEN_LINE = re.compile(r"prompt: (\d+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\); generation: "
                      r"(\d+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\); finish: (\w+)")


def phi_engine(args, gguf, text):
    runs = []
    for i in range(args.reps + 1):
        # Run 0 is a short warm-up (the file into the page cache); every run is a new process.
        prompt, gen = ("Hello there", 4) if i == 0 else (text, args.gen_tokens)
        if i > 0:
            wait_quiet(args.wait_quiet)
        watch = CpuWatch()
        t = time.monotonic()
        p = subprocess.run([args.phi_serve, "generate", "--model", str(gguf), "--raw", "--prompt",
                            prompt, "--max-tokens", str(gen), "--ignore-eos",
                            "--threads", str(args.threads)], text=True, capture_output=True)
        wall = time.monotonic() - t
        m = GEN_LINE.search(p.stderr)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"phi-serve generate failed ({p.returncode}): {p.stderr[-2000:]}")
        n_p, t_p, _, n_g, t_g, _, finish = m.groups()
        n_p, t_p, n_g, t_g = int(n_p), float(t_p), int(n_g), float(t_g)
        runs.append({"prompt_tokens": n_p, "prompt_s": t_p, "pp": n_p / t_p, "gen_tokens": n_g,
                     "gen_s": t_g, "tg": (n_g - 1) / t_g, "finish": finish, "wall_s": wall,
                     "load_s": wall - t_p - t_g, "foreign_cpu_pct": watch.foreign_pct()})
        log(f"   phi-serve run {i}{' (warm-up)' if i == 0 else ''}: {m.group(0)}; "
            f"process {wall:.1f} s; other processes {runs[-1]['foreign_cpu_pct']:.0f}% CPU")
    return {"runs": runs}


def best_of(result):
    runs = result["runs"][1:] or result["runs"]
    pp = max(runs, key=lambda r: r["pp"])
    tg = max(runs, key=lambda r: r["tg"])
    return {"pp": pp["pp"], "tg": tg["tg"], "prompt_tokens": pp["prompt_tokens"],
            "gen_tokens": tg["gen_tokens"], "pp_spread_pct": spread([r["pp"] for r in runs]),
            "foreign_cpu_pct": max([r.get("foreign_cpu_pct", 0) for r in runs] +
                                   [result.get("foreign_cpu_pct", 0)]),
            "tg_spread_pct": spread([r["tg"] for r in runs])}


# ---------------------------------------------------------------------------------------------
# Phase 4: HTTP level.

def stream_chat(port, messages, max_tokens):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    body = json.dumps({"model": "phi3", "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:1000]!r}")
    first = last = usage = finish = None
    chunks, text = 0, []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        now = time.perf_counter()
        ev = json.loads(data)
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            c = (ch.get("delta") or {}).get("content")
            if c:
                chunks += 1
                text.append(c)
                first = first or now
                last = now
            finish = ch.get("finish_reason") or finish
    conn.close()
    if first is None:
        raise RuntimeError("the stream carried no content")
    return {"ttft_s": first - t0, "stream_s": last - first, "content_chunks": chunks,
            "usage": usage, "finish": finish, "text_head": "".join(text)[:80]}


LLAMA_PERF = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens.*?\n.*?"
                        r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", re.S)


def start_server(cmd, log_path, ready, timeout=900):
    logf = open(log_path, "w")
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, text=True)
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: "
                               f"{Path(log_path).read_text()[-2000:]}")
        port = ready()
        if port:
            return proc, port, time.monotonic() - t
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} did not become ready in {timeout} s")


def stop_server(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_ok(port, path):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def http_bench(args, engine, gguf, text, out_dir):
    log_path = out_dir / f"{engine}-{gguf.stem}.log"
    if engine == "phi-serve":
        cmd = [args.phi_serve, "serve", "--model", str(gguf), "--port", "0", "--threads",
               str(args.threads), "--prefix-cache-mb", "0"]

        def ready():
            m = re.search(r"phi-serve listening on http://[^:\s]+:(\d+)", log_path.read_text())
            return int(m.group(1)) if m and http_ok(int(m.group(1)), "/v1/models") else None
    else:
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads",
               str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "2048",
               "--n_batch", "512", "--host", "127.0.0.1", "--port", str(port)]

        def ready():
            return port if http_ok(port, "/v1/models") else None
    wait_quiet(args.wait_quiet)
    watch = CpuWatch()
    proc, port, start_s = start_server(cmd, log_path, ready)
    runs = []
    try:
        for i in range(args.reps + 1):
            # A different first line each time, so no prefix of the prompt is reused.
            # Request 0 is a short warm-up.
            if i == 0:
                r = stream_chat(port, [{"role": "user", "content": "Hello there"}], 4)
            else:
                msgs = [{"role": "user", "content": f"Request {i}. {text}"}]
                r = stream_chat(port, msgs, args.gen_tokens)
            runs.append(r)
    finally:
        stop_server(proc)
    foreign = watch.foreign_pct()
    log(f"   {engine} HTTP: other processes took {foreign:.0f}% of the CPUs meanwhile")
    # Token counts: the stream's usage (phi-serve); llama-cpp-python's server sends none when
    # streaming, so its own timing lines (verbose, one pair a request) give them.
    perf = LLAMA_PERF.findall(log_path.read_text()) if engine == "llama.cpp" else []
    # phi-serve's access log: its own view of each request (time to first token, decode rate).
    access = re.findall(r"path=\"/v1/chat/completions\".*? ttft_ms=([\d.]+) .*?tokens_per_s=([\d.]+)",
                        log_path.read_text()) if engine == "phi-serve" else []
    for i, r in enumerate(runs):
        if i < len(access):
            r["server_ttft_ms"], r["server_tokens_per_s"] = map(float, access[i])
        if r["usage"]:
            r["prompt_tokens"] = r["usage"]["prompt_tokens"]
            r["gen_tokens"] = r["usage"]["completion_tokens"]
            r["counts_from"] = "usage"
        elif i < len(perf):
            r["prompt_tokens"] = int(perf[i][1])
            r["gen_tokens"] = int(perf[i][3]) + 1
            r["counts_from"] = "server log (prompt eval tokens, eval runs + 1)"
        else:
            r["prompt_tokens"] = None
            r["gen_tokens"] = r["content_chunks"]
            r["counts_from"] = "content chunks"
        r["pp"] = r["prompt_tokens"] / r["ttft_s"] if r["prompt_tokens"] else None
        r["tg"] = (r["gen_tokens"] - 1) / r["stream_s"] if r["stream_s"] > 0 else None
        log(f"   {engine} HTTP {i}{' (warm-up)' if i == 0 else ''}: TTFT {r['ttft_s'] * 1e3:.0f} ms"
            f" for {r['prompt_tokens']} prompt tokens, {r['gen_tokens']} tokens "
            f"({r['content_chunks']} chunks) in {r['stream_s']:.2f} s after the first, "
            f"finish {r['finish']}"
            + (f"; server log: TTFT {r['server_ttft_ms']:.0f} ms, {r['server_tokens_per_s']:.2f} "
               f"tokens/s" if "server_ttft_ms" in r else ""))
    rest = runs[1:] or runs
    best_pp = min(rest, key=lambda r: r["ttft_s"])
    tgs = [r for r in rest if r["tg"]]
    best_tg = max(tgs, key=lambda r: r["tg"]) if tgs else {"tg": None, "gen_tokens": None}
    return {"runs": runs, "start_s": start_s, "ttft_s": best_pp["ttft_s"], "pp": best_pp["pp"],
            "prompt_tokens": best_pp["prompt_tokens"], "tg": best_tg["tg"],
            "gen_tokens": best_tg["gen_tokens"], "first_ttft_s": rest[0]["ttft_s"],
            "ttft_spread_pct": spread([1 / r["ttft_s"] for r in rest]), "foreign_cpu_pct": foreign,
            "tg_spread_pct": spread([r["tg"] for r in tgs])}


# ---------------------------------------------------------------------------------------------
# Phase 5: the table.

def fmt_num(x, d=1):
    return "-" if x is None else f"{x:.{d}f}"


def ratio(a, b):
    return a / b if a and b else None


def tables(res):
    # The ceiling: the best read bandwidth measured (any thread count, before or after).
    bw = max(v for b in res["bandwidth"] for v in b["gbs"].values())
    lines = []
    head = ("| format | level | pp t/s phi-serve | pp t/s llama.cpp | pp ratio | tg t/s phi-serve "
            "| tg t/s llama.cpp | tg ratio | decode GB/s phi-serve (of BW) | decode GB/s llama.cpp "
            "(of BW) |")
    lines += [head, "|" + "---|" * 10]
    for fmt, r in res["formats"].items():
        wb = r["weights"]["decode_bytes"]
        for level in ("engine", "http"):
            if level not in r:
                continue
            p, l = r[level]["phi-serve"], r[level]["llama.cpp"]

            def dec(x):
                return "-" if not x else f"{wb * x / 1e9:.1f} ({100 * wb * x / 1e9 / bw:.0f}%)"
            lines.append(
                f"| {fmt.upper()} | {level} | {fmt_num(p.get('pp'))} | {fmt_num(l.get('pp'))} | "
                f"{fmt_num(ratio(p.get('pp'), l.get('pp')), 2)} | {fmt_num(p.get('tg'), 2)} | "
                f"{fmt_num(l.get('tg'), 2)} | {fmt_num(ratio(p.get('tg'), l.get('tg')), 2)} | "
                f"{dec(p.get('tg'))} | {dec(l.get('tg'))} |")
    notes = [
        "",
        f"Ratios are phi-serve / llama.cpp (above 1: phi-serve faster). pp at the HTTP level is "
        f"prompt tokens / time to first token. Memory read bandwidth {bw:.1f} GB/s (the best of "
        f"1 and {res['threads']} threads, before and after each run: "
        + ", ".join("/".join(f"{v:.1f}" for v in b["gbs"].values()) for b in res["bandwidth"])
        + f" GB/s); decode GB/s = weight bytes a "
        f"step reads x tg tokens/s, and its fraction of that bandwidth. Engine-level phi-serve "
        f"runs are each a new process; llama.cpp's are in one process after a warm-up.",
        "",
        "| format | GGUF GB | weights read per token GB | prompt tokens engine (phi-serve / "
        "llama.cpp) | HTTP TTFT ms phi-serve | HTTP TTFT ms llama.cpp | HTTP prompt tokens computed | "
        "HTTP tokens generated | first timed TTFT ms phi-serve / llama.cpp | server start s |",
        "|" + "---|" * 10,
    ]
    for fmt, r in res["formats"].items():
        e, h = r.get("engine", {}), r.get("http", {})
        ep, el = e.get("phi-serve", {}), e.get("llama.cpp", {})
        hp, hl = h.get("phi-serve", {}), h.get("llama.cpp", {})

        def ms(x):
            return "-" if x is None else f"{x * 1e3:.0f}"
        notes.append(
            f"| {fmt.upper()} | {r['weights']['file_bytes'] / 1e9:.2f} | "
            f"{r['weights']['decode_bytes'] / 1e9:.3f} | {ep.get('prompt_tokens', '-')} / "
            f"{el.get('prompt_tokens', '-')} | {ms(hp.get('ttft_s'))} | {ms(hl.get('ttft_s'))} | "
            f"{hp.get('prompt_tokens', '-')} / {hl.get('prompt_tokens', '-')} | "
            f"{hp.get('gen_tokens', '-')} / {hl.get('gen_tokens', '-')} | "
            f"{ms(hp.get('first_ttft_s'))} / {ms(hl.get('first_ttft_s'))} | "
            f"{fmt_num(hp.get('start_s'))} / {fmt_num(hl.get('start_s'))} |")
    notes += ["", "Spread of the repetitions ((max - min) / max of the timed runs), pp / tg, and "
              "the most CPU other processes took during the measurement (as a share of all "
              "CPUs, hypervisor steal included):"]
    for fmt, r in res["formats"].items():
        parts = []
        for level in ("engine", "http"):
            for eng in ("phi-serve", "llama.cpp"):
                x = r.get(level, {}).get(eng)
                if x:
                    a = x.get("pp_spread_pct", x.get("ttft_spread_pct"))
                    parts.append(f"{level} {eng} {a:.0f}% / {x.get('tg_spread_pct', 0):.0f}% "
                                 f"(others: {x.get('foreign_cpu_pct', 0):.0f}% CPU)")
        notes.append(f"- {fmt.upper()}: " + "; ".join(parts))
    return "\n".join(lines + notes)


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phi-serve", default=str(ROOT / "target/release/phi-serve"))
    ap.add_argument("--bench-model", default=str(ROOT / "target/release/bench-model"))
    ap.add_argument("--models-root", default=str(ROOT / "target"),
                    help="the checkpoint goes to DIR/bench-models/phi3-mini-random, the GGUF "
                         "files to DIR/bench-models/phi3-mini-random-gguf (default: target)")
    ap.add_argument("--drop-checkpoint", action="store_true",
                    help="remove the 7.6 GB bf16 checkpoint once the GGUF files are written")
    ap.add_argument("--requantize", action="store_true", help="rewrite the GGUF files")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=physical_cores(),
                    help="threads of both engines (default: physical cores)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions after a warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each measurement wait up to SECONDS for other processes to "
                         "leave the CPUs (under 10%% busy over 5 s)")
    ap.add_argument("--engines", default="phi-serve,llama.cpp",
                    help="which of phi-serve, llama.cpp to measure (default both)")
    ap.add_argument("--update", action="store_true",
                    help="merge into the out-dir's results.json: replace only what this run "
                         "measures (to redo a measurement that was disturbed)")
    ap.add_argument("--table-only", action="store_true",
                    help="only print the table of the out-dir's results.json again")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--out-dir", default=str(ROOT / "target/llama-cpp-bench"))
    args = ap.parse_args()
    args.formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        write_markdown(json.loads((out_dir / "results.json").read_text()), out_dir)
        return
    t_all = time.monotonic()

    res = {"date": now(),
           "machine": machine(), "threads": args.threads, "reps": args.reps,
           "phi_serve": run([args.phi_serve, "--version"], capture_output=True).stdout.strip(),
           "phi_serve_sha256": hashlib.sha256(Path(args.phi_serve).read_bytes()).hexdigest()[:16],
           "llama_cmake_args": os.environ.get("LLAMA_CMAKE_ARGS_USED"), "phases_s": {},
           "formats": {}}
    prev_path = out_dir / "results.json"
    if args.update and prev_path.is_file():
        prev = json.loads(prev_path.read_text())
        if "bandwidth_gbs" in prev:  # the layout before bandwidth became a list
            prev["bandwidth"] = [{"date": prev["date"], "when": w, "gbs": prev[k]} for w, k in
                                 (("before", "bandwidth_gbs"), ("after", "bandwidth_after_gbs"))
                                 if k in prev]
        res["formats"], res["bandwidth"] = prev.get("formats", {}), prev.get("bandwidth", [])
        res["phases_s"] = prev.get("phases_s", {})
        res["first_date"] = prev.get("first_date", prev.get("date"))
        # What the table says of the machine and commit is the first run's; updates are listed.
        res["updates"] = prev.get("updates", []) + [
            {"date": res["date"], "commit": res["machine"].get("commit"),
             "phi_serve_sha256": res["phi_serve_sha256"], "formats": args.formats,
             "engines": args.engines, "engine": not args.skip_engine, "http": not args.skip_http}]
        res["machine"] = prev["machine"]
    phases = res["phases_s"]
    info = child("_llama_info")
    res["llama_cpp"] = info
    log(f"== {res['phi_serve']}; llama-cpp-python {info['version']}: {info['system_info']}")
    m = res["machine"]
    log(f"   {m.get('cpu')}, {m['cpus']} CPUs ({m['physical_cores']} cores), "
        f"{m.get('mem_gib')} GiB, commit {m.get('commit')}{' (dirty tree)' if m.get('worktree_dirty') else ''}; "
        f"{args.threads} threads")
    if "AMX_INT8 = 1" in info["system_info"] or "AMX = 1" in info["system_info"]:
        log("   WARNING: this llama.cpp has AMX kernels (they crash on machines whose kernel "
            "needs the AMX permission request; see /work/shared/CPU.md)")
    if "AVX512 = 1" in info["system_info"] and not m.get("avx512f"):
        sys.exit("this llama.cpp was built with AVX-512, which this CPU lacks: rebuild the venv "
                 "(benches/llama_cpp.sh derives the flags from /proc/cpuinfo)")

    files = ensure_models(args, phases)

    wait_quiet(args.wait_quiet)
    t = time.monotonic()
    bw = {str(k): v for k, v in measure_bandwidth(out_dir, args.threads).items()}
    res.setdefault("bandwidth", []).append({"date": now(), "when": "before", "gbs": bw})
    phases["bandwidth_s"] = round(time.monotonic() - t, 1)
    log(f"== memory read bandwidth (2 GiB sum, best of 5): " + ", ".join(
        f"{v:.1f} GB/s on {k} thread(s)" for k, v in bw.items()))

    t = time.monotonic()
    text, n_llama = make_prompt(files[args.formats[0]], args.prompt_tokens)
    res["prompt"] = {"words": len(text.split()), "llama_tokens": n_llama}
    (out_dir / "prompt.txt").write_text(text + "\n")
    phases["prompt_s"] = round(time.monotonic() - t, 1)
    log(f"== prompt: {len(text.split())} words, {n_llama} llama.cpp tokens (BOS included)")

    for fmt in args.formats:
        gguf = files[fmt]
        r = res["formats"].setdefault(fmt, {})
        r.update({"weights": gguf_weights(gguf), "file": str(gguf)})
        w = r["weights"]
        log(f"== {fmt.upper()}: {gguf} ({w['file_bytes'] / 1e9:.2f} GB, {w['decode_bytes'] / 1e9:.3f}"
            f" GB read per token; " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in
                                                w["bytes_by_type"].items()) + ")")
        if not args.skip_engine:
            e = r.setdefault("engine", {})
        if not args.skip_engine and "phi-serve" in args.engines:
            t = time.monotonic()
            try:
                pr = phi_engine(args, gguf, text)
                e["phi-serve"] = {**best_of(pr), "raw": pr, "date": now()}
            except RuntimeError as err:
                log(f"   phi-serve engine FAILED: {err}")
                e["phi-serve"] = {"error": str(err)}
            phases[f"engine_{fmt}_phi_s"] = round(time.monotonic() - t, 1)
        if not args.skip_engine and "llama.cpp" in args.engines:
            t = time.monotonic()
            try:
                wait_quiet(args.wait_quiet)
                watch = CpuWatch()
                lr = child("_llama_engine", model=str(gguf), text=text, threads=args.threads,
                           gen=args.gen_tokens, reps=args.reps)
                lr["foreign_cpu_pct"] = watch.foreign_pct()
                log(f"   llama.cpp engine: other processes took {lr['foreign_cpu_pct']:.0f}% of "
                    f"the CPUs meanwhile")
                for i, x in enumerate(lr["runs"]):
                    log(f"   llama.cpp run {i}{' (warm-up)' if i == 0 else ''}: prompt "
                        f"{x['prompt_tokens']} tokens in {x['prompt_s']:.3f}s ({x['pp']:.1f} "
                        f"tokens/s); generation {x['gen_tokens']} tokens in {x['gen_s']:.3f}s "
                        f"({x['tg']:.2f} tokens/s)")
                e["llama.cpp"] = {**best_of(lr), "load_s": lr["load_s"], "raw": lr, "date": now()}
            except RuntimeError as err:
                log(f"   llama.cpp engine FAILED: {err}")
                e["llama.cpp"] = {"error": str(err)}
            phases[f"engine_{fmt}_llama_s"] = round(time.monotonic() - t, 1)
        if not args.skip_http:
            h = r.setdefault("http", {})
            for eng in args.engines:
                t = time.monotonic()
                try:
                    h[eng] = {**http_bench(args, eng, gguf, text, out_dir), "date": now()}
                except RuntimeError as err:
                    log(f"   {eng} HTTP FAILED: {err}")
                    h[eng] = {"error": str(err)}
                phases[f"http_{fmt}_{'phi' if eng == 'phi-serve' else 'llama'}_s"] = round(
                    time.monotonic() - t, 1)
        (out_dir / "results.json").write_text(json.dumps(res, indent=2) + "\n")

    wait_quiet(args.wait_quiet)
    t = time.monotonic()
    bw = {str(k): v for k, v in measure_bandwidth(out_dir, args.threads).items()}
    res["bandwidth"].append({"date": now(), "when": "after", "gbs": bw})
    phases["bandwidth_after_s"] = round(time.monotonic() - t, 1)
    total_key = f"total_update_{len(res['updates'])}_s" if res.get("updates") else "total_s"
    phases[total_key] = round(time.monotonic() - t_all, 1)
    (out_dir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, out_dir)


def write_markdown(res, out_dir):
    m = res["machine"]
    dirty = " + uncommitted changes" if m.get("worktree_dirty") else ""
    when = res["date"]
    if res.get("first_date"):
        ups = "; ".join(f"{u['date']}, commit {u['commit']}: {','.join(u['formats'])} "
                        f"{'/'.join(u['engines'])}"
                        f"{'' if u['engine'] else ' (HTTP only)'}{'' if u['http'] else ' (engine only)'}"
                        for u in res.get("updates", []))
        when = f"{res['first_date']} (measured again: {ups or res['date']})"
    header = (f"{when}, commit {m.get('commit')}{dirty}, {m.get('cpu')} ({m['cpus']} CPUs, "
              f"{m.get('mem_gib')} GiB), {res['threads']} threads, best of {res['reps']} after a "
              f"warm-up; {res['phi_serve']} (binary sha256 {res.get('phi_serve_sha256', '?')}), "
              f"llama-cpp-python {res['llama_cpp']['version']} "
              f"({res['llama_cpp']['system_info'].strip(' |')}).")
    md = header + "\n\n" + tables(res) + "\n\nPhases (s): " + ", ".join(
        f"{k[:-2]} {v}" for k, v in res["phases_s"].items()) + "\n"
    (out_dir / "results.md").write_text(md)
    log("\n" + md)
    log(f"written {out_dir / 'results.md'} and {out_dir / 'results.json'}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("_"):
        _child_main(sys.argv[1], json.load(sys.stdin))
    else:
        main()
