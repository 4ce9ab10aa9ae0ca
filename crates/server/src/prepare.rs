//! From a validated request to engine sequences: render and tokenize the conversation, check it
//! fits the context, and create one sequence per choice. Runs before the request is queued, so
//! every problem with the request is a 4xx answer rather than a failure mid-stream.

use phi_api::{ApiError, ChatRequest};
use phi_engine::chat_template::ChatTemplateError;
use phi_engine::engine::{Engine, GenerateOptions, Sequence};
use phi_engine::error::EngineError;

/// A request ready for the worker.
#[derive(Debug)]
pub struct Prepared {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// One sequence per choice.
    pub sequences: Vec<Sequence>,
}

/// Tokenizes the conversation and creates the sequences. CPU-bound: call it off the async
/// runtime.
pub fn prepare(engine: &Engine, req: &ChatRequest) -> Result<Prepared, ApiError> {
    let prompt = engine.encode_chat(&req.messages).map_err(engine_error)?;
    let context = engine.context_length();
    if prompt.ids.len() >= context {
        return Err(ApiError::context_length_exceeded(prompt.ids.len(), context));
    }
    let sequences = (0..req.n)
        .map(|i| {
            let mut sampling = req.sampling.clone();
            // Distinct but reproducible streams for the choices of a seeded request.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as i64));
            let opts = GenerateOptions {
                sampling,
                max_tokens: req.max_tokens,
                stop: req.stop.clone(),
                ignore_eos: false,
                decode_after_prompt: false,
            };
            engine.new_sequence(&prompt.ids, &opts).map_err(engine_error)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared { prompt_tokens: prompt.ids.len(), sequences })
}

/// Maps an engine error to an API error: problems with the request are 400s that name the
/// parameter, anything else is a 500.
pub fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Sampling(s) => match s.param() {
            Some(param) => ApiError::invalid_value(param, s.to_string()),
            None => ApiError::internal(s.to_string()),
        },
        EngineError::Stop(s) => ApiError::invalid_value(s.param(), s.to_string()),
        EngineError::Template(
            t @ (ChatTemplateError::UnknownRole { .. } | ChatTemplateError::TemplateException(_)),
        ) => ApiError::invalid_value("messages", t.to_string()),
        EngineError::InvalidRequest(m) => ApiError::invalid_value("messages", m),
        other => ApiError::internal(other.to_string()),
    }
}
