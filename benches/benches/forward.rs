//! Prefill and decode speed of the Phi-3 forward pass on CPU (f32), next to the machine's
//! memory-read bandwidth, which bounds decode.
//!
//! `cargo bench -p phi-serve-benches` runs it on a ~438M-parameter random-weight Phi-3 (written
//! once to `target/bench-models/`); `cargo test --benches` runs every benchmark once on a tiny
//! model as a smoke test. See `benches/README.md` for how to read the figures.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use candle_core::{DType, Device};
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use phi_engine::kv_cache::SequenceCache;
use phi_engine::phi3::{BatchItem, Phi3};
use phi_serve_benches::{
    criterion_dir, load_bench_model, parallel_sum, prompt_tokens, BenchModelSpec,
};

/// Sizes of one run: the real ones under `cargo bench`, tiny ones for `cargo test --benches`.
struct Plan {
    spec: BenchModelSpec,
    prefill_lens: Vec<usize>,
    /// Tokens already in the cache when the measured decode step runs.
    decode_context: usize,
    decode_batches: Vec<usize>,
    /// Bytes of the buffer the bandwidth benchmark sums.
    bandwidth_bytes: usize,
}

impl Plan {
    fn new(full: bool) -> Self {
        if full {
            Plan {
                spec: BenchModelSpec::phi3_438m(),
                prefill_lens: vec![128, 512],
                decode_context: 128,
                decode_batches: vec![1, 4, 16],
                // Larger than the 1.56 GB of weights a decode step reads, so no cache helps.
                bandwidth_bytes: 2 << 30,
            }
        } else {
            Plan {
                spec: BenchModelSpec::tiny(),
                prefill_lens: vec![16],
                decode_context: 16,
                decode_batches: vec![1, 4],
                bandwidth_bytes: 16 << 20,
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    // criterion benchmarks only under `--bench` (what `cargo bench` passes); otherwise it runs
    // each routine once as a test, and the tiny model keeps that quick.
    let full = has("--bench") && !has("--test") && !has("--list");
    let plan = Plan::new(full);
    let started = SystemTime::now();

    let device = Device::Cpu;
    let model = load_bench_model(&plan.spec, DType::F32, &device).expect("bench model");
    let decode_bytes = (plan.spec.decode_parameters() * DType::F32.size_in_bytes()) as u64;
    eprintln!(
        "f32 on CPU, {} threads; a decode step reads {:.3} GB of f32 weights (lm_head included, \
         embedding excluded)",
        candle_core::utils::get_num_threads(),
        decode_bytes as f64 / 1e9
    );

    let mut c = Criterion::default().configure_from_args();
    prefill(&mut c, &model, &plan);
    decode(&mut c, &model, &plan, decode_bytes);
    drop(model);
    memory_bandwidth(&mut c, &plan);
    c.final_summary();
    if full {
        summary(&plan, decode_bytes, started);
    }
}

fn slow_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    samples: usize,
    measure_s: u64,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    // Flat sampling: every sample runs the same number of iterations, which suits routines of
    // tens of milliseconds to seconds.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(samples)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(measure_s));
    g
}

/// A prompt of `n` tokens through an empty cache: logits of the last position only, as when
/// serving a request.
fn prefill(c: &mut Criterion, model: &Phi3, plan: &Plan) {
    let max = plan.prefill_lens.iter().copied().max().unwrap_or(0);
    let tokens = prompt_tokens(max, 1);
    let mut g = slow_group(c, "prefill", 10, 10);
    for &n in &plan.prefill_lens {
        g.throughput(Throughput::Elements(n as u64));
        // Longer prompts get proportionally more time for their 10 samples.
        g.measurement_time(Duration::from_secs((13 * n / 128).max(13) as u64));
        g.bench_function(format!("{n}_tokens"), |b| {
            b.iter(|| {
                let mut cache = model.new_cache().unwrap();
                let out = model
                    .forward(&mut [BatchItem {
                        tokens: &tokens[..n],
                        cache: &mut cache,
                        max_new_tokens: None,
                        all_logits: false,
                    }])
                    .expect("prefill");
                black_box(out.logits)
            })
        });
    }
    g.finish();
}

/// One decode step of `batch` sequences, each with `decode_context` tokens cached. The caches
/// are filled once; every iteration rolls them back with `truncate` and recomputes the same step.
fn decode(c: &mut Criterion, model: &Phi3, plan: &Plan, decode_bytes: u64) {
    let ctx = plan.decode_context;
    let max_batch = plan.decode_batches.iter().copied().max().unwrap_or(1);
    let mut seqs: Vec<(Vec<u32>, SequenceCache)> = (0..max_batch)
        .map(|i| (prompt_tokens(ctx + 1, 100 + i as u64), model.new_cache().unwrap()))
        .collect();
    let t = std::time::Instant::now();
    {
        let mut items: Vec<BatchItem> = seqs
            .iter_mut()
            .map(|(tokens, cache)| BatchItem {
                tokens: &tokens[..ctx],
                cache,
                max_new_tokens: None,
                all_logits: false,
            })
            .collect();
        let out = model.forward(&mut items).expect("filling the decode caches");
        let sum: f32 = out.logits.sum_all().and_then(|s| s.to_scalar()).expect("logits");
        assert!(sum.is_finite(), "random weights gave non-finite logits");
    }
    eprintln!(
        "decode: prefilled {max_batch} sequences of {ctx} tokens in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let mut g = slow_group(c, "decode", 10, 8);
    for &batch in &plan.decode_batches {
        g.throughput(if batch == 1 {
            Throughput::BytesDecimal(decode_bytes)
        } else {
            Throughput::Elements(batch as u64)
        });
        g.bench_function(format!("batch_{batch}"), |b| {
            b.iter(|| {
                let mut items: Vec<BatchItem> = seqs[..batch]
                    .iter_mut()
                    .map(|(tokens, cache)| {
                        cache.truncate(ctx);
                        BatchItem { tokens, cache, max_new_tokens: None, all_logits: false }
                    })
                    .collect();
                black_box(model.forward(&mut items).expect("decode step").logits)
            })
        });
    }
    g.finish();
}

/// Streaming read of a buffer larger than the weights, on 1 and 2 threads: the roofline for
/// decode, measured in the same run and the same units.
fn memory_bandwidth(c: &mut Criterion, plan: &Plan) {
    let buf = vec![1.0f32; plan.bandwidth_bytes / 4];
    let mut g = slow_group(c, "memory_bandwidth", 20, 5);
    g.throughput(Throughput::BytesDecimal(plan.bandwidth_bytes as u64));
    for threads in [1usize, 2] {
        let name =
            if threads == 1 { "read_1_thread".into() } else { format!("read_{threads}_threads") };
        g.bench_function(name, |b| b.iter(|| black_box(parallel_sum(black_box(&buf), threads))));
    }
    g.finish();
}

/// Criterion's typical time per iteration (slope, else mean) in seconds, if the benchmark ran in
/// this invocation.
fn seconds(group: &str, bench: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_dir().join(group).join(bench).join("new").join("estimates.json");
    let fresh = std::fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|t| t >= since);
    if !fresh {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
    let est = |k: &str| v.get(k)?.get("point_estimate")?.as_f64();
    Some(est("slope").or_else(|| est("mean"))? * 1e-9)
}

fn summary(plan: &Plan, decode_bytes: u64, since: SystemTime) {
    let s = &plan.spec;
    println!();
    println!("==== forward benchmarks: how to read the figures ====");
    println!(
        "model {}: {:.1}M parameters (hidden {}, intermediate {}, {} layers, {} heads x {}), \
         f32 on \
         CPU; one decode step reads {:.3} GB of weights",
        s.name,
        s.num_parameters() as f64 / 1e6,
        s.hidden_size,
        s.intermediate_size,
        s.num_hidden_layers,
        s.num_attention_heads,
        s.head_dim(),
        decode_bytes as f64 / 1e9,
    );
    for &n in &plan.prefill_lens {
        if let Some(t) = seconds("prefill", &format!("{n}_tokens"), since) {
            println!(
                "prefill {n:>4} tokens : {:8.1} ms  = {:7.1} tokens/s, {:5.1} GFLOP/s in the \
                 matrix \
                 products",
                t * 1e3,
                n as f64 / t,
                2.0 * (s.decode_parameters() * n) as f64 / t / 1e9
            );
        }
    }
    let b1 = seconds("decode", "batch_1", since);
    for &b in &plan.decode_batches {
        if let Some(t) = seconds("decode", &format!("batch_{b}"), since) {
            let speedup =
                b1.map(|t1| format!(" ({:.1}x batch_1)", b as f64 * t1 / t)).unwrap_or_default();
            println!(
                "decode batch {b:>2} @ctx {}: {:8.1} ms/step = {:7.1} tokens/s, {:5.1} GB/s of \
                 weights{speedup}",
                plan.decode_context,
                t * 1e3,
                b as f64 / t,
                decode_bytes as f64 / t / 1e9
            );
        }
    }
    let bw = |name: &str| {
        seconds("memory_bandwidth", name, since).map(|t| plan.bandwidth_bytes as f64 / t / 1e9)
    };
    let (bw1, bw2) = (bw("read_1_thread"), bw("read_2_threads"));
    if let Some(g) = bw1 {
        println!("memory read, 1 thread : {g:5.1} GB/s");
    }
    if let Some(g) = bw2 {
        println!("memory read, 2 threads: {g:5.1} GB/s  (the roofline)");
    }
    if let (Some(t), Some(roof)) = (b1, bw2.or(bw1)) {
        let achieved = decode_bytes as f64 / t / 1e9;
        println!(
            "decode / roofline = {achieved:.1} / {roof:.1} GB/s = {:.0}% of the memory-bandwidth \
             ceiling; at the ceiling a step would take {:.1} ms ({:.1} tokens/s)",
            100.0 * achieved / roof,
            decode_bytes as f64 / roof / 1e6,
            roof * 1e9 / decode_bytes as f64
        );
    }
    println!(
        "A batch-1 decode step must read every weight once, so its time is bounded below by \
         weight bytes / read bandwidth: decode GB/s divided by memory_bandwidth GB/s (2 threads, \
         as the engine uses) is the fraction of that roofline reached. Batched decode reads the \
         weights once for all sequences, so tokens/s should grow almost linearly with the batch \
         until compute, not memory, is the limit. Prefill is compute-bound: judge it by its \
         GFLOP/s (2 per weight per token, attention excluded) against what the cores can do, not \
         by bandwidth."
    );
}
