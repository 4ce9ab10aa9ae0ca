//! Ad-hoc timings behind the numbers in `benches/README.md` (also handy under `perf record`):
//!
//! ```text
//! cargo run --release -p phi-serve-benches --example profile_forward -- MODE
//! ```
//! MODE: `matmul` (candle `Linear` at batch 1/4/16/128 for the bench model's weight shapes),
//! `split` (batch-1 `Linear` vs the same product split by output rows over 2 threads), `bw`
//! (the bandwidth sum), `vcopy` (the attention's copy of the cached values), `decode [B..]`
//! (whole decode steps of the bench model).
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use phi_engine::phi3::BatchItem;
use phi_serve_benches::{load_bench_model, prompt_tokens, BenchModelSpec};

fn time<T>(label: &str, reps: usize, mut f: impl FnMut() -> T) {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    println!("{label:40} {:9.3} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
}

fn main() -> anyhow::Result<()> {
    let what = std::env::args().nth(1).unwrap_or_default();
    let dev = Device::Cpu;
    if what == "matmul" || what.is_empty() {
        for (out, inp) in [(4608usize, 1536usize), (8192, 1536), (1536, 4096), (32064, 1536)] {
            let w = Tensor::randn(0f32, 0.02, (out, inp), &dev)?;
            let lin = candle_nn::Linear::new(w.clone(), None);
            let gb = (out * inp * 4) as f64 / 1e9;
            for m in [1usize, 4, 16, 128] {
                let x = Tensor::randn(0f32, 1.0, (m, inp), &dev)?;
                let t = Instant::now();
                let reps = 20;
                for _ in 0..reps {
                    std::hint::black_box(lin.forward(&x)?);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "linear [{m:3},{inp}] x [{out},{inp}]^T: {:8.3} ms {:6.1} GB/s {:6.1} GFLOP/s",
                    s * 1e3,
                    gb / s,
                    2.0 * (m * out * inp) as f64 / s / 1e9
                );
            }
            // Same product with a contiguous transposed weight.
            let wt = w.t()?.contiguous()?;
            for m in [1usize, 4, 16] {
                let x = Tensor::randn(0f32, 1.0, (m, inp), &dev)?;
                let t = Instant::now();
                for _ in 0..20 {
                    std::hint::black_box(x.matmul(&wt)?);
                }
                let s = t.elapsed().as_secs_f64() / 20.0;
                println!(
                    "  matmul x[{m:3}] @ w^T contiguous: {:8.3} ms {:6.1} GB/s",
                    s * 1e3,
                    gb / s
                );
            }
        }
    }
    if what == "split" {
        // m=1: the weight's rows split in two halves, one matmul per thread.
        for (out, inp) in [(4608usize, 1536usize), (8192, 1536), (1536, 4096), (32064, 1536)] {
            let w = Tensor::randn(0f32, 0.02, (out, inp), &dev)?;
            let halves = [w.narrow(0, 0, out / 2)?, w.narrow(0, out / 2, out - out / 2)?];
            let x = Tensor::randn(0f32, 1.0, (1, inp), &dev)?;
            let gb = (out * inp * 4) as f64 / 1e9;
            for _ in 0..2 {
                let t = Instant::now();
                for _ in 0..20 {
                    std::hint::black_box(x.matmul(&w.t()?)?);
                }
                let one = t.elapsed().as_secs_f64() / 20.0;
                let t = Instant::now();
                for _ in 0..20 {
                    let parts: Vec<Tensor> = std::thread::scope(|s| {
                        let hs: Vec<_> = halves
                            .iter()
                            .map(|h| s.spawn(|| x.matmul(&h.t().unwrap()).unwrap()))
                            .collect();
                        hs.into_iter().map(|h| h.join().unwrap()).collect()
                    });
                    std::hint::black_box(Tensor::cat(&parts, 1)?);
                }
                let two = t.elapsed().as_secs_f64() / 20.0;
                println!(
                    "m=1 [{out},{inp}]: whole {:6.2} ms {:5.1} GB/s | 2 row halves on 2 threads \
                     {:6.2} ms {:5.1} GB/s",
                    one * 1e3,
                    gb / one,
                    two * 1e3,
                    gb / two
                );
            }
        }
    }
    if what == "bw" {
        let buf = vec![1.0f32; 512 << 20];
        for _ in 0..2 {
            time("sum_f32 1 thread (dispatching)", 10, || phi_serve_benches::sum_f32(&buf));
            time("portable-equivalent 1 thread", 10, || {
                let mut acc = [0f32; 32];
                for c in buf.chunks_exact(32) {
                    for (a, x) in acc.iter_mut().zip(c) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            });
        }
        for threads in [1, 2, 1, 2] {
            time(&format!("parallel_sum {threads} threads (2 GiB)"), 10, || {
                phi_serve_benches::parallel_sum(&buf, threads)
            });
        }
    }
    if what == "vcopy" {
        // The per-layer copy phi3.rs makes of the cached values before `probs.matmul(v)`.
        for ctx in [128usize, 1024, 2048] {
            let cache = Tensor::zeros((16, 2 * ctx, 96), DType::F32, &dev)?;
            let v = cache.narrow(1, 0, ctx + 1)?;
            time(&format!("v_all.contiguous() ctx {ctx}"), 50, || v.contiguous().unwrap());
            let probs = Tensor::zeros((16, 1, ctx + 1), DType::F32, &dev)?;
            time(&format!("probs.matmul(v strided) ctx {ctx}"), 50, || probs.matmul(&v));
            time(&format!("probs.matmul(v.contiguous()) ctx {ctx}"), 50, || {
                probs.matmul(&v.contiguous().unwrap()).unwrap()
            });
        }
    }
    if what == "decode" || what.is_empty() {
        let model = load_bench_model(&BenchModelSpec::phi3_438m(), DType::F32, &dev)?;
        let ctx = 128;
        let batches: Vec<usize> = std::env::args().skip(2).map(|a| a.parse().unwrap()).collect();
        let batches = if batches.is_empty() { vec![1, 4] } else { batches };
        let maxb = *batches.iter().max().unwrap();
        let mut seqs: Vec<_> = (0..maxb)
            .map(|i| (prompt_tokens(ctx + 1, 100 + i as u64), model.new_cache().unwrap()))
            .collect();
        {
            let mut items: Vec<BatchItem> = seqs
                .iter_mut()
                .map(|(t, c)| BatchItem {
                    tokens: &t[..ctx],
                    cache: c,
                    max_new_tokens: None,
                    all_logits: false,
                })
                .collect();
            model.forward(&mut items)?;
        }
        for b in batches {
            time(&format!("decode batch {b}"), 10, || {
                let mut items: Vec<BatchItem> = seqs[..b]
                    .iter_mut()
                    .map(|(t, c)| {
                        c.truncate(ctx);
                        BatchItem { tokens: t, cache: c, max_new_tokens: None, all_logits: false }
                    })
                    .collect();
                model.forward(&mut items).unwrap().logits
            });
        }
    }
    Ok(())
}
