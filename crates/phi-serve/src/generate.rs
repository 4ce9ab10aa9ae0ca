//! `phi-serve generate`: one chat turn from the command line, streamed, with speed figures.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use phi_engine::chat_template::ChatMessage;
use phi_engine::engine::GenerateOptions;
use phi_engine::sampling::SamplingParams;

use crate::options::ModelArgs;

/// Arguments of `phi-serve generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// A system message (translated into user text for templates without a system turn).
    #[arg(long)]
    system: Option<String>,
    /// Send `--prompt` to the model as it is, without the chat template, and print what the
    /// model adds to it (its first token keeps its leading space).
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate (default: until a stop token or the end of the context).
    #[arg(long, value_parser = at_least_one)]
    max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// OpenAI presence penalty.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// OpenAI frequency penalty.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    /// Seed: the same seed gives the same text.
    #[arg(long, allow_hyphen_values = true)]
    seed: Option<i64>,
    /// Stop string (repeat for up to four).
    #[arg(long)]
    stop: Vec<String>,
    /// `ID=BIAS`: add BIAS (-100 to 100) to token ID's logit before sampling, as the API's
    /// `logit_bias` does (repeat for more tokens; 100 forces the token, -100 bans it).
    #[arg(long, value_name = "ID=BIAS", value_parser = parse_logit_bias, allow_hyphen_values = true)]
    logit_bias: Vec<(u32, f32)>,
    /// Generate exactly --max-tokens tokens, through stop tokens (for measuring speed).
    #[arg(long)]
    ignore_eos: bool,
}

/// Runs the subcommand.
pub fn run(args: GenerateArgs) -> Result<()> {
    let engine = args.model.load()?;
    let prompt_ids = if args.raw {
        engine.tokenizer().encode(&args.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::system(s.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        engine.encode_chat(&messages)?.ids
    };
    let opts = GenerateOptions {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: args.seed,
            logit_bias: logit_bias(&args.logit_bias)?,
            ..SamplingParams::default()
        },
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        decode_after_prompt: args.raw,
        prompt_logprobs: false,
    };
    let mut stdout = std::io::stdout().lock();
    let completion = engine.generate(&prompt_ids, &opts, |step| {
        // A closed pipe (e.g. `| head`) cancels the generation.
        stdout.write_all(step.text.as_bytes()).and_then(|_| stdout.flush()).is_ok()
    })?;
    let _ = writeln!(stdout);
    let n = completion.tokens.len();
    let t = completion.timings;
    eprintln!(
        "prompt: {} tokens in {:.3}s ({:.1} tokens/s); generation: {n} tokens in {:.3}s ({:.1} tokens/s); finish: {}",
        completion.prompt_tokens,
        t.prompt.as_secs_f64(),
        t.prompt_tokens_per_second(completion.prompt_tokens),
        t.generation.as_secs_f64(),
        t.generation_tokens_per_second(n),
        completion.finish_reason.as_str(),
    );
    Ok(())
}

/// One `--logit-bias ID=BIAS`.
fn parse_logit_bias(arg: &str) -> Result<(u32, f32), String> {
    let (id, bias) = arg.split_once('=').ok_or_else(|| format!("expected ID=BIAS, got {arg:?}"))?;
    let id = id.trim().parse::<u32>().map_err(|_| format!("{id:?} is not a token id"))?;
    let bias = bias.trim().parse::<f32>().map_err(|_| format!("{bias:?} is not a number"))?;
    Ok((id, bias))
}

/// The flags as the sampler's map; a token named twice is an error (the ranges and the
/// vocabulary are checked with the other sampling parameters).
fn logit_bias(pairs: &[(u32, f32)]) -> Result<std::collections::BTreeMap<u32, f32>> {
    let mut bias = std::collections::BTreeMap::new();
    for &(id, amount) in pairs {
        if bias.insert(id, amount).is_some() {
            anyhow::bail!("--logit-bias names token {id} twice");
        }
    }
    Ok(bias)
}

/// `--max-tokens`: a positive count (the engine's 0, the prompt alone, prints nothing here).
fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("max_tokens must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("max_tokens: {e}")),
    }
}
