//! `phi-serve quantize`: a safetensors checkpoint to a GGUF file that both phi-serve and
//! llama.cpp run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use phi_engine::checkpoint::ModelSource;
use phi_engine::quantize::{quantize_checkpoint, QuantScheme};

use crate::options::parse_scheme;

/// Options of `phi-serve quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A local model folder or a Hugging Face repository id (safetensors).
    #[arg(long)]
    model: String,
    /// Branch, tag or commit of a hub repository.
    #[arg(long)]
    revision: Option<String>,
    /// q8_0, q6_k, q5_k_m, q5_k, q5_1, q5_0, q4_k_m, q4_k, q4_1, q4_0, q3_k, q2_k, bf16, f16 or
    /// f32 (llama.cpp's formats; `_m` are its mixes with more bits where they matter most).
    #[arg(long = "type", value_parser = parse_scheme)]
    scheme: QuantScheme,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace `--out` if it exists.
    #[arg(long)]
    force: bool,
}

/// Runs the conversion and prints what it wrote.
pub fn run(args: QuantizeArgs) -> Result<()> {
    if args.out.exists() && !args.force {
        bail!("{} exists (pass --force to replace it)", args.out.display());
    }
    let source = ModelSource::parse(&args.model, args.revision.as_deref())?;
    let files = source.resolve()?;
    if files.gguf.is_some() {
        bail!("{}: already a GGUF file; quantize reads safetensors checkpoints", args.model);
    }
    let start = Instant::now();
    let report = quantize_checkpoint(&files, args.scheme, &args.out)
        .with_context(|| format!("quantizing {} to {}", files.origin, args.scheme.name()))?;
    let formats: Vec<String> = report.formats.iter().map(|(f, n)| format!("{n} {f}")).collect();
    println!(
        "wrote {} ({}, {} tensors: {}; {:.1} MB of tensor data) in {:.1} s",
        args.out.display(),
        args.scheme.name(),
        report.tensors,
        formats.join(", "),
        report.tensor_bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
