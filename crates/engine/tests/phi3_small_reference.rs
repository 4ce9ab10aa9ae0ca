//! Phi-3-small's forward pass against its reference: logits and greedy continuations that
//! `models/make_tiny_phi3_small.py` recorded from mlx-lm's `phi3small` (float32, one token at a
//! time through its KV cache, cross-checked there by a float64 numpy forward pass) on the tiny
//! checkpoint `models/tiny/phi3-small-8k` (block-sparse layer 0 with 32-token blocks, 2 local
//! blocks and a vertical stride of 4; dense layer 1).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use phi_engine::checkpoint::ModelSource;
use phi_engine::model::Model;
use phi_engine::phi3::BatchItem;
use serde_json::Value;

/// mlx-lm computes in float32 with its own kernels; the logits here are up to ~40 in size.
const LOGIT_TOL: f32 = 2e-3;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(dtype: DType) -> Model {
    let dir = root().join("models/tiny/phi3-small-8k");
    let files = ModelSource::parse(dir.to_str().unwrap(), None).unwrap().resolve().unwrap();
    Model::from_checkpoint_quantized(&files, dtype, &Device::Cpu, None).unwrap()
}

fn reference() -> (Value, std::collections::HashMap<String, Tensor>) {
    let dir = root().join("crates/engine/tests/reference/phi3-small-8k");
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

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `got` holds the reference's top logits (`{"ids": [...], "logits": [...]}`) within the
/// tolerance, and its argmax is the reference's.
fn check_top(got: &[f32], want: &Value, what: &str) {
    let top_ids = ids(&want["ids"]);
    for (&id, l) in top_ids.iter().zip(want["logits"].as_array().unwrap()) {
        let l = l.as_f64().unwrap() as f32;
        let d = (got[id as usize] - l).abs();
        assert!(d < LOGIT_TOL, "{what}: logit of {id} is {} not {l}", got[id as usize]);
    }
    assert_eq!(argmax(got), top_ids[0], "{what}: argmax");
}

/// Logits of every position of `input`, computed `chunk` tokens per forward pass (all of it
/// in one pass with `None`).
fn all_logits(model: &Model, input: &[u32], chunk: Option<usize>) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache().unwrap();
    let mut rows = Vec::new();
    while cache.len() < input.len() {
        let out = model
            .forward(&mut [BatchItem {
                tokens: input,
                cache: &mut cache,
                max_new_tokens: chunk,
                all_logits: true,
            }])
            .unwrap();
        rows.extend(out.logits.to_vec2::<f32>().unwrap());
    }
    rows
}

#[test]
fn logits_match_the_reference_in_one_pass_and_in_chunks() {
    let model = load(DType::F32);
    let (json, full) = reference();
    for case in json["logits_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = ids(&case["input_ids"]);
        // 64 tokens are all local; 160 and 256 reach past the local blocks, where the sparse
        // layer's heads each see their own blocks. Chunks of 45 start off the block grid.
        for chunk in [None, Some(45)] {
            let got = all_logits(&model, &input, chunk);
            assert_eq!(got.len(), input.len());
            for (p, want) in case["top"].as_array().unwrap().iter().enumerate() {
                check_top(&got[p], want, &format!("{name} chunk {chunk:?} position {p}"));
            }
            let rows = full[&format!("logits.{name}")].to_vec2::<f32>().unwrap();
            for (row, p) in rows.iter().zip(ids(&case["full_rows"])) {
                for (id, (&a, &b)) in got[p as usize].iter().zip(row).enumerate() {
                    // The masked (dummy) ids are -inf in both.
                    assert!(
                        a == b || (a - b).abs() < LOGIT_TOL,
                        "{name} position {p} id {id}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// Greedy decoding with the KV cache: the prompt in one pass, then one token per step (the
/// CPU's paged decode kernel, with per-head masks once the sequence outgrows the local blocks).
fn greedy(model: &Model, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
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
fn greedy_continuations_match_the_reference() {
    for kv_dtype in [None, Some(DType::F16)] {
        let model = load(DType::F32);
        if let Some(d) = kv_dtype {
            model.set_kv_cache_dtype(d).unwrap();
        }
        let (json, _) = reference();
        for case in json["greedy_cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let want = ids(&case["generated_ids"]);
            let (got, rows) = greedy(&model, &ids(&case["prompt_ids"]), want.len());
            if kv_dtype.is_some() {
                // A half-precision cache rounds keys and values: the tokens may only differ
                // where the reference's margin is small; these cases all have >= 0.03.
                assert_eq!(got[..4], want[..4], "{name}: f16 cache, first tokens");
                continue;
            }
            assert_eq!(got, want, "{name}: greedy tokens");
            for (step, (row, top)) in rows.iter().zip(case["steps"].as_array().unwrap()).enumerate()
            {
                check_top(row, top, &format!("{name} step {step}"));
            }
        }
    }
}

/// Sequences of different lengths in one ragged batch (one all-local, others past the local
/// blocks, one still in its prompt) give each its own reference continuation.
#[test]
fn ragged_batch_matches_the_reference() {
    let model = load(DType::F32);
    let (json, _) = reference();
    let cases = json["greedy_cases"].as_array().unwrap();
    let mut seqs: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let wants: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["generated_ids"])).collect();
    let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache().unwrap()).collect();
    let n = wants[0].len();
    let mut step = vec![0usize; seqs.len()];
    while step.iter().any(|&s| s < n) {
        let mut items: Vec<BatchItem> = Vec::new();
        let mut who = Vec::new();
        for (i, (tokens, cache)) in seqs.iter().zip(caches.iter_mut()).enumerate() {
            if step[i] < n {
                // The longest prompt is computed in chunks of 64 beside the others' decoding.
                let chunk = (i == cases.len() - 2).then_some(64);
                items.push(BatchItem { tokens, cache, max_new_tokens: chunk, all_logits: false });
                who.push(i);
            }
        }
        let out = model.forward(&mut items).unwrap();
        let done: Vec<bool> = items.iter().map(|it| it.cache.len() == it.tokens.len()).collect();
        drop(items);
        let logits = out.logits.to_vec2::<f32>().unwrap();
        for ((&i, rows), finished) in who.iter().zip(&out.rows).zip(done) {
            if finished {
                let t = argmax(&logits[rows.end - 1]);
                assert_eq!(t, wants[i][step[i]], "case {i} step {}", step[i]);
                seqs[i].push(t);
                step[i] += 1;
            }
        }
    }
}

#[test]
fn bf16_runs_close_to_the_reference() {
    let model = load(DType::BF16);
    let (json, _) = reference();
    let case = &json["greedy_cases"][0];
    let want = ids(&case["generated_ids"]);
    let (got, rows) = greedy(&model, &ids(&case["prompt_ids"]), 3);
    assert_eq!(got[0], want[0], "bf16 first token");
    assert!(rows.iter().flatten().all(|x| x.is_finite() || *x == f32::NEG_INFINITY));
}
