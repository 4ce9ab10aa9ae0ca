//! The real binary on a CUDA GPU: without `--device` it picks `cuda:0` and bf16, and greedy
//! completions on the GPU in float32 equal the CPU's. The forward pass itself is compared with
//! the reference in phi-engine's `cuda_parity` test.
//!
//! Only built with `--features cuda` (`cargo test -p phi-serve --features cuda --test cuda`);
//! without a usable GPU every test passes after printing `SKIPPED: no CUDA device`.
#![cfg(feature = "cuda")]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Whether a GPU is usable (candle's `cuda_is_available()` only says the build has CUDA, so
/// the device is opened); says the test was skipped when not. Written straight to stderr:
/// libtest captures `eprintln!` of passing tests, not direct writes.
fn have_gpu(test: &str) -> bool {
    match candle_core::Device::new_cuda(0) {
        Ok(_) => true,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{test}: SKIPPED: no CUDA device (cuda:0: {e})");
            false
        }
    }
}

/// The first line of the server's log (captured) that contains `needle`.
fn log_line(s: &Server, needle: &str) -> String {
    let stderr = s.stderr.as_ref().expect("started with capture_stderr");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = stderr.recv_timeout(left).unwrap_or_else(|_| panic!("no log line {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn content(s: &Server, prompt: &str, max_tokens: u32) -> String {
    let res: Value = s.post("/v1/chat/completions", &chat(prompt, max_tokens)).json().unwrap();
    res["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{res}")).to_string()
}

#[test]
fn picks_cuda_and_bf16_by_default() {
    if !have_gpu("picks_cuda_and_bf16_by_default") {
        return;
    }
    let s = Server::start_opts(Options {
        env: &[("RUST_LOG", "phi_engine=info")],
        capture_stderr: true,
        ..Options::default()
    });
    let line = log_line(&s, "model loaded");
    assert!(line.contains("BF16"), "not bf16 by default on a GPU: {line}");
    assert!(!content(&s, "hi", 8).is_empty());
}

#[test]
fn greedy_f32_on_cuda_equals_cpu() {
    if !have_gpu("greedy_f32_on_cuda_equals_cpu") {
        return;
    }
    let cpu = Server::start(&["--device", "cpu", "--dtype", "f32"]);
    let gpu = Server::start(&["--device", "cuda:0", "--dtype", "f32"]);
    for prompt in ["hi", "Tell me a story about a lighthouse keeper.", "1 2 3 4 5 6 7 8"] {
        assert_eq!(content(&gpu, prompt, 24), content(&cpu, prompt, 24), "{prompt:?}");
    }
    // Several streams batched together on the GPU give what each gives alone.
    let alone = content(&gpu, "hi", 24);
    let (client, url) = (&gpu.client, gpu.url("/v1/chat/completions"));
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let res: Value =
                        client.post(&url).json(&chat("hi", 24)).send().unwrap().json().unwrap();
                    res["choices"][0]["message"]["content"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(together.iter().all(|c| *c == alone), "{together:?} vs {alone:?}");
}

#[test]
fn bad_gpu_ordinal_is_a_clear_error() {
    if !have_gpu("bad_gpu_ordinal_is_a_clear_error") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_phi-serve"))
        .args(["generate", "--model", MODEL, "--device", "cuda:999", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda:999"), "{err}");
}

/// Without a visible GPU a CUDA build serves on the CPU, saying why, unless `--device cuda`
/// asks for the GPU, which is then an error at start. (Runs wherever the binary starts, i.e.
/// where a `libcuda.so.1` is installed, GPU or not.)
#[test]
fn without_a_visible_gpu_falls_back_to_the_cpu() {
    let s = Server::start_opts(Options {
        env: &[("CUDA_VISIBLE_DEVICES", ""), ("RUST_LOG", "warn")],
        capture_stderr: true,
        ..Options::default()
    });
    log_line(&s, "no usable CUDA device");
    assert!(!content(&s, "hi", 4).is_empty());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_phi-serve"))
        .args(["generate", "--model", MODEL, "--device", "cuda", "--prompt", "hi"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda"), "{err}");
}
