// Runs the engine's GPU kernels (crates/engine/kernels) on the CPU (cuda_emulation.h) for
// cuda_kernels_emulated.rs.
//
// usage: harness OP DIR f32|f16|bf16
// DIR holds meta.txt (the sizes, per OP below) and the inputs as raw little-endian arrays
// (`*.f32`, `*.u32`). Float inputs are rounded to the element type on the way in; the outputs
// are written to DIR as float32.
//   paged  meta "n_heads n_kv_heads head_dim num_blocks n_write_rows n_seqs n_q_rows scale
//          split_keys";
//          writes k_rows.f32 and v_rows.f32 into a zeroed pool at write_slots.u32 with
//          kv_write_*, then runs decode attention (q.f32, slots.u32, starts.u32, q_rows.u32)
//          over it as cuda_paged.rs launches it: paged_decode_* when split_keys is 0, else
//          paged_decode_split_* in splits of split_keys keys and paged_decode_merge_*; the
//          `_d4` kernels for heads up to 128, else `_d8`: pool_k.f32, pool_v.f32, out.f32.
//   rope   meta "n_rows n_heads n_kv_heads head_dim rot_dim num_blocks"; the fused qkv rows
//          qkv.f32 with cos.f32 and sin.f32: rope_queries_* into q.f32, and kv_write_* of the
//          rotated keys and the values into a zeroed pool at slots.u32: pool_k.f32, pool_v.f32.
//   norm   meta "n_rows n_cols eps"; x.f32, delta.f32, weight.f32: rms_norm_* of x into
//          out.f32, add_rms_norm_* of x + delta into sum.f32 and add_out.f32.
//   silu   meta "n_rows n_cols"; gate_up.f32 (`[n_rows, 2 * n_cols]`): silu_mul_* into out.f32.
//   pick   meta "n_greedy n_draw n_logprob draw_offset logprob_offset n_words vocab threads
//          n_rows" (element type f32 only; device_draw.rs: PickPlan); logits.f32 (`n_rows`
//          rows) and the plan's words params.u32: greedy_argmax_f32, sample_rows_f32 and
//          logprob_rows_f32 in blocks of `threads`, into one zeroed answer as cuda_sampling.rs
//          launches them, over a sampling scratch filled with NaN (a read of scratch the kernel
//          did not write first shows): answer.u32.
#include <cstdio>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "../../kernels/greedy.cu"
#include "../../kernels/layer_ops.cu"
#include "../../kernels/paged_attention.cu"
#include "../../kernels/sampling.cu"

template <typename E> static std::vector<E> read(const std::string &path, size_t n) {
  std::vector<E> v(n);
  FILE *f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(E), n, f) != n) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
    std::exit(1);
  }
  std::fclose(f);
  return v;
}

static void write(const std::string &path, const std::vector<float> &v) {
  FILE *f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(float), v.size(), f) != v.size()) std::exit(1);
  std::fclose(f);
}

static void write_u32(const std::string &path, const std::vector<uint32_t> &v) {
  FILE *f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(uint32_t), v.size(), f) != v.size()) std::exit(1);
  std::fclose(f);
}

template <typename T> static std::vector<T> narrow(const std::vector<float> &v) {
  std::vector<T> out;
  for (float x : v) out.push_back(from_f32<T>(x));
  return out;
}

template <typename T> static std::vector<float> widen(const std::vector<T> &v) {
  std::vector<float> out;
  for (T x : v) out.push_back(to_f32(x));
  return out;
}

static FILE *meta(const std::string &dir) {
  FILE *m = std::fopen((dir + "/meta.txt").c_str(), "r");
  if (!m) std::exit(1);
  return m;
}

// The kernels of one element type.
template <typename T> struct Kernels {
  void (*kv_write)(const T *, uint32_t, T *, const uint32_t *, const T *, const T *, uint32_t,
                   uint32_t, uint32_t);
  using Decode = void (*)(const T *, const T *, const T *, const uint32_t *, const uint32_t *,
                          const uint32_t *, T *, float *, uint32_t, uint32_t, uint32_t, float,
                          uint32_t);
  Decode paged_decode_d4, paged_decode_d8, paged_decode_split_d4, paged_decode_split_d8;
  void (*paged_decode_merge)(const float *, const uint32_t *, T *, uint32_t, uint32_t, uint32_t,
                             uint32_t);
  void (*rope_queries)(const T *, uint32_t, const T *, const T *, T *, uint32_t, uint32_t,
                       uint32_t);
  void (*rms_norm)(const T *, const T *, T *, uint32_t, float);
  void (*add_rms_norm)(const T *, const T *, const T *, T *, T *, uint32_t, float);
  void (*silu_mul)(const T *, T *, size_t, uint32_t);
};

template <typename T> static void paged(const std::string &dir, const Kernels<T> &kern) {
  unsigned nq, nkv, hd, blocks, n_write, n_seqs, n_q, split_keys;
  float scale;
  FILE *m = meta(dir);
  if (std::fscanf(m, "%u %u %u %u %u %u %u %f %u", &nq, &nkv, &hd, &blocks, &n_write, &n_seqs,
                  &n_q, &scale, &split_keys) != 9)
    std::exit(1);
  std::fclose(m);
  auto k_rows = narrow<T>(read<float>(dir + "/k_rows.f32", (size_t)n_write * nkv * hd));
  auto v_rows = narrow<T>(read<float>(dir + "/v_rows.f32", (size_t)n_write * nkv * hd));
  auto write_slots = read<uint32_t>(dir + "/write_slots.u32", n_write);
  auto q = narrow<T>(read<float>(dir + "/q.f32", (size_t)n_q * nq * hd));
  auto starts = read<uint32_t>(dir + "/starts.u32", n_seqs + 1);
  auto slots = read<uint32_t>(dir + "/slots.u32", starts[n_seqs]);
  auto q_rows = read<uint32_t>(dir + "/q_rows.u32", n_seqs);

  size_t pool_len = (size_t)blocks * nkv * PHI_BLOCK_SIZE * hd;
  std::vector<T> pool_k(pool_len, from_f32<T>(0.0f)), pool_v(pool_len, from_f32<T>(0.0f));
  std::vector<T> out((size_t)n_seqs * nq * hd, from_f32<T>(0.0f));

  // Contiguous rows, copied; a block narrower than the head, so that the stride loop is
  // exercised.
  for (auto *rows : {&k_rows, &v_rows}) {
    emu::launch(dim3{n_write, nkv, 1}, 32, kern.kv_write, (const T *)rows->data(), nkv * hd,
                (rows == &k_rows ? pool_k : pool_v).data(), (const uint32_t *)write_slots.data(),
                (const T *)rows->data(), (const T *)rows->data(), nkv, hd, 0u);
  }
  unsigned max_keys = 0;
  for (unsigned s = 0; s < n_seqs; ++s) max_keys = std::max(max_keys, starts[s + 1] - starts[s]);
  const bool narrow_heads = hd <= 128;
  if (split_keys == 0) {
    emu::launch(dim3{n_seqs, nq, 1}, PHI_DECODE_THREADS,
                narrow_heads ? kern.paged_decode_d4 : kern.paged_decode_d8, (const T *)q.data(),
                (const T *)pool_k.data(), (const T *)pool_v.data(),
                (const uint32_t *)slots.data(), (const uint32_t *)starts.data(),
                (const uint32_t *)q_rows.data(), out.data(), (float *)nullptr, nq, nkv, hd, scale,
                0u);
  } else {
    const unsigned n_splits = (max_keys + split_keys - 1) / split_keys;
    // Filled with NaN: a split the merge reads but no block wrote shows in the output.
    std::vector<float> partials((size_t)n_seqs * nq * n_splits * (hd + 2), NAN);
    emu::launch(dim3{n_seqs, nq, n_splits}, PHI_DECODE_THREADS,
                narrow_heads ? kern.paged_decode_split_d4 : kern.paged_decode_split_d8,
                (const T *)q.data(), (const T *)pool_k.data(), (const T *)pool_v.data(),
                (const uint32_t *)slots.data(), (const uint32_t *)starts.data(),
                (const uint32_t *)q_rows.data(), (T *)nullptr, partials.data(), nq, nkv, hd,
                scale, split_keys);
    emu::launch(dim3{n_seqs, nq, 1}, 64, kern.paged_decode_merge,
                (const float *)partials.data(), (const uint32_t *)starts.data(), out.data(), nq,
                hd, n_splits, split_keys);
  }

  write(dir + "/pool_k.f32", widen(pool_k));
  write(dir + "/pool_v.f32", widen(pool_v));
  write(dir + "/out.f32", widen(out));
}

template <typename T> static void rope(const std::string &dir, const Kernels<T> &kern) {
  unsigned n, nq, nkv, hd, rot, blocks;
  FILE *m = meta(dir);
  if (std::fscanf(m, "%u %u %u %u %u %u", &n, &nq, &nkv, &hd, &rot, &blocks) != 6) std::exit(1);
  std::fclose(m);
  const unsigned stride = (nq + 2 * nkv) * hd;
  auto qkv = narrow<T>(read<float>(dir + "/qkv.f32", (size_t)n * stride));
  auto cos = narrow<T>(read<float>(dir + "/cos.f32", (size_t)n * (rot / 2)));
  auto sin = narrow<T>(read<float>(dir + "/sin.f32", (size_t)n * (rot / 2)));
  auto slots = read<uint32_t>(dir + "/slots.u32", n);

  size_t pool_len = (size_t)blocks * nkv * PHI_BLOCK_SIZE * hd;
  std::vector<T> pool_k(pool_len, from_f32<T>(0.0f)), pool_v(pool_len, from_f32<T>(0.0f));
  std::vector<T> q((size_t)n * nq * hd, from_f32<T>(0.0f));
  const T *c = cos.data(), *s = sin.data();
  emu::launch(dim3{n, nq, 1}, 64, kern.rope_queries, (const T *)qkv.data(), stride, c, s,
              q.data(), nq, hd, rot);
  emu::launch(dim3{n, nkv, 1}, 32, kern.kv_write, (const T *)qkv.data() + nq * hd, stride,
              pool_k.data(), (const uint32_t *)slots.data(), c, s, nkv, hd, rot);
  emu::launch(dim3{n, nkv, 1}, 64, kern.kv_write, (const T *)qkv.data() + (nq + nkv) * hd,
              stride, pool_v.data(), (const uint32_t *)slots.data(), c, s, nkv, hd, 0u);

  write(dir + "/q.f32", widen(q));
  write(dir + "/pool_k.f32", widen(pool_k));
  write(dir + "/pool_v.f32", widen(pool_v));
}

template <typename T> static void norm(const std::string &dir, const Kernels<T> &kern) {
  unsigned n, cols;
  float eps;
  FILE *m = meta(dir);
  if (std::fscanf(m, "%u %u %f", &n, &cols, &eps) != 3) std::exit(1);
  std::fclose(m);
  auto x = narrow<T>(read<float>(dir + "/x.f32", (size_t)n * cols));
  auto delta = narrow<T>(read<float>(dir + "/delta.f32", (size_t)n * cols));
  auto weight = narrow<T>(read<float>(dir + "/weight.f32", cols));
  std::vector<T> out(x.size()), sum(x.size()), add_out(x.size());
  // 128 threads: fewer than a Phi-3 row's columns, so that each thread takes several.
  emu::launch(dim3{n, 1, 1}, 128, kern.rms_norm, (const T *)x.data(), (const T *)weight.data(),
              out.data(), cols, eps);
  emu::launch(dim3{n, 1, 1}, 128, kern.add_rms_norm, (const T *)x.data(),
              (const T *)delta.data(), (const T *)weight.data(), sum.data(), add_out.data(), cols,
              eps);
  write(dir + "/out.f32", widen(out));
  write(dir + "/sum.f32", widen(sum));
  write(dir + "/add_out.f32", widen(add_out));
}

template <typename T> static void silu(const std::string &dir, const Kernels<T> &kern) {
  unsigned n, cols;
  FILE *m = meta(dir);
  if (std::fscanf(m, "%u %u", &n, &cols) != 2) std::exit(1);
  std::fclose(m);
  auto gate_up = narrow<T>(read<float>(dir + "/gate_up.f32", (size_t)n * 2 * cols));
  const size_t elems = (size_t)n * cols;
  std::vector<T> out(elems);
  const unsigned threads = 64, blocks = (unsigned)((elems + threads - 1) / threads);
  emu::launch(dim3{blocks, 1, 1}, threads, kern.silu_mul, (const T *)gate_up.data(), out.data(),
              elems, cols);
  write(dir + "/out.f32", widen(out));
}

static void pick(const std::string &dir) {
  unsigned n_greedy, n_draw, n_logprob, draw_offset, logprob_offset, words, vocab, threads,
      logit_rows;
  FILE *m = meta(dir);
  if (std::fscanf(m, "%u %u %u %u %u %u %u %u %u", &n_greedy, &n_draw, &n_logprob, &draw_offset,
                  &logprob_offset, &words, &vocab, &threads, &logit_rows) != 9)
    std::exit(1);
  std::fclose(m);
  auto logits = read<float>(dir + "/logits.f32", (size_t)logit_rows * vocab);
  auto params = read<uint32_t>(dir + "/params.u32", words);
  const unsigned n_picks = n_greedy + n_draw;
  std::vector<uint32_t> answer(n_picks + (size_t)n_logprob * PHI_LOGPROB_OUT_WORDS, 0u);
  if (n_greedy > 0)
    emu::launch(dim3{n_greedy, 1, 1}, threads, greedy_argmax_f32, (const float *)logits.data(),
                vocab, (const uint32_t *)params.data(), answer.data());
  if (n_draw > 0) {
    std::vector<float> work((size_t)n_draw * vocab, NAN);
    emu::launch(dim3{n_draw, 1, 1}, threads, sample_rows_f32, (const float *)logits.data(), vocab,
                (const uint32_t *)params.data() + draw_offset, work.data(),
                answer.data() + n_greedy);
  }
  if (n_logprob > 0)
    emu::launch(dim3{n_logprob, 1, 1}, threads, logprob_rows_f32, (const float *)logits.data(),
                vocab, (const uint32_t *)params.data() + logprob_offset, answer.data(), n_picks);
  write_u32(dir + "/answer.u32", answer);
}

template <typename T> static int run(const std::string &op, const std::string &dir,
                                     const Kernels<T> &kern) {
  if (op == "paged") paged<T>(dir, kern);
  else if (op == "rope") rope<T>(dir, kern);
  else if (op == "norm") norm<T>(dir, kern);
  else if (op == "silu") silu<T>(dir, kern);
  else return 2;
  return 0;
}

#define PHI_KERNEL_SET(SUFFIX)                                                                    \
  {kv_write_##SUFFIX,           paged_decode_d4_##SUFFIX, paged_decode_d8_##SUFFIX,               \
   paged_decode_split_d4_##SUFFIX, paged_decode_split_d8_##SUFFIX,                                \
   paged_decode_merge_##SUFFIX, rope_queries_##SUFFIX,      rms_norm_##SUFFIX,                    \
   add_rms_norm_##SUFFIX,       silu_mul_##SUFFIX}

int main(int argc, char **argv) {
  if (argc != 4) return 2;
  std::string op = argv[1], dir = argv[2], dtype = argv[3];
  if (op == "pick") {
    if (dtype != "f32") return 2;
    pick(dir);
    return 0;
  }
  if (dtype == "f32") return run<float>(op, dir, Kernels<float> PHI_KERNEL_SET(f32));
  if (dtype == "f16") return run<__half>(op, dir, Kernels<__half> PHI_KERNEL_SET(f16));
  if (dtype == "bf16")
    return run<__nv_bfloat16>(op, dir, Kernels<__nv_bfloat16> PHI_KERNEL_SET(bf16));
  return 2;
}
