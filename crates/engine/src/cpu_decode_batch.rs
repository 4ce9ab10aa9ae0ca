//! The decode queries of one layer that the CPU's paged kernel answers together, and the
//! assembly of a layer's per-item attention outputs: what every model's attention does around
//! its own projections.
//!
//! Exists so that the models share one way of choosing which items go to
//! [`decode_attention`] (a single query, a cache paged on the CPU, one pool for the whole call)
//! and of putting the answers back in batch order.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::kv_cache::SequenceCache;
use crate::kv_pool::KvPool;
use crate::paged_attention::{decode_attention, DecodeQuery, HeadKeys, Heads};

/// The items of a layer's batch whose attention the paged kernel computes in one call.
#[derive(Default)]
pub(crate) struct CpuDecodeBatch {
    /// The pool every taken item's cache draws on.
    pool: Option<KvPool>,
    /// Batch positions of the taken items.
    items: Vec<usize>,
    queries: Vec<DecodeQuery>,
}

impl CpuDecodeBatch {
    /// Takes item `i`'s query (`q_rows`, `[1, n_heads, head_dim]`) over its cached keys
    /// `first_key..end` when the kernel can answer it: one query, a cache paged on the CPU and
    /// the same pool as the items already taken. `false` leaves the item to the caller.
    pub(crate) fn offer(
        &mut self,
        i: usize,
        cache: &SequenceCache,
        q_rows: &Tensor,
        (first_key, end): (usize, usize),
        visible: Option<Arc<HeadKeys>>,
    ) -> Result<bool> {
        let same_pool = self.pool.as_ref().is_none_or(|p| p.same(cache.pool()));
        if q_rows.dim(0)? != 1 || !cache.is_paged_on_cpu() || !same_pool {
            return Ok(false);
        }
        self.pool.get_or_insert_with(|| cache.pool().clone());
        let q = q_rows.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.queries.push(DecodeQuery { q, slots: cache.slots(first_key, end), visible });
        self.items.push(i);
        Ok(true)
    }

    /// Runs the kernel on layer `layer` of the pool and puts each answer (`[1, n_heads *
    /// head_dim]`, in `dtype`) at its item's place in `outputs`.
    pub(crate) fn run(
        self,
        layer: usize,
        heads: Heads,
        dtype: DType,
        device: &Device,
        outputs: &mut [Option<Tensor>],
    ) -> Result<()> {
        let Some(pool) = self.pool else { return Ok(()) };
        let (pool_k, pool_v) = pool.layer(layer);
        let width = heads.n_heads * heads.head_dim;
        for (&i, out) in
            self.items.iter().zip(decode_attention(pool_k, pool_v, &self.queries, heads)?)
        {
            outputs[i] = Some(Tensor::from_vec(out, (1, width), device)?.to_dtype(dtype)?);
        }
        Ok(())
    }
}

/// The items' attention outputs (`[tokens, width]` each, every item answered), in batch order,
/// as one `[n_tokens, width]` tensor.
pub(crate) fn concat_outputs(outputs: Vec<Option<Tensor>>) -> Result<Tensor> {
    let mut outputs: Vec<Tensor> =
        outputs.into_iter().map(|o| o.expect("every item has its output")).collect();
    Ok(if outputs.len() == 1 {
        outputs.pop().expect("one output")
    } else {
        Tensor::cat(&outputs, 0)?
    })
}
