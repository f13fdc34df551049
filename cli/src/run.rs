//! `shoal run`: one-machine chat or completion, streaming tokens to stdout.

use std::io::{BufRead, IsTerminal, Read, Write};

use clap::Args;
use engine::chat::Message;
use engine::{Engine, GenerateEvent, GenerateOptions, GenerationStats, Session};

use crate::common::{GenArgs, ModelArgs, PromptArgs};

/// Largest prompt read from stdin; a bigger one is surely a mistake.
const PROMPT_BYTES_MAX: usize = 16 << 20;

/// `shoal run` flags.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gen: GenArgs,
    #[command(flatten)]
    text: PromptArgs,
    /// Print timings to stderr.
    #[arg(short, long)]
    verbose: bool,
    /// Structured output: `json` (any JSON object) or a JSON Schema file
    /// the answer must follow.
    #[arg(long, value_name = "json|SCHEMA.json")]
    format: Option<String>,
    /// Speculative decoding by prompt lookup: the same tokens, fewer
    /// passes when the answer repeats text (editing, quoting, code). The
    /// proposal length adapts to acceptance and the measured cost of a
    /// pass (off where it does not pay); `--speculate K` always proposes K.
    #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "0")]
    speculate: Option<usize>,
    /// The prompt (default: read stdin, or chat interactively on a terminal).
    prompt: Option<String>,
}

pub fn main(args: RunArgs) -> anyhow::Result<()> {
    let interactive = args.prompt.is_none() && std::io::stdin().is_terminal();
    let prompt = match (&args.prompt, interactive) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => None,
        (None, false) => {
            let mut s = String::new();
            std::io::stdin()
                .take(PROMPT_BYTES_MAX as u64 + 1)
                .read_to_string(&mut s)?;
            anyhow::ensure!(
                s.len() <= PROMPT_BYTES_MAX,
                "prompt on stdin exceeds {PROMPT_BYTES_MAX} bytes"
            );
            Some(s)
        }
    };
    let engine = args.model.load(false)?;
    if args.verbose {
        eprintln!(
            "kernels: {} (chosen for this CPU at start; SHOAL_KERNELS=avx2|portable picks a lower family)",
            engine::quant::kernels().name()
        );
        if let Some(rss) = crate::common::rss_mib() {
            let weights = engine.stage().weight_bytes() as f64 / (1 << 20) as f64;
            eprintln!("memory: rss {rss:.1} MiB after load (weights {weights:.1} MiB)");
        }
    }
    let opts = GenerateOptions {
        max_tokens: args.gen.max_tokens,
        sampling: args.gen.sampling()?,
        context: args.model.ctx,
        speculate: args.speculate,
        constraint: match &args.format {
            None => None,
            Some(f) => Some(match crate::common::format_of(f)? {
                serde_json::Value::String(_) => {
                    protocol::Constraint::JsonSchema(r#"{"type":"object"}"#.into())
                }
                schema => protocol::Constraint::JsonSchema(schema.to_string()),
            }),
        },
    };
    let mut messages: Vec<Message> = args
        .text
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut session = Session::new(engine.new_cache(opts.context));
    match prompt {
        Some(p) => {
            let tokens = if args.text.no_template {
                engine.raw_tokens(&p)?
            } else {
                messages.push(Message::new("user", p));
                engine.chat_tokens(&messages)?
            };
            let (_, stats) = stream(&engine, &mut session, &tokens, &opts)?;
            println!();
            report(&stats, args.verbose);
        }
        None => chat_loop(&engine, &mut session, &mut messages, &opts, &args)?,
    }
    Ok(())
}

fn chat_loop(
    engine: &Engine,
    session: &mut Session,
    messages: &mut Vec<Message>,
    opts: &GenerateOptions,
    args: &RunArgs,
) -> anyhow::Result<()> {
    eprintln!(
        "shoal: chatting with {} (Ctrl-D to quit)",
        engine
            .layout()
            .config
            .name
            .as_deref()
            .unwrap_or("the model")
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        if line.trim().is_empty() {
            continue;
        }
        let tokens = if args.text.no_template {
            let mut t = session.tokens().to_vec();
            t.extend(
                engine
                    .tokenizer()
                    .encode(&line, session.tokens().is_empty(), false)?,
            );
            t
        } else {
            messages.push(Message::new("user", line));
            engine.chat_tokens(messages)?
        };
        match stream(engine, session, &tokens, opts) {
            Ok((reply, stats)) => {
                println!();
                messages.push(Message::new("assistant", reply));
                report(&stats, args.verbose);
            }
            Err(e) => {
                messages.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
}

/// Generates, printing text as it comes; returns the reply and its stats.
fn stream(
    engine: &Engine,
    session: &mut Session,
    tokens: &[u32],
    opts: &GenerateOptions,
) -> anyhow::Result<(String, GenerationStats)> {
    let mut out = std::io::stdout().lock();
    let mut reply = String::new();
    let mut write_err = None;
    let stats = engine.generate_in(session, tokens, opts, &mut |ev| {
        let text = match ev {
            GenerateEvent::Token { text, .. } | GenerateEvent::Tail { text } => text,
        };
        reply.push_str(text);
        // A closed stdout (`shoal run ... | head`) stops generation quietly.
        match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                write_err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    Ok((reply, stats))
}

fn report(stats: &GenerationStats, verbose: bool) {
    if verbose {
        eprintln!("stop: {:?}", stats.stop);
        eprintln!("{}", stats.summary_line());
    }
}
