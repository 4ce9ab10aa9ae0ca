//! Shared helpers for the benchmarks: a Phi-3-shaped checkpoint with random weights (written once
//! under `target/bench-models/<name>/`) and a multi-threaded memory read used as the roofline.

pub mod sse;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use phi_engine::checkpoint::ModelSource;
use phi_engine::phi3::Phi3;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Bumped whenever the generator changes what it writes, so cached folders are regenerated.
const GENERATOR_VERSION: u32 = 1;
/// Marks a complete folder; holds the spec it was written from.
const STAMP_FILE: &str = ".bench-model-stamp";
/// The tokenizer and generation files copied next to the random weights.
const SIDE_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];
/// Elements generated from one RNG stream; blocks are independent, so threads can share a tensor
/// and the output does not depend on how many threads wrote it.
const BLOCK: usize = 1 << 20;

/// The shape of a random-weight Phi-3 checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchModelSpec {
    /// Folder name under `target/bench-models/`.
    pub name: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub sliding_window: usize,
    /// Seed of the weights; the same spec always yields byte-identical files.
    pub seed: u64,
}

impl BenchModelSpec {
    /// Phi-3-mini's architecture (vocabulary, head_dim 96, MHA, sliding window, 4k positions)
    /// scaled down to ~438M parameters: hidden 1536, intermediate 4096, 12 layers, 16 heads.
    pub fn phi3_438m() -> Self {
        Self {
            name: "phi3-438m-random".into(),
            hidden_size: 1536,
            intermediate_size: 4096,
            num_hidden_layers: 12,
            num_attention_heads: 16,
            num_key_value_heads: 16,
            vocab_size: 32064,
            max_position_embeddings: 4096,
            sliding_window: 2047,
            seed: 0x5eed_0fb3_7c4e,
        }
    }

    /// Phi-3-mini-4k-instruct's own shape (3.8B parameters, 7.6 GB in bf16): hidden 3072,
    /// intermediate 8192, 32 layers, 32 heads; for GPU benchmarks (`benches/gpu.sh`).
    pub fn phi3_mini() -> Self {
        Self {
            name: "phi3-mini-random".into(),
            hidden_size: 3072,
            intermediate_size: 8192,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            ..Self::phi3_438m()
        }
    }

    /// A few-million-parameter model with the same layout, for a quick smoke run of the benches
    /// (`cargo test --benches`).
    pub fn tiny() -> Self {
        Self {
            name: "phi3-tiny-random".into(),
            hidden_size: 128,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            ..Self::phi3_438m()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Every tensor of the checkpoint with its shape, in the Hugging Face `Phi3ForCausalLM`
    /// layout (fused `qkv_proj` and `gate_up_proj`, untied `lm_head`).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd;
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.self_attn.qkv_proj.weight"), vec![qkv, h]));
            t.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.num_attention_heads * hd],
            ));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            t.push((format!("{p}.mlp.gate_up_proj.weight"), vec![2 * i, h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        t.push(("model.norm.weight".into(), vec![h]));
        t.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        t
    }

    /// All parameters, embedding and `lm_head` included.
    pub fn num_parameters(&self) -> usize {
        self.tensors().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Parameters one decode step reads: everything but the embedding table, of which a step
    /// reads a single row.
    pub fn decode_parameters(&self) -> usize {
        self.num_parameters() - self.vocab_size * self.hidden_size
    }

    /// `config.json`: the real Phi-3-mini-4k-instruct config with the sizes replaced.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "_name_or_path": self.name,
            "architectures": ["Phi3ForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "embd_pdrop": 0.0,
            "eos_token_id": 32000,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "phi3",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "original_max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": 32000,
            "resid_pdrop": 0.0,
            "rms_norm_eps": 1e-05,
            "rope_scaling": null,
            "rope_theta": 10000.0,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.39.3",
            "use_cache": true,
            "vocab_size": self.vocab_size
        })
    }

    fn stamp(&self) -> String {
        format!("generator v{GENERATOR_VERSION}\n{self:#?}\n")
    }
}

/// The cargo target directory: `$CARGO_TARGET_DIR`, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            workspace.canonicalize().unwrap_or(workspace).join("target")
        }
    }
}

/// Where criterion writes its results (`$CRITERION_HOME`, else `<target>/criterion`), as
/// criterion itself decides it.
pub fn criterion_dir() -> PathBuf {
    match std::env::var_os("CRITERION_HOME") {
        Some(d) => PathBuf::from(d),
        None => target_dir().join("criterion"),
    }
}

/// The folder of the spec's checkpoint, written first if it is missing, incomplete or from an
/// older spec. Prints the parameter count.
pub fn ensure_bench_model(spec: &BenchModelSpec) -> Result<PathBuf> {
    let root = target_dir().join("bench-models");
    let dir = root.join(&spec.name);
    let params = spec.num_parameters();
    let up_to_date = std::fs::read_to_string(dir.join(STAMP_FILE)).is_ok_and(|s| s == spec.stamp())
        && SIDE_FILES
            .iter()
            .chain(&["config.json", "model.safetensors"])
            .all(|f| dir.join(f).is_file());
    if up_to_date {
        eprintln!(
            "bench model {}: {params} parameters ({:.1}M), cached at {}",
            spec.name,
            params as f64 / 1e6,
            dir.display()
        );
        return Ok(dir);
    }
    let start = std::time::Instant::now();
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // Written into a scratch folder and renamed, so an interrupted run never leaves a folder that
    // looks complete.
    let tmp = root.join(format!(".{}.tmp-{}", spec.name, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    write_checkpoint(spec, &tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("renaming to {}", dir.display()))?;
    eprintln!(
        "bench model {}: {params} parameters ({:.1}M), {:.2} GB bf16, written to {} in {:.1}s",
        spec.name,
        params as f64 / 1e6,
        (params * 2) as f64 / 1e9,
        dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// Writes config, bf16 weights, tokenizer files and the stamp into `dir`.
fn write_checkpoint(spec: &BenchModelSpec, dir: &Path) -> Result<()> {
    let config = serde_json::to_string_pretty(&spec.config_json())?;
    std::fs::write(dir.join("config.json"), config + "\n")?;

    // PHI_BENCH_TOKENIZER_DIR: where a binary built elsewhere finds the tokenizer files.
    let tokenizer_dir = std::env::var_os("PHI_BENCH_TOKENIZER_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny/phi3-mini-4k"),
        PathBuf::from,
    );
    for f in SIDE_FILES {
        std::fs::copy(tokenizer_dir.join(f), dir.join(f))
            .with_context(|| format!("copying {f} from {}", tokenizer_dir.display()))?;
    }

    let tensors = spec.tensors();
    let data = random_bf16_tensors(spec, &tensors);
    let views = tensors
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| {
            Ok((name.as_str(), TensorView::new(Dtype::BF16, shape.clone(), bytes)?))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(metadata), &dir.join("model.safetensors"))
        .context("writing model.safetensors")?;

    std::fs::write(dir.join(STAMP_FILE), spec.stamp())?;
    Ok(())
}

/// The weights as little-endian bf16 bytes: norm weights are 1 (their initialisation in
/// transformers), everything else uniform with standard deviation 0.02 (`initializer_range`).
/// Generated in independent seeded blocks on every core; deterministic for a given spec.
fn random_bf16_tensors(spec: &BenchModelSpec, tensors: &[(String, Vec<usize>)]) -> Vec<Vec<u8>> {
    let mut data: Vec<Vec<u8>> =
        tensors.iter().map(|(_, s)| vec![0u8; 2 * s.iter().product::<usize>()]).collect();
    // Work items: (tensor, block within it, bytes). Blocks are 1M elements (norms and tails are
    // smaller), so an even split of the list is an even split of the work.
    let mut jobs: Vec<(usize, usize, &mut [u8])> = Vec::new();
    for (ti, buf) in data.iter_mut().enumerate() {
        for (block, chunk) in buf.chunks_mut(2 * BLOCK).enumerate() {
            jobs.push((ti, block, chunk));
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = jobs.len().div_ceil(threads);
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let a = 0.02f32 * 3f32.sqrt();
    let one = f32_to_bf16(1.0).to_le_bytes();
    std::thread::scope(|s| {
        for part in jobs.chunks_mut(per_thread) {
            s.spawn(move || {
                for (ti, block, chunk) in part.iter_mut() {
                    if tensors[*ti].1.len() == 1 {
                        chunk.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&one));
                        continue;
                    }
                    let stream = ((*ti as u64) << 32) | *block as u64;
                    let mut rng = ChaCha8Rng::seed_from_u64(splitmix(spec.seed ^ splitmix(stream)));
                    for c in chunk.chunks_exact_mut(2) {
                        // 24 random bits -> [0, 1) -> [-a, a).
                        let u = (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
                        c.copy_from_slice(&f32_to_bf16((2.0 * u - 1.0) * a).to_le_bytes());
                    }
                }
            });
        }
    });
    drop(jobs);
    data
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Round-to-nearest-even conversion of a finite f32 to bf16 bits.
fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Writes (if needed) and loads the spec's checkpoint through the engine's normal path.
pub fn load_bench_model(spec: &BenchModelSpec, dtype: DType, device: &Device) -> Result<Phi3> {
    let dir = ensure_bench_model(spec)?;
    let dir_str = dir.to_str().context("bench model path is not UTF-8")?;
    let files = ModelSource::parse(dir_str, None)?.resolve()?;
    let model = Phi3::from_checkpoint(&files, dtype, device)?;
    if model.config().num_parameters() != spec.num_parameters() {
        bail!(
            "engine counts {} parameters, the generator wrote {}",
            model.config().num_parameters(),
            spec.num_parameters()
        );
    }
    Ok(model)
}

/// Deterministic token ids below 32000 (ordinary vocabulary, no special tokens).
pub fn prompt_tokens(len: usize, seed: u64) -> Vec<u32> {
    (0..len as u64).map(|i| (splitmix(seed ^ splitmix(i)) % 32000) as u32).collect()
}

/// Sums `buf` on `threads` threads, each over a contiguous share: a pure streaming read, the
/// memory-bandwidth ceiling a decode step (which reads every weight once) can approach.
pub fn parallel_sum(buf: &[f32], threads: usize) -> f32 {
    let share = buf.len().div_ceil(threads.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = buf.chunks(share).map(|c| s.spawn(move || sum_f32(c))).collect();
        handles.into_iter().map(|h| h.join().expect("sum thread panicked")).sum()
    })
}

/// Sum with 32 independent accumulators, so the compiler vectorises it and the loop is bound by
/// memory, not by the latency of a single dependent add chain. Uses AVX-512 when the CPU has it
/// (as the `gcc -O3 -march=native` loop behind `/work/shared/CPU.md` does).
pub fn sum_f32(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        return unsafe { sum_f32_avx512(xs) };
    }
    sum_f32_portable(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_f32_avx512(xs: &[f32]) -> f32 {
    sum_f32_portable(xs)
}

#[inline(always)]
fn sum_f32_portable(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let mut chunks = xs.chunks_exact(32);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_of_the_438m_spec() {
        let s = BenchModelSpec::phi3_438m();
        assert_eq!(s.head_dim(), 96);
        assert_eq!(s.num_parameters(), 438_277_632);
        assert_eq!(s.decode_parameters(), 438_277_632 - 32064 * 1536);
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(-2.0), 0xc000);
        // 1 + 2^-8 is halfway between two bf16 values and rounds to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    }

    #[test]
    fn parallel_sum_matches() {
        let v: Vec<f32> = (0..1001).map(|i| (i % 7) as f32).collect();
        let expect: f32 = v.iter().sum();
        assert_eq!(parallel_sum(&v, 2), expect);
        assert_eq!(parallel_sum(&v, 1), expect);
    }
}
