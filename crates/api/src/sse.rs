//! Server-sent-event framing that the strict azure parser accepts (CONTRACT.md A6): every event
//! is exactly `data: <compact JSON>\n\n`, LF only, no comments, no `event:`/`id:` lines, and the
//! stream ends with `data: [DONE]\n\n`.

use serde::Serialize;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// The last event of every stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Frames one JSON value as an event. `serde_json` writes compact JSON and escapes newlines
/// inside strings, so the payload is always one line.
pub fn event<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, value).expect("serializing a wire type cannot fail");
    out.extend_from_slice(b"\n\n");
    out
}

/// One event of a streamed chat answer, as OpenAPI 3.1 describes the items of
/// `text/event-stream`: its `data` is a [`crate::ChatCompletionChunk`] as JSON, or `[DONE]` at
/// the end.
///
/// Exists so that `/openapi.json` states what a stream carries and the schemathesis test checks
/// every event of every streamed answer against the chunk's schema. Its schema is written out
/// because JSON Schema's `contentSchema` has no derive attribute.
pub struct ChatCompletionEvent;

impl PartialSchema for ChatCompletionEvent {
    fn schema() -> RefOr<Schema> {
        event_schema("ChatCompletionChunk")
    }
}

impl ToSchema for ChatCompletionEvent {}

/// One event of a streamed text completion: its `data` is a [`crate::TextCompletion`] as
/// JSON, or `[DONE]` at the end.
pub struct TextCompletionEvent;

impl PartialSchema for TextCompletionEvent {
    fn schema() -> RefOr<Schema> {
        event_schema("TextCompletion")
    }
}

impl ToSchema for TextCompletionEvent {}

/// An event whose `data` is `[DONE]` or the JSON of the component schema `payload`.
fn event_schema(payload: &str) -> RefOr<Schema> {
    let mut payload_schema = Extensions::default();
    payload_schema.insert(
        "contentSchema".to_string(),
        serde_json::json!({"$ref": format!("#/components/schemas/{payload}")}),
    );
    let chunk = ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .extensions(Some(payload_schema));
    let done = ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["[DONE]"]));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("`data: {json}` events, then `data: [DONE]`."))
        .property("data", AnyOfBuilder::new().item(done).item(chunk))
        .required("data")
        .property("event", ObjectBuilder::new().schema_type(Type::String))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_lf_only() {
        let e = event(&serde_json::json!({"a": "x\ny\r\n"}));
        assert_eq!(e, b"data: {\"a\":\"x\\ny\\r\\n\"}\n\n".to_vec());
    }

    #[test]
    fn event_schema_points_at_the_chunk() {
        let schema = serde_json::to_value(ChatCompletionEvent::schema()).unwrap();
        let data = &schema["properties"]["data"]["anyOf"];
        assert_eq!(data[0]["enum"], serde_json::json!(["[DONE]"]));
        assert_eq!(data[1]["contentMediaType"], "application/json");
        assert_eq!(data[1]["contentSchema"]["$ref"], "#/components/schemas/ChatCompletionChunk");
        let schema = serde_json::to_value(TextCompletionEvent::schema()).unwrap();
        let data = &schema["properties"]["data"]["anyOf"];
        assert_eq!(data[1]["contentSchema"]["$ref"], "#/components/schemas/TextCompletion");
    }
}
