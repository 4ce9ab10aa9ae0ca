// Fused element-wise steps of a decoder layer on the GPU: RMSNorm (with the residual add before
// it), the SiLU gate of the MLP, and the rotary embedding of the queries.
//
// Why: a single-stream decode step is a few hundred small kernels, and each of candle's ops is
// a launch and an allocation. RMSNorm in bf16 with the reference's rounding is ten of them (to
// float32, square, mean, add, sqrt, reciprocal, multiply, back to bf16, multiply by the weight)
// and the residual add one more; the MLP's gate is a SiLU and a multiply over strided halves;
// the queries need a copy out of the fused qkv output and a rotation. Here each is one launch,
// reading its input once.
//
// Numerics are transformers' (Phi3RMSNorm, Phi3MLP, apply_rotary_pos_emb) step for step:
// float32 where the reference computes in float32, and each step the reference runs as a
// separate op on the model's type rounded to that type (common.cuh).
//
// The same source also compiles on the CPU against the emulation of CUDA's thread model in
// crates/engine/tests/cuda_emulation, which is how it is tested without a GPU.

#include "common.cuh"

// The largest block the reductions take: 32 warps.
#define PHI_MAX_WARPS 32u

// Sum over the block's threads; every thread gets the same value. Call once per kernel, from
// every thread, with a block width that is a multiple of 32.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float parts[PHI_MAX_WARPS];
  const uint32_t lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;
  x = warp_sum(x);
  if (lane == 0) parts[warp] = x;
  __syncthreads();
  float total = 0.0f;
  for (uint32_t w = 0; w < blockDim.x / 32u; ++w) total += parts[w];
  return total;
}

// RMSNorm of row `blockIdx.x` of `[n_rows, n_cols]`, as Phi3RMSNorm: the mean of squares and
// the normalisation in float32, rounded to T, then multiplied by the weight in T. With `ADD`
// the row is first `x + delta` rounded to T (the residual connection), which is also stored in
// `sum`. Grid: (n_rows); block: a multiple of 32, at most 1024.
template <typename T, bool ADD>
__device__ void rms_norm(const T *__restrict__ x, const T *__restrict__ delta,
                         const T *__restrict__ weight, T *__restrict__ sum, T *__restrict__ out,
                         uint32_t n_cols, float eps) {
  const size_t row = (size_t)blockIdx.x * n_cols;
  float squares = 0.0f;
  for (uint32_t c = threadIdx.x; c < n_cols; c += blockDim.x) {
    T v = x[row + c];
    if (ADD) {
      v = add_rn(v, delta[row + c]);
      sum[row + c] = v;
    }
    const float f = to_f32(v);
    squares += f * f;
  }
  const float inv = 1.0f / sqrtf(block_sum(squares) / (float)n_cols + eps);
  for (uint32_t c = threadIdx.x; c < n_cols; c += blockDim.x) {
    // Each thread reads back only what it wrote itself.
    const T v = ADD ? sum[row + c] : x[row + c];
    out[row + c] = mul_rn(from_f32<T>(__fmul_rn(to_f32(v), inv)), weight[c]);
  }
}

// The MLP's gate, as Phi3MLP: `gate_up` rows are `[gate (n_cols), up (n_cols)]`, and
// `out = up * silu(gate)`, silu computed in float32 and rounded to T, the product rounded to T.
// One thread per output element; grid: ceil(n_rows * n_cols / block width).
template <typename T>
__device__ void silu_mul(const T *__restrict__ gate_up, T *__restrict__ out, size_t n_elems,
                         uint32_t n_cols) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_elems) return;
  const size_t r = i / n_cols, c = i % n_cols;
  const size_t at = r * 2u * n_cols + c;
  const float g = to_f32(gate_up[at]);
  const T act = from_f32<T>(g / (1.0f + expf(-g)));
  out[i] = mul_rn(gate_up[at + n_cols], act);
}

// Rotary embedding of the batch's queries, read straight out of the fused qkv projection's
// output (rows of `row_stride` elements, the `n_heads` query heads first) into `q`
// (`[n_rows, n_heads, head_dim]`, contiguous). `cos`, `sin`: `[n_rows, rot_dim / 2]`.
// Grid: (n_rows, n_heads); any block width.
template <typename T>
__device__ void rope_queries(const T *__restrict__ qkv, uint32_t row_stride,
                             const T *__restrict__ cos, const T *__restrict__ sin,
                             T *__restrict__ q, uint32_t n_heads, uint32_t head_dim,
                             uint32_t rot_dim) {
  const uint32_t r = blockIdx.x, h = blockIdx.y;
  const size_t cs = (size_t)r * (rot_dim / 2u);
  rope_head(qkv + (size_t)r * row_stride + (size_t)h * head_dim,
            q + ((size_t)r * n_heads + h) * head_dim, cos + cs, sin + cs, head_dim, rot_dim);
}

#define PHI_LAYER_KERNELS(T, SUFFIX)                                                              \
  extern "C" __global__ void rms_norm_##SUFFIX(const T *x, const T *weight, T *out,               \
                                               uint32_t n_cols, float eps) {                      \
    rms_norm<T, false>(x, nullptr, weight, nullptr, out, n_cols, eps);                            \
  }                                                                                               \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const T *x, const T *delta, const T *weight,   \
                                                   T *sum, T *out, uint32_t n_cols, float eps) {  \
    rms_norm<T, true>(x, delta, weight, sum, out, n_cols, eps);                                   \
  }                                                                                               \
  extern "C" __global__ void silu_mul_##SUFFIX(const T *gate_up, T *out, size_t n_elems,          \
                                               uint32_t n_cols) {                                 \
    silu_mul<T>(gate_up, out, n_elems, n_cols);                                                   \
  }                                                                                               \
  extern "C" __global__ void rope_queries_##SUFFIX(const T *qkv, uint32_t row_stride,             \
                                                   const T *cos, const T *sin, T *q,              \
                                                   uint32_t n_heads, uint32_t head_dim,           \
                                                   uint32_t rot_dim) {                            \
    rope_queries<T>(qkv, row_stride, cos, sin, q, n_heads, head_dim, rot_dim);                    \
  }

PHI_LAYER_KERNELS(float, f32)
PHI_LAYER_KERNELS(__half, f16)
PHI_LAYER_KERNELS(__nv_bfloat16, bf16)
