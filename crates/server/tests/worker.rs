//! The engine worker on the bundled tiny model, without HTTP: batched requests get exactly what
//! they get alone, a dropped receiver cancels its request, and a full queue refuses more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phi_engine::chat_template::ChatMessage;
use phi_engine::checkpoint::ModelSource;
use phi_engine::engine::{Engine, FinishReason, GenerateOptions, LoadOptions};
use phi_engine::sampling::SamplingParams;
use phi_server::worker::{Job, SubmitError, WorkerConfig, WorkerEvent, WorkerHandle};
use tokio::sync::mpsc::UnboundedReceiver;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny/phi3-mini-4k");

fn engine() -> Arc<Engine> {
    let source = ModelSource::parse(MODEL, None).unwrap();
    Arc::new(Engine::load(&source, &LoadOptions::default()).unwrap())
}

fn options(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        max_tokens: Some(max_tokens),
        ..GenerateOptions::default()
    }
}

fn prompt(engine: &Engine, text: &str) -> Vec<u32> {
    engine.encode_chat(&[ChatMessage::user(text)]).unwrap().ids
}

/// Drains a job's events: the text of each choice and how it finished.
fn drain(rx: &mut UnboundedReceiver<WorkerEvent>, n: usize) -> Vec<(String, Option<FinishReason>)> {
    let mut out = vec![(String::new(), None); n];
    while let Some(event) = rx.blocking_recv() {
        match event {
            WorkerEvent::Step { choice, output } => {
                out[choice].0.push_str(&output.text);
                if output.finish_reason.is_some() {
                    assert!(out[choice].1.is_none(), "choice {choice} finished twice");
                    out[choice].1 = output.finish_reason;
                }
            }
            WorkerEvent::Failed(m) => panic!("engine failed: {m}"),
            WorkerEvent::Expired => panic!("no deadline was set"),
        }
    }
    out
}

#[test]
fn batched_requests_match_solo_generation() {
    let engine = engine();
    let worker = WorkerHandle::spawn(engine.clone(), WorkerConfig::default()).unwrap();
    let prompts = ["hi", "hello there", "what is 2+2", "x"];
    let lengths = [5, 20, 12, 30];
    let mut receivers = Vec::new();
    for (p, &len) in prompts.iter().zip(&lengths) {
        let ids = prompt(&engine, p);
        // Two choices per request, so jobs with several sequences are batched too.
        let seqs = (0..2).map(|_| engine.new_sequence(&ids, &options(len)).unwrap()).collect();
        let (job, rx) = Job::new(seqs);
        worker.submit(job).unwrap();
        receivers.push(rx);
    }
    for ((p, &len), mut rx) in prompts.iter().zip(&lengths).zip(receivers) {
        let solo = engine.generate(&prompt(&engine, p), &options(len), |_| true).unwrap();
        for (text, finish) in drain(&mut rx, 2) {
            assert_eq!(text, solo.text, "prompt {p:?}");
            assert_eq!(finish, Some(solo.finish_reason));
        }
    }
}

#[test]
fn dropped_receiver_cancels_and_full_queue_refuses() {
    let engine = engine();
    let config = WorkerConfig {
        max_batch: 1,
        max_queue: 1,
        step_delay: Some(Duration::from_millis(50)),
        ..WorkerConfig::default()
    };
    let worker = WorkerHandle::spawn(engine.clone(), config).unwrap();
    let ids = prompt(&engine, "hi");
    let job = |n| Job::new(vec![engine.new_sequence(&ids, &options(n)).unwrap()]);

    let (a, mut a_rx) = job(50);
    worker.submit(a).unwrap();
    assert!(matches!(a_rx.blocking_recv(), Some(WorkerEvent::Step { .. })));
    assert_eq!(worker.stats().running(), 1);
    let (b, mut b_rx) = job(3);
    worker.submit(b).unwrap();
    let (c, _c_rx) = job(3);
    assert_eq!(worker.submit(c).unwrap_err(), SubmitError::QueueFull);
    assert_eq!(worker.stats().queued(), 1);

    // Dropping A's receiver frees the batch long before A's 50 tokens (2.5 s) are done.
    let start = Instant::now();
    drop(a_rx);
    let out = drain(&mut b_rx, 1);
    assert_eq!(out[0].1, Some(FinishReason::Length));
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    while worker.stats().running() != 0 || worker.stats().queued() != 0 {
        assert!(Instant::now() < deadline, "worker did not go idle");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stopped_choice_is_no_longer_stepped() {
    let engine = engine();
    let config =
        WorkerConfig { step_delay: Some(Duration::from_millis(20)), ..WorkerConfig::default() };
    let worker = WorkerHandle::spawn(engine.clone(), config).unwrap();
    let ids = prompt(&engine, "hi");
    let seqs = (0..2).map(|_| engine.new_sequence(&ids, &options(10)).unwrap()).collect();
    let (job, mut rx) = Job::new(seqs);
    let stopper = job.stopper();
    worker.submit(job).unwrap();
    let mut steps = [0usize; 2];
    let mut finished = [false; 2];
    while let Some(event) = rx.blocking_recv() {
        let WorkerEvent::Step { choice, output } = event else { panic!("engine failed") };
        steps[choice] += 1;
        finished[choice] |= output.finish_reason.is_some();
        if choice == 0 && steps[0] == 2 {
            stopper.stop(0);
        }
    }
    // The step in flight when it was stopped may still arrive, nothing after it.
    assert!(steps[0] <= 3 && !finished[0], "{steps:?}");
    assert!(finished[1] && steps[1] > 3, "{steps:?}");
}

#[test]
fn queue_bounded_by_prompt_tokens() {
    let engine = engine();
    let ids = prompt(&engine, "hello there, how are you today?");
    let len = ids.len();
    let config = WorkerConfig {
        max_batch: 1,
        max_queue: 10,
        // Room for two waiting prompts of this length, not three.
        max_queue_tokens: 2 * len + len / 2,
        step_delay: Some(Duration::from_millis(50)),
    };
    let worker = WorkerHandle::spawn(engine.clone(), config).unwrap();
    let job = || Job::new(vec![engine.new_sequence(&ids, &options(40)).unwrap()]);
    let (running, _running_rx) = job();
    worker.submit(running).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker.stats().running() == 0 {
        assert!(Instant::now() < deadline, "the first job never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (a, _a_rx) = job();
    let (b, _b_rx) = job();
    worker.submit(a).unwrap();
    worker.submit(b).unwrap();
    assert_eq!(worker.stats().queued_tokens(), 2 * len);
    let (c, _c_rx) = job();
    assert_eq!(worker.submit(c).unwrap_err(), SubmitError::QueueFull);
    assert_eq!(worker.stats().queued(), 2, "a refused job is not counted");
    // One long prompt may always wait in an empty queue: a fresh worker with a tiny bound.
    let tight = WorkerConfig { max_queue_tokens: 1, ..WorkerConfig::default() };
    let lone = WorkerHandle::spawn(engine.clone(), tight).unwrap();
    let (long, mut long_rx) = job();
    lone.submit(long).unwrap();
    assert!(drain(&mut long_rx, 1)[0].1.is_some());
}

/// An engine whose KV pool holds `tokens` positions, with `prefix_mb` of prefix cache.
fn engine_with_pool(tokens: usize, prefix_mb: usize) -> Arc<Engine> {
    let source = ModelSource::parse(MODEL, None).unwrap();
    let opts = LoadOptions {
        kv_cache_tokens: Some(tokens),
        prefix_cache_bytes: prefix_mb << 20,
        ..LoadOptions::default()
    };
    Arc::new(Engine::load(&source, &opts).unwrap())
}

/// Waits (up to 10 s) for `cond`.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_full_kv_pool_preempts_the_newest_request_which_resumes_unchanged() {
    // With and without a prefix cache (a preempted request then takes its own blocks back
    // from it, if they are still there, instead of recomputing).
    for prefix_mb in [0, 1] {
        // Four blocks of 16 positions: each request below grows to three, so two cannot run
        // to the end together.
        let engine = engine_with_pool(64, prefix_mb);
        let reference = self::engine();
        let config =
            WorkerConfig { step_delay: Some(Duration::from_millis(5)), ..WorkerConfig::default() };
        let worker = WorkerHandle::spawn(engine.clone(), config).unwrap();
        assert_eq!(worker.stats().budget_tokens(), 64);
        assert_eq!(worker.stats().blocks_total(), 4);

        // Greedy, and sampled with a seed: preemption must change neither.
        let sampled = GenerateOptions {
            sampling: SamplingParams {
                temperature: 0.9,
                seed: Some(7),
                frequency_penalty: 0.5,
                ..SamplingParams::default()
            },
            max_tokens: Some(36),
            ignore_eos: true,
            decode_after_prompt: false,
            prompt_logprobs: false,
            ..GenerateOptions::default()
        };
        let greedy = GenerateOptions { ignore_eos: true, ..options(36) };
        let requests = [("hi", &greedy), ("tell me a story", &sampled), ("x", &greedy)];
        let mut receivers = Vec::new();
        for (text, opts) in requests {
            let ids = prompt(&engine, text);
            assert!(ids.len() + 36 <= 48, "each request fits three blocks");
            let (job, rx) = Job::new(vec![engine.new_sequence(&ids, opts).unwrap()]);
            worker.submit(job).unwrap();
            receivers.push(rx);
        }
        for ((text, opts), mut rx) in requests.into_iter().zip(receivers) {
            let solo = reference.generate(&prompt(&reference, text), opts, |_| true).unwrap();
            let got = drain(&mut rx, 1);
            assert_eq!(got[0].0, solo.text, "{text:?} with prefix cache {prefix_mb} MB");
            assert_eq!(got[0].1, Some(solo.finish_reason));
        }
        assert!(worker.stats().preemptions() >= 1, "the pool was too small for all three");
        wait_for("the blocks never came back", || {
            worker.stats().blocks_used() == 0 && worker.stats().running() == 0
        });
        let stats = engine.kv_stats();
        assert_eq!(stats.used_blocks(), 0, "{stats:?}");
        if prefix_mb == 0 {
            assert_eq!(stats.free_blocks, 4);
        }
    }
}

#[test]
fn what_could_never_fit_the_pool_is_refused() {
    let engine = engine_with_pool(64, 0);
    let ids = prompt(&engine, "hi");
    let seq = || engine.new_sequence(&ids, &options(20)).unwrap();
    let one = seq().max_cache_tokens();
    let worker = WorkerHandle::spawn(engine.clone(), WorkerConfig::default()).unwrap();
    let (four, _rx) = Job::new(vec![seq(), seq(), seq(), seq()]);
    assert_eq!(
        worker.submit(four).unwrap_err(),
        SubmitError::TooLarge { needed: 4 * one, budget: 64 }
    );
    let (two, mut rx) = Job::new(vec![seq(), seq()]);
    worker.submit(two).unwrap();
    let solo = self::engine().generate(&ids, &options(20), |_| true).unwrap();
    for (text, _) in drain(&mut rx, 2) {
        assert_eq!(text, solo.text);
    }
}

#[test]
fn choices_of_one_request_compute_their_prompt_once() {
    let engine = engine();
    let worker = WorkerHandle::spawn(engine.clone(), WorkerConfig::default()).unwrap();
    let ids = prompt(&engine, "several choices share this prompt, computed only once");
    let (job, mut rx) =
        Job::new((0..3).map(|_| engine.new_sequence(&ids, &options(12)).unwrap()).collect());
    worker.submit(job).unwrap();
    let solo = engine.generate(&ids, &options(12), |_| true).unwrap();
    for (text, finish) in drain(&mut rx, 3) {
        assert_eq!(text, solo.text);
        assert_eq!(finish, Some(solo.finish_reason));
    }
    assert_eq!(worker.stats().shared_prompt_tokens(), 2 * (ids.len() - 1), "two choices shared");

    // What the worker does, step by step: the others wait, then get all but the last token.
    let mut seqs: Vec<_> =
        (0..2).map(|_| engine.new_sequence(&ids, &options(3)).unwrap()).collect();
    let (first, others) = seqs.split_at_mut(1);
    assert!(!engine.share_prompt(&first[0], &mut others[0]).unwrap(), "nothing computed yet");
    engine.step(&mut [&mut first[0]]).unwrap();
    assert!(engine.share_prompt(&first[0], &mut others[0]).unwrap());
    assert_eq!(others[0].cached_prompt_tokens(), ids.len() - 1);
    let out = engine.step(&mut [&mut others[0]]).unwrap();
    assert_eq!(out[0].token.as_ref().map(|t| t.id), first[0].generated().first().map(|t| t.id));
}

/// Requests that arrive together with the same long system prompt compute it once: the later
/// ones wait a step, take the earlier one's keys and values for the shared prefix, and still
/// answer exactly what they answer alone.
#[test]
fn simultaneous_requests_share_a_common_prefix() {
    let engine = engine();
    // Slow steps, so that all three are in the batch while the first is still running however
    // loaded the machine is.
    let config =
        WorkerConfig { step_delay: Some(Duration::from_millis(20)), ..WorkerConfig::default() };
    let worker = WorkerHandle::spawn(engine.clone(), config).unwrap();
    let system = "You are a careful assistant for a shipping company. Answer in one short \
                  sentence, never guess tracking numbers, and be polite to every customer.";
    let questions = ["where is my parcel?", "can I change the address?", "what are your hours?"];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            let messages = [ChatMessage::system(system), ChatMessage::user(*q)];
            engine.encode_chat(&messages).unwrap().ids
        })
        .collect();
    let common = prompts[0].iter().zip(&prompts[1]).take_while(|(a, b)| a == b).count();
    assert!(common >= phi_server::worker::MIN_SHARED_PREFIX, "the prompts share {common} tokens");

    let mut receivers = Vec::new();
    for ids in &prompts {
        let (job, rx) = Job::new(vec![engine.new_sequence(ids, &options(10)).unwrap()]);
        worker.submit(job).unwrap();
        receivers.push(rx);
    }
    for (ids, rx) in prompts.iter().zip(&mut receivers) {
        let solo = engine.generate(ids, &options(10), |_| true).unwrap();
        let out = drain(rx, 1);
        assert_eq!(out[0].0, solo.text, "a shared prefix changed the answer");
        assert_eq!(out[0].1, Some(solo.finish_reason));
    }
    // The second and third took the system prompt from the first (from its computed cache, or
    // after waiting a step for it).
    let shared = worker.stats().shared_prompt_tokens();
    assert!(
        shared >= 2 * common,
        "shared {shared} prompt tokens, expected at least {}",
        2 * common
    );
}
