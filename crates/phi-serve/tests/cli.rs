//! Runs the real `phi-serve` binary on the bundled tiny checkpoint and compares its output with
//! the transformers reference continuation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use phi_engine::tokenizer::PhiTokenizer;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    root().join("models/tiny/phi3-mini-4k")
}

/// The binary with no `PHI_SERVE_*` or Hugging Face settings inherited from the environment.
fn phi_serve() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phi-serve"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("PHI_SERVE_") || key.starts_with("HF_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn generate(args: &[&str]) -> Output {
    let mut cmd = phi_serve();
    cmd.arg("generate").arg("--model").arg(tiny()).args(args);
    cmd.output().expect("phi-serve runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// A reference greedy case of phi3-mini-4k: (prompt ids, generated ids).
fn reference_case(name: &str) -> (Vec<u32>, Vec<u32>) {
    let path = root().join("crates/engine/tests/reference/phi3-mini-4k/reference.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = json["greedy_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    (ids(&case["prompt_ids"]), ids(&case["generated_ids"]))
}

/// What `generated` adds to the text of `prompt_ids` as transformers decodes the whole sequence
/// (the first token keeps its leading space): what `generate --raw` prints.
fn continuation(tok: &PhiTokenizer, prompt_ids: &[u32], generated: &[u32]) -> String {
    let all: Vec<u32> = prompt_ids.iter().chain(generated).copied().collect();
    let (full, head) = (tok.decode(&all, true).unwrap(), tok.decode(prompt_ids, true).unwrap());
    full.strip_prefix(head.as_str()).expect("the prompt's text comes first").to_string()
}

fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "phi-serve-cli-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_speed_line(stderr: &str, prompt_tokens: usize, generated: usize, finish: &str) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("prompt: "))
        .unwrap_or_else(|| panic!("no speed line in {stderr:?}"));
    assert!(line.contains(&format!("prompt: {prompt_tokens} tokens in ")), "{line}");
    assert!(line.contains(&format!("generation: {generated} tokens in ")), "{line}");
    assert!(line.contains(&format!("finish: {finish}")), "{line}");
    assert_eq!(line.matches("tokens/s").count(), 2, "{line}");
}

#[test]
fn raw_greedy_generation_prints_the_reference_continuation() {
    // The "chat" case's prompt, spelled as text: decoding and re-encoding gives the same ids, so
    // `--raw` feeds the model exactly the reference prompt.
    let (prompt_ids, generated) = reference_case("chat");
    let tok = PhiTokenizer::from_dir(tiny()).unwrap();
    let prompt = tok.decode(&prompt_ids, false).unwrap();
    assert_eq!(tok.encode(&prompt).unwrap(), prompt_ids, "{prompt:?} round-trips");
    let want = continuation(&tok, &prompt_ids, &generated[..8]);
    assert!(!want.is_empty());

    let out = generate(&[
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--raw",
        "--prompt",
        &prompt,
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout), format!("{want}\n"));
    assert_speed_line(&stderr, prompt_ids.len(), 8, "length");
}

#[test]
fn chat_greedy_generation_uses_the_template_and_matches_the_reference() {
    // The "chat" case's prompt is the template's rendering of this system + user conversation.
    let (prompt_ids, generated) = reference_case("chat");
    let tok = PhiTokenizer::from_dir(tiny()).unwrap();
    let want = tok.decode(&generated[..12], true).unwrap();
    let out = generate(&[
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--system",
        "You are a helpful assistant.",
        "--prompt",
        "Write a short haiku about the sea and the moon.",
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout), format!("{want}\n"));
    assert_speed_line(&stderr, prompt_ids.len(), 12, "length");

    // A stop string cuts the answer and ends with finish: stop.
    assert!(want.is_char_boundary(want.len() / 2) && want.is_char_boundary(want.len() / 2 + 3));
    let stop = &want[want.len() / 2..want.len() / 2 + 3];
    let cut = &want[..want.find(stop).unwrap()];
    let out = generate(&[
        "--max-tokens",
        "12",
        "--stop",
        stop,
        "--system",
        "You are a helpful assistant.",
        "--prompt",
        "Write a short haiku about the sea and the moon.",
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout), format!("{cut}\n"), "stop {stop:?}");
    assert!(stderr.contains("finish: stop"), "{stderr}");
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let run = |seed: &str| {
        let out = generate(&[
            "--temperature",
            "0.9",
            "--max-tokens",
            "16",
            "--ignore-eos",
            "--seed",
            seed,
            "--prompt",
            "Tell me about the sea.",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_speed_line(&text(&out.stderr), 9, 16, "length");
        text(&out.stdout)
    };
    let a = run("1234");
    assert!(a.trim().len() > 8, "{a:?}");
    assert_eq!(a, run("1234"), "same seed, same text");
    // A seed that is ignored (entropy) or fixed would make this fail or the above flaky.
    assert_ne!(a, run("99"), "another seed, other text");
}

#[test]
fn missing_models_fail_naming_what_is_missing() {
    // A folder that does not exist.
    let missing = root().join("models/tiny/no-such-model");
    let out =
        phi_serve().args(["generate", "--prompt", "hi", "--model"]).arg(&missing).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no-such-model") && stderr.contains("no such folder"), "{stderr}");

    // A folder without the model files.
    let empty = scratch_dir("empty-model");
    let out =
        phi_serve().args(["generate", "--prompt", "hi", "--model"]).arg(&empty).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing config.json"), "{stderr}");

    // A folder without tokenizer.json.
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(tiny().join(f), empty.join(f)).unwrap();
    }
    let out =
        phi_serve().args(["generate", "--prompt", "hi", "--model"]).arg(&empty).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing tokenizer.json"), "{stderr}");
    std::fs::remove_dir_all(&empty).unwrap();

    // A hub id, offline, with an empty cache.
    let hf_home = scratch_dir("hf-home");
    let out = phi_serve()
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .args(["generate", "--prompt", "hi", "--model", "microsoft/Phi-3-mini-4k-instruct"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("microsoft/Phi-3-mini-4k-instruct") && stderr.contains("config.json"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    std::fs::remove_dir_all(&hf_home).unwrap();
}

#[test]
fn bad_options_fail_with_a_clear_message() {
    if !cfg!(feature = "cuda") {
        let out = generate(&["--device", "cuda", "--prompt", "hi"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("--device cuda") && stderr.contains("without CUDA"), "{stderr}");
    }
    let out = generate(&["--device", "tpu", "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("expected cpu, cuda"), "{}", text(&out.stderr));

    let out = generate(&["--temperature", "3", "--prompt", "hi"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("temperature"), "{stderr}");

    let out = generate(&["--max-tokens", "0", "--prompt", "hi"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("max_tokens"), "{stderr}");

    for (bias, says) in [
        ("7", "ID=BIAS"),
        ("x=1", "token id"),
        ("7=much", "number"),
        ("7=101", "logit_bias"),
        ("32064=1", "logit_bias"),
    ] {
        let out = generate(&["--logit-bias", bias, "--prompt", "hi"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{bias}");
        assert!(stderr.contains(says), "{bias}: {stderr}");
    }
    let out = generate(&["--logit-bias", "7=1", "--logit-bias", "7=2", "--prompt", "hi"]);
    assert!(text(&out.stderr).contains("twice"), "{}", text(&out.stderr));
}

#[test]
fn logit_bias_forces_and_bans_tokens() {
    let tok = PhiTokenizer::from_dir(tiny()).unwrap();
    let hello = tok.token_to_id("\u{2581}hello").unwrap();
    let args = ["--temperature", "0", "--max-tokens", "3", "--ignore-eos", "--raw"];
    let forced = format!("{hello}=100");
    let out =
        generate(&[&args[..], &["--logit-bias", &forced, "--prompt", "Once upon a"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), " hello hello hello\n");
    // Banning the reference's greedy first token: the text no longer starts with it.
    let (prompt_ids, generated) = reference_case("chat");
    let prompt = tok.decode(&prompt_ids, false).unwrap();
    let args = ["--temperature", "0", "--max-tokens", "1", "--ignore-eos", "--raw"];
    let first = |bias: &str| {
        let out = generate(&[&args[..], &["--logit-bias", bias, "--prompt", &prompt]].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let greedy = first(&format!("{}=0", generated[0]));
    let banned = first(&format!("{}=-100", generated[0]));
    assert_eq!(greedy, format!("{}\n", continuation(&tok, &prompt_ids, &generated[..1])));
    assert_ne!(banned, greedy);
}

#[test]
fn help_lists_the_flags() {
    let out = phi_serve().arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("generate"));

    let out = phi_serve().args(["generate", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "--model",
        "--revision",
        "--prompt",
        "--system",
        "--raw",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--presence-penalty",
        "--frequency-penalty",
        "--seed",
        "--stop",
        "--logit-bias",
        "--ignore-eos",
        "--device",
        "--dtype",
        "--system-role",
        "--long-rope",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    for value in ["to-user", "bf16", "always-long"] {
        assert!(help.contains(value), "{value} missing from:\n{help}");
    }
}

/// `phi-serve quantize` writes a GGUF file that `generate` runs as a complete model: from the
/// float32 file, the reference continuation; bad requests fail with a reason and no file.
#[test]
fn quantize_writes_a_gguf_model_that_generates_the_reference() {
    let dir = scratch_dir("quantize");
    let out_file = dir.join("tiny-f32.gguf");
    let run = |args: &[&str]| {
        let mut cmd = phi_serve();
        cmd.arg("quantize").arg("--model").arg(tiny()).args(args);
        cmd.output().unwrap()
    };
    let out = run(&["--type", "f32", "--out", out_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("wrote {}", out_file.display())));

    let (prompt_ids, generated) = reference_case("chat");
    let tok = PhiTokenizer::from_dir(tiny()).unwrap();
    let prompt = tok.decode(&prompt_ids, false).unwrap();
    let want = continuation(&tok, &prompt_ids, &generated[..8]);
    let out = phi_serve()
        .arg("generate")
        .arg("--model")
        .arg(&out_file)
        .args(["--temperature", "0", "--max-tokens", "8", "--ignore-eos", "--raw"])
        .args(["--prompt", &prompt])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{want}\n"));

    // The file exists: refused without --force.
    let out = run(&["--type", "q8_0", "--out", out_file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--force"), "{}", text(&out.stderr));

    // An unknown format names the ones there are.
    let other = dir.join("x.gguf");
    let out = run(&["--type", "q7_0", "--out", other.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("q4_k_m"), "{}", text(&out.stderr));
    assert!(!other.exists());

    // A GGUF model is not quantized again at load.
    let out = phi_serve()
        .arg("generate")
        .arg("--model")
        .arg(&out_file)
        .args(["--quantize", "q4_0", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--quantize applies to safetensors"),
        "{}",
        text(&out.stderr)
    );
}
