//! The engine's GPU kernels (`kernels/*.cu`), run on the CPU under an emulation of CUDA's
//! thread model (`tests/cuda_emulation`): the paged KV kernels against attention computed here
//! in f64, the fused layer steps (RMSNorm, the residual add, the SiLU gate, rotary embedding)
//! against the CPU path's candle ops or the reference's formulas, greedy decoding's argmax and
//! temperature and top_p sampling against the host sampler.
//!
//! Exists because CI has no GPU: this is where the kernels' indexing into the pool's blocks,
//! their online softmax, the merge of the warps' and the splits' partial results, their block
//! reductions and their rounding are checked on every run, for each element type, grouped-query
//! heads, head sizes that are not a multiple of a warp, partial rotary embedding, sliding windows
//! and blocks scattered over the pool. It says nothing of their speed; the GPU tests (`cuda_parity.rs`)
//! run the same kernels on a real device when one is present.

mod greedy_cases;
mod sample_cases;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, D};
use phi_engine::decode_split::decode_splits;
use phi_engine::device_draw::{Pick, PickPlan, PickRow};
use phi_engine::kv_pool::{slot_offset, BLOCK_SIZE};

/// A small deterministic generator (no seeded-RNG crate needed for test data).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// Uniform in `[-1, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
    }
}

#[derive(Clone, Copy, Debug)]
enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::Bf16 => "bf16",
        }
    }

    /// `x` as the kernel sees it once stored in this type.
    fn round(self, x: f32) -> f32 {
        match self {
            Elem::F32 => x,
            Elem::F16 => half::f16::from_f32(x).to_f32(),
            Elem::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    fn dtype(self) -> DType {
        match self {
            Elem::F32 => DType::F32,
            Elem::F16 => DType::F16,
            Elem::Bf16 => DType::BF16,
        }
    }

    /// The relative error of one rounding to this type.
    fn rel_tol(self) -> f64 {
        match self {
            Elem::F32 => 1e-5,
            Elem::F16 => 1.0 / 1024.0,
            Elem::Bf16 => 1.0 / 128.0,
        }
    }
}

/// One test problem: the heads, and per sequence its length and how many of its newest
/// positions its query sees (its sliding window).
struct Case {
    elem: Elem,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// `(length, visible)` per sequence.
    seqs: Vec<(usize, usize)>,
    /// Factor on the queries: large values make the softmax peaked, so that the running
    /// maximum's rescaling matters.
    q_gain: f32,
    /// Keys per split instead of what the launcher would pick (`decode_splits`).
    split_keys: Option<usize>,
}

/// Compiles the harness once per test process; `None` (with a message) where no C++ compiler
/// with C++20 is found.
fn harness() -> Option<PathBuf> {
    static HARNESS: OnceLock<Option<PathBuf>> = OnceLock::new();
    HARNESS.get_or_init(compile_harness).clone()
}

fn compile_harness() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/cuda_emulation");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emulation_harness");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas"])
        // The kernels' `__f*_rn` arithmetic must not be fused into FMAs here either.
        .args(["-ffp-contract=off", "-I"])
        .arg(&dir)
        .args(["-include", "cuda_emulation.h", "-x", "c++"])
        .arg(dir.join("harness.cpp"))
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => Some(out),
        Ok(s) => panic!("the emulation harness did not compile ({s})"),
        Err(e) => {
            eprintln!("SKIPPED: no C++ compiler ({cxx}: {e})");
            None
        }
    }
}

fn write_f32(path: &Path, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn write_u32(path: &Path, v: &[u32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// A scratch folder for one harness run.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda_emulation_{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs kernel group `op` of the harness on the inputs in `dir`.
fn run_harness(harness: &Path, op: &str, dir: &Path, elem: Elem, name: &str) {
    let status = Command::new(harness).arg(op).arg(dir).arg(elem.name()).status().unwrap();
    assert!(status.success(), "{name}: the harness failed ({status})");
}

fn run_case(harness: &Path, name: &str, case: &Case, seed: u64) {
    let Case { elem, n_heads: nq, n_kv_heads: nkv, head_dim: hd, .. } = *case;
    let mut rng = Lcg(seed);
    let total: usize = case.seqs.iter().map(|s| s.0).sum();
    // Blocks scattered over a pool with room to spare, in a shuffled order.
    let blocks_needed: usize = case.seqs.iter().map(|s| s.0.div_ceil(BLOCK_SIZE)).sum();
    let num_blocks = blocks_needed * 2 + 3;
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.next() as usize % (i + 1));
    }

    // Every position of every sequence is written; `tables[s]` are sequence s's blocks.
    let row = nkv * hd;
    let (mut k_rows, mut v_rows) =
        (Vec::with_capacity(total * row), Vec::with_capacity(total * row));
    let mut write_slots = Vec::with_capacity(total);
    let mut tables = Vec::new();
    for &(len, _) in &case.seqs {
        let table: Vec<u32> = free.drain(..len.div_ceil(BLOCK_SIZE)).collect();
        for p in 0..len {
            write_slots.push(table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32);
            for _ in 0..row {
                k_rows.push(rng.unit());
                v_rows.push(rng.unit());
            }
        }
        tables.push(table);
    }

    // Queries in a batch with two spare rows, in an order other than the sequences'.
    let n_q = case.seqs.len() + 2;
    let q: Vec<f32> = (0..n_q * nq * hd).map(|_| rng.unit() * case.q_gain).collect();
    let q_rows: Vec<u32> = (0..case.seqs.len() as u32).rev().map(|s| s + 1).collect();
    let mut slots = Vec::new();
    let mut starts = vec![0u32];
    for (&(len, visible), table) in case.seqs.iter().zip(&tables) {
        for p in len - visible..len {
            slots.push(table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32);
        }
        starts.push(slots.len() as u32);
    }
    let scale = 1.0 / (hd as f32).sqrt();
    // Split as the launcher would, unless the case says otherwise (0: no splits).
    let max_keys = case.seqs.iter().map(|s| s.1).max().unwrap_or(0);
    let split_keys = case
        .split_keys
        .or_else(|| decode_splits(max_keys, case.seqs.len(), nq).map(|(keys, _)| keys))
        .unwrap_or(0);

    let dir = scratch(name);
    let meta = format!(
        "{nq} {nkv} {hd} {num_blocks} {} {} {n_q} {scale:e} {split_keys}\n",
        write_slots.len(),
        case.seqs.len()
    );
    std::fs::write(dir.join("meta.txt"), meta).unwrap();
    write_f32(&dir.join("k_rows.f32"), &k_rows);
    write_f32(&dir.join("v_rows.f32"), &v_rows);
    write_u32(&dir.join("write_slots.u32"), &write_slots);
    write_f32(&dir.join("q.f32"), &q);
    write_u32(&dir.join("slots.u32"), &slots);
    write_u32(&dir.join("starts.u32"), &starts);
    write_u32(&dir.join("q_rows.u32"), &q_rows);
    run_harness(harness, "paged", &dir, elem, name);

    // The pool: each written row where its slot says, rounded to the element type, and zeros
    // everywhere else.
    let pool_len = num_blocks * nkv * BLOCK_SIZE * hd;
    let (pool_k, pool_v) = (read_f32(&dir.join("pool_k.f32")), read_f32(&dir.join("pool_v.f32")));
    assert_eq!((pool_k.len(), pool_v.len()), (pool_len, pool_len), "{name}: pool size");
    let mut expect_k = vec![0f32; pool_len];
    let mut expect_v = vec![0f32; pool_len];
    for (r, &slot) in write_slots.iter().enumerate() {
        for h in 0..nkv {
            let at = slot_offset(slot, h, nkv, hd);
            for d in 0..hd {
                expect_k[at + d] = elem.round(k_rows[r * row + h * hd + d]);
                expect_v[at + d] = elem.round(v_rows[r * row + h * hd + d]);
            }
        }
    }
    assert!(pool_k == expect_k, "{name}: the keys are not where their slots say");
    assert!(pool_v == expect_v, "{name}: the values are not where their slots say");

    // Attention in f64 from the rounded inputs.
    let out = read_f32(&dir.join("out.f32"));
    assert_eq!(out.len(), case.seqs.len() * nq * hd, "{name}: output size");
    let group = nq / nkv;
    let mut worst = 0f64;
    for s in 0..case.seqs.len() {
        let keys = &slots[starts[s] as usize..starts[s + 1] as usize];
        for h in 0..nq {
            let kvh = h / group;
            let qh: Vec<f64> = (0..hd)
                .map(|d| elem.round(q[(q_rows[s] as usize * nq + h) * hd + d]) as f64)
                .collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&slot| {
                    let at = slot_offset(slot, kvh, nkv, hd);
                    (0..hd).map(|d| qh[d] * expect_k[at + d] as f64).sum::<f64>() * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            for d in 0..hd {
                let want: f64 = keys
                    .iter()
                    .zip(&weights)
                    .map(|(&slot, w)| w * expect_v[slot_offset(slot, kvh, nkv, hd) + d] as f64)
                    .sum::<f64>()
                    / sum;
                let got = out[(s * nq + h) * hd + d] as f64;
                let err = (got - want).abs();
                let tol = 1e-5 + 2.0 * elem.rel_tol() * want.abs();
                assert!(
                    err <= tol,
                    "{name}: sequence {s} head {h} dim {d}: {got} against {want} (tolerance {tol})"
                );
                worst = worst.max(err);
            }
        }
    }
    eprintln!(
        "{name}: {} sequences, {} keys, splits of {split_keys}, worst error {worst:.2e}",
        case.seqs.len(),
        slots.len()
    );
}

#[test]
fn paged_kernels_match_reference_attention() {
    let Some(harness) = harness() else { return };
    let cases = [
        // Plain multi-head attention, sequences shorter than, equal to and longer than a block.
        (
            "f32_mha",
            Case {
                elem: Elem::F32,
                n_heads: 4,
                n_kv_heads: 4,
                head_dim: 16,
                seqs: vec![(1, 1), (16, 16), (45, 45)],
                q_gain: 1.0,
                split_keys: None,
            },
        ),
        // Phi-3-mini's head size in bf16, grouped-query heads, one sequence past its window.
        (
            "bf16_gqa_window",
            Case {
                elem: Elem::Bf16,
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 96,
                seqs: vec![(5, 5), (300, 100), (130, 130)],
                q_gain: 3.0,
                split_keys: None,
            },
        ),
        // Phi-3-medium's head size in f16, with a peaked softmax.
        (
            "f16_hd128",
            Case {
                elem: Elem::F16,
                n_heads: 6,
                n_kv_heads: 3,
                head_dim: 128,
                seqs: vec![(33, 33), (1, 1)],
                q_gain: 8.0,
                split_keys: None,
            },
        ),
        // The largest head the kernel takes, and a head size that is no multiple of 32.
        (
            "bf16_hd256",
            Case {
                elem: Elem::Bf16,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 256,
                seqs: vec![(70, 70)],
                q_gain: 1.0,
                split_keys: None,
            },
        ),
        (
            "f32_hd40",
            Case {
                elem: Elem::F32,
                n_heads: 3,
                n_kv_heads: 1,
                head_dim: 40,
                seqs: vec![(9, 9), (64, 20)],
                q_gain: 2.0,
                split_keys: None,
            },
        ),
        // Splits: one split exactly full, one more by a single key, and several over a
        // sliding window (that starts inside a block), merged with one another.
        (
            "bf16_splits",
            Case {
                elem: Elem::Bf16,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 96,
                seqs: vec![(128, 128), (129, 129), (600, 521), (3, 3)],
                q_gain: 4.0,
                split_keys: None,
            },
        ),
        // Many small splits, of a size that is no multiple of a warp's keys.
        (
            "f32_small_splits",
            Case {
                elem: Elem::F32,
                n_heads: 2,
                n_kv_heads: 2,
                head_dim: 64,
                seqs: vec![(200, 200), (37, 37), (1, 1)],
                q_gain: 6.0,
                split_keys: Some(37),
            },
        ),
        // Splits with the wide-head kernels.
        (
            "f16_hd256_splits",
            Case {
                elem: Elem::F16,
                n_heads: 2,
                n_kv_heads: 2,
                head_dim: 256,
                seqs: vec![(300, 300), (40, 40)],
                q_gain: 2.0,
                split_keys: None,
            },
        ),
    ];
    for (i, (name, case)) in cases.iter().enumerate() {
        run_case(&harness, name, case, 0x5eed + i as u64);
    }
}

/// `values` (float32) as a CPU tensor of `elem`'s type.
fn tensor(values: &[f32], shape: &[usize], elem: Elem) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap().to_dtype(elem.dtype()).unwrap()
}

/// A tensor's elements, widened to float32.
fn elements(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Rotary embedding as the CPU path applies it (`Rotary::apply`): candle's `rope_thd` on the
/// first `rot` dimensions of each head of `x` (`[n, heads, head_dim]`), the rest passed through.
fn cpu_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Tensor {
    let (n, h, d) = x.dims3().unwrap();
    let rotated = x.narrow(2, 0, rot).unwrap().contiguous().unwrap().reshape((1, n, h, rot));
    let rotated = candle_nn::rotary_emb::rope_thd(&rotated.unwrap(), cos, sin).unwrap();
    let rotated = rotated.reshape((n, h, rot)).unwrap();
    if rot == d {
        return rotated;
    }
    Tensor::cat(&[&rotated, &x.narrow(2, rot, d - rot).unwrap()], 2).unwrap()
}

/// Checks `got` against `want` elementwise: within one rounding of the element type, and, in
/// f16 and bf16, identical for at least `min_exact` of the elements (the kernels differ from
/// candle's ops only in the order of a float32 sum or the last bit of `expf`, which a rounding
/// to f16 or bf16 hides almost always; float32 results show them in their last bits).
fn assert_close(name: &str, what: &str, got: &[f32], want: &[f32], elem: Elem, min_exact: f64) {
    assert_eq!(got.len(), want.len(), "{name}: {what} size");
    let mut exact = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-30 + elem.rel_tol() * w.abs() as f64;
        assert!(
            ((g - w).abs() as f64) <= tol,
            "{name}: {what}[{i}] = {g}, candle's ops give {w} (tolerance {tol:e})"
        );
        exact += usize::from(g == w);
    }
    let fraction = exact as f64 / got.len() as f64;
    assert!(
        matches!(elem, Elem::F32) || fraction >= min_exact,
        "{name}: {what}: only {:.1}% of the elements identical",
        100.0 * fraction
    );
    eprintln!("{name}: {what}: {:.2}% identical", 100.0 * fraction);
}

/// The fused-qkv rotary kernels: `rope_queries` and `kv_write` with rotation (keys) and without
/// (values), reading heads straight out of `[n, (nq + 2 nkv) * hd]` rows.
fn rope_case(harness: &Path, name: &str, elem: Elem, sizes: [usize; 5], seed: u64) {
    let [n, nq, nkv, hd, rot] = sizes;
    let mut rng = Lcg(seed);
    let stride = (nq + 2 * nkv) * hd;
    let qkv: Vec<f32> = (0..n * stride).map(|_| rng.unit() * 2.0).collect();
    // Real rotary tables at scattered positions, with an attention factor above 1 as LongRoPE's.
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for r in 0..n {
        let pos = (r * 37 + 3) as f32;
        for i in 0..rot / 2 {
            let angle = pos * 10000f32.powf(-2.0 * i as f32 / rot as f32);
            cos.push(angle.cos() * 1.19);
            sin.push(angle.sin() * 1.19);
        }
    }
    let num_blocks = n.div_ceil(BLOCK_SIZE) * 2 + 3;
    let mut all: Vec<u32> = (0..(num_blocks * BLOCK_SIZE) as u32).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.next() as usize % (i + 1));
    }
    let slots: Vec<u32> = all[..n].to_vec();

    let dir = scratch(name);
    std::fs::write(dir.join("meta.txt"), format!("{n} {nq} {nkv} {hd} {rot} {num_blocks}\n"))
        .unwrap();
    write_f32(&dir.join("qkv.f32"), &qkv);
    write_f32(&dir.join("cos.f32"), &cos);
    write_f32(&dir.join("sin.f32"), &sin);
    write_u32(&dir.join("slots.u32"), &slots);
    run_harness(harness, "rope", &dir, elem, name);

    // The CPU path: narrow the fused rows, rotate with candle's kernel.
    let qkv_t = tensor(&qkv, &[n, stride], elem);
    let (cos_t, sin_t) = (tensor(&cos, &[n, rot / 2], elem), tensor(&sin, &[n, rot / 2], elem));
    let heads = |first: usize, count: usize| {
        qkv_t.narrow(1, first * hd, count * hd).unwrap().reshape((n, count, hd)).unwrap()
    };
    let q_want = elements(&cpu_rope(&heads(0, nq), &cos_t, &sin_t, rot));
    let k_want = elements(&cpu_rope(&heads(nq, nkv), &cos_t, &sin_t, rot));
    let v_want = elements(&heads(nq + nkv, nkv));
    assert!(read_f32(&dir.join("q.f32")) == q_want, "{name}: rotated queries differ from candle's");

    let pool_len = num_blocks * nkv * BLOCK_SIZE * hd;
    let (mut expect_k, mut expect_v) = (vec![0f32; pool_len], vec![0f32; pool_len]);
    for (r, &slot) in slots.iter().enumerate() {
        for h in 0..nkv {
            let at = slot_offset(slot, h, nkv, hd);
            let from = (r * nkv + h) * hd;
            expect_k[at..at + hd].copy_from_slice(&k_want[from..from + hd]);
            expect_v[at..at + hd].copy_from_slice(&v_want[from..from + hd]);
        }
    }
    assert!(read_f32(&dir.join("pool_k.f32")) == expect_k, "{name}: rotated keys in the pool");
    assert!(read_f32(&dir.join("pool_v.f32")) == expect_v, "{name}: values in the pool");
    eprintln!("{name}: {n} rows of {nq}+{nkv}+{nkv} heads, identical to candle's rope");
}

#[test]
fn rope_kernels_match_the_cpu_rotary_path() {
    let Some(harness) = harness() else { return };
    let cases = [
        // Phi-3-mini's heads, every dimension rotated.
        ("rope_f32", Elem::F32, [7, 4, 2, 96, 96]),
        ("rope_bf16", Elem::Bf16, [7, 4, 2, 96, 96]),
        ("rope_f16", Elem::F16, [3, 4, 4, 96, 96]),
        // Phi-4-mini's partial rotary embedding (three quarters of a 128 head).
        ("rope_bf16_partial", Elem::Bf16, [5, 6, 2, 128, 96]),
        // A head that is no multiple of a warp, partially rotated.
        ("rope_f32_partial_hd40", Elem::F32, [4, 3, 1, 40, 24]),
    ];
    for (i, (name, elem, sizes)) in cases.into_iter().enumerate() {
        rope_case(&harness, name, elem, sizes, 0xa0e + i as u64);
    }
}

/// RMSNorm as the CPU path computes it (`RmsNorm::forward`).
fn cpu_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    if x.dtype() == DType::F32 {
        return candle_nn::ops::rms_norm(x, weight, eps as f32).unwrap();
    }
    let xf = x.to_dtype(DType::F32).unwrap();
    let mean = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let inv = (mean + eps).unwrap().sqrt().unwrap().recip().unwrap();
    let normed = xf.broadcast_mul(&inv).unwrap().to_dtype(x.dtype()).unwrap();
    normed.broadcast_mul(weight).unwrap()
}

#[test]
fn norm_kernels_match_the_cpu_rms_norm() {
    let Some(harness) = harness() else { return };
    // Phi-3-mini's hidden size, and one that no block width divides.
    let cases = [
        ("norm_f32", Elem::F32, 3, 3072),
        ("norm_bf16", Elem::Bf16, 3, 3072),
        ("norm_f16", Elem::F16, 2, 3072),
        ("norm_bf16_odd", Elem::Bf16, 4, 203),
    ];
    let eps = 1e-5;
    for (i, (name, elem, n, cols)) in cases.into_iter().enumerate() {
        let mut rng = Lcg(0x4e0 + i as u64);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.unit() * 3.0).collect();
        let delta: Vec<f32> = (0..n * cols).map(|_| rng.unit()).collect();
        let weight: Vec<f32> = (0..cols).map(|_| 1.0 + rng.unit() * 0.5).collect();
        let dir = scratch(name);
        std::fs::write(dir.join("meta.txt"), format!("{n} {cols} {eps:e}\n")).unwrap();
        write_f32(&dir.join("x.f32"), &x);
        write_f32(&dir.join("delta.f32"), &delta);
        write_f32(&dir.join("weight.f32"), &weight);
        run_harness(&harness, "norm", &dir, elem, name);

        let (x, delta) = (tensor(&x, &[n, cols], elem), tensor(&delta, &[n, cols], elem));
        let weight = tensor(&weight, &[cols], elem);
        let sum = (&x + &delta).unwrap();
        let got_sum = read_f32(&dir.join("sum.f32"));
        assert!(got_sum == elements(&sum), "{name}: the residual sum differs from candle's add");
        let want = elements(&cpu_rms_norm(&x, &weight, eps));
        assert_close(name, "rms_norm", &read_f32(&dir.join("out.f32")), &want, elem, 0.98);
        let want = elements(&cpu_rms_norm(&sum, &weight, eps));
        assert_close(name, "add_rms_norm", &read_f32(&dir.join("add_out.f32")), &want, elem, 0.98);
    }
}

#[test]
fn silu_kernel_matches_the_cpu_gate() {
    let Some(harness) = harness() else { return };
    let cases = [
        ("silu_f32", Elem::F32, 3, 300),
        ("silu_bf16", Elem::Bf16, 4, 300),
        ("silu_f16", Elem::F16, 2, 257),
    ];
    for (i, (name, elem, n, cols)) in cases.into_iter().enumerate() {
        let mut rng = Lcg(0x51u64 + i as u64);
        // Gates over the range where SiLU bends, and past it.
        let gate_up: Vec<f32> = (0..n * 2 * cols).map(|_| rng.unit() * 8.0).collect();
        let dir = scratch(name);
        std::fs::write(dir.join("meta.txt"), format!("{n} {cols}\n")).unwrap();
        write_f32(&dir.join("gate_up.f32"), &gate_up);
        run_harness(&harness, "silu", &dir, elem, name);

        // The CPU path (the reference's rounding): SiLU in float32, rounded, times up.
        let gate_up = tensor(&gate_up, &[n, 2 * cols], elem);
        let gate = gate_up.narrow(1, 0, cols).unwrap().to_dtype(DType::F32).unwrap();
        let act = candle_nn::ops::silu(&gate).unwrap().to_dtype(elem.dtype()).unwrap();
        let want = elements(&(gate_up.narrow(1, cols, cols).unwrap() * act).unwrap());
        assert_close(name, "silu_mul", &read_f32(&dir.join("out.f32")), &want, elem, 0.98);
    }
}

fn read_u32(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The answers for `rows` of `logits` (rows of `vocab`) from the harness, which launches the
/// pick kernels as `cuda_sampling::pick_rows` does, in blocks of `threads`: the same plan, the
/// same words, the same answer read the same way.
fn run_picks(
    harness: &Path,
    name: &str,
    logits: &[f32],
    vocab: usize,
    rows: &[PickRow],
    threads: usize,
) -> Vec<Option<Pick>> {
    let n_rows = logits.len() / vocab;
    let plan = PickPlan::new(rows, n_rows, vocab).unwrap();
    let dir = scratch(name);
    let meta = format!(
        "{} {} {} {} {} {} {vocab} {threads} {n_rows}\n",
        plan.n_greedy,
        plan.n_draw,
        plan.n_logprob,
        plan.draw_offset,
        plan.logprob_offset,
        plan.words.len()
    );
    std::fs::write(dir.join("meta.txt"), meta).unwrap();
    write_f32(&dir.join("logits.f32"), logits);
    write_u32(&dir.join("params.u32"), &plan.words);
    run_harness(harness, "pick", &dir, Elem::F32, name);
    plan.read(&read_u32(&dir.join("answer.u32"))).unwrap()
}

#[test]
fn greedy_kernel_picks_what_the_host_sampler_picks() {
    let Some(harness) = harness() else { return };
    // (name, rows, vocab, n_valid, block width)
    let cases = [
        ("greedy_small", 16, 300, 300, 64),
        ("greedy_tail", 16, 301, 250, 96),
        ("greedy_narrow_row", 8, 20, 17, 64),
        // Phi-3's vocabulary and padding rows, in the launcher's block width and a narrower one.
        ("greedy_phi3", 8, 32064, 32011, 1024),
        ("greedy_phi3_narrow", 8, 32064, 32011, 128),
    ];
    for (i, (name, n, vocab, n_valid, threads)) in cases.into_iter().enumerate() {
        let logits = greedy_cases::rows(i as u64, n, vocab, n_valid);
        let picks = greedy_cases::picks(n, n_valid);
        let answers = run_picks(&harness, name, &logits, vocab, &picks, threads);
        greedy_cases::check(name, &logits, vocab, n_valid, &greedy_cases::tokens(&answers));
    }
}

#[test]
fn sampling_kernel_draws_what_the_host_sampler_draws() {
    let Some(harness) = harness() else { return };
    // (name, rows, vocab, n_valid, block width)
    let cases = [
        ("sample_small", 16, 300, 300, 64),
        ("sample_tail", 24, 301, 250, 96),
        // More threads than ids: most threads' shares are empty.
        ("sample_narrow_row", 8, 20, 17, 64),
        // A flat row's nucleus range exactly as large as the kernel sorts.
        ("sample_at_capacity", 8, 5000, 4096, 256),
        // Phi-3's vocabulary and padding rows, in the launcher's block width.
        ("sample_phi3", 16, 32064, 32011, 1024),
    ];
    for (i, (name, n, vocab, n_valid, threads)) in cases.into_iter().enumerate() {
        let case = sample_cases::Case::new(i as u64 + 1, n, vocab, n_valid);
        let answers = run_picks(&harness, name, &case.logits, vocab, &case.picks(), threads);
        case.check(name, &answers);
    }
}

#[test]
fn logprob_kernel_gives_the_host_samplers_logprobs_after_either_pick() {
    let Some(harness) = harness() else { return };
    // (name, rows, vocab, n_valid, block width): every row kind with every logprobs kind.
    let cases = [
        ("logprob_small", 30, 300, 300, 64),
        ("logprob_tail", 30, 301, 250, 96),
        ("logprob_narrow_row", 30, 20, 17, 64),
        ("logprob_phi3", 30, 32064, 32011, 1024),
    ];
    for (i, (name, n, vocab, n_valid, threads)) in cases.into_iter().enumerate() {
        let case = sample_cases::LogprobCase::new(i as u64 + 1, n, vocab, n_valid);
        let answers = run_picks(&harness, name, &case.logits, vocab, &case.picks(), threads);
        case.check(name, &answers);
    }
}
