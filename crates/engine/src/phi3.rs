//! `Phi3ForCausalLM`: Phi-3-mini/medium (4k and 128k), Phi-3.5-mini and Phi-4-mini.
//!
//! The forward pass follows Hugging Face transformers' `modeling_phi3.py` (see
//! `PHI3_FORWARD.md` in the team notes): pre-norm decoder layers, fused `[Q | K | V]` projection,
//! fused `[gate | up]` MLP with SiLU, RMSNorm in float32, rotate-half RoPE over the first
//! `rotary_dim` dimensions with LongRoPE factors and attention factor, grouped-query attention,
//! the causal mask narrowed to `sliding_window` keys, and `lm_head` tied to the embedding when the
//! config says so.
//!
//! One call runs a *ragged batch*: several sequences, each with its own length, position and
//! KV cache. Their tokens are laid end to end so every matrix multiplication is shared by the
//! whole batch; only attention is computed per sequence.

use std::ops::Range;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, D};

use crate::checkpoint::CheckpointFiles;
use crate::config::Phi3Config;
use crate::cpu_decode_batch::{concat_outputs, CpuDecodeBatch};
#[cfg(feature = "cuda")]
use crate::cuda_layer_ops::RopeTables;
#[cfg(feature = "cuda")]
use crate::cuda_paged::{BatchSlots, DecodeSeq};
use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, GgufWeights};
use crate::kv_cache::SequenceCache;
use crate::kv_pool::{KvPool, PoolGeometry};
use crate::model_pool::ModelPool;
use crate::paged_attention::Heads;
use crate::projection::{most_common_format, Embedding, Projection};
use crate::quantize::{QuantScheme, QuantizingWeights};
use crate::rope::{LongRopePolicy, RopeFactors, Rotary};
use crate::span_attention::SpanAttention;
use crate::weights::{ModelWeights, WeightStore};

/// The paged cache's state on the GPU for one forward pass (see `Phi3::gpu_pass`): its slots
/// on the device, the batch items that decode through the paged kernel, in its order, and the
/// pass's rotary tables.
#[cfg(feature = "cuda")]
struct GpuPass {
    slots: BatchSlots,
    decoding: Vec<usize>,
    rope: RopeTables,
}

/// Without CUDA there is no GPU pass: the type has no values.
#[cfg(not(feature = "cuda"))]
enum GpuPass {}

#[cfg(feature = "cuda")]
impl GpuPass {
    /// Whether batch item `i` decodes through the paged kernel.
    fn decodes(&self, i: usize) -> bool {
        self.decoding.contains(&i)
    }

    /// Writes the batch's keys and values of one layer into the pool.
    fn write(&self, pool_k: &Tensor, pool_v: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        self.slots.write(pool_k, pool_v, k, v)
    }

    /// The fused path for the qkv projection's output `qkv`, where the pool and the rotary
    /// tables are in its type: writes the rotated keys and the values into the pool and
    /// returns the rotated queries (`[n_tokens, n_heads, head_dim]`). `None`: nothing done.
    fn write_qkv(
        &self,
        qkv: &Tensor,
        pool_k: &Tensor,
        pool_v: &Tensor,
        heads: Heads,
    ) -> Result<Option<Tensor>> {
        let dtype = qkv.dtype();
        if pool_k.dtype() != dtype || self.rope.dtype() != dtype {
            return Ok(None);
        }
        self.slots.write_qkv(pool_k, pool_v, qkv, heads, &self.rope)?;
        Ok(Some(crate::cuda_layer_ops::rope_queries(qkv, &self.rope, heads)?))
    }

    /// Decode attention of the decoding items over one layer, into their `outputs`; when every
    /// item decodes, the whole batch's output (`[n_items, n_heads * head_dim]`) instead.
    fn decode(
        &self,
        q: &Tensor,
        pool_k: &Tensor,
        pool_v: &Tensor,
        heads: Heads,
        outputs: &mut [Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        let Some(out) = self.slots.decode(q, pool_k, pool_v, heads)? else { return Ok(None) };
        if self.decoding.len() == outputs.len() {
            return Ok(Some(out));
        }
        for (j, &i) in self.decoding.iter().enumerate() {
            outputs[i] = Some(out.narrow(0, j, 1)?);
        }
        Ok(None)
    }
}

#[cfg(not(feature = "cuda"))]
impl GpuPass {
    fn decodes(&self, _: usize) -> bool {
        match *self {}
    }

    fn write(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<()> {
        match *self {}
    }

    fn write_qkv(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: Heads) -> Result<Option<Tensor>> {
        match *self {}
    }

    fn decode(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Heads,
        _: &mut [Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        match *self {}
    }
}

/// RMSNorm with the reference's rounding: normalise in float32, cast back, then scale.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused(x) {
            return crate::cuda_layer_ops::rms_norm(x, &self.weight, self.eps);
        }
        if x.dtype() == DType::F32 {
            return Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?);
        }
        let xf = x.to_dtype(DType::F32)?;
        let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let normed = xf.broadcast_mul(&inv)?.to_dtype(x.dtype())?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }

    /// The residual connection and this norm: `(x + delta, norm(x + delta))`, in one pass on
    /// the GPU.
    fn forward_residual(&self, x: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if self.fused(x) && delta.dtype() == x.dtype() {
            return crate::cuda_layer_ops::add_rms_norm(x, delta, &self.weight, self.eps);
        }
        let sum = (x + delta)?;
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }

    /// Whether the GPU's fused kernel computes this norm of `x`.
    #[cfg(feature = "cuda")]
    fn fused(&self, x: &Tensor) -> bool {
        crate::cuda_layer_ops::supports(x) && self.weight.dtype() == x.dtype()
    }
}

/// The MLP's gate, `up * silu(gate)` of `gate_up` (`[rows, 2 * intermediate]`): SiLU computed
/// in float32 and rounded to the model's type, as the reference's kernel does, then the product
/// in the model's type. One fused launch on the GPU.
fn gated(gate_up: &Tensor, intermediate: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda_layer_ops::supports(gate_up) {
        return crate::cuda_layer_ops::silu_mul(gate_up);
    }
    let gate = gate_up.narrow(1, 0, intermediate)?;
    let up = gate_up.narrow(1, intermediate, intermediate)?;
    let act = if gate.dtype() == DType::F32 {
        candle_nn::ops::silu(&gate)?
    } else {
        candle_nn::ops::silu(&gate.to_dtype(DType::F32)?)?.to_dtype(gate.dtype())?
    };
    Ok((up * act)?)
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    qkv_proj: Projection,
    o_proj: Projection,
    post_attention_norm: RmsNorm,
    gate_up_proj: Projection,
    down_proj: Projection,
}

/// One sequence's part of a batched forward pass.
pub struct BatchItem<'a> {
    /// Every token of the sequence so far (prompt and generated). The model computes the ones
    /// that are not cached yet.
    pub tokens: &'a [u32],
    /// The sequence's KV cache; it is extended by this call.
    pub cache: &'a mut SequenceCache,
    /// At most this many new tokens are computed in this call (chunked prefill); `None` for all.
    pub max_new_tokens: Option<usize>,
    /// Return logits for every computed position instead of only the last one.
    pub all_logits: bool,
}

/// Logits of a batched forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[rows, vocab_size]`, float32.
    pub logits: Tensor,
    /// For each batch item, its rows in `logits`.
    pub rows: Vec<Range<usize>>,
    /// For each batch item, the positions that were computed.
    pub positions: Vec<Range<usize>>,
}

/// The positions one batch item computes in a forward pass, and their rotary factor set.
pub(crate) type Span = (Range<usize>, RopeFactors);

/// Decides, per batch item, which of its tokens a forward pass computes (the uncached ones, at
/// most `max_new_tokens`) and with which rotary factors, reserving their cache blocks first so
/// that a full pool fails the step with nothing half done. Returns the spans and the batch's
/// token ids laid end to end. Shared by every architecture of the family.
pub(crate) fn plan_batch(
    cfg: &Phi3Config,
    policy: LongRopePolicy,
    items: &mut [BatchItem<'_>],
) -> Result<(Vec<Span>, Vec<u32>)> {
    // Decide, per sequence, which tokens to compute and with which rotary factors.
    let mut spans: Vec<(Range<usize>, RopeFactors)> = Vec::with_capacity(items.len());
    let mut flat_ids: Vec<u32> = Vec::new();
    for item in items.iter_mut() {
        let total = item.tokens.len();
        if total > cfg.max_position_embeddings {
            return Err(EngineError::InvalidRequest(format!(
                "sequence of {total} tokens exceeds the model's context of {} tokens",
                cfg.max_position_embeddings
            )));
        }
        let mut start = item.cache.len().min(total);
        if item.cache.len() > total {
            item.cache.truncate(total);
        }
        let mut end = match item.max_new_tokens {
            Some(n) => total.min(start + n.max(1)),
            None => total,
        };
        let factors = policy.factors_for(cfg, end);
        if item.cache.is_empty() {
            // A first chunk: nothing cached yet, so no keys to re-rotate.
            item.cache.clear(factors);
        } else if item.cache.factors() != factors {
            // The cached keys were rotated with the other factor set: re-encode everything.
            tracing::debug!(len = total, "LongRoPE factor switch: re-encoding sequence");
            item.cache.clear(factors);
            start = 0;
            end = total;
        }
        if start == end {
            return Err(EngineError::InvalidRequest(
                "a batch item has no uncomputed tokens".into(),
            ));
        }
        // Blocks for the new positions, before anything is computed: a full pool fails
        // the step with nothing half done.
        item.cache.reserve(end)?;
        for &t in &item.tokens[start..end] {
            if t as usize >= cfg.vocab_size {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {t} is outside the vocabulary of {} ids",
                    cfg.vocab_size
                )));
            }
        }
        flat_ids.extend_from_slice(&item.tokens[start..end]);
        spans.push((start..end, factors));
    }
    Ok((spans, flat_ids))
}

/// The rows of a ragged batch whose logits are wanted (the last of each item's span, or all of
/// it with `all_logits`), and each item's range among them.
pub(crate) fn logit_rows(
    items: &[BatchItem<'_>],
    spans: &[(Range<usize>, RopeFactors)],
) -> (Vec<u32>, Vec<Range<usize>>) {
    let mut wanted: Vec<u32> = Vec::new();
    let mut rows = Vec::with_capacity(items.len());
    let mut offset = 0usize;
    for (item, (span, _)) in items.iter().zip(spans) {
        let first = wanted.len();
        if item.all_logits {
            wanted.extend((offset..offset + span.len()).map(|r| r as u32));
        } else {
            wanted.push((offset + span.len() - 1) as u32);
        }
        rows.push(first..wanted.len());
        offset += span.len();
    }
    (wanted, rows)
}

/// A loaded Phi-3 model.
#[derive(Debug, Clone)]
pub struct Phi3 {
    cfg: Phi3Config,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Projection,
    rotary: Rotary,
    rope_policy: LongRopePolicy,
    dtype: DType,
    device: Device,
    /// The KV-cache pool every [`Self::new_cache`] draws on.
    pool: ModelPool,
}

/// Kept here for callers that size pools the way a model does by default.
pub use crate::model_pool::default_pool_tokens;

impl Phi3 {
    /// Builds the model from a checkpoint's tensors, checking each one's shape against `cfg`.
    pub fn load(
        cfg: &Phi3Config,
        weights: &dyn ModelWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm { weight: weights.tensor(name, &[h])?, eps: cfg.rms_norm_eps })
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<Projection> {
            weights.projection(name, [out, inp])
        };
        let embed_tokens = weights.embedding("model.embed_tokens.weight", [cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                qkv_proj: linear(
                    &format!("{p}.self_attn.qkv_proj.weight"),
                    (nq + 2 * nkv) * hd,
                    h,
                )?,
                o_proj: linear(&format!("{p}.self_attn.o_proj.weight"), h, nq * hd)?,
                post_attention_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_up_proj: linear(
                    &format!("{p}.mlp.gate_up_proj.weight"),
                    2 * cfg.intermediate_size,
                    h,
                )?,
                down_proj: linear(&format!("{p}.mlp.down_proj.weight"), h, cfg.intermediate_size)?,
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            match &embed_tokens {
                Embedding::Dense(t) => Projection::dense(t.clone()),
                Embedding::Quantized(q) => Projection::quantized(q.clone())?,
            }
        } else {
            linear("lm_head.weight", cfg.vocab_size, h)?
        };
        let model = Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: norm("model.norm.weight")?,
            lm_head,
            rotary: Rotary::new(cfg),
            rope_policy: LongRopePolicy::default(),
            dtype,
            device: device.clone(),
            pool: ModelPool::new(
                cfg.num_hidden_layers,
                cfg.num_key_value_heads,
                cfg.head_dim,
                dtype,
                cfg.max_position_embeddings,
                device,
            ),
        };
        let used = model.tensor_names();
        let names = weights.names();
        let unused: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !used.iter().any(|u| u == n) && !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !unused.is_empty() {
            return Err(EngineError::Weights {
                location: "checkpoint".into(),
                message: format!(
                    "{} tensors that Phi3ForCausalLM does not have, e.g. {:?}: is this really a \
                     Phi-3 checkpoint?",
                    unused.len(),
                    &unused[..unused.len().min(3)]
                ),
            });
        }
        Ok(model)
    }

    /// Loads config and weights of a resolved checkpoint.
    pub fn from_checkpoint(files: &CheckpointFiles, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_checkpoint_quantized(files, dtype, device, None)
    }

    /// Loads a resolved checkpoint, quantizing its matrices to `quantize` as they load when
    /// given (the norms stay dense; see [`crate::quantize`]). A GGUF file loads as stored.
    pub fn from_checkpoint_quantized(
        files: &CheckpointFiles,
        dtype: DType,
        device: &Device,
        quantize: Option<QuantScheme>,
    ) -> Result<Self> {
        if let Some(path) = &files.gguf {
            return Self::from_gguf(&GgufFile::open(path)?, dtype, device);
        }
        let cfg = Phi3Config::from_file(&files.config)?;
        let weights = WeightStore::open(&files.weights, dtype, device)?;
        match quantize {
            None => Self::load(&cfg, &weights, dtype, device),
            Some(scheme) => {
                let q = QuantizingWeights::new(&weights, scheme, &cfg, device);
                Self::load(&cfg, &q, dtype, device)
            }
        }
    }

    /// Loads a `phi3` GGUF file: hyper-parameters from its metadata, matrices in their stored
    /// block formats, float tensors converted to `dtype`.
    pub fn from_gguf(file: &GgufFile, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = file.config()?;
        Self::load(&cfg, &GgufWeights::new(file, dtype, device), dtype, device)
    }

    /// The block format of the quantized matrices (the most common one), or `None` when the
    /// model runs dense.
    pub fn quantization(&self) -> Option<GgmlDType> {
        most_common_format(
            self.layers
                .iter()
                .flat_map(|l| [&l.qkv_proj, &l.o_proj, &l.gate_up_proj, &l.down_proj]),
        )
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut names =
            vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
        if !self.cfg.tie_word_embeddings {
            names.push("lm_head.weight".into());
        }
        for i in 0..self.cfg.num_hidden_layers {
            for s in [
                "input_layernorm.weight",
                "self_attn.qkv_proj.weight",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                names.push(format!("model.layers.{i}.{s}"));
            }
        }
        names
    }

    /// The model's configuration.
    pub fn config(&self) -> &Phi3Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Chooses when LongRoPE switches to its long factors.
    pub fn set_long_rope_policy(&mut self, policy: LongRopePolicy) {
        self.rope_policy = policy;
    }

    /// The LongRoPE policy in force.
    pub fn long_rope_policy(&self) -> LongRopePolicy {
        self.rope_policy
    }

    /// The shape of the keys and values this model caches.
    pub fn kv_geometry(&self) -> PoolGeometry {
        self.pool.geometry()
    }

    /// Element type of the keys and values that pools made from now on hold (see
    /// [`ModelPool::set_dtype`]).
    pub fn set_kv_cache_dtype(&self, dtype: DType) -> Result<()> {
        self.pool.set_dtype(dtype)
    }

    /// Makes a pool of `tokens` positions the one new caches draw on (see
    /// [`ModelPool::set_tokens`]).
    pub fn set_kv_pool_tokens(&self, tokens: usize) -> Result<()> {
        self.pool.set_tokens(tokens)
    }

    /// Bytes of finished sequences' blocks that pools made from now on let their prefix cache
    /// keep (0, the default, for none).
    pub fn set_prefix_cache_bytes(&self, bytes: usize) {
        self.pool.set_prefix_cache_bytes(bytes)
    }

    /// The pool new caches draw on, made with [`default_pool_tokens`] if none was set.
    pub fn kv_pool(&self) -> Result<KvPool> {
        self.pool.pool()
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> Result<SequenceCache> {
        self.pool.new_cache()
    }

    /// Runs every batch item's uncached tokens through the model and extends its cache.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<ForwardOutput> {
        let (spans, flat_ids) = plan_batch(&self.cfg, self.rope_policy, items)?;
        let n_tokens = flat_ids.len();
        let ids = Tensor::from_vec(flat_ids, n_tokens, &self.device)?;
        let mut x = self.embed_tokens.lookup(&ids, self.dtype)?;
        let (cos, sin) = self.rotary.cos_sin(
            spans.iter().flat_map(|(r, f)| r.clone().map(move |p| (p, *f))),
            self.dtype,
            &self.device,
        )?;

        // Every layer uses the same tiles and masks: build them (on the host) and upload them
        // once per forward pass, not once per layer.
        let plans = spans
            .iter()
            .map(|(span, _)| {
                if self.uses_flash_attn() {
                    return Ok(None);
                }
                let (first_key, _) = self.key_range(span);
                let window = self.cfg.sliding_window;
                let n_heads = self.cfg.num_attention_heads;
                SpanAttention::new(span, first_key, window, n_heads, self.dtype, &self.device)
                    .map(Some)
            })
            .collect::<Result<Vec<Option<SpanAttention>>>>()?;

        #[cfg(feature = "cuda")]
        let gpu = self.gpu_pass(items, &spans, &cos, &sin)?;
        #[cfg(not(feature = "cuda"))]
        let gpu: Option<GpuPass> = None;

        // Each residual add is done together with the norm after it (one pass on the GPU):
        // `h` is the next sublayer's normalised input.
        let mut h = match self.layers.first() {
            Some(layer) => layer.input_norm.forward(&x)?,
            None => x.clone(),
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let attn =
                self.attention(li, layer, &h, &cos, &sin, items, &spans, &plans, gpu.as_ref())?;
            (x, h) = layer.post_attention_norm.forward_residual(&x, &attn)?;
            let gate_up = layer.gate_up_proj.forward(&h)?;
            let mlp = layer.down_proj.forward(&gated(&gate_up, self.cfg.intermediate_size)?)?;
            match self.layers.get(li + 1) {
                Some(next) => (x, h) = next.input_norm.forward_residual(&x, &mlp)?,
                None => x = (x + mlp)?,
            }
        }
        for (item, (span, _)) in items.iter_mut().zip(&spans) {
            item.cache.advance(span.len());
        }

        // Only the rows whose logits are wanted go through the final norm and lm_head.
        let (wanted, rows) = logit_rows(items, &spans);
        let n_wanted = wanted.len();
        let x = x.index_select(&Tensor::from_vec(wanted, n_wanted, &self.device)?, 0)?;
        let x = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
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
        plans: &[Option<SpanAttention>],
        gpu: Option<&GpuPass>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (hd, nq, nkv) = (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let n_tokens = h.dim(0)?;
        let qkv = layer.qkv_proj.forward(h)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let heads = Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale: scale as f32 };
        // On the GPU the whole batch's keys and values go into the pool in one launch each,
        // straight out of `qkv` where the types allow (the keys rotated on the way).
        let pool = gpu.zip(items.first()).map(|(g, item)| (g, item.cache.pool().layer(layer_idx)));
        let fused_q = match pool {
            Some((gpu, (pool_k, pool_v))) => gpu.write_qkv(&qkv, pool_k, pool_v, heads)?,
            None => None,
        };
        let (q, kv) = match fused_q {
            Some(q) => (q, None),
            None => {
                let q = qkv.narrow(1, 0, nq * hd)?.reshape((n_tokens, nq, hd))?;
                let k = qkv.narrow(1, nq * hd, nkv * hd)?.reshape((n_tokens, nkv, hd))?;
                let v = qkv.narrow(1, (nq + nkv) * hd, nkv * hd)?.reshape((n_tokens, nkv, hd))?;
                let q = self.rotary.apply(&q, cos, sin)?.contiguous()?;
                let k = self.rotary.apply(&k, cos, sin)?.contiguous()?;
                let v = v.contiguous()?;
                if let Some((gpu, (pool_k, pool_v))) = pool {
                    gpu.write(pool_k, pool_v, &k, &v)?;
                }
                (q, Some((k, v)))
            }
        };
        // Decode queries whose cache the paged kernel reads in place; the rest gather their
        // keys and values into contiguous tensors.
        let paged = !self.uses_flash_attn();
        let mut decode = CpuDecodeBatch::default();
        let mut outputs: Vec<Option<Tensor>> = Vec::with_capacity(items.len());
        let mut offset = 0usize;
        for (i, ((item, (span, _)), plan)) in items.iter_mut().zip(spans).zip(plans).enumerate() {
            let l = span.len();
            let q_rows = q.narrow(0, offset, l)?; // [l, nq, hd]
            if let (None, Some((k, v))) = (gpu, &kv) {
                item.cache.write(layer_idx, &k.narrow(0, offset, l)?, &v.narrow(0, offset, l)?)?;
            }
            offset += l;
            let (first_key, _) = self.key_range(span);
            if gpu.is_some_and(|g| g.decodes(i)) {
                outputs.push(None);
                continue;
            }

            // (A single query sees every key of its key range.)
            if paged && decode.offer(i, item.cache, &q_rows, (first_key, span.end), None)? {
                outputs.push(None);
                continue;
            }
            let (k_all, v_all) = item.cache.gather(layer_idx, first_key, span.end, q.dtype())?; // [nkv, n_keys, hd]

            #[cfg(feature = "flash-attn")]
            if self.uses_flash_attn() {
                outputs.push(Some(self.flash_attention(&q_rows, &k_all, &v_all, scale as f32)?));
                continue;
            }

            let plan = plan.as_ref().expect("a plan for every item off the flash-attention path");
            outputs.push(Some(plan.forward(&q_rows, &k_all, &v_all, heads, None)?));
        }
        if let (Some(gpu), Some(item)) = (gpu, items.first()) {
            let (pool_k, pool_v) = item.cache.pool().layer(layer_idx);
            if let Some(all) = gpu.decode(&q, pool_k, pool_v, heads, &mut outputs)? {
                // Every item decoded: the kernel's output is the batch's, in order.
                return layer.o_proj.forward(&all);
            }
        }
        decode.run(layer_idx, heads, self.dtype, &self.device, &mut outputs)?;
        let out = concat_outputs(outputs)?;
        layer.o_proj.forward(&out)
    }

    /// The batch's slots on the GPU, when its cache is a pool the paged kernels serve: every
    /// token's slot for the writes, and the decoding sequences (one query each) with their
    /// visible keys. `None` sends the pass down the general path.
    #[cfg(feature = "cuda")]
    fn gpu_pass(
        &self,
        items: &[BatchItem<'_>],
        spans: &[(Range<usize>, RopeFactors)],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Option<GpuPass>> {
        let Some(first) = items.first() else { return Ok(None) };
        let pool = first.cache.pool();
        if !crate::cuda_paged::supports(pool) || !items.iter().all(|i| i.cache.pool().same(pool)) {
            return Ok(None);
        }
        let (mut write, mut decode, mut decoding) = (Vec::new(), Vec::new(), Vec::new());
        let mut row = 0u32;
        for (i, (item, (span, _))) in items.iter().zip(spans).enumerate() {
            write.extend(item.cache.slots(span.start, span.end));
            if span.len() == 1 {
                // A single query's keys never exceed its window (key_range): no mask.
                let (first_key, _) = self.key_range(span);
                decode.push(DecodeSeq { q_row: row, slots: item.cache.slots(first_key, span.end) });
                decoding.push(i);
            }
            row += span.len() as u32;
        }
        let slots = BatchSlots::new(pool, write, &decode)?;
        Ok(Some(GpuPass { slots, decoding, rope: RopeTables::new(cos, sin)? }))
    }

    /// Whether attention runs in the FlashAttention-2 kernel (built with `flash-attn`, on CUDA,
    /// in bf16 or f16; float32 keeps the eager path the reference uses).
    fn uses_flash_attn(&self) -> bool {
        cfg!(feature = "flash-attn")
            && self.device.is_cuda()
            && matches!(self.dtype, DType::BF16 | DType::F16)
    }

    /// FlashAttention-2 of one sequence: `q` `[l, nq, hd]` (its rows of the batch), `k`, `v`
    /// `[nkv, n_keys, hd]` (views of its cache, the last key the last query's own). The kernel
    /// aligns the causal diagonal bottom-right, so query `i` sees keys up to `n_keys - l + i`,
    /// and grouped-query heads are handled natively. Returns `[l, nq * hd]`.
    #[cfg(feature = "flash-attn")]
    fn flash_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        let (l, nq, hd) = q.dims3()?;
        // `[1, seq, heads, hd]` views: the kernel takes strides, only the last dim must be dense.
        let q = q.unsqueeze(0)?;
        let k = k.transpose(0, 1)?.unsqueeze(0)?;
        let v = v.transpose(0, 1)?.unsqueeze(0)?;
        // The reference's window of `w` keys includes the query's own: `w - 1` to its left.
        let left = self.cfg.sliding_window.map(|w| w.saturating_sub(1));
        let out = candle_flash_attn::flash_attn_windowed(&q, &k, &v, scale, left, Some(0))?;
        Ok(out.reshape((l, nq * hd))?)
    }

    /// The keys the queries at `span` attend to: `(first, count)`. Keys outside every query's
    /// window are skipped outright.
    fn key_range(&self, span: &Range<usize>) -> (usize, usize) {
        let first_key = match self.cfg.sliding_window {
            Some(w) => (span.start + 1).saturating_sub(w),
            None => 0,
        };
        (first_key, span.end - first_key)
    }
}
