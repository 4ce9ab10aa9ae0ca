//! The KV-cache pool: every layer's keys and values for all sequences live in one preallocated
//! buffer per layer, cut into fixed-size blocks of [`BLOCK_SIZE`] token positions.
//!
//! Exists so that a server's memory for keys and values is fixed at start-up (no sequence can
//! grow the process past it, and no fragmentation builds up as sequences of different lengths
//! come and go), and so that sequences can share the blocks of a common prefix instead of
//! copying or recomputing it. A sequence holds a table of block ids (see
//! [`crate::kv_cache::SequenceCache`]); position `p` of the sequence lives in slot `p %
//! BLOCK_SIZE` of block `table[p / BLOCK_SIZE]`. Blocks are reference-counted: the sequences and
//! [`crate::prefix_cache`] entries that hold a block each count once, and a holder that must
//! write into a block someone else also holds copies it first (copy on write).
//!
//! A layer's buffer is `[num_blocks, n_kv_heads, BLOCK_SIZE, head_dim]`: within a block, each
//! head's keys for the block's positions lie next to each other, so decode attention, which
//! reads one head's keys for every position in turn, reads whole runs of memory (with the
//! heads innermost it would jump the width of all heads between two keys, on a new page each
//! time).
//!
//! On the CPU the buffers are allocated zeroed, which the OS hands out lazily, so a pool sized
//! for the whole memory budget only takes memory as its blocks are first written; free blocks
//! are handed out lowest id first to keep the used part compact.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{EngineError, Result};
use crate::huge_pages::huge_pages;
use crate::prefix_cache::PrefixCache;

/// Token positions per block.
pub const BLOCK_SIZE: usize = 16;

/// The index of a block in the pool.
pub type BlockId = u32;

/// Where the `head_dim` values of `head` at pool slot `slot` (`block * BLOCK_SIZE + offset`)
/// start in a layer's buffer, in elements.
#[inline]
pub fn slot_offset(slot: u32, head: usize, n_kv_heads: usize, head_dim: usize) -> usize {
    let (block, offset) = (slot as usize / BLOCK_SIZE, slot as usize % BLOCK_SIZE);
    ((block * n_kv_heads + head) * BLOCK_SIZE + offset) * head_dim
}

/// Counters of the pool, for metrics and admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks no one holds.
    pub free_blocks: usize,
    /// Blocks held only by prefix-cache entries: free for the taking, as the entries are
    /// evicted when blocks run out.
    pub cached_blocks: usize,
}

impl PoolStats {
    /// Blocks a new sequence can get: the free ones and those the prefix cache would give up.
    pub fn available_blocks(&self) -> usize {
        self.free_blocks + self.cached_blocks
    }

    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.total_blocks - self.available_blocks()
    }
}

/// Reference counts and the free list.
#[derive(Debug)]
pub(crate) struct BlockAllocator {
    free: BTreeSet<BlockId>,
    /// Holders of each block (sequences and prefix-cache entries).
    refs: Vec<u32>,
    /// How many of a block's holders are prefix-cache entries.
    cached_refs: Vec<u32>,
    /// Blocks whose every holder is a prefix-cache entry.
    only_cached: usize,
}

impl BlockAllocator {
    fn new(num_blocks: usize) -> Self {
        BlockAllocator {
            free: (0..num_blocks as BlockId).collect(),
            refs: vec![0; num_blocks],
            cached_refs: vec![0; num_blocks],
            only_cached: 0,
        }
    }

    fn is_only_cached(&self, b: BlockId) -> bool {
        let b = b as usize;
        self.refs[b] > 0 && self.refs[b] == self.cached_refs[b]
    }

    /// Changes block `b`'s counts, keeping `only_cached` and the free list in step.
    fn adjust(&mut self, b: BlockId, refs: i32, cached: i32) {
        let before = self.is_only_cached(b);
        let i = b as usize;
        self.refs[i] = self.refs[i].checked_add_signed(refs).expect("block reference count");
        self.cached_refs[i] =
            self.cached_refs[i].checked_add_signed(cached).expect("block cache count");
        let after = self.is_only_cached(b);
        match (before, after) {
            (false, true) => self.only_cached += 1,
            (true, false) => self.only_cached -= 1,
            _ => {}
        }
        if self.refs[i] == 0 {
            self.free.insert(b);
        }
    }

    /// A free block with one holder, or `None` when none is free.
    fn take_free(&mut self) -> Option<BlockId> {
        let b = self.free.pop_first()?;
        self.adjust(b, 1, 0);
        Some(b)
    }

    /// One more sequence holds `b`.
    pub(crate) fn retain(&mut self, b: BlockId) {
        self.adjust(b, 1, 0);
    }

    /// A sequence lets go of `b`.
    pub(crate) fn release(&mut self, b: BlockId) {
        self.adjust(b, -1, 0);
    }

    /// A prefix-cache entry takes hold of `b`.
    pub(crate) fn retain_cached(&mut self, b: BlockId) {
        self.adjust(b, 1, 1);
    }

    /// A prefix-cache entry lets go of `b`.
    pub(crate) fn release_cached(&mut self, b: BlockId) {
        self.adjust(b, -1, -1);
    }

    /// Holders of `b`.
    pub(crate) fn holders(&self, b: BlockId) -> u32 {
        self.refs[b as usize]
    }
}

/// What the pool's lock guards: the allocator and the prefix cache, whose entries hold blocks
/// and are evicted when the allocator runs dry.
#[derive(Debug)]
pub(crate) struct PoolState {
    pub(crate) alloc: BlockAllocator,
    pub(crate) prefix: Option<PrefixCache>,
}

impl PoolState {
    /// A block for a sequence: a free one, else one given up by evicting prefix-cache entries
    /// (least recently used first); `None` when every block is held by sequences.
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        loop {
            if let Some(b) = self.alloc.take_free() {
                return Some(b);
            }
            let prefix = self.prefix.as_mut()?;
            if !prefix.evict_oldest(&mut self.alloc) {
                return None;
            }
        }
    }

    fn stats(&self) -> PoolStats {
        PoolStats {
            total_blocks: self.alloc.refs.len(),
            free_blocks: self.alloc.free.len(),
            cached_blocks: self.alloc.only_cached,
        }
    }
}

#[derive(Debug)]
struct PoolShared {
    /// Per layer the keys and the values, `[num_blocks * BLOCK_SIZE, n_kv_heads, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    num_blocks: usize,
    n_kv_heads: usize,
    head_dim: usize,
    state: Mutex<PoolState>,
}

/// The pool; cheap to clone (every clone is the same pool).
#[derive(Debug, Clone)]
pub struct KvPool(Arc<PoolShared>);

/// The shape of the keys and values a pool holds.
#[derive(Debug, Clone, Copy)]
pub struct PoolGeometry {
    /// Layers of the model.
    pub num_layers: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Element type of the cache (the model's activation dtype).
    pub dtype: DType,
}

impl PoolGeometry {
    /// Bytes one token position takes across all layers, keys and values.
    pub fn bytes_per_token(&self) -> usize {
        self.num_layers * 2 * self.n_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

impl KvPool {
    /// A pool with room for at least `tokens` positions (rounded up to whole blocks), and a
    /// prefix cache that may keep up to `prefix_cache_bytes` of finished sequences' blocks
    /// (0 for none).
    pub fn new(
        geometry: PoolGeometry,
        tokens: usize,
        prefix_cache_bytes: usize,
        device: &Device,
    ) -> Result<Self> {
        let num_blocks = tokens.div_ceil(BLOCK_SIZE).max(1);
        if num_blocks > BlockId::MAX as usize {
            return Err(EngineError::InvalidRequest(format!(
                "a KV cache of {tokens} tokens has more blocks than the pool can number"
            )));
        }
        let PoolGeometry { num_layers, n_kv_heads, head_dim, dtype } = geometry;
        let shape = (num_blocks, n_kv_heads, BLOCK_SIZE, head_dim);
        let layers = (0..num_layers)
            .map(|_| Ok((zeroed(shape, dtype, device)?, zeroed(shape, dtype, device)?)))
            .collect::<Result<Vec<_>>>()?;
        let block_bytes = geometry.bytes_per_token() * BLOCK_SIZE;
        let prefix = (prefix_cache_bytes > 0).then(|| {
            PrefixCache::new((prefix_cache_bytes / block_bytes.max(1)).max(1), block_bytes)
        });
        let state = Mutex::new(PoolState { alloc: BlockAllocator::new(num_blocks), prefix });
        Ok(KvPool(Arc::new(PoolShared { layers, num_blocks, n_kv_heads, head_dim, state })))
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.0.num_blocks
    }

    /// Token positions the pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.0.num_blocks * BLOCK_SIZE
    }

    /// Bytes of one block across all layers.
    pub fn block_bytes(&self) -> usize {
        let (k, _) = &self.0.layers[0];
        2 * self.0.layers.len()
            * BLOCK_SIZE
            * self.0.n_kv_heads
            * self.0.head_dim
            * k.dtype().size_in_bytes()
    }

    /// Key/value heads per layer.
    pub fn n_kv_heads(&self) -> usize {
        self.0.n_kv_heads
    }

    /// Values per head.
    pub fn head_dim(&self) -> usize {
        self.0.head_dim
    }

    /// Layer `layer`'s key and value buffers, `[num_blocks, n_kv_heads, BLOCK_SIZE, head_dim]`.
    pub fn layer(&self, layer: usize) -> &(Tensor, Tensor) {
        &self.0.layers[layer]
    }

    /// Layers of the model.
    pub fn num_layers(&self) -> usize {
        self.0.layers.len()
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        self.lock().stats()
    }

    /// Whether `self` and `other` are the same pool.
    pub fn same(&self, other: &KvPool) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies the first `slots` positions of block `from` into block `to`, in every layer.
    pub(crate) fn copy_block(&self, from: BlockId, to: BlockId, slots: usize) -> Result<()> {
        if slots == 0 {
            return Ok(());
        }
        for (k, v) in &self.0.layers {
            for t in [k, v] {
                // A new tensor of just these rows (`copy` would clone the whole pool buffer).
                let rows = t.narrow(0, from as usize, 1)?.narrow(2, 0, slots)?;
                let src = rows.zeros_like()?.add(&rows)?;
                t.narrow(0, to as usize, 1)?.slice_set(&src, 2, 0)?;
            }
        }
        Ok(())
    }
}

/// A zero-filled tensor that, on the CPU, takes memory only as it is written: the allocation
/// is requested zeroed from the allocator (candle's own `zeros` writes the half-precision
/// types element by element, which commits every page at once).
pub(crate) fn zeroed<S: Into<Shape>>(shape: S, dtype: DType, device: &Device) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let n = shape.elem_count();
    if !device.is_cpu() {
        return Ok(Tensor::zeros(shape, dtype, device)?);
    }
    use half::vec::HalfBitsVecExt;
    let t = match dtype {
        DType::F32 => Tensor::from_vec(huge_pages(vec![0f32; n]), shape, device)?,
        DType::BF16 => {
            let v = huge_pages(vec![0u16; n]);
            Tensor::from_vec(v.reinterpret_into::<half::bf16>(), shape, device)?
        }
        DType::F16 => {
            let v = huge_pages(vec![0u16; n]);
            Tensor::from_vec(v.reinterpret_into::<half::f16>(), shape, device)?
        }
        other => Tensor::zeros(shape, other, device)?,
    };
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(tokens: usize, prefix_bytes: usize) -> KvPool {
        let g = PoolGeometry { num_layers: 2, n_kv_heads: 2, head_dim: 4, dtype: DType::F32 };
        KvPool::new(g, tokens, prefix_bytes, &Device::Cpu).unwrap()
    }

    #[test]
    fn blocks_are_counted_and_handed_out_lowest_first() {
        let p = pool(4 * BLOCK_SIZE, 0);
        assert_eq!(p.num_blocks(), 4);
        assert_eq!(p.block_bytes(), 2 * 2 * BLOCK_SIZE * 2 * 4 * 4);
        let mut s = p.lock();
        let a = s.allocate().unwrap();
        let b = s.allocate().unwrap();
        assert_eq!((a, b), (0, 1));
        s.alloc.retain(a);
        s.alloc.release(a);
        assert_eq!(s.alloc.holders(a), 1);
        s.alloc.release(a);
        assert_eq!(s.stats().free_blocks, 3);
        assert_eq!(s.allocate(), Some(0), "a released block is reused first");
        assert!(s.allocate().is_some() && s.allocate().is_some());
        assert_eq!(s.allocate(), None, "all four are held");
    }

    #[test]
    fn blocks_held_only_by_the_cache_count_as_available() {
        let p = pool(2 * BLOCK_SIZE, 0);
        let mut s = p.lock();
        let a = s.allocate().unwrap();
        s.alloc.retain_cached(a);
        assert_eq!(s.stats().cached_blocks, 0, "a sequence still holds it");
        s.alloc.release(a);
        let stats = s.stats();
        assert_eq!((stats.free_blocks, stats.cached_blocks, stats.used_blocks()), (1, 1, 0));
        s.alloc.release_cached(a);
        assert_eq!(s.stats().free_blocks, 2);
    }

    #[test]
    fn a_block_is_copied_in_every_layer() {
        let p = pool(2 * BLOCK_SIZE, 0);
        let (k, v) = p.layer(1);
        // Block 0 filled with its element numbers; 3 of its 16 slots are copied.
        let n = 2 * BLOCK_SIZE * 4;
        let src = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        let src = src.reshape((1, 2, BLOCK_SIZE, 4)).unwrap();
        k.slice_set(&src, 0, 0).unwrap();
        v.slice_set(&(&src * 2.0).unwrap(), 0, 0).unwrap();
        p.copy_block(0, 1, 3).unwrap();
        let slots = |t: &Tensor, b: usize| {
            let t = t.narrow(0, b, 1).unwrap().narrow(2, 0, 3).unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(slots(k, 1), slots(k, 0));
        assert_eq!(slots(v, 1), slots(v, 0));
        let rest = k.narrow(0, 1, 1).unwrap().narrow(2, 3, BLOCK_SIZE - 3).unwrap();
        assert_eq!(rest.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let first = slot_offset(BLOCK_SIZE as u32 + 2, 1, 2, 4);
        assert_eq!(first, ((2 + 1) * BLOCK_SIZE + 2) * 4, "block 1, head 1, offset 2");
    }
}
