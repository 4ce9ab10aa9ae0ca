//! `phi-serve`: the command line of the Phi-3 inference server.

mod generate;
mod options;
mod serve;

use clap::{Parser, Subcommand};

/// Self-hosted inference server for Microsoft's Phi-3 family of small language models.
#[derive(Debug, Parser)]
#[command(name = "phi-serve", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a chat answer for one prompt and stream it to the terminal.
    Generate(generate::GenerateArgs),
    /// Serve the Azure AI Model Inference and OpenAI chat-completions APIs over HTTP.
    Serve(serve::ServeArgs),
}

/// Without `RUST_LOG`: warnings of every crate, and phi-serve's own start-up and per-request
/// lines.
const DEFAULT_LOG: &str = "warn,phi_serve=info,phi_server=info,phi_engine=info";

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into a shipped log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
