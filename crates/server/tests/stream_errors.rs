//! An engine failure after a stream's 200 headers went out: the stream ends with one
//! `data: {"error": {...}}` event and no `[DONE]` (the only way to tell the openai SDK, which
//! raises `APIError` on it), framed like every other event.

use std::sync::Arc;
use std::time::Instant;

use axum::body::to_bytes;
use phi_engine::checkpoint::ModelSource;
use phi_engine::engine::{Engine, LoadOptions, StepOutput};
use phi_server::flavor::Flavor;
use phi_server::request_log::CompletionLog;
use phi_server::response_meta::ResponseMeta;
use phi_server::stream::{sse_response, ChatChunks};
use phi_server::worker::WorkerEvent;
use serde_json::Value;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny/phi3-mini-4k");

fn meta() -> ResponseMeta {
    let source = ModelSource::parse(MODEL, None).unwrap();
    ResponseMeta {
        id: "chatcmpl-test".into(),
        created: 1,
        model: "m".into(),
        n: 1,
        prompt_tokens: 3,
        cached_prompt_tokens: 0,
        logprobs: false,
        include_usage: false,
        flavor: Flavor::OpenAi,
        engine: Arc::new(Engine::load(&source, &LoadOptions::default()).unwrap()),
        filter: None,
    }
}

async fn body_events(failure: Option<&str>) -> Vec<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let output = StepOutput { text: "Hel".into(), ..StepOutput::default() };
    tx.send(WorkerEvent::Step { choice: 0, output }).unwrap();
    if let Some(message) = failure {
        tx.send(WorkerEvent::Failed(message.into())).unwrap();
    }
    drop(tx);
    let log = CompletionLog::start(None, "/v1/chat/completions", true, Instant::now(), 3, 1);
    let res = sse_response(meta(), rx, log, ChatChunks);
    assert_eq!(res.status(), 200);
    let bytes = to_bytes(res.into_body(), usize::MAX).await.unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(text.ends_with("\n\n") && !text.contains('\r'));
    text.trim_end_matches("\n\n").split("\n\n").map(String::from).collect()
}

fn error_of(event: &str) -> Value {
    let v: Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
    v["error"].clone()
}

#[tokio::test]
async fn engine_failure_ends_the_stream_with_an_error_event() {
    let events = body_events(Some("the engine failed: boom")).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events[0].contains("\"role\":\"assistant\""));
    assert!(events[1].contains("\"content\":\"Hel\""));
    let err = error_of(&events[2]);
    assert_eq!(err["message"], "the engine failed: boom");
    assert_eq!(err["type"], "server_error");
    assert!(!events.iter().any(|e| e == "data: [DONE]"));
}

#[tokio::test]
async fn vanished_worker_ends_the_stream_with_an_error_event() {
    let events = body_events(None).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(error_of(&events[2])["message"].as_str().unwrap().contains("engine stopped"));
}
