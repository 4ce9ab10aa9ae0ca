//! Reuse of computed prompt prefixes across requests.
//!
//! On a CPU, prefill is compute-bound (about a hundred tokens per second for a mid-size model),
//! so a conversation that is sent again with one more turn, or many requests that share a long
//! system prompt, would pay for the same keys and values again and again. When a sequence
//! finishes, this cache takes hold of its blocks of the KV pool (see [`crate::kv_pool`]; no
//! copy); a new sequence whose prompt starts with the same tokens as an entry shares those
//! blocks and its prefill starts after them.
//!
//! Keys and values at position `p` depend only on the tokens `0..=p` and on the rotary factors
//! they were rotated with, so a reused prefix is exactly what the prompt would compute; an
//! entry remembers its LongRoPE factor set, and the forward pass re-encodes a sequence whose
//! factors differ (as it does for a sequence that crosses the original context). Entries are
//! evicted least recently used first, within a budget of blocks, and whenever the pool runs
//! out of free blocks: cached prefixes never keep a running sequence from growing.

use crate::kv_cache::SequenceCache;
use crate::kv_pool::{BlockAllocator, BlockId, KvPool, BLOCK_SIZE};
use crate::rope::RopeFactors;

/// Fewest tokens worth reusing: below this, the bookkeeping is not worth it.
pub const MIN_REUSE_TOKENS: usize = 16;

/// One cached sequence: its tokens and the pool blocks that hold their keys and values.
#[derive(Debug)]
struct Entry {
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    factors: RopeFactors,
    last_used: u64,
}

/// Counters of the cache's use, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Lookups that reused a prefix.
    pub hits: u64,
    /// Lookups that found nothing to reuse.
    pub misses: u64,
    /// Prompt tokens whose keys and values were reused instead of computed.
    pub reused_tokens: u64,
    /// Entries held.
    pub entries: usize,
    /// Bytes of the blocks the entries hold (some may be shared with running sequences).
    pub bytes: usize,
}

/// The cache: entries within a budget of blocks, least recently used evicted first. It lives
/// in the pool's state, so every method gets the pool's allocator.
#[derive(Debug)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget_blocks: usize,
    block_bytes: usize,
    clock: u64,
    stats: PrefixCacheStats,
}

impl PrefixCache {
    /// A cache whose entries hold at most `budget_blocks` blocks of `block_bytes` each.
    pub fn new(budget_blocks: usize, block_bytes: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            budget_blocks,
            block_bytes,
            clock: 0,
            stats: PrefixCacheStats::default(),
        }
    }

    fn held_blocks(&self) -> usize {
        self.entries.iter().map(|e| e.blocks.len()).sum()
    }

    /// The counters.
    pub fn stats(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            entries: self.entries.len(),
            bytes: self.held_blocks() * self.block_bytes,
            ..self.stats
        }
    }

    /// A cache for a sequence starting with `tokens`, sharing the blocks of the longest cached
    /// prefix of them, leaving at least the last token to compute (the next token's logits come
    /// from it); `None` when under [`MIN_REUSE_TOKENS`] would be reused.
    pub(crate) fn lookup(
        &mut self,
        alloc: &mut BlockAllocator,
        pool: &KvPool,
        tokens: &[u32],
    ) -> Option<SequenceCache> {
        let limit = tokens.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .map(|e| {
                let common = e.tokens.iter().zip(tokens).take_while(|(a, b)| a == b).count();
                (common.min(limit), e)
            })
            .max_by_key(|(len, _)| *len);
        let Some((len, entry)) = best.filter(|(len, _)| *len >= MIN_REUSE_TOKENS) else {
            self.stats.misses += 1;
            return None;
        };
        self.clock += 1;
        entry.last_used = self.clock;
        let blocks = entry.blocks[..len.div_ceil(BLOCK_SIZE)].to_vec();
        for &b in &blocks {
            alloc.retain(b);
        }
        self.stats.hits += 1;
        self.stats.reused_tokens += len as u64;
        Some(SequenceCache::adopt(pool.clone(), blocks, len, entry.factors))
    }

    /// Takes hold of the blocks of a sequence whose first `cache.len()` tokens are
    /// `tokens[..cache.len()]`. Entries that the new one extends are dropped; nothing is added
    /// when an entry already holds these tokens, or when the sequence alone is over the budget.
    pub(crate) fn insert(
        &mut self,
        alloc: &mut BlockAllocator,
        tokens: &[u32],
        cache: &SequenceCache,
    ) {
        let len = cache.len().min(tokens.len());
        let tokens = &tokens[..len];
        if len < MIN_REUSE_TOKENS {
            return;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens.starts_with(tokens)) {
            e.last_used = self.clock;
            return;
        }
        let blocks = cache.blocks()[..len.div_ceil(BLOCK_SIZE)].to_vec();
        if blocks.len() > self.budget_blocks {
            return;
        }
        let (extended, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| tokens.starts_with(&e.tokens));
        self.entries = kept;
        extended.into_iter().for_each(|e| Self::release(alloc, e));
        while self.held_blocks() + blocks.len() > self.budget_blocks {
            if !self.evict_oldest(alloc) {
                break;
            }
        }
        for &b in &blocks {
            alloc.retain_cached(b);
        }
        let factors = cache.factors();
        self.entries.push(Entry {
            tokens: tokens.to_vec(),
            blocks,
            factors,
            last_used: self.clock,
        });
    }

    /// Drops the least recently used entry; `false` when there is none.
    pub(crate) fn evict_oldest(&mut self, alloc: &mut BlockAllocator) -> bool {
        let oldest = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used);
        let Some((i, _)) = oldest else { return false };
        let entry = self.entries.swap_remove(i);
        Self::release(alloc, entry);
        true
    }

    fn release(alloc: &mut BlockAllocator, entry: Entry) {
        for b in entry.blocks {
            alloc.release_cached(b);
        }
    }
}
