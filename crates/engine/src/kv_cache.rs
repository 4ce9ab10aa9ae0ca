//! Per-sequence key/value cache: one growable buffer per layer, so a decode step appends one
//! token's keys and values instead of recomputing the prefix.

use candle_core::Tensor;

use crate::error::Result;
use crate::rope::RopeFactors;

/// Keys and values of one layer, `[n_kv_heads, capacity, head_dim]`, filled up to `len`.
#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// The cache of one sequence across all layers. Not `Clone`: appends write into the buffers in
/// place, so two sequences must never share them.
#[derive(Debug)]
pub struct SequenceCache {
    layers: Vec<Option<LayerCache>>,
    /// Tokens whose keys and values are cached.
    len: usize,
    /// Tokens the buffers can hold before they grow.
    capacity: usize,
    /// Most tokens the buffers ever grow to (the sequence's prompt plus its most new tokens),
    /// so a sequence never holds more memory than the scheduler reserved for it.
    limit: usize,
    /// The LongRoPE factor set the cached keys were rotated with.
    factors: RopeFactors,
}

impl SequenceCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            capacity: 0,
            limit: usize::MAX,
            factors: RopeFactors::Short,
        }
    }

    /// Caps the buffers at `limit` tokens (rounded up to 16): growth by doubling stops there.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.next_multiple_of(16);
    }

    /// The capacity to grow to for `needed` tokens: double, within the limit.
    fn grown(&self, needed: usize) -> usize {
        let doubled = needed.max(self.capacity * 2).next_multiple_of(16);
        doubled.min(self.limit).max(needed)
    }

    /// Tokens whose keys and values are cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward pass (or after [`Self::clear`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The factor set of the cached keys.
    pub fn factors(&self) -> RopeFactors {
        self.factors
    }

    /// Drops everything, e.g. to re-encode a sequence with other rotary factors.
    pub fn clear(&mut self, factors: RopeFactors) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
        self.capacity = 0;
        self.factors = factors;
    }

    /// Keeps only the first `len` tokens (used when a speculative or re-encoded suffix is
    /// discarded).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the buffers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Appends `k`, `v` (`[n_kv_heads, n_new, head_dim]`, contiguous) to `layer` and returns the
    /// full keys and values `[n_kv_heads, len + n_new, head_dim]`. Call [`Self::advance`] once all
    /// layers have appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n_kv, n_new, hd) = k.dims3()?;
        let needed = self.len + n_new;
        if needed > self.capacity {
            // Double to keep appends amortised O(1); every layer grows to the same capacity.
            self.capacity = self.grown(needed);
        }
        let slot = &mut self.layers[layer];
        let must_grow = match slot {
            None => true,
            Some(l) => l.k.dim(1)? < needed,
        };
        if must_grow {
            let cap = self.capacity;
            let new_k = Tensor::zeros((n_kv, cap, hd), k.dtype(), k.device())?;
            let new_v = Tensor::zeros((n_kv, cap, hd), v.dtype(), v.device())?;
            if let Some(old) = slot.as_ref() {
                if self.len > 0 {
                    new_k.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    new_v.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            *slot = Some(LayerCache { k: new_k, v: new_v });
        }
        let l = slot.as_ref().expect("slot was just filled");
        l.k.slice_set(k, 1, self.len)?;
        l.v.slice_set(v, 1, self.len)?;
        Ok((l.k.narrow(1, 0, needed)?, l.v.narrow(1, 0, needed)?))
    }

    /// Gives up the buffers (per layer `[n_kv_heads, capacity, head_dim]` keys and values, the
    /// first [`len`](Self::len) positions valid) and the factor set, leaving the cache empty;
    /// `None` when some layer holds nothing.
    pub fn take_buffers(&mut self) -> Option<(Vec<(Tensor, Tensor)>, RopeFactors)> {
        if self.layers.iter().any(Option::is_none) || self.len == 0 {
            return None;
        }
        let factors = self.factors;
        let layers = self.layers.iter_mut().map(|l| l.take().expect("checked above"));
        let layers = layers.map(|l| (l.k, l.v)).collect();
        self.clear(factors);
        Some((layers, factors))
    }

    /// Views of the first `len` cached tokens' keys and values per layer (`[n_kv_heads, len,
    /// head_dim]`), to [`seed`](Self::seed) another cache with; `None` when fewer are cached.
    pub fn prefix_views(&self, len: usize) -> Result<Option<Vec<(Tensor, Tensor)>>> {
        if len > self.len || self.layers.iter().any(Option::is_none) {
            return Ok(None);
        }
        let views = self
            .layers
            .iter()
            .flatten()
            .map(|l| Ok((l.k.narrow(1, 0, len)?, l.v.narrow(1, 0, len)?)));
        Ok(Some(views.collect::<Result<Vec<_>>>()?))
    }

    /// Fills an empty cache with reused keys and values: per layer `[n_kv_heads, len,
    /// head_dim]` (any layout), rotated with `factors`. They are copied into buffers of this
    /// cache's own, with room to grow, since appends write in place.
    pub fn seed(&mut self, layers: &[(Tensor, Tensor)], factors: RopeFactors) -> Result<()> {
        let Some((k0, _)) = layers.first() else { return Ok(()) };
        if layers.len() != self.layers.len() {
            return Err(crate::error::EngineError::InvalidRequest(format!(
                "a reused prefix has {} layers, the model {}",
                layers.len(),
                self.layers.len()
            )));
        }
        let (n_kv, len, hd) = k0.dims3()?;
        // Room for as many new tokens as were reused, within the limit.
        let capacity = (2 * len).next_multiple_of(16).min(self.limit).max(len);
        for (slot, (k, v)) in self.layers.iter_mut().zip(layers) {
            // Contiguous buffers, as `append` writes into them with `slice_set`.
            let new_k = Tensor::zeros((n_kv, capacity, hd), k.dtype(), k.device())?;
            let new_v = Tensor::zeros((n_kv, capacity, hd), v.dtype(), v.device())?;
            new_k.slice_set(&k.contiguous()?, 1, 0)?;
            new_v.slice_set(&v.contiguous()?, 1, 0)?;
            *slot = Some(LayerCache { k: new_k, v: new_v });
        }
        self.len = len;
        self.capacity = capacity;
        self.factors = factors;
        Ok(())
    }

    /// Records that `n_new` tokens were appended to every layer.
    pub fn advance(&mut self, n_new: usize) {
        self.len += n_new;
    }
}
