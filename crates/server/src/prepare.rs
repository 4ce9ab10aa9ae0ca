//! From a validated request to engine sequences: render and tokenize the conversation (or the
//! raw prompts of a text completion), check each fits the context, and create one sequence per
//! choice. Runs before the request is queued, so every problem with the request is a 4xx answer
//! rather than a failure mid-stream.

use phi_api::{ApiError, ChatRequest, CompletionRequest, Prompt};
use phi_engine::chat_template::ChatTemplateError;
use phi_engine::engine::{Engine, GenerateOptions, Sequence};
use phi_engine::error::EngineError;
use phi_engine::sampling::SamplingParams;

/// A request ready for the worker.
#[derive(Debug)]
pub struct Prepared {
    /// Prompt length in tokens (all prompts together).
    pub prompt_tokens: usize,
    /// `n` sequences per prompt, prompt by prompt.
    pub sequences: Vec<Sequence>,
    /// `n`.
    pub choices_per_prompt: usize,
    /// With `echo`, each choice's prompt text (what its answer starts with); else empty.
    pub echoes: Vec<String>,
}

impl Prepared {
    /// Prompt tokens the prefix cache served, counted once per prompt (its first choice's).
    pub fn cached_prompt_tokens(&self) -> usize {
        self.sequences
            .iter()
            .step_by(self.choices_per_prompt.max(1))
            .map(Sequence::cached_prompt_tokens)
            .sum()
    }
}

/// What the sequences of one prompt share.
struct ChoiceOptions<'a> {
    sampling: &'a SamplingParams,
    max_tokens: Option<usize>,
    stop: &'a [String],
    n: usize,
    /// A text completion: the text continues the prompt's.
    after_prompt: bool,
    /// Score the prompt's tokens (a text completion's `echo` with `logprobs`).
    prompt_logprobs: bool,
}

/// Tokenizes the conversation and creates the sequences. CPU-bound: call it off the async
/// runtime.
pub fn prepare(engine: &Engine, req: &ChatRequest) -> Result<Prepared, ApiError> {
    let prompt = engine.encode_chat(&req.messages).map_err(engine_error)?;
    let opts = ChoiceOptions {
        sampling: &req.sampling,
        max_tokens: req.max_tokens,
        stop: &req.stop,
        n: req.n,
        after_prompt: false,
        prompt_logprobs: false,
    };
    let sequences = choices(engine, &prompt.ids, &opts, "messages")?;
    Ok(Prepared {
        prompt_tokens: prompt.ids.len(),
        sequences,
        choices_per_prompt: req.n,
        echoes: Vec::new(),
    })
}

/// Tokenizes the prompts of a text completion (text with the tokenizer's special tokens, token
/// ids as they are) and creates `n` sequences for each. CPU-bound: call it off the async
/// runtime.
pub fn prepare_text(engine: &Engine, req: &CompletionRequest) -> Result<Prepared, ApiError> {
    let opts = ChoiceOptions {
        sampling: &req.sampling,
        max_tokens: Some(req.max_tokens),
        stop: &req.stop,
        n: req.n,
        after_prompt: true,
        prompt_logprobs: req.echo && req.sampling.logprobs,
    };
    let mut prepared = Prepared {
        prompt_tokens: 0,
        sequences: Vec::with_capacity(req.choices()),
        choices_per_prompt: req.n,
        echoes: Vec::new(),
    };
    for prompt in &req.prompts {
        let ids = match prompt {
            Prompt::Text(text) => engine
                .tokenizer()
                .encode_with_special_tokens(text)
                .map_err(|e| engine_error(e.into()))?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(ApiError::invalid_value("prompt", "the prompt has no tokens"));
        }
        prepared.sequences.extend(choices(engine, &ids, &opts, "prompt")?);
        prepared.prompt_tokens += ids.len();
        if req.echo {
            let text = match prompt {
                Prompt::Text(text) => text.clone(),
                Prompt::Tokens(ids) => {
                    engine.tokenizer().decode(ids, false).map_err(|e| engine_error(e.into()))?
                }
            };
            prepared.echoes.extend(std::iter::repeat_n(text, req.n));
        }
    }
    Ok(prepared)
}

/// The `n` sequences of one prompt; errors about the prompt itself name `prompt_param`.
fn choices(
    engine: &Engine,
    ids: &[u32],
    opts: &ChoiceOptions,
    prompt_param: &str,
) -> Result<Vec<Sequence>, ApiError> {
    let context = engine.context_length();
    if ids.len() >= context {
        return Err(ApiError::context_length_exceeded_in(prompt_param, ids.len(), context));
    }
    (0..opts.n)
        .map(|i| {
            let mut sampling = opts.sampling.clone();
            // Distinct but reproducible streams for the choices of a seeded request.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as i64));
            let generate = GenerateOptions {
                sampling,
                max_tokens: opts.max_tokens,
                stop: opts.stop.to_vec(),
                ignore_eos: false,
                decode_after_prompt: opts.after_prompt,
                prompt_logprobs: opts.prompt_logprobs,
            };
            engine.new_sequence(ids, &generate).map_err(|e| match e {
                EngineError::InvalidRequest(m) => ApiError::invalid_value(prompt_param, m),
                other => engine_error(other),
            })
        })
        .collect()
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
