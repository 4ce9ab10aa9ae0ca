//! The forward pass against Hugging Face transformers: logits and greedy continuations that
//! `models/make_tiny_models.py` recorded from `Phi3ForCausalLM` (float32, eager attention) for
//! each tiny checkpoint variant.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use phi_engine::checkpoint::ModelSource;
use phi_engine::config::Phi3Config;
use phi_engine::phi3::{BatchItem, Phi3};
use serde_json::Value;

const VARIANTS: &[&str] = &["phi3-mini-4k", "phi3-medium-4k", "phi3-mini-128k", "phi4-mini"];
const LOGIT_TOL: f32 = 1e-4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(variant: &str) -> Phi3 {
    let dir = root().join("models/tiny").join(variant);
    let files = ModelSource::parse(dir.to_str().unwrap(), None).unwrap().resolve().unwrap();
    Phi3::from_checkpoint(&files, DType::F32, &Device::Cpu).unwrap()
}

fn reference(variant: &str) -> (Value, std::collections::HashMap<String, Tensor>) {
    let dir = root().join("crates/engine/tests/reference").join(variant);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let logits =
        candle_core::safetensors::load(dir.join("logits.safetensors"), &Device::Cpu).unwrap();
    (json, logits)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|x| ((x - m) as f64).exp()).sum::<f64>().ln() as f32 + m;
    row.iter().map(|x| x - lse).collect()
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

/// One recorded logits case: its name, input ids, the recorded positions and their logits.
struct LogitsCase {
    name: String,
    input: Vec<u32>,
    positions: Vec<usize>,
    want: Vec<Vec<f32>>,
    factors: String,
}

fn logits_cases(variant: &str) -> Vec<LogitsCase> {
    let (json, logits) = reference(variant);
    json["logits_cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let name = case["name"].as_str().unwrap().to_string();
            LogitsCase {
                input: ids(&case["input_ids"]),
                positions: case["positions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_u64().unwrap() as usize)
                    .collect(),
                want: logits[&format!("logits.{name}")].to_vec2::<f32>().unwrap(),
                factors: case["rope_factors"].as_str().unwrap_or("short").to_string(),
                name,
            }
        })
        .collect()
}

/// Logits of every position of `input`, from an empty cache in one pass.
fn all_logits(model: &Phi3, input: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache().unwrap();
    let out = model
        .forward(&mut [BatchItem {
            tokens: input,
            cache: &mut cache,
            max_new_tokens: None,
            all_logits: true,
        }])
        .unwrap();
    out.logits.to_vec2::<f32>().unwrap()
}

#[test]
fn logits_match_transformers() {
    for variant in VARIANTS {
        let model = load(variant);
        for case in logits_cases(variant) {
            let got = all_logits(&model, &case.input);
            assert_eq!(got.len(), case.input.len());
            for (row, &p) in case.want.iter().zip(&case.positions) {
                let d = max_abs_diff(&got[p], row);
                assert!(d < LOGIT_TOL, "{variant}/{} position {p}: max |diff| {d}", case.name);
            }
        }
    }
}

/// Greedy decoding with the KV cache, one token per step, as `generate(do_sample=False)` does.
fn greedy(model: &Phi3, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut tokens = prompt.to_vec();
    let mut cache = model.new_cache().unwrap();
    let mut rows = Vec::new();
    for _ in 0..n {
        let out = model
            .forward(&mut [BatchItem {
                tokens: &tokens,
                cache: &mut cache,
                max_new_tokens: None,
                all_logits: false,
            }])
            .unwrap();
        let row = out.logits.to_vec2::<f32>().unwrap().remove(0);
        tokens.push(argmax(&row));
        rows.push(row);
    }
    (tokens[prompt.len()..].to_vec(), rows)
}

#[test]
fn greedy_continuations_and_logprobs_match_transformers() {
    for variant in VARIANTS {
        let model = load(variant);
        let (json, _) = reference(variant);
        for case in json["greedy_cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["generated_ids"]);
            let (got, rows) = greedy(&model, &prompt, want.len());
            assert_eq!(got, want, "{variant}/{name}: greedy tokens differ");
            for (step, row) in rows.iter().enumerate() {
                let lp = log_softmax(row);
                let want_lp = case["logprobs"][step].as_f64().unwrap() as f32;
                assert!(
                    (lp[got[step] as usize] - want_lp).abs() < LOGIT_TOL,
                    "{variant}/{name} step {step} logprob"
                );
                for alt in case["top_logprobs"][step].as_array().unwrap() {
                    let id = alt[0].as_u64().unwrap() as usize;
                    let want = alt[1].as_f64().unwrap() as f32;
                    assert!(
                        (lp[id] - want).abs() < LOGIT_TOL,
                        "{variant}/{name} step {step} top logprob of {id}"
                    );
                }
            }
        }
    }
}

/// Every greedy case of a variant decoded together in one ragged batch gives the same tokens as
/// each alone: sequences of different lengths (and LongRoPE factor sets) share each forward pass.
#[test]
fn ragged_batch_matches_single_sequences() {
    for variant in VARIANTS {
        let model = load(variant);
        let (json, _) = reference(variant);
        let cases = json["greedy_cases"].as_array().unwrap();
        let mut seqs: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
        let wants: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["generated_ids"])).collect();
        let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache().unwrap()).collect();
        let steps = wants.iter().map(Vec::len).max().unwrap();
        for step in 0..steps {
            let active: Vec<usize> = (0..seqs.len()).filter(|&i| step < wants[i].len()).collect();
            let mut items: Vec<BatchItem> = Vec::new();
            for (i, (tokens, cache)) in seqs.iter().zip(caches.iter_mut()).enumerate() {
                if active.contains(&i) {
                    items.push(BatchItem {
                        tokens,
                        cache,
                        max_new_tokens: None,
                        all_logits: false,
                    });
                }
            }
            let out = model.forward(&mut items).unwrap();
            let logits = out.logits.to_vec2::<f32>().unwrap();
            drop(items);
            for (row, &i) in out.rows.iter().zip(&active) {
                seqs[i].push(argmax(&logits[row.end - 1]));
            }
        }
        for (i, case) in cases.iter().enumerate() {
            let prompt_len = ids(&case["prompt_ids"]).len();
            assert_eq!(seqs[i][prompt_len..], wants[i][..], "{variant}/{}", case["name"]);
        }
    }
}

/// Chunked prefill (the prompt fed a few tokens per call) gives the same logits as one pass.
#[test]
fn chunked_prefill_matches_single_pass() {
    let model = load("phi3-mini-4k");
    let (json, logits) = reference("phi3-mini-4k");
    for case in json["logits_cases"].as_array().unwrap() {
        let input = ids(&case["input_ids"]);
        let name = case["name"].as_str().unwrap();
        let last = case["positions"].as_array().unwrap().last().unwrap();
        let last = last.as_u64().unwrap() as usize;
        let want = logits[&format!("logits.{name}")].to_vec2::<f32>().unwrap().pop().unwrap();
        let mut cache = model.new_cache().unwrap();
        let mut row = Vec::new();
        while cache.len() < input.len() {
            let out = model
                .forward(&mut [BatchItem {
                    tokens: &input[..=last],
                    cache: &mut cache,
                    max_new_tokens: Some(5),
                    all_logits: false,
                }])
                .unwrap();
            row = out.logits.to_vec2::<f32>().unwrap().remove(0);
            if cache.len() == last + 1 {
                break;
            }
        }
        assert!(max_abs_diff(&row, &want) < LOGIT_TOL, "{name}");
    }
}

#[test]
fn all_config_forms_parse_identically() {
    let dir = root().join("models/tiny");
    for variant in ["phi3-mini-128k", "phi4-mini"] {
        let new = Phi3Config::from_file(&dir.join(variant).join("config.json")).unwrap();
        let legacy = Phi3Config::from_file(&dir.join(variant).join("config.legacy.json")).unwrap();
        assert_eq!(new, legacy, "{variant}");
    }
    let su = Phi3Config::from_file(&dir.join("phi3-mini-128k/config.legacy-su.json")).unwrap();
    assert_eq!(su, Phi3Config::from_file(&dir.join("phi3-mini-128k/config.json")).unwrap());
}

#[test]
fn broken_checkpoints_fail_with_the_file_and_the_problem() {
    let tmp = std::env::temp_dir().join(format!("phi-broken-{}", std::process::id()));
    let src = root().join("models/tiny/phi3-mini-4k");
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    let resolve = || ModelSource::parse(tmp.to_str().unwrap(), None).unwrap().resolve();
    // A config whose hidden size disagrees with the tensors.
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 64.into();
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    let err = Phi3::from_checkpoint(&resolve().unwrap(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("model.embed_tokens.weight")
            && err.contains("shape"),
        "{err}"
    );
    // A missing weights file.
    std::fs::remove_file(tmp.join("model.safetensors")).unwrap();
    let err = resolve().unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // A truncated weights file.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let err = Phi3::from_checkpoint(&resolve().unwrap(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// bf16 weights and activations (the GPU default) stay close to the float32 reference: the
/// logits stay within bf16's precision of the reference (5% of the largest logit), and
/// the argmax agrees wherever the reference's top-2 margin is larger than that error.
#[test]
fn bf16_tracks_the_reference() {
    for variant in VARIANTS {
        let dir = root().join("models/tiny").join(variant);
        let files = ModelSource::parse(dir.to_str().unwrap(), None).unwrap().resolve().unwrap();
        let model = Phi3::from_checkpoint(&files, DType::BF16, &Device::Cpu).unwrap();
        for case in logits_cases(variant) {
            let name = &case.name;
            let got = all_logits(&model, &case.input);
            for (row, &p) in case.want.iter().zip(&case.positions) {
                let d = max_abs_diff(&got[p], row);
                // bf16 keeps 8 significant bits: allow 5% of the row's largest logit.
                let tol = 0.05 * row.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(d < tol, "{variant}/{name} position {p}: bf16 max |diff| {d} > {tol}");
                let mut sorted = row.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] > 2.0 * tol {
                    assert_eq!(
                        argmax(&got[p]),
                        argmax(row),
                        "{variant}/{name} position {p}: bf16 argmax"
                    );
                }
            }
        }
    }
}

/// `AlwaysLong` (vLLM's choice) uses the long factors from the first token: it reproduces the
/// reference wherever transformers also uses them (prompts past the original context) and
/// departs from it on short prompts, which is why `Dynamic` is the default.
#[test]
fn always_long_policy_uses_long_factors_everywhere() {
    use phi_engine::rope::LongRopePolicy;
    let mut model = load("phi3-mini-128k");
    model.set_long_rope_policy(LongRopePolicy::AlwaysLong);
    for case in logits_cases("phi3-mini-128k") {
        // The last position is always among the recorded ones.
        let got = all_logits(&model, &case.input).pop().unwrap();
        let d = max_abs_diff(&got, case.want.last().unwrap());
        if case.factors == "long" {
            assert!(d < LOGIT_TOL, "{}: {d}", case.name);
        } else {
            assert!(
                d > 1e-2,
                "{}: short-factor reference reproduced with long factors ({d})",
                case.name
            );
        }
    }
}
