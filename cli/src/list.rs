//! `shoal list`: the models this machine has, as `ollama list` shows them.

use clap::Args;

/// `shoal list` flags.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// One JSON object per model instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn main(args: ListArgs) -> anyhow::Result<()> {
    let entries = models::catalog::list();
    if args.json {
        for e in &entries {
            let line = serde_json::json!({
                "name": e.name, "file": e.stem, "architecture": e.architecture,
                "parameters": e.parameters, "quantization": e.quantization,
                "bytes": e.bytes, "path": e.path,
            });
            println!("{line}");
        }
        return Ok(());
    }
    if entries.is_empty() {
        eprintln!(
            "no models in {} yet: `shoal run` fetches the default one, `shoal run -m gemma3:270m` another",
            models::cache_dir().join("models").display()
        );
        return Ok(());
    }
    println!(
        "{:<18} {:<10} {:>7} {:<8} {:>9}  PATH",
        "NAME", "ARCH", "PARAMS", "QUANT", "SIZE"
    );
    for e in entries {
        println!(
            "{:<18} {:<10} {:>7} {:<8} {:>5} MiB  {}",
            e.name,
            e.architecture,
            e.parameters,
            e.quantization.as_deref().unwrap_or("?"),
            e.bytes >> 20,
            e.path.display()
        );
    }
    Ok(())
}
