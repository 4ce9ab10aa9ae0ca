//! Phi-3-small's tokenizer (tiktoken `cl100k_base` + 96 special tokens) built by
//! `phi_engine::tiktoken`, loaded from `models/tiny/phi3-small-8k/` the way the engine loads it,
//! against python tiktoken's ids (`encode(text, allowed_special="all")`), the chat template, and
//! the streaming detokenizer.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use phi_engine::chat_template::{ChatMessage, ChatTemplate, ResolvedSystemRole, SystemRolePolicy};
use phi_engine::checkpoint::ModelSource;
use phi_engine::detokenizer::StreamDecoder;
use phi_engine::tiktoken::{CL100K_FILE_NAME, PHI3_SMALL_SPECIAL_TOKENS};
use phi_engine::tokenizer::PhiTokenizer;
use serde_json::Value;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/phi3-small-8k")
}

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

/// Resolves the checkpoint and loads its tokenizer exactly as `Engine::from_files` does.
fn load_like_the_engine() -> PhiTokenizer {
    let dir = model_dir();
    let files = ModelSource::parse(dir.to_str().expect("utf-8 path"), None)
        .expect("a local folder")
        .resolve()
        .expect("the checkpoint resolves");
    assert_eq!(
        files.tokenizer.file_name().and_then(|n| n.to_str()),
        Some(CL100K_FILE_NAME),
        "no tokenizer.json, so the tiktoken file is the tokenizer"
    );
    PhiTokenizer::from_files(&files.tokenizer, files.tokenizer_config.as_deref())
        .expect("the tiktoken tokenizer loads")
}

fn tok() -> &'static PhiTokenizer {
    static TOK: OnceLock<PhiTokenizer> = OnceLock::new();
    TOK.get_or_init(load_like_the_engine)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid json")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Every `{text, ids}` entry: encodes to `ids` and `ids` decode back to `text`.
fn check_vectors(tok: &PhiTokenizer, vectors: &[Value]) -> usize {
    let mut failures = Vec::new();
    for v in vectors {
        let text = v["text"].as_str().expect("text");
        let want = ids_of(&v["ids"]);
        let got = tok.encode(text).expect("encodes");
        if got != want {
            failures.push(format!("encode {text:?}: got {got:?}, tiktoken {want:?}"));
        }
        let back = tok.decode(&want, false).expect("decodes");
        if back != text {
            failures.push(format!("decode {want:?}: got {back:?}, want {text:?}"));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    vectors.len()
}

#[test]
fn loads_from_the_checkpoint_with_phi3_small_settings() {
    let start = Instant::now();
    let fresh = load_like_the_engine();
    eprintln!("tiktoken tokenizer load (resolve + build): {:.3} s", start.elapsed().as_secs_f64());
    let tok = tok();
    assert_eq!(fresh.vocab_size(), 100352);
    assert_eq!(tok.vocab_size(), 100352, "100256 ranks + 96 special tokens = the embedding rows");
    assert_eq!(tok.base_vocab_size(), 100256);
    assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.bos_token_id(), Some(100257));
    assert_eq!(tok.eos_token_id(), Some(100257));
    for (i, name) in PHI3_SMALL_SPECIAL_TOKENS.iter().enumerate() {
        let id = 100256 + i as u32;
        assert_eq!(tok.token_to_id(name), Some(id), "{name}");
        assert_eq!(tok.id_to_token(id).as_deref(), Some(*name));
        assert!(tok.is_special_token(id), "{name}");
    }
    assert_eq!(tok.special_token_ids().len(), 96);
    assert_eq!(tok.token_to_id("<|end|>"), Some(100266));
    assert_eq!(tok.token_to_id("<|endofprompt|>"), Some(100276));
    assert!(!tok.contains_id(100352));
    assert!(tok.is_byte_level());
    assert!(!(0..100256).any(|id| tok.is_byte_fallback_token(id)));

    // `add_bos_token` is absent from the config: raw prompts get no BOS.
    assert!(!tok.add_bos_token());
    let hello = tok.encode("Hello world").unwrap();
    assert_eq!(hello, [9906, 1917]);
    assert_eq!(tok.encode_with_special_tokens("Hello world").unwrap(), hello);

    // The config says clean_up_tokenization_spaces: true, but Phi3SmallTokenizer's decode is
    // tiktoken's byte decode: nothing is cleaned up.
    assert!(tok.config().clean_up_tokenization_spaces);
    assert!(!tok.clean_up_tokenization_spaces());
    let text = "Hello , world ! I 'm here . Is n't it ?";
    assert_eq!(tok.decode(&tok.encode(text).unwrap(), false).unwrap(), text);

    // skip_special_tokens drops the 96 special tokens.
    let ids = tok.encode("<|user|>\nHi<|end|>\n<|dummy_id_86|>").unwrap();
    assert_eq!(ids, [100262, 198, 13347, 100266, 198, 100351]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "\nHi\n");
    assert_eq!(tok.decode(&ids, false).unwrap(), "<|user|>\nHi<|end|>\n<|dummy_id_86|>");
}

#[test]
fn shipped_vectors_encode_and_decode() {
    let doc = read_json(&data("phi3_small_tiktoken_vectors.json"));
    assert_eq!(doc["n_vocab"], 100352);
    let plain = doc["plain"].as_array().expect("plain");
    assert_eq!(check_vectors(tok(), plain), 5);
}

#[test]
fn chat_renders_give_tiktokens_ids_through_the_template() {
    let tok = tok();
    let template = ChatTemplate::from_tokenizer(tok, SystemRolePolicy::Auto).expect("template");
    assert_eq!(template.resolved_system_role(), ResolvedSystemRole::Native);
    let doc = read_json(&data("phi3_small_tiktoken_vectors.json"));
    let renders = doc["chat_renders"].as_array().expect("chat_renders");
    assert_eq!(renders.len(), 8);
    for case in renders {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let agp = case["add_generation_prompt"].as_bool().expect("bool");
        let what = format!("{} (add_generation_prompt={agp})", case["conversation"]);
        let prompt = template.render_and_encode(tok, &messages, agp).expect("renders");
        assert_eq!(prompt.text, case["rendered"].as_str().unwrap(), "{what}");
        assert_eq!(prompt.ids, ids_of(&case["ids_tiktoken_allowed_special_all"]), "{what}");
        assert_eq!(prompt.ids[0], 100257, "{what}: the template writes the BOS itself");
        assert_eq!(tok.decode(&prompt.ids, false).unwrap(), prompt.text, "{what}");
    }
}

#[test]
fn generated_vectors_match_python_tiktoken() {
    let doc = read_json(&data("phi3_small_tiktoken_more.json"));
    let specials = doc["special_tokens"].as_object().expect("special_tokens");
    assert_eq!(specials.len(), 96);
    for (id, name) in specials {
        let id: u32 = id.parse().unwrap();
        assert_eq!(tok().token_to_id(name.as_str().unwrap()), Some(id), "{name}");
    }
    assert_eq!(doc["n_vocab"], 100352);
    let vectors = doc["vectors"].as_array().expect("vectors");
    assert!(vectors.len() >= 300, "a few hundred vectors");
    check_vectors(tok(), vectors);
}

/// `PHI_TIKTOKEN_CORPUS=FILE` (written by `python models/make_tiktoken_vectors.py --big N FILE`):
/// tens of thousands of random strings and Python sources, too big to commit.
#[test]
#[ignore = "needs PHI_TIKTOKEN_CORPUS, a corpus made by models/make_tiktoken_vectors.py --big"]
fn big_corpus_matches_tiktoken() {
    let path = std::env::var("PHI_TIKTOKEN_CORPUS").expect("PHI_TIKTOKEN_CORPUS is set");
    let doc = read_json(Path::new(&path));
    let n = check_vectors(tok(), doc["vectors"].as_array().expect("vectors"));
    eprintln!("{n} vectors match");
}

/// Streams `ids` one by one; returns the chunks, final flush included.
fn stream(dec: &mut StreamDecoder, ids: &[u32]) -> Vec<String> {
    let mut chunks = Vec::new();
    for &id in ids {
        if let Some(c) = dec.push(id).expect("push") {
            assert!(!c.is_empty());
            chunks.push(c);
        }
    }
    let tail = dec.finish().expect("finish");
    if !tail.is_empty() {
        chunks.push(tail);
    }
    chunks
}

const STREAM_TEXTS: &[&str] = &[
    "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "😁😁😁 🦀 family 👨‍👩‍👧‍👦 thumbs 👍🏽 flag 🇫🇷 heart ❤️",
    "日本語のテキストと中文文本，还有한국어 문장. 繁體中文測試",
    "𝕄𝕒𝕥𝕙 and 𪚠 rare CJK, ẞ ꙮ ᚠᛇᚻ runes, e\u{301} combining",
    "<|assistant|>\n🦀<|end|>\n🦀 tail<|endoftext|>",
    "a😁<|end|>😁b",
];

#[test]
fn streaming_split_characters_yields_the_full_text_without_replacement_characters() {
    let tok = tok();
    // The test is only meaningful if characters really are split over tokens.
    let grin = tok.encode("😁").unwrap();
    assert_eq!(grin, [76460, 223]);
    assert!(tok.decode(&grin[..1], false).unwrap().contains('\u{FFFD}'));

    for text in STREAM_TEXTS {
        let ids = tok.encode(text).unwrap();
        for skip in [false, true] {
            let full = tok.decode(&ids, skip).unwrap();
            let chunks = stream(&mut tok.stream_decoder(skip).unwrap(), &ids);
            assert_eq!(chunks.concat(), full, "{text:?} (skip={skip})");
            for c in &chunks {
                assert!(!c.contains('\u{FFFD}'), "{text:?}: chunk {c:?} has U+FFFD");
            }
        }
    }
    // A character is emitted with the token that completes it.
    let mut dec = tok.stream_decoder(false).unwrap();
    let ids = tok.encode("a😁b").unwrap();
    let out: Vec<Option<String>> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert_eq!(out.iter().flatten().cloned().collect::<String>(), "a😁b");
    assert!(out.contains(&None), "the first half of 😁 is held back: {out:?}");
    assert_eq!(dec.finish().unwrap(), "");
    // An unfinished character at the end of the stream is flushed as U+FFFD, as decode gives.
    let mut dec = tok.stream_decoder(false).unwrap();
    assert_eq!(dec.push(grin[0]).unwrap(), None);
    assert_eq!(dec.finish().unwrap(), tok.decode(&grin[..1], false).unwrap());
}

#[test]
fn streaming_every_generated_vector_is_exact() {
    let doc = read_json(&data("phi3_small_tiktoken_more.json"));
    let tok = tok();
    for v in doc["vectors"].as_array().unwrap() {
        let ids = ids_of(&v["ids"]);
        for skip in [false, true] {
            let full = tok.decode(&ids, skip).unwrap();
            let chunks = stream(&mut tok.stream_decoder(skip).unwrap(), &ids);
            assert_eq!(chunks.concat(), full, "{:?} (skip={skip})", v["text"]);
            if !full.contains('\u{FFFD}') {
                for c in &chunks {
                    assert!(!c.contains('\u{FFFD}'), "{:?}: chunk {c:?}", v["text"]);
                }
            }
        }
    }
}

#[test]
fn streaming_after_a_prompt_adds_the_continuations_text() {
    let tok = tok();
    for (prompt, continuation) in
        [("Hello", " 😁 world"), ("I want 🦀", "我想在apple工作"), ("<|user|>\nHi<|end|>\n", "😁!")]
    {
        let prompt_ids = tok.encode(prompt).unwrap();
        let gen = tok.encode(continuation).unwrap();
        let all: Vec<u32> = prompt_ids.iter().chain(&gen).copied().collect();
        for skip in [false, true] {
            let whole = tok.decode(&all, skip).unwrap();
            let before = tok.decode(&prompt_ids, skip).unwrap();
            let mut dec = StreamDecoder::after_prompt(tok, skip, &prompt_ids).unwrap();
            let got = stream(&mut dec, &gen).concat();
            assert_eq!(got, whole[before.len()..], "{prompt:?} + {continuation:?}");
        }
    }
    // A prompt (given as ids) that ends inside a character: the anchor is the last whole
    // character, and the continuation's bytes decode on their own.
    let grin = tok.encode("x😁").unwrap();
    let (prompt, gen) = grin.split_at(grin.len() - 1);
    let mut dec = StreamDecoder::after_prompt(tok, false, prompt).unwrap();
    assert_eq!(stream(&mut dec, gen).concat(), tok.decode(gen, false).unwrap());
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("phi-tiktoken-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn load_err(dir: &Path, contents: &[u8]) -> String {
    let path = dir.join(CL100K_FILE_NAME);
    std::fs::write(&path, contents).unwrap();
    let e = PhiTokenizer::from_files(&path, None).expect_err("must not load").to_string();
    assert!(e.contains("invalid tiktoken ranks file"), "{e}");
    e
}

#[test]
fn invalid_tiktoken_files_are_clear_errors() {
    let dir = temp_dir("bad");
    let real = std::fs::read(model_dir().join(CL100K_FILE_NAME)).unwrap();
    let lines: Vec<&[u8]> = real.split(|&b| b == b'\n').collect();

    // Bad base64 on line 3.
    let mut bad = lines.clone();
    bad[2] = b"IQ=!= 2";
    let e = load_err(&dir, &bad.join(&b'\n'));
    assert!(e.contains("line 3") && e.contains("base64"), "{e}");

    // A line missing in the middle: the ranks are not contiguous.
    let mut gap = lines.clone();
    gap.remove(5000);
    let e = load_err(&dir, &gap.join(&b'\n'));
    assert!(e.contains("rank 5000 is missing"), "{e}");

    // A rank that is not a number, and a line with one field.
    let e = load_err(&dir, b"IQ== zero\n");
    assert!(e.contains("line 1") && e.contains("zero"), "{e}");
    let e = load_err(&dir, b"IQ==\n");
    assert!(e.contains("line 1"), "{e}");
    // Not a ranks file at all (a tokenizer.json renamed).
    let e = load_err(&dir, b"{\"version\": \"1.0\", \"model\": {}}\n");
    assert!(e.contains("line 1"), "{e}");
    // Empty.
    load_err(&dir, b"");
    // The first 100 lines of the real file: contiguous ranks, but most single bytes missing.
    let e = load_err(&dir, &lines[..100].join(&b'\n'));
    assert!(e.contains("is not a token"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoint_resolution_falls_back_to_the_tiktoken_file() {
    let dir = temp_dir("resolve");
    std::fs::copy(model_dir().join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"").unwrap();
    let resolve = || ModelSource::parse(dir.to_str().unwrap(), None).unwrap().resolve();
    let e = resolve().unwrap_err().to_string();
    assert!(e.contains("missing tokenizer.json") && e.contains(CL100K_FILE_NAME), "{e}");

    std::fs::copy(model_dir().join(CL100K_FILE_NAME), dir.join(CL100K_FILE_NAME)).unwrap();
    assert_eq!(resolve().unwrap().tokenizer, dir.join(CL100K_FILE_NAME));
    // tokenizer.json wins when both are there.
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    assert_eq!(resolve().unwrap().tokenizer, dir.join("tokenizer.json"));
    std::fs::remove_dir_all(&dir).unwrap();

    // PhiTokenizer::from_dir also falls back to it.
    let from_dir = PhiTokenizer::from_dir(model_dir()).expect("loads");
    assert_eq!(from_dir.encode("Hello world").unwrap(), [9906, 1917]);
    assert!(!from_dir.clean_up_tokenization_spaces());
}
