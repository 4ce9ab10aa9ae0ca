//! A sampled row as a device draws it: what [`crate::sampling::Sampler::device_draw`] hands
//! over, and the parameter words the sampling kernel (`kernels/sampling.cu`) reads; and the
//! words in and out of its log-probability kernel.
//!
//! Exists apart from the CUDA launcher (`cuda_sampling`) so that the packing is the same code in
//! the CPU build's tests of the kernel (`tests/cuda_kernels_emulated.rs`) as on a GPU.

use crate::error::{EngineError, Result};

/// What a device needs to sample a row the way [`crate::sampling::Sampler::sample`] does: the
/// kernel applies the penalties, masks the ids from `n_valid` on, and draws with `draw` by the
/// host's own arithmetic.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceDraw {
    /// The ids the row may choose from are `0..n_valid` (the rest are suppressed).
    pub n_valid: usize,
    /// `1 / temperature`, in f32 as the host multiplies by it; 0 for greedy decoding (the
    /// lowest id of the largest penalised logit).
    pub inv_temperature: f32,
    /// The nucleus' share of the probability mass (1 for none).
    pub top_p: f32,
    /// The step's uniform draw `draw / 2^53`, as the 53-bit integer `draw`.
    pub draw: u64,
    /// `(id, amount)`: the presence and frequency penalties as the amount subtracted from
    /// each id's logit, ids distinct, ascending and inside the row.
    pub penalties: Vec<(u32, f32)>,
}

/// Words of a row's parameters (`PHI_SAMPLE_ROW_WORDS` in the kernel).
pub const ROW_WORDS: usize = 8;

/// The kernel's parameters for `draws` (`(logits row, draw)`) from `[n_rows, vocab]` logits:
/// per draw [`ROW_WORDS`] words (the logits row, `n_valid`, `1 / temperature` and `top_p` as
/// f32 bits, the draw's high and low words, the row's first penalty and their number), then the
/// penalties as `(id, amount as f32 bits)` pairs. Errors on a row, `n_valid`, draw or penalty
/// that does not fit the logits.
pub fn kernel_params(
    draws: &[(usize, &DeviceDraw)],
    n_rows: usize,
    vocab: usize,
) -> Result<Vec<u32>> {
    let invalid = |what: String| EngineError::Candle(candle_core::Error::Msg(what));
    let n_penalties: usize = draws.iter().map(|(_, d)| d.penalties.len()).sum();
    if vocab > u32::MAX as usize || n_penalties > u32::MAX as usize {
        return Err(invalid(format!("{n_penalties} penalties over {vocab} ids")));
    }
    let mut words = Vec::with_capacity(draws.len() * ROW_WORDS + 2 * n_penalties);
    let mut first_penalty = 0u32;
    for &(row, d) in draws {
        if row >= n_rows || d.n_valid > vocab || d.draw >= 1 << 53 {
            return Err(invalid(format!(
                "a device draw from row {row} of {n_rows}, over {} of {vocab} ids",
                d.n_valid
            )));
        }
        words.extend([
            row as u32,
            d.n_valid as u32,
            d.inv_temperature.to_bits(),
            d.top_p.to_bits(),
            (d.draw >> 32) as u32,
            d.draw as u32,
            first_penalty,
            d.penalties.len() as u32,
        ]);
        first_penalty += d.penalties.len() as u32;
    }
    for &(_, d) in draws {
        for &(id, amount) in &d.penalties {
            if id as usize >= vocab {
                return Err(invalid(format!("a penalty on id {id} of {vocab}")));
            }
            words.extend([id, amount.to_bits()]);
        }
    }
    Ok(words)
}

/// Words of a row's parameters for the log-probability kernel (`PHI_LOGPROB_ROW_WORDS`).
pub const LOGPROB_ROW_WORDS: usize = 4;

/// The most top logits the kernel lists (`PHI_LOGPROB_MAX_TOP`): the API's limit.
pub const LOGPROB_MAX_TOP: usize = crate::sampling::MAX_TOP_LOGPROBS;

/// Words of a row's answer from the log-probability kernel (`PHI_LOGPROB_OUT_WORDS`).
pub const LOGPROB_OUT_WORDS: usize = 5 + 2 * LOGPROB_MAX_TOP;

/// A row whose token was picked on the device and that reports log-probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogprobRow {
    /// The logits row.
    pub row: usize,
    /// The ids the top logits may be among are `0..n_valid` (the rest are suppressed).
    pub n_valid: usize,
    /// How many top logits to list.
    pub top: usize,
    /// The picked token.
    pub token: u32,
}

/// The log-probability kernel's parameters for `rows` of `[n_rows, vocab]` logits:
/// [`LOGPROB_ROW_WORDS`] words a row (the logits row, `n_valid`, the top count, the token).
pub fn logprob_params(rows: &[LogprobRow], n_rows: usize, vocab: usize) -> Result<Vec<u32>> {
    let mut words = Vec::with_capacity(rows.len() * LOGPROB_ROW_WORDS);
    for r in rows {
        if r.row >= n_rows
            || r.n_valid > vocab
            || r.token as usize >= vocab
            || vocab > u32::MAX as usize
        {
            return Err(EngineError::Candle(candle_core::Error::Msg(format!(
                "log-probabilities of token {} in row {} of {n_rows}, over {} of {vocab} ids",
                r.token, r.row, r.n_valid
            ))));
        }
        words.extend([r.row as u32, r.n_valid as u32, r.top.min(LOGPROB_MAX_TOP) as u32, r.token]);
    }
    Ok(words)
}

/// The kernel's answers ([`LOGPROB_OUT_WORDS`] words a row) as the sampler takes them.
pub fn read_logprobs(words: &[u32]) -> Result<Vec<RawLogprobs>> {
    words
        .chunks(LOGPROB_OUT_WORDS)
        .map(|o| {
            let n = *o.get(4).unwrap_or(&u32::MAX) as usize;
            if o.len() != LOGPROB_OUT_WORDS || n > LOGPROB_MAX_TOP {
                return Err(EngineError::Candle(candle_core::Error::Msg(format!(
                    "a log-probability answer of {} words listing {n}",
                    o.len()
                ))));
            }
            Ok(RawLogprobs {
                max: f32::from_bits(o[0]),
                token_logit: f32::from_bits(o[1]),
                sum: f64::from_bits((u64::from(o[2]) << 32) | u64::from(o[3])),
                top: o[5..5 + 2 * n].chunks(2).map(|p| (p[0], f32::from_bits(p[1]))).collect(),
            })
        })
        .collect()
}

/// What the log-probabilities of a row are made from, computed where the logits are: see
/// [`crate::sampling::Sampler::take_picked`].
#[derive(Clone, Debug, PartialEq)]
pub struct RawLogprobs {
    /// The row's largest logit.
    pub max: f32,
    /// The sum of `exp(logit - max)` over the row, in f64.
    pub sum: f64,
    /// The picked token's logit.
    pub token_logit: f32,
    /// The largest finite logits among the ids that may be chosen, `(id, logit)`, descending,
    /// ties to the lower id.
    pub top: Vec<(u32, f32)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_then_penalties() {
        let a = DeviceDraw {
            n_valid: 5,
            inv_temperature: 2.0,
            top_p: 0.5,
            draw: (3 << 32) | 7,
            penalties: vec![(1, 0.25), (4, 1.0)],
        };
        let b = DeviceDraw { penalties: vec![(0, -1.0)], draw: 9, ..a.clone() };
        let words = kernel_params(&[(2, &a), (0, &b)], 3, 6).unwrap();
        let f = |x: f32| x.to_bits();
        assert_eq!(
            words,
            [
                vec![2, 5, f(2.0), f(0.5), 3, 7, 0, 2],
                vec![0, 5, f(2.0), f(0.5), 0, 9, 2, 1],
                vec![1, f(0.25), 4, f(1.0), 0, f(-1.0)],
            ]
            .concat()
        );
        assert!(kernel_params(&[(3, &a)], 3, 6).is_err(), "a row past the logits");
        assert!(kernel_params(&[(0, &a)], 3, 4).is_err(), "n_valid past the row");
        let far = DeviceDraw { penalties: vec![(6, 1.0)], ..a.clone() };
        assert!(kernel_params(&[(0, &far)], 3, 6).is_err(), "a penalty past the row");
        let big = DeviceDraw { draw: 1 << 53, ..a };
        assert!(kernel_params(&[(0, &big)], 3, 6).is_err(), "a draw of more than 53 bits");
    }

    #[test]
    fn logprob_words_in_and_out() {
        let row = LogprobRow { row: 1, n_valid: 5, top: 25, token: 4 };
        assert_eq!(logprob_params(&[row], 2, 6).unwrap(), vec![1, 5, LOGPROB_MAX_TOP as u32, 4]);
        assert!(logprob_params(&[LogprobRow { token: 6, ..row }], 2, 6).is_err());
        assert!(logprob_params(&[LogprobRow { row: 2, ..row }], 2, 6).is_err());

        let sum = 12.5f64.to_bits();
        let mut words = vec![0u32; 2 * LOGPROB_OUT_WORDS];
        words[..7].copy_from_slice(&[
            3f32.to_bits(),
            2f32.to_bits(),
            (sum >> 32) as u32,
            sum as u32,
            1,
            7,
            3f32.to_bits(),
        ]);
        let raw = read_logprobs(&words).unwrap();
        assert_eq!(
            raw[0],
            RawLogprobs { max: 3.0, sum: 12.5, token_logit: 2.0, top: vec![(7, 3.0)] }
        );
        assert!(raw[1].top.is_empty());
        words[4] = LOGPROB_MAX_TOP as u32 + 1;
        assert!(read_logprobs(&words).is_err(), "more top logits than there are words for");
        assert!(read_logprobs(&words[..LOGPROB_OUT_WORDS - 1]).is_err(), "a short answer");
    }
}
