//! The engine worker: one thread that owns the stepping of every running sequence.
//!
//! Requests arrive over a bounded channel (the waiting queue). Each iteration the worker admits
//! waiting requests while the batch has room, drops requests whose client went away, and calls
//! [`Engine::step`] once over every unfinished sequence of every running request: one batched
//! forward pass per generated token for all of them (continuous batching: a request joins and
//! leaves the batch between any two steps). Each request's [`StepOutput`]s go back over its own
//! unbounded tokio channel, so the worker never waits for a slow client.
//!
//! Memory: every sequence's keys and values live in blocks of the engine's KV pool (see
//! `phi_engine::kv_pool`), taken as the sequence grows. A request joins the batch when the pool
//! has the blocks for its prompt; when running sequences later need more blocks than are free,
//! the newest request is preempted (its blocks given back, its progress kept) and resumes,
//! recomputing what it had, once blocks are free again. The oldest request is never preempted,
//! and no request is accepted that could not run alone, so every request finishes.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phi_engine::engine::{Engine, Sequence, StepOutput};
use phi_engine::error::EngineError;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Batching limits of the worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Most sequences stepped together (a request with `n` choices counts `n`). A request larger
    /// than this still runs, alone.
    pub max_batch: usize,
    /// Most requests waiting to join the batch; one more is refused with 429. With 0 every
    /// request is refused.
    pub max_queue: usize,
    /// Most prompt tokens (summed over the sequences) waiting to join the batch; a request that
    /// would pass it is refused with 429, except into an empty queue, so that one long prompt
    /// can always wait its turn.
    pub max_queue_tokens: usize,
    /// Pause after every step. Only for tests, which need generation slow enough to observe
    /// queueing and disconnects on a tiny model.
    pub step_delay: Option<Duration>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig { max_batch: 8, max_queue: 64, max_queue_tokens: usize::MAX, step_delay: None }
    }
}

/// What the worker reports to a request.
#[derive(Debug, Clone)]
pub enum WorkerEvent {
    /// One step's output for choice `choice` of the request.
    Step {
        /// Index of the sequence in [`Job::sequences`].
        choice: usize,
        /// What the step produced.
        output: StepOutput,
    },
    /// The engine failed; the request is over.
    Failed(String),
    /// The request's deadline passed while it waited for a place in the batch; it never ran.
    Expired,
}

/// A request for the worker: its sequences (one per choice) and where to send their outputs.
#[derive(Debug)]
pub struct Job {
    /// The choices, created and validated by [`Engine::new_sequence`].
    pub sequences: Vec<Sequence>,
    /// Where outputs go; dropping the receiver cancels the job.
    pub events: UnboundedSender<WorkerEvent>,
    stopper: ChoiceStopper,
    /// When the request must be over: still waiting then, it expires; still running, its
    /// choices end with `length`.
    deadline: Option<Instant>,
}

/// Stops single choices of a job (a choice blocked by the content filter): the worker no longer
/// steps a stopped sequence and sends no more events for it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ChoiceStopper(Arc<[AtomicBool]>);

impl ChoiceStopper {
    /// Stops choice `choice` before the worker's next step.
    pub fn stop(&self, choice: usize) {
        if let Some(flag) = self.0.get(choice) {
            flag.store(true, Ordering::Release);
        }
    }

    /// Whether choice `choice` was stopped.
    pub fn is_stopped(&self, choice: usize) -> bool {
        self.0.get(choice).is_some_and(|f| f.load(Ordering::Acquire))
    }
}

impl Job {
    /// A job and the receiver of its events.
    pub fn new(sequences: Vec<Sequence>) -> (Self, UnboundedReceiver<WorkerEvent>) {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let stopper = ChoiceStopper((0..sequences.len()).map(|_| AtomicBool::new(false)).collect());
        (Job { sequences, events, stopper, deadline: None }, rx)
    }

    /// Sets the request's deadline.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// The handle that stops single choices of this job.
    pub fn stopper(&self) -> ChoiceStopper {
        self.stopper.clone()
    }

    fn active(&self, choice: usize) -> bool {
        !self.sequences[choice].is_finished() && !self.stopper.is_stopped(choice)
    }

    fn unfinished(&self) -> usize {
        (0..self.sequences.len()).filter(|&c| self.active(c)).count()
    }

    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Prompt tokens of all its sequences (what it costs the queue).
    fn prompt_tokens(&self) -> usize {
        self.sequences.iter().map(Sequence::prompt_len).sum()
    }

    /// KV-cache tokens its sequences may grow to together (what must fit the pool for the
    /// request to run alone).
    fn cache_tokens(&self) -> usize {
        self.sequences.iter().map(Sequence::max_cache_tokens).sum()
    }

    /// Pool blocks its unfinished sequences still need for what they have to compute before
    /// their next token: the first choice's prompt, and one block for each other choice with
    /// the same prompt (they share the first's blocks).
    fn blocks_needed(&self) -> usize {
        let Some(first) = self.sequences.first() else { return 0 };
        let others = self.sequences[1..].iter().filter(|s| !s.is_finished());
        first.blocks_needed()
            + others
                .map(|s| if s.prompt() == first.prompt() { 1 } else { s.blocks_needed() })
                .sum::<usize>()
    }
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full (answer 429).
    QueueFull,
    /// The worker thread has stopped (answer 503).
    Stopped,
    /// The request's sequences could grow to `needed` KV-cache tokens, more than the whole
    /// pool of `budget` (answer 400: fewer `max_tokens` or choices would fit).
    TooLarge {
        /// Tokens the request may grow to, all its choices together.
        needed: usize,
        /// The worker's whole budget.
        budget: usize,
    },
}

/// Live counts of the worker's load, for `/health`, `/metrics` and draining.
#[derive(Debug, Default)]
pub struct WorkerStats {
    queued: AtomicUsize,
    queued_tokens: AtomicUsize,
    running: AtomicUsize,
    running_sequences: AtomicUsize,
    preempted: AtomicUsize,
    preemptions: AtomicUsize,
    cache_bytes: AtomicUsize,
    budget_tokens: AtomicUsize,
    blocks_total: AtomicUsize,
    blocks_free: AtomicUsize,
    blocks_cached: AtomicUsize,
    shared_prompt_tokens: AtomicUsize,
}

impl WorkerStats {
    /// Requests waiting for a place in the batch.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Prompt tokens of the waiting requests.
    pub fn queued_tokens(&self) -> usize {
        self.queued_tokens.load(Ordering::Acquire)
    }

    /// Requests in the batch, or preempted from it and waiting to resume.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Requests preempted (their KV blocks given to others) and waiting to resume.
    pub fn preempted(&self) -> usize {
        self.preempted.load(Ordering::Acquire)
    }

    /// Preemptions so far (a running total).
    pub fn preemptions(&self) -> usize {
        self.preemptions.load(Ordering::Acquire)
    }

    /// Blocks of the KV pool.
    pub fn blocks_total(&self) -> usize {
        self.blocks_total.load(Ordering::Acquire)
    }

    /// Blocks of the KV pool that no one holds.
    pub fn blocks_free(&self) -> usize {
        self.blocks_free.load(Ordering::Acquire)
    }

    /// Blocks of the KV pool held only by the prefix cache (given up when others need them).
    pub fn blocks_cached(&self) -> usize {
        self.blocks_cached.load(Ordering::Acquire)
    }

    /// Blocks of the KV pool held by sequences.
    pub fn blocks_used(&self) -> usize {
        self.blocks_total().saturating_sub(self.blocks_free() + self.blocks_cached())
    }

    /// Unfinished sequences in the batch.
    pub fn running_sequences(&self) -> usize {
        self.running_sequences.load(Ordering::Acquire)
    }

    /// KV-cache bytes held by the requests in the batch.
    pub fn cache_bytes(&self) -> usize {
        self.cache_bytes.load(Ordering::Acquire)
    }

    /// Token positions of the KV pool.
    pub fn budget_tokens(&self) -> usize {
        self.budget_tokens.load(Ordering::Acquire)
    }

    /// Prompt tokens that sequences took from another running sequence instead of computing
    /// them: the choices of an `n > 1` request from their first choice, and requests that
    /// start with what a request in the batch already computed (a running total).
    pub fn shared_prompt_tokens(&self) -> usize {
        self.shared_prompt_tokens.load(Ordering::Acquire)
    }

    /// Whether nothing runs or waits.
    pub fn is_idle(&self) -> bool {
        self.queued() == 0 && self.running() == 0
    }
}

/// The fewest prompt tokens worth taking from another running request (and waiting a step
/// for): a system prompt, not the few tokens of the chat template every prompt starts with.
pub const MIN_SHARED_PREFIX: usize = 16;

/// How long the lone running request waits for KV blocks that a request not yet queued holds
/// (see `Worker::wait_for_outside_blocks`) before its step fails.
const OUTSIDE_BLOCKS_WAIT: Duration = Duration::from_secs(2);

/// The sending side of the worker; cheap to clone, shared by all handlers.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    queue: Sender<Job>,
    stats: Arc<WorkerStats>,
    max_queue: usize,
    max_queue_tokens: usize,
    kv_cache_tokens: usize,
}

impl WorkerHandle {
    /// Starts the worker thread. It runs until every handle is dropped and the running requests
    /// are done.
    pub fn spawn(engine: Arc<Engine>, config: WorkerConfig) -> std::io::Result<Self> {
        // The channel itself is unbounded: the bound is `stats.queued`, which also counts the
        // job the worker holds back while the batch is full.
        let (queue, rx) = mpsc::channel();
        let stats = Arc::new(WorkerStats::default());
        let (max_queue, max_queue_tokens) = (config.max_queue, config.max_queue_tokens);
        let kv_cache_tokens = engine.kv_pool().map_err(std::io::Error::other)?.capacity_tokens();
        stats.budget_tokens.store(kv_cache_tokens, Ordering::Release);
        let worker = Worker {
            engine,
            config,
            rx,
            running: Vec::new(),
            preempted: VecDeque::new(),
            held: None,
            stats: stats.clone(),
        };
        worker.publish();
        std::thread::Builder::new().name("phi-engine-worker".into()).spawn(move || worker.run())?;
        Ok(WorkerHandle { queue, stats, max_queue, max_queue_tokens, kv_cache_tokens })
    }

    /// Queues a job without waiting: refused when `max_queue` requests, or `max_queue_tokens`
    /// prompt tokens with this one's, already wait.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let needed = job.cache_tokens();
        if needed > self.kv_cache_tokens {
            return Err(SubmitError::TooLarge { needed, budget: self.kv_cache_tokens });
        }
        // Reserved before sending, so the worker never takes off more than was counted.
        let tokens = job.prompt_tokens();
        self.stats
            .queued_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t == 0 || t.saturating_add(tokens) <= self.max_queue_tokens)
                    .then_some(t.saturating_add(tokens))
            })
            .map_err(|_| SubmitError::QueueFull)?;
        let reserved = self.stats.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
            (q < self.max_queue).then_some(q + 1)
        });
        if reserved.is_err() {
            self.stats.queued_tokens.fetch_sub(tokens, Ordering::AcqRel);
            return Err(SubmitError::QueueFull);
        }
        self.queue.send(job).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            self.stats.queued_tokens.fetch_sub(tokens, Ordering::AcqRel);
            SubmitError::Stopped
        })
    }

    /// The worker's load.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }
}

struct Worker {
    engine: Arc<Engine>,
    config: WorkerConfig,
    rx: Receiver<Job>,
    /// Jobs in the batch, oldest first.
    running: Vec<Job>,
    /// Jobs taken out of the batch to free KV blocks, next to resume first; they go back in
    /// before any new job.
    preempted: VecDeque<Job>,
    /// A job taken off the queue that did not fit in the batch yet (still counted as queued).
    held: Option<Job>,
    stats: Arc<WorkerStats>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.held.is_none() && self.preempted.is_empty() {
                // Idle: sleep until a request arrives, or stop when the server is gone.
                match self.rx.recv() {
                    Ok(job) => self.held = Some(job),
                    Err(_) => return,
                }
            }
            self.admit();
            self.end_expired();
            self.retire();
            self.publish();
            if self.running.is_empty() {
                continue;
            }
            self.step();
            self.retire();
            self.publish();
            if let Some(delay) = self.config.step_delay {
                std::thread::sleep(delay);
            }
        }
    }

    /// Gives the waiting choices of `n > 1` requests whose first choice has just computed the
    /// prompt its keys and values, so each computes only the prompt's last token itself.
    fn share_prompts(&mut self) {
        for job in self.running.iter_mut().filter(|j| j.sequences.len() > 1) {
            let (first, others) = job.sequences.split_at_mut(1);
            if first[0].in_prompt() {
                continue;
            }
            for other in others.iter_mut().filter(|s| s.in_prompt() && !s.is_finished()) {
                match self.engine.share_prompt(&first[0], other) {
                    Ok(true) => {
                        let n = other.cached_prompt_tokens();
                        self.stats.shared_prompt_tokens.fetch_add(n, Ordering::AcqRel);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "could not share a prompt between choices")
                    }
                }
            }
        }
    }

    /// Gives every sequence of the batch that has computed nothing yet the longest prefix of
    /// its prompt that a sequence of another request has computed (a shared system prompt, the
    /// same conversation so far), when it is at least [`MIN_SHARED_PREFIX`] tokens.
    fn share_prefixes(&mut self) {
        let mut pairs = Vec::new();
        for (tj, job) in self.running.iter().enumerate() {
            for (tc, to) in job.sequences.iter().enumerate() {
                if to.is_finished() || to.computed_tokens() > 0 || !to.in_prompt() {
                    continue;
                }
                let best = self
                    .running
                    .iter()
                    .enumerate()
                    .filter(|(fj, _)| *fj != tj)
                    .flat_map(|(fj, j)| {
                        j.sequences.iter().enumerate().map(move |(fc, f)| (fj, fc, f))
                    })
                    .map(|(fj, fc, f)| (self.engine.shareable_prefix(f, to), fj, fc))
                    .max();
                if let Some((len, fj, fc)) = best.filter(|b| b.0 >= MIN_SHARED_PREFIX) {
                    pairs.push((fj, fc, tj, tc, len));
                }
            }
        }
        for (fj, fc, tj, tc, _) in pairs {
            let (from, to) = if fj < tj {
                let (left, right) = self.running.split_at_mut(tj);
                (&left[fj].sequences[fc], &mut right[0].sequences[tc])
            } else {
                let (left, right) = self.running.split_at_mut(fj);
                (&right[0].sequences[fc], &mut left[tj].sequences[tc])
            };
            match self.engine.share_prefix(from, to, MIN_SHARED_PREFIX) {
                Ok(n) => {
                    self.stats.shared_prompt_tokens.fetch_add(n, Ordering::AcqRel);
                }
                Err(e) => tracing::warn!(error = %e, "could not share a prompt prefix"),
            }
        }
    }

    /// Whether the not yet started sequence `seq` of job `j` should wait a step: an earlier
    /// sequence of the batch is still computing a prefix of at least [`MIN_SHARED_PREFIX`]
    /// tokens that `seq`'s prompt starts with, which it can then take instead of computing.
    fn waits_for_shared_prefix(&self, j: usize, seq: &Sequence) -> bool {
        if seq.computed_tokens() > 0 || !seq.in_prompt() {
            return false;
        }
        let wanted = &seq.prompt()[..seq.prompt_len() - 1];
        let earlier = self.running[..j].iter().flat_map(|job| {
            job.sequences.iter().enumerate().filter(|(c, _)| !job.stopper.is_stopped(*c))
        });
        earlier.map(|(_, s)| s).any(|earlier| {
            if earlier.is_finished() || !earlier.in_prompt() {
                return false;
            }
            let common = earlier.prompt().iter().zip(wanted).take_while(|(a, b)| a == b).count();
            common >= MIN_SHARED_PREFIX && earlier.computed_tokens() < common
        })
    }

    /// Ends the choices of running jobs whose deadline has passed (`length`, the text so far
    /// flushed), so they leave the batch now.
    fn end_expired(&mut self) {
        let now = Instant::now();
        for job in self.running.iter_mut().filter(|j| j.expired(now)) {
            for (choice, seq) in job.sequences.iter_mut().enumerate() {
                if seq.is_finished() || job.stopper.is_stopped(choice) {
                    continue;
                }
                match self.engine.end_sequence(seq) {
                    Ok(output) => {
                        let _ = job.events.send(WorkerEvent::Step { choice, output });
                    }
                    Err(e) => {
                        job.stopper.stop(choice);
                        let _ = job.events.send(WorkerEvent::Failed(e.to_string()));
                    }
                }
            }
        }
    }

    /// Drops finished and cancelled jobs (a job whose choices were all stopped by the content
    /// filter is done too); their sequences' KV blocks go back to the pool.
    fn retire(&mut self) {
        self.running.retain(|job| job.unfinished() > 0 && !job.cancelled());
    }

    /// Publishes the batch's size and memory.
    fn publish(&self) {
        let sequences = self.running.iter().map(Job::unfinished).sum();
        let bytes = self.running.iter().flat_map(|j| &j.sequences).map(Sequence::cache_bytes).sum();
        let pool = self.engine.kv_stats();
        self.stats.running_sequences.store(sequences, Ordering::Release);
        self.stats.cache_bytes.store(bytes, Ordering::Release);
        self.stats.blocks_total.store(pool.total_blocks, Ordering::Release);
        self.stats.blocks_free.store(pool.free_blocks, Ordering::Release);
        self.stats.blocks_cached.store(pool.cached_blocks, Ordering::Release);
        self.stats.preempted.store(self.preempted.len(), Ordering::Release);
        let admitted = self.running.len() + self.preempted.len();
        self.stats.running.store(admitted, Ordering::Release);
    }

    /// Takes the newest job out of the batch, its KV blocks back to the pool (its progress
    /// kept), to resume before any new job once there is room.
    fn preempt_newest(&mut self) {
        let Some(mut job) = self.running.pop() else { return };
        for seq in &mut job.sequences {
            self.engine.preempt(seq);
        }
        tracing::info!(
            running = self.running.len(),
            preempted = self.preempted.len() + 1,
            "KV cache full: preempted the newest request"
        );
        self.stats.preemptions.fetch_add(1, Ordering::AcqRel);
        self.preempted.push_front(job);
    }

    /// The lone running request ran out of KV blocks while requests that have not started hold
    /// some: the prefix-cache blocks a request takes when it is made, before it queues. Every
    /// waiting request (the one held for admission, those still in the channel, the preempted
    /// ones) gives them back and waits in the preempted line, in arrival order; each looks its
    /// prefix up again when it starts. Returns whether any block came free.
    fn release_waiting(&mut self) -> bool {
        let before = self.engine.kv_stats().available_blocks();
        let mut waiting: Vec<Job> = self.held.take().into_iter().collect();
        while let Ok(job) = self.rx.try_recv() {
            waiting.push(job);
        }
        for job in waiting {
            self.dequeued(&job);
            self.preempted.push_back(job);
        }
        for job in self.preempted.iter_mut() {
            for seq in &mut job.sequences {
                self.engine.preempt(seq);
            }
        }
        let freed = self.engine.kv_stats().available_blocks() > before;
        if freed {
            tracing::info!(
                preempted = self.preempted.len(),
                "KV cache full: waiting requests gave back their prefix-cache blocks"
            );
        }
        freed
    }

    /// The lone running request ran out of KV blocks and no waiting request held any: the
    /// missing blocks are held outside the worker, by a request whose handler has taken its
    /// prefix-cache blocks and not yet queued it (microseconds, longer on a loaded machine).
    /// Every request fits the pool alone, so they come back: waits up to
    /// [`OUTSIDE_BLOCKS_WAIT`] for that request to arrive (and give them back) or to be dropped.
    /// Returns whether any block came free.
    fn wait_for_outside_blocks(&mut self) -> bool {
        let deadline = Instant::now() + OUTSIDE_BLOCKS_WAIT;
        let before = self.engine.kv_stats().available_blocks();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            if self.release_waiting() || self.engine.kv_stats().available_blocks() > before {
                return true;
            }
        }
        false
    }

    /// Whether a job whose sequences need `blocks` more KV blocks fits now: the pool must
    /// also keep one block for each running sequence's next step.
    fn has_room_for(&self, blocks: usize) -> bool {
        let active: usize = self.running.iter().map(Job::unfinished).sum();
        active == 0 || self.engine.kv_stats().available_blocks() >= blocks + active
    }

    /// Puts preempted jobs back in the batch, oldest first, while they fit; `false` when one
    /// is still waiting (then no new job may pass it).
    fn resume(&mut self) -> bool {
        while let Some(job) = self.preempted.pop_front() {
            if job.cancelled() {
                continue;
            }
            if job.expired(Instant::now()) {
                let mut job = job;
                for (choice, seq) in job.sequences.iter_mut().enumerate() {
                    if seq.is_finished() || job.stopper.is_stopped(choice) {
                        continue;
                    }
                    if let Ok(output) = self.engine.end_sequence(seq) {
                        let _ = job.events.send(WorkerEvent::Step { choice, output });
                    }
                }
                continue;
            }
            let active: usize = self.running.iter().map(Job::unfinished).sum();
            let too_many = active > 0 && active + job.unfinished() > self.config.max_batch;
            if too_many || !self.has_room_for(job.blocks_needed()) {
                self.preempted.push_front(job);
                return false;
            }
            self.running.push(job);
        }
        true
    }

    /// Takes a job off the queue's counts.
    fn dequeued(&self, job: &Job) {
        self.stats.queued_tokens.fetch_sub(job.prompt_tokens(), Ordering::AcqRel);
        self.stats.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// Moves waiting jobs into the batch while there is room, preempted ones first.
    fn admit(&mut self) {
        if !self.resume() {
            return;
        }
        loop {
            if self.held.is_none() {
                match self.rx.try_recv() {
                    Ok(job) => self.held = Some(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
                }
            }
            let Some(job) = self.held.take() else { return };
            if job.cancelled() {
                self.dequeued(&job);
                continue;
            }
            if job.expired(Instant::now()) {
                self.dequeued(&job);
                let _ = job.events.send(WorkerEvent::Expired);
                continue;
            }
            let active: usize = self.running.iter().map(Job::unfinished).sum();
            let too_many = active > 0 && active + job.sequences.len() > self.config.max_batch;
            // Submission refused jobs larger than the whole pool, so this one fits once the
            // batch has emptied enough.
            if too_many || !self.has_room_for(job.blocks_needed()) {
                self.held = Some(job);
                return;
            }
            self.dequeued(&job);
            self.running.push(job);
        }
    }

    /// One batched forward pass over every unfinished sequence; outputs go to their jobs. When
    /// the KV pool runs out, the newest job is preempted and the step tried again.
    fn step(&mut self) {
        loop {
            let message = match self.try_step() {
                Ok(()) => return,
                Err(Some(EngineError::KvCacheFull { .. })) if self.running.len() > 1 => {
                    self.preempt_newest();
                    continue;
                }
                Err(Some(EngineError::KvCacheFull { .. })) if self.release_waiting() => continue,
                Err(Some(EngineError::KvCacheFull { .. })) if self.wait_for_outside_blocks() => {
                    continue
                }
                Err(Some(e)) => format!("the engine failed: {e}"),
                Err(None) => "the engine panicked".to_string(),
            };
            // The batch's state is unknown after a failure: end every request in it.
            tracing::error!(error = %message, requests = self.running.len(), "engine step failed");
            for job in self.running.drain(..) {
                let _ = job.events.send(WorkerEvent::Failed(message.clone()));
            }
            return;
        }
    }

    /// One step; `Err(None)` when the engine panicked.
    fn try_step(&mut self) -> Result<(), Option<EngineError>> {
        // Requests admitted since the last step take what the batch has already computed.
        self.share_prompts();
        self.share_prefixes();
        let mut owners = Vec::new();
        let waiting: Vec<(usize, usize)> = (0..self.running.len())
            .flat_map(|j| (0..self.running[j].sequences.len()).map(move |c| (j, c)))
            .filter(|&(j, c)| self.waits_for_shared_prefix(j, &self.running[j].sequences[c]))
            .collect();
        let mut seqs: Vec<&mut Sequence> = Vec::new();
        for (j, job) in self.running.iter_mut().enumerate() {
            let stopper = &job.stopper;
            // The other choices of an `n > 1` request wait while the first computes the prompt
            // they share (see `share_prompts`), unless they already hold a reused prefix.
            let first_in_prompt = job.sequences.first().is_some_and(|s| s.in_prompt());
            for (c, seq) in job.sequences.iter_mut().enumerate() {
                let waits = (c > 0 && first_in_prompt && seq.cached_prompt_tokens() == 0)
                    || waiting.contains(&(j, c));
                if !seq.is_finished() && !stopper.is_stopped(c) && !waits {
                    owners.push((j, c));
                    seqs.push(seq);
                }
            }
        }
        tracing::debug!(
            sequences = seqs.len(),
            pending = ?seqs.iter().map(|s| s.pending_tokens()).collect::<Vec<_>>(),
            waiting = waiting.len(),
            "step"
        );
        let engine = &self.engine;
        let result = catch_unwind(AssertUnwindSafe(|| engine.step(&mut seqs)));
        drop(seqs);
        match result {
            Ok(Ok(outputs)) => {
                for ((j, choice), output) in owners.into_iter().zip(outputs) {
                    // A prompt chunk (or a prompt still waiting for its share of the step's
                    // budget) produced nothing to report.
                    if output.token.is_none()
                        && output.finish_reason.is_none()
                        && output.text.is_empty()
                    {
                        continue;
                    }
                    // A closed receiver is noticed (and the job dropped) before the next step.
                    let _ = self.running[j].events.send(WorkerEvent::Step { choice, output });
                }
                self.share_prompts();
                self.share_prefixes();
                Ok(())
            }
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(None),
        }
    }
}
