//! Each step's token choice on the GPU, so that a row's logits never leave the device: the host
//! reads one token id a row instead of the whole vocabulary (32,064 floats for Phi-3, 8 MB a
//! step at 64 streams), and skips its own passes over it (a quarter of a millisecond a row on
//! one core).
//!
//! [`pick_rows`] runs up to three kernels one after another on the GPU's stream, into one
//! answer that the host reads once, so that a step synchronises with the host once, whatever
//! its rows ask for:
//! - `kernels/greedy.cu` for greedy rows without penalties: the lowest id among the largest
//!   logits, what [`crate::sampling::Sampler::sample`] picks for a row
//!   [`crate::sampling::Sampler::greedy_prefix`] accepts;
//! - `kernels/sampling.cu`'s `sample_rows_f32` for rows
//!   [`crate::sampling::Sampler::device_draw`] accepted (temperature, top_p, penalties): with
//!   the same draw and, but for the order in which the total of the exponentials is summed, the
//!   same arithmetic as `sample`;
//! - its `logprob_rows_f32` for the picked rows that report log-probabilities: the row's
//!   log-normaliser as a maximum and a sum, and its top logits
//!   ([`crate::sampling::Sampler::take_picked`]), for the token the first two wrote.
//!
//! A row's answer is [`ON_HOST`] where `sample` would report an error, and where the nucleus
//! does not fit the kernel, so that the host samples that row itself with the same draw. Tested
//! on the CPU under the emulation of CUDA's thread model (`tests/cuda_kernels_emulated.rs`,
//! which launches the kernels as [`pick_rows`] does) against the host sampler, and on a GPU by
//! `tests/cuda_parity.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

use crate::cuda_kernels::{contiguous, load_kernel, u32_arg, GREEDY, SAMPLING};
pub use crate::device_draw::ON_HOST;
use crate::device_draw::{Pick, PickPlan, PickRow};
use crate::error::Result;

/// Threads of a row's block: a lone row (single-stream decode) is one block, so it is as wide
/// as a block gets.
const THREADS: u32 = 1024;

/// Whether [`pick_rows`] takes `logits`: float32 on a GPU.
pub fn supports(logits: &Tensor) -> bool {
    matches!(logits.device(), Device::Cuda(_)) && logits.dtype() == DType::F32
}

/// For each of `rows` of `logits` (`[rows, vocab]`, float32, on a GPU), the token the host
/// sampler would pick and, where the row asks for them, what its log-probabilities are made
/// from; `None` where the host has to sample the row itself. One transfer of the parameters,
/// up to three launches and one transfer of the answer.
pub fn pick_rows(logits: &Tensor, rows: &[PickRow]) -> Result<Vec<Option<Pick>>> {
    let (n_rows, vocab) = logits.dims2()?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let plan = PickPlan::new(rows, n_rows, vocab)?;
    let n_words = plan.words.len();
    let params = Tensor::from_slice(&plan.words, n_words, logits.device())?;
    let logits = logits.contiguous()?;
    let op = PickKernels {
        n_greedy: plan.n_greedy,
        n_draw: plan.n_draw,
        n_logprob: plan.n_logprob,
        draw_offset: plan.draw_offset,
        logprob_offset: plan.logprob_offset,
    };
    plan.read(&logits.apply_op2_no_bwd(&params, &op)?.to_vec1::<u32>()?)
}

/// The kernels of one [`PickPlan`] over the logits (the first input) with the plan's words
/// (the second): its counts and offsets.
struct PickKernels {
    n_greedy: usize,
    n_draw: usize,
    n_logprob: usize,
    draw_offset: usize,
    logprob_offset: usize,
}

impl CustomOp2 for PickKernels {
    fn name(&self) -> &'static str {
        "phi-pick-rows"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("phi-pick-rows runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        p: &CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if x.dtype() != DType::F32 || p.dtype() != DType::U32 {
            candle_core::bail!("phi-pick-rows: {:?} logits, {:?} parameters", x.dtype(), p.dtype());
        }
        let (_, vocab) = xl.shape().dims2()?;
        let n_words = pl.shape().elem_count();
        let n_picks = self.n_greedy + self.n_draw;
        let out_words = n_picks + self.n_logprob * crate::device_draw::LOGPROB_OUT_WORDS;
        // The greedy kernel's ids run past the row by up to 8 blocks' width before it masks
        // them.
        if vocab == 0
            || vocab > (u32::MAX / 2) as usize
            || self.draw_offset != self.n_greedy * crate::device_draw::GREEDY_ROW_WORDS
            || self.logprob_offset < self.draw_offset + self.n_draw * crate::device_draw::ROW_WORDS
            || n_words
                != self.logprob_offset + self.n_logprob * crate::device_draw::LOGPROB_ROW_WORDS
        {
            candle_core::bail!(
                "phi-pick-rows: {n_words} parameter words for {} greedy, {} drawn and {} \
                 log-probability rows of {vocab}",
                self.n_greedy,
                self.n_draw,
                self.n_logprob
            );
        }
        let dev = x.device().clone();
        let (x0, x1) = contiguous(xl, "the logits")?;
        let (p0, _) = contiguous(pl, "the parameters")?;
        let x = x.as_cuda_slice::<f32>()?.slice(x0..x1);
        let p = p.as_cuda_slice::<u32>()?;
        // Zeroed: a log-probability row lists only as many top logits as it found, and a row
        // left to the host gets no answer at all (the pick kernels write every row's token).
        let mut out = dev.alloc_zeros::<u32>(out_words)?;
        let vocab = u32_arg(vocab, "the vocabulary")?;
        let cfg = |n: usize| -> candle_core::Result<LaunchConfig> {
            Ok(LaunchConfig {
                grid_dim: (u32_arg(n, "logits rows")?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        };
        // SAFETY (the three launches): the arguments match the kernels' signatures, and
        // `PickPlan::new` checked each row's index, `n_valid`, penalties and draw against the
        // logits; the parameter offsets were checked above.
        if self.n_greedy > 0 {
            let func = load_kernel!(dev, GREEDY, "greedy_argmax", DType::F32)?;
            let params = p.slice(p0..p0 + self.draw_offset);
            let mut tokens = out.slice_mut(0..self.n_greedy);
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&vocab);
            b.arg(&params);
            b.arg(&mut tokens);
            unsafe { b.launch(cfg(self.n_greedy)?) }.w()?;
        }
        if self.n_draw > 0 {
            let func = load_kernel!(dev, SAMPLING, "sample_rows", DType::F32)?;
            let params = p.slice(p0 + self.draw_offset..p0 + self.logprob_offset);
            // SAFETY: the kernel writes each row's whole scratch row before reading it.
            let mut work = unsafe { dev.alloc::<f32>(self.n_draw * vocab as usize)? };
            let mut tokens = out.slice_mut(self.n_greedy..n_picks);
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&vocab);
            b.arg(&params);
            b.arg(&mut work);
            b.arg(&mut tokens);
            unsafe { b.launch(cfg(self.n_draw)?) }.w()?;
        }
        if self.n_logprob > 0 {
            let func = load_kernel!(dev, SAMPLING, "logprob_rows", DType::F32)?;
            let params = p.slice(p0 + self.logprob_offset..p0 + n_words);
            let n_picks = u32_arg(n_picks, "picked rows")?;
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&vocab);
            b.arg(&params);
            b.arg(&mut out);
            b.arg(&n_picks);
            unsafe { b.launch(cfg(self.n_logprob)?) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(out_words)))
    }
}
