//! `phi-serve`: the command line of the Phi-3 inference server.

mod allocator;
mod config_file;
mod generate;
mod memory;
mod options;
mod quantize;
mod serve;

use clap::{CommandFactory, Parser, Subcommand};

/// Self-hosted inference server for Microsoft's Phi-3 family of small language models.
#[derive(Debug, Parser)]
#[command(name = "phi-serve", version, about)]
struct Cli {
    /// Log lines on stderr as `text` (for a person) or `json` (one object a line, for a log
    /// shipper). Levels come from RUST_LOG.
    #[arg(long, global = true, value_enum, env = "PHI_SERVE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object a line: timestamp, level, target, fields, and the request's span.
    Json,
}

// Parsed once at start-up: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a chat answer for one prompt and stream it to the terminal.
    Generate(generate::GenerateArgs),
    /// Serve the Azure AI Model Inference and OpenAI chat-completions APIs over HTTP.
    Serve(serve::ServeArgs),
    /// Write a GGUF file (llama.cpp's format) from a safetensors checkpoint, quantized.
    Quantize(quantize::QuantizeArgs),
}

/// Without `RUST_LOG`: warnings of every crate, and phi-serve's own start-up and per-request
/// lines.
const DEFAULT_LOG: &str = "warn,phi_serve=info,phi_server=info,phi_engine=info";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
        // Colours only for a person at a terminal, never into a shipped log.
        LogFormat::Text => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init()
        }
    }
}

fn main() -> std::process::ExitCode {
    allocator::keep_freed_memory();
    let args = match config_file::with_config_file(&Cli::command(), std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    let threads = match &cli.command {
        Command::Generate(args) => args.model.apply_threads(),
        Command::Serve(args) => args.model.apply_threads(),
        Command::Quantize(_) => Ok(()),
    };
    if let Err(e) = threads {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Quantize(args) => quantize::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
