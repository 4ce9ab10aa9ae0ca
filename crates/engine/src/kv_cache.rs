//! Per-sequence view of the KV-cache pool: the table of blocks that hold one sequence's keys
//! and values (see [`crate::kv_pool`]), so a decode step appends one token's keys and values
//! instead of recomputing the prefix.
//!
//! Blocks come from the pool as the sequence grows ([`SequenceCache::reserve`]) and go back when
//! it is dropped, cleared or truncated. Sharing a prefix with another sequence
//! ([`SequenceCache::share`]) takes hold of its blocks without copying; the one block that
//! either side then writes into is copied first if someone else still holds it.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::kv_pool::{zeroed, BlockId, KvPool, BLOCK_SIZE};
use crate::kv_rows::{GatherSlots, SlotRows, WriteSlots};
use crate::rope::RopeFactors;

/// The cache of one sequence across all layers. Not `Clone`: two holders of a table would both
/// write into its last block.
#[derive(Debug)]
pub struct SequenceCache {
    pool: KvPool,
    /// `blocks[i]` holds positions `i * BLOCK_SIZE ..`; covers at least `len` positions.
    blocks: Vec<BlockId>,
    /// Tokens whose keys and values are cached.
    len: usize,
    /// The LongRoPE factor set the cached keys were rotated with.
    factors: RopeFactors,
}

impl Drop for SequenceCache {
    fn drop(&mut self) {
        self.release_from(0);
    }
}

impl SequenceCache {
    /// An empty cache drawing on `pool`.
    pub fn new(pool: KvPool) -> Self {
        Self { pool, blocks: Vec::new(), len: 0, factors: RopeFactors::Short }
    }

    /// The pool the blocks come from.
    pub fn pool(&self) -> &KvPool {
        &self.pool
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

    /// The block table.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Drops everything (its blocks go back to the pool), e.g. to re-encode a sequence with
    /// other rotary factors, or to give its memory to others (preemption).
    pub fn clear(&mut self, factors: RopeFactors) {
        self.release_from(0);
        self.len = 0;
        self.factors = factors;
    }

    /// Keeps only the first `len` tokens; whole blocks past them go back to the pool.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.release_from(self.len.div_ceil(BLOCK_SIZE));
    }

    fn release_from(&mut self, keep: usize) {
        if self.blocks.len() <= keep {
            return;
        }
        let mut state = self.pool.lock();
        for b in self.blocks.drain(keep..) {
            state.alloc.release(b);
        }
    }

    /// Bytes of the blocks this sequence holds (shared ones included).
    pub fn allocated_bytes(&self) -> usize {
        self.blocks.len() * self.pool.block_bytes()
    }

    /// Blocks that growing to `end` tokens would take from the pool: new ones, plus a copy of
    /// the block to be written into when another holder shares it.
    pub fn blocks_needed(&self, end: usize) -> usize {
        let new = end.div_ceil(BLOCK_SIZE).saturating_sub(self.blocks.len());
        let state = self.pool.lock();
        let first = self.len / BLOCK_SIZE;
        let copies = (end > self.len)
            .then(|| self.blocks.get(first))
            .flatten()
            .is_some_and(|&b| state.alloc.holders(b) > 1);
        new + usize::from(copies)
    }

    /// Makes room for positions `len..end`: takes new blocks from the pool, and copies the
    /// block that position `len` falls in when another holder shares it. Fails with
    /// [`EngineError::KvCacheFull`] (nothing lost: blocks taken so far stay with the sequence)
    /// when the pool has too few blocks.
    pub fn reserve(&mut self, end: usize) -> Result<()> {
        if end <= self.len {
            return Ok(());
        }
        let first = self.len / BLOCK_SIZE;
        if let Some(&shared) = self.blocks.get(first) {
            let mut state = self.pool.lock();
            if state.alloc.holders(shared) > 1 {
                let own = state.allocate();
                drop(state);
                let Some(own) = own else { return Err(self.full(end)) };
                self.pool.copy_block(shared, own, self.len - first * BLOCK_SIZE)?;
                self.pool.lock().alloc.release(shared);
                self.blocks[first] = own;
            }
        }
        let wanted = end.div_ceil(BLOCK_SIZE);
        if self.blocks.len() < wanted {
            let mut state = self.pool.lock();
            while self.blocks.len() < wanted {
                match state.allocate() {
                    Some(b) => self.blocks.push(b),
                    None => {
                        drop(state);
                        return Err(self.full(end));
                    }
                }
            }
        }
        Ok(())
    }

    fn full(&self, end: usize) -> EngineError {
        let stats = self.pool.stats();
        EngineError::KvCacheFull {
            needed: end.div_ceil(BLOCK_SIZE).saturating_sub(self.blocks.len()).max(1),
            available: stats.available_blocks(),
        }
    }

    /// Pool slots of positions `first..end` (`block * BLOCK_SIZE + offset`), in order.
    pub fn slots(&self, first: usize, end: usize) -> Vec<u32> {
        (first..end)
            .map(|p| self.blocks[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32)
            .collect()
    }

    /// Writes the keys and values of positions `len..len + n` of `layer` (`k`, `v`: `[n,
    /// n_kv_heads, head_dim]`, contiguous, in any of the cache's element types) into their
    /// blocks, which [`Self::reserve`] made room for. Call [`Self::advance`] once all layers
    /// have written.
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(0)?;
        let end = self.len + n;
        if end.div_ceil(BLOCK_SIZE) > self.blocks.len() {
            return Err(EngineError::InvalidRequest(format!(
                "KV cache write past the reserved blocks ({end} positions)"
            )));
        }
        let (pk, pv) = self.pool.layer(layer);
        let (nkv, hd) = (self.pool.n_kv_heads(), self.pool.head_dim());
        if pk.device().is_cpu() {
            let slots = self.slots(self.len, end);
            let op = WriteSlots(SlotRows { slots: &slots, n_kv_heads: nkv, head_dim: hd });
            pk.inplace_op2(&k.contiguous()?, &op)?;
            pv.inplace_op2(&v.contiguous()?, &op)?;
            return Ok(());
        }
        self.write_by_runs(pk, pv, k, v)
    }

    /// [`Self::write`] with candle's own copies (the GPU's way; on the CPU only in tests): one
    /// per run of positions within a block, each head's rows of the run together.
    fn write_by_runs(&self, pk: &Tensor, pv: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let end = self.len + k.dim(0)?;
        let (k, v) = (k.to_dtype(pk.dtype())?, v.to_dtype(pv.dtype())?);
        let mut p = self.len;
        while p < end {
            let run = (BLOCK_SIZE - p % BLOCK_SIZE).min(end - p);
            let block = self.blocks[p / BLOCK_SIZE] as usize;
            let rows = p - self.len;
            for (pool, src) in [(pk, &k), (pv, &v)] {
                let src = src.narrow(0, rows, run)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
                pool.narrow(0, block, 1)?.slice_set(&src, 2, p % BLOCK_SIZE)?;
            }
            p += run;
        }
        Ok(())
    }

    /// The keys and values of positions `first..end` of `layer` as contiguous `[n_kv_heads,
    /// end - first, head_dim]` tensors of `dtype` (copies gathered from the blocks).
    pub fn gather(
        &self,
        layer: usize,
        first: usize,
        end: usize,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let (pk, pv) = self.pool.layer(layer);
        let (nkv, hd) = (self.pool.n_kv_heads(), self.pool.head_dim());
        if pk.device().is_cpu() {
            let slots = self.slots(first, end);
            let op = GatherSlots(SlotRows { slots: &slots, n_kv_heads: nkv, head_dim: hd });
            let gather = |pool: &Tensor| -> Result<Tensor> {
                let out = zeroed((nkv, slots.len(), hd), dtype, pk.device())?;
                out.inplace_op2(pool, &op)?;
                Ok(out)
            };
            return Ok((gather(pk)?, gather(pv)?));
        }
        self.gather_by_blocks(pk, pv, first, end, dtype)
    }

    /// [`Self::gather`] with candle's own ops (the GPU's way; on the CPU only in tests): the
    /// whole blocks the range touches, heads first, then the range's part of them.
    fn gather_by_blocks(
        &self,
        pk: &Tensor,
        pv: &Tensor,
        first: usize,
        end: usize,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let (nkv, hd) = (self.pool.n_kv_heads(), self.pool.head_dim());
        let (b0, b1) = (first / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        let ids = Tensor::new(&self.blocks[b0..b1], pk.device())?;
        let gather = |pool: &Tensor| -> Result<Tensor> {
            let blocks = pool.index_select(&ids, 0)?.transpose(0, 1)?.contiguous()?;
            let rows = blocks.reshape((nkv, (b1 - b0) * BLOCK_SIZE, hd))?;
            Ok(rows
                .narrow(1, first - b0 * BLOCK_SIZE, end - first)?
                .contiguous()?
                .to_dtype(dtype)?)
        };
        Ok((gather(pk)?, gather(pv)?))
    }

    /// A new cache holding the first `len` positions of this one (its blocks shared, not
    /// copied), rotated with the same factors; `None` when fewer are cached.
    pub fn share(&self, len: usize) -> Option<SequenceCache> {
        if len == 0 || len > self.len {
            return None;
        }
        let blocks = self.blocks[..len.div_ceil(BLOCK_SIZE)].to_vec();
        let mut state = self.pool.lock();
        for &b in &blocks {
            state.alloc.retain(b);
        }
        drop(state);
        Some(SequenceCache { pool: self.pool.clone(), blocks, len, factors: self.factors })
    }

    /// A cache over blocks that a prefix-cache entry holds (one more holder each), `len`
    /// positions valid.
    pub(crate) fn adopt(
        pool: KvPool,
        blocks: Vec<BlockId>,
        len: usize,
        factors: RopeFactors,
    ) -> SequenceCache {
        SequenceCache { pool, blocks, len, factors }
    }

    /// Records that `n_new` tokens were written to every layer.
    pub fn advance(&mut self, n_new: usize) {
        self.len += n_new;
    }

    /// Whether the cache lives on the CPU in a type the paged decode kernel reads (`f32`,
    /// `f16` or `bf16`).
    pub fn is_paged_on_cpu(&self) -> bool {
        let (k, _) = self.pool.layer(0);
        matches!(k.device(), Device::Cpu)
            && matches!(k.dtype(), DType::F32 | DType::F16 | DType::BF16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_pool::PoolGeometry;

    fn pool(blocks: usize) -> KvPool {
        let g = PoolGeometry { num_layers: 1, n_kv_heads: 1, head_dim: 2, dtype: DType::F32 };
        KvPool::new(g, blocks * BLOCK_SIZE, 0, &Device::Cpu).unwrap()
    }

    /// Rows `[n, 1, 2]` whose values name their position: `(p, -p)`.
    fn rows(from: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (from..from + n).flat_map(|p| [p as f32, -(p as f32)]).collect();
        Tensor::from_vec(v, (n, 1, 2), &Device::Cpu).unwrap()
    }

    fn append(c: &mut SequenceCache, n: usize) {
        c.reserve(c.len() + n).unwrap();
        let r = rows(c.len(), n);
        c.write(0, &r, &r).unwrap();
        c.advance(n);
    }

    fn keys(c: &SequenceCache) -> Vec<f32> {
        let (k, _) = c.gather(0, 0, c.len(), DType::F32).unwrap();
        k.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn expected(n: usize) -> Vec<f32> {
        (0..n).flat_map(|p| [p as f32, -(p as f32)]).collect()
    }

    #[test]
    fn appends_span_blocks_and_gather_in_order() {
        let p = pool(4);
        let mut c = SequenceCache::new(p.clone());
        append(&mut c, 5);
        append(&mut c, 20);
        append(&mut c, 1);
        assert_eq!(c.blocks().len(), 2);
        assert_eq!(keys(&c), expected(26));
        assert_eq!(p.stats().free_blocks, 2);
        c.truncate(10);
        assert_eq!(c.blocks().len(), 1);
        assert_eq!(keys(&c), expected(10));
        drop(c);
        assert_eq!(p.stats().free_blocks, 4, "a dropped cache gives its blocks back");
    }

    #[test]
    fn a_shared_prefix_is_copied_only_where_written() {
        let p = pool(8);
        let mut a = SequenceCache::new(p.clone());
        append(&mut a, 20); // blocks 0 (full) and 1 (4 slots)
        let mut b = a.share(18).unwrap();
        assert_eq!(b.blocks(), a.blocks());
        assert_eq!(p.stats().free_blocks, 6, "sharing copies nothing");
        assert_eq!(b.blocks_needed(19), 1, "b must copy the shared block it writes into");
        // b writes its own position 18: block 1 is copied first, a's slots 18, 19 survive.
        b.reserve(19).unwrap();
        let own = Tensor::from_vec(vec![100f32, 100.0], (1, 1, 2), &Device::Cpu).unwrap();
        b.write(0, &own, &own).unwrap();
        b.advance(1);
        assert_eq!(b.blocks()[0], a.blocks()[0], "the full block stays shared");
        assert_ne!(b.blocks()[1], a.blocks()[1]);
        assert_eq!(keys(&a), expected(20));
        let mut want = expected(18);
        want.extend([100.0, 100.0]);
        assert_eq!(keys(&b), want);
        // a now holds block 1 alone and writes in place.
        assert_eq!(a.blocks_needed(21), 0);
        drop(a);
        drop(b);
        assert_eq!(p.stats().free_blocks, 8);
    }

    #[test]
    fn an_exhausted_pool_is_reported_not_overrun() {
        let p = pool(2);
        let mut a = SequenceCache::new(p.clone());
        append(&mut a, 20);
        let mut b = SequenceCache::new(p.clone());
        match b.reserve(1) {
            Err(EngineError::KvCacheFull { needed: 1, available: 0 }) => {}
            other => panic!("expected KvCacheFull, got {other:?}"),
        }
        drop(a);
        append(&mut b, 1);
        assert_eq!(keys(&b), expected(1));
    }

    /// A half-precision pool with several heads: rows written in `f32` come back from a gather
    /// (as `f32`, and as `f16`) rounded to `f16`, each head's positions in order, across a
    /// block boundary and a write that starts mid-block.
    #[test]
    fn a_half_precision_pool_holds_rows_per_head() {
        let g = PoolGeometry { num_layers: 2, n_kv_heads: 3, head_dim: 4, dtype: DType::F16 };
        let p = KvPool::new(g, 4 * BLOCK_SIZE, 0, &Device::Cpu).unwrap();
        let mut c = SequenceCache::new(p.clone());
        let all = Tensor::randn(0f32, 1.0, (21, 3, 4), &Device::Cpu).unwrap();
        for (from, n) in [(0, 5), (5, 13), (18, 3)] {
            c.reserve(from + n).unwrap();
            let rows = all.narrow(0, from, n).unwrap();
            c.write(1, &rows, &(&rows * 2.0).unwrap()).unwrap();
            c.advance(n);
        }
        let want = all.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
        let want = want.narrow(0, 2, 17).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
        let (k, v) = c.gather(1, 2, 19, DType::F32).unwrap();
        assert_eq!(k.dims(), &[3, 17, 4]);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&k), flat(&want));
        assert_eq!(flat(&v), flat(&(&want * 2.0).unwrap()));
        let (k16, _) = c.gather(1, 2, 19, DType::F16).unwrap();
        assert_eq!(flat(&k16.to_dtype(DType::F32).unwrap()), flat(&want));
        let (other, _) = c.gather(0, 0, 21, DType::F32).unwrap();
        assert_eq!(other.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    /// The GPU's write and gather (candle's copies by block run) agree with the CPU's, so the
    /// path this machine cannot run is still checked here.
    #[test]
    fn the_device_path_matches_the_cpu_path() {
        let g = PoolGeometry { num_layers: 1, n_kv_heads: 2, head_dim: 8, dtype: DType::F16 };
        let a = KvPool::new(g, 4 * BLOCK_SIZE, 0, &Device::Cpu).unwrap();
        let b = KvPool::new(g, 4 * BLOCK_SIZE, 0, &Device::Cpu).unwrap();
        let (mut ca, mut cb) = (SequenceCache::new(a.clone()), SequenceCache::new(b.clone()));
        let all = Tensor::randn(0f32, 1.0, (40, 2, 8), &Device::Cpu).unwrap();
        for (from, n) in [(0, 7), (7, 20), (27, 1), (28, 12)] {
            let rows = all.narrow(0, from, n).unwrap();
            ca.reserve(from + n).unwrap();
            cb.reserve(from + n).unwrap();
            ca.write(0, &rows, &rows).unwrap();
            let (pk, pv) = b.layer(0);
            cb.write_by_runs(pk, pv, &rows, &rows).unwrap();
            ca.advance(n);
            cb.advance(n);
        }
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap();
        assert_eq!(flat(&a.layer(0).0), flat(&b.layer(0).0), "the pools hold the same");
        let (pk, pv) = b.layer(0);
        for (first, end) in [(0, 40), (3, 17), (16, 32), (20, 21)] {
            let (k1, _) = ca.gather(0, first, end, DType::F32).unwrap();
            let (k2, _) = cb.gather_by_blocks(pk, pv, first, end, DType::F32).unwrap();
            assert_eq!(k1.dims(), k2.dims());
            let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(f(&k1), f(&k2), "positions {first}..{end}");
        }
    }
}
