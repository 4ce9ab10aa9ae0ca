//! Binary-level tests of what an operator relies on around the API: 503 while the model loads,
//! CORS for browser clients, one log line per request, and the HTTP content-filter hook talking
//! to a moderation service (a small HTTP server in the test, answering as Azure AI Content
//! Safety's `text:analyze` does).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[test]
fn answers_503_while_loading_then_serves() {
    let s = Server::start_opts(Options {
        args: &["--load-delay-ms", "2500", "--api-key", "k"],
        while_loading: true,
        ..Options::default()
    });
    let res = s.get("/health");
    assert_eq!(res.status(), 503);
    assert_eq!(res.json::<Value>().unwrap(), json!({"status": "loading"}));
    for res in [
        s.client.post(s.url("/v1/chat/completions")).header("api-key", "k").json(&chat("hi", 2)),
        s.client.get(s.url("/info")),
    ]
    .map(|r| r.send().unwrap())
    {
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "5");
        assert_eq!(res.headers()["x-ms-error-code"], "service_unavailable");
        let body: Value = res.json().unwrap();
        assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
        assert_eq!(body["error"]["status"], 503);
    }
    let line = s.stdout.recv_timeout(Duration::from_secs(60)).expect("the listening line");
    assert!(line.starts_with(LISTENING), "{line}");
    assert_eq!(s.health()["status"], "ok");
    let res = s.client.post(s.url("/v1/chat/completions")).header("api-key", "k");
    assert_eq!(res.json(&chat("hi", 2)).send().unwrap().status(), 200);
}

#[test]
fn cors_only_for_configured_origins() {
    let s = Server::start(&["--cors-allow-origin", "https://app.example.com", "--api-key", "k"]);
    // A browser's preflight is answered without a key, mirroring the requested headers.
    let preflight = |origin: &str| {
        s.client
            .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type,x-stainless-os")
            .send()
            .unwrap()
    };
    let res = preflight("https://app.example.com");
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    let allowed = h["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("x-stainless-os"), "{allowed}");
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    assert!(preflight("https://evil.example.com")
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    let res = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("origin", "https://app.example.com")
        .header("authorization", "Bearer k")
        .json(&chat("hi", 2))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], "https://app.example.com");
    let exposed = res.headers()["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    // An error answer carries the CORS headers too, so the page can read it.
    let res = s.client.get(s.url("/info")).header("origin", "https://app.example.com").send();
    let res = res.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["access-control-allow-origin"], "https://app.example.com");

    // Without the flag there is no cross-origin access at all.
    let plain = Server::start(&[]);
    let res = plain
        .client
        .get(plain.url("/health"))
        .header("origin", "https://app.example.com")
        .send()
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

/// The next stderr line that contains every one of `needles`.
fn log_line(s: &Server, needles: &[&str]) -> String {
    let stderr = s.stderr.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = stderr.recv_timeout(left).expect("a log line");
        if needles.iter().all(|n| line.contains(n)) {
            return line;
        }
    }
}

/// A server whose log (at `filter`) the test reads.
fn logging_server(filter: &str) -> Server {
    Server::start_opts(Options {
        env: &[("RUST_LOG", filter)],
        capture_stderr: true,
        ..Options::default()
    })
}

#[test]
fn one_log_line_per_request() {
    let s = logging_server("phi_server::access=info");
    let res = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-ms-client-request-id", "req-42")
        .json(&chat("hi", 3))
        .send()
        .unwrap();
    let body: Value = res.json().unwrap();
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let line = log_line(&s, &["request_id=\"req-42\"", "completion_tokens"]);
    for field in [
        "path=\"/v1/chat/completions\"".to_string(),
        "status=200".into(),
        "stream=false".into(),
        format!("prompt_tokens={prompt}"),
        format!("completion_tokens={tokens}"),
        format!("finish_reason=\"{}\"", body["choices"][0]["finish_reason"].as_str().unwrap()),
        "ttft_ms=".into(),
        "duration_ms=".into(),
    ] {
        assert!(line.contains(&field), "{field} not in {line}");
    }

    // Streams are logged when they end; errors by the access log, with their code.
    let res = s.post("/chat/completions", &streaming(chat("hello", 2)));
    let _ = res.bytes().unwrap();
    let line = log_line(&s, &["path=\"/chat/completions\"", "stream=true"]);
    assert!(line.contains("status=200") && line.contains("completion_tokens="), "{line}");
    let res = s.post("/v1/chat/completions", &json!({"messages": []}));
    assert_eq!(res.status(), 400);
    let line = log_line(&s, &["status=400"]);
    assert!(line.contains("method=POST") && line.contains("error_code="), "{line}");
}

/// What the moderation service saw: the text kind header, the key header and the text.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A moderation service on a free port, answering as Azure AI Content Safety does: `Violence`
/// severity 6 for a prompt that says "forbidden", and for an answer once it is 8 bytes or
/// longer; everything else severity 0.
fn moderation_service() -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/contentsafety/text:analyze", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let record = seen.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let record = record.clone();
            thread::spawn(move || answer_moderation(stream, &record));
        }
    });
    (url, seen)
}

fn answer_moderation(mut stream: TcpStream, seen: &Seen) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        headers.push(line.trim_end().to_lowercase());
    }
    let header = |name: &str| {
        headers
            .iter()
            .find_map(|h| h.strip_prefix(&format!("{name}: ")).map(str::to_string))
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let text =
        serde_json::from_slice::<Value>(&body).unwrap()["text"].as_str().unwrap().to_string();
    let kind = header("x-phi-serve-text-kind");
    let block = match kind.as_str() {
        "prompt" => text.contains("forbidden"),
        _ => text.len() >= 8,
    };
    seen.lock().unwrap().push((kind, header("ocp-apim-subscription-key"), text));
    let answer = json!({"blocklistsMatch": [], "categoriesAnalysis": [
        {"category": "Hate", "severity": 0}, {"category": "SelfHarm", "severity": 0},
        {"category": "Sexual", "severity": 2},
        {"category": "Violence", "severity": if block { 6 } else { 0 }}]})
    .to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{answer}",
        answer.len()
    );
}

#[test]
fn http_content_filter_asks_the_moderation_service() {
    let (url, seen) = moderation_service();
    let s = Server::start(&[
        "--content-filter",
        "http",
        "--content-filter-url",
        &url,
        "--content-filter-header",
        "Ocp-Apim-Subscription-Key: secret",
    ]);
    let err = expect_error(s.post("/v1/chat/completions", &chat("a forbidden question", 4)), 400);
    assert_eq!(err["code"], "content_filter");
    assert_eq!(err["param"], "prompt");
    assert_eq!(
        err["innererror"]["content_filter_result"]["violence"],
        json!({"filtered": true, "severity": "high"})
    );
    assert_eq!(
        err["innererror"]["content_filter_result"]["sexual"],
        json!({"filtered": false, "severity": "low"})
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "a blocked prompt generates nothing: {seen:?}");
        assert_eq!(seen[0], ("prompt".into(), "secret".into(), "a forbidden question".into()));
    }

    // A clean prompt: the answer is screened as it grows and cut before 8 bytes of it go out.
    for stream in [false, true] {
        seen.lock().unwrap().clear();
        let mut body = chat("Tell me a story", 24);
        body["stream"] = json!(stream);
        let res = s.post("/v1/chat/completions", &body);
        assert_eq!(res.status(), 200);
        let (content, finish) = if stream {
            let chunks = parse_chunks(&res.bytes().unwrap());
            let last = chunks.last().unwrap()["choices"][0].clone();
            (content_of(&chunks, 0), last["finish_reason"].clone())
        } else {
            let body: Value = res.json().unwrap();
            let choice = body["choices"][0].clone();
            assert_eq!(choice["content_filter_results"]["violence"]["filtered"], true);
            (
                choice["message"]["content"].as_str().unwrap().to_string(),
                choice["finish_reason"].clone(),
            )
        };
        assert_eq!(finish, "content_filter", "stream={stream}");
        assert!(content.len() < 8, "{content:?} went out");
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, "prompt");
        let answers: Vec<&String> =
            seen.iter().filter(|s| s.0 == "completion").map(|s| &s.2).collect();
        assert!(!answers.is_empty(), "{seen:?}");
        assert!(answers.last().unwrap().len() >= 8, "{answers:?}");
        assert!(answers.iter().all(|a| a.starts_with(&content)), "{answers:?} vs {content:?}");
    }
}

#[test]
fn unreachable_moderation_service_fails_closed() {
    // A port that was free a moment ago: nothing listens there.
    let url = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/analyze", l.local_addr().unwrap())
    };
    let s = Server::start(&[
        "--content-filter",
        "http",
        "--content-filter-url",
        &url,
        "--content-filter-timeout-ms",
        "2000",
    ]);
    for body in [chat("hello", 4), streaming(chat("hello", 4))] {
        let res = s.post("/v1/chat/completions", &body);
        assert_eq!(res.headers()["retry-after"], "5");
        let err = expect_error(res, 503);
        assert_eq!(err["code"], "service_unavailable");
        assert!(err["message"].as_str().unwrap().contains("content filter"), "{err}");
    }
    assert_eq!(s.health()["status"], "ok");
}

#[test]
fn bad_content_filter_settings_fail_at_start() {
    for (args, message) in [
        (&["--content-filter", "http"][..], "--content-filter http needs --content-filter-url"),
        (&["--content-filter-url", "http://x/"][..], "needs --content-filter http"),
        (
            &["--content-filter", "http", "--content-filter-url", "ftp://x/"][..],
            "http:// or https://",
        ),
        (&["--content-filter", "blocklist"][..], "needs --content-filter-file"),
        (&["--cors-allow-origin", "example.com"][..], "--cors-allow-origin"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_phi-serve"))
            .args(["serve", "--model", MODEL, "--port", "0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} listened");
    }
}

/// The value of the sample `name` (with its labels, as written) on a `/metrics` page.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in\n{page}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_and_readiness() {
    let s = Server::start(&["--api-key", "k"]);
    // Both need no key, like /health.
    let res = s.get("/ready");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().unwrap(), json!({"status": "ready"}));
    let res = s.get("/metrics");
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));

    let res =
        s.client.post(s.url("/v1/chat/completions")).header("api-key", "k").json(&chat("hi", 5));
    let body: Value = res.send().unwrap().json().unwrap();
    let generated = body["usage"]["completion_tokens"].as_f64().unwrap();
    let prompt = body["usage"]["prompt_tokens"].as_f64().unwrap();
    let finish = body["choices"][0]["finish_reason"].as_str().unwrap().to_string();
    let res = s.client.post(s.url("/chat/completions")).header("api-key", "k");
    let res = res.json(&streaming(chat("hi", 5))).send().unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.bytes().unwrap();
    assert_eq!(s.get("/no/such/route/1").status(), 404);
    assert_eq!(s.get("/no/such/route/2").status(), 404);
    assert_eq!(s.get("/info").status(), 401);

    // The stream's line is written when its body is done, a moment after the client read it.
    thread::sleep(Duration::from_millis(200));
    let page = s.get("/metrics").text().unwrap();
    let requests = |route: &str, status: u16| {
        sample(&page, &format!("phi_serve_requests_total{{route=\"{route}\",status=\"{status}\"}}"))
    };
    assert_eq!(requests("/v1/chat/completions", 200), 1.0);
    assert_eq!(requests("/chat/completions", 200), 1.0);
    assert_eq!(requests("unmatched", 404), 2.0, "unknown paths share one label");
    assert_eq!(requests("/info", 401), 1.0);
    assert_eq!(sample(&page, "phi_serve_prompt_tokens_total"), 2.0 * prompt);
    assert_eq!(sample(&page, "phi_serve_generated_tokens_total"), 2.0 * generated);
    // Every token was sampled once on the host (a stop token too, which the usage leaves out).
    let on = |at: &str| sample(&page, &format!("phi_serve_sampled_tokens_total{{on=\"{at}\"}}"));
    assert_eq!(on("device"), 0.0, "a CPU has no sampling kernels");
    assert!((2.0 * generated..=2.0 * generated + 2.0).contains(&on("host")), "{}", on("host"));
    assert_eq!(
        sample(&page, &format!("phi_serve_finish_reason_total{{reason=\"{finish}\"}}")),
        2.0
    );
    assert_eq!(sample(&page, "phi_serve_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(sample(&page, "phi_serve_request_latency_seconds_count"), 2.0);
    assert_eq!(sample(&page, "phi_serve_request_latency_seconds_bucket{le=\"+Inf\"}"), 2.0);
    for gauge in
        ["queue_length", "running_requests", "running_sequences", "kv_cache_bytes", "draining"]
    {
        assert_eq!(sample(&page, &format!("phi_serve_{gauge}")), 0.0, "{gauge}");
    }
}

#[test]
fn busy_server_reports_its_load() {
    let s = Server::start(&["--step-delay-ms", "50", "--max-batch-size", "1"]);
    let mut long = chat("Tell me a story", 200);
    long["stop"] = json!([]);
    let base = s.base.clone();
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let (base, body) = (base.clone(), streaming(long.clone()));
            thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let res = client.post(format!("{base}/v1/chat/completions")).json(&body).send();
                // Dropped before the end: the client goes away mid-stream.
                let mut res = res.unwrap();
                let mut buf = [0u8; 256];
                let _ = res.read(&mut buf);
                thread::sleep(Duration::from_millis(600));
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = s.get("/metrics").text().unwrap();
        // The gauges are published after admission and again after each step (when the
        // cache has grown), so wait for the state, not for the first partial match.
        if sample(&page, "phi_serve_running_requests") == 1.0
            && sample(&page, "phi_serve_queue_length") == 1.0
            && sample(&page, "phi_serve_kv_cache_bytes") > 0.0
        {
            assert_eq!(sample(&page, "phi_serve_running_sequences"), 1.0);
            assert!(sample(&page, "phi_serve_queued_prompt_tokens") > 0.0);
            assert!(sample(&page, "phi_serve_kv_cache_blocks_used") > 0.0, "{page}");
            break;
        }
        assert!(Instant::now() < deadline, "never saw one running and one queued:\n{page}");
        thread::sleep(Duration::from_millis(20));
    }
    for t in streams {
        t.join().unwrap();
    }
    // Both clients left: the batch empties and its cache is given back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = s.get("/metrics").text().unwrap();
        if sample(&page, "phi_serve_running_requests") == 0.0
            && sample(&page, "phi_serve_queue_length") == 0.0
        {
            assert_eq!(sample(&page, "phi_serve_kv_cache_bytes"), 0.0);
            // The pool is back to empty: every block free (or only kept by the prefix cache).
            assert_eq!(sample(&page, "phi_serve_kv_cache_blocks_used"), 0.0, "{page}");
            assert_eq!(
                sample(&page, "phi_serve_kv_cache_blocks_free")
                    + sample(&page, "phi_serve_kv_cache_blocks_cached"),
                sample(&page, "phi_serve_kv_cache_blocks_total")
            );
            assert!(
                sample(&page, "phi_serve_finish_reason_total{reason=\"client_disconnected\"}")
                    >= 1.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "the batch never emptied:\n{page}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(s: &Server) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the server process to exit, at most `limit`.
fn wait_exit(s: &mut Server, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "phi-serve did not exit within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_drains_running_requests() {
    let mut s = Server::start(&["--step-delay-ms", "40", "--shutdown-grace-secs", "30"]);
    let body = streaming(chat("Tell me a story", 40));
    let url = s.url("/v1/chat/completions");
    let stream = thread::spawn(move || {
        let res = reqwest::blocking::Client::new().post(url).json(&body).send().unwrap();
        parse_chunks(&res.bytes().unwrap())
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.health()["running"] != 1 {
        assert!(Instant::now() < deadline, "the stream never started");
        thread::sleep(Duration::from_millis(10));
    }
    sigterm(&s);
    // Draining: not ready, no new work, the running stream goes on.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let res = s.get("/ready");
        if res.status() == 503 {
            assert_eq!(res.json::<Value>().unwrap(), json!({"status": "draining"}));
            break;
        }
        assert!(Instant::now() < deadline, "/ready never turned 503");
        thread::sleep(Duration::from_millis(10));
    }
    let err = expect_error(s.post("/v1/chat/completions", &chat("hi", 2)), 503);
    assert!(err["message"].as_str().unwrap().contains("shutting down"), "{err}");
    assert_eq!(s.health()["status"], "ok", "still alive while draining");
    let chunks = stream.join().unwrap();
    let last = &chunks.last().unwrap()["choices"][0];
    assert!(last["finish_reason"].is_string(), "the stream was completed: {last}");
    let status = wait_exit(&mut s, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

#[test]
fn grace_period_bounds_the_drain() {
    let mut s = Server::start(&["--step-delay-ms", "100", "--shutdown-grace-secs", "1"]);
    let mut body = streaming(chat("Tell me a story", 400));
    body["stop"] = json!([]);
    let url = s.url("/v1/chat/completions");
    let stream = thread::spawn(move || {
        let client = reqwest::blocking::Client::new();
        let mut res = client.post(url).json(&body).send().unwrap();
        let mut all = Vec::new();
        let _ = res.read_to_end(&mut all);
        all
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.health()["running"] != 1 {
        assert!(Instant::now() < deadline, "the stream never started");
        thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    sigterm(&s);
    wait_exit(&mut s, Duration::from_secs(10));
    assert!(signalled.elapsed() >= Duration::from_secs(1), "exited before the grace period");
    let bytes = stream.join().unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("[DONE]"), "a 40 s stream cannot have completed: {text}");
}

#[test]
fn prefix_reuse_serves_repeated_prompts_exactly() {
    let system =
        "You are a careful assistant for a weather service. Answer in one short sentence, \
                  and never invent numbers you were not given.";
    let ask = |s: &Server, question: &str, stream: bool| {
        let mut body = json!({"messages": [{"role": "system", "content": system},
                                           {"role": "user", "content": question}],
                              "max_tokens": 12, "temperature": 0, "logprobs": true});
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let chunks = parse_chunks(&s.post("/v1/chat/completions", &body).bytes().unwrap());
            let usage = chunks.last().unwrap()["usage"].clone();
            (content_of(&chunks, 0), usage)
        } else {
            let body: Value = s.post("/v1/chat/completions", &body).json().unwrap();
            (
                body["choices"][0]["message"]["content"].as_str().unwrap().to_string(),
                body["usage"].clone(),
            )
        }
    };
    let questions = ["Will it rain in Paris?", "Is it windy in Oslo?", "Will it rain in Paris?"];
    let plain = Server::start(&["--prefix-cache-mb", "0"]);
    let expected: Vec<String> = questions.iter().map(|q| ask(&plain, q, false).0).collect();
    drop(plain);

    let s = Server::start(&[]);
    let (first, usage) = ask(&s, questions[0], false);
    assert_eq!(first, expected[0]);
    assert!(usage.get("prompt_tokens_details").is_none(), "nothing to reuse yet: {usage}");
    for (i, stream) in [(1, true), (2, false)] {
        let (text, usage) = ask(&s, questions[i], stream);
        assert_eq!(text, expected[i], "question {i} with a reused prefix");
        let cached = usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        // The system prompt at least; the whole repeated conversation but its last token.
        assert!(cached >= 20 && cached < prompt, "question {i}: {usage}");
        if i == 2 {
            assert_eq!(cached, prompt - 1, "the same conversation again: {usage}");
        }
    }
    // The Azure route reports no cache details (its SDK's usage has no such field).
    let body = json!({"messages": [{"role": "system", "content": system},
                                   {"role": "user", "content": questions[0]}], "max_tokens": 4});
    let body: Value = s.post("/chat/completions", &body).json().unwrap();
    assert!(body["usage"].get("prompt_tokens_details").is_none(), "{body}");

    let page = s.get("/metrics").text().unwrap();
    assert_eq!(sample(&page, "phi_serve_prefix_cache_hits_total"), 3.0, "{page}");
    assert!(sample(&page, "phi_serve_prefix_cache_reused_tokens_total") >= 60.0);
    assert!(sample(&page, "phi_serve_prefix_cache_bytes") > 0.0);
}

#[test]
fn kv_cache_budget_is_logged_reported_and_enforced() {
    // Default: from the available memory, logged at start-up with what fits.
    let s = logging_server("phi_serve=info");
    let line = log_line(&s, &["KV cache budget"]);
    for field in ["tokens=", "bytes_per_token=", "full_context_sequences=", "context=64"] {
        assert!(line.contains(field), "{field} not in {line}");
    }
    drop(s);

    // The tiny model's context is 64 tokens; 48 hold a short request, not a full-context one.
    let s = Server::start(&["--kv-cache-tokens", "48"]);
    let page = s.get("/metrics").text().unwrap();
    assert_eq!(sample(&page, "phi_serve_kv_cache_budget_tokens"), 48.0);
    assert_eq!(s.post("/v1/chat/completions", &chat("hi", 8)).status(), 200);
    let err = expect_error(s.post("/v1/chat/completions", &chat("hi", 60)), 400);
    assert_eq!(err["param"], "max_tokens", "{err}");
    assert!(err["message"].as_str().unwrap().contains("at most 48"), "{err}");
    // Each of these choices fits alone (4 prompt tokens + 30 reserve 48), not both at once.
    assert_eq!(s.post("/v1/chat/completions", &chat("hi", 30)).status(), 200);
    let mut two = chat("hi", 30);
    two["n"] = json!(2);
    assert_eq!(expect_error(s.post("/v1/chat/completions", &two), 400)["param"], "max_tokens");
    // The pool is cut into blocks of 16; a finished request's blocks go back on the worker's
    // next turn, just after the answer went out.
    let page = s.get("/metrics").text().unwrap();
    assert_eq!(sample(&page, "phi_serve_kv_cache_blocks_total"), 3.0, "{page}");
    settles_to(&s, "phi_serve_kv_cache_blocks_used", 0.0);

    // Three requests at once that each grow to two or three blocks: the pool cannot hold them
    // together, so the newest are preempted and resume; each answers what it answers alone.
    let prompts = ["hi", "tell me a story", "why is the sky blue"];
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| s.post("/v1/chat/completions", &chat(p, 30)).json::<Value>().unwrap())
        .collect();
    let tokens: u64 = alone.iter().map(|b| b["usage"]["total_tokens"].as_u64().unwrap()).sum();
    assert!(tokens > 48, "the answers must outgrow the pool together ({tokens} tokens)");
    let base = s.base.clone();
    let together: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let (base, body) = (base.clone(), chat(p, 30));
            thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let res = client.post(format!("{base}/v1/chat/completions")).json(&body).send();
                res.unwrap().json::<Value>().unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for (a, body) in alone.iter().zip(&together) {
        let (a, t) = (&a["choices"][0], &body["choices"][0]);
        assert_eq!(a["message"]["content"], t["message"]["content"], "{body}");
        assert_eq!(a["finish_reason"], t["finish_reason"]);
    }
    let page = s.get("/metrics").text().unwrap();
    assert!(sample(&page, "phi_serve_preemptions_total") >= 1.0, "{page}");
    settles_to(&s, "phi_serve_kv_cache_blocks_used", 0.0);
}

/// Waits (up to 10 s) for the gauge `name` to read `want`.
fn settles_to(s: &Server, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = s.get("/metrics").text().unwrap();
        if sample(&page, name) == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never reached {want}:\n{page}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn json_log_lines_for_log_shippers() {
    let s = Server::start_opts(Options {
        args: &["--log-format", "json"],
        env: &[("RUST_LOG", "phi_server::access=info")],
        capture_stderr: true,
        ..Options::default()
    });
    let res = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-ms-client-request-id", "json-1")
        .json(&chat("hi", 2))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let line = log_line(&s, &["json-1"]);
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["target"], "phi_server::access", "{v}");
    let f = &v["fields"];
    assert_eq!(f["request_id"], "json-1", "{v}");
    assert_eq!(f["status"], 200, "{v}");
    assert_eq!(f["path"], "/v1/chat/completions", "{v}");
    assert!(f["completion_tokens"].as_u64().unwrap() >= 1, "{v}");
    assert!(f["duration_ms"].as_f64().is_some(), "{v}");
}

#[test]
fn request_deadline_ends_running_and_expires_waiting_requests() {
    // Each step takes 1.5 s, longer than the 1 s deadline: the running request is cut after
    // its first step, and one waiting behind it is past its deadline when the batch frees up.
    let s = Server::start(&[
        "--request-timeout-secs",
        "1",
        "--step-delay-ms",
        "1500",
        "--max-batch-size",
        "1",
    ]);
    let mut long = chat("Tell me a story", 60);
    long["stop"] = json!([]);
    let base = s.base.clone();
    let second = {
        let body = streaming(long.clone());
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            let client = reqwest::blocking::Client::new();
            let res = client.post(format!("{base}/v1/chat/completions")).json(&body).send();
            String::from_utf8(res.unwrap().bytes().unwrap().to_vec()).unwrap()
        })
    };
    let started = Instant::now();
    let body: Value = s.post("/v1/chat/completions", &long).json().unwrap();
    let took = started.elapsed();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{body}");
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens < 60, "ended by the deadline, not max_tokens: {body}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "{took:?}");

    // The waiting stream: its 200 headers went out at once, so the 503 comes as an error event.
    let text = second.join().unwrap();
    let events = sse_events(text.as_bytes());
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap_or(Value::Null);
    assert_eq!(last["error"]["code"], "service_unavailable", "{text}");
    assert_eq!(last["error"]["status"], 503, "{text}");
    assert!(!text.contains("[DONE]"));
}

#[test]
fn config_file_with_flags_and_environment_above_it() {
    let dir = std::env::temp_dir().join(format!("phi-serve-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("phi-serve.toml");
    std::fs::write(
        &file,
        "served-model-name = \"from-file\"\nmax_batch_size = 2\n\
         cors-allow-origin = [\"https://file.example\"]\nallow-unauthenticated = false\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let origin_allowed = |s: &Server, origin: &str| {
        let res = s.client.get(s.url("/v1/models")).header("origin", origin).send().unwrap();
        res.headers().get("access-control-allow-origin").is_some()
    };

    let s = Server::start(&["--config", path]);
    let info: Value = s.get("/info").json().unwrap();
    assert_eq!(info["model_name"], "from-file");
    assert!(origin_allowed(&s, "https://file.example"));
    drop(s);

    // The command line beats the file, and so does the environment.
    let s = Server::start_with_env(
        &["--config", path, "--served-model-name", "from-flag"],
        &[("PHI_SERVE_CORS_ALLOW_ORIGINS", "https://env.example")],
    );
    let info: Value = s.get("/info").json().unwrap();
    assert_eq!(info["model_name"], "from-flag");
    assert!(origin_allowed(&s, "https://env.example"));
    assert!(!origin_allowed(&s, "https://file.example"));
    drop(s);

    // The environment can name the file too.
    let s = Server::start_with_env(&[], &[("PHI_SERVE_CONFIG", path)]);
    assert_eq!(s.get("/info").json::<Value>().unwrap()["model_name"], "from-file");
    drop(s);

    // A wrong setting fails at start-up, naming it.
    for (content, message) in [
        ("max-batch-sise = 2\n", "unknown setting `max-batch-sise`"),
        ("max-queue = \"many\"\n", "--max-queue"),
        ("allow-unauthenticated = \"yes\"\n", "`allow-unauthenticated` is a switch"),
    ] {
        std::fs::write(&file, content).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_phi-serve"))
            .args(["serve", "--model", MODEL, "--port", "0", "--config", path])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{content}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{content}: {stderr}");
        assert!(out.stdout.is_empty(), "{content}: it listened");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `ENV` settings, `ENTRYPOINT`, `HEALTHCHECK` path and `STOPSIGNAL` of a Dockerfile under
/// `docker/`, read from the file itself so that this test follows the image.
struct ImageConfig {
    env: Vec<(String, String)>,
    entrypoint: Vec<String>,
    health_path: String,
    stop_signal: String,
}

fn image_config(dockerfile: &str) -> ImageConfig {
    let path = format!("{}/../../docker/{dockerfile}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    // Join continuation lines into one instruction each, without comments.
    let mut instructions: Vec<String> = Vec::new();
    let mut continued = false;
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let body = line.strip_suffix('\\').unwrap_or(line).trim();
        if continued {
            let last = instructions.last_mut().unwrap();
            last.push(' ');
            last.push_str(body);
        } else {
            instructions.push(body.to_string());
        }
        continued = line.ends_with('\\');
    }
    // The runtime stage: everything after the last FROM.
    let start = instructions.iter().rposition(|i| i.starts_with("FROM ")).unwrap();
    let stage = &instructions[start..];
    let find = |name: &str| {
        stage
            .iter()
            .filter_map(|i| i.strip_prefix(name))
            .map(|rest| rest.trim().to_string())
            .collect::<Vec<_>>()
    };
    let env = find("ENV ")
        .iter()
        .flat_map(|e| e.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("ENV {kv} is not KEY=VALUE"));
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect();
    let entrypoint: Vec<String> = serde_json::from_str(&find("ENTRYPOINT ")[0]).unwrap();
    let health = find("HEALTHCHECK ").pop().expect("a HEALTHCHECK");
    let url = health.split_whitespace().find(|w| w.starts_with("http://")).unwrap();
    let health_path = format!("/{}", url.splitn(4, '/').nth(3).unwrap());
    let stop_signal = find("STOPSIGNAL ").pop().unwrap_or_else(|| "SIGTERM".into());
    ImageConfig { env, entrypoint, health_path, stop_signal }
}

/// Both images' configuration, run outside a container (Docker cannot run here): with the
/// image's environment and entrypoint the server refuses to listen on all interfaces without a
/// key, serves once `PHI_SERVE_API_KEYS` is given (the documented `docker run -e`), answers the
/// HEALTHCHECK's URL without a key, and drains and exits 0 on the STOPSIGNAL.
#[test]
fn the_images_environment_and_entrypoint_work_outside_a_container() {
    for dockerfile in ["Dockerfile", "Dockerfile.cuda"] {
        let image = image_config(dockerfile);
        assert_eq!(image.entrypoint, ["phi-serve", "serve"], "{dockerfile}");
        assert_eq!(image.stop_signal, "SIGTERM", "{dockerfile}");
        let host = image.env.iter().find(|(k, _)| k == "PHI_SERVE_HOST");
        assert_eq!(host.map(|(_, v)| v.as_str()), Some("0.0.0.0"), "{dockerfile}");
        let hf_home = std::env::temp_dir().join(format!("phi-serve-image-{}", std::process::id()));
        let mut env: Vec<(String, String)> = image
            .env
            .iter()
            .map(|(k, v)| match k.as_str() {
                "HF_HOME" => (k.clone(), hf_home.display().to_string()),
                _ => (k.clone(), v.clone()),
            })
            .collect();
        // The CUDA image asks for the GPU: a build without CUDA says so and stops (it never
        // falls back to the CPU); the rest of its configuration is tested on the CPU.
        if let Some(i) = env.iter().position(|(k, _)| k == "PHI_SERVE_DEVICE") {
            let (_, device) = env.remove(i);
            assert_eq!(device, "cuda", "{dockerfile}");
            if !cfg!(feature = "cuda") {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_phi-serve"))
                    .args(["serve", "--model", MODEL, "--port", "0", "--api-key", "k"])
                    .env("PHI_SERVE_DEVICE", &device)
                    .output()
                    .unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success() && stderr.contains("built without CUDA"), "{stderr}");
            }
        }

        // No key: refused, with the reason.
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_phi-serve"));
        cmd.args(&image.entrypoint[1..]).args(["--model", MODEL, "--port", "0"]);
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PHI_SERVE_") {
                cmd.env_remove(var);
            }
        }
        let out = cmd.envs(env.iter().map(|(k, v)| (k, v))).output().unwrap();
        assert!(!out.status.success(), "{dockerfile}: served without a key");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("without an API key"), "{dockerfile}: {stderr}");

        // With a key, as `docker run -e PHI_SERVE_API_KEYS=...` gives it.
        env.push(("PHI_SERVE_API_KEYS".into(), "image-key".into()));
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut s = Server::start_with_env(&[], &pairs);
        assert!(s.base.starts_with("http://0.0.0.0:"), "{dockerfile}: listens on {}", s.base);
        let port = s.base.rsplit(':').next().unwrap().to_string();
        let probe = format!("http://127.0.0.1:{port}{}", image.health_path);
        assert_eq!(s.client.get(&probe).send().unwrap().status(), 200, "{dockerfile}");
        assert_eq!(s.get("/v1/models").status(), 401, "{dockerfile}: keys not applied");
        sigterm(&s);
        assert!(wait_exit(&mut s, Duration::from_secs(30)).success(), "{dockerfile}");
        let _ = std::fs::remove_dir_all(&hf_home);
    }
}
