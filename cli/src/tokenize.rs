//! `shoal tokenize`: the token ids of a text, like llama.cpp's `llama-tokenize`.

use clap::Args;

use crate::common::ModelArgs;

/// `shoal tokenize` flags.
#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Parse special-token texts (e.g. `<|im_start|>`) as their ids.
    #[arg(long)]
    parse_special: bool,
    /// Do not add BOS even if the model asks for it.
    #[arg(long)]
    no_bos: bool,
    /// Print `id 'piece'` per line instead of a JSON array.
    #[arg(long)]
    pieces: bool,
    /// The text.
    text: String,
}

pub fn main(args: TokenizeArgs) -> anyhow::Result<()> {
    let engine = args.model.load(true)?;
    let tok = engine.tokenizer();
    let ids = tok.encode(&args.text, !args.no_bos, args.parse_special)?;
    if args.pieces {
        for id in ids {
            println!(
                "{id:>6} {:?}",
                String::from_utf8_lossy(&tok.token_bytes_special(id))
            );
        }
    } else {
        println!("{}", serde_json::to_string(&ids)?);
    }
    Ok(())
}
