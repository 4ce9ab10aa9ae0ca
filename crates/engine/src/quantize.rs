//! Which block format each tensor gets when a checkpoint is quantized, and the
//! `phi-serve quantize` conversion from a safetensors checkpoint to a GGUF file.
//!
//! The choices follow llama.cpp's `llama-quantize` (`llama_tensor_get_type`) for the tensors
//! Phi-3 has, so a file written here is laid out like the one llama.cpp would write: norms stay
//! float32, `output.weight` (or the tied embedding) gets Q6_K under the 2- to 5-bit formats, the
//! `_M` mixes give the fused QKV projection and a third of the `ffn_down` matrices more bits, and
//! a matrix whose rows do not split into a format's blocks falls back to the next format that
//! fits (K-quants need rows of 256, the others rows of 32).

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::CheckpointFiles;
use crate::config::{GenerationConfig, Phi3Config};
use crate::error::{EngineError, Result};
use crate::gguf::{architecture_metadata, gguf_name, write_file};
use crate::gguf_vocab::GgufVocab;
use crate::projection::{Embedding, Projection};
use crate::weights::{ModelWeights, WeightStore};

/// A quantization recipe, as named on the command line (`--type`, `--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantScheme {
    /// Every matrix in one format (with llama.cpp's `output.weight` rule and block fallbacks).
    Uniform(GgmlDType),
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q5_K for QKV and Q6_K for `output` and a third of
    /// `ffn_down`.
    Q4KM,
    /// llama.cpp's Q5_K_M mix: Q5_K, with Q6_K for QKV, `output` and a third of `ffn_down`.
    Q5KM,
}

/// Every name [`QuantScheme::parse`] accepts, for help texts and errors.
pub const SCHEME_NAMES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k", "q5_1", "q5_0", "q4_k_m", "q4_k",
    "q4_1", "q4_0", "q3_k", "q2_k",
];

impl QuantScheme {
    /// Parses `q4_0`, `Q4_K_M`, `q8_0`, `f16`, ... (case-insensitive, `-` or `_`).
    pub fn parse(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        let d = match norm.as_str() {
            "q4_k_m" => return Ok(Self::Q4KM),
            "q5_k_m" => return Ok(Self::Q5KM),
            "f32" => GgmlDType::F32,
            "f16" => GgmlDType::F16,
            "bf16" => GgmlDType::BF16,
            "q8_0" => GgmlDType::Q8_0,
            "q6_k" => GgmlDType::Q6K,
            "q5_k" | "q5_k_s" => GgmlDType::Q5K,
            "q5_1" => GgmlDType::Q5_1,
            "q5_0" => GgmlDType::Q5_0,
            "q4_k" | "q4_k_s" => GgmlDType::Q4K,
            "q4_1" => GgmlDType::Q4_1,
            "q4_0" => GgmlDType::Q4_0,
            "q3_k" | "q3_k_s" => GgmlDType::Q3K,
            "q2_k" => GgmlDType::Q2K,
            _ => {
                return Err(EngineError::InvalidRequest(format!(
                    "unknown quantization type `{s}`: use one of {}",
                    SCHEME_NAMES.join(", ")
                )))
            }
        };
        Ok(Self::Uniform(d))
    }

    /// The scheme's name as [`Self::parse`] accepts it.
    pub fn name(&self) -> String {
        match self {
            Self::Q4KM => "q4_k_m".into(),
            Self::Q5KM => "q5_k_m".into(),
            Self::Uniform(d) => dtype_name(*d).to_ascii_lowercase(),
        }
    }

    fn base(&self) -> GgmlDType {
        match self {
            Self::Uniform(d) => *d,
            Self::Q4KM => GgmlDType::Q4K,
            Self::Q5KM => GgmlDType::Q5K,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`) for the scheme.
    pub fn file_type(&self) -> u32 {
        match self {
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Uniform(d) => match d {
                GgmlDType::F32 => 0,
                GgmlDType::F16 => 1,
                GgmlDType::Q4_0 => 2,
                GgmlDType::Q4_1 => 3,
                GgmlDType::Q8_0 => 7,
                GgmlDType::Q5_0 => 8,
                GgmlDType::Q5_1 => 9,
                GgmlDType::Q2K => 10,
                GgmlDType::Q3K => 11,
                GgmlDType::Q4K => 14,
                GgmlDType::Q5K => 16,
                GgmlDType::Q6K => 18,
                GgmlDType::BF16 => 32,
                GgmlDType::Q8_1 | GgmlDType::Q8K => 7,
            },
        }
    }

    /// The format of the Hugging Face tensor `name` of shape `shape` in a model of `n_layers`
    /// layers (`tied`: the embedding doubles as `lm_head`).
    pub fn dtype_for(&self, name: &str, shape: &[usize], n_layers: usize, tied: bool) -> GgmlDType {
        if shape.len() != 2 || name.contains("norm") {
            return GgmlDType::F32;
        }
        let base = self.base();
        let is_output = name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight");
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let wanted = if is_output {
            if is_float(base) || base == GgmlDType::Q8_0 {
                base
            } else {
                GgmlDType::Q6K
            }
        } else if name.ends_with("qkv_proj.weight") {
            match self {
                Self::Q4KM => GgmlDType::Q5K,
                Self::Q5KM => GgmlDType::Q6K,
                Self::Uniform(_) => base,
            }
        } else if name.ends_with("down_proj.weight") {
            match (self, layer) {
                (Self::Q4KM | Self::Q5KM, Some(i)) if use_more_bits(i, n_layers) => GgmlDType::Q6K,
                _ => base,
            }
        } else {
            base
        };
        fit_rows(wanted, shape[1])
    }
}

/// llama.cpp's choice of the layers whose `ffn_down` gets more bits in the `_M` mixes: the first
/// and last eighth, and every third layer between.
fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

fn is_float(d: GgmlDType) -> bool {
    matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The nearest format to `wanted` whose block divides a row of `row_len` values (llama.cpp's
/// fallbacks), ending at f16.
fn fit_rows(wanted: GgmlDType, row_len: usize) -> GgmlDType {
    let mut d = wanted;
    if !row_len.is_multiple_of(d.block_size()) {
        d = match d {
            GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        };
    }
    if !row_len.is_multiple_of(d.block_size()) {
        d = GgmlDType::F16;
    }
    d
}

/// The name llama.cpp prints for a block format.
pub fn dtype_name(d: GgmlDType) -> &'static str {
    match d {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A safetensors checkpoint whose matrices are quantized as they are loaded (`--quantize`).
pub struct QuantizingWeights<'a> {
    store: &'a WeightStore,
    scheme: QuantScheme,
    n_layers: usize,
    tied: bool,
    device: Device,
}

impl<'a> QuantizingWeights<'a> {
    /// Wraps `store` (which must load float32 on the CPU: quantization reads floats).
    pub fn new(
        store: &'a WeightStore,
        scheme: QuantScheme,
        cfg: &Phi3Config,
        device: &Device,
    ) -> Self {
        Self {
            store,
            scheme,
            n_layers: cfg.num_hidden_layers,
            tied: cfg.tie_word_embeddings,
            device: device.clone(),
        }
    }

    fn quantized(&self, name: &str, shape: [usize; 2]) -> Result<(GgmlDType, Tensor)> {
        let d = self.scheme.dtype_for(name, &shape, self.n_layers, self.tied);
        Ok((d, self.store.get_as(name, &shape, DType::F32, &Device::Cpu)?))
    }
}

impl ModelWeights for QuantizingWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.get(name, shape)
    }

    fn projection(&self, name: &str, shape: [usize; 2]) -> Result<Projection> {
        let (d, t) = self.quantized(name, shape)?;
        let q = QTensor::quantize(&t, d)?;
        if is_float(d) {
            // A matrix whose rows fit no block runs dense, rounded as the GGUF file stores it,
            // so `--quantize X` computes exactly what a file of X does.
            let dense = q.dequantize(&Device::Cpu)?.to_dtype(self.store.dtype())?;
            return Ok(Projection::dense(dense.to_device(&self.device)?));
        }
        if self.device.is_cpu() {
            return Projection::quantized(Arc::new(q));
        }
        Projection::quantized(Arc::new(QTensor::quantize_onto(&t, d, &self.device)?))
    }

    fn embedding(&self, name: &str, shape: [usize; 2]) -> Result<Embedding> {
        let (d, t) = self.quantized(name, shape)?;
        let q = QTensor::quantize(&t, d)?;
        if is_float(d) || !self.device.is_cpu() {
            let dense = q.dequantize(&Device::Cpu)?.to_dtype(self.store.dtype())?;
            return Ok(Embedding::Dense(dense.to_device(&self.device)?));
        }
        Ok(Embedding::Quantized(Arc::new(q)))
    }

    fn names(&self) -> Vec<String> {
        self.store.names()
    }
}

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub tensor_bytes: usize,
    /// How many tensors got each format, e.g. `[("Q4_K", 96), ("F32", 65)]`.
    pub formats: Vec<(&'static str, usize)>,
}

/// Converts a safetensors checkpoint to a GGUF file of the `scheme` that llama.cpp also loads:
/// the architecture keys, the tokenizer (llama.cpp's vocabulary arrays and the complete
/// `tokenizer.json`), the chat template, and every tensor in llama.cpp's names.
pub fn quantize_checkpoint(
    files: &CheckpointFiles,
    scheme: QuantScheme,
    out: &Path,
) -> Result<QuantizeReport> {
    let mut cfg = Phi3Config::from_file(&files.config)?;
    if let Some(gc) = &files.generation_config {
        // The file must stop where the checkpoint stops: keep every listed end id.
        cfg.eos_token_ids.extend(GenerationConfig::from_file(gc)?.eos_token_ids);
        cfg.eos_token_ids.sort_unstable();
        cfg.eos_token_ids.dedup();
    }
    let store = WeightStore::open(&files.weights, DType::F32, &Device::Cpu)?;
    let tokenizer_json = std::fs::read(&files.tokenizer)
        .map_err(|e| EngineError::Io { path: files.tokenizer.clone(), source: e })?;
    let tokenizer_config = match &files.tokenizer_config {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| EngineError::Io { path: p.clone(), source: e })?,
        ),
        None => None,
    };
    let vocab = GgufVocab::from_hf(&tokenizer_json, tokenizer_config.as_deref(), cfg.vocab_size)?;

    let (arch_md, mut tensors) = architecture_metadata(&cfg)?;
    let name = Path::new(&files.origin)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| files.origin.clone());
    let mut metadata = vec![("general.name".to_string(), Value::String(name))];
    metadata.extend(arch_md);
    metadata.push(("general.file_type".into(), Value::U32(scheme.file_type())));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.extend(vocab.to_metadata());

    let mut names: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![cfg.vocab_size, cfg.hidden_size])];
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        names.push((format!("{p}.input_layernorm.weight"), vec![h]));
        names.push((format!("{p}.self_attn.qkv_proj.weight"), vec![(nq + 2 * nkv) * hd, h]));
        names.push((format!("{p}.self_attn.o_proj.weight"), vec![h, nq * hd]));
        names.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        names.push((format!("{p}.mlp.gate_up_proj.weight"), vec![2 * cfg.intermediate_size, h]));
        names.push((format!("{p}.mlp.down_proj.weight"), vec![h, cfg.intermediate_size]));
    }
    names.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        names.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    let mut counts: std::collections::BTreeMap<&'static str, usize> = Default::default();
    for (hf, shape) in &names {
        let d = scheme.dtype_for(hf, shape, cfg.num_hidden_layers, cfg.tie_word_embeddings);
        let t = store.get(hf, shape)?;
        let q = QTensor::quantize(&t, d)?;
        *counts.entry(dtype_name(d)).or_default() += 1;
        let g = gguf_name(hf).expect("every Phi-3 tensor has a GGUF name");
        tensors.push((g, q));
    }
    for (_, t) in &tensors[..tensors.len() - names.len()] {
        *counts.entry(dtype_name(t.dtype())).or_default() += 1;
    }
    let tensor_bytes = tensors.iter().map(|(_, t)| t.storage_size_in_bytes()).sum();
    write_file(out, &metadata, &tensors)?;
    let mut formats: Vec<(&'static str, usize)> = counts.into_iter().collect();
    formats.sort_by_key(|f| std::cmp::Reverse(f.1));
    Ok(QuantizeReport { tensors: tensors.len(), tensor_bytes, formats })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_round_trip() {
        for n in SCHEME_NAMES {
            let s = QuantScheme::parse(n).unwrap();
            assert_eq!(QuantScheme::parse(&s.name()).unwrap(), s, "{n}");
        }
        assert_eq!(QuantScheme::parse("Q4-K-M").unwrap(), QuantScheme::Q4KM);
        assert!(QuantScheme::parse("q7_0").is_err());
    }

    #[test]
    fn formats_follow_llama_cpp_rules() {
        let s = QuantScheme::Q4KM;
        let n = 32;
        assert_eq!(
            s.dtype_for("model.layers.0.input_layernorm.weight", &[3072], n, false),
            GgmlDType::F32
        );
        assert_eq!(s.dtype_for("lm_head.weight", &[32064, 3072], n, false), GgmlDType::Q6K);
        assert_eq!(
            s.dtype_for("model.embed_tokens.weight", &[32064, 3072], n, false),
            GgmlDType::Q4K
        );
        assert_eq!(
            s.dtype_for("model.embed_tokens.weight", &[32064, 3072], n, true),
            GgmlDType::Q6K
        );
        assert_eq!(
            s.dtype_for("model.layers.5.self_attn.qkv_proj.weight", &[9216, 3072], n, false),
            GgmlDType::Q5K
        );
        // Layers 0-3 and 28-31 and every third between get Q6_K for ffn_down.
        let down = |i: usize| {
            s.dtype_for(&format!("model.layers.{i}.mlp.down_proj.weight"), &[3072, 8192], n, false)
        };
        assert_eq!(down(0), GgmlDType::Q6K);
        assert_eq!(down(4), GgmlDType::Q4K);
        assert_eq!(down(6), GgmlDType::Q6K);
        assert_eq!(down(31), GgmlDType::Q6K);
        // Row fallbacks: 80 values is neither 256- nor 32-aligned, 96 is 32-aligned only.
        assert_eq!(fit_rows(GgmlDType::Q4K, 96), GgmlDType::Q5_0);
        assert_eq!(fit_rows(GgmlDType::Q6K, 96), GgmlDType::Q8_0);
        assert_eq!(fit_rows(GgmlDType::Q4_0, 80), GgmlDType::F16);
        let q8 = QuantScheme::Uniform(GgmlDType::Q8_0);
        assert_eq!(q8.dtype_for("lm_head.weight", &[32064, 3072], n, false), GgmlDType::Q8_0);
        let q40 = QuantScheme::Uniform(GgmlDType::Q4_0);
        assert_eq!(q40.dtype_for("lm_head.weight", &[32064, 3072], n, false), GgmlDType::Q6K);
    }
}
