// Runs crates/engine/kernels/paged_attention.cu on the CPU (cuda_emulation.h) for
// cuda_kernels_emulated.rs: writes the given key/value rows into a zeroed pool with kv_write_*,
// then runs paged_decode_* over that pool.
//
// usage: harness DIR f32|f16|bf16
// DIR holds meta.txt ("n_heads n_kv_heads head_dim num_blocks n_write_rows n_seqs n_q_rows
// scale") and the inputs as raw little-endian arrays: k_rows.f32, v_rows.f32, write_slots.u32,
// q.f32, slots.u32, starts.u32, q_rows.u32. Float inputs are rounded to the element type on the
// way in. Writes pool_k.f32, pool_v.f32 and out.f32 to DIR.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "../../kernels/paged_attention.cu"

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

template <typename T>
static void run(const std::string &dir, void (*write_kernel)(const T *, T *, const uint32_t *,
                                                             uint32_t, uint32_t),
                void (*decode_kernel)(const T *, const T *, const T *, const uint32_t *,
                                      const uint32_t *, const uint32_t *, T *, uint32_t, uint32_t,
                                      uint32_t, float)) {
  unsigned nq, nkv, hd, blocks, n_write, n_seqs, n_q;
  float scale;
  FILE *m = std::fopen((dir + "/meta.txt").c_str(), "r");
  if (!m || std::fscanf(m, "%u %u %u %u %u %u %u %f", &nq, &nkv, &hd, &blocks, &n_write, &n_seqs,
                        &n_q, &scale) != 8)
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

  // A block narrower than the head, so that the stride loop is exercised.
  emu::launch(dim3{n_write, nkv, 1}, 32, write_kernel, (const T *)k_rows.data(), pool_k.data(),
              (const uint32_t *)write_slots.data(), nkv, hd);
  emu::launch(dim3{n_write, nkv, 1}, 32, write_kernel, (const T *)v_rows.data(), pool_v.data(),
              (const uint32_t *)write_slots.data(), nkv, hd);
  emu::launch(dim3{n_seqs, nq, 1}, PHI_DECODE_THREADS, decode_kernel, (const T *)q.data(),
              (const T *)pool_k.data(), (const T *)pool_v.data(), (const uint32_t *)slots.data(),
              (const uint32_t *)starts.data(), (const uint32_t *)q_rows.data(), out.data(), nq,
              nkv, hd, scale);

  write(dir + "/pool_k.f32", widen(pool_k));
  write(dir + "/pool_v.f32", widen(pool_v));
  write(dir + "/out.f32", widen(out));
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  std::string dir = argv[1], dtype = argv[2];
  if (dtype == "f32") run<float>(dir, kv_write_f32, paged_decode_f32);
  else if (dtype == "f16") run<__half>(dir, kv_write_f16, paged_decode_f16);
  else if (dtype == "bf16") run<__nv_bfloat16>(dir, kv_write_bf16, paged_decode_bf16);
  else return 2;
  return 0;
}
