//! GGUF model files, the format of llama.cpp and Ollama: one file holding the architecture's
//! hyper-parameters, the tokenizer, the chat template and every tensor (block-quantized or not).
//!
//! Phi-3 files use llama.cpp's `phi3` architecture: tensor names `token_embd`, `blk.N.attn_qkv`
//! (the fused `[Q | K | V]` projection), `blk.N.ffn_up` (the fused `[gate | up]` MLP), ... and
//! keys `phi3.context_length`, `phi3.rope.dimension_count`, `phi3.attention.sliding_window`, the
//! LongRoPE factor tensors `rope_factors_short` / `rope_factors_long` with
//! `phi3.rope.scaling.attn_factor`. The mapping to the Hugging Face names lives here, in one
//! place, for both reading and writing ([`crate::quantize`]).

use std::collections::HashMap;
use std::io::{BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{Phi3Config, RopeScaling};
use crate::error::{EngineError, Result};
use crate::gguf_vocab::GgufVocab;
use crate::projection::{Embedding, Projection};
use crate::weights::ModelWeights;

/// The `general.architecture` this crate runs.
pub const ARCHITECTURE: &str = "phi3";

/// Hugging Face names of the whole-model tensors and their GGUF names.
const MODEL_TENSORS: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Per-layer tensors: the suffix after `model.layers.N.` and after `blk.N.`.
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Maps `name` from one naming to the other: `from_prefix`/`to_prefix` are the layer prefixes
/// (`model.layers.` and `blk.`), `pick` chooses the (from, to) side of each table entry.
fn translate(
    name: &str,
    from_prefix: &str,
    to_prefix: &str,
    pick: fn(&(&'static str, &'static str)) -> (&'static str, &'static str),
) -> Option<String> {
    if let Some((_, to)) = MODEL_TENSORS.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (layer, suffix) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, to) = LAYER_TENSORS.iter().map(pick).find(|(from, _)| *from == suffix)?;
    Some(format!("{to_prefix}{layer}.{to}"))
}

/// The GGUF name of a Hugging Face `Phi3ForCausalLM` tensor name, or `None` for a name the
/// format has no place for.
pub fn gguf_name(hf: &str) -> Option<String> {
    translate(hf, "model.layers.", "blk.", |&(h, g)| (h, g))
}

/// The Hugging Face name of a GGUF tensor name (the inverse of [`gguf_name`]).
pub fn hf_name(gguf: &str) -> Option<String> {
    translate(gguf, "blk.", "model.layers.", |&(h, g)| (g, h))
}

/// phi-serve's own key: every end-of-sequence id of the checkpoint (`config.json` and
/// `generation_config.json`), which llama.cpp's single `tokenizer.ggml.eos_token_id` cannot hold.
pub const EOS_IDS_KEY: &str = "phi_serve.eos_token_ids";

/// The LongRoPE factor tensors (float32, `rotary_dim / 2` entries each).
const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";
const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";

/// An opened GGUF file: its metadata and tensor directory, tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<std::fs::File>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Reads the header of `path` (metadata and tensor directory; no tensor data yet).
    pub fn open(path: &Path) -> Result<Self> {
        let io = |e| EngineError::Io { path: path.to_path_buf(), source: e };
        let mut reader = BufReader::new(std::fs::File::open(path).map_err(io)?);
        let content = Content::read(&mut reader).map_err(|e| EngineError::Weights {
            location: path.display().to_string(),
            message: format!("not a valid GGUF file: {e}"),
        })?;
        Ok(Self { path: path.to_path_buf(), content, reader: Mutex::new(reader) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every metadata entry.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Tensor names and their (candle-order) shapes and block formats.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize], GgmlDType)> {
        self.content
            .tensor_infos
            .iter()
            .map(|(n, info)| (n.as_str(), info.shape.dims(), info.ggml_dtype))
    }

    fn bad(&self, message: impl Into<String>) -> EngineError {
        EngineError::Weights { location: self.path.display().to_string(), message: message.into() }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn req_u32(&self, key: &str) -> Result<usize> {
        self.opt_u32(key)?.ok_or_else(|| self.bad(format!("metadata key `{key}` is missing")))
    }

    fn opt_u32(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v {
                Value::U8(_) | Value::U16(_) | Value::U32(_) | Value::U64(_) | Value::I32(_) => {
                    let n = v
                        .to_u64()
                        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                        .map_err(|e| self.bad(format!("`{key}`: {e}")))?;
                    Ok(Some(n as usize))
                }
                other => Err(self.bad(format!("`{key}` must be an integer, found {other:?}"))),
            },
        }
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.bad(format!("`{key}` must be a float, found {other:?}"))),
        }
    }

    /// Reads one tensor onto `device`, in its stored block format.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let mut reader = self.reader.lock().expect("GGUF reader lock");
        self.content
            .tensor(&mut *reader, name, device)
            .map_err(|e| self.bad(format!("{name}: {e}")))
    }

    fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    /// The model's hyper-parameters, from the `phi3.*` keys and the tensor shapes.
    pub fn config(&self) -> Result<Phi3Config> {
        let arch = match self.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(self.bad("metadata key `general.architecture` is missing")),
        };
        if arch != ARCHITECTURE {
            return Err(self.bad(format!(
                "architecture `{arch}`: phi-serve runs `{ARCHITECTURE}` GGUF files (Phi-3, \
                 Phi-3.5, Phi-4-mini)"
            )));
        }
        let k = |s: &str| format!("{ARCHITECTURE}.{s}");
        let hidden_size = self.req_u32(&k("embedding_length"))?;
        let num_attention_heads = self.req_u32(&k("attention.head_count"))?;
        let num_key_value_heads =
            self.opt_u32(&k("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || !num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(self.bad(format!(
                "head counts {num_attention_heads} / {num_key_value_heads} (query / key-value) \
                 are not a positive multiple"
            )));
        }
        let head_dim = match self.opt_u32(&k("attention.key_length"))? {
            Some(h) => h,
            None => hidden_size / num_attention_heads,
        };
        let rotary_dim = self.opt_u32(&k("rope.dimension_count"))?.unwrap_or(head_dim);
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(self.bad(format!("rope dimension count {rotary_dim} is not usable")));
        }
        let max_position_embeddings = self.req_u32(&k("context_length"))?;
        let original_max_position_embeddings = self
            .opt_u32(&k("rope.scaling.original_context_length"))?
            .unwrap_or(max_position_embeddings);
        let embed = self
            .shape_of("token_embd.weight")
            .ok_or_else(|| self.bad("tensor `token_embd.weight` is missing"))?;
        let vocab_size = embed[0];
        let rope_scaling = if self.shape_of(ROPE_FACTORS_LONG).is_some() {
            let factors = |name: &str| -> Result<Vec<f64>> {
                let t = self.qtensor(name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
                let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                if v.len() != rotary_dim / 2 {
                    return Err(self.bad(format!(
                        "{name} has {} entries, the rope dimension count implies {}",
                        v.len(),
                        rotary_dim / 2
                    )));
                }
                Ok(v.into_iter().map(f64::from).collect())
            };
            let long_factor = factors(ROPE_FACTORS_LONG)?;
            let short_factor = if self.shape_of(ROPE_FACTORS_SHORT).is_some() {
                factors(ROPE_FACTORS_SHORT)?
            } else {
                long_factor.clone()
            };
            let scale = max_position_embeddings as f64 / original_max_position_embeddings as f64;
            let attention_factor = match self.opt_f32(&k("rope.scaling.attn_factor"))? {
                Some(a) => a,
                None if scale <= 1.0 => 1.0,
                None => (1.0 + scale.ln() / (original_max_position_embeddings as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope { short_factor, long_factor, attention_factor }
        } else {
            RopeScaling::None
        };
        let sliding_window = self.opt_u32(&k("attention.sliding_window"))?.filter(|&w| w > 0);
        let mut eos_token_ids: Vec<u32> = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = self.opt_u32(key)? {
                eos_token_ids.push(id as u32);
            }
        }
        if let Some(v) = self.get(EOS_IDS_KEY) {
            let list = v.to_vec().map_err(|e| self.bad(format!("`{EOS_IDS_KEY}`: {e}")))?;
            for id in list {
                let id = id.to_u32().map_err(|e| self.bad(format!("`{EOS_IDS_KEY}`: {e}")))?;
                eos_token_ids.push(id);
            }
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        Ok(Phi3Config {
            vocab_size,
            hidden_size,
            intermediate_size: self.req_u32(&k("feed_forward_length"))?,
            num_hidden_layers: self.req_u32(&k("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            rms_norm_eps: self.opt_f32(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: self.opt_f32(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings,
            original_max_position_embeddings,
            sliding_window,
            tie_word_embeddings: self.shape_of("output.weight").is_none(),
            eos_token_ids,
            bos_token_id: self.opt_u32("tokenizer.ggml.bos_token_id")?.map(|b| b as u32),
        })
    }

    /// The tokenizer stored in the metadata.
    pub fn vocab(&self) -> Result<GgufVocab> {
        GgufVocab::from_metadata(&self.content.metadata)
    }

    /// The most common block format of the projection matrices (what the file "is": Q4_K, ...).
    pub fn main_dtype(&self) -> Option<GgmlDType> {
        let mut counts: HashMap<GgmlDType, usize> = HashMap::new();
        for (name, info) in &self.content.tensor_infos {
            if name.starts_with("blk.") && info.shape.rank() == 2 {
                *counts.entry(info.ggml_dtype).or_default() += info.shape.elem_count();
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
}

/// A GGUF file's tensors as the model asks for them, by Hugging Face name.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    dtype: DType,
    device: Device,
}

impl<'a> GgufWeights<'a> {
    /// Tensors of `file`, dense ones converted to `dtype`, all placed on `device`.
    pub fn new(file: &'a GgufFile, dtype: DType, device: &Device) -> Self {
        Self { file, dtype, device: device.clone() }
    }

    fn checked(&self, name: &str, shape: &[usize]) -> Result<(String, QTensor)> {
        let g = gguf_name(name).ok_or_else(|| self.file.bad(format!("no GGUF name for {name}")))?;
        let found = self
            .file
            .shape_of(&g)
            .ok_or_else(|| self.file.bad(format!("tensor `{g}` (shape {shape:?}) is missing")))?;
        if found != shape {
            return Err(self.file.bad(format!(
                "tensor `{g}` has shape {found:?}, but the metadata implies {shape:?}"
            )));
        }
        let q = self.file.qtensor(&g, &self.device)?;
        Ok((g, q))
    }
}

fn is_float(d: GgmlDType) -> bool {
    matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

impl ModelWeights for GgufWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (_, q) = self.checked(name, shape)?;
        Ok(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
    }

    fn projection(&self, name: &str, shape: [usize; 2]) -> Result<Projection> {
        let (_, q) = self.checked(name, &shape)?;
        if is_float(q.dtype()) {
            // Float matrices run as dense ones in the activation dtype.
            return Ok(Projection::dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?));
        }
        Projection::quantized(Arc::new(q))
    }

    fn embedding(&self, name: &str, shape: [usize; 2]) -> Result<Embedding> {
        let (_, q) = self.checked(name, &shape)?;
        let row_blocks = shape[1].is_multiple_of(q.dtype().block_size());
        if is_float(q.dtype()) || !row_blocks || !self.device.is_cpu() {
            return Ok(Embedding::Dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?));
        }
        Ok(Embedding::Quantized(Arc::new(q)))
    }

    fn names(&self) -> Vec<String> {
        self.file
            .content
            .tensor_infos
            .keys()
            .filter(|n| n.as_str() != ROPE_FACTORS_LONG && n.as_str() != ROPE_FACTORS_SHORT)
            .map(|n| hf_name(n).unwrap_or_else(|| n.clone()))
            .collect()
    }
}

/// Metadata entries and named tensors, in writing order.
pub type MetadataAndTensors = (Vec<(String, Value)>, Vec<(String, QTensor)>);

/// The metadata that describes `cfg` in a `phi3` GGUF file, in llama.cpp's keys, plus the
/// LongRoPE factor tensors when the model has them.
pub fn architecture_metadata(cfg: &Phi3Config) -> Result<MetadataAndTensors> {
    let k = |s: &str| format!("{ARCHITECTURE}.{s}");
    let u = |n: usize| Value::U32(n as u32);
    let mut md = vec![
        ("general.architecture".to_string(), Value::String(ARCHITECTURE.into())),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("rope.scaling.original_context_length"), u(cfg.original_max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (k("rope.dimension_count"), u(cfg.rotary_dim)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("attention.sliding_window"), u(cfg.sliding_window.unwrap_or(0))),
    ];
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        md.push((k("attention.key_length"), u(cfg.head_dim)));
        md.push((k("attention.value_length"), u(cfg.head_dim)));
    }
    if !cfg.eos_token_ids.is_empty() {
        let ids = cfg.eos_token_ids.iter().map(|&i| Value::U32(i)).collect();
        md.push((EOS_IDS_KEY.to_string(), Value::Array(ids)));
    }
    let mut tensors = Vec::new();
    if let RopeScaling::LongRope { short_factor, long_factor, attention_factor } = &cfg.rope_scaling
    {
        md.push((k("rope.scaling.attn_factor"), Value::F32(*attention_factor as f32)));
        for (name, f) in [(ROPE_FACTORS_LONG, long_factor), (ROPE_FACTORS_SHORT, short_factor)] {
            let v: Vec<f32> = f.iter().map(|&x| x as f32).collect();
            let t = Tensor::from_vec(v, f.len(), &Device::Cpu)?;
            tensors.push((name.to_string(), QTensor::quantize(&t, GgmlDType::F32)?));
        }
    }
    Ok((md, tensors))
}

/// Writes a GGUF file: `metadata`, then `tensors` (GGUF names), to `path` (via a temporary
/// file renamed at the end, so an interrupted run leaves no truncated model behind).
pub fn write_file(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let io = |e| EngineError::Io { path: path.to_path_buf(), source: e };
    let tmp = path.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut w, &md, &ts)?;
    w.flush().map_err(io)?;
    w.get_mut().sync_all().map_err(io)?;
    let _ = w.stream_position();
    drop(w);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            gguf_name("model.layers.7.mlp.gate_up_proj.weight").unwrap(),
            "blk.7.ffn_up.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(
            hf_name("blk.12.attn_qkv.weight").unwrap(),
            "model.layers.12.self_attn.qkv_proj.weight"
        );
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        for (h, _) in LAYER_TENSORS {
            let name = format!("model.layers.3.{h}");
            assert_eq!(hf_name(&gguf_name(&name).unwrap()).unwrap(), name);
        }
        assert!(gguf_name("model.layers.x.mlp.down_proj.weight").is_none());
        assert!(hf_name("blk.0.ffn_gate.weight").is_none());
    }
}
