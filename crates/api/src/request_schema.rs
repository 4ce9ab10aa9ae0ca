//! The chat- and text-completions request bodies as the OpenAPI description states them.
//!
//! Requests are not parsed through these types: [`crate::parse_chat_request`] reads the body
//! parameter by parameter so that every error names the parameter at fault, and it accepts more
//! spellings than a schema can say (numbers as strings, explicit `null`s). These types exist so
//! that `GET /openapi.json` describes what a client may send, with the ranges the parser
//! enforces; tests hold their property names to [`crate::parse::KNOWN_PARAMETERS`] and
//! [`crate::parse_completion::KNOWN_COMPLETION_PARAMETERS`].

use serde::Deserialize;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// The body of `POST /chat/completions` and `POST /v1/chat/completions`.
///
/// Parameters this text-only server cannot honour (`tools`, `response_format` other than
/// `text`, audio) are a 422 when they ask for something and are accepted when they
/// ask for nothing. Keys outside this list follow the `extra-parameters` header (Azure):
/// `error` (the default, 400), `drop` or `pass-through`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionsRequest {
    /// The conversation so far, oldest first.
    #[schema(min_items = 1)]
    pub messages: Vec<RequestMessage>,
    /// Informational: the server serves one model whatever is named here.
    pub model: Option<String>,
    /// Sampling temperature; 0 is greedy decoding.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: the smallest set of tokens whose probabilities add up to this.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Penalises tokens that have appeared at all.
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    /// Penalises tokens by how often they have appeared.
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
    /// Most tokens to generate per choice; by default as many as the context allows.
    #[schema(minimum = 1)]
    pub max_tokens: Option<u64>,
    /// OpenAI's name for `max_tokens`; wins when both are given.
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u64>,
    /// Up to four strings that end a choice (not included in the answer).
    pub stop: Option<Stop>,
    /// Answer as server-sent events (`data: {chunk}` lines, then `data: [DONE]`).
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Makes sampling repeatable: the same seed and request give the same answer.
    pub seed: Option<i64>,
    /// How many choices to generate (at most [`crate::request::MAX_CHOICES`]; a test holds the
    /// two equal).
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u64>,
    /// Return the log-probability of each generated token.
    pub logprobs: Option<bool>,
    /// With `logprobs`: also the most likely alternatives at each position.
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<u64>,
    /// Only `text` is supported (as a string or `{"type": "text"}`).
    pub response_format: Option<ResponseFormat>,
    /// Tool definitions: only an empty list is accepted (no tool calling).
    pub tools: Option<Vec<serde_json::Value>>,
    /// `none` or `auto` (there are no tools to call).
    pub tool_choice: Option<String>,
    /// Only `true`/`false` is accepted and ignored (no tool calling).
    pub parallel_tool_calls: Option<bool>,
    /// Token id (as a decimal string) -> amount added to that token's logit before sampling,
    /// -100 to 100 (-100 bans the token, 100 makes it the only choice); at most 1024 ids, each
    /// inside the model's vocabulary. Reported log-probabilities stay the model's own.
    #[schema(value_type = Option<HashMap<String, f64>>)]
    pub logit_bias: Option<serde_json::Value>,
    /// Only `["text"]` is accepted.
    pub modalities: Option<Vec<Modality>>,
    /// The end user, for the operator's logs.
    pub user: Option<String>,
    /// Accepted and ignored.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Accepted and ignored (nothing is stored).
    pub store: Option<bool>,
    /// Accepted and ignored.
    pub service_tier: Option<String>,
    /// Deprecated OpenAI tool definitions: only an empty list is accepted.
    pub functions: Option<Vec<serde_json::Value>>,
    /// Deprecated OpenAI `tool_choice`: `none` or `auto`.
    pub function_call: Option<String>,
    /// Not supported (422).
    #[schema(value_type = Option<Object>)]
    pub audio: Option<serde_json::Value>,
    /// Not supported (422).
    #[schema(value_type = Option<Object>)]
    pub prediction: Option<serde_json::Value>,
    /// Not supported (422).
    #[schema(value_type = Option<Object>)]
    pub web_search_options: Option<serde_json::Value>,
    /// Accepted and ignored.
    pub reasoning_effort: Option<String>,
    /// Accepted and ignored.
    pub verbosity: Option<String>,
    /// Accepted and ignored: prefix reuse is automatic.
    pub prompt_cache_key: Option<String>,
    /// Accepted and ignored.
    pub safety_identifier: Option<String>,
}

/// One message of the conversation: instructions, a user turn or an earlier answer. `tool`
/// and `function` messages are a 422 (no tool calling); other keys of a message are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RequestMessage {
    /// `system` or `developer`.
    Instructions(InstructionsMessage),
    /// `user`.
    User(UserMessage),
    /// `assistant`.
    Assistant(AssistantTurn),
}

/// Instructions: translated into the first user turn for templates without a system role.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InstructionsMessage {
    /// `developer` is OpenAI's newer name for `system`.
    pub role: InstructionsRole,
    /// The text, or text parts (joined with newlines).
    pub content: MessageContent,
}

/// The roles of an [`InstructionsMessage`].
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstructionsRole {
    /// Instructions.
    System,
    /// The same, by OpenAI's newer name.
    Developer,
}

/// What the person asks.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UserMessage {
    /// Always `user`.
    pub role: UserRole,
    /// The text, or text parts (joined with newlines).
    pub content: MessageContent,
}

/// The role of a [`UserMessage`].
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UserRole {
    /// The person asking.
    User,
}

/// An earlier answer (its content may be absent when it only called tools).
#[derive(Debug, Deserialize, ToSchema)]
pub struct AssistantTurn {
    /// Always `assistant`.
    pub role: AssistantRole,
    /// The text, or text parts (joined with newlines).
    pub content: Option<MessageContent>,
}

/// The role of an [`AssistantTurn`].
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AssistantRole {
    /// An earlier answer.
    Assistant,
}

/// Message content: a string, or an array of text parts.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Text parts; image and audio parts are a 422 (the model reads text only).
    Parts(Vec<TextPart>),
}

/// One text part of a message.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TextPart {
    /// Always `text`.
    #[serde(rename = "type")]
    pub kind: TextPartType,
    /// The text.
    pub text: String,
}

/// The type of a text part.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TextPartType {
    /// Text.
    Text,
}

/// `stop`: one non-empty string or up to four (its schema is written out below, as the derive
/// cannot bound an untagged variant).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to four stop strings.
    Many(Vec<String>),
}

impl PartialSchema for Stop {
    fn schema() -> RefOr<Schema> {
        let string = || ObjectBuilder::new().schema_type(Type::String).min_length(Some(1));
        OneOfBuilder::new()
            .item(string())
            .item(ArrayBuilder::new().items(string()).max_items(Some(4)))
            .into()
    }
}

impl ToSchema for Stop {}

/// `stream_options`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send one more chunk at the end with `usage` (and `"usage": null` on the others).
    pub include_usage: Option<bool>,
}

/// `response_format`: `"text"`, or an object whose `type` is `text` (`json_object` and
/// `json_schema` are a 422).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ResponseFormat {
    /// `"text"`.
    Name(ResponseFormatType),
    /// `{"type": "text"}`.
    Object {
        /// The format.
        #[serde(rename = "type")]
        kind: ResponseFormatType,
    },
}

/// The response formats the API names.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormatType {
    /// Free text (the only one supported).
    Text,
    /// JSON mode (422).
    JsonObject,
    /// Structured output (422).
    JsonSchema,
}

/// An output modality.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    /// Text (the only one supported).
    Text,
    /// Audio (422).
    Audio,
}

/// The body of `POST /v1/completions` (OpenAI's legacy text completions): the prompt is
/// continued as it is, without a chat template.
///
/// Keys outside this list follow the `extra-parameters` header, as on the chat routes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionsRequest {
    /// What to continue: a string, strings, token ids, or lists of token ids (each list one
    /// prompt). Text is tokenized with the model's special tokens (BOS where its tokenizer
    /// adds one); token ids are used as they are.
    pub prompt: PromptInput,
    /// Informational: the server serves one model whatever is named here.
    pub model: Option<String>,
    /// Only `null` or `""`: Phi-3 models do not fill in the middle (422).
    pub suffix: Option<String>,
    /// Most tokens to generate per choice (16 when not given); 0 only with `echo`: the prompt
    /// alone, scored with `logprobs`.
    #[schema(minimum = 0)]
    pub max_tokens: Option<u64>,
    /// Sampling temperature; 0 is greedy decoding.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: the smallest set of tokens whose probabilities add up to this.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Choices per prompt; all prompts' choices together at most 16.
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u64>,
    /// Answer as server-sent events (`data: {completion}` lines, then `data: [DONE]`).
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// The log-probability of each generated token and of this many alternatives per position
    /// (the sampled token is always among them); with `echo`, of the prompt's tokens too (the
    /// first one's `null`).
    #[schema(minimum = 0, maximum = 20)]
    pub logprobs: Option<u64>,
    /// Put the prompt in front of each choice's text (and, with `logprobs`, its tokens in front
    /// of the generated ones).
    pub echo: Option<bool>,
    /// Up to four strings that end a choice (not included in the answer).
    pub stop: Option<Stop>,
    /// Penalises tokens that have appeared at all.
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    /// Penalises tokens by how often they have appeared.
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
    /// Only equal to `n` (more is a 422: no server-side ranking of choices).
    #[schema(minimum = 1, maximum = 16)]
    pub best_of: Option<u64>,
    /// Token id (as a decimal string) -> amount added to that token's logit before sampling,
    /// -100 to 100; at most 1024 ids, each inside the model's vocabulary.
    #[schema(value_type = Option<HashMap<String, f64>>)]
    pub logit_bias: Option<serde_json::Value>,
    /// Makes sampling repeatable: the same seed and request give the same answer.
    pub seed: Option<i64>,
    /// The end user, for the operator's logs.
    pub user: Option<String>,
}

/// `prompt` of a text completion (its schema is written out below, as the derive cannot bound
/// untagged variants).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    Text(String),
    /// Several prompts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

impl PartialSchema for PromptInput {
    fn schema() -> RefOr<Schema> {
        let id = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0.0))
                .maximum(Some(f64::from(u32::MAX)))
        };
        let ids = || ArrayBuilder::new().items(id()).min_items(Some(1));
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(
                ArrayBuilder::new()
                    .items(ObjectBuilder::new().schema_type(Type::String))
                    .min_items(Some(1)),
            )
            .item(ids())
            .item(ArrayBuilder::new().items(ids()).min_items(Some(1)))
            .into()
    }
}

impl ToSchema for PromptInput {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::KNOWN_PARAMETERS;
    use crate::parse_completion::{KNOWN_COMPLETION_PARAMETERS, MAX_LOGPROBS};
    use crate::request::MAX_CHOICES;

    fn properties() -> Vec<String> {
        let schema = serde_json::to_value(ChatCompletionsRequest::schema()).unwrap();
        schema["properties"].as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn schema_names_exactly_the_known_parameters() {
        let mut documented = properties();
        documented.sort();
        let mut known: Vec<String> = KNOWN_PARAMETERS.iter().map(|s| s.to_string()).collect();
        known.sort();
        assert_eq!(documented, known);
    }

    #[test]
    fn messages_are_required_and_the_rest_optional() {
        let schema = serde_json::to_value(ChatCompletionsRequest::schema()).unwrap();
        assert_eq!(schema["required"], serde_json::json!(["messages"]));
        assert_eq!(schema["properties"]["n"]["maximum"], serde_json::json!(MAX_CHOICES));
    }

    #[test]
    fn completions_schema_names_exactly_the_known_parameters() {
        let schema = serde_json::to_value(CompletionsRequest::schema()).unwrap();
        let mut documented: Vec<&str> =
            schema["properties"].as_object().unwrap().keys().map(String::as_str).collect();
        documented.sort();
        let mut known = KNOWN_COMPLETION_PARAMETERS.to_vec();
        known.sort();
        assert_eq!(documented, known);
        assert_eq!(schema["required"], serde_json::json!(["prompt"]));
        assert_eq!(schema["properties"]["logprobs"]["maximum"], serde_json::json!(MAX_LOGPROBS));
    }
}
