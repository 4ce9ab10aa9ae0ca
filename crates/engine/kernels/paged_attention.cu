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

// Head sizes up to 256 (Phi-3: 96 and 128), 8 dimensions per lane.
#define PHI_MAX_HEAD_DIM 256u
#define PHI_MAX_PER_LANE (PHI_MAX_HEAD_DIM / 32u)
// Threads of a decode block: 8 warps. The launcher must use exactly this many.
#define PHI_DECODE_THREADS 256u
#define PHI_DECODE_WARPS (PHI_DECODE_THREADS / 32u)

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

// Decode attention of one query head of one sequence. Grid: (n_seqs, n_heads); block:
// PHI_DECODE_THREADS threads.
//   q       `[n_rows, n_heads, head_dim]`: the batch's queries after rotary embedding; sequence
//           `s` uses row `q_rows[s]`.
//   pool_k, pool_v  one layer of the pool.
//   slots   every sequence's visible keys, oldest first, one after another: sequence `s` has
//           `slots[starts[s] .. starts[s + 1]]` (its sliding window already applied).
//   out     `[n_seqs, n_heads, head_dim]`.
// Query head `h` reads key/value head `h / (n_heads / n_kv_heads)` (grouped-query attention).
template <typename T>
__device__ void paged_decode(const T *__restrict__ q, const T *__restrict__ pool_k,
                             const T *__restrict__ pool_v, const uint32_t *__restrict__ slots,
                             const uint32_t *__restrict__ starts,
                             const uint32_t *__restrict__ q_rows, T *__restrict__ out,
                             uint32_t n_heads, uint32_t n_kv_heads, uint32_t head_dim,
                             float scale) {
  __shared__ float part_max[PHI_DECODE_WARPS];
  __shared__ float part_sum[PHI_DECODE_WARPS];
  __shared__ float part_acc[PHI_DECODE_WARPS][PHI_MAX_HEAD_DIM];

  const uint32_t seq = blockIdx.x, head = blockIdx.y;
  const uint32_t kv_head = head / (n_heads / n_kv_heads);
  const uint32_t lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;
  const uint32_t n_dims = (head_dim + 31u) / 32u; // dimensions per lane: lane, lane + 32, ...

  // This lane's dimensions of the query, scaled once.
  const T *qh = q + ((size_t)q_rows[seq] * n_heads + head) * head_dim;
  float qr[PHI_MAX_PER_LANE], acc[PHI_MAX_PER_LANE];
#pragma unroll
  for (uint32_t i = 0; i < PHI_MAX_PER_LANE; ++i) {
    const uint32_t d = lane + 32u * i;
    qr[i] = (i < n_dims && d < head_dim) ? to_f32(qh[d]) * scale : 0.0f;
    acc[i] = 0.0f;
  }

  // Online softmax over this warp's keys: running maximum `m`, running sum `l`.
  float m = -INFINITY, l = 0.0f;
  for (uint32_t j = starts[seq] + warp; j < starts[seq + 1]; j += PHI_DECODE_WARPS) {
    const size_t base = slot_offset(slots[j], kv_head, n_kv_heads, head_dim);
    float s = 0.0f;
#pragma unroll
    for (uint32_t i = 0; i < PHI_MAX_PER_LANE; ++i) {
      const uint32_t d = lane + 32u * i;
      if (i < n_dims && d < head_dim) s += qr[i] * to_f32(pool_k[base + d]);
    }
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float rescale = (m == -INFINITY) ? 0.0f : expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * rescale + p;
#pragma unroll
    for (uint32_t i = 0; i < PHI_MAX_PER_LANE; ++i) {
      const uint32_t d = lane + 32u * i;
      if (i < n_dims && d < head_dim) acc[i] = acc[i] * rescale + p * to_f32(pool_v[base + d]);
    }
    m = m_new;
  }

  // Merge the warps: each rescales to the common maximum.
  if (lane == 0) {
    part_max[warp] = m;
    part_sum[warp] = l;
  }
#pragma unroll
  for (uint32_t i = 0; i < PHI_MAX_PER_LANE; ++i) {
    const uint32_t d = lane + 32u * i;
    if (i < n_dims && d < head_dim) part_acc[warp][d] = acc[i];
  }
  __syncthreads();
  const uint32_t d = threadIdx.x;
  if (d < head_dim) {
    float mx = -INFINITY;
    for (uint32_t w = 0; w < PHI_DECODE_WARPS; ++w) mx = fmaxf(mx, part_max[w]);
    float sum = 0.0f, o = 0.0f;
    for (uint32_t w = 0; w < PHI_DECODE_WARPS; ++w) {
      if (part_max[w] == -INFINITY) continue; // a warp that had no keys
      const float f = expf(part_max[w] - mx);
      sum += part_sum[w] * f;
      o += part_acc[w][d] * f;
    }
    out[((size_t)seq * n_heads + head) * head_dim + d] = from_f32<T>(sum > 0.0f ? o / sum : 0.0f);
  }
}

#define PHI_KERNELS(T, SUFFIX)                                                                    \
  extern "C" __global__ void kv_write_##SUFFIX(                                                   \
      const T *rows, uint32_t row_stride, T *pool, const uint32_t *slots, const T *cos,           \
      const T *sin, uint32_t n_kv_heads, uint32_t head_dim, uint32_t rot_dim) {                   \
    kv_write<T>(rows, row_stride, pool, slots, cos, sin, n_kv_heads, head_dim, rot_dim);          \
  }                                                                                               \
  extern "C" __global__ void paged_decode_##SUFFIX(                                               \
      const T *q, const T *pool_k, const T *pool_v, const uint32_t *slots,                        \
      const uint32_t *starts, const uint32_t *q_rows, T *out, uint32_t n_heads,                   \
      uint32_t n_kv_heads, uint32_t head_dim, float scale) {                                      \
    paged_decode<T>(q, pool_k, pool_v, slots, starts, q_rows, out, n_heads, n_kv_heads,           \
                    head_dim, scale);                                                             \
  }

PHI_KERNELS(float, f32)
PHI_KERNELS(__half, f16)
PHI_KERNELS(__nv_bfloat16, bf16)
