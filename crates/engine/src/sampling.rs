//! Token sampling: turning one step's logits into the next token.
//!
//! This module implements the OpenAI sampling parameters (`temperature`, `top_p`,
//! `presence_penalty`, `frequency_penalty`, `logit_bias`, `seed`, `logprobs`, `top_logprobs`)
//! for a single sequence. The pipeline applied by [`Sampler::sample`] is:
//!
//! 1. reject NaN / `+inf` logits (an error, never a panic);
//! 2. compute the *raw* log-probabilities `log_softmax(logits)` used for reporting;
//! 3. presence/frequency penalties over the tokens generated so far ([`apply_penalties`]) and
//!    `logit_bias`, as one amount subtracted from each affected logit: the penalty minus the
//!    bias (so a bias alone is added exactly);
//! 4. suppressed token ids (e.g. padding rows of the embedding) are masked to `-inf`;
//! 5. `temperature < 1e-5` => greedy argmax (ties -> lowest id, like `torch.argmax`);
//!    otherwise softmax(logits / temperature), `top_p` nucleus filtering, and one
//!    draw from the renormalised distribution.
//!
//! ## Which log-probabilities are reported
//!
//! [`SampledToken::logprob`] and [`SampledToken::top_logprobs`] are taken from the
//! **raw model distribution**, `log_softmax(logits)` computed *before* penalties,
//! `logit_bias`, temperature and `top_p`. That is what vLLM returns by default and what the reference
//! (Hugging Face transformers) greedy log-probabilities are, so values can be compared
//! with both. The normalisation runs over the whole logits vector, suppressed ids
//! included, so that it matches the reference exactly; suppressed ids are however never
//! listed among the top alternatives, since they can never be emitted.
//!
//! ## Reproducibility
//!
//! With `seed: Some(s)` the sampler uses ChaCha20 ([`rand_chacha::ChaCha20Rng`]) keyed
//! with the little-endian bytes of `s`, and converts one `u64` per draw to a uniform
//! `f64` with its own code, so the same seed, parameters and logits give the same
//! tokens on every platform and across versions of `rand`. Greedy steps draw nothing.

use std::collections::{BTreeMap, HashMap};

use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::device_draw::{DeviceDraw, RawLogprobs};

/// Temperatures below this are treated as 0, i.e. greedy decoding, because dividing
/// logits by such a value is numerically meaningless and the OpenAI API defines
/// `temperature: 0` as (near-)deterministic output.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Largest `top_logprobs` the OpenAI API accepts; bounding it keeps the per-token cost
/// of reporting alternatives small and predictable.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Largest `logit_bias` magnitude the OpenAI API accepts: -100 bans a token in practice and
/// 100 makes it the only choice.
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Most token ids one request may bias: a bound on the per-step work and on the parameters a
/// device reads for the row (8 bytes an id), far above what classification-style uses need.
pub const MAX_LOGIT_BIAS_TOKENS: usize = 1024;

/// Relative slack when deciding whether the nucleus has reached `top_p`: a set whose
/// mass reaches `top_p` in exact arithmetic must not be widened by one more token
/// because of float rounding in `exp` and the cumulative sum.
const TOP_P_SLACK: f64 = 1e-6;

/// Errors from validating sampling parameters or from sampling itself.
///
/// Exists so that the server can map bad requests to a 400 naming the offending
/// parameter (OpenAI's error object has a `param` field), and so that malformed model
/// output (NaN logits) surfaces as an error instead of a panic or garbage tokens.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A request parameter is out of its allowed range.
    #[error("invalid value for `{param}`: {message}")]
    InvalidParameter {
        /// The OpenAI name of the parameter, e.g. `"temperature"`.
        param: &'static str,
        /// Human-readable description of the allowed range and the value received.
        message: String,
    },
    /// The logits vector was empty, so there is nothing to sample from.
    #[error("cannot sample from an empty logits vector")]
    EmptyLogits,
    /// A logit was NaN or `+inf`; the softmax is undefined, which means the forward
    /// pass produced garbage (overflow, bad weights) and must not be silently sampled.
    #[error("logit at index {index} is not usable ({value})")]
    NonFiniteLogit {
        /// Token id (index into the logits) of the first offending value.
        index: usize,
        /// The offending value, `NaN` or `inf`.
        value: f32,
    },
    /// Every token is masked (logit `-inf` or suppressed), so no token can be produced.
    #[error("no token can be sampled: every logit is -inf or suppressed")]
    NoSamplableToken,
}

impl SamplingError {
    /// The name of the offending request parameter, if the error is about one; lets the
    /// HTTP layer fill the `param` field of an OpenAI-style error response.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            SamplingError::InvalidParameter { param, .. } => Some(param),
            _ => None,
        }
    }
}

/// Result type of this module.
pub type Result<T, E = SamplingError> = std::result::Result<T, E>;

/// The OpenAI sampling parameters for one sequence.
///
/// Exists as a plain, serde-friendly struct so that it can be deserialised straight out
/// of a chat-completions request (`#[serde(flatten)]`), and be validated once before any
/// work is scheduled. Missing fields and explicit `null`s take the OpenAI defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, `0..=2`; `0` (anything below [`GREEDY_TEMPERATURE`]) means
    /// greedy decoding. Default `1.0`.
    #[serde(deserialize_with = "null_as_one")]
    pub temperature: f32,
    /// Nucleus mass, in `(0, 1]`; `1.0` keeps every token. Default `1.0`.
    #[serde(deserialize_with = "null_as_one")]
    pub top_p: f32,
    /// Subtracted once from the logit of every token already generated, `-2..=2`.
    /// Default `0`.
    #[serde(deserialize_with = "null_as_zero")]
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per previous occurrence, `-2..=2`.
    /// Default `0`.
    #[serde(deserialize_with = "null_as_zero")]
    pub frequency_penalty: f32,
    /// Seed for reproducible sampling; `None` seeds from OS entropy. `i64` because the
    /// OpenAI API defines `seed` over the signed 64-bit range.
    pub seed: Option<i64>,
    /// Whether to return log-probabilities of the sampled tokens. Default `false`.
    #[serde(deserialize_with = "null_as_false")]
    pub logprobs: bool,
    /// How many most likely alternatives to report per position, `0..=20`; requires
    /// `logprobs: true` (as in the OpenAI API and vLLM). Default `None`.
    pub top_logprobs: Option<usize>,
    /// OpenAI's `logit_bias`: token id -> amount added to its logit before sampling,
    /// `-100..=100`, at most [`MAX_LOGIT_BIAS_TOKENS`] ids (in JSON an object keyed by the ids
    /// as strings, as the API sends it). Default empty.
    #[serde(deserialize_with = "null_as_empty")]
    pub logit_bias: BTreeMap<u32, f32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: false,
            top_logprobs: None,
            logit_bias: BTreeMap::new(),
        }
    }
}

fn null_as_one<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(1.0))
}

fn null_as_zero<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(0.0))
}

fn null_as_empty<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<u32, f32>, D::Error> {
    Ok(Option::<BTreeMap<u32, f32>>::deserialize(d)?.unwrap_or_default())
}

fn null_as_false<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn check_range(param: &'static str, value: f32, lo: f32, hi: f32) -> Result<()> {
    // Written so that NaN fails the check.
    if value >= lo && value <= hi {
        Ok(())
    } else {
        Err(SamplingError::InvalidParameter {
            param,
            message: format!("must be between {lo} and {hi}, got {value}"),
        })
    }
}

impl SamplingParams {
    /// Checks every parameter against the OpenAI ranges; the error names the first
    /// offending parameter. Called by [`Sampler::new`], and usable on its own to reject
    /// a request before it is queued.
    pub fn validate(&self) -> Result<()> {
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::InvalidParameter {
                param: "top_p",
                message: format!("must be greater than 0 and at most 1, got {}", self.top_p),
            });
        }
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if self.logit_bias.len() > MAX_LOGIT_BIAS_TOKENS {
            return Err(SamplingError::InvalidParameter {
                param: "logit_bias",
                message: format!(
                    "at most {MAX_LOGIT_BIAS_TOKENS} token ids may be biased, got {}",
                    self.logit_bias.len()
                ),
            });
        }
        for (&id, &bias) in &self.logit_bias {
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
                return Err(SamplingError::InvalidParameter {
                    param: "logit_bias",
                    message: format!(
                        "the bias of token {id} must be between -{MAX_LOGIT_BIAS} and \
                         {MAX_LOGIT_BIAS}, got {bias}"
                    ),
                });
            }
        }
        if let Some(k) = self.top_logprobs {
            if k > MAX_TOP_LOGPROBS {
                return Err(SamplingError::InvalidParameter {
                    param: "top_logprobs",
                    message: format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                });
            }
            if !self.logprobs {
                return Err(SamplingError::InvalidParameter {
                    param: "top_logprobs",
                    message: "requires `logprobs` to be true".to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks that every `logit_bias` id is one of the model's `vocab` ids: the one check that
    /// needs the model, so the request still fails before it is queued.
    pub fn validate_vocab(&self, vocab: usize) -> Result<()> {
        match self.logit_bias.keys().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(SamplingError::InvalidParameter {
                param: "logit_bias",
                message: format!("token id {id} is outside the vocabulary of {vocab} ids"),
            }),
            None => Ok(()),
        }
    }

    /// Whether these parameters select greedy decoding (temperature below
    /// [`GREEDY_TEMPERATURE`]); lets callers skip work that only matters for sampling.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// Number of alternatives to report per token: `top_logprobs` when `logprobs` is on,
    /// otherwise 0.
    fn requested_top_logprobs(&self) -> usize {
        if self.logprobs {
            self.top_logprobs.unwrap_or(0).min(MAX_TOP_LOGPROBS)
        } else {
            0
        }
    }
}

/// The outcome of one sampling step.
///
/// Bundles the chosen token with the log-probabilities the OpenAI `logprobs` response
/// needs, so that the caller never has to recompute a softmax.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The chosen token id.
    pub token: u32,
    /// `log_softmax(logits)[token]` of the raw model distribution (before penalties,
    /// temperature and `top_p`; see the module docs), finite; `None` unless `logprobs` is on
    /// (computing it costs a pass of exponentials over the vocabulary).
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens of the raw distribution as
    /// `(token, logprob)`, sorted by descending logprob, ties by lower id. Empty unless
    /// `logprobs` is on and `top_logprobs > 0`. Suppressed ids and tokens with logit
    /// `-inf` are never listed, so it may be shorter than requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Applies OpenAI's presence and frequency penalties in place:
/// `logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`,
/// where `count[j]` is the number of times `j` occurs in `generated`.
///
/// Public so the penalty arithmetic can be tested (and reused) on its own. Ids in
/// `generated` that are outside `logits` are ignored (they have no logit to penalise);
/// `-inf` logits stay `-inf`.
pub fn apply_penalties(
    logits: &mut [f32],
    generated: &[u32],
    presence_penalty: f32,
    frequency_penalty: f32,
) {
    for (t, amount) in penalty_amounts(generated, presence_penalty, frequency_penalty) {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= amount;
        }
    }
}

/// Per distinct id of `generated`, the amount its presence and frequency penalties subtract
/// from its logit (nothing when both penalties are 0), in no particular order.
fn penalty_amounts(
    generated: &[u32],
    presence_penalty: f32,
    frequency_penalty: f32,
) -> impl Iterator<Item = (u32, f32)> {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    if presence_penalty != 0.0 || frequency_penalty != 0.0 {
        for &t in generated {
            *counts.entry(t).or_insert(0) += 1;
        }
    }
    counts.into_iter().map(move |(t, c)| (t, c as f32 * frequency_penalty + presence_penalty))
}

/// Per-sequence sampler: owns the parameters, the RNG stream and reusable buffers.
///
/// Exists as a stateful object (rather than a free function) because a seeded request
/// must consume one RNG stream across all its steps to be reproducible, and because
/// reusing the scratch buffers avoids allocating vocabulary-sized vectors per token.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    /// Sorted, deduplicated ids that may never be sampled.
    suppressed: Vec<u32>,
    /// Penalised / biased / masked logits of the current step.
    scratch: Vec<f32>,
    /// The current step's `(id, amount subtracted)` pairs ([`Sampler::adjustments`]).
    adjusted: Vec<(u32, f32)>,
    /// Unnormalised probabilities of the current step.
    probs: Vec<f32>,
    /// Candidate ids for the nucleus selection.
    order: Vec<u32>,
    /// The current step's draw, taken from the RNG ahead of sampling by
    /// [`Sampler::device_draw`]; whichever of the device and [`Sampler::sample`] then picks the
    /// token uses it, so a sampled step takes one draw from the RNG either way.
    pending_draw: Option<u64>,
}

impl Sampler {
    /// Validates `params` and creates a sampler whose RNG is seeded from `params.seed`
    /// (ChaCha20 keyed with the seed's little-endian bytes) or, without a seed, from
    /// OS entropy.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let mut key = [0u8; 32];
        match params.seed {
            Some(seed) => key[..8].copy_from_slice(&seed.to_le_bytes()),
            None => rand::rng().fill_bytes(&mut key),
        }
        Ok(Sampler {
            params,
            rng: ChaCha20Rng::from_seed(key),
            suppressed: Vec::new(),
            scratch: Vec::new(),
            adjusted: Vec::new(),
            probs: Vec::new(),
            order: Vec::new(),
            pending_draw: None,
        })
    }

    /// Marks token ids that must never be sampled, e.g. the padding rows of Phi-3's
    /// embedding (ids 32011..32064 have no token in the tokenizer). They are masked
    /// after the penalties, for greedy and sampled decoding alike, and never listed in
    /// `top_logprobs`. Ids beyond the logits length are ignored.
    pub fn with_suppressed_tokens(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        self.suppressed.extend(ids);
        self.suppressed.sort_unstable();
        self.suppressed.dedup();
        self
    }

    /// The validated parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Where this sampler's choice over a `vocab`-wide logits row is nothing but the argmax of
    /// the row's first `n` raw logits (greedy, no penalties, and the suppressed ids among the
    /// row's exactly the ids from `n` on), that `n`; its logprobs, where it reports them, come
    /// from [`RawLogprobs`]. Such a row can be decided where
    /// the logits are (a GPU argmax, `cuda_sampling`) and only the token read back: see
    /// [`Sampler::take_picked`]. The device's pick must follow [`Sampler::sample`]'s rules
    /// (ties to the lowest id, `-inf` never chosen) and leave rows `sample` would reject with an
    /// error to `sample`.
    pub fn greedy_prefix(&self, vocab: usize) -> Option<usize> {
        let p = &self.params;
        if !p.is_greedy()
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || !p.logit_bias.is_empty()
        {
            return None;
        }
        self.suppressed_tail(vocab)
    }

    /// Where the suppressed ids among a `vocab`-wide row are exactly the ids from some `n` on,
    /// that `n` (`vocab` when none are).
    fn suppressed_tail(&self, vocab: usize) -> Option<usize> {
        // `suppressed` is sorted and deduplicated: the ids below `vocab` are a prefix of it.
        let inside = self.suppressed.partition_point(|&id| (id as usize) < vocab);
        let Some(&first) = self.suppressed[..inside].first() else { return Some(vocab) };
        // A tail `first..vocab` exactly when there are as many ids as that range holds.
        (inside == vocab - first as usize).then_some(first as usize)
    }

    /// For a step over a `vocab`-wide row whose suppressed ids are a tail of the row, what a
    /// device needs to pick the token itself (`cuda_sampling`), `generated` being the tokens so
    /// far as [`Sampler::sample`] takes them: a sampled step's, or a greedy step's with its
    /// penalties (without them, [`Sampler::greedy_prefix`] is the cheaper way). A sampled step's
    /// draw is taken from the RNG now; the device's token is then read with
    /// [`Sampler::take_picked`], or, where the device leaves the row to the host,
    /// [`Sampler::sample`] uses the same draw.
    pub fn device_draw(&mut self, vocab: usize, generated: &[u32]) -> Option<DeviceDraw> {
        let p = &self.params;
        if vocab == 0 {
            return None;
        }
        let n_valid = self.suppressed_tail(vocab)?;
        let mut penalties = Vec::new();
        // The amounts exactly as `sample` subtracts them.
        adjustments(p, generated, vocab, &mut penalties);
        if p.is_greedy() {
            // Greedy steps draw nothing.
            return Some(DeviceDraw {
                n_valid,
                inv_temperature: 0.0,
                top_p: 1.0,
                draw: 0,
                penalties,
            });
        }
        let (inv_temperature, top_p) = (1.0 / p.temperature, p.top_p);
        let draw = *self.pending_draw.get_or_insert_with(|| draw_bits(&mut self.rng));
        Some(DeviceDraw { n_valid, inv_temperature, top_p, draw, penalties })
    }

    /// How many top log-probabilities a step lists when it reports log-probabilities at all
    /// (`None` when it does not): what a device computes for [`Sampler::take_picked`].
    pub fn logprobs_wanted(&self) -> Option<usize> {
        self.params.logprobs.then(|| self.params.requested_top_logprobs())
    }

    /// The outcome of a step whose `token` was picked on the device, for a row
    /// [`Sampler::greedy_prefix`] or [`Sampler::device_draw`] accepted, `raw` the row's
    /// [`RawLogprobs`] where [`Sampler::logprobs_wanted`] asks for them: what
    /// [`Sampler::sample`] would have returned. A greedy step draws nothing from the RNG; a
    /// sampled one used the draw `device_draw` took.
    pub fn take_picked(&mut self, token: u32, raw: Option<&RawLogprobs>) -> SampledToken {
        self.pending_draw = None;
        let (Some(k), Some(raw)) = (self.logprobs_wanted(), raw) else {
            debug_assert!(!self.params.logprobs, "log-probabilities asked for, none given");
            return SampledToken { token, logprob: None, top_logprobs: Vec::new() };
        };
        let lse = log_normaliser(raw.max, raw.sum);
        SampledToken {
            token,
            logprob: Some(raw_logprob(raw.token_logit, lse)),
            top_logprobs: raw
                .top
                .iter()
                .take(k)
                .map(|&(id, l)| (id, raw_logprob(l, lse)))
                .collect(),
        }
    }

    /// The log-probability of `token` given `logits`, a token that was not sampled (a prompt
    /// token being scored), under the same raw distribution as a sampled token's, with the
    /// alternatives [`Sampler::logprobs_wanted`] asks for (none without `logprobs`). Takes
    /// `&self` and draws nothing, so that the rows of a long prompt can be scored in parallel.
    pub fn score(&self, logits: &[f32], token: u32) -> Result<SampledToken> {
        let Some(&logit) = logits.get(token as usize) else {
            return Err(SamplingError::InvalidParameter {
                param: "prompt",
                message: format!("token id {token} is outside the vocabulary"),
            });
        };
        if let Some((index, &value)) =
            logits.iter().enumerate().find(|(_, v)| v.is_nan() || **v == f32::INFINITY)
        {
            return Err(SamplingError::NonFiniteLogit { index, value });
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoSamplableToken);
        }
        let lse = log_sum_exp(logits, max, &mut Vec::new());
        let top = top_k(logits, self.params.requested_top_logprobs(), &self.suppressed);
        Ok(SampledToken {
            token,
            logprob: Some(raw_logprob(logit, lse)),
            top_logprobs: top.into_iter().map(|(id, l)| (id, raw_logprob(l, lse))).collect(),
        })
    }

    /// Picks the next token from one step's `logits` (one value per vocabulary id),
    /// given the tokens `generated` so far for this sequence (used for the penalties;
    /// the prompt is not counted, as in the OpenAI API).
    ///
    /// Errors (never panics) on empty logits, NaN or `+inf` logits, and when every token
    /// is `-inf` or suppressed.
    pub fn sample(&mut self, logits: &[f32], generated: &[u32]) -> Result<SampledToken> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        if let Some((index, &value)) =
            logits.iter().enumerate().find(|(_, v)| v.is_nan() || **v == f32::INFINITY)
        {
            return Err(SamplingError::NonFiniteLogit { index, value });
        }

        let raw_max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if raw_max == f32::NEG_INFINITY {
            return Err(SamplingError::NoSamplableToken);
        }

        // Penalties, bias and suppression on a scratch copy.
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        adjustments(&self.params, generated, logits.len(), &mut self.adjusted);
        for &(id, amount) in &self.adjusted {
            self.scratch[id as usize] -= amount;
        }
        for &id in &self.suppressed {
            if let Some(l) = self.scratch.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }

        let token = if self.params.is_greedy() {
            argmax(&self.scratch).ok_or(SamplingError::NoSamplableToken)?
        } else {
            self.sample_stochastic()?
        };

        if !self.params.logprobs {
            // The raw log-normaliser is a pass of exponentials over the vocabulary: only worth
            // it when asked for.
            return Ok(SampledToken { token, logprob: None, top_logprobs: Vec::new() });
        }
        // Raw log-normaliser, accumulated in f64.
        let raw_lse = log_sum_exp(logits, raw_max, &mut self.probs);
        let logprob = Some(raw_logprob(logits[token as usize], raw_lse));
        let k = self.params.requested_top_logprobs();
        let top_logprobs = if k > 0 {
            top_k(logits, k, &self.suppressed)
                .into_iter()
                .map(|(id, l)| (id, raw_logprob(l, raw_lse)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(SampledToken { token, logprob, top_logprobs })
    }

    /// Temperature + top_p + one draw, on `self.scratch`.
    fn sample_stochastic(&mut self) -> Result<u32> {
        let max = self.scratch.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoSamplableToken);
        }
        let total = scaled_exps(&self.scratch, max, 1.0 / self.params.temperature, &mut self.probs);
        let u = unit(self.pending_draw.take().unwrap_or_else(|| draw_bits(&mut self.rng)));

        if self.params.top_p >= 1.0 {
            return Ok(draw(self.probs.iter().map(|&p| f64::from(p)).enumerate(), u * total));
        }

        // Nucleus: the smallest set of most likely tokens whose mass reaches top_p. Only the
        // tokens at least as likely as the floor `nucleus_floor` finds can be in it (those
        // already reach the mass), usually a few dozen of the vocabulary; among them it is found
        // by partial selection, so the vocabulary is never sorted.
        let probs = &self.probs;
        let threshold = f64::from(self.params.top_p) * total * (1.0 - TOP_P_SLACK);
        let mut nucleus = None;
        // Then every token, should the floor's sums and the sorted ones round apart.
        for floor in [nucleus_floor(probs, threshold), 0] {
            self.order.clear();
            self.order.extend(
                (0..probs.len() as u32)
                    .filter(|&i| probs[i as usize] > 0.0 && exponent(probs[i as usize]) >= floor),
            );
            nucleus = nucleus_len(&mut self.order, probs, threshold);
            if nucleus.is_some() || floor == 0 {
                break;
            }
        }
        let nucleus_len = nucleus.unwrap_or(self.order.len());
        let kept = &self.order[..nucleus_len];
        let kept_total: f64 = kept.iter().map(|&id| f64::from(probs[id as usize])).sum();
        Ok(draw(
            kept.iter().map(|&id| (id as usize, f64::from(probs[id as usize]))),
            u * kept_total,
        ))
    }
}

/// Into `out`, sorted by id, each id once, inside a `vocab`-wide row: the amount subtracted
/// from a logit before suppression, temperature and `top_p`, its presence and frequency
/// penalties over `generated` ([`apply_penalties`]' amounts) minus its `logit_bias`. A bias
/// alone is its negation, so that the logit gains exactly the bias; one subtraction a logit,
/// the same on the host ([`Sampler::sample`]) and on a device ([`DeviceDraw::penalties`]).
fn adjustments(p: &SamplingParams, generated: &[u32], vocab: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    let penalties = penalty_amounts(generated, p.presence_penalty, p.frequency_penalty);
    out.extend(penalties.filter(|&(t, _)| (t as usize) < vocab));
    out.sort_unstable_by_key(|&(t, _)| t);
    if p.logit_bias.is_empty() {
        return;
    }
    let n_penalties = out.len();
    for (&id, &bias) in p.logit_bias.range(..vocab.min(u32::MAX as usize) as u32) {
        match out[..n_penalties].binary_search_by_key(&id, |&(t, _)| t) {
            Ok(at) => out[at].1 -= bias,
            Err(_) => out.push((id, -bias)),
        }
    }
    out.sort_unstable_by_key(|&(t, _)| t);
}

/// The length of the nucleus among `order` (ids into `probs`): the fewest most likely of them
/// (ties to the lower id) whose mass reaches `threshold`, which `order` then starts with, sorted;
/// `None` if all of them together fall short. Partial selection with a growing k.
fn nucleus_len(order: &mut [u32], probs: &[f32], threshold: f64) -> Option<usize> {
    let n = order.len();
    let by_prob_desc =
        |a: &u32, b: &u32| probs[*b as usize].total_cmp(&probs[*a as usize]).then(a.cmp(b));
    let mut k = n.min(64);
    loop {
        if k < n {
            order.select_nth_unstable_by(k - 1, by_prob_desc);
        }
        order[..k].sort_unstable_by(by_prob_desc);
        let mut cum = 0.0;
        for (i, &id) in order[..k].iter().enumerate() {
            cum += f64::from(probs[id as usize]);
            if cum >= threshold {
                return Some(i + 1);
            }
        }
        if k == n {
            return None;
        }
        k = n.min(k.saturating_mul(4));
    }
}

/// The binary exponent field of a probability (non-negative, so the sign bit is clear): a
/// bucket of values within a factor of two, ordered as the values are.
fn exponent(p: f32) -> u32 {
    p.to_bits() >> 23
}

/// The highest exponent bucket such that the tokens in it and above hold at least `threshold`
/// of the mass (with a margin over the sums' rounding), 0 if none: every token of the nucleus
/// is in or above it, since those tokens alone, taken most likely first, already reach the
/// threshold before any token below the bucket comes up. One pass, no sort.
fn nucleus_floor(probs: &[f32], threshold: f64) -> u32 {
    let mut mass = [0f64; 256];
    for &p in probs {
        mass[exponent(p) as usize & 255] += f64::from(p);
    }
    let wanted = threshold * (1.0 + 1e-9);
    let mut cum = 0.0;
    for bucket in (1..256).rev() {
        cum += mass[bucket];
        if cum >= wanted {
            return bucket as u32;
        }
    }
    0
}

/// `out[i] = exp((xs[i] - max) * inv_t)` (`max` the largest of `xs`, so every exponent is at
/// most 0 and nothing overflows however small the temperature; `-inf` gives 0), and their sum in
/// f64. In f32 with [`exp_nonpositive`], written so that the compiler vectorises it: the f64
/// exponentials this replaced were about half of a top_p row's sampling time.
fn scaled_exps(xs: &[f32], max: f32, inv_t: f32, out: &mut Vec<f32>) -> f64 {
    out.clear();
    out.extend(xs.iter().map(|&x| exp_nonpositive((x - max) * inv_t)));
    sum_f64(out)
}

/// The sum of `xs` in f64, in eight running sums so that the additions do not wait on one
/// another.
fn sum_f64(xs: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&x| f64::from(x)).sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(x);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// `e^x` for `x <= 0` in f32, within 2 ulp of the exact value, 0 below about -87.3 (where
/// `e^x` leaves f32's normal range) and for `-inf`; exactly 1 at 0. Branch-free and the same
/// bits on every platform (no libm, no FMA), so that a seeded draw does not depend on where it
/// runs: `x = n ln2 + r` with `|r| <= ln2 / 2`, `e^r` by a degree-6 polynomial, times `2^n`
/// built in the exponent bits.
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: the first exact in few bits, so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LOWEST: f32 = -87.336_55;
    let clamped = x.max(LOWEST);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // Taylor-like coefficients fitted for |r| <= ln2 / 2 (those of Cephes' expf).
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n in [-126, 0]: 2^n is the biased exponent n + 127 alone.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < LOWEST {
        0.0
    } else {
        e_r * two_n
    }
}

/// `log(sum(exp(x)))` over `xs` given their maximum (finite): the exponentials in f32
/// ([`exp_nonpositive`], within 2 ulp, stored in `scratch` first, which the compiler vectorises
/// where it does not for a running sum), accumulated in f64, which keeps a log-probability
/// within about 1e-7 of the f64 computation.
fn log_sum_exp(xs: &[f32], max: f32, scratch: &mut Vec<f32>) -> f64 {
    log_normaliser(max, scaled_exps(xs, max, 1.0, scratch))
}

/// `log(sum(exp(x)))` from the largest `x` and the sum of `exp(x - max)`.
fn log_normaliser(max: f32, sum: f64) -> f64 {
    f64::from(max) + sum.ln()
}

/// `log_softmax` of one raw logit given the log-normaliser.
fn raw_logprob(logit: f32, lse: f64) -> f32 {
    (f64::from(logit) - lse) as f32
}

/// Index of the largest value, ties -> lowest index; `None` if all are `-inf`.
fn argmax(xs: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in xs.iter().enumerate() {
        if x == f32::NEG_INFINITY {
            continue;
        }
        match best {
            Some((_, b)) if x <= b => {}
            _ => best = Some((i, x)),
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Inverse-CDF draw: the first candidate whose cumulative weight exceeds `target`
/// (`target` in `[0, total)`); falls back to the last positive-weight candidate when
/// rounding leaves `target` just above the accumulated sum.
fn draw(candidates: impl Iterator<Item = (usize, f64)>, target: f64) -> u32 {
    let mut cum = 0.0;
    let mut last = 0;
    for (id, p) in candidates {
        if p <= 0.0 {
            continue;
        }
        cum += p;
        last = id;
        if cum > target {
            return id as u32;
        }
    }
    last as u32
}

/// One draw: the top 53 bits of one `u64`, for [`unit`]. Independent of `rand`'s distribution
/// code so that seeded streams stay stable across `rand` versions.
fn draw_bits(rng: &mut ChaCha20Rng) -> u64 {
    rng.next_u64() >> 11
}

/// A draw of [`draw_bits`] as a uniform in `[0, 1)` (exactly, 53 bits).
fn unit(draw: u64) -> f64 {
    draw as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The `k` largest finite logits that are not suppressed, as `(id, logit)` sorted by
/// descending logit, ties by lower id. O(V * k) worst case with k <= 20, and no
/// vocabulary-sized allocation or sort.
fn top_k(logits: &[f32], k: usize, suppressed: &[u32]) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    // `best` is kept sorted: descending logit, ascending id.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if l == f32::NEG_INFINITY {
            continue;
        }
        // Ids arrive in increasing order, so a candidate equal to the current worst
        // loses the tie and can be skipped.
        if best.len() == k && l <= best[k - 1].1 {
            continue;
        }
        let id = i as u32;
        if suppressed.binary_search(&id).is_ok() {
            continue;
        }
        let pos = best.partition_point(|&(_, b)| b >= l);
        best.insert(pos, (id, l));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_id() {
        let logits = [1.0, 3.0, 3.0, f32::NEG_INFINITY, 2.0, 3.0];
        assert_eq!(top_k(&logits, 3, &[]), vec![(1, 3.0), (2, 3.0), (5, 3.0)]);
        assert_eq!(top_k(&logits, 4, &[2]), vec![(1, 3.0), (5, 3.0), (4, 2.0), (0, 1.0)]);
        // -inf is never listed even if fewer than k remain.
        assert_eq!(top_k(&logits, 10, &[]).len(), 5);
        assert!(top_k(&logits, 0, &[]).is_empty());
    }

    #[test]
    fn greedy_prefix_only_for_a_plain_argmax_over_a_prefix() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let sampler = |p: &SamplingParams, ids: &[u32]| {
            Sampler::new(p.clone()).unwrap().with_suppressed_tokens(ids.iter().copied())
        };
        assert_eq!(sampler(&greedy, &[]).greedy_prefix(10), Some(10));
        assert_eq!(sampler(&greedy, &[9, 8, 7]).greedy_prefix(10), Some(7));
        // Ids past the row do not matter; a gap, or a suppressed id inside, does.
        assert_eq!(sampler(&greedy, &[7, 8, 9, 12]).greedy_prefix(10), Some(7));
        assert_eq!(sampler(&greedy, &[12]).greedy_prefix(10), Some(10));
        assert_eq!(sampler(&greedy, &[7, 9]).greedy_prefix(10), None);
        assert_eq!(sampler(&greedy, &[3, 8, 9]).greedy_prefix(10), None);
        assert_eq!(sampler(&greedy, &[0, 1, 2]).greedy_prefix(3), Some(0));
        for other in [
            SamplingParams { temperature: 0.7, ..greedy.clone() },
            SamplingParams { presence_penalty: 0.5, ..greedy.clone() },
            SamplingParams { frequency_penalty: -0.5, ..greedy.clone() },
        ] {
            assert_eq!(sampler(&other, &[]).greedy_prefix(10), None, "{other:?}");
        }
        // What the host picks is what a device argmax over the prefix picks.
        let mut s = sampler(&greedy, &[3, 4]);
        let n = s.greedy_prefix(5).unwrap();
        let row = [1.0, 5.0, 5.0, 9.0, 9.0];
        let host = s.sample(&row, &[]).unwrap();
        assert_eq!(host, s.take_picked(argmax(&row[..n]).unwrap(), None));
        // With logprobs, what the device computes for the row gives the host's answer.
        let with = SamplingParams { logprobs: true, top_logprobs: Some(3), ..greedy.clone() };
        let mut s = sampler(&with, &[3, 4]);
        assert_eq!((s.greedy_prefix(5), s.logprobs_wanted()), (Some(3), Some(3)));
        let host = s.sample(&row, &[]).unwrap();
        let raw = RawLogprobs {
            max: 9.0,
            sum: row.iter().map(|&x| f64::from(exp_nonpositive(x - 9.0))).sum(),
            token_logit: 5.0,
            top: vec![(1, 5.0), (2, 5.0), (0, 1.0)],
        };
        let picked = s.take_picked(1, Some(&raw));
        assert_eq!((picked.token, &picked.top_logprobs), (host.token, &host.top_logprobs));
        assert!((picked.logprob.unwrap() - host.logprob.unwrap()).abs() < 1e-6);
    }

    #[test]
    fn device_draws_only_for_plain_sampled_rows_and_share_the_draw() {
        let sampled =
            SamplingParams { temperature: 0.5, top_p: 0.9, seed: Some(4), ..Default::default() };
        let sampler = |p: &SamplingParams, ids: &[u32]| {
            Sampler::new(p.clone()).unwrap().with_suppressed_tokens(ids.iter().copied())
        };
        let d = sampler(&sampled, &[8, 9]).device_draw(10, &[]).unwrap();
        assert_eq!((d.n_valid, d.inv_temperature, d.top_p), (8, 2.0, 0.9));
        assert!(d.penalties.is_empty() && d.draw < 1 << 53);
        assert_eq!(sampler(&sampled, &[3, 9]).device_draw(10, &[]), None);
        // Greedy: no draw taken, a temperature of 0 for the kernel.
        let greedy = SamplingParams { temperature: 0.0, ..sampled.clone() };
        let (mut g, mut fresh) = (sampler(&greedy, &[]), sampler(&greedy, &[]));
        let d = g.device_draw(10, &[]).unwrap();
        assert_eq!((d.inv_temperature, d.draw), (0.0, 0));
        assert_eq!(g.rng.next_u64(), fresh.rng.next_u64(), "a greedy step draws nothing");
        // The penalties as `apply_penalties` subtracts them, ids past the row left out.
        let penalised =
            SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..sampled.clone() };
        let d = sampler(&penalised, &[]).device_draw(10, &[7, 2, 7, 12]).unwrap();
        assert_eq!(d.penalties, vec![(2, 0.75), (7, 1.0)]);
        let mut row = [0.0f32; 10];
        apply_penalties(&mut row, &[7, 2, 7, 12], 0.5, 0.25);
        assert_eq!((row[2], row[7]), (-0.75, -1.0));

        // One draw a step whichever side samples: a step left to the host uses the draw taken
        // for the device, so the stream is the one of a sampler that never offered it.
        let row: Vec<f32> = (0..10).map(|i| (i as f32 * 0.37).sin()).collect();
        let (mut plain, mut offered) = (sampler(&sampled, &[]), sampler(&sampled, &[]));
        for step in 0..50 {
            let want = plain.sample(&row, &[]).unwrap();
            let d = offered.device_draw(10, &[]).unwrap();
            assert_eq!(d, offered.device_draw(10, &[]).unwrap(), "asking twice draws once");
            let got = if step % 2 == 0 {
                offered.sample(&row, &[]).unwrap()
            } else {
                // What a device picks with this draw is what the host picks with it.
                let token = offered.clone().sample(&row, &[]).unwrap().token;
                offered.take_picked(token, None)
            };
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn exp_nonpositive_is_within_two_ulp() {
        let ulp = |y: f64| {
            let y = y as f32;
            f64::from(f32::from_bits(y.to_bits() + 1) - y)
        };
        let mut worst = 0f64;
        // Every 2^-12 from -87.33 to 0, and the range's ends.
        let xs = (0..=357_700).map(|i| -(i as f32) / 4096.0).chain([-87.336_55, -1e-30, -0.0]);
        for x in xs {
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max((got - want).abs() / ulp(want));
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(-1e30), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn scaled_exps_sum_what_they_write() {
        let xs: Vec<f32> = (0..1001).map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0).collect();
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut out = Vec::new();
        let total = scaled_exps(&xs, max, 1.0 / 0.7, &mut out);
        assert_eq!(out.len(), xs.len());
        let direct: f64 = out.iter().map(|&p| f64::from(p)).sum();
        assert!((total - direct).abs() <= 1e-12 * direct, "{total} vs {direct}");
        let exact: f64 = xs.iter().map(|&x| ((f64::from(x) - f64::from(max)) / 0.7).exp()).sum();
        assert!((total - exact).abs() <= 1e-6 * exact, "{total} vs {exact}");
    }

    #[test]
    fn the_nucleus_floor_never_changes_the_nucleus() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for case in 0..300 {
            // Peaked, flat, and tied rows, with exact zeros among them.
            let n = 1 + (next() * 3000.0) as usize;
            let spread = [0.1, 3.0, 30.0][case % 3];
            let probs: Vec<f32> = (0..n)
                .map(|_| match (next() * 10.0) as u32 {
                    0 => 0.0,
                    1 => 0.25,
                    _ => (-(next() * spread)).exp() as f32,
                })
                .collect();
            let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
            let threshold = next() * total;
            let nucleus = |floor: u32| {
                let mut order: Vec<u32> = (0..n as u32)
                    .filter(|&i| probs[i as usize] > 0.0 && exponent(probs[i as usize]) >= floor)
                    .collect();
                nucleus_len(&mut order, &probs, threshold).map(|len| order[..len].to_vec())
            };
            let floor = nucleus_floor(&probs, threshold);
            let all = nucleus(0);
            assert!(all.is_some(), "case {case}: the whole row reaches a threshold below its mass");
            assert_eq!(nucleus(floor), all, "case {case}: floor {floor}");
        }
    }

    #[test]
    fn log_sum_exp_tracks_f64() {
        let xs: Vec<f32> = (0..32064)
            .map(|i| {
                if i % 97 == 0 {
                    f32::NEG_INFINITY
                } else {
                    ((i * 7919) % 4001) as f32 / 100.0 - 20.0
                }
            })
            .collect();
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exact = f64::from(max)
            + xs.iter().map(|&x| (f64::from(x) - f64::from(max)).exp()).sum::<f64>().ln();
        let got = log_sum_exp(&xs, max, &mut Vec::new());
        assert!((got - exact).abs() < 1e-6, "{got} vs {exact}");
        assert_eq!(log_sum_exp(&[3.0], 3.0, &mut Vec::new()), 3.0);
    }

    #[test]
    fn argmax_ties_lowest_and_skips_neg_inf() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), None);
    }

    #[test]
    fn uniform_is_in_unit_interval() {
        let mut rng = ChaCha20Rng::from_seed([7; 32]);
        for _ in 0..10_000 {
            let u = unit(draw_bits(&mut rng));
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn nucleus_growth_past_initial_k() {
        // 1000 equiprobable tokens with top_p 0.5 needs 500 tokens: more than the
        // initial partial-selection size, exercising the growth path.
        let logits = vec![0.0f32; 1000];
        let mut s =
            Sampler::new(SamplingParams { top_p: 0.5, seed: Some(3), ..Default::default() })
                .unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let t = s.sample(&logits, &[]).unwrap().token;
            assert!(t < 500, "token {t} outside the nucleus (ties keep lower ids)");
            seen.insert(t);
        }
        assert_eq!(seen.len(), 500);
    }
}
