//! The engine a server or the CLI talks to: a loaded model with its tokenizer, chat template and
//! stop tokens, and [`Sequence`]s that it advances one batched forward pass at a time.
//!
//! A [`Sequence`] owns everything per request (tokens, KV cache, sampler, stop strings, streaming
//! detokenizer), so any number of them can share [`Engine::step`]: that is the seam on which the
//! serving core's scheduler builds continuous batching.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::chat_template::{ChatMessage, ChatTemplate, RenderedPrompt, SystemRolePolicy};
use crate::checkpoint::{CheckpointFiles, ModelSource};
use crate::config::GenerationConfig;
use crate::detokenizer::StreamDecoder;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::SequenceCache;
use crate::kv_pool::{KvPool, PoolStats};
use crate::model::Model;
use crate::phi3::BatchItem;
use crate::prefix_cache::PrefixCacheStats;
use crate::quantize::QuantScheme;
use crate::rope::LongRopePolicy;
use crate::sampling::{SampledToken, Sampler, SamplingParams};
use crate::step_logits::{picks_on_device, RowChoice, RowNeed, StepLogits};
use crate::stop::StopStrings;
use crate::tokenizer::PhiTokenizer;
use rayon::prelude::*;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where weights and activations live.
    pub device: Device,
    /// Activation and weight dtype (f32 by default on CPU; bf16 is the usual choice on GPUs).
    pub dtype: DType,
    /// What to do with system messages (see [`SystemRolePolicy`]).
    pub system_role: SystemRolePolicy,
    /// When LongRoPE models switch to their long factors.
    pub long_rope: LongRopePolicy,
    /// Prompt tokens a sequence feeds per step (chunked prefill), so one long prompt does not
    /// stall the other sequences of a batch; `None` for whole prompts.
    pub prefill_chunk: Option<usize>,
    /// Bytes of finished sequences' keys and values kept for reuse by later prompts that start
    /// the same way (see [`crate::prefix_cache`]); 0 turns reuse off. They are blocks of the KV
    /// pool, given up whenever running sequences need them.
    pub prefix_cache_bytes: usize,
    /// Token positions of the KV-cache pool (see [`crate::kv_pool`]); `None` for
    /// [`crate::phi3::default_pool_tokens`], made on first use, so that a server can size it
    /// with [`Engine::set_kv_cache_tokens`] from the memory left once the model is loaded.
    pub kv_cache_tokens: Option<usize>,
    /// Quantize a safetensors checkpoint's matrices to this GGUF block format as they load
    /// (`--quantize q8_0`, ...); `None` keeps them dense.
    pub quantize: Option<QuantScheme>,
    /// Element type of the KV cache; `None` for the default: `f16` on the CPU when the
    /// matrices are block-quantized (as llama.cpp caches; the cache is then a large share of
    /// what a decode step reads), otherwise the activation dtype, as the reference caches.
    pub kv_cache_dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            system_role: SystemRolePolicy::Auto,
            long_rope: LongRopePolicy::Dynamic,
            prefill_chunk: Some(512),
            prefix_cache_bytes: 0,
            kv_cache_tokens: None,
            quantize: None,
            kv_cache_dtype: None,
        }
    }
}

/// A model ready to generate.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    tokenizer: PhiTokenizer,
    template: ChatTemplate,
    stop_token_ids: BTreeSet<u32>,
    /// Embedding rows with no token (Phi-3's 32011..32063): never sampled.
    padding_ids: Vec<u32>,
    files: CheckpointFiles,
    prefill_chunk: Option<usize>,
    /// Tokens picked on the device and by the host sampler, for [`Engine::sampling_stats`].
    picked_on_device: AtomicU64,
    picked_on_host: AtomicU64,
}

/// Where the engine's sampled tokens were picked, since it was loaded: exists so that an
/// operator can see whether a GPU's traffic takes its sampling kernels or falls back to copying
/// logits out (on a CPU every token is the host's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SamplingStats {
    /// Picked where the logits are (a GPU's greedy and sampling kernels).
    pub on_device: u64,
    /// Picked by the host sampler from logits in host memory.
    pub on_host: u64,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the context window is full.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Per-request generation settings beyond sampling.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Sampling parameters (validated when the sequence is created).
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None` for as many as the context allows; `Some(0)` computes
    /// the prompt only (to score it, or to leave it in the prefix cache) and ends `length`.
    pub max_tokens: Option<usize>,
    /// Up to four stop strings, matched on the text across token boundaries.
    pub stop: Vec<String>,
    /// Keep generating through stop tokens (benchmarks want a fixed length).
    pub ignore_eos: bool,
    /// Decode the text as a continuation of the prompt's (a text completion: the first token
    /// keeps its leading space) rather than on its own (a chat answer, as transformers decodes
    /// the new tokens); see [`StreamDecoder::after_prompt`].
    pub decode_after_prompt: bool,
    /// Score the prompt: every prompt token after the first gets its log-probability given the
    /// tokens before it (with the alternatives the sampling parameters' `top_logprobs` asks for),
    /// in [`StepOutput::prompt_logprobs`] of the step that completes the prompt; what a text
    /// completion's `echo` with `logprobs` answers, and evaluation harnesses sum. Such a sequence
    /// computes its whole prompt itself: positions reused from the prefix cache or from another
    /// sequence have no logits.
    pub prompt_logprobs: bool,
}

/// One generated token with its log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// Token id.
    pub id: u32,
    /// Log-probability under the model's raw distribution; `None` unless the request asked
    /// for logprobs.
    pub logprob: Option<f32>,
    /// Most likely alternatives, when requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What one step produced for one sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Text that became final in this step (may be empty while a stop string or a multi-byte
    /// character is pending).
    pub text: String,
    /// The token sampled in this step, unless the step only consumed prompt (chunked prefill).
    pub token: Option<GeneratedToken>,
    /// Set when the sequence has ended.
    pub finish_reason: Option<FinishReason>,
    /// With [`GenerateOptions::prompt_logprobs`], on the step that completes the prompt: one
    /// entry for each prompt token, in order, the first without a log-probability (nothing
    /// comes before it); empty otherwise.
    pub prompt_logprobs: Vec<GeneratedToken>,
}

/// One request's generation state.
#[derive(Debug)]
pub struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    cache: SequenceCache,
    sampler: Sampler,
    stops: StopStrings,
    decoder: StreamDecoder,
    max_new: usize,
    ignore_eos: bool,
    text: String,
    generated: Vec<GeneratedToken>,
    finish: Option<FinishReason>,
    prefill_chunk: Option<usize>,
    timings: Timings,
    /// Prompt tokens whose keys and values came from the prefix cache.
    cached_prompt_tokens: usize,
    /// Set when the sequence was preempted: its next step first looks for its tokens in the
    /// prefix cache, where its own blocks went.
    preempted: bool,
    /// Times the sequence was preempted.
    preemptions: usize,
    /// While a scored prompt ([`GenerateOptions::prompt_logprobs`]) is computed: the entries of
    /// its first tokens so far (the first without a score); taken into the output once the
    /// prompt is complete.
    prompt_scores: Option<Vec<GeneratedToken>>,
}

/// Wall-clock time spent on a sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Until the first token was sampled (prompt processing).
    pub prompt: Duration,
    /// From the first token to the end.
    pub generation: Duration,
    started: Option<Instant>,
    first_token: Option<Instant>,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_second(&self, n: usize) -> f64 {
        n as f64 / self.prompt.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first (each of them costs one decode step).
    pub fn generation_tokens_per_second(&self, n: usize) -> f64 {
        n.saturating_sub(1) as f64 / self.generation.as_secs_f64().max(1e-9)
    }
}

/// The finished result of [`Engine::generate`].
#[derive(Debug, Clone)]
pub struct Completion {
    /// The generated text, cut before a stop string, special tokens removed.
    pub text: String,
    /// Every generated token (a final stop token included).
    pub tokens: Vec<GeneratedToken>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Timings.
    pub timings: Timings,
}

impl Sequence {
    /// Prompt length in tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[GeneratedToken] {
        &self.generated
    }

    /// Text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Why the sequence ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Whether the sequence needs no more steps.
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Feed the prompt at most `n` tokens per step (chunked prefill); `None` for all at once.
    pub fn set_prefill_chunk(&mut self, n: Option<usize>) {
        self.prefill_chunk = n;
    }

    /// Time spent so far.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// Most tokens this sequence's cache can hold: its prompt plus its most new tokens, rounded
    /// up to 16 (what must fit the KV pool for it to run alone).
    pub fn max_cache_tokens(&self) -> usize {
        (self.prompt_len + self.max_new).next_multiple_of(16)
    }

    /// The prompt's token ids.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// Tokens whose keys and values are in the cache (computed or reused).
    pub fn computed_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Tokens to compute before the next token can be sampled (1 while decoding; the prompt,
    /// or after a preemption everything so far, before that).
    pub fn pending_tokens(&self) -> usize {
        self.tokens.len() - self.cache.len().min(self.tokens.len())
    }

    /// Blocks of the KV pool the sequence still has to take to compute all its pending tokens.
    pub fn blocks_needed(&self) -> usize {
        self.cache.blocks_needed(self.tokens.len())
    }

    /// Times the sequence gave up its cache to let others run.
    pub fn preemptions(&self) -> usize {
        self.preemptions
    }

    /// Whether some of the prompt is still to be computed.
    pub fn in_prompt(&self) -> bool {
        self.cache.len() < self.prompt_len
    }

    /// Prompt tokens whose keys and values were reused from an earlier sequence, not computed.
    pub fn cached_prompt_tokens(&self) -> usize {
        self.cached_prompt_tokens
    }

    /// Bytes of KV-pool blocks this sequence holds (blocks shared with others included).
    pub fn cache_bytes(&self) -> usize {
        self.cache.allocated_bytes()
    }

    /// Ends the sequence: flushes the detokenizer and held-back text unless a stop string
    /// already cut it, and returns the text released by the flush.
    fn finish(&mut self, mut reason: FinishReason, stopped_by_string: bool) -> Result<String> {
        let mut released = String::new();
        if !stopped_by_string {
            let tail = self.decoder.finish()?;
            let o = self.stops.push(&tail);
            released.push_str(&o.text);
            if o.is_stop() {
                reason = FinishReason::Stop;
            } else {
                released.push_str(&self.stops.finish());
            }
        }
        self.finish = Some(reason);
        if let (Some(first), Some(start)) = (self.timings.first_token, self.timings.started) {
            self.timings.generation = first.elapsed();
            self.timings.prompt = first.duration_since(start);
        }
        Ok(released)
    }
}

impl Engine {
    /// Resolves (downloading if needed) and loads a model.
    pub fn load(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let files = source.resolve()?;
        Self::from_files(files, opts)
    }

    /// Loads a model from resolved files.
    pub fn from_files(files: CheckpointFiles, opts: &LoadOptions) -> Result<Self> {
        let (tokenizer, mut model) = match &files.gguf {
            Some(path) => {
                if opts.quantize.is_some() {
                    return Err(EngineError::InvalidRequest(format!(
                        "{}: a GGUF file loads in the formats it stores; --quantize applies to \
                         safetensors checkpoints",
                        path.display()
                    )));
                }
                let file = GgufFile::open(path)?;
                let tokenizer = file.vocab()?.to_tokenizer()?;
                (tokenizer, Model::from_gguf(&file, opts.dtype, &opts.device)?)
            }
            None => {
                let tokenizer =
                    PhiTokenizer::from_files(&files.tokenizer, files.tokenizer_config.as_deref())?;
                let model = Model::from_checkpoint_quantized(
                    &files,
                    opts.dtype,
                    &opts.device,
                    opts.quantize,
                )?;
                (tokenizer, model)
            }
        };
        let template = ChatTemplate::from_tokenizer(&tokenizer, opts.system_role)?;
        model.set_long_rope_policy(opts.long_rope);
        model.set_prefix_cache_bytes(opts.prefix_cache_bytes);
        let quantized_on_cpu = opts.device.is_cpu() && model.quantization().is_some();
        let kv_dtype = match opts.kv_cache_dtype {
            Some(dtype) => Some(dtype),
            None if quantized_on_cpu && opts.dtype == DType::F32 => Some(DType::F16),
            None => None,
        };
        if let Some(dtype) = kv_dtype {
            model.set_kv_cache_dtype(dtype)?;
        }
        if let Some(tokens) = opts.kv_cache_tokens {
            model.set_kv_pool_tokens(tokens)?;
        }
        let cfg = model.config();

        // Stop on every id the generation config lists, plus the chat turn markers themselves:
        // the published configs disagree on the list (see CHAT_FORMAT.md), the markers do not.
        let mut stop_token_ids: BTreeSet<u32> = cfg.eos_token_ids.iter().copied().collect();
        if let Some(gc) = &files.generation_config {
            stop_token_ids.extend(GenerationConfig::from_file(gc)?.eos_token_ids);
        }
        for marker in ["<|end|>", "<|endoftext|>"] {
            if let Some(id) = tokenizer.token_to_id(marker) {
                stop_token_ids.insert(id);
            }
        }
        if let Some(id) = tokenizer.eos_token_id() {
            stop_token_ids.insert(id);
        }
        // Ids past the tokenizer, and those the model masks itself, are never sampled.
        let masked = model.masked_token_ids();
        let padding_ids: Vec<u32> = (0..cfg.vocab_size as u32)
            .filter(|&id| !tokenizer.contains_id(id) || masked.contains(&id))
            .collect();
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(EngineError::Config {
                path: files.tokenizer.clone(),
                message: format!(
                    "the tokenizer has {} ids but the model only {} embedding rows",
                    tokenizer.vocab_size(),
                    cfg.vocab_size
                ),
            });
        }
        tracing::info!(
            origin = %files.origin,
            architecture = model.architecture(),
            params = model.num_parameters(),
            dtype = ?opts.dtype,
            kv_cache_dtype = ?model.kv_geometry().dtype,
            quantization = model.quantization().map(crate::quantize::dtype_name).unwrap_or("none"),
            system_role = template.resolved_system_role().as_str(),
            "model loaded"
        );
        Ok(Self {
            model,
            tokenizer,
            template,
            stop_token_ids,
            padding_ids,
            files,
            prefill_chunk: opts.prefill_chunk.filter(|&n| n > 0),
            picked_on_device: AtomicU64::new(0),
            picked_on_host: AtomicU64::new(0),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &PhiTokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Token ids that end a generation.
    pub fn stop_token_ids(&self) -> &BTreeSet<u32> {
        &self.stop_token_ids
    }

    /// Where the model came from.
    pub fn files(&self) -> &CheckpointFiles {
        &self.files
    }

    /// Bytes of keys and values one cached token takes (all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.model.kv_geometry().bytes_per_token()
    }

    /// Replaces the KV-cache pool by one of `tokens` positions (rounded up to whole blocks),
    /// e.g. sized from the memory left once the model is loaded. Sequences made before keep
    /// the old pool until they are dropped; the prefix cache starts empty.
    pub fn set_kv_cache_tokens(&self, tokens: usize) -> Result<()> {
        self.model.set_kv_pool_tokens(tokens)
    }

    /// The KV-cache pool sequences draw on.
    pub fn kv_pool(&self) -> Result<KvPool> {
        self.model.kv_pool()
    }

    /// Blocks of the KV-cache pool: total, free, and held only by the prefix cache.
    pub fn kv_stats(&self) -> PoolStats {
        self.model.kv_pool().map(|p| p.stats()).unwrap_or_default()
    }

    /// Free and total bytes of the model's GPU; `None` on the CPU (or when the driver cannot
    /// tell).
    pub fn device_memory(&self) -> Option<(usize, usize)> {
        match self.model.device() {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok(),
            _ => None,
        }
    }

    /// Longest sequence (prompt plus completion) the model accepts.
    pub fn context_length(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    /// Renders and tokenizes a conversation for generation.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<RenderedPrompt> {
        Ok(self.template.render_and_encode(&self.tokenizer, messages, true)?)
    }

    /// Starts a sequence: validates the options and that the prompt fits the context.
    pub fn new_sequence(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<Sequence> {
        let ctx = self.context_length();
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= ctx {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens, but the model's context is {ctx} tokens: at most {} \
                 prompt tokens fit with room for one generated token",
                prompt.len(),
                ctx - 1
            )));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.model.config().vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let room = ctx - prompt.len();
        let max_new = opts.max_tokens.map_or(room, |m| m.min(room));
        opts.sampling.validate_vocab(self.model.config().vocab_size)?;
        let sampler = Sampler::new(opts.sampling.clone())?
            .with_suppressed_tokens(self.padding_ids.iter().copied());
        let reusable = if opts.prompt_logprobs { None } else { self.lookup_prefix(prompt)? };
        let (cache, cached_prompt_tokens) = match reusable {
            Some(reused) => {
                let len = reused.len();
                (reused, len)
            }
            None => (self.model.new_cache()?, 0),
        };
        Ok(Sequence {
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            cache,
            sampler,
            stops: StopStrings::new(opts.stop.iter().cloned())?,
            decoder: if opts.decode_after_prompt {
                StreamDecoder::after_prompt(&self.tokenizer, true, prompt)?
            } else {
                self.tokenizer.stream_decoder(true)?
            },
            max_new,
            ignore_eos: opts.ignore_eos,
            text: String::new(),
            generated: Vec::new(),
            finish: None,
            prefill_chunk: self.prefill_chunk,
            timings: Timings::default(),
            cached_prompt_tokens,
            preempted: false,
            preemptions: 0,
            prompt_scores: opts.prompt_logprobs.then(|| {
                vec![GeneratedToken { id: prompt[0], logprob: None, top_logprobs: Vec::new() }]
            }),
        })
    }

    /// Ends an unfinished sequence now, as if it had reached its most new tokens (a deadline
    /// passed): flushes its pending text and returns the last output, `finish_reason: length`.
    /// Its keys and values go to the prefix cache like any finished sequence's.
    pub fn end_sequence(&self, seq: &mut Sequence) -> Result<StepOutput> {
        if seq.is_finished() {
            return Ok(StepOutput { finish_reason: seq.finish, ..StepOutput::default() });
        }
        let text = seq.finish(FinishReason::Length, false)?;
        seq.text.push_str(&text);
        self.offer_to_prefix_cache(seq);
        Ok(StepOutput { text, finish_reason: seq.finish, ..StepOutput::default() })
    }

    /// Lets the prefix cache (if reuse is on) take hold of the blocks of a sequence that no
    /// longer runs, for later prompts (or for itself after a preemption). The sequence keeps
    /// its own hold until it is dropped, so that sequences still running can share from it.
    fn offer_to_prefix_cache(&self, seq: &Sequence) {
        let pool = seq.cache.pool().clone();
        let mut guard = pool.lock();
        let state = &mut *guard;
        if let Some(prefix) = state.prefix.as_mut() {
            prefix.insert(&mut state.alloc, &seq.tokens, &seq.cache);
        }
    }

    /// Takes a running, unfinished sequence's KV blocks away so that other sequences can grow
    /// (the pool ran out): it keeps its tokens, sampler and text, and its next step computes
    /// everything again, or takes it back from the prefix cache if its blocks are still there.
    /// Its output is unchanged (the same tokens give the same keys and values).
    pub fn preempt(&self, seq: &mut Sequence) {
        // A cache can hold blocks with no position written yet (reserved for the first
        // chunk): those go back too.
        if seq.is_finished() || (seq.cache.is_empty() && seq.cache.allocated_bytes() == 0) {
            return;
        }
        self.offer_to_prefix_cache(seq);
        let factors = seq.cache.factors();
        seq.cache.clear(factors);
        seq.preempted = true;
        seq.preemptions += 1;
    }

    /// Gives `to`, a sequence that has not started, the keys and values of all but the last
    /// token of `from`'s prompt, when both have the same prompt and `from` has computed it
    /// (the other choices of an `n > 1` request): `to` then computes just that last token,
    /// for logits of its own. Returns whether it did.
    pub fn share_prompt(&self, from: &Sequence, to: &mut Sequence) -> Result<bool> {
        let same = to.prompt_len == from.prompt_len && to.prompt() == from.prompt();
        Ok(same && from.cache.len() >= from.prompt_len && self.share_prefix(from, to, 1)? > 0)
    }

    /// How many leading tokens of `to`'s prompt (all but its last, which `to` must compute
    /// for logits of its own) `from` has already computed.
    pub fn shareable_prefix(&self, from: &Sequence, to: &Sequence) -> usize {
        let computed = &from.tokens[..from.cache.len().min(from.tokens.len())];
        let wanted = &to.tokens[..to.prompt_len.saturating_sub(1)];
        computed.iter().zip(wanted).take_while(|(a, b)| a == b).count()
    }

    /// Gives `to`, a sequence that has computed nothing yet, the keys and values of the longest
    /// prefix of its prompt that `from` (another running sequence: the same system prompt, the
    /// same conversation so far) has computed, when it is at least `min_len` tokens. The
    /// blocks are shared, not copied (the one either side writes into next is copied then),
    /// so either may go on or finish alone. Returns the tokens shared (0 when none).
    pub fn share_prefix(
        &self,
        from: &Sequence,
        to: &mut Sequence,
        min_len: usize,
    ) -> Result<usize> {
        let len = self.shareable_prefix(from, to);
        if !to.cache.is_empty() || to.prompt_scores.is_some() || len < min_len.max(1) {
            return Ok(0);
        }
        let Some(shared) = from.cache.share(len) else { return Ok(0) };
        to.cache = shared;
        to.cached_prompt_tokens = len;
        Ok(len)
    }

    /// A cache holding the longest reusable cached prefix of `tokens`, if reuse is on.
    fn lookup_prefix(&self, tokens: &[u32]) -> Result<Option<SequenceCache>> {
        let pool = self.model.kv_pool()?;
        let mut state = pool.lock();
        let state = &mut *state;
        Ok(state.prefix.as_mut().and_then(|p| p.lookup(&mut state.alloc, &pool, tokens)))
    }

    /// Where the sampled tokens were picked so far.
    pub fn sampling_stats(&self) -> SamplingStats {
        SamplingStats {
            on_device: self.picked_on_device.load(Ordering::Relaxed),
            on_host: self.picked_on_host.load(Ordering::Relaxed),
        }
    }

    /// How the prefix cache is used, if reuse is on.
    pub fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        let pool = self.model.kv_pool().ok()?;
        let state = pool.lock();
        state.prefix.as_ref().map(|p| p.stats())
    }

    /// Advances the unfinished sequences by one batched forward pass: one decode token for every
    /// sequence past its prompt, and prompt chunks, oldest sequence first, within the step's
    /// token budget (the engine's prefill chunk, decode tokens included), so that prompts
    /// arriving together never stall the running streams for more than one budget's worth of
    /// work. A sequence whose prompt gets no share this step waits (its output is empty).
    /// Returns one output per sequence, in order (finished ones get an empty one).
    pub fn step(&self, seqs: &mut [&mut Sequence]) -> Result<Vec<StepOutput>> {
        let mut outputs = vec![StepOutput::default(); seqs.len()];
        // A preempted sequence first takes back what the prefix cache still holds of it
        // (unless it is scoring its prompt, which needs the logits of every position).
        for seq in seqs.iter_mut().filter(|s| s.preempted && !s.is_finished()) {
            if seq.cache.is_empty() && seq.prompt_scores.is_none() {
                if let Some(cache) = self.lookup_prefix(&seq.tokens)? {
                    seq.cache = cache;
                }
            }
            seq.preempted = false;
        }
        let decoding = seqs.iter().filter(|s| !s.is_finished() && s.pending_tokens() == 1).count();
        let mut prompt_budget =
            self.prefill_chunk.map_or(usize::MAX, |b| b.saturating_sub(decoding).max(1));
        let now = Instant::now();
        let mut active: Vec<usize> = Vec::with_capacity(seqs.len());
        let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(seqs.len());
        for (i, seq) in seqs.iter_mut().enumerate() {
            if seq.is_finished() {
                continue;
            }
            let left = seq.pending_tokens();
            let chunk = if left > 1 {
                let take = left.min(seq.prefill_chunk.unwrap_or(usize::MAX)).min(prompt_budget);
                if take == 0 {
                    continue; // no share of this step's budget: it waits for the next
                }
                prompt_budget -= take;
                Some(take)
            } else {
                None
            };
            seq.timings.started.get_or_insert(now);
            active.push(i);
            items.push(BatchItem {
                tokens: &seq.tokens,
                cache: &mut seq.cache,
                max_new_tokens: chunk,
                all_logits: seq.prompt_scores.is_some(),
            });
        }
        if active.is_empty() {
            return Ok(outputs);
        }
        let out = self.model.forward(&mut items)?;
        drop(items);
        let vocab = out.logits.dim(1)?;

        // The logits row each sequence samples from, if it reached the end of its prompt.
        let mut sample_row: Vec<Option<usize>> = vec![None; seqs.len()];
        // Sequences that completed a prompt they generate nothing after (`max_tokens: 0`).
        let mut prompt_only: Vec<bool> = vec![false; seqs.len()];
        let mut needs = vec![RowNeed::Unused; out.logits.dim(0)?];
        // (sequence, logits row, prompt token) of every prompt token scored in this step.
        let mut score_rows: Vec<(usize, usize, u32)> = Vec::new();
        let on_device = picks_on_device(&out.logits);
        for ((&i, rows), positions) in active.iter().zip(&out.rows).zip(&out.positions) {
            let seq = &mut *seqs[i];
            if let Some(scores) = &seq.prompt_scores {
                // Row r holds position p's logits, which score prompt token p + 1; tokens
                // scored before a preemption are not scored again.
                for (row, p) in rows.clone().zip(positions.clone()) {
                    if p + 1 >= scores.len() && p + 1 < seq.prompt_len {
                        needs[row] = RowNeed::Host;
                        score_rows.push((i, row, seq.tokens[p + 1]));
                    }
                }
            }
            if positions.end >= seq.tokens.len() && seq.max_new == 0 {
                prompt_only[i] = true;
            } else if positions.end >= seq.tokens.len() {
                let row = rows.end - 1;
                sample_row[i] = Some(row);
                let generated = &seq.tokens[seq.prompt_len..];
                let logprobs = seq.sampler.logprobs_wanted();
                needs[row] = match seq.sampler.greedy_prefix(vocab) {
                    Some(n_valid) => RowNeed::Greedy { n_valid, logprobs },
                    None if on_device => seq
                        .sampler
                        .device_draw(vocab, generated)
                        .map_or(RowNeed::Host, |draw| RowNeed::Draw { draw, logprobs }),
                    None => RowNeed::Host,
                };
            }
        }
        // From a GPU: the tokens (and logprobs) of the rows it picks in one read, and the
        // other sampled rows in one more transfer.
        let logits = StepLogits::read(&out.logits, &needs)?;
        let rows = sample_row.iter().flatten();
        let on_device = rows.clone().filter(|&&r| matches!(logits.row(r), RowChoice::Picked(..)));
        let on_device = on_device.count() as u64;
        self.picked_on_device.fetch_add(on_device, Ordering::Relaxed);
        self.picked_on_host.fetch_add(rows.count() as u64 - on_device, Ordering::Relaxed);
        // Sampling is a few passes over a vocabulary-sized row per sequence (more with top_p
        // or logprobs); serially that is milliseconds a step for a large batch, with the
        // accelerator idle, so the rows are sampled in parallel.
        let mut sampled: Vec<Option<SampledToken>> = seqs
            .par_iter_mut()
            .zip(&sample_row)
            .map(|(seq, row)| {
                let Some(row) = *row else { return Ok(None) };
                let seq = &mut **seq;
                match logits.row(row) {
                    RowChoice::Picked(token, raw) => Ok(Some(seq.sampler.take_picked(token, raw))),
                    RowChoice::Logits(row) => {
                        seq.sampler.sample(row, &seq.tokens[seq.prompt_len..]).map(Some)
                    }
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        // A prompt row is a vocabulary-wide pass or two, and a chunk has hundreds of them.
        let seqs_now: &[&mut Sequence] = seqs;
        let scores: Vec<(usize, SampledToken)> = score_rows
            .par_iter()
            .map(|&(i, row, token)| {
                let RowChoice::Logits(row) = logits.row(row) else {
                    return Err(EngineError::Candle(candle_core::Error::Msg(
                        "a scored prompt row was not read to the host".into(),
                    )));
                };
                Ok((i, seqs_now[i].sampler.score(row, token)?))
            })
            .collect::<Result<_>>()?;
        for (i, s) in scores {
            if let Some(list) = seqs[i].prompt_scores.as_mut() {
                list.push(GeneratedToken {
                    id: s.token,
                    logprob: s.logprob,
                    top_logprobs: s.top_logprobs,
                });
            }
        }

        for &i in &active {
            let seq = &mut *seqs[i];
            if prompt_only[i] {
                let prompt_logprobs = seq.prompt_scores.take().unwrap_or_default();
                let text = seq.finish(FinishReason::Length, false)?;
                self.offer_to_prefix_cache(seq);
                outputs[i] =
                    StepOutput { text, token: None, finish_reason: seq.finish, prompt_logprobs };
                continue;
            }
            let Some(sampled) = sampled[i].take() else {
                continue; // a prompt chunk that does not reach the end of the prompt yet
            };
            let prompt_logprobs = seq.prompt_scores.take().unwrap_or_default();
            seq.timings.first_token.get_or_insert_with(Instant::now);
            seq.tokens.push(sampled.token);
            let token = GeneratedToken {
                id: sampled.token,
                logprob: sampled.logprob,
                top_logprobs: sampled.top_logprobs,
            };
            seq.generated.push(token.clone());

            let mut emitted = String::new();
            let mut reason = None;
            let mut stopped_by_string = false;
            if !seq.ignore_eos && self.stop_token_ids.contains(&sampled.token) {
                reason = Some(FinishReason::Stop);
            } else if let Some(piece) = seq.decoder.push(sampled.token)? {
                let o = seq.stops.push(&piece);
                emitted.push_str(&o.text);
                if o.is_stop() {
                    reason = Some(FinishReason::Stop);
                    stopped_by_string = true;
                }
            }
            if reason.is_none() && seq.generated.len() >= seq.max_new {
                reason = Some(FinishReason::Length);
            }
            if let Some(r) = reason {
                emitted.push_str(&seq.finish(r, stopped_by_string)?);
                // Its keys and values are not needed any more: later prompts may reuse them.
                self.offer_to_prefix_cache(seq);
            }
            seq.text.push_str(&emitted);
            outputs[i] = StepOutput {
                text: emitted,
                token: Some(token),
                finish_reason: seq.finish,
                prompt_logprobs,
            };
        }
        Ok(outputs)
    }

    /// Generates one completion, calling `on_step` with each step's output (for streaming).
    /// `on_step` returns `false` to cancel, which ends the sequence with what it has.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_step: impl FnMut(&StepOutput) -> bool,
    ) -> Result<Completion> {
        let mut seq = self.new_sequence(prompt, opts)?;
        while !seq.is_finished() {
            let out = self.step(&mut [&mut seq])?.remove(0);
            if !on_step(&out) {
                break;
            }
        }
        Ok(Completion {
            text: seq.text.clone(),
            finish_reason: seq.finish.unwrap_or(FinishReason::Stop),
            prompt_tokens: seq.prompt_len,
            timings: seq.timings,
            tokens: seq.generated,
        })
    }
}
