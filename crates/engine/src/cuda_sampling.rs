//! Temperature and top_p sampling on the GPU (`kernels/sampling.cu`), so that a sampled row's
//! logits never leave the device: the host reads one token id a row instead of the whole
//! vocabulary (32,064 floats for Phi-3, 8 MB a step at 64 streams), and skips its own passes
//! over it (a quarter of a millisecond a row on one core).
//!
//! The kernel picks what [`crate::sampling::Sampler::sample`] picks for a row that
//! [`crate::sampling::Sampler::device_draw`] accepted, with the same draw and, but for the order
//! in which the total of the exponentials is summed, the same arithmetic; it answers [`ON_HOST`]
//! where `sample` would report an error, and where the nucleus does not fit it, so that the host
//! samples that row itself with the same draw. A picked row (drawn here or by `cuda_greedy`) that
//! reports log-probabilities gets what they are made from from a second kernel of the same file,
//! [`logprob_rows`]: the row's log-normaliser as a maximum and a sum, and its top logits, so
//! that it is not copied out either. Tested on the CPU under the emulation of CUDA's
//! thread model (`tests/cuda_kernels_emulated.rs`) against the host sampler, and on a GPU by
//! `tests/cuda_parity.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

use crate::cuda_kernels::{contiguous, load_kernel, u32_arg, SAMPLING};
use crate::device_draw::{
    kernel_params, logprob_params, read_logprobs, DeviceDraw, LogprobRow, RawLogprobs,
    LOGPROB_OUT_WORDS, LOGPROB_ROW_WORDS, ROW_WORDS,
};
use crate::error::Result;

/// A row's answer when the host has to sample it itself (`PHI_SAMPLE_ON_HOST` in the kernel).
pub const ON_HOST: u32 = u32::MAX;

/// Threads of a row's block: a lone row (single-stream decode) is one block, so it is as wide
/// as a block gets.
const THREADS: u32 = 1024;

/// Whether [`sample_rows`] takes `logits`: float32 on a GPU.
pub fn supports(logits: &Tensor) -> bool {
    matches!(logits.device(), Device::Cuda(_)) && logits.dtype() == DType::F32
}

/// For each `(row, draw)` the token the host sampler would draw from row `row` of `logits`
/// (`[rows, vocab]`, float32, on a GPU), or [`ON_HOST`]. One transfer of the parameters, one
/// launch and one transfer of the tokens.
pub fn sample_rows(logits: &Tensor, draws: &[(usize, &DeviceDraw)]) -> Result<Vec<u32>> {
    let (n_rows, vocab) = logits.dims2()?;
    if draws.is_empty() {
        return Ok(Vec::new());
    }
    let params = kernel_params(draws, n_rows, vocab)?;
    let n_params = params.len();
    let params = Tensor::from_vec(params, n_params, logits.device())?;
    let logits = logits.contiguous()?;
    let op = RowKernel::Sample { n_rows: draws.len() };
    Ok(logits.apply_op2_no_bwd(&params, &op)?.to_vec1::<u32>()?)
}

/// For each of `rows` (a token picked on the device from a row of `logits`, `[rows, vocab]`,
/// float32, on a GPU) what its log-probabilities are made from
/// ([`crate::sampling::Sampler::take_picked`]). One transfer of the parameters, one launch and
/// one transfer of the answers.
pub fn logprob_rows(logits: &Tensor, rows: &[LogprobRow]) -> Result<Vec<RawLogprobs>> {
    let (n_rows, vocab) = logits.dims2()?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let params = logprob_params(rows, n_rows, vocab)?;
    let n_params = params.len();
    let params = Tensor::from_vec(params, n_params, logits.device())?;
    let logits = logits.contiguous()?;
    let op = RowKernel::Logprobs { n_rows: rows.len() };
    read_logprobs(&logits.apply_op2_no_bwd(&params, &op)?.to_vec1::<u32>()?)
}

/// One of the kernels of `kernels/sampling.cu` over `n_rows` rows of the logits (the first
/// input) with their parameter words (the second).
enum RowKernel {
    /// `sample_rows_f32`: one token id a row.
    Sample { n_rows: usize },
    /// `logprob_rows_f32`: [`LOGPROB_OUT_WORDS`] words a row.
    Logprobs { n_rows: usize },
}

impl CustomOp2 for RowKernel {
    fn name(&self) -> &'static str {
        match self {
            RowKernel::Sample { .. } => "phi-sample-rows",
            RowKernel::Logprobs { .. } => "phi-logprob-rows",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        p: &CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if x.dtype() != DType::F32 || p.dtype() != DType::U32 {
            candle_core::bail!(
                "{}: {:?} logits, {:?} parameters",
                self.name(),
                x.dtype(),
                p.dtype()
            );
        }
        let (_, vocab) = xl.shape().dims2()?;
        // The sampling kernel's penalties follow its rows' words.
        let (kernel, n, min_words, out_words) = match *self {
            RowKernel::Sample { n_rows } => ("sample_rows", n_rows, n_rows * ROW_WORDS, n_rows),
            RowKernel::Logprobs { n_rows } => {
                ("logprob_rows", n_rows, n_rows * LOGPROB_ROW_WORDS, n_rows * LOGPROB_OUT_WORDS)
            }
        };
        if pl.shape().elem_count() < min_words || vocab == 0 {
            candle_core::bail!(
                "{}: {} parameter words for {n} rows of {vocab}",
                self.name(),
                pl.shape().elem_count()
            );
        }
        let dev = x.device().clone();
        let func = load_kernel!(dev, SAMPLING, kernel, DType::F32)?;
        let (x0, x1) = contiguous(xl, "the logits")?;
        let (p0, p1) = contiguous(pl, "the row parameters")?;
        let x = x.as_cuda_slice::<f32>()?.slice(x0..x1);
        let p = p.as_cuda_slice::<u32>()?.slice(p0..p1);
        // Zeroed: a log-probability row lists only as many top logits as it found (the
        // sampling kernel writes every row's id).
        let mut out = dev.alloc_zeros::<u32>(out_words)?;
        // SAFETY: the sampling kernel writes each row's whole scratch row before reading it.
        let mut work = match self {
            RowKernel::Sample { .. } => Some(unsafe { dev.alloc::<f32>(n * vocab)? }),
            RowKernel::Logprobs { .. } => None,
        };
        if n > 0 {
            let cfg = LaunchConfig {
                grid_dim: (u32_arg(n, "logits rows")?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let vocab = u32_arg(vocab, "the vocabulary")?;
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&vocab);
            b.arg(&p);
            if let Some(work) = work.as_mut() {
                b.arg(work);
            }
            b.arg(&mut out);
            // SAFETY: the arguments match the kernels' signatures; `sample_rows` and
            // `logprob_rows` checked each row's index, `n_valid`, penalties and token against
            // the logits.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(out_words)))
    }
}
