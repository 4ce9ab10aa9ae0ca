//! Stop strings matched on the decoded text, across token boundaries.
//!
//! The OpenAI `stop` parameter is a list of strings, not tokens: a stop string may be
//! split over several tokens (`"</s"` + `"top>"`), or end in the middle of one. The
//! server streams text deltas as tokens are decoded, so it must never emit text that
//! might turn out to be the beginning of a stop string. [`StopStrings`] sits between
//! the detokeniser and the client: it releases text as soon as it provably cannot be
//! part of a stop string, holds back the (short) suffix that still could, and reports
//! a match with the text cut just before it.
//!
//! Semantics: generation stops as soon as any stop string has been completed (like
//! vLLM); when one [`StopStrings::push`] completes several, the one that starts earliest
//! in the text wins (ties: the one listed first). A longer stop string that might still
//! complete at an earlier position does not delay the stop.

/// Maximum number of stop strings, as in the OpenAI API; bounding it keeps the
/// per-delta matching cost small.
pub const MAX_STOP_STRINGS: usize = 4;

/// Errors from building a [`StopStrings`] matcher from request parameters.
///
/// Exists so that the server can reject a bad `stop` parameter with a 400 that names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// An empty stop string would match everywhere and stop before any output.
    #[error("invalid value for `stop`: stop string {index} is empty")]
    Empty {
        /// Position of the empty string in the list.
        index: usize,
    },
    /// More stop strings than [`MAX_STOP_STRINGS`].
    #[error("invalid value for `stop`: at most {MAX_STOP_STRINGS} stop strings are allowed, got {count}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
}

impl StopError {
    /// The request parameter at fault (always `"stop"`), for OpenAI-style error bodies.
    pub fn param(&self) -> &'static str {
        "stop"
    }
}

/// What the caller may do after feeding one text delta to [`StopStrings::push`].
///
/// Exists so a single call tells both what to stream to the client and whether to end
/// generation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is now safe to emit. When a stop string matched, this is everything up
    /// to (excluding) the match; the stop string and whatever followed it are dropped.
    pub text: String,
    /// `Some(i)` when stop string `i` (index in the list given to
    /// [`StopStrings::new`]) matched during this push: generation must end with
    /// `finish_reason: "stop"`.
    pub matched: Option<usize>,
}

impl StopOutcome {
    /// Whether a stop string matched during this push.
    pub fn is_stop(&self) -> bool {
        self.matched.is_some()
    }
}

/// Incremental matcher for up to [`MAX_STOP_STRINGS`] stop strings over a stream of
/// text deltas.
///
/// Exists to make stop strings work with streaming: it buffers only the suffix of the
/// text that is a prefix of some stop string (shorter than the longest stop string),
/// and works on `&str`, so it never splits a UTF-8 character.
#[derive(Debug, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Longest stop string, in bytes.
    max_len: usize,
    /// Text received but not yet released.
    held: String,
    /// Set once a stop string matched or [`StopStrings::finish`] was called.
    done: bool,
}

impl StopStrings {
    /// Builds a matcher. Rejects empty stop strings and more than
    /// [`MAX_STOP_STRINGS`] of them; an empty list is allowed and passes all text
    /// through unchanged.
    pub fn new<I, S>(stops: I) -> Result<Self, StopError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops: Vec<String> = stops.into_iter().map(Into::into).collect();
        if stops.len() > MAX_STOP_STRINGS {
            return Err(StopError::TooMany { count: stops.len() });
        }
        if let Some(index) = stops.iter().position(String::is_empty) {
            return Err(StopError::Empty { index });
        }
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Ok(StopStrings { stops, max_len, held: String::new(), done: false })
    }

    /// The stop strings, in the order given; [`StopOutcome::matched`] indexes this.
    pub fn stop_strings(&self) -> &[String] {
        &self.stops
    }

    /// Whether a stop string has matched (or [`finish`](Self::finish) was called); all
    /// later pushes return empty text.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Feeds the next decoded text delta. Returns the text that can be emitted now and
    /// whether a stop string matched. After a match, further deltas are ignored.
    pub fn push(&mut self, text_delta: &str) -> StopOutcome {
        if self.done {
            return StopOutcome::default();
        }
        self.held.push_str(text_delta);

        // A complete match? Only `held` can contain one: released text never contains
        // the start of a stop string (see below), so the earliest match in `held` is
        // the earliest in the whole text.
        let mut best: Option<(usize, usize)> = None; // (byte position, stop index)
        for (i, stop) in self.stops.iter().enumerate() {
            if let Some(pos) = self.held.find(stop.as_str()) {
                if best.is_none_or(|(p, _)| pos < p) {
                    best = Some((pos, i));
                }
            }
        }
        if let Some((pos, index)) = best {
            self.held.truncate(pos);
            self.done = true;
            return StopOutcome { text: std::mem::take(&mut self.held), matched: Some(index) };
        }

        // No match: hold back the longest suffix that is a proper prefix of some stop
        // string; everything before it can never be the start of a match.
        let keep_from = self.partial_match_start();
        let rest = self.held.split_off(keep_from);
        StopOutcome { text: std::mem::replace(&mut self.held, rest), matched: None }
    }

    /// Releases the held-back text when generation ends for another reason (length,
    /// end-of-sequence token), since it can no longer become a stop string. Returns an
    /// empty string after a match.
    pub fn finish(&mut self) -> String {
        self.done = true;
        std::mem::take(&mut self.held)
    }

    /// Byte index of the earliest char boundary `i` such that `held[i..]` is a prefix of
    /// some stop string; `held.len()` if there is none.
    fn partial_match_start(&self) -> usize {
        let len = self.held.len();
        // A held suffix is shorter than the longest stop string (otherwise it would
        // have been a complete match).
        let lowest = len.saturating_sub(self.max_len.saturating_sub(1));
        (lowest..len)
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .unwrap_or(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_suffix_is_bounded_by_longest_stop() {
        let mut s = StopStrings::new(["abc"]).unwrap();
        let out = s.push("xxxxab");
        assert_eq!(out.text, "xxxx");
        assert_eq!(s.held, "ab");
        // Relative to the held buffer, the whole of it is a partial match.
        assert_eq!(s.partial_match_start(), 0);
        s.held.push_str("xa");
        assert_eq!(s.partial_match_start(), 3);
    }

    #[test]
    fn no_stop_strings_pass_through() {
        let mut s = StopStrings::new(Vec::<String>::new()).unwrap();
        assert_eq!(s.push("héllo").text, "héllo");
        assert_eq!(s.finish(), "");
    }
}
