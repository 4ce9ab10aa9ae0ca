//! Quantized CPU kernels and quantized decode steps, next to the machine's memory-read
//! bandwidth, which bounds both.
//!
//! - `qmatvec/{format}`: one row times a Phi-3-mini `gate_up_proj`-shaped matrix
//!   (`[16384, 3072]`), what a decode step does per matrix, through candle's kernels. The
//!   weights of one iteration are spread over copies totalling more than 1 GB, so no cache
//!   holds them; throughput is the bytes of blocks read (GB/s).
//! - `qmatvec/{format}/packed`: the same through `phi_engine::qgemm`'s repacked weights, the
//!   path the engine takes for the formats it has a kernel for (compare with
//!   `memory_bandwidth`).
//! - `quantized_decode/{format}`: one decode token of the 438M-parameter bench model (context
//!   128), quantized at load as `--quantize` does; throughput is the bytes of weights a step
//!   reads (GB/s).
//! - `prompt_matmul/{format}/rows_{1,4,128}/{candle,packed}`: rows through that matrix (a
//!   decode step, a small batch, a prompt chunk), candle's product against
//!   `phi_engine::qgemm`'s kernel over repacked weights (rows/s). At the end of a run that
//!   includes these groups, a table prints the ratios side by side, and GB/s of the packed
//!   one-row product next to the measured bandwidth.
//! - `quantized_prefill/{format}`: a 128-token prompt through the same models (tokens/s).
//! - `dispatch/*`: the cost of splitting one product over threads (qgemm's pool against a
//!   spawned thread).
//! - `memory_bandwidth/read_2_threads`: the streaming-read ceiling, in the same run and units.
//!
//! `cargo bench -p phi-serve-benches --bench quantized`; `cargo test --benches` runs each
//! routine once on small shapes as a smoke test.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use phi_engine::checkpoint::ModelSource;
use phi_engine::phi3::{BatchItem, Phi3};
use phi_engine::qgemm::PackedWeights;
use phi_engine::quantize::QuantScheme;
use phi_serve_benches::{ensure_bench_model, parallel_sum, prompt_tokens, BenchModelSpec};

/// The formats measured, as `--quantize` names them (f32 is the dense baseline).
const FORMATS: &[&str] = &["f32", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0"];

/// The formats `prompt_matmul` measures, candle's product against `phi_engine::qgemm`'s (where
/// the CPU and the kernel list allow), one matrix at a time.
const PACKED_FORMATS: &[&str] = &["q4_0", "q8_0", "q4_k", "q5_k", "q6_k"];

struct Plan {
    rows: usize,
    cols: usize,
    /// Copies of the matrix are made until their blocks total at least this many bytes.
    spread_bytes: usize,
    spec: BenchModelSpec,
    context: usize,
    prefill: usize,
    bandwidth_bytes: usize,
}

impl Plan {
    fn new(full: bool) -> Self {
        if full {
            Plan {
                rows: 16384,
                cols: 3072,
                spread_bytes: 1 << 30,
                spec: BenchModelSpec::phi3_438m(),
                context: 128,
                prefill: 128,
                bandwidth_bytes: 2 << 30,
            }
        } else {
            Plan {
                rows: 512,
                cols: 256,
                spread_bytes: 1 << 20,
                spec: BenchModelSpec::tiny(),
                context: 16,
                prefill: 16,
                bandwidth_bytes: 16 << 20,
            }
        }
    }
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    measure_s: u64,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(measure_s));
    g
}

fn ggml(format: &str) -> GgmlDType {
    match QuantScheme::parse(format).expect("format name") {
        QuantScheme::Uniform(d) => d,
        other => panic!("{other:?} is a mix, not one format"),
    }
}

/// Copies of one quantized matrix in distinct buffers (copying blocks is much faster than
/// quantizing each copy).
fn spread(q: &QTensor, min_bytes: usize) -> Vec<QMatMul> {
    let bytes = q.data().expect("blocks").into_owned();
    let copies = min_bytes.div_ceil(bytes.len()).max(1);
    (0..copies)
        .map(|_| {
            let storage = QStorage::from_data(bytes.clone().into(), &Device::Cpu, q.dtype())
                .expect("copy of blocks");
            let t = QTensor::new(storage, q.shape().clone()).expect("copy");
            QMatMul::from_arc(Arc::new(t)).expect("matmul")
        })
        .collect()
}

fn qmatvec(c: &mut Criterion, plan: &Plan) {
    let w = Tensor::randn(0f32, 0.02, (plan.rows, plan.cols), &Device::Cpu).expect("weights");
    let x = Tensor::randn(0f32, 1.0, (1, plan.cols), &Device::Cpu).expect("row");
    let mut g = group(c, "qmatvec", 5);
    for &format in FORMATS {
        let d = ggml(format);
        let q = QTensor::quantize(&w, d).expect("quantize");
        let per_matrix =
            if d == GgmlDType::F32 { plan.rows * plan.cols * 4 } else { q.storage_size_in_bytes() };
        // f32 runs as a dense candle matmul, the path unquantized models take.
        let dense: Vec<Tensor>;
        let quant: Vec<QMatMul>;
        if d == GgmlDType::F32 {
            let n = plan.spread_bytes.div_ceil(per_matrix).max(1);
            dense = (0..n).map(|_| w.copy().expect("copy").t().expect("t")).collect();
            quant = Vec::new();
        } else {
            dense = Vec::new();
            quant = spread(&q, plan.spread_bytes);
        }
        g.throughput(Throughput::BytesDecimal(per_matrix as u64));
        let mut i = 0usize;
        g.bench_function(format, |b| {
            b.iter(|| {
                i += 1;
                if d == GgmlDType::F32 {
                    black_box(x.matmul(&dense[i % dense.len()]).expect("matmul"))
                } else {
                    black_box(quant[i % quant.len()].forward(&x).expect("qmatmul"))
                }
            })
        });
        drop(quant);
        if phi_engine::qgemm::supported(d) {
            let blocks = q.data().expect("blocks");
            let copies = plan.spread_bytes.div_ceil(blocks.len()).max(1);
            let packed: Vec<PackedWeights> =
                (0..copies).map(|_| PackedWeights::new(d, &blocks, plan.rows, plan.cols)).collect();
            let xs: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).expect("row");
            let threads = candle_core::utils::get_num_threads();
            let name = format!("{format}/packed");
            g.bench_function(&name, |b| {
                b.iter(|| {
                    i += 1;
                    black_box(packed[i % packed.len()].matmul(&xs, 1, threads))
                })
            });
        }
    }
    g.finish();
}

/// 1, 4 and 128 rows through one matrix: candle's quantized product against
/// `phi_engine::qgemm` over the same blocks repacked (throughput: rows per second).
fn prompt_matmul(c: &mut Criterion, plan: &Plan) {
    let big = if plan.rows > 1024 { 128 } else { 8 };
    let w = Tensor::randn(0f32, 0.02, (plan.rows, plan.cols), &Device::Cpu).expect("weights");
    let threads = candle_core::utils::get_num_threads();
    let mut g = group(c, "prompt_matmul", 5);
    for m in [1, 4, big] {
        let x = Tensor::randn(0f32, 1.0, (m, plan.cols), &Device::Cpu).expect("rows");
        let xs: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).expect("rows");
        g.throughput(Throughput::Elements(m as u64));
        for &format in PACKED_FORMATS {
            let d = ggml(format);
            let q = Arc::new(QTensor::quantize(&w, d).expect("quantize"));
            let mm = QMatMul::from_arc(q.clone()).expect("matmul");
            g.bench_function(format!("{format}/rows_{m}/candle"), |b| {
                b.iter(|| black_box(mm.forward(&x).expect("qmatmul")))
            });
            if phi_engine::qgemm::supported(d) {
                let packed =
                    PackedWeights::new(d, &q.data().expect("blocks"), plan.rows, plan.cols);
                g.bench_function(format!("{format}/rows_{m}/packed"), |b| {
                    b.iter(|| black_box(packed.matmul(&xs, m, threads)))
                });
            }
        }
    }
    g.finish();
}

/// What splitting one product across threads costs: a one-row product small enough that the
/// dispatch dominates (`[64, 3072]` Q4_0), on 1 and 2 threads of qgemm's persistent pool,
/// next to spawning and joining one scoped thread (what each product paid before the pool).
fn dispatch(c: &mut Criterion) {
    let w = Tensor::randn(0f32, 0.02, (64, 3072), &Device::Cpu).expect("weights");
    let q = QTensor::quantize(&w, GgmlDType::Q4_0).expect("quantize");
    if !phi_engine::qgemm::supported(GgmlDType::Q4_0) {
        return;
    }
    let packed = PackedWeights::new(GgmlDType::Q4_0, &q.data().expect("blocks"), 64, 3072);
    let xs = vec![0.5f32; 3072];
    let mut g = group(c, "dispatch", 3);
    for threads in [1, 2] {
        g.bench_function(format!("packed_64x3072/threads_{threads}"), |b| {
            b.iter(|| black_box(packed.matmul(&xs, 1, threads)))
        });
    }
    g.bench_function("spawn_scoped_thread", |b| {
        b.iter(|| std::thread::scope(|s| black_box(s.spawn(|| black_box(1)).join())))
    });
    g.finish();
}

fn models(c: &mut Criterion, plan: &Plan) {
    let dir = ensure_bench_model(&plan.spec).expect("bench model");
    let files = ModelSource::parse(dir.to_str().expect("utf-8"), None)
        .and_then(|s| s.resolve())
        .expect("files");
    let tokens = prompt_tokens(plan.context.max(plan.prefill) + 1, 7);
    let mut loaded = Vec::new();
    for &format in FORMATS {
        let scheme = (format != "f32").then(|| QuantScheme::parse(format).expect("format"));
        let model = Phi3::from_checkpoint_quantized(&files, DType::F32, &Device::Cpu, scheme)
            .expect("load");
        let bytes = decode_bytes(&plan.spec, ggml(format));
        loaded.push((format, model, bytes));
    }
    let mut g = group(c, "quantized_decode", 8);
    for (format, model, bytes) in &loaded {
        let mut cache = model.new_cache().unwrap();
        let item = BatchItem {
            tokens: &tokens[..plan.context],
            cache: &mut cache,
            max_new_tokens: None,
            all_logits: false,
        };
        model.forward(&mut [item]).expect("context");
        g.throughput(Throughput::BytesDecimal(*bytes));
        g.bench_function(*format, |b| {
            b.iter(|| {
                cache.truncate(plan.context);
                let item = BatchItem {
                    tokens: &tokens[..plan.context + 1],
                    cache: &mut cache,
                    max_new_tokens: None,
                    all_logits: false,
                };
                black_box(model.forward(&mut [item]).expect("decode").logits)
            })
        });
    }
    g.finish();
    let mut g = group(c, "quantized_prefill", 10);
    g.throughput(Throughput::Elements(plan.prefill as u64));
    for (format, model, _) in &loaded {
        g.bench_function(*format, |b| {
            b.iter(|| {
                let mut cache = model.new_cache().unwrap();
                let item = BatchItem {
                    tokens: &tokens[..plan.prefill],
                    cache: &mut cache,
                    max_new_tokens: None,
                    all_logits: false,
                };
                black_box(model.forward(&mut [item]).expect("prefill").logits)
            })
        });
    }
    g.finish();
}

/// Bytes of weights one decode step reads in `format`: every matrix in its blocks (the
/// embedding's one row aside), norms in f32. `lm_head` gets the same format here (the bench
/// quantizes uniformly, with llama.cpp's Q6_K rule for it only under 2-5 bit formats).
fn decode_bytes(spec: &BenchModelSpec, d: GgmlDType) -> u64 {
    let per_value = |d: GgmlDType| d.type_size() as f64 / d.block_size() as f64;
    let matrices = spec.decode_parameters() as f64;
    let head = match d {
        GgmlDType::F32 | GgmlDType::Q8_0 | GgmlDType::Q6K => d,
        _ => GgmlDType::Q6K,
    };
    let vocab_hidden = (spec.tensors().iter())
        .find(|(n, _)| n == "lm_head.weight")
        .map(|(_, s)| (s[0] * s[1]) as f64)
        .unwrap_or(0.0);
    ((matrices - vocab_hidden) * per_value(d) + vocab_hidden * per_value(head)) as u64
}

fn memory_bandwidth(c: &mut Criterion, plan: &Plan) {
    let buf = vec![1.0f32; plan.bandwidth_bytes / 4];
    let mut g = group(c, "memory_bandwidth", 5);
    g.throughput(Throughput::BytesDecimal(plan.bandwidth_bytes as u64));
    g.bench_function("read_2_threads", |b| b.iter(|| black_box(parallel_sum(black_box(&buf), 2))));
    g.finish();
}

/// Criterion's mean time (ns) of `group/id` from this run (estimates written since `since`).
fn mean_ns(group: &str, id: &str, since: std::time::SystemTime) -> Option<f64> {
    let home = std::env::var_os("CRITERION_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|t| std::path::Path::new(&t).join("criterion"))
        })
        .unwrap_or_else(|| std::path::PathBuf::from("target/criterion"));
    let file = home.join(group).join(id.replace('/', "_")).join("new/estimates.json");
    if std::fs::metadata(&file).and_then(|m| m.modified()).ok()? < since {
        return None;
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

/// The figures of this run side by side: candle against the packed kernel per row count, and
/// the packed one-row product's read rate against the bandwidth.
fn summary(plan: &Plan, since: std::time::SystemTime) {
    let mut lines = Vec::new();
    for &format in PACKED_FORMATS {
        for m in [1, 4, 128] {
            let t =
                |kind: &str| mean_ns("prompt_matmul", &format!("{format}/rows_{m}/{kind}"), since);
            if let (Some(c), Some(p)) = (t("candle"), t("packed")) {
                lines.push(format!(
                    "prompt_matmul {format} rows {m:>3}: candle {:>9.3} ms, packed {:>9.3} ms, {:.2}x",
                    c / 1e6,
                    p / 1e6,
                    c / p
                ));
            }
        }
    }
    let bw = mean_ns("memory_bandwidth", "read_2_threads", since)
        .map(|ns| plan.bandwidth_bytes as f64 / ns);
    for &format in PACKED_FORMATS {
        let d = ggml(format);
        let bytes = (plan.rows * plan.cols / d.block_size() * d.type_size()) as f64;
        let rate = |id: &str| mean_ns("qmatvec", id, since).map(|ns| bytes / ns);
        if let Some(p) = rate(&format!("{format}/packed")) {
            let mut line = format!("qmatvec {format}: packed {p:.1} GB/s");
            if let Some(c) = rate(format) {
                line += &format!(", candle {c:.1} GB/s ({:.2}x)", p / c);
            }
            if let Some(bw) = bw {
                line += &format!(", {:.0}% of the {bw:.1} GB/s read bandwidth", 100.0 * p / bw);
            }
            lines.push(line);
        }
    }
    let d = |id: &str| mean_ns("dispatch", id, since);
    if let (Some(t1), Some(t2), Some(sp)) =
        (d("packed_64x3072/threads_1"), d("packed_64x3072/threads_2"), d("spawn_scoped_thread"))
    {
        lines.push(format!(
            "dispatch: [64, 3072] Q4_0 one row {:.1} us on 1 thread, {:.1} us on 2 (pool); \
             spawning one thread {:.1} us",
            t1 / 1e3,
            t2 / 1e3,
            sp / 1e3
        ));
    }
    if !lines.is_empty() {
        println!("\nside by side (this run):");
        for l in lines {
            println!("  {l}");
        }
    }
}

fn main() {
    let since = std::time::SystemTime::now();
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let full = has("--bench") && !has("--test") && !has("--list");
    let plan = Plan::new(full);
    let mut c = Criterion::default().configure_from_args();
    qmatvec(&mut c, &plan);
    prompt_matmul(&mut c, &plan);
    dispatch(&mut c);
    models(&mut c, &plan);
    memory_bandwidth(&mut c, &plan);
    c.final_summary();
    summary(&plan, since);
}
