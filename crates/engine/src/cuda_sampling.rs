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
    let op = SampleRows { n_draws: draws.len() };
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
    let op = LogprobRows { n_rows: rows.len() };
    read_logprobs(&logits.apply_op2_no_bwd(&params, &op)?.to_vec1::<u32>()?)
}

/// `logprob_rows_f32`: the logits and the rows' parameters to [`LOGPROB_OUT_WORDS`] words a
/// row.
struct LogprobRows {
    n_rows: usize,
}

impl CustomOp2 for LogprobRows {
    fn name(&self) -> &'static str {
        "phi-logprob-rows"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("phi-logprob-rows runs on CUDA only")
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
                "logprobs of {:?} logits with {:?} parameters",
                x.dtype(),
                p.dtype()
            );
        }
        let (_, vocab) = xl.shape().dims2()?;
        let n = self.n_rows;
        if pl.shape().elem_count() != n * LOGPROB_ROW_WORDS || vocab == 0 {
            candle_core::bail!(
                "{} parameter words for {n} rows of {vocab}",
                pl.shape().elem_count()
            );
        }
        let dev = x.device().clone();
        let func = load_kernel!(dev, SAMPLING, "logprob_rows", DType::F32)?;
        let (x0, x1) = contiguous(xl, "the logits")?;
        let (p0, p1) = contiguous(pl, "the logprob parameters")?;
        let x = x.as_cuda_slice::<f32>()?.slice(x0..x1);
        let p = p.as_cuda_slice::<u32>()?.slice(p0..p1);
        // Zeroed: a row lists only as many top logits as it found.
        let mut out = dev.alloc_zeros::<u32>(n * LOGPROB_OUT_WORDS)?;
        if n > 0 {
            let cfg = LaunchConfig {
                grid_dim: (u32_arg(n, "logprob rows")?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let vocab = u32_arg(vocab, "the vocabulary")?;
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&vocab);
            b.arg(&p);
            b.arg(&mut out);
            // SAFETY: the arguments match the kernel's signature; `logprob_rows` checked each
            // row's index, `n_valid` and token against the logits.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n * LOGPROB_OUT_WORDS)))
    }
}

/// `sample_rows_f32`: the logits and the rows' parameters to one id a drawn row.
struct SampleRows {
    n_draws: usize,
}

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "phi-sample-rows"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("phi-sample-rows runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        p: &CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if x.dtype() != DType::F32 || p.dtype() != DType::U32 {
            candle_core::bail!("sampling {:?} logits with {:?} parameters", x.dtype(), p.dtype());
        }
        let (_, vocab) = xl.shape().dims2()?;
        let n = self.n_draws;
        if pl.shape().elem_count() < n * ROW_WORDS {
            candle_core::bail!("{} parameter words for {n} rows", pl.shape().elem_count());
        }
        let dev = x.device().clone();
        let func = load_kernel!(dev, SAMPLING, "sample_rows", DType::F32)?;
        let (x0, x1) = contiguous(xl, "the logits")?;
        let (p0, p1) = contiguous(pl, "the sampling parameters")?;
        let x = x.as_cuda_slice::<f32>()?.slice(x0..x1);
        let p = p.as_cuda_slice::<u32>()?.slice(p0..p1);
        // SAFETY: the kernel writes each row's whole scratch row before reading it, and every
        // row's id (thread 0 of each row's block).
        let mut work = unsafe { dev.alloc::<f32>(n * vocab)? };
        let mut out = unsafe { dev.alloc::<u32>(n)? };
        if vocab == 0 {
            candle_core::bail!("sampling from empty logits rows");
        }
        if n > 0 {
            let cfg = LaunchConfig {
                grid_dim: (u32_arg(n, "sampled rows")?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let vocab = u32_arg(vocab, "the vocabulary")?;
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&vocab);
            b.arg(&p);
            b.arg(&mut work);
            b.arg(&mut out);
            // SAFETY: the arguments match the kernel's signature; `sample_rows` checked each
            // row's index, `n_valid` and penalties against the logits.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
    }
}
