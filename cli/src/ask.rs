//! `shoal ask`: send a prompt to a cluster node and stream the answer.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};

use anyhow::Context;
use clap::Args;
use cluster::AskEvent;

use crate::common::{GenArgs, PromptArgs};

/// Largest prompt read from stdin.
const PROMPT_BYTES_MAX: usize = 1 << 20;

/// Longest NDJSON line accepted from the node: one token's text and its
/// framing, or the final stats, with a wide margin.
const LINE_BYTES_MAX: u64 = 1 << 20;

/// `shoal ask` flags.
#[derive(Args, Debug)]
pub struct AskArgs {
    /// The node's HTTP API (`host:port` or a URL; SHOAL_HOST too).
    #[arg(long, env = "SHOAL_HOST", default_value = crate::common::DEFAULT_NODE, value_parser = crate::common::node_url)]
    node: String,
    #[command(flatten)]
    gen: GenArgs,
    #[command(flatten)]
    text: PromptArgs,
    /// Context window (default: the node's).
    #[arg(short = 'c', long = "ctx")]
    ctx: Option<usize>,
    /// Print timings to stderr.
    #[arg(short, long)]
    verbose: bool,
    /// Structured output: `json` (any JSON object) or a JSON Schema file
    /// the answer must follow.
    #[arg(long, value_name = "json|SCHEMA.json")]
    format: Option<String>,
    /// No speculative decoding for this request, whatever the node's
    /// `--speculate` (the same tokens either way: for comparing speeds).
    #[arg(long)]
    no_speculate: bool,
    /// File holding the node's API key, if it has one (or SHOAL_API_KEY).
    #[arg(long)]
    api_key_file: Option<std::path::PathBuf>,
    /// Refused with advice (a key on the command line shows in `ps`).
    #[arg(long, hide = true)]
    api_key: Option<String>,
    /// The prompt (default: read stdin).
    prompt: Option<String>,
}

/// An HTTP agent that hands error statuses back as responses (their JSON
/// bodies carry the message).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// The error message of a non-2xx response.
pub fn error_of(resp: ureq::http::Response<ureq::Body>) -> anyhow::Error {
    let status = resp.status();
    let body = resp.into_body().read_to_string().unwrap_or_default();
    let msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            e.as_str()
                .or_else(|| e.get("message")?.as_str())
                .map(str::to_string)
        })
        .unwrap_or(body);
    anyhow::anyhow!("node answered {status}: {msg}")
}

pub fn main(args: AskArgs) -> anyhow::Result<()> {
    let prompt = match &args.prompt {
        Some(p) => p.clone(),
        None => {
            anyhow::ensure!(
                !std::io::stdin().is_terminal(),
                "give a prompt: shoal ask \"...\" (or pipe one on stdin)"
            );
            let mut s = String::new();
            std::io::stdin()
                .take(PROMPT_BYTES_MAX as u64 + 1)
                .read_to_string(&mut s)?;
            anyhow::ensure!(
                s.len() <= PROMPT_BYTES_MAX,
                "prompt exceeds {PROMPT_BYTES_MAX} bytes"
            );
            s
        }
    };
    let mut body = generate_body(&prompt, &args.gen)?;
    body["raw"] = args.text.no_template.into();
    body["system"] = serde_json::json!(args.text.system);
    body["context"] = serde_json::json!(args.ctx);
    if let Some(f) = &args.format {
        body["format"] = crate::common::format_of(f)?;
    }
    if args.no_speculate {
        body["speculate"] = false.into();
    }
    let key = crate::common::api_key(args.api_key.as_deref(), args.api_key_file.as_deref())?;
    stream_answer(&args.node, key.as_deref(), &body, args.verbose)
}

/// The `/api/shoal/generate` body for `prompt` with the generation flags.
pub fn generate_body(prompt: &str, gen: &GenArgs) -> anyhow::Result<serde_json::Value> {
    let s = gen.sampling()?;
    Ok(serde_json::json!({
        "prompt": prompt,
        "max_tokens": gen.max_tokens,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty,
        "seed": s.seed,
    }))
}

/// Posts `body` to the node's `/api/shoal/generate` and prints the answer as it streams.
pub fn stream_answer(
    node: &str,
    api_key: Option<&str>,
    body: &serde_json::Value,
    verbose: bool,
) -> anyhow::Result<()> {
    let url = format!("{}/api/shoal/generate", node.trim_end_matches('/'));
    let mut req = agent().post(&url);
    if let Some(k) = api_key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let resp = req
        .send_json(body)
        .with_context(|| format!("cannot reach the node at {node}"))?;
    if !resp.status().is_success() {
        return Err(error_of(resp));
    }
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(LINE_BYTES_MAX).read_line(&mut line)?;
        anyhow::ensure!(n > 0, "the node closed the stream before the answer ended");
        let event: AskEvent = serde_json::from_str(line.trim_end())
            .with_context(|| format!("bad line from the node: {}", line.trim_end()))?;
        match event {
            AskEvent::Token { text, .. } | AskEvent::Tail { text } => {
                if out
                    .write_all(text.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    return Ok(());
                }
            }
            AskEvent::Done { stats } => {
                println!();
                if verbose {
                    eprintln!("stop: {:?}", stats.stop);
                    eprintln!("{}", stats.summary_line());
                }
                return Ok(());
            }
            AskEvent::Error { error, .. } => {
                println!();
                anyhow::bail!("{error}");
            }
        }
    }
}
