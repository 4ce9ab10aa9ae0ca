//! The Phi-3 tokenizer: `tokenizer.json` plus the settings of `tokenizer_config.json`.
//!
//! Phi-3 mini/medium and Phi-3.5-mini use a SentencePiece-Llama vocabulary exported as a Hugging Face
//! `tokenizer.json` (BPE with byte fallback, normalizer `Prepend("▁") + Replace(" " → "▁")`, decoder
//! `Replace("▁" → " ") + ByteFallback + Fuse + Strip(1 leading space)`). [`PhiTokenizer`] wraps the
//! `tokenizers` crate, the same Rust code that backs transformers' `LlamaTokenizerFast`, so that
//! [`PhiTokenizer::encode`] gives the ids of `tokenizer.encode(text, add_special_tokens=False)` and
//! [`PhiTokenizer::decode`] gives the text of `tokenizer.decode(ids, skip_special_tokens=...)`.
//!
//! Added tokens written in the text (`<|user|>`, `<|end|>`, …) are recognised, with their
//! `lstrip`/`rstrip` flags honoured. This matters: the July-2024 tokenizer marks 32001–32010 with
//! `rstrip: true`, so the `\n` after `<|user|>` is absorbed into the special token and the next word
//! gets the `▁` prefix, while the April-2024 tokenizer (`rstrip: false`) produces `▁`, `\n` tokens
//! there. The same prompt string therefore has different ids under the two tokenizer versions;
//! both behaviours are reproduced exactly (see the tests and `CHAT_FORMAT.md` §4).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

/// Errors from loading or running the tokenizer.
///
/// Exists so callers (the HTTP layer) can tell a broken model directory apart from a bad request.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// `tokenizer.json` could not be parsed by the `tokenizers` crate.
    #[error("cannot load tokenizer.json: {0}")]
    Load(String),
    /// A tiktoken ranks file (`cl100k_base.tiktoken`) is malformed; see [`crate::tiktoken`].
    #[error("invalid tiktoken ranks file: {0}")]
    Tiktoken(String),
    /// `tokenizer_config.json` is not valid JSON or has a field of an unexpected type.
    #[error("invalid tokenizer_config.json: {0}")]
    Config(String),
    /// The `tokenizers` crate failed to encode a text.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The `tokenizers` crate failed to decode ids.
    #[error("decoding failed: {0}")]
    Decode(String),
}

/// Result alias for this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// The settings of `tokenizer_config.json` that change tokenization, decoding or chat rendering.
///
/// Exists because `tokenizer.json` alone does not say which strings are BOS/EOS, whether BOS is
/// prepended, or which chat template to use; transformers reads those from this file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// `bos_token` (given as a string or as an `{"content": ...}` AddedToken object).
    pub bos_token: Option<String>,
    /// `eos_token` (string or AddedToken object).
    pub eos_token: Option<String>,
    /// `unk_token` (string or AddedToken object).
    pub unk_token: Option<String>,
    /// `pad_token` (string or AddedToken object).
    pub pad_token: Option<String>,
    /// `add_bos_token`: whether `encode(..., add_special_tokens=True)` prepends BOS (default `false`).
    /// Chat prompts ignore it: see [`crate::chat_template`].
    pub add_bos_token: bool,
    /// `add_eos_token`: whether `encode(..., add_special_tokens=True)` appends EOS (default `false`).
    pub add_eos_token: bool,
    /// `clean_up_tokenization_spaces` (default `false`; `false` in every Phi-3 SentencePiece config,
    /// `true` in Phi-3-small's, whose tokenizer ignores it: see [`PhiTokenizer::decode`]).
    pub clean_up_tokenization_spaces: bool,
    /// `model_max_length`, if present and an integer.
    pub model_max_length: Option<u64>,
    /// Chat templates by name. A plain-string `chat_template` is stored under `"default"`; the
    /// list form `[{"name": ..., "template": ...}]` keeps every entry.
    pub chat_templates: BTreeMap<String, String>,
}

impl TokenizerConfig {
    /// Parses the text of a `tokenizer_config.json`.
    ///
    /// Unknown keys are ignored; keys that are present with the wrong type are errors, so that a
    /// malformed config fails at load time instead of silently changing prompts.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let json: Json =
            serde_json::from_str(text).map_err(|e| TokenizerError::Config(e.to_string()))?;
        let obj = json
            .as_object()
            .ok_or_else(|| TokenizerError::Config("top level is not an object".into()))?;
        let mut cfg = TokenizerConfig {
            bos_token: token_field(obj.get("bos_token"), "bos_token")?,
            eos_token: token_field(obj.get("eos_token"), "eos_token")?,
            unk_token: token_field(obj.get("unk_token"), "unk_token")?,
            pad_token: token_field(obj.get("pad_token"), "pad_token")?,
            add_bos_token: bool_field(obj.get("add_bos_token"), "add_bos_token")?,
            add_eos_token: bool_field(obj.get("add_eos_token"), "add_eos_token")?,
            clean_up_tokenization_spaces: bool_field(
                obj.get("clean_up_tokenization_spaces"),
                "clean_up_tokenization_spaces",
            )?,
            model_max_length: obj.get("model_max_length").and_then(Json::as_u64),
            chat_templates: BTreeMap::new(),
        };
        match obj.get("chat_template") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => {
                cfg.chat_templates.insert("default".into(), s.clone());
            }
            Some(Json::Array(items)) => {
                for item in items {
                    let name = item.get("name").and_then(Json::as_str);
                    let template = item.get("template").and_then(Json::as_str);
                    match (name, template) {
                        (Some(n), Some(t)) => {
                            cfg.chat_templates.insert(n.to_string(), t.to_string());
                        }
                        _ => {
                            return Err(TokenizerError::Config(
                                "chat_template list entries need string `name` and `template`"
                                    .into(),
                            ))
                        }
                    }
                }
            }
            Some(_) => {
                return Err(TokenizerError::Config(
                    "chat_template must be a string or a list of {name, template}".into(),
                ))
            }
        }
        Ok(cfg)
    }

    /// The template transformers uses when no template name is given (`"default"`).
    pub fn default_chat_template(&self) -> Option<&str> {
        self.chat_templates.get("default").map(String::as_str)
    }
}

fn token_field(v: Option<&Json>, key: &str) -> Result<Option<String>> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::Config(format!("`{key}` object has no string `content`"))),
        },
        Some(_) => Err(TokenizerError::Config(format!(
            "`{key}` must be a string or an object with `content`"
        ))),
    }
}

fn bool_field(v: Option<&Json>, key: &str) -> Result<bool> {
    match v {
        None | Some(Json::Null) => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(_) => Err(TokenizerError::Config(format!("`{key}` must be a boolean"))),
    }
}

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    config: TokenizerConfig,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    special_ids: BTreeSet<u32>,
    /// Indexed by id: true for SentencePiece byte-fallback pieces `<0xNN>` of the model vocab.
    byte_fallback: Vec<bool>,
    /// Whether `decode` applies transformers' clean-up (the config's flag, except for tiktoken).
    clean_up: bool,
    /// Whether the decoder is byte-level (tokens are raw bytes that may split a character).
    byte_level: bool,
}

/// A loaded Phi-3 tokenizer (cheap to clone: the data is shared).
///
/// Exists to give the engine one object that encodes prompts, decodes completions and knows the
/// BOS/EOS/special tokens and chat template, all with transformers' semantics.
#[derive(Clone)]
pub struct PhiTokenizer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PhiTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhiTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.inner.config.bos_token)
            .field("eos", &self.inner.config.eos_token)
            .field("special_ids", &self.inner.special_ids)
            .finish()
    }
}

impl PhiTokenizer {
    /// Loads `tokenizer.json` (or, when there is none, Phi-3-small's `cl100k_base.tiktoken`), and
    /// if present `tokenizer_config.json` and `chat_template.jinja` from a model directory.
    ///
    /// A `chat_template.jinja` file (the form newer transformers versions save) replaces the
    /// config's default template, as transformers does.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let mut config = if config_path.is_file() {
            TokenizerConfig::from_json_str(&read_to_string(&config_path)?)?
        } else {
            TokenizerConfig::default()
        };
        let template_path = dir.join("chat_template.jinja");
        if template_path.is_file() {
            config.chat_templates.insert("default".into(), read_to_string(&template_path)?);
        }
        let json_path = dir.join("tokenizer.json");
        let tiktoken_path = dir.join(crate::tiktoken::CL100K_FILE_NAME);
        if !json_path.is_file() && tiktoken_path.is_file() {
            let config_text =
                if config_path.is_file() { Some(read_to_string(&config_path)?) } else { None };
            let tokenizer =
                crate::tiktoken::build_tokenizer(&read(&tiktoken_path)?, config_text.as_deref())?;
            return Ok(Self::build_with(tokenizer, config, false));
        }
        let tokenizer = load_tokenizer_json(&read(&json_path)?)?;
        Ok(Self::build(tokenizer, config))
    }

    /// Loads from explicit paths: the tokenizer file and an optional `tokenizer_config.json`.
    ///
    /// The tokenizer file is a `tokenizer.json`, or, when its name ends in `.tiktoken`, a tiktoken
    /// ranks file (Phi-3-small's `cl100k_base.tiktoken`), loaded with
    /// [`PhiTokenizer::from_tiktoken_bytes`].
    pub fn from_files(tokenizer_json: impl AsRef<Path>, config: Option<&Path>) -> Result<Self> {
        let path = tokenizer_json.as_ref();
        let bytes = read(path)?;
        let config_text = match config {
            Some(p) => Some(read_to_string(p)?),
            None => None,
        };
        let is_tiktoken =
            path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".tiktoken"));
        if is_tiktoken {
            Self::from_tiktoken_bytes(&bytes, config_text.as_deref())
        } else {
            Self::from_json_bytes(&bytes, config_text.as_deref())
        }
    }

    /// Loads Phi-3-small's tokenizer from the contents of a tiktoken ranks file and an optional
    /// `tokenizer_config.json` (see [`crate::tiktoken`] for how it is built).
    ///
    /// Decoding is tiktoken's (`Phi3SmallTokenizer.decode`): the tokens' bytes as UTF-8, with no
    /// `clean_up_tokenization_spaces` even though Phi-3-small's config sets it.
    pub fn from_tiktoken_bytes(ranks_file: &[u8], config_json: Option<&str>) -> Result<Self> {
        let tokenizer = crate::tiktoken::build_tokenizer(ranks_file, config_json)?;
        let config = match config_json {
            Some(text) => TokenizerConfig::from_json_str(text)?,
            None => TokenizerConfig::default(),
        };
        Ok(Self::build_with(tokenizer, config, false))
    }

    /// Loads from in-memory contents of `tokenizer.json` and an optional `tokenizer_config.json`.
    ///
    /// Truncation and padding stored in `tokenizer.json` are disabled, because transformers
    /// overrides them on every call (`truncation=False, padding=False` by default).
    pub fn from_json_bytes(tokenizer_json: &[u8], config_json: Option<&str>) -> Result<Self> {
        let tokenizer = load_tokenizer_json(tokenizer_json)?;
        let config = match config_json {
            Some(text) => TokenizerConfig::from_json_str(text)?,
            None => TokenizerConfig::default(),
        };
        Ok(Self::build(tokenizer, config))
    }

    /// Wraps an already built `tokenizers::Tokenizer` with the given config.
    pub fn from_parts(tokenizer: tokenizers::Tokenizer, config: TokenizerConfig) -> Self {
        Self::build(tokenizer, config)
    }

    fn build(tokenizer: tokenizers::Tokenizer, config: TokenizerConfig) -> Self {
        let clean_up = config.clean_up_tokenization_spaces;
        Self::build_with(tokenizer, config, clean_up)
    }

    /// `clean_up`: whether [`PhiTokenizer::decode`] applies transformers' clean-up.
    fn build_with(
        tokenizer: tokenizers::Tokenizer,
        config: TokenizerConfig,
        clean_up: bool,
    ) -> Self {
        let added = tokenizer.get_added_tokens_decoder();
        let special_ids: BTreeSet<u32> =
            added.iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        let bos_id = config.bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let eos_id = config.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let size = tokenizer.get_vocab_size(true);
        let byte_level = has_byte_level_decoder(&tokenizer);
        let mut byte_fallback = vec![false; size];
        for (token, id) in tokenizer.get_vocab(false) {
            if !byte_level && is_byte_piece(&token) && !added.contains_key(&id) {
                if let Some(slot) = byte_fallback.get_mut(id as usize) {
                    *slot = true;
                }
            }
        }
        PhiTokenizer {
            inner: Arc::new(Inner {
                tokenizer,
                config,
                bos_id,
                eos_id,
                special_ids,
                byte_fallback,
                clean_up,
                byte_level,
            }),
        }
    }

    /// Tokenizes `text` like HF `tokenizer.encode(text, add_special_tokens=False)`.
    ///
    /// Added tokens written in the text (e.g. `"<|user|>"`) are recognised and become their ids;
    /// nothing is prepended or appended. This is how chat prompts are tokenized.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_impl(text, false)
    }

    /// Tokenizes like HF `tokenizer.encode(text)` (`add_special_tokens=True`): prepends BOS when
    /// `add_bos_token` is true and appends EOS when `add_eos_token` is true, as transformers'
    /// `LlamaTokenizerFast.update_post_processor` does. For raw completions prompts only.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let body = self.encode_impl(text, false)?;
        let cfg = &self.inner.config;
        let mut ids = Vec::with_capacity(body.len() + 2);
        if cfg.add_bos_token {
            if let Some(bos) = self.inner.bos_id {
                ids.push(bos);
            }
        }
        ids.extend(body);
        if cfg.add_eos_token {
            if let Some(eos) = self.inner.eos_id {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    fn encode_impl(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids like HF `tokenizer.decode(ids, skip_special_tokens=...)`.
    ///
    /// `skip_special_tokens` drops added tokens flagged `special` (see
    /// [`PhiTokenizer::special_token_ids`]). Ids that do not exist in the tokenizer (the
    /// embedding padding rows 32011–32063 of Phi-3) are ignored, as HF does. When the config sets
    /// `clean_up_tokenization_spaces`, transformers' clean-up is applied (never the case for the
    /// Phi-3 SentencePiece configs), except for a tiktoken tokenizer (Phi-3-small), whose
    /// `Phi3SmallTokenizer.decode` is tiktoken's plain byte decode; see
    /// [`PhiTokenizer::clean_up_tokenization_spaces`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.decode_raw(ids, skip_special_tokens)?;
        if self.inner.clean_up {
            Ok(clean_up_tokenization(&text))
        } else {
            Ok(text)
        }
    }

    /// The decoder pipeline of `tokenizer.json` only, without transformers' optional clean-up.
    pub(crate) fn decode_raw(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The token string of an id (`convert_ids_to_tokens`), e.g. `"▁Hello"`, `"<0x0A>"`, `"<|end|>"`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tokenizer.id_to_token(id)
    }

    /// The id of a token string (`convert_tokens_to_ids`), including added tokens.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    /// Number of ids the tokenizer knows, added tokens included (HF `len(tokenizer)`; 32011 for
    /// Phi-3-mini). The model's embedding has more rows (32064): ids past this are padding.
    pub fn vocab_size(&self) -> usize {
        self.inner.tokenizer.get_vocab_size(true)
    }

    /// Size of the base model vocabulary without added tokens (HF `tokenizer.vocab_size`; 32000).
    pub fn base_vocab_size(&self) -> usize {
        self.inner.tokenizer.get_vocab_size(false)
    }

    /// The BOS token string from the config (`"<s>"` for Phi-3).
    pub fn bos_token(&self) -> Option<&str> {
        self.inner.config.bos_token.as_deref()
    }

    /// The id of [`PhiTokenizer::bos_token`], if the token exists in the vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_id
    }

    /// The EOS token string from the config (`"<|endoftext|>"` for Phi-3). Generation should also
    /// stop on the ids of `generation_config.json` (32000, 32001, 32007).
    pub fn eos_token(&self) -> Option<&str> {
        self.inner.config.eos_token.as_deref()
    }

    /// The id of [`PhiTokenizer::eos_token`], if the token exists in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_id
    }

    /// `add_bos_token` from the config.
    pub fn add_bos_token(&self) -> bool {
        self.inner.config.add_bos_token
    }

    /// Whether [`PhiTokenizer::decode`] applies transformers' `clean_up_tokenization`: the
    /// config's `clean_up_tokenization_spaces`, except `false` for a tokenizer loaded from a
    /// tiktoken file (Phi-3-small's config says `true`, but its tokenizer never cleans up).
    pub fn clean_up_tokenization_spaces(&self) -> bool {
        self.inner.clean_up
    }

    /// Whether the decoder is byte-level (GPT-2 style, and every tiktoken tokenizer): each token
    /// stands for raw bytes, and a character may be split over several tokens, whose bytes decode
    /// to U+FFFD until the character is complete. The streaming detokenizer holds such text back.
    pub fn is_byte_level(&self) -> bool {
        self.inner.byte_level
    }

    /// Ids of the added tokens flagged `special`: exactly the ids that
    /// `decode(.., skip_special_tokens=true)` drops. Note that `</s>` (id 2) is *not* special in
    /// the July-2024 Phi-3 tokenizer, while it is in the April-2024 one.
    pub fn special_token_ids(&self) -> &BTreeSet<u32> {
        &self.inner.special_ids
    }

    /// Whether `id` is in [`PhiTokenizer::special_token_ids`].
    pub fn is_special_token(&self, id: u32) -> bool {
        self.inner.special_ids.contains(&id)
    }

    /// Whether `id` is a SentencePiece byte-fallback piece (`<0x00>`…`<0xFF>`), which the decoder
    /// turns into a raw byte. The streaming detokenizer needs this to hold back partial UTF-8.
    pub fn is_byte_fallback_token(&self, id: u32) -> bool {
        self.inner.byte_fallback.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether `id` exists in the tokenizer (base vocabulary or added tokens).
    pub fn contains_id(&self, id: u32) -> bool {
        self.inner.tokenizer.id_to_token(id).is_some()
    }

    /// The config read from `tokenizer_config.json` (defaults if there was none).
    pub fn config(&self) -> &TokenizerConfig {
        &self.inner.config
    }

    /// The default chat template (`tokenizer_config.json` `chat_template`, or `chat_template.jinja`).
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.config.default_chat_template()
    }

    /// The underlying `tokenizers` object, for features this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner.tokenizer
    }
}

/// Parses `tokenizer.json` and disables its stored truncation/padding (transformers overrides
/// them per call, to none by default).
fn load_tokenizer_json(bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    let mut tokenizer = tokenizers::Tokenizer::from_bytes(bytes)
        .map_err(|e| TokenizerError::Load(e.to_string()))?;
    tokenizer.with_truncation(None).map_err(|e| TokenizerError::Load(e.to_string()))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// Whether the decoder is `ByteLevel`, alone or inside a `Sequence`.
fn has_byte_level_decoder(tokenizer: &tokenizers::Tokenizer) -> bool {
    fn is_byte_level(d: &tokenizers::DecoderWrapper) -> bool {
        match d {
            tokenizers::DecoderWrapper::ByteLevel(_) => true,
            tokenizers::DecoderWrapper::Sequence(s) => s.get_decoders().iter().any(is_byte_level),
            _ => false,
        }
    }
    tokenizer.get_decoder().is_some_and(is_byte_level)
}

/// `<0xNN>` with two hex digits: the pieces the ByteFallback decoder converts to bytes.
fn is_byte_piece(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 6
        && token.starts_with("<0x")
        && b[5] == b'>'
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// transformers' `PreTrainedTokenizerBase.clean_up_tokenization` (sequential replacements).
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_accepts_both_token_forms_and_template_list() {
        let cfg = TokenizerConfig::from_json_str(
            r#"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                "eos_token": "<|endoftext|>", "add_bos_token": true,
                "chat_template": [{"name": "default", "template": "D"},
                                  {"name": "tool_use", "template": "T"}]}"#,
        )
        .expect("valid config");
        assert_eq!(cfg.bos_token.as_deref(), Some("<s>"));
        assert_eq!(cfg.eos_token.as_deref(), Some("<|endoftext|>"));
        assert!(cfg.add_bos_token);
        assert!(!cfg.add_eos_token);
        assert_eq!(cfg.default_chat_template(), Some("D"));
        assert_eq!(cfg.chat_templates.get("tool_use").map(String::as_str), Some("T"));
    }

    #[test]
    fn config_rejects_wrong_types() {
        assert!(TokenizerConfig::from_json_str(r#"{"add_bos_token": "yes"}"#).is_err());
        assert!(TokenizerConfig::from_json_str(r#"{"bos_token": 3}"#).is_err());
        assert!(TokenizerConfig::from_json_str(r#"{"chat_template": 3}"#).is_err());
        assert!(TokenizerConfig::from_json_str(r#"[1]"#).is_err());
        assert!(TokenizerConfig::from_json_str("not json").is_err());
    }

    #[test]
    fn byte_piece_pattern() {
        assert!(is_byte_piece("<0x0A>"));
        assert!(is_byte_piece("<0xf0>"));
        assert!(!is_byte_piece("<0xG0>"));
        assert!(!is_byte_piece("<0x0A"));
        assert!(!is_byte_piece("<|end|>"));
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("Hello , world ! I 'm here . Isn 't it ?"),
            "Hello, world! I'm here. Isn 't it?"
        );
        assert_eq!(clean_up_tokenization("do n't"), "don't");
    }
}
