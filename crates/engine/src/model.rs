//! A loaded model of any architecture phi-serve runs, chosen by the checkpoint's `config.json`.
//!
//! The engine schedules, caches and samples the same way for every architecture; only the
//! forward pass and the weights differ. [`Model`] is the one type the engine holds: it loads
//! the right architecture and forwards each call to it.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use crate::checkpoint::CheckpointFiles;
use crate::config::{is_phi3_small, read_json, Phi3Config};
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::kv_cache::SequenceCache;
use crate::kv_pool::{KvPool, PoolGeometry};
use crate::phi3::{BatchItem, ForwardOutput, Phi3};
use crate::phi3_small::Phi3Small;
use crate::quantize::QuantScheme;
use crate::rope::LongRopePolicy;

/// A loaded model.
#[derive(Debug, Clone)]
pub enum Model {
    /// `Phi3ForCausalLM`: Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini (safetensors or GGUF).
    Phi3(Phi3),
    /// `Phi3SmallForCausalLM`: Phi-3-small (safetensors).
    Phi3Small(Phi3Small),
}

/// Calls `$body` with the architecture's model bound to `$m`.
macro_rules! each {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            Model::Phi3($m) => $body,
            Model::Phi3Small($m) => $body,
        }
    };
}

impl Model {
    /// Loads a resolved checkpoint as the architecture its `config.json` names (a GGUF file is
    /// a Phi-3), quantizing its matrices as they load when `quantize` is given.
    pub fn from_checkpoint_quantized(
        files: &CheckpointFiles,
        dtype: DType,
        device: &Device,
        quantize: Option<QuantScheme>,
    ) -> Result<Self> {
        if files.gguf.is_none() && is_phi3_small(&read_json(&files.config)?) {
            let model = Phi3Small::from_checkpoint_quantized(files, dtype, device, quantize)?;
            return Ok(Self::Phi3Small(model));
        }
        Ok(Self::Phi3(Phi3::from_checkpoint_quantized(files, dtype, device, quantize)?))
    }

    /// Loads a `phi3` GGUF file.
    pub fn from_gguf(file: &GgufFile, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::Phi3(Phi3::from_gguf(file, dtype, device)?))
    }

    /// The architecture's name as `config.json` writes it.
    pub fn architecture(&self) -> &'static str {
        match self {
            Self::Phi3(_) => "Phi3ForCausalLM",
            Self::Phi3Small(_) => "Phi3SmallForCausalLM",
        }
    }

    /// Parameters in the checkpoint.
    pub fn num_parameters(&self) -> usize {
        match self {
            Self::Phi3(m) => m.config().num_parameters(),
            Self::Phi3Small(m) => m.small_config().num_parameters(),
        }
    }

    /// Ids the model itself never predicts (their logits are `-inf`): Phi-3-small's dummy and
    /// fill-in-the-middle tokens; none for Phi-3.
    pub fn masked_token_ids(&self) -> &[u32] {
        match self {
            Self::Phi3(_) => &[],
            Self::Phi3Small(m) => &m.small_config().masked_token_ids,
        }
    }

    /// The shape every architecture shares (context, vocabulary, heads, stop ids).
    pub fn config(&self) -> &Phi3Config {
        each!(self, m => m.config())
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        each!(self, m => m.device())
    }

    /// The activation dtype.
    pub fn dtype(&self) -> DType {
        each!(self, m => m.dtype())
    }

    /// The block format of the quantized matrices, or `None` when the model runs dense.
    pub fn quantization(&self) -> Option<GgmlDType> {
        each!(self, m => m.quantization())
    }

    /// Chooses when LongRoPE switches to its long factors.
    pub fn set_long_rope_policy(&mut self, policy: LongRopePolicy) {
        each!(self, m => m.set_long_rope_policy(policy))
    }

    /// The shape of the keys and values this model caches.
    pub fn kv_geometry(&self) -> PoolGeometry {
        each!(self, m => m.kv_geometry())
    }

    /// Element type of the keys and values that pools made from now on hold.
    pub fn set_kv_cache_dtype(&self, dtype: DType) -> Result<()> {
        match self {
            Self::Phi3(m) => m.set_kv_cache_dtype(dtype),
            Self::Phi3Small(m) => m.pool().set_dtype(dtype),
        }
    }

    /// Makes a pool of `tokens` positions the one new caches draw on.
    pub fn set_kv_pool_tokens(&self, tokens: usize) -> Result<()> {
        match self {
            Self::Phi3(m) => m.set_kv_pool_tokens(tokens),
            Self::Phi3Small(m) => m.pool().set_tokens(tokens),
        }
    }

    /// Bytes of finished sequences' blocks that pools made from now on let their prefix cache
    /// keep.
    pub fn set_prefix_cache_bytes(&self, bytes: usize) {
        match self {
            Self::Phi3(m) => m.set_prefix_cache_bytes(bytes),
            Self::Phi3Small(m) => m.pool().set_prefix_cache_bytes(bytes),
        }
    }

    /// The pool new caches draw on.
    pub fn kv_pool(&self) -> Result<KvPool> {
        each!(self, m => m.kv_pool())
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> Result<SequenceCache> {
        each!(self, m => m.new_cache())
    }

    /// Runs every batch item's uncached tokens through the model and extends its cache.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<ForwardOutput> {
        each!(self, m => m.forward(items))
    }
}
