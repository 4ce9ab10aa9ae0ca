//! What the host reads of a step's logits before sampling.
//!
//! Exists because on a GPU the logits are a vocabulary-wide float32 row per sequence (128 KB for
//! Phi-3), and copying every row out each step, then scanning it on the host, is a large part of
//! a batched decode step at many streams. A greedy row without penalties
//! ([`crate::sampling::Sampler::greedy_prefix`]) is decided on the device and only its token id
//! read back, and so is any other row the device can pick from
//! ([`crate::sampling::Sampler::device_draw`]), with what its log-probabilities are made from
//! where it reports them, all of them in one read of one answer (so that the step waits for the
//! GPU once); the rows left to the host are gathered and copied in one more transfer;
//! rows nothing samples from (prompt chunks that do not reach the end of their prompt) are not
//! copied at all.
//! On the CPU the logits are already in memory: they are read as they are.

use candle_core::Tensor;

use crate::device_draw::{Pick, PickRow, PickRule};
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
    /// The row as the device picks it, where it does (a GPU's `cuda_sampling::pick_rows`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn pick(&self, row: usize) -> Option<PickRow<'_>> {
        let (rule, logprobs) = match self {
            RowNeed::Greedy { n_valid, logprobs } => {
                (PickRule::Greedy { n_valid: *n_valid }, *logprobs)
            }
            RowNeed::Draw { draw, logprobs } => (PickRule::Draw(draw), *logprobs),
            RowNeed::Unused | RowNeed::Host => return None,
        };
        Some(PickRow { row, rule, logprobs })
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
#[derive(Clone, Debug)]
enum RowSource {
    /// The row starts at this offset in `host`.
    Host(usize),
    /// The device's pick.
    Picked(Pick),
}

/// A step's logits as the samplers read them.
pub(crate) struct StepLogits {
    vocab: usize,
    /// The rows copied to the host, one after another.
    host: Vec<f32>,
    /// Per logits row; `None` for unused rows.
    rows: Vec<Option<RowSource>>,
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
        let mut picked = device_picks(logits, needs)?.into_iter();
        let mut rows = vec![None; n_rows];
        let mut host_rows = Vec::new();
        for (row, need) in needs.iter().enumerate() {
            if matches!(need, RowNeed::Unused) {
                continue;
            }
            match picked.next().flatten() {
                Some(pick) => rows[row] = Some(RowSource::Picked(pick)),
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
        Ok(StepLogits { vocab, host, rows })
    }

    /// Row `row`'s answer. A row read as [`RowNeed::Unused`] has no logits (an empty row,
    /// which the sampler rejects as such).
    pub(crate) fn row(&self, row: usize) -> RowChoice<'_> {
        match self.rows.get(row).and_then(Option::as_ref) {
            Some(RowSource::Picked(pick)) => RowChoice::Picked(pick.token, pick.logprobs.as_ref()),
            Some(&RowSource::Host(at)) => RowChoice::Logits(&self.host[at..at + self.vocab]),
            None => RowChoice::Logits(&[]),
        }
    }
}

/// Per row that is not [`RowNeed::Unused`], in order, the device's pick where it made one, on
/// a GPU: one launch sequence and one read for every row ([`RowNeed::pick`]). Empty where no
/// row is picked on the device.
#[cfg(feature = "cuda")]
fn device_picks(logits: &Tensor, needs: &[RowNeed]) -> Result<Vec<Option<Pick>>> {
    if !crate::cuda_sampling::supports(logits) {
        return Ok(Vec::new());
    }
    let used = needs.iter().enumerate().filter(|(_, n)| !matches!(n, RowNeed::Unused));
    let (slots, rows): (Vec<usize>, Vec<PickRow>) =
        used.clone().enumerate().filter_map(|(k, (row, n))| Some((k, n.pick(row)?))).unzip();
    let mut answers = crate::cuda_sampling::pick_rows(logits, &rows)?.into_iter();
    let mut picks = vec![None; used.count()];
    for slot in slots {
        picks[slot] = answers.next().flatten();
    }
    Ok(picks)
}

#[cfg(not(feature = "cuda"))]
fn device_picks(_: &Tensor, _: &[RowNeed]) -> Result<Vec<Option<Pick>>> {
    Ok(Vec::new())
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
    fn greedy_and_drawn_rows_are_picked_on_the_device_as_they_ask() {
        let draw = DeviceDraw {
            n_valid: 7,
            inv_temperature: 2.0,
            top_p: 0.5,
            draw: 3,
            penalties: vec![(1, 0.5)],
        };
        assert_eq!(RowNeed::Unused.pick(0), None);
        assert_eq!(RowNeed::Host.pick(0), None);
        let greedy = RowNeed::Greedy { n_valid: 5, logprobs: Some(2) };
        let want = PickRow { row: 3, rule: PickRule::Greedy { n_valid: 5 }, logprobs: Some(2) };
        assert_eq!(greedy.pick(3), Some(want));
        let drawn = RowNeed::Draw { draw: draw.clone(), logprobs: None };
        let want = PickRow { row: 1, rule: PickRule::Draw(&draw), logprobs: None };
        assert_eq!(drawn.pick(1), Some(want));
    }
}
