// Paged KV cache kernels for the GPU: writing a batch's new keys and values into the pool's
// blocks, and decode attention that reads every sequence's keys and values where they lie.
//
// Why: without them a decode step on the GPU costs a handful of launches per sequence and layer
// (a copy per run of positions to write, a gather of the whole cache, a matmul, a softmax and a
// matmul to attend), so a batch of 64 streams made thousands of tiny launches per step, and the
// gathers copied the whole cache every step. Here a layer's writes are one launch for the whole
// batch's keys (rotary embedding included) and one for its values, and its decode attention one
// more, whatever the batch size.
//
// Layout (crates/engine/src/kv_pool.rs): a layer's keys (and values) are
// `[num_blocks, n_kv_heads, BLOCK_SIZE, head_dim]`; slot `s` is position `s % BLOCK_SIZE` of
// block `s / BLOCK_SIZE`.
//
// Numerics follow the reference (transformers' eager attention): scores, softmax and the
// weighted sum in float32, from the cache's element type; the result is rounded once to the
// model's type. The softmax is computed online (running maximum and sum, rescaled as keys come),
// so any number of keys fits in registers: each warp takes every `n_warps`-th key, and the warps'
// partial results are merged at the end.
//
// The same source also compiles on the CPU against a small emulation of CUDA's thread model
// (crates/engine/tests/cuda_emulation), which is how its logic is tested without a GPU (see
// common.cuh for what the kernels may use).

#include "common.cuh"

// Head sizes up to 256 (Phi-3: 96 and 128): 32 lanes of a warp take DIMS dimensions each
// (lane, lane + 32, ...). Each kernel is built for DIMS = 4 (heads up to 128, few registers)
// and DIMS = 8 (up to 256); the launcher picks the smaller that fits.
#define PHI_MAX_HEAD_DIM 256u
// Threads of a decode block: 8 warps. The launcher must use exactly this many.
#define PHI_DECODE_THREADS 256u
#define PHI_DECODE_WARPS (PHI_DECODE_THREADS / 32u)
// Keys a warp reads at once: their key and value rows are all loaded before any is used, so
// that many loads are in flight per warp (decode attention is bound by memory latency: one key
// at a time reached a small fraction of the GPU's bandwidth).
#define PHI_DECODE_KEYS_PER_WARP 4u
// Where head `head`'s `head_dim` values of pool slot `slot` start, in elements.
__device__ __forceinline__ size_t slot_offset(uint32_t slot, uint32_t head, uint32_t n_kv_heads,
                                              uint32_t head_dim) {
  size_t block = slot / PHI_BLOCK_SIZE, offset = slot % PHI_BLOCK_SIZE;
  return ((block * n_kv_heads + head) * PHI_BLOCK_SIZE + offset) * (size_t)head_dim;
}

// Row `r` of a batch into pool slot `slots[r]` (keys and values are two launches). Head `h`
// of row `r` is the `head_dim` values at `rows + r * row_stride + h * head_dim`, so that keys
// and values are read straight out of the fused qkv projection's output. With `rot_dim > 0`
// (keys) the head is rotated on the way (rope_head; `cos` and `sin` are `[n_rows, rot_dim / 2]`),
// with 0 it is copied. Grid: (n_rows, n_kv_heads); any block width.
template <typename T>
__device__ void kv_write(const T *__restrict__ rows, uint32_t row_stride, T *__restrict__ pool,
                         const uint32_t *__restrict__ slots, const T *__restrict__ cos,
                         const T *__restrict__ sin, uint32_t n_kv_heads, uint32_t head_dim,
                         uint32_t rot_dim) {
  const uint32_t r = blockIdx.x, h = blockIdx.y;
  const T *src = rows + (size_t)r * row_stride + (size_t)h * head_dim;
  T *dst = pool + slot_offset(slots[r], h, n_kv_heads, head_dim);
  const size_t cs = (size_t)r * (rot_dim / 2u);
  rope_head(src, dst, cos + cs, sin + cs, head_dim, rot_dim);
}

// Decode attention of one query head of one sequence over one split of its keys. Grid:
// (n_seqs, n_heads, n_splits); block: PHI_DECODE_THREADS threads.
//
// Splits spread a long context over many blocks when few sequences decode (one sequence's 32
// heads would otherwise occupy 32 of a GPU's 100+ multiprocessors): split `z` of a sequence is
// its keys `z * split_keys ..` up to `split_keys` of them, and paged_decode_merge_* combines
// the splits' partial results. Without splits (SPLIT false, the grid's z 1) a block takes all
// its sequence's keys and writes the output itself.
//   q       `[n_rows, n_heads, head_dim]`: the batch's queries after rotary embedding; sequence
//           `s` uses row `q_rows[s]`.
//   pool_k, pool_v  one layer of the pool.
//   slots   every sequence's visible keys, oldest first, one after another: sequence `s` has
//           `slots[starts[s] .. starts[s + 1]]` (its sliding window already applied).
//   out     `[n_seqs, n_heads, head_dim]`, written when SPLIT is false.
//   partials  when SPLIT is true, `[n_seqs, n_heads, n_splits, head_dim + 2]` float32: split
//           `z`'s weighted sum of values (relative to its maximum score), its maximum score and
//           its sum of weights; splits past a sequence's keys are left unwritten.
//   split_keys  keys per split when SPLIT is true.
// Query head `h` reads key/value head `h / (n_heads / n_kv_heads)` (grouped-query attention).
template <typename T, uint32_t DIMS, bool SPLIT>
__device__ void paged_decode(const T *__restrict__ q, const T *__restrict__ pool_k,
                             const T *__restrict__ pool_v, const uint32_t *__restrict__ slots,
                             const uint32_t *__restrict__ starts,
                             const uint32_t *__restrict__ q_rows, T *__restrict__ out,
                             float *__restrict__ partials, uint32_t n_heads, uint32_t n_kv_heads,
                             uint32_t head_dim, float scale, uint32_t split_keys) {
  constexpr uint32_t KPW = PHI_DECODE_KEYS_PER_WARP;
  __shared__ float part_max[PHI_DECODE_WARPS];
  __shared__ float part_sum[PHI_DECODE_WARPS];
  __shared__ float part_acc[PHI_DECODE_WARPS][PHI_MAX_HEAD_DIM];

  const uint32_t seq = blockIdx.x, head = blockIdx.y, split = blockIdx.z;
  const uint32_t first = starts[seq] + (SPLIT ? split * split_keys : 0u);
  const uint32_t last = starts[seq + 1];
  if (SPLIT && first >= last) return; // past this sequence's keys (the block is uniform)
  const uint32_t end = SPLIT && last - first > split_keys ? first + split_keys : last;
  const uint32_t kv_head = head / (n_heads / n_kv_heads);
  const uint32_t lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;
  const uint32_t n_dims = (head_dim + 31u) / 32u; // dimensions per lane: lane, lane + 32, ...

  // This lane's dimensions of the query, scaled once.
  const T *qh = q + ((size_t)q_rows[seq] * n_heads + head) * head_dim;
  float qr[DIMS], acc[DIMS];
#pragma unroll
  for (uint32_t i = 0; i < DIMS; ++i) {
    const uint32_t d = lane + 32u * i;
    qr[i] = (i < n_dims && d < head_dim) ? to_f32(qh[d]) * scale : 0.0f;
    acc[i] = 0.0f;
  }

  // Online softmax over this warp's keys, KPW at a time: running maximum `m`, running sum `l`.
  // The warp takes keys j0 .. j0 + KPW, then skips the other warps' (whole warps are uniform
  // in j0, so the shuffles below see every lane).
  // The slots of the warp's keys are read an iteration ahead: its key and value loads need
  // them, and waiting for the slots and then for the rows would double each iteration's wait.
  constexpr uint32_t STRIDE = PHI_DECODE_WARPS * KPW;
  float m = -INFINITY, l = 0.0f;
  uint32_t next[KPW];
#pragma unroll
  for (uint32_t u = 0; u < KPW; ++u) {
    const uint32_t j = first + warp * KPW + u;
    next[u] = j < end ? slots[j] : 0u;
  }
  for (uint32_t j0 = first + warp * KPW; j0 < end; j0 += STRIDE) {
    uint32_t slot[KPW];
#pragma unroll
    for (uint32_t u = 0; u < KPW; ++u) {
      slot[u] = next[u];
      next[u] = j0 + STRIDE + u < end ? slots[j0 + STRIDE + u] : 0u;
    }
    T kr[KPW][DIMS], vr[KPW][DIMS];
#pragma unroll
    for (uint32_t u = 0; u < KPW; ++u) {
      const size_t base = j0 + u < end ? slot_offset(slot[u], kv_head, n_kv_heads, head_dim) : 0;
#pragma unroll
      for (uint32_t i = 0; i < DIMS; ++i) {
        const uint32_t d = lane + 32u * i;
        const bool in = j0 + u < end && i < n_dims && d < head_dim;
        kr[u][i] = in ? pool_k[base + d] : from_f32<T>(0.0f);
        vr[u][i] = in ? pool_v[base + d] : from_f32<T>(0.0f);
      }
    }
    float s[KPW];
#pragma unroll
    for (uint32_t u = 0; u < KPW; ++u) {
      float dot = 0.0f;
#pragma unroll
      for (uint32_t i = 0; i < DIMS; ++i) dot += qr[i] * to_f32(kr[u][i]);
      s[u] = dot;
    }
#pragma unroll
    for (uint32_t u = 0; u < KPW; ++u) s[u] = warp_sum(s[u]);
    float m_new = m;
#pragma unroll
    for (uint32_t u = 0; u < KPW; ++u) {
      if (j0 + u < end) m_new = fmaxf(m_new, s[u]);
    }
    const float rescale = (m == -INFINITY) ? 0.0f : expf(m - m_new);
    float p[KPW];
    l *= rescale;
#pragma unroll
    for (uint32_t u = 0; u < KPW; ++u) {
      p[u] = j0 + u < end ? expf(s[u] - m_new) : 0.0f;
      l += p[u];
    }
#pragma unroll
    for (uint32_t i = 0; i < DIMS; ++i) {
      float a = acc[i] * rescale;
#pragma unroll
      for (uint32_t u = 0; u < KPW; ++u) a += p[u] * to_f32(vr[u][i]);
      acc[i] = a;
    }
    m = m_new;
  }

  // Merge the warps: each rescales to the common maximum.
  if (lane == 0) {
    part_max[warp] = m;
    part_sum[warp] = l;
  }
#pragma unroll
  for (uint32_t i = 0; i < DIMS; ++i) {
    const uint32_t d = lane + 32u * i;
    if (i < n_dims && d < head_dim) part_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float mx = -INFINITY;
  for (uint32_t w = 0; w < PHI_DECODE_WARPS; ++w) mx = fmaxf(mx, part_max[w]);
  const size_t row = (size_t)seq * n_heads + head;
  for (uint32_t d = threadIdx.x; d < head_dim; d += PHI_DECODE_THREADS) {
    float sum = 0.0f, o = 0.0f;
    for (uint32_t w = 0; w < PHI_DECODE_WARPS; ++w) {
      if (part_max[w] == -INFINITY) continue; // a warp that had no keys
      const float f = expf(part_max[w] - mx);
      sum += part_sum[w] * f;
      o += part_acc[w][d] * f;
    }
    if (SPLIT) {
      float *part = partials + (row * gridDim.z + split) * (head_dim + 2u);
      part[d] = o;
      if (d == 0) {
        part[head_dim] = mx;
        part[head_dim + 1u] = sum;
      }
    } else {
      out[row * head_dim + d] = from_f32<T>(sum > 0.0f ? o / sum : 0.0f);
    }
  }
}

// Merges the splits of paged_decode<.., true>: `partials` as it describes, `n_splits` its third
// dimension; a sequence of `keys` keys has ceil(keys / split_keys) of them. Grid: (n_seqs,
// n_heads); any block width.
template <typename T>
__device__ void paged_decode_merge(const float *__restrict__ partials,
                                   const uint32_t *__restrict__ starts, T *__restrict__ out,
                                   uint32_t n_heads, uint32_t head_dim, uint32_t n_splits,
                                   uint32_t split_keys) {
  const uint32_t seq = blockIdx.x, head = blockIdx.y;
  const uint32_t keys = starts[seq + 1] - starts[seq];
  const uint32_t used = (keys + split_keys - 1u) / split_keys;
  const size_t row = (size_t)seq * n_heads + head;
  const float *part = partials + row * n_splits * (head_dim + 2u);
  float mx = -INFINITY;
  for (uint32_t s = 0; s < used; ++s) mx = fmaxf(mx, part[s * (head_dim + 2u) + head_dim]);
  for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.0f, o = 0.0f;
    for (uint32_t s = 0; s < used; ++s) {
      const float *p = part + s * (head_dim + 2u);
      if (p[head_dim] == -INFINITY) continue;
      const float f = expf(p[head_dim] - mx);
      sum += p[head_dim + 1u] * f;
      o += p[d] * f;
    }
    out[row * head_dim + d] = from_f32<T>(sum > 0.0f ? o / sum : 0.0f);
  }
}

#define PHI_DECODE_KERNEL(T, SUFFIX, DIMS, SPLIT, NAME)                                         \
  extern "C" __global__ void NAME##_d##DIMS##_##SUFFIX(                                           \
      const T *q, const T *pool_k, const T *pool_v, const uint32_t *slots,                        \
      const uint32_t *starts, const uint32_t *q_rows, T *out, float *partials, uint32_t n_heads,  \
      uint32_t n_kv_heads, uint32_t head_dim, float scale, uint32_t split_keys) {                 \
    paged_decode<T, DIMS, SPLIT>(q, pool_k, pool_v, slots, starts, q_rows, out, partials,         \
                                 n_heads, n_kv_heads, head_dim, scale, split_keys);               \
  }

#define PHI_KERNELS(T, SUFFIX)                                                                    \
  extern "C" __global__ void kv_write_##SUFFIX(                                                   \
      const T *rows, uint32_t row_stride, T *pool, const uint32_t *slots, const T *cos,           \
      const T *sin, uint32_t n_kv_heads, uint32_t head_dim, uint32_t rot_dim) {                   \
    kv_write<T>(rows, row_stride, pool, slots, cos, sin, n_kv_heads, head_dim, rot_dim);          \
  }                                                                                               \
  PHI_DECODE_KERNEL(T, SUFFIX, 4, false, paged_decode)                                            \
  PHI_DECODE_KERNEL(T, SUFFIX, 8, false, paged_decode)                                            \
  PHI_DECODE_KERNEL(T, SUFFIX, 4, true, paged_decode_split)                                       \
  PHI_DECODE_KERNEL(T, SUFFIX, 8, true, paged_decode_split)                                       \
  extern "C" __global__ void paged_decode_merge_##SUFFIX(                                         \
      const float *partials, const uint32_t *starts, T *out, uint32_t n_heads, uint32_t head_dim, \
      uint32_t n_splits, uint32_t split_keys) {                                                   \
    paged_decode_merge<T>(partials, starts, out, n_heads, head_dim, n_splits, split_keys);        \
  }

PHI_KERNELS(float, f32)
PHI_KERNELS(__half, f16)
PHI_KERNELS(__nv_bfloat16, bf16)
