//! Phi-3-small's tokenizer: an OpenAI tiktoken ranks file turned into a `tokenizers::Tokenizer`.
//!
//! Why this exists: Phi-3-small checkpoints (`microsoft/Phi-3-small-8k-instruct`, `-128k-`) ship
//! no `tokenizer.json`. Their tokenizer is remote Python code (`tokenization_phi3_small.py`,
//! `Phi3SmallTokenizer`) over tiktoken's `cl100k_base`: the folder has `cl100k_base.tiktoken` (one
//! `<base64 token bytes> <rank>` line per token, 100256 ranks) and a `tokenizer_config.json` whose
//! `added_tokens_decoder` is empty, because the special tokens live in that Python code. This
//! module builds the equivalent Hugging Face tokenizer so that [`PhiTokenizer`] and everything
//! downstream of it (chat template, streaming detokenizer, log-probabilities) work unchanged:
//!
//! * model: byte-level BPE. A token's vocabulary key is its bytes spelled with GPT-2's
//!   `bytes_to_unicode` characters, its id is its rank. The merges are derived from the ranks as
//!   transformers' `TikTokenConverter` does: every split of a multi-byte token into two pieces
//!   that are both tokens is a merge, ordered by the merged token's rank, ties by the pieces'
//!   ranks. `ignore_merges` is on: a pre-token that is itself a token is that token, which is
//!   tiktoken's first step too;
//! * pre-tokenizer: `Split` on the cl100k regex (tiktoken's [`CL100K_PATTERN`], as
//!   [`CL100K_ONIG_PATTERN`] for Oniguruma; behaviour `Isolated`), then
//!   `ByteLevel` without prefix space and without its own regex; no normalizer;
//! * decoder: `ByteLevel` (the tokens' bytes, joined, decoded as UTF-8 with U+FFFD for invalid
//!   sequences, as tiktoken's `decode(errors="replace")`); no post-processor;
//! * special tokens: the 96 ids after the ranks, [`PHI3_SMALL_SPECIAL_TOKENS`] (for a 100256-rank
//!   file), overridden or extended by any `added_tokens_decoder` entries of the
//!   `tokenizer_config.json`. Written in the text they are recognised, as tiktoken's
//!   `encode(text, allowed_special="all")` does.
//!
//! The tests (`tests/tiktoken.rs`) check the result against python tiktoken on several hundred
//! strings, and the checkpoint's chat renders.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value as Json;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::tokenizer::{Result, TokenizerError};

/// The file name of the ranks file in a Phi-3-small checkpoint.
pub const CL100K_FILE_NAME: &str = "cl100k_base.tiktoken";

/// tiktoken's `cl100k_base` split pattern (`tiktoken_ext/openai_public.py`), for fancy-regex.
///
/// Not usable as is with Oniguruma, the regex engine of `tokenizers` (`onig` feature): it
/// accepts the pattern, but in its (Ruby) syntax `{1,3}+` is not a possessive bounded repeat but
/// a repeat of a repeat, so `\p{N}{1,3}+` takes a whole run of digits (`"3333333"` would be one
/// pre-token, where tiktoken makes `333`, `333`, `3`). [`CL100K_ONIG_PATTERN`] is what is used.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// [`CL100K_PATTERN`] written for Oniguruma: `\p{N}{1,3}+` becomes the greedy `\p{N}{1,3}`,
/// which matches the same (the repeat ends its alternative, so nothing can backtrack into it).
///
/// The other possessive quantifiers (`?+`, `++`, `*+`) mean the same in both engines. `$` is an
/// end of *line* in Oniguruma, but in `\s++$` the possessive whitespace run also takes any line
/// break, so `$` can only match at the end of the text, as in fancy-regex.
pub const CL100K_ONIG_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// Number of ranks in `cl100k_base.tiktoken`, i.e. the first special-token id of Phi-3-small.
pub const CL100K_RANKS: u32 = 100256;

/// The special tokens of Phi-3-small, ids `CL100K_RANKS + i` (100256..=100351).
///
/// From `Phi3SmallTokenizer` (as listed in the onnxruntime-extensions test copy of its
/// `tokenizer_config.json`): `<|endoftext|>` (100257, BOS/EOS/PAD), the FIM tokens, the chat
/// markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>` (100266), `<|endofprompt|>`
/// (100276), and 87 `<|dummy_id_N|>` fillers (numbered out of id order: 100256 is dummy 2).
/// The model's embedding has 100352 rows, one per id up to the last of these.
pub const PHI3_SMALL_SPECIAL_TOKENS: [&str; 96] = [
    "<|dummy_id_2|>",
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|dummy_id_0|>",
    "<|dummy_id_1|>",
    "<|end|>",
    "<|dummy_id_3|>",
    "<|dummy_id_4|>",
    "<|dummy_id_5|>",
    "<|dummy_id_6|>",
    "<|dummy_id_7|>",
    "<|dummy_id_8|>",
    "<|dummy_id_9|>",
    "<|dummy_id_10|>",
    "<|dummy_id_11|>",
    "<|endofprompt|>",
    "<|dummy_id_12|>",
    "<|dummy_id_13|>",
    "<|dummy_id_14|>",
    "<|dummy_id_15|>",
    "<|dummy_id_16|>",
    "<|dummy_id_17|>",
    "<|dummy_id_18|>",
    "<|dummy_id_19|>",
    "<|dummy_id_20|>",
    "<|dummy_id_21|>",
    "<|dummy_id_22|>",
    "<|dummy_id_23|>",
    "<|dummy_id_24|>",
    "<|dummy_id_25|>",
    "<|dummy_id_26|>",
    "<|dummy_id_27|>",
    "<|dummy_id_28|>",
    "<|dummy_id_29|>",
    "<|dummy_id_30|>",
    "<|dummy_id_31|>",
    "<|dummy_id_32|>",
    "<|dummy_id_33|>",
    "<|dummy_id_34|>",
    "<|dummy_id_35|>",
    "<|dummy_id_36|>",
    "<|dummy_id_37|>",
    "<|dummy_id_38|>",
    "<|dummy_id_39|>",
    "<|dummy_id_40|>",
    "<|dummy_id_41|>",
    "<|dummy_id_42|>",
    "<|dummy_id_43|>",
    "<|dummy_id_44|>",
    "<|dummy_id_45|>",
    "<|dummy_id_46|>",
    "<|dummy_id_47|>",
    "<|dummy_id_48|>",
    "<|dummy_id_49|>",
    "<|dummy_id_50|>",
    "<|dummy_id_51|>",
    "<|dummy_id_52|>",
    "<|dummy_id_53|>",
    "<|dummy_id_54|>",
    "<|dummy_id_55|>",
    "<|dummy_id_56|>",
    "<|dummy_id_57|>",
    "<|dummy_id_58|>",
    "<|dummy_id_59|>",
    "<|dummy_id_60|>",
    "<|dummy_id_61|>",
    "<|dummy_id_62|>",
    "<|dummy_id_63|>",
    "<|dummy_id_64|>",
    "<|dummy_id_65|>",
    "<|dummy_id_66|>",
    "<|dummy_id_67|>",
    "<|dummy_id_68|>",
    "<|dummy_id_69|>",
    "<|dummy_id_70|>",
    "<|dummy_id_71|>",
    "<|dummy_id_72|>",
    "<|dummy_id_73|>",
    "<|dummy_id_74|>",
    "<|dummy_id_75|>",
    "<|dummy_id_76|>",
    "<|dummy_id_77|>",
    "<|dummy_id_78|>",
    "<|dummy_id_79|>",
    "<|dummy_id_80|>",
    "<|dummy_id_81|>",
    "<|dummy_id_82|>",
    "<|dummy_id_83|>",
    "<|dummy_id_84|>",
    "<|dummy_id_85|>",
    "<|dummy_id_86|>",
];

fn bad_file(message: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tiktoken(message.to_string())
}

/// Parses a tiktoken ranks file: the bytes of every token, indexed by rank.
///
/// Lines are `<base64 of the token's bytes> <rank>` (empty lines are skipped, as tiktoken's
/// `load_tiktoken_bpe` does). The ranks must be exactly `0..n` (in any order), the tokens
/// distinct, and every single byte must be a token (a byte-level BPE could not spell some
/// texts otherwise). Errors name the offending line.
pub fn parse_ranks(data: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut entries: Vec<(u32, Vec<u8>)> = Vec::with_capacity(data.len() / 16);
    for (index, line) in data.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let lineno = index + 1;
        let mut fields = line.split(|b| b.is_ascii_whitespace()).filter(|f| !f.is_empty());
        let (Some(token), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad_file(format!(
                "line {lineno}: expected `<base64 token> <rank>`, found {:?}",
                String::from_utf8_lossy(line)
            )));
        };
        let bytes = decode_base64(token).ok_or_else(|| {
            bad_file(format!(
                "line {lineno}: {:?} is not a base64-encoded token",
                String::from_utf8_lossy(token)
            ))
        })?;
        let rank = std::str::from_utf8(rank).ok().and_then(|r| r.parse::<u32>().ok()).ok_or_else(
            || {
                bad_file(format!(
                    "line {lineno}: rank {:?} is not a non-negative integer",
                    String::from_utf8_lossy(rank)
                ))
            },
        )?;
        entries.push((rank, bytes));
    }
    if entries.is_empty() {
        return Err(bad_file("no `<base64 token> <rank>` lines"));
    }
    entries.sort_unstable_by_key(|(rank, _)| *rank);
    for (expected, (rank, _)) in entries.iter().enumerate() {
        let expected = expected as u32;
        if *rank != expected {
            return Err(bad_file(if *rank < expected {
                format!("rank {rank} appears more than once")
            } else {
                format!("ranks are not contiguous: rank {expected} is missing (next is {rank})")
            }));
        }
    }
    let tokens: Vec<Vec<u8>> = entries.into_iter().map(|(_, bytes)| bytes).collect();
    let mut index: HashMap<&[u8], u32> = HashMap::with_capacity(tokens.len());
    for (rank, token) in tokens.iter().enumerate() {
        if let Some(first) = index.insert(token.as_slice(), rank as u32) {
            return Err(bad_file(format!(
                "ranks {first} and {rank} are the same token {:?}",
                String::from_utf8_lossy(token)
            )));
        }
    }
    if let Some(byte) = (0..=255u8).find(|b| !index.contains_key(std::slice::from_ref(b))) {
        return Err(bad_file(format!("the single byte 0x{byte:02X} is not a token")));
    }
    Ok(tokens)
}

/// The special tokens of a tokenizer whose ranks file has `n_ranks` tokens, in id order from
/// `n_ranks` on.
///
/// Starts from [`PHI3_SMALL_SPECIAL_TOKENS`] when `n_ranks` is [`CL100K_RANKS`] (none
/// otherwise); each entry of the config's `added_tokens_decoder` (`{"<id>": {"content": ...,
/// "special", "lstrip", "rstrip", "single_word", "normalized"}}`) then replaces or adds its id,
/// `special` defaulting to `true` (every tiktoken special token is special). The ids must end up
/// contiguous from `n_ranks`; an entry inside the ranks is an error.
pub fn special_tokens(config_json: Option<&str>, n_ranks: u32) -> Result<Vec<AddedToken>> {
    let mut table: BTreeMap<u32, AddedToken> = BTreeMap::new();
    if n_ranks == CL100K_RANKS {
        for (i, content) in PHI3_SMALL_SPECIAL_TOKENS.iter().enumerate() {
            table.insert(n_ranks + i as u32, AddedToken::from(*content, true).normalized(false));
        }
    }
    if let Some(text) = config_json {
        let json: Json =
            serde_json::from_str(text).map_err(|e| TokenizerError::Config(e.to_string()))?;
        match json.get("added_tokens_decoder") {
            None | Some(Json::Null) => {}
            Some(Json::Object(entries)) => {
                for (key, entry) in entries {
                    let (id, token) = config_added_token(key, entry)?;
                    if id < n_ranks {
                        return Err(TokenizerError::Config(format!(
                            "added_tokens_decoder: id {id} is one of the tiktoken file's \
                             {n_ranks} ranks"
                        )));
                    }
                    table.insert(id, token);
                }
            }
            Some(_) => {
                return Err(TokenizerError::Config(
                    "`added_tokens_decoder` must be an object".into(),
                ))
            }
        }
    }
    let mut out = Vec::with_capacity(table.len());
    for (expected, (id, token)) in (n_ranks..).zip(table) {
        if id != expected {
            return Err(TokenizerError::Config(format!(
                "added_tokens_decoder: special-token ids must follow the {n_ranks} ranks without \
                 gaps, but id {expected} is missing (next is {id})"
            )));
        }
        out.push(token);
    }
    Ok(out)
}

fn config_added_token(key: &str, entry: &Json) -> Result<(u32, AddedToken)> {
    let bad = |what: &str| TokenizerError::Config(format!("added_tokens_decoder[{key:?}]: {what}"));
    let id: u32 = key.parse().map_err(|_| bad("the key is not an integer id"))?;
    let content = entry
        .get("content")
        .and_then(Json::as_str)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("no non-empty string `content`"))?;
    let flag = |name: &str, default: bool| match entry.get(name) {
        None | Some(Json::Null) => Ok(default),
        Some(Json::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(&format!("`{name}` must be a boolean"))),
    };
    let token = AddedToken::from(content, flag("special", true)?)
        .lstrip(flag("lstrip", false)?)
        .rstrip(flag("rstrip", false)?)
        .single_word(flag("single_word", false)?)
        .normalized(flag("normalized", false)?);
    Ok((id, token))
}

/// Builds the Hugging Face tokenizer of a tiktoken ranks file (see the module documentation),
/// with the special tokens of [`special_tokens`] for the given `tokenizer_config.json` text.
pub fn build_tokenizer(
    ranks_file: &[u8],
    config_json: Option<&str>,
) -> Result<tokenizers::Tokenizer> {
    let tokens = parse_ranks(ranks_file)?;
    let n_ranks = u32::try_from(tokens.len()).map_err(|_| bad_file("too many ranks"))?;
    let added = special_tokens(config_json, n_ranks)?;

    let byte_chars = bytes_to_unicode();
    let spell =
        |bytes: &[u8]| -> String { bytes.iter().map(|&b| byte_chars[b as usize]).collect() };
    let merges = merges_by_rank(&tokens);
    let strings: Vec<String> = tokens.iter().map(|t| spell(t)).collect();
    let merges: Merges = merges
        .into_iter()
        .map(|(left, right)| (strings[left as usize].clone(), strings[right as usize].clone()))
        .collect();
    let vocab: Vocab = strings.into_iter().zip(0u32..).collect();

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(true)
        .build()
        .map_err(|e| bad_file(format!("building the BPE model: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(CL100K_ONIG_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| bad_file(format!("the cl100k split pattern: {e}")))?;
    let byte_level = ByteLevel::default().add_prefix_space(false).use_regex(false);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ])));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer.add_special_tokens(&added);
    for (id, token) in (n_ranks..).zip(&added) {
        let got = tokenizer.token_to_id(&token.content);
        if got != Some(id) {
            return Err(TokenizerError::Config(format!(
                "special token {:?} should have id {id} but has {got:?} (is it also a tiktoken \
                 token or listed twice?)",
                token.content
            )));
        }
    }
    Ok(tokenizer)
}

/// The BPE merges of `tokens` (indexed by rank) as `(left rank, right rank)` pairs, in
/// transformers' `TikTokenConverter` order: by the merged token's rank, then by the pieces' ranks.
fn merges_by_rank(tokens: &[Vec<u8>]) -> Vec<(u32, u32)> {
    let index: HashMap<&[u8], u32> =
        tokens.iter().zip(0u32..).map(|(t, rank)| (t.as_slice(), rank)).collect();
    let mut merges = Vec::with_capacity(tokens.len() * 3);
    let mut local: Vec<(u32, u32)> = Vec::new();
    for token in tokens.iter().filter(|t| t.len() >= 2) {
        local.clear();
        for at in 1..token.len() {
            let (left, right) = token.split_at(at);
            if let (Some(&l), Some(&r)) = (index.get(left), index.get(right)) {
                local.push((l, r));
            }
        }
        // The outer loop runs in rank order, so only each token's own splits need sorting.
        local.sort_unstable();
        merges.extend_from_slice(&local);
    }
    merges
}

/// GPT-2's `bytes_to_unicode`: the printable character that spells each byte in a byte-level
/// vocabulary (`!`..`~`, `¡`..`¬`, `®`..`ÿ` stand for themselves, the other 68 bytes for
/// U+0100 onwards, in byte order).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let b = byte as u8;
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        *slot = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are characters");
            next += 1;
            c
        };
    }
    table
}

/// The raw bytes a byte-level vocabulary piece spells (the inverse of GPT-2's
/// `bytes_to_unicode`), or `None` when a character of it is not one of the 256.
pub fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    let table = bytes_to_unicode();
    piece.chars().map(|c| table.iter().position(|&t| t == c).map(|b| b as u8)).collect()
}

/// Standard base64 (`A-Z a-z 0-9 + /`, `=` padding in the last group), as in tiktoken files.
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    if text.is_empty() || !text.len().is_multiple_of(4) {
        return None;
    }
    let groups = text.len() / 4;
    let mut out = Vec::with_capacity(groups * 3);
    for (i, group) in text.chunks_exact(4).enumerate() {
        let pad = if i + 1 == groups {
            group.iter().rev().take_while(|&&c| c == b'=').count()
        } else {
            0
        };
        if pad > 2 {
            return None;
        }
        let mut value = 0u32;
        for &c in &group[..4 - pad] {
            value = (value << 6) | sextet(c)?;
        }
        value <<= 6 * pad as u32;
        out.extend_from_slice(&value.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_standard_padding() {
        assert_eq!(decode_base64(b"IQ==").as_deref(), Some(&b"!"[..]));
        assert_eq!(decode_base64(b"IGhl").as_deref(), Some(&b" he"[..]));
        assert_eq!(decode_base64(b"aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(decode_base64(b"/w==").as_deref(), Some(&[0xFF][..]));
        assert_eq!(decode_base64(b"+/+/").as_deref(), Some(&[0xFB, 0xFF, 0xBF][..]));
        for bad in [&b""[..], b"IQ=", b"I===", b"IQ==IQ==", b"I!==", b"abc"] {
            assert_eq!(decode_base64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn bytes_to_unicode_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        assert_eq!(t[0xFF], 'ÿ');
        let mut sorted = t.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    /// A ranks file with every byte plus `extra` tokens after them.
    fn ranks_file(extra: &[&[u8]]) -> Vec<u8> {
        let b64 = |bytes: &[u8]| -> String {
            const A: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = String::new();
            for chunk in bytes.chunks(3) {
                let mut v = [0u8; 3];
                v[..chunk.len()].copy_from_slice(chunk);
                let n = (u32::from(v[0]) << 16) | (u32::from(v[1]) << 8) | u32::from(v[2]);
                for i in 0..4 {
                    if i <= chunk.len() {
                        s.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
                    } else {
                        s.push('=');
                    }
                }
            }
            s
        };
        let mut out = String::new();
        let singles: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let all = singles.iter().map(Vec::as_slice).chain(extra.iter().copied());
        for (rank, token) in all.enumerate() {
            out.push_str(&format!("{} {rank}\n", b64(token)));
        }
        out.into_bytes()
    }

    #[test]
    fn merges_follow_the_merged_tokens_rank() {
        let file = ranks_file(&[b"ab", b"bc", b"abc", b"bcd", b"abcd"]);
        let tokens = parse_ranks(&file).expect("valid");
        let (a, b, c, d) = (97, 98, 99, 100);
        let (ab, bc, abc, bcd) = (256, 257, 258, 259);
        // ab; bc; abc = a+bc | ab+c (ties by the pieces' ranks); bcd = bc+d (cd is no token);
        // abcd = a+bcd | abc+d.
        let want = vec![(a, b), (b, c), (a, bc), (ab, c), (bc, d), (a, bcd), (abc, d)];
        assert_eq!(merges_by_rank(&tokens), want);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let check = |data: &[u8], want: &str| {
            let e = parse_ranks(data).expect_err("must fail").to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        };
        check(b"", "no `<base64 token> <rank>` lines");
        check(b"IQ== 0\nnot-base64! 1\n", "line 2");
        check(b"IQ== 0\nIg== x\n", "rank \"x\"");
        check(b"IQ== 0 7\n", "line 1: expected");
        check(b"IQ== 0\nIg== 2\n", "rank 1 is missing");
        check(b"IQ== 0\nIg== 0\n", "rank 0 appears more than once");
        check(b"IQ== 0\nIQ== 1\n", "same token");
        check(b"IQ== 0\nIg== 1\n", "0x00 is not a token");
        assert!(parse_ranks(&ranks_file(&[b"ab"])).is_ok());
    }

    #[test]
    fn special_tokens_table_and_config_overrides() {
        let table = special_tokens(None, CL100K_RANKS).unwrap();
        assert_eq!(table.len(), 96);
        assert_eq!(table[0].content, "<|dummy_id_2|>");
        assert_eq!(table[1].content, "<|endoftext|>");
        assert_eq!(table[10].content, "<|end|>");
        assert_eq!(table[20].content, "<|endofprompt|>");
        assert!(table.iter().all(|t| t.special));
        // The real Phi-3-small config: empty `added_tokens_decoder`.
        let empty = special_tokens(Some(r#"{"added_tokens_decoder": {}}"#), CL100K_RANKS).unwrap();
        assert_eq!(empty, table);
        // Config entries win over the table and may extend it.
        let cfg = r#"{"added_tokens_decoder": {
            "100266": {"content": "<|END|>", "rstrip": true},
            "100352": {"content": "<|extra|>", "special": false}}}"#;
        let merged = special_tokens(Some(cfg), CL100K_RANKS).unwrap();
        assert_eq!(merged.len(), 97);
        assert_eq!(merged[10].content, "<|END|>");
        assert!(merged[10].rstrip && merged[10].special);
        assert_eq!(merged[96].content, "<|extra|>");
        assert!(!merged[96].special);
        // Other rank counts start without the Phi-3-small table.
        assert!(special_tokens(None, 300).unwrap().is_empty());
        let gap = r#"{"added_tokens_decoder": {"301": {"content": "<|x|>"}}}"#;
        assert!(special_tokens(Some(gap), 300).unwrap_err().to_string().contains("300 is missing"));
        let inside = r#"{"added_tokens_decoder": {"5": {"content": "<|x|>"}}}"#;
        assert!(special_tokens(Some(inside), 300).is_err());
        assert!(special_tokens(Some(r#"{"added_tokens_decoder": []}"#), 300).is_err());
    }

    #[test]
    fn onig_pattern_differs_only_in_the_digit_repeat() {
        assert_eq!(CL100K_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}"), CL100K_ONIG_PATTERN);
        // The reason: Oniguruma reads `{1,3}+` as a repeated repeat.
        let pieces = |pattern: &str, text: &str| -> Vec<String> {
            use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
            let split = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .expect("Oniguruma accepts the pattern");
            let mut pre = PreTokenizedString::from(text);
            split.pre_tokenize(&mut pre).expect("splits");
            pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(piece, _, _)| piece.to_string())
                .collect()
        };
        assert_eq!(pieces(CL100K_PATTERN, "3333333"), ["3333333"]);
        assert_eq!(pieces(CL100K_ONIG_PATTERN, "3333333"), ["333", "333", "3"]);
        assert_eq!(
            pieces(CL100K_ONIG_PATTERN, "I'LL be  there\r\n\n  ok  "),
            ["I", "'LL", " be", " ", " there", "\r\n\n", " ", " ok", "  "]
        );
    }

    #[test]
    fn small_vocabulary_round_trips_and_splits_like_cl100k() {
        let file = ranks_file(&[b"ab", b"bc", b"abc", b"333", b" a", b"'ll"]);
        let tok = build_tokenizer(&file, None).expect("builds");
        let ids = |text: &str| tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids("abc"), vec![258]);
        // \p{N}{1,3}+ is a bounded possessive repeat in Oniguruma too: 333 333 3, not one piece.
        assert_eq!(ids("3333333"), vec![259, 259, 51]);
        // " abc" is one pre-token; the lowest-rank pair merges first: " " + (ab)c, not (" a")bc.
        assert_eq!(ids(" abc"), vec![32, 258]);
        assert_eq!(ids(" a"), vec![260]);
        // Case-insensitive contraction: "'LL" is its own pre-token.
        assert_eq!(ids("I'll"), vec![73, 261]);
        assert_eq!(ids("I'LL").len(), 4);
        for text in ["abc", " a bc\r\n\n  x", "日本 😁", "I'll"] {
            assert_eq!(tok.decode(&ids(text), false).unwrap(), text);
        }
    }
}
