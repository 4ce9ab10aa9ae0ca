//! `config.json` of a Phi-3 checkpoint, in every form the published checkpoints and
//! `transformers` write it.
//!
//! Two shapes exist for the rotary settings: the one the published checkpoints use
//! (`rope_scaling` with `type: "su" | "longrope"`, `short_factor`, `long_factor`, and a top-level
//! `original_max_position_embeddings`) and the newer `rope_parameters` object written by
//! transformers 5 (`rope_type`, `rope_theta`, `partial_rotary_factor`, ... inside it). Both are
//! normalised into [`Phi3Config`] so the model code never sees the difference.

use std::path::Path;

use serde_json::Value;

use crate::error::{EngineError, Result};

/// How the rotary position embedding is scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain rotary embedding (the 4k models).
    None,
    /// LongRoPE ("su" in the first 128k uploads): per-frequency rescaling factors, one set for
    /// sequences that fit the original context and one for longer ones, plus an attention factor
    /// that multiplies cos and sin.
    LongRope {
        /// Factors used while a sequence fits `original_max_position_embeddings`.
        short_factor: Vec<f64>,
        /// Factors used once a sequence is longer than `original_max_position_embeddings`.
        long_factor: Vec<f64>,
        /// Multiplies cos/sin; derived from the context extension when the config has none.
        attention_factor: f64,
    },
}

/// The architecture hyper-parameters of a `Phi3ForCausalLM` checkpoint, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Phi3Config {
    /// Rows of the embedding and of `lm_head` (32064 for Phi-3, padding rows included).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer (`gate_up_proj` has twice as many rows).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (fewer than query heads for grouped-query attention).
    pub num_key_value_heads: usize,
    /// Per-head width (`hidden_size / num_attention_heads` unless the config says otherwise).
    pub head_dim: usize,
    /// Leading dimensions of each head that are rotated (`head_dim * partial_rotary_factor`).
    pub rotary_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Rotary scaling (LongRoPE for the 128k models, Phi-3.5 and Phi-4-mini).
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Context the model was pre-trained with; LongRoPE switches factors beyond it.
    pub original_max_position_embeddings: usize,
    /// A query attends to at most this many keys (itself included); `None` means unlimited.
    pub sliding_window: Option<usize>,
    /// When true there is no `lm_head.weight`: the embedding matrix is reused.
    pub tie_word_embeddings: bool,
    /// `eos_token_id` of config.json (generation_config.json usually lists more).
    pub eos_token_ids: Vec<u32>,
    /// `bos_token_id`, if any.
    pub bos_token_id: Option<u32>,
}

pub(crate) fn bad(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Config { path: path.to_path_buf(), message: msg.into() }
}

/// Reads a JSON settings file; errors name the file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::Io { path: path.to_path_buf(), source: e })?;
    serde_json::from_str(&text).map_err(|e| bad(path, format!("not valid JSON: {e}")))
}

pub(crate) fn get_usize(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(path, format!("`{key}` must be a non-negative integer, found {x}"))),
    }
}

pub(crate) fn req_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    get_usize(v, key, path)?.ok_or_else(|| bad(path, format!("missing required field `{key}`")))
}

pub(crate) fn get_f64(v: &Value, key: &str, path: &Path) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(path, format!("`{key}` must be a number, found {x}"))),
    }
}

fn get_factors(v: &Value, key: &str, path: &Path) -> Result<Vec<f64>> {
    let arr = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, format!("rope scaling needs a list `{key}`")))?;
    arr.iter()
        .map(|x| x.as_f64().ok_or_else(|| bad(path, format!("`{key}` holds a non-number: {x}"))))
        .collect()
}

pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|n| n as u32)).collect(),
        _ => Vec::new(),
    }
}

/// Architectures this crate can run, as named in `config.json`'s `architectures`.
const SUPPORTED_ARCHITECTURES: &[&str] = &["Phi3ForCausalLM", "Phi3SmallForCausalLM"];

impl Phi3Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?, path)
    }

    /// Validates an already parsed `config.json`; `path` is only used in error messages.
    pub fn from_value(v: &Value, path: &Path) -> Result<Self> {
        if !v.is_object() {
            return Err(bad(path, "expected a JSON object"));
        }
        check_architecture(v, path)?;

        let hidden_size = req_usize(v, "hidden_size", path)?;
        let num_attention_heads = req_usize(v, "num_attention_heads", path)?;
        let num_key_value_heads =
            get_usize(v, "num_key_value_heads", path)?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(bad(path, "attention head counts must be positive"));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(
                path,
                format!(
                    "num_attention_heads ({num_attention_heads}) is not a multiple of \
                     num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = match get_usize(v, "head_dim", path)? {
            Some(h) => h,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(bad(
                        path,
                        format!(
                            "hidden_size ({hidden_size}) is not divisible by \
                             num_attention_heads ({num_attention_heads}) and no head_dim is given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };

        // transformers 5 moves rotary settings into `rope_parameters`; older files keep them at
        // the top level and in `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let lookup_f64 = |key: &str| -> Result<Option<f64>> {
            if let Some(p) = rope_params {
                if let Some(x) = get_f64(p, key, path)? {
                    return Ok(Some(x));
                }
            }
            get_f64(v, key, path)
        };
        let partial_rotary_factor = lookup_f64("partial_rotary_factor")?.unwrap_or(1.0);
        if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(bad(
                path,
                format!("partial_rotary_factor {partial_rotary_factor} is not in (0, 1]"),
            ));
        }
        let rotary_dim = (head_dim as f64 * partial_rotary_factor) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(bad(
                path,
                format!("rotary dimension {rotary_dim} must be even and positive"),
            ));
        }
        let rope_theta = lookup_f64("rope_theta")?.unwrap_or(10000.0);
        let max_position_embeddings = req_usize(v, "max_position_embeddings", path)?;
        let (original_max_position_embeddings, rope_scaling) =
            rope_scaling_of(v, path, rotary_dim, max_position_embeddings)?;

        let sliding_window = get_usize(v, "sliding_window", path)?;
        if sliding_window == Some(0) {
            return Err(bad(path, "sliding_window must be positive"));
        }
        let tie_word_embeddings =
            v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
        let rms_norm_eps = get_f64(v, "rms_norm_eps", path)?.unwrap_or(1e-5);
        let hidden_act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(bad(
                path,
                format!("hidden_act `{hidden_act}` is not supported (Phi-3 uses silu)"),
            ));
        }

        let cfg = Self {
            vocab_size: req_usize(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size", path)?,
            num_hidden_layers: req_usize(v, "num_hidden_layers", path)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            original_max_position_embeddings,
            sliding_window,
            tie_word_embeddings,
            eos_token_ids: token_ids(v.get("eos_token_id")),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
        };
        if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.num_hidden_layers == 0 {
            return Err(bad(
                path,
                "vocab_size, hidden_size and num_hidden_layers must be positive",
            ));
        }
        Ok(cfg)
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters in the checkpoint (embedding and lm_head counted separately unless tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim * h;
        let o = h * self.num_attention_heads * self.head_dim;
        let mlp = 3 * h * self.intermediate_size;
        let per_layer = qkv + o + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + self.num_hidden_layers * per_layer
    }
}

/// The LongRoPE settings of a config: `original_max_position_embeddings` (the context itself
/// when absent) and the scaling, read from `rope_parameters` (transformers 5) or the published
/// `rope_scaling` and top-level keys.
pub(crate) fn rope_scaling_of(
    v: &Value,
    path: &Path,
    rotary_dim: usize,
    max_position_embeddings: usize,
) -> Result<(usize, RopeScaling)> {
    let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
    let original_max_position_embeddings = {
        let from_params = match rope_params {
            Some(p) => get_usize(p, "original_max_position_embeddings", path)?,
            None => None,
        };
        let from_scaling = match v.get("rope_scaling").filter(|s| s.is_object()) {
            Some(s) => get_usize(s, "original_max_position_embeddings", path)?,
            None => None,
        };
        from_params
            .or(get_usize(v, "original_max_position_embeddings", path)?)
            .or(from_scaling)
            .unwrap_or(max_position_embeddings)
    };

    let scaling_obj = match (rope_params, v.get("rope_scaling")) {
        (Some(p), _) if p.get("rope_type").or(p.get("type")).is_some() => Some(p),
        (_, Some(s)) if s.is_object() => Some(s),
        _ => None,
    };
    let rope_scaling = match scaling_obj {
        None => RopeScaling::None,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => RopeScaling::None,
                // transformers renames the legacy names to "longrope".
                "longrope" | "su" | "yarn" => {
                    let short_factor = get_factors(s, "short_factor", path)?;
                    let long_factor = get_factors(s, "long_factor", path)?;
                    let half = rotary_dim / 2;
                    if short_factor.len() != half || long_factor.len() != half {
                        return Err(bad(
                            path,
                            format!(
                                "LongRoPE factors must have rotary_dim/2 = {half} entries, \
                                 found short_factor {} and long_factor {}",
                                short_factor.len(),
                                long_factor.len()
                            ),
                        ));
                    }
                    let factor = match get_f64(s, "factor", path)? {
                        Some(f) => f,
                        None => {
                            max_position_embeddings as f64 / original_max_position_embeddings as f64
                        }
                    };
                    let attention_factor = match get_f64(s, "attention_factor", path)? {
                        Some(a) => a,
                        None if factor <= 1.0 => 1.0,
                        None => (1.0
                            + factor.ln() / (original_max_position_embeddings as f64).ln())
                        .sqrt(),
                    };
                    RopeScaling::LongRope { short_factor, long_factor, attention_factor }
                }
                other => {
                    return Err(bad(
                        path,
                        format!("unsupported rope scaling type `{other}` (expected longrope/su)"),
                    ))
                }
            }
        }
    };
    Ok((original_max_position_embeddings, rope_scaling))
}

/// Whether a parsed `config.json` describes Phi-3-small (`Phi3SmallForCausalLM`, model_type
/// `phi3small`), an architecture of its own (see [`crate::phi3_small_config`]).
pub fn is_phi3_small(v: &Value) -> bool {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let named = v
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().filter_map(Value::as_str).any(|a| a.contains("Phi3Small")));
    model_type == "phi3small" || named
}

fn check_architecture(v: &Value, path: &Path) -> Result<()> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if is_phi3_small(v) {
        return Err(bad(
            path,
            "this is a Phi-3-small (Phi3SmallForCausalLM) config, but this needs a \
             Phi3ForCausalLM model (GGUF, for one, has no Phi-3-small architecture)",
        ));
    }
    let known = archs.iter().any(|a| SUPPORTED_ARCHITECTURES.contains(a))
        || (archs.is_empty() && model_type == "phi3");
    if !known {
        let named = if archs.is_empty() {
            format!("model_type `{model_type}`")
        } else {
            format!("{archs:?}")
        };
        return Err(bad(
            path,
            format!("unknown architecture {named}: phi-serve runs {SUPPORTED_ARCHITECTURES:?} (model_type `phi3`)"),
        ));
    }
    Ok(())
}

/// `generation_config.json`: only the fields the engine needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Every token id that ends a generation (`eos_token_id`, a number or a list).
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// Reads `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Self { eos_token_ids: token_ids(read_json(path)?.get("eos_token_id")) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Phi3Config> {
        Phi3Config::from_value(&v, Path::new("config.json"))
    }

    fn mini() -> Value {
        json!({
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
            "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
            "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
            "rope_scaling": null, "rope_theta": 10000.0, "sliding_window": 2047,
            "rms_norm_eps": 1e-5, "eos_token_id": 32000, "bos_token_id": 1,
            "tie_word_embeddings": false
        })
    }

    #[test]
    fn published_mini_4k() {
        let c = parse(mini()).unwrap();
        assert_eq!((c.head_dim, c.rotary_dim, c.group_size()), (96, 96, 1));
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.sliding_window, Some(2047));
        assert_eq!(c.eos_token_ids, vec![32000]);
        // Phi-3-mini has 3.82B parameters.
        assert_eq!(c.num_parameters(), 3_821_079_552);
    }

    #[test]
    fn legacy_su_and_rope_parameters_agree() {
        let short: Vec<f64> = (0..48).map(|i| 1.0 + i as f64 / 100.0).collect();
        let long: Vec<f64> = (0..48).map(|i| 2.0 + i as f64).collect();
        let mut legacy = mini();
        legacy["max_position_embeddings"] = json!(131072);
        legacy["rope_scaling"] = json!({"type": "su", "short_factor": short, "long_factor": long});
        let mut new = mini();
        new.as_object_mut().unwrap().remove("rope_theta");
        new.as_object_mut().unwrap().remove("original_max_position_embeddings");
        new["max_position_embeddings"] = json!(131072);
        new["rope_parameters"] = json!({"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": short, "long_factor": long, "original_max_position_embeddings": 4096});
        let a = parse(legacy).unwrap();
        let b = parse(new).unwrap();
        assert_eq!(a, b);
        match a.rope_scaling {
            RopeScaling::LongRope { attention_factor, .. } => {
                // sqrt(1 + ln 32 / ln 4096) = sqrt(17/12); GGUF stores it as f32 1.1902381.
                assert!((attention_factor - (17.0f64 / 12.0).sqrt()).abs() < 1e-12)
            }
            RopeScaling::None => panic!("expected LongRoPE"),
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let mut v = mini();
        v["architectures"] = json!(["Phi3SmallForCausalLM"]);
        assert!(parse(v).unwrap_err().to_string().contains("Phi3SmallForCausalLM) config"));
        let mut v = mini();
        v["architectures"] = json!(["LlamaForCausalLM"]);
        assert!(parse(v).unwrap_err().to_string().contains("unknown architecture"));
        let mut v = mini();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(parse(v).unwrap_err().to_string().contains("hidden_size"));
        let mut v = mini();
        v["rope_scaling"] =
            json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]});
        assert!(parse(v).unwrap_err().to_string().contains("48 entries"));
        let mut v = mini();
        v["num_key_value_heads"] = json!(5);
        assert!(parse(v).unwrap_err().to_string().contains("multiple"));
    }

    #[test]
    fn partial_rotary() {
        let mut v = mini();
        v["hidden_size"] = json!(3072);
        v["num_attention_heads"] = json!(24);
        v["num_key_value_heads"] = json!(8);
        v["partial_rotary_factor"] = json!(0.75);
        let c = parse(v).unwrap();
        assert_eq!((c.head_dim, c.rotary_dim, c.group_size()), (128, 96, 3));
    }
}
