//! Streaming detokenizer: the concatenated chunks must equal `decode(all_ids)` exactly, and no chunk
//! may contain U+FFFD unless the full decode does.

use std::path::Path;
use std::sync::OnceLock;

use phi_engine::detokenizer::StreamDecoder;
use phi_engine::tokenizer::PhiTokenizer;

fn tokenizer(dir: &str) -> PhiTokenizer {
    PhiTokenizer::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(dir))
        .expect("tokenizer loads")
}

fn july() -> &'static PhiTokenizer {
    static TOK: OnceLock<PhiTokenizer> = OnceLock::new();
    TOK.get_or_init(|| tokenizer("phi3-july-2024"))
}

fn april() -> &'static PhiTokenizer {
    static TOK: OnceLock<PhiTokenizer> = OnceLock::new();
    TOK.get_or_init(|| tokenizer("phi3-april-2024"))
}

/// Streams `ids` and returns the chunks (including the final flush, if non-empty).
fn stream(tok: &PhiTokenizer, ids: &[u32], skip: bool) -> Vec<String> {
    let mut dec = StreamDecoder::new(tok, skip).expect("decoder");
    let mut chunks = Vec::new();
    for &id in ids {
        if let Some(c) = dec.push(id).expect("push") {
            assert!(!c.is_empty(), "Some(\"\") is never returned");
            chunks.push(c);
        }
    }
    let tail = dec.finish().expect("finish");
    if !tail.is_empty() {
        chunks.push(tail);
    }
    chunks
}

/// The two properties every stream must have.
fn check(tok: &PhiTokenizer, ids: &[u32], what: &str) {
    for skip in [false, true] {
        let full = tok.decode(ids, skip).expect("decode");
        let chunks = stream(tok, ids, skip);
        assert_eq!(chunks.concat(), full, "{what} (skip={skip}) ids={ids:?}");
        if !full.contains('\u{FFFD}') {
            for c in &chunks {
                assert!(!c.contains('\u{FFFD}'), "{what}: chunk {c:?} has U+FFFD");
            }
        }
    }
}

const CORPUS: &[&str] = &[
    "Hello world",
    " Hello world",
    "   leading spaces and trailing   ",
    "tabs\tbetween\t\twords\t and\n\n\nnewlines\r\n",
    "emoji 🦀 rust 😀😃 family 👨‍👩‍👧‍👦 thumbs 👍🏽👍🏿 flag 🇫🇷 heart ❤️",
    "🦀🦀🦀",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "𝕏𝕒𝕝 math alphanumerics and 𪚠 rare CJK, ẞ ꙮ ᚠᛇᚻ runes",
    "Größe, naïve café, façade, Ærøskøbing; e\u{301} combining",
    "\u{0}\u{1}\u{7} control bytes \u{200b} zero width \u{feff} bom",
    "fn main() {\n    let v: Vec<u8> = vec![1, 2, 3];\n    println!(\"{:?}\", v);\n}\n",
    "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n2+2 = 4.<|end|><|endoftext|>",
    "<s>Hello</s> after </s>",
    "<|assistant|>\n🦀<|end|>\n🦀 tail<|placeholder3|>",
    "<|end|> leading special then text",
    "a<|end|>🦀<|end|>b",
    "\n",
    " ",
    "",
    "<unk> unknown",
];

#[test]
fn corpus_streams_exactly_for_both_tokenizers_and_skip_settings() {
    for tok in [july(), april()] {
        for text in CORPUS {
            let ids = tok.encode(text).expect("encodes");
            check(tok, &ids, text);
        }
    }
}

#[test]
fn normal_tokens_are_emitted_immediately_and_keep_their_space() {
    let tok = july();
    let mut dec = tok.stream_decoder(true).expect("decoder");
    // ▁Hello ▁world !
    assert_eq!(dec.push(15043).expect("push").as_deref(), Some("Hello"));
    assert_eq!(dec.push(3186).expect("push").as_deref(), Some(" world"));
    assert_eq!(dec.push(29991).expect("push").as_deref(), Some("!"));
    // A skipped special token produces nothing, and the next word still keeps its space.
    assert_eq!(dec.push(32007).expect("push"), None);
    assert_eq!(dec.push(15043).expect("push").as_deref(), Some(" Hello"));
    assert_eq!(dec.finish().expect("finish"), "");
}

#[test]
fn byte_fallback_characters_are_held_until_final() {
    let tok = july();
    let mut dec = tok.stream_decoder(false).expect("decoder");
    // "emoji 🦀 rust": ▁em o ji ▁ <0xF0> <0x9F> <0xA6> <0x80> ▁rust
    let ids = [953, 29877, 2397, 29871, 243, 162, 169, 131, 21580];
    let mut out = Vec::new();
    for id in ids {
        out.push(dec.push(id).expect("push"));
    }
    assert_eq!(
        out,
        vec![
            Some("em".to_string()),
            Some("o".to_string()),
            Some("ji".to_string()),
            Some(" ".to_string()),
            None,
            None,
            None,
            None,
            Some("🦀 rust".to_string()),
        ]
    );
    // At the end of the stream a complete run is flushed by finish().
    let mut dec = tok.stream_decoder(false).expect("decoder");
    for id in [243, 162, 169] {
        assert_eq!(dec.push(id).expect("push"), None);
    }
    assert_eq!(dec.push(131).expect("push"), None);
    assert_eq!(dec.finish().expect("finish"), "🦀");
}

#[test]
fn invalid_byte_sequences_match_full_decode() {
    let tok = july();
    let cases: &[&[u32]] = &[
        // Lone lead byte, then text: the full decode has one U+FFFD.
        &[15043, 243, 3186],
        // Lone continuation byte.
        &[131, 15043],
        // "€" (E2 82 AC) followed by a stray 0x80 in the same run: the whole run turns into
        // U+FFFD in the full decode, so "€" must not have been emitted early.
        &[15043, 229, 133, 175, 131, 3186],
        // Truncated sequence at the end of the stream.
        &[15043, 243, 162],
        // Byte run interrupted by a special token (skipped or not) and an unknown id.
        &[243, 162, 32007, 169, 131, 15043],
        &[243, 32050, 162, 169, 131],
        // Only specials / unknown ids.
        &[32010, 32007, 32050, 32001],
        // Space-only token first, then words (the decoder strips one leading space overall).
        &[29871, 15043],
        &[29871, 29871, 15043],
        &[32001, 29871, 15043],
        &[32001, 15043, 32007, 32001, 29871, 13, 15043],
    ];
    for ids in cases {
        check(tok, ids, "invalid/edge bytes");
    }
    // The "€" + stray byte case really contains U+FFFD and no "€".
    let full = tok.decode(&[15043, 229, 133, 175, 131, 3186], false).expect("decode");
    assert!(full.contains('\u{FFFD}') && !full.contains('€'), "{full:?}");
}

/// Deterministic pseudo-random id sequences mixing byte tokens, ordinary pieces, the space piece,
/// special tokens, `</s>` and ids past the tokenizer's vocabulary.
#[test]
fn random_sequences_stream_exactly() {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ordinary = [15043, 3186, 29991, 29871, 13, 12, 1678, 30325, 30346, 29889, 2, 0];
    for tok in [july(), april()] {
        for round in 0..400 {
            let len = (next() % 40) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    let r = next();
                    match r % 10 {
                        // Byte-fallback pieces 3..=258, biased towards UTF-8 lead/continuation.
                        0..=4 => 3 + (r >> 8) as u32 % 256,
                        5 | 6 => ordinary[(r >> 8) as usize % ordinary.len()],
                        7 => 32000 + (r >> 8) as u32 % 11,
                        8 => 32011 + (r >> 8) as u32 % 53,
                        _ => 100 + (r >> 8) as u32 % 31_000,
                    }
                })
                .collect();
            check(tok, &ids, &format!("random round {round}"));
        }
    }
}

#[test]
fn encoded_valid_utf8_never_yields_replacement_chunks() {
    // Valid text spelled with many byte-fallback tokens, cut at every position: each prefix streams
    // exactly, and chunks never carry U+FFFD (the full decode of a cut prefix may, at its end only).
    let tok = july();
    let ids = tok.encode("a🦀b😀😃c👨‍👩‍👧d𪚠e").expect("encodes");
    for cut in 0..=ids.len() {
        let prefix = &ids[..cut];
        for skip in [false, true] {
            let mut dec = tok.stream_decoder(skip).expect("decoder");
            let mut emitted = String::new();
            for &id in prefix {
                if let Some(c) = dec.push(id).expect("push") {
                    assert!(!c.contains('\u{FFFD}'), "cut {cut}: {c:?}");
                    emitted.push_str(&c);
                }
            }
            emitted.push_str(&dec.finish().expect("finish"));
            assert_eq!(emitted, tok.decode(prefix, skip).expect("decode"), "cut {cut}");
        }
    }
}

#[test]
fn decoder_is_reusable_after_finish() {
    let tok = july();
    let mut dec = tok.stream_decoder(true).expect("decoder");
    assert_eq!(dec.push(15043).expect("push").as_deref(), Some("Hello"));
    assert_eq!(dec.finish().expect("finish"), "");
    // A new sequence starts fresh: its first word has no leading space, as in decode().
    assert_eq!(dec.push(3186).expect("push").as_deref(), Some("world"));
    assert!(dec.skip_special_tokens());
}

/// A continuation streamed after a prompt adds exactly what it adds to the full decode:
/// `decode(prompt + ids) - decode(prompt)`, whatever the prompt ends with (text, a special
/// token, a byte-fallback character, nothing).
#[test]
fn continuation_after_a_prompt_adds_what_it_adds_to_the_full_decode() {
    for tok in [july(), april()] {
        for (prompt, continuation) in [
            ("Once upon a", " time there was"),
            ("Hello", " 🦀 world"),
            ("emoji 🦀", " and more"),
            ("<|user|>\nhi<|end|>\n<|assistant|>", " Sure, 2+2 = 4."),
            ("a\n", "\n  indented"),
            ("", " first"),
        ] {
            let prompt_ids = tok.encode(prompt).expect("encodes");
            let ids = tok.encode(&format!("{prompt}{continuation}")).expect("encodes");
            let ids = &ids[prompt_ids.len().min(ids.len())..];
            for skip in [false, true] {
                let all: Vec<u32> = prompt_ids.iter().chain(ids).copied().collect();
                let full = tok.decode(&all, skip).expect("decode");
                let head = tok.decode(&prompt_ids, skip).expect("decode");
                let want = full.strip_prefix(head.as_str()).expect("the prompt's text comes first");
                let mut dec = StreamDecoder::after_prompt(tok, skip, &prompt_ids).expect("decoder");
                let mut got = String::new();
                for &id in ids {
                    got.push_str(&dec.push(id).expect("push").unwrap_or_default());
                }
                got.push_str(&dec.finish().expect("finish"));
                assert_eq!(got, want, "{prompt:?} + {continuation:?} (skip={skip})");
            }
        }
    }
    // Without the prompt, the first token's space is stripped, as in a chat answer.
    let tok = july();
    let ids = tok.encode("a time").expect("encodes");
    assert_eq!(tok.decode(&ids, true).expect("decode"), "a time");
    assert_eq!(stream(tok, &ids[1..], true).concat(), "time");
}
