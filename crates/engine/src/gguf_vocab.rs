//! The tokenizer stored in a GGUF file's metadata (llama.cpp's `tokenizer.ggml.*` keys).
//!
//! A GGUF model file carries its vocabulary as parallel arrays (`tokenizer.ggml.tokens`,
//! `tokenizer.ggml.scores`, `tokenizer.ggml.token_type`) plus the special ids, the BOS/EOS flags
//! and the chat template. [`GgufVocab`] is that data, with the three conversions phi-serve needs:
//!
//! * [`GgufVocab::from_hf`] writes a Hugging Face checkpoint's `tokenizer.json` (+
//!   `tokenizer_config.json`) the way llama.cpp's converter (`convert_hf_to_gguf.py`,
//!   `Phi3MiniModel.set_vocab` + `gguf.SpecialVocab`) does, and keeps the `tokenizer.json` text
//!   under the GGUF-spec key `tokenizer.huggingface.json`;
//! * [`GgufVocab::from_metadata`] / [`GgufVocab::to_metadata`] read and write the metadata keys;
//! * [`GgufVocab::to_tokenizer`] gives a [`PhiTokenizer`]: the embedded `tokenizer.json` when there
//!   is one, otherwise a Hugging Face tokenizer rebuilt from tokens, scores and types (the
//!   transformers `LlamaConverter` construction), which encodes like llama.cpp and like the
//!   post-July-2024 Phi-3 `tokenizer.json`.
//!
//! Rules found on the real llama.cpp file `models/ggml-vocab-phi-3.gguf` (see the tests):
//!
//! * SentencePiece scores: byte pieces `<0xNN>` and the unknown/control pieces score `0.0`; the
//!   other pieces score `-(id - first_normal_id)` (259 for Phi-3), except the pieces made only of
//!   `▁` (U+2581; 16 of them, lengths 1–16), which score `-1e9`. The same scores regenerate the
//!   61249 merges of `tokenizer.json` in their exact order.
//! * Every added token of `tokenizer.json` scores `-1000` and is typed control (3) when `special`,
//!   user-defined (4) otherwise; ids past the tokenizer up to the embedding size are `[PAD{id}]`
//!   with score `-10000` and type 2 (unknown). (llama.cpp's current converter writes type 5,
//!   unused, for them; the reference file, from June 2024, has 2. [`GgufVocab::from_metadata`]
//!   accepts both.)
//! * The file's types and flags are those of the post-July-2024 `tokenizer.json` (`</s>` is not
//!   special, so type 4) together with an April-2024-style `tokenizer_config.json`
//!   (`add_bos_token: true`, the template that drops the system message).

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

use crate::error::{EngineError, Result};
use crate::tokenizer::{PhiTokenizer, TokenizerConfig};

/// The GGUF metadata keys this module reads and writes.
pub mod keys {
    /// Tokenizer family: `"llama"` for SentencePiece (Phi-3), `"gpt2"` for byte-level BPE, ….
    pub const MODEL: &str = "tokenizer.ggml.model";
    /// Pre-tokenizer name (`"default"` for Phi-3).
    pub const PRE: &str = "tokenizer.ggml.pre";
    /// Array of token strings, indexed by id.
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    /// Array of f32 SentencePiece scores, indexed by id.
    pub const SCORES: &str = "tokenizer.ggml.scores";
    /// Array of i32 token types, indexed by id (see [`super::token_type`]).
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    /// BOS id (u32).
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    /// EOS id (u32).
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    /// Unknown-token id (u32).
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    /// Padding id (u32).
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    /// Whether BOS is prepended (bool).
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    /// Whether EOS is appended (bool).
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    /// The default Jinja chat template (string).
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
    /// The complete Hugging Face `tokenizer.json` text (string; a GGUF-spec key).
    pub const HF_JSON: &str = "tokenizer.huggingface.json";
}

/// llama.cpp's token types (`llama_token_type`, the values of `tokenizer.ggml.token_type`).
pub mod token_type {
    /// Not set.
    pub const UNDEFINED: i32 = 0;
    /// An ordinary vocabulary piece.
    pub const NORMAL: i32 = 1;
    /// The unknown token, and the `[PAD{id}]` fillers of older converters.
    pub const UNKNOWN: i32 = 2;
    /// A control (special) token: `<s>`, `<|end|>`, ….
    pub const CONTROL: i32 = 3;
    /// A user-defined (added, not special) token: `</s>` in the July-2024 Phi-3 tokenizer.
    pub const USER_DEFINED: i32 = 4;
    /// An unused slot (the `[PAD{id}]` fillers of current converters).
    pub const UNUSED: i32 = 5;
    /// A byte-fallback piece `<0xNN>`.
    pub const BYTE: i32 = 6;
}

/// Score llama.cpp's converter gives every added token of `tokenizer.json`/`tokenizer_config.json`.
pub const ADDED_TOKEN_SCORE: f32 = -1000.0;
/// Score of the `[PAD{id}]` fillers between the tokenizer's size and the embedding rows.
pub const PAD_TOKEN_SCORE: f32 = -10000.0;
/// SentencePiece score of the pieces made only of `▁` in the Llama/Phi-3 vocabulary.
pub const WHITESPACE_PIECE_SCORE: f32 = -1e9;

/// Added tokens that keep `rstrip: false` when llama.cpp marks Phi-3's special tokens `rstrip`
/// (llama-vocab.cpp, the `"phi-3"`/`"phi3"` model-name case); `</s>` and every other control or
/// user-defined token strip the whitespace after them.
const PHI3_NO_RSTRIP: [&str; 3] = ["<unk>", "<s>", "<|endoftext|>"];

/// The tokenizer of a GGUF file: llama.cpp's `tokenizer.ggml.*` metadata, as plain data.
///
/// Exists so that phi-serve can write a GGUF from a Hugging Face checkpoint exactly as llama.cpp's
/// converter does, and serve a GGUF file with a tokenizer that encodes exactly like the
/// checkpoint's `tokenizer.json` (and like llama.cpp).
#[derive(Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`; only `"llama"` (SentencePiece BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.pre` (`"default"` for Phi-3).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the piece of every id, embedding padding rows included.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: one per token.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type`: one per token (see [`token_type`]).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos_token: Option<bool>,
    /// `tokenizer.chat_template` (the default template).
    pub chat_template: Option<String>,
    /// `tokenizer.huggingface.json`: the checkpoint's complete `tokenizer.json`, if stored.
    pub hf_tokenizer_json: Option<String>,
}

impl std::fmt::Debug for GgufVocab {
    /// A summary: the 32k-entry arrays are shown by length only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufVocab")
            .field("model", &self.model)
            .field("pre", &self.pre)
            .field("tokens", &self.tokens.len())
            .field("scores", &self.scores.len())
            .field("token_types", &self.token_types.len())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("unknown_token_id", &self.unknown_token_id)
            .field("padding_token_id", &self.padding_token_id)
            .field("add_bos_token", &self.add_bos_token)
            .field("add_eos_token", &self.add_eos_token)
            .field("chat_template", &self.chat_template.as_ref().map(String::len))
            .field("hf_tokenizer_json", &self.hf_tokenizer_json.as_ref().map(String::len))
            .finish()
    }
}

fn err(message: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(message.to_string())
}

fn hf_err(message: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(format!("tokenizer.json: {message}"))
}

fn md_err(key: &str, message: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(format!("GGUF metadata `{key}`: {message}"))
}

/// `<0xNN>` with two upper-case hex digits: SentencePiece's byte-fallback pieces.
fn is_byte_piece(piece: &str) -> bool {
    let b = piece.as_bytes();
    b.len() == 6
        && piece.starts_with("<0x")
        && b[5] == b'>'
        && b[3..5].iter().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
}

/// A non-empty piece made only of `▁` (SentencePiece's escaped space).
fn is_whitespace_piece(piece: &str) -> bool {
    !piece.is_empty() && piece.chars().all(|c| c == '\u{2581}')
}

/// A token given in `tokenizer_config.json` as a string or as an `{"content": ...}` object.
fn config_token_content(v: Option<&Json>) -> Option<&str> {
    match v? {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// The id of a `{"SpecialToken": {"id": ...}}` element of a `TemplateProcessing` template.
fn template_special_token(e: &Json) -> Option<&str> {
    e.get("SpecialToken")?.get("id")?.as_str()
}

/// One entry of `added_tokens` / `added_tokens_decoder`.
struct HfAddedToken<'a> {
    id: usize,
    content: &'a str,
    special: bool,
}

fn parse_added_token<'a>(
    id: Option<&Json>,
    entry: &'a Json,
    what: &str,
) -> Result<HfAddedToken<'a>> {
    let id = id
        .and_then(Json::as_u64)
        .and_then(|id| usize::try_from(id).ok())
        .ok_or_else(|| err(format!("{what}: an entry has no integer id")))?;
    let content = entry
        .get("content")
        .and_then(Json::as_str)
        .ok_or_else(|| err(format!("{what}: entry {id} has no string `content`")))?;
    let special = entry.get("special").and_then(Json::as_bool).unwrap_or(false);
    Ok(HfAddedToken { id, content, special })
}

impl GgufVocab {
    /// From a HF checkpoint's tokenizer.json (+ tokenizer_config.json), padded to the model's
    /// `vocab_size` embedding rows, exactly as llama.cpp's converter (convert_hf_to_gguf.py,
    /// Phi3MiniModel.set_vocab) writes it; also stores the tokenizer.json text in
    /// hf_tokenizer_json.
    ///
    /// The converter reads SentencePiece's `tokenizer.model`; this reads the same vocabulary from
    /// `tokenizer.json` (the piece of id *i* is the same in both) and derives the SentencePiece
    /// scores and types with the rules in the module documentation. Then, as the converter does:
    /// every entry of `tokenizer_config.json`'s `added_tokens_decoder`, then of `tokenizer.json`'s
    /// `added_tokens`, overwrites its id with score −1000 and type control (`special`) or
    /// user-defined; ids up to `vocab_size` are `[PAD{id}]` fillers. The special ids and flags follow
    /// `gguf.SpecialVocab`: `bos_token`/`eos_token`/`unk_token`/`pad_token` of the config looked up
    /// among `tokenizer.json`'s added tokens, `add_bos_token`/`add_eos_token` from a
    /// `TemplateProcessing` post-processor and then from the config, `chat_template` from the
    /// config (the `"default"` entry of a template list). `config.json` is not read (the
    /// converter uses its `*_token_id` only for types not found above).
    pub fn from_hf(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&str>,
        vocab_size: usize,
    ) -> Result<Self> {
        let text = std::str::from_utf8(tokenizer_json).map_err(hf_err)?;
        let tj: Json = serde_json::from_str(text).map_err(hf_err)?;
        let cfg: Option<Json> = match tokenizer_config {
            Some(t) => {
                let v: Json = serde_json::from_str(t)
                    .map_err(|e| err(format!("tokenizer_config.json: {e}")))?;
                if !v.is_object() {
                    return Err(err("tokenizer_config.json: top level is not an object"));
                }
                Some(v)
            }
            None => None,
        };

        let model = tj.get("model").ok_or_else(|| hf_err("no `model`"))?;
        match model.get("type").and_then(Json::as_str) {
            Some("BPE") => {}
            other => {
                return Err(hf_err(format!(
                    "model type {other:?} is not supported: only SentencePiece BPE (\"BPE\")"
                )))
            }
        }
        let vocab = model
            .get("vocab")
            .and_then(Json::as_object)
            .ok_or_else(|| hf_err("`model.vocab` is not an object"))?;
        let unk = model.get("unk_token").and_then(Json::as_str);
        let added: Vec<HfAddedToken<'_>> = match tj.get("added_tokens") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(items)) => items
                .iter()
                .map(|e| parse_added_token(e.get("id"), e, "tokenizer.json added_tokens"))
                .collect::<Result<_>>()?,
            Some(_) => return Err(hf_err("`added_tokens` is not an array")),
        };
        let added_contents: HashSet<&str> = added.iter().map(|a| a.content).collect();

        // The SentencePiece vocabulary: ids 0..n, each exactly once.
        let n_sp = vocab.len();
        let mut pieces: Vec<Option<&str>> = vec![None; n_sp];
        for (piece, id) in vocab {
            let id = id
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| hf_err(format!("vocab id of {piece:?} is not an integer")))?;
            match pieces.get_mut(id) {
                Some(slot @ None) => *slot = Some(piece.as_str()),
                _ => {
                    return Err(hf_err(format!(
                        "vocab ids are not 0..{n_sp} each once (id {id} of {piece:?})"
                    )))
                }
            }
        }
        if n_sp > vocab_size {
            return Err(err(format!(
                "tokenizer.json has {n_sp} pieces, more than the model's vocab_size {vocab_size}"
            )));
        }

        let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
        let mut scores = vec![PAD_TOKEN_SCORE; vocab_size];
        let mut token_types = vec![token_type::UNKNOWN; vocab_size];
        let mut first_normal: Option<usize> = None;
        for (id, piece) in pieces.iter().enumerate() {
            let piece = piece.expect("every id was filled: n_sp distinct ids below n_sp");
            let (ty, score) = if Some(piece) == unk {
                (token_type::UNKNOWN, 0.0)
            } else if added_contents.contains(piece) {
                (token_type::CONTROL, 0.0)
            } else if is_byte_piece(piece) {
                (token_type::BYTE, 0.0)
            } else {
                let first = *first_normal.get_or_insert(id);
                let score = if is_whitespace_piece(piece) {
                    WHITESPACE_PIECE_SCORE
                } else {
                    0.0 - (id - first) as f32
                };
                (token_type::NORMAL, score)
            };
            tokens[id] = piece.to_string();
            scores[id] = score;
            token_types[id] = ty;
        }

        let mut overrides: Vec<HfAddedToken<'_>> = Vec::new();
        if let Some(dec) = cfg.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
            let dec = dec.as_object().ok_or_else(|| {
                err("tokenizer_config.json: `added_tokens_decoder` is not an object")
            })?;
            for (key, entry) in dec {
                let id = key.parse::<u64>().ok().map(Json::from);
                overrides.push(parse_added_token(
                    id.as_ref(),
                    entry,
                    "tokenizer_config.json added_tokens_decoder",
                )?);
            }
        }
        for a in &added {
            overrides.push(HfAddedToken { id: a.id, content: a.content, special: a.special });
        }
        for a in &overrides {
            if a.id >= vocab_size {
                return Err(err(format!(
                    "added token {:?} has id {}, not below vocab_size {vocab_size}",
                    a.content, a.id
                )));
            }
            tokens[a.id] = a.content.to_string();
            scores[a.id] = ADDED_TOKEN_SCORE;
            token_types[a.id] =
                if a.special { token_type::CONTROL } else { token_type::USER_DEFINED };
        }

        // gguf.SpecialVocab: ids of the config's special tokens among tokenizer.json's added tokens.
        let cfg_token = |typ: &str| {
            cfg.as_ref().and_then(|c| config_token_content(c.get(format!("{typ}_token").as_str())))
        };
        let special_id = |content: Option<&str>| -> Option<u32> {
            let content = content?;
            let id = added.iter().find(|a| a.content == content)?.id;
            if id < vocab_size {
                u32::try_from(id).ok()
            } else {
                None
            }
        };
        let mut bos_content = cfg_token("bos").or_else(|| cfg_token("cls"));
        let mut eos_content = cfg_token("eos").or_else(|| cfg_token("sep"));
        let (mut add_bos_token, mut add_eos_token) = (None, None);
        if let Some(pp) = tj.get("post_processor").filter(|p| !p.is_null()) {
            let processors: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
                Some(list) => list.iter().collect(),
                None => vec![pp],
            };
            for p in processors {
                match p.get("type").and_then(Json::as_str) {
                    Some("RobertaProcessing") => {
                        add_bos_token = Some(true);
                        add_eos_token = Some(true);
                    }
                    Some("TemplateProcessing") => {
                        let single = p.get("single").and_then(Json::as_array);
                        let Some(single) = single.filter(|s| s.len() > 1) else { continue };

                        if let Some(first) = single.first().and_then(template_special_token) {
                            if cfg.is_none() {
                                bos_content = Some(first);
                            }
                            add_bos_token =
                                Some(Some(first) == bos_content || Some(first) == cfg_token("cls"));
                        }
                        // The converter then makes the trailing token the EOS (keeping the old
                        // one as EOT/EOM, which this struct does not carry).
                        if let Some(last) = single.last().and_then(template_special_token) {
                            eos_content = Some(last);
                            add_eos_token = Some(true);
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut chat_template = None;
        if let Some(c) = &cfg {
            if let Some(b) = c.get("add_bos_token").and_then(Json::as_bool) {
                add_bos_token = Some(b);
            }
            if let Some(b) = c.get("add_eos_token").and_then(Json::as_bool) {
                add_eos_token = Some(b);
            }
            chat_template = match c.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|e| e.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|e| e.get("template").and_then(Json::as_str))
                    .map(str::to_string),
                _ => None,
            };
        }

        Ok(GgufVocab {
            model: "llama".into(),
            pre: Some("default".into()),
            tokens,
            scores,
            token_types,
            bos_token_id: special_id(bos_content),
            eos_token_id: special_id(eos_content),
            unknown_token_id: special_id(cfg_token("unk")),
            padding_token_id: special_id(cfg_token("pad")),
            add_bos_token,
            add_eos_token,
            chat_template,
            hf_tokenizer_json: Some(text.to_string()),
        })
    }

    /// From a GGUF file's metadata map (candle_core::quantized::gguf_file::Content::metadata:
    /// HashMap<String, gguf_file::Value>). Clear errors (crate::error::EngineError::Tokenizer or
    /// Weights) for missing/mistyped keys or a model other than "llama".
    ///
    /// `tokenizer.ggml.model`, `.tokens`, `.scores` and `.token_type` are required (the
    /// SentencePiece merges are rebuilt from the scores) and must have one entry per token; the
    /// other keys are optional. Ids may be stored with any integer type (the spec says u32) but
    /// must name a token; token types must be 0–6. Errors are [`EngineError::Tokenizer`] naming
    /// the key.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = md_string(md, keys::MODEL)?
            .ok_or_else(|| md_err(keys::MODEL, "missing: the GGUF file has no tokenizer"))?;
        if model != "llama" {
            return Err(md_err(
                keys::MODEL,
                format!(
                    "tokenizer model {model:?} is not supported (only \"llama\", SentencePiece)"
                ),
            ));
        }
        let tokens: Vec<String> = md_array(md, keys::TOKENS)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(md_err(keys::TOKENS, format!("entry {i} is {other:?}, not a string"))),
            })
            .collect::<Result<_>>()?;
        if tokens.is_empty() {
            return Err(md_err(keys::TOKENS, "empty"));
        }
        let scores: Vec<f32> = md_array(md, keys::SCORES)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => Err(md_err(keys::SCORES, format!("entry {i} is {other:?}, not a float"))),
            })
            .collect::<Result<_>>()?;
        let token_types: Vec<i32> = md_array(md, keys::TOKEN_TYPE)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                integer(v)
                    .and_then(|x| i32::try_from(x).ok())
                    .filter(|t| (token_type::UNDEFINED..=token_type::BYTE).contains(t))
                    .ok_or_else(|| {
                        md_err(keys::TOKEN_TYPE, format!("entry {i} is {v:?}, not a type 0-6"))
                    })
            })
            .collect::<Result<_>>()?;
        let vocab = GgufVocab {
            model: model.clone(),
            pre: md_string(md, keys::PRE)?.cloned(),
            tokens,
            scores,
            token_types,
            bos_token_id: md_id(md, keys::BOS_ID)?,
            eos_token_id: md_id(md, keys::EOS_ID)?,
            unknown_token_id: md_id(md, keys::UNK_ID)?,
            padding_token_id: md_id(md, keys::PAD_ID)?,
            add_bos_token: md_bool(md, keys::ADD_BOS)?,
            add_eos_token: md_bool(md, keys::ADD_EOS)?,
            chat_template: md_string(md, keys::CHAT_TEMPLATE)?.cloned(),
            hf_tokenizer_json: md_string(md, keys::HF_JSON)?.cloned(),
        };
        vocab.validate()?;
        Ok(vocab)
    }

    /// The metadata entries to write (keys and gguf_file::Value), in a stable order.
    ///
    /// The order is that of llama.cpp's converter: model, pre, tokens, scores, token_type, the
    /// bos/eos/unknown/padding ids, add_bos/add_eos, chat_template, then
    /// `tokenizer.huggingface.json`. Absent optional fields are left out.
    pub fn to_metadata(&self) -> Vec<(String, Value)> {
        let mut md = vec![(keys::MODEL.to_string(), Value::String(self.model.clone()))];
        if let Some(pre) = &self.pre {
            md.push((keys::PRE.into(), Value::String(pre.clone())));
        }
        md.push((
            keys::TOKENS.into(),
            Value::Array(self.tokens.iter().cloned().map(Value::String).collect()),
        ));
        md.push((
            keys::SCORES.into(),
            Value::Array(self.scores.iter().map(|&s| Value::F32(s)).collect()),
        ));
        md.push((
            keys::TOKEN_TYPE.into(),
            Value::Array(self.token_types.iter().map(|&t| Value::I32(t)).collect()),
        ));
        for (key, id) in [
            (keys::BOS_ID, self.bos_token_id),
            (keys::EOS_ID, self.eos_token_id),
            (keys::UNK_ID, self.unknown_token_id),
            (keys::PAD_ID, self.padding_token_id),
        ] {
            if let Some(id) = id {
                md.push((key.into(), Value::U32(id)));
            }
        }
        for (key, flag) in
            [(keys::ADD_BOS, self.add_bos_token), (keys::ADD_EOS, self.add_eos_token)]
        {
            if let Some(flag) = flag {
                md.push((key.into(), Value::Bool(flag)));
            }
        }
        if let Some(t) = &self.chat_template {
            md.push((keys::CHAT_TEMPLATE.into(), Value::String(t.clone())));
        }
        if let Some(j) = &self.hf_tokenizer_json {
            md.push((keys::HF_JSON.into(), Value::String(j.clone())));
        }
        md
    }

    /// A ready tokenizer: crate::tokenizer::PhiTokenizer::from_parts(tokenizers::Tokenizer,
    /// TokenizerConfig). If hf_tokenizer_json is present, load it (PhiTokenizer::from_json_bytes-like
    /// path, plus a TokenizerConfig built from the ids/flags/chat template). Otherwise RECONSTRUCT
    /// a HF tokenizer from tokens/scores/types.
    ///
    /// The embedded `tokenizer.json` must agree with `tokens` on every real id (not the
    /// `[PAD{id}]` fillers). The reconstruction is transformers' `LlamaConverter`: a BPE model
    /// with `byte_fallback` and `fuse_unk` over the SentencePiece pieces (ids up to the last
    /// normal/byte piece; the fillers left out, so that, as with Hugging Face, ids past the
    /// tokenizer do not exist and decode to nothing), merges from the scores (for every piece that
    /// is the concatenation of two pieces, ranked by the merged piece's score, higher first, ties
    /// in id order: `SentencePieceExtractor`), normalizer `Prepend("▁") + Replace(" ", "▁")`,
    /// decoder `Replace("▁", " ") + ByteFallback + Fuse + Strip(" ", 1, 0)`, and the control
    /// (special) and user-defined (not special) tokens, plus an unknown-typed `<unk>`, as added
    /// tokens (`normalized: false`, `lstrip: false`). Their `rstrip` follows llama.cpp's Phi-3 rule,
    /// which is also the post-July-2024 Phi-3 `tokenizer.json`: `rstrip: true` except for `<unk>`,
    /// `<s>` and `<|endoftext|>`. The post-processor adds BOS only when `add_bos_token`
    /// (transformers' `update_post_processor`); [`PhiTokenizer::encode`] never runs it.
    pub fn to_tokenizer(&self) -> Result<PhiTokenizer> {
        self.validate()?;
        let tokenizer = match &self.hf_tokenizer_json {
            Some(json) => self.load_hf_json(json)?,
            None => self.reconstruct()?,
        };
        Ok(PhiTokenizer::from_parts(tokenizer, self.tokenizer_config()))
    }

    /// The [`TokenizerConfig`] equivalent of the ids, flags and chat template.
    ///
    /// Missing `add_bos_token`/`add_eos_token` take llama.cpp's defaults for a SentencePiece
    /// vocabulary (BOS added, EOS not).
    pub fn tokenizer_config(&self) -> TokenizerConfig {
        let token = |id: Option<u32>| id.and_then(|i| self.tokens.get(i as usize)).cloned();
        let mut chat_templates = BTreeMap::new();
        if let Some(t) = &self.chat_template {
            chat_templates.insert("default".to_string(), t.clone());
        }
        TokenizerConfig {
            bos_token: token(self.bos_token_id),
            eos_token: token(self.eos_token_id),
            unk_token: token(self.unknown_token_id),
            pad_token: token(self.padding_token_id),
            add_bos_token: self.add_bos_token.unwrap_or(true),
            add_eos_token: self.add_eos_token.unwrap_or(false),
            clean_up_tokenization_spaces: false,
            model_max_length: None,
            chat_templates,
        }
    }

    /// Checks the invariants `from_metadata` guarantees (the fields are public, so a caller may
    /// have broken them): one score and type per token, ids naming tokens.
    fn validate(&self) -> Result<()> {
        let n = self.tokens.len();
        if self.scores.len() != n {
            return Err(md_err(
                keys::SCORES,
                format!("{} scores for {n} tokens", self.scores.len()),
            ));
        }
        if self.token_types.len() != n {
            return Err(md_err(
                keys::TOKEN_TYPE,
                format!("{} token types for {n} tokens", self.token_types.len()),
            ));
        }
        for (key, id) in [
            (keys::BOS_ID, self.bos_token_id),
            (keys::EOS_ID, self.eos_token_id),
            (keys::UNK_ID, self.unknown_token_id),
            (keys::PAD_ID, self.padding_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(md_err(key, format!("id {id} is not below the {n} tokens")));
                }
            }
        }
        Ok(())
    }

    /// Whether `id` is a real token rather than an embedding-padding filler (type unused, or
    /// type unknown other than the unknown token).
    fn is_real(&self, id: usize) -> bool {
        match self.token_types[id] {
            token_type::UNUSED => false,
            token_type::UNKNOWN => id as u32 == self.unk_id(),
            _ => true,
        }
    }

    /// The unknown token id, llama.cpp's default 0 for SentencePiece when the key is absent.
    fn unk_id(&self) -> u32 {
        self.unknown_token_id.unwrap_or(0)
    }

    fn load_hf_json(&self, json: &str) -> Result<tokenizers::Tokenizer> {
        let mut tok = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| md_err(keys::HF_JSON, e))?;
        tok.with_truncation(None).map_err(|e| md_err(keys::HF_JSON, e))?;
        tok.with_padding(None);
        for (id, token) in self.tokens.iter().enumerate() {
            if !self.is_real(id) {
                continue;
            }
            let hf = tok.id_to_token(id as u32);
            if hf.as_deref() != Some(token.as_str()) {
                return Err(md_err(
                    keys::HF_JSON,
                    format!("id {id} is {hf:?} there but {token:?} in {}", keys::TOKENS),
                ));
            }
        }
        Ok(tok)
    }

    fn reconstruct(&self) -> Result<tokenizers::Tokenizer> {
        if self.model != "llama" {
            return Err(md_err(keys::MODEL, format!("{:?} is not supported", self.model)));
        }
        let n = self.tokens.len();
        let is_added = |id: usize| {
            matches!(self.token_types[id], token_type::CONTROL | token_type::USER_DEFINED)
                || (self.token_types[id] == token_type::UNKNOWN && id as u32 == self.unk_id())
        };
        // The model vocabulary ends after the last real piece that is not an added token; added
        // tokens after it become added-only tokens when they follow it without a gap (their ids
        // are then assigned in order, as when Hugging Face loads `added_tokens`).
        let n_model = (0..n)
            .filter(|&i| {
                self.is_real(i)
                    && !matches!(
                        self.token_types[i],
                        token_type::CONTROL | token_type::USER_DEFINED
                    )
            })
            .max()
            .map_or(0, |i| i + 1);
        let tail: Vec<usize> = (n_model..n).filter(|&i| self.is_real(i)).collect();
        let tail_contiguous = tail.iter().enumerate().all(|(k, &id)| id == n_model + k);
        let model_ids: Vec<usize> = (0..n_model)
            .filter(|&i| self.is_real(i))
            .chain(tail.iter().copied().filter(|_| !tail_contiguous))
            .collect();

        let mut piece_ids: HashMap<&str, u32> = HashMap::with_capacity(model_ids.len());
        for &id in &model_ids {
            if let Some(prev) = piece_ids.insert(self.tokens[id].as_str(), id as u32) {
                return Err(md_err(
                    keys::TOKENS,
                    format!("token {:?} appears twice (ids {prev} and {id})", self.tokens[id]),
                ));
            }
        }

        // transformers' SentencePieceExtractor: candidate merges per piece in id order, each
        // piece's splits sorted by (left id, right id), then a stable sort by score, descending.
        let mut ranked: Vec<(u32, u32, f32)> = Vec::new();
        let mut local: Vec<(u32, u32)> = Vec::new();
        for &id in &model_ids {
            let piece = self.tokens[id].as_str();
            local.clear();
            for (pos, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(pos);
                if let (Some(&a), Some(&b)) = (piece_ids.get(l), piece_ids.get(r)) {
                    local.push((a, b));
                }
            }
            local.sort_unstable();
            ranked.extend(local.iter().map(|&(a, b)| (a, b, self.scores[id])));
        }
        ranked.sort_by(|x, y| y.2.partial_cmp(&x.2).unwrap_or(std::cmp::Ordering::Equal));
        let merges: Vec<(String, String)> = ranked
            .into_iter()
            .map(|(a, b, _)| (self.tokens[a as usize].clone(), self.tokens[b as usize].clone()))
            .collect();

        let vocab: Vocab =
            model_ids.iter().map(|&id| (self.tokens[id].clone(), id as u32)).collect();
        let unk = self.unk_id() as usize;
        let mut builder =
            BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
        if unk < n && piece_ids.get(self.tokens[unk].as_str()) == Some(&(unk as u32)) {
            builder = builder.unk_token(self.tokens[unk].clone());
        }
        let bpe = builder.build().map_err(|e| err(format!("rebuilding the BPE model: {e}")))?;

        let mut tok = tokenizers::Tokenizer::new(bpe);
        let replace = |from: &str, to: &str| {
            Replace::new(from, to).map_err(|e| err(format!("tokenizer normalizer: {e}")))
        };
        tok.with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
            NormalizerWrapper::from(Prepend::new("\u{2581}".into())),
            NormalizerWrapper::from(replace(" ", "\u{2581}")?),
        ])));
        tok.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(vec![
            DecoderWrapper::from(replace("\u{2581}", " ")?),
            DecoderWrapper::from(tokenizers::decoders::byte_fallback::ByteFallback::new()),
            DecoderWrapper::from(tokenizers::decoders::fuse::Fuse::new()),
            DecoderWrapper::from(tokenizers::decoders::strip::Strip::new(' ', 1, 0)),
        ])));
        tok.with_post_processor(Some(self.post_processor()?));

        let added_ids: Vec<usize> = (0..n).filter(|&i| self.is_real(i) && is_added(i)).collect();
        let added: Vec<AddedToken> = added_ids
            .iter()
            .map(|&id| {
                let content = self.tokens[id].as_str();
                let special = self.token_types[id] != token_type::USER_DEFINED;
                AddedToken::from(content, special)
                    .single_word(false)
                    .lstrip(false)
                    .rstrip(!PHI3_NO_RSTRIP.contains(&content))
                    .normalized(false)
            })
            .collect();
        tok.add_tokens(&added);
        for &id in &added_ids {
            let got = tok.token_to_id(&self.tokens[id]);
            if got != Some(id as u32) {
                return Err(md_err(
                    keys::TOKENS,
                    format!("added token {:?} (id {id}) got id {got:?}", self.tokens[id]),
                ));
            }
        }
        Ok(tok)
    }

    /// transformers' `LlamaTokenizerFast.update_post_processor`: `<bos>:0 $A:0 (<eos>:0)` and the
    /// pair form, with the tokens that the flags ask for.
    fn post_processor(&self) -> Result<TemplateProcessing> {
        let cfg = self.tokenizer_config();
        let mut special = Vec::new();
        let mut single = String::new();
        let mut bos_b = String::new();
        if let (true, Some(bos), Some(id)) = (cfg.add_bos_token, &cfg.bos_token, self.bos_token_id)
        {
            single.push_str(&format!("{bos}:0 "));
            bos_b = format!(" {bos}:1");
            special.push((bos.clone(), id));
        }
        single.push_str("$A:0");
        let mut eos_a = String::new();
        let mut eos_b = String::new();
        if let (true, Some(eos), Some(id)) = (cfg.add_eos_token, &cfg.eos_token, self.eos_token_id)
        {
            eos_a = format!(" {eos}:0");
            eos_b = format!(" {eos}:1");
            if !special.iter().any(|(t, _)| t == eos) {
                special.push((eos.clone(), id));
            }
        }
        single.push_str(&eos_a);
        let pair = format!("{single}{bos_b} $B:1{eos_b}");
        TemplateProcessing::builder()
            .try_single(single.as_str())
            .and_then(|b| b.try_pair(pair.as_str()))
            .map_err(|e| err(format!("tokenizer post-processor: {e}")))?
            .special_tokens(special)
            .build()
            .map_err(|e| err(format!("tokenizer post-processor: {e}")))
    }
}

fn md_string<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a String>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(md_err(key, format!("is {:?}, not a string", other.value_type()))),
    }
}

fn md_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Vec<Value>> {
    match md.get(key) {
        None => Err(md_err(key, "missing")),
        Some(Value::Array(v)) => Ok(v),
        Some(other) => Err(md_err(key, format!("is {:?}, not an array", other.value_type()))),
    }
}

fn md_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(md_err(key, format!("is {:?}, not a bool", other.value_type()))),
    }
}

fn md_id(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => integer(v)
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| md_err(key, format!("is {v:?}, not a token id"))),
    }
}

/// Any GGUF integer value, widened.
fn integer(v: &Value) -> Option<i128> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => x.into(),
        Value::I64(x) => x.into(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_classes() {
        assert!(is_byte_piece("<0x0A>"));
        assert!(is_byte_piece("<0xFF>"));
        assert!(!is_byte_piece("<0xff>"));
        assert!(!is_byte_piece("<0x0A"));
        assert!(is_whitespace_piece("\u{2581}"));
        assert!(is_whitespace_piece("\u{2581}\u{2581}\u{2581}"));
        assert!(!is_whitespace_piece(""));
        assert!(!is_whitespace_piece("\u{2581}t"));
    }

    #[test]
    fn integer_widths() {
        assert_eq!(integer(&Value::U8(7)), Some(7));
        assert_eq!(integer(&Value::I64(-1)), Some(-1));
        assert_eq!(integer(&Value::F32(1.0)), None);
        assert_eq!(integer(&Value::Bool(true)), None);
    }
}
