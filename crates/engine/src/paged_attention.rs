//! Decode attention on the CPU that reads keys and values straight from the KV pool's blocks.
//!
//! Exists because a decode step's query attends to every cached position of its sequence, and
//! those positions are scattered over the pool's blocks: gathering them into one contiguous
//! tensor per layer and sequence (what the general path does for prompt chunks) would copy the
//! whole cache every step, as many bytes again as attention itself reads. Here each (sequence,
//! key/value head) pair is one task: the scores of the head's query group against every cached
//! key, a softmax, and the weighted sum of the values, all in `f32` as the reference computes
//! them. Tasks run on rayon's pool; the inner loops are compiled for AVX2 and FMA when the CPU
//! has them.

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// One decode query: the sequence's query heads for its newest position (`[n_heads *
/// head_dim]`) and the pool slots of the keys it attends to, oldest first.
#[derive(Debug)]
pub struct DecodeQuery {
    /// Query heads, after rotary embedding.
    pub q: Vec<f32>,
    /// Slots (`block * BLOCK_SIZE + offset`) of the visible keys.
    pub slots: Vec<u32>,
}

/// The shape of the heads.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (each serves `n_heads / n_kv_heads` query heads).
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Factor on the scores (`1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// Attention of each query over its keys in `keys`/`values` (one layer of the pool, `[slots,
/// n_kv_heads, head_dim]`, `f32` on the CPU). Returns per query `[n_heads * head_dim]`.
pub fn decode_attention(
    keys: &Tensor,
    values: &Tensor,
    queries: &[DecodeQuery],
    heads: Heads,
) -> Result<Vec<Vec<f32>>> {
    let (kg, kl) = keys.storage_and_layout();
    let (vg, vl) = values.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) = (&*kg, &*vg) else {
        return Err(EngineError::InvalidRequest(
            "the paged decode kernel needs an f32 cache on the CPU".into(),
        ));
    };
    if !kl.is_contiguous() || !vl.is_contiguous() {
        return Err(EngineError::InvalidRequest("the KV pool is not contiguous".into()));
    }
    let k = &k[kl.start_offset()..];
    let v = &v[vl.start_offset()..];
    let Heads { n_heads, n_kv_heads, head_dim, .. } = heads;
    let group = n_heads / n_kv_heads;
    let tasks: Vec<(usize, usize)> =
        (0..queries.len()).flat_map(|i| (0..n_kv_heads).map(move |h| (i, h))).collect();
    let parts: Vec<Vec<f32>> =
        tasks.par_iter().map(|&(i, h)| head_task(k, v, &queries[i], h, heads)).collect();
    let mut out: Vec<Vec<f32>> = queries.iter().map(|_| vec![0f32; n_heads * head_dim]).collect();
    for (&(i, h), part) in tasks.iter().zip(parts) {
        out[i][h * group * head_dim..(h + 1) * group * head_dim].copy_from_slice(&part);
    }
    Ok(out)
}

/// One key/value head of one query: `[group * head_dim]` outputs.
fn head_task(k: &[f32], v: &[f32], query: &DecodeQuery, h: usize, heads: Heads) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { head_task_avx2(k, v, query, h, heads) };
        }
    }
    head_task_generic(k, v, query, h, heads)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_task_avx2(
    k: &[f32],
    v: &[f32],
    query: &DecodeQuery,
    h: usize,
    heads: Heads,
) -> Vec<f32> {
    head_task_generic(k, v, query, h, heads)
}

#[inline(always)]
fn head_task_generic(
    k: &[f32],
    v: &[f32],
    query: &DecodeQuery,
    h: usize,
    heads: Heads,
) -> Vec<f32> {
    let Heads { n_heads, n_kv_heads, head_dim: hd, scale } = heads;
    let group = n_heads / n_kv_heads;
    let n = query.slots.len();
    let row = |s: u32| (s as usize * n_kv_heads + h) * hd;
    let qs = &query.q[h * group * hd..(h + 1) * group * hd];
    // Scores, one row of `n` per query head of the group.
    let mut p = vec![0f32; group * n];
    for (j, &s) in query.slots.iter().enumerate() {
        let key = &k[row(s)..row(s) + hd];
        for g in 0..group {
            p[g * n + j] = dot(&qs[g * hd..(g + 1) * hd], key) * scale;
        }
    }
    for scores in p.chunks_exact_mut(n.max(1)) {
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in scores.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        scores.iter_mut().for_each(|x| *x *= inv);
    }
    let mut out = vec![0f32; group * hd];
    for (j, &s) in query.slots.iter().enumerate() {
        let value = &v[row(s)..row(s) + hd];
        for g in 0..group {
            let w = p[g * n + j];
            out[g * hd..(g + 1) * hd].iter_mut().zip(value).for_each(|(o, x)| *o += w * x);
        }
    }
    out
}

/// Dot product with eight running sums (vectorizable; the tail, if any, added last).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[chunks * 8..].iter().zip(&b[chunks * 8..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The kernel against softmax(q k^T * scale) v computed with tensors, for grouped heads,
    /// keys scattered over slots in any order.
    #[test]
    fn matches_dense_attention() {
        let dev = Device::Cpu;
        let (nq, nkv, hd, slots) = (6, 2, 12, 40);
        let keys = Tensor::randn(0f32, 1.0, (slots, nkv, hd), &dev).unwrap();
        let values = Tensor::randn(0f32, 1.0, (slots, nkv, hd), &dev).unwrap();
        let picks: Vec<Vec<u32>> = vec![vec![3, 17, 5, 39, 0, 22, 23], vec![8], (0..40).collect()];
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale };
        let queries: Vec<DecodeQuery> = picks
            .iter()
            .map(|s| DecodeQuery {
                q: Tensor::randn(0f32, 1.0, nq * hd, &dev).unwrap().to_vec1().unwrap(),
                slots: s.clone(),
            })
            .collect();
        let got = decode_attention(&keys, &values, &queries, heads).unwrap();
        for (query, got) in queries.iter().zip(got) {
            let ids = Tensor::new(query.slots.as_slice(), &dev).unwrap();
            let k = keys.index_select(&ids, 0).unwrap().transpose(0, 1).unwrap(); // [nkv, n, hd]
            let v = values.index_select(&ids, 0).unwrap().transpose(0, 1).unwrap();
            let q = Tensor::from_vec(query.q.clone(), (nkv, nq / nkv, hd), &dev).unwrap();
            let s =
                (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale as f64).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
            let want = p.matmul(&v.contiguous().unwrap()).unwrap().flatten_all().unwrap();
            let want: Vec<f32> = want.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
