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

/// Rows of activations from which [`qgemm`]'s tiled kernel beats candle's dot products: from
/// one (`cargo bench --bench quantized -- prompt_matmul`: at one row 2.0x for Q4_0 and 1.25x for
/// Q8_0 on a Phi-3-mini `gate_up` matrix, at 128 rows 4.2x and 3.6x).
const QGEMM_MIN_ROWS: usize = 1;

/// A weight matrix `[out, in]` applied as `x @ W^T`.
#[derive(Debug, Clone)]
pub enum Projection {
    /// A dense matrix in the activation dtype.
    Dense(Linear),
    /// Block-quantized weights (Q4_0, Q8_0, Q4_K, ...).
    Quantized {
        /// The multiplication kernel over the blocks.
        matmul: QMatMul,
        /// The blocks themselves, for the prompt-sized kernels of [`crate::qgemm`].
        weight: Arc<QTensor>,
        /// The block format, reported in logs and `/info`-style summaries.
        dtype: GgmlDType,
    },
}

impl Projection {
    /// A dense projection.
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(Linear::new(weight, None))
    }

    /// A quantized projection sharing `weight` (the tied embedding and `lm_head` use one copy).
    pub fn quantized(weight: Arc<QTensor>) -> Result<Self> {
        let dtype = weight.dtype();
        Ok(Self::Quantized { matmul: QMatMul::from_arc(weight.clone())?, weight, dtype })
    }

    /// `x @ W^T` for `x` of shape `[rows, in]`, in `x`'s dtype.
    ///
    /// Quantized kernels take float32, float16 or bfloat16 rows on the CPU and float32 on GPUs;
    /// other inputs are converted there and back.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(linear) => Ok(linear.forward(x)?),
            Self::Quantized { matmul, weight, dtype } => {
                let rows = x.dims().first().copied().unwrap_or(1);
                if rows >= QGEMM_MIN_ROWS
                    && x.rank() == 2
                    && x.device().is_cpu()
                    && x.dtype() == DType::F32
                    && qgemm::supported(*dtype)
                {
                    let (m, k) = x.dims2()?;
                    let n = weight.shape().dims()[0];
                    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                    let threads = candle_core::utils::get_num_threads();
                    let out = qgemm::matmul(*dtype, &weight.data()?, n, k, &xs, m, threads);
                    return Ok(Tensor::from_vec(out, (m, n), x.device())?);
                }
                let native = x.device().is_cpu() || x.dtype() == DType::F32;
                if native {
                    Ok(matmul.forward(&x.contiguous()?)?)
                } else {
                    let y = matmul.forward(&x.to_dtype(DType::F32)?.contiguous()?)?;
                    Ok(y.to_dtype(x.dtype())?)
                }
            }
        }
    }

    /// The block format of a quantized projection; `None` for a dense one.
    pub fn quantized_dtype(&self) -> Option<GgmlDType> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized { dtype, .. } => Some(*dtype),
        }
    }
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
