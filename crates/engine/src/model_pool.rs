//! The KV-cache pool a loaded model's sequences draw their caches from.
//!
//! Every architecture caches keys and values the same way (a [`KvPool`] of fixed-size blocks,
//! shaped by its layers, key/value heads and head size), and a server sizes that pool after the
//! model is loaded. This is that shared part: the pool's shape, the settings that apply to pools
//! made from now on (element type, prefix-cache budget), and the pool itself, made lazily with
//! [`default_pool_tokens`] when nobody sized it.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};
use crate::kv_cache::SequenceCache;
use crate::kv_pool::{KvPool, PoolGeometry};

/// The pool size (tokens) of a model whose user set none: room for four full-context sequences
/// (at least 4096 tokens), but at most 8 GiB (taken lazily on the CPU). A server sizes its pool
/// from its memory budget instead.
pub fn default_pool_tokens(context: usize, bytes_per_token: usize) -> usize {
    let cap = (8usize << 30) / bytes_per_token.max(1);
    (4 * context).max(4096).min(cap).max(context.min(cap))
}

/// A model's KV-cache pool and the settings new pools are made with. Clones share the pool.
#[derive(Debug, Clone)]
pub struct ModelPool {
    /// The cache's shape in the activation dtype (the element type may be overridden).
    geometry: PoolGeometry,
    /// The model's context, which sizes a default pool.
    context: usize,
    device: Device,
    slot: Arc<Mutex<PoolSlot>>,
}

/// The pool, once made, and the settings of pools made from now on.
#[derive(Debug, Default)]
struct PoolSlot {
    pool: Option<KvPool>,
    prefix_cache_bytes: usize,
    /// Element type of pools made from now on; `None` for the activation dtype.
    dtype: Option<DType>,
}

impl ModelPool {
    /// No pool yet, for a model of `num_layers` layers caching `n_kv_heads` heads of
    /// `head_dim` in `dtype` (its activation type) on `device`, with a context of `context`.
    pub fn new(
        num_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        context: usize,
        device: &Device,
    ) -> Self {
        Self {
            geometry: PoolGeometry { num_layers, n_kv_heads, head_dim, dtype },
            context,
            device: device.clone(),
            slot: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolSlot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn geometry_with(&self, kv_dtype: Option<DType>) -> PoolGeometry {
        PoolGeometry { dtype: kv_dtype.unwrap_or(self.geometry.dtype), ..self.geometry }
    }

    /// The shape of the keys and values the model caches.
    pub fn geometry(&self) -> PoolGeometry {
        self.geometry_with(self.lock().dtype)
    }

    /// Element type of the keys and values that pools made from now on hold: the activation
    /// dtype (the default, what the reference caches), or a narrower one to halve the bytes
    /// decode attention reads (`f16` for an `f32` model on the CPU). Only `f32`, `f16` and
    /// `bf16` are cache types.
    pub fn set_dtype(&self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(EngineError::InvalidRequest(format!(
                "{dtype:?} is not a KV cache type (f32, f16 or bf16)"
            )));
        }
        self.lock().dtype = Some(dtype);
        Ok(())
    }

    /// Makes a pool of `tokens` positions the one new caches draw on (caches made before keep
    /// theirs), with a prefix cache of [`Self::set_prefix_cache_bytes`]. The old pool, if no
    /// cache holds it, is freed first.
    pub fn set_tokens(&self, tokens: usize) -> Result<()> {
        let mut slot = self.lock();
        slot.pool = None;
        let geometry = self.geometry_with(slot.dtype);
        slot.pool = Some(KvPool::new(geometry, tokens, slot.prefix_cache_bytes, &self.device)?);
        Ok(())
    }

    /// Bytes of finished sequences' blocks that pools made from now on let their prefix cache
    /// keep (0, the default, for none).
    pub fn set_prefix_cache_bytes(&self, bytes: usize) {
        self.lock().prefix_cache_bytes = bytes;
    }

    /// The pool new caches draw on, made with [`default_pool_tokens`] if none was set.
    pub fn pool(&self) -> Result<KvPool> {
        let mut slot = self.lock();
        if let Some(pool) = slot.pool.as_ref() {
            return Ok(pool.clone());
        }
        let geometry = self.geometry_with(slot.dtype);
        let tokens = default_pool_tokens(self.context, geometry.bytes_per_token());
        let pool = KvPool::new(geometry, tokens, slot.prefix_cache_bytes, &self.device)?;
        slot.pool = Some(pool.clone());
        Ok(pool)
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> Result<SequenceCache> {
        Ok(SequenceCache::new(self.pool()?))
    }
}
