//! Greedy decoding's argmax on the GPU (`kernels/greedy.cu`), so that a greedy row's logits
//! never leave the device: the host reads one token id a row instead of the whole vocabulary
//! (32,064 floats for Phi-3, 8 MB a step at 64 streams), and skips its own passes over it.
//!
//! The kernel picks what [`crate::sampling::Sampler::sample`] picks for a row that
//! [`crate::sampling::Sampler::greedy_prefix`] accepts, and answers [`ON_HOST`] where `sample`
//! would report an error instead, so that the host samples that row itself and the error is the
//! usual one. Tested on the CPU under the emulation of CUDA's thread model
//! (`tests/cuda_kernels_emulated.rs`) against the host sampler, and on a GPU by
//! `tests/cuda_parity.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::cuda_kernels::{contiguous, load_kernel, u32_arg, GREEDY};
use crate::error::{EngineError, Result};

/// A row's answer when the host has to sample it itself: it holds a NaN or `+inf`, or nothing
/// but `-inf` among the ids it may choose (`PHI_GREEDY_ON_HOST` in the kernel).
pub const ON_HOST: u32 = u32::MAX;

/// Threads of a row's block: a lone row (single-stream decode) is one block, so it is as wide
/// as a block gets.
const THREADS: u32 = 1024;

/// Whether [`argmax_rows`] takes `logits`: float32 on a GPU.
pub fn supports(logits: &Tensor) -> bool {
    matches!(logits.device(), Device::Cuda(_)) && logits.dtype() == DType::F32
}

/// For each row of `logits` (`[rows, vocab]`, float32, on a GPU) the lowest id among the
/// largest of its first `n_valid` values, or [`ON_HOST`]. One launch and one transfer of
/// `rows` ids.
pub fn argmax_rows(logits: &Tensor, n_valid: usize) -> Result<Vec<u32>> {
    let (_, vocab) = logits.dims2()?;
    if n_valid > vocab {
        return Err(EngineError::Candle(candle_core::Error::Msg(format!(
            "greedy argmax over {n_valid} of {vocab} logits"
        ))));
    }
    let logits = logits.contiguous()?;
    Ok(logits.apply_op1_no_bwd(&GreedyArgmax { n_valid })?.to_vec1::<u32>()?)
}

/// `greedy_argmax_f32`: the logits rows to one id each.
struct GreedyArgmax {
    n_valid: usize,
}

impl CustomOp1 for GreedyArgmax {
    fn name(&self) -> &'static str {
        "phi-greedy-argmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("phi-greedy-argmax runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        if x.dtype() != DType::F32 {
            candle_core::bail!("greedy argmax of {:?} logits (takes f32)", x.dtype());
        }
        let (rows, vocab) = l.shape().dims2()?;
        // The kernel's ids run past the row by up to 8 blocks' width before it masks them.
        if vocab > (u32::MAX / 2) as usize {
            candle_core::bail!("greedy argmax over a vocabulary of {vocab}");
        }
        let dev = x.device().clone();
        let func = load_kernel!(dev, GREEDY, "greedy_argmax", DType::F32)?;
        let (x0, x1) = contiguous(l, "the logits")?;
        let x = x.as_cuda_slice::<f32>()?.slice(x0..x1);
        // SAFETY: the kernel writes every row's id (thread 0 of each row's block).
        let mut out = unsafe { dev.alloc::<u32>(rows)? };
        if rows > 0 {
            let cfg = LaunchConfig {
                grid_dim: (u32_arg(rows, "logits rows")?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (vocab, n_valid) = (vocab as u32, self.n_valid as u32);
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&vocab);
            b.arg(&n_valid);
            b.arg(&mut out);
            // SAFETY: the arguments match the kernel's signature; `n_valid <= vocab` was
            // checked by `argmax_rows` and the rows are contiguous.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
    }
}
