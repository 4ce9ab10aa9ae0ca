//! Binary-level tests of `phi-serve serve`: each test starts the real binary on the bundled tiny
//! model with `--port 0`, reads the bound address from its stdout, and talks HTTP to it. They
//! check the wire bytes that the azure and openai SDKs depend on (shared/api/CONTRACT.md), every
//! error status, authentication, and that concurrent and disconnecting clients behave.

mod common;

use std::io::Read;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};

#[test]
fn health_info_and_models() {
    let s = Server::start(&["--api-key", "k"]);
    let res = s.get("/health");
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-request-id"));
    assert_eq!(res.json::<Value>().unwrap()["status"], "ok");

    for path in ["/info?api-version=2024-05-01-preview", "/v1/info"] {
        let res = s.client.get(s.url(path)).header("api-key", "k").send().unwrap();
        assert_eq!(res.status(), 200);
        let info: Value = res.json().unwrap();
        assert_eq!(
            info,
            json!({"model_name": "phi3-mini-4k", "model_type": "chat_completion",
                   "model_provider_name": "Microsoft"})
        );
    }
    for path in ["/v1/models", "/models"] {
        let res = s.client.get(s.url(path)).bearer_auth("k").send().unwrap();
        assert_eq!(res.status(), 200);
        let list: Value = res.json().unwrap();
        assert_eq!(list["object"], "list");
        let model = &list["data"][0];
        assert_eq!(model["id"], "phi3-mini-4k");
        assert_eq!(model["object"], "model");
        assert!(model["created"].is_u64());
        assert!(model["owned_by"].is_string());
    }
}

#[test]
fn request_ids() {
    let s = Server::start(&[]);
    let res =
        s.client.get(s.url("/health")).header("x-ms-client-request-id", "abc-123").send().unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123");
    assert_eq!(res.headers()["x-ms-client-request-id"], "abc-123");
    let a = s.get("/nope").headers()["x-request-id"].clone();
    let b = s.get("/nope").headers()["x-request-id"].clone();
    assert_ne!(a, b);
    assert_eq!(a.len(), 32);
}

#[test]
fn json_completion_cloud_shape() {
    let s = Server::start(&["--served-model-name", "phi-3-test"]);
    let res = s.post("/chat/completions?api-version=2024-05-01-preview", &chat("hi", 5));
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let bytes = res.bytes().unwrap();
    assert!(!bytes.contains(&b'\n'), "compact JSON expected");
    assert!(bytes.starts_with(b"{\"id\":\"chatcmpl-"));
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    let keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["choices", "created", "id", "model", "object", "usage"]);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "phi-3-test");
    assert!(body["created"].is_u64());
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(choice["message"]["tool_calls"].is_null());
    assert!(choice.as_object().unwrap().contains_key("logprobs") && choice["logprobs"].is_null());
    assert_eq!(choice["finish_reason"], "length");
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    let p = usage["prompt_tokens"].as_u64().unwrap();
    assert!(p > 0);
    assert_eq!(usage["total_tokens"], p + 5);

    // Greedy decoding is deterministic, and the OpenAI route answers the same.
    let again: Value = s.post("/v1/chat/completions", &chat("hi", 5)).json().unwrap();
    assert_eq!(again["choices"][0]["message"], choice["message"]);
}

#[test]
fn sse_framing_azure_route() {
    let s = Server::start(&[]);
    let expected: Value = s.post("/chat/completions", &chat("hi", 6)).json().unwrap();
    let res = s.post("/chat/completions?api-version=2024-05-01-preview", &streaming(chat("hi", 6)));
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(res.headers()["cache-control"], "no-cache");
    assert!(res.headers().get("content-encoding").is_none());
    let bytes = res.bytes().unwrap();
    let chunks = parse_chunks(&bytes);
    assert!(bytes.ends_with(b"}\n\ndata: [DONE]\n\n"));

    let first = &chunks[0];
    assert_eq!(
        first["choices"],
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])
    );
    for c in &chunks {
        assert_eq!(c["id"], first["id"]);
        assert_eq!(c["created"], first["created"]);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "phi3-mini-4k");
        // Never `choices: []` on the azure route: the sample loop reads choices[0].delta.
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
        assert!(c["choices"][0]["delta"].is_object());
    }
    let finishes: Vec<&Value> =
        chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finishes.len(), 1);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(last["usage"], expected["usage"]);
    for c in &chunks[..chunks.len() - 1] {
        assert!(c.get("usage").is_none());
    }
    assert_eq!(
        content_of(&chunks, 0),
        expected["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // The exact bytes of one content chunk.
    let id = first["id"].as_str().unwrap();
    let created = first["created"].as_u64().unwrap();
    let piece = chunks[1]["choices"][0]["delta"]["content"].as_str().unwrap();
    let wire = format!(
        "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\
         \"model\":\"phi3-mini-4k\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\
         \"finish_reason\":null}}]}}\n\n",
        serde_json::to_string(piece).unwrap()
    );
    assert!(std::str::from_utf8(&bytes).unwrap().contains(&wire), "{wire}");
}

#[test]
fn sse_include_usage_on_v1() {
    let s = Server::start(&[]);
    let mut body = streaming(chat("hi", 4));
    body["model"] = json!("anything");
    body["stream_options"] = json!({"include_usage": true});
    let bytes = s.post("/v1/chat/completions", &body).bytes().unwrap();
    let chunks = parse_chunks(&bytes);
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 4);
    for c in rest {
        assert!(c["usage"].is_null() && c.as_object().unwrap().contains_key("usage"), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "length");

    // Without include_usage the final chunk carries usage, and no chunk has empty choices.
    let bytes = s.post("/v1/chat/completions", &streaming(chat("hi", 4))).bytes().unwrap();
    let chunks = parse_chunks(&bytes);
    assert!(chunks.iter().all(|c| !c["choices"].as_array().unwrap().is_empty()));
    assert!(chunks.last().unwrap()["usage"]["total_tokens"].as_u64().unwrap() > 4);
}

#[test]
fn logprobs_openai_shape() {
    let s = Server::start(&[]);
    let mut body = chat("hi", 4);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let res: Value = s.post("/v1/chat/completions", &body).json().unwrap();
    let lp = &res["choices"][0]["logprobs"];
    assert!(lp["refusal"].is_null());
    let content = lp["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    let mut text = String::new();
    for entry in content {
        let token = entry["token"].as_str().unwrap();
        let bytes: Vec<u8> =
            entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), token);
        text.push_str(token);
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the sampled token is the most likely one.
        assert_eq!(top[0]["token"], entry["token"]);
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        for t in top {
            assert!(t["token"].is_string() && t["logprob"].is_number() && t["bytes"].is_array());
        }
    }
    assert_eq!(
        text.trim_start(),
        res["choices"][0]["message"]["content"].as_str().unwrap().trim_start()
    );

    // The azure SDK's model_extras={"logprobs": True}: pass-through header.
    let res = s
        .client
        .post(s.url("/chat/completions?api-version=2024-05-01-preview"))
        .header("content-type", "application/json")
        .header("extra-parameters", "pass-through")
        .body(
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                     "logprobs": true})
            .to_string(),
        )
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().unwrap();
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[0]["top_logprobs"], json!([]));

    // Streaming: the logprobs of each chunk cover its delta.
    let mut body = streaming(chat("hi", 4));
    body["logprobs"] = json!(true);
    let bytes = s.post("/v1/chat/completions", &body).bytes().unwrap();
    let entries: usize = parse_chunks(&bytes)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().map(Vec::len))
        .sum();
    assert_eq!(entries, 4);
}

#[test]
fn several_choices() {
    let s = Server::start(&[]);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 3,
                      "temperature": 1, "seed": 7});
    let res: Value = s.post("/v1/chat/completions", &body).json().unwrap();
    let choices = res["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["finish_reason"].is_string());
    }
    let completion: u64 = res["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(completion, 15);
    // Seeded: the same request gives the same choices.
    let again: Value = s.post("/v1/chat/completions", &body).json().unwrap();
    assert_eq!(again["choices"], res["choices"]);

    let bytes = s.post("/v1/chat/completions", &streaming(body)).bytes().unwrap();
    let chunks = parse_chunks(&bytes);
    for i in 0..3 {
        let of_i: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().iter())
            .filter(|c| c["index"] == i)
            .collect();
        assert_eq!(of_i[0]["delta"]["role"], "assistant");
        assert_eq!(of_i.iter().filter(|c| !c["finish_reason"].is_null()).count(), 1);
        assert_eq!(
            content_of(&chunks, i),
            res["choices"][i]["message"]["content"].as_str().unwrap()
        );
    }
}

#[test]
fn accepted_parameter_spellings() {
    let s = Server::start(&[]);
    // The azure SDK's captured body.
    let azure = json!({"messages": [{"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"}], "frequency_penalty": 0.1, "max_tokens": 5,
        "presence_penalty": 0.1, "response_format": {"type": "text"}, "seed": 1,
        "stop": ["\n\n"], "temperature": 0, "top_p": 1});
    assert_eq!(s.post("/chat/completions?api-version=2024-05-01-preview", &azure).status(), 200);
    // OpenAI spellings, numeric strings, bare response_format, content parts, developer role,
    // assistant turn without content.
    let openai = json!({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "user", "content": "again"}],
        "max_completion_tokens": 3, "presence_penalty": "0.5", "frequency_penalty": "-0.5",
        "stop": "zzz", "response_format": "text", "user": "u", "temperature": 0.5, "seed": 3});
    let res: Value = s.post("/v1/chat/completions", &openai).json().unwrap();
    assert_eq!(res["usage"]["completion_tokens"], 3, "{res}");

    // A stop string cuts the answer before it.
    let full: Value = s.post("/v1/chat/completions", &chat("hi", 20)).json().unwrap();
    let text = full["choices"][0]["message"]["content"].as_str().unwrap();
    let cut = text.char_indices().nth(6).map(|(i, _)| i).unwrap();
    let stop: String = text[cut..].chars().take(3).collect();
    let mut body = chat("hi", 20);
    body["stop"] = json!([stop]);
    let res: Value = s.post("/v1/chat/completions", &body).json().unwrap();
    assert_eq!(res["choices"][0]["finish_reason"], "stop");
    assert_eq!(res["choices"][0]["message"]["content"].as_str().unwrap(), &text[..cut]);
}

#[test]
fn extra_parameters_header() {
    let s = Server::start(&[]);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                      "foo": 1, "safe_prompt": true});
    let send = |header: Option<&str>| {
        let mut req = s
            .client
            .post(s.url("/chat/completions?api-version=2024-05-01-preview"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(h) = header {
            req = req.header("extra-parameters", h);
        }
        req.send().unwrap()
    };
    let err = expect_error(send(None), 400);
    assert_eq!(err["code"], "extra_parameters_not_allowed");
    assert_eq!(err["param"], "foo");
    assert!(err["message"].as_str().unwrap().contains("'safe_prompt'"));
    let err = expect_error(send(Some("error")), 400);
    assert_eq!(err["code"], "extra_parameters_not_allowed");
    assert_eq!(send(Some("drop")).status(), 200);
    assert_eq!(send(Some("pass-through")).status(), 200);
    let err = expect_error(send(Some("ignore")), 400);
    assert_eq!(err["param"], "extra-parameters");
}

#[test]
fn error_statuses() {
    let s = Server::start(&["--max-body-bytes", "1024"]);
    let v1 = s.url("/v1/chat/completions");

    let err = expect_error(s.post("/v1/chat/nope", &chat("hi", 1)), 404);
    assert_eq!(err["code"], "not_found");
    expect_error(s.get("/"), 404);
    let err = expect_error(s.get("/v1/chat/completions"), 405);
    assert_eq!(err["code"], "method_not_allowed");
    expect_error(s.client.post(s.url("/health")).send().unwrap(), 405);

    // 415: no content type, or not JSON.
    let err = expect_error(s.client.post(&v1).body(chat("hi", 1).to_string()).send().unwrap(), 415);
    assert_eq!(err["code"], "unsupported_media_type");
    let res = s.client.post(&v1).header("content-type", "text/plain").body("{}").send().unwrap();
    expect_error(res, 415);
    let res = s
        .client
        .post(&v1)
        .header("content-type", "application/json; charset=utf-8")
        .body(chat("hi", 1).to_string())
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);

    // 413: over --max-body-bytes.
    let big = chat(&"a".repeat(2000), 1);
    let err = expect_error(s.post("/v1/chat/completions", &big), 413);
    assert_eq!(err["code"], "payload_too_large");

    // 400: malformed JSON, not an object, bad parameters (named), prompt too long.
    let send_raw = |raw: &str| {
        s.client
            .post(&v1)
            .header("content-type", "application/json")
            .body(raw.to_string())
            .send()
            .unwrap()
    };
    let err = expect_error(send_raw("{\"messages\": [}"), 400);
    assert_eq!(err["code"], "invalid_json");
    expect_error(send_raw("[]"), 400);
    expect_error(send_raw(""), 400);
    for (patch, param) in [
        (json!({"temperature": 5}), "temperature"),
        (json!({"top_p": "x"}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"n": 0}), "n"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
    ] {
        let mut body = chat("hi", 2);
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let err = expect_error(s.post("/v1/chat/completions", &body), 400);
        assert_eq!(err["param"], param, "{err}");
        assert_eq!(err["type"], "invalid_request_error");
    }
    let err = expect_error(s.post("/v1/chat/completions", &chat(&"hello ".repeat(100), 1)), 400);
    assert_eq!(err["code"], "context_length_exceeded");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("64 tokens") && msg.contains("At most 63"), "{msg}");

    // 422: valid but unsupported.
    let mut body = chat("hi", 2);
    body["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
    let err = expect_error(s.post("/v1/chat/completions", &body), 422);
    assert_eq!(err["code"], "parameter_not_supported");
    assert_eq!(err["param"], "tools");

    // The server is still healthy after all that.
    assert_eq!(s.post("/v1/chat/completions", &chat("hi", 2)).status(), 200);
}

#[test]
fn authentication() {
    let dir = std::env::temp_dir().join(format!("phi-serve-http-keys-{}", std::process::id()));
    std::fs::write(&dir, "# rotated in\nkey-from-file\n").unwrap();
    let s = Server::start_with_env(
        &["--api-key", "key-one", "--api-key-file", dir.to_str().unwrap()],
        &[("PHI_SERVE_API_KEYS", "key-two, key-three")],
    );
    let v1 = s.url("/v1/chat/completions");
    let body = chat("hi", 1).to_string();
    let post = |name: Option<(&str, &str)>| {
        let mut req =
            s.client.post(&v1).header("content-type", "application/json").body(body.clone());
        if let Some((k, v)) = name {
            req = req.header(k, v);
        }
        req.send().unwrap()
    };
    let err = expect_error(post(None), 401);
    assert_eq!(err["code"], "missing_api_key");
    let err = expect_error(post(Some(("authorization", "Bearer nope"))), 401);
    assert_eq!(err["code"], "invalid_api_key");
    expect_error(post(Some(("api-key", "key-on"))), 401);
    expect_error(post(Some(("api-key", "key-one2"))), 401);
    expect_error(post(Some(("authorization", "key-one"))), 401);
    for ok in [
        ("authorization", "Bearer key-one"),
        ("Authorization", "bearer key-two"),
        ("api-key", "key-three"),
        ("api-key", "key-from-file"),
    ] {
        assert_eq!(post(Some(ok)).status(), 200, "{ok:?}");
    }
    // The azure SDK sends both headers.
    let res = s
        .client
        .post(&v1)
        .header("content-type", "application/json")
        .header("authorization", "Bearer key-two")
        .header("api-key", "key-two")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    for path in ["/info", "/v1/models"] {
        expect_error(s.get(path), 401);
    }
    assert_eq!(s.get("/health").status(), 200);
    std::fs::remove_file(&dir).unwrap();
}

#[test]
fn refuses_public_address_without_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_phi-serve"))
        .args(["serve", "--model", MODEL, "--host", "0.0.0.0", "--port", "0"])
        .env_remove("PHI_SERVE_API_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to listen on 0.0.0.0 without an API key"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// Reads a streaming response until `n` SSE events arrived, returning their bytes.
fn read_events(res: &mut Response, n: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(2).filter(|w| w == b"\n\n").count() < n {
        let k = res.read(&mut buf).unwrap();
        assert!(k > 0, "stream ended early");
        seen.extend_from_slice(&buf[..k]);
    }
    seen
}

fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

const PATIENCE: Duration = Duration::from_secs(30);

#[test]
fn queue_full_is_429_with_retry_after() {
    let s = Server::start(&["--max-batch-size", "1", "--max-queue", "1", "--step-delay-ms", "100"]);
    // A runs (it fills the batch of one) ...
    let mut a = s.post("/v1/chat/completions", &streaming(chat("hi", 50)));
    read_events(&mut a, 2);
    // ... B waits in the queue of one ...
    let base = s.base.clone();
    let b = thread::spawn(move || {
        let client = Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat("hello", 3).to_string())
            .send()
            .unwrap()
            .status()
    });
    wait_until("B to be queued", PATIENCE, || s.health()["queued"] == 1);
    // ... so C is refused.
    let res = s.post("/v1/chat/completions", &chat("x", 1));
    assert_eq!(res.headers()["retry-after"], "1");
    let err = expect_error(res, 429);
    assert_eq!(err["code"], "too_many_requests");
    // Dropping A frees the batch for B.
    drop(a);
    assert_eq!(b.join().unwrap(), 200);
}

#[test]
fn concurrent_streams_all_complete() {
    let s = Server::start(&["--step-delay-ms", "5"]);
    let prompts =
        ["hi", "hello there", "what is 2+2", "tell me a joke", "x", "the quick brown fox"];
    let solo: Vec<Value> = prompts
        .iter()
        .map(|p| s.post("/v1/chat/completions", &chat(p, 30)).json().unwrap())
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let base = s.base.clone();
            let body = streaming(chat(p, 30));
            thread::spawn(move || {
                let client = Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
                let res = client
                    .post(format!("{base}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .unwrap();
                assert_eq!(res.status(), 200);
                parse_chunks(&res.bytes().unwrap())
            })
        })
        .collect();
    for (h, expected) in handles.into_iter().zip(&solo) {
        let chunks = h.join().unwrap();
        // Batched with the others, each request gets exactly what it gets alone.
        assert_eq!(
            content_of(&chunks, 0),
            expected["choices"][0]["message"]["content"].as_str().unwrap()
        );
        assert_eq!(chunks.last().unwrap()["usage"], expected["usage"]);
    }
}

#[test]
fn disconnecting_client_is_dropped_and_others_finish() {
    // 100 ms a step: 60 tokens would take 6 s, so a request gone within 3 s was cancelled.
    let s = Server::start(&["--step-delay-ms", "100"]);
    let mut quitter = s.post("/v1/chat/completions", &streaming(chat("hi", 60)));
    read_events(&mut quitter, 2);
    assert_eq!(s.health()["running"], 1);
    drop(quitter);
    wait_until("the streaming quitter to be dropped", Duration::from_secs(3), || {
        s.health()["running"] == 0
    });

    // A non-streaming client that gives up is dropped too.
    let short = Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    let res = short
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat("hi", 60).to_string())
        .send();
    assert!(res.is_err(), "should have timed out");
    wait_until("the abandoned request to be dropped", Duration::from_secs(3), || {
        s.health()["running"] == 0
    });

    // A client that disconnects mid-stream does not disturb another one in the same batch.
    let expected: Value = s.post("/v1/chat/completions", &chat("hello there", 15)).json().unwrap();
    let base = s.base.clone();
    let other = thread::spawn(move || {
        let client = Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        let res = client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(streaming(chat("hello there", 15)).to_string())
            .send()
            .unwrap();
        parse_chunks(&res.bytes().unwrap())
    });
    let mut quitter = s.post("/v1/chat/completions", &streaming(chat("hi", 60)));
    read_events(&mut quitter, 2);
    wait_until("both requests to run", PATIENCE, || s.health()["running"] == 2);
    drop(quitter);
    let chunks = other.join().unwrap();
    assert_eq!(
        content_of(&chunks, 0),
        expected["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 15);
    wait_until("the batch to empty", Duration::from_secs(3), || s.health()["running"] == 0);
    assert_eq!(s.post("/v1/chat/completions", &chat("hi", 2)).status(), 200);
}

/// Writes a blocklist file for `--content-filter-file` into a fresh temp dir.
fn blocklist_file(name: &str, json: &Value) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("phi-serve-cf-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("blocklist.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn start_filtered(file: &std::path::Path) -> Server {
    Server::start(&[
        "--content-filter",
        "blocklist",
        "--content-filter-file",
        file.to_str().unwrap(),
    ])
}

const FILTER_MESSAGE: &str = "The response was filtered due to the prompt triggering Azure \
    OpenAI's content management policy. Please modify your prompt and retry. To learn more about \
    our content filtering policies please read our documentation: \
    https://go.microsoft.com/fwlink/?linkid=2198766";

fn safe_results() -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    json!({"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe})
}

#[test]
fn content_filter_blocks_prompt_and_annotates_clean_answers() {
    let file = blocklist_file(
        "prompt",
        &json!({"threshold": "medium", "categories": {
            "violence": {"terms": ["kill", {"term": "hurt", "severity": "low"}]},
            "hate": {"patterns": [{"regex": "(?i)bad\\s+people", "severity": "medium"}]}}}),
    );
    let server = start_filtered(&file);
    let safe = json!({"filtered": false, "severity": "safe"});

    for (path, prompt, violence, hate) in [
        (
            "/v1/chat/completions",
            "How do I KILL time?",
            json!({"filtered": true, "severity": "high"}),
            safe.clone(),
        ),
        (
            "/chat/completions",
            "they are Bad   People",
            safe.clone(),
            json!({"filtered": true, "severity": "medium"}),
        ),
    ] {
        let res = server.post(path, &chat(prompt, 4));
        assert_eq!(res.status().as_u16(), 400);
        assert_eq!(res.headers()["x-ms-error-code"], "content_filter");
        let body: Value = res.json().unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": FILTER_MESSAGE, "type": null, "param": "prompt",
                "code": "content_filter", "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                    "hate": hate, "self_harm": safe, "sexual": safe, "violence": violence}}}})
        );
    }
    // The prompt is every message's text, the system message included; streaming too.
    let body = json!({"messages": [{"role": "system", "content": "never kill"},
                                   {"role": "user", "content": "hi"}], "stream": true});
    let err = expect_error(server.post("/v1/chat/completions", &body), 400);
    assert_eq!(err["code"], "content_filter");
    // A text completion's prompts are screened the same way, whichever prompt holds the term.
    let body = json!({"prompt": ["hi", "how to kill"], "max_tokens": 2});
    let err = expect_error(server.post("/v1/completions", &body), 400);
    assert_eq!((&err["code"], &err["param"]), (&json!("content_filter"), &json!("prompt")));
    let res: Value =
        server.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2})).json().unwrap();
    assert_eq!(
        res["prompt_filter_results"],
        json!([{"prompt_index": 0, "content_filter_results": safe_results()}])
    );
    assert_eq!(res["choices"][0]["content_filter_results"], safe_results(), "{res}");

    // Below the threshold (low < medium), or not a whole word: answered, and annotated.
    let res = server.post("/v1/chat/completions", &chat("does it hurt the skills of killers?", 4));
    assert_eq!(res.status().as_u16(), 200);
    let body: Value = res.json().unwrap();
    let mut prompt_results = safe_results();
    prompt_results["violence"] = json!({"filtered": false, "severity": "low"});
    assert_eq!(
        body["prompt_filter_results"],
        json!([{"prompt_index": 0, "content_filter_results": prompt_results}])
    );
    let choice = &body["choices"][0];
    assert_ne!(choice["finish_reason"], "content_filter");
    assert_eq!(choice["content_filter_results"], safe_results(), "{body}");

    // Streaming: the first chunk carries prompt_filter_results, content chunks and final
    // chunks carry content_filter_results next to their delta.
    let res = server.post("/v1/chat/completions", &streaming(chat("hello", 6)));
    assert_eq!(res.status().as_u16(), 200);
    let chunks = parse_chunks(&res.bytes().unwrap());
    assert_eq!(
        chunks[0]["prompt_filter_results"],
        json!([{"prompt_index": 0, "content_filter_results": safe_results()}])
    );
    assert!(chunks[1..].iter().all(|c| c.get("prompt_filter_results").is_none()));
    for c in &chunks[1..] {
        let choice = &c["choices"][0];
        assert!(choice.get("delta").is_some());
        assert_eq!(choice["content_filter_results"], safe_results(), "{c}");
    }
    let last = &chunks.last().unwrap()["choices"][0];
    assert!(last["finish_reason"].is_string());
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[test]
fn content_filter_stops_blocked_output() {
    let prompt = "Tell me a story";
    // Without a filter: the greedy answer, and no annotations.
    let plain = Server::start(&[]);
    let res = plain.post("/v1/chat/completions", &chat(prompt, 12));
    let body: Value = res.json().unwrap();
    assert!(body.get("prompt_filter_results").is_none(), "{body}");
    assert!(body["choices"][0].get("content_filter_results").is_none(), "{body}");
    let full = body["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let res = plain.post("/v1/chat/completions", &streaming(chat(prompt, 12)));
    let chunks = parse_chunks(&res.bytes().unwrap());
    assert!(chunks.iter().all(|c| c.get("prompt_filter_results").is_none()));
    assert!(chunks.iter().all(|c| c["choices"]
        .as_array()
        .unwrap()
        .iter()
        .all(|ch| ch.get("content_filter_results").is_none())));
    drop(plain);

    // A word of that answer (not its first, so some text comes before it), blocked.
    let words: Vec<&str> = full
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.len() >= 3 && w.chars().all(|c| c.is_ascii_alphabetic()))
        .filter(|w| !prompt.to_lowercase().contains(&w.to_lowercase()))
        .collect();
    assert!(words.len() >= 2, "no usable word in {full:?}");
    let word = words[1];
    let file = blocklist_file("output", &json!({"categories": {"violence": {"terms": [word]}}}));
    let server = start_filtered(&file);
    let blocked = json!({"filtered": true, "severity": "high"});

    let res = server.post("/v1/chat/completions", &chat(prompt, 12));
    assert_eq!(res.status().as_u16(), 200);
    let body: Value = res.json().unwrap();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "content_filter", "{body} (word {word:?} of {full:?})");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(!content.to_lowercase().contains(&word.to_lowercase()), "{content:?} has {word:?}");
    assert!(full.starts_with(content) && content.len() < full.len(), "{content:?} vs {full:?}");
    // The last word is held back until the text after it shows it complete, so no beginning
    // of the blocked word went out either: what was released ends before a word.
    let word_char = |c: char| c.is_alphanumeric() || c == '_';
    assert!(
        !content.ends_with(word_char),
        "{content:?} released a word before {word:?} was judged"
    );
    assert_eq!(choice["content_filter_results"]["violence"], blocked);
    assert_eq!(body["prompt_filter_results"][0]["content_filter_results"], safe_results());
    // The choice stopped early: fewer tokens than the unfiltered 12.
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() < 12, "{body}");

    for path in ["/v1/chat/completions", "/chat/completions"] {
        let res = server.post(path, &streaming(chat(prompt, 12)));
        assert_eq!(res.status().as_u16(), 200);
        let chunks = parse_chunks(&res.bytes().unwrap());
        let streamed = content_of(&chunks, 0);
        assert_eq!(streamed, content, "{chunks:?}");
        let last = chunks.last().unwrap();
        let last_choice = &last["choices"][0];
        assert_eq!(last_choice["finish_reason"], "content_filter", "{chunks:?}");
        assert_eq!(last_choice["delta"], json!({}));
        assert_eq!(last_choice["content_filter_results"]["violence"], blocked);
        if path == "/chat/completions" {
            assert!(last["usage"]["completion_tokens"].as_u64().unwrap() < 12);
        }
        // Only the final chunk says content_filter; no chunk before it carries the word.
        let finals = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count();
        assert_eq!(finals, 1);
    }
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// A greedy case of the transformers reference for the bundled model: prompt ids, generated
/// ids, their logprobs and the top-5 alternatives at each position.
fn reference_greedy_case(name: &str) -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crates/engine/tests/reference/phi3-mini-4k/reference.json"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["greedy_cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn text_completion_continues_token_ids_as_transformers_does() {
    let case = reference_greedy_case("short");
    let prompt = ids_of(&case["prompt_ids"]);
    let want = ids_of(&case["generated_ids"]);
    let tokenizer = phi_engine::tokenizer::PhiTokenizer::from_dir(MODEL).unwrap();
    let piece = |id: u32| tokenizer.id_to_token(id).unwrap().replace('\u{2581}', " ");

    let s = Server::start(&[]);
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": want.len(),
        "temperature": 0, "logprobs": 5});
    let res = s.post("/v1/completions", &body);
    assert_eq!(res.status(), 200);
    let res: Value = res.json().unwrap();
    assert!(res["id"].as_str().unwrap().starts_with("cmpl-"), "{res}");
    assert_eq!(res["object"], "text_completion");
    assert_eq!(res["model"], "phi3-mini-4k");
    assert!(res["created"].is_u64());
    assert_eq!(res["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(res["usage"]["completion_tokens"], want.len());
    let choice = &res["choices"][0];
    assert_eq!((&choice["index"], &choice["finish_reason"]), (&json!(0), &json!("length")));

    // The tokens transformers generated, with its logprobs and alternatives.
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> =
        lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens, want.iter().map(|&id| piece(id)).collect::<Vec<_>>());
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    for (i, reference) in case["logprobs"].as_array().unwrap().iter().enumerate() {
        let got = token_logprobs[i].as_f64().unwrap();
        assert!(
            (got - reference.as_f64().unwrap()).abs() < 1e-3,
            "token {i}: {got} vs {reference}"
        );
        let alternatives = top[i].as_object().unwrap();
        assert_eq!(alternatives.len(), 5, "{}", top[i]);
        for pair in case["top_logprobs"][i].as_array().unwrap() {
            let text = piece(pair[0].as_u64().unwrap() as u32);
            let got = alternatives[&text].as_f64().unwrap();
            assert!((got - pair[1].as_f64().unwrap()).abs() < 1e-3, "token {i}, {text:?}");
        }
    }
    // Offsets count characters of the text, token by token.
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    let mut at = 0;
    for (token, offset) in tokens.iter().zip(&offsets) {
        assert_eq!(*offset, at);
        at += token.chars().count();
    }
    // The text is the continuation as transformers decodes it: all ids, less the prompt's text.
    let all: Vec<u32> = prompt.iter().chain(&want).copied().collect();
    let full = tokenizer.decode(&all, true).unwrap();
    let head = tokenizer.decode(&prompt, true).unwrap();
    assert_eq!(choice["text"].as_str().unwrap(), &full[head.len()..]);
}

#[test]
fn text_completion_prompts_echo_and_stream() {
    let s = Server::start(&[]);
    let prompts = ["Once upon a time", "hi"];
    let body = json!({"prompt": prompts, "n": 2, "max_tokens": 5, "temperature": 0,
        "echo": true});
    let res: Value = s.post("/v1/completions", &body).json().unwrap();
    let choices = res["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["logprobs"].is_null());
        let text = c["text"].as_str().unwrap();
        assert!(text.starts_with(prompts[i / 2]) && text.len() > prompts[i / 2].len(), "{text:?}");
    }
    // Greedy: both choices of a prompt agree; the prompts' answers do not.
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(choices[2]["text"], choices[3]["text"]);
    let usage = res["usage"].clone();
    let single: Value = s
        .post("/v1/completions", &json!({"prompt": prompts[1], "max_tokens": 5, "temperature": 0}))
        .json()
        .unwrap();
    assert_eq!(
        format!("{}{}", prompts[1], single["choices"][0]["text"].as_str().unwrap()),
        choices[2]["text"].as_str().unwrap()
    );

    // The text is what the tokens add to the prompt's: a first token `▁hello` (forced here) is
    // " hello", its space kept (a chat answer would start "hello").
    let tokenizer = phi_engine::tokenizer::PhiTokenizer::from_dir(MODEL).unwrap();
    let hello = tokenizer.token_to_id("\u{2581}hello").unwrap();
    for stream in [false, true] {
        let body = json!({"prompt": "Once upon a", "max_tokens": 2, "temperature": 0,
            "logit_bias": {hello.to_string(): 100}, "stream": stream});
        let res = s.post("/v1/completions", &body);
        let text = if stream {
            let chunks = parse_chunks(&res.bytes().unwrap());
            chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap().to_string()).collect()
        } else {
            res.json::<Value>().unwrap()["choices"][0]["text"].as_str().unwrap().to_string()
        };
        assert_eq!(text, " hello hello", "stream: {stream}");
    }

    // The same request streamed: the same texts, the echo first, then the usage event.
    let mut body = streaming(body);
    body["stream_options"] = json!({"include_usage": true});
    let res = s.post("/v1/completions", &body);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let chunks = parse_chunks(&res.bytes().unwrap());
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage_chunk["usage"][count], usage[count]);
    }
    let mut texts = vec![String::new(); 4];
    let mut finished = vec![None; 4];
    for c in rest {
        assert_eq!((&c["object"], &c["id"]), (&json!("text_completion"), &rest[0]["id"]));
        assert!(c["usage"].is_null() && c.as_object().unwrap().contains_key("usage"), "{c}");
        let [choice] = c["choices"].as_array().unwrap().as_slice() else { panic!("{c}") };
        let i = choice["index"].as_u64().unwrap() as usize;
        assert!(finished[i].is_none(), "an event after the choice's last: {c}");
        if texts[i].is_empty() {
            assert_eq!(choice["text"], prompts[i / 2], "the first event echoes the prompt");
        }
        texts[i].push_str(choice["text"].as_str().unwrap());
        finished[i] = choice["finish_reason"].as_str().map(str::to_string);
    }
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(texts[i], c["text"].as_str().unwrap());
        assert_eq!(finished[i].as_deref(), c["finish_reason"].as_str());
    }
}

/// The four legacy lists of a choice, merged over a stream's events when there are several.
fn merged_logprobs(parts: &[&Value]) -> Value {
    let mut out =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for part in parts {
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let list = out[key].as_array_mut().unwrap();
            list.extend(part[key].as_array().unwrap().iter().cloned());
        }
    }
    out
}

#[test]
fn text_completion_scores_an_echoed_prompt_as_lm_eval_asks() {
    // lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1.
    // The prompt is the reference's greedy case "short" followed by what transformers generated,
    // so the log-probabilities of those tokens are transformers', and each is the likeliest.
    let case = reference_greedy_case("short");
    let context = ids_of(&case["prompt_ids"]);
    let continuation = ids_of(&case["generated_ids"]);
    let prompt: Vec<u32> = context.iter().chain(&continuation).copied().collect();
    let tokenizer = phi_engine::tokenizer::PhiTokenizer::from_dir(MODEL).unwrap();
    let echo = tokenizer.decode(&prompt, false).unwrap();
    let s = Server::start(&[]);
    let mut answers = Vec::new();
    for max_tokens in [1, 0] {
        let body = json!({"prompt": [prompt.clone()], "echo": true, "logprobs": 1,
            "max_tokens": max_tokens, "temperature": 0});
        let res = s.post("/v1/completions", &body);
        assert_eq!(res.status(), 200);
        let res: Value = res.json().unwrap();
        assert_eq!(res["usage"]["prompt_tokens"], prompt.len());
        assert_eq!(res["usage"]["completion_tokens"], max_tokens);
        let choice = &res["choices"][0];
        assert_eq!(choice["finish_reason"], "length");
        let text = choice["text"].as_str().unwrap();
        assert!(text.starts_with(&echo) && (text.len() > echo.len()) == (max_tokens == 1));
        let lp = &choice["logprobs"];
        let token_logprobs = lp["token_logprobs"].as_array().unwrap();
        let top = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(token_logprobs.len(), prompt.len() + max_tokens, "{lp}");
        assert!(token_logprobs[0].is_null() && top[0].is_null(), "{lp}");
        // What lm-eval reads: the continuation's logprobs, summed, and whether it is greedy.
        let ctxlen = context.len();
        for (i, reference) in case["logprobs"].as_array().unwrap().iter().enumerate() {
            let got = token_logprobs[ctxlen + i].as_f64().unwrap();
            assert!((got - reference.as_f64().unwrap()).abs() < 1e-3, "{i}: {got} {reference}");
            let best = top[ctxlen + i].as_object().unwrap().values();
            let best = best.map(|v| v.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(got, best, "token {i} is the greedy one: {}", top[ctxlen + i]);
        }
        for (i, t) in top.iter().enumerate().skip(1) {
            let t = t.as_object().unwrap();
            assert!((1..=2).contains(&t.len()), "1 alternative and the token itself: {t:?}");
            let token = lp["tokens"][i].as_str().unwrap();
            assert_eq!(t[token], token_logprobs[i], "{i}");
        }
        // Each token's text starts at its offset in the echoed prompt (the first token's
        // SentencePiece space is the one the decode drops).
        let chars: Vec<char> = text.chars().collect();
        for (i, token) in lp["tokens"].as_array().unwrap().iter().enumerate().take(prompt.len()) {
            let token = token.as_str().unwrap();
            let token = if i == 0 { token.trim_start() } else { token };
            let at = lp["text_offset"][i].as_u64().unwrap() as usize;
            let here: String = chars[at..].iter().take(token.chars().count()).collect();
            assert_eq!(here, token, "token {i} at {at}");
        }
        answers.push(choice.clone());
    }
    // The prompt's entries do not depend on what is generated after it.
    let n = prompt.len();
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        let with = &answers[0]["logprobs"][key].as_array().unwrap()[..n];
        assert_eq!(with, answers[1]["logprobs"][key].as_array().unwrap().as_slice(), "{key}");
    }

    // Streamed, with two choices: each opens with its echoed, scored prompt, and the lists
    // put together are the JSON answer's.
    let body = json!({"prompt": [prompt.clone()], "echo": true, "logprobs": 1, "max_tokens": 3,
        "temperature": 0, "n": 2});
    let json: Value = s.post("/v1/completions", &body).json().unwrap();
    let chunks = parse_chunks(&s.post("/v1/completions", &streaming(body)).bytes().unwrap());
    for index in 0..2 {
        let parts: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|c| c["index"] == index)
            .collect();
        assert_eq!(parts[0]["text"], echo.as_str(), "the first event is the prompt");
        assert_eq!(parts[0]["logprobs"]["tokens"].as_array().unwrap().len(), n);
        let text: String = parts.iter().map(|p| p["text"].as_str().unwrap()).collect();
        let lists: Vec<&Value> =
            parts.iter().map(|p| &p["logprobs"]).filter(|l| !l.is_null()).collect();
        let want = &json["choices"][index]["logprobs"];
        assert_eq!(text, json["choices"][index]["text"].as_str().unwrap());
        assert_eq!(&merged_logprobs(&lists), want, "choice {index}");
    }

    // A text prompt: its offsets index the text as given.
    let body = json!({"prompt": "Once upon a time", "echo": true, "logprobs": 0,
        "max_tokens": 0});
    let res: Value = s.post("/v1/completions", &body).json().unwrap();
    let choice = &res["choices"][0];
    assert_eq!(choice["text"], "Once upon a time");
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> =
        lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(tokens.concat().trim_start(), "Once upon a time", "{lp}");
    let last = "Once upon a time".len() - tokens.last().unwrap().len();
    assert_eq!(*offsets.last().unwrap() as usize, last, "{lp}");
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{lp}");
}

#[test]
fn text_completion_errors() {
    let s = Server::start(&[]);
    // The bundled model's context is 64 tokens.
    let long = vec![1u32; 64];
    let cases = [
        (json!({"prompt": [32064]}), 400, "prompt"),
        (json!({"prompt": long}), 400, "prompt"),
        (json!({"prompt": ""}), 400, "prompt"),
        (json!({"max_tokens": 3}), 400, "prompt"),
        (json!({"prompt": "a", "suffix": "b"}), 422, "suffix"),
        (json!({"prompt": "a", "max_tokens": 0}), 400, "max_tokens"),
        (json!({"prompt": "a", "logit_bias": {"32064": 1}}), 400, "logit_bias"),
        (json!({"prompt": "a", "messages": []}), 400, "messages"),
    ];
    for (body, status, param) in cases {
        let err = expect_error(s.post("/v1/completions", &body), status);
        assert_eq!(err["param"], param, "{body}: {err}");
    }
    let err = expect_error(s.post("/v1/completions", &json!({"prompt": long})), 400);
    assert_eq!(err["code"], "context_length_exceeded");
    // Still serving.
    let res = s.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!(res.status(), 200);
}

/// Phi-3-small (its own architecture and a tiktoken tokenizer) behind the same API: the chat
/// template, tokenizer, block-sparse model and detokenizer together give the reference's
/// greedy answer (mlx-lm's `phi3small`, `models/make_tiny_phi3_small.py`), whole and streamed.
#[test]
fn phi3_small_answers_as_its_reference_does() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny/phi3-small-8k");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crates/engine/tests/reference/phi3-small-8k/reference.json"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = json["greedy_cases"].as_array().unwrap().iter().find(|c| c["name"] == "chat");
    let case = case.unwrap();
    let (prompt, want) = (ids_of(&case["prompt_ids"]), ids_of(&case["generated_ids"]));
    let tokenizer = phi_engine::tokenizer::PhiTokenizer::from_files(
        format!("{dir}/cl100k_base.tiktoken"),
        Some(std::path::Path::new(&format!("{dir}/tokenizer_config.json"))),
    )
    .unwrap();
    let text = tokenizer.decode(&want, true).unwrap();

    let s = Server::start_opts(Options { model: Some(dir), ..Options::default() });
    let info: Value = s.get("/info").json().unwrap();
    assert_eq!(info["model_name"], "phi3-small-8k");
    let body = json!({"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me about the lighthouse."}],
        "max_tokens": want.len(), "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let res = s.post("/v1/chat/completions", &body);
    assert_eq!(res.status(), 200);
    let res: Value = res.json().unwrap();
    assert_eq!(res["usage"]["prompt_tokens"], prompt.len(), "{res}");
    assert_eq!(res["usage"]["completion_tokens"], want.len());
    let choice = &res["choices"][0];
    assert_eq!(choice["message"]["content"], text.as_str());
    assert_eq!(choice["finish_reason"], "length");
    // One logprob entry per generated token; their bytes, end to end, are the answer's.
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), want.len());
    let mut bytes: Vec<u8> = Vec::new();
    for entry in content {
        bytes.extend(entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8));
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
    assert_eq!(String::from_utf8_lossy(&bytes), text);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let mut res = s.post("/v1/chat/completions", &streamed);
    assert_eq!(res.status(), 200);
    let mut raw = String::new();
    res.read_to_string(&mut raw).unwrap();
    let mut joined = String::new();
    for line in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line != "[DONE]" {
            let event: Value = serde_json::from_str(line).unwrap();
            if let Some(t) = event["choices"][0]["delta"]["content"].as_str() {
                joined.push_str(t);
            }
        }
    }
    assert_eq!(joined, text);

    // A raw text prompt is tokenized without a BOS (the tiktoken tokenizer adds none).
    let res: Value = s
        .post("/v1/completions", &json!({"prompt": "The old lighthouse", "max_tokens": 1}))
        .json()
        .unwrap();
    let ids = tokenizer.encode_with_special_tokens("The old lighthouse").unwrap();
    assert_ne!(ids[0], 100257);
    assert_eq!(res["usage"]["prompt_tokens"], ids.len(), "{res}");
}
