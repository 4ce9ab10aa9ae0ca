//! The forward pass on a CUDA GPU against the CPU and the transformers reference, for every tiny
//! checkpoint variant (`models/tiny`, reference outputs in `tests/reference`):
//! - float32 on `cuda:0` reproduces the reference's greedy continuations (KV cache, one token
//!   per step), one at a time and all together in one ragged batch, and its logits stay within
//!   a small tolerance of the CPU's;
//! - bf16 on `cuda:0` (the GPU default) tracks the reference as closely as bf16 on the CPU does,
//!   and its greedy continuations equal the CPU bf16 ones up to the first step where the CPU's
//!   top-2 margin is within bf16 rounding (past that, either choice is right);
//! - the paged KV kernels (`kernels/paged_attention.cu`, which every decode step above runs
//!   through) on their own: the GPU's writes land where the slots say, and its decode attention
//!   equals the CPU's paged kernel over the same pool;
//! - GGUF block formats on `cuda:0` (candle's quantized CUDA kernels) within the bounds the CPU
//!   test `quantized_reference.rs` holds them to against the float32 reference;
//! - greedy decoding's argmax on the GPU (`kernels/greedy.cu`) picks what the host sampler picks
//!   and leaves to the host the rows it reports errors on; the engine's steps, which take it for
//!   plain greedy rows and copy only the other sampled rows, give a mixed batch the CPU's tokens;
//! - temperature and top_p sampling on the GPU (`kernels/sampling.cu`) draws what the host sampler
//!   draws with the same draws, and the log-probabilities of picked rows computed there are the
//!   host's; the engine's sampled rows, drawn there, are reproducible by seed.
//!
//! Only built with `--features cuda`: `cargo test -p phi-engine --features cuda --test
//! cuda_parity`. Without a usable GPU every test passes after printing `SKIPPED: no CUDA device`
//! (written straight to stderr, so it shows without `--nocapture`). A binary built with CUDA
//! links the driver's `libcuda.so.1`: where there is none the test binary does not start.
#![cfg(feature = "cuda")]

mod greedy_cases;
mod quantized_cases;
mod sample_cases;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use phi_engine::checkpoint::ModelSource;
use phi_engine::cuda_paged::{BatchSlots, DecodeSeq};
use phi_engine::cuda_sampling::pick_rows;
use phi_engine::engine::{Engine, GenerateOptions, LoadOptions, Sequence};
use phi_engine::gguf::GgufFile;
use phi_engine::kv_pool::{KvPool, PoolGeometry, BLOCK_SIZE};
use phi_engine::paged_attention::{decode_attention, DecodeQuery, Heads};
use phi_engine::phi3::{BatchItem, Phi3};
use phi_engine::quantize::{quantize_checkpoint, QuantScheme};
use phi_engine::sampling::SamplingParams;
use serde_json::Value;

const VARIANTS: &[&str] = &["phi3-mini-4k", "phi3-medium-4k", "phi3-mini-128k", "phi4-mini"];
/// GPU float32 against the float32 reference (and the CPU): cuBLAS sums in another order.
const F32_TOL: f32 = 1e-3;

/// Written with `write!` on the stderr handle: libtest captures `print!`/`eprint!` of passing
/// tests, not direct writes, so the line shows in every `cargo test` log.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// `cuda:0`, or `None` after saying the test was skipped. (candle's `cuda_is_available()` only
/// says the build has CUDA: opening the device is the test.)
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            say(&format!("{test}: SKIPPED: no CUDA device (cuda:0: {e})"));
            None
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(variant: &str, dtype: DType, device: &Device) -> Phi3 {
    let dir = root().join("models/tiny").join(variant);
    let files = ModelSource::parse(dir.to_str().unwrap(), None).unwrap().resolve().unwrap();
    Phi3::from_checkpoint(&files, dtype, device).unwrap()
}

fn reference(variant: &str) -> Value {
    let path = root().join("crates/engine/tests/reference").join(variant).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Largest minus second-largest logit.
fn margin(row: &[f32]) -> f32 {
    let mut sorted = row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[0] - sorted[1]
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn rows(logits: &Tensor) -> Vec<Vec<f32>> {
    logits.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap()
}

/// Greedy decoding with the KV cache, one token per step: the tokens and each step's logits.
fn greedy(model: &Phi3, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut tokens = prompt.to_vec();
    let mut cache = model.new_cache().unwrap();
    let mut steps = Vec::new();
    for _ in 0..n {
        let out = model
            .forward(&mut [BatchItem {
                tokens: &tokens,
                cache: &mut cache,
                max_new_tokens: None,
                all_logits: false,
            }])
            .unwrap();
        let row = rows(&out.logits).remove(0);
        tokens.push(argmax(&row));
        steps.push(row);
    }
    (tokens[prompt.len()..].to_vec(), steps)
}

/// Logits of every position of `input`, in one pass from an empty cache.
fn all_logits(model: &Phi3, input: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache().unwrap();
    let out = model
        .forward(&mut [BatchItem {
            tokens: input,
            cache: &mut cache,
            max_new_tokens: None,
            all_logits: true,
        }])
        .unwrap();
    rows(&out.logits)
}

#[test]
fn f32_on_cuda_matches_the_reference_and_the_cpu() {
    let Some(dev) = gpu("f32_on_cuda_matches_the_reference_and_the_cpu") else { return };
    for variant in VARIANTS {
        let gpu_model = load(variant, DType::F32, &dev);
        let cpu_model = load(variant, DType::F32, &Device::Cpu);
        for case in reference(variant)["greedy_cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["generated_ids"]);
            let (got, gpu_steps) = greedy(&gpu_model, &prompt, want.len());
            assert_eq!(got, want, "{variant}/{name}: cuda f32 greedy tokens differ");
            // Teacher-forced logits of the whole continuation, GPU against CPU.
            let full: Vec<u32> = prompt.iter().chain(&want).copied().collect();
            let (g, c) = (all_logits(&gpu_model, &full), all_logits(&cpu_model, &full));
            for (p, (g, c)) in g.iter().zip(&c).enumerate() {
                let d = max_abs_diff(g, c);
                assert!(d < F32_TOL, "{variant}/{name} position {p}: cuda vs cpu f32 |diff| {d}");
            }
            // The cached decode's logits agree with the one-pass ones.
            for (step, row) in gpu_steps.iter().enumerate() {
                let d = max_abs_diff(row, &g[prompt.len() - 1 + step]);
                assert!(d < F32_TOL, "{variant}/{name} step {step}: cached vs full |diff| {d}");
            }
        }
    }
    say("f32_on_cuda_matches_the_reference_and_the_cpu: ran on cuda:0");
}

/// Every greedy case decoded together, in one ragged batch per step, on the GPU.
#[test]
fn ragged_batch_on_cuda_matches_the_reference() {
    let Some(dev) = gpu("ragged_batch_on_cuda_matches_the_reference") else { return };
    for variant in VARIANTS {
        let model = load(variant, DType::F32, &dev);
        let json = reference(variant);
        let cases = json["greedy_cases"].as_array().unwrap();
        let mut seqs: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
        let wants: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["generated_ids"])).collect();
        let prompt_lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache().unwrap()).collect();
        loop {
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].len() < prompt_lens[i] + wants[i].len())
                .collect();
            if active.is_empty() {
                break;
            }
            let mut items: Vec<BatchItem> = Vec::new();
            for (i, (tokens, cache)) in seqs.iter().zip(caches.iter_mut()).enumerate() {
                if active.contains(&i) {
                    // Prompts in chunks of 3, so prefill chunks and decode steps share a batch.
                    items.push(BatchItem {
                        tokens,
                        cache,
                        max_new_tokens: Some(3),
                        all_logits: false,
                    });
                }
            }
            let out = model.forward(&mut items).unwrap();
            drop(items);
            let logits = rows(&out.logits);
            for ((row, &i), pos) in out.rows.iter().zip(&active).zip(&out.positions) {
                if pos.end == seqs[i].len() {
                    seqs[i].push(argmax(&logits[row.end - 1]));
                }
            }
        }
        for (i, case) in cases.iter().enumerate() {
            let got = &seqs[i][prompt_lens[i]..];
            assert_eq!(got, &wants[i][..], "{variant}/{}: cuda ragged batch", case["name"]);
        }
    }
    say("ragged_batch_on_cuda_matches_the_reference: ran on cuda:0");
}

#[test]
fn bf16_on_cuda_tracks_the_cpu() {
    let Some(dev) = gpu("bf16_on_cuda_tracks_the_cpu") else { return };
    for variant in VARIANTS {
        let gpu_model = load(variant, DType::BF16, &dev);
        let cpu_model = load(variant, DType::BF16, &Device::Cpu);
        for case in reference(variant)["greedy_cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let prompt = ids(&case["prompt_ids"]);
            let n = ids(&case["generated_ids"]).len();
            let (cpu_tokens, cpu_steps) = greedy(&cpu_model, &prompt, n);
            let (gpu_tokens, gpu_steps) = greedy(&gpu_model, &prompt, n);
            for step in 0..n {
                let scale = cpu_steps[step].iter().fold(0f32, |m, x| m.max(x.abs()));
                // bf16 keeps 8 significant bits, and GPU and CPU round at different places.
                let tol = 0.05 * scale;
                let d = max_abs_diff(&gpu_steps[step], &cpu_steps[step]);
                assert!(d < tol, "{variant}/{name} step {step}: cuda vs cpu bf16 |diff| {d}");
                if gpu_tokens[step] != cpu_tokens[step] {
                    assert!(
                        margin(&cpu_steps[step]) <= 2.0 * tol,
                        "{variant}/{name} step {step}: cuda bf16 chose {} where the cpu chose {} \
                         by a margin of {}",
                        gpu_tokens[step],
                        cpu_tokens[step],
                        margin(&cpu_steps[step])
                    );
                    // A near tie went the other way: the continuations legitimately part here.
                    break;
                }
            }
        }
    }
    say("bf16_on_cuda_tracks_the_cpu: ran on cuda:0");
}

/// The paged kernels against the CPU's paged decode attention: sequences of 1, 40 and 300
/// positions (the last seeing only its newest 100) in blocks scattered over the pool, grouped
/// heads of Phi-3-mini's size, in each element type.
#[test]
fn paged_kernels_on_cuda_match_the_cpu_kernel() {
    let Some(dev) = gpu("paged_kernels_on_cuda_match_the_cpu_kernel") else { return };
    let (nq, nkv, hd) = (8, 2, 96);
    // The last is long enough to be split over several blocks (decode_split).
    let seqs = [(1usize, 1usize), (40, 40), (300, 100), (700, 650)];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let geometry = PoolGeometry { num_layers: 1, n_kv_heads: nkv, head_dim: hd, dtype };
        let pool = KvPool::new(geometry, 128 * BLOCK_SIZE, 0, &dev).unwrap();
        // Every position of every sequence, blocks handed out from the top of the pool down.
        let mut next_block = pool.num_blocks() as u32;
        let mut tables = Vec::new();
        let mut write = Vec::new();
        for &(len, _) in &seqs {
            let table: Vec<u32> = (0..len.div_ceil(BLOCK_SIZE))
                .map(|_| {
                    next_block -= 1;
                    next_block
                })
                .collect();
            write.extend(
                (0..len)
                    .map(|p| table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32),
            );
            tables.push(table);
        }
        let n = write.len();
        let k = Tensor::randn(0f32, 1.0, (n, nkv, hd), &dev).unwrap().to_dtype(dtype).unwrap();
        let v = Tensor::randn(0f32, 1.0, (n, nkv, hd), &dev).unwrap().to_dtype(dtype).unwrap();
        let q =
            Tensor::randn(0f32, 2.0, (seqs.len(), nq, hd), &dev).unwrap().to_dtype(dtype).unwrap();
        let decode: Vec<DecodeSeq> = seqs
            .iter()
            .zip(&tables)
            .enumerate()
            .map(|(i, (&(len, seen), table))| DecodeSeq {
                q_row: i as u32,
                slots: (len - seen..len)
                    .map(|p| table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32)
                    .collect(),
            })
            .collect();
        let slots = BatchSlots::new(&pool, write.clone(), &decode).unwrap();
        let (pool_k, pool_v) = pool.layer(0);
        slots.write(pool_k, pool_v, &k, &v).unwrap();
        let heads =
            Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale: 1.0 / (hd as f32).sqrt() };
        let got = slots.decode(&q, pool_k, pool_v, heads).unwrap().unwrap();
        let got = got.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
        let got = got.to_vec2::<f32>().unwrap();

        // The writes: each row where its slot says.
        let cpu_k = pool_k.to_device(&Device::Cpu).unwrap();
        let cpu_v = pool_v.to_device(&Device::Cpu).unwrap();
        let flat_k = cpu_k
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((pool.num_blocks(), nkv, BLOCK_SIZE, hd))
            .unwrap();
        let rows_k = k.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
        for (r, &slot) in write.iter().enumerate() {
            let (b, o) = (slot as usize / BLOCK_SIZE, slot as usize % BLOCK_SIZE);
            for h in 0..nkv {
                let want = rows_k.get(r).unwrap().get(h).unwrap().to_vec1::<f32>().unwrap();
                let at = flat_k.get(b).unwrap().get(h).unwrap().get(o).unwrap();
                assert_eq!(at.to_vec1::<f32>().unwrap(), want, "{dtype:?}: row {r} head {h}");
            }
        }

        // Decode attention: the CPU's paged kernel over a copy of the same pool.
        let q_cpu = q.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
        let queries: Vec<DecodeQuery> = decode
            .iter()
            .map(|d| DecodeQuery {
                q: q_cpu.get(d.q_row as usize).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
                slots: d.slots.clone(),
                visible: None,
            })
            .collect();
        let want = decode_attention(&cpu_k, &cpu_v, &queries, heads).unwrap();
        let tol = match dtype {
            DType::F32 => 1e-4,
            _ => 2e-2,
        };
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_abs_diff(g, w);
            assert!(d < tol, "{dtype:?}: sequence {s}: paged decode |diff| {d}");
        }
    }
    say("paged_kernels_on_cuda_match_the_cpu_kernel: ran on cuda:0");
}

/// A tensor's elements, float32, on the CPU.
fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `got` within `rel` of `want`, element by element.
fn assert_rel_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-30 + rel * w.abs(), "{what}[{i}]: {g} against {w}");
    }
}

/// The fused layer kernels (`cuda_layer_ops`, and the pool write of the keys rotated on the way)
/// against the CPU path's candle ops on the same inputs: RMSNorm and the residual add, the SiLU
/// gate, and the rotary embedding of Phi-3-mini's heads and of Phi-4-mini's partial rotation.
#[test]
fn fused_layer_kernels_on_cuda_match_the_cpu_ops() {
    use phi_engine::cuda_layer_ops::{add_rms_norm, rms_norm, rope_queries, silu_mul, RopeTables};
    let Some(dev) = gpu("fused_layer_kernels_on_cuda_match_the_cpu_ops") else { return };
    let cpu = Device::Cpu;
    let randn = |shape: &[usize], std: f32, dtype: DType| {
        Tensor::randn(0f32, std, shape, &cpu).unwrap().to_dtype(dtype).unwrap()
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // One rounding of the type; float32 sums in another order.
        let rel = match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 1.0 / 1024.0,
            _ => 1.0 / 128.0,
        };
        let gpu_of = |t: &Tensor| t.to_device(&dev).unwrap();

        // RMSNorm as RmsNorm::forward computes it on the CPU.
        let (x, delta) = (randn(&[5, 3072], 2.0, dtype), randn(&[5, 3072], 1.0, dtype));
        let weight = (randn(&[3072], 0.1, dtype) + 1.0).unwrap();
        let eps = 1e-5;
        let cpu_norm = |x: &Tensor| -> Tensor {
            if dtype == DType::F32 {
                return candle_nn::ops::rms_norm(x, &weight, eps as f32).unwrap();
            }
            let xf = x.to_dtype(DType::F32).unwrap();
            let inv = (xf.sqr().unwrap().mean_keepdim(1).unwrap() + eps).unwrap();
            let inv = inv.sqrt().unwrap().recip().unwrap();
            xf.broadcast_mul(&inv).unwrap().to_dtype(dtype).unwrap().broadcast_mul(&weight).unwrap()
        };
        let got = rms_norm(&gpu_of(&x), &gpu_of(&weight), eps).unwrap();
        assert_rel_close(&format!("{dtype:?} rms_norm"), &host(&got), &host(&cpu_norm(&x)), rel);
        let (sum, normed) =
            add_rms_norm(&gpu_of(&x), &gpu_of(&delta), &gpu_of(&weight), eps).unwrap();
        let want_sum = (&x + &delta).unwrap();
        assert_eq!(host(&sum), host(&want_sum), "{dtype:?}: the residual sum");
        let want = host(&cpu_norm(&want_sum));
        assert_rel_close(&format!("{dtype:?} add_rms_norm"), &host(&normed), &want, rel);

        // The SiLU gate: SiLU in float32, rounded, times up (CUDA's expf may differ in its
        // last bit).
        let gate_up = randn(&[4, 2 * 8192], 3.0, dtype);
        let gate = gate_up.narrow(1, 0, 8192).unwrap().to_dtype(DType::F32).unwrap();
        let act = candle_nn::ops::silu(&gate).unwrap().to_dtype(dtype).unwrap();
        let want = (gate_up.narrow(1, 8192, 8192).unwrap() * act).unwrap();
        let got = silu_mul(&gpu_of(&gate_up)).unwrap();
        assert_rel_close(&format!("{dtype:?} silu_mul"), &host(&got), &host(&want), 2.0 * rel);

        // Rotary embedding out of the fused qkv rows, queries and keys, full and partial.
        for (nq, nkv, hd, rot) in [(8usize, 4usize, 96usize, 96usize), (6, 2, 128, 96)] {
            let n = 6;
            let qkv = randn(&[n, (nq + 2 * nkv) * hd], 1.0, dtype);
            let angles = Tensor::arange(0f32, (n * rot / 2) as f32, &cpu).unwrap();
            let angles = (angles.reshape((n, rot / 2)).unwrap() * 0.37).unwrap();
            let cos = angles.cos().unwrap().to_dtype(dtype).unwrap();
            let sin = angles.sin().unwrap().to_dtype(dtype).unwrap();
            let rotate = |x: Tensor, heads: usize| -> Vec<f32> {
                let x = x.reshape((n, heads, hd)).unwrap();
                let r = x.narrow(2, 0, rot).unwrap().contiguous().unwrap();
                let r = candle_nn::rotary_emb::rope_thd(&r.unsqueeze(0).unwrap(), &cos, &sin);
                let r = r.unwrap().squeeze(0).unwrap();
                let all = if rot == hd {
                    r
                } else {
                    Tensor::cat(&[&r, &x.narrow(2, rot, hd - rot).unwrap()], 2).unwrap()
                };
                host(&all)
            };
            let want_q = rotate(qkv.narrow(1, 0, nq * hd).unwrap(), nq);
            let want_k = rotate(qkv.narrow(1, nq * hd, nkv * hd).unwrap(), nkv);
            let want_v = host(&qkv.narrow(1, (nq + nkv) * hd, nkv * hd).unwrap());
            let heads = Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale: 1.0 };
            let tables = RopeTables::new(&gpu_of(&cos), &gpu_of(&sin)).unwrap();
            let got_q = host(&rope_queries(&gpu_of(&qkv), &tables, heads).unwrap());
            assert_eq!(got_q, want_q, "{dtype:?} {hd}/{rot}: rotated queries");

            let geometry = PoolGeometry { num_layers: 1, n_kv_heads: nkv, head_dim: hd, dtype };
            let pool = KvPool::new(geometry, 4 * BLOCK_SIZE, 0, &dev).unwrap();
            let write: Vec<u32> = (0..n as u32).map(|r| 3 * BLOCK_SIZE as u32 + 2 * r).collect();
            let slots = BatchSlots::new(&pool, write.clone(), &[]).unwrap();
            let (pool_k, pool_v) = pool.layer(0);
            slots.write_qkv(pool_k, pool_v, &gpu_of(&qkv), heads, &tables).unwrap();
            let (pk, pv) = (host(pool_k), host(pool_v));
            for (r, &slot) in write.iter().enumerate() {
                for h in 0..nkv {
                    let at = phi_engine::kv_pool::slot_offset(slot, h, nkv, hd);
                    let from = (r * nkv + h) * hd;
                    let what = format!("{dtype:?} {hd}/{rot}: row {r} head {h}");
                    assert_eq!(pk[at..at + hd], want_k[from..from + hd], "{what}: key");
                    assert_eq!(pv[at..at + hd], want_v[from..from + hd], "{what}: value");
                }
            }
        }
    }
    say("fused_layer_kernels_on_cuda_match_the_cpu_ops: ran on cuda:0");
}

/// GGUF on the GPU: each format quantized from the quantization test model, loaded on `cuda:0`
/// with float32 activations, within the KL bound `quantized_reference.rs` sets on the CPU (about
/// three times what the CPU measured) against the float32 reference, teacher-forced (prompt
/// passes) and, for Q8_0, a token at a time (decode steps: the quantized matrix-vector kernels
/// and the paged attention kernels). Q8_0 with bf16 activations, the GPU's default type, must
/// still agree on the argmax almost everywhere.
#[test]
fn gguf_formats_on_cuda_against_the_reference() {
    let Some(dev) = gpu("gguf_formats_on_cuda_against_the_reference") else { return };
    let dir = root().join("models/tiny").join(quantized_cases::VARIANT);
    if !dir.join("model.safetensors").is_file() {
        // scripts/gpu-slim.sh leaves it out of a device run that carries the server's bundle.
        say(&format!(
            "gguf_formats_on_cuda_against_the_reference: SKIPPED: no {} here",
            dir.display()
        ));
        return;
    }
    let cases = quantized_cases::cases();
    let files = ModelSource::parse(dir.to_str().unwrap(), None).unwrap().resolve().unwrap();
    let tmp = std::env::temp_dir().join(format!("phi-cuda-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (name, bound) in [("q8_0", 3e-3), ("q6_k", 3e-2), ("q4_k_m", 0.15), ("q4_0", 0.5)] {
        let path = tmp.join(format!("{name}.gguf"));
        quantize_checkpoint(&files, QuantScheme::parse(name).unwrap(), &path).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        let model = Phi3::from_gguf(&gguf, DType::F32, &dev).unwrap();
        assert!(model.quantization().is_some(), "{name}: matrices must run quantized on the GPU");
        let m = quantized_cases::compare(&model, &cases);
        say(&format!("{name} on cuda:0: argmax {:.2}%, mean KL {:.2e}", 100.0 * m.agree, m.kl));
        assert!(m.kl < bound, "{name} on cuda:0: mean KL {:.3e} above {bound:.0e}", m.kl);
        if name != "q8_0" {
            continue;
        }
        assert!(m.agree >= 0.99, "q8_0 on cuda:0: argmax agrees on {:.2}%", 100.0 * m.agree);
        let step = quantized_cases::compare_stepwise(&model, &cases);
        say(&format!(
            "q8_0 on cuda:0, a token at a time: argmax {:.2}%, mean KL {:.2e}",
            100.0 * step.agree,
            step.kl
        ));
        assert!(step.agree >= 0.99 && step.kl < bound, "q8_0 on cuda:0, token by token");
        let half = Phi3::from_gguf(&gguf, DType::BF16, &dev).unwrap();
        let h = quantized_cases::compare(&half, &cases);
        say(&format!("q8_0 on cuda:0, bf16: argmax {:.2}%, mean KL {:.2e}", 100.0 * h.agree, h.kl));
        assert!(
            h.agree >= 0.95,
            "q8_0 on cuda:0 in bf16: argmax agrees on {:.2}%",
            100.0 * h.agree
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn greedy_argmax_on_cuda_picks_what_the_host_sampler_picks() {
    let Some(dev) = gpu("greedy_argmax_on_cuda_picks_what_the_host_sampler_picks") else {
        return;
    };
    // (rows, vocab, n_valid): Phi-3's vocabulary and padding rows, a row narrower than a block,
    // and a batch wider than the step's usual one.
    for (i, (n, vocab, n_valid)) in
        [(16, 32064, 32011), (8, 300, 300), (8, 301, 250), (136, 32064, 32011)]
            .into_iter()
            .enumerate()
    {
        let name = format!("greedy_cuda_{n}x{vocab}");
        let logits = greedy_cases::rows(100 + i as u64, n, vocab, n_valid);
        let t = Tensor::from_slice(&logits, (n, vocab), &dev).unwrap();
        let picks = greedy_cases::tokens(&pick_rows(&t, &greedy_cases::picks(n, n_valid)).unwrap());
        greedy_cases::check(&name, &logits, vocab, n_valid, &picks);
        // A view of every other row (not contiguous): the launcher copies it first.
        let every_other = Tensor::from_slice(&logits, (n / 2, 2 * vocab), &dev)
            .unwrap()
            .narrow(1, 0, vocab)
            .unwrap();
        let even: Vec<f32> = logits.chunks(vocab).step_by(2).flatten().copied().collect();
        greedy_cases::check(
            &format!("{name}_strided"),
            &even,
            vocab,
            n_valid,
            &greedy_cases::tokens(
                &pick_rows(&every_other, &greedy_cases::picks(n / 2, n_valid)).unwrap(),
            ),
        );
    }
}

#[test]
fn sampling_kernel_on_cuda_draws_what_the_host_sampler_draws() {
    let Some(dev) = gpu("sampling_kernel_on_cuda_draws_what_the_host_sampler_draws") else {
        return;
    };
    // (rows, vocab, n_valid): as the emulated test has them, and a batch wider than a step's.
    for (i, (n, vocab, n_valid)) in [
        (16, 300, 300),
        (24, 301, 250),
        (8, 20, 17),
        (8, 5000, 4096),
        (16, 32064, 32011),
        (136, 32064, 32011),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("sample_cuda_{n}x{vocab}");
        let case = sample_cases::Case::new(200 + i as u64, n, vocab, n_valid);
        let t = Tensor::from_slice(&case.logits, (n, vocab), &dev).unwrap();
        case.check(&name, &pick_rows(&t, &case.picks()).unwrap());
    }
}

#[test]
fn logprob_kernel_on_cuda_gives_the_host_samplers_logprobs_after_either_pick() {
    let Some(dev) =
        gpu("logprob_kernel_on_cuda_gives_the_host_samplers_logprobs_after_either_pick")
    else {
        return;
    };
    for (i, (n, vocab, n_valid)) in
        [(30, 300, 300), (30, 301, 250), (30, 20, 17), (60, 32064, 32011)].into_iter().enumerate()
    {
        let name = format!("logprob_cuda_{n}x{vocab}");
        let case = sample_cases::LogprobCase::new(300 + i as u64, n, vocab, n_valid);
        let t = Tensor::from_slice(&case.logits, (n, vocab), &dev).unwrap();
        case.check(&name, &pick_rows(&t, &case.picks()).unwrap());
    }
}

#[test]
fn engine_steps_on_cuda_give_a_mixed_batch_the_cpu_tokens() {
    let Some(dev) = gpu("engine_steps_on_cuda_give_a_mixed_batch_the_cpu_tokens") else { return };
    let variant = "phi3-mini-4k";
    let dir = ModelSource::Local(root().join("models/tiny").join(variant));
    // float32 on both, so that the greedy tokens agree; a small prefill chunk, so that some
    // steps carry prompt rows nothing samples from.
    let opts = |device: Device| LoadOptions {
        device,
        dtype: DType::F32,
        prefill_chunk: Some(12),
        ..LoadOptions::default()
    };
    let (gpu_engine, cpu_engine) =
        (Engine::load(&dir, &opts(dev)).unwrap(), Engine::load(&dir, &opts(Device::Cpu)).unwrap());
    let cases: Vec<(Vec<u32>, Vec<u32>)> = reference(variant)["greedy_cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (ids(&c["prompt_ids"]), ids(&c["generated_ids"])))
        .collect();
    let greedy = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    // Plain greedy (the GPU's argmax), greedy with logprobs (the GPU's argmax and logprobs), and
    // with a penalty (the GPU's sampling kernel).
    let kinds = [
        greedy.clone(),
        SamplingParams { logprobs: true, top_logprobs: Some(2), ..greedy.clone() },
        greedy.clone(),
        SamplingParams { presence_penalty: 1.5, ..greedy.clone() },
        greedy.clone(),
        // Sampled on the GPU: compared with a second GPU run (the CPU's logits differ in their
        // last bits, so its draws may cross a boundary the GPU's do not).
        SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(7), ..greedy.clone() },
        SamplingParams { temperature: 1.0, frequency_penalty: 0.5, seed: Some(11), ..greedy },
    ];
    let run = |engine: &Engine| -> Vec<Vec<(u32, Option<f32>)>> {
        let mut seqs: Vec<Sequence> = kinds
            .iter()
            .enumerate()
            .map(|(i, sampling)| {
                let o = GenerateOptions {
                    sampling: sampling.clone(),
                    max_tokens: Some(10),
                    ignore_eos: true,
                    decode_after_prompt: false,
                    prompt_logprobs: false,
                    ..GenerateOptions::default()
                };
                engine.new_sequence(&cases[i % cases.len()].0, &o).unwrap()
            })
            .collect();
        while seqs.iter().any(|s| !s.is_finished()) {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            engine.step(&mut refs).unwrap();
        }
        seqs.iter().map(|s| s.generated().iter().map(|t| (t.id, t.logprob)).collect()).collect()
    };
    let (on_gpu, on_cpu) = (run(&gpu_engine), run(&cpu_engine));
    let again = run(&gpu_engine);
    let ids = |v: &[(u32, Option<f32>)]| v.iter().map(|t| t.0).collect::<Vec<_>>();
    let (mut same, mut drawn) = (0, 0);
    for (k, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
        if !kinds[k].is_greedy() {
            assert_eq!(ids(g), ids(&again[k]), "sequence {k} ({:?}): by its seed", kinds[k]);
            assert_eq!(g.len(), 10, "sequence {k}: its tokens");
            same += g.iter().zip(c).take_while(|(a, b)| a.0 == b.0).count();
            drawn += g.len();
            continue;
        }
        assert_eq!(ids(g), ids(c), "sequence {k} ({:?}): GPU and CPU tokens", kinds[k]);
        if kinds[k].presence_penalty == 0.0 {
            let want = &cases[k % cases.len()].1;
            let n = want.len().min(g.len());
            assert_eq!(ids(&g[..n]), want[..n], "sequence {k}: the reference's greedy tokens");
        }
        for (step, (a, b)) in g.iter().zip(c).enumerate() {
            match (a.1, b.1) {
                (Some(x), Some(y)) => {
                    assert!((x - y).abs() < F32_TOL, "sequence {k} step {step}: logprob {x} vs {y}")
                }
                (None, None) => {}
                other => panic!("sequence {k} step {step}: logprobs {other:?}"),
            }
        }
    }
    say(&format!("sampled on the GPU: {same} of {drawn} tokens as the CPU draws them, up to the first difference"));
}
