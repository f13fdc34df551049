//! `shoal`: run, score and benchmark GGUF models on this machine.
//!
//! # Layout
//! - `common`: flags shared by subcommands, model loading with a progress bar.
//! - `run`: `shoal run` — chat or completion, streaming to stdout.
//! - `perplexity`: `shoal perplexity` — llama.cpp's definition.
//! - `bench`: `shoal bench` — prompt and generation throughput like llama-bench.
//! - `tokenize`: `shoal tokenize` — token ids of a text.

mod bench;
mod common;
mod perplexity;
mod run;
mod tokenize;

use clap::{Parser, Subcommand};

/// shoal: serve big LLMs from the ordinary machines of an office.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Chat with (or complete text from) a model on this machine.
    Run(run::RunArgs),
    /// Perplexity of a model on a text file, as llama.cpp's llama-perplexity computes it.
    Perplexity(perplexity::PerplexityArgs),
    /// Prompt-processing and generation throughput, like llama-bench.
    Bench(bench::BenchArgs),
    /// Token ids of a text (like llama-tokenize).
    Tokenize(tokenize::TokenizeArgs),
}

fn main() {
    let cli = Cli::parse();
    common::init_tracing();
    let result = match cli.command {
        Command::Run(a) => run::main(a),
        Command::Perplexity(a) => perplexity::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Tokenize(a) => tokenize::main(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
