//! A sampled row as a device draws it: what [`crate::sampling::Sampler::device_draw`] hands
//! over, and the parameter words the sampling kernel (`kernels/sampling.cu`) reads.
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
    /// `1 / temperature`, in f32 as the host multiplies by it.
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
}
