//! Decode attention on the CPU that reads keys and values straight from the KV pool's blocks.
//!
//! Exists because a decode step's query attends to every cached position of its sequence, and
//! those positions are scattered over the pool's blocks: gathering them into one contiguous
//! tensor per layer and sequence (what the general path does for prompt chunks) would copy the
//! whole cache every step, as many bytes again as attention itself reads. Here each (sequence,
//! key/value head) pair is one task: the scores of the head's query group against every cached
//! key, a softmax, and the weighted sum of the values, all in `f32` as the reference computes
//! them (a half-precision cache is widened as it is read). Tasks run on rayon's pool; the inner
//! loops are written for AVX2 and FMA, used when the CPU has them.

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::kv_pool::slot_offset;

/// One decode query: the sequence's query heads for its newest position (`[n_heads *
/// head_dim]`) and the pool slots of the keys it attends to, oldest first.
#[derive(Debug)]
pub struct DecodeQuery {
    /// Query heads, after rotary embedding.
    pub q: Vec<f32>,
    /// Slots (`block * BLOCK_SIZE + offset`) of the visible keys.
    pub slots: Vec<u32>,
    /// Per query head, an additive mask over `slots` (`[n_heads * slots.len()]`, `0` or
    /// `-inf`): for attention patterns that differ between heads (Phi-3-small's block-sparse
    /// layers). `None` when every head sees every slot.
    pub mask: Option<std::sync::Arc<Vec<f32>>>,
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

/// Attention of each query over its keys in `keys`/`values` (one layer of the pool, `[blocks,
/// n_kv_heads, BLOCK_SIZE, head_dim]` on the CPU, `f32`, `f16` or `bf16`). Returns per query
/// `[n_heads * head_dim]`.
pub fn decode_attention(
    keys: &Tensor,
    values: &Tensor,
    queries: &[DecodeQuery],
    heads: Heads,
) -> Result<Vec<Vec<f32>>> {
    let (kg, kl) = keys.storage_and_layout();
    let (vg, vl) = values.storage_and_layout();
    if !kl.is_contiguous() || !vl.is_contiguous() {
        return Err(EngineError::InvalidRequest("the KV pool is not contiguous".into()));
    }
    let (ko, vo) = (kl.start_offset(), vl.start_offset());
    let len = kl.shape().elem_count();
    let Heads { n_kv_heads: nkv, head_dim: hd, .. } = heads;
    let fits = |s: &u32| slot_offset(*s, nkv - 1, nkv, hd) + hd <= len;
    if !queries.iter().all(|q| q.slots.iter().all(fits)) {
        return Err(EngineError::InvalidRequest("a decode slot past the KV pool's end".into()));
    }
    match (&*kg, &*vg) {
        (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
            Ok(run(&k[ko..], &v[vo..], queries, heads))
        }
        (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => {
            Ok(run(&k[ko..], &v[vo..], queries, heads))
        }
        (Storage::Cpu(CpuStorage::BF16(k)), Storage::Cpu(CpuStorage::BF16(v))) => {
            Ok(run(&k[ko..], &v[vo..], queries, heads))
        }
        _ => Err(EngineError::InvalidRequest(
            "the paged decode kernel needs an f32, f16 or bf16 cache on the CPU".into(),
        )),
    }
}

/// The cache's element types, as the kernel reads them.
trait KvElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// The AVX2 kernel for this type, where the CPU and the head size allow it.
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel() -> HeadTask<Self>;
}

type HeadTask<T> = unsafe fn(&[T], &[T], &DecodeQuery, usize, Heads) -> Vec<f32>;

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel() -> HeadTask<Self> {
        avx2::head_task_f32
    }
}

macro_rules! half_elem {
    ($t:ty, $kernel:ident) => {
        impl KvElem for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[cfg(target_arch = "x86_64")]
            fn avx2_kernel() -> HeadTask<Self> {
                avx2::$kernel
            }
        }
    };
}
half_elem!(half::f16, head_task_f16);
half_elem!(half::bf16, head_task_bf16);

fn run<T: KvElem>(k: &[T], v: &[T], queries: &[DecodeQuery], heads: Heads) -> Vec<Vec<f32>> {
    let Heads { n_heads, n_kv_heads, head_dim, .. } = heads;
    let group = n_heads / n_kv_heads;
    let task: HeadTask<T> = pick_kernel::<T>(head_dim);
    let tasks: Vec<(usize, usize)> =
        (0..queries.len()).flat_map(|i| (0..n_kv_heads).map(move |h| (i, h))).collect();
    // SAFETY: `pick_kernel` returns the AVX2 kernel only when the CPU has its features.
    let parts: Vec<Vec<f32>> =
        tasks.par_iter().map(|&(i, h)| unsafe { task(k, v, &queries[i], h, heads) }).collect();
    let mut out: Vec<Vec<f32>> = queries.iter().map(|_| vec![0f32; n_heads * head_dim]).collect();
    for (&(i, h), part) in tasks.iter().zip(parts) {
        out[i][h * group * head_dim..(h + 1) * group * head_dim].copy_from_slice(&part);
    }
    out
}

fn pick_kernel<T: KvElem>(head_dim: usize) -> HeadTask<T> {
    #[cfg(target_arch = "x86_64")]
    {
        if head_dim.is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return T::avx2_kernel();
        }
    }
    let _ = head_dim;
    head_task_generic::<T>
}

/// One key/value head of one query, in plain Rust: `[group * head_dim]` outputs.
///
/// # Safety
/// None needed; `unsafe` only to share the kernels' type.
unsafe fn head_task_generic<T: KvElem>(
    k: &[T],
    v: &[T],
    query: &DecodeQuery,
    h: usize,
    heads: Heads,
) -> Vec<f32> {
    let Heads { n_heads, n_kv_heads: nkv, head_dim: hd, scale } = heads;
    let group = n_heads / nkv;
    let n = query.slots.len();
    let qs = &query.q[h * group * hd..(h + 1) * group * hd];
    let mut p = vec![0f32; group * n];
    for (j, &s) in query.slots.iter().enumerate() {
        let key = &k[slot_offset(s, h, nkv, hd)..][..hd];
        for g in 0..group {
            let q = &qs[g * hd..(g + 1) * hd];
            p[g * n + j] = q.iter().zip(key).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
        }
    }
    apply_mask(&mut p, query, h, group);
    softmax_rows(&mut p, n);
    let mut out = vec![0f32; group * hd];
    for (j, &s) in query.slots.iter().enumerate() {
        let value = &v[slot_offset(s, h, nkv, hd)..][..hd];
        for g in 0..group {
            let w = p[g * n + j];
            out[g * hd..(g + 1) * hd].iter_mut().zip(value).for_each(|(o, x)| *o += w * x.to_f32());
        }
    }
    out
}

/// Adds the query's per-head mask to the scores `p` (`[group * n]`) of key/value head `h`.
#[inline(always)]
fn apply_mask(p: &mut [f32], query: &DecodeQuery, h: usize, group: usize) {
    if let Some(mask) = &query.mask {
        let n = query.slots.len();
        let rows = &mask[h * group * n..(h + 1) * group * n];
        p.iter_mut().zip(rows).for_each(|(x, m)| *x += m);
    }
}

/// Softmax of each row of `n` scores, in place.
#[inline(always)]
fn softmax_rows(p: &mut [f32], n: usize) {
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
}

/// The kernel with AVX2 and FMA, for head sizes that are multiples of 8: per key, a dot
/// product in two running vector sums; per value, a multiply-add of the weight into the output
/// row. Half-precision caches widen 8 values at a time (`f16` with F16C, `bf16` by a shift).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{apply_mask, softmax_rows, DecodeQuery, Heads};
    use crate::kv_pool::slot_offset;

    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[inline(always)]
    unsafe fn load_bf16(p: *const half::bf16) -> __m256 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    macro_rules! head_task {
        ($name:ident, $t:ty, $load:ident) => {
            /// # Safety
            /// The CPU must have AVX2, FMA and F16C; `head_dim` must be a multiple of 8 and
            /// every slot inside `k` and `v` (the caller checks both).
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $name(
                k: &[$t],
                v: &[$t],
                query: &DecodeQuery,
                h: usize,
                heads: Heads,
            ) -> Vec<f32> {
                let Heads { n_heads, n_kv_heads: nkv, head_dim: hd, scale } = heads;
                let group = n_heads / nkv;
                let n = query.slots.len();
                let qs = query.q[h * group * hd..(h + 1) * group * hd].as_ptr();
                let mut p = vec![0f32; group * n];
                for (j, &s) in query.slots.iter().enumerate() {
                    let key = k.as_ptr().add(slot_offset(s, h, nkv, hd));
                    for g in 0..group {
                        let q = qs.add(g * hd);
                        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                        let mut c = 0;
                        while c + 16 <= hd {
                            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), $load(key.add(c)), a0);
                            let (q1, k1) = (q.add(c + 8), key.add(c + 8));
                            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1), $load(k1), a1);
                            c += 16;
                        }
                        if c < hd {
                            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), $load(key.add(c)), a0);
                        }
                        *p.get_unchecked_mut(g * n + j) = hsum(_mm256_add_ps(a0, a1)) * scale;
                    }
                }
                apply_mask(&mut p, query, h, group);
                softmax_rows(&mut p, n);
                // The weighted sum of the values, 64 columns at a time, the sums kept in
                // registers across all the positions.
                let mut out = vec![0f32; group * hd];
                let o = out.as_mut_ptr();
                for g in 0..group {
                    let w = p.as_ptr().add(g * n);
                    let mut c0 = 0;
                    while c0 < hd {
                        let vecs = ((hd - c0) / 8).min(8);
                        let mut acc = [_mm256_setzero_ps(); 8];
                        for (j, &s) in query.slots.iter().enumerate() {
                            let value = v.as_ptr().add(slot_offset(s, h, nkv, hd) + c0);
                            let wj = _mm256_set1_ps(*w.add(j));
                            for (t, a) in acc.iter_mut().enumerate() {
                                if t < vecs {
                                    *a = _mm256_fmadd_ps(wj, $load(value.add(8 * t)), *a);
                                }
                            }
                        }
                        for (t, a) in acc.iter().enumerate().take(vecs) {
                            _mm256_storeu_ps(o.add(g * hd + c0 + 8 * t), *a);
                        }
                        c0 += 8 * vecs;
                    }
                }
                out
            }
        };
    }

    head_task!(head_task_f32, f32, load_f32);
    head_task!(head_task_f16, half::f16, load_f16);
    head_task!(head_task_bf16, half::bf16, load_bf16);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_pool::BLOCK_SIZE;
    use candle_core::{DType, Device};

    /// The kernel against softmax(q k^T * scale) v computed with tensors, for grouped heads,
    /// keys scattered over slots in any order, head sizes for the plain and the vector code,
    /// and each cache element type.
    #[test]
    fn matches_dense_attention() {
        let dev = Device::Cpu;
        let (nq, nkv, blocks) = (6, 2, 3);
        let slots = blocks * BLOCK_SIZE;
        for hd in [12, 24, 32] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                // Rows `[slot, head, dim]`, rounded to the cache type, and the pool that holds
                // them: `[block, head, offset, dim]`.
                let rows = |seed: f64| {
                    let r = Tensor::randn(seed as f32, 1.0, (slots, nkv, hd), &dev).unwrap();
                    r.to_dtype(dtype).unwrap()
                };
                let (k_rows, v_rows) = (rows(0.0), rows(0.5));
                let pool = |r: &Tensor| {
                    let r = r.reshape((blocks, BLOCK_SIZE, nkv, hd)).unwrap();
                    r.transpose(1, 2).unwrap().contiguous().unwrap()
                };
                let (keys, values) = (pool(&k_rows), pool(&v_rows));
                let picks: Vec<Vec<u32>> =
                    vec![vec![3, 17, 5, 47, 0, 22, 23], vec![8], (0..slots as u32).collect()];
                let scale = 1.0 / (hd as f32).sqrt();
                let heads = Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale };
                let queries: Vec<DecodeQuery> = picks
                    .iter()
                    .map(|s| DecodeQuery {
                        q: Tensor::randn(0f32, 1.0, nq * hd, &dev).unwrap().to_vec1().unwrap(),
                        slots: s.clone(),
                        // The longest pick hides a different third of its keys from each head.
                        mask: (s.len() > 8).then(|| {
                            let hide = |h: usize, j: usize| (j + h).is_multiple_of(3);
                            let m = (0..nq * s.len())
                                .map(|i| {
                                    if hide(i / s.len(), i % s.len()) {
                                        f32::NEG_INFINITY
                                    } else {
                                        0.0
                                    }
                                })
                                .collect();
                            std::sync::Arc::new(m)
                        }),
                    })
                    .collect();
                let got = decode_attention(&keys, &values, &queries, heads).unwrap();
                let (k_rows, v_rows) =
                    (k_rows.to_dtype(DType::F32).unwrap(), v_rows.to_dtype(DType::F32).unwrap());
                for (query, got) in queries.iter().zip(got) {
                    let ids = Tensor::new(query.slots.as_slice(), &dev).unwrap();
                    let gather = |t: &Tensor| {
                        let t = t.index_select(&ids, 0).unwrap().transpose(0, 1).unwrap();
                        t.contiguous().unwrap() // [nkv, n, hd]
                    };
                    let (k, v) = (gather(&k_rows), gather(&v_rows));
                    let q = Tensor::from_vec(query.q.clone(), (nkv, nq / nkv, hd), &dev).unwrap();
                    let s = q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap();
                    let mut s = (s * scale as f64).unwrap();
                    if let Some(mask) = &query.mask {
                        let n = query.slots.len();
                        let m = Tensor::from_vec(mask.to_vec(), (nkv, nq / nkv, n), &dev).unwrap();
                        s = (s + m).unwrap();
                    }
                    let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
                    let want = p.matmul(&v).unwrap().flatten_all().unwrap();
                    let want: Vec<f32> = want.to_vec1().unwrap();
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-4, "hd {hd} {dtype:?}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
