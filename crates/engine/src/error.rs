//! Errors of the engine. Every variant that concerns a file names it, so an operator who points
//! phi-serve at a broken checkpoint learns which file is wrong and why.

use std::path::PathBuf;

/// Anything that can go wrong while loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A required file is not in the model folder or repository.
    #[error("{}: missing {file} ({hint})", location)]
    MissingFile {
        /// The folder or repository that was searched.
        location: String,
        /// The file name.
        file: String,
        /// Why the file is needed.
        hint: String,
    },
    /// `config.json` (or another JSON settings file) is malformed or names something unsupported.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weight tensor is missing, of the wrong shape, or unreadable.
    #[error("{location}: {message}")]
    Weights {
        /// The checkpoint file(s) the tensor came from.
        location: String,
        /// What is wrong.
        message: String,
    },
    /// Tokenizer or chat template problem.
    #[error("{0}")]
    Tokenizer(String),
    /// The Hugging Face hub could not provide a file.
    #[error("{0}")]
    Hub(String),
    /// A request the model cannot serve (too long, bad parameter).
    #[error("{0}")]
    InvalidRequest(String),
    /// A sampling parameter is out of range, or the logits cannot be sampled.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    /// Bad stop strings.
    #[error(transparent)]
    Stop(#[from] crate::stop::StopError),
    /// The conversation cannot be rendered (unknown role, template exception).
    #[error(transparent)]
    Template(#[from] crate::chat_template::ChatTemplateError),
    /// The KV-cache pool has too few free blocks for a step; a scheduler frees some (by
    /// preempting a sequence) and tries again.
    #[error("the KV cache is full: {needed} more blocks needed, {available} available")]
    KvCacheFull {
        /// Blocks the sequence still needed.
        needed: usize,
        /// Blocks free (or held only by the prefix cache) when it failed.
        available: usize,
    },
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Engine result type.
pub type Result<T> = std::result::Result<T, EngineError>;

impl From<crate::tokenizer::TokenizerError> for EngineError {
    fn from(e: crate::tokenizer::TokenizerError) -> Self {
        EngineError::Tokenizer(e.to_string())
    }
}
