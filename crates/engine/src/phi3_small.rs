//! `Phi3SmallForCausalLM`: Phi-3-small-8k and -128k (7B), an architecture of its own.
//!
//! It shares Phi-3-mini's decoder skeleton (pre-norm layers, one fused query/key/value
//! projection, rotate-half RoPE with LongRoPE for 128k, grouped-query attention, a paged KV
//! cache) but differs in every detail that changes numbers, all taken from the team note
//! `PHI3_SMALL.md` and checked against mlx-lm's `phi3small` model (see
//! `models/make_tiny_phi3_small.py`):
//!
//! * LayerNorm with weight and bias (not RMSNorm), and a bias on every linear layer;
//! * the fused projection is laid out per key/value group: `[q_0 .. q_{g-1}, k, v]` for each of
//!   the `n_kv_heads` groups, not `[Q | K | V]`;
//! * muP: embeddings times `mup_embedding_multiplier`, attention scores times
//!   `mup_attn_multiplier / head_dim`, logits divided by `mup_width_multiplier`, with the
//!   embedding matrix as the output head;
//! * GEGLU: `up_proj` gives interleaved pairs, `quick_gelu(min(even, limit)) * (clamp(odd) + 1)`;
//! * block-sparse attention in all layers but every `dense_attention_every_n_layers`-th: each
//!   query head sees its most recent blocks plus every `vert_stride`-th block before them,
//!   with a per-head phase ([`crate::phi3_small_config::BlockSparse`]);
//! * dummy and fill-in-the-middle token ids get `-inf` logits.
//!
//! Attention runs on the general path ([`crate::span_attention`]: keys gathered from the cache,
//! query tiles with additive masks, per head in the sparse layers) for prompt chunks, and on the
//! CPU's paged decode kernel for single decode queries, each sparse head computing only the
//! keys it sees once the sequence outgrows the local blocks. The fused GPU kernels of
//! [`crate::phi3`] are not used: on CUDA every step takes the general path.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::CheckpointFiles;
use crate::config::Phi3Config;
use crate::cpu_decode_batch::{concat_outputs, CpuDecodeBatch};
use crate::error::{EngineError, Result};
use crate::kv_cache::SequenceCache;
use crate::kv_pool::{KvPool, PoolGeometry};
use crate::model_pool::ModelPool;
use crate::paged_attention::{HeadKeys, Heads};
use crate::phi3::{logit_rows, plan_batch, BatchItem, ForwardOutput};
use crate::phi3_small_config::Phi3SmallConfig;
use crate::projection::{most_common_format, Embedding, Projection};
use crate::quantize::{QuantScheme, QuantizingWeights};
use crate::rope::{LongRopePolicy, RopeFactors, Rotary};
use crate::span_attention::SpanAttention;
use crate::weights::{ModelWeights, WeightStore};

/// A linear layer with a bias.
#[derive(Debug, Clone)]
struct Linear {
    weight: Projection,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.weight.forward(x)?.broadcast_add(&self.bias)?)
    }
}

/// LayerNorm over the last dimension, with weight and bias.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    post_attention_norm: LayerNorm,
    up_proj: Linear,
    down_proj: Linear,
    /// Block-sparse attention (else dense causal).
    sparse: bool,
}

/// A loaded Phi-3-small model.
#[derive(Debug, Clone)]
pub struct Phi3Small {
    cfg: Phi3SmallConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    final_norm: LayerNorm,
    lm_head: Projection,
    /// `lm_head`'s output is divided by the width multiplier and these are added: `-inf` at
    /// the masked ids, 0 elsewhere (`[vocab]`, float32).
    logit_mask: Tensor,
    rotary: Rotary,
    rope_policy: LongRopePolicy,
    dtype: DType,
    device: Device,
    pool: ModelPool,
}

impl Phi3Small {
    /// Builds the model from a checkpoint's tensors, checking each one's shape against `cfg`.
    pub fn load(
        cfg: &Phi3SmallConfig,
        weights: &dyn ModelWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let c = &cfg.base;
        let (h, hd, ff) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (nq, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: weights.tensor(&format!("{name}.weight"), &[h])?,
                bias: weights.tensor(&format!("{name}.bias"), &[h])?,
                eps: c.rms_norm_eps,
            })
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear {
                weight: weights.projection(&format!("{name}.weight"), [out, inp])?,
                bias: weights.tensor(&format!("{name}.bias"), &[out])?,
            })
        };
        let embed_tokens = weights.embedding("model.embed_tokens.weight", [c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_norm: norm(&format!("{p}.input_layernorm"))?,
                query_key_value: linear(
                    &format!("{p}.self_attn.query_key_value"),
                    (nq + 2 * nkv) * hd,
                    h,
                )?,
                dense: linear(&format!("{p}.self_attn.dense"), h, nq * hd)?,
                post_attention_norm: norm(&format!("{p}.post_attention_layernorm"))?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), 2 * ff, h)?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), h, ff)?,
                sparse: cfg.is_sparse_layer(i),
            });
        }
        let names = weights.names();
        let has_head = names.iter().any(|n| n == "lm_head.weight");
        let lm_head = if c.tie_word_embeddings && !has_head {
            match &embed_tokens {
                Embedding::Dense(t) => Projection::dense(t.clone()),
                Embedding::Quantized(q) => Projection::quantized(q.clone())?,
            }
        } else {
            weights.projection("lm_head.weight", [c.vocab_size, h])?
        };
        let mut mask = vec![0f32; c.vocab_size];
        for &id in &cfg.masked_token_ids {
            mask[id as usize] = f32::NEG_INFINITY;
        }
        let model = Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            final_norm: norm("model.final_layernorm")?,
            lm_head,
            logit_mask: Tensor::from_vec(mask, c.vocab_size, device)?,
            rotary: Rotary::new(c),
            rope_policy: LongRopePolicy::default(),
            dtype,
            device: device.clone(),
            pool: ModelPool::new(
                c.num_hidden_layers,
                nkv,
                hd,
                dtype,
                c.max_position_embeddings,
                device,
            ),
        };
        let used = model.tensor_names(has_head);
        let unused: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !used.iter().any(|u| u == n) && !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !unused.is_empty() {
            return Err(EngineError::Weights {
                location: "checkpoint".into(),
                message: format!(
                    "{} tensors that Phi3SmallForCausalLM does not have, e.g. {:?}",
                    unused.len(),
                    &unused[..unused.len().min(3)]
                ),
            });
        }
        Ok(model)
    }

    /// Loads a resolved safetensors checkpoint, quantizing its matrices to `quantize` as they
    /// load when given (norms and biases stay dense).
    pub fn from_checkpoint_quantized(
        files: &CheckpointFiles,
        dtype: DType,
        device: &Device,
        quantize: Option<QuantScheme>,
    ) -> Result<Self> {
        if let Some(path) = &files.gguf {
            return Err(EngineError::InvalidRequest(format!(
                "{}: GGUF files hold Phi3ForCausalLM models; Phi-3-small loads from safetensors",
                path.display()
            )));
        }
        let cfg = Phi3SmallConfig::from_file(&files.config)?;
        let weights = WeightStore::open(&files.weights, dtype, device)?;
        match quantize {
            None => Self::load(&cfg, &weights, dtype, device),
            Some(scheme) => {
                let q = QuantizingWeights::new(&weights, scheme, &cfg.base, device);
                Self::load(&cfg, &q, dtype, device)
            }
        }
    }

    fn tensor_names(&self, has_head: bool) -> Vec<String> {
        let mut names = vec!["model.embed_tokens.weight".to_string()];
        if has_head {
            names.push("lm_head.weight".into());
        }
        let both = |names: &mut Vec<String>, p: &str| {
            names.push(format!("{p}.weight"));
            names.push(format!("{p}.bias"));
        };
        both(&mut names, "model.final_layernorm");
        for i in 0..self.layers.len() {
            for s in [
                "input_layernorm",
                "self_attn.query_key_value",
                "self_attn.dense",
                "post_attention_layernorm",
                "mlp.up_proj",
                "mlp.down_proj",
            ] {
                both(&mut names, &format!("model.layers.{i}.{s}"));
            }
        }
        names
    }

    /// The Phi-3-small settings.
    pub fn small_config(&self) -> &Phi3SmallConfig {
        &self.cfg
    }

    /// The shape shared with the other Phi-3 models (context, vocabulary, heads).
    pub fn config(&self) -> &Phi3Config {
        &self.cfg.base
    }

    /// The block format of the quantized matrices (the most common one), or `None` when the
    /// model runs dense.
    pub fn quantization(&self) -> Option<candle_core::quantized::GgmlDType> {
        most_common_format(self.layers.iter().flat_map(|l| {
            [&l.query_key_value.weight, &l.dense.weight, &l.up_proj.weight, &l.down_proj.weight]
        }))
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Chooses when LongRoPE (the 128k model) switches to its long factors.
    pub fn set_long_rope_policy(&mut self, policy: LongRopePolicy) {
        self.rope_policy = policy;
    }

    /// The shape of the keys and values this model caches.
    pub fn kv_geometry(&self) -> PoolGeometry {
        self.pool.geometry()
    }

    /// The pool's settings and the pool itself.
    pub fn pool(&self) -> &ModelPool {
        &self.pool
    }

    /// The pool new caches draw on.
    pub fn kv_pool(&self) -> Result<KvPool> {
        self.pool.pool()
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> Result<SequenceCache> {
        self.pool.new_cache()
    }

    /// Runs every batch item's uncached tokens through the model and extends its cache.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<ForwardOutput> {
        let c = &self.cfg.base;
        let (spans, flat_ids) = plan_batch(c, self.rope_policy, items)?;
        let n_tokens = flat_ids.len();
        let ids = Tensor::from_vec(flat_ids, n_tokens, &self.device)?;
        let mut x = (self.embed_tokens.lookup(&ids, self.dtype)? * self.cfg.embedding_multiplier)?;
        let (cos, sin) = self.rotary.cos_sin(
            spans.iter().flat_map(|(r, f)| r.clone().map(move |p| (p, *f))),
            self.dtype,
            &self.device,
        )?;
        // The tiles, masks and sparse heads' keys are the same in every layer of a kind: made
        // once per pass.
        let plans = spans
            .iter()
            .map(|(span, _)| {
                let n_heads = c.num_attention_heads;
                SpanAttention::new(span, 0, None, n_heads, self.dtype, &self.device)
            })
            .collect::<Result<Vec<SpanAttention>>>()?;
        let sparse: Vec<Option<Arc<HeadKeys>>> =
            spans.iter().map(|(span, _)| self.decode_keys(span)).collect();

        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let attn = self.attention(li, layer, &h, &cos, &sin, items, &spans, &plans, &sparse)?;
            x = (x + attn)?;
            let h = layer.post_attention_norm.forward(&x)?;
            let up = layer.up_proj.forward(&h)?;
            let mlp = layer.down_proj.forward(&gegelu(&up, self.cfg.gegelu_limit)?)?;
            x = (x + mlp)?;
        }
        for (item, (span, _)) in items.iter_mut().zip(&spans) {
            item.cache.advance(span.len());
        }

        let (wanted, rows) = logit_rows(items, &spans);
        let n_wanted = wanted.len();
        let x = x.index_select(&Tensor::from_vec(wanted, n_wanted, &self.device)?, 0)?;
        let x = self.final_norm.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        let logits = (logits / self.cfg.width_multiplier)?.broadcast_add(&self.logit_mask)?;
        Ok(ForwardOutput { logits, rows, positions: spans.into_iter().map(|(r, _)| r).collect() })
    }

    /// Self-attention of one layer over the ragged batch `h` (`[n_tokens, hidden]`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer_idx: usize,
        layer: &DecoderLayer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        items: &mut [BatchItem<'_>],
        spans: &[(Range<usize>, RopeFactors)],
        plans: &[SpanAttention],
        sparse: &[Option<Arc<HeadKeys>>],
    ) -> Result<Tensor> {
        let c = &self.cfg.base;
        let (hd, nq, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let group = nq / nkv;
        let n_tokens = h.dim(0)?;
        // Per key/value group: `group` query heads, then the key, then the value.
        let qkv = layer.query_key_value.forward(h)?.reshape((n_tokens, nkv, group + 2, hd))?;
        let q = qkv.narrow(2, 0, group)?.reshape((n_tokens, nq, hd))?;
        let k = qkv.narrow(2, group, 1)?.reshape((n_tokens, nkv, hd))?;
        let v = qkv.narrow(2, group + 1, 1)?.reshape((n_tokens, nkv, hd))?.contiguous()?;
        let q = self.rotary.apply(&q, cos, sin)?.contiguous()?;
        let k = self.rotary.apply(&k, cos, sin)?.contiguous()?;
        let scale = self.cfg.attention_scale;
        let heads = Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale: scale as f32 };

        let mut decode = CpuDecodeBatch::default();
        let mut outputs: Vec<Option<Tensor>> = Vec::with_capacity(items.len());
        let mut offset = 0usize;
        for (i, (item, (span, _))) in items.iter_mut().zip(spans).enumerate() {
            let l = span.len();
            let q_rows = q.narrow(0, offset, l)?; // [l, nq, hd]
            item.cache.write(layer_idx, &k.narrow(0, offset, l)?, &v.narrow(0, offset, l)?)?;
            offset += l;
            let visible = if layer.sparse { sparse[i].clone() } else { None };
            if decode.offer(i, item.cache, &q_rows, (0, span.end), visible)? {
                outputs.push(None);
                continue;
            }
            let (k_all, v_all) = item.cache.gather(layer_idx, 0, span.end, q.dtype())?; // [nkv, n_keys, hd]
            let layout = layer.sparse.then_some(&self.cfg.block_sparse);
            outputs.push(Some(plans[i].forward(&q_rows, &k_all, &v_all, heads, layout)?));
        }
        decode.run(layer_idx, heads, self.dtype, &self.device, &mut outputs)?;
        let out = concat_outputs(outputs)?;
        layer.dense.forward(&out)
    }

    /// The keys each head of a decoding query at `span` sees in the sparse layers, or `None`
    /// when every head sees them all (a prompt chunk, or a past that lies in the local blocks).
    fn decode_keys(&self, span: &Range<usize>) -> Option<Arc<HeadKeys>> {
        let layout = &self.cfg.block_sparse;
        if span.len() != 1 || layout.all_local(span.start) {
            return None;
        }
        let n_heads = self.cfg.base.num_attention_heads;
        Some(Arc::new((0..n_heads).map(|h| layout.visible_runs(h, span.start)).collect()))
    }
}

/// GEGLU of `up` (`[rows, 2 * ff]`, pairs interleaved): `quick_gelu(min(even, limit)) *
/// (clamp(odd, -limit, limit) + 1)`, with `quick_gelu(x) = x * sigmoid(1.702 x)`. Computed in
/// float32 and rounded to the model's type.
fn gegelu(up: &Tensor, limit: Option<f64>) -> Result<Tensor> {
    let (rows, width) = up.dims2()?;
    let dtype = up.dtype();
    let pairs = up.to_dtype(DType::F32)?.reshape((rows, width / 2, 2))?;
    let mut gate = pairs.narrow(2, 0, 1)?.squeeze(2)?;
    let mut linear = pairs.narrow(2, 1, 1)?.squeeze(2)?;
    if let Some(limit) = limit {
        gate = gate.clamp(f64::NEG_INFINITY, limit)?;
        linear = linear.clamp(-limit, limit)?;
    }
    let act = (&gate * candle_nn::ops::sigmoid(&(&gate * 1.702)?)?)?;
    Ok((act * (linear + 1.0)?)?.to_dtype(dtype)?)
}
