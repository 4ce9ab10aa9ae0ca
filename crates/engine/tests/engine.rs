//! End-to-end tests of [`Engine`]: generation through sequences, the sampler, the streaming
//! detokenizer and stop handling, against the transformers reference continuations that
//! `models/make_tiny_models.py` recorded for each tiny checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use phi_engine::chat_template::{ChatMessage, ResolvedSystemRole};
use phi_engine::checkpoint::ModelSource;
use phi_engine::engine::{
    Completion, Engine, FinishReason, GenerateOptions, LoadOptions, Sequence, StepOutput,
};
use phi_engine::error::EngineError;
use phi_engine::prefix_cache::MIN_REUSE_TOKENS;
use phi_engine::sampling::SamplingParams;
use serde_json::Value;

const VARIANTS: &[&str] = &["phi3-mini-4k", "phi3-medium-4k", "phi3-mini-128k", "phi4-mini"];
const LOGPROB_TOL: f32 = 1e-4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir(variant: &str) -> PathBuf {
    root().join("models/tiny").join(variant)
}

fn load_dir(dir: &Path) -> Result<Engine, EngineError> {
    Engine::load(&ModelSource::Local(dir.to_path_buf()), &LoadOptions::default())
}

fn engine(variant: &str) -> Engine {
    load_dir(&model_dir(variant)).unwrap_or_else(|e| panic!("{variant} loads: {e}"))
}

struct Case {
    name: String,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    /// Per step, the reference's five most likely `(id, logprob)`.
    top: Vec<Vec<(u32, f32)>>,
    /// LongRoPE: the generation crossed the original context (its later steps used the long
    /// factors for new positions only, which a prompt of the same tokens does not reproduce).
    crosses_original_max: bool,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn cases(variant: &str) -> Vec<Case> {
    let path = root().join("crates/engine/tests/reference").join(variant).join("reference.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["greedy_cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            prompt: ids(&c["prompt_ids"]),
            generated: ids(&c["generated_ids"]),
            logprobs: c["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
            top: c["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|step| {
                    step.as_array()
                        .unwrap()
                        .iter()
                        .map(|a| (a[0].as_u64().unwrap() as u32, a[1].as_f64().unwrap() as f32))
                        .collect()
                })
                .collect(),
            crosses_original_max: c["crosses_original_max"].as_bool().unwrap_or(false),
        })
        .collect()
}

fn case(variant: &str, name: &str) -> Case {
    cases(variant).into_iter().find(|c| c.name == name).unwrap()
}

/// Greedy decoding of exactly `n` tokens (stop tokens do not end it).
fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        max_tokens: Some(n),
        stop: Vec::new(),
        ignore_eos: true,
        decode_after_prompt: false,
        prompt_logprobs: false,
    }
}

fn token_ids(c: &Completion) -> Vec<u32> {
    c.tokens.iter().map(|t| t.id).collect()
}

/// Runs `generate`, returning the completion and every step's output.
fn run(engine: &Engine, prompt: &[u32], opts: &GenerateOptions) -> (Completion, Vec<StepOutput>) {
    let mut steps = Vec::new();
    let c = engine
        .generate(prompt, opts, |s| {
            steps.push(s.clone());
            true
        })
        .unwrap();
    (c, steps)
}

fn streamed(steps: &[StepOutput]) -> String {
    steps.iter().map(|s| s.text.as_str()).collect()
}

/// A fresh folder under the system temp dir (removed by the caller).
fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "phi-engine-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a tiny model folder's files into a fresh scratch folder.
fn copy_model(variant: &str, tag: &str) -> PathBuf {
    let dir = scratch_dir(tag);
    for entry in std::fs::read_dir(model_dir(variant)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn greedy_generation_matches_transformers_tokens_and_logprobs() {
    for variant in VARIANTS {
        let engine = engine(variant);
        for case in cases(variant) {
            let label = format!("{variant}/{}", case.name);
            let mut opts = greedy(case.generated.len());
            opts.sampling.logprobs = true;
            opts.sampling.top_logprobs = Some(5);
            let (c, _) = run(&engine, &case.prompt, &opts);
            assert_matches_reference(&label, &c, &case);
        }
    }
}

/// Greedy options for `case` with its reference's five alternatives.
fn reference_options(case: &Case) -> GenerateOptions {
    let mut opts = greedy(case.generated.len());
    opts.sampling.logprobs = true;
    opts.sampling.top_logprobs = Some(5);
    opts
}

/// `c` has the reference's tokens, logprobs and top-5 alternatives (within [`LOGPROB_TOL`]).
fn assert_matches_reference(label: &str, c: &Completion, case: &Case) {
    assert_eq!(token_ids(c), case.generated, "{label}: tokens");
    assert_eq!(c.finish_reason, FinishReason::Length, "{label}");
    assert_eq!(c.prompt_tokens, case.prompt.len(), "{label}");
    for (step, tok) in c.tokens.iter().enumerate() {
        let want = case.logprobs[step];
        let got = tok.logprob.expect("logprobs were requested");
        assert!(
            (got - want).abs() < LOGPROB_TOL,
            "{label} step {step}: logprob {got} vs reference {want}"
        );
        assert_eq!(tok.top_logprobs.len(), 5, "{label} step {step}");
        // Listed in descending order, the sampled (greedy) token first.
        assert_eq!(tok.top_logprobs[0].0, tok.id, "{label} step {step}");
        assert!(tok.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1), "{label}");
        let got: HashMap<u32, f32> = tok.top_logprobs.iter().copied().collect();
        for &(id, want) in &case.top[step] {
            let lp = got.get(&id).unwrap_or_else(|| {
                panic!("{label} step {step}: {id} not among {:?}", tok.top_logprobs)
            });
            assert!(
                (lp - want).abs() < LOGPROB_TOL,
                "{label} step {step}: top logprob of {id}: {lp} vs {want}"
            );
        }
    }
}

fn with_prefix_cache(variant: &str, bytes: usize) -> Engine {
    let opts = LoadOptions { prefix_cache_bytes: bytes, ..LoadOptions::default() };
    Engine::load(&ModelSource::Local(model_dir(variant)), &opts).unwrap()
}

#[test]
fn reused_prefixes_give_the_reference_continuations() {
    for variant in VARIANTS {
        let engine = with_prefix_cache(variant, 64 << 20);
        let mut hits = 0;
        for case in cases(variant).into_iter().filter(|c| c.prompt.len() > MIN_REUSE_TOKENS) {
            let label = format!("{variant}/{} with a reused prefix", case.name);
            let n = case.prompt.len();
            // A shorter sequence that shares all but the prompt's last token: when it finishes,
            // its keys and values are cached.
            let (warm, _) = run(&engine, &case.prompt[..n - 1], &greedy(3));
            assert_eq!(warm.finish_reason, FinishReason::Length);
            for round in 0..2 {
                let mut seq = engine.new_sequence(&case.prompt, &reference_options(&case)).unwrap();
                // All but the last prompt token come from the cache (the first round from the
                // warm-up, the second from the first round's own sequence).
                assert_eq!(seq.cached_prompt_tokens(), n - 1, "{label} round {round}");
                while !seq.is_finished() {
                    engine.step(&mut [&mut seq]).unwrap();
                }
                let c = Completion {
                    text: seq.text().to_string(),
                    tokens: seq.generated().to_vec(),
                    finish_reason: seq.finish_reason().unwrap(),
                    prompt_tokens: seq.prompt_len(),
                    timings: seq.timings(),
                };
                assert_matches_reference(&format!("{label} round {round}"), &c, &case);
                hits += 1;
            }
        }
        let stats = engine.prefix_cache_stats().unwrap();
        assert_eq!(stats.hits, hits, "{variant}: {stats:?}");
    }
}

#[test]
fn reused_prefixes_match_fresh_computation_on_every_variant() {
    // Every variant, GQA (medium) included, whose recorded prompts are too short to reuse: a
    // longer conversation, reused against computed from scratch by an engine without the cache
    // (whose continuations the test above checks against transformers).
    for variant in VARIANTS {
        let fresh = engine(variant);
        let cached = with_prefix_cache(variant, 64 << 20);
        let chat = case(
            variant,
            if cases(variant).iter().any(|c| c.name == "chat") { "chat" } else { "long" },
        );
        let short = case(variant, "short");
        let first: Vec<u32> = chat.prompt.iter().chain(&short.prompt).copied().collect();
        let second: Vec<u32> = first.iter().chain(&short.prompt).copied().collect();
        let mut opts = greedy(6);
        opts.sampling.logprobs = true;
        run(&cached, &first, &opts);
        let (want, _) = run(&fresh, &second, &opts);
        let (got, _) = run(&cached, &second, &opts);
        let label = format!("{variant}: {} prompt tokens", second.len());
        assert_eq!(token_ids(&got), token_ids(&want), "{label}");
        for (g, w) in got.tokens.iter().zip(&want.tokens) {
            let (g, w) = (g.logprob.expect("logprobs"), w.logprob.expect("logprobs"));
            assert!((g - w).abs() < LOGPROB_TOL, "{label}: {g} vs {w}");
        }
        let stats = cached.prefix_cache_stats().unwrap();
        assert_eq!(
            (stats.hits, stats.reused_tokens),
            (1, first.len() as u64),
            "{label}: {stats:?}"
        );
    }
}

#[test]
fn prefix_cache_stays_within_its_budget() {
    let variant = "phi3-mini-4k";
    let case = case(variant, "chat");
    // One finished sequence's buffers, measured on a roomy cache.
    let roomy = with_prefix_cache(variant, 64 << 20);
    run(&roomy, &case.prompt, &greedy(4));
    let one = roomy.prefix_cache_stats().unwrap().bytes;
    assert!(one > 0);

    let tight = with_prefix_cache(variant, one + one / 2);
    let mut other = case.prompt.clone();
    other[0] = other[1]; // another conversation: shares no prefix
    run(&tight, &case.prompt, &greedy(4));
    run(&tight, &other, &greedy(4));
    let stats = tight.prefix_cache_stats().unwrap();
    assert_eq!(stats.entries, 1, "the older entry was evicted: {stats:?}");
    assert!(stats.bytes <= one + one / 2, "{stats:?}");
    // The survivor is the newer conversation.
    assert_eq!(
        tight.new_sequence(&other, &greedy(1)).unwrap().cached_prompt_tokens(),
        other.len() - 1
    );
    assert_eq!(tight.new_sequence(&case.prompt, &greedy(1)).unwrap().cached_prompt_tokens(), 0);
    // Off by default: nothing is kept.
    assert!(engine(variant).prefix_cache_stats().is_none());
}

/// Steps all `seqs` together until every one has finished; returns each one's step outputs.
fn step_all(engine: &Engine, seqs: &mut [Sequence]) -> Vec<Vec<StepOutput>> {
    let mut outputs: Vec<Vec<StepOutput>> = vec![Vec::new(); seqs.len()];
    let mut guard = 0;
    while seqs.iter().any(|s| !s.is_finished()) {
        let was_finished: Vec<bool> = seqs.iter().map(Sequence::is_finished).collect();
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let outs = engine.step(&mut refs).unwrap();
        assert_eq!(outs.len(), seqs.len());
        for (i, out) in outs.into_iter().enumerate() {
            if was_finished[i] {
                assert_eq!(out, StepOutput::default(), "a finished sequence produced output");
            } else {
                outputs[i].push(out);
            }
        }
        guard += 1;
        assert!(guard < 1000, "sequences never finish");
    }
    outputs
}

#[test]
fn batched_steps_match_single_sequences_with_and_without_chunked_prefill() {
    for variant in VARIANTS {
        let engine = engine(variant);
        let cases = cases(variant);
        if *variant == "phi3-mini-128k" {
            assert!(cases.iter().any(|c| c.name == "cross"), "the LongRoPE crossing case");
        }
        // Each case alone through `step`, then all of them in one batch: without chunking, and
        // with every case but the first fed 3 prompt tokens per step, so that prompt chunks share
        // forward passes with the first case's decode steps.
        let alone: Vec<Vec<u32>> = cases
            .iter()
            .map(|c| {
                let mut seq = engine.new_sequence(&c.prompt, &greedy(c.generated.len())).unwrap();
                step_all(&engine, std::slice::from_mut(&mut seq));
                seq.generated().iter().map(|t| t.id).collect()
            })
            .collect();
        for (c, got) in cases.iter().zip(&alone) {
            assert_eq!(got, &c.generated, "{variant}/{}: alone", c.name);
        }
        for chunked in [false, true] {
            let mut seqs: Vec<Sequence> = cases
                .iter()
                .map(|c| engine.new_sequence(&c.prompt, &greedy(c.generated.len())).unwrap())
                .collect();
            if chunked {
                for s in &mut seqs[1..] {
                    s.set_prefill_chunk(Some(3));
                }
            }
            let outputs = step_all(&engine, &mut seqs);
            for (i, c) in cases.iter().enumerate() {
                let label = format!("{variant}/{} (chunked prefill: {chunked})", c.name);
                let got: Vec<u32> = seqs[i].generated().iter().map(|t| t.id).collect();
                assert_eq!(got, alone[i], "{label}: batched tokens differ from alone");
                // Steps that only consumed prompt come first and carry no token.
                let prefill_steps = outputs[i].iter().take_while(|o| o.token.is_none()).count();
                let with_token = outputs[i].iter().filter(|o| o.token.is_some()).count();
                assert_eq!(with_token, c.generated.len(), "{label}");
                assert_eq!(prefill_steps + with_token, outputs[i].len(), "{label}");
                if chunked && i > 0 {
                    assert!(prefill_steps > 0, "{label}: the prompt was not chunked");
                } else {
                    assert_eq!(prefill_steps, 0, "{label}");
                }
                assert_eq!(seqs[i].finish_reason(), Some(FinishReason::Length), "{label}");
            }
        }
    }
}

/// Whether the completion ended on a stop token (which is in `tokens` but not in the text).
fn ends_with_stop_token(engine: &Engine, c: &Completion) -> bool {
    c.finish_reason == FinishReason::Stop
        && c.tokens.last().is_some_and(|t| engine.stop_token_ids().contains(&t.id))
}

fn check_streaming(engine: &Engine, label: &str, c: &Completion, steps: &[StepOutput]) {
    assert_eq!(streamed(steps), c.text, "{label}: streamed text differs from the completion");
    assert_eq!(steps.len(), c.tokens.len(), "{label}: one step per token");
    let mut ids = token_ids(c);
    if ends_with_stop_token(engine, c) {
        ids.pop();
    }
    let want = engine.tokenizer().decode(&ids, true).unwrap();
    assert_eq!(c.text, want, "{label}: text differs from decode(ids)");
    assert_eq!(steps.last().unwrap().finish_reason, Some(c.finish_reason), "{label}");
    assert!(steps[..steps.len() - 1].iter().all(|s| s.finish_reason.is_none()), "{label}");
}

#[test]
fn streamed_text_is_the_completion_text_and_the_decode_of_the_tokens() {
    for variant in VARIANTS {
        let engine = engine(variant);
        for case in cases(variant) {
            let label = format!("{variant}/{} greedy", case.name);
            let (c, steps) = run(&engine, &case.prompt, &greedy(case.generated.len()));
            check_streaming(&engine, &label, &c, &steps);
            assert_eq!(c.text, engine.tokenizer().decode(&case.generated, true).unwrap());
        }
        // Sampled text at a high temperature, until a stop token or the end of the context:
        // byte-fallback runs, special tokens and stop tokens all show up sooner or later.
        let prompt = &cases(variant)[0].prompt;
        for seed in 0..6 {
            let opts = GenerateOptions {
                sampling: SamplingParams {
                    temperature: 1.5,
                    seed: Some(seed),
                    ..SamplingParams::default()
                },
                ..GenerateOptions::default()
            };
            let (c, steps) = run(&engine, prompt, &opts);
            check_streaming(&engine, &format!("{variant} seed {seed}"), &c, &steps);
        }
    }
}

#[test]
fn a_stop_token_from_generation_config_ends_generation_before_its_text() {
    let case = case("phi3-mini-4k", "short");
    // The first step whose token is a word token not generated before (stopping happens at the
    // first occurrence) and not already a stop token.
    let plain = engine("phi3-mini-4k");
    let k = (3..case.generated.len())
        .find(|&k| {
            let t = case.generated[k];
            !case.generated[..k].contains(&t)
                && !plain.stop_token_ids().contains(&t)
                && !plain.tokenizer().is_special_token(t)
        })
        .unwrap();
    let stop_id = case.generated[k];
    // Without the rewrite, generation does not stop there.
    let (c, _) = run(&plain, &case.prompt, &GenerateOptions { ignore_eos: false, ..greedy(24) });
    assert_eq!(token_ids(&c), case.generated);
    assert_eq!(c.finish_reason, FinishReason::Length);

    let dir = copy_model("phi3-mini-4k", "stoptoken");
    let path = dir.join("generation_config.json");
    let mut gc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    gc["eos_token_id"] = serde_json::json!([32000, 32001, 32007, stop_id]);
    std::fs::write(&path, gc.to_string()).unwrap();
    let engine = load_dir(&dir).unwrap();
    assert!(engine.stop_token_ids().contains(&stop_id));

    let opts = GenerateOptions { ignore_eos: false, ..greedy(case.generated.len()) };
    let (c, steps) = run(&engine, &case.prompt, &opts);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(token_ids(&c), case.generated[..=k], "stops right after the stop token");
    let before = engine.tokenizer().decode(&case.generated[..k], true).unwrap();
    assert_eq!(c.text, before, "the text is everything before the stop token");
    let with = engine.tokenizer().decode(&case.generated[..=k], true).unwrap();
    assert_ne!(with, before, "the stop token has text of its own");
    check_streaming(&engine, "stop token", &c, &steps);

    // ignore_eos generates through it.
    let (c, steps) = run(&engine, &case.prompt, &greedy(case.generated.len()));
    assert_eq!(token_ids(&c), case.generated);
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.text, engine.tokenizer().decode(&case.generated, true).unwrap());
    check_streaming(&engine, "ignore_eos", &c, &steps);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Generates with `stop` and checks the text is cut before its first occurrence in the greedy
/// text, after exactly the token that completed it (`late_ok`: or one later, when that token is
/// a byte-fallback token whose character the decoder only releases with the next token).
fn check_stop_string(engine: &Engine, case: &Case, stop: &str) {
    let tok = engine.tokenizer();
    let full = tok.decode(&case.generated, true).unwrap();
    let cut = full.find(stop).unwrap_or_else(|| panic!("{stop:?} not in {full:?}"));
    let completes = (1..=case.generated.len())
        .find(|&j| tok.decode(&case.generated[..j], true).unwrap().contains(stop))
        .unwrap();
    let late_ok = tok.is_byte_fallback_token(case.generated[completes - 1]);

    let opts = GenerateOptions { stop: vec![stop.to_string()], ..greedy(case.generated.len()) };
    let (c, steps) = run(engine, &case.prompt, &opts);
    let label = format!("stop {stop:?} in {full:?}");
    assert_eq!(c.finish_reason, FinishReason::Stop, "{label}");
    assert_eq!(c.text, full[..cut], "{label}");
    assert_eq!(streamed(&steps), c.text, "{label}");
    assert!(steps.iter().all(|s| !s.text.contains(stop)), "{label}");
    let n = c.tokens.len();
    assert!(n == completes || (late_ok && n == completes + 1), "{label}: stopped after {n}");
    assert_eq!(token_ids(&c), case.generated[..n], "{label}");
}

#[test]
fn stop_strings_cut_the_text_before_their_first_occurrence() {
    let engine = engine("phi3-mini-4k");
    let tok = engine.tokenizer();
    let mut multibyte_checked = 0;
    for case in cases("phi3-mini-4k") {
        let full = tok.decode(&case.generated, true).unwrap();
        // Spanning a token boundary: the last two characters of the text of the first four
        // tokens and the first two of what follows.
        let b = tok.decode(&case.generated[..4], true).unwrap().len();
        assert!(full.is_char_boundary(b) && full[..b].is_ascii() && full[b..b + 2].is_ascii());
        let spanning = &full[b - 2..b + 2];
        check_stop_string(&engine, &case, spanning);
        // Further on, so the cut leaves several tokens of text.
        let b = tok.decode(&case.generated[..9], true).unwrap().len();
        let spanning = &full[full.floor_char_boundary(b - 3)..full.ceil_char_boundary(b + 1)];
        check_stop_string(&engine, &case, spanning);
        // A multibyte character, alone and with the character after it.
        if let Some((pos, ch)) = full.char_indices().find(|(_, c)| !c.is_ascii()) {
            check_stop_string(&engine, &case, &ch.to_string());
            let next = full[pos + ch.len_utf8()..].chars().next().unwrap();
            check_stop_string(&engine, &case, &format!("{ch}{next}"));
            multibyte_checked += 1;
        }
        // A stop string that never occurs changes nothing; of two, the earlier match wins.
        let opts = GenerateOptions { stop: vec!["\u{1F980}zz".into()], ..greedy(8) };
        let (c, _) = run(&engine, &case.prompt, &opts);
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.text, tok.decode(&case.generated[..8], true).unwrap());
        let late = &full[full.len() - 4..];
        let early = &full[2..5];
        let opts = GenerateOptions {
            stop: vec![late.to_string(), early.to_string()],
            ..greedy(case.generated.len())
        };
        let (c, _) = run(&engine, &case.prompt, &opts);
        assert_eq!(c.text, full[..full.find(early).unwrap()], "{early:?} first");
    }
    assert!(multibyte_checked > 0, "no reference text has a multibyte character");
}

#[test]
fn length_limits_and_invalid_requests() {
    let engine = engine("phi3-mini-4k");
    let case = case("phi3-mini-4k", "short");
    let ctx = engine.context_length();
    assert_eq!(ctx, 64);

    // max_tokens: exactly that many tokens, finish_reason length (no stop token is generated
    // in the first 24 greedy tokens, so ignore_eos is off here).
    for n in [1, 5] {
        let opts = GenerateOptions { ignore_eos: false, ..greedy(n) };
        let (c, steps) = run(&engine, &case.prompt, &opts);
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(token_ids(&c), case.generated[..n]);
        assert_eq!(steps.len(), n);
    }
    // No max_tokens (or a larger one): until the context is full.
    for max_tokens in [None, Some(1000)] {
        let opts = GenerateOptions { max_tokens, ..greedy(0) };
        let (c, _) = run(&engine, &case.prompt, &opts);
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.tokens.len(), ctx - case.prompt.len());
        assert_eq!(token_ids(&c)[..24], case.generated[..]);
    }
    // The longest prompt that fits leaves room for one token.
    let long: Vec<u32> = case.prompt.iter().copied().cycle().take(ctx - 1).collect();
    let (c, _) = run(&engine, &long, &greedy(10));
    assert_eq!((c.tokens.len(), c.finish_reason), (1, FinishReason::Length));

    let err = |prompt: &[u32], opts: &GenerateOptions| {
        engine.new_sequence(prompt, opts).map(|_| ()).unwrap_err()
    };
    // Prompts that do not fit: the message gives the prompt length and the context size.
    for len in [ctx, ctx + 6] {
        let prompt: Vec<u32> = case.prompt.iter().copied().cycle().take(len).collect();
        let e = err(&prompt, &greedy(4));
        assert!(matches!(e, EngineError::InvalidRequest(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("{len} tokens")), "{msg}");
        assert!(msg.contains(&format!("context is {ctx} tokens")), "{msg}");
        // generate() reports the same error.
        assert!(engine.generate(&prompt, &greedy(4), |_| true).is_err());
    }
    let e = err(&[], &greedy(4));
    assert!(e.to_string().contains("empty"), "{e}");
    // max_tokens 0: the prompt is computed and nothing generated, in one step.
    let (c, steps) =
        run(&engine, &case.prompt, &GenerateOptions { ignore_eos: false, ..greedy(0) });
    assert_eq!((c.tokens.len(), c.finish_reason, c.text.as_str()), (0, FinishReason::Length, ""));
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].token, None);

    let bad = |sampling: SamplingParams, param: &str| {
        let e = err(&case.prompt, &GenerateOptions { sampling, ..greedy(4) });
        match &e {
            EngineError::Sampling(s) => assert_eq!(s.param(), Some(param), "{e}"),
            other => panic!("expected a sampling error, got {other:?}"),
        }
        assert!(e.to_string().contains(param), "{e}");
    };
    bad(SamplingParams { temperature: 3.0, ..SamplingParams::default() }, "temperature");
    bad(SamplingParams { top_p: 0.0, ..SamplingParams::default() }, "top_p");
    bad(
        SamplingParams { frequency_penalty: 2.5, ..SamplingParams::default() },
        "frequency_penalty",
    );
    bad(SamplingParams { top_logprobs: Some(3), ..SamplingParams::default() }, "top_logprobs");
    let e = err(&case.prompt, &GenerateOptions { stop: vec![String::new()], ..greedy(4) });
    assert!(e.to_string().contains("stop"), "{e}");
}

fn sampled(seed: i64) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        max_tokens: Some(24),
        stop: Vec::new(),
        ignore_eos: true,
        decode_after_prompt: false,
        prompt_logprobs: false,
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_depends_on_the_seed() {
    let engine = engine("phi3-mini-4k");
    let case = case("phi3-mini-4k", "short");
    let a = token_ids(&run(&engine, &case.prompt, &sampled(42)).0);
    let b = token_ids(&run(&engine, &case.prompt, &sampled(42)).0);
    let other = token_ids(&run(&engine, &case.prompt, &sampled(43)).0);
    assert_eq!(a.len(), 24);
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, other, "another seed gives other tokens");
    assert_ne!(a, case.generated, "sampling is not greedy");
    // The seeded sequence stepped in a batch with others draws the same tokens: each sequence
    // owns its random stream.
    let mut seqs = vec![
        engine.new_sequence(&case.prompt, &sampled(7)).unwrap(),
        engine.new_sequence(&case.prompt, &sampled(42)).unwrap(),
        engine.new_sequence(&cases("phi3-mini-4k")[1].prompt, &sampled(42)).unwrap(),
    ];
    step_all(&engine, &mut seqs);
    assert_eq!(seqs[1].generated().iter().map(|t| t.id).collect::<Vec<_>>(), a);
}

#[test]
fn frequency_penalty_steers_greedy_decoding_away_from_repeats() {
    // Greedy with a frequency penalty picks argmax(logit - penalty * count) over the tokens
    // generated so far. The reported logprobs are raw (before penalties), and logprob
    // differences are logit differences, so that rule can be checked from the output alone.
    const PENALTY: f32 = 2.0;
    let mut changed = 0;
    for variant in VARIANTS {
        let engine = engine(variant);
        for case in cases(variant) {
            let label = format!("{variant}/{}", case.name);
            let n = case.generated.len();
            // Where plain greedy first repeats a token, and whether the penalty must change
            // that choice: the repeated token loses PENALTY, and the best listed alternative
            // not generated before keeps its logit.
            let first_repeat = (0..n).find(|&t| case.generated[..t].contains(&case.generated[t]));
            let mut opts = greedy(n);
            opts.sampling.frequency_penalty = PENALTY;
            opts.sampling.logprobs = true;
            opts.sampling.top_logprobs = Some(20);
            let (c, _) = run(&engine, &case.prompt, &opts);
            let got = token_ids(&c);
            assert_eq!(got.len(), n, "{label}");

            for (t, tok) in c.tokens.iter().enumerate() {
                let count = |id: u32| got[..t].iter().filter(|&&x| x == id).count() as f32;
                let score = tok.logprob.expect("logprobs") - PENALTY * count(tok.id);
                for &(alt, lp) in &tok.top_logprobs {
                    let alt_score = lp - PENALTY * count(alt);
                    assert!(
                        score >= alt_score - 1e-5,
                        "{label} step {t}: chose {} ({score}) over {alt} ({alt_score})",
                        tok.id
                    );
                }
            }
            match first_repeat {
                None => assert_eq!(got, case.generated, "{label}: no repeat, nothing to change"),
                Some(t) => {
                    // Before the first repeat only tokens that were not chosen are penalised.
                    assert_eq!(got[..t], case.generated[..t], "{label}");
                    let repeated = case.generated[t];
                    let best_fresh = case.top[t]
                        .iter()
                        .find(|(id, _)| !case.generated[..t].contains(id))
                        .map(|&(_, lp)| lp);
                    let top = case.logprobs[t];
                    if best_fresh.is_some_and(|lp| top - PENALTY < lp) {
                        assert_ne!(got[t], repeated, "{label} step {t}: the repeat survived");
                        assert_ne!(got, case.generated, "{label}");
                        changed += 1;
                    }
                }
            }
        }
    }
    // The checks above did see the penalty change a greedy choice (phi4-mini "short" repeats a
    // token with a margin of 1.73 < 2 over the best fresh alternative).
    assert!(changed > 0, "no reference case exercises a changed choice");
}

#[test]
fn system_messages_reach_the_prompt_under_the_default_policy() {
    let system = "You are a pirate who speaks in rhymes.";
    let messages = [ChatMessage::system(system), ChatMessage::user("Hi there")];

    // Template C (Phi-3-medium) drops system messages: the default policy translates them.
    let medium = engine("phi3-medium-4k");
    assert_eq!(medium.template().resolved_system_role(), ResolvedSystemRole::ToUser);
    let p = medium.encode_chat(&messages).unwrap();
    assert!(p.text.contains(system), "{:?}", p.text);
    let sys_ids = medium.tokenizer().encode(system).unwrap();
    assert!(
        p.ids.windows(sys_ids.len()).any(|w| w == sys_ids.as_slice()),
        "{:?} lacks the system text's tokens {sys_ids:?}",
        p.ids
    );
    let user = medium.tokenizer().token_to_id("<|user|>").unwrap();
    assert_eq!(p.ids[0], user, "the system text goes into the user turn");
    assert!(!p.ids.contains(&32006));

    // Template D (Phi-3-mini-4k) has a system turn: the exact transformers prompt.
    let mini = engine("phi3-mini-4k");
    assert_eq!(mini.template().resolved_system_role(), ResolvedSystemRole::Native);
    let p = mini.encode_chat(&messages).unwrap();
    assert_eq!(p.ids[0], 32006, "<|system|>");
    assert_eq!(mini.tokenizer().token_to_id("<|system|>"), Some(32006));
    let chat: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("crates/engine/tests/reference/tokenizer/chat.json"))
            .unwrap(),
    )
    .unwrap();
    let entry = chat["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["template"] == "D"
                && e["conversation"] == "system_user"
                && e["add_generation_prompt"] == true
        })
        .unwrap();
    let messages: Vec<ChatMessage> = serde_json::from_value(entry["messages"].clone()).unwrap();
    assert_eq!(mini.encode_chat(&messages).unwrap().ids, ids(&entry["ids"]));
    // The reference "chat" greedy case's prompt is what encode_chat builds for its messages.
    let chat_case = case("phi3-mini-4k", "chat");
    let messages = [
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("Write a short haiku about the sea and the moon."),
    ];
    assert_eq!(mini.encode_chat(&messages).unwrap().ids, chat_case.prompt);
}

#[test]
fn load_failures_name_the_file_or_the_architecture() {
    let dir = copy_model("phi3-mini-4k", "no-tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = copy_model("phi3-mini-4k", "phi3-small");
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["Phi3SmallForCausalLM"]);
    cfg["model_type"] = "phi3small".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    // Loaded as Phi-3-small, a Phi-3-mini config is refused for its activation.
    let e = load_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("gegelu") && e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();

    let e = load_dir(&root().join("models/tiny/no-such-model")).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn prompts_share_a_per_step_token_budget_oldest_first() {
    let variant = "phi3-mini-4k";
    let budget = 10;
    let opts = LoadOptions { prefill_chunk: Some(budget), ..LoadOptions::default() };
    let engine = Engine::load(&ModelSource::Local(model_dir(variant)), &opts).unwrap();
    let prompt = case(variant, "short").prompt;
    assert_eq!(prompt.len(), 8);
    let mut seqs: Vec<Sequence> =
        (0..3).map(|_| engine.new_sequence(&prompt, &greedy(4)).unwrap()).collect();
    let sampled = |outs: &[StepOutput]| outs.iter().map(|o| o.token.is_some()).collect::<Vec<_>>();
    let step = |seqs: &mut [Sequence]| {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        engine.step(&mut refs).unwrap()
    };
    // Step 1: 10 prompt tokens: all 8 of the first (which samples), 2 of the second.
    assert_eq!(sampled(&step(&mut seqs)), [true, false, false]);
    // Step 2: one decode token, so 9 for prompts: the second's last 6, 3 of the third.
    assert_eq!(sampled(&step(&mut seqs)), [true, true, false]);
    // Step 3: two decode tokens, 8 left: the third's last 5.
    assert_eq!(sampled(&step(&mut seqs)), [true, true, true]);
    while seqs.iter().any(|s| !s.is_finished()) {
        step(&mut seqs);
    }
    let solo = run(&engine, &prompt, &greedy(4)).0;
    for s in &seqs {
        assert_eq!(s.generated().iter().map(|t| t.id).collect::<Vec<_>>(), token_ids(&solo));
    }
}

/// Options that score the prompt (with the reference's top 5) and generate `n` tokens.
fn scoring(n: usize) -> GenerateOptions {
    let mut opts = greedy(n);
    opts.sampling.logprobs = true;
    opts.sampling.top_logprobs = Some(5);
    opts.prompt_logprobs = true;
    opts
}

/// A reference case's prompt followed by its greedy continuation, as one prompt: scoring it
/// must give, at the continuation's positions, transformers' logprobs and top 5 of each step.
fn check_scores(label: &str, scores: &[phi_engine::engine::GeneratedToken], case: &Case) {
    let prompt: Vec<u32> = case.prompt.iter().chain(&case.generated).copied().collect();
    assert_eq!(scores.iter().map(|t| t.id).collect::<Vec<_>>(), prompt, "{label}: one per token");
    assert_eq!((scores[0].logprob, scores[0].top_logprobs.len()), (None, 0), "{label}: first");
    for t in &scores[1..] {
        let lp = t.logprob.unwrap_or_else(|| panic!("{label}: a prompt token without logprob"));
        assert!(lp <= 0.0 && t.top_logprobs.len() == 5, "{label}: {t:?}");
        assert!(t.top_logprobs[0].1 >= lp - LOGPROB_TOL, "{label}: {t:?}");
    }
    for (step, t) in scores[case.prompt.len()..].iter().enumerate() {
        let (got, want) = (t.logprob.unwrap(), case.logprobs[step]);
        assert!((got - want).abs() < LOGPROB_TOL, "{label} token {step}: {got} vs {want}");
        let got: HashMap<u32, f32> = t.top_logprobs.iter().copied().collect();
        for &(id, want) in &case.top[step] {
            let lp = got.get(&id).unwrap_or_else(|| panic!("{label} {step}: {id} not in top"));
            assert!((lp - want).abs() < LOGPROB_TOL, "{label} {step}: {id}: {lp} vs {want}");
        }
    }
}

#[test]
fn scored_prompts_give_transformers_logprobs_however_they_are_computed() {
    for variant in VARIANTS {
        // With a prefix cache that holds the whole prompt: a scored prompt must not reuse it.
        let engine = with_prefix_cache(variant, 64 << 20);
        for case in cases(variant).into_iter().filter(|c| !c.crosses_original_max) {
            let prompt: Vec<u32> = case.prompt.iter().chain(&case.generated).copied().collect();
            if prompt.len() >= engine.context_length() {
                continue;
            }
            run(&engine, &prompt, &greedy(1));
            let label = |how: &str| format!("{variant}/{} {how}", case.name);

            // Alone, whole: max_tokens 1 (lm-eval's request) and 0 (the prompt only).
            for n in [1, 0] {
                let mut steps = run(&engine, &prompt, &scoring(n)).1;
                assert_eq!(steps.len(), 1, "{}", label("whole"));
                let out = steps.remove(0);
                assert_eq!(out.token.is_some(), n == 1, "{}", label("whole"));
                assert_eq!(out.finish_reason, Some(FinishReason::Length));
                check_scores(
                    &label(&format!("whole, max_tokens {n}")),
                    &out.prompt_logprobs,
                    &case,
                );
            }

            // In chunks of 3 beside a sequence that decodes, preempted after two chunks (it
            // computes the prompt again and scores only what it had not), and beside a second
            // scored sequence of the same prompt (which must not take its keys and values).
            let mut seqs = [
                engine.new_sequence(&case.prompt, &greedy(40)).unwrap(),
                engine.new_sequence(&prompt, &scoring(2)).unwrap(),
                engine.new_sequence(&prompt, &scoring(1)).unwrap(),
            ];
            assert_eq!(seqs[1].cached_prompt_tokens(), 0, "{}", label("from the cache"));
            seqs[1].set_prefill_chunk(Some(3));
            let mut outs: Vec<Vec<StepOutput>> = vec![Vec::new(); 3];
            for step in 0.. {
                if step == 2 {
                    engine.preempt(&mut seqs[1]);
                }
                let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
                for (i, o) in engine.step(&mut refs).unwrap().into_iter().enumerate() {
                    outs[i].push(o);
                }
                if seqs[1].is_finished() && seqs[2].is_finished() {
                    break;
                }
                assert!(step < 200, "{}", label("never finishes"));
            }
            assert_eq!(seqs[1].preemptions(), 1);
            // An n > 1 request's next choice may take a computed prompt, but not to score it.
            let mut scored = engine.new_sequence(&prompt, &scoring(1)).unwrap();
            assert_eq!(engine.shareable_prefix(&seqs[1], &scored), prompt.len() - 1);
            assert!(!engine.share_prompt(&seqs[1], &mut scored).unwrap(), "{}", label("share"));
            for i in [1, 2] {
                let with: Vec<&StepOutput> =
                    outs[i].iter().filter(|o| !o.prompt_logprobs.is_empty()).collect();
                assert_eq!(with.len(), 1, "{}: scores once", label("batched"));
                assert!(with[0].token.is_some(), "{}", label("batched"));
                check_scores(
                    &label(&format!("batched, sequence {i}")),
                    &with[0].prompt_logprobs,
                    &case,
                );
            }
        }
    }
}
