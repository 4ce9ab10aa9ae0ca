// What the engine's kernels share: element conversions, rounding steps that match the
// reference's, a warp reduction, and rotary embedding of one head.
//
// Every kernel also compiles on the CPU against the emulation of CUDA's thread model in
// crates/engine/tests/cuda_emulation, which is how they are tested without a GPU: keep to what
// it provides (threadIdx/blockIdx/blockDim, static __shared__ arrays, __syncthreads,
// __shfl_xor_sync of a float or a uint32_t with a full mask on warp-uniform control flow, the
// __f*_rn intrinsics, __float_as_uint, __uint_as_float and __double_as_longlong, atomicAdd of a uint32_t).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Positions of a KV-pool block (crates/engine/src/kv_pool.rs).
#define PHI_BLOCK_SIZE 16u

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// One element-wise operation of the reference on tensors of type T: the exact result rounded
// once to T. The product of two f16 or bf16 values is exact in float32, and rounding a float32
// sum again to f16 or bf16 is the same as rounding the exact sum once (float32 has more than
// twice their precision plus two bits), so float32 arithmetic with the `_rn` intrinsics (which
// the compiler never fuses into an FMA) gives exactly the rounded results the reference's
// separate f16/bf16 kernels give.
template <typename T> __device__ __forceinline__ T mul_rn(T a, T b) {
  return from_f32<T>(__fmul_rn(to_f32(a), to_f32(b)));
}
template <typename T> __device__ __forceinline__ T add_rn(T a, T b) {
  return from_f32<T>(__fadd_rn(to_f32(a), to_f32(b)));
}
template <typename T> __device__ __forceinline__ T sub_rn(T a, T b) {
  return from_f32<T>(__fsub_rn(to_f32(a), to_f32(b)));
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// Rotary embedding of one head (`head_dim` values at `src`, to `dst`), as transformers'
// `apply_rotary_pos_emb` computes it in the model's type: the first `rot_dim` dimensions are
// rotated in two halves (`x * cos + rotate_half(x) * sin`, each product and the sum rounded),
// the rest pass through. `cos` and `sin` are this token's `rot_dim / 2` values. `rot_dim == 0`
// copies the head. Any block width; the block's threads share the dimensions.
template <typename T>
__device__ __forceinline__ void rope_head(const T *__restrict__ src, T *__restrict__ dst,
                                          const T *__restrict__ cos, const T *__restrict__ sin,
                                          uint32_t head_dim, uint32_t rot_dim) {
  const uint32_t half = rot_dim / 2u;
  for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    if (d < half) {
      dst[d] = sub_rn(mul_rn(src[d], cos[d]), mul_rn(src[d + half], sin[d]));
    } else if (d < 2u * half) {
      const uint32_t i = d - half;
      dst[d] = add_rn(mul_rn(src[d], cos[i]), mul_rn(src[i], sin[i]));
    } else {
      dst[d] = src[d];
    }
  }
}
