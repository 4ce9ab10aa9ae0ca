//! `config.json` of a Phi-3-small checkpoint (`Phi3SmallForCausalLM`, model_type `phi3small`).
//!
//! Phi-3-small names its fields differently from Phi-3-mini (`ff_intermediate_size`,
//! `layer_norm_epsilon`, `rope_embedding_base`) and adds its own: the muP multipliers, the GEGLU
//! limit and the block-sparse attention layout. The shared shape lands in a [`Phi3Config`] (so
//! the rotary tables, the KV pool and the engine read it as they read any Phi-3), the rest in
//! [`Phi3SmallConfig`]. The facts are in the team note `PHI3_SMALL.md`.

use std::ops::Range;
use std::path::Path;

use serde_json::Value;

use crate::config::{
    bad, get_f64, get_usize, is_phi3_small, read_json, req_usize, rope_scaling_of, token_ids,
    Phi3Config,
};
use crate::error::Result;

/// The block-sparse attention layout of the sparse layers.
///
/// A query in block `qb` (positions `qb * block_size ..`) sees key block `kb <= qb` when it is
/// one of the `local_blocks` most recent blocks, or when `(kb + head * head_step + 1)` is a
/// multiple of `vert_stride` (every `vert_stride`-th block, its phase shifted by the head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSparse {
    /// Tokens per block (64 in the published checkpoints).
    pub block_size: usize,
    /// Most recent blocks every head sees in full (16).
    pub local_blocks: usize,
    /// Beyond the local blocks, every `vert_stride`-th block is seen (8).
    pub vert_stride: usize,
    /// Phase shift per query head: 0 when every head has the same pattern
    /// (`blocksparse_homo_head_pattern`), else `max(1, vert_stride / n_heads)`.
    pub head_step: usize,
}

impl BlockSparse {
    /// Whether query head `head` at position `query` sees the key at position `key`
    /// (`key <= query` is the caller's causal rule).
    pub fn allows(&self, head: usize, query: usize, key: usize) -> bool {
        let (qb, kb) = (query / self.block_size, key / self.block_size);
        qb - kb < self.local_blocks
            || (kb + head * self.head_step + 1).is_multiple_of(self.vert_stride)
    }

    /// Whether every key of a query at `query` is seen by every head (its whole past lies in
    /// the local blocks).
    pub fn all_local(&self, query: usize) -> bool {
        query / self.block_size < self.local_blocks
    }

    /// The keys query head `head` at position `query` sees, causal rule included: runs of
    /// positions in increasing order, adjacent runs merged. What [`Self::allows`] says key by
    /// key, in a form attention can skip the rest with.
    pub fn visible_runs(&self, head: usize, query: usize) -> Vec<Range<usize>> {
        let bs = self.block_size;
        let first_local = (query / bs + 1).saturating_sub(self.local_blocks);
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut push = |r: Range<usize>| match runs.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => runs.push(r),
        };
        for kb in 0..first_local {
            if (kb + head * self.head_step + 1).is_multiple_of(self.vert_stride) {
                push(kb * bs..(kb + 1) * bs);
            }
        }
        push(first_local * bs..query + 1);
        runs
    }
}

/// The hyper-parameters of a `Phi3SmallForCausalLM` checkpoint, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Phi3SmallConfig {
    /// The shape every Phi-3 shares: `intermediate_size` is `ff_intermediate_size`,
    /// `rms_norm_eps` the LayerNorm epsilon, `rope_theta` `rope_embedding_base`; no sliding
    /// window; embeddings tied unless the config says otherwise.
    pub base: Phi3Config,
    /// Factor on the attention scores: `mup_attn_multiplier / head_dim` with muP scaling (not
    /// `1 / sqrt(head_dim)`).
    pub attention_scale: f64,
    /// The embeddings are multiplied by this (`mup_embedding_multiplier`, 10).
    pub embedding_multiplier: f64,
    /// The logits are divided by this (`mup_width_multiplier`, 8).
    pub width_multiplier: f64,
    /// GEGLU clamps its gate from above and its linear half on both sides to this (20).
    pub gegelu_limit: Option<f64>,
    /// The sparse layers' layout.
    pub block_sparse: BlockSparse,
    /// Every `dense_every`-th layer (1-based) attends densely; the others are block-sparse.
    pub dense_every: usize,
    /// Ids the model never predicts (dummy and fill-in-the-middle tokens): their logits are
    /// set to -inf, as the reference does.
    pub masked_token_ids: Vec<u32>,
}

impl Phi3SmallConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?, path)
    }

    /// Validates an already parsed `config.json`; `path` is only used in error messages.
    pub fn from_value(v: &Value, path: &Path) -> Result<Self> {
        if !is_phi3_small(v) {
            return Err(bad(path, "not a Phi3SmallForCausalLM config (model_type `phi3small`)"));
        }
        let hidden_size = req_usize(v, "hidden_size", path)?;
        let n_heads = req_usize(v, "num_attention_heads", path)?;
        let n_kv_heads = get_usize(v, "num_key_value_heads", path)?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(bad(
                path,
                format!(
                    "num_attention_heads ({n_heads}) must be a positive multiple of \
                     num_key_value_heads ({n_kv_heads})"
                ),
            ));
        }
        if hidden_size % n_heads != 0 {
            return Err(bad(
                path,
                format!("hidden_size ({hidden_size}) is not divisible by {n_heads} heads"),
            ));
        }
        let head_dim = hidden_size / n_heads;
        if !head_dim.is_multiple_of(2) {
            return Err(bad(path, format!("head size {head_dim} must be even for RoPE")));
        }
        let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("gegelu");
        if act != "gegelu" {
            return Err(bad(path, format!("hidden_act `{act}`: Phi-3-small uses gegelu")));
        }
        let position_scale = get_f64(v, "rope_position_scale", path)?.unwrap_or(1.0);
        if position_scale != 1.0 {
            return Err(bad(
                path,
                format!("rope_position_scale {position_scale} is not supported (only 1.0)"),
            ));
        }
        let max_position_embeddings = req_usize(v, "max_position_embeddings", path)?;
        let (original_max_position_embeddings, rope_scaling) =
            rope_scaling_of(v, path, head_dim, max_position_embeddings)?;
        let base = Phi3Config {
            vocab_size: req_usize(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: req_usize(v, "ff_intermediate_size", path)?,
            num_hidden_layers: req_usize(v, "num_hidden_layers", path)?,
            num_attention_heads: n_heads,
            num_key_value_heads: n_kv_heads,
            head_dim,
            rotary_dim: head_dim,
            rms_norm_eps: get_f64(v, "layer_norm_epsilon", path)?.unwrap_or(1e-5),
            rope_theta: get_f64(v, "rope_embedding_base", path)?.unwrap_or(1e6),
            rope_scaling,
            max_position_embeddings,
            original_max_position_embeddings,
            sliding_window: None,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
        };
        if base.vocab_size == 0 || base.num_hidden_layers == 0 || base.intermediate_size == 0 {
            return Err(bad(
                path,
                "vocab_size, num_hidden_layers and ff_intermediate_size must be positive",
            ));
        }
        let flag =
            |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);
        let attention_scale = if flag("mup_use_scaling", true) {
            get_f64(v, "mup_attn_multiplier", path)?.unwrap_or(1.0) / head_dim as f64
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        let block_size = get_usize(v, "blocksparse_block_size", path)?.unwrap_or(64);
        let local_blocks = get_usize(v, "blocksparse_num_local_blocks", path)?.unwrap_or(16);
        let vert_stride = get_usize(v, "blocksparse_vert_stride", path)?.unwrap_or(8);
        if block_size == 0 || local_blocks == 0 || vert_stride == 0 {
            return Err(bad(path, "the blocksparse_* sizes must be positive"));
        }
        let head_step = if flag("blocksparse_homo_head_pattern", false) {
            0
        } else {
            (vert_stride / n_heads).max(1)
        };
        let dense_every = get_usize(v, "dense_attention_every_n_layers", path)?.unwrap_or(2);
        if dense_every == 0 {
            return Err(bad(path, "dense_attention_every_n_layers must be positive"));
        }
        let masked_token_ids = match v.get("dummy_token_indices") {
            Some(Value::Array(ids)) => {
                ids.iter().filter_map(Value::as_u64).map(|i| i as u32).collect()
            }
            _ => default_masked_ids(base.vocab_size),
        };
        if let Some(&id) = masked_token_ids.iter().find(|&&i| i as usize >= base.vocab_size) {
            return Err(bad(path, format!("dummy token id {id} is outside the vocabulary")));
        }
        Ok(Self {
            base,
            attention_scale,
            embedding_multiplier: get_f64(v, "mup_embedding_multiplier", path)?.unwrap_or(10.0),
            width_multiplier: get_f64(v, "mup_width_multiplier", path)?.unwrap_or(8.0),
            gegelu_limit: get_f64(v, "gegelu_limit", path)?,
            block_sparse: BlockSparse { block_size, local_blocks, vert_stride, head_step },
            dense_every,
            masked_token_ids,
        })
    }

    /// Whether layer `layer` (0-based) attends block-sparsely: all but every
    /// `dense_every`-th layer, counting from 1 (so with the published 2, the even ones).
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.dense_every)
    }

    /// Parameters in the checkpoint (the tied embedding counted once).
    pub fn num_parameters(&self) -> usize {
        let c = &self.base;
        let h = c.hidden_size;
        let qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
        let ff = c.intermediate_size;
        let per_layer = (h + 1) * qkv_out + (h + 1) * h + (h + 1) * 2 * ff + (ff + 1) * h + 4 * h;
        let embed = c.vocab_size * h;
        let head = if c.tie_word_embeddings { 0 } else { embed };
        embed + head + 2 * h + c.num_hidden_layers * per_layer
    }
}

/// The ids Phi-3-small's reference masks when the config lists none: the cl100k slot that
/// holds no token (100256), the fill-in-the-middle and dummy tokens (100258-100260,
/// 100264-100265) and every id from 100267 on, leaving the text tokens, `<|endoftext|>`,
/// `<|system|>`, `<|user|>`, `<|assistant|>` and `<|end|>`.
fn default_masked_ids(vocab_size: usize) -> Vec<u32> {
    let mut ids = vec![100256, 100258, 100259, 100260, 100264, 100265];
    ids.extend(100267..vocab_size.max(100267) as u32);
    ids.retain(|&i| (i as usize) < vocab_size);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn published_8k() -> Value {
        json!({
            "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small",
            "blocksparse_block_size": 64, "blocksparse_homo_head_pattern": false,
            "blocksparse_num_local_blocks": 16, "blocksparse_triton_kernel_block_size": 64,
            "blocksparse_vert_stride": 8, "bos_token_id": 100257,
            "dense_attention_every_n_layers": 2, "eos_token_id": 100257,
            "ff_intermediate_size": 14336, "gegelu_limit": 20.0, "hidden_act": "gegelu",
            "hidden_size": 4096, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 8192,
            "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0,
            "mup_use_scaling": true, "mup_width_multiplier": 8.0, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "rope_embedding_base": 1000000,
            "rope_position_scale": 1.0, "vocab_size": 100352
        })
    }

    #[test]
    fn published_small_8k() {
        let c = Phi3SmallConfig::from_value(&published_8k(), Path::new("config.json")).unwrap();
        assert_eq!(
            (c.base.head_dim, c.base.group_size(), c.base.intermediate_size),
            (128, 4, 14336)
        );
        assert_eq!(c.attention_scale, 1.0 / 128.0);
        assert_eq!(
            c.block_sparse,
            BlockSparse { block_size: 64, local_blocks: 16, vert_stride: 8, head_step: 1 }
        );
        assert!(c.base.tie_word_embeddings && c.base.sliding_window.is_none());
        assert_eq!((c.base.rope_theta, c.base.rms_norm_eps), (1e6, 1e-5));
        // Even layers sparse, odd dense.
        assert!(c.is_sparse_layer(0) && !c.is_sparse_layer(1) && c.is_sparse_layer(30));
        // 6 + (100351 - 100267 + 1) = 91 masked ids; <|end|> and <|user|> stay.
        assert_eq!(c.masked_token_ids.len(), 91);
        assert!(!c.masked_token_ids.contains(&100266) && !c.masked_token_ids.contains(&100262));
        // Phi-3-small is a 7.4B model.
        assert_eq!(c.num_parameters() / 100_000_000, 73);
    }

    #[test]
    fn sparse_layout() {
        let b = BlockSparse { block_size: 64, local_blocks: 16, vert_stride: 8, head_step: 1 };
        // Within the last 16 blocks everything is seen.
        assert!(b.allows(5, 16 * 64 - 1, 0) && b.all_local(16 * 64 - 1) && !b.all_local(16 * 64));
        // Block 0 is 16 blocks behind block 16: head 7 sees it ((0 + 7 + 1) % 8 == 0), head 0
        // does not; head 0 sees block 7.
        assert!(
            b.allows(7, 16 * 64, 0) && !b.allows(0, 16 * 64, 0) && b.allows(0, 30 * 64, 7 * 64)
        );
    }

    /// `visible_runs` names exactly the causal keys `allows` allows, for layouts with and without
    /// a head phase, queries on and off block edges.
    #[test]
    fn visible_runs_are_what_allows_allows() {
        let layouts = [
            BlockSparse { block_size: 4, local_blocks: 2, vert_stride: 3, head_step: 1 },
            BlockSparse { block_size: 8, local_blocks: 1, vert_stride: 2, head_step: 0 },
            BlockSparse { block_size: 3, local_blocks: 4, vert_stride: 1, head_step: 2 },
        ];
        for b in layouts {
            for head in 0..5 {
                for query in 0..70 {
                    let want: Vec<usize> =
                        (0..=query).filter(|&k| b.allows(head, query, k)).collect();
                    let runs = b.visible_runs(head, query);
                    let got: Vec<usize> = runs.iter().flat_map(|r| r.clone()).collect();
                    assert_eq!(got, want, "{b:?} head {head} query {query}");
                    assert!(runs.windows(2).all(|w| w[0].end < w[1].start), "{runs:?}");
                }
            }
        }
    }

    #[test]
    fn errors_name_the_field() {
        let path = Path::new("config.json");
        let mut v = published_8k();
        v["hidden_act"] = json!("silu");
        assert!(Phi3SmallConfig::from_value(&v, path).unwrap_err().to_string().contains("gegelu"));
        let mut v = published_8k();
        v["rope_position_scale"] = json!(2.0);
        assert!(Phi3SmallConfig::from_value(&v, path)
            .unwrap_err()
            .to_string()
            .contains("rope_position_scale"));
        let mut v = published_8k();
        v["model_type"] = json!("phi3");
        v["architectures"] = json!(["Phi3ForCausalLM"]);
        assert!(Phi3SmallConfig::from_value(&v, path).is_err());
    }
}
