//! The vector operations qgemm's kernels are written in, for two register widths: 256 bits
//! (AVX2, with `dpbusd` from AVX-VNNI or AVX-512 VNNI where the CPU has it) for groups of 8
//! weight rows, and 512 bits (AVX-512 F, BW, VL, VNNI) for groups of 16.
//!
//! Exists so that one kernel text serves both widths: a 32-bit lane holds 4 quants of one
//! weight row in both, so the kernels differ only in how many rows a register holds
//! ([`Simd::LANES`]) and in the intrinsics behind these methods. Every method is
//! `#[inline(always)]` and is only ever inlined into a function compiled with the target
//! features its intrinsics need (the entry points in `qgemm.rs`).

use std::arch::x86_64::*;

/// Which `dpbusd` encoding a 256-bit variant has: none (AVX2 `maddubs` pairs instead).
pub(super) const V_AVX2: u8 = 0;
/// AVX-VNNI (VEX encoded).
pub(super) const V_AVX_VNNI: u8 = 1;
/// AVX-512 VNNI with VL (EVEX encoded, on 256-bit registers).
pub(super) const V_AVX512_VNNI: u8 = 2;

/// One register width and instruction set (see the module docs). `I` holds bytes, 16-bit or
/// 32-bit integers, `F` one f32 per lane.
pub(super) trait Simd {
    /// 32-bit lanes of a register, which is the number of weight rows of a group.
    const LANES: usize;
    /// Whether [`Simd::dpbusd`] exists (else the kernels take `maddubs` and `madd`).
    const VNNI: bool;
    type I: Copy;
    type F: Copy;

    unsafe fn zero() -> Self::I;
    unsafe fn zero_f() -> Self::F;
    /// `LANES * 4` bytes from `p` (unaligned).
    unsafe fn load(p: *const u8) -> Self::I;
    unsafe fn splat8(v: i8) -> Self::I;
    unsafe fn splat32(v: i32) -> Self::I;
    unsafe fn splat_f(v: f32) -> Self::F;
    /// The 4 bytes at `p` in every 32-bit lane.
    unsafe fn bcast4(p: *const i8) -> Self::I;
    unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn xor(a: Self::I, b: Self::I) -> Self::I;
    /// 16-bit lanes shifted right (logical) by 1, 2 or 4, left by 4.
    unsafe fn shr16_1(a: Self::I) -> Self::I;
    unsafe fn shr16_2(a: Self::I) -> Self::I;
    unsafe fn shr16_4(a: Self::I) -> Self::I;
    unsafe fn shl16_4(a: Self::I) -> Self::I;
    /// 32-bit lanes shifted left by 5.
    unsafe fn shl32_5(a: Self::I) -> Self::I;
    /// Each 32-bit lane's low (`lo16`) or high (`hi16`) i16, sign-extended.
    unsafe fn lo16(a: Self::I) -> Self::I;
    unsafe fn hi16(a: Self::I) -> Self::I;
    unsafe fn add16(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn add32(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn sub32(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn mullo32(a: Self::I, b: Self::I) -> Self::I;
    /// `acc` plus, per 32-bit lane, the 4 products of `w`'s unsigned bytes with `x`'s signed
    /// bytes (only where [`Simd::VNNI`]).
    unsafe fn dpbusd(acc: Self::I, w: Self::I, x: Self::I) -> Self::I;
    /// Unsigned times signed bytes, adjacent pairs summed to i16 (saturating).
    unsafe fn maddubs(w: Self::I, x: Self::I) -> Self::I;
    /// i16 times i16, adjacent pairs summed to i32.
    unsafe fn madd(a: Self::I, b: Self::I) -> Self::I;
    /// `a` with the sign of `b` (negated where `b < 0`, zero where `b == 0`).
    unsafe fn sign8(a: Self::I, b: Self::I) -> Self::I;
    /// Bytes of `a` picked within each 128-bit lane by `idx`.
    unsafe fn shuffle8(a: Self::I, idx: Self::I) -> Self::I;
    /// The 16 bytes at `p`, repeated in every 128-bit lane.
    unsafe fn splat128(p: &[u8; 16]) -> Self::I;
    /// `LANES * 2` signed bytes at `p` widened to i16 (lane `l`: bytes `2l`, `2l + 1`).
    unsafe fn widen_i8(p: *const u8) -> Self::I;
    /// `LANES` f16 at `p`, `LANES` unsigned bytes at `p`, as floats.
    unsafe fn f16s(p: *const u8) -> Self::F;
    unsafe fn u8s(p: *const u8) -> Self::F;
    unsafe fn to_f(a: Self::I) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// `a * b + c` and `c - a * b`.
    unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// `LANES` floats to `p` (unaligned).
    unsafe fn store(p: *mut f32, a: Self::F);
}

/// 256-bit registers, groups of 8 rows; `V` is one of the `V_*` encodings.
pub(super) struct W256<const V: u8>;

/// 512-bit registers, groups of 16 rows.
pub(super) struct W512;

impl<const V: u8> Simd for W256<V> {
    const LANES: usize = 8;
    const VNNI: bool = V != V_AVX2;
    type I = __m256i;
    type F = __m256;

    #[inline(always)]
    unsafe fn zero() -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn zero_f() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }
    #[inline(always)]
    unsafe fn splat8(v: i8) -> __m256i {
        _mm256_set1_epi8(v)
    }
    #[inline(always)]
    unsafe fn splat32(v: i32) -> __m256i {
        _mm256_set1_epi32(v)
    }
    #[inline(always)]
    unsafe fn splat_f(v: f32) -> __m256 {
        _mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }
    #[inline(always)]
    unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
        _mm256_and_si256(a, b)
    }
    #[inline(always)]
    unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
        _mm256_or_si256(a, b)
    }
    #[inline(always)]
    unsafe fn xor(a: __m256i, b: __m256i) -> __m256i {
        _mm256_xor_si256(a, b)
    }
    #[inline(always)]
    unsafe fn shr16_1(a: __m256i) -> __m256i {
        _mm256_srli_epi16(a, 1)
    }
    #[inline(always)]
    unsafe fn shr16_2(a: __m256i) -> __m256i {
        _mm256_srli_epi16(a, 2)
    }
    #[inline(always)]
    unsafe fn shr16_4(a: __m256i) -> __m256i {
        _mm256_srli_epi16(a, 4)
    }
    #[inline(always)]
    unsafe fn shl16_4(a: __m256i) -> __m256i {
        _mm256_slli_epi16(a, 4)
    }
    #[inline(always)]
    unsafe fn shl32_5(a: __m256i) -> __m256i {
        _mm256_slli_epi32(a, 5)
    }
    #[inline(always)]
    unsafe fn lo16(a: __m256i) -> __m256i {
        _mm256_srai_epi32(_mm256_slli_epi32(a, 16), 16)
    }
    #[inline(always)]
    unsafe fn hi16(a: __m256i) -> __m256i {
        _mm256_srai_epi32(a, 16)
    }
    #[inline(always)]
    unsafe fn add16(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi16(a, b)
    }
    #[inline(always)]
    unsafe fn add32(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn sub32(a: __m256i, b: __m256i) -> __m256i {
        _mm256_sub_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn mullo32(a: __m256i, b: __m256i) -> __m256i {
        _mm256_mullo_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        match V {
            V_AVX_VNNI => _mm256_dpbusd_avx_epi32(acc, w, x),
            V_AVX512_VNNI => _mm256_dpbusd_epi32(acc, w, x),
            // The kernels take maddubs where VNNI is false; this is dpbusd's exact result all
            // the same: even and odd bytes widened to i16, multiplied and pair-summed to i32.
            _ => {
                let lo8 = _mm256_set1_epi16(0xff);
                let w_even = _mm256_and_si256(w, lo8);
                let w_odd = _mm256_srli_epi16(w, 8);
                let x_even = _mm256_srai_epi16(_mm256_slli_epi16(x, 8), 8);
                let x_odd = _mm256_srai_epi16(x, 8);
                let even = _mm256_madd_epi16(w_even, x_even);
                _mm256_add_epi32(acc, _mm256_add_epi32(even, _mm256_madd_epi16(w_odd, x_odd)))
            }
        }
    }
    #[inline(always)]
    unsafe fn maddubs(w: __m256i, x: __m256i) -> __m256i {
        _mm256_maddubs_epi16(w, x)
    }
    #[inline(always)]
    unsafe fn madd(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(a, b)
    }
    #[inline(always)]
    unsafe fn sign8(a: __m256i, b: __m256i) -> __m256i {
        _mm256_sign_epi8(a, b)
    }
    #[inline(always)]
    unsafe fn shuffle8(a: __m256i, idx: __m256i) -> __m256i {
        _mm256_shuffle_epi8(a, idx)
    }
    #[inline(always)]
    unsafe fn splat128(p: &[u8; 16]) -> __m256i {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(p.as_ptr() as *const __m128i))
    }
    #[inline(always)]
    unsafe fn widen_i8(p: *const u8) -> __m256i {
        _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn f16s(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn u8s(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn to_f(a: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(a)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, a: __m256) {
        _mm256_storeu_ps(p, a)
    }
}

impl Simd for W512 {
    const LANES: usize = 16;
    const VNNI: bool = true;
    type I = __m512i;
    type F = __m512;

    #[inline(always)]
    unsafe fn zero() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn zero_f() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p as *const __m512i)
    }
    #[inline(always)]
    unsafe fn splat8(v: i8) -> __m512i {
        _mm512_set1_epi8(v)
    }
    #[inline(always)]
    unsafe fn splat32(v: i32) -> __m512i {
        _mm512_set1_epi32(v)
    }
    #[inline(always)]
    unsafe fn splat_f(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }
    #[inline(always)]
    unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
        _mm512_and_si512(a, b)
    }
    #[inline(always)]
    unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
        _mm512_or_si512(a, b)
    }
    #[inline(always)]
    unsafe fn xor(a: __m512i, b: __m512i) -> __m512i {
        _mm512_xor_si512(a, b)
    }
    #[inline(always)]
    unsafe fn shr16_1(a: __m512i) -> __m512i {
        _mm512_srli_epi16(a, 1)
    }
    #[inline(always)]
    unsafe fn shr16_2(a: __m512i) -> __m512i {
        _mm512_srli_epi16(a, 2)
    }
    #[inline(always)]
    unsafe fn shr16_4(a: __m512i) -> __m512i {
        _mm512_srli_epi16(a, 4)
    }
    #[inline(always)]
    unsafe fn shl16_4(a: __m512i) -> __m512i {
        _mm512_slli_epi16(a, 4)
    }
    #[inline(always)]
    unsafe fn shl32_5(a: __m512i) -> __m512i {
        _mm512_slli_epi32(a, 5)
    }
    #[inline(always)]
    unsafe fn lo16(a: __m512i) -> __m512i {
        _mm512_srai_epi32(_mm512_slli_epi32(a, 16), 16)
    }
    #[inline(always)]
    unsafe fn hi16(a: __m512i) -> __m512i {
        _mm512_srai_epi32(a, 16)
    }
    #[inline(always)]
    unsafe fn add16(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi16(a, b)
    }
    #[inline(always)]
    unsafe fn add32(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn sub32(a: __m512i, b: __m512i) -> __m512i {
        _mm512_sub_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn mullo32(a: __m512i, b: __m512i) -> __m512i {
        _mm512_mullo_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn dpbusd(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, w, x)
    }
    #[inline(always)]
    unsafe fn maddubs(w: __m512i, x: __m512i) -> __m512i {
        _mm512_maddubs_epi16(w, x)
    }
    #[inline(always)]
    unsafe fn madd(a: __m512i, b: __m512i) -> __m512i {
        _mm512_madd_epi16(a, b)
    }
    #[inline(always)]
    unsafe fn sign8(a: __m512i, b: __m512i) -> __m512i {
        // AVX-512 has no psignb: negate under the mask of negative bytes, zero under the
        // mask of zero bytes.
        let zero = _mm512_setzero_si512();
        let negated = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(b), zero, a);
        _mm512_mask_mov_epi8(negated, _mm512_cmpeq_epi8_mask(b, zero), zero)
    }
    #[inline(always)]
    unsafe fn shuffle8(a: __m512i, idx: __m512i) -> __m512i {
        _mm512_shuffle_epi8(a, idx)
    }
    #[inline(always)]
    unsafe fn splat128(p: &[u8; 16]) -> __m512i {
        _mm512_broadcast_i32x4(_mm_loadu_si128(p.as_ptr() as *const __m128i))
    }
    #[inline(always)]
    unsafe fn widen_i8(p: *const u8) -> __m512i {
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn f16s(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn u8s(p: *const u8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn to_f(a: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(a)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, a: __m512) {
        _mm512_storeu_ps(p, a)
    }
}
