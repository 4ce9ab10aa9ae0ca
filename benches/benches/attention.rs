//! Decode attention over the paged KV cache: the CPU kernel that reads keys and values in place
//! from the pool's blocks (`phi_engine::paged_attention`), against the general path that gathers
//! them into contiguous tensors and runs candle's matmul / softmax / matmul (what prompt chunks
//! and the GPU do), on one layer of Phi-3-mini's shape (32 heads, head_dim 96).
//!
//! - `decode_attention/ctx_{256,1024,4000}/batch_{1,16}/{f32,f16}/{paged,gather}`: one new query
//!   per sequence against `ctx` cached positions, the cache in `f32` or `f16` (gather only for
//!   `f32`); throughput is the bytes of keys and values that attention has to read (GB/s), so
//!   the figures are comparable with `memory_bandwidth`.
//!
//! `cargo bench -p phi-serve-benches --bench attention`; `cargo test --benches` runs each
//! routine once on small shapes.

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, SamplingMode, Throughput};
use phi_engine::kv_cache::SequenceCache;
use phi_engine::kv_pool::{KvPool, PoolGeometry};
use phi_engine::paged_attention::{decode_attention, DecodeQuery, Heads};

const HEADS: usize = 32;
const HEAD_DIM: usize = 96;

/// Fills `batch` caches of `ctx` random positions from one pool, interleaving their blocks (as
/// sequences that grow together do).
fn caches(pool: &KvPool, batch: usize, ctx: usize) -> Vec<SequenceCache> {
    let mut caches: Vec<SequenceCache> =
        (0..batch).map(|_| SequenceCache::new(pool.clone())).collect();
    let step = 16;
    for start in (0..ctx).step_by(step) {
        let n = step.min(ctx - start);
        for c in &mut caches {
            c.reserve(start + n).unwrap();
            let kv = Tensor::randn(0f32, 1.0, (n, HEADS, HEAD_DIM), &Device::Cpu).unwrap();
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
    c.final_summary();
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
    let mut g = c.benchmark_group(format!("decode_attention/ctx_{ctx}/batch_{batch}/{name}"));
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let bytes = (batch * ctx * 2 * HEADS * HEAD_DIM * dtype.size_in_bytes()) as u64;
    g.throughput(Throughput::BytesDecimal(bytes));
    let (pk, pv) = pool.layer(0);
    let queries = || -> Vec<DecodeQuery> {
        caches
            .iter()
            .zip(&q)
            .map(|(c, q)| DecodeQuery { q: q.clone(), slots: c.slots(0, c.len()), mask: None })
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
