//! Parsing and validating a chat-completions body into a [`ChatRequest`].
//!
//! The body is read as a JSON object first and each parameter is then decoded on its own, so
//! every error names the parameter at fault (a derived `Deserialize` would only say "line 1
//! column 57"). `null` counts as absent everywhere, because the SDKs send explicit nulls.

use std::collections::BTreeMap;

use phi_engine::sampling::SamplingParams;
use phi_engine::stop::StopStrings;
use serde_json::Value;

use crate::error::ApiError;
use crate::extra_parameters::ExtraParameters;
use crate::fields::Fields;
use crate::messages::parse_messages;
use crate::request::{ChatRequest, MAX_CHOICES};

/// Every body key of the Azure AI Model Inference and OpenAI chat-completions APIs. Keys outside
/// this list are "extra parameters" (see [`ExtraParameters`]).
pub const KNOWN_PARAMETERS: &[&str] = &[
    // Azure AI Model Inference (2024-05-01-preview).
    "messages",
    "model",
    "frequency_penalty",
    "presence_penalty",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "stream",
    "seed",
    "response_format",
    "tools",
    "tool_choice",
    "modalities",
    // OpenAI chat completions.
    "max_completion_tokens",
    "n",
    "logprobs",
    "top_logprobs",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "logit_bias",
    "functions",
    "function_call",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
];

/// Parses and validates a chat-completions body.
pub fn parse_chat_request(body: &[u8], extra: ExtraParameters) -> Result<ChatRequest, ApiError> {
    let (f, unknown) = read_body(body, KNOWN_PARAMETERS, extra)?;

    let messages = parse_messages(f.get("messages"))?;
    reject_unsupported(&f)?;

    let logprobs = f.boolean("logprobs")?.unwrap_or(false);
    let sampling = parse_sampling(&f, logprobs, f.count("top_logprobs")?)?;

    let max_tokens = match f.count("max_completion_tokens")? {
        Some(m) => Some(("max_completion_tokens", m)),
        None => f.count("max_tokens")?.map(|m| ("max_tokens", m)),
    };
    if let Some((param, 0)) = max_tokens {
        return Err(ApiError::invalid_value(param, format!("`{param}` must be at least 1, got 0")));
    }

    Ok(ChatRequest {
        messages,
        sampling,
        max_tokens: max_tokens.map(|(_, m)| m),
        stop: parse_stop(&f)?,
        n: parse_n(&f)?,
        stream: f.boolean("stream")?.unwrap_or(false),
        include_usage: parse_include_usage(&f)?,
        model: parse_model(&f)?,
        ignored_parameters: unknown,
    })
}

/// The body as an object of its keys, with the keys outside `known` removed (and named in the
/// second value) or refused, as the `extra-parameters` policy says.
pub(crate) fn read_body(
    body: &[u8],
    known: &[&str],
    extra: ExtraParameters,
) -> Result<(Fields, Vec<String>), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(ApiError::invalid_json)?;
    let Value::Object(mut map) = value else {
        return Err(ApiError::invalid_json("the body must be a JSON object"));
    };
    let unknown: Vec<String> =
        map.keys().filter(|k| !known.contains(&k.as_str())).cloned().collect();
    if !unknown.is_empty() {
        if extra == ExtraParameters::Error {
            return Err(ApiError::extra_parameters(&unknown));
        }
        for key in &unknown {
            map.remove(key);
        }
    }
    Ok((Fields(map), unknown))
}

/// The sampling parameters both APIs share, validated against the engine's ranges; the two
/// spell log-probabilities differently, so the caller reads those.
pub(crate) fn parse_sampling(
    f: &Fields,
    logprobs: bool,
    top_logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let sampling = SamplingParams {
        temperature: f.number("temperature")?.unwrap_or(1.0),
        top_p: f.number("top_p")?.unwrap_or(1.0),
        presence_penalty: f.number("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: f.number("frequency_penalty")?.unwrap_or(0.0),
        seed: f.integer("seed")?,
        logprobs,
        top_logprobs,
        logit_bias: parse_logit_bias(f.get("logit_bias"))?,
    };
    sampling.validate().map_err(|e| match e.param() {
        Some(param) => ApiError::invalid_value(param, e.to_string()),
        None => ApiError::invalid_value("messages", e.to_string()),
    })?;
    Ok(sampling)
}

/// `n`, 1 to [`MAX_CHOICES`] (1 when absent).
pub(crate) fn parse_n(f: &Fields) -> Result<usize, ApiError> {
    let n = f.count("n")?.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::invalid_value(
            "n",
            format!("`n` must be between 1 and {MAX_CHOICES}, got {n}"),
        ));
    }
    Ok(n)
}

/// `stream_options.include_usage` (false when absent).
pub(crate) fn parse_include_usage(f: &Fields) -> Result<bool, ApiError> {
    match f.get("stream_options") {
        None => Ok(false),
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid_type("stream_options.include_usage", "a boolean")),
        },
        Some(_) => Err(ApiError::invalid_type("stream_options", "an object")),
    }
}

/// The `model` the client named.
pub(crate) fn parse_model(f: &Fields) -> Result<Option<String>, ApiError> {
    match f.get("model") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid_type("model", "a string")),
    }
}

/// Parameters the API defines that this text-only server without tool calling cannot honour:
/// 422 when they ask for something, accepted when they ask for nothing (empty lists, `"none"`).
fn reject_unsupported(f: &Fields) -> Result<(), ApiError> {
    match f.get("response_format") {
        None => {}
        Some(Value::String(t)) => check_format_type("response_format", t)?,
        Some(Value::Object(o)) => match o.get("type") {
            Some(Value::String(t)) => check_format_type("response_format", t)?,
            _ => return Err(ApiError::invalid_type("response_format.type", "a string")),
        },
        Some(_) => return Err(ApiError::invalid_type("response_format", "an object or a string")),
    }
    for list in ["tools", "functions"] {
        match f.get(list) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::Array(_)) => {
                return Err(ApiError::not_supported(
                    list,
                    format!("`{list}` is not supported: this server does not support tool calling"),
                ))
            }
            Some(_) => return Err(ApiError::invalid_type(list, "an array")),
        }
    }
    for choice in ["tool_choice", "function_call"] {
        match f.get(choice) {
            None => {}
            Some(Value::String(s)) if s == "none" || s == "auto" => {}
            Some(_) => {
                return Err(ApiError::not_supported(
                    choice,
                    format!(
                        "`{choice}` is not supported: this server does not support tool calling"
                    ),
                ))
            }
        }
    }
    match f.get("modalities") {
        None => {}
        Some(Value::Array(a)) if a.iter().all(|m| m == "text") => {}
        Some(Value::Array(_)) => {
            return Err(ApiError::not_supported(
                "modalities",
                "only the text modality is supported",
            ))
        }
        Some(_) => return Err(ApiError::invalid_type("modalities", "an array of strings")),
    }
    for param in ["audio", "prediction", "web_search_options"] {
        if f.get(param).is_some() {
            return Err(ApiError::not_supported(param, format!("`{param}` is not supported")));
        }
    }
    Ok(())
}

fn check_format_type(param: &str, t: &str) -> Result<(), ApiError> {
    match t {
        "text" => Ok(()),
        "json_object" | "json_schema" => Err(ApiError::not_supported(
            param,
            format!("response_format {t:?} is not supported: only \"text\" is"),
        )),
        other => Err(ApiError::invalid_value(
            param,
            format!("unknown response_format type {other:?} (expected text, json_object or json_schema)"),
        )),
    }
}

/// OpenAI's `logit_bias`: an object from token ids (decimal strings, as JSON keys are) to
/// numbers. The ranges are [`SamplingParams::validate`]'s; the ids are checked against the
/// model's vocabulary when the sequence is made.
fn parse_logit_bias(value: Option<&Value>) -> Result<BTreeMap<u32, f32>, ApiError> {
    let entries = match value {
        None => return Ok(BTreeMap::new()),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ApiError::invalid_type("logit_bias", "an object from token ids to numbers"))
        }
    };
    let mut bias = BTreeMap::new();
    for (key, v) in entries {
        let digits = !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit());
        let id = digits.then(|| key.parse::<u32>().ok()).flatten().ok_or_else(|| {
            ApiError::invalid_value(
                "logit_bias",
                format!("invalid value for `logit_bias`: key {key:?} is not a token id"),
            )
        })?;
        let Some(amount) = v.as_f64() else {
            return Err(ApiError::invalid_type(
                "logit_bias",
                "an object from token ids to numbers",
            ));
        };
        if bias.insert(id, amount as f32).is_some() {
            return Err(ApiError::invalid_value(
                "logit_bias",
                format!("invalid value for `logit_bias`: token id {id} is given twice"),
            ));
        }
    }
    Ok(bias)
}

/// `stop`: a string or a list of strings, checked as the engine will use them.
pub(crate) fn parse_stop(f: &Fields) -> Result<Vec<String>, ApiError> {
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ApiError::invalid_type("stop", "a string or an array of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid_type("stop", "a string or an array of strings")),
    };
    StopStrings::new(stop.iter().cloned())
        .map_err(|e| ApiError::invalid_value(e.param(), e.to_string()))?;
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        parse_chat_request(v.to_string().as_bytes(), ExtraParameters::Error)
    }

    fn user() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn azure_sample_body() {
        let r = parse(json!({"messages": [{"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"}], "frequency_penalty": 0.1, "max_tokens": 5,
            "presence_penalty": 0.1, "response_format": {"type": "text"}, "seed": 1,
            "stop": ["\n\n"], "temperature": 0, "top_p": 1}))
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.stop, vec!["\n\n".to_string()]);
        assert_eq!(r.sampling.seed, Some(1));
        assert_eq!(r.sampling.temperature, 0.0);
        assert!((r.sampling.frequency_penalty - 0.1).abs() < 1e-6);
        assert!(!r.stream);
        assert_eq!(r.n, 1);
    }

    #[test]
    fn openai_spellings() {
        let r = parse(json!({"model": "m", "messages": user(), "max_completion_tokens": 7,
            "max_tokens": 99, "stop": "x", "presence_penalty": "0.5", "frequency_penalty": "-1",
            "response_format": "text", "stream": true, "stream_options": {"include_usage": true},
            "n": 3, "logprobs": true, "top_logprobs": 2, "user": "u", "temperature": null}))
        .unwrap();
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.sampling.presence_penalty, 0.5);
        assert_eq!(r.sampling.frequency_penalty, -1.0);
        assert_eq!(r.sampling.temperature, 1.0);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.n, 3);
        assert_eq!(r.sampling.top_logprobs, Some(2));
        assert_eq!(r.model.as_deref(), Some("m"));
    }

    #[test]
    fn logit_bias_is_an_object_from_token_ids_to_numbers() {
        let r = parse(json!({"messages": user(), "logit_bias": {"50256": -100, "7": 2.5,
            "0": 100}}))
        .unwrap();
        let want: Vec<(u32, f32)> = vec![(0, 100.0), (7, 2.5), (50256, -100.0)];
        assert_eq!(r.sampling.logit_bias.into_iter().collect::<Vec<_>>(), want);
        for empty in [json!({}), Value::Null] {
            let r = parse(json!({"messages": user(), "logit_bias": empty})).unwrap();
            assert!(r.sampling.logit_bias.is_empty());
        }
        let many: Map<String, Value> = (0..=1024).map(|i| (i.to_string(), json!(1))).collect();
        let e = parse(json!({"messages": user(), "logit_bias": many})).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("logit_bias")));
    }

    #[test]
    fn extra_parameters_policy() {
        let body = json!({"messages": user(), "foo": 1, "bar": null}).to_string();
        let e = parse_chat_request(body.as_bytes(), ExtraParameters::Error).unwrap_err();
        assert_eq!(e.code, "extra_parameters_not_allowed");
        assert!(e.message.contains("'foo'") && e.message.contains("'bar'"));
        for policy in [ExtraParameters::Drop, ExtraParameters::PassThrough] {
            let r = parse_chat_request(body.as_bytes(), policy).unwrap();
            assert_eq!(r.ignored_parameters.len(), 2);
        }
    }

    #[test]
    fn errors_name_the_parameter() {
        let cases = [
            (json!({"messages": user(), "temperature": 3}), 400, "temperature"),
            (json!({"messages": user(), "temperature": "hot"}), 400, "temperature"),
            (json!({"messages": user(), "top_p": 0}), 400, "top_p"),
            (json!({"messages": user(), "presence_penalty": -2.5}), 400, "presence_penalty"),
            (json!({"messages": user(), "frequency_penalty": [1]}), 400, "frequency_penalty"),
            (json!({"messages": user(), "max_tokens": 0}), 400, "max_tokens"),
            (json!({"messages": user(), "max_tokens": -1}), 400, "max_tokens"),
            (
                json!({"messages": user(), "max_completion_tokens": 1.5}),
                400,
                "max_completion_tokens",
            ),
            (json!({"messages": user(), "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
            (json!({"messages": user(), "stop": [""]}), 400, "stop"),
            (json!({"messages": user(), "stop": 5}), 400, "stop"),
            (json!({"messages": user(), "seed": "x"}), 400, "seed"),
            (json!({"messages": user(), "seed": 18446744073709551615u64}), 400, "seed"),
            (json!({"messages": user(), "n": 0}), 400, "n"),
            (json!({"messages": user(), "n": 17}), 400, "n"),
            (json!({"messages": user(), "top_logprobs": 2}), 400, "top_logprobs"),
            (
                json!({"messages": user(), "logprobs": true, "top_logprobs": 21}),
                400,
                "top_logprobs",
            ),
            (json!({"messages": user(), "logprobs": "yes"}), 400, "logprobs"),
            (json!({"messages": user(), "stream": 1}), 400, "stream"),
            (json!({"messages": user(), "model": 1}), 400, "model"),
            (
                json!({"messages": user(), "response_format": {"type": "xml"}}),
                400,
                "response_format",
            ),
            (
                json!({"messages": user(), "response_format": {"type": "json_object"}}),
                422,
                "response_format",
            ),
            (json!({"messages": user(), "tools": [{"type": "function"}]}), 422, "tools"),
            (json!({"messages": user(), "tool_choice": "required"}), 422, "tool_choice"),
            (json!({"messages": user(), "logit_bias": [1, 5]}), 400, "logit_bias"),
            (json!({"messages": user(), "logit_bias": {"x": 5}}), 400, "logit_bias"),
            (json!({"messages": user(), "logit_bias": {"+1": 5}}), 400, "logit_bias"),
            (json!({"messages": user(), "logit_bias": {"-1": 5}}), 400, "logit_bias"),
            (json!({"messages": user(), "logit_bias": {"4294967296": 5}}), 400, "logit_bias"),
            (json!({"messages": user(), "logit_bias": {"1": "5"}}), 400, "logit_bias"),
            (json!({"messages": user(), "logit_bias": {"1": 100.5}}), 400, "logit_bias"),
            (json!({"messages": user(), "logit_bias": {"1": -101}}), 400, "logit_bias"),
            (json!({"messages": user(), "logit_bias": {"1": 5, "01": 3}}), 400, "logit_bias"),
            (json!({"messages": user(), "modalities": ["text", "audio"]}), 422, "modalities"),
            (json!({"model": "m"}), 400, "messages"),
        ];
        for (body, status, param) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (status, Some(param)), "{body}: {e}");
        }
    }

    #[test]
    fn accepts_harmless_values_of_unsupported_parameters() {
        let r = parse(json!({"messages": user(), "tools": [], "tool_choice": "none",
            "logit_bias": {}, "modalities": ["text"], "parallel_tool_calls": true,
            "stream_options": null}));
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn malformed_json() {
        let e = parse_chat_request(b"{\"messages\": [", ExtraParameters::Error).unwrap_err();
        assert_eq!((e.status, e.code), (400, "invalid_json"));
        let e = parse_chat_request(b"[1]", ExtraParameters::Error).unwrap_err();
        assert_eq!((e.status, e.code), (400, "invalid_json"));
    }
}
