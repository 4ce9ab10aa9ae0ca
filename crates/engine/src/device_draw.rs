//! A row as a device picks its token: what [`crate::sampling::Sampler::device_draw`] hands over
//! for a sampled row, and the plan of one step's picks ([`PickPlan`]): the parameter words the
//! greedy, sampling and log-probability kernels (`kernels/greedy.cu`, `kernels/sampling.cu`)
//! read, and how their one answer is read back.
//!
//! Exists apart from the CUDA launcher (`cuda_sampling`) so that the packing is the same code in
//! the CPU build's tests of the kernels (`tests/cuda_kernels_emulated.rs`) as on a GPU.

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
    /// `(id, amount)`: the presence and frequency penalties minus the `logit_bias`, as the
    /// amount subtracted from each id's logit, ids distinct, ascending and inside the row.
    pub penalties: Vec<(u32, f32)>,
}

/// Words of a greedy row's parameters (`PHI_GREEDY_ROW_WORDS` in `kernels/greedy.cu`): the
/// logits row and `n_valid`.
pub const GREEDY_ROW_WORDS: usize = 2;

/// Words of a drawn row's parameters (`PHI_SAMPLE_ROW_WORDS` in `kernels/sampling.cu`).
pub const ROW_WORDS: usize = 8;

/// Words of a row's parameters for the log-probability kernel (`PHI_LOGPROB_ROW_WORDS`).
pub const LOGPROB_ROW_WORDS: usize = 4;

/// The most top logits the kernel lists (`PHI_LOGPROB_MAX_TOP`): the API's limit.
pub const LOGPROB_MAX_TOP: usize = crate::sampling::MAX_TOP_LOGPROBS;

/// Words of a row's answer from the log-probability kernel (`PHI_LOGPROB_OUT_WORDS`).
pub const LOGPROB_OUT_WORDS: usize = 5 + 2 * LOGPROB_MAX_TOP;

/// A row's answer where the device leaves it to the host (`PHI_GREEDY_ON_HOST`,
/// `PHI_SAMPLE_ON_HOST`): the host samples it itself, with the same draw.
pub const ON_HOST: u32 = u32::MAX;

/// How the device picks a row's token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PickRule<'a> {
    /// The lowest id among the largest of the first `n_valid` logits
    /// ([`crate::sampling::Sampler::greedy_prefix`]): `kernels/greedy.cu`.
    Greedy { n_valid: usize },
    /// Drawn as [`crate::sampling::Sampler::device_draw`] says: `kernels/sampling.cu`.
    Draw(&'a DeviceDraw),
}

impl PickRule<'_> {
    /// The ids the row chooses among are `0..n_valid`.
    pub fn n_valid(&self) -> usize {
        match self {
            PickRule::Greedy { n_valid } => *n_valid,
            PickRule::Draw(d) => d.n_valid,
        }
    }
}

/// A row of a step's logits whose token the device picks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PickRow<'a> {
    /// The logits row.
    pub row: usize,
    pub rule: PickRule<'a>,
    /// How many top logits its log-probabilities list, where it reports them
    /// ([`crate::sampling::Sampler::logprobs_wanted`]).
    pub logprobs: Option<usize>,
}

/// A row's token as the device picked it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub token: u32,
    /// What its log-probabilities are made from, where the row asked for them.
    pub logprobs: Option<RawLogprobs>,
}

/// One step's device picks as the kernels take them: every pick's parameter words in one
/// array, so that a step is one transfer in, the kernels' launches one after another, and one
/// transfer out (`cuda_sampling::pick_rows`).
///
/// The words are the greedy rows' ([`GREEDY_ROW_WORDS`] each), from `draw_offset` the drawn
/// rows' ([`ROW_WORDS`] each, then their penalties as `(id, amount as f32 bits)` pairs), and
/// from `logprob_offset` the log-probability rows' ([`LOGPROB_ROW_WORDS`] each: the logits row,
/// `n_valid`, the top count, and where the row's token is in the answer). The answer is
/// the greedy rows' tokens, the drawn rows' tokens, then [`LOGPROB_OUT_WORDS`] words a
/// log-probability row; the log-probability kernel reads the tokens the first two kernels wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct PickPlan {
    pub words: Vec<u32>,
    pub n_greedy: usize,
    pub n_draw: usize,
    pub n_logprob: usize,
    pub draw_offset: usize,
    pub logprob_offset: usize,
    /// Per row asked for: where its token is in the answer, and its log-probabilities.
    slots: Vec<(usize, Option<usize>)>,
}

impl PickPlan {
    /// The plan for `rows` of `[n_rows, vocab]` logits. Errors on a row, `n_valid`, draw or
    /// penalty that does not fit the logits.
    pub fn new(rows: &[PickRow], n_rows: usize, vocab: usize) -> Result<PickPlan> {
        if vocab > u32::MAX as usize || n_rows > u32::MAX as usize {
            return Err(invalid(format!("{n_rows} rows of {vocab} logits")));
        }
        for r in rows {
            if r.row >= n_rows || r.rule.n_valid() > vocab {
                return Err(invalid(format!(
                    "a device pick from row {} of {n_rows}, over {} of {vocab} ids",
                    r.row,
                    r.rule.n_valid()
                )));
            }
        }
        let mut words = Vec::new();
        let mut token_at = vec![0usize; rows.len()];
        let mut n_greedy = 0;
        for (i, r) in rows.iter().enumerate() {
            if let PickRule::Greedy { n_valid } = r.rule {
                words.extend([r.row as u32, n_valid as u32]);
                token_at[i] = n_greedy;
                n_greedy += 1;
            }
        }
        let draw_offset = words.len();
        let draws: Vec<(usize, usize, &DeviceDraw)> = (rows.iter().enumerate())
            .filter_map(|(i, r)| match r.rule {
                PickRule::Draw(d) => Some((i, r.row, d)),
                PickRule::Greedy { .. } => None,
            })
            .collect();
        for (k, &(i, _, _)) in draws.iter().enumerate() {
            token_at[i] = n_greedy + k;
        }
        draw_words(&draws, vocab, &mut words)?;
        let n_draw = draws.len();
        let logprob_offset = words.len();
        let mut slots = Vec::with_capacity(rows.len());
        let mut n_logprob = 0;
        for (r, &at) in rows.iter().zip(&token_at) {
            let logprobs = r.logprobs.map(|top| {
                let top = top.min(LOGPROB_MAX_TOP) as u32;
                words.extend([r.row as u32, r.rule.n_valid() as u32, top, at as u32]);
                n_logprob += 1;
                n_logprob - 1
            });
            slots.push((at, logprobs));
        }
        Ok(PickPlan { words, n_greedy, n_draw, n_logprob, draw_offset, logprob_offset, slots })
    }

    /// Words of the kernels' answer.
    pub fn answer_words(&self) -> usize {
        self.n_greedy + self.n_draw + self.n_logprob * LOGPROB_OUT_WORDS
    }

    /// Per row asked for, in order, its pick from the kernels' `answer`, or `None` where the
    /// device left the row to the host.
    pub fn read(&self, answer: &[u32]) -> Result<Vec<Option<Pick>>> {
        if answer.len() != self.answer_words() {
            return Err(invalid(format!(
                "{} words of device picks, {} expected",
                answer.len(),
                self.answer_words()
            )));
        }
        let n_tokens = self.n_greedy + self.n_draw;
        let logprobs = read_logprobs(&answer[n_tokens..])?;
        Ok(self
            .slots
            .iter()
            .map(|&(at, lp)| {
                let token = answer[at];
                (token != ON_HOST)
                    .then(|| Pick { token, logprobs: lp.map(|i| logprobs[i].clone()) })
            })
            .collect())
    }
}

/// An error about a pick that does not fit the logits.
fn invalid(what: String) -> EngineError {
    EngineError::Candle(candle_core::Error::Msg(what))
}

/// Appends the sampling kernel's parameters for `draws` (`(pick, logits row, draw)`) to
/// `words`: per draw [`ROW_WORDS`] words (the logits row, `n_valid`, `1 / temperature` and
/// `top_p` as f32 bits, the draw's high and low words, the row's first penalty and their
/// number), then the penalties as `(id, amount as f32 bits)` pairs; the kernel finds its
/// penalties after its rows' words.
fn draw_words(
    draws: &[(usize, usize, &DeviceDraw)],
    vocab: usize,
    words: &mut Vec<u32>,
) -> Result<()> {
    let n_penalties: usize = draws.iter().map(|(_, _, d)| d.penalties.len()).sum();
    if n_penalties > u32::MAX as usize {
        return Err(invalid(format!("{n_penalties} penalties")));
    }
    let mut first_penalty = 0u32;
    for &(_, row, d) in draws {
        if d.draw >= 1 << 53 {
            return Err(invalid(format!("a device draw of {} (53 bits at most)", d.draw)));
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
    for &(_, _, d) in draws {
        for &(id, amount) in &d.penalties {
            if id as usize >= vocab {
                return Err(invalid(format!("a penalty on id {id} of {vocab}")));
            }
            words.extend([id, amount.to_bits()]);
        }
    }
    Ok(())
}

/// The log-probability kernel's answers ([`LOGPROB_OUT_WORDS`] words a row) as the sampler
/// takes them.
fn read_logprobs(words: &[u32]) -> Result<Vec<RawLogprobs>> {
    words
        .chunks(LOGPROB_OUT_WORDS)
        .map(|o| {
            let n = *o.get(4).unwrap_or(&u32::MAX) as usize;
            if o.len() != LOGPROB_OUT_WORDS || n > LOGPROB_MAX_TOP {
                return Err(invalid(format!(
                    "a log-probability answer of {} words listing {n}",
                    o.len()
                )));
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

    fn f(x: f32) -> u32 {
        x.to_bits()
    }

    #[test]
    fn greedy_rows_then_drawn_rows_then_penalties_then_logprob_rows() {
        let a = DeviceDraw {
            n_valid: 5,
            inv_temperature: 2.0,
            top_p: 0.5,
            draw: (3 << 32) | 7,
            penalties: vec![(1, 0.25), (4, 1.0)],
        };
        let b = DeviceDraw { penalties: vec![(0, -1.0)], draw: 9, ..a.clone() };
        let rows = [
            PickRow { row: 2, rule: PickRule::Draw(&a), logprobs: Some(3) },
            PickRow { row: 1, rule: PickRule::Greedy { n_valid: 6 }, logprobs: None },
            PickRow { row: 0, rule: PickRule::Draw(&b), logprobs: None },
            PickRow { row: 3, rule: PickRule::Greedy { n_valid: 4 }, logprobs: Some(25) },
        ];
        let plan = PickPlan::new(&rows, 4, 6).unwrap();
        assert_eq!((plan.n_greedy, plan.n_draw, plan.n_logprob), (2, 2, 2));
        assert_eq!((plan.draw_offset, plan.logprob_offset), (4, 26));
        assert_eq!(
            plan.words,
            [
                vec![1, 6, 3, 4],
                vec![2, 5, f(2.0), f(0.5), 3, 7, 0, 2],
                vec![0, 5, f(2.0), f(0.5), 0, 9, 2, 1],
                vec![1, f(0.25), 4, f(1.0), 0, f(-1.0)],
                // The first row's token is the first drawn one (2), the last row's the
                // second greedy one (1).
                vec![2, 5, 3, 2],
                vec![3, 4, LOGPROB_MAX_TOP as u32, 1],
            ]
            .concat()
        );
        assert_eq!(plan.answer_words(), 4 + 2 * LOGPROB_OUT_WORDS);

        // Greedy tokens 10 and 11, drawn 12 and none (the host's), then two answers.
        let sum = 12.5f64.to_bits();
        let mut answer = vec![10, 11, 12, ON_HOST];
        let mut lp = vec![0u32; 2 * LOGPROB_OUT_WORDS];
        lp[..7].copy_from_slice(&[f(3.0), f(2.0), (sum >> 32) as u32, sum as u32, 1, 7, f(3.0)]);
        lp[LOGPROB_OUT_WORDS] = f(-1.0);
        answer.extend(lp);
        let picks = plan.read(&answer).unwrap();
        let raw = RawLogprobs { max: 3.0, sum: 12.5, token_logit: 2.0, top: vec![(7, 3.0)] };
        assert_eq!(picks[0], Some(Pick { token: 12, logprobs: Some(raw) }));
        assert_eq!(picks[1], Some(Pick { token: 10, logprobs: None }));
        assert_eq!(picks[2], None, "left to the host");
        let last = picks[3].as_ref().unwrap();
        assert_eq!((last.token, last.logprobs.as_ref().unwrap().max), (11, -1.0));
        assert!(last.logprobs.as_ref().unwrap().top.is_empty());

        assert!(plan.read(&answer[1..]).is_err(), "a short answer");
        answer[4 + 4] = LOGPROB_MAX_TOP as u32 + 1;
        assert!(plan.read(&answer).is_err(), "more top logits than there are words for");
    }

    #[test]
    fn picks_that_do_not_fit_the_logits_are_errors() {
        let a = DeviceDraw {
            n_valid: 5,
            inv_temperature: 1.0,
            top_p: 1.0,
            draw: 1,
            penalties: vec![(1, 0.25)],
        };
        let draw = |row, d| PickRow { row, rule: PickRule::Draw(d), logprobs: None };
        assert!(PickPlan::new(&[draw(3, &a)], 3, 6).is_err(), "a row past the logits");
        assert!(PickPlan::new(&[draw(0, &a)], 3, 4).is_err(), "n_valid past the row");
        let far = DeviceDraw { penalties: vec![(6, 1.0)], ..a.clone() };
        assert!(PickPlan::new(&[draw(0, &far)], 3, 6).is_err(), "a penalty past the row");
        let big = DeviceDraw { draw: 1 << 53, ..a.clone() };
        assert!(PickPlan::new(&[draw(0, &big)], 3, 6).is_err(), "a draw of more than 53 bits");
        let greedy = PickRow { row: 0, rule: PickRule::Greedy { n_valid: 7 }, logprobs: None };
        assert!(PickPlan::new(&[greedy], 3, 6).is_err(), "a greedy prefix past the row");
        let empty = PickPlan::new(&[], 3, 6).unwrap();
        assert_eq!((empty.words.len(), empty.answer_words()), (0, 0));
    }
}
