//! The fused element-wise steps of a decoder layer on the GPU (`kernels/layer_ops.cu`):
//! RMSNorm, with the residual add before it; the MLP's SiLU gate; the queries' rotary embedding
//! read straight out of the fused qkv projection (the keys are rotated as they are written into
//! the pool, `cuda_paged`).
//!
//! Exists because a decode step of one stream is a few hundred small kernels and each of
//! candle's ops is a launch and an allocation: RMSNorm with the reference's rounding alone is
//! ten. Here each step is one launch, with the reference's rounding step for step. Tested on the
//! CPU under an emulation of CUDA's thread model (`tests/cuda_kernels_emulated.rs`) against the
//! CPU path's candle ops, and on a GPU by `tests/cuda_parity.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape,
    Storage, StorageRef, Tensor, WithDType,
};
use half::{bf16, f16};

use crate::cuda_kernels::{contiguous, load_kernel, u32_arg, LAYER_OPS};
use crate::error::{EngineError, Result};
use crate::paged_attention::Heads;

/// Threads of a normalisation block.
const NORM_THREADS: u32 = 256;
/// Threads of an element-wise block.
const ELEMENTWISE_THREADS: u32 = 256;

/// Whether the fused kernels take `x`: on a GPU, in a type they compute.
pub fn supports(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cuda(_))
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// Phi3RMSNorm of the rows of `x` (its last dimension), scaled by `weight` (`x`'s type).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(x.apply_op2_no_bwd(weight, &RmsNorm { eps: eps as f32 })?)
}

/// The residual connection and the next RMSNorm in one pass: `(x + delta, rms_norm(x + delta))`,
/// the sum rounded to `x`'s type as the reference's add rounds it.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (x, delta) = (x.contiguous()?, delta.contiguous()?);
    let both = x.apply_op3_no_bwd(&delta, weight, &AddRmsNorm { eps: eps as f32 })?;
    // Two contiguous views of one allocation.
    Ok((both.get(0)?.reshape(x.shape())?, both.get(1)?.reshape(x.shape())?))
}

/// The MLP's gate: `gate_up` (`[rows, 2 * n]`, the gate then the up projection) to
/// `up * silu(gate)` (`[rows, n]`).
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let gate_up = gate_up.contiguous()?;
    Ok(gate_up.apply_op1_no_bwd(&SiluMul)?)
}

/// The batch's queries (`[n_tokens, n_heads, head_dim]`), rotated, out of the fused qkv
/// projection's output (`[n_tokens, (n_heads + 2 n_kv_heads) head_dim]`).
pub fn rope_queries(qkv: &Tensor, rope: &RopeTables, heads: Heads) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    Ok(qkv.apply_op1_no_bwd(&RopeQueries { rope: rope.clone(), heads })?)
}

/// A batch's rotary tables on the GPU: `cos` and `sin`, `[n_tokens, rotary_dim / 2]` in the
/// model's type, as `Rotary::cos_sin` makes them.
#[derive(Clone, Debug)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    rot_dim: usize,
}

impl RopeTables {
    /// Checks the tables' shapes and types against each other.
    pub fn new(cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (n, half) = cos.dims2()?;
        if sin.dims2()? != (n, half) || cos.dtype() != sin.dtype() {
            return Err(EngineError::InvalidRequest("rotary tables of two shapes".into()));
        }
        Ok(RopeTables { cos: cos.contiguous()?, sin: sin.contiguous()?, rot_dim: 2 * half })
    }

    /// The tables' element type.
    pub fn dtype(&self) -> DType {
        self.cos.dtype()
    }

    /// The tables' storage for a launch over `n_rows` heads of `head_dim` in `dtype`.
    pub(crate) fn storage(
        &self,
        n_rows: usize,
        head_dim: usize,
        dtype: DType,
    ) -> candle_core::Result<TableStorage<'_>> {
        if self.cos.dim(0)? != n_rows || self.rot_dim > head_dim || self.cos.dtype() != dtype {
            candle_core::bail!(
                "rotary tables {:?} {:?} for {n_rows} rows of {head_dim} in {dtype:?}",
                self.cos.shape(),
                self.cos.dtype()
            );
        }
        let (cos, cl) = self.cos.storage_and_layout();
        let cos_at = contiguous(cl, "the cos table")?;
        let (sin, sl) = self.sin.storage_and_layout();
        let sin_at = contiguous(sl, "the sin table")?;
        Ok(TableStorage { cos, cos_at, sin, sin_at, rot_dim: self.rot_dim as u32 })
    }
}

/// The rotary tables' storage, held for one launch.
pub(crate) struct TableStorage<'a> {
    cos: StorageRef<'a>,
    cos_at: (usize, usize),
    sin: StorageRef<'a>,
    sin_at: (usize, usize),
    /// Rotated dimensions of each head.
    pub rot_dim: u32,
}

impl TableStorage<'_> {
    fn view<'s, T: CudaDType + DeviceRepr>(
        storage: &'s Storage,
        (from, to): (usize, usize),
    ) -> candle_core::Result<CudaView<'s, T>> {
        let Storage::Cuda(s) = storage else { candle_core::bail!("rotary tables not on the GPU") };
        Ok(s.as_cuda_slice::<T>()?.slice(from..to))
    }

    /// The cos table.
    pub fn cos<T: CudaDType + DeviceRepr>(&self) -> candle_core::Result<CudaView<'_, T>> {
        Self::view(&self.cos, self.cos_at)
    }

    /// The sin table.
    pub fn sin<T: CudaDType + DeviceRepr>(&self) -> candle_core::Result<CudaView<'_, T>> {
        Self::view(&self.sin, self.sin_at)
    }
}

/// Dispatches `$launch::<T>` on the element type, for the `cuda_fwd` of each op.
macro_rules! by_dtype {
    ($dtype:expr, $what:literal, |$t:ident| $launch:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $launch
            }
            DType::F16 => {
                type $t = f16;
                $launch
            }
            DType::BF16 => {
                type $t = bf16;
                $launch
            }
            d => candle_core::bail!(concat!($what, ": no kernel for {:?}"), d),
        }
    };
}

/// `(rows, columns)` of a contiguous tensor's last dimension.
fn rows_cols(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let cols = l.dims().last().copied().unwrap_or(1);
    Ok((l.shape().elem_count() / cols.max(1), cols))
}

fn same_types(what: &str, a: &CudaStorage, b: &CudaStorage) -> candle_core::Result<()> {
    if a.dtype() != b.dtype() {
        candle_core::bail!("{what}: {:?} and {:?}", a.dtype(), b.dtype());
    }
    Ok(())
}

/// `rms_norm_*`: the rows, the weight.
struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(xl)?;
        if wl.shape().elem_count() != cols {
            candle_core::bail!("rms norm: a weight of {:?} for rows of {cols}", wl.shape());
        }
        let dev = x.device().clone();
        let func = load_kernel!(dev, LAYER_OPS, "rms_norm", T::DTYPE)?;
        let (x0, x1) = contiguous(xl, "rms norm input")?;
        let (w0, w1) = contiguous(wl, "rms norm weight")?;
        let x = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let w = w.as_cuda_slice::<T>()?.slice(w0..w1);
        // SAFETY: the kernel writes every element (each block its row).
        let mut out = unsafe { dev.alloc::<T>(rows * cols)? };
        if rows > 0 {
            let cols32 = u32_arg(cols, "a row")?;
            let cfg = LaunchConfig {
                grid_dim: (u32_arg(rows, "rows")?, 1, 1),
                block_dim: (NORM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&w);
            b.arg(&mut out);
            b.arg(&cols32);
            b.arg(&self.eps);
            // SAFETY: the arguments match the kernel's signature and the sizes were checked.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "phi-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("phi-rms-norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        same_types("rms norm", x, w)?;
        by_dtype!(x.dtype(), "rms norm", |T| self.launch::<T>(x, xl, w, wl))
    }
}

/// `add_rms_norm_*`: the rows, what is added to them, the weight; the output is
/// `[2, ..shape]`, the sums then their norms.
struct AddRmsNorm {
    eps: f32,
}

impl AddRmsNorm {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        d: &CudaStorage,
        dl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(xl)?;
        if wl.shape().elem_count() != cols || dl.shape() != xl.shape() {
            candle_core::bail!(
                "add rms norm: {:?} + {:?}, weight {:?}",
                xl.shape(),
                dl.shape(),
                wl.shape()
            );
        }
        let dev = x.device().clone();
        let func = load_kernel!(dev, LAYER_OPS, "add_rms_norm", T::DTYPE)?;
        let (x0, x1) = contiguous(xl, "add rms norm input")?;
        let (d0, d1) = contiguous(dl, "add rms norm delta")?;
        let (w0, w1) = contiguous(wl, "add rms norm weight")?;
        let x = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let d = d.as_cuda_slice::<T>()?.slice(d0..d1);
        let w = w.as_cuda_slice::<T>()?.slice(w0..w1);
        let n = rows * cols;
        // SAFETY: the kernel writes every element of both halves.
        let mut out = unsafe { dev.alloc::<T>(2 * n)? };
        if rows > 0 {
            let (mut sum, mut normed) = out.split_at_mut(n);
            let cols32 = u32_arg(cols, "a row")?;
            let cfg = LaunchConfig {
                grid_dim: (u32_arg(rows, "rows")?, 1, 1),
                block_dim: (NORM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&d);
            b.arg(&w);
            b.arg(&mut sum);
            b.arg(&mut normed);
            b.arg(&cols32);
            b.arg(&self.eps);
            // SAFETY: the arguments match the kernel's signature and the sizes were checked.
            unsafe { b.launch(cfg) }.w()?;
        }
        let mut dims = vec![2];
        dims.extend_from_slice(xl.dims());
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "phi-add-rms-norm"
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
        candle_core::bail!("phi-add-rms-norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        d: &CudaStorage,
        dl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        same_types("add rms norm", x, d)?;
        same_types("add rms norm", x, w)?;
        by_dtype!(x.dtype(), "add rms norm", |T| self.launch::<T>(x, xl, d, dl, w, wl))
    }
}

/// `silu_mul_*`: `[rows, 2 n]` to `[rows, n]`.
struct SiluMul;

impl SiluMul {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols2) = rows_cols(xl)?;
        if cols2 % 2 != 0 {
            candle_core::bail!("silu gate: rows of {cols2} do not halve");
        }
        let cols = cols2 / 2;
        let dev = x.device().clone();
        let func = load_kernel!(dev, LAYER_OPS, "silu_mul", T::DTYPE)?;
        let (x0, x1) = contiguous(xl, "silu gate input")?;
        let x = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let n = rows * cols;
        // SAFETY: the kernel writes every element (one thread each).
        let mut out = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize);
            let cfg = LaunchConfig {
                grid_dim: (u32_arg(blocks, "silu gate blocks")?, 1, 1),
                block_dim: (ELEMENTWISE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n64, cols32) = (n as u64, u32_arg(cols, "a row")?);
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&mut out);
            b.arg(&n64);
            b.arg(&cols32);
            // SAFETY: the arguments match the kernel's signature (`size_t` is 64 bits on every
            // CUDA target) and the sizes were checked.
            unsafe { b.launch(cfg) }.w()?;
        }
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rows_cols saw a last dimension") = cols;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "phi-silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("phi-silu-mul runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(x.dtype(), "silu gate", |T| Self::launch::<T>(x, xl))
    }
}

/// `rope_queries_*`: the fused qkv rows to the rotated queries.
struct RopeQueries {
    rope: RopeTables,
    heads: Heads,
}

impl RopeQueries {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        qkv: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Heads { n_heads, n_kv_heads, head_dim, .. } = self.heads;
        let (n, stride) = l.shape().dims2()?;
        if stride != (n_heads + 2 * n_kv_heads) * head_dim {
            candle_core::bail!("rope: qkv rows {:?} for {n_heads}+2x{n_kv_heads} heads", l.shape());
        }
        let dev = qkv.device().clone();
        let func = load_kernel!(dev, LAYER_OPS, "rope_queries", T::DTYPE)?;
        let (q0, q1) = contiguous(l, "the qkv rows")?;
        let qkv = qkv.as_cuda_slice::<T>()?.slice(q0..q1);
        let tables = self.rope.storage(n, head_dim, T::DTYPE)?;
        let (cos, sin) = (tables.cos::<T>()?, tables.sin::<T>()?);
        // SAFETY: the kernel writes every element (each block one head of one row).
        let mut out = unsafe { dev.alloc::<T>(n * n_heads * head_dim)? };
        if n > 0 {
            let (stride, nq, hd) = (u32_arg(stride, "a row")?, n_heads as u32, head_dim as u32);
            let cfg = LaunchConfig {
                grid_dim: (u32_arg(n, "rows")?, nq, 1),
                block_dim: (hd.div_ceil(32).min(4) * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&qkv);
            b.arg(&stride);
            b.arg(&cos);
            b.arg(&sin);
            b.arg(&mut out);
            b.arg(&nq);
            b.arg(&hd);
            b.arg(&tables.rot_dim);
            // SAFETY: the arguments match the kernel's signature; the rows' and tables' shapes
            // were checked.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, n_heads, head_dim))))
    }
}

impl CustomOp1 for RopeQueries {
    fn name(&self) -> &'static str {
        "phi-rope-queries"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("phi-rope-queries runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(x.dtype(), "rope", |T| self.launch::<T>(x, l))
    }
}
