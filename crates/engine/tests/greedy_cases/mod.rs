//! Logits rows for the GPU's greedy argmax (`kernels/greedy.cu`) and the check of its answers
//! against the host sampler, shared by `cuda_kernels_emulated.rs` (the kernel on the CPU) and
//! `cuda_parity.rs` (the kernel on a GPU).

use phi_engine::device_draw::{Pick, PickRow, PickRule};
use phi_engine::sampling::{Sampler, SamplingParams};

/// The kernel's answer for a row the host samples itself (`device_draw::ON_HOST`).
pub const ON_HOST: u32 = u32::MAX;

/// The picks of `n_rows` greedy rows over the ids below `n_valid`, in reverse order of their
/// rows (the `k`th answer is for row `n_rows - 1 - k`).
pub fn picks(n_rows: usize, n_valid: usize) -> Vec<PickRow<'static>> {
    (0..n_rows)
        .rev()
        .map(|row| PickRow { row, rule: PickRule::Greedy { n_valid }, logprobs: None })
        .collect()
}

/// The tokens of `answers` in row order (`answers` being for [`picks`]), [`ON_HOST`] where the
/// device left a row to the host.
pub fn tokens(answers: &[Option<Pick>]) -> Vec<u32> {
    answers.iter().rev().map(|a| a.as_ref().map_or(ON_HOST, |p| p.token)).collect()
}

/// A small deterministic generator (xorshift64*), also `sample_cases`'.
pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11
    }

    /// Uniform in `[-10, 10)`.
    pub fn logit(&mut self) -> f32 {
        (self.next() % 2_000_000) as f32 / 100_000.0 - 10.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n.max(1)
    }
}

/// `n_rows` rows of `vocab` logits, the ids from `n_valid` on suppressed: random values with the
/// cases that decide an argmax planted in them, by row modulo 8.
pub fn rows(seed: u64, n_rows: usize, vocab: usize, n_valid: usize) -> Vec<f32> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut rows = Vec::with_capacity(n_rows * vocab);
    for r in 0..n_rows {
        let mut row: Vec<f32> = (0..vocab).map(|_| rng.logit()).collect();
        let tail = vocab - n_valid;
        match r % 8 {
            // Ties at the top, the lower one in a later warp's share of the row or not.
            0 | 1 => {
                let (a, b) = (rng.below(n_valid), rng.below(n_valid));
                row[a] = 20.0;
                row[b] = 20.0;
            }
            // The largest value among the suppressed ids (never chosen), one just below it.
            2 if tail > 0 => {
                row[n_valid + rng.below(tail)] = 50.0;
                row[rng.below(n_valid)] = 30.0;
            }
            // A NaN among the suppressed ids: the host reports it.
            3 if tail > 0 => row[n_valid + rng.below(tail)] = f32::NAN,
            // +inf where it could be chosen: the host reports it.
            4 => row[rng.below(n_valid)] = f32::INFINITY,
            // Nothing to choose but -inf, the suppressed ids finite: the host reports it.
            5 => row[..n_valid].fill(f32::NEG_INFINITY),
            // Mostly -inf, the survivors negative and tied.
            6 => {
                row[..n_valid].fill(f32::NEG_INFINITY);
                let (a, b) = (rng.below(n_valid), rng.below(n_valid));
                row[a] = -3.0;
                row[b] = -3.0;
            }
            // A NaN where it could be chosen (rows 2 and 3 too, without suppressed ids).
            _ => row[rng.below(n_valid)] = f32::NAN,
        }
        rows.extend(row);
    }
    rows
}

/// Checks the kernel's `tokens` for `logits` (made by [`rows`]): each row's is the host
/// sampler's greedy token, or [`ON_HOST`] exactly where the host sampler reports an error, and
/// the planted errors are all there.
pub fn check(name: &str, logits: &[f32], vocab: usize, n_valid: usize, tokens: &[u32]) {
    let n = logits.len() / vocab;
    assert_eq!(tokens.len(), n, "{name}: one token a row");
    let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
    let mut sampler =
        Sampler::new(greedy).unwrap().with_suppressed_tokens(n_valid as u32..vocab as u32);
    assert_eq!(sampler.greedy_prefix(vocab), Some(n_valid), "{name}: a greedy prefix");
    let mut on_host = 0;
    for (r, &token) in tokens.iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        match sampler.sample(row, &[]) {
            Ok(s) => assert_eq!(token, s.token, "{name}: row {r}"),
            Err(e) => {
                assert_eq!(token, ON_HOST, "{name}: row {r} is the host's ({e})");
                on_host += 1;
            }
        }
    }
    let planted = |r: usize| matches!(r % 8, 3 | 4 | 5 | 7) || (r % 8 == 2 && n_valid == vocab);
    assert_eq!(on_host, (0..n).filter(|&r| planted(r)).count(), "{name}: rows left to the host");
}
