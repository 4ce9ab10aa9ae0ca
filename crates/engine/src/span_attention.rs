//! Attention of one sequence's new queries over its gathered keys, with candle's products: the
//! general path every model shares (prompt chunks on the CPU, everything the GPU kernels do not
//! take).
//!
//! Exists to keep that path's memory bounded. A chunk of `l` queries over `n` keys has
//! `n_heads * l * n` scores: 256 MiB for a 512-token chunk of a 32-head model at 4k context,
//! 8 GiB at 128k, and as much again for the softmax and for a per-head mask. So the queries are taken in tiles whose scores stay
//! under [`TILE_SCORES`], and each tile reads only the keys its queries can see: none past its
//! last query (causal), none before its first query's sliding window. The causal masks are the
//! same in every layer and are built once per forward pass ([`SpanAttention::new`]); the
//! per-head masks of block-sparse layers are built one tile at a time, when the tile is used.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::paged_attention::{softmax_rows_parallel, Heads};
use crate::phi3_small_config::BlockSparse;

/// At most this many scores (`n_heads * tile rows * keys`) are held at once: 32 MiB in `f32`.
pub const TILE_SCORES: usize = 8 << 20;

/// One sequence's attention plan for a forward pass: its query tiles, with their keys and
/// causal masks.
#[derive(Debug)]
pub struct SpanAttention {
    /// Position of the first query.
    start: usize,
    /// Position of the first gathered key (keys before it are outside every window).
    first_key: usize,
    tiles: Vec<Tile>,
}

/// A run of consecutive queries taken together.
#[derive(Debug)]
struct Tile {
    /// Query rows, relative to the span.
    rows: Range<usize>,
    /// Positions of the keys any of them sees.
    keys: Range<usize>,
    /// Additive `[rows, keys]` causal (and window) mask; `None` when every query sees every
    /// key of the tile (a single query).
    causal: Option<Tensor>,
}

impl SpanAttention {
    /// The plan for queries at `span` over the keys from `first_key` to `span.end`, each query
    /// seeing its causal past limited to the `window` most recent positions (its own
    /// included). Masks are made in `dtype` on `device`.
    pub fn new(
        span: &Range<usize>,
        first_key: usize,
        window: Option<usize>,
        n_heads: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::with_budget(span, first_key, window, n_heads, TILE_SCORES, dtype, device)
    }

    /// [`Self::new`] with at most `tile_scores` scores per tile (at least one query a tile).
    pub fn with_budget(
        span: &Range<usize>,
        first_key: usize,
        window: Option<usize>,
        n_heads: usize,
        tile_scores: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let l = span.len();
        let n_keys = span.end - first_key;
        let rows_per_tile = (tile_scores / (n_heads * n_keys).max(1)).clamp(1, l.max(1));
        let mut tiles = Vec::with_capacity(l.div_ceil(rows_per_tile));
        for r0 in (0..l).step_by(rows_per_tile) {
            let rows = r0..(r0 + rows_per_tile).min(l);
            let (p0, p_end) = (span.start + rows.start, span.start + rows.end);
            let lo = window.map_or(first_key, |w| (p0 + 1).saturating_sub(w).max(first_key));
            let keys = lo..p_end;
            let causal = if rows.len() > 1 {
                let mut m = Vec::with_capacity(rows.len() * keys.len());
                for p in p0..p_end {
                    m.extend(keys.clone().map(|k| {
                        let visible = k <= p && window.is_none_or(|w| k + w > p);
                        if visible {
                            0f32
                        } else {
                            f32::NEG_INFINITY
                        }
                    }));
                }
                let m = Tensor::from_vec(m, (rows.len(), keys.len()), device)?;
                Some(m.to_dtype(dtype)?)
            } else {
                None
            };
            tiles.push(Tile { rows, keys, causal });
        }
        Ok(Self { start: span.start, first_key, tiles })
    }

    /// `softmax(q k^T * scale) v` of the queries `q` (`[l, n_heads, head_dim]`) over the keys
    /// and values `k`, `v` (`[n_kv_heads, n_keys, head_dim]`, from `first_key`), query head `j`
    /// using key/value head `j / (n_heads / n_kv_heads)`. With `sparse`, each head also sees
    /// only its blocks. Returns `[l, n_heads * head_dim]`: the products in `q`'s type, the
    /// softmax in `f32`.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: Heads,
        sparse: Option<&BlockSparse>,
    ) -> Result<Tensor> {
        let Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale } = heads;
        let group = nq / nkv;
        let mut outputs = Vec::with_capacity(self.tiles.len());
        for tile in &self.tiles {
            let t = tile.rows.len();
            let nk = tile.keys.len();
            let q_t = q.narrow(0, tile.rows.start, t)?;
            let p_end = self.start + tile.rows.end - 1;
            let sparse_tile = sparse.filter(|b| !b.all_local(p_end));
            if let (Some(layout), true) = (sparse_tile, q.device().is_cpu()) {
                outputs.push(self.sparse_tile(tile, &q_t, k, v, heads, layout)?);
                continue;
            }
            // Query head j uses kv head j / group: fold the group into the query rows.
            let q_g = q_t.transpose(0, 1)?.contiguous()?.reshape((nkv, group * t, hd))?;
            let from = tile.keys.start - self.first_key;
            let k_t = k.narrow(1, from, nk)?;
            let v_t = v.narrow(1, from, nk)?;
            let scores = (q_g.matmul(&k_t.transpose(1, 2)?)? * scale as f64)?; // [nkv, g*t, nk]
            let scores = match sparse_tile {
                Some(layout) => {
                    let m = self.sparse_mask(tile, layout, heads, scores.device())?;
                    scores.broadcast_add(&m.to_dtype(scores.dtype())?)?
                }
                None => match &tile.causal {
                    Some(mask) => scores
                        .reshape((nkv, group, t, nk))?
                        .broadcast_add(mask)?
                        .reshape((nkv, group * t, nk))?,
                    None => scores,
                },
            };
            let out = softmax_f32(&scores)?.matmul(&v_t)?; // [nkv, g*t, hd]
            outputs.push(out.reshape((nq, t, hd))?.transpose(0, 1)?.reshape((t, nq * hd))?);
        }
        Ok(if outputs.len() == 1 {
            outputs.pop().expect("one tile")
        } else {
            Tensor::cat(&outputs, 0)?
        })
    }

    /// A block-sparse tile on the CPU, head by head over only the keys the head sees: the
    /// keys of its blocks are gathered (for the tile's first query's local blocks on, and its
    /// last query's strided blocks before them), and the mask covers what differs between the
    /// tile's queries (the causal edge, a local block the later queries no longer see).
    fn sparse_tile(
        &self,
        tile: &Tile,
        q_t: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: Heads,
        layout: &BlockSparse,
    ) -> Result<Tensor> {
        let Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale } = heads;
        let group = nq / nkv;
        let t = tile.rows.len();
        let (p0, p_last) = (self.start + tile.rows.start, self.start + tile.rows.end - 1);
        let q_h = q_t.transpose(0, 1)?.contiguous()?; // [nq, t, hd]
        let bs = layout.block_size;
        let first_local = (p0 / bs + 1).saturating_sub(layout.local_blocks) * bs;
        let mut outs = Vec::with_capacity(nq);
        for head in 0..nq {
            // The union of the tile's queries' runs, within the gathered keys.
            let mut segs: Vec<Range<usize>> = layout
                .visible_runs(head, p_last)
                .into_iter()
                .map(|r| r.start..r.end.min(first_local))
                .collect();
            segs.push(first_local..p_last + 1);
            let segs: Vec<Range<usize>> = segs
                .into_iter()
                .map(|r| r.start.max(tile.keys.start)..r.end.min(tile.keys.end))
                .filter(|r| !r.is_empty())
                .collect();
            let nv: usize = segs.iter().map(|r| r.len()).sum();
            let ids: Vec<u32> =
                segs.iter().flat_map(|r| r.clone()).map(|p| (p - self.first_key) as u32).collect();
            let ids = Tensor::from_vec(ids, nv, q_t.device())?;
            let kvh = head / group;
            let k_h = k.get(kvh)?.index_select(&ids, 0)?; // [nv, hd]
            let v_h = v.get(kvh)?.index_select(&ids, 0)?;
            let scores = (q_h.get(head)?.matmul(&k_h.t()?)? * scale as f64)?; // [t, nv]
            let mut m = vec![f32::NEG_INFINITY; t * nv];
            for (r, row) in m.chunks_exact_mut(nv).enumerate() {
                let mut offset = 0;
                let runs = layout.visible_runs(head, p0 + r);
                for seg in &segs {
                    for run in &runs {
                        let (lo, hi) = (run.start.max(seg.start), run.end.min(seg.end));
                        if lo < hi {
                            row[offset + lo - seg.start..offset + hi - seg.start].fill(0.0);
                        }
                    }
                    offset += seg.len();
                }
            }
            let m = Tensor::from_vec(m, (t, nv), q_t.device())?.to_dtype(scores.dtype())?;
            outs.push(softmax_f32(&(scores + m)?)?.matmul(&v_h)?); // [t, hd]
        }
        Ok(Tensor::stack(&outs, 1)?.reshape((t, nq * hd))?)
    }

    /// The additive mask of `tile` in a block-sparse layer, `[n_kv_heads, group * rows, keys]`
    /// as the scores are laid out: per query head, the keys of [`BlockSparse::visible_runs`].
    fn sparse_mask(
        &self,
        tile: &Tile,
        layout: &BlockSparse,
        heads: Heads,
        device: &Device,
    ) -> Result<Tensor> {
        let (n_heads, nkv) = (heads.n_heads, heads.n_kv_heads);
        let (t, nk) = (tile.rows.len(), tile.keys.len());
        let mut m = vec![f32::NEG_INFINITY; n_heads * t * nk];
        for head in 0..n_heads {
            for (r, row) in m[head * t * nk..(head + 1) * t * nk].chunks_exact_mut(nk).enumerate() {
                let p = self.start + tile.rows.start + r;
                for run in layout.visible_runs(head, p) {
                    let lo = run.start.max(tile.keys.start);
                    let hi = run.end.min(tile.keys.end);
                    if lo < hi {
                        row[lo - tile.keys.start..hi - tile.keys.start].fill(0.0);
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (nkv, n_heads / nkv * t, nk), device)?)
    }
}

/// Softmax over the last dimension, computed in `f32` and returned in the scores' type (on the
/// CPU with [`softmax_rows_parallel`]).
fn softmax_f32(scores: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        let n = scores.dim(candle_core::D::Minus1)?;
        let mut p = scores.flatten_all()?.to_vec1::<f32>()?;
        softmax_rows_parallel(&mut p, n);
        return Ok(Tensor::from_vec(p, scores.shape(), scores.device())?);
    }
    Ok(if scores.dtype() == DType::F32 {
        candle_nn::ops::softmax_last_dim(scores)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(scores.dtype())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention computed directly from its definition, in `f64`: query head `h` at position
    /// `p` over the keys `sees(h, p, key)` allows.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        span: &Range<usize>,
        first_key: usize,
        heads: Heads,
        sees: impl Fn(usize, usize, usize) -> bool,
    ) -> Vec<f32> {
        let Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale } = heads;
        let n_keys = span.end - first_key;
        let mut out = vec![0f32; span.len() * nq * hd];
        for (r, p) in span.clone().enumerate() {
            for h in 0..nq {
                let kvh = h / (nq / nkv);
                let qrow = &q[(r * nq + h) * hd..][..hd];
                let keys: Vec<usize> = (first_key..span.end).filter(|&j| sees(h, p, j)).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let krow = &k[(kvh * n_keys + j - first_key) * hd..][..hd];
                        let d: f64 = qrow.iter().zip(krow).map(|(a, b)| (a * b) as f64).sum();
                        d * scale as f64
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (&j, w) in keys.iter().zip(&e) {
                    let vrow = &v[(kvh * n_keys + j - first_key) * hd..][..hd];
                    for c in 0..hd {
                        out[(r * nq + h) * hd + c] += (w / sum * vrow[c] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    /// Tiled attention equals the definition for causal, windowed and block-sparse patterns,
    /// grouped heads, one query and many, one tile and many (down to one query a tile).
    #[test]
    fn tiles_compute_the_definition() {
        let dev = Device::Cpu;
        let (nq, nkv, hd) = (4, 2, 8);
        let heads = Heads { n_heads: nq, n_kv_heads: nkv, head_dim: hd, scale: 0.3 };
        let layout = BlockSparse { block_size: 4, local_blocks: 2, vert_stride: 3, head_step: 1 };
        // (span, window, sparse)
        let cases: [(Range<usize>, Option<usize>, bool); 6] = [
            (0..23, None, false),
            (17..40, None, false),
            (39..40, None, false),
            (5..37, Some(9), false),
            (36..37, Some(9), false),
            (10..45, None, true),
        ];
        for (span, window, sparse) in cases {
            let first_key = window.map_or(0, |w| (span.start + 1).saturating_sub(w));
            let n_keys = span.end - first_key;
            let rand = |n: usize, seed: f32| {
                let t = Tensor::randn(seed, 1.0, n, &dev).unwrap();
                t.to_vec1::<f32>().unwrap()
            };
            let q = rand(span.len() * nq * hd, 0.0);
            let k = rand(nkv * n_keys * hd, 0.1);
            let v = rand(nkv * n_keys * hd, 0.2);
            let want = reference(&q, &k, &v, &span, first_key, heads, |h, p, j| {
                j <= p && window.is_none_or(|w| j + w > p) && (!sparse || layout.allows(h, p, j))
            });
            let qt = Tensor::from_vec(q, (span.len(), nq, hd), &dev).unwrap();
            let kt = Tensor::from_vec(k, (nkv, n_keys, hd), &dev).unwrap();
            let vt = Tensor::from_vec(v, (nkv, n_keys, hd), &dev).unwrap();
            for budget in [usize::MAX, nq * n_keys * 5, 1] {
                let plan = SpanAttention::with_budget(
                    &span,
                    first_key,
                    window,
                    nq,
                    budget,
                    DType::F32,
                    &dev,
                )
                .unwrap();
                match budget {
                    usize::MAX => assert_eq!(plan.tiles.len(), 1),
                    1 => assert_eq!(plan.tiles.len(), span.len()),
                    _ => assert!(plan.tiles.len() > 1 || span.len() == 1),
                }
                let got = plan.forward(&qt, &kt, &vt, heads, sparse.then_some(&layout)).unwrap();
                assert_eq!(got.dims(), &[span.len(), nq * hd]);
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "{span:?} window {window:?} sparse {sparse} budget {budget}: [{i}] {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Each tile reads only keys its queries can see: none after its last query, none before
    /// its first query's window; and the scores a tile holds stay within the budget.
    #[test]
    fn tiles_read_only_visible_keys() {
        let dev = Device::Cpu;
        let (span, w, nq) = (1000..1512, 300, 32);
        let first_key = span.start + 1 - w;
        let budget = 32 * 64 * 811;
        let plan =
            SpanAttention::with_budget(&span, first_key, Some(w), nq, budget, DType::F32, &dev)
                .unwrap();
        assert_eq!(plan.tiles.len(), 8);
        for t in &plan.tiles {
            let (p0, p_end) = (span.start + t.rows.start, span.start + t.rows.end);
            assert_eq!(t.keys, p0 + 1 - w..p_end);
            assert!(nq * t.rows.len() * t.keys.len() <= budget);
        }
    }
}
