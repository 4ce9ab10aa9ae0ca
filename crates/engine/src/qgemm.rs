//! Products of block-quantized weights on x86 CPUs with AVX2: `x @ W^T` for one row of `x`
//! (decode) or many (prompts), with `W` in GGUF's Q4_0 or Q8_0 blocks.
//!
//! Exists because candle's quantized product computes every (row, column) pair as its own dot
//! product, unpacking each weight block again for every row of the prompt, and reduces every
//! dot product horizontally; decode then reads the weights at a fraction of the memory
//! bandwidth and prompts run at a fraction of what the cores can do.
//!
//! The weights are repacked once, at load, into groups of 8 rows ([`PackedWeights`]): for each
//! block column, the 8 rows' f16 scales, then their quants interleaved 4 values at a time, so
//! that one 32-bit lane of a 256-bit register holds 4 consecutive quants of one row and the 8
//! lanes hold the 8 rows. One broadcast 4-byte piece of an activation block then feeds all 8
//! rows in one `maddubs`, the 8 row sums stay in one register (one lane per row, no horizontal
//! reduction) and the 8 scales convert in one instruction. The activations are quantized once
//! to 8-bit blocks (as ggml does). A tile is 8 weight rows by up to 4 activation rows: each
//! weight register is unpacked once for the 4 rows. The work is split by 8-row groups across a
//! persistent pool of threads (`qgemm_pool.rs`).
//!
//! The layout follows the idea of ggml's `repack.cpp` (`block_q4_0x8`) in its own arrangement.
//! Integer arithmetic is exact; the float sums run in a different order than a plain dot
//! product, so results agree with the dequantized weights to float rounding.

use candle_core::quantized::GgmlDType;

use crate::qgemm_pool;

/// Values per block (Q4_0, Q8_0 and the 8-bit activation blocks).
const QK: usize = 32;
/// Weight rows interleaved in one group.
const ROWS: usize = 8;
/// Activation rows of a prompt tile.
const TILE_M: usize = 4;
/// Bytes of one group's weights that a prompt pass keeps hot in the cache while every tile of
/// activation rows goes over them.
const GROUP_CHUNK_BYTES: usize = 160 << 10;

/// Whether [`PackedWeights::matmul`] runs on this CPU (Q4_0 and Q8_0 with AVX2, FMA, F16C).
pub fn supported(dtype: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q8_0)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        false
    }
}

/// Bytes of the quants of one GGUF block of `dtype` (after its 2-byte f16 scale).
fn quant_bytes(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4_0 => QK / 2,
        GgmlDType::Q8_0 => QK,
        other => panic!("qgemm has no kernel for {other:?}"),
    }
}

/// Bytes of one block column of one group: 8 f16 scales, then 8 rows of quants.
fn group_block_bytes(dtype: GgmlDType) -> usize {
    2 * ROWS + ROWS * quant_bytes(dtype)
}

/// A Q4_0 or Q8_0 matrix `[n, k]` in 8-row groups (module docs). Group `g`, block column `b`
/// sits at `(g * k / 32 + b) * group_block_bytes`: 8 f16 scales (rows `8g..8g+8`), then
/// 32-byte pieces whose 32-bit lane `l` holds 4 quant bytes of row `8g + l`:
///
/// - Q8_0: piece `c` (0..8) holds the row's values `4c..4c+4`;
/// - Q4_0: piece `p` (0..4) holds the row's bytes `4p..4p+4`, so its low nibbles are values
///   `4p..4p+4` and its high nibbles values `16+4p..16+4p+4` (GGUF's nibble order, offset 8).
///
/// Rows past `n` in the last group are zero (scale 0) and their outputs are never written.
pub struct PackedWeights {
    dtype: GgmlDType,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeights")
            .field("dtype", &self.dtype)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl PackedWeights {
    /// Repacks `blocks`, the `n` rows of `W` in GGUF layout (`k / 32` blocks a row).
    pub fn new(dtype: GgmlDType, blocks: &[u8], n: usize, k: usize) -> Self {
        let qb = quant_bytes(dtype);
        assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
        let kb = k / QK;
        let bb = 2 + qb;
        assert_eq!(blocks.len(), n * kb * bb, "blocks are not {n} rows of {k} values");
        let gbb = group_block_bytes(dtype);
        let groups = n.div_ceil(ROWS);
        let mut data = vec![0u8; groups * kb * gbb];
        for (g, group) in data.chunks_exact_mut(kb * gbb).enumerate() {
            for (b, dst) in group.chunks_exact_mut(gbb).enumerate() {
                for l in 0..ROWS.min(n - g * ROWS) {
                    let src = &blocks[((g * ROWS + l) * kb + b) * bb..][..bb];
                    dst[2 * l..2 * l + 2].copy_from_slice(&src[..2]);
                    for piece in 0..qb / 4 {
                        let at = 2 * ROWS + 32 * piece + 4 * l;
                        dst[at..at + 4].copy_from_slice(&src[2 + 4 * piece..2 + 4 * piece + 4]);
                    }
                }
            }
        }
        Self { dtype, n, k, data }
    }

    /// The block format.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Rows of `W` (outputs of the product).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Columns of `W` (inputs of the product).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held (the original blocks plus at most 7 zero rows).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// `x @ W^T`: `x` is `[m, k]` row-major float32; returns `[m, n]` row-major. `threads`
    /// workers split the 8-row groups. Call only where [`supported`] says so.
    pub fn matmul(&self, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        assert!(supported(self.dtype), "qgemm without AVX2 or for {:?}", self.dtype);
        assert_eq!(x.len(), m * self.k, "x is not {m} rows of {}", self.k);
        let mut out = vec![0f32; m * self.n];
        if m == 0 || self.n == 0 {
            return out;
        }
        let xq = quantize_rows(x, self.k);
        let kb = self.k / QK;
        let groups = self.n.div_ceil(ROWS);
        let parts = threads.clamp(1, groups);
        let per = groups.div_ceil(parts);
        let parts = groups.div_ceil(per);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let job = |t: usize| {
            let g0 = t * per;
            let g1 = (g0 + per).min(groups);
            let out_ptr = &out_ptr;
            // SAFETY: `supported` checked AVX2, FMA and F16C; part `t` writes only the output
            // columns of its groups `g0..g1`, which no other part writes, and `out` outlives
            // the pool call.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx2::groups(self, kb, &xq, m, g0, g1, out_ptr.0)
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (g0, g1, out_ptr);
        };
        qgemm_pool::run(parts, &job);
        out
    }
}

/// The output buffer, written by all parts at disjoint columns.
struct SharedOut(*mut f32);
// SAFETY: parts write disjoint elements (see `PackedWeights::matmul`).
unsafe impl Sync for SharedOut {}

/// The activations in 8-bit blocks: quants, one scale per block, and 8 times each block's quant
/// sum (for Q4_0, whose weights are stored offset by 8).
struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
    sums8: Vec<i32>,
}

fn quantize_rows(x: &[f32], k: usize) -> QuantizedRows {
    debug_assert!(k.is_multiple_of(QK) && x.len().is_multiple_of(k));
    let blocks = x.len() / QK;
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; blocks];
    let mut sums8 = vec![0i32; blocks];
    for b in 0..blocks {
        let src: &[f32; QK] = x[b * QK..(b + 1) * QK].try_into().expect("one block");
        let dst: &mut [i8; QK] = (&mut q[b * QK..(b + 1) * QK]).try_into().expect("one block");
        let (scale, sum) = quantize_block(src, dst);
        d[b] = scale;
        sums8[b] = 8 * sum;
    }
    QuantizedRows { q, d, sums8 }
}

/// One block to 8-bit quants `round(v / scale)` with `scale = max |v| / 127`; returns the scale
/// and the quants' sum. Rounds half to even (as ggml's AVX2 path does).
fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return unsafe { avx2::quantize_block(src, dst) };
    }
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0;
    for (o, &v) in dst.iter_mut().zip(src) {
        let r = (v * inv).round_ties_even() as i32;
        *o = r as i8;
        sum += r;
    }
    (scale, sum)
}

// Register tiles are indexed by row: index loops say what the kernel does.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{group_block_bytes, PackedWeights, QuantizedRows, GROUP_CHUNK_BYTES, QK};
    use super::{ROWS, TILE_M};
    use candle_core::quantized::GgmlDType;

    /// Groups `g0..g1` of `w` against all `m` activation rows, into `out` (`[m, n]`).
    ///
    /// The groups go in chunks of about [`GROUP_CHUNK_BYTES`]; each tile of up to 4 activation
    /// rows runs over a whole chunk, so the chunk's weights come from memory once and the
    /// activations once per chunk.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn groups(
        w: &PackedWeights,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        match w.dtype {
            GgmlDType::Q4_0 => groups_of::<true>(w, kb, xq, m, g0, g1, out),
            _ => groups_of::<false>(w, kb, xq, m, g0, g1, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn groups_of<const Q4: bool>(
        w: &PackedWeights,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        let group_bytes = kb * group_block_bytes(w.dtype);
        let chunk = (GROUP_CHUNK_BYTES / group_bytes).max(1);
        let mut c0 = g0;
        while c0 < g1 {
            let c1 = (c0 + chunk).min(g1);
            let mut i = 0;
            while i < m {
                let rm = (m - i).min(TILE_M);
                for g in c0..c1 {
                    let gp = w.data.as_ptr().add(g * group_bytes);
                    let mut res = [_mm256_setzero_ps(); TILE_M];
                    match rm {
                        1 => tile::<Q4, 1>(gp, kb, xq, i, &mut res),
                        2 => tile::<Q4, 2>(gp, kb, xq, i, &mut res),
                        3 => tile::<Q4, 3>(gp, kb, xq, i, &mut res),
                        _ => tile::<Q4, 4>(gp, kb, xq, i, &mut res),
                    }
                    let cols = (w.n - g * ROWS).min(ROWS);
                    for r in 0..rm {
                        let dst = out.add((i + r) * w.n + g * ROWS);
                        if cols == ROWS {
                            _mm256_storeu_ps(dst, res[r]);
                        } else {
                            let mut tmp = [0f32; ROWS];
                            _mm256_storeu_ps(tmp.as_mut_ptr(), res[r]);
                            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, cols);
                        }
                    }
                }
                i += rm;
            }
            c0 = c1;
        }
    }

    /// The 4 quants of activation row block `xb` at value `at`, in every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast(xb: *const i8, at: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(xb.add(at) as *const i32))
    }

    /// One group (`gp`, its first block column) against `RM` activation rows from `i0`:
    /// `res[r]` lane `l` is row `i0 + r` times weight row `l` of the group.
    #[inline(always)]
    unsafe fn tile<const Q4: bool, const RM: usize>(
        gp: *const u8,
        kb: usize,
        xq: &QuantizedRows,
        i0: usize,
        res: &mut [__m256; TILE_M],
    ) {
        let gbb = if Q4 { 16 + 8 * QK / 2 } else { 16 + 8 * QK };
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); RM];
        let xrow = |r: usize, b: usize| xq.q.as_ptr().add(((i0 + r) * kb + b) * QK);
        for b in 0..kb {
            let blk = gp.add(b * gbb);
            let wd = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let qs = blk.add(16);
            let mut dots = [_mm256_setzero_si256(); RM];
            if Q4 {
                // Unsigned nibbles straight into maddubs; the offset of 8 is taken off once per
                // block through the activations' sum. Each 16-bit lane gathers 8 pair sums of
                // at most 2 * 15 * 127, so it cannot overflow before the final madd.
                let mut s = [_mm256_setzero_si256(); RM];
                for p in 0..4 {
                    let raw = _mm256_loadu_si256(qs.add(32 * p) as *const __m256i);
                    let lo = _mm256_and_si256(raw, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                    for r in 0..RM {
                        let xb = xrow(r, b);
                        s[r] = _mm256_add_epi16(s[r], _mm256_maddubs_epi16(lo, bcast(xb, 4 * p)));
                        s[r] =
                            _mm256_add_epi16(s[r], _mm256_maddubs_epi16(hi, bcast(xb, 16 + 4 * p)));
                    }
                }
                for r in 0..RM {
                    let sums8 = _mm256_set1_epi32(xq.sums8[(i0 + r) * kb + b]);
                    dots[r] = _mm256_sub_epi32(_mm256_madd_epi16(s[r], ones), sums8);
                }
            } else {
                // |w| * (x with w's sign): maddubs needs an unsigned left operand. A pair sum
                // reaches 2 * 127 * 127, so each piece widens to 32 bits at once.
                for c in 0..8 {
                    let q = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                    let qabs = _mm256_sign_epi8(q, q);
                    for r in 0..RM {
                        let sx = _mm256_sign_epi8(bcast(xrow(r, b), 4 * c), q);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qabs, sx), ones);
                        dots[r] = _mm256_add_epi32(dots[r], p);
                    }
                }
            }
            for r in 0..RM {
                let d = _mm256_mul_ps(wd, _mm256_set1_ps(xq.d[(i0 + r) * kb + b]));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dots[r]), acc[r]);
            }
        }
        res[..RM].copy_from_slice(&acc);
    }

    /// See [`super::quantize_block`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, i32) {
        let p = src.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut amax = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
        let amax = _mm_cvtss_f32(m1);
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let mut i = [_mm256_setzero_si256(); 4];
        for j in 0..4 {
            let r = _mm256_round_ps(
                _mm256_mul_ps(v[j], inv),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            i[j] = _mm256_cvtps_epi32(r);
        }
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
        let sum = _mm_cvtsi128_si32(s1);
        // packs work within 128-bit halves: the 32-bit groups come out as 0 2 4 6 1 3 5 7.
        let w01 = _mm256_packs_epi32(i[0], i[1]);
        let w23 = _mm256_packs_epi32(i[2], i[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, b);
        (scale, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let t = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        // A different spread per seed, so scales vary between calls.
        (t * (0.5 + seed as f64 * 0.25)).unwrap()
    }

    /// The packed product equals the plain product of the dequantized weights with the
    /// dequantized 8-bit activations (f64 sums), for odd shapes, both formats, 1-3 threads.
    #[test]
    fn equals_the_dequantized_reference() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
            if !supported(dtype) {
                eprintln!("SKIPPED: no AVX2/FMA/F16C on this CPU");
                return;
            }
            let ns = [1, 7, 8, 9, 13, 17, 40];
            let ms = [1, 2, 3, 4, 5, 17, 128];
            for (idx, (&n, &m)) in ns.iter().cycle().zip(ms.iter()).enumerate() {
                for k in [32, 96, 256] {
                    let n = n + idx;
                    let w = random(n, k, idx as u64);
                    let q = QTensor::quantize(&w, dtype).unwrap();
                    let wd: Vec<f32> = q
                        .dequantize(&Device::Cpu)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let x: Vec<f32> = random(m, k, 3).flatten_all().unwrap().to_vec1().unwrap();
                    let xq = quantize_rows(&x, k);
                    let xd: Vec<f64> =
                        (0..m * k).map(|i| xq.q[i] as f64 * xq.d[i / QK] as f64).collect();
                    let packed = PackedWeights::new(dtype, &q.data().unwrap(), n, k);
                    for threads in [1, 2, 3] {
                        let got = packed.matmul(&x, m, threads);
                        assert_eq!(got.len(), m * n);
                        for i in 0..m {
                            for j in 0..n {
                                let terms = (0..k).map(|c| xd[i * k + c] * wd[j * k + c] as f64);
                                let want: f64 = terms.clone().sum();
                                let size: f64 = terms.map(f64::abs).sum();
                                let a = got[i * n + j] as f64;
                                assert!(
                                    (a - want).abs() <= 1e-5 * size + 1e-30,
                                    "{dtype:?} m{m} n{n} k{k} t{threads} [{i},{j}]: {a} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The vectorised activation quantizer matches the scalar definition.
    #[test]
    fn quantizes_like_the_definition() {
        let x: Vec<f32> = random(4, 64, 1).flatten_all().unwrap().to_vec1().unwrap();
        let mut x = x;
        x[3] = 0.0;
        x[40..72].iter_mut().for_each(|v| *v = 0.0);
        let xq = quantize_rows(&x, 64);
        for b in 0..x.len() / QK {
            let src = &x[b * QK..(b + 1) * QK];
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(xq.d[b], amax / 127.0);
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let want: Vec<i8> = src.iter().map(|v| (v * inv).round_ties_even() as i8).collect();
            assert_eq!(&xq.q[b * QK..(b + 1) * QK], &want[..]);
            assert_eq!(xq.sums8[b], 8 * want.iter().map(|&v| v as i32).sum::<i32>());
        }
    }

    /// Against candle's own quantized product on the same blocks: every tile shape, odd sizes.
    #[test]
    fn agrees_with_candle() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
            if !supported(dtype) {
                eprintln!("SKIPPED: no AVX2/FMA/F16C on this CPU");
                return;
            }
            let shapes = [
                (1, 1, 32),
                (1, 64, 3072),
                (2, 9, 128),
                (3, 6, 64),
                (5, 3, 64),
                (4, 2, 96),
                (13, 7, 256),
                (64, 33, 512),
            ];
            for (m, n, k) in shapes {
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
                let want: Vec<f32> = QMatMul::from_arc(q.clone())
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let packed = PackedWeights::new(dtype, &q.data().unwrap(), n, k);
                for threads in [1, 2, 3] {
                    let got = packed.matmul(&xs, m, threads);
                    for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                        let tol = 1e-3 * (1.0 + b.abs()) * (k as f32).sqrt();
                        assert!(
                            (a - b).abs() <= tol,
                            "{dtype:?} m{m} n{n} k{k} t{threads} [{idx}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
