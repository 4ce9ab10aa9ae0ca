//! What sampling costs the host per decode step: a batch of Phi-3-sized logits rows (32064
//! tokens) through `Sampler::sample`, with and without logprobs, one row after another and
//! spread over the machine's threads, side by side in one process.
//!
//! ```text
//! cargo run --release -p phi-serve-benches --example sampling_step -- [ROWS] [ROUNDS]
//! cargo run --release -p phi-serve-benches --example sampling_step -- 64 20
//! ```
//!
//! Exists because on a GPU a decode step of many streams is a few milliseconds, and the host
//! samples every stream's row before the next step can start: the per-step figure printed here
//! is time the accelerator waits. "with logprobs" is what every request paid before the raw
//! logprob was computed only when asked for. ROWS defaults to 64, ROUNDS to 20.

use std::time::Instant;

use phi_engine::sampling::{Sampler, SamplingParams};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Phi-3's vocabulary (the embedding's rows).
const VOCAB: usize = 32064;

/// Logits shaped like a language model's: mostly low, a few likely tokens.
fn logits(rows: usize) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    (0..rows)
        .map(|_| {
            (0..VOCAB)
                .map(|_| {
                    let u = rng.next_u32() as f32 / u32::MAX as f32;
                    if u > 0.9995 {
                        8.0 + 8.0 * u
                    } else {
                        6.0 * u - 3.0
                    }
                })
                .collect()
        })
        .collect()
}

/// Mean milliseconds per step of sampling every row once, over `rounds` steps.
fn time_step(params: &SamplingParams, rows: &[Vec<f32>], rounds: usize, threads: usize) -> f64 {
    let mut samplers: Vec<Sampler> =
        rows.iter().map(|_| Sampler::new(params.clone()).expect("valid parameters")).collect();
    let generated = [1u32, 2, 3];
    let chunk = rows.len().div_ceil(threads.max(1));
    let started = Instant::now();
    for _ in 0..rounds {
        std::thread::scope(|s| {
            for (samplers, rows) in samplers.chunks_mut(chunk).zip(rows.chunks(chunk)) {
                s.spawn(move || {
                    for (sampler, row) in samplers.iter_mut().zip(rows) {
                        std::hint::black_box(sampler.sample(row, &generated).expect("sampled"));
                    }
                });
            }
        });
    }
    started.elapsed().as_secs_f64() * 1e3 / rounds as f64
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(64).max(1);
    let rounds: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(20).max(1);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows = logits(n);
    let greedy = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    let nucleus = SamplingParams { temperature: 0.7, top_p: 0.9, seed: Some(1), ..greedy.clone() };
    println!("{n} rows of {VOCAB} logits a step, {rounds} steps, {threads} threads");
    println!("{:<18} {:>16} {:>16} {:>16}", "", "logprobs, 1 thr", "none, 1 thr", "none, all thr");
    for (name, params) in [("greedy", greedy), ("top_p 0.9 t 0.7", nucleus)] {
        let with = SamplingParams { logprobs: true, ..params.clone() };
        let before = time_step(&with, &rows, rounds, 1);
        let serial = time_step(&params, &rows, rounds, 1);
        let parallel = time_step(&params, &rows, rounds, threads);
        println!(
            "{name:<18} {before:>13.2} ms {serial:>13.2} ms {parallel:>13.2} ms   {:.1}x, {:.1}x",
            before / serial,
            before / parallel
        );
    }
    Ok(())
}
