//! qgemm's instruction-set variants against each other and against candle, side by side in one
//! process: `x @ W^T` for a Phi-3-mini `gate_up` matrix (`[16384, 3072]`) in each format.
//!
//! ```text
//! cargo run --release -p phi-serve-benches --example qgemm_isa -- [ROWS] [ROUNDS] [FORMATS]
//! cargo run --release -p phi-serve-benches --example qgemm_isa -- 1 40 q4_0,q4_k
//! ```
//!
//! Exists because the variants differ in ways a criterion group of one of them cannot show:
//! every round calls each variant once, in a rotating order, on its own copy of the weights
//! (4 copies each, so no call finds the weights of an earlier one in the cache), and the
//! mean and best of the rounds are printed next to each other with the one-row GB/s. candle's
//! product runs on the same blocks (it repacks some formats on its first call: see its mean
//! against its best). ROWS defaults to 1 (decode), ROUNDS to 30; threads: candle's count.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use phi_engine::qgemm::{Isa, PackedWeights};

/// Copies of the weights per variant.
const SLOTS: usize = 4;

fn format(name: &str) -> GgmlDType {
    match name {
        "q4_0" => GgmlDType::Q4_0,
        "q8_0" => GgmlDType::Q8_0,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        other => panic!("unknown format {other} (q4_0, q8_0, q4_k, q5_k, q6_k)"),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let m: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let rounds: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(30).max(3);
    let formats: Vec<GgmlDType> = args
        .get(2)
        .map_or("q4_0,q8_0,q4_k,q5_k,q6_k", String::as_str)
        .split(',')
        .map(format)
        .collect();
    let (n, k) = (16384usize, 3072usize);
    let threads = candle_core::utils::get_num_threads();
    let isas = Isa::available();
    anyhow::ensure!(!isas.is_empty(), "qgemm needs AVX2, FMA and F16C");
    println!(
        "[{n}, {k}] x {m} rows, {threads} threads, {rounds} rounds (the first 2 not in the mean)"
    );
    let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu)?;
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let names: Vec<String> =
        isas.iter().map(|i| format!("{i:?}")).chain(["candle".to_string()]).collect();
    for d in formats {
        let q = QTensor::quantize(&w, d)?;
        let bytes = q.data()?.into_owned();
        let packed: Vec<PackedWeights> = (0..isas.len() * SLOTS)
            .map(|i| PackedWeights::new_for(isas[i / SLOTS], d, &bytes, n, k))
            .collect();
        let candle: Vec<QMatMul> = (0..SLOTS)
            .map(|_| {
                let s = QStorage::from_data(bytes.clone().into(), &Device::Cpu, d)?;
                QMatMul::from_arc(Arc::new(QTensor::new(s, q.shape().clone())?))
            })
            .collect::<candle_core::Result<_>>()?;
        let variants = isas.len() + 1;
        let (mut total, mut best) = (vec![0f64; variants], vec![f64::MAX; variants]);
        for r in 0..rounds {
            let slot = r % SLOTS;
            for j in 0..variants {
                let v = (j + r) % variants;
                let start = Instant::now();
                if v < isas.len() {
                    std::hint::black_box(
                        packed[v * SLOTS + slot].matmul_with(isas[v], &xs, m, threads),
                    );
                } else {
                    std::hint::black_box(candle[slot].forward(&x)?);
                }
                let ms = start.elapsed().as_secs_f64() * 1e3;
                if r >= 2 {
                    total[v] += ms;
                }
                best[v] = best[v].min(ms);
            }
        }
        println!("{d:?} ({:.1} MB of blocks):", bytes.len() as f64 / 1e6);
        for v in 0..variants {
            let gbs = bytes.len() as f64 / 1e9 / (best[v] / 1e3);
            println!(
                "  {:<11} mean {:>8.3} ms  best {:>8.3} ms  ({gbs:.1} GB/s of blocks at the best)",
                names[v],
                total[v] / (rounds - 2) as f64,
                best[v]
            );
        }
    }
    Ok(())
}
