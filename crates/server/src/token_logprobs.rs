//! Engine tokens to OpenAI logprob entries: token text and bytes from the tokenizer's pieces.

use phi_api::{TextLogprobs, TokenLogprob, TopLogprob};
use phi_engine::engine::GeneratedToken;
use phi_engine::tokenizer::PhiTokenizer;

/// The logprob entry of one generated token, alternatives included. The engine computes the
/// logprob for every request that asks for logprobs, the only ones that get here; NaN would mark
/// a token sampled without.
pub fn token_logprob(tokenizer: &PhiTokenizer, token: &GeneratedToken) -> TokenLogprob {
    let (text, bytes) = token_text(tokenizer, token.id);
    TokenLogprob {
        token: text,
        logprob: token.logprob.unwrap_or(f32::NAN),
        bytes: Some(bytes),
        top_logprobs: token
            .top_logprobs
            .iter()
            .map(|&(id, logprob)| {
                let (token, bytes) = token_text(tokenizer, id);
                TopLogprob { token, logprob, bytes: Some(bytes) }
            })
            .collect(),
    }
}

/// The legacy log-probabilities of a scored prompt (`echo` with `logprobs`), `scores` one entry
/// per prompt token (the first unscored), `echo` the prompt's text as the answer starts with it.
///
/// A token's `text_offset` is where its text starts in `echo`: the length of what the prompt's
/// tokens before it decode to (so SentencePiece's dropped leading space and byte-fallback
/// characters count as they do in the text), less what the decode has in front of `echo` (a
/// BOS the tokenizer added to a text prompt).
pub fn prompt_logprobs(
    tokenizer: &PhiTokenizer,
    scores: &[GeneratedToken],
    echo: &str,
) -> TextLogprobs {
    let mut starts = Vec::with_capacity(scores.len());
    let mut decoded = 0usize;
    let mut decoder = tokenizer.stream_decoder(false).ok();
    for s in scores {
        starts.push(decoded);
        if let Some(Ok(Some(text))) = decoder.as_mut().map(|d| d.push(s.id)) {
            decoded += text.chars().count();
        }
    }
    if let Some(Ok(tail)) = decoder.as_mut().map(|d| d.finish()) {
        decoded += tail.chars().count();
    }
    let echo_len = echo.chars().count();
    let lead = decoded.saturating_sub(echo_len);
    let mut out = TextLogprobs::default();
    for (s, start) in scores.iter().zip(starts) {
        let at = start.saturating_sub(lead).min(echo_len);
        match s.logprob {
            Some(_) => out.push(&token_logprob(tokenizer, s), at),
            None => out.push_unscored(token_text(tokenizer, s.id).0, at),
        }
    }
    out
}

/// A token's text and bytes: SentencePiece's `▁` becomes a space, a byte-fallback piece
/// `<0xNN>` is the single byte NN (its text is lossy when the byte is part of a longer
/// character; `bytes` is exact), special tokens keep their spelling.
///
/// A byte-level vocabulary (Phi-3-small's tiktoken) spells each token's raw bytes with GPT-2's
/// printable characters: `bytes` are those raw bytes, and the text is their (lossy) UTF-8.
pub fn token_text(tokenizer: &PhiTokenizer, id: u32) -> (String, Vec<u8>) {
    let piece = tokenizer.id_to_token(id).unwrap_or_default();
    if tokenizer.is_byte_level() && !tokenizer.is_special_token(id) {
        if let Some(bytes) = phi_engine::tiktoken::byte_level_bytes(&piece) {
            return (String::from_utf8_lossy(&bytes).into_owned(), bytes);
        }
    }
    piece_text(&piece)
}

fn piece_text(piece: &str) -> (String, Vec<u8>) {
    if let Some(byte) = byte_fallback(piece) {
        return (String::from_utf8_lossy(&[byte]).into_owned(), vec![byte]);
    }
    let text = piece.replace('\u{2581}', " ");
    let bytes = text.as_bytes().to_vec();
    (text, bytes)
}

fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces() {
        assert_eq!(piece_text("\u{2581}Hello"), (" Hello".to_string(), b" Hello".to_vec()));
        assert_eq!(piece_text("<0x0A>"), ("\n".to_string(), vec![10]));
        assert_eq!(piece_text("<0xE2>"), ("\u{FFFD}".to_string(), vec![0xE2]));
        assert_eq!(piece_text("<|end|>"), ("<|end|>".to_string(), b"<|end|>".to_vec()));
    }
}
