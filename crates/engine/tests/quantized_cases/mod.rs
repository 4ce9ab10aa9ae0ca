//! The quantization test model's reference cases (`models/tiny/phi3-mini-4k-q`, reference in
//! `tests/reference/phi3-mini-4k-q`) and how a model is measured against them, shared by
//! `quantized_reference.rs` (the CPU) and `cuda_parity.rs` (the same formats on a GPU).
#![allow(dead_code)] // each test uses its own part

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use phi_engine::phi3::{BatchItem, Phi3};
use serde_json::Value;

/// The tiny checkpoint whose rows fit every block format.
pub const VARIANT: &str = "phi3-mini-4k-q";

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One reference input.
pub struct Case {
    /// The token ids fed.
    pub input: Vec<u32>,
    /// Positions whose full logits row was recorded, and those rows.
    pub positions: Vec<usize>,
    /// The reference's logits at `positions`.
    pub want: Vec<Vec<f32>>,
    /// The reference's top token at every position of `input`.
    pub top: Vec<usize>,
}

/// Every reference input, with its recorded logits.
pub fn cases() -> Vec<Case> {
    let dir = root().join("crates/engine/tests/reference").join(VARIANT);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let logits =
        candle_core::safetensors::load(dir.join("logits.safetensors"), &Device::Cpu).unwrap();
    json["logits_cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap();
            let ids = |v: &Value| -> Vec<u64> {
                v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
            };
            let want = logits[&format!("logits.{name}")].to_dtype(DType::F32).unwrap();
            Case {
                input: ids(&c["input_ids"]).into_iter().map(|x| x as u32).collect(),
                positions: ids(&c["positions"]).into_iter().map(|x| x as usize).collect(),
                want: want.to_vec2::<f32>().unwrap(),
                top: c["all_top_logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|row| row[0][0].as_u64().unwrap() as usize)
                    .collect(),
            }
        })
        .collect()
}

/// Log-probabilities of a row of logits, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// The first index of the largest value.
pub fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

/// What one format measured.
pub struct Measured {
    /// Fraction of all positions whose argmax is the reference's.
    pub agree: f64,
    /// Positions compared for `agree`.
    pub positions: usize,
    /// Mean KL(reference || model) over the rows recorded in full.
    pub kl: f64,
    /// Rows recorded in full.
    pub rows: usize,
}

/// Teacher-forced logits of every case in one pass each, against the reference.
pub fn compare(model: &Phi3, cases: &[Case]) -> Measured {
    let (mut agree, mut positions, mut kl, mut rows) = (0usize, 0usize, 0f64, 0usize);
    for case in cases {
        let mut cache = model.new_cache().unwrap();
        let item = BatchItem {
            tokens: &case.input,
            cache: &mut cache,
            max_new_tokens: None,
            all_logits: true,
        };
        let got = model.forward(&mut [item]).unwrap().logits.to_vec2::<f32>().unwrap();
        assert_eq!(got.len(), case.top.len());
        for (row, &top) in got.iter().zip(&case.top) {
            agree += usize::from(argmax(row) == top);
            positions += 1;
        }
        for (want, &p) in case.want.iter().zip(&case.positions) {
            let (lp, lq) = (log_softmax(want), log_softmax(&got[p]));
            kl += lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
            rows += 1;
        }
    }
    Measured { agree: agree as f64 / positions as f64, positions, kl: kl / rows as f64, rows }
}

/// [`compare`] one token at a time, as generation runs: every position after the first is a
/// decode step, whose attention reads the cache through the paged decode kernel.
pub fn compare_stepwise(model: &Phi3, cases: &[Case]) -> Measured {
    let (mut agree, mut positions, mut kl, mut rows) = (0usize, 0usize, 0f64, 0usize);
    for case in cases {
        let mut cache = model.new_cache().unwrap();
        for t in 0..case.input.len() {
            let item = BatchItem {
                tokens: &case.input[..=t],
                cache: &mut cache,
                max_new_tokens: None,
                all_logits: false,
            };
            let got = model.forward(&mut [item]).unwrap().logits.to_vec2::<f32>().unwrap();
            let row = got.last().unwrap();
            agree += usize::from(argmax(row) == case.top[t]);
            positions += 1;
            if let Some(i) = case.positions.iter().position(|&p| p == t) {
                let (lp, lq) = (log_softmax(&case.want[i]), log_softmax(row));
                kl += lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
                rows += 1;
            }
        }
    }
    Measured { agree: agree as f64 / positions as f64, positions, kl: kl / rows as f64, rows }
}
