//! Decode attention over the paged KV cache: the CPU kernel that reads keys and values in place
//! from the pool's blocks (`phi_engine::paged_attention`), against the general path that gathers
//! them into contiguous tensors and runs candle's matmul / softmax / matmul (what prompt chunks
//! and the GPU do), on one layer of Phi-3-mini's shape (32 heads, head_dim 96).
//!
//! - `decode_attention/ctx_{256,1024,4000}/batch_{1,16}/{f32,f16}/{paged,gather}`: one new query
//!   per sequence against `ctx` cached positions, the cache in `f32` or `f16` (gather only for
//!   `f32`); throughput is the bytes of keys and values that attention has to read (GB/s), so
//!   the figures are comparable with `memory_bandwidth`.
//! - `sparse_decode/ctx_{2048,8192}/batch_{1,8}/{sparse,dense}`: the same kernel on one layer of
//!   Phi-3-small's shape (32 query heads over 8 key/value heads, head_dim 128, f16 cache), each
//!   head seeing only its block-sparse keys (64-token blocks, 16 local, every 8th beyond) or
//!   every key (a dense layer; what the sparse layers cost when they masked scores instead of
//!   skipping keys).
//! - `prompt_attention/chunk_512/keys_{1024,4096}/{tiled,one_pass}`: a 512-query prompt chunk
//!   at the end of a longer prompt (Phi-3-mini's shape, f32) through
//!   `phi_engine::span_attention` (query tiles of bounded scores, each over the keys it can see)
//!   against the same attention in one pass of `[heads, 512, keys]` scores with a causal mask.
//! - `sparse_prompt/chunk_512/keys_{2048,8192}/{sparse,dense}`: the same chunk in Phi-3-small's
//!   shape and layout (f32): each head over the blocks it sees, against every head over every
//!   causal key (a dense layer, and at least what the sparse layers cost when they masked).
//!
//! At the end of a full run the comparisons are timed again side by side (alternating, best
//! of 10) and printed with their ratios.
//!
//! `cargo bench -p phi-serve-benches --bench attention`; `cargo test --benches` runs each
//! routine once on small shapes.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use phi_engine::kv_cache::SequenceCache;
use phi_engine::kv_pool::{KvPool, PoolGeometry};
use phi_engine::paged_attention::{decode_attention, DecodeQuery, HeadKeys, Heads};
use phi_engine::phi3_small_config::BlockSparse;
use phi_engine::span_attention::SpanAttention;

const HEADS: usize = 32;
const HEAD_DIM: usize = 96;

/// Phi-3-small's attention shape and block-sparse layout.
const SMALL_KV_HEADS: usize = 8;
const SMALL_HEAD_DIM: usize = 128;
const SMALL_LAYOUT: BlockSparse =
    BlockSparse { block_size: 64, local_blocks: 16, vert_stride: 8, head_step: 1 };

/// Fills `batch` caches of `ctx` random positions from one pool, interleaving their blocks (as
/// sequences that grow together do).
fn caches(pool: &KvPool, batch: usize, ctx: usize) -> Vec<SequenceCache> {
    let (heads, hd) = (pool.n_kv_heads(), pool.head_dim());
    let mut caches: Vec<SequenceCache> =
        (0..batch).map(|_| SequenceCache::new(pool.clone())).collect();
    let step = 16;
    for start in (0..ctx).step_by(step) {
        let n = step.min(ctx - start);
        for c in &mut caches {
            c.reserve(start + n).unwrap();
            let kv = Tensor::randn(0f32, 1.0, (n, heads, hd), &Device::Cpu).unwrap();
            c.write(0, &kv, &kv).unwrap();
            c.advance(n);
        }
    }
    caches
}

/// The general path: gather, then `softmax(q k^T * scale) v` with candle.
fn gather_attention(caches: &[SequenceCache], queries: &[Tensor], scale: f64) -> Vec<Tensor> {
    caches
        .iter()
        .zip(queries)
        .map(|(c, q)| {
            let (k, v) = c.gather(0, 0, c.len(), DType::F32).unwrap();
            let s = (q.matmul(&k.transpose(1, 2).unwrap()).unwrap() * scale).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
            p.matmul(&v).unwrap()
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let full = has("--bench") && !has("--test") && !has("--list");
    let (contexts, batches): (&[usize], &[usize]) =
        if full { (&[256, 1024, 4000], &[1, 16]) } else { (&[40], &[2]) };
    let mut c = Criterion::default().configure_from_args();
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let heads =
        Heads { n_heads: HEADS, n_kv_heads: HEADS, head_dim: HEAD_DIM, scale: scale as f32 };
    for &ctx in contexts {
        for &batch in batches {
            for dtype in [DType::F32, DType::F16] {
                bench_one(&mut c, ctx, batch, dtype, heads, scale);
            }
        }
    }
    let (contexts, batches): (&[usize], &[usize]) =
        if full { (&[2048, 8192], &[1, 8]) } else { (&[1100], &[2]) };
    let mut lines = Vec::new();
    for &ctx in contexts {
        for &batch in batches {
            lines.push(bench_sparse(&mut c, ctx, batch, full));
        }
    }
    let (chunk, keys): (usize, &[usize]) = if full { (512, &[1024, 4096]) } else { (24, &[40]) };
    for &n_keys in keys {
        lines.push(bench_prompt(&mut c, chunk, n_keys, heads, full));
    }
    let keys: &[usize] = if full { &[2048, 8192] } else { &[70] };
    for &n_keys in keys {
        lines.push(bench_sparse_prompt(&mut c, chunk, n_keys, full));
    }
    c.final_summary();
    if full {
        println!("\nside by side (this run, alternating, best of 10):");
        println!("  memory read bandwidth (2 threads, best of 5): {:.1} GB/s", read_bandwidth());
        for l in lines {
            println!("  {l}");
        }
    }
}

/// The streaming read rate of 2 threads over 1 GiB, best of 5 (decimal GB/s): the ceiling of
/// a kernel that reads each cached key and value once.
fn read_bandwidth() -> f64 {
    let buf = vec![1.0f32; (1 << 30) / 4];
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            black_box(phi_serve_benches::parallel_sum(black_box(&buf), 2));
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (1u64 << 30) as f64 / best / 1e9
}

/// A group of 10 flat samples after a short warm-up, measured for `secs` seconds.
fn group(c: &mut Criterion, name: String, secs: u64) -> BenchmarkGroup<'_, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(secs));
    g
}

/// Best-of-`reps` times of `a` and `b`, run alternately so that both see the same machine.
fn side_by_side(reps: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let (mut ta, mut tb) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        let t = Instant::now();
        a();
        ta = ta.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        b();
        tb = tb.min(t.elapsed().as_secs_f64());
    }
    (ta, tb)
}

/// Decode attention of Phi-3-small's sparse layers: each head over its own keys, against
/// every head over every key. Returns the side-by-side line.
fn bench_sparse(c: &mut Criterion, ctx: usize, batch: usize, full: bool) -> String {
    let dtype = DType::F16;
    let geometry =
        PoolGeometry { num_layers: 1, n_kv_heads: SMALL_KV_HEADS, head_dim: SMALL_HEAD_DIM, dtype };
    let pool = KvPool::new(geometry, batch * (ctx + 16), 0, &Device::Cpu).unwrap();
    let caches = caches(&pool, batch, ctx);
    let scale = 1.0 / SMALL_HEAD_DIM as f32;
    let heads =
        Heads { n_heads: HEADS, n_kv_heads: SMALL_KV_HEADS, head_dim: SMALL_HEAD_DIM, scale };
    // The test layout at small shapes, so that the smoke run reaches past the local blocks.
    let layout = if full {
        SMALL_LAYOUT
    } else {
        BlockSparse { block_size: 16, local_blocks: 4, vert_stride: 8, head_step: 1 }
    };
    let runs: Arc<HeadKeys> =
        Arc::new((0..HEADS).map(|h| layout.visible_runs(h, ctx - 1)).collect());
    let seen: usize = runs.iter().flat_map(|r| r.iter().map(|r| r.len())).sum();
    let q: Vec<Vec<f32>> = (0..batch)
        .map(|_| Tensor::randn(0f32, 1.0, HEADS * SMALL_HEAD_DIM, &Device::Cpu).unwrap().to_vec1())
        .collect::<Result<_, _>>()
        .unwrap();
    let queries = |visible: Option<Arc<HeadKeys>>| -> Vec<DecodeQuery> {
        caches
            .iter()
            .zip(&q)
            .map(|(c, q)| DecodeQuery {
                q: q.clone(),
                slots: c.slots(0, c.len()),
                visible: visible.clone(),
            })
            .collect()
    };
    let (sparse, dense) = (queries(Some(runs.clone())), queries(None));
    let (pk, pv) = pool.layer(0);
    let mut g = group(c, format!("sparse_decode/ctx_{ctx}/batch_{batch}"), 2);
    g.bench_function("sparse", |b| {
        b.iter(|| black_box(decode_attention(pk, pv, &sparse, heads).unwrap()))
    });
    g.bench_function("dense", |b| {
        b.iter(|| black_box(decode_attention(pk, pv, &dense, heads).unwrap()))
    });
    g.finish();
    // The sparse kernel equals dense attention over each head's keys (checked here on the
    // first query and head 1, whose keys differ from head 0's).
    let got = decode_attention(pk, pv, &sparse, heads).unwrap();
    let head = 1;
    let only: Vec<u32> =
        runs[head].iter().flat_map(|r| sparse[0].slots[r.clone()].to_vec()).collect();
    let one = DecodeQuery { q: q[0].clone(), slots: only, visible: None };
    let want = decode_attention(pk, pv, &[one], heads).unwrap();
    let cols = head * SMALL_HEAD_DIM..(head + 1) * SMALL_HEAD_DIM;
    let diff = got[0][cols.clone()]
        .iter()
        .zip(&want[0][cols])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "sparse and dense-over-the-same-keys attention differ by {diff}");
    let reps = if full { 10 } else { 1 };
    let (ts, td) = side_by_side(
        reps,
        || drop(black_box(decode_attention(pk, pv, &sparse, heads).unwrap())),
        || drop(black_box(decode_attention(pk, pv, &dense, heads).unwrap())),
    );
    let kv_bytes =
        (batch * ctx * 2 * SMALL_KV_HEADS * SMALL_HEAD_DIM * dtype.size_in_bytes()) as f64;
    format!(
        "sparse_decode ctx {ctx:>5} batch {batch}: sparse {:8.3} ms, dense {:8.3} ms, {:.2}x \
         (heads see {:.0}% of the keys; dense reads the cache at {:.1} GB/s)",
        ts * 1e3,
        td * 1e3,
        td / ts,
        100.0 * seen as f64 / (HEADS * ctx) as f64,
        kv_bytes / td / 1e9
    )
}

/// A prompt chunk of Phi-3-small's sparse layers: its heads over their blocks, against a dense
/// layer's causal attention. Returns the side-by-side line.
fn bench_sparse_prompt(c: &mut Criterion, chunk: usize, n_keys: usize, full: bool) -> String {
    let dev = Device::Cpu;
    let hd = SMALL_HEAD_DIM;
    let heads =
        Heads { n_heads: HEADS, n_kv_heads: SMALL_KV_HEADS, head_dim: hd, scale: 1.0 / hd as f32 };
    let layout = if full {
        SMALL_LAYOUT
    } else {
        BlockSparse { block_size: 4, local_blocks: 2, vert_stride: 8, head_step: 1 }
    };
    let span = n_keys - chunk..n_keys;
    let q = Tensor::randn(0f32, 1.0, (chunk, HEADS, hd), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (SMALL_KV_HEADS, n_keys, hd), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (SMALL_KV_HEADS, n_keys, hd), &dev).unwrap();
    let plan = SpanAttention::new(&span, 0, None, HEADS, DType::F32, &dev).unwrap();
    let sparse = || plan.forward(&q, &k, &v, heads, Some(&layout)).unwrap();
    let dense = || plan.forward(&q, &k, &v, heads, None).unwrap();
    let mut g = group(c, format!("sparse_prompt/chunk_{chunk}/keys_{n_keys}"), 3);
    g.throughput(Throughput::Elements(chunk as u64));
    g.bench_function("sparse", |b| b.iter(|| black_box(sparse())));
    g.bench_function("dense", |b| b.iter(|| black_box(dense())));
    g.finish();
    let reps = if full { 10 } else { 1 };
    let (ts, td) = side_by_side(reps, || drop(black_box(sparse())), || drop(black_box(dense())));
    let seen: usize = span
        .clone()
        .flat_map(|p| (0..HEADS).map(move |h| (h, p)))
        .map(|(h, p)| layout.visible_runs(h, p).iter().map(|r| r.len()).sum::<usize>())
        .sum();
    let causal: usize = span.clone().map(|p| (p + 1) * HEADS).sum();
    format!(
        "sparse_prompt chunk {chunk} keys {n_keys:>5}: sparse {:8.3} ms, dense {:8.3} ms, {:.2}x \
         (heads see {:.0}% of the causal keys)",
        ts * 1e3,
        td * 1e3,
        td / ts,
        100.0 * seen as f64 / causal as f64
    )
}

/// A prompt chunk's attention through `SpanAttention` (tiled) against one pass over all
/// scores. Returns the side-by-side line.
fn bench_prompt(
    c: &mut Criterion,
    chunk: usize,
    n_keys: usize,
    heads: Heads,
    full: bool,
) -> String {
    let dev = Device::Cpu;
    let hd = heads.head_dim;
    let span = n_keys - chunk..n_keys;
    let q = Tensor::randn(0f32, 1.0, (chunk, HEADS, hd), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (HEADS, n_keys, hd), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (HEADS, n_keys, hd), &dev).unwrap();
    let plan = SpanAttention::new(&span, 0, None, HEADS, DType::F32, &dev).unwrap();
    let mask: Vec<f32> = span
        .clone()
        .flat_map(|p| (0..n_keys).map(move |k| if k <= p { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (chunk, n_keys), &dev).unwrap();
    let one_pass = || {
        let qh = q.transpose(0, 1).unwrap().contiguous().unwrap();
        let s = (qh.matmul(&k.t().unwrap()).unwrap() * heads.scale as f64).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s.broadcast_add(&mask).unwrap()).unwrap();
        let o = p.matmul(&v).unwrap();
        o.transpose(0, 1).unwrap().reshape((chunk, HEADS * hd)).unwrap()
    };
    let tiled = || plan.forward(&q, &k, &v, heads, None).unwrap();
    let mut g = group(c, format!("prompt_attention/chunk_{chunk}/keys_{n_keys}"), 3);
    g.throughput(Throughput::Elements(chunk as u64));
    g.bench_function("tiled", |b| b.iter(|| black_box(tiled())));
    g.bench_function("one_pass", |b| b.iter(|| black_box(one_pass())));
    g.finish();
    let diff = (tiled() - one_pass()).unwrap().abs().unwrap().max_all().unwrap();
    let diff: f32 = diff.to_scalar().unwrap();
    assert!(diff < 1e-4, "tiled and one-pass prompt attention differ by {diff}");
    let reps = if full { 10 } else { 1 };
    let (tt, to) = side_by_side(reps, || drop(black_box(tiled())), || drop(black_box(one_pass())));
    let peak = |rows: usize| (HEADS * rows * n_keys * 4) as f64 / (1 << 20) as f64;
    format!(
        "prompt_attention chunk {chunk} keys {n_keys:>5}: tiled {:8.3} ms, one pass {:8.3} ms, \
         {:.2}x (scores held: {:.0} MiB at most, against {:.0} MiB)",
        tt * 1e3,
        to * 1e3,
        to / tt,
        peak((phi_engine::span_attention::TILE_SCORES / (HEADS * n_keys)).clamp(1, chunk)),
        peak(chunk)
    )
}

fn bench_one(c: &mut Criterion, ctx: usize, batch: usize, dtype: DType, heads: Heads, scale: f64) {
    let geometry = PoolGeometry { num_layers: 1, n_kv_heads: HEADS, head_dim: HEAD_DIM, dtype };
    let pool = KvPool::new(geometry, batch * (ctx + 16), 0, &Device::Cpu).unwrap();
    let caches = caches(&pool, batch, ctx);
    let q: Vec<Vec<f32>> = (0..batch)
        .map(|_| Tensor::randn(0f32, 1.0, HEADS * HEAD_DIM, &Device::Cpu).unwrap().to_vec1())
        .collect::<Result<_, _>>()
        .unwrap();
    let q_tensors: Vec<Tensor> = q
        .iter()
        .map(|q| Tensor::from_vec(q.clone(), (HEADS, 1, HEAD_DIM), &Device::Cpu).unwrap())
        .collect();
    let name = if dtype == DType::F32 { "f32" } else { "f16" };
    let mut g = group(c, format!("decode_attention/ctx_{ctx}/batch_{batch}/{name}"), 2);
    let bytes = (batch * ctx * 2 * HEADS * HEAD_DIM * dtype.size_in_bytes()) as u64;
    g.throughput(Throughput::BytesDecimal(bytes));
    let (pk, pv) = pool.layer(0);
    let queries = || -> Vec<DecodeQuery> {
        caches
            .iter()
            .zip(&q)
            .map(|(c, q)| DecodeQuery { q: q.clone(), slots: c.slots(0, c.len()), visible: None })
            .collect()
    };
    g.bench_function("paged", |b| {
        b.iter(|| black_box(decode_attention(pk, pv, &queries(), heads).unwrap()))
    });
    if dtype == DType::F32 {
        g.bench_function("gather", |b| {
            b.iter(|| black_box(gather_attention(&caches, &q_tensors, scale)))
        });
    }
    g.finish();
    // Both paths give the same attention over the same cached values.
    let paged = decode_attention(pk, pv, &queries(), heads).unwrap();
    for (p, g) in paged.iter().zip(gather_attention(&caches, &q_tensors, scale)) {
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let diff = p.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "paged and gathered attention differ by {diff}");
    }
}
