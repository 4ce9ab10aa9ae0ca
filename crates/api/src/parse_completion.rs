//! Parsing and validating a legacy text-completions body into a [`CompletionRequest`], with
//! the same per-parameter errors as the chat parser ([`crate::parse`]).

use serde_json::Value;

use crate::completion_request::{CompletionRequest, Prompt, DEFAULT_COMPLETION_TOKENS};
use crate::error::ApiError;
use crate::extra_parameters::ExtraParameters;
use crate::parse::{
    parse_include_usage, parse_model, parse_n, parse_sampling, parse_stop, read_body,
};
use crate::request::MAX_CHOICES;

/// Every body key of OpenAI's legacy completions API. Keys outside this list are "extra
/// parameters" (see [`ExtraParameters`]).
pub const KNOWN_COMPLETION_PARAMETERS: &[&str] = &[
    "model",
    "prompt",
    "suffix",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "logit_bias",
    "seed",
    "user",
];

/// Most alternatives `logprobs` may ask for per position (as `top_logprobs` in chat).
pub const MAX_LOGPROBS: usize = 20;

/// Parses and validates a text-completions body.
pub fn parse_completion_request(
    body: &[u8],
    extra: ExtraParameters,
) -> Result<CompletionRequest, ApiError> {
    let (f, unknown) = read_body(body, KNOWN_COMPLETION_PARAMETERS, extra)?;
    let prompts = parse_prompts(f.get("prompt"))?;

    // OpenAI's legacy `logprobs` is the number of alternatives, and asks for logprobs at all.
    let top_logprobs = f.count("logprobs")?;
    if let Some(k) = top_logprobs.filter(|&k| k > MAX_LOGPROBS) {
        return Err(ApiError::invalid_value(
            "logprobs",
            format!("`logprobs` must be between 0 and {MAX_LOGPROBS}, got {k}"),
        ));
    }
    let sampling = parse_sampling(&f, top_logprobs.is_some(), top_logprobs)?;

    let echo = f.boolean("echo")?.unwrap_or(false);
    // With `echo`, 0 asks for the prompt alone (scored, with `logprobs`), as OpenAI allowed.
    let max_tokens = f.count("max_tokens")?.unwrap_or(DEFAULT_COMPLETION_TOKENS);
    if max_tokens == 0 && !echo {
        return Err(ApiError::invalid_value(
            "max_tokens",
            "`max_tokens` must be at least 1 (0 only with `echo`, to score the prompt), got 0",
        ));
    }
    let n = parse_n(&f)?;
    if prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::invalid_value(
            "n",
            format!(
                "{} prompts with n = {n} make {} choices; one request may ask for at most \
                 {MAX_CHOICES}",
                prompts.len(),
                prompts.len() * n
            ),
        ));
    }
    match f.count("best_of")? {
        None => {}
        Some(b) if b == n => {}
        Some(b) if b < n => {
            return Err(ApiError::invalid_value(
                "best_of",
                format!("`best_of` ({b}) must be at least `n` ({n})"),
            ))
        }
        Some(_) => {
            return Err(ApiError::not_supported(
                "best_of",
                "`best_of` greater than `n` is not supported: ask for `n` choices instead",
            ))
        }
    }
    match f.get("suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(_)) => {
            return Err(ApiError::not_supported(
                "suffix",
                "`suffix` is not supported: Phi-3 models do not fill in the middle",
            ))
        }
        Some(_) => return Err(ApiError::invalid_type("suffix", "a string")),
    }

    Ok(CompletionRequest {
        prompts,
        sampling,
        max_tokens,
        stop: parse_stop(&f)?,
        n,
        stream: f.boolean("stream")?.unwrap_or(false),
        include_usage: parse_include_usage(&f)?,
        echo,
        model: parse_model(&f)?,
        ignored_parameters: unknown,
    })
}

const PROMPT_TYPES: &str =
    "a string, an array of strings, an array of token ids or an array of arrays of token ids";

/// `prompt` in any of its four spellings; required, and no list of them may be empty.
fn parse_prompts(value: Option<&Value>) -> Result<Vec<Prompt>, ApiError> {
    let items = match value {
        None => return Err(ApiError::missing_parameter("prompt")),
        Some(Value::String(s)) => return Ok(vec![Prompt::Text(s.clone())]),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid_type("prompt", PROMPT_TYPES)),
    };
    if items.is_empty() {
        return Err(ApiError::invalid_value("prompt", "`prompt` must not be an empty list"));
    }
    if items.iter().all(Value::is_number) {
        return Ok(vec![Prompt::Tokens(token_ids(items)?)]);
    }
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(ids) if !ids.is_empty() => Ok(Prompt::Tokens(token_ids(ids)?)),
            Value::Array(_) => {
                Err(ApiError::invalid_value("prompt", "a prompt of token ids must not be empty"))
            }
            _ => Err(ApiError::invalid_type("prompt", PROMPT_TYPES)),
        })
        .collect()
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                ApiError::invalid_value(
                    "prompt",
                    format!("invalid value for `prompt`: {v} is not a token id"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<CompletionRequest, ApiError> {
        parse_completion_request(v.to_string().as_bytes(), ExtraParameters::Error)
    }

    #[test]
    fn defaults_of_the_legacy_api() {
        let r = parse(json!({"model": "m", "prompt": "Once upon"})).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Text("Once upon".into())]);
        assert_eq!(r.max_tokens, DEFAULT_COMPLETION_TOKENS);
        assert_eq!((r.n, r.stream, r.echo, r.include_usage), (1, false, false, false));
        assert!(!r.sampling.logprobs && r.sampling.top_logprobs.is_none());
        assert_eq!(r.sampling.temperature, 1.0);
        assert_eq!(r.choices(), 1);
    }

    #[test]
    fn the_four_prompt_spellings() {
        let cases = [
            (json!("a"), vec![Prompt::Text("a".into())]),
            (json!(["a", "b"]), vec![Prompt::Text("a".into()), Prompt::Text("b".into())]),
            (json!([1, 2, 3]), vec![Prompt::Tokens(vec![1, 2, 3])]),
            (json!([[1], [2, 3]]), vec![Prompt::Tokens(vec![1]), Prompt::Tokens(vec![2, 3])]),
            (json!(["a", [4]]), vec![Prompt::Text("a".into()), Prompt::Tokens(vec![4])]),
        ];
        for (prompt, want) in cases {
            let r = parse(json!({"prompt": prompt, "n": 2})).unwrap();
            assert_eq!(r.prompts, want, "{prompt}");
            assert_eq!(r.choices(), 2 * want.len());
        }
    }

    #[test]
    fn logprobs_is_the_number_of_alternatives() {
        let r = parse(json!({"prompt": "a", "logprobs": 3, "max_tokens": 5, "echo": false,
            "best_of": 1, "suffix": null, "stop": ["\n"], "seed": 7, "user": "u",
            "logit_bias": {"5": -100}, "stream": true, "stream_options": {"include_usage": true}}))
        .unwrap();
        assert!(r.sampling.logprobs);
        assert_eq!(r.sampling.top_logprobs, Some(3));
        assert_eq!(r.max_tokens, 5);
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert_eq!(r.sampling.seed, Some(7));
        assert!(r.stream && r.include_usage);
        let r = parse(json!({"prompt": "a", "logprobs": 0})).unwrap();
        assert_eq!((r.sampling.logprobs, r.sampling.top_logprobs), (true, Some(0)));
    }

    #[test]
    fn echo_scores_the_prompt_and_may_generate_nothing() {
        // What lm-evaluation-harness sends for loglikelihood tasks, and the prompt-only form.
        for max_tokens in [1, 0] {
            let r = parse(json!({"prompt": [[1, 2, 3]], "echo": true, "logprobs": 1,
                "max_tokens": max_tokens, "temperature": 0}))
            .unwrap();
            assert!(r.echo && r.sampling.logprobs);
            assert_eq!((r.max_tokens, r.sampling.top_logprobs), (max_tokens, Some(1)));
        }
    }

    #[test]
    fn errors_name_the_parameter() {
        let many: Vec<String> = (0..9).map(|i| i.to_string()).collect();
        let cases = [
            (json!({}), 400, "prompt"),
            (json!({"prompt": 5}), 400, "prompt"),
            (json!({"prompt": []}), 400, "prompt"),
            (json!({"prompt": [[]]}), 400, "prompt"),
            (json!({"prompt": [-1]}), 400, "prompt"),
            (json!({"prompt": [1.5]}), 400, "prompt"),
            (json!({"prompt": [4294967296u64]}), 400, "prompt"),
            (json!({"prompt": ["a", 1]}), 400, "prompt"),
            (json!({"prompt": [{"text": "a"}]}), 400, "prompt"),
            (json!({"prompt": "a", "max_tokens": 0}), 400, "max_tokens"),
            (json!({"prompt": "a", "logprobs": 21}), 400, "logprobs"),
            (json!({"prompt": "a", "logprobs": true}), 400, "logprobs"),
            (json!({"prompt": "a", "n": 17}), 400, "n"),
            (json!({"prompt": many, "n": 2}), 400, "n"),
            (json!({"prompt": "a", "n": 2, "best_of": 1}), 400, "best_of"),
            (json!({"prompt": "a", "best_of": 3}), 422, "best_of"),
            (json!({"prompt": "a", "suffix": "end"}), 422, "suffix"),
            (json!({"prompt": "a", "suffix": 1}), 400, "suffix"),
            (json!({"prompt": "a", "echo": "yes"}), 400, "echo"),
            (json!({"prompt": "a", "temperature": 5}), 400, "temperature"),
            (json!({"prompt": "a", "stop": [""]}), 400, "stop"),
            (json!({"prompt": "a", "logit_bias": {"x": 1}}), 400, "logit_bias"),
        ];
        for (body, status, param) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (status, Some(param)), "{body}: {e}");
        }
    }

    #[test]
    fn chat_only_keys_are_extra_parameters() {
        let body = json!({"prompt": "a", "messages": []}).to_string();
        let e = parse_completion_request(body.as_bytes(), ExtraParameters::Error).unwrap_err();
        assert_eq!(e.code, "extra_parameters_not_allowed");
        let r = parse_completion_request(body.as_bytes(), ExtraParameters::Drop).unwrap();
        assert_eq!(r.ignored_parameters, vec!["messages".to_string()]);
    }
}
