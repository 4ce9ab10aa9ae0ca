//! Rotary position embedding as Phi-3 uses it: rotate-half (NeoX) pairs `(i, i + d/2)` over the
//! first `rotary_dim` dimensions of each head, with LongRoPE's short and long factor sets.
//!
//! cos/sin are computed per token from its absolute position, so one forward pass can mix
//! sequences at different positions (and, for LongRoPE, sequences using different factor sets).

use candle_core::{DType, Device, Tensor};

use crate::config::{Phi3Config, RopeScaling};
use crate::error::Result;

/// Which LongRoPE factor set a sequence's keys were encoded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeFactors {
    /// Short factors (or no scaling at all for models without LongRoPE).
    Short,
    /// Long factors.
    Long,
}

/// When a LongRoPE model uses its long factors.
///
/// `Dynamic` (the default) is what Hugging Face transformers does: a sequence uses the short
/// factors while its total length is at most `original_max_position_embeddings`; the step that
/// takes it past that length re-encodes the whole sequence with the long factors (the cache built
/// with short factors would no longer be consistent), so outputs match the reference exactly at
/// the price of one prefill-sized step per crossing sequence. `AlwaysLong` is what vLLM does when
/// the configured context is longer than the original one: long factors for every position, no
/// re-encoding, but outputs on short prompts then differ from the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongRopePolicy {
    /// Short factors up to the original context, re-encode with long factors on crossing.
    #[default]
    Dynamic,
    /// Long factors always.
    AlwaysLong,
}

impl LongRopePolicy {
    /// Factors for a sequence that will have `total_len` tokens after this step.
    pub fn factors_for(&self, cfg: &Phi3Config, total_len: usize) -> RopeFactors {
        match (&cfg.rope_scaling, self) {
            (RopeScaling::None, _) => RopeFactors::Short,
            (RopeScaling::LongRope { .. }, LongRopePolicy::AlwaysLong) => RopeFactors::Long,
            (RopeScaling::LongRope { .. }, LongRopePolicy::Dynamic) => {
                if total_len > cfg.original_max_position_embeddings {
                    RopeFactors::Long
                } else {
                    RopeFactors::Short
                }
            }
        }
    }
}

/// Inverse frequencies of both factor sets and the cos/sin multiplier.
#[derive(Debug, Clone)]
pub struct Rotary {
    short_inv_freq: Vec<f32>,
    long_inv_freq: Vec<f32>,
    attention_factor: f32,
    rotary_dim: usize,
}

impl Rotary {
    /// Derives the frequencies from the config exactly as transformers does (float32).
    pub fn new(cfg: &Phi3Config) -> Self {
        let d = cfg.rotary_dim;
        let base: Vec<f64> =
            (0..d / 2).map(|j| cfg.rope_theta.powf((2 * j) as f64 / d as f64)).collect();
        let with = |factors: Option<&[f64]>| -> Vec<f32> {
            base.iter()
                .enumerate()
                .map(|(j, b)| {
                    let ext = factors.map(|f| f[j]).unwrap_or(1.0);
                    (1.0 / (ext * b)) as f32
                })
                .collect()
        };
        match &cfg.rope_scaling {
            RopeScaling::None => {
                let f = with(None);
                Self {
                    short_inv_freq: f.clone(),
                    long_inv_freq: f,
                    attention_factor: 1.0,
                    rotary_dim: d,
                }
            }
            RopeScaling::LongRope { short_factor, long_factor, attention_factor } => Self {
                short_inv_freq: with(Some(short_factor)),
                long_inv_freq: with(Some(long_factor)),
                attention_factor: *attention_factor as f32,
                rotary_dim: d,
            },
        }
    }

    /// Rotated leading dimensions of each head.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// cos and sin tables, `[n_tokens, rotary_dim / 2]`, for tokens given as
    /// `(position, factor set)`, already multiplied by the attention factor.
    pub fn cos_sin(
        &self,
        tokens: impl Iterator<Item = (usize, RopeFactors)>,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.rotary_dim / 2;
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        let mut n = 0;
        for (pos, factors) in tokens {
            let inv = match factors {
                RopeFactors::Short => &self.short_inv_freq,
                RopeFactors::Long => &self.long_inv_freq,
            };
            for &f in inv {
                // The product is formed in float32 as in the reference.
                let angle = pos as f32 * f;
                cos.push(angle.cos() * self.attention_factor);
                sin.push(angle.sin() * self.attention_factor);
            }
            n += 1;
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Applies the rotation to `x` of shape `[n_tokens, n_heads, head_dim]`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        let rot = self.rotary_dim;
        if rot == d {
            let x = x.contiguous()?.reshape((1, t, h, d))?;
            return Ok(candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.reshape((t, h, d))?);
        }
        let x_rot = x.narrow(2, 0, rot)?.contiguous()?.reshape((1, t, h, rot))?;
        let x_pass = x.narrow(2, rot, d - rot)?;
        let x_rot = candle_nn::rotary_emb::rope_thd(&x_rot, cos, sin)?.reshape((t, h, rot))?;
        Ok(Tensor::cat(&[&x_rot, &x_pass], 2)?)
    }
}
