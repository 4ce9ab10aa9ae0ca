// Temperature and top_p sampling made where the logits are (and greedy decoding with penalties,
// which the plain argmax of greedy.cu does not apply): for each sampled row of a step's
// float32 logits, the token the host sampler (crates/engine/src/sampling.rs) draws for it with
// the same uniform draw, so that the host reads one number a row instead of the whole vocabulary
// (32,064 floats for Phi-3) and skips its own passes over it.
//
// It follows the host's arithmetic step for step: the presence and frequency penalties
// subtracted from the raw logits (the host computes each id's amount), the ids from `n_valid` on
// masked to -inf, `exp((x - max) * (1 / temperature))` with the host's own f32 exponential
// (exp_nonpositive, here without fused multiply-adds), the nucleus sorted by probability (ties to
// the lower id) and summed in f64 in that order, the draw by the inverse CDF. Only the total of
// the exponentials is summed in another order (per thread, then per warp); the host's and the
// device's tokens can differ only where a draw falls within rounding of a boundary.
//
// A row's answer is PHI_SAMPLE_ON_HOST where the host would report an error (a NaN or +inf
// anywhere in the row, nothing but -inf among the ids it may choose), and where the nucleus does
// not fit this kernel (more than PHI_SAMPLE_MAX_CANDIDATES tokens at or above the lowest
// probability it needs, ties included): the host then samples that row itself, with the same
// draw.
//
// Also compiled on the CPU against crates/engine/tests/cuda_emulation (see common.cuh).

#include "common.cuh"

// A row the host has to sample itself (crates/engine/src/device_draw.rs: ON_HOST).
#define PHI_SAMPLE_ON_HOST 0xffffffffu
// The largest block: 32 warps.
#define PHI_SAMPLE_MAX_WARPS 32u
// Tokens of the probability range the nucleus is looked for in, sorted in shared memory.
#define PHI_SAMPLE_MAX_CANDIDATES 4096u
// Words of a row's parameters (crates/engine/src/device_draw.rs: ROW_WORDS):
//   0 the logits row, 1 n_valid, 2 1 / temperature (f32 bits; 0 for greedy decoding, the
//   lowest id of the largest penalised logit), 3 top_p (f32 bits),
//   4 and 5 the uniform draw `m / 2^53` as m's high 21 and low 32 bits,
//   6 the row's first penalty, 7 its number of penalties.
// The penalties follow the rows' words: (id, amount subtracted from its logit as f32 bits).
#define PHI_SAMPLE_ROW_WORDS 8u

// sampling.rs: TOP_P_SLACK, and the margin nucleus_floor adds over the sums' rounding.
#define PHI_SAMPLE_TOP_P_SLACK 1e-6
#define PHI_SAMPLE_FLOOR_MARGIN 1e-9

// sampling.rs: exp_nonpositive, operation for operation, every product and sum rounded alone.
__device__ __forceinline__ float sample_exp_nonpositive(float x) {
  const float log2_e = 1.44269504088896340736f;
  const float ln2_hi = 0.6933594f;
  const float ln2_lo = -2.1219444e-4f;
  const float to_int = 12582912.0f;
  const float lowest = -87.33655f;
  const float clamped = fmaxf(x, lowest);
  const float shifted = __fadd_rn(__fmul_rn(clamped, log2_e), to_int);
  const float n = __fsub_rn(shifted, to_int);
  const float r = __fsub_rn(__fsub_rn(clamped, __fmul_rn(n, ln2_hi)), __fmul_rn(n, ln2_lo));
  float p = 1.9875691e-4f;
  p = __fadd_rn(__fmul_rn(p, r), 1.3982e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
  p = __fadd_rn(__fmul_rn(p, r), 0.16666665f);
  p = __fadd_rn(__fmul_rn(p, r), 0.5f);
  const float e_r = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
  const int n_int = (int)__float_as_uint(shifted) - (int)__float_as_uint(to_int);
  const float two_n = __uint_as_float((uint32_t)(n_int + 127) << 23);
  return x < lowest ? 0.0f : __fmul_rn(e_r, two_n);
}

// The binary exponent field of a probability (sampling.rs: exponent).
__device__ __forceinline__ uint32_t sample_exponent(float p) { return __float_as_uint(p) >> 23; }

// The block's largest `x`, to every thread. `scratch`: PHI_SAMPLE_MAX_WARPS floats.
__device__ __forceinline__ float sample_block_max(float x, float *scratch) {
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  __syncthreads();
  if (threadIdx.x % 32u == 0) scratch[threadIdx.x / 32u] = x;
  __syncthreads();
  float best = scratch[0];
  for (uint32_t w = 1; w < blockDim.x / 32u; ++w) best = fmaxf(best, scratch[w]);
  return best;
}

// The bitwise or and the largest of the block's `a` and `b`, to every thread. `scratch`:
// 2 * PHI_SAMPLE_MAX_WARPS words.
__device__ __forceinline__ void sample_block_or_max(uint32_t &a, uint32_t &b, uint32_t *scratch) {
  for (int m = 16; m > 0; m >>= 1) {
    a |= __shfl_xor_sync(0xffffffffu, a, m);
    const uint32_t other = __shfl_xor_sync(0xffffffffu, b, m);
    b = other > b ? other : b;
  }
  __syncthreads();
  if (threadIdx.x % 32u == 0) {
    scratch[threadIdx.x / 32u] = a;
    scratch[PHI_SAMPLE_MAX_WARPS + threadIdx.x / 32u] = b;
  }
  __syncthreads();
  a = 0u;
  b = 0u;
  for (uint32_t w = 0; w < blockDim.x / 32u; ++w) {
    a |= scratch[w];
    b = scratch[PHI_SAMPLE_MAX_WARPS + w] > b ? scratch[PHI_SAMPLE_MAX_WARPS + w] : b;
  }
}

// The sum of the threads' `x` in a fixed order (each warp's in thread order, then the warps'),
// to every thread; each thread's own value stays in `sums[threadIdx.x]` and each warp's total in
// `warp_sums` for a walk down to a thread's share. `sums`: one double a thread; `warp_sums`:
// PHI_SAMPLE_MAX_WARPS doubles.
__device__ __forceinline__ double sample_block_sum(double x, double *sums, double *warp_sums) {
  __syncthreads();
  sums[threadIdx.x] = x;
  __syncthreads();
  const uint32_t n_warps = blockDim.x / 32u;
  if (threadIdx.x < n_warps) {
    double s = 0.0;
    for (uint32_t k = 0; k < 32u; ++k) s += sums[threadIdx.x * 32u + k];
    warp_sums[threadIdx.x] = s;
  }
  __syncthreads();
  double total = 0.0;
  for (uint32_t w = 0; w < n_warps; ++w) total += warp_sums[w];
  return total;
}

// Grid: (n_rows); block: a multiple of 32, at most 1024. `logits`: `[*, vocab]`, contiguous;
// `params`: PHI_SAMPLE_ROW_WORDS words a row, then the penalties; `work`: `[n_rows, vocab]`,
// scratch; `tokens`: `[n_rows]`.
extern "C" __global__ void sample_rows_f32(const float *__restrict__ logits, uint32_t vocab,
                                           const uint32_t *__restrict__ params,
                                           float *__restrict__ work, uint32_t *__restrict__ tokens) {
  __shared__ float max_scratch[PHI_SAMPLE_MAX_WARPS];
  __shared__ uint32_t word_scratch[2u * PHI_SAMPLE_MAX_WARPS];
  __shared__ double sums[PHI_SAMPLE_MAX_WARPS * 32u];
  __shared__ double warp_sums[PHI_SAMPLE_MAX_WARPS];
  __shared__ unsigned long long keys[PHI_SAMPLE_MAX_CANDIDATES];
  __shared__ uint32_t n_keys;

  const uint32_t *p = params + (size_t)blockIdx.x * PHI_SAMPLE_ROW_WORDS;
  const float *row = logits + (size_t)p[0] * vocab;
  const uint32_t n_valid = p[1];
  const float inv_t = __uint_as_float(p[2]);
  const float top_p = __uint_as_float(p[3]);
  const double u = ((double)p[4] * 4294967296.0 + (double)p[5]) * (1.0 / 9007199254740992.0);
  const uint32_t *penalties = params + (size_t)gridDim.x * PHI_SAMPLE_ROW_WORDS + 2u * p[6];
  const uint32_t n_penalties = p[7];
  float *w = work + (size_t)blockIdx.x * vocab;

  // Each thread's share is a contiguous run of ids, so that the shares' sums, in thread order,
  // are the row's running sums at the shares' ends.
  const uint32_t share = (vocab + blockDim.x - 1u) / blockDim.x;
  const uint32_t begin = threadIdx.x * share < vocab ? threadIdx.x * share : vocab;
  const uint32_t end = begin + share < vocab ? begin + share : vocab;

  // The raw row (checked as the host checks it), the ids from n_valid on masked.
  uint32_t unusable = 0u;
  for (uint32_t i = begin; i < end; ++i) {
    const float x = row[i];
    unusable |= (uint32_t)(x != x || x == INFINITY);
    w[i] = i < n_valid ? x : -INFINITY;
  }
  __syncthreads();
  // The penalties: distinct ids, so no two threads write one value.
  for (uint32_t j = threadIdx.x; j < n_penalties; j += blockDim.x) {
    const uint32_t id = penalties[2u * j];
    if (id < n_valid) w[id] = __fsub_rn(w[id], __uint_as_float(penalties[2u * j + 1u]));
  }
  __syncthreads();
  float local_max = -INFINITY;
  for (uint32_t i = begin; i < end; ++i) local_max = fmaxf(local_max, w[i]);
  const float row_max = sample_block_max(local_max, max_scratch);
  uint32_t any_unusable = unusable, no_max = 0u;
  sample_block_or_max(any_unusable, no_max, word_scratch);
  if (any_unusable || row_max == -INFINITY) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = PHI_SAMPLE_ON_HOST;
    return;
  }
  if (inv_t == 0.0f) {
    // Greedy (with penalties): the lowest id that holds the largest value, as reversed ids'
    // largest so that the block reduction is the one above.
    uint32_t reversed = 0u, no_or = 0u;
    for (uint32_t i = begin; i < end; ++i) {
      if (w[i] == row_max) {
        reversed = 0xffffffffu - i;
        break;
      }
    }
    sample_block_or_max(no_or, reversed, word_scratch);
    if (threadIdx.x == 0) tokens[blockIdx.x] = 0xffffffffu - reversed;
    return;
  }

  // The unnormalised probabilities, and the last id that has any.
  double mass = 0.0;
  uint32_t last_plus_one = 0u, no_or = 0u;
  for (uint32_t i = begin; i < end; ++i) {
    const float e = sample_exp_nonpositive(__fmul_rn(__fsub_rn(w[i], row_max), inv_t));
    w[i] = e;
    mass += (double)e;
    if (e > 0.0f) last_plus_one = i + 1u;
  }
  const double total = sample_block_sum(mass, sums, warp_sums);
  sample_block_or_max(no_or, last_plus_one, word_scratch);
  const uint32_t last_positive = last_plus_one - 1u;

  if (top_p >= 1.0f) {
    // The first id whose running sum exceeds the target: down the warps' and the threads'
    // totals to the share that holds it, then on through the row from there.
    if (threadIdx.x == 0) {
      const double target = u * total;
      double cum = 0.0;
      uint32_t t = 0;
      const uint32_t n_warps = blockDim.x / 32u;
      uint32_t warp = 0;
      while (warp + 1u < n_warps && cum + warp_sums[warp] <= target) cum += warp_sums[warp++];
      t = warp * 32u;
      while (t + 1u < (warp + 1u) * 32u && cum + sums[t] <= target) cum += sums[t++];
      uint32_t token = last_positive;
      for (uint32_t i = t * share < vocab ? t * share : vocab; i < vocab; ++i) {
        const float e = w[i];
        if (e <= 0.0f) continue;
        cum += (double)e;
        if (cum > target) {
          token = i;
          break;
        }
      }
      tokens[blockIdx.x] = token;
    }
    return;
  }

  // Nucleus. The floor: the highest exponent bucket whose tokens and those above it hold the
  // mass (sampling.rs: nucleus_floor, found here by bisection over the buckets, each step one
  // pass over the row), 0 if none.
  const double threshold = (double)top_p * total * (1.0 - PHI_SAMPLE_TOP_P_SLACK);
  const double wanted = threshold * (1.0 + PHI_SAMPLE_FLOOR_MARGIN);
  uint32_t lo = 0u, hi = 128u; // exponents of (0, 1]: at most 127 (1.0 itself)
  while (hi - lo > 1u) {
    const uint32_t mid = (lo + hi) / 2u;
    double above = 0.0;
    for (uint32_t i = begin; i < end; ++i) {
      const float e = w[i];
      if (sample_exponent(e) >= mid) above += (double)e;
    }
    if (sample_block_sum(above, sums, warp_sums) >= wanted) lo = mid;
    else hi = mid;
  }
  // The floor as the bits of the lowest probability the candidates may have (a positive
  // float's bits are ordered as its value): the bucket's lowest.
  uint32_t floor_bits = lo << 23;

  // The candidates, as keys that sort by probability, largest first, then by id. Where the
  // floor's bucket holds too many of them (a factor of two spans thousands of tokens in a
  // high-entropy row), the floor is raised within the bucket, by bisection over its values' bits
  // with the same test, to the highest value whose tokens and those above still hold the mass:
  // every token of the nucleus is still among them, and little else.
  uint32_t n = 0u;
  for (uint32_t attempt = 0u;; ++attempt) {
    __syncthreads(); // every thread has read the last attempt's count
    if (threadIdx.x == 0) n_keys = 0u;
    __syncthreads();
    for (uint32_t i = begin; i < end; ++i) {
      const float e = w[i];
      if (e > 0.0f && __float_as_uint(e) >= floor_bits) {
        const uint32_t slot = atomicAdd(&n_keys, 1u);
        if (slot < PHI_SAMPLE_MAX_CANDIDATES) {
          keys[slot] = ((unsigned long long)(0xffffffffu - __float_as_uint(e)) << 32) | i;
        }
      }
    }
    __syncthreads();
    n = n_keys;
    if (n <= PHI_SAMPLE_MAX_CANDIDATES) break;
    if (attempt == 1u) {
      if (threadIdx.x == 0) tokens[blockIdx.x] = PHI_SAMPLE_ON_HOST;
      return;
    }
    uint32_t lo_bits = floor_bits, hi_bits = (lo + 1u) << 23;
    while (hi_bits - lo_bits > 1u) {
      const uint32_t mid = lo_bits + (hi_bits - lo_bits) / 2u;
      double above = 0.0;
      for (uint32_t i = begin; i < end; ++i) {
        const float e = w[i];
        if (__float_as_uint(e) >= mid) above += (double)e;
      }
      if (sample_block_sum(above, sums, warp_sums) >= wanted) lo_bits = mid;
      else hi_bits = mid;
    }
    floor_bits = lo_bits;
  }
  uint32_t padded = 1u;
  while (padded < n) padded *= 2u;
  for (uint32_t i = n + threadIdx.x; i < padded; i += blockDim.x) keys[i] = ~0ull;
  __syncthreads();
  // Bitonic sort, ascending.
  for (uint32_t k = 2u; k <= padded; k *= 2u) {
    for (uint32_t j = k / 2u; j > 0u; j /= 2u) {
      for (uint32_t i = threadIdx.x; i < padded; i += blockDim.x) {
        const uint32_t l = i ^ j;
        if (l > i) {
          const unsigned long long a = keys[i], b = keys[l];
          if ((a > b) == ((i & k) == 0u)) {
            keys[i] = b;
            keys[l] = a;
          }
        }
      }
      __syncthreads();
    }
  }

  if (threadIdx.x == 0) {
    // sampling.rs: nucleus_len, then draw over the nucleus in its order.
    double cum = 0.0;
    uint32_t len = 0u;
    for (uint32_t i = 0; i < n; ++i) {
      cum += (double)__uint_as_float(0xffffffffu - (uint32_t)(keys[i] >> 32));
      if (cum >= threshold) {
        len = i + 1u;
        break;
      }
    }
    if (len == 0u) {
      if (floor_bits > 0u) {
        // The floor's sums and the sorted ones rounded apart: the host looks at every token.
        tokens[blockIdx.x] = PHI_SAMPLE_ON_HOST;
        return;
      }
      len = n;
    }
    double kept = 0.0;
    for (uint32_t i = 0; i < len; ++i) {
      kept += (double)__uint_as_float(0xffffffffu - (uint32_t)(keys[i] >> 32));
    }
    const double target = u * kept;
    double run = 0.0;
    uint32_t token = (uint32_t)keys[len - 1u];
    for (uint32_t i = 0; i < len; ++i) {
      run += (double)__uint_as_float(0xffffffffu - (uint32_t)(keys[i] >> 32));
      if (run > target) {
        token = (uint32_t)keys[i];
        break;
      }
    }
    tokens[blockIdx.x] = token;
  }
}

// The raw log-probabilities a row reports (sampling.rs: Sampler::sample with logprobs), for a
// row whose token was picked on the device: the row's largest logit, the sum in f64 of
// `exp(x - max)` over the whole row (the host takes the log-normaliser `max + ln(sum)` from
// them as it does from its own sum), the picked token's logit, and the `k` largest finite
// logits among the ids below `n_valid` (descending, ties to the lower id; fewer where there are
// fewer). The host turns them into log-probabilities.
//
// It runs after the kernels that picked the tokens, in the same answer: `picks` holds their
// `n_picks` tokens (greedy.cu's and sample_rows_f32's), then PHI_LOGPROB_OUT_WORDS words for
// each row of this kernel. A row whose token was left to the host (PHI_SAMPLE_ON_HOST) is left
// as it is: the host samples it and computes its log-probabilities itself.
//
// Parameters, PHI_LOGPROB_ROW_WORDS words a row (crates/engine/src/device_draw.rs):
//   0 the logits row, 1 n_valid, 2 k (at most PHI_LOGPROB_MAX_TOP), 3 where the row's token is
//   among the picks.
// Answer, PHI_LOGPROB_OUT_WORDS words a row: 0 the largest logit (f32 bits), 1 the token's
// logit, 2 and 3 the sum's high and low words (f64 bits), 4 the number of top logits, then
// that many (id, logit) pairs.
#define PHI_LOGPROB_ROW_WORDS 4u
#define PHI_LOGPROB_MAX_TOP 20u
#define PHI_LOGPROB_OUT_WORDS (5u + 2u * PHI_LOGPROB_MAX_TOP)

// Whether (value, id) comes first in the top logits' order: larger, or as large with a lower
// id. Nothing, (-inf, PHI_SAMPLE_ON_HOST), comes after every real candidate.
__device__ __forceinline__ bool sample_first(float value, uint32_t id, float best,
                                             uint32_t best_id) {
  return value > best || (value == best && id < best_id);
}

// Grid: (n_rows); block: a multiple of 32, at most 1024. `logits`: `[*, vocab]`, contiguous;
// `picks`: `n_picks` tokens, then the answers.
extern "C" __global__ void logprob_rows_f32(const float *__restrict__ logits, uint32_t vocab,
                                            const uint32_t *__restrict__ params,
                                            uint32_t *__restrict__ picks, uint32_t n_picks) {
  __shared__ float max_scratch[PHI_SAMPLE_MAX_WARPS];
  __shared__ double sums[PHI_SAMPLE_MAX_WARPS * 32u];
  __shared__ double warp_sums[PHI_SAMPLE_MAX_WARPS];
  __shared__ float top_value[PHI_SAMPLE_MAX_WARPS];
  __shared__ uint32_t top_id[PHI_SAMPLE_MAX_WARPS];
  __shared__ float prev_value;
  __shared__ uint32_t prev_id;

  const uint32_t *p = params + (size_t)blockIdx.x * PHI_LOGPROB_ROW_WORDS;
  const float *row = logits + (size_t)p[0] * vocab;
  const uint32_t n_valid = p[1];
  const uint32_t k = p[2] < PHI_LOGPROB_MAX_TOP ? p[2] : PHI_LOGPROB_MAX_TOP;
  const uint32_t token = p[3] < n_picks ? picks[p[3]] : PHI_SAMPLE_ON_HOST;
  uint32_t *o = picks + n_picks + (size_t)blockIdx.x * PHI_LOGPROB_OUT_WORDS;
  if (token >= vocab) return; // the host's row (the whole block returns)

  const uint32_t share = (vocab + blockDim.x - 1u) / blockDim.x;
  const uint32_t begin = threadIdx.x * share < vocab ? threadIdx.x * share : vocab;
  const uint32_t end = begin + share < vocab ? begin + share : vocab;

  float local_max = -INFINITY;
  for (uint32_t i = begin; i < end; ++i) local_max = fmaxf(local_max, row[i]);
  const float row_max = sample_block_max(local_max, max_scratch);
  double mass = 0.0;
  for (uint32_t i = begin; i < end; ++i) {
    mass += (double)sample_exp_nonpositive(__fsub_rn(row[i], row_max));
  }
  const double total = sample_block_sum(mass, sums, warp_sums);

  // The top logits one at a time: each round the first in order after the last one found.
  if (threadIdx.x == 0) {
    prev_value = INFINITY;
    prev_id = 0u;
  }
  __syncthreads();
  uint32_t found = 0u;
  const uint32_t lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;
  for (; found < k; ++found) {
    const float pv = prev_value;
    const uint32_t pid = prev_id;
    float best = -INFINITY;
    uint32_t best_id = PHI_SAMPLE_ON_HOST;
    const uint32_t valid_end = end < n_valid ? end : n_valid;
    for (uint32_t i = begin; i < valid_end; ++i) {
      const float x = row[i];
      if (x != -INFINITY && sample_first(pv, pid, x, i) && sample_first(x, i, best, best_id)) {
        best = x;
        best_id = i;
      }
    }
    for (int m = 16; m > 0; m >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best, m);
      const uint32_t other_id = __shfl_xor_sync(0xffffffffu, best_id, m);
      if (sample_first(other, other_id, best, best_id)) {
        best = other;
        best_id = other_id;
      }
    }
    if (lane == 0) {
      top_value[warp] = best;
      top_id[warp] = best_id;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (uint32_t w = 1; w < blockDim.x / 32u; ++w) {
        if (sample_first(top_value[w], top_id[w], best, best_id)) {
          best = top_value[w];
          best_id = top_id[w];
        }
      }
      if (best_id != PHI_SAMPLE_ON_HOST) {
        o[5u + 2u * found] = best_id;
        o[6u + 2u * found] = __float_as_uint(best);
      }
      prev_value = best;
      prev_id = best_id;
    }
    __syncthreads();
    if (prev_id == PHI_SAMPLE_ON_HOST) break;
  }

  if (threadIdx.x == 0) {
    const unsigned long long bits = __double_as_longlong(total);
    o[0] = __float_as_uint(row_max);
    o[1] = __float_as_uint(row[token]);
    o[2] = (uint32_t)(bits >> 32);
    o[3] = (uint32_t)bits;
    o[4] = found;
  }
}
