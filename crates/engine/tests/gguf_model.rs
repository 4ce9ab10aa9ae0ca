//! GGUF files against the transformers reference: every tiny checkpoint converted to a float32
//! GGUF file by `phi-serve quantize` must load back with the same hyper-parameters, tokenizer
//! and chat template, and give the logits and greedy tokens that `Phi3ForCausalLM` recorded
//! (`crates/engine/tests/reference`). Broken files fail with a message, not a panic.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use phi_engine::chat_template::ChatMessage;
use phi_engine::checkpoint::ModelSource;
use phi_engine::config::{Phi3Config, RopeScaling};
use phi_engine::engine::{Engine, LoadOptions};
use phi_engine::gguf::GgufFile;
use phi_engine::phi3::{BatchItem, Phi3};
use phi_engine::quantize::{quantize_checkpoint, QuantScheme};
use serde_json::Value;

const VARIANTS: &[&str] = &["phi3-mini-4k", "phi3-medium-4k", "phi3-mini-128k", "phi4-mini"];
const LOGIT_TOL: f32 = 1e-4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A path in cargo's scratch folder for integration tests (`target/tmp`): files are
/// overwritten by the next run instead of piling up in the system's temp folder.
fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gguf-model");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The variant's folder and a GGUF conversion of it, in a file of the `test`'s own: tests run
/// in parallel, and two writing one file read each other's half-written output.
fn convert(test: &str, variant: &str, scheme: &str) -> (PathBuf, PathBuf) {
    let dir = root().join("models/tiny").join(variant);
    let files = ModelSource::parse(dir.to_str().unwrap(), None).unwrap().resolve().unwrap();
    let out = tmp(&format!("{test}-{variant}-{scheme}.gguf"));
    quantize_checkpoint(&files, QuantScheme::parse(scheme).unwrap(), &out).unwrap();
    (dir, out)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

fn forward_all(model: &Phi3, input: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache().unwrap();
    let item =
        BatchItem { tokens: input, cache: &mut cache, max_new_tokens: None, all_logits: true };
    model.forward(&mut [item]).unwrap().logits.to_vec2::<f32>().unwrap()
}

fn greedy(model: &Phi3, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    let mut cache = model.new_cache().unwrap();
    for _ in 0..n {
        let item = BatchItem {
            tokens: &tokens,
            cache: &mut cache,
            max_new_tokens: None,
            all_logits: false,
        };
        let out = model.forward(&mut [item]).unwrap();
        tokens.push(argmax(&out.logits.to_vec2::<f32>().unwrap()[0]));
    }
    tokens[prompt.len()..].to_vec()
}

/// The hyper-parameters that GGUF metadata carries equal those of config.json (LongRoPE factors
/// to float32 precision, which is what the file stores).
fn assert_same_config(variant: &str, got: &Phi3Config, want: &Phi3Config) {
    let strip = |c: &Phi3Config| {
        let mut c = c.clone();
        c.rope_scaling = RopeScaling::None;
        c.eos_token_ids.clear();
        c.bos_token_id = None;
        c.rms_norm_eps = c.rms_norm_eps as f32 as f64;
        c.rope_theta = c.rope_theta as f32 as f64;
        c
    };
    assert_eq!(strip(got), strip(want), "{variant}: hyper-parameters differ");
    match (&got.rope_scaling, &want.rope_scaling) {
        (RopeScaling::None, RopeScaling::None) => {}
        (
            RopeScaling::LongRope { short_factor: gs, long_factor: gl, attention_factor: ga },
            RopeScaling::LongRope { short_factor: ws, long_factor: wl, attention_factor: wa },
        ) => {
            let close = |a: &[f64], b: &[f64]| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (*x as f32) == (*y as f32))
            };
            assert!(close(gs, ws) && close(gl, wl), "{variant}: LongRoPE factors differ");
            assert!((ga - wa).abs() < 1e-6, "{variant}: attention factor {ga} vs {wa}");
        }
        (g, w) => panic!("{variant}: rope scaling {g:?} vs {w:?}"),
    }
}

#[test]
fn float32_gguf_matches_transformers() {
    for variant in VARIANTS {
        let (dir, path) = convert("f32", variant, "f32");
        let file = GgufFile::open(&path).unwrap();
        let want_cfg = Phi3Config::from_file(&dir.join("config.json")).unwrap();
        assert_same_config(variant, &file.config().unwrap(), &want_cfg);
        let model = Phi3::from_gguf(&file, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.quantization(), None, "{variant}: f32 matrices run dense");

        let ref_dir = root().join("crates/engine/tests/reference").join(variant);
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(ref_dir.join("reference.json")).unwrap())
                .unwrap();
        let logits =
            candle_core::safetensors::load(ref_dir.join("logits.safetensors"), &Device::Cpu)
                .unwrap();
        for case in json["logits_cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let got = forward_all(&model, &ids(&case["input_ids"]));
            let want = logits[&format!("logits.{name}")].to_vec2::<f32>().unwrap();
            for (row, p) in want.iter().zip(case["positions"].as_array().unwrap()) {
                let p = p.as_u64().unwrap() as usize;
                let d = got[p].iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(d < LOGIT_TOL, "{variant}/{name} position {p}: max |diff| {d}");
            }
        }
        for case in json["greedy_cases"].as_array().unwrap() {
            let want = ids(&case["generated_ids"]);
            let got = greedy(&model, &ids(&case["prompt_ids"]), want.len());
            assert_eq!(got, want, "{variant}/{}: greedy tokens differ", case["name"]);
        }
    }
}

/// A GGUF file is a complete model: its tokenizer and chat template, read from the metadata,
/// render and tokenize conversations exactly as the checkpoint's own files do.
#[test]
fn gguf_carries_tokenizer_and_chat_template() {
    let conversations = [
        vec![ChatMessage::user("Hello there! How are you?")],
        vec![
            ChatMessage::system("You are terse."),
            ChatMessage::user("List   three\tcolours,\nplease."),
            ChatMessage::assistant("Red, green, blue."),
            ChatMessage::user("Now in Français: ça va? 日本語 🙂"),
        ],
    ];
    for variant in ["phi3-mini-4k", "phi3-medium-4k", "phi4-mini"] {
        let (dir, path) = convert("metadata", variant, "q8_0");
        let opts = LoadOptions::default();
        let from_dir =
            Engine::load(&ModelSource::parse(dir.to_str().unwrap(), None).unwrap(), &opts).unwrap();
        let from_gguf =
            Engine::load(&ModelSource::parse(path.to_str().unwrap(), None).unwrap(), &opts)
                .unwrap();
        assert!(from_gguf.files().gguf.is_some());
        for conv in &conversations {
            let a = from_dir.encode_chat(conv).unwrap();
            let b = from_gguf.encode_chat(conv).unwrap();
            assert_eq!(a.text, b.text, "{variant}: rendered prompt differs");
            assert_eq!(a.ids, b.ids, "{variant}: prompt ids differ");
        }
        assert_eq!(from_dir.stop_token_ids(), from_gguf.stop_token_ids(), "{variant}: stop ids");
        assert_eq!(
            from_dir.template().resolved_system_role(),
            from_gguf.template().resolved_system_role(),
            "{variant}: system role handling"
        );
    }
}

/// `--quantize` at load time and a GGUF file of the same scheme hold the same blocks: their
/// logits are identical.
#[test]
fn quantizing_at_load_equals_the_gguf_file() {
    let (dir, path) = convert("at_load", "phi4-mini", "q8_0");
    let files = ModelSource::parse(dir.to_str().unwrap(), None).unwrap().resolve().unwrap();
    let scheme = QuantScheme::parse("q8_0").unwrap();
    let in_situ =
        Phi3::from_checkpoint_quantized(&files, DType::F32, &Device::Cpu, Some(scheme)).unwrap();
    let file = Phi3::from_gguf(&GgufFile::open(&path).unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert!(in_situ.quantization().is_some());
    let input: Vec<u32> = (1..40).map(|i| (i * 733) % 32000).collect();
    let (a, b) = (forward_all(&in_situ, &input), forward_all(&file, &input));
    assert!(a == b, "in-situ and file logits differ");
}

#[test]
fn broken_and_foreign_files_are_refused_with_a_reason() {
    let (_, good) = convert("refused", "phi3-mini-4k", "q8_0");
    let bytes = std::fs::read(&good).unwrap();

    // Cut inside the tensor data: the header reads, the tensors do not.
    let cut = tmp("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let err = match GgufFile::open(&cut).and_then(|f| Phi3::from_gguf(&f, DType::F32, &Device::Cpu))
    {
        Ok(_) => panic!("a truncated file loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("truncated.gguf"), "{err}");

    // Not GGUF at all.
    let junk = tmp("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    let err = GgufFile::open(&junk).unwrap_err().to_string();
    assert!(err.contains("not a valid GGUF file"), "{err}");

    // llama.cpp's vocabulary-only Phi-3 file: the right architecture, but no tensors.
    let vocab = root().join("crates/engine/tests/data/llama-cpp-vocab/ggml-vocab-phi-3.gguf");
    let err = GgufFile::open(&vocab).unwrap().config().unwrap_err().to_string();
    assert!(err.contains("token_embd.weight"), "{err}");

    // Another architecture.
    // The key, then its value: a u32 type tag, a u64 length, the 4 bytes "phi3".
    let key = b"general.architecture";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 12;
    assert_eq!(&bytes[at..at + 4], b"phi3");
    let mut other = bytes.clone();
    other[at..at + 4].copy_from_slice(b"qwen");
    let foreign = tmp("foreign.gguf");
    std::fs::write(&foreign, &other).unwrap();
    let err = GgufFile::open(&foreign).unwrap().config().unwrap_err().to_string();
    assert!(err.contains("architecture `qwen`"), "{err}");
}
