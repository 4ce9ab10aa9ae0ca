//! Prompt-sized products of block-quantized weights on x86 CPUs with AVX2: `x @ W^T` for many
//! rows of `x` at once, with `W` in GGUF's Q4_0 or Q8_0 blocks.
//!
//! Exists because candle's quantized product computes every (row, column) pair as its own dot
//! product, unpacking each weight block again for every row of the prompt; prompt processing
//! then runs at a fraction of what the cores can do. Here the activations are quantized once
//! to 8-bit blocks (as ggml does), and a micro-kernel keeps a tile of 4 rows by 2 weight rows
//! in registers, so each weight block is loaded and unpacked once per 4 prompt rows and each
//! activation block once per 2 weight rows. The work is split by weight rows across threads.
//!
//! Integer arithmetic is exact; the float sums run in a different order than candle's, so
//! results agree with it to float rounding.

use candle_core::quantized::GgmlDType;

/// Values per block (Q4_0, Q8_0 and the 8-bit activation blocks).
const QK: usize = 32;

/// Whether [`matmul`] handles `dtype` on this CPU.
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

/// Bytes of one weight block of `dtype` (a 2-byte f16 scale and the quants).
fn block_bytes(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4_0 => 2 + QK / 2,
        GgmlDType::Q8_0 => 2 + QK,
        other => panic!("qgemm has no kernel for {other:?}"),
    }
}

/// The activations in 8-bit blocks: quants, one scale per block, and each block's quant sum
/// (for Q4_0, whose weights are stored offset by 8).
struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<i32>,
}

fn quantize_rows(x: &[f32], k: usize) -> QuantizedRows {
    let blocks = x.len() / QK;
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; blocks];
    let mut sums = vec![0i32; blocks];
    for b in 0..blocks {
        let src = &x[b * QK..(b + 1) * QK];
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (dst, &v) in q[b * QK..(b + 1) * QK].iter_mut().zip(src) {
            let r = (v * inv).round() as i32;
            *dst = r as i8;
            sum += r;
        }
        d[b] = scale;
        sums[b] = sum;
    }
    debug_assert_eq!(blocks % (k / QK), 0);
    QuantizedRows { q, d, sums }
}

/// `x @ W^T`: `x` is `[m, k]` row-major float32, `weights` the `n` rows of `W` in `dtype`
/// blocks (`k / 32` blocks a row, GGUF layout). Returns `[m, n]` row-major. `threads` workers
/// split the weight rows. Call only where [`supported`] says so.
pub fn matmul(
    dtype: GgmlDType,
    weights: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    threads: usize,
) -> Vec<f32> {
    assert!(supported(dtype), "qgemm::matmul without AVX2 or for {dtype:?}");
    assert!(k.is_multiple_of(QK) && x.len() == m * k);
    let kb = k / QK;
    let row_bytes = kb * block_bytes(dtype);
    assert_eq!(weights.len(), n * row_bytes, "weights are not {n} rows of {k} values");
    let xq = quantize_rows(x, k);
    // Column-major result: each worker writes the contiguous rows of `out_t` of its weights.
    let mut out_t = vec![0f32; n * m];
    let threads = threads.clamp(1, n.div_ceil(2).max(1));
    // Even split of weight-row pairs.
    let pairs = n.div_ceil(2);
    let per = pairs.div_ceil(threads) * 2;
    std::thread::scope(|s| {
        for (t, chunk) in out_t.chunks_mut(per * m).enumerate() {
            let first = t * per;
            let rows = chunk.len() / m;
            let w = &weights[first * row_bytes..(first + rows) * row_bytes];
            let xq = &xq;
            let mut work = move || {
                // SAFETY: `supported` checked AVX2, FMA and F16C.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx2::columns(dtype, w, rows, kb, xq, m, chunk)
                }
            };
            if t + 1 == threads.min(n.div_ceil(per)) {
                work();
            } else {
                s.spawn(work);
            }
        }
    });
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

// Register tiles are indexed by row and column: index loops say what the kernel does.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QuantizedRows, QK};
    use candle_core::quantized::GgmlDType;

    /// Every output of `rows` weight rows (`w`, `kb` blocks each) against the `m` activation
    /// rows, into `out_t` (`[rows, m]`): tiles of 2 weight rows by 4 activation rows for
    /// prompts, 4 weight rows by 1 activation row for decode, smaller tiles at the edges.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn columns(
        dtype: GgmlDType,
        w: &[u8],
        rows: usize,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        out_t: &mut [f32],
    ) {
        match dtype {
            GgmlDType::Q4_0 => columns_of::<true>(w, rows, kb, xq, m, out_t),
            _ => columns_of::<false>(w, rows, kb, xq, m, out_t),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn columns_of<const Q4: bool>(
        w: &[u8],
        rows: usize,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        out_t: &mut [f32],
    ) {
        let rb = kb * if Q4 { 2 + QK / 2 } else { 2 + QK };
        // Decode-sized inputs have one or few rows: more weight rows a tile instead.
        let wide = m < 4;
        let step = if wide { 4 } else { 2 };
        let mut j = 0;
        while j < rows {
            let rn = (rows - j).min(step);
            let ptr = |c: usize| w.as_ptr().add((j + c.min(rn - 1)) * rb);
            let mut i = 0;
            while i < m {
                let rm = (m - i).min(4);
                let mut res = [[0f32; 4]; 4];
                if wide {
                    for r in 0..rm {
                        let ws = [ptr(0), ptr(1), ptr(2), ptr(3)];
                        let sums = gemv4::<Q4>(ws, kb, xq, i + r);
                        for c in 0..4 {
                            res[c][r] = sums[c];
                        }
                    }
                } else if rm == 4 {
                    tile::<Q4, 2, 4>([ptr(0), ptr(1)], kb, xq, i, &mut res);
                } else {
                    for r in 0..rm {
                        let mut one = [[0f32; 4]; 4];
                        tile::<Q4, 2, 1>([ptr(0), ptr(1)], kb, xq, i + r, &mut one);
                        for c in 0..2 {
                            res[c][r] = one[c][0];
                        }
                    }
                }
                for c in 0..rn {
                    for r in 0..rm {
                        out_t[(j + c) * m + i + r] = res[c][r];
                    }
                }
                i += rm;
            }
            j += rn;
        }
    }

    #[inline(always)]
    unsafe fn scale(block: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*block, *block.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// `RN` weight rows (`wp`, pointers to their first block) by `RM` activation rows
    /// starting at `i0`: `res[c][r]`. `Q4` selects Q4_0 weights (4-bit quants offset by 8)
    /// over Q8_0 (signed 8-bit).
    #[inline(always)]
    unsafe fn tile<const Q4: bool, const RN: usize, const RM: usize>(
        wp: [*const u8; RN],
        kb: usize,
        xq: &QuantizedRows,
        i0: usize,
        res: &mut [[f32; 4]; 4],
    ) {
        let bb = if Q4 { 2 + QK / 2 } else { 2 + QK };
        let mut acc = [[_mm256_setzero_ps(); RM]; RN];
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0f);
        for b in 0..kb {
            // Unpack the weight blocks once for all RM rows.
            let mut wq = [_mm256_setzero_si256(); RN];
            let mut wabs = [_mm256_setzero_si256(); RN];
            let mut wd = [0f32; RN];
            for c in 0..RN {
                let blk = wp[c].add(b * bb);
                wd[c] = scale(blk);
                if Q4 {
                    let packed = _mm_loadu_si128(blk.add(2) as *const __m128i);
                    let hi = _mm_srli_epi16(packed, 4);
                    wq[c] = _mm256_and_si256(_mm256_set_m128i(hi, packed), low);
                } else {
                    let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    wq[c] = q;
                    wabs[c] = _mm256_sign_epi8(q, q);
                }
            }
            for r in 0..RM {
                let row = i0 + r;
                let xb = xq.q.as_ptr().add((row * kb + b) * QK);
                let x = _mm256_loadu_si256(xb as *const __m256i);
                let xd = xq.d[row * kb + b];
                for c in 0..RN {
                    let prod = if Q4 {
                        // (nibble - 8) * x summed = nibble * x summed - 8 * sum(x): the
                        // unsigned nibbles go straight into maddubs.
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq[c], x), ones);
                        _mm256_sub_epi32(p, _mm256_set1_epi32(xq.sums[row * kb + b]))
                    } else {
                        // |w| * (x with w's sign): maddubs needs an unsigned left operand.
                        let sx = _mm256_sign_epi8(x, wq[c]);
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[c], sx), ones)
                    };
                    let d = _mm256_set1_ps(wd[c] * xd);
                    acc[c][r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc[c][r]);
                }
            }
        }
        for c in 0..RN {
            for r in 0..RM {
                res[c][r] = hsum(acc[c][r]);
            }
        }
    }

    /// One activation row (`row`) against 4 weight rows: the decode case. Per block, the four
    /// 8-lane integer dot products are reduced into one 4-lane vector (one lane per weight row)
    /// before the float scaling, so the scaling, the Q4_0 offset and the accumulation cost one
    /// 128-bit operation each per block instead of one 256-bit operation per weight row, and no
    /// horizontal sum is left at the end.
    #[inline(always)]
    unsafe fn gemv4<const Q4: bool>(
        wp: [*const u8; 4],
        kb: usize,
        xq: &QuantizedRows,
        row: usize,
    ) -> [f32; 4] {
        let bb = if Q4 { 2 + QK / 2 } else { 2 + QK };
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = _mm_setzero_ps();
        let xbase = xq.q.as_ptr().add(row * kb * QK);
        for b in 0..kb {
            let x = _mm256_loadu_si256(xbase.add(b * QK) as *const __m256i);
            let mut p = [_mm256_setzero_si256(); 4];
            let mut bits = [0u16; 4];
            for c in 0..4 {
                let blk = wp[c].add(b * bb);
                bits[c] = u16::from_le_bytes([*blk, *blk.add(1)]);
                p[c] = if Q4 {
                    let packed = _mm_loadu_si128(blk.add(2) as *const __m128i);
                    let hi = _mm_srli_epi16(packed, 4);
                    let q = _mm256_and_si256(_mm256_set_m128i(hi, packed), low);
                    _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones)
                } else {
                    let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    let sx = _mm256_sign_epi8(x, q);
                    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), sx), ones)
                };
            }
            // [p0 p1 p2 p3] lanes summed per weight row: two rounds of pairwise adds, then the
            // two 128-bit halves.
            let h01 = _mm256_hadd_epi32(p[0], p[1]);
            let h23 = _mm256_hadd_epi32(p[2], p[3]);
            let h = _mm256_hadd_epi32(h01, h23);
            let mut dots = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            if Q4 {
                // (nibble - 8) * x summed = nibble * x summed - 8 * sum(x).
                dots = _mm_sub_epi32(dots, _mm_set1_epi32(8 * xq.sums[row * kb + b]));
            }
            let scales = _mm_cvtph_ps(_mm_set_epi16(
                0,
                0,
                0,
                0,
                bits[3] as i16,
                bits[2] as i16,
                bits[1] as i16,
                bits[0] as i16,
            ));
            let d = _mm_mul_ps(scales, _mm_set1_ps(xq.d[row * kb + b]));
            acc = _mm_fmadd_ps(d, _mm_cvtepi32_ps(dots), acc);
        }
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), acc);
        out
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

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
                for threads in [1, 2, 3] {
                    let got = matmul(dtype, &q.data().unwrap(), n, k, &xs, m, threads);
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
