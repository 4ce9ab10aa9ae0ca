//! The model's matrices in either form it runs them: dense (candle tensors in the activation
//! dtype) or quantized GGUF blocks (candle's `QMatMul`, which multiplies block-quantized weights
//! without expanding them).
//!
//! Exists so the forward pass in [`crate::phi3`] is written once for safetensors checkpoints,
//! GGUF files and weights quantized at load time.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use candle_nn::Linear;

use crate::error::Result;
use crate::qgemm;

/// A weight matrix `[out, in]` applied as `x @ W^T`.
#[derive(Debug, Clone)]
pub enum Projection {
    /// A dense matrix in the activation dtype.
    Dense(Linear),
    /// Block-quantized weights in a format [`qgemm`] has no kernel for, on a device or CPU
    /// where it cannot run, or shared (the tied embedding), multiplied by candle's kernels.
    Quantized {
        /// The multiplication kernel over the blocks.
        matmul: QMatMul,
        /// The block format, reported in logs and `/info`-style summaries.
        dtype: GgmlDType,
    },
    /// Weights in a format of [`qgemm::supported`] (Q4_0, Q8_0, K-quants) repacked for its
    /// kernels (CPU with AVX2), for every number of rows: the GGUF blocks are dropped once
    /// repacked, so the weights are held once (`cargo bench --bench quantized --
    /// prompt_matmul`: against candle on a Phi-3-mini `gate_up` matrix, see benches/README.md).
    Packed(Arc<qgemm::PackedWeights>),
}

impl Projection {
    /// A dense projection.
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(Linear::new(weight, None))
    }

    /// A quantized projection over `weight`.
    ///
    /// Blocks [`qgemm`] has a kernel for, on the CPU, are repacked for it when `weight` is not
    /// shared; a shared one (the tied embedding and `lm_head`, one copy for both) stays as it
    /// is, with candle's kernels, rather than be held twice.
    pub fn quantized(weight: Arc<QTensor>) -> Result<Self> {
        let dtype = weight.dtype();
        let weight = if qgemm::supported(dtype) && weight.device().is_cpu() {
            match Arc::try_unwrap(weight) {
                Ok(q) => {
                    let (n, k) = q.shape().dims2()?;
                    let packed = qgemm::PackedWeights::new(dtype, &q.data()?, n, k);
                    return Ok(Self::Packed(Arc::new(packed)));
                }
                Err(shared) => shared,
            }
        } else {
            weight
        };
        Ok(Self::Quantized { matmul: QMatMul::from_arc(weight)?, dtype })
    }

    /// `x @ W^T` for `x` of shape `[.., in]`, in `x`'s dtype.
    ///
    /// Quantized kernels take float32, float16 or bfloat16 rows on the CPU and float32 on GPUs;
    /// other inputs are converted there and back.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(linear) => Ok(linear.forward(x)?),
            Self::Quantized { matmul, .. } => {
                let native = x.device().is_cpu() || x.dtype() == DType::F32;
                if native {
                    Ok(matmul.forward(&x.contiguous()?)?)
                } else {
                    let y = matmul.forward(&x.to_dtype(DType::F32)?.contiguous()?)?;
                    Ok(y.to_dtype(x.dtype())?)
                }
            }
            Self::Packed(w) => {
                let mut shape = x.dims().to_vec();
                let k = shape.last().copied().unwrap_or(0);
                if k != w.cols() {
                    let msg = format!("x has {k} columns, the weights {}", w.cols());
                    return Err(candle_core::Error::Msg(msg).into());
                }
                let m = x.elem_count() / k.max(1);
                let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let threads = candle_core::utils::get_num_threads();
                let out = w.matmul(&xs, m, threads);
                *shape.last_mut().expect("rank >= 1") = w.rows();
                Ok(Tensor::from_vec(out, shape, x.device())?.to_dtype(x.dtype())?)
            }
        }
    }

    /// The block format of a quantized projection; `None` for a dense one.
    pub fn quantized_dtype(&self) -> Option<GgmlDType> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized { dtype, .. } => Some(*dtype),
            Self::Packed(w) => Some(w.dtype()),
        }
    }
}

/// The block format most of `projections` are quantized in, or `None` when none is: what a
/// model reports as its quantization (a mixed scheme keeps some matrices in other formats).
pub fn most_common_format<'a>(
    projections: impl IntoIterator<Item = &'a Projection>,
) -> Option<GgmlDType> {
    let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
    for d in projections.into_iter().filter_map(Projection::quantized_dtype) {
        match counts.iter_mut().find(|(x, _)| *x == d) {
            Some((_, n)) => *n += 1,
            None => counts.push((d, 1)),
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
}

/// The token embedding table, dense or quantized.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// `[vocab, hidden]` in the activation dtype.
    Dense(Tensor),
    /// Quantized rows, expanded only for the looked-up tokens, so a 4-bit file does not grow
    /// by a float copy of the table.
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// The rows of `ids` (`[n]`, u32), as `[n, hidden]` in `dtype`.
    pub fn lookup(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(table) => Ok(table.index_select(ids, 0)?),
            Self::Quantized(table) => Ok(table.embedding(ids)?.to_dtype(dtype)?),
        }
    }
}
