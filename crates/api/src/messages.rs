//! Chat messages as clients send them, flattened into the engine's `{role, content}` form.
//!
//! The SDKs send content as a string or as an array of parts, assistant messages that carry only
//! `tool_calls` and no `content`, and the `developer` role (CONTRACT.md A3); all of that has to be
//! accepted. Parts this text-only model cannot read (images, audio) are a 422, roles it does not
//! know a 400.

use phi_engine::chat_template::ChatMessage;
use serde_json::Value;

use crate::error::ApiError;

const PARAM: &str = "messages";

/// Parses the `messages` array.
pub fn parse_messages(value: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = match value {
        None => return Err(ApiError::missing_parameter(PARAM)),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ApiError::invalid_type(PARAM, "an array of messages")),
    };
    if list.is_empty() {
        return Err(ApiError::invalid_value(PARAM, "`messages` must contain at least one message"));
    }
    list.iter().enumerate().map(|(i, m)| parse_message(i, m)).collect()
}

fn parse_message(index: usize, value: &Value) -> Result<ChatMessage, ApiError> {
    let obj = value.as_object().ok_or_else(|| {
        ApiError::invalid_type(PARAM, &format!("an object for message {index}"))
            .with_param(format!("messages[{index}]"))
    })?;
    let role = match obj.get("role") {
        Some(Value::String(r)) => r.as_str(),
        None | Some(Value::Null) => {
            return Err(ApiError::missing_parameter(&format!("messages[{index}].role")))
        }
        Some(_) => {
            return Err(ApiError::invalid_type(&format!("messages[{index}].role"), "a string"))
        }
    };
    match role {
        "system" | "developer" | "user" | "assistant" => {}
        "tool" | "function" => {
            return Err(ApiError::not_supported(
                &format!("messages[{index}].role"),
                format!(
                    "message {index} has role {role:?}: this server does not support tool calling"
                ),
            ))
        }
        other => {
            return Err(ApiError::invalid_value(
                &format!("messages[{index}].role"),
                format!(
                    "message {index} has unsupported role {other:?} (expected system, developer, \
                     user or assistant)"
                ),
            ))
        }
    }
    let content_param = format!("messages[{index}].content");
    let content = match obj.get("content") {
        Some(Value::String(s)) => s.clone(),
        // An assistant turn that only called tools has no content.
        None | Some(Value::Null) if role == "assistant" => String::new(),
        None | Some(Value::Null) => return Err(ApiError::missing_parameter(&content_param)),
        Some(Value::Array(parts)) => join_parts(&content_param, parts)?,
        Some(_) => {
            return Err(ApiError::invalid_type(&content_param, "a string or an array of parts"))
        }
    };
    Ok(ChatMessage::new(role, content))
}

/// Joins text parts with newlines (as vLLM does); any non-text part is refused.
fn join_parts(param: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        let kind = part.get("type").and_then(Value::as_str);
        match kind {
            Some("text") => match part.get("text") {
                Some(Value::String(t)) => texts.push(t.as_str()),
                _ => return Err(ApiError::invalid_type(param, "a `text` string in a text part")),
            },
            Some(k @ ("image_url" | "input_audio" | "file" | "input_image")) => {
                return Err(ApiError::not_supported(
                    param,
                    format!(
                        "content parts of type {k:?} are not supported: this model reads text only"
                    ),
                ))
            }
            Some(k) => {
                return Err(ApiError::invalid_value(
                    param,
                    format!("unknown content part type {k:?}"),
                ))
            }
            None => return Err(ApiError::invalid_type(param, "content parts with a `type`")),
        }
    }
    Ok(texts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Vec<ChatMessage>, ApiError> {
        parse_messages(Some(&v))
    }

    #[test]
    fn accepts_every_sdk_shape() {
        let m = parse(json!([
            {"role": "system", "content": "s"},
            {"role": "developer", "content": "d"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "assistant", "content": null},
        ]))
        .unwrap();
        assert_eq!(m[0], ChatMessage::new("system", "s"));
        assert_eq!(m[1], ChatMessage::new("developer", "d"));
        assert_eq!(m[2], ChatMessage::new("user", "a\nb"));
        assert_eq!(m[3], ChatMessage::new("assistant", ""));
        assert_eq!(m[4], ChatMessage::new("assistant", ""));
    }

    #[test]
    fn rejects_with_the_right_status_and_param() {
        let e = parse_messages(None).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("messages")));
        let e = parse(json!([])).unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse(json!("hi")).unwrap_err();
        assert_eq!(e.code, "invalid_type");
        let e = parse(json!([{"role": "wizard", "content": "x"}])).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("messages[0].role")));
        let e = parse(json!([{"role": "tool", "tool_call_id": "c", "content": "x"}])).unwrap_err();
        assert_eq!(e.status, 422);
        let e = parse(json!([{"role": "user", "content": [{"type": "image_url",
            "image_url": {"url": "data:"}}]}]))
        .unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (422, Some("messages[0].content")));
        let e = parse(json!([{"role": "user"}])).unwrap_err();
        assert_eq!(e.code, "missing_required_parameter");
        let e = parse(json!([{"role": "user", "content": 3}])).unwrap_err();
        assert_eq!(e.code, "invalid_type");
    }
}
