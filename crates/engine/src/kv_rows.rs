//! Moving key/value rows between a batch's tensors and the KV pool's blocks on the CPU, in
//! place and converting the element type on the way.
//!
//! Exists because the pool keeps each head's keys of a block together (see
//! [`crate::kv_pool`]) while the model computes them token by token, all heads side by side: a
//! token's write is one short row per head, and a gather for a prompt chunk is one row per head
//! per position. With candle's `slice_set` that is a call (and a transposed copy) per head; here
//! it is one pass over the rows, straight into the pool's storage. The pool may also hold the
//! cache in a narrower type than the model computes in (`f16` keys and values for an `f32`
//! model), and the rows convert as they are copied.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout};
use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::kv_pool::slot_offset;

/// Copying a row of `S` values into a row of `Self` values, converting where they differ.
trait CopyRow<S> {
    fn copy_row(dst: &mut [Self], src: &[S])
    where
        Self: Sized;
}

macro_rules! same_type {
    ($t:ty) => {
        impl CopyRow<$t> for $t {
            #[inline]
            fn copy_row(dst: &mut [$t], src: &[$t]) {
                dst.copy_from_slice(src);
            }
        }
    };
}
same_type!(f32);
same_type!(f16);
same_type!(bf16);

macro_rules! from_f32 {
    ($t:ty) => {
        impl CopyRow<f32> for $t {
            #[inline]
            fn copy_row(dst: &mut [$t], src: &[f32]) {
                dst.convert_from_f32_slice(src);
            }
        }
        impl CopyRow<$t> for f32 {
            #[inline]
            fn copy_row(dst: &mut [f32], src: &[$t]) {
                src.convert_to_f32_slice(dst);
            }
        }
    };
}
from_f32!(f16);
from_f32!(bf16);

impl CopyRow<bf16> for f16 {
    fn copy_row(dst: &mut [f16], src: &[bf16]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = f16::from_f32(s.to_f32()));
    }
}

impl CopyRow<f16> for bf16 {
    fn copy_row(dst: &mut [bf16], src: &[f16]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = bf16::from_f32(s.to_f32()));
    }
}

/// A copy of rows between two slices, for any pair of cache element types.
trait RowOp {
    fn apply<D: CopyRow<S>, S>(&self, dst: &mut [D], src: &[S]);
}

/// Runs `op` on the destination and source slices (from their layouts' offsets) for every pair
/// of `f32`, `f16` and `bf16` storages: the destination's type first, then the source's.
fn dispatch<O: RowOp>(
    op: &O,
    dst: &mut CpuStorage,
    dl: &Layout,
    src: &CpuStorage,
    sl: &Layout,
) -> candle_core::Result<()> {
    let o = dl.start_offset();
    match dst {
        CpuStorage::F32(d) => with_source(op, &mut d[o..], src, sl),
        CpuStorage::F16(d) => with_source(op, &mut d[o..], src, sl),
        CpuStorage::BF16(d) => with_source(op, &mut d[o..], src, sl),
        d => candle_core::bail!("KV rows: {:?} is not a cache element type", d.dtype()),
    }
}

fn with_source<O: RowOp, D>(
    op: &O,
    d: &mut [D],
    src: &CpuStorage,
    sl: &Layout,
) -> candle_core::Result<()>
where
    D: CopyRow<f32> + CopyRow<f16> + CopyRow<bf16>,
{
    let o = sl.start_offset();
    match src {
        CpuStorage::F32(s) => op.apply(d, &s[o..]),
        CpuStorage::F16(s) => op.apply(d, &s[o..]),
        CpuStorage::BF16(s) => op.apply(d, &s[o..]),
        s => candle_core::bail!("KV rows: {:?} is not a cache element type", s.dtype()),
    }
    Ok(())
}

fn contiguous(l: &Layout, what: &str) -> candle_core::Result<()> {
    if l.is_contiguous() {
        Ok(())
    } else {
        candle_core::bail!("KV rows: the {what} is not contiguous")
    }
}

/// Which pool slots a batch of rows `[slots.len(), n_kv_heads, head_dim]` goes to or comes
/// from, in order.
pub(crate) struct SlotRows<'a> {
    /// The slot of each row.
    pub slots: &'a [u32],
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl SlotRows<'_> {
    /// Both sides contiguous, `rows` as many elements as the slots take, every slot inside
    /// `pool`.
    fn check(&self, rows: &Layout, pool: &Layout) -> candle_core::Result<()> {
        contiguous(rows, "rows")?;
        contiguous(pool, "pool")?;
        let (nkv, hd, n) = (self.n_kv_heads, self.head_dim, self.slots.len());
        if rows.shape().elem_count() != n * nkv * hd {
            candle_core::bail!("KV rows: {n} slots for rows of {:?}", rows.shape());
        }
        let end = self.slots.iter().map(|&s| slot_offset(s, nkv - 1, nkv, hd) + hd).max();
        if end.unwrap_or(0) > pool.shape().elem_count() {
            candle_core::bail!("KV rows: a slot past the pool's end");
        }
        Ok(())
    }
}

/// Writes the rows (the source) into their pool slots of one layer's buffer (the destination,
/// `[num_blocks, n_kv_heads, BLOCK_SIZE, head_dim]`).
pub(crate) struct WriteSlots<'a>(pub SlotRows<'a>);

impl InplaceOp2 for WriteSlots<'_> {
    fn name(&self) -> &'static str {
        "kv-write-slots"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        self.0.check(sl, dl)?;
        dispatch(self, dst, dl, src, sl)
    }
}

impl RowOp for WriteSlots<'_> {
    fn apply<D: CopyRow<S>, S>(&self, d: &mut [D], s: &[S]) {
        let SlotRows { slots, n_kv_heads: nkv, head_dim: hd } = self.0;
        for (j, &slot) in slots.iter().enumerate() {
            for h in 0..nkv {
                let to = slot_offset(slot, h, nkv, hd);
                let from = (j * nkv + h) * hd;
                D::copy_row(&mut d[to..to + hd], &s[from..from + hd]);
            }
        }
    }
}

/// Gathers the rows of the slots from one layer's buffer (the source) into a `[n_kv_heads,
/// slots.len(), head_dim]` tensor (the destination), each head's positions in order.
pub(crate) struct GatherSlots<'a>(pub SlotRows<'a>);

impl InplaceOp2 for GatherSlots<'_> {
    fn name(&self) -> &'static str {
        "kv-gather-slots"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        self.0.check(dl, sl)?;
        dispatch(self, dst, dl, src, sl)
    }
}

impl RowOp for GatherSlots<'_> {
    fn apply<D: CopyRow<S>, S>(&self, d: &mut [D], s: &[S]) {
        let SlotRows { slots, n_kv_heads: nkv, head_dim: hd } = self.0;
        let n = slots.len();
        for h in 0..nkv {
            for (j, &slot) in slots.iter().enumerate() {
                let from = slot_offset(slot, h, nkv, hd);
                let to = (h * n + j) * hd;
                D::copy_row(&mut d[to..to + hd], &s[from..from + hd]);
            }
        }
    }
}
