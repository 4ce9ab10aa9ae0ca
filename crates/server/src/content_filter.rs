//! Content filtering (CONTRACT.md C7): a [`ContentFilter`] judges text per category (`hate`,
//! `self_harm`, `sexual`, `violence`). The prompt (every message's text) is checked before
//! anything is queued, and a blocked prompt is a 400 `content_filter`; each choice's output is
//! checked as it grows (the accumulated text after every step, before that step's text is sent),
//! and a blocked choice ends with `finish_reason: "content_filter"`, its sequence stopped in the
//! worker.
//!
//! Implementations: [`NoFilter`] (never blocks, annotates everything as safe),
//! [`BlocklistFilter`] (terms and regular expressions per category, from a JSON file) and
//! [`crate::http_filter::HttpFilter`] (an operator's own moderation service over HTTP).
//!
//! A filter that cannot answer fails closed: a prompt it could not judge is a 503 (the SDKs
//! retry it), an answer it could not judge ends with `content_filter`.

use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use phi_api::{CategoryResult, ContentFilterResults, Severity};
use regex::Regex;
use serde::Deserialize;

use crate::worker::ChoiceStopper;

/// A filter's judgement of one text: per category, whether it is blocked and how severe it is.
pub type FilterVerdict = ContentFilterResults;

/// Which text a filter is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// Every message of the request, joined by newlines.
    Prompt,
    /// One choice's answer so far.
    Completion,
}

impl TextKind {
    /// `prompt` or `completion`, as sent to an HTTP classifier.
    pub fn as_str(self) -> &'static str {
        match self {
            TextKind::Prompt => "prompt",
            TextKind::Completion => "completion",
        }
    }
}

/// Why a filter could not judge a text (its service was unreachable, slow or answered nonsense).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError(pub String);

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FilterError {}

/// The future of one [`ContentFilter::check`].
pub type CheckFuture<'a> =
    Pin<Box<dyn Future<Output = Result<FilterVerdict, FilterError>> + Send + 'a>>;

/// Judges text. Runs on a choice's whole text after every step that produced text, before that
/// text is sent, so it should answer quickly; it is asynchronous so that a filter may ask
/// another service without holding a thread.
pub trait ContentFilter: Send + Sync + Debug {
    /// The verdict on `text`.
    fn check<'a>(&'a self, text: &'a str, kind: TextKind) -> CheckFuture<'a>;

    /// How many bytes at the end of a growing answer to keep unsent until more text (or the
    /// end) comes, because they may be the beginning of something this filter blocks. The
    /// default holds back the last word while it may still grow, at most
    /// [`MAX_HOLDBACK_BYTES`], so that text without spaces still streams.
    fn holdback(&self, text: &str) -> usize {
        trailing_word_len(text, MAX_HOLDBACK_BYTES)
    }
}

/// The most a filter holds back by default (a few words' worth of letters; 10 CJK characters).
pub const MAX_HOLDBACK_BYTES: usize = 32;

/// The byte length of the word characters (letters, digits, `_`) that end `text`, counting
/// whole characters up to `max` bytes.
pub fn trailing_word_len(text: &str, max: usize) -> usize {
    let mut len = 0;
    for c in text.chars().rev() {
        if !(c.is_alphanumeric() || c == '_') || len + c.len_utf8() > max {
            break;
        }
        len += c.len_utf8();
    }
    len
}

/// Blocks nothing; every category is `safe`. With it the server still annotates answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFilter;

impl ContentFilter for NoFilter {
    fn check<'a>(&'a self, _text: &'a str, _kind: TextKind) -> CheckFuture<'a> {
        Box::pin(std::future::ready(Ok(FilterVerdict::default())))
    }
}

/// A category of [`ContentFilterResults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// `hate`.
    Hate,
    /// `self_harm`.
    SelfHarm,
    /// `sexual`.
    Sexual,
    /// `violence`.
    Violence,
}

impl Category {
    /// The four categories, in the order of the wire shape.
    pub const ALL: [Category; 4] =
        [Category::Hate, Category::SelfHarm, Category::Sexual, Category::Violence];
}

/// The result of category `c` in `v`.
pub fn slot(v: &mut FilterVerdict, c: Category) -> &mut CategoryResult {
    match c {
        Category::Hate => &mut v.hate,
        Category::SelfHarm => &mut v.self_harm,
        Category::Sexual => &mut v.sexual,
        Category::Violence => &mut v.violence,
    }
}

/// The blocklist file (JSON):
///
/// ```json
/// {"threshold": "medium",
///  "categories": {"violence": {"terms": ["kill", {"term": "hurt", "severity": "low"}],
///                              "patterns": [{"regex": "(?i)blow\\s+up", "severity": "high"}]}}}
/// ```
///
/// Terms match case-insensitively as whole words; a term given as a bare string is `high`.
/// Patterns are regular expressions (Rust `regex` syntax, as written: add `(?i)` for case
/// insensitivity), `high` unless told. A category's severity is the highest of its matches; it
/// is blocked at `threshold` (default `medium`) or above.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlocklistFile {
    #[serde(default = "default_threshold")]
    threshold: Severity,
    #[serde(default)]
    categories: std::collections::BTreeMap<String, CategoryFile>,
}

fn default_threshold() -> Severity {
    Severity::Medium
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryFile {
    #[serde(default)]
    terms: Vec<TermFile>,
    #[serde(default)]
    patterns: Vec<PatternFile>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TermFile {
    Bare(String),
    Full {
        term: String,
        #[serde(default = "high")]
        severity: Severity,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatternFile {
    regex: String,
    #[serde(default = "high")]
    severity: Severity,
}

fn high() -> Severity {
    Severity::High
}

/// One compiled entry of a blocklist.
#[derive(Debug)]
struct Rule {
    category: Category,
    regex: Regex,
    severity: Severity,
}

/// Terms and regular expressions per category, each with a severity, and the severity at which
/// text is blocked.
#[derive(Debug)]
pub struct BlocklistFilter {
    rules: Vec<Rule>,
    threshold: Severity,
}

/// Why a blocklist could not be built.
#[derive(Debug)]
pub struct BlocklistError(pub String);

impl std::fmt::Display for BlocklistError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BlocklistError {}

impl BlocklistFilter {
    /// An empty blocklist that blocks at `threshold` (`low`, `medium` or `high`).
    pub fn new(threshold: Severity) -> Result<Self, BlocklistError> {
        if threshold == Severity::Safe {
            return Err(BlocklistError(
                "the blocking threshold must be low, medium or high, not safe".into(),
            ));
        }
        Ok(BlocklistFilter { rules: Vec::new(), threshold })
    }

    /// Adds a term, matched case-insensitively as a whole word (not inside a longer word).
    pub fn add_term(
        &mut self,
        category: Category,
        term: &str,
        severity: Severity,
    ) -> Result<(), BlocklistError> {
        let term = term.trim();
        if term.is_empty() {
            return Err(BlocklistError("a blocklist term is empty".into()));
        }
        // `\b` only where the term's own edge is a word character, so terms such as `c++` work.
        let is_word = |c: char| c.is_alphanumeric() || c == '_';
        let start = if term.starts_with(is_word) { r"\b" } else { "" };
        let end = if term.ends_with(is_word) { r"\b" } else { "" };
        let pattern = format!("(?i){start}{}{end}", regex::escape(term));
        self.add_regex(category, &pattern, severity)
    }

    /// Adds a regular expression.
    pub fn add_regex(
        &mut self,
        category: Category,
        pattern: &str,
        severity: Severity,
    ) -> Result<(), BlocklistError> {
        let regex = Regex::new(pattern)
            .map_err(|e| BlocklistError(format!("invalid blocklist pattern {pattern:?}: {e}")))?;
        self.rules.push(Rule { category, regex, severity });
        Ok(())
    }

    /// Parses the JSON blocklist format (see the module's file format above).
    pub fn from_json(text: &str) -> Result<Self, BlocklistError> {
        let file: BlocklistFile = serde_json::from_str(text)
            .map_err(|e| BlocklistError(format!("invalid blocklist: {e}")))?;
        let mut filter = BlocklistFilter::new(file.threshold)?;
        for (name, entries) in file.categories {
            let category: Category =
                serde_json::from_value(serde_json::Value::String(name.clone())).map_err(|_| {
                    BlocklistError(format!(
                        "unknown blocklist category {name:?} (expected hate, self_harm, sexual \
                         or violence)"
                    ))
                })?;
            for term in entries.terms {
                match term {
                    TermFile::Bare(t) => filter.add_term(category, &t, Severity::High)?,
                    TermFile::Full { term, severity } => {
                        filter.add_term(category, &term, severity)?
                    }
                }
            }
            for p in entries.patterns {
                filter.add_regex(category, &p.regex, p.severity)?;
            }
        }
        Ok(filter)
    }

    /// Reads a JSON blocklist file.
    pub fn from_file(path: &Path) -> Result<Self, BlocklistError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            BlocklistError(format!("cannot read the blocklist {}: {e}", path.display()))
        })?;
        Self::from_json(&text).map_err(|e| BlocklistError(format!("{}: {}", path.display(), e.0)))
    }
}

impl BlocklistFilter {
    /// The verdict on `text`, at once.
    pub fn judge(&self, text: &str) -> FilterVerdict {
        let mut verdict = FilterVerdict::default();
        for rule in &self.rules {
            let result = slot(&mut verdict, rule.category);
            if rule.severity > result.severity && rule.regex.is_match(text) {
                result.severity = rule.severity;
            }
        }
        for c in Category::ALL {
            let result = slot(&mut verdict, c);
            result.filtered = result.severity >= self.threshold;
        }
        verdict
    }
}

impl ContentFilter for BlocklistFilter {
    fn check<'a>(&'a self, text: &'a str, _kind: TextKind) -> CheckFuture<'a> {
        Box::pin(std::future::ready(Ok(self.judge(text))))
    }
}

/// What a request needs to filter its answer: the filter, the prompt's verdict (for the
/// `prompt_filter_results` annotation) and the means to stop a blocked choice in the worker.
#[derive(Debug, Clone)]
pub struct FilterContext {
    /// The configured filter.
    pub filter: Arc<dyn ContentFilter>,
    /// The prompt's verdict.
    pub prompt: FilterVerdict,
    /// Stops a choice's sequence.
    pub stopper: ChoiceStopper,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> BlocklistFilter {
        BlocklistFilter::from_json(
            r#"{"threshold": "medium", "categories": {
                "violence": {"terms": ["kill", {"term": "hurt", "severity": "low"}],
                             "patterns": [{"regex": "(?i)blow\\s+up", "severity": "medium"}]},
                "hate": {"terms": [{"term": "c++", "severity": "high"}]}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn whole_words_case_insensitive() {
        let f = filter();
        assert!(f.judge("they KILL it").violence.filtered);
        assert!(f.judge("Kill.").violence.filtered);
        assert!(f.judge("kill").violence.filtered);
        assert!(!f.judge("skills and killer").violence.filtered);
        assert_eq!(f.judge("skills").violence.severity, Severity::Safe);
        assert!(f.judge("I like C++ a lot").hate.filtered);
        assert!(!f.judge("all fine").filtered());
    }

    #[test]
    fn regex_and_severity() {
        let f = filter();
        let v = f.judge("do not BLOW   up");
        assert!(v.violence.filtered);
        assert_eq!(v.violence.severity, Severity::Medium);
        assert!(!v.hate.filtered && v.hate.severity == Severity::Safe);
        // The highest severity wins.
        assert_eq!(f.judge("hurt, blow up, kill").violence.severity, Severity::High);
    }

    #[test]
    fn threshold() {
        let f = filter();
        let v = f.judge("it does not hurt");
        assert_eq!(v.violence.severity, Severity::Low);
        assert!(!v.violence.filtered, "low is below the medium threshold");
        let low = BlocklistFilter::from_json(
            r#"{"threshold": "low", "categories": {"violence": {"terms": [{"term": "hurt", "severity": "low"}]}}}"#,
        )
        .unwrap();
        assert!(low.judge("it does not hurt").violence.filtered);
        let high = BlocklistFilter::from_json(
            r#"{"threshold": "high", "categories": {"violence": {"patterns": [{"regex": "x", "severity": "medium"}]}}}"#,
        )
        .unwrap();
        assert!(!high.judge("x").filtered());
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(BlocklistFilter::from_json(r#"{"threshold": "safe"}"#).is_err());
        assert!(
            BlocklistFilter::from_json(r#"{"categories": {"spam": {"terms": ["x"]}}}"#).is_err()
        );
        assert!(BlocklistFilter::from_json(
            r#"{"categories": {"hate": {"patterns": [{"regex": "("}]}}}"#
        )
        .is_err());
        assert!(
            BlocklistFilter::from_json(r#"{"categories": {"hate": {"terms": [" "]}}}"#).is_err()
        );
    }

    #[test]
    fn holdback_is_the_unfinished_last_word() {
        assert_eq!(trailing_word_len("the sto", 32), 3);
        assert_eq!(trailing_word_len("the storm ", 32), 0);
        assert_eq!(trailing_word_len("storm", 32), 5);
        assert_eq!(trailing_word_len("said: élan", 32), "élan".len());
        assert_eq!(trailing_word_len("end.", 32), 0);
        // Capped, on a character boundary: 10 three-byte characters of 11.
        assert_eq!(trailing_word_len(&"字".repeat(11), 32), 30);
        assert_eq!(NoFilter.holdback("a b"), 1);
    }

    #[test]
    fn no_filter_is_safe() {
        let verdict =
            futures_util::FutureExt::now_or_never(NoFilter.check("kill", TextKind::Prompt));
        assert_eq!(verdict, Some(Ok(FilterVerdict::default())));
    }
}
