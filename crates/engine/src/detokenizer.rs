//! Incremental detokenization for streaming responses.
//!
//! Decoding token by token is not concatenative for the Phi-3 (SentencePiece) decoder:
//! * the decoder strips one leading space of the *whole* decoded text (`Strip(1)`), so decoding
//!   `▁world` alone gives `"world"` while it contributes `" world"` after other text;
//! * characters outside the vocabulary are spelled as several byte-fallback tokens (`<0xF0>`,
//!   `<0x9F>`, `<0xA6>`, `<0x80>` = 🦀); a run of consecutive byte tokens is decoded as one unit,
//!   and if the run as a whole is not valid UTF-8, *every* byte of it becomes U+FFFD, including
//!   bytes that formed complete characters earlier in the run.
//!
//! A byte-level decoder (Phi-3-small's tiktoken tokenizer) has no such strip, but there every token
//! is raw bytes and a character may be split over several tokens (😁 is two cl100k tokens): the
//! text of a window that ends inside a character ends in U+FFFD until its last byte arrives.
//!
//! [`StreamDecoder`] produces chunks whose concatenation is exactly
//! `tokenizer.decode(all_ids, skip_special_tokens)`, never emitting a partial character or a
//! U+FFFD that later tokens could still change.

use crate::tokenizer::{PhiTokenizer, TokenizerError};

/// Streaming detokenizer for one generated sequence.
///
/// Exists so the server can send text deltas as tokens are generated while guaranteeing that the
/// streamed text equals the non-streamed answer byte for byte.
///
/// How it works: a *commit boundary* is placed after a token only when no later token can change
/// the text before it, i.e. when the last token that the decoder sees (special tokens being
/// skipped and unknown ids being ignored, as `decode` does) is not a byte-fallback token. Text is
/// emitted only up to the latest commit boundary; a trailing byte-fallback run is held back until
/// a normal token (or [`StreamDecoder::finish`]) ends it. Each committed piece is computed as
/// `decode(anchor + piece)` minus `decode(anchor)`, where the anchor is the previously committed
/// piece that produced text, so the leading-space strip of the decoder hits the anchor in both
/// decodes and the piece keeps its real leading space. Until some text has been produced the
/// window starts at the first token, which makes the early decodes equal the full decode. Work per
/// token is proportional to the window (usually two or three tokens), not the sequence.
///
/// Cost of exactness: characters spelled with byte-fallback tokens (emoji, rare CJK) are emitted
/// together with the next normal token, i.e. one token later than their last byte.
///
/// Byte-level tokenizers ([`PhiTokenizer::is_byte_level`]): a commit is held back while the
/// window's text ends in U+FFFD, i.e. while its bytes may end inside a character that a later token
/// completes. Once the text ends in any other character, the bytes before it decode the same
/// whatever follows, so the boundary is final. A character is thus emitted with the token that
/// completes it (a real U+FFFD at the end waits for one more token, or for `finish`).
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    tokenizer: PhiTokenizer,
    skip_special_tokens: bool,
    /// Ids from the anchor start up to the newest token.
    window: Vec<u32>,
    /// `window[..committed]` has been emitted.
    committed: usize,
    /// `decode(window[..committed])`.
    committed_text: String,
}

impl StreamDecoder {
    /// A decoder for one sequence; `skip_special_tokens` has the meaning it has for
    /// [`PhiTokenizer::decode`].
    ///
    /// Fails if the tokenizer applies `clean_up_tokenization_spaces`, a whole-text rewrite that
    /// cannot be streamed exactly (no Phi-3 SentencePiece config sets it, and the tiktoken
    /// tokenizer of Phi-3-small ignores its config's `true`).
    pub fn new(
        tokenizer: &PhiTokenizer,
        skip_special_tokens: bool,
    ) -> Result<Self, TokenizerError> {
        if tokenizer.clean_up_tokenization_spaces() {
            return Err(TokenizerError::Decode(
                "streaming detokenization does not support clean_up_tokenization_spaces=true"
                    .into(),
            ));
        }
        Ok(StreamDecoder {
            tokenizer: tokenizer.clone(),
            skip_special_tokens,
            window: Vec::new(),
            committed: 0,
            committed_text: String::new(),
        })
    }

    /// A decoder for the continuation of `prompt` (a text completion): its text is what the
    /// generated tokens add to the prompt's, `decode(prompt + generated)` less `decode(prompt)`,
    /// so the first generated token keeps its leading space (`"Once upon a"` + `" time"`), where
    /// [`new`](Self::new) decodes the generated tokens alone, as transformers decodes a chat
    /// answer.
    ///
    /// The anchor is the prompt's last visible token that is not a byte-fallback token (for a
    /// byte-level tokenizer: whose bytes are whole characters, decoding without U+FFFD); a
    /// prompt that ends inside a character leaves that character out, so the text only ever
    /// holds generated tokens' text.
    pub fn after_prompt(
        tokenizer: &PhiTokenizer,
        skip_special_tokens: bool,
        prompt: &[u32],
    ) -> Result<Self, TokenizerError> {
        let mut decoder = Self::new(tokenizer, skip_special_tokens)?;
        let mut anchor = None;
        for &id in prompt.iter().rev() {
            let visible = tokenizer.contains_id(id)
                && !(skip_special_tokens && tokenizer.is_special_token(id))
                && !tokenizer.is_byte_fallback_token(id);
            if visible
                && (!tokenizer.is_byte_level()
                    || !tokenizer.decode_raw(&[id], skip_special_tokens)?.contains('\u{FFFD}'))
            {
                anchor = Some(id);
                break;
            }
        }
        if let Some(id) = anchor {
            decoder.window = vec![id];
            decoder.committed = 1;
            decoder.committed_text = tokenizer.decode_raw(&decoder.window, skip_special_tokens)?;
        }
        Ok(decoder)
    }

    /// Whether special tokens are dropped from the text.
    pub fn skip_special_tokens(&self) -> bool {
        self.skip_special_tokens
    }

    /// Adds one generated token; returns the text that became final, if any.
    ///
    /// `None` means nothing new yet (a held-back byte run, a skipped special token, or a token
    /// that decodes to nothing). Ids unknown to the tokenizer are ignored, as `decode` ignores them.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.window.push(id);
        let invisible = !self.tokenizer.contains_id(id)
            || (self.skip_special_tokens && self.tokenizer.is_special_token(id));
        if invisible {
            // Does not end a byte run: decode() filters it out before the byte decoder runs.
            return Ok(None);
        }
        if self.tokenizer.is_byte_fallback_token(id) {
            // A later byte token may still extend (or invalidate) this run.
            return Ok(None);
        }
        let chunk = self.commit_all(false)?;
        Ok(if chunk.is_empty() { None } else { Some(chunk) })
    }

    /// Flushes whatever is held back (an unfinished byte run decodes to U+FFFD here, exactly as in
    /// the full decode) and resets the decoder for reuse.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let chunk =
            if self.committed < self.window.len() { self.commit_all(true)? } else { String::new() };
        self.window.clear();
        self.committed = 0;
        self.committed_text.clear();
        Ok(chunk)
    }

    /// Commits the whole window: emits `decode(window) - decode(window[..committed])` and, if that
    /// produced text, makes the newly committed piece the next anchor. Unless `flush`, a
    /// byte-level window whose text ends in U+FFFD (a character not complete yet) is not
    /// committed and gives `""`.
    fn commit_all(&mut self, flush: bool) -> Result<String, TokenizerError> {
        let full = self.tokenizer.decode_raw(&self.window, self.skip_special_tokens)?;
        if !flush && self.tokenizer.is_byte_level() && full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let chunk = match full.strip_prefix(self.committed_text.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                return Err(TokenizerError::Decode(format!(
                    "stream decode invariant broken: {:?} does not start with {:?}",
                    full, self.committed_text
                )))
            }
        };
        if chunk.is_empty() {
            // Keep the anchor: the new piece produced no text, so it cannot anchor the strip.
            self.committed = self.window.len();
            self.committed_text = full;
        } else {
            self.window.drain(..self.committed);
            self.committed = self.window.len();
            self.committed_text =
                self.tokenizer.decode_raw(&self.window, self.skip_special_tokens)?;
        }
        Ok(chunk)
    }
}

impl PhiTokenizer {
    /// A [`StreamDecoder`] over this tokenizer.
    pub fn stream_decoder(
        &self,
        skip_special_tokens: bool,
    ) -> Result<StreamDecoder, TokenizerError> {
        StreamDecoder::new(self, skip_special_tokens)
    }
}
