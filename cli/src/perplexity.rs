//! `shoal perplexity`: llama.cpp's `llama-perplexity` definition, so the
//! numbers compare directly — the text is tokenized once, cut into
//! non-overlapping chunks of `ctx` tokens, each chunk runs from an empty
//! cache, and only the second half of each chunk is scored.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use engine::model::log_prob;
use engine::LogitsFor;

use crate::common::ModelArgs;

/// Largest text file read: what the tokenizer takes in one piece
/// (the standard wikitext-2 test set is ~1.3 MB).
const TEXT_BYTES_MAX: u64 = engine::tokenizer::MAX_INPUT_BYTES as u64;

/// `shoal perplexity` flags.
#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(short, long)]
    file: PathBuf,
    /// Score at most this many chunks (default: all).
    #[arg(long)]
    chunks: Option<usize>,
}

pub fn main(args: PerplexityArgs) -> anyhow::Result<()> {
    let len = std::fs::metadata(&args.file)
        .with_context(|| format!("{}", args.file.display()))?
        .len();
    anyhow::ensure!(
        len <= TEXT_BYTES_MAX,
        "{}: larger than {TEXT_BYTES_MAX} bytes",
        args.file.display()
    );
    let text =
        std::fs::read_to_string(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let engine = args.model.load(false)?;
    let n_ctx = args.model.ctx;
    let tokens = engine.raw_tokens(&text)?;
    anyhow::ensure!(
        tokens.len() >= 2 * n_ctx,
        "{}: {} tokens, need at least 2 * ctx = {} tokens",
        args.file.display(),
        tokens.len(),
        2 * n_ctx
    );
    let n_chunks = (tokens.len() / n_ctx).min(args.chunks.unwrap_or(usize::MAX));
    let first = n_ctx / 2;
    let bos = engine
        .tokenizer()
        .adds_bos()
        .then(|| engine.tokenizer().bos())
        .flatten();
    eprintln!(
        "perplexity: {} tokens, {n_chunks} chunks of {n_ctx}",
        tokens.len()
    );
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let start = std::time::Instant::now();
    for i in 0..n_chunks {
        let mut chunk = tokens[i * n_ctx..(i + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let mut cache = engine.new_cache(n_ctx);
        let mut rows: Vec<Vec<f32>> = Vec::with_capacity(n_ctx);
        for part in chunk.chunks(schedule::PROMPT_CHUNK_TOKENS) {
            let logits = engine.step(part, &mut cache, LogitsFor::All)?;
            rows.extend(logits.to_vec2::<f32>()?);
        }
        for j in first..n_ctx - 1 {
            let lp = log_prob(&rows[j], chunk[j + 1] as usize);
            nll -= lp;
            nll2 += lp * lp;
            count += 1;
        }
        print!("[{}]{:.4},", i + 1, (nll / count as f64).exp());
        use std::io::Write;
        std::io::stdout().flush()?;
    }
    println!();
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let err = if count > 1 {
        ppl * (var / (count - 1) as f64).sqrt()
    } else {
        0.0
    };
    eprintln!(
        "scored {count} tokens in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    println!("Final estimate: PPL = {ppl:.4} +/- {err:.5}");
    Ok(())
}
