//! The harness of the binary-level tests: starts the real `phi-serve serve` on the bundled tiny
//! model with `--port 0`, reads the bound address from its stdout, and holds helpers that check
//! the wire shapes the SDKs depend on.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};

/// The bundled tiny checkpoint.
pub const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny/phi3-mini-4k");

/// The line `phi-serve serve` prints once the model is loaded and requests are served.
pub const LISTENING: &str = "phi-serve listening on ";
/// The line it prints as soon as it listens, before the model is loaded.
pub const LOADING: &str = "phi-serve loading the model, answering 503 on ";

/// A running `phi-serve serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub client: Client,
    /// Its stdout lines after the one that gave the address.
    pub stdout: mpsc::Receiver<String>,
    /// Its stderr lines, when started with [`Options::capture_stderr`].
    pub stderr: Option<mpsc::Receiver<String>>,
}

/// How [`Server::start_opts`] starts the binary.
#[derive(Default)]
pub struct Options<'a> {
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// Pipe stderr (the log) to [`Server::stderr`] instead of the test's own stderr.
    pub capture_stderr: bool,
    /// Return as soon as the server listens, before the model is loaded.
    pub while_loading: bool,
    /// The model folder, instead of the bundled [`MODEL`].
    pub model: Option<&'a str>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_opts(Options { args, env, ..Options::default() })
    }

    pub fn start_opts(o: Options) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_phi-serve"));
        cmd.args(["serve", "--model", o.model.unwrap_or(MODEL), "--port", "0"]).args(o.args);
        // Every flag reads a PHI_SERVE_* variable: none may leak in from the developer's shell.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PHI_SERVE_") {
                cmd.env_remove(var);
            }
        }
        // The per-request log lines would drown the test output.
        cmd.env("RUST_LOG", "warn");
        cmd.envs(o.env.iter().copied()).stdout(Stdio::piped());
        cmd.stderr(if o.capture_stderr { Stdio::piped() } else { Stdio::inherit() });
        let mut child = cmd.spawn().expect("start phi-serve");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = child.stderr.take().map(lines_of);
        let prefix = if o.while_loading { LOADING } else { LISTENING };
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let base = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match stdout.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix(prefix) {
                        break addr.to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("phi-serve did not print {prefix:?}: {:?}", child.wait());
                }
            }
        };
        let client = Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        Server { child, base, client, stdout, stderr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().unwrap()
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap()
    }

    pub fn health(&self) -> Value {
        self.get("/health").json().unwrap()
    }
}

/// The lines of a child's output, read on a thread.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn chat(prompt: &str, max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
           "temperature": 0})
}

pub fn streaming(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

/// Asserts the error shape and status, and returns the error object.
pub fn expect_error(res: Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status, "{:?}", res.headers());
    let headers = res.headers().clone();
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.contains_key("x-request-id"));
    let body: Value = res.json().unwrap();
    let err = &body["error"];
    for key in ["code", "message", "type", "param", "status"] {
        assert!(err.get(key).is_some(), "missing {key} in {body}");
    }
    assert_eq!(err["status"], status);
    assert_eq!(headers["x-ms-error-code"].to_str().unwrap(), err["code"].as_str().unwrap());
    err.clone()
}

/// Splits an SSE body into its events, asserting the framing the azure parser needs: LF only,
/// every event exactly one `data: ` line followed by a blank line.
pub fn sse_events(bytes: &[u8]) -> Vec<String> {
    assert!(!bytes.contains(&b'\r'), "CR in the stream");
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(text.ends_with("\n\n"), "stream does not end with a blank line: {text:?}");
    text[..text.len() - 2]
        .split("\n\n")
        .map(|event| {
            assert!(!event.contains('\n'), "multi-line event {event:?}");
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {event:?}"))
                .to_string()
        })
        .collect()
}

/// The JSON chunks of a stream that ended with `[DONE]`.
pub fn parse_chunks(bytes: &[u8]) -> Vec<Value> {
    let events = sse_events(bytes);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

pub fn content_of(chunks: &[Value], index: usize) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .filter(|c| c["index"] == index)
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect()
}
