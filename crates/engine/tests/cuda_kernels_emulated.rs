//! The GPU's paged KV kernels (`kernels/paged_attention.cu`), run on the CPU under an emulation
//! of CUDA's thread model (`tests/cuda_emulation`), against attention computed here in f64.
//!
//! Exists because CI has no GPU: this is where the kernels' indexing into the pool's blocks,
//! their online softmax and the merge of the warps' partial results are checked on every run,
//! for each element type, grouped-query heads, head sizes that are not a multiple of a warp,
//! sliding windows and blocks scattered over the pool. It says nothing of their speed; the GPU
//! tests (`cuda_parity.rs`) run the same kernels on a real device when one is present.

use std::path::{Path, PathBuf};
use std::process::Command;

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
}

/// Compiles the harness once per test process; `None` (with a message) where no C++ compiler
/// with C++20 is found.
fn harness() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/cuda_emulation");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emulation_harness");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-I"])
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

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda_emulation_{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let meta = format!(
        "{nq} {nkv} {hd} {num_blocks} {} {} {n_q} {scale:e}\n",
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
    let status = Command::new(harness).arg(&dir).arg(elem.name()).status().unwrap();
    assert!(status.success(), "{name}: the harness failed ({status})");

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
        "{name}: {} sequences, {} keys, worst error {worst:.2e}",
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
            },
        ),
    ];
    for (i, (name, case)) in cases.iter().enumerate() {
        run_case(&harness, name, case, 0x5eed + i as u64);
    }
}
