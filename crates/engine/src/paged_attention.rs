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
//!
//! Heads that see different keys (Phi-3-small's block-sparse layers) name their keys as runs of
//! slot indices ([`HeadKeys`]); the kernel computes only those, so a sparse head's cost follows
//! the keys it sees, not the context length.

use std::ops::Range;
use std::sync::Arc;

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
    /// Per query head, the keys it sees, for attention patterns that differ between heads
    /// (Phi-3-small's block-sparse layers). `None` when every head sees every slot.
    pub visible: Option<Arc<HeadKeys>>,
}

/// Per query head, the runs of indices into [`DecodeQuery::slots`] that the head attends to,
/// in increasing order; each head needs at least one key.
pub type HeadKeys = Vec<Vec<Range<usize>>>;

/// Whether `visible` names, for each of `n_heads` heads, at least one key and only keys among
/// the first `n` slots.
fn visible_fits(visible: &HeadKeys, n_heads: usize, n: usize) -> bool {
    visible.len() == n_heads
        && visible.iter().all(|runs| {
            runs.iter().any(|r| !r.is_empty())
                && runs.iter().all(|r| r.start <= r.end && r.end <= n)
        })
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
    let n_heads = heads.n_heads;
    let named = |q: &DecodeQuery| {
        q.visible.as_deref().is_none_or(|v| visible_fits(v, n_heads, q.slots.len()))
    };
    if !queries.iter().all(named) {
        return Err(EngineError::InvalidRequest(
            "a decode head's keys are not among its slots".into(),
        ));
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
    let dot = |q: &[f32], s: u32| {
        let key = &k[slot_offset(s, h, nkv, hd)..][..hd];
        q.iter().zip(key).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale
    };
    let add = |out: &mut [f32], w: f32, s: u32| {
        let value = &v[slot_offset(s, h, nkv, hd)..][..hd];
        out.iter_mut().zip(value).for_each(|(o, x)| *o += w * x.to_f32());
    };
    let qs = &query.q[h * group * hd..(h + 1) * group * hd];
    let mut out = vec![0f32; group * hd];
    if let Some(visible) = &query.visible {
        // Each query head over its own keys.
        for g in 0..group {
            let runs = &visible[h * group + g];
            let slots = || runs.iter().flat_map(|r| query.slots[r.clone()].iter().copied());
            let q = &qs[g * hd..(g + 1) * hd];
            let mut p: Vec<f32> = slots().map(|s| dot(q, s)).collect();
            let n = p.len();
            softmax_rows(&mut p, n);
            let o = &mut out[g * hd..(g + 1) * hd];
            slots().zip(&p).for_each(|(s, &w)| add(o, w, s));
        }
        return out;
    }
    let n = query.slots.len();
    let mut p = vec![0f32; group * n];
    for (j, &s) in query.slots.iter().enumerate() {
        for g in 0..group {
            p[g * n + j] = dot(&qs[g * hd..(g + 1) * hd], s);
        }
    }
    softmax_rows(&mut p, n);
    for (j, &s) in query.slots.iter().enumerate() {
        for g in 0..group {
            add(&mut out[g * hd..(g + 1) * hd], p[g * n + j], s);
        }
    }
    out
}

/// Softmax of each row of `n` scores, in place, split over rayon's pool, with the AVX2
/// exponential where the CPU has it. The general attention path's softmax on the CPU: candle's
/// calls the scalar `exp` once a score, most of a long prompt chunk's softmax time.
pub(crate) fn softmax_rows_parallel(p: &mut [f32], n: usize) {
    let n = n.max(1);
    #[cfg(target_arch = "x86_64")]
    let vector = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let vector = false;
    let rows_per_task = (1 << 14) / n + 1;
    p.par_chunks_mut(n * rows_per_task).for_each(|rows| {
        #[cfg(target_arch = "x86_64")]
        if vector {
            // SAFETY: the CPU has the features, checked above.
            return unsafe { avx2::softmax_rows_avx2(rows, n) };
        }
        let _ = vector;
        softmax_rows(rows, n)
    });
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

/// The kernel with AVX2 and FMA, for head sizes that are multiples of 8: scores eight running
/// sums at a time, a vectorised softmax, and per value a multiply-add of the weight into the
/// output rows. Half-precision caches widen 8 values at a time (`f16` with F16C, `bf16` by a shift).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{DecodeQuery, Heads};
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

    /// `e^x` of eight values, to about 2 ulp in the range softmax uses (`x <= 0`; below about
    /// -87.3 the result is the smallest normal float, not 0). Range reduction `x = n ln 2 + r`
    /// with `|r| <= ln 2 / 2` (`ln 2` in two parts, so that `n ln 2` is exact), a degree-6
    /// polynomial for `e^r` (the Taylor coefficients, adjusted for least error on that range),
    /// and `2^n` built in the exponent bits. Exists because a decode step computes one
    /// exponential per head and cached position: at 8k context that is 262,144 a query and
    /// layer, and the scalar `expf` took most of the kernel's time.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0)), _mm256_set1_ps(-87.3));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let pow2 =
            _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }

    /// Softmax of each row of `n` scores, in place, eight at a time (the same result as
    /// [`super::softmax_rows`] up to the exponential's rounding).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn softmax_rows_avx2(p: &mut [f32], n: usize) {
        for row in p.chunks_exact_mut(n.max(1)) {
            let (body, tail) = row.split_at_mut(n - n % 8);
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in body.chunks_exact(8) {
                m = _mm256_max_ps(m, _mm256_loadu_ps(c.as_ptr()));
            }
            let lanes: [f32; 8] = std::mem::transmute(m);
            let max = lanes.iter().chain(tail.iter()).copied().fold(f32::NEG_INFINITY, f32::max);
            let (max8, mut sum8) = (_mm256_set1_ps(max), _mm256_setzero_ps());
            for c in body.chunks_exact_mut(8) {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), max8));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                sum8 = _mm256_add_ps(sum8, e);
            }
            let mut sum = hsum(sum8);
            for x in tail.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            let inv8 = _mm256_set1_ps(inv);
            for c in body.chunks_exact_mut(8) {
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), inv8));
            }
            tail.iter_mut().for_each(|x| *x *= inv);
        }
    }

    /// The sums of eight vectors, in order.
    #[inline(always)]
    unsafe fn hsum8(a: [__m256; 8]) -> __m256 {
        // Pairwise adds leave each vector's sum split over the two 128-bit halves.
        let (s01, s23) = (_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let (s45, s67) = (_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        let (lo, hi) = (_mm256_hadd_ps(s01, s23), _mm256_hadd_ps(s45, s67));
        _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31))
    }

    macro_rules! head_task {
        ($name:ident, $dot:ident, $values:ident, $t:ty, $load:ident) => {
            /// The scaled scores of `rows` query rows (`q`, `hd` apart) against the keys at
            /// `slots` (head `h`), into `p` (row `r` at `p + r * p_stride`). Eight running sums
            /// at a time, so that eight multiply-add chains are in flight (one key's sum alone
            /// waits on each add's latency): eight keys for a single row, two keys by four rows
            /// for a group.
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $dot(
                q: *const f32,
                rows: usize,
                slots: &[u32],
                k: &[$t],
                (h, nkv, hd): (usize, usize, usize),
                scale: f32,
                p: *mut f32,
                p_stride: usize,
            ) {
                let key = |s: u32| k.as_ptr().add(slot_offset(s, h, nkv, hd));
                let scale8 = _mm256_set1_ps(scale);
                if rows >= 2 {
                    // Query heads sharing the keys: tiles of 2 keys by 4 rows (2 by 2 for the
                    // last 2 or 3), each key widened once for all the rows of a tile.
                    let mut r0 = 0;
                    while r0 < rows {
                        let quad = rows - r0 >= 4;
                        let n_rows = if quad { 4 } else { 2.min(rows - r0) };
                        let qr: [*const f32; 4] =
                            std::array::from_fn(|r| q.add((r0 + r.min(n_rows - 1)) * hd));
                        let mut j = 0;
                        while j < slots.len() {
                            let pair = j + 1 < slots.len();
                            let (k0, k1) =
                                (key(slots[j]), key(slots[if pair { j + 1 } else { j }]));
                            let mut a = [_mm256_setzero_ps(); 8];
                            let mut c = 0;
                            while c < hd {
                                let (x0, x1) = ($load(k0.add(c)), $load(k1.add(c)));
                                for r in 0..4 {
                                    if r < n_rows {
                                        let qv = _mm256_loadu_ps(qr[r].add(c));
                                        a[2 * r] = _mm256_fmadd_ps(qv, x0, a[2 * r]);
                                        a[2 * r + 1] = _mm256_fmadd_ps(qv, x1, a[2 * r + 1]);
                                    }
                                }
                                c += 8;
                            }
                            for r in 0..n_rows {
                                let row = p.add((r0 + r) * p_stride + j);
                                *row = hsum(a[2 * r]) * scale;
                                if pair {
                                    *row.add(1) = hsum(a[2 * r + 1]) * scale;
                                }
                            }
                            j += 2;
                        }
                        r0 += n_rows;
                    }
                    return;
                }
                let mut chunks = slots.chunks_exact(8);
                let mut j = 0;
                for chunk in chunks.by_ref() {
                    let keys: [*const $t; 8] = std::array::from_fn(|i| key(chunk[i]));
                    for r in 0..rows {
                        let qr = q.add(r * hd);
                        let mut a = [_mm256_setzero_ps(); 8];
                        let mut c = 0;
                        while c < hd {
                            let qv = _mm256_loadu_ps(qr.add(c));
                            for (i, a) in a.iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(qv, $load(keys[i].add(c)), *a);
                            }
                            c += 8;
                        }
                        let sums = hsum8(a);
                        _mm256_storeu_ps(p.add(r * p_stride + j), _mm256_mul_ps(sums, scale8));
                    }
                    j += 8;
                }
                for &s in chunks.remainder() {
                    for r in 0..rows {
                        let qr = q.add(r * hd);
                        let mut a = _mm256_setzero_ps();
                        let mut c = 0;
                        while c < hd {
                            a = _mm256_fmadd_ps(
                                _mm256_loadu_ps(qr.add(c)),
                                $load(key(s).add(c)),
                                a,
                            );
                            c += 8;
                        }
                        *p.add(r * p_stride + j) = hsum(a) * scale;
                    }
                    j += 1;
                }
            }

            /// Writes to `ROWS` output rows (`o`, `hd` values each, `o_stride` apart) the sums
            /// of the values at `slots` (head `h`) weighted by each row's weights (`w`, one per
            /// slot in order, rows `w_stride` apart). The rows are query heads sharing the
            /// key/value head, so each value is read once for all of them: `8 / ROWS` vectors
            /// of columns a pass, the sums kept in registers across all the positions.
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $values<const ROWS: usize>(
                o: *mut f32,
                o_stride: usize,
                w: *const f32,
                w_stride: usize,
                slots: impl Iterator<Item = u32> + Clone,
                v: &[$t],
                (h, nkv, hd): (usize, usize, usize),
            ) {
                let per_row = 8 / ROWS;
                let mut c0 = 0;
                while c0 < hd {
                    let vecs = ((hd - c0) / 8).min(per_row);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for (j, s) in slots.clone().enumerate() {
                        let value = v.as_ptr().add(slot_offset(s, h, nkv, hd) + c0);
                        let mut x = [_mm256_setzero_ps(); 8];
                        for (t, x) in x.iter_mut().enumerate().take(per_row) {
                            if t < vecs {
                                *x = $load(value.add(8 * t));
                            }
                        }
                        for r in 0..ROWS {
                            let wj = _mm256_set1_ps(*w.add(r * w_stride + j));
                            for t in 0..per_row {
                                if t < vecs {
                                    let a = &mut acc[r * per_row + t];
                                    *a = _mm256_fmadd_ps(wj, x[t], *a);
                                }
                            }
                        }
                    }
                    for r in 0..ROWS {
                        for t in 0..vecs {
                            _mm256_storeu_ps(
                                o.add(r * o_stride + c0 + 8 * t),
                                acc[r * per_row + t],
                            );
                        }
                    }
                    c0 += 8 * vecs;
                }
            }

            /// # Safety
            /// The CPU must have AVX2, FMA and F16C; `head_dim` must be a multiple of 8, every
            /// slot inside `k` and `v` and every visible run inside the slots (the caller
            /// checks all three).
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
                let qs = query.q[h * group * hd..(h + 1) * group * hd].as_ptr();
                let mut out = vec![0f32; group * hd];
                let o = out.as_mut_ptr();
                if let Some(visible) = &query.visible {
                    // Each query head over its own keys.
                    let (mut p, mut seen): (Vec<f32>, Vec<u32>) = (Vec::new(), Vec::new());
                    for g in 0..group {
                        let runs = &visible[h * group + g];
                        seen.clear();
                        for r in runs {
                            seen.extend_from_slice(query.slots.get_unchecked(r.clone()));
                        }
                        let n = seen.len();
                        p.clear();
                        p.resize(n, 0.0);
                        $dot(qs.add(g * hd), 1, &seen, k, (h, nkv, hd), scale, p.as_mut_ptr(), n);
                        softmax_rows_avx2(&mut p, n);
                        let slots = seen.iter().copied();
                        $values::<1>(o.add(g * hd), hd, p.as_ptr(), n, slots, v, (h, nkv, hd));
                    }
                    return out;
                }
                // Every query head of the group over every key: each key is read once.
                let n = query.slots.len();
                let mut p = vec![0f32; group * n];
                $dot(qs, group, &query.slots, k, (h, nkv, hd), scale, p.as_mut_ptr(), n);
                softmax_rows_avx2(&mut p, n);
                // The group's heads in runs of 4, 2 and 1, each run reading the values once.
                let mut g = 0;
                while g < group {
                    let (og, wg) = (o.add(g * hd), p.as_ptr().add(g * n));
                    let slots = query.slots.iter().copied();
                    let shape = (h, nkv, hd);
                    let rows = match group - g {
                        1 => 1,
                        2 | 3 => 2,
                        _ => 4,
                    };
                    match rows {
                        1 => $values::<1>(og, hd, wg, n, slots, v, shape),
                        2 => $values::<2>(og, hd, wg, n, slots, v, shape),
                        _ => $values::<4>(og, hd, wg, n, slots, v, shape),
                    }
                    g += rows;
                }
                out
            }
        };
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// `exp8` against `f64` `exp` over the range softmax uses, within 3e-7 relative, and
        /// the AVX2 softmax against the plain one.
        #[test]
        fn exp_and_softmax_match_the_plain_ones() {
            if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                return;
            }
            let xs: Vec<f32> = (0..200_000).map(|i| -87.0 + i as f32 * 87.0 / 200_000.0).collect();
            for c in xs.chunks_exact(8) {
                let got: [f32; 8] =
                    unsafe { std::mem::transmute(exp8(_mm256_loadu_ps(c.as_ptr()))) };
                for (x, g) in c.iter().zip(got) {
                    let want = (*x as f64).exp();
                    assert!(((g as f64 - want) / want).abs() < 3e-7, "exp({x}) = {g}, not {want}");
                }
            }
            for n in [1, 7, 8, 13, 64, 1000] {
                let row: Vec<f32> =
                    (0..2 * n).map(|i| ((i * 7919) % 23) as f32 * 0.9 - 10.0).collect();
                let (mut a, mut b) = (row.clone(), row);
                super::super::softmax_rows(&mut a, n);
                unsafe { softmax_rows_avx2(&mut b, n) };
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-6 * x.max(1e-30), "n {n}: {x} vs {y}");
                }
            }
        }
    }

    head_task!(head_task_f32, dot_f32, values_f32, f32, load_f32);
    head_task!(head_task_f16, dot_f16, values_f16, half::f16, load_f16);
    head_task!(head_task_bf16, dot_bf16, values_bf16, half::bf16, load_bf16);
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // runs of keys, not ranges to expand
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
        let blocks = 3;
        let slots = blocks * BLOCK_SIZE;
        // Query groups of 3 (a run of 2 and one of 1) and of 8 (two runs of 4).
        for ((nq, nkv), hd) in
            [(6, 2), (8, 1)].into_iter().flat_map(|h| [12, 24, 32].map(|d| (h, d)))
        {
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
                        // The longest pick shows each head its own runs of keys (some heads
                        // one key, some all).
                        visible: (s.len() > 8).then(|| {
                            let n = s.len();
                            let runs = (0..nq)
                                .map(|h| match h % 3 {
                                    0 => vec![0..n],
                                    1 => vec![h..h + 1],
                                    _ => vec![0..3, 3..3, 10 + h..20 + h, n - 5..n],
                                })
                                .collect();
                            Arc::new(runs)
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
                    if let Some(visible) = &query.visible {
                        // The same runs as an additive mask.
                        let n = query.slots.len();
                        let mut m = vec![f32::NEG_INFINITY; nq * n];
                        for (h, runs) in visible.iter().enumerate() {
                            runs.iter().flat_map(|r| r.clone()).for_each(|j| m[h * n + j] = 0.0);
                        }
                        let m = Tensor::from_vec(m, (nkv, nq / nkv, n), &dev).unwrap();
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

    /// Runs outside the slots, or a head with no key, are refused before any kernel runs.
    #[test]
    fn refuses_runs_outside_the_slots() {
        let dev = Device::Cpu;
        let (nq, nkv, hd) = (2, 1, 8);
        let keys = Tensor::zeros((1, nkv, BLOCK_SIZE, hd), DType::F32, &dev).unwrap();
        let heads = Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale: 1.0 };
        let with = |runs: HeadKeys| DecodeQuery {
            q: vec![0.0; nq * hd],
            slots: vec![0, 1, 2],
            visible: Some(Arc::new(runs)),
        };
        let fine = with(vec![vec![0..3], vec![1..2]]);
        assert!(decode_attention(&keys, &keys, &[fine], heads).is_ok());
        for bad in [vec![vec![0..4], vec![0..1]], vec![vec![0..1], vec![]], vec![vec![0..1]]] {
            let err = decode_attention(&keys, &keys, &[with(bad)], heads).unwrap_err();
            assert!(err.to_string().contains("not among its slots"), "{err}");
        }
    }
}
