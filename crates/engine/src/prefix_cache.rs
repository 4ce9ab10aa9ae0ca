//! Reuse of computed prompt prefixes across requests.
//!
//! On a CPU, prefill is compute-bound (about a hundred tokens per second for a mid-size model),
//! so a conversation that is sent again with one more turn, or many requests that share a long
//! system prompt, would pay for the same keys and values again and again. When a sequence
//! finishes, its KV buffers move (without a copy) into this cache; a new sequence whose prompt
//! starts with the same tokens as an entry gets those keys and values copied into its own cache
//! and its prefill starts after them.
//!
//! Keys and values at position `p` depend only on the tokens `0..=p` and on the rotary factors
//! they were rotated with, so a reused prefix is exactly what the prompt would compute; an
//! entry remembers its LongRoPE factor set, and the forward pass re-encodes a sequence whose
//! factors differ (as it does for a sequence that crosses the original context). Entries are
//! evicted least recently used first, within a byte budget.

use candle_core::Tensor;

use crate::error::Result;
use crate::kv_cache::SequenceCache;
use crate::rope::RopeFactors;

/// Fewest tokens worth reusing: below this, copying is not worth the bookkeeping.
pub const MIN_REUSE_TOKENS: usize = 16;

/// One cached sequence: its tokens and per layer its key and value buffers
/// (`[n_kv_heads, capacity, head_dim]`, the first `tokens.len()` positions valid).
#[derive(Debug)]
struct Entry {
    tokens: Vec<u32>,
    layers: Vec<(Tensor, Tensor)>,
    factors: RopeFactors,
    bytes: usize,
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
    /// Bytes held.
    pub bytes: usize,
}

/// What a lookup found: the keys and values of the first `len` tokens, per layer.
#[derive(Debug, Clone)]
pub struct PrefixMatch {
    /// Tokens reused.
    pub len: usize,
    /// Per layer, views of the entry's buffers (`[n_kv_heads, len, head_dim]`).
    pub layers: Vec<(Tensor, Tensor)>,
    /// The factor set the keys were rotated with.
    pub factors: RopeFactors,
}

/// The cache: entries within a byte budget, least recently used evicted first.
#[derive(Debug)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    clock: u64,
    stats: PrefixCacheStats,
}

impl PrefixCache {
    /// A cache that holds at most `budget` bytes of keys and values.
    pub fn new(budget: usize) -> Self {
        PrefixCache { entries: Vec::new(), budget, clock: 0, stats: PrefixCacheStats::default() }
    }

    /// The counters.
    pub fn stats(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            entries: self.entries.len(),
            bytes: self.entries.iter().map(|e| e.bytes).sum(),
            ..self.stats
        }
    }

    /// The longest cached prefix of `prompt`, leaving at least its last token to compute (the
    /// next token's logits come from it); `None` when under [`MIN_REUSE_TOKENS`] would be reused.
    pub fn lookup(&mut self, prompt: &[u32]) -> Result<Option<PrefixMatch>> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .map(|e| {
                let common = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (common.min(limit), e)
            })
            .max_by_key(|(len, _)| *len);
        let Some((len, entry)) = best.filter(|(len, _)| *len >= MIN_REUSE_TOKENS) else {
            self.stats.misses += 1;
            return Ok(None);
        };
        self.clock += 1;
        entry.last_used = self.clock;
        let layers = entry
            .layers
            .iter()
            .map(|(k, v)| Ok((k.narrow(1, 0, len)?, v.narrow(1, 0, len)?)))
            .collect::<Result<Vec<_>>>()?;
        self.stats.hits += 1;
        self.stats.reused_tokens += len as u64;
        Ok(Some(PrefixMatch { len, layers, factors: entry.factors }))
    }

    /// Takes over the buffers of a finished sequence whose first `cache.len()` tokens are
    /// `tokens[..cache.len()]`. Entries that the new one extends are dropped; nothing is added
    /// when an entry already holds these tokens, or when the sequence alone is over the budget.
    pub fn insert(&mut self, tokens: &[u32], cache: &mut SequenceCache) {
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
        let bytes = cache.allocated_bytes();
        if bytes > self.budget {
            return;
        }
        let Some((layers, factors)) = cache.take_buffers() else { return };
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        while self.entries.iter().map(|e| e.bytes).sum::<usize>() + bytes > self.budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .expect("over budget with no entries means bytes > budget, handled above");
            self.entries.swap_remove(oldest);
        }
        self.entries.push(Entry {
            tokens: tokens.to_vec(),
            layers,
            factors,
            bytes,
            last_used: self.clock,
        });
    }
}
