//! Tokenizer parity tests: llama.cpp's 46 Phi-3 vectors, the team's HF `tokenizers` vectors, and
//! the transformers-generated reference (`tests/reference/tokenizer/tokenize.json`).

use std::path::{Path, PathBuf};

use phi_engine::tokenizer::{PhiTokenizer, TokenizerConfig};
use serde_json::Value;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

fn load(dir: &str) -> PhiTokenizer {
    PhiTokenizer::from_dir(data(dir)).expect("tokenizer loads")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("readable");
    serde_json::from_str(&text).expect("valid json")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The three SentencePiece tokenizer directories, named as the transformers reference names them.
const TOKENIZERS: [(&str, &str); 3] = [
    ("phi-3-mini-4k-instruct", "phi3-july-2024"),
    ("phi-3-2024-04", "phi3-april-2024"),
    ("phi-3-medium", "phi3-medium"),
];

fn llama_cpp_vectors() -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(data("llama-cpp-vocab/ggml-vocab-phi-3.gguf.inp"))
        .expect("inp readable");
    let out = std::fs::read_to_string(data("llama-cpp-vocab/ggml-vocab-phi-3.gguf.out"))
        .expect("out readable");
    // Every string, the last included, is followed by the separator.
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

#[test]
fn llama_cpp_vectors_match_for_every_tokenizer_version() {
    let vectors = llama_cpp_vectors();
    for (_, dir) in TOKENIZERS {
        let tok = load(dir);
        for (i, (text, expected)) in vectors.iter().enumerate() {
            let got = tok.encode(text).expect("encodes");
            assert_eq!(&got, expected, "{dir}: vector {i} {text:?}");
            // Plain text round-trips through decode.
            assert_eq!(&tok.decode(&got, false).expect("decodes"), text, "{dir}: {i}");
        }
    }
}

#[test]
fn shared_tokenizer_vectors_match() {
    let v = read_json(&data("test-vectors/tokenizer_vectors.json"));
    let july = load("phi3-july-2024");
    let april = load("phi3-april-2024");
    let vectors = v["vectors"].as_array().expect("vectors");
    assert_eq!(vectors.len(), 46);
    for case in vectors {
        let text = case["text"].as_str().expect("text");
        let ids = ids_of(&case["ids"]);
        assert_eq!(july.encode(text).expect("encodes"), ids, "july {text:?}");
        assert_eq!(april.encode(text).expect("encodes"), ids, "april {text:?}");
    }
    let extra = v["extra_generated_with_hf_tokenizers"].as_array().expect("extra");
    assert!(!extra.is_empty());
    for case in extra {
        let text = case["text"].as_str().expect("text");
        let ids07 = ids_of(&case["ids_2024_07"]);
        assert_eq!(july.encode(text).expect("encodes"), ids07, "july {text:?}");
        assert_eq!(
            april.encode(text).expect("encodes"),
            ids_of(&case["ids_2024_04"]),
            "april {text:?}"
        );
        // Token strings: the `tokens_2024_07` field lists encoding tokens, which include the
        // characters an rstrip token absorbed ("<|user|>\n"); id_to_token gives the vocab string.
        for (id, tok_str) in ids07.iter().zip(case["tokens_2024_07"].as_array().expect("tokens")) {
            let tok_str = tok_str.as_str().expect("token");
            let vocab = july.id_to_token(*id).expect("known id");
            assert!(tok_str.starts_with(&vocab), "{tok_str:?} vs {vocab:?}");
            assert_eq!(july.token_to_id(&vocab), Some(*id));
        }
        assert_eq!(
            july.decode(&ids07, true).expect("decodes"),
            case["decode_2024_07_skip_special"].as_str().expect("str"),
            "skip {text:?}"
        );
        assert_eq!(
            july.decode(&ids07, false).expect("decodes"),
            case["decode_2024_07_keep_special"].as_str().expect("str"),
            "keep {text:?}"
        );
    }
}

/// `tests/reference/tokenizer/tokenize.json`: produced by transformers itself
/// (`encode(text, add_special_tokens=False)`, `decode(ids)`, `decode(ids, skip_special_tokens=True)`).
#[test]
fn transformers_reference_tokenize_json_matches() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/tokenizer/tokenize.json");
    let v = read_json(&path);
    let entries = v["entries"].as_array().expect("entries");
    assert!(entries.len() >= 3 * 46, "expected llama.cpp + extra entries");
    let loaded: Vec<(&str, PhiTokenizer)> =
        TOKENIZERS.iter().map(|(name, dir)| (*name, load(dir))).collect();
    let mut checked = 0;
    for e in entries {
        let name = e["tokenizer"].as_str().expect("tokenizer name");
        let tok = &loaded
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("unknown tokenizer {name}"))
            .1;
        let text = e["text"].as_str().expect("text");
        let ids = ids_of(&e["ids"]);
        assert_eq!(tok.encode(text).expect("encodes"), ids, "{name}: {text:?}");
        assert_eq!(
            tok.decode(&ids, false).expect("decodes"),
            e["decoded"].as_str().expect("decoded"),
            "{name}: decode {text:?}"
        );
        assert_eq!(
            tok.decode(&ids, true).expect("decodes"),
            e["decoded_skip_special"].as_str().expect("decoded_skip_special"),
            "{name}: decode skip {text:?}"
        );
        checked += 1;
    }
    assert_eq!(checked, entries.len());
}

#[test]
fn rstrip_trap_differs_between_versions() {
    let text = "<s><|user|>\nHello<|end|>\n<|assistant|>\n";
    assert_eq!(
        load("phi3-april-2024").encode(text).expect("encodes"),
        vec![1, 32010, 29871, 13, 10994, 32007, 29871, 13, 32001, 29871, 13]
    );
    assert_eq!(
        load("phi3-july-2024").encode(text).expect("encodes"),
        vec![1, 32010, 15043, 32007, 32001]
    );
}

#[test]
fn special_tokens_and_accessors() {
    let july = load("phi3-july-2024");
    assert_eq!(july.bos_token(), Some("<s>"));
    assert_eq!(july.bos_token_id(), Some(1));
    assert_eq!(july.eos_token(), Some("<|endoftext|>"));
    assert_eq!(july.eos_token_id(), Some(32000));
    assert!(!july.add_bos_token());
    assert_eq!(july.vocab_size(), 32011);
    assert_eq!(july.base_vocab_size(), 32000);
    let expected: Vec<u32> = [0, 1].into_iter().chain(32000..=32010).collect();
    assert_eq!(july.special_token_ids().iter().copied().collect::<Vec<_>>(), expected);
    // `</s>` is not special in the July tokenizer but is in the April one.
    assert!(!july.is_special_token(2));
    assert!(load("phi3-april-2024").is_special_token(2));
    assert_eq!(july.token_to_id("<|end|>"), Some(32007));
    assert_eq!(july.id_to_token(32010).as_deref(), Some("<|user|>"));
    assert_eq!(july.id_to_token(13).as_deref(), Some("<0x0A>"));
    assert_eq!(july.id_to_token(32011), None);
    assert!(july.is_byte_fallback_token(13));
    assert!(july.is_byte_fallback_token(243));
    assert!(!july.is_byte_fallback_token(15043));
    assert!(!july.is_byte_fallback_token(32007));
    assert!(!july.is_byte_fallback_token(40_000));
    assert!(july.chat_template().is_some_and(|t| t.contains("<|system|>")));
}

#[test]
fn unknown_ids_are_ignored_by_decode_like_hf() {
    let july = load("phi3-july-2024");
    // 32011..32063 are embedding padding rows with no token.
    assert_eq!(july.decode(&[15043, 32050, 3186], false).expect("decodes"), "Hello world");
    assert_eq!(july.decode(&[], true).expect("decodes"), "");
}

#[test]
fn encode_with_special_tokens_follows_add_bos_token() {
    // April config: add_bos_token true → BOS prepended (LlamaTokenizerFast.update_post_processor).
    let april = load("phi3-april-2024");
    assert!(april.add_bos_token());
    assert_eq!(april.encode_with_special_tokens("Hello").expect("encodes"), vec![1, 15043]);
    assert_eq!(april.encode("Hello").expect("encodes"), vec![15043]);
    // July config: add_bos_token false → nothing added.
    let july = load("phi3-july-2024");
    assert_eq!(july.encode_with_special_tokens("Hello").expect("encodes"), vec![15043]);
}

#[test]
fn loading_without_config_and_bad_inputs() {
    let tok = PhiTokenizer::from_files(data("phi3-july-2024/tokenizer.json"), None)
        .expect("loads without config");
    assert_eq!(tok.bos_token(), None);
    assert_eq!(tok.chat_template(), None);
    assert_eq!(tok.encode("Hello").expect("encodes"), vec![15043]);
    assert!(PhiTokenizer::from_dir(data("does-not-exist")).is_err());
    assert!(PhiTokenizer::from_json_bytes(b"{not json", None).is_err());
    let bytes = std::fs::read(data("phi3-july-2024/tokenizer.json")).expect("readable");
    assert!(PhiTokenizer::from_json_bytes(&bytes, Some("{\"add_bos_token\": 1}")).is_err());
}

#[test]
fn config_parses_real_files() {
    let text =
        std::fs::read_to_string(data("phi3-april-2024/tokenizer_config.json")).expect("readable");
    let cfg = TokenizerConfig::from_json_str(&text).expect("parses");
    assert!(cfg.add_bos_token);
    assert!(!cfg.clean_up_tokenization_spaces);
    assert_eq!(cfg.model_max_length, Some(131072));
    assert_eq!(cfg.pad_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(cfg.unk_token.as_deref(), Some("<unk>"));
    assert!(cfg.default_chat_template().is_some_and(|t| t.starts_with("{{ bos_token }}")));
}
