//! What the host reads of a step's logits before sampling.
//!
//! Exists because on a GPU the logits are a vocabulary-wide float32 row per sequence (128 KB for
//! Phi-3), and copying every row out each step, then scanning it on the host, is a large part of
//! a batched decode step at many streams. A greedy row without penalties
//! ([`crate::sampling::Sampler::greedy_prefix`]) is decided on the device and only its token id
//! read back, and so is any other row the device can pick from
//! ([`crate::sampling::Sampler::device_draw`]), with what its log-probabilities are made from
//! where it reports them; the rows left to the host are gathered and copied in one transfer;
//! rows nothing samples from (prompt chunks that do not reach the end of their prompt) are not
//! copied at all.
//! On the CPU the logits are already in memory: they are read as they are.

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::sampling::{DeviceDraw, RawLogprobs};

/// Whether the device that holds `logits` picks tokens itself ([`RowNeed::Greedy`] and
/// [`RowNeed::Draw`] rows): a GPU.
pub(crate) fn picks_on_device(logits: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return crate::cuda_sampling::supports(logits);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = logits;
        false
    }
}

/// What sampling needs of one row of a step's logits.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RowNeed {
    /// Nothing samples from the row.
    Unused,
    /// The host sampler reads the whole row.
    Host,
    /// The row's token is the argmax of its first `n_valid` logits (the sampler's greedy
    /// prefix); `logprobs`: [`crate::sampling::Sampler::logprobs_wanted`].
    Greedy { n_valid: usize, logprobs: Option<usize> },
    /// The row's token is drawn on the device as `draw` says; `logprobs` as for `Greedy`.
    Draw { draw: DeviceDraw, logprobs: Option<usize> },
}

impl RowNeed {
    /// The ids a device pick chooses among (`0..n`) and the log-probabilities it reports.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn device_logprobs(&self) -> Option<(usize, Option<usize>)> {
        match self {
            RowNeed::Greedy { n_valid, logprobs } => Some((*n_valid, *logprobs)),
            RowNeed::Draw { draw, logprobs } => Some((draw.n_valid, *logprobs)),
            RowNeed::Unused | RowNeed::Host => None,
        }
    }
}

/// A sampled row once the step's logits are read.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowChoice<'a> {
    /// The token the device picked, with what its log-probabilities are made from where the
    /// row reports them.
    Picked(u32, Option<&'a RawLogprobs>),
    /// The row's logits, for the host sampler.
    Logits(&'a [f32]),
}

/// Where a sampled row's answer is.
#[derive(Clone, Copy, Debug)]
enum RowSource {
    /// The row starts at this offset in `host`.
    Host(usize),
    /// The device's pick, and the index of its log-probabilities in `raw`.
    Picked(u32, Option<usize>),
}

/// A step's logits as the samplers read them.
pub(crate) struct StepLogits {
    vocab: usize,
    /// The rows copied to the host, one after another.
    host: Vec<f32>,
    /// Per logits row; `None` for unused rows.
    rows: Vec<Option<RowSource>>,
    /// The picked rows' log-probabilities, computed on the device.
    raw: Vec<RawLogprobs>,
}

impl StepLogits {
    /// Reads `logits` (`[rows, vocab]`, float32) as `needs` (one per row) asks.
    pub(crate) fn read(logits: &Tensor, needs: &[RowNeed]) -> Result<Self> {
        let (n_rows, vocab) = logits.dims2()?;
        if needs.len() != n_rows {
            return Err(EngineError::Candle(candle_core::Error::Msg(format!(
                "{} sampling needs for {n_rows} logits rows",
                needs.len()
            ))));
        }
        let (picked, raw) = device_picks(logits, needs)?;
        let mut rows = vec![None; n_rows];
        let mut host_rows = Vec::new();
        for (row, need) in needs.iter().enumerate() {
            if matches!(need, RowNeed::Unused) {
                continue;
            }
            match picked.get(row).copied().flatten() {
                Some((token, at)) => rows[row] = Some(RowSource::Picked(token, at)),
                None => host_rows.push(row as u32),
            }
        }
        let host = if host_rows.is_empty() {
            Vec::new()
        } else if host_rows.len() == n_rows || logits.device().is_cpu() {
            for &row in &host_rows {
                rows[row as usize] = Some(RowSource::Host(row as usize * vocab));
            }
            logits.flatten_all()?.to_vec1::<f32>()?
        } else {
            for (i, &row) in host_rows.iter().enumerate() {
                rows[row as usize] = Some(RowSource::Host(i * vocab));
            }
            let index = Tensor::new(host_rows.as_slice(), logits.device())?;
            logits.index_select(&index, 0)?.flatten_all()?.to_vec1::<f32>()?
        };
        Ok(StepLogits { vocab, host, rows, raw })
    }

    /// Row `row`'s answer. A row read as [`RowNeed::Unused`] has no logits (an empty row,
    /// which the sampler rejects as such).
    pub(crate) fn row(&self, row: usize) -> RowChoice<'_> {
        match self.rows.get(row).copied().flatten() {
            Some(RowSource::Picked(token, at)) => {
                RowChoice::Picked(token, at.and_then(|i| self.raw.get(i)))
            }
            Some(RowSource::Host(at)) => RowChoice::Logits(&self.host[at..at + self.vocab]),
            None => RowChoice::Logits(&[]),
        }
    }
}

/// Per row, the device's pick where it made one, on a GPU (the greedy rows that ask for the most
/// common greedy prefix, and the drawn rows), with the index of its log-probabilities in the
/// second vector where it reports them. Empty where no row is picked on the device.
#[cfg(feature = "cuda")]
fn device_picks(logits: &Tensor, needs: &[RowNeed]) -> Result<(Vec<Picked>, Vec<RawLogprobs>)> {
    use crate::device_draw::LogprobRow;
    use crate::{cuda_greedy, cuda_sampling};
    if !cuda_sampling::supports(logits) {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut picked: Vec<Option<u32>> = vec![None; needs.len()];
    // Every sequence of an engine suppresses the same ids, so one prefix is the rule; a row
    // that asks for another is sampled on the host.
    if let Some(n) = most_common_prefix(needs) {
        let tokens = cuda_greedy::argmax_rows(logits, n)?;
        for ((pick, need), t) in picked.iter_mut().zip(needs).zip(tokens) {
            if matches!(need, RowNeed::Greedy { n_valid, .. } if *n_valid == n)
                && t != cuda_greedy::ON_HOST
            {
                *pick = Some(t);
            }
        }
    }
    let draws: Vec<(usize, &DeviceDraw)> = needs
        .iter()
        .enumerate()
        .filter_map(|(row, need)| match need {
            RowNeed::Draw { draw, .. } => Some((row, draw)),
            _ => None,
        })
        .collect();
    let tokens = cuda_sampling::sample_rows(logits, &draws)?;
    for ((row, _), t) in draws.into_iter().zip(tokens) {
        if t != cuda_sampling::ON_HOST {
            picked[row] = Some(t);
        }
    }
    // The log-probabilities of the picked rows that report them, in one more launch.
    let mut wanted = Vec::new();
    for (row, (pick, need)) in picked.iter().zip(needs).enumerate() {
        if let (Some(token), Some((n_valid, Some(top)))) = (*pick, need.device_logprobs()) {
            wanted.push(LogprobRow { row, n_valid, top, token });
        }
    }
    let raw = cuda_sampling::logprob_rows(logits, &wanted)?;
    let mut at = wanted.iter().map(|w| w.row).zip(0..).peekable();
    let picked = picked
        .into_iter()
        .enumerate()
        .map(|(row, pick)| {
            let raw = at.next_if(|&(r, _)| r == row).map(|(_, i)| i);
            pick.map(|t| (t, raw))
        })
        .collect();
    Ok((picked, raw))
}

/// A row's pick on the device and where its log-probabilities are.
type Picked = Option<(u32, Option<usize>)>;

#[cfg(not(feature = "cuda"))]
fn device_picks(_: &Tensor, _: &[RowNeed]) -> Result<(Vec<Picked>, Vec<RawLogprobs>)> {
    Ok((Vec::new(), Vec::new()))
}

/// The greedy prefix most rows ask for (the smallest among equally common ones), if any.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn most_common_prefix(needs: &[RowNeed]) -> Option<usize> {
    let mut counts: Vec<(usize, usize)> = Vec::new();
    for need in needs {
        if let RowNeed::Greedy { n_valid: n, .. } = *need {
            match counts.iter_mut().find(|(m, _)| *m == n) {
                Some((_, c)) => *c += 1,
                None => counts.push((n, 1)),
            }
        }
    }
    counts.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).map(|(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_cpu_reads_every_sampled_row_whole() {
        let values: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let logits = Tensor::from_vec(values, (3, 4), &Device::Cpu).unwrap();
        let draw = DeviceDraw {
            n_valid: 4,
            inv_temperature: 1.0,
            top_p: 1.0,
            draw: 0,
            penalties: Vec::new(),
        };
        let needs = [
            RowNeed::Greedy { n_valid: 4, logprobs: None },
            RowNeed::Unused,
            RowNeed::Draw { draw, logprobs: Some(2) },
        ];
        assert!(!picks_on_device(&logits));
        let read = StepLogits::read(&logits, &needs).unwrap();
        assert!(matches!(read.row(0), RowChoice::Logits([0.0, 1.0, 2.0, 3.0])));
        assert!(matches!(read.row(1), RowChoice::Logits([])));
        assert!(matches!(read.row(2), RowChoice::Logits([8.0, 9.0, 10.0, 11.0])));
        assert!(matches!(read.row(3), RowChoice::Logits([])));
    }

    #[test]
    fn the_prefix_most_rows_ask_for() {
        use RowNeed::*;
        let greedy = |n_valid| Greedy { n_valid, logprobs: None };
        assert_eq!(most_common_prefix(&[Host, Unused]), None);
        assert_eq!(most_common_prefix(&[greedy(7), Host, greedy(5), greedy(5)]), Some(5));
        let with_logprobs = Greedy { n_valid: 7, logprobs: Some(0) };
        assert_eq!(most_common_prefix(&[with_logprobs, greedy(7), greedy(5)]), Some(7));
    }
}
