// Greedy decoding's choice made where the logits are: for each row of a step's float32 logits,
// the id of the largest of its first `n_valid` values, so that the host reads one number a row
// instead of the whole vocabulary (32,064 floats for Phi-3: 8 MB a step at 64 streams).
//
// It must choose exactly what the host sampler (crates/engine/src/sampling.rs) chooses for a
// greedy row without penalties or logprobs: the lowest id among the largest values, `-inf`
// never chosen, the ids from `n_valid` on never chosen (the padding rows of the embedding). Where
// the host would answer with an error instead (a NaN or `+inf` anywhere in the row, or nothing
// but `-inf` among the first `n_valid`), the row's answer is PHI_GREEDY_ON_HOST: the host then
// reads that row and samples it itself, so that the error it reports is the usual one.
//
// Also compiled on the CPU against crates/engine/tests/cuda_emulation (see common.cuh).

#include "common.cuh"

// A row the host has to sample itself (crates/engine/src/device_draw.rs: ON_HOST).
#define PHI_GREEDY_ON_HOST 0xffffffffu
// The largest block: 32 warps.
#define PHI_GREEDY_MAX_WARPS 32u
// Values a thread loads before comparing any.
#define PHI_GREEDY_LOADS 8u

// Whether (value, id) beats (best, best_id): larger, or as large with a lower id. An empty
// candidate is (-inf, PHI_GREEDY_ON_HOST), which every real candidate (never -inf) beats.
__device__ __forceinline__ bool beats(float value, uint32_t id, float best, uint32_t best_id) {
  return value > best || (value == best && id < best_id);
}

// Words of a row's parameters (crates/engine/src/device_draw.rs: GREEDY_ROW_WORDS): the logits
// row, and n_valid.
#define PHI_GREEDY_ROW_WORDS 2u

// Grid: (n_rows); block: a multiple of 32, at most 1024. `logits`: `[*, vocab]`, contiguous;
// `params`: PHI_GREEDY_ROW_WORDS words a row; `tokens`: `[n_rows]`.
extern "C" __global__ void greedy_argmax_f32(const float *__restrict__ logits, uint32_t vocab,
                                             const uint32_t *__restrict__ params,
                                             uint32_t *__restrict__ tokens) {
  const uint32_t *p = params + (size_t)blockIdx.x * PHI_GREEDY_ROW_WORDS;
  const float *row = logits + (size_t)p[0] * vocab;
  const uint32_t n_valid = p[1];
  float best = -INFINITY;
  uint32_t best_id = PHI_GREEDY_ON_HOST, unusable = 0u;
  // Each thread walks its ids upwards, so a strict `>` keeps its lowest id among equals. It
  // loads PHI_GREEDY_LOADS values before looking at any, so that a row's read is not one load's
  // latency after another (a lone row is one block); ids past the row read as -inf.
  for (uint32_t c = threadIdx.x; c < vocab; c += PHI_GREEDY_LOADS * blockDim.x) {
    float x[PHI_GREEDY_LOADS];
#pragma unroll
    for (uint32_t k = 0; k < PHI_GREEDY_LOADS; ++k) {
      const uint32_t id = c + k * blockDim.x;
      x[k] = id < vocab ? row[id] : -INFINITY;
    }
#pragma unroll
    for (uint32_t k = 0; k < PHI_GREEDY_LOADS; ++k) {
      const uint32_t id = c + k * blockDim.x;
      unusable |= (uint32_t)(x[k] != x[k] || x[k] == INFINITY);
      if (id < n_valid && x[k] > best) {
        best = x[k];
        best_id = id;
      }
    }
  }
  for (int m = 16; m > 0; m >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, m);
    const uint32_t other_id = __shfl_xor_sync(0xffffffffu, best_id, m);
    unusable |= __shfl_xor_sync(0xffffffffu, unusable, m);
    if (beats(other, other_id, best, best_id)) {
      best = other;
      best_id = other_id;
    }
  }
  __shared__ float warp_best[PHI_GREEDY_MAX_WARPS];
  __shared__ uint32_t warp_id[PHI_GREEDY_MAX_WARPS], warp_unusable[PHI_GREEDY_MAX_WARPS];
  const uint32_t lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_id[warp] = best_id;
    warp_unusable[warp] = unusable;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (uint32_t w = 1; w < blockDim.x / 32u; ++w) {
      unusable |= warp_unusable[w];
      if (beats(warp_best[w], warp_id[w], best, best_id)) {
        best = warp_best[w];
        best_id = warp_id[w];
      }
    }
    tokens[blockIdx.x] = unusable ? PHI_GREEDY_ON_HOST : best_id;
  }
}
