//! Command-line options shared by the subcommands that load a model.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use phi_engine::chat_template::SystemRolePolicy;
use phi_engine::checkpoint::ModelSource;
use phi_engine::engine::{Engine, LoadOptions};
use phi_engine::quantize::QuantScheme;
use phi_engine::rope::LongRopePolicy;

/// The model to load and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A TOML file of settings: its keys are this command's long flags (`max-batch-size = 16`,
    /// lists for repeatable ones). The command line, then the PHI_SERVE_* variables, take
    /// precedence over it.
    #[arg(long, env = "PHI_SERVE_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// A local model folder or `.gguf` file, a Hugging Face repository id, or one GGUF file of
    /// a repository as `owner/name/file.gguf`. `models/tiny/phi3-mini-4k` is a bundled tiny
    /// random-weight model for offline demos.
    #[arg(long, env = "PHI_SERVE_MODEL", default_value = "microsoft/Phi-3-mini-4k-instruct")]
    pub model: String,
    /// Branch, tag or commit of a hub repository.
    #[arg(long, env = "PHI_SERVE_REVISION")]
    pub revision: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`; by default CUDA when built with it and a GPU is present.
    #[arg(long, env = "PHI_SERVE_DEVICE")]
    pub device: Option<String>,
    /// Weight and activation dtype; by default f32 on CPU and bf16 on CUDA.
    #[arg(long, env = "PHI_SERVE_DTYPE", value_enum)]
    pub dtype: Option<DTypeArg>,
    /// System messages: `auto` uses the template's system turn if it renders one and otherwise
    /// translates them into user text; `native` passes them to the template; `to-user` always
    /// translates.
    #[arg(long, env = "PHI_SERVE_SYSTEM_ROLE", value_enum, default_value = "auto")]
    pub system_role: SystemRoleArg,
    /// LongRoPE models: `dynamic` matches transformers (short factors up to the original
    /// context, then the sequence is re-encoded with the long ones); `always-long` uses the
    /// long factors for every position (as vLLM does).
    #[arg(long, env = "PHI_SERVE_LONG_ROPE", value_enum, default_value = "dynamic")]
    pub long_rope: LongRopeArg,
    /// Tokens per engine step (chunked prefill): every running stream's next token, then chunks
    /// of waiting prompts, oldest first, up to this many in all, so prompts that arrive (long
    /// or many at once) do not stall the streams already running; 0 feeds whole prompts.
    #[arg(long, env = "PHI_SERVE_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Megabytes of finished conversations' keys and values kept so that a later prompt that
    /// starts the same way (the same system prompt, the conversation so far) skips recomputing
    /// them; 0 turns reuse off. They stay in the KV pool's blocks, which running sequences take
    /// back whenever they need them.
    #[arg(long, env = "PHI_SERVE_PREFIX_CACHE_MB", default_value_t = 1024)]
    pub prefix_cache_mb: usize,
    /// Quantize a safetensors checkpoint's matrices as they load: q8_0, q6_k, q5_k_m, q5_k,
    /// q5_1, q5_0, q4_k_m, q4_k, q4_1, q4_0, q3_k, q2_k (llama.cpp's formats and mixes; norms
    /// stay float). GGUF files run in the formats they store.
    #[arg(long, env = "PHI_SERVE_QUANTIZE", value_parser = parse_scheme)]
    pub quantize: Option<QuantScheme>,
    /// Worker threads of the CPU kernels; by default one per physical core (hyper-threads
    /// share a core's execution units and only add contention to memory-bound decode).
    #[arg(long, env = "PHI_SERVE_THREADS")]
    pub threads: Option<usize>,
    /// Element type of the KV cache: `auto` is f16 on the CPU for block-quantized weights
    /// (what llama.cpp caches; it halves the bytes that attention reads per generated token)
    /// and otherwise the activation dtype (what the reference caches).
    #[arg(long, env = "PHI_SERVE_KV_CACHE_DTYPE", value_enum, default_value = "auto")]
    pub kv_cache_dtype: KvDTypeArg,
}

/// `--kv-cache-dtype` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KvDTypeArg {
    /// f16 for quantized weights on the CPU, else the activation dtype.
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

/// `--quantize` / `--type` values.
pub fn parse_scheme(s: &str) -> std::result::Result<QuantScheme, String> {
    QuantScheme::parse(s).map_err(|e| e.to_string())
}

/// `--dtype` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

/// `--system-role` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SystemRoleArg {
    /// Detect from the template.
    Auto,
    /// Pass system messages to the template.
    Native,
    /// Translate system messages into user text.
    ToUser,
}

/// `--long-rope` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LongRopeArg {
    /// Exactly as transformers.
    Dynamic,
    /// Long factors always.
    AlwaysLong,
}

fn parse_device(spec: Option<&str>) -> Result<Device> {
    match spec {
        None => {
            // candle's `cuda_is_available()` only says the build has CUDA: ask for the GPU
            // itself, and fall back to the CPU where there is none (no device visible, e.g.
            // CUDA_VISIBLE_DEVICES empty, or a driver without GPUs).
            #[cfg(feature = "cuda")]
            match Device::new_cuda(0) {
                Ok(device) => return Ok(device),
                Err(e) => tracing::warn!("no usable CUDA device ({e}): running on the CPU"),
            }
            Ok(Device::Cpu)
        }
        Some("cpu") => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("--device {s}: bad GPU ordinal"))?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                bail!("--device {s}: this phi-serve was built without CUDA (build with --features cuda)");
            }
            Device::new_cuda(ordinal).with_context(|| format!("--device {s}"))
        }
        Some(other) => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

impl ModelArgs {
    /// Sizes the CPU kernels' thread pool. Must run before any thread is started: the kernels'
    /// pools read `RAYON_NUM_THREADS` once, when they first start.
    pub fn apply_threads(&self) -> Result<()> {
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads must be at least 1");
            }
            // SAFETY (edition 2021 `set_var`): called from `main` before any other thread exists.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        Ok(())
    }

    /// Resolves and loads the model, logging where it came from.
    pub fn load(&self) -> Result<Engine> {
        let device = parse_device(self.device.as_deref())?;
        let dtype = match (self.dtype, device.is_cuda()) {
            (Some(DTypeArg::F32), _) | (None, false) => DType::F32,
            (Some(DTypeArg::Bf16), _) | (None, true) => DType::BF16,
            (Some(DTypeArg::F16), _) => DType::F16,
        };
        let opts = LoadOptions {
            device,
            dtype,
            system_role: match self.system_role {
                SystemRoleArg::Auto => SystemRolePolicy::Auto,
                SystemRoleArg::Native => SystemRolePolicy::Native,
                SystemRoleArg::ToUser => SystemRolePolicy::ToUser,
            },
            long_rope: match self.long_rope {
                LongRopeArg::Dynamic => LongRopePolicy::Dynamic,
                LongRopeArg::AlwaysLong => LongRopePolicy::AlwaysLong,
            },
            prefill_chunk: Some(self.prefill_chunk).filter(|&n| n > 0),
            prefix_cache_bytes: self.prefix_cache_mb.saturating_mul(1 << 20),
            // `serve` sizes the pool from the memory left after loading.
            kv_cache_tokens: None,
            quantize: self.quantize,
            kv_cache_dtype: match self.kv_cache_dtype {
                KvDTypeArg::Auto => None,
                KvDTypeArg::F32 => Some(DType::F32),
                KvDTypeArg::Bf16 => Some(DType::BF16),
                KvDTypeArg::F16 => Some(DType::F16),
            },
        };
        let source = ModelSource::parse(&self.model, self.revision.as_deref())?;
        let engine = Engine::load(&source, &opts)?;
        crate::allocator::release_unused();
        Ok(engine)
    }
}
