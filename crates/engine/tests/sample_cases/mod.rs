//! Logits rows and samplers for the GPU's sampling kernels (`kernels/sampling.cu`), and the checks
//! of their answers against the host sampler (the tokens it draws with the same draws, the
//! log-probabilities it reports), shared by `cuda_kernels_emulated.rs` (the kernels on the CPU)
//! and `cuda_parity.rs` (the kernels on a GPU).

use crate::greedy_cases::Rng;
use phi_engine::device_draw::{Pick, PickRow, PickRule};
use phi_engine::sampling::{DeviceDraw, SampledToken, Sampler, SamplingParams};

/// The kernel's answer for a row the host samples itself (`device_draw::ON_HOST`).
pub const ON_HOST: u32 = u32::MAX;

/// The most tokens the kernel sorts for a nucleus (`PHI_SAMPLE_MAX_CANDIDATES`).
const MAX_CANDIDATES: usize = 4096;

/// Rows of logits, one seeded sampler each, and each row's draw as the kernel takes it.
pub struct Case {
    pub vocab: usize,
    n_valid: usize,
    /// `[rows, vocab]`.
    pub logits: Vec<f32>,
    /// Per row, with the step's draw taken.
    samplers: Vec<Sampler>,
    /// Per row, the tokens generated so far (the penalties').
    generated: Vec<Vec<u32>>,
    draws: Vec<DeviceDraw>,
}

impl Case {
    /// `n_rows` rows of `vocab` logits, the ids from `n_valid` on suppressed: by row modulo 8,
    /// plain draws at low, unit and high temperature, top_p nuclei small and large, with ties,
    /// with penalties and logit_bias (sampled and greedy), the rows the host reports an error
    /// for, flat rows whose nucleus is the whole row, and rows whose every token is within a
    /// factor of two of the largest.
    pub fn new(seed: u64, n_rows: usize, vocab: usize, n_valid: usize) -> Case {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let (mut logits, mut samplers, mut generated, mut draws) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let tail = vocab - n_valid;
        for r in 0..n_rows {
            let mut row: Vec<f32> = (0..vocab).map(|_| rng.logit()).collect();
            let mut params = SamplingParams {
                seed: Some((seed * 1000 + r as u64) as i64),
                ..Default::default()
            };
            let mut tokens = Vec::new();
            match r % 8 {
                // The whole row, sharply peaked, as is, and flattened.
                0 => params.temperature = [1.0, 0.05, 2.0][(r / 8) % 3],
                // Azure's sample parameters: a nucleus of a few tokens.
                1 => (params.temperature, params.top_p) = (0.8, 0.1),
                // A few likely tokens, two pairs of them tied, over a long flat tail.
                2 => {
                    row.iter_mut().for_each(|x| *x *= 0.3);
                    for k in 0..20 {
                        row[rng.below(n_valid)] = 12.0 + (k / 2) as f32 * 0.4;
                    }
                    (params.temperature, params.top_p) = (1.0, 0.95);
                }
                // Penalties on the likely tokens, some of them repeated, one suppressed id
                // and one past the row among the generated.
                3 => {
                    let likely: Vec<usize> = (0..10).map(|_| rng.below(n_valid)).collect();
                    for (k, &id) in likely.iter().enumerate() {
                        row[id] = 12.0 + k as f32 * 0.2;
                    }
                    tokens = (0..30).map(|k| likely[(k * 7) % 5] as u32).collect();
                    tokens.extend([(n_valid + rng.below(tail)) as u32, vocab as u32 + 3]);
                    // Sampled, or greedy (the penalties decide which token is the largest).
                    (params.temperature, params.top_p) =
                        if (r / 8) % 2 == 0 { (0.9, 0.8) } else { (0.0, 1.0) };
                    (params.presence_penalty, params.frequency_penalty) = (0.5, 1.5);
                    // logit_bias on a penalised token, a banned one, an unlikely one raised
                    // and a suppressed one (which stays suppressed).
                    params.logit_bias.extend([
                        (likely[0] as u32, 1.5),
                        (likely[7] as u32, -100.0),
                        (rng.below(n_valid) as u32, 9.0),
                    ]);
                    if tail > 0 {
                        params.logit_bias.insert((n_valid + rng.below(tail)) as u32, 100.0);
                    }
                }
                // A NaN (among the suppressed ids where there are some): the host reports it.
                4 => {
                    row[if tail > 0 { n_valid + rng.below(tail) } else { rng.below(n_valid) }] =
                        f32::NAN;
                    params.top_p = 0.9;
                }
                // +inf where it could be chosen: the host reports it.
                5 => row[rng.below(n_valid)] = f32::INFINITY,
                // Nothing to choose but -inf (the host reports it), or three survivors, two
                // of them tied.
                6 => {
                    row[..n_valid].fill(f32::NEG_INFINITY);
                    if (r / 8) % 2 == 1 {
                        for (k, v) in [(0, -3.0), (1, -3.0), (2, -2.5)] {
                            row[(k * n_valid) / 3 + rng.below(n_valid / 3)] = v;
                        }
                    }
                    params.top_p = 0.5;
                }
                // Flat: every token in the nucleus' range, ties throughout; or every token
                // within a factor of two of the largest, a small nucleus at their top.
                _ if (r / 8).is_multiple_of(2) => {
                    row.fill(0.0);
                    params.top_p = 0.5;
                }
                _ => {
                    row.iter_mut().for_each(|x| *x = (*x + 10.0) / 40.0);
                    params.top_p = 0.02;
                }
            }
            let mut sampler =
                Sampler::new(params).unwrap().with_suppressed_tokens(n_valid as u32..vocab as u32);
            let draw = sampler.device_draw(vocab, &tokens).expect("a row the device can draw");
            logits.extend(row);
            samplers.push(sampler);
            generated.push(tokens);
            draws.push(draw);
        }
        Case { vocab, n_valid, logits, samplers, generated, draws }
    }

    /// The rows' picks, in reverse order of their rows (the kernel's `k`th token is for the
    /// `k`th of these).
    pub fn picks(&self) -> Vec<PickRow<'_>> {
        let rows = self.draws.iter().enumerate().rev();
        rows.map(|(row, d)| PickRow { row, rule: PickRule::Draw(d), logprobs: None }).collect()
    }

    /// Checks the kernels' `answers` for [`Case::picks`]: each row's is the token the host
    /// sampler draws with the same draw, or left to the host exactly where the host reports an
    /// error and where a flat row's nucleus (all of its tied tokens) has more tokens than the
    /// kernel sorts.
    pub fn check(&self, name: &str, answers: &[Option<Pick>]) {
        let order = self.picks();
        assert_eq!(answers.len(), order.len(), "{name}: one answer a row");
        let (mut errors, mut distinct) = (0, std::collections::HashSet::new());
        for (pick, answer) in order.iter().zip(answers) {
            let (r, token) = (pick.row, answer.as_ref().map_or(ON_HOST, |a| a.token));
            assert!(answer.as_ref().is_none_or(|a| a.logprobs.is_none()), "{name}: row {r}");
            let row = &self.logits[r * self.vocab..(r + 1) * self.vocab];
            let too_flat = r % 8 == 7 && (r / 8).is_multiple_of(2) && self.n_valid > MAX_CANDIDATES;
            match self.samplers[r].clone().sample(row, &self.generated[r]) {
                Ok(_) if too_flat => assert_eq!(token, ON_HOST, "{name}: row {r} is too flat"),
                Ok(s) => {
                    assert_eq!(token, s.token, "{name}: row {r}");
                    distinct.insert(token);
                }
                Err(e) => {
                    assert_eq!(token, ON_HOST, "{name}: row {r} is the host's ({e})");
                    errors += 1;
                }
            }
        }
        let planted =
            |r: usize| matches!(r % 8, 4 | 5) || (r % 8 == 6 && (r / 8).is_multiple_of(2));
        assert_eq!(errors, (0..order.len()).filter(|&r| planted(r)).count(), "{name}: errors");
        assert!(distinct.len() > order.len() / 4, "{name}: the rows drew {distinct:?}");
    }
}

/// Rows that report log-probabilities, for the log-probability kernel after the greedy and
/// sampling kernels: the host sampler's answers, and the rows as the kernels take them.
pub struct LogprobCase {
    vocab: usize,
    /// `[rows, vocab]`.
    pub logits: Vec<f32>,
    /// Per row, as it was before sampling (a sampled row's with its draw taken).
    samplers: Vec<Sampler>,
    /// Per row, the host's answer (`None` where it reports an error).
    answers: Vec<Option<SampledToken>>,
    /// Per sampled row, its draw.
    draws: Vec<Option<DeviceDraw>>,
    n_valid: usize,
}

impl LogprobCase {
    /// `n_rows` rows of `vocab` logits, the ids from `n_valid` on suppressed: by row modulo 5,
    /// random values, ties at the top, the largest value among the suppressed ids with `-inf`
    /// among the others, fewer finite logits than the top asked for, and a NaN the host
    /// reports; then by `(row / 5) % 6`, greedy with 0, 1, 5 and 20 top logprobs, sampled with
    /// 3, and sampled without logprobs.
    pub fn new(seed: u64, n_rows: usize, vocab: usize, n_valid: usize) -> LogprobCase {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let (mut logits, mut samplers, mut answers, mut draws) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let tail = vocab - n_valid;
        for r in 0..n_rows {
            let mut row: Vec<f32> = (0..vocab).map(|_| rng.logit()).collect();
            match r % 5 {
                0 => {}
                1 => {
                    for _ in 0..6 {
                        row[rng.below(n_valid)] = 15.0;
                    }
                }
                2 => {
                    if tail > 0 {
                        row[n_valid + rng.below(tail)] = 40.0;
                    }
                    for _ in 0..vocab / 3 {
                        row[rng.below(vocab)] = f32::NEG_INFINITY;
                    }
                    row[rng.below(n_valid)] = 5.0;
                }
                3 => {
                    row[..n_valid].fill(f32::NEG_INFINITY);
                    for _ in 0..3 {
                        row[rng.below(n_valid)] = rng.logit();
                    }
                }
                _ => row[rng.below(n_valid)] = f32::NAN,
            }
            let kind = (r / 5) % 6;
            let top = [None, Some(1), Some(5), Some(20), Some(3), None][kind];
            let params = SamplingParams {
                temperature: if kind >= 4 { 0.9 } else { 0.0 },
                top_p: 0.9,
                logprobs: kind != 5,
                top_logprobs: top,
                seed: Some(seed as i64 + r as i64),
                ..Default::default()
            };
            let mut sampler =
                Sampler::new(params).unwrap().with_suppressed_tokens(n_valid as u32..vocab as u32);
            if kind >= 4 {
                draws.push(Some(sampler.device_draw(vocab, &[]).expect("a drawn row")));
            } else {
                assert_eq!(sampler.greedy_prefix(vocab), Some(n_valid), "a greedy row");
                draws.push(None);
            }
            answers.push(sampler.clone().sample(&row, &[]).ok());
            logits.extend(row);
            samplers.push(sampler);
        }
        LogprobCase { vocab, logits, samplers, answers, draws, n_valid }
    }

    /// The rows' picks, in row order.
    pub fn picks(&self) -> Vec<PickRow<'_>> {
        (self.draws.iter().zip(&self.samplers).enumerate())
            .map(|(row, (draw, sampler))| PickRow {
                row,
                rule: match draw {
                    Some(d) => PickRule::Draw(d),
                    None => PickRule::Greedy { n_valid: self.n_valid },
                },
                logprobs: sampler.logprobs_wanted(),
            })
            .collect()
    }

    /// Checks the kernels' `answers` for [`LogprobCase::picks`]: taken by the sampler, each
    /// gives the host's token, top ids and (within an ulp or so of their f64 sums' order)
    /// logprobs; the rows the host reports an error for are left to the host.
    pub fn check(&self, name: &str, answers: &[Option<Pick>]) {
        assert_eq!(answers.len(), self.answers.len(), "{name}: one answer a row");
        let mut on_host = 0;
        for (r, answer) in answers.iter().enumerate() {
            let Some(want) = &self.answers[r] else {
                assert_eq!(answer, &None, "{name}: row {r} is the host's");
                on_host += 1;
                continue;
            };
            let pick =
                answer.as_ref().unwrap_or_else(|| panic!("{name}: row {r} left to the host"));
            let wanted = self.samplers[r].logprobs_wanted().is_some();
            assert_eq!(pick.logprobs.is_some(), wanted, "{name}: row {r}: logprobs");
            assert!(pick.token < self.vocab as u32, "{name}: row {r}");
            let got = self.samplers[r].clone().take_picked(pick.token, pick.logprobs.as_ref());
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * a.abs().max(1.0);
            assert_eq!(got.token, want.token, "{name}: row {r}");
            assert_eq!(got.logprob.is_some(), want.logprob.is_some(), "{name}: row {r}");
            if let (Some(a), Some(b)) = (got.logprob, want.logprob) {
                assert!(close(a, b), "{name}: row {r}: {got:?} vs {want:?}");
            }
            let ids = |t: &SampledToken| t.top_logprobs.iter().map(|p| p.0).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(want), "{name}: row {r}: top ids");
            for (a, b) in got.top_logprobs.iter().zip(&want.top_logprobs) {
                assert!(close(a.1, b.1), "{name}: row {r}: top {a:?} vs {b:?}");
            }
        }
        assert_eq!(on_host, (answers.len() + 1) / 5, "{name}: the NaN rows are the host's");
    }
}
