//! `shoal`: serve a model from a cluster of machines, run, score and
//! benchmark it on one, simulate clusters.
//!
//! # Layout
//! - `common`: flags shared by subcommands, model loading with a progress bar.
//! - `run`: `shoal run` — chat or completion, streaming to stdout.
//! - `perplexity`: `shoal perplexity` — llama.cpp's definition.
//! - `bench`: `shoal bench` — prompt and generation throughput like llama-bench.
//! - `bench_cluster`: `shoal bench --cluster URL` — a running cluster, measured beside the simulator.
//! - `tokenize`: `shoal tokenize` — token ids of a text.
//! - `node`: `shoal node` — join or start a cluster and serve.
//! - `ask`, `status`: clients of a node's HTTP API.
//! - `demo`: a local multi-node cluster answering a question.
//! - `simulate`: `shoal simulate` — a scenario through the cluster simulator.

mod ask;
mod bench;
mod bench_cluster;
mod common;
mod config;
mod demo;
mod list;
mod node;
mod perplexity;
mod run;
mod simulate;
mod status;
mod tokenize;

use clap::{Parser, Subcommand};

/// shoal: serve big LLMs from the ordinary machines of an office. `node`
/// on each machine forms a cluster; `ask`, `status` and any OpenAI or
/// Ollama client use it; `run`, `bench` and `perplexity` work on one
/// machine; `simulate` sizes a cluster before it exists.
#[derive(Parser, Debug)]
#[command(name = "shoal", version)]
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
    /// Shell completions: `shoal completions bash > /etc/bash_completion.d/shoal`
    /// (also zsh, fish, powershell, elvish).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The models this machine has (name, architecture, parameters,
    /// quantisation, size, path): names to give `-m`.
    List(list::ListArgs),
    /// Join (or start) a cluster on this machine and serve the model with it.
    Node(Box<node::NodeArgs>),
    /// Ask a cluster: send a prompt to a node and stream the answer.
    Ask(ask::AskArgs),
    /// Show the cluster: nodes, devices, memory, layer split, links.
    Status(status::StatusArgs),
    /// Write a new cluster secret to a file (never printed): copy it to every machine.
    Keygen(KeygenArgs),
    /// Start a cluster of several nodes on this machine, ask it, keep its status page up.
    Demo(demo::DemoArgs),
    /// Simulate a cluster described in a scenario file (machines, links, model, load).
    Simulate(simulate::SimulateArgs),
}

/// `shoal keygen`: where to write the new key.
#[derive(clap::Args, Debug)]
struct KeygenArgs {
    /// The key file to create (default: the one `shoal node` reads,
    /// $XDG_CONFIG_HOME/shoal/cluster.key or ~/.config/shoal/cluster.key).
    /// An existing file is never overwritten.
    path: Option<std::path::PathBuf>,
}

/// Writes a new key and says where, never what: a key on a terminal ends up
/// in scrollback, screenshots and CI logs.
fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let path = args.path.unwrap_or_else(node::default_key_file);
    cluster::key::ClusterKey::create(&path)?;
    eprintln!(
        "shoal: wrote a new cluster key to {} (owner-only): copy this file to every machine of the cluster",
        path.display()
    );
    Ok(())
}

fn main() {
    engine::init_process();
    // Settings from config.toml become the flags' variables before parsing.
    if let Err(e) = config::apply() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    let cli = Cli::parse();
    // A node's log is for a person watching it: info by default.
    common::init_tracing(if matches!(cli.command, Command::Node(_)) {
        "info"
    } else {
        "warn"
    });
    let result = match cli.command {
        Command::Run(a) => run::main(a),
        Command::Perplexity(a) => perplexity::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Tokenize(a) => tokenize::main(a),
        Command::List(a) => list::main(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut std::io::stdout());
            Ok(())
        }
        Command::Node(a) => node::main(*a),
        Command::Ask(a) => ask::main(a),
        Command::Status(a) => status::main(a),
        Command::Demo(a) => demo::main(a),
        Command::Simulate(a) => simulate::main(a),
        Command::Keygen(a) => keygen(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
