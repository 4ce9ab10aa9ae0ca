//! The paged KV cache on the GPU: one launch per layer writes the whole batch's new keys (one
//! more its values) into the pool's blocks, rotating the keys on the way when they come straight
//! from the fused qkv projection, and one more runs decode attention for every decoding sequence
//! of the batch, reading its keys and values where they lie in the pool.
//!
//! Exists because the general path costs a handful of small launches per sequence and layer
//! (copies per run of positions, a gather of the whole cache, two matmuls and a softmax), which
//! for a batch of 64 streams is thousands of launches a step and a copy of the whole cache. The
//! kernels are in `kernels/paged_attention.cu`, compiled to PTX by the build script; their logic
//! is tested on the CPU under an emulation of CUDA's thread model
//! (`tests/cuda_kernels_emulated.rs`), and on a GPU by `tests/cuda_parity.rs`.
//!
//! The slot lists are the same for every layer of a forward pass: [`BatchSlots`] uploads them
//! once per pass.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Device, InplaceOp3, Layout, Shape, Storage, Tensor,
    WithDType,
};
use half::{bf16, f16};

use crate::cuda_kernels::{contiguous, load_kernel, u32_arg, PAGED_ATTENTION};
use crate::cuda_layer_ops::RopeTables;
use crate::decode_split::decode_splits;
use crate::error::{EngineError, Result};
use crate::kv_pool::{KvPool, BLOCK_SIZE};
use crate::paged_attention::Heads;

/// Threads of a decode block (`PHI_DECODE_THREADS` in the kernel source).
const DECODE_THREADS: u32 = 256;
/// The largest head the decode kernel takes (`PHI_MAX_HEAD_DIM`).
pub const MAX_HEAD_DIM: usize = 256;

/// Whether the paged kernels can serve `pool`: it is on a GPU, in a type they read, with heads
/// they take.
pub fn supports(pool: &KvPool) -> bool {
    let (k, _) = pool.layer(0);
    matches!(k.device(), Device::Cuda(_))
        && matches!(k.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && pool.head_dim() <= MAX_HEAD_DIM
}

/// One decoding sequence of a batch: the row of the batch that holds its query, and the pool
/// slots of the keys it sees, oldest first (its sliding window already applied).
#[derive(Debug)]
pub struct DecodeSeq {
    /// Row of the batch's `[n_tokens, n_heads, head_dim]` queries.
    pub q_row: u32,
    /// Slots of the visible keys.
    pub slots: Vec<u32>,
}

/// A forward pass's slot lists on the GPU.
#[derive(Debug)]
pub struct BatchSlots {
    /// Pool slot of each token of the batch, in batch order (`[n_tokens]`, u32).
    write: Tensor,
    /// The decoding sequences; `None` when none decodes.
    decode: Option<DecodeIndex>,
}

/// The decoding sequences of a pass on the GPU.
#[derive(Debug)]
struct DecodeIndex {
    /// `[slots..., starts (n_seqs + 1)..., q_rows (n_seqs)...]` (u32).
    index: Tensor,
    n_seqs: usize,
    n_slots: usize,
    /// The most keys a sequence sees, which decides the splits (`decode_split`).
    max_keys: usize,
    /// The largest query row, checked against the batch's queries before each launch.
    max_q_row: u32,
}

impl BatchSlots {
    /// Uploads the slots of a pass over `pool`: `write` for every token of the batch, and the
    /// decoding sequences. Every slot is checked against the pool's size here, so that the
    /// kernels can never reach past it.
    pub fn new(pool: &KvPool, write: Vec<u32>, decode: &[DecodeSeq]) -> Result<Self> {
        let (k, _) = pool.layer(0);
        let device = k.device();
        let capacity = (pool.num_blocks() * BLOCK_SIZE) as u32;
        let past = |s: &u32| *s >= capacity;
        if write.iter().any(past) || decode.iter().any(|d| d.slots.iter().any(past)) {
            return Err(EngineError::InvalidRequest("a KV slot past the pool's end".into()));
        }
        let n_write = write.len();
        let write = Tensor::from_vec(write, n_write, device)?;
        let decode = if decode.is_empty() {
            None
        } else {
            let n_slots: usize = decode.iter().map(|d| d.slots.len()).sum();
            let mut index = Vec::with_capacity(n_slots + 2 * decode.len() + 1);
            decode.iter().for_each(|d| index.extend_from_slice(&d.slots));
            index.push(0);
            let mut start = 0u32;
            for d in decode {
                start += d.slots.len() as u32;
                index.push(start);
            }
            index.extend(decode.iter().map(|d| d.q_row));
            let len = index.len();
            Some(DecodeIndex {
                index: Tensor::from_vec(index, len, device)?,
                n_seqs: decode.len(),
                n_slots,
                max_keys: decode.iter().map(|d| d.slots.len()).max().unwrap_or(0),
                max_q_row: decode.iter().map(|d| d.q_row).max().unwrap_or(0),
            })
        };
        Ok(BatchSlots { write, decode })
    }

    /// Writes the batch's keys and values of one layer (`k`, `v`: `[n_tokens, n_kv_heads,
    /// head_dim]`, already rotated) into their slots of `pool_k` and `pool_v`.
    pub fn write(&self, pool_k: &Tensor, pool_v: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        for (pool, rows) in [(pool_k, k), (pool_v, v)] {
            let rows = rows.to_dtype(pool.dtype())?.contiguous()?;
            let n = rows.dim(0)?;
            let rows = rows.reshape((n, rows.elem_count() / n.max(1)))?;
            let op = WriteRows { first: 0, rope: None };
            pool.inplace_op3(&rows, &self.write, &op)?;
        }
        Ok(())
    }

    /// Writes one layer's keys and values into their slots of `pool_k` and `pool_v` straight
    /// from the fused qkv projection's output (`qkv`: `[n_tokens, (n_heads + 2 n_kv_heads)
    /// head_dim]`, in the pool's type), rotating the keys with `rope` on the way: no copies of
    /// the keys and values out of `qkv`, and no separate rotation.
    pub fn write_qkv(
        &self,
        pool_k: &Tensor,
        pool_v: &Tensor,
        qkv: &Tensor,
        heads: Heads,
        rope: &RopeTables,
    ) -> Result<()> {
        let qkv = qkv.contiguous()?;
        let hd = heads.head_dim;
        let k = WriteRows { first: heads.n_heads * hd, rope: Some(rope.clone()) };
        pool_k.inplace_op3(&qkv, &self.write, &k)?;
        let v = WriteRows { first: (heads.n_heads + heads.n_kv_heads) * hd, rope: None };
        pool_v.inplace_op3(&qkv, &self.write, &v)?;
        Ok(())
    }

    /// Decode attention of every decoding sequence over one layer of the pool. `q`: the batch's
    /// queries `[n_tokens, n_heads, head_dim]`. Returns `[n_seqs, n_heads * head_dim]` in
    /// `q`'s type, the sequences in the order given to [`Self::new`].
    pub fn decode(
        &self,
        q: &Tensor,
        pool_k: &Tensor,
        pool_v: &Tensor,
        heads: Heads,
    ) -> Result<Option<Tensor>> {
        let Some(d) = &self.decode else { return Ok(None) };
        if heads.n_kv_heads == 0 || !heads.n_heads.is_multiple_of(heads.n_kv_heads) {
            return Err(EngineError::InvalidRequest(
                "query heads not a multiple of kv heads".into(),
            ));
        }
        if d.max_q_row as usize >= q.dim(0)? {
            return Err(EngineError::InvalidRequest("a decode query row past the batch".into()));
        }
        let dtype = q.dtype();
        let q = q.to_dtype(pool_k.dtype())?.contiguous()?;
        let op = PagedDecode {
            index: d.index.clone(),
            n_seqs: d.n_seqs,
            n_slots: d.n_slots,
            max_keys: d.max_keys,
            heads,
        };
        Ok(Some(q.apply_op3_no_bwd(pool_k, pool_v, &op)?.to_dtype(dtype)?))
    }
}

/// `kv_write_*`: the pool (destination), the rows (`[n_rows, row_stride]`), their slots. Each
/// row's `n_kv_heads * head_dim` values start at column `first`; `rope` rotates them (keys).
struct WriteRows {
    first: usize,
    rope: Option<RopeTables>,
}

impl WriteRows {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        pool: &mut CudaStorage,
        pl: &Layout,
        rows: &CudaStorage,
        rl: &Layout,
        slots: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let dims = pl.shape().dims();
        let (nkv, hd) = (dims[1], dims[3]);
        let n_rows = sl.shape().elem_count();
        let (rows_n, stride) = rl.shape().dims2()?;
        if rows_n != n_rows || self.first + nkv * hd > stride {
            candle_core::bail!(
                "kv write: rows {:?} from column {} for {n_rows} slots of {nkv}x{hd}",
                rl.shape(),
                self.first
            );
        }
        if n_rows == 0 {
            return Ok(());
        }
        let dev = pool.device().clone();
        let func = load_kernel!(dev, PAGED_ATTENTION, "kv_write", T::DTYPE)?;
        let (r0, r1) = contiguous(rl, "kv write rows")?;
        let (s0, s1) = contiguous(sl, "kv write slots")?;
        let (p0, p1) = contiguous(pl, "the KV pool")?;
        let rows = rows.as_cuda_slice::<T>()?.slice(r0 + self.first..r1);
        let slots = slots.as_cuda_slice::<u32>()?.slice(s0..s1);
        let mut pool = pool.as_cuda_slice_mut::<T>()?.slice_mut(p0..p1);
        let tables = match &self.rope {
            Some(rope) => Some(rope.storage(n_rows, hd, T::DTYPE)?),
            None => None,
        };
        let (cos, sin, rot) = match &tables {
            Some(t) => (t.cos::<T>()?, t.sin::<T>()?, t.rot_dim),
            // Not read without rotation; any pointer of the type will do.
            None => (rows.slice(..), rows.slice(..), 0),
        };
        let (stride, nkv, hd) = (u32_arg(stride, "a row")?, nkv as u32, hd as u32);
        let cfg = LaunchConfig {
            grid_dim: (n_rows as u32, nkv, 1),
            block_dim: (hd.div_ceil(32).min(4) * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&rows);
        b.arg(&stride);
        b.arg(&mut pool);
        b.arg(&slots);
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&nkv);
        b.arg(&hd);
        b.arg(&rot);
        // SAFETY: the arguments match the kernel's signature; every slot was checked against
        // the pool's size (BatchSlots::new), the rows' shape above and the rotary tables'
        // against the rows (RopeTables::storage).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

impl InplaceOp3 for WriteRows {
    fn name(&self) -> &'static str {
        "phi-kv-write"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("phi-kv-write runs on CUDA only (the CPU writes through kv_rows)")
    }

    fn cuda_fwd(
        &self,
        pool: &mut CudaStorage,
        pl: &Layout,
        rows: &CudaStorage,
        rl: &Layout,
        slots: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        if rows.dtype() != pool.dtype() || slots.dtype() != DType::U32 || pl.dims().len() != 4 {
            candle_core::bail!(
                "kv write: pool {:?}, rows {:?}, slots {:?}",
                pool.dtype(),
                rows.dtype(),
                slots.dtype()
            );
        }
        match pool.dtype() {
            DType::F32 => self.launch::<f32>(pool, pl, rows, rl, slots, sl),
            DType::F16 => self.launch::<f16>(pool, pl, rows, rl, slots, sl),
            DType::BF16 => self.launch::<bf16>(pool, pl, rows, rl, slots, sl),
            d => candle_core::bail!("kv write: no kernel for {d:?}"),
        }
    }
}

/// `paged_decode_*` (or, split, `paged_decode_split_*` then `paged_decode_merge_*`): the
/// queries and one layer of the pool, with the decode index.
struct PagedDecode {
    index: Tensor,
    n_seqs: usize,
    n_slots: usize,
    max_keys: usize,
    heads: Heads,
}

impl PagedDecode {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Heads { n_heads, n_kv_heads, head_dim, scale } = self.heads;
        let pool_dims = kl.shape().dims();
        if pool_dims.len() != 4 || pool_dims[1] != n_kv_heads || pool_dims[3] != head_dim {
            candle_core::bail!(
                "paged decode: a pool of {:?} for {n_kv_heads}x{head_dim}",
                kl.shape()
            );
        }
        if kl.shape() != vl.shape() || head_dim > MAX_HEAD_DIM {
            candle_core::bail!("paged decode: keys {:?}, values {:?}", kl.shape(), vl.shape());
        }
        let q_dims = ql.shape().dims();
        if q_dims.len() != 3 || q_dims[1] != n_heads || q_dims[2] != head_dim {
            candle_core::bail!("paged decode: queries {:?} for {n_heads}x{head_dim}", ql.shape());
        }

        let dev = q.device().clone();
        let (index, il) = self.index.storage_and_layout();
        let Storage::Cuda(index) = &*index else {
            candle_core::bail!("paged decode: the index is not on the GPU")
        };
        let (i0, _) = contiguous(il, "the decode index")?;
        let index = index.as_cuda_slice::<u32>()?;
        let (n, s) = (self.n_seqs, self.n_slots);
        let slots = index.slice(i0..i0 + s);
        let starts = index.slice(i0 + s..i0 + s + n + 1);
        let q_rows = index.slice(i0 + s + n + 1..i0 + s + 2 * n + 1);

        let splits = decode_splits(self.max_keys, n, n_heads);
        // The kernels are built for 4 dimensions a lane (heads up to 128) and 8 (up to 256).
        let dims = if head_dim <= 128 { 4 } else { 8 };
        let kernel = if splits.is_some() { "paged_decode_split" } else { "paged_decode" };
        let func = load_kernel!(dev, PAGED_ATTENTION, &format!("{kernel}_d{dims}"), T::DTYPE)?;
        let (q0, q1) = contiguous(ql, "paged decode queries")?;
        let (k0, k1) = contiguous(kl, "the KV pool's keys")?;
        let (v0, v1) = contiguous(vl, "the KV pool's values")?;
        let q = q.as_cuda_slice::<T>()?.slice(q0..q1);
        let k = k.as_cuda_slice::<T>()?.slice(k0..k1);
        let v = v.as_cuda_slice::<T>()?.slice(v0..v1);
        // SAFETY: every element is written, by the decode kernel or by the merge (one thread per
        // dimension of each (sequence, head)).
        let mut out = unsafe { dev.alloc::<T>(n * n_heads * head_dim)? };
        let (split_keys, n_splits) = splits.unwrap_or((0, 1));
        // Each split's weighted values, maximum and sum (`[n, n_heads, n_splits, head_dim +
        // 2]`), only when split.
        let mut partials = match splits {
            // SAFETY: the merge reads only the splits the decode kernel writes (those that hold
            // keys of their sequence).
            Some(_) => Some(unsafe { dev.alloc::<f32>(n * n_heads * n_splits * (head_dim + 2))? }),
            None => None,
        };
        // The kernel's `partials` without splits: never read, a null pointer.
        let no_partials = 0u64;
        let (nq, nkv, hd) = (n_heads as u32, n_kv_heads as u32, head_dim as u32);
        let split_keys = u32_arg(split_keys, "a split")?;
        let n_splits = u32_arg(n_splits, "splits")?;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, nq, n_splits),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&slots);
        b.arg(&starts);
        b.arg(&q_rows);
        b.arg(&mut out);
        match &mut partials {
            Some(p) => b.arg(p),
            None => b.arg(&no_partials),
        };
        b.arg(&nq);
        b.arg(&nkv);
        b.arg(&hd);
        b.arg(&scale);
        b.arg(&split_keys);
        // SAFETY: the arguments match the kernel's signature; the slots were checked against the
        // pool's size (BatchSlots::new) and the query rows against the batch (decode); the
        // partials hold `n_splits` splits of every (sequence, head).
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        if let Some(partials) = &partials {
            let merge = load_kernel!(dev, PAGED_ATTENTION, "paged_decode_merge", T::DTYPE)?;
            let cfg = LaunchConfig {
                grid_dim: (n as u32, nq, 1),
                block_dim: (hd.div_ceil(32) * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = merge.builder();
            b.arg(partials);
            b.arg(&starts);
            b.arg(&mut out);
            b.arg(&nq);
            b.arg(&hd);
            b.arg(&n_splits);
            b.arg(&split_keys);
            // SAFETY: the arguments match the kernel's signature; `partials` and `out` are the
            // decode launch's, whose sizes are checked above.
            unsafe { b.launch(cfg) }.w()?;
        }
        let out = CudaStorage::wrap_cuda_slice(out, dev);
        Ok((out, Shape::from((n, n_heads * head_dim))))
    }
}

impl CustomOp3 for PagedDecode {
    fn name(&self) -> &'static str {
        "phi-paged-decode"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("phi-paged-decode runs on CUDA only (the CPU has paged_attention)")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if q.dtype() != k.dtype() || k.dtype() != v.dtype() {
            candle_core::bail!(
                "paged decode: q {:?}, k {:?}, v {:?}",
                q.dtype(),
                k.dtype(),
                v.dtype()
            );
        }
        match q.dtype() {
            DType::F32 => self.launch::<f32>(q, ql, k, kl, v, vl),
            DType::F16 => self.launch::<f16>(q, ql, k, kl, v, vl),
            DType::BF16 => self.launch::<bf16>(q, ql, k, kl, v, vl),
            d => candle_core::bail!("paged decode: no kernel for {d:?}"),
        }
    }
}
