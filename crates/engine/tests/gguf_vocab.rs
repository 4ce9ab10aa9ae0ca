//! `phi_engine::gguf_vocab` against llama.cpp's real Phi-3 vocabulary file
//! (`tests/data/llama-cpp-vocab/ggml-vocab-phi-3.gguf`, a byte copy of llama.cpp's
//! `models/ggml-vocab-phi-3.gguf`), its 46 test vectors, and the Hugging Face tokenizers.
//!
//! What the real file is made of (asserted below):
//! * `from_hf(phi3-july-2024/tokenizer.json, phi3-april-2024/tokenizer_config.json, 32064)` gives
//!   the file's metadata *exactly* (tokens, scores, types, ids, flags, chat template).
//! * With the July config, only `add_bos_token` (false there, true in the file) and the chat
//!   template (D there, B in the file) differ; with the April `tokenizer.json`, only the type of
//!   `</s>` (id 2) differs (control there because April marks it special, user-defined in the file).
//!
//! Set `PHI_GGUF_VOCAB_DUMP=<path>` to also write the round-trip GGUF file there (for a manual
//! check with Python's `gguf.GGUFReader`).

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use phi_engine::error::EngineError;
use phi_engine::gguf_vocab::{keys, token_type, GgufVocab};
use phi_engine::tokenizer::PhiTokenizer;
use serde_json::Value as Json;

const VOCAB_SIZE: usize = 32064;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&read_text(path)).expect("valid json")
}

fn ids_of(v: &Json) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn real_metadata() -> &'static HashMap<String, Value> {
    static MD: OnceLock<HashMap<String, Value>> = OnceLock::new();
    MD.get_or_init(|| {
        let path = data("llama-cpp-vocab/ggml-vocab-phi-3.gguf");
        let mut file = std::fs::File::open(&path).expect("vocab file present");
        let content = gguf_file::Content::read(&mut file).expect("valid gguf");
        assert!(content.tensor_infos.is_empty(), "vocab-only file");
        content.metadata
    })
}

fn real_vocab() -> &'static GgufVocab {
    static V: OnceLock<GgufVocab> = OnceLock::new();
    V.get_or_init(|| GgufVocab::from_metadata(real_metadata()).expect("real metadata parses"))
}

/// The tokenizer rebuilt from the real file's tokens/scores/types (it has no HF json).
fn reconstructed() -> &'static PhiTokenizer {
    static T: OnceLock<PhiTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        assert!(real_vocab().hf_tokenizer_json.is_none());
        real_vocab().to_tokenizer().expect("reconstruction builds")
    })
}

fn hf_july() -> &'static PhiTokenizer {
    static T: OnceLock<PhiTokenizer> = OnceLock::new();
    T.get_or_init(|| PhiTokenizer::from_dir(data("phi3-july-2024")).expect("july loads"))
}

fn hf_april() -> &'static PhiTokenizer {
    static T: OnceLock<PhiTokenizer> = OnceLock::new();
    T.get_or_init(|| PhiTokenizer::from_dir(data("phi3-april-2024")).expect("april loads"))
}

fn tokenizer_json(dir: &str) -> String {
    read_text(&data(&format!("{dir}/tokenizer.json")))
}

fn tokenizer_config(dir: &str) -> String {
    read_text(&data(&format!("{dir}/tokenizer_config.json")))
}

fn from_hf(json_dir: &str, config_dir: &str) -> GgufVocab {
    GgufVocab::from_hf(
        tokenizer_json(json_dir).as_bytes(),
        Some(&tokenizer_config(config_dir)),
        VOCAB_SIZE,
    )
    .expect("from_hf")
}

fn config_template(dir: &str) -> String {
    let cfg: Json = serde_json::from_str(&tokenizer_config(dir)).expect("config json");
    cfg["chat_template"].as_str().expect("string template").to_string()
}

/// Asserts two long vectors are equal, naming the first differing index instead of dumping both.
fn assert_same<T: PartialEq + Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: first difference at id {i}: {:?} vs {:?}", got[i], want[i]);
    }
}

/// Every field but `hf_tokenizer_json`, with readable failures.
fn assert_same_vocab(got: &GgufVocab, want: &GgufVocab) {
    assert_eq!(got.model, want.model, "model");
    assert_eq!(got.pre, want.pre, "pre");
    assert_same("tokens", &got.tokens, &want.tokens);
    assert_same("scores", &got.scores, &want.scores);
    assert_same("token_types", &got.token_types, &want.token_types);
    assert_eq!(got.bos_token_id, want.bos_token_id, "bos");
    assert_eq!(got.eos_token_id, want.eos_token_id, "eos");
    assert_eq!(got.unknown_token_id, want.unknown_token_id, "unk");
    assert_eq!(got.padding_token_id, want.padding_token_id, "pad");
    assert_eq!(got.add_bos_token, want.add_bos_token, "add_bos");
    assert_eq!(got.add_eos_token, want.add_eos_token, "add_eos");
    assert_eq!(got.chat_template, want.chat_template, "chat_template");
}

fn llama_cpp_vectors() -> Vec<(String, Vec<u32>)> {
    let inp = read_text(&data("llama-cpp-vocab/ggml-vocab-phi-3.gguf.inp"));
    let out = read_text(&data("llama-cpp-vocab/ggml-vocab-phi-3.gguf.out"));
    let body = inp.strip_suffix("\n__ggml_vocab_test__\n").expect("inp ends with the separator");
    let texts: Vec<&str> = body.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out
        .split('\n')
        .take(texts.len())
        .map(|line| line.split_whitespace().map(|t| t.parse().expect("id")).collect())
        .collect();
    assert_eq!(texts.len(), 46, "46 llama.cpp strings");
    assert_eq!(ids.len(), 46, "46 llama.cpp id lines");
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

/// Writes metadata-only GGUF bytes with candle's writer.
fn write_gguf(md: &[(String, Value)]) -> Vec<u8> {
    let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut cursor = Cursor::new(Vec::new());
    gguf_file::write(&mut cursor, &refs, &[]).expect("gguf writes");
    cursor.into_inner()
}

fn read_gguf(bytes: &[u8]) -> GgufVocab {
    let content = gguf_file::Content::read(&mut Cursor::new(bytes)).expect("gguf reads back");
    GgufVocab::from_metadata(&content.metadata).expect("metadata parses back")
}

// ---------------------------------------------------------------------------------------------
// The real file
// ---------------------------------------------------------------------------------------------

#[test]
fn real_file_metadata_facts() {
    let v = real_vocab();
    assert_eq!(v.model, "llama");
    assert_eq!(v.pre.as_deref(), Some("default"));
    assert_eq!(v.tokens.len(), VOCAB_SIZE);
    assert_eq!(v.scores.len(), VOCAB_SIZE);
    assert_eq!(v.token_types.len(), VOCAB_SIZE);
    let count = |t: i32| v.token_types.iter().filter(|&&x| x == t).count();
    assert_eq!(count(token_type::NORMAL), 31741);
    assert_eq!(count(token_type::BYTE), 256);
    assert_eq!(count(token_type::UNKNOWN), 53);
    assert_eq!(count(token_type::CONTROL), 13);
    assert_eq!(count(token_type::USER_DEFINED), 1);
    for (id, tok, score, ty) in [
        (0, "<unk>", -1000.0, token_type::CONTROL),
        (1, "<s>", -1000.0, token_type::CONTROL),
        (2, "</s>", -1000.0, token_type::USER_DEFINED),
        (259, "▁▁", -1e9, token_type::NORMAL),
        (260, "▁t", -1.0, token_type::NORMAL),
        (268, "▁▁▁▁", -1e9, token_type::NORMAL),
        (29871, "▁", -1e9, token_type::NORMAL),
        (31999, "给", -31740.0, token_type::NORMAL),
        (32000, "<|endoftext|>", -1000.0, token_type::CONTROL),
        (32007, "<|end|>", -1000.0, token_type::CONTROL),
        (32010, "<|user|>", -1000.0, token_type::CONTROL),
    ] {
        assert_eq!(
            (v.tokens[id].as_str(), v.scores[id], v.token_types[id]),
            (tok, score, ty),
            "id {id}"
        );
    }
    for id in 3..=258 {
        assert_eq!(v.tokens[id], format!("<0x{:02X}>", id - 3));
        assert_eq!((v.scores[id], v.token_types[id]), (0.0, token_type::BYTE));
    }
    for id in 32000..=32010 {
        assert_eq!((v.scores[id], v.token_types[id]), (-1000.0, token_type::CONTROL), "id {id}");
    }
    for id in 32011..VOCAB_SIZE {
        assert_eq!(v.tokens[id], format!("[PAD{id}]"));
        assert_eq!((v.scores[id], v.token_types[id]), (-10000.0, token_type::UNKNOWN));
    }
    assert_eq!(v.bos_token_id, Some(1));
    assert_eq!(v.eos_token_id, Some(32000));
    assert_eq!(v.unknown_token_id, Some(0));
    assert_eq!(v.padding_token_id, Some(32000));
    assert_eq!(v.add_bos_token, Some(true));
    assert_eq!(v.add_eos_token, Some(false));
    // The April-2024 config's template B (drops the system message), not the July one.
    assert_eq!(v.chat_template.as_deref(), Some(config_template("phi3-april-2024").as_str()));
    assert_ne!(v.chat_template.as_deref(), Some(config_template("phi3-july-2024").as_str()));
    assert!(v.hf_tokenizer_json.is_none());
}

/// The score rule over the whole vocabulary: normal pieces score `-(id - 259)`, except exactly the
/// pieces made only of `▁` (one of each length 1..=16), which score -1e9.
#[test]
fn real_file_score_rule_whitespace_pieces() {
    let v = real_vocab();
    let mut whitespace_lengths = Vec::new();
    for id in 0..VOCAB_SIZE {
        if v.token_types[id] != token_type::NORMAL {
            assert_ne!(v.scores[id], -1e9, "id {id}");
            continue;
        }
        let tok = &v.tokens[id];
        let all_space = tok.chars().all(|c| c == '▁');
        if all_space {
            whitespace_lengths.push(tok.chars().count());
            assert_eq!(v.scores[id], -1e9, "id {id} {tok:?}");
        } else {
            assert_eq!(v.scores[id], -((id - 259) as f32), "id {id} {tok:?}");
        }
    }
    whitespace_lengths.sort_unstable();
    assert_eq!(whitespace_lengths, (1..=16).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// from_hf versus the real file
// ---------------------------------------------------------------------------------------------

#[test]
fn from_hf_july_json_with_april_config_equals_real_file_exactly() {
    let mut v = from_hf("phi3-july-2024", "phi3-april-2024");
    assert_eq!(v.hf_tokenizer_json.as_deref(), Some(tokenizer_json("phi3-july-2024").as_str()));
    v.hf_tokenizer_json = None;
    assert_same_vocab(&v, real_vocab());
    assert!(v == *real_vocab());
}

#[test]
fn from_hf_july_differs_from_real_file_only_in_config_flags() {
    let v = from_hf("phi3-july-2024", "phi3-july-2024");
    let real = real_vocab();
    assert_same("tokens", &v.tokens, &real.tokens);
    assert_same("scores", &v.scores, &real.scores);
    assert_same("token_types", &v.token_types, &real.token_types);
    assert_eq!(
        (v.bos_token_id, v.eos_token_id, v.unknown_token_id, v.padding_token_id),
        (Some(1), Some(32000), Some(0), Some(32000))
    );
    assert_eq!(v.add_eos_token, real.add_eos_token);
    assert_eq!((v.model.as_str(), v.pre.as_deref()), ("llama", Some("default")));
    // The unavoidable differences: the July config says add_bos_token false and has template D.
    assert_eq!(v.add_bos_token, Some(false));
    assert_eq!(real.add_bos_token, Some(true));
    assert_eq!(v.chat_template.as_deref(), Some(config_template("phi3-july-2024").as_str()));
    assert_ne!(v.chat_template, real.chat_template);
}

#[test]
fn from_hf_april_differs_from_real_file_only_in_eos_piece_type() {
    let mut v = from_hf("phi3-april-2024", "phi3-april-2024");
    // April marks `</s>` special (control); the file has it user-defined, as the July json does.
    assert_eq!(v.token_types[2], token_type::CONTROL);
    assert_eq!(real_vocab().token_types[2], token_type::USER_DEFINED);
    v.token_types[2] = token_type::USER_DEFINED;
    v.hf_tokenizer_json = None;
    assert_same_vocab(&v, real_vocab());
}

// ---------------------------------------------------------------------------------------------
// The reconstruction (real file, no HF json inside)
// ---------------------------------------------------------------------------------------------

fn merges_of(json: &Json) -> Vec<(String, String)> {
    json["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            Json::String(s) => {
                let (a, b) = s.split_once(' ').expect("'a b' merge");
                (a.to_string(), b.to_string())
            }
            Json::Array(p) => {
                (p[0].as_str().expect("str").to_string(), p[1].as_str().expect("str").to_string())
            }
            other => panic!("merge {other:?}"),
        })
        .collect()
}

/// The rebuilt tokenizer is structurally the July `tokenizer.json`: same vocab, the same 61249
/// merges in the same order, same normalizer/decoder, same added tokens and flags.
#[test]
fn reconstruction_is_structurally_the_july_tokenizer_json() {
    let rebuilt: Json =
        serde_json::from_str(&reconstructed().inner().to_string(false).expect("serialises"))
            .expect("json");
    let july = read_json(&data("phi3-july-2024/tokenizer.json"));
    assert_eq!(rebuilt["model"]["vocab"], july["model"]["vocab"], "model vocab");
    let (got, want) = (merges_of(&rebuilt), merges_of(&july));
    assert_eq!(want.len(), 61249);
    assert_same("merges", &got, &want);
    for key in ["type", "unk_token", "fuse_unk", "byte_fallback", "dropout"] {
        assert_eq!(rebuilt["model"][key], july["model"][key], "model.{key}");
    }
    for key in ["normalizer", "pre_tokenizer", "decoder"] {
        assert_eq!(rebuilt[key], july[key], "{key}");
    }
    let fields = ["id", "content", "special", "rstrip", "lstrip", "normalized", "single_word"];
    let added = |j: &Json| -> Vec<Vec<Json>> {
        j["added_tokens"]
            .as_array()
            .expect("added tokens")
            .iter()
            .map(|t| fields.iter().map(|f| t[*f].clone()).collect())
            .collect()
    };
    assert_eq!(added(&rebuilt), added(&july), "added tokens and flags");
    // add_bos_token is true in the file: the post-processor prepends BOS for add_special_tokens.
    let with_bos = reconstructed().inner().encode("Hello", true).expect("encodes");
    assert_eq!(with_bos.get_ids(), &[1, 15043]);
    assert_eq!(reconstructed().encode_with_special_tokens("Hello").expect("encodes"), [1, 15043]);
}

/// llama.cpp's own 46 vectors (no BOS), with decode round trips; HF agrees on every one.
#[test]
fn reconstruction_reproduces_llama_cpp_vectors() {
    let tok = reconstructed();
    let mut disagreements = Vec::new();
    for (i, (text, expected)) in llama_cpp_vectors().iter().enumerate() {
        let got = tok.encode(text).expect("encodes");
        assert_eq!(&got, expected, "vector {i} {text:?}");
        assert_eq!(&tok.decode(&got, false).expect("decodes"), text, "decode {i}");
        for (name, hf) in [("july", hf_july()), ("april", hf_april())] {
            if &hf.encode(text).expect("encodes") != expected {
                disagreements.push(format!("{name} {i} {text:?}"));
            }
        }
    }
    assert!(disagreements.is_empty(), "HF differs from llama.cpp: {disagreements:?}");
}

/// The team's HF-generated vectors and transformers' own reference (July tokenizer entries).
#[test]
fn reconstruction_matches_hf_vectors_and_transformers_reference() {
    let tok = reconstructed();
    let v = read_json(&data("test-vectors/tokenizer_vectors.json"));
    for case in v["vectors"].as_array().expect("vectors") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(tok.encode(text).expect("encodes"), ids_of(&case["ids"]), "{text:?}");
    }
    let extra = v["extra_generated_with_hf_tokenizers"].as_array().expect("extra");
    assert_eq!(extra.len(), 9);
    for case in extra {
        let text = case["text"].as_str().expect("text");
        let ids = ids_of(&case["ids_2024_07"]);
        assert_eq!(tok.encode(text).expect("encodes"), ids, "{text:?}");
        assert_eq!(
            tok.decode(&ids, true).expect("decodes"),
            case["decode_2024_07_skip_special"].as_str().expect("str"),
            "skip {text:?}"
        );
        assert_eq!(
            tok.decode(&ids, false).expect("decodes"),
            case["decode_2024_07_keep_special"].as_str().expect("str"),
            "keep {text:?}"
        );
    }
    let reference = read_json(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/tokenizer/tokenize.json"),
    );
    let mut checked = 0;
    for e in reference["entries"].as_array().expect("entries") {
        if e["tokenizer"] != "phi-3-mini-4k-instruct" {
            continue;
        }
        let text = e["text"].as_str().expect("text");
        let ids = ids_of(&e["ids"]);
        assert_eq!(tok.encode(text).expect("encodes"), ids, "{text:?}");
        assert_eq!(tok.decode(&ids, false).expect("decodes"), e["decoded"], "{text:?}");
        assert_eq!(
            tok.decode(&ids, true).expect("decodes"),
            e["decoded_skip_special"],
            "skip {text:?}"
        );
        checked += 1;
    }
    assert!(checked >= 46, "only {checked} transformers entries");
}

/// Chat-formatted strings with special tokens: the reconstruction encodes like the July HF
/// tokenizer (rstrip on 32001–32010 and `</s>`), not like April's.
#[test]
fn reconstruction_matches_july_hf_on_chat_strings() {
    let tok = reconstructed();
    let july = hf_july();
    let renders = read_json(&data("test-vectors/chat_template_renders.json"));
    let renders = renders.as_array().expect("renders");
    assert_eq!(renders.len(), 48);
    let mut texts: Vec<String> = Vec::new();
    let mut with_ids = 0;
    for r in renders {
        let text = r["rendered"].as_str().expect("rendered");
        texts.push(text.to_string());
        // The phi3-small renders (a tiktoken model) carry no Phi-3 ids; their text is still
        // compared with the July tokenizer below.
        let Some(ids) = r.get("ids_tokenizer_2024_07_rstrip_true") else { continue };
        assert_eq!(tok.encode(text).expect("encodes"), ids_of(ids), "{text:?}");
        with_ids += 1;
    }
    assert_eq!(with_ids, 40);
    texts.extend(
        [
            "<|user|>\nHi<|end|>\n<|assistant|>\n",
            "<s><|system|>\nBe brief.<|end|>\n<|user|>\n  two spaces \n\n<|end|>\n<|assistant|>\n",
            "<|assistant|>\nSure! 🦀 ½<|end|>\n<|endoftext|>",
            "</s>  after two spaces, </s>\n\nnewlines",
            "<s> <s>  <unk> x <unk>\ty",
            "<|endoftext|> \n tail",
            "<|placeholder1|>\t<|placeholder6|>  <|system|>",
            "[PAD32011] is text, not a token",
            "<|user|",
            "",
        ]
        .map(String::from),
    );
    for text in &texts {
        let ids = tok.encode(text).expect("encodes");
        assert_eq!(ids, july.encode(text).expect("encodes"), "{text:?}");
        for skip in [false, true] {
            assert_eq!(
                tok.decode(&ids, skip).expect("decodes"),
                july.decode(&ids, skip).expect("decodes"),
                "decode skip={skip} {text:?}"
            );
        }
    }
    let chat = "<|user|>\nHi<|end|>\n<|assistant|>\n";
    assert_eq!(tok.encode(chat).expect("encodes"), [32010, 6324, 32007, 32001]);
    assert_eq!(
        hf_april().encode(chat).expect("encodes"),
        [32010, 29871, 13, 18567, 32007, 29871, 13, 32001, 29871, 13]
    );
}

#[test]
fn reconstruction_accessors_match_july_hf() {
    let tok = reconstructed();
    let july = hf_july();
    assert_eq!(tok.vocab_size(), 32011);
    assert_eq!(tok.base_vocab_size(), 32000);
    assert_eq!(tok.special_token_ids(), july.special_token_ids());
    assert!(!tok.is_special_token(2));
    assert_eq!((tok.bos_token(), tok.bos_token_id()), (Some("<s>"), Some(1)));
    assert_eq!((tok.eos_token(), tok.eos_token_id()), (Some("<|endoftext|>"), Some(32000)));
    assert!(tok.add_bos_token());
    assert_eq!(tok.chat_template(), real_vocab().chat_template.as_deref());
    assert_eq!(tok.config().pad_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(tok.config().unk_token.as_deref(), Some("<unk>"));
    for id in 0..VOCAB_SIZE as u32 + 8 {
        assert_eq!(tok.id_to_token(id), july.id_to_token(id), "id_to_token {id}");
        assert_eq!(tok.contains_id(id), july.contains_id(id), "contains {id}");
        assert_eq!(
            tok.is_byte_fallback_token(id),
            july.is_byte_fallback_token(id),
            "byte fallback {id}"
        );
    }
    // Padding rows decode to nothing, as with HF.
    assert_eq!(tok.decode(&[15043, 32050, 3186], false).expect("decodes"), "Hello world");
}

// ---------------------------------------------------------------------------------------------
// Metadata round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn to_metadata_order_and_types() {
    let v = from_hf("phi3-july-2024", "phi3-april-2024");
    let md = v.to_metadata();
    let names: Vec<&str> = md.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            keys::MODEL,
            keys::PRE,
            keys::TOKENS,
            keys::SCORES,
            keys::TOKEN_TYPE,
            keys::BOS_ID,
            keys::EOS_ID,
            keys::UNK_ID,
            keys::PAD_ID,
            keys::ADD_BOS,
            keys::ADD_EOS,
            keys::CHAT_TEMPLATE,
            keys::HF_JSON,
        ]
    );
    // Same value types as the file llama.cpp wrote.
    let real = real_metadata();
    for (k, value) in &md {
        if k == keys::HF_JSON {
            assert!(matches!(value, Value::String(_)));
            continue;
        }
        let theirs = &real[k];
        assert_eq!(value.value_type(), theirs.value_type(), "{k}");
        if let (Value::Array(a), Value::Array(b)) = (value, theirs) {
            assert_eq!(a[0].value_type(), b[0].value_type(), "{k} elements");
        }
    }
    // Absent optionals are left out.
    let mut bare = v.clone();
    bare.pre = None;
    bare.padding_token_id = None;
    bare.chat_template = None;
    bare.hf_tokenizer_json = None;
    let names: Vec<String> = bare.to_metadata().into_iter().map(|(k, _)| k).collect();
    assert_eq!(names.len(), 9);
    assert!(!names.iter().any(|k| k == keys::PRE || k == keys::PAD_ID || k == keys::HF_JSON));
}

#[test]
fn gguf_round_trip_keeps_vocab_and_hf_json_tokenizer_encodes_like_hf() {
    let v = from_hf("phi3-july-2024", "phi3-july-2024");
    let bytes = write_gguf(&v.to_metadata());
    if let Ok(path) = std::env::var("PHI_GGUF_VOCAB_DUMP") {
        std::fs::write(&path, &bytes).expect("dump written");
    }
    let back = read_gguf(&bytes);
    assert_same_vocab(&back, &v);
    assert_eq!(back.hf_tokenizer_json, v.hf_tokenizer_json);
    assert!(back == v);

    // The HF-json path: identical to PhiTokenizer::from_dir on the same files.
    let tok = back.to_tokenizer().expect("hf json path");
    let july = hf_july();
    let vectors = read_json(&data("test-vectors/tokenizer_vectors.json"));
    for case in vectors["vectors"].as_array().expect("vectors") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(tok.encode(text).expect("encodes"), ids_of(&case["ids"]), "{text:?}");
    }
    for case in vectors["extra_generated_with_hf_tokenizers"].as_array().expect("extra") {
        let text = case["text"].as_str().expect("text");
        let ids = ids_of(&case["ids_2024_07"]);
        assert_eq!(tok.encode(text).expect("encodes"), ids, "{text:?}");
        assert_eq!(tok.decode(&ids, true).expect("d"), july.decode(&ids, true).expect("d"));
    }
    assert_eq!(tok.special_token_ids(), july.special_token_ids());
    assert_eq!((tok.vocab_size(), tok.base_vocab_size()), (32011, 32000));
    assert_eq!(tok.config().bos_token.as_deref(), Some("<s>"));
    assert_eq!(tok.config().eos_token.as_deref(), Some("<|endoftext|>"));
    assert!(!tok.add_bos_token(), "July config: add_bos_token false");
    assert_eq!(tok.chat_template(), july.chat_template());
}

/// The embedded json is really used: the April json keeps April's rstrip:false behaviour, which
/// the reconstruction (llama.cpp's rule) does not have.
#[test]
fn hf_json_path_is_used_when_present() {
    let v = read_gguf(&write_gguf(&from_hf("phi3-april-2024", "phi3-april-2024").to_metadata()));
    let chat = "<s><|user|>\nHello<|end|>\n<|assistant|>\n";
    let april_ids = [1, 32010, 29871, 13, 10994, 32007, 29871, 13, 32001, 29871, 13];
    assert_eq!(v.to_tokenizer().expect("hf path").encode(chat).expect("encodes"), april_ids);
    assert!(v.to_tokenizer().expect("hf path").is_special_token(2));
    let mut rebuilt = v.clone();
    rebuilt.hf_tokenizer_json = None;
    let tok = rebuilt.to_tokenizer().expect("reconstruction");
    assert_eq!(tok.encode(chat).expect("encodes"), [1, 32010, 15043, 32007, 32001]);
    // from_hf's own output, rebuilt without the json, is the same tokenizer as the real file's.
    for (text, ids) in llama_cpp_vectors() {
        assert_eq!(tok.encode(&text).expect("encodes"), ids, "{text:?}");
    }
}

#[test]
fn real_file_round_trips_through_candle_writer() {
    let back = read_gguf(&write_gguf(&real_vocab().to_metadata()));
    assert_same_vocab(&back, real_vocab());
    assert!(back == *real_vocab());
}

// ---------------------------------------------------------------------------------------------
// Malformed input: errors, not panics
// ---------------------------------------------------------------------------------------------

fn tokenizer_error(result: phi_engine::error::Result<GgufVocab>) -> String {
    match result {
        Err(EngineError::Tokenizer(msg)) => msg,
        Err(other) => panic!("expected a Tokenizer error, got {other:?}"),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

fn broken(edit: impl FnOnce(&mut HashMap<String, Value>)) -> String {
    let mut md = real_metadata().clone();
    edit(&mut md);
    tokenizer_error(GgufVocab::from_metadata(&md))
}

#[test]
fn malformed_metadata_is_an_error() {
    let cases: Vec<(&str, String)> = vec![
        (keys::TOKENS, broken(|md| drop(md.remove(keys::TOKENS)))),
        (keys::SCORES, broken(|md| drop(md.remove(keys::SCORES)))),
        (keys::TOKEN_TYPE, broken(|md| drop(md.remove(keys::TOKEN_TYPE)))),
        (keys::MODEL, broken(|md| drop(md.remove(keys::MODEL)))),
        (
            keys::MODEL,
            broken(|md| drop(md.insert(keys::MODEL.into(), Value::String("gpt2".into())))),
        ),
        (keys::MODEL, broken(|md| drop(md.insert(keys::MODEL.into(), Value::U32(1))))),
        (
            keys::TOKENS,
            broken(|md| drop(md.insert(keys::TOKENS.into(), Value::String("x".into())))),
        ),
        (
            keys::TOKENS,
            broken(|md| {
                if let Some(Value::Array(a)) = md.get_mut(keys::TOKENS) {
                    a[5] = Value::U32(5);
                }
            }),
        ),
        (keys::TOKENS, broken(|md| drop(md.insert(keys::TOKENS.into(), Value::Array(vec![]))))),
        (
            keys::SCORES,
            broken(|md| {
                if let Some(Value::Array(a)) = md.get_mut(keys::SCORES) {
                    a.pop();
                }
            }),
        ),
        (
            keys::SCORES,
            broken(|md| {
                if let Some(Value::Array(a)) = md.get_mut(keys::SCORES) {
                    a[7] = Value::String("0".into());
                }
            }),
        ),
        (
            keys::TOKEN_TYPE,
            broken(|md| {
                if let Some(Value::Array(a)) = md.get_mut(keys::TOKEN_TYPE) {
                    a.push(Value::I32(1));
                }
            }),
        ),
        (
            keys::TOKEN_TYPE,
            broken(|md| {
                if let Some(Value::Array(a)) = md.get_mut(keys::TOKEN_TYPE) {
                    a[9] = Value::I32(42);
                }
            }),
        ),
        (
            keys::BOS_ID,
            broken(|md| drop(md.insert(keys::BOS_ID.into(), Value::String("1".into())))),
        ),
        (keys::EOS_ID, broken(|md| drop(md.insert(keys::EOS_ID.into(), Value::U32(99_999))))),
        (keys::UNK_ID, broken(|md| drop(md.insert(keys::UNK_ID.into(), Value::I32(-1))))),
        (keys::ADD_BOS, broken(|md| drop(md.insert(keys::ADD_BOS.into(), Value::U8(1))))),
        (
            keys::CHAT_TEMPLATE,
            broken(|md| drop(md.insert(keys::CHAT_TEMPLATE.into(), Value::U32(0)))),
        ),
        (keys::PRE, broken(|md| drop(md.insert(keys::PRE.into(), Value::Bool(true))))),
        (keys::HF_JSON, broken(|md| drop(md.insert(keys::HF_JSON.into(), Value::Array(vec![]))))),
    ];
    for (key, msg) in &cases {
        assert!(msg.contains(key), "error for {key} should name it: {msg}");
    }
    // Other integer widths for ids are accepted (the spec says u32; some writers use others).
    let mut md = real_metadata().clone();
    md.insert(keys::BOS_ID.into(), Value::I32(1));
    assert_eq!(GgufVocab::from_metadata(&md).expect("i32 id").bos_token_id, Some(1));
}

#[test]
fn inconsistent_vocab_or_bad_hf_input_is_an_error() {
    let expect_err = |v: GgufVocab, what: &str| match v.to_tokenizer() {
        Err(EngineError::Tokenizer(_)) => {}
        Err(other) => panic!("{what}: unexpected error kind {other:?}"),
        Ok(_) => panic!("{what}: expected an error"),
    };
    let real = real_vocab();
    let mut v = real.clone();
    v.scores.pop();
    expect_err(v, "scores shorter than tokens");
    let mut v = real.clone();
    v.token_types.truncate(10);
    expect_err(v, "types shorter than tokens");
    let mut v = real.clone();
    v.bos_token_id = Some(VOCAB_SIZE as u32);
    expect_err(v, "bos out of range");
    let mut v = real.clone();
    v.model = "gpt2".into();
    expect_err(v, "unsupported model");
    let mut v = real.clone();
    v.tokens[500] = v.tokens[400].clone();
    expect_err(v, "duplicate piece");
    let mut v = real.clone();
    v.hf_tokenizer_json = Some("{not json".into());
    expect_err(v, "broken hf json");
    // An embedded json that does not belong to these tokens.
    let mut v = from_hf("phi3-july-2024", "phi3-july-2024");
    v.tokens[1234] = "▁mismatch".into();
    expect_err(v, "hf json disagrees with tokens");

    let json = tokenizer_json("phi3-july-2024");
    let cfg = tokenizer_config("phi3-july-2024");
    tokenizer_error(GgufVocab::from_hf(b"{not json", Some(&cfg), VOCAB_SIZE));
    tokenizer_error(GgufVocab::from_hf(json.as_bytes(), Some("[1]"), VOCAB_SIZE));
    tokenizer_error(GgufVocab::from_hf(json.as_bytes(), Some(&cfg), 32005));
    tokenizer_error(GgufVocab::from_hf(json.as_bytes(), Some(&cfg), 100));
    let wordpiece = json.replacen("\"type\": \"BPE\"", "\"type\": \"WordPiece\"", 1);
    assert_ne!(wordpiece, json, "the model type was replaced");
    tokenizer_error(GgufVocab::from_hf(wordpiece.as_bytes(), Some(&cfg), VOCAB_SIZE));
    tokenizer_error(GgufVocab::from_hf(&[0xff, 0xfe], None, VOCAB_SIZE));
    // Without a config: no special ids or flags (gguf.SpecialVocab needs tokenizer_config.json).
    let v = GgufVocab::from_hf(json.as_bytes(), None, VOCAB_SIZE).expect("no config");
    assert_eq!((v.bos_token_id, v.add_bos_token, v.chat_template.as_deref()), (None, None, None));
    assert_same("token_types", &v.token_types, &real.token_types);
}
