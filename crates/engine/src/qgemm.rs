//! Products of block-quantized weights on x86 CPUs with AVX2: `x @ W^T` for one row of `x`
//! (decode) or many (prompts), with `W` in GGUF's Q4_0, Q8_0, Q4_K, Q5_K or Q6_K blocks.
//!
//! Exists because candle's quantized product computes every (row, column) pair as its own dot
//! product, unpacking each weight block again for every row of the prompt, and reduces every
//! dot product horizontally; decode then reads the weights at a fraction of the memory
//! bandwidth and prompts run at a fraction of what the cores can do.
//!
//! The weights are repacked once, at load, into groups of 8 rows ([`PackedWeights`]): for each
//! block column, the 8 rows' scales, then their quants interleaved 4 values at a time, so
//! that one 32-bit lane of a 256-bit register holds 4 consecutive quants of one row and the 8
//! lanes hold the 8 rows. One broadcast 4-byte piece of an activation block then feeds all 8
//! rows in one `maddubs`, the 8 row sums stay in one register (one lane per row, no horizontal
//! reduction) and the 8 scales convert in one instruction. The activations are quantized once
//! to 8-bit blocks of 32 (as ggml does for Q4_0). A tile is 8 weight rows by up to 4 activation
//! rows: each weight register is unpacked once for the 4 rows. The work is split by 8-row
//! groups across a persistent pool of threads (`qgemm_pool.rs`). On CPUs with AVX-512
//! ([`Isa::Avx512`]) the same layout holds groups of 16 rows for 512-bit registers; the kernels
//! are written once over the register width (`qgemm/simd.rs`).
//!
//! K-quants (super-blocks of 256 values) go the same way, one 32-value sub-block at a time
//! against one activation block: their quants are stored as unsigned values (Q6_K's offset of
//! 32 and Q4_K/Q5_K's mins are taken off through the activation blocks' sums), low 4 bits as
//! nibbles and the fifth (Q5_K) or fifth and sixth (Q6_K) bits in separate bit planes; the
//! per-sub-block scales and mins stay 8-bit integers (unpacked from Q4_K/Q5_K's 6-bit fields),
//! so the repacked weights hold exactly the values of the GGUF blocks, in 2-3% more bytes.
//!
//! The layout follows the idea of ggml's `repack.cpp` (`block_q4_0x8`) in its own arrangement.
//! Integer arithmetic is exact; the float sums run in a different order than a plain dot
//! product, so results agree with the dequantized weights to float rounding.

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use crate::huge_pages::huge_pages;
use crate::qgemm_pool;

#[cfg(target_arch = "x86_64")]
mod simd;

/// Values per block (Q4_0, Q8_0, the 8-bit activation blocks and K-quant sub-blocks).
const QK: usize = 32;
/// Values per K-quant super-block.
const QK_K: usize = 256;
/// Activation rows of a prompt tile.
const TILE_M: usize = 4;
/// Bytes of one group's weights that a prompt pass keeps hot in the cache while every tile of
/// activation rows goes over them.
const GROUP_CHUNK_BYTES: usize = 160 << 10;

/// Kernel variants, as const generic parameters.
const F_Q4_0: u8 = 0;
const F_Q8_0: u8 = 1;
const F_Q4K: u8 = 2;
const F_Q5K: u8 = 3;
const F_Q6K: u8 = 4;

/// Offsets in one K-quant group super-block of `r` rows. Q4_K/Q5_K: `r` f16 `d` at 0, `r` f16
/// `dmin`, then the scales and mins (one byte per sub-block and row, sub-block-major), the
/// nibbles (4 pairs of 8 pieces of `4r` bytes), and (Q5_K) the fifth bits (8 planes of `4r`).
const fn k45_sc(r: usize) -> usize {
    4 * r
}
const fn k45_min(r: usize) -> usize {
    k45_sc(r) + 8 * r
}
const fn k45_qs(r: usize) -> usize {
    k45_min(r) + 8 * r
}
const fn k45_qh(r: usize) -> usize {
    k45_qs(r) + 128 * r
}
/// Q6_K: `r` f16 `d` at 0, then per sub-block of 32 the rows' two int8 scales (`2r` bytes), the
/// nibbles, and the two high bits (two planes of `4r` bytes per sub-block).
const fn k6_sc(r: usize) -> usize {
    2 * r
}
const fn k6_qs(r: usize) -> usize {
    k6_sc(r) + 16 * r
}
const fn k6_qh(r: usize) -> usize {
    k6_qs(r) + 128 * r
}

/// Whether the engine should run matrices of `dtype` through [`PackedWeights`] on this CPU
/// (Q4_0, Q8_0, Q4_K, Q5_K with AVX2, FMA, F16C): it repacks them at load where this says so.
///
/// Q6_K runs here only where [`q6k_enabled`] says so (on CPUs with AVX-512, by default).
pub fn supported(dtype: GgmlDType) -> bool {
    has_kernel(dtype) && (dtype != GgmlDType::Q6K || q6k_enabled())
}

/// Whether [`PackedWeights::matmul`] can run `dtype` on this CPU.
fn has_kernel(dtype: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(
            dtype,
            GgmlDType::Q4_0 | GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
        ) && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        false
    }
}

/// The instruction set a product's inner loop runs with: the 8-bit dot products as AVX2's
/// `maddubs` and `madd` pairs, or as one VNNI `dpbusd` (AVX-VNNI, or AVX-512 VNNI on 256-bit
/// registers), which also spares the 16-bit partial sums and their widening.
///
/// Exists because most CPUs that serve (Ice Lake and later Xeons, Zen 4 and later) have VNNI,
/// and llama.cpp uses it where they do; [`Isa::best`] is what [`PackedWeights::matmul`] takes,
/// and the others stay callable so tests and benches can hold each against the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2, FMA and F16C.
    Avx2,
    /// The same with AVX-VNNI.
    AvxVnni,
    /// The same with AVX-512 VNNI and VL (256-bit registers).
    Avx512Vnni,
    /// AVX-512 F, BW, VL and VNNI on 512-bit registers, in groups of 16 rows: one `dpbusd`
    /// does the work of two, and the per-block float arithmetic covers twice the rows.
    Avx512,
}

impl Isa {
    /// The variants this CPU can run, the plainest first (none without AVX2, FMA and F16C).
    pub fn available() -> Vec<Isa> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                out.push(Isa::Avx2);
                if has!("avxvnni") {
                    out.push(Isa::AvxVnni);
                }
                if has!("avx512vnni") && has!("avx512vl") {
                    out.push(Isa::Avx512Vnni);
                    if has!("avx512f") && has!("avx512bw") {
                        out.push(Isa::Avx512);
                    }
                }
            }
        }
        out
    }

    /// The variant [`PackedWeights::new`] packs for and [`PackedWeights::matmul`] runs:
    /// 512-bit AVX-512 where the CPU has it, else AVX-VNNI, else the last available.
    /// `PHI_QGEMM_ISA` (`avx2`, `avx-vnni`, `avx512-vnni`, `avx512`) picks another one the CPU
    /// has, so whole models can be measured with each.
    pub fn best() -> Option<Isa> {
        static BEST: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let all = Isa::available();
            if let Some(want) = std::env::var("PHI_QGEMM_ISA").ok().and_then(|v| Isa::parse(&v)) {
                if all.contains(&want) {
                    return Some(want);
                }
            }
            [Isa::Avx512, Isa::AvxVnni]
                .into_iter()
                .find(|i| all.contains(i))
                .or(all.last().copied())
        })
    }

    /// The variant a name of `PHI_QGEMM_ISA` stands for.
    pub fn parse(name: &str) -> Option<Isa> {
        match name {
            "avx2" => Some(Isa::Avx2),
            "avx-vnni" => Some(Isa::AvxVnni),
            "avx512-vnni" => Some(Isa::Avx512Vnni),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// Weight rows per group in the packing this variant runs on (one per 32-bit lane).
    pub fn group_rows(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            _ => 8,
        }
    }
}

/// Whether Q6_K runs through this kernel rather than candle's: by default where
/// [`Isa::best`] is [`Isa::Avx512`], whose Q6_K product took 0.83 ms against candle's 0.88 ms
/// for one row of a `[16384, 3072]` matrix, 1.01 against 2.75 for 4 rows and 15.3 against 24.0
/// for 128 (best of 40 or 8 alternating calls on a Zen 5 EPYC, 2 threads). With 256-bit
/// registers it was slower than candle for prompts (53.5 ms for 128 rows), so the others keep
/// candle's. `PHI_QGEMM_Q6K=1` (or `0`) turns it on (or off) everywhere, for measuring.
pub fn q6k_enabled() -> bool {
    match std::env::var("PHI_QGEMM_Q6K").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => Isa::best() == Some(Isa::Avx512),
    }
}

/// The kernel variant of `dtype`.
fn variant(dtype: GgmlDType) -> u8 {
    match dtype {
        GgmlDType::Q4_0 => F_Q4_0,
        GgmlDType::Q8_0 => F_Q8_0,
        GgmlDType::Q4K => F_Q4K,
        GgmlDType::Q5K => F_Q5K,
        GgmlDType::Q6K => F_Q6K,
        other => panic!("qgemm has no kernel for {other:?}"),
    }
}

/// Values in one GGUF block of variant `f`, and the block's bytes.
const fn gguf_block(f: u8) -> (usize, usize) {
    match f {
        F_Q4_0 => (QK, 2 + QK / 2),
        F_Q8_0 => (QK, 2 + QK),
        F_Q4K => (QK_K, 4 + 12 + QK_K / 2),
        F_Q5K => (QK_K, 4 + 12 + QK_K / 8 + QK_K / 2),
        _ => (QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2),
    }
}

/// Bytes of one block column of one group of `r` rows of variant `f` (Q4_0/Q8_0: `r` f16
/// scales, then `r` rows of quants; K-quants: see [`k45_sc`] and [`k6_sc`]).
const fn group_block_bytes(f: u8, r: usize) -> usize {
    match f {
        F_Q4_0 => 2 * r + r * QK / 2,
        F_Q8_0 => 2 * r + r * QK,
        F_Q4K => k45_qh(r),
        F_Q5K => k45_qh(r) + r * QK_K / 8,
        _ => k6_qh(r) + r * QK_K / 4,
    }
}

/// A quantized matrix `[n, k]` in groups of `r` = 8 (or 16) rows (module docs). Group `g`,
/// block column `b` sits at `(g * k / block + b) * group_block_bytes`. For Q4_0 and Q8_0: `r`
/// f16 scales (rows `rg..rg+r`), then `4r`-byte pieces whose 32-bit lane `l` holds 4 quant bytes
/// of row `rg + l`:
///
/// - Q8_0: piece `c` (0..8) holds the row's values `4c..4c+4`;
/// - Q4_0: piece `p` (0..4) holds the row's bytes `4p..4p+4`, so its low nibbles are values
///   `4p..4p+4` and its high nibbles values `16+4p..16+4p+4` (GGUF's nibble order, offset 8).
///
/// For K-quants, per super-block: the rows' f16 `d` (and `dmin`), their scales (and mins) as
/// bytes, then for each pair `i` of 32-value sub-blocks 8 pieces `p`, whose lane `l` byte `b`
/// holds the low 4 bits of row `l`'s unsigned quants `64i + 4p + b` (low nibble) and
/// `64i + 32 + 4p + b` (high nibble); then, Q5_K, one `4r`-byte plane per sub-block `c` whose
/// lane `l` byte `b` has at bit `p` the fifth bit of value `32c + 4p + b`; Q6_K, two planes per
/// sub-block (pieces 0..4 and 4..8), bits `2p, 2p + 1` holding bits 4 and 5 of that piece's value.
///
/// Rows past `n` in the last group are zero (scale 0) and their outputs are never written.
pub struct PackedWeights {
    dtype: GgmlDType,
    n: usize,
    k: usize,
    /// Rows per group: 8, or 16 for [`Isa::Avx512`].
    group: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeights")
            .field("dtype", &self.dtype)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("group", &self.group)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl PackedWeights {
    /// Repacks `blocks`, the `n` rows of `W` in GGUF layout (`k / 32` or `k / 256` blocks a row).
    pub fn new(dtype: GgmlDType, blocks: &[u8], n: usize, k: usize) -> Self {
        let isa = Isa::best().unwrap_or(Isa::Avx2);
        Self::new_for(isa, dtype, blocks, n, k)
    }

    /// [`Self::new`] in the group size of `isa` ([`Isa::group_rows`]), for
    /// [`Self::matmul_with`] that `isa`.
    pub fn new_for(isa: Isa, dtype: GgmlDType, blocks: &[u8], n: usize, k: usize) -> Self {
        let rows = isa.group_rows();
        let f = variant(dtype);
        let (bk, bb) = gguf_block(f);
        assert!(k.is_multiple_of(bk), "k = {k} is not a multiple of {bk}");
        let kb = k / bk;
        assert_eq!(blocks.len(), n * kb * bb, "blocks are not {n} rows of {k} values");
        let gbb = group_block_bytes(f, rows);
        let groups = n.div_ceil(rows);
        // Decode streams every matrix once a token: 2 MiB pages spare it a TLB miss per 4 KiB.
        let mut data = huge_pages(vec![0u8; groups * kb * gbb]);
        // Groups are independent; a 3.8B-parameter file has millions of them to unpack.
        data.par_chunks_exact_mut(kb * gbb).enumerate().for_each(|(g, group)| {
            for (b, dst) in group.chunks_exact_mut(gbb).enumerate() {
                for l in 0..rows.min(n - g * rows) {
                    let src = &blocks[((g * rows + l) * kb + b) * bb..][..bb];
                    if f == F_Q4_0 || f == F_Q8_0 {
                        dst[2 * l..2 * l + 2].copy_from_slice(&src[..2]);
                        for piece in 0..(bb - 2) / 4 {
                            let at = 2 * rows + 4 * rows * piece + 4 * l;
                            dst[at..at + 4].copy_from_slice(&src[2 + 4 * piece..2 + 4 * piece + 4]);
                        }
                    } else {
                        pack_k_row(f, rows, src, dst, l);
                    }
                }
            }
        });
        Self { dtype, n, k, group: rows, data }
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

    /// Bytes held (the original blocks, at most 7 zero rows, and for Q4_K/Q5_K the scales and
    /// mins unpacked to a byte each).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// `x @ W^T`: `x` is `[m, k]` row-major float32; returns `[m, n]` row-major. `threads`
    /// workers split the 8-row groups. Call only where [`supported`] says so (or for Q6_K on a
    /// CPU with AVX2, FMA and F16C).
    pub fn matmul(&self, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        let isa = Isa::best().expect("qgemm without AVX2, FMA and F16C");
        self.matmul_with(isa, x, m, threads)
    }

    /// [`Self::matmul`] with the inner loop of `isa`, which must be one of
    /// [`Isa::available`] and have the group size these weights were packed in.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        assert!(has_kernel(self.dtype), "qgemm without AVX2 or for {:?}", self.dtype);
        assert!(Isa::available().contains(&isa), "{isa:?} is not available on this CPU");
        assert_eq!(isa.group_rows(), self.group, "{isa:?} runs other groups than these weights'");
        assert_eq!(x.len(), m * self.k, "x is not {m} rows of {}", self.k);
        let mut out = vec![0f32; m * self.n];
        if m == 0 || self.n == 0 {
            return out;
        }
        let xq = quantize_rows(x, self.k);
        let f = variant(self.dtype);
        let kb = self.k / gguf_block(f).0;
        let groups = self.n.div_ceil(self.group);
        let parts = threads.clamp(1, groups);
        let per = groups.div_ceil(parts);
        let parts = groups.div_ceil(per);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let job = |t: usize| {
            let g0 = t * per;
            let g1 = (g0 + per).min(groups);
            let out_ptr = &out_ptr;
            // SAFETY: `has_kernel` checked AVX2, FMA and F16C, and `Isa::available` the VNNI
            // extension `isa` needs; part `t` writes only the output columns of its groups
            // `g0..g1`, which no other part writes, and `out` outlives the pool call.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let o = out_ptr.0;
                match isa {
                    Isa::Avx2 => kernels::groups_avx2(self, f, kb, &xq, m, g0, g1, o),
                    Isa::AvxVnni => kernels::groups_avx_vnni(self, f, kb, &xq, m, g0, g1, o),
                    Isa::Avx512Vnni => kernels::groups_avx512_vnni(self, f, kb, &xq, m, g0, g1, o),
                    Isa::Avx512 => kernels::groups_avx512(self, f, kb, &xq, m, g0, g1, o),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (g0, g1, out_ptr, f, kb, isa);
        };
        qgemm_pool::run(parts, &job);
        out
    }
}

/// Q4_K/Q5_K's 6-bit scales and mins of the 8 sub-blocks, from the block's 12 packed bytes:
/// sub-blocks 0..4 in the low 6 bits of bytes 0..4 (scales) and 4..8 (mins); sub-blocks 4..8
/// in the nibbles of bytes 8..12 with their top 2 bits in the top bits of bytes 0..8.
fn scales_mins(p: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = p[j] & 63;
        mn[j] = p[j + 4] & 63;
        sc[j + 4] = (p[j + 8] & 0x0f) | ((p[j] >> 6) << 4);
        mn[j + 4] = (p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Writes row `l` of one K-quant GGUF block `src` into the group super-block `dst` (layout in
/// [`PackedWeights`]).
fn pack_k_row(f: u8, rows: usize, src: &[u8], dst: &mut [u8], l: usize) {
    let piece = 4 * rows;
    // The row's 256 quants as unsigned values (Q4_K 0..16, Q5_K 0..32, Q6_K 0..64).
    let mut v = [0u8; QK_K];
    if f == F_Q6K {
        let (ql, qh, sc) = (&src[..128], &src[128..192], &src[192..208]);
        dst[2 * l..2 * l + 2].copy_from_slice(&src[208..210]);
        for c in 0..8 {
            dst[k6_sc(rows) + 2 * rows * c + 2 * l] = sc[2 * c];
            dst[k6_sc(rows) + 2 * rows * c + 2 * l + 1] = sc[2 * c + 1];
        }
        for h in 0..2 {
            for t in 0..32 {
                let (a, b, hb) = (ql[64 * h + t], ql[64 * h + 32 + t], qh[32 * h + t]);
                v[128 * h + t] = (a & 0x0f) | ((hb & 3) << 4);
                v[128 * h + 32 + t] = (b & 0x0f) | (((hb >> 2) & 3) << 4);
                v[128 * h + 64 + t] = (a >> 4) | (((hb >> 4) & 3) << 4);
                v[128 * h + 96 + t] = (b >> 4) | (((hb >> 6) & 3) << 4);
            }
        }
    } else {
        dst[2 * l..2 * l + 2].copy_from_slice(&src[..2]);
        dst[2 * rows + 2 * l..2 * rows + 2 * l + 2].copy_from_slice(&src[2..4]);
        let (sc, mn) = scales_mins(&src[4..16]);
        for j in 0..8 {
            dst[k45_sc(rows) + rows * j + l] = sc[j];
            dst[k45_min(rows) + rows * j + l] = mn[j];
        }
        let qs = if f == F_Q5K { &src[48..176] } else { &src[16..144] };
        for i in 0..4 {
            for t in 0..32 {
                v[64 * i + t] = qs[32 * i + t] & 0x0f;
                v[64 * i + 32 + t] = qs[32 * i + t] >> 4;
            }
        }
        if f == F_Q5K {
            // Bit c of qh[t] is the fifth bit of value 32c + t.
            let qh = &src[16..48];
            for (c, vc) in v.chunks_exact_mut(QK).enumerate() {
                for (t, x) in vc.iter_mut().enumerate() {
                    *x |= ((qh[t] >> c) & 1) << 4;
                }
            }
        }
    }
    let qs = if f == F_Q6K { k6_qs(rows) } else { k45_qs(rows) };
    for i in 0..4 {
        for p in 0..8 {
            for b in 0..4 {
                let (lo, hi) = (v[64 * i + 4 * p + b], v[64 * i + 32 + 4 * p + b]);
                dst[qs + piece * (8 * i + p) + 4 * l + b] = (lo & 0x0f) | ((hi & 0x0f) << 4);
            }
        }
    }
    for c in 0..8 {
        for p in 0..8 {
            for b in 0..4 {
                let high = v[32 * c + 4 * p + b] >> 4;
                if f == F_Q5K {
                    dst[k45_qh(rows) + piece * c + 4 * l + b] |= high << p;
                } else if f == F_Q6K {
                    let plane = k6_qh(rows) + 2 * piece * c + piece * (p / 4);
                    dst[plane + 4 * l + b] |= high << (2 * (p % 4));
                }
            }
        }
    }
}

/// The output buffer, written by all parts at disjoint columns.
struct SharedOut(*mut f32);
// SAFETY: parts write disjoint elements (see `PackedWeights::matmul`).
unsafe impl Sync for SharedOut {}

/// The activations in 8-bit blocks: quants, one scale per block, 8 times each block's quant
/// sum (for Q4_0, whose weights are stored offset by 8), the scale times the sum (for the mins
/// of Q4_K and Q5_K) and the sums of the two halves of 16 as two i16 in one i32 (for Q6_K's
/// offset of 32, whose scales change every 16 values).
struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
    sums8: Vec<i32>,
    dsum: Vec<f32>,
    sums16: Vec<i32>,
}

fn quantize_rows(x: &[f32], k: usize) -> QuantizedRows {
    debug_assert!(k.is_multiple_of(QK) && x.len().is_multiple_of(k));
    let blocks = x.len() / QK;
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; blocks];
    let mut sums8 = vec![0i32; blocks];
    let mut dsum = vec![0f32; blocks];
    let mut sums16 = vec![0i32; blocks];
    for b in 0..blocks {
        let src: &[f32; QK] = x[b * QK..(b + 1) * QK].try_into().expect("one block");
        let dst: &mut [i8; QK] = (&mut q[b * QK..(b + 1) * QK]).try_into().expect("one block");
        let (scale, lo, hi) = quantize_block(src, dst);
        d[b] = scale;
        sums8[b] = 8 * (lo + hi);
        dsum[b] = scale * (lo + hi) as f32;
        sums16[b] = ((lo as u16 as u32) | ((hi as u16 as u32) << 16)) as i32;
    }
    QuantizedRows { q, d, sums8, dsum, sums16 }
}

/// One block to 8-bit quants `round(v / scale)` with `scale = max |v| / 127`; returns the scale
/// and the sums of the first and the last 16 quants. Rounds half to even (as ggml's AVX2 path
/// does).
fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, i32, i32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return unsafe { kernels::quantize_block(src, dst) };
    }
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sums = [0; 2];
    for (i, (o, &v)) in dst.iter_mut().zip(src).enumerate() {
        let r = (v * inv).round_ties_even() as i32;
        *o = r as i8;
        sums[i / 16] += r;
    }
    (scale, sums[0], sums[1])
}

// Register tiles are indexed by row: index loops say what the kernel does.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::simd::{Simd, V_AVX2, V_AVX512_VNNI, V_AVX_VNNI, W256, W512};
    use super::{group_block_bytes, PackedWeights, QuantizedRows, GROUP_CHUNK_BYTES, QK};
    use super::{k45_min, k45_qh, k45_qs, k45_sc, k6_qh, k6_qs, k6_sc};
    use super::{F_Q4K, F_Q4_0, F_Q5K, F_Q6K, F_Q8_0, TILE_M};

    /// Blocks (Q4_0, Q8_0) the prefetch runs ahead of the kernel.
    const PF_BLOCKS: usize = 32;

    /// Asks for the cache lines of `len` bytes from `p` (`p` may lie past the weights: a
    /// prefetch never faults). Decode streams the weights once, and the hardware prefetchers
    /// alone left it at about 45-65% of the bandwidth (`ab` runs of one `[16384, 3072]` product);
    /// two super-blocks (or 32 blocks) ahead brought it to 90% or more.
    #[inline(always)]
    unsafe fn prefetch_span(p: *const u8, len: usize) {
        let mut o = 0;
        while o < len {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8);
            o += 64;
        }
    }

    /// Groups `g0..g1` of `w` (kernel variant `f`, `kb` block columns) against all `m`
    /// activation rows, into `out` (`[m, n]`), with AVX2's 8-bit products (groups of 8).
    ///
    /// The groups go in chunks of about [`GROUP_CHUNK_BYTES`]; each tile of up to 4 activation
    /// rows runs over a whole chunk, so the chunk's weights come from memory once and the
    /// activations once per chunk.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn groups_avx2(
        w: &PackedWeights,
        f: u8,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        groups_in::<W256<V_AVX2>>(w, f, kb, xq, m, g0, g1, out)
    }

    /// [`groups_avx2`] with AVX-VNNI's `dpbusd`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn groups_avx_vnni(
        w: &PackedWeights,
        f: u8,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        groups_in::<W256<V_AVX_VNNI>>(w, f, kb, xq, m, g0, g1, out)
    }

    /// [`groups_avx2`] with AVX-512 VNNI's `dpbusd` on 256-bit registers.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn groups_avx512_vnni(
        w: &PackedWeights,
        f: u8,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        groups_in::<W256<V_AVX512_VNNI>>(w, f, kb, xq, m, g0, g1, out)
    }

    /// [`groups_avx2`] on 512-bit registers with AVX-512 VNNI (groups of 16).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn groups_avx512(
        w: &PackedWeights,
        f: u8,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        groups_in::<W512>(w, f, kb, xq, m, g0, g1, out)
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn groups_in<S: Simd>(
        w: &PackedWeights,
        f: u8,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        debug_assert_eq!(w.group, S::LANES);
        match f {
            F_Q4_0 => groups_of::<F_Q4_0, S>(w, kb, xq, m, g0, g1, out),
            F_Q8_0 => groups_of::<F_Q8_0, S>(w, kb, xq, m, g0, g1, out),
            F_Q4K => groups_of::<F_Q4K, S>(w, kb, xq, m, g0, g1, out),
            F_Q5K => groups_of::<F_Q5K, S>(w, kb, xq, m, g0, g1, out),
            _ => groups_of::<F_Q6K, S>(w, kb, xq, m, g0, g1, out),
        }
    }

    #[inline(always)]
    unsafe fn groups_of<const F: u8, S: Simd>(
        w: &PackedWeights,
        kb: usize,
        xq: &QuantizedRows,
        m: usize,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        let rows = S::LANES;
        let group_bytes = kb * group_block_bytes(F, rows);
        let chunk = (GROUP_CHUNK_BYTES / group_bytes).max(1);
        let mut c0 = g0;
        while c0 < g1 {
            let c1 = (c0 + chunk).min(g1);
            let mut i = 0;
            while i < m {
                let rm = (m - i).min(TILE_M);
                for g in c0..c1 {
                    let gp = w.data.as_ptr().add(g * group_bytes);
                    let mut res = [S::zero_f(); TILE_M];
                    // The first tile of a chunk brings its weights from memory; the others find
                    // them in the cache.
                    let pf = i == 0;
                    match rm {
                        1 => tile::<F, S, 1>(gp, kb, xq, i, pf, &mut res),
                        2 => tile::<F, S, 2>(gp, kb, xq, i, pf, &mut res),
                        3 => tile::<F, S, 3>(gp, kb, xq, i, pf, &mut res),
                        _ => tile::<F, S, 4>(gp, kb, xq, i, pf, &mut res),
                    }
                    let cols = (w.n - g * rows).min(rows);
                    for r in 0..rm {
                        let dst = out.add((i + r) * w.n + g * rows);
                        if cols == rows {
                            S::store(dst, res[r]);
                        } else {
                            let mut tmp = [0f32; 16];
                            S::store(tmp.as_mut_ptr(), res[r]);
                            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, cols);
                        }
                    }
                }
                i += rm;
            }
            c0 = c1;
        }
    }

    /// One group (`gp`, its first block column) against `RM` activation rows from `i0`:
    /// `res[r]` lane `l` is row `i0 + r` times weight row `l` of the group.
    #[inline(always)]
    unsafe fn tile<const F: u8, S: Simd, const RM: usize>(
        gp: *const u8,
        kb: usize,
        xq: &QuantizedRows,
        i0: usize,
        prefetch: bool,
        res: &mut [S::F; TILE_M],
    ) {
        if F != F_Q4_0 && F != F_Q8_0 {
            return tile_k::<F, S, RM>(gp, kb, xq, i0, prefetch, res);
        }
        let q4 = F == F_Q4_0;
        let rows = S::LANES;
        let piece = 4 * rows;
        let gbb = group_block_bytes(F, rows);
        let ones = S::splat32(0x0001_0001);
        let low = S::splat8(0x0f);
        let mut acc = [S::zero_f(); RM];
        let xrow = |r: usize, b: usize| xq.q.as_ptr().add(((i0 + r) * kb + b) * QK);
        for b in 0..kb {
            let blk = gp.add(b * gbb);
            if prefetch {
                prefetch_span(blk.wrapping_add(PF_BLOCKS * gbb), gbb);
            }
            let wd = S::f16s(blk);
            let qs = blk.add(2 * rows);
            let mut dots = [S::zero(); RM];
            if q4 && S::VNNI {
                // Unsigned nibbles straight into dpbusd; the offset of 8 comes off through
                // the activations' sum.
                let mut s = [S::zero(); RM];
                for p in 0..4 {
                    let raw = S::load(qs.add(piece * p));
                    let lo = S::and(raw, low);
                    let hi = S::and(S::shr16_4(raw), low);
                    for r in 0..RM {
                        let xb = xrow(r, b);
                        s[r] = S::dpbusd(s[r], lo, S::bcast4(xb.add(4 * p)));
                        s[r] = S::dpbusd(s[r], hi, S::bcast4(xb.add(16 + 4 * p)));
                    }
                }
                for r in 0..RM {
                    let sums8 = S::splat32(xq.sums8[(i0 + r) * kb + b]);
                    dots[r] = S::sub32(s[r], sums8);
                }
            } else if q4 {
                // Unsigned nibbles straight into maddubs; the offset of 8 is taken off once per
                // block through the activations' sum. Each 16-bit lane gathers 8 pair sums of
                // at most 2 * 15 * 127, so it cannot overflow before the final madd.
                let mut s = [S::zero(); RM];
                for p in 0..4 {
                    let raw = S::load(qs.add(piece * p));
                    let lo = S::and(raw, low);
                    let hi = S::and(S::shr16_4(raw), low);
                    for r in 0..RM {
                        let xb = xrow(r, b);
                        s[r] = S::add16(s[r], S::maddubs(lo, S::bcast4(xb.add(4 * p))));
                        s[r] = S::add16(s[r], S::maddubs(hi, S::bcast4(xb.add(16 + 4 * p))));
                    }
                }
                for r in 0..RM {
                    let sums8 = S::splat32(xq.sums8[(i0 + r) * kb + b]);
                    dots[r] = S::sub32(S::madd(s[r], ones), sums8);
                }
            } else if S::VNNI {
                // The weights plus 128 as unsigned bytes (one xor, shared by all rows) into
                // dpbusd; 128 times the activations' sum (16 * sums8) comes off after.
                let flip = S::splat8(i8::MIN);
                for c in 0..8 {
                    let u = S::xor(S::load(qs.add(piece * c)), flip);
                    for r in 0..RM {
                        dots[r] = S::dpbusd(dots[r], u, S::bcast4(xrow(r, b).add(4 * c)));
                    }
                }
                for r in 0..RM {
                    let sums128 = S::splat32(16 * xq.sums8[(i0 + r) * kb + b]);
                    dots[r] = S::sub32(dots[r], sums128);
                }
            } else {
                // |w| * (x with w's sign): maddubs needs an unsigned left operand. A pair sum
                // reaches 2 * 127 * 127, so each piece widens to 32 bits at once.
                for c in 0..8 {
                    let q = S::load(qs.add(piece * c));
                    let qabs = S::sign8(q, q);
                    for r in 0..RM {
                        let sx = S::sign8(S::bcast4(xrow(r, b).add(4 * c)), q);
                        dots[r] = S::add32(dots[r], S::madd(S::maddubs(qabs, sx), ones));
                    }
                }
            }
            for r in 0..RM {
                let d = S::mul(wd, S::splat_f(xq.d[(i0 + r) * kb + b]));
                acc[r] = S::fmadd(d, S::to_f(dots[r]), acc[r]);
            }
        }
        res[..RM].copy_from_slice(&acc);
    }

    /// [`tile`] for K-quants (`kb` super-blocks): 32-value sub-blocks `c` against activation
    /// blocks `8 * sb + c`, two at a time (the low and high nibbles of the same pieces).
    ///
    /// A sub-block's quants are the nibbles of 8 pieces, each with its high bits from the
    /// sub-block's bit planes moved to bits 4 (and 5). AVX2: maddubs pair sums reach
    /// 2 * 15 * 127 (Q4_K), 2 * 31 * 127 (Q5_K), 2 * 63 * 127 (Q6_K), so a 16-bit lane takes
    /// 8, 4 or 2 pieces before it widens to 32 bits (Q6_K: through `madd` with its scales).
    /// VNNI: `dpbusd` sums into 32 bits at once; Q6_K's two runs of 4 pieces (one scale each)
    /// are multiplied by their scales in 32 bits. Q4_K/Q5_K: `d * sc * dot - dmin * m *
    /// (activation sum)`; Q6_K: `d * (sc_a * dot_a + sc_b * dot_b - 32 * (sc_a * sum_a + sc_b *
    /// sum_b))` over the two halves of 16, all in integers before `d`.
    #[inline(always)]
    unsafe fn tile_k<const F: u8, S: Simd, const RM: usize>(
        gp: *const u8,
        kb: usize,
        xq: &QuantizedRows,
        i0: usize,
        prefetch: bool,
        res: &mut [S::F; TILE_M],
    ) {
        let rows = S::LANES;
        let piece = 4 * rows;
        let gbb = group_block_bytes(F, rows);
        let vnni = S::VNNI;
        // Pieces summed before they widen (AVX2) or are scaled (VNNI, Q6_K).
        let span = match (F, vnni) {
            (F_Q4K, _) | (F_Q5K, true) => 8,
            (F_Q5K, false) | (F_Q6K, true) => 4,
            _ => 2,
        };
        // Pieces whose high bits one load of the bit planes serves: Q5_K's bit p of a byte
        // stays in its 16-bit lane for 4 shifts, Q6_K's bits 2p and 2p + 1 for 2.
        let plane_span = if F == F_Q6K { 2 } else { 4 };
        let kx = kb * 8;
        let ones = S::splat32(0x0001_0001);
        let low = S::splat8(0x0f);
        let high = S::splat8(if F == F_Q6K { 0x30 } else { 0x10 });
        // Q6_K (AVX2): each row's two scales (a 32-bit lane of two i16) to both halves of the
        // lane.
        let dup_a = S::splat128(&[0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13]);
        let dup_b = S::splat128(&[2, 3, 2, 3, 6, 7, 6, 7, 10, 11, 10, 11, 14, 15, 14, 15]);
        let (sc_at, min_at) = (k45_sc(rows), k45_min(rows));
        let mut acc = [S::zero_f(); RM];
        for sb in 0..kb {
            let blk = gp.add(sb * gbb);
            let d = S::f16s(blk);
            let dmin = S::f16s(blk.add(2 * rows));
            let qs = blk.add(if F == F_Q6K { k6_qs(rows) } else { k45_qs(rows) });
            // Sub-blocks 2i and 2i + 1 share their pieces: low nibbles and high nibbles.
            for i in 0..4 {
                if prefetch {
                    prefetch_span(blk.wrapping_add(2 * gbb + i * gbb / 4), gbb / 4);
                }
                let pieces = qs.add(piece * 8 * i);
                let (ca, cb) = (2 * i, 2 * i + 1);
                let xa = |r: usize| xq.q.as_ptr().add(((i0 + r) * kx + sb * 8 + ca) * QK);
                let xb = |r: usize| xq.q.as_ptr().add(((i0 + r) * kx + sb * 8 + cb) * QK);
                let (sca, scb) = if F == F_Q6K {
                    let at = |c: usize| blk.add(k6_sc(rows) + 2 * rows * c);
                    (S::widen_i8(at(ca)), S::widen_i8(at(cb)))
                } else {
                    (S::zero(), S::zero())
                };
                let mut dots_a = [S::zero(); RM];
                let mut dots_b = [S::zero(); RM];
                let mut sa = [S::zero(); RM];
                let mut sb16 = [S::zero(); RM];
                let (mut ha, mut hb) = (S::zero(), S::zero());
                for p in 0..8 {
                    if (F == F_Q5K || F == F_Q6K) && p % plane_span == 0 {
                        // The planes of this run of pieces, its first piece's bits moved to
                        // bit 4: they sit at bit 0 or 4 (Q5_K pieces 0 and 4, Q6_K pieces 0
                        // and 2 of each of its two planes).
                        let (at, bit, step) = if F == F_Q6K {
                            (k6_qh(rows) + 2 * piece * ca + piece * (p / 4), 2 * (p % 4), 2 * piece)
                        } else {
                            (k45_qh(rows) + piece * ca, p, piece)
                        };
                        let pa = S::load(blk.add(at));
                        let pb = S::load(blk.add(at + step));
                        (ha, hb) =
                            if bit == 0 { (S::shl16_4(pa), S::shl16_4(pb)) } else { (pa, pb) };
                    }
                    let raw = S::load(pieces.add(piece * p));
                    let mut lo = S::and(raw, low);
                    let mut hi = S::and(S::shr16_4(raw), low);
                    if F == F_Q5K || F == F_Q6K {
                        lo = S::or(lo, S::and(ha, high));
                        hi = S::or(hi, S::and(hb, high));
                        if F == F_Q6K {
                            ha = S::shr16_2(ha);
                            hb = S::shr16_2(hb);
                        } else {
                            ha = S::shr16_1(ha);
                            hb = S::shr16_1(hb);
                        }
                    }
                    for r in 0..RM {
                        let (xa, xb) = (S::bcast4(xa(r).add(4 * p)), S::bcast4(xb(r).add(4 * p)));
                        if vnni {
                            sa[r] = S::dpbusd(sa[r], lo, xa);
                            sb16[r] = S::dpbusd(sb16[r], hi, xb);
                        } else {
                            sa[r] = S::add16(sa[r], S::maddubs(lo, xa));
                            sb16[r] = S::add16(sb16[r], S::maddubs(hi, xb));
                        }
                    }
                    if (p + 1) % span != 0 {
                        continue;
                    }
                    // The run ends: widen (AVX2) or scale (Q6_K) its sums into the dots.
                    let first_half = p < 4;
                    if vnni && F == F_Q6K {
                        // Lane l holds row l's two scales as i16: the first or the second.
                        let pick = |sc| if first_half { S::lo16(sc) } else { S::hi16(sc) };
                        let (wa, wb) = (pick(sca), pick(scb));
                        for r in 0..RM {
                            dots_a[r] = S::add32(dots_a[r], S::mullo32(sa[r], wa));
                            dots_b[r] = S::add32(dots_b[r], S::mullo32(sb16[r], wb));
                        }
                    } else if vnni {
                        dots_a = sa;
                        dots_b = sb16;
                    } else {
                        let (wa, wb) = if F != F_Q6K {
                            (ones, ones)
                        } else if first_half {
                            (S::shuffle8(sca, dup_a), S::shuffle8(scb, dup_a))
                        } else {
                            (S::shuffle8(sca, dup_b), S::shuffle8(scb, dup_b))
                        };
                        for r in 0..RM {
                            dots_a[r] = S::add32(dots_a[r], S::madd(sa[r], wa));
                            dots_b[r] = S::add32(dots_b[r], S::madd(sb16[r], wb));
                        }
                    }
                    sa = [S::zero(); RM];
                    sb16 = [S::zero(); RM];
                }
                for (c, scab, dots) in [(ca, sca, &dots_a), (cb, scb, &dots_b)] {
                    let bx = sb * 8 + c;
                    if F == F_Q6K {
                        for r in 0..RM {
                            let idx = (i0 + r) * kx + bx;
                            let sums = S::madd(scab, S::splat32(xq.sums16[idx]));
                            let dot = S::sub32(dots[r], S::shl32_5(sums));
                            let da = S::mul(d, S::splat_f(xq.d[idx]));
                            acc[r] = S::fmadd(S::to_f(dot), da, acc[r]);
                        }
                    } else {
                        let dsc = S::mul(d, S::u8s(blk.add(sc_at + rows * c)));
                        let dmn = S::mul(dmin, S::u8s(blk.add(min_at + rows * c)));
                        for r in 0..RM {
                            let idx = (i0 + r) * kx + bx;
                            let da = S::mul(dsc, S::splat_f(xq.d[idx]));
                            acc[r] = S::fmadd(S::to_f(dots[r]), da, acc[r]);
                            acc[r] = S::fnmadd(dmn, S::splat_f(xq.dsum[idx]), acc[r]);
                        }
                    }
                }
            }
        }
        res[..RM].copy_from_slice(&acc);
    }

    /// The sum of the 8 lanes.
    #[inline(always)]
    unsafe fn hsum(s: __m256i) -> i32 {
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
        _mm_cvtsi128_si32(s1)
    }

    /// See [`super::quantize_block`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, i32, i32) {
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
        let lo = hsum(_mm256_add_epi32(i[0], i[1]));
        let hi = hsum(_mm256_add_epi32(i[2], i[3]));
        // packs work within 128-bit halves: the 32-bit groups come out as 0 2 4 6 1 3 5 7.
        let w01 = _mm256_packs_epi32(i[0], i[1]);
        let w23 = _mm256_packs_epi32(i[2], i[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, b);
        (scale, lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// Every format with a kernel here, and the values of `k` each is tested at.
    const FORMATS: &[(GgmlDType, &[usize])] = &[
        (GgmlDType::Q4_0, &[32, 96, 256]),
        (GgmlDType::Q8_0, &[32, 96, 256]),
        (GgmlDType::Q4K, &[256, 512]),
        (GgmlDType::Q5K, &[256, 512]),
        (GgmlDType::Q6K, &[256, 512]),
    ];

    /// Every instruction-set variant this CPU runs, each with 1, 2 and 3 threads.
    fn isas_and_threads() -> Vec<(Isa, usize)> {
        let isas = Isa::available();
        assert!(!isas.is_empty() || !has_kernel(GgmlDType::Q4_0));
        isas.into_iter().flat_map(|i| [(i, 1), (i, 2), (i, 3)]).collect()
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let t = normals(rows, cols, seed);
        // A different spread per seed, so scales vary between calls.
        (t * (0.5 + seed as f64 * 0.25)).unwrap()
    }

    /// Unit normals from a fixed seed (splitmix64, Box-Muller): candle's CPU `randn` cannot be
    /// seeded, and a test whose inputs change every run cannot be rerun as it failed.
    fn normals(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        let mut uniform = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // In (0, 1]: never 0, so the logarithm is finite.
            ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
        };
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The packed product equals the plain product of the dequantized weights with the
    /// dequantized 8-bit activations (f64 sums), for odd shapes, every format, 1-3 threads.
    #[test]
    fn equals_the_dequantized_reference() {
        for &(dtype, ks) in FORMATS {
            if !has_kernel(dtype) {
                eprintln!("SKIPPED {dtype:?}: no kernel or no AVX2/FMA/F16C on this CPU");
                continue;
            }
            let ns = [1, 7, 8, 9, 13, 17, 40];
            let ms = [1, 2, 3, 4, 5, 17, 128];
            for (idx, (&n, &m)) in ns.iter().cycle().zip(ms.iter()).enumerate() {
                for &k in ks {
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
                    let blocks = q.data().unwrap();
                    for (isa, threads) in isas_and_threads() {
                        let packed = PackedWeights::new_for(isa, dtype, &blocks, n, k);
                        let got = packed.matmul_with(isa, &x, m, threads);
                        assert_eq!(got.len(), m * n);
                        for i in 0..m {
                            for j in 0..n {
                                let terms = (0..k).map(|c| xd[i * k + c] * wd[j * k + c] as f64);
                                let want: f64 = terms.clone().sum();
                                let size: f64 = terms.map(f64::abs).sum();
                                let a = got[i * n + j] as f64;
                                assert!(
                                    (a - want).abs() <= 1e-5 * size + 1e-30,
                                    "{dtype:?} {isa:?} m{m} n{n} k{k} t{threads} [{i},{j}]: {a} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Weights at the edges of each format (all quants at their maximum, every scale and min at
    /// its maximum, negative Q6_K scales) against activations at +-127 (quantized exactly):
    /// no 16-bit lane overflows, and the mins and offsets come off.
    #[test]
    fn extreme_blocks_do_not_overflow() {
        for &(dtype, _) in FORMATS {
            if !has_kernel(dtype) || gguf_block(variant(dtype)).0 != QK_K {
                continue;
            }
            let (_, bb) = gguf_block(variant(dtype));
            let (n, k) = (9, 512);
            for fill in [0xffu8, 0x80, 0x7f] {
                let mut blocks = vec![fill; n * k / QK_K * bb];
                // Small finite f16 scales (d, dmin) so that the sums stay exact in f32.
                for b in blocks.chunks_exact_mut(bb) {
                    let d = half::f16::from_f32(1.0 / 64.0).to_bits().to_le_bytes();
                    if dtype == GgmlDType::Q6K {
                        b[bb - 2..].copy_from_slice(&d);
                    } else {
                        b[..2].copy_from_slice(&d);
                        b[2..4].copy_from_slice(&d);
                    }
                }
                let storage = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Borrowed(&blocks[..]),
                    &Device::Cpu,
                    dtype,
                )
                .unwrap();
                let q = QTensor::new(storage, (n, k)).unwrap();
                let wd: Vec<f32> =
                    q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let mut x = vec![1f32; 3 * k];
                for (i, v) in x.iter_mut().enumerate() {
                    if (i / 7) % 3 == 1 {
                        *v = -1.0;
                    }
                }
                x[k..2 * k].iter_mut().for_each(|v| *v = 1.0);
                for isa in Isa::available() {
                    let packed = PackedWeights::new_for(isa, dtype, &blocks, n, k);
                    let got = packed.matmul_with(isa, &x, 3, 2);
                    for i in 0..3 {
                        for j in 0..n {
                            let terms = (0..k).map(|c| x[i * k + c] as f64 * wd[j * k + c] as f64);
                            let want: f64 = terms.clone().sum();
                            let size: f64 = terms.map(f64::abs).sum();
                            let a = got[i * n + j] as f64;
                            assert!(
                                (a - want).abs() <= 1e-5 * size + 1e-30,
                                "{dtype:?} {isa:?} fill {fill:#x} [{i},{j}]: {a} vs {want}"
                            );
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
            let sum = |r: &[i8]| r.iter().map(|&v| v as i32).sum::<i32>();
            let (lo, hi) = (sum(&want[..16]), sum(&want[16..]));
            assert_eq!(xq.sums8[b], 8 * (lo + hi));
            assert_eq!(xq.dsum[b], xq.d[b] * (lo + hi) as f32);
            assert_eq!(xq.sums16[b] as u32 & 0xffff, lo as u16 as u32);
            assert_eq!(xq.sums16[b] as u32 >> 16, hi as u16 as u32);
        }
    }

    /// Against candle's own quantized product on the same blocks: every tile shape, odd sizes.
    /// (Candle quantizes the activations for K-quants, and on VNNI CPUs for Q8_0, in blocks of
    /// 256, this kernel in blocks of 32, hence a tolerance in the activations' rounding.)
    #[test]
    fn agrees_with_candle() {
        for &(dtype, _) in FORMATS {
            if !has_kernel(dtype) {
                eprintln!("SKIPPED {dtype:?}: no kernel or no AVX2/FMA/F16C on this CPU");
                continue;
            }
            let shapes = [
                (1, 1, 256),
                (1, 64, 3072),
                (2, 9, 128),
                (3, 6, 512),
                (5, 3, 64),
                (4, 2, 768),
                (13, 7, 256),
                (64, 33, 512),
            ];
            let bk = gguf_block(variant(dtype)).0;
            for (i, (m, n, k)) in shapes.into_iter().filter(|s| s.2 % bk == 0).enumerate() {
                let w = normals(n, k, 2 * i as u64 + 1);
                let x = normals(m, k, 2 * i as u64 + 2);
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
                // sum_i |w_i x_i| per output, over the dequantized weights.
                let w_deq = q.dequantize(&Device::Cpu).unwrap().abs().unwrap();
                let abs_dot: Vec<f32> = x
                    .abs()
                    .unwrap()
                    .matmul(&w_deq.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let blocks = q.data().unwrap();
                for (isa, threads) in isas_and_threads() {
                    let packed = PackedWeights::new_for(isa, dtype, &blocks, n, k);
                    let got = packed.matmul_with(isa, &xs, m, threads);
                    for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                        // K-quants: the two activation roundings (steps of about 3.5/127 and
                        // 2.5/127 for unit normals) differ by about 0.01 * sqrt(k) (one sigma).
                        // Candle 0.11 on a CPU with AVX-512 VNNI or AVX-VNNI runs Q8_0 (n a
                        // multiple of 16, k of 256) through its own repacked kernel, which
                        // also rounds the activations in blocks of 256.
                        // Otherwise both round the activations in the same blocks of 32, but
                        // candle stores each block's scale as f16 (a relative error up to
                        // 2^-11 on every block's share of the sum) and divides by it where this
                        // kernel multiplies by 127/amax (now and then a value one step apart).
                        let tol = if bk == QK_K || dtype == GgmlDType::Q8_0 {
                            0.05 * (k as f32).sqrt()
                        } else {
                            2f32.powi(-10) * abs_dot[idx] + 0.05
                        };
                        assert!(
                            (a - b).abs() <= tol,
                            "{dtype:?} {isa:?} m{m} n{n} k{k} t{threads} [{idx}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
